// CUDA implementation of igc::chain_forward and igc::chain_backward (the CUDA dispatch key of the
// schemas defined in csrc/ops.cpp). The algorithm, the byte and FLOP budget and the kernels are in
// chain_kernels.cuh (torch-free); this file checks the arguments, prepares the device-side
// tables, allocates the outputs through ATen and launches on the current stream: no host
// synchronisation, so the ops can be captured in CUDA graphs.
//
// Per call, before the chain kernels: the weights (and biases) are converted to the accumulation
// type and concatenated (one ATen op each), and one small kernel builds the int32 index table
// (input index, then the gather index after every layer: shuffles computed, explicit
// permutations copied). The backward with an input index builds its CSR list (dx channel c <- dh_0
// rows j with input_index[j] == c, in increasing j) with a stable sort and a searchsorted.
//
// float16 / bfloat16 forwards on sm_80 and newer run the tensor-core kernel of chain_mma.cuh
// (one more small kernel packs the weights into mma fragments first), and their backwards the
// tensor-core backward of chain_mma_backward.cuh (weights packed twice: as they are, for the
// recompute, and transposed, for dh) when its store-all tiles fit; IGC_CUDA_TENSOR_CORES=0 in
// the environment selects the CUDA-core kernels instead.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/clamp.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <tuple>
#include <utility>
#include <type_traits>
#include <vector>

#include "chain_args.h"
#include "chain_kernels.cuh"
#include "chain_mma.cuh"
#include "chain_mma_backward.cuh"

namespace igc {
namespace {

namespace kc = igc::cuda;

static_assert(sizeof(c10::Half) == sizeof(__half) && alignof(c10::Half) == alignof(__half),
              "c10::Half and __half must share a layout");
static_assert(sizeof(c10::BFloat16) == sizeof(__nv_bfloat16),
              "c10::BFloat16 and __nv_bfloat16 must share a layout");

// Device element type of an ATen scalar type.
template <typename scalar_t>
struct DevType {
  using type = scalar_t;
};
template <>
struct DevType<c10::Half> {
  using type = __half;
};
template <>
struct DevType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

// Multiprocessor count and shared-memory limits, queried once per device.
kc::DeviceInfo device_info(int device) {
  static std::mutex mu;
  static std::vector<std::pair<int, kc::DeviceInfo>> cache;
  std::lock_guard<std::mutex> lock(mu);
  for (const auto& e : cache)
    if (e.first == device) return e.second;
  kc::DeviceInfo info;
  C10_CUDA_CHECK(kc::query_device(device, &info));
  cache.emplace_back(device, info);
  return info;
}

// The host description of the chain (device pointers of the contiguous index tensors, kept
// alive in `keep`) after the shared checks.
kc::HostChain host_chain(const char* op, const ChainDesc& d, at::IntArrayRef shuffles,
                         const OptTensorList& perms,
                         const std::optional<at::Tensor>& input_index,
                         std::vector<at::Tensor>& keep) {
  TORCH_CHECK(d.L <= kc::kMaxLayers, op, " (cuda): the chain has ", d.L,
              " layers; the CUDA kernels support at most ", kc::kMaxLayers);
  kc::HostChain h{};
  h.L = static_cast<int>(d.L);
  h.c_in = d.C_in;
  h.has_index = d.has_index ? 1 : 0;
  if (d.has_index) {
    at::Tensor ix = input_index->contiguous();
    keep.push_back(ix);
    h.index = ix.data_ptr();
    h.index_is_int32 = ix.scalar_type() == at::kInt ? 1 : 0;
  }
  for (int64_t l = 0; l <= d.L; ++l) h.C[l] = d.C[l];
  for (int64_t l = 0; l < d.L; ++l) {
    h.G[l] = d.G[l];
    h.has_bias[l] = d.has_bias[l] ? 1 : 0;
    h.shuffle[l] = static_cast<int>(shuffles[l]);
    const std::optional<at::Tensor> p = perms.get(l);
    if (p.has_value() && p->defined()) {
      at::Tensor pc = p->contiguous();
      keep.push_back(pc);
      h.perm[l] = pc.data_ptr();
      h.perm_is_int32[l] = pc.scalar_type() == at::kInt ? 1 : 0;
    }
  }
  return h;
}

// Every weight (and every present bias) in the accumulation type, concatenated in layer order.
at::Tensor flat_params(at::TensorList ts, const std::vector<bool>* present, at::ScalarType acc) {
  std::vector<at::Tensor> parts;
  for (size_t i = 0; i < ts.size(); ++i) {
    if (present != nullptr && !(*present)[i]) continue;
    parts.push_back(ts[i].reshape({-1}).to(acc));
  }
  if (parts.empty()) return at::Tensor();
  return at::cat(parts).contiguous();
}

template <typename T>
kc::TensorArg<T> tensor_arg(const at::Tensor& t) {
  return kc::make_tensor_arg(reinterpret_cast<T*>(t.data_ptr()), static_cast<int>(t.dim()),
                             t.sizes().data(), t.strides().data());
}

[[noreturn]] void fail_smem(const char* op, int cmax, const kc::DeviceInfo& info) {
  TORCH_CHECK(false, op, " (cuda): the widest layer of the chain (", cmax,
              " channels) does not fit in shared memory (", info.smem_optin,
              " bytes per block on this device) even with a tile of ", kc::kMinTile,
              " positions; use backend='cpu' or 'reference' for this chain");
}

// The tensor-core kernels are used unless IGC_CUDA_TENSOR_CORES=0 (read once).
bool tensor_cores_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("IGC_CUDA_TENSOR_CORES");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return on;
}

// The forward of a float16 / bfloat16 chain on tensor cores (chain_mma.cuh). False when the
// device has none for it (sm < 80) or the tile does not fit; the caller then runs the CUDA-core
// kernel.
template <class Fmt>
bool forward_mma(const kc::HostChain& h, const ChainDesc& d, at::TensorList weights,
                 at::TensorList biases, const at::Tensor& x, at::Tensor& y, int64_t P,
                 const kc::DeviceInfo& info, cudaStream_t stream) {
  if (info.cc_major < 8 || !tensor_cores_enabled()) return false;
  kc::MmaPlan plan;
  {
    const kc::MmaParams probe = kc::make_mma_params(h, nullptr, nullptr, nullptr, nullptr);
    C10_CUDA_CHECK(kc::plan_forward_mma<Fmt>(probe, P, info, &plan));
    if (plan.mt == 0) return false;
  }
  at::Tensor W = flat_params(weights, nullptr, at::kFloat);
  at::Tensor B = d.num_bias_elems > 0 ? flat_params(biases, &d.has_bias, at::kFloat) : at::Tensor();
  at::Tensor table = at::empty({kc::index_table_size(h)}, x.options().dtype(at::kInt));
  kc::MmaParams mp = kc::make_mma_params(h, W.data_ptr<float>(),
                                         B.defined() ? B.data_ptr<float>() : nullptr,
                                         table.data_ptr<int32_t>(), nullptr);
  at::Tensor frag = at::empty({2 * mp.num_frag}, x.options().dtype(at::kInt));
  mp.frag = reinterpret_cast<const uint2*>(frag.data_ptr<int32_t>());
  // the row tables: rows (composed with in-place layers) and the rows' elements
  at::Tensor tables = at::empty({kc::mma_row_table_size(mp)}, table.options());
  C10_CUDA_CHECK(kc::launch_build_index_table(h, table.data_ptr<int32_t>(), stream));
  C10_CUDA_CHECK(kc::launch_forward_mma<Fmt>(
      mp, reinterpret_cast<uint2*>(frag.data_ptr<int32_t>()),
      tables.data_ptr<int32_t>(), tensor_arg<const uint16_t>(x),
      tensor_arg<uint16_t>(y), P, plan, stream));
  return true;
}

// The CSR list of an input index for dx: dx channel c sums dh_0 rows order[starts[c] ..
// starts[c+1]-1], in increasing row order.
std::pair<at::Tensor, at::Tensor> dx_csr(const ChainDesc& d,
                                         const std::optional<at::Tensor>& input_index) {
  // entries outside [0, C_in) were rejected by the Python front end; clamped here only so that
  // a direct call with bad values cannot address memory outside dx
  at::Tensor idx = at::clamp(input_index->to(at::kLong), 0, d.C_in - 1);
  auto sorted = at::sort(idx, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  at::Tensor order = std::get<1>(sorted).to(at::kInt).contiguous();
  at::Tensor starts = at::searchsorted(std::get<0>(sorted), at::arange(d.C_in + 1, idx.options()),
                                       /*out_int32=*/true, /*right=*/false)
                          .contiguous();
  return {starts, order};
}

// The backward of a float16 / bfloat16 chain on tensor cores (chain_mma_backward.cuh). False
// when the device has none for it (sm < 80) or the store-all tiles do not fit; the caller then
// runs the CUDA-core kernel.
template <class Fmt>
bool backward_mma(const kc::HostChain& h, const ChainDesc& d, at::TensorList weights,
                  at::TensorList biases, const at::Tensor& x, const at::Tensor& grad_y,
                  at::Tensor& gx, at::Tensor& gw, at::Tensor& gb, bool need_x, bool need_w,
                  bool need_b, const std::optional<at::Tensor>& input_index, int64_t P,
                  const kc::DeviceInfo& info, cudaStream_t stream) {
  if (info.cc_major < 8 || !tensor_cores_enabled()) return false;
  const bool wb = need_w || need_b;
  kc::MmaPlan plan;
  {
    const kc::MmaParams probe = kc::make_mma_params(h, nullptr, nullptr, nullptr, nullptr);
    C10_CUDA_CHECK(kc::plan_backward_mma<Fmt>(probe, P, wb, info, &plan));
    if (plan.mt == 0) return false;
  }
  at::Tensor W = flat_params(weights, nullptr, at::kFloat);
  at::Tensor B = d.num_bias_elems > 0 ? flat_params(biases, &d.has_bias, at::kFloat) : at::Tensor();
  at::Tensor table = at::empty({kc::index_table_size(h)}, x.options().dtype(at::kInt));
  const float* Wp = W.data_ptr<float>();
  kc::MmaParams mp = kc::make_mma_params(h, Wp, B.defined() ? B.data_ptr<float>() : nullptr,
                                         table.data_ptr<int32_t>(), nullptr);
  kc::MmaParams mt = kc::make_mma_transposed_params(h, Wp, table.data_ptr<int32_t>(), nullptr);
  at::Tensor frag = at::empty({2 * (mp.num_frag + mt.num_frag)}, x.options().dtype(at::kInt));
  uint2* fp = reinterpret_cast<uint2*>(frag.data_ptr<int32_t>());
  mp.frag = fp;
  mt.frag = fp + mp.num_frag;
  at::Tensor starts, order;
  if (d.has_index && need_x) std::tie(starts, order) = dx_csr(d, input_index);
  at::Tensor partial;
  if (wb)
    partial = at::empty({plan.grid, d.num_weight_elems + d.num_bias_elems},
                        x.options().dtype(at::kFloat));
  C10_CUDA_CHECK(kc::launch_build_index_table(h, table.data_ptr<int32_t>(), stream));
  const kc::BackwardFlags f{need_x ? 1 : 0, need_w ? 1 : 0, need_b ? 1 : 0, 1};
  const kc::TensorArg<uint16_t> dxa = need_x ? tensor_arg<uint16_t>(gx) : kc::TensorArg<uint16_t>{};
  at::Tensor tables = at::empty({kc::mma_row_table_size(mp)}, table.options());
  C10_CUDA_CHECK(kc::launch_backward_mma<Fmt>(
      mp, fp, mt, fp + mp.num_frag, tables.data_ptr<int32_t>(), tensor_arg<const uint16_t>(x),
      tensor_arg<const uint16_t>(grad_y), dxa,
      starts.defined() ? starts.data_ptr<int32_t>() : nullptr,
      order.defined() ? order.data_ptr<int32_t>() : nullptr,
      partial.defined() ? partial.data_ptr<float>() : nullptr,
      need_w ? reinterpret_cast<uint16_t*>(gw.data_ptr()) : nullptr,
      need_b ? reinterpret_cast<uint16_t*>(gb.data_ptr()) : nullptr, f, P, plan, stream));
  return true;
}

at::Tensor chain_forward_cuda(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                              at::IntArrayRef groups, at::IntArrayRef shuffles,
                              const OptTensorList& perms,
                              const std::optional<at::Tensor>& input_index) {
  const char* op = "igc::chain_forward";
  TORCH_CHECK(x.is_cuda(), op, " (cuda): x must be a CUDA tensor, got ", x.device());
  ChainDesc d = check_chain(op, x, weights, biases, groups, shuffles, perms, input_index,
                            /*read_perms=*/false);
  c10::cuda::CUDAGuard guard(x.device());
  std::vector<at::Tensor> keep;
  const kc::HostChain h = host_chain(op, d, shuffles, perms, input_index, keep);
  at::Tensor y = empty_layout(x, d.C.back());
  if (y.numel() == 0) return y;
  const int64_t P = y.numel() / d.C.back();
  const kc::DeviceInfo info = device_info(x.get_device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();

  if (x.scalar_type() == at::kBFloat16 &&
      forward_mma<kc::MmaBf16>(h, d, weights, biases, x, y, P, info, stream))
    return y;
  if (x.scalar_type() == at::kHalf &&
      forward_mma<kc::MmaF16>(h, d, weights, biases, x, y, P, info, stream))
    return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "igc_chain_forward_cuda", [&] {
    using T = typename DevType<scalar_t>::type;
    using A = typename kc::Cvt<T>::acc;
    const auto acc_type = c10::CppTypeToScalarType<A>::value;
    // plan first: a chain that does not fit raises before anything runs on the device
    kc::LaunchPlan plan;
    {
      const kc::ChainParams<A> probe = kc::make_params<A>(h, nullptr, nullptr, nullptr);
      C10_CUDA_CHECK((kc::plan_forward<T, A>(probe, P, info, &plan)));
      if (plan.tp == 0) fail_smem(op, probe.cmax, info);
    }
    at::Tensor W = flat_params(weights, nullptr, acc_type);
    at::Tensor B = d.num_bias_elems > 0 ? flat_params(biases, &d.has_bias, acc_type) : at::Tensor();
    at::Tensor table = at::empty({kc::index_table_size(h)}, x.options().dtype(at::kInt));
    const kc::ChainParams<A> p = kc::make_params<A>(
        h, W.data_ptr<A>(), B.defined() ? B.data_ptr<A>() : nullptr, table.data_ptr<int32_t>());
    C10_CUDA_CHECK(kc::launch_build_index_table(h, table.data_ptr<int32_t>(), stream));
    C10_CUDA_CHECK((kc::launch_forward<T, A>(p, tensor_arg<const T>(x), tensor_arg<T>(y), P,
                                             plan, stream)));
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> chain_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, at::TensorList weights, at::TensorList biases,
    at::IntArrayRef groups, at::IntArrayRef shuffles, const OptTensorList& perms,
    std::array<bool, 3> output_mask, const std::optional<at::Tensor>& input_index) {
  const char* op = "igc::chain_backward";
  TORCH_CHECK(x.is_cuda() && grad_y.is_cuda(), op, " (cuda): x and grad_y must be CUDA tensors, got ",
              x.device(), " and ", grad_y.device());
  ChainDesc d = check_chain(op, x, weights, biases, groups, shuffles, perms, input_index,
                            /*read_perms=*/false);
  check_grad_y(op, grad_y, x, d);
  c10::cuda::CUDAGuard guard(x.device());
  std::vector<at::Tensor> keep;
  const kc::HostChain h = host_chain(op, d, shuffles, perms, input_index, keep);
  const bool need_x = output_mask[0], need_w = output_mask[1];
  const bool need_b = output_mask[2] && d.num_bias_elems > 0;
  const int64_t P = x.numel() / x.size(1);
  const bool empty = P == 0 || !(need_x || need_w || need_b);
  at::Tensor gx = need_x ? empty_layout(x, d.C_in) : at::empty({0}, x.options());
  at::Tensor gw = empty ? at::zeros({need_w ? d.num_weight_elems : 0}, x.options())
                        : at::empty({need_w ? d.num_weight_elems : 0}, x.options());
  at::Tensor gb = empty ? at::zeros({output_mask[2] ? d.num_bias_elems : 0}, x.options())
                        : at::empty({need_b ? d.num_bias_elems : 0}, x.options());
  if (empty) return {gx, gw, gb};
  const kc::DeviceInfo info = device_info(x.get_device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();

  if (x.scalar_type() == at::kBFloat16 &&
      backward_mma<kc::MmaBf16>(h, d, weights, biases, x, grad_y, gx, gw, gb, need_x, need_w,
                                need_b, input_index, P, info, stream))
    return {gx, gw, gb};
  if (x.scalar_type() == at::kHalf &&
      backward_mma<kc::MmaF16>(h, d, weights, biases, x, grad_y, gx, gw, gb, need_x, need_w,
                               need_b, input_index, P, info, stream))
    return {gx, gw, gb};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "igc_chain_backward_cuda", [&] {
    using T = typename DevType<scalar_t>::type;
    using A = typename kc::Cvt<T>::acc;
    const auto acc_type = c10::CppTypeToScalarType<A>::value;
    const bool wb = need_w || need_b;
    kc::LaunchPlan plan;
    {
      const kc::ChainParams<A> probe = kc::make_params<A>(h, nullptr, nullptr, nullptr);
      C10_CUDA_CHECK((kc::plan_backward<T, A>(probe, P, wb, info, &plan)));
      if (plan.tp == 0) fail_smem(op, probe.cmax, info);
    }
    at::Tensor W = flat_params(weights, nullptr, acc_type);
    at::Tensor B = d.num_bias_elems > 0 ? flat_params(biases, &d.has_bias, acc_type) : at::Tensor();
    at::Tensor table = at::empty({kc::index_table_size(h)}, x.options().dtype(at::kInt));
    const kc::ChainParams<A> p = kc::make_params<A>(
        h, W.data_ptr<A>(), B.defined() ? B.data_ptr<A>() : nullptr, table.data_ptr<int32_t>());
    at::Tensor starts, order;
    if (d.has_index && need_x) std::tie(starts, order) = dx_csr(d, input_index);
    at::Tensor partial;
    if (wb)
      partial = at::empty({plan.grid, d.num_weight_elems + d.num_bias_elems},
                          x.options().dtype(acc_type));
    C10_CUDA_CHECK(kc::launch_build_index_table(h, table.data_ptr<int32_t>(), stream));
    const kc::BackwardFlags f{need_x ? 1 : 0, need_w ? 1 : 0, need_b ? 1 : 0, plan.store_all};
    const kc::TensorArg<T> dxa = need_x ? tensor_arg<T>(gx) : kc::TensorArg<T>{};
    C10_CUDA_CHECK((kc::launch_backward<T, A>(
        p, tensor_arg<const T>(x), tensor_arg<const T>(grad_y), dxa,
        starts.defined() ? starts.data_ptr<int32_t>() : nullptr,
        order.defined() ? order.data_ptr<int32_t>() : nullptr,
        partial.defined() ? partial.data_ptr<A>() : nullptr,
        need_w ? reinterpret_cast<T*>(gw.data_ptr()) : nullptr,
        need_b ? reinterpret_cast<T*>(gb.data_ptr()) : nullptr, f, P, plan, stream)));
  });
  return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(igc, CUDA, m) {
  m.impl("chain_forward", &chain_forward_cuda);
  m.impl("chain_backward", &chain_backward_cuda);
}

}  // namespace igc
