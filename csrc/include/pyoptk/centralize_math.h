// Gradient centralization math (Yong et al. 2020), one copy for CPU and CUDA:
// for a grad viewed as [rows, cols]: g[r, :] -= mean(g[r, :]).
// Row sums are accumulated by the caller (double on CPU, fp32 tree on GPU); the mean is
// rounded to fp32 once and subtracted in fp32, as the reference does.
#pragma once

#include "pyoptk/common.h"

namespace pyoptk {

PYOPTK_HD float centralize_mean(double row_sum, int64_t cols) {
  return static_cast<float>(row_sum / static_cast<double>(cols));
}

PYOPTK_HD float centralize_apply(float g, float mean) { return g - mean; }

}  // namespace pyoptk
