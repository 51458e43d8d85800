// The dicetorch::fused_forward / fused_backward operators: schema, argument checks shared by the
// CPU and CUDA kernels, and their registration with the dispatcher.
//
//   fused_forward(x, t, activation, power, ignore_index, pixel_loss="none", gamma=2.0) -> stats
//       stats[:,0] = I = sum_m p*t,  stats[:,1] = P = sum_m p^q,  stats[:,2] = T = sum_m t^q
//       with pixel_loss "ce" / "focal" (compound losses) also stats[:,3] = X = sum_m t*e and
//       stats[:,4] = L = sum_m e for the element term e of the pixel loss (dicetorch/reference.py):
//       stats is (N, 3, C), or (N, 5, C) with a pixel loss
//   fused_forward_codes(same arguments) -> (stats, codes), CPU only: also each pixel's code as one
//       byte (N, M) uint8, read by the backward as its labels with ignore_index = 254
//   fused_backward(grad, x, t, activation, power, ignore_index, pixel_loss, gamma) -> dL/dx, like x
//       g = gI*t + gP*q*p^(q-1);  softmax: p*(g - sum_j p_j g_j);  sigmoid: g*p*(1-p);  none: g
//       plus the pixel loss's gradient with weights w = gX*t + gL; grad is (N, 3 or 5, C)
//
// pixel_loss needs activation "softmax" or "sigmoid" (e is a function of the logits); gamma >= 0 is
// the focal exponent.  Both devices compute the pixel rows in the Dice rows' fused pass, with the
// element math of dice_math.h.
//
// activation: "softmax" | "sigmoid" | "none", or the hard (forward-only) "argmax" | "threshold"
// that make p a 0/1 prediction per pixel (dice_math.h); their backward is refused on both devices.
//
// x is (N, C, M) float (fp16/bf16/fp32/fp64), any strides; t is (N, M) int32/int64/uint8 labels
// or an (N, C, M) float target of x's dtype; p = activation(x) in fp32 (fp64 for fp64 input).
// The Python module dicetorch._C itself is empty: the operators are reached through
// torch.ops.dicetorch.*.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/Dispatch.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <string>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "dice.h"
#include "dice_math.h"

namespace dicetorch {
namespace {

int parse_activation(c10::string_view activation) {
  if (activation == "softmax") return kSoftmax;
  if (activation == "sigmoid") return kSigmoid;
  if (activation == "none") return kNone;
  if (activation == "argmax") return kArgmax;
  if (activation == "threshold") return kThreshold;
  TORCH_CHECK(false, "dicetorch: activation must be 'softmax', 'sigmoid', 'none', 'argmax' or 'threshold', got '",
              std::string(activation), "'");
}

int parse_pixel_loss(c10::string_view pixel_loss) {
  if (pixel_loss == "none") return kPixelNone;
  if (pixel_loss == "ce") return kPixelCE;
  if (pixel_loss == "focal") return kPixelFocal;
  TORCH_CHECK(false, "dicetorch: pixel_loss must be 'none', 'ce' or 'focal', got '", std::string(pixel_loss), "'");
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

/// Checks shared by both devices; returns the validated options.
DiceOptions check(const at::Tensor& x, const at::Tensor& t, c10::string_view activation, int64_t power,
                  std::optional<int64_t> ignore_index, c10::string_view pixel_loss, double gamma) {
  TORCH_CHECK(x.dim() == 3, "dicetorch: input must be (N, C, M), got ", x.dim(), " dims ", x.sizes());
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kDouble || xt == at::kHalf || xt == at::kBFloat16,
              "dicetorch: input must be float16, bfloat16, float32 or float64, got ", xt);
  TORCH_CHECK(x.size(0) > 0 && x.size(1) > 0 && x.size(2) > 0, "dicetorch: input must be non-empty, got ",
              x.sizes());
  TORCH_CHECK(t.device() == x.device(), "dicetorch: target is on ", t.device(), " but input is on ", x.device());
  if (t.is_floating_point()) {
    TORCH_CHECK(t.sizes() == x.sizes(), "dicetorch: a float target must have the input's shape ", x.sizes(),
                ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == xt, "dicetorch: a float target must have the input's dtype ", xt, ", got ",
                t.scalar_type());
    TORCH_CHECK(!ignore_index.has_value(), "dicetorch: ignore_index needs integer label targets");
  } else {
    const auto tt = t.scalar_type();
    TORCH_CHECK(tt == at::kLong || tt == at::kInt || tt == at::kByte,
                "dicetorch: label targets must be int64, int32 or uint8, got ", tt);
    TORCH_CHECK(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(2),
                "dicetorch: label target must be (N, M) = (", x.size(0), ", ", x.size(2), "), got ", t.sizes());
  }
  TORCH_CHECK(power == 1 || power == 2, "dicetorch: power must be 1 or 2, got ", power);
  DiceOptions o;
  o.activation = parse_activation(activation);
  o.power = static_cast<int>(power);
  o.has_ignore = ignore_index.has_value();
  o.ignore_index = ignore_index.value_or(0);
  o.pixel_loss = parse_pixel_loss(pixel_loss);
  TORCH_CHECK(o.pixel_loss == kPixelNone || o.activation == kSoftmax || o.activation == kSigmoid,
              "dicetorch: pixel_loss='", std::string(pixel_loss), "' needs activation 'softmax' or 'sigmoid' ",
              "(the pixel loss is a function of the logits), got activation='", std::string(activation), "'");
  TORCH_CHECK(std::isfinite(gamma) && gamma >= 0.0, "dicetorch: gamma must be a finite number >= 0, got ", gamma);
  o.gamma = gamma;
  return o;
}

/// Hard activations are a step function of the input: there is no backward to compute.
void check_differentiable(const DiceOptions& o) {
  TORCH_CHECK(!is_hard_activation(o.activation), "dicetorch: the hard activation ",
              o.activation == kArgmax ? "'argmax'" : "'threshold'",
              " has no gradient; it is meant for evaluation. Train with 'softmax' or 'sigmoid'.");
}

void check_grad(const at::Tensor& grad, const at::Tensor& x, const DiceOptions& o) {
  TORCH_CHECK(grad.device() == x.device(), "dicetorch: grad is on ", grad.device(), " but input is on ",
              x.device());
  const int64_t rows = o.rows();
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == x.size(0) && grad.size(1) == rows && grad.size(2) == x.size(1),
              "dicetorch: grad must be (N, ", rows, ", C) = (", x.size(0), ", ", rows, ", ", x.size(1), ")",
              o.pixel_loss == kPixelNone ? "" : " with a pixel loss (rows I, P, T, X, L)", ", got ", grad.sizes());
}

/// The input gradient, in x's layout (channels-last stays channels-last) when x is dense.
at::Tensor grad_like(const at::Tensor& x) {
  return x.is_non_overlapping_and_dense() ? at::empty_strided(x.sizes(), x.strides(), x.options())
                                          : at::empty(x.sizes(), x.options());
}

/// Asks Linux for transparent huge pages under a CPU gradient of 4 MiB or more.  glibc serves blocks
/// of 32 MiB or more from fresh mmaps however often they are freed and reallocated (its dynamic mmap
/// threshold stops at 32 MiB), and smaller ones from fresh pages whenever other large frees (a
/// training step's activations) trimmed its heap, so the backward's first write to each 4 KiB page
/// is a page fault: ~0.7 ms per MiB on a 2-vCPU VM, more than the kernel's own time.  With huge pages
/// it is one fault per 2 MiB; on reused pages the advice costs one system call.  Only the 2 MiB-aligned
/// interior is advised; nothing changes where THP is "never".
void advise_huge_pages(const at::Tensor& gx) {
#ifdef __linux__
  constexpr uintptr_t kHuge = uintptr_t{1} << 21, kFresh = uintptr_t{4} << 20;
  const auto begin = reinterpret_cast<uintptr_t>(gx.data_ptr());
  const auto bytes = static_cast<uintptr_t>(gx.nbytes());
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = (begin + bytes) & ~(kHuge - 1);
  if (bytes >= kFresh && hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // advice only
#else
  (void)gx;
#endif
}

// CPU: the copy of the kernel compiled for the best instruction set this CPU (and ATen, which
// honours ATEN_CPU_CAPABILITY) allows.
enum class Cap { kDefault, kAvx2, kAvx512 };

Cap cpu_cap() {
  static const Cap cap = [] {
    const std::string s = at::get_cpu_capability();
    if (s == "AVX512") return Cap::kAvx512;
    if (s == "AVX2") return Cap::kAvx2;
    return Cap::kDefault;
  }();
  return cap;
}

/// The CPU forward in the copy for this CPU's instruction set; save: see forward_codes_cpu.
at::Tensor cpu_forward(const at::Tensor& x, const at::Tensor& t, const DiceOptions& o, uint8_t* save) {
  switch (cpu_cap()) {
#ifdef DICETORCH_CPU_X86
    case Cap::kAvx512: return cpu::AVX512::forward(x, t, o, save);
    case Cap::kAvx2: return cpu::AVX2::forward(x, t, o, save);
#endif
    default: return cpu::DEFAULT::forward(x, t, o, save);
  }
}

at::Tensor forward_cpu(const at::Tensor& x, const at::Tensor& t, c10::string_view activation, int64_t power,
                       std::optional<int64_t> ignore_index, c10::string_view pixel_loss, double gamma) {
  return cpu_forward(x, t, check(x, t, activation, power, ignore_index, pixel_loss, gamma), nullptr);
}

/// The forward of a training step on label targets: the stats, and each pixel's code as one byte
/// (N, M) uint8 (dice_math.h, saved_code) for the backward to read as its labels, with
/// ignore_index = 254.  That backward reads 1 byte per pixel instead of a label (8 with int64: half
/// the bytes of 4-class float32 logits, in a backward bound by memory traffic).
std::tuple<at::Tensor, at::Tensor> forward_codes_cpu(const at::Tensor& x, const at::Tensor& t,
                                                     c10::string_view activation, int64_t power,
                                                     std::optional<int64_t> ignore_index,
                                                     c10::string_view pixel_loss, double gamma) {
  const DiceOptions o = check(x, t, activation, power, ignore_index, pixel_loss, gamma);
  TORCH_CHECK(!t.is_floating_point(), "dicetorch: fused_forward_codes needs integer label targets");
  TORCH_CHECK(x.size(1) >= 2 && x.size(1) <= kMaxSavedClasses,
              "dicetorch: fused_forward_codes needs 2 <= C <= ", kMaxSavedClasses, " channels, got ", x.size(1));
  at::Tensor codes = at::empty({x.size(0), x.size(2)}, t.options().dtype(at::kByte));
  at::Tensor stats = cpu_forward(x, t, o, codes.mutable_data_ptr<uint8_t>());
  return {stats, codes};
}

at::Tensor backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& t,
                        c10::string_view activation, int64_t power, std::optional<int64_t> ignore_index,
                        c10::string_view pixel_loss, double gamma) {
  const DiceOptions o = check(x, t, activation, power, ignore_index, pixel_loss, gamma);
  check_differentiable(o);
  check_grad(grad, x, o);
  const at::Tensor g = grad.to(acc_dtype(x.scalar_type())).contiguous();
  at::Tensor gx = grad_like(x);
  advise_huge_pages(gx);
  switch (cpu_cap()) {
#ifdef DICETORCH_CPU_X86
    case Cap::kAvx512: cpu::AVX512::backward(g, x, t, gx, o); break;
    case Cap::kAvx2: cpu::AVX2::backward(g, x, t, gx, o); break;
#endif
    default: cpu::DEFAULT::backward(g, x, t, gx, o);
  }
  return gx;
}

#ifdef DICETORCH_WITH_CUDA
at::Tensor forward_cuda(const at::Tensor& x, const at::Tensor& t, c10::string_view activation, int64_t power,
                        std::optional<int64_t> ignore_index, c10::string_view pixel_loss, double gamma) {
  const DiceOptions o = check(x, t, activation, power, ignore_index, pixel_loss, gamma);
  at::Tensor stats = at::empty({x.size(0), o.rows(), x.size(1)}, x.options().dtype(acc_dtype(x.scalar_type())));
  cuda::forward(x, t, stats, o);
  return stats;
}

at::Tensor backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& t,
                         c10::string_view activation, int64_t power, std::optional<int64_t> ignore_index,
                         c10::string_view pixel_loss, double gamma) {
  const DiceOptions o = check(x, t, activation, power, ignore_index, pixel_loss, gamma);
  check_differentiable(o);
  check_grad(grad, x, o);
  const at::Tensor g = grad.to(acc_dtype(x.scalar_type())).contiguous();
  at::Tensor gx = grad_like(x);
  cuda::backward(g, x, t, gx, o);
  return gx;
}
#endif

/// Row-wise online softmax normaliser (m, s) of a 2-D float32/float64 tensor, computed with the
/// dice_math.h update the CUDA kernels use: exposes that shared math to the CPU test suite.
at::Tensor softmax_normaliser_cpu(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() == 2, "dicetorch: _softmax_normaliser expects a 2-D tensor, got ", x_in.sizes());
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty({x.size(0), 2}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dicetorch_softmax_normaliser", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    for (int64_t r = 0; r < x.size(0); ++r) {
      scalar_t m = -std::numeric_limits<scalar_t>::infinity(), s = 0;
      for (int64_t k = 0; k < x.size(1); ++k) {
        online_softmax_update(m, s, xp[r * x.size(1) + k], [](scalar_t v) { return std::exp(v); });
      }
      op[2 * r] = m;
      op[2 * r + 1] = s;
    }
  });
  return out;
}

/// The same normaliser with each row's channels dealt round-robin to `lanes` lanes (a power of two),
/// each lane running the online update over its channels, then the lanes combined by the xor
/// butterfly of online_softmax_merge that the CUDA kernels run across warp lanes: exposes the merge
/// to the CPU test suite.  Returns lane 0's (m, s) per row.
at::Tensor softmax_normaliser_lanes_cpu(const at::Tensor& x_in, int64_t lanes) {
  TORCH_CHECK(x_in.dim() == 2, "dicetorch: _softmax_normaliser_lanes expects a 2-D tensor, got ", x_in.sizes());
  TORCH_CHECK(lanes >= 1 && lanes <= 1024 && (lanes & (lanes - 1)) == 0,
              "dicetorch: lanes must be a power of two in [1, 1024], got ", lanes);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty({x.size(0), 2}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dicetorch_softmax_normaliser_lanes", [&] {
    const auto ex = [](scalar_t v) { return std::exp(v); };
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    std::vector<scalar_t> m(lanes), s(lanes), m2(lanes), s2(lanes);
    for (int64_t r = 0; r < x.size(0); ++r) {
      std::fill(m.begin(), m.end(), -std::numeric_limits<scalar_t>::infinity());
      std::fill(s.begin(), s.end(), scalar_t(0));
      for (int64_t k = 0; k < x.size(1); ++k) online_softmax_update(m[k % lanes], s[k % lanes], xp[r * x.size(1) + k], ex);
      for (int64_t off = 1; off < lanes; off *= 2) {  // every lane merges with lane ^ off, at once
        for (int64_t l = 0; l < lanes; ++l) {
          m2[l] = m[l];
          s2[l] = s[l];
          online_softmax_merge(m2[l], s2[l], m[l ^ off], s[l ^ off], ex);
        }
        m.swap(m2);
        s.swap(s2);
      }
      op[2 * r] = m[0];
      op[2 * r + 1] = s[0];
    }
  });
  return out;
}

}  // namespace

// A fragment, so that it coexists with the Python-defined dicetorch::dice_stats operators.
TORCH_LIBRARY_FRAGMENT(dicetorch, m) {
  m.def(
      "fused_forward(Tensor input, Tensor target, str activation, int power, int? ignore_index, "
      "str pixel_loss=\"none\", float gamma=2.0) -> Tensor");
  m.def(
      "fused_backward(Tensor grad, Tensor input, Tensor target, str activation, int power, int? ignore_index, "
      "str pixel_loss=\"none\", float gamma=2.0) -> Tensor");
  m.def(
      "fused_forward_codes(Tensor input, Tensor target, str activation, int power, int? ignore_index, "
      "str pixel_loss=\"none\", float gamma=2.0) -> (Tensor, Tensor)");
  m.def("_softmax_normaliser(Tensor x) -> Tensor");
  m.def("_softmax_normaliser_lanes(Tensor x, int lanes) -> Tensor");
}

TORCH_LIBRARY_IMPL(dicetorch, CPU, m) {
  m.impl("fused_forward", &forward_cpu);
  m.impl("fused_backward", &backward_cpu);
  m.impl("fused_forward_codes", &forward_codes_cpu);
  m.impl("_softmax_normaliser", &softmax_normaliser_cpu);
  m.impl("_softmax_normaliser_lanes", &softmax_normaliser_lanes_cpu);
}

#ifdef DICETORCH_WITH_CUDA
TORCH_LIBRARY_IMPL(dicetorch, CUDA, m) {
  m.impl("fused_forward", &forward_cuda);
  m.impl("fused_backward", &backward_cuda);
}
#endif

}  // namespace dicetorch

// dicetorch._C is an empty Python module: importing it runs the registrations above.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
