"""PyTorch backend: device-agnostic (CPU or CUDA); nothing leaves the device on the hot path."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .base import Backend

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64,
           "int32": torch.int32, "uint8": torch.uint8, "bool": torch.bool,
           "float16": torch.float16, "bfloat16": torch.bfloat16}


class TorchBackend(Backend):
    name = "torch"

    def numel(self, x): return x.numel()
    def shape(self, x): return tuple(x.shape)
    def reshape(self, x, shape): return x.reshape(shape)
    def cast(self, x, dtype): return x.to(_DTYPES[dtype])
    def dtype_name(self, x): return str(x.dtype).replace("torch.", "")
    def is_floating(self, x): return x.is_floating_point()
    def pad_to(self, flat, n): return torch.nn.functional.pad(flat, (0, n - flat.numel()))
    def concat(self, xs): return torch.cat(list(xs))
    def split(self, x, sizes): return list(torch.split(x, list(sizes)))
    def bitcast(self, x, dtype):
        """Reinterpret the bytes; a slice that starts off the new element size's alignment
        (a rank's part of a gathered payload of odd length) is copied first, as view needs."""
        x, to = x.contiguous(), _DTYPES[dtype]
        if (x.storage_offset() * x.element_size()) % torch.empty((), dtype=to).element_size():
            x = x.clone()
        return x.view(to).reshape(-1)
    def constant(self, value, like): return torch.from_numpy(np.ascontiguousarray(value)).to(like.device)
    def device_key(self, x): return x.device
    def abs(self, x): return x.abs()
    def sqrt(self, x): return x.sqrt()
    def floor(self, x): return x.floor()
    def round(self, x): return x.round()
    def minimum(self, x, y): return torch.clamp(x, max=y) if not torch.is_tensor(y) else torch.minimum(x, y)
    def maximum(self, x, y): return torch.clamp(x, min=y) if not torch.is_tensor(y) else torch.maximum(x, y)
    def where(self, cond, x, y): return torch.where(cond, x, y)
    def row_sum(self, x): return x.sum(dim=1)
    def row_max(self, x): return x.amax(dim=1)
    def max_all(self, x): return x.max()
    def take(self, table, idx): return table[idx]
    def searchsorted(self, sorted_, x): return torch.searchsorted(sorted_, x.contiguous(), right=True)
    def matmul(self, x, y): return torch.matmul(x, y)
    def argmax_rows(self, x): return x.argmax(dim=1)
    def take_rows(self, table, idx): return table[idx]
    def pick(self, x, idx): return x.gather(1, idx.reshape(-1, 1)).reshape(-1)
    def shl(self, x, bits): return torch.bitwise_left_shift(x, bits)
    def shr(self, x, bits): return torch.bitwise_right_shift(x, bits)
    def bit_and(self, x, mask): return torch.bitwise_and(x, mask)

    def make_rng(self, seed: int, like: torch.Tensor) -> torch.Generator:
        g = torch.Generator(device=like.device)
        g.manual_seed(seed)
        return g

    def uniform(self, shape: Sequence[int], like: torch.Tensor, state: torch.Generator):
        return torch.rand(tuple(shape), generator=state, device=like.device, dtype=torch.float32)

    def on_host(self, x): return x.device.type == "cpu"
    def to_numpy(self, x: Any) -> np.ndarray: return x.detach().cpu().numpy()
