"""Task families: determinism from seeds, trainability, vmap/grad, splits, sampler
resume, bad inputs (pyoptk.tasks, docs/tasks.md)."""

import sys
from collections import OrderedDict

import pytest
import torch
from torch.func import grad, vmap

import pyoptk.tasks as tasks
from pyoptk.tasks import (SPLITS, CharLMTask, CNNTask, MLPTask, RosenbrockTask, TaskSampler,
                          TaskSpec, build_task, family_names, get_family, load_dataset,
                          split_families)
from pyoptk.tasks import datasets as datasets_mod

FAMILIES = family_names()
SEEDS = (0, 1, 2)
# Adam learning rate per family for the trainability test (all others: 1e-2).
ADAM_LR = {"quadratic": 5e-2}


pytestmark = pytest.mark.usefixtures("one_thread")


def _equal_batches(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return len(a) == len(b) and all(_equal_batches(x, y) for x, y in zip(a, b))


def _equal_params(a, b):
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_task(family):
    t1, t2 = get_family(family).sample(7), get_family(family).sample(7)
    assert t1.hparams == t2.hparams
    assert t1.spec == TaskSpec(family, 7) and build_task(t1.spec).hparams == t1.hparams
    assert _equal_params(t1.init_params(), t2.init_params())
    assert _equal_params(t1.init_params(seed=3), t2.init_params(seed=3))
    for split in ("train", "valid", "test"):
        assert _equal_batches(t1.batch(5, split), t2.batch(5, split))


@pytest.mark.parametrize("family", FAMILIES)
def test_different_seeds_differ(family):
    fam = get_family(family)
    hps = [fam.sample(s).hparams for s in range(6)]
    assert len({repr(h) for h in hps}) > 1, hps
    t = fam.sample(0)
    assert not _equal_params(t.init_params(seed=0), t.init_params(seed=1))
    if isinstance(t, (MLPTask, CNNTask, CharLMTask)):  # noise-free quadratics: fixed target
        assert not _equal_batches(t.batch(0), t.batch(1))
        assert not _equal_batches(t.batch(0, "train"), t.batch(0, "valid"))


@pytest.mark.parametrize("family", FAMILIES)
def test_params_dtype_device_and_count(family):
    t = get_family(family).sample(0)
    p = t.init_params(dtype=torch.float64)
    assert isinstance(p, OrderedDict) and p
    assert all(v.dtype == torch.float64 and v.device.type == "cpu" for v in p.values())
    assert t.param_count == sum(v.numel() for v in p.values())
    loss = t.loss(p, t.batch(0))
    assert loss.dtype == torch.float64 and loss.shape == ()


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_decreases_under_adam(family):
    fam = get_family(family)
    for seed in SEEDS:
        t = fam.sample(seed)
        params = OrderedDict((k, v.clone().requires_grad_()) for k, v in t.init_params().items())
        with torch.no_grad():
            before = t.eval_loss(params).item()
        opt = torch.optim.Adam(params.values(), lr=ADAM_LR.get(family, 1e-2))
        for step in range(40):
            loss = t.loss(params, t.batch(step))
            assert torch.isfinite(loss), (t, step, loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            after = t.eval_loss(params).item()
        assert after < 0.9 * before, (t, before, after)


@pytest.mark.parametrize("family", FAMILIES)
def test_vmap_over_particles_matches_loop(family):
    t = get_family(family).sample(1)
    inits = [t.init_params(seed=s, dtype=torch.float64) for s in range(3)]
    stacked = OrderedDict((k, torch.stack([p[k] for p in inits])) for k in inits[0])
    batch = t.batch(2)
    losses = vmap(t.loss, in_dims=(0, None))(stacked, batch)
    grads = vmap(grad(t.loss), in_dims=(0, None))(stacked, batch)
    for i, p in enumerate(inits):
        torch.testing.assert_close(losses[i], t.loss(p, batch))
        g = grad(t.loss)(p, batch)
        for k in p:
            torch.testing.assert_close(grads[k][i], g[k])


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_loss_every_split(family):
    t = get_family(family).sample(3)
    p = t.init_params()
    for split in ("train", "valid", "test"):
        v = t.eval_loss(p, split)
        assert v.shape == () and torch.isfinite(v)
    with pytest.raises(ValueError, match="split"):
        t.eval_loss(p, "validation")
    with pytest.raises(ValueError, match="split"):
        t.batch(0, "validation")


def test_supervised_eval_loss_is_the_full_split():
    t = get_family("mlp_wine").sample(0)
    p = t.init_params()
    x, y = load_dataset("wine").split("valid")
    torch.testing.assert_close(t.eval_loss(p), t.loss(p, (x, y)))


def test_rosenbrock_minimum_and_noise():
    t = RosenbrockTask(0, dim=5, a=100.0, scale=0.5, noise=0.1)
    ones = OrderedDict(x=torch.ones(5, dtype=torch.float64))
    assert t.eval_loss(ones).item() == 0.0
    assert t.loss(ones, t.batch(0)).item() > 0.0          # noisy valley centres
    assert not torch.equal(t.batch(0), t.batch(1))
    x = OrderedDict(x=torch.tensor([-1.2, 1.0], dtype=torch.float64))
    classic = RosenbrockTask(0, dim=2, a=100.0, scale=1.0)
    assert classic.loss(x, classic.batch(0)).item() == pytest.approx(24.2)


def test_datasets_fixed_disjoint_standardized():
    for name in datasets_mod.DATASETS:
        d = load_dataset(name)
        assert load_dataset(name) is d                    # cached per process
        n = {s: d.x[s].shape[0] for s in ("train", "valid", "test")}
        assert all(d.y[s].shape == (n[s],) and d.x[s].dtype == torch.float32 for s in n)
        assert n["train"] > n["valid"] > 0 and n["test"] > 0
        mean = d.x["train"].mean(0)
        assert mean.abs().max() < 1e-4
        assert set(d.y["train"].tolist()) == set(range(d.n_classes))
    digits = load_dataset("digits")
    assert (digits.n_features, digits.n_classes) == (64, 10)
    assert sum(digits.x[s].shape[0] for s in ("train", "valid", "test")) == 1797


def test_dataset_splits_do_not_share_rows():
    # The split is of row indices: re-derive them and check disjointness and coverage.
    d = load_dataset("breast_cancer")
    train = {tuple(r) for r in d.x["train"].tolist()}
    valid = {tuple(r) for r in d.x["valid"].tolist()}
    test = {tuple(r) for r in d.x["test"].tolist()}
    assert not (train & valid) and not (train & test) and not (valid & test)


def test_missing_sklearn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        datasets_mod._sklearn_arrays("wine")


def test_splits_fixed_disjoint_and_complete():
    train, valid, test = (set(split_families(s)) for s in ("train", "valid", "test"))
    assert train and valid and test
    assert not (train & valid) and not (train & test) and not (valid & test)
    assert train | valid | test == set(FAMILIES)
    assert set(SPLITS) == {"train", "valid", "test"}
    sampled = {t.family for t in TaskSampler("train", seed=0).next_batch(200)}
    assert sampled == train                                  # and never a test family


def test_sampler_deterministic_and_resumes():
    a = TaskSampler("train", seed=3)
    first = [t.spec for t in a.next_batch(5)]
    state = a.state_dict()
    rest = [t.spec for t in a.next_batch(5)]
    assert [t.spec for t in TaskSampler("train", seed=3).next_batch(10)] == first + rest
    b = TaskSampler("train", seed=3)
    b.load_state_dict(state)
    assert [t.spec for t in b.next_batch(5)] == rest
    assert [t.spec for t in TaskSampler("train", seed=4).next_batch(10)] != first + rest
    with pytest.raises(ValueError, match="families"):
        TaskSampler("valid", seed=3).load_state_dict(state)


def test_bad_names():
    with pytest.raises(ValueError, match="unknown task family 'mnist'"):
        get_family("mnist")
    with pytest.raises(ValueError, match="unknown task family"):
        TaskSampler(["mlp_digits", "mnist"])
    with pytest.raises(ValueError, match="split must be one of"):
        split_families("validation")
    with pytest.raises(ValueError, match="split must be one of"):
        TaskSampler("eval")
    with pytest.raises(ValueError, match="dataset"):
        load_dataset("iris")
    with pytest.raises(ValueError, match="dataset"):
        tasks.MLPFamily("mnist")


@pytest.mark.parametrize("kwargs, param", [
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 8.0}, "batch_size"),
    ({"activation": "swish"}, "activation"),
    ({"hidden": (16, 0)}, "hidden"),
    ({"init_scale": -1.0}, "init_scale"),
    ({"l2": -0.1}, "l2"),
    ({"dataset": "iris"}, "dataset"),
])
def test_bad_mlp_hparams(kwargs, param):
    kw = {"dataset": "wine", **kwargs}
    with pytest.raises(ValueError, match=param):
        MLPTask("mlp_wine", 0, **kw)


@pytest.mark.parametrize("kwargs, param", [
    ({"dim": 1}, "dim"), ({"a": 0.0}, "a must"), ({"scale": -1.0}, "scale"),
    ({"noise": -0.1}, "noise"), ({"init_scale": -1.0}, "init_scale"),
])
def test_bad_rosenbrock_hparams(kwargs, param):
    with pytest.raises(ValueError, match=param):
        RosenbrockTask(0, **kwargs)


def test_bad_family_ranges():
    with pytest.raises(ValueError, match="depth"):
        tasks.MLPFamily("wine", depth=(0, 2))
    with pytest.raises(ValueError, match="width"):
        tasks.MLPFamily("wine", width=(8, 4))


def test_char_lm_corpus_is_a_package_resource():
    from importlib import resources

    from pyoptk.tasks import text

    path = resources.files("pyoptk.tasks").joinpath(text.TEXT_RESOURCE)
    assert path.is_file()
    raw = text.read_text()
    assert len(raw) > 20_000 and raw.isascii() and "Four score and seven years ago" in raw
    corpus = text.load_corpus()
    assert corpus.vocab == "".join(sorted(set(raw)))
    sizes = {s: corpus.tokens[s].numel() for s in ("train", "valid", "test")}
    assert sum(sizes.values()) == len(raw)
    assert 0.75 < sizes["train"] / len(raw) < 0.85 and sizes["valid"] > 3000
    assert corpus.decode(corpus.tokens["train"][:512]) == raw[:512]
    assert corpus.decode(corpus.tokens["valid"][:512]) == raw[8 * 512:9 * 512]
    assert corpus.decode(corpus.tokens["test"][:512]) == raw[9 * 512:10 * 512]


def test_char_lm_batches_are_windows_of_the_split():
    from pyoptk.tasks.text import load_corpus

    t = CharLMTask(0, arch="mlp", context=3, seq_len=16, batch_size=4)
    b = t.batch(0, "valid")
    assert b.shape == (4, 19) and b.dtype == torch.int64
    valid = load_corpus().decode(load_corpus().tokens["valid"])
    for row in b:
        assert load_corpus().decode(row) in valid
    logits = t.logits(t.init_params(), b)
    assert logits.shape == (4, 16, len(load_corpus().vocab))


def test_gru_matches_torch_gru():
    t = CharLMTask(0, arch="gru", embed=8, hidden=12, context=1, seq_len=10, batch_size=3)
    p = t.init_params(dtype=torch.float64)
    gru = torch.nn.GRU(8, 12, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(gru, f"{name}_l0").copy_(p[f"gru.{name}"])
        p["gru.bias_hh"] += 0.1            # nonzero biases exercise the gate layout
        gru.bias_hh_l0 += 0.1
    x = torch.randn(3, 10, 8, dtype=torch.float64)
    torch.testing.assert_close(t._gru(p, x), gru(x)[0])


def test_cnn_shapes():
    t = CNNTask("cnn_digits", 0, channels=(4, 8), batch_size=5)
    p = t.init_params()
    assert p["conv1.weight"].shape == (8, 4, 3, 3) and p["fc.weight"].shape == (10, 8 * 2 * 2)
    assert t.logits(p, t.batch(0)[0]).shape == (5, 10)


@pytest.mark.parametrize("kwargs, param", [
    ({"channels": ()}, "channels"), ({"channels": (4, 4, 4, 4)}, "channels"),
    ({"channels": (0,)}, "channels"), ({"activation": "elu"}, "activation"),
])
def test_bad_cnn_hparams(kwargs, param):
    with pytest.raises(ValueError, match=param):
        CNNTask("cnn_digits", 0, **kwargs)


@pytest.mark.parametrize("kwargs, param", [
    ({"arch": "lstm"}, "arch"), ({"embed": 0}, "embed"), ({"hidden": 2.5}, "hidden"),
    ({"context": 0}, "context"), ({"arch": "gru", "context": 4}, "context"),
    ({"seq_len": 0}, "seq_len"), ({"batch_size": -1}, "batch_size"),
    ({"activation": "sigmoid"}, "activation"), ({"init_scale": -1.0}, "init_scale"),
])
def test_bad_char_lm_hparams(kwargs, param):
    with pytest.raises(ValueError, match=param):
        CharLMTask(0, **kwargs)


def test_docs_example_runs():
    import pathlib
    import re

    doc = pathlib.Path(__file__).resolve().parents[1] / "docs" / "tasks.md"
    blocks = re.findall(r"^```python\n(.*?)^```", doc.read_text(), re.S | re.M)
    assert blocks
    for code in blocks:
        namespace = {}
        exec(compile(code, str(doc), "exec"), namespace)
        assert torch.isfinite(namespace["loss"]) and torch.isfinite(namespace["val"])


def test_import_and_synthetic_tasks_need_no_sklearn():
    import subprocess
    import textwrap

    code = textwrap.dedent("""
        import sys
        sys.modules["sklearn"] = None                 # import raises ImportError
        import pyoptk.tasks as tasks
        for name in ("quadratic", "rosenbrock", "char_lm"):
            t = tasks.get_family(name).sample(0)
            assert float(t.loss(t.init_params(), t.batch(0))) > 0
        try:
            tasks.get_family("mlp_digits").sample(0)
        except ImportError as e:
            assert "pip install scikit-learn" in str(e), e
            print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("ok")


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_params_batches_and_vmap(family):
    dev = torch.device("cuda")
    t = get_family(family).sample(0)
    p = t.init_params(device=dev)
    batch = t.batch(0, device=dev)
    loss = t.loss(p, batch)
    assert loss.device.type == "cuda" and torch.isfinite(loss)
    torch.testing.assert_close(loss.cpu(), t.loss(t.init_params(), t.batch(0)),
                               rtol=1e-4, atol=1e-5)
    assert t.eval_loss(p, "valid", device=dev).device.type == "cuda"
    stacked = OrderedDict((k, torch.stack([v, v])) for k, v in p.items())
    g = vmap(grad(t.loss), in_dims=(0, None))(stacked, batch)
    assert all(torch.isfinite(v).all() and v.device.type == "cuda" for v in g.values())
