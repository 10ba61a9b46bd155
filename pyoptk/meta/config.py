"""The meta-training configuration: a tree of frozen dataclasses, read from YAML or JSON.

:class:`MetaTrainConfig` is everything that determines a meta-training run: the rule
(:class:`pyoptk.learned.MLPConfig`), the gradient estimator, the task families, the
task batch, the meta-optimizer, validation and early stopping, checkpoints, logs,
precision and the seed. Two runs with equal configs compute the same meta-parameters
bit for bit, which is why a checkpoint records its config and resuming refuses a
different one (except :data:`RESUMABLE_FIELDS`, which do not change the math).

Every field is checked when a :class:`MetaTrainConfig` is built, from a dict or
directly: an unknown field, a wrong type or an out-of-range value raises
``ValueError`` naming the dotted path of the field (``estimator.truncation``) and
what was expected. See ``docs/meta-training.md`` for the field reference.
"""

from __future__ import annotations

import json
import math
import os
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Callable, Dict, Mapping, Tuple, Union

from pyoptk.learned.features import FeatureConfig
from pyoptk.learned.mlp import MLPConfig
from pyoptk.tasks.base import SPLIT_NAMES

__all__ = [
    "EstimatorConfig", "TasksConfig", "OptimizerConfig", "ValidationConfig",
    "CheckpointConfig", "LogConfig", "MetaTrainConfig", "RESUMABLE_FIELDS",
    "ESTIMATOR_KINDS", "PRECISIONS",
]

ESTIMATOR_KINDS = ("tbptt", "es", "pes")
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("cpu", "cuda")

#: Fields a resumed run may change: they decide how long to run, when to stop and
#: where to write, not what any step computes. A prefix ending in "." covers a subtree.
RESUMABLE_FIELDS = ("outer_steps", "validation.patience", "checkpoint.", "log.", "threads")

# A check is (predicate, what was expected); applied after the type check.
_Check = Tuple[Callable[[Any], bool], str]


def _positive(v) -> bool:
    return v > 0 and math.isfinite(v)


def _plain(v) -> bool:
    """JSON-like values: scalars, lists and str-keyed mappings of them (what a
    checkpoint can store safely)."""
    if isinstance(v, (list, tuple)):
        return all(_plain(x) for x in v)
    if isinstance(v, Mapping):
        return all(isinstance(k, str) and _plain(x) for k, x in v.items())
    return v is None or isinstance(v, (bool, int, float, str))


@dataclass(frozen=True)
class EstimatorConfig:
    """The outer-gradient estimator (:mod:`pyoptk.meta.estimator`).

    Args:
        kind (str, default "tbptt"): "tbptt", "es" or "pes".
        truncation (int, default 10): inner steps per estimate (per outer step).
        horizon (int, default 100): inner steps per unroll before it restarts on a new
            task; >= truncation.
        options (dict, default {}): further keyword arguments of the estimator's
            constructor (e.g. ES/PES ``sigma``, ``n_particles``), plain values only.
        stagger (bool, default False): start the first unrolls at evenly spaced steps
            of the horizon (slot ``k`` of ``n`` at step ``k·horizon//n``, rounded down
            to a multiple of ``truncation``) instead of all at step 0, so that from the
            first outer step each meta-gradient mixes early and late phases of inner
            training rather than all unrolls being at the same step (and restarting
            together). Only the first episode of each slot is shorter: its parameters
            and rule state are fresh, it just reaches the horizon sooner.
    """

    kind: str = "tbptt"
    truncation: int = 10
    horizon: int = 100
    options: Dict[str, Any] = field(default_factory=dict)
    stagger: bool = False

    _checks = {
        "kind": (lambda v: v in ESTIMATOR_KINDS, f"one of {list(ESTIMATOR_KINDS)}"),
        "truncation": (lambda v: v >= 1, "an int >= 1"),
        "horizon": (lambda v: v >= 1, "an int >= 1"),
        "options": (_plain, "a mapping of str to plain values (numbers, strings, bools, "
                            "lists, mappings)"),
    }


@dataclass(frozen=True)
class TasksConfig:
    """Where tasks come from: a family split name (:data:`pyoptk.tasks.SPLITS`) or an
    explicit list of registered family names.

    Args:
        train (str or list of str, default "train"): meta-training tasks.
        valid (str or list of str, default "valid"): meta-validation tasks (held out).
    """

    train: Union[str, Tuple[str, ...]] = "train"
    valid: Union[str, Tuple[str, ...]] = "valid"


@dataclass(frozen=True)
class OptimizerConfig:
    """The meta-optimizer, ``torch.optim.AdamW`` over the meta-parameters.

    Args:
        lr (float, default 1e-3), weight_decay (float, default 0.0),
        betas (two floats in [0, 1), default (0.9, 0.999)), eps (float, default 1e-8).
    """

    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    _checks = {
        "lr": (_positive, "a finite number > 0"),
        "weight_decay": (lambda v: v >= 0 and math.isfinite(v), "a finite number >= 0"),
        "betas": (lambda v: all(0.0 <= b < 1.0 for b in v), "two numbers in [0, 1)"),
        "eps": (_positive, "a finite number > 0"),
    }


@dataclass(frozen=True)
class ValidationConfig:
    """Meta-validation on held-out tasks and early stopping.

    Args:
        every (int, default 0): validate every this many outer steps; 0 disables
            validation (and early stopping).
        n_tasks (int, default 8): validation tasks (fixed for the whole run).
        horizon (int, default 100): inner steps the rule trains each of them.
        patience (int, default 0): stop after this many validations without an
            improvement of more than ``min_delta``; 0 never stops early.
        min_delta (float, default 0.0): the improvement that counts.
        split (str, default "valid"): the data split each task's final loss is scored
            on. "train" scores optimization itself (what the meta-loss trains for and
            what ``pyoptk eval`` reports); "valid" scores generalization, which a fast
            optimizer can lose to overfitting on the small bundled data sets.
        log_loss (bool, default False): average ``log(max(loss, 1e-8))`` of the final
            losses, so tasks whose losses differ by orders of magnitude weigh alike
            (below 1e-8 a task counts as solved).
    """

    every: int = 0
    n_tasks: int = 8
    horizon: int = 100
    patience: int = 0
    min_delta: float = 0.0
    split: str = "valid"
    log_loss: bool = False

    _checks = {
        "every": (lambda v: v >= 0, "an int >= 0"),
        "n_tasks": (lambda v: v >= 1, "an int >= 1"),
        "horizon": (lambda v: v >= 1, "an int >= 1"),
        "patience": (lambda v: v >= 0, "an int >= 0"),
        "min_delta": (lambda v: v >= 0 and math.isfinite(v), "a finite number >= 0"),
        "split": (lambda v: v in SPLIT_NAMES, f"one of {list(SPLIT_NAMES)}"),
    }


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints (``last.pt``, the previous one as ``prev.pt``) and rule files.

    Args:
        every (int, default 100): write a checkpoint every this many outer steps; 0:
            only at the end. The end of a run always writes one.
        dir (str, default "runs/meta/checkpoints"): where.
    """

    every: int = 100
    dir: str = "runs/meta/checkpoints"

    _checks = {"every": (lambda v: v >= 0, "an int >= 0"),
               "dir": (lambda v: v != "", "a non-empty path")}


@dataclass(frozen=True)
class LogConfig:
    """Logs (written by rank 0).

    Args:
        dir (str, default "runs/meta/logs"): TensorBoard event files and the loss plot.
        tensorboard (bool, default True): write TensorBoard scalars (needs tensorboard).
        plot (bool, default True): write ``loss_curve.png`` at the end (needs matplotlib).
    """

    dir: str = "runs/meta/logs"
    tensorboard: bool = True
    plot: bool = True

    _checks = {"dir": (lambda v: v != "", "a non-empty path")}


@dataclass(frozen=True)
class MetaTrainConfig:
    """A meta-training run (see the module docstring and ``docs/meta-training.md``).

    Args:
        rule (MLPConfig): the learned rule being meta-trained.
        estimator (EstimatorConfig), tasks (TasksConfig), optimizer (OptimizerConfig),
        validation (ValidationConfig), checkpoint (CheckpointConfig), log (LogConfig).
        n_unrolls (int, default 8): unrolls per estimator call (one micro-batch).
        grad_accum (int, default 1): micro-batches per outer step; the task batch is
            ``n_unrolls * grad_accum`` unrolls. Split across ranks when distributed
            (then a multiple of the world size).
        outer_steps (int, default 1000): meta-optimizer steps of the run.
        precision (str, default "fp32"): "fp32", "bf16" (autocast of the task losses)
            or "fp16" (autocast with dynamic loss scaling).
        device (str, default "cpu"): "cpu" or "cuda" (``cuda:<LOCAL_RANK>`` per rank).
        seed (int, default 0): every random draw of the run derives from it.
        threads (int, default 0): ``torch.set_num_threads`` for the run (0: leave
            torch's default). The bundled tasks are tiny — a loss and gradient take
            0.05-2 ms — so intra-op threads mostly add synchronization: on 2 cores one
            thread ran the train split's tasks several times faster than two.
    """

    rule: MLPConfig = field(default_factory=MLPConfig)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    n_unrolls: int = 8
    grad_accum: int = 1
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    outer_steps: int = 1000
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    precision: str = "fp32"
    device: str = "cpu"
    seed: int = 0
    threads: int = 0

    _checks = {
        "n_unrolls": (lambda v: v >= 1, "an int >= 1"),
        "grad_accum": (lambda v: v >= 1, "an int >= 1"),
        "outer_steps": (lambda v: v >= 0, "an int >= 0"),
        "precision": (lambda v: v in PRECISIONS, f"one of {list(PRECISIONS)}"),
        "device": (lambda v: v in DEVICES, f"one of {list(DEVICES)}"),
        "seed": (lambda v: v >= 0, "an int >= 0"),
        "threads": (lambda v: v >= 0, "an int >= 0"),
    }

    def __post_init__(self):
        _validate(self, "")
        if self.estimator.horizon < self.estimator.truncation:
            raise ValueError(f"estimator.horizon: expected >= estimator.truncation "
                             f"({self.estimator.truncation}), got {self.estimator.horizon}")
        if self.precision == "fp16" and self.estimator.options.get("second_order"):
            raise ValueError(
                "precision: 'fp16' cannot be combined with estimator.options.second_order "
                "— the loss scaling would scale the second-order terms by 1/S instead of "
                "S (a silently wrong meta-gradient); use 'bf16' or 'fp32'")
        if self.precision == "fp16" and self.estimator.kind != "tbptt":
            raise ValueError(
                f"precision: 'fp16' needs estimator.kind 'tbptt', got "
                f"{self.estimator.kind!r} — ES/PES differentiate the task losses under "
                "torch.func transforms, where the loss scaler's overflow check cannot "
                "run; use 'bf16' (no loss scaling needed)")
        from pyoptk.tasks import family_names, split_families

        for name in ("train", "valid"):
            value = getattr(self.tasks, name)
            try:
                families = split_families(value) if isinstance(value, str) else value
            except ValueError as exc:
                raise ValueError(f"tasks.{name}: {exc}") from None
            unknown = [f for f in families if f not in family_names()]
            if unknown or not families:
                raise ValueError(f"tasks.{name}: expected registered task families "
                                 f"{family_names()}, got {list(families)}")

    # ---- conversions ----------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """Plain nested dict (lists, not tuples): JSON/YAML-able and checkpoint-safe."""
        return _to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MetaTrainConfig":
        """Build from a nested mapping; missing fields take their defaults."""
        return _from_dict(cls, d, "")

    @classmethod
    def from_yaml(cls, path: Union[str, "os.PathLike[str]"]) -> "MetaTrainConfig":
        """Read a ``.yaml``/``.yml`` file (needs pyyaml) or a ``.json`` file."""
        path = os.fspath(path)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            try:
                import yaml
            except ImportError:
                raise ImportError(f"{path}: YAML configs need pyyaml (pip install pyyaml, "
                                  "or pip install 'pyoptk[meta]'); a .json config works "
                                  "without it") from None
            data = yaml.safe_load(text)
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: expected a mapping of config fields at the top "
                             f"level, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def flat(self) -> Dict[str, Any]:
        """``{"estimator.truncation": 10, …}``: every leaf field by dotted path."""
        out: Dict[str, Any] = {}

        def walk(d, prefix):
            for k, v in d.items():
                if isinstance(v, dict) and k != "options":
                    walk(v, f"{prefix}{k}.")
                else:
                    out[f"{prefix}{k}"] = v

        walk(self.to_dict(), "")
        return out


def resumable(path: str) -> bool:
    """Whether the dotted field ``path`` may differ between a checkpoint and a resume."""
    return any(path == f or (f.endswith(".") and path.startswith(f))
               for f in RESUMABLE_FIELDS)


# ---- generic checking, by the dataclasses' type hints ----------------------------
def _describe(tp) -> str:
    if tp is int:
        return "an int"
    if tp is float:
        return "a number"
    if tp is bool:
        return "a bool (true/false)"
    if tp is str:
        return "a string"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0]).split(' ', 1)[1]}s"
        return f"a list of {len(args)} {_describe(args[0]).split(' ', 1)[1]}s"
    if origin in (dict, Dict, Mapping):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, path: str):
    """``value`` checked against the type ``tp`` (ints accepted as floats, lists as
    tuples); raises ``ValueError`` naming ``path``."""
    bad = ValueError(f"{path}: expected {_describe(tp)}, got {value!r}")
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        for a in args:
            try:
                return _coerce(value, a, path)
            except ValueError:
                pass
        raise bad
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise bad
        items = args[:1] * len(value) if args[-1] is Ellipsis else args
        if len(items) != len(value) or not value:
            raise bad
        return tuple(_coerce(v, a, path) for v, a in zip(value, items))
    if origin in (dict, Dict, Mapping):
        if not isinstance(value, Mapping):
            raise bad
        return dict(value)
    raise TypeError(f"{path}: unsupported config field type {tp!r}")


def _validate(obj, prefix: str) -> None:
    """Type- and range-check every field of the dataclass ``obj`` (recursively),
    coercing in place (frozen: via ``object.__setattr__``)."""
    hints = typing.get_type_hints(type(obj))
    checks: Mapping[str, _Check] = getattr(type(obj), "_checks", {})
    for f in fields(obj):
        path, value, tp = prefix + f.name, getattr(obj, f.name), hints[f.name]
        if tp is MLPConfig:
            if not isinstance(value, MLPConfig):
                raise ValueError(f"{path}: expected an MLPConfig or a mapping of its "
                                 f"fields, got {value!r}")
            continue
        if is_dataclass(tp):
            if not isinstance(value, tp):
                raise ValueError(f"{path}: expected a {tp.__name__} or a mapping of its "
                                 f"fields, got {value!r}")
            _validate(value, path + ".")
            continue
        value = _coerce(value, tp, path)
        if f.name in checks:
            ok, expected = checks[f.name]
            if not ok(value):
                raise ValueError(f"{path}: expected {expected}, got {value!r}")
        object.__setattr__(obj, f.name, value)


def _unknown(keys, known, prefix: str) -> None:
    unknown = sorted(str(k) for k in keys if k not in known)
    if unknown:
        raise ValueError(f"{prefix}{unknown[0]}: unknown field; expected one of "
                         f"{sorted(known)}")


def _rule_from_dict(d, path: str) -> MLPConfig:
    if isinstance(d, MLPConfig):
        return d
    if not isinstance(d, Mapping):
        raise ValueError(f"{path}: expected a mapping of MLPConfig fields, got {d!r}")
    _unknown(d, {f.name for f in fields(MLPConfig)}, path + ".")
    feats = d.get("features", {})
    if not isinstance(feats, (Mapping, FeatureConfig)):
        raise ValueError(f"{path}.features: expected a mapping of FeatureConfig fields, "
                         f"got {feats!r}")
    if isinstance(feats, Mapping):
        _unknown(feats, {f.name for f in fields(FeatureConfig)}, path + ".features.")
    try:
        return MLPConfig.from_dict(d)
    except (TypeError, ValueError) as exc:  # "MLPConfig.x: …" -> "rule.x: …"
        msg = str(exc)
        for cls_name, sub in (("MLPConfig.", "."), ("FeatureConfig.", ".features.")):
            if msg.startswith(cls_name):
                raise ValueError(path + sub + msg[len(cls_name):]) from None
        raise ValueError(f"{path}: {msg}") from None


def _from_dict(cls, d, prefix: str):
    if not isinstance(d, Mapping):
        where = prefix[:-1] if prefix else "config"
        raise ValueError(f"{where}: expected a mapping of {cls.__name__} fields, got {d!r}")
    hints = typing.get_type_hints(cls)
    _unknown(d, {f.name for f in fields(cls)}, prefix)
    kwargs = {}
    for name, value in d.items():
        tp = hints[name]
        if tp is MLPConfig:
            value = _rule_from_dict(value, prefix + name)
        elif is_dataclass(tp):
            value = _from_dict(tp, value, f"{prefix}{name}.")
        kwargs[name] = value
    # Nested configs are checked, with their dotted paths, by the top-level
    # MetaTrainConfig's __post_init__.
    return cls(**kwargs)


def _to_dict(obj) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, MLPConfig):
            v = v.to_dict()
        elif is_dataclass(v):
            v = _to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        elif isinstance(v, dict):
            v = json.loads(json.dumps(v))
        out[f.name] = v
    return out
