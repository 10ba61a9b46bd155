"""The native CPU backend of ``torch.ops.pyoptk.mlp_update_`` (csrc/cpu/mlp_update.cpp,
math in csrc/include/pyoptk/mlp_update_math.h) against the op's reference
``mlp_update_reference``: odd shapes and ragged lists, several steps, lr as a tensor,
bf16/fp16 params, non-finite gradients, feature configs without momentum/RMS/factored/
time features and other MLP shapes, determinism across thread counts and instruction
sets, bad input at the ``pyoptk._C`` level, the Triton/decline fallback, and a
1,000-step drift test against the reference in float64.

Tolerances (fp32 params, same inputs, one step): the native kernel differs from the
reference only in summation order (double-accumulated plane sums, row/column means and
the folded time bias; fused multiply-adds in the MLP vs torch's matmul) and in libm's
log/exp/tanh: the parameter *update* p_new - p_old must match within ``DELTA_RTOL`` of
the largest reference update element plus 2 ulp of the largest |p| (the stored p is
rounded to fp32 once), and the state within ``STATE_TOL`` elementwise (momenta, second
moments and full factored accumulators are in fact bit-identical: same fp32 operations
in the same order). bf16/fp16 params: ``helpers.STEP_TOL`` (one ulp of the dtype).
"""

import os
import subprocess
import sys
import warnings

import pytest
import torch

import pyoptk
from pyoptk import _backend
from pyoptk._native import native
from pyoptk.learned import FeatureConfig, MLPConfig
from pyoptk.ops import _native_call as nc
from pyoptk.ops.mlp_update import mlp_update_, mlp_update_reference
from helpers import STEP_TOL, assert_close
from helpers import clone_lists as _clone, mlp_setup as _setup, random_grads as _grads

ODD_SHAPES = [(), (1,), (0,), (3,), (1, 7), (7, 1), (5, 13, 7), (33, 65), (2, 0, 3)]
# Several chunks (kChunkSize = 16384) per tensor, row/column blocks across chunks.
BIG_SHAPES = [(40000,), (300, 257), (3, 3, 64, 64), (1, 20000), (20000, 1)]
DELTA_RTOL = 1e-5
STATE_TOL = (1e-7, 1e-5)
# 1,000 steps, fp32 native vs float64 reference: the total displacement p_1000 - p_0 must
# match within DRIFT_RTOL of its largest element. Measured 1.05e-5 (worst tensor), the
# same as the fp32 *reference* against float64 (1.05e-5): the limit is the fp32 storage
# of p (one rounding per step), not the kernel. Published CUDA learned optimizers drift
# by ~5e-2 in this kind of test.
DRIFT_RTOL = 3e-5
DRIFT_STATE_RTOL = 1e-5








def _cpu_step(state, grads, weights, decays, hp):
    with pyoptk.use_backend("cpu"):
        mlp_update_(state[0], grads, *state[1:], weights, decays, hp)


def _compare(kst, rst, before, what, dtype=torch.float32):
    for i in range(len(kst[0])):
        if dtype == torch.float32:
            dk = kst[0][i].double() - before[i].double()
            dr = rst[0][i].double() - before[i].double()
            scale = dr.abs().max().item() if dr.numel() else 0.0
            ulp = 2.4e-7 * (before[i].abs().max().item() if dr.numel() else 0.0)
            assert_close(dk, dr, DELTA_RTOL * scale + ulp, 0.0,
                         f"{what}: update of params[{i}] {tuple(kst[0][i].shape)}")
        else:
            atol, rtol = STEP_TOL[dtype]
            assert_close(kst[0][i], rst[0][i], atol, rtol,
                         f"{what}: params[{i}] {tuple(kst[0][i].shape)}")
    for name, ka, ra in zip(("mom", "rms", "fac_row", "fac_col"), kst[1:5], rst[1:5]):
        for i in range(len(ka)):
            assert_close(ka[i], ra[i], *STATE_TOL, f"{what}: {name}[{i}] {tuple(ka[i].shape)}")
    for i, (a, b) in enumerate(zip(kst[5], rst[5])):
        assert a.item() == b.item(), f"{what}: steps[{i}] {a.item()} != {b.item()}"


def _run(shapes, steps=3, dtype=torch.float32, config=None, lr=0.7, wd=0.1, grad_fn=None):
    config, state, weights, decays = _setup(shapes, dtype, config)
    ref = _clone(state)
    hp = config.op_hyper(lr, wd)
    for s in range(steps):
        grads = grad_fn(s) if grad_fn else _grads(shapes, dtype, 10 + s)
        before = [p.clone() for p in state[0]]
        _cpu_step(state, grads, weights, decays, hp)
        mlp_update_reference(ref[0], grads, *ref[1:], weights, decays, hp)
        _compare(state, ref, before, f"step {s}", dtype)
        if dtype != torch.float32:
            # One rounding of p may flip a bf16/fp16 ulp near a tie; later steps would
            # compound it. Restart every step from the reference's state.
            for dst, src in zip(state, ref):
                for d, r in zip(dst, src):
                    d.copy_(r)
    return state, ref


def test_auto_resolves_to_cpu():
    assert _backend.resolve_backend("mlp_update_", "cpu") == "cpu"
    from pyoptk.info import report
    assert any(line.split() == ["mlp_update_", "->", "cpu"] for line in report().splitlines())


def test_odd_shapes():
    state, _ = _run(ODD_SHAPES, steps=3)
    assert [s.item() for s in state[5]] == [3.0] * len(ODD_SHAPES)


def test_big_shapes_many_chunks():
    _run(BIG_SHAPES, steps=2)


def test_ragged_list_equals_one_at_a_time():
    """Per-tensor results do not depend on the other tensors of the call (bitwise)."""
    shapes = ODD_SHAPES + [(40000,), (300, 257)]
    config, state, weights, decays = _setup(shapes)
    singles = _clone(state)
    grads = _grads(shapes, torch.float32, 1)
    hp = config.op_hyper(0.7, 0.1)
    _cpu_step(state, grads, weights, decays, hp)
    for i in range(len(shapes)):
        one = [[role[i]] for role in singles]
        _cpu_step(one, [grads[i]], weights, decays, hp)
    for role_a, role_b in zip(state, singles):
        for i, (a, b) in enumerate(zip(role_a, role_b)):
            assert torch.equal(a, b), f"tensor {i} {shapes[i]}"


def test_lr_tensor_equals_lr_float():
    shapes = [(3,), (9, 17)]
    a_cfg, a, weights, decays = _setup(shapes)
    b = _clone(a)
    grads = _grads(shapes, torch.float32, 0)
    _cpu_step(a, grads, weights, decays, a_cfg.op_hyper(torch.tensor([0.3]), 0.0))
    _cpu_step(b, grads, weights, decays, a_cfg.op_hyper(0.3, 0.0))
    for ra, rb in zip(a, b):
        for x, y in zip(ra, rb):
            assert torch.equal(x, y)


def test_lr_tensor_against_reference():
    _run([(3,), (9, 17), ()], steps=2, lr=torch.tensor([0.3]), wd=0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_params(dtype):
    _run([(1,), (7, 1), (33, 65), (40000,)], steps=3, dtype=dtype)


@pytest.mark.parametrize("config", [
    MLPConfig(hidden_sizes=(8, 24), learn_decays=True),
    MLPConfig(hidden_sizes=(8,)),
    MLPConfig(hidden_sizes=(7, 5, 3)),
    MLPConfig(hidden_sizes=()),
    MLPConfig(hidden_sizes=(160, 33)),
    MLPConfig(features=FeatureConfig(momentum_decays=(0.9,), rms_decays=(),
                                     adafactor_decays=(), fac_momentum_decay=None,
                                     time_timescales=()), hidden_sizes=(4, 8)),
    MLPConfig(features=FeatureConfig(momentum_decays=(), rms_decays=(0.99,),
                                     adafactor_decays=(0.9, 0.99), fac_momentum_decay=None,
                                     time_timescales=(3.0,))),
    MLPConfig(features=FeatureConfig(momentum_decays=(), rms_decays=(), adafactor_decays=(),
                                     fac_momentum_decay=None, time_timescales=())),
    MLPConfig(features=FeatureConfig(momentum_decays=(0.5, 0.9), rms_decays=(0.9, 0.99),
                                     adafactor_decays=(0.9,), fac_momentum_decay=0.5,
                                     time_timescales=(1.0, 10.0), log_sign_k=3.0)),
], ids=["learn_decays_h8x24", "h8", "h7x5x3", "no_hidden", "h160x33", "minimal",
        "no_mom_F2", "g_p_only", "R2_F1_facmom0.5_k3"])
def test_other_configs(config):
    _run([(), (5,), (6, 9), (2, 3, 4)], steps=3, config=config)


def test_nonfinite_grad_skips_tensor():
    shapes = [(4,), (6, 9), (5, 3), (), (40000,)]

    def grads(s):
        gs = _grads(shapes, torch.float32, 20 + s)
        if s == 1:
            gs[1][2, 3] = float("nan")
            gs[2][4, 0] = float("inf")
            gs[3].fill_(float("-inf"))
            gs[4][39999] = float("nan")  # in the last chunk only
        return gs

    state, _ = _run(shapes, steps=3, grad_fn=grads)
    assert [s.item() for s in state[5]] == [3.0, 2.0, 2.0, 2.0, 2.0]


def test_nonfinite_grad_writes_nothing():
    shapes = [(3, 4), (5,), (), (20000,)]
    config, state, weights, decays = _setup(shapes)
    hp = config.op_hyper(1.0)
    _cpu_step(state, _grads(shapes, torch.float32, 0), weights, decays, hp)  # non-zero state
    before = _clone(state)
    grads = _grads(shapes, torch.float32, 1)
    grads[0][1, 2] = float("nan")
    grads[2] = torch.tensor(float("inf"))
    grads[3][0] = -float("inf")
    _cpu_step(state, grads, weights, decays, hp)
    for i in (0, 2, 3):
        for a, b in zip(state, before):
            assert torch.equal(a[i], b[i]), i
    assert not torch.equal(state[0][1], before[0][1]) and state[5][1].item() == 2.0


def test_empty_tensors_only_count_the_step():
    config, state, weights, decays = _setup([(0,), (2, 0), (0, 3)])
    _cpu_step(state, [torch.zeros(0), torch.zeros(2, 0), torch.zeros(0, 3)], weights, decays,
              config.op_hyper(1.0))
    assert [s.item() for s in state[5]] == [1.0, 1.0, 1.0]


def test_none_grad_in_direct_backend_call():
    from pyoptk.ops.mlp_update import _mlp_update_cpu

    config, state, weights, decays = _setup([(3,), (4, 5)])
    before = _clone(state)
    _mlp_update_cpu(state[0], [None, torch.randn(4, 5)], *state[1:], weights, decays,
                    config.op_hyper(1.0))
    for role_a, role_b in zip(state, before):
        assert torch.equal(role_a[0], role_b[0])
    assert state[5][1].item() == 1.0 and not torch.equal(state[0][1], before[0][1])


def _step_with_threads(threads):
    shapes = BIG_SHAPES + ODD_SHAPES
    config, state, weights, decays = _setup(shapes)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for s in range(2):
            _cpu_step(state, _grads(shapes, torch.float32, 30 + s), weights, decays,
                      config.op_hyper(0.5, 0.01))
    finally:
        torch.set_num_threads(prev)
    return state


def test_deterministic_across_thread_counts():
    """torch.set_num_threads sets the native loops' OpenMP threads; the fixed-order
    reductions make the result bit-identical for any count."""
    one = _step_with_threads(1)
    for threads in (2, 3):
        other = _step_with_threads(threads)
        for ra, rb in zip(one, other):
            for i, (x, y) in enumerate(zip(ra, rb)):
                assert torch.equal(x, y), f"threads={threads}: tensor {i}"


_ISA_SCRIPT = r"""
import sys, torch, pyoptk
sys.path.insert(0, sys.argv[2])
from test_native_mlp_update import _step_with_threads
torch.save(_step_with_threads(2), sys.argv[1])
"""


def test_every_isa_copy_bit_identical(tmp_path):
    """PYOPTK_CPU_ISA=baseline|avx2|avx512 selects the copy of the loops (see
    csrc/cpu/cpu_util.h; fmaf is a library call in the baseline copy): all do the same
    IEEE operations in the same order, so the results are bitwise equal."""
    out = {}
    here = os.path.dirname(os.path.abspath(__file__))
    for isa in ("baseline", "avx2", "avx512"):
        env = dict(os.environ, PYOPTK_CPU_ISA=isa)
        path = str(tmp_path / f"{isa}.pt")
        subprocess.run([sys.executable, "-c", _ISA_SCRIPT, path, here], check=True, env=env,
                       timeout=600)
        out[isa] = torch.load(path)
    for isa in ("avx2", "avx512"):
        for ra, rb in zip(out["baseline"], out[isa]):
            for i, (x, y) in enumerate(zip(ra, rb)):
                assert torch.equal(x, y), f"{isa}: tensor {i}"


def test_drift_1000_steps_against_float64_reference():
    """Identical gradient sequences fed for 1,000 steps to the native backend in fp32
    and to the reference in float64 (params move by ~0.6-0.8, 20-60% of their size).
    The total displacement p_1000 - p_0 of every tensor matches within DRIFT_RTOL = 3e-5
    of its largest element (measured 1.05e-5, equal to the fp32 reference's own drift:
    the fp32 rounding of p each step dominates); momenta, second moments and factored
    accumulators within DRIFT_STATE_RTOL = 1e-5 of their largest element (measured
    2e-6). Published CUDA learned optimizers drift by ~5e-2 here."""
    shapes = [(33, 65), (129,), (), (7, 1), (4, 3, 5)]
    config, state, weights, decays = _setup(shapes, out_scale=30.0)
    ref = [[t.double() for t in role] for role in state]
    w64 = [w.double() for w in weights]
    d64 = decays.double()
    p0 = [p.double().clone() for p in state[0]]
    hp = config.op_hyper(1.0, 0.01)
    gen = torch.Generator().manual_seed(123)
    # A per-tensor gradient scale spread over 4 decades and a slowly rotating mean, so
    # the normalizations and the factored statistics matter.
    scales = [10.0 ** (i - 2) for i in range(len(shapes))]
    for s in range(1000):
        grads = [(torch.randn(sh, generator=gen) + 0.5 * torch.cos(torch.tensor(s / 50.0))) * sc
                 for sh, sc in zip(shapes, scales)]
        _cpu_step(state, grads, weights, decays, hp)
        mlp_update_reference(ref[0], [g.double() for g in grads], *ref[1:], w64, d64, hp)
    worst = 0.0
    for i in range(len(shapes)):
        dk = state[0][i].double() - p0[i]
        dr = ref[0][i] - p0[i]
        scale = dr.abs().max().item()
        assert scale > 0.1, f"params[{i}] barely moved ({scale}): the test would be vacuous"
        worst = max(worst, (dk - dr).abs().max().item() / scale)
        assert_close(dk, dr, DRIFT_RTOL * scale, 0.0, f"drift of params[{i}] {shapes[i]}")
    for name, ka, ra in zip(("mom", "rms", "fac_row", "fac_col"), state[1:5], ref[1:5]):
        for i in range(len(shapes)):
            if ra[i].numel():
                assert_close(ka[i], ra[i], DRIFT_STATE_RTOL * ra[i].abs().max().item(), 0.0,
                             f"drift of {name}[{i}]")
    assert [s.item() for s in state[5]] == [1000.0] * len(shapes)
    print(f"worst relative drift after 1000 steps: {worst:.3g}")


# --------------------------------------------------------------------------------------
# pyoptk._C input checks: ValueError, never a crash.
# --------------------------------------------------------------------------------------
class TestNativeBadInput:
    def setup_method(self):
        self.config, self.state, self.weights, self.decays = _setup([(4,), (2, 3)])
        self.hp = self.config.op_hyper(1.0)

    def args(self, **over):
        s = self.state
        kw = dict(params=nc.ptrs(s[0]), grads=nc.ptrs([torch.ones_like(p) for p in s[0]]),
                  moms=nc.ptrs(s[1]), rmss=nc.ptrs(s[2]), fac_rows=nc.ptrs(s[3]),
                  fac_cols=nc.ptrs(s[4]), steps=nc.ptrs(s[5]), numels=[4, 6], rows=[0, 2],
                  cols=[0, 3], dtype=0, weights=nc.ptrs(self.weights),
                  widths=[39, 32, 32, 2], decays=self.decays.data_ptr(),
                  cfg=native().MLPUpdateConfig(
                      n_mom=5, n_rms=1, n_fac=3, fac_mom_index=3,
                      timescales=list(self.hp.timescales)))
        self._keep = kw["grads"]
        kw.update(over)
        return kw

    def test_valid_call_runs(self):
        before = self.state[0][0].clone()
        native().mlp_update_cpu(**self.args())
        assert not torch.equal(before, self.state[0][0])

    @pytest.mark.parametrize("over, match", [
        (dict(grads=[0]), "grads has 1 entries, expected 2"),
        (dict(params=[0, 0]), r"params\[0\] is a null pointer"),
        (dict(steps=[0, 0]), r"steps\[0\] is a null pointer"),
        (dict(numels=[4, -6]), r"numels\[1\] is negative"),
        (dict(rows=[0, 3]), r"rows\*cols = 3\*3 != numel 6"),
        (dict(dtype=7), "dtype must be 0"),
        (dict(weights=[0]), "even length"),
        (dict(widths=[39, 32, 2]), "widths must have one entry per layer"),
        (dict(widths=[38, 32, 32, 2]), r"widths\[0\] = 38 but the feature config has 39"),
        (dict(widths=[39, 32, 32, 3]), "must have 2 outputs"),
        (dict(decays=0), "decays is a null pointer"),
    ], ids=["len", "null_param", "null_step", "neg_numel", "rows_cols", "dtype", "weights",
            "widths_len", "widths_in", "widths_out", "decays"])
    def test_bad_call_raises_value_error(self, over, match):
        before = [t.clone() for t in self.state[0]]
        with pytest.raises(ValueError, match=match):
            native().mlp_update_cpu(**self.args(**over))
        assert all(torch.equal(a, b) for a, b in zip(before, self.state[0]))

    def test_bad_config_raises_value_error(self):
        with pytest.raises(ValueError, match="fac_mom_index"):
            native().mlp_update_cpu(**self.args(cfg=native().MLPUpdateConfig(
                n_mom=5, fac_mom_index=5, timescales=list(self.hp.timescales))))
        with pytest.raises(ValueError, match="num_threads"):
            native().mlp_update_cpu(**self.args(cfg=native().MLPUpdateConfig(
                fac_mom_index=3, timescales=list(self.hp.timescales), num_threads=-1)))

    def test_config_repr(self):
        assert "MLPUpdateConfig(n_mom=5" in repr(native().MLPUpdateConfig())


# --------------------------------------------------------------------------------------
# Triton backend registration and the fallback for configurations it declines.
# --------------------------------------------------------------------------------------
def test_triton_backend_registered_and_matches():
    config, state, weights, decays = _setup([(3,), (5, 7)])
    ref = _clone(state)
    grads = _grads([(3,), (5, 7)], torch.float32, 4)
    hp = config.op_hyper(0.7, 0.1)
    before = [p.clone() for p in state[0]]
    with pyoptk.use_backend("triton"):
        mlp_update_(state[0], grads, *state[1:], weights, decays, hp)
    mlp_update_reference(ref[0], grads, *ref[1:], weights, decays, hp)
    _compare(state, ref, before, "triton")


def test_declined_config_falls_back_to_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(_backend, "_warned", set())
    config, state, weights, decays = _setup([(3,), (4, 5)], config=MLPConfig(hidden_sizes=(8,)))
    ref = _clone(state)
    hp = config.op_hyper(0.7)
    grads = _grads([(3,), (4, 5)], torch.float32, 2)
    with pyoptk.use_backend("triton"):
        with pytest.warns(_backend.SlowPathWarning, match="hidden_sizes must have exactly 2"):
            mlp_update_(state[0], grads, *state[1:], weights, decays, hp)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            mlp_update_(state[0], grads, *state[1:], weights, decays, hp)  # warned once
    for _ in range(2):
        mlp_update_reference(ref[0], grads, *ref[1:], weights, decays, hp)
    for ra, rb in zip(state, ref):
        for x, y in zip(ra, rb):
            assert torch.equal(x, y)  # the reference ran


def test_cpu_decline_falls_back(monkeypatch):
    """Any NotImplementedError of a backend (raised before it touches a tensor) makes the
    op run the reference, with a SlowPathWarning naming the backend's reason."""
    from pyoptk.ops import mlp_update as mod

    def declines(*args, **kwargs):
        raise NotImplementedError("simulated: not supported")

    monkeypatch.setitem(_backend._registry[mod.OP], "cpu", declines)
    monkeypatch.setattr(_backend, "_warned", set())
    config, state, weights, decays = _setup([(3,)])
    ref = _clone(state)
    grads = _grads([(3,)], torch.float32, 2)
    with pytest.warns(_backend.SlowPathWarning, match="'cpu' backend does not support"):
        mlp_update_(state[0], grads, *state[1:], weights, decays, config.op_hyper(1.0))
    mlp_update_reference(ref[0], grads, *ref[1:], weights, decays, config.op_hyper(1.0))
    assert torch.equal(state[0][0], ref[0][0])



@pytest.mark.parametrize("backend", [b for b in ("cpu", "triton")
                                     if b in pyoptk.available_backends("cpu")])
def test_noncontiguous_weights_equal_contiguous(backend):
    """The public op takes the MLP weights in any layout (e.g. views of a transposed
    meta-parameter); every backend must read their values, not their storage order."""
    config, state, weights, decays = _setup([(5, 7), (3,)])
    views = [w.t().contiguous().t() if w.dim() == 2 else w for w in weights]
    assert any(not v.is_contiguous() for v in views)
    other = _clone(state)
    grads = _grads([(5, 7), (3,)], torch.float32, 4)
    hp = config.op_hyper(0.7, 0.1)
    with pyoptk.use_backend(backend):
        mlp_update_(state[0], grads, *state[1:], weights, decays, hp)
        mlp_update_(other[0], grads, *other[1:], views, decays, hp)
    for a, b in zip(state[0], other[0]):
        assert torch.equal(a, b)
