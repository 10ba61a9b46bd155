"""Outer-loop gradient estimators (pyoptk.meta): TBPTT against central finite
differences in float64, ES/PES unbiasedness (statistical, fixed seeds) and their
batching against a loop over particles, clipping, the NaN policy, checkpoint
round-trips, determinism, and that truncation really detaches (no growth over 1,000
outer iterations)."""

import gc
import io
import math
from collections import OrderedDict

import pytest
import torch

from pyoptk.learned import MLPConfig, init_meta_params
from pyoptk.learned.mlp import update
from pyoptk.meta import MetaLoss, PersistentES, TruncatedBPTT, TruncatedES, Unroll
from pyoptk.meta import es as es_module
from pyoptk.meta.es import FUSED_MIN_NUMEL, PES_ACCUM
from pyoptk.tasks import QuadraticFamily, QuadraticTask

CFG = MLPConfig()
F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def meta64(seed=0):
    # output_scale 1: a rule whose steps move the loss visibly (the default 0.1 makes
    # the meta-gradient tiny, which finite differences resolve less well).
    return init_meta_params(CFG, seed, output_scale=1.0, dtype=F64)


def quad(seed=0, dim=5, noise=0.1):
    return QuadraticTask(seed, dim=dim, cond=10.0, noise=noise)


def advanced(est, task, meta, truncations=1):
    """An unroll of ``task`` past step 0 (non-zero rule state), by ``est`` itself."""
    u = est.init_unroll(task, meta, seed=3)
    for k in range(truncations):
        _, (u,) = est.estimate(meta, [u], seed=k)
    return u


# ----------------------------------------------------------------------------------
# TBPTT: the oracle is an independent replay of the truncation with the reference
# rule (fused=False), differentiated by central finite differences.
# ----------------------------------------------------------------------------------
def replay_meta_loss(task, u, meta, steps, lr, fixed_grads=None):
    """Mean train loss of θ_1 … θ_steps from ``u``; inner gradients recomputed at each
    step, or taken from ``fixed_grads`` (what second_order=False differentiates)."""
    names = list(u.params)
    params, state = list(u.params.values()), u.state
    losses, grads_seen = [], []
    for t in range(steps):
        x = [p.detach().requires_grad_() for p in params]
        g = torch.autograd.grad(task.loss(OrderedDict(zip(names, x)), task.batch(u.step + t)), x)
        g = fixed_grads[t] if fixed_grads is not None else g
        grads_seen.append(g)
        params, state = update(params, list(g), state, meta, CFG, lr=lr, fused=False)
        losses.append(task.loss(OrderedDict(zip(names, params)), task.batch(u.step + t + 1)))
    return torch.stack(losses).mean().detach(), grads_seen


@pytest.mark.parametrize("second_order", [False, True], ids=["first_order", "second_order"])
def test_tbptt_matches_central_finite_differences(second_order):
    task, meta, steps, lr = quad(), meta64(), 3, 30.0
    est = TruncatedBPTT(CFG, steps, 12, lr=lr, second_order=second_order)
    u = advanced(est, task, meta)
    est_out, _ = est.estimate(meta, [u], seed=0)
    assert est_out.finite
    base, grads0 = replay_meta_loss(task, u, meta, steps, lr)
    assert est_out.meta_loss == pytest.approx(float(base), rel=1e-12)
    fixed = None if second_order else grads0
    gen = torch.Generator().manual_seed(0)
    h = 1e-6
    for _ in range(3):  # random directions v: <grad, v> vs (f(φ+hv) - f(φ-hv)) / 2h
        v = OrderedDict((k, torch.randn(t.shape, generator=gen, dtype=F64))
                        for k, t in meta.items())
        plus = OrderedDict((k, meta[k] + h * v[k]) for k in meta)
        minus = OrderedDict((k, meta[k] - h * v[k]) for k in meta)
        fd = (replay_meta_loss(task, u, plus, steps, lr, fixed)[0]
              - replay_meta_loss(task, u, minus, steps, lr, fixed)[0]) / (2 * h)
        ad = sum((est_out.grads[k] * v[k]).sum() for k in meta)
        # Central differences in float64: truncation error O(h²·f''') and rounding
        # ~1e-16·f/h ≈ 1e-10 here, far below the 1e-6 relative tolerance.
        assert float(ad) == pytest.approx(float(fd), rel=1e-6, abs=1e-10)
        assert abs(float(fd)) > 1e-4  # the direction really moves the meta-loss


def test_first_and_second_order_differ_and_fused_matches_reference():
    task, meta = quad(), meta64()
    outs = {}
    for so in (False, True):
        for fused in (None, False):
            est = TruncatedBPTT(CFG, 3, 12, lr=30.0, second_order=so, fused=fused)
            outs[so, fused] = est.estimate(meta, [advanced(est, task, meta)], seed=0)[0]
    for so in (False, True):
        for k in meta:
            torch.testing.assert_close(outs[so, None].grads[k], outs[so, False].grads[k],
                                       rtol=1e-9, atol=1e-12)
    diff = sum(float((outs[True, None].grads[k] - outs[False, None].grads[k]).abs().sum())
               for k in meta)
    assert diff > 1e-6  # the Hessian term is there


def test_tbptt_several_unrolls_average_the_single_estimates():
    # Two tasks of different sizes, one near its horizon (a 1-step last truncation).
    meta = meta64()
    est = TruncatedBPTT(CFG, 3, 7, lr=30.0)
    a = advanced(est, quad(0, dim=5), meta, truncations=2)  # step 6: one step left
    b = advanced(est, quad(1, dim=9), meta, truncations=1)  # step 3
    both, (a2, b2) = est.estimate(meta, [a, b], seed=0)
    ea, (a1,) = est.estimate(meta, [a], seed=0)
    eb, (b1,) = est.estimate(meta, [b], seed=0)
    assert (a2.step, b2.step) == (7, 6)
    for k in meta:
        torch.testing.assert_close(both.grads[k], (ea.grads[k] + eb.grads[k]) / 2,
                                   rtol=1e-10, atol=1e-14)
    assert both.meta_loss == pytest.approx((ea.meta_loss + eb.meta_loss) / 2, rel=1e-12)
    assert torch.equal(a2.params["x"], a1.params["x"])
    assert torch.equal(b2.params["x"], b1.params["x"])


def test_tbptt_clipping_keeps_direction():
    task, meta = quad(), meta64()
    free = TruncatedBPTT(CFG, 2, 8, lr=30.0)
    u = advanced(free, task, meta)
    e_free, _ = free.estimate(meta, [u], seed=0)
    norm = e_free.metrics["grad_norm"]
    assert e_free.metrics["clipped"] == 0.0 and norm > 0
    e_clip, _ = TruncatedBPTT(CFG, 2, 8, lr=30.0, max_grad_norm=norm / 10).estimate(
        meta, [u], seed=0)
    assert e_clip.metrics["clipped"] == 1.0 and e_clip.metrics["grad_norm"] == norm
    clipped_norm = sum(float(g.square().sum()) for g in e_clip.grads.values()) ** 0.5
    assert clipped_norm == pytest.approx(norm / 10, rel=1e-12)
    for k in meta:
        torch.testing.assert_close(e_clip.grads[k] * 10, e_free.grads[k])


class InfAfter(QuadraticTask):
    """A quadratic whose batches turn infinite from step ``bad_step`` on (the loss and
    its gradient are then inf/NaN)."""

    def __init__(self, seed, bad_step):
        super().__init__(seed, dim=4, cond=10.0, noise=0.0)
        self.bad_step = bad_step

    def batch(self, step, split="train", *, device=None):
        b = super().batch(step, split, device=device)
        return b + float("inf") if step >= self.bad_step else b


def test_tbptt_diverged_unroll_is_restarted_and_left_out():
    meta = meta64()
    est = TruncatedBPTT(CFG, 2, 10, lr=30.0)
    bad, good = InfAfter(1, bad_step=3), quad(2)
    unrolls = [est.init_unroll(bad, meta, 0), est.init_unroll(good, meta, 0)]
    e, unrolls = est.estimate(meta, unrolls, seed=0)  # steps 0-2: still finite
    assert e.finite and all(u.step == 2 for u in unrolls)
    e, new = est.estimate(meta, unrolls, seed=1)  # θ_3 is scored on an inf batch first
    assert e.finite and e.metrics["n_nonfinite"] == 1.0
    alone, _ = est.estimate(meta, unrolls[1:], seed=1)  # no finite prefix: good's alone
    for k in meta:
        torch.testing.assert_close(e.grads[k], alone.grads[k], rtol=0, atol=0)
    assert new[0].step == 0 and new[0].task is bad  # reset: fresh start of the same task
    assert all(bool(torch.isfinite(p).all()) for p in new[0].params.values())
    assert all(float(s) == 0.0 for s in new[0].state.step)
    assert new[1].step == 4  # the finite unroll advanced
    e, _ = est.estimate(meta, new, seed=2)
    assert e.finite


def test_tbptt_divergence_keeps_the_gradient_of_its_finite_prefix():
    """Steps 1-2 of the truncation are finite, step 3 is not: the unroll contributes the
    gradient of the mean of its first two terms (the signal against diverging)."""
    meta = meta64()
    bad = InfAfter(1, bad_step=3)
    e, new = TruncatedBPTT(CFG, 3, 10, lr=30.0).estimate(
        meta, [TruncatedBPTT(CFG, 3, 10).init_unroll(bad, meta, 0)], seed=0)
    prefix, _ = TruncatedBPTT(CFG, 2, 10, lr=30.0).estimate(
        meta, [TruncatedBPTT(CFG, 2, 10).init_unroll(bad, meta, 0)], seed=0)
    assert e.finite and e.metrics["n_nonfinite"] == 1.0 and new[0].step == 0
    assert e.meta_loss == prefix.meta_loss
    for k in meta:
        torch.testing.assert_close(e.grads[k], prefix.grads[k], rtol=0, atol=0)
    assert any(float(g.abs().sum()) > 0 for g in e.grads.values())


def test_tbptt_all_unrolls_diverged_gives_zero_grads():
    meta = meta64()
    est = TruncatedBPTT(CFG, 2, 10, lr=30.0)
    e, new = est.estimate(meta, [est.init_unroll(InfAfter(1, bad_step=1), meta, 0)], seed=0)
    assert not e.finite and e.metrics["n_nonfinite"] == 1.0
    assert all(float(g.abs().sum()) == 0.0 for g in e.grads.values())
    assert new[0].step == 0


def test_tbptt_meta_loss_options_and_horizon():
    task, meta = quad(noise=0.2), meta64()
    u = TruncatedBPTT(CFG, 3, 5).init_unroll(task, meta, 0)
    train = TruncatedBPTT(CFG, 3, 5, lr=30.0).estimate(meta, [u], seed=0)[0]
    valid = TruncatedBPTT(CFG, 3, 5, lr=30.0, meta_loss=MetaLoss("valid")).estimate(
        meta, [u], seed=0)[0]
    log = TruncatedBPTT(CFG, 3, 5, lr=30.0, meta_loss=MetaLoss(log_loss=True)).estimate(
        meta, [u], seed=0)[0]
    assert train.finite and valid.finite and log.finite
    assert valid.meta_loss != train.meta_loss  # other batches
    assert log.meta_loss < train.meta_loss  # mean log <= log mean (< here: losses differ)
    est = TruncatedBPTT(CFG, 3, 5, lr=30.0)
    _, (u,) = est.estimate(meta, [u], seed=0)
    _, (u,) = est.estimate(meta, [u], seed=0)
    assert u.step == 5 and u.done(5)  # the last truncation was cut to 2 steps
    with pytest.raises(ValueError, match="done"):
        est.estimate(meta, [u], seed=0)


def test_log_meta_loss_floors_solved_tasks():
    """A loss of exactly 0 is a solved task, not a divergence: its log term is the
    floor's (finite, no gradient); above the floor the term is log L with gradient 1/L.
    NaN and +inf still read as divergence."""
    from pyoptk.meta.estimator import LOG_LOSS_FLOOR
    ml = MetaLoss(log_loss=True)
    loss = torch.tensor([0.0, 1e-12, 0.5], dtype=torch.float64, requires_grad=True)
    term = ml.term(loss)
    assert term.tolist() == [math.log(LOG_LOSS_FLOOR)] * 2 + [math.log(0.5)]
    (g,) = torch.autograd.grad(term.sum(), loss)
    assert g.tolist() == [0.0, 0.0, 2.0]
    bad = ml.term(torch.tensor([float("nan"), float("inf")]))
    assert torch.isnan(bad[0]) and bad[1] == float("inf")


@pytest.mark.parametrize("kwargs, match", [
    ({"truncation": 0}, "truncation"), ({"truncation": 6, "horizon": 5}, "truncation"),
    ({"horizon": 2.5}, "horizon"), ({"max_grad_norm": -1.0}, "max_grad_norm"),
    ({"max_grad_norm": float("inf")}, "max_grad_norm"),
])
def test_tbptt_bad_args(kwargs, match):
    args = {"truncation": 2, "horizon": 5, **kwargs}
    with pytest.raises(ValueError, match=match):
        TruncatedBPTT(CFG, args.pop("truncation"), args.pop("horizon"), **args)
    with pytest.raises(TypeError, match="meta_loss"):
        TruncatedBPTT(CFG, 2, 5, meta_loss="train")
    with pytest.raises(ValueError, match="split"):
        MetaLoss("dev")


def roundtrip(unrolls):
    buf = io.BytesIO()
    torch.save([u.state_dict() for u in unrolls], buf)
    buf.seek(0)
    return [Unroll.from_state_dict(d) for d in torch.load(buf, weights_only=True)]


def assert_same_estimate(a, b):
    assert a.meta_loss == b.meta_loss and a.finite == b.finite
    for k in a.grads:
        assert torch.equal(a.grads[k], b.grads[k]), k


def test_tbptt_unroll_state_dict_roundtrip_is_bit_exact():
    meta = init_meta_params(CFG, 0)
    fam = QuadraticFamily()
    est = TruncatedBPTT(CFG, 2, 20, lr=10.0)
    unrolls = [est.init_unroll(fam.sample(s), meta, s) for s in (0, 1)]
    _, unrolls = est.estimate(meta, unrolls, seed=0)
    loaded = roundtrip(unrolls)
    assert [u.task.spec for u in loaded] == [u.task.spec for u in unrolls]
    a, ua = est.estimate(meta, unrolls, seed=1)
    b, ub = est.estimate(meta, loaded, seed=1)
    assert_same_estimate(a, b)
    for x, y in zip(ua, ub):
        assert all(torch.equal(x.params[k], y.params[k]) for k in x.params)


# ----------------------------------------------------------------------------------
# ES / PES.
# ----------------------------------------------------------------------------------
def flat(grads):
    return torch.cat([g.reshape(-1) for g in grads.values()])


def whole_unroll_estimate(est, task, meta, run):
    """ES/PES over one whole unroll (horizon/truncation estimates, seeds from ``run``),
    rescaled to the gradient of the mean loss of θ_1 … θ_H: each estimate is of a
    *mean* over its T steps, so the sum over truncations is scaled by T/H."""
    u, total, k = est.init_unroll(task, meta, seed=0), 0.0, 0
    while not u.done(est.horizon):
        e, (u,) = est.estimate(meta, [u], seed=1000 * run + k)
        assert e.finite
        total, k = total + flat(e.grads), k + 1
    return total * (est.truncation / est.horizon)


@pytest.mark.parametrize("cls, truncation", [(TruncatedES, 4), (PersistentES, 2)],
                         ids=["es_full_horizon", "pes_two_truncations"])
def test_es_and_pes_are_unbiased_on_a_quadratic(cls, truncation):
    # The truth: the exact gradient of the mean loss of θ_1 … θ_4 (TBPTT over the whole
    # horizon, second order: ES differentiates the true loss, Hessian terms included).
    task, meta, horizon, lr = quad(), meta64(), 4, 30.0
    exact = TruncatedBPTT(CFG, horizon, horizon, lr=lr, second_order=True)
    truth = flat(exact.estimate(meta, [exact.init_unroll(task, meta, 0)], seed=0)[0].grads)
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(truth.shape, generator=gen, dtype=F64)
    dirs = {"along the gradient": truth / truth.norm(), "random": w / w.norm()}
    # σ = 1e-3 in float64: the smoothing bias is O(σ²) relative (≈ 1e-6), far below the
    # sampling error; the tolerance is 4 standard errors of the mean of 8 independent
    # whole-unroll estimates (each over 200 antithetic pairs), so a correct estimator
    # fails with probability ≈ 1e-4 — and the fixed seeds make the outcome fixed.
    est = cls(CFG, truncation, horizon, sigma=1e-3, n_particles=200, lr=lr)
    samples = torch.stack([whole_unroll_estimate(est, task, meta, run) for run in range(8)])
    for name, d in dirs.items():
        proj = samples @ d
        mean, se = float(proj.mean()), float(proj.std() / len(proj) ** 0.5)
        want = float(truth @ d)
        assert abs(mean - want) < 4 * se, (name, mean, want, se)
        assert se < 0.05 * float(truth.norm()), (name, se)  # the test has power


def test_truncation_bias_is_what_pes_removes():
    # Truncated ES with T=2 over H=4 estimates the sum of the truncations' *greedy*
    # gradients (each ignoring its effect on the state the next starts from) — the
    # TBPTT(T=2) gradient — not the gradient of the whole unroll, which PES matches.
    task, meta, lr = quad(), meta64(), 30.0
    exact = TruncatedBPTT(CFG, 4, 4, lr=lr, second_order=True)
    truth = flat(exact.estimate(meta, [exact.init_unroll(task, meta, 0)], seed=0)[0].grads)
    greedy_est = TruncatedBPTT(CFG, 2, 4, lr=lr, second_order=True)
    greedy = whole_unroll_estimate(greedy_est, task, meta, 0)
    es = TruncatedES(CFG, 2, 4, sigma=1e-3, n_particles=200, lr=lr)
    samples = torch.stack([whole_unroll_estimate(es, task, meta, run) for run in range(8)])
    d = (truth - greedy) / (truth - greedy).norm()  # the direction the bias lies in
    proj = samples @ d
    mean, se = float(proj.mean()), float(proj.std() / len(proj) ** 0.5)
    assert abs(mean - float(greedy @ d)) < 4 * se
    assert float((truth - greedy) @ d) > 8 * se  # the bias is resolved, not noise


def loop_pes_truncation(est, u, meta, eps):
    """One PES truncation, particle by particle (no vmap): the particles' meta-losses."""
    names, n = list(u.params), est.n_particles
    losses = []
    for j in range(2 * n):
        sign = 1.0 if j < n else -1.0
        mp = OrderedDict((k, v + sign * eps[k][j % n]) for k, v in meta.items())
        params = [p[j] for p in u.params.values()]
        state = type(u.state)(*[[t[j] for t in lst] for lst in u.state])
        terms = []
        for t in range(est.truncation):
            x = [p.detach().requires_grad_() for p in params]
            g = torch.autograd.grad(u.task.loss(OrderedDict(zip(names, x)),
                                                u.task.batch(u.step + t)), x)
            params, state = update(params, list(g), state, mp, CFG, lr=est.lr, fused=False)
            terms.append(u.task.loss(OrderedDict(zip(names, params)), u.task.batch(u.step + t + 1)))
        losses.append(torch.stack(terms).mean())
    return torch.stack(losses).detach()


def test_pes_vmapped_particles_match_a_loop_and_accumulate():
    task, meta = quad(noise=0.2), meta64()
    est = PersistentES(CFG, 2, 8, sigma=0.05, n_particles=3, lr=30.0)
    u = est.init_unroll(task, meta, seed=0)
    e, (u1,) = est.estimate(meta, [u], seed=5)
    eps0 = est.draw(meta, 5, 0)
    for k in meta:  # ξ after one truncation is its perturbation
        torch.testing.assert_close(u1.extra[PES_ACCUM + k], eps0[k], rtol=0, atol=0)
    assert not torch.equal(u1.params["x"][0], u1.params["x"][3])  # particles diverged
    eps1 = est.draw(meta, 6, 0)
    want = loop_pes_truncation(est, u1, meta, eps1)
    xi = OrderedDict((k, eps0[k] + eps1[k]) for k in meta)
    e2, (u2,) = est.estimate(meta, [u1], seed=6)
    diff = want[:3] - want[3:]
    for k in meta:
        g = torch.tensordot(diff, xi[k], dims=1) / (2 * 0.05 ** 2 * 3)
        torch.testing.assert_close(e2.grads[k], g, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(u2.extra[PES_ACCUM + k], xi[k])
    assert e2.meta_loss == pytest.approx(float(want.mean()), rel=1e-12)


def count_fused_steps(monkeypatch):
    """Patch the estimators' per-particle fused step to count its calls."""
    calls = []
    real = es_module._AntitheticES._fused_step

    def counted(self, *args):
        calls.append(1)
        return real(self, *args)

    monkeypatch.setattr(es_module._AntitheticES, "_fused_step", counted)
    return calls


@pytest.mark.parametrize("cfg", [CFG, MLPConfig(learn_decays=True)],
                         ids=["default", "learn_decays"])
@pytest.mark.parametrize("cls", [TruncatedES, PersistentES], ids=["es", "pes"])
def test_es_fused_particle_steps_match_the_vmapped_reference(cls, cfg, monkeypatch):
    calls = count_fused_steps(monkeypatch)
    meta = init_meta_params(cfg, 0)  # learn_decays: each particle perturbs its decays
    task = QuadraticTask(0, dim=FUSED_MIN_NUMEL + 88, cond=10.0, noise=0.1)  # fp32
    out = {}
    for fused in (None, True, False):
        est = cls(cfg, 3, 12, sigma=0.01, n_particles=3, lr=10.0, fused=fused)
        unrolls = [est.init_unroll(task, meta, seed=0)]
        before = len(calls)
        estimates = []
        for seed in range(2):  # the second truncation starts from a non-zero rule state
            e, unrolls = est.estimate(meta, unrolls, seed=seed)
            assert e.finite
            estimates.append(e)
        out[fused] = (estimates, unrolls[0])
        assert (len(calls) > before) == (fused is not False), fused  # 3 steps x 2
    for (a, b) in zip(out[None][0], out[True][0]):
        assert_same_estimate(a, b)  # the default took the fused loop here
    for (a, b) in zip(out[True][0], out[False][0]):
        assert a.meta_loss == pytest.approx(b.meta_loss, rel=1e-6)
        # The paths differ by float32 rounding (params within an ulp), which an ES
        # difference quotient amplifies by ~1/σ: compared norm-wise (measured ≤ 2e-5).
        diff = torch.cat([(a.grads[k] - b.grads[k]).flatten() for k in a.grads]).norm()
        assert diff <= 1e-4 * torch.cat([g.flatten() for g in b.grads.values()]).norm()
    for x, y in zip(out[True][1].params.values(), out[False][1].params.values()):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_es_small_particles_keep_the_vmapped_reference(monkeypatch):
    calls = count_fused_steps(monkeypatch)
    meta = init_meta_params(CFG, 0)
    est = PersistentES(CFG, 2, 8, sigma=0.01, n_particles=2)
    e, _ = est.estimate(meta, [est.init_unroll(quad(dim=FUSED_MIN_NUMEL - 1), meta, 0)],
                        seed=0)
    assert e.finite and calls == []
    with pytest.raises(TypeError, match="fused"):
        PersistentES(CFG, 2, 8, fused="yes")


@pytest.mark.parametrize("cls", [TruncatedES, PersistentES], ids=["es", "pes"])
def test_es_deterministic_from_seed_and_roundtrip(cls):
    meta = init_meta_params(CFG, 0)
    fam = QuadraticFamily()
    est = cls(CFG, 2, 20, sigma=0.01, n_particles=4, lr=10.0)
    unrolls = [est.init_unroll(fam.sample(s), meta, s) for s in (0, 1)]
    _, unrolls = est.estimate(meta, unrolls, seed=0)
    a, _ = est.estimate(meta, unrolls, seed=1)
    b, _ = est.estimate(meta, roundtrip(unrolls), seed=1)
    assert_same_estimate(a, b)
    c, _ = est.estimate(meta, unrolls, seed=2)
    assert not torch.equal(flat(a.grads), flat(c.grads))


@pytest.mark.parametrize("cls", [TruncatedES, PersistentES], ids=["es", "pes"])
def test_es_nonfinite_resets_the_unroll(cls):
    meta = meta64()
    est = cls(CFG, 2, 10, sigma=0.01, n_particles=2, lr=30.0, max_grad_norm=1.0)
    unrolls = [est.init_unroll(InfAfter(1, bad_step=3), meta, 0),
               est.init_unroll(quad(2), meta, 0)]
    e, unrolls = est.estimate(meta, unrolls, seed=0)
    assert e.finite and e.metrics["grad_norm"] > 0
    assert sum(float(g.square().sum()) for g in e.grads.values()) <= 1.0 + 1e-12  # clipped
    e, new = est.estimate(meta, unrolls, seed=1)
    assert not e.finite and e.metrics["n_nonfinite"] == 1.0
    assert all(float(g.abs().sum()) == 0.0 for g in e.grads.values())
    assert new[0].step == 0 and new[1].step == 4
    assert all(float(v.abs().sum()) == 0.0 for v in new[0].extra.values())


def test_es_bad_args():
    with pytest.raises(ValueError, match="sigma"):
        PersistentES(CFG, 2, 4, sigma=0.0)
    with pytest.raises(ValueError, match="n_particles"):
        TruncatedES(CFG, 2, 4, n_particles=0)
    with pytest.raises(TypeError, match="config"):
        PersistentES({}, 2, 4)
    meta = init_meta_params(CFG, 0)
    u = PersistentES(CFG, 2, 4, n_particles=2).init_unroll(quad(), meta, 0)
    with pytest.raises(ValueError, match="particles"):
        PersistentES(CFG, 2, 4, n_particles=3).estimate(meta, [u], seed=0)


# ----------------------------------------------------------------------------------
# Truncation detaches: nothing grows over 1,000 outer iterations.
# ----------------------------------------------------------------------------------
def live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def run_outer_loop(est, meta, task, iters, check_at):
    """``iters`` estimates on one unroll (restarted when done); returns the live
    tensor count and resident memory at each iteration in ``check_at``. A non-finite
    estimate (a perturbed particle diverging) is allowed: its reset path must not leak
    either."""
    u, seen, n_finite = est.init_unroll(task, meta, 0), {}, 0
    for it in range(iters):
        e, (u,) = est.estimate(meta, [u], seed=it)
        n_finite += e.finite
        for t in (list(u.params.values()) + [t for lst in u.state for t in lst]
                  + list(u.extra.values())):
            assert t.grad_fn is None and not t.requires_grad
        if u.done(est.horizon):
            u = est.init_unroll(task, meta, it)
        if it in check_at:
            seen[it] = (live_tensors(), rss_bytes())
    assert n_finite > 0.9 * iters
    return seen


def test_tbptt_memory_does_not_grow_over_1000_outer_iterations():
    # dim 4096: a leaked truncation graph would keep ≳ 12 state/input planes of the
    # fused step per iteration (≈ 200 KB), i.e. ≳ 150 MB over the last 800 iterations.
    meta = init_meta_params(CFG, 0)
    est = TruncatedBPTT(CFG, 1, 50, lr=10.0)
    seen = run_outer_loop(est, meta, quad(dim=4096), 1000, {199, 999})
    (n0, r0), (n1, r1) = seen[199], seen[999]
    assert n1 <= n0, (n0, n1)
    assert r1 - r0 < 32 << 20, f"resident memory grew by {(r1 - r0) / 2**20:.1f} MB"


def test_pes_memory_does_not_grow_over_1000_outer_iterations():
    meta = init_meta_params(CFG, 0)
    est = PersistentES(CFG, 1, 50, sigma=0.01, n_particles=2, lr=1.0)
    seen = run_outer_loop(est, meta, quad(dim=256), 1000, {199, 999})
    (n0, r0), (n1, r1) = seen[199], seen[999]
    assert n1 <= n0, (n0, n1)
    assert r1 - r0 < 32 << 20, f"resident memory grew by {(r1 - r0) / 2**20:.1f} MB"
