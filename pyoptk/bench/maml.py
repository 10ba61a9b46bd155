"""``pyoptk bench maml``: the cost of one exact second-order MAML meta-gradient.

For each problem and each number of inner SGD steps (1, 5, 10 by default), one
meta-batch's meta-gradient (forward through the inner loop, backward into the
initialization) is computed four ways on the same data, timed round-robin in one run:

* ``pyoptk MAML`` — :class:`pyoptk.meta.maml.MAML` with its defaults: all tasks at once
  (``torch.func.vmap`` support forwards over tasks, one batched second-order backward;
  the CNN's query pass loops over tasks, see the class's ``batch_query``);
* ``pyoptk MAML (task loop)`` — the same with ``batched=False``: a Python loop over
  tasks instead of vmap (slower; a lower peak, since the backward forms one task's
  cotangents at a time and vmapped max-pooling saves a task-major copy of its input);
* ``torch.autograd unrolled`` — the plain reference a user writes: per task,
  ``functional_call`` + ``torch.autograd.grad(create_graph=True)`` + ``p - lr * g``;
* ``higher`` — ``higher.innerloop_ctx`` with a differentiable SGD, per task.

One more row, ``higher's query pass alone``, times only the per-task query forward and
backward from fixed adapted parameters, as ``higher`` (and the task loop, and on CPU
pyoptk's CNN) computes it with the same PyTorch kernels. No inner-loop implementation
that runs the query pass this way can be faster than ``higher`` by more than
``higher / this`` (printed as ``bound``): e.g. with one inner step the CNN's query
pass is most of ``higher``'s time.

Problems: ``cnn-digits`` — a 2-conv CNN on 5-way 1-shot digits episodes (15 queries per
class); ``sinusoid-mlp`` — Finn et al.'s 1→40→40→1 ReLU MLP on 10-shot sinusoids.
Before timing, every candidate's meta-gradient is compared with pyoptk's in float64
(``rel_err``: max relative difference; the target is 1e-8). Peak memory is what one
meta-gradient allocates above what is held before it (:func:`harness.peak_memory`).

``--accuracy`` also meta-trains ProtoNets and MAML on digits classes 0–4 and reports
5-way 1-shot and 5-shot query accuracy on episodes of the held-out classes 5–9.
Rows go to a table on stdout and to ``bench/results/<device>.csv``.
"""

from __future__ import annotations

import argparse
import gc
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from pyoptk.bench import harness
from pyoptk.meta.maml import MAML
from pyoptk.meta.protonets import ProtoNet
from pyoptk.tasks.fewshot import DigitsEpisodes, Episode
from pyoptk.tasks.sinusoid import SinusoidEpisodes

PYOPTK, PYOPTK_LOOP = "pyoptk MAML", "pyoptk MAML (task loop)"
AUTOGRAD, HIGHER = "torch.autograd unrolled", "higher"
QUERY_FLOOR = "higher's query pass alone"
CSV_EXTRA = ["problem", "inner_steps", "meta_batch", "rel_err", "peak_MB", "peak_method",
             "mem_ratio", "bound", "accuracy", "note"]


def cnn(n_way: int = 5) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 16, n_way))


def sine_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                         nn.Linear(40, 1))


def problem(name: str, meta_batch: int) -> Tuple[Callable[[], nn.Module], Callable, Episode, float]:
    """``(model factory, loss_fn, batched episode, inner lr)`` of a benchmark problem."""
    if name == "cnn-digits":
        episodes = DigitsEpisodes("train", 5, 1, 15, seed=0)
        return cnn, F.cross_entropy, episodes.batch(0, meta_batch), 0.4
    if name == "sinusoid-mlp":
        return sine_mlp, F.mse_loss, SinusoidEpisodes(10, 10, seed=0).batch(0, meta_batch), 0.01
    raise ValueError(f"unknown problem {name!r}; known: {PROBLEMS}")


PROBLEMS = ["cnn-digits", "sinusoid-mlp"]
DEFAULT_META_BATCH = {"cnn-digits": 8, "sinusoid-mlp": 25}


def autograd_meta_loss(model: nn.Module, loss_fn, batch: Episode, steps: int, lr: float
                       ) -> Tensor:
    """The plain unrolled reference's meta-loss: per task, functional SGD steps with
    ``create_graph=True``, then the mean query loss."""
    params = dict(model.named_parameters())
    sx, sy, qx, qy = batch
    total = 0.0
    for t in range(sx.shape[0]):
        fast = dict(params)
        for _ in range(steps):
            loss = loss_fn(functional_call(model, fast, (sx[t],)), sy[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {n: p - lr * g for (n, p), g in zip(fast.items(), grads)}
        total = total + loss_fn(functional_call(model, fast, (qx[t],)), qy[t])
    return total / sx.shape[0]


def autograd_meta_grad(model: nn.Module, loss_fn, batch: Episode, steps: int, lr: float
                       ) -> List[Tensor]:
    """:func:`autograd_meta_loss` and ``torch.autograd.grad`` into the parameters."""
    return list(torch.autograd.grad(autograd_meta_loss(model, loss_fn, batch, steps, lr),
                                    list(model.parameters())))


def higher_meta_grad(model: nn.Module, loss_fn, batch: Episode, steps: int, lr: float
                     ) -> List[Tensor]:
    """The same meta-gradient through ``higher.innerloop_ctx`` (one context per task)."""
    import higher

    opt = torch.optim.SGD(model.parameters(), lr=lr)
    params = list(model.parameters())
    sx, sy, qx, qy = batch
    total = 0.0
    for t in range(sx.shape[0]):
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False,
                                  track_higher_grads=True) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(loss_fn(fmodel(sx[t]), sy[t]))
            total = total + loss_fn(fmodel(qx[t]), qy[t])
    return list(torch.autograd.grad(total / sx.shape[0], params))


def query_pass(model: nn.Module, loss_fn, batch: Episode, steps: int, lr: float
               ) -> Callable[[], List[Tensor]]:
    """The query pass alone, as ``higher`` runs it: per task, the query loss of that
    task's adapted parameters (computed once, then fixed leaves) and one backward into
    them. The share of every candidate's time that an inner loop cannot remove unless the
    query pass itself is batched."""
    with torch.no_grad():
        adapted = MAML(model, loss_fn, inner_steps=steps, inner_lr=lr).adapt(
            batch.support_x, batch.support_y)
    leaves = {n: t.clone().requires_grad_() for n, t in adapted.items()}
    T = batch.query_x.shape[0]

    def run() -> List[Tensor]:
        per_task = zip(*(t.unbind(0) for t in leaves.values()))
        total = sum(loss_fn(functional_call(model, dict(zip(leaves, ps)), (x,)), y)
                    for ps, x, y in zip(per_task, batch.query_x.unbind(0),
                                        batch.query_y.unbind(0)))
        return list(torch.autograd.grad(total / T, list(leaves.values())))

    return run


def pyoptk_meta_grad(maml: MAML, batch: Episode) -> List[Tensor]:
    return list(torch.autograd.grad(maml.meta_loss(batch), list(maml.model.parameters())))


def candidates(model: nn.Module, loss_fn, batch: Episode, steps: int, lr: float
               ) -> Dict[str, Callable[[], List[Tensor]]]:
    maml = MAML(model, loss_fn, inner_steps=steps, inner_lr=lr)
    loop = MAML(model, loss_fn, inner_steps=steps, inner_lr=lr, batched=False)
    out = {PYOPTK: lambda: pyoptk_meta_grad(maml, batch),
           PYOPTK_LOOP: lambda: pyoptk_meta_grad(loop, batch),
           AUTOGRAD: lambda: autograd_meta_grad(model, loss_fn, batch, steps, lr)}
    try:
        import higher  # noqa: F401

        out[HIGHER] = lambda: higher_meta_grad(model, loss_fn, batch, steps, lr)
    except ImportError:
        pass
    return out


def rel_errors(name: str, steps: int, meta_batch: int) -> Dict[str, float]:
    """Max relative difference of each candidate's float64 meta-gradient to pyoptk's."""
    make, loss_fn, batch, lr = problem(name, meta_batch)
    torch.manual_seed(0)
    model = make().double()
    batch = batch.to(dtype=torch.float64)
    grads = {k: fn() for k, fn in candidates(model, loss_fn, batch, steps, lr).items()}
    ref = grads[PYOPTK]
    return {k: max(((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()
                   for a, b in zip(g, ref)) for k, g in grads.items()}


def bench_problem(name: str, steps: int, meta_batch: int, device: torch.device, reps: int,
                  warmup: int) -> List[dict]:
    make, loss_fn, batch, lr = problem(name, meta_batch)
    errs = rel_errors(name, steps, meta_batch)
    torch.manual_seed(0)
    model = make().to(device)
    batch = batch.to(device)
    fns = candidates(model, loss_fn, batch, steps, lr)
    fns[QUERY_FLOOR] = query_pass(model, loss_fn, batch, steps, lr)
    times = harness.time_interleaved({k: (lambda f=f: f()) for k, f in fns.items()}, device,
                                     warmup=warmup, reps=reps)
    rows = []
    for k, f in fns.items():
        gc.collect()
        peak, how = harness.peak_memory(lambda: f(), device)
        t = times[k]
        rows.append({"layout": name, "problem": name, "optimizer": k, "backend": "auto",
                     "params": sum(p.numel() for p in model.parameters()),
                     "tensors": len(list(model.parameters())), "inner_steps": steps,
                     "meta_batch": meta_batch, "median_ms": round(t.median, 3),
                     "p20_ms": round(t.p20, 3), "p80_ms": round(t.p80, 3),
                     "rel_err": f"{errs[k]:.1e}" if k in errs else "",
                     "peak_MB": round(peak / 2 ** 20, 2), "peak_method": how, "_peak": peak})
    base = {r["optimizer"]: r for r in rows}[PYOPTK]
    base_ms, base_peak = base["median_ms"], base["_peak"]
    for r in rows:
        peak = r.pop("_peak")
        r["baseline"] = PYOPTK
        r["speedup"] = round(r["median_ms"] / base_ms, 2)
        r["mem_ratio"] = round(peak / base_peak, 2) if base_peak > 0 and peak > 0 else ""
    if HIGHER in times:
        floor = {r["optimizer"]: r for r in rows}[QUERY_FLOOR]
        floor["bound"] = round(times[HIGHER].median / times[QUERY_FLOOR].median, 2)
        floor["note"] = "bound = higher / this: the most any inner loop can gain over higher"
    return rows


def accuracy_rows(device: torch.device, iters: int) -> List[dict]:
    """Meta-train ProtoNets and MAML on digits classes 0-4 (``iters`` meta-batches of 8),
    report query accuracy on 400 5-way episodes of classes 5-9, for 1 and 5 shots."""
    rows = []
    for shots in (1, 5):
        train = DigitsEpisodes("train", 5, shots, 10, seed=0)
        test = DigitsEpisodes("test", 5, shots, 10, seed=1)
        torch.manual_seed(0)
        net = ProtoNet(cnn()[:-1]).to(device)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        for it in range(iters):
            loss, _ = net.loss(train.batch(it, 8).to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            acc = torch.stack([net.loss(test.batch(i, 40).to(device))[1] for i in range(10)]).mean()
        rows.append({"layout": f"digits 5-way {shots}-shot", "optimizer": "ProtoNet",
                     "accuracy": round(acc.item(), 4)})
        torch.manual_seed(0)
        maml = MAML(cnn().to(device), F.cross_entropy, inner_steps=5, inner_lr=0.4)
        opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
        for it in range(iters):
            loss = maml.meta_loss(train.batch(it, 8).to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
        accs = []
        for i in range(10):
            b = test.batch(i, 40).to(device)
            with torch.no_grad():
                _, out = maml.meta_loss(b, return_outputs=True)
            accs.append((out.argmax(-1) == b.query_y).float().mean())
        rows.append({"layout": f"digits 5-way {shots}-shot", "optimizer": "MAML (5 steps)",
                     "accuracy": round(torch.stack(accs).mean().item(), 4)})
    for r in rows:
        r.update(problem="accuracy", note=f"{iters} meta-batches of 8 on classes 0-4; "
                 "400 test episodes of classes 5-9")
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="pyoptk bench maml", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", nargs="+", choices=PROBLEMS, default=PROBLEMS)
    ap.add_argument("--steps", nargs="+", type=int, default=[1, 5, 10])
    ap.add_argument("--meta-batch", type=int, default=None,
                    help="tasks per meta-batch (default: cnn-digits 8, sinusoid-mlp 25)")
    ap.add_argument("--accuracy", type=int, default=0, metavar="ITERS",
                    help="also meta-train ProtoNets and MAML for ITERS meta-batches and "
                         "report held-out 5-way 1/5-shot accuracy (default 0: skip)")
    harness.add_run_args(ap, reps=10, warmup=2)
    args = ap.parse_args(argv)
    device = harness.run_device(args)
    print(f"pyoptk bench maml on {harness.device_name(device)}, torch {torch.__version__}, "
          f"commit {harness.git_commit()}")
    rows = []
    for name in args.problems:
        for steps in args.steps:
            rows += bench_problem(name, steps, args.meta_batch or DEFAULT_META_BATCH[name],
                                  device, args.reps, args.warmup)
    harness.print_table(rows, ["problem", "inner_steps", "meta_batch", "optimizer", "median_ms",
                               "p20_ms", "p80_ms", "speedup", "peak_MB", "mem_ratio", "rel_err",
                               "bound"],
                        title="one meta-gradient; speedup = median / pyoptk median, mem_ratio "
                              "= peak / pyoptk peak (above 1: pyoptk better); rel_err: float64 "
                              "meta-gradient vs pyoptk's; bound = higher median / median of "
                              "higher's query pass alone")
    if args.accuracy:
        acc = accuracy_rows(device, args.accuracy)
        harness.print_table(acc, ["layout", "optimizer", "accuracy", "note"],
                            title="held-out digits accuracy")
        rows += acc
    if args.out:
        print("rows appended to", harness.append_csv(rows, "maml", device, args.out, CSV_EXTRA))
    return 0
