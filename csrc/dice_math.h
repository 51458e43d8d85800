// Per-element math of the fused Dice kernels, shared by the C++ CPU kernel and the CUDA kernel.
//
// Everything here is a template on the arithmetic type T, so the CPU kernel instantiates it with
// at::vec::Vectorized<float|double> (all lanes at once) and the CUDA kernel with float|double:
// the formulas that CI runs on the CPU are the very ones the CUDA kernel compiles.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DICE_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Inlined into the CPU kernel's loops even where the compiler finds them large (pow_gamma): an
// out-of-line call per vector passes the lanes through memory and the PLT.
#define DICE_HD inline __attribute__((always_inline))
#else
#define DICE_HD inline
#endif

namespace dicetorch {

// Activation / power codes passed from the operator to the kernels.
enum Activation : int { kSoftmax = 0, kSigmoid = 1, kNone = 2, kArgmax = 3, kThreshold = 4 };

// Hard activations (forward only, no gradient: evaluation counts).  Per pixel, p is 0/1:
//   kArgmax:    p_k = 1 for k = argmax_j x_j (torch.argmax: lowest index among equal maxima; the
//               first NaN wins over any number; all -inf picks 0), 0 for the other channels;
//   kThreshold: p_k = 1 where x_k > 0 (sigmoid(x_k) > 0.5), else 0 (NaN gives 0).
DICE_HD bool is_hard_activation(int activation) { return activation == kArgmax || activation == kThreshold; }

/// Running argmax over channels: whether channel value x replaces the current maximum ``best``
/// (visit channels in increasing order, start from channel 0).  Only a strictly larger value
/// does (ties keep the lowest index), and a NaN does unless ``best`` is already NaN.
/// T: float/double (returns a truth value) or at::vec::Vectorized (returns a lane mask for blendv).
template <typename T>
DICE_HD auto argmax_takes(T x, T best) {
  return (x > best) | ((x != x) & (best == best));
}

// Pixel codes produced by label_code().
constexpr int kIgnored = -2;   // pixel excluded from every sum, zero gradient
constexpr int kNoMatch = -1;   // pixel counts (in P) but matches no channel
static_assert(kNoMatch == -1, "label_code builds kNoMatch as an all-ones mask");

// Fixed pixel chunking of the CPU reductions: partial sums are taken over fixed pixel ranges and
// added in a fixed order, so results do not depend on the number of threads.  (The CUDA kernels'
// geometry lives in csrc/cuda/dice_kernels.cuh.)
constexpr int64_t kCpuChunk = 4096;        // pixels per CPU task

/// Class code of one label: the matching channel index, kNoMatch, or kIgnored.
/// Labels are compared (never used as addresses); with C == 1 label 1 is the foreground.
/// Written with masks rather than branches or selects: random labels would defeat branch
/// prediction, and the CPU kernel's label loop vectorizes only this way (GCC treats 64-bit selects
/// as control flow).
template <typename L>
DICE_HD int label_code(L label, int64_t num_classes, bool has_ignore, int64_t ignore_index) {
  // Byte labels (the backward's saved codes among them) in 32-bit arithmetic: twice the lanes of the
  // CPU's vectorized loop; wider labels in 64-bit (v - 1 and the comparisons must not wrap).
  using W = std::conditional_t<(sizeof(L) == 1), int32_t, int64_t>;
  using U = std::make_unsigned_t<W>;
  const W v = static_cast<W>(label);
  const W k = num_classes == 1 ? v - 1 : v;  // the channel this label would match
  const int64_t classes = num_classes == 1 ? 1 : num_classes;
  // all ones where k is a channel, else 0; k | ~in = k or -1 (kNoMatch).  A byte label's k is in
  // [-1, 255]: comparing it with min(classes, 256) is comparing it with classes.
  const W limit = static_cast<W>(classes < 256 ? classes : 256);
  const W in = -static_cast<W>(sizeof(L) == 1 ? static_cast<U>(k) < static_cast<U>(limit)
                                              : static_cast<uint64_t>(k) < static_cast<uint64_t>(classes));
  const W code = k | ~in;
  const bool fits = sizeof(L) > 1 || (ignore_index >= 0 && ignore_index <= 255);  // else no byte equals it
  const W ignored = -static_cast<W>(has_ignore & fits & (v == static_cast<W>(ignore_index)));
  return static_cast<int>((code & ~ignored) | (static_cast<W>(kIgnored) & ignored));
}

// A training step's forward may save each pixel's code as one byte for its backward (the CPU's
// fused_forward_codes): a channel index stays itself, kIgnored becomes 254, kNoMatch 255.  Read
// back as uint8 labels with ignore_index = kSavedIgnored, they give the same codes while
// C <= kMaxSavedClasses (channels 0 .. 253).
constexpr int kSavedIgnored = 254;
constexpr int64_t kMaxSavedClasses = 254;
static_assert(static_cast<uint8_t>(kIgnored) == kSavedIgnored, "kIgnored saves as 254");

DICE_HD uint8_t saved_code(int code) { return static_cast<uint8_t>(code); }

/// sigmoid(x) from e = exp(-x):  1 / (1 + e).
template <typename T>
DICE_HD T sigmoid_from_exp(T e) {
  return T(1) / (T(1) + e);
}

/// dL/dp = gI*t + gP*q*p^(q-1) for one element (q in {1, 2}).
template <typename T>
DICE_HD T grad_p(T g_i, T g_p, T t, T p, int power) {
  return power == 1 ? g_i * t + g_p : g_i * t + (g_p + g_p) * p;
}

/// Softmax backward of one element: dL/dz = p * (g - sum_j p_j g_j).
template <typename T>
DICE_HD T softmax_dz(T p, T g, T dot) {
  return p * (g - dot);
}

/// Sigmoid backward of one element: dL/dz = g * p * (1 - p).
template <typename T>
DICE_HD T sigmoid_dz(T p, T g) {
  return g * p * (T(1) - p);
}

/// p^q for q in {1, 2} (the prediction volume term).
template <typename T>
DICE_HD T pow_q(T p, int power) {
  return power == 1 ? p : p * p;
}

/// Online softmax normaliser over channels: after all channels, m = max_k x_k and
/// s = sum_k exp(x_k - m).  One exp per element (used by the CUDA kernel, which streams the
/// channels instead of buffering them).  Start from m = -inf, s = 0.
/// A -inf channel adds exactly 0, also while m is still -inf (leading -inf channels, e.g. after
/// masked_fill(-inf)): exp(-inf - -inf) would be NaN.  NaN in x makes s NaN, as in torch.softmax.
template <typename T, typename ExpFn>
DICE_HD void online_softmax_update(T& m, T& s, T x, ExpFn exp_fn) {
  if (x > m) {
    s = s * exp_fn(m - x) + T(1);  // m = -inf: 0 * exp(-inf) + 1
    m = x;
  } else {
    s = s + (x == -static_cast<T>(INFINITY) ? T(0) : exp_fn(x - m));
  }
}

/// Merge of two online softmax normalisers (m1, s1) and (m2, s2) of disjoint channel sets into
/// (m, s) of their union: m = max(m1, m2), s = s1*exp(m1 - m) + s2*exp(m2 - m).  Used where the
/// channels of one pixel are spread over several GPU lanes.  A part whose max is still -inf (all
/// its channels -inf, or none) adds s*0: exactly 0 for finite s, and NaN stays NaN (a NaN channel
/// among -inf ones makes s NaN while m stays -inf).  Never evaluates -inf - -inf.
template <typename T, typename ExpFn>
DICE_HD void online_softmax_merge(T& m1, T& s1, T m2, T s2, ExpFn exp_fn) {
  const T ninf = -static_cast<T>(INFINITY);
  const T m = m2 > m1 ? m2 : m1;
  const T a = m1 == ninf ? s1 * T(0) : s1 * exp_fn(m1 - m);
  const T b = m2 == ninf ? s2 * T(0) : s2 * exp_fn(m2 - m);
  m1 = m;
  s1 = a + b;
}


// ---------------------------------------------------------------------------------------------
// Pixel losses of the compound losses (Dice + cross-entropy / focal): the element term e of the
// rows X = sum_m t e and L = sum_m e, and its gradient, from the exps the activation already took.
// Exact definitions and the derivation: dicetorch/reference.py (pixel_term, _pixel_backward).
//
// The formulas need selects, |.|, sqrt, log1p, exp and pow besides arithmetic.  They take them from
// a policy M (T = the arithmetic type, Mask = what T's comparisons return):
//   M::select(mask, a, b)  mask ? a : b per lane     M::log1p, M::exp, M::abs, M::sqrt
//   M::log1p_unit(u)       log1p for u in [-1/2, 1] (may be cheaper than M::log1p)
//   M::pow(base, gamma)    base^gamma for base in [0, 1] (gamma a scalar double)
// ScalarMath below serves float/double (the CUDA kernels, host code); the CPU kernel supplies one
// over at::vec::Vectorized (select = blendv).
// ---------------------------------------------------------------------------------------------

enum PixelLoss : int { kPixelNone = 0, kPixelCE = 1, kPixelFocal = 2 };

/// base^gamma of the focal factors without pow where gamma allows: 0, 1, 2 (everybody's default),
/// and any whole or half-whole gamma up to 8.5 (0.5, 3, 3.5, ...) as products and one sqrt.
struct FocalGamma {
  int mode;     // 0, 1, 2: gamma is that integer; 3: whole + (half ? 1/2 : 0); 4: any other gamma (pow)
  int whole;    // mode 3: floor(gamma)
  bool half;    // mode 3: gamma - floor(gamma) == 1/2
  double gamma;
};

inline FocalGamma focal_gamma(double gamma) {
  FocalGamma g{4, 0, false, gamma};
  if (gamma == 0.0 || gamma == 1.0 || gamma == 2.0) {
    g.mode = static_cast<int>(gamma);
  } else if (gamma > 0.0 && gamma <= 8.5 && 2.0 * gamma == std::floor(2.0 * gamma)) {
    g.mode = 3;
    g.whole = static_cast<int>(std::floor(gamma));
    g.half = gamma != std::floor(gamma);
  }
  return g;
}

/// log1p(u) for u in [-1/2, 1] from arithmetic alone: 2 atanh(s), s = u / (2 + u) in [-1/3, 1/3],
/// by its odd series up to s^13 (truncation < 2^-26 relative); about 4 ulp in float over the whole
/// range, relative also for tiny u.  A third of the time of a library log1p on CPU vector lanes.
/// float only (double would need terms up to s^33).
template <typename T>
DICE_HD T log1p_unit_series(T u) {
  const T s = u / (T(2.0f) + u), s2 = s * s;
  T r = T(1.0f / 13.0f);
  r = r * s2 + T(1.0f / 11.0f);
  r = r * s2 + T(1.0f / 9.0f);
  r = r * s2 + T(1.0f / 7.0f);
  r = r * s2 + T(1.0f / 5.0f);
  r = r * s2 + T(1.0f / 3.0f);
  r = r * s2 + T(1.0f);
  return T(2.0f) * s * r;
}

template <typename T>
struct ScalarMath {
  static DICE_HD T select(bool c, T a, T b) { return c ? a : b; }
  static DICE_HD T log1p(T x) {
    using std::log1p;
    return log1p(x);
  }
  static DICE_HD T log1p_unit(T x) { return log1p(x); }
  static DICE_HD T exp(T x) {
    using std::exp;
    return exp(x);
  }
  static DICE_HD T abs(T x) {
    using std::fabs;
    return fabs(x);
  }
  static DICE_HD T sqrt(T x) {
    using std::sqrt;
    return sqrt(x);
  }
  static DICE_HD T pow(T x, double g) {
    using std::pow;
    return pow(x, static_cast<T>(g));
  }
};

/// base^gamma for base in [0, 1] (0^gamma = 0 for gamma > 0, 1 for gamma = 0).
template <typename M, typename T>
DICE_HD T pow_gamma(T base, const FocalGamma& g) {
  switch (g.mode) {
    case 0: return T(1);
    case 1: return base;
    case 2: return base * base;
    case 3: {
      T r = g.half ? M::sqrt(base) : base;
      for (int i = g.half ? 0 : 1; i < g.whole; ++i) r = r * base;
      return r;
    }
    default: return M::pow(base, g.gamma);
  }
}

/// t * e, except 0 where t == 0 and e == +inf: a channel masked with -inf logits has e = -log 0 =
/// +inf, and pixels that are not of that class must add 0 (t log p -> 0), not 0 * inf = NaN.
/// A NaN e still makes NaN (NaN in, NaN out).
template <typename M, typename T>
DICE_HD T target_times(T t, T e) {
  return M::select((t == T(0)) & (e == static_cast<T>(INFINITY)), T(0), t * e);
}

/// The per-element weight of the pixel rows' gradient: w = gX t + gL (a product, so that a NaN in
/// the incoming gradient spreads as it does through autograd).
template <typename T>
DICE_HD T pixel_weight(T g_x, T g_l, T t) {
  return g_x * t + g_l;
}

// --- softmax --------------------------------------------------------------------------------
// Per pixel, with d_k = z_k - max_j z_j and e_k = exp(d_k) (the softmax's own exps), s = sum_k e_k,
// r = 1/s, p_k = e_k r, and
//   sm1 = s - 1, summed without the maximum's 1: sum_{d_k < 0} e_k + (#{d_k = 0} - 1),
// so that log s = log1p(sm1) and 1 - p of the winning channel keep their digits when p rounds to 1
// (a confident pixel).  One log1p per pixel; no exp beyond the softmax's.

/// Cross-entropy term of channel k: -log p_k = lse(z) - z_k = log1p(sm1) - d_k  (ls = log1p(sm1)).
template <typename T>
DICE_HD T softmax_ce_term(T ls, T d) {
  return ls - d;
}

/// 1 - p_k = (s - e_k) / s = (sm1 + (1 - e_k)) r: exactly sm1 r for a maximum (e_k = 1).
template <typename T>
DICE_HD T softmax_one_minus_p(T sm1, T e, T r) {
  return (sm1 + (T(1) - e)) * r;
}

/// Focal term (1 - p)^gamma (-log p), from q = 1 - p and ce = -log p.
template <typename M, typename T>
DICE_HD T softmax_focal_term(T q, T ce, const FocalGamma& g) {
  return pow_gamma<M>(q, g) * ce;
}

/// Softmax focal backward, per element: h = w (gamma p (1-p)^(gamma-1) log p - (1-p)^gamma); the
/// input gradient is then h_j - p_j sum_k h_k.  The first term is taken at its limits: 0 as p -> 1
/// (q -> 0, for every gamma >= 0, also gamma < 1 where (1-p)^(gamma-1) alone diverges) and 0 as
/// p -> 0 (p log p -> 0: a channel masked with -inf, where ce = +inf).
template <typename M, typename T>
DICE_HD T softmax_focal_h(T w, T p, T q, T ce, const FocalGamma& g) {
  if (g.mode == 0) return -w;  // (1-p)^0 = 1: the cross-entropy's h
  const T plogp = M::select(ce == static_cast<T>(INFINITY), T(0), -(p * ce));
  const T qg = pow_gamma<M>(q, g);
  T slope;
  if (g.mode == 1) {
    slope = plogp;
  } else if (g.mode == 2) {
    slope = T(2) * plogp * q;
  } else {  // gamma p log p q^gamma / q; at q == 0 the limit 0
    slope = M::select(q == T(0), T(0), static_cast<T>(g.gamma) * plogp * (qg / q));
  }
  return w * (slope - qg);
}

// --- sigmoid --------------------------------------------------------------------------------
/// 1 - p and softplus(z) from e = exp(-z) and p = 1/(1+e) (the sigmoid's own exp), one log1p:
///   z >= 0:  1 - p = e p,    softplus(z) = z + log1p(e)       (e <= 1)
///   z <  0:  1 - p = 1 - p,  softplus(z) = -log(1 - p) = -log1p(-p)   (p < 1/2)
/// so neither loses digits, and no exp(+|z|) can overflow (e = +inf at z = -inf gives p = 0, 1,
/// softplus 0).  NaN gives NaN.  (z >= 0 when z is NaN is false: the -p branch, NaN too.)
template <typename M, typename T>
DICE_HD void sigmoid_softplus(T z, T e, T p, T& one_minus_p, T& softplus) {
  const auto pos = z >= T(0);
  one_minus_p = M::select(pos, e * p, T(1) - p);
  const T l = M::log1p_unit(M::select(pos, e, -p));  // argument in (-1/2, 1]
  softplus = M::select(pos, z + l, -l);
}

/// Binary cross-entropy with logits, b = softplus(z) - t z; t z is 0 where t == 0 (z = -inf: b = 0).
template <typename M, typename T>
DICE_HD T bce_term(T softplus, T t, T z) {
  return softplus - M::select(t == T(0), T(0), t * z);
}

/// The sigmoids of MONAI's focal factor, with y = -z (2t - 1):
///   a = sigmoid(y)   (the factor m = a^gamma = exp(gamma logsigmoid(y))),   c = sigmoid(-y).
/// Binary targets (t in {0, 1}; ``one``: t == 1): a and c are 1 - p and p, swapped for t = 0 --
/// no exp.
template <typename M, typename T, typename Mask>
DICE_HD void sigmoid_focal_binary(Mask one, T p, T one_minus_p, T& a, T& c) {
  a = M::select(one, one_minus_p, p);
  c = M::select(one, p, one_minus_p);
}

/// Soft targets: y depends on t, so the sigmoid's exp cannot serve; this takes one more exp per
/// element, exp(-|y|) <= 1 (never overflows).
template <typename M, typename T>
DICE_HD void sigmoid_focal_soft(T z, T t, T& a, T& c) {
  const T y = z * (T(1) - (t + t));
  const T u = M::exp(-M::abs(y));
  const T s_pos = T(1) / (T(1) + u), s_neg = u * s_pos;  // sigmoid(|y|), sigmoid(-|y|)
  const auto pos = y >= T(0);
  a = M::select(pos, s_pos, s_neg);
  c = M::select(pos, s_neg, s_pos);
}

/// Sigmoid cross-entropy backward, per element: w (p - t).
template <typename T>
DICE_HD T sigmoid_ce_dz(T w, T p, T t) {
  return w * (p - t);
}

/// Sigmoid focal backward, per element: w m ((p - t) - gamma b (2t - 1) c), with m = a^gamma and
/// b = softplus(z) - t z (see sigmoid_focal_binary / sigmoid_focal_soft for a and c).
template <typename T>
DICE_HD T sigmoid_focal_dz(T w, T p, T t, T m, T b, T c, T gamma) {
  return w * m * ((p - t) - gamma * b * ((t + t) - T(1)) * c);
}

}  // namespace dicetorch
