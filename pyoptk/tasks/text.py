"""The character corpus shipped inside the package, as token tensors with fixed splits.

``pyoptk/tasks/data/public_domain.txt`` (~43 KB of ASCII English: founding documents of
the United States and poems from before 1900; provenance in ``data/README.md``) is read
through :mod:`importlib.resources`, so it is found in an installed wheel as well as in a
source checkout. The vocabulary is the sorted set of its characters. The text is cut
into 512-character chunks; chunk ``i`` goes to train when ``i mod 10 < 8``, valid when
it is 8 and test when 9, and each split is its chunks concatenated. Interleaving keeps
prose and verse in every split (a contiguous 80/10/10 cut would put only poems in
test), and no window of one split overlaps another split's text.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from typing import Dict

import torch
from torch import Tensor

from pyoptk.tasks.base import check_split

__all__ = ["TEXT_RESOURCE", "CharCorpus", "load_corpus", "read_text"]

#: Package-relative path of the corpus (``importlib.resources`` of ``pyoptk.tasks``).
TEXT_RESOURCE = "data/public_domain.txt"

_CHUNK = 512
_PERIOD = 10                       # chunk i mod 10: 0..7 train, 8 valid, 9 test
_SPLIT_OF_PHASE = {8: "valid", 9: "test"}


@dataclass(frozen=True)
class CharCorpus:
    """The corpus (shared, read-only).

    Attributes:
        vocab (str): the characters, sorted; token ``i`` is ``vocab[i]``.
        tokens (dict[str, Tensor]): split -> int64 token ids ``(n_split,)``.
    """

    vocab: str
    tokens: Dict[str, Tensor]

    def split(self, split: str) -> Tensor:
        check_split(split)
        return self.tokens[split]

    def decode(self, ids: Tensor) -> str:
        return "".join(self.vocab[i] for i in ids.tolist())


def read_text() -> str:
    """The raw corpus text."""
    return resources.files("pyoptk.tasks").joinpath(TEXT_RESOURCE).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=None)
def load_corpus() -> CharCorpus:
    """The tokenized, split corpus (module docstring); cached per process."""
    text = read_text()
    vocab = "".join(sorted(set(text)))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.int64)
    parts: Dict[str, list] = {"train": [], "valid": [], "test": []}
    for i, start in enumerate(range(0, len(text), _CHUNK)):
        parts[_SPLIT_OF_PHASE.get(i % _PERIOD, "train")].append(ids[start:start + _CHUNK])
    return CharCorpus(vocab=vocab, tokens={s: torch.cat(p) for s, p in parts.items()})
