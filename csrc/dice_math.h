// Per-element math of the fused Dice kernels, shared by the C++ CPU kernel and the CUDA kernel.
//
// Everything here is a template on the arithmetic type T, so the CPU kernel instantiates it with
// at::vec::Vectorized<float|double> (all lanes at once) and the CUDA kernel with float|double:
// the formulas that CI runs on the CPU are the very ones the CUDA kernel compiles.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DICE_HD __host__ __device__ __forceinline__
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

// Fixed pixel chunking of the CPU reductions: partial sums are taken over fixed pixel ranges and
// added in a fixed order, so results do not depend on the number of threads.  (The CUDA kernels'
// geometry lives in csrc/cuda/dice_kernels.cuh.)
constexpr int64_t kCpuChunk = 4096;        // pixels per CPU task

/// Class code of one label: the matching channel index, kNoMatch, or kIgnored.
/// Labels are compared (never used as addresses); with C == 1 label 1 is the foreground.
/// Written with selects rather than branches: random labels would defeat branch prediction, and
/// the CPU kernel's label loop vectorizes this way.
template <typename L>
DICE_HD int label_code(L label, int64_t num_classes, bool has_ignore, int64_t ignore_index) {
  const int64_t v = static_cast<int64_t>(label);
  const int64_t k = num_classes == 1 ? v - 1 : v;         // the channel this label would match
  const int64_t classes = num_classes == 1 ? 1 : num_classes;
  const int code = static_cast<uint64_t>(k) < static_cast<uint64_t>(classes) ? static_cast<int>(k) : kNoMatch;
  return (has_ignore & (v == ignore_index)) ? kIgnored : code;
}

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

}  // namespace dicetorch
