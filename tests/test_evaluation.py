"""pyoptk.meta.evaluation: optimizer runs on tasks, the tuned-AdamW protocol, the report
and the ``pyoptk eval`` / ``pyoptk compare`` commands."""

import math
import os

import pytest
import torch

from pyoptk.meta import evaluation as ev
from pyoptk.optim import MLPOptimizer
from pyoptk.tasks import QuadraticTask, TaskSampler

pytestmark = pytest.mark.usefixtures("one_thread")


def quad(seed=0, **kw):
    kw = {"dim": 16, "cond": 10.0, **kw}
    return QuadraticTask(seed, **kw)


def test_train_task_is_deterministic_and_counts_steps():
    spec = ev.resolve_optimizer("adamw:lr=0.01")
    a = ev.train_task(quad(), spec.factory, 30, name="a")
    b = ev.train_task(quad(), spec.factory, 30, name="a")
    assert a.losses == b.losses and len(a.losses) == 30
    assert a.final_loss == pytest.approx(sum(a.losses[-3:]) / 3)
    assert a.losses[-1] < a.losses[0]
    assert math.isfinite(a.test_loss) and not a.diverged


def test_divergence_is_reported_not_hidden():
    r = ev.train_task(quad(cond=1e3), ev.resolve_optimizer("sgd:lr=50").factory, 50)
    assert r.diverged and r.final_loss == math.inf and r.test_loss == math.inf
    assert len(r.losses) < 50 and not math.isfinite(r.losses[-1])


def test_adamw_tuned_picks_the_best_lr_of_the_grid():
    task = quad(1)
    grid = (1e-3, 1e-1)
    rep = ev.evaluate(["adamw-tuned"], [task], 40, lr_grid=grid)
    tuned = rep.runs[task.name]["adamw-tuned"]
    finals = {lr: ev.train_task(task, ev.resolve_optimizer(f"adamw:lr={lr}").factory,
                                40).final_loss for lr in grid}
    assert tuned.lr == min(finals, key=finals.get)
    assert tuned.final_loss == min(finals.values())


def test_steps_to_reach():
    losses = [5, 4, 3, 2, 1, 1]
    assert ev.steps_to_reach(losses, 3.0, 2) == 4      # mean(3, 2) <= 3 at step 4
    assert ev.steps_to_reach(losses, 0.5, 2) is None
    assert ev.steps_to_reach(losses, 5.0, 1) == 1


def test_report_win_rate_and_table():
    tasks = [quad(s) for s in range(3)]
    rep = ev.evaluate(["adamw", "adamw:lr=0.05"], tasks, 30)
    w, t, lo = rep.win_rate("adamw:lr=0.05", "adamw")
    assert w + t + lo == 3
    finals = [(rep.runs[k.name]["adamw:lr=0.05"].final_loss, rep.runs[k.name]["adamw"].final_loss)
              for k in tasks]
    assert w == sum(a < b and abs(a - b) > 0.01 * max(a, b) for a, b in finals)
    table = rep.table()
    assert "adamw:lr=0.05 vs adamw:" in table and tasks[0].name in table


def test_learned_optimizer_from_a_rule_file(tmp_path):
    path = str(tmp_path / "rule.pt")
    MLPOptimizer([torch.nn.Parameter(torch.zeros(2))], seed=3).save_pretrained(path)
    spec = ev.resolve_optimizer(path + ":lr_mult=2")
    r = ev.train_task(quad(), spec.factory, 5)
    assert math.isfinite(r.final_loss)
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = spec.factory(params)
    assert isinstance(opt, MLPOptimizer) and opt.param_groups[0]["lr"] == 2.0


@pytest.mark.parametrize("spec, msg", [
    ("", "non-empty"), ("adamw:lr", "key=value"), ("adamw:lr=fast", "'lr' must be a number"),
    ("no-such-rule", "no-such-rule")])
def test_bad_optimizer_specs(spec, msg):
    with pytest.raises(ValueError, match=msg):
        ev.resolve_optimizer(spec)


def test_bad_evaluate_arguments():
    with pytest.raises(ValueError, match="optimizers must not be empty"):
        ev.evaluate([], [quad()], 5)
    with pytest.raises(ValueError, match="duplicates"):
        ev.evaluate(["adamw", "adamw"], [quad()], 5)
    with pytest.raises(ValueError, match="steps must be an int"):
        ev.evaluate(["adamw"], [quad()], 0)
    with pytest.raises(ValueError, match="lr_grid"):
        ev.evaluate(["adamw-tuned"], [quad()], 5, lr_grid=[])


def test_eval_and_compare_commands(tmp_path, capsys):
    from pyoptk.cli import main

    fam = TaskSampler("train", 0).families[0]
    out = str(tmp_path / "ev")
    assert main(["eval", "--tasks", fam, "--n-tasks", "2", "--steps", "12", "--out", out,
                 "-o", "adamw", "-o", "sgd:lr=0.01"]) == 0
    text = open(os.path.join(out, "results.txt")).read()
    assert "sgd:lr=0.01 vs adamw" in text and os.path.getsize(os.path.join(out, "loss_curves.png"))
    out = str(tmp_path / "cmp")
    assert main(["compare", "--tasks", f"{fam}:7", "--steps", "10", "--out", out,
                 "-o", "adamw", "-o", "lamb"]) == 0
    assert f"{fam}/7" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown task family"):
        main(["compare", "--tasks", "nope:1", "--steps", "3", "--out", out])
