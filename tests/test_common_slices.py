"""common.py helpers for TransUNet-style slice data: cubic resizing, read_slice, count_labels,
file prefixes of Run.end_epoch / Run.restore, adopt_config(check_only=True)."""
import argparse

import numpy as np
import pytest
import torch
from scipy.ndimage import zoom  # TransUNet's calls: zoom(image, (S/x, S/y), order=3 / 0)

import common


def write_slice(path, image, label, key="image"):
    np.savez(path, **{key: image, "label": label})
    return path


def test_slice_dataset_cubic_is_transunets_zoom_after_the_augmentation(tmp_path):
    rng = np.random.default_rng(0)
    image, label = rng.random((8, 12)).astype(np.float32), rng.integers(0, 4, (8, 12))
    path = write_slice(tmp_path / "a.npz", image, label)
    crop = lambda im, lab, r: (im[::-1, 4:].copy(), lab[::-1, 4:].copy())  # noqa: E731
    item = common.SliceDataset([path], 24, crop, channels=2, resize="cubic")[0]
    assert item["image"].shape == (2, 24, 24) and item["mask"].shape == (24, 24)
    assert np.allclose(item["image"][1].numpy(), zoom(image[::-1, 4:], (3, 3), order=3),
                       atol=1e-6)
    assert np.array_equal(item["mask"].numpy(), zoom(label[::-1, 4:], (3, 3), order=0))
    plain = common.SliceDataset([path], 24, crop, channels=2)[0]  # default: unchanged bilinear
    assert not np.allclose(plain["image"][0].numpy(), item["image"][0].numpy(), atol=1e-3)


def test_predict_volume_cubic_feeds_zoomed_slices_and_zooms_back_nearest():
    fed = []

    def logits_fn(x):  # (n, 2, S, S) -> (n, 3, S, S), different for every slice
        fed.append(x)
        g = torch.Generator().manual_seed(len(fed))
        return torch.rand(x.shape[0], 3, *x.shape[2:], generator=g) + x[:, :1]

    volume = np.random.default_rng(1).random((3, 24, 40)).astype(np.float32)
    pred = common.predict_volume(logits_fn, volume, 32, channels=2, batch=2, resize="cubic")
    assert pred.shape == (3, 24, 40) and len(fed) == 2
    assert np.allclose(fed[1][0, 1].numpy(), zoom(volume[2], (32 / 24, 32 / 40), order=3),
                       atol=1e-6)
    again = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) + fed[1][:, :1]
    expected = zoom(again.argmax(1)[0].numpy(), (24 / 32, 40 / 32), order=0)
    assert np.array_equal(pred[2], expected)
    bilinear = common.predict_volume(lambda x: (fed.append(x), x[:, :1].repeat(1, 3, 1, 1))[1],
                                     volume, 32, channels=2)
    assert not torch.allclose(fed[-1][2, 0], fed[1][0, 0], atol=1e-3)  # default: unchanged
    assert bilinear.shape == (3, 24, 40)


def test_read_slice_and_count_labels(tmp_path):
    a = write_slice(tmp_path / "a.npz", np.zeros((4, 6), np.float32), np.eye(4, 6) * 2, "img")
    b = write_slice(tmp_path / "b.npz", np.ones((2, 4, 6), np.float32),
                    np.full((2, 4, 6), 0) + (np.arange(6) == 5) * 7)  # a 3-D volume, rare id 7
    image, label = common.read_slice(a)
    assert image.dtype == np.float32 and label.dtype == np.int64 and label.max() == 2
    png = tmp_path / "c.png"
    common.save_label_png(png, np.array([[0, 9], [1, 0]]))
    assert common.count_labels([a]) == 3
    assert common.count_labels([a, b]) == 8 and common.count_labels([a, png]) == 10
    neg = write_slice(tmp_path / "n.npz", np.zeros((2, 2), np.float32), -np.eye(2))
    with pytest.raises(common.UserError, match="n.npz: the label map holds the negative id -1"):
        common.count_labels([a, neg])
    empty = write_slice(tmp_path / "e.npz", np.zeros((2, 2), np.float32), np.zeros((2, 2)))
    with pytest.raises(common.UserError, match="no foreground label"):
        common.count_labels([empty])


def namespace(tmp_path, **overrides):
    values = dict(data="toy", preset="tiny", epochs=4, out=str(tmp_path / "a"), resume=None,
                  device="cpu", seed=0)
    values.update(overrides)
    return argparse.Namespace(**values)


def test_end_epoch_and_restore_with_a_prefix_keep_their_own_files(tmp_path):
    model = torch.nn.Linear(2, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run = common.Run(namespace(tmp_path), "demo")
    for epoch, score in enumerate([0.5, 0.2, 0.4]):  # lower is better: best at epoch 1
        with torch.no_grad():
            model.weight.fill_(epoch)
        run.end_epoch(epoch, {"epoch": epoch}, {"model": model.state_dict()}, score,
                      higher_is_better=False, prefix="recon_")
    files = sorted(p.name for p in (tmp_path / "a").glob("*.pt"))
    assert files == ["recon_best.pt", "recon_last.pt"]
    best = common.load_checkpoint(tmp_path / "a" / "recon_best.pt", "demo")
    assert best["epoch"] == 1 and best["model"]["weight"].eq(1).all()
    resume = tmp_path / "a" / "recon_last.pt"
    resumed = common.Run(namespace(tmp_path, out=str(tmp_path / "b"), resume=str(resume)), "demo")
    start = resumed.restore(common.load_checkpoint(resume, "demo"), model, prefix="recon_")
    assert start == 3 and resumed.best == 0.2 and model.weight.eq(2).all()
    assert sorted(p.name for p in (tmp_path / "b").glob("*.pt")) == ["recon_best.pt"]
    assert common.load_checkpoint(tmp_path / "b" / "recon_best.pt", "demo")["epoch"] == 1


def test_adopt_config_check_only_validates_without_copying():
    args = argparse.Namespace(num_classes=9, width=8, preset="small", preset_reason="--preset",
                              recon_ckpt=None)
    ours = {"config": {"num_classes": 9, "width": 8}, "preset": "small"}
    common.adopt_config(args, ours, ["num_classes", "width"], set(), "--recon-ckpt",
                        check_only=True, path="r.pt")
    assert args.preset_reason == "--preset"  # nothing copied, not even the preset's reason
    other = {"config": {"num_classes": 4, "width": 8}, "preset": "small"}
    with pytest.raises(common.UserError, match="--recon-ckpt r.pt: --num-classes 9 differs "
                                               "from the checkpoint's 4"):
        common.adopt_config(args, other, ["num_classes"], set(), "--recon-ckpt",
                            check_only=True, path="r.pt")
    with pytest.raises(common.UserError, match="--recon-ckpt r.pt: --preset small differs"):
        common.adopt_config(args, dict(ours, preset="tiny"), [], set(), "--recon-ckpt",
                            check_only=True, path="r.pt")
    assert args.num_classes == 9 and args.preset == "small"
