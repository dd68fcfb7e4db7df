"""Launch policy shared by the kernels: block sizes, row chunking, device guard, allocation.

Kernels are bandwidth-bound row reductions / row maps over ``(rows, N)`` tensors.  Every
row is split into ``num_chunks`` chunks of ``chunk`` elements (a multiple of ``BLOCK``)
so that the grid ``(rows, num_chunks)`` fills the GPU even when ``rows = 2B`` is small.
The split depends only on ``(N, rows, device)``, never on timing, so the fixed-order
reductions built on it are bitwise reproducible on a given device.

In the Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors) every program costs
milliseconds whatever its size, so the policy there uses few, moderately sized programs,
still small enough that the tests exercise multi-chunk rows and ragged last blocks.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import triton

MAX_GRID_Y = 65535  # CUDA limit of the second grid dimension (chunks per row)


def is_interpreted(kernel) -> bool:
    """True when ``triton.jit`` built ``kernel`` for the interpreter (TRITON_INTERPRET=1)."""
    return not isinstance(kernel, triton.runtime.JITFunction)


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@dataclass(frozen=True)
class RowPlan:
    block: int  # elements per loop iteration (tl.arange size)
    chunk: int  # elements per program, a multiple of block
    num_chunks: int  # programs per row
    num_warps: int


# A reduction row is split only into chunks of at least this many input bytes: below it
# one more launch (the fixed-order sum of the partials) costs more than the parallelism
# gains (e.g. SD1.5 latents, N = 16384 bf16 with K = 2: one program per row, one launch).
MIN_CHUNK_BYTES = 256 * 1024


def plan_rows(N: int, rows: int, device: torch.device, interpret: bool, row_bytes: int = 0) -> RowPlan:
    """Split ``rows`` rows of ``N`` elements into ``(rows, num_chunks)`` programs.

    About 8 programs per SM in all; ``row_bytes`` (bytes read per row, given by the
    reduction) also caps the chunks per row at ``row_bytes / MIN_CHUNK_BYTES``.
    """
    if interpret:
        block = 256
        per = 2 * block
        return RowPlan(block, per, cdiv(N, per), 4)
    block = min(2048, max(256, next_pow2(N)))
    num_warps = 8 if block >= 2048 else 4
    target_programs = 8 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    want = min(max(cdiv(target_programs, rows), 1), cdiv(N, block), MAX_GRID_Y)
    if row_bytes:
        want = max(1, min(want, row_bytes // MIN_CHUNK_BYTES))
    per = cdiv(cdiv(N, want), block) * block
    return RowPlan(block, per, cdiv(N, per), num_warps)


def device_guard(t: torch.Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current device)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def check_device(kernel, t: torch.Tensor, op: str) -> None:
    if t.device.type == "cpu" and not is_interpreted(kernel):
        raise RuntimeError(f"adpo::{op}: the Triton kernels run on CPU tensors only in the Triton interpreter; "
                           f"set TRITON_INTERPRET=1 before triton is first imported")
    if t.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"adpo::{op}: expected CPU (interpreter) or CUDA tensors, got {t.device}")


def check_dtype(t: torch.Tensor, name: str, op: str) -> None:
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"adpo::{op}: {name} must be float32, bfloat16 or float16, got {t.dtype}")


def alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output buffer of the ops comes from here (the tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)
