"""M2SNet: Multi-scale in Multi-scale Subtraction Network for Medical Image Segmentation.

X. Zhao, H. Jia, Y. Pang, L. Lv, F. Tian, L. Zhang, W. Sun, H. Lu. arXiv:2303.10894 (2023),
the journal extension of MSNet (MICCAI 2021). Authors' code:
github.com/Xiaoqi-Zhao-DLUT/MSNet-M2SNet (`model/miccai_msnet.py`, `train.py`).

Idea: U-Nets fuse encoder levels by addition or concatenation, which repeats what both levels
share. M2SNet fuses them by *subtraction*: |F_A - F_B| keeps what one level has and the other
lacks. Fixed all-ones 1x1, 3x3 and 5x5 filters make each subtraction multi-scale inside a level
at no parameter cost (Eq. 2); subtracting subtractions (orders 2..5) makes it multi-scale across
levels (Fig. 2, Eq. 3). A frozen ImageNet VGG-16, the "LossNet", compares prediction and mask at
four feature levels as an extra loss (Eqs. 4-6). The network returns one logit map.

Equation map:
  Eq. (1) -> SubtractionUnit.forward
  Eq. (2) -> MultiScaleSubtraction.forward (its fixed filters: AllOnesFilter)
  Eq. (3) -> M2SNet.complementary_features (the MS_n^i come from M2SNet.subtraction_pyramid)
  Eq. (4) -> total_loss
  Eq. (5) -> LossNet.forward
  Eq. (6) -> feature_distance
  Sec. 4.2 metrics (no equation numbers) -> common.PolypMeter, common.PerImageMeter

Glossary (paper | code | shape for a 352x352 input, C = 64):
  E^i        | e[i - 1]: Res2Net stem+maxpool, layer1..4 | (B, 64|256|512|1024|2048, 88|88|44|22|11)
  MS_1^i     | ms[1, i]: E^i reduced to C channels       | (B, C, H_i, W_i)
  MS_n^i     | ms[n, i] = MSU(MS_{n-1}^{i+1}, MS_{n-1}^i) | (B, C, H_i, W_i)
  F_A, F_B   | f_a (deeper level, upsampled), f_b        | (B, C, H_i, W_i)
  CE^i, D^i  | ce[i]; d in M2SNet.decode (D^1 = output1) | (B, C, H_i, W_i)
  F_P^i, F_G^i | f_p, f_g: VGG-16 relu1_2..relu4_3       | (B, 64 * 2^(i-1), 224 / 2^(i-1), ...)

Paper (default) vs the released code, spec 13; `--as-released` (build_model(as_released=True))
switches items 1-6 to the code, whose 690-key state_dict then loads with strict=True:
  1. Filters: per-channel all-ones n x n sums (our reading of "no extra parameters"; 1x1 = the
     raw difference); code: dense C->C ones (window sum of the channel sum) + shared BN + ReLU.
  2. E^1: paper reduces every level by a 3x3 conv; code uses E^1 unreduced.
  3. Code adds a conv block (x5_dem_4) on the deeper input of the 5th-order MSU.
  4. CE^i: paper sums MS_1^i..MS_{6-i}^i and convolves every CE^i; code omits MS_1^i and has no
     conv for CE^4. CE^5 in both: a 3x3 conv of E^5 (x5_dem_5), the reading that gives the
     paper's 27.7 M parameters (Tab. 14); paper default 27.73 M, code 27.69 M (without its fc).
  5. Loss: paper L_IoU^w + L_BCE^w + L_f, l_f^i the per-pixel Euclidean distance; code: plain
     mean BCE (its reduce='none' bug) + wIoU + 0.1 x mean-squared L_f.
  6. Recipe: paper backbone lr x0.1, plain SGD, PraNet multi-scale; code: one lr for all (its
     param-group name bug), Nesterov, its own train normalisation, five-size collate.
Not switched: one logit output, no deep supervision (both); the code's triangular warm-up/decay
per epoch (spec 9) realises the paper's "warm-up and linear decay"; masks resized bilinearly
in multi-scale training as PraNet does. BUSI gets one seeded split, not the paper's four folds.
The `small`/`tiny` presets use a narrower Res2Net with one block per stage and a narrower
LossNet VGG at the training size (CPU demos); `python m2snet.py` trains `small` on toy data.
Ablations: --msu-kernels 1,3,7 (Tab. 13), --unit add (Tab. 10, SU -> AU), --orders 1..5
(Tab. 10 SU_1..SU_5 rows), --no-lossnet (Tab. 11).

Run:
  python m2snet.py                                          # toy data, small preset, CPU
  python m2snet.py --data ./polyp --pretrained auto         # PraNet package: 5 test sets
  python m2snet.py --data ./Dataset_BUSI_with_GT --epochs 100 --metrics busi
  python m2snet.py --eval runs/m2snet/<time>/best.pt --data ./polyp
  python m2snet.py --predict ./images --checkpoint best.pt
  python m2snet.py --bench                                  # paper preset, 352x352, JSON line
"""
import argparse
import dataclasses
import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: on a shared
# CPU, idle OpenMP threads that spin made a training step 3-10x slower (our 2-core machine)
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


PRESETS = {
    "paper": Preset(),
    "small": Preset(stem_width=16, planes=16, layers=(1, 1, 1, 1), channels=32, vgg_width=8,
                    lossnet_size=0),
    "tiny": Preset(stem_width=4, planes=8, layers=(1, 1, 1, 1), channels=8, vgg_width=4,
                   lossnet_size=0),
}

PAPER_RECIPE = {"epochs": 50,      # Sec. 4.3: 50 epochs for polyps (BUSI 100, lung 200)
                "batch_size": 16,  # Sec. 4.3
                "lr": 0.05,        # Sec. 4.3: 0.05 for the head, 0.005 for the backbone
                "img_size": 352}   # Sec. 4.3
TOY_RECIPE = {"epochs": 14, "batch_size": 8, "lr": 0.05, "img_size": 64}
TOY_SIZES = (160, 20, 40)
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4       # Sec. 4.3
BACKBONE_LR_FACTOR = 0.1                 # Sec. 4.3: 0.005 / 0.05
TRAIN_SCALES = (0.75, 1.0, 1.25)         # Sec. 4.3 "multi-scale training as [4]" (PraNet's)
RELEASED_SIZES = (224, 256, 288, 320, 352)  # spec 9: the code's collate, one size per batch
ROTATE_DEGREES = 10.0                    # spec 9: flip + rotation in [-10, 10) degrees
RELEASED_TRAIN_MEAN = (124.55 / 255, 118.90 / 255, 102.94 / 255)  # spec 9 (RGB, 0-255 scale)
RELEASED_TRAIN_STD = (56.77 / 255, 55.97 / 255, 57.50 / 255)
RES2NET_URL = ("https://shanghuagao.oss-cn-beijing.aliyuncs.com/res2net/"
               "res2net50_v1b_26w_4s-3cf99910.pth")  # spec 12
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"  # spec 7


# ==== 3. Building blocks (Sec. 3.1) ====

def resize_to(x, reference):
    """Bilinear resize of x to reference's H x W (align_corners=False, the code's F.upsample)."""
    if x.shape[-2:] == reference.shape[-2:]:
        return x
    return F.interpolate(x, size=reference.shape[-2:], mode="bilinear", align_corners=False)


def conv_block(in_channels, out_channels):
    """3x3 conv (with bias) + BN + ReLU: the paper's "Conv"; children 0/1/2 as in the code."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class AllOnesFilter(nn.Module):
    """Filter(.)_{n x n} of Eq. (2): a fixed all-ones n x n filter, zero padded (Sec. 3.1).

    Paper reading: per channel, so the output is each channel's n x n window sum and the 1x1
    filter is the identity; no parameters. Released code (`CNN1`, spec 3.1): a dense (C, C, n, n)
    ones weight, i.e. the window sum of the *channel sum* (the same map in every channel),
    followed by a learnable BatchNorm and ReLU (keys `conv_3.norm.*`). Computed here as channel
    sum then window sum, which equals the dense convolution at about 1/C of its cost.
    """

    def __init__(self, size, channels, released=False):
        super().__init__()
        self.size, self.channels, self.released = size, channels, released
        if released:
            self.norm = nn.BatchNorm2d(channels)
            self.relu = nn.ReLU()

    def forward(self, x):
        if self.released:
            x = x.sum(dim=1, keepdim=True)  # (B, 1, H, W): every output channel sums all inputs
        elif self.size == 1:
            return x
        ones = x.new_ones(x.shape[1], 1, self.size, self.size)
        out = F.conv2d(x, ones, padding=self.size // 2, groups=x.shape[1])  # window sums
        if self.released:
            out = self.relu(self.norm(out.expand(-1, self.channels, -1, -1)))  # (B, C, H, W)
        return out


class SubtractionUnit(nn.Sequential):
    """Eq. (1): SU = Conv(|F_A - F_B|) for two adjacent levels (Sec. 3.1, MSNet's unit).

    F_A (deeper, smaller) is upsampled to F_B's size first. The Conv is 3x3 conv + BN + ReLU,
    stored as children 0/1/2 so the keys match the code (`x5_x4.0.weight`, ...). unit='add' is
    Tab. 10's "SU -> AU" ablation: F_A + F_B instead of |F_A - F_B|.
    """

    def __init__(self, channels, unit="sub"):
        super().__init__(*conv_block(channels, channels))
        self.unit = unit

    def combine(self, f_a, f_b):
        return (f_a - f_b).abs() if self.unit == "sub" else f_a + f_b

    def forward(self, f_a, f_b):
        f_a = resize_to(f_a, f_b)  # (B, C, H_B, W_B)
        return super().forward(self.combine(f_a, f_b))  # Eq. (1)  SU = Conv(|F_A - F_B|)


class MultiScaleSubtraction(SubtractionUnit):
    """Eq. (2): MSU = Conv(sum_n |Filter(F_A)_nxn - Filter(F_B)_nxn|), n in msu_kernels.

    The fixed filters are shared by every MSU of the network and passed in by the model, so
    they are not duplicated in each unit's state_dict. Returns (B, C, H_B, W_B).
    """

    def forward(self, f_a, f_b, filters):
        f_a = resize_to(f_a, f_b)  # (B, C, H_B, W_B)
        difference = 0
        for filter_n in filters:  # filter order matters for the code's shared BN statistics
            difference = difference + self.combine(filter_n(f_a), filter_n(f_b))  # Eq. (2), n term
        return nn.Sequential.forward(self, difference)  # Eq. (2)  MSU = Conv(sum of the terms)


# ==== 4. Model ====

def msu_name(n, i):
    """The code's module name of MS_n^i: the levels it spans, deepest first (MS_3^2: x4_x3_x2)."""
    return "_".join(f"x{level}" for level in range(i + n - 1, i - 1, -1))


class M2SNet(nn.Module):
    """Res2Net-50 encoder, multi-scale in multi-scale subtraction module, decoder (Fig. 2).

    Input (B, 3, H, W) normalised image; output (B, num_classes, H, W) logits (no sigmoid).
    Module names follow the authors' class so that `as_released=True` loads their weights.
    """

    def __init__(self, preset, num_classes=1, as_released=False, msu_kernels=(1, 3, 5),
                 unit="sub", orders=5):
        super().__init__()
        c = preset.channels
        self.as_released, self.orders = as_released, orders
        self.resnet = Res2Net(preset, with_fc=as_released)  # (section 4b, after the model)
        e_channels = self.resnet.out_channels  # [E^1, ..., E^5]
        self.filter_names = []  # the shared fixed filters, in Eq. (2)'s order
        for size in msu_kernels:
            if size == 1:
                self.filter_names.append(None)  # 1x1 all-ones per channel = identity (both)
            else:
                setattr(self, f"conv_{size}", AllOnesFilter(size, c, as_released))
                self.filter_names.append(f"conv_{size}")
        for i in (5, 4, 3, 2, 1):  # Sec. 3: a 3x3 conv reduces every level to C channels
            if i == 1 and as_released:
                continue  # Deviation (authors' code): E^1 enters the subtractions unreduced
            setattr(self, f"x{i}_dem_1", conv_block(e_channels[i - 1], c))
        for n in range(2, orders + 1):  # Fig. 2: the MSU of MS_n^i for i = 6-n .. 1
            if as_released and n == 5:
                self.x5_dem_4 = conv_block(c, c)  # Deviation (authors' code): extra block
            for i in range(6 - n, 0, -1):
                setattr(self, msu_name(n, i), MultiScaleSubtraction(c, unit))
        for i in (4, 3, 2, 1):  # Eq. (3)'s Conv per level (the code has none for CE^4)
            if not (as_released and i == 4):
                setattr(self, f"level{i}", conv_block(c, c))
        self.x5_dem_5 = conv_block(e_channels[4], c)  # CE^5: own 3x3 conv of E^5 (spec 4.1)
        for i in (4, 3, 2):
            setattr(self, f"output{i}", conv_block(c, c))  # decoder block D^i
        self.output1 = nn.Sequential(nn.Conv2d(c, num_classes, 3, padding=1))  # D^1 / head

    def subtraction_pyramid(self, e):
        """MS_n^i for n = 1..orders, i = 1..6-n (Fig. 2): a dict {(n, i): (B, C, H_i, W_i)}.

        MS_1^i is the reduced level i; MS_n^i = MSU(MS_{n-1}^{i+1}, MS_{n-1}^i), computed in the
        code's order (n up, i down), which fixes the code's shared-BN running statistics.
        """
        ms = {}
        for i in range(1, 6):
            reduce = getattr(self, f"x{i}_dem_1", None)
            ms[1, i] = reduce(e[i - 1]) if reduce is not None else e[i - 1]  # (B, C, H_i, W_i)
        filters = [getattr(self, name) if name else nn.Identity() for name in self.filter_names]
        for n in range(2, self.orders + 1):
            for i in range(6 - n, 0, -1):
                f_a, f_b = ms[n - 1, i + 1], ms[n - 1, i]  # deeper, shallower
                if self.as_released and n == 5:
                    f_a = self.x5_dem_4(f_a)
                ms[n, i] = getattr(self, msu_name(n, i))(f_a, f_b, filters)  # (B, C, H_i, W_i)
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

    def decode(self, ce, size):
        """D^i = Conv(up(D^{i+1}) + CE^i) from CE^5 upwards; head conv; upsample to `size`."""
        d = ce[5]
        for i, block in ((4, self.output4), (3, self.output3), (2, self.output2)):
            d = block(resize_to(d, ce[i]) + ce[i])  # (B, C, H_i, W_i)
        logits = self.output1(resize_to(d, ce[1]) + ce[1])  # (B, K, H/4, W/4)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def forward(self, x):
        e = self.resnet.features(x)  # [E^1 .. E^5]
        ms = self.subtraction_pyramid(e)
        ce = self.complementary_features(ms, e[4])
        return self.decode(ce, x.shape[-2:])  # (B, K, H, W) logits


def parse_kernels(text):
    """'1,3,5' or (1, 3, 5) -> (1, 3, 5): distinct positive odd sizes (centred filters)."""
    text = ",".join(map(str, text)) if isinstance(text, (tuple, list)) else str(text)
    try:
        sizes = tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError:
        sizes = ()
    if not sizes or any(k < 1 or k % 2 == 0 for k in sizes) or len(set(sizes)) != len(sizes):
        common.fail(f"--msu-kernels {text}: give distinct positive odd sizes such as 1,3,5")
    return sizes


def build_model(preset="paper", num_classes=1, **overrides):
    """M2SNet for a preset name (or Preset); overrides: as_released, msu_kernels ('1,3,5' or a
    tuple), unit, orders, or any Preset field (e.g. channels=16); None keeps the preset's."""
    preset = PRESETS[preset] if isinstance(preset, str) else preset
    fields = {f.name for f in dataclasses.fields(Preset)}
    preset = dataclasses.replace(preset, **{k: v for k, v in overrides.items()
                                            if k in fields and v is not None})
    as_released = overrides.get("as_released", False)
    kernels = parse_kernels(preset.msu_kernels)
    unit = overrides.get("unit", "sub")
    if unit not in ("sub", "add"):
        common.fail(f"--unit {unit}: choose sub (paper) or add (Tab. 10's AU)")
    if not 1 <= preset.orders <= 5 or (as_released and preset.orders < 2):
        common.fail(f"--orders {preset.orders}: 1..5 (2..5 with --as-released, whose CE^4 is "
                    f"MS_2^4)")
    if as_released and 2 * preset.stem_width != preset.channels:
        common.fail("--as-released needs E^1 to have `channels` channels (it is not reduced)")
    return M2SNet(preset, num_classes, as_released, kernels, unit, preset.orders)


# ==== 4b. Backbone (not this paper's contribution): Res2Net-50 v1b 26w4s ====
# Gao et al., "Res2Net", TPAMI 2021. Names follow `res2net50_v1b_26w_4s-3cf99910.pth` (spec 12).

class Bottle2neck(nn.Module):
    """Res2Net bottleneck: 1x1 conv, `scale` channel groups with hierarchical 3x3 convs, 1x1."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, base_width=26, scale=4,
                 stage=False):
        super().__init__()
        self.width = planes * base_width // 64  # 26, 52, 104, 208 for Res2Net-50
        self.scale, self.stage = scale, stage
        self.conv1 = nn.Conv2d(inplanes, self.width * scale, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.width * scale)
        self.convs = nn.ModuleList(nn.Conv2d(self.width, self.width, 3, stride, 1, bias=False)
                                   for _ in range(scale - 1))
        self.bns = nn.ModuleList(nn.BatchNorm2d(self.width) for _ in range(scale - 1))
        if stage:  # first block of a stage: the last group is pooled, not passed through
            self.pool = nn.AvgPool2d(3, stride, 1)
        self.conv3 = nn.Conv2d(self.width * scale, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        groups = torch.split(out, self.width, 1)
        outputs, y = [], 0
        for k in range(self.scale - 1):  # y_k = K_k(x_k + y_{k-1}); a stage block skips the sum
            y = self.relu(self.bns[k](self.convs[k](groups[k] if self.stage else groups[k] + y)))
            outputs.append(y)
        outputs.append(self.pool(groups[-1]) if self.stage else groups[-1])
        out = self.bn3(self.conv3(torch.cat(outputs, 1)))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


class Res2Net(nn.Module):
    """Res2Net v1b (deep stem, average-pool shortcut). `features` returns E^1..E^5 (spec 1.3).

    `with_fc` keeps the unused ImageNet classifier (`fc`), which the released M2SNet carries.
    """

    def __init__(self, preset, with_fc=False):
        super().__init__()
        s = preset.stem_width
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, s, 3, 2, 1, bias=False), nn.BatchNorm2d(s), nn.ReLU(inplace=True),
            nn.Conv2d(s, s, 3, 1, 1, bias=False), nn.BatchNorm2d(s), nn.ReLU(inplace=True),
            nn.Conv2d(s, 2 * s, 3, 1, 1, bias=False))
        self.bn1 = nn.BatchNorm2d(2 * s)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
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
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

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
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
            continue
        conv = nn.Conv2d(channels, v * width, 3, padding=1)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.ReLU(inplace=True)]
        channels = v * width
    return nn.Sequential(*layers)


def read_weights(source, url, what):
    """A state_dict from a file path, or from `url` for 'auto' (None, said in one line, if that
    download fails)."""
    if source == "auto":
        try:
            return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False)
        except Exception as error:  # offline, blocked host, bad file
            print(f"note: could not download {what} ({type(error).__name__}); "
                  f"training from scratch")
            return None
    if not Path(source).is_file():
        common.fail(f"{what} weights not found: {source}")
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:
        common.fail(f"cannot read {what} weights {source}: {type(error).__name__}")
    if not isinstance(state, dict):
        common.fail(f"{source} holds no state_dict")
    return state.get("state_dict", state)


def load_weights(module, state, source, what, rename=lambda key: key):
    """Copy `state` (renamed) into `module`; a missing/extra key or a wrong shape stops the run.
    Keys absent from `module` (e.g. Res2Net's `fc` for the paper model) are only skipped when
    the module has no such submodule at all; BN's num_batches_tracked may be absent."""
    own = module.state_dict()
    state = {rename(k): v for k, v in state.items()}
    state = {k: v for k, v in state.items()
             if k in own or k.split(".")[0] in dict(module.named_children())}
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        common.fail(f"{source} does not fit the {what} of this preset (missing {missing[:2]}, "
                    f"unexpected {unexpected[:2]}, wrong shape {wrong[:2]})")
    module.load_state_dict(state, strict=False)


# ==== 5. Losses (Sec. 3.2) ====

def boundary_weight(mask):
    """Pixel weights 1 + 5 |avgpool_31(G) - G| of the weighted IoU/BCE ([4, 51, 52]; spec 8)."""
    return 1 + 5 * (F.avg_pool2d(mask, 31, stride=1, padding=15) - mask).abs()  # (B, 1, H, W)


def weighted_iou_loss(logits, mask, weight):
    """L_IoU^w per image, mean over the batch: 1 - (I + 1) / (U - I + 1), weighted sums."""
    prob = torch.sigmoid(logits)
    inter = (prob * mask * weight).sum(dim=(2, 3))  # (B, 1)
    union = ((prob + mask) * weight).sum(dim=(2, 3))
    return (1 - (inter + 1) / (union - inter + 1)).mean()


def weighted_bce_loss(logits, mask, weight):
    """L_BCE^w per image, sum(w * bce) / sum(w), mean over the batch (F3Net/PraNet form)."""
    bce = F.binary_cross_entropy_with_logits(logits, mask, reduction="none")  # (B, 1, H, W)
    return ((weight * bce).sum(dim=(2, 3)) / weight.sum(dim=(2, 3))).mean()


def feature_distance(f_p, f_g, mean_squared=False):
    """l_f^i between (B, C_i, H_i, W_i) features: the Euclidean distance over channels at each
    pixel, averaged over pixels and images (paper); the code's mean squared error if asked."""
    if mean_squared:
        return F.mse_loss(f_p, f_g)  # Deviation (authors' code): mean of squares, spec 7
    return torch.linalg.vector_norm(f_p - f_g, dim=1).mean()  # Eq. (6)  l_f^i = ||F_P - F_G||_2


class LossNet(nn.Module):
    """Frozen VGG-16 feature loss (Sec. 3.2, Fig. 4): L_f between prediction and mask.

    The four blocks end at relu1_2, relu2_2, relu3_3, relu4_3 (spec 7) and are applied in
    sequence; keys `blocks.b.N.*` keep torchvision's `features.N` indices. Inputs (B, 1, H, W)
    in [0, 1] are repeated to 3 channels, ImageNet-normalised and resized to `size` (0: kept).
    Without ImageNet weights the features are random but fixed (said at start-up).
    """

    def __init__(self, width=64, size=224, mean_squared=False):
        super().__init__()
        features = vgg16_features(width)
        self.blocks = nn.ModuleList([features[:4], features[4:9], features[9:16],
                                     features[16:23]])
        self.size, self.mean_squared = size, mean_squared
        self.register_buffer("mean", torch.tensor(common.IMAGENET_MEAN).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(common.IMAGENET_STD).view(1, 3, 1, 1),
                             persistent=False)
        self.requires_grad_(False)  # training-free: never given to the optimiser

    def load_vgg(self, state, source):
        """Load torchvision's `vgg16-397923af.pth` (`features.N.*`; the classifier is unused)."""
        state = {k: v for k, v in state.items() if k.startswith("features.")
                 and int(k.split(".")[1]) < 23}
        block = lambda n: sum(int(n) > end for end in (3, 8, 15))  # noqa: E731  0-3, 4-8, ...
        load_weights(self.blocks, state, source, "LossNet VGG-16",
                     lambda key: f"{block(key.split('.')[1])}.{key.split('.', 1)[1]}")

    def prepare(self, x):
        x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std  # (B, 3, H, W)
        if self.size and x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear",
                              align_corners=False)
        return x

    def forward(self, prediction, mask):
        f_p, f_g = self.prepare(prediction), self.prepare(mask.to(prediction.dtype))
        terms = []
        for block in self.blocks:
            f_p = block(f_p)  # (B, C_i, H_i, W_i)
            with torch.no_grad():
                f_g = block(f_g)
            terms.append(feature_distance(f_p, f_g, self.mean_squared))  # l_f^i
        return sum(terms)  # Eq. (5)  L_f = l_f^1 + l_f^2 + l_f^3 + l_f^4


def total_loss(logits, mask, lossnet=None, released=False):
    """Eq. (4) on (B, 1, H, W) logits and mask; returns (loss, {term: value}).

    released: the code's weighting, plain mean BCE + wIoU + 0.1 * L_f (spec 8).
    """
    logits, mask = logits.float(), mask.float()
    assert logits.shape == mask.shape and logits.shape[1] == 1, (logits.shape, mask.shape)
    weight = boundary_weight(mask)
    l_iou = weighted_iou_loss(logits, mask, weight)  # Eq. (4), L_IoU^w
    if released:  # Deviation (authors' code): reduce='none' silently averages, no weights
        l_bce = F.binary_cross_entropy_with_logits(logits, mask)
    else:
        l_bce = weighted_bce_loss(logits, mask, weight)  # Eq. (4), L_BCE^w
    l_f = lossnet(torch.sigmoid(logits), mask) if lossnet is not None else logits.new_zeros(())
    lambda_f = 0.1 if released else 1.0  # Deviation (authors' code): 0.1 on L_f
    loss = l_iou + l_bce + lambda_f * l_f  # Eq. (4)  L_total = L_IoU^w + L_BCE^w + L_f
    return loss, {"iou": l_iou.item(), "bce": l_bce.item(), "f": l_f.item()}


# ==== 6. Data handling (Sec. 4.3) ====

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
    """Sizes one batch is trained at: PraNet's three scales (a step each), the code's one
    random size of five, or just `size`."""
    if mode == "pranet":  # PraNet: int(round(S * rate / 32) * 32), rates 0.75, 1, 1.25
        return [int(round(size * rate / 32) * 32) for rate in TRAIN_SCALES]
    if mode == "released":
        return [int(round(size * rng.choice(RELEASED_SIZES) / 352))]
    return [size]


def resize_batch(images, masks, size):
    """Resize a batch (B, 3, S, S), (B, 1, S, S) to `size`; masks bilinearly, as PraNet does."""
    if images.shape[-1] == size:
        return images, masks
    resize = lambda x: F.interpolate(x, size=(size, size), mode="bilinear",  # noqa: E731
                                     align_corners=False)
    return resize(images), resize(masks)


# ==== 7. Train, evaluate, predict ====

def lr_factor(epoch, epochs):
    """Warm-up and linear decay (Sec. 4.3) as the code sets it per epoch: a triangle peaking
    mid-training, 1 - |2 (e + 1) / (E + 1) - 1| (spec 9)."""
    return 1 - abs(2 * (epoch + 1) / (epochs + 1) - 1)


def make_optimizer(model, lr, as_released=False):
    """SGD, momentum 0.9, weight decay 5e-4 (Sec. 4.3); backbone at lr x 0.1.

    as_released: Nesterov and one lr for every parameter (the code's groups test for 'bkbone'
    while the backbone is named 'resnet', so its backbone group is empty; spec 9).
    """
    backbone = [p for n, p in model.named_parameters() if n.startswith("resnet.")]
    head = [p for n, p in model.named_parameters() if not n.startswith("resnet.")]
    factor = 1.0 if as_released else BACKBONE_LR_FACTOR
    return torch.optim.SGD([{"params": backbone, "lr": lr * factor}, {"params": head, "lr": lr}],
                           lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                           nesterov=as_released)


def train_one_epoch(model, loader, optimizer, lossnet, device, multi_scale="off",
                    released_loss=False, amp=False, scaler=None, limit_batches=0, rng=None,
                    show=True):
    """One pass over `loader`; each batch is trained at each of its sizes (one step per size).

    Returns the mean loss per step.
    """
    model.train()
    rng = rng or random.Random(0)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    total, steps = 0.0, 0
    for index, batch in enumerate(common.progress(loader, "train", show)):
        if limit_batches and index >= limit_batches:
            break
        images, masks = batch["image"].to(device), batch["mask"].to(device)
        for size in training_sizes(images.shape[-1], multi_scale, rng):
            x, y = resize_batch(images, masks, size)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                logits = model(x)  # (B, 1, size, size)
                loss, _ = total_loss(logits, y, lossnet, released_loss)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            total, steps = total + loss.item(), steps + 1
    return total / max(steps, 1)


def to_input(image, size, mean=common.IMAGENET_MEAN, std=common.IMAGENET_STD):
    """uint8 (H, W, 3) -> normalised (1, 3, size, size), as the data sets prepare images."""
    x = torch.from_numpy(common.resize_image(np.ascontiguousarray(image), size).copy())
    x = x.permute(2, 0, 1).float()[None] / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@torch.no_grad()
def predict(model, image, size, device):
    """Foreground probability (H, W) float32 for one uint8 image, at the image's own size: the
    logits are upsampled bilinearly to H x W before the sigmoid (spec 9)."""
    model.eval()
    logits = model(to_input(image, size).to(device)).float()
    logits = F.interpolate(logits, size=image.shape[:2], mode="bilinear", align_corners=False)
    return torch.sigmoid(logits)[0, 0].cpu().numpy()


METRIC_COLUMNS = {  # the papers' table columns -> the meters' keys
    "polyp": {"mDice": "mDice", "mIoU": "mIoU", "wFm": "wFm", "Sm": "Sm", "maxEm": "maxEm",
              "MAE": "MAE"},  # Tab. 1 (toolbox protocol, spec 11.2)
    "busi": {"Jaccard": "iou", "Precision": "precision", "Recall": "recall",
             "Specificity": "specificity", "Dice": "dice"},  # Tab. 4 (per image, threshold 0.5)
}


@torch.no_grad()
def evaluate(model, dataset, device, metrics="polyp", batch_size=8, save_dir=None,
             overlays=50):
    """The paper's table columns on `dataset`, each image scored at its original size.

    polyp: mDice, mIoU, wFm, Sm, maxEm, MAE by the polyp toolbox's protocol (common.PolypMeter);
    busi: Jaccard, Precision, Recall, Specificity, Dice per image at 0.5 (common.PerImageMeter).
    With `save_dir`, writes a mask PNG per image and the first `overlays` overlays.
    """
    model.eval()
    meter = common.PolypMeter() if metrics == "polyp" else common.PerImageMeter(0.5)
    loader = common.make_loader(dataset, batch_size, train=False)
    for batch in loader:
        logits = model(batch["image"].to(device)).float().cpu()  # (B, 1, S, S)
        for logit, index in zip(logits, batch["index"].tolist()):
            image, gt = dataset.full(index)
            logit = F.interpolate(logit[None], size=gt.shape, mode="bilinear",
                                  align_corners=False)
            prob = torch.sigmoid(logit)[0, 0].numpy()  # (H, W) at the original size
            if metrics == "polyp":  # the toolbox min-max normalises every map (spec 11.2)
                meter.update((prob - prob.min()) / (prob.max() - prob.min() + 1e-8), gt)
            else:
                meter.update(prob, gt)
            if save_dir is not None:
                name = dataset.names[index]
                common.save_mask_png(save_dir / f"{name}.png", prob >= 0.5)
                if index < overlays:
                    common.save_overlay(save_dir / f"{name}_overlay.png", image, prob >= 0.5, gt)
    scores = meter.compute()
    return {column: float(scores[key]) for column, key in METRIC_COLUMNS[metrics].items()}


# ==== 8. Command line ====

ARCH_KEYS = ("preset", "as_released", "msu_kernels", "unit", "orders", "img_size")


def model_from_args(args):
    """build_model with the command line's switches."""
    return build_model(args.preset, 1, as_released=args.as_released, unit=args.unit,
                       msu_kernels=args.msu_kernels, orders=args.orders)


def lossnet_from_args(args, run):
    """LossNet of the preset, with ImageNet VGG-16 weights when given; None for --no-lossnet."""
    if args.no_lossnet:
        return None
    preset = PRESETS[args.preset]
    lossnet = LossNet(preset.vgg_width, preset.lossnet_size, mean_squared=args.as_released)
    source = args.vgg_weights or (args.pretrained if args.pretrained == "auto" else None)
    state = read_weights(source, VGG16_URL, "VGG-16") if source else None
    if state is not None:
        lossnet.load_vgg(state, source)
    else:
        run.log("LossNet: no ImageNet VGG-16 weights (--vgg-weights PATH or --pretrained auto):"
                " L_f uses random, fixed VGG features")
    return lossnet.to(run.device)


def run_bench(args, explicit, run):
    """One train step (with LossNet) and one inference on random input: one JSON line."""
    args.preset = args.preset if args.preset_reason == "--preset" else "paper"
    size = args.img_size if "img_size" in explicit else PAPER_RECIPE["img_size"]
    batch = args.batch_size if "batch_size" in explicit else (16 if run.device.type == "cuda"
                                                              else 2)
    model = model_from_args(args).to(run.device)
    lossnet = None if args.no_lossnet else LossNet(PRESETS[args.preset].vgg_width,
                                                   PRESETS[args.preset].lossnet_size,
                                                   args.as_released).to(run.device)
    optimizer = make_optimizer(model, args.lr, args.as_released)
    x = torch.randn(batch, 3, size, size, device=run.device)
    y = (torch.rand(batch, 1, size, size, device=run.device) > 0.5).float()

    def train_step():
        model.train()
        loss, _ = total_loss(model(x), y, lossnet, args.as_released)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def infer_step():
        model.eval()
        with torch.no_grad():
            model(x)

    record = common.benchmark(model, train_step, infer_step, batch, run.device,
                              script="m2snet", preset=args.preset, img_size=size,
                              as_released=args.as_released, lossnet=lossnet is not None)
    print(json.dumps(record), flush=True)
    return record


def predict_folder(args, run):
    """--predict DIR --checkpoint CKPT: one mask PNG per image of DIR."""
    state = common.load_checkpoint(args.checkpoint, "m2snet")
    for key in ARCH_KEYS:
        setattr(args, key, state["config"][key])
    model = model_from_args(args).to(run.device)
    model.load_state_dict(state["model"])
    files = common.list_images(args.predict)
    out = run.out / "predictions"
    for path in files:
        prob = predict(model, common.load_image(path), args.img_size, run.device)
        common.save_mask_png(out / f"{path.stem}.png", prob >= 0.5)
    run.log(f"wrote {len(files)} masks to {out}")
    return {"predictions": len(files), "folder": str(out)}


def test_all(model, data, args, run):
    """Evaluate every test group; print a table; write test_metrics.json and predictions."""
    results = {}
    for group, dataset in data["test"].items():
        folder = run.out / "predictions" / group
        folder.mkdir(parents=True, exist_ok=True)
        results[group] = evaluate(common.unwrap(model), dataset, run.device, args.metrics,
                                  args.batch_size, folder)
    columns = list(METRIC_COLUMNS[args.metrics])
    run.log(f"{'test set':<20}" + "".join(f"{c:>12}" for c in columns))
    for group, scores in results.items():
        run.log(f"{group:<20}" + "".join(f"{scores[c]:>12.4f}" for c in columns))
    run.save_json("test_metrics.json", results)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description="M2SNet (Zhao et al., 2023): multi-scale in "
                                     "multi-scale subtraction network, binary segmentation")
    common.add_common_args(parser, PAPER_RECIPE, "Sec. 4.3")
    group = parser.add_argument_group("M2SNet switches")
    group.add_argument("--as-released", action="store_true",
                       help="the authors' released network, loss weighting and recipe quirks "
                            "(paper: off; the docstring lists each difference)")
    group.add_argument("--msu-kernels", default=None,
                       help="sizes of the all-ones filters (paper: 1,3,5, Sec. 3.1, Tab. 13)")
    group.add_argument("--unit", choices=["sub", "add"], default="sub",
                       help="subtraction or Tab. 10's addition unit (paper: sub)")
    group.add_argument("--orders", type=int, default=None,
                       help="highest subtraction order used, Tab. 10 rows (paper: 5, Fig. 2)")
    group.add_argument("--no-lossnet", action="store_true",
                       help="train without L_f, Tab. 11's 'w/o LossNet' (paper: with, Sec. 3.2)")
    group.add_argument("--vgg-weights", default=None, metavar="PATH",
                       help="torchvision's vgg16-397923af.pth for LossNet (Sec. 3.2)")
    group.add_argument("--multi-scale", choices=["pranet", "released", "off"], default=None,
                       help="pranet: sizes x0.75/1/1.25 per batch (paper, Sec. 4.3); released: "
                            "one of 224..352 per batch (code); default off on toy data")
    group.add_argument("--metrics", choices=["polyp", "busi"], default="polyp",
                       help="polyp: Tab. 1 columns; busi: Tab. 4 columns")
    group.add_argument("--toy-sizes", default=",".join(map(str, TOY_SIZES)),
                       help=f"toy data: train,val,test image counts (default: "
                            f"{','.join(map(str, TOY_SIZES))})")
    raw = parser.parse_args(argv)
    explicit = {k for k in ("img_size", "batch_size") if getattr(raw, k) is not None}
    args = common.finish_args(raw, PAPER_RECIPE, TOY_RECIPE)
    if args.multi_scale is None:
        args.multi_scale = ("released" if args.as_released else
                            "off" if args.data == "toy" else "pranet")
    if args.resume and not args.out:
        args.out = str(Path(args.resume).parent)  # keep appending to the same run folder
    common.seed_everything(args.seed)
    run = common.Run(args, "m2snet")
    if args.bench:
        return run_bench(args, explicit, run)
    if args.predict:
        return predict_folder(args, run)
    resume = common.load_checkpoint(args.resume or args.eval, "m2snet") if (
        args.resume or args.eval) else None
    if resume is not None:  # the architecture and size the checkpoint was trained with
        for key in ARCH_KEYS:
            setattr(args, key, resume["config"][key])
    run.log(f"m2snet: preset {args.preset} ({args.preset_reason}), "
            f"{'released network' if args.as_released else 'paper network'}, "
            f"device {run.device}, {args.epochs} epochs, batch {args.batch_size}, "
            f"lr {args.lr}, {args.img_size}px, multi-scale {args.multi_scale}")

    toy_sizes = tuple(int(n) for n in args.toy_sizes.split(","))
    data = common.load_data(args, "binary", augment=flip_rotate, toy_sizes=toy_sizes)
    if args.as_released:  # Deviation (authors' code): training images use other statistics
        data["train"].mean, data["train"].std = RELEASED_TRAIN_MEAN, RELEASED_TRAIN_STD
    run.log(f"data: {data['source']}; {len(data['train'])} train, "
            f"{len(data['val']) if data['val'] else 0} val, test sets "
            + ", ".join(f"{g} ({len(d)})" for g, d in data["test"].items()))
    if data["splits"] is not None:
        run.save_json("splits.json", data["splits"])

    model = model_from_args(args).to(run.device)
    if args.pretrained != "none" and resume is None:
        state = read_weights(args.pretrained, RES2NET_URL, "Res2Net-50 v1b 26w4s")
        if state is not None:
            load_weights(model.resnet, state, args.pretrained, "Res2Net backbone")
            run.log(f"backbone: ImageNet Res2Net-50 weights from {args.pretrained}")
    parameters = sum(p.numel() for p in model.parameters())
    run.log(f"model: {parameters / 1e6:.2f} M parameters")
    run.save_json("config.json", {**vars(args), "preset_values": dataclasses.asdict(
        PRESETS[args.preset]), "data_source": data["source"], "device": str(run.device),
        "parameters": parameters})

    if args.eval:
        model.load_state_dict(resume["model"])
        results = test_all(model, data, args, run)
        run.close()
        return results

    lossnet = lossnet_from_args(args, run)
    if run.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = make_optimizer(common.unwrap(model), args.lr, args.as_released)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: lr_factor(epoch, args.epochs))
    use_scaler = args.amp and run.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    loader = common.make_loader(data["train"], args.batch_size, train=True,
                                workers=args.workers, seed=args.seed)
    start, best = 0, -1.0
    if resume is not None:
        common.unwrap(model).load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        start, best = resume["epoch"] + 1, resume["best"]
        run.log(f"resuming at epoch {start + 1} of {args.epochs}")
    rng = random.Random(args.seed)

    for epoch in range(start, args.epochs):
        began = time.time()
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        lr = optimizer.param_groups[1]["lr"]
        train_loss = train_one_epoch(model, loader, optimizer, lossnet, run.device,
                                     args.multi_scale, args.as_released, args.amp, scaler,
                                     args.limit_batches, rng, run.is_main)
        scheduler.step()
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss}
        if run.is_main:
            score = -train_loss  # no validation set: the last epoch is the best
            if data["val"] is not None:
                val = evaluate(common.unwrap(model), data["val"], run.device, "busi",
                               args.batch_size)
                row["val_dice"] = score = val["Dice"]
            row["seconds"] = round(time.time() - began, 1)
            run.log_epoch(row)
            run.log("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in row.items()))
            state = {"model": common.unwrap(model).state_dict(),
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "epoch": epoch, "best": max(best, score), "config": vars(args),
                     "preset": args.preset}
            run.checkpoint("last.pt", state)
            if score > best or data["val"] is None:
                best = score
                run.checkpoint("best.pt", state)
        run.barrier()

    results = {}
    if run.is_main:
        best_state = common.load_checkpoint(run.out / "best.pt", "m2snet")
        common.unwrap(model).load_state_dict(best_state["model"])
        results = test_all(model, data, args, run)
    run.close()
    return results


if __name__ == "__main__":
    common.cli(main)
