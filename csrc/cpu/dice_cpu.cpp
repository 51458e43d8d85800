// Fused C++ CPU kernels of dicetorch::fused_forward / fused_backward.
//
// This file is compiled once per CPU capability: as itself (the portable DEFAULT kernel) and,
// on x86-64, through dice_cpu_avx2.cpp / dice_cpu_avx512.cpp, which setup.py compiles with that
// instruction set and -DCPU_CAPABILITY=<capability>.  Everything below lives in the namespace
// dicetorch::cpu::<capability> (and at::vec::<capability> for the vector types), so the copies
// never collide; dice.cpp picks one at run time.
//
// Algorithm (forward): the pixels of each image are cut into fixed chunks of kCpuChunk pixels;
// one task = (image, chunk).  A task walks its chunk one vector of V pixels at a time: it loads the
// (C, V) tile into a float buffer (converting fp16/bf16; transposing channels-last input), computes
// p = activation(x) once per element (each exp once), and adds p*t, p^q, t^q into per-class vector
// accumulators.  Each task writes its (3, C) partial sums; the partials of an image are then added
// in chunk order.  The result is therefore independent of the number of threads.
// Backward: the same tiles, one pass, g = gI*t + gP*q*p^(q-1) and the activation's Jacobian.
//
// Pixel losses (compound Dice + CE / focal, rows X = sum t e and L = sum e): the same tiles and the
// same exps.  Softmax keeps d = z - max next to e = exp(d), so -log p = log1p(s - 1) - d needs one
// log1p per pixel; sigmoid gets softplus(z) from the e = exp(-z) of its p, one log1p per element.
// The focal factors reuse those (products and a sqrt for whole and half-whole gamma, exp(gamma log)
// for any other); only the sigmoid focal loss with soft (non-0/1) targets takes a second exp per
// element.  The element formulas are the
// shared ones of dice_math.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../dice.h"
#include "../dice_math.h"

#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace dicetorch {
namespace cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Strides of one (N, C, M) operand and which fast path reads it.
struct Layout {
  int64_t sN, sC, sM;
  bool planar;  // pixel stride 1 (or a single pixel): a channel row of V pixels is one vector load
};

static Layout layout_of(const at::Tensor& a) {
  const bool planar = a.stride(2) == 1 || a.size(2) == 1;
  return {a.stride(0), a.stride(1), a.stride(2), planar};
}

// The kernels handle pixel-contiguous and channels-last operands; anything else is copied once.
static at::Tensor fast_layout(const at::Tensor& a) {
  const bool planar = a.stride(2) == 1 || a.size(2) == 1;
  const bool channels_last = a.stride(1) == 1 || a.size(1) == 1;
  return (planar || channels_last) ? a : a.contiguous();
}

template <typename acc_t>
inline Vectorized<acc_t> vexp(const Vectorized<acc_t>& v) {
  // The op is bound by exp: the fast float exp (documented max error 20 ULP, i.e. ~1e-6 relative)
  // is far below the fp32 summation error of the sums it feeds.  It clamps its argument, which
  // would turn NaN into a finite value: NaN lanes are passed through (NaN in, NaN out).
  if constexpr (std::is_same_v<acc_t, float>) {
    return Vectorized<acc_t>::blendv(v.exp_u20(), v, v.isnan());
  } else {
    return v.exp();
  }
}

/// dice_math.h's element primitives over Vectorized lanes (masks are lane masks, select = blendv).
template <typename acc_t>
struct VecMath {
  using Vec = Vectorized<acc_t>;
  static Vec select(const Vec& mask, const Vec& a, const Vec& b) { return Vec::blendv(b, a, mask); }
  static Vec log1p(const Vec& x) { return x.log1p(); }
  static Vec log1p_unit(const Vec& x) {
    if constexpr (std::is_same_v<acc_t, float>) {
      return log1p_unit_series(x);  // arithmetic only: the sigmoid's per-element log
    } else {
      return x.log1p();
    }
  }
  static Vec exp(const Vec& x) { return vexp(x); }
  static Vec abs(const Vec& x) { return x.abs(); }
  static Vec sqrt(const Vec& x) { return x.sqrt(); }
  // x^g for x in [0, 1] as exp(g log x) with the kernel's exp: a third of Sleef's pow's time, and
  // as accurate as the other exps (0^g = exp(-inf) = 0 for g > 0; NaN stays NaN)
  static Vec pow(const Vec& x, double g) { return vexp(Vec(static_cast<acc_t>(g)) * x.log()); }
};

/// Whether every lane of t is 0 or 1 (one-hot float targets take the sigmoid focal loss's no-exp path).
template <typename acc_t>
inline bool all_binary(const Vectorized<acc_t>& t) {
  using Vec = Vectorized<acc_t>;
  const Vec binary = (t == Vec(acc_t(0))) | (t == Vec(acc_t(1)));
  return Vec::blendv(Vec(acc_t(1)), Vec(acc_t(0)), binary).zero_mask() == (1 << Vec::size()) - 1;
}

template <typename scalar_t, typename acc_t>
inline Vectorized<acc_t> load_vec(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return Vectorized<acc_t>::loadu(p);
  } else {
    Vectorized<float> v;
    at::vec::load_to_float<scalar_t>(p, v);
    return v;
  }
}

template <typename scalar_t, typename acc_t>
inline void store_vec(scalar_t* p, const Vectorized<acc_t>& v) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    v.store(p);
  } else {
    at::vec::convert_from_float<scalar_t>(v, v).store(p, Vectorized<acc_t>::size());
  }
}

/// Load pixels [m0, m0+cnt) of one image into buf (C rows of V lanes, acc_t), zero-padding lanes >= cnt.
template <typename scalar_t, typename acc_t>
void load_tile(const scalar_t* base, const Layout& L, int64_t C, int64_t m0, int cnt, acc_t* buf) {
  constexpr int V = Vectorized<acc_t>::size();
  if (L.planar && cnt == V) {
    for (int64_t k = 0; k < C; ++k) {
      load_vec<scalar_t, acc_t>(base + k * L.sC + m0).store(buf + k * V);
    }
    return;
  }
  std::fill(buf, buf + C * V, acc_t(0));
  for (int j = 0; j < cnt; ++j) {
    const scalar_t* src = base + (m0 + j) * L.sM;
    for (int64_t k = 0; k < C; ++k) buf[k * V + j] = static_cast<acc_t>(src[k * L.sC]);
  }
}

/// Store lanes [0, cnt) of buf (C rows of V lanes) into pixels [m0, m0+cnt) of one image.
template <typename scalar_t, typename acc_t>
void store_tile(scalar_t* base, const Layout& L, int64_t C, int64_t m0, int cnt, const acc_t* buf) {
  constexpr int V = Vectorized<acc_t>::size();
  if (L.planar && cnt == V) {
    for (int64_t k = 0; k < C; ++k) {
      store_vec<scalar_t, acc_t>(base + k * L.sC + m0, Vectorized<acc_t>::loadu(buf + k * V));
    }
    return;
  }
  for (int j = 0; j < cnt; ++j) {
    scalar_t* dst = base + (m0 + j) * L.sM;
    for (int64_t k = 0; k < C; ++k) dst[k * L.sC] = static_cast<scalar_t>(buf[k * V + j]);
  }
}

/// Pixel codes of one chunk, [m_begin, m_end) of one image, into codes[0 .. round_up(len, V)):
/// label_code() of each label (pixel stride ``stride``), or 0 for float targets; kIgnored for the
/// padding lanes of the last vector.  Filled once per chunk in a tight loop (which the compiler
/// vectorizes) so that the tile loop reads the codes as whole vectors.
template <typename tgt_t, bool kLabels, typename acc_t>
void chunk_codes(const tgt_t* labels, int64_t stride, int64_t m_begin, int64_t m_end, int64_t C,
                 const DiceOptions& o, acc_t* codes) {
  constexpr int V = Vectorized<acc_t>::size();
  const int64_t len = m_end - m_begin, padded = (len + V - 1) / V * V;
  if constexpr (kLabels) {
    const tgt_t* lp = labels + m_begin * stride;
    // has_ignore as a compile-time constant of each loop keeps the loops branch-free
    const auto fill = [&](auto has_ignore) {
      if (stride == 1) {
        for (int64_t j = 0; j < len; ++j) {
          codes[j] = static_cast<acc_t>(label_code(lp[j], C, decltype(has_ignore)::value, o.ignore_index));
        }
      } else {
        for (int64_t j = 0; j < len; ++j) {
          codes[j] = static_cast<acc_t>(label_code(lp[j * stride], C, decltype(has_ignore)::value, o.ignore_index));
        }
      }
    };
    if (o.has_ignore) {
      fill(std::true_type{});
    } else {
      fill(std::false_type{});
    }
  } else {
    std::fill(codes, codes + len, acc_t(0));
  }
  std::fill(codes + len, codes + padded, acc_t(kIgnored));
}

/// In place: x (C rows of V lanes) -> p = activation(x), each exp computed once; hard activations
/// write 0/1 (argmax over the channels of each lane, or x > 0).
template <typename acc_t>
inline void activate_tile(acc_t* buf, int64_t C, int activation) {
  using Vec = Vectorized<acc_t>;
  constexpr int V = Vec::size();
  if (activation == kSoftmax) {
    Vec mx = Vec::loadu(buf);
    for (int64_t k = 1; k < C; ++k) mx = at::vec::maximum(mx, Vec::loadu(buf + k * V));
    Vec s(acc_t(0));
    for (int64_t k = 0; k < C; ++k) {
      const Vec e = vexp(Vec::loadu(buf + k * V) - mx);
      e.store(buf + k * V);
      s = s + e;
    }
    const Vec r = Vec(acc_t(1)) / s;
    for (int64_t k = 0; k < C; ++k) (Vec::loadu(buf + k * V) * r).store(buf + k * V);
  } else if (activation == kSigmoid) {
    for (int64_t k = 0; k < C; ++k) {
      sigmoid_from_exp(vexp(Vec::loadu(buf + k * V).neg())).store(buf + k * V);
    }
  } else if (activation == kArgmax) {
    // per lane: the running maximum and its channel index (as acc_t, exact for any C < 2^24)
    Vec best = Vec::loadu(buf), idx(acc_t(0));
    for (int64_t k = 1; k < C; ++k) {
      const Vec x = Vec::loadu(buf + k * V);
      const Vec take = argmax_takes(x, best);
      best = Vec::blendv(best, x, take);
      idx = Vec::blendv(idx, Vec(acc_t(k)), take);
    }
    for (int64_t k = 0; k < C; ++k) idx.eq(Vec(acc_t(k))).store(buf + k * V);  // 1.0 / 0.0
  } else if (activation == kThreshold) {
    for (int64_t k = 0; k < C; ++k) Vec::loadu(buf + k * V).gt(Vec(acc_t(0))).store(buf + k * V);  // NaN: 0
  }
}

// Per-task scratch: tiles of C x V values and the per-class vector accumulators.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> x, e, t, g, h, codes, acc;
  // rows: accumulator rows (0: none); pixel: a pixel loss (softmax keeps d and e apart; the
  // backward keeps the pixel loss's h next to g)
  Scratch(int64_t C, bool need_t, bool need_g, int rows, bool pixel) {
    constexpr int V = Vectorized<acc_t>::size();
    x.resize(C * V);
    codes.resize(kCpuChunk + V);
    if (need_t) t.resize(C * V);
    if (need_g) g.resize(C * V);
    if (rows > 0) acc.resize(rows * C * V);
    if (pixel) {
      e.resize(C * V);
      if (need_g) h.resize(C * V);
    }
  }
};

/// Softmax of one tile for the pixel losses: z (C rows of V lanes, in x) -> d = z - max in x and
/// e = exp(d) in e, each exp once; returns per lane r = 1/s and sm1 = s - 1 summed without the
/// maximum's 1 (see dice_math.h).  s is summed exactly as activate_tile sums it, so p = e r is the
/// p of the Dice-only path, bit for bit.
template <typename acc_t>
inline void softmax_pixel_tile(acc_t* x, acc_t* e, int64_t C, Vectorized<acc_t>& r, Vectorized<acc_t>& sm1) {
  using Vec = Vectorized<acc_t>;
  constexpr int V = Vec::size();
  Vec mx = Vec::loadu(x);
  for (int64_t k = 1; k < C; ++k) mx = at::vec::maximum(mx, Vec::loadu(x + k * V));
  const Vec zero(acc_t(0)), one(acc_t(1));
  Vec s(acc_t(0)), below(acc_t(0)), maxima(acc_t(0));
  for (int64_t k = 0; k < C; ++k) {
    const Vec d = Vec::loadu(x + k * V) - mx;
    const Vec ek = vexp(d);
    d.store(x + k * V);
    ek.store(e + k * V);
    s = s + ek;
    const Vec is_max = d == zero;  // e = exp(0) = 1 exactly there
    below = below + Vec::blendv(ek, zero, is_max);
    maxima = maxima + Vec::blendv(zero, one, is_max);
  }
  r = one / s;
  sm1 = below + (maxima - one);
}

/// Forward of one tile with a pixel loss: the Dice sums of activate_tile + the accumulation loop of
/// forward_impl (same p, same order) and the X, L rows from the same exps.  acc: [5][C][V].
template <typename acc_t, bool kLabels>
inline void forward_pixel_tile(Scratch<acc_t>& s, int64_t C, int activation, int power, bool focal,
                               const FocalGamma& fg, const Vectorized<acc_t>& code,
                               const Vectorized<acc_t>& valid, acc_t* acc) {
  using Vec = Vectorized<acc_t>;
  using VM = VecMath<acc_t>;
  constexpr int V = Vec::size();
  const Vec zero(acc_t(0));
  const auto target = [&](int64_t k) {
    if constexpr (kLabels) {
      return code.eq(Vec(acc_t(k)));
    } else {
      return Vec::loadu(s.t.data() + k * V);
    }
  };
  const auto add = [&](int row, int64_t k, const Vec& v) {
    acc_t* a = acc + (row * C + k) * V;
    (Vec::loadu(a) + v).store(a);
  };
  const auto dice = [&](int64_t k, const Vec& p_raw, const Vec& tk) {
    const Vec p = Vec::blendv(zero, p_raw, valid);
    add(0, k, p * tk);
    add(1, k, pow_q(p, power));
    add(2, k, pow_q(tk, power));
  };
  const auto pixel = [&](int64_t k, const Vec& term_raw, const Vec& tk) {
    const Vec term = Vec::blendv(zero, term_raw, valid);  // ignored pixels: selected away
    add(3, k, target_times<VM>(tk, term));
    add(4, k, term);
  };
  if (activation == kSoftmax) {
    Vec r, sm1;
    softmax_pixel_tile(s.x.data(), s.e.data(), C, r, sm1);
    const Vec ls = sm1.log1p();  // log s: one log per pixel
    for (int64_t k = 0; k < C; ++k) {
      const Vec d = Vec::loadu(s.x.data() + k * V), e = Vec::loadu(s.e.data() + k * V);
      const Vec tk = target(k);
      dice(k, e * r, tk);
      const Vec ce = softmax_ce_term(ls, d);
      pixel(k, focal ? softmax_focal_term<VM>(softmax_one_minus_p(sm1, e, r), ce, fg) : ce, tk);
    }
  } else {  // sigmoid
    for (int64_t k = 0; k < C; ++k) {
      const Vec z = Vec::loadu(s.x.data() + k * V);
      const Vec e = vexp(z.neg());
      const Vec p = sigmoid_from_exp(e);
      const Vec tk = target(k);
      dice(k, p, tk);
      Vec pm, sp;
      sigmoid_softplus<VM>(z, e, p, pm, sp);
      Vec term = bce_term<VM>(sp, tk, z);
      if (focal) {
        Vec a, c;
        if (kLabels || all_binary(tk)) {
          sigmoid_focal_binary<VM>(tk == Vec(acc_t(1)), p, pm, a, c);
        } else {
          sigmoid_focal_soft<VM>(z, tk, a, c);  // soft targets: one more exp per element
        }
        term = pow_gamma<VM>(a, fg) * term;
      }
      pixel(k, term, tk);
    }
  }
}

/// Backward of one tile with a pixel loss: dL/dz of the Dice rows (as backward_impl) plus the pixel
/// rows' with w = gX t + gL; writes the tile's gradient into s.g (ignored pixels exactly 0).
/// grad: this image's (5, C) rows.
template <typename acc_t, bool kLabels>
inline void backward_pixel_tile(Scratch<acc_t>& s, int64_t C, int activation, int power, bool focal,
                                const FocalGamma& fg, const Vectorized<acc_t>& code,
                                const Vectorized<acc_t>& valid, const acc_t* grad) {
  using Vec = Vectorized<acc_t>;
  using VM = VecMath<acc_t>;
  constexpr int V = Vec::size();
  const Vec zero(acc_t(0));
  const acc_t *g_i = grad, *g_p = grad + C, *g_x = grad + 3 * C, *g_l = grad + 4 * C;
  const auto target = [&](int64_t k) {
    if constexpr (kLabels) {
      return code.eq(Vec(acc_t(k)));
    } else {
      return Vec::loadu(s.t.data() + k * V);
    }
  };
  if (activation == kSoftmax) {
    // dz_j = p_j (g_j - sum_k p_k g_k) + h_j - p_j sum_k h_k = p_j (g_j - (dot + hsum)) + h_j, with
    // h = -w (ce) or softmax_focal_h (focal)
    Vec r, sm1;
    softmax_pixel_tile(s.x.data(), s.e.data(), C, r, sm1);
    const Vec ls = focal ? sm1.log1p() : zero;
    Vec dot(acc_t(0)), hsum(acc_t(0));
    for (int64_t k = 0; k < C; ++k) {
      const Vec e = Vec::loadu(s.e.data() + k * V);
      const Vec p = e * r;
      const Vec tk = target(k);
      const Vec g = grad_p(Vec(g_i[k]), Vec(g_p[k]), tk, p, power);
      const Vec w = pixel_weight(Vec(g_x[k]), Vec(g_l[k]), tk);
      Vec h;
      if (focal) {
        const Vec d = Vec::loadu(s.x.data() + k * V);
        h = softmax_focal_h<VM>(w, p, softmax_one_minus_p(sm1, e, r), softmax_ce_term(ls, d), fg);
      } else {
        h = w.neg();
      }
      g.store(s.g.data() + k * V);
      h.store(s.h.data() + k * V);
      dot = dot + p * g;
      hsum = hsum + h;
    }
    const Vec total = dot + hsum;
    for (int64_t k = 0; k < C; ++k) {
      const Vec p = Vec::loadu(s.e.data() + k * V) * r;
      const Vec dz = softmax_dz(p, Vec::loadu(s.g.data() + k * V), total) + Vec::loadu(s.h.data() + k * V);
      Vec::blendv(zero, dz, valid).store(s.g.data() + k * V);  // exactly 0 when ignored
    }
  } else {  // sigmoid
    const Vec gamma(static_cast<acc_t>(fg.gamma));
    for (int64_t k = 0; k < C; ++k) {
      const Vec z = Vec::loadu(s.x.data() + k * V);
      const Vec e = vexp(z.neg());
      const Vec p = sigmoid_from_exp(e);
      const Vec tk = target(k);
      Vec dz = sigmoid_dz(p, grad_p(Vec(g_i[k]), Vec(g_p[k]), tk, p, power));
      const Vec w = pixel_weight(Vec(g_x[k]), Vec(g_l[k]), tk);
      if (focal && fg.mode != 0) {
        Vec pm, sp, a, c;
        sigmoid_softplus<VM>(z, e, p, pm, sp);
        const Vec b = bce_term<VM>(sp, tk, z);
        if (kLabels || all_binary(tk)) {
          sigmoid_focal_binary<VM>(tk == Vec(acc_t(1)), p, pm, a, c);
        } else {
          sigmoid_focal_soft<VM>(z, tk, a, c);  // soft targets: one more exp per element
        }
        dz = dz + sigmoid_focal_dz(w, p, tk, pow_gamma<VM>(a, fg), b, c, gamma);
      } else {  // cross-entropy (and focal with gamma = 0)
        dz = dz + sigmoid_ce_dz(w, p, tk);
      }
      Vec::blendv(zero, dz, valid).store(s.g.data() + k * V);  // exactly 0 when ignored
    }
  }
}

template <typename scalar_t, typename tgt_t, bool kLabels>
void forward_impl(const at::Tensor& x, const at::Tensor& t, const DiceOptions& o, at::Tensor& partial) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int V = Vec::size();
  const int64_t N = x.size(0), C = x.size(1), M = x.size(2);
  const int64_t nchunks = partial.size(1);
  const Layout Lx = layout_of(x);
  const Layout Lt = kLabels ? Layout{t.stride(0), 0, t.stride(1), false} : layout_of(t);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const tgt_t* tp = t.const_data_ptr<tgt_t>();
  acc_t* out = partial.mutable_data_ptr<acc_t>();
  const int power = o.power;

  const int rows = o.rows();
  const bool pixel = o.pixel_loss != kPixelNone, focal = o.pixel_loss == kPixelFocal;
  const FocalGamma fg = focal_gamma(o.gamma);

  at::parallel_for(0, N * nchunks, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> s(C, !kLabels, false, rows, pixel);
    acc_t* acc = s.acc.data();  // [rows][C][V]: I, P, T (, X, L)
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / nchunks, chunk = task % nchunks;
      const int64_t m_begin = chunk * kCpuChunk, m_end = std::min(M, m_begin + kCpuChunk);
      chunk_codes<tgt_t, kLabels, acc_t>(tp + n * Lt.sN, Lt.sM, m_begin, m_end, C, o, s.codes.data());
      std::fill(s.acc.begin(), s.acc.end(), acc_t(0));
      for (int64_t m0 = m_begin; m0 < m_end; m0 += V) {
        const int cnt = static_cast<int>(std::min<int64_t>(V, m_end - m0));
        load_tile<scalar_t, acc_t>(xp + n * Lx.sN, Lx, C, m0, cnt, s.x.data());
        if constexpr (!kLabels) load_tile<tgt_t, acc_t>(tp + n * Lt.sN, Lt, C, m0, cnt, s.t.data());
        const Vec code = Vec::loadu(s.codes.data() + (m0 - m_begin));
        // all-ones lanes for counted pixels: ignored ones are selected away (never multiplied by 0,
        // so NaN/inf there changes nothing)
        const Vec valid = code != Vec(acc_t(kIgnored));
        if (pixel) {
          forward_pixel_tile<acc_t, kLabels>(s, C, o.activation, power, focal, fg, code, valid, acc);
          continue;
        }
        activate_tile(s.x.data(), C, o.activation);
        for (int64_t k = 0; k < C; ++k) {
          const Vec p = Vec::blendv(Vec(acc_t(0)), Vec::loadu(s.x.data() + k * V), valid);
          Vec tk;
          if constexpr (kLabels) {
            tk = code.eq(Vec(acc_t(k)));
          } else {
            tk = Vec::loadu(s.t.data() + k * V);
          }
          acc_t* a = acc + k * V;
          (Vec::loadu(a) + p * tk).store(a);
          (Vec::loadu(a + C * V) + pow_q(p, power)).store(a + C * V);
          (Vec::loadu(a + 2 * C * V) + pow_q(tk, power)).store(a + 2 * C * V);
        }
      }
      // Horizontal sums in lane order: (rows, C) partial of this task.
      acc_t* dst = out + task * rows * C;
      for (int64_t j = 0; j < rows * C; ++j) {
        acc_t sum = 0;
        for (int l = 0; l < V; ++l) sum += acc[j * V + l];
        dst[j] = sum;
      }
    }
  });
}

template <typename scalar_t, typename tgt_t, bool kLabels>
void backward_impl(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& t, const DiceOptions& o,
                   at::Tensor& gx) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int V = Vec::size();
  const int64_t N = x.size(0), C = x.size(1), M = x.size(2);
  const int64_t nchunks = (M + kCpuChunk - 1) / kCpuChunk;
  const Layout Lx = layout_of(x), Lg = layout_of(gx);
  const Layout Lt = kLabels ? Layout{t.stride(0), 0, t.stride(1), false} : layout_of(t);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const tgt_t* tp = t.const_data_ptr<tgt_t>();
  const acc_t* gp = grad.const_data_ptr<acc_t>();  // (N, rows, C) contiguous
  scalar_t* op = gx.mutable_data_ptr<scalar_t>();
  const int power = o.power, activation = o.activation, rows = o.rows();
  const bool pixel = o.pixel_loss != kPixelNone, focal = o.pixel_loss == kPixelFocal;
  const FocalGamma fg = focal_gamma(o.gamma);

  at::parallel_for(0, N * nchunks, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> s(C, !kLabels, true, 0, pixel);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / nchunks, chunk = task % nchunks;
      const int64_t m_begin = chunk * kCpuChunk, m_end = std::min(M, m_begin + kCpuChunk);
      chunk_codes<tgt_t, kLabels, acc_t>(tp + n * Lt.sN, Lt.sM, m_begin, m_end, C, o, s.codes.data());
      const acc_t* g_i = gp + n * rows * C;
      const acc_t* g_p = g_i + C;
      for (int64_t m0 = m_begin; m0 < m_end; m0 += V) {
        const int cnt = static_cast<int>(std::min<int64_t>(V, m_end - m0));
        load_tile<scalar_t, acc_t>(xp + n * Lx.sN, Lx, C, m0, cnt, s.x.data());
        if constexpr (!kLabels) load_tile<tgt_t, acc_t>(tp + n * Lt.sN, Lt, C, m0, cnt, s.t.data());
        const Vec code = Vec::loadu(s.codes.data() + (m0 - m_begin));
        const Vec valid = code != Vec(acc_t(kIgnored));  // all-ones lanes for counted pixels
        if (pixel) {
          backward_pixel_tile<acc_t, kLabels>(s, C, activation, power, focal, fg, code, valid, g_i);
          store_tile<scalar_t, acc_t>(op + n * Lg.sN, Lg, C, m0, cnt, s.g.data());
          continue;
        }
        activate_tile(s.x.data(), C, activation);
        Vec dot(acc_t(0));
        for (int64_t k = 0; k < C; ++k) {
          const Vec p = Vec::loadu(s.x.data() + k * V);
          Vec tk;
          if constexpr (kLabels) {
            tk = code.eq(Vec(acc_t(k)));
          } else {
            tk = Vec::loadu(s.t.data() + k * V);
          }
          const Vec g = grad_p(Vec(g_i[k]), Vec(g_p[k]), tk, p, power);
          g.store(s.g.data() + k * V);
          if (activation == kSoftmax) dot = dot + p * g;
        }
        for (int64_t k = 0; k < C; ++k) {
          const Vec p = Vec::loadu(s.x.data() + k * V);
          const Vec g = Vec::loadu(s.g.data() + k * V);
          Vec dz = g;
          if (activation == kSoftmax) {
            dz = softmax_dz(p, g, dot);
          } else if (activation == kSigmoid) {
            dz = sigmoid_dz(p, g);
          }
          Vec::blendv(Vec(acc_t(0)), dz, valid).store(s.g.data() + k * V);  // exactly 0 when ignored
        }
        store_tile<scalar_t, acc_t>(op + n * Lg.sN, Lg, C, m0, cnt, s.g.data());
      }
    }
  });
}

at::Tensor forward(const at::Tensor& x_in, const at::Tensor& t_in, const DiceOptions& o) {
  const at::Tensor x = fast_layout(x_in);
  const at::Tensor t = t_in.is_floating_point() ? fast_layout(t_in) : t_in;
  const int64_t N = x.size(0), C = x.size(1), M = x.size(2);
  const int64_t nchunks = (M + kCpuChunk - 1) / kCpuChunk;
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t rows = o.rows();
  at::Tensor partial = at::empty({N, nchunks, rows, C}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dicetorch_fused_forward_cpu", [&] {
    DICE_DISPATCH_TARGET(t, forward_impl, x, t, o, partial);
  });
  // Fixed-order second stage: chunk 0, 1, 2, ... of each image (not at::sum, whose order may
  // depend on the number of threads).
  at::Tensor stats = at::empty({N, rows, C}, partial.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "dicetorch_fused_forward_cpu_sum", [&] {
    const scalar_t* src = partial.const_data_ptr<scalar_t>();
    scalar_t* dst = stats.mutable_data_ptr<scalar_t>();
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t j = 0; j < rows * C; ++j) {
        scalar_t sum = 0;
        for (int64_t c = 0; c < nchunks; ++c) sum += src[(n * nchunks + c) * rows * C + j];
        dst[n * rows * C + j] = sum;
      }
    }
  });
  return stats;
}

at::Tensor backward(const at::Tensor& grad, const at::Tensor& x_in, const at::Tensor& t_in, const DiceOptions& o) {
  const at::Tensor x = fast_layout(x_in);
  const at::Tensor t = t_in.is_floating_point() ? fast_layout(t_in) : t_in;
  // Gradient in x's layout (channels-last stays channels-last) when x is dense.
  at::Tensor gx = x.is_non_overlapping_and_dense() ? at::empty_strided(x.sizes(), x.strides(), x.options())
                                                   : at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dicetorch_fused_backward_cpu", [&] {
    DICE_DISPATCH_TARGET(t, backward_impl, grad, x, t, o, gx);
  });
  return gx;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace dicetorch
