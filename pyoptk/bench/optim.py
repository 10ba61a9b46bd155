"""``pyoptk bench optim``: fused AdamW / LAMB / Lookahead vs the optimizers a user
would otherwise pick, on real parameter layouts, in one run.

Each candidate gets its own parameters, gradients (fixed across steps) and state, and
``optimizer.step()`` is timed after warm-up. Effective bandwidth counts the bytes an
optimizer must move per fp32 parameter: AdamW reads p, g, m, v and writes p, m, v
(28 B); LAMB's two passes move 40 B. Baselines: torch AdamW (for-loop, foreach,
fused), pytorch-optimizer's Lamb and Lookahead.
"""

from __future__ import annotations

import argparse
import gc
from typing import Callable, Dict, List, Optional

import torch

import pyoptk
from pyoptk.bench import harness
from pyoptk.bench.layouts import LAYOUTS, numel

BYTES_PER_PARAM = {"AdamW": 28, "LAMB": 40, "Lookahead": 28}
DEFAULT_LAYOUTS = {"cpu": ["resnet50", "flat-1m", "flat-10m"],
                   "cuda": list(LAYOUTS)}


def _pytorch_optimizer():
    try:
        import pytorch_optimizer

        return pytorch_optimizer
    except ImportError:
        return None


def candidates(device: torch.device) -> Dict[str, Callable]:
    """name -> (params -> optimizer), baselines first."""
    po = _pytorch_optimizer()
    lr = 1e-3
    c: Dict[str, Callable] = {
        "torch AdamW for-loop": lambda ps: torch.optim.AdamW(ps, lr=lr, foreach=False),
        "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=lr, foreach=True),
        "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=lr, fused=True),
        "pyoptk AdamW": lambda ps: pyoptk.optim.AdamW(ps, lr=lr),
    }
    if po is not None:
        c["pytorch-optimizer Lamb"] = lambda ps: po.Lamb(ps, lr=lr, weight_decay=0.01)
    c["pyoptk LAMB"] = lambda ps: pyoptk.optim.LAMB(ps, lr=lr, weight_decay=0.01)
    if po is not None:
        c["pytorch-optimizer Lookahead(torch AdamW fused)"] = lambda ps: po.Lookahead(
            torch.optim.AdamW(ps, lr=lr, fused=True), k=5, alpha=0.5)
    c["pyoptk Lookahead(AdamW)"] = lambda ps: pyoptk.optim.Lookahead(
        pyoptk.optim.AdamW(ps, lr=lr), k=5, alpha=0.5)
    return c


BASELINE_OF = {
    "pyoptk AdamW": "torch AdamW fused",
    "pyoptk LAMB": "pytorch-optimizer Lamb",
    "pyoptk Lookahead(AdamW)": "pytorch-optimizer Lookahead(torch AdamW fused)",
}


def _family(name: str) -> str:
    for fam in ("Lookahead", "LAMB", "Lamb", "AdamW"):
        if fam in name:
            return "LAMB" if fam == "Lamb" else fam
    return "AdamW"


def copy_bandwidth(device: torch.device, n_bytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written)."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = harness.time_fn(lambda: dst.copy_(src), device, warmup=3, reps=20)
    return 2 * n_bytes / (t.median * 1e-3) / 1e9


def _with_backend(step: Callable[[], None], backend: Optional[str]) -> Callable[[], None]:
    if backend is None:
        return step

    def stepped() -> None:
        with pyoptk.use_backend(backend):
            step()
    return stepped


def run(layouts: List[str], device: torch.device, reps: int, backends: Optional[List[str]],
        out_dir: Optional[str]) -> List[dict]:
    """Per layout, build every candidate (own params, grads and state) and time their
    steps interleaved (:func:`harness.time_interleaved`); ratios compare medians of
    this one run."""
    rows: List[dict] = []
    for layout in layouts:
        shapes = LAYOUTS[layout]()
        n = numel(shapes)
        steps: Dict[str, Callable[[], None]] = {}
        families: Dict[str, tuple] = {}
        for name, make in candidates(device).items():
            for backend in (backends if name.startswith("pyoptk") and backends else [None]):
                try:
                    opt = make(harness.make_params(shapes, device))
                except (RuntimeError, ValueError, TypeError) as exc:  # e.g. fused unsupported
                    print(f"  skip {name}: {exc}")
                    continue
                label = name if backend is None else f"{name} [{backend}]"
                steps[label] = _with_backend(opt.step, backend)
                families[label] = (name, backend)
        timings = harness.time_interleaved(steps, device, reps=reps)
        del steps
        gc.collect()
        medians = {label: t.median for label, t in timings.items()}
        for label, t in timings.items():
            name, backend = families[label]
            gbps = BYTES_PER_PARAM[_family(name)] * n / (t.median * 1e-3) / 1e9
            row = {
                "layout": layout, "optimizer": name, "params": n, "tensors": len(shapes),
                "backend": backend or ("auto" if name.startswith("pyoptk") else "-"),
                "median_ms": f"{t.median:.3f}", "p20_ms": f"{t.p20:.3f}",
                "p80_ms": f"{t.p80:.3f}", "GBps": f"{gbps:.1f}", "label": label,
            }
            base = BASELINE_OF.get(name)
            if base in medians:
                row["baseline"] = base
                row["speedup"] = f"{medians[base] / t.median:.2f}x"
            if name == "pyoptk AdamW" and "torch AdamW foreach" in medians:
                row["vs_foreach"] = f"{medians['torch AdamW foreach'] / t.median:.2f}x"
            rows.append(row)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="pyoptk bench optim", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", nargs="+", choices=list(LAYOUTS) + ["all"],
                    help="parameter layouts (default: CPU a quick set, GPU all)")
    ap.add_argument("--backends", nargs="+", choices=["auto", "cpu", "cuda", "triton", "torch"],
                    help="time pyoptk optimizers with each of these backends")
    harness.add_run_args(ap, reps=20)
    args = ap.parse_args(argv)
    device = harness.run_device(args)
    layouts = args.layouts or DEFAULT_LAYOUTS.get(device.type, ["flat-1m"])
    if "all" in layouts:
        layouts = list(LAYOUTS)
    print(f"pyoptk bench optim on {harness.device_name(device)}, torch {torch.__version__}, "
          f"triton {harness.triton_version()}, commit {harness.git_commit()}")
    if device.type == "cuda":
        print(f"device-to-device copy bandwidth: {copy_bandwidth(device):.0f} GB/s "
              "(read + write)")
    rows = run(layouts, device, args.reps, args.backends, args.out)
    harness.print_table(rows, ["layout", "label", "params", "median_ms", "p20_ms", "p80_ms",
                               "GBps", "speedup", "vs_foreach"],
                        title="optimizer.step() time; speedup = baseline median / median")
    if args.out:
        path = harness.append_csv(rows, "optim", device, args.out)
        print(f"\nrows appended to {path}")
    return 0
