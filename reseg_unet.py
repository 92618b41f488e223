"""ReSeg-UNet: reconstruction-guided two-stage optimisation of a U-Net, in one file.

Li, Tang, Chu, Yang, Yu, "ReSeg-UNet: A Reconstruction-Guided Optimization Framework for Enhanced
Medical Image Segmentation", MICCAI 2025. Code: https://github.com/Li-gzhu/ReSeg-UNet (UNet.zip;
only the U-Net variant is released; its facts are in ../shared/specs/reseg_unet.md, "spec n").

Idea. Stage 1 trains a U-Net to reconstruct the image from the ground-truth label map (0.6 MSE
+ 0.4 L1), then freezes it. Stage 2 trains a second U-Net to segment, its features pulled towards
the frozen net's features of the same slice's label map, crosswise: recon encoder <-> seg decoder,
recon decoder <-> seg encoder, and the bottlenecks. Inference is the plain U-Net.

Equation map (paper number -> code):
    Eq. (1) -> mse_loss
    Eq. (2) -> l1_loss
    Eq. (3) -> recon_loss
    Eq. (4) -> alignment_loss (Recon-E -> Seg-D pairs, each by feature_mse)
    Eq. (5) -> alignment_loss (Recon-D -> Seg-E pairs)
    Eq. (6) -> alignment_loss (middle pair)
    Eq. (7) -> alignment_loss (sum of the terms / 3)
    Eq. (8) -> total_loss (L_Seg = 0.5 CE + 0.5 Dice by seg_loss, dice_loss)
The metrics (Dice, HD95 per volume and organ) are common.VolumeMeter's (common.dice, common.hd95).

Symbols (B batch, K classes, level l = 1 deepest .. 3 shallowest, spec 3.2):
    (stage-1 input)        labels                      (B, H, W) ids, read as intensities
    x_hat                  recon_target(...)           (B, K, H, W): the slice on K channels
    x                      recon-net logits            (B, K, H, W)
    alpha, beta            --alpha, --beta             0.6, 0.4 (Eq. 3)
    F^l_{Recon-E}          rec.encoder[3 - l]          (B, C_l, H/2^(4-l), W/2^(4-l))
    F^l_{Seg-D}            seg.decoder[l - 1]          same shape as F^l_{Recon-E}
    F^l_{Recon-D}, F^l_{Seg-E}  rec.decoder[l - 1], seg.encoder[3 - l]
    F_in                   .mid: x5 (bottleneck, (B, 16 C_1, H/16, W/16)) or u1 (authors)
    lambda                 --lam                       0.035 (Eq. 8)

Protocol, one row per data set (the row that applies is printed at start-up):
  [synapse] Tab. 1. Split: TransUNet's lists, 18 train volumes (2,211 slices) / 12 test
    volumes, no validation (spec 6.1). Weights: none, the U-Net is trained from scratch (Sec.
    3.2). Recipe, each stage: stage 1 150 epochs (--recon-epochs), stage 2 150 (--epochs);
    batch 24; SGD lr 0.01, momentum 0.9, wd 1e-4, poly 0.9 per iteration; 224 x 224;
    TransUNet's augmentation (rot90 + flip, or +-20 deg) and cubic resize (spec 5). Tested: the
    last epoch (the authors hand-picked one, spec 6.3). Evaluation: per volume and organ, Dice
    and HD95 in voxels, TransUNet's test (cubic in, nearest out, empty-organ rule), mean over
    volumes, then over the 8 organs.
  [acdc] Tab. 2. Split: MT-UNet's package, 70 / 10 / 20 cases (paper: 1,930 train slices; the
    package has 1,304, spec 2.4). Weights: none. Recipe: as Synapse; stage 2 150 epochs, the
    paper's "baseline's" (the authors' script: 400, --epochs 400). Tested: best validation Dice
    (ours; the authors chose by test score, spec 6.3). Evaluation: per volume Dice of RV, Myo,
    LV, as Synapse.
  [other] Your data (not in the paper). Split: the layout's own, or a seeded --val-fraction of
    train. K = 1 + the largest label id in every label map, counted at discovery. Weights: none.
    Recipe and evaluation: as Synapse. Tested: best validation Dice, else the last epoch.
  [toy] Built-in Synapse-like slices (ours). Split: 400 / 48 / 48 slices. Weights: none. Recipe:
    stage 1 2 epochs, stage 2 6, batch 8, lr 0.05, 64 x 64, no augmentation. Tested: best
    validation Dice. Evaluation: one-slice volumes, organs absent from both maps skipped.
  Reproducing Tab. 1 as the authors ran it: add `--as-released` (= `--mid-feature up1`; the
  other two defaults below already are the authors').

Readings of the paper and departures, each with its switch:
  - Stage-1 target: the image (default). Sec. 2.2 feeds the GT in for "image reconstruction" of
    the "ground truth image", keeping "edge and texture features" (a label map has none); the
    authors' code regresses the CT/MR slice on all K channels (spec 2.1; RGB: the channel mean).
    `--recon-target gt`: x_hat is the one-hot label map (GT -> GT).
  - Eq. (6): the bottleneck x5 (default; Sec. 2.3 "the bottleneck layer"). The authors' code
    aligns u1, which Eq. (4) already pulls (spec 3.2): `--mid-feature up1`, behind Tab. 1.
  - Frozen net's BatchNorm: batch statistics (default, the authors' code, spec 2.4); the paper's
    "frozen" (no parameter updates) holds either way. `--recon-bn eval`: running statistics.
  - Fig. 4(a) ablations (`--align-groups`) keep Eq. (7)'s division by 3 (the paper is silent).
  - Stage 2 loads the *final* stage-1 weights (recon_last.pt), as the authors' code does.
  - Slices resized as TransUNet (scipy zoom: cubic image, nearest labels) in training and test
    (common's resize="cubic"); `--resize bilinear`: common's torch resize. Augmentation draws
    from the dataset's `random.Random` (TransUNet: NumPy); off on toy data (flips swap L/R).
  - Paired baseline (ours): stage 2 draws its initial weights and data order from its own seed,
    so `--lam 0` (no stage 1) starts stage 2 as the ReSeg run does; `--compare` runs both.
  - No schedule in checkpoints: each iteration's lr comes from (iteration, epochs), so
    `--resume --epochs LARGER` follows the new total from the next epoch on.
  - Toy test "volumes" are one slice missing 0-4 organs: VolumeMeter's "skip" rule (absent from
    prediction and truth: left out); TransUNet's (Dice 0) on real data.

Run:
    python reseg_unet.py                      # toy data, both stages: ~2 min on an idle 2-core CPU
    python reseg_unet.py --compare            # ReSeg and the --lam 0 baseline, paired; Delta
    python reseg_unet.py --data data/Synapse --dataset synapse    # Tab. 1 recipe (150 + 150)
    python reseg_unet.py --data data/Synapse --as-released        # the authors' exact variant
    python reseg_unet.py --data ACDC --dataset acdc --epochs 400  # the authors' ACDC stage 2
    python reseg_unet.py --stage recon --recon-epochs 150 --out runs/r            # stage 1 only
    python reseg_unet.py --stage seg --recon-ckpt runs/r/recon_last.pt            # stage 2 only
    python reseg_unet.py --eval runs/reseg_unet/<time>/best.pt
    python reseg_unet.py --predict my_pngs/ --checkpoint best.pt
    python reseg_unet.py --bench                                      # paper preset, 224 x 224
"""
import os
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (common.py)

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import namedtuple  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402

SCRIPT = "reseg_unet"

# ==== 2. Presets and the paper's recipe ====

@dataclass(frozen=True)
class Preset:
    """U-Net size: channels of inc, down1 .. down4 (the decoder mirrors them)."""
    widths: tuple
    in_channels: int = 3  # grayscale repeated to 3 channels, as the authors' n_channels=3


PRESETS = {
    "paper": Preset(widths=(64, 128, 256, 512, 1024), in_channels=3),  # spec 1.2, 1.3; Sec. 3.2
    "small": Preset(widths=(16, 32, 64, 128, 256)),  # CPU toy demo
    "tiny": Preset(widths=(4, 8, 16, 32, 64)),  # tests: every code path, in seconds
}

PAPER_RECIPE = {
    "epochs": 150,  # spec 5.1: stage 2 on Synapse (authors' ACDC script: 400)
    "recon_epochs": 150,  # spec 2.3: stage 1, both data sets
    "batch_size": 24,  # Sec. 3.2 (baseline's recipe) = spec 5.1
    "lr": 0.01,  # Sec. 3.2 (baseline's recipe) = spec 5.1, SGD
    "momentum": 0.9,  # spec 5.1
    "weight_decay": 1e-4,  # spec 5.1
    "poly_power": 0.9,  # spec 5.1: lr = lr0 (1 - it / max_it)^0.9 per iteration
    "img_size": 224,  # Sec. 3.2
    "alpha": 0.6,  # Sec. 2.2, Eq. (3)
    "beta": 0.4,  # Sec. 2.2, Eq. (3)
    "lam": 0.035,  # Sec. 2.3, Eq. (8)
    "ce_weight": 0.5,  # Sec. 3.2 (TransUNet's L_Seg) = spec 3.4
    "dice_weight": 0.5,  # Sec. 3.2 (TransUNet's L_Seg) = spec 3.4
}

# Toy demo: 2-core CPU, both stages in about 3 minutes, test mean Dice >= 0.80.
TOY_RECIPE = {"epochs": 6, "recon_epochs": 2, "batch_size": 8, "lr": 0.05, "img_size": 64,
              "toy_sizes": (400, 48, 48)}

CLASS_NAMES = {  # label ids 1 .. K-1 (Synapse: TransUNet's order, spec 6.1)
    "synapse": ["aorta", "gallbladder", "kidney L", "kidney R", "liver", "pancreas", "spleen",
                "stomach"],
    "acdc": ["RV", "Myo", "LV"],  # spec 6.2
    "toy": common.TOY_CLASS_NAMES,
}

# ==== 3. Building blocks (the authors' U-Net parts, spec 1.1) ====
# The paper only says "U-Net" (Sec. 3.2); the released one is milesial/Pytorch-UNet with bias-free
# 3x3 convs, and the names below give its state_dict keys. Every block ends in BN + ReLU: stage 2
# aligns non-negative activations, raw (no projection, no normalisation; spec 3.2).

class DoubleConv(nn.Module):
    """(conv 3x3 without bias -> BN -> ReLU) x 2; spec 1.1. (B, C_in, H, W) -> (B, C_out, H, W)."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.double_conv = nn.Sequential(  # indices 0, 1, 3, 4 are the released state-dict keys
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.double_conv(x)


class Down(nn.Module):
    """Max-pool 2x2 then DoubleConv; spec 1.1. (B, C_in, H, W) -> (B, C_out, H/2, W/2)."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))

    def forward(self, x):
        return self.maxpool_conv(x)


class Up(nn.Module):
    """Transposed conv up, pad to the skip, concat [skip, up], DoubleConv; spec 1.1.
    deep (B, C_in, h, w), skip (B, C_in/2, 2h, 2w) -> (B, C_out, 2h, 2w)."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, 2, stride=2)
        self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, deep, skip):
        up = self.up(deep)  # (B, C_in/2, 2h, 2w)
        dy, dx = skip.shape[2] - up.shape[2], skip.shape[3] - up.shape[3]  # odd sizes only
        up = F.pad(up, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([skip, up], dim=1))  # skip first, as released


class OutConv(nn.Module):
    """1x1 conv to the K class logits, no activation; spec 1.1."""

    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, x):
        return self.conv(x)


# ==== 4. Model ====
# The authors' 4-tuple, named: encoder [x2..x5] shallow -> deep, decoder [u1..u3] deep -> shallow
UNetOutput = namedtuple("UNetOutput", "logits mid encoder decoder")


class ReSegUNet(nn.Module):
    """The U-Net used for both branches (Fig. 1; the authors' UNet_se and UNet_hd, spec 1).

    role "seg" takes the image (B, 1 or 3, H, W); role "recon" the label map (B, H, W), its raw
    ids 0 .. K-1 as intensities (spec 1.3). Returns a UNetOutput of the DoubleConv outputs that
    Eqs. (4)-(6) align; `mid_feature` picks F_in. Both roles share one layout (Sec. 2.2), so the
    encoder of one and the decoder of the other meet at equal shapes: the cross pairs.
    """

    def __init__(self, num_classes, widths=(64, 128, 256, 512, 1024), in_channels=3,
                 role="seg", mid_feature="bottleneck"):
        super().__init__()
        if role not in ("seg", "recon") or mid_feature not in ("bottleneck", "up1"):
            raise ValueError(f"role {role!r} / mid_feature {mid_feature!r}")
        c1, c2, c3, c4, c5 = widths
        self.role, self.mid_feature, self.in_channels = role, mid_feature, in_channels
        self.inc = DoubleConv(in_channels, c1)
        self.down1, self.down2 = Down(c1, c2), Down(c2, c3)
        self.down3, self.down4 = Down(c3, c4), Down(c4, c5)
        self.up1, self.up2 = Up(c5, c4), Up(c4, c3)
        self.up3, self.up4 = Up(c3, c2), Up(c2, c1)
        self.outc = OutConv(c1, num_classes)

    def forward(self, x):
        if self.role == "recon":
            x = x[:, None].float()  # (B, 1, H, W): class ids as intensities, not one-hot
        if x.shape[1] == 1:
            x = x.repeat(1, self.in_channels, 1, 1)  # (B, 3, H, W)
        x1 = self.inc(x)  # (B, C_1, H, W)
        x2 = self.down1(x1)  # (B, C_2, H/2, W/2)
        x3 = self.down2(x2)  # (B, C_3, H/4, W/4)
        x4 = self.down3(x3)  # (B, C_4, H/8, W/8)
        x5 = self.down4(x4)  # (B, C_5, H/16, W/16): the bottleneck
        u1 = self.up1(x5, x4)  # (B, C_4, H/8, W/8)
        u2 = self.up2(u1, x3)  # (B, C_3, H/4, W/4)
        u3 = self.up3(u2, x2)  # (B, C_2, H/2, W/2)
        u4 = self.up4(u3, x1)  # (B, C_1, H, W)
        logits = self.outc(u4)  # (B, K, H, W)
        mid = x5 if self.mid_feature == "bottleneck" else u1  # Sec. 2.3 vs spec 3.2
        return UNetOutput(logits, mid, [x2, x3, x4, x5], [u1, u2, u3])


def build_model(preset="paper", num_classes=9, role="seg", as_released=False, **overrides):
    """The U-Net of a preset; `as_released=True`: the authors' (Eq. (6) on u1). The 118
    state-dict keys are the released ones at any preset (strict loading). Overrides: widths,
    in_channels, mid_feature."""
    if preset not in PRESETS:
        common.fail(f"unknown preset '{preset}' (paper, small or tiny)")
    settings = asdict(PRESETS[preset])
    settings["mid_feature"] = "up1" if as_released else "bottleneck"
    settings.update(overrides)
    return ReSegUNet(num_classes, role=role, **settings)


def load_released_weights(model, path, flag="--pretrained"):
    """Load the authors' plain state_dict (epoch_149.pth; DataParallel's 'module.' dropped) or
    one under 'model'; strict keys and shapes. Never runs code from the file: a pickled full
    model or a list is refused in one line."""
    obj = common.load_weights(path, flag)
    tensors = common.tensor_dict(obj)
    if not tensors:
        common.fail(f"{flag} {path}: holds a {type(obj).__name__}, not a state_dict of tensors "
                    "(save model.state_dict(), not the model or a list)")
    try:
        model.load_state_dict({k.removeprefix("module."): v for k, v in tensors.items()})
    except RuntimeError as error:
        common.fail(f"{flag} {path}: does not fit this U-Net: "
                    f"{str(error).splitlines()[1].strip()}")
    return model


# ==== 5. Losses ====
# Stage 1 minimises Eq. (3), stage 2 Eq. (8). Every reduction is a mean over batch, channels and
# pixels (the authors' F.mse_loss / nn.L1Loss), so lambda = 0.035 keeps its meaning at any size.

def mse_loss(x, x_hat):
    """Mean squared error over H x W x C (and the batch); x, x_hat (B, C, H, W)."""
    assert x.shape == x_hat.shape, (x.shape, x_hat.shape)
    return ((x - x_hat) ** 2).mean()  # Eq. (1)  L_MSE = 1/(HWC) sum (x - x_hat)^2


def l1_loss(x, x_hat):
    """Mean absolute error over H x W x C (and the batch); x, x_hat (B, C, H, W)."""
    assert x.shape == x_hat.shape, (x.shape, x_hat.shape)
    return (x - x_hat).abs().mean()  # Eq. (2)  L_L1 = 1/(HWC) sum |x - x_hat|


def recon_loss(x, x_hat, alpha=0.6, beta=0.4):
    """Stage-1 loss, Sec. 2.2: x the reconstruction, x_hat the target, both (B, C, H, W)."""
    return alpha * mse_loss(x, x_hat) + beta * l1_loss(x, x_hat)  # Eq. (3)  a L_MSE + b L_L1


def recon_target(labels, images, num_classes, target="image"):
    """x_hat of Eqs. (1)-(3), (B, K, H, W) float: the images (B, 3, H, W) on every channel
    (code, default) or the one-hot GT of labels (B, H, W) int."""
    if target == "gt":  # the GT -> GT reading of Sec. 2.2
        return F.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()  # (B, K, H, W)
    gray = images.float().mean(dim=1, keepdim=True)  # (B, 1, H, W): the slice (RGB: the mean)
    return gray.expand(-1, num_classes, -1, -1)  # (B, K, H, W), broadcast as the authors do


def feature_mse(f_recon, f_seg):
    """1/(H_l W_l C_l) ||F_recon - F_seg||^2, averaged over the batch (spec 3.3); raw features."""
    assert f_recon.shape == f_seg.shape, (f_recon.shape, f_seg.shape)
    return ((f_recon.float() - f_seg.float()) ** 2).mean()  # fp32 also under --amp


ALIGN_GROUPS = ("e2d", "d2e", "mid")  # Recon-E -> Seg-D, Recon-D -> Seg-E, middle (Fig. 4(a))


def alignment_loss(seg, rec, groups=ALIGN_GROUPS):
    """Three-level cross-feature alignment, Sec. 2.3; seg, rec are UNetOutputs of equal shapes.

    Level l = 1 is the deepest (spec 3.2): Recon-E^1 is x4, Seg-D^1 is u1, both (B, C_4, H/8,
    W/8). The frozen net's features are constants. Returns (L_align, dict of the terms).
    Crosswise, so both halves of the seg U-Net get a target from the label map's clean anatomy
    (Sec. 2.3, Fig. 1(b)).
    """
    terms = {}
    for level in (1, 2, 3):
        if "e2d" in groups:  # Eq. (4)  F^l_Recon-E vs F^l_Seg-D
            terms[f"e2d{level}"] = feature_mse(rec.encoder[3 - level], seg.decoder[level - 1])
        if "d2e" in groups:  # Eq. (5)  F^l_Recon-D vs F^l_Seg-E
            terms[f"d2e{level}"] = feature_mse(rec.decoder[level - 1], seg.encoder[3 - level])
    if "mid" in groups:
        terms["mid"] = feature_mse(rec.mid, seg.mid)  # Eq. (6)  F_Recon-in vs F_Seg-in
    l_align = sum(terms.values()) / 3  # Eq. (7)  L_align = (sum_l (E->D + D->E) + in) / 3
    return l_align, terms


def dice_loss(logits, labels, eps=1e-5):
    """TransUNet's soft Dice loss (spec 3.4): softmax, one-hot incl. background, squared sums.
    logits (B, K, H, W), labels (B, H, W); per class over the whole batch
    d_c = 1 - (2 sum p g + eps) / (sum p^2 + sum g^2 + eps), then the mean over the K classes.
    """
    p = logits.float().softmax(dim=1)  # (B, K, H, W)
    g = F.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2).float()  # (B, K, H, W)
    dims = (0, 2, 3)
    d = 1 - (2 * (p * g).sum(dims) + eps) / ((p * p).sum(dims) + (g * g).sum(dims) + eps)
    return d.mean()


def seg_loss(logits, labels, ce_weight=0.5, dice_weight=0.5):
    """L_Seg of Eq. (8): the baseline's CE + Dice (TransUNet: 0.5 each, spec 3.4)."""
    ce = F.cross_entropy(logits.float(), labels)  # Eq. (8), L_Seg cross-entropy term
    return ce_weight * ce + dice_weight * dice_loss(logits, labels)  # Eq. (8), L_Seg


def total_loss(seg, labels, rec=None, lam=0.035, groups=ALIGN_GROUPS, ce_weight=0.5,
               dice_weight=0.5):
    """Stage-2 objective, Sec. 2.3; rec None or lam 0: the plain baseline. Returns (L_total,
    L_align as a float for logging)."""
    l_seg = seg_loss(seg.logits, labels, ce_weight, dice_weight)
    if rec is None or lam == 0 or not groups:
        return l_seg, 0.0
    l_align, _ = alignment_loss(seg, rec, groups)
    return l_seg + lam * l_align, l_align.item()  # Eq. (8)  L_total = L_Seg + lambda L_align


# ==== 6. Data handling: TransUNet's augmentation, class names, test cases ====
# common.load_data reads every layout; ReSeg's own are the baseline's augmentation (Sec. 3.2:
# "identical to the baseline") and the organ names of the paper's tables.

def transunet_augment(image, label, rng):
    """TransUNet's RandomGenerator (spec 5.2) on a float slice (H, W) and its labels (H, W):
    p = 0.5 rot90 by k in {0..3} then a flip; else p = 0.5 rotate by an integer angle in [-20,
    19] degrees, nearest-neighbour for image and label alike."""
    from scipy.ndimage import rotate
    if rng.random() > 0.5:
        k, axis = rng.randrange(4), rng.randrange(2)
        image, label = np.flip(np.rot90(image, k), axis), np.flip(np.rot90(label, k), axis)
    elif rng.random() > 0.5:
        angle = rng.randrange(-20, 20)
        image = rotate(image, angle, order=0, reshape=False)
        label = rotate(label, angle, order=0, reshape=False)
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def dataset_kind(args):
    """synapse / acdc / toy / other: --dataset, else the data folder's name."""
    if args.dataset != "auto":
        return args.dataset
    lowered = str(args.data).lower()
    return ("toy" if args.data == "toy" else "synapse" if "synapse" in lowered
            else "acdc" if "acdc" in lowered else "other")


def resolve_classes(args, data):
    """(K, class names, note): the paper's names, or K = 1 + the largest id in any label map
    (common.count_labels). Named data are not scanned; train_one_epoch stops with one line at a
    batch holding an id >= K."""
    kind = dataset_kind(args)
    if kind in CLASS_NAMES:
        names = CLASS_NAMES[kind]
        return len(names) + 1, names, f"{kind} classes"
    sets = [s for s in (data["train"], data["val"], *data["test"].values()) if s is not None]
    k = common.count_labels([f for s in sets for f in (s.files if hasattr(s, "files")  # npz, h5
                                                       else [p["masks"][0] for p in s.pairs])])
    return k, [f"class{c}" for c in range(1, k)], "counted in every label map"


def protocol_row(kind):
    """The docstring's protocol row for a data-set kind (synapse, acdc, other, toy), one line."""
    row = re.search(rf"\n  \[{kind}\] (.*?)\n(?!    )", __doc__, re.S).group(1)
    return f"protocol [{kind}] " + " ".join(row.split())


def test_cases(dataset):
    """Yield (image, labels, name) per test case: a volume (D, H, W) float, or one RGB image."""
    for index in range(len(dataset)):
        if hasattr(dataset, "full"):  # a folder of image / label-map PNGs
            yield (*dataset.full(index), dataset.names[index])
        else:  # VolumeDataset, or the toy set's one-slice volumes
            yield dataset.volume(index) if hasattr(dataset, "volume") else dataset[index]


def display_slice(image):
    """A gray slice or RGB image as uint8 (H, W, 3) for overlays (min-max scaled if float)."""
    if image.dtype == np.uint8:
        return image
    gray = (image - image.min()) / max(float(image.max() - image.min()), 1e-8)
    return np.repeat((gray[..., None] * 255).astype(np.uint8), 3, axis=2)


# ==== 7. Train, evaluate, predict ====

def autocast(device, enabled):
    """Mixed precision context (fp16 on CUDA, bf16 on CPU), a no-op when disabled."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


def poly_lr(base_lr, iteration, total_iterations, power=0.9):
    """Poly decay of spec 5.1: lr = lr_0 (1 - it / max_it)^power, per iteration."""
    return base_lr * max(0.0, 1 - iteration / total_iterations) ** power


def train_one_epoch(model, loader, optimizer, device, args, stage="seg", recon_net=None,
                    scaler=None, show=True, iteration=0, total_iterations=1):
    """One epoch of stage 1 (`stage="recon"`, model = recon net) or stage 2 (model = seg net).

    In stage 2 the frozen `recon_net` gets the same batch's augmented label maps (spec 3.1), so
    it runs only in training. Each step's lr comes from (iteration, total_iterations), never
    stored: a resumed run follows a new --epochs. Returns {'loss', 'align'}, batch means.
    """
    model.train()
    if recon_net is not None:  # batch statistics (code, spec 2.4) or the running ones
        recon_net.train(args.recon_bn == "batch")
    scaler = scaler or torch.amp.GradScaler(enabled=False)
    totals, count = {"loss": 0.0, "align": 0.0}, 0
    for step, batch in enumerate(common.progress(loader, f"{stage} train", show)):
        if args.limit_batches and step >= args.limit_batches:
            break
        common.set_lr(optimizer, poly_lr(args.lr, iteration + step, total_iterations,
                                  PAPER_RECIPE["poly_power"]))
        images, labels = batch["image"].to(device), batch["mask"].to(device)  # (B, 3 | -, H, W)
        if int(labels.max()) >= args.num_classes:
            common.fail(f"--data {args.data}: a label map holds id {int(labels.max())}, but "
                        f"{args.num_classes} classes were set (--dataset {args.dataset})")
        with autocast(device, args.amp):
            if stage == "recon":  # Fig. 1(a): the label map in, the target out
                x = model(labels).logits.float()  # (B, K, H, W)
                x_hat = recon_target(labels, images, x.shape[1], args.recon_target)
                loss, align = recon_loss(x, x_hat, args.alpha, args.beta), 0.0
            else:  # Fig. 1(b): the image into the seg net, its label map into the frozen net
                seg = model(images)
                rec = None
                if recon_net is not None:
                    with torch.no_grad():  # constant targets; the frozen net gets no gradient
                        rec = recon_net(labels)
                loss, align = total_loss(seg, labels, rec, args.lam, args.align_groups,
                                         PAPER_RECIPE["ce_weight"], PAPER_RECIPE["dice_weight"])
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        totals["loss"] += loss.item()
        totals["align"] += align
        count += 1
    return {k: v / max(count, 1) for k, v in totals.items()}


@torch.no_grad()
def validate(model, dataset, args, device, stage="seg"):
    """Validation score: mean stage-1 loss (recon), or the pooled foreground Dice (seg)."""
    model.eval()
    k, loss_sum, count = args.num_classes, 0.0, 0
    inter, total = torch.zeros(k), torch.zeros(k)
    for batch in common.make_loader(dataset, args.batch_size, train=False):
        images, labels = batch["image"].to(device), batch["mask"].to(device)
        if stage == "recon":
            x_hat = recon_target(labels, images, k, args.recon_target)
            loss = recon_loss(model(labels).logits, x_hat, args.alpha, args.beta)
            loss_sum, count = loss_sum + float(loss) * len(labels), count + len(labels)
            continue
        pred = model(images).logits.argmax(1)  # (B, H, W)
        for c in range(1, k):
            inter[c] += ((pred == c) & (labels == c)).sum().item()
            total[c] += ((pred == c).sum() + (labels == c).sum()).item()
    if stage == "recon":
        return loss_sum / max(count, 1)
    present = total[1:] > 0
    return float((2 * inter[1:][present] / total[1:][present]).mean()) if present.any() else 0.0


@torch.no_grad()
def predict(model, image, img_size, device, rgb=False, resize="cubic"):
    """Label map of one test case at its own size, slice by slice (TransUNet's test, spec 6.3).

    A volume (D, H, W) float (or a slice (H, W)) -> (D, H, W) int64 by common.predict_volume
    (`resize` cubic or bilinear); rgb=True: a uint8 (H, W, 3) image, normalised as in training.
    """
    model.eval()
    logits_fn = lambda x: model(x).logits  # noqa: E731  (n, 3, S, S) -> (n, K, S, S)
    if rgb:
        x = common.resize_image(image, img_size).astype(np.float32) / 255.0
        x = (x - np.array(common.IMAGENET_MEAN)) / np.array(common.IMAGENET_STD)
        x = torch.from_numpy(x.transpose(2, 0, 1)).float()[None].to(device)  # (1, 3, S, S)
        pred = logits_fn(x).argmax(1)[0].cpu().numpy()  # (S, S)
        return common.resize_mask(pred, 0, image.shape[:2])
    volume = image[None] if image.ndim == 2 else image
    return common.predict_volume(logits_fn, volume, img_size, 3, device, resize=resize)


def evaluate(model, dataset, args, device, pred_dir=None, max_overlays=50):
    """The paper's columns (Tab. 1, 2): Dice and HD95 (voxels) per volume and organ, averaged
    by common.VolumeMeter, TransUNet's empty-organ rule (spec 6.3; "skip" on toy volumes).
    Writes one label PNG per slice and up to `max_overlays` overlays into `pred_dir`, if given.
    """
    convention = "skip" if args.data == "toy" else "transunet"  # docstring, deviations
    meter = common.VolumeMeter(args.num_classes, args.class_names, None, convention)
    rgb = isinstance(dataset, common.PairDataset)
    overlays = 0
    for image, labels, name in test_cases(dataset):
        pred = predict(model, image, args.img_size, device, rgb, args.resize).reshape(labels.shape)
        meter.update(pred, labels)
        if pred_dir is None:
            continue
        slices = [(image, pred, labels)] if rgb or labels.ndim == 2 else zip(image, pred, labels)
        for depth, (picture, p, g) in enumerate(slices):
            stem = name if rgb or labels.ndim == 2 or len(labels) == 1 else f"{name}_{depth:03d}"
            common.save_label_png(Path(pred_dir) / f"{stem}.png", p)
            if overlays < max_overlays and g.any():
                common.save_overlay(Path(pred_dir) / f"{stem}_overlay.png",
                                    display_slice(picture), p, g)
                overlays += 1
    return meter.compute()


def predict_folder(args, saved, run):
    """--predict DIR: one label-map PNG per image in DIR, from a stage-2 checkpoint."""
    files, model = common.list_images(args.predict), seg_net(args, saved["model"], run.device)
    rgb = args.input_kind == "rgb"  # trained on PNG pairs; else CT/MR slices, gray in [0, 1]
    for path in files:
        image = common.load_image(path)  # (H, W, 3) uint8
        image = image if rgb else image.mean(axis=2).astype(np.float32) / 255.0
        labels = predict(model, image, args.img_size, run.device, rgb, args.resize)
        common.save_label_png(run.out / "predictions" / f"{path.stem}.png",
                              labels.reshape(image.shape[:2]))
    run.log(f"wrote {len(files)} label maps to {run.out / 'predictions'}")
    run.close()
    return {"predicted": len(files), "folder": str(run.out / "predictions")}


# ==== 8. Command line and the two-stage training run ====

def build_parser():
    """The shared flags plus the paper's switches (ablations and the authors' variants)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    common.add_common_args(parser, PAPER_RECIPE, "Sec. 3.2 / spec 5.1")
    add = parser.add_argument_group("ReSeg-UNet switches").add_argument
    add("--stage", choices=["both", "recon", "seg"], default="both", help="stage(s) to train")
    add("--recon-ckpt", metavar="FILE", help="stage-1 weights for --stage seg (ours or authors')")
    add("--recon-epochs", type=int, help="stage-1 epochs (paper: 150, spec 2.3)")
    add("--dataset", choices=["auto", "synapse", "acdc", "toy"], default="auto",
        help="class names and count (auto: from the data folder's name)")
    add("--lam", type=float, default=PAPER_RECIPE["lam"],
        help="lambda of Eq. (8); 0 = plain U-Net baseline (paper: 0.035)")
    add("--align-groups", default="e2d,d2e,mid",
        help="Fig. 4(a): which of e2d (Eq. 4), d2e (Eq. 5), mid (Eq. 6) are on")
    add("--alpha", type=float, default=PAPER_RECIPE["alpha"], help="MSE weight, Eq. (3) (0.6)")
    add("--beta", type=float, default=PAPER_RECIPE["beta"], help="L1 weight, Eq. (3) (0.4)")
    add("--recon-target", choices=["image", "gt"],
        help="stage-1 target: image (Sec. 2.2 + authors' code, default) or gt")
    add("--mid-feature", choices=["bottleneck", "up1"],
        help="F_in of Eq. (6): bottleneck (paper, default) or up1 (authors')")
    add("--recon-bn", choices=["batch", "eval"],
        help="frozen net's BN: batch statistics (authors' code, default) or eval")
    add("--as-released", action="store_true", help="the authors' code (= --mid-feature up1)")
    add("--compare", action="store_true", help="ReSeg and the paired --lam 0 baseline; Delta")
    add("--resize", choices=["cubic", "bilinear"], default="cubic",
        help="slice resizing: cubic (TransUNet's, spec 5.2 / 6.3) or bilinear")
    add("--augment", choices=["auto", "on", "off"], default="auto",
        help="TransUNet augmentation (auto: on for real data, off for toy)")
    add("--toy-sizes", metavar="TRAIN,VAL,TEST", help=f"toy set sizes ({TOY_RECIPE['toy_sizes']})")
    return parser


def finish_method_args(args):
    """Resolve the paper switches after common.finish_args; stop on bad values."""
    args.recon_target, args.recon_bn = args.recon_target or "image", args.recon_bn or "batch"
    args.mid_feature = args.mid_feature or ("up1" if args.as_released else "bottleneck")
    if args.recon_epochs is None:
        args.recon_epochs = (TOY_RECIPE if args.data == "toy" else PAPER_RECIPE)["recon_epochs"]
    if args.recon_epochs < 1:
        common.fail(f"--recon-epochs must be at least 1 (got {args.recon_epochs})")
    if isinstance(args.align_groups, str):
        args.align_groups = [g for g in args.align_groups.split(",") if g]
    unknown = set(args.align_groups) - set(ALIGN_GROUPS)
    if unknown:
        common.fail(f"--align-groups: unknown {sorted(unknown)} (choose from e2d, d2e, mid)")
    if args.lam < 0:
        common.fail(f"--lam must be >= 0 (got {args.lam})")
    sizes = args.toy_sizes or TOY_RECIPE["toy_sizes"]
    sizes = [str(n).strip() for n in (sizes.split(",") if isinstance(sizes, str) else sizes)]
    if len(sizes) != 3 or not all(n.isdigit() and int(n) > 0 for n in sizes):
        common.fail(f"--toy-sizes {args.toy_sizes}: give three positive counts, e.g. 80,8,8")
    args.toy_sizes = tuple(int(n) for n in sizes)
    args.aligned = args.lam > 0 and bool(args.align_groups)
    if args.stage == "recon" and not args.aligned:
        common.fail("--stage recon with --lam 0 (or no --align-groups): nothing to train")
    if args.stage == "seg" and args.aligned and not (args.recon_ckpt or args.resume):
        common.fail("--stage seg needs --recon-ckpt FILE (stage-1 weights), or --lam 0 for "
                    "the plain baseline")
    return args


ARCHITECTURE = ("num_classes", "class_names", "input_kind")  # with the preset: the network


def load_recon_net(args, path, flag="--recon-ckpt"):
    """The frozen stage-1 network: our recon checkpoint (stage and architecture checked) or
    the authors' plain state_dict (strict keys and shapes)."""
    net = build_model(args.preset, args.num_classes, role="recon", mid_feature=args.mid_feature)
    obj = common.load_weights(path, flag)
    if not (isinstance(obj, dict) and "script" in obj):  # not ours: the authors' epoch_149.pth
        return load_released_weights(net, path, flag).requires_grad_(False)
    state = common.load_checkpoint(path, SCRIPT, flag, stage="recon")
    common.adopt_config(args, state, ["num_classes"], set(), flag, check_only=True, path=path)
    net.load_state_dict(state["model"])
    return net.requires_grad_(False)


def stage_seed(args, stage):
    """Each stage's own seed: stage 2 starts alike whether or not stage 1 ran (paired --lam 0)."""
    return args.seed + {"recon": 1_000, "seg": 2_000}[stage]


def new_model(args, role):
    """A freshly initialised U-Net for a stage, drawn from that stage's seed."""
    common.seed_everything(stage_seed(args, "recon" if role == "recon" else "seg"))
    return build_model(args.preset, args.num_classes, role=role, mid_feature=args.mid_feature)


def run_stage(stage, model, data, args, run, recon_net=None, resume=None):
    """The training loop of one stage: recon_last / recon_best.pt, or last / best.pt.

    Both stages use one recipe (spec 2.3, 3.5): fresh SGD + momentum, poly decay per iteration,
    data order and augmentation from the stage's seed. best: the lowest stage-1 loss / highest
    stage-2 Dice on validation, else the last epoch. `--resume` of either file continues it.
    """
    recon = stage == "recon"
    epochs = args.recon_epochs if recon else args.epochs
    if run.distributed:
        model = nn.parallel.DistributedDataParallel(model)
    # the frozen net is not part of `model`, so it never moves
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=PAPER_RECIPE["momentum"],
                                weight_decay=PAPER_RECIPE["weight_decay"])
    loader = common.make_loader(data["train"], args.batch_size, train=True,  # reseeds the rng
                                workers=args.workers, seed=stage_seed(args, stage))
    per_epoch = min(len(loader), args.limit_batches or len(loader))
    scaler = torch.amp.GradScaler(enabled=args.amp and run.device.type == "cuda")
    prefix, run.best, start = "recon_" if recon else "", None, 0  # each stage its own best
    if resume is not None:
        start = run.restore(resume, model, optimizer, scaler, prefix=prefix, epochs=epochs)
    run.log(f"stage '{stage}': {epochs} epochs x {per_epoch} iterations, lr {args.lr}")
    for epoch in range(start, epochs):
        if hasattr(loader.sampler, "set_epoch"):  # torchrun: a new shard order each epoch
            loader.sampler.set_epoch(epoch)
        tic = time.time()
        lr = poly_lr(args.lr, epoch * per_epoch, epochs * per_epoch, PAPER_RECIPE["poly_power"])
        train = train_one_epoch(model, loader, optimizer, run.device, args, stage, recon_net,
                                scaler, run.is_main, epoch * per_epoch, epochs * per_epoch)
        score = None
        if data["val"] is not None and run.is_main:
            score = validate(common.unwrap(model), data["val"], args, run.device, stage)
        row = {"stage": stage, "epoch": epoch, "lr": lr, "train_loss": train["loss"],
               "train_align": train["align"], "val_recon_loss": "", "val_dice": "",
               "seconds": round(time.time() - tic, 1)}
        row["val_recon_loss" if recon else "val_dice"] = "" if score is None else score
        state = {"model": common.unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                 "config": vars(args), "preset": args.preset, "stage": stage}
        run.end_epoch(epoch, row, state, score, higher_is_better=not recon, prefix=prefix)


def run_comparison(argv, args):
    """--compare: the ReSeg run and the paired --lam 0 baseline, then the Delta. Both share stage
    2's initial weights and data order (stage_seed): the difference is the alignment's alone, as
    the paper's Delta rows mean it (Tab. 1, 2)."""
    for flag in (f for f in ("eval", "resume", "predict", "bench") if getattr(args, f)):
        common.fail(f"--compare trains two runs; it cannot be combined with --{flag}")
    if args.lam == 0 or args.stage != "both":
        common.fail("--compare needs the ReSeg run: no --lam 0, no --stage")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(args.out or Path("runs") / SCRIPT / f"{stamp}-{os.getpid()}-compare")
    rest = [item for item in argv if item != "--compare"]  # a later --out / --lam wins
    reseg = main(rest + ["--out", str(base / "reseg")])
    plain = main(rest + ["--lam", "0", "--out", str(base / "baseline")])
    delta = {group: {k: reseg[group][k] - plain[group][k] for k in reseg[group]}
             for group in reseg}
    for group in reseg:
        print(f"compare [{group}]: {'':14}{'ReSeg':>9}{'lam 0':>9}{'Delta':>9}")
        for k in ["mean_dice", "mean_hd95"] + [k for k in reseg[group] if k[:5] == "dice_"]:
            print(f"compare [{group}]: {k:14}" + "".join(f"{(1 if 'hd95' in k else 100) * v:9.2f}"
                  for v in (reseg[group][k], plain[group][k], delta[group][k])))
    result = {"reseg": reseg, "baseline": plain, "delta": delta, "folder": str(base)}
    (base / "comparison.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def run_bench(args, given, run):
    """--bench: one stage-2 training step (both nets, train_one_epoch) and one inference."""
    preset = args.preset if "preset" in given else "paper"
    size = args.img_size if "img_size" in given else PAPER_RECIPE["img_size"]
    batch = args.batch_size if "batch_size" in given else (
        PAPER_RECIPE["batch_size"] if run.device.type == "cuda" else 2)
    args.num_classes = 4 if args.dataset == "acdc" else 9
    run.log(f"bench: preset {preset}, {size} x {size}, batch {batch}, {args.num_classes} classes")
    seg = build_model(preset, args.num_classes, mid_feature=args.mid_feature).to(run.device)
    rec = build_model(preset, args.num_classes, role="recon", mid_feature=args.mid_feature)
    rec = rec.to(run.device).requires_grad_(False)
    batches = [{"image": torch.rand(batch, 3, size, size),
                "mask": torch.randint(0, args.num_classes, (batch, size, size))}]
    optimizer = torch.optim.SGD(seg.parameters(), lr=0.01, momentum=0.9)
    train_step = lambda: train_one_epoch(seg, batches, optimizer, run.device, args,  # noqa
                                         "seg", rec, show=False)

    def infer_step():
        with torch.no_grad(), autocast(run.device, args.amp):
            seg.eval()(batches[0]["image"].to(run.device))

    record = common.benchmark(seg, train_step, infer_step, batch, run.device, script=SCRIPT,
                              preset=preset, img_size=size, num_classes=args.num_classes,
                              measured="stage 2: seg fwd/bwd + frozen recon fwd + Eq. (8)")
    print(json.dumps(record))
    return record


def adopt_saved(args, given):
    """--resume / --eval / --predict: the checkpoint (stage checked) and its settings (preset,
    size, classes, switches), so a bare `--eval best.pt` works; a flag typed here still wins."""
    if not (args.resume or args.eval or args.predict):
        return None
    flag, path, stage = (("--resume", args.resume, None) if args.resume else
                         ("--eval", args.eval, "seg") if args.eval else
                         ("--checkpoint", args.checkpoint, "seg"))
    saved = common.load_checkpoint(path, SCRIPT, flag, **({"stage": stage} if stage else {}))
    common.adopt_config(args, saved, ARCHITECTURE, given, flag)  # preset too; conflicts stop
    keep = {"resume", "eval", "predict", "checkpoint", "out", "bench", "device", "workers"}
    for key, value in saved["config"].items():  # the switches, image size, recipe
        if key not in given and key not in keep:
            setattr(args, key, value)
    if args.resume and args.out is None:
        args.out = str(Path(args.resume).parent)  # continue in the same run folder
    return saved


def load_method_data(args, run, saved):
    """The data, the class count (checked against a checkpoint's), and the augmentation."""
    augment = transunet_augment if args.augment == "on" or (
        args.augment == "auto" and args.data != "toy") else None
    data = common.load_data(args, "multiclass", augment=augment, toy_sizes=args.toy_sizes,
                            resize=args.resize)  # cubic: TransUNet's zoom (spec 5.2, step 3)
    if data["splits"] is not None:
        run.save_json("splits.json", data["splits"])
    if not data["test"]:
        common.fail(f"--data {args.data}: no test volumes or images found")
    args.input_kind = "rgb" if isinstance(data["train"], common.PairDataset) else "gray"
    note = "classes from the checkpoint"
    if saved is None or "num_classes" not in saved["config"]:
        args.num_classes, args.class_names, note = resolve_classes(args, data)
    run.log(f"data: {data['source']} | {args.num_classes} classes ({note}): "
            f"{', '.join(args.class_names)}")
    return data


def seg_net(args, state, device):
    """The stage-2 U-Net of these settings with a checkpoint's weights, on `device`."""
    model = build_model(args.preset, args.num_classes, mid_feature=args.mid_feature)
    model.load_state_dict(state)
    return model.to(device)


def test_model(args, run, data, state):
    """Test a stage-2 state dict per volume; print each group as the paper's table row (Tab.
    1-2: DSC %, HD95, per-organ Dice %) and save the metrics."""
    model, metrics = seg_net(args, state, run.device), {}
    names = ["DSC(%)", "HD95", *args.class_names]
    width = max(8, *(len(n) + 1 for n in names))
    rule = "absent organs skipped" if args.data == "toy" else "TransUNet's empty-organ rule"
    if run.is_main:
        for group, dataset in data["test"].items():
            pred_dir = run.out / "predictions" / (group if len(data["test"]) > 1 else "")
            pred_dir.mkdir(parents=True, exist_ok=True)
            got = metrics[group] = evaluate(model, dataset, args, run.device, pred_dir)
            values = [100 * got["mean_dice"], got["mean_hd95"],
                      *(100 * got[f"dice_{n}"] for n in args.class_names)]
            run.log(f"test [{group}]  (HD95 in voxels; {rule})")
            run.log("".join(f"{n:>{width}}" for n in names))
            run.log("".join(f"{v:>{width}.2f}" for v in values))
        run.save_json("test_metrics.json", metrics)
    return metrics


def main(argv=None):
    """Train stage 1 and/or 2, or --compare / --eval / --predict / --bench; returns metrics."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    given = common.explicit_flags(parser, argv)
    if args.compare:
        return run_comparison(argv, args)
    saved = adopt_saved(args, given)
    args = finish_method_args(common.finish_args(args, PAPER_RECIPE, TOY_RECIPE))
    if saved is not None and "preset" not in given:
        args.preset_reason = "from the checkpoint"
    run = common.Run(args, SCRIPT)
    run.log(f"ReSeg-UNet | preset {args.preset} ({args.preset_reason}) | device {run.device} | "
            f"data {args.data}")
    if args.bench:
        return run_bench(args, given, run)
    if args.predict:  # one label PNG per image of the folder
        return predict_folder(args, saved, run)
    data = load_method_data(args, run, saved)
    run.log(protocol_row(dataset_kind(args)))
    run.log(f"stage {args.stage} | stage 1: {args.recon_epochs} epochs (--recon-epochs) | "
            f"stage 2: {args.epochs} epochs (--epochs) | recon target {args.recon_target} | "
            f"F_in {args.mid_feature} | frozen BN {args.recon_bn} | lambda {args.lam} | "
            f"groups {','.join(args.align_groups)} | resize {args.resize}")
    if args.eval:
        return test_model(args, run, data, saved["model"])
    run.save_json("config.json", {**vars(args), "source": data["source"], "device": str(
        run.device), "preset_values": asdict(PRESETS[args.preset])})
    resume_stage = saved["stage"] if args.resume else None
    recon_path = args.recon_ckpt  # --stage seg: the given stage-1 file

    # Stage 1 (Sec. 2.2): skipped by the plain baseline and when resuming inside stage 2.
    if args.stage in ("recon", "both") and args.aligned and resume_stage != "seg":
        recon = new_model(args, "recon").to(run.device)
        run_stage("recon", recon, data, args, run,
                  resume=saved if resume_stage == "recon" else None)
        if args.stage == "recon":
            run.log(f"stage 1 done: {run.out / 'recon_last.pt'}")
            run.close()
            return {"stage": "recon", "checkpoint": str(run.out / "recon_last.pt")}
        recon_path = run.out / "recon_last.pt"  # the final stage-1 weights (spec 2.4)
    elif args.stage == "both" and resume_stage == "seg":
        recon_path = Path(args.resume).parent / "recon_last.pt"  # this run folder's own file

    # Stage 2 (Sec. 2.3): a fresh segmentation U-Net, guided by the frozen stage-1 net.
    model = new_model(args, "seg")  # drawn before the frozen net: the same with --lam 0
    recon_net = None
    if args.aligned:
        recon_net = load_recon_net(args, recon_path).to(run.device)
        run.log(f"frozen reconstruction net: {recon_path}")
    if args.pretrained not in ("none", "auto"):
        load_released_weights(model, args.pretrained)
        run.log(f"initialised from {args.pretrained}")
    elif args.pretrained == "auto":  # Sec. 3.2: the U-Net is trained from scratch
        run.log("--pretrained auto: the paper trains the U-Net from scratch; no weights")
    run_stage("seg", model.to(run.device), data, args, run, recon_net,
              resume=saved if resume_stage == "seg" else None)
    metrics = test_model(args, run, data, run.final_weights("best"))
    run.close()
    return metrics


if __name__ == "__main__":
    common.cli(main)
