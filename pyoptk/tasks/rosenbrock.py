"""n-dimensional Rosenbrock functions: a curved, narrow valley that punishes optimizers
which follow the gradient direction alone.

``L(x) = s · Σ_{i<n−1} [ a (x_{i+1} − x_i²)² + (c_i − x_i)² ]`` with ``c = 1`` (minimum
0 at ``x = 1``) or, for noisy tasks, ``c = 1 + σ ξ``, ``ξ ~ N(0, 1)`` fresh per batch.
:class:`RosenbrockFamily` draws the dimension n log-uniform in {2 … 32}, the valley
steepness a log-uniform in [1, 100] (100 is the classic function), the loss scale s
log-uniform in [0.01, 1], σ = 0 with probability ½ else log-uniform in [0.01, 0.3],
and the init ``x₀ ~ N(0, init_scale²)`` with init scale in [0.5, 1.5].
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Optional

import torch
from torch import Tensor

from pyoptk.tasks.base import Task, TaskFamily, check_split, generator
from pyoptk.tasks.sampling import Draws

__all__ = ["RosenbrockTask", "RosenbrockFamily"]


class RosenbrockTask(Task):
    """The generalized Rosenbrock function (module docstring); one parameter ``x``
    ``(dim,)``; batches are the float64 valley centres ``c`` ``(dim − 1,)``.

    Args:
        seed (int): task seed.
        dim (int): n, >= 2.
        a (float): valley steepness, > 0.
        scale (float): s, > 0.
        noise (float): σ, >= 0.
        init_scale (float): std of ``x₀``, >= 0.
    """

    family = "rosenbrock"

    def __init__(self, seed: int, dim: int = 2, a: float = 100.0, scale: float = 1.0,
                 noise: float = 0.0, init_scale: float = 1.0):
        checks = (("dim", dim, isinstance(dim, int) and dim >= 2, "an int >= 2"),
                  ("a", a, a > 0, "> 0"), ("scale", scale, scale > 0, "> 0"),
                  ("noise", noise, noise >= 0, ">= 0"),
                  ("init_scale", init_scale, init_scale >= 0, ">= 0"))
        for name, value, ok, want in checks:
            if not ok:
                raise ValueError(f"RosenbrockTask: {name} must be {want}, got {value!r}")
        self.seed = int(seed)
        self.hparams = {"dim": dim, "a": float(a), "scale": float(scale),
                        "noise": float(noise), "init_scale": float(init_scale)}
        self.center = torch.ones(dim - 1, dtype=torch.float64)

    def init_params(self, seed: Optional[int] = None, *, dtype: torch.dtype = torch.float32,
                    device: Optional[torch.device] = None) -> "OrderedDict[str, Tensor]":
        g = generator(self.family, self.seed, "init", seed)
        x = self.hparams["init_scale"] * torch.randn(self.hparams["dim"], generator=g,
                                                     dtype=torch.float64)
        return OrderedDict(x=x.to(dtype=dtype, device=device))

    def batch(self, step: int, split: str = "train", *,
              device: Optional[torch.device] = None) -> Tensor:
        check_split(split)
        if self.hparams["noise"] == 0.0:
            return self.center.to(device=device)
        g = generator(self.family, self.seed, split, int(step))
        xi = torch.randn(self.hparams["dim"] - 1, generator=g, dtype=torch.float64)
        return (self.center + self.hparams["noise"] * xi).to(device=device)

    def loss(self, params: Mapping[str, Tensor], batch: Tensor) -> Tensor:
        x = params["x"]
        c = batch.to(dtype=x.dtype, device=x.device)
        head, tail = x[..., :-1], x[..., 1:]
        valley = self.hparams["a"] * (tail - head * head) ** 2 + (c - head) ** 2
        return self.hparams["scale"] * valley.sum(-1)

    def eval_loss(self, params: Mapping[str, Tensor], split: str = "valid", *,
                  device: Optional[torch.device] = None) -> Tensor:
        """The noise-free loss (``c = 1``; its minimum is 0 at ``x = 1``), for every split."""
        check_split(split)
        return self.loss(params, self.center.to(device=device))


class RosenbrockFamily(TaskFamily):
    """Rosenbrock tasks with the ranges of the module docstring."""

    name = "rosenbrock"

    def sample(self, seed: int) -> RosenbrockTask:
        d = Draws(self.name, "hparams", seed)
        dim = d.int_log_uniform(2, 32)
        a = d.log_uniform(1.0, 100.0)
        scale = d.log_uniform(0.01, 1.0)
        noise = 0.0 if d.bernoulli(0.5) else d.log_uniform(0.01, 0.3)
        init_scale = d.uniform(0.5, 1.5)
        return RosenbrockTask(seed, dim=dim, a=a, scale=scale, noise=noise,
                              init_scale=init_scale)
