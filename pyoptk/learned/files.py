"""Files and identity of learned rules: the identity hash, save/load in safetensors or
torch format, and shipped-name lookup (:mod:`pyoptk.learned.pretrained`).

A rule file holds the meta-parameters and string metadata::

    format   "pyoptk-learned-rule"
    rule     rule family, e.g. "mlp"
    version  the rule's math version (pyoptk.learned.mlp.RULE_VERSION)
    config   the rule config as JSON
    hash     sha256 identity (see :func:`rule_hash`)
    order    JSON list of meta-parameter names, in order

``.safetensors`` files need the ``safetensors`` package; ``.pt`` files are written with
``torch.save`` and read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections import OrderedDict
from typing import Any, Dict, Mapping, Tuple, Union

import torch
from torch import Tensor

from pyoptk.learned import pretrained

__all__ = ["FORMAT", "rule_hash", "have_safetensors", "save_rule", "load_rule", "resolve"]

FORMAT = "pyoptk-learned-rule"
PathLike = Union[str, "os.PathLike[str]"]


def rule_hash(meta_params: Mapping[str, Tensor], config: Any) -> str:
    """sha256 over each meta-parameter's name, shape, dtype and raw bytes (in order),
    then ``repr(config)``. Any change of a weight, of their order or of the config
    changes it."""
    h = hashlib.sha256()
    for name, t in meta_params.items():
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(name.encode())
        h.update(b"\0" + repr(tuple(meta_params[name].shape)).encode())
        h.update(b"\0" + str(t.dtype).encode() + b"\0")
        # bytes without numpy (an optional dependency); meta-parameters are small
        h.update(bytes(t.view(torch.uint8).tolist()))
    h.update(repr(config).encode())
    return h.hexdigest()


def have_safetensors() -> bool:
    return importlib.util.find_spec("safetensors") is not None


def _need_safetensors(path: str) -> None:
    if not have_safetensors():
        raise ImportError(f"{path}: .safetensors files need the safetensors package "
                          "(pip install safetensors), or use a .pt path")


def save_rule(path: PathLike, meta_params: Mapping[str, Tensor], metadata: Mapping[str, str]
              ) -> str:
    """Write meta-parameters and metadata; returns the path written. A path without a
    ``.safetensors``/``.pt`` suffix gets ``.safetensors`` when the package is
    importable, else ``.pt``."""
    path = os.fspath(path)
    if not path.endswith((".safetensors", ".pt", ".pth")):
        path += ".safetensors" if have_safetensors() else ".pt"
    meta = {k: str(v) for k, v in metadata.items()}
    meta["format"] = FORMAT
    meta["order"] = json.dumps(list(meta_params.keys()))
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in meta_params.items()}
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    if path.endswith(".safetensors"):
        _need_safetensors(path)
        from safetensors.torch import save_file

        save_file(tensors, path, metadata=meta)
    else:
        torch.save({"metadata": meta, "tensors": tensors}, path)
    return path


def load_rule(path: PathLike) -> Tuple["OrderedDict[str, Tensor]", Dict[str, str]]:
    """Read a rule file: ``(meta_params in saved order, metadata)``."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        _need_safetensors(path)
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    else:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{path}: not a pyoptk learned-rule file ({exc})") from None
        if not isinstance(blob, dict) or "metadata" not in blob or "tensors" not in blob:
            raise ValueError(f"{path}: not a pyoptk learned-rule file (no metadata/tensors)")
        meta, tensors = dict(blob["metadata"]), dict(blob["tensors"])
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a pyoptk learned-rule file (format "
                         f"{meta.get('format')!r}, expected {FORMAT!r})")
    order = json.loads(meta.get("order", "[]"))
    if sorted(order) != sorted(tensors):
        raise ValueError(f"{path}: tensors {sorted(tensors)} do not match the recorded "
                         f"order {order}")
    return OrderedDict((k, tensors[k]) for k in order), meta


def resolve(name_or_path: PathLike) -> str:
    """A file path as is (it must exist), else a shipped rule's name."""
    s = os.fspath(name_or_path)
    looks_like_path = (isinstance(name_or_path, os.PathLike) or os.sep in s
                       or (os.altsep and os.altsep in s)
                       or s.endswith((".safetensors", ".pt", ".pth")) or os.path.exists(s))
    if looks_like_path:
        if not os.path.isfile(s):
            raise FileNotFoundError(f"no learned-rule file at {s!r}")
        return s
    path = pretrained.path_for(s)
    if path is None:
        names = pretrained.available()
        raise ValueError(
            f"no shipped pretrained learned optimizer named {s!r}; available: "
            f"{', '.join(names) if names else 'none (no weights are shipped yet)'}. "
            "Pass a path to a .safetensors or .pt file written by save_pretrained() instead.")
    return path
