"""common.py sections 3-6: discovery of every supported layout, I/O, toy data, run plumbing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import common

ROOT = Path(__file__).resolve().parents[1]


def write_image(path, size=(12, 10), mode="RGB", fmt=None, value=120):
    """A small image file of `size` (W, H)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full((size[1], size[0], 3), value, np.uint8)
    image = Image.fromarray(array)
    image = image.convert(mode) if mode != "RGB" else image
    image.save(path, format=fmt)
    return path


def write_mask(path, size=(12, 10), fg=255, mode="L", box=(2, 2, 6, 5)):
    """A mask file with a foreground rectangle box=(x0, y0, x1, y1) of value `fg`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros((size[1], size[0]), np.uint8)
    x0, y0, x1, y1 = box
    array[y0:y1, x0:x1] = fg
    image = Image.fromarray(array)
    if mode == "RGB":
        image = Image.merge("RGB", [image] * 3)
    elif mode == "1":
        image = image.point(lambda v: 255 if v else 0).convert("1")
    image.save(path)
    return path


# ---- discovery, one test per layout of datasets.md ----

def test_kvasir_layout_with_jpeg_masks(tmp_path):
    root = tmp_path / "Kvasir-SEG"
    for name in ("cju1", "cju2", "cju10"):
        write_image(root / "images" / f"{name}.jpg")
        write_mask(root / "masks" / f"{name}.jpg", mode="RGB")  # 3-channel JPEG, noisy edges
    (root / "kavsir_bboxes.json").write_text("{}")
    pairs = common.find_pairs(root)
    assert [p["key"] for p in pairs] == ["cju1", "cju2", "cju10"]  # natural order
    mask = common.load_mask(pairs[0]["masks"][0])
    # the 4x3 rectangle survives JPEG noise: exactly 12 foreground pixels after v > 128
    assert mask.dtype == bool and mask.sum() == 12
    split = common.discover_splits(root, seed=0)
    assert split["source"].startswith("seeded")
    assert len(split["train"]) + len(split["val"]) + len(split["test"]["test"]) == 3


def test_isic_layouts_case_insensitive_suffix_and_superpixels(tmp_path):
    root = tmp_path / "isic2017"
    for split, n in (("Training", 3), ("Validation", 1), ("Test_v2", 2)):
        for i in range(n):
            name = f"ISIC_{split[:2]}{i:05d}"
            write_image(root / f"ISIC-2017_{split}_Data" / f"{name}.jpg")
            write_image(root / f"ISIC-2017_{split}_Data" / f"{name}_superpixels.png")
            write_mask(root / f"ISIC-2017_{split}_Part1_GroundTruth" / f"{name}_segmentation.png")
    split = common.discover_splits(root)
    assert len(split["train"]) == 3 and len(split["val"]) == 1
    assert list(split["test"]) == ["test"] and len(split["test"]["test"]) == 2
    assert split["source"].startswith("official")
    # ISIC 2016's capital-S suffix pairs too
    root16 = tmp_path / "isic2016"
    write_image(root16 / "ISBI2016_ISIC_Part1_Training_Data" / "ISIC_0000000.jpg")
    write_mask(root16 / "ISBI2016_ISIC_Part1_Training_GroundTruth" /
               "ISIC_0000000_Segmentation.png")
    pairs = common.find_pairs(root16)
    assert pairs[0]["key"] == "isic_0000000" and len(pairs[0]["masks"]) == 1


def test_pranet_package_gives_one_test_group_per_set(tmp_path):
    root = tmp_path / "polyp"
    for name in ("1", "2", "cju5", "cju6", "7", "8"):
        write_image(root / "TrainDataset" / "image" / f"{name}.png")
        write_mask(root / "TrainDataset" / "mask" / f"{name}.png")
    for group in ("CVC-300", "Kvasir"):
        for name in ("1", "2"):  # the same names as in training: paired within their own set
            write_image(root / "TestDataset" / group / "images" / f"{name}.png")
            write_mask(root / "TestDataset" / group / "masks" / f"{name}.png")
    split = common.discover_splits(root, seed=0, val_fraction=0.0)
    assert sorted(split["test"]) == ["CVC-300", "Kvasir"]
    assert len(split["train"]) == 6 and split["val"] == []
    held = common.discover_splits(root, seed=0, val_fraction=0.5)
    assert len(held["train"]) == 3 and len(held["val"]) == 3


def test_clinicdb_tiff_glas_instances_busi_union_ph2_vmunet(tmp_path):
    clinic = tmp_path / "CVC-ClinicDB"
    write_image(clinic / "Original" / "1.tif", fmt="TIFF")
    write_mask(clinic / "Ground Truth" / "1.tif")
    assert common.find_pairs(clinic)[0]["key"] == "1"

    glas = tmp_path / "Warwick QU Dataset (Released 2016_07_08)"
    for name in ("train_1", "train_2", "testA_1", "testB_1"):
        write_image(glas / f"{name}.bmp")
        write_mask(glas / f"{name}_anno.bmp", fg=3)  # instance label 3: not > 128
    (glas / "Grade.csv").write_text("name, grade\n")
    split = common.discover_splits(glas, val_fraction=0.0)
    assert len(split["train"]) == 2 and len(split["test"]["test"]) == 2
    pair = split["train"][0]
    assert common.load_mask(pair["masks"][0], instance=True).sum() == 12

    busi = tmp_path / "Dataset_BUSI_with_GT"
    write_image(busi / "benign" / "benign (1).png")
    write_mask(busi / "benign" / "benign (1)_mask.png", box=(0, 0, 2, 2))
    write_mask(busi / "benign" / "benign (1)_mask_1.png", box=(8, 6, 10, 8))
    pairs = common.find_pairs(busi)
    assert len(pairs) == 1 and len(pairs[0]["masks"]) == 2
    dataset = common.PairDataset(pairs, 12)
    assert dataset.full(0)[1].sum() == 8  # union of two 2x2 lesions

    ph2 = tmp_path / "PH2Dataset" / "PH2 Dataset images"
    write_image(ph2 / "IMD002" / "IMD002_Dermoscopic_Image" / "IMD002.bmp")
    write_mask(ph2 / "IMD002" / "IMD002_lesion" / "IMD002_lesion.bmp", fg=1, mode="1")
    write_image(ph2 / "IMD002" / "IMD002_roi" / "IMD002_R1_Label4.bmp")
    pairs = common.find_pairs(ph2.parent)
    assert [p["key"] for p in pairs] == ["imd002"]
    assert common.load_mask(pairs[0]["masks"][0]).sum() == 12

    vm = tmp_path / "isic2018"
    for split_name in ("train", "train", "val"):
        n = len(list((vm / split_name / "images").glob("*"))) if (vm / split_name).exists() else 0
        write_image(vm / split_name / "images" / f"{split_name}{n}.png")
        write_mask(vm / split_name / "masks" / f"{split_name}{n}.png")
    split = common.discover_splits(vm, val_fraction=0.0)
    assert len(split["train"]) == 2 and len(split["test"]["test"]) == 1
    assert "VM-UNet" in split["source"]


@pytest.mark.parametrize("problem", ["no_mask", "no_image", "corrupt", "size", "empty"])
def test_bad_folders_stop_with_one_line_naming_the_file(tmp_path, problem):
    root = tmp_path / "data"
    write_image(root / "images" / "a.png")
    write_mask(root / "masks" / "a.png")
    culprit = None
    if problem == "no_mask":
        culprit = write_image(root / "images" / "b.png")
    elif problem == "no_image":
        culprit = write_mask(root / "masks" / "c.png")
    elif problem == "corrupt":
        culprit = root / "images" / "a.png"
        culprit.write_bytes(culprit.read_bytes()[:40])  # truncated PNG
    elif problem == "size":
        culprit = write_mask(root / "masks" / "a.png", size=(8, 8))
    else:
        root = tmp_path / "empty"
        root.mkdir()
    code = ("import common, types\n"
            "def go():\n"
            f"    ds = common.load_data(types.SimpleNamespace(data={str(root)!r}, img_size=8,"
            " seed=0, val_fraction=0.0))\n"
            "    [ds['train'][i] for i in range(len(ds['train']))]\n"
            "    [g.full(i) for g in ds['test'].values() for i in range(len(g))]\n"
            "common.cli(go)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert str(culprit.name if culprit else root) in lines[0]


def test_unknown_data_value_and_zero_epochs(tmp_path):
    import argparse
    parser = common.add_common_args(argparse.ArgumentParser(),
                                    dict(epochs=5, batch_size=2, lr=0.1, img_size=32), "Sec. 1")
    paper = dict(epochs=5, batch_size=2, lr=0.1, img_size=32)
    args = common.finish_args(parser.parse_args(["--data", "toy"]), paper, paper)
    assert args.preset == "small" and args.epochs == 5
    args = common.finish_args(parser.parse_args(["--data", str(tmp_path)]), paper, paper)
    assert args.preset == "paper"
    with pytest.raises(common.UserError, match="--epochs must be at least 1"):
        common.finish_args(parser.parse_args(["--epochs", "0"]), paper, paper)
    args.data = str(tmp_path / "nope")
    with pytest.raises(common.UserError, match="no such folder"):
        common.load_data(args)


# ---- image I/O and resizing ----

def test_mask_decoding_rules(tmp_path):
    # 16-bit and 0/1 masks: values <= 1 are foreground when > 0
    array = np.zeros((4, 4), np.uint8)
    array[1, 1] = 1
    Image.fromarray(array).save(tmp_path / "m01.png")
    assert common.load_mask(tmp_path / "m01.png").sum() == 1
    # values 100 and 200: only 200 passes v > 128 (never v > max/2)
    array[2, 2], array[1, 1] = 200, 100
    Image.fromarray(array).save(tmp_path / "m.png")
    assert common.load_mask(tmp_path / "m.png").sum() == 1
    assert common.load_mask(tmp_path / "m.png", instance=True).sum() == 2
    # nearest-neighbour resizing keeps a mask binary and a label map integer
    labels = np.array([[0, 3], [5, 1]])
    big = common.resize_mask(labels, 4)
    assert set(np.unique(big)) == {0, 1, 3, 5} and big[0, 3] == 3 and big[3, 0] == 5


def test_save_png_helpers_roundtrip(tmp_path):
    mask = np.zeros((6, 6), bool)
    mask[2:4, 1:5] = True
    common.save_mask_png(tmp_path / "m.png", mask)
    assert (common.load_mask(tmp_path / "m.png") == mask).all()
    labels = np.arange(36).reshape(6, 6) % 9
    common.save_label_png(tmp_path / "l.png", labels)
    assert (common.load_label_map(tmp_path / "l.png") == labels).all()
    common.save_overlay(tmp_path / "o.png", np.zeros((6, 6, 3), np.uint8), mask, mask)
    assert Image.open(tmp_path / "o.png").size == (18, 6)


# ---- toy data ----

def test_toy_binary_is_deterministic_and_balanced():
    a = common.make_toy_binary(3, 64, seed=5)
    b = common.make_toy_binary(3, 64, seed=5)
    c = common.make_toy_binary(3, 64, seed=6)
    assert (a[0] == b[0]).all() and (a[1] == b[1]).all()
    assert not (a[1] == c[1]).all()
    fractions = [common.make_toy_binary(i, 64)[1].mean() for i in range(40)]
    # lesions cover a few percent to about a third of the image, never nothing or everything
    assert 0.02 < min(fractions) and max(fractions) < 0.5
    assert 0.06 < np.mean(fractions) < 0.3
    dataset = common.ToyBinary(4, 32, seed=1)
    item = dataset[0]
    assert item["image"].shape == (3, 32, 32) and item["mask"].shape == (1, 32, 32)
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}


def test_toy_multiclass_has_every_class_and_is_deterministic():
    image, labels = common.make_toy_multiclass(0, 64, seed=0)
    again = common.make_toy_multiclass(0, 64, seed=0)
    assert (image == again[0]).all() and (labels == again[1]).all()
    assert image.dtype == np.float32 and 0 <= image.min() and image.max() <= 1
    counts = np.zeros(9)
    for i in range(30):
        _, labels = common.make_toy_multiclass(i, 64)
        present = np.unique(labels)
        assert 5 <= len(present) <= 9  # background + 4-8 organs (an organ may be overdrawn)
        counts[present] += 1
    assert (counts[1:] >= 10).all()  # every organ class shows up regularly


def test_write_toy_layout_is_found_by_the_loader(tmp_path):
    out = common.write_toy(tmp_path / "toy", "binary", n=5, size=32)
    pairs = common.find_pairs(out)
    assert len(pairs) == 5 and pairs[0]["image"].endswith(".jpg")
    result = subprocess.run([sys.executable, "common.py", "toy", "--out", str(tmp_path / "mc"),
                             "--kind", "multiclass", "--n", "5", "--size", "32"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    files = common.find_slice_files(tmp_path / "mc")
    assert len(files["train"]) == 5
    dataset = common.SliceDataset(files["train"], 16)
    assert dataset[0]["image"].shape == (3, 16, 16) and dataset[0]["mask"].dtype == torch.int64


def test_multiclass_npz_and_acdc_keys(tmp_path):
    for split, key in (("train", "img"), ("valid", "img")):
        (tmp_path / split).mkdir()
        np.savez(tmp_path / split / "case_001_sliceED_0.npz", **{key: np.zeros((20, 20)),
                                                                 "label": np.ones((20, 20))})
    (tmp_path / "test").mkdir()
    np.savez(tmp_path / "test" / "case_002_volume_ED.npz", img=np.zeros((3, 20, 20)),
             label=np.ones((3, 20, 20)))
    files = common.find_slice_files(tmp_path)
    assert len(files["train"]) == len(files["val"]) == len(files["test"]) == 1
    image, label, name = common.VolumeDataset(files["test"])[0]
    assert image.shape == (3, 20, 20) and name == "case_002_volume_ED"
    volume = common.predict_volume(lambda x: torch.stack([x[:, 0] * 0, x[:, 0] * 0 + 1], 1),
                                   image, 8)
    assert volume.shape == (3, 20, 20) and (volume == 1).all()


# ---- checkpoints ----

def test_checkpoint_is_atomic_and_foreign_files_are_refused(tmp_path):
    path = tmp_path / "last.pt"
    common.save_checkpoint(path, {"model": {"w": torch.ones(2)}, "epoch": 1, "script": "x"})

    real_save = torch.save

    def interrupted_save(obj, f):  # Ctrl-C in the middle of writing the new checkpoint
        f.write(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt

    torch.save = interrupted_save
    try:
        with pytest.raises(KeyboardInterrupt):
            common.save_checkpoint(path, {"model": {"w": torch.zeros(2)}, "epoch": 2})
    finally:
        torch.save = real_save
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no stray .tmp file
    state = common.load_checkpoint(path, "x")
    assert state["epoch"] == 1 and state["model"]["w"].sum() == 2
    (tmp_path / "trunc.pt").write_bytes(path.read_bytes()[:50])
    with pytest.raises(common.UserError, match="truncated"):
        common.load_checkpoint(tmp_path / "trunc.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(common.UserError, match="not a checkpoint"):
        common.load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(common.UserError, match="written by x"):
        common.load_checkpoint(path, "m2snet")
    with pytest.raises(common.UserError, match="no such file"):
        common.load_checkpoint(tmp_path / "missing.pt")


def test_run_folder_files(tmp_path):
    import argparse
    args = argparse.Namespace(device="cpu", out=str(tmp_path / "run"))
    run = common.Run(args, "demo")
    run.save_json("config.json", {"a": 1})
    run.log_epoch({"epoch": 0, "loss": 0.5})
    run.log_epoch({"epoch": 1, "loss": 0.25})
    run.checkpoint("last.pt", {"model": {}})
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == {"a": 1}
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert rows == ["epoch,loss", "0,0.5", "1,0.25"]
    assert common.load_checkpoint(tmp_path / "run" / "last.pt", "demo")["script"] == "demo"
    assert (tmp_path / "run" / "predictions").is_dir()
    assert not list((tmp_path / "run").glob(".*tmp*"))
