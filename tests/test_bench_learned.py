"""``pyoptk bench learned`` smoke test: the suite runs on a tiny layout with one or two
repetitions, prints its three tables and writes sensible rows (the CSV header widened,
not broken, when the file was written by a suite with fewer columns)."""

import csv

import pytest
import torch

import pyoptk
from pyoptk import cli
from pyoptk._backend import registered_backends
from pyoptk.bench import harness, learned
from pyoptk.learned import FeatureConfig
from pyoptk.bench.layouts import SMOKE_LAYOUTS


def test_registered_backends_lists_the_ops_implementations():
    assert "torch" in registered_backends("mlp_update_")
    assert registered_backends("no_such_op") == []
    backends, _ = learned.mlp_backends("cpu")
    assert backends[-1] == "torch" and "triton" not in backends  # no interpreter timings
    _, notes = learned.mlp_backends("cpu", ["cuda"])
    assert any(n.startswith("cuda:") for n in notes)


def test_bench_learned_smoke(tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    old_fields = harness.CSV_FIELDS  # a file written by an older suite (fewer columns)
    with open(out / "cpu.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old_fields)
        w.writeheader()
        w.writerow({k: "old" for k in old_fields})

    rc = cli.main(["bench", "learned", "--device", "cpu", "--layouts", "tiny",
                   "--meta-layouts", "tiny", "--reps", "2", "--warmup", "1",
                   "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "optimizer.step() time" in text and "memory:" in text and "forward + backward" in text
    if not hasattr(pyoptk.ops, "mlp_step"):
        assert "fused backward (pyoptk.ops.mlp_step) is not built" in text

    with open(out / "cpu.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["layout"] == "old" and rows[0]["mode"] == ""  # old row kept, widened
    rows = rows[1:]
    assert {r["suite"] for r in rows} == {"learned"}
    shapes = SMOKE_LAYOUTS["tiny"]()
    n = sum(torch.Size(s).numel() for s in shapes)
    step = {r["optimizer"] if r["optimizer"] != "MLPOptimizer" else f"MLP[{r['backend']}]": r
            for r in rows if r["mode"] == "step"}
    assert {"pyoptk AdamW", "MLP[torch]"} <= set(step)
    for r in step.values():
        assert int(r["params"]) == n and int(r["tensors"]) == len(shapes)
        assert float(r["median_ms"]) > 0 and float(r["peak_MB"]) >= 0
    expected = sum(FeatureConfig().state_bytes(s) for s in shapes) / n
    assert float(step["MLP[torch]"]["state_B_per_param"]) == pytest.approx(expected, abs=1e-3)
    assert float(step["pyoptk AdamW"]["state_B_per_param"]) == pytest.approx(
        (8 * n + 4 * len(shapes)) / n, abs=1e-3)  # m, v and a float32 step per tensor
    assert step["MLP[torch]"]["note"] == ""  # the state matched FeatureConfig.state_bytes
    assert step["MLP[torch]"]["vs_adamw"].endswith("x")
    for key, r in step.items():
        if key.startswith("MLP[") and key != "MLP[torch]":
            assert r["baseline"] == "MLPOptimizer [torch]" and r["speedup"].endswith("x")

    meta = [r for r in rows if r["mode"] == "fwd+bwd"]
    names = {r["optimizer"] for r in meta}
    assert learned.AUTOGRAD_STEP in names
    assert (learned.FUSED_STEP in names) == hasattr(pyoptk.ops, "mlp_step")
    for r in meta:
        assert float(r["median_ms"]) > 0 and float(r["peak_MB"]) > 0


def test_peak_memory_cpu_counts_only_what_the_call_allocates():
    held = torch.ones(1 << 20)  # allocated before: not counted

    def fn():
        a = torch.ones(1 << 20)          # 4 MiB
        b = a * 2                        # 8 MiB live at the peak
        del a
        return (b + 1).sum()

    peak, how = harness.peak_memory(fn, torch.device("cpu"))
    if peak < 0:
        pytest.skip(how)
    assert 8 << 20 <= peak < (8 << 20) + (64 << 10), peak
    del held
