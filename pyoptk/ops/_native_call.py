"""Helpers that turn tensor lists into what ``pyoptk._C`` takes: raw pointers,
element counts, a dtype code and (for CUDA) the current stream handle."""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from pyoptk._native import DTYPE_CODES

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def ptrs(tensors: Sequence[torch.Tensor]) -> List[int]:
    return [t.data_ptr() for t in tensors]


def numels(tensors: Sequence[torch.Tensor]) -> List[int]:
    return [t.numel() for t in tensors]


def dtype_code(dtype: torch.dtype) -> int:
    return DTYPE_CODES[_DTYPE_NAMES[dtype]]


def lr_ptr(lr_t: Optional[torch.Tensor]) -> int:
    return 0 if lr_t is None else lr_t.data_ptr()


def stream_handle(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream
