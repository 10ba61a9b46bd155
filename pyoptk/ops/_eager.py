"""Eager calls that skip torch's Python op dispatcher.

``torch.ops.pyoptk.<op>(...)`` runs through torch.library's Python custom-op layers
(autograd wrapper, ADInplaceOrView, filling in defaults): about 50 µs per call on CPU,
as long as AdamW's whole kernel on a 1M-parameter group and several kernel launches'
worth on GPU. In plain eager mode the public functions therefore call the op's
registered CPU/CUDA kernel directly and then bump the version counters of the tensors it
mutated, as the dispatcher does, so autograd still reports a tensor that was modified
after being saved for backward. Everything else — torch.compile tracing, FakeTensor,
functionalization and other dispatch modes, torch.func transforms, tensor subclasses,
devices other than CPU and CUDA — goes through ``torch.ops.pyoptk`` as usual, so the
op stays visible to those systems.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

__all__ = ["call_op"]

_PLAIN = (Tensor, torch.nn.Parameter)


def _direct_ok(lead: Tensor, tensor_lists: Sequence[Sequence[Tensor]]) -> bool:
    if lead.device.type not in ("cpu", "cuda"):
        return False
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    # Subclasses (FakeTensor, DTensor, ...) come as whole lists; one look per list.
    return all(not lst or type(lst[0]) in _PLAIN for lst in tensor_lists)


def call_op(op: Callable, kernel: Callable, tensor_lists: Sequence[Sequence[Tensor]],
            mutated: Sequence[Sequence[Tensor]], *args: Any) -> Any:
    """``op(*args)``, or ``kernel(*args)`` plus version bumps of ``mutated`` in plain
    eager mode. ``kernel`` is the function registered for CPU/CUDA with
    ``register_kernel``; ``tensor_lists`` are all tensor-list arguments (the first
    tensor of the first list decides the device)."""
    lead = tensor_lists[0][0]
    if not _direct_ok(lead, tensor_lists):
        return op(*args)
    out = kernel(*args)
    for tensors in mutated:
        if tensors:
            _increment_versions(list(tensors))
    return out


def _increment_versions(tensors: list) -> None:
    if _LIST_BUMP:
        torch._C._increment_version(tensors)  # one C call for the whole list
    else:
        for t in tensors:
            torch.autograd.graph.increment_version(t)


def _list_bump_supported() -> bool:
    """Older torch's ``_increment_version`` takes one tensor, newer ones a list too."""
    probe = [torch.zeros(())]
    try:
        torch._C._increment_version(probe)
    except TypeError:
        return False
    return probe[0]._version == 1


_LIST_BUMP = _list_bump_supported()
