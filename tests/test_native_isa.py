"""The native CPU loops exist in baseline, AVX2 and AVX-512 copies (csrc/cpu/cpu_util.h)
that must give bit-identical results: the same IEEE operations in the same order, no FMA
contraction. Each copy is selected with PYOPTK_CPU_ISA, read once per process, so each
runs in its own interpreter; copies the CPU lacks fall back to the best it has."""

import subprocess
import sys
import textwrap

import pytest
import torch

from pyoptk._native import native_or_none

pytestmark = pytest.mark.skipif(native_or_none() is None, reason="pyoptk._C not built")

# Odd sizes: vector bodies, remainders and several chunks (kChunkSize = 16384).
SCRIPT = textwrap.dedent("""
    import sys, torch, pyoptk
    from pyoptk._native import native
    torch.manual_seed(0)
    shapes = [(3,), (17, 33), (40000,), (5, 13, 7)]
    out = {"isa": native().build_info()["cpu_isa"]}
    with pyoptk.use_backend("cpu"):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            ps = [torch.randn(s).to(dtype) for s in shapes]
            gs = [torch.randn(s).to(dtype) for s in shapes]
            m = [torch.zeros(s) for s in shapes]
            v = [torch.zeros(s) for s in shapes]
            m2 = [torch.zeros(s) for s in shapes]
            v2 = [torch.zeros(s) for s in shapes]
            qs = [p.clone() for p in ps]
            st = [torch.zeros(()) for _ in shapes]
            st2 = [torch.zeros(()) for _ in shapes]
            for _ in range(3):
                pyoptk.ops.adamw_(ps, gs, m, v, st, lr=1e-2, weight_decay=0.1)
                pyoptk.ops.lamb_(qs, gs, m2, v2, st2, lr=1e-2, weight_decay=0.1)
            g32 = [g.float().clone() for g in gs]
            norm = pyoptk.ops.clip_grad_norm_(g32, 0.5)
            pyoptk.ops.centralize_gradients_(g32)
            out[str(dtype)] = [ps, m, v, qs, m2, v2, g32, norm]
    torch.save(out, sys.argv[1])
""")


def test_every_isa_copy_is_bit_identical(tmp_path):
    results = {}
    for isa in ("baseline", "avx2", "avx512"):
        path = tmp_path / f"{isa}.pt"
        env = {**__import__("os").environ, "PYOPTK_CPU_ISA": isa}
        res = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=env,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        results[isa] = torch.load(path)
    assert results["baseline"]["isa"] == "baseline"
    ref = results["baseline"]
    for isa in ("avx2", "avx512"):
        got = results[isa]
        for key, tensors in ref.items():
            if key == "isa":
                continue
            flat_ref = [t for lst in tensors for t in (lst if isinstance(lst, list) else [lst])]
            flat_got = [t for lst in got[key] for t in (lst if isinstance(lst, list) else [lst])]
            for i, (a, b) in enumerate(zip(flat_got, flat_ref)):
                assert torch.equal(a, b), f"{isa} ({got['isa']}) differs from baseline: {key} #{i}"
