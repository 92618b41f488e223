"""Tests of dinet.py: block shapes, one hand-checked case per equation, the paper's parameter
budget, one optimisation step, and the command line (train, resume, eval, predict, errors)."""
import json
import re
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dinet

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--img-size", "32", "--batch-size", "4", "--limit-batches", "2"]


@pytest.fixture
def small_toy(monkeypatch):
    monkeypatch.setattr(dinet, "TOY_SIZES", (8, 4, 4))  # train / val / test slices


# ---- shapes ----

def test_encoder_and_decoder_shapes():
    cfg = dinet.PRESETS["tiny"]
    lows, highs = dinet.ConvNeXtEncoder(cfg)(torch.rand(2, 3, 32, 32))
    expected = [(2, c, 32 // 2 ** s, 32 // 2 ** s) for s, c in enumerate(cfg.dims)]
    assert [tuple(t.shape) for t in lows] == expected == [tuple(t.shape) for t in highs]
    decoder = dinet.MLPDecoder(cfg.dims, 16, 5)
    assert decoder(highs, (32, 32)).shape == (2, 5, 32, 32)


def test_difm_keeps_shape_also_when_windows_need_padding():
    cfg = dinet.PRESETS["tiny"]  # window 4 on a 6x6 map: padded to 8x8 and cropped back
    maps = [torch.rand(2, 16, 6, 6) for _ in range(4)]
    assert dinet.DIFM(16, cfg)(*maps).shape == (2, 16, 6, 6)


@pytest.mark.parametrize("overrides", [
    {}, {"inputs": "i"}, {"inputs": "e"}, {"inputs": "ii"}, {"fusion": "concat"},
    {"fusion": "input"}, {"attn": "ie"}, {"attn": "ei"}, {"cross_attn": False},
    {"merge": False}, {"gsa": False}, {"gsa_axis": "global"}, {"attn_proj": "lean"},
    {"edge_from": "chain"}, {"rel_pos_bias": False}])
def test_every_ablation_builds_and_runs(overrides):
    model = dinet.build_model("tiny", 4, **overrides)
    image = torch.rand(2, 3, 32, 32)
    assert model(image, image).shape == (2, 4, 32, 32)


def test_single_image_variants_have_one_encoder_and_one_direction():
    model = dinet.build_model("tiny", 4, inputs="i")
    assert model.enc_e is None and model.difm[0].directions == ["ie"]
    assert model.difm[0].merge_e is None
    assert dinet.build_model("tiny", 4, fusion="input").enc_i.stem[0].in_channels == 6


# ---- one hand-checkable case per equation ----

def test_eq1_merge_concatenates_low_first():
    difm = dinet.DIFM(2, dinet.PRESETS["tiny"])
    with torch.no_grad():  # 3x3 conv whose centre tap copies input channel c to output c
        difm.merge_i.weight.zero_()
        difm.merge_i.bias.zero_()
        difm.merge_i.weight[0, 0, 1, 1] = difm.merge_i.weight[1, 1, 1, 1] = 1.0
    captured = {}
    difm.merge_i.register_forward_hook(lambda m, i, o: captured.update(out=o))
    low, high = torch.rand(2, 2, 4, 6), torch.rand(2, 2, 4, 6)  # batch 2, non-square
    difm(low, high, torch.rand(2, 2, 4, 6), torch.rand(2, 2, 4, 6))
    assert torch.allclose(captured["out"], low)  # channels 0, 1 of concat(low, high) are low


def test_eq2_window_attention_by_hand():
    # d = 4, so sqrt(d) = 2: logits = (2 ln3 / 2, 0) = (ln 3, 0) -> weights (3/4, 1/4)
    q = torch.tensor([[2.0, 0, 0, 0]]).view(1, 1, 1, 4)
    k = torch.tensor([[math.log(3), 0, 0, 0], [0, 0, 0, 0]]).view(1, 1, 2, 4)
    v = torch.tensor([[4.0], [0.0]]).view(1, 1, 2, 1)
    out = dinet.window_attention(q, k, v)
    assert out.shape == (1, 1, 1, 1) and out.item() == pytest.approx(3.0)  # 3/4 * 4 + 1/4 * 0


def test_eq3_adds_the_projected_query():
    attn = dinet.WindowCrossAttention(4, window=2, head_dim=2)
    with torch.no_grad():  # Q = 1 and V = 2 everywhere: attention gives 2, plus Q = 3
        for p in attn.parameters():
            p.zero_()
        attn.qkv_a.bias[:4] = 1.0
        attn.qkv_b.bias[8:] = 2.0
    out = attn(torch.rand(2, 4, 4, 6), torch.rand(2, 4, 4, 6))
    assert out.shape == (2, 4, 4, 6) and torch.allclose(out, torch.full_like(out, 3.0))


def randomise(module, seed=0):
    """Distinct random values in every parameter (also LayerNorm and bias terms)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return module


def unpadded_window_attention(attn, query_map, kv_map):
    """Each window attends over its in-image tokens only, gathered without any padding."""
    b, c, h, w = query_map.shape
    win, out = attn.window, torch.zeros_like(query_map)
    for r0 in range(0, h, win):
        for c0 in range(0, w, win):
            rows, cols = range(r0, min(r0 + win, h)), range(c0, min(c0 + win, w))
            idx = torch.tensor([(r - r0) * win + (q - c0) for r in rows for q in cols])
            grab = lambda m: m[:, :, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].flatten(2)  # noqa
            a, kv = grab(query_map).transpose(1, 2), grab(kv_map).transpose(1, 2)  # (B, t, C)
            q = attn.norm_a(a) @ attn.qkv_a.weight[:c].T + attn.qkv_a.bias[:c]
            kv_proj = attn.norm_b(kv) @ attn.qkv_b.weight[c:].T + attn.qkv_b.bias[c:]
            k, v = kv_proj[..., :c], kv_proj[..., c:]
            split = lambda t: t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # noqa
            logits = split(q) @ split(k).transpose(-2, -1) / math.sqrt(c // attn.heads)
            if attn.rpb_table is not None:
                logits = logits + attn.rpb_table[attn.rpb_index[idx][:, idx]].permute(2, 0, 1)
            f = (logits.softmax(-1) @ split(v)).transpose(1, 2).flatten(2) + q  # (B, t, C)
            out[:, :, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = f.transpose(1, 2).unflatten(
                2, (len(rows), len(cols)))
    return out


@pytest.mark.parametrize("rel_pos_bias", [True, False])
def test_padded_windows_equal_attention_over_the_image_tokens_only(rel_pos_bias):
    attn = randomise(dinet.WindowCrossAttention(4, window=4, head_dim=2,
                                                rel_pos_bias=rel_pos_bias))
    torch.manual_seed(1)  # 6 x 5 maps: padded to 8 x 8, three of four windows are partial
    query_map, kv_map = torch.randn(2, 4, 6, 5), torch.randn(2, 4, 6, 5)
    with torch.no_grad():
        got, expected = attn(query_map, kv_map), unpadded_window_attention(attn, query_map, kv_map)
    assert got.shape == (2, 4, 6, 5)
    assert torch.allclose(got, expected, atol=1e-5)


def test_rel_pos_bias_switch_removes_only_the_table_and_changes_the_output():
    with_bias = dinet.build_model("tiny", 4)
    without = dinet.build_model("tiny", 4, rel_pos_bias=False)
    removed = set(with_bias.state_dict()) - set(without.state_dict())
    assert removed and all(k.endswith("rpb_table") for k in removed)
    assert not set(without.state_dict()) - set(with_bias.state_dict())
    attn = randomise(dinet.WindowCrossAttention(4, 4, 2))
    maps = torch.randn(2, 4, 8, 4), torch.randn(2, 4, 8, 4)
    before = attn(*maps)
    attn.rpb_table = None
    assert not torch.allclose(before, attn(*maps))


@pytest.mark.parametrize("dtype, scaled, underflow", [
    (torch.float16, True, False), (torch.bfloat16, False, False), (torch.float16, False, True)])
def test_amp_block_gradients_do_not_underflow(dtype, scaled, underflow):
    import argparse
    args = argparse.Namespace(amp=True, no_bnd=False, dice_eq8=False, bnd_reduction="mean",
                              data="toy")
    torch.manual_seed(0)
    model = dinet.build_model("tiny", 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    amp = dinet.amp_setup(torch.device("cpu"), scaled, dtype)
    assert amp[1].is_enabled() == scaled
    batch = {"image": torch.rand(2, 3, 32, 24), "enhanced": torch.rand(2, 3, 32, 24),
             "mask": torch.randint(0, 4, (2, 32, 24))}
    dinet.train_step(model, batch, optimizer, args, torch.device("cpu"), amp)
    block = model.enc_i.stages[0].blocks[0]  # layer scale 1e-6: gradients of about 1e-9
    for p in (block.mlp["fc1"].weight, block.conv_dw.weight):
        zeros = (p.grad == 0).float().mean().item()  # fp16 without a scaler: all exact zeros
        assert zeros == 1.0 if underflow else zeros < 0.1
    # amp_setup's own choice on this CPU: bf16, no scaler needed
    assert dinet.amp_setup(torch.device("cpu"), True)[0] == torch.bfloat16


def test_eq4_eq5_gated_ffn_by_hand():
    ffn = dinet.GatedFFN(2, kernel=3)
    with torch.no_grad():  # f1 = 1, f2 = 2 (first half, second half), fc_out = identity
        ffn.fc_in.weight.zero_()
        ffn.fc_in.bias.copy_(torch.tensor([1.0, 1.0, 2.0, 2.0]))
        ffn.fc_out.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        ffn.fc_out.bias.zero_()
    f = torch.rand(2, 2, 3, 5)
    gelu_1 = 0.5 * (1 + math.erf(1 / math.sqrt(2)))  # GELU(1) = 0.8413
    assert torch.allclose(ffn(f), f + 2 * gelu_1)  # F^ = conv(GELU(1) * 2) + f


def test_eq6_global_spatial_attention_by_hand():
    f = torch.tensor([[1.0, 2.0], [-1.0, 2.0]]).view(1, 2, 1, 2)  # pixels (1, -1) and (2, 2)
    out = dinet.global_spatial_attention(f, "channel")  # channel means 0 and 2
    gate_2 = torch.sigmoid(torch.tensor(2.0)).item()  # 0.8808
    expected = torch.tensor([[0.5, 2 * gate_2], [-0.5, 2 * gate_2]]).view(1, 2, 1, 2)
    assert torch.allclose(out, expected)
    whole = dinet.global_spatial_attention(f, "global")  # channel 0 mean 1.5, channel 1 mean 0.5
    assert whole.shape == f.shape
    assert torch.allclose(whole[0, 0], torch.sigmoid(torch.tensor(1.5)) * f[0, 0])


def test_eq7_uniform_logits_give_log_k():
    logits, target = torch.zeros(2, 9, 4, 4), torch.randint(0, 9, (2, 4, 4))
    assert dinet.loss_ce(logits, target).item() == pytest.approx(math.log(9))


def test_eq8_dice_by_hand():
    logits = torch.zeros(1, 2, 2, 2)  # x = 0.5 everywhere; two pixels of each class
    target = torch.tensor([[[0, 0], [1, 1]]])
    # squared (base code): d_c = 2 * 1 / (4 * 0.25 + 2) = 2/3 -> loss 1/3
    assert dinet.loss_dice(logits, target).item() == pytest.approx(1 / 3, abs=1e-5)
    # Eq. (8) as printed: d_c = 2 * 1 / (2 + 2) = 1/2 -> loss 1/2
    assert dinet.loss_dice(logits, target, squared=False).item() == pytest.approx(0.5, abs=1e-5)
    perfect = 50.0 * dinet.one_hot(target, 2)
    assert dinet.loss_dice(perfect, target).item() == pytest.approx(0.0, abs=1e-4)


def test_eq15_sobel_kernels_and_a_step_edge():
    assert dinet.SOBEL_H.tolist() == [[-1, -2, -1], [0, 0, 0], [1, 2, 1]]
    assert dinet.SOBEL_V.tolist() == [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]
    step = torch.zeros(1, 1, 5, 5)
    step[..., 3:] = 1.0  # a vertical edge between columns 2 and 3
    response = dinet.sobel(step)  # (B, K, 2, H, W)
    assert response.shape == (1, 1, 2, 5, 5)
    assert response[0, 0, 0, 1:4].abs().sum() == 0  # G_H: no response inside the image
    assert response[0, 0, 1, 2, 2:4].tolist() == [4.0, 4.0]  # G_V: 1 + 2 + 1 next to the edge


def test_eq9_boundary_loss_by_hand():
    prob, y = torch.zeros(1, 1, 5, 5), torch.zeros(1, 1, 5, 5)
    y[0, 0, 2, 2] = 1.0
    # scale 1: the impulse spreads each kernel; sum |G_H| = sum |G_V| = 8 over 25 pixels
    assert dinet.boundary_l1(prob, y, (1,)).item() == pytest.approx(16 / 25)
    # scale 1/2: 2x2 map with 0.25 at (1, 1); |G_H| = 0.25 + 0.5, |G_V| = 0.25 + 0.5 over 4 pixels
    assert dinet.boundary_l1(prob, y, (1, 2)).item() == pytest.approx(16 / 25 + 0.375)
    target = torch.randint(0, 3, (2, 16, 16))
    perfect = 50.0 * dinet.one_hot(target, 3)
    assert dinet.loss_boundary(perfect, target).item() < 1e-6


def test_eq10_total_loss_weights():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 4, 8, 8), torch.randint(0, 4, (2, 8, 8))
    loss, parts = dinet.total_loss(logits, target)
    assert loss.item() == pytest.approx(0.3 * parts["ce"].item() + 0.7 * parts["dice"].item()
                                        + parts["bnd"].item(), rel=1e-6)
    without, parts = dinet.total_loss(logits, target, use_boundary=False)
    assert parts["bnd"].item() == 0 and without < loss


def test_eq11_one_window_maps_mean_to_mid_gray_and_spread_to_sigma_u():
    image = np.array([[0.25, 0.75], [0.25, 0.75]])  # u = -0.5, 0.5 -> phi = -+atanh(0.5)
    # degree 0, Patrascu's grid: one window of membership 1. mu = 0, sigma = atanh(0.5),
    # lambda = sqrt(1/3) / atanh(0.5), so psi = -+sqrt(1/3) and E_raw = tanh(-+sqrt(1/3))
    raw = dinet.fuzzy_enhance(image, m=0, n=0, patrascu=True, rescale=False)
    assert raw[:, 0] == pytest.approx([-math.tanh(math.sqrt(1 / 3))] * 2, abs=1e-9)
    assert raw[:, 1] == pytest.approx([math.tanh(math.sqrt(1 / 3))] * 2, abs=1e-9)
    e = dinet.fuzzy_enhance(image, m=0, n=0, patrascu=True)
    assert e == pytest.approx(np.array([[0.0, 1.0]] * 2), abs=1e-12)


def reference_fuzzy(image, m, n, gamma, patrascu, sigma_u=math.sqrt(1 / 3), eps=1 / 255):
    """Eqs. (11)-(12) pixel by pixel and window by window (slow, obviously correct)."""
    h, w = image.shape
    phi = np.arctanh(np.clip(2 * image - 1, -1 + eps, 1 - eps))
    rows, cols = (m + 1, n + 1) if patrascu else (m, n)
    raw = np.zeros((rows, cols, h, w))
    for i in range(rows):
        for j in range(cols):
            for x in range(h):
                for y in range(w):
                    p = math.comb(m, i) * (x / h) ** i * (1 - x / h) ** (m - i)
                    q = math.comb(n, j) * (y / w) ** j * (1 - y / w) ** (n - j)
                    raw[i, j, x, y] = (p * q) ** gamma
    weights = raw / (raw.sum(axis=(0, 1)) + (0 if patrascu else 1e-5))
    out = np.zeros((h, w))
    for i in range(rows):
        for j in range(cols):
            wij = weights[i, j]
            mu = (wij * phi).sum() / wij.sum()
            sigma = math.sqrt((wij * (phi - mu) ** 2).sum() / wij.sum())
            psi = sigma_u / sigma * (phi - mu)  # Eq. (11) in phi-space
            out += wij * psi if patrascu else np.tanh(wij * psi)  # Eq. (12)
    return np.tanh(out) if patrascu else out


@pytest.mark.parametrize("patrascu", [False, True])
def test_eq12_matches_a_loop_over_windows(patrascu):
    image = np.random.default_rng(0).uniform(0, 1, (6, 7))
    fast = dinet.fuzzy_enhance(image, m=2, n=3, gamma=3.0, patrascu=patrascu, rescale=False)
    assert fast == pytest.approx(reference_fuzzy(image, 2, 3, 3.0, patrascu), abs=1e-9)
    if patrascu:  # an exact fuzzy partition
        weights = dinet.fuzzy_memberships(6, 7, 2, 3, 3.0, patrascu)
        assert weights.sum(axis=(0, 1)) == pytest.approx(np.ones((6, 7)))


# A 6x7 8-bit image (a ramp with a bright disc, levels 20..235, no 0 or 255), and E / 255 as
# computed once by the reference implementation (ivan-abboud/Image_enhancement_using_fuzzy_logic,
# ImageEnh.py at e7f571a: n = m = 2, gamma = 4, its log-model operators with their 1e-6 and its
# membership sum + 1e-5; run as published but with np.float -> float, output before uint8).
GOLDEN_IMAGE = [[30, 55, 80, 105, 130, 155, 180], [40, 65, 150, 175, 200, 165, 190],
                [50, 75, 160, 185, 210, 175, 200], [60, 85, 170, 195, 220, 185, 210],
                [70, 95, 180, 205, 230, 195, 220], [80, 105, 130, 155, 180, 205, 230]]
GOLDEN_E = [[0.1039, 0.3466, 0.3019, 0.0977, 0.1542, 0.3542, 0.6303],
            [0.1983, 0.4343, 0.8041, 0.6772, 0.8619, 0.4489, 0.7343],
            [0.1597, 0.3832, 0.7824, 0.6091, 0.8555, 0.3624, 0.6814],
            [0.1567, 0.3428, 0.7307, 0.5702, 0.8698, 0.304, 0.6717],
            [0.2225, 0.4089, 0.7893, 0.6986, 1.0, 0.4143, 0.8109],
            [0.3011, 0.4883, 0.3978, 0.1525, 0.2451, 0.566, 0.8712]]


def test_fuzzy_enhancement_matches_the_reference_golden_array():
    image = np.array(GOLDEN_IMAGE) / 255.0
    assert dinet.fuzzy_enhance(image) == pytest.approx(np.array(GOLDEN_E), abs=0.5 / 255)
    levels = dinet.enhance(image)  # what training and testing see: 8-bit levels
    assert levels.dtype == np.uint8
    levels = levels.astype(int)
    assert np.abs(levels - np.array(GOLDEN_E) * 255).max() <= 1
    patrascu = dinet.fuzzy_enhance(image, patrascu=True)  # the other documented target
    assert np.abs(patrascu - np.array(GOLDEN_E)).max() > 20 / 255


@pytest.mark.parametrize("option", [{"m": 3}, {"n": 3}, {"gamma": 2.0}, {"eps": 0.05},
                                    {"patrascu": True}, {"saturated": "clip"}])
def test_every_fuzzy_switch_changes_e(option):
    image = np.random.default_rng(3).uniform(0.02, 0.98, (10, 13))
    image[:3, :4], image[3:5, :4] = 0.0, 0.004  # exact zeros and near-zeros (eps clips them)
    assert np.abs(dinet.fuzzy_enhance(image, **option) - dinet.fuzzy_enhance(image)).max() > 0.01


def test_zero_background_keeps_the_tissue_contrast():
    # a CT-like slice: exact-zero air around a tissue ramp 0.3 .. 0.7
    image = np.zeros((40, 48))
    image[8:32, 10:38] = np.linspace(0.3, 0.7, 28)[None, :]
    tissue = dinet.fuzzy_enhance(image)[8:32, 10:38]
    # eps = 1e-6 gave phi(0) = -7.25 and squeezed the ramp into 0.13 of the range
    assert tissue[:, -1].mean() - tissue[:, 0].mean() > 0.3
    assert np.all(np.diff(tissue.mean(axis=0)) > 0)  # still a ramp, left to right


def test_near_constant_image_stays_near_mid_gray():
    assert dinet.fuzzy_enhance(np.full((9, 11), 0.4)) == pytest.approx(np.full((9, 11), 0.5))
    noise = 0.5 + np.random.default_rng(0).uniform(-1, 1, (20, 24)) / 255  # +-1 gray level
    e = dinet.fuzzy_enhance(noise)
    assert np.abs(e - 0.5).max() < 0.1  # the sigma floor 1e-12 stretched it to [0, 1]


def test_eq13_convnext_block_residual_by_hand():
    block = dinet.ConvNeXtBlock(3)
    with torch.no_grad():  # the 4C branch ends in fc2 with zero weights and bias 0.5
        block.gamma.fill_(1.0)
        block.mlp["fc2"].weight.zero_()
        block.mlp["fc2"].bias.fill_(0.5)
    x = torch.rand(2, 3, 5, 7)
    assert torch.allclose(block(x), x + 0.5)  # y = conv(...) + x with conv(...) = 0.5


def test_eq14_decoder_concatenates_level_4_first():
    dims, dim = (2, 3, 4, 5), 2
    decoder = dinet.MLPDecoder(dims, dim, 3).eval()
    with torch.no_grad():  # level s maps to the constant s
        for level, mlp in enumerate(decoder.linear_c, start=1):
            mlp["proj"].weight.zero_()
            mlp["proj"].bias.fill_(float(level))
    captured = {}
    decoder.linear_fuse[0].register_forward_hook(lambda m, i, o: captured.update(x=i[0]))
    features = [torch.rand(1, c, 8 // 2 ** s, 8 // 2 ** s) for s, c in enumerate(dims)]
    assert decoder(features, (8, 8)).shape == (1, 3, 8, 8)
    assert captured["x"].shape == (1, 4 * dim, 8, 8)  # 4 levels at the level-1 size
    assert [captured["x"][0, dim * i].mean().item() for i in range(4)] == [4.0, 3.0, 2.0, 1.0]
    assert decoder.linear_fuse[0].kernel_size == (3, 3)


# ---- enhancement alternatives, data, augmentation ----

def test_histogram_equalisation_and_clahe_by_hand():
    image = np.array([[0.2, 0.2], [0.6, 0.6]])
    assert dinet.histogram_equalize(image).tolist() == [[0.0, 0.0], [1.0, 1.0]]
    # one tile, no clipping: the CDF, 2/4 and 4/4
    assert dinet.clahe(image, tiles=1, clip_limit=1e9) == pytest.approx(np.array(
        [[0.5, 0.5], [1.0, 1.0]]))
    big = np.random.default_rng(0).uniform(0, 1, (40, 50))
    out = dinet.clahe(big)
    assert out.shape == big.shape and 0 <= out.min() and out.max() <= 1
    rgb = np.random.default_rng(1).uniform(0, 1, (9, 7, 3))
    for method, per_channel in (("he", dinet.histogram_equalize), ("clahe", dinet.clahe)):
        colour = dinet.enhance(rgb, method)  # each channel equalised alone, as 8-bit levels
        assert colour.shape == (9, 7, 3) and colour.dtype == np.uint8
        for c in range(3):
            assert np.abs(colour[..., c] / 255 - per_channel(rgb[..., c])).max() <= 0.5 / 255


def test_enhanced_image_is_computed_once_per_sample(monkeypatch):
    calls = []
    original = dinet.enhance
    monkeypatch.setattr(dinet, "enhance", lambda *a, **k: calls.append(1) or original(*a, **k))
    import common
    base = common.ToyMulticlass(3, 32, seed=1)
    data = dinet.DualImageDataset(base, 32, "fuzzy", augment=True)
    for _ in range(3):
        for i in range(len(data)):
            item = data[i]
    assert len(calls) == 3
    assert item["image"].shape == item["enhanced"].shape == (3, 32, 32)
    assert item["mask"].shape == (32, 32) and item["mask"].dtype == torch.int64


def test_augmentation_moves_image_enhanced_and_label_together():
    import random
    label = np.random.default_rng(0).integers(0, 4, (16, 16))
    rng = random.Random(0)
    for _ in range(12):
        image, enhanced, moved = dinet.random_rotate_flip(
            [label.astype(float), label.astype(float) * 2, label], rng)
        assert np.array_equal(image, moved) and np.array_equal(enhanced, 2 * moved)


def test_pretrained_meta_checkpoint_loads_by_name(tmp_path):
    model = dinet.build_model("tiny", 4)
    enc = model.enc_i
    fake = {"downsample_layers.0.0.weight": torch.rand(8, 3, 4, 4),  # 4x4 stem: must be skipped
            "downsample_layers.0.0.bias": torch.rand(8),  # ... and its bias with it
            "downsample_layers.0.1.weight": torch.rand(8),
            "downsample_layers.1.0.weight": torch.rand(8),
            "downsample_layers.1.1.weight": torch.rand(16, 8, 2, 2),
            "stages.0.0.dwconv.weight": torch.rand(8, 1, 7, 7),
            "stages.0.0.pwconv1.weight": torch.rand(32, 8),
            "stages.0.0.gamma": torch.rand(8), "head.weight": torch.rand(1000, 32)}
    torch.save({"model": fake}, tmp_path / "convnext.pth")  # Meta's published layout
    stem_before = [p.clone() for p in enc.stem[0].parameters()]
    lines = []
    dinet.load_pretrained(model, str(tmp_path / "convnext.pth"), lines.append)
    assert torch.equal(enc.stem[1].weight, fake["downsample_layers.0.1.weight"])
    assert torch.equal(enc.stages[1].downsample[1].weight, fake["downsample_layers.1.1.weight"])
    assert torch.equal(enc.edge[0][1].weight, fake["downsample_layers.1.1.weight"])
    assert torch.equal(enc.stages[0].blocks[0].conv_dw.weight, fake["stages.0.0.dwconv.weight"])
    assert torch.equal(enc.stages[0].blocks[0].mlp["fc1"].weight,
                       fake["stages.0.0.pwconv1.weight"])
    assert torch.equal(model.enc_e.stages[0].blocks[0].gamma, fake["stages.0.0.gamma"])
    assert all(torch.equal(a, b) for a, b in zip(enc.stem[0].parameters(), stem_before))
    assert any("stem conv random, weight and bias" in line for line in lines)
    assert any(line.startswith("encoder E: ") and "tensors from" in line for line in lines)


# ---- budget and optimisation ----

def test_paper_preset_matches_the_parameter_budget():
    with torch.device("meta"):  # counts shapes only: no 1.3 GB allocation, no initialisation
        model = dinet.build_model("paper", 9)
    split = dinet.parameter_split(model)
    total = sum(p.numel() for p in model.parameters())
    assert abs(total - 323.31e6) / 323.31e6 < 0.01  # Sec. 4.5
    assert total == 323_204_161  # spec 10 (323,204,185 with its two 12-parameter 1->3 blocks)
    assert sum(p.numel() for p in model.enc_i.parameters()) == 90_317_824  # spec 3
    assert sum(p.numel() for p in model.difm.parameters()) == 119_848_760  # spec 4.6
    assert sum(p.numel() for p in model.decoder.parameters()) == 22_719_753  # spec 5
    assert split["total"] == pytest.approx(323.204)


def test_one_optimisation_step_lowers_the_loss():
    torch.manual_seed(0)
    model = dinet.build_model("tiny", 4, decoder_dropout=0.0)
    image, target = torch.rand(2, 3, 32, 32), torch.randint(0, 4, (2, 32, 32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before, _ = dinet.total_loss(model(image, image), target)
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    after, _ = dinet.total_loss(model(image, image), target)
    assert after.item() < before.item()


# ---- command line ----

def test_cli_train_resume_eval_predict(tmp_path, small_toy):
    out = tmp_path / "run"
    metrics = dinet.main(TINY + ["--epochs", "1", "--out", str(out)])
    for name in ("config.json", "log.csv", "last.pt", "best.pt", "test_metrics.json"):
        assert (out / name).is_file(), name
    assert any((out / "predictions").glob("*.png"))
    assert set(metrics["toy"]) >= {"Dice", "HD95", "vessel"}
    dinet.main(TINY + ["--epochs", "2", "--out", str(out), "--resume", str(out / "last.pt"),
                       "--lr", "5e-4"])
    rows = (out / "log.csv").read_text().splitlines()
    assert [r.split(",")[:2] for r in rows[1:]] == [["0", "0.002"], ["1", "0.0005"]]  # epoch 1
    saved = json.loads((out / "test_metrics.json").read_text())
    again = dinet.main(["--eval", str(out / "best.pt"), "--out", str(tmp_path / "eval")])
    assert again["toy"] == pytest.approx(saved["toy"], nan_ok=True)
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image
    for i in range(2):
        Image.fromarray(np.full((40, 30, 3), 60 * i, np.uint8)).save(images / f"im{i}.png")
    result = dinet.main(["--predict", str(images), "--checkpoint", str(out / "best.pt"),
                         "--out", str(tmp_path / "pred")])
    assert result["predicted"] == 2
    assert sorted(p.name for p in (tmp_path / "pred").glob("*.png")) == ["im0.png", "im1.png"]
    assert Image.open(tmp_path / "pred" / "im0.png").size == (30, 40)
    assert Image.open(tmp_path / "pred" / "im0.png").mode == "P"  # a label map, not a 0/255 mask


def isic2018_folder(root):
    """The ISIC 2018 challenge layout with 10 / 5 / 5 tiny image-mask pairs."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, count in (("Training", 10), ("Validation", 5), ("Test", 5)):
        images, masks = (root / f"ISIC2018_Task1-2_{split}_Input",
                         root / f"ISIC2018_Task1_{split}_GroundTruth")
        images.mkdir(parents=True), masks.mkdir(parents=True)
        for i in range(count):
            name = f"ISIC_{split[:2]}{i:05d}"
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), np.uint8)).save(images / f"{name}.jpg")
            mask = np.zeros((20, 24), np.uint8)
            mask[5:15, 6:18] = 255
            Image.fromarray(mask).save(masks / f"{name}_segmentation.png")
    return root


@pytest.mark.parametrize("official, sizes", [(False, (16, 2, 2)), (True, (10, 5, 5))])
def test_isic2018_layout_is_resplit_80_10_10_unless_official(tmp_path, monkeypatch, capsys,
                                                             official, sizes):
    folder = isic2018_folder(tmp_path / "isic")

    def stop(data, args):
        raise RuntimeError(data)
    monkeypatch.setattr(dinet, "make_loaders", stop)
    argv = ["--data", str(folder), "--task", "binary", "--preset", "tiny", "--pretrained",
            "none", "--img-size", "32", "--out", str(tmp_path / "run")]
    with pytest.raises(RuntimeError) as stopped:
        dinet.main(argv + (["--official-split"] if official else []))
    data = stopped.value.args[0]
    assert data["layout"] == "isic2018"
    assert (len(data["train"]), len(data["val"]), len(data["test"]["test"])) == sizes
    assert "protocol [ISIC18]" in capsys.readouterr().out


def test_cli_binary_task(tmp_path, small_toy):
    metrics = dinet.main(TINY + ["--epochs", "1", "--task", "binary", "--enhance", "clahe",
                                 "--out", str(tmp_path)])
    assert 0 <= metrics["toy"]["Dice"] <= 100
    written = sorted(p.name for p in (tmp_path / "predictions").glob("*.png"))
    assert written and all(name.startswith("toy_") for name in written)  # named by the image


def test_bench_prints_one_record(tmp_path):
    record = dinet.main(["--bench", "--preset", "tiny", "--img-size", "32", "--batch-size", "1",
                         "--out", str(tmp_path)])
    assert record["params_M"] > 0 and record["train_images_per_s"] > 0


@pytest.mark.parametrize("argv, culprit", [
    (["--data", "/no/such/folder"], "/no/such/folder"),
    (["--eval", "/no/such/best.pt"], "best.pt"),
    (["--pretrained", "/no/such/convnext.pth", "--preset", "tiny"], "convnext.pth")])
def test_bad_input_exits_with_one_line(argv, culprit, tmp_path):
    result = subprocess.run([sys.executable, "dinet.py", *argv, "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and culprit in lines[0]


# ---- wiring (Fig. 2), one test per ablation switch, reductions, gradients ----

@pytest.mark.parametrize("inputs, fusion", [("ie", "difm"), ("i", "difm"), ("e", "difm"),
                                            ("ii", "difm"), ("ie", "input")])
def test_encoders_receive_the_images_fig2a(inputs, fusion):
    model = dinet.build_model("tiny", 4, inputs=inputs, fusion=fusion)
    seen = {}
    for name in ("enc_i", "enc_e"):
        if getattr(model, name) is not None:
            getattr(model, name).register_forward_hook(
                lambda m, i, o, name=name: seen.update({name: i[0]}))
    image, enhanced = torch.rand(2, 3, 32, 24), torch.rand(2, 3, 32, 24)
    model(image, enhanced)
    expected = {"ie": (image, enhanced), "i": (image, None), "e": (enhanced, None),
                "ii": (image, image)}[inputs]
    if fusion == "input":
        expected = (torch.cat([image, enhanced], dim=1), None)
    assert torch.equal(seen["enc_i"], expected[0])
    assert ("enc_e" in seen) == (expected[1] is not None)
    if expected[1] is not None:
        assert torch.equal(seen["enc_e"], expected[1])


def test_every_block_receives_what_fig2_says():
    torch.manual_seed(0)
    model = randomise(dinet.build_model("tiny", 4), seed=5).eval()
    seen = {}

    def keep(module, name):
        module.register_forward_hook(lambda m, i, o: seen.update({name: (i, o)}))
    for name in ("enc_i", "enc_e", "decoder"):
        keep(getattr(model, name), name)
    for s, difm in enumerate(model.difm):
        for part in ("merge_i", "merge_e", "attn_ie", "attn_ei", "ffn_ie", "ffn_ei"):
            keep(getattr(difm, part), f"{part}{s}")
        keep(difm, f"difm{s}")
    for s, stage in enumerate(model.enc_i.stages):
        keep(stage, f"stage{s}")
    for s, edge in enumerate(model.enc_i.edge):
        keep(edge, f"edge{s}")
    model(torch.rand(2, 3, 32, 24), torch.rand(2, 3, 32, 24))
    lows_i, highs_i = seen["enc_i"][1]
    lows_e, highs_e = seen["enc_e"][1]
    for s in range(4):
        maps = seen[f"difm{s}"][0]  # Fig. 2a: edge and shape maps of both encoders, stage s
        for got, want in zip(maps, (lows_i[s], highs_i[s], lows_e[s], highs_e[s])):
            assert torch.equal(got, want)
        m_i, m_e = seen[f"merge_i{s}"][1], seen[f"merge_e{s}"][1]  # Eq. (1), low first
        assert torch.equal(seen[f"merge_i{s}"][0][0], torch.cat([lows_i[s], highs_i[s]], 1))
        assert torch.equal(seen[f"merge_e{s}"][0][0], torch.cat([lows_e[s], highs_e[s]], 1))
        q_ie, kv_ie = seen[f"attn_ie{s}"][0]  # Fig. 2b: I queries E, E queries I
        q_ei, kv_ei = seen[f"attn_ei{s}"][0]
        assert torch.equal(q_ie, m_i) and torch.equal(kv_ie, m_e)
        assert torch.equal(q_ei, m_e) and torch.equal(kv_ei, m_i)
        assert torch.equal(seen[f"ffn_ie{s}"][0][0], seen[f"attn_ie{s}"][1])
        assert torch.equal(seen[f"ffn_ei{s}"][0][0], seen[f"attn_ei{s}"][1])
        gate = dinet.global_spatial_attention  # Fig. 2d on each direction, then the sum
        fused = gate(seen[f"ffn_ie{s}"][1]) + gate(seen[f"ffn_ei{s}"][1])
        assert torch.allclose(seen[f"difm{s}"][1], fused)
        assert torch.equal(seen["decoder"][0][0][s], seen[f"difm{s}"][1])
    for s in range(1, 4):  # the edge pool of stage s reads stage s-1's output (spec 3)
        assert torch.equal(seen[f"edge{s - 1}"][0][0], seen[f"stage{s - 1}"][1])
        assert torch.equal(seen[f"stage{s}"][0][0], seen[f"stage{s - 1}"][1])
        assert torch.equal(lows_i[s], seen[f"edge{s - 1}"][1])
        assert torch.equal(highs_i[s], seen[f"stage{s}"][1])


# switch -> (state-dict keys it removes, keys it adds); every ablation must change the output
ABLATIONS = [
    ({"inputs": "i"}, r"^enc_e\.|\.merge_e\.|\.attn_ei\.|\.ffn_ei\.", None),
    ({"inputs": "e"}, r"^enc_e\.|\.merge_e\.|\.attn_ei\.|\.ffn_ei\.", None),
    ({"inputs": "ii"}, None, None),
    ({"fusion": "concat"}, r"^difm\.\d\.(?!proj)", r"^difm\.\d\.proj\."),
    ({"fusion": "input"}, r"^enc_e\.|\.merge_e\.|\.attn_ei\.|\.ffn_ei\.", None),
    ({"attn": "ie"}, r"\.attn_ei\.|\.ffn_ei\.", None),
    ({"attn": "ei"}, r"\.attn_ie\.|\.ffn_ie\.", None),
    ({"cross_attn": False}, r"\.attn_(ie|ei)\.", None),
    ({"merge": False}, r"\.merge_[ie]\.", None),
    ({"gsa": False}, None, None),
    ({"gsa_axis": "global"}, None, None),
    ({"attn_proj": "lean"}, r"\.qkv_[ab]\.", r"\.attn_(ie|ei)\.(q|kv|out)\."),
    ({"edge_from": "chain"}, None, None),
    ({"rel_pos_bias": False}, r"rpb_table", None),
    ({"num_difm": 3}, r"^enc_[ie]\.(stages\.3|edge\.2)\.|^difm\.3\.|^decoder\.linear_c\.3\.", None),
    ({"decoder_dropout": 0.5}, None, None),
]


@pytest.mark.parametrize("overrides, removes, adds", ABLATIONS)
def test_each_ablation_changes_what_it_names_and_nothing_else(overrides, removes, adds):
    torch.manual_seed(0)
    base = dinet.build_model("tiny", 4)
    variant = dinet.build_model("tiny", 4, **overrides)
    old, new = base.state_dict(), variant.state_dict()
    assert set(old) - set(new) == {k for k in old if removes and re.search(removes, k)}
    assert set(new) - set(old) == {k for k in new if adds and re.search(adds, k)}
    reshaped = {k for k in set(old) & set(new) if old[k].shape != new[k].shape}
    assert reshaped <= {"enc_i.stem.0.weight", "decoder.linear_fuse.0.weight"}
    variant.load_state_dict({**new, **{k: old[k] for k in set(old) & set(new) - reshaped}})
    image, enhanced = torch.rand(2, 3, 32, 24), torch.rand(2, 3, 32, 24)
    train = "decoder_dropout" in overrides  # dropout acts in training only
    outputs = []
    for model in (base.train(train), variant.train(train)):
        torch.manual_seed(1)
        outputs.append(model(image, enhanced))
    assert not torch.allclose(*outputs)
    if train:
        assert torch.allclose(base.eval()(image, enhanced), variant.eval()(image, enhanced))


@pytest.mark.parametrize("switch", ["no_bnd", "dice_eq8", "bnd_sum"])
def test_each_loss_switch_changes_only_its_term(switch):
    torch.manual_seed(0)
    logits, target = torch.randn(2, 4, 12, 10), torch.randint(0, 4, (2, 12, 10))
    _, base = dinet.total_loss(logits, target)
    _, parts = dinet.total_loss(logits, target, use_boundary=switch != "no_bnd",
                                squared_dice=switch != "dice_eq8",
                                bnd_reduction="sum" if switch == "bnd_sum" else "mean")
    named = {"no_bnd": "bnd", "dice_eq8": "dice", "bnd_sum": "bnd"}[switch]
    for key in base:
        assert (parts[key].item() != base[key].item()) == (key == named), key


def test_dice_pools_the_batch_and_boundary_loss_averages_images():
    # two different masks, uniform x = 0.5: image a all class 0, image b all class 1
    logits, target = torch.zeros(2, 2, 2, 2), torch.stack([torch.zeros(2, 2), torch.ones(2, 2)])
    # pooled over the batch (MERIT): per class I = 2, sum x^2 = 2, sum y = 4 -> d = 2/3
    assert dinet.loss_dice(logits, target.long()).item() == pytest.approx(1 / 3, abs=1e-5)
    # per image it would be 1 - (4/5 + 0) / 2 = 0.6
    prob, y = torch.zeros(2, 1, 5, 6), torch.zeros(2, 1, 5, 6)
    y[0, 0, 2, 3] = 1.0  # an impulse in image a only; image b is predicted exactly
    # image a: sum |G_H| = sum |G_V| = 8 over 30 pixels; image b: 0 -> batch mean
    assert dinet.boundary_l1(prob, y, (1,)).item() == pytest.approx(16 / 30 / 2)
    assert dinet.boundary_l1(prob, y, (1,), "sum").item() == pytest.approx(16 / 2)


def test_only_the_used_projection_thirds_and_both_encoders_get_gradients():
    model = dinet.build_model("tiny", 4)
    image = torch.rand(2, 3, 32, 24)
    loss, _ = dinet.total_loss(model(image, torch.rand(2, 3, 32, 24)),
                               torch.randint(0, 4, (2, 32, 24)))
    loss.backward()
    attn, c = model.difm[1].attn_ie, 16
    assert attn.qkv_a.weight.grad[:c].abs().sum() > 0  # Q third of the query side
    assert attn.qkv_a.weight.grad[c:].abs().sum() == 0  # its K, V thirds never act
    assert attn.qkv_b.weight.grad[:c].abs().sum() == 0  # the key side's Q third neither
    assert attn.qkv_b.weight.grad[c:].abs().sum() > 0
    for encoder in (model.enc_i, model.enc_e):  # E's encoder learns through the DIFMs
        assert encoder.stages[3].blocks[0].conv_dw.weight.grad.abs().sum() > 0


def test_training_and_testing_see_the_same_enhanced_image():
    import argparse
    import common
    data = dinet.DualImageDataset(common.ToyMulticlass(2, 24, seed=4), 32, "fuzzy",
                                  fuzzy={"gamma": 3.0})
    args = argparse.Namespace(img_size=32, enhance="fuzzy", resize="bilinear", fuzzy_m=2,
                              fuzzy_n=2, fuzzy_gamma=3.0, fuzzy_eps=1 / 255,
                              fuzzy_patrascu=False, fuzzy_saturated="exclude")
    model, seen = dinet.build_model("tiny", 9), {}
    model.register_forward_hook(lambda m, i, o: seen.update(enhanced=i[1]))
    dinet.predict(model, [data.raw(1)[0]], args, torch.device("cpu"))
    assert torch.equal(seen["enhanced"][0], data[1]["enhanced"])


def test_predict_labels_runs_batch_size_slices_per_forward():
    import argparse
    args = argparse.Namespace(img_size=16, enhance="none", resize="bilinear", batch_size=2)
    model, calls = dinet.build_model("tiny", 4), []
    model.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    labels = dinet.predict_labels(model, np.random.default_rng(0).uniform(0, 1, (5, 20, 18)),
                                  args, torch.device("cpu"))
    assert labels.shape == (5, 20, 18) and calls == [2, 2, 1]


def test_label_value_at_or_above_k_stops_with_one_line():
    import argparse
    import common
    args = argparse.Namespace(amp=False, no_bnd=False, dice_eq8=False, bnd_reduction="mean",
                              data="DIR")
    model = dinet.build_model("tiny", 4)
    batch = {"image": torch.rand(2, 3, 16, 16), "enhanced": torch.rand(2, 3, 16, 16),
             "mask": torch.randint(0, 4, (2, 16, 16))}
    batch["mask"][1, 3, 3] = 4
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(common.UserError, match="label value 4") as error:
        dinet.train_step(model, batch, optimizer, args, torch.device("cpu"),
                         dinet.amp_setup(torch.device("cpu"), False))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("argv, culprit", [
    (["--fusion", "concat", "--attn", "ie"], "--attn"),
    (["--fusion", "concat", "--no-rel-pos-bias"], "--no-rel-pos-bias"),
    (["--fusion", "concat", "--edge-from", "chain"], "--edge-from"),
    (["--fusion", "input", "--inputs", "e"], "--inputs"),
    (["--inputs", "i", "--attn", "ei"], "--attn"),
    (["--no-cross-attn", "--attn-proj", "lean"], "--attn-proj"),
    (["--no-cross-attn", "--no-rel-pos-bias"], "--no-rel-pos-bias"),
    (["--no-merge", "--edge-from", "chain"], "--edge-from"),
    (["--no-gsa", "--gsa", "global"], "--gsa global"),
    (["--no-bnd", "--bnd-reduction", "sum"], "--bnd-reduction"),
    (["--enhance", "he", "--fuzzy-gamma", "2"], "--fuzzy-gamma"),
    (["--inputs", "ii", "--enhance", "clahe"], "--enhance"),
    (["--num-difm", "5"], "--num-difm")])
def test_conflicting_switches_stop_with_one_line(argv, culprit):
    import common
    with pytest.raises(common.UserError) as error:
        dinet.parse_args(argv)
    assert culprit in str(error.value) and "\n" not in str(error.value)


def test_keys_and_queries_both_receive_gradients_through_the_attention():
    attn = randomise(dinet.WindowCrossAttention(4, 4, 2), seed=2)
    query_map = torch.randn(2, 4, 8, 6, requires_grad=True)
    kv_map = torch.randn(2, 4, 8, 6, requires_grad=True)
    attn(query_map, kv_map).square().sum().backward()
    assert kv_map.grad.abs().sum() > 0 and query_map.grad.abs().sum() > 0  # nothing detached


@pytest.mark.parametrize("argv, key, value", [
    (["--inputs", "e"], "inputs", "e"), (["--fusion", "concat"], "fusion", "concat"),
    (["--attn", "ei"], "attn", "ei"), (["--no-cross-attn"], "cross_attn", False),
    (["--no-merge"], "merge", False), (["--no-gsa"], "gsa", False),
    (["--gsa", "global"], "gsa_axis", "global"), (["--attn-proj", "lean"], "attn_proj", "lean"),
    (["--edge-from", "chain"], "edge_from", "chain"),
    (["--no-rel-pos-bias"], "rel_pos_bias", False), (["--num-difm", "2"], "num_difm", 2),
    (["--decoder-dropout", "0.3"], "decoder_dropout", 0.3),
    (["--fuzzy-m", "3"], "m", 3), (["--fuzzy-n", "4"], "n", 4),
    (["--fuzzy-gamma", "2"], "gamma", 2.0), (["--fuzzy-eps", "0.01"], "eps", 0.01),
    (["--fuzzy-patrascu"], "patrascu", True), (["--fuzzy-saturated", "clip"], "saturated", "clip")])
def test_every_flag_reaches_the_setting_it_names(argv, key, value):
    args, _ = dinet.parse_args(argv)
    default, _ = dinet.parse_args([])
    if key in dinet.DINConfig.__dataclass_fields__:
        got, before = (dinet.build_model("tiny", 4, **dinet.model_switches(a)).cfg
                       for a in (args, default))
        assert getattr(got, key) == value != getattr(before, key)
    else:
        assert dinet.fuzzy_options(args)[key] == value != dinet.fuzzy_options(default)[key]


@pytest.mark.parametrize("flag, term", [("no_bnd", "bnd"), ("dice_eq8", "dice"),
                                        ("bnd_reduction", "bnd")])
def test_training_step_honours_each_loss_flag(flag, term):
    import argparse
    batch = {"image": torch.rand(2, 3, 32, 24), "enhanced": torch.rand(2, 3, 32, 24),
             "mask": torch.randint(0, 4, (2, 32, 24))}
    parts = []
    for changed in (False, True):
        args = argparse.Namespace(amp=False, no_bnd=False, dice_eq8=False, bnd_reduction="mean",
                                  data="toy")
        if changed:
            setattr(args, flag, "sum" if flag == "bnd_reduction" else True)
        torch.manual_seed(0)
        model = dinet.build_model("tiny", 4, decoder_dropout=0.0)
        parts.append(dinet.train_step(model, batch, torch.optim.AdamW(model.parameters()), args,
                                      torch.device("cpu"), dinet.amp_setup(torch.device("cpu"),
                                                                           False)))
    for key in ("ce", "dice", "bnd"):
        assert (parts[0][key] != parts[1][key]) == (key == term), key


@pytest.mark.parametrize("layout, row", [
    ("synapse", "protocol [Synapse]: | TransUNet's 18 train"), ("acdc", "protocol [ACDC]: | 70 /"),
    ("clinicdb", "protocol [ClinicDB]: | 612 images"), ("isic2018", "protocol [ISIC18]: | the"),
    ("kvasir", "protocol: kvasir is none of the paper's")])
def test_protocol_row_is_the_docstring_row_of_the_layout(layout, row):
    import argparse
    assert dinet.protocol_row(argparse.Namespace(data="DIR"), {"layout": layout}).startswith(row)


def test_evaluate_writes_every_prediction_and_at_most_50_overlays(tmp_path):
    import argparse

    class Volumes:  # two test volumes of 30 slices, 12 x 10: one budget of 50 overlays
        names = ["v0", "v1"]

        def __len__(self):
            return 2

        def volume(self, index):
            rng = np.random.default_rng(index)
            return rng.uniform(0, 1, (30, 12, 10)), rng.integers(0, 4, (30, 12, 10)), f"v{index}"
    args = argparse.Namespace(task="multiclass", img_size=16, enhance="none", resize="bilinear",
                              batch_size=32)
    metrics = dinet.evaluate(dinet.build_model("tiny", 4), Volumes(), args, torch.device("cpu"),
                             ["a", "b", "c"], out=tmp_path)
    assert set(metrics) == {"Dice", "HD95", "a", "b", "c"}
    assert len(list(tmp_path.glob("v0_*_overlay.png"))) == 30
    assert len(list(tmp_path.glob("v1_*_overlay.png"))) == 20
    assert len(list(tmp_path.glob("v[01]_[0-9][0-9][0-9].png"))) == 60


def test_binary_prediction_is_class_one_upsampled_to_the_image(monkeypatch):
    import argparse
    prob = torch.zeros(1, 2, 4, 4)
    prob[0, 1, :, :2], prob[0, 0, :, 2:] = 0.8, 0.9  # class 1 on the left half only
    prob[0, 0, :, :2], prob[0, 1, :, 2:] = 0.2, 0.1
    monkeypatch.setattr(dinet, "predict", lambda *a, **k: prob)
    args = argparse.Namespace(img_size=4)
    mask = dinet.predict_full(None, np.zeros((6, 8, 3), np.uint8), args, "cpu", True)
    assert mask.shape == (6, 8) and mask[:, :4].all() and not mask[:, 4:].any()


def test_train_one_epoch_averages_the_steps_and_honours_limit_batches(monkeypatch):
    import argparse
    steps = iter([{"loss": 1.0, "ce": 2.0, "dice": 3.0, "bnd": 4.0},
                  {"loss": 3.0, "ce": 4.0, "dice": 5.0, "bnd": 8.0}, None])
    monkeypatch.setattr(dinet, "train_step", lambda *a: next(steps))
    model = dinet.build_model("tiny", 4)
    args = argparse.Namespace(limit_batches=2)
    means = dinet.train_one_epoch(model, [{}, {}, {}], None, args, "cpu", None, show=False)
    assert means == {"loss": 2.0, "ce": 3.0, "dice": 4.0, "bnd": 6.0} and model.training


def test_lean_projection_uses_q_kv_and_out():
    attn = randomise(dinet.WindowCrossAttention(4, 4, 2, proj="lean"), seed=3)
    attn(torch.randn(2, 4, 8, 6), torch.randn(2, 4, 8, 6)).square().sum().backward()
    for layer in (attn.q, attn.kv, attn.out):
        assert layer.weight.grad.abs().sum() > 0
