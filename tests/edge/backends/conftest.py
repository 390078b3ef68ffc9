"""Makes ``tests/edge/model_factory.py`` importable as ``model_factory``."""

import sys
from pathlib import Path

_EDGE_TESTS = str(Path(__file__).resolve().parents[1])
if _EDGE_TESTS not in sys.path:
    sys.path.insert(0, _EDGE_TESTS)
