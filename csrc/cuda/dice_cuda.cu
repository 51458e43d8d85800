// Fused CUDA kernels of dicetorch::fused_forward / fused_backward (the algorithm of the CPU kernel).
//
// Forward, stage 1: block b of image n owns the fixed pixel range [b*kCudaChunk, (b+1)*kCudaChunk)
// (kCudaPixelsPerThread pixels per thread, consecutive threads on consecutive pixels so that
// pixel-contiguous loads coalesce).  The classes are walked kCudaClassTile at a time (half that
// in fp64): for each of its pixels a thread computes the softmax normaliser (online max/sum, one
// exp per element) and adds p*t, p^q and t^q of the tile's classes into register accumulators;
// a fixed-order block reduction (warp shuffles, then warps in order) writes the block's partial
// sums to partial[n, 3C, block].
// Stage 2: one block per (n, j) adds the partials of its row in a fixed order (strided per thread,
// then a fixed tree).  No float atomics: the result is deterministic.
// Backward: one thread per pixel, one pass over the classes for the softmax normaliser, one for
// sum_j p_j g_j (softmax only), one that writes dL/dx.  Offsets are int64 throughout.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "../dice.h"
#include "../dice_math.h"

namespace dicetorch {
namespace cuda {
namespace {

template <typename acc_t>
struct Exp {
  __device__ __forceinline__ acc_t operator()(acc_t v) const { return exp(v); }
};
template <>
struct Exp<float> {
  __device__ __forceinline__ float operator()(float v) const { return __expf(v); }
};

// Strides of an (N, C, M) operand (labels: (N, M) with sC = 0).
struct Strides {
  int64_t n, c, m;
};

template <typename acc_t>
__device__ __forceinline__ acc_t activate(acc_t x, int activation, acc_t mx, acc_t inv) {
  const Exp<acc_t> ex;
  if (activation == kSoftmax) return ex(x - mx) * inv;
  if (activation == kSigmoid) return sigmoid_from_exp(ex(-x));
  return x;
}

/// Softmax normaliser of one pixel: max over channels and 1 / sum_k exp(x_k - max).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void softmax_norm(const scalar_t* __restrict__ xp, int64_t C, int64_t sc, acc_t& mx,
                                             acc_t& inv) {
  acc_t m = -INFINITY, s = 0;
  for (int64_t k = 0; k < C; ++k) online_softmax_update(m, s, static_cast<acc_t>(xp[k * sc]), Exp<acc_t>());
  mx = m;
  inv = acc_t(1) / s;
}

template <typename scalar_t, typename tgt_t, bool kLabels, typename acc_t>
__global__ void __launch_bounds__(kCudaThreads)
    forward_partial_kernel(const scalar_t* __restrict__ x, const tgt_t* __restrict__ t, acc_t* __restrict__ partial,
                           int64_t N, int64_t C, int64_t M, int64_t nblocks, Strides xs, Strides ts,
                           int activation, int power, bool has_ignore, int64_t ignore_index) {
  // fp64 accumulators take two registers each: half the class tile keeps them spill-free
  constexpr int P = kCudaPixelsPerThread, KC = sizeof(acc_t) == 8 ? kCudaClassTile / 2 : kCudaClassTile;
  constexpr int WARPS = kCudaThreads / 32;
  __shared__ acc_t smem[WARPS][3 * KC];
  const int64_t blk = blockIdx.x;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  // images on grid.y (looping when N > 65535); no 64-bit division, which would be a call
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    const scalar_t* xn = x + n * xs.n;
    const tgt_t* tn = t + n * ts.n;

    // pixel i of this thread: m0 + i * kCudaThreads
    const int64_t m0 = blk * kCudaChunk + threadIdx.x;
    for (int64_t c0 = 0; c0 < C; c0 += KC) {
      acc_t a[3 * KC];  // I, P, T of classes c0 .. c0+KC-1
#pragma unroll
      for (int j = 0; j < 3 * KC; ++j) a[j] = 0;
      // Not unrolled: keeps the kernel small and spill-free.  With C > KC the label and the softmax
      // normaliser are recomputed per class tile (re-reads that hit the cache).
#pragma unroll 1
      for (int i = 0; i < P; ++i) {
        const int64_t m = m0 + i * kCudaThreads;
        if (m >= M) break;
        int code = 0;
        if constexpr (kLabels) code = label_code(tn[m * ts.m], C, has_ignore, ignore_index);
        if (code == kIgnored) continue;
        acc_t mx = 0, inv = 1;
        if (activation == kSoftmax) softmax_norm(xn + m * xs.m, C, xs.c, mx, inv);
#pragma unroll
        for (int kk = 0; kk < KC; ++kk) {
          const int64_t k = c0 + kk;
          if (k < C) {
            const acc_t p = activate(static_cast<acc_t>(xn[k * xs.c + m * xs.m]), activation, mx, inv);
            acc_t tk;
            if constexpr (kLabels) {
              tk = code == k ? acc_t(1) : acc_t(0);
            } else {
              tk = static_cast<acc_t>(tn[k * ts.c + m * ts.m]);
            }
            a[kk] += p * tk;
            a[KC + kk] += pow_q(p, power);
            a[2 * KC + kk] += pow_q(tk, power);
          }
        }
      }
      // fixed-order block reduction: lanes by shuffle tree, then warps in order
#pragma unroll
      for (int j = 0; j < 3 * KC; ++j) {
        acc_t v = a[j];
#pragma unroll
        for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
        if (lane == 0) smem[warp][j] = v;
      }
      __syncthreads();
      if (threadIdx.x < 3 * KC) {
        const int j = threadIdx.x, which = j / KC, kk = j % KC;
        const int64_t k = c0 + kk;
        if (k < C) {
          acc_t v = 0;
          for (int w = 0; w < WARPS; ++w) v += smem[w][j];
          partial[((n * 3 + which) * C + k) * nblocks + blk] = v;
        }
      }
      __syncthreads();
    }
  }  // images
}

template <typename acc_t>
__global__ void __launch_bounds__(kCudaThreads)
    reduce_partial_kernel(const acc_t* __restrict__ partial, acc_t* __restrict__ stats, int64_t nblocks) {
  __shared__ acc_t smem[kCudaThreads];
  const int64_t row = blockIdx.x;
  acc_t v = 0;
  for (int64_t b = threadIdx.x; b < nblocks; b += kCudaThreads) v += partial[row * nblocks + b];
  smem[threadIdx.x] = v;
  __syncthreads();
  for (int s = kCudaThreads / 2; s > 0; s /= 2) {
    if (threadIdx.x < s) smem[threadIdx.x] += smem[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) stats[row] = smem[0];
}

// (kCudaThreads, 1): lets ptxas use the registers it needs (fp64 spilled under its default target)
template <typename scalar_t, typename tgt_t, bool kLabels, typename acc_t>
__global__ void __launch_bounds__(kCudaThreads, 1)
    backward_kernel(const acc_t* __restrict__ grad, const scalar_t* __restrict__ x, const tgt_t* __restrict__ t,
                    scalar_t* __restrict__ gx, int64_t N, int64_t C, int64_t M, Strides xs, Strides ts, Strides gs,
                    int activation, int power, bool has_ignore, int64_t ignore_index) {
  // pixels on grid.x, images on grid.y (both grid-strided): no 64-bit division, which would be a call
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y)
  for (int64_t m = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; m < M; m += step) {
    const scalar_t* xp = x + n * xs.n + m * xs.m;
    const tgt_t* tp = t + n * ts.n + m * ts.m;
    scalar_t* op = gx + n * gs.n + m * gs.m;
    const acc_t* g_i = grad + n * 3 * C;
    const acc_t* g_p = g_i + C;
    int code = 0;
    if constexpr (kLabels) code = label_code(tp[0], C, has_ignore, ignore_index);
    if (code == kIgnored) {
      for (int64_t k = 0; k < C; ++k) op[k * gs.c] = static_cast<scalar_t>(acc_t(0));
      continue;
    }
    acc_t mx = 0, inv = 1, dot = 0;
    if (activation == kSoftmax) {
      softmax_norm(xp, C, xs.c, mx, inv);
      for (int64_t k = 0; k < C; ++k) {
        const acc_t p = activate(static_cast<acc_t>(xp[k * xs.c]), activation, mx, inv);
        const acc_t tk = kLabels ? acc_t(code == k) : static_cast<acc_t>(tp[k * ts.c]);
        dot += p * grad_p(g_i[k], g_p[k], tk, p, power);
      }
    }
    for (int64_t k = 0; k < C; ++k) {
      const acc_t p = activate(static_cast<acc_t>(xp[k * xs.c]), activation, mx, inv);
      const acc_t tk = kLabels ? acc_t(code == k) : static_cast<acc_t>(tp[k * ts.c]);
      const acc_t g = grad_p(g_i[k], g_p[k], tk, p, power);
      acc_t dz = g;
      if (activation == kSoftmax) {
        dz = softmax_dz(p, g, dot);
      } else if (activation == kSigmoid) {
        dz = sigmoid_dz(p, g);
      }
      op[k * gs.c] = static_cast<scalar_t>(dz);
    }
  }
}

Strides strides_of(const at::Tensor& a) {
  if (a.dim() == 2) return {a.stride(0), 0, a.stride(1)};
  return {a.stride(0), a.stride(1), a.stride(2)};
}

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename scalar_t, typename tgt_t, bool kLabels>
void launch_forward(const at::Tensor& x, const at::Tensor& t, const at::Tensor& partial, at::Tensor& stats,
                    const DiceOptions& o, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), M = x.size(2), nblocks = partial.size(2);
  acc_t* part = partial.mutable_data_ptr<acc_t>();
  const dim3 grid(static_cast<unsigned>(nblocks), static_cast<unsigned>(std::min<int64_t>(N, 65535)));
  forward_partial_kernel<scalar_t, tgt_t, kLabels, acc_t><<<grid, kCudaThreads, 0, stream>>>(
      x.const_data_ptr<scalar_t>(), t.const_data_ptr<tgt_t>(), part, N, C, M, nblocks, strides_of(x), strides_of(t),
      o.activation, o.power, o.has_ignore, o.ignore_index);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  reduce_partial_kernel<acc_t><<<N * 3 * C, kCudaThreads, 0, stream>>>(part, stats.mutable_data_ptr<acc_t>(), nblocks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename tgt_t, bool kLabels>
void launch_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& t, at::Tensor& gx,
                     const DiceOptions& o, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), M = x.size(2);
  const int64_t bx = std::min<int64_t>((M + kCudaThreads - 1) / kCudaThreads, int64_t(1) << 20);
  const dim3 grid(static_cast<unsigned>(bx), static_cast<unsigned>(std::min<int64_t>(N, 65535)));
  backward_kernel<scalar_t, tgt_t, kLabels, acc_t><<<grid, kCudaThreads, 0, stream>>>(
      grad.const_data_ptr<acc_t>(), x.const_data_ptr<scalar_t>(), t.const_data_ptr<tgt_t>(),
      gx.mutable_data_ptr<scalar_t>(), N, C, M, strides_of(x), strides_of(t), strides_of(gx), o.activation, o.power,
      o.has_ignore, o.ignore_index);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void forward(const at::Tensor& x, const at::Tensor& t, const at::Tensor& partial, at::Tensor& stats,
             const DiceOptions& o) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), C = x.size(1), nblocks = partial.size(2);
  TORCH_CHECK(nblocks < (int64_t(1) << 31) && N * 3 * C < (int64_t(1) << 31),
              "dicetorch: input too large for the CUDA kernel grid");
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dicetorch_fused_forward_cuda", [&] {
    DICE_DISPATCH_TARGET(t, launch_forward, x, t, partial, stats, o, stream);
  });
}

void backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& t, at::Tensor& grad_x,
              const DiceOptions& o) {
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dicetorch_fused_backward_cuda", [&] {
    DICE_DISPATCH_TARGET(t, launch_backward, grad, x, t, grad_x, o, stream);
  });
}

}  // namespace cuda
}  // namespace dicetorch
