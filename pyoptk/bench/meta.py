"""``pyoptk bench meta``: meta-training throughput of the outer-loop estimators.

One :meth:`~pyoptk.meta.GradientEstimator.estimate` call (one truncation of every
unroll, the meta-gradient included) is timed, always from the same unrolls, against a
plain-PyTorch implementation of the same loop measured in the same run on the same
data:

* **tbptt** — :class:`~pyoptk.meta.TruncatedBPTT` with the fused differentiable step
  (:func:`pyoptk.ops.mlp_step`, native CPU forward and fused backward) against
  :func:`plain_tbptt`: autograd through the reference step
  (:func:`pyoptk.ops.mlp_update.mlp_update_one`), a Python loop over the tensors.
* **pes** — :class:`~pyoptk.meta.PersistentES` (inner gradients of all particles by one
  ``torch.func.vmap``) with its two inner steps: ``fused steps`` (the fused rule called
  particle by particle, ``fused=True``; the default on CPU from 64 elements per
  particle) and ``vmap`` (the reference under ``vmap``, ``fused=False``). Both run
  against :func:`plain_pes`: a Python loop over the particles, each taking its inner
  gradient by autograd and stepping with the reference per tensor.

Reported per task: median time of one estimate, **inner steps per second** (unroll
steps: unrolls × truncation / time; PES also counts particle-steps), ``speedup`` =
plain median / median, and the peak memory one estimate allocates (CUDA:
``max_memory_allocated``; CPU: torch's allocations replayed from ``torch.profiler``).
Tasks: a 1,000-dimensional noisy quadratic and MLPs on scikit-learn's breast-cancer
data, one ReLU hidden layer of 64 (2,114 parameters) and two tanh layers of 128
(20,738 parameters). (Not digits, and no wide ReLU layers: constant pixels and
units dead on a whole batch give exactly-zero gradient rows/columns, on which the
untrained rule's factored features ``rsqrt(r/vbar)`` reach ~1e15 and its first step
overflows — every estimate would be non-finite.) Rows go to a table and to ``bench/results/<device>.csv``.
"""

from __future__ import annotations

import argparse
import gc
from collections import OrderedDict
from typing import Callable, Dict, List, Mapping, Optional

import torch
from torch import Tensor

from pyoptk.bench import harness
from pyoptk.learned.mlp import MLPConfig, MLPState, decays_tensor, init_meta_params, meta_weights
from pyoptk.meta import PersistentES, TruncatedBPTT, Unroll
from pyoptk.meta.es import PES_ACCUM
from pyoptk.ops.mlp_update import mlp_update_one
from pyoptk.tasks import MLPTask, QuadraticTask, Task

# The seed of the timed estimates (the same every call: each repeats one truncation).
TIMED_SEED = 1_000_003
CSV_EXTRA = ["mode", "truncation", "unrolls", "particles", "inner_steps_per_s",
             "particle_steps_per_s", "peak_MB", "peak_method", "note"]


def bench_tasks() -> Dict[str, Callable[[], Task]]:
    """The benchmark's tasks by name (built on demand: the MLP loads its data set)."""
    return {
        "quadratic-1k": lambda: QuadraticTask(0, dim=1000, cond=100.0, noise=0.1),
        "mlp64-breast_cancer": lambda: MLPTask("mlp_breast_cancer", 0, "breast_cancer",
                                               hidden=(64,)),
        "tanh-mlp128x2-breast_cancer": lambda: MLPTask(
            "mlp_breast_cancer", 0, "breast_cancer", hidden=(128, 128), activation="tanh"),
    }


def _reference_step(params: List[Tensor], grads: List[Tensor], state: MLPState,
                    weights: List[Tensor], decays: Tensor, hp) -> tuple:
    """The rule's reference step, one tensor at a time (as plain PyTorch code runs it)."""
    outs = [mlp_update_one(params[i], grads[i], state.mom[i], state.rms[i], state.fac_row[i],
                           state.fac_col[i], state.step[i], weights, decays, hp)
            for i in range(len(params))]
    new_params = [o[0] for o in outs]
    return new_params, MLPState([o[5] for o in outs], [o[1] for o in outs],
                                [o[2] for o in outs], [o[3] for o in outs],
                                [o[4] for o in outs])


def plain_tbptt(unrolls: List[Unroll], meta: Mapping[str, Tensor], config: MLPConfig,
                truncation: int, lr: float) -> "OrderedDict[str, Tensor]":
    """TBPTT in plain PyTorch: the meta-gradient of the mean train loss of ``θ_1 … θ_T``
    (inner gradients as inputs), averaged over the unrolls — what
    :class:`~pyoptk.meta.TruncatedBPTT` computes with its defaults."""
    leaves = OrderedDict((k, v.detach().requires_grad_()) for k, v in meta.items())
    weights = meta_weights(leaves, config)
    decays = decays_tensor(config, leaves, device=weights[0].device, dtype=weights[0].dtype)
    hp = config.op_hyper(lr)
    total = [torch.zeros_like(v) for v in leaves.values()]
    for u in unrolls:
        task, names = u.task, list(u.params)
        params, state, terms = [p.detach() for p in u.params.values()], u.state, []
        for t in range(truncation + 1):
            batch = task.batch(u.step + t, "train")
            x = [p.detach().requires_grad_() for p in params] if t == 0 else params
            loss = task.loss(OrderedDict(zip(names, x)), batch)
            if t > 0:
                terms.append(loss)
            if t == truncation:
                break
            grads = torch.autograd.grad(loss, x, retain_graph=t > 0)
            params, state = _reference_step(params, list(grads), state, weights, decays, hp)
        grads = torch.autograd.grad(torch.stack(terms).mean(), list(leaves.values()))
        total = [a + b for a, b in zip(total, grads)]
    return OrderedDict((k, g / len(unrolls)) for k, g in zip(leaves, total))


@torch.no_grad()
def plain_pes(est: PersistentES, u: Unroll, meta: Mapping[str, Tensor], seed: int
              ) -> "OrderedDict[str, Tensor]":
    """One PES truncation of ``u`` in plain PyTorch, a Python loop over the 2N
    particles (the same draws as ``est``): the antithetic estimate
    :class:`~pyoptk.meta.PersistentES` returns for unroll 0."""
    task, names, n = u.task, list(u.params), est.n_particles
    eps = est.draw(meta, seed, 0)
    hp = est.config.op_hyper(est.lr)
    losses = []
    for j in range(2 * n):
        sign = 1.0 if j < n else -1.0
        mp = OrderedDict((k, v + sign * eps[k][j % n]) for k, v in meta.items())
        weights = meta_weights(mp, est.config)
        decays = decays_tensor(est.config, mp, device=weights[0].device, dtype=weights[0].dtype)
        params = [p[j] for p in u.params.values()]
        state = MLPState(*[[t[j] for t in lst] for lst in u.state])
        terms = []
        for t in range(est.truncation + 1):
            batch = task.batch(u.step + t, "train")
            with torch.enable_grad():
                x = [p.detach().requires_grad_() for p in params]
                loss = task.loss(OrderedDict(zip(names, x)), batch)
                grads = torch.autograd.grad(loss, x) if t < est.truncation else None
            if t > 0:
                terms.append(loss.detach())
            if grads is None:
                break
            params, state = _reference_step(params, list(grads), state, weights, decays, hp)
        losses.append(torch.stack(terms).mean())
    losses = torch.stack(losses)
    diff = losses[:n] - losses[n:]
    scale = 1.0 / (2.0 * est.sigma ** 2 * n)
    return OrderedDict((k, torch.tensordot(diff.to(v.dtype), u.extra[PES_ACCUM + k] + eps[k],
                                           dims=1) * scale) for k, v in meta.items())


def _warm_start(est, meta: Mapping[str, Tensor], unrolls: List[Unroll]) -> List[Unroll]:
    """Unrolls past their first truncation (non-zero rule state) whose next estimate is
    finite: an unroll the untrained rule makes diverge is restarted by the estimator
    (NaN policy) and tried again, so the timed estimate is not a degenerate one."""
    for attempt in range(8):
        _, unrolls = est.estimate(meta, unrolls, seed=attempt)
        if est.estimate(meta, unrolls, seed=TIMED_SEED)[0].finite and all(u.step for u in unrolls):
            return unrolls
    raise RuntimeError(f"{type(est).__name__}: no finite estimate on this task after 8 "
                       f"restarts")


def _row(task_name: str, task: Task, mode: str, name: str, backend: str, **kw) -> dict:
    params = task.init_params()
    return {"layout": task_name, "optimizer": name, "backend": backend, "mode": mode,
            "params": sum(p.numel() for p in params.values()), "tensors": len(params),
            "label": f"{name} [{backend}]", **kw}


def _measure(rows: List[dict], fns: Dict[str, Callable[[], None]], device: torch.device,
             warmup: int, reps: int, steps: int, particles: int) -> None:
    """Time the candidates interleaved, fill rows (keyed by label), peak memory, and
    the ratios to the plain candidate (the last)."""
    timings = harness.time_interleaved(fns, device, warmup=warmup, reps=reps)
    by_label = {r["label"]: r for r in rows}
    plain = list(fns)[-1]
    for label, t in timings.items():
        r = by_label[label]
        r.update(median_ms=f"{t.median:.3f}", p20_ms=f"{t.p20:.3f}", p80_ms=f"{t.p80:.3f}")
        r["inner_steps_per_s"] = f"{steps / (t.median * 1e-3):.1f}"
        if particles:
            r["particle_steps_per_s"] = f"{steps * particles / (t.median * 1e-3):.1f}"
        peak, method = harness.peak_memory(fns[label], device)
        r.update(peak_MB=f"{peak / 2**20:.3f}" if peak >= 0 else "-", peak_method=method)
        if label != plain:
            r["baseline"] = plain
            r["speedup"] = f"{timings[plain].median / t.median:.2f}x"
        gc.collect()


def bench_tbptt(task_name: str, device: torch.device, truncation: int, n_unrolls: int,
                warmup: int, reps: int) -> List[dict]:
    config = MLPConfig()
    meta = init_meta_params(config, 0, device=device)
    est = TruncatedBPTT(config, truncation, 10 * truncation)
    task = bench_tasks()[task_name]()
    unrolls = _warm_start(est, meta, [est.init_unroll(task, meta, seed=s)
                                      for s in range(n_unrolls)])
    kw = {"truncation": truncation, "unrolls": n_unrolls, "particles": ""}
    rows = [_row(task_name, task, "tbptt", "TruncatedBPTT", "fused", **kw),
            _row(task_name, task, "tbptt", "TBPTT", "plain", **kw)]
    fns = {rows[0]["label"]: lambda: est.estimate(meta, unrolls, seed=TIMED_SEED),
           rows[1]["label"]: lambda: plain_tbptt(unrolls, meta, config, truncation, 1.0)}
    _measure(rows, fns, device, warmup, reps, truncation * n_unrolls, 0)
    return rows


def bench_pes(task_name: str, device: torch.device, truncation: int, n_particles: int,
              warmup: int, reps: int) -> List[dict]:
    config = MLPConfig()
    meta = init_meta_params(config, 0, device=device)
    est, ref = (PersistentES(config, truncation, 10 * truncation, sigma=0.01,
                             n_particles=n_particles, fused=fused) for fused in (True, False))
    task = bench_tasks()[task_name]()
    (u,) = _warm_start(est, meta, [est.init_unroll(task, meta, seed=0)])
    kw = {"truncation": truncation, "unrolls": 1, "particles": 2 * n_particles}
    rows = [_row(task_name, task, "pes", "PersistentES", "fused steps", **kw),
            _row(task_name, task, "pes", "PersistentES", "vmap", **kw),
            _row(task_name, task, "pes", "PES", "plain loop", **kw)]
    fns = {rows[0]["label"]: lambda: est.estimate(meta, [u], seed=TIMED_SEED),
           rows[1]["label"]: lambda: ref.estimate(meta, [u], seed=TIMED_SEED),
           rows[2]["label"]: lambda: plain_pes(est, u, meta, seed=TIMED_SEED)}
    _measure(rows, fns, device, warmup, reps, truncation, 2 * n_particles)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="pyoptk bench meta", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", choices=list(bench_tasks()),
                    default=list(bench_tasks()))
    ap.add_argument("--modes", nargs="+", choices=["tbptt", "pes"], default=["tbptt", "pes"])
    ap.add_argument("--truncation", type=int, default=10, help="inner steps per estimate")
    ap.add_argument("--unrolls", type=int, default=2, help="TBPTT unrolls per estimate")
    ap.add_argument("--particles", type=int, default=8, help="PES antithetic pairs")
    # CPU by default: the fused backward is native on CPU
    harness.add_run_args(ap, reps=10, warmup=2, device="cpu")
    args = ap.parse_args(argv)
    for name in ("truncation", "unrolls", "particles", "reps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    device = harness.run_device(args)
    print(f"pyoptk bench meta on {harness.device_name(device)}, torch {torch.__version__}, "
          f"commit {harness.git_commit()}")
    rows: List[dict] = []
    for task_name in args.tasks:
        if "tbptt" in args.modes:
            rows += bench_tbptt(task_name, device, args.truncation, args.unrolls,
                                args.warmup, args.reps)
        if "pes" in args.modes:
            rows += bench_pes(task_name, device, args.truncation, args.particles,
                              args.warmup, args.reps)
    harness.print_table(
        rows, ["layout", "label", "params", "truncation", "unrolls", "particles", "median_ms",
               "inner_steps_per_s", "particle_steps_per_s", "speedup", "peak_MB"],
        title="one estimate (a truncation of every unroll + the meta-gradient); "
              "speedup = plain-PyTorch median / median; peak_MB = peak allocated by one "
              f"estimate ({rows[0].get('peak_method', '-')})")
    if args.out:
        path = harness.append_csv(rows, "meta", device, args.out, extra_fields=CSV_EXTRA)
        print(f"\nrows appended to {path}")
    return 0
