// Host-side declarations shared by the operator (dice.cpp) and the device kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace dicetorch {

/// Options of one call, already validated by dice.cpp.
struct DiceOptions {
  int activation;        // Activation code (dice_math.h)
  int power;             // q in {1, 2}
  bool has_ignore;       // ignore_index given
  int64_t ignore_index;  // label value to ignore (when has_ignore)
  int pixel_loss = 0;    // PixelLoss code (dice_math.h): 0 none (3 rows), ce / focal (5 rows)
  double gamma = 2.0;    // focal exponent (pixel_loss focal), >= 0

  int rows() const { return pixel_loss == 0 ? 3 : 5; }
};

namespace cpu {
// stats (N, o.rows(), C); grad (N, o.rows(), C) contiguous in the accumulation dtype; grad_x is
// allocated by the caller, like x.
// Implemented once per CPU capability (csrc/cpu/dice_cpu*.cpp, namespaces DEFAULT/AVX2/AVX512).
#define DICETORCH_DECLARE_CPU(CAP)                                                              \
  namespace CAP {                                                                               \
  at::Tensor forward(const at::Tensor& x, const at::Tensor& t, const DiceOptions& o,            \
                     uint8_t* save = nullptr);                                                   \
  void backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& t, at::Tensor& grad_x, \
                const DiceOptions& o);                                                          \
  }
DICETORCH_DECLARE_CPU(DEFAULT)
DICETORCH_DECLARE_CPU(AVX2)
DICETORCH_DECLARE_CPU(AVX512)
#undef DICETORCH_DECLARE_CPU
}  // namespace cpu

#ifdef DICETORCH_WITH_CUDA
namespace cuda {
// csrc/cuda/dice_cuda.cu: stats (N, o.rows(), C) and grad_x are allocated by the caller (grad is
// (N, o.rows(), C) contiguous in the accumulation dtype); the kernels' own scratch (per-program
// partial sums, sized from the device's occupancy) is allocated inside.
void forward(const at::Tensor& x, const at::Tensor& t, at::Tensor& stats, const DiceOptions& o);
void backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& t, at::Tensor& grad_x,
              const DiceOptions& o);
}  // namespace cuda
#endif

}  // namespace dicetorch
