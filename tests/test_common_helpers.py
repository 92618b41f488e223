"""common.save_predictions and common.check_conflicts: small helpers any script can use."""
import argparse

import numpy as np
import pytest
from PIL import Image

import common


def test_save_predictions_writes_masks_and_caps_the_overlays(tmp_path):
    rng = np.random.default_rng(0)
    preds = rng.random((3, 5, 7)) > 0.5  # non-square, three different masks
    images = rng.integers(0, 255, (3, 5, 7, 3), np.uint8)
    written = common.save_predictions(tmp_path, ["a", "b", "c"], preds, images, preds, overlays=2)
    assert written == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.png", "a_overlay.png", "b.png", "b_overlay.png", "c.png"]
    for stem, pred in zip("abc", preds):
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"{stem}.png")), pred * 255)
    assert Image.open(tmp_path / "b_overlay.png").size == (21, 5)  # image | pred | ground truth


def test_save_predictions_label_maps_and_no_overlay_without_images(tmp_path):
    labels = np.arange(24).reshape(2, 3, 4) % 5
    assert common.save_predictions(tmp_path, ["x", "y"], labels, labels=True, overlays=9) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png", "y.png"]
    for stem, label in zip("xy", labels):
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"{stem}.png")), label)


def conflict_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["a", "b"], default="a")
    parser.add_argument("--width", type=int, default=3)
    parser.add_argument("--no-gate", dest="gate", action="store_false")
    return parser


@pytest.mark.parametrize("argv, message", [
    (["--mode", "b", "--width", "4"], "--width 4 conflicts: mode b has no width"),
    (["--mode", "b", "--no-gate"], "--no-gate conflicts: mode b has no gate"),
    (["--no-gate", "--width", "5"], "--width 5 conflicts: no gate, no width"),
    (["--mode", "b"], None), (["--width", "4"], None), (["--no-gate"], None)])
def test_check_conflicts_names_the_first_explicit_culprit(argv, message):
    parser = conflict_parser()
    args = parser.parse_args(argv)
    explicit = common.explicit_flags(parser, argv)
    rules = [(("width",), args.mode == "b", "mode b has no width"),
             (("gate",), args.mode == "b", "mode b has no gate"),
             (("width",), not args.gate, "no gate, no width")]
    if message is None:
        common.check_conflicts(parser, args, rules, explicit)
        return
    with pytest.raises(common.UserError) as error:
        common.check_conflicts(parser, args, rules, explicit)
    assert str(error.value) == message
