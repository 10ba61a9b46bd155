"""Ill-conditioned quadratics: ``L(x) = ½ Σ_i λ_i (x_i − x*_i)² + noise`` in a random
rotation-free basis (diagonal Hessian with log-uniform eigenvalues).

The condition number ``κ = λ_max/λ_min`` is drawn log-uniformly in [1, 10⁴] and the
dimension from {8, …, 256}; gradients are noisy through a random per-batch target
offset of scale ``noise`` (0 for some tasks), so the family covers deterministic and
stochastic, well- and ill-conditioned problems. The minimum loss is 0 in expectation
over the noise-free part, which makes learned-vs-AdamW comparisons easy to read.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Mapping, Optional

import torch
from torch import Tensor

from pyoptk.tasks.base import Task, TaskFamily, check_split, generator

__all__ = ["QuadraticTask", "QuadraticFamily"]


class QuadraticTask(Task):
    """``½ Σ λ_i (x_i − x*_i − σ ξ_i)²``, ``ξ ~ N(0, 1)`` fresh per batch.

    Args:
        seed (int): task seed (init and noise derive from it).
        dim (int): number of coordinates.
        cond (float): condition number (λ log-spaced in [1/cond, 1]).
        noise (float): σ, the scale of the per-batch target noise.
        init_scale (float): ``x₀ ~ N(x*, init_scale²)``.
    """

    family = "quadratic"

    def __init__(self, seed: int, dim: int = 32, cond: float = 100.0, noise: float = 0.0,
                 init_scale: float = 1.0):
        if dim < 1:
            raise ValueError(f"QuadraticTask: dim must be >= 1, got {dim}")
        if not cond >= 1.0:
            raise ValueError(f"QuadraticTask: cond must be >= 1, got {cond}")
        self.seed = int(seed)
        self.hparams = {"dim": int(dim), "cond": float(cond), "noise": float(noise),
                        "init_scale": float(init_scale)}
        g = generator(self.family, self.seed, "problem")
        self.eigs = torch.logspace(-math.log10(cond), 0.0, dim, dtype=torch.float64)
        self.eigs = self.eigs[torch.randperm(dim, generator=g)]
        self.target = torch.randn(dim, generator=g, dtype=torch.float64)

    def init_params(self, seed: Optional[int] = None, *, dtype: torch.dtype = torch.float32,
                    device: Optional[torch.device] = None) -> "OrderedDict[str, Tensor]":
        g = generator(self.family, self.seed, "init", seed)
        x = self.target + self.hparams["init_scale"] * torch.randn(
            self.hparams["dim"], generator=g, dtype=torch.float64)
        return OrderedDict(x=x.to(dtype=dtype, device=device))

    def batch(self, step: int, split: str = "train", *,
              device: Optional[torch.device] = None) -> Tensor:
        """The noisy target ``x* + σ ξ`` of this step (float64 on CPU; cast in loss)."""
        check_split(split)
        if self.hparams["noise"] == 0.0:
            return self.target.to(device=device)
        g = generator(self.family, self.seed, split, int(step))
        xi = torch.randn(self.hparams["dim"], generator=g, dtype=torch.float64)
        return (self.target + self.hparams["noise"] * xi).to(device=device)

    def loss(self, params: Mapping[str, Tensor], batch: Tensor) -> Tensor:
        x = params["x"]
        d = x - batch.to(dtype=x.dtype, device=x.device)
        return 0.5 * (self.eigs.to(dtype=x.dtype, device=x.device) * d * d).sum()


class QuadraticFamily(TaskFamily):
    """Quadratics with dim ∈ {8 … 256} (log-uniform), κ ∈ [1, 10⁴] (log-uniform),
    noise 0 with probability ½ else ∈ [0.01, 0.3], init scale ∈ [0.5, 2]."""

    name = "quadratic"

    def sample(self, seed: int) -> QuadraticTask:
        g = generator(self.name, "hparams", seed)
        u = torch.rand(5, generator=g, dtype=torch.float64).tolist()
        dim = int(round(math.exp(math.log(8) + u[0] * (math.log(256) - math.log(8)))))
        cond = 10.0 ** (4.0 * u[1])
        noise = 0.0 if u[2] < 0.5 else 0.01 * 30.0 ** u[3]
        return QuadraticTask(seed, dim=dim, cond=cond, noise=noise, init_scale=0.5 + 1.5 * u[4])
