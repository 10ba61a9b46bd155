"""The part every task on a bundled data set shares: seeded minibatches of a data
split, a full-split :meth:`~SupervisedTask.eval_loss`, the hyperparameter checks, and
fan-in-scaled initialization.

Subclasses (:mod:`pyoptk.tasks.classification`, :mod:`pyoptk.tasks.cnn`) define the
parameters (:meth:`init_params`) and the model (:meth:`logits`); the loss is the mean
cross-entropy plus ``l2/2 · Σ‖W‖²`` over weight matrices/kernels (not biases).
"""

from __future__ import annotations

import abc
import math
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from pyoptk.tasks.base import Task, generator
from pyoptk.tasks.datasets import Dataset, load_dataset

__all__ = ["ACTIVATIONS", "BATCH_SIZES", "SupervisedTask", "fan_in_normal"]

#: Hidden activations a task may use (all elementwise, so they vmap).
ACTIVATIONS: Dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "gelu": F.gelu,
}

#: Batch sizes the families draw from.
BATCH_SIZES: Tuple[int, ...] = (16, 32, 64, 128)


def fan_in_normal(g: torch.Generator, shape: Sequence[int], fan_in: int,
                  scale: float) -> Tensor:
    """float64 ``N(0, scale² / fan_in)`` of ``shape`` (``scale`` 1 is LeCun init, √2 He)."""
    return torch.randn(*shape, generator=g, dtype=torch.float64) * (scale / math.sqrt(fan_in))


class SupervisedTask(Task):
    """A classifier on a :class:`~pyoptk.tasks.datasets.Dataset` (module docstring).

    Batches are ``(x, y)``: float32 features ``(batch_size, n_features)`` and int64
    labels ``(batch_size,)``, rows drawn with replacement from the split by a generator
    seeded with ``(family, seed, split, step)``.

    Args:
        family (str): the registered family name (part of every seed).
        seed (int): task seed.
        dataset (str): a :data:`~pyoptk.tasks.datasets.DATASETS` key.
        activation (str): a key of :data:`ACTIVATIONS`.
        batch_size (int): rows per batch (>= 1).
        init_scale (float): multiplier of the fan-in-scaled normal init (>= 0).
        l2 (float): weight-decay coefficient of the loss (>= 0).
    """

    def __init__(self, family: str, seed: int, dataset: str, *, activation: str = "relu",
                 batch_size: int = 32, init_scale: float = 1.0, l2: float = 0.0, **hparams):
        if activation not in ACTIVATIONS:
            raise ValueError(f"{type(self).__name__}: activation must be one of "
                             f"{sorted(ACTIVATIONS)}, got {activation!r}")
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"{type(self).__name__}: batch_size must be an int >= 1, "
                             f"got {batch_size!r}")
        if not init_scale >= 0.0:
            raise ValueError(f"{type(self).__name__}: init_scale must be >= 0, got {init_scale}")
        if not l2 >= 0.0:
            raise ValueError(f"{type(self).__name__}: l2 must be >= 0, got {l2}")
        self.family = family
        self.seed = int(seed)
        self.data: Dataset = load_dataset(dataset)
        self.hparams = {"dataset": dataset, **hparams, "activation": activation,
                        "batch_size": int(batch_size), "init_scale": float(init_scale),
                        "l2": float(l2)}
        self.act = ACTIVATIONS[activation]

    @abc.abstractmethod
    def logits(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """``(n, n_classes)`` logits of float features ``x`` ``(n, n_features)``."""

    def batch(self, step: int, split: str = "train", *,
              device: Optional[torch.device] = None) -> Tuple[Tensor, Tensor]:
        x, y = self.data.split(split)
        g = generator(self.family, self.seed, split, int(step))
        idx = torch.randint(x.shape[0], (self.hparams["batch_size"],), generator=g)
        return x[idx].to(device=device), y[idx].to(device=device)

    def loss(self, params: Mapping[str, Tensor], batch: Tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        ref = next(iter(params.values()))
        logits = self.logits(params, x.to(dtype=ref.dtype, device=ref.device))
        loss = F.cross_entropy(logits, y.to(device=ref.device))
        if self.hparams["l2"] > 0.0:
            wsq = sum((p * p).sum() for name, p in params.items() if name.endswith("weight"))
            loss = loss + 0.5 * self.hparams["l2"] * wsq
        return loss

    def eval_loss(self, params: Mapping[str, Tensor], split: str = "valid", *,
                  device: Optional[torch.device] = None) -> Tensor:
        """The loss over *every* row of ``split`` (a few hundred rows: one cheap call)."""
        x, y = self.data.split(split)
        return self.loss(params, (x.to(device=device), y.to(device=device)))
