"""Sinusoid regression episodes (Finn et al. 2017, §5.1).

A task is ``y = A · sin(x − φ)`` with amplitude ``A ~ U[0.1, 5]`` and phase
``φ ~ U[0, π]``; inputs ``x ~ U[-5, 5]``. The support set has ``k_shot`` points, the
query set ``n_query`` fresh points of the same curve. Episode ``i`` is a pure function
of ``(seed, k_shot, n_query, i)``.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch

from pyoptk.tasks.base import generator
from pyoptk.tasks.fewshot import Episode, stack_episodes

__all__ = ["SinusoidEpisodes", "AMPLITUDE_RANGE", "PHASE_RANGE", "INPUT_RANGE"]

AMPLITUDE_RANGE = (0.1, 5.0)
PHASE_RANGE = (0.0, math.pi)
INPUT_RANGE = (-5.0, 5.0)


class SinusoidEpisodes:
    """Deterministic sinusoid regression episodes.

    Args:
        k_shot (int): support points per task.
        n_query (int): query points per task.
        seed (int): seeds every episode.

    ``episode(i)`` gives ``support_x, support_y [k_shot, 1]`` and
    ``query_x, query_y [n_query, 1]`` (float32); ``batch(i, T)`` stacks ``T`` of them.
    """

    def __init__(self, k_shot: int = 10, n_query: int = 10, seed: int = 0):
        for name, v in (("k_shot", k_shot), ("n_query", n_query)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.k_shot, self.n_query, self.seed = k_shot, n_query, int(seed)

    def curve(self, index: int) -> Tuple[float, float]:
        """``(amplitude, phase)`` of episode ``index``."""
        gen = generator("sinusoid", self.seed, int(index), "curve")
        u = torch.rand(2, generator=gen, dtype=torch.float64).tolist()
        amp = AMPLITUDE_RANGE[0] + (AMPLITUDE_RANGE[1] - AMPLITUDE_RANGE[0]) * u[0]
        return amp, PHASE_RANGE[0] + (PHASE_RANGE[1] - PHASE_RANGE[0]) * u[1]

    def episode(self, index: int) -> Episode:
        amp, phase = self.curve(index)
        gen = generator("sinusoid", self.seed, self.k_shot, self.n_query, int(index), "x")
        lo, hi = INPUT_RANGE
        x = lo + (hi - lo) * torch.rand(self.k_shot + self.n_query, 1, generator=gen)
        y = amp * torch.sin(x - phase)
        return Episode(x[:self.k_shot], y[:self.k_shot], x[self.k_shot:], y[self.k_shot:])

    def batch(self, index: int, num_tasks: int) -> Episode:
        """Episodes ``index*num_tasks … (index+1)*num_tasks - 1`` stacked."""
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
        return stack_episodes([self.episode(index * num_tasks + t) for t in range(num_tasks)])

    def __repr__(self) -> str:
        return f"SinusoidEpisodes(k_shot={self.k_shot}, n_query={self.n_query}, seed={self.seed})"
