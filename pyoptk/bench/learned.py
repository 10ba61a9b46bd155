"""``pyoptk bench learned``: what the MLP learned optimizer costs, in one run.

Three parts, each against baselines measured in the same process on the same data:

1. **step** — ``MLPOptimizer.step()`` (default :class:`~pyoptk.learned.MLPConfig`: 39
   features, MLP 39→32→32→2) with every backend of ``mlp_update_`` this process can
   run, against the same optimizer on the pure-PyTorch reference (backend ``torch``;
   ``speedup`` = reference median / median) and against pyoptk's fused AdamW
   (``vs_adamw`` = median / AdamW median: how many AdamW steps one learned step costs).
   Effective bandwidth counts the minimum traffic: read p, g and the state, write p and
   the state (AdamW: 28 B per fp32 parameter; MLP: 60 B on matrices, 84 B on vectors).
2. **memory** — optimizer state bytes per parameter, counted from the state tensors
   after a step (and checked against ``FeatureConfig.state_bytes``), and the peak
   memory one step allocates on top of what is held before it (params, grads, state).
   CUDA: ``torch.cuda.max_memory_allocated``. CPU: the allocations and frees of torch's
   CPU allocator during the step, recorded by ``torch.profiler`` (``profile_memory``),
   replayed in order; the peak of the running total is reported.
3. **meta** — forward + backward of one differentiable step, as meta-training runs it:
   ``pyoptk.ops.mlp_step`` (the fused backward the device gets by default: the native
   kernel on CPU, the Triton kernels on CUDA; the row's label and ``backend`` column say
   which ran) against autograd through the reference
   ``pyoptk.ops.mlp_update_functional``; time and peak memory. Every floating input
   (params, grads, state, MLP weights) requires grad and every floating output gets a
   fixed random cotangent. When this build has no ``pyoptk.ops.mlp_step`` the suite
   says so and measures the reference only.

Rows go to a table on stdout and to ``bench/results/<device>.csv``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import pyoptk
from pyoptk._backend import (
    available_backends, backend_unavailable_reason, registered_backends, resolve_backend)
from pyoptk.bench import harness
from pyoptk.bench.layouts import LAYOUTS, SMOKE_LAYOUTS, numel
from pyoptk.learned import MLPConfig, init_meta_params, init_state
from pyoptk.learned.mlp import decays_tensor, meta_weights
from pyoptk.ops.mlp_update import mlp_update_functional

OP = "mlp_update_"
ADAMW = "pyoptk AdamW"
MLP = "MLPOptimizer"
REFERENCE = f"{MLP} [torch]"
FUSED_STEP = "mlp_step (fused backward)"
AUTOGRAD_STEP = "mlp_update_functional (autograd)"
DEFAULT_LAYOUTS = {"cpu": ["resnet50", "flat-1m"], "cuda": list(LAYOUTS)}
# Autograd through the reference keeps every intermediate of the MLP (~1 KB per
# parameter with the default config): larger layouts run out of memory.
DEFAULT_META_LAYOUTS = {"cpu": ["flat-1m"], "cuda": ["resnet50", "flat-1m", "flat-10m"]}
CSV_EXTRA = ["mode", "vs_adamw", "state_B_per_param", "peak_MB", "peak_method", "note"]
# What ran as mlp_step's backward (pyoptk.ops.mlp_step.backward_backend), for the labels.
BACKWARD_LABELS = {"cpu": "native CPU backward", "triton": "Triton backward",
                   "torch": "autograd over the reference"}


def all_layouts() -> Dict[str, Callable]:
    return {**LAYOUTS, **SMOKE_LAYOUTS}


def mlp_backends(device_type: str, requested: Optional[Sequence[str]] = None
                 ) -> Tuple[List[str], List[str]]:
    """(backends of ``mlp_update_`` to time, notes on the ones left out). The reference
    ``torch`` always comes last. Triton on CPU (its interpreter) is timed only when
    asked for: interpreted timings say nothing about the kernel."""
    have = set(registered_backends(OP))
    runnable = [b for b in available_backends(device_type) if b in have]
    notes = []
    if requested:
        chosen = []
        for b in requested:
            if b == "auto":
                b = resolve_backend(OP, device_type)
            if b not in have:
                notes.append(f"{b}: mlp_update_ has no {b!r} backend (it has {sorted(have)})")
            elif b not in runnable:
                notes.append(f"{b}: {backend_unavailable_reason(b, device_type)}")
            elif b not in chosen:
                chosen.append(b)
    else:
        chosen = list(runnable)
        if device_type == "cpu" and "triton" in chosen:
            chosen.remove("triton")
            notes.append("triton: skipped on CPU (interpreter); ask with --backends triton")
    chosen = [b for b in chosen if b != "torch"] + ["torch"]
    return chosen, notes


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state."""
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if isinstance(t, torch.Tensor))


def traffic_bytes(params: Sequence[torch.Tensor], state: int) -> int:
    """Minimum bytes a step moves: read p and g, write p; read and write the state."""
    return sum(3 * p.numel() * p.element_size() for p in params) + 2 * state


def _oom_types() -> tuple:
    return (torch.OutOfMemoryError, MemoryError)


def _row(layout: str, shapes, name: str, backend: str, mode: str) -> dict:
    return {"layout": layout, "optimizer": name, "backend": backend, "mode": mode,
            "params": numel(shapes), "tensors": len(shapes),
            "label": name if backend in ("-", "auto") else f"{name} [{backend}]"}


def _timed(row: dict, t: harness.Timing) -> None:
    row.update(median_ms=f"{t.median:.3f}", p20_ms=f"{t.p20:.3f}", p80_ms=f"{t.p80:.3f}")


def _peak(row: dict, fn: Callable[[], None], device: torch.device) -> None:
    peak, method = harness.peak_memory(fn, device)
    row.update(peak_MB=f"{peak / 2**20:.3f}" if peak >= 0 else "-", peak_method=method)


def _ratios(rows: List[dict], medians: Dict[str, float], baseline: str,
            adamw: Optional[float]) -> None:
    for r in rows:
        if "median_ms" not in r:
            continue
        med = float(r["median_ms"])
        if r["optimizer"] == ADAMW:
            continue
        if baseline in medians and r["label"] != baseline:
            r["baseline"] = baseline
            r["speedup"] = f"{medians[baseline] / med:.2f}x"
        if adamw is not None:
            r["vs_adamw"] = f"{med / adamw:.1f}x"


def bench_steps(layout: str, device: torch.device, backends: List[str], config: MLPConfig,
                warmup: int, reps: int) -> List[dict]:
    """Parts 1 and 2: ``optimizer.step()`` time, state bytes and step peak memory of
    fused AdamW and of ``MLPOptimizer`` on each backend."""
    shapes = all_layouts()[layout]()
    meta = init_meta_params(config, seed=0)
    rows, medians = [], {}
    runs = [(ADAMW, "auto")] + [(MLP, b) for b in backends]
    for name, backend in runs:
        row = _row(layout, shapes, name, backend, "step")
        params = harness.make_params(shapes, device)
        if name == ADAMW:
            opt = pyoptk.optim.AdamW(params, lr=1e-3)
            ctx = contextlib.nullcontext()
        else:
            opt = pyoptk.optim.MLPOptimizer(params, meta_params=meta, config=config)
            ctx = pyoptk.use_backend(backend)
        try:
            with ctx:
                opt.step()  # creates the state: the peak below is a steady-state step
                n_state = state_bytes(opt)
                _peak(row, opt.step, device)
                # the two steps above were warm-up already
                t = harness.time_fn(opt.step, device, warmup=max(0, warmup - 2), reps=reps)
        except _oom_types() as exc:
            row["note"] = f"out of memory ({type(exc).__name__})"
            rows.append(row)
            del opt, params
            _free(device)
            continue
        _timed(row, t)
        medians[row["label"]] = t.median
        n = row["params"]
        row["state_B_per_param"] = f"{n_state / n:.3f}"
        row["GBps"] = f"{traffic_bytes(params, n_state) / (t.median * 1e-3) / 1e9:.1f}"
        if name == MLP:
            expected = sum(config.features.state_bytes(s) for s in shapes)
            if expected != n_state:
                row["note"] = f"state {n_state} B != FeatureConfig.state_bytes {expected} B"
        rows.append(row)
        del opt, params
        _free(device)
    _ratios(rows, medians, REFERENCE, medians.get(ADAMW))
    return rows


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def have_fused_step() -> bool:
    return callable(getattr(pyoptk.ops, "mlp_step", None))


class MetaStepInputs:
    """Leaves of one differentiable step (all floating inputs require grad), the
    state made non-trivial by one in-place step first, and fixed cotangents."""

    def __init__(self, shapes, device: torch.device, config: MLPConfig, seed: int = 0):
        params = harness.make_params(shapes, device, seed)
        state = init_state(params, config, dtype=torch.float32)
        meta = init_meta_params(config, seed=seed, device=device)
        self.hp = config.op_hyper(1.0, 0.0)
        weights = [w.contiguous() for w in meta_weights(meta, config)]
        decays = decays_tensor(config, meta, device=device).contiguous()
        with torch.no_grad():
            pyoptk.ops.mlp_update_(params, [p.grad for p in params], state.mom, state.rms,
                                   state.fac_row, state.fac_col, state.step, weights, decays,
                                   self.hp)
        leaf = lambda ts: [t.detach().clone().requires_grad_() for t in ts]  # noqa: E731
        self.params = leaf(params)
        self.grads = leaf([p.grad for p in params])
        self.moms, self.rmss = leaf(state.mom), leaf(state.rms)
        self.fac_rows, self.fac_cols = leaf(state.fac_row), leaf(state.fac_col)
        self.steps = [s.detach().clone() for s in state.step]
        self.weights = leaf(weights)
        self.decays = decays.detach()
        self.inputs = (self.params + self.grads + self.moms + self.rmss + self.fac_rows
                       + self.fac_cols + self.weights)
        gen = torch.Generator(device="cpu").manual_seed(seed + 1)
        self.cotangents = [
            [torch.randn(t.shape, generator=gen).to(device) for t in ts]
            for ts in (self.params, self.moms, self.rmss, self.fac_rows, self.fac_cols)]

    def args(self):
        return (self.params, self.grads, self.moms, self.rmss, self.fac_rows, self.fac_cols,
                self.steps, self.weights, self.decays, self.hp)

    def backward_backend(self) -> str:
        """The backward ``pyoptk.ops.mlp_step`` runs on these inputs: "cpu", "triton" or
        "torch"."""
        mod = importlib.import_module("pyoptk.ops.mlp_step")
        return mod.backward_backend(list(self.args()[:7]), self.weights, self.hp)

    def forward_backward(self, step_fn: Callable) -> None:
        outs = step_fn(*self.args())
        ys, cots = [], []
        for ts, cs in zip(outs[:5], self.cotangents):
            for y, c in zip(ts, cs):
                if y.requires_grad:
                    ys.append(y)
                    cots.append(c)
        torch.autograd.grad(ys, self.inputs, grad_outputs=cots, allow_unused=True)


def bench_meta(layout: str, device: torch.device, config: MLPConfig, warmup: int,
               reps: int) -> List[dict]:
    """Part 3: forward + backward of one differentiable step."""
    shapes = all_layouts()[layout]()
    runs = [(AUTOGRAD_STEP, mlp_update_functional)]
    if have_fused_step():
        runs.insert(0, (FUSED_STEP, pyoptk.ops.mlp_step))
    rows, medians = [], {}
    for name, fn in runs:
        row = _row(layout, shapes, name, "auto" if fn is not mlp_update_functional else "torch",
                   "fwd+bwd")
        row["label"] = name
        try:
            inputs = MetaStepInputs(shapes, device, config)
            if fn is not mlp_update_functional:
                bwd = inputs.backward_backend()
                row["backend"] = bwd
                row["label"] = f"mlp_step [{BACKWARD_LABELS[bwd]}]"
            step = lambda: inputs.forward_backward(fn)  # noqa: E731
            _peak(row, step, device)
            t = harness.time_fn(step, device, warmup=max(0, warmup - 1), reps=reps)
        except _oom_types() as exc:
            row["note"] = f"out of memory ({type(exc).__name__})"
            rows.append(row)
            inputs = step = None
            _free(device)
            continue
        _timed(row, t)
        medians[name] = t.median
        rows.append(row)
        inputs = step = None
        _free(device)
    _ratios(rows, medians, AUTOGRAD_STEP, None)
    return rows


def run(layouts: List[str], meta_layouts: List[str], device: torch.device, reps: int,
        warmup: int, backends: List[str]) -> List[dict]:
    config = MLPConfig()
    rows: List[dict] = []
    for layout in layouts:
        rows += bench_steps(layout, device, backends, config, warmup, reps)
    for layout in meta_layouts:
        rows += bench_meta(layout, device, config, warmup, reps)
    return rows


def _expand(names: Optional[List[str]], default: List[str]) -> List[str]:
    names = default if names is None else names
    return list(LAYOUTS) if "all" in names else names


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="pyoptk bench learned", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    choices = list(all_layouts()) + ["all"]
    ap.add_argument("--layouts", nargs="*", choices=choices,
                    help="layouts of the step and memory parts (default: CPU resnet50 "
                         "flat-1m, GPU all; none to skip)")
    ap.add_argument("--meta-layouts", nargs="*", choices=choices,
                    help="layouts of the forward+backward part (default: CPU flat-1m, GPU "
                         "resnet50 flat-1m flat-10m; none to skip)")
    ap.add_argument("--backends", nargs="+", choices=["auto", "cpu", "cuda", "triton", "torch"],
                    help="mlp_update_ backends to time (default: every one available; the "
                         "reference 'torch' is always timed)")
    harness.add_run_args(ap, reps=20, warmup=3)
    args = ap.parse_args(argv)
    device = harness.run_device(args)
    layouts = _expand(args.layouts, DEFAULT_LAYOUTS.get(device.type, ["flat-1m"]))
    meta_layouts = _expand(args.meta_layouts, DEFAULT_META_LAYOUTS.get(device.type, ["flat-1m"]))
    backends, notes = mlp_backends(device.type, args.backends)
    print(f"pyoptk bench learned on {harness.device_name(device)}, torch {torch.__version__}, "
          f"triton {harness.triton_version()}, commit {harness.git_commit()}")
    print(f"mlp_update_ backends timed: {', '.join(backends)}"
          + "".join(f"\n  not timed: {n}" for n in notes))
    if meta_layouts and not have_fused_step():
        print("the fused backward (pyoptk.ops.mlp_step) is not built in this pyoptk: the "
              "forward+backward part measures the autograd reference only")
    rows = run(layouts, meta_layouts, device, args.reps, args.warmup, backends)
    step_rows = [r for r in rows if r["mode"] == "step"]
    meta_rows = [r for r in rows if r["mode"] != "step"]
    if step_rows:
        harness.print_table(
            step_rows, ["layout", "label", "params", "median_ms", "p20_ms", "p80_ms", "GBps",
                        "speedup", "vs_adamw", "note"],
            title="optimizer.step() time; speedup = MLPOptimizer [torch] median / median; "
                  "vs_adamw = median / pyoptk AdamW median")
        harness.print_table(
            step_rows, ["layout", "label", "params", "state_B_per_param", "peak_MB"],
            title=f"memory: optimizer state bytes per parameter; peak_MB = peak a step "
                  f"allocates above what is held before it "
                  f"({step_rows[0].get('peak_method', '-')})")
    if meta_rows:
        harness.print_table(
            meta_rows, ["layout", "label", "params", "median_ms", "p20_ms", "p80_ms",
                        "speedup", "peak_MB", "note"],
            title="differentiable step, forward + backward; speedup = autograd reference "
                  "median / median")
    if args.out:
        path = harness.append_csv(rows, "learned", device, args.out, extra_fields=CSV_EXTRA)
        print(f"\nrows appended to {path}")
    return 0
