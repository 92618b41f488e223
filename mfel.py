"""MFEL: multi-interactive feature embedding learning for medical image segmentation.

Y. Huang, Y. Luo, Frontiers in Medicine 12:1661984 (2025), doi 10.3389/fmed.2025.1661984.
No code of the authors exists; every gap is filled as in ../shared/specs/mfel.md (G1-G12).

Idea: a segmentation network is trained together with three self-supervised auto-encoders.
FIIR (Sec. 3.1) splits the image into foreground and background with a mask (Eq. 1),
reconstructs both and the whole image (L1, Eqs. 2, 4, 11), and lets the foreground and
background features re-calibrate the whole-image features (AFM, Eq. 3). FRIS (Sec. 3.2) fuses
those detail-rich features with the segmentation features by cross attention in both
directions (BFM, Eqs. 5-6), models the deepest fused feature with a multi-branch Mamba whose
four channel groups share one mixer (EM, Eqs. 7-10), and decodes a mask (BCE + Dice, Eq. 12).

Equation map:
  Eq. (1) -> split_foreground_background
  Eq. (2) -> loss_foreground_background
  Eq. (3) -> AdaptiveFeatureModulation.forward
  Eq. (4) -> loss_image_reconstruction
  Eq. (5) -> cross_attention (called by BidirectionalFusion.forward)
  Eq. (6) -> BidirectionalFusion.forward
  Eq. (7) -> MultiBranchVisionMamba.forward
  Eq. (8) -> MultiBranchVisionMamba.forward (the mixer is MambaMixer)
  Eq. (9) -> MultiBranchVisionMamba.forward
  Eq. (10) -> MultiBranchVisionMamba.forward
  Eq. (11) -> loss_reconstruction
  Eq. (12) -> loss_mask
  Eq. (13) -> total_loss
  Eq. (14) -> common.precision (per image: common.PerImageMeter, in evaluate)
  Eq. (15) -> common.recall
  Eq. (16) -> common.dice (F1)
  Eq. (17) -> common.iou

Symbols (shapes at a 256 input, paper preset, C = (64, 128, 256)):
  I_s, I_m        image (B, 3, H, W) in [0, 1], mask_split (B, 1, H, W) binary
  I_f, I_b        image_fg, image_bg (B, 3, H, W)
  F_s/F_f/F_b/F_r f_s, f_f, f_b, f_r: lists of 3 levels (B, C_i, H/2^i, W/2^i)
  alpha, beta     AFM scale and shift (B, C_i, 1, 1); F^_r = f_r_hat
  Q, K, V         (B, heads, tokens, d), d = 32 channels per head
  F~_r, F~_s, F-_s  f_r_tilde, f_s_tilde, f_s_bar (B, C_i, H/2^i, W/2^i)
  N_s, N_s^j      n_s (B, L, C_3), n_s_j (B, L, C_3/4), L = H/8 * W/8 tokens
  gamma           EM skip scale (one learnable scalar)
  I_f', I_b', I_r'  recon_fg, recon_bg, recon_image (B, 3, H, W); I_s' = logits (B, 1, H, W)

Protocol (the default run on each data set of the paper; P = paper, S = spec / our choice):
  all       from scratch: the paper names no pretrained weights (P), --pretrained auto loads
            none; 150 epochs, batch 4, Adam lr 1e-3, linear warm-up 10 epochs (S) then cosine
            to 1e-5, set every iteration (P, Sec. 4.1.3); flips and a rot90, p = 0.5 each (S);
            the last epoch is tested (P: no validation set; --select best); threshold 0.5 at
            the network size (S), per image (S, printed first) and global (S), both reported
  glas      official split, train 85 / test 80 (testA 60 + testB 20), 128 x 128 (P, Table 1);
            a last batch of one image is dropped: 21 iterations an epoch (spec 5)
  isic2016  official split, train 900 / test 379, 256 x 256 (P, Table 2)
  isic2017  official split, train 2000 / test 600, 256 x 256 (P, Table 4); the official
            150-image validation folder is scored each epoch for the log only (P ignores it)
  ph2       all 200 images, 256 x 256, test the ISIC 2016 model (P, Table 3): --data ISIC2016
            --test-data PH2, or --eval isic2016.pt --data PH2
  toy       ours: built-in blobs, 128 train / 16 val / 40 test at 64 px; 4 epochs, batch 8,
            lr 2e-3, 1 warm-up epoch; small preset; the last epoch is tested

Ablations (Tables 5-6 on GlaS and ISIC 2016; each switch removes what it names, nothing else):
  row 1     --no-fiir: E_f, E_b, E_r, AFM, BFM, D_f, D_b, D_r and L_rec go (F-_s = F_s). The
            coarse head and L_coarse stay, so this row differs from our full model in FIIR
            alone. --no-fiir --no-coarse-head is the paper's literal network without FIIR
            (E_s, EM, decoder; L_mask only), which also drops our deep supervision of F_s^3.
  rows 2-6  --afm sum | concat, --bfm sum | concat, --no-em (EM -> identity)

Deviations (from the spec; the paper leaves these open):
  1. I_m of Eq. 1 is the model's own coarse mask (1x1 conv on F_s^3, > 0.5), trained by an extra
     BCE + Dice term L_coarse (spec G5), so the ground truth never enters at test time
     (--mask-source-train gt, --coarse-weight; --mask-source-eval oracle: a diagnostic only).
  2. BFM keys/values average-pooled to <= 32x32 tokens (G8; --kv-grid 0 = none). Eq. 6 pairs
     each map with the values of its key stream (G8); --bfm-literal-eq6 = the printed pairing.
  3. Widths, U-Net blocks, decoders, AFM internals (sigmoid on alpha), BFM norms, the heads: our
     choices (G2-G10). EM: two LayerNorms where UltraLight's PVM layer reuses one; Mamba keeps
     its own init; its scan runs in ONE direction over the H/8 x W/8 tokens (row-major,
     causal), as in PVM, not VMamba's four-direction SS2D (G9). L1 terms are means (G11);
     the input is in [0, 1], no mean/std, so Eq. 1's background is black (G1).
  4. --resume: each iteration's LR is computed from (epoch, --epochs), so a run resumed with a
     larger --epochs follows the new total's schedule from its next epoch on.

Run:
  python mfel.py                                   # toy data, small preset, CPU, minutes
  python mfel.py --data PATH/GlaS                  # Table 1 (GlaS: 128x128, instance masks)
  python mfel.py --data PATH/ISIC2016 --test-data PATH/PH2Dataset   # Tables 2 and 3 at once
  python mfel.py --data PATH --no-em               # an ablation row (Tables 5-6)
  python mfel.py --data PATH --eval runs/mfel/<time>/last.pt  # or --predict DIR --checkpoint F
  python mfel.py --bench [--no-em]                 # paper preset, 256x256, one JSON line
"""
import argparse
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: on a shared
# 2-core CPU, spinning idle OpenMP threads made a training step about 8x slower (measured)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402

# ==== 2. Presets and recipe ====


@dataclass
class Preset:
    """Architecture sizes; the paper gives none of them, the spec's choices are cited."""
    widths: tuple  # C_1, C_2, C_3 of levels i = 1..3 (Sec. 3.1.1 names three levels)
    head_dim: int  # d of Eq. (5): channels per attention head
    kv_grid: int  # BFM keys/values pooled to at most kv_grid x kv_grid tokens (0 = no pooling)
    groups: int  # EM branches
    d_state: int  # Mamba state size N
    d_conv: int  # Mamba causal depthwise conv kernel
    expand: int  # Mamba inner width = expand * C_3 / groups


PRESETS = {
    "paper": Preset(
        widths=(64, 128, 256),  # spec G2: U-Net's first three stages; levels i = 1..3, Sec. 3.1.1
        head_dim=32,  # spec G8: heads = C_i / 32
        kv_grid=32,  # spec G8: exact attention at level 3, pooled K/V above
        groups=4,  # Sec. 3.2.2, Eq. (7): "divide N_s into four groups"
        d_state=16,  # spec G9: UltraLight-VM-UNet PVMLayer's Mamba(d_state=16)
        d_conv=4,  # spec G9: same, d_conv=4
        expand=2),  # spec G9: same, expand=2
    "small": Preset(widths=(32, 64, 128), head_dim=32, kv_grid=32, groups=4, d_state=16,
                    d_conv=4, expand=2),
    "tiny": Preset(widths=(16, 32, 64), head_dim=8, kv_grid=8, groups=4, d_state=8, d_conv=4,
                   expand=2),  # 8x8 K/V grid so that tests at 32 px exercise the pooling
}

PAPER_RECIPE = {"epochs": 150, "batch_size": 4, "lr": 1e-3,  # Sec. 4.1.3
                "img_size": 256}  # Sec. 4.1.1: ISIC 2016/2017 and PH2 resized to 256x256
GLAS_IMG_SIZE = 128  # Sec. 4.1.1: GlaS at 128x128
MIN_LR = 1e-5  # Sec. 4.1.3: "decays to 1e-5"
WARMUP_EPOCHS = 10  # spec 5: the paper gives no warm-up length
TOY_RECIPE = {"epochs": 4, "batch_size": 8, "lr": 2e-3, "img_size": 64, "warmup_epochs": 1,
              "toy_sizes": (128, 16, 40)}  # toy CPU demo: <= 5 min on 2 cores


# ==== 3. Building blocks (paper order: FIIR Sec. 3.1, then FRIS Sec. 3.2) ====

def split_foreground_background(image, mask):
    """Sec. 3.1.1: image (B, 3, H, W), binary mask (B, 1, H, W) -> I_f, I_b (B, 3, H, W)."""
    return image * mask, image * (1 - mask)  # Eq. (1)  I_f = I_s * I_m, I_b = I_s * (1 - I_m)


class ConvBlock(nn.Sequential):
    """[Conv3x3 (no bias) -> BN -> ReLU] x 2, U-Net's double conv (spec G3)."""

    def __init__(self, in_channels, out_channels):
        layers = []
        for c_in in (in_channels, out_channels):
            layers += [nn.Conv2d(c_in, out_channels, 3, padding=1, bias=False),
                       nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
        super().__init__(*layers)


class Encoder(nn.Module):
    """E_s, E_f, E_b and E_r (spec G3, G4): three levels of ConvBlock + 2x2 max-pool.

    (B, 3, H, W) -> [(B, C_i, H/2^i, W/2^i) for i = 1..3]. Strides 2-4-8, not U-Net's 1-2-4: a
    full-resolution level 1 would make the level-1 BFM attend over all H*W tokens. The four
    encoders share this design, not their weights.
    """

    def __init__(self, widths):
        super().__init__()
        self.blocks = nn.ModuleList(ConvBlock(c_in, c_out)
                                    for c_in, c_out in zip((3,) + tuple(widths[:-1]), widths))

    def forward(self, x):
        features = []
        for block in self.blocks:
            x = F.max_pool2d(block(x), 2)  # (B, C_i, H/2^i, W/2^i)
            features.append(x)
        return features


class Decoder(nn.Module):
    """D_f, D_b, D_r and the segmentation decoder (spec G7, G10): U-Net decoder, 3 stages.

    [level 1, level 2, level 3] features -> (B, out_channels, H, W); the last 1x1 conv is the
    head (S_h for segmentation: logits; reconstruction decoders add a sigmoid).
    """

    def __init__(self, widths, out_channels, sigmoid=False):
        super().__init__()
        c1, c2, c3 = widths
        self.up32 = ConvBlock(c3 + c2, c2)
        self.up21 = ConvBlock(c2 + c1, c1)
        self.up10 = nn.Sequential(nn.Conv2d(c1, c1, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(c1), nn.ReLU(inplace=True))
        self.head = nn.Conv2d(c1, out_channels, 1)
        self.sigmoid = sigmoid

    def forward(self, features):
        level1, level2, x = features
        up = partial(F.interpolate, mode="bilinear", align_corners=False)
        x = self.up32(torch.cat([up(x, size=level2.shape[-2:]), level2], 1))  # (B, C_2, H/4, W/4)
        x = self.up21(torch.cat([up(x, size=level1.shape[-2:]), level1], 1))  # (B, C_1, H/2, W/2)
        x = self.head(self.up10(up(x, scale_factor=2)))  # (B, out, H, W)
        return torch.sigmoid(x) if self.sigmoid else x


class AdaptiveFeatureModulation(nn.Module):
    """Phi_a^i, Sec. 3.1.2 and Fig. 2: F_f and F_b re-calibrate F_r channel-wise (spec G6).

    f_r, f_f, f_b (B, C, h, w) -> f_r_hat (B, C, h, w). mode 'sum' / 'concat' are the
    ablations of Tables 5-6, rows 2-3 (spec G12).
    """

    def __init__(self, c, mode="afm"):
        super().__init__()
        self.mode = mode
        if mode == "afm":  # dual-stream 1x1 conv blocks on the pooled descriptor
            self.alpha_stream = nn.Sequential(nn.Conv2d(3 * c, c, 1), nn.ReLU(inplace=True),
                                              nn.Conv2d(c, c, 1), nn.Sigmoid())
            self.beta_stream = nn.Sequential(nn.Conv2d(3 * c, c, 1), nn.ReLU(inplace=True),
                                             nn.Conv2d(c, c, 1))
        elif mode == "concat":
            self.fuse = nn.Conv2d(3 * c, c, 1)

    def forward(self, f_r, f_f, f_b):
        if self.mode == "sum":
            return f_r + f_f + f_b
        f_u = torch.cat([f_r, f_f, f_b], dim=1)  # (B, 3C, h, w)
        if self.mode == "concat":
            return self.fuse(f_u)
        g = f_u.mean(dim=(2, 3), keepdim=True)  # GAP: (B, 3C, 1, 1)
        alpha, beta = self.alpha_stream(g), self.beta_stream(g)  # (B, C, 1, 1) each
        return (1 + alpha) * f_r + beta  # Eq. (3)  F^_r = (1 + alpha) x F_r + beta


def cross_attention(q, k, v):
    """Softmax(Q K^T / sqrt(d)) V for q (B, heads, N_q, d), k and v (B, heads, N_kv, d)."""
    # Eq. (5)  Attn = Softmax(Q K^T / sqrt(d)), d = channels per head; fused with "x V" of Eq. 6
    return F.scaled_dot_product_attention(q, k, v)  # (B, heads, N_q, d)


class BidirectionalFusion(nn.Module):
    """Phi_b^i, Sec. 3.2.1 and Fig. 3: two-stream cross attention, then concat + conv (spec G8).

    f_s, f_r_hat (B, C, h, w) -> f_s_bar (B, C, h, w). mode 'sum' / 'concat' are Tables 5-6,
    rows 4-5; literal_eq6 swaps the value streams as Eq. 6 is printed.
    """

    def __init__(self, c, head_dim=32, kv_grid=32, mode="attn", literal_eq6=False):
        super().__init__()
        self.mode, self.kv_grid, self.literal_eq6 = mode, kv_grid, literal_eq6
        self.heads = max(1, c // head_dim)
        if mode == "attn":  # one LayerNorm per input of each direction (Fig. 3's "Norm")
            self.norm_q_s, self.norm_kv_r = nn.LayerNorm(c), nn.LayerNorm(c)
            self.norm_q_r, self.norm_kv_s = nn.LayerNorm(c), nn.LayerNorm(c)
            self.q_s, self.kv_r = nn.Linear(c, c), nn.Linear(c, 2 * c)
            self.q_r, self.kv_s = nn.Linear(c, c), nn.Linear(c, 2 * c)
            self.c11_s, self.c11_r = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        if mode != "sum":  # the final "concatenation and convolution", also the concat ablation
            self.fuse = nn.Sequential(nn.Conv2d(2 * c, c, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(c), nn.ReLU(inplace=True))

    def _tokens(self, x):  # (B, C, h, w) -> (B, h*w, C), row-major
        return x.flatten(2).transpose(1, 2)

    def _heads(self, x):  # (B, N, C) -> (B, heads, N, C / heads)
        return x.unflatten(2, (self.heads, -1)).transpose(1, 2)

    def _pooled(self, x):
        """Key/value source average-pooled to at most kv_grid x kv_grid (PVT-style, spec G8)."""
        h, w = x.shape[-2:]
        if self.kv_grid and (h > self.kv_grid or w > self.kv_grid):
            x = F.adaptive_avg_pool2d(x, (min(h, self.kv_grid), min(w, self.kv_grid)))
        return self._tokens(x)  # (B, N_kv, C)

    def forward(self, f_s, f_r_hat):
        if self.mode == "sum":
            return f_s + f_r_hat
        if self.mode == "concat":
            return self.fuse(torch.cat([f_r_hat, f_s], dim=1))
        # queries keep every token of the level; keys/values may be pooled (same grid for both
        # streams, which is what makes the printed Eq. 6 pairing shape-valid)
        b, c, h, w = f_s.shape
        q_s = self._heads(self.q_s(self.norm_q_s(self._tokens(f_s))))  # (B, heads, hw, d)
        k_r, v_r = map(self._heads, self.kv_r(self.norm_kv_r(self._pooled(f_r_hat))).chunk(2, -1))
        q_r = self._heads(self.q_r(self.norm_q_r(self._tokens(f_r_hat))))
        k_s, v_s = map(self._heads, self.kv_s(self.norm_kv_s(self._pooled(f_s))).chunk(2, -1))
        # the values each map weighs: those of its key stream (spec G8), or crossed as printed
        v_attn_r, v_attn_s = (v_s, v_r) if self.literal_eq6 else (v_r, v_s)
        # Eq. (5), Attn_r: segmentation queries read the reconstruction stream
        out_s = cross_attention(q_s, k_r, v_attn_r)  # (B, heads, hw, d)
        # Eq. (5), Attn_s: reconstruction queries read the segmentation stream
        out_r = cross_attention(q_r, k_s, v_attn_s)

        def to_map(x):
            return x.transpose(1, 2).reshape(b, h * w, c).transpose(1, 2).reshape(b, c, h, w)
        # the residuals add the un-normalised streams (the LayerNorms only feed Q, K, V)
        # Eq. (6)  F~_s = C11(Attn_r x V) + F_s, F~_r = C11(Attn_s x V) + F^_r; V = V_r, V_s
        # (spec G8, the default) or V_s, V_r (the printed Eq. 6, --bfm-literal-eq6)
        f_s_tilde = self.c11_s(to_map(out_s)) + f_s
        f_r_tilde = self.c11_r(to_map(out_r)) + f_r_hat
        return self.fuse(torch.cat([f_r_tilde, f_s_tilde], dim=1))  # F-_s (B, C, h, w)


class MambaMixer(nn.Module):
    """M(.) of Eq. 8: the Mamba mixer (mamba_ssm.Mamba = mambapy MambaBlock), spec G9.

    (B, L, d) -> (B, L, d). in_proj -> causal depthwise conv + SiLU -> selective scan
    (common.selective_scan: h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t, y_t = C_t h_t + D x_t)
    -> gate by SiLU(z) -> out_proj. Official: state-spaces/mamba, mamba_ssm/modules/mamba_simple.py.
    """

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2):
        super().__init__()
        d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16)
        self.d_state = d_state
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, padding=d_conv - 1, groups=d_inner)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        # S4D-real init A = -(1..N) per row; dt log-uniform in [1e-3, 0.1] via the softplus bias
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1.0)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        dt = torch.exp(torch.rand(d_inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        dt = dt.clamp(min=1e-4)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def forward(self, x):
        length = x.shape[1]
        x, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # (B, d_inner, L) each
        x = F.silu(self.conv1d(x)[..., :length])  # causal: keep the first L outputs
        dt, B, C = self.x_proj(x.transpose(1, 2)).split(
            [self.dt_rank, self.d_state, self.d_state], dim=-1)  # (B, L, r), (B, L, N) x 2
        # as mamba_simple.py: the dt_proj bias goes into the scan as delta_bias, where
        # delta = softplus(W dt + bias) is taken in fp32
        delta = (dt @ self.dt_proj.weight.T).transpose(1, 2)  # (B, d_inner, L)
        y = common.selective_scan(x, delta, -torch.exp(self.A_log.float()),
                                  B.transpose(1, 2), C.transpose(1, 2), self.D.float(), z,
                                  delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
        return self.out_proj(y.transpose(1, 2))  # (B, L, d)


class MultiBranchVisionMamba(nn.Module):
    """EM, Sec. 3.2.2 and Fig. 4: = UltraLight-VM-UNet's PVM layer (spec G9).

    (B, C, h, w) -> (B, C, h, w). One mixer shared by the four channel groups, a gamma-scaled
    skip per group, concat, LayerNorm, Linear. Runs in fp32 under --amp.
    """

    def __init__(self, channels, groups=4, d_state=16, d_conv=4, expand=2):
        super().__init__()
        if channels % groups:
            common.fail(f"EM needs C_3 = {channels} divisible by its {groups} groups")
        self.groups = groups
        self.norm_in = nn.LayerNorm(channels)
        self.mamba = MambaMixer(channels // groups, d_state, d_conv, expand)
        self.gamma = nn.Parameter(torch.ones(1))
        self.norm_out = nn.LayerNorm(channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x):
        b, c, h, w = x.shape
        with torch.autocast(x.device.type, enabled=False):
            n_s = self.norm_in(x.float().flatten(2).transpose(1, 2))  # N_s (B, L, C)
            n_s_j = n_s.chunk(self.groups, dim=2)  # Eq. (7)  [N_s^1..N_s^4] = Split(N_s)
            # shared weights: the groups ride along the batch axis, one mixer call (4B, L, C/4);
            # the mixer treats batch entries independently, so this equals four separate calls
            stacked = torch.cat(n_s_j, dim=0)
            stacked = self.mamba(stacked) + self.gamma * stacked  # Eq. (8)  M(N^j) + gamma N^j
            n_s_tilde = torch.cat(stacked.chunk(self.groups, dim=0), dim=2)  # Eq. (9)  (B, L, C)
            n_out = self.proj(self.norm_out(n_s_tilde))  # Eq. (10)  N^_out = Proj(LN(N~_s))
        return n_out.transpose(1, 2).reshape(b, c, h, w)


# ==== 4. Model ====

class MFEL(nn.Module):
    """The whole network (Fig. 1): FIIR (three auto-encoders + AFM) and FRIS (E_s, BFM, EM).

    forward(image (B, 3, H, W), mask=None) -> {'logits' (B, 1, H, W), 'coarse_logits' and, with
    FIIR, 'mask_split', 'image_fg', 'image_bg', 'recon_fg', 'recon_bg', 'recon_image'}. `mask`
    replaces the coarse mask in Eq. 1 (gt training, the oracle); None = the model's own (G5).
    """

    def __init__(self, preset, num_classes=1, fiir=True, afm="afm", bfm="attn", em=True,
                 literal_eq6=False, coarse_head=True):
        super().__init__()
        c = preset.widths
        if fiir and not coarse_head:
            common.fail("FIIR takes Eq. 1's mask from the coarse head: --no-coarse-head needs "
                        "--no-fiir")
        self.fiir = fiir
        self.encoder_seg = Encoder(c)
        # spec G5: I_m at test time, supervised by L_coarse
        self.coarse_head = nn.Conv2d(c[2], 1, 1) if coarse_head else None
        if fiir:
            self.encoder_fg, self.encoder_bg, self.encoder_rec = (Encoder(c) for _ in range(3))
            self.afm = nn.ModuleList(AdaptiveFeatureModulation(ci, afm) for ci in c)
            self.bfm = nn.ModuleList(BidirectionalFusion(ci, preset.head_dim, preset.kv_grid,
                                                         bfm, literal_eq6) for ci in c)
            self.decoder_fg, self.decoder_bg, self.decoder_rec = (
                Decoder(c, 3, sigmoid=True) for _ in range(3))
        self.em = (MultiBranchVisionMamba(c[2], preset.groups, preset.d_state, preset.d_conv,
                                          preset.expand) if em else nn.Identity())
        self.decoder_seg = Decoder(c, num_classes)  # its 1x1 head is S_h

    def forward(self, image, mask=None):
        f_s = self.encoder_seg(image)  # F_s^i, (B, C_i, H/2^i, W/2^i)
        out = {}
        if self.coarse_head is not None:
            coarse = F.interpolate(self.coarse_head(f_s[2]), size=image.shape[-2:],
                                   mode="bilinear", align_corners=False)  # (B, 1, H, W)
            out["coarse_logits"] = coarse
        if self.fiir:
            # the threshold passes no gradient; the coarse head learns from L_coarse alone
            mask_split = (torch.sigmoid(coarse) > 0.5).float().detach() if mask is None else mask
            image_fg, image_bg = split_foreground_background(image, mask_split)
            f_f, f_b = self.encoder_fg(image_fg), self.encoder_bg(image_bg)
            f_r = self.encoder_rec(image)  # the "initial pixel-level feature" (spec G4)
            # the streams run in parallel: AFM and BFM outputs feed decoders, not deeper encoders
            f_r_hat = [afm(*fs) for afm, fs in zip(self.afm, zip(f_r, f_f, f_b))]
            f_s_bar = [bfm(s, r) for bfm, s, r in zip(self.bfm, f_s, f_r_hat)]
            out.update(mask_split=mask_split, image_fg=image_fg,
                       image_bg=image_bg, recon_fg=self.decoder_fg(f_f),
                       recon_bg=self.decoder_bg(f_b), recon_image=self.decoder_rec(f_r_hat))
        else:  # Tables 5-6 row 1: F-_s = F_s (spec G12)
            f_s_bar = f_s
        bottom = self.em(f_s_bar[2])  # (B, C_3, H/8, W/8)
        out["logits"] = self.decoder_seg([f_s_bar[0], f_s_bar[1], bottom])  # I_s' (B, 1, H, W)
        return out


MODEL_SWITCHES = ("fiir", "afm", "bfm", "em", "literal_eq6", "coarse_head")


def build_model(preset="paper", num_classes=1, **overrides):
    """MFEL at a preset; overrides are Preset fields (widths, kv_grid, ...) or MODEL_SWITCHES."""
    if preset not in PRESETS:
        common.fail(f"unknown preset '{preset}' (paper, small, tiny)")
    switches = {k: overrides.pop(k) for k in list(overrides) if k in MODEL_SWITCHES}
    unknown = set(overrides) - set(asdict(PRESETS[preset]))
    if unknown:
        common.fail(f"build_model: unknown override(s) {sorted(unknown)}")
    return MFEL(replace(PRESETS[preset], **overrides), num_classes, **switches)


# ==== 5. Losses (Sec. 3.3) ====

def loss_foreground_background(recon_fg, image_fg, recon_bg, image_bg):
    """L_f and L_b: L1 of the reconstructed vs the masked images, a mean (spec G11: a sum over
    3 x 256^2 values would dwarf BCE + Dice at the paper's unit weights)."""
    error_f = (recon_fg - image_fg).abs()  # (B, 3, H, W)
    error_b = (recon_bg - image_bg).abs()
    return error_f.mean(), error_b.mean()  # Eq. (2)  L_f = |I_f' - I_f|_1, L_b = |I_b' - I_b|_1


def loss_image_reconstruction(recon_image, image):
    """L_s: L1 between the reconstructed and the input image, mean."""
    error = (recon_image - image).abs()  # (B, 3, H, W)
    return error.mean()  # Eq. (4)  L_s = |I_r' - I_s|_1


def loss_reconstruction(l_s, l_f, l_b):
    """L_rec of Sec. 3.3.1 (the text lists the three terms in the wrong order; spec 12)."""
    return l_s + l_f + l_b  # Eq. (11)  L_rec = L_s + L_f + L_b


def bce_loss(logits, target):
    """Binary cross-entropy on logits, mean over pixels."""
    return F.binary_cross_entropy_with_logits(logits, target)


def dice_loss(logits, target, smooth=1.0):
    """1 - mean_b (2 sum p y + 1) / (sum p + sum y + 1), per image (UltraLight's DiceLoss)."""
    p = torch.sigmoid(logits)  # (B, 1, H, W)
    inter = (p * target).flatten(1).sum(1)  # (B,)
    total = p.flatten(1).sum(1) + target.flatten(1).sum(1)
    return 1 - ((2 * inter + smooth) / (total + smooth)).mean()


def loss_mask(logits, target):
    """L_mask of Sec. 3.3.2, on I_s' logits (B, 1, H, W) and I_gt (B, 1, H, W) in {0, 1}."""
    return bce_loss(logits, target) + dice_loss(logits, target)  # Eq. (12)  L_bce + L_dice


def total_loss(out, image, target, coarse_weight=1.0):
    """L_total of Sec. 3.3.2 plus the spec's coarse-mask term; returns (loss, parts dict)."""
    out = {k: v.float() for k, v in out.items()}
    parts = {"mask": loss_mask(out["logits"], target)}
    if "recon_image" in out:  # w/o FIIR there is no L_rec (spec G12)
        l_f, l_b = loss_foreground_background(out["recon_fg"], out["image_fg"],
                                              out["recon_bg"], out["image_bg"])
        l_s = loss_image_reconstruction(out["recon_image"], image)
        parts["rec"] = loss_reconstruction(l_s, l_f, l_b)
    if "coarse_logits" in out:  # spec G5, not in the paper
        parts["coarse"] = loss_mask(out["coarse_logits"], target)
    # Eq. (13)  L_total = L_rec + L_mask (+ coarse_weight L_coarse)
    loss = parts.get("rec", 0) + parts["mask"] + coarse_weight * parts.get("coarse", 0)
    return loss, {k: v.item() for k, v in parts.items()}


# ==== 6. Data handling for MFEL ====

INPUT_MEAN, INPUT_STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # spec G1: image in [0, 1], I_b = black


def augment(image, mask, rng):
    """Flips (p = 0.5 each) and a rot90 (p = 0.5), same for image and mask (spec 5; paper: none)."""
    image, mask = common.random_flip_rotate(image, mask, rng)
    if rng.random() < 0.5:  # (random_flip_rotate's rot90 would rotate with p = 3/4)
        k = rng.randrange(1, 4)  # 90, 180 or 270 degrees
        image, mask = np.rot90(image, k), np.rot90(mask, k)
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


def is_glas(root):
    """True for the GlaS (Warwick-QU) layout: train_<n>_anno files, instance label masks."""
    return any(re.fullmatch(r"(train|testa|testb)_\d+_anno", p.stem.lower())
               for p in Path(root).rglob("*_anno.*"))


# ==== 7. Train, evaluate, predict ====

def lr_at(epoch, step, steps_per_epoch, args):
    """Sec. 4.1.3's LR at iteration `step` of `epoch`: linear warm-up min_lr -> lr, then cosine
    lr -> min_lr. It depends on (epoch, --epochs) alone, so a run resumed with a larger
    --epochs follows the new total's schedule from its first epoch on."""
    t, warm = epoch * steps_per_epoch + step, round(args.warmup_epochs * steps_per_epoch)
    if t < warm:
        return args.min_lr + (args.lr - args.min_lr) * t / warm
    progress = min(1.0, (t - warm) / max(1, args.epochs * steps_per_epoch - warm))
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


def autocast(device, enabled):
    """Mixed precision context: fp16 on CUDA, bf16 on CPU (EM stays fp32 inside)."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


def train_one_epoch(model, loader, optimizer, lr_at, device, mask_source="coarse",
                    coarse_weight=1.0, amp=False, scaler=None, limit_batches=0,
                    show_progress=False):
    """One pass over `loader`, the LR set per iteration to lr_at(step); returns mean losses."""
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    model.train()
    sums, count = {}, 0
    for step, batch in enumerate(common.progress(loader, "train", show_progress)):
        if limit_batches and step >= limit_batches:
            break
        # per iteration, so that the warm-up is smooth even over GlaS's 21 batches an epoch
        common.set_lr(optimizer, lr_at(step))
        image, target = batch["image"].to(device), batch["mask"].to(device)
        with autocast(device, amp):
            out = model(image, target if mask_source == "gt" else None)
        loss, parts = total_loss(out, image, target, coarse_weight)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # a disabled scaler (no --amp, or CPU) passes through
        scaler.step(optimizer)
        scaler.update()
        for key, value in dict(parts, loss=loss.item()).items():
            sums[key] = sums.get(key, 0.0) + value
        count += 1
    return {key: value / max(count, 1) for key, value in sums.items()}


@torch.no_grad()
def evaluate(model, dataset, device, resolution="network", oracle=False, batch_size=4,
             amp=False, save_dir=None, max_overlays=50):
    """{'per-image': columns, 'global': columns}: the paper's F1, IoU, Precision, Recall in %
    (Eqs. 14-17), averaged over images (spec 7's primary) or from one pooled confusion matrix
    (its secondary, UltraLight's engine.py). resolution 'network' scores at the input size
    against the resized mask (spec 6), 'original' at each image's own size (logits upsampled).
    oracle: the ground truth into Eq. 1 (a diagnostic). save_dir: mask PNGs at original size."""
    model.eval()
    meters = {"per-image": common.PerImageMeter(0.5), "global": common.GlobalMeter(0.5)}
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
    for batch in common.make_loader(dataset, batch_size, train=False):
        image, target = batch["image"].to(device), batch["mask"].to(device)
        with autocast(device, amp):
            logits = model(image, target if oracle else None)["logits"].float()
        for j, index in enumerate(batch["index"].tolist()):
            prob, gt = torch.sigmoid(logits[j, 0]), target[j, 0]  # network resolution
            if resolution == "original" or save_dir is not None:
                full_image, full_mask = dataset.full(index)
                full_prob = torch.sigmoid(F.interpolate(
                    logits[j:j + 1], size=full_mask.shape, mode="bilinear",
                    align_corners=False))[0, 0]
            if resolution == "original":
                prob, gt = full_prob, full_mask
            for meter in meters.values():
                meter.update(prob, gt)
            if save_dir is not None:
                pred = (full_prob >= 0.5).cpu().numpy()
                name = dataset.names[index]
                common.save_mask_png(Path(save_dir) / f"{name}.png", pred)
                if index < max_overlays:
                    common.save_overlay(Path(save_dir) / f"{name}_overlay.png", full_image, pred,
                                        full_mask)
    columns = {}
    for mode, meter in meters.items():
        scores = meter.compute()
        columns[mode] = {"F1": 100 * scores["dice"],  # Eq. (16)  F1 = 2TP / (2TP + FP + FN)
                         "IoU": 100 * scores["iou"],  # Eq. (17)  IoU = TP / (TP + FP + FN)
                         "Precision": 100 * scores["precision"],  # Eq. (14)  TP / (TP + FP)
                         "Recall": 100 * scores["recall"]}  # Eq. (15)  TP / (TP + FN)
    return columns


@torch.no_grad()
def predict(model, image, img_size, device):
    """Binary mask (H, W) bool for one uint8 image (H, W, 3); Eq. 1 uses the coarse mask."""
    model.eval()
    x = torch.from_numpy(np.array(common.resize_image(image, img_size)))  # a writable copy
    logits = model(x.permute(2, 0, 1).float()[None].to(device) / 255.0)["logits"].float()
    logits = F.interpolate(logits, size=image.shape[:2], mode="bilinear", align_corners=False)
    return (torch.sigmoid(logits)[0, 0] >= 0.5).cpu().numpy()


# ==== 8. Command line ====

ARCHITECTURE = ("no_fiir", "no_coarse_head", "afm", "bfm", "no_em", "bfm_literal_eq6", "kv_grid")


def parse_args(argv):
    """The shared flags plus MFEL's switches (spec 9); fills paper or toy defaults."""
    parser = argparse.ArgumentParser(description="MFEL (Huang & Luo 2025): reconstruction-"
                                     "guided segmentation with AFM, BFM and a multi-branch Mamba")
    common.add_common_args(parser, PAPER_RECIPE, "Sec. 4.1.3")
    parser.set_defaults(val_fraction=0.0)  # the paper trains on all training images (spec 5)
    add = parser.add_argument_group("MFEL switches (spec 9; Tables 5-6 rows)").add_argument
    add("--no-fiir", action="store_true", help="row 1: no FIIR (the coarse head stays)")
    add("--no-coarse-head", action="store_true", help="with --no-fiir: no coarse head, L_coarse")
    add("--afm", choices=["afm", "sum", "concat"], default="afm", help="rows 2-3 (Sec. 3.1.2)")
    add("--bfm", choices=["attn", "sum", "concat"], default="attn", help="rows 4-5 (Sec. 3.2.1)")
    add("--no-em", action="store_true", help="row 6: EM -> identity")
    add("--bfm-literal-eq6", action="store_true", help="Eq. 6's printed V pairing (spec G8)")
    add("--kv-grid", type=int, help="BFM K/V pooled to <= N x N tokens, 0 = none (G8: 32)")
    add("--mask-source-train", choices=["coarse", "gt"], default="coarse", help="I_m (G5)")
    add("--mask-source-eval", choices=["coarse", "oracle"], default="coarse",
        help="I_m at test time; oracle = ground truth, NOT reportable (spec G5)")
    add("--coarse-weight", type=float, default=1.0, help="weight of L_coarse (spec G5: 1)")
    add("--warmup-epochs", type=float, help=f"linear warm-up (spec 5: {WARMUP_EPOCHS})")
    add("--min-lr", type=float, default=MIN_LR, help="final LR (Sec. 4.1.3)")
    add("--select", choices=["last", "best"], default="last", help="tested: last or best val")
    add("--metric-mode", choices=["per-image", "global"], default="per-image",
        help="printed first, scores validation; both are reported (spec 7)")
    add("--eval-resolution", choices=["network", "original"], default="network",
        help="score at the input size (spec 6) or at each image's own size")
    add("--test-data", action="append", default=[], metavar="PATH",
        help="extra test folder, all pairs (Tab. 3: the ISIC2016 model on PH2)")
    raw = parser.parse_args(argv)
    raw.explicit = common.explicit_flags(parser, argv)
    glas = raw.data not in (None, "toy") and Path(raw.data).is_dir() and is_glas(raw.data)
    if glas and raw.img_size is None:
        raw.img_size = GLAS_IMG_SIZE
    if raw.bench:  # the paper preset at the paper size unless told otherwise
        raw.preset = raw.preset or "paper"
        raw.img_size = raw.img_size or PAPER_RECIPE["img_size"]
        raw.batch_size = raw.batch_size or PAPER_RECIPE["batch_size"]
    args = common.finish_args(raw, PAPER_RECIPE, TOY_RECIPE)
    if args.bench and "preset" not in args.explicit:
        args.preset_reason = "--bench default"
    args.oracle = args.mask_source_eval == "oracle"
    if args.warmup_epochs is None:
        args.warmup_epochs = TOY_RECIPE["warmup_epochs"] if args.data == "toy" else WARMUP_EPOCHS
    if args.img_size % 8:
        common.fail(f"--img-size must be a multiple of 8 (three 2x2 poolings), got {args.img_size}")
    if args.kv_grid is not None and args.kv_grid < 0:
        common.fail(f"--kv-grid must be >= 0, got {args.kv_grid}")
    if args.no_fiir and (args.oracle or args.mask_source_train == "gt"):
        common.fail("--mask-source-eval oracle / --mask-source-train gt need FIIR's Eq. 1: "
                    "drop --no-fiir")
    for path in args.test_data:
        if not Path(path).is_dir():
            common.fail(f"--test-data {path}: no such folder")
    return args


def model_config(args):
    """What rebuilds the network: preset, switches and preset overrides (saved with weights)."""
    overrides = {} if args.kv_grid is None else {"kv_grid": args.kv_grid}
    return {"preset": args.preset, "overrides": overrides,
            "switches": {"fiir": not args.no_fiir, "afm": args.afm, "bfm": args.bfm,
                         "em": not args.no_em, "literal_eq6": args.bfm_literal_eq6,
                         "coarse_head": not args.no_coarse_head}}


def model_from(config):
    """build_model from a model_config() dict."""
    return build_model(config["preset"], 1, **config["overrides"], **config["switches"])


def from_checkpoint(path, args, run, flag):
    """(model, checkpoint) for --eval, --resume, --predict: the architecture flags are the
    checkpoint's (a different explicit one stops), so are img_size and batch_size unless given
    (kernels sum in a batch-dependent order)."""
    state = common.load_checkpoint(path, "mfel", flag)
    common.adopt_config(args, state, ARCHITECTURE, args.explicit, flag)
    for name in ("img_size", "batch_size"):
        if name not in args.explicit:
            setattr(args, name, state["config"][name])
    model = model_from(model_config(args))
    model.load_state_dict(state["model"])  # the architecture is the checkpoint's: it fits
    run.log(f"loaded {path}: preset {args.preset}, epoch {state['epoch']}, img {args.img_size}")
    return model.to(run.device), state


def initialise(model, args, data, run, fresh):
    """--pretrained (the paper names no pretrained weights: auto = none); log the size and
    write config.json. Returns the plain settings saved with every checkpoint."""
    if fresh and args.pretrained in ("auto", "none"):
        run.log("pretrained: none, the paper names no pretrained weights; training from scratch")
    elif fresh:  # a file of ours (a checkpoint or a bare state_dict)
        tensors = common.tensor_dict(common.load_weights(args.pretrained))
        if tensors is None:
            common.fail(f"--pretrained {args.pretrained}: no tensors in the file")
        common.load_matching(model, tensors, "MFEL", args.pretrained, run.log)
    params = sum(p.numel() for p in model.parameters())
    run.log(f"MFEL: {params / 1e6:.3f} M parameters, switches {model_config(args)['switches']}")
    settings = {k: v for k, v in vars(args).items() if k != "explicit"}
    run.save_json("config.json", {**settings, "model_config": model_config(args),
                                  "params": params, "data_source": data["source"],
                                  "preset_values": asdict(PRESETS[args.preset])})
    return settings


def protocol_row(layout):
    """The docstring's protocol rows that apply: the shared one, then the data set's."""
    rows = dict(re.findall(r"\n  (\w+) +(.*(?:\n {12}.*)*)", __doc__.split("Protocol")[1]
                           .split("\n\n")[0]))
    return "\n".join(f"  {key:<10}{rows.get(key, 'not a data set of the paper')}"
                     for key in ("all", layout))


def load_mfel_data(args, run):
    """(data, test sets) with --test-data; prints the settings and the protocol row."""
    run.log(f"preset {args.preset} ({args.preset_reason}), img_size {args.img_size}, epochs "
            f"{args.epochs}, batch {args.batch_size}, lr {args.lr} -> {args.min_lr}, warm-up "
            f"{args.warmup_epochs:g} epochs, device {run.device}")
    extra = {Path(p).name or p: common.PairDataset(common.find_pairs(p), args.img_size,
                                                   mean=INPUT_MEAN, std=INPUT_STD)
             for p in args.test_data}  # Table 3: every pair of the folder (PH2: all 200)
    data = common.load_data(args, "binary", augment=augment, mean=INPUT_MEAN, std=INPUT_STD,
                            toy_sizes=TOY_RECIPE["toy_sizes"])
    run.log("protocol (mfel.py docstring):\n" + protocol_row(data["layout"]))
    tests = {**data["test"], **extra}
    run.log(f"data: {data['source']}; train {len(data['train'])}, val "
            f"{len(data['val']) if data['val'] else 0}, test "
            + ", ".join(f"{g} {len(d)}" for g, d in tests.items()))
    if args.eval:
        return data, tests
    if args.select == "best" and data["val"] is None:
        common.fail("--select best needs a validation set: this data has none "
                    "(hold one out with --val-fraction F)")
    if data["val"] is not None and args.select == "last":
        run.log(f"validation ({len(data['val'])} images) is logged; the last epoch is tested "
                "as in the paper (--select best to test the best epoch)")
    if args.epochs <= args.warmup_epochs:
        run.log(f"WARNING: {args.epochs} epochs end inside the {args.warmup_epochs:g}-epoch "
                "warm-up, so the LR never anneals: the paper's schedule needs more epochs")
    if data.get("splits") is not None:
        run.save_json("splits.json", data["splits"])
    return data, tests


def train_loader(dataset, args):
    """Shuffled batches; a last batch of one image is dropped (spec 5: GlaS 85 = 21 x 4 + 1)."""
    return common.make_loader(dataset, args.batch_size, train=True, workers=args.workers,
                              seed=args.seed, drop_last=len(dataset) % args.batch_size == 1)


def bench(args, run):
    """One train step and one inference on random input at args.img_size; one JSON line."""
    model = model_from(model_config(args)).to(run.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    image = torch.rand(args.batch_size, 3, args.img_size, args.img_size, device=run.device)
    batch = [{"image": image, "mask": (image[:, :1] > 0.5).float()}]

    def infer_step():
        with torch.no_grad(), autocast(run.device, args.amp):
            model.eval()(image)
    record = common.benchmark(
        model, lambda: train_one_epoch(model, batch, optimizer, lambda step: args.lr,
                                       run.device, coarse_weight=args.coarse_weight,
                                       amp=args.amp), infer_step, args.batch_size, run.device,
        script="mfel", preset=args.preset, img_size=args.img_size, no_em=args.no_em,
        no_fiir=args.no_fiir, scan=common.scan_backend(image))
    print(json.dumps(record), flush=True)
    return record


def predict_folder(args, run):
    """--predict DIR --checkpoint CKPT: one mask PNG per image in DIR (no masks needed)."""
    files = common.list_images(args.predict)
    model, _ = from_checkpoint(args.checkpoint, args, run, "--checkpoint")
    out = run.folder() / "predictions"
    for path in files:
        common.save_mask_png(out / f"{path.stem}.png",
                             predict(model, common.load_image(path), args.img_size, run.device))
    run.log(f"wrote {len(files)} masks to {out}")
    return {"predicted": len(files), "out": str(out)}


def test_all(model, tests, args, run):
    """Every test group, both metric modes (spec 7; --metric-mode is printed first), into
    test_metrics.json as {group: {'per-image': columns, 'global': columns}}."""
    if args.oracle:
        run.log("WARNING: --mask-source-eval oracle feeds the ground truth into Eq. 1 at test "
                "time; these numbers are a diagnostic and NOT reportable")
    metrics = {group: evaluate(model, dataset, run.device, args.eval_resolution, args.oracle,
                               args.batch_size, args.amp,
                               save_dir=run.folder() / "predictions" / group)
               for group, dataset in tests.items()}
    for mode in sorted(("per-image", "global"), key=lambda mode: mode != args.metric_mode):
        run.log(f"{'test set':<16}" + "".join(f"{c:>11}" for c in ("F1", "IoU", "Precision",
                "Recall")) + f"   (%, {mode}, {args.eval_resolution} resolution)")
        for group, m in metrics.items():
            run.log(f"{group:<16}" + "".join(f"{v:>11.2f}" for v in m[mode].values()))
    if args.oracle:
        metrics["NOT_REPORTABLE"] = "oracle: ground truth used as I_m of Eq. 1 at test time"
    run.save_json("test_metrics.json", metrics)
    return metrics


def main(argv=None):
    """Train, validate and test MFEL (or --bench / --predict / --eval); returns the metrics.

    The flow reads top to bottom like nanoGPT's train.py: flags, data, model, optimiser, the
    epoch loop (train, validate, checkpoint), then the test of the checkpoint --select names.
    """
    args = parse_args(argv)
    common.seed_everything(args.seed)
    run = common.Run(args, "mfel")
    if args.bench:
        return bench(args, run)
    if args.predict:
        return predict_folder(args, run)
    checkpoint = None
    if args.eval or args.resume:  # first, so that the data comes at the checkpoint's img_size
        flag = "--eval" if args.eval else "--resume"
        model, checkpoint = from_checkpoint(args.eval or args.resume, args, run, flag)
    data, tests = load_mfel_data(args, run)
    if args.eval:
        return test_all(model, tests, args, run)
    if checkpoint is None:
        model = model_from(model_config(args)).to(run.device)
    settings = initialise(model, args, data, run, fresh=checkpoint is None)
    net = model  # what trains; `model` (unwrapped) is what validates, tests and is saved
    if run.distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    loader = train_loader(data["train"], args)
    steps = min(len(loader), args.limit_batches or len(loader))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)  # Sec. 4.1.3
    scaler = torch.amp.GradScaler(run.device.type, enabled=args.amp and run.device.type == "cuda")
    start = run.restore(checkpoint, model, optimizer, scaler) if checkpoint else 0

    for epoch in range(start, args.epochs):
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        tic = time.time()
        losses = train_one_epoch(net, loader, optimizer, lambda step: lr_at(epoch, step, steps,
                                 args), run.device, args.mask_source_train, args.coarse_weight,
                                 args.amp, scaler, args.limit_batches, run.is_main)
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
               **{f"loss_{k}" if k != "loss" else "train_loss": v for k, v in losses.items()}}
        score = None  # no validation: best.pt is the last epoch
        if data["val"] is not None and run.is_main:  # rank 0 validates, the others wait
            row["val_dice"] = score = evaluate(model, data["val"], run.device, "network",
                                               False, args.batch_size,
                                               args.amp)[args.metric_mode]["F1"]
        row["seconds"] = time.time() - tic
        run.end_epoch(epoch, row, {"model": model.state_dict(), "config": settings,
                                   "optimizer": optimizer.state_dict(), "preset": args.preset,
                                   "scaler": scaler.state_dict(),
                                   "model_config": model_config(args)}, score)

    metrics = {}
    if run.is_main:
        model.load_state_dict(run.final_weights(args.select))
        metrics = test_all(model, tests, args, run)
    run.barrier()
    run.close()
    return metrics


if __name__ == "__main__":
    common.cli(main)
