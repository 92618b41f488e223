"""Tests for m2snet.py: block shapes, each equation on a hand-worked case, the released layout
and output, pretrained files, the command line and the notebook. Small sizes throughout."""
import copy
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


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: one thread is as fast, and on a shared CPU it avoids OpenMP's
    spinning (3-10x slower here). The previous setting is restored for the other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def identity_conv(block):
    """Make a conv block (conv, BN, ReLU) compute x / sqrt(1 + eps), channel by channel."""
    conv = block[0]
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        for c in range(conv.out_channels):
            conv.weight[c, c, 1, 1] = 1.0
    block.eval()
    return block


# ---- shapes ----

def test_block_shapes():
    f_a, f_b = torch.rand(2, 8, 3, 3), torch.rand(2, 8, 6, 6)
    for released in (False, True):
        assert m.AllOnesFilter(5, 8, released)(f_b).shape == (2, 8, 6, 6)
    assert m.SubtractionUnit(8)(f_a, f_b).shape == (2, 8, 6, 6)
    filters = [nn.Identity(), m.AllOnesFilter(3, 8)]
    assert m.MultiScaleSubtraction(8)(f_a, f_b, filters).shape == (2, 8, 6, 6)
    lossnet = m.LossNet(width=4, size=0)
    assert lossnet(torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)).shape == ()


def test_model_feature_and_output_shapes():
    model = m.build_model("tiny").eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        e = model.resnet.features(x)
        assert [tuple(t.shape) for t in e] == [(2, 8, 16, 16), (2, 32, 16, 16), (2, 64, 8, 8),
                                               (2, 128, 4, 4), (2, 256, 2, 2)]
        ms = model.subtraction_pyramid(e)
        sizes = {1: 16, 2: 16, 3: 8, 4: 4, 5: 2}  # MS_n^i has level i's resolution
        assert set(ms) == {(n, i) for n in range(1, 6) for i in range(1, 7 - n)}  # 15 maps
        assert all(t.shape == (2, 8, sizes[i], sizes[i]) for (n, i), t in ms.items())
        ce = model.complementary_features(ms, e[4])
        assert all(ce[i].shape == (2, 8, sizes[i], sizes[i]) for i in range(1, 6))
        assert model(x).shape == (2, 1, 64, 64)
        assert model(torch.rand(1, 3, 48, 40)).shape == (1, 1, 48, 40)  # any size


# ---- Eq. (1) and (2): subtraction units ----

def test_eq1_subtraction_unit_by_hand():
    unit = identity_conv(m.SubtractionUnit(1))
    f_a = torch.tensor([[[[3.0]]]])  # the deeper level, upsampled to 2x2: all 3
    f_b = torch.tensor([[[[1.0, 5.0], [3.0, 0.0]]]])
    # |3 - 1|, |3 - 5|, |3 - 3|, |3 - 0| = 2, 2, 0, 3
    expected = torch.tensor([[[[2.0, 2.0], [0.0, 3.0]]]]) / math.sqrt(1 + EPS)
    assert torch.allclose(unit(f_a, f_b), expected, atol=1e-6)
    unit.unit = "add"  # Tab. 10's AU: 3 + F_B = 4, 8, 6, 3
    expected = torch.tensor([[[[4.0, 8.0], [6.0, 3.0]]]]) / math.sqrt(1 + EPS)
    assert torch.allclose(unit(f_a, f_b), expected, atol=1e-6)


def test_eq2_one_differing_pixel_spreads_by_the_all_ones_filters():
    msu = identity_conv(m.MultiScaleSubtraction(1))
    filters = [nn.Identity(), m.AllOnesFilter(3, 1), m.AllOnesFilter(5, 1)]
    f_a, f_b = torch.zeros(1, 1, 7, 7), torch.zeros(1, 1, 7, 7)
    f_a[0, 0, 3, 3] = 1.0
    # 1x1 term: 1 at the centre; 3x3 sums: 1 on the 3x3 block; 5x5 sums: 1 on the 5x5 block
    # -> centre 3, first ring 2, second ring 1, the outer ring 0
    expected = torch.zeros(7, 7)
    expected[1:6, 1:6] += 1
    expected[2:5, 2:5] += 1
    expected[3, 3] += 1
    out = msu(f_a, f_b, filters)[0, 0]
    assert torch.allclose(out * math.sqrt(1 + EPS), expected, atol=1e-6)
    assert out.sum().item() * math.sqrt(1 + EPS) == pytest.approx(1 + 9 + 25, abs=1e-4)


def test_released_filter_is_the_dense_all_ones_convolution():
    x = torch.rand(2, 8, 9, 9, dtype=torch.float64)
    for size in (3, 5):
        released = m.AllOnesFilter(size, 8, released=True).double().eval()
        dense = F.conv2d(x, torch.ones(8, 8, size, size, dtype=torch.float64),
                         padding=size // 2)  # the code's CNN1 weight (spec 3.1)
        expected = torch.relu(dense / math.sqrt(1 + EPS))  # fresh BN in eval mode, then ReLU
        assert torch.allclose(released(x), expected, rtol=1e-12)
        assert torch.equal(released(x)[:, 0], released(x)[:, 7])  # same map in every channel
    one_pixel = torch.zeros(1, 2, 5, 5)
    one_pixel[0, 0, 2, 2] = 1.0
    per_channel = m.AllOnesFilter(3, 2)(one_pixel)  # paper reading: channel 1 stays empty
    assert per_channel[0, 0].sum() == 9 and per_channel[0, 1].sum() == 0


# ---- Eq. (3): the multi-scale-in-multi-scale wiring ----

def test_eq3_complementary_features_sum_the_right_orders():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 64, 64)
    for released in (False, True):
        model = m.build_model("tiny", as_released=released).eval()
        with torch.no_grad():
            e = model.resnet.features(x)
            ms = model.subtraction_pyramid(e)
            ce = model.complementary_features(ms, e[4])
            # CE^i sums MS_1^i .. MS_{6-i}^i (5, 4, 3, 2 terms); the code leaves MS_1^i out
            first = 2 if released else 1
            for i in (3, 2, 1):
                total = sum(ms[n, i] for n in range(first, 7 - i))
                expected = getattr(model, f"level{i}")(total)
                assert torch.allclose(ce[i], expected, atol=1e-6)
            if released:
                assert torch.equal(ce[4], ms[2, 4]) and not hasattr(model, "level4")
            else:
                assert torch.allclose(ce[4], model.level4(ms[1, 4] + ms[2, 4]), atol=1e-6)
            assert torch.allclose(ce[5], model.x5_dem_5(e[4]))
            # MS_3^2 = MSU(MS_2^3, MS_2^2): subtraction of two adjacent order-2 maps
            filters = [nn.Identity(), model.conv_3, model.conv_5]
            assert torch.allclose(ms[3, 2], model.x4_x3_x2(ms[2, 3], ms[2, 2], filters))
    three = m.build_model("tiny", orders=3).eval()  # Tab. 10 row "+ SU_3"
    assert not hasattr(three, "x5_x4_x3_x2") and hasattr(three, "x5_x4_x3")
    with torch.no_grad():
        e = three.resnet.features(x)
        ms = three.subtraction_pyramid(e)
        assert max(n for n, _ in ms) == 3
        ce = three.complementary_features(ms, e[4])
        expected = three.level1(ms[1, 1] + ms[2, 1] + ms[3, 1])
        assert torch.allclose(ce[1], expected, atol=1e-6)


def test_ablation_switches_change_the_network():
    seven = m.build_model("tiny", msu_kernels=(1, 3, 7))  # Tab. 13 "1,3,7"
    assert seven.filter_names == [None, "conv_3", "conv_7"] and not hasattr(seven, "conv_5")
    assert m.build_model("tiny", unit="add").x5_x4.unit == "add"
    assert m.parse_kernels("1,3,5,7") == (1, 3, 5, 7)
    for bad in ({"msu_kernels": (2,)}, {"orders": 6}, {"as_released": True, "orders": 1},
                {"unit": "mul"}):
        with pytest.raises(common.UserError):
            m.build_model("tiny", **bad)


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
    assert len(blocks) == 22
    for name, in_channels in blocks:
        conv(f"{name}.0", 64, in_channels, 3, bias=True), bn(f"{name}.1", 64)
    conv("output1.0", 1, 64, 3, bias=True)
    return keys


def test_released_state_dict_is_the_authors_690_key_layout():
    layout = spec_layout()
    assert len(layout) == 690
    model = m.build_model("paper", as_released=True)
    own = model.state_dict()
    assert set(own) == set(layout)
    assert all(tuple(own[k].shape) == shape for k, shape in layout.items())
    model.load_state_dict({k: torch.zeros(shape) for k, shape in layout.items()}, strict=True)
    tops = list(dict.fromkeys(k.split(".")[0] for k in own))  # module definition order
    assert tops == list(dict.fromkeys(k.split(".")[0] for k in layout))


def test_parameter_counts_match_spec_and_paper():
    released = m.build_model("paper", as_released=True)
    total = sum(p.numel() for p in released.parameters())
    without_fc = sum(p.numel() for n, p in released.named_parameters()
                     if not n.startswith("resnet.fc."))
    assert total == 29_741_585 and without_fc == 27_692_585  # spec 6
    assert round(without_fc / 1e6, 2) == 27.69
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
        conv, norm, relu = block  # the MSU's own conv block, used as a plain Sequential
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
    x = torch.rand(1, 3, 64, 64, dtype=torch.float64)
    # training mode: also the order of the 20 shared-BN updates per forward must agree
    out, expected = ours.train()(x), reference_released_forward(theirs.train(), x)
    assert torch.allclose(out, expected, rtol=1e-9, atol=1e-9)
    for name in ("conv_3.norm.running_mean", "conv_5.norm.running_var"):
        assert torch.allclose(ours.state_dict()[name], theirs.state_dict()[name], rtol=1e-9)
    with torch.no_grad():
        assert torch.allclose(ours.eval()(x), reference_released_forward(theirs.eval(), x),
                              rtol=1e-9, atol=1e-9)


# ---- pretrained files (written here, never downloaded) ----

def test_res2net_and_vgg_files_load(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    published = m.Res2Net(m.PRESETS["tiny"], with_fc=True).state_dict()  # keys without prefix
    published = {k: v for k, v in published.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "res2net50_v1b_26w_4s-3cf99910.pth"
    torch.save(published, path)
    for released in (False, True):  # the paper model has no fc: those two keys are skipped
        model = m.build_model("tiny", as_released=released)
        m.load_weights(model.resnet, m.read_weights(str(path), m.RES2NET_URL, "Res2Net"),
                       path, "Res2Net backbone")
        assert torch.equal(model.resnet.layer2[0].convs[1].weight,
                           published["layer2.0.convs.1.weight"])
    with pytest.raises(common.UserError, match="does not fit"):
        m.load_weights(m.build_model("small").resnet, published, path, "Res2Net backbone")
    vgg = {f"features.{n}.{s}": 0.1 * torch.randn((out, inp, 3, 3) if s == "weight" else (out,))
           for n, out, inp in [(0, 4, 3), (2, 4, 4), (5, 8, 4), (7, 8, 8), (10, 16, 8),
                               (12, 16, 16), (14, 16, 16), (17, 32, 16), (19, 32, 32),
                               (21, 32, 32), (24, 32, 32)]  # torchvision indices, width 4
           for s in ("weight", "bias")}
    vgg["classifier.0.weight"] = torch.rand(2, 2)  # torchvision's file also has the classifier
    lossnet = m.LossNet(width=4, size=0)
    lossnet.load_vgg(vgg, "vgg16-397923af.pth")
    own = lossnet.state_dict()  # slices keep torchvision's indices (spec 7)
    assert torch.equal(own["blocks.2.10.weight"], vgg["features.10.weight"])
    assert torch.equal(own["blocks.3.21.bias"], vgg["features.21.bias"])

    vgg_path = tmp_path / "vgg16-397923af.pth"
    torch.save(vgg, vgg_path)
    capsys.readouterr()
    m.main([*TINY, "--epochs", "1", "--limit-batches", "1", "--pretrained", str(path),
            "--vgg-weights", str(vgg_path), "--out", str(tmp_path / "run")])
    printed = capsys.readouterr().out
    assert "backbone: ImageNet Res2Net-50 weights" in printed and "random" not in printed

    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    assert m.read_weights("auto", m.RES2NET_URL, "Res2Net") is None
    assert "could not download Res2Net" in capsys.readouterr().out


# ---- Eqs. (4)-(6): losses ----

def test_eq4_total_loss_by_hand():
    logits, mask = torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    # empty mask: weights 1; BCE(0, 0) = ln 2; wIoU = 1 - (0 + 1) / (16 * 0.5 - 0 + 1) = 8 / 9
    for released in (False, True):
        loss, parts = m.total_loss(logits, mask, None, released)
        assert loss.item() == pytest.approx(math.log(2) + 8 / 9, abs=1e-6)
    constant = lambda p, g: torch.tensor(2.0)  # noqa: E731  a LossNet stand-in: L_f = 2
    assert m.total_loss(logits, mask, constant)[0].item() == pytest.approx(
        math.log(2) + 8 / 9 + 2.0, abs=1e-6)
    assert m.total_loss(logits, mask, constant, True)[0].item() == pytest.approx(
        math.log(2) + 8 / 9 + 0.2, abs=1e-6)  # the code's 0.1 x L_f
    mask[..., :2, :2] = 1  # now the boundary weights differ, and so do the two BCE terms
    logits = torch.linspace(-2, 2, 16).view(1, 1, 4, 4)
    weight = m.boundary_weight(mask)
    bce = F.binary_cross_entropy_with_logits(logits, mask, reduction="none")
    assert m.total_loss(logits, mask)[1]["bce"] == pytest.approx(
        ((weight * bce).sum() / weight.sum()).item(), rel=1e-6)
    assert m.total_loss(logits, mask, None, True)[1]["bce"] == pytest.approx(
        bce.mean().item(), rel=1e-6)


def test_boundary_weight_by_hand():
    mask = torch.zeros(1, 1, 1, 2)
    mask[..., 0] = 1
    # the 31x31 window counts its zero padding: both means are 1 / 961
    expected = torch.tensor([1 + 5 * (1 - 1 / 961), 1 + 5 / 961])
    assert torch.allclose(m.boundary_weight(mask).flatten(), expected)


def test_eq5_lossnet_sums_the_four_levels():
    torch.manual_seed(0)
    lossnet = m.LossNet(width=4, size=0)
    prediction = torch.rand(2, 1, 32, 32, requires_grad=True)
    mask = (torch.rand(2, 1, 32, 32) > 0.5).float()
    l_f = lossnet(prediction, mask)
    f_p, f_g, expected = lossnet.prepare(prediction), lossnet.prepare(mask), 0.0
    sizes = []
    for block in lossnet.blocks:
        f_p, f_g = block(f_p), block(f_g)
        sizes.append(tuple(f_p.shape[1:]))
        expected = expected + m.feature_distance(f_p, f_g)
    assert sizes == [(4, 32, 32), (8, 16, 16), (16, 8, 8), (32, 4, 4)]  # relu1_2 .. relu4_3
    assert l_f.item() == pytest.approx(expected.item(), rel=1e-5)
    l_f.backward()
    assert prediction.grad.abs().sum() > 0  # gradients reach the prediction ...
    assert all(not p.requires_grad for p in lossnet.parameters())  # ... never the VGG
    assert lossnet(mask, mask).item() == 0
    assert m.LossNet(4, 224).prepare(mask).shape == (2, 3, 224, 224)  # paper: resized to 224


def test_eq6_feature_distance_by_hand():
    f_p, f_g = torch.zeros(1, 2, 1, 2), torch.zeros(1, 2, 1, 2)
    f_p[0, :, 0, 0] = torch.tensor([3.0, 4.0])
    # pixel 1: ||(3, 4)|| = 5, pixel 2: 0 -> mean 2.5; code: mean of squares (9 + 16) / 4
    assert m.feature_distance(f_p, f_g).item() == pytest.approx(2.5)
    assert m.feature_distance(f_p, f_g, mean_squared=True).item() == pytest.approx(6.25)


# ---- recipe ----

def test_recipe_schedule_optimiser_and_sizes():
    assert m.lr_factor(0, 50) * 0.05 == pytest.approx(0.00196, abs=1e-5)  # spec 9 values
    assert m.lr_factor(24, 50) * 0.05 == pytest.approx(0.04902, abs=1e-5)
    assert m.lr_factor(49, 50) == pytest.approx(m.lr_factor(0, 50))
    model = m.build_model("tiny")
    paper = m.make_optimizer(model, 0.05)
    assert [g["lr"] for g in paper.param_groups] == pytest.approx([0.005, 0.05])
    assert not paper.defaults["nesterov"] and paper.defaults["weight_decay"] == 5e-4
    released = m.make_optimizer(model, 0.05, as_released=True)
    assert [g["lr"] for g in released.param_groups] == pytest.approx([0.05, 0.05])
    assert released.defaults["nesterov"]
    assert m.training_sizes(352, "pranet", None) == [256, 352, 448]
    import random
    assert m.training_sizes(352, "released", random.Random(0))[0] in m.RELEASED_SIZES
    image, mask = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), bool)
    image[:, :2], mask[:, :2] = 255, True
    flipped = [m.flip_rotate(image, mask, random.Random(s)) for s in range(6)]
    assert all(i.shape == (8, 8, 3) and k.dtype == bool for i, k in flipped)


def test_one_optimisation_step_lowers_the_loss():
    torch.manual_seed(0)
    model = m.build_model("tiny")
    lossnet = m.LossNet(width=4, size=0)
    data = common.ToyBinary(4, 32, seed=1)
    batch = torch.utils.data.default_collate([data[i] for i in range(4)])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(2):
        loss, _ = m.total_loss(model(batch["image"]), batch["mask"], lossnet)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[1] < losses[0]


# ---- command line ----

TINY = ["--preset", "tiny", "--img-size", "32", "--batch-size", "4", "--toy-sizes", "8,4,4"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    metrics = m.main([*TINY, "--epochs", "1", "--out", str(out)])
    return out, metrics


def test_cli_run_writes_every_file(cli_run):
    out, metrics = cli_run
    for name in ("config.json", "log.csv", "last.pt", "best.pt", "test_metrics.json"):
        assert (out / name).is_file(), name
    assert list(metrics) == ["toy"]
    assert list(metrics["toy"]) == ["mDice", "mIoU", "wFm", "Sm", "maxEm", "MAE"]
    assert json.loads((out / "test_metrics.json").read_text())["toy"] == pytest.approx(
        metrics["toy"])
    assert len(list((out / "predictions" / "toy").glob("toy_*[0-9].png"))) == 4
    assert (out / "predictions" / "toy" / "toy_3_0000_overlay.png").is_file()
    assert json.loads((out / "config.json").read_text())["preset"] == "tiny"


def test_resume_continues_and_eval_reproduces(cli_run, tmp_path):
    out, metrics = cli_run
    resumed = tmp_path / "resumed"
    m.main([*TINY, "--epochs", "2", "--resume", str(out / "last.pt"), "--out", str(resumed)])
    state = common.load_checkpoint(resumed / "last.pt", "m2snet")
    assert state["epoch"] == 1  # the second epoch (0-based), after the saved first
    assert (resumed / "log.csv").read_text().splitlines()[1].startswith("2,")
    again = m.main(["--eval", str(out / "best.pt"), "--toy-sizes", "8,4,4",
                    "--out", str(tmp_path / "eval")])
    assert again["toy"] == pytest.approx(metrics["toy"], abs=1e-6)
    busi = m.main([*TINY, "--epochs", "1", "--metrics", "busi", "--no-lossnet", "--as-released",
                   "--out", str(tmp_path / "busi")])
    assert list(busi["toy"]) == ["Jaccard", "Precision", "Recall", "Specificity", "Dice"]


def test_pranet_package_reports_each_test_set_at_its_original_size(tmp_path):
    root = tmp_path / "polyp"  # TrainDataset/{images,masks}, TestDataset/<set>/{images,masks}
    common.write_toy(root / "TrainDataset", n=6, size=40, seed=1)
    common.write_toy(root / "TestDataset" / "CVC-300", n=2, size=36, seed=2)
    common.write_toy(root / "TestDataset" / "Kvasir", n=2, size=44, seed=3)
    out = tmp_path / "run"
    metrics = m.main(["--data", str(root), "--preset", "tiny", "--img-size", "64",
                      "--batch-size", "4", "--epochs", "1", "--out", str(out)])
    assert sorted(metrics) == ["CVC-300", "Kvasir"]  # the paper's table, one row per set
    config = json.loads((out / "config.json").read_text())
    assert config["multi_scale"] == "pranet" and config["preset"] == "tiny"
    mask = Image.open(out / "predictions" / "Kvasir" / "toy_0000.png")
    assert mask.size == (44, 44)  # scored and written at the original size


def test_predict_writes_one_png_per_image(cli_run, tmp_path):
    out, _ = cli_run
    folder = tmp_path / "images"
    folder.mkdir()
    for k, (w, h) in enumerate([(40, 30), (33, 47)]):
        Image.fromarray(np.full((h, w, 3), 60 * k, np.uint8)).save(folder / f"im{k}.jpg")
    (folder / "notes.txt").write_text("not an image")
    m.main(["--predict", str(folder), "--checkpoint", str(out / "best.pt"),
            "--out", str(tmp_path / "pred")])
    written = sorted((tmp_path / "pred" / "predictions").glob("*.png"))
    assert [p.name for p in written] == ["im0.png", "im1.png"]
    assert Image.open(written[1]).size == (33, 47)


def test_bench_prints_one_json_line(capsys, tmp_path):
    record = m.main(["--bench", "--preset", "tiny", "--img-size", "32", "--batch-size", "2",
                     "--out", str(tmp_path)])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(line) == record
    assert {"params_M", "train_images_per_s", "inference_images_per_s",
            "peak_memory_MB"} <= set(record)


@pytest.mark.parametrize("flags, culprit", [
    (["--data", "/no/such/folder"], "/no/such/folder"),
    (["--eval", "EMPTY"], "EMPTY"),
    (["--msu-kernels", "2,4"], "--msu-kernels"),
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


def test_notebook_executes(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # the kernel is a fresh process
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient
    notebook = nbformat.read(ROOT / "notebooks" / "m2snet.ipynb", as_version=4)
    for cell in notebook.cells:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            cell.source += "\nFAST = True"
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
