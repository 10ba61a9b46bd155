"""MAML family: the exact second-order meta-gradient against torch.func composition and
finite differences (float64), FOMAML against its definition, MetaSGD, ANIL, inner Adam,
the finite-difference HVP mode, Reptile's formula, bad inputs, and a seeded 5-way 1-shot
digits run that beats chance."""

import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from pyoptk.meta.maml import MAML
from pyoptk.meta.reptile import Reptile
from pyoptk.tasks.fewshot import DigitsEpisodes
from pyoptk.tasks.sinusoid import SinusoidEpisodes


pytestmark = pytest.mark.usefixtures("one_thread")

LR, STEPS, T = 0.05, 3, 3


def sine_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(),
                         nn.Linear(10, 1)).double()


def conv_model(n_way=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(4 * 64, n_way)).double()


def sine_batch():
    return SinusoidEpisodes(5, 6, seed=1).batch(0, T).to(dtype=torch.float64)


def digits_batch():
    return DigitsEpisodes("train", 3, 2, 2, seed=0).batch(0, T).to(dtype=torch.float64)


def reference_meta_grad(model, loss_fn, batch, *, steps=STEPS, lr=LR, first_order=False,
                        adapted=None, lrs=None):
    """torch.func composition: grad of the mean query loss through `steps` functional
    SGD steps per task (lrs: per-element learned lrs of the adapted params)."""
    names = [n for n, _ in model.named_parameters()]
    adapted = adapted or names
    sx, sy, qx, qy = batch

    def task_loss(p, x, y):
        return loss_fn(functional_call(model, p, (x,)), y)

    def meta(p, a):
        total = 0
        for t in range(sx.shape[0]):
            q = dict(p)
            for _ in range(steps):
                g = grad(lambda fast: task_loss({**q, **fast}, sx[t], sy[t]))(
                    {n: q[n] for n in adapted})
                if first_order:
                    g = {n: v.detach() for n, v in g.items()}
                for i, n in enumerate(adapted):
                    q[n] = q[n] - (a[i] if a is not None else lr) * g[n]
            total = total + task_loss(q, qx[t], qy[t])
        return total / sx.shape[0]

    p0 = {n: v.detach() for n, v in model.named_parameters()}
    if lrs is None:
        g = grad(meta)(p0, None)
        return [g[n] for n in names]
    gp, ga = grad(meta, argnums=(0, 1))(p0, [a.detach() for a in lrs])
    return [gp[n] for n in names] + list(ga)


def assert_grads_close(got, want, rtol=1e-8):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        assert err <= rtol, f"tensor {i}: relative error {err:.3g} > {rtol}"


@pytest.mark.parametrize("batched", [True, False], ids=["vmap", "loop"])
@pytest.mark.parametrize("case", ["sinusoid-mlp", "digits-cnn"])
def test_second_order_matches_torch_func(case, batched):
    model, loss_fn, batch = ((sine_model(), F.mse_loss, sine_batch()) if case == "sinusoid-mlp"
                             else (conv_model(), F.cross_entropy, digits_batch()))
    maml = MAML(model, loss_fn, inner_steps=STEPS, inner_lr=LR, batched=batched)
    got = torch.autograd.grad(maml.meta_loss(batch), list(model.parameters()))
    assert_grads_close(got, reference_meta_grad(model, loss_fn, batch))
    fo = reference_meta_grad(model, loss_fn, batch, first_order=True)
    assert max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, fo)) > 1e-3, \
        "the second-order term is missing: the meta-gradient equals FOMAML's"


def test_second_order_matches_finite_differences():
    model, batch = sine_model(), sine_batch()
    maml = MAML(model, F.mse_loss, inner_steps=STEPS, inner_lr=LR)
    params = list(model.parameters())
    g = torch.autograd.grad(maml.meta_loss(batch), params)
    gen = torch.Generator().manual_seed(0)
    d = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    h = 1e-5
    with torch.no_grad():
        vals = []
        for s in (1, -1):
            for p, di in zip(params, d):
                p.add_(s * h * di)
            vals.append(maml.meta_loss(batch))
            for p, di in zip(params, d):
                p.sub_(s * h * di)
    fd = (vals[0] - vals[1]) / (2 * h)
    exact = sum((gi * di).sum() for gi, di in zip(g, d))
    assert abs(fd - exact) <= 1e-7 * abs(exact), (fd.item(), exact.item())


def test_first_order_equals_definition():
    """FOMAML: the meta-gradient is the mean over tasks of the query gradient at the
    adapted parameters."""
    model, batch = sine_model(), sine_batch()
    maml = MAML(model, F.mse_loss, inner_steps=STEPS, inner_lr=LR, first_order=True)
    got = torch.autograd.grad(maml.meta_loss(batch), list(model.parameters()))
    sx, sy, qx, qy = batch
    names = [n for n, _ in model.named_parameters()]
    want = [torch.zeros_like(p) for p in model.parameters()]
    for t in range(T):
        q = {n: p.detach().clone() for n, p in model.named_parameters()}
        for _ in range(STEPS):
            q = {n: v.requires_grad_() for n, v in q.items()}
            g = torch.autograd.grad(F.mse_loss(functional_call(model, q, (sx[t],)), sy[t]),
                                    list(q.values()))
            q = {n: (q[n] - LR * gi).detach() for n, gi in zip(names, g)}
        q = {n: v.requires_grad_() for n, v in q.items()}
        gq = torch.autograd.grad(F.mse_loss(functional_call(model, q, (qx[t],)), qy[t]),
                                 list(q.values()))
        want = [w + gi / T for w, gi in zip(want, gq)]
    assert_grads_close(got, want, 1e-10)


def test_metasgd_learning_rates_receive_exact_gradients():
    model, batch = sine_model(), sine_batch()
    maml = MAML(model, F.mse_loss, inner_steps=2, inner_lr=LR, learn_inner_lr=True)
    with torch.no_grad():
        for a in maml.inner_lrs:
            a.uniform_(0.01, 0.08, generator=torch.Generator().manual_seed(3))
    params = list(model.parameters()) + list(maml.inner_lrs)
    assert len(list(maml.parameters())) == len(params)
    got = torch.autograd.grad(maml.meta_loss(batch), params)
    assert all(g.abs().sum() > 0 for g in got[len(list(model.parameters())):])
    assert_grads_close(got, reference_meta_grad(model, F.mse_loss, batch, steps=2,
                                                lrs=list(maml.inner_lrs)))


def test_anil_adapts_only_the_head():
    model, batch = sine_model(), sine_batch()
    maml = MAML(model, F.mse_loss, inner_steps=STEPS, inner_lr=LR, adapt=["4"])
    assert maml.adapted_names == ["4.weight", "4.bias"]
    adapted = maml.adapt(batch.support_x, batch.support_y)
    assert set(adapted) == {"4.weight", "4.bias"} and adapted["4.weight"].shape == (T, 1, 10)
    got = torch.autograd.grad(maml.meta_loss(batch), list(model.parameters()))
    assert_grads_close(got, reference_meta_grad(model, F.mse_loss, batch,
                                                adapted=["4.weight", "4.bias"]))


def test_inner_adam_matches_unrolled_adam():
    model, batch = sine_model(), sine_batch()
    b1, b2, eps, lr = 0.9, 0.99, 1e-8, 0.01
    maml = MAML(model, F.mse_loss, inner_steps=2, inner_lr=lr, inner_optimizer="adam",
                adam_betas=(b1, b2), adam_eps=eps)
    got = torch.autograd.grad(maml.meta_loss(batch), list(model.parameters()))
    sx, sy, qx, qy = batch
    names = [n for n, _ in model.named_parameters()]

    def task_loss(p, x, y):
        return F.mse_loss(functional_call(model, p, (x,)), y)

    def meta(p):
        total = 0
        for t in range(T):
            q, m, v = dict(p), {n: 0 for n in p}, {n: 0 for n in p}
            for k in range(1, 3):
                g = grad(task_loss)(q, sx[t], sy[t])
                for n in names:
                    m[n] = b1 * m[n] + (1 - b1) * g[n]
                    v[n] = b2 * v[n] + (1 - b2) * g[n] ** 2
                    q[n] = q[n] - lr / (1 - b1 ** k) * m[n] / (
                        (v[n] / (1 - b2 ** k)).sqrt() + eps)
            total = total + task_loss(q, qx[t], qy[t])
        return total / T

    want = grad(meta)({n: p.detach() for n, p in model.named_parameters()})
    assert_grads_close(got, [want[n] for n in names], 1e-7)


@pytest.mark.parametrize("kw", [{}, {"learn_inner_lr": True}, {"adapt": ["2", "4"]}],
                         ids=["maml", "metasgd", "anil"])
def test_finite_difference_hvp_matches_exact(kw):
    model, batch = sine_model(), sine_batch()
    exact = MAML(model, F.mse_loss, inner_steps=STEPS, inner_lr=LR, **kw)
    fd = MAML(model, F.mse_loss, inner_steps=STEPS, inner_lr=LR, hvp="finite_difference", **kw)
    fd.inner_lrs = exact.inner_lrs
    params = list(exact.parameters())
    assert_grads_close(torch.autograd.grad(fd.meta_loss(batch), params),
                       torch.autograd.grad(exact.meta_loss(batch), params), 1e-7)


@pytest.mark.parametrize("kw", [{}, {"learn_inner_lr": True}, {"inner_optimizer": "adam"}],
                         ids=["maml", "metasgd", "adam"])
def test_checkpointed_inner_loop_is_exact_and_smaller(kw):
    from pyoptk.bench.harness import peak_memory

    model = sine_model()
    batch = SinusoidEpisodes(10, 10, seed=1).batch(0, 8).to(dtype=torch.float64)
    plain = MAML(model, F.mse_loss, inner_steps=6, inner_lr=LR, **kw)
    ck = MAML(model, F.mse_loss, inner_steps=6, inner_lr=LR, checkpoint_inner=True, **kw)
    ck.inner_lrs = plain.inner_lrs
    params = list(plain.parameters())
    assert_grads_close(torch.autograd.grad(ck.meta_loss(batch), params),
                       torch.autograd.grad(plain.meta_loss(batch), params), 1e-12)
    if not kw:
        cpu = torch.device("cpu")
        full, how = peak_memory(lambda: torch.autograd.grad(plain.meta_loss(batch), params), cpu)
        if full < 0:
            pytest.skip(how)
        small, _ = peak_memory(lambda: torch.autograd.grad(ck.meta_loss(batch), params), cpu)
        assert small < 0.8 * full, (small, full)


def _saved_bytes(fn):
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("case", ["sinusoid-mlp", "cnn-digits"])
def test_meta_loss_saves_no_more_than_a_plain_unroll(case):
    """What the meta-loss leaves saved for the outer backward is at most what the plain
    per-task unroll (functional_call + autograd.grad(create_graph=True) + p - lr*g)
    leaves: no inner gradients (inner_sgd with a float lr saves nothing), no copies of
    the initialization per task, and — with the query pass backpropagated inside
    meta_loss — none of the query activations (then well below it; without that, 1.0x
    on the MLP and 1.06x on the vmapped CNN, whose max_pool2d batching rule saves a
    task-major copy of its input at every step). Deterministic (autograd's saved
    tensors alive after the forward, not timings). Before the first two were removed it
    saved 1.7x (sinusoid MLP)."""
    from pyoptk.bench import maml as bench

    make, loss_fn, batch, lr = bench.problem(case, 4)
    torch.manual_seed(0)
    model = make()
    _, ref = _live_saved_bytes(lambda: bench.autograd_meta_loss(model, loss_fn, batch, 3, lr))
    for batched in (True, False):
        for early, slack in ((True, 0.95 if case == "sinusoid-mlp" else 0.5),
                             (False, 1.01 if case == "sinusoid-mlp" or not batched else 1.07)):
            maml = MAML(model, loss_fn, inner_steps=3, inner_lr=lr, batched=batched,
                        early_query_backward=early)
            _, got = _live_saved_bytes(lambda: maml.meta_loss(batch))
            assert got <= slack * ref + 1024, (batched, early, got, ref)


def _live_saved_bytes(fn):
    """Bytes of the distinct storages autograd saved while ``fn`` ran that are still
    alive after it returns (its result kept): what waits for the outer backward."""
    import weakref

    refs = []

    def pack(t):
        refs.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    gc.collect()
    live = {}
    for r in refs:
        t = r()
        if t is not None:
            live[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return out, sum(live.values())


@pytest.mark.parametrize("variant", [
    {}, {"batch_query": True}, {"batched": False}, {"adapt": ["3"]}, {"first_order": True},
    {"learn_inner_lr": True}, {"inner_optimizer": "adam"}])
def test_early_query_backward_frees_the_query_pass_and_keeps_the_meta_gradient(variant):
    """meta_loss backpropagates the query pass in its forward: the same meta-gradient
    (float64) as the plain path, and the query activations are not waiting for the outer
    backward (deterministic: autograd's saved tensors still alive after meta_loss)."""
    model = conv_model()
    batch = DigitsEpisodes("train", 3, 1, 8, seed=0).batch(0, T).to(dtype=torch.float64)
    params = list(model.parameters())
    losses, live, grads = {}, {}, {}
    for early in (True, False):
        maml = MAML(model, F.cross_entropy, inner_steps=2, inner_lr=LR,
                    early_query_backward=early, **variant)
        if maml.inner_lrs is not None:
            params = list(model.parameters()) + list(maml.inner_lrs)
        losses[early], live[early] = _live_saved_bytes(lambda: maml.meta_loss(batch))
        grads[early] = torch.autograd.grad(losses[early], params)
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-14, atol=0)
    assert_grads_close(grads[True], grads[False], 1e-12)
    # 24 query images a task against 3 support images: the query pass is most of what
    # the plain path keeps for the outer backward.
    # (MetaSGD and Adam keep more per step: 0.54x and 0.6x.)
    assert live[True] < 0.65 * live[False], live


def test_early_query_backward_is_differentiable_once_and_falls_back_when_needed():
    model, batch = sine_model(), sine_batch()
    params = list(model.parameters())
    maml = MAML(model, F.mse_loss, inner_steps=2, inner_lr=LR)
    with pytest.raises(RuntimeError, match="early_query_backward=False"):
        torch.autograd.grad(maml.meta_loss(batch), params, create_graph=True)
    fd = MAML(model, F.mse_loss, inner_steps=2, inner_lr=LR, hvp="finite_difference")
    with pytest.raises(RuntimeError, match="finite_difference"):
        torch.autograd.grad(fd.meta_loss(batch), params, create_graph=True)
    plain = MAML(model, F.mse_loss, inner_steps=2, inner_lr=LR, early_query_backward=False)
    g = torch.autograd.grad(plain.meta_loss(batch), params, create_graph=True)
    assert all(h.abs().sum() > 0 for h in torch.autograd.grad(sum(x.sum() for x in g), params))
    # A loss_fn closing over a learned temperature: its gradient needs the plain path,
    # which meta_loss takes (and keeps taking) once the query graph shows it.
    temp = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))
    closing = MAML(model, lambda o, y: F.mse_loss(o * temp, y), inner_steps=2, inner_lr=LR)
    want = torch.autograd.grad(
        closing._losses(closing.meta_loss(batch, return_outputs=True)[1], batch.query_y).mean(),
        [temp] + params)
    for _ in range(2):
        got = torch.autograd.grad(closing.meta_loss(batch), [temp] + params)
        assert_grads_close(got, want, 1e-12)
    assert closing._query_reaches_other_leaves


def test_query_pass_vmapped_or_looped_gives_the_same_meta_gradient():
    """Adapted convolutions loop the query pass over tasks by default; vmapping it
    (batch_query=True) gives the same meta-gradient, and so does a model without them."""
    for model, loss_fn, batch in ((conv_model(), F.cross_entropy, digits_batch()),
                                  (sine_model(), F.mse_loss, sine_batch())):
        params = list(model.parameters())
        default = MAML(model, loss_fn, inner_steps=2, inner_lr=LR)
        cpu = torch.device("cpu")
        assert default.query_batched(cpu) == (not isinstance(model[0], nn.Conv2d))
        assert default.query_batched(torch.device("cuda"))  # (a decision, no CUDA needed)
        want = torch.autograd.grad(default.meta_loss(batch), params)
        for bq in (True, False):
            maml = MAML(model, loss_fn, inner_steps=2, inner_lr=LR, batch_query=bq)
            assert_grads_close(torch.autograd.grad(maml.meta_loss(batch), params), want, 1e-12)
    anil = MAML(conv_model(), F.cross_entropy, adapt=["3"])
    assert anil.query_batched(torch.device("cpu"))  # only the head adapts: convs shared


def test_adapt_without_grad_is_detached_and_equal():
    model, batch = sine_model(), sine_batch()
    maml = MAML(model, F.mse_loss, inner_steps=STEPS, inner_lr=LR)
    with torch.no_grad():
        a = maml.adapt(batch.support_x, batch.support_y)
    b = maml.adapt(batch.support_x, batch.support_y)
    assert all(not v.requires_grad for v in a.values())
    for n in a:
        torch.testing.assert_close(a[n], b[n].detach(), rtol=0, atol=0)


def test_torch_compile_gives_the_same_meta_gradient():
    """Compiling the caller (or the model) must not drop the second-order term."""
    model, batch = sine_model(), sine_batch()
    maml = MAML(model, F.mse_loss, inner_steps=2, inner_lr=LR)
    params = list(model.parameters())
    want = torch.autograd.grad(maml.meta_loss(batch), params)
    assert_grads_close(torch.autograd.grad(torch.compile(maml.meta_loss)(batch), params), want, 0)
    compiled_model = MAML(torch.compile(model), F.mse_loss, inner_steps=2, inner_lr=LR)
    assert_grads_close(torch.autograd.grad(compiled_model.meta_loss(batch), params), want)


def test_mixed_precision_meta_gradient_is_close():
    model, batch = sine_model().float(), sine_batch().to(dtype=torch.float32)
    maml = MAML(model, F.mse_loss, inner_steps=2, inner_lr=LR)
    params = list(model.parameters())
    want = torch.autograd.grad(maml.meta_loss(batch), params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = maml.meta_loss(batch)
    got = torch.autograd.grad(loss, params)
    assert all(g.dtype == torch.float32 for g in got)
    assert_grads_close(got, want, 5e-2)


def _live_tensors():
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_no_memory_growth_over_1000_meta_iterations():
    """Live tensors and the process's resident memory stay flat over 1,000 iterations
    (nothing retained across meta-iterations: graphs, saved FD state, inner moments)."""
    import resource

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    maml = MAML(model, F.mse_loss, inner_steps=2, inner_lr=LR, learn_inner_lr=True)
    opt = torch.optim.SGD(maml.parameters(), lr=1e-3)
    batch = SinusoidEpisodes(4, 4).batch(0, 2)

    def run(n):
        for _ in range(n):
            opt.zero_grad()
            maml.meta_loss(batch).backward()
            opt.step()

    run(50)
    tensors, rss = _live_tensors(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run(1000)
    # No growth. (<=, not ==: the count is process-wide, and objects of earlier tests
    # that something else still referenced may be released meanwhile.)
    assert _live_tensors() <= tensors
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 20_000  # KiB


def test_reptile_update_matches_formula():
    model, batch = sine_model(), sine_batch()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    reptile = Reptile(model, F.mse_loss, inner_steps=4, inner_lr=0.02, outer_lr=0.3)
    reptile.step(batch)
    sx, sy = batch.support_x, batch.support_y
    names = list(before)
    mean = {n: torch.zeros_like(v) for n, v in before.items()}
    for t in range(T):
        q = {n: v.clone() for n, v in before.items()}
        for _ in range(4):
            q = {n: v.requires_grad_() for n, v in q.items()}
            g = torch.autograd.grad(F.mse_loss(functional_call(model, q, (sx[t],)), sy[t]),
                                    list(q.values()))
            q = {n: (q[n] - 0.02 * gi).detach() for n, gi in zip(names, g)}
        mean = {n: mean[n] + q[n] / T for n in names}
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] + 0.3 * (mean[n] - before[n]),
                                   rtol=1e-12, atol=1e-12)


def test_bad_inputs():
    model = sine_model()
    with pytest.raises(ValueError, match="adapt entry 'head' matches no parameter"):
        MAML(model, F.mse_loss, adapt=["head"])
    with pytest.raises(ValueError, match="inner_steps must be an int >= 1"):
        MAML(model, F.mse_loss, inner_steps=0)
    with pytest.raises(ValueError, match="hvp='finite_difference' needs inner_optimizer='sgd'"):
        MAML(model, F.mse_loss, hvp="finite_difference", inner_optimizer="adam")
    with pytest.raises(ValueError, match="outer_lr must be in"):
        Reptile(model, F.mse_loss, outer_lr=2.0)
    maml = MAML(model, F.mse_loss)
    b = sine_batch()
    with pytest.raises(ValueError,
                       match=r"support_x \(3, 5, 1\) and support_y \(3, 4, 1\) must agree"):
        maml.meta_loss((b.support_x, b.support_y[:, :4], b.query_x, b.query_y))
    with pytest.raises(ValueError, match="support has 3 tasks but query has 2"):
        maml.meta_loss((b.support_x, b.support_y, b.query_x[:2], b.query_y[:2]))
    with pytest.raises(ValueError, match="leading task dimension"):
        maml.meta_loss((b.support_x[0, :, 0], b.support_y[0], b.query_x, b.query_y))


def test_maml_digits_5way_1shot_beats_chance():
    """Seeded: a small MLP meta-trained 40 iterations on classes 0-4 lowers the held-out
    query loss and reaches well above chance (20%) on 5-way 1-shot episodes of the
    unseen classes 5-9."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))
    maml = MAML(model, F.cross_entropy, inner_steps=3, inner_lr=0.5)
    opt = torch.optim.Adam(maml.parameters(), lr=3e-3)
    train = DigitsEpisodes("train", 5, 1, 5, seed=0)
    test = DigitsEpisodes("test", 5, 1, 10, seed=0).batch(0, 40)
    with torch.no_grad():
        before = maml.meta_loss(test)
    for it in range(40):
        loss = maml.meta_loss(train.batch(it, 8))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after, out = maml.meta_loss(test, return_outputs=True)
    acc = (out.argmax(-1) == test.query_y).float().mean().item()
    assert after < 0.9 * before, (before.item(), after.item())
    assert acc > 0.5, f"5-way 1-shot accuracy {acc:.3f} on held-out digits"
