"""Differentiable fused learned-MLP step: ``torch.ops.pyoptk.mlp_step``.

Layout (as every op file): reference → backend launchers → op registration → public
function. The op is the *functional* form of :func:`pyoptk.ops.mlp_update_`: it returns
the new ``(params, moms, rmss, fac_rows, fac_cols, steps)`` as new tensors, never
modifies its inputs, and has a fused backward, so meta-training can differentiate
through optimizer steps without autograd storing the step's intermediates (39 feature
planes, two hidden activations and a dozen temporaries per element).

* **Forward**: clones the state and runs the in-place ``torch.ops.pyoptk.mlp_update_``
  on the clones, so it gets whatever fused forward backend is registered. float64
  inputs (gradcheck) run the reference :func:`~pyoptk.ops.mlp_update.mlp_update_functional`.
* **Backward** (``register_autograd``): ``setup_context`` saves only the inputs; the
  backward *recomputes* the forward per element. Its backends are registered as the op
  ``"mlp_step_backward"`` of :mod:`pyoptk._backend`:

  - ``cpu``: the fused native kernel ``pyoptk._C.mlp_step_grad_cpu``
    (``csrc/cpu/mlp_step_grad.cpp``; the recomputed forward is the forward kernel's own
    ``csrc/include/pyoptk/mlp_update_math.h``, the VJPs are in
    ``csrc/include/pyoptk/mlp_step_grad_math.h``), float32 and float64 (so float64 ``gradcheck`` exercises the kernel itself). Three
    passes over the elements: the forward's statistics; B1 (features, MLP, backprop
    through the MLP, per-chunk weight-gradient partials summed in a fixed order, and
    the per-tensor / per-row / per-column reductions of the normalization and factored
    terms); B2 (the terms coming back through those reductions).
  - ``triton``: the fused Triton kernels of ``kernels/mlp_step_grad.py`` (the ``auto``
    choice on CUDA; CPU tensors under ``TRITON_INTERPRET=1`` when forced with
    ``use_backend("triton")``): the same passes as the native kernel on the Triton
    forward's tiles, seven launches over all tensors, the MLP's backward through
    ``tl.dot`` (the forward's precision: "tf32" on GPUs, "ieee" in the interpreter),
    weight gradients accumulated per slot of tiles and summed in slot order. Takes what
    the Triton forward takes (two hidden layers <= 128 wide, <= 128 per-element
    features, fp32/bf16/fp16 params).
  - ``torch``: autograd over the reference :func:`~pyoptk.ops.mlp_update.mlp_update_one`
    (devices without a fused backward — CUDA without Triton — and configurations the
    kernels decline; a one-time :class:`~pyoptk.SlowPathWarning` says so).

Gradients flow to params, grads, moms, rmss, fac_rows, fac_cols, weights, decays and a
tensor ``hp.lr_t``; ``steps`` get none. A tensor skipped for a non-finite gradient
passes its cotangents straight through (identity for the parameter and its state, zero
for its gradient), exactly as autograd through the reference's ``torch.where``.

Lists must be ``None``-free (the functional :func:`pyoptk.learned.update` filters
``grads[i] is None`` before calling the op).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from pyoptk._backend import (
    backend_unavailable_reason, get_backend, implementation, register_backend, use_backend,
    warn_once)
from pyoptk._native import native
from pyoptk._nvtx import annotate
from pyoptk.ops import _native_call as nc
from pyoptk.ops._eager import _direct_ok
from pyoptk.ops._validation import check_list, check_tensor
from pyoptk.ops.mlp_update import (
    MLPUpdateHyper, _hyper, _run_backend, check_step_lists, is_factored, matrix_shape,
    mlp_update_functional, mlp_update_one, native_mlp_config, rule_op_args)

OP = "mlp_step"
BACKWARD_OP = "mlp_step_backward"

__all__ = ["mlp_step", "mlp_step_reference", "mlp_step_backward_reference", "backward_backend"]

_ROLES = ("params", "grads", "moms", "rmss", "fac_rows", "fac_cols", "steps")
_OUT_ROLES = ("params", "moms", "rmss", "fac_rows", "fac_cols", "steps")


# ----------------------------------------------------------------------------------
# Reference: the forward is the functional step; the backward is autograd over it.
# ----------------------------------------------------------------------------------
def mlp_step_reference(params, grads, moms, rmss, fac_rows, fac_cols, steps, weights, decays,
                       hp: MLPUpdateHyper) -> Tuple[List[Tensor], ...]:
    """The specification of ``mlp_step``'s forward: :func:`mlp_update_functional`
    (differentiable; autograd through it is the specification of the backward)."""
    return mlp_update_functional(params, grads, moms, rmss, fac_rows, fac_cols, steps,
                                 weights, decays, hp)


def mlp_step_backward_reference(inputs, weights, decays, hp: MLPUpdateHyper, cotangents):
    """Input gradients of the step by autograd over :func:`mlp_update_one`, one tensor at
    a time (recomputing the forward; nothing is kept from it).

    ``inputs``: the seven lists (params, grads, moms, rmss, fac_rows, fac_cols, steps);
    ``cotangents``: the five lists of output cotangents (params, moms, rmss, fac_rows,
    fac_cols; zeros where the output was unused). Returns
    ``(d_inputs (six lists), d_weights (list), d_decays, d_lr or None)``."""
    params, grads, moms, rmss, fac_rows, fac_cols, steps = inputs
    lr_t = hp.lr_t
    d_w = [torch.zeros_like(w) for w in weights]
    d_dec = torch.zeros_like(decays)
    d_lr = torch.zeros_like(lr_t) if lr_t is not None else None
    outs: List[List[Tensor]] = [[] for _ in range(6)]
    ts = torch.tensor(hp.timescales, dtype=torch.promote_types(params[0].dtype, torch.float32),
                      device=params[0].device) if params else None
    with torch.enable_grad():
        for i in range(len(params)):
            leaves = [t.detach().requires_grad_(True) for t in
                      (params[i], grads[i], moms[i], rmss[i], fac_rows[i], fac_cols[i])]
            ws = [w.detach().requires_grad_(True) for w in weights]
            dec = decays.detach().requires_grad_(True)
            lr = lr_t.detach().requires_grad_(True) if lr_t is not None else None
            hp_i = _replace_lr(hp, lr)
            res = mlp_update_one(*leaves, steps[i], ws, dec, hp_i, ts)
            outs_i = [res[k] for k in range(5)]
            cts = [c[i] for c in cotangents]
            pairs = [(o, c) for o, c in zip(outs_i, cts) if o.requires_grad]
            wrt = leaves + ws + [dec] + ([lr] if lr is not None else [])
            if pairs:
                gs = torch.autograd.grad([o for o, _ in pairs], wrt, [c for _, c in pairs],
                                         allow_unused=True)
            else:
                gs = [None] * len(wrt)
            gs = [torch.zeros_like(x) if gx is None else gx for x, gx in zip(wrt, gs)]
            for k in range(6):
                outs[k].append(gs[k])
            for k in range(len(ws)):
                d_w[k] += gs[6 + k]
            d_dec += gs[6 + len(ws)]
            if lr is not None:
                d_lr += gs[7 + len(ws)]
    return tuple(outs), d_w, d_dec, d_lr


def _replace_lr(hp: MLPUpdateHyper, lr_t: Optional[Tensor]) -> MLPUpdateHyper:
    return _hyper(hp.n_mom, hp.n_rms, hp.n_fac, hp.fac_mom_index, hp.log_sign_k,
                  hp.timescales, hp.eps, hp.norm_eps, hp.fac_eps, hp.exp_mult, hp.step_mult,
                  hp.lr, lr_t, hp.weight_decay)


register_backend(BACKWARD_OP, "torch")(mlp_step_backward_reference)


# ----------------------------------------------------------------------------------
# Backend launchers (backward).
# ----------------------------------------------------------------------------------
MAX_WIDTH = 128  # widest hidden layer the native kernel takes (its block buffers)
MAX_MOM, MAX_RMS, MAX_FAC = 8, 4, 8  # kMsgMax* in csrc/include/pyoptk/mlp_step_grad_math.h


def native_decline_reason(params: Sequence[Tensor], weights: Sequence[Tensor],
                          hp: MLPUpdateHyper) -> Optional[str]:
    """Why the native CPU backward cannot run this call, or None."""
    if any(w.shape[1] > MAX_WIDTH for w in weights[0::2]):
        return f"a layer wider than {MAX_WIDTH}"
    if hp.n_mom > MAX_MOM or hp.n_rms > MAX_RMS or hp.n_fac > MAX_FAC:
        return (f"more than {MAX_MOM} momentum, {MAX_RMS} RMS or {MAX_FAC} factored decays "
                f"(got {hp.n_mom}, {hp.n_rms}, {hp.n_fac})")
    if params and params[0].dtype not in (torch.float32, torch.float64, torch.bfloat16,
                                          torch.float16):
        return f"param dtype {params[0].dtype}"
    return None


@register_backend(BACKWARD_OP, "cpu")
def _mlp_step_backward_cpu(inputs, weights, decays, hp: MLPUpdateHyper, cotangents):
    return _native_backward(inputs, weights, decays, hp, cotangents)


_ALIGN = 16  # elements: scratch / zero slices start on 64-byte boundaries


def _native_backward(inputs, weights, decays, hp: MLPUpdateHyper, cotangents,
                     need: Optional[Sequence[bool]] = None):
    """The native kernel's input gradients (the ``"cpu"`` backend of
    ``mlp_step_backward``). ``cotangents``: the five lists of output cotangents, where
    an entry may be None (a zero cotangent: the kernel then reads one shared zero
    buffer). ``need`` (default all): for each of the eight gradient groups (params,
    grads, moms, rmss, fac_rows, fac_cols, weights, decays) whether it is wanted; the
    kernel writes the others into one scratch buffer and they come back as None (lists
    of None). Values do not depend on either: the kernel reads cotangents and never
    reads back another group's gradient."""
    params, grads, moms, rmss, fac_rows, fac_cols, steps = inputs
    pdtype = params[0].dtype
    ct = torch.promote_types(pdtype, torch.float32)
    isz = 8 if ct == torch.float64 else 4
    # bf16/fp16 params: the reference casts p and g to fp32 first (and the new param
    # back), so the backward runs on fp32 copies and casts the gradients back.
    if pdtype != ct:
        p32, g32 = [t.to(ct) for t in params], [t.to(ct) for t in grads]
    else:
        p32, g32 = params, grads
    # Cotangent pointers; None -> the shared zero buffer (as large as the largest).
    ct_ptrs, ct_keep, zero_n = [], [], 0
    for lst in cotangents:
        ptrs = []
        for c in lst:
            if c is None:
                ptrs.append(None)
            else:
                if c.dtype != ct:
                    c = c.to(ct)
                if not c.is_contiguous():  # (e.g. the expanded cotangent of a sum)
                    c = c.contiguous()
                ct_keep.append(c)
                ptrs.append(c.data_ptr())
        ct_ptrs.append(ptrs)
    refs = (params, moms, rmss, fac_rows, fac_cols)
    for ptrs, ref in zip(ct_ptrs, refs):
        for q, r in zip(ptrs, ref):
            if q is None and r.numel() > zero_n:
                zero_n = r.numel()
    if zero_n:
        zeros = torch.zeros(zero_n, dtype=ct, device=decays.device)
        zp = zeros.data_ptr()
        ct_ptrs = [[zp if q is None else q for q in ptrs] for ptrs in ct_ptrs]
    elif any(q is None for ptrs in ct_ptrs for q in ptrs):  # only empty tensors missing
        ct_ptrs = [[0 if q is None else q for q in ptrs] for ptrs in ct_ptrs]
    # Gradient outputs: fresh tensors for the wanted groups, scratch for the others.
    groups = (p32, g32, moms, rmss, fac_rows, fac_cols, weights, (decays,))
    if need is None:
        outs = [[torch.empty_like(t) for t in lst] for lst in groups]
        out_ptrs = [nc.ptrs(lst) for lst in outs]
    else:
        outs, out_ptrs, pending, off = [], [], [], 0
        for lst, want in zip(groups, need):
            if want:
                o = [torch.empty_like(t) for t in lst]
                outs.append(o)
                out_ptrs.append(nc.ptrs(o))
            else:
                outs.append(None)
                offs = []
                for t in lst:
                    offs.append(off)
                    off += -(-t.numel() // _ALIGN) * _ALIGN
                pending.append((len(out_ptrs), offs))
                out_ptrs.append(None)
        if pending:
            scratch = torch.empty(max(off, 1), dtype=ct, device=decays.device)
            base = scratch.data_ptr()
            for k, offs in pending:
                out_ptrs[k] = [base + o * isz for o in offs]
    d_lr = torch.empty((), dtype=ct, device=decays.device) if hp.lr_t is not None else None
    lr_t = hp.lr_t
    if lr_t is not None and (lr_t.dtype != ct or not lr_t.is_contiguous()):
        lr_t = lr_t.to(ct).contiguous()
    rows, cols, fac = [], [], []
    for p in params:
        f = is_factored(p.shape)
        r, c = matrix_shape(p.shape) if f else (1, p.numel())
        rows.append(r)
        cols.append(c)
        fac.append(f)
    cfg = native_mlp_config(hp, lr_t)
    native().mlp_step_grad_cpu(
        nc.ptrs(p32), nc.ptrs(g32), nc.ptrs(moms), nc.ptrs(rmss), nc.ptrs(fac_rows),
        nc.ptrs(fac_cols), nc.ptrs(steps), *ct_ptrs, *out_ptrs[:6],
        nc.numels(params), rows, cols, fac,
        nc.ptrs(weights), [w.shape[0] for w in weights[0::2]] + [2], decays.data_ptr(),
        out_ptrs[6], out_ptrs[7][0], 0 if d_lr is None else d_lr.data_ptr(), cfg,
        ct == torch.float64)
    if pdtype != ct:
        for k in (0, 1):
            if outs[k] is not None:
                outs[k] = [o.to(pdtype) for o in outs[k]]
    if d_lr is not None:
        d_lr = d_lr.to(hp.lr_t.dtype).reshape(hp.lr_t.shape)
    d_in = tuple(o if o is not None else [None] * len(params) for o in outs[:6])
    d_dec = outs[7][0] if outs[7] is not None else None
    return d_in, outs[6], d_dec, d_lr


@register_backend(BACKWARD_OP, "triton")
def _mlp_step_backward_triton(inputs, weights, decays, hp: MLPUpdateHyper, cotangents):
    """The Triton kernels (``kernels/mlp_step_grad.py``). ``cotangents`` entries may be
    None (zero); NotImplementedError (before any launch) for what they decline."""
    from pyoptk.kernels import mlp_step_grad as kernels

    return kernels.mlp_step_backward(inputs, cotangents, weights, decays, hp)


def triton_decline_reason(params: Sequence[Tensor], weights: Sequence[Tensor],
                          hp: MLPUpdateHyper) -> Optional[str]:
    """Why the Triton backward cannot run this call, or None."""
    from pyoptk.kernels import mlp_step_grad as kernels

    try:
        kernels.check_supported(weights, hp, params[0].dtype if params else None)
    except NotImplementedError as exc:
        return str(exc)
    return None


# The fused backwards: name in messages, why one declines a call.
_FUSED = {_mlp_step_backward_cpu: ("native CPU", native_decline_reason),
          _mlp_step_backward_triton: ("Triton", triton_decline_reason)}


def _choose_backward(inputs, weights, hp) -> Callable:
    """The backward implementation for this call (warning once when it is the slow
    reference): the fused kernel of the device's backend where it runs (native on CPU,
    Triton on CUDA), else autograd over the reference."""
    device = inputs[0][0].device
    chosen = get_backend()
    if chosen == "cuda":
        # A forced forward backend without a backward of its own: pick one.
        with use_backend("auto"):
            fn = implementation(BACKWARD_OP, device.type)
    else:
        fn = implementation(BACKWARD_OP, device.type)
    if fn in _FUSED:
        kernel, decline = _FUSED[fn]
        why = decline(inputs[0], weights, hp)
        if why is None:
            return fn
        warn_once((BACKWARD_OP, "declined", kernel, why),
                  f"pyoptk::{BACKWARD_OP}: the {kernel} backward does not support {why}; "
                  "autograd over the PyTorch reference runs instead (slower, more memory).",
                  stacklevel=2)
        return mlp_step_backward_reference
    if chosen == "auto" and device.type != "cpu":
        warn_once((BACKWARD_OP, "device", device.type),
                  f"pyoptk::{BACKWARD_OP} on {device.type} runs autograd over the PyTorch "
                  f"reference (no fused backward for this device: "
                  f"{backend_unavailable_reason('triton', device.type)}): slower and more "
                  "memory than the fused kernels.", stacklevel=2)
    return fn


def backward_backend(inputs, weights, hp: MLPUpdateHyper) -> str:
    """Which backward a call with these inputs (the seven lists, non-empty) runs:
    ``"cpu"`` (native kernel), ``"triton"`` or ``"torch"`` (autograd over the reference)."""
    fn = _choose_backward(inputs, weights, hp)
    return {_mlp_step_backward_cpu: "cpu", _mlp_step_backward_triton: "triton"}.get(fn, "torch")


# ----------------------------------------------------------------------------------
# Op registration.
# ----------------------------------------------------------------------------------
@torch.library.custom_op("pyoptk::mlp_step", mutates_args=())
def _mlp_step_op(params: List[Tensor], grads: List[Tensor], moms: List[Tensor],
                 rmss: List[Tensor], fac_rows: List[Tensor], fac_cols: List[Tensor],
                 steps: List[Tensor], weights: List[Tensor], decays: Tensor, n_mom: int,
                 n_rms: int, n_fac: int, fac_mom_index: int, log_sign_k: float,
                 timescales: List[float], eps: float, norm_eps: float, fac_eps: float,
                 exp_mult: float, step_mult: float, lr: float, lr_t: Optional[Tensor],
                 weight_decay: float
                 ) -> Tuple[List[Tensor], List[Tensor], List[Tensor], List[Tensor],
                            List[Tensor], List[Tensor]]:
    hp = _hyper(n_mom, n_rms, n_fac, fac_mom_index, log_sign_k, timescales, eps, norm_eps,
                fac_eps, exp_mult, step_mult, lr, lr_t, weight_decay)
    if params and params[0].dtype == torch.float64:
        # float64 (gradcheck): the reference; the fused forwards are float32 only.
        new = mlp_update_functional(params, grads, moms, rmss, fac_rows, fac_cols, steps,
                                    weights, decays, hp)
        return tuple([t.clone() for t in lst] for lst in new)
    out = [[t.clone() for t in lst] for lst in (params, moms, rmss, fac_rows, fac_cols, steps)]
    if params:
        torch.ops.pyoptk.mlp_update_(
            out[0], grads, out[1], out[2], out[3], out[4], out[5], weights, decays, n_mom,
            n_rms, n_fac, fac_mom_index, log_sign_k, timescales, eps, norm_eps, fac_eps,
            exp_mult, step_mult, lr, lr_t, weight_decay)
    return tuple(out)


@_mlp_step_op.register_fake
def _(params, grads, moms, rmss, fac_rows, fac_cols, steps, weights, decays, n_mom, n_rms,
      n_fac, fac_mom_index, log_sign_k, timescales, eps, norm_eps, fac_eps, exp_mult,
      step_mult, lr, lr_t, weight_decay):
    return tuple([torch.empty_like(t) for t in lst]
                 for lst in (params, moms, rmss, fac_rows, fac_cols, steps))


@torch.library.custom_op("pyoptk::mlp_step_backward", mutates_args=())
def _mlp_step_backward_op(params: List[Tensor], grads: List[Tensor], moms: List[Tensor],
                          rmss: List[Tensor], fac_rows: List[Tensor], fac_cols: List[Tensor],
                          steps: List[Tensor], d_params: List[Tensor], d_moms: List[Tensor],
                          d_rmss: List[Tensor], d_fac_rows: List[Tensor],
                          d_fac_cols: List[Tensor], weights: List[Tensor], decays: Tensor,
                          n_mom: int, n_rms: int, n_fac: int, fac_mom_index: int,
                          log_sign_k: float, timescales: List[float], eps: float,
                          norm_eps: float, fac_eps: float, exp_mult: float, step_mult: float,
                          lr: float, lr_t: Optional[Tensor], weight_decay: float
                          ) -> Tuple[List[Tensor], List[Tensor], List[Tensor], List[Tensor],
                                     List[Tensor], List[Tensor], List[Tensor], Tensor, Tensor]:
    """The step's input gradients from its output cotangents (opaque to tracing, so the
    forward op's backward can be captured by AOT autograd / torch.compile). Returns the
    gradients of params, grads, moms, rmss, fac_rows, fac_cols, weights, decays and lr_t
    (an empty tensor when ``lr_t`` is None)."""
    hp = _hyper(n_mom, n_rms, n_fac, fac_mom_index, log_sign_k, timescales, eps, norm_eps,
                fac_eps, exp_mult, step_mult, lr, lr_t, weight_decay)
    inputs = [params, grads, moms, rmss, fac_rows, fac_cols, steps]
    cts = [d_params, d_moms, d_rmss, d_fac_rows, d_fac_cols]
    fn = _choose_backward(inputs, weights, hp) if params else mlp_step_backward_reference
    if fn not in _FUSED:
        # Autograd does not run below the Autograd dispatch key, where this runs: the
        # reference backward is called by the autograd formula itself (_backward).
        raise RuntimeError("pyoptk::mlp_step_backward runs the fused kernels only; the "
                           "reference backward is pyoptk.ops.mlp_step.mlp_step_backward_reference")
    d_in, d_w, d_dec, d_lr = fn(inputs, weights, decays, hp, cts)
    if d_lr is None:
        d_lr = decays.new_zeros(0)
    return (*d_in, d_w, d_dec, d_lr)


@_mlp_step_backward_op.register_fake
def _(params, grads, moms, rmss, fac_rows, fac_cols, steps, d_params, d_moms, d_rmss,
      d_fac_rows, d_fac_cols, weights, decays, n_mom, n_rms, n_fac, fac_mom_index, log_sign_k,
      timescales, eps, norm_eps, fac_eps, exp_mult, step_mult, lr, lr_t, weight_decay):
    d_in = [[torch.empty_like(t) for t in lst]
            for lst in (params, grads, moms, rmss, fac_rows, fac_cols)]
    d_lr = torch.empty_like(lr_t) if lr_t is not None else decays.new_empty(0)
    return (*d_in, [torch.empty_like(w) for w in weights], torch.empty_like(decays), d_lr)


def _setup_context(ctx, inputs, output):
    (params, grads, moms, rmss, fac_rows, fac_cols, steps, weights, decays, *scalars) = inputs
    lr_t = scalars[12]
    ctx.n = len(params)
    ctx.n_w = len(weights)
    ctx.has_lr = lr_t is not None
    ctx.scalars = list(scalars[:12]) + [None] + list(scalars[13:])
    saved = [*params, *grads, *moms, *rmss, *fac_rows, *fac_cols, *steps, *weights, decays]
    if lr_t is not None:
        saved.append(lr_t)
    ctx.save_for_backward(*saved)  # inputs only: the backward recomputes the rest


def _backward(ctx, d_params, d_moms, d_rmss, d_fac_rows, d_fac_cols, d_steps):
    saved = ctx.saved_tensors
    n, n_w = ctx.n, ctx.n_w
    lists = [list(saved[k * n:(k + 1) * n]) for k in range(7)]
    weights = list(saved[7 * n:7 * n + n_w])
    decays = saved[7 * n + n_w]
    lr_t = saved[7 * n + n_w + 1] if ctx.has_lr else None
    s = list(ctx.scalars)
    s[12] = lr_t
    hp = _hyper(*s)
    tail = [None] * 12  # n_mom … lr; an empty timescales list is a (leafless) list node
    tail[5] = [] if len(s[5]) == 0 else None
    if n == 0:
        return ([], [], [], [], [], [], [], [torch.zeros_like(w) for w in weights],
                torch.zeros_like(decays), *tail, None if lr_t is None else
                torch.zeros_like(lr_t), None)
    outs_ref = (lists[0], lists[2], lists[3], lists[4], lists[5])
    cts = []
    for lst, ref in zip((d_params, d_moms, d_rmss, d_fac_rows, d_fac_cols), outs_ref):
        lst = list(lst) if lst is not None else [None] * n
        cts.append([torch.zeros_like(r) if c is None else c for c, r in zip(lst, ref)])
    if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
        d_in, d_w, d_dec, d_lr = _backward_differentiable(lists, weights, decays, hp, cts)
    elif _choose_backward(lists, weights, hp) in _FUSED:
        res = torch.ops.pyoptk.mlp_step_backward(*lists, *cts, weights, decays, *s)
        d_in, d_w, d_dec = res[:6], res[6], res[7]
        d_lr = res[8] if lr_t is not None else None
    else:
        d_in, d_w, d_dec, d_lr = mlp_step_backward_reference(lists, weights, decays, hp, cts)
    return (*d_in, [None] * n, d_w, d_dec, *tail, d_lr, None)


def _backward_differentiable(lists, weights, decays, hp, cts):
    """Autograd over the reference with ``create_graph=True``: the fused kernel's
    results are not differentiable, so higher-order gradients take this path.

    The forward is recomputed on aliases (``view_as``) of the inputs, so the gradient
    with respect to each input is its *local* partial: an input that itself depends on
    another (a param produced from the weights by the previous step) does not also pick
    up the path through that dependency, which autograd adds once, upstream."""
    alias = lambda t: t.view_as(t) if t.requires_grad else t  # noqa: E731
    lists = [[alias(t) for t in lst] for lst in lists[:6]] + [lists[6]]
    weights = [alias(w) for w in weights]
    decays = alias(decays)
    if hp.lr_t is not None:
        hp = _replace_lr(hp, alias(hp.lr_t))
    outs = mlp_update_functional(*lists, weights, decays, hp)
    flat_out = [t for lst in outs[:5] for t in lst]
    flat_ct = [c for lst in cts for c in lst]
    pairs = [(o, c) for o, c in zip(flat_out, flat_ct) if o.requires_grad]
    wrt = [t for lst in lists[:6] for t in lst] + list(weights) + [decays]
    if hp.lr_t is not None:
        wrt.append(hp.lr_t)
    need = [t for t in wrt if t.requires_grad]
    got = torch.autograd.grad([o for o, _ in pairs], need, [c for _, c in pairs],
                              create_graph=True, allow_unused=True) if pairs and need else []
    got = iter(got)
    gs = [next(got) if t.requires_grad else None for t in wrt]
    gs = [torch.zeros_like(t) if g is None else g for t, g in zip(wrt, gs)]
    n = len(lists[0])
    d_in = tuple(gs[k * n:(k + 1) * n] for k in range(6))
    rest = gs[6 * n:]
    d_w, d_dec = rest[:len(weights)], rest[len(weights)]
    d_lr = rest[len(weights) + 1] if hp.lr_t is not None else None
    return d_in, d_w, d_dec, d_lr


_mlp_step_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------
# Eager fast path: the same forward and backward, without torch.library's Python layers.
# ----------------------------------------------------------------------------------
# In plain eager mode (pyoptk.ops._eager's test: no torch.compile, dispatch modes,
# torch.func transforms or tensor subclasses) ``mlp_step`` runs the forward below
# directly (no grad needed) or through ``_MLPStepFunction``, a torch.autograd.Function
# whose backward calls the native kernel directly. It skips the custom op's autograd
# wrapper, pytree flattening of the list arguments, default filling and redispatch
# (~1 ms per call on a six-tensor task, more than the kernels). The results are the
# op's: the same forward backend on clones of the state, the same kernel, and for
# create_graph=True the same differentiable fallback (``_backward_differentiable``).
def _forward_impl(params, grads, moms, rmss, fac_rows, fac_cols, steps, weights, decays,
                  hp: MLPUpdateHyper) -> Tuple[List[Tensor], ...]:
    """What the op's kernel computes (its CPU/CUDA kernel, called without dispatch): the
    reference in float64, else the registered forward backend on clones of the state."""
    if params[0].dtype == torch.float64:
        new = mlp_update_functional(params, grads, moms, rmss, fac_rows, fac_cols, steps,
                                    weights, decays, hp)
        return tuple([t.clone() for t in lst] for lst in new)
    out = tuple([t.clone() for t in lst] for lst in (params, moms, rmss, fac_rows, fac_cols,
                                                     steps))
    # the body of pyoptk::mlp_update_'s CPU/CUDA kernel (fresh tensors: no version bump)
    _run_backend(out[0], grads, out[1], out[2], out[3], out[4], out[5], weights, decays, hp)
    return out


class _MLPStepFunction(torch.autograd.Function):
    """``pyoptk::mlp_step`` with its autograd formula, for plain eager mode. Inputs are
    flat: ``n`` tensors each of params, grads, moms, rmss, fac_rows, fac_cols, steps,
    then the weights, decays and (if present) ``hp.lr_t``; outputs flat likewise (six
    lists). ``steps`` outputs are differentiable-looking but get no gradient, as the
    op's."""

    @staticmethod
    def forward(ctx, n: int, n_w: int, hp: MLPUpdateHyper, *flat: Tensor):
        lists = [list(flat[k * n:(k + 1) * n]) for k in range(7)]
        weights = list(flat[7 * n:7 * n + n_w])
        decays = flat[7 * n + n_w]
        out = _forward_impl(*lists, weights, decays, hp)
        ctx.n, ctx.n_w, ctx.hp = n, n_w, hp
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*flat)  # inputs only: the backward recomputes the rest
        return tuple(t for lst in out for t in lst)

    @staticmethod
    def backward(ctx, *d_out):
        n, n_w = ctx.n, ctx.n_w
        saved = ctx.saved_tensors
        lists = [list(saved[k * n:(k + 1) * n]) for k in range(7)]
        weights = list(saved[7 * n:7 * n + n_w])
        decays = saved[7 * n + n_w]
        hp = ctx.hp
        has_lr = hp.lr_t is not None
        if has_lr:
            hp = _replace_lr(hp, saved[7 * n + n_w + 1])
        cts = [list(d_out[k * n:(k + 1) * n]) for k in range(5)]  # steps: no gradient
        nig = ctx.needs_input_grad  # (n, n_w, hp, *flat)
        need = [any(nig[3 + k * n:3 + (k + 1) * n]) for k in range(6)]
        need += [any(nig[3 + 7 * n:3 + 7 * n + n_w]), nig[3 + 7 * n + n_w]]
        fn = None if torch.is_grad_enabled() else _choose_backward(lists, weights, hp)
        if fn is _mlp_step_backward_cpu:
            d_in, d_w, d_dec, d_lr = _native_backward(lists, weights, decays, hp, cts, need)
        elif fn is _mlp_step_backward_triton:
            # (None cotangents are zeros there too; the groups nobody asked for are
            # computed anyway and dropped)
            d_in, d_w, d_dec, d_lr = fn(lists, weights, decays, hp, cts)
            d_in = tuple(g if want else [None] * n for g, want in zip(d_in, need))
            d_w = d_w if need[6] else None
            d_dec = d_dec if need[7] else None
        else:
            # create_graph=True (a differentiable backward) or the reference backward:
            # as the op's formula, with zero cotangents materialized.
            refs = (lists[0], lists[2], lists[3], lists[4], lists[5])
            cts = [[torch.zeros_like(r) if c is None else c for c, r in zip(lst, ref)]
                   for lst, ref in zip(cts, refs)]
            if torch.is_grad_enabled():
                d_in, d_w, d_dec, d_lr = _backward_differentiable(lists, weights, decays,
                                                                  hp, cts)
            else:
                d_in, d_w, d_dec, d_lr = mlp_step_backward_reference(lists, weights, decays,
                                                                     hp, cts)
        grads = [g for lst in d_in for g in lst]
        grads += [None] * n
        grads += list(d_w) if d_w is not None else [None] * n_w
        grads.append(d_dec)
        if has_lr:
            grads.append(d_lr)
        return (None, None, None, *grads)


def _fast_path_ok(lead: Tensor, tensor_lists) -> bool:
    return _direct_ok(lead, tensor_lists)


# ----------------------------------------------------------------------------------
# Public function.
# ----------------------------------------------------------------------------------
_F64 = torch.float64


@annotate("mlp_step")
def mlp_step(params: Sequence[Tensor], grads: Sequence[Tensor], moms: Sequence[Tensor],
             rmss: Sequence[Tensor], fac_rows: Sequence[Tensor], fac_cols: Sequence[Tensor],
             steps: Sequence[Tensor], weights: Sequence[Tensor], decays: Tensor,
             hp: MLPUpdateHyper) -> Tuple[List[Tensor], ...]:
    """One differentiable learned-MLP step over lists of tensors.

    Same arguments as :func:`pyoptk.ops.mlp_update_` (``None``-free lists), but
    functional: returns new lists ``(params, moms, rmss, fac_rows, fac_cols, steps)`` and
    leaves the inputs untouched. Differentiable with respect to params, grads, moms,
    rmss, fac_rows, fac_cols, weights, decays and ``hp.lr_t`` (a one-element tensor),
    with a fused backward that recomputes the step instead of storing it.

    dtypes: params/grads float32, bfloat16 or float16 with float32 state, weights,
    decays and ``lr_t``; or everything float64 (for ``gradcheck``; the forward then runs
    the reference).
    """
    op = OP
    params, grads, moms, rmss, fac_rows, fac_cols = check_step_lists(
        op, params, grads, moms, rmss, fac_rows, fac_cols, weights, decays, hp,
        (torch.float32, torch.bfloat16, torch.float16, _F64),
        lambda dtype: _F64 if dtype == _F64 else torch.float32)
    n = len(params)
    steps = check_list(op, "steps", steps, n)
    if not n:
        return [], [], [], [], [], []
    device = params[0].device
    sdt = _F64 if params[0].dtype == _F64 else torch.float32
    for i, s in enumerate(steps):
        if s.numel() != 1 or s.dtype != sdt:
            raise TypeError(f"{op}: steps[{i}] must be a {sdt} tensor with one element, got "
                            f"{s.dtype} with {s.numel()} elements")
        check_tensor(op, f"steps[{i}]", s, device)
    lr_t = hp.lr_t
    if lr_t is not None:
        if not isinstance(lr_t, Tensor) or lr_t.numel() != 1 or lr_t.dtype != sdt:
            raise TypeError(f"{op}: hp.lr_t must be a {sdt} tensor with one element")
        if lr_t.device != device:
            raise ValueError(f"{op}: hp.lr_t is on {lr_t.device}, expected {device}")
        lr_f = 0.0
    else:
        lr_f = hp.lr
        if isinstance(lr_f, bool) or not isinstance(lr_f, (int, float)) or not lr_f >= 0.0:
            raise ValueError(f"{op}: Invalid learning rate: {lr_f!r}")
        lr_f = float(lr_f)
    weights = list(weights)
    if _fast_path_ok(params[0], (params, grads, moms, rmss, fac_rows, fac_cols, steps,
                                 weights, (decays,), (lr_t,) if lr_t is not None else ())):
        # plain eager mode: no torch.library dispatch (see _MLPStepFunction)
        hp = _hyper(*rule_op_args(hp), lr_f, lr_t, float(hp.weight_decay))
        flat = [*params, *grads, *moms, *rmss, *fac_rows, *fac_cols, *steps, *weights, decays]
        if lr_t is not None:
            flat.append(lr_t)
        if torch.is_grad_enabled() and any(t.requires_grad for t in flat):
            res = _MLPStepFunction.apply(n, len(weights), hp, *flat)
            return tuple(list(res[k * n:(k + 1) * n]) for k in range(6))
        return tuple(_forward_impl(params, grads, moms, rmss, fac_rows, fac_cols, steps,
                                   weights, decays, hp))
    out = torch.ops.pyoptk.mlp_step(
        params, grads, moms, rmss, fac_rows, fac_cols, steps, weights, decays,
        *rule_op_args(hp), lr_f, lr_t, float(hp.weight_decay))
    return tuple(list(o) for o in out)
