"""``pyoptk bench meta``: the plain-PyTorch baselines compute what the estimators
compute (so the speedups compare the same loop), and the suite runs on a tiny setting
and writes sensible rows."""

import csv

import pytest
import torch

from pyoptk import cli
from pyoptk.bench import meta as bench_meta
from pyoptk.learned import MLPConfig, init_meta_params
from pyoptk.meta import PersistentES, TruncatedBPTT
from pyoptk.tasks import QuadraticTask

CFG = MLPConfig()


pytestmark = pytest.mark.usefixtures("one_thread")


def test_plain_tbptt_is_the_estimators_gradient():
    meta = init_meta_params(CFG, 0, output_scale=1.0, dtype=torch.float64)
    task = QuadraticTask(0, dim=6, cond=10.0, noise=0.1)
    est = TruncatedBPTT(CFG, 3, 30, lr=10.0)
    unrolls = [est.init_unroll(task, meta, s) for s in (0, 1)]
    _, unrolls = est.estimate(meta, unrolls, seed=0)
    want = est.estimate(meta, unrolls, seed=1)[0].grads
    got = bench_meta.plain_tbptt(unrolls, meta, CFG, 3, 10.0)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("fused", [False, True], ids=["vmap", "fused_steps"])
def test_plain_pes_is_the_estimators_gradient(fused):
    meta = init_meta_params(CFG, 0, output_scale=1.0, dtype=torch.float64)
    task = QuadraticTask(0, dim=6, cond=10.0, noise=0.1)
    est = PersistentES(CFG, 2, 20, sigma=0.05, n_particles=3, lr=10.0, fused=fused)
    u = est.init_unroll(task, meta, 0)
    _, (u,) = est.estimate(meta, [u], seed=0)
    want = est.estimate(meta, [u], seed=1)[0].grads
    got = bench_meta.plain_pes(est, u, meta, seed=1)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-14)


def test_bench_meta_smoke(tmp_path, capsys):
    rc = cli.main(["bench", "meta", "--tasks", "quadratic-1k", "--truncation", "2",
                   "--unrolls", "1", "--particles", "2", "--reps", "2", "--warmup", "1",
                   "--out", str(tmp_path)])
    assert rc == 0
    assert "one estimate" in capsys.readouterr().out
    with open(tmp_path / "cpu.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["suite"] for r in rows} == {"meta"}
    by = {r["optimizer"]: r for r in rows}
    assert set(by) == {"TruncatedBPTT", "TBPTT", "PersistentES", "PES"}
    for r in rows:
        assert int(r["params"]) == 1000 and float(r["median_ms"]) > 0
        assert float(r["inner_steps_per_s"]) > 0 and r["peak_MB"] != ""
    assert by["TruncatedBPTT"]["baseline"] == "TBPTT [plain]"
    pes = {r["backend"]: r for r in rows if r["optimizer"] == "PersistentES"}
    assert set(pes) == {"fused steps", "vmap"}
    for r in pes.values():
        assert r["speedup"].endswith("x") and r["baseline"] == "PES [plain loop]"
        assert int(r["particles"]) == 4
    assert float(by["PES"]["particle_steps_per_s"]) == pytest.approx(
        4 * float(by["PES"]["inner_steps_per_s"]), rel=1e-3)


def test_bench_meta_rejects_bad_counts():
    with pytest.raises(SystemExit):
        bench_meta.main(["--truncation", "0", "--out", ""])
