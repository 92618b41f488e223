"""Test set-up: import the scripts from the repository root; no progress bars in test logs."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_PROGRESS", "1")
