"""The task interface: an inner optimization problem, deterministic from a seed.

A :class:`Task` is immutable: its family, its seed and the hyperparameters sampled
from that seed (:attr:`Task.hparams`: widths, depth, activation, batch size, init
scale, …). Everything random about it is a pure function of ``(seed, step, split)``:
:meth:`Task.init_params` and :meth:`Task.batch` draw from generators seeded by
:func:`derive_seed`, never from global RNG. So

* a task is rebuilt from ``(family, seed)`` alone (checkpoints store :class:`TaskSpec`),
* two runs, two ranks, or the particles of an ES estimate see identical batches,
* resuming at step ``t`` needs no sampler state beyond ``t``.

Parameters are an ordered dict ``name -> Tensor`` and :meth:`Task.loss` is functional
(``torch.func.functional_call`` for module tasks), so the same task serves a learned
optimizer's functional update, ``torch.optim`` on ``nn.Parameter`` copies, MAML's
differentiable inner loop and ``torch.func.vmap`` over particles.
"""

from __future__ import annotations

import abc
import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

import torch
from torch import Tensor

__all__ = ["Task", "TaskFamily", "TaskSpec", "derive_seed", "generator", "SPLIT_NAMES",
           "check_split"]

# Data splits of one task (train: the inner loop's batches; valid: what meta-training's
# outer loss and early stopping look at; test: reporting only).
SPLIT_NAMES = ("train", "valid", "test")


def check_split(split: str) -> str:
    """``split`` if it is a data split name, else ``ValueError`` listing them."""
    if split not in SPLIT_NAMES:
        raise ValueError(f"split must be one of {list(SPLIT_NAMES)}, got {split!r}")
    return split


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across runs and machines,
    unlike ``hash``)."""
    h = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def generator(*parts: Any) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed` of ``parts``."""
    return torch.Generator().manual_seed(derive_seed(*parts))


@dataclass(frozen=True)
class TaskSpec:
    """What identifies a task: ``get_family(family).sample(seed)`` rebuilds it."""

    family: str
    seed: int

    def to_dict(self) -> Dict[str, Any]:
        return {"family": self.family, "seed": int(self.seed)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TaskSpec":
        return cls(str(d["family"]), int(d["seed"]))


class Task(abc.ABC):
    """One inner problem (see the module docstring).

    Subclasses implement :meth:`init_params`, :meth:`batch` and :meth:`loss`; set
    ``family``, ``seed`` and ``hparams`` in ``__init__``.
    """

    family: str
    seed: int
    hparams: Mapping[str, Any]
    #: Number of fixed batches averaged by :meth:`eval_loss`.
    eval_batches: int = 4

    @property
    def spec(self) -> TaskSpec:
        return TaskSpec(self.family, self.seed)

    @property
    def name(self) -> str:
        """``family/seed``, for tables and logs."""
        return f"{self.family}/{self.seed}"

    @property
    def param_count(self) -> int:
        """Number of scalar parameters (elements of :meth:`init_params`)."""
        return sum(t.numel() for t in self.init_params().values())

    @abc.abstractmethod
    def init_params(self, seed: Optional[int] = None, *, dtype: torch.dtype = torch.float32,
                    device: Optional[torch.device] = None) -> "OrderedDict[str, Tensor]":
        """Fresh parameters. ``seed`` None: the task's own initialization (the same every
        call); an int: another draw from the task's init distribution."""

    @abc.abstractmethod
    def batch(self, step: int, split: str = "train", *,
              device: Optional[torch.device] = None) -> Any:
        """The batch of inner step ``step`` from data split ``split`` (deterministic)."""

    @abc.abstractmethod
    def loss(self, params: Mapping[str, Tensor], batch: Any) -> Tensor:
        """Scalar loss of ``params`` on ``batch``, differentiable in ``params``."""

    def eval_loss(self, params: Mapping[str, Tensor], split: str = "valid", *,
                  device: Optional[torch.device] = None) -> Tensor:
        """Mean loss over :attr:`eval_batches` fixed batches of ``split``."""
        losses = [self.loss(params, self.batch(i, split, device=device))
                  for i in range(self.eval_batches)]
        return torch.stack(losses).mean()

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
        return f"{type(self).__name__}({self.name}: {hp})"


class TaskFamily(abc.ABC):
    """A distribution over tasks: :meth:`sample` draws one, deterministically."""

    name: str

    @abc.abstractmethod
    def sample(self, seed: int) -> Task:
        """The task with this seed (hyperparameters drawn from ``derive_seed(name, seed)``)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
