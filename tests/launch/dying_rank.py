"""Training where rank 1 dies at step 3: the others must end with an error, not hang."""
import os

import horovod.torch as hvd
import torch

import horovod_nuq.torch as nuq

hvd.init()
model = torch.nn.Linear(100, 10)
opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                               named_parameters=model.named_parameters(),
                               compression=nuq.NUQCompressor())
for step in range(1000):
    if step == 3 and hvd.rank() == 1:
        os._exit(3)
    opt.zero_grad()
    model(torch.randn(8, 100)).sum().backward()
    opt.step()
print("rank", hvd.rank(), "finished without noticing the dead rank", flush=True)
