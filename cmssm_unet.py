"""CM-SSM U-Net: VM-UNet with inter-channel (SE + channel mixing) and spatial (cross-region
attention) feature enhancement, trained with a feature-distillation loss.

Z. Ke, Y. Wang, R. Guo, M. Du, J.-S. Zhou, G. Wang, Y. Zhang, "An Effective Algorithm for Skin
Disease Segmentation Combining inter-channel Features and Spatial Feature Enhancement" (papers/
cmssm_unet.txt). No code was released: rebuilt from VM-UNet's code (github.com/JCruan519/VM-UNet),
MSVMamba's SE + ConvFFN, coordinate attention and SelfReg-UNet's FDLoss (specs/cmssm_unet.md).

Idea. VM-UNet is a U-Net of visual state-space blocks that scan the feature map in four
directions (SS2D). CM-SSM U-Net re-weights the scan's channels by squeeze-excitation (SE) and adds
a channel mixing network (CMN) to every block, passes each skip through cross-region attention
(CRA), and adds two distillation losses: every block imitates the final decoder feature (CFD),
the weaker half of each map's channels the stronger half (IFD).

Equation map (Eq. (1), the global pooling printed before CRA, is SE's squeeze):
Eq. (1) -> SqueezeExcitation.forward
Eq. (2) -> CrossRegionAttention.forward
Eq. (3) -> CrossRegionAttention.forward
Eq. (4) -> CrossRegionAttention.forward
Eq. (5) -> CrossRegionAttention.forward
Eq. (6) -> CrossRegionAttention.forward
Eq. (7) -> CrossRegionAttention.forward
Eq. (8) -> cross_feature_distillation
Eq. (9) -> internal_feature_distillation
Eq. (10) -> feature_distillation_loss
Eq. (11) -> bce_dice_loss, total_loss
Eq. (12) -> common.GlobalMeter (iou), in evaluate
Eq. (13) -> common.GlobalMeter (dice), in evaluate
Eq. (14) -> common.GlobalMeter (accuracy), in evaluate

Glossary (paper | code | shape; B batch, C width, D = 2C, N state size, L = H*W):
  x (CRA) | x | (B, C, H, W)    z^h, z^w | z_h, z_w | (B, C, H, 1), (B, C, W, 1)    z_c | z | (B, D)
  f, f^h, f^w | f, f_h, f_w | (B, C/r, H+W, 1)    g^h, g^w | g_h, g_w | (B, C, H, 1), (B, C, 1, W)
  F_m | features | (B, C_i, H_i, W_i)    F_final | final | (B, C/4, H, W)    F~, F- | f_tilde, f_bar
  lambda_1, lambda_2 | lambda_cfd, lambda_ifd (Eq. 10), w_bce, w_dice (Eq. 11)    Delta, A, B, C,
  D (SS2D) | dts, A_logs, bs, cs, Ds | (B, 4, D, L), (4D, N), (B, 4, N, L), (4D)

Protocol (the row that applies is printed at start-up; split as Sec. 4.1):
  ISIC 2016 | official 900 / 379 | VMamba-S weights | last epoch tested | global, 256 px
  ISIC 2017 | seeded 7:3 of the official 2150 train+val: 1505 / 645 (paper 1500 / 650) | same
  ISIC 2018 | seeded 7:3 of the official 2694 train+val: 1886 / 808                    | same
  Recipe (Sec. 4.3): 300 epochs, batch 32, AdamW lr 1e-3 (weight decay 1e-2: VM-UNet), cosine
  per epoch, T_max 50, floor 1e-5 (periodic, as PyTorch's), 256x256, h-flip + rotation. Global:
  one confusion matrix over all test pixels, threshold 0.5 (Eqs. 12-14). --split official:
  2000/150/600 and 2594/100/1000; other folders: a seeded 7:3. The paper has no validation set
  and names no checkpoint: the last epoch is tested; --val-fraction F holds out F of train and
  tests the lowest validation loss (VM-UNet's rule, there on its test folder). Weights as VM-UNet
  (the paper does not say); `auto` on the small/tiny presets means none (nothing published fits;
  logged). Each epoch's lr comes from (epoch, --t-max): --resume --epochs N keeps the schedule.

Reconstruction choices (open in the paper; source [switch]):
- SE after the scan merge and out_norm, before the SiLU(z) gate, on D channels, hidden D/8, no
  biases: MSVMamba's SEModule; r = 8 also LocalMamba's, EfficientVMamba's [--se-position block:
  after out_proj, on C; --se-reduction R].
- CMN: 1x1 conv C -> 2C, depthwise 3x3 with an inner residual, GELU, 1x1 conv -> C, behind its
  own LayerNorm and residual: MSVMamba's ConvFFN [--cmn-expansion E; --cmn-no-residual].
- CRA = coordinate attention: F1 = 1x1 conv + BatchNorm + h-swish (the delta of Eq. 4), width
  max(8, C/32), separate T_h, T_w (houqb/CoordAttention) [--cra-act relu; --cra-no-bn].
- Eqs. (8)-(9) as per-element MSEs; L_CFD = mean over the last-block maps + mean over the first,
  L_IFD = four such group means (SelfReg-UNet's KDloss): x2 and x4 against one mean as printed
  [--fd-grouping paper]. Maps: first and last block of all 8 stages; F_final = the final x4
  expansion (C/4 channels), detached; random channels by randperm.
- h-flip and rotation, p = 0.5 each, an angle per sample [--vflip: VM-UNet's vertical flip too;
  --vmunet-rotation: its one angle per run]. Loss 0.3 BCE + 0.7 Dice [--loss-weights 1,1:
  VM-UNet's]. BCE from logits; masks resized nearest (VM-UNet: bilinear).
- Input: per-image min-max to [0, 255] (VM-UNet's myNormalize) with VM-UNet's weights, else
  per-channel z-scores [--input-norm]. From scratch (small preset, faint 96 px lesions, tests/
  test_cmssm_learning.py) [0, 255] leaves 1 % of each token's energy after the patch embedding's
  LayerNorm varying over the image: test DSC after 10 epochs 0.41 (VM-UNet alone 0.39), with
  z-scores 0.89 (VM-UNet alone 0.89); CRA gates near 1, BCE:Dice 1:1, prior output bias: 0.00.
Tab. 4's first row is VM-UNet as published (79.54 / 88.60 = Tab. 2), without FDLoss; its last
equals Tab. 5's last (81.48 / 89.79), with FDLoss; the middle rows are not said (we assume with).
VM-UNet: --no-se --no-cmn --no-cra --no-cfd --no-ifd --loss-weights 1,1 --vflip --vmunet-rotation

Run: python cmssm_unet.py   # toy, small preset: test DSC 0.94 in 3.6 min (2 busy CPU cores)
  python cmssm_unet.py --data data/isic2017   # the paper's recipe and split, VMamba-S weights
  --eval runs/cmssm_unet/X/best.pt; --predict DIR --checkpoint CKPT; --bench (paper, 256, batch 2)
"""
import argparse
import json
import math
import os
import random
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (common.py)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

import common  # noqa: E402

# ==== 2. Presets and recipe ====


@dataclass(frozen=True)
class Preset:
    """Architecture of one preset; the switches of Tab. 4 are the booleans se, cmn, cra."""
    dims: int           # C, width of stage 1
    depths: tuple       # blocks per encoder stage
    depths_decoder: tuple  # blocks per decoder stage
    d_state: int        # N, SSM state size
    drop_path: float    # stochastic depth, largest rate
    se_reduction: int = 8   # SE hidden width = width / r (spec 4.3, MSVMamba)
    cmn_expansion: int = 2  # CMN hidden width = e * C (spec 4.3, MSVMamba)
    cra_reduction: int = 32  # CRA hidden width = max(min, C / r) (spec 5.2)
    cra_min_width: int = 8
    se: bool = True
    cmn: bool = True
    cra: bool = True
    se_position: str = "scan"   # "scan": on the D scan channels before the gate; "block": after
    cmn_residual: bool = True   # inner residual around CMN's depthwise conv
    cra_act: str = "hswish"     # delta of Eq. (4)
    cra_bn: bool = True         # BatchNorm inside F1


PRESETS = {  # paper: C and depths Sec. 3.1; d_state, drop path spec 1.2-2.2 (VM-UNet config)
    "paper": Preset(dims=96, depths=(2, 2, 2, 2), depths_decoder=(2, 2, 2, 1), d_state=16,
                    drop_path=0.2),
    "small": Preset(dims=16, depths=(1,) * 4, depths_decoder=(1,) * 4, d_state=8, drop_path=0.0),
    "tiny": Preset(dims=8, depths=(1,) * 4, depths_decoder=(1,) * 4, d_state=4, drop_path=0.1,
                   se_reduction=4, cra_min_width=4),
}
PAPER_RECIPE = {"epochs": 300, "batch_size": 32, "lr": 1e-3, "img_size": 256}  # Sec. 4.3
TOY_RECIPE = {"epochs": 10, "batch_size": 8, "lr": 3e-3, "img_size": 64}
TOY_SIZES = (160, 20, 40)   # toy train / val / test images
WEIGHT_DECAY = 1e-2         # spec 7 (VM-UNet config; the paper names AdamW only)
T_MAX, ETA_MIN = 50, 1e-5   # Sec. 4.3: cosine annealing, cap 50, floor 1e-5
LAMBDA_CFD = LAMBDA_IFD = 0.015  # Sec. 3.4, Eq. (10)
W_BCE, W_DICE = 0.3, 0.7    # Sec. 3.4, Eq. (11)
THRESHOLD = 0.5             # spec 9 (VM-UNet engine.py)
PAPER_FRACTIONS = (0.7, 0.0, 0.3)  # Sec. 4.1: 7:3, no validation set
RESPLIT_LAYOUTS = ("isic2017", "isic2018")  # official splits the paper re-splits 7:3 (Sec. 4.1)
PRETRAINED = {"paper": ("https://github.com/MzeroMiko/VMamba/releases/download/%2320240218/"
                        "vssmsmall_dp03_ckpt_epoch_238.pth")}  # VMamba-S, VM-UNet's start (C=96)
ARCH_KEYS = ("no_se", "no_cmn", "no_cra", "se_position", "se_reduction", "cmn_expansion",
             "cmn_no_residual", "cra_act", "cra_no_bn", "img_size", "input_norm")  # from a ckpt
UNIT = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # images in [0, 1]; normalise() follows
PROTOCOL = {"isic2016": "ISIC 2016, official 900 / 379", "vmunet-isic": "VM-UNet's 7:3 folders",
            "isic2017": "ISIC 2017, 7:3 of train+val", "isic2018": "ISIC 2018, 7:3 of train+val",
            "toy": "toy data (not a paper data set)"}  # the docstring's table, by layout


# ==== 3. Building blocks (Sec. 3.2-3.3): the paper's additions to VM-UNet ====

class SqueezeExcitation(nn.Module):
    """SE of the CM-SSM block (Sec. 3.2): re-weights channels by their global context.
    (B, H, W, K) -> same shape. Hidden width K / r, no biases, ReLU then sigmoid (spec 4.3)."""

    def __init__(self, channels, reduction):
        super().__init__()
        self.fc1 = nn.Linear(channels, channels // reduction, bias=False)
        self.fc2 = nn.Linear(channels // reduction, channels, bias=False)

    def forward(self, y):
        z = y.mean(dim=(1, 2))  # Eq. (1)  z_c = 1/(HW) sum_ij x_c(i, j)   (B, K)
        weight = torch.sigmoid(self.fc2(F.relu(self.fc1(z))))  # (B, K)
        return y * weight[:, None, None, :]


class ChannelMixingNetwork(nn.Module):
    """CMN (Sec. 3.2): FC expands C -> eC, a depthwise 3x3 conv on the expanded channels (inner
    residual as MSVMamba's ConvFFN), GELU, FC restores C; FCs as 1x1 convs. (B, H, W, C) -> same."""

    def __init__(self, dim, expansion, residual=True):
        super().__init__()
        self.residual, hidden = residual, dim * expansion
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        a = self.fc1(x.permute(0, 3, 1, 2))  # (B, eC, H, W)
        a = F.gelu(a + self.dwconv(a) if self.residual else self.dwconv(a))
        return self.fc2(a).permute(0, 2, 3, 1)  # (B, H, W, C)


class CMSSMBlock(nn.Module):
    """CM-SSM block (Sec. 3.2, Fig. 2; spec 4.3), (B, H, W, C) -> same shape:
        u = x + DropPath(out_proj(SE(scan(LN_1(x))) * SiLU(z)));  y = u + DropPath(CMN(LN_2(u)))
    With SE and CMN off this is VM-UNet's VSS block, parameter names included."""

    def __init__(self, dim, drop_path, preset):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.self_attention = SS2D(dim, preset.d_state)
        self.se_position = preset.se_position
        width = 2 * dim if preset.se_position == "scan" else dim  # D scan channels, or C
        self.se = SqueezeExcitation(width, preset.se_reduction) if preset.se else None
        self.drop_rate, self.cmn = drop_path, None
        if preset.cmn:
            self.ln_2 = nn.LayerNorm(dim)
            self.cmn = ChannelMixingNetwork(dim, preset.cmn_expansion, preset.cmn_residual)

    def forward(self, x):
        y, z = self.self_attention.features(self.ln_1(x))  # (B, H, W, D) each
        at_scan = self.se is not None and self.se_position == "scan"
        y = self.se(y) if at_scan else y  # Sec. 3.2: SE after the 2-D scan, on its features
        s = self.self_attention.output(y, z)  # gate and out_proj: (B, H, W, C)
        s = self.se(s) if self.se is not None and not at_scan else s
        x = x + self.drop(s)
        return x if self.cmn is None else x + self.drop(self.cmn(self.ln_2(x)))

    def drop(self, branch):
        """Stochastic depth (spec 1.6): drop a residual branch per sample, scale the kept ones."""
        if not self.training or self.drop_rate == 0:
            return branch
        keep = branch.new_empty((branch.shape[0], 1, 1, 1)).bernoulli_(1 - self.drop_rate)
        return branch * keep / (1 - self.drop_rate)


class CrossRegionAttention(nn.Module):
    """CRA at a skip (Sec. 3.3, Fig. 3) as coordinate attention (Hou et al. 2021), (B, C, H, W)
    -> same. F1 = 1x1 conv C -> m, BatchNorm, h-swish (delta of Eq. 4), m = max(min_width, C / r);
    T_h, T_w = two 1x1 convs m -> C (spec 5.2)."""

    def __init__(self, channels, reduction=32, min_width=8, act="hswish", bn=True):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width := max(min_width, channels // reduction), 1)
        self.bn1 = nn.BatchNorm2d(width) if bn else nn.Identity()
        self.act = nn.Hardswish() if act == "hswish" else nn.ReLU()
        self.conv_h = nn.Conv2d(width, channels, 1)
        self.conv_w = nn.Conv2d(width, channels, 1)

    def forward(self, x):
        height, width = x.shape[-2:]
        z_h = x.mean(dim=3, keepdim=True)  # Eq. (2)  z^h_c(h) = 1/W sum_i x_c(h, i)  (B, C, H, 1)
        z_w = x.mean(dim=2, keepdim=True).transpose(2, 3)  # Eq. (3)  z^w_c(w)   (B, C, W, 1)
        f = self.act(self.bn1(self.conv1(torch.cat([z_h, z_w], dim=2))))  # Eq. (4)  (B, m, H+W, 1)
        f_h, f_w = torch.split(f, [height, width], dim=2)
        g_h = torch.sigmoid(self.conv_h(f_h))  # Eq. (5)  g^h = sigma(T_h(f^h))   (B, C, H, 1)
        g_w = torch.sigmoid(self.conv_w(f_w.transpose(2, 3)))  # Eq. (6)  g^w   (B, C, 1, W)
        return x * g_h * g_w  # Eq. (7)  y_c(i, j) = x_c(i, j) g^h_c(i) g^w_c(j)


# ==== 4. Model ====

class Stage(nn.Module):
    """One U-Net stage (VM-UNet's VSSLayer / VSSLayer_up): [patch expanding], CM-SSM blocks,
    [patch merging]. Returns the output and every block's output (the maps of FDLoss)."""

    def __init__(self, dim, rates, preset, downsample=False, upsample=False):
        super().__init__()
        self.upsample = PatchExpand2D(2 * dim) if upsample else None
        self.blocks = nn.ModuleList(CMSSMBlock(dim, rate, preset) for rate in rates)
        self.downsample = PatchMerging2D(dim) if downsample else None

    def forward(self, x):
        x, outputs = x if self.upsample is None else self.upsample(x), []  # (B, 2H, 2W, C/2)
        for block in self.blocks:
            outputs.append(x := block(x))
        return x if self.downsample is None else self.downsample(x), outputs  # (B, H/2, W/2, 2C)


class CMSSMUNet(nn.Module):
    """CM-SSM U-Net (Sec. 3.1, Fig. 1) on VM-UNet's skeleton (spec 1): patch embedding (x4 down)
    -> encoder stages [C, 2C, 4C, 8C] -> decoder stages [8C, 4C, 2C, C], stages 2-4 adding a skip
    (the input of encoder stage 4, 3, 2, through CRA) before their patch expanding -> final x4
    expansion to C/4 channels -> 1x1 conv. (B, 3, H, W), H, W divisible by 32 -> (B, K, H, W)."""

    def __init__(self, preset, num_classes=1, in_chans=3):
        super().__init__()
        self.preset, c = preset, preset.dims
        dims, dims_decoder = [c, 2 * c, 4 * c, 8 * c], [8 * c, 4 * c, 2 * c, c]
        self.patch_embed = PatchEmbed2D(in_chans, c)
        rates = np.linspace(0, preset.drop_path, sum(preset.depths)).tolist()
        rates_decoder = np.linspace(0, preset.drop_path, sum(preset.depths_decoder)).tolist()[
            ::-1]  # spec 1.6: the largest rate at the bottleneck
        self.layers, self.layers_up = nn.ModuleList(), nn.ModuleList()
        for i in range(4):
            start, depth = sum(preset.depths[:i]), preset.depths[i]
            self.layers.append(Stage(dims[i], rates[start:start + depth], preset,
                                     downsample=i < 3))
            start, depth = sum(preset.depths_decoder[:i]), preset.depths_decoder[i]
            self.layers_up.append(Stage(dims_decoder[i], rates_decoder[start:start + depth],
                                        preset, upsample=i > 0))
        self.final_up = PatchExpand2D(c, 4)
        self.final_conv = nn.Conv2d(c // 4, num_classes, 1)
        self.skip_attention = nn.ModuleList(  # the skips into decoder stages 2-4: 8C, 4C, 2C
            CrossRegionAttention(width, preset.cra_reduction, preset.cra_min_width,
                                 preset.cra_act, preset.cra_bn) for width in dims_decoder[:3]
        ) if preset.cra else None
        self.apply(_init_weights)

    def forward(self, x, return_features=False):
        """Logits (B, K, H, W); with return_features also the FD maps: {'encoder': per stage
        the list of its block outputs (B, C_i, H_i, W_i), 'decoder': the same, 'final'}."""
        if x.shape[1] == 1:  # VM-UNet's wrapper repeats a grey image to 3 channels
            x = x.expand(-1, 3, -1, -1)
        x = self.patch_embed(x)  # (B, H/4, W/4, C)
        skips, encoder, decoder = [], [], []
        for stage in self.layers:
            skips.append(x)  # s0 .. s3; s0 is never used (spec 1.5)
            x, outputs = stage(x)
            encoder.append(outputs)
        for i, stage in enumerate(self.layers_up):
            if i > 0:
                skip = skips[-i]  # s3, s2, s1: (B, H/2^(6-i), W/2^(6-i), 2^(4-i) C)
                if self.skip_attention is not None:
                    skip = self.skip_attention[i - 1](skip.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
                x = x + skip  # skips are fused by addition
            x, outputs = stage(x)
            decoder.append(outputs)
        final = self.final_up(x).permute(0, 3, 1, 2)  # F_final (B, C/4, H, W)
        logits = self.final_conv(final)  # (B, K, H, W)
        if not return_features:
            return logits
        to_bchw = lambda stages: [[m.permute(0, 3, 1, 2) for m in s] for s in stages]  # noqa
        return logits, {"encoder": to_bchw(encoder), "decoder": to_bchw(decoder), "final": final}


def _init_weights(module):
    """VM-UNet's init (spec 1.7): Linear trunc-normal std .02, bias 0; LayerNorm 1, 0."""
    if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)


def build_model(preset="paper", num_classes=1, **overrides):
    """CM-SSM U-Net of a preset; overrides replace preset fields (e.g. se=False, cmn=False,
    cra=False gives exactly VM-UNet: 27,427,561 parameters for the paper preset)."""
    if preset not in PRESETS:
        common.fail(f"unknown preset '{preset}' (choose from {', '.join(PRESETS)})")
    return CMSSMUNet(replace(PRESETS[preset], **overrides), num_classes)


# ==== 4b. Backbone (not this paper's contribution): VM-UNet (Ruan & Xiang 2024) ====
# Names follow VM-UNet's state_dict without its `vmunet.` prefix, so its checkpoints and the
# VMamba-S weights it starts from load as they are (spec 10).

class PatchEmbed2D(nn.Module):
    """4x4 patches -> C channels, channel-last, LayerNorm: (B, 3, H, W) -> (B, H/4, W/4, C)."""

    def __init__(self, in_chans, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=4, stride=4)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging2D(nn.Module):
    """(B, H, W, C) -> (B, H/2, W/2, 2C): the four 2x2 sub-grids on channels, LN, Linear."""

    def __init__(self, dim):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x):
        # sub-grid order of VM-UNet: (even, even), (odd, even), (even, odd), (odd, odd)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                      dim=-1)  # (B, H/2, W/2, 4C)
        return self.reduction(self.norm(x))


class PatchExpand2D(nn.Module):
    """(B, H, W, K) -> (B, sH, sW, K/s): Linear K -> sK, depth-to-space, LN (VM-UNet's
    PatchExpand2D for s = 2, its Final_PatchExpand2D for s = 4)."""

    def __init__(self, dim, scale=2):
        super().__init__()
        self.scale = scale
        self.expand = nn.Linear(dim, scale * dim, bias=False)
        self.norm = nn.LayerNorm(dim // scale)

    def forward(self, x):
        x, s = self.expand(x), self.scale  # (B, H, W, s*s*c)
        batch, height, width, c = x.shape[0], x.shape[1], x.shape[2], x.shape[3] // (s * s)
        # depth-to-space, channel index (p1 * s + p2) * c + k -> pixel (sh + p1, sw + p2), spec 1.4
        x = x.view(batch, height, width, s, s, c).permute(0, 1, 3, 2, 4, 5)
        return self.norm(x.reshape(batch, height * s, width * s, c))


class SS2D(nn.Module):
    """2-D selective scan (VMamba v0 as in VM-UNet, spec 2.3), (B, H, W, C) -> same shape.
    features(): in_proj -> (x, z); x: depthwise 3x3 conv, SiLU; an S6 scan (input-dependent
    Delta, B, C) in 4 directions, merged back row-major and summed; out_norm. output(): gate by
    SiLU(z), out_proj. The CM-SSM block puts SE between the two."""

    def __init__(self, d_model, d_state=16, expand=2, dt_min=0.001, dt_max=0.1, dt_floor=1e-4):
        super().__init__()
        d_inner, self.d_state = expand * d_model, d_state
        self.dt_rank = math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, 3, padding=1, groups=d_inner, bias=True)
        uni = lambda shape, bound: nn.Parameter(torch.empty(shape).uniform_(-bound, bound))  # noqa
        # per direction k: x -> (Delta rank R, B, C), four default nn.Linear inits stacked
        self.x_proj_weight = uni((4, self.dt_rank + 2 * d_state, d_inner), d_inner ** -0.5)
        self.dt_projs_weight = uni((4, d_inner, self.dt_rank), self.dt_rank ** -0.5)  # scale 1
        # dt bias: softplus(bias) log-uniform in [dt_min, dt_max], stored as inverse softplus
        dt = torch.exp(torch.rand(4, d_inner) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_floor)
        self.dt_projs_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        # S4D-real: A_n = -n for n = 1..N in every one of the 4D channels
        a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(4 * d_inner, 1)
        self.A_logs = nn.Parameter(torch.log(a))  # (4D, N)
        self.Ds = nn.Parameter(torch.ones(4 * d_inner))  # (4D)
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def scan(self, x):
        """Cross-scan, selective scan, cross-merge: (B, D, H, W) -> (B, D, L) row-major."""
        batch, d_inner, height, width = x.shape
        length = height * width  # L
        row = x.flatten(2)  # k=0: index h*W + w   (B, D, L)
        col = x.transpose(2, 3).flatten(2)  # k=1: index w*H + h
        xs = torch.stack([row, col, row.flip(-1), col.flip(-1)], dim=1)  # (B, 4, D, L)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)  # (B, 4, R+2N, L)
        dts, bs, cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)  # (B, 4, D, L)
        y = common.selective_scan(
            xs.float().reshape(batch, -1, length), dts.float().reshape(batch, -1, length),
            -torch.exp(self.A_logs.float()), bs.float(), cs.float(), self.Ds.float(),
            delta_bias=self.dt_projs_bias.float().flatten(), delta_softplus=True,
        ).view(batch, 4, d_inner, length)
        to_rows = lambda s: s.view(batch, d_inner, width, height).transpose(2, 3).flatten(2)  # noqa
        return y[:, 0] + y[:, 2].flip(-1) + to_rows(y[:, 1]) + to_rows(y[:, 3].flip(-1))

    def features(self, x):
        """(B, H, W, C) -> the normalised scan output y and the gate input z, (B, H, W, D) each."""
        batch, height, width, _ = x.shape
        x, z = self.in_proj(x).chunk(2, dim=-1)  # (B, H, W, D) each
        x = F.silu(self.conv2d(x.permute(0, 3, 1, 2)))  # (B, D, H, W)
        y = self.scan(x).transpose(1, 2).reshape(batch, height, width, -1)  # (B, H, W, D)
        return self.out_norm(y), z

    def output(self, y, z):
        return self.out_proj(y * F.silu(z))  # (B, H, W, C)

    def forward(self, x):
        return self.output(*self.features(x))


def load_pretrained(model, source, log=print, preset="paper", run=None):
    """VMamba-S / VM-UNet weights as VM-UNet's load_from (spec 10): encoder keys as they are and
    `layers.i` also as `layers_up.(3-i)` (same width), where names and shapes fit. `auto`: the
    preset's published file (paper preset only), fetched on rank 0. Returns the tensors loaded."""
    if source in (None, "", "none"):
        return 0
    if source == "auto":
        if preset not in PRETRAINED:
            log(f"pretrained auto: no published weights fit the {preset} preset (VMamba-S has "
                "C = 96, the paper preset); training starts from scratch")
            return 0
        url = PRETRAINED[preset]
        path = common.fetch_weights(url, url.rsplit("/", 1)[1], log,
                                    run.is_main if run else True, run.barrier if run else None)
        if path is None:
            return 0
    else:
        path = Path(source)
    # VMamba: `model_ema`/`model` beside a pickled yacs config; VM-UNet: latest.pth's
    # `model_state_dict` or best.pth's bare state dict. No code from the file ever runs.
    weights = common.tensor_dict(common.load_weights(path),
                                 ("model_ema", "model", "model_state_dict", "state_dict"))
    if weights is None:
        common.fail(f"--pretrained {path}: no dict of tensors in it (not VMamba / VM-UNet)")
    weights = {re.sub(r"^(module\.)?(vmunet\.)?", "", k): v for k, v in weights.items()}
    renamed = {re.sub(r"^layers\.(\d)\.", lambda g: f"layers_up.{3 - int(g[1])}.", k): v
               for k, v in weights.items() if k.startswith("layers.")}  # spec 10: i -> 3 - i
    tensors = {**renamed, **weights}  # a VM-UNet file's own decoder tensors win
    return common.load_matching(model, tensors, "pretrained", path, log)[0]


# ==== 5. Losses (Sec. 3.4) ====

def cross_feature_distillation(feature_maps, final):
    """Eq. (8): every block map imitates F_final, detached (SelfReg), average-pooled to its size;
    min(C_s, C_t) random channels of each are paired (RCS). The mean of the maps' MSEs."""
    losses = []
    for f_s in feature_maps:  # (B, C_s, h, w)
        f_t = F.adaptive_avg_pool2d(final.detach(), f_s.shape[-2:])  # AvgPool(F_final)
        k = min(f_s.shape[1], f_t.shape[1])
        idx_s = torch.randperm(f_s.shape[1], device=f_s.device)[:k]  # RCS
        idx_t = torch.randperm(f_t.shape[1], device=f_t.device)[:k]
        losses.append(F.mse_loss(f_s[:, idx_s], f_t[:, idx_t]))
    return torch.stack(losses).mean()  # Eq. (8)  T sum_m sum_I ||RCS(F_m) - AvgPool(F_final)||^2


def internal_feature_distillation(feature_maps):
    """Eq. (9): channels ranked by their L2-normalised mean response; the lower half (F-)
    imitates the upper half (F~) pairwise. Both halves get gradients (SelfReg's KDloss)."""
    losses = []
    for f in feature_maps:  # (B, C, H, W)
        with torch.no_grad():  # the ranking only orders channels
            score = F.normalize(f.flatten(2), dim=2).mean(dim=(0, 2))  # (C,)
        f = f[:, score.argsort(descending=True)]
        half = f.shape[1] // 2
        f_tilde, f_bar = f[:, :half], f[:, half:2 * half]  # (B, C/2, H, W) each
        losses.append(F.mse_loss(f_tilde, f_bar))
    return torch.stack(losses).mean()  # Eq. (9)  1/(|M||J|) sum_m sum_I ||F~_m - F-_m||^2


def feature_distillation_loss(features, lambda_cfd=LAMBDA_CFD, lambda_ifd=LAMBDA_IFD,
                              grouping="selfreg"):
    """Eq. (10) on CMSSMUNet's block maps -> (L_fd, L_CFD, L_IFD). selfreg (spec 6.2-6.3): the
    first and last block of every stage; L_CFD = mean over the last maps + mean over the first,
    L_IFD = four group means (encoder last, first, decoder first, last). paper: every block's map
    once, one mean each, as Eqs. (8)-(9) print T = 1/(|M-1||J|) and 1/(|M||J|)."""
    encoder, decoder = features["encoder"], features["decoder"]
    zero = features["final"].new_zeros(())
    cfd_groups = [[s[-1] for s in decoder + encoder], [s[0] for s in decoder + encoder]]
    ifd_groups = [[s[-1] for s in encoder], [s[0] for s in encoder], [s[0] for s in decoder],
                  [s[-1] for s in decoder]]
    if grouping == "paper":
        cfd_groups = ifd_groups = [[m for stage in encoder + decoder for m in stage]]
    l_cfd = zero if lambda_cfd == 0 else sum(  # Eq. (8), per group
        cross_feature_distillation(group, features["final"]) for group in cfd_groups)
    l_ifd = zero if lambda_ifd == 0 else sum(  # Eq. (9), per group
        internal_feature_distillation(group) for group in ifd_groups)
    return lambda_cfd * l_cfd + lambda_ifd * l_ifd, l_cfd, l_ifd  # Eq. (10)  l1 L_CFD + l2 L_IFD


def bce_dice_loss(logits, target, w_bce=W_BCE, w_dice=W_DICE):
    """Eq. (11), first three lines: l1 BCE + l2 soft Dice (smooth 1, per sample), VM-UNet's
    BceDiceLoss on sigmoid outputs. logits, target (B, 1, H, W); target in [0, 1]."""
    assert logits.shape == target.shape, (logits.shape, target.shape)
    l_bce = F.binary_cross_entropy_with_logits(logits, target)  # Eq. (11), L_Bce
    p, t = torch.sigmoid(logits).flatten(1), target.flatten(1)  # (B, HW)
    dice = (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)  # (B,): one Dice per image
    l_dice = 1 - dice.mean()  # Eq. (11), L_Dice = 1 - 2|X n Y| / (|X| + |Y|)
    return w_bce * l_bce + w_dice * l_dice  # Eq. (11), L_BceDice


def total_loss(logits, target, features=None, lambda_cfd=LAMBDA_CFD, lambda_ifd=LAMBDA_IFD,
               weights=(W_BCE, W_DICE), grouping="selfreg"):
    """Eq. (11): L_total = L_fd + L_BceDice; features None (validation): L_BceDice only.
    Returns the loss and its terms as floats {'seg', 'fd', 'cfd', 'ifd'}."""
    l_seg = bce_dice_loss(logits, target, *weights)
    if features is None or (lambda_cfd == 0 and lambda_ifd == 0):
        return l_seg, {"seg": l_seg.item(), "fd": 0.0, "cfd": 0.0, "ifd": 0.0}
    l_fd, l_cfd, l_ifd = feature_distillation_loss(features, lambda_cfd, lambda_ifd, grouping)
    return l_fd + l_seg, {"seg": l_seg.item(), "fd": l_fd.item(),  # Eq. (11), L_total
                          "cfd": l_cfd.item(), "ifd": l_ifd.item()}


# ==== 6. Data: input scaling, augmentation and the paper's 7:3 split ====

def normalise(x, mode="vmunet"):
    """Network input from images (B, 3, H, W) in [0, 1]. vmunet: per-image min-max to [0, 255]
    over all channels, VM-UNet's myNormalize (spec 8.2); standardise: per-channel z-scores."""
    if mode == "standardise":
        mean, std = x.mean(dim=(2, 3), keepdim=True), x.std(dim=(2, 3), keepdim=True)
        return (x - mean) / std.clamp_min(1e-3)
    low = x.amin(dim=(1, 2, 3), keepdim=True)
    high = x.amax(dim=(1, 2, 3), keepdim=True)
    return 255 * (x - low) / (high - low).clamp_min(1e-8)


class VMUNetAugment:
    """Horizontal flip, [vertical flip], rotation in [0, 360): each with p = 0.5 (Sec. 4.3; the
    vertical flip is VM-UNet's, spec 8.3). Rotation is nearest-neighbour with zero fill for image
    and mask, like TF.rotate. `fixed_angle` reproduces VM-UNet's one angle per run."""

    def __init__(self, fixed_angle=None, vflip=False):
        self.fixed_angle, self.vflip = fixed_angle, vflip

    def __call__(self, image, mask, rng):
        if rng.random() < 0.5:
            image, mask = image[:, ::-1], mask[:, ::-1]
        if self.vflip and rng.random() < 0.5:
            image, mask = image[::-1], mask[::-1]
        if rng.random() < 0.5:
            angle = self.fixed_angle if self.fixed_angle is not None else rng.uniform(0, 360)
            image = np.array(Image.fromarray(np.ascontiguousarray(image)).rotate(
                angle, Image.NEAREST))
            mask = np.array(Image.fromarray(np.ascontiguousarray(mask, np.uint8)).rotate(
                angle, Image.NEAREST)) > 0
        return np.array(image), np.array(mask)


def load_isic(args, augment):
    """common.load_data's dict under the paper's protocol (Sec. 4.1): --split paper re-splits
    ISIC 2017/2018 7:3 from their official train + val images (2150 -> 1505 / 645, 2694 -> 1886
    / 808; the official test part is unused); every other layout keeps its split (ISIC 2016:
    900 / 379; VM-UNet's folders: 7:3) or, without one, gets a seeded 7:3."""
    held = PAPER_FRACTIONS[0] * args.val_fraction  # only when asked for (the paper has none)
    data = common.load_data(args, "binary", augment, args.toy_sizes, fractions=(
        PAPER_FRACTIONS[0] - held, held, PAPER_FRACTIONS[2]), **UNIT)
    resplit = data["layout"] in RESPLIT_LAYOUTS and not args.eval
    data["protocol"] = PROTOCOL.get(data["layout"], "not a paper data set: seeded 7:3 split")
    if not resplit or args.split == "official":
        data["protocol"] = f"{data['layout']}, official split" if resplit else data["protocol"]
        return data
    pool = sorted(data["pairs"]["train"] + data["pairs"]["val"],
                  key=lambda p: common.natural_key(p["image"]))
    random.Random(args.seed).shuffle(pool)
    n_test = round(PAPER_FRACTIONS[2] * len(pool))  # Sec. 4.1: 7:3
    n_val = round(args.val_fraction * (len(pool) - n_test))  # held out of the 70 %
    parts = {"test": pool[:n_test], "val": pool[n_test:n_test + n_val],
             "train": pool[n_test + n_val:]}
    make = lambda split, aug: common.PairDataset(parts[split], args.img_size, aug,  # noqa: E731
                                                 seed=args.seed, **UNIT)
    data.update(train=make("train", augment), val=make("val", None) if n_val else None,
                test={"test": make("test", None)},
                source=f"{args.data}: seeded 7:3 split of the {len(pool)} official train+val "
                       f"pairs (seed {args.seed})",
                splits={k: [p["image"] for p in v] for k, v in parts.items()})
    return data


# ==== 7. Train, evaluate, predict ====

def train_one_epoch(model, loader, optimizer, device, loss_args, input_norm="vmunet", amp=False,
                    scaler=None, limit_batches=0, show_progress=True):
    """One pass over `loader`: the mean total loss and each term; loss_args: total_loss's."""
    model.train()
    use_fd = loss_args.get("lambda_cfd", LAMBDA_CFD) + loss_args.get("lambda_ifd", LAMBDA_IFD) > 0
    half = torch.float16 if device.type == "cuda" else torch.bfloat16  # the scan stays fp32
    sums, count = dict.fromkeys(("loss", "seg", "fd", "cfd", "ifd"), 0.0), 0
    for step, batch in enumerate(common.progress(loader, "train", show_progress)):
        if limit_batches and step >= limit_batches:
            break
        x = normalise(batch["image"].to(device), input_norm)  # (B, 3, S, S)
        target = batch["mask"].to(device)  # (B, 1, S, S)
        with torch.autocast(device.type, dtype=half, enabled=amp):
            out = model(x, return_features=use_fd)
            logits, features = out if use_fd else (out, None)
            loss, parts = total_loss(logits.float(), target, features, **loss_args)
        optimizer.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler else loss).backward()
        scaler.step(optimizer) if scaler else optimizer.step()
        if scaler:
            scaler.update()
        for key, value in {"loss": loss.item(), **parts}.items():
            sums[key] += value * x.shape[0]
        count += x.shape[0]
    return {key: value / max(count, 1) for key, value in sums.items()}


@torch.no_grad()
def predict(model, images, size=None, input_norm="vmunet"):
    """Probabilities (B, 1, h, w) for images (B, 3, S, S) in [0, 1], resized to `size` (h, w)."""
    logits = model(normalise(images, input_norm))
    if size is not None and tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    return torch.sigmoid(logits.float())


@torch.no_grad()
def evaluate(model, dataset, device, batch_size=8, save_dir=None, max_overlays=50,
             with_loss=False, input_norm="vmunet", weights=(W_BCE, W_DICE)):
    """The paper's columns mIoU, DSC, Acc (+ Sen, Spe) as fractions: one confusion matrix over
    all test pixels at 0.5 at the network's size, as VM-UNet's engine.py (Eqs. 12-14).
    save_dir: mask PNGs and overlays at each image's own size."""
    model.eval()
    meter = common.GlobalMeter(THRESHOLD)
    loss_sum, seen = 0.0, 0
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
    for batch in common.make_loader(dataset, batch_size, train=False):
        images, masks = batch["image"].to(device), batch["mask"].to(device)
        logits = model(normalise(images, input_norm)).float()  # (B, 1, S, S)
        loss_sum += bce_dice_loss(logits, masks, *weights).item() * images.shape[0]
        for prob, mask, index in zip(torch.sigmoid(logits), masks, batch["index"].tolist()):
            meter.update(prob[0].cpu().numpy(), mask[0].cpu().numpy())
            if save_dir is not None:  # at the image's own size
                image_full, mask_full = dataset.full(index)
                pred = F.interpolate(prob[None], size=mask_full.shape, mode="bilinear")[0, 0]
                path = Path(save_dir) / dataset.names[index]
                common.save_mask_png(f"{path}.png", (pred >= THRESHOLD).cpu().numpy())
                if seen < max_overlays:
                    common.save_overlay(f"{path}_overlay.png", image_full,
                                        (pred >= THRESHOLD).cpu().numpy(), mask_full)
            seen += 1
    scores = meter.compute()
    return {"mIoU": scores["iou"],  # Eq. (12)  mIoU = TP / (TP + FP + FN)
            "DSC": scores["dice"],  # Eq. (13)  DSC = 2TP / (2TP + FP + FN)
            "Acc": scores["accuracy"],  # Eq. (14)  Acc = (TP + TN) / N
            "Sen": scores["recall"], "Spe": scores["specificity"],
            **({"loss": loss_sum / max(seen, 1)} if with_loss else {})}


# ==== 8. Command line ====

def build_parser():
    parser = argparse.ArgumentParser(description="CM-SSM U-Net (Ke et al.) on a VM-UNet.")
    common.add_common_args(parser, PAPER_RECIPE, "Sec. 4.3", pretrained_default=None)
    parser.set_defaults(val_fraction=0.0)  # the paper has no validation set (Sec. 4.1)
    group = parser.add_argument_group("CM-SSM U-Net: ablations (Tab. 4-5), reconstruction "
                                      "choices and protocol (see the docstring)")
    for flag, text in (("no-se", "drop SE (Tab. 4)"), ("no-cmn", "drop the CMN (Tab. 4)"),
                       ("no-cra", "plain skips, no CRA (Tab. 4)"), ("no-cfd", "no L_CFD (Tab. 5)"),
                       ("no-ifd", "no L_IFD (Tab. 5)"), ("cra-no-bn", "no BatchNorm in CRA's F1"),
                       ("cmn-no-residual", "no inner residual around CMN's depthwise conv"),
                       ("vflip", "add VM-UNet's vertical flip (paper: h-flip, rotation)"),
                       ("vmunet-rotation", "one rotation angle per run, as VM-UNet's code")):
        group.add_argument(f"--{flag}", action="store_true", help=text)
    choices = (("se-position", ["scan", "block"], "SE before the gate (MSVMamba) or after it"),
               ("cra-act", ["hswish", "relu"], "delta of Eq. (4) (coordinate attention)"),
               ("fd-grouping", ["selfreg", "paper"], "FD group means as SelfReg, or as printed"),
               ("input-norm", ["auto", "vmunet", "standardise"],
                "auto: VM-UNet's [0, 255] with its weights, z-scores from scratch"),
               ("split", ["paper", "official"], "7:3 re-split of ISIC 2017/2018 (Sec. 4.1)"))
    for flag, options, text in choices:
        group.add_argument(f"--{flag}", choices=options, default=options[0],
                           help=f"{text} (default {options[0]})")
    for flag, text in (("se-reduction", "SE ratio (spec 4.3: 8)"), ("cmn-expansion", "CMN "
                       "width (spec 4.3: 2)"), ("t-max", "cosine period (paper 50; toy: epochs)")):
        group.add_argument(f"--{flag}", type=int, default=None, help=text)
    group.add_argument("--loss-weights", default=f"{W_BCE},{W_DICE}",
                       help="BCE,Dice weights (paper: 0.3,0.7, Eq. 11; VM-UNet: 1,1)")
    group.add_argument("--toy-sizes", default=",".join(map(str, TOY_SIZES)),
                       help="toy train,val,test image counts (default %(default)s)")
    return parser


def parse_args(argv):
    """Parsed and checked flags, plus the set of flags given explicitly."""
    parser = build_parser()
    raw = parser.parse_args(argv)
    if raw.bench:  # the paper preset at the paper size; batch 2 fits a CPU's memory (3 GB)
        raw.preset, raw.img_size = raw.preset or "paper", raw.img_size or PAPER_RECIPE["img_size"]
        raw.batch_size = raw.batch_size or 2
    args = common.finish_args(raw, PAPER_RECIPE, TOY_RECIPE)
    args.t_max = args.t_max or (T_MAX if args.data != "toy" else args.epochs)
    if args.resume and not args.out:  # continue in the resumed run's folder
        args.out = str(Path(args.resume).parent)
    try:
        args.toy_sizes = tuple(int(n) for n in args.toy_sizes.split(","))
        args.weights = tuple(float(w) for w in args.loss_weights.split(","))
        assert len(args.toy_sizes) == 3 and min(args.toy_sizes) >= 1 and len(args.weights) == 2
    except (ValueError, AssertionError):
        common.fail(f"--toy-sizes {args.toy_sizes} / --loss-weights {args.loss_weights}: give "
                    "three positive counts (160,20,40) and two weights (0.3,0.7)")
    for bad, message in ((args.t_max < 1, f"--t-max {args.t_max}: must be >= 1"),
                         (args.img_size % 32, f"--img-size {args.img_size}: must be a multiple "
                          "of 32 (4x patches, 3 merges)"),
                         (min(args.se_reduction or 1, args.cmn_expansion or 1) < 1,
                          "--se-reduction and --cmn-expansion must be at least 1"),
                         (args.pretrained not in ("auto", "none") and not Path(
                             args.pretrained).is_file(), f"--pretrained {args.pretrained}: no "
                          "such file (give a path, auto or none)")):
        if bad:
            common.fail(message)
    if args.input_norm == "auto":  # VM-UNet's scaling belongs to its starting weights
        weights = args.pretrained != "none" and (args.pretrained != "auto" or
                                                 args.preset in PRETRAINED)
        args.input_norm = "vmunet" if weights else "standardise"
    return args, common.explicit_flags(parser, argv)


def settings(args):
    """(preset overrides, total_loss keywords) from the Tab. 4-5 switches and the choices."""
    overrides = {"se": not args.no_se, "cmn": not args.no_cmn, "cra": not args.no_cra,
                 "se_position": args.se_position, "cmn_residual": not args.cmn_no_residual,
                 "cra_act": args.cra_act, "cra_bn": not args.cra_no_bn}
    overrides.update({name: getattr(args, name) for name in ("se_reduction", "cmn_expansion")
                      if getattr(args, name) is not None})
    return overrides, {"lambda_cfd": 0.0 if args.no_cfd else LAMBDA_CFD,
                       "lambda_ifd": 0.0 if args.no_ifd else LAMBDA_IFD,
                       "weights": tuple(args.weights), "grouping": args.fd_grouping}


def run_bench(args, run):
    """One JSON line: parameters, train and inference images/s, peak memory."""
    model = build_model(args.preset, **settings(args)[0]).to(run.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=WEIGHT_DECAY)
    x = torch.rand(args.batch_size, 3, args.img_size, args.img_size, device=run.device)

    def train_step():
        model.train()
        logits, features = model(normalise(x), return_features=True)
        loss, _ = total_loss(logits, (x[:, :1] > 0.5).float(), features)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    record = common.benchmark(model, train_step, lambda: predict(model.eval(), x),
                              args.batch_size, run.device, repeats=1, script="cmssm_unet",
                              preset=args.preset, img_size=args.img_size,
                              scan=common.scan_backend(x))
    print(json.dumps(record), flush=True)
    return record


def run_predict(args, run, checkpoint):
    """Write one mask PNG per image of args.predict into <out>/predictions."""
    model = build_model(args.preset, **settings(args)[0]).to(run.device).eval()
    model.load_state_dict(checkpoint["model"])
    files, folder = common.list_images(args.predict), run.folder() / "predictions"
    for path in files:
        image = common.load_image(path)
        x = torch.from_numpy(np.array(common.resize_image(image, args.img_size)))
        prob = predict(model, x.permute(2, 0, 1)[None].to(run.device) / 255,
                       size=image.shape[:2], input_norm=args.input_norm)[0, 0]
        common.save_mask_png(folder / f"{path.stem}.png", (prob >= THRESHOLD).cpu().numpy())
    run.log(f"wrote {len(files)} masks to {folder}")
    return {"predicted": len(files), "out": str(folder)}


def log_protocol(run, args, data):
    """Print the protocol row that applies (docstring table) and what this run does."""
    tested = "lowest validation loss" if data["val"] is not None else "last epoch (no val)"
    sizes = [f"{k} {len(v)}" for k, v in (("train", data["train"]), ("val", data["val"] or []),
                                           *((f"test[{g}]", d) for g, d in data["test"].items()))]
    run.log(f"cmssm_unet: preset {args.preset} ({args.preset_reason}), device {run.device}\n"
            f"  protocol: {data['protocol']}; {data['source']}; {', '.join(sizes)}")
    if not args.eval:
        run.log(f"  recipe: {args.epochs} epochs, batch {args.batch_size}, AdamW lr {args.lr} "
                f"wd {WEIGHT_DECAY}, cosine T_max {args.t_max} floor {ETA_MIN}, {args.img_size} "
                f"px, input {args.input_norm}, pretrained {args.pretrained}; tested: {tested}")
    if data["splits"] is not None:
        run.save_json("splits.json", data["splits"])


def test_all(model, data, args, run):
    """Score every test group, print the table, write test_metrics.json and predictions/."""
    metrics = {}
    for group, dataset in data["test"].items():
        folder = run.folder() / "predictions" / group if run.is_main else None
        metrics[group] = evaluate(model, dataset, run.device, args.batch_size, folder,
                                  input_norm=args.input_norm)
    columns = ("mIoU", "DSC", "Acc", "Sen", "Spe")
    run.log(f"{'test set':<12}" + "".join(f"{k + ' %':>9}" for k in columns))
    for group, row in metrics.items():
        run.log(f"{group:<12}" + "".join(f"{100 * row[k]:>9.2f}" for k in columns))
    run.save_json("test_metrics.json", metrics)
    return metrics


def main(argv=None):
    args, explicit = parse_args(argv)
    checkpoint, flag = None, next((f for f in ("eval", "resume") if getattr(args, f)), None)
    if flag or args.predict:  # its architecture flags replace the command line's
        flag = flag or "checkpoint"
        checkpoint = common.load_checkpoint(getattr(args, flag), "cmssm_unet", f"--{flag}")
        common.adopt_config(args, checkpoint, ARCH_KEYS, explicit, f"--{flag}")
    common.seed_everything(args.seed)  # plus the rank under torchrun
    run = common.Run(args, "cmssm_unet")
    if args.bench:
        return run_bench(args, run)
    if args.predict:
        return run_predict(args, run, checkpoint)
    fixed = random.Random(args.seed).uniform(0, 360) if args.vmunet_rotation else None
    data = load_isic(args, VMUNetAugment(fixed, args.vflip))
    log_protocol(run, args, data)
    overrides, losses = settings(args)
    model = build_model(args.preset, **overrides).to(run.device)
    if args.eval:
        model.load_state_dict(checkpoint["model"])
        metrics = test_all(model, data, args, run)
        run.close()
        return metrics
    if not args.resume:
        load_pretrained(model, args.pretrained, run.log, args.preset, run)
    n_params = sum(p.numel() for p in model.parameters())
    run.log(f"model: {n_params:,} parameters; {overrides}; losses {losses}")
    if run.distributed:
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=WEIGHT_DECAY)
    scaler = torch.amp.GradScaler("cuda") if args.amp and run.device.type == "cuda" else None
    loader = common.make_loader(data["train"], args.batch_size, train=True,
                                workers=args.workers, seed=args.seed)
    run.save_json("config.json", {**vars(args), "preset_values": asdict(PRESETS[args.preset]),
                                  "overrides": overrides, "losses": losses, "parameters": n_params,
                                  "data_source": data["source"], "world_size": run.world,
                                  "weight_decay": WEIGHT_DECAY})
    start = run.restore(checkpoint, model, optimizer, scaler) if args.resume else 0

    for epoch in range(start, args.epochs):
        began = time.time()
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        lr = ETA_MIN + (args.lr - ETA_MIN) * (1 + math.cos(math.pi * epoch / args.t_max)) / 2
        common.set_lr(optimizer, lr)  # Sec. 4.3: cosine, from the epoch (resume-safe)
        train = train_one_epoch(model, loader, optimizer, run.device, losses, args.input_norm,
                                args.amp, scaler, args.limit_batches, run.is_main)
        row = {"epoch": epoch, "lr": lr, **{f"train_{k}": v for k, v in train.items()}}
        score = None  # no validation: best.pt is the last epoch
        if data["val"] is not None:  # every rank scores the whole validation set
            val = evaluate(common.unwrap(model), data["val"], run.device, args.batch_size,
                           with_loss=True, input_norm=args.input_norm, weights=args.weights)
            row.update(val_loss=val["loss"], val_dice=val["DSC"], val_miou=val["mIoU"])
            score = val["loss"]  # VM-UNet keeps the lowest validation loss
        row["seconds"] = round(time.time() - began, 1)
        state = {"model": common.unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict() if scaler else None, "config": vars(args),
                 "preset": args.preset, "overrides": overrides}
        run.end_epoch(epoch, row, state, score, higher_is_better=False)

    common.unwrap(model).load_state_dict(run.final_weights("best"))  # = last without validation
    metrics = test_all(common.unwrap(model), data, args, run) if run.is_main else {}
    run.close()
    return metrics


if __name__ == "__main__":
    common.cli(main)
