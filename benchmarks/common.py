"""What the benchmarks share with the tests: tests/e2e/livesite.py (run/stop a server) and tests/conftest.py (data
paths, make_checkpoint). tests/ is not an installed package, so they are loaded by path, not via sys.path."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_spec = importlib.util.spec_from_file_location("livesite", ROOT / "tests" / "e2e" / "livesite.py")
livesite = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(livesite)
conftest = livesite.conftest_module()
