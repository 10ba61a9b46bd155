// The C++ entry points behind pyoptk._C (torch-free, pybind11-free).
//
// bindings.cpp validates list lengths, dtype codes and null pointers, converts the
// Python lists and configs, releases the GIL and calls these. They assume valid input
// (see docs/kernel-contract.md); zero-numel tensors are skipped, empty lists are no-ops.
// The *_cuda functions exist only when built with CUDA (PYOPTK_WITH_CUDA).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "pyoptk/adamw_math.h"
#include "pyoptk/lamb_math.h"
#include "pyoptk/mlp_update_math.h"

namespace pyoptk {

using PtrList = std::vector<uintptr_t>;
using SizeList = std::vector<int64_t>;

// Python-visible configuration objects (pyoptk._C.AdamWConfig / LambConfig).
struct AdamWConfig {
  double lr = 1e-3;
  uintptr_t lr_ptr = 0;  // one float32 on the params' device overriding lr, or 0
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;
  bool amsgrad = false;
  bool maximize = false;

  AdamWParams params() const {
    return AdamWParams{lr, reinterpret_cast<const float*>(lr_ptr), beta1, beta2, eps,
                       weight_decay};
  }
};

struct LambConfig {
  double lr = 1e-3;
  uintptr_t lr_ptr = 0;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-6;
  double weight_decay = 0.0;
  bool bias_correction = true;
  bool adam = false;
  double clamp_value = 10.0;
  bool maximize = false;

  LambParams params() const {
    return LambParams{lr, reinterpret_cast<const float*>(lr_ptr), beta1, beta2, eps,
                      weight_decay, bias_correction, adam, clamp_value};
  }
};

// Hyperparameters of one mlp_update_ call (pyoptk._C.MLPUpdateConfig), as
// pyoptk.ops.mlp_update.MLPUpdateHyper; num_threads 0 = the OpenMP default.
struct MLPUpdateConfig {
  int n_mom = 5;
  int n_rms = 1;
  int n_fac = 3;
  int fac_mom_index = -1;
  double log_sign_k = 10.0;
  std::vector<double> timescales;
  double eps = 1e-16;
  double norm_eps = 1e-12;
  double fac_eps = 1e-30;
  double exp_mult = 1e-3;
  double step_mult = 1e-3;
  double lr = 1.0;
  uintptr_t lr_ptr = 0;  // one float32 overriding lr, or 0
  double weight_decay = 0.0;
  int num_threads = 0;

  mlp::MLPDims dims() const { return mlp::MLPDims{n_mom, n_rms, n_fac, fac_mom_index}; }
};

// Tensor tables of mlp_step_grad_cpu: per parameter tensor, the step's inputs, the
// cotangents of its outputs, and the gradients to write (all of the compute type,
// contiguous, shaped as in pyoptk.ops.mlp_update). rows/cols: the (rows, cols) view of
// 2+ dim tensors (factored != 0); 1 and numel for 0/1-dim tensors. widths: the MLP's
// layer widths (n_features, hidden..., 2); weights/d_weights: [w0, b0, w1, b1, ...].
struct MLPStepGradTensors {
  PtrList params, grads, moms, rmss, fac_rows, fac_cols, steps;
  PtrList d_params_out, d_moms_out, d_rmss_out, d_fac_rows_out, d_fac_cols_out;
  PtrList d_params, d_grads, d_moms, d_rmss, d_fac_rows, d_fac_cols;
  SizeList numels, rows, cols, factored;
  PtrList weights;
  SizeList widths;
  uintptr_t decays = 0;
  PtrList d_weights;
  uintptr_t d_decays = 0;
  uintptr_t d_lr = 0;  // 0: no lr gradient
};

// ---- workspace sizes (float32 elements; used by the CUDA entry points) -----------------
int64_t lamb_workspace_numel(const SizeList& numels);
int64_t norm_workspace_numel(const SizeList& numels);

// ---- CPU ------------------------------------------------------------------------------
void adamw_cpu(const PtrList& params, const PtrList& grads, const PtrList& exp_avgs,
               const PtrList& exp_avg_sqs, const PtrList& max_exp_avg_sqs,
               const PtrList& steps, const SizeList& numels, int dtype,
               const AdamWConfig& cfg);

void lamb_cpu(const PtrList& params, const PtrList& grads, const PtrList& exp_avgs,
              const PtrList& exp_avg_sqs, const PtrList& steps, const SizeList& numels,
              int dtype, const LambConfig& cfg);

// Writes the total norm (float32) to out_ptr; clip also scales the grads in place.
void grad_norm_cpu(const PtrList& grads, const SizeList& numels, int dtype, bool inf_norm,
                   uintptr_t out_ptr);
void clip_grad_norm_cpu(const PtrList& grads, const SizeList& numels, int dtype,
                        bool inf_norm, double max_norm, uintptr_t out_ptr);

void centralize_cpu(const PtrList& grads, const SizeList& rows, const SizeList& cols,
                    int dtype);

// One learned-MLP step over all tensors (in place). rows/cols: the (rows, cols) view of
// each 2+ dim tensor, 0/0 for 0/1-dim tensors (full factored accumulator). weights:
// [w0, b0, w1, b1, ...] float32, widths: [D, H0, ..., 2] (D = n_element + T). decays:
// float32 (K+R+F,). steps[i] counts applied updates and is incremented unless tensor i
// has a non-finite gradient (empty tensors always count the step).
void mlp_update_cpu(const PtrList& params, const PtrList& grads, const PtrList& moms,
                    const PtrList& rmss, const PtrList& fac_rows, const PtrList& fac_cols,
                    const PtrList& steps, const SizeList& numels, const SizeList& rows,
                    const SizeList& cols, int dtype, const PtrList& weights,
                    const SizeList& widths, uintptr_t decays, const MLPUpdateConfig& cfg);

// The instruction set the CPU loops run with ("baseline", "avx2" or "avx512"; see
// csrc/cpu/cpu_util.h and PYOPTK_CPU_ISA).
const char* cpu_loop_isa();

// Fused backward of the differentiable learned-MLP step (recomputes the forward).
// cfg: the rule's constants, as for mlp_update_cpu (num_threads unused: the OpenMP
// default). double_precision: every tensor float64 (else float32).
void mlp_step_grad_cpu(const MLPStepGradTensors& tensors, const MLPUpdateConfig& cfg,
                       bool double_precision);

// ---- CUDA -----------------------------------------------------------------------------
#ifdef PYOPTK_WITH_CUDA
int cuda_device_count();
std::string cuda_runtime_info();

void adamw_cuda(const PtrList& params, const PtrList& grads, const PtrList& exp_avgs,
                const PtrList& exp_avg_sqs, const PtrList& max_exp_avg_sqs,
                const PtrList& steps, const SizeList& numels, int dtype,
                const AdamWConfig& cfg, uintptr_t stream);

void lamb_cuda(const PtrList& params, const PtrList& grads, const PtrList& exp_avgs,
               const PtrList& exp_avg_sqs, const PtrList& steps, const SizeList& numels,
               int dtype, const LambConfig& cfg, uintptr_t workspace_ptr, uintptr_t stream);

void grad_norm_cuda(const PtrList& grads, const SizeList& numels, int dtype, bool inf_norm,
                    uintptr_t out_ptr, uintptr_t workspace_ptr, uintptr_t stream);
void clip_grad_norm_cuda(const PtrList& grads, const SizeList& numels, int dtype,
                         bool inf_norm, double max_norm, uintptr_t out_ptr,
                         uintptr_t workspace_ptr, uintptr_t stream);

void centralize_cuda(const PtrList& grads, const SizeList& rows, const SizeList& cols,
                     int dtype, uintptr_t stream);
#endif

}  // namespace pyoptk
