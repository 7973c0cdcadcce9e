"""TritonEngine: the engine interface of engines.py for torch tensors on a GPU, one fused Triton
kernel per stage (triton_kernels.py), same wire formats and the same decoded bits as FusedEngine.

Host synchronisation: none in work/scales/encode_*; decode_sums reads one int32 flag (bad
sentinel, non-integer words) to raise like the CPU path, and finish_codes reads the flag that
decode_codes set (a code > 2k) once per decompress_gathered.
"""
from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from . import codec, wire
from .engines import GenericEngine
from .schemes import Scheme

_SCALE_MODES = {"l2": 0, "max": 1, "laplace": 2}
_INT32_LIMIT = 1 << 31


_available: bool | None = None


def available() -> bool:
    """Whether triton imports (the engine's kernels need it); tried once."""
    global _available
    if _available is None:
        try:
            import triton  # noqa: F401
            _available = True
        except ImportError:
            _available = False
    return _available


def usable(tensor: Any) -> bool:
    """Torch CUDA tensors whose element indices fit int32 (the kernels' index type), with triton."""
    return (isinstance(tensor, torch.Tensor) and tensor.is_cuda and tensor.numel() < _INT32_LIMIT // 2
            and available())


def _salt(key: int) -> int:
    """The C kernels' salt_for(key, i) for i < 2^32, as a signed int32 (one kernel signature)."""
    s = (key & 0xFFFFFFFF) ^ ((key >> 32) & 0xFFFFFFFF)
    return s - (1 << 32) if s >= (1 << 31) else s


class TritonEngine(GenericEngine):
    """Encode and decode torch GPU tensors with fused Triton kernels (one pass per stage).

    check_errors: read the decoders' error flags (one host sync each); benchmarks that time
    the kernels alone turn it off (flags then stay set until a checked read raises).
    SHAPES: per stage, (elements per program, warps, variant); variant only for decode_sums:
    one program lane per element (False) or per word (True). scripts/gpu_check.py --tune
    times alternatives on a GPU.
    """

    check_errors = True
    SHAPES: ClassVar[dict[str, tuple[int, int, bool]]] = {
        "encode_codes": (512, 2, False), "encode_sums": (2048, 4, False),  # --tune on an H200
        "decode_codes": (1024, 4, False), "decode_sums": (1024, 2, True)}

    def __init__(self, xp: Any, scheme: Scheme, tables: codec.Tables) -> None:
        super().__init__(xp, scheme, tables)
        from . import triton_kernels

        self.tk = triton_kernels
        host = tables._host
        k = tables.k
        tab = np.zeros(256, np.float32)
        tab[: 2 * k + 1] = host["signed_values"]
        self._host = {"levels": np.ascontiguousarray(host["levels"], np.float32),
                      "num": np.asarray(scheme.levels.numerators, np.int32), "tab": tab}
        self._dev: dict[Any, dict[str, torch.Tensor]] = {}
        self._flags: dict[Any, torch.Tensor] = {}  # per device: [sums error bits, codes error bit]
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (r, 1 / r) of the last scales()
        nums = scheme.levels.numerators
        self._exp2 = not tables.uniform and nums == (0,) + tuple(1 << j for j in range(len(nums) - 1))
        self.launched: dict[str, Any] = {}  # stage -> the compiled kernel it last ran (registers, spills)

    def _flag(self, like: torch.Tensor) -> torch.Tensor:
        """The device's two persistent error words (zeroed once; reset only after a raise)."""
        if like.device not in self._flags:
            self._flags[like.device] = torch.zeros(2, dtype=torch.int32, device=like.device)
        return self._flags[like.device]

    def _t(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """The constant tables on like's device (copied there once)."""
        if like.device not in self._dev:
            self._dev[like.device] = {k: torch.from_numpy(v).to(like.device) for k, v in self._host.items()}
        return self._dev[like.device]

    def work(self, tensor: torch.Tensor) -> torch.Tensor:
        """The flat tensor in its own dtype (the kernels convert to float32 as they read)."""
        x = tensor.detach().reshape(-1)
        if x.numel() == 0:  # kernels need a real pointer; one zero encodes like the padding
            return x.new_zeros(1)
        return x if x.is_contiguous() else x.contiguous()

    def scales(self, tensor: torch.Tensor, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, s = self.work(tensor), self.scheme
        nb = codec.n_buckets(numel, s.bucket_size)
        buf = torch.empty(2 * nb, dtype=torch.float32, device=x.device)
        r, inv = buf[:nb], buf[nb:]
        chunk = min(triton_next_pow2(s.bucket_size), 1024)
        rows = max(1, 4096 // chunk)
        self.launched["scales"] = self.tk.scales_kernel[(-(-nb // rows),)](
            x, r, inv, numel, nb, float(s.truncation or 0.0), B=s.bucket_size, MODE=_SCALE_MODES[s.scale],
            ROWS=rows, CHUNK=chunk)
        self._last = (r, inv)
        return x, r

    def _inverse(self, r: torch.Tensor) -> torch.Tensor:
        """1 / r per bucket as the encoders read it: from scales() when r is its result, else one
        small kernel (e.g. for scales agreed over ranks)."""
        if self._last is not None and self._last[0] is r:
            return self._last[1]
        r = r.contiguous()
        inv = torch.empty_like(r)
        self.tk.inverse_kernel[(-(-r.numel() // 1024),)](r, inv, r.numel(), BLOCK=1024)
        return inv

    def encode_codes(self, x: torch.Tensor, r: torch.Tensor, draws: Any) -> torch.Tensor:
        s, t = self.scheme, self.tables
        inv = self._inverse(r)
        count = r.numel() * s.bucket_size
        out = torch.empty(wire.packed_code_bytes(count, s.code_bits), dtype=torch.uint8, device=x.device)
        elems, warps, _ = self.SHAPES["encode_codes"]
        groups = elems // 8
        self.launched["encode_codes"] = self.tk.encode_codes_kernel[(-(-count // (8 * groups)),)](
            x, inv, self._t(x)["levels"], out, x.numel(), count, _salt(draws.key()), B=s.bucket_size,
            K=t.k, UNIFORM=bool(t.uniform), EXP2=self._exp2, BITS=s.code_bits, GROUPS=groups, num_warps=warps)
        return out

    def encode_sums(self, x: torch.Tensor, r: torch.Tensor, layout: wire.SumLayout, draws: Any) -> torch.Tensor:
        s, t = self.scheme, self.tables
        inv = self._inverse(r)
        count = r.numel() * s.bucket_size
        nw = layout.words(count)
        out = torch.empty(nw + 1, dtype=torch.float64, device=x.device)
        perp = triton_next_pow2(layout.per_word)
        elems, warps, _ = self.SHAPES["encode_sums"]
        words = max(1, elems // perp)
        tab = self._t(x)
        self.launched["encode_sums"] = self.tk.encode_sums_kernel[(max(1, -(-nw // words)),)](
            x, inv, tab["levels"], tab["num"], out, x.numel(), count, nw, _salt(draws.key()), layout.bound,
            B=s.bucket_size, K=t.k, UNIFORM=bool(t.uniform), EXP2=self._exp2, WIDTH=layout.width, PER=layout.per_word,
            PERP=perp, WORDS=words, num_warps=warps)
        return out

    def decode_sums(self, payload: torch.Tensor, r: torch.Tensor, layout: wire.SumLayout, nb: int) -> torch.Tensor:
        """Decode reduced words; one host read of the error flag (the only sync of this engine
        besides finish_codes)."""
        bs = self.scheme.bucket_size
        count = nb * bs
        nw = layout.words(count)
        p = payload.reshape(-1)
        if p.numel() != nw + 1:
            raise ValueError(f"summable payload: expected {nw + 1} float64 words, got {p.numel()}")
        p = p.to(torch.float64).contiguous()
        out = torch.empty(count, dtype=torch.float32, device=p.device)
        flag = self._flag(p)
        elems, warps, per_word = self.SHAPES["decode_sums"]
        args = (p, r.contiguous(), out, flag, count, nw, layout.ranks, self.tables.denominator,
                layout.bound * layout.ranks)
        if per_word:
            perp = triton_next_pow2(layout.per_word)
            words = max(1, elems // perp)
            self.launched["decode_sums"] = self.tk.decode_sums_words_kernel[(max(1, -(-nw // words)),)](
                *args, B=bs, WIDTH=layout.width, PER=layout.per_word, PERP=perp, WORDS=words, num_warps=warps)
        else:
            self.launched["decode_sums"] = self.tk.decode_sums_kernel[(-(-count // elems),)](
                *args, B=bs, WIDTH=layout.width, PER=layout.per_word, BLOCK=elems, num_warps=warps)
        bad = int(flag[0].item()) if self.check_errors else 0  # the documented sync
        if bad:
            flag[0] = 0
        if bad & 2:
            raise ValueError(wire.BAD_SENTINEL)
        if bad & 1:
            raise ValueError(wire.not_integer_message(layout.ranks))
        return out.reshape(nb, bs)

    def decode_codes(self, codes: torch.Tensor, r: torch.Tensor, nb: int, acc: torch.Tensor | None,
                     scale: float = 1.0) -> torch.Tensor:
        """Store (acc None) or add r * scale * level of one rank's codes; errors surface in finish_codes."""
        s = self.scheme
        count = nb * s.bucket_size
        expected = wire.packed_code_bytes(count, s.code_bits)
        c = codes.reshape(-1)
        if c.numel() != expected:
            raise ValueError(f"packed codes: expected {expected} bytes, got {c.numel()}")
        c = c.contiguous()
        if s.code_bits in (2, 4) and c.data_ptr() % s.code_bits:  # read as int16 / int32 words
            c = c.clone()
        out = torch.empty(count, dtype=torch.float32, device=c.device) if acc is None else acc
        elems, warps, _ = self.SHAPES["decode_codes"]
        self.launched["decode_codes"] = self.tk.decode_codes_kernel[(max(1, -(-count // elems)),)](
            c, r.contiguous(), self._t(c)["tab"], out, self._flag(c)[1:], count, float(np.float32(scale)),
            B=s.bucket_size, K=self.tables.k, BITS=s.code_bits, FIRST=acc is None, BLOCK=elems,
            num_warps=warps)
        return out

    def finish_codes(self, acc: torch.Tensor, like: Any, nb: int) -> torch.Tensor:
        """Raise if any code decoded since the last check exceeded 2k (one host read), then shape
        as buckets."""
        flag = self._flag(acc)
        if self.check_errors and int(flag[1].item()):
            flag[1] = 0
            raise ValueError(f"packed codes: a code exceeds 2k = {2 * self.tables.k}: the payload is "
                             "corrupt or was made with other settings")
        return acc.reshape(nb, self.scheme.bucket_size)


def triton_next_pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()
