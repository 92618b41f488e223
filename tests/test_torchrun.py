"""torchrun data parallelism on CPU (gloo): two processes train one epoch and write one run folder."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_torchrun_two_processes_on_cpu(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--master_port=29531", "m2snet.py", "--preset", "tiny", "--epochs", "1",
               "--img-size", "32", "--batch-size", "2", "--toy-sizes", "8,2,2",
               "--device", "cpu", "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={"OMP_NUM_THREADS": "1", "NO_PROGRESS": "1",
                                 "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert 0.0 <= metrics["toy"]["mDice"] <= 1.0
    rows = (out / "log.csv").read_text().splitlines()
    assert len(rows) == 2  # header + one epoch, written once (rank 0 only)
    assert (out / "last.pt").exists() and (out / "best.pt").exists()
