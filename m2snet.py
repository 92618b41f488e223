"""M2SNet: Multi-scale in Multi-scale Subtraction Network for Medical Image Segmentation.

X. Zhao, H. Jia, Y. Pang, L. Lv, F. Tian, L. Zhang, W. Sun, H. Lu. arXiv:2303.10894 (2023), the
journal extension of MSNet (MICCAI 2021). Code: github.com/Xiaoqi-Zhao-DLUT/MSNet-M2SNet.

Idea: U-Nets fuse encoder levels by addition or concatenation, which repeats what both levels
share. M2SNet fuses them by *subtraction*: |F_A - F_B| keeps what one level has and the other
lacks. Fixed all-ones 1x1, 3x3 and 5x5 filters make each subtraction multi-scale inside a level
at no parameter cost (Eq. 2); subtracting subtractions (orders 2..5) makes it multi-scale across
levels (Fig. 2, Eq. 3). A frozen ImageNet VGG-16, the "LossNet", compares prediction and mask at
four feature levels as an extra loss (Eqs. 4-6). The network returns one logit map.

Equation map:
  Eq. (1) -> SubtractionUnit.forward
  Eq. (2) -> MultiScaleSubtraction.forward (its fixed filters: AllOnesFilter)
  Eq. (3) -> M2SNet.complementary_features (MS_n^i from M2SNet.subtraction_pyramid)
  Eq. (4) -> total_loss (L_IoU^w and L_BCE^w: segmentation_losses)
  Eq. (5) -> LossNet.forward
  Eq. (6) -> feature_distance
  Sec. 4.2 metrics -> TableMeter (common.PolypMeter, common.PerImageMeter, common.hd95/assd)

Glossary (paper | code | shape for a 352x352 input, C = 64):
  E^i    | e[i - 1]: Res2Net stem+maxpool, layer1..4 | (B, 64|256|512|1024|2048, 88|88|44|22|11)
  MS_n^i | ms[n, i]: E^i reduced (n = 1), MSU(MS_{n-1}^{i+1}, MS_{n-1}^i) (n > 1) | (B, C, H_i, W_i)
  F_A, F_B | f_a (the deeper level, upsampled), f_b; CE^i, D^i: ce[i], d | (B, C, H_i, W_i)
  F_P^i, F_G^i | f_p, f_g: VGG-16 relu1_2, relu2_2, relu3_3, relu4_3 | (B, 64 * 2^(i-1), ...)

Protocol: data | split | weights | recipe | tested checkpoint | evaluation (row printed at start)
  polyp  PraNet package | train 900 Kvasir + 550 ClinicDB, test CVC-300 60, ClinicDB 62, ColonDB
         380, ETIS 196, Kvasir 100, no validation | ImageNet Res2Net-50 v1b 26w4s + VGG-16
         (--pretrained auto) | 50 epochs, batch 16, SGD 0.9 / 5e-4, lr 0.05 (backbone 0.005),
         warm-up + linear decay per epoch, 352 px, one size of 224..352 per batch, flip + rotate
         10 deg | last epoch | Tab. 1 per image at its size on the saved 8-bit map (toolbox)
  busi   BUSI | 4 folds stratified by benign/malignant/normal (780: 585/195), --fold all is the
         default | as polyp | as polyp, 100 epochs | last epoch of each fold | Tab. 4 per image
         at 0.5, mean +- std over the folds (x100)
  lung   any layout, --metrics lung | the layout's split (the paper's 894/383 of [59, 60] is not
         published) | as polyp | as polyp, 200 epochs | last epoch | Tab. 3: DSC, Precision,
         Recall per image at 0.5; Sm, MAE per image on the map
  toy    built-in 160/20/40 | none | 14 epochs, batch 8, 64 px, one size | best on val | Tab. 1
  Not reproduced: the CVC-300-TV / CVC-612 clip split 60/20/20 (Tab. 2; clip lists not given),
  OCT GOALS (Tab. 5; multi-class). --distances adds ASD (symmetric) and HD95 (Tab. 8) in pixels
  (2D images carry no spacing), over the images where prediction and mask are both non-empty.

Readings the paper leaves open (source; the other reading is a switch):
  * Eq. (6) "Euclidean distance (L2-Loss)": the L2 loss, the mean squared difference (as the
    code), weight 1 (Eq. 4). The per-pixel norm (--lossnet-distance norm) makes L_f 3-8x the
    IoU + BCE terms at paper width, while Tab. 11 / Sec. 4.7.2 rely on the segmentation terms;
    the code's weight: --lossnet-weight 0.1. log.csv: loss_iou, loss_bce, loss_f, loss_side.
  * Eq. (2)'s filters: dense C -> C full-one n x n (--msu-filter dense): Sec. 4.7.4's 1x1 kernel
    "captures channel-wise interactions", which a per-channel 1x1 ones filter (the identity)
    cannot; "no extra parameters" holds for both; the code's 3x3/5x5 are dense. So a filtered
    map is one map in all C channels; a level's own channels reach CE^i through MS_1^i (Eq. 3).
  * Multi-scale training "as most methods [4, 26, 50, 51, 73, 74]": one size per batch of
    224..352 (F3Net [51], GCPANet [73], MSNet [50], the authors' collate), ~0.69x the pixels of
    fixed 352 px. PraNet's [4] x0.75/1/1.25 (--multi-scale pranet): 3 steps a batch, 4.6x that.
  * "Warm-up and linear decay": the code's per-epoch triangle (lr_factor), set from (epoch,
    --epochs), so `--resume last.pt --epochs MORE` follows the new total. No validation (paper
    and code test the last epoch); --val-fraction F holds out F of train, tests the best.
  * BUSI folds (not published): each class in natural order, seeded shuffle, dealt round-robin
    into 4 folds, keeping the class ratio as [43, 44]; std over folds with ddof 0.
  * Scoring: the sigmoid map saved as prediction_rgb.py does (8-bit, truncated, PIL bilinear to
    the image size), read as the toolbox reads a PNG (/255, min-max unless constant; PySOD).
    Lung (after Inf-Net [41]) and distance columns: our reading.
The authors' code (spec 13), --as-released = all three (their 690-key state_dict loads strictly;
with --msu-kernels 1 it is their MSNet):
  --released-network: dense filters + shared BN + ReLU, 1x1 = raw difference; E^1 unreduced; a
    block x5_dem_4 before the 5th-order MSU; CE^i without MS_1^i, CE^4 = MS_2^4. CE^5 in both:
    a 3x3 conv of E^5 (x5_dem_5), giving Tab. 14's 27.7 M parameters.
  --released-loss: plain mean BCE (their reduce='none' bug) + wIoU + 0.1 x MSE L_f.
  --released-recipe: one lr for all (param-group name bug), Nesterov, their train normalisation.
`small`/`tiny` presets: narrower Res2Net (a block per stage) and LossNet VGG, for CPU demos.
Ablations: --orders 1..5 (Tab. 10; 1 = no subtraction), --unit add (Tab. 10's AU), --no-lossnet,
--no-seg-loss, --deep-supervision (Tab. 11: IoU + BCE on a 3x3 conv head at D^4, D^3, D^2, our
reading), --msu-kernels 1,3,7 ... and --msu-weights gaussian (Tab. 13: OpenCV's default sigma,
scaled to the all-ones sum; ours). Out of scope: Tabs. 12, 15 (other LossNet / backbone
networks), Tab. 14's ASPP / DenseASPP units (only drawn in Fig. 7), Tab. 10's FPN baseline.

Run:  python m2snet.py [--bench]       # toy data, small preset, CPU [speed: one JSON line]
      python m2snet.py --data ./polyp  # PraNet package: the 5 test sets of Tab. 1
      python m2snet.py --data ./Dataset_BUSI_with_GT [--fold 2]  # 4 folds, mean +- std
      python m2snet.py --eval runs/m2snet/<time>/last.pt --data ./polyp  # or --predict DIR
"""
import argparse
import dataclasses
import json
import os
import random
import re
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (common.py)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

import common  # noqa: E402


# ==== 2. Presets and recipe ====

@dataclasses.dataclass(frozen=True)
class Preset:
    """Architecture sizes. Res2Net stage k has planes * 2^k bottleneck planes (x4 outputs)."""
    stem_width: int = 32            # spec 1.1: v1b deep stem 3 -> 32 -> 32 -> 64
    planes: int = 64                # spec 1.2: Res2Net-50 planes 64/128/256/512
    layers: tuple = (3, 4, 6, 3)    # Sec. 3: Res2Net-50 (spec 1.2)
    base_width: int = 26            # spec 1.2: "26w"
    scale: int = 4                  # spec 1.2: "4s"
    channels: int = 64              # Sec. 3: "reduce the channel to 64"
    msu_kernels: tuple = (1, 3, 5)  # Sec. 3.1, Tab. 13: full-one filters 1x1, 3x3, 5x5
    orders: int = 5                 # Fig. 2, Tab. 10: subtraction orders up to MS_5
    vgg_width: int = 64             # Sec. 3.2: VGG-16 (64 channels in conv1)
    lossnet_size: int = 224         # spec 7: LossNet resizes its inputs to 224 (0 = keep)


PRESETS = {"paper": Preset(),  # small, tiny: stem width, planes, one block per stage, ...
           "small": Preset(16, 16, (1, 1, 1, 1), channels=32, vgg_width=8, lossnet_size=0),
           "tiny": Preset(4, 8, (1, 1, 1, 1), channels=8, vgg_width=4, lossnet_size=0)}
PAPER_RECIPE = {"epochs": 50, "batch_size": 16,  # Sec. 4.3 (polyps; BUSI 100, lung 200 epochs)
                "lr": 0.05, "img_size": 352}     # Sec. 4.3: 0.05 head, 0.005 backbone; 352 px
EPOCHS = {"polyp": 50, "busi": 100, "lung": 200}  # Sec. 4.3, per task
TOY_RECIPE, TOY_SIZES = {"epochs": 14, "batch_size": 8, "lr": 0.05, "img_size": 64}, (160, 20, 40)
MOMENTUM, WEIGHT_DECAY, BACKBONE_LR_FACTOR = 0.9, 5e-4, 0.1  # Sec. 4.3 (0.005 / 0.05)
PRANET_SCALES = (0.75, 1.0, 1.25)        # PraNet [4]: three scales per batch
BATCH_SIZES = (224, 256, 288, 320, 352)  # spec 9 / F3Net [51]: one size per batch
ROTATE_DEGREES = 10.0                    # spec 9: flip + rotation in [-10, 10) degrees
FOLDS, BUSI_CLASSES = 4, ("benign", "malignant", "normal")  # Sec. 4.1: four-fold CV on BUSI
RELEASED_TRAIN_MEAN = (124.55 / 255, 118.90 / 255, 102.94 / 255)  # spec 9 (RGB, 0-255 scale)
RELEASED_TRAIN_STD = (56.77 / 255, 55.97 / 255, 57.50 / 255)
RES2NET_URL = ("https://shanghuagao.oss-cn-beijing.aliyuncs.com/res2net/"
               "res2net50_v1b_26w_4s-3cf99910.pth")  # spec 12
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"  # spec 7


# ==== 3. Building blocks (Sec. 3.1) ====

def resize_to(x, reference):
    """Bilinear resize of x to reference's H x W (align_corners=False, the code's F.upsample)."""
    return x if x.shape[-2:] == reference.shape[-2:] else F.interpolate(
        x, size=reference.shape[-2:], mode="bilinear", align_corners=False)


def conv_block(in_channels, out_channels):
    """3x3 conv (with bias) + BN + ReLU: the paper's "Conv"; children 0/1/2 as in the code."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class AllOnesFilter(nn.Module):
    """Filter(.)_{n x n} of Eq. (2), fixed, zero padded. mode 'dense' (paper reading): the
    (C, C, n, n) ones convolution = the window sum of the channel sum, one map in all channels
    (computed as channel sum then window sum, ~1/C of the cost); 'per-channel': each channel's
    window sum; 'released' (`CNN1`, spec 3.1): dense, then a learnable BN and ReLU. weights
    'gaussian' (Tab. 13): OpenCV's default sigma for n, scaled to the ones' sum n^2 (ours)."""

    def __init__(self, size, channels, mode="dense", weights="ones"):
        super().__init__()
        self.size, self.mode, self.weights = size, mode, weights
        if mode == "released":
            self.norm, self.relu = nn.BatchNorm2d(channels), nn.ReLU()

    def forward(self, x):
        channels, n = x.shape[1], self.size
        if self.mode != "per-channel":
            x = x.sum(dim=1, keepdim=True)  # (B, 1, H, W): every output channel sums all inputs
        kernel = x.new_ones(n, n)
        if self.weights == "gaussian":
            g = torch.exp(-(torch.arange(n, dtype=x.dtype, device=x.device) - n // 2) ** 2
                          / (2 * (0.3 * ((n - 1) * 0.5 - 1) + 0.8) ** 2))
            kernel = g[:, None] * g[None] * (n * n / g.sum() ** 2)
        kernel = kernel.expand(x.shape[1], 1, -1, -1)
        out = F.conv2d(x, kernel, padding=self.size // 2, groups=x.shape[1])  # window sums
        out = out.expand(-1, channels, -1, -1)  # (B, C, H, W)
        return self.relu(self.norm(out)) if self.mode == "released" else out


class SubtractionUnit(nn.Sequential):
    """Eq. (1): SU = Conv(|F_A - F_B|) (Sec. 3.1, MSNet's unit); F_A, the deeper level, is first
    upsampled to F_B. Conv = 3x3 conv + BN + ReLU as children 0/1/2 (the code's keys).
    unit='add' is Tab. 10's "SU -> AU": F_A + F_B."""

    def __init__(self, channels, unit="sub"):
        super().__init__(*conv_block(channels, channels))
        self.unit = unit

    def combine(self, f_a, f_b):
        return (f_a - f_b).abs() if self.unit == "sub" else f_a + f_b

    def forward(self, f_a, f_b):
        f_a = resize_to(f_a, f_b)  # (B, C, H_B, W_B)
        return super().forward(self.combine(f_a, f_b))  # Eq. (1)  SU = Conv(|F_A - F_B|)


class MultiScaleSubtraction(SubtractionUnit):
    """Eq. (2): MSU = Conv(sum_n |Filter(F_A)_nxn - Filter(F_B)_nxn|) -> (B, C, H_B, W_B). The
    fixed filters are shared by every MSU and passed in by the model."""

    def forward(self, f_a, f_b, filters):
        f_a = resize_to(f_a, f_b)  # (B, C, H_B, W_B)
        difference = 0
        for filter_n in filters:  # filter order matters for the code's shared BN statistics
            difference = difference + self.combine(filter_n(f_a), filter_n(f_b))  # Eq. (2), n term
        return nn.Sequential.forward(self, difference)  # Eq. (2)  MSU = Conv(sum of the terms)


# ==== 4. Model ====

class M2SNet(nn.Module):
    """Res2Net-50 encoder, multi-scale in multi-scale subtraction module, decoder (Fig. 2):
    (B, 3, H, W) normalised image -> (B, K, H, W) logits (training with deep supervision: also
    the side logits of D^4, D^3, D^2). Names follow the authors' class (`as_released` loads
    their weights). Only modules the chosen orders use are built: DDP waits for each gradient."""

    def __init__(self, preset, num_classes=1, as_released=False, msu_kernels=(1, 3, 5),
                 unit="sub", orders=5, msu_filter="dense", msu_weights="ones",
                 deep_supervision=False):
        super().__init__()
        c = preset.channels
        self.as_released, self.orders, self.msu_names = as_released, orders, {}
        self.resnet = Res2Net(preset, with_fc=as_released)  # (section 4b, after the model)
        e_channels = self.resnet.out_channels  # [E^1, ..., E^5]
        mode = "released" if as_released else msu_filter
        self.filter_names = [None if k == 1 and mode != "dense" else f"conv_{k}"  # None: the
                             for k in (msu_kernels if orders > 1 else ())]  # raw difference
        for name in filter(None, self.filter_names):  # the shared fixed filters of Eq. (2)
            setattr(self, name, AllOnesFilter(int(name[5:]), c, mode, msu_weights))
        for i in (5, 4, 3, 2, 1):  # Sec. 3: a 3x3 conv reduces every level to C channels (the
            if not ((i == 1 and as_released) or (i == 5 and orders < 2)):  # code: E^1 as it is;
                setattr(self, f"x{i}_dem_1", conv_block(e_channels[i - 1], c))  # MS_1^5 only
        for n in range(2, orders + 1):  # feeds MS_2^4). Fig. 2: the MSU of MS_n^i, i = 6-n..1
            if as_released and n == 5:
                self.x5_dem_4 = conv_block(c, c)  # Deviation (authors' code): extra block
            for i in range(6 - n, 0, -1):  # the code's name: levels spanned (MS_3^2: x4_x3_x2)
                self.msu_names[n, i] = "_".join(f"x{k}" for k in range(i + n - 1, i - 1, -1))
                setattr(self, self.msu_names[n, i], MultiScaleSubtraction(c, unit))
        for i in (4, 3, 2, 1):  # Eq. (3)'s Conv per level (the code has none for CE^4)
            if not (as_released and i == 4):
                setattr(self, f"level{i}", conv_block(c, c))
        self.x5_dem_5 = conv_block(e_channels[4], c)  # CE^5: own 3x3 conv of E^5 (spec 4.1)
        for i in (4, 3, 2):
            setattr(self, f"output{i}", conv_block(c, c))  # decoder block D^i
        self.output1 = nn.Sequential(nn.Conv2d(c, num_classes, 3, padding=1))  # D^1 / head
        self.sides = nn.ModuleList(nn.Conv2d(c, num_classes, 3, padding=1)
                                   for _ in range(3)) if deep_supervision else None

    def subtraction_pyramid(self, e):
        """{(n, i): MS_n^i (B, C, H_i, W_i)}, n = 1..orders, i = 1..6-n (Fig. 2), in the code's
        order (n up, i down), which fixes the code's shared-BN running statistics."""
        ms = {}
        for i in range(1, 6 if self.orders > 1 else 5):
            reduce = getattr(self, f"x{i}_dem_1", None)
            ms[1, i] = reduce(e[i - 1]) if reduce is not None else e[i - 1]  # (B, C, H_i, W_i)
        filters = [getattr(self, name) if name else nn.Identity() for name in self.filter_names]
        for n in range(2, self.orders + 1):
            for i in range(6 - n, 0, -1):
                f_a, f_b = ms[n - 1, i + 1], ms[n - 1, i]  # deeper, shallower
                if self.as_released and n == 5:
                    f_a = self.x5_dem_4(f_a)
                ms[n, i] = getattr(self, self.msu_names[n, i])(f_a, f_b, filters)  # Fig. 2
        return ms

    def complementary_features(self, ms, e5):
        """Eq. (3): CE^i = Conv(sum_{n=1}^{6-i} MS_n^i), i = 1..4; CE^5 from E^5 (x5_dem_5)."""
        ce = {5: self.x5_dem_5(e5)}  # (B, C, H_5, W_5)
        first = 2 if self.as_released else 1  # the code leaves the level's own MS_1^i out
        for i in (4, 3, 2, 1):
            total = sum(ms[n, i] for n in range(first, min(self.orders, 6 - i) + 1))
            if self.as_released and i == 4:
                ce[4] = total  # Deviation (authors' code): CE^4 = MS_2^4, no conv
            else:
                ce[i] = getattr(self, f"level{i}")(total)  # Eq. (3)  CE^i = Conv(sum_n MS_n^i)
        return ce

    def decode(self, ce):
        """D^i = Conv(up(D^{i+1}) + CE^i) from CE^5 up; head: (B, K, H/4, W/4), [D^4, D^3, D^2]."""
        d, decoded = ce[5], []
        for i, block in ((4, self.output4), (3, self.output3), (2, self.output2)):
            d = block(resize_to(d, ce[i]) + ce[i])  # (B, C, H_i, W_i)
            decoded.append(d)
        return self.output1(resize_to(d, ce[1]) + ce[1]), decoded

    def forward(self, x):
        e = self.resnet.features(x)  # [E^1 .. E^5]
        logits, decoded = self.decode(self.complementary_features(self.subtraction_pyramid(e),
                                                                  e[4]))
        if self.sides is None or not self.training:
            return resize_to(logits, x)  # (B, K, H, W)
        return resize_to(logits, x), [resize_to(head(d), x) for head, d in zip(self.sides,
                                                                               decoded)]


def parse_kernels(text):
    """'1,3,5' or (1, 3, 5) -> (1, 3, 5): distinct positive odd sizes (centred filters)."""
    parts = [k for k in str(text).strip("()[] ").replace(" ", "").split(",") if k]
    sizes = tuple(int(k) for k in parts if k.isdigit())
    if not parts or len(sizes) != len(parts) or len(set(sizes)) != len(sizes) or any(
            k < 1 or k % 2 == 0 for k in sizes):
        common.fail(f"--msu-kernels {text}: give distinct positive odd sizes such as 1,3,5")
    return sizes


def build_model(preset="paper", num_classes=1, **overrides):
    """M2SNet for a preset name (or Preset); overrides: as_released (the released network),
    msu_kernels ('1,3,5' or a tuple), msu_filter, msu_weights, unit, orders, deep_supervision,
    or any Preset field (e.g. channels=16); None keeps the preset's."""
    preset = PRESETS[preset] if isinstance(preset, str) else preset
    fields = {f.name for f in dataclasses.fields(Preset)}
    preset = dataclasses.replace(preset, **{k: v for k, v in overrides.items()
                                            if k in fields and v is not None})
    released = bool(overrides.get("as_released"))
    options = {"unit": "sub add", "msu_filter": "dense per-channel", "msu_weights": "ones gaussian"}
    chosen = {k: overrides.get(k) or v.split()[0] for k, v in options.items()}
    for key, value in chosen.items():
        if value not in options[key].split():
            common.fail(f"--{key.replace('_', '-')} {value}: choose one of {options[key]}")
    if not 1 <= preset.orders <= 5 or (released and preset.orders < 2):
        common.fail(f"--orders {preset.orders}: 1..5 (2..5 with --released-network)")
    if released and 2 * preset.stem_width != preset.channels:
        common.fail("--released-network needs E^1 to have `channels` channels (not reduced)")
    return M2SNet(preset, num_classes, released, parse_kernels(preset.msu_kernels),
                  orders=preset.orders, deep_supervision=bool(overrides.get("deep_supervision")),
                  **chosen)


# ==== 4b. Backbone (not this paper's contribution): Res2Net-50 v1b 26w4s (Gao et al., 2021) ====

class Bottle2neck(nn.Module):
    """Res2Net bottleneck: 1x1 conv, `scale` channel groups with hierarchical 3x3 convs, 1x1."""

    def __init__(self, inplanes, planes, stride=1, downsample=None, base_width=26, scale=4,
                 stage=False):
        super().__init__()
        self.width = w = planes * base_width // 64  # 26, 52, 104, 208 for Res2Net-50
        self.scale, self.stage, self.downsample = scale, stage, downsample
        self.conv1 = nn.Conv2d(inplanes, w * scale, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w * scale)
        self.convs = nn.ModuleList(nn.Conv2d(w, w, 3, stride, 1, bias=False)
                                   for _ in range(scale - 1))
        self.bns = nn.ModuleList(nn.BatchNorm2d(w) for _ in range(scale - 1))
        if stage:  # first block of a stage: the last group is pooled, not passed through
            self.pool = nn.AvgPool2d(3, stride, 1)
        self.conv3 = nn.Conv2d(w * scale, planes * 4, 1, bias=False)
        self.bn3, self.relu = nn.BatchNorm2d(planes * 4), nn.ReLU(inplace=True)

    def forward(self, x):
        groups = torch.split(self.relu(self.bn1(self.conv1(x))), self.width, 1)
        outputs, y = [], 0
        for k in range(self.scale - 1):  # y_k = K_k(x_k + y_{k-1}); a stage block skips the sum
            y = self.relu(self.bns[k](self.convs[k](groups[k] if self.stage else groups[k] + y)))
            outputs.append(y)
        outputs.append(self.pool(groups[-1]) if self.stage else groups[-1])
        out = self.bn3(self.conv3(torch.cat(outputs, 1)))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Res2Net(nn.Module):
    """Res2Net v1b (deep stem, average-pool shortcut). `features` returns E^1..E^5 (spec 1.3).
    `with_fc` keeps the unused ImageNet classifier (`fc`), which the released M2SNet carries."""

    def __init__(self, preset, with_fc=False):
        super().__init__()
        s = preset.stem_width
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, s, 3, 2, 1, bias=False), nn.BatchNorm2d(s), nn.ReLU(inplace=True),
            nn.Conv2d(s, s, 3, 1, 1, bias=False), nn.BatchNorm2d(s), nn.ReLU(inplace=True),
            nn.Conv2d(s, 2 * s, 3, 1, 1, bias=False))
        self.bn1, self.relu, self.maxpool = nn.BatchNorm2d(2 * s), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        inplanes = 2 * s
        self.out_channels = [inplanes]
        for k, blocks in enumerate(preset.layers):
            planes, stride = preset.planes * 2 ** k, 1 if k == 0 else 2
            downsample = nn.Sequential(
                nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False),
                nn.Conv2d(inplanes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4))
            layer = [Bottle2neck(inplanes, planes, stride, downsample, preset.base_width,
                                 preset.scale, stage=True)]
            layer += [Bottle2neck(planes * 4, planes, 1, None, preset.base_width, preset.scale)
                      for _ in range(blocks - 1)]
            setattr(self, f"layer{k + 1}", nn.Sequential(*layer))
            inplanes = planes * 4
            self.out_channels.append(inplanes)
        if with_fc:  # unused by M2SNet: frozen, so DDP does not wait for its gradients
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(inplanes, 1000).requires_grad_(False)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight), nn.init.zeros_(m.bias)

    def features(self, x):
        e1 = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 2s, H/4, W/4)
        e2 = self.layer1(e1)  # (B, 4p, H/4, W/4)
        e3 = self.layer2(e2)  # (B, 8p, H/8, W/8)
        e4 = self.layer3(e3)  # (B, 16p, H/16, W/16)
        return [e1, e2, e3, e4, self.layer4(e4)]  # E^5: (B, 32p, H/32, W/32)


def vgg16_features(width=64):
    """torchvision's `vgg16().features[:23]` (conv1_1 .. relu4_3), same indices, width scalable."""
    layers, channels = [], 3
    for v in [1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8]:
        layers += [nn.MaxPool2d(2, 2)] if v == "M" else [
            nn.Conv2d(channels, v * width, 3, padding=1), nn.ReLU(inplace=True)]
        channels = channels if v == "M" else v * width
    for conv in layers:
        if isinstance(conv, nn.Conv2d):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
    return nn.Sequential(*layers)


def load_pretrained(model, lossnet, args, run, backbone=True):
    """--pretrained auto|PATH: ImageNet Res2Net-50 v1b 26w4s into the backbone (a file with
    `resnet.*` keys, e.g. the authors' M2SNet, into the network); auto or --vgg-weights: VGG-16
    into LossNet. Logs what loaded, or one line when a download fails (then: from scratch)."""
    def tensors(source, url, flag):
        path = source if source != "auto" else common.fetch_weights(
            url, url.rsplit("/", 1)[1], run.log, run.is_main, run.barrier)
        found = common.tensor_dict(common.load_weights(path, flag)) if path else None
        if path and found is None:
            common.fail(f"{flag} {path}: holds no tensors (not a weight file)")
        return path, found or {}

    if args.pretrained != "none" and backbone:
        path, found = tensors(args.pretrained, RES2NET_URL, "--pretrained")
        if found:
            whole = any(k.startswith("resnet.") for k in found)  # e.g. the authors' M2SNet
            common.load_matching(model if whole else model.resnet, found,
                                 "M2SNet" if whole else "backbone", path, run.log)
    source = args.vgg_weights or ("auto" if args.pretrained == "auto" else None)
    path, found = tensors(source, VGG16_URL, "--vgg-weights") if (
        source and lossnet is not None) else (None, {})
    if found:
        lossnet.load_vgg(found, path, run.log)
    elif lossnet is not None:
        run.log("LossNet: no ImageNet VGG-16 weights: L_f uses random, fixed VGG features")


# ==== 5. Losses (Sec. 3.2) ====

def segmentation_losses(logits, mask, bce="weighted"):
    """(L_IoU^w, L_BCE^w) of [4, 51, 52] (spec 8), each per image, then the batch mean: pixel
    weights w = 1 + 5 |avgpool_31(G) - G|; wIoU = 1 - (I + 1) / (U - I + 1) of weighted sums;
    wBCE = sum(w * bce) / sum(w). bce='plain': the code's unweighted mean BCE (its
    reduce='none' silently averages)."""
    weight = 1 + 5 * (F.avg_pool2d(mask, 31, stride=1, padding=15) - mask).abs()  # (B, 1, H, W)
    prob = torch.sigmoid(logits)
    inter = (prob * mask * weight).sum(dim=(2, 3))  # (B, 1)
    union = ((prob + mask) * weight).sum(dim=(2, 3))
    l_iou = (1 - (inter + 1) / (union - inter + 1)).mean()
    if bce == "plain":  # Deviation (authors' code)
        return l_iou, F.binary_cross_entropy_with_logits(logits, mask)
    bce = F.binary_cross_entropy_with_logits(logits, mask, reduction="none")  # (B, 1, H, W)
    return l_iou, ((weight * bce).sum(dim=(2, 3)) / weight.sum(dim=(2, 3))).mean()


def feature_distance(f_p, f_g, distance="mse"):
    """l_f^i between (B, C_i, H_i, W_i) features: 'mse', the L2 loss (mean of the squared
    differences; our reading of Eq. 6, the code's), or 'norm', the per-pixel Euclidean norm
    over channels, averaged over pixels and images."""
    if distance == "norm":
        return torch.linalg.vector_norm(f_p - f_g, dim=1).mean()
    return F.mse_loss(f_p, f_g)  # Eq. (6)  l_f^i = ||F_P^i - F_G^i||_2 (L2-Loss)


class LossNet(nn.Module):
    """Frozen VGG-16 feature loss (Sec. 3.2, Fig. 4). Blocks end at relu1_2, relu2_2, relu3_3,
    relu4_3 (spec 7), applied in sequence; keys `blocks.b.N.*` keep torchvision's indices.
    (B, 1, H, W) inputs in [0, 1]: repeated to 3 channels, ImageNet-normalised, resized to
    `size` (0: kept). The mask's features are the target (no gradient)."""

    def __init__(self, width=64, size=224, distance="mse"):
        super().__init__()
        features = vgg16_features(width)
        self.blocks = nn.ModuleList([features[:4], features[4:9], features[9:16], features[16:23]])
        self.size, self.distance = size, distance
        for name, value in (("mean", common.IMAGENET_MEAN), ("std", common.IMAGENET_STD)):
            self.register_buffer(name, torch.tensor(value).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)  # training-free: never given to the optimiser

    def load_vgg(self, tensors, source, log=print):
        """Load torchvision's `vgg16-397923af.pth` (`features.N.*`; the classifier is unused)."""
        block = lambda n: sum(n > end for end in (3, 8, 15))  # noqa: E731  0-3, 4-8, 9-15, 16-
        renamed = {f"{block(int(k.split('.')[1]))}.{k.split('.', 1)[1]}": v
                   for k, v in tensors.items()
                   if k.startswith("features.") and int(k.split(".")[1]) < 23}
        return common.load_matching(self.blocks, renamed, "LossNet VGG-16", source, log)

    def prepare(self, x):
        x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std  # (B, 3, H, W)
        if not self.size or x.shape[-2:] == (self.size, self.size):
            return x
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)

    def forward(self, prediction, mask):
        f_p, terms = self.prepare(prediction), []
        with torch.no_grad():
            f_g = self.prepare(mask.to(prediction.dtype))
        for block in self.blocks:
            f_p = block(f_p)  # (B, C_i, H_i, W_i)
            with torch.no_grad():
                f_g = block(f_g)
            terms.append(feature_distance(f_p, f_g, self.distance))  # l_f^i
        return sum(terms)  # Eq. (5)  L_f = l_f^1 + l_f^2 + l_f^3 + l_f^4


def total_loss(logits, mask, lossnet=None, bce="weighted", lossnet_weight=1.0, seg=True, sides=()):
    """Eq. (4) on (B, 1, H, W) logits and mask -> (loss, {term: float}). lossnet_weight: 1
    (Eq. 4; the code 0.1); seg=False: Tab. 11's "w/o L_IoU^w & L_BCE^w" (still logged);
    sides: deep-supervision logits (Tab. 11), each trained with IoU + BCE."""
    logits, mask = logits.float(), mask.float()
    assert logits.shape == mask.shape and logits.shape[1] == 1, (logits.shape, mask.shape)
    l_iou, l_bce = segmentation_losses(logits, mask, bce)  # Eq. (4), L_IoU^w, L_BCE^w
    l_f = lossnet(torch.sigmoid(logits), mask) if lossnet is not None else logits.new_zeros(())
    loss = lossnet_weight * l_f + (l_iou + l_bce if seg else 0)  # Eq. (4)  L_IoU + L_BCE + L_f
    terms = {"iou": l_iou.item(), "bce": l_bce.item(), "f": l_f.item()}
    if len(sides):
        l_side = sum(sum(segmentation_losses(s.float(), mask, bce)) for s in sides)
        loss, terms["side"] = loss + l_side, l_side.item()
    return loss, terms


# ==== 6. Data handling (Sec. 4.1, 4.3) ====

def flip_rotate(image, mask, rng):
    """Random horizontal flip (p = 0.5) and rotation in [-10, 10) degrees (Sec. 4.3, spec 9)."""
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    angle = rng.uniform(-ROTATE_DEGREES, ROTATE_DEGREES)
    image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).rotate(angle, Image.BILINEAR))
    mask = np.asarray(Image.fromarray(np.ascontiguousarray(mask).astype(np.uint8) * 255)
                      .rotate(angle, Image.NEAREST)) > 127
    return image.copy(), mask


def training_sizes(size, mode, rng):
    """Sizes a batch trains at: one of 224..352 (scaled to `size`), PraNet's three, or `size`."""
    if mode == "pranet":  # PraNet: int(round(S * rate / 32) * 32), rates 0.75, 1, 1.25
        return [int(round(size * rate / 32) * 32) for rate in PRANET_SCALES]
    if mode == "random-size":
        return [int(round(size * rng.choice(BATCH_SIZES) / 352))]
    return [size]


def busi_folds(pairs, seed=0):
    """FOLDS lists of pairs stratified by the class in each file's name (else its folders):
    each class in natural order, seeded shuffle, dealt round-robin (the count runs on across
    classes, so fold sizes differ by at most one)."""
    by_class = {}
    for pair in sorted(pairs, key=lambda p: common.natural_key(str(p["image"]))):
        path = str(pair["image"])
        name = next((c for text in (os.path.basename(path), os.path.dirname(path))
                     for c in BUSI_CLASSES if c in text.lower()), None)
        if name is None:
            common.fail(f"--fold: no BUSI class (benign, malignant, normal) in the path {path}")
        by_class.setdefault(name, []).append(pair)
    rng, members = random.Random(seed), []
    for name in sorted(by_class):
        members += rng.sample(by_class[name], len(by_class[name]))
    return [members[k::FOLDS] for k in range(FOLDS)]


def load_task_data(args, explicit, run):
    """The data, the table (--metrics auto: Tab. 4 for BUSI, else Tab. 1), the task's epochs
    (Sec. 4.3), and with --fold K the K-th BUSI fold as the test set (the others train)."""
    data = common.load_data(args, "binary", augment=flip_rotate,
                            toy_sizes=tuple(int(n) for n in args.toy_sizes.split(",")))
    if args.metrics == "auto":
        args.metrics = "busi" if data["layout"] == "busi" else "polyp"
    if args.data != "toy" and "epochs" not in explicit and args.resume is None:
        args.epochs = EPOCHS[args.metrics]
    if args.fold is None and data["layout"] == "busi" and not args.eval:
        args.fold = "all"  # Sec. 4.1: BUSI is reported as four-fold cross-validation
    if args.fold not in (None, "all"):
        if args.data == "toy":
            common.fail("--fold: needs real data (the BUSI folder)")
        folds, k = busi_folds([p for split in data["pairs"].values() for group in (
            split.values() if isinstance(split, dict) else [split]) for p in group],
            args.seed), int(args.fold) - 1
        make = lambda ps, aug: common.PairDataset(ps, args.img_size, aug, seed=args.seed)  # noqa
        data.update(train=make([p for j, f in enumerate(folds) if j != k for p in f],
                               flip_rotate), val=None, test={f"fold {k + 1}": make(folds[k], None)},
                    splits={f"fold {j + 1}": [p["image"] for p in f] for j, f in enumerate(folds)})
    if args.released_recipe:  # Deviation (authors' code): training images use other statistics
        data["train"].mean, data["train"].std = RELEASED_TRAIN_MEAN, RELEASED_TRAIN_STD
    if data["splits"] is not None and args.fold != "all":
        run.save_json("splits.json", data["splits"])
    return data


# ==== 7. Train, evaluate, predict ====

def lr_factor(epoch, epochs):
    """Sec. 4.3's warm-up and linear decay, per epoch as the code: 1 - |2 (e + 1) / (E + 1) - 1|."""
    return 1 - abs(2 * (epoch + 1) / (epochs + 1) - 1)


def make_optimizer(model, lr, released=False):
    """SGD, momentum 0.9, weight decay 5e-4 (Sec. 4.3); the backbone at lr x 0.1 (its group's
    `lr_scale`, which common.set_lr applies). released: Nesterov and one lr for all (the
    code's groups test for 'bkbone' but the backbone is named 'resnet'; spec 9)."""
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    factor = 1.0 if released else BACKBONE_LR_FACTOR
    groups = [{"params": [p for n, p in trained if n.startswith("resnet.") == backbone],
               "lr": lr * scale, "lr_scale": scale} for backbone, scale in ((True, factor),
                                                                            (False, 1.0))]
    return torch.optim.SGD(groups, lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                           nesterov=released)


def train_one_epoch(model, loader, optimizer, loss_fn, device, multi_scale="off", amp=False,
                    scaler=None, limit_batches=0, rng=None, show=True):
    """One pass over `loader`; each batch is trained at each of its sizes (a step per size),
    masks resized bilinearly as the code does. -> mean per step of 'loss' and each 'loss_*'."""
    model.train()
    rng, sums, steps = rng or random.Random(0), {}, 0
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    for index, batch in enumerate(common.progress(loader, "train", show)):
        if limit_batches and index >= limit_batches:
            break
        for size in training_sizes(batch["image"].shape[-1], multi_scale, rng):
            x, y = (F.interpolate(batch[k].to(device), size=(size, size), mode="bilinear",
                                  align_corners=False) for k in ("image", "mask"))
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                out = model(x)  # (B, 1, size, size), with deep supervision also the sides
                logits, sides = out if isinstance(out, tuple) else (out, ())
                loss, terms = loss_fn(logits, y, sides=sides)
            optimizer.zero_grad(set_to_none=True)
            (scaler.scale(loss) if scaler else loss).backward()
            scaler.step(optimizer) if scaler else optimizer.step()
            if scaler:
                scaler.update()
            row = {"loss": loss.item(), **{f"loss_{k}": v for k, v in terms.items()}}
            sums, steps = {k: sums.get(k, 0.0) + v for k, v in row.items()}, steps + 1
    return {key: value / max(steps, 1) for key, value in sums.items()}


def scored_map(prob, shape):
    """(png, pred): the PNG the authors' prediction_rgb.py writes (spec 9: the sigmoid at the
    network's size as 8 bits, truncated, PIL-bilinear resized to H x W) and that PNG as the
    polyp toolbox reads it (PySODMetrics, test_score.py: / 255, min-max unless constant)."""
    png = (np.asarray(prob, np.float32) * 255).astype(np.uint8)
    if png.shape != tuple(shape):
        png = np.asarray(Image.fromarray(png).resize(tuple(shape)[::-1], Image.BILINEAR))
    pred = png.astype(np.float64) / 255
    if pred.max() > pred.min():
        pred = (pred - pred.min()) / (pred.max() - pred.min())
    return png, pred


COLUMNS = {"polyp": ("mDice", "mIoU", "wFm", "Sm", "maxEm", "MAE"),  # Tab. 1 (spec 11.2)
           "busi": ("Jaccard", "Precision", "Recall", "Specificity", "Dice"),  # Tab. 4
           "lung": ("DSC", "Precision", "Recall", "Sm", "MAE")}  # Tab. 3
BINARY_KEYS = {"Jaccard": "iou", "Precision": "precision", "Recall": "recall",  # at 0.5
               "Specificity": "specificity", "Dice": "dice", "DSC": "dice"}


@torch.no_grad()
def evaluate(model, dataset, device, metrics="polyp", batch_size=8, save_dir=None,
             overlays=50, distances=False):
    """The paper's table on `dataset`, each image scored at its own size on the saved 8-bit map
    (scored_map): Tab. 1 by the PraNet protocol (common.PolypMeter), Tabs. 3/4 per image at 0.5
    (common.PerImageMeter; Sm, MAE per image), distances: ASD, HD95 (Tab. 8, pixels) over the
    images where both masks are non-empty. With `save_dir`: the PNGs and `overlays` overlays."""
    meter, binary = common.PolypMeter(), common.PerImageMeter(0.5)  # Sm, MAE: PolypMeter's
    distance = {"ASD": [], "HD95": []}
    for batch in common.make_loader(dataset, batch_size, train=False):
        probs = torch.sigmoid(model.eval()(batch["image"].to(device)).float()).cpu()
        for prob, index in zip(probs[:, 0].numpy(), batch["index"].tolist()):  # (S, S) each
            image, gt = dataset.full(index)
            png, pred = scored_map(prob, gt.shape)  # (H, W)
            meter.update(pred, gt)
            binary.update(pred, gt)
            if distances and (pred >= 0.5).any() and gt.any():
                distance["ASD"].append(common.assd(pred >= 0.5, gt))
                distance["HD95"].append(common.hd95(pred >= 0.5, gt))
            if save_dir is not None:
                save_dir.mkdir(parents=True, exist_ok=True)
                Image.fromarray(png).save(save_dir / f"{dataset.names[index]}.png")
                if index < overlays:
                    common.save_overlay(save_dir / f"{dataset.names[index]}_overlay.png", image,
                                        pred >= 0.5, gt)
    scores = {**{k: np.mean(v) if v else np.nan for k, v in distance.items()},
              **meter.compute(), **{c: binary.compute()[k] for c, k in BINARY_KEYS.items()}}
    return {c: float(scores[c]) for c in COLUMNS[metrics] + ("ASD", "HD95")[:2 * distances]}


# ==== 8. Command line ====

ARCH_KEYS = ("preset", "released_network", "msu_kernels", "msu_filter", "msu_weights", "unit",
             "orders", "deep_supervision", "img_size")


def parse_args(argv):
    """The command line with the paper's protocol for what it leaves open -> (args, explicit)."""
    parser = argparse.ArgumentParser(description="M2SNet (Zhao et al., 2023): multi-scale in "
                                     "multi-scale subtraction network, binary segmentation")
    common.add_common_args(parser, PAPER_RECIPE, "Sec. 4.3")
    add = parser.add_argument_group("M2SNet switches (see the docstring)").add_argument
    for name, text in (("as-released", "the authors' code exactly: the next three together"),
                       ("released-network", "the code's network (dense filters + BN, ...)"),
                       ("released-loss", "the code's loss: mean BCE + wIoU + 0.1 x MSE L_f"),
                       ("released-recipe", "one lr for all, Nesterov, the code's normalisation"),
                       ("deep-supervision", "Tab. 11: IoU + BCE also on heads at D^4, D^3, D^2"),
                       ("no-lossnet", "train without L_f (Tab. 10, 11)"),
                       ("no-seg-loss", "train without L_IoU^w and L_BCE^w (Tab. 11)"),
                       ("distances", "add ASD and HD95 in pixels (Tab. 8)")):
        add(f"--{name}", action="store_true", help=text)
    add("--msu-kernels", default=None, help="filter sizes (paper: 1,3,5, Sec. 3.1, Tab. 13)")
    add("--msu-filter", choices=["dense", "per-channel"], default="dense", help="Eq. (2)'s")
    add("--msu-weights", choices=["ones", "gaussian"], default="ones", help="Tab. 13's Gaussian")
    add("--unit", choices=["sub", "add"], default="sub", help="Tab. 10's AU: add (paper: sub)")
    add("--orders", type=int, default=None, help="highest subtraction order (paper 5, Tab. 10)")
    add("--lossnet-distance", choices=["mse", "norm"], default="mse", help="Eq. (6)'s l_f^i")
    add("--lossnet-weight", type=float, default=None, help="L_f's weight (Eq. 4: 1; code: 0.1)")
    add("--vgg-weights", default=None, metavar="PATH", help="torchvision's vgg16-397923af.pth")
    add("--multi-scale", choices=["random-size", "pranet", "off"],
        help="real data: random-size; toy: off")
    add("--metrics", choices=["auto", "polyp", "busi", "lung"], default="auto", help="Tab. 1/4/3")
    add("--fold", default=None, help="BUSI fold 1..4, or all (the default on BUSI)")
    add("--toy-sizes", default=",".join(map(str, TOY_SIZES)),
        help="toy data: train,val,test image counts (default: %(default)s)")
    args = common.finish_args(parser.parse_args(argv), PAPER_RECIPE, TOY_RECIPE)
    explicit, real = common.explicit_flags(parser, argv), args.data != "toy"
    if args.as_released:
        args.released_network = args.released_loss = args.released_recipe = True
    args.pretrained = args.pretrained if "pretrained" in explicit else "auto" if real else "none"
    if "val_fraction" not in explicit and real:
        args.val_fraction = 0.0  # Sec. 4.1 and the code: every training image is trained on
    if args.multi_scale is None:
        args.multi_scale = "random-size" if real or args.released_recipe else "off"
    if args.lossnet_weight is None:
        args.lossnet_weight = 0.1 if args.released_loss else 1.0
    if args.released_loss and args.lossnet_distance != "mse":
        common.fail("--lossnet-distance norm conflicts with --released-loss (the code's MSE)")
    if args.no_lossnet and args.no_seg_loss:
        common.fail("--no-lossnet with --no-seg-loss: no loss term is left to train")
    if args.fold not in (None, "all", "1", "2", "3", "4"):
        common.fail(f"--fold {args.fold}: give 1..{FOLDS} or all")
    return args, explicit


def networks(args, device):
    """The model, LossNet (None with --no-lossnet) and the loss function of the flags."""
    model = build_model(args.preset, 1, as_released=args.released_network, unit=args.unit,
                        msu_kernels=args.msu_kernels, orders=args.orders,
                        msu_filter=args.msu_filter, msu_weights=args.msu_weights,
                        deep_supervision=args.deep_supervision).to(device)
    preset = PRESETS[args.preset]
    lossnet = None if args.no_lossnet else LossNet(preset.vgg_width, preset.lossnet_size,
                                                   args.lossnet_distance).to(device)
    return model, lossnet, lambda logits, mask, sides=(): total_loss(
        logits, mask, lossnet, "plain" if args.released_loss else "weighted",
        args.lossnet_weight, not args.no_seg_loss, sides)


def run_bench(args, explicit, run):
    """One train step (with LossNet) and one inference on random input: one JSON line."""
    args.preset = args.preset if args.preset_reason == "--preset" else "paper"
    size = args.img_size if "img_size" in explicit else PAPER_RECIPE["img_size"]
    batch = args.batch_size if "batch_size" in explicit else (
        16 if run.device.type == "cuda" else 2)
    model, lossnet, loss_fn = networks(args, run.device)
    optimizer = make_optimizer(model, args.lr, args.released_recipe)
    x = torch.randn(batch, 3, size, size, device=run.device)
    loader = [{"image": x, "mask": (torch.rand_like(x[:, :1]) > 0.5).float()}]
    record = common.benchmark(
        model, lambda: train_one_epoch(model, loader, optimizer, loss_fn, run.device, show=False),
        torch.no_grad()(lambda: model.eval()(x)), batch, run.device, script="m2snet",
        preset=args.preset, img_size=size, released=args.released_network,
        lossnet=lossnet is not None)
    print(json.dumps(record), flush=True)
    return record


@torch.no_grad()
def predict_folder(args, explicit, run):
    """--predict DIR --checkpoint CKPT: a mask PNG per image of DIR, at its size (scored_map
    >= 0.5)."""
    state = common.load_checkpoint(args.checkpoint, "m2snet")
    model = networks(common.adopt_config(args, state, ARCH_KEYS, explicit, "--checkpoint"),
                     run.device)[0]
    model.load_state_dict(state["model"])
    files, out = common.list_images(args.predict), run.folder() / "predictions"
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (common.IMAGENET_MEAN,
                                                         common.IMAGENET_STD))
    for path in files:
        image = common.load_image(path)
        x = torch.tensor(common.resize_image(image, args.img_size)).permute(2, 0, 1) / 255
        prob = torch.sigmoid(model.eval()(((x - mean) / std)[None].to(run.device)).float())
        common.save_mask_png(out / f"{path.stem}.png", scored_map(prob[0, 0].cpu(),
                                                                  image.shape[:2])[1] >= 0.5)
    run.log(f"wrote {len(files)} masks to {out}")
    return {"predictions": len(files), "folder": str(out)}


def test_all(model, data, args, run):
    """Score every test group (rank 0), print the table, write test_metrics.json and the maps."""
    results = {group: evaluate(common.unwrap(model), dataset, run.device, args.metrics,
                               args.batch_size, run.folder() / "predictions" / group,
                               distances=args.distances)
               for group, dataset in data["test"].items()} if run.is_main else {}
    columns = list(next(iter(results.values()), {}))
    for group, scores in {"test set": dict(zip(columns, columns)), **results}.items():
        run.log(f"{group:<20}" + "".join(f"{v:>12.4f}" if isinstance(v, float) else f"{v:>12}"
                                         for v in scores.values()))
    run.save_json("test_metrics.json", results)
    return results  # (common.cli closes a torchrun process group at exit, after every fold)


def cross_validate(argv, run):
    """--fold all: train and test the four folds in turn (folders fold1..fold4), then print and
    save (cv_metrics.json) each column's mean +- std over the folds, x100 as Tab. 4 does."""
    argv = list(sys.argv[1:] if argv is None else argv)
    results = [main([*argv, "--fold", str(k), "--out", str(run.out / f"fold{k}")])
               for k in range(1, FOLDS + 1)]  # under torchrun every rank trains, rank 0 scores
    if not run.is_main:
        return {}
    scores = [next(iter(r.values())) for r in results]
    summary = {c: {"mean": float(np.mean([s[c] for s in scores])), "std": float(np.std(
        [s[c] for s in scores])), "folds": [s[c] for s in scores]} for c in scores[0]}
    run.log("4-fold cross-validation (x100): " + "  ".join(
        f"{c} {100 * v['mean']:.2f}+-{100 * v['std']:.2f}" for c, v in summary.items()))
    run.save_json("cv_metrics.json", summary)
    return summary


def main(argv=None):
    args, explicit = parse_args(sys.argv[1:] if argv is None else argv)
    common.seed_everything(args.seed)
    run = common.Run(args, "m2snet")
    if args.bench:
        return run_bench(args, explicit, run)
    if args.predict:
        return predict_folder(args, explicit, run)
    flag = "--resume" if args.resume else "--eval"
    resume = common.load_checkpoint(args.resume or args.eval, "m2snet", flag) if (
        args.resume or args.eval) else None
    if resume is not None:  # the architecture and size the checkpoint was trained with
        common.adopt_config(args, resume, ARCH_KEYS + ("epochs",) * ("epochs" not in explicit),
                            explicit, flag)
    data = load_task_data(args, explicit, run)
    if args.fold == "all":
        return cross_validate(argv, run)
    row = re.search(rf"^  {'toy' if args.data == 'toy' else args.metrics} .*?(?=^  \S)", __doc__,
                    re.M | re.S)  # the docstring's protocol row
    run.log(f"protocol: {' '.join(row.group().split())}\nm2snet: preset {args.preset} "
            f"({args.preset_reason}), {'released' if args.released_network else 'paper'} "
            f"network, {run.device}, {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}"
            f", {args.img_size} px, multi-scale {args.multi_scale}, L_f {args.lossnet_weight} x "
            f"{args.lossnet_distance}\ndata: {data['source']}; {len(data['train'])} train, "
            f"{len(data['val'] or ())} val, test " + ", ".join(
                f"{g} ({len(d)})" for g, d in data["test"].items()))
    model, lossnet, loss_fn = networks(args, run.device)
    if not args.eval:  # resuming: the checkpoint has the network, LossNet needs its VGG
        load_pretrained(model, lossnet, args, run, backbone=resume is None)
    run.save_json("config.json", {**vars(args), "preset_values": dataclasses.asdict(
        PRESETS[args.preset]), "data_source": data["source"], "device": str(run.device),
        "parameters": sum(p.numel() for p in model.parameters())})
    if args.eval:
        model.load_state_dict(resume["model"])
        return test_all(model, data, args, run)

    if run.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = make_optimizer(common.unwrap(model), args.lr, args.released_recipe)
    scaler = torch.amp.GradScaler("cuda") if args.amp and run.device.type == "cuda" else None
    loader = common.make_loader(data["train"], args.batch_size, train=True,
                                workers=args.workers, seed=args.seed)
    start = run.restore(resume, common.unwrap(model), optimizer, scaler) if resume else 0
    rng = random.Random(args.seed + start)  # the multi-scale draws
    for epoch in range(start, args.epochs):
        began = time.time()
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        lr = args.lr * lr_factor(epoch, args.epochs)  # from (epoch, epochs): resume-safe
        common.set_lr(optimizer, lr)
        row = {"epoch": epoch + 1, "lr": lr, **train_one_epoch(
            model, loader, optimizer, loss_fn, run.device, args.multi_scale, args.amp, scaler,
            args.limit_batches, rng, run.is_main)}
        score = None  # no validation: best.pt is the last epoch
        if data["val"] is not None and run.is_main:
            row["val_dice"] = score = evaluate(common.unwrap(model), data["val"], run.device,
                                               "busi", args.batch_size)["Dice"]
        row["seconds"] = round(time.time() - began, 1)
        run.end_epoch(epoch, row, {"model": common.unwrap(model).state_dict(), "optimizer":
                                   optimizer.state_dict(), "config": vars(args),
                                   "preset": args.preset}, score)
    common.unwrap(model).load_state_dict(run.final_weights(
        "best" if data["val"] is not None else "last"))  # the paper tests the last epoch
    return test_all(model, data, args, run)


if __name__ == "__main__":
    common.cli(main)
