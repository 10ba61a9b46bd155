"""Gradient features of learned optimizers: a frozen config and composable functions.

Every function here is pure and differentiable (no in-place ops on its inputs), so
meta-training can backpropagate through it. Accumulators come as init/update pairs and
keep one *plane* per decay in front of the parameter's shape — ``(K, *p.shape)`` — so
a fused kernel loads each feature plane with coalesced accesses.

The math lives once, in :mod:`pyoptk.ops.mlp_update` (the op's reference is the
specification); this module re-exports it with the configuration that selects it.

=========================  ==========================================================
function                   what
=========================  ==========================================================
momentum_init / _update    momenta ``m_k ← β_k m_k + (1-β_k) g`` at K decays
rms_init / rms_update      second moments ``v_j ← ρ_j v_j + (1-ρ_j) g²`` at R decays
factored_init / _update    Adafactor row/column accumulators of ``g²`` at F decays
factored_features          rank-1 ``v̂``, row and column factors per element
log_sign                   ``(log|x|/k, sign x)`` or ``(-1, e^k x)`` below ``e^-k``
time_features              ``tanh(t/τ - 1)`` for each timescale τ
second_moment_scale        per-tensor ``rsqrt(mean(x²) + eps)``
=========================  ==========================================================
"""

from __future__ import annotations

import math
import struct
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from pyoptk.ops.mlp_update import (
    ema, factored_features, factored_state_shapes, factored_update, feature_names,
    is_factored, log_sign, matrix_shape, momentum_update, rms_update, second_moment_scale,
    time_features)

__all__ = [
    "FeatureConfig", "momentum_init", "momentum_update", "rms_init", "rms_update",
    "factored_init", "factored_update", "factored_features", "factored_state_shapes",
    "is_factored", "matrix_shape", "log_sign", "time_features", "second_moment_scale", "ema",
]

DEFAULT_TIMESCALES = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0, 30000.0,
                      100000.0)


def _err(field: str, msg: str) -> ValueError:
    return ValueError(f"FeatureConfig.{field}: {msg}")


def _decays(field: str, value: Any) -> Tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
        raise _err(field, f"expected a tuple of floats, got {value!r}")
    out = []
    for i, d in enumerate(value):
        if isinstance(d, bool) or not isinstance(d, (int, float)):
            raise _err(field, f"element {i} must be a float, got {d!r}")
        d = float(d)
        if not 0.0 <= d < 1.0:
            raise _err(field, f"decay at index {i} must be in [0, 1), got {d}")
        if _as_float32(d) >= 1.0:
            raise _err(field, f"decay at index {i} ({d}) rounds to 1.0 in float32 and the "
                              "accumulator would never update")
        out.append(d)
    return tuple(out)


def _as_float32(x: float) -> float:
    """``x`` rounded to the nearest float32 (the precision the kernels store decays in)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _positive(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _err(field, f"expected a float, got {value!r}")
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise _err(field, f"must be finite and > 0, got {value}")
    return value


@dataclass(frozen=True)
class FeatureConfig:
    """Which per-parameter features a learned optimizer sees.

    Args:
        momentum_decays (tuple of float, default (0.1, 0.5, 0.9, 0.99, 0.999)): K decays
            of the momentum accumulators.
        rms_decays (tuple of float, default (0.999,)): R decays of the second-moment
            (RMS) accumulators.
        adafactor_decays (tuple of float, default (0.9, 0.99, 0.999)): F decays of the
            Adafactor-style factored accumulators.
        fac_momentum_decay (float or None, default 0.9): the momentum (one of
            ``momentum_decays``) preconditioned by each factored accumulator as a
            feature; None drops those F features.
        log_sign_k (float, default 10): ``k`` of the log-and-sign preprocessing of the
            normalized gradient.
        time_timescales (tuple of float, default 1, 3, 10, …, 1e5): timescales τ of the
            ``tanh(t/τ - 1)`` time features.
        eps (float, default 1e-16): inside ``rsqrt(v + eps)`` of the Adam-like
            features (Adam's eps=1e-8 on the sqrt scale).
        norm_eps (float, default 1e-12): inside the per-tensor second-moment
            normalization ``x · rsqrt(mean(x²) + norm_eps)``.
        fac_eps (float, default 1e-30): added to ``g²`` in the factored accumulators
            (as Adafactor), so they are positive after the first update.

    Invalid values raise ``ValueError`` naming the field. Decays are fixed here; with
    ``MLPConfig(learn_decays=True)`` they only give the initial value of a learned
    meta-parameter.
    """

    momentum_decays: Tuple[float, ...] = (0.1, 0.5, 0.9, 0.99, 0.999)
    rms_decays: Tuple[float, ...] = (0.999,)
    adafactor_decays: Tuple[float, ...] = (0.9, 0.99, 0.999)
    fac_momentum_decay: Optional[float] = 0.9
    log_sign_k: float = 10.0
    time_timescales: Tuple[float, ...] = DEFAULT_TIMESCALES
    eps: float = 1e-16
    norm_eps: float = 1e-12
    fac_eps: float = 1e-30

    def __post_init__(self):
        set_ = lambda name, v: object.__setattr__(self, name, v)  # noqa: E731 (frozen)
        set_("momentum_decays", _decays("momentum_decays", self.momentum_decays))
        set_("rms_decays", _decays("rms_decays", self.rms_decays))
        set_("adafactor_decays", _decays("adafactor_decays", self.adafactor_decays))
        if self.fac_momentum_decay is not None:
            fmd = self.fac_momentum_decay
            if isinstance(fmd, bool) or not isinstance(fmd, (int, float)):
                raise _err("fac_momentum_decay", f"expected a float or None, got {fmd!r}")
            if float(fmd) not in self.momentum_decays:
                raise _err("fac_momentum_decay", f"{fmd} is not one of momentum_decays "
                                                  f"{self.momentum_decays}")
            set_("fac_momentum_decay", float(fmd))
        set_("log_sign_k", _positive("log_sign_k", self.log_sign_k))
        ts = self.time_timescales
        if isinstance(ts, (str, bytes)) or not isinstance(ts, (tuple, list)):
            raise _err("time_timescales", f"expected a tuple of floats, got {ts!r}")
        set_("time_timescales", tuple(_positive("time_timescales", t) for t in ts))
        for name in ("eps", "norm_eps", "fac_eps"):
            set_(name, _positive(name, getattr(self, name)))
        if self.log_sign_k > 80:
            raise _err("log_sign_k", f"must be <= 80 (e^k overflows float32 beyond ~88), "
                                     f"got {self.log_sign_k}")

    # ---- counts -------------------------------------------------------------------
    @property
    def n_mom(self) -> int:
        return len(self.momentum_decays)

    @property
    def n_rms(self) -> int:
        return len(self.rms_decays)

    @property
    def n_fac(self) -> int:
        return len(self.adafactor_decays)

    @property
    def fac_mom_index(self) -> int:
        """Index of ``fac_momentum_decay`` in ``momentum_decays`` (-1: none)."""
        if self.fac_momentum_decay is None:
            return -1
        return self.momentum_decays.index(self.fac_momentum_decay)

    @property
    def n_normalized(self) -> int:
        """Per-element features normalized per tensor: 2 + K + R + K·R + R."""
        k, r = self.n_mom, self.n_rms
        return 2 + k + r + k * r + r

    @property
    def n_scale_free(self) -> int:
        """Per-element features used as they are: 2 + F·(3 + [fac_momentum_decay])."""
        return 2 + self.n_fac * (3 + (self.fac_momentum_decay is not None))

    @property
    def n_element_features(self) -> int:
        return self.n_normalized + self.n_scale_free

    @property
    def n_time_features(self) -> int:
        return len(self.time_timescales)

    @property
    def n_features(self) -> int:
        """Width of the rule's input: per-element features + per-tensor time features
        (39 by default: 14 normalized + 14 scale-free + 11 time)."""
        return self.n_element_features + self.n_time_features

    def feature_names(self) -> List[str]:
        """Feature names in input order (the rows of the first-layer weight)."""
        return feature_names(self.momentum_decays, self.rms_decays, self.adafactor_decays,
                             self.fac_momentum_decay, self.time_timescales)

    def decays(self) -> Tuple[float, ...]:
        """All decays in the op's order: momentum (K), RMS (R), factored (F)."""
        return self.momentum_decays + self.rms_decays + self.adafactor_decays

    # ---- state --------------------------------------------------------------------
    def state_shapes(self, shape: Sequence[int]) -> Dict[str, tuple]:
        """Shapes of the float32 state of one parameter tensor of ``shape``."""
        shape = tuple(shape)
        fr, fc = factored_state_shapes(shape, self.n_fac)
        return {"step": (), "mom": (self.n_mom,) + shape, "rms": (self.n_rms,) + shape,
                "fac_row": fr, "fac_col": fc}

    def state_bytes(self, shape: Sequence[int]) -> int:
        """Bytes of optimizer state (all float32) for one parameter tensor."""
        return 4 * sum(math.prod(s) for s in self.state_shapes(shape).values())

    # ---- (de)serialization ----------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "FeatureConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"FeatureConfig: unknown fields {sorted(unknown)}")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


# ----------------------------------------------------------------------------------
# Accumulator init functions (the update halves are re-exported from the op's reference).
# ----------------------------------------------------------------------------------
def momentum_init(p: Tensor, n: int, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Zero momenta ``(n, *p.shape)`` (float32, or float64 for float64 params)."""
    dtype = dtype or torch.promote_types(p.dtype, torch.float32)
    return torch.zeros((n,) + tuple(p.shape), dtype=dtype, device=p.device)


def rms_init(p: Tensor, n: int, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Zero second-moment accumulators ``(n, *p.shape)``."""
    return momentum_init(p, n, dtype)


def factored_init(p: Tensor, n: int, dtype: Optional[torch.dtype] = None
                  ) -> Tuple[Tensor, Tensor]:
    """Zero factored accumulators (fac_row, fac_col), shapes from
    :func:`factored_state_shapes`."""
    dtype = dtype or torch.promote_types(p.dtype, torch.float32)
    fr, fc = factored_state_shapes(p.shape, n)
    return (torch.zeros(fr, dtype=dtype, device=p.device),
            torch.zeros(fc, dtype=dtype, device=p.device))
