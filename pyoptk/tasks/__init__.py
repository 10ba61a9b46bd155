"""Task families for meta-training and evaluation (see ``docs/tasks.md``).

* :mod:`pyoptk.tasks.base` — the :class:`Task` / :class:`TaskFamily` interface,
  deterministic from seeds.
* :mod:`pyoptk.tasks.registry` — families by name, the fixed train/valid/test family
  splits (:data:`SPLITS`), and the resumable :class:`TaskSampler`.
* families: :mod:`~pyoptk.tasks.quadratic`, :mod:`~pyoptk.tasks.rosenbrock`,
  :mod:`~pyoptk.tasks.classification` (logistic regression and MLPs) and
  :mod:`~pyoptk.tasks.cnn` on :mod:`~pyoptk.tasks.datasets`,
  :mod:`~pyoptk.tasks.char_lm` on the corpus of :mod:`~pyoptk.tasks.text`.
"""

from pyoptk.tasks.base import (
    SPLIT_NAMES, Task, TaskFamily, TaskSpec, check_split, derive_seed, generator)
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
del _family

# The fixed splits of families (docs/tasks.md, "Splits of families", says why): train
# mixes synthetic problems with shallow classifiers on two data sets; valid holds out a
# data set; test holds out architectures and modalities (deeper MLPs, CNNs, char LMs).
SPLITS.update({
    "train": ("quadratic", "rosenbrock", "logreg_digits", "logreg_wine", "mlp_digits",
              "mlp_wine"),
    "valid": ("logreg_breast_cancer", "mlp_breast_cancer"),
    "test": ("mlp_deep_digits", "cnn_digits", "char_lm"),
})

__all__ = [
    "SPLIT_NAMES", "SPLITS", "Task", "TaskFamily", "TaskSpec", "TaskSampler", "check_split",
    "derive_seed",
    "generator", "build_task", "family_names", "get_family", "register_family",
    "split_families", "DATASETS", "Dataset", "load_dataset", "QuadraticFamily",
    "QuadraticTask", "RosenbrockFamily", "RosenbrockTask", "LogisticFamily", "MLPFamily",
    "MLPTask", "CNNFamily", "CNNTask", "CharLMFamily", "CharLMTask",
]
