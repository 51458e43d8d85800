// The AVX2 copy of the CPU kernel: setup.py compiles this file with the AVX2 instruction set
// and -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2, so the vector types (at::vec::AVX2) and the
// kernels (dicetorch::cpu::AVX2) are distinct from the portable copy; dice.cpp picks one at run
// time.  Without those flags (other architectures) it forwards to the portable kernel.
#if defined(CPU_CAPABILITY_AVX2)
#include "dice_cpu.cpp"
#else
#include "../dice.h"
namespace dicetorch::cpu::AVX2 {
at::Tensor forward(const at::Tensor& x, const at::Tensor& t, const DiceOptions& o, uint8_t* save) {
  return DEFAULT::forward(x, t, o, save);
}
void backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& t, at::Tensor& grad_x,
              const DiceOptions& o) {
  DEFAULT::backward(grad, x, t, grad_x, o);
}
}  // namespace dicetorch::cpu::AVX2
#endif
