"""torchrun on CPU (gloo): two processes train m2snet and write one run folder, or one per fold."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def torchrun_m2snet(port, *flags, timeout=300):
    """Run m2snet.py (tiny preset, one epoch, 32 px, CPU) on two torchrun processes; must exit 0."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master_port={port}", "m2snet.py", "--preset", "tiny", "--epochs", "1",
               "--img-size", "32", "--batch-size", "2", "--device", "cpu", *flags]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                            env={"OMP_NUM_THREADS": "1", "NO_PROGRESS": "1",
                                 "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]


def test_torchrun_two_processes_on_cpu(tmp_path):
    out = tmp_path / "run"
    torchrun_m2snet(29531, "--toy-sizes", "8,2,2", "--out", str(out))
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert 0.0 <= metrics["toy"]["mDice"] <= 1.0
    rows = (out / "log.csv").read_text().splitlines()
    assert len(rows) == 2  # header + one epoch, written once (rank 0 only)
    assert (out / "last.pt").exists() and (out / "best.pt").exists()


def test_torchrun_busi_cross_validation_runs_all_four_folds(tmp_path):
    """--fold all under torchrun: the process group outlives fold 1 (it closes at exit)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_common_data import write_image, write_mask
    busi = tmp_path / "Dataset_BUSI_with_GT"
    for kind in ("benign", "malignant", "normal"):
        for i in range(1, 6):  # folds of 4, 4, 4, 3: 6 training images per rank
            write_image(busi / kind / f"{kind} ({i}).png", value=40 * i)
            write_mask(busi / kind / f"{kind} ({i})_mask.png", fg=0 if kind == "normal" else 255)
    out = tmp_path / "cv"
    torchrun_m2snet(29532, "--data", str(busi), "--pretrained", "none", "--out", str(out),
                    timeout=240)  # a process group closed after fold 1 hangs fold 2
    summary = json.loads((out / "cv_metrics.json").read_text())
    assert all(len(column["folds"]) == 4 for column in summary.values())
    assert all((out / f"fold{k}" / "test_metrics.json").exists() for k in range(1, 5))


def test_cli_closes_an_open_process_group_at_exit(tmp_path):
    """common.cli tears down a process group that main() left open, also when main() fails."""
    import torch.distributed as dist
    import common
    for k, main in enumerate((lambda: None, lambda: common.fail("bad input"))):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / f'store{k}'}",
                                rank=0, world_size=1)
        try:
            common.cli(main)
        except SystemExit as stop:
            assert stop.code == 2
        assert not dist.is_initialized()
