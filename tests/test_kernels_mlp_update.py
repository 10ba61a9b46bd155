"""pyoptk.kernels.mlp_update (the fused Triton learned-MLP step) against the op's
reference ``mlp_update_reference``: odd shapes and ragged lists, several steps, small
tiles (many tiles per tensor), lr as a tensor, low-precision params, non-finite
gradients, ``None`` gradients, feature configs without momentum/RMS/factored/time
features, and the configurations it declines. Without CUDA these run in Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1) with "ieee" (fp32) dots; the
``gpu`` test compiles the kernel and uses tf32 tensor cores."""

import importlib
import pathlib
import sys

import pytest
import torch

from pyoptk.learned import FeatureConfig, MLPConfig
from pyoptk.ops.mlp_update import mlp_update_reference
from helpers import STEP_TOL, assert_close
from helpers import clone_lists as _clone, mlp_setup as _setup, random_grads as _grads

try:  # editable install / wheel: the kernels ship as pyoptk.kernels
    from pyoptk.kernels import mlp_update as K
except ImportError:  # plain checkout on PYTHONPATH: the top-level ``kernels`` package
    _root = str(pathlib.Path(__file__).resolve().parents[1])
    if _root not in sys.path:
        sys.path.insert(0, _root)
    K = importlib.import_module("kernels.mlp_update")

ODD_SHAPES = [(), (1,), (0,), (3,), (1, 7), (7, 1), (5, 13, 7), (33, 65), (2, 0, 3)]
# Larger tiles than the GPU default: the interpreter's cost is per program, not per lane.
TEST_TILE = (16, 32)
# fp32 with "ieee" dots: the kernel differs from the reference only in summation order
# (tile partials, the folded time bias) and approximate rsqrt/log/exp: compare the
# *update* p_new − p_old relative to its largest element (plus the fp32 rounding of p),
# and the state elementwise.
DELTA_RTOL = 1e-5
STATE_TOL = (1e-7, 1e-5)
# tf32 dots (10-bit mantissa inputs, fp32 accumulation) on a GPU: the MLP outputs carry
# ~1e-3 relative error, so the update does too; the state does not go through the MLP.
TF32_DELTA_RTOL = 2e-2








def _compare(kst, rst, before, what, delta_rtol=DELTA_RTOL, dtype=torch.float32):
    kp, rp = kst[0], rst[0]
    for i in range(len(kp)):
        if dtype == torch.float32:
            dk = kp[i].double() - before[i].double()
            dr = rp[i].double() - before[i].double()
            scale = dr.abs().max().item() if dr.numel() else 0.0
            # + 2 ulp of p: the stored parameter is rounded to fp32 once.
            ulp = 2.4e-7 * (before[i].abs().max().item() if dr.numel() else 0.0)
            assert_close(dk, dr, delta_rtol * scale + ulp, 0.0,
                         f"{what}: update of params[{i}] {tuple(kp[i].shape)}")
        else:
            atol, rtol = STEP_TOL[dtype]
            assert_close(kp[i], rp[i], atol, rtol, f"{what}: params[{i}] {tuple(kp[i].shape)}")
    for name, ka, ra in zip(("mom", "rms", "fac_row", "fac_col"), kst[1:5], rst[1:5]):
        for i in range(len(ka)):
            assert_close(ka[i], ra[i], *STATE_TOL, f"{what}: {name}[{i}] {tuple(ka[i].shape)}")
    for i, (a, b) in enumerate(zip(kst[5], rst[5])):
        assert a.item() == b.item(), f"{what}: steps[{i}] {a.item()} != {b.item()}"


def _run(shapes, steps=3, dtype=torch.float32, config=None, lr=0.7, wd=0.1, tile=TEST_TILE,
         precision="ieee", device="cpu", delta_rtol=DELTA_RTOL, grad_fn=None):
    config, state, weights, decays = _setup(shapes, dtype, config)
    state = [[t.to(device) for t in role] for role in state]
    weights = [w.to(device) for w in weights]
    decays = decays.to(device)
    ref = _clone(state)
    lr_arg = lr if not isinstance(lr, torch.Tensor) else lr.to(device)
    hp = config.op_hyper(lr_arg, wd)
    for s in range(steps):
        grads = [g.to(device) for g in (grad_fn(s) if grad_fn else _grads(shapes, dtype, 10 + s))]
        before = [p.clone() for p in state[0]]
        K.mlp_update_(state[0], grads, *state[1:], weights, decays, hp, precision=precision,
                      tile=tile)
        mlp_update_reference(ref[0], grads, *ref[1:], weights, decays, hp)
        _compare(state, ref, before, f"step {s}", delta_rtol, dtype)
        if dtype != torch.float32:
            # One rounding of p may flip a bf16/fp16 ulp near a tie; later steps would
            # compound it. Restart every step from the reference's state.
            for dst, src in zip(state, ref):
                for d, r in zip(dst, src):
                    d.copy_(r)
    return state, ref


def test_matches_reference_odd_shapes():
    state, _ = _run(ODD_SHAPES, steps=3)
    assert [s.item() for s in state[5]] == [3.0] * len(ODD_SHAPES)


def test_small_tiles_many_per_tensor():
    # 4x8 tiles: (33, 65) has 9x9 tiles, so row/column partials cross many tiles.
    _run([(33, 65), (5, 13, 7), (100,)], steps=2, tile=(4, 8))


def test_lr_tensor_and_no_weight_decay():
    _run([(3,), (9, 17)], steps=2, lr=torch.tensor([0.3]), wd=0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_params(dtype):
    _run([(1,), (7, 1), (33, 65)], steps=2, dtype=dtype)


@pytest.mark.parametrize("config", [
    MLPConfig(hidden_sizes=(8, 24), learn_decays=True),
    MLPConfig(features=FeatureConfig(momentum_decays=(0.9,), rms_decays=(),
                                     adafactor_decays=(), fac_momentum_decay=None,
                                     time_timescales=()), hidden_sizes=(4, 8)),
    MLPConfig(features=FeatureConfig(momentum_decays=(0.5, 0.9), rms_decays=(0.9, 0.99),
                                     adafactor_decays=(0.9,), fac_momentum_decay=None,
                                     time_timescales=(1.0, 10.0))),
], ids=["learn_decays_h8x24", "minimal", "R2_F1_nofacmom"])
def test_other_feature_configs(config):
    _run([(), (5,), (6, 9)], steps=2, config=config)


def test_nonfinite_grad_skips_tensor():
    shapes = [(4,), (6, 9), (5, 3), ()]

    def grads(s):
        gs = _grads(shapes, torch.float32, 20 + s)
        if s == 1:
            gs[1][2, 3] = float("nan")
            gs[2][4, 0] = float("inf")
            gs[3].fill_(float("-inf"))
        return gs

    state, _ = _run(shapes, steps=3, grad_fn=grads)
    assert [s.item() for s in state[5]] == [3.0, 2.0, 2.0, 2.0]


def test_none_grad_leaves_tensor_untouched():
    config, state, weights, decays = _setup([(3,), (4, 5)])
    before = _clone(state)
    grads = [None, torch.randn(4, 5)]
    K.mlp_update_(state[0], grads, *state[1:], weights, decays, config.op_hyper(1.0),
                  precision="ieee", tile=TEST_TILE)
    for role_a, role_b in zip(state, before):
        assert torch.equal(role_a[0], role_b[0])
    assert state[5][1].item() == 1.0 and not torch.equal(state[0][1], before[0][1])


def test_only_empty_tensors_count_the_step():
    config, state, weights, decays = _setup([(0,), (2, 0)])
    K.mlp_update_(state[0], [torch.zeros(0), torch.zeros(2, 0)], *state[1:], weights, decays,
                  config.op_hyper(1.0), precision="ieee")
    assert [s.item() for s in state[5]] == [1.0, 1.0]


def test_deterministic():
    a, _ = _run([(17, 33), (7,)], steps=1, tile=(4, 8))
    b, _ = _run([(17, 33), (7,)], steps=1, tile=(4, 8))
    for ra, rb in zip(a, b):
        for x, y in zip(ra, rb):
            assert torch.equal(x, y)


@pytest.mark.parametrize("hidden, field", [((8,), "hidden_sizes"), ((8, 8, 8), "hidden_sizes"),
                                           ((256, 8), "hidden_sizes[0]")])
def test_unsupported_configs_raise_not_implemented(hidden, field):
    config, state, weights, decays = _setup([(3,)], config=MLPConfig(hidden_sizes=hidden))
    p0 = state[0][0].clone()
    with pytest.raises(NotImplementedError, match=field.replace("[", r"\[")):
        K.mlp_update_(state[0], [torch.ones(3)], *state[1:], weights, decays,
                      config.op_hyper(1.0))
    assert torch.equal(state[0][0], p0) and state[5][0].item() == 0.0


def test_bad_precision_and_tile():
    config, state, weights, decays = _setup([(3,)])
    with pytest.raises(ValueError, match="precision"):
        K.mlp_update_(state[0], [torch.ones(3)], *state[1:], weights, decays,
                      config.op_hyper(1.0), precision="fp8")
    with pytest.raises(ValueError, match="tile"):
        K.mlp_update_(state[0], [torch.ones(3)], *state[1:], weights, decays,
                      config.op_hyper(1.0), tile=(3, 8))


@pytest.mark.gpu
@pytest.mark.parametrize("precision, rtol", [("tf32", TF32_DELTA_RTOL), ("ieee", 1e-4)])
def test_gpu_compiled(precision, rtol):
    # Compiled kernels, default tile; tf32 dots: the update within 2e-2 of the largest
    # reference update element (measured ~1e-3 expected), the state as in fp32.
    shapes = ODD_SHAPES + [(300, 257), (4099,), (3, 3, 64, 64)]
    _run(shapes, steps=3, precision=precision, device="cuda", tile=(K.TILE_ROWS, K.TILE_COLS),
         delta_rtol=rtol)
