"""The Horovod calls the compressors make on torch tensors."""
import horovod.torch as hvd

from .. import collectives

COLLECTIVES = collectives.HorovodCollectives(hvd, stable_names=True)
collectives.register("torch", COLLECTIVES)
