"""DIN: dual interaction network with cross-image attention for medical image segmentation.

J. Noh, W. Jeon, J. Park, Pattern Recognition Letters (2025); github.com/JJeong-Gari/DIN holds no
code: the network is the reconstruction of ../shared/specs/dinet.md ("spec n"), which reproduces
the paper's 323.31 M parameters and 1,860 G multiply-adds.

Idea: I and its fuzzy enhancement E (Eqs. 11-12) go through two ConvNeXt-B encoders with a 3x3
stride-1 stem (Eq. 13, Tab. 14): per stage an "edge" map (an extra 2x2 pooling) and a "shape" map.
Per stage a dual interactive fusion module (DIFM) merges them (Eq. 1), lets I query E and E query
I in 7x7 windows (Eqs. 2-3), refines both (gated FFN, Eqs. 4-5; parameter-free gate, Eq. 6) and
adds the two; a SegFormer MLP decoder (Eq. 14) predicts; the loss adds Sobel edges (Eqs. 9-10).

Equation map (metrics: common.VolumeMeter, common.PerImageMeter, called by evaluate):
  Eq. (1) -> DIFM.forward (merge_i, merge_e)
  Eq. (2) -> window_attention (called by WindowCrossAttention.forward)
  Eq. (3) -> WindowCrossAttention.forward
  Eq. (4) -> GatedFFN.forward
  Eq. (5) -> GatedFFN.forward
  Eq. (6) -> global_spatial_attention
  Eq. (7) -> loss_ce
  Eq. (8) -> loss_dice
  Eq. (9) -> loss_boundary (multi-scale part: boundary_l1)
  Eq. (10) -> total_loss
  Eq. (11) -> fuzzy_enhance
  Eq. (12) -> fuzzy_enhance
  Eq. (13) -> ConvNeXtBlock.forward
  Eq. (14) -> MLPDecoder.forward
  Eq. (15) -> SOBEL_H, SOBEL_V (applied by sobel)

Symbols (paper preset at 224x224; stage s = 1..4, C_s = 128..1024, H_s = 224 / 2^(s-1)):
  I, E            image, enhanced (B, 3, H, W); grayscale repeated to 3 channels
  f_low, f_high   lows, highs: edge and shape maps per stage (B, C_s, H_s, W_s)
  f~ (Eq. 1), F_s m_i, m_e: merged maps; fused = F_IE + F_EI, the DIFM output (alike)
  Q, K, V         q, k, v: (B * windows, heads, 49, d), d = 32 channels per head
  f~_IE, F^, F    f after Eq. 3, after the FFN (Eq. 5), after the gate (Eq. 6)
  x, y (7-9)      softmax probabilities, one-hot labels (B, K, H, W); K = 9 / 4 / 2
  lambda, tau     lam, tau per fuzzy window W_ij (Eq. 11); I_ij of Eq. 12 = membership w

Protocol (Sec. 4.2, supp. 7.6), printed at start-up. All rows: AdamW lr 1e-4 constant, weight
decay 1e-4 [M], 300 epochs, batch 3, 224 x 224, MERIT's rotation/flip draw, ImageNet ConvNeXt-B
encoders (--pretrained auto; the paper names no source); tested: best mean Dice on validation,
else the last epoch. [M] = MERIT, the base code; [R] = our choice.
  Synapse  | TransUNet's 18 train (2,211 slices) / 12 test volumes, no validation: last epoch
           | (MERIT picks on test) | per volume and organ: Dice, HD95 (TransUNet's test)
  ACDC     | 70 / 10 / 20 patients (1,304 / 182 slices / 40 volumes) | per volume: Dice
  ClinicDB | 612 images, random seeded 80:10:10 | Dice per image at full size
  ISIC18   | the challenge's 3,694 images (paper: 3,594) pooled, random seeded 80:10:10
           | (--official-split: 2,594 / 100 / 1,000) | Dice per image at full size
Out of scope (other networks): Tab. 4's Zero-DCE, Tabs. 5/8's SwinUNet, FCT, MERIT, Tabs. 11-12's
EMCAD decoder.

Deviations and gaps (spec 11), each with its switch:
  1. No code: kernels, window 7, 32 channels per head, pre-attention LayerNorms and the unused
     q/k/v thirds match the spec's budget (--attn-proj lean: q, kv, out); Swin's relative
     position bias is not in the paper (--no-rel-pos-bias). Padded window keys are masked [R].
  2. Tab. 14's x9 blocks in stage 3 miss the totals, ConvNeXt-B's 27 meet them (depths=(3, 3,
     9, 3): the table): 180.64 / 119.85 / 22.72 M = 323.20 M (the paper's 178 / 119.94 / 25.27 M
     does not add up to its 323.31 M).
  3. E is the public code of [36] (ivan-abboud/Image_enhancement_using_fuzzy_logic; a golden
     array pins it): windows i < m, j < n of degree-m Bernstein memberships over their sum +
     1e-5 (fading along the bottom and right edges), ordinary sum, m = n = 2, gamma 4, sigma_u =
     1/sqrt3, symmetric rescale (--fuzzy-m, -n, -gamma; --fuzzy-patrascu: [36] as written,
     (m+1)x(n+1) windows, exact partition, log-model sum). Where it breaks [R]: pixels exactly
     0 or 1 stay out of the window statistics (--fuzzy-saturated clip), u is clipped at +-(1 -
     eps) (--fuzzy-eps), gain <= 8, stretch <= 1 / tanh(sigma_u). Train and test see 8-bit E.
  4. The line tagged Eq. (8) computes MERIT's squared Dice, sums pooled over the batch
     (--dice-eq8: as printed); L_bnd (Eq. 9) is a mean per pixel [R] (--bnd-reduction sum).
  5. Eq. (6) says "channel mean", a (B, 1, H, W) gate; the prose says channel weights (--gsa
     global: mean over H, W).
  6. Edge pools read the previous stage's output (--edge-from chain: a chain from the stem).
     Grayscale is repeated to 3 channels (MERIT learns a 1x1 conv; no switch).
  7. PyTorch's default init (ConvNeXt's trunc-normal stalls small models from scratch; no
     switch). ImageNet's stem is 4x4: our 3x3 stem conv stays random, all of it.
  8. From MERIT (spec 7): constant lr (set per epoch, so --resume follows a new --epochs), its
     rotation/flip draw, no stochastic depth; bilinear resizing (--resize bicubic, near MERIT's
     cubic spline); SegFormer's dropout 0.1 (--decoder-dropout).
  9. Tab. 6 drops DIFMs smallest map first, with the decoder levels and stages that fed only
     them [R] (--num-difm). --amp: bf16, else fp16 with a gradient scaler [R]. Toy slices use
     VolumeMeter's "skip" convention; real volumes TransUNet's (spec 9).

Run (toy data, small preset: ~1.5 min on an idle 2-core CPU; paper recipe: a 48 GB GPU):
  python dinet.py [--data PATH/Synapse | PATH/ACDC [--inputs i] | PATH/ClinicDB --task binary]
  python dinet.py --eval runs/dinet/<time>/best.pt [--data PATH]   # or --predict DIR --checkpoint F
  python dinet.py --bench --batch-size 1                 # paper preset at 224x224, one JSON line
"""
import argparse
import functools
import json
import math
import os
import random
import re
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (common.py)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from scipy import ndimage  # noqa: E402

import common  # noqa: E402

# ==== 2. Presets and recipe ====

@dataclass
class DINConfig:
    """Architecture of one preset, then the ablation switches (Tabs. 3-8; the command line's)."""
    dims: tuple = (128, 256, 512, 1024)  # C_s, Tab. 14 (ConvNeXt-B widths)
    depths: tuple = (3, 3, 27, 3)  # Tab. 14 says x9 for stage 3; the totals need 27 (spec 3)
    stem_kernel: int = 3  # Tab. 14, Sec. 9.1: 3x3 stem ...
    stem_stride: int = 1  # Sec. 9.1: ... with stride 1, "to preserve full-size features"
    merge_kernel: int = 3  # Eq. (1) conv, 3x3 from the parameter budget (spec 4.1)
    window: int = 7  # Sec. 3.1.3 window attention; size from spec 4.2
    head_dim: int = 32  # Sec. 3.1.2 multi-head; 32 channels per head (spec 4.2)
    rel_pos_bias: bool = True  # not in the paper; counted by the budget match (spec 4.2)
    ffn_kernel: int = 3  # Eq. (4) expansion conv 3x3, Eq. (5) conv 1x1 (spec 4.3)
    decoder_dim: int = 768  # Sec. 9.2: all maps to 768 channels
    fuse_kernel: int = 3  # Eq. (14): 3x3 fuse conv
    decoder_dropout: float = 0.1  # SegFormer's default (spec 5)
    inputs: str = "ie"  # Tab. 4: ie | i (only I) | e (only E) | ii (I + I)
    fusion: str = "difm"  # Tab. 5: difm | concat (Ours_concat) | input (Ours_IF)
    attn: str = "dual"  # Tab. 7: dual | ie | ei
    cross_attn: bool = True  # Tab. 3 (a)
    merge: bool = True  # Tab. 3 (b)
    gsa: bool = True  # Tab. 3 (c)
    gsa_axis: str = "channel"  # Eq. (6) "channel mean"; "global" = mean over H, W (spec 4.4)
    attn_proj: str = "budget"  # spec 4.2: q/k/v from two Linear(C, 3C); "lean" = q, kv, out
    edge_from: str = "stage"  # spec 3: edge pool on the previous stage output, or "chain"
    num_difm: int = 4  # Tab. 6: DIFMs (and decoder levels) kept, largest maps first

PRESETS = {"paper": DINConfig(),
           "small": DINConfig(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), window=8, head_dim=16,
                              decoder_dim=32, stem_kernel=2, stem_stride=2, decoder_dropout=0.0),
           "tiny": DINConfig(dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), window=4, head_dim=8,
                             decoder_dim=16)}
PAPER_RECIPE = {"epochs": 300, "batch_size": 3, "lr": 1e-4, "img_size": 224}  # Sec. 4.2
TOY_RECIPE = {"epochs": 12, "batch_size": 4, "lr": 2e-3, "img_size": 64}
TOY_SIZES = (160, 24, 40)  # toy train / val / test slices
WEIGHT_DECAY = 1e-4  # not in the paper; MERIT's AdamW setting (spec 7.1)
LOSS_WEIGHTS = (0.3, 0.7)  # alpha, beta of Eq. (10), "like [41]" (MERIT)
BOUNDARY_SCALES = (1, 2, 4)  # Eq. (9): original, 1/2 and 1/4
SYNAPSE_ORGANS = ["aorta", "gallbladder", "kidney_l", "kidney_r", "liver", "pancreas", "spleen",
                  "stomach"]  # TransUNet's label order, as in Tab. 1
ACDC_ORGANS = ["rv", "myo", "lv"]  # Tab. 2
CONVNEXT_B_URL = "https://dl.fbaipublicfiles.com/convnext/convnext_base_1k_224_ema.pth"  # spec 3

# ==== 3. Building blocks (Sec. 3.1: DIFM; Sec. 9.2: decoder) ====

class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map (ConvNeXt's channels-first LN)."""
    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

def to_windows(x, window):
    """(B, C, H, W) -> (B * H/w * W/w, w*w, C) non-overlapping windows (H, W multiples of w)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // window, window, w // window, window).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(-1, window * window, c)

def from_windows(tokens, window, b, h, w):
    """Inverse of to_windows: (B * n, w*w, C) -> (B, C, H, W)."""
    c = tokens.shape[-1]
    x = tokens.view(b, h // window, w // window, window, window, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, h, w)

def window_attention(q, k, v, bias=0):
    """softmax(Q K^T / sqrt(d)) V per window and head; q, k, v: (N, heads, T, d)."""
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (N, heads, T, T)
    return (logits + bias).softmax(dim=-1) @ v  # Eq. (2)  softmax(Q K^T / sqrt(d)) V

class WindowCrossAttention(nn.Module):
    """One direction of the cross-attention (Sec. 3.1.2, Eqs. 2-3): Q of m_i, K, V of m_e."""
    def __init__(self, dim, window, head_dim, rel_pos_bias=True, proj="budget"):
        super().__init__()
        self.window, self.proj, self.heads = window, proj, max(1, dim // head_dim)
        self.norm_a, self.norm_b = nn.LayerNorm(dim), nn.LayerNorm(dim)  # pre-norm (spec 4.2)
        if proj == "budget":  # self-attention layers adapted to two inputs: 2 x 3C^2 (spec 4.2)
            self.qkv_a, self.qkv_b = nn.Linear(dim, 3 * dim), nn.Linear(dim, 3 * dim)
        else:
            self.q, self.kv, self.out = (nn.Linear(dim, dim), nn.Linear(dim, 2 * dim),
                                         nn.Linear(dim, dim))
        self.rpb_table = None  # Swin's relative position table, one bias per offset and head
        if rel_pos_bias:
            self.rpb_table = nn.Parameter(torch.randn((2 * window - 1) ** 2, self.heads) * 0.02)
            yx = torch.stack(torch.meshgrid(*[torch.arange(window)] * 2, indexing="ij")).flatten(1)
            offset = yx[:, :, None] - yx[:, None, :] + window - 1  # (2, T, T) in 0..2w-2
            self.register_buffer("rpb_index", offset[0] * (2 * window - 1) + offset[1], False)
    def forward(self, query_map, kv_map):
        b, c, h, w = query_map.shape
        pad_h, pad_w = -h % self.window, -w % self.window  # pad to whole windows
        a = to_windows(F.pad(query_map, (0, pad_w, 0, pad_h)), self.window)  # (N, T, C)
        kv = to_windows(F.pad(kv_map, (0, pad_w, 0, pad_h)), self.window)
        bias = 0
        if pad_h or pad_w:  # padded keys get a -inf logit: every window sees only the image
            pad = F.pad(query_map.new_zeros(1, 1, h, w), (0, pad_w, 0, pad_h), value=1.0)
            bias = to_windows(pad, self.window).transpose(1, 2).repeat(b, 1, 1)[:, None]
            bias = bias.masked_fill(bias > 0, float("-inf"))  # (N, 1, 1, T): 0 or -inf
        if self.proj == "budget":  # only the Q third of qkv_a and the K, V thirds of qkv_b act
            q = F.linear(self.norm_a(a), self.qkv_a.weight[:c], self.qkv_a.bias[:c])
            k, v = F.linear(self.norm_b(kv), self.qkv_b.weight[c:],
                            self.qkv_b.bias[c:]).chunk(2, dim=-1)
        else:
            q = self.q(self.norm_a(a))
            k, v = self.kv(self.norm_b(kv)).chunk(2, dim=-1)
        heads = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731
        if self.rpb_table is not None:
            bias = bias + self.rpb_table[self.rpb_index].permute(2, 0, 1)  # (heads, T, T)
        attended = window_attention(heads(q), heads(k), heads(v), bias).transpose(1, 2)
        attended = attended.flatten(2) if self.proj == "budget" else self.out(attended.flatten(2))
        f = attended + q  # Eq. (3)  f~_IE = Atten(Q_i, K_e, V_e) + Q_i
        return from_windows(f, self.window, b, h + pad_h, w + pad_w)[:, :, :h, :w]

class GatedFFN(nn.Module):
    """The FFN after the cross-attention (Eqs. 4-5): LN, conv C -> 2C, GELU gate, conv C -> C."""
    def __init__(self, dim, kernel=3):
        super().__init__()
        self.norm = LayerNorm2d(dim)
        self.fc_in = nn.Conv2d(dim, 2 * dim, kernel, padding=kernel // 2)
        self.fc_out = nn.Conv2d(dim, dim, 1)
    def forward(self, f):
        f_1, f_2 = self.fc_in(self.norm(f)).chunk(2, dim=1)  # Eq. (4)  f~1, f~2 = chunk(conv(LN))
        return self.fc_out(F.gelu(f_1) * f_2) + f  # Eq. (5)  F^ = conv(GELU(f~1) (x) f~2) + f~

def global_spatial_attention(f, axis="channel"):
    """Eq. (6): a parameter-free sigmoid gate from a mean; 'channel' -> (B, 1, H, W) gate."""
    dims = (1,) if axis == "channel" else (2, 3)  # "global": (B, C, 1, 1), spec 4.4
    return torch.sigmoid(f.mean(dim=dims, keepdim=True)) * f  # Eq. (6)  F = sigm(mean(f)) (x) f

class DIFM(nn.Module):
    """DIFM of one stage (Sec. 3.1, Fig. 2b-d); one encoder: self-attention (MHSA, Sec. 4.4)."""
    def __init__(self, dim, cfg, single_image=False):
        super().__init__()
        self.cfg = cfg
        conv = lambda: nn.Conv2d(2 * dim, dim, cfg.merge_kernel,  # noqa: E731
                                 padding=cfg.merge_kernel // 2)
        self.merge_i = conv() if cfg.merge else None
        self.merge_e = conv() if cfg.merge and not single_image else None
        self.directions = (["ie"] if single_image else
                           {"dual": ["ie", "ei"]}.get(cfg.attn, [cfg.attn]))
        for d in ("ie", "ei"):
            active = d in self.directions
            setattr(self, f"attn_{d}", WindowCrossAttention(dim, cfg.window, cfg.head_dim,
                    cfg.rel_pos_bias, cfg.attn_proj) if active and cfg.cross_attn else None)
            setattr(self, f"ffn_{d}", GatedFFN(dim, cfg.ffn_kernel) if active else None)
    def forward(self, low_i, high_i, low_e, high_e):
        m_i, m_e = high_i, high_e  # Tab. 3 without (b): the shape features alone
        if self.merge_i is not None:
            m_i = self.merge_i(torch.cat([low_i, high_i], dim=1))  # Eq. (1)  f~ = conv(concat)
            m_e = m_i if self.merge_e is None else self.merge_e(torch.cat([low_e, high_e], dim=1))
        fused = 0
        for direction in self.directions:
            query, keys = (m_i, m_e) if direction == "ie" else (m_e, m_i)
            attn = getattr(self, f"attn_{direction}")
            f = attn(query, keys) if attn is not None else query  # Eqs. (2)-(3)
            f = getattr(self, f"ffn_{direction}")(f)  # Eqs. (4)-(5)
            if self.cfg.gsa:
                f = global_spatial_attention(f, self.cfg.gsa_axis)  # Eq. (6)
            fused = fused + f  # F_s = F_IE + F_EI (Sec. 3.1.3)
        return fused

class ConcatFusion(nn.Module):
    """Layer fusion by concatenation in place of the DIFM (Ours_concat, Tab. 5; Tab. 3 row 1)."""
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Conv2d(2 * dim, dim, 1)
    def forward(self, low_i, high_i, low_e, high_e):
        return self.proj(torch.cat([high_i, high_e], dim=1))

class MLPDecoder(nn.Module):
    """SegFormer's MLP decoder, 3x3 fuse conv (Sec. 9.2, Eq. 14): maps -> logits at `out_size`."""
    def __init__(self, dims, dim, num_classes, fuse_kernel=3, dropout=0.1):
        super().__init__()
        self.linear_c = nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(c, dim)}) for c in dims)
        self.linear_fuse = nn.Sequential(
            nn.Conv2d(len(dims) * dim, dim, fuse_kernel, padding=fuse_kernel // 2, bias=False),
            nn.BatchNorm2d(dim), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout2d(dropout)
        self.linear_pred = nn.Conv2d(dim, num_classes, 1)  # "MLP layer": 1x1 conv
    def forward(self, features, out_size):
        size = features[0].shape[-2:]  # level 1: 224x224 in the paper preset
        levels = []
        for f, mlp in zip(features, self.linear_c):
            y = mlp["proj"](f.flatten(2).transpose(1, 2))  # (B, H_s*W_s, D) tokens
            y = y.transpose(1, 2).unflatten(2, f.shape[-2:])  # (B, D, H_s, W_s)
            levels.append(F.interpolate(y, size=size, mode="bilinear", align_corners=False))
        y = self.linear_fuse(torch.cat(levels[::-1], dim=1))  # Eq. (14)  ReLU(BN(conv(x_1~4, 3)))
        logits = self.linear_pred(self.dropout(y))  # (B, K, H_1, W_1)
        if logits.shape[-2:] != tuple(out_size):  # only presets with a strided stem
            logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
        return logits

# ==== 4. Model ====

class DINet(nn.Module):
    """I and E -> two encoders -> a fusion module per stage -> MLP decoder (Fig. 2a)."""
    def __init__(self, cfg, num_classes):
        super().__init__()
        self.cfg = cfg
        single = cfg.inputs in ("i", "e") or cfg.fusion == "input"
        dims = cfg.dims[:cfg.num_difm]  # Tab. 6: the smallest maps go first (deviation 9)
        enc_cfg = replace(cfg, dims=dims, depths=cfg.depths[:cfg.num_difm])
        self.enc_i = ConvNeXtEncoder(enc_cfg, in_channels=6 if cfg.fusion == "input" else 3)
        self.enc_e = None if single else ConvNeXtEncoder(enc_cfg)
        self.difm = nn.ModuleList(ConcatFusion(c) if cfg.fusion == "concat" and not single
                                  else DIFM(c, cfg, single_image=single) for c in dims)
        self.decoder = MLPDecoder(dims, cfg.decoder_dim, num_classes, cfg.fuse_kernel,
                                  cfg.decoder_dropout)
    def forward(self, image, enhanced):
        """image, enhanced: (B, 3, H, W) -> logits (B, K, H, W)."""
        first, second = {"ie": (image, enhanced), "ii": (image, image), "i": (image, None),
                         "e": (enhanced, None)}[self.cfg.inputs]
        if self.cfg.fusion == "input":  # Ours_IF: I and E stacked on the channels (Tab. 5)
            first, second = torch.cat([image, enhanced], dim=1), None
        lows_i, highs_i = self.enc_i(first)
        lows_e, highs_e = self.enc_e(second) if second is not None else (lows_i, highs_i)
        maps = zip(lows_i, highs_i, lows_e, highs_e)
        return self.decoder([module(*m) for module, m in zip(self.difm, maps)], image.shape[-2:])

def build_model(preset="paper", num_classes=9, **overrides):
    """DINet of a preset ('paper', 'small', 'tiny'); `overrides` replace DINConfig fields."""
    if preset not in PRESETS:
        common.fail(f"unknown preset '{preset}' (paper, small or tiny)")
    return DINet(replace(PRESETS[preset], **overrides), num_classes)

def parameter_split(model):
    """Parameters (millions) of the encoders, the four fusion modules and the decoder (Sec. 4.5)."""
    count = lambda m: 0 if m is None else sum(p.numel() for p in m.parameters()) / 1e6  # noqa
    return {"encoders": round(count(model.enc_i) + count(model.enc_e), 3),
            **{k: round(count(m), 3) for k, m in (("difm", model.difm),
                                                  ("decoder", model.decoder), ("total", model))}}

# ==== 5. Backbone (not this paper's contribution): modified ConvNeXt-B (Sec. 9.1, Tab. 14) ====
# Parameter names follow timm's ConvNeXt, so ImageNet weights load by name (spec 3, 12).

class ConvNeXtBlock(nn.Module):
    """Conv-block of Eq. (13): 7x7 depthwise conv, LN, 1x1 (4C), GELU, 1x1 (C), layer scale."""
    def __init__(self, dim):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(dim, 4 * dim), "fc2": nn.Linear(4 * dim, dim)})
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))  # ConvNeXt's layer scale
    def forward(self, x):
        y = self.norm(self.conv_dw(x).permute(0, 2, 3, 1))  # (B, H, W, C) channels-last
        y = self.gamma * self.mlp["fc2"](F.gelu(self.mlp["fc1"](y)))  # 1x1 convs as Linear
        return x + y.permute(0, 3, 1, 2)  # Eq. (13)  y = conv(GELU(conv(LN(dconv(x))))) + x

def pooling(c_in, c_out):
    """ConvNeXt's 2x2 stride-2 pooling layer: channels-first LN, then a 2x2 conv."""
    return nn.Sequential(LayerNorm2d(c_in, eps=1e-6), nn.Conv2d(c_in, c_out, 2, 2))

class ConvNeXtEncoder(nn.Module):
    """Tab. 14: x (B, 3, H, W) -> lows (stem, edge pools), highs (stages): (B, C_s, H_s, W_s)."""
    def __init__(self, cfg, in_channels=3):
        super().__init__()
        dims, k, s = cfg.dims, cfg.stem_kernel, cfg.stem_stride
        self.edge_from = cfg.edge_from
        self.stem = nn.Sequential(nn.Conv2d(in_channels, dims[0], k, s, padding=(k - s) // 2),
                                  LayerNorm2d(dims[0], eps=1e-6))
        self.stages = nn.ModuleList(nn.Sequential(OrderedDict(  # stage s: pooling, blocks
            downsample=pooling(dims[i - 1], dims[i]) if i else nn.Identity(),  # not in stage 1
            blocks=nn.Sequential(*[ConvNeXtBlock(dims[i]) for _ in range(depth)])))
            for i, depth in enumerate(cfg.depths))
        # Sec. 9.1: "two types of pooling layers": the second one extracts f_edge (spec 3)
        self.edge = nn.ModuleList(pooling(dims[i], dims[i + 1]) for i in range(len(dims) - 1))
    def forward(self, x):
        x = low = self.stem(x)  # f_edge of stage 1 (B, C_1, H/stride, W/stride)
        lows, highs = [], []
        for i, stage in enumerate(self.stages):
            if i > 0:
                low = self.edge[i - 1](low if self.edge_from == "chain" else x)  # (B, C_s, ...)
            x = stage(x)  # f_shape (B, C_s, H_s, W_s)
            lows, highs = lows + [low], highs + [x]
        return lows, highs

def convnext_tensors(tensors):
    """Meta's (or timm's) ConvNeXt names -> ours (spec 3); edge pools copy their stage's pooling."""
    source = {}
    for name, value in tensors.items():
        for pattern, new in ((r"^module\.", ""), ("dwconv", "conv_dw"),
                             (r"pwconv(\d)", r"mlp.fc\1"), (r"^downsample_layers\.0\.", "stem."),
                             (r"^downsample_layers\.(\d)\.", r"stages.\1.downsample."),
                             (r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.")):
            name = re.sub(pattern, new, name)
        source[name] = value
        match = re.match(r"stages\.([1-3])\.downsample\.(.*)", name)
        if match:
            source[f"edge.{int(match[1]) - 1}.{match[2]}"] = value
    return source

def load_pretrained(model, spec, log, is_main=True, barrier=None):
    """--pretrained auto|none|FILE: ImageNet ConvNeXt-B weights into every encoder (spec 3)."""
    path = spec if spec != "auto" else common.fetch_weights(
        CONVNEXT_B_URL, Path(CONVNEXT_B_URL).name, log, is_main, barrier)
    if path in (None, "", "none"):  # none, or no download (fetch_weights said so in one line)
        return
    source = convnext_tensors(common.tensor_dict(common.load_weights(path)) or {})
    for name, encoder in (("I", model.enc_i), ("E", model.enc_e)):
        if encoder is None:
            continue
        tensors, stem = dict(source), encoder.stem[0].weight
        if tensors.get("stem.0.weight", stem).shape != stem.shape:
            tensors.pop("stem.0.weight"), tensors.pop("stem.0.bias", None)  # both or neither
            log(f"encoder {name}: stem conv random, weight and bias (the file's is "
                f"{'x'.join(map(str, source['stem.0.weight'].shape[1:]))})")
        common.load_matching(encoder, tensors, f"encoder {name}", path, log)

# ==== 6. Losses (Sec. 3.2, Eqs. 7-10, 15) ====

SOBEL_H = torch.tensor([[-1.0, -2.0, -1.0], [0.0, 0.0, 0.0], [1.0, 2.0, 1.0]])  # Eq. (15) G_H
SOBEL_V = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])  # Eq. (15) G_V

def one_hot(target, num_classes):
    """(B, H, W) int64 labels -> (B, K, H, W) float."""
    return F.one_hot(target, num_classes).permute(0, 3, 1, 2).float()

def loss_ce(logits, target):
    """Cross-entropy on logits (B, K, H, W) against labels (B, H, W), mean over pixels."""
    return F.cross_entropy(logits, target)  # Eq. (7)  L_CE = -1/N sum_i sum_c y_ic log x_ic

def loss_dice(logits, target, squared=True, smooth=1e-5):
    """Soft Dice over all K classes, sums pooled over the batch (spec 6, deviation 4)."""
    x, y = logits.softmax(dim=1), one_hot(target, logits.shape[1])  # (B, K, H, W)
    intersection = (x * y).sum(dim=(0, 2, 3))  # (K,), sums pooled over the batch (MERIT)
    denominator = (x ** (2 if squared else 1)).sum(dim=(0, 2, 3)) + y.sum(dim=(0, 2, 3))
    # Eq. (8)  L_Dice = 1 - 1/C sum_c 2 sum_i x_ic y_ic / (sum_i x_ic + sum_i y_ic)  (x^1: printed)
    return 1 - ((2 * intersection + smooth) / (denominator + smooth)).mean()

def sobel(x):
    """Eq. (15) on every channel: (B, K, H, W) -> (B, K, 2, H, W) responses (G_H, G_V)."""
    kernels = torch.stack([SOBEL_H, SOBEL_V]).to(x)[:, None].repeat(x.shape[1], 1, 1, 1)
    return F.conv2d(x, kernels, padding=1, groups=x.shape[1]).unflatten(1, (x.shape[1], 2))

def boundary_l1(prob, y, scales=BOUNDARY_SCALES, reduction="mean"):
    """Multi-scale Sobel difference of probabilities and one-hot labels (B, K, H, W); "mean":
    per pixel (ours), "sum": Eq. (9)'s L1 norm per image; G_H + G_V, mean over the batch."""
    loss = 0.0
    for i in scales:  # average pooling with an i x i kernel: 1, 1/2, 1/4 of the size
        diff = (sobel(F.avg_pool2d(prob, i)) - sobel(F.avg_pool2d(y, i))).abs()  # (B, K, 2, ..)
        per_image = diff.sum(dim=(1, 3, 4)) if reduction == "sum" else diff.mean(dim=(1, 3, 4))
        loss = loss + per_image.sum(dim=1).mean()  # G_H plus G_V, then mean over the batch
    return loss

def loss_boundary(logits, target, scales=BOUNDARY_SCALES, reduction="mean"):
    """Multi-scale boundary loss (Sec. 3.2.1, supplement Sec. 10) on softmax vs one-hot."""
    x, y = logits.softmax(dim=1), one_hot(target, logits.shape[1])
    # Eq. (9)  L_bnd = sum_{i in 1,2,4} |G(avg(x, i)) - G(avg(y, i))|_1
    return boundary_l1(x, y, scales, reduction)

def total_loss(logits, target, use_boundary=True, squared_dice=True, bnd_reduction="mean"):
    """Eq. (10) with alpha = 0.3, beta = 0.7; returns (loss, dict of the parts)."""
    bnd = loss_boundary(logits, target, reduction=bnd_reduction) if use_boundary else None
    parts = {"ce": loss_ce(logits, target), "dice": loss_dice(logits, target, squared_dice),
             "bnd": logits.new_zeros(()) if bnd is None else bnd}
    alpha, beta = LOSS_WEIGHTS
    loss = alpha * parts["ce"] + beta * parts["dice"] + parts["bnd"]  # Eq. (10)
    return loss, parts

# ==== 7. Data: image enhancement (Sec. 8, Tab. 4) and paired augmentation ====

@functools.lru_cache(maxsize=8)
def fuzzy_memberships(height, width, m=2, n=2, gamma=4.0, patrascu=False):
    """Memberships w_ij (I, J, H, W) of the fuzzy windows W_ij (spec 2.3, deviation 3)."""
    def bernstein(size, degree):
        t = np.arange(size) / size
        return np.stack([math.comb(degree, i) * t ** i * (1 - t) ** (degree - i)
                         for i in range(degree + 1 if patrascu else degree)])  # (windows, size)
    raw = (bernstein(height, m)[:, None, :, None] * bernstein(width, n)[None, :, None, :]) ** gamma
    return raw / (raw.sum(axis=(0, 1), keepdims=True) + (0.0 if patrascu else 1e-5))

def fuzzy_enhance(image, m=2, n=2, gamma=4.0, eps=1 / 255, patrascu=False, saturated="exclude",
                  sigma_u=math.sqrt(1 / 3), max_gain=8.0, rescale=True):
    """Fuzzy enhancement of ref. [36] (deviation 3): (H, W[, 3]) in [0, 1] -> E alike. Gray
    levels u = 2x - 1, log model u (+) v = tanh(phi(u) + phi(v)), phi = atanh: all in phi-space.
    Colour: statistics of the mean phi, one transform per channel (spec 2.6)."""
    image = np.asarray(image, np.float64)
    phi = np.arctanh(np.clip(2 * np.atleast_3d(image) - 1, -1 + eps, 1 - eps))  # (H, W, C) phi
    lum = phi.mean(axis=2)  # (H, W)
    valid = np.ones_like(lum, bool) if saturated == "clip" else (
        (image > 0).reshape(*lum.shape, -1).any(-1) & (image < 1).reshape(*lum.shape, -1).any(-1))
    if not valid.any():
        return np.asarray(image, np.float64)
    w = fuzzy_memberships(*lum.shape, m, n, gamma, patrascu)  # (I, J, H, W)
    card = np.maximum((w * valid).sum(axis=(2, 3)), 1e-300)
    mu = (w * valid * lum).sum(axis=(2, 3)) / card  # fuzzy mean per window (phi-space)
    sigma = np.sqrt((w * valid * (lum - mu[:, :, None, None]) ** 2).sum(axis=(2, 3)) / card)
    lam, tau = sigma_u / np.maximum(sigma, sigma_u / max_gain), -mu
    # Eq. (11)  psi_ij(f) = lambda_ij (x) (f (+) tau_ij), in phi-space lambda * (phi + tau)
    psi = lam[:, :, None, None, None] * (phi[None, None] + tau[:, :, None, None, None])
    w = w[..., None]  # (I, J, H, W, 1); Patrascu: the log-model sum of the products
    e_raw = (np.tanh((w * psi).sum(axis=(0, 1))) if patrascu
             else np.tanh(w * psi).sum(axis=(0, 1)))  # Eq. (12)  E = sum_ij w_ij (x) psi_ij(f)
    e_raw = e_raw[..., 0] if image.ndim == 2 else e_raw
    if not rescale:
        return e_raw
    inside = e_raw[valid]  # (pixels, [C]): the range of the enhanced support
    centre = 0.0 if image.ndim == 2 else (inside.max() + inside.min()) / 2  # gray: symmetric
    half = max(np.abs(inside - centre).max(), math.tanh(sigma_u))  # [-M, M] or [min, max]
    return np.clip(0.5 + 0.5 * (e_raw - centre) / half, 0, 1)  # saturated pixels may overshoot

def histogram_equalize(image):
    """Histogram equalisation ('HE' of Tab. 4) of a (H, W) image in [0, 1], 256 levels."""
    levels = np.round(np.clip(image, 0, 1) * 255).astype(np.int64)
    cdf = np.bincount(levels.ravel(), minlength=256).cumsum()
    first = cdf[cdf > 0][0]  # the darkest level present maps to 0, as OpenCV's equalizeHist
    return (cdf[levels] - first) / max(cdf[-1] - first, 1)

def clahe(image, tiles=8, clip_limit=2.0):
    """CLAHE (Tab. 4) of a (H, W) image in [0, 1], OpenCV's defaults (8 x 8 tiles, clip 2)."""
    levels = np.round(np.clip(image, 0, 1) * 255).astype(np.int64)
    h, w = levels.shape
    th, tw = -(-h // tiles), -(-w // tiles)
    padded = np.pad(levels, ((0, th * tiles - h), (0, tw * tiles - w)), mode="symmetric")
    blocks = padded.reshape(tiles, th, tiles, tw).transpose(0, 2, 1, 3).reshape(tiles, tiles, -1)
    hist = np.stack([[np.bincount(b, minlength=256) for b in row] for row in blocks]).astype(float)
    limit = max(clip_limit * th * tw / 256, 1.0)
    excess = np.clip(hist - limit, 0, None).sum(axis=-1, keepdims=True)
    lut = (np.minimum(hist, limit) + excess / 256).cumsum(axis=-1) / (th * tw)  # (T, T, 256)
    # each pixel interpolates the CDFs of its four nearest tile centres (clamped at the border)
    rows = np.clip((np.arange(h) + 0.5) / th - 0.5, 0, tiles - 1)[:, None]
    cols = np.clip((np.arange(w) + 0.5) / tw - 0.5, 0, tiles - 1)[None, :]
    return ndimage.map_coordinates(lut, np.broadcast_arrays(rows, cols, levels), order=1)

def enhance(image, method="fuzzy", **fuzzy):
    """E (Tab. 4) of a (H, W[, 3]) image in [0, 1] as 8 bits, for training and test (spec 2.7)."""
    if method == "fuzzy":
        e = fuzzy_enhance(image, **fuzzy)
    else:  # HE, CLAHE: each channel alone
        per_channel = {"he": histogram_equalize, "clahe": clahe, "none": np.asarray}[method]
        channels = np.moveaxis(np.atleast_3d(image), 2, 0)
        e = np.stack([per_channel(c) for c in channels], axis=2).reshape(np.shape(image))
    return np.round(np.clip(e, 0, 1) * 255).astype(np.uint8)

def random_rotate_flip(arrays, rng):
    """MERIT's draw (spec 7.2) for I, E, label: 1/2 rot90 + flip, 1/4 rotation by -20..19 deg."""
    draw = rng.random()
    if draw < 0.5:
        k, axis = rng.randrange(4), rng.randrange(2)
        arrays = [np.flip(np.rot90(a, k), axis) for a in arrays]
    elif draw < 0.75:
        angle = rng.randint(-20, 19)
        arrays = [ndimage.rotate(a, angle, order=0, reshape=False) for a in arrays]
    return [np.ascontiguousarray(a) for a in arrays]

def image_tensor(image, size, binary, resize="bilinear"):
    """(H, W[, 3]) in [0, 1] -> (3, S, S): gray repeated as is (MERIT), colour normalised."""
    x = torch.from_numpy(np.ascontiguousarray(image, np.float32))
    x = x[None].expand(3, -1, -1) if x.dim() == 2 else x.permute(2, 0, 1)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x[None], size=(size, size), mode=resize, align_corners=False)[0]
    if binary:
        x = (x - torch.tensor(common.IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(
            common.IMAGENET_STD).view(3, 1, 1)
    return x.contiguous()

class DualImageDataset(torch.utils.data.Dataset):
    """A shared data set with E made once per sample (spec 2.7): {image, enhanced, mask, index}."""
    def __init__(self, base, size, method="fuzzy", augment=False, binary=False, fuzzy=None,
                 resize="bilinear", seed=0):
        self.base, self.size, self.method, self.augment = base, size, method, augment
        self.binary, self.fuzzy, self.resize = binary, fuzzy or {}, resize
        self.rng = random.Random(seed)  # augmentation draws (common.make_loader reseeds it)
        self.reader = common.VolumeDataset(base.files) if hasattr(base, "files") else None
        self.names, self.cache = base.names, {}
    def __len__(self):
        return len(self.base)
    def raw(self, index):
        """(image (H, W) or (H, W, 3) in [0, 1], label (H, W) int64) before augmentation."""
        if self.binary:
            image, mask = self.base.full(index, self.size)
            return (common.resize_image(image, self.size) / 255.0,
                    common.resize_mask(mask, self.size).astype(np.int64))
        image, label, _ = self.reader[index] if self.reader else self.base.volume(index)
        return image[0], label[0]  # one-slice volume -> slice
    def enhanced(self, index, image):
        """E of sample `index` (cached as uint8, so an epoch does not recompute it)."""
        if index not in self.cache:
            self.cache[index] = enhance(image, self.method, **self.fuzzy)
        return self.cache[index] / 255.0
    def __getitem__(self, index):
        image, label = self.raw(index)
        e = self.enhanced(index, image)
        if self.augment:
            image, e, label = random_rotate_flip([image, e, label], self.rng)
        label = common.resize_mask(label, self.size)
        return {"image": image_tensor(image, self.size, self.binary, self.resize),
                "enhanced": image_tensor(e, self.size, self.binary, self.resize),
                "mask": torch.from_numpy(np.ascontiguousarray(label)).long(), "index": index}

def class_names(args, task):
    """(K, foreground class names) of the data in args.data."""
    if task == "binary":
        return 2, ["fg"]
    if args.data == "toy":
        return 9, [n.replace(" ", "_") for n in common.TOY_CLASS_NAMES]
    if (Path(args.data) / "train_npz").is_dir():
        return 9, SYNAPSE_ORGANS
    if (Path(args.data) / "train").is_dir() and (Path(args.data) / "valid").is_dir():
        return 4, ACDC_ORGANS
    common.fail(f"--data {args.data}: neither Synapse (train_npz/) nor ACDC (train/, valid/) "
                "layout; use --task binary for image/mask folders")

def make_loaders(data, args):
    """Training loader (augmented, E cached before workers fork) and validation loader."""
    binary, fuzzy = args.task == "binary", fuzzy_options(args)
    make = lambda split, train: DualImageDataset(  # noqa: E731
        data[split], args.img_size, args.enhance, train, binary, fuzzy, args.resize, args.seed)
    train_set = make("train", True)
    if args.workers > 0:  # fill the E cache first, so that the workers share it
        for i in range(len(train_set)):
            train_set.enhanced(i, train_set.raw(i)[0])
    loader = common.make_loader(train_set, args.batch_size, True, args.workers, args.seed)
    if not data["val"]:  # None or empty: no validation set
        return loader, None
    return loader, common.make_loader(make("val", False), args.batch_size, False, args.workers)

# ==== 8. Train, evaluate, predict ====

def amp_setup(device, enabled, dtype=None):
    """--amp: (dtype, scaler): bf16 if supported, else fp16 with a scaler, since layer scale
    1e-6 makes the blocks' gradients (~1e-9) underflow fp16 (fc1, conv_dw would get zeros)."""
    if dtype is None:
        cuda_fp16 = device.type == "cuda" and not torch.cuda.is_bf16_supported()
        dtype = torch.float16 if cuda_fp16 else torch.bfloat16
    return dtype, torch.amp.GradScaler(device.type, enabled=enabled and dtype == torch.float16)

def train_step(model, batch, optimizer, args, device, amp):
    """One optimisation step on a batch; `amp` = amp_setup(...). Returns the loss terms."""
    image, enhanced, target = (batch[k].to(device) for k in ("image", "enhanced", "mask"))
    k = common.unwrap(model).decoder.linear_pred.out_channels  # target: (B, S, S) in 0..K-1
    if int(target.max()) >= k:
        common.fail(f"--data {args.data}: label value {int(target.max())} in a training mask, "
                    f"but the task has {k} classes (labels 0..{k - 1})")
    dtype, scaler = amp
    with torch.autocast(device.type, dtype=dtype, enabled=args.amp):
        logits = model(image, enhanced)  # (B, K, S, S)
    loss, parts = total_loss(logits.float(), target, not args.no_bnd, not args.dice_eq8,
                             args.bnd_reduction)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return {"loss": loss.item(), **{k: v.item() for k, v in parts.items()}}

def train_one_epoch(model, loader, optimizer, args, device, amp, show=True):
    """One pass over the training slices; returns the mean of each loss term."""
    model.train()
    rows = []
    for step, batch in enumerate(common.progress(loader, "train", show)):
        if args.limit_batches and step >= args.limit_batches:
            break
        rows.append(train_step(model, batch, optimizer, args, device, amp))
    return {k: sum(r[k] for r in rows) / max(len(rows), 1) for k in ("loss", "ce", "dice", "bnd")}

@torch.no_grad()
def predict(model, images, args, device, binary=False):
    """Softmax (n, K, S, S) of images (H, W[, 3]) in [0, 1]; E made at their size (spec 2.7)."""
    model.eval()
    image = torch.stack([image_tensor(i, args.img_size, binary, args.resize) for i in images])
    enhanced = torch.stack([image_tensor(enhance(i, args.enhance, **fuzzy_options(args)) / 255,
                                         args.img_size, binary, args.resize) for i in images])
    return model(image.to(device), enhanced.to(device)).softmax(dim=1).float().cpu()

def predict_full(model, rgb, args, device, binary):
    """Mask (Tab. 13: upsampled probabilities) or labels (nearest) at a (H, W, 3) image's size."""
    image = common.resize_image(rgb, args.img_size) / 255.0 if binary else rgb.mean(2) / 255
    prob = predict(model, [image], args, device, binary)  # (1, K, S, S)
    if binary:
        return F.interpolate(prob, size=rgb.shape[:2], mode="bilinear")[0, 1].numpy() >= 0.5
    return common.resize_mask(prob[0].argmax(0).numpy(), 0, rgb.shape[:2])

def predict_labels(model, volume, args, device):
    """Labels (D, H, W): --batch-size slices per forward, resized nearest (TransUNet, spec 9)."""
    step = args.batch_size
    labels = [predict(model, list(volume[d:d + step]), args, device).argmax(dim=1).numpy()
              for d in range(0, len(volume), step)]
    return np.stack([common.resize_mask(p, 0, volume.shape[1:]) for p in np.concatenate(labels)])

def evaluate(model, dataset, args, device, names, convention="transunet", out=None):
    """The paper's columns on one test set (Tabs. 1-2, 13, protocol table); PNGs into `out`."""
    binary, overlays = args.task == "binary", 50
    meter = (common.PerImageMeter(threshold=0.5) if binary else
             common.VolumeMeter(len(names) + 1, names, convention=convention))
    for i in range(len(dataset)):
        if binary:  # (H, W, 3) uint8 and (H, W) bool
            image, label = dataset.full(i)
            pred = predict_full(model, image, args, device, binary)
            meter.update(pred, label)
            pred, label, images, stems = pred[None], label[None], image[None], [dataset.names[i]]
        else:  # a volume (D, H, W) of slices in [0, 1]
            volume, label, name = dataset.volume(i) if hasattr(dataset, "volume") else dataset[i]
            if int(label.max()) > len(names):
                common.fail(f"test volume {name}: label value {int(label.max())}, but the task "
                            f"has {len(names) + 1} classes")
            pred = predict_labels(model, volume, args, device)
            meter.update(pred, label)
            stems = [name] if len(pred) == 1 else [f"{name}_{d:03d}" for d in range(len(pred))]
            images = np.repeat((np.clip(volume, 0, 1)[..., None] * 255).astype(np.uint8), 3, -1)
        if out is not None:
            overlays -= common.save_predictions(out, stems, pred, images, label, not binary,
                                                overlays)
    scores = meter.compute()
    if binary:
        return {"Dice": scores["dice"] * 100}
    return {"Dice": scores["mean_dice"] * 100, "HD95": scores["mean_hd95"],
            **{n: scores[f"dice_{n}"] * 100 for n in names}}

def test_all(model, state, data, args, run, names):
    """Test the weights `state` on every test group; print and save the paper's columns."""
    common.unwrap(model).load_state_dict(state)
    convention = "skip" if args.data == "toy" else "transunet"  # deviation 9
    metrics = {}
    for group, dataset in data["test"].items():
        metrics[group] = evaluate(common.unwrap(model), dataset, args, run.device, names,
                                  convention, run.folder() / "predictions")
        run.log(f"test [{group}] " + "  ".join(f"{k} {v:.2f}" for k, v in metrics[group].items()))
    run.save_json("test_metrics.json", metrics)
    return metrics

def validate(model, loader, num_classes, device):
    """Mean foreground Dice over validation slices (each scored alone, 'skip' convention)."""
    if loader is None:
        return math.nan
    model.eval()
    meter = common.VolumeMeter(num_classes, convention="skip")
    with torch.no_grad():
        for batch in loader:
            logits = model(batch["image"].to(device), batch["enhanced"].to(device))
            for pred, label in zip(logits.argmax(dim=1).cpu().numpy(), batch["mask"].numpy()):
                meter.update(pred, label)
    return meter.compute()["mean_dice"]

def predict_folder(model, args, run):
    """--predict: a PNG per image file (label map, or 0/255 mask) into --out."""
    files, binary = common.list_images(args.predict), args.task == "binary"
    out = Path(args.out) if args.out else run.folder() / "predictions"
    out.mkdir(parents=True, exist_ok=True)
    for path in files:
        pred = predict_full(model, common.load_image(path), args, run.device, binary)
        common.save_predictions(out, [path.stem], [pred], labels=not binary)
    run.log(f"wrote {len(files)} masks to {out}")
    return {"predicted": len(files), "out": str(out)}

# ==== 9. Command line ====

SWITCHES = ("inputs", "fusion", "attn", "cross_attn", "merge", "gsa", "gsa_axis", "attn_proj",
            "edge_from", "rel_pos_bias", "num_difm", "decoder_dropout")  # DINConfig fields
FUZZY = ("fuzzy_m", "fuzzy_n", "fuzzy_gamma", "fuzzy_eps", "fuzzy_patrascu", "fuzzy_saturated")
ADOPTED = ("task", "enhance", *FUZZY, "resize", "img_size", *SWITCHES)  # what weights fit

def model_switches(args):
    """The ablation switches of the command line as DINConfig fields."""
    return {name: getattr(args, name) for name in SWITCHES}

def fuzzy_options(args):
    """The --fuzzy-* flags as keyword arguments of fuzzy_enhance (empty for other methods)."""
    return {n[len("fuzzy_"):]: getattr(args, n) for n in FUZZY} if args.enhance == "fuzzy" else {}

def protocol_row(args, data):
    """The docstring's protocol row for this run's data set (printed at start-up)."""
    name = re.escape({"isic2018": "ISIC18"}.get(data["layout"], data["layout"]))  # table's names
    row = re.search(rf"^  ({name}) +(\|.*(\n {{4,}}\|.*)*)", __doc__, re.MULTILINE | re.IGNORECASE)
    if not row:
        return f"protocol: {data['layout']} is none of the paper's data sets" + (
            "" if args.data == "toy" else " (their recipe applies)")
    return f"protocol [{row[1]}]: " + " ".join(row[2].split()) + " (docstring: recipe)"

def bench(args, run, explicit):
    """--bench: a training step and an inference, paper preset and size unless given; one line."""
    preset = args.preset if args.preset_reason == "--preset" else "paper"
    size, batch = (getattr(args, k) if k in explicit else PAPER_RECIPE[k]
                   for k in ("img_size", "batch_size"))
    model = build_model(preset, 9, **model_switches(args)).to(run.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    image, amp = torch.rand(batch, 3, size, size).to(run.device), amp_setup(run.device, args.amp)
    data = {"image": image, "enhanced": image, "mask": torch.randint(0, 9, (batch, size, size))}
    step = lambda: train_step(model.train(), data, optimizer, args, run.device, amp)  # noqa
    infer = torch.no_grad()(lambda: model.eval()(image, image))
    record = common.benchmark(model, step, infer, batch, run.device, preset=preset, img_size=size,
                              repeats=3 if run.device.type == "cuda" else 1,
                              split_M=parameter_split(model))
    run.log(json.dumps(record))
    return record

def parse_args(argv):
    """Shared flags + DIN's switches; one that the others make meaningless fails. (args, given)"""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(parser, PAPER_RECIPE, "Sec. 4.2", pretrained_default=None)
    add = parser.add_argument_group("DIN switches (Tabs. 3-8; docstring deviations)").add_argument
    add("--task", choices=["multiclass", "binary"], default="multiclass", help="binary: image/mask")
    add("--enhance", choices=["fuzzy", "he", "clahe", "none"], default="fuzzy", help="E (Tab. 4)")
    add("--fuzzy-patrascu", action="store_true", help="[36] as written (deviation 3)")
    add("--fuzzy-m", type=int, default=2, help="fuzzy window grid, rows (reference: 2)")
    add("--fuzzy-n", type=int, default=2, help="fuzzy window grid, columns (reference: 2)")
    add("--fuzzy-gamma", type=float, default=4.0, help="membership exponent (reference: 4)")
    add("--fuzzy-eps", type=float, default=1 / 255, help="u clipped to +-(1 - eps) (ours)")
    add("--fuzzy-saturated", choices=["exclude", "clip"], default="exclude", help="pixels 0, 1")
    add("--inputs", choices=["ie", "i", "e", "ii"], default="ie", help="encoders' input (Tab. 4)")
    add("--fusion", choices=["difm", "concat", "input"], default="difm", help="Tab. 5")
    add("--attn", choices=["dual", "ie", "ei"], default="dual", help="directions (Tab. 7)")
    add("--no-cross-attn", dest="cross_attn", action="store_false", help="Tab. 3 without (a)")
    add("--no-merge", dest="merge", action="store_false", help="Tab. 3 without (b)")
    add("--no-gsa", dest="gsa", action="store_false", help="Tab. 3 without (c)")
    add("--gsa", dest="gsa_axis", choices=["channel", "global"], default="channel", help="Eq. (6)")
    add("--attn-proj", choices=["budget", "lean"], default="budget", help="spec 4.2")
    add("--no-rel-pos-bias", dest="rel_pos_bias", action="store_false", help="deviation 1")
    add("--edge-from", choices=["stage", "chain"], default="stage", help="spec 3")
    add("--num-difm", type=int, default=4, help="DIFMs kept, smallest maps dropped (Tab. 6)")
    add("--decoder-dropout", type=float, default=0.1, help="before the last 1x1 (SegFormer)")
    add("--resize", choices=["bilinear", "bicubic"], default="bilinear", help="MERIT: cubic")
    add("--official-split", action="store_true", help="binary: the layout's split (Sec. 7.6)")
    add("--no-bnd", action="store_true", help="train without L_bnd (Tabs. 3, 8)")
    add("--bnd-reduction", choices=["mean", "sum"], default="mean", help="L_bnd (deviation 4)")
    add("--dice-eq8", action="store_true", help="Dice as Eq. (8) prints it (MERIT: squared)")
    add("--weight-decay", type=float, default=WEIGHT_DECAY, help="AdamW (MERIT; not stated)")
    explicit = common.explicit_flags(parser, argv)
    args = common.finish_args(parser.parse_args(argv), PAPER_RECIPE, TOY_RECIPE)
    single = args.inputs in ("i", "e") or args.fusion == "input"
    common.check_conflicts(parser, args, [  # (flags, condition: they do nothing, why)
        (SWITCHES[2:10], args.fusion == "concat", "--fusion concat replaces the DIFM"),  # DIFM's
        (("inputs",), args.fusion != "difm" and args.inputs != "ie",
         f"--fusion {args.fusion} fuses I and E"),
        (("attn",), single, "one encoder (--inputs i/e, --fusion input) has one direction"),
        (("attn", "attn_proj", "rel_pos_bias"), not args.cross_attn, "--no-cross-attn drops it"),
        (("edge_from",), not args.merge, "--no-merge leaves the edge maps unused"),
        (("gsa_axis",), not args.gsa, "--no-gsa removes the gate"),
        (("bnd_reduction",), args.no_bnd, "--no-bnd removes L_bnd"),
        (FUZZY, args.enhance != "fuzzy", f"--enhance {args.enhance} is not fuzzy"),
        (("enhance", *FUZZY), args.inputs in ("i", "ii") and args.fusion == "difm",
         f"--inputs {args.inputs} never uses E"),
        (("official_split",), args.task != "binary", "only binary data are re-split")], explicit)
    if not 1 <= args.num_difm <= 4:
        common.fail(f"--num-difm must be 1..4 (got {args.num_difm})")
    return args, explicit

def main(argv=None):
    args, explicit = parse_args(argv)
    common.seed_everything(args.seed)
    run = common.Run(args, "dinet")
    if args.bench:
        return bench(args, run, explicit)
    flag = next((f for f in ("eval", "resume", "checkpoint") if getattr(args, f)), None)
    checkpoint = flag and common.load_checkpoint(getattr(args, flag), "dinet", f"--{flag}")
    if flag:  # the weights bring the settings they were trained with
        common.adopt_config(args, checkpoint, ADOPTED, explicit, f"--{flag}")
    num_classes, names = ((checkpoint["num_classes"], checkpoint["names"]) if args.predict
                          else class_names(args, args.task))
    model = build_model(args.preset, num_classes, **model_switches(args))
    run.log(f"dinet: preset {args.preset} ({args.preset_reason}), device {run.device}, task "
            f"{args.task}, E: {args.enhance}; parameters (M) {parameter_split(model)} (paper: "
            "323.31 = 178 encoders + 119.94 DIFM + 25.27 decoder, Sec. 4.5)")
    if checkpoint and not args.resume:  # adopt_config made the architectures equal
        model.load_state_dict(checkpoint["model"])
    elif not checkpoint:
        load_pretrained(model, args.pretrained, run.log, run.is_main, run.barrier)
    model.to(run.device)
    if args.predict:
        return predict_folder(model, args, run)
    data = common.load_data(args, args.task, toy_sizes=TOY_SIZES, fractions=(0.8, 0.1, 0.1),
                            official=args.official_split or args.task != "binary")
    if not data["test"]:
        common.fail(f"--data {args.data}: no test files found")
    run.log(f"data: {data['source']}; classes: {', '.join(names)}\n{protocol_row(args, data)}")
    if args.eval:
        return test_all(model, checkpoint["model"], data, args, run, names)
    loader, val_loader = make_loaders(data, args)
    if run.distributed:  # ablations without merge leave the edge pools unused
        model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    amp = amp_setup(run.device, args.amp)
    start = run.restore(checkpoint, model, optimizer, amp[1]) if args.resume else 0
    if data["splits"] is not None:
        run.save_json("splits.json", data["splits"])
    run.save_json("config.json", {**vars(args), "num_classes": num_classes, "names": names,
                                  "preset_values": asdict(common.unwrap(model).cfg)})
    run.log(f"{len(loader.dataset)} training samples, {args.epochs} epochs, batch "
            f"{args.batch_size}, AdamW lr {args.lr} (constant), weight decay {args.weight_decay}")
    for epoch in range(start, args.epochs):
        started = time.perf_counter()
        common.set_lr(optimizer, args.lr)  # constant (MERIT): the same after any --resume
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        losses = train_one_epoch(model, loader, optimizer, args, run.device, amp, run.is_main)
        val_dice = validate(common.unwrap(model), val_loader, num_classes, run.device)
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], **losses,
               "val_dice": val_dice, "seconds": time.perf_counter() - started}
        state = {"model": common.unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": amp[1].state_dict(), "config": vars(args), "preset": args.preset,
                 "num_classes": num_classes, "names": names}
        run.end_epoch(epoch, row, state, score=val_dice)  # no validation: best.pt = last
    metrics = test_all(model, run.final_weights("best"), data, args, run, names) \
        if run.is_main else {}
    run.close()
    return metrics

if __name__ == "__main__":
    common.cli(main)
