"""Shipped pretrained learned optimizers.

Each file ``<name>.safetensors`` (or ``<name>.pt``) in this folder holds one rule's
meta-parameters with its metadata (rule name, version, config, identity hash), as
written by :meth:`pyoptk.optim.LearnedOptimizer.save_pretrained`, and is loaded by
name with ``MLPOptimizer.from_pretrained("<name>", model.parameters())``.

Shipped: ``mlp-small`` — the default MLP rule meta-trained on the ``train`` task
families; its model card ``mlp-small.md`` (next to the file) says how it was trained,
how it compares with AdamW on held-out families, and where it fails.
:func:`available` lists what this installation has.
"""

from __future__ import annotations

import os
from typing import List, Optional

__all__ = ["available", "path_for", "PRETRAINED_DIR", "SUFFIXES"]

PRETRAINED_DIR = os.path.dirname(os.path.abspath(__file__))
SUFFIXES = (".safetensors", ".pt")


def available() -> List[str]:
    """Names of the shipped pretrained rules (sorted)."""
    names = set()
    for fname in os.listdir(PRETRAINED_DIR):
        stem, ext = os.path.splitext(fname)
        if ext in SUFFIXES and not stem.startswith(("_", ".")):
            names.add(stem)
    return sorted(names)


def path_for(name: str) -> Optional[str]:
    """The file of shipped rule ``name`` (safetensors preferred), or None."""
    for ext in SUFFIXES:
        path = os.path.join(PRETRAINED_DIR, name + ext)
        if os.path.isfile(path):
            return path
    return None
