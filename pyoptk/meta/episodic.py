"""A compact episodic meta-training loop: meta-validation with early stopping,
checkpoint/resume, a tqdm bar and TensorBoard scalars.

The loop owns no model logic: ``train_step(i)`` runs meta-iteration ``i`` (its episodes
drawn deterministically from ``i``, e.g. ``DigitsEpisodes.batch(i, T)``) and returns
its loss; ``validate()`` returns the meta-validation loss. Because meta-iteration ``i``
is a pure function of ``i`` and the saved state, resuming from a checkpoint continues
exactly where the run stopped. (Learned-optimizer meta-training has its own trainer;
this is the few-shot counterpart, kept small.)
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

__all__ = ["fit_episodic", "EpisodicResult"]


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
            exists at the start, the run resumes from it.
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
        ck = torch.load(checkpoint, weights_only=False)
        missing = set(state) - set(ck["state"])
        if missing:
            raise ValueError(f"fit_episodic: checkpoint {checkpoint!r} has no state for "
                             f"{sorted(missing)}")
        for k, obj in state.items():
            obj.load_state_dict(ck["state"][k])
        start, best, best_it, bad = ck["iteration"], ck["best"], ck["best_iteration"], ck["bad"]
        history, best_state = ck["history"], ck["best_state"]
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
                torch.save({"state": {k: obj.state_dict() for k, obj in state.items()},
                            "iteration": i + 1, "best": best, "best_iteration": best_it,
                            "bad": bad, "history": history, "best_state": best_state},
                           checkpoint)
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
