"""Tests for m2snet.py: each equation on a hand-worked case (batch 2, two channels, random
weights, non-square maps), the wiring through forward hooks, each ablation switch changing what
it names and nothing else, the released layout and output, published weight files, scoring as
the toolbox does, the BUSI folds and the command line. Small sizes throughout."""
import argparse
import ast
import copy
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import common
import m2snet as m

ROOT = Path(__file__).resolve().parents[1]
EPS = 1e-5  # BatchNorm's eps: an eval-mode BN with fresh statistics divides by sqrt(1 + eps)
TINY = ["--preset", "tiny", "--img-size", "32", "--batch-size", "4", "--toy-sizes", "8,4,4"]


def identity_conv(block):
    """Make a conv block (conv, BN, ReLU) compute relu(x) / sqrt(1 + eps), channel by channel."""
    conv = block[0]
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        for c in range(conv.out_channels):
            conv.weight[c, c, 1, 1] = 1.0
    return block.eval()


def randomise_bn(model, seed=0):
    """Distinct random BN statistics and affine parameters, so that no block is an identity."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            module.running_var.copy_(0.5 + torch.rand(n, generator=g))
            module.weight.data.copy_(0.5 + torch.rand(n, generator=g))
            module.bias.data.copy_(0.1 * torch.randn(n, generator=g))
    return model


def tiny(**overrides):
    torch.manual_seed(overrides.pop("seed", 0))
    return randomise_bn(m.build_model("tiny", **overrides)).eval()


# ---- Eq. (1) and (2): subtraction units and their fixed filters ----

def test_eq1_subtraction_unit_by_hand_batch_two_channels_non_square():
    unit = identity_conv(m.SubtractionUnit(2))
    f_b = torch.tensor([[[[1.0, 5.0, 2.0], [3.0, 0.0, 4.0]], [[0.0, 1.0, 2.0], [2.0, 2.0, 2.0]]],
                        [[[9.0, 9.0, 9.0], [0.0, 0.0, 0.0]], [[4.0, 0.0, 4.0], [0.0, 4.0, 0.0]]]])
    f_a = torch.tensor([[3.0, 1.0], [2.0, 4.0]]).view(2, 2, 1, 1)  # 1x1, upsampled to 2x3
    expected = torch.tensor([[[[2, 2, 1], [0, 3, 1]], [[1, 0, 1], [1, 1, 1]]],
                             [[[7, 7, 7], [2, 2, 2]], [[0, 4, 0], [4, 0, 4]]]], dtype=torch.float)
    assert torch.allclose(unit(f_a, f_b) * math.sqrt(1 + EPS), expected, atol=1e-5)
    unit.unit = "add"  # Tab. 10's AU: F_A + F_B (all >= 0: the ReLU keeps them)
    assert torch.allclose(unit(f_a, f_b) * math.sqrt(1 + EPS), f_b + f_a, atol=1e-5)


def impulses():
    """(2, 2, 5, 7): sample 0 has 1 at (2, 3) in channel 0 and 2 at (0, 0) in channel 1;
    sample 1 has 3 at (4, 6) in channel 1 only."""
    x = torch.zeros(2, 2, 5, 7)
    x[0, 0, 2, 3], x[0, 1, 0, 0], x[1, 1, 4, 6] = 1.0, 2.0, 3.0
    return x


def box(value, rows, cols, shape=(5, 7)):
    out = torch.zeros(shape)
    out[max(rows[0], 0):rows[1], max(cols[0], 0):cols[1]] = value
    return out


def test_eq2_dense_filter_is_the_window_sum_of_the_channel_sum_by_hand():
    x = impulses()
    out = m.AllOnesFilter(3, 2, "dense")(x)
    sample0 = box(1.0, (1, 4), (2, 5)) + box(2.0, (0, 2), (0, 2))  # both channels' impulses
    sample1 = box(3.0, (3, 5), (5, 7))
    for c in (0, 1):  # the same map in every channel
        assert torch.equal(out[0, c], sample0) and torch.equal(out[1, c], sample1)
    one = m.AllOnesFilter(1, 2, "dense")(x)  # dense 1x1 = the channel sum
    assert torch.equal(one[0, 1], x[0, 0] + x[0, 1]) and torch.equal(one[1, 0], x[1, 1])
    per_channel = m.AllOnesFilter(3, 2, "per-channel")(x)
    assert torch.equal(per_channel[0, 0], box(1.0, (1, 4), (2, 5)))
    assert torch.equal(per_channel[1, 0], torch.zeros(5, 7))  # channel 0 of sample 1 is empty
    assert torch.equal(m.AllOnesFilter(1, 2, "per-channel")(x), x)


def test_eq2_msu_sums_the_three_scale_differences_by_hand():
    msu = identity_conv(m.MultiScaleSubtraction(2))
    filters = [m.AllOnesFilter(k, 2, "dense") for k in (1, 3, 5)]
    f_b = torch.zeros(2, 2, 5, 7)
    out = msu(impulses(), f_b, filters) * math.sqrt(1 + EPS)
    expected0 = sum(box(1.0, (2 - r, 3 + r), (3 - r, 4 + r)) + box(2.0, (0, 1 + r), (0, 1 + r))
                    for r in (0, 1, 2))  # 1x1, 3x3 and 5x5 windows around each impulse
    expected1 = sum(box(3.0, (4 - r, 5), (6 - r, 7)) for r in (0, 1, 2))
    assert torch.allclose(out[0, 0], expected0) and torch.allclose(out[0, 1], expected0)
    assert torch.allclose(out[1, 1], expected1)
    assert out[0, 0, 2, 3].item() == pytest.approx(3.0, abs=1e-4)  # centre: in all three windows


def test_released_filter_is_the_dense_all_ones_convolution_with_bn_and_relu():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 9, dtype=torch.float64)
    for size in (3, 5):
        released = randomise_bn(m.AllOnesFilter(size, 4, "released")).double().eval()
        dense = F.conv2d(x, torch.ones(4, 4, size, size, dtype=torch.float64), padding=size // 2)
        bn = released.norm
        expected = torch.relu((dense - bn.running_mean.view(1, 4, 1, 1))
                              / torch.sqrt(bn.running_var.view(1, 4, 1, 1) + EPS)
                              * bn.weight.view(1, 4, 1, 1) + bn.bias.view(1, 4, 1, 1))
        assert torch.allclose(released(x), expected, rtol=1e-10)
        assert torch.allclose(m.AllOnesFilter(size, 4, "dense").double()(x), dense, rtol=1e-10)


def test_tab13_gaussian_weights_keep_the_sum_and_change_only_the_shape():
    x = impulses()
    ones, gauss = m.AllOnesFilter(5, 2, "dense"), m.AllOnesFilter(5, 2, "dense", "gaussian")
    a, b = ones(x)[1, 0], gauss(x)[1, 0]
    # the corner impulse 3 keeps the 3x3 quadrant of the kernel; sigma = 0.3 (2 - 1) + 0.8 = 1.1
    e1, e2 = math.exp(-1 / 2.42), math.exp(-4 / 2.42)
    assert b.sum().item() == pytest.approx(3 * 25 * ((1 + e1 + e2) / (1 + 2 * e1 + 2 * e2)) ** 2,
                                           rel=1e-5)
    assert a.sum().item() == 3 * 9
    assert b[4, 6] > b[2, 4] > 0 and a[4, 6] == a[2, 4]  # peaked at the impulse, not flat
    centre = torch.zeros(1, 1, 9, 9)
    centre[0, 0, 4, 4] = 1.0
    assert gauss(centre).sum() == pytest.approx(25.0, rel=1e-5)  # scaled to the ones' sum n^2
    assert torch.equal(m.AllOnesFilter(1, 2, "dense", "gaussian")(x), m.AllOnesFilter(1, 2)(x))


# ---- Eq. (3) and Fig. 2: the wiring, checked with forward hooks ----

def record(model):
    """Forward hooks on every child module of the model (and the backbone's stages)."""
    seen = {}
    modules = dict(model.named_children())
    modules.update({f"resnet.{n}": c for n, c in model.resnet.named_children()})
    for name, module in modules.items():
        module.register_forward_hook(lambda mod, inputs, out, name=name: seen.__setitem__(
            name, ([t for t in inputs if torch.is_tensor(t)], out)))
    return seen


@pytest.mark.parametrize("released", [False, True])
def test_every_block_receives_the_tensors_of_fig2(released):
    model = tiny(as_released=released)
    seen = record(model)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        model(x)
    out = lambda name: seen[name][1]  # noqa: E731
    inp = lambda name: seen[name][0]  # noqa: E731
    e = [out("resnet.maxpool")] + [out(f"resnet.layer{k}") for k in (1, 2, 3, 4)]
    ms = {(1, i): out(f"x{i}_dem_1") for i in (2, 3, 4, 5)}
    ms[1, 1] = e[0] if released else out("x1_dem_1")
    for i in range(1, 6):  # the reduction of level i reads E^i
        if not (released and i == 1):
            assert torch.equal(inp(f"x{i}_dem_1")[0], e[i - 1])
    for n in range(2, 6):
        for i in range(6 - n, 0, -1):
            name = "_".join(f"x{k}" for k in range(i + n - 1, i - 1, -1))
            ms[n, i] = out(name)
            f_a, f_b = inp(name)[:2]
            deeper = out("x5_dem_4") if released and n == 5 else ms[n - 1, i + 1]
            assert torch.equal(f_a, deeper) and torch.equal(f_b, ms[n - 1, i]), (n, i)
    if released:
        assert torch.equal(inp("x5_dem_4")[0], ms[4, 2])
    first = 2 if released else 1  # Eq. (3) sums MS_1^i .. MS_{6-i}^i; the code leaves MS_1 out
    for i in (1, 2, 3) + (() if released else (4,)):
        assert torch.allclose(inp(f"level{i}")[0], sum(ms[n, i] for n in range(first, 7 - i)))
    ce = {i: out(f"level{i}") for i in (1, 2, 3)}
    ce[4] = ms[2, 4] if released else out("level4")
    assert torch.equal(inp("x5_dem_5")[0], e[4])  # CE^5 from E^5
    d = out("x5_dem_5")
    for i in (4, 3, 2):  # D^i = Conv(up(D^{i+1}) + CE^i)
        assert torch.allclose(inp(f"output{i}")[0], m.resize_to(d, ce[i]) + ce[i])
        d = out(f"output{i}")
    assert torch.allclose(inp("output1")[0], m.resize_to(d, ce[1]) + ce[1])


def test_orders_and_released_code_build_only_what_they_use_every_parameter_trains():
    x, y = torch.randn(2, 3, 64, 48), (torch.rand(2, 1, 64, 48) > 0.5).float()
    for released in (False, True):
        for orders in range(2 if released else 1, 6):
            for deep in (False, True):
                model = m.build_model("tiny", as_released=released, orders=orders,
                                      deep_supervision=deep).train()
                out = model(x)
                logits, sides = out if deep else (out, ())
                m.total_loss(logits, y, sides=sides)[0].backward()
                idle = [n for n, p in model.named_parameters()
                        if p.requires_grad and p.grad is None]
                assert not idle, (released, orders, deep, idle[:3])  # DDP would hang on these
    one = m.build_model("tiny", orders=1)
    assert not hasattr(one, "x5_dem_1") and not hasattr(one, "x5_x4") and one.filter_names == []


# ---- every ablation switch changes what it names, and nothing else ----

def outputs_with_same_weights(reference, **overrides):
    """(reference output, output of the switched model carrying the reference's weights)."""
    other = tiny(**overrides)
    other.load_state_dict(reference.state_dict(), strict=False)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return reference(x), other(x), other


@pytest.mark.parametrize("switch", [{"msu_kernels": (1, 3, 7)}, {"msu_filter": "per-channel"},
                                    {"msu_weights": "gaussian"}, {"unit": "add"}])
def test_unit_switches_keep_the_parameters_and_change_the_output(switch):
    reference = tiny()
    before, after, other = outputs_with_same_weights(reference, **switch)
    shapes = lambda net: {k: v.shape for k, v in net.state_dict().items()}  # noqa: E731
    assert shapes(other) == shapes(reference)  # the fixed filters add no parameters
    assert not torch.allclose(before, after, atol=1e-4)
    seen_ref, seen_other = record(reference), record(other)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        reference(x), other(x)
    for i in (2, 3, 4, 5):  # MS_1^i: untouched; MS_2^4: changed
        assert torch.equal(seen_ref[f"x{i}_dem_1"][1], seen_other[f"x{i}_dem_1"][1])
    assert not torch.allclose(seen_ref["x5_x4"][1], seen_other["x5_x4"][1])


def test_orders_and_deep_supervision_change_only_their_modules():
    full = set(tiny().state_dict())
    for orders in (1, 2, 3, 4):
        kept = set(tiny(orders=orders).state_dict())
        gone = {k.split(".")[0] for k in full - kept}
        expected = {"_".join(f"x{k}" for k in range(i + n - 1, i - 1, -1))
                    for n in range(orders + 1, 6) for i in range(1, 7 - n)}
        assert gone == expected | ({"x5_dem_1"} if orders == 1 else set()) and kept < full
    reference = tiny()
    before, after, deep = outputs_with_same_weights(reference, deep_supervision=True)
    assert {k.split(".")[0] for k in set(deep.state_dict()) - full} == {"sides"}
    assert torch.equal(before, after)  # at test time the heads are unused
    deep.train()
    logits, sides = deep(torch.randn(2, 3, 64, 96))
    assert len(sides) == 3 and all(s.shape == logits.shape == (2, 1, 64, 96) for s in sides)


def test_loss_switches_change_only_their_term():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 16, 24)
    mask = torch.zeros(2, 1, 16, 24)
    mask[0, :, 2:9, 3:11], mask[1, :, 8:, 12:20] = 1, 1
    lossnet = m.LossNet(4, 0)
    base, terms = m.total_loss(logits, mask, lossnet)
    assert base.item() == pytest.approx(terms["iou"] + terms["bce"] + terms["f"], rel=1e-6)
    weighted, t = m.total_loss(logits, mask, lossnet, lossnet_weight=0.1)
    assert t == terms and weighted.item() == pytest.approx(base.item() - 0.9 * terms["f"], 1e-6)
    plain, t = m.total_loss(logits, mask, lossnet, bce="plain")
    assert t["iou"] == terms["iou"] and t["f"] == terms["f"] and t["bce"] != terms["bce"]
    assert t["bce"] == pytest.approx(F.binary_cross_entropy_with_logits(logits, mask).item())
    no_seg, t = m.total_loss(logits, mask, lossnet, seg=False)
    assert t == terms and no_seg.item() == pytest.approx(terms["f"], rel=1e-6)
    norm, t = m.total_loss(logits, mask, m.LossNet(4, 0, "norm"))
    assert (t["iou"], t["bce"]) == (terms["iou"], terms["bce"]) and t["f"] != terms["f"]
    sides, t = m.total_loss(logits, mask, lossnet, sides=[logits, logits])
    assert t["side"] == pytest.approx(2 * (terms["iou"] + terms["bce"]), rel=1e-6)
    assert sides.item() == pytest.approx(base.item() + t["side"], rel=1e-6)
    assert m.total_loss(logits, mask)[1]["f"] == 0  # --no-lossnet


def test_recipe_switches_and_as_released_bundle():
    args, _ = m.parse_args(["--data", str(ROOT), "--as-released"])
    assert args.released_network and args.released_loss and args.released_recipe
    assert args.lossnet_weight == 0.1 and args.lossnet_distance == "mse"
    args, _ = m.parse_args(["--data", str(ROOT), "--released-loss", "--lossnet-weight", "0.5"])
    assert not args.released_network and not args.released_recipe and args.lossnet_weight == 0.5
    model = m.build_model("tiny")
    paper, released = m.make_optimizer(model, 0.05), m.make_optimizer(model, 0.05, True)
    assert [g["lr"] for g in paper.param_groups] == pytest.approx([0.005, 0.05])
    assert [g["lr"] for g in released.param_groups] == pytest.approx([0.05, 0.05])
    assert not paper.defaults["nesterov"] and released.defaults["nesterov"]
    backbone = {id(p) for p in model.resnet.parameters()}
    assert {id(p) for p in paper.param_groups[0]["params"]} == backbone
    common.set_lr(paper, 0.02)  # the schedule keeps the backbone at a tenth
    assert [g["lr"] for g in paper.param_groups] == pytest.approx([0.002, 0.02])


def test_paper_protocol_defaults_on_real_data_and_toy_data():
    args, _ = m.parse_args(["--data", str(ROOT)])
    assert (args.pretrained, args.val_fraction, args.multi_scale, args.lossnet_weight) == (
        "auto", 0.0, "random-size", 1.0)
    assert not (args.released_network or args.released_loss or args.released_recipe)
    args, _ = m.parse_args([])
    assert (args.pretrained, args.multi_scale) == ("none", "off")
    args, _ = m.parse_args(["--data", str(ROOT), "--val-fraction", "0.2", "--pretrained",
                            "none", "--multi-scale", "pranet"])
    assert (args.val_fraction, args.pretrained, args.multi_scale) == (0.2, "none", "pranet")
    for flags in (["--no-lossnet", "--no-seg-loss"], ["--fold", "5"],
                  ["--released-loss", "--lossnet-distance", "norm"]):
        with pytest.raises(common.UserError):
            m.parse_args(flags)


# ---- the released network: layout (spec 12), parameters (spec 6), output ----

def spec_layout():
    """The 690 keys and shapes of the authors' M2SNet state_dict, written from spec 12."""
    keys = {}

    def conv(name, out_channels, in_channels, k, bias=False):
        keys[f"{name}.weight"] = (out_channels, in_channels, k, k)
        if bias:
            keys[f"{name}.bias"] = (out_channels,)

    def bn(name, channels):
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{name}.{suffix}"] = (channels,)
        keys[f"{name}.num_batches_tracked"] = ()

    r = "resnet."
    conv(r + "conv1.0", 32, 3, 3), bn(r + "conv1.1", 32), conv(r + "conv1.3", 32, 32, 3)
    bn(r + "conv1.4", 32), conv(r + "conv1.6", 64, 32, 3), bn(r + "bn1", 64)
    inplanes = 64
    for stage, (blocks, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), 1):
        width = planes * 26 // 64  # 26, 52, 104, 208
        for j in range(blocks):
            p = f"{r}layer{stage}.{j}."
            conv(p + "conv1", 4 * width, inplanes if j == 0 else 4 * planes, 1)
            bn(p + "bn1", 4 * width)
            for k in range(3):
                conv(p + f"convs.{k}", width, width, 3), bn(p + f"bns.{k}", width)
            conv(p + "conv3", 4 * planes, 4 * width, 1), bn(p + "bn3", 4 * planes)
            if j == 0:
                conv(p + "downsample.1", 4 * planes, inplanes, 1), bn(p + "downsample.2",
                                                                      4 * planes)
        inplanes = 4 * planes
    keys[r + "fc.weight"], keys[r + "fc.bias"] = (1000, 2048), (1000,)
    assert len(keys) == 524  # spec 12: resnet.* 524 keys
    bn("conv_3.norm", 64), bn("conv_5.norm", 64)
    blocks = [("x5_dem_1", 2048), ("x4_dem_1", 1024), ("x3_dem_1", 512), ("x2_dem_1", 256)]
    blocks += [(name, 64) for name in ("x5_x4", "x4_x3", "x3_x2", "x2_x1", "x5_x4_x3",
                                       "x4_x3_x2", "x3_x2_x1", "x5_x4_x3_x2", "x4_x3_x2_x1",
                                       "x5_dem_4", "x5_x4_x3_x2_x1", "level3", "level2",
                                       "level1")]
    blocks += [("x5_dem_5", 2048), ("output4", 64), ("output3", 64), ("output2", 64)]
    for name, in_channels in blocks:
        conv(f"{name}.0", 64, in_channels, 3, bias=True), bn(f"{name}.1", 64)
    conv("output1.0", 1, 64, 3, bias=True)
    return keys


def test_released_state_dict_is_the_authors_690_key_layout():
    layout = spec_layout()
    assert len(layout) == 690
    own = m.build_model("paper", as_released=True).state_dict()
    assert set(own) == set(layout)
    assert all(tuple(own[k].shape) == shape for k, shape in layout.items())
    tops = list(dict.fromkeys(k.split(".")[0] for k in own))  # module definition order
    assert tops == list(dict.fromkeys(k.split(".")[0] for k in layout))


def test_parameter_counts_match_spec_and_paper():
    released = m.build_model("paper", as_released=True)
    without_fc = sum(p.numel() for n, p in released.named_parameters()
                     if not n.startswith("resnet.fc."))
    assert without_fc == 27_692_585  # spec 6
    paper = sum(p.numel() for p in m.build_model("paper").parameters())
    # paper text: + a 3x3 block for E^1 (37,056) - x5_dem_4 (37,056) + a conv for CE^4
    # (37,056) - the filters' two BNs (256); no fc
    assert paper == 27_692_585 + 37_056 - 256 == 27_729_385
    assert round(paper / 1e6, 1) == 27.7  # Tab. 14: 27.7 M


def reference_released_forward(model, x):
    """The authors' M2SNet.forward written out as in model/miccai_msnet.py, with the dense
    all-ones weights of CNN1 (spec 3-5): an independent check of the wiring."""
    def cnn1(module, size, t):
        ones = torch.ones(t.shape[1], t.shape[1], size, size, dtype=t.dtype)
        return module.relu(module.norm(F.conv2d(t, ones, padding=size // 2)))

    def msu(block, a, b):
        a = F.interpolate(a, size=b.shape[2:], mode="bilinear", align_corners=False)
        a3, b3 = cnn1(model.conv_3, 3, a), cnn1(model.conv_3, 3, b)
        a5, b5 = cnn1(model.conv_5, 5, a), cnn1(model.conv_5, 5, b)
        conv, norm, relu = block
        return relu(norm(conv(abs(a - b) + abs(a3 - b3) + abs(a5 - b5))))

    up = lambda t, r: F.interpolate(t, size=r.shape[2:], mode="bilinear",  # noqa: E731
                                    align_corners=False)
    res = model.resnet
    x1 = res.maxpool(res.relu(res.bn1(res.conv1(x))))
    x2 = res.layer1(x1)
    x3 = res.layer2(x2)
    x4 = res.layer3(x3)
    x5 = res.layer4(x4)
    d5, d4, d3, d2 = model.x5_dem_1(x5), model.x4_dem_1(x4), model.x3_dem_1(x3), model.x2_dem_1(x2)
    x5_4, x4_3 = msu(model.x5_x4, d5, d4), msu(model.x4_x3, d4, d3)
    x3_2, x2_1 = msu(model.x3_x2, d3, d2), msu(model.x2_x1, d2, x1)
    x5_4_3, x4_3_2 = msu(model.x5_x4_x3, x5_4, x4_3), msu(model.x4_x3_x2, x4_3, x3_2)
    x3_2_1 = msu(model.x3_x2_x1, x3_2, x2_1)
    x5_4_3_2 = msu(model.x5_x4_x3_x2, x5_4_3, x4_3_2)
    x4_3_2_1 = msu(model.x4_x3_x2_x1, x4_3_2, x3_2_1)
    x5_4_3_2_1 = msu(model.x5_x4_x3_x2_x1, model.x5_dem_4(x5_4_3_2), x4_3_2_1)
    level4 = x5_4
    level3 = model.level3(x4_3 + x5_4_3)
    level2 = model.level2(x3_2 + x4_3_2 + x5_4_3_2)
    level1 = model.level1(x2_1 + x3_2_1 + x4_3_2_1 + x5_4_3_2_1)
    out4 = model.output4(up(model.x5_dem_5(x5), level4) + level4)
    out3 = model.output3(up(out4, level3) + level3)
    out2 = model.output2(up(out3, level2) + level2)
    out1 = model.output1(up(out2, level1) + level1)
    return up(out1, x)


def test_released_network_gives_the_authors_output_for_the_same_weights():
    torch.manual_seed(0)
    ours = m.build_model("paper", as_released=True).double()
    theirs = copy.deepcopy(ours)
    x = torch.rand(2, 3, 64, 80, dtype=torch.float64)
    # training mode: also the order of the 20 shared-BN updates per forward must agree
    out, expected = ours.train()(x), reference_released_forward(theirs.train(), x)
    assert torch.allclose(out, expected, rtol=1e-9, atol=1e-9)
    for name in ("conv_3.norm.running_mean", "conv_5.norm.running_var"):
        assert torch.allclose(ours.state_dict()[name], theirs.state_dict()[name], rtol=1e-9)


# ---- published weight files (written here in their formats, never downloaded) ----

def run_log():
    lines = []
    return lines, argparse.Namespace(log=lambda *a: lines.append(" ".join(map(str, a))),
                                     is_main=True, barrier=lambda: None)


def test_published_weight_files_load_and_say_what_loaded(tmp_path, monkeypatch):
    torch.manual_seed(0)
    res2net = m.Res2Net(m.PRESETS["tiny"], with_fc=True).state_dict()  # keys without prefix
    res2net = {k: v for k, v in res2net.items() if not k.endswith("num_batches_tracked")}
    torch.save(res2net, tmp_path / "res2net50_v1b_26w_4s-3cf99910.pth")
    vgg = {f"features.{n}.{s}": torch.randn((o, i, 3, 3) if s == "weight" else (o,))
           for n, o, i in [(0, 4, 3), (2, 4, 4), (5, 8, 4), (7, 8, 8), (10, 16, 8), (12, 16, 16),
                           (14, 16, 16), (17, 32, 16), (19, 32, 32), (21, 32, 32), (24, 32, 32)]
           for s in ("weight", "bias")}
    vgg["classifier.0.weight"] = torch.rand(2, 2)  # torchvision's file has the classifier
    torch.save(vgg, tmp_path / "vgg16-397923af.pth")
    model, lossnet = m.build_model("tiny"), m.LossNet(4, 0)
    lines, run = run_log()
    args = argparse.Namespace(pretrained=str(tmp_path / "res2net50_v1b_26w_4s-3cf99910.pth"),
                              vgg_weights=str(tmp_path / "vgg16-397923af.pth"))
    m.load_pretrained(model, lossnet, args, run)
    assert torch.equal(model.resnet.layer2[0].convs[0].weight, res2net["layer2.0.convs.0.weight"])
    assert torch.equal(lossnet.state_dict()["blocks.2.10.weight"], vgg["features.10.weight"])
    assert torch.equal(lossnet.state_dict()["blocks.3.21.bias"], vgg["features.21.bias"])
    assert lines[0].startswith("backbone: ") and "tensors from" in lines[0]
    assert lines[1].startswith("LossNet VGG-16: 20 of 20 tensors")
    # the authors' trained checkpoint (a state_dict with resnet.* keys) fills the whole network,
    # also when saved beside a pickled config object (loaded inertly, never executed)
    released = m.build_model("tiny", as_released=True)
    torch.save({"state_dict": released.state_dict(), "args": argparse.Namespace(lr=0.05)},
               tmp_path / "m2snet.pth")
    target = m.build_model("tiny", as_released=True)
    lines, run = run_log()
    m.load_pretrained(target, None, argparse.Namespace(pretrained=str(tmp_path / "m2snet.pth"),
                                                       vgg_weights=None), run)
    assert lines[0].startswith("M2SNet: ") and torch.equal(target.x5_x4[0].weight,
                                                            released.x5_x4[0].weight)
    monkeypatch.setattr(common, "fetch_weights", lambda url, *a, **k: None)  # offline
    lines, run = run_log()
    m.load_pretrained(m.build_model("tiny"), m.LossNet(4, 0),
                      argparse.Namespace(pretrained="auto", vgg_weights=None), run)
    assert lines == ["LossNet: no ImageNet VGG-16 weights: L_f uses random, fixed VGG features"]
    torch.save({"nothing.fits": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(common.UserError, match="wrong.pth"):
        m.load_pretrained(m.build_model("tiny"), None, argparse.Namespace(
            pretrained=str(tmp_path / "wrong.pth"), vgg_weights=None), run_log()[1])


# ---- Eqs. (4)-(6): losses ----

def test_eq4_total_loss_by_hand_on_an_empty_mask():
    logits, mask = torch.zeros(2, 1, 4, 6), torch.zeros(2, 1, 4, 6)
    # empty mask: weights 1; BCE(0, 0) = ln 2; wIoU = 1 - (0 + 1) / (24 * 0.5 + 1) = 12 / 13
    for bce in ("weighted", "plain"):
        loss, _ = m.total_loss(logits, mask, None, bce)
        assert loss.item() == pytest.approx(math.log(2) + 12 / 13, abs=1e-6)
    constant = lambda p, g: torch.tensor(2.0)  # noqa: E731  a LossNet stand-in: L_f = 2
    assert m.total_loss(logits, mask, constant)[0].item() == pytest.approx(
        math.log(2) + 12 / 13 + 2.0, abs=1e-6)  # Eq. (4): unit weight


def test_weighted_bce_and_iou_by_hand_with_the_boundary_weights():
    logits = torch.tensor([[[[2.0, -1.0]]], [[[0.5, 3.0]]]])  # (2, 1, 1, 2)
    mask = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 0.0]]]])
    w = [1 + 5 * (1 - 1 / 961), 1 + 5 / 961]  # the 31x31 window counts its zero padding
    bce = lambda z, g: math.log(1 + math.exp(-z)) if g else math.log(1 + math.exp(z))  # noqa
    first = (w[0] * bce(2.0, 1) + w[1] * bce(-1.0, 0)) / (w[0] + w[1])
    second = (bce(0.5, 0) + bce(3.0, 0)) / 2  # an empty mask: weights 1
    s = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    iou = [1 - (s(2.0) * w[0] + 1) / (w[0] + s(-1.0) * w[1] + 1),  # U - I = w0 + s(-1) w1
           1 - 1 / (s(0.5) + s(3.0) + 1)]
    l_iou, l_bce = m.segmentation_losses(logits, mask)
    assert l_bce.item() == pytest.approx((first + second) / 2, rel=1e-6)  # per image, then mean
    assert l_iou.item() == pytest.approx(sum(iou) / 2, rel=1e-6)


def test_losses_reduce_per_image_not_over_the_pooled_batch():
    torch.manual_seed(1)
    logits = torch.randn(2, 1, 12, 10)
    mask = torch.zeros(2, 1, 12, 10)
    mask[0, :, 1:11, 1:9] = 1  # a large lesion and a small one
    mask[1, :, 5:7, 4:6] = 1
    one = [m.segmentation_losses(logits[k:k + 1], mask[k:k + 1]) for k in (0, 1)]
    both = m.segmentation_losses(logits, mask)
    for term in (0, 1):
        assert both[term].item() == pytest.approx((one[0][term] + one[1][term]).item() / 2,
                                                  rel=1e-6)
    prob, weight = torch.sigmoid(logits), 1 + 5 * (F.avg_pool2d(mask, 31, 1, 15) - mask).abs()
    inter, union = (prob * mask * weight).sum(), ((prob + mask) * weight).sum()
    pooled = 1 - (inter + 1) / (union - inter + 1)
    assert abs(pooled.item() - both[0].item()) > 1e-3  # the pooled reading differs here


def test_eq5_lossnet_applies_the_four_blocks_in_sequence_and_sums_them():
    lossnet = m.LossNet(4, 0)

    class Double(nn.Module):
        def forward(self, x):
            return 2 * x
    lossnet.blocks = nn.ModuleList([Double() for _ in range(4)])
    prediction, mask = torch.zeros(2, 1, 3, 5), torch.ones(2, 1, 3, 5)
    d = float(np.mean([1 / s ** 2 for s in common.IMAGENET_STD]))  # mse of the prepared maps
    # level k sees 2^k times the prepared difference: (4 + 16 + 64 + 256) d
    assert lossnet(prediction, mask).item() == pytest.approx(340 * d, rel=1e-5)
    assert m.LossNet(4, 224).prepare(mask).shape == (2, 3, 224, 224)  # paper: resized to 224


def test_eq5_gradient_reaches_the_prediction_never_the_mask_or_the_vgg():
    torch.manual_seed(0)
    lossnet = m.LossNet(4, 0)
    prediction = torch.rand(2, 1, 16, 24, requires_grad=True)
    mask = (torch.rand(2, 1, 16, 24) > 0.5).float().requires_grad_()
    lossnet(prediction, mask).backward()
    assert prediction.grad is not None and prediction.grad.abs().sum() > 0
    assert mask.grad is None  # the target's features are detached
    assert all(p.grad is None and not p.requires_grad for p in lossnet.parameters())
    assert lossnet(mask, mask).item() == 0


def test_eq6_feature_distance_by_hand():
    f_p, f_g = torch.zeros(2, 2, 1, 2), torch.zeros(2, 2, 1, 2)
    f_p[0, :, 0, 0] = torch.tensor([3.0, 4.0])
    f_p[1, :, 0, 1] = torch.tensor([0.0, 2.0])
    # squares: 9 + 16 + 4 over 8 elements; norms: 5 and 2 over 4 pixels
    assert m.feature_distance(f_p, f_g).item() == pytest.approx(29 / 8)
    assert m.feature_distance(f_p, f_g, "norm").item() == pytest.approx(7 / 4)


# ---- recipe ----

def test_recipe_schedule_sizes_and_augmentation():
    assert m.lr_factor(0, 50) * 0.05 == pytest.approx(0.00196, abs=1e-5)  # spec 9 values
    assert m.lr_factor(24, 50) * 0.05 == pytest.approx(0.04902, abs=1e-5)
    assert m.training_sizes(352, "pranet", None) == [256, 352, 448]
    import random
    drawn = {m.training_sizes(352, "random-size", random.Random(s))[0] for s in range(40)}
    assert drawn == set(m.BATCH_SIZES) and m.training_sizes(64, "off", None) == [64]
    image, mask = np.zeros((8, 12, 3), np.uint8), np.zeros((8, 12), bool)
    image[:, :3], mask[:, :3] = 255, True  # a left stripe in both
    for seed in range(8):
        flipped_image, flipped_mask = m.flip_rotate(image, mask, random.Random(seed))
        assert ((flipped_image[..., 0] > 127) == flipped_mask).mean() > 0.9  # moved together


def test_one_optimisation_step_lowers_the_loss():
    torch.manual_seed(0)
    model, lossnet = m.build_model("tiny"), m.LossNet(4, 0)
    data = common.ToyBinary(4, 32, seed=1)
    loader = [torch.utils.data.default_collate([data[i] for i in range(4)])]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = lambda logits, mask, sides=(): m.total_loss(logits, mask, lossnet)  # noqa: E731
    first = m.train_one_epoch(model, loader, optimizer, loss_fn, torch.device("cpu"), show=False)
    second = m.train_one_epoch(model, loader, optimizer, loss_fn, torch.device("cpu"), show=False)
    assert set(first) == {"loss", "loss_iou", "loss_bce", "loss_f"} and second["loss"] < first[
        "loss"]


# ---- scoring what the toolbox scores ----

def test_scored_map_is_the_saved_8bit_png_as_the_toolbox_reads_it():
    png, pred = m.scored_map(np.array([[0.5, 0.25, 1.0], [0.0, 0.999, 0.1]]), (2, 3))
    assert png.tolist() == [[127, 63, 255], [0, 254, 25]]  # x 255, truncated (ToPILImage)
    assert np.allclose(pred, png / 255)  # already spans 0..255: min-max changes nothing
    png, pred = m.scored_map(np.full((4, 4), 0.003), (4, 4))  # a near-empty map: all zeros
    assert png.max() == 0 and pred.max() == 0  # constant: not stretched to [0, 1]
    png, pred = m.scored_map(np.array([[0.2, 0.4]]), (3, 5))  # resized to the image, PIL bilinear
    assert png.shape == (3, 5) and pred.min() == 0 and pred.max() == 1


class Maps(torch.utils.data.Dataset):
    """Two non-square images with given masks; the model stub returns the given logits."""

    def __init__(self, masks):
        self.masks, self.names = masks, ["a", "b"]

    def __len__(self):
        return len(self.masks)

    def full(self, index):
        return np.zeros(self.masks[index].shape + (3,), np.uint8), self.masks[index]

    def __getitem__(self, index):
        return {"image": torch.full((3, 6, 8), float(index)), "index": index}


def test_evaluate_scores_tab4_tab3_and_tab8_columns_per_image(tmp_path):
    masks = [np.zeros((6, 8), bool), np.zeros((6, 8), bool)]
    masks[0][1:5, 1:5], masks[1][2:4, 2:8] = True, True  # 16 and 12 pixels
    predicted = torch.full((2, 1, 6, 8), -20.0)
    predicted[0, 0, 1:5, 1:3] = 20.0  # 8 of the 16 pixels, nothing else
    predicted[1, 0, 2:4, 0:4] = 20.0  # 4 right + 4 wrong
    model = lambda x: predicted[x[:, 0, 0, 0].long()]  # noqa: E731
    model.eval = lambda: model
    busi = m.evaluate(model, Maps(masks), "cpu", "busi", 2, tmp_path / "p", distances=True)
    assert busi["Jaccard"] == pytest.approx((8 / 16 + 4 / 16) / 2)
    assert busi["Dice"] == pytest.approx((2 * 8 / 24 + 2 * 4 / 20) / 2)
    assert busi["Precision"] == pytest.approx((1 + 0.5) / 2)
    assert busi["Recall"] == pytest.approx((0.5 + 4 / 12) / 2)
    assert busi["Specificity"] == pytest.approx((1 + 32 / 36) / 2)
    assert busi["HD95"] > 0 and busi["ASD"] > 0 and list(busi)[-2:] == ["ASD", "HD95"]
    assert Image.open(tmp_path / "p" / "a.png").size == (8, 6)
    lung = m.evaluate(model, Maps(masks), "cpu", "lung", 2)
    assert list(lung) == ["DSC", "Precision", "Recall", "Sm", "MAE"]
    assert lung["DSC"] == busi["Dice"] and lung["MAE"] == pytest.approx((8 / 48 + 12 / 48) / 2)
    polyp = m.evaluate(model, Maps(masks), "cpu", "polyp", 2)
    assert list(polyp) == ["mDice", "mIoU", "wFm", "Sm", "maxEm", "MAE"]
    assert polyp["MAE"] == lung["MAE"]


# ---- BUSI folds ----

def busi_pairs():
    return [{"image": f"/d/BUSI/{c}/{c} ({k}).png", "masks": []}
            for c, n in (("benign", 9), ("malignant", 5), ("normal", 3)) for k in range(1, n + 1)]


def test_busi_folds_are_stratified_disjoint_and_seeded():
    pairs = busi_pairs()
    folds = m.busi_folds(pairs, seed=0)
    assert len(folds) == 4 and sorted(len(f) for f in folds) == [4, 4, 4, 5]
    assert sorted(p["image"] for f in folds for p in f) == sorted(p["image"] for p in pairs)
    for c, n in (("benign", 9), ("malignant", 5), ("normal", 3)):
        counts = [sum(c in p["image"] for p in f) for f in folds]
        assert max(counts) - min(counts) <= 1 and sum(counts) == n
    assert m.busi_folds(pairs, seed=0) == folds and m.busi_folds(pairs, seed=1) != folds
    with pytest.raises(common.UserError, match="x.png"):
        m.busi_folds([{"image": "/d/x.png"}])


def write_busi(root, per_class=3):
    rng = np.random.default_rng(0)
    for c in ("benign", "malignant", "normal"):
        (root / c).mkdir(parents=True)
        for k in range(1, per_class + 1):
            image = rng.integers(0, 255, (30, 40), dtype=np.uint8)
            mask = np.zeros((30, 40), np.uint8)
            mask[5:15 + k, 8:20] = 0 if c == "normal" else 255
            Image.fromarray(image).save(root / c / f"{c} ({k}).png")
            Image.fromarray(mask).save(root / c / f"{c} ({k})_mask.png")


def test_busi_default_runs_the_four_folds_and_prints_mean_and_std(tmp_path, capsys):
    write_busi(tmp_path / "Dataset_BUSI_with_GT")
    flags = ["--data", str(tmp_path / "Dataset_BUSI_with_GT"), "--preset", "tiny", "--img-size",
             "32", "--batch-size", "4", "--epochs", "1", "--pretrained", "none"]
    one = m.main([*flags, "--fold", "2", "--out", str(tmp_path / "f2")])
    assert list(one) == ["fold 2"] and list(one["fold 2"]) == list(m.COLUMNS["busi"])
    splits = json.loads((tmp_path / "f2" / "splits.json").read_text())
    assert sorted(len(v) for v in splits.values()) == [2, 2, 2, 3]
    summary = m.main([*flags, "--out", str(tmp_path / "cv")])
    assert all((tmp_path / "cv" / f"fold{k}" / "test_metrics.json").is_file() for k in range(1, 5))
    assert summary["Dice"]["std"] == pytest.approx(np.std(summary["Dice"]["folds"]))
    assert summary["Dice"]["folds"][1] == pytest.approx(one["fold 2"]["Dice"])  # same seed
    assert "4-fold cross-validation (x100): Jaccard" in capsys.readouterr().out
    config = json.loads((tmp_path / "cv" / "fold1" / "config.json").read_text())
    assert config["epochs"] == 1 and config["metrics"] == "busi"


def test_task_epochs_and_table_follow_the_data_set(tmp_path):
    write_busi(tmp_path / "BUSI")
    for flags, epochs, metrics, fold in (([], 100, "busi", "all"), (["--epochs", "3"], 3, "busi",
                                                                     "all"),
                                         (["--metrics", "lung"], 200, "lung", "all")):
        args, explicit = m.parse_args(["--data", str(tmp_path / "BUSI"), *flags])
        m.load_task_data(args, explicit, argparse.Namespace(save_json=lambda *a: None))
        assert (args.epochs, args.metrics, args.fold) == (epochs, metrics, fold)


# ---- command line ----

@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    metrics = m.main([*TINY, "--epochs", "2", "--out", str(out)])
    return out, metrics


def test_cli_run_writes_every_file_and_logs_each_loss_term(cli_run):
    out, metrics = cli_run
    for name in ("config.json", "log.csv", "last.pt", "best.pt", "test_metrics.json"):
        assert (out / name).is_file(), name
    assert list(metrics["toy"]) == ["mDice", "mIoU", "wFm", "Sm", "maxEm", "MAE"]
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert {"loss", "loss_iou", "loss_bce", "loss_f", "val_dice", "lr"} <= set(rows[0])
    for row in rows:
        assert float(row["loss"]) == pytest.approx(
            sum(float(row[k]) for k in ("loss_iou", "loss_bce", "loss_f")), rel=1e-3)
    png = np.asarray(Image.open(out / "predictions" / "toy" / "toy_3_0000.png"))
    assert png.dtype == np.uint8 and png.ndim == 2  # the scored 8-bit map


def test_resume_follows_the_new_total_and_eval_reproduces(cli_run, tmp_path):
    out, metrics = cli_run
    resumed = tmp_path / "resumed"
    m.main([*TINY, "--epochs", "4", "--resume", str(out / "last.pt"), "--out", str(resumed)])
    rows = list(csv.DictReader(open(resumed / "log.csv")))
    assert [r["epoch"] for r in rows] == ["3", "4"]
    assert float(rows[0]["lr"]) == pytest.approx(0.05 * m.lr_factor(2, 4), rel=1e-5)
    again = m.main(["--eval", str(out / "best.pt"), "--toy-sizes", "8,4,4",
                    "--out", str(tmp_path / "eval")])
    assert again["toy"] == pytest.approx(metrics["toy"], abs=1e-6)


def test_pranet_package_trains_on_all_images_and_tests_the_last_epoch(tmp_path, monkeypatch,
                                                                      capsys):
    root = tmp_path / "polyp"  # TrainDataset/{images,masks}, TestDataset/<set>/{images,masks}
    common.write_toy(root / "TrainDataset", n=6, size=40, seed=1)
    common.write_toy(root / "TestDataset" / "CVC-300", n=2, size=36, seed=2)
    common.write_toy(root / "TestDataset" / "Kvasir", n=2, size=44, seed=3)
    monkeypatch.setattr(common, "fetch_weights", lambda *a, **k: None)  # no downloads in tests
    out = tmp_path / "run"
    metrics = m.main(["--data", str(root), "--preset", "tiny", "--img-size", "64",
                      "--batch-size", "4", "--epochs", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert sorted(metrics) == ["CVC-300", "Kvasir"]  # the paper's table, one row per set
    config = json.loads((out / "config.json").read_text())
    assert (config["multi_scale"], config["pretrained"], config["val_fraction"]) == (
        "random-size", "auto", 0.0)
    assert "protocol: polyp PraNet package" in printed and "6 train, 0 val" in printed
    assert "testing last.pt" in printed and "LossNet: no ImageNet VGG-16" in printed
    assert Image.open(out / "predictions" / "Kvasir" / "toy_0000.png").size == (44, 44)


def test_predict_writes_one_png_per_image(cli_run, tmp_path):
    out, _ = cli_run
    folder = tmp_path / "images"
    folder.mkdir()
    for k, (w, h) in enumerate([(40, 30), (33, 47)]):
        Image.fromarray(np.full((h, w, 3), 60 * k, np.uint8)).save(folder / f"im{k}.jpg")
    m.main(["--predict", str(folder), "--checkpoint", str(out / "best.pt"),
            "--out", str(tmp_path / "pred")])
    written = sorted((tmp_path / "pred" / "predictions").glob("*.png"))
    assert [p.name for p in written] == ["im0.png", "im1.png"]
    assert Image.open(written[1]).size == (33, 47)


def test_bench_prints_one_json_line(capsys, tmp_path):
    record = m.main(["--bench", "--preset", "tiny", "--img-size", "32", "--batch-size", "2",
                     "--out", str(tmp_path)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == record
    assert {"params_M", "train_images_per_s", "inference_images_per_s"} <= set(record)


@pytest.mark.parametrize("flags, culprit", [
    (["--data", "/no/such/folder"], "/no/such/folder"),
    (["--eval", "EMPTY"], "EMPTY"),
    (["--msu-kernels", "2,4"], "--msu-kernels"),
    (["--fold", "7"], "--fold"),
])
def test_bad_input_exits_with_one_line(flags, culprit, tmp_path):
    if culprit == "EMPTY":
        bad = tmp_path / "broken.pt"
        bad.write_bytes(b"not a checkpoint")
        flags, culprit = ["--eval", str(bad)], str(bad)
    result = subprocess.run([sys.executable, str(ROOT / "m2snet.py"), *flags, *TINY,
                             "--epochs", "1", "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and culprit in lines[0]


def test_torchrun_with_orders_1_trains_on_two_processes(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--master_port=29547", "m2snet.py", *TINY, "--orders", "1", "--epochs", "1",
               "--device", "cpu", "--out", str(tmp_path / "run")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={"OMP_NUM_THREADS": "1", "NO_PROGRESS": "1",
                                 "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "run" / "test_metrics.json").is_file()


def test_script_size_and_main_length():
    source = (ROOT / "m2snet.py").read_text()
    main = next(n for n in ast.parse(source).body if getattr(n, "name", "") == "main")
    assert len(source.splitlines()) <= 900 and main.end_lineno - main.lineno + 1 <= 70
