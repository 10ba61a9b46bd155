"""N-way K-shot classification episodes over scikit-learn's bundled digits.

An **episode** is one few-shot task: ``n_way`` classes drawn from a class pool, relabeled
``0 … n_way-1`` in random order, with ``k_shot`` labeled *support* examples and
``n_query`` *query* examples per class. A meta-learner adapts on the support set and is
scored on the query set (Vinyals et al. 2016; Finn et al. 2017).

**The fixed split of digits** (1,797 8×8 images, 174–183 per class). 5-way episodes
need 5 classes in every split, and digits has only 10, so the split is by class for
meta-test and by *sample* for meta-validation:

=========  =======================================  ==========================
split      classes                                  samples
=========  =======================================  ==========================
``train``  0, 1, 2, 3, 4                            first 80 % of each class
``valid``  0, 1, 2, 3, 4                            last 20 % of each class
``test``   5, 6, 7, 8, 9 (never seen in training)   all
=========  =======================================  ==========================

So ``test`` measures generalization to new classes (the few-shot claim), and ``valid``
— used for early stopping — measures generalization to unseen images of the training
classes; it is the only held-out signal available without giving up test classes.
Sample order inside a class is scikit-learn's (fixed), so the split is the same on
every machine.

Everything is deterministic: episode ``i`` of a sampler is a pure function of
``(seed, split, n_way, k_shot, n_query, i)`` through :func:`~pyoptk.tasks.base.generator`.
scikit-learn is imported only when the data is first needed.
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from pyoptk.tasks.base import generator

__all__ = ["Episode", "stack_episodes", "DigitsEpisodes", "DIGITS_SPLITS", "load_digits"]

#: split -> (classes, (first, last) fraction of each class's samples).
DIGITS_SPLITS: Dict[str, Tuple[Tuple[int, ...], Tuple[float, float]]] = {
    "train": ((0, 1, 2, 3, 4), (0.0, 0.8)),
    "valid": ((0, 1, 2, 3, 4), (0.8, 1.0)),
    "test": ((5, 6, 7, 8, 9), (0.0, 1.0)),
}


class Episode(NamedTuple):
    """One few-shot task, or a batch of them with a leading task dimension ``T``.

    Classification: ``support_x [N*K, 1, 8, 8]``, ``support_y [N*K]`` (int64, in
    ``0 … N-1``), ``query_x [N*Q, 1, 8, 8]``, ``query_y [N*Q]``; batched, each gets a
    leading ``[T]``. Regression (:mod:`pyoptk.tasks.sinusoid`): ``x`` and ``y`` are
    ``[K, 1]`` / ``[Q, 1]`` float.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "Episode":
        """Moved to ``device``; floating inputs (and float targets) cast to ``dtype``."""
        def mv(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return Episode(*(mv(t) for t in self))

    @property
    def num_tasks(self) -> int:
        """``T``, the leading dimension of a batched episode."""
        return int(self.support_x.shape[0])


def stack_episodes(episodes: Sequence[Episode]) -> Episode:
    """A batch of equally shaped episodes: every field stacked along a new dim 0."""
    if not episodes:
        raise ValueError("stack_episodes: episodes must not be empty")
    shapes = {tuple(tuple(t.shape) for t in e) for e in episodes}
    if len(shapes) != 1:
        raise ValueError(f"stack_episodes: episodes have different shapes {sorted(shapes)}; "
                         "a batch needs the same n_way, k_shot and n_query")
    return Episode(*(torch.stack(list(ts)) for ts in zip(*episodes)))


_DIGITS_CACHE: Dict[str, Tuple[Tensor, Tensor]] = {}


def load_digits() -> Tuple[Tensor, Tensor]:
    """``(images [1797, 1, 8, 8] float32 in [0, 1], labels [1797] int64)`` from
    ``sklearn.datasets.load_digits`` (bundled with scikit-learn, no download), cached."""
    if "digits" not in _DIGITS_CACHE:
        try:
            from sklearn.datasets import load_digits as _sk_load_digits
        except ImportError as exc:
            raise ImportError("pyoptk.tasks.fewshot needs scikit-learn for the digits data "
                              "(pip install scikit-learn)") from exc
        d = _sk_load_digits()
        x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        _DIGITS_CACHE["digits"] = (x, torch.tensor(d.target, dtype=torch.int64))
    return _DIGITS_CACHE["digits"]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class DigitsEpisodes:
    """Deterministic N-way K-shot episodes from one split of digits (module docstring).

    Args:
        split (str): ``"train"``, ``"valid"`` or ``"test"`` (:data:`DIGITS_SPLITS`).
        n_way (int): classes per episode (at most 5: each split has 5 classes).
        k_shot (int): support examples per class.
        n_query (int): query examples per class.
        seed (int): episode ``i`` depends only on ``(seed, split, shape, i)``.
        flatten (bool): images as ``[64]`` vectors instead of ``[1, 8, 8]``.

    >>> eps = DigitsEpisodes("train", n_way=5, k_shot=1, n_query=15, seed=0)
    >>> ep = eps.episode(0)          # support_x [5, 1, 8, 8], query_x [75, 1, 8, 8]
    >>> batch = eps.batch(0, 4)      # episodes 0..3 stacked: support_x [4, 5, 1, 8, 8]
    """

    def __init__(self, split: str = "train", n_way: int = 5, k_shot: int = 1,
                 n_query: int = 15, seed: int = 0, flatten: bool = False):
        if split not in DIGITS_SPLITS:
            raise ValueError(f"split must be one of {sorted(DIGITS_SPLITS)}, got {split!r}")
        self.split = split
        self.n_way = _positive_int("n_way", n_way)
        self.k_shot = _positive_int("k_shot", k_shot)
        self.n_query = _positive_int("n_query", n_query)
        self.seed = int(seed)
        self.flatten = bool(flatten)
        classes, (lo, hi) = DIGITS_SPLITS[split]
        if n_way > len(classes):
            raise ValueError(f"n_way={n_way} but split {split!r} has only {len(classes)} "
                             f"classes {list(classes)}")
        x, y = load_digits()
        self._pools: List[Tensor] = []
        for c in classes:
            idx = (y == c).nonzero().flatten()
            n = idx.numel()
            pool = x[idx[int(round(lo * n)):int(round(hi * n))]]
            self._pools.append(pool.flatten(1) if self.flatten else pool)
        smallest = min(p.shape[0] for p in self._pools)
        if k_shot + n_query > smallest:
            raise ValueError(f"k_shot + n_query = {k_shot} + {n_query} exceeds the smallest "
                             f"class of split {split!r} ({smallest} examples)")
        self.classes = classes

    @property
    def input_shape(self) -> Tuple[int, ...]:
        return (64,) if self.flatten else (1, 8, 8)

    def episode(self, index: int) -> Episode:
        """Episode ``index``: classes in a random order (label ``j`` is the ``j``-th
        drawn class), support and query disjoint, rows ordered by label."""
        gen = generator("fewshot-digits", self.seed, self.split, self.n_way, self.k_shot,
                        self.n_query, int(index))
        chosen = torch.randperm(len(self._pools), generator=gen)[:self.n_way]
        sx, qx = [], []
        for c in chosen.tolist():
            pool = self._pools[c]
            pick = torch.randperm(pool.shape[0], generator=gen)[:self.k_shot + self.n_query]
            sx.append(pool[pick[:self.k_shot]])
            qx.append(pool[pick[self.k_shot:]])
        labels = torch.arange(self.n_way)
        return Episode(torch.cat(sx), labels.repeat_interleave(self.k_shot),
                       torch.cat(qx), labels.repeat_interleave(self.n_query))

    def batch(self, index: int, num_tasks: int) -> Episode:
        """Episodes ``index*num_tasks … (index+1)*num_tasks - 1`` stacked (meta-batch
        ``index``)."""
        _positive_int("num_tasks", num_tasks)
        return stack_episodes([self.episode(index * num_tasks + t) for t in range(num_tasks)])

    def __repr__(self) -> str:
        return (f"DigitsEpisodes({self.split!r}, n_way={self.n_way}, k_shot={self.k_shot}, "
                f"n_query={self.n_query}, seed={self.seed})")
