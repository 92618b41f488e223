"""Test set-up: import the scripts from the repository root; no progress bars in test logs."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_PROGRESS", "1")
# Idle OpenMP threads that spin slow a shared 2-core machine several-fold; must precede torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One intra-op thread for every test: the tensors here are tiny, and on a shared 2-core
    machine a second thread only spins against other jobs. Subprocesses (torchrun, notebook
    kernels) inherit OMP_NUM_THREADS."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)
