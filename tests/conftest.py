"""Test set-up: import the scripts from the repository root; no progress bars in test logs."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_PROGRESS", "1")
# Idle OpenMP threads that spin slow a shared 2-core machine several-fold; must precede torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
