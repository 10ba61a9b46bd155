"""pyoptk optimizers inside real training set-ups: GradScaler, torch.compile'd models,
DDP over 2 gloo processes, and torch.compile of the fused op itself."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pyoptk
from helpers import assert_close
from test_optim_adamw import make_model


def test_grad_scaler_unscale_and_step():
    scaler_a = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler_b = torch.amp.GradScaler("cpu", init_scale=1024.0)
    a, b = make_model(), make_model()
    ours, theirs = pyoptk.optim.AdamW(a.parameters(), lr=1e-2), torch.optim.AdamW(b.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for i in range(10):
        x = torch.randn(8, 13, generator=gen)
        for m, o, s in ((a, ours, scaler_a), (b, theirs, scaler_b)):
            o.zero_grad()
            loss = m(x).square().mean()
            if i == 3:
                loss = loss * float("inf")  # an overflow step must be skipped
            s.scale(loss).backward()
            s.unscale_(o)
            pyoptk.ops.clip_grad_norm_(m.parameters(), 1.0) if o is ours else \
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            s.step(o)
            s.update()
    assert scaler_a.get_scale() == scaler_b.get_scale() < 1024.0
    assert ours.state[a[0].weight]["step"].item() == 9  # one step skipped
    for p, q in zip(a.parameters(), b.parameters()):
        assert_close(p, q, 1e-5, 1e-4, what="GradScaler")


def test_compiled_model_trains_like_eager():
    a, b = make_model(), make_model()
    ca = torch.compile(a, backend="eager")
    oa, ob = pyoptk.optim.AdamW(a.parameters(), lr=1e-2), pyoptk.optim.AdamW(b.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(8, 13, generator=gen)
        for m, o in ((ca, oa), (b, ob)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_fused_op_under_torch_compile():
    """The custom op traces with its fake impl and runs inside a compiled function."""
    params = [torch.randn(10), torch.randn(3, 4)]
    grads = [torch.randn_like(p) for p in params]
    ref = [p.clone() for p in params]
    state = lambda: ([torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],  # noqa: E731
                     [torch.zeros(()) for _ in params])
    m1, v1, s1 = state()
    m2, v2, s2 = state()

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(ps, gs, ms, vs, ss):
        torch.ops.pyoptk.adamw_(ps, gs, ms, vs, [], ss, 1e-2, None, 0.9, 0.999, 1e-8, 0.01,
                                False, False)

    step(params, grads, m1, v1, s1)
    pyoptk.ops.adamw_(ref, grads, m2, v2, s2, lr=1e-2, weight_decay=0.01)
    for p, r in zip(params, ref):
        assert torch.equal(p, r)
    assert s1[0].item() == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    opt = pyoptk.optim.LAMB(model.parameters(), lr=1e-2, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(16, 13, generator=gen)
        opt.zero_grad()
        model(x[rank * 8:(rank + 1) * 8]).square().mean().backward()
        opt.step()
    out[rank] = torch.cat([p.detach().flatten() for p in model.parameters()])
    dist.destroy_process_group()


def test_ddp_two_gloo_processes_match_single_process():
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    single = make_model()
    opt = pyoptk.optim.LAMB(single.parameters(), lr=1e-2, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(16, 13, generator=gen)
        opt.zero_grad()
        single(x).square().mean().backward()  # mean over 16 = DDP's average of two means
        opt.step()
    expected = torch.cat([p.detach().flatten() for p in single.parameters()])
    assert torch.equal(out[0], out[1]), "ranks diverged"
    assert_close(out[0], expected, 1e-6, 1e-5, what="DDP vs single process")
