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

from horovod_nuq import compressor as _compressor_module
from horovod_nuq import local as _local


@pytest.fixture(autouse=True)
def _single_process_collectives(monkeypatch):
    """Route every Compressor (numpy, torch and tf tensors) through horovod_nuq.local.

    Without this, torch/tf tensors would import horovod_nuq.{torch,tensorflow}.collectives,
    which need an initialized Horovod.
    """
    monkeypatch.setattr(_compressor_module.Compressor, "_collectives",
                        lambda self, xp: _local)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _helpers.FIGURES:
        return
    terminalreporter.section("horovod_nuq measured figures")
    for key in sorted(_helpers.FIGURES):
        terminalreporter.write_line(f"{key}: {_helpers.FIGURES[key]}")
