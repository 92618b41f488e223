"""Run plumbing of common.py: safe loading, the run folder, resume, per-worker randomness, flags."""
import argparse
import os
import random
import sys

import pytest
import torch

import common


class Evil:
    """Unpickling this runs a shell command that leaves a marker file (what an attacker sends)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_file(tmp_path, with_model=True):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    state = {"model": {"w": torch.ones(2)}, "script": "m2snet", "payload": Evil(marker)}
    torch.save(state if with_model else {"payload": Evil(marker)}, path)
    return path, marker


def test_checkpoint_that_runs_code_is_refused_without_running_it(tmp_path):
    path, marker = evil_file(tmp_path)
    with pytest.raises(common.UserError, match="not a checkpoint of this repository.*posix.system"):
        common.load_checkpoint(path, "m2snet", "--eval")
    assert not marker.exists()


def test_weight_file_loader_never_runs_code_but_keeps_tensors(tmp_path):
    path, marker = evil_file(tmp_path)
    loaded = common.load_weights(path)
    assert not marker.exists()
    assert isinstance(loaded["payload"], common.Foreign)
    assert loaded["payload"].origin == "posix.system"
    assert torch.equal(loaded["model"]["w"], torch.ones(2))
    assert common.tensor_dict(loaded) is loaded["model"]


def write_vmamba_checkpoint(path, weights, config, monkeypatch, tmp_path, **entries):
    """Save `weights` as VMamba's training code does: {'model', ..., 'config'}, where `config`
    (a nested dict here) becomes a yacs CfgNode, a dict subclass with its own attribute state,
    from a throwaway `yacs` package that is gone again before the caller loads the file."""
    package = tmp_path / "fake_site" / "yacs"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "config.py").write_text(
        "class CfgNode(dict):\n"
        "    def __init__(self, init_dict=None, key_list=None, new_allowed=False):\n"
        "        super().__init__(init_dict or {})\n"
        "        self.__dict__['__immutable__'] = False\n"
        "        self.__dict__['__new_allowed__'] = new_allowed\n"
        "    def __getattr__(self, name):\n"
        "        if name in self:\n"
        "            return self[name]\n"
        "        raise AttributeError(name)\n")
    monkeypatch.syspath_prepend(str(tmp_path / "fake_site"))
    from yacs.config import CfgNode

    def node(value):
        return CfgNode({k: node(v) for k, v in value.items()}) if isinstance(value, dict) else value
    torch.save({"model": weights, **entries, "config": node(config)}, path)
    for name in [n for n in sys.modules if n == "yacs" or n.startswith("yacs.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path / "fake_site")])
    with pytest.raises(ImportError):
        __import__("yacs.config")


def test_published_file_with_a_foreign_config_class_loads(tmp_path, monkeypatch):
    # VMamba's checkpoints pickle a yacs CfgNode; load one where no such module exists.
    weights = {"patch_embed.0.weight": torch.randn(96, 3, 4, 4), "head.bias": torch.randn(5)}
    write_vmamba_checkpoint(tmp_path / "vssm.pth", weights,
                            {"MODEL": {"NAME": "vssm", "DEPTHS": [2, 2, 15, 2]}, "LR": 1e-3},
                            monkeypatch, tmp_path, epoch=299)
    loaded = common.load_weights(tmp_path / "vssm.pth")
    assert loaded["epoch"] == 299
    assert loaded["config"].origin == "yacs.config.CfgNode"
    assert loaded["config"]["MODEL"]["DEPTHS"] == [2, 2, 15, 2]
    tensors = common.tensor_dict(loaded)
    assert set(tensors) == set(weights)
    assert all(torch.equal(tensors[k], weights[k]) for k in weights)
    assert "yacs" not in sys.modules


def test_unreadable_weight_file_is_one_line(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a torch file at all")
    with pytest.raises(common.UserError, match="junk.pth: cannot read it"):
        common.load_weights(tmp_path / "junk.pth", "--vgg-weights")
    with pytest.raises(common.UserError, match="--vgg-weights .*no such file"):
        common.load_weights(tmp_path / "missing.pth", "--vgg-weights")


def test_checkpoint_fields_are_checked(tmp_path):
    common.save_checkpoint(tmp_path / "seg.pt", {"model": {}, "script": "reseg_unet",
                                                 "stage": "seg"})
    with pytest.raises(common.UserError, match="--recon-ckpt .*stage is 'seg', expected 'recon'"):
        common.load_checkpoint(tmp_path / "seg.pt", "reseg_unet", "--recon-ckpt", stage="recon")


def test_checkpoint_values_are_made_plain_for_weights_only(tmp_path):
    import numpy as np
    from pathlib import Path
    state = {"model": {"w": torch.ones(1)}, "best": np.float32(0.5), "epoch": np.int64(3),
             "config": {"out": Path("runs/x"), "sizes": (1, 2), "ns": argparse.Namespace(a=1)}}
    common.save_checkpoint(tmp_path / "c.pt", state)
    back = common.load_checkpoint(tmp_path / "c.pt")
    assert back["best"] == 0.5 and back["epoch"] == 3 and type(back["epoch"]) is int
    assert back["config"] == {"out": "runs/x", "sizes": (1, 2), "ns": {"a": 1}}


def test_load_matching_counts_and_refuses_a_foreign_file():
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    lines = []
    tensors = {"backbone.0.weight": torch.randn(4, 3, 3, 3), "backbone.0.bias": torch.randn(4),
               "backbone.1.weight": torch.randn(5)}  # wrong shape: skipped
    loaded, total = common.load_matching(module, tensors, "backbone", "f.pth", lines.append,
                                         prefix="backbone.")
    assert (loaded, total) == (2, 7)
    assert torch.equal(module[0].weight, tensors["backbone.0.weight"])
    assert lines[0].startswith("backbone: 2 of 7 tensors from f.pth")
    with pytest.raises(common.UserError, match="none of its 1 tensors fits"):
        common.load_matching(module, {"x": torch.ones(1)}, "backbone", "g.pth", lines.append)


def test_fetch_weights_offline_is_one_line_and_none(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    def refuse(*args, **kwargs):
        raise OSError("network unreachable")
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    lines = []
    waited = []
    assert common.fetch_weights("https://x/y.pth", "y.pth", lines.append,
                                barrier=lambda: waited.append(1)) is None
    assert waited == [1] and len(lines) == 1 and "training starts from scratch" in lines[0]
    # Another rank never downloads; it reads what rank 0 left in the cache.
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True, exist_ok=True)
    (tmp_path / "hub" / "checkpoints" / "y.pth").write_bytes(b"x")
    assert common.fetch_weights("https://x/y.pth", "y.pth", lines.append, is_main=False).exists()


# ---- the run folder ----

def namespace(tmp_path, **overrides):
    values = dict(data="toy", preset=None, epochs=None, batch_size=None, lr=None, img_size=None,
                  device="cpu", workers=0, seed=0, out=None, resume=None, eval=None,
                  predict=None, checkpoint=None, pretrained="none", val_fraction=0.1)
    values.update(overrides)
    return argparse.Namespace(**values)


RECIPE = {"epochs": 2, "batch_size": 2, "lr": 1e-3, "img_size": 32}


def test_no_folder_until_a_file_is_written_and_names_never_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = common.Run(namespace(tmp_path), "demo")
    second = common.Run(namespace(tmp_path), "demo")
    assert not (tmp_path / "runs").exists()  # a start stopped by bad input leaves nothing
    first.save_json("a.json", {})
    second.save_json("a.json", {})
    folders = sorted((tmp_path / "runs" / "demo").iterdir())
    assert len(folders) == 2 and first.out != second.out


@pytest.mark.parametrize("flag, value, message", [
    ("workers", -1, "--workers must be 0 or more"),
    ("device", "mps", "--device mps: no Apple GPU"),
    ("val_fraction", 1.0, "--val-fraction must lie in"),
])
def test_impossible_flags_are_one_line(tmp_path, flag, value, message):
    if flag == "device" and torch.backends.mps.is_available():
        pytest.fail("this test expects a machine without MPS")
    with pytest.raises(common.UserError, match=message):
        common.finish_args(namespace(tmp_path, **{flag: value}), RECIPE, RECIPE)


def test_unwritable_out_is_one_line(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "file").write_text("x")
    with pytest.raises(common.UserError, match="--out .*cannot write there"):
        common.finish_args(namespace(tmp_path, out=str(locked / "file" / "run")), RECIPE, RECIPE)


def make_epochs(run, model, optimizer, scores, start=0):
    for epoch, score in zip(range(start, start + len(scores)), scores):
        with torch.no_grad():
            model.weight.fill_(epoch)
        run.end_epoch(epoch, {"epoch": epoch, "loss": 1.0 / (epoch + 1)},
                      {"model": model.state_dict(), "optimizer": optimizer.state_dict()}, score)


def test_end_epoch_keeps_best_and_last_and_resume_into_a_new_folder(tmp_path):
    model = torch.nn.Linear(2, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run = common.Run(namespace(tmp_path, out=str(tmp_path / "a"), epochs=4), "demo")
    make_epochs(run, model, optimizer, [0.5, 0.9, 0.7])  # best at epoch 1
    assert run.final_weights("best")["weight"].eq(1).all()
    assert run.final_weights("last")["weight"].eq(2).all()
    assert (tmp_path / "a" / "log.csv").read_text().splitlines()[0] == "epoch,loss"
    # Resume into a new folder; no later epoch beats 0.9, and best.pt must still be there.
    args = namespace(tmp_path, out=str(tmp_path / "b"), resume=str(tmp_path / "a" / "last.pt"),
                     epochs=5)
    resumed = common.Run(args, "demo")
    checkpoint = common.load_checkpoint(args.resume, "demo", "--resume")
    start = resumed.restore(checkpoint, model, optimizer)
    assert start == 3 and resumed.best == 0.9
    make_epochs(resumed, model, optimizer, [0.6, 0.8], start)
    assert resumed.final_weights("best")["weight"].eq(1).all()
    assert resumed.final_weights("last")["weight"].eq(4).all()


def test_no_validation_means_best_is_last(tmp_path):
    model = torch.nn.Linear(2, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run = common.Run(namespace(tmp_path, out=str(tmp_path / "a")), "demo")
    make_epochs(run, model, optimizer, [None, float("nan"), None])
    assert run.final_weights("best")["weight"].eq(2).all()


def test_set_lr_scales_groups():
    a, b = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
    optimizer = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr_scale": 0.1}], lr=1.0)
    common.set_lr(optimizer, 0.5)
    assert [g["lr"] for g in optimizer.param_groups] == [0.5, pytest.approx(0.05)]


def test_explicit_flags_and_adopt_config(tmp_path):
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--eval", default=None)
    parser.add_argument("--preset", default=None)
    argv = ["--depth", "2", "--eval", "x.pt"]
    assert common.explicit_flags(parser, argv) == {"depth", "eval"}
    args = parser.parse_args(argv)
    checkpoint = {"config": {"width": 16, "depth": 3}, "preset": "small"}
    with pytest.raises(common.UserError, match="--eval x.pt: --depth 2 differs from the "
                                               "checkpoint's 3"):
        common.adopt_config(args, checkpoint, ["width", "depth"], {"depth", "eval"}, "--eval")
    common.adopt_config(args, checkpoint, ["width", "depth"], {"eval"}, "--eval")
    assert (args.width, args.depth, args.preset) == (16, 3, "small")


# ---- per-worker and per-rank randomness ----

class Draws(torch.utils.data.Dataset):
    """Each item is one augmentation draw from the dataset's own rng."""

    def __init__(self, n=8):
        self.n, self.rng = n, random.Random(0)

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return torch.tensor(self.rng.random())


def draws(workers, seed=0, context=None, epochs=1):
    loader = common.make_loader(Draws(), 2, train=True, workers=workers, seed=seed,
                                context=context)
    return [round(x.item(), 12) for _ in range(epochs) for batch in loader for x in batch]


def test_two_workers_draw_differently_and_a_seed_repeats():
    values = draws(2)
    assert len(set(values)) == len(values)  # no worker repeats another's draws
    assert draws(2) == values  # the same seed and worker count: the same draws
    assert draws(2, seed=1) != values


def test_ranks_draw_differently(monkeypatch):
    rank0 = draws(0)
    monkeypatch.setenv("RANK", "1")
    assert draws(0) != rank0


def test_workers_start_under_spawn():
    values = draws(2, context="spawn")
    assert len(values) == 8 and len(set(values)) == 8


def test_seed_everything_gives_each_rank_its_own_stream(monkeypatch):
    common.seed_everything(5)
    rank0 = (random.random(), torch.rand(1).item())
    common.seed_everything(5)
    assert (random.random(), torch.rand(1).item()) == rank0
    monkeypatch.setenv("RANK", "1")
    common.seed_everything(5)
    assert random.random() != rank0[0] and torch.rand(1).item() != rank0[1]
