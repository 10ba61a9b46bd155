"""The Triton backward of ``pyoptk.ops.mlp_step`` (``kernels/mlp_step_grad.py``, the
``"triton"`` backend of ``mlp_step_backward``) against the native CPU backward and
autograd through the reference (``mlp_step_backward_reference``): odd shapes (0-dim,
one element, empty, non-multiples of the tile), ragged lists, lr as a tensor or a
float, with and without the factored-momentum features, many tiles per slot, a
non-finite gradient among finite ones, missing cotangents, bf16 params, the full
``torch.autograd.grad`` through the op with the backend forced, determinism and the
configurations it declines. Without CUDA these run in Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1) with "ieee" (fp32) dots and small rules;
the ``gpu`` tests compile the kernels."""

import importlib
import pathlib
import sys
import warnings

import pytest
import torch

pytest.importorskip("triton")

import pyoptk  # noqa: E402
from pyoptk import _backend  # noqa: E402
from pyoptk.learned import FeatureConfig, MLPConfig  # noqa: E402
from pyoptk.ops import mlp_step  # noqa: E402
from helpers import assert_close  # noqa: E402
from test_mlp_step import _grads, _op_step, make_case  # noqa: E402

try:  # editable install / wheel: the kernels ship as pyoptk.kernels
    from pyoptk.kernels import mlp_step_grad as K
    from pyoptk.kernels._multi_tensor import INTERPRETED
except ImportError:  # plain checkout on PYTHONPATH: the top-level ``kernels`` package
    _root = str(pathlib.Path(__file__).resolve().parents[1])
    if _root not in sys.path:
        sys.path.insert(0, _root)
    K = importlib.import_module("kernels.mlp_step_grad")
    INTERPRETED = importlib.import_module("kernels._multi_tensor").INTERPRETED

mstep = importlib.import_module("pyoptk.ops.mlp_step")

needs_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="CPU tensors run Triton kernels only under TRITON_INTERPRET=1")
needs_native = pytest.mark.skipif("cpu" not in pyoptk.available_backends("cpu"),
                                  reason="pyoptk._C not built")

ODD_SHAPES = [(7, 5), (3, 1), (1, 13), (5, 3, 4), (17,), (), (1,), (0,), (2, 0, 3)]
# Small rules keep the interpreter fast: K=2, R=1, F=2 (with fac_mom), T=2, (8, 8).
SMALL = MLPConfig(hidden_sizes=(8, 8), features=FeatureConfig(
    momentum_decays=(0.5, 0.9), rms_decays=(0.99,), adafactor_decays=(0.9, 0.99),
    time_timescales=(1.0, 10.0)))
NO_FAC_MOM = MLPConfig(hidden_sizes=(8, 16), features=FeatureConfig(
    momentum_decays=(0.5,), rms_decays=(0.9, 0.99), adafactor_decays=(0.9,),
    fac_momentum_decay=None, time_timescales=()))
MINIMAL = MLPConfig(hidden_sizes=(16, 16), features=FeatureConfig(
    momentum_decays=(), rms_decays=(), adafactor_decays=(), fac_momentum_decay=None,
    time_timescales=()))
# fp32 with "ieee" dots: the kernel differs from the native kernel and from autograd
# only in summation order (per-tile / per-slot fp32 partials against double partials or
# fp32 matmuls). Measured over CASES: at most 1.4e-6 of each gradient's largest element
# against either (1.0e-6 with several tiles per slot), allowed 1e-5; a sum over all
# elements that cancels (d_lr in the non-finite case: 13 finite elements) differs by up
# to 3.0e-5 of itself from the native kernel (2.3e-5 from autograd; the native
# kernel's own is 3.6e-6 from float64), allowed rtol 1e-4 (as the native kernel's test).
FP32_ATOL_SCALE, FP32_RTOL = 1e-5, 1e-4
# bf16 params: the gradients w.r.t. p and g are rounded to bf16 (as the reference's
# casts), the state's stay fp32: one bf16 ulp (2^-8 relative) on those two.
BF16_RTOL = 8e-3
# tf32 dots on a GPU (inputs rounded to 10 mantissa bits, fp32 accumulation): ~1e-3
# relative on everything that passes through the MLP (not measured: no GPU here).
TF32_ATOL_SCALE = 3e-2


def _cotangents(inputs, seed=3, dtype=None):
    gen = torch.Generator().manual_seed(seed)
    refs = (inputs[0], inputs[2], inputs[3], inputs[4], inputs[5])
    return [[torch.randn(t.shape, generator=gen).to(dtype or t.dtype).to(t.device) for t in lst]
            for lst in refs]


def _flat(res):
    d_in, d_w, d_dec, d_lr = res
    out = [g for lst in d_in for g in lst] + list(d_w) + [d_dec]
    return out + ([d_lr] if d_lr is not None else [])


def _compare(got, want, what, atol_scale=FP32_ATOL_SCALE, rtol=FP32_RTOL):
    """Every gradient within ``atol_scale`` of its largest element plus ``rtol``;
    returns the worst error relative to the largest element (for the record)."""
    got, want = _flat(got), _flat(want)
    assert len(got) == len(want)
    worst = 0.0
    for i, (a, e) in enumerate(zip(got, want)):
        assert a.shape == e.shape and a.dtype == e.dtype, (what, i, a.shape, e.shape, a.dtype)
        assert torch.isfinite(a).all(), f"{what}[{i}] not finite"
        scale = e.abs().max().item() if e.numel() else 0.0
        assert_close(a, e, atol=atol_scale * scale + 1e-30, rtol=rtol, what=f"{what}[{i}]")
        if scale:
            worst = max(worst, (a.double() - e.double()).abs().max().item() / scale)
    return worst


def _triton(inputs, weights, decays, hp, cts, **kw):
    kw.setdefault("precision", "ieee")
    return K.mlp_step_backward(inputs, cts, weights, decays, hp, **kw)


# ---- against the native kernel and the reference --------------------------------------
CASES = {
    "odd_shapes-lr_tensor": (SMALL, ODD_SHAPES, True, {}),
    "odd_shapes-lr_float-no_fac_mom-no_time": (NO_FAC_MOM, ODD_SHAPES, False, {}),
    "ragged-many_tiles-few_slots": (SMALL, [(33, 17), (70,), (2, 3)], True,
                                    {"tile": (4, 4), "slots": 5}),
    "default_features": (MLPConfig(hidden_sizes=(16, 16)), [(6, 9), (11,), ()], True, {}),
    "learned_decays": (MLPConfig(hidden_sizes=(8, 8), learn_decays=True), [(5, 4), (9,)],
                       True, {}),
    "no_mom_rms_fac_time": (MINIMAL, [(9, 7), (11,)], True, {}),
    "only_vectors": (SMALL, [(17,), ()], True, {}),
    # no tiles at all: only the factored cotangents pass through
    "only_empty": (SMALL, [(0,), (2, 0, 3), (3, 0)], False, {}),
}


@needs_interpreter
@needs_native
@pytest.mark.parametrize("case", list(CASES))
def test_matches_native_and_reference(case, monkeypatch):
    config, shapes, lr_tensor, kw = CASES[case]
    if "slots" in kw:  # several tiles per slot: the loop-carried weight gradients
        monkeypatch.setattr(K, "MAX_SLOTS", kw.pop("slots"))
    inputs, weights, decays, hp = make_case(shapes, dtype=torch.float32, config=config,
                                            lr_tensor=lr_tensor)
    cts = _cotangents(inputs)
    got = _triton(inputs, weights, decays, hp, cts, **kw)
    assert (got[3] is None) == (not lr_tensor)
    _compare(got, mstep._mlp_step_backward_cpu(inputs, weights, decays, hp, cts), "vs native")
    _compare(got, mstep.mlp_step_backward_reference(inputs, weights, decays, hp, cts),
             "vs reference")


@needs_interpreter
def test_nonfinite_gradient_passes_cotangents_through():
    shapes = [(6, 5), (7,), (4, 3), ()]
    inputs, weights, decays, hp = make_case(shapes, dtype=torch.float32, config=SMALL)
    inputs[1][0].view(-1)[3] = float("nan")
    inputs[1][1][2] = float("inf")
    cts = _cotangents(inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's numpy on NaN
        got = _triton(inputs, weights, decays, hp, cts)
    d_in = got[0]
    for i in (0, 1):  # skipped: identity for p and the state, zero for g
        assert torch.equal(d_in[0][i], cts[0][i])
        assert torch.equal(d_in[1][i], torch.zeros_like(d_in[1][i]))
        for k, ct in zip((2, 3, 4, 5), cts[1:]):
            assert torch.equal(d_in[k][i], ct[i]), f"d_inputs[{k}][{i}]"
    _compare(got, mstep.mlp_step_backward_reference(inputs, weights, decays, hp, cts),
             "vs reference")


@needs_interpreter
def test_missing_cotangents_are_zeros():
    """None entries (the eager path's unused outputs): a whole role, single tensors."""
    inputs, weights, decays, hp = make_case(ODD_SHAPES[:6], dtype=torch.float32, config=SMALL)
    cts = _cotangents(inputs)
    cts[1] = [None] * len(cts[1])  # no moms cotangent at all
    cts[0][1] = cts[3][0] = cts[4][2] = None
    full = [[torch.zeros_like(r) if c is None else c for c, r in zip(lst, refs)]
            for lst, refs in zip(cts, (inputs[0], inputs[2], inputs[3], inputs[4], inputs[5]))]
    got = _triton(inputs, weights, decays, hp, cts)
    _compare(got, mstep.mlp_step_backward_reference(inputs, weights, decays, hp, full),
             "vs reference")


@needs_interpreter
@needs_native
def test_bf16_params():
    inputs, weights, decays, hp = make_case([(7, 5), (17,)], dtype=torch.bfloat16,
                                            config=SMALL)
    cts = _cotangents(inputs)
    got = _triton(inputs, weights, decays, hp, cts)
    want = mstep._mlp_step_backward_cpu(inputs, weights, decays, hp, cts)
    for k in (0, 1):  # p and g: rounded to bf16 once (from nearly equal fp32 values)
        for a, e in zip(got[0][k], want[0][k]):
            assert a.dtype == torch.bfloat16
            assert_close(a, e, atol=1e-30, rtol=BF16_RTOL, what=f"bf16 d_inputs[{k}]")
    _compare(([[]] * 2 + list(got[0][2:]), *got[1:]),
             ([[]] * 2 + list(want[0][2:]), *want[1:]), "bf16 state/weights")


@needs_interpreter
def test_deterministic():
    inputs, weights, decays, hp = make_case([(17, 9), (40,)], dtype=torch.float32, config=SMALL)
    cts = _cotangents(inputs)
    a = _flat(_triton(inputs, weights, decays, hp, cts, tile=(4, 4)))
    K.clear_cache()
    b = _flat(_triton(inputs, weights, decays, hp, cts, tile=(4, 4)))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ---- through the op ------------------------------------------------------------------------
@pytest.fixture
def triton_calls(monkeypatch):
    """Counts calls of the Triton backward (so a test can prove it ran)."""
    calls = []
    real = K.mlp_step_backward
    monkeypatch.setattr(K, "mlp_step_backward", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    return calls


@needs_interpreter
@needs_native
def test_autograd_through_mlp_step_with_triton_forced(triton_calls):
    """torch.autograd.grad through pyoptk.ops.mlp_step (every input a leaf: params,
    grads, state, weights, decays, lr) with the triton backend forced equals the native
    backward's (the forward is then Triton's too), on the eager fast path and through
    torch.ops.pyoptk.mlp_step alike (bit for bit the same there)."""
    inputs, weights, decays, hp = make_case([(7, 5), (17,), (), (2, 0, 3)],
                                            dtype=torch.float32, config=SMALL)
    native = _grads(inputs, weights, decays, hp, mlp_step)
    assert not triton_calls
    got = {}
    with pyoptk.use_backend("triton"):
        assert mstep.backward_backend(inputs, weights, hp) == "triton"
        for path, step_fn in (("eager", mlp_step), ("op", _op_step)):
            got[path] = _grads(inputs, weights, decays, hp, step_fn)
    assert len(triton_calls) == 2
    for i, (a, b, e) in enumerate(zip(got["eager"], got["op"], native)):
        assert torch.equal(a, b), f"grad[{i}]: eager and op paths differ"
        scale = e.abs().max().item() if e.numel() else 0.0
        assert_close(a, e, atol=FP32_ATOL_SCALE * scale + 1e-30, rtol=FP32_RTOL,
                     what=f"grad[{i}]")


def test_auto_keeps_the_native_backward_on_cpu():
    inputs, weights, decays, hp = make_case([(3, 4)], dtype=torch.float32, config=SMALL)
    expected = "cpu" if "cpu" in pyoptk.available_backends("cpu") else "torch"
    assert mstep.backward_backend(inputs, weights, hp) == expected
    assert "triton" in _backend.registered_backends(mstep.BACKWARD_OP)


@pytest.mark.parametrize("hidden, field", [((8,), "hidden_sizes"), ((8, 8, 8), "hidden_sizes"),
                                           ((8, 256), r"hidden_sizes\[1\]")])
def test_declines_what_the_forward_declines(hidden, field, monkeypatch):
    cfg = MLPConfig(hidden_sizes=hidden, features=SMALL.features)
    inputs, weights, decays, hp = make_case([(3, 2)], dtype=torch.float32, config=cfg)
    with pytest.raises(NotImplementedError, match=f"mlp_step_backward: {field}"):
        K.mlp_step_backward(inputs, _cotangents(inputs), weights, decays, hp)
    assert mstep.triton_decline_reason(inputs[0], weights, hp) is not None
    if INTERPRETED:  # forced: the declined call runs autograd over the reference, warned
        monkeypatch.setattr(_backend, "_warned", set())
        with pyoptk.use_backend("triton"), pytest.warns(pyoptk.SlowPathWarning,
                                                        match="Triton backward"):
            assert mstep.backward_backend(inputs, weights, hp) == "torch"


def test_bad_precision_and_tile():
    inputs, weights, decays, hp = make_case([(3,)], dtype=torch.float32, config=SMALL)
    with pytest.raises(ValueError, match="precision"):
        K.mlp_step_backward(inputs, _cotangents(inputs), weights, decays, hp, precision="fp8")
    with pytest.raises(ValueError, match="tile"):
        K.mlp_step_backward(inputs, _cotangents(inputs), weights, decays, hp, tile=(3, 8))


# ---- compiled, on a GPU ----------------------------------------------------------------------
GPU_SHAPES = ODD_SHAPES + [(300, 257), (4099,), (3, 3, 64, 64), (1, 5000), (5000, 1)]


def _cuda_case(shapes, dtype, config=None):
    inputs, weights, decays, hp = make_case(shapes, dtype=dtype, config=config)
    dev = torch.device("cuda")
    to = lambda t: t.to(dev)  # noqa: E731
    inputs = [[to(t) for t in lst] for lst in inputs]
    return inputs, [to(w) for w in weights], to(decays), mstep._replace_lr(hp, to(hp.lr_t))


@pytest.mark.gpu
@pytest.mark.parametrize("precision, atol_scale", [("ieee", FP32_ATOL_SCALE),
                                                   ("tf32", TF32_ATOL_SCALE)])
def test_gpu_compiled_against_reference(precision, atol_scale):
    inputs, weights, decays, hp = _cuda_case(GPU_SHAPES, torch.float32)
    cts = _cotangents(inputs)
    got = _triton(inputs, weights, decays, hp, cts, precision=precision,
                  tile=(K.TILE_ROWS, K.TILE_COLS))
    want = mstep.mlp_step_backward_reference(inputs, weights, decays, hp, cts)
    _compare(got, want, f"cuda {precision}", atol_scale, max(atol_scale, FP32_RTOL))


@pytest.mark.gpu
def test_gpu_one_tensor_one_tile():
    """Counts of 1 (tensors, tiles, slots, reduced rows): Triton would specialize such
    int arguments as constexprs; the kernels take them unspecialized."""
    inputs, weights, decays, hp = _cuda_case([(3,)], torch.float32,
                                             config=MLPConfig(hidden_sizes=(8, 8), features=
                                                              MINIMAL.features))
    cts = _cotangents(inputs)
    got = _triton(inputs, weights, decays, hp, cts)
    _compare(got, mstep.mlp_step_backward_reference(inputs, weights, decays, hp, cts),
             "cuda one tile")


@pytest.mark.gpu
def test_gpu_bf16_params():
    inputs, weights, decays, hp = _cuda_case([(33, 65), (257,), ()], torch.bfloat16)
    cts = _cotangents(inputs)
    got = _triton(inputs, weights, decays, hp, cts, precision=None)  # the default: tf32
    want = mstep.mlp_step_backward_reference(inputs, weights, decays, hp, cts)
    for k in (0, 1):
        for a, e in zip(got[0][k], want[0][k]):
            scale = e.float().abs().max().item() if e.numel() else 0.0
            assert_close(a, e, atol=TF32_ATOL_SCALE * scale + 1e-30, rtol=BF16_RTOL,
                         what=f"bf16 d_inputs[{k}]")
    _compare(([[]] * 2 + list(got[0][2:]), *got[1:]),
             ([[]] * 2 + list(want[0][2:]), *want[1:]), "bf16 state/weights", TF32_ATOL_SCALE,
             TF32_ATOL_SCALE)


@pytest.mark.gpu
def test_gpu_auto_runs_the_triton_backward(triton_calls):
    """On CUDA, auto picks the Triton backward (no slow-path warning) and the full
    autograd.grad through the op matches autograd through the reference."""
    from pyoptk.ops.mlp_update import mlp_update_functional

    inputs, weights, decays, hp = _cuda_case([(33, 65), (257,), (2, 0, 3)], torch.float32)
    assert mstep.backward_backend(inputs, weights, hp) == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error", pyoptk.SlowPathWarning)
        got = _grads(inputs, weights, decays, hp, mlp_step)
    assert triton_calls
    want = _grads(inputs, weights, decays, hp, mlp_update_functional)
    for i, (a, e) in enumerate(zip(got, want)):
        scale = e.abs().max().item() if e.numel() else 0.0
        assert_close(a, e, atol=TF32_ATOL_SCALE * scale + 1e-30, rtol=TF32_ATOL_SCALE,
                     what=f"grad[{i}]")
