"""pyoptk.optim.MLPOptimizer / LearnedOptimizer: training-loop behaviour, buckets,
low precision, checkpoints (round trip, bit-exact resume, wrong rule refused) and
pretrained files."""

import copy
import io
import os

import pytest
import torch

import pyoptk
from helpers import STEP_TOL, assert_close

from pyoptk.learned import FeatureConfig, MLPConfig, init_meta_params, init_state, update
from pyoptk.learned import files as rule_io
from pyoptk.learned import pretrained
from pyoptk.optim import mlp as mlp_module
from pyoptk.optim.learned import RuleMismatchError
from pyoptk.optim.mlp import MLPOptimizer

SMALL = MLPConfig(hidden_sizes=(8,))


def model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    m.scale = torch.nn.Parameter(torch.tensor(1.5))  # a 0-dim parameter
    return m.to(dtype)


def data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 6, generator=g), torch.randn(32, 2, generator=g)


def loss_fn(m, x, y):
    return ((m(x.to(m[0].weight.dtype)) * m.scale - y.to(m[0].weight.dtype)) ** 2).float().mean()


def train(m, opt, steps, seed=1):
    x, y = data(seed)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(m, x, y).backward()
        opt.step()


def test_step_without_and_with_closure():
    m = model()
    opt = MLPOptimizer(m.parameters(), config=SMALL)
    x, y = data()
    before = [p.clone() for p in m.parameters()]
    loss_fn(m, x, y).backward()
    assert opt.step() is None
    assert all(not torch.equal(a, b) for a, b in zip(before, m.parameters()))

    def closure():
        opt.zero_grad()
        loss = loss_fn(m, x, y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0

    # the closure runs with grad enabled (step itself is no_grad) and its gradients are
    # the ones applied: the same run without a closure ends bit for bit the same
    m2 = model()
    opt2 = MLPOptimizer(m2.parameters(), config=SMALL)
    loss_fn(m2, x, y).backward()
    opt2.step()
    opt2.zero_grad()
    loss2 = loss_fn(m2, x, y)
    loss2.backward()
    opt2.step()
    assert torch.equal(loss, loss2)
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_params_without_grad_are_skipped():
    m = model()
    m[2].bias.requires_grad_(False)
    opt = MLPOptimizer(m.parameters(), config=SMALL)
    bias = m[2].bias.clone()
    train(m, opt, 2)
    assert torch.equal(m[2].bias, bias)
    assert m[2].bias not in opt.state
    assert opt.state[m[0].weight]["step"].item() == 2

    # a parameter that has state and then gets no gradient (frozen mid-run): its value
    # and state stay as they were, its step count does not advance
    m[0].weight.requires_grad_(False)
    w = m[0].weight.clone()
    st = {k: v.clone() for k, v in opt.state[m[0].weight].items()}
    opt.zero_grad()  # set_to_none: the frozen weight keeps grad None
    train(m, opt, 1)
    assert m[0].weight.grad is None and torch.equal(m[0].weight, w)
    assert all(torch.equal(opt.state[m[0].weight][k], v) for k, v in st.items())
    assert opt.state[m[0].bias]["step"].item() == 3

    # no gradient anywhere (e.g. a step after zero_grad): a no-op
    before = [p.clone() for p in m.parameters()]
    opt.zero_grad()
    assert opt.step() is None
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
def test_step_equals_functional_update(dtype, backend):
    """Also for bf16/fp16 models: state and math in fp32, the parameter rounded to its
    dtype once per step. 'torch' runs the functional update itself: bit for bit. 'auto'
    is the native CPU kernel: the same math up to summation order (fp32 1e-6 after 3
    steps; the parameter may round one ulp of its dtype the other way)."""
    cfg = SMALL
    meta = init_meta_params(cfg, seed=5)
    m = model(dtype)
    ref = [p.detach().clone() for p in m.parameters()]
    ref_state = init_state(ref, cfg)
    opt = MLPOptimizer(m.parameters(), meta_params=meta, config=cfg, lr_mult=0.5, weight_decay=0.01)
    x, y = data()
    for _ in range(3):
        opt.zero_grad()
        loss_fn(m, x, y).backward()
        grads = [p.grad.clone() for p in m.parameters()]
        with pyoptk.use_backend(backend):
            opt.step()
        ref, ref_state = update(ref, grads, ref_state, meta, cfg, lr=0.5, weight_decay=0.01,
                                fused=False)
    for p, r in zip(m.parameters(), ref):
        assert r.dtype == dtype
        if backend == "torch":
            assert torch.equal(p.detach(), r)
        else:
            assert_close(p.detach(), r, *STEP_TOL[dtype], what="param")
    for i, p in enumerate(m.parameters()):
        for k in ref_state._fields:
            got, want = opt.state[p][k], getattr(ref_state, k)[i]
            assert got.dtype == want.dtype == torch.float32, k
            if backend == "torch":
                assert torch.equal(got, want), k
            else:
                assert_close(got, want, 1e-6, 1e-5, what=k)


def test_one_op_call_per_bucket(monkeypatch):
    calls = []
    real = mlp_module.mlp_update_

    def counting(params, *args, **kw):
        calls.append((len(params), params[0].dtype))
        return real(params, *args, **kw)

    monkeypatch.setattr(mlp_module, "mlp_update_", counting)
    a, b = model(), model(torch.bfloat16)
    opt = MLPOptimizer([{"params": a.parameters()},
                        {"params": list(b.parameters()), "lr": 0.5}], config=SMALL)
    x, y = data()
    loss_fn(a, x, y).backward()
    loss_fn(b, x, y).backward()
    opt.step()
    assert calls == [(5, torch.float32), (5, torch.bfloat16)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_model_fp32_state(dtype):
    m = model(dtype)
    opt = MLPOptimizer(m.parameters(), config=SMALL, lr_mult=50.0)
    before = [p.clone() for p in m.parameters()]
    train(m, opt, 3)
    for p, b in zip(m.parameters(), before):
        assert p.dtype == dtype and torch.isfinite(p).all()
        assert all(t.dtype == torch.float32 for t in opt.state[p].values())
    # steps below half an ulp round away (no master weights): only the big ones show
    assert not torch.equal(m[0].weight, before[0]) and not torch.equal(m[2].weight, before[2])


def test_state_layout_and_bytes_per_param():
    cfg = MLPConfig()
    m = model()
    opt = MLPOptimizer(m.parameters(), config=cfg)
    train(m, opt, 1)
    st = opt.state[m[0].weight]  # (5, 6)
    assert {k: tuple(v.shape) for k, v in st.items()} == {
        "step": (), "mom": (5, 5, 6), "rms": (1, 5, 6), "fac_row": (3, 5), "fac_col": (3, 6)}
    st0 = opt.state[m.scale]     # 0-dim: full factored accumulator
    assert tuple(st0["fac_row"].shape) == (3,) and tuple(st0["fac_col"].shape) == (3, 0)
    for p in m.parameters():
        nbytes = sum(t.numel() * t.element_size() for t in opt.state[p].values())
        assert nbytes == cfg.features.state_bytes(p.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_state_dict_round_trip_bit_exact_resume(dtype):
    meta = init_meta_params(SMALL, seed=9)
    full = model(dtype)
    opt_full = MLPOptimizer(full.parameters(), meta_params=meta, config=SMALL, lr_mult=30.0)
    train(full, opt_full, 6)

    part = model(dtype)
    opt_part = MLPOptimizer(part.parameters(), meta_params=meta, config=SMALL, lr_mult=30.0)
    train(part, opt_part, 3)
    buf = io.BytesIO()
    torch.save({"model": part.state_dict(), "opt": opt_part.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    resumed = model(dtype, seed=123)
    resumed.load_state_dict(ckpt["model"])
    opt_res = MLPOptimizer(resumed.parameters(), meta_params=meta, config=SMALL, lr_mult=1.0)
    opt_res.load_state_dict(ckpt["opt"])
    assert opt_res.param_groups[0]["lr"] == 30.0
    for p in resumed.parameters():
        assert all(t.dtype == torch.float32 for t in opt_res.state[p].values())
    train(resumed, opt_res, 3)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(full.parameters(), resumed.parameters()):
        for k in opt_full.state[a]:
            assert torch.equal(opt_full.state[a][k], opt_res.state[b][k]), k


class TestRuleMismatch:
    def setup_method(self):
        m = model()
        self.opt = MLPOptimizer(m.parameters(), meta_params=init_meta_params(SMALL, seed=1),
                                config=SMALL)
        train(m, self.opt, 1)
        self.sd = copy.deepcopy(self.opt.state_dict())
        self.other_model = model()

    def test_other_meta_params_refused(self):
        opt = MLPOptimizer(self.other_model.parameters(),
                           meta_params=init_meta_params(SMALL, seed=2), config=SMALL)
        with pytest.raises(RuleMismatchError, match="different meta-parameters or config"):
            opt.load_state_dict(self.sd)
        assert len(opt.state) == 0  # nothing was loaded

    def test_other_config_refused(self):
        cfg = MLPConfig(hidden_sizes=(8,), exp_mult=2e-3)
        opt = MLPOptimizer(self.other_model.parameters(), meta_params=init_meta_params(cfg, seed=1),
                           config=cfg)
        with pytest.raises(ValueError, match="different meta-parameters or config"):
            opt.load_state_dict(self.sd)

    def test_other_version_refused(self):
        self.sd["rule"]["version"] = "0"
        opt = MLPOptimizer(self.other_model.parameters(), meta_params=self.opt.meta_params,
                           config=SMALL)
        with pytest.raises(RuleMismatchError, match="version '0'.*implements version '2'"):
            opt.load_state_dict(self.sd)

    def test_other_rule_and_plain_torch_checkpoint_refused(self):
        opt = MLPOptimizer(self.other_model.parameters(), meta_params=self.opt.meta_params,
                           config=SMALL)
        sd = dict(self.sd, rule=dict(self.sd["rule"], name="lstm"))
        with pytest.raises(RuleMismatchError, match="rule 'lstm' but this optimizer runs 'mlp'"):
            opt.load_state_dict(sd)
        adam = torch.optim.Adam(model().parameters())
        with pytest.raises(RuleMismatchError, match="no learned-rule identity"):
            opt.load_state_dict(adam.state_dict())

    def test_same_rule_accepted(self):
        opt = MLPOptimizer(self.other_model.parameters(), meta_params=self.opt.meta_params,
                           config=SMALL)
        opt.load_state_dict(self.sd)
        assert opt.rule_identity() == self.sd["rule"]


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ""])
def test_save_and_from_pretrained(tmp_path, suffix):
    if suffix == ".safetensors" and not rule_io.have_safetensors():
        pytest.skip("safetensors not installed")
    cfg = MLPConfig(features=FeatureConfig(momentum_decays=(0.5, 0.9), fac_momentum_decay=None),
                    hidden_sizes=(6, 5), learn_decays=True)
    opt = MLPOptimizer(model().parameters(), config=cfg, seed=7)
    path = opt.save_pretrained(tmp_path / f"rule{suffix}")
    assert os.path.isfile(path) and (suffix == "" or path.endswith(suffix))
    m = model()
    loaded = MLPOptimizer.from_pretrained(path, m.parameters(), lr_mult=0.5)
    assert loaded.config == cfg
    assert loaded.rule_identity() == opt.rule_identity()
    assert list(loaded.meta_params) == list(opt.meta_params)
    assert loaded.param_groups[0]["lr"] == 0.5
    train(m, loaded, 1)


def test_tampered_file_and_wrong_rule_refused(tmp_path):
    opt = MLPOptimizer(model().parameters(), config=SMALL)
    path = opt.save_pretrained(tmp_path / "r.pt")
    meta, info = rule_io.load_rule(path)
    meta["b0"] = meta["b0"] + 1
    rule_io.save_rule(tmp_path / "bad.pt", meta, info)
    with pytest.raises(RuleMismatchError, match="do not match the hash"):
        MLPOptimizer.from_pretrained(tmp_path / "bad.pt", model().parameters())
    meta, info = rule_io.load_rule(path)
    rule_io.save_rule(tmp_path / "lstm.pt", meta, dict(info, rule="lstm"))
    with pytest.raises(RuleMismatchError, match="holds learned rule 'lstm'"):
        MLPOptimizer.from_pretrained(tmp_path / "lstm.pt", model().parameters())
    torch.save({"x": torch.zeros(1)}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="not a pyoptk learned-rule file"):
        MLPOptimizer.from_pretrained(tmp_path / "junk.pt", model().parameters())


def test_unknown_pretrained_name_lists_available(tmp_path):
    with pytest.raises(ValueError, match="no shipped pretrained learned optimizer named "
                                         "'nope'; available: mlp-small"):
        MLPOptimizer.from_pretrained("nope", model().parameters())
    with pytest.raises(FileNotFoundError, match="no learned-rule file"):
        MLPOptimizer.from_pretrained(tmp_path / "missing.pt", model().parameters())
    assert pretrained.available() == ["mlp-small"]


def test_shipped_mlp_small_matches_its_model_card_and_beats_default_adamw():
    """The shipped file is the rule its card describes (identity hash), and it still
    does what the card reports on a held-out family: lower final training loss than
    AdamW at lr 1e-3 on a breast-cancer MLP (a `valid` family) in 100 steps."""
    import os
    import re

    from pyoptk.meta.evaluation import resolve_optimizer, train_task
    from pyoptk.tasks import get_family

    opt = MLPOptimizer.from_pretrained("mlp-small", model().parameters())
    card = open(os.path.join(pretrained.PRETRAINED_DIR, "mlp-small.md")).read()
    assert re.search(r"hash `([0-9a-f]{64})`", card).group(1) == opt.rule_identity()["hash"]
    assert opt.rule_identity()["version"] == "2"
    task = get_family("mlp_breast_cancer").sample(1684854999)
    learned = train_task(task, resolve_optimizer("mlp-small").factory, 100)
    adamw = train_task(task, resolve_optimizer("adamw").factory, 100)
    assert learned.final_loss < 0.7 * adamw.final_loss, (learned.final_loss, adamw.final_loss)


def test_lr_scheduler_and_tensor_lr():
    m = model()
    opt = MLPOptimizer(m.parameters(), config=SMALL)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0)  # lr := 0
    before = [p.clone() for p in m.parameters()]
    train(m, opt, 1)
    sched.step()
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert opt.state[m[0].weight]["step"].item() == 1  # the state still advanced
    m2 = model()
    opt2 = MLPOptimizer(m2.parameters(), config=SMALL, lr_mult=torch.tensor(0.0))
    train(m2, opt2, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, m2.parameters()))


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float", "tensor"])
def test_lr_scheduler_schedules_lr_mult(tensor_lr):
    """A decaying schedule on lr_mult (two groups, their own base lr) gives bit for bit
    the run that sets each group's lr_mult by hand before each step. A tensor lr_mult
    is updated in place by the scheduler (torch's convention), so a compiled or
    CUDA-graphed step reads the new value without a host sync."""
    meta = init_meta_params(SMALL, seed=3)

    def groups(m, base):
        return [{"params": [m[0].weight, m[0].bias], "lr": base(20.0)},
                {"params": [m[2].weight, m[2].bias, m.scale], "lr": base(40.0)}]

    base = (lambda v: torch.tensor(v)) if tensor_lr else float
    sched_m, hand_m = model(), model()
    opt = MLPOptimizer(groups(sched_m, base), meta_params=meta, config=SMALL)
    lr_tensors = [g["lr"] for g in opt.param_groups]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    hand = MLPOptimizer(groups(hand_m, float), meta_params=meta, config=SMALL)
    x, y = data()
    for s in range(4):
        for m, o in ((sched_m, opt), (hand_m, hand)):
            o.zero_grad()
            loss_fn(m, x, y).backward()
        for g, lr0 in zip(hand.param_groups, (20.0, 40.0)):
            g["lr"] = lr0 * 0.5 ** s
        opt.step()
        hand.step()
        sched.step()
    for a, b in zip(sched_m.parameters(), hand_m.parameters()):
        assert torch.equal(a, b)
    if tensor_lr:
        assert all(g["lr"] is t for g, t in zip(opt.param_groups, lr_tensors))
        assert [t.item() for t in lr_tensors] == [20.0 * 0.5 ** 4, 40.0 * 0.5 ** 4]


def test_bad_arguments():
    ps = list(model().parameters())
    with pytest.raises(ValueError, match="Invalid lr_mult value: -1"):
        MLPOptimizer(ps, lr_mult=-1.0)
    with pytest.raises(ValueError, match="Invalid lr_mult value: -1"):
        MLPOptimizer(ps, lr_mult=torch.tensor(-1.0))
    with pytest.raises(TypeError, match="tensor lr_mult must be floating point"):
        MLPOptimizer(ps, lr_mult=torch.tensor(1))
    with pytest.raises(ValueError, match="Invalid weight_decay value"):
        MLPOptimizer(ps, weight_decay=-0.1)
    with pytest.raises(TypeError, match="config must be an MLPConfig"):
        MLPOptimizer(ps, config=FeatureConfig())
    other = init_meta_params(MLPConfig(features=FeatureConfig(fac_momentum_decay=None)))
    with pytest.raises(ValueError, match="w0 has shape \\(36, 32\\), expected \\(39, 32\\)"):
        MLPOptimizer(ps, meta_params=other)
    with pytest.raises(TypeError, match="config and meta_params come from the file"):
        MLPOptimizer.from_pretrained("x.pt", ps, config=SMALL)


def test_sparse_grad_rejected():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = MLPOptimizer(emb.parameters(), config=SMALL)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_nan_grad_skips_tensor_in_optimizer():
    m = model()
    opt = MLPOptimizer(m.parameters(), config=SMALL)
    train(m, opt, 1)
    x, y = data()
    opt.zero_grad()
    loss_fn(m, x, y).backward()
    m[0].weight.grad[0, 0] = float("nan")
    w = m[0].weight.clone()
    b = m[0].bias.clone()
    opt.step()
    assert torch.equal(m[0].weight, w) and opt.state[m[0].weight]["step"].item() == 1
    assert not torch.equal(m[0].bias, b) and opt.state[m[0].bias]["step"].item() == 2
