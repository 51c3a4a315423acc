"""Make the repository root importable (``import nsa_kernels``) however pytest is launched."""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
