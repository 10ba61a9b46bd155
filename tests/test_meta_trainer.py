"""MetaTrainer, its config and checkpoints: bit-exact resume, corrupted and mismatched
checkpoints, config validation, early stopping, NaN skipping, 2-process gloo
equivalence, fp16 loss scaling, logs and the ``pyoptk meta-train`` command.

Tiny runs: quadratics of dim 8, truncation 2, horizon 8, the real TruncatedBPTT.
"""

import datetime
import json
import os
import shutil

import pytest
import torch
import torch.multiprocessing as mp

from pyoptk.cli import main as cli_main
from pyoptk.meta.checkpoint import CheckpointError, load_checkpoint
from pyoptk.meta import TruncatedBPTT
from pyoptk.meta.config import MetaTrainConfig
from pyoptk.meta.trainer import GROWTH_INTERVAL, INIT_LOSS_SCALE, MetaTrainer
from pyoptk.optim.mlp import MLPOptimizer
from pyoptk.tasks import QuadraticTask, TaskFamily, family_names, register_family


class Quad8Task(QuadraticTask):
    family = "quad8"


class NanTask(Quad8Task):
    """A quadratic whose every loss is NaN."""

    family = "nan8"

    def loss(self, params, batch):
        return super().loss(params, batch) * float("nan")


class MatmulTask(Quad8Task):
    """A quadratic through a matmul with large weights: under fp16 autocast the
    backward of ``x @ W`` overflows unless the loss scale is small enough."""

    family = "matmul8"

    def loss(self, params, batch):
        x = params["x"] - batch.to(dtype=params["x"].dtype, device=params["x"].device)
        w = torch.full((8, 8), 16.0, dtype=x.dtype, device=x.device)
        return ((x @ w) * 1e-3).square().sum()


class _Family(TaskFamily):
    def __init__(self, cls):
        self.cls, self.name = cls, cls.family

    def sample(self, seed):
        return self.cls(seed, dim=8, cond=10.0, noise=0.1)


TEST_FAMILIES = (Quad8Task, NanTask, MatmulTask)


@pytest.fixture(autouse=True, scope="module")
def _test_families():
    """Register this module's families for its tests only (the registry is global: left
    registered, they would show up in other modules' lists of shipped families)."""
    from pyoptk.tasks import registry

    with pytest.MonkeyPatch.context() as mp:
        for cls in TEST_FAMILIES:
            mp.setitem(registry._FAMILIES, cls.family, _Family(cls))
        yield


def make_config(tmp, **over):
    d = {
        "estimator": {"kind": "tbptt", "truncation": 2, "horizon": 8},
        "tasks": {"train": ["quad8"], "valid": ["quad8"]},
        "n_unrolls": 2, "grad_accum": 2, "outer_steps": 6,
        "optimizer": {"lr": 1e-2},
        "validation": {"every": 2, "n_tasks": 2, "horizon": 8, "patience": 100},
        "checkpoint": {"every": 2, "dir": os.path.join(str(tmp), "ck")},
        "log": {"dir": os.path.join(str(tmp), "log"), "tensorboard": False, "plot": False},
        "rule": {"hidden_sizes": [8]},
    }
    for key, value in over.items():
        node = d
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return MetaTrainConfig.from_dict(d)


def assert_same_run(a: MetaTrainer, b: MetaTrainer):
    """Meta-parameters, AdamW state, unrolls and counters equal bit for bit."""
    assert a.outer_step == b.outer_step
    for (ka, pa), (kb, pb) in zip(a.rule.named_parameters(), b.rule.named_parameters()):
        assert ka == kb and torch.equal(pa, pb), ka
    sa, sb = a.meta_optimizer.state_dict(), b.meta_optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i in sa["state"]:
        for k in sa["state"][i]:
            assert torch.equal(sa["state"][i][k], sb["state"][i][k]), (i, k)
    assert a.sampler.state_dict() == b.sampler.state_dict()
    assert repr(a.history) == repr(b.history)  # NaN (skipped steps) equal to NaN
    for j in a.unrolls:
        for ua, ub in zip(a.unrolls[j], b.unrolls[j]):
            assert ua.task.spec == ub.task.spec and ua.step == ub.step
            for k in ua.params:
                assert torch.equal(ua.params[k], ub.params[k])
            for la, lb in zip(ua.state, ub.state):
                assert all(torch.equal(x, y) for x, y in zip(la, lb))
            assert ua.extra.keys() == ub.extra.keys()
            assert all(torch.equal(ua.extra[k], ub.extra[k]) for k in ua.extra)


# ---- staggered starts --------------------------------------------------------------
def test_stagger_spreads_first_unrolls_over_the_horizon(tmp_path):
    """4 slots, horizon 8, truncation 2: the first unrolls start at steps 0, 2, 4, 6
    (fresh parameters), so the last slot finishes after one outer step and restarts on
    the sampler's next task at step 0; without stagger all start at 0."""
    plain = MetaTrainer(make_config(tmp_path / "plain"))
    assert [[u.step for u in plain.unrolls[j]] for j in (0, 1)] == [[0, 0], [0, 0]]
    t = MetaTrainer(make_config(tmp_path / "s", **{"estimator.stagger": True}))
    assert [[u.step for u in t.unrolls[j]] for j in (0, 1)] == [[0, 2], [4, 6]]
    for j in (0, 1):   # same tasks and fresh parameters as the unstaggered run
        for u, v in zip(t.unrolls[j], plain.unrolls[j]):
            assert u.task.spec == v.task.spec
            assert all(torch.equal(u.params[k], v.params[k]) for k in u.params)
    first_specs = [u.task.spec for j in (0, 1) for u in t.unrolls[j]]
    t._outer_step()
    assert [[u.step for u in t.unrolls[j]] for j in (0, 1)] == [[2, 4], [6, 0]]
    assert t.unrolls[1][1].task.spec not in first_specs
    t.fit()   # and trains, checkpoints and validates like any run
    assert t.outer_step == 6


def test_stagger_resumes_bit_exact(tmp_path):
    over = {"estimator.stagger": True}
    ref = MetaTrainer(make_config(tmp_path / "ref", **over))
    ref.fit()
    MetaTrainer(make_config(tmp_path / "a", outer_steps=3, **over)).fit()
    resumed = MetaTrainer(make_config(tmp_path / "a", **over), resume=True)
    resumed.fit()
    assert_same_run(ref, resumed)


# ---- resume ------------------------------------------------------------------------
def test_resume_is_bit_exact(tmp_path):
    ref = MetaTrainer(make_config(tmp_path / "ref"))
    ref.fit()

    # Stop after 3 steps (a checkpoint at the end), resume to 6: outer_steps may change.
    MetaTrainer(make_config(tmp_path / "a", outer_steps=3)).fit()
    resumed = MetaTrainer(make_config(tmp_path / "a"), resume=True)
    assert resumed.outer_step == 3
    resumed.fit()
    assert_same_run(ref, resumed)

    # Crash in step 5: resume from the step-4 checkpoint.
    crashing = MetaTrainer(make_config(tmp_path / "b"))
    estimate = crashing.estimator.estimate

    def crash(*args, **kwargs):
        if crashing.outer_step == 4:
            raise KeyboardInterrupt("killed")
        return estimate(*args, **kwargs)

    crashing.estimator.estimate = crash
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    resumed = MetaTrainer(make_config(tmp_path / "b"), resume=True)
    assert resumed.outer_step == 4
    saved = torch.load(tmp_path / "b" / "ck" / "last.pt", weights_only=True)
    assert torch.equal(torch.get_rng_state(), saved["rng"][0]["torch"])
    resumed.fit()
    assert_same_run(ref, resumed)

    # A crash between save_checkpoint's two renames leaves only prev.pt: resume from it.
    os.replace(tmp_path / "b" / "ck" / "last.pt", tmp_path / "b" / "ck" / "prev.pt")
    assert MetaTrainer(make_config(tmp_path / "b"), resume=True).outer_step == 6


@pytest.mark.parametrize("kind", ["es", "pes"])
def test_resume_is_bit_exact_es_pes(tmp_path, kind):
    over = {"estimator.kind": kind, "estimator.options": {"n_particles": 2, "sigma": 0.01}}
    ref = MetaTrainer(make_config(tmp_path / "ref", outer_steps=5, **over))
    ref.fit()
    MetaTrainer(make_config(tmp_path / "a", outer_steps=3, **over)).fit()
    resumed = MetaTrainer(make_config(tmp_path / "a", outer_steps=5, **over), resume=True)
    resumed.fit()
    assert_same_run(ref, resumed)
    if kind == "pes":  # the PES accumulators (Unroll.extra) went through the checkpoint
        assert all(u.extra for row in resumed.unrolls.values() for u in row)


def test_sigkilled_run_resumes_bit_exact(tmp_path):
    """A real kill (SIGKILL at an arbitrary moment, possibly mid-write) of
    ``pyoptk meta-train`` writing a checkpoint every step."""
    import signal
    import subprocess
    import sys
    import time

    over = {"tasks.train": ["quadratic"], "tasks.valid": ["quadratic"], "n_unrolls": 1,
            "grad_accum": 1, "validation.every": 0, "checkpoint.every": 1}
    cfg = make_config(tmp_path, outer_steps=100000, **over).to_dict()
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "pyoptk.cli", "meta-train", "--config",
                             str(tmp_path / "cfg.json")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    prev = tmp_path / "ck" / "prev.pt"
    deadline = time.monotonic() + 60
    while not prev.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert prev.exists(), err.decode()[-2000:]
    resumed = MetaTrainer(make_config(tmp_path, **over), resume=True)
    killed_at = resumed.outer_step
    assert killed_at >= 1
    steps = killed_at + 3
    resumed = MetaTrainer(make_config(tmp_path, outer_steps=steps, **over), resume=True)
    resumed.fit()
    ref = MetaTrainer(make_config(tmp_path / "ref", outer_steps=steps, **over))
    ref.fit()
    assert_same_run(ref, resumed)


def test_checkpoint_loads_weights_only(tmp_path):
    MetaTrainer(make_config(tmp_path, outer_steps=2)).fit()
    blob = torch.load(tmp_path / "ck" / "last.pt", weights_only=True)
    assert blob["outer_step"] == 2 and len(blob["unrolls"]) == 2
    assert MetaTrainConfig.from_dict(blob["config"]) == make_config(tmp_path, outer_steps=2)


def test_corrupted_checkpoint_is_refused_and_nothing_overwritten(tmp_path):
    cfg = make_config(tmp_path, outer_steps=4)
    MetaTrainer(cfg).fit()
    last, prev = tmp_path / "ck" / "last.pt", tmp_path / "ck" / "prev.pt"
    assert load_checkpoint(str(prev))["outer_step"] == 2
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    before = {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()}
    with pytest.raises(CheckpointError, match=r"last\.pt: unreadable or corrupted.*prev\.pt"):
        MetaTrainer(cfg, resume=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()} == before

    last.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="last.pt"):
        MetaTrainer(cfg, resume=True)
    # Edited meta-parameters: the recorded rule hash no longer matches.
    blob = torch.load(prev, weights_only=True)
    blob["meta_params"]["w0"] += 1.0
    torch.save(blob, last)
    with pytest.raises(CheckpointError, match="do not match the rule hash"):
        MetaTrainer(cfg, resume=True)


def test_mismatched_config_is_refused_naming_the_fields(tmp_path):
    MetaTrainer(make_config(tmp_path, outer_steps=2)).fit()
    other = make_config(tmp_path, **{"estimator.truncation": 4, "optimizer.lr": 0.5})
    with pytest.raises(CheckpointError) as err:
        MetaTrainer(other, resume=True)
    msg = str(err.value)
    assert "estimator.truncation (checkpoint 2, config 4)" in msg
    assert "optimizer.lr" in msg and "outer_steps" not in msg
    with pytest.raises(CheckpointError, match="rule.hidden_sizes"):
        MetaTrainer(make_config(tmp_path, **{"rule.hidden_sizes": [4]}), resume=True)
    with pytest.raises(ValueError, match=r"checkpoint\.dir: .* already holds a checkpoint"):
        MetaTrainer(make_config(tmp_path))  # a fresh run would rotate it away


# ---- config validation -------------------------------------------------------------
BAD_CONFIGS = [
    ({"estimator.truncaton": 2}, "estimator.truncaton: unknown field"),
    ({"estimator.truncation": -1}, "estimator.truncation: expected an int >= 1"),
    ({"estimator.truncation": "2"}, "estimator.truncation: expected an int"),
    ({"estimator.horizon": 1}, "estimator.horizon: expected >= estimator.truncation"),
    ({"estimator.kind": "reinforce"}, "estimator.kind: expected one of"),
    ({"optimizer.betas": [0.9]}, "optimizer.betas: expected a list of 2 numbers"),
    ({"optimizer.lr": True}, "optimizer.lr: expected a number"),
    ({"n_unrolls": 0}, "n_unrolls: expected an int >= 1"),
    ({"precision": "fp8"}, "precision: expected one of"),
    ({"tasks.train": ["nope"]}, "tasks.train: expected registered task families"),
    ({"rule.hidden_sizes": "x"}, "rule.hidden_sizes"),
    ({"rule.features.bogus": 1}, "rule.features.bogus: unknown field"),
    ({"validation.patience": -1}, "validation.patience: expected an int >= 0"),
    ({"log.tensorboard": "yes"}, "log.tensorboard: expected a bool"),
    ({"checkpoint": 3}, "checkpoint: expected a mapping"),
    ({"precision": "fp16", "estimator.kind": "es"}, "precision: 'fp16' needs estimator.kind"),
]


@pytest.mark.parametrize("over, field", BAD_CONFIGS,
                         ids=[f"{next(iter(o))}={o[next(iter(o))]!r}" for o, _ in BAD_CONFIGS])
def test_bad_config_names_the_field(tmp_path, over, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.").replace("(", r"\(")):
        make_config(tmp_path, **over)


def test_config_files_yaml_and_json(tmp_path):
    cfg = make_config(tmp_path)
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_dict()))
    assert MetaTrainConfig.from_yaml(tmp_path / "c.json") == cfg
    (tmp_path / "bad.yaml").write_text("n_unrolls: 2\nestimator:\n  horizon: -3\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: estimator\.horizon"):
        MetaTrainConfig.from_yaml(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        MetaTrainConfig.from_yaml(tmp_path / "list.yaml")
    shipped = os.path.join(os.path.dirname(__file__), "..", "configs", "mlp-small-cpu.yaml")
    assert MetaTrainConfig.from_yaml(shipped).device == "cpu"


def test_estimator_options_and_custom_estimator(tmp_path):
    with pytest.raises(ValueError, match=r"estimator\.options: TruncatedBPTT rejected"):
        MetaTrainer(make_config(tmp_path, **{"estimator.options": {"max_grad_norm": -1.0}}))
    cfg = make_config(tmp_path, outer_steps=1)
    with pytest.raises(ValueError, match="truncation/horizon 4/8 differ"):
        MetaTrainer(cfg, estimator=TruncatedBPTT(cfg.rule, 4, 8))
    trainer = MetaTrainer(cfg, estimator=TruncatedBPTT(cfg.rule, 2, 8, second_order=True))
    assert trainer.fit().skipped_steps == 0 and trainer.estimator.second_order


# ---- training behaviour ------------------------------------------------------------
def test_early_stopping_and_best_rule(tmp_path):
    cfg = make_config(tmp_path, outer_steps=50, **{
        "validation.every": 1, "validation.patience": 2, "validation.min_delta": 1e9})
    result = MetaTrainer(cfg).fit()
    # The first validation improves on +inf; no later one improves by 1e9.
    assert result.stopped_early and result.outer_step == 3 and result.best_step == 1
    best = tmp_path / "ck" / "best_rule.safetensors"
    opt = MLPOptimizer.from_pretrained(str(best), [torch.zeros(3, requires_grad=True)])
    assert opt.config == cfg.rule
    resumed = MetaTrainer(cfg, resume=True)
    assert resumed.fit().outer_step == 3  # a stopped run stays stopped


def test_non_finite_estimates_are_skipped(tmp_path):
    cfg = make_config(tmp_path, outer_steps=3, **{"tasks.train": ["nan8"]})
    trainer = MetaTrainer(cfg)
    init = [p.detach().clone() for p in trainer.rule.parameters()]
    result = trainer.fit()
    assert result.skipped_steps == 3
    assert all(torch.equal(a, b) for a, b in zip(init, trainer.rule.parameters()))
    assert trainer.meta_optimizer.state_dict()["state"] == {}


def test_fp16_loss_scaling(tmp_path):
    # Quadratics have no autocast op: scaling by 2^k must leave the fp32 run exact.
    ref = MetaTrainer(make_config(tmp_path / "a", outer_steps=3))
    ref.fit()
    fp16 = MetaTrainer(make_config(tmp_path / "b", outer_steps=3, precision="fp16"))
    fp16.fit()
    for a, b in zip(ref.rule.parameters(), fp16.rule.parameters()):
        assert torch.equal(a, b)
    assert fp16.scaler.scale == INIT_LOSS_SCALE and fp16.scaler.growth == 3 < GROWTH_INTERVAL
    # x @ W in float16: 2^16-scaled cotangents overflow; the scale halves until they fit.
    mm = MetaTrainer(make_config(tmp_path / "c", outer_steps=6, precision="fp16",
                                 **{"tasks.train": ["matmul8"], "validation.every": 0}))
    result = mm.fit()
    assert mm.scaler.scale < INIT_LOSS_SCALE and result.skipped_steps >= 1
    assert result.skipped_steps < 6 and all(torch.isfinite(p).all()
                                            for p in mm.rule.parameters())
    # The loss scale is part of the checkpoint: 3 + 3 steps equal 6.
    over = {"tasks.train": ["matmul8"], "validation.every": 0}
    MetaTrainer(make_config(tmp_path / "d", outer_steps=3, precision="fp16", **over)).fit()
    resumed = MetaTrainer(make_config(tmp_path / "d", outer_steps=6, precision="fp16", **over),
                          resume=True)
    resumed.fit()
    assert_same_run(mm, resumed)
    assert resumed.scaler.state_dict() == mm.scaler.state_dict()


def test_bf16_autocasts_the_task_losses(tmp_path):
    over = {"tasks.train": ["matmul8"], "validation.every": 0, "outer_steps": 2}
    ref = MetaTrainer(make_config(tmp_path / "a", **over))
    ref.fit()
    bf16 = MetaTrainer(make_config(tmp_path / "b", precision="bf16", **over))
    bf16.fit()
    assert bf16.scaler is None and all(p.dtype == torch.float32 for p in bf16.rule.parameters())
    assert all(torch.isfinite(p).all() for p in bf16.rule.parameters())
    u = bf16.unrolls[0][0]  # the wrapped task: the task's attributes, fp32 losses
    assert u.task.spec.family == "matmul8" and u.task.param_count == 8
    assert u.task.eval_loss(u.params).dtype == torch.float32
    # x @ W ran in bfloat16: the meta-losses differ from fp32 at bf16 precision.
    a, b = ref.history["meta_loss"], bf16.history["meta_loss"]
    assert a != b and all(abs(x - y) <= 2e-2 * abs(x) for x, y in zip(a, b))


def test_logs_tensorboard_plot_and_progress(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_config(tmp_path, outer_steps=2, **{"log.tensorboard": True, "log.plot": True})
    MetaTrainer(cfg, progress=True).fit()
    bar = capsys.readouterr().err  # tqdm's bar
    assert "meta-train" in bar and "2/2" in bar
    log = tmp_path / "log"
    assert (log / "loss_curve.png").stat().st_size > 0
    acc = EventAccumulator(str(log))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"meta/meta_loss", "meta/grad_norm", "meta/finite_fraction", "valid/loss",
            "valid/best", "estimator/inner_loss"} <= set(tags)
    assert [e.step for e in acc.Scalars("meta/meta_loss")] == [1, 2]


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_resume_is_bit_exact(tmp_path, precision):
    over = {"device": "cuda", "precision": precision, "tasks.train": ["matmul8"]}
    ref = MetaTrainer(make_config(tmp_path / "ref", outer_steps=4, **over))
    ref.fit()
    assert all(p.is_cuda and torch.isfinite(p).all() for p in ref.rule.parameters())
    MetaTrainer(make_config(tmp_path / "a", outer_steps=2, **over)).fit()
    resumed = MetaTrainer(make_config(tmp_path / "a", outer_steps=4, **over), resume=True)
    assert all(u.params["x"].is_cuda for row in resumed.unrolls.values() for u in row)
    resumed.fit()
    assert_same_run(ref, resumed)


# ---- distributed -------------------------------------------------------------------
def _worker(rank, world, cfg_dict, init_file, out):
    torch.set_num_threads(1)
    for cls in TEST_FAMILIES:  # a fresh process: the fixture did not run here
        if cls.family not in family_names():
            register_family(_Family(cls))
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}",
                                         timeout=datetime.timedelta(seconds=120),
                                         rank=rank, world_size=world)
    try:
        trainer = MetaTrainer(MetaTrainConfig.from_dict(cfg_dict))
        trainer.fit()
        if rank == 1:  # not the rank that wrote the checkpoint
            torch.save({k: v.detach() for k, v in trainer.rule.named_parameters()}, out)
        torch.distributed.barrier()  # no rank tears gloo down while another still uses it
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_processes_equal_one(tmp_path):
    cfg = make_config(tmp_path / "one", outer_steps=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = MetaTrainer(cfg)
        single.fit()
    finally:
        torch.set_num_threads(threads)
    cfg2 = make_config(tmp_path / "two", outer_steps=4)
    out = tmp_path / "rank1.pt"
    mp.spawn(_worker, args=(2, cfg2.to_dict(), str(tmp_path / "pg"), str(out)), nprocs=2)
    rank1 = torch.load(out, weights_only=True)
    for k, p in single.rule.named_parameters():
        assert torch.equal(p, rank1[k]), k
    # Rank 0's checkpoint holds every unroll, so one process resumes the 2-process run.
    resumed = MetaTrainer(make_config(tmp_path / "two", outer_steps=4), resume=True)
    assert resumed.outer_step == 4
    assert_same_run(single, resumed)


# ---- the command -------------------------------------------------------------------
def test_cli_meta_train_runs_and_resumes(tmp_path, capsys):
    cfg = make_config(tmp_path, outer_steps=2).to_dict()
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "out"
    assert cli_main(["meta-train", "--config", str(path), "--out", str(out)]) == 0
    assert (out / "checkpoints" / "last.pt").exists()
    cfg["outer_steps"] = 4
    path.write_text(json.dumps(cfg))
    assert cli_main(["meta-train", "--config", str(path), "--out", str(out), "--resume"]) == 0
    text = capsys.readouterr().out
    assert "resumed from" in text and "at outer step 2" in text and "outer step 4" in text
    assert load_checkpoint(str(out / "checkpoints" / "last.pt"))["outer_step"] == 4

    cfg["estimator"]["truncation"] = 3
    path.write_text(json.dumps(cfg))
    assert cli_main(["meta-train", "--config", str(path), "--out", str(out), "--resume"]) == 2
    assert "estimator.truncation" in capsys.readouterr().err
    cfg["estimator"]["truncation"] = 0
    path.write_text(json.dumps(cfg))
    assert cli_main(["meta-train", "--config", str(path)]) == 2
    assert "estimator.truncation: expected an int >= 1" in capsys.readouterr().err
    shutil.rmtree(out)


def test_validation_split_and_log_loss():
    import math

    from pyoptk.learned import MLPConfig, init_meta_params
    from pyoptk.meta.trainer import validation_loss
    from pyoptk.tasks import get_family

    task = get_family("logreg_wine").sample(0)
    meta, cfg = init_meta_params(MLPConfig(), 0), MLPConfig()
    train = validation_loss(task, meta, cfg, 3, torch.device("cpu"), "train")
    valid = validation_loss(task, meta, cfg, 3, torch.device("cpu"), "valid")
    assert train != valid
    assert validation_loss(task, meta, cfg, 3, torch.device("cpu"), "train", True) == \
        pytest.approx(math.log(train), rel=1e-12)
    with pytest.raises(ValueError, match="validation.split"):
        MetaTrainConfig.from_dict({"validation": {"split": "holdout"}})


def test_validation_log_loss_floors_solved_tasks():
    import math

    from pyoptk.learned import MLPConfig, init_meta_params
    from pyoptk.meta.trainer import LOG_LOSS_FLOOR, validation_loss
    from pyoptk.tasks import QuadraticTask

    class Solved(QuadraticTask):
        def eval_loss(self, params, split="valid", *, device=None):
            return torch.zeros(())

    task = Solved(0, dim=4)
    cfg = MLPConfig()
    got = validation_loss(task, init_meta_params(cfg, 0), cfg, 2, torch.device("cpu"),
                          "train", True)
    assert got == math.log(LOG_LOSS_FLOOR)


def test_fp16_with_second_order_is_refused():
    with pytest.raises(ValueError, match="precision: 'fp16' cannot be combined with "
                                         "estimator.options.second_order"):
        MetaTrainConfig.from_dict({"precision": "fp16",
                                   "estimator": {"kind": "tbptt",
                                                 "options": {"second_order": True}}})
    MetaTrainConfig.from_dict({"precision": "bf16",
                               "estimator": {"kind": "tbptt", "options": {"second_order": True}}})
