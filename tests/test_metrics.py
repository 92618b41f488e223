"""Tests of the metrics in common.py: hand-worked cases (the working is in the comments) and
reference values recorded once from MedPy and PySODMetrics (tests/fixtures/metrics_reference.json,
written by tests/fixtures/record_metrics_reference.py, which says which library, version and
function gave each number). No expected value here is computed with common.py's own formulas.
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import common

REFERENCE = json.loads((Path(__file__).parent / "fixtures" / "metrics_reference.json").read_text())
POLYP = REFERENCE["polyp"]["images"]  # PySODMetrics 1.6.2, see REFERENCE["polyp"]["_source"]
SURFACES = {name: case for name, case in REFERENCE["surfaces"].items()
            if not name.startswith("_")}  # MedPy 0.5.2, see REFERENCE["surfaces"]["_source"]


def polyp_case(name):
    """(prob float64, gt bool) of a recorded PySODMetrics case, exactly as the library saw it."""
    case = POLYP[name]
    return np.array(case["prob"], np.float64), np.array(case["gt"], bool)


def square(shape, rows, cols):
    """Boolean mask of `shape` with True on the rectangle rows x cols (Python slices)."""
    mask = np.zeros(shape, bool)
    mask[rows, cols] = True
    return mask


def points(shape, *coords):
    """Boolean mask of `shape` with True at the given voxel coordinates."""
    mask = np.zeros(shape, bool)
    for coord in coords:
        mask[coord] = True
    return mask


# ---- Binary masks ----

def test_offset_squares_all_binary_scores():
    # pred rows 0-3 x cols 0-3, gt rows 2-5 x cols 2-5 in an 8x8 image (16 pixels each).
    # Overlap rows 2-3 x cols 2-3: tp = 4; fp = 16 - 4 = 12; fn = 12; tn = 64 - 28 = 36.
    pred = square((8, 8), slice(0, 4), slice(0, 4))
    gt = square((8, 8), slice(2, 6), slice(2, 6))
    assert common.confusion(pred, gt) == (4, 12, 12, 36)
    assert common.dice(pred, gt) == pytest.approx(8 / 32)  # 2tp / (2tp + fp + fn) = 0.25
    assert common.iou(pred, gt) == pytest.approx(4 / 28)  # tp / (tp + fp + fn) = 1/7
    assert common.precision(pred, gt) == pytest.approx(4 / 16)
    assert common.recall(pred, gt) == pytest.approx(4 / 16)
    assert common.specificity(pred, gt) == pytest.approx(36 / 48)  # tn / (tn + fp)
    assert common.accuracy(pred, gt) == pytest.approx(40 / 64)  # (tp + tn) / N


def test_unequal_masks_separate_precision_from_recall():
    # pred 4x4 at rows 1-4 x cols 1-4 (16 px), gt 2x4 at rows 1-2 x cols 3-6 (8 px);
    # overlap rows 1-2 x cols 3-4 = 4: tp 4, fp 12, fn 4, tn 64 - 20 = 44.
    pred = square((8, 8), slice(1, 5), slice(1, 5))
    gt = square((8, 8), slice(1, 3), slice(3, 7))
    scores = common.scores_from_confusion(*common.confusion(pred, gt))
    expected = {"dice": 8 / 24, "iou": 4 / 20, "precision": 4 / 16, "recall": 4 / 8,
                "specificity": 44 / 56, "accuracy": 48 / 64}
    assert scores == pytest.approx(expected)
    # uint8 0/255 masks and torch tensors give the same numbers as bool arrays.
    assert common.dice(torch.from_numpy(pred), (gt * 255).astype(np.uint8)) == pytest.approx(1 / 3)


def test_empty_mask_conventions():
    n = 16
    # Both empty: the masks agree, every 0/0 ratio is 1.
    assert common.scores_from_confusion(0, 0, 0, n) == dict.fromkeys(
        ["dice", "iou", "precision", "recall", "specificity", "accuracy"], 1.0)
    # Empty prediction, 5 gt pixels: precision 0/0 with fn > 0 -> 0; recall 0/5 = 0; dice 0.
    missed = common.scores_from_confusion(0, 0, 5, n - 5)
    assert (missed["precision"], missed["recall"], missed["dice"]) == (0.0, 0.0, 0.0)
    # Empty gt, 3 false positives: recall 0/0 with fp > 0 -> 0; specificity 13/16.
    false_alarm = common.scores_from_confusion(0, 3, 0, n - 3)
    assert (false_alarm["recall"], false_alarm["iou"]) == (0.0, 0.0)
    assert false_alarm["specificity"] == pytest.approx(13 / 16)
    # All-foreground gt: specificity 0/0 -> 1 if the prediction is all foreground, else 0.
    assert common.scores_from_confusion(n, 0, 0, 0)["specificity"] == 1.0
    assert common.scores_from_confusion(n - 1, 0, 1, 0)["specificity"] == 0.0
    assert common.dice(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0


def test_shape_mismatch_and_logits_are_refused():
    with pytest.raises(ValueError, match="differ in shape"):
        common.dice(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        common.mae(np.full((2, 2), 3.0), np.zeros((2, 2)))


# ---- Surface distances ----

def test_single_pixels_three_apart():
    # A one-pixel mask is its own surface: every distance is 3, so hd95 = asd = assd = 3.
    a, b = points((6, 8), (2, 2)), points((6, 8), (2, 5))
    assert common.hd95(a, b) == pytest.approx(3.0)
    assert common.asd(a, b) == pytest.approx(3.0)
    assert common.assd(a, b) == pytest.approx(3.0)


def test_anisotropic_spacing_2d():
    # Offsets 3 rows and 4 columns: sqrt(3^2 + 4^2) = 5 voxels; with spacing (2, 0.5) per
    # (row, column): sqrt((3 * 2)^2 + (4 * 0.5)^2) = sqrt(36 + 4) = sqrt(40).
    a, b = points((8, 8), (1, 1)), points((8, 8), (4, 5))
    assert common.hd95(a, b) == pytest.approx(5.0)
    assert common.hd95(a, b, spacing=(2.0, 0.5)) == pytest.approx(math.sqrt(40))
    assert common.asd(a, b, spacing=2.0) == pytest.approx(10.0)  # one number = every axis


def test_square_against_shifted_square():
    # 3x3 squares at rows 2-4, cols 2-4 and cols 4-6: each surface is the ring of 8 pixels (the
    # centre is eroded). From a's ring to b's: the column-2 pixels are 2 away (3 of them), the
    # column-3 pixels (2,3), (4,3) are 1 away, the column-4 pixels 0 (3): mean 8 / 8 = 1.
    # Symmetric, so asd = assd = 1; pooled 16 distances: six 0s, four 1s, six 2s -> the 95th
    # percentile sits at position 0.95 * 15 = 14.25, between two 2s: hd95 = 2.
    a = square((8, 10), slice(2, 5), slice(2, 5))
    b = square((8, 10), slice(2, 5), slice(4, 7))
    assert common.asd(a, b) == pytest.approx(1.0)
    assert common.asd(b, a) == pytest.approx(1.0)
    assert common.hd95(a, b) == pytest.approx(2.0)


def test_pixel_inside_square_asd_is_directional():
    # a = centre pixel (3, 3); b = the 3x3 square around it, whose surface is its ring of 8.
    # a -> b: 1 (four ring pixels touch the centre). b -> a: four edge pixels at 1 and four
    # corners at sqrt(2): mean (4 + 4 sqrt 2) / 8. assd = mean of the two directions.
    # Pooled: five 1s then four sqrt(2)s; position 0.95 * 8 = 7.6 lies among the sqrt(2)s.
    a = points((7, 7), (3, 3))
    b = square((7, 7), slice(2, 5), slice(2, 5))
    b_to_a = (4 + 4 * math.sqrt(2)) / 8
    assert common.asd(a, b) == pytest.approx(1.0)
    assert common.asd(b, a) == pytest.approx(b_to_a)
    assert common.assd(a, b) == pytest.approx((1 + b_to_a) / 2)
    assert common.hd95(a, b) == pytest.approx(math.sqrt(2))


def test_hd95_interpolates_between_distances():
    # a = (0, 0); b = (0, 3), (0, 4) (a two-pixel line is all surface). a -> b: [3];
    # b -> a: [3, 4]. np.percentile([3, 3, 4], 95): position 0.95 * 2 = 1.9 -> 3 + 0.9 = 3.9.
    a, b = points((3, 6), (0, 0)), points((3, 6), (0, 3), (0, 4))
    assert common.hd95(a, b) == pytest.approx(3.9)
    assert common.asd(b, a) == pytest.approx(3.5)
    assert common.assd(a, b) == pytest.approx(3.25)


def test_3d_voxel_and_cube():
    # Single voxels at (0,0,0) and (2,3,6): sqrt(4 + 9 + 36) = 7; with spacing (3, 1, 1):
    # sqrt(36 + 9 + 36) = 9.
    a, b = points((4, 5, 8), (0, 0, 0)), points((4, 5, 8), (2, 3, 6))
    assert common.hd95(a, b) == pytest.approx(7.0)
    assert common.hd95(a, b, spacing=(3, 1, 1)) == pytest.approx(9.0)
    # Centre voxel vs the 3x3x3 cube around it: the cube's surface is its 26 outer voxels
    # (6-neighbour erosion keeps only the centre): 6 face centres at 1, 12 edges at sqrt(2),
    # 8 corners at sqrt(3). Pooled with the centre's own 1: 7 ones, 12 sqrt(2), 8 sqrt(3);
    # position 0.95 * 26 = 24.7 is among the sqrt(3)s.
    centre = points((5, 5, 5), (2, 2, 2))
    cube = np.zeros((5, 5, 5), bool)
    cube[1:4, 1:4, 1:4] = True
    assert common.asd(cube, centre) == pytest.approx(
        (6 + 12 * math.sqrt(2) + 8 * math.sqrt(3)) / 26)
    assert common.hd95(centre, cube) == pytest.approx(math.sqrt(3))
    # Spacing 2 along the first axis: 2 face centres at 2, 4 at 1; 8 edges at sqrt(5),
    # 4 at sqrt(2); 8 corners at sqrt(6).
    assert common.asd(cube, centre, spacing=(2, 1, 1)) == pytest.approx(
        (2 * 2 + 4 + 8 * math.sqrt(5) + 4 * math.sqrt(2) + 8 * math.sqrt(6)) / 26)


def test_surface_uses_connectivity_one():
    # A plus sign of 5 pixels: its centre has all 4 edge neighbours, so the 4-neighbour erosion
    # removes it and the surface is the 4 arms (an 8-neighbour erosion would keep the centre
    # on the surface). Against the centre pixel alone: every arm is 1 away, the centre 1 away
    # from the nearest arm, so asd = hd95 = 1 (with the centre on the surface asd would be 0.8).
    plus = points((7, 7), (3, 3), (2, 3), (4, 3), (3, 2), (3, 4))
    centre = points((7, 7), (3, 3))
    assert common.asd(plus, centre) == pytest.approx(1.0)
    assert common.hd95(plus, centre) == pytest.approx(1.0)


def test_mask_on_the_image_border_and_padding():
    # MedPy's erosion treats outside the array as background, so a mask touching the border has
    # its border pixels on the surface, exactly as if the image were padded with zeros.
    # 2x3 block in the corner (rows 0-1, cols 0-2): all 6 pixels are surface. Against the
    # pixel (1, 5): distances 5, 4, 3 on row 1 and sqrt(26), sqrt(17), sqrt(10) on row 0.
    corner = square((4, 6), slice(0, 2), slice(0, 3))
    pixel = points((4, 6), (1, 5))
    expected = (5 + 4 + 3 + math.sqrt(26) + math.sqrt(17) + math.sqrt(10)) / 6
    assert common.asd(corner, pixel) == pytest.approx(expected)
    padded = [np.pad(mask, 5) for mask in (corner, pixel)]
    assert common.asd(*padded) == pytest.approx(expected)
    assert common.hd95(*padded) == pytest.approx(common.hd95(corner, pixel))


def test_surface_distance_of_empty_masks_is_nan():
    full = square((5, 5), slice(1, 3), slice(1, 3))
    empty = np.zeros((5, 5), bool)
    assert math.isnan(common.hd95(full, empty))
    assert math.isnan(common.asd(empty, full))
    assert math.isnan(common.assd(empty, empty))


# MedPy reference (tests/fixtures, MedPy 0.5.2 medpy.metric.binary, connectivity 1): 2D and 3D,
# non-square, isotropic and anisotropic spacing, one-pixel objects and objects on the border.

@pytest.mark.parametrize("name", sorted(SURFACES))
def test_surface_distances_and_overlaps_match_medpy(name):
    case = SURFACES[name]
    pred, gt, spacing = np.array(case["pred"], bool), np.array(case["gt"], bool), case["spacing"]
    assert common.hd95(pred, gt, spacing) == pytest.approx(case["hd95"], rel=1e-12)
    assert common.hd95(gt, pred, spacing) == pytest.approx(case["hd95"], rel=1e-12)
    # asd is directional: MedPy's asd(result, reference) averages over the result's surface.
    assert common.asd(pred, gt, spacing) == pytest.approx(case["asd_pred_to_gt"], rel=1e-12)
    assert common.asd(gt, pred, spacing) == pytest.approx(case["asd_gt_to_pred"], rel=1e-12)
    assert common.dice(pred, gt) == pytest.approx(case["dc"], rel=1e-12)
    assert common.iou(pred, gt) == pytest.approx(case["jc"], rel=1e-12)
    assert common.precision(pred, gt) == pytest.approx(case["precision"], rel=1e-12)
    assert common.recall(pred, gt) == pytest.approx(case["recall"], rel=1e-12)
    assert common.specificity(pred, gt) == pytest.approx(case["specificity"], rel=1e-12)


@pytest.mark.parametrize("name", ["blobs_2d", "blobs_3d_anisotropic", "tiny_2d_anisotropic"])
def test_assd_is_the_mean_of_medpys_two_directions(name):
    # common.assd is MedPy <= 0.4's (asd(a, b) + asd(b, a)) / 2, from the two recorded asd values;
    # MedPy 0.5's assd (the mean of the pooled distances, also recorded) differs when the two
    # surfaces have different sizes, as here.
    case = SURFACES[name]
    pred, gt, spacing = np.array(case["pred"], bool), np.array(case["gt"], bool), case["spacing"]
    expected = (case["asd_pred_to_gt"] + case["asd_gt_to_pred"]) / 2
    assert common.assd(pred, gt, spacing) == pytest.approx(expected, rel=1e-12)
    assert expected != pytest.approx(case["assd_medpy_0.5"], rel=1e-6)


def test_empty_masks_against_medpy():
    # MedPy raises RuntimeError ("does not contain any binary object") for hd95/asd with an empty
    # mask; common returns nan so that the meters can apply a paper's convention.
    case = REFERENCE["surfaces"]["_empty_masks"]
    empty, some = np.array(case["pred"], bool), np.array(case["gt"], bool)
    assert case["hd95_empty_pred"].startswith("RuntimeError")
    assert case["asd_empty_gt"].startswith("RuntimeError")
    assert math.isnan(common.hd95(empty, some)) and math.isnan(common.asd(some, empty))
    assert common.dice(empty, some) == case["dc_empty_pred"] == 0.0
    # Two empty masks: MedPy's jc says 1.0, as common does for dice and iou. (MedPy 0.5.2's dc and
    # precision return nan there under numpy 2, a 0/0 that their ZeroDivisionError guard misses.)
    assert common.iou(empty, empty) == case["jc_both_empty"] == 1.0
    assert common.dice(empty, empty) == 1.0


# ---- Probability maps (polyp benchmark) ----

def test_mae():
    # |0.2 - 0| + |0.8 - 1| + |1 - 1| + |0 - 1| = 0.2 + 0.2 + 0 + 1 = 1.4, over 4 pixels.
    prob = np.array([[0.2, 0.8], [1.0, 0.0]])
    gt = np.array([[0, 1], [1, 1]])
    assert common.mae(prob, gt) == pytest.approx(0.35)


def test_dice_iou_curves_by_hand():
    # gt = top row. prob [[1, 0.25], [0.75, 0]] -> levels floor(255 P) = [[255, 63], [191, 0]].
    # Entry i binarises level >= 255 - i:
    #   i = 0..63    (levels 255..192): {(0,0)}:          tp 1 fp 0 fn 1 -> Dice 2/3, IoU 1/2
    #   i = 64..191  (191..64):  + (1,0), a false pos.:   tp 1 fp 1 fn 1 -> Dice 1/2, IoU 1/3
    #   i = 192..254 (63..1):    + (0,1), the missed one: tp 2 fp 1 fn 0 -> Dice 4/5, IoU 2/3
    #   i = 255      (0):        every pixel:             tp 2 fp 2 fn 0 -> Dice 2/3, IoU 1/2
    prob = np.array([[1.0, 0.25], [0.75, 0.0]])
    gt = np.array([[1, 1], [0, 0]])
    dice_curve, iou_curve = common.dice_iou_curves(prob, gt)
    counts = [64, 128, 63, 1]
    assert dice_curve.shape == iou_curve.shape == (256,)
    np.testing.assert_allclose(dice_curve, np.repeat([2 / 3, 1 / 2, 4 / 5, 2 / 3], counts))
    np.testing.assert_allclose(iou_curve, np.repeat([1 / 2, 1 / 3, 2 / 3, 1 / 2], counts))
    # mDice of this one image = (65 * 2/3 + 128 * 1/2 + 63 * 4/5) / 256.
    assert dice_curve.mean() == pytest.approx((65 * 2 / 3 + 64 + 63 * 0.8) / 256)
    # Empty gt: tp = 0 at every threshold, so the toolbox scores 0 both where the binarised map
    # has false positives (0 / fp) and where it is empty too (0 / 0, levels above 191 here): the
    # MATLAB toolbox's Fmeasure_calu sets Dice = IoU = 0 whenever tp = 0, PySODMetrics' divide
    # gives 0 for 0/0. (Scoring two empty masks 1, as common.dice does, would lift mDice.)
    empty_curves = common.dice_iou_curves(np.array([[0.75, 0.0, 0.25]]), np.zeros((1, 3)))
    np.testing.assert_array_equal(empty_curves, np.zeros((2, 256)))


def test_e_measure_by_hand():
    # gt = top row of 2x2, binary map F = [[1, 0], [0, 0]]: mean F = 1/4, mean G = 1/2.
    # tp pixel: a = 3/4, b = 1/2 -> phi = 2ab / (a^2 + b^2) = 0.75 / 0.8125 = 12/13,
    #           psi = (25/13)^2 / 4 = 625/676
    # fn pixel: a = -1/4, b = 1/2 -> phi = -0.25 / 0.3125 = -0.8, psi = 0.2^2 / 4 = 0.01
    # 2 tn pixels: a = -1/4, b = -1/2 -> phi = 0.8, psi = 1.8^2 / 4 = 0.81
    # E = (625/676 + 0.01 + 1.62) / (N - 1) with N = 4.
    prob = np.array([[1.0, 0.0], [0.0, 0.0]])
    gt = np.array([[1, 1], [0, 0]])
    expected = (625 / 676 + 0.01 + 1.62) / 3
    curve = common.e_measure_curve(prob, gt)
    assert curve.shape == (256,)
    np.testing.assert_allclose(curve[:255], expected)  # levels >= 255 .. >= 1: F as above
    # Adaptive threshold min(2 * mean(P), 1) = 0.5 gives the same binary map.
    assert common.adaptive_e_measure(prob, gt) == pytest.approx(expected)
    # A pixel exactly at the adaptive threshold is foreground (the toolboxes binarise P >= T).
    # P = [0.5, 0.25, 0.25, 0]: mean 1/4, T = 1/2, so F = [1, 0, 0, 0] = G: psi = 1 on all four
    # pixels, E = 4 / 3. (With P > T, F would be empty: phi = 0, psi = 1/4, E = 1/3.)
    row_gt = np.array([[1, 0, 0, 0]])
    assert common.adaptive_e_measure(np.array([[0.5, 0.25, 0.25, 0.0]]), row_gt) == (
        pytest.approx(4 / 3))


def test_e_measure_of_perfect_and_empty_cases():
    gt = square((6, 6), slice(1, 4), slice(2, 5))
    n = gt.size
    curve = common.e_measure_curve(gt.astype(float), gt)
    # F = G at every threshold but the last: psi = 1 on all N pixels, E = N / (N - 1), just
    # above 1 (the toolboxes divide by N - 1). At level >= 0 everything is foreground:
    # F - mean F = 0, so phi = 0, psi = 1/4 and E = (N / 4) / (N - 1).
    np.testing.assert_allclose(curve[:255], n / (n - 1))
    assert curve[255] == pytest.approx(n / 4 / (n - 1))
    # Empty gt: psi = 1 - F. An all-zero map is right at every threshold but the last.
    empty_curve = common.e_measure_curve(np.zeros((6, 6)), np.zeros((6, 6)))
    np.testing.assert_allclose(empty_curve[:255], n / (n - 1))
    assert empty_curve[255] == pytest.approx(0.0)


def test_s_measure_special_cases():
    prob = np.array([[0.2, 0.4], [0.6, 0.0]])  # mean 0.3
    assert common.s_measure(prob, np.zeros((2, 2))) == pytest.approx(0.7)  # 1 - mean(P)
    assert common.s_measure(prob, np.ones((2, 2))) == pytest.approx(0.3)  # mean(P)
    gt = square((8, 8), slice(2, 5), slice(3, 7))
    assert common.s_measure(gt.astype(float), gt) == pytest.approx(1.0)


def test_s_measure_object_term_uses_sample_std():
    # gt = left column of a 2x2; P = 0.2, 0.6 on it, 0 on the background (1 - P = 1 there: 1).
    # Foreground: mean 0.4, sample std sqrt((0.2^2 + 0.2^2) / (2 - 1)) = sqrt(0.08):
    # O_fg = 0.8 / (0.16 + 1 + sqrt(0.08)); S_o = 0.5 O_fg + 0.5 * 1 (alpha = 1: object term only).
    gt = np.array([[1, 0], [1, 0]])
    prob = np.array([[0.2, 0.0], [0.6, 0.0]])
    o_fg = 0.8 / (0.16 + 1 + math.sqrt(0.08))
    assert common.s_measure(prob, gt, alpha=1.0) == pytest.approx(0.5 * o_fg + 0.5)


def test_s_measure_by_hand():
    # gt = left half of a 4x4 (columns 0-1); P = 0.5 on the gt, 0 elsewhere.
    # Object: on G, mean 0.5 and std 0 -> 2 * 0.5 / (0.25 + 1) = 0.8; on not G, 1 - P = 1 -> 1.
    #   S_o = 0.5 * 0.8 + 0.5 * 1 = 0.9.
    # Region: centroid (1.5, 0.5) -> np.round (half to even) (2, 0) -> +1 -> cut at (3, 1).
    #   Blocks [0:3, 0:1] (3 px) and [3:4, 0:1] (1 px): constant P and G -> 0/0 -> ssim 1.
    #   Blocks [0:3, 1:4] (9 px) and [3:4, 1:4] (3 px): P = G / 2, so the luminance term
    #   2xy / (x^2 + y^2) = 0.8 and the contrast-structure term 2 s_xy / (s_x^2 + s_y^2) = 0.8:
    #   ssim 0.64. S_r = (3 + 1) / 16 * 1 + (9 + 3) / 16 * 0.64 = 0.73.
    gt = square((4, 4), slice(0, 4), slice(0, 2))
    prob = 0.5 * gt
    assert common.s_measure(prob, gt, alpha=1.0) == pytest.approx(0.9)
    assert common.s_measure(prob, gt, alpha=0.0) == pytest.approx(0.73)
    assert common.s_measure(prob, gt) == pytest.approx(0.815)


def test_s_measure_with_the_centroid_on_the_last_row():
    # gt = the bottom-right pixel of a 2x3, P = 0.5 there. Object: O_fg = 2 * 0.5 / (0.25 + 1)
    # = 0.8, O_bg = 1 (1 - P = 1 on the five others): S_o = 1/6 * 0.8 + 5/6 = 29/30. Region: the
    # centroid (1, 2) + 1 cuts at (2, 3), so the first block is the whole image and the other
    # three are empty; P = G / 2 gives SSIM 0.8 * 0.8 = 0.64 (as in test_s_measure_by_hand).
    # S = (29/30 + 0.64) / 2. PySODMetrics returns nan here (recorded): its SSIM of an empty
    # block is nan, and nan * (weight 0) stays nan; common skips the empty blocks.
    case = REFERENCE["deviations"]["s_measure_centroid_on_last_row"]
    prob, gt = np.array(case["prob"], np.float64), np.array(case["gt"], bool)
    assert math.isnan(case["pysodmetrics_s_measure"])
    assert common.s_measure(prob, gt) == pytest.approx((29 / 30 + 0.64) / 2)


def test_weighted_f_measure():
    gt = square((9, 9), slice(3, 6), slice(2, 7))
    assert common.weighted_f_measure(gt.astype(float), gt) == pytest.approx(1.0, abs=1e-6)
    assert common.weighted_f_measure(np.full((9, 9), 0.5), np.zeros((9, 9))) == 0.0
    # An all-zero map misses everything: E = 1 on G and E_t = 1 everywhere. With G at least 3
    # pixels from the border, the zero-padded 7x7 blur keeps E_A = 1 on G, so R_w = 0 and F = 0.
    # (Nearer the border the padding lowers E_A and F > 0: the toolbox's behaviour, kept.)
    far = square((13, 13), slice(4, 9), slice(3, 10))
    assert common.weighted_f_measure(np.zeros((13, 13)), far) == pytest.approx(0.0)
    assert common.weighted_f_measure(np.zeros((9, 9)), gt) > 0.05
    # 3x3, gt = the centre pixel, P = 1 everywhere. The centre has error 0, and every background
    # pixel's nearest foreground error is 0, so E_A = 0 and R_w = 1. Background errors are 1,
    # weighted 2 - 0.5^(d / 5): four pixels at d = 1 and four at d = sqrt(2).
    # TP_w = 1, FP_w = 4 (2 - 0.5^0.2) + 4 (2 - 0.5^(sqrt(2)/5)), P_w = 1 / (1 + FP_w).
    gt = points((3, 3), (1, 1))
    fp_w = 4 * (2 - 0.5 ** 0.2) + 4 * (2 - 0.5 ** (math.sqrt(2) / 5))
    p_w = 1 / (1 + fp_w)
    assert common.weighted_f_measure(np.ones((3, 3)), gt) == pytest.approx(2 * p_w / (1 + p_w))
    assert common.weighted_f_measure(np.ones((3, 3)), gt, beta2=0.3) == pytest.approx(
        1.3 * p_w / (1 + 0.3 * p_w))


# PySODMetrics reference (tests/fixtures, PySODMetrics 1.6.2, normalize=False): eight images of
# different shapes, including an empty gt, an all-zero prediction, a one-pixel object, an
# all-foreground gt, an object on the border and a binary map with exact 0.5 and 1.0 values.

@pytest.mark.parametrize("name", sorted(POLYP))
def test_polyp_metrics_match_pysodmetrics(name):
    prob, gt = polyp_case(name)
    case = POLYP[name]
    assert common.mae(prob, gt) == pytest.approx(case["mae"], rel=1e-12, abs=1e-15)
    # Smeasure(alpha=0.5); alpha = 1 keeps the object term only, alpha = 0 the region term only.
    assert common.s_measure(prob, gt) == pytest.approx(case["s_measure"], rel=1e-12, abs=1e-15)
    assert common.s_measure(prob, gt, alpha=1.0) == pytest.approx(case["s_measure_alpha_1"],
                                                                 rel=1e-12, abs=1e-15)
    assert common.s_measure(prob, gt, alpha=0.0) == pytest.approx(case["s_measure_alpha_0"],
                                                                 rel=1e-12, abs=1e-15)
    assert common.adaptive_e_measure(prob, gt) == pytest.approx(case["adaptive_e_measure"],
                                                                rel=1e-12, abs=1e-15)
    np.testing.assert_allclose(common.e_measure_curve(prob, gt), case["e_measure_curve"],
                               rtol=1e-12, atol=1e-15)
    assert common.weighted_f_measure(prob, gt) == pytest.approx(case["weighted_f_measure"],
                                                                rel=1e-12, abs=1e-15)
    assert common.weighted_f_measure(prob, gt, beta2=0.3) == pytest.approx(
        case["weighted_f_measure_beta2_0.3"], rel=1e-12, abs=1e-15)
    # FmeasureV2 with DICEHandler / IOUHandler (with_dynamic): thresholds >= 255 .. >= 0.
    dice_curve, iou_curve = common.dice_iou_curves(prob, gt)
    np.testing.assert_allclose(dice_curve, case["dice_curve"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(iou_curve, case["iou_curve"], rtol=1e-12, atol=1e-15)


def test_reference_cases_exercise_the_edges():
    # Guards the fixture itself: the recorded curves must separate the rules the tests are for.
    # Empty gt: every 0/0 on the Dice/IoU curves is 0 (PySODMetrics and the MATLAB toolbox),
    # including the thresholds where the prediction is empty too (levels above the map's maximum).
    empty_gt = POLYP["empty_gt_8x10"]
    assert max(empty_gt["dice_curve"]) == 0.0 and max(empty_gt["iou_curve"]) == 0.0
    assert empty_gt["e_measure_curve"][0] == pytest.approx(80 / 79)  # all right: N / (N - 1)
    # An all-zero prediction: the curves are 0 at every threshold but level >= 0 (everything in).
    missed = POLYP["empty_prediction_7x12"]
    assert max(missed["dice_curve"][:255]) == 0.0 and missed["dice_curve"][255] > 0
    # The object and region terms differ, so a wrong alpha changes S.
    for name in ("ellipse_9x13", "two_objects_9x13", "tiny_object_10x11"):
        assert abs(POLYP[name]["s_measure_alpha_1"] - POLYP[name]["s_measure_alpha_0"]) > 0.2


def test_polyp_meter_matches_pysodmetrics_over_a_dataset():
    # PySODMetrics' dataset results over the eight images (maxEm is the max of the image-averaged
    # curve, not the mean of per-image maxima). The two 9x13 images go in as one (2, 1, H, W)
    # torch batch; the rest one by one, split over two meters that are merged.
    names = list(POLYP)
    assert names[:2] == ["ellipse_9x13", "two_objects_9x13"]
    batch = [polyp_case(name) for name in names[:2]]
    first, second = common.PolypMeter(), common.PolypMeter()
    first.update(torch.tensor(np.stack([p for p, _ in batch])[:, None]),
                 torch.tensor(np.stack([g for _, g in batch])[:, None]))
    for index, name in enumerate(names[2:]):
        (first if index < 3 else second).update(*polyp_case(name))
    first.merge(second.state())
    result = first.compute()
    assert first.state()["images"] == 8
    assert result == pytest.approx(REFERENCE["polyp"]["dataset"], rel=1e-12)


def test_per_image_and_global_meters_match_pysodmetrics():
    # PySODMetrics' binary handlers (pred > 0.5; no recorded pixel is exactly 0.5): sample_based
    # averages per image, otherwise one confusion matrix over the three images. Three different
    # images (two of them as one batch), so the two averages differ.
    reference = REFERENCE["binary_meters"]
    cases = [polyp_case(name) for name in reference["images"]]
    per_image, pooled = common.PerImageMeter(), common.GlobalMeter()
    for meter in (per_image, pooled):
        meter.update(np.stack([cases[0][0], cases[1][0]]), np.stack([cases[0][1], cases[1][1]]))
        meter.update(*cases[2])
    assert per_image.compute() == pytest.approx(reference["per_image"], rel=1e-12)
    assert pooled.compute() == pytest.approx(reference["global"], rel=1e-12)
    assert reference["per_image"]["dice"] != pytest.approx(reference["global"]["dice"], rel=1e-3)


def test_polyp_meter_perfect_predictions_and_batches():
    # Two perfect binary maps. Dice curve: 1 at entries 0..254; at level >= 0 every pixel is
    # foreground: Dice = 2g / (g + N). mDice = mean over images of the mean over the 256.
    gts = [square((8, 8), slice(1, 4), slice(1, 5)), square((8, 8), slice(3, 7), slice(2, 8))]
    meter = common.PolypMeter()
    for gt in gts:
        meter.update(gt.astype(float), gt)
    result = meter.compute()
    n = 64
    last = [2 * g.sum() / (g.sum() + n) for g in gts]
    assert result["mDice"] == pytest.approx(np.mean([(255 + d) / 256 for d in last]))
    assert result["maxEm"] == pytest.approx(n / (n - 1))
    assert result["Sm"] == pytest.approx(1.0)
    assert result["wFm"] == pytest.approx(1.0, abs=1e-6)
    assert result["MAE"] == 0.0
    # A (B, 1, H, W) torch batch gives the same as the images one by one.
    batch = common.PolypMeter()
    stacked = torch.from_numpy(np.stack(gts)[:, None].astype(np.float32))
    batch.update(stacked, stacked)
    assert batch.compute() == pytest.approx(result)


# ---- Per image vs global ----

def test_per_image_and_global_meters_differ():
    # Image A: pred = gt = 4 pixels -> tp 4, fp 0, fn 0, tn 12 (every score 1).
    # Image B: gt 1 pixel, pred 1 other pixel -> tp 0, fp 1, fn 1, tn 14.
    # Per image: dice (1 + 0) / 2 = 0.5, iou 0.5, precision 0.5, recall 0.5,
    #            specificity (1 + 14/15) / 2 = 29/30, accuracy (1 + 14/16) / 2 = 15/16.
    # Global: tp 4, fp 1, fn 1, tn 26: dice 8/10, iou 4/6, precision 4/5, recall 4/5,
    #            specificity 26/27, accuracy 30/32 = 15/16 (equal-size images: accuracy agrees).
    gt_a = square((4, 4), slice(0, 2), slice(0, 2))
    prob_a = np.where(gt_a, 0.9, 0.1)
    gt_b = points((4, 4), (3, 3))
    prob_b = np.where(points((4, 4), (0, 3)), 0.5, 0.2)  # exactly 0.5 counts as foreground
    one_by_one = common.PerImageMeter(), common.GlobalMeter()
    for meter in one_by_one:
        meter.update(prob_a, gt_a)
        meter.update(torch.tensor(prob_b), torch.tensor(gt_b))
    batched = common.PerImageMeter(), common.GlobalMeter()  # one (2, 1, 4, 4) torch batch
    for meter in batched:
        meter.update(torch.tensor(np.stack([prob_a, prob_b])[:, None]),
                     torch.tensor(np.stack([gt_a, gt_b])[:, None]))
    for per_image, pooled in (one_by_one, batched):
        assert per_image.compute() == pytest.approx({
            "dice": 0.5, "iou": 0.5, "precision": 0.5, "recall": 0.5,
            "specificity": 29 / 30, "accuracy": 15 / 16})
        assert pooled.compute() == pytest.approx({
            "dice": 0.8, "iou": 4 / 6, "precision": 0.8, "recall": 0.8,
            "specificity": 26 / 27, "accuracy": 15 / 16})
        assert pooled.state() == {"tp": 4, "fp": 1, "fn": 1, "tn": 26}


def test_per_image_meter_merge():
    # Image 1 has single pixels 3 apart; image 2 has an empty prediction: Dice 0 for both.
    gt = np.stack([points((6, 6), (1, 1)), points((6, 6), (2, 2))])
    prob = np.stack([points((6, 6), (1, 4)), np.zeros((6, 6), bool)]).astype(float)
    meter = common.PerImageMeter()
    meter.update(prob[:1], gt[:1])
    other = common.PerImageMeter()
    other.update(prob[1:], gt[1:])
    meter.merge(other.state())
    result = meter.compute()
    assert result["dice"] == 0.0 and meter.state()["images"] == 2
    assert result["specificity"] == pytest.approx((34 / 35 + 1) / 2)


# ---- Per volume and class ----

def make_volumes():
    """Two label volumes (4, 6, 8) with classes 1-3, built to exercise every empty-mask case."""
    shape = (4, 6, 8)
    pred1, gt1 = np.zeros(shape, int), np.zeros(shape, int)
    gt1[1, 2, 2:4] = 1  # class 1: gt x = 2, 3; pred x = 3, 4 -> Dice 2*1/4 = 0.5; all voxels
    pred1[1, 2, 3:5] = 1  # are surface; distances [1, 0] and [0, 1] -> pooled 95th pct = 1
    pred1[3, 5, 7] = 2  # class 2: predicted, absent from gt; class 3: absent from both
    pred2, gt2 = np.zeros(shape, int), np.zeros(shape, int)
    gt2[0:2, 0:2, 4:6] = 1  # class 1: perfect -> Dice 1, HD95 0
    pred2[0:2, 0:2, 4:6] = 1
    gt2[3, 0, 0] = 2  # class 2: missed (empty prediction)
    gt2[0, 0, 0] = 3  # class 3: single voxels (0,0,0) and (2,3,6): Dice 0, HD95 7
    pred2[2, 3, 6] = 3
    return [(pred1, gt1), (pred2, gt2)]


def test_volume_meter_transunet_convention():
    # class 1: Dice (0.5 + 1) / 2 = 0.75, HD95 (1 + 0) / 2 = 0.5
    # class 2: vol 1 pred only -> (1, 0); vol 2 pred empty -> (0, 0): Dice 0.5, HD95 0
    # class 3: vol 1 both empty -> pred empty -> (0, 0); vol 2 (0, 7): Dice 0, HD95 3.5
    meter = common.VolumeMeter(4, class_names=["aorta", "liver", "spleen"])
    for pred, gt in make_volumes():
        meter.update(pred, gt)
    assert meter.compute() == pytest.approx({
        "dice_aorta": 0.75, "dice_liver": 0.5, "dice_spleen": 0.0, "mean_dice": 1.25 / 3,
        "hd95_aorta": 0.5, "hd95_liver": 0.0, "hd95_spleen": 3.5, "mean_hd95": 4 / 3})


def test_volume_meter_skip_convention_spacing_and_merge():
    # class 1 as before: Dice 0.75, HD95 0.5 (its offsets run along the last axis only).
    # class 2: vol 1 pred only -> Dice 0, no HD95; vol 2 missed -> Dice 0, no HD95:
    #          Dice 0, HD95 nan. class 3: vol 1 skipped; vol 2 Dice 0, HD95 with spacing
    #          (2, 1, 1): sqrt((2*2)^2 + 3^2 + 6^2) = sqrt(61).
    # mean_dice = (0.75 + 0 + 0) / 3; mean_hd95 over the classes with a value: (0.5 + sqrt 61) / 2.
    volumes = make_volumes()
    meter = common.VolumeMeter(4, spacing=(2, 1, 1), convention="skip")
    meter.update(*volumes[0])
    other = common.VolumeMeter(4, spacing=(2, 1, 1), convention="skip")
    other.update(*volumes[1])
    meter.merge(other.state())
    result = meter.compute()
    assert math.isnan(result.pop("hd95_class2"))
    assert result == pytest.approx({
        "dice_class1": 0.75, "dice_class2": 0.0, "dice_class3": 0.0, "mean_dice": 0.25,
        "hd95_class1": 0.5, "hd95_class3": math.sqrt(61),
        "mean_hd95": (0.5 + math.sqrt(61)) / 2})
    np.testing.assert_array_equal(meter.state()["dice_volumes"], [2, 2, 1])


def test_volume_meter_rejects_bad_arguments():
    with pytest.raises(ValueError, match="convention"):
        common.VolumeMeter(3, convention="medpy")
    with pytest.raises(ValueError, match="foreground classes"):
        common.VolumeMeter(3, class_names=["background", "a", "b"])


# ---- Ground-truth binarisation ----

def test_load_mask_binarises_ground_truth_as_the_polyp_toolboxes_do(tmp_path):
    # The toolboxes that produce the polyp papers' numbers binarise the ground truth at v > 128,
    # so a value of exactly 128 is background: PraNet's MATLAB eval/main.m
    # (`gt = gt(:,:,1) > 128` after rgb2gray), PySODMetrics 1.6.2 (utils.prepare_data:
    # `gt > 128`) and the Python polyp eval scripts derived from it (`_prepare_data`).
    # Row 0: 0, 127, 128 are background; 129, 255 foreground. Row 1: 1, 128, 64 background.
    values = np.array([[0, 127, 128, 129, 255], [1, 128, 200, 130, 64]], np.uint8)
    expected = np.array([[0, 0, 0, 1, 1], [0, 0, 1, 1, 0]], bool)
    Image.fromarray(values, "L").save(tmp_path / "gray.png")
    # A grey RGB mask (R = G = B): rgb2gray gives the same values, as does the channel maximum.
    Image.fromarray(np.repeat(values[..., None], 3, axis=2), "RGB").save(tmp_path / "rgb.png")
    for name in ("gray.png", "rgb.png"):
        np.testing.assert_array_equal(common.load_mask(tmp_path / name), expected, err_msg=name)
    # 0/1 masks (max <= 1) keep v > 0.
    Image.fromarray(np.array([[0, 1, 1], [1, 0, 0]], np.uint8), "L").save(tmp_path / "01.png")
    np.testing.assert_array_equal(common.load_mask(tmp_path / "01.png"), [[0, 1, 1], [1, 0, 0]])
