"""Shared setup for the single-process unit tests (no Horovod, no MPI)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parents[1]
for p in (str(_ROOT), str(_HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import _helpers
import pytest

from horovod_nuq import collectives


@pytest.fixture(autouse=True)
def _single_process_collectives():
    """Route every Compressor (numpy, torch and tf tensors) through the single-process
    collectives; Horovod's would need an initialized Horovod."""
    old = {fw: collectives.register(fw, collectives.LOCAL) for fw in ("torch", "tensorflow")}
    yield
    for fw, coll in old.items():
        if coll is not None:
            collectives.register(fw, coll)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _helpers.FIGURES:
        return
    terminalreporter.section("horovod_nuq measured figures")
    for key in sorted(_helpers.FIGURES):
        terminalreporter.write_line(f"{key}: {_helpers.FIGURES[key]}")
