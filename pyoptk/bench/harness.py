"""Timing, tables and CSV rows shared by the ``pyoptk bench`` suites.

Every suite times candidates and their baselines in the same process, one after the
other on the same data, and reports ratios to a baseline measured in that run.
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch


@dataclass
class Timing:
    """Per-call wall times in milliseconds (CUDA: synchronized around each call)."""

    samples_ms: List[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def p20(self) -> float:
        return _quantile(self.samples_ms, 0.2)

    @property
    def p80(self) -> float:
        return _quantile(self.samples_ms, 0.8)


def _quantile(xs: List[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def _time_once(fn: Callable[[], None], cuda: bool) -> float:
    """One call's wall time in ms (CUDA: between events recorded around the call)."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_fn(fn: Callable[[], None], device: torch.device, warmup: int = 3, reps: int = 20,
            max_seconds: float = 20.0) -> Timing:
    """Time ``fn`` (medians over ``reps`` calls after ``warmup``; stops early past
    ``max_seconds`` with at least 3 samples)."""
    return time_interleaved({"fn": fn}, device, warmup, reps, max_seconds)["fn"]


def time_interleaved(fns: Dict[str, Callable[[], None]], device: torch.device,
                     warmup: int = 3, reps: int = 20,
                     max_seconds: float = 60.0) -> Dict[str, Timing]:
    """Time several candidates round-robin: each round calls every candidate once, in
    an order rotated by one each round. A slow stretch of the machine (another process,
    frequency changes) then lands on all candidates alike instead of on whichever ran
    at that moment, so ratios of medians stay meaningful on a shared machine. Stops
    early past ``max_seconds`` once every candidate has 3 samples."""
    cuda = device.type == "cuda"
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    if cuda:
        torch.cuda.synchronize(device)
    out = {name: Timing() for name in names}
    start_all = time.perf_counter()
    for r in range(reps):
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            out[name].samples_ms.append(_time_once(fns[name], cuda))
        if r >= 2 and time.perf_counter() - start_all > max_seconds:
            break
    return out


def peak_memory(fn: Callable[[], None], device: torch.device) -> Tuple[int, str]:
    """``(bytes, how)``: the peak memory ``fn`` allocates above what is allocated when it
    starts (memory held before the call — params, grads, state — is not counted).

    CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak. CPU: torch's CPU
    allocator has no peak counter, so ``fn`` runs once under ``torch.profiler`` with
    ``profile_memory=True`` and the recorded allocations and frees are replayed in time
    order; the peak of the running total is returned (-1 and the reason when this torch's
    profiler does not expose them)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, "cuda max_memory_allocated"
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch._C._profiler import _EventType

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        sizes = []
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            e = stack.pop()
            if e.typed[0] == _EventType.Allocation:
                sizes.append((e.start_time_ns, e.typed[1].alloc_size))
            stack.extend(e.children)
    except Exception as exc:  # private profiler API: absent or changed in this torch
        return -1, f"not measured on CPU ({type(exc).__name__}: {exc})"
    total = peak = 0
    for _, size in sorted(sizes):
        total += size
        peak = max(peak, total)
    return peak, "torch.profiler CPU allocations"


def make_params(shapes, device: torch.device, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> List[torch.Tensor]:
    """Leaf parameters of ``shapes`` with fixed random gradients (``randn * 1e-2``),
    deterministic from ``seed``: every candidate of a suite starts from the same data."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.randn(s, generator=gen).to(device=device, dtype=dtype).requires_grad_()
        p.grad = (torch.randn(s, generator=gen) * 1e-2).to(device=device, dtype=dtype)
        params.append(p)
    return params


def device_name(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3' or 'CPU <model> (<n> threads)'."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {model} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    if device.type == "cpu":
        return "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(device)).strip("-")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5, check=True).stdout.strip()
    except Exception:
        return "unknown"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:
        return "none"


def add_run_args(ap, *, reps: int, warmup: Optional[int] = None,
                 device: Optional[str] = None) -> None:
    """The options every suite shares: ``--device`` (default CUDA when present, else
    CPU, unless ``device`` is given), ``--reps``, ``--warmup`` (when ``warmup`` is
    given), ``--threads`` and ``--out``."""
    default = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--device", default=default, help=f"device (default {default})")
    ap.add_argument("--reps", type=int, default=reps)
    if warmup is not None:
        ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch and OpenMP)")
    ap.add_argument("--out", default="bench/results",
                    help="folder for <device>.csv ('' to write nothing)")


def run_device(args) -> torch.device:
    """The device of parsed :func:`add_run_args` options, with ``--threads`` applied."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device)


def print_table(rows: List[dict], columns: List[str], title: Optional[str] = None) -> None:
    if title:
        print(f"\n{title}")
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns))


# Columns every suite writes, in this order; a suite's own columns follow them.
CSV_FIELDS = ["date", "suite", "device", "torch", "triton", "commit", "layout", "optimizer",
              "backend", "params", "tensors", "median_ms", "p20_ms", "p80_ms", "GBps",
              "baseline", "speedup"]


def append_csv(rows: List[dict], suite: str, device: torch.device, out_dir: str,
               extra_fields: Sequence[str] = ()) -> str:
    """Append rows to ``<out_dir>/<device>.csv`` with device, versions and commit.

    The columns are :data:`CSV_FIELDS` then ``extra_fields``. When the file exists with
    fewer columns (written by an older pyoptk or another suite), it is rewritten once
    with the union of the columns — its own first, new ones after — so old rows keep
    their values and leave the new columns empty."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{device_slug(device)}.csv")
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "suite": suite,
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version(),
        "commit": git_commit(),
    }
    wanted = CSV_FIELDS + [f for f in extra_fields if f not in CSV_FIELDS]
    fields = wanted
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            have = list(reader.fieldnames or [])
            old_rows = list(reader) if set(wanted) - set(have) else None
        fields = have + [c for c in wanted if c not in have]
        if old_rows is not None:  # widen the header, keep every old row
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
                w.writeheader()
                w.writerows(old_rows)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**meta, **r})
    return path
