"""The meta-training loop: :class:`MetaTrainer`.

One **outer step** advances a population of ``n_unrolls * grad_accum`` unrolls (the
task batch) by one truncation, in ``grad_accum`` micro-batches of ``n_unrolls``: one
:meth:`GradientEstimator.estimate` call per micro-batch. The micro-batch estimates are
averaged (over the finite ones: equal-size micro-batches, so weighted by their
unrolls) and the meta-optimizer (``torch.optim.AdamW``) steps the rule's
meta-parameters; a step whose every estimate is non-finite is skipped. Unrolls that
reached the horizon restart on the next task of the training sampler.

**Determinism.** Every draw derives from ``config.seed`` through
:func:`pyoptk.tasks.derive_seed`: the rule's init, the task sequence, each unroll's
init (by task index), each estimate (by outer step and micro-batch index). The layout
of the population (slot ``i`` of micro-batch ``j``) does not depend on the number of
processes. So a resumed run, and a run over any number of ranks, computes the
meta-parameters of the uninterrupted single-process run bit for bit.

**Distributed** (``torch.distributed`` initialized, e.g. by ``torchrun``): rank ``r``
of ``W`` runs micro-batches ``[r·A/W, (r+1)·A/W)`` (``A = grad_accum``, a multiple of
``W``). The meta-gradient is reduced by an all-gather of the per-micro-batch
estimates, summed by every rank in micro-batch order — an all-reduce whose result
does not depend on ``W`` or on the backend's reduction order, at the cost of ``W``
times the (small) meta-gradient per step. Every rank then takes the same AdamW step.
Rank 0 writes checkpoints, rule files and logs.

**Mixed precision.** ``"bf16"``: the task losses run under ``torch.autocast`` (the
tasks are wrapped, so any estimator gets it); the rule, the states and the
meta-gradient stay float32. ``"fp16"``: the same with float16 plus dynamic loss
scaling of the autocast region — the cotangent entering each task loss is multiplied
by ``S`` and the gradient leaving it divided by ``S`` (exact: ``S`` is a power of 2),
so the float16 backward neither underflows nor changes the float32 result. A
non-finite gradient inside the region (overflow) or a non-finite estimate halves
``S`` and drops that micro-batch; ``S`` doubles after :data:`GROWTH_INTERVAL`
finite steps (as ``torch.amp.GradScaler``).

**Validation** every ``validation.every`` steps: the current rule trains each of
``validation.n_tasks`` fixed tasks of the validation families for
``validation.horizon`` steps (:func:`pyoptk.learned.update` under ``no_grad``); the
score is the mean final :meth:`Task.eval_loss` (a non-finite loss counts as +inf).
An improvement of more than ``min_delta`` writes ``best_rule`` (a
``MLPOptimizer.from_pretrained`` file); ``patience`` validations without one stop
the run.
"""

from __future__ import annotations

import math
import os
import random
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import Tensor

from pyoptk.learned.files import have_safetensors
from pyoptk.learned.mlp import MLPRule, MLPState, init_state, update
from pyoptk.meta.checkpoint import (
    check_resumable, find_checkpoint, load_checkpoint, rng_state, save_checkpoint,
    set_rng_state)
from pyoptk.meta.config import MetaTrainConfig
from pyoptk.meta.estimator import LOG_LOSS_FLOOR, GradientEstimator, MetaLoss, Unroll
from pyoptk.tasks import TaskSampler, build_task, derive_seed
from pyoptk.tasks.base import Task

__all__ = ["MetaTrainer", "MetaTrainResult", "build_estimator", "validation_loss",
           "INIT_LOSS_SCALE", "GROWTH_INTERVAL"]

#: fp16 dynamic loss scaling: initial scale, and finite steps before it doubles.
INIT_LOSS_SCALE = 2.0 ** 16
GROWTH_INTERVAL = 100


def build_estimator(config: MetaTrainConfig) -> GradientEstimator:
    """The estimator ``config.estimator`` names (tbptt: :class:`TruncatedBPTT`, es:
    :class:`TruncatedES`, pes: :class:`PersistentES`), with its truncation, horizon and
    options (``meta_loss`` given as a mapping of :class:`MetaLoss` fields);
    ``ValueError`` naming ``estimator.options`` when the estimator rejects them."""
    ec = config.estimator
    if ec.kind == "tbptt":
        from pyoptk.meta.tbptt import TruncatedBPTT as cls
    elif ec.kind == "es":
        from pyoptk.meta.es import TruncatedES as cls
    else:
        from pyoptk.meta.es import PersistentES as cls
    options = dict(ec.options)
    try:
        if "meta_loss" in options:  # a mapping of MetaLoss fields
            options["meta_loss"] = MetaLoss(**options["meta_loss"])
        return cls(config.rule, ec.truncation, ec.horizon, **options)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"estimator.options: {cls.__name__} rejected {ec.options}: {exc}"
                         ) from None


# ---- mixed precision -------------------------------------------------------------
class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the cotangent by ``factor`` (differentiably,
    so double backward works) and, if given, ors "not all finite" into ``found_inf``."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float, found_inf: Optional[Tensor]) -> Tensor:
        ctx.factor, ctx.found_inf = factor, found_inf
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        if ctx.found_inf is not None:
            ctx.found_inf.logical_or_(~torch.isfinite(grad).all())
        return grad * ctx.factor, None, None


class _AmpTask(Task):
    """``task`` with its losses (:meth:`loss`, :meth:`eval_loss`) under
    ``torch.autocast(dtype)``, returned in float32; with a loss scaler (fp16), the
    region's backward runs on cotangents scaled by ``S``. Everything else is the
    wrapped task's (attributes are looked up on it)."""

    def __init__(self, task: Task, dtype: torch.dtype, scaler: Optional["_LossScaler"]):
        self.task, self.dtype, self.scaler = task, dtype, scaler
        self.family, self.seed, self.hparams = task.family, task.seed, task.hparams
        self.eval_batches = task.eval_batches

    def __getattr__(self, name: str) -> Any:  # only called for names not found here
        task = self.__dict__.get("task")
        if task is None:  # e.g. during copy/unpickling, before __init__'s attributes
            raise AttributeError(name)
        return getattr(task, name)

    def init_params(self, seed=None, *, dtype=torch.float32, device=None):
        return self.task.init_params(seed, dtype=dtype, device=device)

    def batch(self, step, split="train", *, device=None):
        return self.task.batch(step, split, device=device)

    def loss(self, params: Mapping[str, Tensor], batch: Any) -> Tensor:
        return self._region(lambda ps: self.task.loss(ps, batch), params)

    def eval_loss(self, params: Mapping[str, Tensor], split: str = "valid", *,
                  device: Optional[torch.device] = None) -> Tensor:
        return self._region(lambda ps: self.task.eval_loss(ps, split, device=device), params)

    def _region(self, fn, params: Mapping[str, Tensor]) -> Tensor:
        s = self.scaler
        if s is not None:
            params = OrderedDict((k, _ScaleGrad.apply(v, 1.0 / s.scale, s.found_inf))
                                 for k, v in params.items())
        device = next(iter(params.values())).device.type
        with torch.autocast(device, dtype=self.dtype):
            out = fn(params)
        out = out.float()
        return out if s is None else _ScaleGrad.apply(out, s.scale, None)


class _LossScaler:
    """fp16 dynamic loss scale (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.scale = INIT_LOSS_SCALE
        self.growth = 0
        self.found_inf = torch.zeros((), dtype=torch.bool, device=device)

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale, self.growth = self.scale / 2.0, 0
            return
        self.growth += 1
        if self.growth == GROWTH_INTERVAL:
            self.scale, self.growth = self.scale * 2.0, 0

    def state_dict(self) -> Dict[str, Any]:
        return {"scale": self.scale, "growth": self.growth}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.scale, self.growth = float(state["scale"]), int(state["growth"])


# ---- validation -------------------------------------------------------------------

def validation_loss(task: Task, meta_params: Mapping[str, Tensor], config, horizon: int,
                    device: torch.device, split: str = "valid", log_loss: bool = False
                    ) -> float:
    """The rule trains ``task`` from its own init for ``horizon`` steps; returns the
    final :meth:`Task.eval_loss` on data split ``split`` (its log if ``log_loss``;
    +inf if not finite)."""
    params = task.init_params(device=device)
    names = list(params)
    plist = list(params.values())
    state = init_state(plist, config)
    for t in range(horizon):
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_() for p in plist]
            loss = task.loss(OrderedDict(zip(names, leaves)), task.batch(t, "train",
                                                                         device=device))
            grads = torch.autograd.grad(loss, leaves)
        with torch.no_grad():
            plist, state = update(plist, grads, state, meta_params, config)
    with torch.no_grad():
        final = float(task.eval_loss(OrderedDict(zip(names, plist)), split, device=device))
    if not math.isfinite(final):
        return math.inf
    # Below LOG_LOSS_FLOOR a task counts as solved: without a floor, one task fitted to
    # loss 0 (log 1e-30 = -69) would outweigh all the others in the mean.
    return math.log(max(final, LOG_LOSS_FLOOR)) if log_loss else final


# ---- the trainer ------------------------------------------------------------------
@dataclass
class MetaTrainResult:
    """What :meth:`MetaTrainer.fit` returns."""

    outer_step: int
    meta_loss: float
    best_valid: float
    best_step: int
    stopped_early: bool
    skipped_steps: int
    checkpoint: Optional[str]


class MetaTrainer:
    """Meta-trains the MLP rule of ``config`` (see the module docstring).

    Args:
        config (MetaTrainConfig): the run.
        resume (bool, default False): continue from ``checkpoint.dir``'s checkpoint
            when there is one (its config must equal ``config`` except
            :data:`pyoptk.meta.config.RESUMABLE_FIELDS`); a fresh run otherwise. A
            fresh run (``resume=False``) refuses a ``checkpoint.dir`` that already holds
            a checkpoint, which its first save would rotate away. A fresh run seeds the
            global ``random`` and ``torch`` RNGs with ``config.seed``; a resumed one
            restores them.
        estimator (GradientEstimator, optional): use this estimator instead of the one
            ``config.estimator`` builds; its truncation and horizon must be the
            config's.
        progress (bool, optional): show a tqdm bar; default: on rank 0 when stderr is a
            terminal.

    Attributes: ``rule`` (the :class:`MLPRule`), ``meta_optimizer``, ``outer_step``,
    ``history`` (``{"step", "meta_loss", "valid_step", "valid_loss"}`` lists).
    """

    def __init__(self, config: MetaTrainConfig, *, resume: bool = False,
                 estimator: Optional[GradientEstimator] = None,
                 progress: Optional[bool] = None):
        if not isinstance(config, MetaTrainConfig):
            raise TypeError(f"MetaTrainer: config must be a MetaTrainConfig, got "
                            f"{type(config).__name__}")
        self.config = cfg = config
        dist = torch.distributed
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        if cfg.grad_accum % self.world:
            raise ValueError(f"grad_accum: expected a multiple of the world size "
                             f"{self.world} (each rank runs whole micro-batches), got "
                             f"{cfg.grad_accum}")
        per_rank = cfg.grad_accum // self.world
        self._local = range(self.rank * per_rank, (self.rank + 1) * per_rank)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = self._pick_device()
        self.progress = (self.rank == 0 and sys.stderr.isatty()) if progress is None \
            else (progress and self.rank == 0)
        if self.progress:
            _need("tqdm", "progress")
        if self.rank == 0 and cfg.log.tensorboard:
            _need("tensorboard", "log.tensorboard")
        if self.rank == 0 and cfg.log.plot:
            _need("matplotlib", "log.plot")

        self.rule = MLPRule(cfg.rule, seed=derive_seed(cfg.seed, "rule")).to(self.device)
        oc = cfg.optimizer
        self.meta_optimizer = torch.optim.AdamW(
            self.rule.parameters(), lr=oc.lr, betas=oc.betas, eps=oc.eps,
            weight_decay=oc.weight_decay)
        self.estimator = estimator if estimator is not None else build_estimator(cfg)
        ec = cfg.estimator
        if (self.estimator.truncation, self.estimator.horizon) != (ec.truncation, ec.horizon):
            raise ValueError(f"estimator: truncation/horizon "
                             f"{self.estimator.truncation}/{self.estimator.horizon} differ "
                             f"from the config's estimator.truncation/horizon "
                             f"{ec.truncation}/{ec.horizon}")
        self.sampler = TaskSampler(cfg.tasks.train, seed=derive_seed(cfg.seed, "train"))
        self.valid_tasks: List[Task] = (
            TaskSampler(cfg.tasks.valid, seed=derive_seed(cfg.seed, "valid")).next_batch(
                cfg.validation.n_tasks) if cfg.validation.every else [])
        self.scaler = _LossScaler(self.device) if cfg.precision == "fp16" else None
        self._amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)

        self.outer_step = 0
        self.best_valid, self.best_step, self.bad_validations = math.inf, -1, 0
        self.stopped_early, self.skipped_steps = False, 0
        self.history: Dict[str, List[float]] = {
            "step": [], "meta_loss": [], "valid_step": [], "valid_loss": []}
        self.unrolls: Dict[int, List[Unroll]] = {}
        self.resumed_from: Optional[str] = None
        self._saved_step = -1
        path = find_checkpoint(cfg.checkpoint.dir)
        if path is not None and not resume:
            # A fresh run would rotate that run's checkpoints away at its first save.
            raise ValueError(f"checkpoint.dir: {cfg.checkpoint.dir} already holds a "
                             f"checkpoint ({path}); resume it (resume=True, --resume) or "
                             "choose another checkpoint.dir")
        if path is not None:
            self._restore(path)
        else:
            random.seed(cfg.seed)
            torch.manual_seed(cfg.seed)
            self._replace([[True] * cfg.n_unrolls for _ in range(cfg.grad_accum)],
                          stagger=cfg.estimator.stagger)

    # ---- setup helpers ------------------------------------------------------------
    def _pick_device(self) -> torch.device:
        if self.config.device == "cpu":
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise ValueError("device: 'cuda' requested but torch.cuda.is_available() is False")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device

    def _wrap(self, task: Task) -> Task:
        return task if self._amp is None else _AmpTask(task, self._amp, self.scaler)

    def _replace(self, needs: List[List[bool]], stagger: bool = False) -> None:
        """Start a new unroll, on the sampler's next task, in every slot (micro-batch
        ``j``, position ``i``) with ``needs[j][i]``, in slot order; every rank draws
        the same task indices and builds only its own slots. ``stagger`` (the first
        fill, ``estimator.stagger``): slot ``k`` of ``n`` starts at step
        ``k·horizon//n`` rounded down to a multiple of the truncation."""
        meta = self.rule.meta_params()
        ec = self.config.estimator
        n_slots = sum(len(row) for row in needs)
        for j, row in enumerate(needs):
            for i, need in enumerate(row):
                if not need:
                    continue
                # Every rank advances the sampler for every slot, its own or not, so
                # all agree on each slot's task index.
                index = self.sampler.count
                self.sampler.count += 1
                if j not in self._local:
                    continue
                task = self._wrap(build_task(self.sampler.spec(index)))
                unroll = self.estimator.init_unroll(
                    task, meta, seed=derive_seed(self.config.seed, "unroll", index))
                if stagger:
                    k = j * len(row) + i
                    unroll.step = (k * ec.horizon // n_slots) // ec.truncation * ec.truncation
                self.unrolls.setdefault(j, [None] * len(row))[i] = unroll

    # ---- collectives (identity when not distributed) -------------------------------
    def _all_gather(self, t: Tensor) -> Tensor:
        """Concatenate every rank's ``t`` (rank order) along dim 0."""
        if not self.distributed:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        torch.distributed.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def _all_gather_objects(self, obj: Any) -> List[Any]:
        if not self.distributed:
            return [obj]
        out: List[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    # ---- one outer step ------------------------------------------------------------
    def _outer_step(self) -> Dict[str, float]:
        cfg = self.config
        meta = self.rule.meta_params()
        names = list(meta)
        grads, stats, steps = [], [], []
        est_metrics: Dict[str, List[float]] = {}
        for j in self._local:
            if self.scaler is not None:
                self.scaler.found_inf.zero_()
            est, new = self.estimator.estimate(
                meta, self.unrolls[j], seed=derive_seed(cfg.seed, "estimate",
                                                        self.outer_step, j))
            flat = torch.cat([est.grads[k].detach().reshape(-1).to(meta[k].dtype)
                              for k in names])
            ok = (est.finite and math.isfinite(est.meta_loss)
                  and bool(torch.isfinite(flat).all())
                  and not (self.scaler is not None and bool(self.scaler.found_inf)))
            grads.append(flat if ok else torch.zeros_like(flat))
            stats.append([float(ok), est.meta_loss if ok else 0.0])
            steps.append([u.step for u in new])
            self.unrolls[j] = [self._rewrap(u) for u in new]
            if ok:
                for k, v in est.metrics.items():
                    est_metrics.setdefault(k, []).append(float(v))
        g_all = self._all_gather(torch.stack(grads))
        s_all = self._all_gather(torch.tensor(stats, dtype=torch.float64, device=self.device))
        steps_all = self._all_gather(torch.tensor(steps, dtype=torch.int64, device=self.device))
        finite = s_all[:, 0].tolist()
        n_ok = int(sum(finite))
        # Sum in micro-batch order: the same bits whatever the number of ranks.
        total = torch.zeros_like(g_all[0])
        loss_sum = 0.0
        for j, ok in enumerate(finite):
            if ok:
                total = total + g_all[j]
                loss_sum += float(s_all[j, 1])
        out = {"finite_fraction": n_ok / cfg.grad_accum}
        if n_ok:
            mean = total / n_ok
            offset = 0
            for p in self.rule.parameters():
                p.grad = mean[offset:offset + p.numel()].view_as(p).clone()
                offset += p.numel()
            self.meta_optimizer.step()
            self.meta_optimizer.zero_grad(set_to_none=True)
            out["meta_loss"] = loss_sum / n_ok
            out["grad_norm"] = float(mean.double().norm())  # float64: tiny gradients
        else:
            self.skipped_steps += 1
            out["meta_loss"] = math.nan
        if self.scaler is not None:
            self.scaler.update(n_ok < cfg.grad_accum)
            out["loss_scale"] = self.scaler.scale
        for k, v in est_metrics.items():
            out[f"estimator/{k}"] = sum(v) / len(v)
        horizon = cfg.estimator.horizon
        self._replace([[s >= horizon for s in row] for row in steps_all.tolist()])
        return out

    def _rewrap(self, u: Unroll) -> Unroll:
        if self._amp is not None and not isinstance(u.task, _AmpTask):
            u.task = self._wrap(u.task)
        return u

    # ---- validation ----------------------------------------------------------------
    def validate(self) -> float:
        """Mean validation loss of the current rule (see the module docstring); the
        tasks are split across ranks and the losses gathered, averaged in task order."""
        meta = OrderedDict((k, v.detach()) for k, v in self.rule.meta_params().items())
        vc = self.config.validation
        mine = {i: validation_loss(t, meta, self.config.rule, vc.horizon, self.device,
                                   vc.split, vc.log_loss)
                for i, t in enumerate(self.valid_tasks) if i % self.world == self.rank}
        losses: Dict[int, float] = {}
        for part in self._all_gather_objects(mine):
            losses.update(part)
        return sum(losses[i] for i in range(len(self.valid_tasks))) / len(self.valid_tasks)

    def _after_validation(self, value: float) -> None:
        vc = self.config.validation
        self.history["valid_step"].append(self.outer_step)
        self.history["valid_loss"].append(value)
        if value < self.best_valid - vc.min_delta:
            self.best_valid, self.best_step, self.bad_validations = value, self.outer_step, 0
            if self.rank == 0:
                self.save_rule("best_rule")
        else:
            self.bad_validations += 1
            if vc.patience and self.bad_validations >= vc.patience:
                self.stopped_early = True

    def save_rule(self, name: str) -> str:
        """Write the current meta-parameters as ``checkpoint.dir/<name>.safetensors``
        (``.pt`` without safetensors), a file ``MLPOptimizer.from_pretrained`` loads;
        written to a temporary name first, then renamed."""
        from pyoptk.optim.mlp import MLPOptimizer

        ext = ".safetensors" if have_safetensors() else ".pt"
        directory = self.config.checkpoint.dir
        final, tmp = os.path.join(directory, name + ext), os.path.join(directory,
                                                                      f".{name}.tmp{ext}")
        holder = MLPOptimizer([torch.zeros(1)], meta_params=self.rule.meta_params(),
                              config=self.config.rule)
        holder.save_pretrained(tmp)
        os.replace(tmp, final)
        return final

    # ---- checkpoints ---------------------------------------------------------------
    def save(self) -> Optional[str]:
        """Write ``checkpoint.dir/last.pt`` (rank 0; every rank takes part in gathering
        the unrolls); returns its path on rank 0."""
        local = {"unrolls": [[u.state_dict() for u in self.unrolls[j]] for j in self._local],
                 "rng": rng_state()}
        parts: List[Any] = [_to_cpu(local)]
        if self.distributed:
            parts = [None] * self.world if self.rank == 0 else None
            torch.distributed.gather_object(_to_cpu(local), parts, dst=0)
        self._saved_step = self.outer_step
        if self.rank != 0:
            return None
        unrolls = [row for part in parts for row in part["unrolls"]]
        return save_checkpoint(self.config.checkpoint.dir, {
            "config": self.config.to_dict(),
            "rule": self.rule.identity(),
            "meta_params": OrderedDict((k, v.detach().cpu().clone())
                                       for k, v in self.rule.meta_params().items()),
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "unrolls": unrolls,
            "sampler": self.sampler.state_dict(),
            "outer_step": self.outer_step,
            "trainer": {
                "best_valid": self.best_valid, "best_step": self.best_step,
                "bad_validations": self.bad_validations, "stopped_early": self.stopped_early,
                "skipped_steps": self.skipped_steps, "history": self.history,
                "loss_scale": None if self.scaler is None else self.scaler.state_dict()},
            "rng": [p["rng"] for p in parts],
        })

    def _restore(self, path: str) -> None:
        blob = load_checkpoint(path)
        check_resumable(path, blob, self.config)
        with torch.no_grad():
            for k, p in self.rule.named_parameters():
                p.copy_(blob["meta_params"][k])
        self.meta_optimizer.load_state_dict(blob["meta_optimizer"])
        self.sampler.load_state_dict(blob["sampler"])
        self.outer_step = self._saved_step = int(blob["outer_step"])
        t = blob["trainer"]
        self.best_valid, self.best_step = float(t["best_valid"]), int(t["best_step"])
        self.bad_validations, self.skipped_steps = int(t["bad_validations"]), int(
            t["skipped_steps"])
        self.stopped_early = bool(t["stopped_early"])
        self.history = {k: list(v) for k, v in t["history"].items()}
        if self.scaler is not None:
            self.scaler.load_state_dict(t["loss_scale"])
        rows = blob["unrolls"]
        if len(rows) != self.config.grad_accum or any(
                len(r) != self.config.n_unrolls for r in rows):
            raise ValueError(f"{path}: holds {len(rows)} micro-batches of unrolls, the "
                             f"config {self.config.grad_accum} of {self.config.n_unrolls}")
        for j in self._local:
            self.unrolls[j] = [self._rewrap(_to_device(Unroll.from_state_dict(d),
                                                       self.device)) for d in rows[j]]
        rngs = blob["rng"]
        set_rng_state(rngs[self.rank] if self.rank < len(rngs) else rngs[0])
        self.resumed_from = path

    # ---- the loop ------------------------------------------------------------------
    def fit(self) -> MetaTrainResult:
        """Run outer steps until ``outer_steps`` or early stopping; checkpoint every
        ``checkpoint.every`` steps and at the end; log; return a summary."""
        cfg = self.config
        writer = self._writer()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.outer_steps, initial=self.outer_step, desc="meta-train")
        path = None
        last: Dict[str, float] = {"meta_loss": math.nan}
        try:
            while self.outer_step < cfg.outer_steps and not self.stopped_early:
                last = self._outer_step()
                self.outer_step += 1
                self.history["step"].append(self.outer_step)
                self.history["meta_loss"].append(last["meta_loss"])
                scalars = dict(last)
                if cfg.validation.every and self.outer_step % cfg.validation.every == 0:
                    scalars["valid/loss"] = value = self.validate()
                    self._after_validation(value)
                    scalars["valid/best"] = self.best_valid
                if writer is not None:
                    for k, v in scalars.items():
                        tag = k if "/" in k else f"meta/{k}"
                        writer.add_scalar(tag, v, self.outer_step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(meta_loss=f"{last['meta_loss']:.4g}",
                                    best=f"{self.best_valid:.4g}")
                if cfg.checkpoint.every and self.outer_step % cfg.checkpoint.every == 0:
                    path = self.save()
            if self._saved_step != self.outer_step:
                path = self.save()
            if self.rank == 0:
                self.save_rule("final_rule")
                if cfg.log.plot:
                    self.plot(os.path.join(cfg.log.dir, "loss_curve.png"))
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
        return MetaTrainResult(
            outer_step=self.outer_step, meta_loss=last["meta_loss"],
            best_valid=self.best_valid, best_step=self.best_step,
            stopped_early=self.stopped_early, skipped_steps=self.skipped_steps,
            checkpoint=path or (os.path.join(cfg.checkpoint.dir, "last.pt")
                                if self.rank == 0 else None))

    # ---- logs ----------------------------------------------------------------------
    def _writer(self):
        if self.rank != 0 or not self.config.log.tensorboard:
            return None
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run drops the events a crashed run logged after its
        # checkpoint, so the curves show each step once.
        return SummaryWriter(self.config.log.dir,
                             purge_step=self.outer_step + 1 if self.outer_step else None)

    def plot(self, path: str) -> str:
        """Write the meta-loss (and validation loss) curve as a PNG (matplotlib's Agg
        canvas, without touching the global backend)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        h = self.history
        ax.plot(h["step"], h["meta_loss"], label="meta-loss (train tasks)")
        if h["valid_step"]:
            ax.plot(h["valid_step"], h["valid_loss"], "o-", label="validation loss")
        ax.set_title(f"meta-training ({self.config.estimator.kind}, seed {self.config.seed})")
        ax.set_xlabel("outer step")
        ax.set_ylabel("loss")
        if all(v > 0 for v in h["meta_loss"] + h["valid_loss"] if math.isfinite(v)):
            ax.set_yscale("log")
        ax.legend()
        ax.grid(alpha=0.3)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fig.savefig(path, dpi=100)
        return path


def _to_cpu(obj: Any) -> Any:
    """``obj`` (nested dicts/lists/tuples) with its tensors on the CPU, so they can be
    gathered from other ranks' devices and saved."""
    if isinstance(obj, Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return type(obj)((k, _to_cpu(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _to_device(u: Unroll, device: torch.device) -> Unroll:
    """``u`` with its tensors (loaded on CPU) on ``device``."""
    if device.type == "cpu":
        return u
    move = lambda x: x.to(device) if isinstance(x, Tensor) else x  # noqa: E731
    u.params = OrderedDict((k, move(v)) for k, v in u.params.items())
    if isinstance(u.state, MLPState):
        u.state = MLPState(*[[move(t) for t in lst] for lst in u.state])
    u.extra = {k: move(v) for k, v in u.extra.items()}
    return u


def _need(module: str, option: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{option}=true needs the {module} package (pip install {module}, "
                          f"or pip install 'pyoptk[meta]'); set {option}: false to run "
                          "without it")


# ---- the command ------------------------------------------------------------------
def main(argv: Optional[List[str]] = None) -> int:
    """``pyoptk meta-train --config CFG [--resume] [--out DIR]``: run (or resume) the
    config's meta-training. Under ``torchrun`` (``WORLD_SIZE`` > 1) it joins the process
    group first: NCCL for ``device: cuda``, gloo for ``device: cpu``."""
    import argparse
    import dataclasses

    ap = argparse.ArgumentParser(prog="pyoptk meta-train",
                                 description="Meta-train a learned optimizer from a config.")
    ap.add_argument("--config", required=True, help="YAML (or JSON) MetaTrainConfig")
    ap.add_argument("--resume", action="store_true",
                    help="continue from the checkpoint in checkpoint.dir when there is one")
    ap.add_argument("--out", help="write checkpoints to OUT/checkpoints and logs to "
                                  "OUT/logs (overrides checkpoint.dir and log.dir)")
    args = ap.parse_args(argv)
    try:
        cfg = MetaTrainConfig.from_yaml(args.config)
        if args.out:
            cfg = dataclasses.replace(
                cfg, checkpoint=dataclasses.replace(
                    cfg.checkpoint, dir=os.path.join(args.out, "checkpoints")),
                log=dataclasses.replace(cfg.log, dir=os.path.join(args.out, "logs")))
    except (OSError, ValueError, ImportError) as exc:
        print(f"pyoptk meta-train: error: {exc}", file=sys.stderr)
        return 2
    dist = torch.distributed
    joined = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if joined:
        dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo")
    try:
        trainer = MetaTrainer(cfg, resume=args.resume)
        if trainer.rank == 0 and trainer.resumed_from:
            print(f"resumed from {trainer.resumed_from} at outer step {trainer.outer_step}")
        result = trainer.fit()
        if joined:
            dist.barrier()  # no rank tears the group down while another still uses it
    except ValueError as exc:  # a checkpoint that does not fit, a rejected option
        print(f"pyoptk meta-train: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if joined:
            dist.destroy_process_group()
    if trainer.rank == 0:
        print(f"outer step {result.outer_step}: meta-loss {result.meta_loss:.6g}, best "
              f"validation {result.best_valid:.6g} (step {result.best_step})"
              f"{', stopped early' if result.stopped_early else ''}; skipped "
              f"{result.skipped_steps}; checkpoint {result.checkpoint}")
    return 0
