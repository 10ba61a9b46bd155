"""Universal initialization and the episodic loop: fit_episodic resumes exactly and
stops early on a flat validation loss; a meta-learned sinusoid initialization
fine-tunes better than a random one; save/load round-trips; the CLI trains and
fine-tunes."""

import json

import pytest
import torch

from pyoptk import cli
from pyoptk.meta.episodic import fit_episodic
from pyoptk.meta.universal_init import (
    InitConfig, build_model, evaluate_fine_tune, load_init, meta_init, save_init)


pytestmark = pytest.mark.usefixtures("one_thread")


def _toy(seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2)

    def step(i):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(8, 3, generator=g)
        loss = (lin(x) - x.sum(1, keepdim=True)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    def validate():
        x = torch.ones(4, 3)
        return (lin(x) - 3).square().mean().item()

    return lin, opt, step, validate


def test_fit_episodic_resume_is_exact(tmp_path):
    lin, opt, step, val = _toy()
    fit_episodic(step, val, {"m": lin, "o": opt}, iterations=20, valid_every=5, patience=0,
                 progress=False)
    ck = str(tmp_path / "ck.pt")
    lin2, opt2, step2, val2 = _toy()
    r1 = fit_episodic(step2, val2, {"m": lin2, "o": opt2}, iterations=10, valid_every=5,
                      patience=0, checkpoint=ck, progress=False)
    assert r1.iterations == 10
    lin3, opt3, step3, val3 = _toy(seed=1)   # fresh objects: everything comes from the file
    r2 = fit_episodic(step3, val3, {"m": lin3, "o": opt3}, iterations=20, valid_every=5,
                      patience=0, checkpoint=ck, log_dir=str(tmp_path / "tb"), progress=True)
    assert r2.iterations == 20 and [h["iteration"] for h in r2.history] == [5, 10, 15, 20]
    for a, b in zip(lin.parameters(), lin3.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any((tmp_path / "tb").iterdir())


def test_fit_episodic_early_stopping_restores_best():
    lin, opt, step, _ = _toy()
    vals = iter([3.0, 2.0, 2.5, 2.6, 2.7, 1.0])
    snapshots = []

    def validate():
        snapshots.append(lin.weight.detach().clone())
        return next(vals)

    res = fit_episodic(step, validate, {"m": lin}, iterations=100, valid_every=2, patience=3,
                       progress=False)
    assert res.stopped_early and res.best_valid == 2.0 and res.best_iteration == 4
    assert res.iterations == 10
    torch.testing.assert_close(lin.weight.detach(), snapshots[1])
    with pytest.raises(ValueError, match="valid_every must be a positive int"):
        fit_episodic(step, validate, {}, iterations=5, valid_every=0)


def test_meta_learned_init_fine_tunes_better_than_random(tmp_path):
    cfg = InitConfig(family="sinusoid", method="maml", iterations=60, meta_batch=8,
                     inner_steps=1, inner_lr=0.01, outer_lr=3e-3, k_shot=10)
    model, res = meta_init(cfg, valid_every=20, patience=0, progress=False)
    assert res.best_valid < res.history[0]["valid_loss"] or res.best_iteration == 20
    path = str(tmp_path / "init.pt")
    save_init(path, model, cfg)
    loaded, cfg2 = load_init(path)
    assert cfg2 == cfg
    for a, b in zip(model.parameters(), loaded.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    learned = [evaluate_fine_tune(loaded, cfg, t, steps=5, lr=0.01)["query_loss_after"]
               for t in range(20)]
    random = [evaluate_fine_tune(build_model(cfg), cfg, t, steps=5, lr=0.01)["query_loss_after"]
              for t in range(20)]
    assert sum(learned) < 0.8 * sum(random), (sum(learned), sum(random))


def test_cli_train_and_finetune(tmp_path, capsys):
    out = str(tmp_path / "r.pt")
    assert cli.main(["meta-init", "train", "--family", "digits", "--method", "reptile",
                     "--iterations", "4", "--meta-batch", "2", "--inner-steps", "2",
                     "--inner-lr", "0.1", "--outer-lr", "0.5", "--k-shot", "1",
                     "--valid-every", "2", "--out", out]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["iterations"] == 4 and rec["out"] == out
    assert cli.main(["meta-init", "finetune", out, "--task", "3", "--steps", "3"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= res["query_acc_after"] <= 1 and res["query_loss_after"] < res["query_loss_before"]
    with pytest.raises(SystemExit):
        cli.main(["meta-init", "train", "--family", "omniglot", "--out", out])
