"""The per-parameter MLP update rule, as data plus pure functions.

In the spirit of learned_optimization's ``small_fc_lopt`` and ``AdafacMLPLOpt``
(Metz et al., https://arxiv.org/abs/2009.11243): every element of every parameter
tensor feeds the same small MLP with its features (:class:`FeatureConfig`, 39 by
default) and gets two outputs, a direction ``d`` and a magnitude ``a``; the step is

.. math::
    p \\leftarrow p - \\mathrm{lr}\\cdot\\beta\\,\\big(d\\,e^{\\alpha a} + \\lambda p\\big),
    \\qquad \\alpha = \\texttt{exp\\_mult} = 10^{-3},\\ \\beta = \\texttt{step\\_mult} = 10^{-3}

The small multipliers keep the first steps tiny whatever the initial MLP.

* **Meta-parameters** are an ordered dict of explicit tensors ``w0, b0, w1, b1, …``
  (``w_i``: (in, out)), plus ``log1m_decays`` (K+R+F,) when ``learn_decays`` — decays
  learned as ``log(1 - β)``. Never hidden module state: :func:`update` takes them as an
  argument, so meta-training can differentiate or perturb them.
* **State** per parameter tensor (:class:`MLPState` holds one list per field):
  ``step`` (0-dim), ``mom`` (K, *shape), ``rms`` (R, *shape), ``fac_row``/``fac_col``
  (see :func:`pyoptk.learned.features.factored_state_shapes`).
* :func:`update` is pure and differentiable; :class:`pyoptk.optim.MLPOptimizer` is a
  thin stateful wrapper calling the fused in-place op on the same math.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from pyoptk.learned.features import FeatureConfig, factored_init, momentum_init
from pyoptk.learned.files import rule_hash
from pyoptk.ops.mlp_update import MLPUpdateHyper, check_weights, mlp_update_functional

__all__ = [
    "RULE_NAME", "RULE_VERSION", "MLPConfig", "MLPState", "MLPRule", "init_meta_params",
    "check_meta_params", "init_state", "init_tensor_state", "update", "decays_tensor",
    "meta_weights", "rule_identity",
]

RULE_NAME = "mlp"
# Bump when the update math changes: checkpoints and pretrained files record it.
RULE_VERSION = "2"  # 2: floored row/column factor features


@dataclass(frozen=True)
class MLPConfig:
    """The MLP rule: its features, its shape and its output constants.

    Args:
        features (FeatureConfig, default FeatureConfig()): the inputs (39 by default).
        hidden_sizes (tuple of int, default (32, 32)): hidden widths (ReLU after each).
        exp_mult (float, default 1e-3): α in ``d·exp(α·a)``.
        step_mult (float, default 1e-3): β, the base step size.
        learn_decays (bool, default False): make the K+R+F decays a meta-parameter
            ``log1m_decays = log(1 - decay)``, initialized from ``features``.
    """

    features: FeatureConfig = field(default_factory=FeatureConfig)
    hidden_sizes: Tuple[int, ...] = (32, 32)
    exp_mult: float = 1e-3
    step_mult: float = 1e-3
    learn_decays: bool = False

    def __post_init__(self):
        if not isinstance(self.features, FeatureConfig):
            raise ValueError(f"MLPConfig.features: expected a FeatureConfig, got "
                             f"{type(self.features).__name__}")
        hs = self.hidden_sizes
        if isinstance(hs, (str, bytes)) or not isinstance(hs, (tuple, list)) or any(
                isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hs):
            raise ValueError(f"MLPConfig.hidden_sizes: expected a tuple of ints >= 1, got {hs!r}")
        object.__setattr__(self, "hidden_sizes", tuple(hs))
        for name in ("exp_mult", "step_mult"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
                    v > 0 and math.isfinite(v)):
                raise ValueError(f"MLPConfig.{name}: must be a finite float > 0, got {v!r}")
            object.__setattr__(self, name, float(v))
        if not isinstance(self.learn_decays, bool):
            raise ValueError(f"MLPConfig.learn_decays: expected a bool, got {self.learn_decays!r}")

    @property
    def n_features(self) -> int:
        return self.features.n_features

    def meta_param_shapes(self) -> "OrderedDict[str, tuple]":
        """Names and shapes of the meta-parameters, in order."""
        shapes: "OrderedDict[str, tuple]" = OrderedDict()
        widths = (self.n_features,) + self.hidden_sizes + (2,)
        for i in range(len(widths) - 1):
            shapes[f"w{i}"] = (widths[i], widths[i + 1])
            shapes[f"b{i}"] = (widths[i + 1],)
        if self.learn_decays:
            shapes["log1m_decays"] = (len(self.features.decays()),)
        return shapes

    def op_hyper(self, lr: Union[float, Tensor] = 1.0, weight_decay: float = 0.0) -> MLPUpdateHyper:
        """The op's hyperparameters for this config (``lr`` a float or a tensor)."""
        f = self.features
        lr_t = lr if isinstance(lr, Tensor) else None
        return MLPUpdateHyper(
            n_mom=f.n_mom, n_rms=f.n_rms, n_fac=f.n_fac, fac_mom_index=f.fac_mom_index,
            log_sign_k=f.log_sign_k, timescales=f.time_timescales, eps=f.eps,
            norm_eps=f.norm_eps, fac_eps=f.fac_eps, exp_mult=self.exp_mult,
            step_mult=self.step_mult, lr=0.0 if lr_t is not None else float(lr), lr_t=lr_t,
            weight_decay=float(weight_decay))

    def to_dict(self) -> Dict[str, Any]:
        return {"features": self.features.to_dict(), "hidden_sizes": list(self.hidden_sizes),
                "exp_mult": self.exp_mult, "step_mult": self.step_mult,
                "learn_decays": self.learn_decays}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MLPConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"MLPConfig: unknown fields {sorted(unknown)}")
        d = dict(d)
        if "features" in d:
            d["features"] = FeatureConfig.from_dict(d["features"])
        if "hidden_sizes" in d:
            d["hidden_sizes"] = tuple(d["hidden_sizes"])
        return cls(**d)


# ----------------------------------------------------------------------------------
# Meta-parameters.
# ----------------------------------------------------------------------------------
def init_meta_params(config: Optional[MLPConfig] = None, seed: int = 0, *,
                     output_scale: float = 0.1, dtype: torch.dtype = torch.float32,
                     device: Optional[torch.device] = None) -> "OrderedDict[str, Tensor]":
    """Fresh meta-parameters, deterministic from ``seed`` (on any device).

    Weights ``w_i ~ N(0, 1/fan_in)`` clamped at ±2σ, biases zero, the output layer
    scaled by ``output_scale`` so the initial direction is small (and, with
    ``step_mult``, the initial step tiny). With ``learn_decays``, ``log1m_decays`` starts
    at ``log(1 - decay)`` of the config's decays.
    """
    config = config or MLPConfig()
    gen = torch.Generator().manual_seed(int(seed))
    out: "OrderedDict[str, Tensor]" = OrderedDict()
    shapes = config.meta_param_shapes()
    n_layers = len(config.hidden_sizes) + 1
    for i in range(n_layers):
        fan_in, fan_out = shapes[f"w{i}"]
        w = torch.randn((fan_in, fan_out), generator=gen, dtype=torch.float64).clamp_(-2, 2)
        w /= math.sqrt(fan_in)
        if i == n_layers - 1:
            w *= output_scale
        out[f"w{i}"] = w
        out[f"b{i}"] = torch.zeros(fan_out, dtype=torch.float64)
    if config.learn_decays:
        decays = torch.tensor(config.features.decays(), dtype=torch.float64)
        out["log1m_decays"] = torch.log1p(-decays)
    return OrderedDict((k, v.to(dtype=dtype, device=device)) for k, v in out.items())


def check_meta_params(meta_params: Mapping[str, Tensor], config: MLPConfig) -> None:
    """Raise ``ValueError`` unless ``meta_params`` has exactly the config's names and
    shapes, in order, as floating tensors."""
    if not isinstance(meta_params, Mapping):
        raise TypeError(f"meta_params must be a mapping name -> tensor, got "
                        f"{type(meta_params).__name__}")
    expected = config.meta_param_shapes()
    names = list(meta_params.keys())
    if names != list(expected):
        raise ValueError(f"meta-parameters {names} do not match the rule's {list(expected)} "
                         f"(config: {config.n_features} features, hidden {config.hidden_sizes}, "
                         f"learn_decays={config.learn_decays})")
    for name, shape in expected.items():
        t = meta_params[name]
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"meta-parameter {name} must be a floating-point tensor, got "
                            f"{type(t).__name__ if not isinstance(t, Tensor) else t.dtype}")
        if tuple(t.shape) != shape:
            extra = (f" — the feature config produces {config.n_features} features "
                     f"({config.features.n_element_features} per element + "
                     f"{config.features.n_time_features} time)" if name == "w0" else "")
            raise ValueError(f"meta-parameter {name} has shape {tuple(t.shape)}, expected "
                             f"{shape}{extra}")


def meta_weights(meta_params: Mapping[str, Tensor], config: MLPConfig) -> List[Tensor]:
    """The MLP's tensors in op order ``[w0, b0, w1, b1, …]``."""
    n_layers = len(config.hidden_sizes) + 1
    return [meta_params[f"{k}{i}"] for i in range(n_layers) for k in ("w", "b")]


def decays_tensor(config: MLPConfig, meta_params: Optional[Mapping[str, Tensor]] = None,
                  device: Optional[torch.device] = None,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """The (K+R+F,) decays the op takes: the config's constants, or
    ``1 - exp(min(log1m_decays, 0))`` when they are learned (differentiable)."""
    if config.learn_decays:
        if meta_params is None or "log1m_decays" not in meta_params:
            raise ValueError("MLPConfig(learn_decays=True) needs meta_params['log1m_decays']")
        x = meta_params["log1m_decays"]
        return (1 - torch.exp(torch.clamp(x, max=0.0))).to(dtype=dtype, device=device or x.device)
    decays = torch.tensor(config.features.decays(), dtype=torch.float64)
    return decays.to(dtype=dtype, device=device)


def rule_identity(meta_params: Mapping[str, Tensor], config: MLPConfig) -> Dict[str, str]:
    """``{"name", "version", "hash"}`` of this rule with these meta-parameters."""
    return {"name": RULE_NAME, "version": RULE_VERSION, "hash": rule_hash(meta_params, config)}


# ----------------------------------------------------------------------------------
# State.
# ----------------------------------------------------------------------------------
class MLPState(NamedTuple):
    """Per-tensor state, one list entry per parameter tensor (a pytree)."""

    step: List[Tensor]
    mom: List[Tensor]
    rms: List[Tensor]
    fac_row: List[Tensor]
    fac_col: List[Tensor]


def init_tensor_state(p: Tensor, config: Optional[MLPConfig] = None,
                      dtype: Optional[torch.dtype] = None) -> Dict[str, Tensor]:
    """Zero state of one parameter tensor: float32 (float64 for float64 params)."""
    f = (config or MLPConfig()).features
    dtype = dtype or torch.promote_types(p.dtype, torch.float32)
    fr, fc = factored_init(p, f.n_fac, dtype)
    return {"step": torch.zeros((), dtype=dtype, device=p.device),
            "mom": momentum_init(p, f.n_mom, dtype), "rms": momentum_init(p, f.n_rms, dtype),
            "fac_row": fr, "fac_col": fc}


def init_state(params: Sequence[Tensor], config: Optional[MLPConfig] = None,
               dtype: Optional[torch.dtype] = None) -> MLPState:
    """Zero :class:`MLPState` for a list of parameter tensors."""
    per = [init_tensor_state(p, config, dtype) for p in params]
    return MLPState(*[[s[k] for s in per] for k in MLPState._fields])


# ----------------------------------------------------------------------------------
# The functional step.
# ----------------------------------------------------------------------------------
def fused_unsupported(params: Sequence[Tensor], grads: Sequence[Optional[Tensor]],
                       state: MLPState) -> Optional[str]:
    """Why :func:`pyoptk.ops.mlp_step` cannot take these inputs (then :func:`update`
    runs the reference), or None."""
    dtype, device = params[0].dtype, params[0].device
    if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        return f"param dtype {dtype}"
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    for i, p in enumerate(params):
        if grads[i] is None:
            continue
        tensors = [p, grads[i]] + [getattr(state, f)[i] for f in MLPState._fields]
        for t in tensors:
            if not isinstance(t, Tensor) or t.layout != torch.strided or t.device != device \
                    or not t.is_contiguous():
                return f"tensor {i}: non-contiguous, sparse or on another device"
        if p.dtype != dtype or grads[i].dtype != dtype:
            return f"tensor {i}: mixed parameter/gradient dtypes"
        if any(getattr(state, f)[i].dtype != sdt for f in MLPState._fields):
            return f"tensor {i}: state dtype is not {sdt}"
    return None


def update(params: Sequence[Tensor], grads: Sequence[Optional[Tensor]], state: MLPState,
           meta_params: Mapping[str, Tensor], config: Optional[MLPConfig] = None, *,
           lr: Union[float, Tensor] = 1.0, weight_decay: float = 0.0,
           fused: Optional[bool] = None) -> Tuple[List[Tensor], MLPState]:
    """One step of the MLP rule: ``(new_params, new_state)``. Pure and differentiable
    with respect to params, grads, state, meta-parameters (and a tensor ``lr``); the
    inputs are never modified. ``grads[i] is None`` leaves tensor i unchanged; a tensor
    whose gradient has a NaN/Inf is skipped (params and state unchanged).

    Works in any float dtype: state and math in float32 for fp32/bf16/fp16 params,
    float64 for float64 params (for gradcheck). Bit-identical to
    :func:`pyoptk.ops.mlp_update_` on the same fp32 inputs.

    ``fused`` (default None: when the inputs allow): run the differentiable fused op
    :func:`pyoptk.ops.mlp_step` (its backward recomputes the step instead of autograd
    storing every intermediate); it needs contiguous tensors on one device with one
    param dtype and float32 state (float64 for float64 params). ``fused=False`` runs
    autograd through the reference :func:`pyoptk.ops.mlp_update.mlp_update_functional`;
    ``fused=True`` raises ``ValueError`` when the inputs do not allow the fused op.
    """
    config = config or MLPConfig()
    check_meta_params(meta_params, config)
    if not isinstance(state, MLPState):
        state = MLPState(*state)
    params = list(params)
    n = len(params)
    for name, lst in (("grads", grads),) + tuple(zip(MLPState._fields, state)):
        if len(lst) != n:
            raise ValueError(f"update: {name} has {len(lst)} entries but params has {n}")
    if not params:
        return [], MLPState([], [], [], [], [])
    hp = config.op_hyper(lr, weight_decay)
    weights = meta_weights(meta_params, config)
    check_weights("update", weights, hp.n_features, dtype=None)
    device = params[0].device
    ct = torch.promote_types(params[0].dtype, torch.float32)
    decays = decays_tensor(config, meta_params, device=device, dtype=ct)
    grads = list(grads)
    if fused is not False:
        why = fused_unsupported(params, grads, state)
        if why is None:
            return _update_fused(params, grads, state, weights, decays, hp, ct)
        if fused:
            raise ValueError(f"update(fused=True): the fused op cannot take these inputs: {why}")
    new = mlp_update_functional(params, grads, state.mom, state.rms, state.fac_row,
                                state.fac_col, state.step, weights, decays, hp)
    new_params, mom, rms, fac_row, fac_col, step = new
    return new_params, MLPState(step, mom, rms, fac_row, fac_col)


def _update_fused(params, grads, state: MLPState, weights, decays, hp: MLPUpdateHyper,
                  ct: torch.dtype) -> Tuple[List[Tensor], MLPState]:
    """``update`` through :func:`pyoptk.ops.mlp_step` on the tensors with a gradient."""
    from pyoptk.ops.mlp_step import mlp_step

    idx = [i for i, g in enumerate(grads) if g is not None]
    new_params = list(params)
    new_state = [list(getattr(state, f)) for f in MLPState._fields]
    if not idx:
        return new_params, MLPState(*new_state)
    if hp.lr_t is not None:
        hp = dataclasses.replace(hp, lr_t=hp.lr_t.to(ct).reshape(1).to(device=params[0].device))
    sel = lambda lst: [lst[i] for i in idx]  # noqa: E731
    out = mlp_step(sel(params), sel(grads), sel(state.mom), sel(state.rms), sel(state.fac_row),
                   sel(state.fac_col), sel(state.step), [w.to(ct) for w in weights], decays, hp)
    p_out, mom, rms, fac_row, fac_col, step = out
    for k, i in enumerate(idx):
        new_params[i] = p_out[k]
        for lst, src in zip(new_state, (step, mom, rms, fac_row, fac_col)):
            lst[i] = src[k]
    return new_params, MLPState(*new_state)


class MLPRule(nn.Module):
    """A container for the rule's meta-parameters as ``nn.Parameter`` s (named ``w0``,
    ``b0``, …), convenient for meta-training with a torch optimizer. It keeps no
    other state: :meth:`forward` is :func:`update` with ``self.meta_params()``.

    >>> rule = MLPRule(MLPConfig(), seed=0)
    >>> meta_opt = torch.optim.Adam(rule.parameters(), lr=1e-3)
    >>> new_params, new_state = rule(params, grads, state)
    """

    def __init__(self, config: Optional[MLPConfig] = None, seed: int = 0,
                 meta_params: Optional[Mapping[str, Tensor]] = None):
        super().__init__()
        self.config = config or MLPConfig()
        meta = meta_params if meta_params is not None else init_meta_params(self.config, seed)
        check_meta_params(meta, self.config)
        for k, v in meta.items():
            self.register_parameter(k, nn.Parameter(v.detach().clone()))

    def meta_params(self) -> "OrderedDict[str, Tensor]":
        return OrderedDict(self.named_parameters())

    def init_state(self, params: Sequence[Tensor]) -> MLPState:
        return init_state(params, self.config)

    def forward(self, params, grads, state, *, lr=1.0, weight_decay=0.0):
        return update(params, grads, state, self.meta_params(), self.config, lr=lr,
                      weight_decay=weight_decay)

    def identity(self) -> Dict[str, str]:
        return rule_identity(self.meta_params(), self.config)
