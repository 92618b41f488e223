"""Tests of how mfel.py is wired: forward hooks on every block of Fig. 1, the fusion module's two
halves, AFM with random weights, the ablation switches (each changes what it names and nothing
else), detach, per-image reductions and the two metric modes at both resolutions."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import mfel

BLOCKS = ("encoder_seg", "encoder_fg", "encoder_bg", "encoder_rec", "coarse_head",
          "afm.0", "afm.1", "afm.2", "bfm.0", "bfm.1", "bfm.2", "em",
          "decoder_fg", "decoder_bg", "decoder_rec", "decoder_seg")


def record(model, names=BLOCKS):
    """Forward hooks: seen[name] = (inputs, output) of each named block that exists."""
    seen, modules = {}, dict(model.named_modules())

    def hook(name):
        return lambda module, inputs, output: seen.__setitem__(name, (inputs, output))
    for name in names:
        if name in modules:
            modules[name].register_forward_hook(hook(name))
    return seen


def same(a, b):
    """Tensors, or lists of tensors, exactly equal."""
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a.shape == b.shape and torch.equal(a, b)


def halves_mask():
    """A different mask per sample (B = 2, non-square 32 x 24)."""
    mask = torch.zeros(2, 1, 32, 24)
    mask[0, :, :16] = 1
    mask[1, :, :, 8:20] = 1
    return mask


# ---- Fig. 1: each block receives the tensors the figure says ----

def test_every_block_receives_what_fig1_says():
    model = mfel.build_model("tiny").eval()
    image, mask = torch.rand(2, 3, 32, 24), halves_mask()
    seen = record(model)
    out = model(image, mask)
    assert set(seen) == set(BLOCKS)  # nothing bypassed (e.g. EM while its flag is on)
    for name in ("encoder_seg", "encoder_rec"):  # Sec. 3.2.1 and spec G4: the whole image I_s
        assert same(seen[name][0][0], image), name
    assert same(seen["encoder_fg"][0][0], image * mask)  # Eq. (1): I_f
    assert same(seen["encoder_bg"][0][0], image * (1 - mask))  # Eq. (1): I_b
    f_s, f_f, f_b, f_r = (seen[f"encoder_{k}"][1] for k in ("seg", "fg", "bg", "rec"))
    f_r_hat = [seen[f"afm.{i}"][1] for i in range(3)]
    f_s_bar = [seen[f"bfm.{i}"][1] for i in range(3)]
    for i in range(3):
        assert same(list(seen[f"afm.{i}"][0]), [f_r[i], f_f[i], f_b[i]]), i  # Eq. (3)
        assert same(list(seen[f"bfm.{i}"][0]), [f_s[i], f_r_hat[i]]), i  # Eqs. (5)-(6)
    assert same(seen["coarse_head"][0][0], f_s[2])  # spec G5: the coarse mask from F_s^3
    assert same(seen["decoder_fg"][0][0], f_f) and same(seen["decoder_bg"][0][0], f_b)  # Eq. 2
    assert same(seen["decoder_rec"][0][0], f_r_hat)  # Eq. (4): the modulated features
    assert same(seen["em"][0][0], f_s_bar[2])  # Sec. 3.2.2: EM takes F-_s^3
    assert same(seen["decoder_seg"][0][0], [f_s_bar[0], f_s_bar[1], seen["em"][1]])
    for key, name in (("recon_fg", "decoder_fg"), ("recon_bg", "decoder_bg"),
                      ("recon_image", "decoder_rec"), ("logits", "decoder_seg")):
        assert same(out[key], seen[name][1]), key
    assert same(out["mask_split"], mask) and not torch.equal(f_f[2][0], f_b[2][0])


def test_the_coarse_mask_feeds_eq1():
    model = mfel.build_model("tiny").eval()
    image = torch.rand(2, 3, 32, 24)
    with torch.no_grad():  # spread and centre the coarse logits so that I_m has both values
        model.coarse_head.weight *= 1000
        model.coarse_head.bias -= model(image)["coarse_logits"].median() - 0.01
    seen = record(model)
    out = model(image)
    mask = out["mask_split"]
    assert 0 < mask.mean() < 1 and not torch.equal(mask[0], mask[1])
    assert same(mask, (out["coarse_logits"] > 0).float())  # sigmoid > 0.5, thresholded
    up = nn.functional.interpolate(seen["coarse_head"][1], size=(32, 24), mode="bilinear")
    assert torch.allclose(out["coarse_logits"], up)
    assert same(seen["encoder_fg"][0][0], image * mask)
    assert same(seen["encoder_bg"][0][0], image * (1 - mask))


def test_coarse_head_learns_from_l_coarse_alone():
    # Eq. 1's threshold must pass no gradient: with L_coarse weighted 0 the coarse head gets none
    model = mfel.build_model("tiny")
    image = torch.rand(2, 3, 32, 24)
    target = halves_mask()
    for weight in (0.0, 1.0):
        model.zero_grad(set_to_none=True)
        loss, _ = mfel.total_loss(model(image), image, target, coarse_weight=weight)
        loss.backward()
        grad = model.coarse_head.weight.grad
        head_moves = grad is not None and grad.abs().sum() > 0
        assert head_moves == (weight > 0), weight
        assert model.encoder_fg.blocks[0][0].weight.grad.abs().sum() > 0
    # L_coarse alone is deep supervision of F_s^3: it reaches E_s, and nothing of FIIR
    model.zero_grad(set_to_none=True)
    mfel.loss_mask(model(image)["coarse_logits"], target).backward()
    assert model.encoder_seg.blocks[2][0].weight.grad.abs().sum() > 0
    assert model.encoder_fg.blocks[0][0].weight.grad is None


# ---- Eq. (3): AFM with random weights ----

def test_eq3_afm_with_random_weights():
    afm = mfel.AdaptiveFeatureModulation(4)
    for p in afm.parameters():
        nn.init.normal_(p, std=0.5)
    f_r, f_f, f_b = torch.randn(3, 2, 4, 3, 5).unbind(0)
    seen = {}
    afm.alpha_stream.register_forward_hook(lambda m, i, o: seen.update(g=i[0], alpha=o))
    afm.beta_stream.register_forward_hook(lambda m, i, o: seen.update(beta=o))
    out = afm(f_r, f_f, f_b)
    # GAP over the concatenation [F_r, F_f, F_b] (Sec. 3.1.2), one descriptor per image
    pooled = torch.cat([f_r, f_f, f_b], 1).mean((2, 3), keepdim=True)
    assert seen["g"].shape == (2, 12, 1, 1) and torch.allclose(seen["g"], pooled, atol=1e-6)
    alpha, beta = seen["alpha"], seen["beta"]
    assert alpha.shape == beta.shape == (2, 4, 1, 1)
    assert ((0 < alpha) & (alpha < 1)).all() and alpha.flatten().unique().numel() == 8
    assert torch.allclose(out, (1 + alpha) * f_r + beta, atol=1e-6)  # Eq. (3)
    for k in (1, 2):  # F_f and F_b each move alpha and beta
        moved = [f_r, f_f, f_b]
        moved[k] = moved[k] + 1.0
        assert not torch.allclose(afm(*moved), out, atol=1e-3), k


# ---- Eqs. (5)-(6): both halves of the fusion module ----

@pytest.mark.parametrize("literal", [False, True])
@pytest.mark.parametrize("constant", ["f_s", "f_r_hat"])
def test_bfm_each_half_reads_the_other_stream(constant, literal):
    # A spatially constant stream gives identical tokens. As key/value source it makes the
    # other stream's attention uniform: every token of that half's C11 input is the mean of the
    # values it weighs. As query source it makes its own half's rows identical.
    torch.manual_seed(3)
    block = mfel.BidirectionalFusion(8, head_dim=4, kv_grid=0, literal_eq6=literal).eval()
    varied = torch.randn(2, 8, 3, 5)
    flat = torch.randn(2, 8, 1, 1).expand(2, 8, 3, 5)
    f_s, f_r_hat = (flat, varied) if constant == "f_s" else (varied, flat)
    seen = {}
    block.c11_s.register_forward_hook(lambda m, i, o: seen.update(s=i[0]))
    block.c11_r.register_forward_hook(lambda m, i, o: seen.update(r=i[0]))
    block(f_s, f_r_hat)
    v_r = block.kv_r(block.norm_kv_r(f_r_hat.flatten(2).transpose(1, 2)))[..., 8:].mean(1)
    v_s = block.kv_s(block.norm_kv_s(f_s.flatten(2).transpose(1, 2)))[..., 8:].mean(1)
    if constant == "f_s":  # K_s identical: Attn_s (reconstruction queries) is uniform
        half, values = seen["r"], (v_r if literal else v_s)
    else:  # K_r identical: Attn_r (segmentation queries) is uniform
        half, values = seen["s"], (v_s if literal else v_r)
    assert half.shape == (2, 8, 3, 5)
    assert torch.allclose(half, values[..., None, None].expand(2, 8, 3, 5), atol=1e-5)
    # the other half: queries from the constant stream, keys varied -> identical rows that are
    # not the uniform mean
    other = seen["s"] if constant == "f_s" else seen["r"]
    assert torch.allclose(other, other[..., :1, :1].expand_as(other), atol=1e-5)


def test_bfm_literal_eq6_only_swaps_the_values():
    torch.manual_seed(4)
    block = mfel.BidirectionalFusion(8, head_dim=4, kv_grid=2).eval()
    f_s, f_r_hat = torch.randn(2, 2, 8, 4, 6).unbind(0)
    spec = block(f_s, f_r_hat)
    block.literal_eq6 = True
    assert not torch.allclose(block(f_s, f_r_hat), spec, atol=1e-4)


# ---- ablation switches: each changes what it names, nothing else ----

ABLATIONS = [  # (switches, reference switches, the blocks it names, the loss terms it drops)
    ({"fiir": False}, {}, {"encoder_fg", "encoder_bg", "encoder_rec", "afm", "bfm",
                           "decoder_fg", "decoder_bg", "decoder_rec"}, {"rec"}),
    ({"fiir": False, "coarse_head": False}, {"fiir": False}, {"coarse_head"}, {"coarse"}),
    ({"afm": "sum"}, {}, {"afm"}, set()),
    ({"afm": "concat"}, {}, {"afm"}, set()),
    ({"bfm": "sum"}, {}, {"bfm"}, set()),
    ({"bfm": "concat"}, {}, {"bfm"}, set()),
    ({"em": False}, {}, {"em"}, set()),
    ({"literal_eq6": True}, {}, set(), set()),
    ({"kv_grid": 2}, {}, set(), set()),
]
DOWNSTREAM = {"afm": {"afm", "bfm", "decoder_rec", "em", "decoder_seg"},  # what a block feeds
              "bfm": {"bfm", "em", "decoder_seg"}, "em": {"em", "decoder_seg"},
              "coarse_head": {"coarse_head"}}


@pytest.mark.parametrize("switches,reference,named,dropped", ABLATIONS)
def test_each_ablation_changes_only_what_it_names(switches, reference, named, dropped):
    torch.manual_seed(5)
    full = mfel.build_model("tiny", **reference).eval()
    ablated = mfel.build_model("tiny", **switches).eval()
    a, b = full.state_dict(), ablated.state_dict()
    changed = {k.split(".")[0] for k in set(a) ^ set(b)}
    assert changed <= named and (changed or not named)  # parameters: only the named blocks
    assert all(a[k].shape == b[k].shape for k in set(a) & set(b))
    ablated.load_state_dict({k: a[k] for k in set(a) & set(b)}, strict=False)
    image, target = torch.rand(2, 3, 32, 24), halves_mask()
    seen_a, seen_b = record(full), record(ablated)
    out_a, out_b = full(image), ablated(image)
    affected = set().union(*(DOWNSTREAM.get(n, {n}) for n in named)) | {"decoder_seg"}
    if "bfm" in switches or "literal_eq6" in switches or "kv_grid" in switches:
        affected |= {"bfm", "em", "decoder_seg"}
    for name in set(seen_a) & set(seen_b):  # upstream of the switch: identical
        if name.split(".")[0] not in affected:
            assert same(seen_a[name][1], seen_b[name][1]), name
    if named != {"coarse_head"}:  # the segmentation output changes
        assert not torch.allclose(out_a["logits"], out_b["logits"], atol=1e-5)
    else:  # the coarse head feeds nothing without FIIR: same logits, one loss term less
        assert same(out_a["logits"], out_b["logits"])
    parts_a = mfel.total_loss(out_a, image, target)[1]
    parts_b = mfel.total_loss(out_b, image, target)[1]
    assert set(parts_a) - set(parts_b) == dropped and set(parts_b) <= set(parts_a)
    assert parts_a["mask"] != parts_b["mask"] or named == {"coarse_head"}


def test_no_coarse_head_needs_no_fiir():
    with pytest.raises(mfel.common.UserError, match="--no-coarse-head needs --no-fiir"):
        mfel.build_model("tiny", coarse_head=False)


# ---- mask sources: the ground truth reaches Eq. 1 only where asked ----

class Spy(nn.Module):
    """Records the mask argument; logits that depend on one weight."""

    def __init__(self):
        super().__init__()
        self.w, self.masks = nn.Parameter(torch.zeros(1)), []

    def forward(self, image, mask=None):
        self.masks.append(mask)
        return {"logits": image[:, :1] * self.w}


def loader_of(image, target):
    return [{"image": image, "mask": target, "index": torch.arange(len(image))}]


@pytest.mark.parametrize("source", ["coarse", "gt"])
def test_mask_source_train(source):
    spy, image, target = Spy(), torch.rand(2, 3, 4, 6), halves_mask()[..., :4, :6]
    optimizer = torch.optim.SGD(spy.parameters(), lr=0.1)
    mfel.train_one_epoch(spy, loader_of(image, target), optimizer, lambda step: 0.1,
                         torch.device("cpu"), source)
    assert (spy.masks[0] is None) == (source == "coarse")
    if source == "gt":
        assert same(spy.masks[0], target)


@pytest.mark.parametrize("oracle", [False, True])
def test_mask_source_eval(oracle):
    spy, target = Spy(), halves_mask()[..., :4, :6]
    dataset = [{"image": torch.rand(3, 4, 6), "mask": target[i], "index": i} for i in range(2)]
    mfel.evaluate(spy, dataset, torch.device("cpu"), oracle=oracle, batch_size=2)
    assert (spy.masks[0] is not None) == oracle
    if oracle:
        assert same(spy.masks[0], target)


# ---- Eq. (12) per image, on a batch of two different masks ----

def test_eq12_dice_per_image_batch_of_two():
    # logits 0: p = 1/2 on 2 x 3 pixels. Image 1 all foreground: (2*3 + 1) / (3 + 6 + 1) = 7/10;
    # image 2 empty: (0 + 1) / (3 + 0 + 1) = 1/4. Mean 0.475 -> L_dice 0.525 (a batch-pooled
    # Dice would give 1 - 7/13). BCE of p = 1/2 is ln 2 for every pixel.
    logits = torch.zeros(2, 1, 2, 3)
    target = torch.stack([torch.ones(1, 2, 3), torch.zeros(1, 2, 3)])
    assert mfel.dice_loss(logits, target).item() == pytest.approx(0.525)
    # BCE mean over pixels: image 2 logits ln 3 (p = 3/4) on its empty mask: -ln(1/4) each
    logits[1] = math.log(3)
    bce = (6 * math.log(2) + 6 * math.log(4)) / 12
    assert mfel.bce_loss(logits, target).item() == pytest.approx(bce)
    dice = 1 - (0.7 + 1 / (6 * 0.75 + 1)) / 2  # image 2: sum p = 4.5
    assert mfel.loss_mask(logits, target).item() == pytest.approx(bce + dice)


# ---- Eqs. (14)-(17): two different images, per image / global, network / original size ----

class FromImage(nn.Module):
    """Logits +10 where the image's first channel is 1, -10 elsewhere."""

    def forward(self, image, mask=None):
        return {"logits": image[:, :1] * 20 - 10}


class TwoImages(torch.utils.data.Dataset):
    """Network size 4 x 4; original size 8 x 4 (rows doubled), whose mask holds one pixel more
    for image a than the row-doubled network mask (a detail lost in the resize)."""

    def __init__(self):
        self.pred, self.gt = torch.zeros(2, 4, 4), torch.zeros(2, 4, 4)
        self.pred[0, 0, :2] = 1  # a: 2 predicted pixels, 3 true ones, overlap 1
        self.gt[0, 0, 1:] = 1
        self.pred[1, 1:3] = 1  # b: 8 predicted, 6 true, all inside the prediction
        self.gt[1, 1] = 1
        self.gt[1, 2, :2] = 1
        self.full_gt = self.gt.repeat_interleave(2, dim=1).bool()
        self.full_gt[0, 1, 0] = True
        self.names = ["a", "b"]

    def __len__(self):
        return 2

    def full(self, index):
        return np.zeros((8, 4, 3), np.uint8), self.full_gt[index].numpy()

    def __getitem__(self, index):
        image = self.pred[index][None].expand(3, 4, 4)
        return {"image": image, "mask": self.gt[index][None], "index": index}


def test_eq14_to_eq17_two_images_both_modes_both_resolutions(tmp_path):
    # network size. a: TP 1, FP 1, FN 2 -> F1 2/5, IoU 1/4, P 1/2, R 1/3.
    #               b: TP 6, FP 2, FN 0 -> F1 6/7, IoU 3/4, P 3/4, R 1.
    #   per image: F1 (2/5 + 6/7)/2 = 44/70, IoU 1/2, P 5/8, R 2/3
    #   global:    TP 7, FP 3, FN 2 -> F1 14/19, IoU 7/12, P 7/10, R 7/9
    # original size (every count doubles, plus one extra true pixel of a inside its prediction):
    #   a: TP 3, FP 1, FN 4 -> F1 6/11, IoU 3/8, P 3/4, R 3/7; b: TP 12, FP 4, FN 0 (as above)
    #   per image: F1 (6/11 + 6/7)/2 = 54/77, IoU 9/16, P 3/4, R 5/7
    #   global:    TP 15, FP 5, FN 4 -> F1 10/13, IoU 5/8, P 3/4, R 15/19
    expected = {
        "network": {"per-image": (44 / 70, 1 / 2, 5 / 8, 2 / 3),
                    "global": (14 / 19, 7 / 12, 7 / 10, 7 / 9)},
        "original": {"per-image": (54 / 77, 9 / 16, 3 / 4, 5 / 7),
                     "global": (10 / 13, 5 / 8, 3 / 4, 15 / 19)}}
    for resolution, modes in expected.items():
        scores = mfel.evaluate(FromImage(), TwoImages(), torch.device("cpu"), resolution,
                               batch_size=2, save_dir=tmp_path / resolution)
        for mode, values in modes.items():
            want = dict(zip(("F1", "IoU", "Precision", "Recall"), (100 * v for v in values)))
            assert scores[mode] == pytest.approx(want), (resolution, mode)
        saved = np.asarray(mfel.common.Image.open(tmp_path / resolution / "a.png"))
        assert saved.shape == (8, 4) and (saved > 0).sum() == 4  # original size, rows doubled
