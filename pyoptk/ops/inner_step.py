"""Differentiable inner optimizer steps for MAML-style meta-learning:
``torch.ops.pyoptk.inner_sgd``, ``inner_metasgd`` and ``inner_adam``.

Layout (as every op file): reference → backend launchers → op registration → public
function. The ops are *functional*: they return new tensors, never modify their inputs,
and are differentiable with respect to every tensor input (params, grads, moments,
learned or tensor learning rates). See ``docs/inner-steps.md``.

.. math::
    \\text{SGD:}\\quad \\theta' &= \\theta - \\alpha g \\\\
    \\text{MetaSGD:}\\quad \\theta' &= \\theta - \\alpha \\odot g \\\\
    \\text{Adam:}\\quad m' &= \\beta_1 m + (1-\\beta_1) g,\\quad
        v' = \\beta_2 v + (1-\\beta_2) g^2 \\\\
    \\theta' &= \\theta - \\frac{\\alpha}{1-\\beta_1^t}\\,
        \\frac{m'}{\\sqrt{v'}/\\sqrt{1-\\beta_2^t} + \\epsilon}

The Adam forward is exactly ``torch.optim.Adam``'s (``lerp`` for the first moment,
bias corrections in double). Its derivatives use the *safe square root*
(:func:`safe_sqrt`): ``sqrt`` with derivative 0 (instead of +inf) at exactly 0, so a
zero gradient on zero moments gives finite (zero) second-moment derivatives instead of
``inf * 0 = NaN``. Everywhere else the derivatives are the exact ones.

* **Backward**: each forward op has ``register_autograd``; its backward calls a second
  custom op (``pyoptk::inner_*_backward``) that computes all vector–Jacobian products
  of the step in one fused multi-tensor pass (backends ``cpu`` native C++, ``cuda``,
  ``triton``, ``torch``: the closed-form VJP in PyTorch ops). The identity part
  (d params = d new params) needs no kernel.
* **Double backward**: each backward op has its own ``register_autograd``, which runs
  autograd over the closed-form PyTorch VJP (:func:`inner_sgd_vjp_reference` …), so
  ``gradgradcheck`` and higher orders work. For Adam this is the slow path and warns
  once (:class:`pyoptk.SlowPathWarning`); for SGD/MetaSGD the VJP is bilinear and the
  double backward is a few elementwise ops.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from pyoptk._backend import implementation, register_backend, warn_once
from pyoptk._native import native
from pyoptk._nvtx import annotate
from pyoptk.ops import _native_call as nc
from pyoptk.ops._validation import check_tensor_lists

__all__ = [
    "inner_sgd", "inner_metasgd", "inner_adam",
    "inner_sgd_reference", "inner_metasgd_reference", "inner_adam_reference",
    "inner_sgd_vjp_reference", "inner_metasgd_vjp_reference", "inner_adam_vjp_reference",
    "safe_sqrt",
]

OP_SGD, OP_METASGD, OP_ADAM = "inner_sgd", "inner_metasgd", "inner_adam"
BWD_SGD, BWD_METASGD, BWD_ADAM = (
    "inner_sgd_backward", "inner_metasgd_backward", "inner_adam_backward")

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
LrArg = Union[float, Tensor]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The math (and state / learned-lr) dtype for params of ``dtype``: float64 for
    float64 (gradcheck), else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------
# Reference: per tensor, in the compute dtype, differentiable. The specification.
# ----------------------------------------------------------------------------------
def safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` with the same value everywhere (NaN for NaN or negative x), but
    derivative 0 instead of +inf at exactly ``x == 0`` (all orders). Built from
    ``torch.where`` so it is differentiable to any order."""
    zero = x == 0
    safe = torch.where(zero, torch.ones_like(x), x)
    return torch.where(zero, torch.zeros_like(x), torch.sqrt(safe))


def _lr_value(lr: LrArg, ct: torch.dtype) -> Union[float, Tensor]:
    if isinstance(lr, Tensor):
        return lr.reshape(()).to(ct)
    return float(lr)


def inner_sgd_reference(params: Sequence[Tensor], grads: Sequence[Tensor],
                        lr: LrArg) -> List[Tensor]:
    """``[p - lr * g]``, math in fp32 (fp64 for fp64), results in the params' dtype."""
    out = []
    for p, g in zip(params, grads):
        ct = compute_dtype(p.dtype)
        a = _lr_value(lr, ct)
        out.append((p.to(ct) - a * g.to(ct)).to(p.dtype))
    return out


def inner_metasgd_reference(params: Sequence[Tensor], grads: Sequence[Tensor],
                            lrs: Sequence[Tensor]) -> List[Tensor]:
    """``[p - lr ⊙ g]`` with one learned lr per element."""
    out = []
    for p, g, a in zip(params, grads, lrs):
        ct = compute_dtype(p.dtype)
        out.append((p.to(ct) - a.to(ct) * g.to(ct)).to(p.dtype))
    return out


def adam_scalars(step: int, beta1: float, beta2: float) -> Tuple[float, float]:
    """``(1 - beta1^t, sqrt(1 - beta2^t))`` in double, as torch.optim.Adam."""
    return 1.0 - beta1 ** step, math.sqrt(1.0 - beta2 ** step)


def inner_adam_reference(params: Sequence[Tensor], grads: Sequence[Tensor],
                         exp_avgs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor],
                         step: int, lr: LrArg, beta1: float = 0.9, beta2: float = 0.999,
                         eps: float = 1e-8
                         ) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
    """One bias-corrected Adam step (``torch.optim.Adam``'s forward, step number
    ``step`` >= 1), out of place, with :func:`safe_sqrt` for the second moment."""
    bc1, bc2_sqrt = adam_scalars(step, beta1, beta2)
    new_p, new_m, new_v = [], [], []
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        ct = compute_dtype(p.dtype)
        a = _lr_value(lr, ct)
        g = g.to(ct)
        m2 = torch.lerp(m.to(ct), g, 1 - beta1)
        v2 = v.to(ct) * beta2 + (1 - beta2) * g * g  # torch addcmul_ order: ((1-b2)*g)*g
        denom = safe_sqrt(v2) / bc2_sqrt + eps
        step_size = a / bc1
        new_p.append((p.to(ct) - step_size * m2 / denom).to(p.dtype))
        new_m.append(m2.to(m.dtype))
        new_v.append(v2.to(v.dtype))
    return new_p, new_m, new_v


# Closed-form vector-Jacobian products (the ``torch`` backend of the backward ops, and
# through autograd over them, the double backward). ``d_*`` are output cotangents.
def inner_sgd_vjp_reference(grads: Sequence[Tensor], d_params: Sequence[Tensor],
                            lr: float, lr_t: Optional[Tensor]
                            ) -> Tuple[List[Tensor], Optional[Tensor]]:
    """``(d_grads, d_lr)``: ``d_g = -lr * d_p``, ``d_lr = -sum(d_p * g)`` (None for a
    float lr). ``d_params`` passes through unchanged."""
    d_g, d_lr = [], None
    for g, dp in zip(grads, d_params):
        ct = compute_dtype(g.dtype)
        a = lr_t.reshape(()).to(ct) if lr_t is not None else lr
        d_g.append((-a * dp.to(ct)).to(g.dtype))
        if lr_t is not None:
            term = -(dp.to(ct) * g.to(ct)).sum()
            d_lr = term if d_lr is None else d_lr + term
    if lr_t is not None:
        d_lr = (d_lr if d_lr is not None else torch.zeros((), dtype=lr_t.dtype,
                                                          device=lr_t.device))
        d_lr = d_lr.to(lr_t.dtype).reshape(lr_t.shape)
    return d_g, d_lr


def inner_metasgd_vjp_reference(grads: Sequence[Tensor], lrs: Sequence[Tensor],
                                d_params: Sequence[Tensor]
                                ) -> Tuple[List[Tensor], List[Tensor]]:
    """``(d_grads, d_lrs)``: ``d_g = -lr ⊙ d_p``, ``d_lr = -g ⊙ d_p``."""
    d_g, d_a = [], []
    for g, a, dp in zip(grads, lrs, d_params):
        ct = compute_dtype(g.dtype)
        dp = dp.to(ct)
        d_g.append((-a.to(ct) * dp).to(g.dtype))
        d_a.append((-g.to(ct) * dp).to(a.dtype))
    return d_g, d_a


def inner_adam_vjp_reference(grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                             exp_avg_sqs: Sequence[Tensor], d_params: Sequence[Tensor],
                             d_exp_avgs: Sequence[Tensor], d_exp_avg_sqs: Sequence[Tensor],
                             step: int, lr: float, lr_t: Optional[Tensor], beta1: float,
                             beta2: float, eps: float
                             ) -> Tuple[List[Tensor], List[Tensor], List[Tensor],
                                        Optional[Tensor]]:
    """``(d_grads, d_exp_avgs, d_exp_avg_sqs, d_lr)`` of :func:`inner_adam_reference`
    (``d_params`` passes through unchanged; ``d_exp_avgs`` / ``d_exp_avg_sqs`` may be
    empty lists, meaning zero). With ``c = lr/bc1``, ``s = sqrt(bc2)``,
    ``r = safe_sqrt(v')``, ``d = r/s + eps``, ``u = m'/d``:

    * ``M = d_m' - c * d_p / d``  (total cotangent of m')
    * ``V = d_v' + c * d_p * m' / d^2 * r'(v') / s`` with ``r'(v') = 1/(2 r)`` for
      ``v' > 0`` and 0 at ``v' == 0`` (the safe square root)
    * ``d_g = (1-b1) M + 2 (1-b2) g V``, ``d_m = b1 M``, ``d_v = b2 V``,
      ``d_lr = -sum(d_p * u) / bc1``.

    Differentiable (its autograd is the op's double backward).
    """
    bc1, s = adam_scalars(step, beta1, beta2)
    w = 1 - beta1
    n = len(grads)
    # Empty d_exp_avgs / d_exp_avg_sqs: zero cotangents (the moments were not used).
    dms = list(d_exp_avgs) if len(d_exp_avgs) else [None] * n
    dvs = list(d_exp_avg_sqs) if len(d_exp_avg_sqs) else [None] * n
    d_g, d_m, d_v, d_lr = [], [], [], None
    for g, m, v, dp, dm, dv in zip(grads, exp_avgs, exp_avg_sqs, d_params, dms, dvs):
        ct = compute_dtype(g.dtype)
        a = lr_t.reshape(()).to(ct) if lr_t is not None else lr
        c = a / bc1
        g32, dp = g.to(ct), dp.to(ct)
        m2 = torch.lerp(m.to(ct), g32, w)
        v2 = v.to(ct) * beta2 + (1 - beta2) * g32 * g32
        r = safe_sqrt(v2)
        zero = v2 == 0
        dr = torch.where(zero, torch.zeros_like(v2), 0.5 / torch.where(zero, torch.ones_like(r), r))
        d = r / s + eps
        M = (dm.to(ct) if dm is not None else 0.0) - c * dp / d
        V = (dv.to(ct) if dv is not None else 0.0) + c * dp * m2 / (d * d) * dr / s
        d_g.append(((1 - beta2) * 2 * g32 * V + w * M).to(g.dtype))
        d_m.append((beta1 * M).to(m.dtype))
        d_v.append((beta2 * V).to(v.dtype))
        if lr_t is not None:
            term = -(dp * (m2 / d)).sum() / bc1
            d_lr = term if d_lr is None else d_lr + term
    if lr_t is not None:
        d_lr = (d_lr if d_lr is not None else torch.zeros((), dtype=lr_t.dtype,
                                                          device=lr_t.device))
        d_lr = d_lr.to(lr_t.dtype).reshape(lr_t.shape)
    return d_g, d_m, d_v, d_lr


# ----------------------------------------------------------------------------------
# Backends. Forward: (params, grads, ...) -> new lists. Backward: VJP lists.
# The torch backends are the references above.
# ----------------------------------------------------------------------------------
@register_backend(OP_SGD, "torch")
def _sgd_fwd_torch(params, grads, lr, lr_t):
    return inner_sgd_reference(params, grads, lr_t if lr_t is not None else lr)


@register_backend(OP_METASGD, "torch")
def _metasgd_fwd_torch(params, grads, lrs):
    return inner_metasgd_reference(params, grads, lrs)


@register_backend(OP_ADAM, "torch")
def _adam_fwd_torch(params, grads, exp_avgs, exp_avg_sqs, step, lr, lr_t, beta1, beta2, eps):
    return inner_adam_reference(params, grads, exp_avgs, exp_avg_sqs, step,
                                lr_t if lr_t is not None else lr, beta1, beta2, eps)


register_backend(BWD_SGD, "torch")(inner_sgd_vjp_reference)
register_backend(BWD_METASGD, "torch")(inner_metasgd_vjp_reference)
register_backend(BWD_ADAM, "torch")(inner_adam_vjp_reference)


# Fused backends: native CPU / CUDA (pyoptk._C, csrc/cpu|cuda/inner_step.*) and Triton
# (pyoptk.kernels.inner_step). They take float32 or float64 arrays: bf16/fp16 params,
# grads and cotangents are upcast to float32 copies here and the results cast back (the
# reference does the same math in fp32).
def _up(ts: Sequence[Tensor], ct: torch.dtype) -> List[Tensor]:
    return [t if t.dtype == ct else t.to(ct) for t in ts]


def _down(ts: Sequence[Tensor], like: Sequence[Tensor]) -> List[Tensor]:
    return [t if t.dtype == r.dtype else t.to(r.dtype) for t, r in zip(ts, like)]


def _lr_arg(lr_t: Optional[Tensor], ct: torch.dtype) -> Optional[Tensor]:
    return None if lr_t is None else lr_t.reshape(1).to(ct).contiguous()


def _d_lr(total: Optional[Tensor], lr_t: Optional[Tensor], scale: float) -> Optional[Tensor]:
    """``-total * scale`` as a tensor of ``lr_t``'s dtype and shape (None without lr_t)."""
    if lr_t is None:
        return None
    return (-total * scale).to(lr_t.dtype).reshape(lr_t.shape)


class _Native:
    """Launchers of pyoptk._C's inner_* functions for one device type."""

    def __init__(self, device_type: str):
        self.cuda = device_type == "cuda"

    def _call(self, name: str, *args, device=None):
        fn = getattr(native(), f"{name}_{'cuda' if self.cuda else 'cpu'}")
        if self.cuda:
            return fn(*args, nc.stream_handle(device))
        return fn(*args)

    def _partials(self, numels, ct, device) -> Tensor:
        n = native().inner_step_num_chunks(numels)
        # CPU partials are double; CUDA's are in the compute dtype.
        return torch.zeros(n, dtype=ct if self.cuda else torch.float64, device=device)

    def sgd(self, params, grads, lr, lr_t, lrs=None):
        ct = compute_dtype(params[0].dtype)
        p, g = _up(params, ct), _up(grads, ct)
        a = _up(lrs, ct) if lrs is not None else []
        lt = _lr_arg(lr_t, ct)
        out = [torch.empty_like(x) for x in p]
        cfg = native().InnerStepConfig(lr=lr, lr_ptr=nc.lr_ptr(lt))
        self._call("inner_sgd", nc.ptrs(p), nc.ptrs(g), nc.ptrs(a), nc.ptrs(out), nc.numels(p),
                   ct == torch.float64, cfg, device=p[0].device)
        return _down(out, params)

    def sgd_backward(self, grads, d_params, lr, lr_t, lrs=None):
        ct = compute_dtype(grads[0].dtype)
        g, dp = _up(grads, ct), _up(d_params, ct)
        a = _up(lrs, ct) if lrs is not None else []
        lt = _lr_arg(lr_t, ct)
        d_g = [torch.empty_like(x) for x in g]
        d_a = [torch.empty_like(x) for x in a]
        want_sum = lrs is None and lr_t is not None
        part = self._partials(nc.numels(g), ct, g[0].device) if want_sum else None
        cfg = native().InnerStepConfig(lr=lr, lr_ptr=nc.lr_ptr(lt))
        self._call("inner_sgd_backward", nc.ptrs(g), nc.ptrs(a), nc.ptrs(dp), nc.ptrs(d_g),
                   nc.ptrs(d_a), nc.numels(g), ct == torch.float64, cfg,
                   part.data_ptr() if part is not None and part.numel() else 0,
                   device=g[0].device)
        total = part.sum().to(ct) if part is not None else None
        return _down(d_g, grads), (_down(d_a, lrs) if lrs is not None else None), total

    def adam(self, params, grads, ms, vs, step, lr, lr_t, beta1, beta2, eps):
        ct = compute_dtype(params[0].dtype)
        p, g, m, v = _up(params, ct), _up(grads, ct), _up(ms, ct), _up(vs, ct)
        lt = _lr_arg(lr_t, ct)
        po, mo, vo = ([torch.empty_like(x) for x in lst] for lst in (p, m, v))
        cfg = native().InnerStepConfig(lr=lr, lr_ptr=nc.lr_ptr(lt), beta1=beta1, beta2=beta2,
                                       eps=eps, step=step)
        self._call("inner_adam", nc.ptrs(p), nc.ptrs(g), nc.ptrs(m), nc.ptrs(v), nc.ptrs(po),
                   nc.ptrs(mo), nc.ptrs(vo), nc.numels(p), ct == torch.float64, cfg,
                   device=p[0].device)
        return _down(po, params), _down(mo, ms), _down(vo, vs)

    def adam_backward(self, grads, ms, vs, dps, dms, dvs, step, lr, lr_t, beta1, beta2, eps):
        ct = compute_dtype(grads[0].dtype)
        g, m, v = _up(grads, ct), _up(ms, ct), _up(vs, ct)
        dp, dm, dv = _up(dps, ct), _up(dms, ct), _up(dvs, ct)
        lt = _lr_arg(lr_t, ct)
        dgo, dmo, dvo = ([torch.empty_like(x) for x in lst] for lst in (g, m, v))
        part = self._partials(nc.numels(g), ct, g[0].device) if lr_t is not None else None
        cfg = native().InnerStepConfig(lr=lr, lr_ptr=nc.lr_ptr(lt), beta1=beta1, beta2=beta2,
                                       eps=eps, step=step)
        self._call("inner_adam_backward", nc.ptrs(g), nc.ptrs(m), nc.ptrs(v), nc.ptrs(dp),
                   nc.ptrs(dm), nc.ptrs(dv), nc.ptrs(dgo), nc.ptrs(dmo), nc.ptrs(dvo),
                   nc.numels(g), ct == torch.float64, cfg,
                   part.data_ptr() if part is not None and part.numel() else 0,
                   device=g[0].device)
        total = part.sum().to(ct) if part is not None else None
        return _down(dgo, grads), _down(dmo, ms), _down(dvo, vs), total


class _Triton:
    """Launchers of pyoptk.kernels.inner_step (same interface as _Native)."""

    @staticmethod
    def _k():
        from pyoptk.kernels import inner_step as k

        return k

    def sgd(self, params, grads, lr, lr_t, lrs=None):
        ct = compute_dtype(params[0].dtype)
        out = self._k().sgd(_up(params, ct), _up(grads, ct),
                            _up(lrs, ct) if lrs is not None else None, lr, _lr_arg(lr_t, ct))
        return _down(out, params)

    def sgd_backward(self, grads, d_params, lr, lr_t, lrs=None):
        ct = compute_dtype(grads[0].dtype)
        d_g, d_a, total = self._k().sgd_backward(
            _up(grads, ct), _up(lrs, ct) if lrs is not None else None, _up(d_params, ct), lr,
            _lr_arg(lr_t, ct))
        return _down(d_g, grads), (_down(d_a, lrs) if lrs is not None else None), total

    def adam(self, params, grads, ms, vs, step, lr, lr_t, beta1, beta2, eps):
        ct = compute_dtype(params[0].dtype)
        po, mo, vo = self._k().adam(_up(params, ct), _up(grads, ct), _up(ms, ct), _up(vs, ct),
                                    step, lr, _lr_arg(lr_t, ct), beta1, beta2, eps)
        return _down(po, params), _down(mo, ms), _down(vo, vs)

    def adam_backward(self, grads, ms, vs, dps, dms, dvs, step, lr, lr_t, beta1, beta2, eps):
        ct = compute_dtype(grads[0].dtype)
        dgo, dmo, dvo, total = self._k().adam_backward(
            _up(grads, ct), _up(ms, ct), _up(vs, ct), _up(dps, ct), _up(dms, ct), _up(dvs, ct),
            step, lr, _lr_arg(lr_t, ct), beta1, beta2, eps)
        return _down(dgo, grads), _down(dmo, ms), _down(dvo, vs), total


def _register_fused(backend: str, impl) -> None:
    """Registers ``impl``'s launchers as ``backend`` of the six ops."""

    def sgd(params, grads, lr, lr_t):
        return impl.sgd(params, grads, lr, lr_t)

    def metasgd(params, grads, lrs):
        return impl.sgd(params, grads, 0.0, None, lrs)

    def adam(params, grads, ms, vs, step, lr, lr_t, beta1, beta2, eps):
        return impl.adam(params, grads, ms, vs, step, lr, lr_t, beta1, beta2, eps)

    def sgd_bwd(grads, d_params, lr, lr_t):
        d_g, _, total = impl.sgd_backward(grads, d_params, lr, lr_t)
        return d_g, _d_lr(total, lr_t, 1.0)

    def metasgd_bwd(grads, lrs, d_params):
        d_g, d_a, _ = impl.sgd_backward(grads, d_params, 0.0, None, lrs)
        return d_g, d_a

    def adam_bwd(grads, ms, vs, dps, dms, dvs, step, lr, lr_t, beta1, beta2, eps):
        d_g, d_m, d_v, total = impl.adam_backward(grads, ms, vs, dps, dms, dvs, step, lr, lr_t,
                                                  beta1, beta2, eps)
        return d_g, d_m, d_v, _d_lr(total, lr_t, 1.0 / adam_scalars(step, beta1, beta2)[0])

    for op, fn in ((OP_SGD, sgd), (OP_METASGD, metasgd), (OP_ADAM, adam), (BWD_SGD, sgd_bwd),
                   (BWD_METASGD, metasgd_bwd), (BWD_ADAM, adam_bwd)):
        register_backend(op, backend)(fn)


_register_fused("cpu", _Native("cpu"))
_register_fused("cuda", _Native("cuda"))
_register_fused("triton", _Triton())


def _impl(op: str, device_type: str):
    return implementation(op, device_type)


def _contig(ts: Sequence[Tensor]) -> List[Tensor]:
    return [t.contiguous() for t in ts]


def _zeros_or_empty(cts, refs) -> List[Tensor]:
    """``[]`` when every cotangent is undefined, else :func:`_zeros_for`."""
    if cts is None or all(c is None for c in cts):
        return []
    return _zeros_for(cts, refs)


def _zeros_for(cts, refs) -> List[Tensor]:
    cts = list(cts) if cts is not None else [None] * len(refs)
    return [torch.zeros_like(r) if c is None else c.contiguous() for c, r in zip(cts, refs)]


# ----------------------------------------------------------------------------------
# Op registration: forward ops.
# ----------------------------------------------------------------------------------
@torch.library.custom_op("pyoptk::inner_sgd", mutates_args=())
def _inner_sgd_op(params: List[Tensor], grads: List[Tensor], lr: float,
                  lr_t: Optional[Tensor]) -> List[Tensor]:
    if not params:
        return []
    out = _impl(OP_SGD, params[0].device.type)(params, grads, lr, lr_t)
    return [o.clone() if o is p else o for o, p in zip(out, params)]


@_inner_sgd_op.register_fake
def _(params, grads, lr, lr_t):
    return [torch.empty_like(p) for p in params]


@torch.library.custom_op("pyoptk::inner_metasgd", mutates_args=())
def _inner_metasgd_op(params: List[Tensor], grads: List[Tensor],
                      lrs: List[Tensor]) -> List[Tensor]:
    if not params:
        return []
    return _impl(OP_METASGD, params[0].device.type)(params, grads, lrs)


@_inner_metasgd_op.register_fake
def _(params, grads, lrs):
    return [torch.empty_like(p) for p in params]


@torch.library.custom_op("pyoptk::inner_adam", mutates_args=())
def _inner_adam_op(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                   exp_avg_sqs: List[Tensor], step: int, lr: float, lr_t: Optional[Tensor],
                   beta1: float, beta2: float, eps: float
                   ) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
    if not params:
        return [], [], []
    out = _impl(OP_ADAM, params[0].device.type)(params, grads, exp_avgs, exp_avg_sqs, step,
                                                 lr, lr_t, beta1, beta2, eps)
    return tuple(list(o) for o in out)


@_inner_adam_op.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, step, lr, lr_t, beta1, beta2, eps):
    return ([torch.empty_like(p) for p in params], [torch.empty_like(m) for m in exp_avgs],
            [torch.empty_like(v) for v in exp_avg_sqs])


# ----------------------------------------------------------------------------------
# Op registration: backward ops (one fused pass computing every VJP).
# ----------------------------------------------------------------------------------
def _empty_lr(ref: Tensor) -> Tensor:
    return ref.new_zeros(0)


@torch.library.custom_op("pyoptk::inner_sgd_backward", mutates_args=())
def _inner_sgd_backward_op(grads: List[Tensor], d_params: List[Tensor], lr: float,
                           lr_t: Optional[Tensor]) -> Tuple[List[Tensor], Tensor]:
    """``(d_grads, d_lr)`` (``d_lr`` an empty tensor when ``lr_t`` is None)."""
    if not grads:
        return [], (torch.zeros_like(lr_t) if lr_t is not None else torch.zeros(0))
    d_g, d_lr = _impl(BWD_SGD, grads[0].device.type)(grads, _contig(d_params), lr, lr_t)
    return list(d_g), (d_lr if d_lr is not None else _empty_lr(grads[0]))


@_inner_sgd_backward_op.register_fake
def _(grads, d_params, lr, lr_t):
    d_lr = torch.empty_like(lr_t) if lr_t is not None else (
        grads[0].new_empty(0) if grads else torch.empty(0))
    return [torch.empty_like(g) for g in grads], d_lr


@torch.library.custom_op("pyoptk::inner_metasgd_backward", mutates_args=())
def _inner_metasgd_backward_op(grads: List[Tensor], lrs: List[Tensor], d_params: List[Tensor]
                               ) -> Tuple[List[Tensor], List[Tensor]]:
    if not grads:
        return [], []
    d_g, d_a = _impl(BWD_METASGD, grads[0].device.type)(grads, lrs, _contig(d_params))
    return list(d_g), list(d_a)


@_inner_metasgd_backward_op.register_fake
def _(grads, lrs, d_params):
    return [torch.empty_like(g) for g in grads], [torch.empty_like(a) for a in lrs]


@torch.library.custom_op("pyoptk::inner_adam_backward", mutates_args=())
def _inner_adam_backward_op(grads: List[Tensor], exp_avgs: List[Tensor],
                            exp_avg_sqs: List[Tensor], d_params: List[Tensor],
                            d_exp_avgs: List[Tensor], d_exp_avg_sqs: List[Tensor], step: int,
                            lr: float, lr_t: Optional[Tensor], beta1: float, beta2: float,
                            eps: float
                            ) -> Tuple[List[Tensor], List[Tensor], List[Tensor], Tensor]:
    """``(d_grads, d_exp_avgs, d_exp_avg_sqs, d_lr)`` (``d_lr`` empty when ``lr_t`` is
    None). ``d_exp_avgs`` / ``d_exp_avg_sqs`` may be empty lists: zero cotangents."""
    if not grads:
        return [], [], [], (torch.zeros_like(lr_t) if lr_t is not None else torch.zeros(0))
    d_g, d_m, d_v, d_lr = _impl(BWD_ADAM, grads[0].device.type)(
        grads, exp_avgs, exp_avg_sqs, _contig(d_params), _contig(d_exp_avgs),
        _contig(d_exp_avg_sqs), step, lr, lr_t, beta1, beta2, eps)
    return (list(d_g), list(d_m), list(d_v),
            d_lr if d_lr is not None else _empty_lr(grads[0]))


@_inner_adam_backward_op.register_fake
def _(grads, exp_avgs, exp_avg_sqs, d_params, d_exp_avgs, d_exp_avg_sqs, step, lr, lr_t,
      beta1, beta2, eps):
    d_lr = torch.empty_like(lr_t) if lr_t is not None else (
        grads[0].new_empty(0) if grads else torch.empty(0))
    return ([torch.empty_like(g) for g in grads], [torch.empty_like(m) for m in exp_avgs],
            [torch.empty_like(v) for v in exp_avg_sqs], d_lr)


# ----------------------------------------------------------------------------------
# Autograd: forward ops -> backward ops.
# ----------------------------------------------------------------------------------
def _sgd_setup(ctx, inputs, output):
    params, grads, lr, lr_t = inputs
    ctx.lr, ctx.n = lr, len(params)
    ctx.has_lr = lr_t is not None
    # The grads are needed only for d_lr = -sum(d_p * g). With a float lr nothing is
    # saved: an unrolled inner loop would otherwise keep every step's [T, *shape]
    # gradients alive until the outer backward reaches that step (autograd frees them
    # as soon as the next step has used them).
    if lr_t is not None:
        ctx.save_for_backward(*grads, lr_t)


def _sgd_backward(ctx, d_new):
    if not ctx.has_lr:
        # d_g = -lr * d_p: one scalar multiply (a foreach op, no fused kernel to gain),
        # on the cotangents as they come (no contiguous copies); its autograd is the
        # double backward. d_params = d_new passes through (None stays None).
        live = [d for d in d_new if d is not None]
        scaled = iter(torch._foreach_mul(live, -ctx.lr) if live else [])
        d_g = [None if d is None else next(scaled) for d in d_new]
        return list(d_new), d_g, None, None
    saved = ctx.saved_tensors
    grads, lr_t = list(saved[:ctx.n]), saved[ctx.n]
    if ctx.n == 0:
        return [], [], None, torch.zeros_like(lr_t)
    d_p = _zeros_for(d_new, grads)
    d_g, d_lr = torch.ops.pyoptk.inner_sgd_backward(grads, d_p, ctx.lr, lr_t)
    return d_p, d_g, None, d_lr


_inner_sgd_op.register_autograd(_sgd_backward, setup_context=_sgd_setup)


def _metasgd_setup(ctx, inputs, output):
    params, grads, lrs = inputs
    ctx.n = len(params)
    ctx.save_for_backward(*grads, *lrs)


def _metasgd_backward(ctx, d_new):
    saved, n = ctx.saved_tensors, ctx.n
    if n == 0:
        return [], [], []
    grads, lrs = list(saved[:n]), list(saved[n:])
    d_p = _zeros_for(d_new, grads)
    d_g, d_a = torch.ops.pyoptk.inner_metasgd_backward(grads, lrs, d_p)
    return d_p, d_g, d_a


_inner_metasgd_op.register_autograd(_metasgd_backward, setup_context=_metasgd_setup)


def _adam_setup(ctx, inputs, output):
    params, grads, exp_avgs, exp_avg_sqs, step, lr, lr_t, beta1, beta2, eps = inputs
    ctx.n = len(params)
    ctx.scalars = (step, lr, beta1, beta2, eps)
    ctx.has_lr = lr_t is not None
    ctx.save_for_backward(*grads, *exp_avgs, *exp_avg_sqs, *([lr_t] if lr_t is not None else []))


def _adam_backward(ctx, d_new_p, d_new_m, d_new_v):
    saved, n = ctx.saved_tensors, ctx.n
    lr_t = saved[3 * n] if ctx.has_lr else None
    tail = [None] * 6  # step, lr, lr_t, beta1, beta2, eps
    if n == 0:
        tail[2] = torch.zeros_like(lr_t) if lr_t is not None else None
        return ([], [], [], [], *tail)
    grads, ms, vs = (list(saved[k * n:(k + 1) * n]) for k in range(3))
    step, lr, beta1, beta2, eps = ctx.scalars
    d_p = _zeros_for(d_new_p, grads)
    # Unused new moments (the last inner step's): an empty list, which the kernels read
    # as zero, instead of materialized zeros (a third of the backward's time on CPU).
    d_m2 = _zeros_or_empty(d_new_m, ms)
    d_v2 = _zeros_or_empty(d_new_v, vs)
    d_g, d_m, d_v, d_lr = torch.ops.pyoptk.inner_adam_backward(
        grads, ms, vs, d_p, d_m2, d_v2, step, lr, lr_t, beta1, beta2, eps)
    tail[2] = d_lr if lr_t is not None else None
    return (d_p, d_g, d_m, d_v, *tail)


_inner_adam_op.register_autograd(_adam_backward, setup_context=_adam_setup)


# ----------------------------------------------------------------------------------
# Autograd of the backward ops (double backward): autograd over the closed-form
# PyTorch VJPs. Inputs are aliased (view_as) so that with create_graph the result
# stays connected to the original tensors (higher orders work too).
# ----------------------------------------------------------------------------------
def _leaf(t: Tensor) -> Tensor:
    return t.view_as(t) if t.requires_grad else t.detach().requires_grad_(True)


def _double_backward(fn, tensor_args: List[List[Tensor]], lr_t: Optional[Tensor], extra,
                     outs_ct: List[Optional[Tensor]]):
    """Gradients of ``<fn(*tensor_args, ...), outs_ct>`` with respect to every tensor in
    ``tensor_args`` (lists) and ``lr_t``."""
    create = torch.is_grad_enabled()
    with torch.enable_grad():
        leaves = [[_leaf(t) for t in lst] for lst in tensor_args]
        lr_leaf = _leaf(lr_t) if lr_t is not None else None
        outs = fn(*leaves, lr_leaf, *extra)
        flat_out, flat_ct = [], []
        for o, c in zip(outs, outs_ct):
            if o is None or c is None:
                continue
            if isinstance(o, Tensor):
                o, c = [o], [c]
            for oi, ci in zip(o, c):
                if ci is not None and oi.requires_grad:
                    flat_out.append(oi)
                    flat_ct.append(ci)
        wrt = [t for lst in leaves for t in lst] + ([lr_leaf] if lr_leaf is not None else [])
        if flat_out:
            gs = torch.autograd.grad(flat_out, wrt, flat_ct, create_graph=create,
                                     allow_unused=True)
        else:
            gs = [None] * len(wrt)
    gs = [torch.zeros_like(t) if g is None else g for t, g in zip(wrt, gs)]
    res, k = [], 0
    for lst in leaves:
        res.append(gs[k:k + len(lst)])
        k += len(lst)
    return res, (gs[k] if lr_t is not None else None)


def _sgd_bwd_setup(ctx, inputs, output):
    grads, d_params, lr, lr_t = inputs
    ctx.n, ctx.lr, ctx.has_lr = len(grads), lr, lr_t is not None
    ctx.save_for_backward(*grads, *d_params, *([lr_t] if lr_t is not None else []))


def _sgd_bwd_backward(ctx, a_g, a_lr):
    saved, n = ctx.saved_tensors, ctx.n
    grads, d_p = list(saved[:n]), list(saved[n:2 * n])
    lr_t = saved[2 * n] if ctx.has_lr else None
    fn = lambda g, dp, lt, lr: inner_sgd_vjp_reference(g, dp, lr, lt)  # noqa: E731
    (gg, gdp), glr = _double_backward(fn, [grads, d_p], lr_t, (ctx.lr,),
                                      [a_g, a_lr if lr_t is not None else None])
    return gg, gdp, None, glr


_inner_sgd_backward_op.register_autograd(_sgd_bwd_backward, setup_context=_sgd_bwd_setup)


def _metasgd_bwd_setup(ctx, inputs, output):
    grads, lrs, d_params = inputs
    ctx.n = len(grads)
    ctx.save_for_backward(*grads, *lrs, *d_params)


def _metasgd_bwd_backward(ctx, a_g, a_a):
    saved, n = ctx.saved_tensors, ctx.n
    lists = [list(saved[k * n:(k + 1) * n]) for k in range(3)]
    fn = lambda g, a, dp, lt: inner_metasgd_vjp_reference(g, a, dp)  # noqa: E731
    (gg, ga, gdp), _ = _double_backward(fn, lists, None, (), [a_g, a_a])
    return gg, ga, gdp


_inner_metasgd_backward_op.register_autograd(_metasgd_bwd_backward,
                                             setup_context=_metasgd_bwd_setup)


def _adam_bwd_setup(ctx, inputs, output):
    (grads, ms, vs, d_p, d_m, d_v, step, lr, lr_t, beta1, beta2, eps) = inputs
    ctx.lens = [len(x) for x in (grads, ms, vs, d_p, d_m, d_v)]  # d_m, d_v may be []
    ctx.has_lr = lr_t is not None
    ctx.scalars = (step, lr, beta1, beta2, eps)
    ctx.save_for_backward(*grads, *ms, *vs, *d_p, *d_m, *d_v,
                          *([lr_t] if lr_t is not None else []))


def _adam_bwd_backward(ctx, a_g, a_m, a_v, a_lr):
    saved, lists, k = ctx.saved_tensors, [], 0
    for length in ctx.lens:
        lists.append(list(saved[k:k + length]))
        k += length
    lr_t = saved[k] if ctx.has_lr else None
    step, lr, beta1, beta2, eps = ctx.scalars
    warn_once((BWD_ADAM, "double"),
              "pyoptk::inner_adam: the double backward (gradients of the fused backward) "
              "runs autograd over the PyTorch reference VJP, not a fused kernel.", stacklevel=2)

    def fn(g, m, v, dp, dm, dv, lt):
        return inner_adam_vjp_reference(g, m, v, dp, dm, dv, step, lr, lt, beta1, beta2, eps)

    grads_in, glr = _double_backward(fn, lists, lr_t, (),
                                     [a_g, a_m, a_v, a_lr if lr_t is not None else None])
    return (*grads_in, None, None, glr, None, None, None)


_inner_adam_backward_op.register_autograd(_adam_bwd_backward, setup_context=_adam_bwd_setup)


# ----------------------------------------------------------------------------------
# Public functions.
# ----------------------------------------------------------------------------------
def _check_lists(op: str, lists, *, same_dtype=(), state_keys=()):
    """Parallel tensor lists (:func:`~pyoptk.ops._validation.check_tensor_lists`) with
    float64 params allowed and state in the compute dtype (float32, float64 for
    float64 params)."""
    return check_tensor_lists(op, lists, same_dtype=same_dtype, state_keys=state_keys,
                              param_dtypes=_DTYPES, state_dtype=compute_dtype)
    device, dtype = params[0].device, params[0].dtype
    if dtype not in _DTYPES:
        raise TypeError(f"{op}: {lead} must be float32, float64, bfloat16 or float16, got "
                        f"{dtype}")
    sdt = compute_dtype(dtype)
    for name, ts in out.items():
        for i, t in enumerate(ts):
            where = f"{op}: {name}[{i}]"
            if t.layout != torch.strided:
                raise ValueError(f"{where} is {t.layout}; sparse tensors are not supported")
            if t.device != device:
                raise ValueError(f"{where} is on {t.device} but {lead}[0] is on {device}; "
                                 "all tensors of one call must be on one device")
            if t.shape != params[i].shape:
                raise ValueError(f"{where} has shape {tuple(t.shape)}, expected "
                                 f"{tuple(params[i].shape)}")
            if not t.is_contiguous():
                raise ValueError(f"{where} is not contiguous; fused kernels need contiguous "
                                 "tensors (call .contiguous())")
            if name == lead and t.dtype != dtype:
                raise TypeError(f"{where} has dtype {t.dtype} but {lead}[0] has {dtype}; one "
                                "call takes one parameter dtype")
            if name in same_dtype and t.dtype != dtype:
                raise TypeError(f"{where} has dtype {t.dtype} but {lead}[0] has {dtype}")
            if name in state_keys and t.dtype != sdt:
                raise TypeError(f"{where} must be {sdt} for {dtype} params, got {t.dtype}")
    return out


def _check_lr(op: str, lr, params: List[Tensor]) -> Tuple[float, Optional[Tensor]]:
    """(float, None) or (0.0, lr tensor as a one-element tensor of the compute dtype,
    cast differentiably)."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"{op}: lr tensor must have one element, got shape "
                             f"{tuple(lr.shape)}")
        if not lr.is_floating_point():
            raise TypeError(f"{op}: lr tensor must be floating point, got {lr.dtype}")
        if params and lr.device != params[0].device:
            raise ValueError(f"{op}: lr tensor is on {lr.device}, expected {params[0].device}")
        ct = compute_dtype(params[0].dtype) if params else torch.float32
        if lr.dim() == 0 and lr.dtype == ct:
            # Passed as is (no view): under torch.compile the op then saves the user's
            # tensor itself, so a double backward reaches torch's "does not support
            # double backward" error instead of a disconnected graph.
            return 0.0, lr
        return 0.0, lr.reshape(()).to(ct)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"{op}: lr must be a float or a tensor, got {type(lr).__name__}")
    if not math.isfinite(lr):
        raise ValueError(f"{op}: Invalid learning rate: {lr}")
    return float(lr), None


@annotate("inner_sgd")
def inner_sgd(params: Sequence[Tensor], grads: Sequence[Tensor], lr: LrArg) -> List[Tensor]:
    """One differentiable SGD step: new tensors ``p - lr * g``.

    Args:
        params: tensors (float32, float64, bfloat16 or float16; one dtype per call).
        grads: same shapes and dtype (typically from ``autograd.grad(...,
            create_graph=True)``).
        lr: a float, or a one-element floating tensor (differentiable; cast to the
            compute dtype: float32, float64 for float64 params).

    Differentiable with respect to params, grads and a tensor lr; math in fp32 (fp64).
    """
    op = OP_SGD
    lists = _check_lists(op, {"params": params, "grads": grads}, same_dtype=("grads",))
    params, grads = lists["params"], lists["grads"]
    lr_f, lr_t = _check_lr(op, lr, params)
    if not params:
        return []
    return list(torch.ops.pyoptk.inner_sgd(params, grads, lr_f, lr_t))


@annotate("inner_metasgd")
def inner_metasgd(params: Sequence[Tensor], grads: Sequence[Tensor],
                  lrs: Sequence[Tensor]) -> List[Tensor]:
    """One differentiable Meta-SGD step (Li et al. 2017, https://arxiv.org/abs/1707.09835):
    new tensors ``p - lr ⊙ g`` with learned per-element ``lrs`` (the params' shapes, in
    the compute dtype: float32, or float64 for float64 params). Differentiable with
    respect to params, grads and lrs."""
    op = OP_METASGD
    lists = _check_lists(op, {"params": params, "grads": grads, "lrs": lrs},
                         same_dtype=("grads",), state_keys=("lrs",))
    if not lists["params"]:
        return []
    return list(torch.ops.pyoptk.inner_metasgd(lists["params"], lists["grads"], lists["lrs"]))


@annotate("inner_adam")
def inner_adam(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avg: Sequence[Tensor],
               exp_avg_sq: Sequence[Tensor], step: int, lr: LrArg, beta1: float = 0.9,
               beta2: float = 0.999, eps: float = 1e-8
               ) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
    """One differentiable, bias-corrected Adam step (``torch.optim.Adam``'s forward).

    Args:
        params, grads: as :func:`inner_sgd`.
        exp_avg, exp_avg_sq: first and second moments before the step (the compute
            dtype: float32, float64 for float64 params); zeros for the first step.
        step: this update's step number (1 for the first), for the bias corrections.
        lr: float or one-element tensor (differentiable).
        beta1, beta2, eps: as ``torch.optim.Adam``.

    Returns ``(new_params, new_exp_avg, new_exp_avg_sq)``, differentiable with respect
    to params, grads, both moments and a tensor lr. The derivative of ``sqrt(v')`` is
    taken as 0 at exactly ``v' == 0`` (see :func:`safe_sqrt`), so zero gradients on
    zero moments give finite gradients.
    """
    op = OP_ADAM
    lists = _check_lists(op, {"params": params, "grads": grads, "exp_avg": exp_avg,
                              "exp_avg_sq": exp_avg_sq},
                         same_dtype=("grads",), state_keys=("exp_avg", "exp_avg_sq"))
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"{op}: step must be an int >= 1, got {step!r}")
    for i, b in enumerate((beta1, beta2)):
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= b < 1.0:
            raise ValueError(f"{op}: Invalid beta parameter at index {i}: {b!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0.0:
        raise ValueError(f"{op}: Invalid epsilon value: {eps!r}")
    ps = lists["params"]
    lr_f, lr_t = _check_lr(op, lr, ps)
    if not ps:
        return [], [], []
    out = torch.ops.pyoptk.inner_adam(ps, lists["grads"], lists["exp_avg"], lists["exp_avg_sq"],
                                      int(step), lr_f, lr_t, float(beta1), float(beta2),
                                      float(eps))
    return tuple(list(o) for o in out)
