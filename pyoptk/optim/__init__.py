"""Optimizers: fused ``AdamW``, ``LAMB``, the ``Lookahead`` wrapper, and learned
optimizers (``MLPOptimizer`` on the ``LearnedOptimizer`` base)."""

from pyoptk.optim.adamw import AdamW
from pyoptk.optim.lamb import LAMB
from pyoptk.optim.learned import LearnedOptimizer, RuleMismatchError
from pyoptk.optim.lookahead import Lookahead
from pyoptk.optim.mlp import MLPOptimizer

__all__ = ["AdamW", "LAMB", "Lookahead", "LearnedOptimizer", "MLPOptimizer",
           "RuleMismatchError"]
