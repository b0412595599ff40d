// C entry points that run the chain kernels of chain_kernels.cuh under host emulation
// (host_emulation.h), for tests/test_cuda_compile_nvcc.py: the same host plan and launch code as
// the CUDA launcher (chain_cuda.cu), on host memory, for float32 and float64. Built with
//   g++ -std=c++20 -O1 -DIGC_EMULATE -shared -fPIC -pthread -Icsrc/cuda -Itests/csrc
//       tests/csrc/emulation_harness.cpp
// (not part of the extension).
#include <cmath>
#include <cstdint>
#include <vector>

#include "chain_kernels.cuh"
#include "chain_mma.cuh"
#include "chain_mma_backward.cuh"

namespace {

using namespace igc::cuda;

struct EmuTensor {
  void* ptr;
  int64_t dim;
  int64_t sizes[5];
  int64_t strides[5];
};

struct EmuDevice {
  int sm_count;
  int smem_optin;
  int smem_per_sm;
  int occupancy;
  int l2_bytes;  // 0: unknown
  int max_ctas;  // DeviceInfo::max_ctas (IGC_CUDA_MAX_CTAS_PER_SM in the extension)
  int narrow_items;  // DeviceInfo::narrow_items (IGC_CUDA_WIDE_ITEMS=0 in the extension)
};

// plan_out: tp, ld, store_all, grid, 1 where the CTAs prefetch their next tile into L2
void report(const LaunchPlan& pl, int64_t* plan_out) {
  if (plan_out == nullptr) return;
  plan_out[0] = pl.tp;
  plan_out[1] = pl.ld;
  plan_out[2] = pl.store_all;
  plan_out[3] = pl.grid;
  plan_out[4] = pl.prefetch ? 1 : 0;
}

void set_device(const EmuDevice* d) {
  igc_emu::Device& dev = igc_emu::device();
  dev.sm_count = d->sm_count;
  dev.smem_optin = d->smem_optin;
  dev.smem_per_sm = d->smem_per_sm;
  dev.occupancy = d->occupancy;
  dev.l2_bytes = d->l2_bytes;
}

template <typename T>
TensorArg<T> arg(const EmuTensor* t) {
  return make_tensor_arg(static_cast<T*>(t->ptr), static_cast<int>(t->dim), t->sizes, t->strides);
}

// What forward and backward share: the checked chain, its index table and parameters, the
// number of positions and the emulated device.
template <typename A>
struct Setup {
  std::vector<int32_t> table;
  ChainParams<A> p;
  int64_t P = 0;
  DeviceInfo info;
};

template <typename A>
int setup(const HostChain* h, const void* W, const void* B, const EmuTensor* x,
          const EmuDevice* dev, Setup<A>* su) {
  if (h->L < 1 || h->L > kMaxLayers) return 1;  // the tests pass valid chains (check_chain's
                                                 // job in the extension)
  set_device(dev);
  su->table.resize(static_cast<size_t>(index_table_size(*h)));
  if (launch_build_index_table(*h, su->table.data(), nullptr) != cudaSuccess) return 2;
  su->p = make_params<A>(*h, static_cast<const A*>(W), static_cast<const A*>(B),
                         su->table.data());
  su->P = num_positions(static_cast<int>(x->dim), x->sizes);
  query_device(0, &su->info);
  su->info.max_ctas = dev->max_ctas;
  su->info.narrow_items = dev->narrow_items;
  return 0;
}

template <typename A>
int forward(const HostChain* h, const void* W, const void* B, const EmuTensor* x,
            const EmuTensor* y, const EmuDevice* dev, int64_t* plan_out) {
  Setup<A> su;
  if (const int rc = setup(h, W, B, x, dev, &su)) return rc;
  const ChainParams<A>& p = su.p;
  const int64_t P = su.P;
  if (P == 0) return 0;
  const DeviceInfo& info = su.info;
  LaunchPlan pl;
  if (plan_forward<A, A>(p, P, info, &pl) != cudaSuccess) return 3;
  report(pl, plan_out);
  if (pl.tp == 0) return 4;
  if (launch_forward<A, A>(p, arg<const A>(x), arg<A>(y), P, pl, nullptr) != cudaSuccess) return 5;
  return 0;
}

template <typename A>
int backward(const HostChain* h, const void* W, const void* B, const EmuTensor* x,
             const EmuTensor* dy, const EmuTensor* dx, const int32_t* starts,
             const int32_t* order, void* gw, void* gb, int need_x, int need_w, int need_b,
             const EmuDevice* dev, int64_t* plan_out) {
  Setup<A> su;
  if (const int rc = setup(h, W, B, x, dev, &su)) return rc;
  const ChainParams<A>& p = su.p;
  const int64_t P = su.P;
  if (P == 0) return 0;
  const DeviceInfo& info = su.info;
  LaunchPlan pl;
  const bool wb = need_w || (need_b && p.num_b > 0);
  if (plan_backward<A, A>(p, P, wb, info, &pl) != cudaSuccess) return 3;
  report(pl, plan_out);
  if (pl.tp == 0) return 4;
  std::vector<A> partial(wb ? static_cast<size_t>(pl.grid * (p.num_w + p.num_b)) : 0);
  BackwardFlags f{need_x, need_w, need_b && p.num_b > 0 ? 1 : 0, 1};
  TensorArg<A> dxa = need_x ? arg<A>(dx) : TensorArg<A>{};
  if (launch_backward<A, A>(p, arg<const A>(x), arg<const A>(dy), dxa, starts, order,
                            wb ? partial.data() : nullptr, static_cast<A*>(gw),
                            static_cast<A*>(gb), f, P, pl, nullptr) != cudaSuccess)
    return 5;
  return 0;
}

// The weights and biases as the tensor-core launchers take them, from the flat 16-bit weights W
// and biases B (every W_l, every present b_l, in layer order: chain_cuda.cu's per-layer tensors
// laid out one after the other).
template <typename T = uint16_t>
MmaWeights mma_weights(const ChainParams<float>& p, const void* W, const void* B) {
  MmaWeights w{};
  for (int l = 0; l < p.L; ++l) {
    w.w[l] = static_cast<const T*>(W) + p.layer[l].w_off;
    if (p.layer[l].has_bias) w.b[l] = static_cast<const T*>(B) + p.layer[l].b_off;
  }
  return w;
}

// The per-call tables of the tensor-core kernels, filled with -1 (NaN for the biases) before the
// launch so that an entry the preparation kernel misses shows.
struct MmaTables {
  std::vector<int32_t> table, rows;
  std::vector<uint2> frag, frag_t;
  std::vector<float> bias;
  MmaTables(const HostChain& h, const MmaParams& mp, int64_t n_frag_t, int planes = 1)
      : table(static_cast<size_t>(index_table_size(h)), -1),
        rows(static_cast<size_t>(mma_row_table_size(mp)), -1),
        frag(static_cast<size_t>(planes * mp.num_frag), uint2{~0u, ~0u}),
        frag_t(static_cast<size_t>(planes * n_frag_t), uint2{~0u, ~0u}),
        bias(static_cast<size_t>(mp.c.num_b), std::nanf("")) {}
  float* bias_ptr() { return bias.empty() ? nullptr : bias.data(); }
};

// The tensor-core forward (chain_mma.cuh) of a float16 / bfloat16 chain, or of a float32 one
// (MmaF32x3, MmaF32x2); W, B: the weights and biases in the chain's dtype. plan_out: tile
// positions, grid, in-place layers (0 / 1), the kWrap tile layout (0 / 1).
template <class Fmt>
int forward_mma(const HostChain* h, const void* W, const void* B, const EmuTensor* x,
                const EmuTensor* y, const EmuDevice* dev, int64_t* plan_out) {
  Setup<float> su;
  if (const int rc = setup(h, nullptr, nullptr, x, dev, &su)) return rc;
  const MmaParams probe = make_mma_params(*h, nullptr, nullptr, nullptr);
  const int64_t P = su.P;
  if (P == 0) return 0;
  MmaPlan pl;
  if (plan_forward_mma<Fmt>(probe, P, su.info, &pl) != cudaSuccess) return 3;
  if (plan_out != nullptr) {
    plan_out[0] = 16 * pl.mt;
    plan_out[1] = pl.grid;
    plan_out[2] = pl.in_place ? 1 : 0;
    plan_out[3] = pl.in_place && pl.wrap ? 1 : 0;
  }
  if (pl.mt == 0) return 4;
  using S = typename Fmt::Storage;
  MmaTables t(*h, probe, 0, Fmt::kPlanes);
  const MmaParams mp = make_mma_params(*h, t.bias_ptr(), t.table.data(), t.frag.data());
  if (launch_forward_mma<Fmt>(*h, mp, mma_weights<S>(mp.c, W, B), t.table.data(),
                              t.frag.data(), t.rows.data(), arg<const S>(x), arg<S>(y), P, pl,
                              nullptr) != cudaSuccess)
    return 5;
  return 0;
}

// The tensor-core backward (chain_mma_backward.cuh) of a float16 / bfloat16 chain, or of a
// float32 one (MmaF32x3, MmaF32x2): W, B and dx / gw / gb in the chain's dtype. plan_out: tile
// positions, grid, x and dy in one tile (reload x), the next tile prefetched into L2.
template <class Fmt>
int backward_mma(const HostChain* h, const void* W, const void* B, const EmuTensor* x,
                 const EmuTensor* dy, const EmuTensor* dx, const int32_t* starts,
                 const int32_t* order, void* gw, void* gb, int need_x, int need_w, int need_b,
                 const EmuDevice* dev, int64_t* plan_out) {
  Setup<float> su;
  if (const int rc = setup(h, nullptr, nullptr, x, dev, &su)) return rc;
  const int64_t P = su.P;
  if (P == 0) return 0;
  const MmaParams probe = make_mma_params(*h, nullptr, nullptr, nullptr);
  const bool nb = need_b && probe.c.num_b > 0;
  const bool wb = need_w || nb;
  MmaPlan pl;
  if (plan_backward_mma<Fmt>(probe, P, wb, su.info, &pl) != cudaSuccess) return 3;
  if (plan_out != nullptr) {
    plan_out[0] = 16 * pl.mt;
    plan_out[1] = pl.grid;
    plan_out[2] = pl.reload_x ? 1 : 0;
    plan_out[3] = pl.prefetch ? 1 : 0;
  }
  if (pl.mt == 0) return 4;
  using S = typename Fmt::Storage;
  MmaTables t(*h, probe, make_mma_transposed_params(*h, nullptr, nullptr).num_frag,
              Fmt::kPlanes);
  const MmaParams mp = make_mma_params(*h, t.bias_ptr(), t.table.data(), t.frag.data());
  const MmaParams mt = make_mma_transposed_params(*h, t.table.data(), t.frag_t.data());
  std::vector<float> partial(wb ? static_cast<size_t>(pl.grid * (mp.c.num_w + mp.c.num_b)) : 0);
  BackwardFlags f{need_x, need_w, nb ? 1 : 0, 1};
  TensorArg<S> dxa = need_x ? arg<S>(dx) : TensorArg<S>{};
  if (launch_backward_mma<Fmt>(*h, mp, mt, mma_weights<S>(mp.c, W, B), t.table.data(),
                               t.frag.data(), t.frag_t.data(), t.rows.data(), arg<const S>(x),
                               arg<const S>(dy), dxa, starts, order,
                               wb ? partial.data() : nullptr, static_cast<S*>(gw),
                               static_cast<S*>(gb), f, P, pl, nullptr) != cudaSuccess)
    return 5;
  return 0;
}

}  // namespace

extern "C" {

// fmt: 0 float16, 1 bfloat16, 2 float32 (MmaF32x3), 3 float32 in two planes (MmaF32x2)
int igc_emu_backward_mma(int fmt, const HostChain* h, const void* W, const void* B,
                         const EmuTensor* x, const EmuTensor* dy, const EmuTensor* dx,
                         const int32_t* starts, const int32_t* order, void* gw, void* gb,
                         int need_x, int need_w, int need_b, const EmuDevice* dev,
                         int64_t* plan_out) {
  if (fmt == 2)
    return backward_mma<MmaF32x3>(h, W, B, x, dy, dx, starts, order, gw, gb, need_x, need_w,
                                  need_b, dev, plan_out);
  if (fmt == 3)
    return backward_mma<MmaF32x2>(h, W, B, x, dy, dx, starts, order, gw, gb, need_x, need_w,
                                  need_b, dev, plan_out);
  return fmt == 1 ? backward_mma<MmaBf16>(h, W, B, x, dy, dx, starts, order, gw, gb, need_x,
                                         need_w, need_b, dev, plan_out)
                 : backward_mma<MmaF16>(h, W, B, x, dy, dx, starts, order, gw, gb, need_x,
                                        need_w, need_b, dev, plan_out);
}

// fmt: 0 float16, 1 bfloat16, 2 float32 (MmaF32x3: W, B, x and y float32), 3 float32 in two
// planes (MmaF32x2)
int igc_emu_forward_mma(int fmt, const HostChain* h, const void* W, const void* B,
                        const EmuTensor* x, const EmuTensor* y, const EmuDevice* dev,
                        int64_t* plan_out) {
  if (fmt == 2) return forward_mma<MmaF32x3>(h, W, B, x, y, dev, plan_out);
  if (fmt == 3) return forward_mma<MmaF32x2>(h, W, B, x, y, dev, plan_out);
  return fmt == 1 ? forward_mma<MmaBf16>(h, W, B, x, y, dev, plan_out)
                  : forward_mma<MmaF16>(h, W, B, x, y, dev, plan_out);
}


int igc_emu_forward(int is_double, const HostChain* h, const void* W, const void* B,
                    const EmuTensor* x, const EmuTensor* y, const EmuDevice* dev,
                    int64_t* plan_out) {
  return is_double ? forward<double>(h, W, B, x, y, dev, plan_out)
                   : forward<float>(h, W, B, x, y, dev, plan_out);
}

int igc_emu_backward(int is_double, const HostChain* h, const void* W, const void* B,
                     const EmuTensor* x, const EmuTensor* dy, const EmuTensor* dx,
                     const int32_t* starts, const int32_t* order, void* gw, void* gb,
                     int need_x, int need_w, int need_b, const EmuDevice* dev,
                     int64_t* plan_out) {
  return is_double ? backward<double>(h, W, B, x, dy, dx, starts, order, gw, gb, need_x, need_w,
                                      need_b, dev, plan_out)
                   : backward<float>(h, W, B, x, dy, dx, starts, order, gw, gb, need_x, need_w,
                                     need_b, dev, plan_out);
}

int igc_emu_sizeof_host_chain() { return static_cast<int>(sizeof(HostChain)); }

// 1: the emulated device has sm_90's stmatrix (the default); 0: the sm_80 code paths.
void igc_emu_set_stmatrix(int on) { igc_emu::device().stmatrix = on; }

// The L2 prefetch log (host_emulation.h): emptied, then recorded (on) or not from now on.
void igc_emu_prefetch_log(int on) {
  igc_emu::PrefetchLog& l = igc_emu::prefetch_log();
  std::lock_guard<std::mutex> g(l.mu);
  l.addr.clear();
  l.on = on != 0;
}
// The addresses recorded: their number, and with out (room for that number) the addresses.
int64_t igc_emu_prefetch_addresses(uint64_t* out) {
  igc_emu::PrefetchLog& l = igc_emu::prefetch_log();
  std::lock_guard<std::mutex> g(l.mu);
  if (out != nullptr)
    for (size_t i = 0; i < l.addr.size(); ++i) out[i] = l.addr[i];
  return static_cast<int64_t>(l.addr.size());
}

// mma_split<planes> (3 or 2) of n floats x: the planes' bfloat16 values (hi, mid, lo, or hi, lo)
// as floats in out[planes i .. planes i + planes - 1] (the pairs' low halves; x[i] with 0 in the
// high half).
void igc_emu_split(int planes, const float* x, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t p[3];
    mma_split_planes(planes, x[i], 0.0f, p);
    for (int k = 0; k < planes; ++k) out[planes * i + k] = mma_bf16_lo(p[k]);
  }
}

// mma_elem<tp>(r, t) of the tensor-core tiles (tp: 16, 32 or 64; -1 otherwise).
int igc_emu_mma_elem(int tp, int r, int t) {
  switch (tp) {
    case 16: return mma_elem<16>(r, t);
    case 32: return mma_elem<32>(r, t);
    case 64: return mma_elem<64>(r, t);
    default: return -1;
  }
}

// mma_elem<tp, true>: the in-place forward's layout
int igc_emu_mma_elem_wrap(int tp, int r, int t) {
  switch (tp) {
    case 16: return mma_elem<16, true>(r, t);
    case 32: return mma_elem<32, true>(r, t);
    case 64: return mma_elem<64, true>(r, t);
    default: return -1;
  }
}

}  // extern "C"
