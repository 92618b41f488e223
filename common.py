"""Shared plumbing for the five method scripts: what every script needs and no paper owns.

Read a method script first (e.g. `m2snet.py`); come here when it calls `common.something`.
Nothing in this file is a paper's block, loss or schedule (see DESIGN.md).

Public API, by section:
  1. errors     UserError, fail, cli
  2. metrics    dice, iou, precision, recall, specificity, accuracy, confusion,
                scores_from_confusion, hd95, asd, assd, mae, s_measure, weighted_f_measure,
                e_measure_curve, adaptive_e_measure, dice_iou_curves, PolypMeter,
                PerImageMeter, GlobalMeter, VolumeMeter
  3. image I/O  load_image, load_mask, load_label_map, resize_image, resize_mask,
                save_mask_png, save_label_png, save_overlay, save_predictions
  4. discovery  find_pairs, check_pairs, detect_layout, discover_splits, find_slice_files,
                list_images, natural_key
  5. datasets   PairDataset, SliceDataset, VolumeDataset, ToyBinary, ToyMulticlass,
                write_toy, random_flip_rotate, load_data, predict_volume, read_slice,
                count_labels, zoom_slice
  6. run        add_common_args, finish_args, explicit_flags, adopt_config, check_conflicts,
                Run (restore, end_epoch, final_weights), seed_everything, choose_device,
                save_checkpoint, load_checkpoint, load_weights, tensor_dict, fetch_weights,
                load_matching, Foreign, set_lr, make_loader, seed_worker, progress,
                benchmark, unwrap
  7. scan       selective_scan, selective_scan_reference, scan_backend, bench_scan

Threads: every script (and this file) sets OMP_WAIT_POLICY=PASSIVE before torch is imported.
PyTorch's OpenMP threads otherwise spin while they wait; on a machine shared with another busy
process (a laptop's browser, a second job on a CI box) that made training steps 3-15x slower,
and passive waiting costs nothing measurable on an idle machine. `setdefault` keeps a value the
user exported.

Command line of this file:
  python common.py toy --out DIR --kind binary|multiclass   write the toy set to disk
  python common.py bench-scan                                time the selective scan
                                   (against its version before the speed-up, from git)
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see "Threads")

import argparse
import contextlib
import csv
import datetime
import json
import math
import pickle
import random
import re
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ==== 1. Errors: one clear line, never a traceback ====

class UserError(Exception):
    """A mistake in the user's input (data, flags, checkpoint): reported as one line."""


def fail(message):
    """Stop with a user-facing one-line error."""
    raise UserError(message)


def cli(main):
    """Run `main()` as a program: UserError -> 'error: ...' and exit 2; Ctrl-C -> exit 130.

    A torchrun process group still open at the end is closed here, once, whatever happened.
    """
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint written (last.pt) is kept", file=sys.stderr)
        sys.exit(130)
    except (UserError, RuntimeError) as error:  # a DataLoader worker's UserError: a RuntimeError
        text = str(error).strip()
        if not isinstance(error, UserError) and "UserError" not in text:
            raise
        if "UserError: " in text:  # re-raised by a worker: the message ends its traceback
            text = text.rsplit("UserError: ", 1)[1]
        print(f"error: {text.splitlines()[0] if text else 'UserError'}", file=sys.stderr)
        sys.exit(2)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ==== 2. Metrics ====
# Every paper prints its own table columns, computed its own way: per image then averaged
# (PerImageMeter, PolypMeter), over the whole test set (GlobalMeter), or per volume and class
# (VolumeMeter). The functions below take numpy arrays or torch tensors; a mask is anything whose
# foreground is > 0.5 (bool, {0, 1}, {0, 255}); a probability map `prob` lies in [0, 1].


_EPS = np.spacing(1)  # MATLAB's eps, as the polyp toolboxes use it


def _to_numpy(x):
    """A numpy array from a numpy array or a torch tensor (any device; half floats as float32)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype in (torch.float16, torch.bfloat16) else x).numpy()
    return np.asarray(x)


def _as_mask(x):
    """Boolean mask: values > 0.5 are foreground."""
    x = _to_numpy(x)
    return x if x.dtype == bool else x > 0.5


def _as_prob(x):
    """Float64 probability map, checked to lie in [0, 1] (catches logits passed by mistake)."""
    x = _to_numpy(x).astype(np.float64)
    if x.size and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"prob must lie in [0, 1], got [{x.min():.3g}, {x.max():.3g}]")
    return x


def _same_shape(pred, gt):
    """(pred, gt), after a one-line error if prediction and ground truth differ in shape."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    return pred, gt


# ---- Binary masks: confusion counts and the ratios built on them ----

def confusion(pred, gt):
    """Confusion counts (tp, fp, fn, tn) of a binary prediction against a binary mask, as ints."""
    pred, gt = _same_shape(_as_mask(pred), _as_mask(gt))
    tp = int(np.count_nonzero(pred & gt))
    fp = int(np.count_nonzero(pred & ~gt))
    fn = int(np.count_nonzero(~pred & gt))
    return tp, fp, fn, pred.size - tp - fp - fn


def _ratio(numerator, denominator, agree):
    """numerator / denominator, where 0/0 scores 1.0 if the masks agree and 0.0 if not."""
    return numerator / denominator if denominator else float(agree)


def scores_from_confusion(tp, fp, fn, tn):
    """Dice, IoU, precision, recall, specificity and accuracy from confusion counts, as a dict.

    Zero denominator (empty masks): the score is 1.0 if prediction and ground truth agree
    (fp = fn = 0) and 0.0 otherwise. So two empty masks give dice = iou = precision = recall = 1;
    an empty prediction on a non-empty mask has precision 0; false positives on an empty mask give
    recall 0; on an all-foreground mask, specificity is 1 only for an all-foreground prediction.
    (VM-UNet's global scores use 0 for every zero denominator; with a whole test set pooled
    the denominators are never 0, so the two agree there.)"""
    agree = fp == 0 and fn == 0
    return {"dice": _ratio(2 * tp, 2 * tp + fp + fn, agree),  # = F1
            "iou": _ratio(tp, tp + fp + fn, agree),  # = Jaccard
            "precision": _ratio(tp, tp + fp, agree),
            "recall": _ratio(tp, tp + fn, agree),  # = sensitivity
            "specificity": _ratio(tn, tn + fp, agree),
            "accuracy": _ratio(tp + tn, tp + fp + fn + tn, agree)}


def dice(pred, gt):
    """Dice (F1) = 2|P & G| / (|P| + |G|) of two binary masks; two empty masks score 1.0."""
    return scores_from_confusion(*confusion(pred, gt))["dice"]


def iou(pred, gt):
    """IoU (Jaccard) = |P & G| / |P | G| of two binary masks; two empty masks score 1.0."""
    return scores_from_confusion(*confusion(pred, gt))["iou"]


def precision(pred, gt):
    """Precision = tp / (tp + fp); an empty prediction scores 1.0 if gt is empty, else 0.0."""
    return scores_from_confusion(*confusion(pred, gt))["precision"]


def recall(pred, gt):
    """Recall (sensitivity) = tp / (tp + fn); an empty gt scores 1.0 if pred is empty, else 0.0."""
    return scores_from_confusion(*confusion(pred, gt))["recall"]


def specificity(pred, gt):
    """Specificity = tn / (tn + fp); an all-foreground gt scores 1.0 if pred is too, else 0.0."""
    return scores_from_confusion(*confusion(pred, gt))["specificity"]


def accuracy(pred, gt):
    """Pixel accuracy = (tp + tn) / number of pixels."""
    return scores_from_confusion(*confusion(pred, gt))["accuracy"]


# ---- Surface distances (MedPy's definitions: hd95, asd, assd) ----

def _surfaces(a, b):
    """The surface voxels (mask XOR its erosion) of masks a and b, in the bounding box of a | b
    (the same surfaces, much faster to measure); None if either mask is empty."""
    a, b = _same_shape(_as_mask(a), _as_mask(b))
    if not a.any() or not b.any():
        return None
    box = tuple(slice(index.min(), index.max() + 1) for index in np.nonzero(a | b))
    structure = scipy.ndimage.generate_binary_structure(a.ndim, 1)  # 4- (2D) / 6-neighbours (3D)
    # the erosion sees background outside the box, as it does outside the whole array
    return tuple(m[box] ^ scipy.ndimage.binary_erosion(m[box], structure) for m in (a, b))


def _distances(surface_from, surface_to, spacing):
    """Distance from every voxel of one surface to the nearest voxel of the other."""
    # The EDT gives each voxel its distance to the nearest zero, so the target must be the zeros.
    return scipy.ndimage.distance_transform_edt(~surface_to, sampling=spacing)[surface_from]


def hd95(pred, gt, spacing=None):
    """95th-percentile Hausdorff distance between the surfaces of two masks, as MedPy's hd95.

    Masks are (H, W) or (D, H, W); surface = mask XOR its erosion by the connectivity-1 element;
    hd95 = np.percentile(distances pred->gt and gt->pred pooled, 95). `spacing` (a number or one
    per axis) gives physical units; None = voxel units (TransUNet's protocol). Returns nan if
    either mask is empty (MedPy raises); VolumeMeter applies the papers' conventions for that."""
    surfaces = _surfaces(pred, gt)
    if surfaces is None:
        return math.nan
    return float(np.percentile(np.concatenate([_distances(*surfaces, spacing),
                                               _distances(*surfaces[::-1], spacing)]), 95))


def asd(pred, gt, spacing=None):
    """Average surface distance from pred's surface to gt's (not symmetric), as MedPy's asd;
    surfaces, `spacing` and empty masks (nan) as in hd95."""
    surfaces = _surfaces(pred, gt)
    return math.nan if surfaces is None else float(_distances(*surfaces, spacing).mean())


def assd(pred, gt, spacing=None):
    """Average symmetric surface distance = (asd(pred, gt) + asd(gt, pred)) / 2.

    This is MedPy <= 0.4's assd. MedPy 0.5 instead takes the mean of the pooled distances of both
    directions, which weights the larger surface more; the two agree when both surfaces have the
    same number of voxels. Empty masks give nan, as in hd95."""
    surfaces = _surfaces(pred, gt)
    if surfaces is None:
        return math.nan
    return float((_distances(*surfaces, spacing).mean()
                  + _distances(*surfaces[::-1], spacing).mean()) / 2)


# ---- Probability maps: the polyp benchmark (PraNet protocol, PySODMetrics conventions) ----

def mae(prob, gt):
    """Mean absolute error = mean |P - G| between a probability map and a binary mask."""
    prob, gt = _same_shape(_as_prob(prob), _as_mask(gt))
    return float(np.mean(np.abs(prob - gt)))


def _threshold_counts(prob, gt):
    """tp and fp at the toolboxes' 256 thresholds, highest first: entry i counts the pixels with
    level >= 255 - i, level = floor(255 P) (the toolboxes' quantisation). Cumulative sums of the
    reversed histograms give all 256 binarisations at once."""
    levels = (prob * 255).astype(np.uint8)
    tp = np.cumsum(np.bincount(levels[gt], minlength=256)[::-1])
    fp = np.cumsum(np.bincount(levels[~gt], minlength=256)[::-1])
    return tp, fp


def _divide_or_zero(numerator, denominator):
    """Element-wise numerator / denominator with 0 where the denominator is 0 (PySODMetrics)."""
    numerator, denominator = np.asarray(numerator, float), np.asarray(denominator, float)
    return np.divide(numerator, denominator, out=np.zeros_like(denominator),
                     where=denominator != 0)


def dice_iou_curves(prob, gt):
    """Dice and IoU at the 256 thresholds of e_measure_curve, in its order: two (256,) arrays;
    0/0 is 0 on the curves, as in PySODMetrics (only when gt is empty). The polyp papers' mDice /
    mIoU average these curves over images, then over thresholds."""
    prob, gt = _same_shape(_as_prob(prob), _as_mask(gt))
    tp, fp = _threshold_counts(prob, gt)
    fn = np.count_nonzero(gt) - tp
    return _divide_or_zero(2 * tp, 2 * tp + fp + fn), _divide_or_zero(tp, tp + fp + fn)


def _e_measure_from_counts(tp, fp, num_fg, num_pixels):
    """E-measure of a binary map F from its counts (scalars or arrays over thresholds).

    phi = 2 (F - mean F)(G - mean G) / ((F - mean F)^2 + (G - mean G)^2 + eps) per pixel,
    psi = (phi + 1)^2 / 4, E = sum psi / (N - 1 + eps). F and G take only the values 0 and 1, so
    psi takes one value on each of the four (F, G) pixel groups tp, fp, fn, tn."""
    tp, fp = np.asarray(tp, float), np.asarray(fp, float)
    num_pred = tp + fp
    if num_fg == 0:  # empty gt: psi = 1 - F
        enhanced_sum = num_pixels - num_pred
    elif num_fg == num_pixels:  # full gt: psi = F
        enhanced_sum = num_pred
    else:
        mean_f, mean_g = num_pred / num_pixels, num_fg / num_pixels
        fn = num_fg - tp
        tn = num_pixels - num_pred - fn
        enhanced_sum = 0.0
        for count, f, g in ((tp, 1, 1), (fp, 1, 0), (fn, 0, 1), (tn, 0, 0)):
            a, b = f - mean_f, g - mean_g
            phi = 2 * a * b / (a ** 2 + b ** 2 + _EPS)
            enhanced_sum = enhanced_sum + count * (phi + 1) ** 2 / 4
    return enhanced_sum / (num_pixels - 1 + _EPS)


def e_measure_curve(prob, gt):
    """E-measure (Fan et al., IJCAI 2018) at the 256 thresholds, highest threshold first: (256,).

    Entry i binarises floor(255 P) >= 255 - i, i.e. P >= 1, 254/255, ..., 0 on the quantised map,
    the order of PySODMetrics' 'curve'. maxEm / meanEm = max / mean of the image-averaged curve."""
    prob, gt = _same_shape(_as_prob(prob), _as_mask(gt))
    tp, fp = _threshold_counts(prob, gt)
    return _e_measure_from_counts(tp, fp, np.count_nonzero(gt), gt.size)


def adaptive_e_measure(prob, gt):
    """E-measure of the map binarised at P >= min(2 mean(P), 1) (the toolboxes' adaptive E)."""
    prob, gt = _same_shape(_as_prob(prob), _as_mask(gt))
    binary = prob >= min(2 * prob.mean(), 1.0)
    tp, fp = np.count_nonzero(binary & gt), np.count_nonzero(binary & ~gt)
    return float(_e_measure_from_counts(tp, fp, np.count_nonzero(gt), gt.size))


def _object_similarity(x):
    """S-measure object term of one region: 2 mean / (mean^2 + 1 + std + eps), std with N - 1."""
    mean = x.mean()
    std = x.std(ddof=1) if x.size > 1 else 0.0
    return 2 * mean / (mean ** 2 + 1 + std + _EPS)


def _ssim(prob, gt):
    """Single-window SSIM of one block: 4 xy s_xy / ((x^2 + y^2)(s_x^2 + s_y^2) + eps)."""
    x, y = prob.mean(), gt.mean()
    n_minus_1 = prob.size - 1 + _EPS
    var_x = np.sum((prob - x) ** 2) / n_minus_1
    var_y = np.sum((gt - y) ** 2) / n_minus_1
    cov_xy = np.sum((prob - x) * (gt - y)) / n_minus_1
    numerator = 4 * x * y * cov_xy
    denominator = (x ** 2 + y ** 2) * (var_x + var_y)
    if numerator != 0:
        return numerator / (denominator + _EPS)
    return 1.0 if denominator == 0 else 0.0


def s_measure(prob, gt, alpha=0.5):
    """Structure measure S = alpha S_object + (1 - alpha) S_region (Fan et al., ICCV 2017).

    Empty gt: S = 1 - mean(P); all-foreground gt: S = mean(P). Otherwise, with mu = mean(G):
    S_object = mu O(P on G) + (1 - mu) O(1 - P on not G), O as in _object_similarity;
    S_region = area-weighted SSIM of the four blocks cut at the gt's centroid (np.round, + 1 as in
    MATLAB). PySODMetrics' conventions: std and variances with N - 1, S clipped at 0."""
    prob, gt = _same_shape(_as_prob(prob), _as_mask(gt))
    mu = gt.mean()
    if mu == 0:
        return float(1 - prob.mean())
    if mu == 1:
        return float(prob.mean())
    s_object = (mu * _object_similarity(prob[gt])
                + (1 - mu) * _object_similarity(1 - prob[~gt]))
    height, width = gt.shape
    cy, cx = (int(c) + 1 for c in np.round(np.argwhere(gt).mean(axis=0)))
    gt_float = gt.astype(np.float64)
    s_region = 0.0
    for rows in (slice(0, cy), slice(cy, height)):
        for cols in (slice(0, cx), slice(cx, width)):
            block = prob[rows, cols]
            if block.size:  # a block is empty when the centroid sits on the last row/column
                s_region += block.size / gt.size * _ssim(block, gt_float[rows, cols])
    return float(max(0.0, alpha * s_object + (1 - alpha) * s_region))


def weighted_f_measure(prob, gt, beta2=1.0):
    """Weighted F-measure (Margolin et al., CVPR 2014), beta^2 = beta2; 0.0 when gt is empty.

    E = |P - G|; each background pixel takes the error of its nearest foreground pixel (E_t),
    which is blurred by a 7x7, sigma 5 Gaussian (E_A); on the foreground min(E, E_A) is used.
    Background errors are weighted by B = 2 - exp(ln(0.5) / 5 * distance to the foreground):
    E_w = min-map * B. R_w = 1 - mean_fg(E_w), P_w = TP_w / (TP_w + FP_w) with
    TP_w = |G| - sum_fg(E_w), FP_w = sum_bg(E_w); F_w = (1 + beta2) R_w P_w / (R_w + beta2 P_w)."""
    prob, gt = _same_shape(_as_prob(prob), _as_mask(gt))
    if not gt.any():
        return 0.0
    distance, nearest = scipy.ndimage.distance_transform_edt(~gt, return_indices=True)
    error = np.abs(prob - gt)
    error_t = error[tuple(nearest)]  # a foreground pixel is its own nearest foreground pixel
    y, x = np.mgrid[-3:4, -3:4]  # MATLAB's fspecial('gaussian', 7, 5), zero padding as imfilter
    gaussian = np.exp(-(x ** 2 + y ** 2) / (2 * 5.0 ** 2))
    error_a = scipy.ndimage.convolve(error_t, gaussian / gaussian.sum(), mode="constant")
    min_error = np.where(gt & (error_a < error), error_a, error)
    importance = np.where(gt, 1.0, 2 - np.exp(np.log(0.5) / 5 * distance))
    error_w = min_error * importance
    tp_w = np.count_nonzero(gt) - error_w[gt].sum()
    fp_w = error_w[~gt].sum()
    recall_w = 1 - error_w[gt].mean()
    precision_w = tp_w / (tp_w + fp_w + _EPS)
    return float((1 + beta2) * recall_w * precision_w / (recall_w + beta2 * precision_w + _EPS))


# ---- Meters: accumulate over a test set; state() / merge() combine processes ----

def _images(prob, gt):
    """Yield (prob, gt) numpy pairs from one image (H, W) or a batch (B, H, W) / (B, 1, H, W)."""
    prob, gt = _same_shape(_to_numpy(prob), _to_numpy(gt))
    height, width = prob.shape[-2:]
    yield from zip(prob.reshape(-1, height, width), gt.reshape(-1, height, width))


class _SumMeter:
    """A meter whose statistics are all sums, so merging two meters is adding their sums."""

    def state(self):
        """Flat dict of the running sums and counts (numbers or numpy arrays), e.g. to gather."""
        return {key: value.copy() if isinstance(value, np.ndarray) else value
                for key, value in self.sums.items()}

    def merge(self, other_state):
        """Add another meter's state() (e.g. gathered from another process) into this one."""
        for key, value in other_state.items():
            self.sums[key] = self.sums[key] + value


class PolypMeter(_SumMeter):
    """Polyp-benchmark columns (PraNet protocol): per image, then averaged over images.

    mDice / mIoU: mean over thresholds of the image-averaged 256-threshold Dice / IoU curves;
    maxEm / meanEm: max / mean of the image-averaged E-measure curve; adpEm: adaptive E-measure;
    Sm, wFm, MAE: per image, then averaged. update() takes prob in [0, 1]; the PraNet protocol
    min-max normalises each prediction map first, which is the caller's step."""

    def __init__(self):
        curve = np.zeros(256)
        self.sums = {"images": 0, "dice_curve": curve, "iou_curve": curve.copy(),
                     "em_curve": curve.copy(), "adp_em": 0.0, "sm": 0.0, "wfm": 0.0, "mae": 0.0}

    def update(self, prob, gt):
        """Add one image (H, W) or a batch (B, H, W) / (B, 1, H, W)."""
        for prob_i, gt_i in _images(prob, gt):
            dice_curve, iou_curve = dice_iou_curves(prob_i, gt_i)
            self.merge({"images": 1, "dice_curve": dice_curve, "iou_curve": iou_curve,
                        "em_curve": e_measure_curve(prob_i, gt_i),
                        "adp_em": adaptive_e_measure(prob_i, gt_i), "sm": s_measure(prob_i, gt_i),
                        "wfm": weighted_f_measure(prob_i, gt_i), "mae": mae(prob_i, gt_i)})

    def compute(self):
        """Dict mDice, mIoU, wFm, Sm, maxEm, meanEm, adpEm, MAE (floats; nan before any update)."""
        n = self.sums["images"]
        if n == 0:
            return dict.fromkeys(["mDice", "mIoU", "wFm", "Sm", "maxEm", "meanEm", "adpEm", "MAE"],
                                 math.nan)
        em_curve = self.sums["em_curve"] / n
        return {"mDice": float(np.mean(self.sums["dice_curve"] / n)),
                "mIoU": float(np.mean(self.sums["iou_curve"] / n)),
                "wFm": self.sums["wfm"] / n, "Sm": self.sums["sm"] / n,
                "maxEm": float(em_curve.max()), "meanEm": float(em_curve.mean()),
                "adpEm": self.sums["adp_em"] / n, "MAE": self.sums["mae"] / n}


_BINARY_KEYS = ("dice", "iou", "precision", "recall", "specificity", "accuracy")


class PerImageMeter(_SumMeter):
    """Binary scores per image at prob >= threshold, then averaged over images (MFEL's choice);
    the keys and empty-mask conventions of scores_from_confusion."""

    def __init__(self, threshold=0.5):
        self.threshold = threshold
        self.sums = {"images": 0, **dict.fromkeys(_BINARY_KEYS, 0.0)}

    def update(self, prob, gt):
        """Add one image (H, W) or a batch (B, H, W) / (B, 1, H, W)."""
        for prob_i, gt_i in _images(prob, gt):
            pred = _as_prob(prob_i) >= self.threshold
            self.merge({"images": 1, **scores_from_confusion(*confusion(pred, gt_i))})

    def compute(self):
        """Dict of the per-image means (nan before any update)."""
        n = self.sums["images"]
        return {key: self.sums[key] / n if n else math.nan for key in _BINARY_KEYS}


class GlobalMeter(_SumMeter):
    """Binary scores from one confusion matrix summed over the whole test set (VM-UNet's way):
    every pixel of every image at prob >= threshold goes into the same tp, fp, fn, tn, so large
    images and large lesions weigh more than in PerImageMeter. compute() gives the same keys."""

    def __init__(self, threshold=0.5):
        self.threshold = threshold
        self.sums = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}

    def update(self, prob, gt):
        """Add the pixels of any number of images (prob and gt of the same shape)."""
        pred = _as_prob(prob) >= self.threshold
        self.merge(dict(zip(("tp", "fp", "fn", "tn"), confusion(pred, gt))))

    def compute(self):
        """Dict dice, iou, precision, recall, specificity, accuracy of the pooled counts."""
        return scores_from_confusion(**self.sums)


class VolumeMeter(_SumMeter):
    """Dice and HD95 per volume and class, averaged over volumes, then over classes (Synapse, ACDC).

    update() takes integer label maps (H, W) or (D, H, W); classes 1 .. num_classes - 1 are scored
    on the masks pred == c and gt == c (background 0 is not). HD95 uses `spacing` (None = voxel
    units, as TransUNet). Empty masks follow `convention`:
    - "transunet" (TransUNet's calculate_metric_percase, needed to compare with the papers):
      both non-empty -> (dice, hd95); pred non-empty and gt empty -> (1, 0);
      pred empty, whatever gt -> (0, 0). Every volume counts for every class, so a missed
      organ lowers the mean HD95 and a class absent from both scores Dice 0.
    - "skip": a class absent from both is left out of that class's means; otherwise Dice is
      computed normally (0 when only one of the two is empty) and HD95 only when both are
      non-empty (left out of the HD95 mean otherwise).
    compute() gives dice_<name> and hd95_<name> per class (the mean over the volumes counted,
    nan if none) and mean_dice, mean_hd95 (mean over the classes that are not nan)."""

    def __init__(self, num_classes, class_names=None, spacing=None, convention="transunet"):
        if convention not in ("transunet", "skip"):
            raise ValueError(f"convention must be 'transunet' or 'skip', got {convention!r}")
        if class_names is None:
            class_names = [f"class{c}" for c in range(1, num_classes)]
        if len(class_names) != num_classes - 1:
            raise ValueError(f"class_names names the {num_classes - 1} foreground classes, "
                             f"got {len(class_names)} names")
        self.num_classes, self.class_names = num_classes, list(class_names)
        self.spacing, self.convention = spacing, convention
        self.sums = {"volumes": 0, **{key: np.zeros(num_classes - 1) for key in
                                      ("dice", "dice_volumes", "hd95", "hd95_volumes")}}

    def _case_scores(self, pred, gt):
        """(dice, hd95) of one class in one volume under the convention; None = not counted."""
        if pred.any() and gt.any():
            return dice(pred, gt), hd95(pred, gt, self.spacing)
        if self.convention == "transunet":
            return (1.0, 0.0) if pred.any() else (0.0, 0.0)
        if not pred.any() and not gt.any():
            return None, None
        return 0.0, None

    def update(self, pred_labels, gt_labels):
        """Add one volume: integer label maps of the same shape, (H, W) or (D, H, W)."""
        pred_labels, gt_labels = _same_shape(_to_numpy(pred_labels), _to_numpy(gt_labels))
        self.sums["volumes"] += 1
        for index, c in enumerate(range(1, self.num_classes)):
            scores = self._case_scores(pred_labels == c, gt_labels == c)
            for metric, value in zip(("dice", "hd95"), scores):
                if value is not None:
                    self.sums[metric][index] += value
                    self.sums[f"{metric}_volumes"][index] += 1

    def compute(self):
        """Dict dice_<name>, hd95_<name> per class, mean_dice and mean_hd95."""
        result = {}
        for metric in ("dice", "hd95"):
            counts = self.sums[f"{metric}_volumes"]
            means = np.where(counts > 0, _divide_or_zero(self.sums[metric], counts), math.nan)
            result.update({f"{metric}_{c}": float(v) for c, v in zip(self.class_names, means)})
            counted = means[~np.isnan(means)]
            result[f"mean_{metric}"] = float(counted.mean()) if counted.size else math.nan
        return result


# ==== 3. Image and mask I/O ====

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}


def _open(path, size_hint=None):
    """Open an image file fully decoded, or stop naming the file."""
    try:
        image = Image.open(path)
        if size_hint and image.format == "JPEG":
            image.draft(image.mode, (size_hint, size_hint))  # decode big JPEGs at a reduced scale
        image.load()
        return image
    except Exception as error:  # PIL raises many types for broken files
        fail(f"cannot read image {path}: {type(error).__name__}: {error}")


def load_image(path, size_hint=None):
    """An RGB image as uint8 (H, W, 3); grayscale is replicated, alpha dropped (datasets.md 0.7)."""
    return np.asarray(_open(path, size_hint).convert("RGB"))


def _mask_values(image):
    """Raw mask values as an integer (H, W) array: channel maximum for RGB (datasets.md 0.8)."""
    if image.mode in ("RGB", "RGBA", "CMYK", "YCbCr"):
        return np.asarray(image.convert("RGB")).max(axis=2)
    if image.mode in ("P", "1", "LA"):
        image = image.convert("L")
    return np.asarray(image).astype(np.int64) if image.mode.startswith("I") else np.asarray(image)


def load_mask(path, instance=False):
    """A binary mask (H, W) bool: v > 128 if max > 1 else v > 0; instance maps (GlaS): v > 0.

    `> 128` is the polyp toolboxes' rule (PraNet's eval/main.m, PySODMetrics' prepare_data); JPEG
    masks (Kvasir) carry compression noise around 0 and 255, which it removes."""
    values = _mask_values(_open(path))
    return values > (0 if instance or values.max() <= 1 else 128)


def load_label_map(path):
    """An integer label map (H, W) int64 from a PNG/TIFF of class indices (palette = indices)."""
    image = _open(path)
    if image.mode == "P":  # a palette PNG stores the class index; the palette is only colour
        return np.asarray(image).astype(np.int64)
    return _mask_values(image).astype(np.int64)


def resize_image(image, size):
    """Resize a uint8 (H, W, C) image to (size, size) bilinearly with antialiasing."""
    if image.shape[:2] == (size, size):
        return image
    pil = Image.fromarray(image)
    return np.asarray(pil.resize((size, size), Image.BILINEAR, reducing_gap=None))


def resize_mask(mask, size, shape=None):
    """Resize a mask or label map to (size, size) or `shape` (H, W): nearest, dtype kept."""
    height, width = shape if shape is not None else (size, size)
    if mask.shape[:2] == (height, width):
        return mask
    rows = np.minimum((np.arange(height) + 0.5) * mask.shape[0] / height, mask.shape[0] - 1)
    cols = np.minimum((np.arange(width) + 0.5) * mask.shape[1] / width, mask.shape[1] - 1)
    return mask[rows.astype(np.int64)[:, None], cols.astype(np.int64)[None, :]]


def save_mask_png(path, mask):
    """Write a binary mask as a 0/255 8-bit PNG."""
    Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255).save(path)


PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                    [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230],
                    [210, 245, 60], [250, 190, 212], [0, 128, 128], [170, 110, 40],
                    [128, 0, 0]], dtype=np.uint8)


def save_label_png(path, labels):
    """Write a label map as a palette PNG (pixel value = class index, coloured for viewing)."""
    image = Image.fromarray(np.asarray(labels).astype(np.uint8), mode="P")
    image.putpalette(PALETTE.flatten().tolist())
    image.save(path)


def save_overlay(path, image, pred, gt=None):
    """Write image | prediction overlay (| ground-truth overlay) side by side, PALETTE colours."""
    image = np.asarray(image, dtype=np.uint8)
    panels = [image]
    for labels in [pred] if gt is None else [pred, gt]:
        labels = np.asarray(labels).astype(np.int64)
        blended = 0.55 * image + 0.45 * PALETTE[labels % len(PALETTE)]
        panels.append(np.where(labels[..., None] > 0, blended, image).astype(np.uint8))
    Image.fromarray(np.concatenate(panels, axis=1)).save(path)


def save_predictions(folder, stems, preds, images=None, gts=None, labels=False, overlays=0):
    """Write `stem`.png per prediction (0/255 mask, or palette label map if `labels`) and, for
    the first `overlays`, `stem`_overlay.png (needs `images`); returns the overlays written."""
    written = 0
    for i, stem in enumerate(stems):
        (save_label_png if labels else save_mask_png)(Path(folder) / f"{stem}.png", preds[i])
        if images is not None and written < overlays:
            save_overlay(Path(folder) / f"{stem}_overlay.png", images[i], preds[i],
                         None if gts is None else gts[i])
            written += 1
    return written


# ==== 4. Dataset discovery (datasets.md section 0) ====

IGNORED_NAMES = {"__macosx", "thumbs.db"}
MASK_TAG = re.compile(r"(_segmentation|_anno|_mask(_\d+)?|_lesion)$", re.IGNORECASE)
MASK_FOLDERS = {"masks", "mask", "ground truth", "groundtruth", "gt", "labels", "label"}
IMAGE_FOLDERS = {"images", "image", "original", "imgs", "img"}


def natural_key(text):
    """Sort key that puts 'train_2' before 'train_10'."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def _folder_role(name):
    """'mask', 'image' or None for one folder name (datasets.md 0.4)."""
    name = name.lower()
    if (name in MASK_FOLDERS or name.endswith("_groundtruth")
            or re.fullmatch(r"imd\d+_lesion", name)):
        return "mask"
    if (name in IMAGE_FOLDERS or name.endswith(("_data", "_input"))
            or re.fullmatch(r"imd\d+_dermoscopic_image", name)):
        return "image"
    return None


def _skip(relative):
    """True for files that are not images of the task (datasets.md 0.1)."""
    parts = [p.lower() for p in relative.parts]
    return (any(p.startswith(".") or p in IGNORED_NAMES for p in parts)
            or relative.suffix.lower() not in IMAGE_EXTS
            or relative.stem.lower().endswith("_superpixels")  # ISIC 2017 feature-task files
            or any(p.endswith("_roi") for p in parts[:-1]))  # PH2 colour-structure ROIs


FORMAT_FOLDERS = ("png", "jpg", "jpeg", "bmp", "tif", "tiff")  # preference order


def _format_copies(paths):
    """(folders to skip, log notes): folders whose sibling holds the same images in a preferred
    format. The Kaggle mirror of CVC-ClinicDB has every frame under PNG/ and TIF/ (each with
    Original/ and Ground Truth/): reading both would leak copies of a frame into train and test."""
    siblings = {}
    for path in paths:
        if path.name.lower() in FORMAT_FOLDERS and path.is_dir():
            siblings.setdefault(path.parent, []).append(path)
    skip, notes = set(), []
    for parent, copies in siblings.items():
        if len(copies) > 1:
            copies.sort(key=lambda c: FORMAT_FOLDERS.index(c.name.lower()))
            skip.update(copies[1:])
            notes.append(f"the same images are under {', '.join(c.name for c in copies)}/ "
                         f"in {parent}: reading {copies[0].name}/ only")
    return skip, notes


def find_pairs(root, notes=None):
    """Image/mask pairs under `root`, paired by key within a folder context, never by position.

    Returns a list of dicts {key, image, masks, context, instance} sorted naturally. Stops with
    one line naming the file when an image has no mask, a mask has no image, or a key repeats.
    A BUSI image with several masks (`_mask`, `_mask_1`) gets all of them (their union is used);
    GlaS `_anno` masks are instance maps (`instance` True: binarised as > 0, whoever loads them).
    Notes on what was skipped are appended to `notes`."""
    root = Path(root)
    if not root.is_dir():
        fail(f"data folder not found: {root}")
    paths = sorted(root.rglob("*"), key=lambda p: natural_key(str(p)))  # one walk of the tree
    skip, format_notes = _format_copies(paths)
    if notes is not None:
        notes.extend(format_notes)
    images, masks = {}, {}
    for path in paths:
        relative = path.relative_to(root)
        if not path.is_file() or _skip(relative) or any(s in path.parents for s in skip):
            continue
        roles = [_folder_role(part) for part in relative.parts[:-1]]
        role = next((r for r in reversed(roles) if r), None)
        role = role or ("mask" if MASK_TAG.search(path.stem) else "image")
        context = "/".join(p for p, r in zip(relative.parts[:-1], roles) if r is None)
        key = MASK_TAG.sub("", path.stem).lower() if role == "mask" else path.stem.lower()
        if role == "image":
            if (context, key) in images:
                fail(f"two images share the key '{key}': {images[(context, key)]} and {path}")
            images[(context, key)] = path
        else:
            masks.setdefault((context, key), []).append(path)
    if not images and not masks:
        fail(f"no image files found under {root}")
    for slot, paths in masks.items():
        if slot not in images:
            fail(f"mask without an image: {paths[0]}")
    pairs = []
    for (context, key), image in images.items():
        if (context, key) not in masks:
            fail(f"image without a mask: {image}")
        found = masks[(context, key)]
        pairs.append({"key": key, "image": str(image), "context": context,
                      "masks": [str(p) for p in found],
                      "instance": all(p.stem.lower().endswith("_anno") for p in found)})
    return pairs


def _header(path):
    """(width, height) of an image file from its header; one line naming a broken file. PNG,
    BMP and TIFF are verified (cheap: no decoding); a JPEG must end with its EOI marker."""
    try:
        with Image.open(path) as image:
            size, kind = image.size, image.format
            if kind in ("PNG", "BMP", "TIFF"):
                image.verify()
        if kind == "JPEG":
            with open(path, "rb") as f:
                f.seek(-2, os.SEEK_END)
                if f.read(2) != b"\xff\xd9":
                    raise OSError("truncated JPEG (no end-of-image marker)")
        return size
    except Exception as error:  # PIL raises many types for broken files
        fail(f"cannot read image {path}: {type(error).__name__}: {error}")


def check_pairs(pairs):
    """Open every image and mask header before training; stop at the first broken or mis-sized
    (about 0.2 ms a file: 2,000 pairs take well under a few seconds)."""
    for pair in pairs:
        size = _header(pair["image"])
        for mask in pair["masks"]:
            mask_size = _header(mask)
            if mask_size != size:
                fail(f"mask {mask} is {mask_size[0]}x{mask_size[1]} but its image "
                     f"{pair['image']} is {size[0]}x{size[1]}")
        pair["size"] = size
    return pairs


def list_images(folder, flag="--predict"):
    """Image files directly in `folder`, naturally sorted; stop with one line if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        fail(f"{flag} {folder}: no such folder")
    files = sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                    and p.suffix.lower() in IMAGE_EXTS), key=lambda p: natural_key(p.name))
    if not files:
        fail(f"{flag} {folder}: no image files in it")
    return files


SPLIT_WORDS = (("test", {"test", "testdataset"}), ("val", {"val", "valid", "validation"}),
               ("train", {"train", "training", "traindataset"}))


def _split_of(pair, root):
    """('train'|'val'|'test'|None, test group name) from the path or GlaS file prefix. The
    innermost folder naming a split decides, so a doubly unzipped TestDataset/TestDataset/ still
    yields the five polyp sets as groups."""
    parts = Path(pair["image"]).relative_to(root).parts
    for index in reversed(range(len(parts) - 1)):
        words = set(re.split(r"[^a-z]+", parts[index].lower()))
        for split, tokens in SPLIT_WORDS:
            if words & tokens:
                rest = [p for p in parts[index + 1:-1] if _folder_role(p) is None]
                return split, (rest[0] if split == "test" and rest else "test")
    stem = Path(pair["image"]).stem.lower()  # GlaS: train_12, testA_3, testB_7
    match = re.match(r"(train|testa|testb)_\d+$", stem)
    if match:
        return ("train", None) if match.group(1) == "train" else ("test", "test")
    return None, None


# The layouts of datasets.md, each recognised by a folder or file name (first match wins); the
# name tells a script which row of its protocol table applies. The generic images/ + masks/
# layout (any other folder of pairs) comes last.
LAYOUTS = [
    ("pranet", r"/traindataset/(.|\n)*/testdataset/|/testdataset/(.|\n)*/traindataset/"),
    ("pranet-test", r"/(cvc-300|cvc-colondb|etis-laribpolypdb)/"),
    ("isic2016", r"isbi2016_isic_part1"), ("isic2017", r"isic-2017_"),
    ("isic2018", r"isic2018_task1"), ("ph2", r"imd\d+_lesion/"),
    ("glas", r"/(train|testa|testb)_\d+_anno\.bmp$"), ("busi", r"/malignant/"),
    ("clinicdb", r"/ground truth/"), ("vmunet-isic", r"/val/(images|masks)/"),
    ("kvasir", r"kvasir"),
]


def detect_layout(root, pairs):
    """The name of the layout in LAYOUTS that `root` holds ('images-masks' when none fits)."""
    root = Path(root)
    text = "\n".join(sorted("/" + str(Path(p).relative_to(root)).lower()
                            for pair in pairs for p in (pair["image"], pair["masks"][0])))
    text = f"/{root.name.lower()}/\n{text}"
    for name, pattern in LAYOUTS:
        if re.search(pattern, text, re.MULTILINE):
            return name
    return "images-masks"


def _seeded_split(pairs, fractions, rng):
    """Shuffle `pairs` with `rng` and cut them into train/val/test by `fractions`."""
    order = list(pairs)
    rng.shuffle(order)
    n_train = round(fractions[0] * len(order))
    n_val = round(fractions[1] * len(order))
    return {"train": order[:n_train], "val": order[n_train:n_train + n_val],
            "test": {"test": order[n_train + n_val:]} if n_train + n_val < len(order) else {}}


def _assert_disjoint(result):
    """No image, and no key within one folder context, may sit in two splits."""
    seen = {}
    for split, pairs in [("train", result["train"]), ("val", result["val"]),
                         *((f"test/{g}", p) for g, p in result["test"].items())]:
        for pair in pairs:
            context = "/".join(part for part in pair["context"].split("/")
                               if not any(set(re.split(r"[^a-z]+", part.lower())) & tokens
                                          for _, tokens in SPLIT_WORDS))
            for ident in (pair["image"], (context, pair["key"])):
                if seen.setdefault(ident, split) != split:
                    raise AssertionError(f"{pair['image']} is in both {seen[ident]} and {split}")


def discover_splits(root, seed=0, val_fraction=0.1, fractions=(0.8, 0.1, 0.1), official=True,
                    all_test=False):
    """Split pairs into {'train', 'val', 'test': {group: pairs}, 'source', 'official', 'layout'}.

    Official splits come from the layout (ISIC Training/Validation/Test folders, VM-UNet's
    train/val where 'val' is the test set, the PraNet TrainDataset/TestDataset/<set> package,
    GlaS name prefixes). Without one, or with `official=False` (a paper that re-splits), a seeded
    split by `fractions`. When the layout has train and test but no validation set,
    `val_fraction` of train is held out (0: no validation). `all_test=True` (a folder given to
    --eval): every pair is test data, in the layout's groups (the five polyp sets, ...).
    Every file's header is checked first (`check_pairs`)."""
    root = Path(root)
    notes = []
    pairs = check_pairs(find_pairs(root, notes))
    layout = detect_layout(root, pairs)
    tagged = [(_split_of(p, root), p) for p in pairs]
    splits = {s for (s, _), _ in tagged}
    rng = random.Random(seed)
    tests = {}  # test group -> pairs; with all_test every pair, grouped by its split or folder
    for (split, group), pair in tagged:
        if split == "test" or all_test:
            name = group if split == "test" else split or pair["context"].split("/")[0] or "test"
            tests.setdefault(name, []).append(pair)
    if all_test:
        result = {"train": [], "val": [], "test": tests}
        source, is_official = f"every pair as test data ({len(tests)} groups)", True
    elif not official or None in splits or "train" not in splits or splits == {"train"}:
        result = _seeded_split(pairs, fractions, rng)
        source = (f"seeded {fractions[0]:.0%}/{fractions[1]:.0%}/{fractions[2]:.0%} split of "
                  f"all {len(pairs)} pairs, seed {seed}")
        is_official = False
    else:
        train = [p for (s, _), p in tagged if s == "train"]
        val = [p for (s, _), p in tagged if s == "val"]
        source = "official split of the layout"
        if not tests:  # VM-UNet's folders: 'val' is the test half of its 7:3 split
            tests, val = {"test": val}, []
            source = "layout's train/val folders (val used as the test set, as VM-UNet does)"
        if not val and val_fraction > 0:
            order = list(train)
            rng.shuffle(order)
            n_val = max(1, round(val_fraction * len(order)))
            val, train = order[:n_val], order[n_val:]
            source += f"; {val_fraction:.0%} of train held out for validation (seed {seed})"
        result = {"train": train, "val": val, "test": tests}
        is_official = True
    if not result["train"] and not all_test:
        fail(f"no training pairs found under {root}")
    _assert_disjoint(result)
    result.update(source="; ".join([source, *notes]), official=is_official, layout=layout)
    return result


def find_slice_files(root):
    """TransUNet-style multi-class files: {'train': [npz], 'val': [...], 'test': [npz|h5]}.
    Synapse: train_npz/*.npz and test_vol_h5/*.npy.h5; ACDC (MT-UNet package): train/, valid/,
    test/ folders of *.npz (test files are volumes). Returns None if `root` has neither layout."""
    root = Path(root)
    layouts = [("train_npz", None, ("test_vol_h5", "test_npz")), ("train", "valid", ("test",))]
    for train_dir, val_dir, test_dirs in layouts:
        train = sorted((root / train_dir).glob("*.npz"), key=lambda p: natural_key(p.name))
        if train:
            test = sorted((p for d in test_dirs for pattern in ("*.npz", "*.h5")
                           for p in (root / d).glob(pattern)), key=lambda p: natural_key(p.name))
            val = sorted((root / val_dir).glob("*.npz")) if val_dir else []
            return {"train": train, "val": val, "test": test}
    return None


# ==== 5. Datasets (binary pairs, multi-class slices and volumes, toy data) ====

def _to_tensor(image, mean, std):
    """uint8 (H, W, 3) -> normalised float (3, H, W)."""
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0  # writable copy
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def random_flip_rotate(image, mask, rng, rot90=False):
    """Random horizontal and vertical flips (p = 0.5 each) and, with `rot90`, a rotation by
    k * 90 degrees, k in 0..3; the same for image and mask."""
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    if rng.random() < 0.5:
        image, mask = image[::-1], mask[::-1]
    if rot90:
        k = rng.randrange(4)
        image, mask = np.rot90(image, k), np.rot90(mask, k)
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


class PairDataset(torch.utils.data.Dataset):
    """Image/mask pairs from disk, resized to `size`; binary masks or integer label maps.

    Item: {'image': (3, S, S) float, 'mask': (1, S, S) float in {0, 1} (binary) or (S, S) int64
    (labels), 'index': int}. `full(i)` returns the image and mask at their original size, which
    is where the papers evaluate."""

    def __init__(self, pairs, size, augment=None, labels=False, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, seed=0):
        self.pairs, self.size, self.augment = pairs, size, augment
        self.labels, self.mean, self.std = labels, mean, std
        self.rng = random.Random(seed)
        self.names = [Path(p["image"]).stem for p in pairs]

    def __len__(self):
        return len(self.pairs)

    def full(self, index, size_hint=None):
        """(image uint8 (H, W, 3), mask bool (H, W) or labels int64) at the original size."""
        pair = self.pairs[index]
        image = load_image(pair["image"], size_hint)  # a JPEG may decode smaller (size_hint)
        if self.labels:
            mask = load_label_map(pair["masks"][0])
        else:  # the union of an image's masks (BUSI); GlaS instance maps: every label > 0
            mask = np.logical_or.reduce([load_mask(m, pair.get("instance", False))
                                         for m in pair["masks"]])
        width, height = pair.get("size") or image.shape[1::-1]  # (check_pairs' header size)
        if mask.shape != (height, width) or (size_hint is None and image.shape[:2] != mask.shape):
            fail(f"mask {pair['masks'][0]} is {mask.shape[1]}x{mask.shape[0]} but its image "
                 f"{pair['image']} is {width}x{height}")
        return image, mask

    def __getitem__(self, index):
        image, mask = self.full(index)
        image, mask = resize_image(image, self.size), resize_mask(mask, self.size)
        if self.augment is not None:
            image, mask = self.augment(image, mask, self.rng)
        mask = torch.from_numpy(np.ascontiguousarray(mask))
        return {"image": _to_tensor(image, self.mean, self.std), "index": index,
                "mask": mask.long() if self.labels else mask.float()[None]}


def read_slice(path):
    """(image float32, label int64) from a TransUNet npz ('image' or 'img') or an .h5 volume."""
    path = Path(path)
    try:
        if path.suffix == ".h5":
            try:
                import h5py
            except ImportError:
                fail(f"{path} is an HDF5 volume: install h5py (pip install h5py) to read it")
            with h5py.File(path, "r") as f:
                return np.asarray(f["image"], np.float32), np.asarray(f["label"], np.int64)
        with np.load(path) as f:
            image = f["image"] if "image" in f else f["img"]
            return np.asarray(image, np.float32), np.asarray(f["label"], np.int64)
    except UserError:
        raise
    except Exception as error:
        fail(f"cannot read {path}: {type(error).__name__}: {error}")


def count_labels(paths):
    """The class count K = 1 + the largest label id in any of `paths` (npz / h5 / label PNG),
    read at discovery, so a rare class in a single file cannot crash training later; a negative
    id, or no foreground at all, ends with one line naming the culprit."""
    top = 0
    for path in paths:
        labels = read_slice(path)[1] if Path(path).suffix in (".npz", ".h5") else \
            load_label_map(path)
        if labels.min() < 0:
            fail(f"{path}: the label map holds the negative id {int(labels.min())}")
        top = max(top, int(labels.max()))
    if top < 1:
        fail(f"no foreground label in any of the {len(paths)} label maps")
    return top + 1


def zoom_slice(array, shape, order):
    """scipy.ndimage.zoom of a 2-D map to `shape` (TransUNet's resize: order 3 image, 0 labels)."""
    if array.shape[:2] == tuple(shape):
        return array
    return scipy.ndimage.zoom(array, (shape[0] / array.shape[0], shape[1] / array.shape[1]),
                              order=order)


def _gray_to_tensor(image, size, channels):
    """float (H, W) slice in [0, 1] -> (channels, S, S) float, bilinear resize."""
    x = torch.from_numpy(np.ascontiguousarray(image, np.float32))[None, None]
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x[0].expand(channels, -1, -1).contiguous()


class SliceDataset(torch.utils.data.Dataset):
    """2-D multi-class slices (TransUNet npz): {'image': (C, S, S), 'mask': (S, S) int64}.

    `resize="bilinear"`: torch's bilinear image, nearest labels; `"cubic"`: TransUNet's scipy
    zoom (order 3 image, order 0 labels), after the augmentation as TransUNet does."""

    def __init__(self, files, size, augment=None, channels=3, seed=0, resize="bilinear"):
        self.files, self.size, self.augment, self.channels = files, size, augment, channels
        self.resize, self.rng = resize, random.Random(seed)
        self.names = [Path(f).stem for f in files]

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        image, label = read_slice(self.files[index])
        if image.ndim != 2:
            fail(f"{self.files[index]} holds a {image.ndim}-D array; training expects 2-D slices")
        if self.augment is not None:
            image, label = self.augment(image, label, self.rng)
        if self.resize == "cubic":
            image = zoom_slice(image, (self.size, self.size), 3)
            label = zoom_slice(label, (self.size, self.size), 0)
        label = resize_mask(label, self.size)
        return {"image": _gray_to_tensor(image, self.size, self.channels),
                "mask": torch.from_numpy(np.ascontiguousarray(label)).long(), "index": index}


class VolumeDataset:
    """Test volumes: item i is (image float (D, H, W), label int64 (D, H, W), name)."""

    def __init__(self, files):
        self.files = files
        self.names = [Path(f).name.split(".")[0] for f in files]

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        image, label = read_slice(self.files[index])
        if image.ndim == 2:
            image, label = image[None], label[None]
        return image, label, self.names[index]


def _smooth_noise(rng, size, scale):
    """Smooth random field in about [-1, 1]: white noise blurred by a box of width `scale`."""
    padded = size + 2 * scale
    field = scipy.ndimage.uniform_filter(rng.standard_normal((padded, padded)), scale)
    field = field[scale:scale + size, scale:scale + size]
    return field / (np.abs(field).max() + 1e-8)


def _irregular_blob(rng, size, center, radius, wobble):
    """Bool (size, size) blob whose radius varies with angle: r(t) = r0 (1 + sum a_k sin(k t))."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = yy - center[0], xx - center[1]
    theta = np.arctan2(dy, dx)
    r = np.ones_like(theta)
    for k in range(2, 6):
        r += wobble * rng.uniform(-1, 1) / k * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
    stretch = rng.uniform(0.7, 1.3)
    return (dy / stretch) ** 2 + (dx * stretch) ** 2 <= (radius * r) ** 2


def make_toy_binary(index, size, seed=0):
    """One toy binary sample (image uint8 (S, S, 3), mask bool (S, S)), fixed by (seed, index).

    A textured lesion-like blob (1-2 lobes, wobbly boundary, sometimes cut by the border) on a
    textured background; colour contrast varies from clear to faint, plus noise and a decoy
    spot of lesion colour but wrong texture, so it is learnable but not trivial."""
    rng = np.random.default_rng([seed, index])
    rng_py = np.random.default_rng([seed, index, 1])
    mask = np.zeros((size, size), bool)
    for _ in range(rng.integers(1, 3)):
        center = rng.uniform(0.1, 0.9, 2) * size  # some lobes sit near or across the border
        mask |= _irregular_blob(rng_py, size, center, rng.uniform(0.1, 0.24) * size, 0.6)
    background = np.array([0.75, 0.55, 0.45]) + rng.uniform(-0.1, 0.1, 3)
    contrast = rng.uniform(0.12, 0.35)
    foreground = background + contrast * np.array([-0.2, -1.0, -0.8]) * rng.uniform(0.7, 1.3, 3)
    texture_bg = _smooth_noise(rng, size, max(2, size // 8))
    texture_fg = _smooth_noise(rng, size, max(2, size // 32))
    image = np.where(mask[..., None], foreground + 0.10 * texture_fg[..., None],
                     background + 0.12 * texture_bg[..., None])
    decoy = _irregular_blob(rng_py, size, rng.uniform(0.1, 0.9, 2) * size, 0.05 * size, 0.3)
    image = np.where((decoy & ~mask)[..., None], 0.5 * (image + foreground), image)
    image = image + rng.normal(0, 0.04, image.shape)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8), mask


# Eight organ-like classes: (centre y, centre x, radius, intensity, texture scale), all relative.
TOY_ORGANS = [(0.42, 0.50, 0.06, 0.95, 0), (0.30, 0.70, 0.07, 0.45, 16),
              (0.55, 0.28, 0.08, 0.75, 8), (0.55, 0.72, 0.08, 0.75, 8),
              (0.35, 0.30, 0.16, 0.60, 4), (0.50, 0.50, 0.08, 0.52, 16),
              (0.40, 0.80, 0.09, 0.66, 4), (0.68, 0.52, 0.12, 0.38, 8)]
TOY_CLASS_NAMES = ["vessel", "sac", "bean L", "bean R", "big", "tail", "round", "pouch"]


def make_toy_multiclass(index, size, seed=0):
    """One toy slice (image float32 (S, S) in [0, 1], labels int64 (S, S) in 0..8).

    4-8 of eight organ-like regions in a body ellipse; each class has a typical place, size,
    intensity and texture (the two 'beans' differ only by side), all jittered, plus noise."""
    rng = np.random.default_rng([seed, index, 2])
    yy, xx = np.mgrid[0:size, 0:size] / size
    body = ((yy - 0.5) / 0.42) ** 2 + ((xx - 0.5) / 0.46) ** 2 <= 1
    image = np.where(body, 0.25 + 0.05 * _smooth_noise(rng, size, max(2, size // 10)), 0.0)
    labels = np.zeros((size, size), np.int64)
    present = rng.choice(8, size=rng.integers(4, 9), replace=False)
    for organ in sorted(present, key=lambda k: -TOY_ORGANS[k][2]):  # big ones first
        cy, cx, radius, intensity, scale = TOY_ORGANS[organ]
        center = (np.array([cy, cx]) + rng.normal(0, 0.03, 2)) * size
        region = _irregular_blob(rng, size, center, radius * size * rng.uniform(0.8, 1.2), 0.4)
        region &= body
        texture = _smooth_noise(rng, size, max(2, size // scale)) if scale else 0.0
        image = np.where(region, intensity + rng.normal(0, 0.03) + 0.08 * texture, image)
        labels[region] = organ + 1
    image = image + rng.normal(0, 0.05, image.shape)
    return np.clip(image, 0, 1).astype(np.float32), labels


class ToyBinary(PairDataset):
    """The built-in binary toy set (deterministic for a seed): a PairDataset of generated pairs."""

    def __init__(self, n, size, seed=0, augment=None, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__([], size, augment, mean=mean, std=std, seed=seed)
        self.n, self.seed, self.cache = n, seed, {}
        self.names = [f"toy_{seed}_{i:04d}" for i in range(n)]

    def __len__(self):
        return self.n

    def full(self, index, size_hint=None):
        """(image uint8, mask bool) at the generated size (generated once, then cached)."""
        if index not in self.cache:
            self.cache[index] = make_toy_binary(index, self.size, self.seed)
        return self.cache[index]


class ToyMulticlass(torch.utils.data.Dataset):
    """The built-in multi-class toy set: items like SliceDataset's; `volume(i)` for testing."""

    def __init__(self, n, size, seed=0, augment=None, channels=3):
        self.n, self.size, self.seed, self.augment, self.channels = n, size, seed, augment, channels
        self.rng = random.Random(seed)
        self.names = [f"toy_{seed}_{i:04d}" for i in range(n)]

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        image, label = make_toy_multiclass(index, self.size, self.seed)
        if self.augment is not None:
            image, label = self.augment(image, label, self.rng)
        return {"image": _gray_to_tensor(image, self.size, self.channels),
                "mask": torch.from_numpy(np.ascontiguousarray(label)).long(), "index": index}

    def volume(self, index):
        """(image (1, S, S), label (1, S, S), name): a one-slice 'volume' for VolumeMeter."""
        image, label = make_toy_multiclass(index, self.size, self.seed)
        return image[None], label[None], self.names[index]


@torch.no_grad()
def predict_volume(logits_fn, volume, size, channels=3, device="cpu", batch=16,
                   resize="bilinear"):
    """Label volume (D, H, W) int64: slices resized to `size`, argmax of `logits_fn`, resized back.

    `logits_fn` maps (n, channels, size, size) float to (n, K, size, size) logits; the prediction
    is brought back to the slice's own H x W nearest-neighbour, as the TransUNet test does.
    `resize="cubic"`: slices in by scipy zoom order 3 and back by order 0 (TransUNet's calls)."""
    labels, square = [], (size, size)
    for start in range(0, volume.shape[0], batch):
        chunk = volume[start:start + batch]
        if resize == "cubic":
            chunk = [zoom_slice(np.asarray(s, np.float32), square, 3) for s in chunk]
        x = torch.stack([_gray_to_tensor(s, size, channels) for s in chunk])
        pred = logits_fn(x.to(device)).argmax(dim=1).cpu().numpy()  # (n, S, S)
        labels.extend(zoom_slice(p, volume.shape[1:], 0) if resize == "cubic" else
                      resize_mask(p, 0, volume.shape[1:]) for p in pred)
    return np.stack(labels)


def write_toy(out, kind="binary", n=100, size=256, seed=0):
    """Write the toy set to disk: Kvasir-SEG layout (binary) or Synapse-like npz (multiclass)."""
    out = Path(out)
    if kind == "binary":
        (out / "images").mkdir(parents=True, exist_ok=True)
        (out / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image, mask = make_toy_binary(i, size, seed)
            Image.fromarray(image).save(out / "images" / f"toy_{i:04d}.jpg", quality=95)
            save_mask_png(out / "masks" / f"toy_{i:04d}.png", mask)
    elif kind == "multiclass":
        for split, first, count in (("train_npz", 0, n), ("test_npz", n, max(1, n // 5))):
            (out / split).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image, label = make_toy_multiclass(first + i, size, seed)
                np.savez_compressed(out / split / f"case{i:04d}_slice000.npz", image=image,
                                    label=label)
    else:
        fail(f"unknown toy kind '{kind}' (binary or multiclass)")
    return out


def load_data(args, task="binary", augment=None, toy_sizes=(160, 20, 40), mean=IMAGENET_MEAN,
              std=IMAGENET_STD, channels=3, official=True, fractions=(0.8, 0.1, 0.1),
              resize="bilinear"):
    """The data of a run: {'train', 'val', 'test': {group: dataset}, 'source', 'splits',
    'layout', 'pairs'}.

    `args.data` is 'toy' (built-in data) or a folder. Binary tasks read image/mask pairs
    (`discover_splits`: `official=False` re-splits the layout by `fractions`); multi-class tasks
    read TransUNet npz/h5 files (`find_slice_files`) or pairs of images and label-map PNGs. Test
    sets of multi-class tasks are VolumeDatasets. With `args.eval` set, the folder is all test
    data: every group in it, in full. `resize` is SliceDataset's (TransUNet slices only)."""
    size, seed = args.img_size, args.seed
    if args.data == "toy":
        n_train, n_val, n_test = toy_sizes
        if task == "binary":
            make = lambda n, s, aug: ToyBinary(n, size, s, aug, mean, std)  # noqa: E731
        else:
            make = lambda n, s, aug: ToyMulticlass(n, size, s, aug, channels)  # noqa: E731
        return {"train": make(n_train, seed + 1, augment), "val": make(n_val, seed + 2, None),
                "test": {"toy": make(n_test, seed + 3, None)}, "layout": "toy", "pairs": None,
                "source": f"built-in {task} toy data (seed {seed})", "splits": None}
    root = Path(args.data)
    if not root.exists():
        fail(f"--data {args.data}: no such folder (give a data folder, or 'toy')")
    if not root.is_dir():
        fail(f"--data {args.data}: not a folder")
    evaluating = bool(getattr(args, "eval", None))
    if task != "binary":
        files = find_slice_files(root)
        if files is not None:
            if evaluating:  # every file of the folder is test data
                files = {"train": [], "val": [], "test": files["test"] or files["train"]}
            val = (SliceDataset(files["val"], size, None, channels, resize=resize)
                   if files["val"] else None)
            tests = {"test": VolumeDataset(files["test"])} if files["test"] else {}
            layout = "synapse" if (root / "train_npz").is_dir() else "acdc"
            return {"train": SliceDataset(files["train"], size, augment, channels, seed, resize),
                    "val": val, "test": tests, "splits": None, "layout": layout, "pairs": None,
                    "source": f"TransUNet-style slices in {root} ({len(files['train'])} train)"}
    split = discover_splits(root, seed, getattr(args, "val_fraction", 0.1), fractions, official,
                            all_test=evaluating)
    labels = task != "binary"
    make = lambda pairs, aug: PairDataset(pairs, size, aug, labels, mean, std, seed)  # noqa
    return {"train": make(split["train"], augment),
            "val": make(split["val"], None) if split["val"] else None,
            "test": {g: make(p, None) for g, p in split["test"].items()},
            "source": f"{root}: {split['source']}", "layout": split["layout"],
            "pairs": {"train": split["train"], "val": split["val"], "test": split["test"]},
            "splits": {"train": [p["image"] for p in split["train"]],
                       "val": [p["image"] for p in split["val"]],
                       "test": {g: [p["image"] for p in ps] for g, ps in split["test"].items()}}}


# ==== 6. Run plumbing: flags, seeding, device, DDP, run folder, checkpoints ====

def add_common_args(parser, paper, source, pretrained_default="none"):
    """The command line every script shares (DESIGN.md); `paper` holds the paper's recipe values.

    Flags left unset are filled by `finish_args`: the paper's value with real data, the script's
    toy value with the toy data. A script whose paper starts from pretrained weights passes
    `pretrained_default=None`: then `--pretrained` is 'auto' with real data, 'none' on toy data."""
    group = parser.add_argument_group("shared flags (common.py)")
    group.add_argument("--data", default="toy", help="data folder, or 'toy' (default: toy)")
    group.add_argument("--preset", choices=["paper", "small", "tiny"], default=None,
                       help="model size (default: paper with real data, small with toy data)")
    for flag, kind in (("epochs", int), ("batch-size", int), ("lr", float), ("img-size", int)):
        group.add_argument(f"--{flag}", type=kind,
                           help=f"(paper: {paper[flag.replace('-', '_')]}, {source})")
    group.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    group.add_argument("--workers", type=int, default=0, help="data-loader processes (default 0)")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--out", default=None, help="run folder (default runs/<script>/<time>)")
    group.add_argument("--resume", default=None, metavar="CKPT", help="continue a run from last.pt")
    group.add_argument("--eval", default=None, metavar="CKPT", help="only test this checkpoint")
    group.add_argument("--predict", default=None, metavar="DIR",
                       help="write a mask PNG for every image in DIR (needs --checkpoint)")
    group.add_argument("--checkpoint", default=None, metavar="CKPT")
    group.add_argument("--amp", action="store_true", help="mixed precision (CUDA fp16, CPU bf16)")
    group.add_argument("--bench", action="store_true", help="print one JSON line of speed, exit")
    auto = "auto with real data, none on toy data" if pretrained_default is None else "none"
    group.add_argument("--pretrained", default=pretrained_default,
                       help=f"backbone weights: auto (download), none, or a file (default: {auto})")
    group.add_argument("--val-fraction", type=float, default=0.1,
                       help="share of train held out when the layout has no validation set")
    group.add_argument("--limit-batches", type=int, default=0,
                       help="stop each epoch after N batches (quick checks; 0 = all)")
    return parser


def finish_args(args, paper, toy):
    """Fill unset flags (paper values with real data, `toy` values with toy data) and check
    them, all before any data is read or any folder is made."""
    args.data = "toy" if args.data in (None, "", "toy") else args.data
    defaults = toy if args.data == "toy" else paper
    for name in ("epochs", "batch_size", "lr", "img_size"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    if args.preset is None:
        args.preset = "small" if args.data == "toy" else "paper"
        args.preset_reason = "toy data" if args.data == "toy" else "real data"
    else:
        args.preset_reason = "--preset"
    if getattr(args, "pretrained", "none") is None:
        args.pretrained = "none" if args.data == "toy" else "auto"
    for name in ("epochs", "batch_size", "img_size"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    if args.lr <= 0:
        fail(f"--lr must be positive (got {args.lr})")
    if args.workers < 0:
        fail(f"--workers must be 0 or more (got {args.workers})")
    if not 0 <= getattr(args, "val_fraction", 0) < 1:
        fail(f"--val-fraction must lie in [0, 1) (got {args.val_fraction})")
    if args.predict and not args.checkpoint:
        fail("--predict DIR needs --checkpoint CKPT")
    if args.out:  # the nearest existing folder on the way to --out must be writable
        parent = Path(args.out).absolute()
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            fail(f"--out {args.out}: cannot write there ({parent} is not a writable folder)")
    choose_device(args.device)  # a missing GPU is a one-line error now, not after loading data
    return args


def explicit_flags(parser, argv=None):
    """The `dest` names the command line `argv` sets explicitly (not left at their defaults)."""
    saved = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        given, _ = parser.parse_known_args(argv)
    finally:
        for action, default in saved:
            action.default = default
    return set(vars(given))


def adopt_config(args, checkpoint, keys, explicit, flag, check_only=False, path=None):
    """Take the checkpoint's values of `keys` (and its preset); an explicit, different flag stops.

    The weights only fit the architecture they were trained with, so a flag that would change it
    is a mistake worth one clear line rather than a shape-mismatch traceback. `check_only=True`
    (a second checkpoint that must fit the settings already made): every differing key stops,
    nothing is copied. `path`: the file the message names (default: the value of `flag`)."""
    config = checkpoint.get("config", {})
    path = getattr(args, flag.lstrip("-").replace("-", "_"), "") if path is None else path
    for key in [key for key in keys if key in config]:
        if (check_only or key in explicit) and getattr(args, key) != config[key]:
            fail(f"{flag} {path}: --{key.replace('_', '-')} {getattr(args, key)} differs from "
                 f"the checkpoint's {config[key]} (it changes the architecture)")
        if not check_only:
            setattr(args, key, config[key])
    if checkpoint.get("preset"):
        if (check_only or "preset" in explicit) and args.preset != checkpoint["preset"]:
            fail(f"{flag} {path}: --preset {args.preset} differs from the checkpoint's "
                 f"{checkpoint['preset']}")
        if not check_only:
            args.preset, args.preset_reason = checkpoint["preset"], "the checkpoint's"
    return args


def seed_everything(seed):
    """Seed Python, NumPy and PyTorch; each torchrun rank gets its own stream (seed + rank).
    Models still start identical on every rank: DistributedDataParallel copies rank 0's weights."""
    seed = seed + int(os.environ.get("RANK", 0))
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def choose_device(name="auto"):
    """torch.device for 'auto' (CUDA, then MPS, then CPU) or an explicit choice."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA GPU is visible")
    if name == "mps" and not mps:
        fail("--device mps: no Apple GPU (MPS) is available")
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


# ---- Checkpoints and weight files: loading never runs code from the file ----

def _plain(value):
    """`value` with numpy numbers, paths and other objects turned into plain Python and tensors,
    so that `torch.load(..., weights_only=True)` reads the checkpoint back."""
    if isinstance(value, (torch.Tensor, bool, int, float, str)) or value is None:
        return value
    if isinstance(value, dict):
        if all(isinstance(v, torch.Tensor) for v in value.values()):
            return value  # a state dict: keep its type and metadata
        return {k: _plain(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, (list, tuple)):  # a named tuple or another subclass: a plain list
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if isinstance(value, argparse.Namespace):
        return _plain(vars(value))
    return str(value)


def save_checkpoint(path, state):
    """torch.save `state` atomically (a temporary file, fsync, then rename over `path`): an
    interrupted save leaves `path` as it was and removes its temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(_plain(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path, script=None, flag="--checkpoint", **expect):
    """A checkpoint of this repository, read with `weights_only=True`; one line when it is not.
    `expect` names fields that must match (e.g. `stage="recon"`)."""
    path = Path(path)
    if not path.is_file():
        fail(f"{flag} {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # torch's refusal names the class: "GLOBAL a.B"
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        fail(f"{flag} {path}: not a checkpoint of this repository (it pickles "
             f"{found.group(1) if found else 'a Python object'}, which is never unpickled here)")
    except Exception as error:
        fail(f"{flag} {path}: cannot read it (truncated or not a PyTorch file: "
             f"{type(error).__name__})")
    if not isinstance(state, dict) or "model" not in state:
        fail(f"{flag} {path}: not a checkpoint of this repository (no 'model' entry)")
    if script and state.get("script") != script:
        fail(f"{flag} {path}: written by {state.get('script')}, not {script}")
    for key, wanted in expect.items():
        if state.get(key) != wanted:
            fail(f"{flag} {path}: its {key} is {state.get(key)!r}, expected {wanted!r}")
    return state


class Foreign(dict):
    """Inert stand-in for a class pickled in a published weight file (e.g. yacs' CfgNode): it
    keeps what the pickle gave it (`args`, `state`, items) and runs none of the class's code."""
    origin = "?"

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.args, self.kwargs, self.items_list = args, kwargs, []

    def __setstate__(self, state):
        self.state = state

    def append(self, item):
        """Keep a list item the pickle appends."""
        self.items_list.append(item)

    def extend(self, items):
        """Keep list items the pickle appends."""
        self.items_list.extend(items)

    def __repr__(self):
        return f"<Foreign {self.origin}>"


_SAFE_BUILTINS = {"set", "frozenset", "slice", "complex", "range", "bytearray", "tuple", "list",
                  "dict", "int", "float", "str", "bool"}
_SAFE_NUMPY = {"_reconstruct", "scalar", "ndarray", "dtype"}


class _WeightsUnpickler(pickle.Unpickler):
    """Rebuilds tensors, numpy arrays and plain containers; every other class is a Foreign."""

    def find_class(self, module, name):
        """The real class for tensors and plain containers, a Foreign stand-in for any other."""
        top = module.split(".")[0]
        if top == "torch" and (name.startswith("_rebuild") or name.endswith("Storage")
                               or name in ("Size", "device")
                               or isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        if (module, name) in (("collections", "OrderedDict"), ("_codecs", "encode")) or (
                module == "builtins" and name in _SAFE_BUILTINS) or (
                top == "numpy" and name in _SAFE_NUMPY):
            return super().find_class(module, name)
        return type(name, (Foreign,), {"origin": f"{module}.{name}"})


class _RestrictedPickle:
    """A `pickle_module` for torch.load that only knows `_WeightsUnpickler`."""
    __name__ = "restricted_pickle"
    Unpickler = _WeightsUnpickler

    @staticmethod
    def load(file, **kwargs):
        """pickle.load with the restricted unpickler."""
        return _WeightsUnpickler(file, **kwargs).load()


def load_weights(path, flag="--pretrained"):
    """A published weight file's contents, tensors intact, without running code from the file.

    `weights_only=True` first; files that pickle other objects (VMamba's yacs config, a training
    script's argparse.Namespace) are read by a restricted unpickler that turns every such object
    into an inert `Foreign`."""
    path = Path(path)
    if not path.is_file():
        fail(f"{flag} {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass
    except Exception as error:
        fail(f"{flag} {path}: cannot read it ({type(error).__name__})")
    try:
        return torch.load(path, map_location="cpu", weights_only=False,
                          pickle_module=_RestrictedPickle)
    except Exception as error:
        fail(f"{flag} {path}: cannot read it ({type(error).__name__}: {error})")


def tensor_dict(obj, keys=("model", "state_dict", "model_state_dict", "net", "params")):
    """The name -> tensor mapping in a loaded weight file (itself, or under one of `keys`)."""
    candidates = ([obj] + [obj.get(key) for key in keys]) if isinstance(obj, dict) else []
    return next((c for c in candidates if isinstance(c, dict) and c
                 and all(isinstance(v, torch.Tensor) for v in c.values())), None)


def fetch_weights(url, filename, log, is_main=True, barrier=None):
    """Path of `url` downloaded once into torch's hub cache (rank 0 downloads, others wait), or
    None after one log line when it cannot be had: training then starts from scratch."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    reason = None
    if is_main and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(path), progress=False)
        except Exception as error:  # offline, proxy, HTTP error: all mean 'no weights'
            reason = f"{type(error).__name__}: {str(error)[:80]}"
    if barrier is not None:
        barrier()
    if path.exists():
        return path
    log(f"pretrained: cannot download {url} ({reason or 'not found'}); "
        "training starts from scratch")
    return None


def load_matching(module, tensors, what, source, log, prefix=""):
    """Load the tensors of `tensors` whose names (minus `prefix`) and shapes fit `module`. Logs
    'what: 318 of 320 tensors from SOURCE'; returns (loaded, tensors in the module)."""
    own = module.state_dict()
    fits = {}
    for name, value in tensors.items():
        name = name[len(prefix):] if prefix and name.startswith(prefix) else name
        if name in own and tuple(own[name].shape) == tuple(value.shape):
            fits[name] = value
    if not fits:
        fail(f"--pretrained {source}: none of its {len(tensors)} tensors fits the {what}")
    module.load_state_dict(fits, strict=False)
    missing = [name for name in own if name not in fits]
    note = f" (not in the file: {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
    log(f"{what}: {len(fits)} of {len(own)} tensors from {source}" + (note if missing else ""))
    return len(fits), len(own)


def set_lr(optimizer, lr):
    """Set the learning rate of every parameter group (times the group's `lr_scale`, if any).

    Scripts compute each epoch's (or step's) rate from the epoch and the total `--epochs`, so a
    run resumed with a larger `--epochs` follows the new total's schedule from the next epoch on."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


# ---- Data loaders: every worker and every rank draws its own augmentation ----

def _reseed(dataset, seed, depth=0):
    """Give `dataset` (and datasets it wraps) a fresh `rng` seeded with `seed`."""
    if isinstance(getattr(dataset, "rng", None), random.Random):
        dataset.rng = random.Random(seed)
    if depth < 3:
        for value in vars(dataset).values() if hasattr(dataset, "__dict__") else ():
            if isinstance(value, torch.utils.data.Dataset):
                _reseed(value, seed, depth + 1)


def seed_worker(worker_id):
    """DataLoader `worker_init_fn`: seed this worker from the seed PyTorch gave it.

    PyTorch hands each worker base_seed + worker_id, base_seed drawn from the loader's generator,
    so workers differ from each other while a run with the same seed repeats itself. Defined at
    module level so that spawn/forkserver workers can unpickle it."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    _reseed(torch.utils.data.get_worker_info().dataset, seed)


def make_loader(dataset, batch_size, train, workers=0, seed=0, drop_last=False, context=None):
    """A DataLoader; in a torchrun job the training loader shards the data across processes.
    Augmentation draws from `dataset.rng`, reseeded here per rank and per worker by seed_worker."""
    rank = int(os.environ.get("RANK", 0))
    sampler = None
    if train and torch.distributed.is_available() and torch.distributed.is_initialized():
        sampler = torch.utils.data.distributed.DistributedSampler(dataset, shuffle=True, seed=seed)
    if train:
        _reseed(dataset, seed * 1000 + rank)  # the main process's stream when workers == 0
    generator = torch.Generator().manual_seed(seed * 1000 + rank)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
        num_workers=workers, drop_last=drop_last and train, generator=generator,
        worker_init_fn=seed_worker if workers > 0 else None,
        multiprocessing_context=context if workers > 0 else None,
        persistent_workers=workers > 0)


def progress(iterable, desc, enabled=True):
    """A tqdm progress bar on the main process (plain iterable elsewhere or if tqdm is absent)."""
    if not enabled or os.environ.get("NO_PROGRESS"):
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0)


# ---- The run: folder, log, checkpoints, resume ----

class Run:
    """One run: device, torchrun rank, the run folder and its files (config, log, metrics).

    The folder is made on the first file written, so a run stopped by bad input leaves nothing;
    its default name `runs/<script>/<time>-<pid>` is never shared by two runs. Only rank 0
    writes files and prints."""

    def __init__(self, args, script):
        self.args, self.script = args, script
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.distributed = self.world > 1
        self.device = choose_device(args.device)
        if self.distributed and not torch.distributed.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend)
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
        self.is_main = self.rank == 0
        self.best, self._made = None, False
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        name = [str(Path("runs") / script / f"{stamp}-{os.getpid()}")]
        if self.distributed:  # every rank reads files from rank 0's folder
            torch.distributed.broadcast_object_list(name, src=0)
        self.fixed = bool(args.out)
        self.path = Path(args.out) if args.out else Path(name[0])  # not made yet

    @property
    def out(self):
        """The run folder, made (with predictions/) on first use: after the inputs are checked."""
        return self.folder()

    def folder(self):
        """The run folder, made now if it does not exist yet (rank 0)."""
        if self.is_main and not self._made:
            try:
                if self.fixed:
                    self.path.mkdir(parents=True, exist_ok=True)
                else:
                    base, n = self.path, 1
                    while True:
                        try:
                            self.path.mkdir(parents=True)
                            break
                        except FileExistsError:  # another run took the name this very second
                            n += 1
                            self.path = base.with_name(f"{base.name}-{n}")
                (self.path / "predictions").mkdir(exist_ok=True)
            except OSError as error:
                fail(f"--out {self.path}: cannot create the run folder ({error.strerror})")
            self._made = True
        return self.path

    def log(self, *message):
        """Print on the main process."""
        if self.is_main:
            print(*message, flush=True)

    def save_json(self, name, obj):
        """Write `obj` as indented JSON into the run folder."""
        if self.is_main:
            (self.out / name).write_text(json.dumps(obj, indent=2, default=str) + "\n")

    def log_epoch(self, row):
        """Append one row (a dict) to log.csv, writing the header the first time."""
        if not self.is_main:
            return
        path = self.out / "log.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v)
                             for k, v in row.items()})

    def checkpoint(self, name, state):
        """Save `state` (plus the script name) atomically as <out>/<name> on the main process."""
        if self.is_main:
            save_checkpoint(self.out / name, dict(state, script=self.script))

    def restore(self, checkpoint, model, optimizer=None, scaler=None, path=None, prefix="",
                epochs=None):
        """Continue from a `--resume` checkpoint: load its states, return the next epoch.

        Resumed into a new folder, the run starts with the old run's best.pt beside it (or the
        resumed state, if there is none), so the best-so-far is never lost. `prefix`: that of
        end_epoch's files; `epochs`: the total logged (default args.epochs)."""
        unwrap(model).load_state_dict(checkpoint["model"])
        for part, key in ((optimizer, "optimizer"), (scaler, "scaler")):
            if part is not None and checkpoint.get(key):
                part.load_state_dict(checkpoint[key])
        self.best = checkpoint.get("best")
        source = Path(path or self.args.resume)
        best = f"{prefix}best.pt"
        if self.is_main and not (self.out / best).exists():
            old = source.parent / best
            if old.exists():
                shutil.copyfile(old, self.out / best)
            else:
                save_checkpoint(self.out / best, checkpoint)
        start = checkpoint["epoch"] + 1
        self.log(f"resumed from {source} at epoch {start} of {epochs or self.args.epochs}")
        return start

    def end_epoch(self, epoch, row, state, score=None, higher_is_better=True, prefix=""):
        """Log the epoch's row, write last.pt, and best.pt when `score` improves; True if it did.

        `score` None (or nan) means no validation: best.pt is then the last epoch. `prefix`
        names the files (e.g. "recon_": recon_last.pt, recon_best.pt) of a run with two stages;
        `self.best` is the current stage's (reset it to None between stages)."""
        if score is not None and math.isnan(score):
            score = None
        improved = (score is None or self.best is None
                    or (score > self.best if higher_is_better else score < self.best))
        if improved and score is not None:
            self.best = score
        self.log_epoch(row)
        self.log("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in row.items()))
        full = dict(state, epoch=epoch, best=self.best)
        self.checkpoint(f"{prefix}last.pt", full)
        if improved:
            self.checkpoint(f"{prefix}best.pt", full)
        self.barrier()
        return improved

    def final_weights(self, select="last"):
        """The model weights of this run's best.pt ('best') or last.pt ('last'), for the test."""
        state = load_checkpoint(self.out / f"{select}.pt", self.script, "test weights")
        self.log(f"testing {select}.pt (epoch {state.get('epoch')})")
        return state["model"]

    def barrier(self):
        """Wait for every process of a torchrun job."""
        if self.distributed:
            torch.distributed.barrier()

    def close(self):
        """Tear down the process group."""
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def unwrap(model):
    """The bare module inside a DistributedDataParallel wrapper."""
    return model.module if hasattr(model, "module") else model


def benchmark(model, train_step, infer_step, batch_size, device, repeats=3, **extra):
    """Time `train_step()` and `infer_step()` (one batch each; a warm-up call, then the median
    of `repeats` calls) and return the JSON record. Peak memory: the CUDA allocator's peak, else
    the process's peak resident set size."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(step):
        """Median seconds of one call after a warm-up call."""
        step()
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    params = sum(p.numel() for p in model.parameters())
    infer = timed(infer_step)
    train = timed(train_step) if train_step is not None else float("nan")
    peak_mb = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: KiB
    return {"params_M": round(params / 1e6, 3), "batch_size": batch_size,
            "train_images_per_s": round(batch_size / train, 3),
            "inference_images_per_s": round(batch_size / infer, 3),
            "peak_memory_MB": round(peak_mb, 1), "device": str(device),
            "threads": torch.get_num_threads(), **extra}


def check_conflicts(parser, args, rules, explicit):
    """Stop with one line when a flag given explicitly is made meaningless by the others.
    `rules`: (dests, condition, why) triples; the first dest in `explicit` of a rule whose
    condition holds fails as "--flag [VALUE] conflicts: why" (never silently ignored)."""
    flags = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
    for dests, condition, why in rules:
        given = [d for d in dests if d in explicit] if condition else []
        if given:
            value = getattr(args, given[0])
            fail(f"{flags[given[0]]}{'' if isinstance(value, bool) else f' {value}'} "
                 f"conflicts: {why}")


# ==== 7. Selective scan (Mamba's S6), used by cmssm_unet.py and mfel.py ====
#
# Public: selective_scan, selective_scan_reference, scan_backend, MAMBA_SSM_AVAILABLE, bench_scan.
# Shape letters: b batch, D channels (mamba-ssm's `dim`; the argument D is the skip vector),
# L sequence length, N state size, G groups of channels sharing one B (or C), H = D / G,
# T steps in one block of the fast path.

try:  # the authors' fused CUDA kernel (pip install mamba-ssm), used for CUDA tensors
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_selective_scan_fn
    MAMBA_SSM_AVAILABLE = True
except (ImportError, OSError):  # not installed, or built for another torch / CUDA
    _mamba_selective_scan_fn = None
    MAMBA_SSM_AVAILABLE = False

SCAN_BLOCK_ELEMENTS = 2 ** 18  # states (b T G N H) per block: 1 MB buffers, 2^17..2^18 fastest
SCAN_MIN_STEPS = 16  # steps per block at least: the forward keeps a state per block
SCAN_THREADS = 1  # intra-op threads of the fast path's ops (see "Fast path" below)
SCAN_BASELINE_REV = "86a2de48b070"  # bench-scan's baseline: the scan before issue 14


def scan_backend(u):
    """Name the path selective_scan takes for input u: "mamba_ssm" (CUDA kernel) or "torch"."""
    return "mamba_ssm" if MAMBA_SSM_AVAILABLE and u.is_cuda else "torch"


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False):
    """Selective scan with mamba-ssm's selective_scan_fn interface; see selective_scan_reference.

    Runs the authors' CUDA kernel when mamba-ssm is installed and u is on a GPU, otherwise the
    blocked pure-PyTorch scan (any device, float32 inside; float64 stays float64 for gradcheck).
    The torch path also back-propagates through the returned last state; the kernel does not.
    """
    if scan_backend(u) == "mamba_ssm":
        return _mamba_selective_scan_fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                        delta_softplus=delta_softplus,
                                        return_last_state=return_last_state)
    return _selective_scan_fast(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                return_last_state)


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                             delta_softplus=False, return_last_state=False):
    """The selective scan as a plain loop over time: the tests' oracle and the version to read.

    Mamba (Gu & Dao, 2023), Sec. 2 and 3.2, Alg. 2. For every batch item, channel d and step t:
        delta_t = softplus(delta_t + delta_bias)          (bias and softplus each optional)
        A_bar_t = exp(delta_t A)                          Eq. (4), zero-order hold (ZOH)
        B_bar_t = delta_t B_t                             Euler step: Mamba's simplification of
                                                          Eq. (4)'s ZOH B_bar (mamba issue #114)
        h_t = A_bar_t * h_{t-1} + B_bar_t u_t, h_{-1} = 0  Eq. (2a), elementwise over N (diagonal A)
        y_t = <C_t, h_t> + D u_t                          Eq. (2b) plus the skip term D
        out_t = y_t * silu(z_t)                           optional gate
    Args: u, delta, z (b, D, L); A (D, N); B, C (D, N) fixed, (b, N, L) or (b, G, N, L) varying,
    channel d using group d // (D / G); D, delta_bias (D,).
    Returns out (b, D, L) in u's dtype and, if return_last_state, h_{L-1} (b, D, N) in the
    compute dtype: float32 (float64 for float64 inputs, so that gradcheck works).
    """
    return _scan_with(_reference_core, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                      return_last_state)


def _reference_core(u, delta, A, B, C):
    """C_t h_t (b, D, L) and h_{L-1} (b, D, N) by the loop over time; autograd goes through it."""
    batch, dim, length = u.shape
    B, C = _bc_steps(B, dim, length), _bc_steps(C, dim, length)  # each step (b|1, D, N)
    h = u.new_zeros(batch, dim, A.shape[1])  # (b, D, N)
    ys = []
    for delta_t, u_t, B_t, C_t in zip(delta.unbind(-1), u.unbind(-1), B, C):
        A_bar = torch.exp(delta_t[..., None] * A)  # Eq. (4)  (b, D, N)
        B_bar = delta_t[..., None] * B_t  # Euler B_bar  (b, D, N)
        h = A_bar * h + B_bar * u_t[..., None]  # Eq. (2a)
        ys.append((C_t * h).sum(-1))  # Eq. (2b), C_t h_t  (b, D)
    return torch.stack(ys, dim=-1), h


def _bc_steps(x, dim, length):
    """B or C of any accepted shape, step by step as (b|1, D, N) tensors, for the reference loop."""
    if x.dim() == 2:  # (D, N): the same for every step
        return [x[None]] * length
    if x.dim() == 3:  # (b, N, L): one group shared by all channels
        x = x[:, None]
    # (b, G, N, L): channel d reads group d // (D / G); made one step at a time to save memory
    return (x_t.repeat_interleave(dim // x.shape[1], dim=1) for x_t in x.unbind(-1))


def _scan_with(core, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    """Run core(u, delta, A, B, C) -> (C_t h_t, h_{L-1}) inside the steps all paths share."""
    dtype = u.dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    u, delta, A, B, C = (x.to(compute) for x in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta = torch.nn.functional.softplus(delta)
    y, last_state = core(u, delta, A, B, C)  # (b, D, L), (b, D, N)
    if D is not None:
        y = y + D.to(compute)[:, None] * u
    if z is not None:
        y = y * torch.nn.functional.silu(z.to(compute))
    return (y.to(dtype), last_state) if return_last_state else y.to(dtype)


# ---- Fast path: the recurrence one step per op, everything else in tiles of steps ----
#
# Only h_t = A_bar_t h_{t-1} + B_bar_t u_t is sequential, and it is one in-place addcmul_ per
# step on a contiguous (b, G, N, H) state. The rest runs per tile of T steps as a few large
# ops on (b, T, G, N, H) buffers, time-major: A_bar = exp(delta A) and B_bar u for the whole
# tile, then y = C h as one batched matmul. A tile holds about SCAN_BLOCK_ELEMENTS states and
# at least SCAN_MIN_STEPS = 16 steps; where 16 steps of all channels would hold more (the
# short sequences of many channels), the channels are cut into slices of whole groups too
# (_tiles), which keeps a tile's buffers near the L2 cache's size. The forward keeps only u,
# delta and the state entering each tile: one per 16 steps or more, so that what a model's
# graph holds per scan stays small. The backward walks each slice's tiles from the end: it
# recomputes their states from those, runs the adjoint
# lambda_t = dLoss/dh_t = A_bar_{t+1} lambda_{t+1} + C_t dLoss/dy_t the same way backwards,
# and takes every gradient from a few tile-wide ops. Every factor is an A_bar_t =
# exp(delta_t A) <= 1 (delta >= 0, A < 0 in Mamba): no cumulative product, no division,
# nothing to overflow however long the sequence. Results overwrite time-major copies the
# tile has finished reading (y_t over delta_t u_t, dLoss/du_t over delta_t u_t, dLoss/ddelta_t
# over dLoss/dy_t): fewer fresh (b, L, D) tensors, each of which costs page faults.
#
# Why it is faster on a CPU than the chunked scan before it (issue 14, see bench_scan):
# - about 20 passes over the (L, D, N) states in all against about 30, three small ops per step
#   (one forward, two backward) against about 30, and buffers of about 1 MB; time-major copies
#   by 2-D transposes (torch's blocked kernel; the same copy as a 3-D transpose is several
#   times slower);
# - its ops run on SCAN_THREADS = 1 thread. Each touches at most a few MB, and with
#   OMP_WAIT_POLICY=PASSIVE (see "Threads") every op on two threads first wakes the sleeping
#   second thread, which cost more than the op saved (measured on two cores: 0.70 s -> 0.35 s
#   at L 4096, D 768).
# What is left is memory traffic (about 20 ops each reading and writing the whole (L, D, N)
# volume, mostly from the L3 cache) and about 3 us of dispatch per step, which only a fused
# kernel (mamba-ssm on a GPU, or a compiler) would avoid.


@contextlib.contextmanager
def _scan_threads():
    """Run the enclosed torch ops (or, as a decorator, a function's) on at most SCAN_THREADS
    threads, then restore the setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(min(previous, SCAN_THREADS))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _selective_scan_fast(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                         delta_softplus=False, return_last_state=False,
                         block_elements=SCAN_BLOCK_ELEMENTS, min_steps=SCAN_MIN_STEPS):
    """Pure-PyTorch selective scan in tiles of about block_elements states and at least
    min_steps steps (see _tiles; same results whatever the two)."""
    def core(u, delta, A, B, C):
        """Blocked scan core with its hand-written backward."""
        return _BlockScan.apply(u, delta, A, B, C, block_elements, min_steps)
    return _scan_with(core, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                      return_last_state)


def _time_major(x):
    """(b, P, Q) -> (b, Q, P) contiguous, by 2-D transposes per batch item (the fast copies)."""
    out = x.new_empty(x.shape[0], x.shape[2], x.shape[1])
    for out_item, x_item in zip(out, x):
        if min(x.shape[1:]) >= 512:  # large: 64 rows at a time stay in cache (up to 2x faster)
            for j in range(0, x.shape[1], 64):
                out_item[:, j:j + 64].copy_(x_item[j:j + 64].t())
        else:
            out_item.copy_(x_item.t())
    return out


def _own_groups(x, dim):
    """How many channel groups B or C x has: D if fixed (D, N), 1 if (b, N, L), else G."""
    return dim if x.dim() == 2 else 1 if x.dim() == 3 else x.shape[1]


def _operand_steps(x, groups):
    """B or C -> (b|1, L|1, G, N) time-major, each of its own groups repeated to fill G."""
    x = x[None, :, :, None] if x.dim() == 2 else x[:, None] if x.dim() == 3 else x
    batch, own, state, length = x.shape  # (b|1, G_x, N, L|1)
    x = _time_major(x.reshape(batch, own * state, length)).view(batch, length, own, state)
    return x.repeat_interleave(groups // own, dim=2) if own not in (1, groups) else x


def _operand_grad(grad, x):
    """dLoss/dB (b, L|1, G, N) in _operand_steps' layout -> the shape of the operand x."""
    batch, length, groups, state = grad.shape
    own = _own_groups(x, x.shape[0])
    grad = grad.unflatten(2, (own, groups // own)).sum(3)  # channels' groups back to x's
    if x.dim() == 2:  # fixed (D, N): summed over batch and steps
        return grad.sum((0, 1))
    return _time_major(grad.flatten(2)).view(x.shape)


def _steps(x, groups):
    """(b, L, D) -> (b, L, G, 1, H), a view."""
    return x.unflatten(2, (groups, -1)).unsqueeze(3)


def _scan_inputs(delta_t, du_t, A, B, C, groups):
    """What forward and backward read: time-major (b, L, G, 1, H) steps, A (G, N, H), B, C."""
    return dict(delta=_steps(delta_t, groups), du=_steps(du_t, groups),
                A=A.unflatten(0, (groups, -1)).transpose(1, 2).contiguous(),
                B=_operand_steps(B, groups), C=_operand_steps(C, groups))


def _tiles(batch, dim, state, groups, length, block_elements, min_steps):
    """How the fast path cuts the (L, D) plane: (groups, steps, slices).

    Blocks of `steps` steps, about block_elements states and at least min_steps, cover the
    sequence. Where min_steps steps of all channels hold more than block_elements states (the
    short sequences of many channels), the channels are cut too, into `slices` ranges of
    whole groups; the groups are refined (B and C repeated) where that needs more of them.
    """
    per_step = batch * dim * state
    steps = max(1, min(length, max(min_steps, block_elements // per_step)))
    wanted = -(-steps * per_step // block_elements)  # slices of about block_elements each
    for slices in (*range(wanted, 2 * wanted), *range(wanted - 1, 0, -1)):
        if dim % math.lcm(groups, slices) == 0:
            return math.lcm(groups, slices), steps, slices


def _tile(x, ts, gs):
    """Steps ts (axis 1) and groups gs (axis 2) of B or C; a fixed or shared one keeps its
    single step or group."""
    return x[:, ts if x.shape[1] > 1 else slice(None), gs if x.shape[2] > 1 else slice(None)]


def _run_states(decays, hs, start):
    """h_t = A_bar_t h_{t-1} + h[t] in place, h[t] holding B_bar_t u_t on entry; h_{-1} = start.

    decays, hs: the block's steps, as per-step views (made once per call, not per block)."""
    for decay_t, h_t in zip(decays, hs):
        start = h_t.addcmul_(decay_t, start)  # Eq. (2a)
    return start


def _run_adjoint(decays, lams, after):
    """lambda_t = A_bar_{t+1} lambda_{t+1} + lam[t] in place, backwards; `after` enters last.

    lam[t] holds C_t dLoss/dy_t on entry (decays, lams: per-step views, as in _run_states).
    Returns A_bar_0 lambda_0, what enters the block before (the gradient of the state entering
    this one).
    """
    lams[-1].add_(after)
    for lam_t, lam_next, decay_next in zip(lams[-2::-1], lams[:0:-1], decays[:0:-1]):
        lam_t.addcmul_(decay_next, lam_next)
    return decays[0] * lams[0]


def _operand_grad_into(grad, ts, gs, left, right):
    """A tile's dLoss/dB_t = left @ right (b, T, G, 1, N) into grad (b, L|1, G, N), summed over
    the steps if B is fixed."""
    if grad.shape[1] == 1:
        grad[:, :, gs] += torch.matmul(left, right)[..., 0, :].sum(1, keepdim=True)
    else:
        torch.matmul(left, right, out=grad[:, ts, gs].unsqueeze(3))


class _BlockScan(torch.autograd.Function):
    """y_t = C_t h_t and h_{L-1} of the recurrence h_t = A_bar_t h_{t-1} + delta_t B_t u_t."""

    @staticmethod
    @_scan_threads()
    def forward(ctx, u, delta, A, B, C, block_elements, min_steps):
        """u, delta (b, D, L), A (D, N), B, C as in selective_scan -> y (b, D, L), h (b, D, N)."""
        batch, dim, length = u.shape
        groups, steps, slices = _tiles(batch, dim, A.shape[1], math.lcm(
            _own_groups(B, dim), _own_groups(C, dim)), length, block_elements, min_steps)
        delta_t = _time_major(delta)  # (b, L, D)
        du_t = _time_major(u).mul_(delta_t)  # delta_t u_t, then y_t in its place, tile by tile
        inputs = _scan_inputs(delta_t, du_t, A, B, C, groups)
        A_t, y_steps = inputs["A"], _steps(du_t, groups)  # (G, N, H), (b, L, G, 1, H)
        blocks = [slice(t, min(t + steps, length)) for t in range(0, length, steps)]
        tile = (batch, steps, groups // slices, *A_t.shape[1:])  # (b, T, G / slices, N, H)
        decay_buf, h_buf = u.new_empty(tile), u.new_empty(tile)
        decay_steps, h_steps = decay_buf.unbind(1), h_buf.unbind(1)
        starts = u.new_empty(slices, len(blocks), batch, *tile[2:])  # h entering each tile
        starts[:, 0] = 0
        last = u.new_empty(batch, *A_t.shape)  # h_{L-1} (b, G, N, H)
        for k in range(slices):
            gs, start = slice(k * tile[2], (k + 1) * tile[2]), starts[k].unbind(0)
            for i, ts in enumerate(blocks):
                n = ts.stop - ts.start
                torch.mul(inputs["delta"][:, ts, gs], A_t[gs],
                          out=decay_buf[:, :n]).exp_()  # Eq. (4)
                h = torch.mul(inputs["du"][:, ts, gs], _tile(inputs["B"], ts, gs)[..., None],
                              out=h_buf[:, :n])  # B_bar_t u_t
                end = _run_states(decay_steps[:n], h_steps[:n], start[i])
                if i + 1 < len(blocks):
                    start[i + 1].copy_(end)
                torch.matmul(_tile(inputs["C"], ts, gs)[..., None, :], h,
                             out=y_steps[:, ts, gs])  # Eq. (2b), over du_t's read tile
            last[:, gs] = end
        ctx.save_for_backward(u, delta_t, A, B, C, starts)  # u, not u_t: the graph holds u
        ctx.blocks, ctx.groups = blocks, groups
        return _time_major(du_t), last.transpose(2, 3).reshape(batch, dim, -1)

    @staticmethod
    @_scan_threads()
    def backward(ctx, grad_y, grad_last):
        """Gradients of u, delta, A, B, C: tile by tile from the end, states recomputed."""
        u, delta_t, A, B, C, starts = ctx.saved_tensors
        groups, blocks, slices = ctx.groups, ctx.blocks, starts.shape[0]
        u_t = _time_major(u)
        du_t = u_t * delta_t  # then dLoss/du_t in its place, tile by tile
        inputs = _scan_inputs(delta_t, du_t, A, B, C, groups)
        A_t, u_steps, grad_u_steps = inputs["A"], _steps(u_t, groups), inputs["du"]
        grad_y_t = _time_major(grad_y)  # then dLoss/ddelta_t in its place
        grad_y = grad_delta_steps = _steps(grad_y_t, groups)  # (b, L, G, 1, H)
        afters = grad_last.unflatten(1, (groups, -1)).transpose(2, 3)  # (b, G, N, H)
        tile = (starts.shape[2], blocks[0].stop, *starts.shape[3:])  # (b, T, G / slices, N, H)
        decay_buf, lam_buf, grad_A_buf = (u.new_empty(tile) for _ in range(3))
        h_buf = u.new_empty(tile[0], tile[1] + 1, *tile[2:])  # h_{t-1}: a step more
        decay_steps, h_steps, lam_steps = (x.unbind(1) for x in (decay_buf, h_buf, lam_buf))
        grad_A = A.new_empty(A_t.shape)
        grad_B, grad_C = (u.new_zeros(len(u), inputs[k].shape[1], *A_t.shape[:2])
                          for k in "BC")  # (b, L|1, G, N)
        for k in range(slices):
            gs, start = slice(k * tile[2], (k + 1) * tile[2]), starts[k].unbind(0)
            after = afters[:, gs]
            grad_A_buf.zero_()  # the slice's dLoss/dA sums over its tiles
            for i in reversed(range(len(blocks))):
                ts, n = blocks[i], blocks[i].stop - blocks[i].start
                delta_ts, du_ts, grad_y_ts = (x[:, ts, gs] for x in (inputs["delta"], inputs["du"],
                                                                     grad_y))
                B_ts = _tile(inputs["B"], ts, gs)
                decay = torch.mul(delta_ts, A_t[gs], out=decay_buf[:, :n]).exp_()
                h = h_buf[:, :n + 1]  # h[:, t] = h_{t-1}: the tile's start, then its states
                h_steps[0].copy_(start[i])
                torch.mul(du_ts, B_ts[..., None], out=h[:, 1:])
                _run_states(decay_steps[:n], h_steps[1:n + 1], h_steps[0])
                # dLoss/dC_t, dLoss/dB_t: sums over each group's channels of dy_t h_t, lambda_t du_t
                _operand_grad_into(grad_C, ts, gs, grad_y_ts, h[:, 1:].transpose(-1, -2))
                lam = torch.mul(grad_y_ts, _tile(inputs["C"], ts, gs)[..., None],
                                out=lam_buf[:, :n])  # C_t dLoss/dy_t
                after = _run_adjoint(decay_steps[:n], lam_steps[:n], after)
                _operand_grad_into(grad_B, ts, gs, du_ts, lam.transpose(-1, -2))
                lam_B = torch.matmul(B_ts[..., None, :], lam)  # <lambda_t, B_t> (b, T, G, 1, H)
                # dLoss/da_t = lambda_t A_bar_t h_{t-1} for a_t = delta_t A, as A_bar_t = exp(a_t)
                grad_a = decay.mul_(lam).mul_(h[:, :-1])
                grad_A_buf[:, :n].addcmul_(grad_a, delta_ts)
                # delta_t reaches a_t = delta_t A and B_bar_t u_t = delta_t B_t u_t; u_t the
                # latter. Both overwrite inputs this tile has read: dy_t, du_t.
                torch.sum(grad_a.mul_(A_t[gs]), 3, keepdim=True,
                          out=grad_delta_steps[:, ts, gs]).addcmul_(lam_B, u_steps[:, ts, gs])
                torch.mul(lam_B, delta_ts, out=grad_u_steps[:, ts, gs])
            grad_A[gs] = grad_A_buf.sum((0, 1))
        return (_time_major(du_t), _time_major(grad_y_t), grad_A.transpose(1, 2).reshape(A.shape),
                _operand_grad(grad_B, B), _operand_grad(grad_C, C), None, None)


# ---- Benchmark: python common.py bench-scan ----

SCAN_BENCH_SIZES = [dict(batch=1, dim=dim, length=length, state=16, groups=4)  # cmssm_unet's
                    for dim, length in ((768, 4096), (1536, 1024), (3072, 256), (6144, 64))]


def _scan_bench_inputs(batch, dim, length, state, groups):
    """Random scan inputs with Mamba's statistics (S4D-real A, dt bias of 0.001..0.1, softplus)."""
    generator = torch.Generator().manual_seed(0)
    dt = torch.exp(torch.rand(dim, generator=generator) * math.log(100) + math.log(1e-3))
    return dict(
        u=torch.randn(batch, dim, length, generator=generator),
        delta=0.1 * torch.randn(batch, dim, length, generator=generator),
        A=-torch.arange(1, state + 1.0).repeat(dim, 1),  # A = -exp(A_log), A_log = log(1..N)
        B=torch.randn(batch, groups, state, length, generator=generator),
        C=torch.randn(batch, groups, state, length, generator=generator),
        D=torch.ones(dim),
        delta_bias=dt + torch.log(-torch.expm1(-dt)),  # inverse softplus of dt
        delta_softplus=True)


def _scan_at_revision(rev):
    """This section's pure-PyTorch scan as of git revision rev (the baseline), or None."""
    import subprocess  # only here: the rest of common.py never calls git
    try:
        source = subprocess.run(["git", "show", f"{rev}:common.py"], capture_output=True,
                                text=True, check=True, cwd=Path(__file__).resolve().parent).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    namespace = dict(math=math, json=json, time=time, torch=torch)
    section = source.split("\n# ==== 7. ")[1].split("\n# ==== 8. ")[0]
    exec("#" + section, namespace)  # its section 7, from the title line's end
    return namespace.get("_selective_scan_chunked")


def _peak_tensor_mib(fn):
    """Peak of live torch CPU allocations while fn() runs, in MiB, from the profiler's events."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as profiler:
        fn()
    events = profiler.profiler.kineto_results.events()
    changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in changes:
        live += nbytes
        peak = max(peak, live)
    return peak / 2 ** 20


def _forward_backward(scan, leaves, grad_out):
    """One training step of the scan alone: forward, then backward into every input."""
    scan(**leaves).backward(grad_out)
    for value in leaves.values():
        if torch.is_tensor(value):
            value.grad = None


def bench_scan(sizes=None, baseline_rev=SCAN_BASELINE_REV, repeats=5):
    """Time forward+backward of the scan against its baseline on the CPU; one JSON line per size.

    sizes: dicts with batch, dim, length, state, groups (default SCAN_BENCH_SIZES, the four
    calls of cmssm_unet's paper preset at 256 x 256). The baseline is this section's scan as of
    git revision baseline_rev (its fields are left out outside a git checkout). Both run in
    turn in every repeat, so that a noisy machine slows both alike. Figures: medians over the
    repeats of the wall ("_s") and process CPU ("_cpu_s", all threads) seconds of a forward and
    a backward into every input, and "_peak_mib", the peak of live tensor memory during one,
    counted from torch.profiler's allocation events (tensors only, not the allocator's cache).
    """
    baseline = _scan_at_revision(baseline_rev) if baseline_rev else None
    for size in sizes or SCAN_BENCH_SIZES:
        inputs = _scan_bench_inputs(**size)
        leaves = {k: v.clone().requires_grad_() if torch.is_tensor(v) else v
                  for k, v in inputs.items()}
        grad_out = torch.randn_like(inputs["u"])
        scans = dict(baseline=baseline, fast=_selective_scan_fast)
        runs = {name: lambda scan=scan: _forward_backward(scan, leaves, grad_out)
                for name, scan in scans.items() if scan is not None}
        times = {name: [] for name in runs}
        for repeat in range(repeats + 1):  # round 0 warms up
            for name, run in runs.items():
                wall, cpu = time.perf_counter(), time.process_time()
                run()
                times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
        result, raw = dict(bench="selective_scan", **size, threads=torch.get_num_threads(),
                           repeats=repeats, baseline=baseline_rev if baseline else None), {}
        for name, run in runs.items():
            wall, cpu = (sorted(column[1:])[repeats // 2] for column in zip(*times[name]))
            raw.update({f"{name}_s": wall, f"{name}_cpu_s": cpu,
                        f"{name}_peak_mib": _peak_tensor_mib(run)})
        result.update({key: float(f"{value:.4g}") for key, value in raw.items()})
        if baseline:
            result.update(speedup_s=round(raw["baseline_s"] / raw["fast_s"], 2),
                          speedup_cpu_s=round(raw["baseline_cpu_s"] / raw["fast_cpu_s"], 2),
                          memory_ratio=round(raw["fast_peak_mib"] / raw["baseline_peak_mib"], 3))
        print(json.dumps(result), flush=True)


# ==== 8. Command line of this file ====

def main(argv=None):
    """`toy` writes the toy data set; `bench-scan` benchmarks the selective scan."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    toy = commands.add_parser("toy", help="write the toy data set to a folder")
    toy.add_argument("--out", required=True)
    toy.add_argument("--kind", choices=["binary", "multiclass"], default="binary")
    toy.add_argument("--n", type=int, default=100)
    toy.add_argument("--size", type=int, default=256)
    toy.add_argument("--seed", type=int, default=0)
    commands.add_parser("bench-scan", help="time the selective scan (JSON lines)")
    args = parser.parse_args(argv)
    if args.command == "toy":
        out = write_toy(args.out, args.kind, args.n, args.size, args.seed)
        print(f"wrote {args.n} {args.kind} toy samples to {out}")
    else:
        bench_scan()


if __name__ == "__main__":
    cli(main)
