"""fit_episodic's checkpoints: bit-exact resume when train_step draws from the global RNG
(dropout), atomic writes (a failure while saving keeps the previous checkpoint), and
clear errors for unreadable / foreign / incomplete files that leave them untouched;
the same for meta-initialization files."""

import pytest
import torch

from pyoptk.meta import checkpoint as ckpt
from pyoptk.meta.checkpoint import CheckpointError
from pyoptk.meta.episodic import fit_episodic

pytestmark = pytest.mark.usefixtures("one_thread")


def _dropout_run(seed=0):
    """A toy whose every step draws dropout masks from the global torch RNG."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.5),
                              torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)

    def step(i):
        x = torch.randn(8, 4)               # global RNG too
        loss = (net(x) - x.sum(1, keepdim=True)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    def validate():
        net.eval()
        with torch.no_grad():
            loss = (net(torch.ones(2, 4)) - 4).square().mean().item()
        net.train()
        return loss

    return net, opt, step, validate


def test_resume_is_bit_exact_with_global_rng(tmp_path):
    net, opt, step, val = _dropout_run()
    full = fit_episodic(step, val, {"m": net, "o": opt}, iterations=12, valid_every=4,
                        patience=0, progress=False)
    ck = str(tmp_path / "ck.pt")
    net2, opt2, step2, val2 = _dropout_run()
    fit_episodic(step2, val2, {"m": net2, "o": opt2}, iterations=8, valid_every=4, patience=0,
                 checkpoint=ck, progress=False)
    torch.manual_seed(12345)                 # the resumed process's RNG starts elsewhere
    net3, opt3, step3, val3 = _dropout_run(seed=7)
    resumed = fit_episodic(step3, val3, {"m": net3, "o": opt3}, iterations=12, valid_every=4,
                           patience=0, checkpoint=ck, progress=False)
    assert [h["valid_loss"] for h in resumed.history] == [h["valid_loss"] for h in full.history]
    for a, b in zip(net.parameters(), net3.parameters()):
        assert torch.equal(a, b)


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    net, opt, step, val = _dropout_run()
    ck = tmp_path / "ck.pt"
    fit_episodic(step, val, {"m": net}, iterations=4, valid_every=4, patience=0,
                 checkpoint=str(ck), progress=False)
    before = ck.read_bytes()

    def broken_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        fit_episodic(step, val, {"m": net}, iterations=8, valid_every=4, patience=0,
                     checkpoint=str(ck), progress=False)
    assert ck.read_bytes() == before


@pytest.mark.parametrize("content, match", [
    (b"\x00garbage", "unreadable or corrupted"),
    ({"format": "something-else"}, "not an episodic checkpoint"),
    ("lacks", r"lacks \[.*state\['o'\]"),
])
def test_bad_checkpoint_is_refused_untouched(tmp_path, content, match):
    net, opt, step, val = _dropout_run()
    ck = tmp_path / "ck.pt"
    if content == "lacks":   # a real checkpoint of a run without the optimizer
        fit_episodic(step, val, {"m": net}, iterations=4, valid_every=4, patience=0,
                     checkpoint=str(ck), progress=False)
    elif isinstance(content, bytes):
        ck.write_bytes(content)
    else:
        torch.save(content, ck)
    before = ck.read_bytes()
    with pytest.raises(CheckpointError, match=match) as err:
        fit_episodic(step, val, {"m": net, "o": opt}, iterations=8, valid_every=4,
                     checkpoint=str(ck), progress=False)
    assert str(ck) in str(err.value) and isinstance(err.value, ValueError)
    assert ck.read_bytes() == before


def test_load_init_refuses_unreadable_and_foreign_files(tmp_path):
    from pyoptk.meta.universal_init import load_init
    bad = tmp_path / "init.pt"
    bad.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(CheckpointError, match="init.pt: unreadable or corrupted"):
        load_init(str(bad))
    torch.save({"format": "other"}, bad)
    with pytest.raises(CheckpointError, match="not a pyoptk meta-initialization file"):
        load_init(str(bad))
    with pytest.raises(FileNotFoundError):
        load_init(str(tmp_path / "missing.pt"))
