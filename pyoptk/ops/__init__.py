"""Fused ops, each registered as ``torch.ops.pyoptk.<name>`` with a fake (meta)
implementation and per-backend kernels; the pure-PyTorch reference beside each is its
specification. See :mod:`pyoptk._backend` for how a backend is chosen."""

from pyoptk.ops.adamw import AdamWHyper, adamw_, adamw_reference
from pyoptk.ops.centralize import centralize_gradients_, centralize_reference
from pyoptk.ops.grad_norm import (
    clip_grad_norm_, clip_grad_norm_reference, grad_norm, grad_norm_reference)
from pyoptk.ops.inner_step import inner_adam, inner_metasgd, inner_sgd
from pyoptk.ops.lamb import LambHyper, lamb_, lamb_reference
from pyoptk.ops.mlp_step import mlp_step
from pyoptk.ops.mlp_update import (
    MLPUpdateHyper, mlp_update_, mlp_update_functional, mlp_update_reference)

__all__ = [
    "adamw_", "lamb_", "clip_grad_norm_", "grad_norm", "centralize_gradients_",
    "adamw_reference", "lamb_reference", "clip_grad_norm_reference", "grad_norm_reference",
    "centralize_reference", "AdamWHyper", "LambHyper",
    "mlp_update_", "mlp_update_functional", "mlp_update_reference", "MLPUpdateHyper",
    "mlp_step", "inner_sgd", "inner_metasgd", "inner_adam",
]
