"""Meta-training checkpoints: atomic, rotated, validated on load.

A checkpoint directory holds ``last.pt`` (the newest) and ``prev.pt`` (the one before).
:func:`save_checkpoint` writes ``last.pt.tmp``, flushes and fsyncs it, moves the old
``last.pt`` to ``prev.pt`` and the new file to ``last.pt`` (``os.replace``, atomic on
POSIX), then fsyncs the directory. A crash at any moment leaves at least one complete
checkpoint: ``last.pt``, or ``prev.pt`` between the two renames (then
:func:`find_checkpoint` returns it).

Contents are plain tensors, dicts, lists, ints, floats and strings, so the file loads
with ``torch.load(weights_only=True)``::

    format, version     "pyoptk-meta-checkpoint", 1
    config              MetaTrainConfig.to_dict()
    rule                {"name", "version", "hash"} of the meta-parameters (integrity)
    meta_params         name -> tensor
    meta_optimizer      torch.optim.AdamW state_dict
    unrolls             [Unroll.state_dict(), …] in global slot order
    sampler             TaskSampler.state_dict() of the training tasks
    outer_step          completed outer steps
    trainer             the trainer's counters (validation best, early stopping, loss
                        scale, history of the loss curve, …)
    rng                 per rank: torch CPU, CUDA (if any), python ``random`` states

:func:`load_checkpoint` raises :class:`CheckpointError` (a ``ValueError``) naming the
file when it is unreadable (truncated, not a checkpoint) or its meta-parameters do not
match its recorded rule hash; :func:`check_resumable` names every config field that
differs from the run's (except :data:`pyoptk.meta.config.RESUMABLE_FIELDS`). Loading
never writes.
"""

from __future__ import annotations

import os
import random
from typing import Any, Dict, List, Mapping, Optional

import torch

from pyoptk.learned.mlp import MLPConfig, rule_identity
from pyoptk.meta.config import MetaTrainConfig, resumable

__all__ = ["FORMAT", "VERSION", "CheckpointError", "atomic_save", "load_file",
           "save_checkpoint", "find_checkpoint", "load_checkpoint", "check_resumable", "rng_state",
           "set_rng_state"]

FORMAT = "pyoptk-meta-checkpoint"
VERSION = 1
LAST, PREV = "last.pt", "prev.pt"
_KEYS = ("config", "rule", "meta_params", "meta_optimizer", "unrolls", "sampler",
         "outer_step", "trainer", "rng")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: unreadable, corrupted, or not this run's."""


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory handles
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(path: str, blob: Any, prev: Optional[str] = None) -> str:
    """``torch.save(blob)`` to ``path`` so that a crash at any moment leaves a complete
    file there: written to ``path.tmp``, flushed and fsynced, renamed over ``path``
    (``os.replace``; the old ``path`` first becomes ``prev`` when given), then the
    directory is fsynced. Returns ``path``."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(blob, f)
        f.flush()
        os.fsync(f.fileno())
    if prev is not None and os.path.exists(path):
        os.replace(path, prev)
    os.replace(tmp, path)
    _fsync_dir(directory)
    return path


def load_file(path: str, fmt: str, what: str, hint: str = "") -> Dict[str, Any]:
    """The dict saved at ``path`` (``torch.load(weights_only=True)``, on the CPU) whose
    ``"format"`` entry is ``fmt``; never writes. ``what`` names the expected file ("a
    pyoptk meta-training checkpoint") in the :class:`CheckpointError` raised when the
    file is unreadable (truncated, not a pickle; ``hint`` is appended) or of another
    format. A missing file raises ``FileNotFoundError``."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # truncated zip, bytes that are no pickle, …
        raise CheckpointError(f"{path}: unreadable or corrupted ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0]}); expected {what}{hint}") from None
    if not isinstance(blob, dict) or blob.get("format") != fmt:
        found = blob.get("format") if isinstance(blob, dict) else None
        raise CheckpointError(f"{path}: not {what} (format {found!r}, expected {fmt!r})")
    return blob


def save_checkpoint(directory: str, contents: Mapping[str, Any]) -> str:
    """Write ``contents`` (the keys listed in the module docstring) as
    ``directory/last.pt`` atomically, keeping the previous one as ``prev.pt``.
    Returns the path written."""
    missing = [k for k in _KEYS if k not in contents]
    if missing:
        raise ValueError(f"save_checkpoint: contents lack {missing}")
    blob = {"format": FORMAT, "version": VERSION, **contents}
    return atomic_save(os.path.join(directory, LAST), blob, prev=os.path.join(directory, PREV))


def find_checkpoint(directory: str) -> Optional[str]:
    """``last.pt`` if present, else ``prev.pt`` (a crash between the two renames of
    :func:`save_checkpoint`), else None."""
    for name in (LAST, PREV):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Read and check a checkpoint file (see the module docstring); never writes."""
    prev = os.path.join(os.path.dirname(path), PREV)
    hint = (f"; the previous checkpoint {prev} is untouched — move {path} away to resume "
            "from it" if os.path.basename(path) == LAST and os.path.isfile(prev) else "")
    blob = load_file(path, FORMAT, "a pyoptk meta-training checkpoint", hint)
    if blob.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {blob.get('version')!r}, "
                              f"this pyoptk reads version {VERSION}")
    missing = [k for k in _KEYS if k not in blob]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing} (corrupted or edited)")
    try:
        rule_cfg = MLPConfig.from_dict(blob["config"]["rule"])
        ident = rule_identity(blob["meta_params"], rule_cfg)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: its rule config or meta-parameters are invalid "
                              f"({exc})") from None
    saved = blob["rule"]
    for key in ("name", "version"):
        if saved.get(key) != ident[key]:
            raise CheckpointError(f"{path}: written for learned rule {saved.get('name')!r} "
                                  f"version {saved.get('version')!r}; this pyoptk runs "
                                  f"{ident['name']!r} version {ident['version']!r}")
    if saved.get("hash") != ident["hash"]:
        raise CheckpointError(f"{path}: meta-parameters do not match the rule hash recorded "
                              "in the checkpoint (corrupted or edited)")
    return blob


def check_resumable(path: str, blob: Mapping[str, Any], config: MetaTrainConfig) -> None:
    """Raise :class:`CheckpointError` listing every config field (dotted path) where
    the checkpoint ``blob`` read from ``path`` differs from ``config``, apart from the
    fields a resume may change (:data:`pyoptk.meta.config.RESUMABLE_FIELDS`)."""
    try:
        saved = MetaTrainConfig.from_dict(blob["config"]).flat()
    except ValueError as exc:
        raise CheckpointError(f"{path}: the checkpoint's config is not valid here ({exc})"
                              ) from None
    mine = config.flat()
    diffs = [f"{k} (checkpoint {saved.get(k)!r}, config {mine.get(k)!r})"
             for k in sorted(set(saved) | set(mine))
             if saved.get(k) != mine.get(k) and not resumable(k)]
    if diffs:
        raise CheckpointError(f"{path}: cannot resume a run with a different config; "
                              f"differing fields: {'; '.join(diffs)}")


def rng_state() -> Dict[str, Any]:
    """This process's global RNG states: torch CPU, every CUDA device (if
    initialized), python ``random`` (as lists, for ``weights_only`` loading)."""
    version, internal, gauss = random.getstate()
    state: Dict[str, Any] = {"torch": torch.get_rng_state(),
                             "python": [version, list(internal), gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda: Optional[List[torch.Tensor]] = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
