"""The Horovod calls the compressors make on torch tensors."""
import horovod.torch as hvd

from ..collectives import HorovodCollectives

COLLECTIVES = HorovodCollectives(hvd, stable_names=True)
