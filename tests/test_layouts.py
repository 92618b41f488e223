"""Every README layout built as it is downloaded, and the discovery rules issue 19 asked for."""
import argparse
import time

import numpy as np
import pytest
from PIL import Image

import common
from test_common_data import write_image, write_mask

POLYP_SETS = ("CVC-300", "CVC-ClinicDB", "CVC-ColonDB", "ETIS-LaribPolypDB", "Kvasir")


def polyp_test_sets(root, per_set=2):
    for index, group in enumerate(POLYP_SETS):
        for i in range(per_set + index % 2):  # sets of different sizes
            write_image(root / group / "images" / f"{i + 1}.png", value=40 + 20 * index)
            write_mask(root / group / "masks" / f"{i + 1}.png")


def pranet_package(root):
    for name in ("1", "2", "3", "cju5", "cju6", "cju7"):
        write_image(root / "TrainDataset" / "images" / f"{name}.png")
        write_mask(root / "TrainDataset" / "masks" / f"{name}.png")
    polyp_test_sets(root / "TestDataset")


def isic(root, year):
    names = {2016: [("ISBI2016_ISIC_Part1_Training_Data", "ISBI2016_ISIC_Part1_Training_GroundTruth", 4),
                    ("ISBI2016_ISIC_Part1_Test_Data", "ISBI2016_ISIC_Part1_Test_GroundTruth", 2)],
             2017: [("ISIC-2017_Training_Data", "ISIC-2017_Training_Part1_GroundTruth", 4),
                    ("ISIC-2017_Validation_Data", "ISIC-2017_Validation_Part1_GroundTruth", 1),
                    ("ISIC-2017_Test_v2_Data", "ISIC-2017_Test_v2_Part1_GroundTruth", 2)],
             2018: [("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth", 4),
                    ("ISIC2018_Task1-2_Validation_Input", "ISIC2018_Task1_Validation_GroundTruth", 1),
                    ("ISIC2018_Task1-2_Test_Input", "ISIC2018_Task1_Test_GroundTruth", 2)]}[year]
    suffix = "_Segmentation" if year == 2016 else "_segmentation"
    count = 0
    for images, masks, n in names:
        for _ in range(n):
            count += 1
            write_image(root / images / f"ISIC_{count:07d}.jpg")
            write_mask(root / masks / f"ISIC_{count:07d}{suffix}.png")
    return root


def layouts(tmp):
    """{layout name: root} for every row of the README's data table (binary ones)."""
    roots = {}
    kvasir = tmp / "Kvasir-SEG"
    for name in ("cju1", "cju2", "cju3", "cju4", "cju5"):
        write_image(kvasir / "images" / f"{name}.jpg")
        write_mask(kvasir / "masks" / f"{name}.jpg", mode="RGB")
    roots["kvasir"] = kvasir
    pranet_package(tmp / "polyp")
    roots["pranet"] = tmp / "polyp"
    polyp_test_sets(tmp / "TestDataset")
    roots["pranet-test"] = tmp / "TestDataset"
    clinic = tmp / "CVC-ClinicDB"
    for i in range(1, 6):
        write_image(clinic / "Original" / f"{i}.tif", fmt="TIFF")
        write_mask(clinic / "Ground Truth" / f"{i}.tif")
    roots["clinicdb"] = clinic
    for year in (2016, 2017, 2018):
        roots[f"isic{year}"] = isic(tmp / f"ISIC{year}", year)
    vm = tmp / "data" / "isic2017"
    for split, n in (("train", 4), ("val", 2)):
        for i in range(n):
            write_image(vm / split / "images" / f"{split}{i}.png")
            write_mask(vm / split / "masks" / f"{split}{i}.png")
    roots["vmunet-isic"] = vm
    ph2 = tmp / "PH2Dataset"
    for case in ("IMD002", "IMD003", "IMD010", "IMD020", "IMD437"):
        folder = ph2 / "PH2 Dataset images" / case
        write_image(folder / f"{case}_Dermoscopic_Image" / f"{case}.bmp")
        write_mask(folder / f"{case}_lesion" / f"{case}_lesion.bmp", fg=1, mode="1")
        write_image(folder / f"{case}_roi" / f"{case}_R1_Label4.bmp")
    roots["ph2"] = ph2
    glas = tmp / "Warwick QU Dataset (Released 2016_07_08)"
    for name in ("train_1", "train_2", "train_10", "testA_1", "testB_1"):
        write_image(glas / f"{name}.bmp")
        write_mask(glas / f"{name}_anno.bmp", fg=3)  # gland instance 3
    (glas / "Grade.csv").write_text("name, patient ID, grade (GlaS)\n")
    roots["glas"] = glas
    busi = tmp / "Dataset_BUSI_with_GT"
    for kind in ("benign", "malignant", "normal"):
        for i in (1, 2):
            write_image(busi / kind / f"{kind} ({i}).png")
            write_mask(busi / kind / f"{kind} ({i})_mask.png", fg=0 if kind == "normal" else 255)
    roots["busi"] = busi
    own = tmp / "mine"
    for i in range(5):
        write_image(own / "images" / f"a{i}.png")
        write_mask(own / "masks" / f"a{i}.png")
    roots["images-masks"] = own
    return roots


def test_every_layout_is_recognised_by_name(tmp_path):
    for name, root in layouts(tmp_path).items():
        assert common.discover_splits(root, val_fraction=0.0)["layout"] == name, root


def test_eval_folder_is_all_test_data_in_its_groups(tmp_path):
    root = tmp_path / "TestDataset"
    polyp_test_sets(root)
    split = common.discover_splits(root, all_test=True)
    assert sorted(split["test"]) == sorted(POLYP_SETS)
    assert {g: len(p) for g, p in split["test"].items()} == {
        "CVC-300": 2, "CVC-ClinicDB": 3, "CVC-ColonDB": 2, "ETIS-LaribPolypDB": 3, "Kvasir": 2}
    # through load_data, as `--eval CKPT --data ./TestDataset` calls it
    args = argparse.Namespace(data=str(root), img_size=16, seed=0, val_fraction=0.1,
                              eval="best.pt")
    data = common.load_data(args, "binary")
    assert sum(len(d) for d in data["test"].values()) == 12 and len(data["train"]) == 0


def test_doubly_nested_test_folder_keeps_the_five_sets(tmp_path):
    pranet_package(tmp_path / "polyp")
    nested = tmp_path / "polyp" / "TestDataset" / "TestDataset"
    for group in POLYP_SETS:
        (tmp_path / "polyp" / "TestDataset" / group).rename(nested / group) if nested.exists() \
            else (nested.mkdir(parents=True), (tmp_path / "polyp" / "TestDataset" / group).rename(
                nested / group))
    split = common.discover_splits(tmp_path / "polyp", val_fraction=0.0)
    assert sorted(split["test"]) == sorted(POLYP_SETS)


def test_clinicdb_mirror_with_png_and_tif_copies_is_read_once(tmp_path):
    root = tmp_path / "cvcclinicdb"
    for i in range(1, 11):
        for fmt, ext in (("PNG", "png"), ("TIF", "tif")):
            write_image(root / fmt / "Original" / f"{i}.{ext}", value=10 * i)
            write_mask(root / fmt / "Ground Truth" / f"{i}.{ext}")
    split = common.discover_splits(root, seed=3)
    everything = split["train"] + split["val"] + split["test"]["test"]
    assert len(everything) == 10
    assert all("/PNG/" in p["image"] for p in everything)
    assert "reading PNG/ only" in split["source"]


def test_no_key_in_two_splits_is_asserted():
    pair = {"key": "1", "image": "a/1.png", "context": "", "masks": []}
    copy = {"key": "1", "image": "b/1.png", "context": "", "masks": []}
    with pytest.raises(AssertionError, match="in both train and test/test"):
        common._assert_disjoint({"train": [pair], "val": [], "test": {"test": [copy]}})


def test_seeded_split_is_shuffled_and_recorded(tmp_path):
    root = tmp_path / "mine"
    for i in range(40):
        write_image(root / "images" / f"a{i:02d}.png")
        write_mask(root / "masks" / f"a{i:02d}.png")
    split = common.discover_splits(root, seed=0)
    keys = [p["key"] for p in split["train"]]
    assert keys != sorted(keys)  # shuffled, not the first 80 % in name order
    assert (len(split["train"]), len(split["val"]), len(split["test"]["test"])) == (32, 4, 4)
    assert [p["key"] for p in common.discover_splits(root, seed=0)["train"]] == keys
    assert [p["key"] for p in common.discover_splits(root, seed=1)["train"]] != keys


def test_paper_resplit_ignores_the_official_split(tmp_path):
    root = isic(tmp_path / "ISIC2018", 2018)  # 4 / 1 / 2 official
    split = common.discover_splits(root, official=False, fractions=(0.7, 0.0, 0.3))
    assert (len(split["train"]), len(split["val"]), len(split["test"]["test"])) == (5, 0, 2)
    assert not split["official"]


def test_glas_instances_are_binarised_whoever_loads_them(tmp_path):
    roots = layouts(tmp_path)
    split = common.discover_splits(roots["glas"], val_fraction=0.0)
    dataset = common.PairDataset(split["train"], 12)  # no instance=True from the caller
    assert dataset.full(0)[1].sum() == 12  # the gland labelled 3 is foreground


def test_a_corrupt_test_image_stops_discovery_before_training(tmp_path):
    roots = layouts(tmp_path)
    broken = roots["isic2018"] / "ISIC2018_Task1-2_Test_Input" / "ISIC_0000007.jpg"
    broken.write_bytes(broken.read_bytes()[:-40])  # a truncated download
    with pytest.raises(common.UserError, match="(?i)ISIC_0000007.jpg.*truncated"):
        common.discover_splits(roots["isic2018"])
    big = roots["isic2018"] / "ISIC2018_Task1-2_Test_Input" / "ISIC_0000006.jpg"
    noise = np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8)
    Image.fromarray(noise).save(big, quality=95)
    broken.write_bytes(big.read_bytes())  # repaired; now cut the end off a file whose header is whole
    big.write_bytes(big.read_bytes()[:-2])
    with pytest.raises(common.UserError, match="ISIC_0000006.jpg.*no end-of-image marker"):
        common.discover_splits(roots["isic2018"])
    big.write_bytes(broken.read_bytes())
    garbage = roots["busi"] / "malignant" / "malignant (2)_mask.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    with pytest.raises(common.UserError, match=r"cannot read image .*malignant \(2\)_mask.png"):
        common.discover_splits(roots["busi"])


def test_rotated_mask_is_refused_also_with_a_size_hint(tmp_path):
    root = tmp_path / "mine"
    for i in range(3):
        write_image(root / "images" / f"a{i}.jpg", size=(16, 10))
        write_mask(root / "masks" / f"a{i}.png", size=(16, 10))
    write_mask(root / "masks" / "a1.png", size=(10, 16))  # rotated by 90 degrees
    with pytest.raises(common.UserError, match="a1.png is 10x16 but its image .*a1.jpg is 16x10"):
        common.discover_splits(root)
    pairs = common.find_pairs(root)  # a caller that skips discovery still gets the check
    with pytest.raises(common.UserError, match="a1.png is 10x16"):
        common.PairDataset(pairs, 8).full(1, size_hint=8)


def test_toy_multiclass_on_disk_is_loadable(tmp_path):
    common.write_toy(tmp_path / "toy", kind="multiclass", n=5, size=24)
    args = argparse.Namespace(data=str(tmp_path / "toy"), img_size=16, seed=0, val_fraction=0.0,
                              eval=None)
    data = common.load_data(args, "multiclass")
    assert len(data["train"]) == 5 and len(data["test"]["test"]) == 1


def test_discovery_of_2000_pairs_is_fast(tmp_path):
    root = tmp_path / "big"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    image = Image.fromarray(np.full((48, 64, 3), 90, np.uint8))
    mask = Image.fromarray(np.zeros((48, 64), np.uint8))
    for i in range(2000):
        image.save(root / "images" / f"i{i}.jpg")
        mask.save(root / "masks" / f"i{i}.png")
    started = time.perf_counter()
    split = common.discover_splits(root)
    seconds = time.perf_counter() - started
    print(f"discovery of 2000 pairs (headers checked): {seconds:.2f} s")
    assert sum(map(len, [split["train"], split["val"], *split["test"].values()])) == 2000
