"""Multi-rank tests run as `mpirun -np N python -m pytest tests/parallel/...` (pytest in every rank)."""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
sys.path.insert(0, os.path.dirname(__file__))
