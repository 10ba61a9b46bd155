"""torch.ops.pyoptk.adamw_: every CPU backend against the reference and torch.optim."""

import pytest
import torch

import pyoptk
from pyoptk.ops import AdamWHyper, adamw_, adamw_reference
from helpers import STEP_TOL, assert_close

FUSED = ["cpu", "triton"]  # must be available here; cuda is in the gpu tier
SHAPES = [(), (0,), (1,), (3,), (1025,), (5, 123, 7), (33, 65)]
SMALL_SHAPES = [(), (0,), (1,), (3,), (1025,), (7, 13)]


def make_state(shapes, dtype=torch.float32, amsgrad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    st = {
        "params": params,
        "exp_avgs": [torch.zeros(s) for s in shapes],
        "exp_avg_sqs": [torch.zeros(s) for s in shapes],
        "max_exp_avg_sqs": [torch.zeros(s) for s in shapes] if amsgrad else None,
        "steps": [torch.zeros(()) for _ in shapes],
    }
    return st


def clone_state(st):
    return {k: (None if v is None else [t.clone() for t in v]) for k, v in st.items()}


def run(backend, st, grads, **hp):
    with pyoptk.use_backend(backend):
        adamw_(st["params"], grads, st["exp_avgs"], st["exp_avg_sqs"], st["steps"],
               max_exp_avg_sqs=st["max_exp_avg_sqs"], **hp)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("amsgrad,maximize,weight_decay", [
    (False, False, 0.01), (True, False, 0.1), (False, True, 0.0)],
    ids=["plain", "amsgrad", "maximize"])
def test_matches_reference_100_steps(backend, amsgrad, maximize, weight_decay):
    shapes = SMALL_SHAPES if backend == "triton" else SHAPES
    steps = 20 if backend == "triton" else 100
    fused = make_state(shapes, amsgrad=amsgrad)
    ref = clone_state(fused)
    gen = torch.Generator().manual_seed(1)
    hp = dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-8, weight_decay=weight_decay,
              amsgrad=amsgrad, maximize=maximize)
    for _ in range(steps):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        run(backend, fused, grads, **hp)
        run("torch", ref, grads, **hp)
    for key in ("params", "exp_avgs", "exp_avg_sqs", "steps"):
        for i, (a, e) in enumerate(zip(fused[key], ref[key])):
            assert_close(a, e, atol=1e-6, rtol=1e-5, what=f"{backend} {key}[{i}]")


@pytest.mark.parametrize("backend", FUSED)
def test_lr_tensor_equals_lr_float(backend):
    a = make_state([(17,), (4, 5)])
    b = clone_state(a)
    grads = [torch.randn(17), torch.randn(4, 5)]
    run(backend, a, grads, lr=torch.tensor(0.05))
    run(backend, b, grads, lr=0.05)
    for x, y in zip(a["params"], b["params"]):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", ["cpu"])  # the interpreter has no bf16 numerics
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_params_fp32_state(backend, dtype):
    shapes = [(1,), (1025,), (5, 123, 7)]
    fused = make_state(shapes, dtype=dtype)
    ref = clone_state(fused)
    gen = torch.Generator().manual_seed(2)
    atol, rtol = STEP_TOL[dtype]
    for _ in range(10):
        grads = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
        run(backend, fused, grads, lr=1e-2)
        run("torch", ref, grads, lr=1e-2)
        for i, (a, e) in enumerate(zip(fused["params"], ref["params"])):
            assert a.dtype == dtype
            assert_close(a, e, atol, rtol, what=f"param[{i}]")
            ref["params"][i].copy_(a)  # compare one step at a time from the same start
        for a, e in zip(fused["exp_avg_sqs"], ref["exp_avg_sqs"]):
            assert_close(a, e, 1e-6, 1e-5, what="exp_avg_sq")


def test_reference_matches_torch_adamw_exactly_enough():
    """The reference is torch.optim.AdamW's math: 1e-6 relative over 100 steps."""
    shapes = [(5, 123, 7), (1,), (33,)]
    st = make_state(shapes, amsgrad=True)
    ref_params = [p.clone().requires_grad_() for p in st["params"]]
    opt = torch.optim.AdamW(ref_params, lr=1e-3, weight_decay=0.05, amsgrad=True,
                            foreach=False)
    gen = torch.Generator().manual_seed(3)
    for _ in range(100):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for p, g in zip(ref_params, grads):
            p.grad = g
        opt.step()
        run("torch", st, grads, lr=1e-3, weight_decay=0.05, amsgrad=True)
    for a, e in zip(st["params"], ref_params):
        assert_close(a, e, 1e-7, 1e-6, what="reference vs torch.optim.AdamW")


@pytest.mark.parametrize("backend", ["cpu"])
def test_no_drift_over_1000_steps_vs_fp64(backend):
    """No fast-math: over 1,000 steps the fused fp32 run stays as close to an fp64 run
    as the fp32 reference does (fp32 itself drifts by ~1e-5 relative here, mostly from
    rounding 1 - lr*wd; fast-math kernels drift by far more)."""
    shapes = [(4097,), (31, 33)]
    fused = make_state(shapes)
    ref32 = clone_state(fused)
    ref64 = {k: (None if v is None else [t.double() for t in v]) for k, v in fused.items()}
    gen = torch.Generator().manual_seed(4)
    hp = AdamWHyper(1e-3, None, 0.9, 0.999, 1e-8, 1e-2, False, False)
    for _ in range(1000):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        run(backend, fused, grads, lr=1e-3)
        run("torch", ref32, grads, lr=1e-3)
        for s in ref64["steps"]:
            s.add_(1)
        adamw_reference(ref64["params"], [g.double() for g in grads], ref64["exp_avgs"],
                        ref64["exp_avg_sqs"], [], [s.float() for s in ref64["steps"]], hp)
    for a, r, e in zip(fused["params"], ref32["params"], ref64["params"]):
        fused_err = (a.double() - e).abs().max().item()
        ref_err = (r.double() - e).abs().max().item()
        assert fused_err <= 1.5 * ref_err + 1e-6, (fused_err, ref_err)
        assert_close(a, r, atol=1e-5, rtol=1e-5, what="1000 steps fused vs fp32 reference")


@pytest.mark.parametrize("backend", FUSED)
def test_nan_grad_propagates_only_to_its_tensor(backend):
    st = make_state([(8,), (8,)])
    grads = [torch.randn(8), torch.randn(8)]
    grads[0][3] = float("nan")
    run(backend, st, grads, lr=1e-2)
    assert torch.isnan(st["params"][0][3])
    assert torch.isfinite(st["params"][1]).all()


def test_opcheck():
    st = make_state([(3, 4), (5,)], amsgrad=True)
    grads = [torch.randn(3, 4), torch.randn(5)]
    args = (st["params"], grads, st["exp_avgs"], st["exp_avg_sqs"], st["max_exp_avg_sqs"],
            st["steps"], 1e-3, None, 0.9, 0.999, 1e-8, 0.01, True, False)
    torch.library.opcheck(torch.ops.pyoptk.adamw_.default, args)


class TestBadInput:
    def args(self):
        st = make_state([(4,), (2, 3)])
        return st, [torch.randn(4), torch.randn(2, 3)]

    def test_length_mismatch(self):
        st, grads = self.args()
        with pytest.raises(ValueError, match="grads has 1 tensors but params has 2"):
            adamw_(st["params"], grads[:1], st["exp_avgs"], st["exp_avg_sqs"], st["steps"])

    def test_non_contiguous(self):
        st, grads = self.args()
        st["params"][1] = torch.randn(3, 2).t()
        with pytest.raises(ValueError, match=r"params\[1\] is not contiguous"):
            adamw_(st["params"], grads, st["exp_avgs"], st["exp_avg_sqs"], st["steps"])

    def test_shape_mismatch(self):
        st, grads = self.args()
        grads[0] = torch.randn(5)
        with pytest.raises(ValueError, match=r"grads\[0\] has shape \(5,\), expected \(4,\)"):
            adamw_(st["params"], grads, st["exp_avgs"], st["exp_avg_sqs"], st["steps"])

    def test_sparse_grad(self):
        st, grads = self.args()
        grads[0] = torch.randn(4).to_sparse()
        with pytest.raises(ValueError, match="sparse"):
            adamw_(st["params"], grads, st["exp_avgs"], st["exp_avg_sqs"], st["steps"])

    def test_mixed_dtypes(self):
        st, grads = self.args()
        grads[1] = grads[1].double()
        with pytest.raises(TypeError, match=r"grads\[1\] has dtype torch.float64"):
            adamw_(st["params"], grads, st["exp_avgs"], st["exp_avg_sqs"], st["steps"])

    def test_mixed_param_dtypes(self):
        """A bf16 param among fp32 ones (its grad fp32 like the others) is refused: the
        kernel would read its bytes as fp32 (it did, silently, before)."""
        st, grads = self.args()
        st["params"][1] = st["params"][1].bfloat16()
        before = st["params"][1].clone()
        with pytest.raises(TypeError, match=r"params\[1\] has dtype torch.bfloat16 but "
                                            r"params\[0\] has torch.float32"):
            adamw_(st["params"], grads, st["exp_avgs"], st["exp_avg_sqs"], st["steps"])
        assert torch.equal(st["params"][1], before)

    def test_state_must_be_fp32(self):
        st, grads = self.args()
        st["exp_avgs"][0] = st["exp_avgs"][0].half()
        with pytest.raises(TypeError, match=r"exp_avgs\[0\] must be float32"):
            adamw_(st["params"], grads, st["exp_avgs"], st["exp_avg_sqs"], st["steps"])

    def test_mixed_devices(self):
        st, grads = self.args()
        grads[1] = torch.randn(2, 3, device="meta")
        with pytest.raises(ValueError, match=r"grads\[1\] is on meta"):
            adamw_(st["params"], grads, st["exp_avgs"], st["exp_avg_sqs"], st["steps"])

    @pytest.mark.parametrize("kw,msg", [
        (dict(lr=-1.0), "Invalid learning rate: -1.0"),
        (dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
        (dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1: -0.1"),
        (dict(eps=-1e-8), "Invalid eps value"),
        (dict(weight_decay=float("nan")), "Invalid weight_decay value"),
    ])
    def test_bad_hyperparameters(self, kw, msg):
        st, grads = self.args()
        before = [p.clone() for p in st["params"]]
        with pytest.raises(ValueError, match=msg):
            adamw_(st["params"], grads, st["exp_avgs"], st["exp_avg_sqs"], st["steps"], **kw)
        assert all(torch.equal(a, b) for a, b in zip(before, st["params"]))
        assert all(s.item() == 0 for s in st["steps"]), "a rejected call must change nothing"

    def test_amsgrad_needs_max_sqs(self):
        st, grads = self.args()
        with pytest.raises(ValueError, match="amsgrad=True needs max_exp_avg_sqs"):
            adamw_(st["params"], grads, st["exp_avgs"], st["exp_avg_sqs"], st["steps"],
                   amsgrad=True)

    def test_steps_must_be_fp32_scalars(self):
        st, grads = self.args()
        st["steps"][0] = torch.zeros((), dtype=torch.int64)
        with pytest.raises(TypeError, match=r"steps\[0\] must be a float32 tensor"):
            adamw_(st["params"], grads, st["exp_avgs"], st["exp_avg_sqs"], st["steps"])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
def test_gpu_matches_reference(backend, dtype):
    shapes = SHAPES + [(50257, 768)]
    fused = make_state(shapes, dtype=dtype, amsgrad=True)
    fused = {k: (None if v is None else [t.cuda() for t in v]) for k, v in fused.items()}
    ref = clone_state(fused)
    gen = torch.Generator(device="cuda").manual_seed(0)
    atol, rtol = STEP_TOL[dtype]
    for _ in range(20):
        grads = [torch.randn(s, generator=gen, device="cuda").to(dtype) for s in shapes]
        run(backend, fused, grads, lr=1e-3, amsgrad=True)
        run("torch", ref, grads, lr=1e-3, amsgrad=True)
        for i, (a, e) in enumerate(zip(fused["params"], ref["params"])):
            assert_close(a, e, atol, rtol, what=f"{backend} param[{i}]")
            ref["params"][i].copy_(a)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_cuda_graph_capture(backend):
    shapes = [(1000,), (64, 33)]
    st = make_state(shapes)
    st = {k: (None if v is None else [t.cuda() for t in v]) for k, v in st.items()}
    ref = clone_state(st)
    grads = [torch.randn(s, device="cuda") for s in shapes]
    lr = torch.tensor(1e-2, device="cuda")
    run(backend, st, grads, lr=lr)  # warm-up (compiles / builds tables)
    run("torch", ref, grads, lr=lr)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(backend, st, grads, lr=lr)
    for _ in range(5):
        graph.replay()
        run("torch", ref, grads, lr=lr)
    torch.cuda.synchronize()
    for a, e in zip(st["params"], ref["params"]):
        assert_close(a, e, 1e-6, 1e-5, what="graph replay")


def test_eager_call_bumps_versions_so_autograd_sees_the_update():
    """Eager calls skip torch's dispatcher (pyoptk/ops/_eager.py) but must still bump
    the version counters of what they mutate, as the dispatcher does: backward through a
    graph that saved the param before the step then raises instead of using new values."""
    p = torch.randn(7, requires_grad=True)
    loss = (p * p).sum()                       # saves p for backward
    m, v, step = torch.zeros(7), torch.zeros(7), torch.zeros(())
    before = (p._version, m._version, step._version)
    with torch.no_grad():
        pyoptk.ops.adamw_([p], [torch.ones(7)], [m], [v], [step], lr=0.1)
    assert p._version > before[0] and m._version > before[1] and step._version > before[2]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
