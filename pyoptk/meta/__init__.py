"""Meta-training: outer-loop gradient estimators over truncated unrolls (see
``docs/meta.md``)."""

# --- estimators (TBPTT, ES, PES) ---
from pyoptk.meta.estimator import (
    Estimate, GradientEstimator, MetaLoss, Unroll, check_estimator_args, finish_estimate)
from pyoptk.meta.es import PersistentES, TruncatedES
from pyoptk.meta.tbptt import TruncatedBPTT, fresh_unroll

__all__ = [
    # --- estimators ---
    "Estimate", "GradientEstimator", "MetaLoss", "Unroll", "check_estimator_args",
    "finish_estimate", "TruncatedBPTT", "fresh_unroll", "TruncatedES", "PersistentES",
]
