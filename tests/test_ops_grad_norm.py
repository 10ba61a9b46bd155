"""Fused gradient norm / clipping and gradient centralization vs torch."""

import math

import pytest
import torch

import pyoptk
from pyoptk.ops import centralize_gradients_, clip_grad_norm_, grad_norm
from helpers import assert_close

FUSED = ["cpu", "triton"]
SHAPES = [(), (0,), (1,), (3,), (1025,), (5, 123, 7), (33, 65)]
SMALL_SHAPES = [(), (0,), (1,), (3,), (1025,), (7, 13)]


def params_with_grads(shapes, scale=1.0, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    ps = []
    for s in shapes:
        p = torch.zeros(s, dtype=dtype, requires_grad=True)
        p.grad = (torch.randn(s, generator=gen) * scale).to(dtype)
        ps.append(p)
    return ps


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "inf"])
@pytest.mark.parametrize("scale", [0.01, 10.0], ids=["no_clip", "clip"])
def test_clip_matches_torch(backend, norm_type, scale):
    shapes = SMALL_SHAPES if backend == "triton" else SHAPES
    ours = params_with_grads(shapes, scale)
    theirs = params_with_grads(shapes, scale)
    with pyoptk.use_backend(backend):
        total = clip_grad_norm_(ours, max_norm=1.0, norm_type=norm_type)
    # torch refuses the inf-norm of an empty tensor; ours counts it as 0 (documented).
    expected = torch.nn.utils.clip_grad_norm_([p for p in theirs if p.numel()], max_norm=1.0,
                                              norm_type=norm_type)
    assert total.dtype == torch.float32 and total.dim() == 0
    assert_close(total, expected, 1e-6, 1e-5, what="total norm")
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_close(a.grad, b.grad, 1e-7, 1e-5, what=f"grad[{i}]")


@pytest.mark.parametrize("backend", FUSED)
def test_grad_norm_does_not_modify(backend):
    ps = params_with_grads([(10,), (3, 3)], 5.0)
    before = [p.grad.clone() for p in ps]
    with pyoptk.use_backend(backend):
        total = grad_norm(ps)
    expected = torch.linalg.vector_norm(torch.cat([b.flatten() for b in before]))
    assert_close(total, expected, 1e-6, 1e-6, what="grad norm")
    assert all(torch.equal(p.grad, b) for p, b in zip(ps, before))


def test_mixed_dtypes_are_grouped():
    ps = params_with_grads([(100,)], 3.0) + params_with_grads([(50,)], 3.0, seed=1,
                                                                dtype=torch.bfloat16)
    ref = [p.grad.float().clone() for p in ps]
    total = clip_grad_norm_(ps, max_norm=1.0)
    expected = torch.linalg.vector_norm(torch.cat([r.flatten() for r in ref]))
    assert_close(total, expected, 1e-4, 1e-4, what="mixed total")
    coef = 1.0 / (expected + 1e-6)
    assert_close(ps[0].grad, ref[0] * coef, 1e-6, 1e-5, what="fp32 grad")
    assert_close(ps[1].grad.float(), ref[1] * coef, 1e-2, 1e-2, what="bf16 grad")


def test_nonfinite():
    ps = params_with_grads([(4,), (4,)])
    ps[1].grad[0] = float("nan")
    before = [p.grad.clone() for p in ps]
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_(ps, 1.0, error_if_nonfinite=True)
    assert torch.equal(ps[0].grad, before[0]), "an error must leave the grads untouched"
    total = clip_grad_norm_(ps, 1.0)  # like torch: NaN total, NaN grads
    assert torch.isnan(total) and torch.isnan(ps[0].grad).all()


def test_params_without_grad_and_empty():
    p = torch.zeros(3, requires_grad=True)
    assert clip_grad_norm_([p], 1.0).item() == 0.0
    assert clip_grad_norm_([], 1.0).item() == 0.0


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(norm_type=1.0), ValueError, "norm_type must be 2.0 or inf"),
    (dict(max_norm=-1.0), ValueError, "max_norm must be a non-negative float"),
])
def test_bad_input(kw, exc, msg):
    ps = params_with_grads([(4,)])
    args = dict(max_norm=1.0)
    args.update(kw)
    with pytest.raises(exc, match=msg):
        clip_grad_norm_(ps, **args)


def test_opcheck():
    grads = [torch.randn(3, 4), torch.randn(5)]
    torch.library.opcheck(torch.ops.pyoptk.clip_grad_norm_.default, (grads, 1.0, 2.0))
    torch.library.opcheck(torch.ops.pyoptk.grad_norm.default, (grads, 2.0))
    torch.library.opcheck(torch.ops.pyoptk.centralize_gradients_.default, (grads,))


@pytest.mark.parametrize("backend", FUSED)
def test_centralize_matches_reference(backend):
    shapes = [(3,), (), (0, 4), (5, 123, 7), (33, 65), (1, 1), (7, 1)]
    if backend == "triton":
        shapes = [(3,), (), (0, 4), (5, 6, 7), (9, 65), (1, 1), (7, 1)]
    gen = torch.Generator().manual_seed(7)
    grads = [torch.randn(s, generator=gen) * 3 + 1 for s in shapes]
    expected = []
    for g in grads:
        if g.dim() > 1:
            e = g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True)
        else:
            e = g.clone()
        expected.append(e)
    with pyoptk.use_backend(backend):
        centralize_gradients_(grads)
    for i, (a, e) in enumerate(zip(grads, expected)):
        # The mean is ~1 ulp of max|g| off in either order: scale atol with the data.
        scale = float(e.abs().max()) if e.numel() else 1.0
        assert_close(a, e, 4e-7 * max(scale, 1.0), 1e-5, what=f"centralized[{i}]")
    assert torch.equal(grads[0], expected[0]), "1-dim grads are not centralized"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_clip_and_centralize(backend):
    shapes = SHAPES + [(50257, 768)]
    ours = params_with_grads(shapes, 10.0)
    theirs = params_with_grads(shapes, 10.0)
    for p in ours + theirs:
        p.data = p.data.cuda()
        p.grad = p.grad.cuda()
    with pyoptk.use_backend(backend):
        total = clip_grad_norm_(ours, 1.0)
        centralize_gradients_([p.grad for p in ours])
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert_close(total, expected, 1e-5, 1e-5, what="total")
    for a, b in zip(ours, theirs):
        g = b.grad
        if g.dim() > 1:
            g = g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True)
        assert_close(a.grad, g, 1e-6, 1e-4, what="clip+centralize")
