"""horovod-nuq: unbiased gradient quantizers for Horovod (PyTorch and TensorFlow)."""
from setuptools import find_packages, setup

setup(
    name="horovod-nuq",
    version="0.1.0",
    description="Provably unbiased gradient quantizers (QSGD, NUQSGD, TNQSGD, Global-QSGD) "
    "for Horovod's compression API, with real byte savings on the wire.",
    packages=find_packages(include=["horovod_nuq", "horovod_nuq.*"]),
    python_requires=">=3.9",
    install_requires=["numpy>=1.23"],
    extras_require={
        "torch": ["torch>=2.1"],
        "tensorflow": ["tensorflow-cpu>=2.16", "tf_keras"],
        "examples": ["scikit-learn", "matplotlib"],
        "tests": ["pytest", "scipy", "ruff"],
    },
)
