// pyoptk._C: the pybind11 module over the native CPU (and, when built, CUDA) kernels.
//
// Torch-free: every function takes raw data pointers (Python ints from data_ptr()),
// element counts, a dtype code (0 float32, 1 bfloat16, 2 float16) and, for CUDA, a
// cudaStream_t as int. The Python op layer validates devices, dtypes, shapes and
// contiguity; this layer still checks list lengths, counts, codes and null pointers
// (std::invalid_argument -> ValueError) so that a bad call never crashes, then releases
// the GIL around the kernel work. See docs/kernel-contract.md.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <sstream>
#include <stdexcept>
#include <string>
#include <initializer_list>
#include <utility>
#include <vector>

#ifdef PYOPTK_WITH_OPENMP
#include <omp.h>
#endif

#include "pyoptk/api.h"
#include "pyoptk/common.h"
#include "pyoptk/inner_step_math.h"
#include "pyoptk/mlp_step_grad_math.h"

namespace py = pybind11;
using pyoptk::PtrList;
using pyoptk::SizeList;

#ifndef PYOPTK_VERSION
#define PYOPTK_VERSION ""
#endif
#ifndef PYOPTK_CUDA_ARCHS
#define PYOPTK_CUDA_ARCHS ""
#endif

namespace {

[[noreturn]] void bad(const std::string& fn, const std::string& msg) {
  throw std::invalid_argument("pyoptk._C." + fn + ": " + msg);
}

void check_len(const char* fn, const char* name, size_t got, size_t want) {
  if (got != want) {
    bad(fn, std::string(name) + " has " + std::to_string(got) + " entries, expected " +
                std::to_string(want) + " (one per tensor)");
  }
}

void check_numels(const char* fn, const SizeList& numels, const char* name = "numels") {
  for (size_t i = 0; i < numels.size(); ++i) {
    if (numels[i] < 0) {
      bad(fn, std::string(name) + "[" + std::to_string(i) + "] is negative (" +
                  std::to_string(numels[i]) + ")");
    }
  }
}

// Pointers of tensors with elements must be non-null.
void check_ptrs(const char* fn, const char* name, const PtrList& ptrs, const SizeList& numels) {
  check_len(fn, name, ptrs.size(), numels.size());
  for (size_t i = 0; i < ptrs.size(); ++i) {
    if (numels[i] > 0 && ptrs[i] == 0) {
      bad(fn, std::string(name) + "[" + std::to_string(i) + "] is a null pointer");
    }
  }
}

void check_dtype(const char* fn, int dtype) {
  if (dtype != pyoptk::kFloat32 && dtype != pyoptk::kBFloat16 && dtype != pyoptk::kFloat16) {
    bad(fn, "dtype must be 0 (float32), 1 (bfloat16) or 2 (float16), got " +
                std::to_string(dtype));
  }
}

void check_nonnull(const char* fn, const char* name, uintptr_t p) {
  if (p == 0) bad(fn, std::string(name) + " is a null pointer");
}

bool is_inf_norm(const char* fn, double norm_type) {
  if (norm_type == 2.0) return false;
  if (std::isinf(norm_type) && norm_type > 0) return true;
  std::ostringstream os;
  os << "norm_type must be 2.0 or inf, got " << norm_type;
  bad(fn, os.str());
}

int64_t total_numel(const SizeList& numels) {
  int64_t n = 0;
  for (int64_t x : numels) n += x;
  return n;
}

// Validation shared by adamw_cpu/adamw_cuda.
void check_adamw(const char* fn, const PtrList& params, const PtrList& grads,
                 const PtrList& exp_avgs, const PtrList& exp_avg_sqs,
                 const PtrList& max_exp_avg_sqs, const PtrList& steps, const SizeList& numels,
                 int dtype, const pyoptk::AdamWConfig& cfg) {
  check_numels(fn, numels);
  check_ptrs(fn, "params", params, numels);
  check_ptrs(fn, "grads", grads, numels);
  check_ptrs(fn, "exp_avgs", exp_avgs, numels);
  check_ptrs(fn, "exp_avg_sqs", exp_avg_sqs, numels);
  check_ptrs(fn, "steps", steps, numels);
  if (cfg.amsgrad) {
    if (max_exp_avg_sqs.size() != numels.size()) {
      bad(fn, "amsgrad=True needs one max_exp_avg_sqs pointer per tensor (" +
                  std::to_string(numels.size()) + "), got " +
                  std::to_string(max_exp_avg_sqs.size()));
    }
    check_ptrs(fn, "max_exp_avg_sqs", max_exp_avg_sqs, numels);
  } else if (!max_exp_avg_sqs.empty() && max_exp_avg_sqs.size() != numels.size()) {
    bad(fn, "max_exp_avg_sqs must be empty (or one per tensor) when amsgrad=False, got " +
                std::to_string(max_exp_avg_sqs.size()) + " entries");
  }
  check_dtype(fn, dtype);
}

void check_lamb(const char* fn, const PtrList& params, const PtrList& grads,
                const PtrList& exp_avgs, const PtrList& exp_avg_sqs, const PtrList& steps,
                const SizeList& numels, int dtype) {
  check_numels(fn, numels);
  check_ptrs(fn, "params", params, numels);
  check_ptrs(fn, "grads", grads, numels);
  check_ptrs(fn, "exp_avgs", exp_avgs, numels);
  check_ptrs(fn, "exp_avg_sqs", exp_avg_sqs, numels);
  check_ptrs(fn, "steps", steps, numels);
  check_dtype(fn, dtype);
}

void check_norm(const char* fn, const PtrList& grads, const SizeList& numels, int dtype,
                uintptr_t out_ptr) {
  check_numels(fn, numels);
  check_ptrs(fn, "grads", grads, numels);
  check_dtype(fn, dtype);
  check_nonnull(fn, "out_ptr", out_ptr);
}

void check_centralize(const char* fn, const PtrList& grads, const SizeList& rows,
                      const SizeList& cols, int dtype) {
  check_len(fn, "rows", rows.size(), grads.size());
  check_len(fn, "cols", cols.size(), grads.size());
  check_numels(fn, rows, "rows");
  check_numels(fn, cols, "cols");
  for (size_t i = 0; i < grads.size(); ++i) {
    if (rows[i] > 0 && cols[i] > 0 && grads[i] == 0) {
      bad(fn, "grads[" + std::to_string(i) + "] is a null pointer");
    }
  }
  check_dtype(fn, dtype);
}

// Validation of mlp_update_cpu: list lengths, counts, shapes, layer widths, pointers.
void check_mlp_update(const char* fn, const PtrList& params, const PtrList& grads,
                      const PtrList& moms, const PtrList& rmss, const PtrList& fac_rows,
                      const PtrList& fac_cols, const PtrList& steps, const SizeList& numels,
                      const SizeList& rows, const SizeList& cols, int dtype,
                      const PtrList& weights, const SizeList& widths, uintptr_t decays,
                      const pyoptk::MLPUpdateConfig& cfg) {
  check_numels(fn, numels);
  check_len(fn, "rows", rows.size(), numels.size());
  check_len(fn, "cols", cols.size(), numels.size());
  check_numels(fn, rows, "rows");
  check_numels(fn, cols, "cols");
  if (cfg.n_mom < 0 || cfg.n_rms < 0 || cfg.n_fac < 0) {
    bad(fn, "n_mom, n_rms and n_fac must be >= 0, got " + std::to_string(cfg.n_mom) + ", " +
                std::to_string(cfg.n_rms) + ", " + std::to_string(cfg.n_fac));
  }
  if (cfg.fac_mom_index < -1 || cfg.fac_mom_index >= cfg.n_mom) {
    bad(fn, "fac_mom_index must be -1 or in [0, n_mom=" + std::to_string(cfg.n_mom) +
                "), got " + std::to_string(cfg.fac_mom_index));
  }
  if (cfg.num_threads < 0) bad(fn, "num_threads must be >= 0 (0: OpenMP default)");
  for (size_t i = 0; i < numels.size(); ++i) {
    const bool full = rows[i] == 0 && cols[i] == 0;
    if (numels[i] > 0 && !full && rows[i] * cols[i] != numels[i]) {
      bad(fn, "tensor " + std::to_string(i) + ": rows*cols = " + std::to_string(rows[i]) + "*" +
                  std::to_string(cols[i]) + " != numel " + std::to_string(numels[i]) +
                  " (use rows = cols = 0 for 0/1-dim tensors)");
    }
  }
  check_ptrs(fn, "params", params, numels);
  check_ptrs(fn, "grads", grads, numels);
  SizeList zeros(numels.size(), 0);
  check_ptrs(fn, "moms", moms, cfg.n_mom > 0 ? numels : zeros);
  check_ptrs(fn, "rmss", rmss, cfg.n_rms > 0 ? numels : zeros);
  check_ptrs(fn, "fac_rows", fac_rows, cfg.n_fac > 0 ? numels : zeros);
  SizeList fac_col_numels(numels.size(), 0);
  for (size_t i = 0; i < numels.size(); ++i) {
    if (cfg.n_fac > 0 && cols[i] > 0) fac_col_numels[i] = numels[i];
  }
  check_ptrs(fn, "fac_cols", fac_cols, fac_col_numels);
  check_len(fn, "steps", steps.size(), numels.size());
  for (size_t i = 0; i < steps.size(); ++i) {  // every tensor counts its step
    if (steps[i] == 0) bad(fn, "steps[" + std::to_string(i) + "] is a null pointer");
  }
  check_dtype(fn, dtype);
  if (weights.size() < 2 || weights.size() % 2) {
    bad(fn, "weights must be [w0, b0, w1, b1, ...] (even length >= 2), got " +
                std::to_string(weights.size()) + " pointers");
  }
  for (size_t i = 0; i < weights.size(); ++i) {
    if (weights[i] == 0) bad(fn, "weights[" + std::to_string(i) + "] is a null pointer");
  }
  const size_t n_layers = weights.size() / 2;
  if (widths.size() != n_layers + 1) {
    bad(fn, "widths must have one entry per layer input plus the output (" +
                std::to_string(n_layers + 1) + "), got " + std::to_string(widths.size()));
  }
  const pyoptk::mlp::MLPDims dm = cfg.dims();
  const int64_t d_in = dm.n_element() + static_cast<int64_t>(cfg.timescales.size());
  if (widths[0] != d_in) {
    bad(fn, "widths[0] = " + std::to_string(widths[0]) + " but the feature config has " +
                std::to_string(d_in) + " features");
  }
  for (size_t i = 1; i < widths.size(); ++i) {
    if (widths[i] < 1) bad(fn, "widths[" + std::to_string(i) + "] must be >= 1");
  }
  if (widths.back() != 2) {
    bad(fn, "the last layer must have 2 outputs (direction, magnitude), got " +
                std::to_string(widths.back()));
  }
  if (dm.K + dm.R + dm.F > 0) check_nonnull(fn, "decays", decays);
  for (double t : cfg.timescales) {
    if (!(t > 0.0) || !std::isfinite(t)) bad(fn, "timescales must be finite and > 0");
  }
}

#ifndef PYOPTK_WITH_CUDA
[[noreturn]] void no_cuda(const char* fn) {
  throw std::runtime_error(std::string("pyoptk._C was built without CUDA (nvcc not found, or "
                                       "PYOPTK_CUDA=OFF, at build time), so pyoptk._C.") +
                           fn + " is unavailable; rebuild with nvcc on PATH and "
                                "PYOPTK_CUDA=ON, or use the 'triton' or 'torch' backend");
}
#endif

// mlp_step_grad_cpu: table lengths, widths, feature-config limits, null pointers.
void check_mlp_step_grad(const pyoptk::MLPStepGradTensors& a,
                         const pyoptk::MLPUpdateConfig& c) {
  const char* fn = "mlp_step_grad_cpu";
  const SizeList& numels = a.numels;
  check_numels(fn, numels);
  const size_t nt = numels.size();
  check_len(fn, "rows", a.rows.size(), nt);
  check_len(fn, "cols", a.cols.size(), nt);
  check_len(fn, "factored", a.factored.size(), nt);
  const std::pair<const char*, const PtrList*> per_elem[] = {
      {"params", &a.params}, {"grads", &a.grads}, {"d_params_out", &a.d_params_out},
      {"d_params", &a.d_params}, {"d_grads", &a.d_grads}};
  for (const auto& pl : per_elem) check_ptrs(fn, pl.first, *pl.second, numels);
  // (K, n) momenta and (R, n) second moments: empty, so possibly null, when K or R is 0.
  const std::pair<const char*, const PtrList*> moments[] = {
      {"moms", &a.moms}, {"d_moms_out", &a.d_moms_out}, {"d_moms", &a.d_moms},
      {"rmss", &a.rmss}, {"d_rmss_out", &a.d_rmss_out}, {"d_rmss", &a.d_rmss}};
  const SizeList none(numels.size(), 0);
  for (int i = 0; i < 6; ++i) {
    const bool present = (i < 3 ? c.n_mom : c.n_rms) > 0;
    check_ptrs(fn, moments[i].first, *moments[i].second, present ? numels : none);
  }
  const std::pair<const char*, const PtrList*> per_tensor[] = {
      {"fac_rows", &a.fac_rows}, {"fac_cols", &a.fac_cols}, {"steps", &a.steps},
      {"d_fac_rows_out", &a.d_fac_rows_out}, {"d_fac_cols_out", &a.d_fac_cols_out},
      {"d_fac_rows", &a.d_fac_rows}, {"d_fac_cols", &a.d_fac_cols}};
  for (const auto& pl : per_tensor) check_len(fn, pl.first, pl.second->size(), nt);
  for (size_t i = 0; i < nt; ++i) {
    if (a.steps[i] == 0) bad(fn, "steps[" + std::to_string(i) + "] is a null pointer");
    const bool fac = a.factored[i] != 0;
    if (a.rows[i] < 0 || a.cols[i] < 0 || a.rows[i] * a.cols[i] != numels[i] ||
        (!fac && a.rows[i] != 1)) {
      bad(fn, "rows/cols of tensor " + std::to_string(i) + " do not match its numel");
    }
    const bool has_rows = c.n_fac > 0 && (fac ? a.rows[i] > 0 : numels[i] > 0);
    if (has_rows && (a.fac_rows[i] == 0 || a.d_fac_rows_out[i] == 0 || a.d_fac_rows[i] == 0)) {
      bad(fn, "fac_rows / their cotangents / gradients of tensor " + std::to_string(i) +
                  " include a null pointer");
    }
    if (fac && c.n_fac > 0 && a.cols[i] > 0 &&
        (a.fac_cols[i] == 0 || a.d_fac_cols_out[i] == 0 || a.d_fac_cols[i] == 0)) {
      bad(fn, "fac_cols / their cotangents / gradients of tensor " + std::to_string(i) +
                  " include a null pointer");
    }
  }
  if (c.n_mom < 0 || c.n_mom > pyoptk::kMsgMaxMom || c.n_rms < 0 ||
      c.n_rms > pyoptk::kMsgMaxRms || c.n_fac < 0 || c.n_fac > pyoptk::kMsgMaxFac) {
    bad(fn, "n_mom/n_rms/n_fac must be at most " + std::to_string(pyoptk::kMsgMaxMom) + "/" +
                std::to_string(pyoptk::kMsgMaxRms) + "/" + std::to_string(pyoptk::kMsgMaxFac));
  }
  if (c.fac_mom_index < -1 || c.fac_mom_index >= c.n_mom) {
    bad(fn, "fac_mom_index must be -1 or in [0, n_mom)");
  }
  const int64_t n_elem = 2 + c.n_mom + c.n_rms + c.n_mom * c.n_rms + c.n_rms + 2 +
                         c.n_fac * (3 + (c.fac_mom_index >= 0 ? 1 : 0));
  const size_t L = a.widths.size();
  if (L < 2 || a.widths[0] != n_elem + static_cast<int64_t>(c.timescales.size()) ||
      a.widths[L - 1] != 2) {
    bad(fn, "widths must be (n_features, hidden..., 2) with n_features = " +
                std::to_string(n_elem + static_cast<int64_t>(c.timescales.size())));
  }
  for (size_t l = 1; l < L; ++l) {
    if (a.widths[l] < 1 || a.widths[l] > 128) bad(fn, "layer widths must be in [1, 128]");
  }
  check_len(fn, "weights", a.weights.size(), 2 * (L - 1));
  check_len(fn, "d_weights", a.d_weights.size(), 2 * (L - 1));
  for (size_t i = 0; i < a.weights.size(); ++i) {
    if (a.weights[i] == 0 || a.d_weights[i] == 0) bad(fn, "weights include a null pointer");
  }
  if (c.n_mom + c.n_rms + c.n_fac > 0) {
    check_nonnull(fn, "decays", a.decays);
    check_nonnull(fn, "d_decays", a.d_decays);
  }
}

std::string fmt(double x) { return py::repr(py::float_(x)).cast<std::string>(); }
std::string fmt(bool x) { return x ? "True" : "False"; }

py::dict build_info() {
  py::dict d;
#ifdef PYOPTK_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = std::string(PYOPTK_CUDA_ARCHS);
  d["cuda_runtime"] = pyoptk::cuda_runtime_info();
#else
  d["cuda"] = false;
  d["cuda_archs"] = std::string("");
#endif
#ifdef PYOPTK_WITH_OPENMP
  d["openmp"] = true;
  d["omp_max_threads"] = omp_get_max_threads();
#else
  d["openmp"] = false;
  d["omp_max_threads"] = 1;
#endif
  const std::string version = PYOPTK_VERSION;
  d["version"] = version.empty() ? std::string("unknown") : version;
  d["chunk_size"] = pyoptk::kChunkSize;
  d["cpu_isa"] = std::string(pyoptk::cpu_loop_isa());
  return d;
}

// inner_* (differentiable inner steps): every pointer list one entry per tensor (or, for
// the optional lists, empty), non-null where the tensor has elements.
void check_inner(const char* fn, const SizeList& numels,
                 std::initializer_list<std::pair<const char*, const PtrList*>> lists,
                 std::initializer_list<std::pair<const char*, const PtrList*>> optional = {}) {
  check_numels(fn, numels);
  for (const auto& l : lists) check_ptrs(fn, l.first, *l.second, numels);
  for (const auto& l : optional) {
    if (!l.second->empty()) check_ptrs(fn, l.first, *l.second, numels);
  }
}

void check_inner_adam_cfg(const char* fn, const pyoptk::InnerStepConfig& cfg) {
  if (cfg.step < 1) bad(fn, "cfg.step must be >= 1, got " + std::to_string(cfg.step));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "pyoptk native kernels (torch-free). Functions take data_ptr() ints, element counts, "
      "a dtype code (0 float32, 1 bfloat16, 2 float16) and, for CUDA, a stream handle. "
      "See docs/kernel-contract.md.";

  m.def("build_info", &build_info,
        "dict: cuda, cuda_archs, openmp, omp_max_threads, version, chunk_size, cpu_isa");
  m.def(
      "cuda_device_count",
      []() -> int {
#ifdef PYOPTK_WITH_CUDA
        return pyoptk::cuda_device_count();
#else
        return 0;
#endif
      },
      "Number of CUDA devices (0 when built without CUDA or without a driver).");

  // ---- configs -------------------------------------------------------------------------
  using pyoptk::AdamWConfig;
  using pyoptk::LambConfig;
  py::class_<AdamWConfig>(m, "AdamWConfig", "Hyperparameters of one AdamW call.")
      .def(py::init([](double lr, uintptr_t lr_ptr, double beta1, double beta2, double eps,
                       double weight_decay, bool amsgrad, bool maximize) {
             AdamWConfig c;
             c.lr = lr;
             c.lr_ptr = lr_ptr;
             c.beta1 = beta1;
             c.beta2 = beta2;
             c.eps = eps;
             c.weight_decay = weight_decay;
             c.amsgrad = amsgrad;
             c.maximize = maximize;
             return c;
           }),
           py::kw_only(), py::arg("lr") = 1e-3, py::arg("lr_ptr") = 0, py::arg("beta1") = 0.9,
           py::arg("beta2") = 0.999, py::arg("eps") = 1e-8, py::arg("weight_decay") = 1e-2,
           py::arg("amsgrad") = false, py::arg("maximize") = false)
      .def_readwrite("lr", &AdamWConfig::lr)
      .def_readwrite("lr_ptr", &AdamWConfig::lr_ptr)
      .def_readwrite("beta1", &AdamWConfig::beta1)
      .def_readwrite("beta2", &AdamWConfig::beta2)
      .def_readwrite("eps", &AdamWConfig::eps)
      .def_readwrite("weight_decay", &AdamWConfig::weight_decay)
      .def_readwrite("amsgrad", &AdamWConfig::amsgrad)
      .def_readwrite("maximize", &AdamWConfig::maximize)
      .def("__repr__", [](const AdamWConfig& c) {
        return "AdamWConfig(lr=" + fmt(c.lr) + ", lr_ptr=" + std::to_string(c.lr_ptr) +
               ", beta1=" + fmt(c.beta1) + ", beta2=" + fmt(c.beta2) + ", eps=" + fmt(c.eps) +
               ", weight_decay=" + fmt(c.weight_decay) + ", amsgrad=" + fmt(c.amsgrad) +
               ", maximize=" + fmt(c.maximize) + ")";
      });

  py::class_<LambConfig>(m, "LambConfig", "Hyperparameters of one LAMB call.")
      .def(py::init([](double lr, uintptr_t lr_ptr, double beta1, double beta2, double eps,
                       double weight_decay, bool bias_correction, bool adam,
                       double clamp_value, bool maximize) {
             LambConfig c;
             c.lr = lr;
             c.lr_ptr = lr_ptr;
             c.beta1 = beta1;
             c.beta2 = beta2;
             c.eps = eps;
             c.weight_decay = weight_decay;
             c.bias_correction = bias_correction;
             c.adam = adam;
             c.clamp_value = clamp_value;
             c.maximize = maximize;
             return c;
           }),
           py::kw_only(), py::arg("lr") = 1e-3, py::arg("lr_ptr") = 0, py::arg("beta1") = 0.9,
           py::arg("beta2") = 0.999, py::arg("eps") = 1e-6, py::arg("weight_decay") = 0.0,
           py::arg("bias_correction") = true, py::arg("adam") = false,
           py::arg("clamp_value") = 10.0, py::arg("maximize") = false)
      .def_readwrite("lr", &LambConfig::lr)
      .def_readwrite("lr_ptr", &LambConfig::lr_ptr)
      .def_readwrite("beta1", &LambConfig::beta1)
      .def_readwrite("beta2", &LambConfig::beta2)
      .def_readwrite("eps", &LambConfig::eps)
      .def_readwrite("weight_decay", &LambConfig::weight_decay)
      .def_readwrite("bias_correction", &LambConfig::bias_correction)
      .def_readwrite("adam", &LambConfig::adam)
      .def_readwrite("clamp_value", &LambConfig::clamp_value)
      .def_readwrite("maximize", &LambConfig::maximize)
      .def("__repr__", [](const LambConfig& c) {
        return "LambConfig(lr=" + fmt(c.lr) + ", lr_ptr=" + std::to_string(c.lr_ptr) +
               ", beta1=" + fmt(c.beta1) + ", beta2=" + fmt(c.beta2) + ", eps=" + fmt(c.eps) +
               ", weight_decay=" + fmt(c.weight_decay) +
               ", bias_correction=" + fmt(c.bias_correction) + ", adam=" + fmt(c.adam) +
               ", clamp_value=" + fmt(c.clamp_value) + ", maximize=" + fmt(c.maximize) + ")";
      });

  using pyoptk::MLPUpdateConfig;
  py::class_<MLPUpdateConfig>(m, "MLPUpdateConfig",
                              "Hyperparameters of one mlp_update_ call (MLPUpdateHyper).")
      .def(py::init([](int n_mom, int n_rms, int n_fac, int fac_mom_index, double log_sign_k,
                       std::vector<double> timescales, double eps, double norm_eps,
                       double fac_eps, double exp_mult, double step_mult, double lr,
                       uintptr_t lr_ptr, double weight_decay, int num_threads) {
             MLPUpdateConfig c;
             c.n_mom = n_mom;
             c.n_rms = n_rms;
             c.n_fac = n_fac;
             c.fac_mom_index = fac_mom_index;
             c.log_sign_k = log_sign_k;
             c.timescales = std::move(timescales);
             c.eps = eps;
             c.norm_eps = norm_eps;
             c.fac_eps = fac_eps;
             c.exp_mult = exp_mult;
             c.step_mult = step_mult;
             c.lr = lr;
             c.lr_ptr = lr_ptr;
             c.weight_decay = weight_decay;
             c.num_threads = num_threads;
             return c;
           }),
           py::kw_only(), py::arg("n_mom") = 5, py::arg("n_rms") = 1, py::arg("n_fac") = 3,
           py::arg("fac_mom_index") = -1, py::arg("log_sign_k") = 10.0,
           py::arg("timescales") = std::vector<double>{}, py::arg("eps") = 1e-16,
           py::arg("norm_eps") = 1e-12, py::arg("fac_eps") = 1e-30, py::arg("exp_mult") = 1e-3,
           py::arg("step_mult") = 1e-3, py::arg("lr") = 1.0, py::arg("lr_ptr") = 0,
           py::arg("weight_decay") = 0.0, py::arg("num_threads") = 0)
      .def_readwrite("n_mom", &MLPUpdateConfig::n_mom)
      .def_readwrite("n_rms", &MLPUpdateConfig::n_rms)
      .def_readwrite("n_fac", &MLPUpdateConfig::n_fac)
      .def_readwrite("fac_mom_index", &MLPUpdateConfig::fac_mom_index)
      .def_readwrite("log_sign_k", &MLPUpdateConfig::log_sign_k)
      .def_readwrite("timescales", &MLPUpdateConfig::timescales)
      .def_readwrite("eps", &MLPUpdateConfig::eps)
      .def_readwrite("norm_eps", &MLPUpdateConfig::norm_eps)
      .def_readwrite("fac_eps", &MLPUpdateConfig::fac_eps)
      .def_readwrite("exp_mult", &MLPUpdateConfig::exp_mult)
      .def_readwrite("step_mult", &MLPUpdateConfig::step_mult)
      .def_readwrite("lr", &MLPUpdateConfig::lr)
      .def_readwrite("lr_ptr", &MLPUpdateConfig::lr_ptr)
      .def_readwrite("weight_decay", &MLPUpdateConfig::weight_decay)
      .def_readwrite("num_threads", &MLPUpdateConfig::num_threads)
      .def("__repr__", [](const MLPUpdateConfig& c) {
        std::string ts;
        for (double t : c.timescales) ts += (ts.empty() ? "" : ", ") + fmt(t);
        return "MLPUpdateConfig(n_mom=" + std::to_string(c.n_mom) +
               ", n_rms=" + std::to_string(c.n_rms) + ", n_fac=" + std::to_string(c.n_fac) +
               ", fac_mom_index=" + std::to_string(c.fac_mom_index) +
               ", log_sign_k=" + fmt(c.log_sign_k) + ", timescales=[" + ts + "], eps=" +
               fmt(c.eps) + ", norm_eps=" + fmt(c.norm_eps) + ", fac_eps=" + fmt(c.fac_eps) +
               ", exp_mult=" + fmt(c.exp_mult) + ", step_mult=" + fmt(c.step_mult) +
               ", lr=" + fmt(c.lr) + ", lr_ptr=" + std::to_string(c.lr_ptr) +
               ", weight_decay=" + fmt(c.weight_decay) +
               ", num_threads=" + std::to_string(c.num_threads) + ")";
      });

  // ---- AdamW ---------------------------------------------------------------------------
  m.def(
      "adamw_cpu",
      [](const PtrList& params, const PtrList& grads, const PtrList& exp_avgs,
         const PtrList& exp_avg_sqs, const PtrList& max_exp_avg_sqs, const PtrList& steps,
         const SizeList& numels, int dtype, const AdamWConfig& cfg) {
        check_adamw("adamw_cpu", params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                    numels, dtype, cfg);
        py::gil_scoped_release nogil;
        pyoptk::adamw_cpu(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, numels,
                          dtype, cfg);
      },
      py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
      py::arg("max_exp_avg_sqs"), py::arg("steps"), py::arg("numels"), py::arg("dtype"),
      py::arg("cfg"), "One AdamW step over CPU tensors (in place).");
  m.def(
      "adamw_cuda",
      [](const PtrList& params, const PtrList& grads, const PtrList& exp_avgs,
         const PtrList& exp_avg_sqs, const PtrList& max_exp_avg_sqs, const PtrList& steps,
         const SizeList& numels, int dtype, const AdamWConfig& cfg, uintptr_t stream) {
#ifdef PYOPTK_WITH_CUDA
        check_adamw("adamw_cuda", params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                    steps, numels, dtype, cfg);
        py::gil_scoped_release nogil;
        pyoptk::adamw_cuda(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                           numels, dtype, cfg, stream);
#else
        (void)params, (void)grads, (void)exp_avgs, (void)exp_avg_sqs, (void)max_exp_avg_sqs;
        (void)steps, (void)numels, (void)dtype, (void)cfg, (void)stream;
        no_cuda("adamw_cuda");
#endif
      },
      py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
      py::arg("max_exp_avg_sqs"), py::arg("steps"), py::arg("numels"), py::arg("dtype"),
      py::arg("cfg"), py::arg("stream"),
      "One AdamW step over CUDA tensors (in place), one launch per <=512 tensors.");

  // ---- LAMB ----------------------------------------------------------------------------
  m.def(
      "lamb_workspace_numel",
      [](const SizeList& numels) {
        check_numels("lamb_workspace_numel", numels);
        return pyoptk::lamb_workspace_numel(numels);
      },
      py::arg("numels"), "float32 elements of the workspace lamb_cuda needs.");
  m.def(
      "lamb_cpu",
      [](const PtrList& params, const PtrList& grads, const PtrList& exp_avgs,
         const PtrList& exp_avg_sqs, const PtrList& steps, const SizeList& numels, int dtype,
         const LambConfig& cfg) {
        check_lamb("lamb_cpu", params, grads, exp_avgs, exp_avg_sqs, steps, numels, dtype);
        py::gil_scoped_release nogil;
        pyoptk::lamb_cpu(params, grads, exp_avgs, exp_avg_sqs, steps, numels, dtype, cfg);
      },
      py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
      py::arg("steps"), py::arg("numels"), py::arg("dtype"), py::arg("cfg"),
      "One LAMB step over CPU tensors (in place).");
  m.def(
      "lamb_cuda",
      [](const PtrList& params, const PtrList& grads, const PtrList& exp_avgs,
         const PtrList& exp_avg_sqs, const PtrList& steps, const SizeList& numels, int dtype,
         const LambConfig& cfg, uintptr_t workspace_ptr, uintptr_t stream) {
#ifdef PYOPTK_WITH_CUDA
        check_lamb("lamb_cuda", params, grads, exp_avgs, exp_avg_sqs, steps, numels, dtype);
        if (total_numel(numels) > 0) check_nonnull("lamb_cuda", "workspace_ptr", workspace_ptr);
        py::gil_scoped_release nogil;
        pyoptk::lamb_cuda(params, grads, exp_avgs, exp_avg_sqs, steps, numels, dtype, cfg,
                          workspace_ptr, stream);
#else
        (void)params, (void)grads, (void)exp_avgs, (void)exp_avg_sqs, (void)steps;
        (void)numels, (void)dtype, (void)cfg, (void)workspace_ptr, (void)stream;
        no_cuda("lamb_cuda");
#endif
      },
      py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
      py::arg("steps"), py::arg("numels"), py::arg("dtype"), py::arg("cfg"),
      py::arg("workspace_ptr"), py::arg("stream"),
      "One LAMB step over CUDA tensors (in place): <= 3 launches, no host sync.");

  // ---- gradient norm / clipping ---------------------------------------------------------
  m.def(
      "norm_workspace_numel",
      [](const SizeList& numels) {
        check_numels("norm_workspace_numel", numels);
        return pyoptk::norm_workspace_numel(numels);
      },
      py::arg("numels"), "float32 elements of the workspace the CUDA norm functions need.");
  m.def(
      "grad_norm_cpu",
      [](const PtrList& grads, const SizeList& numels, int dtype, double norm_type,
         uintptr_t out_ptr) {
        check_norm("grad_norm_cpu", grads, numels, dtype, out_ptr);
        const bool inf_norm = is_inf_norm("grad_norm_cpu", norm_type);
        py::gil_scoped_release nogil;
        pyoptk::grad_norm_cpu(grads, numels, dtype, inf_norm, out_ptr);
      },
      py::arg("grads"), py::arg("numels"), py::arg("dtype"), py::arg("norm_type"),
      py::arg("out_ptr"), "Total norm of all grads, written as float32 to out_ptr.");
  m.def(
      "clip_grad_norm_cpu",
      [](const PtrList& grads, const SizeList& numels, int dtype, double norm_type,
         double max_norm, uintptr_t out_ptr) {
        check_norm("clip_grad_norm_cpu", grads, numels, dtype, out_ptr);
        const bool inf_norm = is_inf_norm("clip_grad_norm_cpu", norm_type);
        py::gil_scoped_release nogil;
        pyoptk::clip_grad_norm_cpu(grads, numels, dtype, inf_norm, max_norm, out_ptr);
      },
      py::arg("grads"), py::arg("numels"), py::arg("dtype"), py::arg("norm_type"),
      py::arg("max_norm"), py::arg("out_ptr"),
      "Writes the total norm to out_ptr and scales the grads by min(max_norm/(total+1e-6), 1).");
  m.def(
      "grad_norm_cuda",
      [](const PtrList& grads, const SizeList& numels, int dtype, double norm_type,
         uintptr_t out_ptr, uintptr_t workspace_ptr, uintptr_t stream) {
#ifdef PYOPTK_WITH_CUDA
        check_norm("grad_norm_cuda", grads, numels, dtype, out_ptr);
        const bool inf_norm = is_inf_norm("grad_norm_cuda", norm_type);
        if (total_numel(numels) > 0) check_nonnull("grad_norm_cuda", "workspace_ptr", workspace_ptr);
        py::gil_scoped_release nogil;
        pyoptk::grad_norm_cuda(grads, numels, dtype, inf_norm, out_ptr, workspace_ptr, stream);
#else
        (void)grads, (void)numels, (void)dtype, (void)norm_type, (void)out_ptr;
        (void)workspace_ptr, (void)stream;
        no_cuda("grad_norm_cuda");
#endif
      },
      py::arg("grads"), py::arg("numels"), py::arg("dtype"), py::arg("norm_type"),
      py::arg("out_ptr"), py::arg("workspace_ptr"), py::arg("stream"),
      "Total norm of all grads into out_ptr on device (2 launches, no host sync).");
  m.def(
      "clip_grad_norm_cuda",
      [](const PtrList& grads, const SizeList& numels, int dtype, double norm_type,
         double max_norm, uintptr_t out_ptr, uintptr_t workspace_ptr, uintptr_t stream) {
#ifdef PYOPTK_WITH_CUDA
        check_norm("clip_grad_norm_cuda", grads, numels, dtype, out_ptr);
        const bool inf_norm = is_inf_norm("clip_grad_norm_cuda", norm_type);
        if (total_numel(numels) > 0) {
          check_nonnull("clip_grad_norm_cuda", "workspace_ptr", workspace_ptr);
        }
        py::gil_scoped_release nogil;
        pyoptk::clip_grad_norm_cuda(grads, numels, dtype, inf_norm, max_norm, out_ptr,
                                    workspace_ptr, stream);
#else
        (void)grads, (void)numels, (void)dtype, (void)norm_type, (void)max_norm;
        (void)out_ptr, (void)workspace_ptr, (void)stream;
        no_cuda("clip_grad_norm_cuda");
#endif
      },
      py::arg("grads"), py::arg("numels"), py::arg("dtype"), py::arg("norm_type"),
      py::arg("max_norm"), py::arg("out_ptr"), py::arg("workspace_ptr"), py::arg("stream"),
      "Total norm into out_ptr and grads scaled on device (3 launches, no host sync).");

  // ---- learned MLP step ----------------------------------------------------------------
  m.def(
      "mlp_update_cpu",
      [](const PtrList& params, const PtrList& grads, const PtrList& moms, const PtrList& rmss,
         const PtrList& fac_rows, const PtrList& fac_cols, const PtrList& steps,
         const SizeList& numels, const SizeList& rows, const SizeList& cols, int dtype,
         const PtrList& weights, const SizeList& widths, uintptr_t decays,
         const MLPUpdateConfig& cfg) {
        check_mlp_update("mlp_update_cpu", params, grads, moms, rmss, fac_rows, fac_cols, steps,
                         numels, rows, cols, dtype, weights, widths, decays, cfg);
        py::gil_scoped_release nogil;
        pyoptk::mlp_update_cpu(params, grads, moms, rmss, fac_rows, fac_cols, steps, numels,
                               rows, cols, dtype, weights, widths, decays, cfg);
      },
      py::arg("params"), py::arg("grads"), py::arg("moms"), py::arg("rmss"),
      py::arg("fac_rows"), py::arg("fac_cols"), py::arg("steps"), py::arg("numels"),
      py::arg("rows"), py::arg("cols"), py::arg("dtype"), py::arg("weights"),
      py::arg("widths"), py::arg("decays"), py::arg("cfg"),
      "One learned-MLP step over CPU tensors (in place): 2 passes, steps incremented.");

  // ---- gradient centralization ----------------------------------------------------------
  m.def(
      "centralize_cpu",
      [](const PtrList& grads, const SizeList& rows, const SizeList& cols, int dtype) {
        check_centralize("centralize_cpu", grads, rows, cols, dtype);
        py::gil_scoped_release nogil;
        pyoptk::centralize_cpu(grads, rows, cols, dtype);
      },
      py::arg("grads"), py::arg("rows"), py::arg("cols"), py::arg("dtype"),
      "g[r, :] -= mean(g[r, :]) for each grad viewed as [rows, cols] (in place).");
  m.def(
      "centralize_cuda",
      [](const PtrList& grads, const SizeList& rows, const SizeList& cols, int dtype,
         uintptr_t stream) {
#ifdef PYOPTK_WITH_CUDA
        check_centralize("centralize_cuda", grads, rows, cols, dtype);
        py::gil_scoped_release nogil;
        pyoptk::centralize_cuda(grads, rows, cols, dtype, stream);
#else
        (void)grads, (void)rows, (void)cols, (void)dtype, (void)stream;
        no_cuda("centralize_cuda");
#endif
      },
      py::arg("grads"), py::arg("rows"), py::arg("cols"), py::arg("dtype"), py::arg("stream"),
      "Gradient centralization on CUDA tensors (one launch per <=1024 tensors).");

  // ---- differentiable learned-MLP step: fused backward ------------------------------------
  m.def(
      "mlp_step_grad_cpu",
      [](const PtrList& params, const PtrList& grads, const PtrList& moms, const PtrList& rmss,
         const PtrList& fac_rows, const PtrList& fac_cols, const PtrList& steps,
         const PtrList& d_params_out, const PtrList& d_moms_out, const PtrList& d_rmss_out,
         const PtrList& d_fac_rows_out, const PtrList& d_fac_cols_out, const PtrList& d_params,
         const PtrList& d_grads, const PtrList& d_moms, const PtrList& d_rmss,
         const PtrList& d_fac_rows, const PtrList& d_fac_cols, const SizeList& numels,
         const SizeList& rows, const SizeList& cols, const std::vector<bool>& factored,
         const PtrList& weights, const SizeList& widths, uintptr_t decays,
         const PtrList& d_weights, uintptr_t d_decays, uintptr_t d_lr,
         const pyoptk::MLPUpdateConfig& cfg, bool double_precision) {
        pyoptk::MLPStepGradTensors a{params, grads, moms, rmss, fac_rows, fac_cols, steps,
                                     d_params_out, d_moms_out, d_rmss_out, d_fac_rows_out,
                                     d_fac_cols_out, d_params, d_grads, d_moms, d_rmss,
                                     d_fac_rows, d_fac_cols, numels, rows, cols, {},
                                     weights, widths, decays, d_weights, d_decays, d_lr};
        a.factored.assign(factored.begin(), factored.end());
        check_mlp_step_grad(a, cfg);
        if (cfg.lr_ptr == 0 && d_lr != 0) bad("mlp_step_grad_cpu", "d_lr needs lr_ptr");
        py::gil_scoped_release nogil;
        pyoptk::mlp_step_grad_cpu(a, cfg, double_precision);
      },
      py::arg("params"), py::arg("grads"), py::arg("moms"), py::arg("rmss"),
      py::arg("fac_rows"), py::arg("fac_cols"), py::arg("steps"), py::arg("d_params_out"),
      py::arg("d_moms_out"), py::arg("d_rmss_out"), py::arg("d_fac_rows_out"),
      py::arg("d_fac_cols_out"), py::arg("d_params"), py::arg("d_grads"), py::arg("d_moms"),
      py::arg("d_rmss"), py::arg("d_fac_rows"), py::arg("d_fac_cols"), py::arg("numels"),
      py::arg("rows"), py::arg("cols"), py::arg("factored"), py::arg("weights"),
      py::arg("widths"), py::arg("decays"), py::arg("d_weights"), py::arg("d_decays"),
      py::arg("d_lr"), py::arg("cfg"), py::arg("double_precision"),
      "Input gradients of the learned-MLP step from its output cotangents (CPU, float32 or "
      "float64; recomputes the forward, three passes, deterministic).");
  // ---- differentiable inner steps (MAML family) ---------------------------------------
  using pyoptk::InnerStepConfig;
  py::class_<InnerStepConfig>(m, "InnerStepConfig",
                              "Hyperparameters of one inner_sgd / inner_adam call.")
      .def(py::init([](double lr, uintptr_t lr_ptr, double beta1, double beta2, double eps,
                       int64_t step) {
             InnerStepConfig c;
             c.lr = lr;
             c.lr_ptr = lr_ptr;
             c.beta1 = beta1;
             c.beta2 = beta2;
             c.eps = eps;
             c.step = step;
             return c;
           }),
           py::kw_only(), py::arg("lr") = 0.0, py::arg("lr_ptr") = 0, py::arg("beta1") = 0.9,
           py::arg("beta2") = 0.999, py::arg("eps") = 1e-8, py::arg("step") = 1)
      .def_readwrite("lr", &InnerStepConfig::lr)
      .def_readwrite("lr_ptr", &InnerStepConfig::lr_ptr)
      .def_readwrite("beta1", &InnerStepConfig::beta1)
      .def_readwrite("beta2", &InnerStepConfig::beta2)
      .def_readwrite("eps", &InnerStepConfig::eps)
      .def_readwrite("step", &InnerStepConfig::step)
      .def("__repr__", [](const InnerStepConfig& c) {
        return "InnerStepConfig(lr=" + fmt(c.lr) + ", lr_ptr=" + std::to_string(c.lr_ptr) +
               ", beta1=" + fmt(c.beta1) + ", beta2=" + fmt(c.beta2) + ", eps=" + fmt(c.eps) +
               ", step=" + std::to_string(c.step) + ")";
      });
  m.def("inner_step_num_chunks", [](const SizeList& numels) {
    check_numels("inner_step_num_chunks", numels);
    return pyoptk::inner_step_num_chunks(numels);
  }, py::arg("numels"), "Chunks (partials slots) of a call over tensors of these sizes.");

  m.def(
      "inner_sgd_cpu",
      [](const PtrList& params, const PtrList& grads, const PtrList& lrs, const PtrList& out,
         const SizeList& numels, bool f64, const InnerStepConfig& cfg) {
        check_inner("inner_sgd_cpu", numels, {{"params", &params}, {"grads", &grads},
                    {"out", &out}}, {{"lrs", &lrs}});
        py::gil_scoped_release nogil;
        pyoptk::inner_sgd_cpu(params, grads, lrs, out, numels, f64, cfg);
      },
      py::arg("params"), py::arg("grads"), py::arg("lrs"), py::arg("out"), py::arg("numels"),
      py::arg("f64"), py::arg("cfg"),
      "out = params - lr*grads (lrs empty) or params - lrs*grads (MetaSGD), CPU.");
  m.def(
      "inner_sgd_backward_cpu",
      [](const PtrList& grads, const PtrList& lrs, const PtrList& d_params,
         const PtrList& d_grads, const PtrList& d_lrs, const SizeList& numels, bool f64,
         const InnerStepConfig& cfg, uintptr_t partials) {
        check_inner("inner_sgd_backward_cpu", numels, {{"grads", &grads},
                    {"d_params", &d_params}, {"d_grads", &d_grads}},
                    {{"lrs", &lrs}, {"d_lrs", &d_lrs}});
        if (lrs.size() != d_lrs.size()) bad("inner_sgd_backward_cpu", "lrs and d_lrs must both be given or both empty");
        py::gil_scoped_release nogil;
        pyoptk::inner_sgd_backward_cpu(grads, lrs, d_params, d_grads, d_lrs, numels, f64, cfg,
                                       partials);
      },
      py::arg("grads"), py::arg("lrs"), py::arg("d_params"), py::arg("d_grads"),
      py::arg("d_lrs"), py::arg("numels"), py::arg("f64"), py::arg("cfg"), py::arg("partials"),
      "VJPs of inner_sgd_cpu; partials (double per chunk, or 0) get sum(d_params*grads).");
  m.def(
      "inner_adam_cpu",
      [](const PtrList& params, const PtrList& grads, const PtrList& exp_avgs,
         const PtrList& exp_avg_sqs, const PtrList& params_out, const PtrList& exp_avgs_out,
         const PtrList& exp_avg_sqs_out, const SizeList& numels, bool f64,
         const InnerStepConfig& cfg) {
        check_inner("inner_adam_cpu", numels, {{"params", &params}, {"grads", &grads},
                    {"exp_avgs", &exp_avgs}, {"exp_avg_sqs", &exp_avg_sqs},
                    {"params_out", &params_out}, {"exp_avgs_out", &exp_avgs_out},
                    {"exp_avg_sqs_out", &exp_avg_sqs_out}});
        check_inner_adam_cfg("inner_adam_cpu", cfg);
        py::gil_scoped_release nogil;
        pyoptk::inner_adam_cpu(params, grads, exp_avgs, exp_avg_sqs, params_out, exp_avgs_out,
                               exp_avg_sqs_out, numels, f64, cfg);
      },
      py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
      py::arg("params_out"), py::arg("exp_avgs_out"), py::arg("exp_avg_sqs_out"),
      py::arg("numels"), py::arg("f64"), py::arg("cfg"), "One out-of-place Adam step, CPU.");
  m.def(
      "inner_adam_backward_cpu",
      [](const PtrList& grads, const PtrList& exp_avgs, const PtrList& exp_avg_sqs,
         const PtrList& d_params, const PtrList& d_exp_avgs, const PtrList& d_exp_avg_sqs,
         const PtrList& d_grads_out, const PtrList& d_exp_avgs_out,
         const PtrList& d_exp_avg_sqs_out, const SizeList& numels, bool f64,
         const InnerStepConfig& cfg, uintptr_t partials) {
        check_inner("inner_adam_backward_cpu", numels, {{"grads", &grads},
                    {"exp_avgs", &exp_avgs}, {"exp_avg_sqs", &exp_avg_sqs},
                    {"d_params", &d_params}, {"d_grads_out", &d_grads_out},
                    {"d_exp_avgs_out", &d_exp_avgs_out},
                    {"d_exp_avg_sqs_out", &d_exp_avg_sqs_out}},
                    {{"d_exp_avgs", &d_exp_avgs}, {"d_exp_avg_sqs", &d_exp_avg_sqs}});
        check_inner_adam_cfg("inner_adam_backward_cpu", cfg);
        py::gil_scoped_release nogil;
        pyoptk::inner_adam_backward_cpu(grads, exp_avgs, exp_avg_sqs, d_params, d_exp_avgs,
                                        d_exp_avg_sqs, d_grads_out, d_exp_avgs_out,
                                        d_exp_avg_sqs_out, numels, f64, cfg, partials);
      },
      py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("d_params"),
      py::arg("d_exp_avgs"), py::arg("d_exp_avg_sqs"), py::arg("d_grads_out"),
      py::arg("d_exp_avgs_out"), py::arg("d_exp_avg_sqs_out"), py::arg("numels"),
      py::arg("f64"), py::arg("cfg"), py::arg("partials"),
      "VJPs of inner_adam_cpu (one fused pass); d_exp_avgs / d_exp_avg_sqs may be empty "
      "(zero cotangents); partials (double per chunk, or 0) get sum(d_params * m'/denom).");

  m.def(
      "inner_sgd_cuda",
      [](const PtrList& params, const PtrList& grads, const PtrList& lrs, const PtrList& out,
         const SizeList& numels, bool f64, const InnerStepConfig& cfg, uintptr_t stream) {
#ifdef PYOPTK_WITH_CUDA
        check_inner("inner_sgd_cuda", numels, {{"params", &params}, {"grads", &grads},
                    {"out", &out}}, {{"lrs", &lrs}});
        py::gil_scoped_release nogil;
        pyoptk::inner_sgd_cuda(params, grads, lrs, out, numels, f64, cfg, stream);
#else
        (void)params, (void)grads, (void)lrs, (void)out, (void)numels, (void)f64, (void)cfg;
        (void)stream;
        no_cuda("inner_sgd_cuda");
#endif
      },
      py::arg("params"), py::arg("grads"), py::arg("lrs"), py::arg("out"), py::arg("numels"),
      py::arg("f64"), py::arg("cfg"), py::arg("stream"), "inner_sgd_cpu on CUDA tensors.");
  m.def(
      "inner_sgd_backward_cuda",
      [](const PtrList& grads, const PtrList& lrs, const PtrList& d_params,
         const PtrList& d_grads, const PtrList& d_lrs, const SizeList& numels, bool f64,
         const InnerStepConfig& cfg, uintptr_t partials, uintptr_t stream) {
#ifdef PYOPTK_WITH_CUDA
        check_inner("inner_sgd_backward_cuda", numels, {{"grads", &grads},
                    {"d_params", &d_params}, {"d_grads", &d_grads}},
                    {{"lrs", &lrs}, {"d_lrs", &d_lrs}});
        if (lrs.size() != d_lrs.size()) bad("inner_sgd_backward_cuda", "lrs and d_lrs must both be given or both empty");
        py::gil_scoped_release nogil;
        pyoptk::inner_sgd_backward_cuda(grads, lrs, d_params, d_grads, d_lrs, numels, f64, cfg,
                                        partials, stream);
#else
        (void)grads, (void)lrs, (void)d_params, (void)d_grads, (void)d_lrs, (void)numels;
        (void)f64, (void)cfg, (void)partials, (void)stream;
        no_cuda("inner_sgd_backward_cuda");
#endif
      },
      py::arg("grads"), py::arg("lrs"), py::arg("d_params"), py::arg("d_grads"),
      py::arg("d_lrs"), py::arg("numels"), py::arg("f64"), py::arg("cfg"), py::arg("partials"),
      py::arg("stream"), "inner_sgd_backward_cpu on CUDA tensors (partials in the compute dtype).");
  m.def(
      "inner_adam_cuda",
      [](const PtrList& params, const PtrList& grads, const PtrList& exp_avgs,
         const PtrList& exp_avg_sqs, const PtrList& params_out, const PtrList& exp_avgs_out,
         const PtrList& exp_avg_sqs_out, const SizeList& numels, bool f64,
         const InnerStepConfig& cfg, uintptr_t stream) {
#ifdef PYOPTK_WITH_CUDA
        check_inner("inner_adam_cuda", numels, {{"params", &params}, {"grads", &grads},
                    {"exp_avgs", &exp_avgs}, {"exp_avg_sqs", &exp_avg_sqs},
                    {"params_out", &params_out}, {"exp_avgs_out", &exp_avgs_out},
                    {"exp_avg_sqs_out", &exp_avg_sqs_out}});
        check_inner_adam_cfg("inner_adam_cuda", cfg);
        py::gil_scoped_release nogil;
        pyoptk::inner_adam_cuda(params, grads, exp_avgs, exp_avg_sqs, params_out, exp_avgs_out,
                                exp_avg_sqs_out, numels, f64, cfg, stream);
#else
        (void)params, (void)grads, (void)exp_avgs, (void)exp_avg_sqs, (void)params_out;
        (void)exp_avgs_out, (void)exp_avg_sqs_out, (void)numels, (void)f64, (void)cfg;
        (void)stream;
        no_cuda("inner_adam_cuda");
#endif
      },
      py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
      py::arg("params_out"), py::arg("exp_avgs_out"), py::arg("exp_avg_sqs_out"),
      py::arg("numels"), py::arg("f64"), py::arg("cfg"), py::arg("stream"),
      "inner_adam_cpu on CUDA tensors.");
  m.def(
      "inner_adam_backward_cuda",
      [](const PtrList& grads, const PtrList& exp_avgs, const PtrList& exp_avg_sqs,
         const PtrList& d_params, const PtrList& d_exp_avgs, const PtrList& d_exp_avg_sqs,
         const PtrList& d_grads_out, const PtrList& d_exp_avgs_out,
         const PtrList& d_exp_avg_sqs_out, const SizeList& numels, bool f64,
         const InnerStepConfig& cfg, uintptr_t partials, uintptr_t stream) {
#ifdef PYOPTK_WITH_CUDA
        check_inner("inner_adam_backward_cuda", numels, {{"grads", &grads},
                    {"exp_avgs", &exp_avgs}, {"exp_avg_sqs", &exp_avg_sqs},
                    {"d_params", &d_params}, {"d_grads_out", &d_grads_out},
                    {"d_exp_avgs_out", &d_exp_avgs_out},
                    {"d_exp_avg_sqs_out", &d_exp_avg_sqs_out}},
                    {{"d_exp_avgs", &d_exp_avgs}, {"d_exp_avg_sqs", &d_exp_avg_sqs}});
        check_inner_adam_cfg("inner_adam_backward_cuda", cfg);
        py::gil_scoped_release nogil;
        pyoptk::inner_adam_backward_cuda(grads, exp_avgs, exp_avg_sqs, d_params, d_exp_avgs,
                                         d_exp_avg_sqs, d_grads_out, d_exp_avgs_out,
                                         d_exp_avg_sqs_out, numels, f64, cfg, partials, stream);
#else
        (void)grads, (void)exp_avgs, (void)exp_avg_sqs, (void)d_params, (void)d_exp_avgs;
        (void)d_exp_avg_sqs, (void)d_grads_out, (void)d_exp_avgs_out, (void)d_exp_avg_sqs_out;
        (void)numels, (void)f64, (void)cfg, (void)partials, (void)stream;
        no_cuda("inner_adam_backward_cuda");
#endif
      },
      py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("d_params"),
      py::arg("d_exp_avgs"), py::arg("d_exp_avg_sqs"), py::arg("d_grads_out"),
      py::arg("d_exp_avgs_out"), py::arg("d_exp_avg_sqs_out"), py::arg("numels"),
      py::arg("f64"), py::arg("cfg"), py::arg("partials"), py::arg("stream"),
      "inner_adam_backward_cpu on CUDA tensors (partials in the compute dtype).");
}
