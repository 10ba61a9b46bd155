"""Task families by name, the fixed train/valid/test splits of families, and a
resumable sampler of tasks from a split."""

from __future__ import annotations

from typing import Dict, List, Mapping, Tuple

from pyoptk.tasks.base import Task, TaskFamily, TaskSpec, derive_seed

__all__ = ["register_family", "get_family", "family_names", "build_task", "SPLITS",
           "split_families", "TaskSampler"]

_FAMILIES: Dict[str, TaskFamily] = {}


def register_family(family: TaskFamily) -> TaskFamily:
    """Add ``family`` under ``family.name`` (an existing name raises ``ValueError``)."""
    if family.name in _FAMILIES:
        raise ValueError(f"task family {family.name!r} is already registered")
    _FAMILIES[family.name] = family
    return family


def get_family(name: str) -> TaskFamily:
    """The registered family ``name``; ``ValueError`` listing the known ones otherwise."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown task family {name!r}; known: {sorted(_FAMILIES)}") from None


def family_names() -> List[str]:
    return sorted(_FAMILIES)


def build_task(spec: TaskSpec) -> Task:
    """Rebuild a task from its spec."""
    return get_family(spec.family).sample(spec.seed)


# The splits of *families*. Meta-training samples only "train"; meta-validation and
# early stopping look at "valid"; "test" holds families meta-training never sees and
# is used only by evaluation. Filled by pyoptk.tasks.__init__ once every family module
# has registered (see docs/tasks.md for what each holds and why).
SPLITS: Dict[str, Tuple[str, ...]] = {}


def split_families(split: str) -> Tuple[str, ...]:
    """Family names of ``split`` ("train", "valid" or "test")."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    return SPLITS[split]


class TaskSampler:
    """An endless, deterministic sequence of tasks drawn from a split (or an explicit
    list of family names): task ``i`` is a pure function of ``(seed, i)``, so the state
    is just the counter and resuming is exact.

    >>> sampler = TaskSampler("train", seed=0)
    >>> tasks = sampler.next_batch(4)
    >>> state = sampler.state_dict()   # {"families": [...], "seed": 0, "count": 4}
    """

    def __init__(self, split_or_families, seed: int = 0):
        if isinstance(split_or_families, str):
            families = split_families(split_or_families)
        else:
            families = tuple(split_or_families)
            if not families:
                raise ValueError("TaskSampler: families must not be empty")
            for name in families:
                get_family(name)
        self.families: Tuple[str, ...] = tuple(families)
        self.seed = int(seed)
        self.count = 0

    def spec(self, index: int) -> TaskSpec:
        """The spec of task ``index`` of this sequence."""
        fam = self.families[derive_seed("family", self.seed, index) % len(self.families)]
        return TaskSpec(fam, derive_seed("task", self.seed, index) % (1 << 31))

    def next(self) -> Task:
        task = build_task(self.spec(self.count))
        self.count += 1
        return task

    def next_batch(self, n: int) -> List[Task]:
        return [self.next() for _ in range(n)]

    def state_dict(self) -> Dict[str, object]:
        return {"families": list(self.families), "seed": self.seed, "count": self.count}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        families = tuple(state["families"])  # type: ignore[arg-type]
        if families != self.families:
            raise ValueError(f"TaskSampler.load_state_dict: the checkpoint samples families "
                             f"{list(families)}, this sampler {list(self.families)}")
        self.seed = int(state["seed"])  # type: ignore[arg-type]
        self.count = int(state["count"])  # type: ignore[arg-type]
