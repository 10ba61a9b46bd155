"""pyoptk optimizers inside real training set-ups: torch.amp.GradScaler, a
torch.compile'd model, a torch.compile'd optimizer step, and DDP over 2 gloo
processes."""

import datetime
import operator

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pyoptk
from helpers import assert_close
from pyoptk.learned import MLPConfig
from test_optim_adamw import batches, make_model

SMALL_MLP = MLPConfig(hidden_sizes=(8,))


def test_grad_scaler_unscale_clip_and_skipped_overflow_step():
    """scaler.unscale_ + clip + scaler.step with AdamW and Lookahead(AdamW): the scale
    is a power of two, so unscaled grads are exact and each run equals the same run
    without a scaler in which the overflow step is simply left out; Lookahead does not
    count the skipped step."""
    def run(make_opt, use_scaler):
        model = make_model()
        opt = make_opt(model.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=use_scaler)
        for i, x in enumerate(batches(10, batch=8)):
            opt.zero_grad()
            loss = model(x).square().mean()
            if i == 3:
                if not use_scaler:
                    continue
                loss = loss * float("inf")  # overflow: the scaler must skip this step
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
        return model, opt, scaler

    def lookahead(ps):
        return pyoptk.optim.Lookahead(pyoptk.optim.AdamW(ps, lr=1e-2), k=4)

    for make_opt in (lambda ps: pyoptk.optim.AdamW(ps, lr=1e-2), lookahead):
        (scaled, opt, scaler), (plain, _, _) = run(make_opt, True), run(make_opt, False)
        assert scaler.get_scale() == 512.0  # halved once, at the overflow
        for p, q in zip(scaled.parameters(), plain.parameters()):
            assert torch.equal(p, q)
    assert opt._inner_steps == 9
    assert opt.optimizer.state[scaled[0].weight]["step"].item() == 9


# lr_mult=100 makes the untrained MLP rule's steps (~1e-5 by construction) visible
# next to the 1e-6 tolerance below.
COMPILE_OPTIMIZERS = {
    "AdamW": lambda ps: pyoptk.optim.AdamW(ps, lr=1e-2),
    "MLPOptimizer": lambda ps: pyoptk.optim.MLPOptimizer(ps, config=SMALL_MLP, lr_mult=100.0),
}


@pytest.mark.parametrize("name", list(COMPILE_OPTIMIZERS))
def test_compiled_model_trains_like_eager(name):
    """torch.compile'd model (dynamo + AOTAutograd): grads arrive as in eager and the
    optimizer's result matches (AOTAutograd may reorder float ops, hence 1e-6)."""
    eager, compiled = make_model(), make_model()
    init = [p.detach().clone() for p in eager.parameters()]
    model = torch.compile(compiled, backend="aot_eager")
    opt_e = COMPILE_OPTIMIZERS[name](eager.parameters())
    opt_c = COMPILE_OPTIMIZERS[name](compiled.parameters())
    for x in batches(5, batch=8):
        for m, opt in ((model, opt_c), (eager, opt_e)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for p, q, p0 in zip(compiled.parameters(), eager.parameters(), init):
        assert_close(p, q, 1e-6, 1e-6, what="compiled vs eager")
        assert (q - p0).abs().max() > 1e-4, "the optimizer barely moved the parameters"
    assert opt_c.state[compiled[0].weight]["step"].item() == 5


def _mlp_model(widths, seed=0):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers)


class _OpCounter:
    """A torch.compile backend (aot_eager underneath) counting compiled frames and the
    compute ops of their graphs (``getitem`` of a multi-tensor op's result list is
    indexing, one per tensor, not work)."""

    def __init__(self):
        self.frame_count = 0
        self.op_count = 0
        self._aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def __call__(self, gm, example_inputs):
        self.frame_count += 1
        self.op_count += sum(1 for n in gm.graph.nodes if n.op == "call_function"
                             and n.target is not operator.getitem)
        return self._aot_eager(gm, example_inputs)


def _small_mlp_optimizer(params):
    return pyoptk.optim.MLPOptimizer(params, config=SMALL_MLP, lr_mult=torch.tensor(50.0))


def _compiled_step_run(widths, steps=5, schedule=False, make_opt=_small_mlp_optimizer):
    """(frames compiled, FX ops captured) of ``torch.compile``'d ``opt.step`` (default
    MLPOptimizer) over ``steps`` steps of a model with layer ``widths``, checking each
    step against an eager twin (bitwise)."""
    torch._dynamo.reset()
    eager, comp = _mlp_model(widths), _mlp_model(widths)
    opts = [make_opt(m.parameters()) for m in (eager, comp)]
    cnt = _OpCounter()
    if schedule:
        # the scheduler wraps opt.step in a function dynamo skips (torch's code): compile
        # a function that calls it; the step inside is still compiled as its own frame
        scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)) for o in opts]
        compiled_step = torch.compile(lambda: opts[1].step(), backend=cnt)
    else:
        scheds = []
        compiled_step = torch.compile(opts[1].step, backend=cnt, fullgraph=True)
    x = torch.randn(8, widths[0], generator=torch.Generator().manual_seed(2))
    for _ in range(steps):
        for m, o in zip((eager, comp), opts):
            o.zero_grad()
            m(x).square().mean().backward()
        opts[0].step()
        compiled_step()
        for s in scheds:
            s.step()
        for p, q in zip(eager.parameters(), comp.parameters()):
            assert torch.equal(p, q), "compiled step differs from eager"
    assert opts[1].state[comp[0].weight]["step"].item() == steps
    return cnt.frame_count, cnt.op_count


@pytest.mark.parametrize("make_opt", [
    lambda ps: pyoptk.optim.AdamW(ps, lr=torch.tensor(1e-2), amsgrad=True),
    lambda ps: pyoptk.optim.LAMB(ps, lr=torch.tensor(1e-2), weight_decay=0.01,
                                 centralize=True),
], ids=["AdamW", "LAMB"])
def test_compiled_fused_optimizer_step_matches_eager(make_opt):
    """``torch.compile(opt.step, fullgraph=True)`` of AdamW / LAMB: eager's results bit
    for bit, at most two compiles (the first step creates the state), and a graph that
    does not grow with the number of differently shaped tensors."""
    few = _compiled_step_run((4, 3), make_opt=make_opt)
    many = _compiled_step_run((13, 5, 7, 2, 6, 9, 3), make_opt=make_opt)
    assert few[0] <= 2 and many[0] == few[0], (few, many)
    assert many[1] == few[1], f"graph grows with the tensor count: {few[1]} vs {many[1]} ops"


def test_compiled_mlp_optimizer_step_does_not_recompile_per_shape():
    """``torch.compile(opt.step, fullgraph=True)`` (no graph break; AOTAutograd
    functionalizes the in-place op) gives eager's results bit for bit, and compiles at
    most twice — the first step creates the state (eagerly, in ``_init_group``) and
    caches the meta-parameters on the device, which the second step's guards see — and
    never again over later steps. Neither the frame count nor the graph grows with the
    number of differently shaped tensors: the step is one multi-tensor op call per
    bucket, never a per-tensor graph."""
    few = _compiled_step_run((4, 3))                     # 4 tensors, 2 shapes each kind
    many = _compiled_step_run((13, 5, 7, 2, 6, 9, 3))    # 12 tensors, all shapes distinct
    assert few[0] <= 2 and many[0] == few[0], (few, many)
    assert many[1] == few[1], f"graph grows with the tensor count: {few[1]} vs {many[1]} ops"


def test_compiled_mlp_optimizer_step_with_lr_schedule_does_not_recompile():
    """With a tensor ``lr_mult`` a scheduler changes the lr in place: the compiled step
    reads it from the tensor and is not recompiled per lr value (a float lr_mult is a
    constant to dynamo, recompiled for every new value — as torch.optim's)."""
    frames, _ = _compiled_step_run((4, 3, 2), steps=6, schedule=True)
    assert frames <= 2, frames  # as without a schedule: the step's two compiles


DDP_OPTIMIZERS = ["AdamW", "LAMB", "Lookahead", "MLPOptimizer"]


def _optimizers(models):
    """AdamW, LAMB, Lookahead(AdamW) and MLPOptimizer (default rule), one model each."""
    return [pyoptk.optim.AdamW(models[0].parameters(), lr=1e-2),
            pyoptk.optim.LAMB(models[1].parameters(), lr=1e-2, weight_decay=0.01),
            pyoptk.optim.Lookahead(pyoptk.optim.AdamW(models[2].parameters(), lr=1e-2), k=2),
            pyoptk.optim.MLPOptimizer(models[3].parameters(), lr_mult=100.0,
                                      weight_decay=0.01)]


def _flat(models):
    return [torch.cat([p.detach().flatten() for p in m.parameters()]) for m in models]


def _ddp_worker(rank, world, init_file, out):
    torch.set_num_threads(1)
    # A file rendezvous (no port to race for) and a timeout: a lost peer fails the test
    # instead of hanging it.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        models = [torch.nn.parallel.DistributedDataParallel(make_model())
                  for _ in DDP_OPTIMIZERS]
        opts = _optimizers(models)
        for x in batches(5, batch=16):
            for m, opt in zip(models, opts):
                opt.zero_grad()
                m(x.chunk(world)[rank]).square().mean().backward()
                opt.step()
        out[rank] = _flat(models)
        dist.barrier()  # no rank tears gloo down while the other still uses it
    finally:
        dist.destroy_process_group()


def _single_process_as_ddp(world):
    """One process doing what DDP does: each shard's grad times 1/world, summed."""
    models = [make_model() for _ in DDP_OPTIMIZERS]
    opts = _optimizers(models)
    for x in batches(5, batch=16):
        for m, opt in zip(models, opts):
            total = None
            for shard in x.chunk(world):
                opt.zero_grad()
                m(shard).square().mean().backward()
                grads = [p.grad * (1.0 / world) for p in m.parameters()]
                total = grads if total is None else [a + b for a, b in zip(total, grads)]
            for p, g in zip(m.parameters(), total):
                p.grad = g
            opt.step()
    return _flat(models)


def test_ddp_two_gloo_processes_match_single_process(tmp_path):
    """Both ranks must hold identical params, equal to one process that averages the
    two shards' grads as DDP does (bitwise: same math, same reduction order)."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_ddp_worker, args=(2, str(tmp_path / "pg"), out), nprocs=2, join=True)
        ranks = [out[0], out[1]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers
    try:
        expected = _single_process_as_ddp(2)
    finally:
        torch.set_num_threads(threads)
    assert len(expected) == len(DDP_OPTIMIZERS)
    start = _flat([make_model()])[0]
    for name, r0, r1, e in zip(DDP_OPTIMIZERS, *ranks, expected):
        assert not torch.equal(e, start), f"{name}: did not train"
        assert torch.equal(r0, r1), f"{name}: ranks diverged"
        assert torch.equal(r0, e), f"{name}: DDP differs from the single-process run"
