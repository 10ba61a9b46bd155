"""Seeded draws of task hyperparameters (what a family's ``sample(seed)`` uses).

A :class:`Draws` is one generator seeded from ``(family, "hparams", seed)``; each call
consumes the next uniform number, so a family's hyperparameters are a pure function of
its name and the seed, and adding a draw at the *end* of ``sample`` leaves the earlier
ones unchanged.
"""

from __future__ import annotations

import math
from typing import Any, Sequence, TypeVar

import torch

from pyoptk.tasks.base import generator

__all__ = ["Draws"]

T = TypeVar("T")


class Draws:
    """Uniform, log-uniform, integer and categorical draws from one seeded generator."""

    def __init__(self, *parts: Any):
        self._g = generator(*parts)

    def uniform(self, lo: float, hi: float) -> float:
        u = torch.rand((), generator=self._g, dtype=torch.float64).item()
        return lo + (hi - lo) * u

    def log_uniform(self, lo: float, hi: float) -> float:
        return math.exp(self.uniform(math.log(lo), math.log(hi)))

    def int_log_uniform(self, lo: int, hi: int) -> int:
        """An int in ``[lo, hi]``, log-uniform (small and large sizes equally likely
        per octave)."""
        return min(hi, max(lo, int(round(self.log_uniform(lo, hi)))))

    def integer(self, lo: int, hi: int) -> int:
        """An int uniform in ``[lo, hi]``."""
        return min(hi, lo + int(self.uniform(0.0, hi - lo + 1)))

    def choice(self, options: Sequence[T]) -> T:
        return options[min(len(options) - 1, int(self.uniform(0.0, len(options))))]

    def bernoulli(self, p: float) -> bool:
        return self.uniform(0.0, 1.0) < p
