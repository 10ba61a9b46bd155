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
    for r in rows:
        assert float(r["rel_err"]) < 1e-8, r
        assert r["median_ms"] > 0 and r["speedup"] > 0
    errs = bench.rel_errors("cnn-digits", 1, 2)
    assert max(errs.values()) < 1e-8, errs
