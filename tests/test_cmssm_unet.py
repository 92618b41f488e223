"""Tests of cmssm_unet.py: blocks and their wiring (forward hooks), one hand-checked case per
equation (batch >= 2, channels >= 2, random weights, non-square maps where it matters), every
ablation switch, published weight formats, the paper's protocol and the command line (tiny
preset, 32x32 images)."""
import csv
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cmssm_unet as m
import common
from test_common_run import write_vmamba_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--img-size", "32", "--batch-size", "4", "--limit-batches", "1",
        "--toy-sizes", "8,4,4"]
QUIET = lambda *a: None  # noqa: E731


def tiny_preset(**overrides):
    return replace(m.PRESETS["tiny"], **overrides)


def hooked(module, store, name):
    """Record the first input and the output of `module` under `name`."""
    module.register_forward_hook(lambda mod, inp, out: store.__setitem__(name, (inp[0], out)))


# ---- blocks and shapes ----

def test_block_shapes():
    x = torch.randn(2, 4, 6, 8)  # (B, H, W, C), H != W to catch transposes
    assert m.SqueezeExcitation(8, 4)(x).shape == x.shape
    assert m.ChannelMixingNetwork(8, 2)(x).shape == x.shape
    assert m.SS2D(8, 4)(x).shape == x.shape
    for se, cmn, position in ((False, False, "scan"), (True, False, "scan"), (False, True, "scan"),
                              (True, True, "scan"), (True, True, "block")):
        block = m.CMSSMBlock(8, 0.1, tiny_preset(se=se, cmn=cmn, se_position=position))
        assert block(x).shape == x.shape
    assert m.CrossRegionAttention(16, 32, 4)(torch.randn(2, 16, 4, 6)).shape == (2, 16, 4, 6)
    assert m.PatchMerging2D(8)(x).shape == (2, 2, 3, 16)
    assert m.PatchExpand2D(8)(x).shape == (2, 8, 12, 4)
    assert m.PatchExpand2D(8, 4)(x).shape == (2, 16, 24, 2)
    assert m.PatchEmbed2D(3, 8)(torch.randn(2, 3, 16, 32)).shape == (2, 4, 8, 8)


def test_model_output_and_feature_shapes():
    model = m.build_model("tiny").eval()
    logits, features = model(torch.rand(2, 3, 64, 32), return_features=True)
    assert logits.shape == (2, 1, 64, 32)
    c = m.PRESETS["tiny"].dims
    expected = [(2, c, 16, 8), (2, 2 * c, 8, 4), (2, 4 * c, 4, 2), (2, 8 * c, 2, 1)]
    assert [tuple(s[0].shape) for s in features["encoder"]] == expected
    assert [tuple(s[-1].shape) for s in features["decoder"]] == expected[::-1]
    assert features["final"].shape == (2, c // 4, 64, 32)
    assert model(torch.rand(1, 1, 32, 32)).shape == (1, 1, 32, 32)  # grey input repeated


def test_parameter_counts_match_spec():
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        vmunet = m.build_model("paper", se=False, cmn=False, cra=False)
        full = m.build_model("paper")
    assert sum(p.numel() for p in vmunet.parameters()) == 27_427_561  # spec 3
    assert len(vmunet.state_dict()) == 222
    shapes = {k: tuple(v.shape) for k, v in vmunet.state_dict().items()}
    prefix = "layers.0.blocks.0.self_attention."
    assert shapes[prefix + "x_proj_weight"] == (4, 38, 192)  # spec 2.4
    assert shapes[prefix + "dt_projs_weight"] == (4, 192, 6)
    assert shapes[prefix + "A_logs"] == (768, 16) and shapes[prefix + "Ds"] == (768,)
    assert shapes["final_up.expand.weight"] == (384, 96) and shapes["final_conv.weight"] == (
        1, 24, 1, 1)
    assert sum(p.numel() for p in vmunet.layers[0].blocks[0].parameters()) == 105_408
    rates = [round(b.drop_rate, 4) for stage in vmunet.layers_up for b in stage.blocks]
    assert rates == [0.2, 0.1667, 0.1333, 0.1, 0.0667, 0.0333, 0.0]  # spec 1.6, reversed
    assert sum(p.numel() for p in full.parameters()) == 43_266_829  # spec 4.4
    se = sum(p.numel() for n, p in full.named_parameters() if ".se." in n)
    assert se == 3_124_224  # spec 4.4: D -> D/8 -> D on the 2C scan channels
    assert sum(p.numel() for p in full.skip_attention.parameters()) == 56_904 + 14_628 + 5_016


def test_ssm_initialisation():
    ss2d = m.SS2D(32, d_state=16)
    assert torch.allclose(ss2d.A_logs[5], torch.log(torch.arange(1, 17.0)))  # S4D-real
    dt = F.softplus(ss2d.dt_projs_bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    assert torch.all(ss2d.Ds == 1) and ss2d.dt_rank == 2
    model = m.build_model("tiny")
    assert torch.all(model.layers[0].blocks[0].ln_1.weight == 1)
    assert model.layers[0].blocks[0].self_attention.in_proj.weight.std() < 0.03  # trunc .02


# ---- VM-UNet compatibility ----

def _official_ss2d(module, x):
    """VM-UNet's SS2D.forward/forward_corev0 written out literally, with the reference scan."""
    batch, height, width, _ = x.shape
    length, k = height * width, 4
    xz = module.in_proj(x)
    x, z = xz.chunk(2, dim=-1)
    x = F.silu(module.conv2d(x.permute(0, 3, 1, 2).contiguous()))
    x_hwwh = torch.stack([x.view(batch, -1, length),
                          torch.transpose(x, 2, 3).contiguous().view(batch, -1, length)],
                         dim=1).view(batch, 2, -1, length)
    xs = torch.cat([x_hwwh, torch.flip(x_hwwh, dims=[-1])], dim=1)
    x_dbl = torch.einsum("b k d l, k c d -> b k c l", xs.view(batch, k, -1, length),
                         module.x_proj_weight)
    dts, bs, cs = torch.split(x_dbl, [module.dt_rank, module.d_state, module.d_state], dim=2)
    dts = torch.einsum("b k r l, k d r -> b k d l", dts.view(batch, k, -1, length),
                       module.dt_projs_weight)
    delta = F.softplus(dts.reshape(batch, -1, length) + module.dt_projs_bias.view(-1)[:, None])
    a = -torch.exp(module.A_logs)
    u = xs.reshape(batch, -1, length)
    b_full = bs.repeat_interleave(u.shape[1] // k, dim=1)  # (B, 4D, N, L)
    c_full = cs.repeat_interleave(u.shape[1] // k, dim=1)
    h = u.new_zeros(batch, u.shape[1], module.d_state)
    ys = []
    for t in range(length):  # h_t = exp(delta A) h + delta B u;  y = C h + D u
        h = torch.exp(delta[:, :, t, None] * a) * h + delta[:, :, t, None] * b_full[..., t] * \
            u[:, :, t, None]
        ys.append((h * c_full[..., t]).sum(-1) + module.Ds * u[:, :, t])
    out_y = torch.stack(ys, dim=-1).view(batch, k, -1, length)
    inv_y = torch.flip(out_y[:, 2:4], dims=[-1]).view(batch, 2, -1, length)
    wh_y = torch.transpose(out_y[:, 1].view(batch, -1, width, height), 2, 3).contiguous()
    invwh_y = torch.transpose(inv_y[:, 1].view(batch, -1, width, height), 2, 3).contiguous()
    y = out_y[:, 0] + inv_y[:, 0] + wh_y.view(batch, -1, length) + invwh_y.view(
        batch, -1, length)
    y = module.out_norm(torch.transpose(y, 1, 2).contiguous().view(batch, height, width, -1))
    return module.out_proj(y * F.silu(z))


def test_ss2d_matches_vmunet_code():
    torch.manual_seed(0)
    module = m.SS2D(8, d_state=4)
    x = torch.randn(2, 3, 5, 8)  # H != W: the transposed scans must come back right
    with torch.no_grad():
        assert torch.allclose(module(x), _official_ss2d(module, x), atol=1e-5)


def test_model_with_fast_scan_matches_the_reference_loop(monkeypatch):
    torch.manual_seed(0)
    model = m.build_model("tiny", se=False, cmn=False, cra=False).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        fast = model(x)
        monkeypatch.setattr(common, "selective_scan", common.selective_scan_reference)
        assert torch.allclose(fast, model(x), atol=1e-5)  # spec 12


def test_patch_merging_and_expanding_channel_order():
    x = torch.arange(16.0).view(1, 4, 4, 1)  # value = 4 h + w
    merge = m.PatchMerging2D(1)
    merged = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    assert merged[0, 0, 0].tolist() == [0, 4, 1, 5]  # (even,even), (odd,even), (even,odd), ...
    with torch.no_grad():
        assert torch.allclose(merge(x), merge.reduction(merge.norm(merged)))
    # depth-to-space: input channel (p1 * 2 + p2) * c + k goes to pixel (2h + p1, 2w + p2)
    expand = m.PatchExpand2D(4)  # c = 2
    expand.norm = torch.nn.Identity()
    with torch.no_grad():
        expand.expand.weight.zero_()
        expand.expand.weight[:, 0] = torch.arange(8.0)  # output channel j = j * input channel 0
        out = expand(torch.tensor([[[[1.0, 0, 0, 0]]], [[[2.0, 0, 0, 0]]]]))  # batch 2
    assert out.shape == (2, 2, 2, 2)
    assert out[0, 0, 1].tolist() == [2, 3] and out[0, 1, 0].tolist() == [4, 5]
    assert out[1, 1, 1].tolist() == [12, 14]


def _vmunet(seed):
    torch.manual_seed(seed)
    return m.build_model("tiny", se=False, cmn=False, cra=False).eval()


@pytest.mark.parametrize("layout", ["best.pth", "latest.pth"])
def test_vmunet_checkpoints_load_strictly_and_reproduce_the_output(tmp_path, layout):
    """VM-UNet's train.py saves best.pth as the wrapper's bare state_dict (`vmunet.` keys) and
    latest.pth as {'epoch', 'min_loss', ..., 'model_state_dict', 'optimizer_state_dict', ...}."""
    source = _vmunet(1)
    state = {f"vmunet.{k}": v for k, v in source.state_dict().items()}
    if layout == "latest.pth":
        optimizer = torch.optim.AdamW(source.parameters())
        state = {"epoch": 3, "min_loss": 0.4, "min_epoch": 2, "loss": 0.5,
                 "model_state_dict": state, "optimizer_state_dict": optimizer.state_dict(),
                 "scheduler_state_dict": {"T_max": 50, "eta_min": 1e-5, "last_epoch": 3}}
    torch.save(state, tmp_path / layout)
    target = _vmunet(2)
    loaded = m.load_pretrained(target, str(tmp_path / layout), QUIET)
    assert loaded == len(source.state_dict())
    x = torch.rand(2, 3, 32, 64)
    with torch.no_grad():
        assert torch.equal(source(x), target(x))


def test_vmamba_checkpoint_with_a_pickled_yacs_config_loads(tmp_path, monkeypatch):
    donor = _vmunet(3)
    weights = {k: v + 1 for k, v in donor.state_dict().items() if k.startswith(("layers.",
                                                                                "patch_embed"))}
    weights["layers.2.blocks.5.ln_1.weight"] = torch.ones(4 * m.PRESETS["tiny"].dims)
    weights["head.weight"] = torch.zeros(10, 64)  # classifier keys are ignored
    path = tmp_path / "vssmsmall_dp03_ckpt_epoch_238.pth"
    write_vmamba_checkpoint(path, weights, {"MODEL": {"TYPE": "vssm", "DROP_PATH_RATE": 0.3},
                                            "TRAIN": {"EPOCHS": 300}},
                            monkeypatch, tmp_path, optimizer={}, max_accuracy=83.5, epoch=238)
    model = m.build_model("tiny")  # the full CM-SSM model: SE, CMN, CRA stay random
    lines = []
    loaded = m.load_pretrained(model, str(path), lines.append)
    state = model.state_dict()
    key = "blocks.0.self_attention.A_logs"
    assert torch.equal(state[f"layers.1.{key}"], weights[f"layers.1.{key}"])
    assert torch.equal(state[f"layers_up.2.{key}"], weights[f"layers.1.{key}"])  # 1 -> up.2
    assert torch.equal(state[f"layers_up.0.{key}"], weights[f"layers.3.{key}"])  # 3 -> up.0
    assert sum(k in state for k in weights) < loaded < len(state)
    assert any(f"{loaded} of {len(state)} tensors" in line for line in lines)
    assert "yacs" not in sys.modules  # nothing of the authors' packages was imported


def test_pretrained_auto_per_preset(monkeypatch, tmp_path):
    calls = []

    def fake_fetch(url, filename, log, is_main=True, barrier=None):
        calls.append((url, filename, is_main, barrier))
        return None  # offline: the caller trains from scratch

    monkeypatch.setattr(common, "fetch_weights", fake_fetch)
    lines = []
    assert m.load_pretrained(m.build_model("tiny"), "auto", lines.append, "small") == 0
    assert calls == [] and "no published weights fit the small preset" in lines[0]

    class Rank1:
        is_main = False

        def barrier(self):
            pass

    run = Rank1()
    assert m.load_pretrained(m.build_model("tiny"), "auto", lines.append, "paper", run) == 0
    url, filename, is_main, barrier = calls[0]
    assert url == m.PRETRAINED["paper"] and filename == "vssmsmall_dp03_ckpt_epoch_238.pth"
    assert is_main is False and barrier == run.barrier  # rank 0 downloads, the others wait


def test_a_file_of_foreign_tensors_fails_with_one_line(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model": {"backbone.conv.weight": torch.zeros(3)}}, path)
    with pytest.raises(common.UserError, match="other.pth"):
        m.load_pretrained(m.build_model("tiny"), str(path), QUIET)


def test_pretrained_path_is_checked_before_any_work(tmp_path):
    with pytest.raises(common.UserError, match="missing.pth"):
        m.parse_args(["--pretrained", str(tmp_path / "missing.pth")])


# ---- wiring: each block receives the tensors Fig. 1-3 say it does (forward hooks) ----

def test_unet_wiring_skips_cra_decoder_and_head():
    torch.manual_seed(0)
    model = m.build_model("tiny").eval()
    seen = {}
    for i in range(3):
        hooked(model.layers[i].downsample, seen, f"merge{i}")  # outputs: s1, s2, s3
        hooked(model.skip_attention[i], seen, f"cra{i}")
    for i in range(4):
        hooked(model.layers[i], seen, f"enc{i}")
        hooked(model.layers_up[i], seen, f"dec{i}")
    hooked(model.final_up, seen, "final_up")
    hooked(model.final_conv, seen, "final_conv")
    x = torch.rand(2, 3, 64, 32)
    with torch.no_grad():
        logits, features = model(x, return_features=True)
    bchw = lambda t: t.permute(0, 3, 1, 2)  # noqa: E731
    for j, s in enumerate(["merge2", "merge1", "merge0"]):  # CRA_j sees skip s3, s2, s1
        assert torch.equal(seen[f"cra{j}"][0], bchw(seen[s][1]))
    assert torch.equal(seen["dec0"][0], seen["enc3"][1][0])  # bottleneck: no skip
    for i in range(1, 4):  # decoder stage i: previous stage + CRA(skip), added before expanding
        expected = seen[f"dec{i - 1}"][1][0] + seen[f"cra{i - 1}"][1].permute(0, 2, 3, 1)
        assert torch.allclose(seen[f"dec{i}"][0], expected)
    assert torch.equal(seen["final_up"][0], seen["dec3"][1][0])
    assert torch.equal(seen["final_conv"][0], bchw(seen["final_up"][1]))
    assert torch.equal(features["final"], seen["final_conv"][0])  # F_final, the CFD target
    assert torch.equal(logits, seen["final_conv"][1])
    for i in range(4):  # the FD maps are the block outputs
        assert torch.equal(features["encoder"][i][-1], bchw(seen[f"enc{i}"][1][1][-1]))
        assert torch.equal(features["decoder"][i][0], bchw(seen[f"dec{i}"][1][1][0]))


def test_cmssm_block_wiring_se_before_the_gate_and_cmn_after_the_scan_residual():
    torch.manual_seed(1)
    block = m.CMSSMBlock(8, 0.0, tiny_preset()).eval()
    seen = {}
    attention = block.self_attention
    for name, module in (("in_proj", attention.in_proj), ("out_norm", attention.out_norm),
                         ("se", block.se), ("out_proj", attention.out_proj),
                         ("ln_2", block.ln_2), ("cmn", block.cmn), ("fc1", block.cmn.fc1),
                         ("dwconv", block.cmn.dwconv), ("fc2", block.cmn.fc2)):
        hooked(module, seen, name)
    x = torch.randn(2, 3, 5, 8)
    with torch.no_grad():
        y = block(x)
    z = seen["in_proj"][1].chunk(2, dim=-1)[1]
    assert torch.equal(seen["se"][0], seen["out_norm"][1])  # SE on the re-assembled scan output
    assert torch.allclose(seen["out_proj"][0], seen["se"][1] * F.silu(z))  # then the gate
    u = x + seen["out_proj"][1]
    assert torch.allclose(seen["ln_2"][0], u)  # CMN works on the residual stream u
    assert torch.equal(seen["cmn"][0], seen["ln_2"][1])
    assert torch.equal(seen["dwconv"][0], seen["fc1"][1])  # depthwise conv on expanded channels
    assert torch.allclose(seen["fc2"][0], F.gelu(seen["fc1"][1] + seen["dwconv"][1]))
    assert torch.allclose(y, u + seen["cmn"][1])


def test_cra_uses_t_h_on_rows_and_t_w_on_columns():
    cra = m.CrossRegionAttention(4, reduction=2, min_width=2).eval()
    seen = {}
    for name in ("conv1", "conv_h", "conv_w"):
        hooked(getattr(cra, name), seen, name)
    cra(torch.randn(2, 4, 3, 5))  # H = 3, W = 5
    assert seen["conv1"][0].shape == (2, 4, 8, 1)  # [z^h, z^w] concatenated: H + W
    assert seen["conv_h"][0].shape == (2, 2, 3, 1) and seen["conv_w"][0].shape == (2, 2, 1, 5)


# ---- one hand-checkable case per equation ----

def test_eq1_se_squeeze_and_excitation_by_hand():
    se = m.SqueezeExcitation(2, 2)  # hidden width 1
    with torch.no_grad():
        se.fc1.weight.copy_(torch.tensor([[1.0, -1.0]]))
        se.fc2.weight.copy_(torch.tensor([[2.0], [-1.0]]))
    y = torch.zeros(2, 2, 3, 2)  # (B, H, W, K), H != W
    y[0, ..., 0], y[0, ..., 1] = 3.0, 1.0  # channel means (Eq. 1): z = (3, 1)
    y[1, ..., 0], y[1, ..., 1] = 1.0, 3.0  # z = (1, 3)
    y[0, 0, 0, 0], y[0, 1, 2, 0] = 5.0, 1.0  # still mean 3: (5 + 1 + 4 * 3) / 6
    out = se(y)
    # sample 0: relu(3 - 1) = 2 -> (4, -2) -> sigma = (0.98201, 0.11920)
    assert out[0, 0, 0].tolist() == pytest.approx([5 * 0.982014, 1 * 0.119203], abs=1e-5)
    # sample 1: relu(1 - 3) = 0 -> sigma(0) = 0.5 on both channels
    assert torch.allclose(out[1], 0.5 * y[1])


def test_eqs2_to_7_cross_region_attention_by_hand():
    cra = m.CrossRegionAttention(1, reduction=32, min_width=1).eval()  # BN: running stats 0, 1
    with torch.no_grad():
        for conv, weight in ((cra.conv1, 1.0), (cra.conv_h, 1.0), (cra.conv_w, -1.0)):
            conv.weight.fill_(weight)
            conv.bias.zero_()
    x = torch.tensor([[[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]]]).repeat(2, 1, 1, 1)  # (2, 1, 2, 3)
    x[1] = -x[1]
    out = cra(x)
    hswish = lambda v: v * min(max(v + 3, 0), 6) / 6  # noqa: E731
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    bn = 1 / math.sqrt(1 + 1e-5)
    for b, sign in ((0, 1), (1, -1)):
        rows = [sign * 2.0, sign * 4.0]  # Eq. (2): means over W
        cols = [sign * 2.0, sign * 3.0, sign * 4.0]  # Eq. (3): means over H
        g_h = [sig(hswish(bn * v)) for v in rows]  # Eqs. (4)-(5), T_h = +1
        g_w = [sig(-hswish(bn * v)) for v in cols]  # Eqs. (4), (6), T_w = -1
        for i in range(2):
            for j in range(3):  # Eq. (7)
                assert out[b, 0, i, j].item() == pytest.approx(
                    x[b, 0, i, j].item() * g_h[i] * g_w[j], abs=1e-5)
    # one number, worked out by hand: y_00 = 1 * sigma(hswish(2)) * sigma(-hswish(2)) with
    # hswish(2) = 2 * 5 / 6 = 1.6667: 0.84113 * 0.15887 = 0.13363
    assert out[0, 0, 0, 0].item() == pytest.approx(0.13363, abs=2e-4)


def test_eq8_cross_feature_distillation_by_hand_and_detached_target():
    student = torch.ones(2, 2, 2, 2)
    student[1] = 3.0
    student.requires_grad_()
    target = torch.zeros(2, 2, 4, 4)
    target[..., 2:] = 4.0  # pooled to 2x2: [[0, 4], [0, 4]] in both channels
    leaf = torch.zeros(2, 2, 4, 4, requires_grad=True)
    loss = m.cross_feature_distillation([student], leaf + target)  # F_final with a graph
    # sample 0: ((1-0)^2 + (1-4)^2) / 2 = 5; sample 1: ((3-0)^2 + (3-4)^2) / 2 = 5
    assert loss.item() == pytest.approx(5.0)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert leaf.grad is None  # Eq. (8)'s target is detached (SelfReg)
    other = torch.full((2, 3, 1, 1), 2.0)  # pooled target 2 everywhere: loss 0
    assert m.cross_feature_distillation([student, other], target).item() == pytest.approx(2.5)


def test_eq9_internal_feature_distillation_ranks_four_channels():
    f = torch.zeros(1, 4, 2, 2)
    f[0, 0, 0, 0] = 4.0  # one-hot: normalised mean 1/4
    f[0, 1] = 1.0  # flat: 1/2 (first)
    f[0, 2, 0] = 1.0  # top row: 2 / (4 sqrt 2) = 0.354 (third)
    f[0, 3] = torch.tensor([[2.0, 2.0], [2.0, 1.0]])  # 7 / (4 sqrt 13) = 0.485 (second)
    f = torch.cat([f, 2 * f])  # batch 2: same ranking, squares x 4
    # F~ = (c1, c3), F- = (c2, c0): (0+0+1+1) + (4+4+4+1) = 15 over 8 elements -> 1.875,
    # sample 2: 7.5; mean 4.6875 (in channel order, not ranked, it would be 4.0625)
    assert m.internal_feature_distillation([f]).item() == pytest.approx(4.6875)
    assert m.internal_feature_distillation([f, f.flip(1)]).item() == pytest.approx(4.6875)


def _stage_maps(values, shape):
    """Constant maps: channel 0 = v, channel 1 = 0 -> CFD against 0 = v^2 / 2, IFD = v^2."""
    maps = []
    for v in values:
        f = torch.zeros((2, 2) + shape)
        f[:, 0] = v
        maps.append(f)
    return maps


def _features():
    return {"encoder": [_stage_maps([1, 2], (4, 2)), _stage_maps([3], (2, 1))],
            "decoder": [_stage_maps([4], (2, 1)), _stage_maps([5, 6], (4, 2))],
            "final": torch.zeros(2, 2, 8, 4)}


def test_eq10_fd_loss_groupings_by_hand():
    # selfreg: last = dec (4, 6) + enc (2, 3), first = dec (4, 5) + enc (1, 3):
    # L_CFD = (16+36+4+9)/8 + (16+25+1+9)/8 = 14.5; L_IFD = enc last (4+9)/2 + enc first
    # (1+9)/2 + dec first (16+25)/2 + dec last (16+36)/2 = 6.5 + 5 + 20.5 + 26 = 58
    total, l_cfd, l_ifd = m.feature_distillation_loss(_features())
    assert (l_cfd.item(), l_ifd.item()) == pytest.approx((14.5, 58.0))
    assert total.item() == pytest.approx(0.015 * 14.5 + 0.015 * 58)
    # as printed: one mean over the six block maps: L_CFD = 91/12, L_IFD = 91/6
    total, l_cfd, l_ifd = m.feature_distillation_loss(_features(), grouping="paper")
    assert (l_cfd.item(), l_ifd.item()) == pytest.approx((91 / 12, 91 / 6))
    assert m.feature_distillation_loss(_features(), 1.0, 0.0)[0].item() == pytest.approx(14.5)
    assert m.feature_distillation_loss(_features(), 0.0, 1.0)[0].item() == pytest.approx(58.0)


def test_eq11_bce_dice_per_image_on_two_different_masks():
    logits = torch.zeros(2, 1, 2, 2)  # p = 0.5 everywhere
    target = torch.zeros(2, 1, 2, 2)
    target[0] = 1.0  # image 0 all foreground, image 1 all background
    # Dice per image: (2*2 + 1) / (2 + 4 + 1) = 5/7 and (0 + 1) / (2 + 0 + 1) = 1/3
    # -> L_Dice = 1 - (5/7 + 1/3) / 2 = 10/21 (pooled over the batch it would be 4/9)
    assert m.bce_dice_loss(logits, target).item() == pytest.approx(
        0.3 * math.log(2) + 0.7 * 10 / 21)
    assert m.total_loss(logits, target, weights=(1.0, 1.0))[0].item() == pytest.approx(
        math.log(2) + 10 / 21)  # VM-UNet's 1:1
    total, parts = m.total_loss(logits, target, _features())
    assert total.item() == pytest.approx(0.3 * math.log(2) + 0.7 * 10 / 21 + 0.015 * 72.5)
    assert (parts["cfd"], parts["ifd"]) == pytest.approx((14.5, 58.0))
    _, parts = m.total_loss(logits, target, _features(), lambda_cfd=0.0)
    assert parts["cfd"] == 0 and parts["ifd"] == pytest.approx(58.0)  # only its own term


class _FixedModel(torch.nn.Module):
    """Predicts the left half of every image as foreground."""

    def forward(self, x):
        logits = torch.full((x.shape[0], 1) + x.shape[-2:], -10.0)
        logits[..., : x.shape[-1] // 2] = 10.0
        return logits


class _Masks(torch.utils.data.Dataset):
    def __init__(self, masks):
        self.masks = masks
        self.names = [f"case{i}" for i in range(len(masks))]

    def __len__(self):
        return len(self.masks)

    def __getitem__(self, i):
        return {"image": torch.rand(3, 4, 4), "mask": torch.from_numpy(self.masks[i])[None].float(),
                "index": i}

    def full(self, i):
        return np.zeros((4, 4, 3), np.uint8), self.masks[i]


def test_eqs12_to_14_global_confusion_matrix():
    a = np.zeros((4, 4), bool)
    a[:, :2] = True  # perfect: TP 8, TN 8
    b = np.zeros((4, 4), bool)
    b[0, :] = True  # TP 2, FP 6, FN 2, TN 6
    metrics = m.evaluate(_FixedModel(), _Masks([a, b]), torch.device("cpu"), batch_size=2)
    # pooled: TP 10, FP 6, FN 2, TN 14
    assert metrics["mIoU"] == pytest.approx(10 / 18)  # Eq. (12)
    assert metrics["DSC"] == pytest.approx(20 / 28)  # Eq. (13)
    assert metrics["Acc"] == pytest.approx(24 / 32)  # Eq. (14)
    per_batch = m.evaluate(_FixedModel(), _Masks([a, b]), torch.device("cpu"), batch_size=1)
    assert per_batch["DSC"] == pytest.approx(20 / 28)  # pooled over the set, not per batch


# ---- every ablation switch changes what it names and nothing else ----

def _shapes(**overrides):
    torch.manual_seed(0)
    return {k: tuple(v.shape) for k, v in m.build_model("tiny", **overrides).state_dict().items()}


@pytest.mark.parametrize("overrides, removed", [
    ({"se": False}, (".se.",)), ({"cmn": False}, (".cmn.", ".ln_2.")),
    ({"cra": False}, ("skip_attention.",)), ({"cra_bn": False}, (".bn1.",))])
def test_switch_removes_exactly_its_parameters(overrides, removed):
    full, ablated = _shapes(), _shapes(**overrides)
    gone = set(full) - set(ablated)
    assert gone and all(any(r in k for r in removed) for k in gone)
    assert all(not any(r in k for r in removed) for k in ablated)
    assert all(full[k] == shape for k, shape in ablated.items())


def test_se_position_and_ratio_change_only_the_se_shapes():
    full, block = _shapes(), _shapes(se_position="block")
    assert set(full) == set(block)
    changed = {k for k in full if full[k] != block[k]}
    assert changed and all(".se." in k for k in changed)
    c = m.PRESETS["tiny"].dims
    assert full["layers.0.blocks.0.se.fc1.weight"] == (2 * c // 4, 2 * c)  # D / r, D
    assert block["layers.0.blocks.0.se.fc1.weight"] == (c // 4, c)  # C / r, C
    ratio = _shapes(se_reduction=2)["layers.0.blocks.0.se.fc1.weight"]
    assert ratio == (c, 2 * c)


@pytest.mark.parametrize("overrides", [{"cmn_residual": False}, {"cra_act": "relu"},
                                       {"se_position": "block"}])
def test_behaviour_switches_change_the_output(overrides):
    x = torch.rand(2, 3, 32, 64)
    outputs = []
    for over in ({}, overrides):
        torch.manual_seed(0)
        model = m.build_model("tiny", **over).eval()
        with torch.no_grad():
            outputs.append(model(x))
    assert not torch.allclose(outputs[0], outputs[1])


def test_cmn_without_inner_residual_feeds_only_the_depthwise_conv():
    cmn = m.ChannelMixingNetwork(4, 2, residual=False)
    seen = {}
    hooked(cmn.dwconv, seen, "dwconv")
    hooked(cmn.fc2, seen, "fc2")
    cmn(torch.randn(2, 3, 5, 4))
    assert torch.allclose(seen["fc2"][0], F.gelu(seen["dwconv"][1]))


def test_command_line_switches_reach_the_model_and_the_loss():
    args, _ = m.parse_args(["--no-se", "--no-cmn", "--no-cra", "--no-cfd", "--no-ifd",
                            "--se-position", "block", "--se-reduction", "2", "--cmn-expansion",
                            "3", "--cmn-no-residual", "--cra-act", "relu", "--cra-no-bn",
                            "--loss-weights", "1,1", "--fd-grouping", "paper"])
    overrides, losses = m.settings(args)
    assert overrides == {
        "se": False, "cmn": False, "cra": False, "se_position": "block", "se_reduction": 2,
        "cmn_expansion": 3, "cmn_residual": False, "cra_act": "relu", "cra_bn": False}
    assert losses == {"lambda_cfd": 0.0, "lambda_ifd": 0.0, "weights": (1.0, 1.0),
                      "grouping": "paper"}
    args, _ = m.parse_args([])
    assert m.settings(args)[1] == {"lambda_cfd": 0.015, "lambda_ifd": 0.015,
                                   "weights": (0.3, 0.7), "grouping": "selfreg"}
    assert args.input_norm == "standardise"  # toy data trains from scratch
    args, _ = m.parse_args(["--data", "somewhere"])  # real data: VMamba-S weights, VM-UNet input
    assert (args.pretrained, args.input_norm) == ("auto", "vmunet")
    args, _ = m.parse_args(["--data", "somewhere", "--preset", "small"])
    assert args.input_norm == "standardise"  # no weights fit the small preset
    assert args.val_fraction == 0 and args.split == "paper" and not args.vflip


def test_train_one_epoch_logs_each_loss_term_and_honours_the_lambdas():
    torch.manual_seed(0)
    model = m.build_model("tiny", drop_path=0.0)
    data = common.ToyBinary(4, 32, seed=1, mean=(0, 0, 0), std=(1, 1, 1))
    loader = common.make_loader(data, 2, train=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    full = m.train_one_epoch(model, loader, optimizer, torch.device("cpu"), {}, show_progress=False)
    assert full["cfd"] > 0 and full["ifd"] > 0
    assert full["loss"] == pytest.approx(full["seg"] + full["fd"], rel=1e-5)
    no_cfd = m.train_one_epoch(model, loader, optimizer, torch.device("cpu"),
                               {"lambda_cfd": 0.0}, show_progress=False)
    assert no_cfd["cfd"] == 0 and no_cfd["ifd"] > 0


# ---- data handling and the protocol ----

def test_input_scaling():
    x = torch.rand(2, 3, 8, 6) * 0.5 + 0.2
    y = m.normalise(x)
    assert y.amin(dim=(1, 2, 3)).tolist() == [0, 0] and torch.allclose(
        y.amax(dim=(1, 2, 3)), torch.tensor([255.0, 255.0]))
    x = torch.zeros(2, 3, 2, 3)  # one min-max over all channels of an image, not per channel
    x[:, 0] = torch.tensor([[0.2, 0.3, 0.4], [0.2, 0.3, 0.4]])
    x[:, 1:] = 0.7
    y = m.normalise(x)
    assert y[0, 0, 0].tolist() == pytest.approx([0, 51, 102]) and torch.all(y[:, 1:] == 255)
    z = m.normalise(x + torch.rand(2, 3, 2, 3), "standardise")
    assert torch.allclose(z.mean(dim=(2, 3)), torch.zeros(2, 3), atol=1e-5)
    assert torch.allclose(z.std(dim=(2, 3)), torch.ones(2, 3), atol=1e-5)


class _Always:
    """An rng whose random() < 0.5 always (every flip and the rotation happen)."""

    def random(self):
        return 0.0

    def uniform(self, low, high):
        raise AssertionError("a fixed angle must not draw")


def test_augment_moves_image_and_mask_together_and_vflip_is_a_switch():
    image = np.zeros((8, 6, 3), np.uint8)
    image[:2, :3, 0] = 200  # top-left block
    mask = image[..., 0] > 0
    out_image, out_mask = m.VMUNetAugment(fixed_angle=180)(image, mask, _Always())
    assert out_mask.dtype == bool and out_mask.sum() == mask.sum()
    assert np.array_equal(out_image[..., 0] > 0, out_mask)
    assert out_mask[-2:, :3].all()  # h-flip then 180 degrees = a vertical flip: bottom-left
    _, with_vflip = m.VMUNetAugment(fixed_angle=180, vflip=True)(image, mask, _Always())
    assert with_vflip[:2, :3].all()  # h-flip, v-flip, 180 degrees: back to top-left


class _Stop(Exception):
    pass


def test_main_hands_the_augmentation_switches_to_the_data(monkeypatch, tmp_path):
    seen = []

    def capture(args, augment):
        seen.append(augment)
        raise _Stop

    monkeypatch.setattr(m, "load_isic", capture)
    for flags in ([], ["--vflip", "--vmunet-rotation"]):
        with pytest.raises(_Stop):
            m.main(TINY + ["--out", str(tmp_path / "x"), *flags])
    assert (seen[0].vflip, seen[0].fixed_angle) == (False, None)
    assert seen[1].vflip and 0 <= seen[1].fixed_angle < 360


def _isic2017(root, counts=(("Training", 6), ("Validation", 2), ("Test_v2", 3))):
    index = 0
    for part, n in counts:
        (root / f"ISIC-2017_{part}_Data").mkdir(parents=True)
        (root / f"ISIC-2017_{part}_Part1_GroundTruth").mkdir()
        for _ in range(n):
            image, mask = common.make_toy_binary(index, 32)
            common.Image.fromarray(image).save(root / f"ISIC-2017_{part}_Data" /
                                               f"ISIC_{index:07d}.jpg")
            common.save_mask_png(root / f"ISIC-2017_{part}_Part1_GroundTruth" /
                                 f"ISIC_{index:07d}_segmentation.png", mask)
            index += 1
    return root


def _data_args(root, *flags):
    args, _ = m.parse_args(["--data", str(root), "--img-size", "32", *flags])
    return args


def test_official_isic2017_layout_gets_the_papers_7_3_resplit(tmp_path):
    root = _isic2017(tmp_path / "isic2017")
    data = m.load_isic(_data_args(root), None)  # train + val (8) re-split: test 2, train 6
    assert (len(data["train"]), data["val"], len(data["test"]["test"])) == (6, None, 2)
    assert "7:3" in data["protocol"] and "ISIC 2017" in data["protocol"]
    assert not any("Test_v2" in path for path in data["splits"]["train"] + data["splits"]["test"])
    data = m.load_isic(_data_args(root, "--val-fraction", "0.2"), None)  # asked for: 1 held out
    assert (len(data["train"]), len(data["val"]), len(data["test"]["test"])) == (5, 1, 2)
    data = m.load_isic(_data_args(root, "--split", "official"), None)
    assert (len(data["train"]), len(data["val"]), len(data["test"]["test"])) == (6, 2, 3)
    assert "official" in data["protocol"]


def test_flat_folder_gets_a_seeded_7_3_split(tmp_path):
    common.write_toy(tmp_path / "flat", n=10, size=32)
    data = m.load_isic(_data_args(tmp_path / "flat"), None)
    assert (len(data["train"]), data["val"], len(data["test"]["test"])) == (7, None, 3)


# ---- training and the command line ----

def test_one_optimisation_step_lowers_the_loss():
    torch.manual_seed(0)
    model = m.build_model("tiny", drop_path=0.0)
    x, target = torch.rand(2, 3, 32, 32), (torch.rand(2, 1, 32, 32) > 0.5).float()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)

    def loss_now():
        torch.manual_seed(5)  # same random channel selection in both evaluations
        logits, features = model(m.normalise(x), return_features=True)
        return m.total_loss(logits, target, features)[0]

    before = loss_now()
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    assert loss_now().item() < before.item()


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return out, m.main(TINY + ["--epochs", "1", "--out", str(out)])


def test_cli_run_writes_every_file_and_prints_the_protocol(tmp_path, capsys):
    out = tmp_path / "run"
    metrics = m.main(TINY + ["--epochs", "1", "--out", str(out), "--no-se", "--no-cmn",
                             "--no-cra", "--no-cfd"])
    printed = capsys.readouterr().out
    assert "protocol: toy data" in printed and "tested: lowest validation loss" in printed
    for name in ("config.json", "log.csv", "last.pt", "best.pt", "test_metrics.json"):
        assert (out / name).exists(), name
    assert len(list((out / "predictions" / "toy").glob("*_overlay.png"))) == 4
    assert set(metrics["toy"]) == {"mIoU", "DSC", "Acc", "Sen", "Spe"}
    config = json.loads((out / "config.json").read_text())
    assert config["preset"] == "tiny" and config["weight_decay"] == 0.01
    row = next(csv.DictReader(open(out / "log.csv")))
    assert float(row["train_cfd"]) == 0 and float(row["train_ifd"]) > 0  # --no-cfd reached
    keys = set(torch.load(out / "last.pt", weights_only=True)["model"])
    assert not any(k for k in keys if ".se." in k or ".cmn." in k or "skip_attention" in k)
    torch.manual_seed(0)
    vmunet = m.build_model("tiny", se=False, cmn=False, cra=False)
    assert keys == set(vmunet.state_dict())


def test_resume_follows_the_new_schedule_and_tests_the_best_weights(cli_run, tmp_path,
                                                                     monkeypatch):
    out, _ = cli_run
    resumed = tmp_path / "resumed"
    losses, tested, evaluate, test_all = iter([5.0, 6.0]), {}, m.evaluate, m.test_all

    def worse_every_epoch(*args, **kwargs):  # validation never beats the resumed run's best
        if kwargs.get("with_loss"):
            return {"loss": next(losses), "DSC": 0.0, "mIoU": 0.0}
        return evaluate(*args, **kwargs)

    def spy(model, *args):
        tested.update({k: v.clone() for k, v in model.state_dict().items()})
        return test_all(model, *args)

    monkeypatch.setattr(m, "evaluate", worse_every_epoch)
    monkeypatch.setattr(m, "test_all", spy)
    m.main(TINY + ["--epochs", "3", "--out", str(resumed), "--resume", str(out / "last.pt")])
    rows = list(csv.DictReader(open(resumed / "log.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    # toy --t-max follows --epochs 3: lr(1) = 1e-5 + (3e-3 - 1e-5) (1 + cos(pi/3)) / 2
    assert float(rows[0]["lr"]) == pytest.approx(0.0022525, rel=1e-4)
    best = torch.load(resumed / "best.pt", weights_only=True)
    last = torch.load(resumed / "last.pt", weights_only=True)
    assert (best["epoch"], last["epoch"]) == (0, 2)  # the old run's best came along
    assert all(torch.equal(tested[k], v) for k, v in best["model"].items())
    assert not all(torch.equal(tested[k], v) for k, v in last["model"].items())


def test_resume_with_an_architecture_flag_fails_with_one_line(cli_run, tmp_path):
    out, _ = cli_run
    with pytest.raises(common.UserError, match="--no-se"):
        m.main(TINY + ["--epochs", "2", "--out", str(tmp_path / "r"), "--no-se", "--resume",
                       str(out / "last.pt")])


def test_eval_uses_the_checkpoints_image_size_and_reproduces(cli_run, tmp_path):
    out, metrics = cli_run
    # no --img-size: the toy default (64) would apply, but the checkpoint was trained at 32
    evaluated = m.main(["--preset", "tiny", "--toy-sizes", "8,4,4", "--out", str(tmp_path / "e"),
                        "--eval", str(out / "best.pt")])
    saved = json.loads((tmp_path / "e" / "test_metrics.json").read_text())
    assert saved["toy"] == pytest.approx(evaluated["toy"])
    assert evaluated["toy"] == pytest.approx(metrics["toy"])


def test_predict_writes_one_png_per_image(cli_run, tmp_path):
    out, _ = cli_run
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        image, _ = common.make_toy_binary(i, 48)
        common.Image.fromarray(image[:, :40]).save(folder / f"img{i}.jpg")  # 40 x 48
    (folder / "notes.txt").write_text("not an image")
    result = m.main(["--predict", str(folder), "--checkpoint", str(out / "best.pt"),
                     "--out", str(tmp_path / "pred")])
    pngs = sorted((tmp_path / "pred" / "predictions").glob("*.png"))
    assert result["predicted"] == 3 and [p.name for p in pngs] == ["img0.png", "img1.png",
                                                                   "img2.png"]
    assert common.Image.open(pngs[0]).size == (40, 48)


def test_bench_prints_one_record():
    record = m.main(["--bench", "--preset", "tiny", "--img-size", "32", "--batch-size", "1",
                     "--out", "/tmp/cmssm_unet_bench_test"])
    assert record["preset"] == "tiny" and record["train_images_per_s"] > 0


@pytest.mark.parametrize("flags, culprit", [
    (["--data", "/no/such/folder"], "/no/such/folder"),
    (["--eval", "NOT_A_CKPT"], "NOT_A_CKPT"),
    (["--pretrained", "missing_weights.pth"], "missing_weights.pth"),
    (["--img-size", "40"], "--img-size 40"),
    (["--loss-weights", "0.3"], "--loss-weights 0.3"),
])
def test_bad_input_exits_with_one_line(flags, culprit, tmp_path):
    if "NOT_A_CKPT" in flags:
        (tmp_path / "NOT_A_CKPT").write_text("garbage")
        flags = ["--eval", str(tmp_path / "NOT_A_CKPT")]
    result = subprocess.run([sys.executable, str(ROOT / "cmssm_unet.py"), *flags, "--preset",
                             "tiny", "--out", str(tmp_path / "o")], capture_output=True,
                            text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and culprit in lines[0]
    assert not (tmp_path / "o").exists()  # nothing written before the inputs are checked


def test_torchrun_two_processes_on_cpu(tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--master_port=29537", "cmssm_unet.py", "--preset", "tiny", "--epochs", "1",
               "--img-size", "32", "--batch-size", "2", "--toy-sizes", "8,2,2", "--device", "cpu",
               "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "NO_PROGRESS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert len((out / "log.csv").read_text().splitlines()) == 2  # rank 0 writes one row
    assert 0 <= json.loads((out / "test_metrics.json").read_text())["toy"]["DSC"] <= 1
