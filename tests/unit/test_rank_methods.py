"""The ranking task's pieces without MPI: data split and shards, the model's causality, the
method registry (including the guarded error-feedback / CSER / Local SGD entries) and the
report's loss-target arithmetic. The 2-rank run itself: tests/launch/test_rank_methods_smoke.py."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import charlm_task as task
import rank_methods_registry as registry
import rank_methods_report as report


# ---- data ----------------------------------------------------------------------------------
def _tree(tmp_path, n=5):
    for i in range(n):
        (tmp_path / f"m{i}.py").write_bytes(bytes([65 + i]) * (100 + i))
    return str(tmp_path)


def test_split_is_by_file_and_deterministic(tmp_path):
    root = _tree(tmp_path)
    c = task.load_corpus(val_every=2, root=root)
    # files m1, m3 (every 2nd in sorted order) are held out, whole
    assert set(c.val.tolist()) == {66, 68, 10} and set(c.train.tolist()) == {65, 67, 69, 10}
    assert c.val.numel() == 101 + 103 + 4 and c.files == 5
    assert task.load_corpus(val_every=2, root=root).digest == c.digest


def test_corpus_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="val_every must be >= 2"):
        task.load_corpus(val_every=1, root=_tree(tmp_path))
    with pytest.raises(FileNotFoundError, match="no .py files"):
        task.load_corpus(root=str(tmp_path / "missing"))


def test_shards_are_disjoint_and_batches_reproducible():
    data = torch.arange(1000) % 256
    a, b = task.shard(data, 0, 2), task.shard(data, 1, 2)
    assert a[-1] + 1 == b[0] and a.numel() == b.numel() == 500
    with pytest.raises(ValueError, match="rank must be in"):
        task.shard(data, 2, 2)
    x1, y1 = task.Batches(a.to(torch.uint8), 4, 16, seed=3).next()
    x2, y2 = task.Batches(a.to(torch.uint8), 4, 16, seed=3).next()
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the next bytes
    with pytest.raises(ValueError, match="shorter context"):
        task.Batches(a[:10], 4, 16, seed=0)


def test_val_windows_are_fixed_and_checked():
    val = torch.arange(2000) % 256
    x, y = task.val_windows(val.to(torch.uint8), 8, 32)
    assert x.shape == (8, 32) and torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ValueError, match="too short"):
        task.val_windows(val[:100].to(torch.uint8), 8, 32)


@pytest.mark.parametrize("arch", task.ARCHS)
def test_model_is_causal(arch):
    torch.manual_seed(0)
    m = task.build_model(arch, dim=32, hidden=32, layers=2, heads=2, context=16)
    x = torch.randint(0, 256, (2, 16))
    x2 = x.clone()
    x2[:, 10:] = (x2[:, 10:] + 1) % 256  # change the future
    with torch.no_grad():
        a, b = m(x), m(x2)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])
    with pytest.raises(ValueError, match="multiple of heads"):
        task.CharLM(dim=30, heads=4)
    with pytest.raises(ValueError, match="arch must be one of"):
        task.build_model("gru", 8, 8, 1, 1, 8)


# ---- registry ------------------------------------------------------------------------------
def _ctx(nuq):
    p = torch.nn.Parameter(torch.zeros(3))
    hvd = types.SimpleNamespace(DistributedOptimizer=lambda opt, named_parameters, compression: (
        "hvd", opt, named_parameters, compression), Compression=types.SimpleNamespace(none="NONE", fp16="FP16"))
    return registry.Context(hvd=hvd, nuq=nuq, named_parameters=[("p", p)],
                            base=lambda: torch.optim.SGD([p], lr=0.1), numel=3, seed=7, steps=40)


def test_registry_covers_the_issue_list():
    names = set(registry.METHODS)
    assert {"none", "fp16", "tnq4+ef", "cser", "localsgd"} <= names
    assert {f"{s}{b}" for s in registry.SCHEMES for b in (4, 2)} <= names
    assert {f"{s}2+ef" for s in registry.SCHEMES} <= names
    with pytest.raises(ValueError, match="unknown methods \\['nope'\\]; choose from"):
        registry.select(["none", "nope"])


def test_plain_methods_use_horovods_optimizer():
    import horovod_nuq
    ctx = _ctx(horovod_nuq)
    built = registry.METHODS["fp16"].build(ctx)
    assert built.optimizer[0] == "hvd" and built.optimizer[3] == "FP16" and built.fixed_bytes_per_step == 6
    built = registry.METHODS["tnq2"].build(ctx)
    assert built.optimizer[3] is built.compressor
    assert type(built.compressor).__name__ == "TNQCompressor" and built.compressor.scheme.code_bits == 2
    assert built.compressor.seed == 7


def test_missing_apis_are_reported_not_crashed():
    import horovod_nuq
    nuq = types.SimpleNamespace(COMPRESSORS=horovod_nuq.COMPRESSORS)  # no CSER / LocalSGD here
    for name, what in (("cser", "CSER"), ("localsgd", "LocalSGD")):
        with pytest.raises(registry.Unavailable, match=f"{what} is not available"):
            registry.METHODS[name].build(_ctx(nuq))

    def old_compressor(bits, seed):  # a checkout without the error_feedback option
        return object()

    old = types.SimpleNamespace(COMPRESSORS={s: old_compressor for s in registry.SCHEMES})
    with pytest.raises(registry.Unavailable, match="error_feedback=True"):
        registry.METHODS["qsgd2+ef"].build(_ctx(old))


def test_wrappers_are_called_with_the_agreed_api():
    """CSER / LocalSGD(optimizer, named_parameters=..., compression=...[, total_steps=...])."""
    import horovod_nuq
    calls = {}

    def fake(name):
        def cls(optimizer, named_parameters, compression, **options):
            calls[name] = (optimizer, named_parameters, compression, options)
            return name
        return cls

    nuq = types.SimpleNamespace(COMPRESSORS=horovod_nuq.COMPRESSORS, CSER=fake("cser"), LocalSGD=fake("lsgd"))
    built = registry.METHODS["cser"].build(_ctx(nuq))
    assert built.optimizer == "cser" and built.local_models
    assert calls["cser"][2].scheme.code_bits == 2 and built.compressor is None  # resets are not counted
    built = registry.METHODS["localsgd"].build(_ctx(nuq))
    assert built.compressor is None and calls["lsgd"][2] is None and calls["lsgd"][1][0][0] == "p"
    assert calls["lsgd"][3] == {"total_steps": 40} and calls["cser"][3] == {}  # the run's length


# ---- report --------------------------------------------------------------------------------
def _rec(method, final, losses, walls, status="ok"):
    steps = [0, 10, 20][: len(losses)]
    return {"method": method, "family": "scheme", "ranks": 2, "rate": "100mbit", "rate_bps": 1e8,
            "status": status, "reason": "absent", "final_val": final, "numel": 1000, "protocol": "allgather",
            "steps": 20, "s_per_step": 0.5, "bytes_per_step": 100.0, "lo_bytes_per_step": None,
            "models_agree": True, "transport": "t", "when": "w", "load_start": 1.0, "load_end": 2.0,
            "config": {"arch": "lstm", "dim": 8, "hidden": 8, "heads": 1, "layers": 1, "context": 8,
                       "batch": 2, "steps": 20, "lr": 0.1,
                       "val_windows": 4, "eval_every": 10},
            "val": {"step": steps, "loss": losses, "wall_s": walls, "bytes": [0, 1000, 2000][: len(losses)],
                    "lo_bytes": [None] * len(losses)}}


def test_time_to_target_is_the_first_evaluation_below_it():
    none = _rec("none", 2.0, [5.0, 2.5, 2.0], [0.0, 4.0, 8.0])
    fast = _rec("nuq4", 2.01, [5.0, 2.02, 2.01], [0.0, 1.0, 2.0])
    assert report.target_for([none, fast], 0.5, None) == 2.5  # float32's loss at step 10 of 20
    assert report.target_for([none, fast], 0.51, None) == 2.0
    assert report.target_for([fast], 0.5, None) is None and report.target_for([fast], 0.5, 3.0) == 3.0
    assert report.reach(fast, 2.02) == (1.0, 10, 1000)
    assert report.reach(none, 2.02) == (8.0, 20, 2000)
    assert report.reach(none, 2.5) == (4.0, 10, 1000)
    assert report.reach(none, 1.0) == (None, None, None)


def test_table_ranks_by_final_loss_and_lists_skipped():
    recs = [_rec("none", 2.0, [5.0, 2.5, 2.0], [0.0, 4.0, 8.0]),
            _rec("qsgd2", 2.3, [5.0, 2.6, 2.3], [0.0, 1.0, 2.0]),
            _rec("nuq4", 1.99, [5.0, 2.02, 1.99], [0.0, 1.0, 2.0]),
            {**_rec("cser", 0, [0], [0]), "status": "unavailable"}]
    text = report.table(recs, "100mbit", 2, 0.5, 2.02)
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split(" | ")[1] for r in rows] == ["nuq4", "none", "qsgd2"]
    assert "| +0.300 |" in rows[2] and "not reached" in rows[2] and "| 1.0 | 10 |" in rows[0]
    assert "Not run: cser (absent)" in text


def test_seed_spread_pairs_each_method_with_float32_of_its_seed():
    main = [_rec("none", 2.0, [5.0, 2.0], [0.0, 1.0]), _rec("nuq4", 2.1, [5.0, 2.1], [0.0, 1.0])]
    rep = [{**_rec(m, v, [5.0, v], [0.0, 1.0]), "config": {**main[0]["config"], "seed": 1}}
           for m, v in (("none", 2.03), ("nuq4", 2.08))]
    main[0]["config"]["seed"] = 0
    text = report.spread(main, [rep])
    assert "seeds: 0, 1" in text
    assert "| 100mbit | 2 | nuq4 | 2.1000 / 2.0800 | +0.1000 / +0.0500 | +0.0750 | 0.0500 |" in text
    assert "| 100mbit | 2 | none | 2.0000 / 2.0300 | +0.0000 / +0.0000 | +0.0000 | 0.0000 |" in text
