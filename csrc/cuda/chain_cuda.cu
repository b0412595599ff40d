// CUDA implementation of igc::chain_forward and igc::chain_backward (the CUDA dispatch key of the
// schemas defined in csrc/ops.cpp). The algorithm, the byte and FLOP budget and the kernels are in
// chain_kernels.cuh (torch-free); this file checks the arguments, prepares the device-side
// tables, allocates the outputs through ATen and launches on the current stream: no host
// synchronisation, so the ops can be captured in CUDA graphs.
//
// Per call, before the CUDA-core chain kernels: the weights (and biases) are converted to the
// accumulation type and concatenated (one ATen op each), and one small kernel builds the int32
// index table (input index, then the gather index after every layer: shuffles computed, explicit
// permutations copied). The backward with an input index builds its CSR list (dx channel c <-
// dh_0 rows j with input_index[j] == c, in increasing j) with a stable sort and a searchsorted.
//
// float16 / bfloat16 forwards on sm_80 and newer run the tensor-core kernel of chain_mma.cuh,
// and their backwards the tensor-core backward of chain_mma_backward.cuh when its store-all
// tiles fit; IGC_CUDA_TENSOR_CORES=0 in the environment selects the CUDA-core kernels instead.
// float32 forwards and backwards run those kernels in bfloat16 planes only with
// IGC_CUDA_FP32_MMA=1: three (MmaF32x3), or two (MmaF32x2) where the user allows TF32 for matmul.
// Their per-call preparation is one kernel (mma_prepare_kernel) that reads the weights and
// biases in their own dtype and writes the index table, the row tables, the weight fragments
// (the backward's also transposed, for dh) and the fp32 biases into one int32 allocation: no
// ATen op runs on the weights.
#include <ATen/Context.h>
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
#include <torch/version.h>

#include <array>
#include <climits>
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

// A non-negative integer from the environment variable `name` (-1 when it is unset or empty),
// at most `max`; anything else is an error naming the variable.
int64_t env_count(const char* name, int64_t max) {
  const char* s = std::getenv(name);
  if (s == nullptr || *s == '\0') return -1;
  char* end = nullptr;
  const long long n = std::strtoll(s, &end, 10);
  TORCH_CHECK(*end == '\0' && n >= 0 && n <= max, name, " must be a number from 0 to ", max,
              ", got '", s, "'");
  return n;
}

// Multiprocessor count, shared-memory limits and L2 size, queried once per device, with the
// planning overrides of the environment.
kc::DeviceInfo device_info(int device) {
  static std::mutex mu;
  static std::vector<std::pair<int, kc::DeviceInfo>> cache;
  std::lock_guard<std::mutex> lock(mu);
  for (const auto& e : cache)
    if (e.first == device) return e.second;
  kc::DeviceInfo info;
  C10_CUDA_CHECK(kc::query_device(device, &info));
  // IGC_CUDA_PLAN_L2_BYTES: the L2 size the tensor-core backward's tile rule assumes
  // (mma_backward_wide_tile) instead of the device's, 0 turning the rule off;
  // IGC_CUDA_MAX_CTAS_PER_SM: a cap of the tensor-core forward's CTAs per SM (0: none);
  // IGC_CUDA_L2_PREFETCH=0: the CUDA-core forward and the backwards never prefetch their next
  // tile into L2
  // (l2_prefetch_fits); IGC_CUDA_WIDE_ITEMS=0: the CUDA-core kernels' layer items take 4
  // positions only, not 8 (grouped_rows_k). For timing one plan against another on a GPU; read
  // with the device's facts, once.
  const int64_t l2 = env_count("IGC_CUDA_PLAN_L2_BYTES", INT_MAX);
  if (l2 >= 0) info.l2_bytes = static_cast<int>(l2);
  const int64_t ctas = env_count("IGC_CUDA_MAX_CTAS_PER_SM", 32);
  if (ctas >= 0) info.max_ctas = static_cast<int>(ctas);
  const int64_t prefetch = env_count("IGC_CUDA_L2_PREFETCH", 1);
  if (prefetch >= 0) info.l2_prefetch = static_cast<int>(prefetch);
  const int64_t wide = env_count("IGC_CUDA_WIDE_ITEMS", 1);
  if (wide >= 0) info.narrow_items = wide == 0 ? 1 : 0;
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

// Float32 forwards and backwards on the tensor cores (chain_mma.cuh's MmaF32x3: three bfloat16
// planes, six products) only with IGC_CUDA_FP32_MMA=1, until a GPU has timed them against the
// CUDA-core kernels; IGC_CUDA_TENSOR_CORES=0 turns them off as well. Read once; another value
// than 0 or 1 is an error naming the variable (env_count).
bool fp32_tensor_cores_enabled() {
  static const bool on = env_count("IGC_CUDA_FP32_MMA", 1) == 1;
  return on;
}

// With them: two planes (MmaF32x2: each product's operands to about 16 significant bits, as
// torch's "high" float32 matmul precision allows) where the user allows TF32 for matmul
// (torch.backends.cuda.matmul.fp32_precision = "tf32", or the legacy allow_tf32 /
// torch.set_float32_matmul_precision("high") or "medium", which set it), else three
// (MmaF32x3). Read at every call, through the API torch's own cuBLAS matmul reads in this
// version (since 2.10 the legacy getter raises once the new API has been used).
bool fp32_two_planes() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10)
  return at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL) ==
         at::Float32Precision::TF32;
#elif TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR == 9
  return at::globalContext().float32Precision("cuda", "matmul") == "tf32";
#else
  return at::globalContext().allowTF32CuBLAS();
#endif
}

// The weights and biases of a chain as the tensor-core kernels' preparation reads them
// (contiguous, in their own dtype; copies of non-contiguous ones are kept alive in keep).
kc::MmaWeights mma_weights(at::TensorList weights, at::TensorList biases, const ChainDesc& d,
                           std::vector<at::Tensor>& keep) {
  kc::MmaWeights w{};
  const auto ptr = [&](const at::Tensor& t) {
    at::Tensor c = t.contiguous();
    const void* p = c.data_ptr();
    keep.push_back(std::move(c));
    return p;
  };
  for (size_t l = 0; l < weights.size(); ++l) {
    w.w[l] = ptr(weights[l]);
    if (d.has_bias[l]) w.b[l] = ptr(biases[l]);
  }
  return w;
}

// The per-call tables of the tensor-core kernels in one int32 allocation: the weight fragments
// (frag_entries uint2, first: 8-byte aligned), the fp32 biases, the index table, the row tables.
struct MmaBuffers {
  at::Tensor buf;
  uint2* frag;
  float* bias;  // null without biases
  int32_t* table;
  int32_t* rows;
};

MmaBuffers mma_buffers(const kc::HostChain& h, const kc::MmaParams& mp, int64_t frag_entries,
                       const at::TensorOptions& opts) {
  const int64_t n_table = kc::index_table_size(h);
  const int64_t n_bias = mp.c.num_b;
  MmaBuffers b;
  b.buf = at::empty({2 * frag_entries + n_bias + n_table + kc::mma_row_table_size(mp)},
                    opts.dtype(at::kInt));
  int32_t* base = b.buf.data_ptr<int32_t>();
  b.frag = reinterpret_cast<uint2*>(base);
  b.bias = n_bias > 0 ? reinterpret_cast<float*>(base + 2 * frag_entries) : nullptr;
  b.table = base + 2 * frag_entries + n_bias;
  b.rows = b.table + n_table;
  return b;
}

// The forward of a float16 / bfloat16 chain (or, opted in, a float32 one: MmaF32x3, MmaF32x2) on
// tensor cores (chain_mma.cuh). False when the device has none for it (sm < 80) or the tile does
// not fit; the caller then runs the CUDA-core kernel. Launches: one for the tables, fragments and
// biases, one for the chain.
template <class Fmt>
bool forward_mma(const kc::HostChain& h, const ChainDesc& d, at::TensorList weights,
                 at::TensorList biases, const at::Tensor& x, at::Tensor& y, int64_t P,
                 const kc::DeviceInfo& info, cudaStream_t stream, std::vector<at::Tensor>& keep) {
  if (info.cc_major < 8 || !tensor_cores_enabled()) return false;
  kc::MmaPlan plan;
  const kc::MmaParams probe = kc::make_mma_params(h, nullptr, nullptr, nullptr);
  C10_CUDA_CHECK(kc::plan_forward_mma<Fmt>(probe, P, info, &plan));
  if (plan.mt == 0) return false;
  using S = typename Fmt::Storage;
  const MmaBuffers buf = mma_buffers(h, probe, Fmt::kPlanes * probe.num_frag, x.options());
  const kc::MmaParams mp = kc::make_mma_params(h, buf.bias, buf.table, buf.frag);
  C10_CUDA_CHECK(kc::launch_forward_mma<Fmt>(
      h, mp, mma_weights(weights, biases, d, keep), buf.table, buf.frag, buf.rows,
      tensor_arg<const S>(x), tensor_arg<S>(y), P, plan, stream));
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

// The backward of a float16 / bfloat16 chain (or, opted in, a float32 one) on tensor cores
// (chain_mma_backward.cuh). False when the device has none for it (sm < 80) or the store-all
// tiles do not fit; the caller then runs the CUDA-core kernel. Launches: one for the tables,
// both fragment sets and the biases, one for the chain, one for the weight-gradient reduction.
template <class Fmt>
bool backward_mma(const kc::HostChain& h, const ChainDesc& d, at::TensorList weights,
                  at::TensorList biases, const at::Tensor& x, const at::Tensor& grad_y,
                  at::Tensor& gx, at::Tensor& gw, at::Tensor& gb, bool need_x, bool need_w,
                  bool need_b, const std::optional<at::Tensor>& input_index, int64_t P,
                  const kc::DeviceInfo& info, cudaStream_t stream, std::vector<at::Tensor>& keep) {
  if (info.cc_major < 8 || !tensor_cores_enabled()) return false;
  const bool wb = need_w || need_b;
  kc::MmaPlan plan;
  const kc::MmaParams probe = kc::make_mma_params(h, nullptr, nullptr, nullptr);
  C10_CUDA_CHECK(kc::plan_backward_mma<Fmt>(probe, P, wb, info, &plan));
  if (plan.mt == 0) return false;
  constexpr int NP = Fmt::kPlanes;
  const int64_t n_frag_t = kc::make_mma_transposed_params(h, nullptr, nullptr).num_frag;
  const MmaBuffers buf = mma_buffers(h, probe, NP * (probe.num_frag + n_frag_t), x.options());
  uint2* frag_t = buf.frag + NP * probe.num_frag;
  const kc::MmaParams mp = kc::make_mma_params(h, buf.bias, buf.table, buf.frag);
  const kc::MmaParams mt = kc::make_mma_transposed_params(h, buf.table, frag_t);
  at::Tensor starts, order;
  if (d.has_index && need_x) std::tie(starts, order) = dx_csr(d, input_index);
  at::Tensor partial;
  if (wb)
    partial = at::empty({plan.grid, d.num_weight_elems + d.num_bias_elems},
                        x.options().dtype(at::kFloat));
  const kc::BackwardFlags f{need_x ? 1 : 0, need_w ? 1 : 0, need_b ? 1 : 0, 1};
  using S = typename Fmt::Storage;
  const kc::TensorArg<S> dxa = need_x ? tensor_arg<S>(gx) : kc::TensorArg<S>{};
  C10_CUDA_CHECK(kc::launch_backward_mma<Fmt>(
      h, mp, mt, mma_weights(weights, biases, d, keep), buf.table, buf.frag, frag_t, buf.rows,
      tensor_arg<const S>(x), tensor_arg<const S>(grad_y), dxa,
      starts.defined() ? starts.data_ptr<int32_t>() : nullptr,
      order.defined() ? order.data_ptr<int32_t>() : nullptr,
      partial.defined() ? partial.data_ptr<float>() : nullptr,
      need_w ? reinterpret_cast<S*>(gw.data_ptr()) : nullptr,
      need_b ? reinterpret_cast<S*>(gb.data_ptr()) : nullptr, f, P, plan, stream));
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
      forward_mma<kc::MmaBf16>(h, d, weights, biases, x, y, P, info, stream, keep))
    return y;
  if (x.scalar_type() == at::kHalf &&
      forward_mma<kc::MmaF16>(h, d, weights, biases, x, y, P, info, stream, keep))
    return y;
  if (x.scalar_type() == at::kFloat && fp32_tensor_cores_enabled() &&
      (fp32_two_planes()
           ? forward_mma<kc::MmaF32x2>(h, d, weights, biases, x, y, P, info, stream, keep)
           : forward_mma<kc::MmaF32x3>(h, d, weights, biases, x, y, P, info, stream, keep)))
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
                                need_b, input_index, P, info, stream, keep))
    return {gx, gw, gb};
  if (x.scalar_type() == at::kHalf &&
      backward_mma<kc::MmaF16>(h, d, weights, biases, x, grad_y, gx, gw, gb, need_x, need_w,
                               need_b, input_index, P, info, stream, keep))
    return {gx, gw, gb};
  if (x.scalar_type() == at::kFloat && fp32_tensor_cores_enabled() &&
      (fp32_two_planes()
           ? backward_mma<kc::MmaF32x2>(h, d, weights, biases, x, grad_y, gx, gw, gb, need_x,
                                        need_w, need_b, input_index, P, info, stream, keep)
           : backward_mma<kc::MmaF32x3>(h, d, weights, biases, x, grad_y, gx, gw, gb, need_x,
                                        need_w, need_b, input_index, P, info, stream, keep)))
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
