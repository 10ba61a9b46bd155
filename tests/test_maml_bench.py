"""`pyoptk bench maml` smoke test: one tiny problem, every candidate's float64
meta-gradient agrees with pyoptk's, rows carry time, memory and ratios."""

import pytest
import torch

from pyoptk.bench import maml as bench


pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_rows_and_agreement():
    rows = bench.bench_problem("sinusoid-mlp", 2, 3, torch.device("cpu"), reps=1, warmup=0)
    names = {r["optimizer"] for r in rows}
    assert {bench.PYOPTK, bench.AUTOGRAD} <= names
    by_name = {r["optimizer"]: r for r in rows}
    floor = by_name.pop(bench.QUERY_FLOOR)
    for r in by_name.values():
        assert float(r["rel_err"]) < 1e-8, r
        assert r["median_ms"] > 0 and r["speedup"] > 0
    # The query pass alone is part of every candidate's work, so it is cheaper than any
    # full meta-gradient, and higher's bound is its ratio to it.
    assert floor["rel_err"] == "" and floor["median_ms"] < by_name[bench.AUTOGRAD]["median_ms"]
    if bench.HIGHER in by_name:
        want = by_name[bench.HIGHER]["median_ms"] / floor["median_ms"]
        assert floor["bound"] == pytest.approx(want, rel=0.02)
    errs = bench.rel_errors("cnn-digits", 1, 2)
    assert max(errs.values()) < 1e-8, errs
