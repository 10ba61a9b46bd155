"""pyoptk optimizers inside real training set-ups: torch.amp.GradScaler, a
torch.compile'd model, and DDP over 2 gloo processes."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pyoptk
from helpers import assert_close
from test_optim_adamw import batches, make_model


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


def test_compiled_model_trains_like_eager():
    """torch.compile'd model (dynamo + AOTAutograd): grads arrive as in eager and the
    optimizer's result matches (AOTAutograd may reorder float ops, hence 1e-6)."""
    eager, compiled = make_model(), make_model()
    model = torch.compile(compiled, backend="aot_eager")
    opt_e = pyoptk.optim.AdamW(eager.parameters(), lr=1e-2)
    opt_c = pyoptk.optim.AdamW(compiled.parameters(), lr=1e-2)
    for x in batches(5, batch=8):
        for m, opt in ((model, opt_c), (eager, opt_e)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for p, q in zip(compiled.parameters(), eager.parameters()):
        assert_close(p, q, 1e-6, 1e-6, what="compiled vs eager")
    assert opt_c.state[compiled[0].weight]["step"].item() == 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _optimizers(models):
    """AdamW, LAMB and Lookahead(AdamW), one model each."""
    return [pyoptk.optim.AdamW(models[0].parameters(), lr=1e-2),
            pyoptk.optim.LAMB(models[1].parameters(), lr=1e-2, weight_decay=0.01),
            pyoptk.optim.Lookahead(pyoptk.optim.AdamW(models[2].parameters(), lr=1e-2), k=2)]


def _flat(models):
    return [torch.cat([p.detach().flatten() for p in m.parameters()]) for m in models]


def _ddp_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        models = [torch.nn.parallel.DistributedDataParallel(make_model()) for _ in range(3)]
        opts = _optimizers(models)
        for x in batches(5, batch=16):
            for m, opt in zip(models, opts):
                opt.zero_grad()
                m(x.chunk(world)[rank]).square().mean().backward()
                opt.step()
        out[rank] = _flat(models)
    finally:
        dist.destroy_process_group()


def _single_process_as_ddp(world):
    """One process doing what DDP does: each shard's grad times 1/world, summed."""
    models = [make_model() for _ in range(3)]
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


def test_ddp_two_gloo_processes_match_single_process():
    """Both ranks must hold identical params, equal to one process that averages the
    two shards' grads as DDP does (bitwise: same math, same reduction order)."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True)
        ranks = [out[0], out[1]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers
    try:
        expected = _single_process_as_ddp(2)
    finally:
        torch.set_num_threads(threads)
    for name, r0, r1, e in zip(["AdamW", "LAMB", "Lookahead"], *ranks, expected):
        assert torch.equal(r0, r1), f"{name}: ranks diverged"
        assert torch.equal(r0, e), f"{name}: DDP differs from the single-process run"
