"""Tiny character-level language models on the shipped corpus (:mod:`pyoptk.tasks.text`):
embedding tables (sparse, row-wise gradients), recurrent weights and a wide softmax —
a gradient structure none of the classifier families has.

Two architectures, both predicting every next character of a window with mean
cross-entropy (nats per character):

* ``"mlp"``: each character is predicted from the ``context`` characters before it,
  ``logits = W_o σ(W_h [e(c_{t−k}); …; e(c_{t−1})] + b_h) + b_o`` (Bengio et al., 2003).
* ``"gru"``: a one-layer GRU over the window, ``logits_t = W_o h_t + b_o`` (the GRU
  cell written out, so it vmaps and differentiates like the rest).

:class:`CharLMFamily` (``char_lm``) draws the architecture (½ each), embedding size ∈
{8, 16, 32}, hidden width log-uniform in [32, 128] (mlp) or [16, 64] (gru), context ∈
{2 … 8} (mlp), activation ∈ {relu, tanh, gelu} (mlp), sequence length ∈ {16, 32},
batch size ∈ {8, 16, 32} and init scale log-uniform in [0.5, 2].
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from pyoptk.tasks.base import Task, TaskFamily, generator
from pyoptk.tasks.sampling import Draws
from pyoptk.tasks.supervised import ACTIVATIONS, fan_in_normal
from pyoptk.tasks.text import CharCorpus, load_corpus

__all__ = ["ARCHS", "CharLMTask", "CharLMFamily"]

ARCHS = ("mlp", "gru")


class CharLMTask(Task):
    """A next-character model (module docstring).

    Batches are int64 token windows ``(batch_size, context + seq_len)`` (``context`` is
    1 for the GRU: its first input character), each starting at an offset drawn from
    ``(family, seed, split, step)``; the last ``seq_len`` tokens are the targets.

    Parameters: ``embed`` ``(vocab, embed)``; mlp: ``hidden.weight``
    ``(hidden, context · embed)``, ``hidden.bias``; gru: ``gru.weight_ih``
    ``(3·hidden, embed)``, ``gru.weight_hh`` ``(3·hidden, hidden)``, ``gru.bias_ih``,
    ``gru.bias_hh`` (gate order r, z, n as in ``nn.GRU``); both: ``out.weight``
    ``(vocab, hidden)``, ``out.bias``.

    Args:
        seed (int): task seed.
        arch (str): ``"mlp"`` or ``"gru"``.
        embed (int), hidden (int): sizes, >= 1.
        context (int): characters seen by the mlp, >= 1 (must be 1 for the gru).
        activation (str): mlp hidden activation, a key of
            :data:`~pyoptk.tasks.supervised.ACTIVATIONS` (the GRU uses its gates).
        seq_len (int): predicted characters per window, >= 1.
        batch_size (int): windows per batch, >= 1.
        init_scale (float): multiplier of the N(0, 1) embedding init and of the fan-in
            scaled normal init of every matrix, >= 0.
    """

    family = "char_lm"

    def __init__(self, seed: int, arch: str = "mlp", embed: int = 16, hidden: int = 64,
                 context: int = 4, activation: str = "tanh", seq_len: int = 32,
                 batch_size: int = 16, init_scale: float = 1.0):
        if arch not in ARCHS:
            raise ValueError(f"CharLMTask: arch must be one of {list(ARCHS)}, got {arch!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"CharLMTask: activation must be one of {sorted(ACTIVATIONS)}, "
                             f"got {activation!r}")
        for name, value in (("embed", embed), ("hidden", hidden), ("context", context),
                            ("seq_len", seq_len), ("batch_size", batch_size)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"CharLMTask: {name} must be an int >= 1, got {value!r}")
        if arch == "gru" and context != 1:
            raise ValueError(f"CharLMTask: context must be 1 for arch 'gru', got {context}")
        if not init_scale >= 0.0:
            raise ValueError(f"CharLMTask: init_scale must be >= 0, got {init_scale}")
        self.seed = int(seed)
        self.hparams = {"arch": arch, "embed": embed, "hidden": hidden, "context": context,
                        "activation": activation, "seq_len": seq_len,
                        "batch_size": batch_size, "init_scale": float(init_scale)}
        self.corpus: CharCorpus = load_corpus()
        self.act = ACTIVATIONS[activation]

    def init_params(self, seed: Optional[int] = None, *, dtype: torch.dtype = torch.float32,
                    device: Optional[torch.device] = None) -> "OrderedDict[str, Tensor]":
        g = generator(self.family, self.seed, "init", seed)
        hp = self.hparams
        s, e, h, v = hp["init_scale"], hp["embed"], hp["hidden"], len(self.corpus.vocab)
        shapes = OrderedDict(embed=((v, e), 1))      # name -> (shape, fan-in; 0: zeros)
        if hp["arch"] == "mlp":
            shapes["hidden.weight"] = ((h, hp["context"] * e), hp["context"] * e)
            shapes["hidden.bias"] = ((h,), 0)
        else:
            shapes["gru.weight_ih"] = ((3 * h, e), e)
            shapes["gru.weight_hh"] = ((3 * h, h), h)
            shapes["gru.bias_ih"] = ((3 * h,), 0)
            shapes["gru.bias_hh"] = ((3 * h,), 0)
        shapes["out.weight"] = ((v, h), h)
        shapes["out.bias"] = ((v,), 0)
        params: "OrderedDict[str, Tensor]" = OrderedDict()
        for name, (shape, fan_in) in shapes.items():
            t = fan_in_normal(g, shape, fan_in, s) if fan_in else torch.zeros(shape)
            params[name] = t.to(dtype=dtype, device=device)
        return params

    def batch(self, step: int, split: str = "train", *,
              device: Optional[torch.device] = None) -> Tensor:
        tokens = self.corpus.split(split)
        width = self.hparams["context"] + self.hparams["seq_len"]
        g = generator(self.family, self.seed, split, int(step))
        starts = torch.randint(tokens.shape[0] - width + 1, (self.hparams["batch_size"], 1),
                               generator=g)
        return tokens[starts + torch.arange(width)].to(device=device)

    def logits(self, params: Mapping[str, Tensor], tokens: Tensor) -> Tensor:
        """``(batch, seq_len, vocab)`` logits of the targets ``tokens[:, context:]``."""
        k, n = self.hparams["context"], self.hparams["seq_len"]
        if self.hparams["arch"] == "mlp":
            windows = tokens.unfold(1, k, 1)[:, :n]              # (batch, seq_len, k)
            x = params["embed"][windows].flatten(-2)             # (batch, seq_len, k·embed)
            h = self.act(F.linear(x, params["hidden.weight"], params["hidden.bias"]))
        else:
            h = self._gru(params, params["embed"][tokens[:, :n]])
        return F.linear(h, params["out.weight"], params["out.bias"])

    def _gru(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """Hidden states ``(batch, seq_len, hidden)`` of the GRU over inputs ``x``
        ``(batch, seq_len, embed)`` from ``h₀ = 0``; ``nn.GRU``'s equations."""
        sizes = [2 * self.hparams["hidden"], self.hparams["hidden"]]   # (r, z) and n
        gi = F.linear(x, params["gru.weight_ih"], params["gru.bias_ih"])  # all steps at once
        w_hh, b_hh = params["gru.weight_hh"], params["gru.bias_hh"]
        h = x.new_zeros(x.shape[0], sizes[1])
        hs = []
        # unbind/split (backward: one stack/cat) rather than slicing, whose backward
        # writes a zero tensor of the full input per step.
        for gi_t in gi.unbind(1):
            gi_rz, gi_n = gi_t.split(sizes, dim=-1)
            gh_rz, gh_n = F.linear(h, w_hh, b_hh).split(sizes, dim=-1)
            r, z = torch.sigmoid(gi_rz + gh_rz).chunk(2, dim=-1)
            h = torch.lerp(torch.tanh(gi_n + r * gh_n), h, z)          # (1 − z)·n + z·h
            hs.append(h)
        return torch.stack(hs, dim=1)

    def loss(self, params: Mapping[str, Tensor], batch: Tensor) -> Tensor:
        ref = params["embed"]
        tokens = batch.to(device=ref.device)
        logits = self.logits(params, tokens)
        targets = tokens[:, self.hparams["context"]:]
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class CharLMFamily(TaskFamily):
    """``char_lm``: the ranges of the module docstring."""

    name = "char_lm"

    def sample(self, seed: int) -> CharLMTask:
        d = Draws(self.name, "hparams", seed)
        arch = d.choice(ARCHS)
        embed = d.choice((8, 16, 32))
        hidden = d.int_log_uniform(32, 128) if arch == "mlp" else d.int_log_uniform(16, 64)
        context = d.integer(2, 8) if arch == "mlp" else 1
        activation = d.choice(sorted(ACTIVATIONS)) if arch == "mlp" else "tanh"
        seq_len = d.choice((16, 32))
        batch_size = d.choice((8, 16, 32))
        init_scale = d.log_uniform(0.5, 2.0)
        return CharLMTask(seed, arch=arch, embed=embed, hidden=hidden, context=context,
                          activation=activation, seq_len=seq_len, batch_size=batch_size,
                          init_scale=init_scale)
