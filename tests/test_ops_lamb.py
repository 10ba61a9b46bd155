"""torch.ops.pyoptk.lamb_: every CPU backend against the reference."""

import math

import pytest
import torch

import pyoptk
from pyoptk.ops import lamb_
from helpers import STEP_TOL, assert_close

FUSED = ["cpu", "triton"]
SHAPES = [(), (0,), (1,), (3,), (1025,), (5, 123, 7), (33, 65)]
SMALL_SHAPES = [(), (0,), (1,), (3,), (1025,), (7, 13)]


def make_state(shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "params": [torch.randn(s, generator=g).to(dtype) for s in shapes],
        "exp_avgs": [torch.zeros(s) for s in shapes],
        "exp_avg_sqs": [torch.zeros(s) for s in shapes],
        "steps": [torch.zeros(()) for _ in shapes],
    }


def clone_state(st):
    return {k: [t.clone() for t in v] for k, v in st.items()}


def run(backend, st, grads, **hp):
    with pyoptk.use_backend(backend):
        lamb_(st["params"], grads, st["exp_avgs"], st["exp_avg_sqs"], st["steps"], **hp)


VARIANTS = {
    "default": dict(weight_decay=0.01),
    "no_bias_correction": dict(bias_correction=False, weight_decay=0.1),
    "adam_mode": dict(adam=True, weight_decay=0.01),
    "tight_clamp": dict(clamp_value=0.5),
    "no_clamp_maximize": dict(clamp_value=math.inf, maximize=True),
}


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_reference(backend, variant):
    shapes = SMALL_SHAPES if backend == "triton" else SHAPES
    steps = 20 if backend == "triton" else 100
    fused = make_state(shapes)
    ref = clone_state(fused)
    gen = torch.Generator().manual_seed(1)
    hp = dict(lr=1e-2, betas=(0.9, 0.99), **VARIANTS[variant])
    for _ in range(steps):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        run(backend, fused, grads, **hp)
        run("torch", ref, grads, **hp)
    for key in fused:
        for i, (a, e) in enumerate(zip(fused[key], ref[key])):
            # Per-tensor norms are reduced in a different order: a few ulps of the norm.
            assert_close(a, e, atol=1e-6, rtol=2e-5, what=f"{backend} {key}[{i}]")


def test_reference_matches_pytorch_optimizer_lamb():
    """Independent implementation: pytorch-optimizer's Lamb with decay inside the trust
    ratio. It uses raw moments but a step size of lr / (1 - beta1^t): ours without
    bias correction and that lr (a tensor, changed each step) is the same update. It
    adds eps to the ratio's denominator (eps=1e-6 vs norms of O(1..100)), a relative
    difference of ~1e-7 per step."""
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    shapes = [(5, 123, 7), (33,), (4, 4)]
    st = make_state(shapes)
    theirs = [p.clone().requires_grad_() for p in st["params"]]
    opt = pytorch_optimizer.Lamb(theirs, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1,
                                 weight_decouple=False, max_grad_norm=0.0, eps=1e-6)
    gen = torch.Generator().manual_seed(5)
    for t in range(1, 51):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        opt.step()
        run("cpu", st, grads, lr=torch.tensor(1e-2 / (1 - 0.9 ** t)), betas=(0.9, 0.99),
            weight_decay=0.1, bias_correction=False, eps=1e-6)
    for a, e in zip(st["params"], theirs):
        assert_close(a, e, atol=1e-5, rtol=1e-4, what="vs pytorch_optimizer.Lamb")


def test_trust_ratio_by_hand():
    """One step on one tensor, every quantity computed by hand."""
    p0 = torch.tensor([3.0, 4.0])  # ||p|| = 5
    g = torch.tensor([1.0, -2.0])
    st = {"params": [p0.clone()], "exp_avgs": [torch.zeros(2)],
          "exp_avg_sqs": [torch.zeros(2)], "steps": [torch.zeros(())]}
    run("cpu", st, [g], lr=0.1, betas=(0.9, 0.999), eps=0.0, weight_decay=0.5,
        clamp_value=10.0)
    # Bias-corrected m/sqrt(v) after one step is sign(g); u = sign(g) + 0.5 p.
    u = torch.tensor([1.0, -1.0]) + 0.5 * p0
    r = 5.0 / u.norm()
    assert_close(st["params"][0], p0 - 0.1 * r * u, 1e-6, 1e-6, what="hand LAMB")


@pytest.mark.parametrize("backend", ["cpu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_params(backend, dtype):
    shapes = [(1,), (1025,), (5, 123, 7)]
    fused = make_state(shapes, dtype=dtype)
    ref = clone_state(fused)
    atol, rtol = STEP_TOL[dtype]
    gen = torch.Generator().manual_seed(6)
    for _ in range(5):
        grads = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
        run(backend, fused, grads, lr=1e-2, weight_decay=0.01)
        run("torch", ref, grads, lr=1e-2, weight_decay=0.01)
        for i, (a, e) in enumerate(zip(fused["params"], ref["params"])):
            assert_close(a, e, atol, rtol, what=f"param[{i}]")
            ref["params"][i].copy_(a)


@pytest.mark.parametrize("backend", FUSED)
def test_zero_param_tensor_gets_trust_ratio_one(backend):
    st = {"params": [torch.zeros(5)], "exp_avgs": [torch.zeros(5)],
          "exp_avg_sqs": [torch.zeros(5)], "steps": [torch.zeros(())]}
    g = torch.tensor([1.0, -1.0, 2.0, 0.5, -3.0])
    run(backend, st, [g], lr=0.1, eps=0.0)
    assert_close(st["params"][0], -0.1 * torch.sign(g), 1e-6, 1e-6, what="ratio 1")


@pytest.mark.parametrize("backend", FUSED)
def test_nan_grad_propagates(backend):
    st = make_state([(6,), (6,)])
    grads = [torch.randn(6), torch.randn(6)]
    grads[1][2] = float("inf")
    run(backend, st, grads)
    assert not torch.isfinite(st["params"][1]).all()
    assert torch.isfinite(st["params"][0]).all()


def test_opcheck():
    st = make_state([(3, 4), (5,)])
    args = (st["params"], [torch.randn(3, 4), torch.randn(5)], st["exp_avgs"],
            st["exp_avg_sqs"], st["steps"], 1e-3, None, 0.9, 0.999, 1e-6, 0.01, True,
            False, 10.0, False)
    torch.library.opcheck(torch.ops.pyoptk.lamb_.default, args)


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(clamp_value=0.0), ValueError, "clamp_value must be a positive float"),
    (dict(lr="0.1"), TypeError, "lr must be a float"),
    (dict(betas=(0.9, 1.5)), ValueError, "Invalid beta parameter at index 1"),
])
def test_bad_input(kw, exc, msg):
    st = make_state([(4,)])
    with pytest.raises(exc, match=msg):
        run("auto", st, [torch.randn(4)], **kw)
    assert st["steps"][0].item() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gpu_matches_reference(backend, variant):
    shapes = SHAPES + [(50257, 768)]
    fused = {k: [t.cuda() for t in v] for k, v in make_state(shapes).items()}
    ref = clone_state(fused)
    for _ in range(20):
        grads = [torch.randn(s, device="cuda") for s in shapes]
        run(backend, fused, grads, lr=1e-2, **VARIANTS[variant])
        run("torch", ref, grads, lr=1e-2, **VARIANTS[variant])
    for i, (a, e) in enumerate(zip(fused["params"], ref["params"])):
        assert_close(a, e, 1e-5, 1e-4, what=f"{backend} param[{i}]")
