"""Tests of mfel.py: block shapes, one hand-checkable case per equation, the CLI run folder."""
import json
import math
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
                                      {"afm": "concat", "bfm": "sum"}])
def test_model_outputs(switches):
    out = mfel.build_model("tiny", **switches)(torch.rand(2, 3, 32, 32))
    assert out["logits"].shape == (2, 1, 32, 32)
    if switches.get("fiir", True):
        for key in ("recon_fg", "recon_bg", "recon_image", "image_fg", "image_bg"):
            assert out[key].shape == (2, 3, 32, 32)
        assert set(out["mask_split"].unique().tolist()) <= {0.0, 1.0}
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
    image = torch.full((1, 3, 2, 2), 2.0)
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    image_fg, image_bg = mfel.split_foreground_background(image, mask)
    assert image_fg.shape == (1, 3, 2, 2)
    assert torch.equal(image_fg[0, 0], torch.tensor([[2.0, 0.0], [0.0, 2.0]]))
    assert torch.equal(image_bg[0, 2], torch.tensor([[0.0, 2.0], [2.0, 0.0]]))


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


def test_eq6_residuals_and_value_pairing():
    torch.manual_seed(1)
    block = mfel.BidirectionalFusion(8, head_dim=4, kv_grid=0).eval()
    f_s, f_r_hat = torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4)
    for conv in (block.c11_s, block.c11_r):  # C11 = 0: F~ = the un-normalised input streams
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
    expected = block.fuse(torch.cat([f_r_hat, f_s], 1))
    assert torch.allclose(block(f_s, f_r_hat), expected, atol=1e-6)
    # a spatially constant F^_r gives identical keys K_r, so Attn_r is uniform and C11_s receives
    # the mean of the paired values for every token: V_r (one distinct token, the spec's
    # pairing) or V_s (the printed Eq. 6)
    captured = {}
    block.c11_s.register_forward_hook(lambda m, i, o: captured.update(x=i[0]))
    constant = torch.randn(1, 8, 1, 1).expand(1, 8, 4, 4)
    v_r = block.kv_r(block.norm_kv_r(constant[..., 0, 0]))[0, 8:]  # (C,)
    v_s = block.kv_s(block.norm_kv_s(f_s.flatten(2).transpose(1, 2)))[0, :, 8:].mean(0)
    for literal, values in ((False, v_r), (True, v_s)):
        block.literal_eq6 = literal
        block(f_s, constant)
        assert torch.allclose(captured["x"][0], values[:, None, None].expand(8, 4, 4),
                              atol=1e-5)


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
    image, target = torch.full((1, 3, 2, 2), 0.5), torch.ones(1, 1, 2, 2)
    zeros = torch.zeros(1, 3, 2, 2)
    out = {"logits": torch.zeros(1, 1, 2, 2), "coarse_logits": torch.zeros(1, 1, 2, 2),
           "recon_fg": zeros, "image_fg": zeros, "recon_bg": zeros, "image_bg": zeros,
           "recon_image": image}  # L_rec = 0; L_mask = L_coarse = ln 2 + 2/7
    loss, parts = mfel.total_loss(out, image, target, coarse_weight=0.5)
    mask = math.log(2) + 2 / 7
    assert loss.item() == pytest.approx(1.5 * mask) and parts["rec"] == 0.0
    loss, parts = mfel.total_loss({"logits": out["logits"]}, image, target)
    assert loss.item() == pytest.approx(mask) and set(parts) == {"mask"}


class FixedPrediction(nn.Module):
    """A stand-in model whose logits are +10 on `pred` and -10 elsewhere."""

    def __init__(self, pred):
        super().__init__()
        self.pred = pred

    def forward(self, image, mask=None):
        return {"logits": (self.pred * 20 - 10).expand(image.shape[0], 1, -1, -1)}


class TinySet(torch.utils.data.Dataset):
    """Two identical 4x4 images with one ground-truth mask."""

    def __init__(self, gt):
        self.gt, self.names = gt, ["a", "b"]

    def __len__(self):
        return 2

    def full(self, index):
        return np.zeros((4, 4, 3), np.uint8), self.gt.numpy().astype(bool)

    def __getitem__(self, index):
        return {"image": torch.zeros(3, 4, 4), "mask": self.gt[None].float(), "index": index}


@pytest.mark.parametrize("mode", ["per-image", "global"])
@pytest.mark.parametrize("resolution", ["network", "original"])
def test_eq14_to_eq17_metrics(mode, resolution, tmp_path):
    # prediction 2 pixels, ground truth 3, overlap 1: TP 1, FP 1, FN 2 ->
    # precision 1/2, recall 1/3, F1 = 2 / (2 + 1 + 2) = 0.4, IoU = 1 / 4
    pred, gt = torch.zeros(4, 4), torch.zeros(4, 4)
    pred[0, :2] = 1
    gt[0, 1:4] = 1
    scores = mfel.evaluate(FixedPrediction(pred), TinySet(gt), torch.device("cpu"), mode,
                           resolution, save_dir=tmp_path)
    assert scores == pytest.approx({"F1": 40.0, "IoU": 25.0, "Precision": 50.0,
                                    "Recall": 100 / 3})
    assert sorted(p.name for p in tmp_path.glob("*.png"))[:2] == ["a.png", "a_overlay.png"]


def test_warmup_cosine_schedule():
    lr, low = 1e-3, 1e-5
    f = [mfel.warmup_cosine(s, 110, 10, lr, low) for s in (0, 5, 10, 60, 110)]
    assert f[0] * lr == pytest.approx(low) and f[2] == pytest.approx(1.0)
    assert f[1] * lr == pytest.approx((low + lr) / 2)
    assert f[3] * lr == pytest.approx((low + lr) / 2) and f[4] * lr == pytest.approx(low)


def test_model_uses_the_given_mask_for_eq1():
    model = mfel.build_model("tiny").eval()
    image, mask = torch.rand(1, 3, 32, 32), torch.zeros(1, 1, 32, 32)
    mask[..., :16] = 1
    out = model(image, mask)
    assert torch.equal(out["mask_split"], mask)
    assert torch.equal(out["image_fg"][..., 16:], torch.zeros(1, 3, 32, 16))


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
    assert args.img_size == 128 and args.instance  # Sec. 4.1.1: GlaS at 128x128
    assert mfel.parse_args(["--data", str(tmp_path), "--img-size", "64"]).img_size == 64


# ---- command line ----

def test_cli_run_resume_eval_predict(tmp_path):
    out = tmp_path / "run"
    external = common.write_toy(tmp_path / "ph2", n=3, size=40, seed=5)
    args = TINY + ["--epochs", "1", "--limit-batches", "2", "--test-data", str(external)]
    metrics = mfel.main(args + ["--out", str(out)])
    for name in ("config.json", "log.csv", "last.pt", "best.pt", "test_metrics.json"):
        assert (out / name).is_file(), name
    assert set(metrics) == {"toy", "ph2"} and 0 <= metrics["toy"]["F1"] <= 100
    assert len(list((out / "predictions" / "toy").glob("*_overlay.png"))) == 6
    assert len(list((out / "predictions" / "ph2").glob("toy_*[0-9].png"))) == 3

    mfel.main(TINY + ["--epochs", "2", "--limit-batches", "2", "--resume", str(out / "last.pt"),
                      "--out", str(out)])
    assert [row.split(",")[0] for row in (out / "log.csv").read_text().splitlines()] == \
        ["epoch", "0", "1"]
    assert torch.load(out / "last.pt", weights_only=False)["epoch"] == 1

    saved = json.loads((out / "test_metrics.json").read_text())
    again = mfel.main(["--eval", str(out / "best.pt"), "--out", str(tmp_path / "eval")])
    assert again["toy"] == pytest.approx(saved["toy"])
    only_external = mfel.main(["--eval", str(out / "best.pt"), "--test-data", str(external),
                               "--oracle", "--out", str(tmp_path / "ext")])
    assert set(only_external) == {"ph2", "NOT_REPORTABLE"}

    result = mfel.main(["--predict", str(external / "images"), "--checkpoint",
                        str(out / "best.pt"), "--out", str(tmp_path / "pred")])
    masks = sorted((tmp_path / "pred" / "predictions").glob("*.png"))
    assert result["predicted"] == 3 and len(masks) == 3
    assert np.asarray(common.Image.open(masks[0])).shape == (40, 40)


def test_pretrained_path_and_bench(tmp_path):
    model = mfel.build_model("tiny")
    common.save_checkpoint(tmp_path / "weights.pt", {"model": model.state_dict()})
    args = TINY + ["--epochs", "1", "--limit-batches", "1", "--out", str(tmp_path / "run"),
                   "--pretrained", str(tmp_path / "weights.pt"), "--no-em", "--afm", "sum"]
    with pytest.raises(common.UserError, match="does not fit"):
        mfel.main(args)  # --no-em and --afm sum drop parameters the file has
    record = mfel.main(TINY + ["--bench", "--out", str(tmp_path / "bench")])
    assert record["params_M"] == pytest.approx(0.676, abs=1e-3)
    assert record["train_images_per_s"] > 0 and record["img_size"] == 32


@pytest.mark.parametrize("argv,culprit", [
    (["--data", "/no/such/folder"], "/no/such/folder"),
    (["--eval", "README.md"], "README.md"),
    (["--img-size", "30"], "--img-size"),
    (["--no-fiir", "--oracle"], "--no-fiir"),
])
def test_bad_inputs_exit_with_one_line(argv, culprit, tmp_path):
    if argv[0] == "--eval":
        (tmp_path / "README.md").write_text("not a checkpoint")
        argv = ["--eval", str(tmp_path / "README.md")]
    result = subprocess.run([sys.executable, str(ROOT / "mfel.py"), *argv, "--out",
                             str(tmp_path / "run")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and culprit in lines[0]


def test_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel inherits it; see small_toy_sets
    import nbformat
    from nbclient import NotebookClient
    path = ROOT / "notebooks" / "mfel.ipynb"
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            cell.source += "\nFAST = True\nRUN_DIR = " + repr(str(tmp_path / "nb_run"))
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
