"""Compile every Triton kernel of ``pyoptk.kernels`` for a GPU target, without a GPU.

Run as a script (``python tests/triton_compile_check.py [arch ...]``, default 90 80) with
``TRITON_INTERPRET`` unset; it prints one JSON object: ``{"arch": {kernel: [seconds, …]},
"failed": [[arch, kernel, error], …], "defined": [kernel, …]}``.

How: Triton's active driver is replaced by one that only names a CUDA target, and every
``JITFunction.run`` is turned into ``warmup=True`` (compile, never launch), so the
kernels go through Triton's whole pipeline — TTIR, TTGIR, LLVM, PTX and ``ptxas`` (the
one Triton ships) — on this CPU-only machine. The launches come from the real op code
paths (optimizers, differentiable steps, their backward) on small CPU tensors, so each
kernel compiles with the argument specializations a GPU run would see, including the
counts equal to 1 that Triton turns into constants. Outputs are never computed: only
compilation is checked. Used by tests/test_triton_compile.py (CI has no GPU: without
this, a kernel that does not compile for a GPU shows up only on the first GPU run).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

os.environ.pop("TRITON_INTERPRET", None)  # kernels must be JITFunctions, not interpreted

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class CompileOnlyDriver:
    """What ``JITFunction.run`` asks of the active driver, for one CUDA target."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def set_current_device(self, device):
        pass

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


COMPILED: dict = {}
FAILED: list = []
SEEN: set = set()
ARCH = [0]
_run = JITFunction.run


def _resources(ptx: str, arch: int) -> dict:
    """``ptxas -v`` of one compiled kernel: registers, stack frame and spill bytes per
    thread (what Triton would read from the loaded binary on a GPU)."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas  # the ptxas Triton used

    target = f"sm_{arch}a" if f".target sm_{arch}a" in ptx else f"sm_{arch}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run([get_ptxas(arch).path, "-v", f"-arch={target}", f.name,
                              "-o", os.devnull], capture_output=True, text=True).stderr
    nums = lambda pat: max([int(x) for x in re.findall(pat, out)] or [0])  # noqa: E731
    return {"regs": nums(r"Used (\d+) registers"), "stack": nums(r"(\d+) bytes stack frame"),
            "spill_stores": nums(r"(\d+) bytes spill stores")}


def _compile_only(self, *args, grid, warmup, **kwargs):
    t0 = time.perf_counter()
    name = self.fn.__name__
    try:
        kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
    except Exception as exc:
        FAILED.append([ARCH[0], name, "".join(traceback.format_exception_only(exc))[-600:]])
        raise
    if id(kernel) not in SEEN:  # a new specialization (Triton's disk cache may hold it)
        SEEN.add(id(kernel))
        row = {"seconds": round(time.perf_counter() - t0, 2),
               **_resources(kernel.asm["ptx"], ARCH[0])}
        COMPILED.setdefault(str(ARCH[0]), {}).setdefault(name, []).append(row)
    return kernel


def _workload() -> None:
    """One call of each op family through its Triton backend on small CPU tensors."""
    from pyoptk import optim
    from pyoptk._backend import use_backend
    from pyoptk.learned import MLPConfig, init_meta_params, init_state
    from pyoptk.learned.mlp import decays_tensor, meta_weights
    from pyoptk.ops import (clip_grad_norm_, grad_norm, inner_adam, inner_metasgd,
                            inner_sgd, mlp_step)

    gen = torch.Generator().manual_seed(0)
    rnd = lambda s: torch.randn(s, generator=gen)  # noqa: E731
    shapes = [(5, 7), (13,), ()]

    def params(n=None):
        ps = [rnd(s).requires_grad_() for s in shapes[:n]]
        for p in ps:
            p.grad = rnd(p.shape)
        return ps

    with use_backend("triton"):
        for make in (lambda ps: optim.AdamW(ps, centralize=True),
                     lambda ps: optim.AdamW(ps, amsgrad=True, maximize=True),
                     lambda ps: optim.LAMB(ps), lambda ps: optim.LAMB(ps, adam=True)):
            make(params()).step()
            make(params(1)).step()  # one tensor: counts of 1
        grad_norm(params())
        clip_grad_norm_(params(), 0.5)
        grad_norm(params(1), float("inf"))

        # Differentiable inner steps and their fused backward.
        ps = [rnd(s).requires_grad_() for s in shapes[:2]]
        gs = [rnd(s).requires_grad_() for s in shapes[:2]]
        lr = torch.tensor(0.1, requires_grad=True)
        out = inner_sgd(ps, gs, lr) + inner_metasgd(ps, gs, [torch.full(s, 0.1) for s in
                                                             shapes[:2]])
        new, m, v = inner_adam(ps, gs, [torch.zeros(s) for s in shapes[:2]],
                               [torch.zeros(s) for s in shapes[:2]], 1, 0.01)
        torch.autograd.grad(sum(o.sum() for o in out + new + m + v), ps + gs + [lr])

        # The learned step: forward (mlp_update_ through MLPOptimizer) and the
        # differentiable step's backward, at the GPU default precision (tf32) and fp32.
        cfg = MLPConfig()
        for ps in (params(), params(1)):
            optim.MLPOptimizer(ps, config=cfg).step()
        meta = init_meta_params(cfg, seed=1)
        inputs = [[rnd(s) for s in shapes], [rnd(s) for s in shapes]]
        st = init_state(inputs[0], cfg)
        inputs += [list(st.mom), list(st.rms), list(st.fac_row), list(st.fac_col),
                   list(st.step)]
        weights, decays = meta_weights(meta, cfg), decays_tensor(cfg, meta)
        hp = cfg.op_hyper(torch.tensor([0.5]), 0.01)
        leaves = [t.requires_grad_() for t in inputs[0] + inputs[1]]
        outs = mlp_step(*inputs, weights, decays, hp)
        torch.autograd.grad(sum(o.sum() for o in outs[0]), leaves)

        import pyoptk.kernels.mlp_step_grad as kg
        import pyoptk.kernels.mlp_update as ku
        # The op path above compiled "ieee" (CPU tensors); add the GPU default "tf32"
        # and the other modes. The backward's main kernel takes ~35 s per mode to
        # compile here, so it gets the GPU default only.
        for precision in ku.PRECISIONS:
            ku.mlp_update_(*[[t.detach().clone() for t in lst] for lst in inputs], weights,
                           decays, hp, precision=precision)
        kg.mlp_step_backward([[t.detach() for t in lst] for lst in inputs],
                             [[None] * len(shapes)] * 5, weights, decays, hp, precision="tf32")


def _jit_functions() -> dict:
    """The package's launched kernels: module-level JITFunctions named ``*_kernel``
    (through ``triton.heuristics`` / ``autotune`` wrappers), by function name."""
    import importlib
    import pkgutil

    import pyoptk.kernels as kernels

    found = {}
    for info in pkgutil.iter_modules(kernels.__path__):
        mod = importlib.import_module(f"pyoptk.kernels.{info.name}")
        for attr, obj in vars(mod).items():
            while not isinstance(obj, JITFunction) and hasattr(obj, "fn"):
                obj = obj.fn
            if (isinstance(obj, JITFunction) and attr.endswith("_kernel")
                    and not attr.startswith("_probe")):  # (_multi_tensor's import probe)
                found[obj.fn.__name__] = obj
    return found


def main(archs) -> int:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    JITFunction.run = _compile_only
    defined = sorted(_jit_functions())  # imports every kernel module while uninterpreted

    # The op layer lets Triton take CPU tensors only when it believes it is interpreted;
    # the kernels were decorated above with the variable unset, so they compile.
    os.environ["TRITON_INTERPRET"] = "1"
    for arch in archs:
        ARCH[0] = arch
        driver.set_active(CompileOnlyDriver(arch))
        _clear_kernel_caches()  # kernels cache per device index, not per target
        try:
            _workload()
        except Exception:
            if not FAILED:
                FAILED.append([arch, "<workload>", traceback.format_exc()[-1500:]])
    print(json.dumps({"compiled": COMPILED, "failed": FAILED, "defined": defined}))
    return 1 if FAILED else 0


def _clear_kernel_caches() -> None:
    for fn in _jit_functions().values():
        fn.device_caches.clear()


if __name__ == "__main__":
    sys.exit(main([int(a) for a in sys.argv[1:]] or [90, 80]))
