"""Amortized inference: a task encoder maps a support set to a task embedding ``z`` that
conditions the model (in the spirit of neural processes / CAVIA's context vectors).

* **pure** — ``z = e(S)``; the prediction is ``f(x, z)``: adaptation is one encoder call.
* **hybrid** — ``z₀ = e(S)``, then ``inner_steps`` gradient steps on ``z`` alone
  (``z_{k+1} = z_k − α ∇_z L(f(·, z_k); S)``, the fused differentiable ``inner_sgd``
  op, second order by default) refine it before predicting the query set.
* **variational** (either mode) — the encoder outputs ``q(z | S) = N(μ, diag σ²)``,
  ``z`` is sampled by reparameterization, and the training loss is

  .. math:: \\mathcal L = \\mathrm{KL}\\bigl(q(z\\mid S)\\,\\|\\,N(0, I)\\bigr) + λ \\cdot
     \\text{reconstruction},\\qquad λ = 10 \\text{ by default}

  where the reconstruction term is the query loss (``loss_fn``). Evaluation uses ``μ``.

The encoder is permutation-invariant (deep sets): ``e(S) = ρ(mean_i φ([x_i, y_i]))``.
Shapes: ``support_x [T, S, dx]``, ``support_y [T, S, dy]`` (float; one-hot labels for
classification), ``z [T, dz]``; the decoder maps ``x [T, n, dx]`` and ``z [T, dz]`` to
outputs ``[T, n, dy]``.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
from torch import Tensor, nn

from pyoptk.ops.inner_step import inner_sgd

__all__ = ["TaskEncoder", "ConditionedMLP", "AmortizedLearner", "per_task_mse"]

_MODES = ("pure", "hybrid")


def _mlp(sizes) -> nn.Sequential:
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class TaskEncoder(nn.Module):
    """Deep-sets encoder of a support set: ``[T, S, dx] × [T, S, dy] → [T, dz]``
    (variational: ``(μ, log σ²)``, each ``[T, dz]``).

    Args:
        x_dim, y_dim (int): feature sizes of one support input and target.
        z_dim (int): embedding size.
        hidden (int): width of φ and ρ (default 64).
        variational (bool): output a diagonal Gaussian instead of a point (default False).
    """

    def __init__(self, x_dim: int, y_dim: int, z_dim: int, hidden: int = 64,
                 variational: bool = False):
        super().__init__()
        for name, v in (("x_dim", x_dim), ("y_dim", y_dim), ("z_dim", z_dim), ("hidden", hidden)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"TaskEncoder: {name} must be a positive int, got {v!r}")
        self.x_dim, self.y_dim, self.z_dim = x_dim, y_dim, z_dim
        self.variational = bool(variational)
        self.phi = _mlp([x_dim + y_dim, hidden, hidden])
        self.rho = _mlp([hidden, hidden, 2 * z_dim if variational else z_dim])

    def forward(self, support_x: Tensor, support_y: Tensor):
        if (support_x.dim() != 3 or support_y.dim() != 3
                or support_x.shape[:2] != support_y.shape[:2]):
            raise ValueError(f"TaskEncoder: support_x must be [T, S, {self.x_dim}] and support_y "
                             f"[T, S, {self.y_dim}]; got {tuple(support_x.shape)} and "
                             f"{tuple(support_y.shape)}")
        if support_x.shape[-1] != self.x_dim or support_y.shape[-1] != self.y_dim:
            raise ValueError(f"TaskEncoder: expected feature sizes x={self.x_dim}, y={self.y_dim}; "
                             f"got x={support_x.shape[-1]}, y={support_y.shape[-1]}")
        h = self.rho(self.phi(torch.cat([support_x, support_y], -1)).mean(1))
        return h.chunk(2, -1) if self.variational else h


class ConditionedMLP(nn.Module):
    """Decoder ``f(x, z) = MLP([x, z])``: ``x [T, n, dx]``, ``z [T, dz]`` → ``[T, n, dy]``."""

    def __init__(self, x_dim: int, z_dim: int, out_dim: int, hidden: int = 64, depth: int = 2):
        super().__init__()
        self.net = _mlp([x_dim + z_dim] + [hidden] * depth + [out_dim])

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        return self.net(torch.cat([x, z.unsqueeze(1).expand(-1, x.shape[1], -1)], -1))


class AmortizedLearner(nn.Module):
    """Encoder + conditioned decoder, pure or hybrid, optionally variational (module
    docstring).

    Args:
        encoder (TaskEncoder): support set → ``z`` (or ``(μ, log σ²)``).
        decoder (nn.Module): ``decoder(x [T, n, dx], z [T, dz]) -> [T, n, dy]``.
        loss_fn (callable): ``loss_fn(outputs [T, n, dy], targets [T, n, dy]) -> [T]``,
            per-task losses (e.g. :func:`per_task_mse`).
        mode (str): ``"pure"`` (default) or ``"hybrid"``.
        inner_steps (int): gradient steps on ``z`` in hybrid mode (default 3).
        inner_lr (float): their step size (default 0.1).
        recon_weight (float): λ of the variational loss (default 10).
    """

    def __init__(self, encoder: TaskEncoder, decoder: nn.Module,
                 loss_fn: Callable[[Tensor, Tensor], Tensor], *, mode: str = "pure",
                 inner_steps: int = 3, inner_lr: float = 0.1, recon_weight: float = 10.0):
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"AmortizedLearner: mode must be one of {_MODES}, got {mode!r}")
        if mode == "hybrid" and (not isinstance(inner_steps, int) or inner_steps < 1):
            raise ValueError(f"AmortizedLearner: inner_steps must be an int >= 1, "
                             f"got {inner_steps!r}")
        if not inner_lr > 0:
            raise ValueError(f"AmortizedLearner: inner_lr must be > 0, got {inner_lr!r}")
        if not recon_weight > 0:
            raise ValueError(f"AmortizedLearner: recon_weight must be > 0, got {recon_weight!r}")
        self.encoder, self.decoder, self.loss_fn = encoder, decoder, loss_fn
        self.mode, self.inner_steps, self.inner_lr = mode, inner_steps, float(inner_lr)
        self.recon_weight = float(recon_weight)

    def embed(self, support_x: Tensor, support_y: Tensor) -> Tuple[Tensor, Tensor]:
        """``(z [T, dz], kl [T])``: the (sampled, when training a variational encoder)
        embedding after the hybrid refinement, and the KL term (zeros if not
        variational)."""
        out = self.encoder(support_x, support_y)
        if self.encoder.variational:
            mu, logvar = out
            kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).sum(-1)
            z = mu + (0.5 * logvar).exp() * torch.randn_like(mu) if self.training else mu
        else:
            z, kl = out, out.new_zeros(out.shape[0])
        if self.mode == "hybrid":
            create_graph = torch.is_grad_enabled()
            with torch.enable_grad():
                if not create_graph:
                    z = z.detach().requires_grad_()
                for _ in range(self.inner_steps):
                    loss = self.loss_fn(self.decoder(support_x, z), support_y).sum()
                    (g,) = torch.autograd.grad(loss, [z], create_graph=create_graph)
                    (z,) = inner_sgd([z.contiguous()], [g.contiguous()], self.inner_lr)
            if not create_graph:
                z = z.detach()
        return z, kl

    def forward(self, batch) -> Dict[str, Tensor]:
        """Losses on a batched episode: ``{"loss", "recon", "kl", "outputs"}``; ``loss`` is
        ``recon`` (mean query loss) or, variational, ``mean(kl) + λ·recon``."""
        sx, sy, qx, qy = batch
        z, kl = self.embed(sx, sy)
        out = self.decoder(qx, z)
        recon = self.loss_fn(out, qy).mean()
        kl = kl.mean()
        loss = kl + self.recon_weight * recon if self.encoder.variational else recon
        return {"loss": loss, "recon": recon, "kl": kl, "outputs": out}


def per_task_mse(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean squared error per task: ``[T, n, d] × [T, n, d] → [T]``."""
    return (outputs - targets).square().flatten(1).mean(1)

