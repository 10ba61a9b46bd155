"""``pyoptk bench mlp``: the fused learned-MLP step ``mlp_update_`` per backend against
the PyTorch reference (``torch`` backend), on real parameter layouts, in one run.

Each backend gets its own parameters, gradients (fixed across steps) and state; one
``mlp_update_`` call over all tensors is timed after warm-up. Backends alternate within
each layout (all samples of one, then the next), and ``speedup`` is the reference's
median over the backend's. The default rule is ``MLPConfig()`` (39 features, hidden
32x32: 2,336 multiply-adds per element).
"""

from __future__ import annotations

import argparse
import gc
from typing import List, Optional

import torch

import pyoptk
from pyoptk.bench import harness
from pyoptk.bench.layouts import LAYOUTS, numel

DEFAULT_LAYOUTS = {"cpu": ["flat-1m", "resnet50"], "cuda": ["flat-1m", "resnet50", "gpt2-124m"]}


def _setup(shapes, device, config, seed=0):
    from pyoptk.learned import init_meta_params, init_state
    from pyoptk.learned.mlp import decays_tensor, meta_weights

    gen = torch.Generator(device="cpu").manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(device) for s in shapes]
    grads = [(torch.randn(s, generator=gen) * 1e-2).to(device) for s in shapes]
    st = init_state(params, config)
    meta = init_meta_params(config, seed=seed)
    weights = [w.to(device) for w in meta_weights(meta, config)]
    decays = decays_tensor(config, meta).to(device)
    hp = config.op_hyper(1e-3, 0.0)
    return params, grads, st, weights, decays, hp


def run(layouts: List[str], device: torch.device, reps: int, backends: List[str]) -> List[dict]:
    from pyoptk.learned import MLPConfig
    from pyoptk.ops.mlp_update import mlp_update_

    config = MLPConfig()
    rows: List[dict] = []
    for layout in layouts:
        shapes = LAYOUTS[layout]()
        n = numel(shapes)
        medians = {}
        for backend in backends:
            params, grads, st, weights, decays, hp = _setup(shapes, device, config)

            def step():
                mlp_update_(params, grads, st.mom, st.rms, st.fac_row, st.fac_col, st.step,
                            weights, decays, hp)

            try:
                with pyoptk.use_backend(backend):
                    t = harness.time_fn(step, device, warmup=1, reps=reps, max_seconds=60.0)
            except RuntimeError as exc:  # backend unavailable here
                print(f"  skip {backend}: {exc}")
                continue
            medians[backend] = t.median
            rows.append({"layout": layout, "optimizer": "mlp_update_", "backend": backend,
                         "params": n, "tensors": len(shapes), "median_ms": f"{t.median:.1f}",
                         "p20_ms": f"{t.p20:.1f}", "p80_ms": f"{t.p80:.1f}",
                         "Melem_per_s": f"{n / (t.median * 1e-3) / 1e6:.1f}"})
            del params, grads, st
            gc.collect()
        for r in rows:
            if r["layout"] == layout and "torch" in medians and r["backend"] != "torch":
                r["baseline"] = "torch"
                r["speedup"] = f"{medians['torch'] / float(r['median_ms']):.2f}x"
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="pyoptk bench mlp", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layouts", nargs="+", choices=list(LAYOUTS),
                    help="parameter layouts (default: CPU flat-1m and resnet50)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch and OpenMP)")
    ap.add_argument("--backends", nargs="+", choices=["cpu", "cuda", "triton", "torch"],
                    help="backends to time (default: torch and the fused ones for the device)")
    ap.add_argument("--out", default="bench/results",
                    help="folder for <device>.csv ('' to write nothing)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    layouts = args.layouts or DEFAULT_LAYOUTS.get(device.type, ["flat-1m"])
    backends = args.backends or (["torch", "cpu"] if device.type == "cpu"
                                 else ["torch", "triton", "cuda"])
    print(f"pyoptk bench mlp on {harness.device_name(device)}, torch {torch.__version__}, "
          f"triton {harness.triton_version()}, commit {harness.git_commit()}")
    rows = run(layouts, device, args.reps, backends)
    harness.print_table(rows, ["layout", "backend", "params", "tensors", "median_ms", "p20_ms",
                               "p80_ms", "Melem_per_s", "speedup"],
                        title="mlp_update_ time per call; speedup = torch median / median")
    if args.out:
        path = harness.append_csv(rows, "mlp", device, args.out)
        print(f"\nrows appended to {path}")
    return 0
