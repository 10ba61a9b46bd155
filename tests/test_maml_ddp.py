"""MAML under DistributedDataParallel: 2 gloo processes, each with half the meta-batch,
end with the single-process meta-gradient of the whole meta-batch."""

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from pyoptk.meta.maml import MAML, shard_meta_batch
from pyoptk.tasks.sinusoid import SinusoidEpisodes


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)).double()


def _batch():
    return SinusoidEpisodes(5, 5, seed=0).batch(0, 4).to(dtype=torch.float64)


def _worker(rank, world, init_file, out):
    torch.set_num_threads(1)
    # A file rendezvous (no port to race for) and a timeout: a lost peer fails the test
    # instead of hanging it.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        maml = MAML(_model(), F.mse_loss, inner_steps=2, inner_lr=0.05, learn_inner_lr=True)
        ddp = nn.parallel.DistributedDataParallel(maml)
        ddp(shard_meta_batch(_batch(), rank, world)).backward()
        torch.save([p.grad for p in maml.parameters()], f"{out}.{rank}")
        dist.barrier()  # no rank tears gloo down while the other still uses it
    finally:
        dist.destroy_process_group()


def test_ddp_two_gloo_ranks_match_single_process(tmp_path):
    out = str(tmp_path / "grads")
    mp.spawn(_worker, args=(2, str(tmp_path / "pg"), out), nprocs=2, join=True)
    maml = MAML(_model(), F.mse_loss, inner_steps=2, inner_lr=0.05, learn_inner_lr=True)
    maml.meta_loss(_batch()).backward()
    want = [p.grad for p in maml.parameters()]
    for rank in range(2):
        got = torch.load(f"{out}.{rank}")
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


def test_shard_meta_batch_errors():
    b = _batch()
    assert shard_meta_batch(b, 1, 2).support_x.shape[0] == 2
    with pytest.raises(ValueError, match="4 tasks do not split evenly over 3 ranks"):
        shard_meta_batch(b, 0, 3)
