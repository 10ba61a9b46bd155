"""Task families for meta-training and evaluation (see ``docs/tasks.md``).

* :mod:`pyoptk.tasks.base` — the :class:`Task` / :class:`TaskFamily` interface,
  deterministic from seeds.
* :mod:`pyoptk.tasks.registry` — families by name, the fixed train/valid/test family
  splits (:data:`SPLITS`), and the resumable :class:`TaskSampler`.
"""

from pyoptk.tasks.base import SPLIT_NAMES, Task, TaskFamily, TaskSpec, derive_seed, generator
from pyoptk.tasks.quadratic import QuadraticFamily, QuadraticTask
from pyoptk.tasks.registry import (
    SPLITS, TaskSampler, build_task, family_names, get_family, register_family,
    split_families)

register_family(QuadraticFamily())

# Provisional until every family lands (pyoptk.tasks' families module fills these).
SPLITS.update({"train": ("quadratic",), "valid": ("quadratic",), "test": ("quadratic",)})

__all__ = [
    "SPLIT_NAMES", "SPLITS", "Task", "TaskFamily", "TaskSpec", "TaskSampler", "derive_seed",
    "generator", "build_task", "family_names", "get_family", "register_family",
    "split_families", "QuadraticFamily", "QuadraticTask",
]
