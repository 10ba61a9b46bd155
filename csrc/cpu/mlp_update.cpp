// Learned-MLP optimizer step (mlp_update_) on CPU: two OpenMP passes over all tensors of
// the call, the element math of pyoptk/mlp_update_math.h (shared with CUDA).
//
// Pass 1, one parallel loop over three kinds of work items, all tensors together:
//   * element chunks (kChunkSize elements of one tensor): the new momenta / second
//     moments (and full factored accumulators u_f of 0/1-dim tensors) in registers, and
//     per chunk the double sums of the squares of the N normalized planes, the sums of
//     the new u_f, and a non-finite flag of g;
//   * row blocks of 2+ dim tensors: per row, the double sum of g^2+fac_eps over its
//     columns (complete rows: no partials);
//   * column blocks of 2+ dim tensors: per column, the double sum over all rows.
//   Every sum has a fixed association (fixed lanes, fixed chunk order): the results
//   do not depend on the number of threads or on scheduling.
// Finalize (per tensor, O(chunks + rows + cols)): plane scales, new row/column
//   accumulators (written), vbar_f, the first-layer bias with the time features folded
//   in, and the step count (+1 unless skipped; empty tensors only count the step).
// Pass 2, parallel over element chunks, blocks of kL = 16 elements: recompute the
//   accumulators and features, run the MLP (fused multiply-adds, vectorized across the
//   block), write p (rounded once to its dtype), m, v, u. A tensor with a non-finite
//   gradient writes nothing.
// Workspace: O(chunks + rows + cols) host vectors; no per-element temporaries.
//
// Instruction sets: the chunk loops go through cpu::run_loop (baseline, AVX2+FMA and
// AVX-512 copies, PYOPTK_CPU_ISA caps the choice; see cpu_util.h). All do the same IEEE
// operations in the same order (the MLP's fused multiply-adds are explicit fmaf calls,
// a library call in the baseline copy), so results are identical.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <vector>

#include "cpu_util.h"
#include "pyoptk/api.h"
#include "pyoptk/mlp_update_math.h"

namespace pyoptk {
namespace {

using mlp::MLPConsts;
using mlp::MLPDims;
using mlp::MLPTensorScalars;

// Elements per block of pass 1/2 (the lane count L of the math functions): two AVX
// vectors of floats, enough independent accumulators for the FMA pipelines.
constexpr int kL = 16;

struct Tensor {
  uintptr_t p, g;
  float *m, *v, *fr, *fc, *step;
  int64_t numel, rows, cols;
  bool factored;
};

struct Call {
  MLPDims dm;
  MLPConsts<float> c;
  int N, NE, T, F, n_layers, max_width;
  float coef;
  std::vector<float> dec, omd, timescales;
  std::vector<const float*> w, b;  // layer weights and biases (b[0] replaced per tensor)
  SizeList widths;
  std::vector<Tensor> t;
  std::vector<cpu::Chunk> chunks;  // element chunks of all tensors
  std::vector<int64_t> first_chunk;
  // finalize outputs, per tensor: scale[N], vbar[F], b0'[H0]
  int fs;
  std::vector<float> fin;
  std::vector<char> ok;
  const float* fin_of(size_t i) const { return fin.data() + i * static_cast<size_t>(fs); }
};

// Fixed-tree sum of the L lane accumulators (pairwise, left to right).
PYOPTK_HD double combine(const double* a) {
  double s[kL];
  for (int l = 0; l < kL; ++l) s[l] = a[l];
  for (int w = kL / 2; w >= 1; w /= 2) {
    for (int l = 0; l < w; ++l) s[l] = s[2 * l] + s[2 * l + 1];
  }
  return s[0];
}

// Loads a block of nb <= kL elements at e0 into lane arrays; lanes past nb get 0.
template <typename T>
PYOPTK_HD void load_plane(const T* src, int64_t e0, int nb, float* dst) {
  if (nb == kL) {
    PYOPTK_LANES
    for (int l = 0; l < kL; ++l) dst[l] = load_f32(src[e0 + l]);
  } else {
    for (int l = 0; l < kL; ++l) dst[l] = l < nb ? load_f32(src[e0 + l]) : 0.0f;
  }
}

PYOPTK_HD void store_plane(float* dst, int64_t e0, int nb, const float* src) {
  if (nb == kL) {
    PYOPTK_LANES
    for (int l = 0; l < kL; ++l) dst[e0 + l] = src[l];
  } else {
    for (int l = 0; l < nb; ++l) dst[e0 + l] = src[l];
  }
}

// Scratch of one chunk (lane arrays, plane-major).
struct Scratch {
  std::vector<float> buf;
  float *g, *p, *m, *v, *u, *fa, *fb, *x, *work, *hidden, *out;
  std::vector<double> acc;
  explicit Scratch(const Call& cl) {
    const int K = cl.dm.K, R = cl.dm.R, F = cl.F;
    const size_t n = static_cast<size_t>(kL) *
                     (2 + K + R + F + F + F + std::max(cl.NE, cl.N) + 1 + 2 * cl.max_width + 2);
    buf.assign(n, 0.0f);
    float* q = buf.data();
    auto take = [&](int planes) {
      float* r = q;
      q += static_cast<size_t>(planes) * kL;
      return r;
    };
    g = take(1);
    p = take(1);
    m = take(K);
    v = take(R);
    u = take(F);
    fa = take(F);
    fb = take(F);
    x = take(std::max(cl.NE, cl.N));
    work = take(1);
    hidden = take(2 * cl.max_width);
    out = take(2);
  }
};

// ---- pass 1 -------------------------------------------------------------------------------
// Partial sums of one element chunk: N plane sums, F u-sums, non-finite flag.
template <typename T>
struct StatsChunk {
  PYOPTK_LOOP void run(const Call* cl, int64_t c, double* part) {
    const cpu::Chunk& ch = cl->chunks[static_cast<size_t>(c)];
    const Tensor& t = cl->t[static_cast<size_t>(ch.tensor)];
    const MLPDims dm = cl->dm;
    const int K = dm.K, R = dm.R, F = cl->F, N = cl->N;
    const bool full_fac = !t.factored && F > 0;
    Scratch s(*cl);
    std::vector<double> acc(static_cast<size_t>((N + F) * kL), 0.0);
    int bad = 0;
    const T* pp = cpu::as_ptr<const T>(t.p);
    const T* gp = cpu::as_ptr<const T>(t.g);
    const int64_t n = t.numel;
    for (int64_t off = 0; off < ch.len; off += kL) {
      const int64_t e0 = ch.begin + off;
      const int nb = static_cast<int>(std::min<int64_t>(kL, ch.len - off));
      load_plane(gp, e0, nb, s.g);
      load_plane(pp, e0, nb, s.p);
      for (int k = 0; k < K; ++k) load_plane(t.m + k * n, e0, nb, s.m + k * kL);
      for (int j = 0; j < R; ++j) load_plane(t.v + j * n, e0, nb, s.v + j * kL);
      if (full_fac) {
        for (int f = 0; f < F; ++f) load_plane(t.fr + f * n, e0, nb, s.u + f * kL);
      }
#pragma omp simd reduction(| : bad)
      for (int l = 0; l < kL; ++l) bad |= !(mlp::abs_(s.g[l]) < INFINITY);
      mlp::mlp_moments<float, kL>(dm, s.g, s.m, s.v, cl->dec.data(), cl->omd.data(), s.m, s.v);
      mlp::mlp_planes<float, kL>(dm, s.g, s.p, s.m, s.v, cl->c.eps, s.x);
      // Lane l of every block adds into accumulator l (the tail block's missing lanes
      // add nothing): a fixed association whatever the vector width.
      for (int i = 0; i < N; ++i) {
        double* a = acc.data() + i * kL;
        const float* xp = s.x + i * kL;
        if (nb == kL) {
          PYOPTK_LANES
          for (int l = 0; l < kL; ++l) {
            const double q = static_cast<double>(xp[l]);
            a[l] += q * q;
          }
        } else {
          for (int l = 0; l < nb; ++l) {
            const double q = static_cast<double>(xp[l]);
            a[l] += q * q;
          }
        }
      }
      if (full_fac) {
        mlp::mlp_full_fac<float, kL>(dm, s.g, s.u, cl->dec.data(), cl->omd.data(), cl->c.fac_eps,
                                     s.u);
        for (int f = 0; f < F; ++f) {
          double* a = acc.data() + (N + f) * kL;
          const float* up = s.u + f * kL;
          for (int l = 0; l < nb; ++l) a[l] += static_cast<double>(up[l]);
        }
      }
    }
    for (int i = 0; i < N + F; ++i) part[i] = combine(acc.data() + i * kL);
    part[N + F] = bad ? 1.0 : 0.0;
  }
};

// Row sums of g^2+fac_eps over the columns, rows [r0, r1) of a 2+ dim tensor.
template <typename T>
struct RowSums {
  PYOPTK_LOOP void run(const Tensor* t, int64_t r0, int64_t r1, float fac_eps, double* out) {
    const T* g = cpu::as_ptr<const T>(t->g);
    const int64_t cols = t->cols;
    for (int64_t r = r0; r < r1; ++r) {
      const T* row = g + r * cols;
      double a[cpu::kLanes] = {};
      const int64_t nb = cols - cols % cpu::kLanes;
      for (int64_t b = 0; b < nb; b += cpu::kLanes) {
        PYOPTK_LANES
        for (int k = 0; k < cpu::kLanes; ++k) {
          a[k] += static_cast<double>(mlp::fac_input(load_f32(row[b + k]), fac_eps));
        }
      }
      for (int64_t i = nb; i < cols; ++i) {
        a[i - nb] += static_cast<double>(mlp::fac_input(load_f32(row[i]), fac_eps));
      }
      out[r] = cpu::combine_lanes(a);
    }
  }
};

// Column sums of g^2+fac_eps over all rows, columns [c0, c1), rows in order.
template <typename T>
struct ColSums {
  PYOPTK_LOOP void run(const Tensor* t, int64_t c0, int64_t c1, float fac_eps, double* out) {
    const T* g = cpu::as_ptr<const T>(t->g);
    const int64_t cols = t->cols, w = c1 - c0;
    double* o = out + c0;
    for (int64_t c = 0; c < w; ++c) o[c] = 0.0;
    for (int64_t r = 0; r < t->rows; ++r) {
      const T* row = g + r * cols + c0;
      PYOPTK_LANES
      for (int64_t c = 0; c < w; ++c) {
        o[c] += static_cast<double>(mlp::fac_input(load_f32(row[c]), fac_eps));
      }
    }
  }
};

// ---- pass 2 -------------------------------------------------------------------------------
template <typename T>
struct ApplyChunk {
  PYOPTK_LOOP void run(const Call* cl, int64_t c) {
    const cpu::Chunk& ch = cl->chunks[static_cast<size_t>(c)];
    const size_t ti = static_cast<size_t>(ch.tensor);
    if (!cl->ok[ti]) return;  // non-finite gradient: write nothing
    const Tensor& t = cl->t[ti];
    const MLPDims dm = cl->dm;
    const int K = dm.K, R = dm.R, F = cl->F, N = cl->N;
    const float* fin = cl->fin_of(ti);
    const MLPTensorScalars<float> ts{fin, fin + N, t.factored};
    std::vector<const float*> b = cl->b;
    b[0] = fin + N + F;  // b0' with this tensor's time features
    Scratch s(*cl);
    T* pp = cpu::as_ptr<T>(t.p);
    const T* gp = cpu::as_ptr<const T>(t.g);
    const int64_t n = t.numel, rows = t.rows, cols = t.cols;
    const float coef = cl->coef;
    for (int64_t off = 0; off < ch.len; off += kL) {
      const int64_t e0 = ch.begin + off;
      const int nb = static_cast<int>(std::min<int64_t>(kL, ch.len - off));
      load_plane(gp, e0, nb, s.g);
      load_plane(static_cast<const T*>(pp), e0, nb, s.p);
      for (int k = 0; k < K; ++k) load_plane(t.m + k * n, e0, nb, s.m + k * kL);
      for (int j = 0; j < R; ++j) load_plane(t.v + j * n, e0, nb, s.v + j * kL);
      mlp::mlp_moments<float, kL>(dm, s.g, s.m, s.v, cl->dec.data(), cl->omd.data(), s.m, s.v);
      for (int k = 0; k < K; ++k) store_plane(t.m + k * n, e0, nb, s.m + k * kL);
      for (int j = 0; j < R; ++j) store_plane(t.v + j * n, e0, nb, s.v + j * kL);
      if (F > 0) {
        if (t.factored) {
          // row / column of each lane (lanes past nb repeat a valid index)
          int64_t r = e0 / cols, cc = e0 - (e0 / cols) * cols;
          for (int l = 0; l < kL; ++l) {
            for (int f = 0; f < F; ++f) {
              s.fa[f * kL + l] = t.fr[f * rows + r];
              s.fb[f * kL + l] = t.fc[f * cols + cc];
            }
            if (l + 1 < nb && ++cc == cols) {
              cc = 0;
              ++r;
            }
          }
        } else {
          for (int f = 0; f < F; ++f) load_plane(t.fr + f * n, e0, nb, s.fa + f * kL);
          mlp::mlp_full_fac<float, kL>(dm, s.g, s.fa, cl->dec.data(), cl->omd.data(),
                                       cl->c.fac_eps, s.fa);
          for (int f = 0; f < F; ++f) store_plane(t.fr + f * n, e0, nb, s.fa + f * kL);
        }
      }
      mlp::mlp_features<float, kL>(dm, cl->c, ts, s.g, s.p, s.m, s.v, s.fa, s.fb, s.x, s.work);
      mlp::mlp_forward<float, kL>(s.x, cl->NE, cl->n_layers, cl->widths.data(), cl->w.data(),
                                  b.data(), s.hidden, cl->max_width, s.out);
      const float* d = s.out;
      const float* a = s.out + kL;
      PYOPTK_LANES
      for (int l = 0; l < kL; ++l) s.work[l] = mlp::mlp_exp_arg(a[l], cl->c);
      for (int l = 0; l < kL; ++l) s.work[l] = mlp::exp_(s.work[l]);
      PYOPTK_LANES
      for (int l = 0; l < kL; ++l) {
        s.work[l] = mlp::mlp_apply_exp(s.p[l], d[l], s.work[l], coef, cl->c);
      }
      if (nb == kL) {
        PYOPTK_LANES
        for (int l = 0; l < kL; ++l) pp[e0 + l] = store_from_f32<T>(s.work[l]);
      } else {
        for (int l = 0; l < nb; ++l) pp[e0 + l] = store_from_f32<T>(s.work[l]);
      }
    }
  }
};

// f(i) for i in [0, n) on `threads` OpenMP threads (0: the OpenMP default).
template <typename Fn>
void parallel_items(int64_t n, int threads, Fn&& f) {
  if (n <= 0) return;
#ifdef PYOPTK_WITH_OPENMP
  const int nt = threads > 0 ? threads : omp_get_max_threads();
  if (n > 1 && nt > 1 && !omp_in_parallel()) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
#else
  (void)threads;
#endif
  for (int64_t i = 0; i < n; ++i) f(i);
}

struct FacItem {
  int32_t tensor;
  int32_t kind;  // 0 rows, 1 columns
  int64_t begin, end;
};

template <typename T>
void mlp_update_impl(Call& cl, const MLPUpdateConfig& cfg) {
  const size_t nt = cl.t.size();
  const int N = cl.N, F = cl.F;
  const int threads = cfg.num_threads;
  cl.chunks = cpu::make_chunks([&] {
    SizeList ns(nt);
    for (size_t i = 0; i < nt; ++i) ns[i] = cl.t[i].numel;
    return ns;
  }(), &cl.first_chunk);
  const int64_t nc = static_cast<int64_t>(cl.chunks.size());
  const int ps = N + F + 1;  // partials per chunk

  // Row and column sums of the factored tensors: offsets into one double buffer.
  std::vector<int64_t> row_off(nt, 0), col_off(nt, 0);
  std::vector<FacItem> fac_items;
  int64_t fac_total = 0;
  if (F > 0) {
    for (size_t i = 0; i < nt; ++i) {
      const Tensor& t = cl.t[i];
      if (!t.factored || t.numel == 0) continue;
      row_off[i] = fac_total;
      fac_total += t.rows;
      col_off[i] = fac_total;
      fac_total += t.cols;
      const int64_t rstep = std::max<int64_t>(1, kChunkSize / t.cols);
      for (int64_t r = 0; r < t.rows; r += rstep) {
        fac_items.push_back(FacItem{static_cast<int32_t>(i), 0, r, std::min(t.rows, r + rstep)});
      }
      const int64_t cstep = std::min<int64_t>(
          t.cols, std::max<int64_t>(64, (kChunkSize + t.rows - 1) / t.rows));
      for (int64_t c = 0; c < t.cols; c += cstep) {
        fac_items.push_back(FacItem{static_cast<int32_t>(i), 1, c, std::min(t.cols, c + cstep)});
      }
    }
  }
  std::vector<double> partials(static_cast<size_t>(nc * ps), 0.0);
  std::vector<double> fac_sums(static_cast<size_t>(fac_total), 0.0);
  const int64_t n_fac_items = static_cast<int64_t>(fac_items.size());
  const Call* clp = &cl;
  const float fac_eps = cl.c.fac_eps;
  parallel_items(nc + n_fac_items, threads, [&](int64_t i) {
    if (i < nc) {
      cpu::run_loop<StatsChunk<T>>(clp, i, partials.data() + i * ps);
      return;
    }
    const FacItem& it = fac_items[static_cast<size_t>(i - nc)];
    const Tensor* t = &cl.t[static_cast<size_t>(it.tensor)];
    if (it.kind == 0) {
      cpu::run_loop<RowSums<T>>(t, it.begin, it.end, fac_eps,
                           fac_sums.data() + row_off[static_cast<size_t>(it.tensor)]);
    } else {
      cpu::run_loop<ColSums<T>>(t, it.begin, it.end, fac_eps,
                           fac_sums.data() + col_off[static_cast<size_t>(it.tensor)]);
    }
  });

  // ---- finalize, per tensor ----
  const int H0 = static_cast<int>(cl.widths[1]);
  cl.fs = N + F + H0;
  cl.fin.assign(nt * static_cast<size_t>(cl.fs), 0.0f);
  cl.ok.assign(nt, 0);
  const int K = cl.dm.K, R = cl.dm.R;
  parallel_items(static_cast<int64_t>(nt), threads, [&](int64_t ii) {
    const size_t i = static_cast<size_t>(ii);
    const Tensor& t = cl.t[i];
    if (t.numel == 0) {
      *t.step += 1.0f;
      return;
    }
    std::vector<double> sums(static_cast<size_t>(ps), 0.0);
    for (int64_t c = cl.first_chunk[i]; c < cl.first_chunk[i + 1]; ++c) {  // fixed order
      const double* pc = partials.data() + c * ps;
      for (int q = 0; q < ps; ++q) sums[static_cast<size_t>(q)] += pc[q];
    }
    if (sums[static_cast<size_t>(N + F)] != 0.0) return;  // non-finite gradient: skipped
    cl.ok[i] = 1;
    float* fin = cl.fin.data() + i * static_cast<size_t>(cl.fs);
    const double n = static_cast<double>(t.numel);
    for (int q = 0; q < N; ++q) {
      const double sq = sums[static_cast<size_t>(q)];
      fin[q] = static_cast<float>(mlp::mlp_plane_scale(sq, n, cfg.norm_eps));
    }
    for (int f = 0; f < F; ++f) {
      const float d = cl.dec[static_cast<size_t>(K + R + f)];
      const float o = cl.omd[static_cast<size_t>(K + R + f)];
      if (t.factored) {
        const double* rs = fac_sums.data() + row_off[i];
        const double* cs = fac_sums.data() + col_off[i];
        double vsum = 0.0;
        float* fr = t.fr + f * t.rows;
        for (int64_t r = 0; r < t.rows; ++r) {
          const float mean = static_cast<float>(rs[r] / static_cast<double>(t.cols));
          fr[r] = mlp::mlp_factored_update(fr[r], mean, d, o);
          vsum += static_cast<double>(fr[r]);
        }
        float* fc = t.fc + f * t.cols;
        for (int64_t c = 0; c < t.cols; ++c) {
          const float mean = static_cast<float>(cs[c] / static_cast<double>(t.rows));
          fc[c] = mlp::mlp_factored_update(fc[c], mean, d, o);
        }
        fin[N + f] = static_cast<float>(vsum / static_cast<double>(t.rows));
      } else {
        fin[N + f] = static_cast<float>(sums[static_cast<size_t>(N + f)] / n);
      }
    }
    const float step_t = *t.step + 1.0f;  // this update's step number
    mlp::mlp_folded_bias<float>(step_t, cl.timescales.data(), cl.T, cl.w[0], cl.b[0], cl.NE, H0,
                                fin + N + F);
    *t.step = step_t;
  });

  // ---- pass 2 ----
  parallel_items(nc, threads, [&](int64_t c) { cpu::run_loop<ApplyChunk<T>>(clp, c); });
}

}  // namespace

// The math is also instantiated for double here (unused by the float32 kernel) so that
// the fp64 path of the shared header keeps compiling with the host compiler; the CUDA
// side instantiates it with L = 1.
namespace mlp {
template void mlp_moments<double, kL>(const MLPDims&, const double*, const double*,
                                      const double*, const double*, const double*, double*,
                                      double*);
template void mlp_full_fac<double, kL>(const MLPDims&, const double*, const double*,
                                       const double*, const double*, double, double*);
template void mlp_features<double, kL>(const MLPDims&, const MLPConsts<double>&,
                                       const MLPTensorScalars<double>&, const double*,
                                       const double*, const double*, const double*,
                                       const double*, const double*, double*, double*);
template void mlp_forward<double, kL>(const double*, int, int, const int64_t*,
                                      const double* const*, const double* const*, double*, int,
                                      double*);
template void mlp_folded_bias<double>(double, const double*, int, const double*,
                                      const double*, int, int, double*);
template double mlp_apply<double>(double, double, double, double, const MLPConsts<double>&);
}  // namespace mlp

void mlp_update_cpu(const PtrList& params, const PtrList& grads, const PtrList& moms,
                    const PtrList& rmss, const PtrList& fac_rows, const PtrList& fac_cols,
                    const PtrList& steps, const SizeList& numels, const SizeList& rows,
                    const SizeList& cols, int dtype, const PtrList& weights,
                    const SizeList& widths, uintptr_t decays, const MLPUpdateConfig& cfg) {
  const size_t nt = numels.size();
  if (nt == 0) return;
  Call cl;
  cl.dm = cfg.dims();
  cl.N = cl.dm.n_normalized();
  cl.NE = cl.dm.n_element();
  cl.F = cl.dm.F;
  cl.T = static_cast<int>(cfg.timescales.size());
  cl.n_layers = static_cast<int>(weights.size() / 2);
  cl.widths = widths;
  cl.max_width = 1;
  for (int i = 1; i < cl.n_layers; ++i) {
    cl.max_width = std::max(cl.max_width, static_cast<int>(widths[static_cast<size_t>(i)]));
  }
  for (int i = 0; i < cl.n_layers; ++i) {
    cl.w.push_back(cpu::as_ptr<const float>(weights[static_cast<size_t>(2 * i)]));
    cl.b.push_back(cpu::as_ptr<const float>(weights[static_cast<size_t>(2 * i + 1)]));
  }
  // Constants rounded to fp32 as the reference's python-float-with-fp32-tensor ops.
  cl.c.eps = static_cast<float>(cfg.eps);
  cl.c.fac_eps = static_cast<float>(cfg.fac_eps);
  cl.c.ls_k = static_cast<float>(cfg.log_sign_k);
  cl.c.ls_thr = static_cast<float>(std::exp(-cfg.log_sign_k));
  cl.c.ls_scale = static_cast<float>(std::exp(cfg.log_sign_k));
  cl.c.exp_mult = static_cast<float>(cfg.exp_mult);
  cl.c.weight_decay = static_cast<float>(cfg.weight_decay);
  const float lr = cfg.lr_ptr ? *cpu::as_ptr<const float>(cfg.lr_ptr) : static_cast<float>(cfg.lr);
  cl.coef = mlp::mlp_step_coef(lr, static_cast<float>(cfg.step_mult));
  const int nd = cl.dm.K + cl.dm.R + cl.dm.F;
  const float* dp = cpu::as_ptr<const float>(decays);
  for (int i = 0; i < nd; ++i) {
    cl.dec.push_back(dp[i]);
    cl.omd.push_back(1.0f - dp[i]);  // the reference's fp32 (1 - d)
  }
  for (double ts : cfg.timescales) cl.timescales.push_back(static_cast<float>(ts));
  cl.t.resize(nt);
  for (size_t i = 0; i < nt; ++i) {
    Tensor& t = cl.t[i];
    t.p = params[i];
    t.g = grads[i];
    t.m = cl.dm.K ? cpu::as_ptr<float>(moms[i]) : nullptr;
    t.v = cl.dm.R ? cpu::as_ptr<float>(rmss[i]) : nullptr;
    t.fr = cl.F ? cpu::as_ptr<float>(fac_rows[i]) : nullptr;
    t.fc = cl.F ? cpu::as_ptr<float>(fac_cols[i]) : nullptr;
    t.step = cpu::as_ptr<float>(steps[i]);
    t.numel = numels[i];
    t.factored = cols[i] > 0;
    t.rows = t.factored ? rows[i] : 0;
    t.cols = t.factored ? cols[i] : 0;
  }
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    mlp_update_impl<T>(cl, cfg);
  });
}

}  // namespace pyoptk
