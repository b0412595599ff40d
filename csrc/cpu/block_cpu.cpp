// The fused CPU block operator (igc::block_forward, inference only): argument checks and the
// dispatch to the kernels of x's dtype. The algorithm and the kernels are in block_kernels.h,
// compiled once per dtype in block_cpu_<dtype>.cpp.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "block_cpu.h"
#include "chain_args.h"
#include "gemm_cl.h"
#include "output_cache.h"
#include "tiles.h"

namespace igc {
namespace {

// Checks of the block fields (the chain's own are check_chain's, spatial weights included).
BlockDesc check_block(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                      at::IntArrayRef groups, at::IntArrayRef shuffles, const OptTensorList& perms,
                      at::IntArrayRef strides, at::IntArrayRef activations, bool residual,
                      const std::optional<at::Tensor>& input_index) {
  const char* op = "igc::block_forward";
  const int64_t L = static_cast<int64_t>(weights.size());
  TORCH_CHECK(static_cast<int64_t>(strides.size()) == L &&
                  static_cast<int64_t>(activations.size()) == L,
              op, ": strides and activations must have one entry per layer (", L, "), got ",
              strides.size(), " and ", activations.size());
  BlockDesc bd;
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor& W = weights[l];
    if (W.dim() == 4) {
      const int64_t k = W.size(2);
      TORCH_CHECK(W.size(3) == k && k % 2 == 1 && k >= 3 && k <= kMaxKernel, op, ": layer ",
                  l + 1, ": a spatial weight must be (C_out, C_in / groups, k, k) with k odd, 3 "
                  "<= k <= 7, got shape ", W.sizes());
      TORCH_CHECK(bd.sl < 0, op, ": layer ", l + 1, ": at most one spatial layer per block "
                  "(layer ", bd.sl + 1, " is one)");
      TORCH_CHECK(x.dim() == 4, op, ": a spatial layer needs x of shape (N, C, H, W), got ",
                  x.sizes());
      bd.sl = l;
      bd.k = k;
      bd.s = strides[l];
    } else {
      TORCH_CHECK(strides[l] == 1, op, ": layer ", l + 1, ": a pointwise layer has stride 1, got ",
                  strides[l]);
    }
    TORCH_CHECK(strides[l] == 1 || strides[l] == 2, op, ": layer ", l + 1,
                ": stride must be 1 or 2, got ", strides[l]);
    TORCH_CHECK(activations[l] >= kNone && activations[l] <= kHardswish, op, ": layer ", l + 1,
                ": unknown activation code ", activations[l], " (0 none, 1 relu, 2 relu6, 3 "
                "hardswish)");
  }
  bd.d = check_chain(op, x, weights, biases, groups, shuffles, perms, input_index,
                     /*read_perms=*/true, /*spatial_weights=*/true);
  if (residual) {
    TORCH_CHECK(bd.d.C.back() == bd.d.C_in, op, ": residual adds x: x has ", bd.d.C_in,
                " channels but C_L = ", bd.d.C.back());
    TORCH_CHECK(bd.s == 1, op, ": residual needs stride 1 (the output's size must be x's)");
  }
  return bd;
}

at::Tensor block_forward_impl(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                              at::IntArrayRef groups, at::IntArrayRef shuffles,
                              const OptTensorList& perms, at::IntArrayRef strides,
                              at::IntArrayRef activations, bool residual,
                              const std::optional<at::Tensor>& input_index,
                              const std::vector<at::Tensor>* packed) {
  TORCH_CHECK(x.device().is_cpu(), "igc::block_forward (cpu): x must be a CPU tensor");
  BlockDesc bd = check_block(x, weights, biases, groups, shuffles, perms, strides, activations,
                             residual, input_index);
  const ChainDesc& d = bd.d;
  const bool spatial = bd.sl >= 0;
  int64_t H = 1, Wd = 1, Ho = 1, Wo = 1;
  at::Tensor y;
  if (spatial) {
    H = x.size(2);
    Wd = x.size(3);
    Ho = H == 0 ? 0 : (H - 1) / bd.s + 1;  // ceil(H / s): padding k // 2
    Wo = Wd == 0 ? 0 : (Wd - 1) / bd.s + 1;
    y = cached_output(x, d.C.back(), {Ho, Wo});
  } else {
    y = cached_output(x, d.C.back(), std::vector<int64_t>(x.sizes().begin() + 2, x.sizes().end()));
  }
  if (y.numel() == 0 || x.numel() == 0) return y;
  switch (x.scalar_type()) {
#define IGC_CALL_BLOCK_FORWARD(scalar_t, acc_t, suffix)                                          \
  case c10::CppTypeToScalarType<scalar_t>::value:                                               \
    block_forward_##suffix(bd, x, weights, biases, activations, residual, packed, y, H, Wd, Ho, \
                           Wo);                                                                 \
    break;
    IGC_FOR_EACH_CPU_DTYPE(IGC_CALL_BLOCK_FORWARD)
#undef IGC_CALL_BLOCK_FORWARD
    default:
      TORCH_CHECK(false, "igc::block_forward (cpu): dtype ", x.scalar_type(),
                  " is not supported (float32, float64, float16, bfloat16)");
  }
  return y;
}

}  // namespace

at::Tensor block_forward_cpu_direct(const at::Tensor& x, at::TensorList weights,
                                    at::TensorList biases, at::IntArrayRef groups,
                                    at::IntArrayRef shuffles, const OptTensorList& perms,
                                    at::IntArrayRef strides, at::IntArrayRef activations,
                                    bool residual, const std::optional<at::Tensor>& input_index,
                                    const std::vector<at::Tensor>* packed) {
  return block_forward_impl(x, weights, biases, groups, shuffles, perms, strides, activations,
                            residual, input_index, packed);
}

std::vector<at::Tensor> block_pack_cpu(at::TensorList weights, at::TensorList biases,
                                       at::IntArrayRef groups) {
  const char* op = "cpu_block_pack";
  const int64_t L = static_cast<int64_t>(weights.size());
  TORCH_CHECK(static_cast<int64_t>(groups.size()) == L &&
                  (biases.empty() || static_cast<int64_t>(biases.size()) == L),
              op, ": groups and biases (when given) must have one entry per layer (", L, ")");
  std::vector<at::Tensor> out;
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor& w = weights[l];
    const at::Tensor b = biases.empty() ? at::Tensor() : biases[l];
    const bool has_b = b.defined() && has_bias_entry(b);
    const int64_t G = groups[l];
    if (w.dim() != 2 || w.scalar_type() != at::kFloat || !w.device().is_cpu() || G <= 0 ||
        w.size(0) % G != 0 ||
        (has_b && (b.scalar_type() != at::kFloat || b.numel() != w.size(0)))) {
      out.emplace_back();  // spatial or not float32: the [channel][position] tiles
      continue;
    }
    const at::Tensor wc = w.contiguous();
    const at::Tensor bc = has_b ? b.contiguous() : at::Tensor();
    const int64_t m = w.size(0) / G, n = w.size(1);
    at::Tensor p = at::empty({cl_packed_size(G, n, m)}, w.options());
    pack_cl_layer(wc.data_ptr<float>(), has_b ? bc.data_ptr<float>() : nullptr, G, n, m,
                  p.data_ptr<float>());
    out.push_back(std::move(p));
  }
  return out;
}

at::Tensor block_forward_cpu(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                             at::IntArrayRef groups, at::IntArrayRef shuffles,
                             const OptTensorList& perms, at::IntArrayRef strides,
                             at::IntArrayRef activations, bool residual,
                             const std::optional<at::Tensor>& input_index) {
  return block_forward_impl(x, weights, biases, groups, shuffles, perms, strides, activations,
                            residual, input_index, nullptr);
}

TORCH_LIBRARY_IMPL(igc, CPU, m) { m.impl("block_forward", &block_forward_cpu); }

}  // namespace igc
