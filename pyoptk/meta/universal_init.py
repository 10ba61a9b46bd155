"""Universal initialization: meta-learn a model's initialization over a task family
with MAML, first-order MAML or Reptile, save it, and fine-tune from it on a new task.

    pyoptk meta-init train --family sinusoid --method maml --iterations 500 --out sine.pt
    pyoptk meta-init finetune sine.pt --task 12345 --steps 10

Families: ``sinusoid`` (10-shot regression, the 1→40→40→1 MLP of Finn et al.) and
``digits`` (5-way K-shot on classes 0–4, a small CNN; fine-tuning evaluates on the
held-out classes 5–9). Training uses :func:`pyoptk.meta.episodic.fit_episodic`:
meta-validation every ``valid_every`` iterations on fixed validation episodes,
early stopping, checkpoint/resume. The saved file holds the state dict and the
configuration, so :func:`load_init` rebuilds the model without other arguments.
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyoptk.meta.checkpoint import atomic_save, load_file
from pyoptk.meta.episodic import EpisodicResult, fit_episodic
from pyoptk.meta.maml import MAML
from pyoptk.meta.reptile import Reptile
from pyoptk.tasks.fewshot import DigitsEpisodes, Episode
from pyoptk.tasks.sinusoid import SinusoidEpisodes

__all__ = ["InitConfig", "build_model", "episodes", "meta_init", "save_init", "load_init",
           "fine_tune", "evaluate_fine_tune", "main"]

FAMILIES = ("sinusoid", "digits")
METHODS = ("maml", "fomaml", "reptile")
INIT_FORMAT = "pyoptk.meta_init/1"


@dataclass
class InitConfig:
    """Everything that defines a meta-initialization run (saved with the weights)."""

    family: str = "sinusoid"
    method: str = "maml"
    iterations: int = 500
    meta_batch: int = 8
    inner_steps: int = 5
    inner_lr: float = 0.01
    outer_lr: float = 1e-3       # Adam's lr (MAML/FOMAML) or Reptile's ε
    k_shot: int = 10             # sinusoid points / digits examples per class
    n_way: int = 5
    seed: int = 0

    def check(self) -> "InitConfig":
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        return self


def build_model(cfg: InitConfig) -> nn.Module:
    """The family's model, with parameters drawn from ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    if cfg.family == "sinusoid":
        return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                             nn.Linear(40, 1))
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32 * 16, cfg.n_way))


def _loss_fn(cfg: InitConfig):
    return F.mse_loss if cfg.family == "sinusoid" else F.cross_entropy


def episodes(cfg: InitConfig, split: str):
    """The episode source of ``split`` ("train", "valid", "test") for ``cfg``."""
    if cfg.family == "sinusoid":
        offset = {"train": 0, "valid": 10_000, "test": 20_000}[split]
        return SinusoidEpisodes(cfg.k_shot, cfg.k_shot, seed=cfg.seed + offset)
    return DigitsEpisodes(split, cfg.n_way, cfg.k_shot, 5, seed=cfg.seed)


def meta_init(cfg: InitConfig, *, valid_every: int = 50, patience: int = 5,
              checkpoint: Optional[str] = None, log_dir: Optional[str] = None,
              progress: bool = True) -> Tuple[nn.Module, EpisodicResult]:
    """Meta-learn the initialization of :func:`build_model` ``(cfg)``; returns the model
    at its best meta-validation loss and the run's record."""
    cfg.check()
    model, loss_fn = build_model(cfg), _loss_fn(cfg)
    train, valid = episodes(cfg, "train"), episodes(cfg, "valid").batch(0, 32)
    maml = MAML(model, loss_fn, inner_steps=cfg.inner_steps, inner_lr=cfg.inner_lr,
                first_order=cfg.method != "maml")
    state: Dict[str, object] = {"model": model}
    if cfg.method == "reptile":
        reptile = Reptile(model, loss_fn, inner_steps=cfg.inner_steps, inner_lr=cfg.inner_lr,
                          outer_lr=cfg.outer_lr)

        def step(i: int) -> float:
            return float(reptile.step(train.batch(i, cfg.meta_batch)))
    else:
        opt = torch.optim.Adam(maml.parameters(), lr=cfg.outer_lr)
        state["optimizer"] = opt

        def step(i: int) -> float:
            loss = maml.meta_loss(train.batch(i, cfg.meta_batch))
            opt.zero_grad()
            loss.backward()
            opt.step()
            return loss.item()

    def validate() -> float:
        with torch.no_grad():
            return maml.meta_loss(valid).item()

    result = fit_episodic(step, validate, state, iterations=cfg.iterations,
                          valid_every=valid_every, patience=patience, checkpoint=checkpoint,
                          log_dir=log_dir, progress=progress)
    return model, result


def save_init(path: str, model: nn.Module, cfg: InitConfig) -> None:
    """Save the initialization and its configuration (``torch.save``, atomically: see
    :func:`pyoptk.meta.checkpoint.atomic_save`)."""
    atomic_save(path, {"format": INIT_FORMAT, "config": asdict(cfg),
                       "state_dict": model.state_dict()})


def load_init(path: str) -> Tuple[nn.Module, InitConfig]:
    """``(model, config)`` from a file written by :func:`save_init`. An unreadable file or
    one of another kind raises :class:`~pyoptk.meta.checkpoint.CheckpointError` (a
    ``ValueError``) naming it; a missing one ``FileNotFoundError``."""
    data = load_file(path, INIT_FORMAT, "a pyoptk meta-initialization file (save_init)")
    cfg = InitConfig(**data["config"]).check()
    model = build_model(cfg)
    model.load_state_dict(data["state_dict"])
    return model, cfg


def fine_tune(model: nn.Module, loss_fn, support_x: Tensor, support_y: Tensor, *,
              steps: int, lr: float) -> nn.Module:
    """A copy of ``model`` after ``steps`` plain SGD steps on one task's support set
    (``support_x [n, ...]``, ``support_y [n, ...]``, no task dimension)."""
    tuned = copy.deepcopy(model)
    opt = torch.optim.SGD(tuned.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(tuned(support_x), support_y).backward()
        opt.step()
    return tuned


def evaluate_fine_tune(model: nn.Module, cfg: InitConfig, task: int, steps: int,
                       lr: float) -> Dict[str, float]:
    """Query loss (and accuracy for digits) on test episode ``task`` before and after
    fine-tuning from ``model``."""
    ep: Episode = episodes(cfg, "test").episode(task)
    loss_fn = _loss_fn(cfg)
    tuned = fine_tune(model, loss_fn, ep.support_x, ep.support_y, steps=steps, lr=lr)
    out: Dict[str, float] = {}
    with torch.no_grad():
        for name, m in (("before", model), ("after", tuned)):
            pred = m(ep.query_x)
            out[f"query_loss_{name}"] = loss_fn(pred, ep.query_y).item()
            if cfg.family == "digits":
                out[f"query_acc_{name}"] = (pred.argmax(-1) == ep.query_y).float().mean().item()
    return out


def main(argv: Optional[List[str]] = None) -> int:
    """``pyoptk meta-init train|finetune`` (module docstring)."""
    ap = argparse.ArgumentParser(prog="pyoptk meta-init", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="meta-learn an initialization and save it")
    d = InitConfig()
    tr.add_argument("--family", choices=FAMILIES, default=d.family)
    tr.add_argument("--method", choices=METHODS, default=d.method)
    for name in ("iterations", "meta_batch", "inner_steps", "k_shot", "n_way", "seed"):
        tr.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("inner_lr", "outer_lr"):
        tr.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    tr.add_argument("--valid-every", type=int, default=50)
    tr.add_argument("--patience", type=int, default=5)
    tr.add_argument("--checkpoint", default=None, help="resumable checkpoint file")
    tr.add_argument("--log-dir", default=None, help="TensorBoard folder")
    tr.add_argument("--out", required=True, help="file for the initialization")
    ft = sub.add_parser("finetune", help="fine-tune a saved initialization on a test task")
    ft.add_argument("init", help="file written by 'pyoptk meta-init train'")
    ft.add_argument("--task", type=int, default=0, help="test episode index")
    ft.add_argument("--steps", type=int, default=10)
    ft.add_argument("--lr", type=float, default=None, help="default: the inner lr")
    args = ap.parse_args(argv)
    if args.cmd == "train":
        cfg = InitConfig(**{k: getattr(args, k) for k in asdict(d)}).check()
        model, res = meta_init(cfg, valid_every=args.valid_every, patience=args.patience,
                               checkpoint=args.checkpoint, log_dir=args.log_dir)
        save_init(args.out, model, cfg)
        print(json.dumps({"out": args.out, "best_valid": res.best_valid,
                          "best_iteration": res.best_iteration, "iterations": res.iterations,
                          "stopped_early": res.stopped_early}))
        return 0
    model, cfg = load_init(args.init)
    print(json.dumps(evaluate_fine_tune(model, cfg, args.task, args.steps,
                                        args.lr if args.lr is not None else cfg.inner_lr)))
    return 0
