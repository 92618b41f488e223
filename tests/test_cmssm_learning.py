"""CM-SSM U-Net learns small, low-contrast lesions from scratch (issue 17).

The data set: lesion-like images made for this check with common's blob and texture helpers,
small lobed lesions (about 7 % of the image) of faint colour on a textured skin background with
an illumination gradient and specular spots, at 96 px. VM-UNet's per-image min-max scaling
stretches such images little, because the specular spots already reach the top of the range.
"""
import os
import random

import numpy as np
import torch

import common

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def make_faint_lesion(index, size=96, seed=0):
    """One image (uint8 (S, S, 3)) and mask (bool (S, S)), deterministic in (seed, index)."""
    rng = np.random.default_rng([seed, index, 17])
    center = rng.uniform(0.25, 0.75, 2) * size
    mask = common._irregular_blob(rng, size, center, rng.uniform(0.12, 0.17) * size, 0.6)
    if rng.random() < 0.5:  # a second, smaller lobe touching the first
        offset = rng.normal(0, 0.08, 2) * size
        mask |= common._irregular_blob(rng, size, center + offset, 0.07 * size, 0.5)
    skin = np.array([0.78, 0.60, 0.52]) + rng.uniform(-0.06, 0.06, 3)
    contrast = rng.uniform(0.06, 0.14)
    lesion = skin + contrast * np.array([-0.4, -1.0, -0.8])
    texture = _texture(rng, size, max(2, size // 10), 0.06)
    image = np.where(mask[..., None], lesion, skin) + texture[..., None]
    image = image + 0.04 * _texture(rng, size, max(2, size // 32), 1.0)[..., None] * mask[..., None]
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(0, 2 * np.pi)  # illumination gradient across the image
    image = image * (1 + 0.15 * ((yy - 0.5) * np.cos(angle) + (xx - 0.5) * np.sin(angle)))[..., None]
    for _ in range(rng.integers(2, 5)):  # specular spots
        cy, cx = rng.uniform(0, size, 2)
        spot = (yy * size - cy) ** 2 + (xx * size - cx) ** 2 <= rng.uniform(1, 2.5) ** 2
        image[spot] = 1.0
    image = image + rng.normal(0, 0.025, image.shape)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8), mask


def _texture(rng, size, scale, amplitude):
    return amplitude * common._smooth_noise(rng, size, scale)


class FaintLesions(torch.utils.data.Dataset):
    """Items like common.ToyBinary's (image in [0, 1], mask (1, S, S)), optionally augmented."""

    def __init__(self, n, size=96, seed=0, augment=None):
        self.samples = [make_faint_lesion(i, size, seed) for i in range(n)]
        self.augment, self.rng = augment, random.Random(seed)
        self.names = [f"faint_{seed}_{i:03d}" for i in range(n)]

    def __len__(self):
        return len(self.samples)

    def full(self, index):
        return self.samples[index]

    def __getitem__(self, index):
        image, mask = self.samples[index]
        if self.augment is not None:
            image, mask = self.augment(image, mask, self.rng)
        return {"image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1) / 255.0,
                "mask": torch.from_numpy(np.ascontiguousarray(mask)).float()[None],
                "index": index}


def test_full_small_model_learns_faint_small_lesions_from_scratch():
    """The full model (SE, CMN, CRA, both FD terms) on 64 training images: test DSC > 0.5 after
    40 steps. With VM-UNet's [0, 255] input scaling instead it stays near 0 this early: 99 % of
    every token's energy after the patch embedding's LayerNorm is then one image-wide constant."""
    import cmssm_unet as m
    torch.manual_seed(0)
    train = FaintLesions(64, 96, seed=1, augment=m.VMUNetAugment())
    test = FaintLesions(24, 96, seed=3)
    model = m.build_model("small")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=m.WEIGHT_DECAY)
    loader = common.make_loader(train, 8, train=True)
    for epoch in range(5):
        losses = m.train_one_epoch(model, loader, optimizer, torch.device("cpu"), {},
                                   "standardise", show_progress=False)
        assert losses["cfd"] > 0 and losses["ifd"] > 0
    scores = m.evaluate(model, test, torch.device("cpu"), 12, input_norm="standardise")
    assert scores["DSC"] > 0.5, scores
