"""Fault-injection tests (issue 12): each reproduces one failure of the fault survey."""

import sys
from pathlib import Path

# The shared helpers (tests/helpers.py) live one directory up.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
