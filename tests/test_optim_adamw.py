"""pyoptk.optim.AdamW against torch.optim.AdamW: conformance on every CPU backend,
low-precision params, state_dict both ways, bit-exact resume, param groups, bad input.

Also home of the helpers the other test_optim_* files share."""

import copy
import io

import pytest
import torch

import pyoptk
from helpers import assert_close, cpu_backends, small_for

BACKENDS = cpu_backends(include_torch=True)
SHAPES = [(5, 123, 123), (123,), (1,), (0,), (7, 33)]
SMALL_SHAPES = [(5, 7, 3), (33,), (1,), (0,)]  # for the Triton interpreter


# ----------------------------------------------------------------------------------
# Shared helpers.
# ----------------------------------------------------------------------------------
def make_params(shapes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def fixed_grads(shapes, t, seed=1, skip_every=0):
    """Step ``t``'s gradients: independent of the params, so two optimizers compared
    over many steps differ by their own rounding only, not the loss landscape's
    amplification of it. With ``skip_every``, param i has no grad when
    (t + i) % skip_every == 0."""
    gen = torch.Generator().manual_seed(seed * 100003 + t)
    grads = [torch.randn(s, generator=gen) for s in shapes]
    if skip_every:
        grads = [None if (t + i) % skip_every == 0 else g for i, g in enumerate(grads)]
    return grads


def run_fixed(opt, params, steps, start=0, seed=1, skip_every=0, backend=None):
    """``steps`` optimizer steps fed :func:`fixed_grads` (steps start..start+steps-1)."""
    shapes = [p.shape for p in params]
    with pyoptk.use_backend(backend or "auto"):
        for t in range(start, start + steps):
            for p, g in zip(params, fixed_grads(shapes, t, seed, skip_every)):
                p.grad = None if g is None else g.to(device=p.device, dtype=p.dtype)
            opt.step()


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(13, 31), torch.nn.Tanh(), torch.nn.Linear(31, 5),
                            torch.nn.LayerNorm(5))
    return m.to(dtype)


def batches(steps, start=0, seed=1, batch=17):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(batch, 13, generator=gen) for _ in range(start + steps)]
    return xs[start:]


def train(model, opt, steps, start=0, seed=1):
    """Real training on a regression-to-zero loss (params feed back into grads)."""
    for x in batches(steps, start, seed):
        opt.zero_grad()
        model(x.to(next(model.parameters()).dtype)).float().square().mean().backward()
        opt.step()


def save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf)


# ----------------------------------------------------------------------------------
# Conformance with torch.optim.AdamW.
# ----------------------------------------------------------------------------------
CONFIGS = {
    "default": dict(lr=1e-2),
    "amsgrad_wd": dict(lr=3e-3, weight_decay=0.1, amsgrad=True),
    "maximize_betas_eps": dict(lr=1e-3, betas=(0.5, 0.9), eps=1e-6, maximize=True,
                               weight_decay=0.0),
}


def grouped(params):
    """Two groups with different hyperparameters over ``params``."""
    return [{"params": params[:2], "lr": 1e-2, "weight_decay": 0.0},
            {"params": params[2:], "lr": 3e-3, "betas": (0.8, 0.95), "amsgrad": True,
             "maximize": True}]


def assert_matches_torch(ours, theirs, params, ref_params, what):
    for i, (p, q) in enumerate(zip(params, ref_params)):
        assert_close(p, q, atol=1e-6, rtol=1e-6, what=f"{what} param {i}")
        st, rt = ours.state.get(p, {}), theirs.state.get(q, {})
        assert set(st) == set(rt), f"{what} param {i}: state keys {set(st)} != {set(rt)}"
        for key in set(st) - {"step"}:
            assert st[key].dtype == torch.float32
            assert_close(st[key], rt[key], 1e-7, 1e-6, what=f"{what} param {i} {key}")
        if st:
            assert st["step"].item() == rt["step"].item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", list(CONFIGS) + ["groups_and_skipped_grads"])
def test_matches_torch_adamw_100_steps(backend, config):
    shapes = small_for(backend, SHAPES, SMALL_SHAPES)
    steps = 30 if backend == "triton" else 100
    params = make_params(shapes)
    ref_params = clone_params(params)
    if config in CONFIGS:
        ours = pyoptk.optim.AdamW(params, **CONFIGS[config])
        theirs = torch.optim.AdamW(ref_params, **CONFIGS[config])
        skip = 0
    else:
        ours = pyoptk.optim.AdamW(grouped(params), lr=1e-3)
        theirs = torch.optim.AdamW(grouped(ref_params), lr=1e-3)
        skip = 3  # params without a grad at a step are skipped, their step not counted
    run_fixed(ours, params, steps, skip_every=skip, backend=backend)
    run_fixed(theirs, ref_params, steps, skip_every=skip)
    assert_matches_torch(ours, theirs, params, ref_params, f"{backend} {config}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_params_round_fp32_reference_each_step(backend, dtype):
    """bf16/fp16 params, float32 state. Each step, torch.optim.AdamW in float32 starts
    from our rounded params with its own float32 state; our new params must be that
    result correctly rounded to the param dtype: within half an ulp (eps/2 relative),
    plus 2e-6 relative for float32 rounding differences."""
    shapes = small_for(backend, SHAPES, SMALL_SHAPES)
    steps = 10 if backend == "triton" else 40
    params = make_params(shapes, dtype)
    shadow = [torch.nn.Parameter(p.detach().float()) for p in params]
    kw = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)
    ours, ref = pyoptk.optim.AdamW(params, **kw), torch.optim.AdamW(shadow, **kw)
    rtol = torch.finfo(dtype).eps / 2 + 2e-6
    if backend == "triton" and dtype == torch.bfloat16 and not torch.cuda.is_available():
        # Triton's CPU interpreter (3.x) converts float32 to bfloat16 by truncation,
        # even with fp_downcast_rounding="rtne"; compiled Triton rounds to nearest even.
        rtol = torch.finfo(dtype).eps + 2e-6
    with pyoptk.use_backend(backend):
        for t in range(steps):
            for p, s, g in zip(params, shadow, fixed_grads(shapes, t)):
                p.grad = g.to(dtype)
                s.grad = p.grad.float()
                s.data.copy_(p.detach().float())
            ours.step()
            ref.step()
            for i, (p, s) in enumerate(zip(params, shadow)):
                assert p.dtype == dtype
                assert_close(p, s, atol=1e-7, rtol=rtol, what=f"step {t} param {i}")
    for p, s in zip(params, shadow):
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert ours.state[p][key].dtype == torch.float32
            assert_close(ours.state[p][key], ref.state[s][key], 1e-7, 1e-5, what=key)


def test_one_fused_call_per_device_dtype_bucket(monkeypatch):
    """Mixed dtypes in one group are bucketed: one op call per (device, dtype) per group,
    and each param gets exactly the update it would get alone."""
    calls = []
    real = pyoptk.optim.adamw.adamw_unchecked_

    def counting(params, *args, **kwargs):
        calls.append(sorted({str(p.dtype) for p in params}))
        return real(params, *args, **kwargs)

    monkeypatch.setattr(pyoptk.optim.adamw, "adamw_unchecked_", counting)
    shapes = [(4, 3), (5,), (2, 2), (6,), (3,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.bfloat16]
    params = [torch.nn.Parameter(p.detach().to(d)) for p, d in zip(make_params(shapes), dtypes)]
    alone = clone_params(params)
    grads = [g.to(d) for g, d in zip(fixed_grads(shapes, 0), dtypes)]
    opt = pyoptk.optim.AdamW([{"params": params[:3]}, {"params": params[3:]}], lr=0.1)
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    assert calls == [["torch.float32"], ["torch.bfloat16"], ["torch.float16"],
                     ["torch.bfloat16"]]
    for p, q, g in zip(params, alone, grads):
        q.grad = g
        pyoptk.optim.AdamW([q], lr=0.1).step()
        assert torch.equal(p, q)


def test_params_without_grad_untouched_and_stateless():
    params = make_params([(4, 3), (5,), (2,)])
    frozen = params[1].detach().clone()
    opt = pyoptk.optim.AdamW(params, lr=0.1)
    for _ in range(3):
        params[0].grad = torch.ones(4, 3)
        params[2].grad = torch.ones(2)
        opt.step()
    assert torch.equal(params[1], frozen)
    assert params[1] not in opt.state
    assert opt.state[params[0]]["step"].item() == 3


def test_centralize_equals_torch_fed_centralized_grads():
    """AdamW(centralize=True) == torch AdamW on centralized grads; p.grad unchanged."""
    shapes = [(6, 4, 3, 3), (9, 7), (7,)]
    params = make_params(shapes)
    ref_params = clone_params(params)
    ours = pyoptk.optim.AdamW(params, lr=1e-2, centralize=True)
    theirs = torch.optim.AdamW(ref_params, lr=1e-2)
    for t in range(20):
        grads = fixed_grads(shapes, t)
        for p, q, g in zip(params, ref_params, grads):
            p.grad = g.clone()
            q.grad = g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True) if g.dim() > 1 else g
        ours.step()
        theirs.step()
        for p, g in zip(params, grads):
            assert torch.equal(p.grad, g), "centralize must not modify p.grad"
    assert_matches_torch(ours, theirs, params, ref_params, "centralized")
    raw = clone_params(make_params(shapes))
    plain = pyoptk.optim.AdamW(raw, lr=1e-2)
    run_fixed(plain, raw, 20)
    assert not torch.allclose(raw[0], params[0], atol=1e-4), "centralization had no effect"


def test_nan_grad_propagates_like_torch():
    params = make_params([(4, 3), (5,)])
    ref_params = clone_params(params)
    ours, theirs = pyoptk.optim.AdamW(params), torch.optim.AdamW(ref_params)
    for ps, opt in ((params, ours), (ref_params, theirs)):
        ps[0].grad, ps[1].grad = torch.ones(4, 3), torch.ones(5)
        ps[0].grad[1, 2] = float("nan")
        ps[1].grad[3] = float("inf")
        opt.step()
    nan_mask = torch.zeros(4, 3, dtype=torch.bool)
    nan_mask[1, 2] = True
    assert torch.equal(params[0].isnan(), nan_mask), "only the NaN-grad element turns NaN"
    assert torch.equal(params[1].isnan(), ref_params[1].isnan())
    for p, q in zip(params, ref_params):
        assert_close(p, q, 1e-7, 1e-6, what="non-finite grads")  # NaNs must coincide


def test_zero_grad_both_modes_and_closure_match_torch():
    m1, m2 = make_model(), make_model()
    ours, theirs = pyoptk.optim.AdamW(m1.parameters(), lr=1e-2), torch.optim.AdamW(
        m2.parameters(), lr=1e-2)
    for i, x in enumerate(batches(6)):
        for m, opt in ((m1, ours), (m2, theirs)):
            def closure():
                opt.zero_grad(set_to_none=i % 2 == 0)
                loss = m(x).square().mean()
                loss.backward()
                return loss

            loss = opt.step(closure)
            assert isinstance(loss, torch.Tensor) and loss.requires_grad
    ours.zero_grad(set_to_none=False)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in m1.parameters())
    ours.step()  # zero grads are grads: decay and momentum still move the params
    theirs.zero_grad(set_to_none=False)
    theirs.step()
    ours.zero_grad()
    assert all(p.grad is None for p in m1.parameters())
    for p, q in zip(m1.parameters(), m2.parameters()):
        # Real training: the loss feeds rounding differences back into the grads.
        assert_close(p, q, 1e-5, 1e-4, what="closure / zero_grad")


def test_lr_tensor_and_scheduler_match_torch():
    params = make_params([(7, 5), (3,)])
    ref_params = clone_params(params)
    ours = pyoptk.optim.AdamW(params, lr=torch.tensor(1e-2))
    theirs = torch.optim.AdamW(ref_params, lr=1e-2)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=5, gamma=0.5) for o in (ours, theirs)]
    for t in range(20):
        run_fixed(ours, params, 1, start=t)
        run_fixed(theirs, ref_params, 1, start=t)
        for s in scheds:
            s.step()
    assert isinstance(ours.param_groups[0]["lr"], torch.Tensor)
    assert ours.param_groups[0]["lr"].item() == pytest.approx(1e-2 * 0.5 ** 4)
    assert_matches_torch(ours, theirs, params, ref_params, "scheduled")


def test_step_hooks_and_nvtx_ranges(monkeypatch):
    import contextlib

    import pyoptk._nvtx as nvtx

    names = []

    @contextlib.contextmanager
    def record(name):
        names.append(name)
        yield

    monkeypatch.setattr(nvtx, "_range_factory", record)
    params = make_params([(3,)])
    opt = pyoptk.optim.AdamW(params)
    seen = []
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append(o))
    run_fixed(opt, params, 1)
    assert names == ["pyoptk::AdamW.step", "pyoptk::adamw_"]
    assert seen == [opt]


# ----------------------------------------------------------------------------------
# state_dict: both directions with torch, bit-exact resume, old checkpoints.
# ----------------------------------------------------------------------------------
def test_state_dict_round_trip_through_torch_continues_like_uninterrupted():
    """60 steps: 20 ours -> 20 torch (loaded from ours) -> 20 ours (loaded from torch),
    equal to an uninterrupted run of ours (and of torch's)."""
    kw = dict(lr=1e-2, amsgrad=True, weight_decay=0.05)
    shapes = [(9, 7), (7,), (4, 2, 3)]
    ref = make_params(shapes)
    run_fixed(pyoptk.optim.AdamW(ref, **kw), ref, 60)
    params = make_params(shapes)
    ours = pyoptk.optim.AdamW(params, **kw)
    run_fixed(ours, params, 20)
    theirs = torch.optim.AdamW(params, **kw)
    theirs.load_state_dict(save_load(ours.state_dict()))
    run_fixed(theirs, params, 20, start=20)
    ours2 = pyoptk.optim.AdamW(params, **kw)
    ours2.load_state_dict(save_load(theirs.state_dict()))
    st = ours2.state[params[0]]
    assert st["step"].dtype == torch.float32 and st["step"].shape == () and st["step"].item() == 40
    assert ours2.param_groups[0]["centralize"] is False  # back-filled: torch has no such key
    run_fixed(ours2, params, 20, start=40)
    for p, q in zip(params, ref):
        assert_close(p, q, 1e-6, 1e-6, what="through torch and back")


def assert_resume_bit_exact(make_opt, total):
    """Train ``total`` steps uninterrupted; separately train half, save model and
    optimizer, reload both into fresh objects (a differently initialized model) and
    continue: the two must be bitwise equal."""
    full = make_model()
    train(full, make_opt(full.parameters()), total)
    part = make_model()
    opt = make_opt(part.parameters())
    train(part, opt, total // 2)
    ckpt = save_load({"model": part.state_dict(), "opt": opt.state_dict()})
    resumed = make_model(seed=123)
    resumed.load_state_dict(ckpt["model"])
    opt2 = make_opt(resumed.parameters())
    opt2.load_state_dict(ckpt["opt"])
    train(resumed, opt2, total - total // 2, start=total // 2)
    for (name, p), q in zip(resumed.named_parameters(), full.parameters()):
        assert torch.equal(p, q), f"{name}: resume is not bit-exact"


@pytest.mark.parametrize("backend", BACKENDS)
def test_bit_exact_resume_from_checkpoint(backend):
    """Resume at step 50 of 100 (amsgrad on) is bit-exact."""
    with pyoptk.use_backend(backend):
        assert_resume_bit_exact(
            lambda ps: pyoptk.optim.AdamW(ps, lr=1e-2, weight_decay=0.05, amsgrad=True),
            total=20 if backend == "triton" else 100)


def test_bf16_state_survives_load_state_dict_in_float32():
    """torch's load_state_dict would cast the moments to the param dtype (bf16)."""
    params = make_params([(9, 7), (7,)], torch.bfloat16)
    opt = pyoptk.optim.AdamW(params, lr=1e-2)
    run_fixed(opt, params, 5)
    sd = save_load(opt.state_dict())
    opt2 = pyoptk.optim.AdamW(params, lr=1e-2)
    opt2.load_state_dict(sd)
    for i, p in enumerate(params):
        for key in ("exp_avg", "exp_avg_sq"):
            got, want = opt2.state[p][key], opt.state[p][key]
            assert got.dtype == torch.float32 and torch.equal(got, want)
            assert got.data_ptr() != sd["state"][i][key].data_ptr()


def test_load_torch_checkpoint_with_host_or_python_step():
    """torch keeps ``step`` a host tensor (older releases: a Python number); ours is a
    float32 0-dim tensor on the param's device, not shared with the checkpoint."""
    params = make_params([(3, 2)])
    theirs = torch.optim.AdamW(params, lr=1e-2)
    run_fixed(theirs, params, 3)
    sd = theirs.state_dict()
    opt = pyoptk.optim.AdamW(params, lr=1e-2)
    opt.load_state_dict(sd)
    step = opt.state[params[0]]["step"]
    assert step.dtype == torch.float32 and step.shape == () and step.item() == 3
    assert step.data_ptr() != sd["state"][0]["step"].data_ptr()
    old = copy.deepcopy(sd)
    old["state"][0]["step"] = 3
    opt.load_state_dict(old)
    run_fixed(opt, params, 1, start=3)
    assert opt.state[params[0]]["step"].item() == 4


def test_load_state_dict_shape_mismatch_is_clear():
    opt = pyoptk.optim.AdamW(make_params([(3, 2)]))
    other = make_params([(2, 3)])
    src = pyoptk.optim.AdamW(other)
    run_fixed(src, other, 1)
    with pytest.raises(ValueError, match=r"state 'exp_avg' of saved param 0 has shape \(2, 3\)"):
        opt.load_state_dict(src.state_dict())


def test_setstate_backfills_options_of_old_checkpoints():
    params = make_params([(3, 2)])
    opt = pyoptk.optim.AdamW(params)
    run_fixed(opt, params, 2)
    state = opt.__getstate__()
    for d in state["param_groups"] + [state["defaults"]]:
        del d["centralize"]  # pickled before the option existed
        del d["maximize"]
    old = pyoptk.optim.AdamW.__new__(pyoptk.optim.AdamW)
    old.__setstate__(state)
    assert old.defaults["centralize"] is False
    assert all(g["centralize"] is False and g["maximize"] is False for g in old.param_groups)
    run_fixed(old, params, 1, start=2)
    assert old.state[params[0]]["step"].item() == 3


# ----------------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,exc,msg", [
    (dict(lr=-1), ValueError, "^Invalid learning rate: -1$"),
    (dict(lr=torch.tensor([1e-3, 1e-3])), ValueError, "Tensor lr must be 1-element"),
    (dict(betas=(1.2, 0.999)), ValueError, "^Invalid beta parameter at index 0: 1.2$"),
    (dict(betas=(0.9, 1.0)), ValueError, "^Invalid beta parameter at index 1: 1.0$"),
    (dict(betas=0.9), TypeError, "betas must be a pair of floats"),
    (dict(eps=-1e-8), ValueError, "^Invalid epsilon value: -1e-08$"),
    (dict(weight_decay=-0.1), ValueError, "^Invalid weight_decay value: -0.1$"),
    (dict(differentiable=True), ValueError, "does not support differentiable=True"),
], ids=["lr", "lr_tensor", "beta0", "beta1", "betas_type", "eps", "wd", "differentiable"])
def test_bad_arguments(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        pyoptk.optim.AdamW(make_params([(2,)]), **kw)


def test_torch_compat_kwargs_accepted_and_ignored():
    params = make_params([(9, 7)])
    plain = clone_params(params)
    run_fixed(pyoptk.optim.AdamW(params, foreach=True, fused=True, capturable=True), params, 3)
    run_fixed(pyoptk.optim.AdamW(plain), plain, 3)
    assert torch.equal(params[0], plain[0])


def test_bad_param_groups():
    a, b = make_params([(2,), (3,)])
    with pytest.raises(ValueError, match=r"^Invalid learning rate: -0.5 \(param group 1\)$"):
        pyoptk.optim.AdamW([{"params": [a]}, {"params": [b], "lr": -0.5}])
    with pytest.raises(ValueError, match=r"needs a 'params' entry.*\(param group 1\)"):
        pyoptk.optim.AdamW([{"params": [a]}, {"lr": 0.1}])
    opt = pyoptk.optim.AdamW([a])
    with pytest.raises(ValueError,
                       match=r"Invalid beta parameter at index 1: 2.0 \(param group 1\)"):
        opt.add_param_group({"params": [b], "betas": (0.9, 2.0)})
    assert len(opt.param_groups) == 1


def test_sparse_grad_rejected():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = pyoptk.optim.AdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"AdamW does not support sparse gradients "
                                           r"\(param_groups\[0\]\['params'\]\[0\]"):
        opt.step()


def test_non_contiguous_param_names_it():
    ok = torch.nn.Parameter(torch.randn(3))
    p = torch.nn.Parameter(torch.randn(6, 4).t())  # (4, 6) transposed view
    ok.grad, p.grad = torch.randn(3), torch.randn(4, 6)
    opt = pyoptk.optim.AdamW([{"params": [torch.nn.Parameter(torch.randn(1))]},
                              {"params": [ok, p]}])
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[1\] \(shape \(4, 6\), "
                                         r"strides \(1, 4\)\) is not contiguous"):
        opt.step()


def test_non_contiguous_grad_is_read_correctly():
    p = make_params([(4, 6)])
    q = clone_params(p)
    g = torch.randn(6, 4)
    p[0].grad = g.t()  # a hand-assigned transposed view
    q[0].grad = g.t().contiguous()
    a, b = pyoptk.optim.AdamW(p, lr=0.1), pyoptk.optim.AdamW(q, lr=0.1)
    a.step()
    b.step()
    assert torch.equal(p[0], q[0])


def test_float64_params_rejected_clearly():
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    p.grad = torch.randn(3, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\] has dtype "
                                        r"torch.float64.*float32, bfloat16 or float16"):
        pyoptk.optim.AdamW([p]).step()


# ----------------------------------------------------------------------------------
# GPU tier.
# ----------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_torch_checkpoint_step_moves_to_param_device_and_back():
    """torch (not capturable) keeps ``step`` on the host; loaded here it moves to the
    param's device, and ours loads back into torch, which continues as if
    uninterrupted."""
    shapes = [(1000,), (64, 33)]
    ref = [torch.nn.Parameter(p.detach().cuda()) for p in make_params(shapes)]
    run_fixed(torch.optim.AdamW(ref, lr=1e-2), ref, 9)
    params = [torch.nn.Parameter(p.detach().cuda()) for p in make_params(shapes)]
    theirs = torch.optim.AdamW(params, lr=1e-2)
    run_fixed(theirs, params, 3)
    assert theirs.state[params[0]]["step"].device.type == "cpu"
    ours = pyoptk.optim.AdamW(params, lr=1e-2)
    ours.load_state_dict(theirs.state_dict())
    assert ours.state[params[0]]["step"].device == params[0].device
    run_fixed(ours, params, 3, start=3)
    theirs2 = torch.optim.AdamW(params, lr=1e-2)
    theirs2.load_state_dict(ours.state_dict())
    run_fixed(theirs2, params, 3, start=6)
    for p, q in zip(params, ref):
        assert_close(p, q, 1e-6, 1e-6, what="torch -> ours -> torch on CUDA")


@pytest.mark.gpu
def test_gpu_step_captured_in_cuda_graph_with_device_lr():
    """opt.step() captured once and replayed with the lr tensor changed on device in
    between equals torch.optim.AdamW stepping with those lrs."""
    shapes = [(1000,), (64, 33)]
    params = [torch.nn.Parameter(p.detach().cuda()) for p in make_params(shapes)]
    ref = clone_params(params)
    grads = [g.cuda() for g in fixed_grads(shapes, 0)]
    for p, q, g in zip(params, ref, grads):
        p.grad, q.grad = g, g.clone()
    lr = torch.tensor(1e-2, device="cuda")
    opt = pyoptk.optim.AdamW(params, lr=lr, amsgrad=True)
    theirs = torch.optim.AdamW(ref, lr=1e-2, amsgrad=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: creates the state, compiles kernels
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    theirs.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for i in range(5):
        lr.fill_(1e-2 * 0.5 ** (i + 1))
        graph.replay()
        theirs.param_groups[0]["lr"] = 1e-2 * 0.5 ** (i + 1)
        theirs.step()
    torch.cuda.synchronize()
    assert opt.state[params[0]]["step"].item() == 6
    for p, q in zip(params, ref):
        assert_close(p, q, 1e-6, 1e-6, what="CUDA graph replay")
