// Fused CUDA kernels of dicetorch::fused_forward / fused_backward.  Device code and launch planning:
// dice_kernels.cuh (shared with the CPU emulation test, tests/cuda_emu); this file supplies the
// CUDA launches (current stream, grids sized from occupancy) and the ATen entry points.
//
// Algorithm.  A pixel's channels are handled by a group of G lanes (G a power of two), each lane
// holding NCH channel slots of the group's pixels in registers: C <= G * NCH.  For C <= max_slots
// (dice_kernels.cuh: 8 for channels-last and for NCHW fp32 with labels; 4 for fp64, NCHW fp32 with a
// float target and NCHW fp16/bf16 with labels; 2 for NCHW fp16/bf16 with a float target) G = 1: one
// thread holds every channel of its pixels.  Up to C = 32 * max_slots a group lies within one warp:
// the per-pixel reductions (channel max, channel sum, and in the backward sum_j p_j g_j) are xor
// shuffles, with no shared memory and no barrier.  Above that a group spans 2 to 8 warps and the
// reductions finish through shared memory ("wide" kernels).  Per block step, a thread issues its
// target loads, then its logits loads, then does the math, so no two memory round trips serialize.
//
//   NCHW input: a group owns NP consecutive pixels (one 128-bit vector: 4 fp32, 8 fp16/bf16, 2 fp64);
//     lane g loads channel g + G*c of them, c < NCH, as one 128-bit load per slot: a warp's load is
//     whole 128-byte lines of 32/G channel rows.
//   channels-last input (stride_c == 1): lane g of a group loads channel vectors
//     (g + G*b)*CV .. +CV of its pixels (CV = min(NCH, 128 bits)), consecutive lanes on consecutive
//     vectors then consecutive pixels: contiguous 128-bit loads and stores when C * element size is a
//     multiple of 16 bytes; otherwise coalesced scalar accesses.  Pixels narrower than 16 bytes
//     (NCH * element size < 16: fp32 C = 2, fp16/bf16 C = 2 and 4; slots {2, 4, 8} as for NCHW) are
//     packed: one thread's 128-bit vector holds PK = 16 / (NCH * element size) consecutive pixels of
//     exactly C == NCH channels, consecutive threads on consecutive vectors (labels: one vector load
//     per run of PK pixels).  So every channels-last input whose pixels make whole 16-byte groups (C a
//     power of two <= 16, or C * element size a multiple of 16) moves in 128-bit accesses.
//   Any other strides: the NCHW mapping with scalar accesses.  Misaligned pointers or strides fall
//     back to scalar accesses (host-checked flags, vector_ok), as does a packed vector that would
//     cross the end of an image.  Vector stores are single st.global.v4/v2 instructions (inline PTX:
//     nvcc splits a plain uint4 store into four 32-bit ones).
//
// Forward.  Softmax normaliser once per pixel: max over the group (fmax, then shuffles), e = exp(x -
// max) kept in the registers that held x (one exp per element), sum over the group, p = e / sum.
// Each lane adds p*t, p^q and t^q of its NCH classes into 3*NCH register accumulators that persist
// over the program's block steps.  The grid is persistent: (programs per image) x (images), at
// most one wave of resident blocks (cudaOccupancyMaxActiveBlocksPerMultiprocessor x SMs, cached per
// kernel and device), each program walking block steps b, b + programs, ...  The register budget is
// set by __launch_bounds__: 2 blocks of 256 threads per SM (1 for fp64); 3 for the channels-last
// kernels with 8 slots and labels (at most 80 registers: 37.5 % occupancy and 36 KiB of loads in
// flight per SM with fp16/bf16, where the forward took 92 registers on sm_80/90 and the backward
// 110 on sm_100/120, 25 % and 24 KiB).  At the end of an image a program reduces its
// accumulators over the block in a fixed order (xor shuffles, then warps in order) and writes
// partial[n, which, k, program]; reduce_partial_kernel adds a row's programs in a fixed order.  No
// float atomics: the result is deterministic.
// Backward.  The same tiles: one read of x (and labels/target), normaliser once per pixel, one exp
// per element kept in registers, g = dL/dp recomputed from registers, sum_j p_j g_j once per pixel
// (group reduction), one write of dL/dx.
// Huge C (more than 256 * NCH channels): pixel_norm_kernel first computes each pixel's (max, 1/sum)
// with the online update (dice_math.h; one exp per element; 128-bit loads: NCHW, a thread per run of
// one vector of pixels; channels-last, a warp per pixel, lanes on channel vectors), then the wide
// kernel runs once per chunk of channels with that normaliser (a second exp per element); the
// backward adds one chunked pass that accumulates sum_j p_j g_j per pixel in chunk order.
//
// Compound losses (pixel_loss "ce" / "focal", stats (N, 5, C)): kernels of their own kind (template
// kKind, dice_kernels.cuh), so the Dice-only kernels are untouched.  The same tiles and the same
// exps: softmax keeps d = z - max next to e = exp(d) and reduces, besides max and sum, s - 1 without
// the maximum's 1 (sm1) over the group, so -log p = log1p(sm1) - d takes one log per pixel and keeps
// its digits when p rounds to 1; sigmoid gets softplus(z) from the e = exp(-z) of its p.  The element
// terms and gradients are dice_math.h's (the CPU kernel's formulas): each slot adds two more
// accumulators (X = sum t e, L = sum e), reduced in the same fixed order as I, P, T; the backward
// reads the 5 grad rows and adds the pixel loss's gradient with w = gX t + gL (softmax: its h_k joins
// sum_j p_j g_j in the one group reduction).  The focal power takes products / a sqrt for whole and
// half-whole gamma and pow otherwise; a soft (non-0/1) target of the sigmoid focal loss takes one more
// exp per element.  Tiles of at most 16 values (NCHW 2 slots, channels-last 4; fp64 4), so the
// extra registers do not spill under the Dice kernels' budget (channels-last fp16/bf16 with C > 4
// therefore moves 64-bit vectors of 4 channels, not 128-bit ones).  With
// huge C the normaliser pass gives 1/s only, so sm1 = 1/(1/s) - 1 there (a rounded 1 - p on
// confident pixels; the chunked backward accumulates sum_j (p_j g_j + h_j) chunk by chunk).
// Hard activations (argmax / threshold, forward only): kernels of a third kind.  threshold is x > 0
// per element; argmax is two group reductions (the NaN-propagating maximum, then the lowest channel
// that holds it: torch.argmax's ties and NaN), and with huge C argmax_kernel first finds each
// pixel's channel over all channels (the layout of pixel_norm_kernel).
//
// Semantics: NaN in -> NaN out (a NaN logit makes its pixel's sum NaN); leading -inf channels are
// finite (max is taken first, so -inf - -inf only happens when every channel is -inf, which is NaN
// in torch.softmax too); ignored pixels are selected away (exactly 0 in every sum and gradient);
// labels are compared with channel indices, never used as addresses; int64 offsets; fp32
// accumulation (fp64 for fp64).  No host synchronization: capturable in a CUDA graph.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <mutex>
#include <unordered_map>
#include <utility>

#include "../dice.h"
#include "../dice_math.h"
#include "dice_kernels.cuh"

namespace dicetorch {
namespace cuda {
namespace {

struct PairHash {
  size_t operator()(const std::pair<const void*, int>& k) const {
    return std::hash<const void*>()(k.first) ^ (std::hash<int>()(k.second) * 0x9e3779b97f4a7c15ull);
  }
};

/// Launches on the current stream of x's device; grids sized from occupancy.
struct CudaBackend {
  int device;
  cudaStream_t stream;

  /// Resident blocks of `kernel` on the whole device (blocks per SM from its registers and shared
  /// memory, times SMs), cached per kernel and device: no runtime query after the first call.
  int64_t max_programs(const void* kernel) {
    static std::mutex mu;
    static std::unordered_map<std::pair<const void*, int>, int64_t, PairHash> cache;
    const std::lock_guard<std::mutex> lock(mu);
    const auto key = std::make_pair(kernel, device);
    const auto it = cache.find(key);
    if (it != cache.end()) return it->second;
    int per_sm = 0, sms = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    const int64_t v = int64_t(per_sm < 1 ? 1 : per_sm) * int64_t(sms < 1 ? 1 : sms);
    cache.emplace(key, v);
    return v;
  }

  void track(const at::Tensor&) {}

  template <typename... KArgs, typename... A>
  void launch(void (*kernel)(KArgs...), dim3 grid, A&&... args) {
    kernel<<<grid, kThreads, 0, stream>>>(std::forward<A>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

CudaBackend backend_for(const at::Tensor& x) {
  return CudaBackend{x.get_device(), c10::cuda::getCurrentCUDAStream(x.get_device()).stream()};
}

}  // namespace

void forward(const at::Tensor& x, const at::Tensor& t, at::Tensor& stats, const DiceOptions& o) {
  const c10::cuda::CUDAGuard guard(x.device());
  CudaBackend be = backend_for(x);
  run_forward(be, x, t, stats, o);
}

void backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& t, at::Tensor& grad_x,
              const DiceOptions& o) {
  const c10::cuda::CUDAGuard guard(x.device());
  CudaBackend be = backend_for(x);
  run_backward(be, grad, x, t, grad_x, o);
}

}  // namespace cuda
}  // namespace dicetorch
