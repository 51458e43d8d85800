// Fused C++ CPU kernels of dicetorch::fused_forward / fused_backward.
//
// This file is compiled once per CPU capability: as itself (the portable DEFAULT kernel) and,
// on x86-64, through dice_cpu_avx2.cpp / dice_cpu_avx512.cpp, which setup.py compiles with that
// instruction set and -DCPU_CAPABILITY=<capability>.  Everything below lives in the namespace
// dicetorch::cpu::<capability> (and at::vec::<capability> for the vector types), so the copies
// never collide; dice.cpp picks one at run time.
//
// Algorithm (forward): the pixels of each image are cut into fixed chunks of kCpuChunk pixels;
// one task = (image, chunk).  A task first turns its chunk's labels into class codes (one
// vectorized loop), then walks the chunk one vector of V pixels at a time, in one sweep: it loads
// the (C, V) tile (converting fp16/bf16; transposing channels-last input through a staging buffer),
// computes p = activation(x) once per element (each exp once), and adds p*t, p^q, t^q into
// per-class vector accumulators.  For float32 label targets with C <= kMaxFixedC the channel count
// is a compile-time constant, so the tile and the accumulators stay in registers.  Each task writes
// its (3, C) partial sums; the partials of an image are then added in chunk order.  The result is
// therefore independent of the number of threads.
// Backward: the same tiles, one pass, g = gI*t + gP*q*p^(q-1) and the activation's Jacobian.
//
// Pixel losses (compound Dice + CE / focal, rows X = sum t e and L = sum e): the same tiles and the
// same exps.  Softmax keeps d = z - max next to e = exp(d), so -log p = log1p(s - 1) - d needs one
// log1p per pixel; sigmoid gets softplus(z) from the e = exp(-z) of its p, one log1p per element.
// The focal factors reuse those (products and a sqrt for whole and half-whole gamma, exp(gamma log)
// for any other); only the sigmoid focal loss with soft (non-0/1) targets takes a second exp per
// element.  The element formulas are the shared ones of dice_math.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>
#include <type_traits>
#include <vector>

#include "../dice.h"
#include "../dice_math.h"

#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>  // non-temporal stores
#endif

namespace dicetorch {
namespace cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

#if defined(__GNUC__)
// Everything the per-vector code calls is inlined (lambdas included), so the fixed tiles never
// leave the chunk function: a tile passed by reference to an out-of-line call would have to live
// in memory.
#define DICE_INLINE inline __attribute__((always_inline))
#define DICE_LAMBDA __attribute__((always_inline))
// exp_u20 inlined into vexp whatever the size of the caller (flatten), and vexp into the caller
#define DICE_FLAT_INLINE inline __attribute__((always_inline, flatten))
#else
#define DICE_INLINE inline
#define DICE_LAMBDA
#define DICE_FLAT_INLINE inline
#endif

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
DICE_FLAT_INLINE Vectorized<acc_t> vexp(const Vectorized<acc_t>& v) {
  // The op is bound by exp: the fast float exp (documented max error 20 ULP, i.e. ~1e-6 relative)
  // is far below the fp32 summation error of the sums it feeds.  It clamps its argument, which
  // would turn NaN into a finite value: NaN lanes are passed through (NaN in, NaN out).
  if constexpr (std::is_same_v<acc_t, float>) {
    return Vectorized<acc_t>::blendv(v.exp_u20(), v, v.isnan());
  } else {
    return v.exp();
  }
}

/// exp(d) for the softmax's d = z - max <= 0 (or NaN).  exp_u20's range reduction and polynomial
/// without what d <= 0 makes unnecessary: no upper clamp, no 2^(n-1) * 2 overflow guard (2^n is
/// built directly), no NaN blend (the clamp returns a NaN operand, and NaN flows through).  Seven
/// of its 21 vector instructions, a quarter of the softmax's arithmetic (AVX-512: 9 of 21, with
/// 2^n applied by vscalefps).  d < ln(FLT_MIN): 0.
template <typename acc_t>
DICE_FLAT_INLINE Vectorized<acc_t> vexp_nonpos(const Vectorized<acc_t>& d) {
  if constexpr (std::is_same_v<acc_t, float>) {
    using Vec = Vectorized<float>;
    const Vec ln_min(-87.33654475f);  // ln(FLT_MIN): n >= -126 below, so 2^n is a normal float
    const Vec x = at::vec::clamp_min(d, ln_min);  // max(ln_min, d), d when d is NaN
    const Vec n = at::vec::fmadd(x, Vec(1.44269504f), Vec(0.5f)).floor();  // round(x / ln 2)
    const Vec r = at::vec::fnmadd(n, Vec(0.693147182f), x);               // |r| <= ln(2) / 2
    Vec y = at::vec::fmadd(r, Vec(0.00828929059f), Vec(0.0418978221f));   // exp_u20's coefficients
    y = at::vec::fmadd(r, y, Vec(0.166676521f));
    y = at::vec::fmadd(r, y, Vec(0.499991506f));
    y = at::vec::fmadd(r, y, Vec(0.999999701f));
    y = at::vec::fmadd(r, y, Vec(1.0f));
#if defined(CPU_CAPABILITY_AVX512)
    // y 2^n in one instruction, zero below ln_min under a k-mask (not NaN: NaN flows through): 2
    // instructions for the 7 below (ATen's blend takes a vector mask, two conversions from the
    // compare's k-mask).  The same value for every float d in [-88, 0], with and without
    // flush-to-zero (checked exhaustively against the 7).  The softmax kernels measured 7-12 %
    // faster at 1 thread (Dice forward at (8, 21, 256^2) 5.6-5.8 -> 4.8-5.2 ms, warm caches).
    return _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(d, ln_min, _CMP_NLT_UQ), y, n);
#else
    // 2^n from its bits: (n + 127) << 23, exact in float arithmetic for -126 <= n <= 0
    const Vec two_n = at::vec::cast<float>(
        at::vec::convert_to_int_of_same_size(at::vec::fmadd(n, Vec(8388608.0f), Vec(1065353216.0f))));
    return Vec::blendv(y * two_n, Vec(0.0f), d < ln_min);
#endif
  } else {
    return vexp(d);
  }
}

/// max(a, b) without NaN propagation (one instruction instead of three): the softmax's maximum
/// only shifts the exponents; a NaN logit still makes its pixel NaN through its own d = z - max.
template <typename acc_t>
DICE_INLINE Vectorized<acc_t> max_shift(const Vectorized<acc_t>& a, const Vectorized<acc_t>& b) {
  return at::vec::clamp_min(a, b);
}

/// dice_math.h's element primitives over Vectorized lanes (masks are lane masks, select = blendv).
template <typename acc_t>
struct VecMath {
  using Vec = Vectorized<acc_t>;
  DICE_INLINE static Vec select(const Vec& mask, const Vec& a, const Vec& b) { return Vec::blendv(b, a, mask); }
  DICE_INLINE static Vec log1p(const Vec& x) { return x.log1p(); }
  DICE_INLINE static Vec log1p_unit(const Vec& x) {
    if constexpr (std::is_same_v<acc_t, float>) {
      return log1p_unit_series(x);  // arithmetic only: the sigmoid's per-element log
    } else {
      return x.log1p();
    }
  }
  DICE_INLINE static Vec exp(const Vec& x) { return vexp(x); }
  DICE_INLINE static Vec abs(const Vec& x) { return x.abs(); }
  DICE_INLINE static Vec sqrt(const Vec& x) { return x.sqrt(); }
  // x^g for x in [0, 1] as exp(g log x) with the kernel's exp: a third of Sleef's pow's time, and
  // as accurate as the other exps (0^g = exp(-inf) = 0 for g > 0; NaN stays NaN)
  DICE_INLINE static Vec pow(const Vec& x, double g) { return vexp(Vec(static_cast<acc_t>(g)) * x.log()); }
};

/// Whether every lane of t is 0 or 1 (one-hot float targets take the sigmoid focal loss's no-exp path).
template <typename acc_t>
DICE_INLINE bool all_binary(const Vectorized<acc_t>& t) {
  using Vec = Vectorized<acc_t>;
  const Vec binary = (t == Vec(acc_t(0))) | (t == Vec(acc_t(1)));
  return Vec::blendv(Vec(acc_t(1)), Vec(acc_t(0)), binary).zero_mask() == (1 << Vec::size()) - 1;
}

template <typename scalar_t, typename acc_t>
DICE_INLINE Vectorized<acc_t> load_vec(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return Vectorized<acc_t>::loadu(p);
  } else {
    Vectorized<float> v;
    at::vec::load_to_float<scalar_t>(p, v);
    return v;
  }
}

template <typename scalar_t, typename acc_t>
DICE_INLINE void store_vec(scalar_t* p, const Vectorized<acc_t>& v) {
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

// Compile-time channel counts: label targets with C <= kMaxFixedC (float accumulation) get a copy
// of the kernel per C whose tiles and accumulators are fixed arrays indexed only by constants
// (every channel loop unrolled), so the compiler keeps them in registers: one sweep over each
// vector of pixels, no tile buffer.  kC == 0 is the copy for any C, with the tiles on the heap.
constexpr int kMaxFixedC = 8;


/// f(k) for k = 0 .. C-1: unrolled with constant k (std::integral_constant) when kC > 0.
template <int kC, typename F>
DICE_INLINE void for_channels(int64_t C, F&& f) {
  if constexpr (kC > 0) {
    [&]<int64_t... k>(std::integer_sequence<int64_t, k...>) DICE_LAMBDA {
      (f(std::integral_constant<int64_t, k>{}), ...);
    }(std::make_integer_sequence<int64_t, kC>{});
  } else {
    for (int64_t k = 0; k < C; ++k) f(k);
  }
}

/// kRows x C channel vectors of V pixels: a fixed array when kC > 0, else on the heap.
template <typename acc_t, int kC, int kRows = 1>
struct Tile : std::array<Vectorized<acc_t>, kC * kRows> {
  explicit Tile(int64_t) {}
};
template <typename acc_t, int kRows>
struct Tile<acc_t, 0, kRows> : std::vector<Vectorized<acc_t>> {
  explicit Tile(int64_t C) : std::vector<Vectorized<acc_t>>(C * kRows) {}
};

/// Pixels ahead of the current vector whose cache lines the general-C copy prefetches, channel by
/// channel (8 vectors: at 21 channels, several hundred cycles, a DRAM latency;
/// farther ahead measured slower where the channel stride aliases in the caches).
constexpr int64_t kPrefetchAhead = 64;
/// The same for the fixed-C copies (C <= 8 streams): the hardware prefetchers follow these streams
/// but stop at every 4 KiB page, and at 4 classes the loops waited on the logits there.  256 pixels
/// (1 KiB of float32 per channel) took the (2, 4, 96^3) Dice step from 12.9 to 11.1 ms and the Dice +
/// CE step from 14.6 to 11.9 ms at 1 thread (interleaved with MONAI's losses); 512 measured the same.
constexpr int64_t kPrefetchAheadFixed = 256;

/// Prefetches pixel m0 + kPrefetchAhead(Fixed) of every channel of a planar operand: a many-class
/// image is C read streams (and C more written, in the backward) at a stride of M pixels, more than
/// the hardware prefetchers follow.  Without it the backward at (8, 21, 256²) waited on its loads and
/// stores for over half its time.  A prefetch is a hint: it never faults, so lines past the end of
/// the image need no test.
template <int kC, typename scalar_t>
DICE_INLINE void prefetch_channels(const scalar_t* base, const Layout& L, int64_t C, int64_t m0, bool write) {
#if defined(__GNUC__)
  if (!L.planar) return;  // channels-last: one contiguous stream
  const scalar_t* p = base + m0 + (kC == 0 ? kPrefetchAhead : kPrefetchAheadFixed);
  for (int64_t k = 0; k < C; ++k) {
    if (write) {
      __builtin_prefetch(p + k * L.sC, 1);
    } else {
      __builtin_prefetch(p + k * L.sC, 0);
    }
  }
#endif
}

/// x[k] = channel k of pixels [m0, m0+cnt) of one image (lanes >= cnt: 0).  Full vectors of
/// pixel-contiguous input go straight to registers; the rest through ``stage`` (C x V).
template <typename scalar_t, typename acc_t, int kC>
DICE_INLINE void load_channels(const scalar_t* base, const Layout& L, int64_t C, int64_t m0, int cnt, acc_t* stage,
                               Tile<acc_t, kC>& x) {
  using Vec = Vectorized<acc_t>;
  prefetch_channels<kC>(base, L, C, m0, false);
  if (L.planar && cnt == Vec::size()) {
    for_channels<kC>(C, [&](auto k) DICE_LAMBDA { x[k] = load_vec<scalar_t, acc_t>(base + k * L.sC + m0); });
  } else {
    load_tile<scalar_t, acc_t>(base, L, C, m0, cnt, stage);
    for_channels<kC>(C, [&](auto k) DICE_LAMBDA { x[k] = Vec::loadu(stage + k * Vec::size()); });
  }
}

/// A float32 gradient of kStreamMinBytes or more is stored past the caches (non-temporal stores,
/// whole aligned vectors): the kernel writes it once and never reads it, and a plain store first
/// reads each line it writes (write-allocate), a third of the backward's memory traffic.  A
/// gradient that large would leave the core's L2 before its consumer reads it anyway; smaller
/// ones stay in the caches for it.  At (2, 4, 96^3), interleaved with MONAI's losses, the Dice step
/// went from 9.2-9.3 to 8.3-8.5 ms at 1 thread and from 5.0-5.5 to 4.6-5.1 ms at 2.
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
constexpr bool kStreamStores = true;
#else
constexpr bool kStreamStores = false;
#endif
constexpr int64_t kStreamMinBytes = int64_t{4} << 20;

/// v into p, non-temporally where p is a whole vector's aligned address (else a plain store).
template <typename scalar_t, typename acc_t>
DICE_INLINE void stream_vec(scalar_t* p, const Vectorized<acc_t>& v) {
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    if ((reinterpret_cast<uintptr_t>(p) & (sizeof(v) - 1)) == 0) {
#if defined(CPU_CAPABILITY_AVX512)
      return _mm512_stream_ps(p, v);
#elif defined(CPU_CAPABILITY_AVX2)
      return _mm256_stream_ps(p, v);
#endif
    }
  }
  store_vec<scalar_t, acc_t>(p, v);
}

/// Orders a task's non-temporal stores before whatever follows it (they are weakly ordered).
DICE_INLINE void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

/// Pixels [m0, m0+cnt) of one image = lanes [0, cnt) of f(k), channel k's vector, computed as it is
/// stored (the inverse of load_channels): full vectors of pixel-contiguous output straight from
/// registers, the rest through ``stage``.
template <typename scalar_t, typename acc_t, int kC, typename F>
DICE_INLINE void store_channels_of(scalar_t* base, const Layout& L, int64_t C, int64_t m0, int cnt, acc_t* stage,
                                   F&& f, bool stream) {
  using Vec = Vectorized<acc_t>;
  if (!stream) prefetch_channels<kC>(base, L, C, m0, true);
  if (L.planar && cnt == Vec::size()) {
    for_channels<kC>(C, [&](auto k) DICE_LAMBDA {
      if (stream) {
        stream_vec<scalar_t, acc_t>(base + k * L.sC + m0, f(k));
      } else {
        store_vec<scalar_t, acc_t>(base + k * L.sC + m0, f(k));
      }
    });
  } else {
    for_channels<kC>(C, [&](auto k) DICE_LAMBDA { f(k).store(stage + k * Vec::size()); });
    store_tile<scalar_t, acc_t>(base, L, C, m0, cnt, stage);
  }
}

/// store_channels_of the tile g.
template <typename scalar_t, typename acc_t, int kC>
DICE_INLINE void store_channels(scalar_t* base, const Layout& L, int64_t C, int64_t m0, int cnt, acc_t* stage,
                                const Tile<acc_t, kC>& g, bool stream) {
  store_channels_of<scalar_t, acc_t, kC>(base, L, C, m0, cnt, stage, [&](auto k) DICE_LAMBDA { return g[k]; },
                                         stream);
}

/// Pixel codes of one chunk, [m_begin, m_end) of image n, into codes[0 .. round_up(len, V)):
/// label_code() of each label, or 0 for float targets; kIgnored for the padding lanes of the last
/// vector.  Filled once per chunk in a tight loop (which the compiler vectorizes) so that the tile
/// loop reads the codes as whole vectors.  One function per label type, called through a pointer:
/// the tile loops do not depend on the label type.
/// With ``save`` (the forward of a training step, see forward()), label targets also leave each
/// pixel's code there as one byte, for the backward to read instead of the labels.
template <typename acc_t>
using CodesFn = void (*)(const at::Tensor& t, int64_t n, int64_t m_begin, int64_t m_end, int64_t C,
                         const DiceOptions& o, acc_t* codes, uint8_t* save);

/// The next task's labels, prefetched into L2 one step per vector of pixels while this chunk's loop
/// runs, so that its codes function reads them from the cache instead of waiting on a burst of
/// misses (the hardware prefetchers stop at each 4 KiB page).  With contiguous labels the next task
/// (the next chunk, or the next image's first) starts at pixel m_end; otherwise p is null.
struct LabelsAhead {
  const char* p = nullptr;  // the label of pixel m_end
  int64_t bytes = 0;        // per label
  DICE_INLINE void operator()(int64_t j) const {  // j: pixel offset in the chunk
#if defined(__GNUC__)
    if (p) {
      __builtin_prefetch(p + j * bytes, 0, 2);  // a hint: never faults past the tensor's end
      // int64 labels: an AVX-512 vector's 16 labels span two lines, and the adjacent-line
      // prefetcher did not bring the second (the 4-class forward after a 512 MB write went from
      // 2.20-2.30 to 1.89-1.97 ms at 2 threads, 4.42-4.64 to 3.80-3.98 at 1, with it)
      if (bytes == 8) __builtin_prefetch(p + j * bytes + 64, 0, 2);
    }
#endif
  }
};

template <typename acc_t>
void pad_codes(int64_t len, acc_t* codes) {
  constexpr int V = Vectorized<acc_t>::size();
  std::fill(codes + len, codes + (len + V - 1) / V * V, acc_t(kIgnored));
}

template <typename tgt_t, typename acc_t>
void label_codes(const at::Tensor& t, int64_t n, int64_t m_begin, int64_t m_end, int64_t C, const DiceOptions& o,
                 acc_t* codes, uint8_t* save) {
  const int64_t stride = t.stride(1), len = m_end - m_begin;
  const tgt_t* lp = t.const_data_ptr<tgt_t>() + n * t.stride(0) + m_begin * stride;
  // has_ignore and saving as compile-time constants of each loop keep the loops branch-free
  const auto fill = [&](auto has_ignore, auto saving) {
    constexpr bool ign = decltype(has_ignore)::value;
    const auto put = [&](int64_t j, tgt_t label) DICE_LAMBDA {
      const int code = label_code(label, C, ign, o.ignore_index);
      codes[j] = static_cast<acc_t>(code);
      if constexpr (decltype(saving)::value) save[j] = saved_code(code);
    };
    if (stride == 1) {
      for (int64_t j = 0; j < len; ++j) put(j, lp[j]);
    } else {
      for (int64_t j = 0; j < len; ++j) put(j, lp[j * stride]);
    }
  };
  const auto fill_ign = [&](auto saving) {
    if (o.has_ignore) {
      fill(std::true_type{}, saving);
    } else {
      fill(std::false_type{}, saving);
    }
  };
  if (save != nullptr) {
    fill_ign(std::true_type{});
  } else {
    fill_ign(std::false_type{});
  }
  pad_codes(len, codes);
}

template <typename acc_t>
void float_target_codes(const at::Tensor&, int64_t, int64_t m_begin, int64_t m_end, int64_t, const DiceOptions&,
                        acc_t* codes, uint8_t*) {
  std::fill(codes, codes + (m_end - m_begin), acc_t(0));
  pad_codes(m_end - m_begin, codes);
}

/// The softmax up to its last multiply: x -> e = exp(z - max) in place, returns r = 1/s (p = e r).
/// Where the tile lives in memory (the general-C copy) a loop that needs p takes e r as it goes,
/// one load and one store per channel fewer than multiplying the tile first.
template <typename acc_t, int kC>
DICE_INLINE Vectorized<acc_t> softmax_exps(Tile<acc_t, kC>& x, int64_t C) {
  using Vec = Vectorized<acc_t>;
  Vec mx = x[0];
  for_channels<kC>(C, [&](auto k) DICE_LAMBDA { mx = max_shift(mx, x[k]); });
  Vec s(acc_t(0));
  for_channels<kC>(C, [&](auto k) DICE_LAMBDA {
    x[k] = vexp_nonpos(x[k] - mx);
    s = s + x[k];
  });
  return Vec(acc_t(1)) / s;
}

/// In place: x -> p = activation(x), each exp computed once; hard activations write 0/1 (argmax
/// over the channels of each lane, or x > 0).
template <typename acc_t, int kC>
DICE_INLINE void activate(Tile<acc_t, kC>& x, int64_t C, int activation) {
  using Vec = Vectorized<acc_t>;
  if (activation == kSoftmax) {
    const Vec r = softmax_exps(x, C);
    for_channels<kC>(C, [&](auto k) DICE_LAMBDA { x[k] = x[k] * r; });
  } else if (activation == kSigmoid) {
    for_channels<kC>(C, [&](auto k) DICE_LAMBDA { x[k] = sigmoid_from_exp(vexp(x[k].neg())); });
  } else if (activation == kArgmax) {
    // per lane: the running maximum and its channel index (as acc_t, exact for any C < 2^24)
    Vec best = x[0], idx(acc_t(0));
    for_channels<kC>(C, [&](auto k) DICE_LAMBDA {
      const Vec take = argmax_takes(x[k], best);  // k = 0: x == best, never taken
      best = Vec::blendv(best, x[k], take);
      idx = Vec::blendv(idx, Vec(acc_t(k)), take);
    });
    for_channels<kC>(C, [&](auto k) DICE_LAMBDA { x[k] = idx.eq(Vec(acc_t(k))); });  // 1.0 / 0.0
  } else if (activation == kThreshold) {
    for_channels<kC>(C, [&](auto k) DICE_LAMBDA { x[k] = x[k].gt(Vec(acc_t(0))); });  // NaN: 0
  }
}

/// activate()'s softmax of pixels [m0, m0 + 2V) of a planar operand, two vectors at once: x gets p
/// of the first V pixels, y of the next V.  Each vector's exps, sum and division form one long
/// dependency chain, which one vector alone leaves the core waiting on; the two chains interleaved
/// made the 4-class Dice forward kernel 6-8 % faster at one thread.  (The backward, which moves
/// about twice the forward's bytes and runs near the memory floor, measured no faster this way
/// and keeps one vector per iteration.)  The operations are activate()'s, so p is the same, bit for bit.
template <typename scalar_t, typename acc_t, int kC>
DICE_INLINE void softmax_two(const scalar_t* base, const Layout& L, int64_t m0, Tile<acc_t, kC>& x,
                             Tile<acc_t, kC>& y) {
  static_assert(kC > 0, "the fixed-C copies keep both tiles in registers");
  using Vec = Vectorized<acc_t>;
  constexpr int V = Vec::size();
  prefetch_channels<kC>(base, L, kC, m0, false);
  prefetch_channels<kC>(base, L, kC, m0 + V, false);
  for_channels<kC>(kC, [&](auto k) DICE_LAMBDA {
    x[k] = load_vec<scalar_t, acc_t>(base + k * L.sC + m0);
    y[k] = load_vec<scalar_t, acc_t>(base + k * L.sC + m0 + V);
  });
  Vec mx0 = x[0], mx1 = y[0];
  for_channels<kC>(kC, [&](auto k) DICE_LAMBDA {
    mx0 = max_shift(mx0, x[k]);
    mx1 = max_shift(mx1, y[k]);
  });
  Vec s0(acc_t(0)), s1(acc_t(0));
  for_channels<kC>(kC, [&](auto k) DICE_LAMBDA {
    x[k] = vexp_nonpos(x[k] - mx0);
    y[k] = vexp_nonpos(y[k] - mx1);
    s0 = s0 + x[k];
    s1 = s1 + y[k];
  });
  const Vec r0 = Vec(acc_t(1)) / s0, r1 = Vec(acc_t(1)) / s1;
  for_channels<kC>(kC, [&](auto k) DICE_LAMBDA {
    x[k] = x[k] * r0;
    y[k] = y[k] * r1;
  });
}

/// f(std::integral_constant<int, q>{}) for the power q in {1, 2}: q a constant in f's loop.
template <typename F>
DICE_INLINE void with_power(int power, F&& f) {
  if (power == 1) {
    f(std::integral_constant<int, 1>{});
  } else {
    f(std::integral_constant<int, 2>{});
  }
}

/// Softmax for the pixel losses: z (in x) -> d = z - max (in x) and e = exp(d), each exp once;
/// returns per lane r = 1/s and sm1 = s - 1 summed without the maximum's 1 (see dice_math.h).
/// s is summed exactly as activate() sums it, so p = e r is the p of the Dice-only path, bit for bit.
template <typename acc_t, int kC>
DICE_INLINE void softmax_pixel(Tile<acc_t, kC>& x, Tile<acc_t, kC>& e, int64_t C, Vectorized<acc_t>& r,
                               Vectorized<acc_t>& sm1) {
  using Vec = Vectorized<acc_t>;
  Vec mx = x[0];
  for_channels<kC>(C, [&](auto k) DICE_LAMBDA { mx = max_shift(mx, x[k]); });
  const Vec zero(acc_t(0)), one(acc_t(1));
  Vec s(acc_t(0)), below(acc_t(0)), maxima(acc_t(0));
  for_channels<kC>(C, [&](auto k) DICE_LAMBDA {
    x[k] = x[k] - mx;
    e[k] = vexp_nonpos(x[k]);
    s = s + e[k];
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<acc_t, float>) {  // masked adds on a k-mask: 3 instructions, not 8
      const __mmask16 is_max = _mm512_cmp_ps_mask(x[k], zero, _CMP_EQ_OQ);
      below = _mm512_mask_add_ps(below, _knot_mask16(is_max), below, e[k]);
      maxima = _mm512_mask_add_ps(maxima, is_max, maxima, one);
      return;
    }
#endif
    const Vec is_max = x[k] == zero;  // e = exp(0) = 1 exactly there
    below = below + Vec::blendv(e[k], zero, is_max);
    maxima = maxima + Vec::blendv(zero, one, is_max);
  });
  r = one / s;
  sm1 = below + (maxima - one);
}

/// Horizontal sum of a vector, in lane order.
template <typename acc_t>
DICE_INLINE acc_t lane_sum(const Vectorized<acc_t>& v) {
  constexpr int V = Vectorized<acc_t>::size();
  alignas(64) acc_t lanes[V];
  v.store(lanes);
  acc_t sum = 0;
  for (int l = 0; l < V; ++l) sum += lanes[l];
  return sum;
}

/// Softmax cross-entropy with label targets (forward_chunk_softmax): -log p_k = log s - d_k, so the
/// pixel rows split into X_k = sum_{label k} log s + sum_{label k} (-d_k) and L_k = sum log s +
/// sum (-d_k) (no cancellation: every part is >= 0).  The sums of log s are kept as running
/// products, a = prod (1 + sm1) - 1 updated as a + sm1 + a sm1 (so confident pixels, sm1 ~ 0, keep
/// their digits), per class and over all counted pixels; forward_chunk_softmax takes their log1p every
/// log_every(C) vectors: one log1p per log_every(C) vectors and class instead of one per pixel.
/// Each lane's product gains one factor s <= C per vector, so between two logs (1 + a) <=
/// C^log_every(C) <= 2^kLogProductBits, short of float's overflow at 2^128.  C <= kMaxLogProductC =
/// 128 gives at least 17 vectors per log (more classes take the general loop, one log1p per pixel).
/// Each flush is an out-of-line Sleef call, around which the loop's accumulators are saved and
/// reloaded (no vector register survives a call): a log every 16 vectors at 4 classes made the
/// Dice + CE forward at (2, 4, 96^3) 11 % slower than one every 60 (3.7-3.9 against 3.3-3.4 ms at
/// 1 thread, warm caches).
constexpr int kLogProductBits = 120;
constexpr int64_t kMaxLogProductC = 128;
static_assert(kMaxFixedC <= kMaxLogProductC, "the fixed-C copies keep their logs as running products");

/// Vectors between two logs of the running products: the largest n with C^n <= 2^kLogProductBits.
inline int log_every(int64_t C) {
  int bits = 1;  // ceil(log2 C), at least 1
  while ((int64_t{1} << bits) < C) ++bits;
  return kLogProductBits / bits;
}

template <typename acc_t, int kC>
struct LogProducts {
  using Vec = Vectorized<acc_t>;
  Tile<acc_t, kC> a, log;  // per class: running product - 1, sum of its logs
  Vec a_all, log_all;      // the same over every counted pixel
  explicit LogProducts(int64_t C) : a(C), log(C), a_all(acc_t(0)), log_all(acc_t(0)) {
    for_channels<kC>(C, [&](auto k) DICE_LAMBDA {
      a[k] = Vec(acc_t(0));
      log[k] = Vec(acc_t(0));
    });
  }
  DICE_INLINE static void mul(Vec& a, const Vec& sm1) { a = at::vec::fmadd(a, sm1, a + sm1); }
  DICE_INLINE void flush(int64_t C) {
    for_channels<kC>(C, [&](auto k) DICE_LAMBDA {
      log[k] = log[k] + a[k].log1p();
      a[k] = Vec(acc_t(0));
    });
    log_all = log_all + a_all.log1p();
    a_all = Vec(acc_t(0));
  }
  /// Adds the log s parts to the pixel rows dst[3C + k] (X) and dst[4C + k] (L) of a chunk.
  void add_logs(int64_t C, acc_t* dst) {
    flush(C);
    const acc_t all = lane_sum(log_all);
    // a NaN logit at a counted pixel makes every class's X NaN, as t e = 0 * NaN does in the
    // reference: all is then NaN, else finite (0 * all = 0)
    const acc_t nan_spread = all * acc_t(0);
    for_channels<kC>(C, [&](auto k) DICE_LAMBDA {
      dst[3 * C + k] += lane_sum(log[k]) + nan_spread;
      dst[4 * C + k] += all;
    });
  }
};

/// Forward of one vector of pixels: p = activation(x) and the rows I, P, T (and, with a pixel
/// loss, X = sum t e and L = sum e from the same exps) added into acc ([rows][C] vectors).
/// Ignored pixels are selected away (never multiplied by 0, so NaN/inf there changes nothing).
template <typename acc_t, bool kLabels, int kC>
DICE_INLINE void forward_vector(Tile<acc_t, kC>& x, Tile<acc_t, kC>& e, const Tile<acc_t, kC>& t,
                                Tile<acc_t, kC, 5>& acc, int64_t C_,
                                const DiceOptions& o, const FocalGamma& fg, const Vectorized<acc_t>& code,
                                const Vectorized<acc_t>& valid) {
  const int64_t C = kC > 0 ? kC : C_;  // a constant in the fixed-C copies
  using Vec = Vectorized<acc_t>;
  using VM = VecMath<acc_t>;
  const Vec zero(acc_t(0));
  const int power = o.power;
  const bool focal = o.pixel_loss == kPixelFocal;
  const auto target = [&](auto k) DICE_LAMBDA {
    if constexpr (kLabels) {
      return code.eq(Vec(acc_t(k)));
    } else {
      return t[k];
    }
  };
  const auto dice = [&](auto k, const Vec& p_raw, const Vec& tk) DICE_LAMBDA {
    const Vec p = Vec::blendv(zero, p_raw, valid);
    acc[k] = acc[k] + p * tk;
    acc[C + k] = acc[C + k] + pow_q(p, power);
    acc[2 * C + k] = acc[2 * C + k] + pow_q(tk, power);
  };
  const auto pixel = [&](auto k, const Vec& term_raw, const Vec& tk) DICE_LAMBDA {
    const Vec term = Vec::blendv(zero, term_raw, valid);
    acc[3 * C + k] = acc[3 * C + k] + target_times<VM>(tk, term);
    acc[4 * C + k] = acc[4 * C + k] + term;
  };
  if (o.pixel_loss == kPixelNone && o.activation == kSoftmax) {
    const Vec r = softmax_exps(x, C);
    for_channels<kC>(C, [&](auto k) DICE_LAMBDA { dice(k, x[k] * r, target(k)); });
  } else if (o.pixel_loss == kPixelNone) {
    activate(x, C, o.activation);
    for_channels<kC>(C, [&](auto k) DICE_LAMBDA { dice(k, x[k], target(k)); });
  } else if (o.activation == kSoftmax) {
    Vec r, sm1;
    softmax_pixel(x, e, C, r, sm1);  // (cross-entropy with labels, C <= 128: forward_chunk_softmax)
    const Vec ls = sm1.log1p();  // log s: one log per pixel
    for_channels<kC>(C, [&](auto k) DICE_LAMBDA {
      const Vec tk = target(k);
      dice(k, e[k] * r, tk);
      const Vec ce = softmax_ce_term(ls, x[k]);
      pixel(k, focal ? softmax_focal_term<VM>(softmax_one_minus_p(sm1, e[k], r), ce, fg) : ce, tk);
    });
  } else {  // sigmoid
    for_channels<kC>(C, [&](auto k) DICE_LAMBDA {
      const Vec z = x[k];
      const Vec ez = vexp(z.neg());
      const Vec p = sigmoid_from_exp(ez);
      const Vec tk = target(k);
      dice(k, p, tk);
      Vec pm, sp;
      sigmoid_softplus<VM>(z, ez, p, pm, sp);
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
    });
  }
}

/// Backward of one vector of pixels: g = dL/dz of the Dice rows (dL/dp = gI t + gP q p^(q-1)
/// through the activation's Jacobian) plus, with a pixel loss, the pixel rows' (w = gX t + gL).
/// Ignored pixels get exactly 0.  grad: this image's (rows, C).
template <typename acc_t, bool kLabels, int kC>
DICE_INLINE void backward_vector(Tile<acc_t, kC>& x, Tile<acc_t, kC>& e, const Tile<acc_t, kC>& t,
                                 Tile<acc_t, kC>& g, Tile<acc_t, kC>& h, int64_t C_, const DiceOptions& o,
                                 const FocalGamma& fg, const acc_t* grad, const Vectorized<acc_t>& code,
                                 const Vectorized<acc_t>& valid) {
  const int64_t C = kC > 0 ? kC : C_;  // a constant in the fixed-C copies
  using Vec = Vectorized<acc_t>;
  using VM = VecMath<acc_t>;
  const Vec zero(acc_t(0));
  const int power = o.power, activation = o.activation;
  const bool focal = o.pixel_loss == kPixelFocal;
  const acc_t *g_i = grad, *g_p = grad + C, *g_x = grad + 3 * C, *g_l = grad + 4 * C;
  const auto target = [&](auto k) DICE_LAMBDA {
    if constexpr (kLabels) {
      return code.eq(Vec(acc_t(k)));
    } else {
      return t[k];
    }
  };
  if (o.pixel_loss == kPixelNone) {
    activate(x, C, activation);
    Vec dot(acc_t(0));
    for_channels<kC>(C, [&](auto k) DICE_LAMBDA {
      g[k] = grad_p(Vec(g_i[k]), Vec(g_p[k]), target(k), x[k], power);
      if (activation == kSoftmax) dot = dot + x[k] * g[k];
    });
    for_channels<kC>(C, [&](auto k) DICE_LAMBDA {
      Vec dz = g[k];
      if (activation == kSoftmax) {
        dz = softmax_dz(x[k], g[k], dot);
      } else if (activation == kSigmoid) {
        dz = sigmoid_dz(x[k], g[k]);
      }
      g[k] = Vec::blendv(zero, dz, valid);  // exactly 0 when ignored
    });
  } else if (activation == kSoftmax) {
    // dz_j = p_j (g_j - sum_k p_k g_k) + h_j - p_j sum_k h_k = p_j (g_j - (dot + hsum)) + h_j, with
    // h = -w (ce) or softmax_focal_h (focal)
    Vec r, sm1;
    softmax_pixel(x, e, C, r, sm1);
    const Vec ls = focal ? sm1.log1p() : zero;
    Vec dot(acc_t(0)), hsum(acc_t(0));
    for_channels<kC>(C, [&](auto k) DICE_LAMBDA {
      const Vec p = e[k] * r;
      const Vec tk = target(k);
      g[k] = grad_p(Vec(g_i[k]), Vec(g_p[k]), tk, p, power);
      const Vec w = pixel_weight(Vec(g_x[k]), Vec(g_l[k]), tk);
      h[k] = focal ? softmax_focal_h<VM>(w, p, softmax_one_minus_p(sm1, e[k], r), softmax_ce_term(ls, x[k]), fg)
                   : w.neg();
      dot = dot + p * g[k];
      hsum = hsum + h[k];
    });
    const Vec total = dot + hsum;
    for_channels<kC>(C, [&](auto k) DICE_LAMBDA {
      const Vec dz = softmax_dz(e[k] * r, g[k], total) + h[k];
      g[k] = Vec::blendv(zero, dz, valid);  // exactly 0 when ignored
    });
  } else {  // sigmoid
    const Vec gamma(static_cast<acc_t>(fg.gamma));
    for_channels<kC>(C, [&](auto k) DICE_LAMBDA {
      const Vec z = x[k];
      const Vec ez = vexp(z.neg());
      const Vec p = sigmoid_from_exp(ez);
      const Vec tk = target(k);
      Vec dz = sigmoid_dz(p, grad_p(Vec(g_i[k]), Vec(g_p[k]), tk, p, power));
      const Vec w = pixel_weight(Vec(g_x[k]), Vec(g_l[k]), tk);
      if (focal && fg.mode != 0) {
        Vec pm, sp, a, c;
        sigmoid_softplus<VM>(z, ez, p, pm, sp);
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
      g[k] = Vec::blendv(zero, dz, valid);  // exactly 0 when ignored
    });
  }
}

/// forward_chunk of the common training steps (softmax, label targets; Dice alone with fixed C, or
/// kCE, with cross-entropy and C <= kMaxLogProductC) in a loop of their own: only the accumulators
/// these rows need are live in it, so in the fixed-C copies few values spill to the stack (the
/// general loop, which serves every variant, keeps its 5 C accumulators and its tiles there), and
/// the log s parts of the cross-entropy rows are running products (LogProducts).  T, a count of
/// labels, adds the class masks I already needs (a second pass over the chunk's codes took 8 % of
/// the 4-class Dice forward).  The Dice rows use the same expressions in the same order as
/// forward_vector: their sums are bit-identical to the general loop's.
template <typename scalar_t, int kC, bool kCE, typename acc_t = acc_type<scalar_t>>
void forward_chunk_softmax(const scalar_t* xb, const Layout& Lx, int64_t C_, int64_t m_begin, int64_t m_end,
                           const acc_t* codes, const LabelsAhead& ahead, acc_t* stage, int power, acc_t* dst) {
  using Vec = Vectorized<acc_t>;
  constexpr int V = Vec::size();
  const int64_t C = kC > 0 ? kC : C_;  // a constant in the fixed-C copies
  const Vec zero(acc_t(0));
  Tile<acc_t, kC> x(C), e(C), ai(C), ap(C), at(C), ax(C), al(C);  // X, L: sums of d, negated at the end (kCE)
  LogProducts<acc_t, kC> lp(kCE ? C : 0);
  for_channels<kC>(C, [&](auto k) DICE_LAMBDA { ai[k] = ap[k] = at[k] = ax[k] = al[k] = zero; });
  const int every = log_every(C);
  int until_log = every;  // vectors before the next lp.flush
  // forward_vector's cross-entropy rows with label targets, of nv vectors of pixels in pixel order
  // (xs: d = z - max, es: exp(d)): each channel's six accumulators loaded once, updated vector by
  // vector, stored once (for nv = 2 in the general-C copy, whose accumulators live in memory).  The
  // -d parts are summed as d <= 0 and negated once at the end (exact: the same sums); the class
  // mask serves t, the log product and X (an ignored code matches no class).
  const auto ce_rows = [&](auto nv, const Tile<acc_t, kC>* xs, const Tile<acc_t, kC>* es, const Vec* rs,
                           const Vec* sm1s, const Vec* cs, auto q) DICE_LAMBDA {
    constexpr int kN = decltype(nv)::value;
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<acc_t, float>) {
      // AVX-512 float: the counted-pixel and class masks as k-masks, one compare each, and masked
      // adds (or fmadds), which leave the lanes outside their mask as they are where the generic
      // rows add 0 (or multiply by 0 and add 0): the same values, as every accumulator here is
      // finite or the lane's own NaN, and never -0.  With softmax_pixel's masked adds, the Dice +
      // CE forward at (2, 4, 96^3) went from 4.32 to 3.87-4.02 ms at 1 thread and from 2.15-2.21 to
      // 1.93-2.01 ms at 2 (warm caches); the masked adds for zero-masked moves and adds, 3-6 % more.
      __mmask16 counted[kN];
      for (int v = 0; v < kN; ++v) {
        counted[v] = _mm512_cmp_ps_mask(cs[v], Vec(acc_t(kIgnored)), _CMP_NEQ_UQ);
        lp.a_all = _mm512_mask_fmadd_ps(lp.a_all, counted[v], sm1s[v], lp.a_all + sm1s[v]);  // lp.mul
      }
      for_channels<kC>(C, [&](auto k) DICE_LAMBDA {
        Vec a_i = ai[k], a_p = ap[k], a_t = at[k], a_x = ax[k], a_l = al[k], a_s = lp.a[k];
        for (int v = 0; v < kN; ++v) {
          const __mmask16 is_k = _mm512_cmp_ps_mask(cs[v], Vec(acc_t(k)), _CMP_EQ_OQ);
          const Vec p = _mm512_maskz_mov_ps(counted[v], es[v][k] * rs[v]);
          const Vec t = _mm512_maskz_mov_ps(is_k, Vec(1.0f));
          a_i = a_i + p * t;  // (p * t: a NaN p spreads, as in I)
          a_p = a_p + pow_q(p, q);
          a_t = _mm512_mask_add_ps(a_t, is_k, a_t, Vec(1.0f));
          a_s = _mm512_mask_fmadd_ps(a_s, is_k, sm1s[v], a_s + sm1s[v]);  // lp.mul on the class's lanes
          a_x = _mm512_mask_add_ps(a_x, is_k, a_x, xs[v][k]);
          a_l = _mm512_mask_add_ps(a_l, counted[v], a_l, xs[v][k]);
        }
        ai[k] = a_i, ap[k] = a_p, at[k] = a_t, ax[k] = a_x, al[k] = a_l, lp.a[k] = a_s;
      });
    } else
#endif
    {
      const Vec one(acc_t(1));
      Vec valid[kN];
      for (int v = 0; v < kN; ++v) {
        valid[v] = cs[v] != Vec(acc_t(kIgnored));
        lp.mul(lp.a_all, sm1s[v] & valid[v]);
      }
      for_channels<kC>(C, [&](auto k) DICE_LAMBDA {
        Vec a_i = ai[k], a_p = ap[k], a_t = at[k], a_x = ax[k], a_l = al[k], a_s = lp.a[k];
        for (int v = 0; v < kN; ++v) {
          const Vec is_k = cs[v] == Vec(acc_t(k));
          const Vec p = Vec::blendv(zero, es[v][k] * rs[v], valid[v]), t = is_k & one;
          a_i = a_i + p * t;
          a_p = a_p + pow_q(p, q);
          a_t = a_t + t;  // t^q = t
          lp.mul(a_s, sm1s[v] & is_k);
          a_x = a_x + (xs[v][k] & is_k);  // d_k <= 0 (-inf for a -inf logit)
          a_l = a_l + (xs[v][k] & valid[v]);
        }
        ai[k] = a_i, ap[k] = a_p, at[k] = a_t, ax[k] = a_x, al[k] = a_l, lp.a[k] = a_s;
      });
    }
    // at most every vectors between two logs (nv <= 2)
    until_log -= kN;
    if (until_log <= 1) {
      lp.flush(C);
      until_log = every;
    }
  };
  // the rows of one vector of pixels: x holds d = z - max and e exp(d) (kCE), or p (x, Dice alone)
  // the Dice rows of nv vectors of pixels in pixel order, p_of(v, k) the probabilities: each
  // channel's three accumulators loaded once, updated vector by vector, stored once (as ce_rows)
  const auto dice_rows = [&](auto nv, const auto& p_of, const Vec* cs, auto q) DICE_LAMBDA {
    constexpr int kN = decltype(nv)::value;
    for_channels<kC>(C, [&](auto k) DICE_LAMBDA {
      Vec a_i = ai[k], a_p = ap[k], a_t = at[k];
      for (int v = 0; v < kN; ++v) {
        const Vec p = Vec::blendv(zero, p_of(v, k), cs[v] != Vec(acc_t(kIgnored)));
        const Vec t = cs[v].eq(Vec(acc_t(k)));  // 1.0 / 0.0
        a_i = a_i + p * t;
        a_p = a_p + pow_q(p, q);
        a_t = a_t + t;  // t^q = t
      }
      ai[k] = a_i, ap[k] = a_p, at[k] = a_t;
    });
  };
  // the rows of one vector of pixels: x holds d = z - max and e exp(d) (kCE), or p (x, Dice alone)
  // (k-masks in the Dice rows measured no faster: 2.50 ms at 1 thread either way)
  const auto rows = [&](const Tile<acc_t, kC>& x, const Tile<acc_t, kC>& e, const Vec& r, const Vec& sm1,
                        const Vec& code, auto q) DICE_LAMBDA {
    if constexpr (kCE) {
      ce_rows(std::integral_constant<int, 1>{}, &x, &e, &r, &sm1, &code, q);
    } else {
      dice_rows(std::integral_constant<int, 1>{}, [&](int, auto k) DICE_LAMBDA { return x[k]; }, &code, q);
    }
  };
  int64_t m0 = m_begin;
  if constexpr (kC > 0 && !kCE) {
    // full vectors of planar input, two per iteration (softmax_two), each accumulator updated in
    // pixel order, so the sums are the one-vector loop's.  (With the cross-entropy, two softmax_pixel
    // chains side by side measured -3 to +5 % at 4 classes: no clear gain for its build time.)
    const auto pair = [&](auto q) DICE_LAMBDA {
      Tile<acc_t, kC> y(C);
      for (; Lx.planar && m0 + 2 * V <= m_end; m0 += 2 * V) {
        const Vec c0 = Vec::loadu(codes + (m0 - m_begin)), c1 = Vec::loadu(codes + (m0 + V - m_begin));
        ahead(m0 - m_begin);
        ahead(m0 + V - m_begin);
        softmax_two<scalar_t, acc_t, kC>(xb, Lx, m0, x, y);
        rows(x, e, zero, zero, c0, q);
        rows(y, e, zero, zero, c1, q);
      }
    };
    with_power(power, pair);
  }
  if constexpr (kC == 0) {
    // the general copy, whose accumulators live in memory: two vectors of planar pixels per
    // iteration, for dice_rows / ce_rows to load and store each accumulator once per pair (the
    // one-vector loop's sums: the same updates in pixel order).  At (8, 21, 256^2) the Dice forward
    // kernel went from 4.63-4.74 to 4.35-4.40 ms at 1 thread (2.31-2.37 to 2.13-2.18 at 2), the
    // Dice + CE forward from 6.3-6.5 to 5.7 ms (3.2 to 2.9-3.0 at 2), warm caches.
    const auto pair = [&](auto q) DICE_LAMBDA {
      Tile<acc_t, kC> xy[2] = {Tile<acc_t, kC>(C), Tile<acc_t, kC>(C)};
      Tile<acc_t, kC> ef[2] = {Tile<acc_t, kC>(kCE ? C : 0), Tile<acc_t, kC>(kCE ? C : 0)};
      for (; Lx.planar && m0 + 2 * V <= m_end; m0 += 2 * V) {
        load_channels<scalar_t, acc_t, kC>(xb, Lx, C, m0, V, stage, xy[0]);
        load_channels<scalar_t, acc_t, kC>(xb, Lx, C, m0 + V, V, stage, xy[1]);
        const Vec cs[2] = {Vec::loadu(codes + (m0 - m_begin)), Vec::loadu(codes + (m0 + V - m_begin))};
        ahead(m0 - m_begin);
        ahead(m0 + V - m_begin);
        Vec rs[2], sm1s[2];
        if constexpr (kCE) {
          softmax_pixel(xy[0], ef[0], C, rs[0], sm1s[0]);
          softmax_pixel(xy[1], ef[1], C, rs[1], sm1s[1]);
          ce_rows(std::integral_constant<int, 2>{}, xy, ef, rs, sm1s, cs, q);
        } else {  // xy: e, p = e r taken as the rows need it
          rs[0] = softmax_exps(xy[0], C);
          rs[1] = softmax_exps(xy[1], C);
          dice_rows(std::integral_constant<int, 2>{}, [&](int v, auto k) DICE_LAMBDA { return xy[v][k] * rs[v]; },
                    cs, q);
        }
      }
    };
    with_power(power, pair);
  }
  for (; m0 < m_end; m0 += V) {
    const int cnt = static_cast<int>(std::min<int64_t>(V, m_end - m0));
    load_channels<scalar_t, acc_t, kC>(xb, Lx, C, m0, cnt, stage, x);
    const Vec code = Vec::loadu(codes + (m0 - m_begin));
    ahead(m0 - m_begin);
    if constexpr (kCE) {
      Vec r, sm1;
      softmax_pixel(x, e, C, r, sm1);
      rows(x, e, r, sm1, code, power);
    } else {
      activate(x, C, kSoftmax);
      rows(x, e, zero, zero, code, power);
    }
  }
  for_channels<kC>(C, [&](auto k) DICE_LAMBDA {
    dst[k] = lane_sum(ai[k]);
    dst[C + k] = lane_sum(ap[k]);
    dst[2 * C + k] = lane_sum(at[k]);
    if constexpr (kCE) {
      dst[3 * C + k] = -lane_sum(ax[k]);
      dst[4 * C + k] = -lane_sum(al[k]);
    }
  });
  if constexpr (kCE) lp.add_logs(C, dst);
}

/// One forward task: pixels [m_begin, m_end) of one image -> its (rows, C) partial sums in dst
/// (each the lane-order sum of its vector accumulator).
template <typename scalar_t, bool kLabels, int kC, typename acc_t = acc_type<scalar_t>>
void forward_chunk(const scalar_t* xb, const Layout& Lx, const scalar_t* tb, const Layout& Lt,
                                int64_t C_, int64_t m_begin, int64_t m_end, const acc_t* codes,
                                const LabelsAhead& ahead, acc_t* stage, const DiceOptions& o, const FocalGamma& fg,
                                acc_t* dst) {
  using Vec = Vectorized<acc_t>;
  constexpr int V = Vec::size();
  const int64_t C = kC > 0 ? kC : C_;
  if constexpr (kLabels) {
    // (the general copy's Dice alone, one vector at a time, measured ~5 % faster in the loop below:
    // it keeps that loop for input that is not planar, which it takes a vector at a time)
    if (o.activation == kSoftmax && o.pixel_loss == kPixelNone && (kC > 0 || Lx.planar)) {
      return forward_chunk_softmax<scalar_t, kC, false>(xb, Lx, C, m_begin, m_end, codes, ahead, stage, o.power,
                                                        dst);
    }
    if (o.activation == kSoftmax && o.pixel_loss == kPixelCE && C <= kMaxLogProductC) {
      return forward_chunk_softmax<scalar_t, kC, true>(xb, Lx, C, m_begin, m_end, codes, ahead, stage, o.power,
                                                       dst);
    }
  }
  const int rows = o.rows();
  Tile<acc_t, kC> x(C), e(C), t(kLabels ? 0 : C);
  Tile<acc_t, kC, 5> acc(C);
  for_channels<kC * 5>(rows * C, [&](auto j) DICE_LAMBDA { acc[j] = Vec(acc_t(0)); });
  for (int64_t m0 = m_begin; m0 < m_end; m0 += V) {
    const int cnt = static_cast<int>(std::min<int64_t>(V, m_end - m0));
    load_channels<scalar_t, acc_t, kC>(xb, Lx, C, m0, cnt, stage, x);
    if constexpr (!kLabels) load_channels<scalar_t, acc_t, kC>(tb, Lt, C, m0, cnt, stage, t);
    const Vec code = Vec::loadu(codes + (m0 - m_begin));
    ahead(m0 - m_begin);
    const Vec valid = code != Vec(acc_t(kIgnored));  // all-ones lanes for counted pixels
    forward_vector<acc_t, kLabels, kC>(x, e, t, acc, C, o, fg, code, valid);
  }
  for_channels<kC * 5>(rows * C, [&](auto j) DICE_LAMBDA {
    if (j >= rows * C) return;  // kC > 0: the rows a Dice-only loss does not have
    dst[j] = lane_sum(acc[j]);
  });
}

/// backward_chunk of the common training steps (softmax, label targets; Dice alone or, kCE, with
/// cross-entropy) in a loop of their own, for any C: only p, g and the gradient rows of this image
/// are live (the fixed-C copies keep them in registers, for the reason forward_chunk_softmax gives),
/// and the cross-entropy's h is recomputed from the rows instead of stored, with no s - 1 (only the
/// focal terms need it).  The same expressions as backward_vector (p from activate() is
/// softmax_pixel's e r bit for bit), so the same gradient.
template <typename scalar_t, int kC, bool kCE, typename acc_t = acc_type<scalar_t>>
void backward_chunk_softmax(const scalar_t* xb, const Layout& Lx, scalar_t* ob, const Layout& Lg, int64_t C_,
                            int64_t m_begin, int64_t m_end, const acc_t* codes, const LabelsAhead& ahead,
                            acc_t* stage, int power, const acc_t* grad, bool stream) {
  using Vec = Vectorized<acc_t>;
  constexpr int V = Vec::size();
  const int64_t C = kC > 0 ? kC : C_;  // a constant in the fixed-C copies
  const Vec zero(acc_t(0));
  const acc_t *g_i = grad, *g_p = grad + C, *g_x = grad + 3 * C, *g_l = grad + 4 * C;
  Tile<acc_t, kC> x(C), g(C);
  for (int64_t m0 = m_begin; m0 < m_end; m0 += V) {
    const int cnt = static_cast<int>(std::min<int64_t>(V, m_end - m0));
    load_channels<scalar_t, acc_t, kC>(xb, Lx, C, m0, cnt, stage, x);
    const Vec code = Vec::loadu(codes + (m0 - m_begin));
    ahead(m0 - m_begin);
    const Vec valid = code != Vec(acc_t(kIgnored));
    const Vec r = softmax_exps(x, C);  // x: e, p = e r (activate()'s p)
    // cross-entropy: h = -w with w = gX t + gL, recomputed below rather than kept in registers
    const auto h = [&](auto k) DICE_LAMBDA { return pixel_weight(Vec(g_x[k]), Vec(g_l[k]), code.eq(Vec(acc_t(k)))).neg(); };
    Vec dot(acc_t(0)), hsum(acc_t(0));
    for_channels<kC>(C, [&](auto k) DICE_LAMBDA {
      const Vec p = x[k] * r;
      g[k] = grad_p(Vec(g_i[k]), Vec(g_p[k]), code.eq(Vec(acc_t(k))), p, power);
      dot = dot + p * g[k];
      if constexpr (kCE) hsum = hsum + h(k);
    });
    const Vec total = kCE ? dot + hsum : dot;
    // dz computed as it is stored (in the general-C copy no pass through the tile in between)
    store_channels_of<scalar_t, acc_t, kC>(ob, Lg, C, m0, cnt, stage, [&](auto k) DICE_LAMBDA {
      Vec dz = softmax_dz(x[k] * r, g[k], total);
      if constexpr (kCE) dz = dz + h(k);
      return Vec::blendv(zero, dz, valid);  // exactly 0 when ignored
    }, stream);
  }
  if (stream) stream_fence();
}

/// One backward task: the gradient of pixels [m_begin, m_end) of one image into ob.
template <typename scalar_t, bool kLabels, int kC, typename acc_t = acc_type<scalar_t>>
void backward_chunk(const scalar_t* xb, const Layout& Lx, const scalar_t* tb, const Layout& Lt,
                                 scalar_t* ob, const Layout& Lg, int64_t C_, int64_t m_begin, int64_t m_end,
                                 const acc_t* codes, const LabelsAhead& ahead, acc_t* stage, const DiceOptions& o,
                                 const FocalGamma& fg, const acc_t* grad, bool stream) {
  using Vec = Vectorized<acc_t>;
  constexpr int V = Vec::size();
  const int64_t C = kC > 0 ? kC : C_;
  if constexpr (kLabels) {
    if (o.activation == kSoftmax && o.pixel_loss == kPixelNone) {
      return backward_chunk_softmax<scalar_t, kC, false>(xb, Lx, ob, Lg, C, m_begin, m_end, codes, ahead, stage,
                                                         o.power, grad, stream);
    }
    if (o.activation == kSoftmax && o.pixel_loss == kPixelCE) {
      return backward_chunk_softmax<scalar_t, kC, true>(xb, Lx, ob, Lg, C, m_begin, m_end, codes, ahead, stage,
                                                        o.power, grad, stream);
    }
  }
  const bool pixel = o.pixel_loss != kPixelNone;
  Tile<acc_t, kC> x(C), e(pixel ? C : 0), t(kLabels ? 0 : C), g(C), h(pixel ? C : 0);
  for (int64_t m0 = m_begin; m0 < m_end; m0 += V) {
    const int cnt = static_cast<int>(std::min<int64_t>(V, m_end - m0));
    load_channels<scalar_t, acc_t, kC>(xb, Lx, C, m0, cnt, stage, x);
    if constexpr (!kLabels) load_channels<scalar_t, acc_t, kC>(tb, Lt, C, m0, cnt, stage, t);
    const Vec code = Vec::loadu(codes + (m0 - m_begin));
    ahead(m0 - m_begin);
    const Vec valid = code != Vec(acc_t(kIgnored));
    backward_vector<acc_t, kLabels, kC>(x, e, t, g, h, C, o, fg, grad, code, valid);
    store_channels<scalar_t, acc_t, kC>(ob, Lg, C, m0, cnt, stage, g, stream);
  }
  if (stream) stream_fence();
}

/// LabelsAhead of the task that ends at pixel m_end of image n (none for float targets).
static LabelsAhead labels_ahead(const at::Tensor& t, int64_t n, int64_t m_end) {
  if (t.is_floating_point() || t.stride(1) != 1 || t.stride(0) != t.size(1)) return {};
  return {static_cast<const char*>(t.const_data_ptr()) + (n * t.size(1) + m_end) * t.element_size(), t.element_size()};
}

template <typename scalar_t, bool kLabels, int kC>
void forward_impl(const at::Tensor& x, const at::Tensor& t, const DiceOptions& o, CodesFn<acc_type<scalar_t>> codes_fn,
                  at::Tensor& partial, uint8_t* save) {
  using acc_t = acc_type<scalar_t>;
  constexpr int V = Vectorized<acc_t>::size();
  const int64_t N = x.size(0), C = x.size(1), M = x.size(2);
  const int64_t nchunks = partial.size(1), rows = o.rows();
  const Layout Lx = layout_of(x);
  const Layout Lt = kLabels ? Layout{} : layout_of(t);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* tp = kLabels ? nullptr : t.const_data_ptr<scalar_t>();
  acc_t* out = partial.mutable_data_ptr<acc_t>();
  const FocalGamma fg = focal_gamma(o.gamma);

  at::parallel_for(0, N * nchunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> codes(kCpuChunk + V), stage(C * V);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / nchunks, chunk = task % nchunks;
      const int64_t m_begin = chunk * kCpuChunk, m_end = std::min(M, m_begin + kCpuChunk);
      codes_fn(t, n, m_begin, m_end, C, o, codes.data(), save == nullptr ? nullptr : save + n * M + m_begin);
      forward_chunk<scalar_t, kLabels, kC>(xp + n * Lx.sN, Lx, kLabels ? nullptr : tp + n * Lt.sN, Lt, C, m_begin,
                                           m_end, codes.data(), labels_ahead(t, n, m_end), stage.data(), o, fg,
                                           out + task * rows * C);
    }
  });
}

template <typename scalar_t, bool kLabels, int kC>
void backward_impl(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& t, const DiceOptions& o,
                   CodesFn<acc_type<scalar_t>> codes_fn, at::Tensor& gx) {
  using acc_t = acc_type<scalar_t>;
  constexpr int V = Vectorized<acc_t>::size();
  const int64_t N = x.size(0), C = x.size(1), M = x.size(2);
  const int64_t nchunks = (M + kCpuChunk - 1) / kCpuChunk, rows = o.rows();
  const Layout Lx = layout_of(x), Lg = layout_of(gx);
  const Layout Lt = kLabels ? Layout{} : layout_of(t);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* tp = kLabels ? nullptr : t.const_data_ptr<scalar_t>();
  const acc_t* gp = grad.const_data_ptr<acc_t>();  // (N, rows, C) contiguous
  scalar_t* op = gx.mutable_data_ptr<scalar_t>();
  const FocalGamma fg = focal_gamma(o.gamma);
  const bool stream = kStreamStores && std::is_same_v<scalar_t, float> && gx.nbytes() >= kStreamMinBytes;

  at::parallel_for(0, N * nchunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> codes(kCpuChunk + V), stage(C * V);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / nchunks, chunk = task % nchunks;
      const int64_t m_begin = chunk * kCpuChunk, m_end = std::min(M, m_begin + kCpuChunk);
      codes_fn(t, n, m_begin, m_end, C, o, codes.data(), nullptr);
      backward_chunk<scalar_t, kLabels, kC>(xp + n * Lx.sN, Lx, kLabels ? nullptr : tp + n * Lt.sN, Lt,
                                            op + n * Lg.sN, Lg, C, m_begin, m_end, codes.data(),
                                            labels_ahead(t, n, m_end), stage.data(), o, fg,
                                            gp + n * rows * C, stream);
    }
  });
}

/// IMPL<scalar_t, kLabels, kC>(codes_fn) for the target's kind: float targets and C > kMaxFixedC
/// (or double) take kC = 0; label targets are read only by their codes function.
template <typename scalar_t, typename F>
void dispatch_target(const at::Tensor& t, int64_t C, F&& impl) {
  using acc_t = acc_type<scalar_t>;
  if (t.is_floating_point()) {
    impl(std::false_type{}, std::integral_constant<int, 0>{}, &float_target_codes<acc_t>);
    return;
  }
  const CodesFn<acc_t> fn = t.scalar_type() == at::kLong  ? &label_codes<int64_t, acc_t>
                            : t.scalar_type() == at::kInt ? &label_codes<int32_t, acc_t>
                                                          : &label_codes<uint8_t, acc_t>;
  if constexpr (std::is_same_v<scalar_t, float>) {
    bool done = false;
    [&]<int... c>(std::integer_sequence<int, c...>) {
      ((C == c + 1 ? (impl(std::true_type{}, std::integral_constant<int, c + 1>{}, fn), done = true) : false), ...);
    }(std::make_integer_sequence<int, kMaxFixedC>{});
    if (done) return;
  }
  impl(std::true_type{}, std::integral_constant<int, 0>{}, fn);
}

at::Tensor forward(const at::Tensor& x_in, const at::Tensor& t_in, const DiceOptions& o, uint8_t* save) {
  const at::Tensor x = fast_layout(x_in);
  const at::Tensor t = t_in.is_floating_point() ? fast_layout(t_in) : t_in;
  const int64_t N = x.size(0), C = x.size(1), M = x.size(2);
  const int64_t nchunks = (M + kCpuChunk - 1) / kCpuChunk;
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t rows = o.rows();
  at::Tensor partial = at::empty({N, nchunks, rows, C}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dicetorch_fused_forward_cpu", [&] {
    dispatch_target<scalar_t>(t, C, [&](auto labels, auto kc, auto codes_fn) {
      forward_impl<scalar_t, decltype(labels)::value, decltype(kc)::value>(x, t, o, codes_fn, partial, save);
    });
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

void backward(const at::Tensor& grad, const at::Tensor& x_in, const at::Tensor& t_in, at::Tensor& gx,
              const DiceOptions& o) {
  const at::Tensor x = fast_layout(x_in);
  const at::Tensor t = t_in.is_floating_point() ? fast_layout(t_in) : t_in;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dicetorch_fused_backward_cpu", [&] {
    dispatch_target<scalar_t>(t, x.size(1), [&](auto labels, auto kc, auto codes_fn) {
      backward_impl<scalar_t, decltype(labels)::value, decltype(kc)::value>(grad, x, t, o, codes_fn, gx);
    });
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace dicetorch
