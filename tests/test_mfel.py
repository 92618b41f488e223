"""Tests of mfel.py: block shapes, one hand-checkable case per equation, the CLI run folder."""
import argparse
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import common
import mfel

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--img-size", "32", "--batch-size", "4"]


@pytest.fixture(autouse=True)
def small_toy_sets(monkeypatch):
    monkeypatch.setitem(mfel.TOY_RECIPE, "toy_sizes", (12, 4, 6))
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds waiting on a busy CPU
    yield
    torch.set_num_threads(threads)


# ---- block shapes ----

def test_encoder_and_decoder_shapes():
    features = mfel.Encoder((16, 32, 64))(torch.rand(2, 3, 32, 32))
    assert [tuple(f.shape) for f in features] == [(2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4)]
    recon = mfel.Decoder((16, 32, 64), 3, sigmoid=True)(features)
    assert recon.shape == (2, 3, 32, 32) and 0 <= recon.min() and recon.max() <= 1


@pytest.mark.parametrize("mode", ["afm", "sum", "concat"])
def test_afm_shapes(mode):
    f = [torch.rand(2, 16, 8, 8) for _ in range(3)]
    assert mfel.AdaptiveFeatureModulation(16, mode)(*f).shape == (2, 16, 8, 8)


@pytest.mark.parametrize("mode,literal", [("attn", False), ("attn", True), ("sum", False),
                                          ("concat", False)])
def test_bfm_shapes(mode, literal):
    block = mfel.BidirectionalFusion(16, head_dim=8, kv_grid=4, mode=mode, literal_eq6=literal)
    assert block(torch.rand(2, 16, 8, 8), torch.rand(2, 16, 8, 8)).shape == (2, 16, 8, 8)


def test_em_and_mixer_shapes():
    assert mfel.MambaMixer(8, d_state=4)(torch.rand(2, 10, 8)).shape == (2, 10, 8)
    em = mfel.MultiBranchVisionMamba(32, groups=4, d_state=4)
    assert em(torch.rand(2, 32, 3, 4)).shape == (2, 32, 3, 4)


@pytest.mark.parametrize("switches", [{}, {"fiir": False}, {"em": False},
                                      {"afm": "concat", "bfm": "sum"},
                                      {"fiir": False, "coarse_head": False}])
def test_model_outputs(switches):
    out = mfel.build_model("tiny", **switches)(torch.rand(2, 3, 32, 24))
    assert out["logits"].shape == (2, 1, 32, 24)
    if switches.get("fiir", True):
        for key in ("recon_fg", "recon_bg", "recon_image", "image_fg", "image_bg"):
            assert out[key].shape == (2, 3, 32, 24)
        assert set(out["mask_split"].unique().tolist()) <= {0.0, 1.0}
    elif switches.get("coarse_head", True):
        assert set(out) == {"logits", "coarse_logits"}
    else:
        assert set(out) == {"logits"}


def test_paper_preset_parameter_count():
    # spec 5: 10.72 M. By hand: encoders 4 x 1,146,304; reconstruction decoders 3 x 775,235 and
    # the segmentation decoder 775,105 (1 output); AFMs 689,920; BFMs 2,244,480 (26 C^2 + 18 C
    # per level); EM 99,457; coarse head 257.
    model = mfel.build_model("paper")
    count = sum(p.numel() for p in model.parameters())
    assert count == 4 * 1_146_304 + 3 * 775_235 + 775_105 + 689_920 + 2_244_480 + 99_457 + 257
    assert count == 10_720_140


# ---- one hand-checkable case per equation ----

def test_eq1_split():
    # two images 2 x 3 with channel values 1, 2, 3 (image 2: 10x), each with its own mask
    image = torch.arange(1.0, 4.0).view(1, 3, 1, 1).expand(2, 3, 2, 3) * torch.tensor(
        [1.0, 10.0]).view(2, 1, 1, 1)
    mask = torch.tensor([[[[1.0, 0, 0], [0, 1, 0]]], [[[0.0, 0, 1], [1, 1, 1]]]])
    image_fg, image_bg = mfel.split_foreground_background(image, mask)
    assert image_fg.shape == image_bg.shape == (2, 3, 2, 3)
    assert torch.equal(image_fg[0, 1], torch.tensor([[2.0, 0, 0], [0, 2, 0]]))
    assert torch.equal(image_bg[0, 2], torch.tensor([[0.0, 3, 3], [3, 0, 3]]))
    assert torch.equal(image_fg[1, 0], torch.tensor([[0.0, 0, 10], [10, 10, 10]]))
    assert torch.equal(image_bg[1, 2], torch.tensor([[30.0, 30, 0], [0, 0, 0]]))


def test_eq2_and_eq4_l1_means():
    # |0.25 - 0| and |0.25 - 1| over half the pixels each: mean 0.5; background all exact: 0
    target = torch.zeros(2, 3, 4, 4)
    target[..., :2] = 1.0
    recon = torch.full((2, 3, 4, 4), 0.25)
    l_f, l_b = mfel.loss_foreground_background(recon, target, target, target)
    assert l_f.item() == pytest.approx(0.5) and l_b.item() == 0.0
    assert mfel.loss_image_reconstruction(recon, target).item() == pytest.approx(0.5)


def test_eq3_afm_modulation():
    # all weights 0; last alpha bias 0 -> alpha = sigmoid(0) = 0.5; last beta bias 0.3
    afm = mfel.AdaptiveFeatureModulation(4)
    for p in afm.parameters():
        nn.init.zeros_(p)
    nn.init.constant_(afm.beta_stream[-1].bias, 0.3)
    f_r = torch.randn(2, 4, 3, 3)
    out = afm(f_r, torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3))
    assert out.shape == (2, 4, 3, 3)
    assert torch.allclose(out, 1.5 * f_r + 0.3, atol=1e-6)
    ones = torch.ones(1, 4, 2, 2)
    assert torch.equal(mfel.AdaptiveFeatureModulation(4, "sum")(ones, ones, 2 * ones), 4 * ones)


def test_eq5_cross_attention():
    # one head, d = 4: q = 0 attends uniformly -> mean of V; a query aligned with key 2 with a
    # large score picks V_2
    k = torch.eye(4)[None, None, :2]  # keys e1, e2
    v = torch.tensor([[1.0, 2, 3, 4], [5.0, 6, 7, 8]])[None, None]
    q = torch.tensor([[0.0, 0, 0, 0], [0.0, 100, 0, 0]])[None, None]
    out = mfel.cross_attention(q, k, v)
    assert out.shape == (1, 1, 2, 4)
    assert torch.allclose(out[0, 0, 0], torch.tensor([3.0, 4, 5, 6]))
    assert torch.allclose(out[0, 0, 1], v[0, 0, 1], atol=1e-4)
    q, k, v = torch.randn(3, 1, 2, 5, 8).unbind(0)
    manual = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1) @ v
    assert torch.allclose(mfel.cross_attention(q, k, v), manual, atol=1e-5)


def test_eq6_residuals():
    # C11 = 0: F~_s = F_s and F~_r = F^_r (the un-normalised streams), so the output is the
    # final fusion conv of [F^_r, F_s]. The value pairing of both halves: test_mfel_wiring.
    torch.manual_seed(1)
    block = mfel.BidirectionalFusion(8, head_dim=4, kv_grid=0).eval()
    f_s, f_r_hat = torch.randn(2, 2, 8, 4, 6).unbind(0)
    for conv in (block.c11_s, block.c11_r):
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
    expected = block.fuse(torch.cat([f_r_hat, f_s], 1))
    assert torch.allclose(block(f_s, f_r_hat), expected, atol=1e-6)
    nn.init.normal_(block.c11_s.bias)  # a C11 output moves F~_s, hence the result
    assert not torch.allclose(block(f_s, f_r_hat), expected, atol=1e-3)


def test_eq7_to_eq10_em_matches_group_by_group():
    torch.manual_seed(2)
    em = mfel.MultiBranchVisionMamba(16, groups=4, d_state=4)
    nn.init.constant_(em.gamma, 0.7)
    x = torch.randn(2, 16, 2, 3)
    n_s = em.norm_in(x.flatten(2).transpose(1, 2))  # (B, L, C)
    groups = n_s.chunk(4, dim=2)  # Eq. 7: channel groups of 4
    tilde = [em.mamba(g) + 0.7 * g for g in groups]  # Eq. 8, one shared mixer
    n_out = em.proj(em.norm_out(torch.cat(tilde, dim=2)))  # Eqs. 9-10
    expected = n_out.transpose(1, 2).reshape(2, 16, 2, 3)
    assert torch.allclose(em(x), expected, atol=1e-5)
    # M = 0 (zero out_proj): N~ = gamma LN(x), and LN is scale-invariant -> output = Proj(LN(LN x))
    nn.init.zeros_(em.mamba.out_proj.weight)
    expected = em.proj(em.norm_out(n_s)).transpose(1, 2).reshape(2, 16, 2, 3)
    assert torch.allclose(em(x), expected, atol=1e-4)


def test_mamba_mixer_is_causal():
    mixer = mfel.MambaMixer(8, d_state=4)
    x = torch.randn(1, 12, 8)
    changed = x.clone()
    changed[:, 6:] += 1.0
    y, y_changed = mixer(x), mixer(changed)
    assert torch.allclose(y[:, :6], y_changed[:, :6], atol=1e-6)
    assert not torch.allclose(y[:, 6:], y_changed[:, 6:])


def test_mamba_mixer_fast_scan_matches_the_reference_loop(monkeypatch):
    mixer = mfel.MambaMixer(8, d_state=4)
    x = torch.randn(2, 40, 8, requires_grad=True)  # 40 steps: more than one scan chunk
    y = mixer(x)
    (grad,) = torch.autograd.grad(y.square().sum(), x)
    monkeypatch.setattr(common, "selective_scan", common.selective_scan_reference)
    y_ref = mixer(x)
    (grad_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    assert torch.allclose(y, y_ref, atol=1e-5) and torch.allclose(grad, grad_ref, atol=1e-4)


def test_eq11_sum():
    assert mfel.loss_reconstruction(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0)) == 6


def test_eq12_bce_plus_dice():
    # logits 0 -> p = 0.5 on 4 foreground pixels: BCE = ln 2; Dice = (2*2 + 1) / (2 + 4 + 1)
    logits, target = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    assert mfel.bce_loss(logits, target).item() == pytest.approx(math.log(2))
    assert mfel.dice_loss(logits, target).item() == pytest.approx(2 / 7)
    assert mfel.loss_mask(logits, target).item() == pytest.approx(math.log(2) + 2 / 7)


def test_eq13_total_with_coarse_term():
    # batch 2 of 2 x 3: image 1 all foreground, image 2 empty. Logits 0 (p = 1/2): BCE ln 2,
    # Dice 1 - (7/10 + 1/4)/2 (per image, see test_eq12 in test_mfel_wiring). Coarse logits:
    # +ln 3 on image 1 (p = 3/4: BCE ln 4/3, Dice (9 + 1)/(4.5 + 6 + 1) = 20/23) and -ln 3 on
    # image 2 (p = 1/4: BCE ln 4/3, Dice 1/(1.5 + 1) = 2/5). L_rec: |0.25 - 0.5| on every value.
    target = torch.stack([torch.ones(1, 2, 3), torch.zeros(1, 2, 3)])
    image = torch.full((2, 3, 2, 3), 0.5)
    coarse = torch.tensor([math.log(3), -math.log(3)]).view(2, 1, 1, 1).expand(2, 1, 2, 3)
    quarter = torch.full((2, 3, 2, 3), 0.25)
    out = {"logits": torch.zeros(2, 1, 2, 3), "coarse_logits": coarse, "recon_fg": quarter,
           "image_fg": quarter, "recon_bg": quarter, "image_bg": quarter, "recon_image": quarter}
    l_mask = math.log(2) + 1 - (0.7 + 0.25) / 2
    l_coarse = math.log(4 / 3) + 1 - (20 / 23 + 2 / 5) / 2
    loss, parts = mfel.total_loss(out, image, target, coarse_weight=0.5)
    assert parts == pytest.approx({"mask": l_mask, "rec": 0.25, "coarse": l_coarse})
    assert loss.item() == pytest.approx(0.25 + l_mask + 0.5 * l_coarse)
    loss, parts = mfel.total_loss({"logits": out["logits"]}, image, target)
    assert loss.item() == pytest.approx(l_mask) and set(parts) == {"mask"}


def test_warmup_cosine_schedule():
    # 11 epochs of 10 iterations, 1 warm-up epoch: 1e-5 -> 1e-3 linearly over iterations 0-10,
    # then cosine down to 1e-5 at iteration 110; halfway (60) the mean of the two
    args = argparse.Namespace(lr=1e-3, min_lr=1e-5, epochs=11, warmup_epochs=1)
    lr = [mfel.lr_at(step // 10, step % 10, 10, args) for step in (0, 5, 10, 60, 110)]
    assert lr[0] == pytest.approx(1e-5) and lr[2] == pytest.approx(1e-3)
    assert lr[1] == pytest.approx((1e-5 + 1e-3) / 2)
    assert lr[3] == pytest.approx((1e-5 + 1e-3) / 2) and lr[4] == pytest.approx(1e-5)
    args.epochs = 21  # --resume --epochs 21 at epoch 6: the new total's schedule from there on
    assert mfel.lr_at(6, 0, 10, args) == pytest.approx(
        1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 50 / 200)))


def test_model_uses_the_given_mask_for_eq1():
    model = mfel.build_model("tiny").eval()
    image, mask = torch.rand(2, 3, 32, 24), torch.zeros(2, 1, 32, 24)
    mask[0, ..., :16] = 1
    mask[1, ..., 8:, :] = 1
    out = model(image, mask)
    assert torch.equal(out["mask_split"], mask)
    assert torch.equal(out["image_fg"][0, :, :, 16:], torch.zeros(3, 32, 8))
    assert torch.equal(out["image_bg"][1, :, 8:], torch.zeros(3, 24, 24))


def test_one_step_lowers_the_loss():
    model = mfel.build_model("tiny")
    image = torch.rand(2, 3, 32, 32)
    target = torch.zeros(2, 1, 32, 32)
    target[..., 8:24, 8:24] = 1
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        loss, _ = mfel.total_loss(model(image), image, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_glas_layout_detection(tmp_path):
    (tmp_path / "train_1.bmp").write_bytes(b"")
    assert not mfel.is_glas(tmp_path)
    assert mfel.parse_args(["--data", str(tmp_path)]).img_size == 256  # Sec. 4.1.1, ISIC/PH2
    (tmp_path / "train_1_anno.bmp").write_bytes(b"")
    assert mfel.is_glas(tmp_path)
    args = mfel.parse_args(["--data", str(tmp_path)])
    assert args.img_size == 128  # Sec. 4.1.1: GlaS at 128x128
    assert mfel.parse_args(["--data", str(tmp_path), "--img-size", "64"]).img_size == 64


# ---- command line ----

def test_cli_run_resume_eval_predict(tmp_path, capsys):
    out = tmp_path / "run"
    external = common.write_toy(tmp_path / "ph2", n=3, size=40, seed=5)
    args = TINY + ["--epochs", "1", "--limit-batches", "2", "--test-data", str(external)]
    metrics = mfel.main(args + ["--out", str(out)])
    log = capsys.readouterr().out
    assert "protocol (mfel.py docstring):\n  all " in log and "\n  toy       ours" in log
    assert "WARNING: 1 epochs end inside the 1-epoch warm-up" in log
    assert "testing last.pt (epoch 0)" in log  # the paper's choice, though toy has a val set
    for name in ("config.json", "log.csv", "last.pt", "best.pt", "test_metrics.json"):
        assert (out / name).is_file(), name
    assert set(metrics) == {"toy", "ph2"} and set(metrics["toy"]) == {"per-image", "global"}
    assert 0 <= metrics["toy"]["global"]["F1"] <= 100
    assert len(list((out / "predictions" / "toy").glob("*_overlay.png"))) == 6
    assert len(list((out / "predictions" / "ph2").glob("toy_*[0-9].png"))) == 3

    # resumed with a larger --epochs: epochs 1-2 follow the 3-epoch schedule (2 steps each)
    mfel.main(TINY + ["--epochs", "3", "--limit-batches", "2", "--resume", str(out / "last.pt"),
                      "--out", str(out)])
    rows = (out / "log.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows] == ["epoch", "0", "1", "2"]
    lr = float(rows[2].split(",")[rows[0].split(",").index("lr")])
    recipe = argparse.Namespace(lr=2e-3, min_lr=1e-5, epochs=3, warmup_epochs=1)
    assert lr == pytest.approx(mfel.lr_at(1, 1, 2, recipe), rel=1e-4)
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 2

    saved = json.loads((out / "test_metrics.json").read_text())
    again = mfel.main(["--eval", str(out / "last.pt"), "--out", str(tmp_path / "eval")])
    for mode in ("per-image", "global"):
        assert again["toy"][mode] == pytest.approx(saved["toy"][mode])
    only_external = mfel.main(["--eval", str(out / "last.pt"), "--data", str(external),
                               "--mask-source-eval", "oracle", "--out", str(tmp_path / "ext")])
    assert "NOT_REPORTABLE" in only_external and len(only_external) == 2
    capsys.readouterr()
    network = mfel.main(["--eval", str(out / "last.pt"), "--data", str(external),
                         "--out", str(tmp_path / "net")])
    original = mfel.main(["--eval", str(out / "last.pt"), "--data", str(external), "--out",
                          str(tmp_path / "orig"), "--eval-resolution", "original",
                          "--metric-mode", "global"])
    log = capsys.readouterr().out
    assert log.index("(%, global, original") < log.index("(%, per-image, original")
    assert log.index("(%, per-image, network") < log.index("(%, global, network")
    group = next(iter(network))  # 40 px originals, scored at 32 px or at 40 px
    assert network[group]["per-image"] != original[group]["per-image"]

    result = mfel.main(["--predict", str(external / "images"), "--checkpoint",
                        str(out / "last.pt"), "--out", str(tmp_path / "pred")])
    masks = sorted((tmp_path / "pred" / "predictions").glob("*.png"))
    assert result["predicted"] == 3 and len(masks) == 3
    assert np.asarray(common.Image.open(masks[0])).shape == (40, 40)


def test_select_best_tests_the_best_validation_epoch(tmp_path, capsys):
    mfel.main(TINY + ["--epochs", "2", "--limit-batches", "1", "--select", "best",
                      "--out", str(tmp_path / "run")])
    log = capsys.readouterr().out
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)["epoch"]
    assert f"testing best.pt (epoch {best})" in log
    external = common.write_toy(tmp_path / "data", n=4, size=32, seed=1)
    with pytest.raises(common.UserError, match="--select best needs a validation set"):
        mfel.main(TINY + ["--data", str(external), "--select", "best"])


def test_pretrained_path_and_bench(tmp_path, capsys):
    model = mfel.build_model("tiny")
    common.save_checkpoint(tmp_path / "weights.pt", {"model": model.state_dict()})
    args = TINY + ["--epochs", "1", "--limit-batches", "1", "--out", str(tmp_path / "run"),
                   "--pretrained", str(tmp_path / "weights.pt"), "--no-em", "--afm", "sum"]
    mfel.main(args)  # --no-em and --afm sum drop tensors the file has: the rest loads
    ablated = mfel.build_model("tiny", em=False, afm="sum").state_dict()
    assert f"MFEL: {len(ablated)} of " in capsys.readouterr().out
    torch.save({"model": {"nothing.weight": torch.zeros(1)}}, tmp_path / "foreign.pt")
    with pytest.raises(common.UserError):
        mfel.main(args[:-5] + ["--pretrained", str(tmp_path / "foreign.pt")])
    record = mfel.main(TINY + ["--bench", "--out", str(tmp_path / "bench")])
    assert record["params_M"] == pytest.approx(0.676, abs=1e-3)
    assert record["train_images_per_s"] > 0 and record["img_size"] == 32


def test_train_loader_drops_only_a_last_batch_of_one():
    # spec 5: GlaS's 85 training images in batches of 4 give 21 full batches and one of 1
    args = argparse.Namespace(batch_size=4, workers=0, seed=0)
    assert len(mfel.train_loader(list(range(85)), args)) == 21
    assert len(mfel.train_loader(list(range(86)), args)) == 22  # a last batch of 2 is kept


def test_augment_same_for_image_and_mask_rot90_half_the_time():
    rng = random.Random(0)
    mask = np.zeros((4, 6), np.uint8)
    mask[0, :3] = 1
    mask[3, 5] = 1
    image = np.stack([mask * 255, np.zeros_like(mask), np.ones_like(mask)], -1)
    odd = 0
    for _ in range(3000):
        aug_image, aug_mask = mfel.augment(image, mask, rng)
        assert np.array_equal(aug_image[..., 0], aug_mask * 255)
        odd += aug_mask.shape == (6, 4)  # a 90 or 270 degree turn
    # p = 0.5 of a turn by 90, 180 or 270 degrees: 1/3 of the draws are 90 or 270
    assert abs(odd / 3000 - 1 / 3) < 0.04


@pytest.mark.parametrize("argv,culprit", [
    (["--data", "/no/such/folder"], "/no/such/folder"),
    (["--eval", "README.md"], "README.md"),
    (["--img-size", "30"], "--img-size"),
    (["--no-fiir", "--mask-source-eval", "oracle"], "--no-fiir"),
    (["--no-coarse-head"], "--no-coarse-head needs --no-fiir"),
])
def test_bad_inputs_exit_with_one_line(argv, culprit, tmp_path):
    if argv[0] == "--eval":
        (tmp_path / "README.md").write_text("not a checkpoint")
        argv = ["--eval", str(tmp_path / "README.md")]
    result = subprocess.run([sys.executable, str(ROOT / "mfel.py"), *argv, "--preset", "tiny",
                             "--epochs", "1", "--limit-batches", "1", "--out",
                             str(tmp_path / "run")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and culprit in lines[0]
