"""Tests of reseg_unet.py: blocks, the released network, Eqs. (1)-(8), the two-stage CLI."""
import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import reseg_unet as m

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--img-size", "32", "--batch-size", "4", "--toy-sizes", "8,4,3"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads; on a busy 2-core machine spinning threads cost."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- blocks and the model ----

def test_block_shapes():
    x = torch.rand(2, 6, 20, 20)
    assert m.DoubleConv(6, 10)(x).shape == (2, 10, 20, 20)
    assert m.Down(6, 12)(x).shape == (2, 12, 10, 10)
    deep, skip = torch.rand(2, 16, 5, 5), torch.rand(2, 8, 11, 11)  # odd skip: padded
    assert m.Up(16, 8)(deep, skip).shape == (2, 8, 11, 11)
    assert m.OutConv(6, 9)(x).shape == (2, 9, 20, 20)


def test_model_features_and_mid_choice():
    net = m.build_model("tiny", 9).eval()  # widths 4, 8, 16, 32, 64
    out = net(torch.rand(2, 1, 32, 32))  # a 1-channel image is repeated to 3 channels
    assert out.logits.shape == (2, 9, 32, 32)
    assert [tuple(f.shape[1:]) for f in out.encoder] == [(8, 16, 16), (16, 8, 8), (32, 4, 4),
                                                          (64, 2, 2)]
    assert [tuple(f.shape[1:]) for f in out.decoder] == [(32, 4, 4), (16, 8, 8), (8, 16, 16)]
    assert out.mid is out.encoder[3]  # paper: the bottleneck
    released = m.build_model("tiny", 9, as_released=True).eval()(torch.rand(1, 3, 32, 32))
    assert released.mid is released.decoder[0]  # authors' code: u1 (spec 3.2)
    recon = m.build_model("tiny", 4, role="recon").eval()
    assert recon(torch.randint(0, 4, (2, 32, 32))).logits.shape == (2, 4, 32, 32)


def test_paper_preset_parameter_count():
    # spec 1.4: 31,038,153 (9 classes, 3-channel input); 31,037,828 for ACDC's 4 classes
    for classes, expected in ((9, 31_038_153), (4, 31_037_828)):
        count = sum(p.numel() for p in m.build_model("paper", classes).parameters())
        assert count == expected and abs(count / 31.04e6 - 1) < 0.01


def released_key_names():
    """The 118 keys of the authors' state_dict, written from the pattern of spec 1.5."""
    def double(prefix):
        keys = []
        for conv, bn in ((0, 1), (3, 4)):
            keys.append(f"{prefix}.double_conv.{conv}.weight")
            keys += [f"{prefix}.double_conv.{bn}.{n}" for n in
                     ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
        return keys
    keys = double("inc")
    for k in range(1, 5):
        keys += double(f"down{k}.maxpool_conv.1")
    for k in range(1, 5):
        keys += [f"up{k}.up.weight", f"up{k}.up.bias"] + double(f"up{k}.conv")
    return keys + ["outc.conv.weight", "outc.conv.bias"]


def functional_unet(state, x):
    """The released U-Net written out from spec 1.1 with F.* calls on a state_dict (eval BN)."""
    def double(prefix, h):
        for conv, bn in ((0, 1), (3, 4)):
            h = F.conv2d(h, state[f"{prefix}.double_conv.{conv}.weight"], padding=1)
            h = F.batch_norm(h, state[f"{prefix}.double_conv.{bn}.running_mean"],
                             state[f"{prefix}.double_conv.{bn}.running_var"],
                             state[f"{prefix}.double_conv.{bn}.weight"],
                             state[f"{prefix}.double_conv.{bn}.bias"], False, 0.0, 1e-5)
            h = F.relu(h)
        return h
    feats = [double("inc", x)]
    for k in range(1, 5):
        feats.append(double(f"down{k}.maxpool_conv.1", F.max_pool2d(feats[-1], 2)))
    h = feats[4]
    for k in range(1, 5):
        h = F.conv_transpose2d(h, state[f"up{k}.up.weight"], state[f"up{k}.up.bias"], stride=2)
        h = double(f"up{k}.conv", torch.cat([feats[4 - k], h], dim=1))
    return F.conv2d(h, state["outc.conv.weight"], state["outc.conv.bias"])


def test_released_state_dict_loads_strictly_and_gives_the_same_logits(tmp_path):
    keys = list(m.build_model("paper", 9, as_released=True).state_dict())
    assert len(keys) == 118 and set(keys) == set(released_key_names())
    # a checkpoint as the authors save it: a plain state_dict with trained-looking BN buffers
    source = m.build_model("tiny", 9, as_released=True)
    source.train()(torch.rand(4, 3, 32, 32))  # moves the running statistics away from 0 / 1
    torch.save(source.state_dict(), tmp_path / "epoch_149.pth")
    net = m.load_released_weights(m.build_model("tiny", 9, as_released=True),
                                  tmp_path / "epoch_149.pth").eval()
    x = torch.rand(2, 3, 32, 32)
    state = torch.load(tmp_path / "epoch_149.pth")
    assert torch.allclose(net(x).logits, functional_unet(state, x), atol=1e-5)
    with pytest.raises(common.UserError):  # a 4-class file into a 9-class net: one line
        torch.save(m.build_model("tiny", 4).state_dict(), tmp_path / "acdc.pth")
        m.load_released_weights(m.build_model("tiny", 9), tmp_path / "acdc.pth")


# ---- Eqs. (1)-(3): stage 1 ----

def test_eq1_eq2_eq3_reconstruction_loss():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    x_hat = torch.zeros(1, 1, 2, 2)
    assert m.mse_loss(x, x_hat).item() == pytest.approx(7.5)  # (1 + 4 + 9 + 16) / 4
    assert m.l1_loss(x, x_hat).item() == pytest.approx(2.5)  # (1 + 2 + 3 + 4) / 4
    assert m.recon_loss(x, x_hat).item() == pytest.approx(5.5)  # 0.6 * 7.5 + 0.4 * 2.5
    with pytest.raises(AssertionError):  # no silent broadcasting
        m.mse_loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 1, 2, 2))


def test_recon_targets_paper_and_code():
    labels = torch.tensor([[[0, 2], [1, 2]]])  # (1, 2, 2)
    images = torch.arange(12.0).view(1, 3, 2, 2)
    gt = m.recon_target(labels, images, 3, "gt")  # paper: one-hot GT (1, 3, 2, 2)
    assert gt.shape == (1, 3, 2, 2) and gt[0, 2].tolist() == [[0, 1], [0, 1]]
    image = m.recon_target(labels, images, 3, "image")  # code: image on every channel
    assert image.shape == (1, 3, 2, 2) and torch.equal(image[0, 2], images[0, 0])


# ---- Eqs. (4)-(7): three-level cross-feature alignment ----

def fake_output(encoder_values, decoder_values, mid_value):
    """UNetOutput with constant features of the tiny preset's shapes (levels differ)."""
    enc_shapes = [(1, 8, 16, 16), (1, 16, 8, 8), (1, 32, 4, 4), (1, 64, 2, 2)]
    dec_shapes = [(1, 32, 4, 4), (1, 16, 8, 8), (1, 8, 16, 16)]
    encoder = [torch.full(s, float(v)) for s, v in zip(enc_shapes, encoder_values)]
    decoder = [torch.full(s, float(v)) for s, v in zip(dec_shapes, decoder_values)]
    return m.UNetOutput(torch.zeros(1, 9, 32, 32), torch.full((1, 64, 2, 2), mid_value),
                        encoder, decoder)


def test_eq4_single_term_is_a_mean_over_h_w_c():
    f_recon, f_seg = torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)
    f_seg[0, 1, 0, 1] = 2.0  # one element differs by 2: 2^2 / (2 * 2 * 2) = 0.5
    assert m.feature_mse(f_recon, f_seg).item() == pytest.approx(0.5)


def test_eq4_to_eq7_pairings_and_average():
    seg = fake_output([0, 0, 0, 0], [0, 0, 0], 0.0)
    rec = fake_output([3, 2, 1, 7], [0.5, 1, 2], 4.0)
    l_align, terms = m.alignment_loss(seg, rec)
    # Eq. (4), l = 1 deepest: rec x4 (1) vs seg u1; l = 2: x3 (2); l = 3: x2 (3) -> 1, 4, 9
    assert [terms[f"e2d{l}"].item() for l in (1, 2, 3)] == [1, 4, 9]
    # Eq. (5): rec u1 (0.5), u2 (1), u3 (2) vs seg x4, x3, x2 -> 0.25, 1, 4
    assert [terms[f"d2e{l}"].item() for l in (1, 2, 3)] == [0.25, 1, 4]
    assert terms["mid"].item() == 16  # Eq. (6): bottleneck 4 vs 0; x5 (7) is not used here
    assert l_align.item() == pytest.approx((14 + 5.25 + 16) / 3)  # Eq. (7): 11.75
    only_mid, terms = m.alignment_loss(seg, rec, groups=["mid"])  # Fig. 4(a) ablation
    assert set(terms) == {"mid"} and only_mid.item() == pytest.approx(16 / 3)


def test_eq8_total_loss_and_tranunet_dice():
    logits = torch.zeros(1, 2, 2, 2)  # uniform: p = 0.5 everywhere
    labels = torch.zeros(1, 2, 2, dtype=torch.long)
    # class 0: 1 - (2*2)/(1 + 4) = 0.2; class 1: 1 - 0/(1 + 0) = 1 -> mean 0.6
    assert m.dice_loss(logits, labels).item() == pytest.approx(0.6, abs=1e-5)
    l_seg = m.seg_loss(logits, labels).item()
    assert l_seg == pytest.approx(0.5 * math.log(2) + 0.5 * 0.6, abs=1e-5)
    seg = fake_output([0, 0, 0, 0], [0, 0, 0], 0.0)
    seg = m.UNetOutput(logits.expand(1, 2, 2, 2), seg.mid, seg.encoder, seg.decoder)
    rec = fake_output([3, 2, 1, 7], [0.5, 1, 2], 4.0)
    total, align = m.total_loss(seg, labels, rec, lam=0.035)
    assert align == pytest.approx(11.75)
    assert total.item() == pytest.approx(l_seg + 0.035 * 11.75, abs=1e-5)
    baseline, align = m.total_loss(seg, labels, rec, lam=0.0)  # --lam 0: plain U-Net
    assert align == 0.0 and baseline.item() == pytest.approx(l_seg, abs=1e-6)


def test_one_stage2_step_lowers_the_loss():
    torch.manual_seed(0)
    seg = m.build_model("tiny", 9)
    rec = m.build_model("tiny", 9, role="recon").requires_grad_(False).eval()
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 9, (4, 32, 32))
    optimizer = torch.optim.SGD(seg.parameters(), lr=0.05, momentum=0.9)
    with torch.no_grad():
        r = rec(y)
    losses = []
    for _ in range(3):
        loss, _ = m.total_loss(seg(x), y, r)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in rec.parameters())  # the frozen net gets no gradient


def test_transunet_augment_moves_image_and_label_together():
    import random
    labels = np.arange(36).reshape(6, 6) % 5
    for seed in range(12):
        image, out = m.transunet_augment(labels.astype(np.float32), labels, random.Random(seed))
        assert image.shape == (6, 6) and np.array_equal(image, out.astype(np.float32))


def test_paper_values_have_sources():
    source = (ROOT / "reseg_unet.py").read_text()
    block = source[source.index("PAPER_RECIPE = {"):source.index("# Toy demo")]
    block += source[source.index('"paper": Preset('):source.index('"small": Preset(')]
    for line in block.splitlines()[1:]:
        if ":" in line or "=" in line:
            assert re.search(r"# (Sec\.|spec|Tab\.)", line), line


# ---- the command line ----

def read_log(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    m.main(TINY + ["--epochs", "1", "--recon-epochs", "1", "--out", str(out)])
    return out


def test_cli_run_writes_every_file(run_dir):
    for name in ("config.json", "log.csv", "recon_last.pt", "recon_best.pt", "last.pt",
                 "best.pt", "test_metrics.json"):
        assert (run_dir / name).is_file(), name
    assert len(list((run_dir / "predictions").glob("*.png"))) >= 3
    metrics = json.loads((run_dir / "test_metrics.json").read_text())["toy"]
    assert {"mean_dice", "mean_hd95", "dice_vessel", "hd95_pouch"} <= set(metrics)
    assert [(r["stage"], r["epoch"]) for r in read_log(run_dir / "log.csv")] == [
        ("recon", "0"), ("seg", "0")]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["recon_target"] == "gt" and config["mid_feature"] == "bottleneck"


def test_eval_reproduces_test_metrics(run_dir, tmp_path):
    metrics = m.main(["--eval", str(run_dir / "best.pt"), "--out", str(tmp_path)])
    saved = json.loads((run_dir / "test_metrics.json").read_text())
    assert metrics["toy"] == pytest.approx(saved["toy"], nan_ok=True)  # nan: organ never seen


def test_resume_continues_each_stage(run_dir, tmp_path):
    import shutil
    folder = tmp_path / "run"
    shutil.copytree(run_dir, folder)
    m.main(["--resume", str(folder / "last.pt"), "--epochs", "2"])  # stage 2 at epoch 1
    rows = [(r["stage"], r["epoch"]) for r in read_log(folder / "log.csv")]
    assert rows == [("recon", "0"), ("seg", "0"), ("seg", "1")]
    assert torch.load(folder / "last.pt", weights_only=False)["epoch"] == 1
    again = tmp_path / "again"
    shutil.copytree(run_dir, again)
    m.main(["--resume", str(again / "recon_last.pt"), "--recon-epochs", "2"])  # stage 1 at 1
    rows = [(r["stage"], r["epoch"]) for r in read_log(again / "log.csv")]
    assert rows == [("recon", "0"), ("seg", "0"), ("recon", "1"), ("seg", "0")]


def test_stage_seg_with_authors_recon_weights_and_switches(run_dir, tmp_path):
    state = torch.load(run_dir / "recon_last.pt", weights_only=False)["model"]
    torch.save(state, tmp_path / "epoch_149.pth")  # a plain state_dict, as the authors save
    out = tmp_path / "seg"
    m.main(TINY + ["--stage", "seg", "--recon-ckpt", str(tmp_path / "epoch_149.pth"),
                   "--epochs", "1", "--as-released", "--align-groups", "e2d,mid",
                   "--out", str(out)])
    config = json.loads((out / "config.json").read_text())
    assert (config["recon_target"], config["mid_feature"], config["recon_bn"]) == (
        "image", "up1", "batch")
    assert float(read_log(out / "log.csv")[0]["train_align"]) > 0
    assert not (out / "recon_last.pt").exists()


def test_baseline_lam0_skips_stage1(tmp_path):
    m.main(TINY + ["--lam", "0", "--epochs", "1", "--out", str(tmp_path)])
    assert not (tmp_path / "recon_last.pt").exists() and (tmp_path / "best.pt").exists()
    assert float(read_log(tmp_path / "log.csv")[0]["train_align"]) == 0


def test_predict_writes_one_png_per_image(run_dir, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        image, _ = common.make_toy_multiclass(i, 40)
        common.save_mask_png(images / f"im{i}.png", image > 0.5)
    out = tmp_path / "out"
    m.main(["--predict", str(images), "--checkpoint", str(run_dir / "best.pt"),
            "--out", str(out)])
    written = sorted(p.name for p in (out / "predictions").glob("*.png"))
    assert written == ["im0.png", "im1.png", "im2.png"]
    assert common.load_label_map(out / "predictions" / "im0.png").shape == (40, 40)


def test_bench_prints_one_record(tmp_path):
    record = m.main(["--bench", "--preset", "tiny", "--img-size", "32", "--batch-size", "2",
                     "--out", str(tmp_path)])
    assert record["params_M"] == pytest.approx(0.122, abs=1e-3)
    assert record["train_images_per_s"] > 0 and record["inference_images_per_s"] > 0


@pytest.mark.parametrize("flags,culprit", [
    (["--data", "/no/such/folder"], "/no/such/folder"),
    (["--eval", "{bad}"], "bad.pt"),
    (["--stage", "seg"], "--recon-ckpt"),
])
def test_bad_input_exits_with_one_line(tmp_path, flags, culprit):
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    flags = [f.replace("{bad}", str(bad)) for f in flags]
    result = subprocess.run([sys.executable, str(ROOT / "reseg_unet.py"), *TINY,
                             "--epochs", "1", "--out", str(tmp_path / "o"), *flags],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and culprit in lines[0]


def test_notebook_executes(monkeypatch):
    import nbformat
    from nbclient import NotebookClient
    path = ROOT / "notebooks" / "reseg_unet.ipynb"
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:  # FAST mode, as committed
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            assert "FAST = True" in cell.source
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel's threads, as one_thread() above
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
