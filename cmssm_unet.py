"""CM-SSM U-Net: VM-UNet with inter-channel (SE + channel mixing) and spatial (cross-region
attention) feature enhancement, trained with a feature-distillation loss.

Z. Ke, Y. Wang, R. Guo, M. Du, J.-S. Zhou, G. Wang, Y. Zhang, "An Effective Algorithm for Skin
Disease Segmentation Combining inter-channel Features and Spatial Feature Enhancement" (text:
papers/cmssm_unet.txt). No code was released; the model is rebuilt from VM-UNet's official code
(github.com/JCruan519/VM-UNet, models/vmunet/vmamba.py), MSVMamba's SE + ConvFFN block, coordinate
attention (houqb/CoordAttention) and SelfReg-UNet's FDLoss (specs/cmssm_unet.md, decisions in 11).

Idea. VM-UNet is a U-Net of visual state-space (VSS) blocks: each block scans the feature map in
four directions with a selective state-space model (SS2D). CM-SSM U-Net (i) re-weights the
scan's output channels by squeeze-excitation (SE) and adds a channel mixing network (CMN) to every
block (the CM-SSM block), (ii) passes each skip connection through cross-region attention (CRA),
which pools along rows and columns to weight every position, and (iii) adds two self-distillation
losses: every block's features imitate the final decoder feature (CFD) and the weaker half of each
map's channels imitates the stronger half (IFD).

Equation map:
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
(Eq. (1) is the global pooling the paper shows before CRA; the code computes it as SE's squeeze.)

Glossary (paper symbol | code name | shape; B batch, C width, D = 2C, N state size, L = H*W):
  x, y (CRA) | x, out | (B, C, H, W)       z^h, z^w | z_h, z_w | (B, C, H, 1), (B, C, W, 1)
  f, f^h, f^w | f, f_h, f_w | (B, C/r, H+W, 1)  g^h, g^w | g_h, g_w | (B, C, H, 1), (B, C, 1, W)
  z_c (SE) | z | (B, D)    F_m^l | feature maps | (B, C_i, H_i, W_i)
  F_final | final | (B, C/4, H, W)    F~, F- (IFD) | f_tilde, f_bar | (B, C_i/2, H_i, W_i)
  lambda_1, lambda_2 (Eq. 10) | lambda_cfd, lambda_ifd   lambda_1, lambda_2 (Eq. 11) | W_BCE, W_DICE
  Delta, A, B, C, D (SS2D) | dts, A_logs, Bs, Cs, Ds | (B, 4D, L), (4D, N), (B, 4, N, L), (4D)

Deviations and gap decisions (switch in brackets):
- Evaluation pools one confusion matrix over the test set at 256x256 against the resized masks,
  as VM-UNet does [--eval-original-size scores at each image's own size; --per-image averages
  per-image scores].
- Masks are resized nearest-neighbour by common.py (VM-UNet: bilinear, so soft training targets
  and test masks thresholded at 0.5; no switch).
- VM-UNet draws ONE rotation angle for the whole run (a bug); we draw one per sample
  [--vmunet-rotation restores the fixed angle]. Flips and rotation run after resizing.
- VM-UNet keeps the checkpoint with the lowest loss on its test folder; we hold out
  --val-fraction of train for that choice [--val-fraction 0: no validation, best = last].
- Splits: a layout's own split, else the paper's seeded 70/30 [--split 70-30 re-splits the
  official train+val of ISIC 2017/2018 as VM-UNet's package did; --split official].
- --pretrained defaults to auto with real data (VM-UNet starts from VMamba-S; the paper does not
  say) and none with toy data.
- BCE is computed from logits (VM-UNet: BCELoss on sigmoid outputs; same value, no clamping).
- FD features: first and last block output of all 8 stages; F_final = output of the final x4
  expansion (24 channels at C = 96); random channels by torch.randperm (spec 6.3).
  [--no-cfd, --no-ifd; ablations of Tab. 4: --no-se, --no-cmn, --no-cra]

Run:
  python cmssm_unet.py        # toy data, small preset: 2 min on 2 CPU cores, test DSC 0.90
  python cmssm_unet.py --data data/isic2017   # paper recipe (Sec. 4.3), VMamba-S weights (auto)
  python cmssm_unet.py --data DIR --eval runs/cmssm_unet/X/best.pt
  python cmssm_unet.py --predict images/ --checkpoint best.pt --out preds
  python cmssm_unet.py --bench          # paper preset, 256x256, batch 2 (or --img-size 128)
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

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: idle threads
# that spin made a training step ~8x slower on our shared 2-core machine
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

import common  # noqa: E402

# ==== 2. Presets and recipe ====


@dataclass(frozen=True)
class Preset:
    """Architecture of one preset; the switches of Tab. 4 are the three booleans."""
    dims: int           # C, width of stage 1
    depths: tuple       # blocks per encoder stage
    depths_decoder: tuple  # blocks per decoder stage
    d_state: int        # N, SSM state size
    drop_path: float    # stochastic depth, largest rate
    se_reduction: int   # SE hidden width = D / r
    cmn_expansion: int  # CMN hidden width = e * C
    cra_reduction: int  # CRA hidden width = max(min, C / r)
    cra_min_width: int
    se: bool = True
    cmn: bool = True
    cra: bool = True


PRESETS = {
    "paper": Preset(
        dims=96,                   # Sec. 3.1 (C = 96)
        depths=(2, 2, 2, 2),       # Sec. 3.1
        depths_decoder=(2, 2, 2, 1),  # Sec. 3.1
        d_state=16,                # spec 2.2 (VM-UNet config)
        drop_path=0.2,             # spec 1.2 (VM-UNet config)
        se_reduction=8,            # spec 4.3 (MSVMamba SEModule)
        cmn_expansion=2,           # spec 4.3 (MSVMamba ConvFFN)
        cra_reduction=32,          # spec 5.2 (coordinate attention default)
        cra_min_width=8),          # spec 5.2
    "small": Preset(dims=16, depths=(1, 1, 1, 1), depths_decoder=(1, 1, 1, 1), d_state=8,
                    drop_path=0.0, se_reduction=8, cmn_expansion=2, cra_reduction=32,
                    cra_min_width=8),
    "tiny": Preset(dims=8, depths=(1, 1, 1, 1), depths_decoder=(1, 1, 1, 1), d_state=4,
                   drop_path=0.1, se_reduction=4, cmn_expansion=2, cra_reduction=32,
                   cra_min_width=4),
}
PAPER_RECIPE = {"epochs": 300, "batch_size": 32, "lr": 1e-3, "img_size": 256}  # Sec. 4.3
TOY_RECIPE = {"epochs": 10, "batch_size": 8, "lr": 3e-3, "img_size": 64}
TOY_SIZES = (160, 20, 40)   # toy train / val / test images
WEIGHT_DECAY = 1e-2         # spec 7 (VM-UNet config; the paper names AdamW only)
T_MAX, ETA_MIN = 50, 1e-5   # Sec. 4.3: cosine annealing, cap 50, floor 1e-5
LAMBDA_CFD = LAMBDA_IFD = 0.015  # Sec. 3.4, Eq. (10)
W_BCE, W_DICE = 0.3, 0.7    # Sec. 3.4, Eq. (11)
THRESHOLD = 0.5             # spec 9 (VM-UNet engine.py)
PRETRAINED_URL = ("https://github.com/MzeroMiko/VMamba/releases/download/%2320240218/"
                  "vssmsmall_dp03_ckpt_epoch_238.pth")  # VMamba-S, the weights VM-UNet starts from


# ==== 3. Building blocks (Sec. 3.2-3.3) ====

class SqueezeExcitation(nn.Module):
    """SE after the 2-D scan (Sec. 3.2): re-weights the D scan channels by their global context.

    (B, H, W, D) -> same shape. Hidden width D / r, no biases, ReLU then sigmoid (spec 4.3).
    """

    def __init__(self, channels, reduction):
        super().__init__()
        self.fc1 = nn.Linear(channels, channels // reduction, bias=False)
        self.fc2 = nn.Linear(channels // reduction, channels, bias=False)

    def forward(self, y):
        z = y.mean(dim=(1, 2))  # Eq. (1)  z_c = 1/(HW) sum_ij x_c(i, j)   (B, D)
        weight = torch.sigmoid(self.fc2(F.relu(self.fc1(z))))  # (B, D)
        return y * weight[:, None, None, :]


class ChannelMixingNetwork(nn.Module):
    """CMN (Sec. 3.2): FC expands C -> eC, a depthwise 3x3 conv mixes locally on the expanded
    channels (with an inner residual, as MSVMamba's ConvFFN), GELU, FC restores eC -> C.

    (B, H, W, C) -> same shape; the FCs are 1x1 convs (spec 4.3).
    """

    def __init__(self, dim, expansion):
        super().__init__()
        hidden = dim * expansion
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        a = self.fc1(x.permute(0, 3, 1, 2))  # (B, eC, H, W)
        a = F.gelu(a + self.dwconv(a))
        return self.fc2(a).permute(0, 2, 3, 1)  # (B, H, W, C)


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch per sample, scale the kept ones by 1/keep."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = 1 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class CMSSMBlock(nn.Module):
    """CM-SSM block (Sec. 3.2, Fig. 2; spec 4.3), (B, H, W, C) -> same shape:

        u = x + DropPath(SS2D_SE(LN_1(x)));   y = u + DropPath(CMN(LN_2(u)))

    With se=False and cmn=False this is VM-UNet's VSS block, parameter names included.
    """

    def __init__(self, dim, drop_path, d_state, se_reduction=0, cmn_expansion=0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.self_attention = SS2D(dim, d_state, se_reduction=se_reduction)
        self.drop_path = DropPath(drop_path)
        self.cmn = None
        if cmn_expansion:
            self.ln_2 = nn.LayerNorm(dim)
            self.cmn = ChannelMixingNetwork(dim, cmn_expansion)

    def forward(self, x):
        x = x + self.drop_path(self.self_attention(self.ln_1(x)))
        if self.cmn is not None:
            x = x + self.drop_path(self.cmn(self.ln_2(x)))
        return x


class CrossRegionAttention(nn.Module):
    """CRA at a skip connection (Sec. 3.3, Fig. 3): coordinate attention (Hou et al. 2021).

    (B, C, H, W) -> same shape. F1 = 1x1 conv C -> m, BatchNorm, h-swish (the delta of Eq. 4);
    m = max(min_width, C / r); T_h, T_w = 1x1 convs m -> C (spec 5.2).
    """

    def __init__(self, channels, reduction=32, min_width=8):
        super().__init__()
        width = max(min_width, channels // reduction)
        self.conv1 = nn.Conv2d(channels, width, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.act = nn.Hardswish()
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
        self.upsample = PatchExpand2D(dim) if upsample else None
        self.blocks = nn.ModuleList(
            CMSSMBlock(dim, rate, preset.d_state, preset.se_reduction if preset.se else 0,
                       preset.cmn_expansion if preset.cmn else 0) for rate in rates)
        self.downsample = PatchMerging2D(dim) if downsample else None

    def forward(self, x):
        if self.upsample is not None:
            x = self.upsample(x)  # (B, 2H, 2W, C/2)
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        if self.downsample is not None:
            x = self.downsample(x)  # (B, H/2, W/2, 2C)
        return x, outputs


class CMSSMUNet(nn.Module):
    """CM-SSM U-Net (Sec. 3.1, Fig. 1) on VM-UNet's skeleton (spec 1).

    Patch embedding (x4 down) -> 4 encoder stages [C, 2C, 4C, 8C] -> 4 decoder stages
    [8C, 4C, 2C, C]; decoder stages 2-4 add a skip (the input of encoder stage 4, 3, 2, through
    CRA when on) before their patch expanding -> final x4 expansion to C/4 channels -> 1x1 conv.
    Input (B, 3, H, W) with H, W divisible by 32; output logits (B, K, H, W).
    """

    def __init__(self, preset, num_classes=1, in_chans=3):
        super().__init__()
        self.preset = preset
        c = preset.dims
        dims, dims_decoder = [c, 2 * c, 4 * c, 8 * c], [8 * c, 4 * c, 2 * c, c]
        self.patch_embed = PatchEmbed2D(in_chans, c)
        rates = np.linspace(0, preset.drop_path, sum(preset.depths)).tolist()
        rates_decoder = np.linspace(0, preset.drop_path, sum(preset.depths_decoder)).tolist()
        rates_decoder = rates_decoder[::-1]  # spec 1.6: largest rate at the bottleneck
        self.layers, self.layers_up = nn.ModuleList(), nn.ModuleList()
        for i in range(4):
            start, depth = sum(preset.depths[:i]), preset.depths[i]
            self.layers.append(Stage(dims[i], rates[start:start + depth], preset,
                                     downsample=i < 3))
            start, depth = sum(preset.depths_decoder[:i]), preset.depths_decoder[i]
            self.layers_up.append(Stage(dims_decoder[i], rates_decoder[start:start + depth],
                                        preset, upsample=i > 0))
        self.final_up = FinalPatchExpand2D(c)
        self.final_conv = nn.Conv2d(c // 4, num_classes, 1)
        self.skip_attention = None
        if preset.cra:  # on the skips into decoder stages 2, 3, 4 (widths 8C, 4C, 2C)
            self.skip_attention = nn.ModuleList(
                CrossRegionAttention(width, preset.cra_reduction, preset.cra_min_width)
                for width in dims_decoder[:3])
        self.apply(_init_weights)

    def forward(self, x, return_features=False):
        """Logits (B, K, H, W); with return_features also a dict of the FD feature maps."""
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
        to_bchw = lambda maps: [m.permute(0, 3, 1, 2) for m in maps]  # noqa: E731
        features = {"encoder_first": to_bchw(o[0] for o in encoder),
                    "encoder_last": to_bchw(o[-1] for o in encoder),
                    "decoder_first": to_bchw(o[0] for o in decoder),
                    "decoder_last": to_bchw(o[-1] for o in decoder), "final": final}
        return logits, features


def _init_weights(module):
    """VM-UNet's init (spec 1.7): Linear trunc-normal std .02, bias 0; LayerNorm 1, 0."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


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


def depth_to_space(x, scale):
    """(B, H, W, s*s*c) -> (B, sH, sW, c), channel index = (p1 * s + p2) * c + k (spec 1.4)."""
    batch, height, width, channels = x.shape
    c = channels // (scale * scale)
    x = x.view(batch, height, width, scale, scale, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, height * scale, width * scale, c)


class PatchExpand2D(nn.Module):
    """(B, H, W, 2c) -> (B, 2H, 2W, c): Linear 2c -> 4c, depth-to-space, LN. `dim` = c."""

    def __init__(self, dim):
        super().__init__()
        self.expand = nn.Linear(2 * dim, 4 * dim, bias=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(depth_to_space(self.expand(x), 2))


class FinalPatchExpand2D(nn.Module):
    """(B, H/4, W/4, C) -> (B, H, W, C/4): Linear C -> 4C, 4x4 depth-to-space, LN."""

    def __init__(self, dim):
        super().__init__()
        self.expand = nn.Linear(dim, 4 * dim, bias=False)
        self.norm = nn.LayerNorm(dim // 4)

    def forward(self, x):
        return self.norm(depth_to_space(self.expand(x), 4))


class SS2D(nn.Module):
    """2-D selective scan (VMamba v0 as in VM-UNet, spec 2.3), (B, H, W, C) -> same shape.

    in_proj -> (x, z); x: depthwise 3x3 conv, SiLU; scan x in 4 directions with an S6 model
    whose Delta, B, C depend on the input; merge the 4 back in row-major order and sum;
    out_norm; [SE of the CM-SSM block]; gate by SiLU(z); out_proj.
    """

    def __init__(self, d_model, d_state=16, expand=2, se_reduction=0, dt_min=0.001, dt_max=0.1,
                 dt_floor=1e-4):
        super().__init__()
        d_inner, self.d_state = expand * d_model, d_state
        self.dt_rank = math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, 3, padding=1, groups=d_inner, bias=True)
        # Per direction k: x -> (Delta rank R, B, C); four default nn.Linear inits stacked.
        bound = d_inner ** -0.5
        self.x_proj_weight = nn.Parameter(
            torch.empty(4, self.dt_rank + 2 * d_state, d_inner).uniform_(-bound, bound))
        bound = self.dt_rank ** -0.5  # dt_scale = 1, dt_init "random"
        self.dt_projs_weight = nn.Parameter(
            torch.empty(4, d_inner, self.dt_rank).uniform_(-bound, bound))
        # dt bias: softplus(bias) log-uniform in [dt_min, dt_max], stored as inverse softplus
        dt = torch.exp(torch.rand(4, d_inner) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_floor)
        self.dt_projs_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        # S4D-real: A_n = -n for n = 1..N in every one of the 4D channels
        a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(4 * d_inner, 1)
        self.A_logs = nn.Parameter(torch.log(a))  # (4D, N)
        self.Ds = nn.Parameter(torch.ones(4 * d_inner))  # (4D)
        self.out_norm = nn.LayerNorm(d_inner)
        self.se = SqueezeExcitation(d_inner, se_reduction) if se_reduction else None
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def scan(self, x):
        """Cross-scan, selective scan, cross-merge: (B, D, H, W) -> (B, D, L) row-major."""
        batch, d_inner, height, width = x.shape
        length = height * width
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

    def forward(self, x):
        batch, height, width, _ = x.shape
        x, z = self.in_proj(x).chunk(2, dim=-1)  # (B, H, W, D) each
        x = F.silu(self.conv2d(x.permute(0, 3, 1, 2)))  # (B, D, H, W)
        y = self.scan(x).transpose(1, 2).reshape(batch, height, width, -1)  # (B, H, W, D)
        y = self.out_norm(y)
        if self.se is not None:  # Sec. 3.2: SE on the re-assembled scan features
            y = self.se(y)
        return self.out_proj(y * F.silu(z))


def _read_weights(path):
    """The tensor dict of a checkpoint file (VMamba: 'model_ema' or 'model'; VM-UNet: flat)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # VMamba checkpoints also pickle their yacs config
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:
            common.fail(f"--pretrained {path}: cannot read it ({type(error).__name__}: {error})")
    if isinstance(state, dict):
        state = state.get("model_ema") or state.get("model") or state.get("state_dict") or state
    if not isinstance(state, dict) or not any(torch.is_tensor(v) for v in state.values()):
        common.fail(f"--pretrained {path}: no state_dict of tensors in it")
    return {re.sub(r"^(module\.)?(vmunet\.)?", "", k): v for k, v in state.items()}


def load_pretrained(model, source, log=print):
    """Load VMamba-S / VM-UNet weights as VM-UNet's load_from does (spec 10): encoder keys as
    they are, then `layers.i` renamed to `layers_up.(3-i)` for the decoder blocks of the same
    width. Only names and shapes that exist in the model are taken; returns the count."""
    if source in (None, "", "none"):
        return 0
    if source == "auto":
        try:
            folder = Path(torch.hub.get_dir()) / "checkpoints"
            path = folder / PRETRAINED_URL.rsplit("/", 1)[1]
            if not path.exists():
                folder.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(PRETRAINED_URL, str(path))
        except Exception as error:
            log(f"pretrained: download of VMamba-S failed ({type(error).__name__}); "
                "training from scratch")
            return 0
    else:
        path = Path(source)
        if not path.is_file():
            common.fail(f"--pretrained {source}: no such file (give a path, auto or none)")
    weights, own = _read_weights(path), model.state_dict()
    taken = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    for key, value in weights.items():
        match = re.match(r"layers\.([0-3])\.(.*)", key)
        renamed = match and f"layers_up.{3 - int(match.group(1))}.{match.group(2)}"
        if renamed and renamed not in weights and renamed in own \
                and own[renamed].shape == value.shape:
            taken[renamed] = value
    if not taken:
        common.fail(f"--pretrained {path}: none of its tensors fits this model")
    model.load_state_dict(taken, strict=False)
    log(f"pretrained: {len(taken)} of {len(own)} tensors loaded from {path}")
    return len(taken)


# ==== 5. Losses (Sec. 3.4) ====

def cross_feature_distillation(feature_maps, final):
    """Eq. (8): every block feature imitates the detached final feature F_final.

    F_final is average-pooled to the block's size and `min(C_s, C_t)` random channels of each
    are paired (RCS). Returns the mean over the maps of the element-wise MSE.
    """
    losses = []
    for f_s in feature_maps:  # (B, C_s, h, w)
        f_t = final.detach()  # (B, C_t, H, W)
        if f_t.shape[-1] > f_s.shape[-1]:
            f_t = F.adaptive_avg_pool2d(f_t, f_s.shape[-2:])  # AvgPool(F_final)
        elif f_s.shape[-1] > f_t.shape[-1]:
            f_s = F.adaptive_avg_pool2d(f_s, f_t.shape[-2:])
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


def feature_distillation_loss(features, lambda_cfd=LAMBDA_CFD, lambda_ifd=LAMBDA_IFD):
    """Eq. (10): FDLoss over the first/last block maps of all stages (SelfReg's grouping:
    L_CFD = two group means, L_IFD = four group means; spec 6.2-6.3)."""
    first = features["decoder_first"] + features["encoder_first"]
    last = features["decoder_last"] + features["encoder_last"]
    zero = features["final"].new_zeros(())
    l_cfd = zero if lambda_cfd == 0 else (  # Eq. (8), both groups
        cross_feature_distillation(last, features["final"])
        + cross_feature_distillation(first, features["final"]))
    l_ifd = zero if lambda_ifd == 0 else sum(  # Eq. (9), four groups
        internal_feature_distillation(features[name]) for name in
        ("encoder_last", "encoder_first", "decoder_first", "decoder_last"))
    return lambda_cfd * l_cfd + lambda_ifd * l_ifd  # Eq. (10)  L_fd = l1 L_CFD + l2 L_IFD


def bce_dice_loss(logits, target, w_bce=W_BCE, w_dice=W_DICE):
    """Eq. (11), first three lines: l1 BCE + l2 soft Dice (smooth 1, per sample), VM-UNet's
    BceDiceLoss on sigmoid outputs. logits, target (B, 1, H, W); target in [0, 1]."""
    assert logits.shape == target.shape, (logits.shape, target.shape)
    l_bce = F.binary_cross_entropy_with_logits(logits, target)  # Eq. (11), L_Bce
    p, t = torch.sigmoid(logits).flatten(1), target.flatten(1)  # (B, HW)
    dice = (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    l_dice = 1 - dice.mean()  # Eq. (11), L_Dice = 1 - 2|X n Y| / (|X| + |Y|)
    return w_bce * l_bce + w_dice * l_dice  # Eq. (11), L_BceDice


def total_loss(logits, target, features=None, lambda_cfd=LAMBDA_CFD, lambda_ifd=LAMBDA_IFD):
    """Eq. (11): L_total = L_fd + L_BceDice; features None (validation): L_BceDice only."""
    l_seg = bce_dice_loss(logits, target)
    if features is None or (lambda_cfd == 0 and lambda_ifd == 0):
        return l_seg, {"seg": l_seg.item(), "fd": 0.0}
    l_fd = feature_distillation_loss(features, lambda_cfd, lambda_ifd)
    return l_fd + l_seg, {"seg": l_seg.item(), "fd": l_fd.item()}  # Eq. (11), L_total


# ==== 6. Data: VM-UNet's input scaling, augmentation and the 70/30 split ====

def vmunet_normalise(x):
    """Per-image min-max to [0, 255] over all channels, VM-UNet's myNormalize (spec 8.2: its
    mean/std step cancels out). x (B, 3, H, W) in [0, 1] -> (B, 3, H, W) in [0, 255]."""
    low = x.amin(dim=(1, 2, 3), keepdim=True)
    high = x.amax(dim=(1, 2, 3), keepdim=True)
    return 255 * (x - low) / (high - low).clamp_min(1e-8)


class VMUNetAugment:
    """Horizontal flip, vertical flip, rotation in [0, 360): each with p = 0.5 (spec 8.3).
    Rotation is nearest-neighbour with zero fill for image and mask, like TF.rotate.
    `fixed_angle` reproduces VM-UNet's one angle per run."""

    def __init__(self, fixed_angle=None):
        self.fixed_angle = fixed_angle

    def __call__(self, image, mask, rng):
        if rng.random() < 0.5:
            image, mask = image[:, ::-1], mask[:, ::-1]
        if rng.random() < 0.5:
            image, mask = image[::-1], mask[::-1]
        if rng.random() < 0.5:
            angle = self.fixed_angle if self.fixed_angle is not None else rng.uniform(0, 360)
            image = np.array(Image.fromarray(np.ascontiguousarray(image)).rotate(
                angle, Image.NEAREST))
            mask = np.array(Image.fromarray(np.ascontiguousarray(mask, np.uint8)).rotate(
                angle, Image.NEAREST)) > 0
        return np.array(image), np.array(mask)


def load_isic(args, augment):
    """Train/val/test sets (common.load_data's dict). --split auto keeps a layout's own split
    (ISIC 2016: 900/379; VM-UNet's train/val folders) and splits a flat folder 70/30 as the
    paper (Sec. 4.1); --split 70-30 re-splits train+val of any layout (ISIC 2017: 2150 ->
    1505/645, ISIC 2018: 2694 -> 1886/808); --split official never re-splits."""
    unit = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # [0, 1]; vmunet_normalise follows
    if args.data == "toy" or args.split == "official":
        return common.load_data(args, "binary", augment, args.toy_sizes, **unit)
    root = Path(args.data)
    if not root.is_dir():
        common.fail(f"--data {args.data}: no such folder (give a data folder, or 'toy')")
    split = common.discover_splits(root, args.seed, 0.0)
    own_split = split["official"]
    if args.split == "auto" and own_split:
        return common.load_data(args, "binary", augment, **unit)
    pool = split["train"] + split["val"]
    if not own_split:  # a flat folder: every pair goes into the 70/30 split
        pool += [p for pairs in split["test"].values() for p in pairs]
    pool.sort(key=lambda p: common.natural_key(p["image"]))
    random.Random(args.seed).shuffle(pool)
    n_test = round(0.3 * len(pool))  # Sec. 4.1: 7:3
    test, train = pool[:n_test], pool[n_test:]
    n_val = round(args.val_fraction * len(train))
    val, train = train[:n_val], train[n_val:]
    if not train or not test:
        common.fail(f"--data {args.data}: too few image/mask pairs ({len(pool)}) for a 70/30 split")
    make = lambda pairs, aug: common.PairDataset(pairs, args.img_size, aug,  # noqa: E731
                                                 seed=args.seed, **unit)
    names = lambda pairs: [p["image"] for p in pairs]  # noqa: E731
    return {"train": make(train, augment), "val": make(val, None) if val else None,
            "test": {"test": make(test, None)},
            "source": f"{root}: seeded 70/30 split of {len(pool)} pairs (seed {args.seed}), "
                      f"{len(val)} of the 70% held out for validation",
            "splits": {"train": names(train), "val": names(val), "test": {"test": names(test)}}}


# ==== 7. Train, evaluate, predict ====

def autocast(device, enabled):
    """Mixed precision context: fp16 on CUDA, bf16 on CPU (the scan itself runs in fp32)."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


def train_one_epoch(model, loader, optimizer, device, lambda_cfd=LAMBDA_CFD,
                    lambda_ifd=LAMBDA_IFD, amp=False, scaler=None, limit_batches=0,
                    show_progress=True):
    """One pass over `loader`; returns the mean total, segmentation and FD losses."""
    model.train()
    use_fd = lambda_cfd > 0 or lambda_ifd > 0
    sums, count = {"loss": 0.0, "seg": 0.0, "fd": 0.0}, 0
    for step, batch in enumerate(common.progress(loader, "train", show_progress)):
        if limit_batches and step >= limit_batches:
            break
        x = vmunet_normalise(batch["image"].to(device))  # (B, 3, S, S) in [0, 255]
        target = batch["mask"].to(device)  # (B, 1, S, S)
        with autocast(device, amp):
            out = model(x, return_features=use_fd)
            logits, features = out if use_fd else (out, None)
            loss, parts = total_loss(logits.float(), target, features, lambda_cfd, lambda_ifd)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        n = x.shape[0]
        sums["loss"] += loss.item() * n
        sums["seg"] += parts["seg"] * n
        sums["fd"] += parts["fd"] * n
        count += n
    return {key: value / max(count, 1) for key, value in sums.items()}


@torch.no_grad()
def predict(model, images, size=None):
    """Foreground probabilities (B, 1, h, w) for images (B, 3, S, S) in [0, 1]; `size` (h, w)
    resizes them bilinearly (e.g. back to an image's original size)."""
    logits = model(vmunet_normalise(images))
    if size is not None and tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    return torch.sigmoid(logits.float())


@torch.no_grad()
def evaluate(model, dataset, device, batch_size=8, per_image=False, original_size=False,
             save_dir=None, max_overlays=50, with_loss=False):
    """The paper's columns mIoU, DSC, Acc (+ Sen, Spe) as fractions.

    Default: one confusion matrix over all test pixels at 0.5 at the network's size, as
    VM-UNet's engine.py (Eqs. 12-14); per_image: averaged per-image scores; original_size:
    probabilities resized to each image's own size first. save_dir: mask PNGs + overlays.
    """
    model.eval()
    meter = common.PerImageMeter(THRESHOLD) if per_image else common.GlobalMeter(THRESHOLD)
    loss_sum, seen = 0.0, 0
    loader = common.make_loader(dataset, batch_size, train=False)
    for batch in loader:
        images, masks = batch["image"].to(device), batch["mask"].to(device)
        logits = model(vmunet_normalise(images)).float()  # (B, 1, S, S)
        if with_loss:
            loss_sum += bce_dice_loss(logits, masks).item() * images.shape[0]
        probs = torch.sigmoid(logits)
        for prob, mask, index in zip(probs, masks, batch["index"].tolist()):
            if original_size or save_dir is not None:
                image_full, mask_full = dataset.full(index)
                prob_full = F.interpolate(prob[None], size=mask_full.shape, mode="bilinear",
                                          align_corners=False)[0, 0].cpu().numpy()
            if original_size:
                meter.update(prob_full, mask_full)
            else:
                meter.update(prob[0].cpu().numpy(), mask[0].cpu().numpy())
            if save_dir is not None:
                pred = prob_full >= THRESHOLD
                common.save_mask_png(Path(save_dir) / f"{dataset.names[index]}.png", pred)
                if seen < max_overlays:
                    common.save_overlay(Path(save_dir) / f"{dataset.names[index]}_overlay.png",
                                        image_full, pred, mask_full)
            seen += 1
    scores = meter.compute()
    result = {"mIoU": scores["iou"],  # Eq. (12)  mIoU = TP / (TP + FP + FN)
              "DSC": scores["dice"],  # Eq. (13)  DSC = 2TP / (2TP + FP + FN)
              "Acc": scores["accuracy"],  # Eq. (14)  Acc = (TP + TN) / N
              "Sen": scores["recall"], "Spe": scores["specificity"]}
    if with_loss:
        result["loss"] = loss_sum / max(seen, 1)
    return result


# ==== 8. Command line ====

def model_overrides(args):
    """Preset overrides from the ablation switches (Tab. 4)."""
    return {"se": not args.no_se, "cmn": not args.no_cmn, "cra": not args.no_cra}


def run_bench(args, run):
    """One JSON line: parameters, train and inference images/s, peak memory."""
    preset = args.preset if args.preset_reason == "--preset" else "paper"
    model = build_model(preset, **model_overrides(args)).to(run.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=WEIGHT_DECAY)
    x = torch.rand(args.batch_size, 3, args.img_size, args.img_size, device=run.device)
    target = (torch.rand(args.batch_size, 1, args.img_size, args.img_size,
                         device=run.device) > 0.5).float()

    def train_step():
        model.train()
        logits, features = model(vmunet_normalise(x), return_features=True)
        loss, _ = total_loss(logits, target, features)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer_step():
        model.eval()
        predict(model, x)

    record = common.benchmark(model, train_step, infer_step, args.batch_size, run.device,
                              repeats=1, script="cmssm_unet", preset=preset,
                              img_size=args.img_size, scan=common.scan_backend(x))
    print(json.dumps(record), flush=True)
    return record


def run_predict(args, run):
    """Write one mask PNG per image of args.predict into <out>/predictions."""
    state = common.load_checkpoint(args.checkpoint, "cmssm_unet")
    model = build_model(state["preset"], **state["overrides"]).to(run.device)
    model.load_state_dict(state["model"])
    model.eval()
    files = common.list_images(args.predict)
    size = state["config"]["img_size"]
    for path in files:
        image = common.load_image(path)
        x = torch.from_numpy(np.array(common.resize_image(image, size))).permute(2, 0, 1) / 255
        prob = predict(model, x[None].to(run.device), size=image.shape[:2])[0, 0]
        common.save_mask_png(run.out / "predictions" / f"{path.stem}.png",
                             (prob >= THRESHOLD).cpu().numpy())
    run.log(f"wrote {len(files)} masks to {run.out / 'predictions'}")
    return {"predicted": len(files), "out": str(run.out / "predictions")}


def test_all(model, data, args, run, save=True):
    """Score every test group, print the table, write test_metrics.json (and predictions/)."""
    metrics = {}
    for group, dataset in data["test"].items():
        folder = run.out / "predictions" / group if save and run.is_main else None
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        metrics[group] = evaluate(model, dataset, run.device, args.batch_size, args.per_image,
                                  args.eval_original_size, folder)
    run.log(f"{'test set':<12}{'mIoU %':>9}{'DSC %':>9}{'Acc %':>9}{'Sen %':>9}{'Spe %':>9}")
    for group, row in metrics.items():
        run.log(f"{group:<12}" + "".join(f"{100 * row[k]:>9.2f}" for k in
                                         ("mIoU", "DSC", "Acc", "Sen", "Spe")))
    run.save_json("test_metrics.json", metrics)
    return metrics


def main(argv=None):
    parser = argparse.ArgumentParser(description="CM-SSM U-Net skin lesion segmentation "
                                     "(Ke et al.), on a VM-UNet backbone.")
    common.add_common_args(parser, PAPER_RECIPE, "Sec. 4.3")
    group = parser.add_argument_group("CM-SSM U-Net switches")
    group.add_argument("--no-se", action="store_true", help="drop SE from the blocks (Tab. 4)")
    group.add_argument("--no-cmn", action="store_true", help="drop the CMN (Tab. 4)")
    group.add_argument("--no-cra", action="store_true", help="plain skips, no CRA (Tab. 4)")
    group.add_argument("--no-cfd", action="store_true", help="no L_CFD (Tab. 5)")
    group.add_argument("--no-ifd", action="store_true", help="no L_IFD (Tab. 5)")
    group.add_argument("--split", choices=["auto", "official", "70-30"], default="auto",
                       help="auto: the layout's split, else the paper's 70/30 (Sec. 4.1)")
    group.add_argument("--t-max", type=int, default=None,
                       help="cosine period in epochs (paper: 50, Sec. 4.3; toy: --epochs)")
    group.add_argument("--per-image", action="store_true",
                       help="average per-image scores (paper: one global confusion matrix)")
    group.add_argument("--eval-original-size", action="store_true",
                       help="score at each image's own size (paper: at --img-size, spec 9)")
    group.add_argument("--vmunet-rotation", action="store_true",
                       help="one rotation angle for the whole run, as VM-UNet's code")
    group.add_argument("--toy-sizes", default=",".join(map(str, TOY_SIZES)),
                       help="toy train,val,test image counts (default %(default)s)")
    parser.set_defaults(pretrained=None)
    raw = parser.parse_args(argv)
    if raw.bench:  # the paper preset at the paper size; batch 2 fits a CPU's memory (3 GB)
        raw.preset = raw.preset or "paper"
        raw.img_size = raw.img_size or PAPER_RECIPE["img_size"]
        raw.batch_size = raw.batch_size or 2
    args = common.finish_args(raw, PAPER_RECIPE, TOY_RECIPE)
    real = args.data != "toy"
    if args.pretrained is None:  # VM-UNet starts from VMamba-S (spec 10); toy runs from scratch
        args.pretrained = "auto" if real else "none"
    if args.t_max is None:
        args.t_max = T_MAX if real else args.epochs
    if args.resume and not args.out:  # continue in the resumed run's folder
        args.out = str(Path(args.resume).parent)
    if args.t_max < 1 or not 0 <= args.val_fraction < 1:
        common.fail("--t-max must be >= 1 and --val-fraction in [0, 1)")
    try:
        sizes = tuple(int(n) for n in args.toy_sizes.split(","))
        assert len(sizes) == 3 and min(sizes) >= 1
    except (ValueError, AssertionError):
        common.fail(f"--toy-sizes {args.toy_sizes}: give three positive counts, e.g. 160,20,40")
    args.toy_sizes = sizes
    if args.img_size % 32:
        common.fail(f"--img-size {args.img_size}: must be a multiple of 32 (4x patches, 3 merges)")
    common.seed_everything(args.seed)
    run = common.Run(args, "cmssm_unet")
    run.log(f"cmssm_unet: preset {args.preset} ({args.preset_reason}), device {run.device}, "
            f"img {args.img_size}, epochs {args.epochs}, batch {args.batch_size}, lr {args.lr}")
    if args.bench:
        return run_bench(args, run)
    if args.predict:
        return run_predict(args, run)

    rng = random.Random(args.seed)
    augment = VMUNetAugment(rng.uniform(0, 360) if args.vmunet_rotation else None)
    data = load_isic(args, augment)
    run.log(f"data: {data['source']}; train {len(data['train'])}, "
            f"val {len(data['val']) if data['val'] else 0}, "
            + ", ".join(f"test[{g}] {len(d)}" for g, d in data["test"].items()))
    if data["splits"] is not None:
        run.save_json("splits.json", data["splits"])

    if args.eval:
        state = common.load_checkpoint(args.eval, "cmssm_unet")
        model = build_model(state["preset"], **state["overrides"]).to(run.device)
        model.load_state_dict(state["model"])
        metrics = test_all(model, data, args, run)
        run.close()
        return metrics

    overrides = model_overrides(args)
    model = build_model(args.preset, **overrides).to(run.device)
    load_pretrained(model, args.pretrained, run.log)
    n_params = sum(p.numel() for p in model.parameters())
    lambda_cfd = 0.0 if args.no_cfd else LAMBDA_CFD
    lambda_ifd = 0.0 if args.no_ifd else LAMBDA_IFD
    run.log(f"model: {n_params:,} parameters; SE {overrides['se']}, CMN {overrides['cmn']}, "
            f"CRA {overrides['cra']}; lambda_CFD {lambda_cfd}, lambda_IFD {lambda_ifd}")
    if run.distributed:
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.t_max, ETA_MIN)
    scaler = torch.amp.GradScaler("cuda") if args.amp and run.device.type == "cuda" else None
    loader = common.make_loader(data["train"], args.batch_size, train=True,
                                workers=args.workers, seed=args.seed)
    run.save_json("config.json", {**vars(args), "preset_values": asdict(PRESETS[args.preset]),
                                  "overrides": overrides, "parameters": n_params,
                                  "data_source": data["source"], "device": str(run.device),
                                  "world_size": run.world, "lambda_cfd": lambda_cfd,
                                  "lambda_ifd": lambda_ifd, "weight_decay": WEIGHT_DECAY,
                                  "eta_min": ETA_MIN})
    start, best = 0, math.inf
    if args.resume:
        state = common.load_checkpoint(args.resume, "cmssm_unet")
        common.unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, best = state["epoch"] + 1, state["best"]
        run.log(f"resumed from {args.resume} at epoch {start}")

    for epoch in range(start, args.epochs):
        began = time.time()
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        train = train_one_epoch(model, loader, optimizer, run.device, lambda_cfd, lambda_ifd,
                                args.amp, scaler, args.limit_batches, run.is_main)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()  # once per epoch (VM-UNet)
        row = {"epoch": epoch, "lr": lr, "train_loss": train["loss"], "train_seg": train["seg"],
               "train_fd": train["fd"]}
        score = train["loss"]
        if data["val"] is not None:  # every rank scores the whole validation set
            val = evaluate(common.unwrap(model), data["val"], run.device, args.batch_size,
                           with_loss=True)
            row.update(val_loss=val["loss"], val_dice=val["DSC"], val_miou=val["mIoU"])
            score = val["loss"]  # VM-UNet keeps the lowest validation loss
        row["seconds"] = round(time.time() - began, 1)
        run.log_epoch(row)
        run.log(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in row.items()))
        state = {"model": common.unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "epoch": epoch, "best": min(best, score),
                 "config": vars(args), "preset": args.preset, "overrides": overrides}
        run.checkpoint("last.pt", state)
        if score < best or data["val"] is None:
            best = score
            run.checkpoint("best.pt", state)
    run.barrier()

    best_path = run.out / "best.pt"
    if best_path.exists():
        common.unwrap(model).load_state_dict(common.load_checkpoint(best_path)["model"])
    metrics = test_all(common.unwrap(model), data, args, run) if run.is_main else {}
    run.close()
    return metrics


if __name__ == "__main__":
    common.cli(main)
