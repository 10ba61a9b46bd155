"""torch.ops.pyoptk.mlp_update_: the in-place op against the functional update (bit for
bit), an independent per-element re-derivation of the math, odd shapes, ragged lists,
low precision, NaN gradients, bad input and opcheck."""

import math

import pytest
import torch

import pyoptk
from pyoptk.learned import MLPConfig, FeatureConfig, init_meta_params, init_state, update
from pyoptk.learned.mlp import decays_tensor, meta_weights
from pyoptk.ops.mlp_update import mlp_update_, mlp_update_particles_
from helpers import STEP_TOL, assert_close

ODD_SHAPES = [(), (1,), (0,), (3,), (1, 1), (7, 1), (1, 7), (5, 13, 7), (33, 65), (2, 0, 3),
              (2, 3, 1, 4)]
SMALL_CFG = MLPConfig(hidden_sizes=(8,))


def make(shapes, dtype=torch.float32, seed=0, config=None):
    config = config or MLPConfig()
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    state = init_state(params, config, dtype=torch.float32)
    return params, state


def grads_for(params, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(p.shape, generator=g) * scale).to(p.dtype) for p in params]


def op_step(params, grads, state, meta, config, lr=1.0, weight_decay=0.0):
    hp = config.op_hyper(lr, weight_decay)
    mlp_update_(params, grads, state.mom, state.rms, state.fac_row, state.fac_col, state.step,
                meta_weights(meta, config), decays_tensor(config, meta), hp)


def clone(params, state):
    return [p.clone() for p in params], type(state)(*[[t.clone() for t in f] for f in state])


@pytest.mark.parametrize("config", [MLPConfig(), SMALL_CFG, MLPConfig(learn_decays=True),
                                    MLPConfig(features=FeatureConfig(
                                        momentum_decays=(0.9,), rms_decays=(),
                                        adafactor_decays=(), fac_momentum_decay=None,
                                        time_timescales=()), hidden_sizes=(4, 4, 4))],
                         ids=["default", "small", "learn_decays", "minimal"])
def test_op_equals_functional_bitwise(config):
    # The 'torch' backend runs the functional update's reference path (fused=False)
    # itself; the native backends are compared with it within tolerance
    # (tests/test_native_mlp_update.py).
    meta = init_meta_params(config, seed=3)
    params, state = make(ODD_SHAPES, config=config)
    fparams, fstate = clone(params, state)
    for step in range(4):
        grads = grads_for(params, 10 + step)
        with pyoptk.use_backend("torch"):
            op_step(params, grads, state, meta, config, lr=0.7, weight_decay=0.1)
        fparams, fstate = update(fparams, grads, fstate, meta, config, lr=0.7, weight_decay=0.1,
                                 fused=False)
    for i in range(len(params)):
        assert torch.equal(params[i], fparams[i]), f"params[{i}] shape {ODD_SHAPES[i]}"
        for name, a, b in zip(fstate._fields, state, fstate):
            assert torch.equal(a[i], b[i]), f"{name}[{i}] shape {ODD_SHAPES[i]}"
    assert all(s.item() == 4 for s in state.step)


# --------------------------------------------------------------------------------
# An independent, element-by-element derivation of the rule from docs/learned.md.
# --------------------------------------------------------------------------------
FLOOR = 2.0 ** -7  # the factor features' floor, written out independently


def naive_step(p, g, mom, rms, frow, fcol, step, meta, cfg, lr, wd):
    f = cfg.features
    K, R, F = f.n_mom, f.n_rms, f.n_fac
    shape = tuple(p.shape)
    n = max(1, math.prod(shape))
    P, G = p.reshape(n).tolist(), g.reshape(n).tolist()
    bm, br, bf = f.momentum_decays, f.rms_decays, f.adafactor_decays
    M = [[bm[k] * mom[k].reshape(n)[e].item() + (1 - bm[k]) * G[e] for e in range(n)] for k in range(K)]
    V = [[br[j] * rms[j].reshape(n)[e].item() + (1 - br[j]) * G[e] ** 2 for e in range(n)]
         for j in range(R)]
    if len(shape) >= 2:
        cols = shape[-1]
        rows = n // cols
        rc = lambda e: (e // cols, e % cols)  # noqa: E731
        g2 = lambda r, c: G[r * cols + c] ** 2 + f.fac_eps  # noqa: E731
        row_new = [[bf[q] * frow[q, r].item() + (1 - bf[q]) * sum(g2(r, c) for c in range(cols)) / cols
                    for r in range(rows)] for q in range(F)]
        col_new = [[bf[q] * fcol[q, c].item() + (1 - bf[q]) * sum(g2(r, c) for r in range(rows)) / rows
                    for c in range(cols)] for q in range(F)]
        vbar = [sum(row_new[q]) / rows for q in range(F)]
        vhat = [[row_new[q][rc(e)[0]] * col_new[q][rc(e)[1]] / vbar[q] for e in range(n)]
                for q in range(F)]
        rowf = [[(row_new[q][rc(e)[0]] / vbar[q] + FLOOR) ** -0.5 for e in range(n)] for q in range(F)]
        colf = [[(col_new[q][rc(e)[1]] / vbar[q] + FLOOR) ** -0.5 for e in range(n)] for q in range(F)]
    else:
        full = [[bf[q] * frow[q].reshape(n)[e].item() + (1 - bf[q]) * (G[e] ** 2 + f.fac_eps)
                 for e in range(n)] for q in range(F)]
        vbar = [sum(full[q]) / n for q in range(F)]
        vhat = full
        rowf = colf = [[(full[q][e] / vbar[q] + FLOOR) ** -0.5 for e in range(n)] for q in range(F)]
    # normalized features, one list per plane
    planes = [G, P] + M + V
    planes += [[M[k][e] * (V[j][e] + f.eps) ** -0.5 for e in range(n)]
               for k in range(K) for j in range(R)]
    planes += [[(V[j][e] + f.eps) ** -0.5 for e in range(n)] for j in range(R)]
    normed = []
    for pl in planes:
        s = (sum(x * x for x in pl) / n + f.norm_eps) ** -0.5
        normed.append([x * s for x in pl])
    k_ = f.log_sign_k
    ghat = normed[0]
    lsl = [math.log(abs(x)) / k_ if abs(x) >= math.exp(-k_) else -1.0 for x in ghat]
    lss = [math.copysign(1.0, x) if abs(x) >= math.exp(-k_) else math.exp(k_) * x for x in ghat]
    free = [lsl, lss]
    free += [[G[e] * (vhat[q][e] + f.eps) ** -0.5 for e in range(n)] for q in range(F)]
    if f.fac_momentum_decay is not None:
        km = f.momentum_decays.index(f.fac_momentum_decay)
        free += [[M[km][e] * (vhat[q][e] + f.eps) ** -0.5 for e in range(n)] for q in range(F)]
    free += rowf + colf
    t = step.item() + 1
    time = [[math.tanh(t / tau - 1)] * n for tau in f.time_timescales]
    x = torch.tensor(normed + free + time, dtype=torch.float64).t()
    h = x
    ws = meta_weights(meta, cfg)
    for i in range(len(ws) // 2):
        h = h @ ws[2 * i].double() + ws[2 * i + 1].double()
        if i < len(ws) // 2 - 1:
            h = h.relu()
    d, a = h[:, 0], h[:, 1]
    Pt = torch.tensor(P, dtype=torch.float64)
    newp = Pt - lr * cfg.step_mult * (d * torch.exp(cfg.exp_mult * a) + wd * Pt)
    return newp.reshape(shape), torch.tensor(M, dtype=torch.float64).reshape(mom.shape)


@pytest.mark.parametrize("shape", [(), (1,), (4,), (3, 4), (2, 3, 2), (1, 5)], ids=str)
def test_matches_naive_derivation(shape):
    cfg = MLPConfig()
    meta = init_meta_params(cfg, seed=1, dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)
    p = torch.randn(shape, generator=gen, dtype=torch.float64)
    st = init_state([p], cfg)
    # non-trivial state: run two steps first
    for s in range(2):
        ps, st = update([p], [torch.randn(shape, generator=gen, dtype=torch.float64)], st, meta, cfg)
        p = ps[0]
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    g.reshape(-1)[0] = 1e-9  # exercise the small branch of log-sign
    exp_p, exp_m = naive_step(p, g, st.mom[0], st.rms[0], st.fac_row[0], st.fac_col[0],
                              st.step[0], meta, cfg, lr=0.5, wd=0.3)
    new_p, new_st = update([p], [g], st, meta, cfg, lr=0.5, weight_decay=0.3)
    assert_close(new_st.mom[0], exp_m, 1e-12, 1e-10, "mom")
    assert_close(new_p[0], exp_p, 1e-12, 1e-10, "param")
    assert (new_p[0] != p).all() or p.numel() == 0


def test_ragged_lists_equal_one_at_a_time():
    cfg = SMALL_CFG
    meta = init_meta_params(cfg)
    params, state = make(ODD_SHAPES, config=cfg)
    grads = grads_for(params, 1)
    singles = []
    for i in range(len(params)):
        p1, s1 = clone([params[i]], type(state)(*[[f[i]] for f in state]))
        op_step(p1, [grads[i]], s1, meta, cfg)
        singles.append(p1[0])
    op_step(params, grads, state, meta, cfg)
    for i, (a, b) in enumerate(zip(params, singles)):
        assert torch.equal(a, b), f"params[{i}]"


def stacked(ts):
    return [torch.stack(list(t)) for t in zip(*ts)]


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
@pytest.mark.parametrize("config", [MLPConfig(hidden_sizes=(8, 8)),  # two layers: Triton's
                                    MLPConfig(hidden_sizes=(8, 8), learn_decays=True)],
                         ids=["small", "learn_decays"])
def test_particles_equal_one_op_call_per_particle(config, backend):
    # Three rules (different meta-parameters) over the odd shapes (a few under Triton's
    # interpreter, ~6 s per shape); particle 1 has a NaN in one gradient, which must skip
    # that tensor of that particle only.
    P = 3
    shapes = [(), (7, 1), (5, 13, 7)] if backend == "triton" else \
        [s for s in ODD_SHAPES if s != (0,)]
    bad = shapes.index((5, 13, 7))
    metas = [init_meta_params(config, seed=j) for j in range(P)]
    runs = [make(shapes, seed=j, config=config) for j in range(P)]
    grads = [grads_for(runs[j][0], 10 + j) for j in range(P)]
    grads[1][bad].view(-1)[0] = float("nan")
    params = stacked([r[0] for r in runs])
    state = type(runs[0][1])(*[stacked([r[1][f] for r in runs]) for f in range(5)])
    hp = config.op_hyper(0.5)
    if backend == "triton":
        pytest.importorskip("triton")
    with pyoptk.use_backend(backend):  # triton: its interpreter on CPU
        mlp_update_particles_(
            params, stacked(grads), state.mom, state.rms, state.fac_row, state.fac_col,
            state.step, stacked([meta_weights(m, config) for m in metas]),
            torch.stack([decays_tensor(config, m) for m in metas]), hp)
    for j in range(P):
        p1, s1 = clone(*runs[j])
        before = p1[bad].clone()
        with pyoptk.use_backend(backend):
            op_step(p1, grads[j], s1, metas[j], config, lr=0.5)
        for i in range(len(shapes)):
            assert torch.equal(params[i][j], p1[i]), (j, i)
            for f in range(5):
                assert torch.equal(state[f][i][j], s1[f][i]), (j, i, f)
        assert torch.equal(p1[bad], before) == (j == 1)  # the NaN skipped only its tensor


@pytest.mark.gpu
def test_particles_on_cuda_equal_one_call_per_particle():
    # The same on the GPU's backend (Triton): one mlp_update_ call per particle.
    cfg, P, dev = MLPConfig(), 3, torch.device("cuda")
    shapes = [(33, 65), (7,), ()]
    metas = [{k: v.to(dev) for k, v in init_meta_params(cfg, seed=j).items()}
             for j in range(P)]
    runs = [make(shapes, seed=j, config=cfg) for j in range(P)]
    runs = [([p.to(dev) for p in ps], type(st)(*[[t.to(dev) for t in f] for f in st]))
            for ps, st in runs]
    grads = [[g.to(dev) for g in grads_for(runs[j][0], 10 + j)] for j in range(P)]
    params = stacked([r[0] for r in runs])
    state = type(runs[0][1])(*[stacked([r[1][f] for r in runs]) for f in range(5)])
    mlp_update_particles_(
        params, stacked(grads), state.mom, state.rms, state.fac_row, state.fac_col,
        state.step, stacked([meta_weights(m, cfg) for m in metas]),
        torch.stack([decays_tensor(cfg, m, device=dev) for m in metas]), cfg.op_hyper(0.5))
    for j in range(P):
        p1, s1 = clone(*runs[j])
        op_step(p1, grads[j], s1, metas[j], cfg, lr=0.5)
        for i in range(len(shapes)):
            assert torch.equal(params[i][j], p1[i]), (j, i)


def test_particles_reject_bad_layouts():
    cfg = SMALL_CFG
    params, state = make([(4, 3)], config=cfg)
    meta = init_meta_params(cfg)
    P = 2
    rep = lambda xs: [x.unsqueeze(0).repeat((P,) + (1,) * x.dim()) for x in xs]  # noqa: E731
    args = [rep(params), rep(grads_for(params, 0))] + [rep(f) for f in
                                                       (state.mom, state.rms, state.fac_row,
                                                        state.fac_col, state.step)]
    w = rep(meta_weights(meta, cfg))
    d = decays_tensor(cfg).expand(P, -1).contiguous()
    hp = cfg.op_hyper()
    with pytest.raises(TypeError, match="decays must be a \\[P, K\\+R\\+F\\] tensor"):
        mlp_update_particles_(*args, w, d[0], hp)
    with pytest.raises(ValueError, match="grads\\[0\\] must be a contiguous tensor with a "
                                         "leading particle dimension 2"):
        mlp_update_particles_(args[0], [args[1][0][:1]], *args[2:], w, d, hp)
    with pytest.raises(TypeError, match="steps\\[0\\] must be a torch.Tensor"):
        mlp_update_particles_(*args[:6], [0.0], w, d, hp)
    with pytest.raises(ValueError, match="params\\[0\\] must be a contiguous"):
        mlp_update_particles_([args[0][0].transpose(1, 2)], *args[1:], w, d, hp)
    with pytest.raises(ValueError, match="mlp_update_particles_: moms"):  # particle 0's checks
        mlp_update_particles_(args[0], args[1], [args[2][0][:, :1].contiguous()], *args[3:],
                              w, d, hp)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_params_fp32_state(dtype):
    cfg = SMALL_CFG
    meta = init_meta_params(cfg)
    shapes = [(1,), (37,), (5, 13, 7)]
    params, state = make(shapes, dtype=dtype, config=cfg)
    ref_params = [p.float() for p in params]
    ref_state = type(state)(*[[t.clone() for t in f] for f in state])
    atol, rtol = STEP_TOL[dtype]
    for step in range(5):
        grads = grads_for(params, step)
        op_step(params, grads, state, meta, cfg, lr=50.0)  # big steps: visible in bf16
        ref_params, ref_state = update(ref_params, [g.float() for g in grads], ref_state, meta, cfg,
                                       lr=50.0)
        ref_params = [p.to(dtype).float() for p in ref_params]  # same rounding per step
    for p, r in zip(params, ref_params):
        assert p.dtype == dtype
        assert_close(p, r, atol, rtol, "param")
    for name, a, b in zip(state._fields, state, ref_state):
        for x, y in zip(a, b):
            assert x.dtype == torch.float32
            assert_close(x, y, 1e-5, 1e-4, name)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_nonfinite_grad_skips_that_tensor(bad):
    cfg = SMALL_CFG
    meta = init_meta_params(cfg)
    params, state = make([(3, 4), (5,), ()], config=cfg)
    op_step(params, grads_for(params, 0), state, meta, cfg)  # non-zero state first
    before_p, before_s = clone(params, state)
    grads = grads_for(params, 1)
    grads[0][1, 2] = bad
    grads[2] = torch.tensor(bad)
    op_step(params, grads, state, meta, cfg)
    for i in (0, 2):
        assert torch.equal(params[i], before_p[i])
        for a, b in zip(state, before_s):
            assert torch.equal(a[i], b[i])
    assert state.step[0].item() == 1 and state.step[1].item() == 2
    assert not torch.equal(params[1], before_p[1]) and torch.isfinite(params[1]).all()
    # the functional update skips identically, and keeps autograd finite
    fp, fs = clone(before_p, before_s)
    meta_g = {k: v.clone().requires_grad_() for k, v in meta.items()}
    out, _ = update(fp, grads, fs, meta_g, cfg)
    sum(o.sum() for o in out).backward()
    assert all(torch.isfinite(v.grad).all() for v in meta_g.values())
    for i in range(3):
        assert torch.equal(out[i].detach(), params[i])


def test_lr_tensor_equals_lr_float():
    cfg = SMALL_CFG
    meta = init_meta_params(cfg)
    a, sa = make([(4, 5), (3,)], config=cfg)
    b, sb = clone(a, sa)
    grads = grads_for(a, 0)
    op_step(a, grads, sa, meta, cfg, lr=torch.tensor([0.5]))
    op_step(b, grads, sb, meta, cfg, lr=0.5)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_first_step_is_tiny():
    cfg = MLPConfig()
    meta = init_meta_params(cfg)
    params, state = make([(64, 32), (32,)], config=cfg)
    before = [p.clone() for p in params]
    op_step(params, grads_for(params, 0), state, meta, cfg)
    for p, q in zip(params, before):
        assert 0 < (p - q).abs().max() < 1e-3


def test_empty_list_and_forced_backend():
    cfg = SMALL_CFG
    op_step([], [], init_state([], cfg), init_meta_params(cfg), cfg)
    params, state = make([(3,)], config=cfg)
    with pyoptk.use_backend("torch"):
        op_step(params, grads_for(params, 0), state, init_meta_params(cfg), cfg)
    with pyoptk.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="no 'cuda' backend"):
            op_step(params, grads_for(params, 0), state, init_meta_params(cfg), cfg)


def test_opcheck():
    cfg = SMALL_CFG
    meta = init_meta_params(cfg)
    params, state = make([(3, 4), (5,), ()], config=cfg)
    hp = cfg.op_hyper(1.0, 0.01)
    args = (params, grads_for(params, 0), state.mom, state.rms, state.fac_row, state.fac_col,
            state.step, meta_weights(meta, cfg), decays_tensor(cfg, meta), hp.n_mom, hp.n_rms,
            hp.n_fac, hp.fac_mom_index, hp.log_sign_k, list(hp.timescales), hp.eps,
            hp.norm_eps, hp.fac_eps, hp.exp_mult, hp.step_mult, hp.lr, None, hp.weight_decay)
    torch.library.opcheck(torch.ops.pyoptk.mlp_update_.default, args)


class TestBadInput:
    def setup_method(self):
        self.cfg = SMALL_CFG
        self.meta = init_meta_params(self.cfg)
        self.params, self.state = make([(4,), (2, 3)], config=self.cfg)
        self.grads = grads_for(self.params, 0)

    def call(self, **over):
        s = self.state
        kw = dict(params=self.params, grads=self.grads, moms=s.mom, rmss=s.rms,
                  fac_rows=s.fac_row, fac_cols=s.fac_col, steps=s.step,
                  weights=meta_weights(self.meta, self.cfg),
                  decays=decays_tensor(self.cfg, self.meta), hp=self.cfg.op_hyper())
        kw.update(over)
        mlp_update_(**kw)

    def test_wrong_feature_config(self):
        other = MLPConfig(features=FeatureConfig(fac_momentum_decay=None), hidden_sizes=(8,))
        with pytest.raises(ValueError, match="w0 has shape \\(39, 8\\) but the feature config "
                                             "produces 36 features"):
            self.call(hp=other.op_hyper())

    def test_wrong_state_shape(self):
        moms = [self.state.mom[0], torch.zeros(4, 2, 3)]
        with pytest.raises(ValueError, match=r"moms\[1\] has shape \(4, 2, 3\), expected \(5, 2, 3\)"):
            self.call(moms=moms)

    def test_state_must_be_fp32(self):
        with pytest.raises(TypeError, match=r"rmss\[0\] must be float32"):
            self.call(rmss=[self.state.rms[0].double(), self.state.rms[1]])

    def test_factored_shapes(self):
        with pytest.raises(ValueError, match=r"fac_cols\[1\] has shape \(3, 2\), expected \(3, 3\)"):
            self.call(fac_cols=[self.state.fac_col[0], torch.zeros(3, 2)])

    def test_length_mismatch(self):
        with pytest.raises(ValueError, match="grads has 1 tensors but params has 2"):
            self.call(grads=self.grads[:1])

    def test_mixed_param_dtypes(self):
        with pytest.raises(TypeError, match="one parameter dtype"):
            self.call(params=[self.params[0], self.params[1].bfloat16()])

    def test_non_contiguous(self):
        with pytest.raises(ValueError, match="not contiguous"):
            self.call(params=[self.params[0], torch.randn(3, 2).t()],
                      grads=[self.grads[0], torch.randn(3, 2).t()])

    def test_decays_shape(self):
        with pytest.raises(ValueError, match=r"decays has shape \(8,\), expected \(9,\)"):
            self.call(decays=torch.zeros(8))

    def test_negative_lr(self):
        with pytest.raises(ValueError, match="Invalid learning rate"):
            self.call(hp=self.cfg.op_hyper(-1.0))

    def test_bad_hyper(self):
        hp = self.cfg.op_hyper()
        import dataclasses
        with pytest.raises(ValueError, match="fac_mom_index"):
            self.call(hp=dataclasses.replace(hp, fac_mom_index=7))
        with pytest.raises(ValueError, match="norm_eps"):
            self.call(hp=dataclasses.replace(hp, norm_eps=0.0))

    def test_meta_params_must_match_config_in_functional(self):
        other = MLPConfig(features=FeatureConfig(fac_momentum_decay=None), hidden_sizes=(8,))
        with pytest.raises(ValueError, match="w0 has shape \\(39, 8\\), expected \\(36, 8\\)"):
            update(self.params, self.grads, self.state, self.meta, other)


@pytest.mark.gpu
def test_cuda_op_matches_cpu_functional():
    cfg = MLPConfig()
    meta = init_meta_params(cfg, seed=3)
    params, state = make(ODD_SHAPES, config=cfg)
    ref_p, ref_s = clone(params, state)
    dev = torch.device("cuda")
    params = [p.to(dev) for p in params]
    state = type(state)(*[[t.to(dev) for t in f] for f in state])
    meta_d = {k: v.to(dev) for k, v in meta.items()}
    for step in range(3):
        grads = grads_for(ref_p, step)
        op_step(params, [g.to(dev) for g in grads], state, meta_d, cfg, lr=torch.ones(1, device=dev))
        ref_p, ref_s = update(ref_p, grads, ref_s, meta, cfg)
    for i, (a, b) in enumerate(zip(params, ref_p)):
        assert_close(a, b, 1e-6, 1e-5, f"params[{i}]")
    for name, a, b in zip(ref_s._fields, state, ref_s):
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, 1e-6, 1e-4, f"{name}[{i}]")


def test_factor_features_stay_bounded_for_dead_units():
    """A row whose gradients are all zero (a dead unit) and a vector element with a zero
    gradient get factor features at the floor's bound sqrt(1/FLOOR), not ~1e15."""
    from pyoptk.learned.features import FeatureConfig
    from pyoptk.ops.mlp_update import factored_features, factored_update

    F = len(FeatureConfig().adafactor_decays)
    for shape in [(6, 5), (7,)]:
        g = torch.randn(shape)
        g[0] = 0.0
        fr, fc = (torch.zeros(F, 6), torch.zeros(F, 5)) if len(shape) == 2 else \
            (torch.zeros(F, 7), torch.zeros(F, 0))
        decays = torch.tensor([0.9, 0.99, 0.999][:F])
        fr, fc, vbar = factored_update(fr, fc, g, decays, 1e-30)
        _, row_f, col_f = factored_features(fr, fc, vbar, shape)
        assert row_f.max() <= FLOOR ** -0.5 and col_f.max() <= FLOOR ** -0.5
        assert row_f.max() > 0.99 * FLOOR ** -0.5     # the dead row/element sits at it
