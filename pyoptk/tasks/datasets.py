"""scikit-learn's bundled classification data sets as tensors, with fixed data splits.

``digits`` (1,797 × 64: 8×8 images, 10 classes), ``wine`` (178 × 13, 3 classes) and
``breast_cancer`` (569 × 30, 2 classes) ship inside scikit-learn (no download). Each is
loaded once per process and split once, by a fixed permutation from
:func:`~pyoptk.tasks.base.generator` (``("dataset", name, "split")``), into 60 % train /
20 % valid / 20 % test rows. Features are standardized with the *train* rows' mean and
standard deviation (constant features, e.g. digits' always-blank corner pixels, get
std 1), so no statistic leaks from valid/test rows.

scikit-learn is optional for pyoptk: it is imported only when a data set is first
loaded, and its absence raises an ``ImportError`` saying how to install it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, Tuple

import torch
from torch import Tensor

from pyoptk.tasks.base import check_split, generator

__all__ = ["DATASETS", "Dataset", "load_dataset"]

#: Data set name -> scikit-learn loader function name.
DATASETS: Dict[str, str] = {
    "digits": "load_digits",
    "wine": "load_wine",
    "breast_cancer": "load_breast_cancer",
}

# Fractions of rows in the train and valid splits; test gets the rest.
_TRAIN_FRAC, _VALID_FRAC = 0.6, 0.2


@dataclass(frozen=True)
class Dataset:
    """One data set, standardized and split (shared, read-only: never modify in place).

    Attributes:
        name (str): key of :data:`DATASETS`.
        x (dict[str, Tensor]): split -> float32 features ``(n_split, n_features)``.
        y (dict[str, Tensor]): split -> int64 labels ``(n_split,)`` in ``[0, n_classes)``.
        n_features (int), n_classes (int).
    """

    name: str
    x: Dict[str, Tensor]
    y: Dict[str, Tensor]
    n_features: int
    n_classes: int

    def split(self, split: str) -> Tuple[Tensor, Tensor]:
        """``(x, y)`` of ``split`` ("train", "valid" or "test")."""
        check_split(split)
        return self.x[split], self.y[split]


def _sklearn_arrays(name: str):
    try:
        import sklearn.datasets
    except ImportError as e:
        raise ImportError(
            f"the {name!r} task data set comes from scikit-learn, which is not installed: "
            f"pip install scikit-learn (or pip install 'pyoptk[meta]')") from e
    return getattr(sklearn.datasets, DATASETS[name])(return_X_y=True)


@functools.lru_cache(maxsize=None)
def load_dataset(name: str) -> Dataset:
    """The data set ``name`` (see the module docstring); cached per process."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {name!r}")
    x_np, y_np = _sklearn_arrays(name)
    x = torch.as_tensor(x_np, dtype=torch.float64)
    y = torch.as_tensor(y_np, dtype=torch.int64)
    n = x.shape[0]
    perm = torch.randperm(n, generator=generator("dataset", name, "split"))
    n_train, n_valid = int(_TRAIN_FRAC * n), int(_VALID_FRAC * n)
    rows = {"train": perm[:n_train], "valid": perm[n_train:n_train + n_valid],
            "test": perm[n_train + n_valid:]}
    mean = x[rows["train"]].mean(0)
    std = x[rows["train"]].std(0)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    xs = ((x - mean) / std).to(torch.float32)
    return Dataset(name=name,
                   x={s: xs[r].contiguous() for s, r in rows.items()},
                   y={s: y[r].contiguous() for s, r in rows.items()},
                   n_features=int(x.shape[1]), n_classes=int(y.max()) + 1)
