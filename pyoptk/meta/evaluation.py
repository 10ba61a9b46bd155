"""Evaluate optimizers on tasks: the learned ones against AdamW at its default learning
rate and AdamW with the learning rate tuned per task on a grid.

Every optimizer trains a task from the same initial parameters on the same batches
(both are functions of the task seed), for the same number of steps:

* **final loss** — the mean training-batch loss over the last 10% of steps (what the
  learned optimizers are meta-trained to lower), ``inf`` when the run diverged;
* **test loss** — :meth:`Task.eval_loss` on the task's held-out ``test`` data split;
* **steps to baseline** — the first step at which the running mean (same window) of the
  training loss is at or below the final loss of AdamW at default lr;
* **wall time** of the training loop (no evaluation inside it).

``adamw-tuned`` is an oracle baseline: its learning rate is picked per task by the
final loss, on the very runs it is scored on. A learned optimizer gets no such help.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from pyoptk.tasks.base import Task

__all__ = ["OptimizerSpec", "RunResult", "EvalReport", "resolve_optimizer", "train_task",
           "evaluate", "DEFAULT_LR_GRID", "ADAMW_DEFAULT_LR"]

ADAMW_DEFAULT_LR = 1e-3
#: Learning rates tried by ``adamw-tuned`` (half-decades from 1e-4 to 1e-1).
DEFAULT_LR_GRID: Tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)

OptimizerFactory = Callable[[List[nn.Parameter]], torch.optim.Optimizer]


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer to evaluate: a display name and ``factory(params) -> Optimizer``."""

    name: str
    factory: OptimizerFactory


def _parse_kwargs(name: str, text: str) -> Dict[str, float]:
    out: Dict[str, float] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"optimizer {name!r}: expected key=value options, got {item!r}")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"optimizer {name!r}: option {key.strip()!r} must be a number, "
                             f"got {value!r}") from None
    return out


def resolve_optimizer(spec: str) -> OptimizerSpec:
    """An :class:`OptimizerSpec` from a command-line string.

    * ``adamw`` / ``adamw:lr=3e-3,weight_decay=0`` — :class:`pyoptk.optim.AdamW`
      (default lr 1e-3, weight decay 0 for a plain optimization comparison);
    * ``sgd:lr=0.1,momentum=0.9``, ``lamb:lr=1e-2``;
    * anything else: a learned optimizer — a shipped rule name
      (:func:`pyoptk.learned.pretrained.available`) or a rule file written by
      ``save_pretrained``, optionally ``name:lr_mult=0.5``.

    ``adamw-tuned`` is not an optimizer but a protocol; :func:`evaluate` handles it.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"optimizer: expected a non-empty string, got {spec!r}")
    import pyoptk

    base, _, opts = spec.partition(":")
    kw = _parse_kwargs(spec, opts)
    if base == "adamw":
        kw = {"lr": ADAMW_DEFAULT_LR, "weight_decay": 0.0, **kw}
        return OptimizerSpec(spec, lambda ps: pyoptk.optim.AdamW(ps, **kw))
    if base == "sgd":
        kw = {"lr": 0.1, **kw}
        return OptimizerSpec(spec, lambda ps: torch.optim.SGD(ps, **kw))
    if base == "lamb":
        kw = {"lr": 1e-2, "weight_decay": 0.0, **kw}
        return OptimizerSpec(spec, lambda ps: pyoptk.optim.LAMB(ps, **kw))
    from pyoptk.optim.mlp import MLPOptimizer

    meta, config = MLPOptimizer.load_pretrained(base)  # raises naming what is missing
    return OptimizerSpec(spec, lambda ps: MLPOptimizer(ps, meta_params=meta, config=config,
                                                        **kw))


@dataclass
class RunResult:
    """One optimizer on one task. ``losses[t]`` is the training-batch loss before step t."""

    task: str
    optimizer: str
    losses: List[float]
    final_loss: float
    test_loss: float
    wall_s: float
    lr: Optional[float] = None

    @property
    def diverged(self) -> bool:
        return not math.isfinite(self.final_loss)


def _window(steps: int) -> int:
    return max(1, steps // 10)


def train_task(task: Task, factory: OptimizerFactory, steps: int, *, name: str = "",
               device: Optional[torch.device] = None) -> RunResult:
    """Train ``task`` from its own initialization for ``steps`` steps with the optimizer
    ``factory`` builds (float32). A non-finite loss stops the run (diverged)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    params = OrderedDict((k, nn.Parameter(v)) for k, v in task.init_params(device=device).items())
    opt = factory(list(params.values()))
    batches = [task.batch(t, "train", device=device) for t in range(steps)]
    losses: List[float] = []
    t0 = time.perf_counter()
    for t in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = task.loss(params, batches[t])
        loss.backward()
        value = float(loss.detach())  # one sync per step; all optimizers pay it
        losses.append(value)
        if not math.isfinite(value):
            break
        opt.step()
    wall = time.perf_counter() - t0
    tail = losses[-_window(steps):]
    final = sum(tail) / len(tail) if len(losses) == steps and all(map(math.isfinite, tail)) \
        else math.inf
    with torch.no_grad():
        test = float(task.eval_loss(params, "test", device=device)) if math.isfinite(final) \
            else math.inf
    if not math.isfinite(test):
        final = math.inf
    return RunResult(task.name, name, losses, final, test, wall)


def steps_to_reach(losses: Sequence[float], target: float, window: int) -> Optional[int]:
    """First step whose trailing ``window``-mean training loss is ≤ ``target``."""
    acc = 0.0
    for t, v in enumerate(losses):
        acc += v
        if t >= window:
            acc -= losses[t - window]
        n = min(t + 1, window)
        if t + 1 >= window and acc / n <= target:
            return t + 1
    return None


@dataclass
class EvalReport:
    """Results of :func:`evaluate`: ``runs[task][optimizer]``, in input order."""

    steps: int
    optimizers: List[str]
    runs: "OrderedDict[str, OrderedDict[str, RunResult]]" = field(default_factory=OrderedDict)

    def win_rate(self, optimizer: str, baseline: str) -> Tuple[int, int, int]:
        """``(wins, ties, losses)`` of ``optimizer`` vs ``baseline`` by final loss (a tie:
        within 1% relative)."""
        w = t = lo = 0
        for per in self.runs.values():
            a, b = per[optimizer].final_loss, per[baseline].final_loss
            if a == b or (math.isfinite(a) and math.isfinite(b)
                          and abs(a - b) <= 0.01 * max(abs(a), abs(b))):
                t += 1
            elif a < b:
                w += 1
            else:
                lo += 1
        return w, t, lo

    def table(self) -> str:
        """A plain-text table: one row per (task, optimizer)."""
        rows = []
        for task, per in self.runs.items():
            base = per.get("adamw")
            for name, r in per.items():
                reach = "—"
                if base is not None and math.isfinite(base.final_loss):
                    s = steps_to_reach(r.losses, base.final_loss, _window(self.steps))
                    reach = str(s) if s is not None else "never"
                label = name if r.lr is None else f"{name} (lr={r.lr:g})"
                rows.append((task, label, f"{r.final_loss:.4g}", f"{r.test_loss:.4g}", reach,
                             f"{r.wall_s:.2f}"))
        wt = max([4] + [len(r[0]) for r in rows])
        wo = max([9] + [len(r[1]) for r in rows])
        head = f"{'task':<{wt}} {'optimizer':<{wo}} {'final loss':>11} {'test loss':>10} " \
               f"{'steps→base':>10} {'wall s':>7}"
        lines = [head, "-" * len(head)]
        lines += [f"{t:<{wt}} {o:<{wo}} {f:>11} {te:>10} {st:>10} {w:>7}"
                  for t, o, f, te, st, w in rows]
        others = [o for o in self.optimizers if o not in ("adamw", "adamw-tuned")]
        for o in others:
            for base in ("adamw", "adamw-tuned"):
                if base in self.optimizers:
                    w, t, lo = self.win_rate(o, base)
                    lines.append(f"{o} vs {base}: {w} wins, {t} ties, {lo} losses "
                                 f"of {w + t + lo} tasks")
        return "\n".join(lines)

    def plot(self, path: str) -> str:
        """Loss curves (one panel per task) and a win/loss chart, saved as one PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = len(self.runs)
        cols = min(4, n)
        rows = (n + cols - 1) // cols + 1
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
        for ax, (task, per) in zip(axes.flat, self.runs.items()):
            for name, r in per.items():
                label = name if r.lr is None else f"{name} ({r.lr:g})"
                ax.plot(r.losses, label=label, lw=1)
            ax.set_title(task, fontsize=8)
            ax.set_yscale("log")
            ax.set_xlabel("step")
        axes.flat[0].legend(fontsize=6)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        ax = axes[-1][0]
        others = [o for o in self.optimizers if o not in ("adamw", "adamw-tuned")]
        bases = [b for b in ("adamw", "adamw-tuned") if b in self.optimizers]
        labels, wins, ties, losses = [], [], [], []
        for o in others:
            for b in bases:
                w, t, lo = self.win_rate(o, b)
                labels.append(f"{o}\nvs {b}")
                wins.append(w)
                ties.append(t)
                losses.append(lo)
        if labels:
            ax.axis("on")
            x = range(len(labels))
            ax.bar(x, wins, color="tab:green", label="wins")
            ax.bar(x, ties, bottom=wins, color="tab:gray", label="ties")
            ax.bar(x, losses, bottom=[w + t for w, t in zip(wins, ties)], color="tab:red",
                   label="losses")
            ax.set_xticks(list(x), labels, fontsize=6)
            ax.set_ylabel("tasks")
            ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def evaluate(optimizers: Sequence[str], tasks: Sequence[Task], steps: int, *,
             lr_grid: Sequence[float] = DEFAULT_LR_GRID, device: Optional[torch.device] = None,
             progress: bool = False) -> EvalReport:
    """Run every optimizer (strings for :func:`resolve_optimizer`, plus ``adamw-tuned``)
    on every task for ``steps`` steps."""
    optimizers = list(optimizers)
    if not optimizers:
        raise ValueError("optimizers must not be empty")
    if not tasks:
        raise ValueError("tasks must not be empty")
    if len(set(optimizers)) != len(optimizers):
        raise ValueError(f"optimizers has duplicates: {optimizers}")
    if any(not lr > 0 for lr in lr_grid) or not lr_grid:
        raise ValueError(f"lr_grid must be non-empty positive floats, got {list(lr_grid)}")
    specs = {o: resolve_optimizer(o) for o in optimizers if o != "adamw-tuned"}
    report = EvalReport(steps, optimizers)
    work = [(t, o) for t in tasks for o in optimizers]
    if progress:
        from tqdm.auto import tqdm

        work = tqdm(work, desc="eval", unit="run")
    for task, o in work:
        per = report.runs.setdefault(task.name, OrderedDict())
        if o == "adamw-tuned":
            per[o] = _tuned_adamw(task, steps, lr_grid, device)
        else:
            per[o] = train_task(task, specs[o].factory, steps, name=o, device=device)
    return report


def _tuned_adamw(task: Task, steps: int, lr_grid: Sequence[float],
                 device: Optional[torch.device]) -> RunResult:
    import pyoptk

    runs = []
    for lr in lr_grid:  # non-empty: evaluate() checks
        r = train_task(task, lambda ps, lr=lr: pyoptk.optim.AdamW(ps, lr=lr, weight_decay=0.0),
                       steps, name="adamw-tuned", device=device)
        r.lr = lr
        runs.append(r)
    return min(runs, key=lambda r: r.final_loss)  # the first of equals: the smallest lr


# ----------------------------------------------------------------------------------
# Command line: ``pyoptk eval`` and ``pyoptk compare``.
# ----------------------------------------------------------------------------------
def _tasks_from_arg(arg: str, n: int, seed: int) -> List[Task]:
    """``arg`` is a split name (train/valid/test), a comma list of families, or
    ``family:seed`` for one exact task."""
    from pyoptk.tasks import SPLITS, TaskSampler, TaskSpec, build_task

    if ":" in arg:
        fam, _, s = arg.partition(":")
        try:
            return [build_task(TaskSpec(fam, int(s)))]
        except ValueError as e:
            raise ValueError(f"--tasks {arg!r}: {e}") from None
    source = arg if arg in SPLITS else [f for f in arg.split(",") if f]
    return TaskSampler(source, seed=seed).next_batch(n)


def _eval_parser(prog: str, compare: bool):
    import argparse

    p = argparse.ArgumentParser(prog=prog, description=(
        "Train one task with several optimizers and plot their loss curves." if compare else
        "Run optimizers over a task split against AdamW (default lr, and lr tuned per task)."))
    p.add_argument("--optimizer", "-o", action="append", dest="optimizers", metavar="NAME",
                   help="adamw[:lr=..], sgd[:lr=..], lamb[:lr=..], adamw-tuned, or a learned "
                        "rule (shipped name or file); repeat for several")
    p.add_argument("--tasks", default="quadratic:0" if compare else "test",
                   help="a split (train/valid/test), families 'a,b', or one task 'family:seed'")
    p.add_argument("--n-tasks", type=int, default=1 if compare else 8)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0, help="task sampling seed")
    p.add_argument("--out", default="pyoptk-compare" if compare else "pyoptk-eval",
                   help="directory for the plot and table")
    return p


def main(argv: Optional[List[str]] = None, *, compare: bool = False) -> int:
    """``pyoptk eval`` (``compare=False``) / ``pyoptk compare``."""
    import os

    prog = "pyoptk compare" if compare else "pyoptk eval"
    args = _eval_parser(prog, compare).parse_args(argv)
    from pyoptk.learned.pretrained import available

    default = ["adamw", "adamw-tuned"] + available()[:1]
    optimizers = args.optimizers or default
    if args.n_tasks < 1:
        raise SystemExit(f"{prog}: --n-tasks must be >= 1, got {args.n_tasks}")
    try:
        tasks = _tasks_from_arg(args.tasks, args.n_tasks, args.seed)
        report = evaluate(optimizers, tasks, args.steps, progress=True)
    except ValueError as e:
        raise SystemExit(f"{prog}: {e}") from None
    os.makedirs(args.out, exist_ok=True)
    table = report.table()
    print(table)
    with open(os.path.join(args.out, "results.txt"), "w") as f:
        f.write(table + "\n")
    print(f"plot: {report.plot(os.path.join(args.out, 'loss_curves.png'))}")
    return 0
