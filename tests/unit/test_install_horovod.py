"""install_horovod: version detection, patch selection per framework combination, build plans and
cache keys, and the patches themselves on a miniature copy of the lines they edit in the sdist.
Nothing here builds Horovod."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from horovod_nuq import install_horovod as ih


def env(torch=None, tf=None, **kw) -> ih.Environment:
    defaults = {"python_tag": "cp311", "mpi": "Open MPI 4.1.4", "cmake": "/usr/bin/cmake", "cxx": "/usr/bin/g++"}
    return ih.Environment(torch=torch, tensorflow=tf, **{**defaults, **kw})


def names(e: ih.Environment) -> list[str]:
    return [p.name for p in ih.select_patches(e)]


@pytest.mark.parametrize("text, expected", [
    ("2.13.0+cpu", (2, 13, 0)), ("2.21.0", (2, 21, 0)), ("2.18.0rc1", (2, 18, 0)),
    ("2.1", (2, 1)), ("1.13.1+cu117", (1, 13, 1)), (None, None),
])
def test_version_tuple(text, expected):
    assert ih.version_tuple(text) == expected


def test_version_tuple_rejects_garbage():
    with pytest.raises(ValueError):
        ih.version_tuple("nightly")


# The combinations the command claims to support: Horovod 0.28.1 with torch 1.13-2.13 and/or
# TensorFlow 2.12-2.21. Each row: the patches those versions need (release-build is always on).
SUPPORTED = [
    ("2.0.1", None, ["release-build"]),
    ("1.13.1+cu117", None, ["release-build"]),
    ("2.1.0", None, ["cxx17", "gloo-cxx17", "release-build"]),
    ("2.5.1+cu124", None, ["cxx17", "gloo-cxx17", "release-build"]),
    (None, "2.12.0", ["release-build"]),
    (None, "2.15.1", ["release-build"]),
    (None, "2.16.1", ["release-build", "keras-backend"]),
    (None, "2.17.0", ["release-build", "keras-backend"]),
    (None, "2.18.0", ["no-xla-ops", "release-build", "keras-backend"]),
    (None, "2.21.0", ["no-xla-ops", "release-build", "keras-backend"]),
    ("2.0.1", "2.13.0", ["release-build"]),
    ("2.3.1", "2.16.2", ["cxx17", "gloo-cxx17", "release-build", "keras-backend"]),
    ("2.13.0+cpu", "2.21.0", ["cxx17", "gloo-cxx17", "no-xla-ops", "release-build", "keras-backend"]),
]


@pytest.mark.parametrize("torch, tf, expected", SUPPORTED)
def test_patch_selection(torch, tf, expected):
    assert names(env(torch, tf)) == expected


def test_this_repositorys_pins_need_all_patches():
    """scripts/setup.sh's torch 2.13 / TF 2.21 is the combination every patch was written for."""
    assert names(env("2.13.0+cpu", "2.21.0")) == [p.name for p in ih.PATCHES]


def test_cpu_plan_matches_setup_sh_build():
    plan = ih.plan_build(env("2.13.0+cpu", "2.21.0"))
    assert plan.build_env == {"HOROVOD_WITH_PYTORCH": "1", "HOROVOD_WITH_TENSORFLOW": "1",
                              "HOROVOD_WITHOUT_MXNET": "1", "HOROVOD_WITH_MPI": "1", "HOROVOD_WITH_GLOO": "1"}
    assert not plan.gpu
    assert re.fullmatch(r"horovod-0\.28\.1_torch-2\.13\.0\+cpu_tf-2\.21\.0_cp311_p[0-9a-f]{8}", plan.key)
    assert ih.expected_features(plan) == ["TensorFlow", "PyTorch", "MPI", "Gloo"]


def test_key_names_every_input():
    base = ih.plan_build(env("2.13.0+cpu", "2.21.0")).key
    assert ih.plan_build(env("2.13.0+cpu", "2.21.0")).key == base  # deterministic
    others = [env("2.12.0+cpu", "2.21.0"), env("2.13.0+cpu", "2.20.0"), env("2.13.0+cpu", None),
              env("2.13.0+cpu", "2.21.0", python_tag="cp312"), env("2.13.0+cpu", "2.21.0", mpi=None)]
    keys = {ih.plan_build(e).key for e in others}
    assert base not in keys and len(keys) == len(others)
    # a different patch set gives a different patch hash even for the same framework versions
    assert ih.plan_build(env("2.0.1", None)).key.rsplit("_p", 1)[1] != ih.plan_build(env("2.1.0", None)).key.rsplit("_p", 1)[1]


def test_tensorflow_only_and_torch_only():
    tf_only = ih.plan_build(env(None, "2.21.0"))
    assert tf_only.build_env["HOROVOD_WITHOUT_PYTORCH"] == "1" and "HOROVOD_WITH_PYTORCH" not in tf_only.build_env
    assert ih.expected_features(tf_only) == ["TensorFlow", "MPI", "Gloo"]
    torch_only = ih.plan_build(env("2.5.1", None))
    assert torch_only.build_env["HOROVOD_WITHOUT_TENSORFLOW"] == "1"
    assert "_tf-none_" in torch_only.key


def test_gloo_only_without_mpi():
    plan = ih.plan_build(env("2.13.0", "2.21.0", mpi=None))
    assert plan.build_env["HOROVOD_WITHOUT_MPI"] == "1" and "HOROVOD_WITH_MPI" not in plan.build_env
    assert plan.key.endswith("_nompi")
    assert "MPI" not in ih.expected_features(plan) and "Gloo" in ih.expected_features(plan)
    assert any("Gloo controller only" in n for n in plan.notes)


GPU = {"torch_cuda": "12.4", "cuda_home": "/usr/local/cuda", "cuda_version": "12.4",
       "nccl_include": "/usr/include", "nccl_lib": "/usr/lib/x86_64-linux-gnu", "nccl_version": "2.21.5"}


def test_gpu_plan_uses_nccl():
    plan = ih.plan_build(env("2.5.1+cu124", "2.18.0", **GPU))
    assert plan.gpu
    assert plan.build_env["HOROVOD_GPU_OPERATIONS"] == "NCCL"
    assert plan.build_env["HOROVOD_CUDA_HOME"] == "/usr/local/cuda"
    assert plan.build_env["HOROVOD_NCCL_INCLUDE"] == "/usr/include"
    assert plan.key.endswith("_cuda-12.4_nccl-2.21.5")
    assert ih.expected_features(plan)[-1] == "NCCL"


def test_gpu_none_and_missing_pieces():
    assert not ih.plan_build(env("2.5.1+cu124", None, **GPU), gpu="none").gpu
    no_nccl = {**GPU, "nccl_include": None, "nccl_lib": None}
    plan = ih.plan_build(env("2.5.1+cu124", None, **no_nccl))
    assert not plan.gpu and "HOROVOD_GPU_OPERATIONS" not in plan.build_env
    assert any("building without GPU operations" in n for n in plan.notes)
    with pytest.raises(ValueError, match="NCCL"):
        ih.plan_build(env("2.5.1+cu124", None, **no_nccl), gpu="nccl")
    # a toolkit and NCCL but CPU builds of the frameworks: nothing to run on the GPU
    cpu_fw = {**GPU, "torch_cuda": None}
    assert not ih.plan_build(env("2.5.1+cpu", None, **cpu_fw)).gpu
    with pytest.raises(ValueError, match="CUDA build"):
        ih.plan_build(env("2.5.1+cpu", None, **cpu_fw), gpu="nccl")


def test_unsupported_inputs():
    with pytest.raises(ValueError, match="neither torch nor TensorFlow"):
        ih.plan_build(env(None, None))
    with pytest.raises(ValueError, match="only Horovod 0.28.1"):
        ih.plan_build(env("2.5.1", None), horovod_version="0.28.0")
    plan = ih.plan_build(env("2.14.1", "2.22.0"))
    assert sum("newer than tested" in n for n in plan.notes) == 2
    assert not ih.plan_build(env("2.13.0", "2.21.0")).notes


def test_parse_framework_cuda_builds():
    assert ih.parse_torch_cuda("__version__ = '2.13.0+cpu'\ncuda: Optional[str] = None\n") is None
    assert ih.parse_torch_cuda("__version__ = '2.5.1+cu124'\ncuda: Optional[str] = '12.4'\n") == "12.4"
    assert ih.parse_torch_cuda("cuda = '11.8'\n") == "11.8"
    cpu = "build_info = collections.OrderedDict([('is_cuda_build', False), ('is_rocm_build', False)])"
    gpu = "build_info = collections.OrderedDict([('cuda_version', '12.5.1'), ('is_cuda_build', True)])"
    assert ih.parse_tensorflow_cuda(cpu) is None
    assert ih.parse_tensorflow_cuda(gpu) == "12.5.1"


def test_detect_nccl_from_horovod_nccl_home(tmp_path, monkeypatch):
    (tmp_path / "include").mkdir()
    (tmp_path / "lib").mkdir()
    (tmp_path / "include" / "nccl.h").write_text("#define NCCL_MAJOR 2\n#define NCCL_MINOR 21\n#define NCCL_PATCH 5\n")
    (tmp_path / "lib" / "libnccl.so.2").write_bytes(b"")
    monkeypatch.setenv("HOROVOD_NCCL_HOME", str(tmp_path))
    include, lib = ih._find_nccl(None)
    assert (include, lib) == (str(tmp_path / "include"), str(tmp_path / "lib"))
    assert ih._nccl_version(include) == "2.21.5"


def test_detect_this_environment(monkeypatch):
    e = ih.detect()
    assert re.fullmatch(r"cp3\d+", e.python_tag)
    assert e.torch == ih._dist_version("torch") and e.tensorflow == ih._dist_version(*ih.TF_DISTS)
    if e.torch and "+cpu" in e.torch:
        assert e.torch_cuda is None
    monkeypatch.setattr(ih.shutil, "which", lambda name: None)
    assert ih._find_mpi() is None


# The lines each patch edits, exactly as in the Horovod 0.28.1 sdist (surrounding lines elided).
SDIST_LINES = {
    "CMakeLists.txt": "project(horovod CXX)\nset(CMAKE_CXX_STANDARD 14)\nset(CMAKE_CXX_STANDARD_REQUIRED ON)\n"
                      '    string(PREPEND GLOO_CMAKE "set(CMAKE_CXX_STANDARD 17)\\n")\n',
    "horovod/torch/CMakeLists.txt": "if(Pytorch_CXX11)\n    set(CMAKE_CXX_STANDARD 14)\nendif()\n",
    "third_party/gloo/CMakeLists.txt": '  set(CMAKE_CXX_FLAGS "${CMAKE_CXX_FLAGS} -std=c++11 -fPIC")\n',
    "horovod/tensorflow/CMakeLists.txt":
        'list(APPEND TF_SOURCES "${PROJECT_SOURCE_DIR}/horovod/tensorflow/mpi_ops.cc")\n'
        'list(APPEND TF_SOURCES "${PROJECT_SOURCE_DIR}/horovod/tensorflow/xla_mpi_ops.cc")\n',
    "setup.py": "        config = 'Debug' if self.debug or os.environ.get('HOROVOD_DEBUG') == \"1\" "
                "else 'RelWithDebInfo'\n",
    "horovod/tensorflow/keras/__init__.py": "try:\n    from keras import backend as K\nexcept ImportError:\n",
    "horovod/tensorflow/keras/callbacks.py": "try:\n    from keras import backend as K\nexcept ImportError:\n",
}


def mini_sdist(root: Path) -> Path:
    for rel, text in SDIST_LINES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_patches_edit_the_sdist_lines(tmp_path):
    root = mini_sdist(tmp_path)
    ih.apply_patches(root, ih.PATCHES)
    read = lambda rel: (root / rel).read_text()
    assert "set(CMAKE_CXX_STANDARD 17)\nset(CMAKE_CXX_STANDARD_REQUIRED ON)" in read("CMakeLists.txt")
    assert read("horovod/torch/CMakeLists.txt") == "if(Pytorch_CXX11)\n    set(CMAKE_CXX_STANDARD 17)\nendif()\n"
    assert "-std=c++17 -fPIC" in read("third_party/gloo/CMakeLists.txt")
    assert read("horovod/tensorflow/CMakeLists.txt").count("\n") == 1 and "xla" not in read(
        "horovod/tensorflow/CMakeLists.txt")
    assert read("setup.py").endswith("else 'Release'\n")
    for rel in ("horovod/tensorflow/keras/__init__.py", "horovod/tensorflow/keras/callbacks.py"):
        assert "    from tensorflow.keras import backend as K\n" in read(rel)


def test_only_selected_patches_are_applied(tmp_path):
    root = mini_sdist(tmp_path)
    ih.apply_patches(root, ih.select_patches(env(None, "2.16.1")))
    assert "set(CMAKE_CXX_STANDARD 14)" in (root / "CMakeLists.txt").read_text()
    assert "xla_mpi_ops" in (root / "horovod/tensorflow/CMakeLists.txt").read_text()
    assert "tensorflow.keras" in (root / "horovod/tensorflow/keras/callbacks.py").read_text()


def test_patch_that_misses_fails_loudly(tmp_path):
    root = mini_sdist(tmp_path)
    (root / "setup.py").write_text("config = 'Debug' if debug else 'MinSizeRel'\n")
    with pytest.raises(ih.PatchError, match="release-build"):
        ih.apply_patches(root, ih.PATCHES)


def test_check_catches_a_partial_edit(tmp_path):
    """An edit can match and still leave work undone: the checks catch it (torch CMake with two C++14 lines,
    one of them not at the indentation the edit expects)."""
    root = mini_sdist(tmp_path)
    (root / "horovod/torch/CMakeLists.txt").write_text("  set(CMAKE_CXX_STANDARD 14)\nset(CMAKE_CXX_STANDARD 14) # x\n")
    with pytest.raises(ih.PatchError, match="cxx17: check failed"):
        ih.apply_patches(root, ih.select_patches(env("2.13.0", None)))


def test_dry_run_prints_plan(capsys):
    if ih.detect().torch is None and ih.detect().tensorflow is None:
        pytest.skip("no framework installed here")
    assert ih.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "patches:" in out and "cache key:  horovod-0.28.1_" in out
    assert ih.main(["--print-key"]) == 0
    assert capsys.readouterr().out.startswith("horovod-0.28.1_")
