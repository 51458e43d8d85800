// The CUDA kernels of csrc/cuda/dice_kernels.cuh run by the CPU emulation of emu_cuda.h, behind
// the same host orchestration (launch plan, grids, chunking) as dice_cuda.cu.  Built and driven by
// tests/test_cuda_emulation.py.
#include "emu_cuda.h"

#include <torch/extension.h>

#include <map>
#include <tuple>
#include <type_traits>

#include "../../csrc/cuda/dice_kernels.cuh"

namespace {

struct EmuBackend {
  int64_t resident;  // resident blocks of the "device" (what occupancy x SMs would give)

  int64_t max_programs(const void*) { return resident; }

  void track(const at::Tensor& t) {
    if (t.defined() && t.numel() > 0) {
      // the whole storage: views may start before or end after their own elements
      const auto& st = t.storage();
      emu::memory().add(st.data(), st.nbytes(), "tensor");
    }
  }

  template <typename... KArgs, typename... A>
  void launch(void (*kernel)(KArgs...), dim3 grid, A&&... args) {
    std::tuple<std::decay_t<KArgs>...> tup(std::forward<A>(args)...);
    emu::run_grid(grid, [&]() { std::apply(kernel, tup); });
  }
};

dicetorch::DiceOptions options(const std::string& activation, int64_t power, std::optional<int64_t> ignore_index,
                               const std::string& pixel_loss, double gamma) {
  dicetorch::DiceOptions o;
  if (activation == "softmax") {
    o.activation = dicetorch::kSoftmax;
  } else if (activation == "sigmoid") {
    o.activation = dicetorch::kSigmoid;
  } else if (activation == "none") {
    o.activation = dicetorch::kNone;
  } else if (activation == "argmax") {
    o.activation = dicetorch::kArgmax;
  } else {
    TORCH_CHECK(activation == "threshold", "emu: unknown activation ", activation);
    o.activation = dicetorch::kThreshold;
  }
  o.power = static_cast<int>(power);
  o.has_ignore = ignore_index.has_value();
  o.ignore_index = ignore_index.value_or(0);
  TORCH_CHECK(pixel_loss == "none" || pixel_loss == "ce" || pixel_loss == "focal", "emu: unknown pixel loss");
  o.pixel_loss = pixel_loss == "none" ? dicetorch::kPixelNone
                 : pixel_loss == "ce" ? dicetorch::kPixelCE
                                      : dicetorch::kPixelFocal;
  o.gamma = gamma;
  return o;
}

at::Tensor forward(const at::Tensor& x, const at::Tensor& t, const std::string& activation, int64_t power,
                   std::optional<int64_t> ignore_index, int64_t resident, const std::string& pixel_loss,
                   double gamma) {
  emu::memory().ranges.clear();
  const auto o = options(activation, power, ignore_index, pixel_loss, gamma);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor stats = at::empty({x.size(0), o.rows(), x.size(1)}, x.options().dtype(acc));
  EmuBackend be{resident};
  dicetorch::cuda::run_forward(be, x, t, stats, o);
  return stats;
}

at::Tensor backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& t, const std::string& activation,
                    int64_t power, std::optional<int64_t> ignore_index, int64_t resident,
                    const std::string& pixel_loss, double gamma) {
  emu::memory().ranges.clear();
  const auto o = options(activation, power, ignore_index, pixel_loss, gamma);
  TORCH_CHECK(grad.dim() == 3 && grad.size(1) == o.rows() && grad.is_contiguous(), "emu: grad must be (N, rows, C)");
  at::Tensor gx = x.is_non_overlapping_and_dense() ? at::empty_strided(x.sizes(), x.strides(), x.options())
                                                   : at::empty(x.sizes(), x.options());
  EmuBackend be{resident};
  dicetorch::cuda::run_backward(be, grad, x, t, gx, o);
  return gx;
}

/// The launch plan of the kernels for C channels (what the emulation exercises); kind: 0 Dice rows,
/// 1 with pixel-loss rows, 2 hard activation.
std::tuple<bool, bool, int64_t, int64_t, int64_t, int64_t> plan(const at::Tensor& x, const at::Tensor& t,
                                                                int64_t kind) {
  std::tuple<bool, bool, int64_t, int64_t, int64_t, int64_t> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "plan", [&] {
    const bool cl = dicetorch::cuda::use_channels_last(x);
    const int k = static_cast<int>(kind);
    const auto p = t.is_floating_point() ? dicetorch::cuda::make_plan<scalar_t, false>(x.size(1), cl, k)
                                         : dicetorch::cuda::make_plan<scalar_t, true>(x.size(1), cl, k);
    out = std::make_tuple(p.cl, p.wide, int64_t(p.nch), int64_t(p.G), int64_t(p.chunk), p.pb);
  });
  return out;
}

/// Global accesses of the last forward/backward to the buffer of tensor t, by width in bytes:
/// ({bytes: loads}, {bytes: stores}).
std::tuple<std::map<int64_t, int64_t>, std::map<int64_t, int64_t>> accesses(const at::Tensor& t) {
  std::map<int64_t, int64_t> loads, stores;
  const auto begin = reinterpret_cast<uintptr_t>(t.storage().data());
  for (const auto& r : emu::memory().ranges) {
    if (r.begin != begin) continue;
    for (int b = 0; b <= 16; ++b) {
      if (r.loads[b]) loads[b] += static_cast<int64_t>(r.loads[b]);
      if (r.stores[b]) stores[b] += static_cast<int64_t>(r.stores[b]);
    }
    break;
  }
  return std::make_tuple(loads, stores);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, py::arg("x"), py::arg("t"), py::arg("activation"), py::arg("power"),
        py::arg("ignore_index"), py::arg("resident"), py::arg("pixel_loss") = "none", py::arg("gamma") = 2.0);
  m.def("backward", &backward, py::arg("grad"), py::arg("x"), py::arg("t"), py::arg("activation"), py::arg("power"),
        py::arg("ignore_index"), py::arg("resident"), py::arg("pixel_loss") = "none", py::arg("gamma") = 2.0);
  m.def("accesses", &accesses, "({bytes: loads}, {bytes: stores}) of the last call to the buffer of a tensor");
  m.def("plan", &plan, "(channels_last, wide, slots, lanes per pixel, channels per launch, pixels per block step)",
        py::arg("x"), py::arg("t"), py::arg("kind") = 0);
}
