"""Small @triton.jit helpers shared by the kernel families (private).

Precision conventions of the package: element math in fp32; divisions and square
roots of the update rounded as IEEE (``div_rn``/``sqrt_rn``, like torch's kernels,
instead of Triton's default approximate fp32 ``/`` and ``sqrt``); per-tensor scalars
that the reference computes in double (bias corrections, ``1 - lr*wd``) computed in
fp64 and rounded once to fp32.
"""

import triton
import triton.language as tl


@triton.jit
def f64(hi, lo):
    """Rebuild an fp64 host value passed as two fp32 halves (see ``split_f64``).
    ``tl.cast`` also turns the interpreter's plain Python floats into fp32 scalars, so
    both modes round the same way."""
    return tl.cast(hi, tl.float32).to(tl.float64) + tl.cast(lo, tl.float32).to(tl.float64)


@triton.jit
def bias_correction(beta_hi, beta_lo, step):
    """``1 - beta**step`` in fp64, as the reference (``1 - torch.pow(beta, step)`` in
    double). ``pow`` as ``exp(step * log(beta))``: fp64 exp/log lower to libdevice on
    GPUs and to numpy in the interpreter (libdevice.pow has no interpreter version).
    beta == 0 gives log = -inf, exp(-inf) = 0, as pow."""
    beta = f64(beta_hi, beta_lo)
    return 1.0 - tl.exp(step * tl.log(beta))


@triton.jit
def lerp(a, b, w, FROM_END: tl.constexpr):
    """``torch.lerp(a, b, w)`` with torch's two forms: ``a + w*(b-a)`` for |w| < 0.5,
    ``b - (b-a)*(1-w)`` otherwise (the host picks ``FROM_END`` from w)."""
    if FROM_END:
        return b - (b - a) * (1.0 - w)
    else:
        return a + w * (b - a)


@triton.jit
def max_nan(a, b):
    """max that propagates NaN (torch's max/maximum); Triton's default max may drop
    NaN operands (maxnum)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def load_lr(lr_ptr, lr_hi, lr_lo, HAS_LR_T: tl.constexpr):
    """The learning rate in fp64: the one-element fp32 tensor when given (read on
    device, no host sync), else the float argument."""
    if HAS_LR_T:
        lr = tl.load(lr_ptr).to(tl.float64)
    else:
        lr = f64(lr_hi, lr_lo)
    return lr
