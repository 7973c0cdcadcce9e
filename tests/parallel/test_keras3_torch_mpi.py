"""test_keras3_mpi.py's backend-neutral tests on Keras 3's PyTorch backend, over horovod.torch
(the same horovod_nuq.keras.DistributedOptimizer; tests marked TensorFlow-only are skipped)."""
import os

os.environ["KERAS_BACKEND"] = "torch"  # before keras is imported (this suite has its own process)

from test_keras3_mpi import *
