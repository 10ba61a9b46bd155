"""Small convolutional nets on the 8×8 digits: a different parameter structure (4-d
kernels, weight sharing) from the MLPs on the same data.

Each conv block is ``3×3 conv (padding 1) → activation → 2×2 average pool`` (8×8 →
4×4 → 2×2), then a linear layer to the 10 classes. :class:`CNNFamily`
(``cnn_digits``) draws 1 or 2 blocks, each with 4, 8 or 16 channels, the activation ∈
{relu, tanh, gelu}, batch size ∈ {16, 32, 64, 128}, init scale log-uniform in
[0.5, 2] (× the LeCun fan-in std) and l2 (0 with probability ½ else log-uniform in
[1e-4, 1e-2]). Inputs are the digits pixels standardized per pixel with the train rows'
statistics (:mod:`pyoptk.tasks.datasets`), as the MLPs see them.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from pyoptk.tasks.base import TaskFamily, generator
from pyoptk.tasks.sampling import Draws
from pyoptk.tasks.supervised import ACTIVATIONS, BATCH_SIZES, SupervisedTask, fan_in_normal

__all__ = ["CNNTask", "CNNFamily"]

_SIDE = 8      # digits images are 8×8, one channel
_KERNEL = 3


class CNNTask(SupervisedTask):
    """Conv blocks then a linear classifier on digits (module docstring).

    Parameters: ``conv{i}.weight`` ``(c_out, c_in, 3, 3)``, ``conv{i}.bias``
    ``(c_out,)``, ``fc.weight`` ``(10, c_last · s²)`` with ``s = 8 / 2^blocks``,
    ``fc.bias`` ``(10,)``. Batches are digits rows ``(n, 64)``, reshaped to
    ``(n, 1, 8, 8)`` in :meth:`logits`.

    Args:
        family (str), seed (int): see :class:`SupervisedTask`.
        channels (sequence of int): output channels of each conv block (1–3 blocks,
            each >= 1).
        activation, batch_size, init_scale, l2: see :class:`SupervisedTask`.
    """

    def __init__(self, family: str, seed: int, channels: Sequence[int] = (8,), **kwargs):
        channels = tuple(channels)
        if not (1 <= len(channels) <= 3 and all(isinstance(c, int) and c >= 1 for c in channels)):
            raise ValueError(f"CNNTask: channels must be 1 to 3 ints >= 1 (8×8 images halve "
                             f"per block), got {list(channels)}")
        super().__init__(family, seed, "digits", channels=channels, **kwargs)
        self.side = _SIDE >> len(channels)

    def init_params(self, seed: Optional[int] = None, *, dtype: torch.dtype = torch.float32,
                    device: Optional[torch.device] = None) -> "OrderedDict[str, Tensor]":
        g = generator(self.family, self.seed, "init", seed)
        scale = self.hparams["init_scale"]
        params: "OrderedDict[str, Tensor]" = OrderedDict()
        c_in = 1
        for i, c_out in enumerate(self.hparams["channels"]):
            fan_in = c_in * _KERNEL * _KERNEL
            w = fan_in_normal(g, (c_out, c_in, _KERNEL, _KERNEL), fan_in, scale)
            params[f"conv{i}.weight"] = w.to(dtype=dtype, device=device)
            params[f"conv{i}.bias"] = torch.zeros(c_out, dtype=dtype, device=device)
            c_in = c_out
        n_in = c_in * self.side * self.side
        w = fan_in_normal(g, (self.data.n_classes, n_in), n_in, scale)
        params["fc.weight"] = w.to(dtype=dtype, device=device)
        params["fc.bias"] = torch.zeros(self.data.n_classes, dtype=dtype, device=device)
        return params

    def logits(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        h = x.reshape(-1, 1, _SIDE, _SIDE)
        for i in range(len(self.hparams["channels"])):
            h = F.conv2d(h, params[f"conv{i}.weight"], params[f"conv{i}.bias"],
                         padding=_KERNEL // 2)
            h = F.avg_pool2d(self.act(h), 2)
        return F.linear(h.flatten(1), params["fc.weight"], params["fc.bias"])


class CNNFamily(TaskFamily):
    """``cnn_digits``: CNNs with the ranges of the module docstring."""

    name = "cnn_digits"

    def sample(self, seed: int) -> CNNTask:
        d = Draws(self.name, "hparams", seed)
        channels: Tuple[int, ...] = tuple(d.choice((4, 8, 16)) for _ in range(d.integer(1, 2)))
        activation = d.choice(sorted(ACTIVATIONS))
        batch_size = d.choice(BATCH_SIZES)
        init_scale = d.log_uniform(0.5, 2.0)
        l2 = 0.0 if d.bernoulli(0.5) else d.log_uniform(1e-4, 1e-2)
        return CNNTask(self.name, seed, channels=channels, activation=activation,
                       batch_size=batch_size, init_scale=init_scale, l2=l2)
