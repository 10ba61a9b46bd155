"""Base class of learned optimizers: a ``torch.optim.Optimizer`` whose update rule is a
network with its own parameters (meta-parameters), held apart from the model's.

* The meta-parameters are an ordered dict of tensors (:attr:`meta_params`), copied
  (detached) at construction; the model's parameters are the param groups, as in any
  torch optimizer. Per-parameter state is float32 whatever the parameter dtype.
* :meth:`state_dict` records the rule's identity — ``{"name", "version", "hash"}``, the
  hash a sha256 over the meta-parameters and the rule config — and
  :meth:`load_state_dict` refuses a checkpoint written with another rule, another
  version of its math, or other meta-parameters.
* :meth:`from_pretrained` / :meth:`save_pretrained` read and write the meta-parameters
  with their config (``.safetensors`` when the package is importable, else ``.pt``);
  :mod:`pyoptk.learned.pretrained` holds shipped ones, loaded by name.

Subclasses set ``rule_name``, ``rule_version`` and ``config_class`` and implement
:meth:`_check_meta_params` and :meth:`default_meta_params`.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from itertools import chain
from typing import Any, ClassVar, Dict, Mapping, Optional

import torch
from torch import Tensor, nn

from pyoptk.learned import files as rule_io

__all__ = ["LearnedOptimizer", "RuleMismatchError"]


class RuleMismatchError(ValueError):
    """A checkpoint or file was written with a different learned rule."""


class LearnedOptimizer(torch.optim.Optimizer):
    """Base of learned optimizers (see the module docstring).

    Args:
        params: iterable of parameters or param-group dicts, as ``torch.optim``.
        defaults (dict): per-group defaults.
        meta_params (mapping name → tensor, or nn.Module): the rule's meta-parameters.
        config: the rule's frozen config (an instance of ``config_class``).
    """

    rule_name: ClassVar[str] = ""
    rule_version: ClassVar[str] = ""
    config_class: ClassVar[type] = object

    def __init__(self, params, defaults: Dict[str, Any], meta_params, config) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__}: config must be a "
                            f"{self.config_class.__name__}, got {type(config).__name__}")
        if isinstance(meta_params, nn.Module):
            meta_params = OrderedDict(meta_params.named_parameters())
        self._check_meta_params(meta_params, config)
        self.config = config
        self._meta_params: "OrderedDict[str, Tensor]" = OrderedDict(
            (k, v.detach().clone()) for k, v in meta_params.items())
        self._identity: Optional[Dict[str, str]] = None
        self._device_cache: Dict[torch.device, Any] = {}
        super().__init__(params, defaults)

    # ---- to implement -------------------------------------------------------------
    @classmethod
    def _check_meta_params(cls, meta_params: Mapping[str, Tensor], config) -> None:
        raise NotImplementedError

    @classmethod
    def default_meta_params(cls, config, seed: int = 0) -> "OrderedDict[str, Tensor]":
        raise NotImplementedError

    # ---- meta-parameters and identity ---------------------------------------------
    @property
    def meta_params(self) -> "OrderedDict[str, Tensor]":
        """A copy of the meta-parameters (name → tensor, in order)."""
        return OrderedDict((k, v.clone()) for k, v in self._meta_params.items())

    def set_meta_params(self, meta_params: Mapping[str, Tensor]) -> None:
        """Replace the meta-parameters (same names and shapes). The optimizer state is
        kept; its checkpoints will carry the new identity."""
        if isinstance(meta_params, nn.Module):
            meta_params = OrderedDict(meta_params.named_parameters())
        self._check_meta_params(meta_params, self.config)
        self._meta_params = OrderedDict((k, v.detach().clone()) for k, v in meta_params.items())
        self._identity = None
        self._device_cache.clear()

    def rule_identity(self) -> Dict[str, str]:
        """``{"name", "version", "hash"}`` of the rule this optimizer runs."""
        if self._identity is None:
            self._identity = {"name": self.rule_name, "version": self.rule_version,
                              "hash": rule_io.rule_hash(self._meta_params, self.config)}
        return dict(self._identity)

    # ---- checkpoints --------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """``torch.optim`` state dict plus ``"rule"``: the rule's identity."""
        sd = super().state_dict()
        sd["rule"] = self.rule_identity()
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a checkpoint of this optimizer. Raises :class:`RuleMismatchError` when
        it was written with a different rule, rule version or meta-parameters.
        State tensors keep their saved dtype (float32) and are copied, so a resumed
        run continues bit for bit."""
        state_dict = dict(state_dict)
        saved = state_dict.pop("rule", None)
        mine = self.rule_identity()
        if saved is None:
            raise RuleMismatchError(
                "checkpoint has no learned-rule identity (no 'rule' entry): it was not "
                f"written by a pyoptk learned optimizer; this one runs rule "
                f"{mine['name']!r} v{mine['version']}")
        if saved.get("name") != mine["name"]:
            raise RuleMismatchError(
                f"checkpoint was written by learned rule {saved.get('name')!r} but this "
                f"optimizer runs {mine['name']!r}")
        if saved.get("version") != mine["version"]:
            raise RuleMismatchError(
                f"checkpoint was written by rule {mine['name']!r} version "
                f"{saved.get('version')!r}, but this pyoptk implements version "
                f"{mine['version']!r}; its state cannot be resumed with different math")
        if saved.get("hash") != mine["hash"]:
            raise RuleMismatchError(
                f"checkpoint was written with different meta-parameters or config of rule "
                f"{mine['name']!r} (hash {str(saved.get('hash'))[:12]}…, this optimizer "
                f"{mine['hash'][:12]}…); construct the optimizer with the meta-parameters "
                "it was trained with (e.g. from_pretrained) before resuming")
        super().load_state_dict(state_dict)
        # torch casts floating state to the param's dtype (bf16 state for bf16 params)
        # and may alias the loaded tensors: restore fp32 copies of what was saved.
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        mine_params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(saved_ids, mine_params):
            values = state_dict["state"].get(pid)
            if values is None:
                continue
            self.state[p] = {
                k: (v.detach().to(device=p.device).clone() if isinstance(v, Tensor) else v)
                for k, v in values.items()}

    # ---- files ----------------------------------------------------------------------
    def save_pretrained(self, path) -> str:
        """Write the meta-parameters and config to ``path`` (``.safetensors`` or ``.pt``;
        no suffix: ``.safetensors`` if the package is importable, else ``.pt``).
        Returns the path written."""
        ident = self.rule_identity()
        return rule_io.save_rule(path, self._meta_params, {
            "rule": ident["name"], "version": ident["version"], "hash": ident["hash"],
            "config": json.dumps(self.config.to_dict(), sort_keys=True)})

    @classmethod
    def load_pretrained(cls, name_or_path):
        """``(meta_params, config)`` from a rule file or a shipped name, checked: the
        file's rule and version must be this class's, and its contents must match the
        hash recorded in it."""
        path = rule_io.resolve(name_or_path)
        meta, info = rule_io.load_rule(path)
        if info.get("rule") != cls.rule_name:
            raise RuleMismatchError(f"{path}: holds learned rule {info.get('rule')!r}, "
                                    f"not {cls.rule_name!r} ({cls.__name__})")
        if info.get("version") != cls.rule_version:
            raise RuleMismatchError(
                f"{path}: written for rule {cls.rule_name!r} version {info.get('version')!r}, "
                f"this pyoptk implements version {cls.rule_version!r}")
        config = cls.config_class.from_dict(json.loads(info["config"]))
        cls._check_meta_params(meta, config)
        h = rule_io.rule_hash(meta, config)
        if h != info.get("hash"):
            raise RuleMismatchError(f"{path}: contents do not match the hash recorded in the "
                                    "file (corrupted or edited)")
        return meta, config

    @classmethod
    def from_pretrained(cls, name_or_path, params, **kwargs) -> "LearnedOptimizer":
        """An optimizer over ``params`` running the rule stored in ``name_or_path``: a
        ``.safetensors``/``.pt`` file written by :meth:`save_pretrained`, or the name of
        a shipped rule (:func:`pyoptk.learned.pretrained.available`). ``kwargs`` go to
        the constructor (e.g. ``lr_mult``, ``weight_decay``); the config comes from the
        file."""
        if "config" in kwargs or "meta_params" in kwargs:
            raise TypeError("from_pretrained: config and meta_params come from the file")
        meta, config = cls.load_pretrained(name_or_path)
        return cls(params, meta_params=meta, config=config, **kwargs)

    # ---- helpers for subclasses -----------------------------------------------------
    def _meta_on(self, device: torch.device, build) -> Any:
        """``build(device)`` once per device (meta-parameters moved there), cached until
        the meta-parameters change."""
        if device not in self._device_cache:
            self._device_cache[device] = build(device)
        return self._device_cache[device]
