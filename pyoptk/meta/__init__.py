"""Meta-training: outer-loop gradient estimators over truncated unrolls (see
``docs/meta.md``)."""

# --- estimators (TBPTT, ES, PES) ---
from pyoptk.meta.estimator import (
    Estimate, GradientEstimator, MetaLoss, Unroll, check_estimator_args, finish_estimate)
from pyoptk.meta.es import PersistentES, TruncatedES
from pyoptk.meta.tbptt import TruncatedBPTT, fresh_unroll

# --- trainer (config, checkpoints, MetaTrainer) ---
from pyoptk.meta.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pyoptk.meta.config import MetaTrainConfig
from pyoptk.meta.trainer import MetaTrainer, MetaTrainResult, build_estimator

__all__ = [
    # --- estimators ---
    "Estimate", "GradientEstimator", "MetaLoss", "Unroll", "check_estimator_args",
    "finish_estimate", "TruncatedBPTT", "fresh_unroll", "TruncatedES", "PersistentES",
]

# --- trainer ---
__all__ += [
    "MetaTrainConfig", "MetaTrainer", "MetaTrainResult", "build_estimator",
    "CheckpointError", "save_checkpoint", "load_checkpoint",
]
