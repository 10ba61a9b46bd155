"""Task families for meta-training and evaluation (see ``docs/tasks.md``).

* :mod:`pyoptk.tasks.base` — the :class:`Task` / :class:`TaskFamily` interface,
  deterministic from seeds.
* :mod:`pyoptk.tasks.registry` — families by name, the fixed train/valid/test family
  splits (:data:`SPLITS`), and the resumable :class:`TaskSampler`.
* families: :mod:`~pyoptk.tasks.quadratic`, :mod:`~pyoptk.tasks.rosenbrock`,
  :mod:`~pyoptk.tasks.classification` (logistic regression and MLPs on
  :mod:`~pyoptk.tasks.datasets`).
"""

from pyoptk.tasks.base import SPLIT_NAMES, Task, TaskFamily, TaskSpec, derive_seed, generator
from pyoptk.tasks.char_lm import CharLMFamily, CharLMTask
from pyoptk.tasks.classification import LogisticFamily, MLPFamily, MLPTask
from pyoptk.tasks.cnn import CNNFamily, CNNTask
from pyoptk.tasks.datasets import DATASETS, Dataset, load_dataset
from pyoptk.tasks.quadratic import QuadraticFamily, QuadraticTask
from pyoptk.tasks.registry import (
    SPLITS, TaskSampler, build_task, family_names, get_family, register_family,
    split_families)
from pyoptk.tasks.rosenbrock import RosenbrockFamily, RosenbrockTask

for _family in (QuadraticFamily(), RosenbrockFamily(),
                LogisticFamily("digits"), LogisticFamily("wine"), LogisticFamily("breast_cancer"),
                MLPFamily("digits"), MLPFamily("wine"), MLPFamily("breast_cancer"),
                MLPFamily("digits", depth=(4, 6), width=(32, 128), name="mlp_deep_digits"),
                CNNFamily(), CharLMFamily()):
    register_family(_family)

# Provisional until the CNN and char-LM families land (docs/tasks.md).
SPLITS.update({
    "train": ("quadratic", "rosenbrock", "logreg_digits", "logreg_wine", "mlp_digits",
              "mlp_wine"),
    "valid": ("logreg_breast_cancer", "mlp_breast_cancer"),
    "test": ("mlp_deep_digits", "cnn_digits", "char_lm"),
})

__all__ = [
    "SPLIT_NAMES", "SPLITS", "Task", "TaskFamily", "TaskSpec", "TaskSampler", "derive_seed",
    "generator", "build_task", "family_names", "get_family", "register_family",
    "split_families", "DATASETS", "Dataset", "load_dataset", "QuadraticFamily",
    "QuadraticTask", "RosenbrockFamily", "RosenbrockTask", "LogisticFamily", "MLPFamily",
    "MLPTask", "CNNFamily", "CNNTask", "CharLMFamily", "CharLMTask",
]
