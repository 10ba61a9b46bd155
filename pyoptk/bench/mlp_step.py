"""Forward + backward of the differentiable learned-MLP step: the fused
``pyoptk.ops.mlp_step`` against autograd through the reference
``mlp_update_functional`` (what meta-training used before), on CPU.

Each (layout, candidate) runs in its own subprocess so that its peak resident memory
(``ru_maxrss``) is its own: the table shows the median time of one forward+backward
(all output cotangents random, gradients w.r.t. params, grads, state, meta-parameters
and a tensor lr), the peak RSS and the peak above the RSS after setup ("step").

    python -m pyoptk.bench.mlp_step [--layouts flat-1m resnet50] [--reps 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Dict, List

import torch

CANDIDATES = ("fused", "reference")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _run_one(layout: str, candidate: str, reps: int, threads: int) -> Dict[str, float]:
    torch.set_num_threads(threads)
    from pyoptk.bench.layouts import LAYOUTS
    from pyoptk.learned import MLPConfig, init_meta_params, init_state
    from pyoptk.learned.mlp import decays_tensor, meta_weights
    from pyoptk.ops.mlp_step import mlp_step
    from pyoptk.ops.mlp_update import mlp_update_functional

    shapes = LAYOUTS[layout]()
    cfg = MLPConfig()
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    st = init_state(params, cfg)
    meta = init_meta_params(cfg, seed=0)
    weights = [w.requires_grad_(True) for w in meta_weights(meta, cfg)]
    decays = decays_tensor(cfg, meta)
    lr = torch.tensor(1.0, requires_grad=True)
    hp = cfg.op_hyper(lr)
    leaves = [t.requires_grad_(True) for t in params + grads]
    step_fn = mlp_step if candidate == "fused" else mlp_update_functional

    def once():
        out = step_fn(params, grads, st.mom, st.rms, st.fac_row, st.fac_col, st.step,
                      weights, decays, hp)
        outs = [t for lst in out[:5] for t in lst if t.requires_grad]
        cts = [torch.ones_like(t) for t in outs]
        torch.autograd.grad(outs, leaves + weights + [lr], cts, allow_unused=True)

    base = _rss_mb()
    once()  # warm-up (and the peak: every call allocates the same)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        once()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"median_ms": statistics.median(times), "peak_mb": peak, "step_mb": peak - base}


def main(argv: List[str] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", nargs="+", default=["flat-1m", "resnet50"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", nargs=2, metavar=("LAYOUT", "CANDIDATE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(_run_one(args.one[0], args.one[1], args.reps, args.threads)))
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    print(f"{'layout':<10} {'candidate':<10} {'median ms':>10} {'peak MB':>9} {'step MB':>9}")
    for layout in args.layouts:
        res = {}
        for cand in CANDIDATES:
            out = subprocess.run([sys.executable, "-m", "pyoptk.bench.mlp_step", "--one", layout,
                                  cand, "--reps", str(args.reps), "--threads",
                                  str(args.threads)], env=env, capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(out.stderr)
            res[cand] = json.loads(out.stdout.strip().splitlines()[-1])
            r = res[cand]
            print(f"{layout:<10} {cand:<10} {r['median_ms']:>10.1f} {r['peak_mb']:>9.0f} "
                  f"{r['step_mb']:>9.0f}")
        f, r = res["fused"], res["reference"]
        print(f"{layout:<10} {'ratio':<10} {r['median_ms'] / f['median_ms']:>9.2f}x "
              f"{r['peak_mb'] / f['peak_mb']:>8.2f}x {r['step_mb'] / max(f['step_mb'], 1):>8.2f}x")


if __name__ == "__main__":
    main()
