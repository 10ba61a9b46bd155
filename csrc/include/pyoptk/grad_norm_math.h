// Gradient norm / clipping math (one copy for the CPU loops and the CUDA kernels).
//
// Same result as torch.nn.utils.clip_grad_norm_ (foreach):
//   total = sqrt(sum g^2)   (norm_type 2)   or   max |g|   (norm_type inf)
//   coef  = min(max_norm / (total + 1e-6), 1) ; g = g * coef   (always, even coef == 1)
// Partial results per chunk are combined in a fixed order (deterministic).
#pragma once

#include <cmath>

#include "pyoptk/common.h"

namespace pyoptk {

// Contribution of one element to a partial: g^2 (2-norm) or |g| (inf-norm).
PYOPTK_HD float norm_sq_term(float g) { return g * g; }
PYOPTK_HD float norm_abs_term(float g) { return fabsf(g); }

// Combining two partials of the inf-norm: NaN-propagating max (torch's max-norm of a
// NaN gradient is NaN).
PYOPTK_HD float norm_max_combine(float a, float b) { return nan_max(a, b); }
PYOPTK_HD double norm_max_combine(double a, double b) { return (a > b || a != a) ? a : b; }

// The total norm from the combined partial (sum of squares, or max |g|).
PYOPTK_HD float norm_finish(double combined, bool inf_norm) {
  return inf_norm ? static_cast<float>(combined) : static_cast<float>(sqrt(combined));
}

// Clip coefficient from the total (fp32, as torch: max_norm / (total + 1e-6), clamped
// at 1; NaN total gives NaN).
PYOPTK_HD float clip_coef(float total, float max_norm) {
  const float c = max_norm / (total + 1e-6f);
  return c > 1.0f ? 1.0f : c;
}

PYOPTK_HD float clip_apply(float g, float coef) { return g * coef; }

}  // namespace pyoptk
