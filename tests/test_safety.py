"""No entry point of any script runs code from a file it is given (issue 19).

Each flag that reads a file gets a checkpoint built to run a shell command when fully unpickled;
the run must stop with one clear line (a UserError) or load only tensors, and the command must
never run.
"""
import importlib
import os

import pytest
import torch

TINY = ["--preset", "tiny", "--img-size", "32", "--batch-size", "2", "--epochs", "1",
        "--limit-batches", "1"]


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


ENTRY_POINTS = [(script, flag) for script in ("m2snet", "dinet", "reseg_unet", "cmssm_unet", "mfel")
                for flag in ("--eval", "--resume", "--checkpoint", "--pretrained")]
ENTRY_POINTS += [("reseg_unet", "--recon-ckpt"), ("m2snet", "--vgg-weights")]


@pytest.mark.parametrize("script, flag", ENTRY_POINTS)
def test_a_file_that_runs_code_never_runs(tmp_path, monkeypatch, script, flag):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"x": torch.ones(1)}, "script": script, "epoch": 0,
                "config": {}, "payload": Payload(marker)}, path)
    module = importlib.import_module(script)
    argv = [*TINY, "--out", str(tmp_path / "run"), flag, str(path)]
    if flag == "--checkpoint":
        (tmp_path / "images").mkdir()
        argv += ["--predict", str(tmp_path / "images")]
    try:
        module.main(argv)
    except Exception as error:  # a one-line UserError is the expected end; anything but running
        assert type(error).__name__ in ("UserError",), f"{type(error).__name__}: {error}"
    except SystemExit:
        pass
    assert not marker.exists(), f"{script} {flag} ran code from the file"
