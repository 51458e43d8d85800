// Device code of the fused CUDA kernels (see dice_cuda.cu for the algorithm) and the host-side
// launch planning shared by dice_cuda.cu and the CPU emulation test (tests/cuda_emu).
//
// This header is compiled by nvcc (dice_cuda.cu) and, for the emulation test, by a host C++
// compiler with tests/cuda_emu/emu_cuda.h providing threadIdx, __syncthreads, __shfl_xor_sync, ...
// It therefore uses only those CUDA builtins, plus dice_math.h.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "../dice.h"
#include "../dice_math.h"

namespace dicetorch {
namespace cuda {
namespace {

// ------------------------------------------------------------------------------------------------
// Geometry
// ------------------------------------------------------------------------------------------------
constexpr int kThreads = 256;  // threads per block (every kernel)
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxLanes = 32;         // lanes per pixel group without shared memory
constexpr int kMaxGroupLanes = 256;   // lanes per pixel group at most (the whole block)
#ifndef DICETORCH_MAX_GRID_Y
#define DICETORCH_MAX_GRID_Y 65535      // images on grid.y; kernels loop over more
#endif
constexpr int64_t kMaxGridY = DICETORCH_MAX_GRID_Y;

// Kernel template parameters besides the dtypes (names used by benchmarks/kernel_report.py):
//   NCH    channel slots per thread (a thread handles channels of its pixel group in NCH registers
//          per pixel);  C <= G * NCH, G = lanes per pixel group (run-time, a power of two)
//   kCL    channel-contiguous mapping (channels-last input); else pixel-contiguous (NCHW) mapping
//   kWide  G > 32: a pixel group spans several warps (C > 32 * max_slots, 64 to 256 channels):
//          group reductions go through shared memory, with barriers
// Pixels per group: NCHW: one 128-bit vector of consecutive pixels per channel slot; channels-last:
// 16 values per thread (NCH channels x NP pixels; 8 for fp64, which takes two registers a value),
// NP a multiple of the pixels per 128-bit vector (pack_pixels).
constexpr int group_pixels(int elem_bytes, bool cl, int nch) {
  return cl ? ((elem_bytes == 8 ? 8 : 16) / nch > 1 ? (elem_bytes == 8 ? 8 : 16) / nch : 1) : 16 / elem_bytes;
}
// Channels-last with pixels narrower than 16 bytes (NCH * element size < 16: fp32 C = 2, fp16/bf16
// C = 2 and 4): one 128-bit vector holds PK = 16 / (NCH * element size) consecutive pixels of NCH
// channels ("packed" pixels; used when C == NCH and the pixels are dense, else scalar accesses).
constexpr int pack_pixels(int elem_bytes, bool cl, int nch) {
  return cl && nch * elem_bytes < 16 ? 16 / (nch * elem_bytes) : 1;
}

template <typename scalar_t, bool kCL, int NCH>
struct Geometry {
  // elements of one 128-bit access
  static constexpr int kVec = 16 / int(sizeof(scalar_t));
  // channels-last: channels per vector access (NCH may be smaller than a 128-bit vector)
  static constexpr int kCV = kCL ? (NCH < kVec ? NCH : kVec) : 1;
  // channels-last: pixels per vector access (kCV * kPK elements: 128 bits)
  static constexpr int kPK = pack_pixels(int(sizeof(scalar_t)), kCL, NCH);
  static constexpr int kNP = group_pixels(int(sizeof(scalar_t)), kCL, NCH);
  static_assert(!kCL || NCH % kCV == 0, "channels-last slots come in whole vectors");
  static_assert(!kCL || kCV * kPK == kVec, "channels-last vectors are 128 bits");
  static_assert(kNP % kPK == 0, "a thread's pixels come in whole vectors");
};

// Largest NCH of each mapping.  Register budget: about 32 values per thread (x, or x and a float
// target) plus 3 * NCH accumulators.
// fp64 (two registers a value) has one slot count per mapping: it is there to be exact, not fast.
template <typename scalar_t, bool kLabels>
constexpr int max_slots(bool cl) {
  return sizeof(scalar_t) == 8 ? 4 : cl ? 8 : (sizeof(scalar_t) == 2 ? (kLabels ? 4 : 2) : (kLabels ? 8 : 4));
}
// Wide kernels (a pixel group over several warps): at most 4 slots with the NCHW mapping (8 spill
// under the two-blocks-per-SM register budget).
template <typename scalar_t, bool kLabels>
constexpr int wide_slots(bool cl) {
  return cl || max_slots<scalar_t, kLabels>(cl) < 4 ? max_slots<scalar_t, kLabels>(cl) : 4;
}
// Kernel kinds (template parameter kKind of the main kernels):
//   kKindDice   the Dice rows I, P, T of activation softmax / sigmoid / none (run-time);
//   kKindPixel  + the pixel-loss rows X, L of pixel_loss ce / focal (softmax / sigmoid, run-time):
//               two more accumulators a slot (forward), two more gradient rows and the activation's
//               exps kept next to the logits (softmax: d = z - max and e = exp(d)), and the element
//               math of both losses: so that nothing spills under the same register budget, the
//               tiles hold at most 16 values (NCHW: 2 slots; channels-last: 4 slots, 4 pixels;
//               fp64: 4 slots of 2 pixels, one block per SM as for its Dice kernels);
//   kKindHard   the hard activations argmax / threshold (forward only).
// The Dice kinds' code is not touched by the others: every kind is its own instantiation.
constexpr int kKindDice = 0, kKindPixel = 1, kKindHard = 2;
constexpr int kind_slots(int kind, int slots, bool cl, int elem_bytes) {
  return kind != kKindPixel || elem_bytes == 8 ? slots : cl ? 4 : 2;
}
/// Fewest slots of a kind: channels-last pixel-loss tiles keep 4 (2 slots would mean 8 pixels a
/// lane, and 8 sets of per-pixel normaliser values next to the tile).
constexpr int kind_min_slots(int kind, bool cl) { return kind == kKindPixel && cl ? 4 : 2; }
constexpr int kind_rows(int kind) { return kind == kKindPixel ? 5 : 3; }
inline int kind_of(const DiceOptions& o) {
  return o.pixel_loss != kPixelNone ? kKindPixel : is_hard_activation(o.activation) ? kKindHard : kKindDice;
}
template <typename scalar_t>
constexpr bool one_slot_count() {
  return sizeof(scalar_t) == 8;
}

// Strides (elements) of an (N, C, M) operand; labels: (N, M) with c = 0.
struct Strides3 {
  int64_t n, c, m;
};

// Run-time arguments of every main kernel (one struct: the pointers stay separate, leading
// parameters).
struct Args {
  int64_t N, C, M;   // C: channels of this launch (a chunk of Ct when C is huge)
  int64_t Ct, c0;    // all channels; first channel of this launch (pointers already offset)
  int64_t steps;     // block steps per image: ceil(M / pixels per block step)
  Strides3 xs, ts, gs;
  int64_t ignore_index;
  int G, log2G;      // lanes per pixel group
  int label_bytes;   // integer labels: 1 (uint8), 4 (int32) or 8 (int64), read as such
  int activation, power;
  bool has_ignore;
  bool x_vec, t_vec, g_vec;  // aligned vector access allowed (checked on the host)
  bool ext_norm;     // softmax normaliser per pixel from norm[] (huge C, chunked launches)
  bool ext_dot;      // backward: sum_j p_j g_j per pixel from dot[] (huge C, write pass)
  bool dot_pass;     // backward: add this chunk's sum_j p_j g_j into dot[], write nothing
  int rows;          // rows of stats / grad: 3, or 5 with a pixel loss (kKindPixel)
  int pixel_loss;    // kKindPixel: kPixelCE or kPixelFocal
  FocalGamma fg;     // kKindPixel, focal: the exponent gamma and how to raise to it
};

// ------------------------------------------------------------------------------------------------
// Scalar helpers
// ------------------------------------------------------------------------------------------------
__device__ __forceinline__ float dexp(float v) { return __expf(v); }
__device__ __forceinline__ double dexp(double v) { return exp(v); }
// max that ignores NaN (PTX max): a NaN logit still makes the pixel NaN through exp(NaN - m)
__device__ __forceinline__ float dmax(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double dmax(double a, double b) { return fmax(a, b); }

template <int kBytes>
struct Chunk;
template <>
struct Chunk<16> {
  using type = uint4;
};
template <>
struct Chunk<8> {
  using type = uint2;
};
template <>
struct Chunk<4> {
  using type = unsigned int;
};
template <>
struct Chunk<2> {
  using type = unsigned short;
};
template <>
struct Chunk<1> {
  using type = unsigned char;
};

/// One element through the read-only path (any 1/2/4/8-byte type, c10::Half included).
template <typename T>
__device__ __forceinline__ T ldg1(const T* p) {
  using C = typename Chunk<int(sizeof(T))>::type;
  static_assert(sizeof(C) == sizeof(T), "element size");
  const C bits = __ldg(reinterpret_cast<const C*>(p));
  T v;
  memcpy(&v, &bits, sizeof(T));
  return v;
}

/// Global store of one value (the emulation test checks its bounds and alignment).
template <typename T>
__device__ __forceinline__ void stg(T* p, T v) {
#ifdef DICETORCH_CUDA_EMULATION
  emu_check_store(p, sizeof(T));
#endif
  *p = v;
}
// Vector stores in one instruction: a plain store of a uint4 built from scalars may be split into
// four 32-bit stores (nvcc does so for the NCHW gradient).
#ifndef DICETORCH_CUDA_EMULATION
__device__ __forceinline__ void stg(uint4* p, uint4 v) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w));
}
__device__ __forceinline__ void stg(uint2* p, uint2 v) {
  asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(p), "r"(v.x), "r"(v.y));
}
#endif

/// Plain (coherent) global load: for data this kernel also writes (the dot buffer).
template <typename T>
__device__ __forceinline__ T ldp(const T* p) {
#ifdef DICETORCH_CUDA_EMULATION
  emu_check_load(p, sizeof(T));
#endif
  return *p;
}

/// N consecutive elements from p to out[0..N), p aligned to min(16, N*sizeof(T)) bytes (the
/// caller guarantees it): 128-bit loads (narrower when the whole run is narrower).
template <typename T, int N>
__device__ __forceinline__ void load_aligned(const T* p, T* out) {
  constexpr int kBytes = N * int(sizeof(T));
  constexpr int kChunk = kBytes < 16 ? kBytes : 16;
  using C = typename Chunk<kChunk>::type;
#pragma unroll
  for (int i = 0; i < kBytes / kChunk; ++i) {
    const C v = __ldg(reinterpret_cast<const C*>(p) + i);
    memcpy(reinterpret_cast<char*>(out) + i * kChunk, &v, kChunk);
  }
}

/// in[0..N) to N consecutive elements at p (aligned as for load_aligned).
template <typename T, int N>
__device__ __forceinline__ void store_aligned(T* p, const T* in) {
  constexpr int kBytes = N * int(sizeof(T));
  constexpr int kChunk = kBytes < 16 ? kBytes : 16;
  using C = typename Chunk<kChunk>::type;
#pragma unroll
  for (int i = 0; i < kBytes / kChunk; ++i) {
    C v;
    memcpy(&v, reinterpret_cast<const char*>(in) + i * kChunk, kChunk);
    stg(reinterpret_cast<C*>(p) + i, v);
  }
}

// ------------------------------------------------------------------------------------------------
// Per-thread tile of one block step
// ------------------------------------------------------------------------------------------------
// A block step covers PB = (256 / G) * NP pixels of one image: pixel group pv = tid / G (G lanes,
// g = tid % G, consecutive lanes) owns NP pixels; lane g holds NCH channel slots of each of them.
//   NCHW mapping:          pixel j = step*PB + pv*NP + j     (NP = one 128-bit vector of pixels)
//                          channel of slot c = g + G*c        (a 128-bit load per slot)
//   channels-last mapping: pixel j = step*PB + (j/PK)*(256/G)*PK + pv*PK + j%PK (consecutive lanes:
//                          consecutive pixels, or consecutive channel vectors of one pixel; PK > 1:
//                          consecutive runs of PK pixels)
//                          channel of slot c = (g + G*(c/CV))*CV + c%CV  (a 128-bit load per c/CV
//                          and run of PK pixels: CV channels x PK pixels)
// Every lane of a warp runs every step (pixels past M are masked, not skipped), so the group
// reductions' shuffles always see the full warp.
template <typename scalar_t, bool kCL_, int NCH>
struct Tile {
  using Geo = Geometry<scalar_t, kCL_, NCH>;
  static constexpr int NP = Geo::kNP, CV = Geo::kCV, PK = Geo::kPK;
  static constexpr bool kCL = kCL_;
  // labels: runs of consecutive pixels (a vector load each when t_vec)
  static constexpr int kRun = kCL_ ? PK : NP;

  int g, pv, pvb;  // lane in group, group in block, groups per block
  int G;
  int64_t pb;      // pixels per block step

  __device__ __forceinline__ Tile(int tid, int G_, int log2G) : g(tid & (G_ - 1)), pv(tid >> log2G),
                                                                pvb(kThreads >> log2G), G(G_),
                                                                pb(int64_t(kThreads >> log2G) * NP) {}

  /// Pixel of slot j in block step `step`.
  __device__ __forceinline__ int64_t pixel(int64_t step, int j) const {
    return kCL_ ? step * pb + int64_t(j / PK) * pvb * PK + pv * PK + j % PK : step * pb + int64_t(pv) * NP + j;
  }
  /// Channel (relative to the launch's first channel) of slot c.
  __device__ __forceinline__ int channel(int c) const {
    return kCL_ ? (g + G * (c / CV)) * CV + c % CV : g + G * c;
  }
};

/// Labels of the tile's pixels as int64 (type L): runs of kRun consecutive pixels, one aligned
/// vector each when t_vec (and the run lies before M).
template <typename L, typename TileT>
__device__ __forceinline__ void load_labels(const TileT& tl, const void* __restrict__ t, int64_t n, int64_t step,
                                            const Args& a, int64_t (&lab)[TileT::NP]) {
  constexpr int NP = TileT::NP, R = TileT::kRun;
  const L* tn = static_cast<const L*>(t) + n * a.ts.n;
  L raw[NP];
#pragma unroll
  for (int r = 0; r < NP / R; ++r) {
    const int64_t m0 = tl.pixel(step, r * R);
    if (R > 1 && a.t_vec && m0 + R <= a.M) {
      load_aligned<L, R>(tn + m0, raw + r * R);
    } else {
#pragma unroll
      for (int i = 0; i < R; ++i) raw[r * R + i] = m0 + i < a.M ? ldg1(tn + (m0 + i) * a.ts.m) : L(0);
    }
  }
#pragma unroll
  for (int j = 0; j < NP; ++j) lab[j] = static_cast<int64_t>(raw[j]);
}

/// Class codes of the tile's pixels: label_code() of the labels (read with their width), 0 for
/// float targets; kIgnored past M.  Labels are only ever compared with channel indices.
template <bool kLabels, typename TileT>
__device__ __forceinline__ void load_codes(const TileT& tl, const void* __restrict__ t, int64_t n, int64_t step,
                                           const Args& a, int (&code)[TileT::NP]) {
  constexpr int NP = TileT::NP;
  if constexpr (kLabels) {
    int64_t lab[NP];
    if (a.label_bytes == 8) {
      load_labels<int64_t>(tl, t, n, step, a, lab);
    } else if (a.label_bytes == 4) {
      load_labels<int32_t>(tl, t, n, step, a, lab);
    } else {
      load_labels<uint8_t>(tl, t, n, step, a, lab);
    }
#pragma unroll
    for (int j = 0; j < NP; ++j) {
      code[j] = tl.pixel(step, j) < a.M ? label_code(lab[j], a.Ct, a.has_ignore, a.ignore_index) : kIgnored;
    }
  } else {
#pragma unroll
    for (int j = 0; j < NP; ++j) code[j] = tl.pixel(step, j) < a.M ? 0 : kIgnored;
  }
}

/// Values v[c][j] (acc_t) of an (N, C, M) operand at the tile's (channel slot, pixel) positions;
/// 0 where the channel is >= C or the pixel >= M.  vec: aligned vector access allowed (host-checked:
/// channels-last, C % CV == 0, and with PK > 1 dense pixels of exactly NCH == C channels).
template <typename scalar_t, typename acc_t, bool kCL, int NCH>
__device__ __forceinline__ void load_tile(const Tile<scalar_t, kCL, NCH>& tl, const scalar_t* __restrict__ base,
                                          const Strides3& s, int64_t step, int64_t C, int64_t M, bool vec,
                                          acc_t (&v)[NCH][Tile<scalar_t, kCL, NCH>::NP]) {
  using TileT = Tile<scalar_t, kCL, NCH>;
  constexpr int NP = TileT::NP, CV = TileT::CV, PK = TileT::PK;
  if constexpr (!kCL) {
    const int64_t m0 = tl.pixel(step, 0);
    const bool full = vec && m0 + NP <= M;
#pragma unroll
    for (int c = 0; c < NCH; ++c) {
      const int k = tl.channel(c);
      scalar_t raw[NP];
      if (k < C) {
        const scalar_t* row = base + k * s.c;
        if (full) {
          load_aligned<scalar_t, NP>(row + m0, raw);
        } else {
#pragma unroll
          for (int j = 0; j < NP; ++j) raw[j] = m0 + j < M ? ldg1(row + (m0 + j) * s.m) : scalar_t(0);
        }
      } else {
#pragma unroll
        for (int j = 0; j < NP; ++j) raw[j] = scalar_t(0);
      }
#pragma unroll
      for (int j = 0; j < NP; ++j) v[c][j] = static_cast<acc_t>(raw[j]);
    }
  } else {
#pragma unroll
    for (int jv = 0; jv < NP / PK; ++jv) {
      const int64_t m0 = tl.pixel(step, jv * PK);  // a run of PK consecutive pixels
      const scalar_t* px = base + m0 * s.m;
#pragma unroll
      for (int b = 0; b < NCH / CV; ++b) {
        const int kb = (tl.g + tl.G * b) * CV;
        scalar_t raw[PK * CV];  // pixel-major, as in memory
        if (vec && (PK == 1 || m0 + PK <= M)) {
          // C % CV == 0: a vector is all in or all out
          if (m0 < M && kb < C) {
            load_aligned<scalar_t, PK * CV>(px + kb, raw);
          } else {
#pragma unroll
            for (int i = 0; i < PK * CV; ++i) raw[i] = scalar_t(0);
          }
        } else {
#pragma unroll
          for (int p = 0; p < PK; ++p) {
#pragma unroll
            for (int i = 0; i < CV; ++i) {
              raw[p * CV + i] = (m0 + p < M && kb + i < C) ? ldg1(px + p * s.m + (kb + i) * s.c) : scalar_t(0);
            }
          }
        }
#pragma unroll
        for (int p = 0; p < PK; ++p) {
#pragma unroll
          for (int i = 0; i < CV; ++i) v[b * CV + i][jv * PK + p] = static_cast<acc_t>(raw[p * CV + i]);
        }
      }
    }
  }
}

/// Stores d[c][j] (converted to scalar_t) at the tile's positions that exist (channel < C, pixel < M).
template <typename scalar_t, typename acc_t, bool kCL, int NCH>
__device__ __forceinline__ void store_tile(const Tile<scalar_t, kCL, NCH>& tl, scalar_t* __restrict__ base,
                                           const Strides3& s, int64_t step, int64_t C, int64_t M, bool vec,
                                           const acc_t (&d)[NCH][Tile<scalar_t, kCL, NCH>::NP]) {
  using TileT = Tile<scalar_t, kCL, NCH>;
  constexpr int NP = TileT::NP, CV = TileT::CV, PK = TileT::PK;
  if constexpr (!kCL) {
    const int64_t m0 = tl.pixel(step, 0);
    const bool full = vec && m0 + NP <= M;
#pragma unroll
    for (int c = 0; c < NCH; ++c) {
      const int k = tl.channel(c);
      if (k < C) {
        scalar_t raw[NP];
#pragma unroll
        for (int j = 0; j < NP; ++j) raw[j] = static_cast<scalar_t>(d[c][j]);
        scalar_t* row = base + k * s.c;
        if (full) {
          store_aligned<scalar_t, NP>(row + m0, raw);
        } else {
#pragma unroll
          for (int j = 0; j < NP; ++j) {
            if (m0 + j < M) stg(row + (m0 + j) * s.m, raw[j]);
          }
        }
      }
    }
  } else {
#pragma unroll
    for (int jv = 0; jv < NP / PK; ++jv) {
      const int64_t m0 = tl.pixel(step, jv * PK);
      if (m0 < M) {
        scalar_t* px = base + m0 * s.m;
#pragma unroll
        for (int b = 0; b < NCH / CV; ++b) {
          const int kb = (tl.g + tl.G * b) * CV;
          scalar_t raw[PK * CV];
#pragma unroll
          for (int p = 0; p < PK; ++p) {
#pragma unroll
            for (int i = 0; i < CV; ++i) raw[p * CV + i] = static_cast<scalar_t>(d[b * CV + i][jv * PK + p]);
          }
          if (vec && (PK == 1 || m0 + PK <= M)) {
            if (kb < C) store_aligned<scalar_t, PK * CV>(px + kb, raw);
          } else {
#pragma unroll
            for (int p = 0; p < PK; ++p) {
#pragma unroll
              for (int i = 0; i < CV; ++i) {
                if (m0 + p < M && kb + i < C) stg(px + p * s.m + (kb + i) * s.c, raw[p * CV + i]);
              }
            }
          }
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Reductions over the G lanes of a pixel group (fixed order: every lane gets the same value)
// ------------------------------------------------------------------------------------------------
struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return dmax(a, b); }
};
struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

/// v[j] <- op over the pixel group's lanes of v[j].  Narrow groups (G <= 32): xor shuffles within
/// the group.  Wide groups (G = 64..256 lanes, kWide): the whole warp, then the group's warps in
/// order through red (one row per warp), ending with a barrier so that red can be written again at
/// once.
template <bool kWide, int NP, typename T, typename Op>
__device__ __forceinline__ void group_reduce(T (&v)[NP], int G, T (*red)[NP], Op op) {
  if constexpr (!kWide) {
    for (int off = 1; off < G; off <<= 1) {
#pragma unroll
      for (int j = 0; j < NP; ++j) v[j] = op(v[j], __shfl_xor_sync(kFullMask, v[j], off));
    }
  } else {
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
#pragma unroll
      for (int j = 0; j < NP; ++j) v[j] = op(v[j], __shfl_xor_sync(kFullMask, v[j], off));
    }
    const int warp = threadIdx.x >> 5;
    if ((threadIdx.x & 31) == 0) {
#pragma unroll
      for (int j = 0; j < NP; ++j) red[warp][j] = v[j];
    }
    __syncthreads();
    const int nw = G >> 5, w0 = (warp / nw) * nw;  // the group's warps: w0 .. w0 + nw - 1
#pragma unroll
    for (int j = 0; j < NP; ++j) {
      T r = red[w0][j];
      for (int w = 1; w < nw; ++w) r = op(r, red[w0 + w][j]);
      v[j] = r;
    }
    // every warp has read red before any warp writes it again: the next call on the same buffer
    // (the backward's per-step dot with an external normaliser has no other barrier in between)
    __syncthreads();
  }
}

/// The softmax maximum of each pixel of the tile, over the group's lanes; with a.ext_norm (chunked
/// launches) max and 1/sum come from norm[n*M + m] = (max, 1/sum) instead (computed by
/// pixel_norm_kernel over all channels).  Returns whether they did.
template <bool kWide, typename acc_t, typename TileT, int NCH, int NP>
__device__ __forceinline__ bool pixel_max(const TileT& tl, const acc_t (&v)[NCH][NP], int64_t step, int64_t n,
                                          const Args& a, const acc_t* __restrict__ norm, acc_t (*red)[NP],
                                          acc_t (&mx)[NP], acc_t (&inv)[NP]) {
  bool ext = false;
  if constexpr (kWide) ext = a.ext_norm;
  if (ext) {
#pragma unroll
    for (int j = 0; j < NP; ++j) {
      const int64_t m = tl.pixel(step, j);
      mx[j] = m < a.M ? ldg1(norm + (n * a.M + m) * 2) : acc_t(0);
      inv[j] = m < a.M ? ldg1(norm + (n * a.M + m) * 2 + 1) : acc_t(0);
    }
  } else {
#pragma unroll
    for (int j = 0; j < NP; ++j) mx[j] = -static_cast<acc_t>(INFINITY);
#pragma unroll
    for (int c = 0; c < NCH; ++c) {
      if (tl.channel(c) < a.C) {
#pragma unroll
        for (int j = 0; j < NP; ++j) mx[j] = dmax(mx[j], v[c][j]);
      }
    }
    group_reduce<kWide>(mx, tl.G, red, MaxOp());
  }
  return ext;
}

/// In place: x -> p = activation(x) for the tile.  Softmax: the normaliser (max, 1/sum) once per
/// pixel over the group's lanes, one exp per element (or, with a.ext_norm, the normaliser of each
/// pixel from norm[n*M + m] = (max, 1/sum), computed by pixel_norm_kernel over all channels).
template <bool kWide, typename acc_t, typename TileT, int NCH, int NP>
__device__ __forceinline__ void activate(const TileT& tl, acc_t (&v)[NCH][NP], int64_t step, int64_t n, const Args& a,
                                         const acc_t* __restrict__ norm, acc_t (*red_max)[NP],
                                         acc_t (*red_sum)[NP]) {
  if (a.activation == kSoftmax) {
    acc_t mx[NP], inv[NP];
    const bool ext = pixel_max<kWide>(tl, v, step, n, a, norm, red_max, mx, inv);
    // exp(x - max): -inf channels give 0 (max is finite unless every channel is -inf, when the
    // pixel is NaN as in torch.softmax); a NaN channel makes the pixel's sum, so every p, NaN.
    acc_t s[NP];
#pragma unroll
    for (int j = 0; j < NP; ++j) s[j] = 0;
#pragma unroll
    for (int c = 0; c < NCH; ++c) {
      const bool ok = tl.channel(c) < a.C;
#pragma unroll
      for (int j = 0; j < NP; ++j) {
        const acc_t e = ok ? dexp(v[c][j] - mx[j]) : acc_t(0);
        v[c][j] = e;
        s[j] += e;
      }
    }
    if (!ext) {
      group_reduce<kWide>(s, tl.G, red_sum, SumOp());
#pragma unroll
      for (int j = 0; j < NP; ++j) inv[j] = acc_t(1) / s[j];
    }
#pragma unroll
    for (int c = 0; c < NCH; ++c) {
#pragma unroll
      for (int j = 0; j < NP; ++j) v[c][j] *= inv[j];
    }
  } else if (a.activation == kSigmoid) {
#pragma unroll
    for (int c = 0; c < NCH; ++c) {
#pragma unroll
      for (int j = 0; j < NP; ++j) v[c][j] = sigmoid_from_exp(dexp(-v[c][j]));
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Hard activations (kKindHard, forward only): p = 0/1
// ------------------------------------------------------------------------------------------------
/// max that propagates NaN (torch.argmax: a NaN is the largest value)
struct NanMaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return argmax_takes(b, a) ? b : a; }
};
struct MinOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return b < a ? b : a; }
};

/// Whether candidate (v2, channel i2) of the running argmax replaces (v1, i1), the two from disjoint
/// channel sets: torch.argmax's winner of the union (argmax_takes, and the lower channel among equal
/// values or two NaNs).  An empty candidate is (-inf, +inf): any real channel replaces it.
template <typename T>
__device__ __forceinline__ bool argmax_merge_takes(T v2, T i2, T v1, T i1) {
  return argmax_takes(v2, v1) || ((v2 == v1 || (v2 != v2 && v1 != v1)) && i2 < i1);
}

/// In place: x -> p = 0/1 of a hard activation.  threshold: x > 0 per element (NaN: 0).  argmax:
/// the group's maximum (NaN-propagating), then the lowest channel holding it (or the first NaN),
/// two group reductions; with a.ext_norm (chunked launches) the pixel's channel from
/// norm[2 (n M + m)] (argmax_kernel, over all channels).
template <bool kWide, typename acc_t, typename TileT, int NCH, int NP>
__device__ __forceinline__ void activate_hard(const TileT& tl, acc_t (&v)[NCH][NP], int64_t step, int64_t n,
                                              const Args& a, const acc_t* __restrict__ norm, acc_t (*red_a)[NP],
                                              acc_t (*red_b)[NP]) {
  if (a.activation == kThreshold) {
#pragma unroll
    for (int c = 0; c < NCH; ++c) {
#pragma unroll
      for (int j = 0; j < NP; ++j) v[c][j] = v[c][j] > acc_t(0) ? acc_t(1) : acc_t(0);
    }
    return;
  }
  acc_t idx[NP];  // the winning channel, relative to this launch's first channel
  bool ext = false;
  if constexpr (kWide) ext = a.ext_norm;
  if (ext) {
#pragma unroll
    for (int j = 0; j < NP; ++j) {
      const int64_t m = tl.pixel(step, j);
      idx[j] = m < a.M ? ldg1(norm + (n * a.M + m) * 2) - static_cast<acc_t>(a.c0) : acc_t(-1);
    }
  } else {
    acc_t best[NP];
#pragma unroll
    for (int j = 0; j < NP; ++j) best[j] = -static_cast<acc_t>(INFINITY);
#pragma unroll
    for (int c = 0; c < NCH; ++c) {
      if (tl.channel(c) < a.C) {
#pragma unroll
        for (int j = 0; j < NP; ++j) best[j] = NanMaxOp()(best[j], v[c][j]);
      }
    }
    group_reduce<kWide>(best, tl.G, red_a, NanMaxOp());
#pragma unroll
    for (int j = 0; j < NP; ++j) idx[j] = static_cast<acc_t>(INFINITY);
    // slots in decreasing channel order: the lowest matching channel of the lane is kept
#pragma unroll
    for (int c = NCH - 1; c >= 0; --c) {
      const int k = tl.channel(c);
      if (k < a.C) {
#pragma unroll
        for (int j = 0; j < NP; ++j) {
          const acc_t x = v[c][j];
          const bool hit = x == best[j] || (x != x && best[j] != best[j]);
          idx[j] = hit && static_cast<acc_t>(k) < idx[j] ? static_cast<acc_t>(k) : idx[j];
        }
      }
    }
    group_reduce<kWide>(idx, tl.G, red_b, MinOp());
  }
#pragma unroll
  for (int c = 0; c < NCH; ++c) {
    const acc_t k = static_cast<acc_t>(tl.channel(c));
#pragma unroll
    for (int j = 0; j < NP; ++j) v[c][j] = k == idx[j] ? acc_t(1) : acc_t(0);
  }
}

// ------------------------------------------------------------------------------------------------
// Pixel losses (kKindPixel): the rows X = sum t e and L = sum e, and their gradient, from the
// activation's own exps with dice_math.h's element math (the CPU kernel's formulas)
// ------------------------------------------------------------------------------------------------
/// Softmax of the tile for the pixel losses: z (in v) -> d = z - max (in v) and e = exp(d) (in ev),
/// one exp per element; per pixel inv = 1/s (s summed as activate() sums it, so p = e inv is the
/// Dice kind's p) and, with need_sm1, sm1 = s - 1 summed without the maximum's 1 (dice_math.h:
/// log s = log1p(sm1) and 1 - p keep their digits when p rounds to 1).  Reductions alternate red_a
/// and red_b.  With a.ext_norm (chunked launches) max and 1/s come from norm[] and sm1 = 1/inv - 1
/// (the pixel's sum over all channels is only known rounded there).
template <bool kWide, typename acc_t, typename TileT, int NCH, int NP>
__device__ __forceinline__ void softmax_pixel(const TileT& tl, acc_t (&v)[NCH][NP], acc_t (&ev)[NCH][NP],
                                              int64_t step, int64_t n, const Args& a, const acc_t* __restrict__ norm,
                                              bool need_sm1, acc_t (*red_a)[NP], acc_t (*red_b)[NP],
                                              acc_t (&inv)[NP], acc_t (&sm1)[NP]) {
  acc_t mx[NP];
  const bool ext = pixel_max<kWide>(tl, v, step, n, a, norm, red_a, mx, inv);
  acc_t s[NP], below[NP], maxima[NP];
#pragma unroll
  for (int j = 0; j < NP; ++j) s[j] = below[j] = maxima[j] = 0;
#pragma unroll
  for (int c = 0; c < NCH; ++c) {
    const bool ok = tl.channel(c) < a.C;
#pragma unroll
    for (int j = 0; j < NP; ++j) {
      const acc_t d = v[c][j] - mx[j];
      const acc_t e = ok ? dexp(d) : acc_t(0);
      v[c][j] = d;
      ev[c][j] = e;
      s[j] += e;
      const bool is_max = ok && d == acc_t(0);  // e = exp(0) = 1 exactly there
      below[j] += is_max ? acc_t(0) : e;
      maxima[j] += is_max ? acc_t(1) : acc_t(0);
    }
  }
  if (ext) {
#pragma unroll
    for (int j = 0; j < NP; ++j) sm1[j] = acc_t(1) / inv[j] - acc_t(1);
    return;
  }
  group_reduce<kWide>(s, tl.G, red_b, SumOp());
#pragma unroll
  for (int j = 0; j < NP; ++j) inv[j] = acc_t(1) / s[j];
  if (need_sm1) {
    group_reduce<kWide>(below, tl.G, red_a, SumOp());
    group_reduce<kWide>(maxima, tl.G, red_b, SumOp());
#pragma unroll
    for (int j = 0; j < NP; ++j) sm1[j] = below[j] + (maxima[j] - acc_t(1));
  } else {
#pragma unroll
    for (int j = 0; j < NP; ++j) sm1[j] = 0;
  }
}

/// Sigmoid focal factors a, c (dice_math.h) of one element: 0/1 targets from p and 1 - p, soft
/// targets with one more exp.
template <bool kLabels, typename acc_t>
__device__ __forceinline__ void sigmoid_focal_factors(acc_t z, acc_t t, acc_t p, acc_t pm, acc_t& fa, acc_t& fc) {
  using M = ScalarMath<acc_t>;
  if (kLabels || t == acc_t(0) || t == acc_t(1)) {
    sigmoid_focal_binary<M>(t == acc_t(1), p, pm, fa, fc);
  } else {
    sigmoid_focal_soft<M>(z, t, fa, fc);
  }
}

// Resident blocks per SM that the register allocation must allow (__launch_bounds__): 2 (1 for
// fp64); 3 for the channels-last kernels with 8 slots and labels (forward: 16 values and 24
// accumulators a thread): 80 registers and 37.5 % occupancy instead of 92 (forward, sm_80/90) or
// 110 (backward, sm_100/120) and 25 %.  With a float target (16 more values) the forward would
// spill on sm_120; those keep 2 blocks and have twice the label kernels' loads in flight.
template <typename acc_t, bool kLabels, int NCH, bool kCL, bool kWide>
constexpr int min_blocks() {
  return sizeof(acc_t) == 8 ? 1 : (kLabels && kCL && NCH == 8 && !kWide) ? 3 : 2;
}

// ------------------------------------------------------------------------------------------------
// Forward: per-program partial sums
// ------------------------------------------------------------------------------------------------
// Persistent: program (blockIdx.x, blockIdx.y) walks the block steps blockIdx.x, + gridDim.x, ...
// of images blockIdx.y, + gridDim.y, ...; per image it accumulates I, P, T of its lanes' classes in
// registers, then reduces them over the block in a fixed order (xor shuffles, then warps in order)
// and writes partial[n, which, c0 + k, blockIdx.x].  reduce_partial_kernel adds the programs' columns
// in order: deterministic, no atomics.
template <typename scalar_t, bool kLabels, typename acc_t, int NCH, bool kCL, bool kWide, int kKind>
__global__ void __launch_bounds__(kThreads, min_blocks<acc_t, kLabels, NCH, kCL, kWide>())
    forward_partial_kernel(const scalar_t* __restrict__ x, const void* __restrict__ t, acc_t* __restrict__ partial,
                           const acc_t* __restrict__ norm, const Args a) {
  using TileT = Tile<scalar_t, kCL, NCH>;
  constexpr int NP = TileT::NP;
  constexpr int kRed = kWide ? kWarps : 1;
  constexpr int kRows = kind_rows(kKind);
  __shared__ acc_t red_max[kRed][NP];
  __shared__ acc_t red_sum[kRed][NP];
  __shared__ acc_t fin[kThreads];
  const TileT tl(threadIdx.x, a.G, a.log2G);
  const int64_t nprog = gridDim.x;

  for (int64_t n = blockIdx.y; n < a.N; n += gridDim.y) {
    const scalar_t* xn = x + n * a.xs.n;
    const scalar_t* tn = kLabels ? nullptr : static_cast<const scalar_t*>(t) + n * a.ts.n;  // float target
    acc_t acc[kRows][NCH];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int c = 0; c < NCH; ++c) acc[r][c] = 0;
    }

    for (int64_t step = blockIdx.x; step < a.steps; step += nprog) {
      // targets first, then logits: all loads of the step are issued before any math
      int code[NP];
      load_codes<kLabels>(tl, t, n, step, a, code);
      acc_t v[NCH][NP];
      load_tile<scalar_t, acc_t, kCL, NCH>(tl, xn, a.xs, step, a.C, a.M, a.x_vec, v);
      acc_t tv[kLabels ? 1 : NCH][NP];
      if constexpr (!kLabels) {
        load_tile<scalar_t, acc_t, kCL, NCH>(tl, tn, a.ts, step, a.C, a.M,
                                             a.t_vec, tv);
      }
      // the Dice rows of one element (p and t of a counted pixel, else 0)
      const auto dice = [&](int c, int j, acc_t p, acc_t tk) {
        acc[0][c] += p * tk;
        acc[1][c] += pow_q(p, a.power);
        if constexpr (kLabels) {
          acc[2][c] += tk;
        } else {
          acc[2][c] += pow_q(tk, a.power);
        }
      };
      if constexpr (kKind == kKindPixel) {
        using Mth = ScalarMath<acc_t>;
        const bool focal = a.pixel_loss == kPixelFocal;
        // the pixel rows of one element: term e of a counted pixel, else selected away
        const auto pixel = [&](int c, acc_t term, bool valid, acc_t tk) {
          term = valid ? term : acc_t(0);
          acc[3][c] += target_times<Mth>(tk, term);
          acc[4][c] += term;
        };
        if (a.activation == kSoftmax) {
          acc_t ev[NCH][NP], inv[NP], sm1[NP], ls[NP];
          softmax_pixel<kWide>(tl, v, ev, step, n, a, norm, true, red_max, red_sum, inv, sm1);
#pragma unroll
          for (int j = 0; j < NP; ++j) ls[j] = Mth::log1p(sm1[j]);  // log s: one log per pixel
#pragma unroll
          for (int c = 0; c < NCH; ++c) {
            const int64_t k = a.c0 + tl.channel(c);
#pragma unroll
            for (int j = 0; j < NP; ++j) {
              const bool valid = code[j] != kIgnored;
              acc_t tk;
              if constexpr (kLabels) {
                tk = code[j] == k ? acc_t(1) : acc_t(0);
              } else {
                tk = valid ? tv[c][j] : acc_t(0);
              }
              const acc_t e = ev[c][j];
              dice(c, j, valid ? e * inv[j] : acc_t(0), tk);
              const acc_t ce = softmax_ce_term(ls[j], v[c][j]);
              pixel(c, focal ? softmax_focal_term<Mth>(softmax_one_minus_p(sm1[j], e, inv[j]), ce, a.fg) : ce, valid,
                    tk);
            }
          }
        } else {  // sigmoid
#pragma unroll
          for (int c = 0; c < NCH; ++c) {
            const int64_t k = a.c0 + tl.channel(c);
#pragma unroll
            for (int j = 0; j < NP; ++j) {
              const bool valid = code[j] != kIgnored;
              acc_t tk;
              if constexpr (kLabels) {
                tk = code[j] == k ? acc_t(1) : acc_t(0);
              } else {
                tk = valid ? tv[c][j] : acc_t(0);
              }
              const acc_t z = v[c][j];
              const acc_t e = dexp(-z);
              const acc_t p = sigmoid_from_exp(e);
              dice(c, j, valid ? p : acc_t(0), tk);
              acc_t pm, sp;
              sigmoid_softplus<Mth>(z, e, p, pm, sp);
              acc_t term = bce_term<Mth>(sp, tk, z);
              if (focal) {
                acc_t fa, fc;
                sigmoid_focal_factors<kLabels>(z, tk, p, pm, fa, fc);
                term = pow_gamma<Mth>(fa, a.fg) * term;
              }
              pixel(c, term, valid, tk);
            }
          }
        }
      } else {
        if constexpr (kKind == kKindHard) {
          activate_hard<kWide>(tl, v, step, n, a, norm, red_max, red_sum);
        } else {
          activate<kWide>(tl, v, step, n, a, norm, red_max, red_sum);
        }
        // ignored pixels (and pixels past M) are selected away: they add exactly 0 everywhere
#pragma unroll
        for (int c = 0; c < NCH; ++c) {
          const int64_t k = a.c0 + tl.channel(c);
#pragma unroll
          for (int j = 0; j < NP; ++j) {
            const bool valid = code[j] != kIgnored;
            const acc_t p = valid ? v[c][j] : acc_t(0);
            // p * t, not a select on the label: a NaN pixel makes every class's I NaN, as in the
            // reference (ignored pixels have p = t = 0 here)
            if constexpr (kLabels) {
              dice(c, j, p, code[j] == k ? acc_t(1) : acc_t(0));
            } else {
              dice(c, j, p, valid ? tv[c][j] : acc_t(0));
            }
          }
        }
      }
    }

    // Block reduction of each accumulator, in a fixed order.  Lanes with the same g hold the same
    // classes: xor shuffles over the other lanes of the warp, then the warps' (or wide groups')
    // values in order.
    const int stride = tl.G > 32 ? tl.G : 32;
#pragma unroll
    for (int r = 0; r < kRows * NCH; ++r) {
      acc_t val = acc[r / NCH][r % NCH];
      for (int off = tl.G; off < 32; off <<= 1) val += __shfl_xor_sync(kFullMask, val, off);
      fin[threadIdx.x] = val;
      __syncthreads();
      if (int(threadIdx.x) < tl.G) {
        acc_t sum = fin[threadIdx.x];
        for (int i = stride; i < kThreads; i += stride) sum += fin[threadIdx.x + i];
        const int k = tl.channel(r % NCH);
        if (k < a.C) stg(partial + ((n * kRows + r / NCH) * a.Ct + a.c0 + k) * nprog + blockIdx.x, sum);
      }
      __syncthreads();
    }
  }
}

/// stats[row] = sum over the programs' partials of row, in a fixed order.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    reduce_partial_kernel(const acc_t* __restrict__ partial, acc_t* __restrict__ stats, int64_t nprog) {
  __shared__ acc_t smem[kThreads];
  const int64_t row = blockIdx.x;
  acc_t v = 0;
  for (int64_t b = threadIdx.x; b < nprog; b += kThreads) v += ldg1(partial + row * nprog + b);
  smem[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s /= 2) {
    if (int(threadIdx.x) < s) smem[threadIdx.x] += smem[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) stg(stats + row, smem[0]);
}

// ------------------------------------------------------------------------------------------------
// Backward: one read of x (and the target), one write of dL/dx
// ------------------------------------------------------------------------------------------------
template <typename scalar_t, bool kLabels, typename acc_t, int NCH, bool kCL, bool kWide, int kKind>
__global__ void __launch_bounds__(kThreads, min_blocks<acc_t, kLabels, NCH, kCL, kWide>())
    backward_kernel(const acc_t* __restrict__ grad, const scalar_t* __restrict__ x, const void* __restrict__ t,
                    scalar_t* __restrict__ gx, const acc_t* __restrict__ norm, acc_t* __restrict__ dot_buf,
                    const Args a) {
  static_assert(kKind != kKindHard, "the hard activations have no backward");
  using TileT = Tile<scalar_t, kCL, NCH>;
  constexpr int NP = TileT::NP;
  constexpr int kRed = kWide ? kWarps : 1;
  constexpr int kRows = kind_rows(kKind);
  constexpr bool kPixel = kKind == kKindPixel;
  __shared__ acc_t red_max[kRed][NP];
  __shared__ acc_t red_sum[kRed][NP];
  __shared__ acc_t red_dot[kRed][NP];
  const TileT tl(threadIdx.x, a.G, a.log2G);
  const bool softmax = a.activation == kSoftmax;
  bool ext_dot = false, dot_pass = false;
  if constexpr (kWide) {
    ext_dot = a.ext_dot;
    dot_pass = a.dot_pass;
  }

  for (int64_t n = blockIdx.y; n < a.N; n += gridDim.y) {
    const scalar_t* xn = x + n * a.xs.n;
    const scalar_t* tn = kLabels ? nullptr : static_cast<const scalar_t*>(t) + n * a.ts.n;  // float target
    scalar_t* gn = gx + n * a.gs.n;
    // dL/dI and dL/dP of the lane's classes (and dL/dX, dL/dL with a pixel loss)
    acc_t cI[NCH], cP[NCH], cX[kPixel ? NCH : 1], cL[kPixel ? NCH : 1];
#pragma unroll
    for (int c = 0; c < NCH; ++c) {
      const int k = tl.channel(c);
      cI[c] = k < a.C ? ldg1(grad + (n * kRows) * a.Ct + a.c0 + k) : acc_t(0);
      cP[c] = k < a.C ? ldg1(grad + (n * kRows + 1) * a.Ct + a.c0 + k) : acc_t(0);
      if constexpr (kPixel) {
        cX[c] = k < a.C ? ldg1(grad + (n * kRows + 3) * a.Ct + a.c0 + k) : acc_t(0);
        cL[c] = k < a.C ? ldg1(grad + (n * kRows + 4) * a.Ct + a.c0 + k) : acc_t(0);
      }
    }

    for (int64_t step = blockIdx.x; step < a.steps; step += gridDim.x) {
      int code[NP];
      load_codes<kLabels>(tl, t, n, step, a, code);
      acc_t v[NCH][NP];
      load_tile<scalar_t, acc_t, kCL, NCH>(tl, xn, a.xs, step, a.C, a.M, a.x_vec, v);
      acc_t tv[kLabels ? 1 : NCH][NP];
      if constexpr (!kLabels) {
        load_tile<scalar_t, acc_t, kCL, NCH>(tl, tn, a.ts, step, a.C, a.M,
                                             a.t_vec, tv);
      }

      // target value of slot (c, j)
      auto target = [&](int c, int j) -> acc_t {
        if constexpr (kLabels) {
          return code[j] == a.c0 + tl.channel(c) ? acc_t(1) : acc_t(0);
        } else {
          return tv[c][j];
        }
      };

      if constexpr (kPixel) {
        using Mth = ScalarMath<acc_t>;
        const bool focal = a.pixel_loss == kPixelFocal;
        if (softmax) {
          // dz_j = p_j (g_j - sum_k (p_k g_k + h_k)) + h_j with h = -w (ce) or softmax_focal_h
          // (focal); h is kept in v (where d was), e = exp(d) in ev
          acc_t ev[NCH][NP], inv[NP], sm1[NP], ls[NP], dot[NP];
          softmax_pixel<kWide>(tl, v, ev, step, n, a, norm, focal, red_max, red_sum, inv, sm1);
#pragma unroll
          for (int j = 0; j < NP; ++j) {
            ls[j] = focal ? Mth::log1p(sm1[j]) : acc_t(0);
            dot[j] = 0;
          }
#pragma unroll
          for (int c = 0; c < NCH; ++c) {
            const bool ok = tl.channel(c) < a.C;
#pragma unroll
            for (int j = 0; j < NP; ++j) {
              const acc_t tk = target(c, j), e = ev[c][j], p = e * inv[j];
              const acc_t w = pixel_weight(cX[c], cL[c], tk);
              acc_t h = -w;
              if (focal) {
                h = softmax_focal_h<Mth>(w, p, softmax_one_minus_p(sm1[j], e, inv[j]), softmax_ce_term(ls[j], v[c][j]),
                                         a.fg);
              }
              h = ok ? h : acc_t(0);
              if (ok) dot[j] += p * grad_p(cI[c], cP[c], tk, p, a.power) + h;
              v[c][j] = h;
            }
          }
          if (ext_dot) {
#pragma unroll
            for (int j = 0; j < NP; ++j) {
              const int64_t m = tl.pixel(step, j);
              dot[j] = m < a.M ? ldp(dot_buf + n * a.M + m) : acc_t(0);
            }
          } else {
            group_reduce<kWide>(dot, tl.G, red_dot, SumOp());
          }
          if (dot_pass) {  // huge C: this chunk's share of sum_k (p_k g_k + h_k), added in chunk order
            if (tl.g == 0) {
#pragma unroll
              for (int j = 0; j < NP; ++j) {
                const int64_t m = tl.pixel(step, j);
                if (m < a.M) stg(dot_buf + n * a.M + m, ldp(dot_buf + n * a.M + m) + dot[j]);
              }
            }
            continue;
          }
#pragma unroll
          for (int c = 0; c < NCH; ++c) {
#pragma unroll
            for (int j = 0; j < NP; ++j) {
              const acc_t p = ev[c][j] * inv[j];
              const acc_t dz = softmax_dz(p, grad_p(cI[c], cP[c], target(c, j), p, a.power), dot[j]) + v[c][j];
              v[c][j] = code[j] == kIgnored ? acc_t(0) : dz;  // exactly 0 for ignored pixels
            }
          }
        } else {  // sigmoid
          const acc_t gamma = static_cast<acc_t>(a.fg.gamma);
#pragma unroll
          for (int c = 0; c < NCH; ++c) {
#pragma unroll
            for (int j = 0; j < NP; ++j) {
              const acc_t z = v[c][j], tk = target(c, j);
              const acc_t e = dexp(-z);
              const acc_t p = sigmoid_from_exp(e);
              acc_t dz = sigmoid_dz(p, grad_p(cI[c], cP[c], tk, p, a.power));
              const acc_t w = pixel_weight(cX[c], cL[c], tk);
              if (focal && a.fg.mode != 0) {
                acc_t pm, sp, fa, fc;
                sigmoid_softplus<Mth>(z, e, p, pm, sp);
                const acc_t b = bce_term<Mth>(sp, tk, z);
                sigmoid_focal_factors<kLabels>(z, tk, p, pm, fa, fc);
                dz = dz + sigmoid_focal_dz(w, p, tk, pow_gamma<Mth>(fa, a.fg), b, fc, gamma);
              } else {  // cross-entropy (and focal with gamma = 0)
                dz = dz + sigmoid_ce_dz(w, p, tk);
              }
              v[c][j] = code[j] == kIgnored ? acc_t(0) : dz;  // exactly 0 for ignored pixels
            }
          }
        }
        store_tile<scalar_t, acc_t, kCL, NCH>(tl, gn, a.gs, step, a.C, a.M, a.g_vec, v);
        continue;
      }

      activate<kWide>(tl, v, step, n, a, norm, red_max, red_sum);
      acc_t dot[NP];
      if (softmax) {
        if (ext_dot) {
#pragma unroll
          for (int j = 0; j < NP; ++j) {
            const int64_t m = tl.pixel(step, j);
            dot[j] = m < a.M ? ldp(dot_buf + n * a.M + m) : acc_t(0);
          }
        } else {
#pragma unroll
          for (int j = 0; j < NP; ++j) dot[j] = 0;
#pragma unroll
          for (int c = 0; c < NCH; ++c) {
            if (tl.channel(c) < a.C) {
#pragma unroll
              for (int j = 0; j < NP; ++j) dot[j] += v[c][j] * grad_p(cI[c], cP[c], target(c, j), v[c][j], a.power);
            }
          }
          group_reduce<kWide>(dot, tl.G, red_dot, SumOp());
        }
        if (dot_pass) {  // huge C: this chunk's share of sum_j p_j g_j, added in chunk order
          if (tl.g == 0) {
#pragma unroll
            for (int j = 0; j < NP; ++j) {
              const int64_t m = tl.pixel(step, j);
              if (m < a.M) stg(dot_buf + n * a.M + m, ldp(dot_buf + n * a.M + m) + dot[j]);
            }
          }
          continue;
        }
      }
#pragma unroll
      for (int c = 0; c < NCH; ++c) {
#pragma unroll
        for (int j = 0; j < NP; ++j) {
          const acc_t p = v[c][j];
          const acc_t gp = grad_p(cI[c], cP[c], target(c, j), p, a.power);
          acc_t dz = gp;
          if (softmax) {
            dz = softmax_dz(p, gp, dot[j]);
          } else if (a.activation == kSigmoid) {
            dz = sigmoid_dz(p, gp);
          }
          v[c][j] = code[j] == kIgnored ? acc_t(0) : dz;  // exactly 0 for ignored pixels
        }
      }
      store_tile<scalar_t, acc_t, kCL, NCH>(tl, gn, a.gs, step, a.C, a.M, a.g_vec, v);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Huge C, argmax: the winning channel of each pixel over all channels (torch.argmax)
// ------------------------------------------------------------------------------------------------
// The layout of pixel_norm_kernel below: NCHW, a thread per run of V pixels walking the channels in
// order (argmax_takes); channels-last, a warp per pixel, each lane walking its channels in order,
// then the lanes' candidates merged by xor shuffles (argmax_merge_takes).  Writes the channel (as
// acc_t, exact below 2^24) to norm[2 (n M + m)].
template <typename scalar_t, typename acc_t, bool kCL>
__global__ void __launch_bounds__(kThreads, 4)
    argmax_kernel(const scalar_t* __restrict__ x, acc_t* __restrict__ norm, int64_t N, int64_t C, int64_t M,
                  Strides3 xs, bool vec) {
  constexpr int V = 16 / int(sizeof(scalar_t));
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    const scalar_t* xn = x + n * xs.n;
    acc_t* normn = norm + 2 * n * M;
    if constexpr (!kCL) {
      for (int64_t m0 = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * V; m0 < M;
           m0 += int64_t(gridDim.x) * kThreads * V) {
        const scalar_t* px = xn + m0 * xs.m;
        acc_t best[V], idx[V];
#pragma unroll
        for (int j = 0; j < V; ++j) {
          best[j] = m0 + j < M ? static_cast<acc_t>(ldg1(px + j * xs.m)) : acc_t(0);
          idx[j] = 0;
        }
        const bool full = vec && m0 + V <= M;
        for (int64_t k = 1; k < C; ++k) {
          scalar_t raw[V];
          if (full) {
            load_aligned<scalar_t, V>(px + k * xs.c, raw);
          } else {
#pragma unroll
            for (int j = 0; j < V; ++j) raw[j] = m0 + j < M ? ldg1(px + j * xs.m + k * xs.c) : scalar_t(0);
          }
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const acc_t v = static_cast<acc_t>(raw[j]);
            if (argmax_takes(v, best[j])) {
              best[j] = v;
              idx[j] = static_cast<acc_t>(k);
            }
          }
        }
#pragma unroll
        for (int j = 0; j < V; ++j) {
          if (m0 + j < M) stg(normn + 2 * (m0 + j), idx[j]);
        }
      }
    } else {
      const int lane = threadIdx.x & 31;
      // warp-uniform loop: every lane of a warp runs the same iterations (shuffles below)
      for (int64_t m = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5); m < M; m += int64_t(gridDim.x) * kWarps) {
        const scalar_t* px = xn + m * xs.m;
        acc_t best = -static_cast<acc_t>(INFINITY), idx = static_cast<acc_t>(INFINITY);
        const auto visit = [&](acc_t v, int64_t k) {
          if (idx == static_cast<acc_t>(INFINITY) || argmax_takes(v, best)) {
            best = v;
            idx = static_cast<acc_t>(k);
          }
        };
        if (vec) {  // C % V == 0
          for (int64_t k = int64_t(lane) * V; k < C; k += 32 * V) {
            scalar_t raw[V];
            load_aligned<scalar_t, V>(px + k, raw);
#pragma unroll
            for (int j = 0; j < V; ++j) visit(static_cast<acc_t>(raw[j]), k + j);
          }
        } else {
          for (int64_t k = lane; k < C; k += 32) visit(static_cast<acc_t>(ldg1(px + k * xs.c)), k);
        }
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
          const acc_t b2 = __shfl_xor_sync(kFullMask, best, off), i2 = __shfl_xor_sync(kFullMask, idx, off);
          if (argmax_merge_takes(b2, i2, best, idx)) {
            best = b2;
            idx = i2;
          }
        }
        if (lane == 0) stg(normn + 2 * m, idx);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Huge C: softmax normaliser per pixel over all channels (max, 1/sum), one exp per element
// ------------------------------------------------------------------------------------------------
// Images on grid.y (looping over more), pixels on grid.x: no 64-bit division.
// NCHW: one thread per run of V consecutive pixels (V = one 128-bit vector; consecutive threads,
// consecutive runs) walks the channels with the online update of each pixel, one 128-bit load per
// channel (scalar loads without vec, or for a run that crosses M).  Channels-last: one warp per
// pixel, lanes on consecutive channel vectors (128-bit with vec, else lanes on consecutive
// channels), then the lanes' normalisers merged by xor shuffles (online_softmax_merge).
// vec: host-checked as vector_ok (NCHW: unit pixel stride; channels-last: C, pixel and image
// strides multiples of V), with a 16-byte aligned x.
// (At least 4 blocks per SM: up to 64 registers a thread.  With no minimum, ptxas for sm_100 and
// sm_120 chose 32 and 40 registers and spilled.)
template <typename scalar_t, typename acc_t, bool kCL>
__global__ void __launch_bounds__(kThreads, 4)
    pixel_norm_kernel(const scalar_t* __restrict__ x, acc_t* __restrict__ norm, int64_t N, int64_t C, int64_t M,
                      Strides3 xs, bool vec) {
  constexpr int V = 16 / int(sizeof(scalar_t));
  const auto ex = [](acc_t v) { return dexp(v); };
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    const scalar_t* xn = x + n * xs.n;
    acc_t* normn = norm + 2 * n * M;
    if constexpr (!kCL) {
      for (int64_t m0 = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * V; m0 < M;
           m0 += int64_t(gridDim.x) * kThreads * V) {
        const scalar_t* px = xn + m0 * xs.m;
        acc_t mx[V], s[V];
#pragma unroll
        for (int j = 0; j < V; ++j) {
          mx[j] = -static_cast<acc_t>(INFINITY);
          s[j] = 0;
        }
        if (vec && m0 + V <= M) {
          for (int64_t k = 0; k < C; ++k) {
            scalar_t raw[V];
            load_aligned<scalar_t, V>(px + k * xs.c, raw);
#pragma unroll
            for (int j = 0; j < V; ++j) online_softmax_update(mx[j], s[j], static_cast<acc_t>(raw[j]), ex);
          }
        } else {
          for (int64_t k = 0; k < C; ++k) {
#pragma unroll
            for (int j = 0; j < V; ++j) {
              if (m0 + j < M) {
                online_softmax_update(mx[j], s[j], static_cast<acc_t>(ldg1(px + j * xs.m + k * xs.c)), ex);
              }
            }
          }
        }
#pragma unroll
        for (int j = 0; j < V; ++j) {
          if (m0 + j < M) {
            stg(normn + 2 * (m0 + j), mx[j]);
            stg(normn + 2 * (m0 + j) + 1, acc_t(1) / s[j]);
          }
        }
      }
    } else {
      const int lane = threadIdx.x & 31;
      // warp-uniform loop: every lane of a warp runs the same iterations (shuffles below)
      for (int64_t m = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5); m < M; m += int64_t(gridDim.x) * kWarps) {
        const scalar_t* px = xn + m * xs.m;
        acc_t mx = -static_cast<acc_t>(INFINITY), s = 0;
        if (vec) {  // C % V == 0
          for (int64_t k = int64_t(lane) * V; k < C; k += 32 * V) {
            scalar_t raw[V];
            load_aligned<scalar_t, V>(px + k, raw);
#pragma unroll
            for (int j = 0; j < V; ++j) online_softmax_update(mx, s, static_cast<acc_t>(raw[j]), ex);
          }
        } else {
          for (int64_t k = lane; k < C; k += 32) online_softmax_update(mx, s, static_cast<acc_t>(ldg1(px + k * xs.c)), ex);
        }
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
          const acc_t m2 = __shfl_xor_sync(kFullMask, mx, off), s2 = __shfl_xor_sync(kFullMask, s, off);
          online_softmax_merge(mx, s, m2, s2, ex);
        }
        if (lane == 0) {
          stg(normn + 2 * m, mx);
          stg(normn + 2 * m + 1, acc_t(1) / s);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Host side: launch plan and kernel selection (no CUDA runtime calls here)
// ------------------------------------------------------------------------------------------------
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

struct Plan {
  bool cl;        // channels-last mapping
  bool wide;      // G > 32
  int nch;        // channel slots per lane
  int G, log2G;   // lanes per pixel group
  int np;         // pixels per group
  int pk;         // channels-last: pixels per 128-bit vector (1, or 2/4 packed pixels)
  int64_t chunk;  // channels per launch (C unless C > 256 * nch)
  int64_t pb;     // pixels per block step
  int kind;       // kKindDice, kKindPixel or kKindHard
};

inline int ceil_pow2(int64_t v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}
inline int ilog2(int v) {
  int l = 0;
  while ((1 << l) < v) ++l;
  return l;
}


/// Slots and lanes for C channels: the fewest lanes per pixel (G) that hold C in at most
/// max_slots registers each, then the smallest slot count {2, 4, 8} that covers C with G lanes
/// (channels-last C = 2 or 4 with 2-byte elements, or C = 2 with 4-byte ones: packed pixels).
/// kind: the slot bounds of the pixel-loss kernels (kind_slots, kind_min_slots).
template <typename scalar_t, bool kLabels>
Plan make_plan(int64_t C, bool cl, int kind = kKindDice) {
  Plan p{};
  p.cl = cl;
  p.kind = kind;
  const int mx = kind_slots(kind, max_slots<scalar_t, kLabels>(cl), cl, int(sizeof(scalar_t)));
  const int64_t need = (C + mx - 1) / mx;  // lanes needed at mx slots each
  if (need <= kMaxLanes) {
    p.wide = false;
    p.G = ceil_pow2(need);
    const int64_t per = (C + p.G - 1) / p.G;
    p.nch = per <= 2 ? 2 : per <= 4 ? 4 : 8;
    if (p.nch < kind_min_slots(kind, cl)) p.nch = kind_min_slots(kind, cl);
    if (p.nch > mx || one_slot_count<scalar_t>()) p.nch = mx;
    p.chunk = C;
  } else {
    p.wide = true;
    p.nch = kind_slots(kind, wide_slots<scalar_t, kLabels>(cl), cl, int(sizeof(scalar_t)));
    const int64_t lanes = (C + p.nch - 1) / p.nch;
    p.G = lanes >= kMaxGroupLanes ? kMaxGroupLanes : ceil_pow2(lanes);
    p.chunk = int64_t(p.G) * p.nch < C ? int64_t(p.G) * p.nch : C;
  }
  p.log2G = ilog2(p.G);
  p.np = group_pixels(int(sizeof(scalar_t)), cl, p.nch);
  p.pk = pack_pixels(int(sizeof(scalar_t)), cl, p.nch);
  p.pb = int64_t(kThreads / p.G) * p.np;
  return p;
}

template <typename scalar_t, typename acc_t>
using ForwardKernel = void (*)(const scalar_t*, const void*, acc_t*, const acc_t*, const Args);
template <typename scalar_t, typename acc_t>
using BackwardKernel = void (*)(const acc_t*, const scalar_t*, const void*, scalar_t*, const acc_t*, acc_t*,
                                const Args);

// The instantiations: slots {2, 4, 8} up to max_slots per mapping (the pixel-loss kind: within
// kind_min_slots .. kind_slots), and one wide kernel per mapping (fp64: max_slots only); per kind
// (the hard kind forward only).
#define DICE_SELECT_KERNEL(KERNEL, plan, KIND)                                                    \
  do {                                                                                            \
    constexpr int kB = int(sizeof(scalar_t));                                                     \
    constexpr int kMaxP = kind_slots(KIND, max_slots<scalar_t, kLabels>(false), false, kB);       \
    constexpr int kMaxC = kind_slots(KIND, max_slots<scalar_t, kLabels>(true), true, kB);         \
    constexpr int kWideP = kind_slots(KIND, wide_slots<scalar_t, kLabels>(false), false, kB);     \
    constexpr int kWideC = kind_slots(KIND, wide_slots<scalar_t, kLabels>(true), true, kB);       \
    constexpr int kMinC = kind_min_slots(KIND, true);                                             \
    if ((plan).wide) {                                                                            \
      return (plan).cl ? &KERNEL<scalar_t, kLabels, acc_t, kWideC, true, true, KIND>              \
                       : &KERNEL<scalar_t, kLabels, acc_t, kWideP, false, true, KIND>;            \
    }                                                                                             \
    if constexpr (one_slot_count<scalar_t>()) {                                                   \
      return (plan).cl ? &KERNEL<scalar_t, kLabels, acc_t, kMaxC, true, false, KIND>              \
                       : &KERNEL<scalar_t, kLabels, acc_t, kMaxP, false, false, KIND>;            \
    } else {                                                                                      \
      if ((plan).cl) {                                                                            \
        switch ((plan).nch) {                                                                     \
          case 2: return &KERNEL<scalar_t, kLabels, acc_t, (kMinC > 2 ? kMinC : 2), true, false, KIND>; \
          case 4: return &KERNEL<scalar_t, kLabels, acc_t, (kMaxC < 4 ? kMaxC : 4), true, false, KIND>; \
          default: return &KERNEL<scalar_t, kLabels, acc_t, kMaxC, true, false, KIND>;            \
        }                                                                                         \
      }                                                                                           \
      switch ((plan).nch) {                                                                       \
        case 2: return &KERNEL<scalar_t, kLabels, acc_t, 2, false, false, KIND>;                  \
        case 4: return &KERNEL<scalar_t, kLabels, acc_t, (kMaxP < 4 ? kMaxP : 4), false, false, KIND>; \
        default: return &KERNEL<scalar_t, kLabels, acc_t, kMaxP, false, false, KIND>;            \
      }                                                                                           \
    }                                                                                             \
  } while (0)

template <typename scalar_t, bool kLabels, typename acc_t, int kKind>
ForwardKernel<scalar_t, acc_t> select_forward_kind(const Plan& plan) {
  DICE_SELECT_KERNEL(forward_partial_kernel, plan, kKind);
}
template <typename scalar_t, bool kLabels, typename acc_t>
ForwardKernel<scalar_t, acc_t> select_forward(const Plan& plan) {
  switch (plan.kind) {
    case kKindPixel: return select_forward_kind<scalar_t, kLabels, acc_t, kKindPixel>(plan);
    case kKindHard: return select_forward_kind<scalar_t, kLabels, acc_t, kKindHard>(plan);
    default: return select_forward_kind<scalar_t, kLabels, acc_t, kKindDice>(plan);
  }
}
template <typename scalar_t, bool kLabels, typename acc_t, int kKind>
BackwardKernel<scalar_t, acc_t> select_backward_kind(const Plan& plan) {
  DICE_SELECT_KERNEL(backward_kernel, plan, kKind);
}
template <typename scalar_t, bool kLabels, typename acc_t>
BackwardKernel<scalar_t, acc_t> select_backward(const Plan& plan) {
  TORCH_CHECK(plan.kind != kKindHard, "dicetorch: the hard activations have no backward");
  return plan.kind == kKindPixel ? select_backward_kind<scalar_t, kLabels, acc_t, kKindPixel>(plan)
                                 : select_backward_kind<scalar_t, kLabels, acc_t, kKindDice>(plan);
}
#undef DICE_SELECT_KERNEL


// ------------------------------------------------------------------------------------------------
// Host orchestration, shared by dice_cuda.cu (Backend = CUDA launches on the current stream) and
// the emulation test (Backend = CPU emulation).  Backend provides
//   int64_t max_programs(const void* kernel)  resident blocks of `kernel` on the whole device
//   void launch(kernel, dim3 grid, args...)   a launch of kThreads threads per block
//   void track(const at::Tensor&)             a buffer the kernels may touch (emulation: bounds)
// Nothing here synchronizes with the device; every buffer comes from at::empty/at::zeros on x's
// device (the caching allocator), so the sequence is capturable in a CUDA graph.
// ------------------------------------------------------------------------------------------------
inline Strides3 strides_of(const at::Tensor& a) {
  if (a.dim() == 2) return {a.stride(0), 0, a.stride(1)};
  return {a.stride(0), a.stride(1), a.stride(2)};
}

inline bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % uint64_t(bytes) == 0; }

/// Aligned vector access of an (N, C, M) float operand is allowed for every launch of the plan.
template <typename scalar_t>
bool vector_ok(const Plan& p, const void* ptr, const Strides3& s, int64_t N, int64_t Ct, int64_t M) {
  constexpr int kVec = 16 / int(sizeof(scalar_t));
  // (the stride of a dimension of size 1 never moves a pointer)
  if (!p.cl) {  // 128-bit runs of kVec pixels; chunk offsets c0 are multiples of kVec
    return s.m == 1 && (N == 1 || s.n % kVec == 0) && (Ct == 1 || s.c % kVec == 0) && aligned(ptr, 16);
  }
  if (p.pk > 1) {  // 128-bit runs of pk dense pixels of exactly nch channels (one lane per pixel)
    return s.c == 1 && Ct == p.nch && p.G == 1 && (M == 1 || s.m == Ct) && (N == 1 || s.n % kVec == 0) &&
           aligned(ptr, 16);
  }
  const int cv = p.nch < kVec ? p.nch : kVec;  // channels per vector (kVec for every plan)
  return s.c == 1 && Ct % cv == 0 && p.chunk % cv == 0 && (M == 1 || s.m % cv == 0) &&
         (N == 1 || s.n % cv == 0) && aligned(ptr, int64_t(cv) * int64_t(sizeof(scalar_t)));
}

/// Labels come in runs of consecutive pixels (NCHW: np, channels-last: pk): one aligned vector
/// each.
inline bool labels_vector_ok(const Plan& p, const void* ptr, const Strides3& s, int64_t N, int64_t elem) {
  const int64_t run = p.cl ? p.pk : p.np;
  const int64_t bytes = run * elem;
  const int64_t al = bytes < 16 ? bytes : 16;
  return run > 1 && s.m == 1 && (N == 1 || (s.n * elem) % al == 0) && aligned(ptr, al);
}

/// Channel-contiguous (channels-last) mapping when the channels of a pixel are adjacent and the
/// pixels are not.
inline bool use_channels_last(const at::Tensor& x) { return x.size(1) > 1 && x.stride(1) == 1 && x.stride(2) != 1; }

/// Programs per image of a persistent grid: at most one wave in all (resident blocks / N, at
/// least 1), and no more programs than block steps.
inline int64_t programs_per_image(int64_t resident, int64_t N, int64_t steps) {
  int64_t b = N >= resident ? 1 : resident / N;
  if (b > steps) b = steps;
  return b < 1 ? 1 : b;
}

/// pixel_norm_kernel (or, with argmax, argmax_kernel) over all C channels of every pixel.
template <typename scalar_t, typename acc_t, typename Backend>
void launch_pixel_norm(Backend& be, bool cl, bool vec, const scalar_t* xp, acc_t* norm, int64_t N, int64_t C,
                       int64_t M, const Strides3& xs, bool argmax = false) {
  constexpr int64_t kVec = 16 / int64_t(sizeof(scalar_t));
  const auto kernel = argmax ? (cl ? &argmax_kernel<scalar_t, acc_t, true> : &argmax_kernel<scalar_t, acc_t, false>)
                             : (cl ? &pixel_norm_kernel<scalar_t, acc_t, true> : &pixel_norm_kernel<scalar_t, acc_t, false>);
  // blocks per image: enough for the image's pixels (a warp each, channels-last) or runs of kVec
  // pixels (a thread each), at most the resident blocks shared among the images of grid.y
  const int64_t per_block = cl ? kWarps : kThreads * kVec;
  const int64_t gy = N < 1 ? 1 : N < kMaxGridY ? N : kMaxGridY;
  const int64_t resident = be.max_programs(reinterpret_cast<const void*>(kernel));
  int64_t gx = (M + per_block - 1) / per_block;
  const int64_t share = resident / gy > 1 ? resident / gy : 1;
  if (gx > share) gx = share;
  if (gx < 1) gx = 1;
  be.launch(kernel, dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), xp, norm, N, C, M, xs, vec);
}

template <typename scalar_t, bool kLabels, typename Backend>
void forward_typed(Backend& be, const at::Tensor& x, const at::Tensor& t, at::Tensor& stats, const DiceOptions& o) {
  using acc_t = acc_type<scalar_t>;
  const int64_t N = x.size(0), Ct = x.size(1), M = x.size(2);
  const Plan plan = make_plan<scalar_t, kLabels>(Ct, use_channels_last(x), kind_of(o));
  const auto kernel = select_forward<scalar_t, kLabels, acc_t>(plan);
  const int64_t steps = (M + plan.pb - 1) / plan.pb;
  const int64_t nprog = programs_per_image(be.max_programs(reinterpret_cast<const void*>(kernel)), N, steps);
  const int64_t rows = o.rows();
  TORCH_CHECK(nprog < (int64_t(1) << 31) && N * rows * Ct < (int64_t(1) << 31),
              "dicetorch: input too large for the CUDA kernel grid");
  const auto acc_opts = x.options().dtype(std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat);
  // per-program partial sums: a few programs per SM in all, so rows * C * (resident blocks) at most
  at::Tensor partial = at::empty({N, rows, Ct, nprog}, acc_opts);
  be.track(x);
  be.track(t);
  be.track(stats);
  be.track(partial);

  Args a{};
  a.N = N;
  a.M = M;
  a.Ct = Ct;
  a.steps = steps;
  a.xs = strides_of(x);
  a.ts = strides_of(t);
  a.gs = a.xs;
  a.G = plan.G;
  a.log2G = plan.log2G;
  a.activation = o.activation;
  a.power = o.power;
  a.has_ignore = o.has_ignore;
  a.ignore_index = o.ignore_index;
  a.rows = o.rows();
  a.pixel_loss = o.pixel_loss;
  a.fg = focal_gamma(o.gamma);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const void* tp = t.const_data_ptr();
  a.x_vec = vector_ok<scalar_t>(plan, xp, a.xs, N, Ct, M);
  a.label_bytes = static_cast<int>(t.element_size());
  a.t_vec = kLabels ? labels_vector_ok(plan, tp, a.ts, N, t.element_size()) : vector_ok<scalar_t>(plan, tp, a.ts, N, Ct, M);

  at::Tensor norm;  // huge C: per-pixel (max, 1/sum) over all channels (softmax), or argmax's channel
  if (plan.chunk < Ct && (o.activation == kSoftmax || o.activation == kArgmax)) {
    norm = at::empty({N, M, 2}, acc_opts);
    be.track(norm);
    launch_pixel_norm<scalar_t, acc_t>(be, plan.cl, a.x_vec, xp, norm.mutable_data_ptr<acc_t>(), N, Ct, M, a.xs,
                                       o.activation == kArgmax);
    a.ext_norm = true;
  }
  const acc_t* normp = norm.defined() ? norm.const_data_ptr<acc_t>() : nullptr;
  const dim3 grid(static_cast<unsigned>(nprog), static_cast<unsigned>(N < kMaxGridY ? N : kMaxGridY));
  for (int64_t c0 = 0; c0 < Ct; c0 += plan.chunk) {
    a.c0 = c0;
    a.C = Ct - c0 < plan.chunk ? Ct - c0 : plan.chunk;
    be.launch(kernel, grid, xp + c0 * a.xs.c, kLabels ? tp : static_cast<const void*>(static_cast<const scalar_t*>(tp) + c0 * a.ts.c), partial.mutable_data_ptr<acc_t>(),
              normp, a);
  }
  be.launch(&reduce_partial_kernel<acc_t>, dim3(static_cast<unsigned>(N * rows * Ct)),
            static_cast<const acc_t*>(partial.const_data_ptr<acc_t>()), stats.mutable_data_ptr<acc_t>(), nprog);
}

template <typename scalar_t, bool kLabels, typename Backend>
void backward_typed(Backend& be, const at::Tensor& grad, const at::Tensor& x, const at::Tensor& t, at::Tensor& gx,
                    const DiceOptions& o) {
  using acc_t = acc_type<scalar_t>;
  const int64_t N = x.size(0), Ct = x.size(1), M = x.size(2);
  const Plan plan = make_plan<scalar_t, kLabels>(Ct, use_channels_last(x), kind_of(o));
  const auto kernel = select_backward<scalar_t, kLabels, acc_t>(plan);
  const int64_t steps = (M + plan.pb - 1) / plan.pb;
  const int64_t nprog = programs_per_image(be.max_programs(reinterpret_cast<const void*>(kernel)), N, steps);
  TORCH_CHECK(nprog < (int64_t(1) << 31), "dicetorch: input too large for the CUDA kernel grid");
  const auto acc_opts = x.options().dtype(std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat);

  Args a{};
  a.N = N;
  a.M = M;
  a.Ct = Ct;
  a.steps = steps;
  a.xs = strides_of(x);
  a.ts = strides_of(t);
  a.gs = strides_of(gx);
  a.G = plan.G;
  a.log2G = plan.log2G;
  a.activation = o.activation;
  a.power = o.power;
  a.has_ignore = o.has_ignore;
  a.ignore_index = o.ignore_index;
  a.rows = o.rows();
  a.pixel_loss = o.pixel_loss;
  a.fg = focal_gamma(o.gamma);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const void* tp = t.const_data_ptr();
  scalar_t* gp = gx.mutable_data_ptr<scalar_t>();
  a.x_vec = vector_ok<scalar_t>(plan, xp, a.xs, N, Ct, M);
  a.label_bytes = static_cast<int>(t.element_size());
  a.t_vec = kLabels ? labels_vector_ok(plan, tp, a.ts, N, t.element_size()) : vector_ok<scalar_t>(plan, tp, a.ts, N, Ct, M);
  a.g_vec = vector_ok<scalar_t>(plan, gp, a.gs, N, Ct, M);
  const acc_t* gradp = grad.const_data_ptr<acc_t>();
  be.track(grad);
  be.track(x);
  be.track(t);
  be.track(gx);
  const dim3 grid(static_cast<unsigned>(nprog), static_cast<unsigned>(N < kMaxGridY ? N : kMaxGridY));
  const auto launch_chunks = [&](const acc_t* normp, acc_t* dotp) {
    for (int64_t c0 = 0; c0 < Ct; c0 += plan.chunk) {
      a.c0 = c0;
      a.C = Ct - c0 < plan.chunk ? Ct - c0 : plan.chunk;
      be.launch(kernel, grid, gradp, xp + c0 * a.xs.c, kLabels ? tp : static_cast<const void*>(static_cast<const scalar_t*>(tp) + c0 * a.ts.c), gp + c0 * a.gs.c, normp,
                dotp, a);
    }
  };
  if (plan.chunk < Ct && o.activation == kSoftmax) {
    // huge C: normaliser pass, then sum_j p_j g_j accumulated chunk by chunk (in chunk order),
    // then the write pass
    at::Tensor norm = at::empty({N, M, 2}, acc_opts);
    at::Tensor dot = at::zeros({N, M}, acc_opts);
    be.track(norm);
    be.track(dot);
    launch_pixel_norm<scalar_t, acc_t>(be, plan.cl, a.x_vec, xp, norm.mutable_data_ptr<acc_t>(), N, Ct, M, a.xs);
    a.ext_norm = true;
    a.dot_pass = true;
    launch_chunks(norm.const_data_ptr<acc_t>(), dot.mutable_data_ptr<acc_t>());
    a.dot_pass = false;
    a.ext_dot = true;
    launch_chunks(norm.const_data_ptr<acc_t>(), dot.mutable_data_ptr<acc_t>());
  } else {
    launch_chunks(nullptr, nullptr);
  }
}

/// What the kernels assume of the options (dice.cpp checks them for the user).
inline void check_activation(const DiceOptions& o, bool backward) {
  TORCH_CHECK(o.activation >= kSoftmax && o.activation <= kThreshold, "dicetorch: unknown activation code");
  TORCH_CHECK(o.pixel_loss == kPixelNone || o.activation == kSoftmax || o.activation == kSigmoid,
              "dicetorch: a pixel loss needs activation softmax or sigmoid");
  TORCH_CHECK(!backward || !is_hard_activation(o.activation), "dicetorch: the hard activations have no backward");
}

template <typename Backend>
void run_forward(Backend& be, const at::Tensor& x, const at::Tensor& t, at::Tensor& stats, const DiceOptions& o) {
  check_activation(o, false);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dicetorch_fused_forward_cuda", [&] {
    if (t.is_floating_point()) {
      forward_typed<scalar_t, false>(be, x, t, stats, o);
    } else {
      forward_typed<scalar_t, true>(be, x, t, stats, o);
    }
  });
}

template <typename Backend>
void run_backward(Backend& be, const at::Tensor& grad, const at::Tensor& x, const at::Tensor& t, at::Tensor& gx,
                  const DiceOptions& o) {
  check_activation(o, true);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dicetorch_fused_backward_cuda", [&] {
    if (t.is_floating_point()) {
      backward_typed<scalar_t, false>(be, grad, x, t, gx, o);
    } else {
      backward_typed<scalar_t, true>(be, grad, x, t, gx, o);
    }
  });
}

}  // namespace
}  // namespace cuda
}  // namespace dicetorch
