"""Shared plumbing for the five method scripts: what every script needs and no paper owns.

Read a method script first (e.g. `m2snet.py`); come here when it calls `common.something`.
Nothing in this file is a paper's block, loss or schedule (see DESIGN.md).

Public API, by section:
  1. errors     UserError, fail, cli
  2. metrics    dice, iou, precision, recall, specificity, accuracy, confusion,
                scores_from_confusion, hd95, asd, assd, mae, s_measure, weighted_f_measure,
                e_measure_curve, dice_iou_curves, PolypMeter, PerImageMeter, GlobalMeter,
                VolumeMeter
  3. image I/O  load_image, load_mask, load_label_map, resize_image, resize_mask,
                save_mask_png, save_label_png, save_overlay
  4. discovery  find_pairs, discover_splits, find_slice_files
  5. datasets   PairDataset, SliceDataset, VolumeDataset, ToyBinary, ToyMulticlass,
                write_toy, random_flip_rotate, load_data, predict_volume
  6. run        add_common_args, finish_args, Run, seed_everything, choose_device,
                save_checkpoint, load_checkpoint, make_loader, progress, benchmark, unwrap
  7. scan       selective_scan, selective_scan_reference, scan_backend, bench_scan

Command line of this file:
  python common.py toy --out DIR --kind binary|multiclass   write the toy set to disk
  python common.py bench-scan                                time the selective scan
"""
import argparse
import csv
import datetime
import json
import math
import os
import random
import re
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile

Image.MAX_IMAGE_PIXELS = None  # ISIC has >10 MP dermoscopy images; they are not decompression bombs

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ==== 1. Errors: one clear line, never a traceback ====

class UserError(Exception):
    """A mistake in the user's input (data, flags, checkpoint): reported as one line."""


def fail(message):
    """Stop with a user-facing one-line error."""
    raise UserError(message)


def _one_line(error):
    """The user-facing line of a UserError, also when a DataLoader worker re-raised it."""
    text = str(error).strip()
    if "UserError: " in text:  # re-raised from a worker: the message is the traceback's last line
        text = text.rsplit("UserError: ", 1)[1]
    return text.splitlines()[0] if text else type(error).__name__


def cli(main):
    """Run `main()` as a program: UserError -> 'error: ...' and exit 2; Ctrl-C -> exit 130."""
    try:
        main()
    except UserError as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint written (last.pt) is kept", file=sys.stderr)
        sys.exit(130)
    except RuntimeError as error:  # a worker's UserError arrives wrapped in other types
        if "UserError" not in str(error):
            raise
        print(f"error: {_one_line(error)}", file=sys.stderr)
        sys.exit(2)


# ==== 2. Metrics ====
# METRICS-BLOCK


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
    """A binary mask (H, W) bool: v >= 128 if max > 1 else v > 0; instance maps (GlaS): v > 0."""
    values = _mask_values(_open(path))
    if instance or values.max() <= 1:
        return values > 0
    return values >= 128  # JPEG masks (Kvasir) carry compression noise around 0 and 255


def load_label_map(path):
    """An integer label map (H, W) int64 from a PNG/TIFF of class indices (palette = indices)."""
    image = _open(path)
    if image.mode == "P":  # a palette PNG stores the class index; the palette is only colour
        return np.asarray(image).astype(np.int64)
    return _mask_values(image).astype(np.int64)


def resize_image(image, size):
    """Resize a uint8 (H, W, C) image to (size, size) bilinearly with antialiasing."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    pil = Image.fromarray(image)
    return np.asarray(pil.resize((size, size), Image.BILINEAR, reducing_gap=None))


def resize_mask(mask, size, shape=None):
    """Resize a mask or label map to (size, size), or to `shape` (H, W), nearest-neighbour.

    The dtype is kept, so a binary mask stays binary.
    """
    height, width = shape if shape is not None else (size, size)
    if mask.shape[0] == height and mask.shape[1] == width:
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
    """Write image | overlay of prediction (and ground truth contour colour) side by side."""
    image = np.asarray(image, dtype=np.uint8)
    pred = np.asarray(pred).astype(np.int64)
    colours = PALETTE[pred % len(PALETTE)]
    blended = np.where(pred[..., None] > 0, 0.55 * image + 0.45 * colours, image)
    panels = [image, blended.astype(np.uint8)]
    if gt is not None:
        gt = np.asarray(gt).astype(np.int64)
        panels.append(np.where(gt[..., None] > 0, 0.55 * image + 0.45 * PALETTE[gt % 14],
                               image).astype(np.uint8))
    Image.fromarray(np.concatenate(panels, axis=1)).save(path)


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
    if name in MASK_FOLDERS or name.endswith("_groundtruth") or re.fullmatch(r"imd\d+_lesion", name):
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


def find_pairs(root):
    """Image/mask pairs under `root`, paired by key within a folder context, never by position.

    Returns a list of dicts {key, image, masks, context} sorted naturally. Stops with one line
    naming the file when an image has no mask, a mask has no image, or a key repeats.
    A BUSI image with several masks (`_mask`, `_mask_1`) gets all of them (their union is used).
    """
    root = Path(root)
    if not root.is_dir():
        fail(f"data folder not found: {root}")
    images, masks = {}, {}
    for path in sorted(root.rglob("*"), key=lambda p: natural_key(str(p))):
        relative = path.relative_to(root)
        if not path.is_file() or _skip(relative):
            continue
        roles = [_folder_role(part) for part in relative.parts[:-1]]
        role = next((r for r in reversed(roles) if r), None)
        tagged = MASK_TAG.search(path.stem) is not None
        role = role or ("mask" if tagged else "image")
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
        pairs.append({"key": key, "image": str(image), "context": context,
                      "masks": [str(p) for p in masks[(context, key)]]})
    return pairs


def _split_of(pair, root):
    """('train'|'val'|'test'|None, test group name) from the path or GlaS file prefix."""
    parts = Path(pair["image"]).relative_to(root).parts
    for index, part in enumerate(parts[:-1]):
        words = set(re.split(r"[^a-z]+", part.lower()))
        for split, tokens in (("test", {"test", "testdataset"}), ("val", {"val", "valid",
                              "validation"}), ("train", {"train", "training", "traindataset"})):
            if words & tokens:
                rest = [p for p in parts[index + 1:-1] if _folder_role(p) is None]
                return split, (rest[0] if split == "test" and rest else "test")
    stem = Path(pair["image"]).stem.lower()  # GlaS: train_12, testA_3, testB_7
    match = re.match(r"(train|testa|testb)_\d+$", stem)
    if match:
        return ("train", None) if match.group(1) == "train" else ("test", "test")
    return None, None


def discover_splits(root, seed=0, val_fraction=0.1, fractions=(0.8, 0.1, 0.1)):
    """Split pairs into {'train', 'val', 'test': {group: pairs}} and say where the split came from.

    Official splits come from the layout (ISIC Training/Validation/Test folders, VM-UNet's
    train/val where 'val' is the test set, the PraNet TrainDataset/TestDataset/<set> package,
    GlaS name prefixes). Without one, a seeded 80/10/10 split. When the layout has train and
    test but no validation set, `val_fraction` of train is held out (0: no validation).
    """
    root = Path(root)
    pairs = find_pairs(root)
    tagged = [(_split_of(p, root), p) for p in pairs]
    splits = {s for (s, _), _ in tagged}
    rng = random.Random(seed)
    if None in splits or "train" not in splits or splits == {"train"}:
        order = list(pairs)
        rng.shuffle(order)
        n_train = round(fractions[0] * len(order))
        n_val = round(fractions[1] * len(order))
        result = {"train": order[:n_train], "val": order[n_train:n_train + n_val],
                  "test": {"test": order[n_train + n_val:]}}
        source = f"seeded {fractions[0]:.0%}/{fractions[1]:.0%}/{fractions[2]:.0%} split, seed {seed}"
    else:
        train = [p for (s, _), p in tagged if s == "train"]
        val = [p for (s, _), p in tagged if s == "val"]
        tests = {}
        for (s, group), p in tagged:
            if s == "test":
                tests.setdefault(group, []).append(p)
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
    if not result["train"]:
        fail(f"no training pairs found under {root}")
    result["source"] = source
    return result


def find_slice_files(root):
    """TransUNet-style multi-class files: {'train': [npz], 'val': [...], 'test': [npz|h5]}.

    Synapse: train_npz/*.npz and test_vol_h5/*.npy.h5; ACDC (MT-UNet package): train/, valid/,
    test/ folders of *.npz (test files are volumes). Returns None if `root` has neither layout.
    """
    root = Path(root)
    layouts = [("train_npz", None, "test_vol_h5"), ("train", "valid", "test")]
    for train_dir, val_dir, test_dir in layouts:
        train = sorted((root / train_dir).glob("*.npz"), key=lambda p: natural_key(p.name))
        if train:
            test_folder = root / test_dir
            test = sorted(list(test_folder.glob("*.npz")) + list(test_folder.glob("*.h5")),
                          key=lambda p: natural_key(p.name))
            val = sorted((root / val_dir).glob("*.npz")) if val_dir else []
            return {"train": train, "val": val, "test": test}
    return None


# ==== 5. Datasets (binary pairs, multi-class slices and volumes, toy data) ====

def _to_tensor(image, mean, std):
    """uint8 (H, W, 3) -> normalised float (3, H, W)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def random_flip_rotate(image, mask, rng, rotate_degrees=0.0, rot90=False):
    """Random horizontal/vertical flips, optional rot90 and small rotation, same for both."""
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    if rng.random() < 0.5:
        image, mask = image[::-1], mask[::-1]
    if rot90:
        k = rng.randrange(4)
        image, mask = np.rot90(image, k), np.rot90(mask, k)
    if rotate_degrees:
        angle = rng.uniform(-rotate_degrees, rotate_degrees)
        image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).rotate(
            angle, Image.BILINEAR))
        mask = np.asarray(Image.fromarray(np.ascontiguousarray(mask).astype(np.uint8)).rotate(
            angle, Image.NEAREST))
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


class PairDataset(torch.utils.data.Dataset):
    """Image/mask pairs from disk, resized to `size`; binary masks or integer label maps.

    Item: {'image': (3, S, S) float, 'mask': (1, S, S) float in {0, 1} (binary) or (S, S) int64
    (labels), 'index': int}. `full(i)` returns the image and mask at their original size, which
    is where the papers evaluate.
    """

    def __init__(self, pairs, size, augment=None, labels=False, instance=False,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, seed=0):
        self.pairs, self.size, self.augment = pairs, size, augment
        self.labels, self.instance, self.mean, self.std = labels, instance, mean, std
        self.rng = random.Random(seed)
        self.names = [Path(p["image"]).stem for p in pairs]

    def __len__(self):
        return len(self.pairs)

    def full(self, index, size_hint=None):
        """(image uint8 (H, W, 3), mask bool (H, W) or labels int64) at the original size."""
        pair = self.pairs[index]
        image = load_image(pair["image"], size_hint)
        if self.labels:
            mask = load_label_map(pair["masks"][0])
        else:
            mask = np.logical_or.reduce([load_mask(m, self.instance) for m in pair["masks"]])
        if mask.shape != image.shape[:2] and size_hint is None:
            fail(f"mask {pair['masks'][0]} is {mask.shape[1]}x{mask.shape[0]} but its image "
                 f"{pair['image']} is {image.shape[1]}x{image.shape[0]}")
        return image, mask

    def __getitem__(self, index):
        image, mask = self.full(index)
        image, mask = resize_image(image, self.size), resize_mask(mask, self.size)
        if self.augment is not None:
            image, mask = self.augment(image, mask, self.rng)
        item = {"image": _to_tensor(image, self.mean, self.std), "index": index}
        if self.labels:
            item["mask"] = torch.from_numpy(np.ascontiguousarray(mask)).long()
        else:
            item["mask"] = torch.from_numpy(np.ascontiguousarray(mask)).float()[None]
        return item


def _read_npz_or_h5(path):
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


def _gray_to_tensor(image, size, channels):
    """float (H, W) slice in [0, 1] -> (channels, S, S) float, bilinear resize."""
    x = torch.from_numpy(np.ascontiguousarray(image, np.float32))[None, None]
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x[0].expand(channels, -1, -1).contiguous()


class SliceDataset(torch.utils.data.Dataset):
    """2-D multi-class slices (TransUNet npz): {'image': (C, S, S), 'mask': (S, S) int64}."""

    def __init__(self, files, size, augment=None, channels=3, seed=0):
        self.files, self.size, self.augment, self.channels = files, size, augment, channels
        self.rng = random.Random(seed)
        self.names = [Path(f).stem for f in files]

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        image, label = _read_npz_or_h5(self.files[index])
        if image.ndim != 2:
            fail(f"{self.files[index]} holds a {image.ndim}-D array; training expects 2-D slices")
        if self.augment is not None:
            image, label = self.augment(image, label, self.rng)
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
        image, label = _read_npz_or_h5(self.files[index])
        if image.ndim == 2:
            image, label = image[None], label[None]
        return image, label, self.names[index]


def _smooth_noise(rng, size, scale):
    """Smooth random field in about [-1, 1]: white noise blurred by a box of width `scale`."""
    from scipy.ndimage import uniform_filter
    field = uniform_filter(rng.standard_normal((size + 2 * scale, size + 2 * scale)), scale)
    field = field[scale:scale + size, scale:scale + size]
    return field / (np.abs(field).max() + 1e-8)


def _irregular_blob(rng, size, center, radius, wobble):
    """Boolean (size, size) blob whose radius varies with angle: r(t) = r0 (1 + sum a_k sin(k t))."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = yy - center[0], xx - center[1]
    theta = np.arctan2(dy, dx)
    r = np.ones_like(theta)
    for k in range(2, 6):
        r += wobble * rng.uniform(-1, 1) / k * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
    stretch = rng.uniform(0.7, 1.3)
    return (dy / stretch) ** 2 + (dx * stretch) ** 2 <= (radius * r) ** 2


def make_toy_binary(index, size, seed=0):
    """One toy binary sample (image uint8 (S, S, 3), mask bool (S, S)), deterministic in (seed, index).

    A textured lesion-like blob (1-2 lobes, wobbly boundary, sometimes cut by the border) on a
    textured background; colour contrast varies from clear to faint, plus noise and a decoy
    spot of lesion colour but wrong texture, so it is learnable but not trivial.
    """
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
TOY_ORGANS = [(0.42, 0.50, 0.06, 0.95, 0), (0.30, 0.70, 0.07, 0.45, 16), (0.55, 0.28, 0.08, 0.75, 8),
              (0.55, 0.72, 0.08, 0.75, 8), (0.35, 0.30, 0.16, 0.60, 4), (0.50, 0.50, 0.08, 0.52, 16),
              (0.40, 0.80, 0.09, 0.66, 4), (0.68, 0.52, 0.12, 0.38, 8)]
TOY_CLASS_NAMES = ["vessel", "sac", "bean L", "bean R", "big", "tail", "round", "pouch"]


def make_toy_multiclass(index, size, seed=0):
    """One toy slice (image float32 (S, S) in [0, 1], labels int64 (S, S) in 0..8).

    4-8 of eight organ-like regions in a body ellipse; each class has a typical place, size,
    intensity and texture (the two 'beans' differ only by side), all jittered, plus noise.
    """
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


class ToyBinary(torch.utils.data.Dataset):
    """The built-in binary toy set (deterministic for a seed); items like PairDataset's."""

    def __init__(self, n, size, seed=0, augment=None, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.n, self.size, self.seed, self.augment = n, size, seed, augment
        self.mean, self.std = mean, std
        self.rng = random.Random(seed)
        self.names = [f"toy_{seed}_{i:04d}" for i in range(n)]
        self.cache = {}

    def __len__(self):
        return self.n

    def full(self, index, size_hint=None):
        """(image uint8, mask bool) at the generated size (generated once, then cached)."""
        if index not in self.cache:
            self.cache[index] = make_toy_binary(index, self.size, self.seed)
        return self.cache[index]

    def __getitem__(self, index):
        image, mask = self.full(index)
        if self.augment is not None:
            image, mask = self.augment(image, mask, self.rng)
        return {"image": _to_tensor(image, self.mean, self.std),
                "mask": torch.from_numpy(np.ascontiguousarray(mask)).float()[None],
                "index": index}


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
def predict_volume(logits_fn, volume, size, channels=3, device="cpu", batch=16):
    """Label volume (D, H, W) int64: each slice resized to `size`, argmax of `logits_fn`, resized back.

    `logits_fn` maps (n, channels, size, size) float to (n, K, size, size) logits; the prediction
    is brought back to the slice's own H x W nearest-neighbour, as the TransUNet test does.
    """
    labels = []
    for start in range(0, volume.shape[0], batch):
        x = torch.stack([_gray_to_tensor(s, size, channels) for s in volume[start:start + batch]])
        pred = logits_fn(x.to(device)).argmax(dim=1).cpu().numpy()  # (n, S, S)
        labels.extend(resize_mask(p, 0, volume.shape[1:]) for p in pred)
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
        for split, count in (("train_npz", n), ("test_npz", max(1, n // 5))):
            (out / split).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image, label = make_toy_multiclass(i + (0 if split == "train_npz" else n),
                                                   size, seed)
                np.savez_compressed(out / split / f"case{i:04d}_slice000.npz", image=image,
                                    label=label)
    else:
        fail(f"unknown toy kind '{kind}' (binary or multiclass)")
    return out


def load_data(args, task="binary", augment=None, toy_sizes=(160, 20, 40), instance=False,
              mean=IMAGENET_MEAN, std=IMAGENET_STD, channels=3):
    """The train/val/test data for a run: {'train', 'val', 'test': {group: dataset}, 'source'}.

    `args.data` is 'toy' (built-in data) or a folder. Binary tasks read image/mask pairs
    (`discover_splits`); multi-class tasks read TransUNet npz/h5 files (`find_slice_files`) or
    pairs of images and label-map PNGs. Test sets of multi-class tasks are VolumeDatasets.
    """
    size, seed = args.img_size, args.seed
    if args.data == "toy":
        n_train, n_val, n_test = toy_sizes
        if task == "binary":
            make = lambda n, s, aug: ToyBinary(n, size, s, aug, mean, std)  # noqa: E731
        else:
            make = lambda n, s, aug: ToyMulticlass(n, size, s, aug, channels)  # noqa: E731
        return {"train": make(n_train, seed + 1, augment), "val": make(n_val, seed + 2, None),
                "test": {"toy": make(n_test, seed + 3, None)},
                "source": f"built-in {task} toy data (seed {seed})", "splits": None}
    root = Path(args.data)
    if not root.exists():
        fail(f"--data {args.data}: no such folder (give a data folder, or 'toy')")
    if not root.is_dir():
        fail(f"--data {args.data}: not a folder")
    if task != "binary":
        files = find_slice_files(root)
        if files is not None:
            val = SliceDataset(files["val"], size, None, channels) if files["val"] else None
            tests = {"test": VolumeDataset(files["test"])} if files["test"] else {}
            return {"train": SliceDataset(files["train"], size, augment, channels, seed),
                    "val": val, "test": tests, "splits": None,
                    "source": f"TransUNet-style slices in {root} ({len(files['train'])} train)"}
    split = discover_splits(root, seed, getattr(args, "val_fraction", 0.1))
    labels = task != "binary"
    make = lambda pairs, aug: PairDataset(pairs, size, aug, labels, instance, mean, std,  # noqa
                                          seed)
    return {"train": make(split["train"], augment),
            "val": make(split["val"], None) if split["val"] else None,
            "test": {g: make(p, None) for g, p in split["test"].items()},
            "source": f"{root}: {split['source']}",
            "splits": {"train": [p["image"] for p in split["train"]],
                       "val": [p["image"] for p in split["val"]],
                       "test": {g: [p["image"] for p in ps] for g, ps in split["test"].items()}}}


# ==== 6. Run plumbing: flags, seeding, device, DDP, run folder, checkpoints ====

def add_common_args(parser, paper, source):
    """The command line every script shares (DESIGN.md); `paper` holds the paper's recipe values.

    Flags left unset are filled by `finish_args`: the paper's value with real data, the script's
    toy value with the toy data.
    """
    group = parser.add_argument_group("shared flags (common.py)")
    group.add_argument("--data", default="toy", help="data folder, or 'toy' (default: toy)")
    group.add_argument("--preset", choices=["paper", "small", "tiny"], default=None,
                       help="model size (default: paper with real data, small with toy data)")
    for flag, kind in (("epochs", int), ("batch-size", int), ("lr", float), ("img-size", int)):
        name = flag.replace("-", "_")
        group.add_argument(f"--{flag}", type=kind, default=None,
                           help=f"(paper: {paper[name]}, {source})")
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
    group.add_argument("--pretrained", default="none",
                       help="backbone weights: auto (download), none, or a file path")
    group.add_argument("--val-fraction", type=float, default=0.1,
                       help="share of train held out when the layout has no validation set")
    group.add_argument("--limit-batches", type=int, default=0,
                       help="stop each epoch after N batches (quick checks; 0 = all)")
    return parser


def finish_args(args, paper, toy):
    """Fill unset flags (paper values with real data, `toy` values with toy data); check them."""
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
    for name in ("epochs", "batch_size", "img_size"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    if args.lr <= 0:
        fail(f"--lr must be positive (got {args.lr})")
    if args.predict and not args.checkpoint:
        fail("--predict DIR needs --checkpoint CKPT")
    return args


def seed_everything(seed):
    """Seed Python, NumPy and PyTorch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def choose_device(name="auto"):
    """torch.device for 'auto' (CUDA, then MPS, then CPU) or an explicit choice."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA GPU is visible")
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def save_checkpoint(path, state):
    """torch.save `state` atomically: write a temporary file, fsync, then rename over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, script=None):
    """Load a checkpoint dict; stop with one line if it is missing, truncated or foreign."""
    path = Path(path)
    if not path.is_file():
        fail(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        fail(f"cannot read checkpoint {path} (truncated or not a PyTorch file): "
             f"{type(error).__name__}")
    if not isinstance(state, dict) or "model" not in state:
        fail(f"{path} is not a checkpoint of this repository (no 'model' entry)")
    if script and state.get("script") != script:
        fail(f"{path} was written by {state.get('script')}, not {script}")
    return state


def make_loader(dataset, batch_size, train, workers=0, seed=0):
    """A DataLoader; in a torchrun job the training loader shards the data across processes."""
    sampler = None
    if train and torch.distributed.is_available() and torch.distributed.is_initialized():
        sampler = torch.utils.data.distributed.DistributedSampler(dataset, shuffle=True, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
        num_workers=workers, drop_last=False, generator=generator,
        worker_init_fn=lambda w: seed_everything(seed * 100 + w),
        persistent_workers=workers > 0)


def progress(iterable, desc, enabled=True, total=None):
    """A tqdm progress bar on the main process (plain iterable elsewhere or if tqdm is absent)."""
    if not enabled or os.environ.get("NO_PROGRESS"):
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True,
                mininterval=1.0)


class Run:
    """One run: device, torchrun rank, the run folder and its files (config, log, metrics).

    Only rank 0 writes files and prints; `Run.log` and the file methods are no-ops elsewhere.
    """

    def __init__(self, args, script):
        self.script = script
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
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.out = Path(args.out or Path("runs") / script / stamp)
        if self.is_main:
            (self.out / "predictions").mkdir(parents=True, exist_ok=True)
        self.log_path = self.out / "log.csv"

    def log(self, *message):
        """Print on the main process."""
        if self.is_main:
            print(*message, flush=True)

    def save_json(self, name, obj):
        """Write `obj` as indented JSON into the run folder."""
        if self.is_main:
            text = json.dumps(obj, indent=2, default=str)
            (self.out / name).write_text(text + "\n")

    def log_epoch(self, row):
        """Append one row (a dict) to log.csv, writing the header the first time."""
        if not self.is_main:
            return
        new = not self.log_path.exists()
        with open(self.log_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v)
                             for k, v in row.items()})

    def checkpoint(self, name, state):
        """Save `state` (plus the script name) atomically as <out>/<name> on the main process."""
        if self.is_main:
            save_checkpoint(self.out / name, dict(state, script=self.script))

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


def peak_memory_mb(device):
    """Peak memory so far: CUDA allocator peak, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def benchmark(model, train_step, infer_step, batch_size, device, repeats=3, **extra):
    """Time `train_step()` and `infer_step()` (each handles one batch); return the JSON record.

    One warm-up call each, then the median of `repeats` timed calls.
    """
    def timed(step):
        """Median seconds of one call after a warm-up call."""
        step()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    params = sum(p.numel() for p in model.parameters())
    infer = timed(infer_step)
    train = timed(train_step) if train_step is not None else float("nan")
    record = {"params_M": round(params / 1e6, 3), "batch_size": batch_size,
              "train_images_per_s": round(batch_size / train, 3),
              "inference_images_per_s": round(batch_size / infer, 3),
              "peak_memory_MB": round(peak_memory_mb(device), 1), "device": str(device),
              "threads": torch.get_num_threads()}
    record.update(extra)
    return record


# ==== 7. Selective scan (Mamba's S6), used by cmssm_unet.py and mfel.py ====
# SCAN-BLOCK (placeholder: the plain loop until the fast path lands)

def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False):
    """mamba-ssm's selective_scan_fn semantics, computed by the plain loop (placeholder)."""
    dtype = u.dtype
    u, delta, A, B, C = (t.float() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.float()[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    def expand(M):
        """B or C as (batch, dim, N, L)."""
        if M.dim() == 2:
            return M[None, :, :, None].expand(batch, dim, M.shape[1], length)
        if M.dim() == 3:
            M = M[:, None]
        return M.repeat_interleave(dim // M.shape[1], dim=1)
    B, C = expand(B), expand(C)
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * B[..., t] * u[:, :, t, None]
        ys.append((h * C[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.float()[None, :, None] * u
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype)
    return (y, h) if return_last_state else y


selective_scan_reference = selective_scan


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
