"""Logistic regression and MLP classifiers on scikit-learn's bundled data sets.

One task class, :class:`MLPTask` (zero hidden layers is multinomial logistic
regression), and two families per data set:

* :class:`LogisticFamily` ``logreg_<dataset>``: batch size ∈ {16, 32, 64, 128},
  init scale ∈ [0, 1] (uniform; 0 is the all-zeros start), l2 0 with probability ½
  else log-uniform in [1e-4, 1e-2]. Convex, so a learned optimizer sees a
  well-posed problem with varied curvature and noise.
* :class:`MLPFamily` ``mlp_<dataset>``: depth (hidden layers) uniform in
  ``depth`` (default 1–3), each hidden width log-uniform in ``width`` (default
  16–128), activation ∈ {relu, tanh, gelu}, batch size ∈ {16, 32, 64, 128}, init
  scale log-uniform in [0.5, 2] (× the LeCun fan-in std, so 0.5 starts nearly
  linear/vanishing and 2 near the edge of exploding for tanh), l2 as above.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from pyoptk.tasks.base import TaskFamily, generator
from pyoptk.tasks.datasets import DATASETS
from pyoptk.tasks.sampling import Draws
from pyoptk.tasks.supervised import ACTIVATIONS, BATCH_SIZES, SupervisedTask, fan_in_normal

__all__ = ["MLPTask", "LogisticFamily", "MLPFamily"]


class MLPTask(SupervisedTask):
    """``softmax(W_L σ(… σ(W_1 x + b_1) …) + b_L)`` with cross-entropy loss.

    Parameters: ``fc{i}.weight`` ``(out, in)`` and ``fc{i}.bias`` ``(out,)`` for
    ``i = 0 … len(hidden)`` (the last is the output layer), as ``nn.Linear`` stores them.

    Args:
        family (str), seed (int), dataset (str): see :class:`SupervisedTask`.
        hidden (sequence of int): hidden widths, each >= 1; empty is logistic regression.
        activation, batch_size, init_scale, l2: see :class:`SupervisedTask`.
    """

    def __init__(self, family: str, seed: int, dataset: str, hidden: Sequence[int] = (),
                 **kwargs):
        hidden = tuple(hidden)
        if not all(isinstance(h, int) and h >= 1 for h in hidden):
            raise ValueError(f"MLPTask: hidden widths must be ints >= 1, got {list(hidden)}")
        super().__init__(family, seed, dataset, hidden=hidden, **kwargs)
        self.sizes: Tuple[int, ...] = (self.data.n_features, *hidden, self.data.n_classes)

    def init_params(self, seed: Optional[int] = None, *, dtype: torch.dtype = torch.float32,
                    device: Optional[torch.device] = None) -> "OrderedDict[str, Tensor]":
        g = generator(self.family, self.seed, "init", seed)
        params: "OrderedDict[str, Tensor]" = OrderedDict()
        for i, (n_in, n_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            w = fan_in_normal(g, (n_out, n_in), n_in, self.hparams["init_scale"])
            params[f"fc{i}.weight"] = w.to(dtype=dtype, device=device)
            params[f"fc{i}.bias"] = torch.zeros(n_out, dtype=dtype, device=device)
        return params

    def logits(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        n_layers = len(self.sizes) - 1
        for i in range(n_layers):
            x = F.linear(x, params[f"fc{i}.weight"], params[f"fc{i}.bias"])
            if i < n_layers - 1:
                x = self.act(x)
        return x


def _check_dataset(who: str, dataset: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"{who}: dataset must be one of {sorted(DATASETS)}, got {dataset!r}")


class LogisticFamily(TaskFamily):
    """``logreg_<dataset>``: multinomial logistic regression (module docstring)."""

    def __init__(self, dataset: str):
        _check_dataset("LogisticFamily", dataset)
        self.dataset = dataset
        self.name = f"logreg_{dataset}"

    def sample(self, seed: int) -> MLPTask:
        d = Draws(self.name, "hparams", seed)
        batch_size = d.choice(BATCH_SIZES)
        init_scale = d.uniform(0.0, 1.0)
        l2 = 0.0 if d.bernoulli(0.5) else d.log_uniform(1e-4, 1e-2)
        return MLPTask(self.name, seed, self.dataset, hidden=(), batch_size=batch_size,
                       init_scale=init_scale, l2=l2)


class MLPFamily(TaskFamily):
    """``mlp_<dataset>`` (or ``name``): MLPs with sampled depth, widths, activation,
    batch size, init scale and l2 (module docstring).

    Args:
        dataset (str): a :data:`~pyoptk.tasks.datasets.DATASETS` key.
        depth (int, int): inclusive range of the number of hidden layers.
        width (int, int): inclusive range of each hidden width (log-uniform).
        name (str, optional): the family name; default ``mlp_<dataset>``.
    """

    def __init__(self, dataset: str, depth: Tuple[int, int] = (1, 3),
                 width: Tuple[int, int] = (16, 128), name: Optional[str] = None):
        if not 1 <= depth[0] <= depth[1]:
            raise ValueError(f"MLPFamily: depth must be (lo, hi) with 1 <= lo <= hi, got {depth}")
        if not 1 <= width[0] <= width[1]:
            raise ValueError(f"MLPFamily: width must be (lo, hi) with 1 <= lo <= hi, got {width}")
        _check_dataset("MLPFamily", dataset)
        self.dataset = dataset
        self.depth = depth
        self.width = width
        self.name = name or f"mlp_{dataset}"

    def sample(self, seed: int) -> MLPTask:
        d = Draws(self.name, "hparams", seed)
        depth = d.integer(*self.depth)
        hidden = tuple(d.int_log_uniform(*self.width) for _ in range(depth))
        activation = d.choice(sorted(ACTIVATIONS))
        batch_size = d.choice(BATCH_SIZES)
        init_scale = d.log_uniform(0.5, 2.0)
        l2 = 0.0 if d.bernoulli(0.5) else d.log_uniform(1e-4, 1e-2)
        return MLPTask(self.name, seed, self.dataset, hidden=hidden, activation=activation,
                       batch_size=batch_size, init_scale=init_scale, l2=l2)
