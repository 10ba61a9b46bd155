"""Learned update rules as data + pure functions.

* :mod:`pyoptk.learned.features` — :class:`FeatureConfig` and the composable,
  differentiable gradient features (momenta, RMS, factored accumulators, log-sign,
  time features, per-tensor second-moment normalization).
* :mod:`pyoptk.learned.mlp` — the per-parameter MLP rule: :class:`MLPConfig`,
  :func:`init_meta_params`, :func:`init_state`, and the functional, differentiable
  :func:`update` used by meta-training (``pyoptk.optim.MLPOptimizer`` wraps it).
* :mod:`pyoptk.learned.files` — rule files (safetensors / torch) and the identity hash.
* :mod:`pyoptk.learned.pretrained` — shipped weights, looked up by name.

See ``docs/learned.md``.
"""

from pyoptk.learned import features, files, mlp, pretrained
from pyoptk.learned.features import FeatureConfig
from pyoptk.learned.files import rule_hash
from pyoptk.learned.mlp import (
    MLPConfig, MLPRule, MLPState, check_meta_params, init_meta_params, init_state,
    rule_identity, update)

__all__ = [
    "features", "files", "mlp", "pretrained", "FeatureConfig", "MLPConfig", "MLPRule",
    "MLPState", "init_meta_params", "init_state", "check_meta_params", "update",
    "rule_hash", "rule_identity",
]
