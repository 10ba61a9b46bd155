// Fused backward of the differentiable learned-MLP step (torch.ops.pyoptk.mlp_step) on
// CPU. Given the cotangents of the step's outputs (params, moms, rmss, fac_rows,
// fac_cols) it recomputes the forward per element and produces every input gradient,
// storing no activations. The recomputed forward is the forward kernel's own math
// (pyoptk/mlp_update_math.h: accumulators, planes, features, folded bias, the MLP's
// layers), run on blocks of kB elements laid out plane-major as there; the
// backward-specific per-element math is pyoptk/mlp_step_grad_math.h. The specification
// is autograd through pyoptk.ops.mlp_update.mlp_update_one.
//
// Work units are tiles: chunks of kChunkSize elements for 0/1-dim tensors; for 2+ dim
// tensors viewed (rows, cols), (row group x column block) rectangles, so row and column
// reductions have a fixed number of partial slots (rowpart[col block][row],
// colpart[row group][col]) combined in a fixed order. Passes:
//   0  forward statistics: sum(P_i^2) per plane, row/column sums of g^2 + fac_eps (or
//      sum of the full accumulator), the all-finite flag;  finalize 1 (per tensor):
//      scales, new row/col accumulators, vbar, time features folded into b0 — the
//      forward's finalize functions.
//   B1 per element, in blocks of kB elements: features, MLP forward, backward
//      through the MLP (weight gradients accumulated per slot of tiles, then summed in
//      slot order), the local parts of all input gradients (written to the outputs),
//      and the reductions the remaining terms need: A_i = sum(dnormed_i * P_i), row and
//      column sums of the factored cotangents, dvbar.  finalize 2 (per tensor): row/col
//      gradients, factored decay gradients, B2 coefficients.
//   B2 per element: the terms coming back through the per-tensor reductions
//      (normalization scales, factored statistics), added to the outputs.
// All reductions keep partials per tile (double) summed in tile order: results do not
// depend on the thread count.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu_util.h"
#include "pyoptk/api.h"
#include "pyoptk/mlp_step_grad_math.h"
#include "pyoptk/mlp_update_math.h"

namespace pyoptk {
namespace {

using mlp::MLPConsts;
using mlp::MLPDims;
using mlp::MLPTensorScalars;

constexpr int kB = 64;                 // elements per block (the lane count L of the math)
constexpr int kMaxWidth = 128;         // widest layer (Python declines wider)
constexpr int kJB = 16;                // output columns per block of the weight-gradient sums
constexpr int64_t kColBlock = 4096;    // columns per tile of a 2+ dim tensor
constexpr int64_t kTileTarget = 65536; // elements per tile of a 2+ dim tensor
constexpr int64_t kMaxRowGroups = 64;  // row groups per 2+ dim tensor (colpart slots)
constexpr int64_t kSlots = 64;         // weight-gradient partial slots in B1

struct Tile {
  int32_t t;
  int64_t r0, r1, c0, c1;
  int64_t rg, cb;
};

template <typename T>
struct Work {
  int64_t n = 0, rows = 0, cols = 0;
  bool factored = false;
  int64_t n_rg = 0, n_cb = 0;
  const T *p, *g, *m0, *v0, *fr0, *fc0;
  T step;
  const T *Gp, *Gm, *Gv, *Gfr, *Gfc;
  T *dp, *dg, *dm0, *dv0, *dfr0, *dfc0;
  bool finite = true;
  std::vector<T> s, vbar, Rf, Cf, rowf, colf, rm, cm, b0eff, tf;
  std::vector<double> rowpart, colpart;  // [n_cb][rows][Q], [n_rg][cols][Q]
  std::vector<T> kappa, coefR, coefC, cu;
  int64_t first_tile = 0, end_tile = 0;
};

// Calls f(e) for every element of the tile, in row-major order.
template <typename F>
inline void for_tile_ranges(const Tile& tl, int64_t cols, F&& f) {
  if (tl.c0 == 0 && tl.c1 == cols) {
    f(tl.r0 * cols, tl.r1 * cols);
  } else {
    for (int64_t r = tl.r0; r < tl.r1; ++r) f(r * cols + tl.c0, r * cols + tl.c1);
  }
}

// Per-tile partial layout (doubles).
struct PartLayout {
  int N, F, KRF, H0;
  int off_A() const { return 0; }            // sum P^2 (pass 0) / sum dnormed*P (B1)
  int off_U() const { return N; }            // sum U (pass 0) / dvbar (B1), 0/1 dims
  int off_dec() const { return N + F; }      // decay cotangents
  int off_lr() const { return N + F + KRF; }
  int off_db0() const { return off_lr() + 1; }
  int off_finite() const { return off_db0() + H0; }
  int size() const { return off_finite() + 1; }
};

// Lane arrays of one block of kB elements, plane-major a[plane * kB + lane] (the layout of
// mlp_update_math.h): inputs, recomputed accumulators and planes, features.
template <typename T>
struct Block {
  std::vector<T> buf;
  T *g, *p, *m0, *v0, *u0, *m, *v, *P, *fa, *fb, *ivh, *x, *work;
  Block(int K, int R, int F, int N, int NE) {
    buf.assign(static_cast<size_t>(kB) * (2 + 2 * K + 2 * R + 4 * F + N + NE + 1), T(0));
    T* q = buf.data();
    auto take = [&](int planes) {
      T* r = q;
      q += static_cast<size_t>(planes) * kB;
      return r;
    };
    g = take(1);
    p = take(1);
    m0 = take(K);
    v0 = take(R);
    u0 = take(F);
    m = take(K);
    v = take(R);
    P = take(N);
    fa = take(F);
    fb = take(F);
    ivh = take(F);
    x = take(NE);
    work = take(1);
  }
};

// What the block kernels read: the call's constants, one tensor, one block.
template <typename T>
struct BlockArgs {
  MLPDims dm;
  MLPConsts<T> c;
  const T *dec, *omd;
  const Work<T>* w;
  Block<T>* bl;
  int64_t e0;   // first element of the block
  int nb;       // elements in the block (<= kB); lanes past nb are padding
  int64_t r0, c0;  // (row, col) of e0 (2+ dim tensors)
  // MLP (B1 only)
  int n_layers, n_elem;
  const int64_t* widths;
  const T* const* W;
  const T* const* bias;  // bias[0] unused: the tensor's folded b0eff
  T* const* act;         // per layer (out, kB): ReLU outputs, raw for the last layer
};

// Loads one plane of nb elements at e0; padding lanes get 0.
template <typename T>
PYOPTK_HD void load_lanes(const T* src, int64_t e0, int nb, T* dst) {
  for (int l = 0; l < kB; ++l) dst[l] = l < nb ? src[e0 + l] : T(0);
}

// The block's inputs, new momenta / second moments (and full factored accumulators of a
// 0/1-dim tensor, in fa) and unscaled planes: the forward's mlp_moments / mlp_planes /
// mlp_full_fac.
template <typename T>
PYOPTK_HD void recompute_planes(const BlockArgs<T>& a) {
  const Work<T>& w = *a.w;
  Block<T>& b = *a.bl;
  const int K = a.dm.K, R = a.dm.R, F = a.dm.F;
  const int64_t n = w.n;
  load_lanes(w.g, a.e0, a.nb, b.g);
  load_lanes(w.p, a.e0, a.nb, b.p);
  for (int k = 0; k < K; ++k) load_lanes(w.m0 + k * n, a.e0, a.nb, b.m0 + k * kB);
  for (int j = 0; j < R; ++j) load_lanes(w.v0 + j * n, a.e0, a.nb, b.v0 + j * kB);
  mlp::mlp_moments<T, kB>(a.dm, b.g, b.m0, b.v0, a.dec, a.omd, b.m, b.v);
  mlp::mlp_planes<T, kB>(a.dm, b.g, b.p, b.m, b.v, a.c.eps, b.P);
  if (!w.factored && F > 0) {
    for (int f = 0; f < F; ++f) load_lanes(w.fr0 + f * n, a.e0, a.nb, b.u0 + f * kB);
    mlp::mlp_full_fac<T, kB>(a.dm, b.g, b.u0, a.dec, a.omd, a.c.fac_eps, b.fa);
  }
}

// Pass 0 on one block: the recomputed planes and the forward's statistics (sum P_i^2,
// row/column sums of g^2 + fac_eps or the full accumulators' sums, the finite flag),
// accumulated in element order.
template <typename T>
struct Pass0Args {
  const BlockArgs<T>* ba;
  Work<T>* w;
  const Tile* tl;
  double* pp;
  const PartLayout* pl;
  T fac_eps;
  int Q;
  bool* finite;
};

template <typename T>
struct Pass0K {
  PYOPTK_LOOP void run(const Pass0Args<T>* ap) {
    const Pass0Args<T>& a = *ap;
    const BlockArgs<T>& ba = *a.ba;
    Work<T>& w = *a.w;
    const Tile& tl = *a.tl;
    const Block<T>& blk = *ba.bl;
    double* pp = a.pp;
    const PartLayout& pl = *a.pl;
    const int N = pl.N, F = pl.F, Q = a.Q, nb = ba.nb;
    const int64_t eb = ba.e0;
    recompute_planes(ba);
    bool finite = *a.finite;
    for (int l = 0; l < nb; ++l) finite = finite && std::isfinite(blk.g[l]);
    *a.finite = finite;
    for (int i = 0; i < N; ++i) {
      const T* Pi = blk.P + i * kB;
      double acc = pp[pl.off_A() + i];
      for (int l = 0; l < nb; ++l) {
        const double q = static_cast<double>(Pi[l]);
        acc += q * q;
      }
      pp[pl.off_A() + i] = acc;
    }
    if (w.factored) {
      if (F > 0) {
        int64_t r = eb / w.cols, c = eb - (eb / w.cols) * w.cols;
        for (int l = 0; l < nb; ++l) {
          const double g2e = static_cast<double>(mlp::fac_input(blk.g[l], a.fac_eps));
          w.rowpart[static_cast<size_t>((tl.cb * w.rows + r) * Q)] += g2e;
          w.colpart[static_cast<size_t>((tl.rg * w.cols + c) * Q)] += g2e;
          if (++c == w.cols) {
            c = 0;
            ++r;
          }
        }
      }
    } else {
      for (int f = 0; f < F; ++f)
        for (int l = 0; l < nb; ++l)
          pp[pl.off_U() + f] += static_cast<double>(blk.fa[f * kB + l]);
    }
  }
};

// B1's recomputed forward of a block: planes, features (keeping rsqrt(vhat+eps)) and
// every layer's output, the forward's functions throughout.
template <typename T>
struct B1ForwardK {
  PYOPTK_LOOP void run(const BlockArgs<T>* ap) {
    const BlockArgs<T>& a = *ap;
    const Work<T>& w = *a.w;
    Block<T>& b = *a.bl;
    const int F = a.dm.F, NE = a.n_elem;
    recompute_planes(a);
    if (w.factored && F > 0) {
      // new row / column accumulators of each lane (padding lanes repeat a valid index)
      int64_t r = a.r0, cc = a.c0;
      for (int l = 0; l < kB; ++l) {
        for (int f = 0; f < F; ++f) {
          b.fa[f * kB + l] = w.Rf[static_cast<size_t>(f * w.rows + r)];
          b.fb[f * kB + l] = w.Cf[static_cast<size_t>(f * w.cols + cc)];
        }
        if (l + 1 < a.nb && ++cc == w.cols) {
          cc = 0;
          ++r;
        }
      }
    }
    const MLPTensorScalars<T> ts{w.s.data(), w.vbar.data(), w.factored};
    mlp::mlp_scale_planes<T, kB>(a.dm, ts.scale, b.P, b.x);
    mlp::mlp_scale_free_features<T, kB, true>(a.dm, a.c, ts, b.g, b.m, b.fa, b.fb, b.x, b.work,
                                              b.ivh);
    // padding lanes: zero features (their cotangents are zero; keeps everything finite)
    for (int i = 0; i < NE; ++i)
      for (int l = a.nb; l < kB; ++l) b.x[i * kB + l] = T(0);
    // The MLP, layer by layer, every layer's output kept for the backward.
    const T* in = b.x;
    for (int i = 0; i < a.n_layers; ++i) {
      const bool last = i == a.n_layers - 1;
      const int din = i == 0 ? NE : static_cast<int>(a.widths[i]);
      const T* bias = i == 0 ? w.b0eff.data() : a.bias[i];
      mlp::mlp_layer<T, kB>(in, din, a.W[i], static_cast<int>(a.widths[i + 1]), bias, !last,
                            a.act[i]);
      in = a.act[i];
    }
  }
};

// B2's per-block scratch: cotangent lane arrays and per-lane decay partials.
template <typename T>
struct B2Scratch {
  std::vector<T> buf;
  T *dP, *dm, *dv, *dg, *dp, *dm0, *dv0;
  std::vector<double> dec;  // (K+R+F, kB) per-lane partials of the decay cotangents
  std::vector<T> dvh;       // (F, kB) B1: cotangents of vhat
  std::vector<double> lane1;  // (N+F+K+R+F, kB) B1: per-lane partials of the PartLayout
                              // sums A (N), U (F), decays (K+R+F)
  B2Scratch(int K, int R, int F, int N) {
    dvh.assign(static_cast<size_t>(F * kB), T(0));
    lane1.assign(static_cast<size_t>((N + F + K + R + F) * kB), 0.0);
    buf.assign(static_cast<size_t>(kB) * (N + 2 * K + 2 * R + 2), T(0));
    T* q = buf.data();
    auto take = [&](int planes) {
      T* r = q;
      q += static_cast<size_t>(planes) * kB;
      return r;
    };
    dP = take(N);
    dm = take(K);
    dv = take(R);
    dg = take(1);
    dp = take(1);
    dm0 = take(K);
    dv0 = take(R);
    dec.assign(static_cast<size_t>((K + R + F) * kB), 0.0);
  }
};

// B2 on one block: the terms through the per-tensor reductions, vectorized over lanes.
template <typename T>
struct B2K {
  PYOPTK_LOOP void run(const BlockArgs<T>* ap, const MsgScalars<T>* scp, B2Scratch<T>* sp) {
    const BlockArgs<T>& a = *ap;
    const MsgScalars<T>& sc = *scp;
    B2Scratch<T>& s = *sp;
    const Work<T>& w = *a.w;
    const Block<T>& b = *a.bl;
    const int K = sc.K, R = sc.R, F = sc.F, N = sc.N, KR = K + R;
    const int nb = a.nb;
    const int64_t n = w.n, e0 = a.e0;
    recompute_planes(a);
    for (int i = 0; i < N; ++i) {
      const T kap = w.kappa[static_cast<size_t>(i)];
      PYOPTK_LANES
      for (int l = 0; l < kB; ++l) s.dP[i * kB + l] = kap * b.P[i * kB + l];
    }
    for (int l = 0; l < kB * K; ++l) s.dm[l] = T(0);
    for (int l = 0; l < kB * R; ++l) s.dv[l] = T(0);
    for (int l = 0; l < kB; ++l) {
      s.dg[l] = T(0);
      s.dp[l] = T(0);
    }
    msg_planes_vjp_lanes<T, kB>(sc, b.g, b.P, b.m0, b.v0, s.dP, s.dm, s.dv, s.dg, s.dp, s.dm0,
                                s.dv0, s.dec.data(), nb);
    for (int k = 0; k < K; ++k) {
      T* o = w.dm0 + k * n + e0;
      const T* d = s.dm0 + k * kB;
      for (int l = 0; l < nb; ++l) o[l] += d[l];
    }
    for (int j = 0; j < R; ++j) {
      T* o = w.dv0 + j * n + e0;
      const T* d = s.dv0 + j * kB;
      for (int l = 0; l < nb; ++l) o[l] += d[l];
    }
    if (w.factored) {
      if (F > 0) {
        int64_t r = e0 / w.cols, c = e0 - (e0 / w.cols) * w.cols;
        for (int l = 0; l < nb; ++l) {
          s.dg[l] += T(2) * b.g[l] *
                     (w.coefR[static_cast<size_t>(r)] + w.coefC[static_cast<size_t>(c)]);
          if (++c == w.cols) {
            c = 0;
            ++r;
          }
        }
      }
    } else {
      for (int f = 0; f < F; ++f) {
        const T gam = sc.dec[KR + f], cu = w.cu[static_cast<size_t>(f)];
        T* dfr = w.dfr0 + f * n + e0;
        const T* fr = w.fr0 + f * n + e0;
        double* pd = s.dec.data() + (KR + f) * kB;
        for (int l = 0; l < nb; ++l) {
          dfr[l] += gam * cu;
          s.dg[l] += T(2) * b.g[l] * ((T(1) - gam) * cu);
          pd[l] += static_cast<double>(cu * (fr[l] - mlp::fac_input(b.g[l], sc.fac_eps)));
        }
      }
    }
    T* og = w.dg + e0;
    T* op = w.dp + e0;
    for (int l = 0; l < nb; ++l) {
      og[l] += s.dg[l];
      op[l] += s.dp[l];
    }
  }
};

// B1's epilogue on one block, vectorized over lanes: from the features' cotangents dx
// (n_elem, kB) the local parts of every input gradient (written) and the per-lane
// partials of the reductions (s.lane1); the factored row/column partials (shared by the
// lanes of a row) are added lane by lane, in element order.
template <typename T>
struct EpilogueArgs {
  const BlockArgs<T>* ba;
  Work<T>* w;              // the tensor (its row / column partials are written)
  const MsgScalars<T>* sc;
  B2Scratch<T>* s;
  const T* dx;
  const int64_t *rr, *cc;  // row / column of each lane (2+ dim tensors)
  int64_t cb, rg;          // the tile's column block / row group
  T coef;
};

template <typename T>
struct EpilogueK {
  PYOPTK_LOOP void run(const EpilogueArgs<T>* ep) {
    const BlockArgs<T>& a = *ep->ba;
    const MsgScalars<T>& sc = *ep->sc;
    B2Scratch<T>& s = *ep->s;
    const Work<T>& w = *a.w;
    const Block<T>& b = *a.bl;
    const T* dx = ep->dx;
    const MLPDims& dm = a.dm;
    const int K = sc.K, R = sc.R, F = sc.F, N = sc.N, KR = K + R, Q = 2 * F;
    const int nb = a.nb;
    const int64_t n = w.n, e0 = a.e0;
    double* lA = s.lane1.data();
    double* lU = lA + N * kB;
    double* lD = lU + F * kB;
    // planes: log-sign VJP onto g_hat, the A_i partials, then the scales
    for (int i = 0; i < N; ++i) {
      PYOPTK_LANES
      for (int l = 0; l < kB; ++l) s.dP[i * kB + l] = dx[i * kB + l];
    }
    PYOPTK_LANES
    for (int l = 0; l < kB; ++l)
      s.dP[l] += msg_log_sign_vjp(b.x[l], sc, dx[N * kB + l], dx[(N + 1) * kB + l]);
    for (int i = 0; i < N; ++i) {
      const T si = w.s[static_cast<size_t>(i)];
      PYOPTK_LANES
      for (int l = 0; l < kB; ++l) {
        const double q = static_cast<double>(s.dP[i * kB + l] * b.P[i * kB + l]);
        lA[i * kB + l] += l < nb ? q : 0.0;
        s.dP[i * kB + l] *= si;
      }
    }
    for (int k = 0; k < K; ++k) load_lanes(w.Gm + k * n, e0, nb, s.dm + k * kB);
    for (int j = 0; j < R; ++j) load_lanes(w.Gv + j * n, e0, nb, s.dv + j * kB);
    const T cwd = ep->coef * sc.weight_decay;
    for (int l = 0; l < kB; ++l) {
      const T gp = l < nb ? w.Gp[e0 + l] : T(0);
      s.dg[l] = T(0);
      s.dp[l] = gp - gp * cwd;
    }
    // factored features
    const bool fm = sc.fmi >= 0;
    for (int f = 0; f < F; ++f) {
      const T* dfg = dx + (dm.off_fac_g() + f) * kB;
      const T* dfm = dx + (dm.off_fac_m() + f) * kB;
      const T* drow = dx + (dm.off_row() + f) * kB;
      const T* dcol = dx + (dm.off_col() + f) * kB;
      const T* ivh = b.ivh + f * kB;
      T* dvh = s.dvh.data() + f * kB;
      if (fm) {
        const T* mf = b.m + sc.fmi * kB;
        T* dmf = s.dm + sc.fmi * kB;
        PYOPTK_LANES
        for (int l = 0; l < kB; ++l) {
          T divh = dfg[l] * b.g[l];
          s.dg[l] += dfg[l] * ivh[l];
          divh += dfm[l] * mf[l];
          dmf[l] += dfm[l] * ivh[l];
          dvh[l] = msg_rsqrt_vjp(ivh[l], divh);
        }
      } else {
        PYOPTK_LANES
        for (int l = 0; l < kB; ++l) {
          const T divh = dfg[l] * b.g[l];
          s.dg[l] += dfg[l] * ivh[l];
          dvh[l] = msg_rsqrt_vjp(ivh[l], divh);
        }
      }
      if (w.factored) {
        for (int l = 0; l < nb; ++l) {
          double* rp = &ep->w->rowpart[static_cast<size_t>((ep->cb * w.rows + ep->rr[l]) * Q + 2 * f)];
          double* cp = &ep->w->colpart[static_cast<size_t>((ep->rg * w.cols + ep->cc[l]) * Q + 2 * f)];
          rp[0] += static_cast<double>(dvh[l] * b.fb[f * kB + l]);  // * C_f[c]
          rp[1] += static_cast<double>(drow[l]);
          cp[0] += static_cast<double>(dvh[l] * b.fa[f * kB + l]);  // * R_f[r]
          cp[1] += static_cast<double>(dcol[l]);
        }
      } else {
        const T vb = w.vbar[static_cast<size_t>(f)];
        const T gam = sc.dec[KR + f];
        const T* rfp = b.x + (dm.off_row() + f) * kB;
        const T* U = b.fa + f * kB;
        const T* u0 = b.u0 + f * kB;
        T* dfr = w.dfr0 + f * n + e0;
        const T* Gfr = w.Gfr + f * n + e0;
        for (int l = 0; l < kB; ++l) {
          const T rf = rfp[l];
          const T rf3 = rf * rf * rf;
          const T dsum = drow[l] + dcol[l];
          const T gfr = l < nb ? Gfr[l] : T(0);
          const T dU = dvh[l] + dsum * (T(-0.5) * rf3 / vb) + gfr;
          const double qu = static_cast<double>(dsum * (T(0.5) * rf3 * U[l] / (vb * vb)));
          lU[f * kB + l] += l < nb ? qu : 0.0;
          if (l < nb) dfr[l] = gam * dU;
          s.dg[l] += T(2) * b.g[l] * ((T(1) - gam) * dU);
          const double qd = static_cast<double>(dU * (u0[l] - mlp::fac_input(b.g[l], sc.fac_eps)));
          lD[(KR + f) * kB + l] += l < nb ? qd : 0.0;
        }
      }
    }
    msg_planes_vjp_lanes<T, kB>(sc, b.g, b.P, b.m0, b.v0, s.dP, s.dm, s.dv, s.dg, s.dp, s.dm0,
                                s.dv0, lD, nb);
    for (int k = 0; k < K; ++k) {
      T* o = w.dm0 + k * n + e0;
      const T* d = s.dm0 + k * kB;
      for (int l = 0; l < nb; ++l) o[l] = d[l];
    }
    for (int j = 0; j < R; ++j) {
      T* o = w.dv0 + j * n + e0;
      const T* d = s.dv0 + j * kB;
      for (int l = 0; l < nb; ++l) o[l] = d[l];
    }
    T* og = w.dg + e0;
    T* op = w.dp + e0;
    for (int l = 0; l < nb; ++l) {
      og[l] = s.dg[l];
      op[l] = s.dp[l];
    }
  }
};

// One block through the MLP's backward, SoA buffers [feature][lane]. Kept free of
// lambdas and calls so that cpu::run_loop compiles it for AVX2 / AVX-512 as well.
template <typename T>
struct MlpBatch {
  int L, n_elem;
  const int64_t* widths;   // (n_features, hidden..., 2)
  const T* const* Wt;      // (out, in) per layer: the transposed weights (layer 0: its
                           // first n_elem rows only)
  const T* zeros;          // (max width,) zero bias of the transposed products
  const T* X;              // (n_elem, kB) inputs
  T* const* act;           // per layer (out, kB): ReLU outputs, raw for the last layer
  T *dA, *dZ, *dZT;        // (max width, kB) cotangent buffers; dA holds (2, kB) on entry
  double* dW;              // weight-gradient accumulators, laid out by w_off
  const int64_t* w_off;
  double* db0;             // per-tile sum of the first layer's pre-activation cotangents
};

// dA (2, kB) = cotangents of (d, a) on entry; on exit dA (n_elem, kB) = cotangents of the
// per-element features; dW and db0 accumulated.
// dW_l[i][j] += sum_b A[i][b] * dZT[b][j] for BI rows i0.. and JW columns j0.. of the
// zero-padded dZT (only j < out are stored): the sum over the block's lanes b in lane
// order with fused multiply-adds, then added to the double partial. BI x JW independent
// accumulators (vectorized over j), as the forward's mlp_layer_cols.
template <typename T, int BI, int JW>
PYOPTK_HD void dw_tile(const T* PYOPTK_RESTRICT A, const T* PYOPTK_RESTRICT dZT, int op, int out,
                       int i0, int j0, double* PYOPTK_RESTRICT dWl) {
  T acc[BI][JW];
#pragma GCC unroll 8
  for (int ii = 0; ii < BI; ++ii) {
    PYOPTK_LANES
    for (int jj = 0; jj < JW; ++jj) acc[ii][jj] = T(0);
  }
  for (int b = 0; b < kB; ++b) {
    const T* d = dZT + b * op + j0;
#pragma GCC unroll 8
    for (int ii = 0; ii < BI; ++ii) {
      const T x = A[(i0 + ii) * kB + b];
      PYOPTK_LANES
      for (int jj = 0; jj < JW; ++jj) acc[ii][jj] = mlp::fma_rn(x, d[jj], acc[ii][jj]);
    }
  }
  const int nj = out - j0 < JW ? out - j0 : JW;
  for (int ii = 0; ii < BI; ++ii)
    for (int jj = 0; jj < nj; ++jj) dWl[(i0 + ii) * out + j0 + jj] += static_cast<double>(acc[ii][jj]);
}

template <typename T, int BI>
PYOPTK_HD void dw_rows(const T* A, const T* dZT, int op, int out, int i0, double* dWl) {
  int j0 = 0;
  for (; j0 + 2 * kJB <= op; j0 += 2 * kJB) dw_tile<T, BI, 2 * kJB>(A, dZT, op, out, i0, j0, dWl);
  for (; j0 < op; j0 += kJB) dw_tile<T, BI, kJB>(A, dZT, op, out, i0, j0, dWl);
}

template <typename T>
struct MlpBackwardK {
  PYOPTK_LOOP void run(const MlpBatch<T>* mp) {
    const MlpBatch<T>& m = *mp;
    // -- backward through the MLP --
    for (int l = m.L - 1; l >= 0; --l) {
      const int in = (l == 0) ? m.n_elem : static_cast<int>(m.widths[l]);
      const int out = static_cast<int>(m.widths[l + 1]);
      const T* A_in = (l == 0) ? m.X : m.act[l - 1];
      const T* Z = m.act[l];
      // dZ = dA (masked by the ReLU for hidden layers); also its transpose dZT [b][op],
      // zero-padded to a multiple of kJB columns so the sums below vectorize over j.
      const int op = (out + kJB - 1) / kJB * kJB;
      for (int j = 0; j < out; ++j) {
        for (int b = 0; b < kB; ++b) {
          const T x = m.dA[(j * kB + b)];
          const T dz = (l < m.L - 1) ? (Z[j * kB + b] > T(0) ? x : T(0)) : x;
          m.dZ[(j * kB + b)] = dz;
          m.dZT[(b * op + j)] = dz;
        }
      }
      for (int j = out; j < op; ++j)
        for (int b = 0; b < kB; ++b) m.dZT[(b * op + j)] = T(0);
      // db_l[j] += sum_b dZ[j][b];  dW_l[i][j] += sum_b A_in[i][b] dZ[j][b]
      double* dWl = m.dW + m.w_off[2 * l];
      double* dbl = m.dW + m.w_off[2 * l + 1];
      for (int j0 = 0; j0 < op; j0 += kJB) {
        const int nj = out - j0 < kJB ? out - j0 : kJB;
        T acc[kJB];
        for (int jj = 0; jj < kJB; ++jj) acc[jj] = T(0);
        for (int b = 0; b < kB; ++b) {
          const T* d = m.dZT + b * op + j0;
          for (int jj = 0; jj < kJB; ++jj) acc[jj] += d[jj];
        }
        for (int jj = 0; jj < nj; ++jj) {
          dbl[j0 + jj] += static_cast<double>(acc[jj]);
          if (l == 0) m.db0[j0 + jj] += static_cast<double>(acc[jj]);
        }
      }
      int i0 = 0;
      for (; i0 + 4 <= in; i0 += 4) dw_rows<T, 4>(A_in, m.dZT, op, out, i0, dWl);
      for (; i0 < in; ++i0) dw_rows<T, 1>(A_in, m.dZT, op, out, i0, dWl);
      // dA_in[i][b] = sum_j W[i][j] dZ[j][b]: the forward's layer product with the
      // transposed weights Wt_l (out, in) and a zero bias (fused multiply-adds in j order)
      mlp::mlp_layer<T, kB>(m.dZ, out, m.Wt[l], in, m.zeros, false, m.dA);
    }
  }
};

// f(i, thread) for i in [0, n) on up to `threads` OpenMP threads (dynamic schedule, as
// cpu::parallel_for), serially on thread 0 when there is one item or one thread. Every
// reduction is kept per item and combined in item order, so the results do not depend
// on `threads`.
template <typename F>
inline void par_for(int64_t n, int threads, F&& f) {
  if (n <= 0) return;
#ifdef PYOPTK_WITH_OPENMP
  if (n > 1 && threads > 1 && !omp_in_parallel()) {
    const int nt = static_cast<int>(std::min<int64_t>(threads, n));
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int64_t i = 0; i < n; ++i) f(i, omp_get_thread_num());
    return;
  }
#endif
  (void)threads;
  for (int64_t i = 0; i < n; ++i) f(i, 0);
}

// One thread's block buffers, made once per call and reused by every tile / slot that
// thread runs (each pass writes every lane array before reading it; the per-lane
// partials B1 and B2 accumulate are zeroed again after each tile).
template <typename T>
struct ThreadBuffers {
  Block<T> blk;
  B2Scratch<T> scr;
  std::vector<std::vector<T>> act;  // B1: each layer's output (out, kB)
  std::vector<T*> act_ptrs;
  std::vector<T> dA, dZ, dZT;       // B1: cotangent buffers
  ThreadBuffers(int K, int R, int F, int N, int n_elem, const std::vector<int64_t>& widths,
                int max_w)
      : blk(K, R, F, N, n_elem), scr(K, R, F, N) {
    const size_t L = widths.size() - 1;
    act.resize(L);
    act_ptrs.resize(L);
    for (size_t l = 0; l < L; ++l) {
      act[l].assign(static_cast<size_t>(widths[l + 1] * kB), T(0));
      act_ptrs[l] = act[l].data();
    }
    dA.assign(static_cast<size_t>(max_w * kB), T(0));
    dZ.assign(static_cast<size_t>(max_w * kB), T(0));
    dZT.assign(static_cast<size_t>((max_w + kJB - 1) / kJB * kJB * kB), T(0));
  }
};

template <typename T>
void mlp_step_grad_impl(const MLPStepGradTensors& a, const MLPUpdateConfig& cfg) {
  const size_t nt = a.numels.size();
  const MLPDims dm = cfg.dims();
  const int K = cfg.n_mom, R = cfg.n_rms, F = cfg.n_fac;
  const int KR = K + R, KRF = K + R + F;
  const int N = dm.n_normalized();
  const int n_elem = dm.n_element();
  const int n_time = static_cast<int>(cfg.timescales.size());
  const int L = static_cast<int>(a.widths.size()) - 1;  // layers
  const int H0 = static_cast<int>(a.widths[1]);
  const int Q = 2 * F;

  std::vector<const T*> W(L), bias(L);
  for (int l = 0; l < L; ++l) {
    W[l] = cpu::as_ptr<const T>(a.weights[2 * l]);
    bias[l] = cpu::as_ptr<const T>(a.weights[2 * l + 1]);
  }
  std::vector<int64_t> w_off(2 * L + 1, 0);  // offsets of each weight in dW
  for (int l = 0; l < L; ++l) {
    w_off[2 * l + 1] = w_off[2 * l] + a.widths[l] * a.widths[l + 1];
    w_off[2 * l + 2] = w_off[2 * l + 1] + a.widths[l + 1];
  }
  const int64_t n_w = w_off[2 * L];

  MsgScalars<T> sc;
  sc.K = K;
  sc.R = R;
  sc.F = F;
  sc.fmi = cfg.fac_mom_index;
  sc.N = N;
  sc.n_elem = n_elem;
  sc.log_sign_k = static_cast<T>(cfg.log_sign_k);
  sc.log_sign_thr = static_cast<T>(std::exp(-cfg.log_sign_k));
  sc.log_sign_ek = static_cast<T>(std::exp(cfg.log_sign_k));
  sc.eps = static_cast<T>(cfg.eps);
  sc.norm_eps = static_cast<T>(cfg.norm_eps);
  sc.fac_eps = static_cast<T>(cfg.fac_eps);
  sc.exp_mult = static_cast<T>(cfg.exp_mult);
  sc.step_mult = static_cast<T>(cfg.step_mult);
  sc.lr = cfg.lr_ptr ? *cpu::as_ptr<const T>(cfg.lr_ptr) : static_cast<T>(cfg.lr);
  sc.weight_decay = static_cast<T>(cfg.weight_decay);
  sc.dec = cpu::as_ptr<const T>(a.decays);
  const T coef = mlp::mlp_step_coef(sc.lr, sc.step_mult);
  // The forward's constants and decays, rounded to T as the forward kernel rounds them.
  MLPConsts<T> mc;
  mc.eps = sc.eps;
  mc.fac_eps = sc.fac_eps;
  mc.ls_k = sc.log_sign_k;
  mc.ls_thr = sc.log_sign_thr;
  mc.ls_scale = sc.log_sign_ek;
  mc.exp_mult = sc.exp_mult;
  mc.weight_decay = sc.weight_decay;
  std::vector<T> omd(static_cast<size_t>(KRF));
  for (int i = 0; i < KRF; ++i) omd[static_cast<size_t>(i)] = T(1) - sc.dec[i];
  std::vector<T> timescales(static_cast<size_t>(n_time));
  for (int j = 0; j < n_time; ++j)
    timescales[static_cast<size_t>(j)] = static_cast<T>(cfg.timescales[static_cast<size_t>(j)]);
  const BlockArgs<T> args0{dm, mc, sc.dec, omd.data(), nullptr, nullptr, 0, 0, 0, 0,
                           L, n_elem, a.widths.data(), W.data(), bias.data(), nullptr};

  // ---- tensors and tiles -----------------------------------------------------------
  std::vector<Work<T>> ws(nt);
  std::vector<Tile> tiles;
  for (size_t t = 0; t < nt; ++t) {
    Work<T>& w = ws[t];
    w.n = a.numels[t];
    w.rows = a.rows[t];
    w.cols = a.cols[t];
    w.factored = a.factored[t] != 0;
    w.p = cpu::as_ptr<const T>(a.params[t]);
    w.g = cpu::as_ptr<const T>(a.grads[t]);
    w.m0 = cpu::as_ptr<const T>(a.moms[t]);
    w.v0 = cpu::as_ptr<const T>(a.rmss[t]);
    w.fr0 = cpu::as_ptr<const T>(a.fac_rows[t]);
    w.fc0 = cpu::as_ptr<const T>(a.fac_cols[t]);
    w.step = *cpu::as_ptr<const T>(a.steps[t]);
    w.Gp = cpu::as_ptr<const T>(a.d_params_out[t]);
    w.Gm = cpu::as_ptr<const T>(a.d_moms_out[t]);
    w.Gv = cpu::as_ptr<const T>(a.d_rmss_out[t]);
    w.Gfr = cpu::as_ptr<const T>(a.d_fac_rows_out[t]);
    w.Gfc = cpu::as_ptr<const T>(a.d_fac_cols_out[t]);
    w.dp = cpu::as_ptr<T>(a.d_params[t]);
    w.dg = cpu::as_ptr<T>(a.d_grads[t]);
    w.dm0 = cpu::as_ptr<T>(a.d_moms[t]);
    w.dv0 = cpu::as_ptr<T>(a.d_rmss[t]);
    w.dfr0 = cpu::as_ptr<T>(a.d_fac_rows[t]);
    w.dfc0 = cpu::as_ptr<T>(a.d_fac_cols[t]);
    w.first_tile = static_cast<int64_t>(tiles.size());
    if (w.n > 0) {
      if (w.factored) {
        const int64_t cbw = std::min<int64_t>(w.cols, kColBlock);
        w.n_cb = (w.cols + cbw - 1) / cbw;
        int64_t rg_rows = std::max<int64_t>(1, kTileTarget / cbw);
        rg_rows = std::max<int64_t>(rg_rows, (w.rows + kMaxRowGroups - 1) / kMaxRowGroups);
        w.n_rg = (w.rows + rg_rows - 1) / rg_rows;
        for (int64_t rg = 0; rg < w.n_rg; ++rg) {
          for (int64_t cb = 0; cb < w.n_cb; ++cb) {
            tiles.push_back(Tile{static_cast<int32_t>(t), rg * rg_rows,
                                 std::min(w.rows, (rg + 1) * rg_rows), cb * cbw,
                                 std::min(w.cols, (cb + 1) * cbw), rg, cb});
          }
        }
        w.rowpart.assign(static_cast<size_t>(w.n_cb * w.rows * std::max(Q, 1)), 0.0);
        w.colpart.assign(static_cast<size_t>(w.n_rg * w.cols * std::max(Q, 1)), 0.0);
      } else {
        int64_t cb = 0;
        for (int64_t b = 0; b < w.n; b += kChunkSize, ++cb) {
          tiles.push_back(Tile{static_cast<int32_t>(t), 0, 1, b,
                               std::min(w.n, b + kChunkSize), 0, cb});
        }
      }
    }
    w.end_tile = static_cast<int64_t>(tiles.size());
  }
  const int64_t n_tiles = static_cast<int64_t>(tiles.size());
  const PartLayout pl{N, F, KRF, H0};
  const int P = pl.size();
  std::vector<double> part(static_cast<size_t>(n_tiles * P), 0.0);

  // Threads: the caller's count (torch.get_num_threads()), else the OpenMP default.
  int threads = cfg.num_threads;
#ifdef PYOPTK_WITH_OPENMP
  if (threads <= 0) threads = omp_get_max_threads();
#endif
  threads = std::max(threads, 1);
  // The per-tensor finalize passes are O(rows + cols) each: serial unless that is large.
  int64_t fin_work = 0;
  for (size_t t = 0; t < nt; ++t) fin_work += ws[t].factored ? ws[t].rows + ws[t].cols : 1;
  const int fin_threads = fin_work >= 65536 ? threads : 1;
  int max_w = 2;
  for (size_t l = 0; l < a.widths.size(); ++l)
    max_w = std::max<int>(max_w, static_cast<int>(a.widths[l]));
  std::vector<std::unique_ptr<ThreadBuffers<T>>> pool(static_cast<size_t>(threads));
  auto buffers = [&](int tid) -> ThreadBuffers<T>& {
    std::unique_ptr<ThreadBuffers<T>>& b = pool[static_cast<size_t>(tid)];
    if (!b) b.reset(new ThreadBuffers<T>(K, R, F, N, n_elem, a.widths, max_w));
    return *b;
  };


  // ---- pass 0: the forward's statistics ------------------------------------------------
  par_for(n_tiles, threads, [&](int64_t ti, int tid) {
    const Tile& tl = tiles[static_cast<size_t>(ti)];
    Work<T>& w = ws[static_cast<size_t>(tl.t)];
    double* pp = &part[static_cast<size_t>(ti * P)];
    Block<T>& blk = buffers(tid).blk;
    BlockArgs<T> ba = args0;
    ba.w = &w;
    ba.bl = &blk;
    bool finite = true;
    const Pass0Args<T> p0{&ba, &w, &tl, pp, &pl, sc.fac_eps, Q, &finite};
    for_tile_ranges(tl, w.cols, [&](int64_t e0, int64_t e1) {
      for (int64_t eb = e0; eb < e1; eb += kB) {
        ba.e0 = eb;
        ba.nb = static_cast<int>(std::min<int64_t>(kB, e1 - eb));
        cpu::run_loop<Pass0K<T>>(&p0);
      }
    });
    pp[pl.off_finite()] = finite ? 1.0 : 0.0;
  });

  // ---- finalize 1 (per tensor): the forward's finalize ----------------------------------
  const T* W0 = W[0];
  par_for(static_cast<int64_t>(nt), fin_threads, [&](int64_t tt, int) {  // tensors independent
    Work<T>& w = ws[static_cast<size_t>(tt)];
    if (w.n == 0) return;
    std::vector<double> sum(static_cast<size_t>(P), 0.0);
    bool finite = true;
    for (int64_t ti = w.first_tile; ti < w.end_tile; ++ti) {
      const double* pp = &part[static_cast<size_t>(ti * P)];
      for (int i = 0; i < P; ++i) sum[static_cast<size_t>(i)] += pp[i];
      finite = finite && pp[pl.off_finite()] != 0.0;
    }
    w.finite = finite;
    if (!finite) return;
    const double nd = static_cast<double>(w.n);
    w.s.resize(static_cast<size_t>(N));
    for (int i = 0; i < N; ++i) {
      w.s[static_cast<size_t>(i)] = static_cast<T>(
          mlp::mlp_plane_scale(sum[static_cast<size_t>(pl.off_A() + i)], nd, cfg.norm_eps));
    }
    w.vbar.assign(static_cast<size_t>(F), T(0));
    if (w.factored && F > 0) {
      w.rm.resize(static_cast<size_t>(w.rows));
      w.cm.resize(static_cast<size_t>(w.cols));
      for (int64_t r = 0; r < w.rows; ++r) {
        double acc = 0.0;
        for (int64_t cb = 0; cb < w.n_cb; ++cb) acc += w.rowpart[static_cast<size_t>((cb * w.rows + r) * Q)];
        w.rm[static_cast<size_t>(r)] = static_cast<T>(acc / static_cast<double>(w.cols));
      }
      for (int64_t c = 0; c < w.cols; ++c) {
        double acc = 0.0;
        for (int64_t rg = 0; rg < w.n_rg; ++rg) acc += w.colpart[static_cast<size_t>((rg * w.cols + c) * Q)];
        w.cm[static_cast<size_t>(c)] = static_cast<T>(acc / static_cast<double>(w.rows));
      }
      w.Rf.resize(static_cast<size_t>(F * w.rows));
      w.Cf.resize(static_cast<size_t>(F * w.cols));
      w.rowf.resize(w.Rf.size());
      w.colf.resize(w.Cf.size());
      for (int f = 0; f < F; ++f) {
        const T gam = sc.dec[KR + f], omg = omd[static_cast<size_t>(KR + f)];
        double acc = 0.0;
        for (int64_t r = 0; r < w.rows; ++r) {
          const T x = mlp::mlp_factored_update(w.fr0[f * w.rows + r], w.rm[static_cast<size_t>(r)],
                                               gam, omg);
          w.Rf[static_cast<size_t>(f * w.rows + r)] = x;
          acc += static_cast<double>(x);
        }
        const T vb = static_cast<T>(acc / static_cast<double>(w.rows));
        w.vbar[static_cast<size_t>(f)] = vb;
        for (int64_t r = 0; r < w.rows; ++r) {
          const size_t i = static_cast<size_t>(f * w.rows + r);
          w.rowf[i] = mlp::factor_feature(w.Rf[i], vb);
        }
        for (int64_t c = 0; c < w.cols; ++c) {
          const size_t i = static_cast<size_t>(f * w.cols + c);
          w.Cf[i] = mlp::mlp_factored_update(w.fc0[f * w.cols + c], w.cm[static_cast<size_t>(c)],
                                             gam, omg);
          w.colf[i] = mlp::factor_feature(w.Cf[i], vb);
        }
      }
      std::fill(w.rowpart.begin(), w.rowpart.end(), 0.0);
      std::fill(w.colpart.begin(), w.colpart.end(), 0.0);
    } else {
      for (int f = 0; f < F; ++f) {
        w.vbar[static_cast<size_t>(f)] = static_cast<T>(sum[static_cast<size_t>(pl.off_U() + f)] / nd);
      }
    }
    // Time features, folded into the first layer's bias (the forward's b0').
    const T tstep = w.step + T(1);
    w.tf.resize(static_cast<size_t>(n_time));
    for (int j = 0; j < n_time; ++j) {
      w.tf[static_cast<size_t>(j)] = mlp::mlp_time_feature(tstep, timescales[static_cast<size_t>(j)]);
    }
    // b0' = mlp::mlp_folded_bias's sums, from the time features just computed (it would
    // evaluate each tanh H0 times).
    w.b0eff.resize(static_cast<size_t>(H0));
    for (int h = 0; h < H0; ++h) {
      double acc = static_cast<double>(bias[0][h]);
      for (int j = 0; j < n_time; ++j)
        acc += static_cast<double>(w.tf[static_cast<size_t>(j)]) *
               static_cast<double>(W0[(n_elem + j) * H0 + h]);
      w.b0eff[static_cast<size_t>(h)] = static_cast<T>(acc);
    }
  });
  std::fill(part.begin(), part.end(), 0.0);

  // ---- pass B1 ---------------------------------------------------------------------------
  const int64_t n_slots = std::min<int64_t>(n_tiles, kSlots);
  std::vector<double> slot_dw(static_cast<size_t>(std::max<int64_t>(n_slots, 1) * n_w), 0.0);
  // Transposed weights for the cotangent products dA_in = W dZ.
  std::vector<std::vector<T>> Wt(static_cast<size_t>(L));
  std::vector<const T*> Wt_ptrs(static_cast<size_t>(L));
  for (int l = 0; l < L; ++l) {
    const int in = l == 0 ? n_elem : static_cast<int>(a.widths[l]);
    const int out = static_cast<int>(a.widths[l + 1]);
    std::vector<T>& t = Wt[static_cast<size_t>(l)];
    t.resize(static_cast<size_t>(in * out));
    for (int i = 0; i < in; ++i)
      for (int j = 0; j < out; ++j) t[static_cast<size_t>(j * in + i)] = W[l][i * out + j];
    Wt_ptrs[static_cast<size_t>(l)] = t.data();
  }
  const std::vector<T> zeros(static_cast<size_t>(std::max(max_w, n_elem)), T(0));

  par_for(n_slots, threads, [&](int64_t slot, int tid) {
    const int64_t t_begin = slot * n_tiles / n_slots, t_end = (slot + 1) * n_tiles / n_slots;
    double* dW = &slot_dw[static_cast<size_t>(slot * n_w)];
    // Block buffers, SoA [feature][lane]: the recomputed forward, each layer's output,
    // cotangents (the thread's, reused).
    ThreadBuffers<T>& tb = buffers(tid);
    Block<T>& blk = tb.blk;
    std::vector<std::vector<T>>& act = tb.act;
    std::vector<T>& dA = tb.dA;
    std::vector<T>& dZ = tb.dZ;
    std::vector<T>& dZT = tb.dZT;
    int64_t rr[kB], cc[kB];
    std::vector<T*>& act_ptrs = tb.act_ptrs;
    BlockArgs<T> ba = args0;
    ba.bl = &blk;
    ba.act = act_ptrs.data();
    B2Scratch<T>& scr = tb.scr;
    const T* P_ = blk.P;
    const T* X = blk.x;

    for (int64_t ti = t_begin; ti < t_end; ++ti) {
      const Tile& tl = tiles[static_cast<size_t>(ti)];
      Work<T>& w = ws[static_cast<size_t>(tl.t)];
      double* pp = &part[static_cast<size_t>(ti * P)];
      const int64_t n = w.n;
      if (!w.finite) {  // skipped tensor: cotangents pass straight through
        for_tile_ranges(tl, w.cols, [&](int64_t e0, int64_t e1) {
          for (int64_t e = e0; e < e1; ++e) {
            w.dp[e] = w.Gp[e];
            w.dg[e] = T(0);
            for (int k = 0; k < K; ++k) w.dm0[k * n + e] = w.Gm[k * n + e];
            for (int j = 0; j < R; ++j) w.dv0[j * n + e] = w.Gv[j * n + e];
            if (!w.factored)
              for (int f = 0; f < F; ++f) w.dfr0[f * n + e] = w.Gfr[f * n + e];
          }
        });
        continue;
      }
      ba.w = &w;
      const MlpBatch<T> mb{L, n_elem, a.widths.data(), Wt_ptrs.data(), zeros.data(), blk.x, act_ptrs.data(),
                           dA.data(), dZ.data(), dZT.data(), dW, w_off.data(),
                           pp + pl.off_db0()};
      const EpilogueArgs<T> ea{&ba, &w, &sc, &scr, dA.data(), rr, cc, tl.cb, tl.rg, coef};
      for_tile_ranges(tl, w.cols, [&](int64_t e0, int64_t e1) {
        int64_t r = e0 / w.cols, c = e0 - r * w.cols;  // (row, col) of e, stepped below
        for (int64_t eb = e0; eb < e1; eb += kB) {
          const int nb = static_cast<int>(std::min<int64_t>(kB, e1 - eb));
          ba.e0 = eb;
          ba.nb = nb;
          ba.r0 = r;
          ba.c0 = c;
          for (int b = 0; b < nb; ++b) {
            rr[b] = r;
            cc[b] = c;
            if (++c == w.cols) {
              c = 0;
              ++r;
            }
          }
          // -- the recomputed forward: features and the MLP --
          cpu::run_loop<B1ForwardK<T>>(&ba);
          // -- the step's cotangents on (d, a) --
          const T* outp = act[static_cast<size_t>(L - 1)].data();
          for (int b = 0; b < kB; ++b) {
            T dd = T(0), da = T(0);
            if (b < nb) {
              const int64_t e = eb + b;
              const T gp = w.Gp[e];
              const T d = outp[b], mag = outp[kB + b];
              const T ex = mlp::exp_(mlp::mlp_exp_arg(mag, mc));
              dd = -coef * gp * ex;
              da = -coef * gp * d * sc.exp_mult * ex;
              pp[pl.off_lr()] += static_cast<double>(-sc.step_mult * gp *
                                                      (d * ex + sc.weight_decay * blk.p[b]));
            }
            dA[static_cast<size_t>(b)] = dd;
            dA[static_cast<size_t>(kB + b)] = da;
          }
          cpu::run_loop<MlpBackwardK<T>>(&mb);
          // -- epilogue: local input gradients and the reductions --
          cpu::run_loop<EpilogueK<T>>(&ea);
        }
      });
      // the tile's per-lane partials, lanes combined in lane order
      for (int q = 0; q < N + F + KRF; ++q) {
        double* d = scr.lane1.data() + q * kB;
        double acc = pp[q];
        for (int l = 0; l < kB; ++l) {
          acc += d[l];
          d[l] = 0.0;
        }
        pp[q] = acc;
      }
    }
  });

  // ---- finalize 2 (per tensor) ----------------------------------------------------------
  // Parallel over tensors; each tensor's contributions to the decay, lr and time-row
  // gradients are kept apart and summed in tensor order below.
  const size_t n_red = static_cast<size_t>(KRF + 1 + n_time * H0);
  std::vector<double> red(nt * n_red, 0.0);
  par_for(static_cast<int64_t>(nt), fin_threads, [&](int64_t tt, int) {
    const size_t t = static_cast<size_t>(tt);
    Work<T>& w = ws[t];
    double* ddec = &red[t * n_red];
    double& dlr = ddec[KRF];
    double* dW_time = ddec + KRF + 1;
    if (w.n == 0 || !w.finite) {  // cotangents of the row/col accumulators pass through
      if (w.factored) {
        for (int64_t i = 0; i < F * w.rows; ++i) w.dfr0[i] = w.Gfr[i];
        for (int64_t i = 0; i < F * w.cols; ++i) w.dfc0[i] = w.Gfc[i];
      }
      return;
    }
    std::vector<double> sum(static_cast<size_t>(P), 0.0);
    for (int64_t ti = w.first_tile; ti < w.end_tile; ++ti) {
      const double* pp = &part[static_cast<size_t>(ti * P)];
      for (int i = 0; i < P; ++i) sum[static_cast<size_t>(i)] += pp[i];
    }
    const double nd = static_cast<double>(w.n);
    w.kappa.resize(static_cast<size_t>(N));
    for (int i = 0; i < N; ++i) {
      const double si = static_cast<double>(w.s[static_cast<size_t>(i)]);
      w.kappa[static_cast<size_t>(i)] =
          static_cast<T>(-(si * si * si) * sum[static_cast<size_t>(pl.off_A() + i)] / nd);
    }
    for (int i = 0; i < KRF; ++i) ddec[i] += sum[static_cast<size_t>(pl.off_dec() + i)];
    dlr += sum[static_cast<size_t>(pl.off_lr())];
    for (int j = 0; j < n_time; ++j) {
      for (int h = 0; h < H0; ++h) {
        dW_time[j * H0 + h] +=
            static_cast<double>(w.tf[static_cast<size_t>(j)]) * sum[static_cast<size_t>(pl.off_db0() + h)];
      }
    }
    if (w.factored) {
      w.coefR.assign(static_cast<size_t>(w.rows), T(0));
      w.coefC.assign(static_cast<size_t>(w.cols), T(0));
      std::vector<double> SR1(static_cast<size_t>(w.rows)), SR2(SR1.size());
      std::vector<double> SC1(static_cast<size_t>(w.cols)), SC2(SC1.size());
      // (S1, S2)[i] = the two partial sums of decay f for line i (a row or a column),
      // added over the n_slots blocks in slot order: parts is [n_slots][n][Q].
      const auto sum_slots = [Q](const std::vector<double>& parts, int64_t n_slots, int64_t n,
                                 int f, std::vector<double>& S1, std::vector<double>& S2) {
        for (int64_t i = 0; i < n; ++i) {
          double s1 = 0.0, s2 = 0.0;
          for (int64_t b = 0; b < n_slots; ++b) {
            const double* pp = &parts[static_cast<size_t>((b * n + i) * Q + 2 * f)];
            s1 += pp[0];
            s2 += pp[1];
          }
          S1[static_cast<size_t>(i)] = s1;
          S2[static_cast<size_t>(i)] = s2;
        }
      };
      for (int f = 0; f < F; ++f) {
        sum_slots(w.rowpart, w.n_cb, w.rows, f, SR1, SR2);
        sum_slots(w.colpart, w.n_rg, w.cols, f, SC1, SC2);
        const double vb = static_cast<double>(w.vbar[static_cast<size_t>(f)]);
        const double gam = static_cast<double>(sc.dec[KR + f]);
        double dvbar = 0.0;
        for (int64_t r = 0; r < w.rows; ++r) {
          const size_t i = static_cast<size_t>(f * w.rows + r);
          const double Rr = w.Rf[i], rf = w.rowf[i];
          dvbar += (-SR1[static_cast<size_t>(r)] + SR2[static_cast<size_t>(r)] * 0.5 * rf * rf * rf) * Rr / (vb * vb);
        }
        for (int64_t c = 0; c < w.cols; ++c) {
          const size_t i = static_cast<size_t>(f * w.cols + c);
          const double Cc = w.Cf[i], cf = w.colf[i];
          dvbar += SC2[static_cast<size_t>(c)] * 0.5 * cf * cf * cf * Cc / (vb * vb);
        }
        const double rows_d = static_cast<double>(w.rows), cols_d = static_cast<double>(w.cols);
        double dgam = 0.0;
        for (int64_t r = 0; r < w.rows; ++r) {
          const size_t i = static_cast<size_t>(f * w.rows + r);
          const double rf = w.rowf[i];
          const double dR = static_cast<double>(w.Gfr[i]) + SR1[static_cast<size_t>(r)] / vb -
                            0.5 * rf * rf * rf * SR2[static_cast<size_t>(r)] / vb + dvbar / rows_d;
          w.dfr0[i] = static_cast<T>(gam * dR);
          dgam += dR * (static_cast<double>(w.fr0[i]) - static_cast<double>(w.rm[static_cast<size_t>(r)]));
          w.coefR[static_cast<size_t>(r)] += static_cast<T>((1.0 - gam) * dR / cols_d);
        }
        for (int64_t c = 0; c < w.cols; ++c) {
          const size_t i = static_cast<size_t>(f * w.cols + c);
          const double cf = w.colf[i];
          const double dC = static_cast<double>(w.Gfc[i]) + SC1[static_cast<size_t>(c)] / vb -
                            0.5 * cf * cf * cf * SC2[static_cast<size_t>(c)] / vb;
          w.dfc0[i] = static_cast<T>(gam * dC);
          dgam += dC * (static_cast<double>(w.fc0[i]) - static_cast<double>(w.cm[static_cast<size_t>(c)]));
          w.coefC[static_cast<size_t>(c)] += static_cast<T>((1.0 - gam) * dC / rows_d);
        }
        ddec[KR + f] += dgam;
      }
    } else {
      w.cu.resize(static_cast<size_t>(F));
      for (int f = 0; f < F; ++f) {
        const double cu = sum[static_cast<size_t>(pl.off_U() + f)] / nd;  // dvbar / n
        w.cu[static_cast<size_t>(f)] = static_cast<T>(cu);
      }
    }
  });
  std::vector<double> ddec(static_cast<size_t>(KRF), 0.0);
  double dlr = 0.0;
  std::vector<double> dW_time(static_cast<size_t>(n_time * H0), 0.0);
  for (size_t t = 0; t < nt; ++t) {
    const double* r = &red[t * n_red];
    for (int i = 0; i < KRF; ++i) ddec[static_cast<size_t>(i)] += r[i];
    dlr += r[KRF];
    for (int i = 0; i < n_time * H0; ++i) dW_time[static_cast<size_t>(i)] += r[KRF + 1 + i];
  }
  // The 0/1-dim factored decay terms of dvbar need sum(u0 - g^2 - fac_eps): B2 sums them
  // per tile (below).

  // ---- pass B2: terms through the per-tensor reductions ---------------------------------
  const int P2 = KRF;
  std::vector<double> part2(static_cast<size_t>(n_tiles * P2), 0.0);
  par_for(n_tiles, threads, [&](int64_t ti, int tid) {
    const Tile& tl = tiles[static_cast<size_t>(ti)];
    Work<T>& w = ws[static_cast<size_t>(tl.t)];
    if (!w.finite) return;
    double* pp = &part2[static_cast<size_t>(ti * P2)];
    ThreadBuffers<T>& tb = buffers(tid);
    BlockArgs<T> ba = args0;
    ba.w = &w;
    ba.bl = &tb.blk;
    B2Scratch<T>& scr = tb.scr;
    for_tile_ranges(tl, w.cols, [&](int64_t e0, int64_t e1) {
      for (int64_t eb = e0; eb < e1; eb += kB) {
        ba.e0 = eb;
        ba.nb = static_cast<int>(std::min<int64_t>(kB, e1 - eb));
        cpu::run_loop<B2K<T>>(&ba, &sc, &scr);
      }
    });
    for (int i = 0; i < KRF; ++i) {  // lanes combined in lane order
      double* d = scr.dec.data() + i * kB;
      double acc = pp[i];
      for (int l = 0; l < kB; ++l) {
        acc += d[l];
        d[l] = 0.0;  // the thread's next tile starts from zero
      }
      pp[i] = acc;
    }
  });
  for (int64_t ti = 0; ti < n_tiles; ++ti) {
    for (int i = 0; i < P2; ++i) ddec[static_cast<size_t>(i)] += part2[static_cast<size_t>(ti * P2 + i)];
  }

  // ---- results -----------------------------------------------------------------------
  std::vector<double> dw_total(static_cast<size_t>(n_w), 0.0);
  for (int64_t s = 0; s < n_slots; ++s) {
    const double* d = &slot_dw[static_cast<size_t>(s * n_w)];
    for (int64_t i = 0; i < n_w; ++i) dw_total[static_cast<size_t>(i)] += d[i];
  }
  for (int j = 0; j < n_time; ++j)
    for (int h = 0; h < H0; ++h)
      dw_total[static_cast<size_t>((n_elem + j) * H0 + h)] += dW_time[static_cast<size_t>(j * H0 + h)];
  for (int l = 0; l < 2 * L; ++l) {
    T* out = cpu::as_ptr<T>(a.d_weights[static_cast<size_t>(l)]);
    for (int64_t i = w_off[l]; i < w_off[l + 1]; ++i) out[i - w_off[l]] = static_cast<T>(dw_total[static_cast<size_t>(i)]);
  }
  T* dd = cpu::as_ptr<T>(a.d_decays);
  for (int i = 0; i < KRF; ++i) dd[i] = static_cast<T>(ddec[static_cast<size_t>(i)]);
  if (a.d_lr) *cpu::as_ptr<T>(a.d_lr) = static_cast<T>(dlr);
}

}  // namespace

void mlp_step_grad_cpu(const MLPStepGradTensors& tensors, const MLPUpdateConfig& cfg,
                       bool double_precision) {
  if (double_precision) {
    mlp_step_grad_impl<double>(tensors, cfg);
  } else {
    mlp_step_grad_impl<float>(tensors, cfg);
  }
}

}  // namespace pyoptk
