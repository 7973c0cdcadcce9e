"""kernels.load(): compiles the shipped C source into the cache once, reuses it, and when the
source or a compiler is missing warns exactly once and returns None so the generic codec runs."""
from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest

import horovod_nuq as H
from horovod_nuq import engines, kernels
from horovod_nuq.backends import backend_for

HAVE_CC = shutil.which("cc") or shutil.which("gcc")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A kernels module that has not tried to load yet, caching into an empty directory."""
    monkeypatch.setattr(kernels, "_lib", False)
    monkeypatch.setenv("HOROVOD_NUQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HOROVOD_NUQ_KERNELS", raising=False)
    monkeypatch.delenv("CC", raising=False)
    return tmp_path


def load_and_collect(times: int = 2):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [kernels.load() for _ in range(times)]
    return results, [w for w in caught if "horovod_nuq" in str(w.message)]


def test_missing_source_warns_once(fresh, monkeypatch):
    monkeypatch.setattr(kernels, "SOURCE", fresh / "csrc" / "nuq_kernels.c")
    results, warned = load_and_collect()
    assert results == [None, None]
    assert len(warned) == 1 and warned[0].category is RuntimeWarning
    assert "C source missing" in str(warned[0].message) and "generic codec" in str(warned[0].message)


def test_missing_compiler_warns_once(fresh, monkeypatch):
    monkeypatch.setenv("CC", str(fresh / "no-such-cc"))
    results, warned = load_and_collect()
    assert results == [None, None]
    assert len(warned) == 1 and "no-such-cc" in str(warned[0].message)
    assert not (fresh / "cache" / "kernels").exists() or not list((fresh / "cache" / "kernels").iterdir())


def test_no_compiler_on_path_warns_once(fresh, monkeypatch):
    monkeypatch.setattr(kernels.shutil, "which", lambda name: None)
    results, warned = load_and_collect()
    assert results == [None, None] and len(warned) == 1
    assert "no C compiler found" in str(warned[0].message)


def test_failing_compiler_warns_once(fresh, monkeypatch):
    cc = fresh / "broken-cc"
    cc.write_text("#!/bin/sh\necho 'broken-cc: internal error' >&2\nexit 1\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    results, warned = load_and_collect()
    assert results == [None, None] and len(warned) == 1
    assert "could not compile" in str(warned[0].message) and "internal error" in str(warned[0].message)


def test_disabled_is_silent(fresh, monkeypatch):
    monkeypatch.setenv("HOROVOD_NUQ_KERNELS", "0")
    results, warned = load_and_collect()
    assert results == [None, None] and warned == []


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
def test_compiles_once_then_reuses_cache(fresh, monkeypatch):
    assert kernels.SOURCE.is_file(), "the C source ships inside the package"
    results, warned = load_and_collect()
    assert warned == [] and results[0] is not None and results[1] is results[0]
    built = list((fresh / "cache" / "kernels").glob("nuq_kernels_*.so"))
    assert len(built) == 1
    for name in kernels._SIGNATURES:
        assert getattr(results[0], name).argtypes is not None
    # a second process (simulated): the cached library loads without any compiler
    monkeypatch.setattr(kernels, "_lib", False)
    monkeypatch.setenv("CC", str(fresh / "no-such-cc"))
    results, warned = load_and_collect(1)
    assert warned == [] and results[0] is not None


def test_compressor_falls_back_to_generic_engine(fresh, monkeypatch):
    monkeypatch.setattr(kernels, "SOURCE", fresh / "missing.c")
    x = np.random.default_rng(0).standard_normal(5000).astype(np.float32)
    comp = H.NUQCompressor(bits=4, seed=0, protocol="allgather")
    with pytest.warns(RuntimeWarning, match="fused CPU kernels unavailable"):
        engine = comp.codec.engine(backend_for(x), x)
    assert type(engine) is engines.GenericEngine
    payload, ctx = comp.compress_for_allgather(x)
    out = comp.decompress_gathered(payload, ctx)
    assert np.asarray(out).shape == x.shape and np.isfinite(np.asarray(out)).all()
