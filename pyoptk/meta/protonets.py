"""Prototypical networks (Snell et al. 2017) for few-shot classification.

An encoder ``f`` embeds every example; each class's **prototype** is the mean embedding
of its support examples, and a query is classified by a softmax over negative squared
Euclidean distances to the prototypes:

.. math::
    c_j = \\frac1K \\sum_{i: y_i = j} f(x_i), \\qquad
    p(y = j \\mid x) = \\operatorname{softmax}_j\\bigl(-\\lVert f(x) - c_j \\rVert^2\\bigr)

No inner loop: a batch of ``T`` episodes is one encoder call on all ``T·(N·K + N·Q)``
examples, and the prototypes are a one-hot matrix product per task.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ProtoNet", "prototypes"]


def prototypes(embeddings: Tensor, labels: Tensor, n_way: int) -> Tensor:
    """Class means ``[T, n_way, D]`` of support ``embeddings [T, S, D]`` with ``labels
    [T, S]`` in ``0 … n_way-1``. A class without a support example raises."""
    onehot = F.one_hot(labels, n_way).to(embeddings.dtype)          # [T, S, N]
    counts = onehot.sum(1)                                          # [T, N]
    if bool((counts == 0).any()):
        raise ValueError(f"prototypes: some of the {n_way} classes have no support example "
                         f"(support labels per task: {labels.tolist()})")
    return onehot.transpose(1, 2) @ embeddings / counts.unsqueeze(-1)


class ProtoNet(nn.Module):
    """A prototypical network around ``encoder`` (maps ``[B, ...]`` inputs to ``[B, D]``).

    :meth:`forward` takes a batched episode and gives query logits ``[T, N*Q, n_way]``;
    :meth:`loss` the mean cross-entropy and accuracy.
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"ProtoNet: encoder must be an nn.Module, got {type(encoder).__name__}")
        self.encoder = encoder

    def forward(self, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                n_way: int = 0) -> Tensor:
        """Logits ``[T, Q, n_way]`` (negative squared distances) of the queries
        ``query_x [T, Q, ...]`` given the support set ``support_x [T, S, ...]``,
        ``support_y [T, S]``. ``n_way`` defaults to ``support_y.max() + 1``."""
        if support_x.dim() < 3 or query_x.dim() != support_x.dim():
            raise ValueError(f"ProtoNet: support_x and query_x must be [T, n, ...] with the same "
                             f"rank; got {tuple(support_x.shape)} and {tuple(query_x.shape)}")
        if support_y.shape != support_x.shape[:2]:
            raise ValueError(f"ProtoNet: support_y {tuple(support_y.shape)} must be [T, S] = "
                             f"{tuple(support_x.shape[:2])}")
        if support_x.shape[0] != query_x.shape[0] or support_x.shape[2:] != query_x.shape[2:]:
            raise ValueError(f"ProtoNet: support_x {tuple(support_x.shape)} and query_x "
                             f"{tuple(query_x.shape)} must agree in tasks and example shape")
        n_way = n_way or int(support_y.max()) + 1
        T, S, Q = support_x.shape[0], support_x.shape[1], query_x.shape[1]
        emb = self.encoder(torch.cat([support_x.flatten(0, 1), query_x.flatten(0, 1)]))
        emb = emb.flatten(1)
        s_emb, q_emb = emb[:T * S].reshape(T, S, -1), emb[T * S:].reshape(T, Q, -1)
        protos = prototypes(s_emb, support_y, n_way)
        return -torch.cdist(q_emb, protos).square()

    def loss(self, batch) -> Tuple[Tensor, Tensor]:
        """``(mean cross-entropy, accuracy)`` over the queries of a batched episode."""
        sx, sy, qx, qy = batch
        logits = self(sx, sy, qx)
        loss = F.cross_entropy(logits.flatten(0, 1), qy.flatten())
        acc = (logits.argmax(-1) == qy).float().mean()
        return loss, acc
