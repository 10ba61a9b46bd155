"""Host-side chunk tables shared by the multi-tensor kernels (private).

Every launch covers all tensors of a call. Triton's CPU interpreter cannot follow a
table of pointers, so each tensor *role* (params, grads, exp_avgs, ...) is addressed
from one base pointer — the role's tensor at index ``Table.base``, the first with
elements — plus one int64 element offset per tensor::

    ptr = base + tl.load(meta + ROW * n_tensors + t) + chunk_start + tl.arange(0, BLOCK)

which compiles to the same address arithmetic on a GPU and works in the interpreter.

Layout of the int64 table, one allocation on the tensors' device, built once per
``(device, chunk lengths, numels, dtypes, data_ptrs)`` and cached, so a steady-state step
builds and copies nothing:

* ``chunks`` (``[n_chunks, 2]``): for each program, its tensor index and the element
  where its chunk starts. The chunks of one tensor are contiguous.
* ``meta`` (``[3 + n_roles, n_tensors]``): row ``NUMEL``, row ``FIRST_CHUNK`` (index of
  the tensor's first chunk), row ``CHUNK_LEN``, then one row of element offsets per role
  in the order the caller gave them.

``meta`` starts ``16 * n_chunks`` bytes into the allocation, so both views keep the
allocation's 16-byte alignment and never change Triton's pointer specialization.
"""

from __future__ import annotations

import collections
import contextlib
import struct
import threading
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl

# Rows of ``meta`` (see the module docstring); role rows follow from ROLE0.
NUMEL = tl.constexpr(0)
FIRST_CHUNK = tl.constexpr(1)
CHUNK_LEN = tl.constexpr(2)
ROLE0 = tl.constexpr(3)

class LRUCache:
    """A thread-safe map from a key to a value built on the first miss, dropping the
    least recently used entries beyond ``size``: the launch tables (and other small
    device tensors) of every kernel family, so a steady-state step builds and copies
    nothing. Tables are tiny; a handful of parameter groups per process is the common
    case."""

    def __init__(self, size: int = 64):
        self.size = size
        self._entries: "collections.OrderedDict[tuple, object]" = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, build):
        """The value cached for ``key``, else ``build()`` (run outside the lock: it
        copies to the device), cached unless it is None."""
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                return hit
        value = build()
        if value is not None:
            with self._lock:
                self._entries[key] = value
                while len(self._entries) > self.size:
                    self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_tables = LRUCache()


class Table(NamedTuple):
    chunks: torch.Tensor  # int64 [n_chunks * 2]: (tensor index, chunk start) per program
    meta: torch.Tensor    # int64 [(3 + n_roles) * n_tensors]
    n_tensors: int
    n_chunks: int
    base: int             # index of the base tensor of every role (first with elements)
    aligned: bool         # every tensor of every vector role starts on a 16-byte boundary


# A role: (name for messages, tensors, vector role?). Scalar roles (steps) are read
# once per program, so their alignment does not matter.
Role = Tuple[str, Sequence[torch.Tensor], bool]


@triton.jit
def _probe_kernel(x):
    pass


def _interpreted() -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - very old/new Triton
        return False
    return isinstance(_probe_kernel, InterpretedFunction)


# TRITON_INTERPRET is read when @triton.jit runs, i.e. when this package is imported.
INTERPRETED = _interpreted()


def check_device(device: torch.device, what: str) -> None:
    """The interpreter copies only the argument tensors of a launch to the host, so the
    base+offset addressing cannot reach the other tensors of a CUDA list there."""
    if INTERPRETED and device.type != "cpu":
        raise RuntimeError(
            f"pyoptk.kernels.{what}: TRITON_INTERPRET=1 runs Triton kernels on the host, "
            f"which supports CPU tensors only for multi-tensor kernels (got {device}); "
            "unset TRITON_INTERPRET to run them on the GPU")


def device_guard(device: torch.device):
    """Triton launches on the current CUDA device; make it the tensors' device."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def split_f64(x: float) -> Tuple[float, float]:
    """``x`` as ``hi + lo`` with both float32-representable (about 48 significant
    bits). Triton passes Python floats as fp32 scalars; kernels rebuild the fp64 value
    where the reference computes in double (bias corrections, ``1 - lr*wd``)."""
    x = float(x)
    try:
        hi = struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return (x, 0.0)
    if hi != hi or hi in (float("inf"), float("-inf")):
        return (hi, 0.0)
    lo = x - hi
    try:
        lo = struct.unpack("f", struct.pack("f", lo))[0]
    except OverflowError:
        lo = 0.0
    return (hi, lo)


def chunk_table(roles: Sequence[Role], chunk_len: Union[int, Sequence[int]]) -> Optional[Table]:
    """The (cached) table for ``roles``; ``chunk_len`` is one length for every tensor
    or one per tensor. Element counts come from the first role. ``None`` when no
    tensor has elements (nothing to launch)."""
    first = roles[0][1]
    n = len(first)
    numels = tuple(t.numel() for t in first)
    lens = (chunk_len,) if isinstance(chunk_len, int) else tuple(int(c) for c in chunk_len)
    device = first[0].device
    ptrs = tuple(tuple(t.data_ptr() for t in ts) for _, ts, _ in roles)
    # Offsets are in elements, so the key holds each role's dtype besides the pointers.
    dtypes = tuple(ts[0].dtype for _, ts, _ in roles)
    key = (device, lens, numels, dtypes, ptrs)

    def build() -> Optional[Table]:
        base = next((i for i, k in enumerate(numels) if k > 0), None)
        if base is None:
            return None
        return _build(roles, ptrs, numels, lens if len(lens) == n else lens * n, base, device)

    return _tables.get(key, build)


def _build(roles, ptrs, numels, lens, base, device) -> Table:
    n = len(numels)
    # Element offsets from each role's base tensor. Only tensors with elements are
    # ever addressed; empty ones (whose data_ptr may be 0) get offset 0.
    offset_rows = []
    aligned = True
    for (name, ts, vector), role_ptrs in zip(roles, ptrs):
        esize = ts[base].element_size()
        base_ptr = role_ptrs[base]
        row = []
        for i, (t, p) in enumerate(zip(ts, role_ptrs)):
            if numels[i] == 0 and vector:
                row.append(0)
                continue
            if t.element_size() != esize:
                raise TypeError(f"pyoptk.kernels: {name}[{i}] has dtype {t.dtype} but "
                                f"{name}[{base}] has {ts[base].dtype}")
            diff = p - base_ptr
            if diff % esize:
                raise ValueError(
                    f"pyoptk.kernels: {name}[{i}] starts {diff} bytes from {name}[{base}], "
                    f"not a multiple of its element size {esize}; such tensors cannot share "
                    "one launch (make them contiguous copies)")
            row.append(diff // esize)
            if vector and p % 16:
                aligned = False
        offset_rows.append(row)
    counts = [-(-k // c) if k > 0 else 0 for k, c in zip(numels, lens)]
    firsts, total = [], 0
    for c in counts:
        firsts.append(total)
        total += c
    # Chunk rows, vectorized on the host: tensor index and element start per program.
    counts_t = torch.tensor(counts, dtype=torch.int64)
    tidx = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), counts_t)
    local = torch.arange(total, dtype=torch.int64) - torch.tensor(firsts, dtype=torch.int64)[tidx]
    start = local * torch.tensor(lens, dtype=torch.int64)[tidx]
    chunks = torch.stack([tidx, start], dim=1).reshape(-1)
    meta = torch.tensor([list(numels), firsts, list(lens)] + offset_rows, dtype=torch.int64)
    data = torch.cat([chunks, meta.reshape(-1)]).to(device)
    return Table(chunks=data[: 2 * total], meta=data[2 * total:], n_tensors=n, n_chunks=total,
                 base=base, aligned=aligned)


def clear_cache() -> None:
    """Drop every cached table (tests; freeing device memory)."""
    _tables.clear()
