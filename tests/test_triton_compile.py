"""Every Triton kernel compiles for Hopper (sm_90) through Triton's full pipeline down to
ptxas, on this CPU-only machine (tests/triton_compile_check.py says how), from the real
op code paths: a kernel that would fail to compile on a GPU (e.g. on a count of 1 that
Triton turned into a constant) fails here. The memory-bound multi-tensor kernels and the
learned step's pass 2 must not spill registers; the learned-MLP backward's per-tile
kernel spills (known, see bench/GPU_NOTES.md): printed, not asserted. A cold Triton cache takes ~1.5 min here, mostly the
MLP backward's main kernel; a warm one seconds."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = os.path.join(os.path.dirname(__file__), "triton_compile_check.py")
# Elementwise / reduction kernels over the parameters: spilling would put local-memory
# traffic on top of the bytes they exist to stream.
NO_SPILL = ("_adamw_kernel", "_lamb_moments_kernel", "_lamb_apply_kernel",
            "_lamb_trust_ratio_kernel", "_norm_partials_kernel", "_norm_total_kernel",
            "_clip_kernel", "_centralize_kernel", "_sgd_kernel", "_sgd_backward_kernel",
            "_adam_kernel", "_adam_backward_kernel", "_mlp_stats_kernel",
            # The learned step's pass 2 holds the feature tile and runs the MLP: spill-free
            # since it runs on 8 warps (kernels/mlp_update.py, DOT_WARPS).
            "_mlp_apply_kernel")


def _have_cuda_backend() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return os.path.exists(get_ptxas(90).path)
    except Exception:
        return False


@pytest.mark.skipif(not _have_cuda_backend(), reason="Triton without its NVIDIA backend/ptxas")
def test_every_triton_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    proc = subprocess.run([sys.executable, SCRIPT, "90"], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["failed"] == [], report["failed"]
    compiled = report["compiled"]["90"]
    assert set(report["defined"]) <= set(compiled), (
        f"kernels no op path launched: {sorted(set(report['defined']) - set(compiled))}")
    assert len(report["defined"]) >= 19
    for name in NO_SPILL:
        worst = max(r["spill_stores"] for r in compiled[name])
        assert worst == 0, f"{name} spills {worst} bytes per thread on sm_90"
    for name in ("_mlp_apply_kernel", "_bwd_tiles_kernel"):
        rows = compiled[name]
        print(f"{name}: {max(r['regs'] for r in rows)} registers, up to "
              f"{max(r['spill_stores'] for r in rows)} B of spill stores per thread")
    assert proc.returncode == 0, proc.stderr[-3000:]
