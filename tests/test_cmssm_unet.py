"""Tests of cmssm_unet.py: blocks, one hand-checked case per equation, sizes, VM-UNet
compatibility, losses, and the command line (tiny preset, 32x32 images)."""
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cmssm_unet as m
import common

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads spin against other jobs and
    the small tensors here run many times slower. Subprocesses and the notebook kernel inherit
    OMP_NUM_THREADS."""
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS")
    else:
        os.environ["OMP_NUM_THREADS"] = omp
TINY = ["--preset", "tiny", "--img-size", "32", "--batch-size", "4", "--limit-batches", "1",
        "--toy-sizes", "8,4,4"]


# ---- blocks and shapes ----

def test_block_shapes():
    x = torch.randn(2, 4, 6, 8)  # (B, H, W, C), H != W to catch transposes
    assert m.SqueezeExcitation(8, 4)(x).shape == x.shape
    assert m.ChannelMixingNetwork(8, 2)(x).shape == x.shape
    assert m.SS2D(8, 4, se_reduction=4)(x).shape == x.shape
    for se, cmn in ((0, 0), (4, 0), (0, 2), (4, 2)):
        assert m.CMSSMBlock(8, 0.1, 4, se, cmn)(x).shape == x.shape
    assert m.CrossRegionAttention(16, 32, 4)(torch.randn(2, 16, 4, 6)).shape == (2, 16, 4, 6)
    assert m.PatchMerging2D(8)(x).shape == (2, 2, 3, 16)
    assert m.PatchExpand2D(4)(x).shape == (2, 8, 12, 4)
    assert m.FinalPatchExpand2D(8)(x).shape == (2, 16, 24, 2)
    assert m.PatchEmbed2D(3, 8)(torch.randn(2, 3, 16, 32)).shape == (2, 4, 8, 8)


def test_model_output_and_feature_shapes():
    model = m.build_model("tiny").eval()
    logits, features = model(torch.rand(2, 3, 64, 32), return_features=True)
    assert logits.shape == (2, 1, 64, 32)
    c = m.PRESETS["tiny"].dims
    expected = [(2, c, 16, 8), (2, 2 * c, 8, 4), (2, 4 * c, 4, 2), (2, 8 * c, 2, 1)]
    assert [tuple(f.shape) for f in features["encoder_first"]] == expected
    assert [tuple(f.shape) for f in features["decoder_last"]] == expected[::-1]
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
    block = sum(p.numel() for p in vmunet.layers[0].blocks[0].parameters())
    assert block == 105_408
    rates = [round(b.drop_path.p, 4) for stage in vmunet.layers_up for b in stage.blocks]
    assert rates == [0.2, 0.1667, 0.1333, 0.1, 0.0667, 0.0333, 0.0]  # spec 1.6, reversed
    assert sum(p.numel() for p in full.parameters()) == 43_266_829  # spec 4.4
    cra = sum(p.numel() for p in full.skip_attention.parameters())
    assert cra == 56_904 + 14_628 + 5_016  # spec 5.3


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
    # depth_to_space: input channel (p1 * 2 + p2) * c + k goes to pixel (2h + p1, 2w + p2)
    y = torch.arange(8.0).view(1, 1, 1, 8)
    out = m.depth_to_space(y, 2)  # c = 2
    assert out.shape == (1, 2, 2, 2)
    assert out[0, 0, 1].tolist() == [2, 3] and out[0, 1, 0].tolist() == [4, 5]


def test_vmunet_checkpoint_loads_strict_and_reproduces_output(tmp_path):
    torch.manual_seed(1)
    source = m.build_model("tiny", se=False, cmn=False, cra=False).eval()
    path = tmp_path / "vmunet_best.pth"  # VM-UNet saves its wrapper's state_dict: `vmunet.` keys
    torch.save({f"vmunet.{k}": v for k, v in source.state_dict().items()}, path)
    torch.manual_seed(2)
    target = m.build_model("tiny", se=False, cmn=False, cra=False).eval()
    target.load_state_dict(m._read_weights(path), strict=True)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(source(x), target(x))
    torch.manual_seed(3)
    again = m.build_model("tiny", se=False, cmn=False, cra=False).eval()
    assert m.load_pretrained(again, str(path), log=lambda *a: None) == len(source.state_dict())
    with torch.no_grad():
        assert torch.equal(source(x), again(x))


def test_vmamba_weights_map_to_encoder_and_decoder(tmp_path):
    donor = m.build_model("tiny", se=False, cmn=False, cra=False)
    weights = {k: v + 1 for k, v in donor.state_dict().items() if k.startswith(("layers.",
                                                                                "patch_embed"))}
    weights["layers.2.blocks.5.ln_1.weight"] = torch.ones(4 * m.PRESETS["tiny"].dims)
    weights["head.weight"] = torch.zeros(10, 64)  # classifier keys are ignored
    path = tmp_path / "vmamba_small_e238_ema.pth"
    torch.save({"model": weights, "config": "yacs"}, path)
    model = m.build_model("tiny")  # the full CM-SSM model: SE, CMN, CRA stay random
    loaded = m.load_pretrained(model, str(path), log=lambda *a: None)
    state = model.state_dict()
    key = "blocks.0.self_attention.A_logs"
    assert torch.equal(state[f"layers.1.{key}"], weights[f"layers.1.{key}"])
    assert torch.equal(state[f"layers_up.2.{key}"], weights[f"layers.1.{key}"])  # 1 -> up.2
    assert torch.equal(state[f"layers_up.0.{key}"], weights[f"layers.3.{key}"])  # 3 -> up.0
    assert "layers_up.3.downsample.norm.weight" not in state
    encoder = sum(k in state for k in weights)
    assert encoder < loaded < len(state)


# ---- one hand-checkable case per equation ----

def test_eq1_se_squeeze_and_reweighting():
    se = m.SqueezeExcitation(4, 2)
    torch.nn.init.zeros_(se.fc2.weight)  # excitation sigma(0) = 0.5 for every channel
    y = torch.arange(2 * 2 * 3 * 4, dtype=torch.float32).view(2, 2, 3, 4)
    assert torch.allclose(se(y), 0.5 * y)
    captured = {}
    se.fc1.register_forward_hook(lambda mod, inp, out: captured.update(z=inp[0]))
    se(y)
    assert captured["z"].shape == (2, 4)
    # channel 0 of sample 0 holds 0, 4, ..., 20: mean 10 (Eq. 1)
    assert captured["z"][0, 0].item() == pytest.approx(10.0)


def test_eqs2_to_7_cross_region_attention_by_hand():
    cra = m.CrossRegionAttention(1, reduction=32, min_width=1).eval()
    for conv in (cra.conv1, cra.conv_h, cra.conv_w):
        torch.nn.init.ones_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    captured = {}
    cra.conv1.register_forward_hook(lambda mod, inp, out: captured.update(z=inp[0]))
    cra.act.register_forward_hook(lambda mod, inp, out: captured.update(f=out))
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (1, 1, H=2, W=2)
    out = cra(x)
    # Eq. (2): row means 1.5, 3.5; Eq. (3): column means 2, 3; concatenated along space
    assert captured["z"].flatten().tolist() == [1.5, 3.5, 2.0, 3.0]
    # Eq. (4): BN at its initial statistics is identity (up to eps); h-swish(v) = v relu6(v+3)/6
    hswish = lambda v: v * min(max(v + 3, 0), 6) / 6  # noqa: E731
    assert hswish(1.5) == 1.125 and hswish(3.5) == 3.5  # 1.5 * 4.5 / 6; 3.5 * 6 / 6
    assert torch.allclose(captured["f"].flatten(), torch.tensor(
        [hswish(v / math.sqrt(1 + 1e-5)) for v in (1.5, 3.5, 2.0, 3.0)]), atol=1e-6)
    # Eqs. (5)-(7): g^h = sigma(f^h), g^w = sigma(f^w), y_ij = x_ij g^h_i g^w_j
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    g_h = [sig(hswish(v)) for v in (1.5, 3.5)]
    g_w = [sig(hswish(v)) for v in (2.0, 3.0)]
    expected = torch.tensor([[x[0, 0, i, j].item() * g_h[i] * g_w[j] for j in range(2)]
                             for i in range(2)])
    assert torch.allclose(out[0, 0], expected, atol=1e-4)


def test_eq8_cross_feature_distillation_by_hand():
    student = torch.ones(1, 1, 2, 2, requires_grad=True)
    final = torch.zeros(1, 1, 4, 4)
    final[..., :, 2:] = 4.0  # pooled to 2x2: [[0, 4], [0, 4]]
    # (1-0)^2, (1-4)^2 on each row: mean (1 + 9) / 2 = 5
    loss = m.cross_feature_distillation([student], final)
    assert loss.item() == pytest.approx(5.0)
    loss.backward()
    assert student.grad is not None
    # two maps: the mean of their losses; k = min(C_s, C_t) = 1 channel paired at random
    other = torch.full((1, 3, 1, 1), 2.0)  # pooled target = mean 2; (2 - 2)^2 = 0
    assert m.cross_feature_distillation([student, other], final).item() == pytest.approx(2.5)


def test_eq9_internal_feature_distillation_by_hand():
    f = torch.zeros(1, 2, 2, 2)
    f[0, 0, 0, 0] = 1.0  # a peaky channel: normalised mean 1/4
    f[0, 1] = 2.0  # a flat channel: normalised mean 1/2 -> ranked first (F~)
    # F~ = [[2, 2], [2, 2]], F- = [[1, 0], [0, 0]]: ((2-1)^2 + 3 * 2^2) / 4 = 3.25
    assert m.internal_feature_distillation([f]).item() == pytest.approx(3.25)
    assert m.internal_feature_distillation([f, f.flip(1)]).item() == pytest.approx(3.25)


def _features(scale):
    maps = [torch.full((1, 2, 2, 2), scale), torch.full((1, 2, 1, 1), scale)]
    return {"encoder_first": maps, "encoder_last": maps, "decoder_first": maps,
            "decoder_last": maps, "final": torch.zeros(1, 2, 4, 4)}


def test_eq10_fd_loss_combines_the_two_terms():
    features = _features(3.0)
    features["encoder_last"] = [torch.tensor([[[[3.0]], [[1.0]]]])]  # channels 3 and 1
    # CFD against a zero target: maps of 3s give 9; the (3, 1) map gives (9 + 1) / 2 = 5.
    # group 'last' (2 decoder maps + that map): 23/3; group 'first' (4 maps): 9 -> 50/3.
    # IFD: equal channel halves give 0; the (3, 1) map gives (3 - 1)^2 = 4 -> 4.
    assert m.feature_distillation_loss(features, 1.0, 0.0).item() == pytest.approx(50 / 3)
    assert m.feature_distillation_loss(features, 0.0, 1.0).item() == pytest.approx(4.0)
    both = m.feature_distillation_loss(features).item()
    assert both == pytest.approx(0.015 * 50 / 3 + 0.015 * 4)


def test_eq11_bce_dice_and_total_loss_by_hand():
    logits = torch.zeros(1, 1, 2, 2)  # p = 0.5 everywhere
    target = torch.ones(1, 1, 2, 2)
    # BCE = ln 2; Dice = (2*2 + 1) / (2 + 4 + 1) = 5/7 -> L_Dice = 2/7
    expected = 0.3 * math.log(2) + 0.7 * 2 / 7
    assert m.bce_dice_loss(logits, target).item() == pytest.approx(expected)
    total, parts = m.total_loss(logits, target, _features(3.0))
    assert total.item() == pytest.approx(expected + 0.015 * 18)
    assert parts["fd"] == pytest.approx(0.015 * 18)
    assert m.total_loss(logits, target)[0].item() == pytest.approx(expected)


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
    per_image = m.evaluate(_FixedModel(), _Masks([a, b]), torch.device("cpu"), per_image=True)
    assert per_image["DSC"] == pytest.approx((1 + 4 / 12) / 2)
    original = m.evaluate(_FixedModel(), _Masks([a, b]), torch.device("cpu"),
                          original_size=True)
    assert original["mIoU"] == pytest.approx(10 / 18)


# ---- data handling ----

def test_vmunet_normalise_and_augment():
    x = torch.rand(2, 3, 8, 8) * 0.5 + 0.2
    y = m.vmunet_normalise(x)
    assert y.amin(dim=(1, 2, 3)).tolist() == [0, 0] and torch.allclose(
        y.amax(dim=(1, 2, 3)), torch.tensor([255.0, 255.0]))
    image = np.zeros((8, 8, 3), np.uint8)
    image[:2, :, 0] = 200
    mask = image[..., 0] > 0

    class Always:  # rng whose random() < 0.5 always: both flips and the rotation
        def random(self):
            return 0.0

        def uniform(self, low, high):
            raise AssertionError("fixed angle must not draw")

    out_image, out_mask = m.VMUNetAugment(fixed_angle=90)(image, mask, Always())
    assert out_mask.dtype == bool and out_mask.sum() == mask.sum()
    assert np.array_equal(out_image[..., 0] > 0, out_mask)  # image and mask moved together


def test_flat_folder_gets_the_papers_70_30_split(tmp_path):
    common.write_toy(tmp_path / "flat", n=10, size=32)
    args = m.argparse.Namespace(data=str(tmp_path / "flat"), split="auto", seed=0,
                                val_fraction=0.2, img_size=32, toy_sizes=m.TOY_SIZES)
    data = m.load_isic(args, None)
    assert (len(data["train"]), len(data["val"]), len(data["test"]["test"])) == (6, 1, 3)
    assert "70/30" in data["source"]
    args.split = "official"  # common's seeded 80/10/10
    assert len(m.load_isic(args, None)["test"]["test"]) == 1


def test_official_isic2017_layout_and_the_70_30_resplit(tmp_path):
    root = tmp_path / "isic2017"
    counts = {"Training": 6, "Validation": 2, "Test_v2": 3}
    index = 0
    for part, n in counts.items():
        (root / f"ISIC-2017_{part}_Data").mkdir(parents=True)
        (root / f"ISIC-2017_{part}_Part1_GroundTruth").mkdir()
        for _ in range(n):
            image, mask = common.make_toy_binary(index, 32)
            common.Image.fromarray(image).save(root / f"ISIC-2017_{part}_Data" /
                                               f"ISIC_{index:07d}.jpg")
            common.save_mask_png(root / f"ISIC-2017_{part}_Part1_GroundTruth" /
                                 f"ISIC_{index:07d}_segmentation.png", mask)
            index += 1
    args = m.argparse.Namespace(data=str(root), split="auto", seed=0, val_fraction=0.2,
                                img_size=32, toy_sizes=m.TOY_SIZES)
    data = m.load_isic(args, None)  # the official split is kept
    assert (len(data["train"]), len(data["val"]), len(data["test"]["test"])) == (6, 2, 3)
    args.split = "70-30"  # train + val (8) re-split as VM-UNet's package: test 2, val 1
    data = m.load_isic(args, None)
    assert (len(data["train"]), len(data["val"]), len(data["test"]["test"])) == (5, 1, 2)
    assert not any("Test_v2" in path for path in data["splits"]["train"])


# ---- training and the command line ----

def test_one_optimisation_step_lowers_the_loss():
    torch.manual_seed(0)
    model = m.build_model("tiny", drop_path=0.0)
    x, target = torch.rand(2, 3, 32, 32), (torch.rand(2, 1, 32, 32) > 0.5).float()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)

    def loss_now():
        torch.manual_seed(5)  # same random channel selection in both evaluations
        logits, features = model(m.vmunet_normalise(x), return_features=True)
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


def test_cli_run_writes_every_file(cli_run):
    out, metrics = cli_run
    for name in ("config.json", "log.csv", "last.pt", "best.pt", "test_metrics.json"):
        assert (out / name).exists(), name
    assert len(list((out / "predictions" / "toy").glob("*_overlay.png"))) == 4
    assert set(metrics["toy"]) == {"mIoU", "DSC", "Acc", "Sen", "Spe"}
    config = json.loads((out / "config.json").read_text())
    assert config["preset"] == "tiny" and config["weight_decay"] == 0.01


def test_resume_continues_and_eval_reproduces(cli_run, tmp_path):
    out, metrics = cli_run
    resumed = tmp_path / "resumed"
    m.main(TINY + ["--epochs", "2", "--out", str(resumed), "--resume", str(out / "last.pt")])
    rows = list(csv.DictReader(open(resumed / "log.csv")))
    assert [r["epoch"] for r in rows] == ["1"]
    evaluated = m.main(TINY + ["--out", str(tmp_path / "eval"), "--eval", str(out / "best.pt")])
    saved = json.loads((out / "test_metrics.json").read_text())
    assert evaluated["toy"] == pytest.approx(saved["toy"])
    assert evaluated["toy"] == pytest.approx(metrics["toy"])


def test_predict_writes_one_png_per_image(cli_run, tmp_path):
    out, _ = cli_run
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        image, _ = common.make_toy_binary(i, 48)
        common.Image.fromarray(image).save(folder / f"img{i}.jpg")
    (folder / "notes.txt").write_text("not an image")
    result = m.main(["--predict", str(folder), "--checkpoint", str(out / "best.pt"),
                     "--out", str(tmp_path / "pred")])
    pngs = sorted((tmp_path / "pred" / "predictions").glob("*.png"))
    assert result["predicted"] == 3 and [p.name for p in pngs] == ["img0.png", "img1.png",
                                                                   "img2.png"]
    assert common.Image.open(pngs[0]).size == (48, 48)


def test_bench_prints_one_record():
    record = m.main(["--bench", "--preset", "tiny", "--img-size", "32", "--batch-size", "1",
                     "--out", "/tmp/cmssm_unet_bench_test"])
    assert record["preset"] == "tiny" and record["train_images_per_s"] > 0


@pytest.mark.parametrize("flags, culprit", [
    (["--data", "/no/such/folder"], "/no/such/folder"),
    (["--eval", "NOT_A_CKPT"], "NOT_A_CKPT"),
    (["--pretrained", "missing_weights.pth"], "missing_weights.pth"),
    (["--img-size", "40"], "--img-size 40"),
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


def test_notebook_executes():
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient
    path = ROOT / "notebooks" / "cmssm_unet.ipynb"
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            cell.source += "\nFAST = True"
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()


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
