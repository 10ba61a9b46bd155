"""A compact episodic meta-training loop: meta-validation with early stopping,
checkpoint/resume, a tqdm bar and TensorBoard scalars.

The loop owns no model logic: ``train_step(i)`` runs meta-iteration ``i`` (its episodes
drawn deterministically from ``i``, e.g. ``DigitsEpisodes.batch(i, T)``) and returns
its loss; ``validate()`` returns the meta-validation loss. The checkpoint holds the
state objects, the loop's counters and the global RNG states (torch CPU and CUDA,
python ``random``: dropout or sampling inside ``train_step`` draws the same numbers
after a resume), so resuming continues exactly where the run stopped, bit for bit.
It is written atomically (:func:`pyoptk.meta.checkpoint.atomic_save`: a kill while
saving leaves the previous checkpoint) and read with ``torch.load(weights_only=True)``.
(Learned-optimizer meta-training has its own trainer, :class:`pyoptk.meta.MetaTrainer`,
whose checkpoints also pin the rule and config; this is the few-shot counterpart, kept
small: its state is whatever objects the caller passes.)
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from pyoptk.meta.checkpoint import (CheckpointError, atomic_save, load_file, rng_state,
                                    set_rng_state)

__all__ = ["fit_episodic", "EpisodicResult"]

FORMAT = "pyoptk-episodic-checkpoint"


@dataclass
class EpisodicResult:
    """What :func:`fit_episodic` did: the best validation loss and its iteration, how
    many iterations ran in total, whether it stopped early, and one history row
    ``{"iteration", "train_loss", "valid_loss"}`` per validation."""

    best_valid: float
    best_iteration: int
    iterations: int
    stopped_early: bool
    history: List[Dict[str, float]] = field(default_factory=list)


def fit_episodic(train_step: Callable[[int], float], validate: Callable[[], float],
                 state: Dict[str, Any], *, iterations: int, valid_every: int = 50,
                 patience: int = 5, checkpoint: Optional[str] = None,
                 log_dir: Optional[str] = None, progress: bool = True) -> EpisodicResult:
    """Run meta-iterations ``0 … iterations-1`` (or resume), validating every
    ``valid_every``; stop after ``patience`` validations without improvement and
    restore the best state.

    Args:
        train_step: ``i -> loss`` of meta-iteration ``i``.
        validate: ``() -> meta-validation loss`` (lower is better).
        state: objects with ``state_dict``/``load_state_dict`` (model, meta-learner,
            optimizer) — checkpointed, and restored to the best validation.
        iterations (int): total meta-iterations.
        valid_every (int): iterations between validations (and checkpoints).
        patience (int): validations without improvement before stopping (0: never stop).
        checkpoint (str, optional): file to save to after every validation; when it
            exists at the start, the run resumes from it (a
            :class:`~pyoptk.meta.checkpoint.CheckpointError`, a ``ValueError``, names the
            file when it is unreadable, not an episodic checkpoint, or lacks one of
            ``state``'s keys; nothing is overwritten then).
        log_dir (str, optional): TensorBoard folder (``train/loss``, ``valid/loss``).
        progress (bool): show a tqdm bar.
    """
    for name, v in (("iterations", iterations), ("valid_every", valid_every)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"fit_episodic: {name} must be a positive int, got {v!r}")
    if not isinstance(patience, int) or patience < 0:
        raise ValueError(f"fit_episodic: patience must be an int >= 0, got {patience!r}")
    start, best, best_it, bad, history = 0, math.inf, -1, 0, []
    best_state = None
    if checkpoint and os.path.exists(checkpoint):
        ck = _load(checkpoint, state)
        for k, obj in state.items():
            obj.load_state_dict(ck["state"][k])
        start, best, best_it, bad = ck["iteration"], ck["best"], ck["best_iteration"], ck["bad"]
        history, best_state = ck["history"], ck["best_state"]
        set_rng_state(ck["rng"])
    writer = None
    if log_dir:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=iterations, initial=start, desc="meta-train", leave=False)
    stopped = False
    try:
        for i in range(start, iterations):
            loss = float(train_step(i))
            if writer:
                writer.add_scalar("train/loss", loss, i)
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", best=f"{best:.4f}")
            if (i + 1) % valid_every and i + 1 != iterations:
                continue
            valid = float(validate())
            history.append({"iteration": i + 1, "train_loss": loss, "valid_loss": valid})
            if writer:
                writer.add_scalar("valid/loss", valid, i + 1)
            if valid < best:
                best, best_it, bad = valid, i + 1, 0
                best_state = {k: copy.deepcopy(obj.state_dict()) for k, obj in state.items()}
            else:
                bad += 1
            stopped = patience > 0 and bad >= patience
            if checkpoint:
                atomic_save(checkpoint, {
                    "format": FORMAT, "state": {k: obj.state_dict() for k, obj in state.items()},
                    "iteration": i + 1, "best": best, "best_iteration": best_it, "bad": bad,
                    "history": history, "best_state": best_state, "rng": rng_state()})
            if stopped:
                break
    finally:
        if bar:
            bar.close()
        if writer:
            writer.close()
    if best_state is not None:
        for k, obj in state.items():
            obj.load_state_dict(best_state[k])
    done = history[-1]["iteration"] if history else start
    return EpisodicResult(best, best_it, done, stopped, history)


_KEYS = ("state", "iteration", "best", "best_iteration", "bad", "history", "best_state", "rng")


def _load(path: str, state: Dict[str, Any]) -> Dict[str, Any]:
    """Read and check an episodic checkpoint; never writes."""
    ck = load_file(path, FORMAT, "an episodic checkpoint (fit_episodic)")
    lacking = [k for k in _KEYS if k not in ck]
    missing = sorted(set(state) - set(ck.get("state", {})))
    if lacking or missing:
        raise CheckpointError(f"fit_episodic: {path}: checkpoint lacks "
                              f"{lacking + [f'state[{k!r}]' for k in missing]}")
    return ck
