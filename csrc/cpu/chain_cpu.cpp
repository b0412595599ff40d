// Fused CPU kernels of the interleaved group convolution chain (igc::chain_forward and
// igc::chain_backward for the CPU dispatch key).
//
// Algorithm. Positions (pixels or tokens) are cut into tiles of TILE = 64 positions. A tile is
// held in a per-thread buffer laid out [channel][position] in the accumulation type (float, or
// double for float64 inputs). Each layer is a set of small dense blocks: for every output row
// of a group, acc[t] = b + sum_i W[o, i] * in_row(i)[t] is a run of SIMD FMAs across the tile's
// positions, computed for OUT_BLOCK rows at once so the accumulators stay in registers.
// Permutations are never applied to data: layer l+1 reads its input channel j from row
// gather_l[j] of layer l's buffer, and the output store reads channel j from row gather_L[j].
// An input index is applied the same way: the tile holds x's C_in channels and layer 1 reads
// its input channel j from row input_index[j].
//
// Forward: read x once, write y once; the working set is two tile buffers per thread
// (2 * max(C_l) * TILE * 4 bytes, in L1/L2). No full-size intermediate tensor exists.
// Byte budget: bytes(x) + bytes(y). FLOPs: 2 * sum_l C_l n_l per position.
//
// Backward: read x and dy once, recompute the forward of the tile (u_1 .. u_{L-1}, the inputs
// of layers 2 .. L, kept in the tile's buffers; u_L is never needed), then walk the layers
// back: du_L is dy loaded with the inverse permutation (row gather_L[j] receives dy channel j),
// dh_{l-1} = W_l^T du_l lands directly in row gather_{l-1}[j] of the next du buffer, and dx
// (= dh_0) is written once (with an input index, dh_0's rows are first added into x's C_in
// rows in index order). Weight and bias gradients are accumulated in
// per-thread "lane" accumulators (VL lanes per weight, one SIMD register wide, so the position
// reduction needs no horizontal adds), summed over lanes at the end of the thread's chunk of
// tiles, and the per-chunk partial sums are added in chunk order: the result is bitwise
// reproducible for a given thread count. Byte budget: bytes(x) + bytes(dy) + bytes(dx) plus the
// weight gradients; FLOPs: about 3x the forward's (recompute
// of L-1 layers, dh, dW).
//
// Vector ISA: the tile functions carry GCC/Clang target_clones (x86-64-v4 = AVX-512,
// x86-64-v3 = AVX2 + FMA, default), so one build runs at the best ISA of the machine it runs on.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <array>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "chain_args.h"
#include "cpu/output_cache.h"
#include "positions.h"

#include "tiles.h"

namespace igc {

const char* cpu_kernel_isa() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4 (AVX-512)";
  if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3 (AVX2+FMA)";
  return "x86-64 baseline (SSE2)";
#else
  return "generic (compiler auto-vectorization)";
#endif
}

namespace {

template <typename acc_t, int OB>
IGC_INLINE void accumulate_dw_rows(const acc_t* __restrict d, const acc_t* __restrict h,
                                   const int32_t* h_rows, int64_t n, acc_t* __restrict ln) {
  using S = Simd<acc_t>;
  using V = typename S::V;
  constexpr int NV = S::PER_ROW;
  V dv[OB][NV];
#pragma GCC unroll 4
  for (int k = 0; k < OB; ++k)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) dv[k][j] = S::load(d + k * TILE + j * S::LANES);
  for (int64_t i = 0; i < n; ++i) {
    const acc_t* __restrict hr = h + static_cast<int64_t>(h_rows[i]) * TILE;
    V hv[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) hv[j] = S::load(hr + j * S::LANES);
#pragma GCC unroll 4
    for (int k = 0; k < OB; ++k) {
      acc_t* lp = ln + (k * n + i) * S::LANES;
      V s = S::load(lp);
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) s += dv[k][j] * hv[j];
      S::store(lp, s);
    }
  }
}

template <typename acc_t>
IGC_INLINE void accumulate_dw(const acc_t* __restrict du, const acc_t* __restrict h,
                              const int32_t* h_rows, int64_t G, int64_t n, int64_t m,
                              acc_t* __restrict lanes) {
  constexpr int LN = Simd<acc_t>::LANES;
  for (int64_t g = 0; g < G; ++g) {
    int64_t o = 0;
    for (; o + 2 <= m; o += 2)
      accumulate_dw_rows<acc_t, 2>(du + (g * m + o) * TILE, h, h_rows + g * n, n,
                                   lanes + (g * m + o) * n * LN);
    for (; o < m; ++o)
      accumulate_dw_rows<acc_t, 1>(du + (g * m + o) * TILE, h, h_rows + g * n, n,
                                   lanes + (g * m + o) * n * LN);
  }
}

template <typename acc_t>
IGC_INLINE void accumulate_db(const acc_t* __restrict du, int64_t C, acc_t* __restrict lanes) {
  using S = Simd<acc_t>;
  for (int64_t o = 0; o < C; ++o) {
    typename S::V s = S::load(lanes + o * S::LANES);
#pragma GCC unroll 8
    for (int j = 0; j < S::PER_ROW; ++j) s += S::load(du + o * TILE + j * S::LANES);
    S::store(lanes + o * S::LANES, s);
  }
}

// Everything a tile function needs, in raw pointers (acc_t-typed weights and biases).
template <typename scalar_t, typename acc_t>
struct ChainCtx {
  int64_t L = 0;
  int64_t P = 0;  // positions
  int64_t cmax = 0;
  const int64_t* C = nullptr;
  const int64_t* G = nullptr;
  const int64_t* n = nullptr;
  const int64_t* m = nullptr;
  int64_t cin = 0;                     // channels of x (C_in)
  const int32_t* in_rows0 = nullptr;   // layer 1's input rows: the input index, or iota
  bool has_index = false;
  std::vector<const acc_t*> W, b;      // per layer (b may be null)
  std::vector<const int32_t*> gather;  // per layer
  const int32_t* iota = nullptr;       // 0..cmax-1
  // tensors
  const scalar_t* x = nullptr;
  TensorIndexer x_ix;
  scalar_t* y = nullptr;
  TensorIndexer y_ix;
  const scalar_t* dy = nullptr;
  TensorIndexer dy_ix;
  scalar_t* dx = nullptr;
  TensorIndexer dx_ix;
  bool need_x = false, need_w = false, need_b = false;
  std::vector<int64_t> w_off, b_off;  // offsets of layer l in the flat gradient arrays
  int64_t nw = 0, nb = 0;
};

template <typename scalar_t, typename acc_t>
IGC_INLINE void forward_tiles(const ChainCtx<scalar_t, acc_t>& k, int64_t tile_begin,
                              int64_t tile_end) {
  std::vector<acc_t> storage(static_cast<size_t>(2 * k.cmax * TILE));
  acc_t* buf[2] = {storage.data(), storage.data() + k.cmax * TILE};
  int64_t off_x[TILE], off_y[TILE];
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t p0 = tile * TILE;
    const int tvalid = static_cast<int>(std::min<int64_t>(TILE, k.P - p0));
    const bool cx = tile_offsets(k.x_ix, p0, tvalid, off_x);
    load_tile(k.x, off_x, cx, tvalid, k.cin, k.x_ix.chan_stride, k.iota, buf[0]);
    int cur = 0;
    for (int64_t l = 0; l < k.L; ++l) {
      const int32_t* in_rows = l == 0 ? k.in_rows0 : k.gather[l - 1];
      grouped_layer(buf[cur], in_rows, k.W[l], k.b[l], k.G[l], k.m[l], k.n[l], k.n[l],
                    int64_t(1), buf[cur ^ 1], k.iota);
      cur ^= 1;
    }
    const bool cy = tile_offsets(k.y_ix, p0, tvalid, off_y);
    store_tile(k.y, off_y, cy, tvalid, k.C[k.L], k.y_ix.chan_stride, k.gather[k.L - 1], buf[cur]);
  }
}

// Processes tiles [tile_begin, tile_end) and writes this chunk's weight / bias gradient sums
// (lane-reduced, acc_t) into part_w / part_b.
template <typename scalar_t, typename acc_t, int VL>
IGC_INLINE void backward_tiles(const ChainCtx<scalar_t, acc_t>& k, int64_t tile_begin,
                               int64_t tile_end, acc_t* part_w, acc_t* part_b) {
  const int64_t L = k.L;
  std::vector<int64_t> u_off(L + 1);
  int64_t total = k.cin * TILE;  // x tile
  for (int64_t l = 0; l + 1 < L; ++l) {
    u_off[l] = total;
    total += k.C[l + 1] * TILE;
  }
  const int64_t d_off = total;
  total += 2 * k.cmax * TILE;
  std::vector<acc_t> storage(static_cast<size_t>(total));
  acc_t* X = storage.data();
  std::vector<acc_t*> U(L);
  for (int64_t l = 0; l + 1 < L; ++l) U[l] = storage.data() + u_off[l];
  acc_t* D[2] = {storage.data() + d_off, storage.data() + d_off + k.cmax * TILE};
  std::vector<acc_t> lw(k.need_w ? static_cast<size_t>(k.nw * VL) : 0, acc_t(0));
  std::vector<acc_t> lb(k.need_b ? static_cast<size_t>(k.nb * VL) : 0, acc_t(0));
  int64_t off_x[TILE], off_dy[TILE], off_dx[TILE];

  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t p0 = tile * TILE;
    const int tvalid = static_cast<int>(std::min<int64_t>(TILE, k.P - p0));
    const bool cx = tile_offsets(k.x_ix, p0, tvalid, off_x);
    load_tile(k.x, off_x, cx, tvalid, k.cin, k.x_ix.chan_stride, k.iota, X);
    // Recompute u_1 .. u_{L-1}: the gradients need the inputs of every layer, never u_L.
    for (int64_t l = 0; l + 1 < L; ++l) {
      const acc_t* in = l == 0 ? X : U[l - 1];
      const int32_t* in_rows = l == 0 ? k.in_rows0 : k.gather[l - 1];
      grouped_layer(in, in_rows, k.W[l], k.b[l], k.G[l], k.m[l], k.n[l], k.n[l], int64_t(1),
                    U[l], k.iota);
    }
    const bool cdy = tile_offsets(k.dy_ix, p0, tvalid, off_dy);
    int cur = 0;  // D[cur] holds du_l in natural (u) row order
    load_tile(k.dy, off_dy, cdy, tvalid, k.C[L], k.dy_ix.chan_stride, k.gather[L - 1], D[cur]);
    for (int64_t l = L - 1; l >= 0; --l) {
      if (k.need_b && k.b[l] != nullptr)
        accumulate_db<acc_t>(D[cur], k.C[l + 1], lb.data() + k.b_off[l] * VL);
      const acc_t* h = l == 0 ? X : U[l - 1];
      const int32_t* h_rows = l == 0 ? k.in_rows0 : k.gather[l - 1];
      if (k.need_w)
        accumulate_dw<acc_t>(D[cur], h, h_rows, k.G[l], k.n[l], k.m[l],
                                 lw.data() + k.w_off[l] * VL);
      if (l > 0 || k.need_x) {
        // dh_{l-1}[j] = sum_o W[o, j] du[o]; lands in row gather_{l-1}[j] (or row j of dx).
        const int32_t* out_rows = l == 0 ? k.iota : k.gather[l - 1];
        grouped_layer(D[cur], k.iota, k.W[l], static_cast<const acc_t*>(nullptr), k.G[l], k.n[l],
                      k.m[l], int64_t(1), k.n[l], D[cur ^ 1], out_rows);
        cur ^= 1;
      }
    }
    if (k.need_x) {
      if (k.has_index) {
        // dx[c] = sum of dh_0[j] over j with input_index[j] == c, added in j order; the du_1
        // buffer (no longer needed) receives x's C_in rows.
        acc_t* dxb = D[cur ^ 1];
        std::fill(dxb, dxb + k.cin * TILE, acc_t(0));
        for (int64_t j = 0; j < k.C[0]; ++j) {
          acc_t* __restrict dst = dxb + static_cast<int64_t>(k.in_rows0[j]) * TILE;
          const acc_t* __restrict src = D[cur] + j * TILE;
          for (int t = 0; t < TILE; ++t) dst[t] += src[t];
        }
        cur ^= 1;
      }
      const bool cdx = tile_offsets(k.dx_ix, p0, tvalid, off_dx);
      store_tile(k.dx, off_dx, cdx, tvalid, k.cin, k.dx_ix.chan_stride, k.iota, D[cur]);
    }
  }
  for (int64_t e = 0; k.need_w && e < k.nw; ++e) {
    acc_t s = 0;
    for (int v = 0; v < VL; ++v) s += lw[e * VL + v];
    part_w[e] = s;
  }
  for (int64_t e = 0; k.need_b && e < k.nb; ++e) {
    acc_t s = 0;
    for (int v = 0; v < VL; ++v) s += lb[e * VL + v];
    part_b[e] = s;
  }
}

// Non-template entry points, one per dtype, cloned per ISA.
#define IGC_DEFINE_TILE_FNS(scalar_t, acc_t, suffix)                                         \
  IGC_TARGET_CLONES void forward_tiles_##suffix(const ChainCtx<scalar_t, acc_t>& k,         \
                                                int64_t b, int64_t e) {                     \
    forward_tiles<scalar_t, acc_t>(k, b, e);                                                \
  }                                                                                         \
  IGC_TARGET_CLONES void backward_tiles_##suffix(const ChainCtx<scalar_t, acc_t>& k,        \
                                                 int64_t b, int64_t e, acc_t* pw,           \
                                                 acc_t* pb) {                               \
    backward_tiles<scalar_t, acc_t, Simd<acc_t>::LANES>(k, b, e, pw, pb);                   \
  }                                                                                         \
  void run_forward(const ChainCtx<scalar_t, acc_t>& k, int64_t b, int64_t e) {              \
    forward_tiles_##suffix(k, b, e);                                                        \
  }                                                                                         \
  void run_backward(const ChainCtx<scalar_t, acc_t>& k, int64_t b, int64_t e, acc_t* pw,    \
                    acc_t* pb) {                                                            \
    backward_tiles_##suffix(k, b, e, pw, pb);                                               \
  }

IGC_FOR_EACH_CPU_DTYPE(IGC_DEFINE_TILE_FNS)
#undef IGC_DEFINE_TILE_FNS

// Holds the acc_t copies of weights and biases and the index tables for one call.
template <typename scalar_t, typename acc_t>
struct Prepared {
  ChainDesc d;
  std::vector<at::Tensor> keep;
  std::vector<int32_t> iota;
  ChainCtx<scalar_t, acc_t> ctx;
};

template <typename scalar_t, typename acc_t>
void prepare(Prepared<scalar_t, acc_t>& pr, const at::Tensor& x, at::TensorList weights,
             at::TensorList biases) {
  const ChainDesc& d = pr.d;
  auto& k = pr.ctx;
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  k.L = d.L;
  k.C = d.C.data();
  k.G = d.G.data();
  k.n = d.n.data();
  k.m = d.m.data();
  k.cmax = std::max(d.C_in, *std::max_element(d.C.begin(), d.C.end()));
  pr.iota.resize(static_cast<size_t>(k.cmax));
  for (int64_t i = 0; i < k.cmax; ++i) pr.iota[i] = static_cast<int32_t>(i);
  k.iota = pr.iota.data();
  k.cin = d.C_in;
  k.has_index = d.has_index;
  k.in_rows0 = d.has_index ? d.input_gather.data() : k.iota;
  int64_t wo = 0, bo = 0;
  for (int64_t l = 0; l < d.L; ++l) {
    at::Tensor w = weights[l].to(acc_type).contiguous();
    pr.keep.push_back(w);
    k.W.push_back(w.data_ptr<acc_t>());
    k.w_off.push_back(wo);
    wo += d.C[l + 1] * d.n[l];
    if (d.has_bias[l]) {
      at::Tensor bc = biases[l].to(acc_type).contiguous();
      pr.keep.push_back(bc);
      k.b.push_back(bc.data_ptr<acc_t>());
      k.b_off.push_back(bo);
      bo += d.C[l + 1];
    } else {
      k.b.push_back(nullptr);
      k.b_off.push_back(-1);
    }
    k.gather.push_back(d.gather[l].data());
  }
  k.nw = wo;
  k.nb = bo;
  k.P = x.numel() / std::max<int64_t>(1, x.size(1));
  k.x = x.data_ptr<scalar_t>();
  k.x_ix = make_indexer(x);
}

at::Tensor chain_forward_cpu(const at::Tensor& x, at::TensorList weights,
                             at::TensorList biases, at::IntArrayRef groups,
                             at::IntArrayRef shuffles, const OptTensorList& perms,
                             const std::optional<at::Tensor>& input_index) {
  TORCH_CHECK(x.device().is_cpu(), "igc::chain_forward (cpu): x must be a CPU tensor");
  ChainDesc d = check_chain("igc::chain_forward", x, weights, biases, groups, shuffles, perms,
                            input_index, /*read_perms=*/true);
  at::Tensor y = cached_output(x, d.C.back(),
                               std::vector<int64_t>(x.sizes().begin() + 2, x.sizes().end()));
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "igc_chain_forward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    Prepared<scalar_t, acc_t> pr;
    pr.d = std::move(d);
    prepare(pr, x, weights, biases);
    auto& k = pr.ctx;
    k.y = y.data_ptr<scalar_t>();
    k.y_ix = make_indexer(y);
    const int64_t ntiles = (k.P + TILE - 1) / TILE;
    at::parallel_for(0, ntiles, 1, [&](int64_t b, int64_t e) { run_forward(k, b, e); });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> chain_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, at::TensorList weights,
    at::TensorList biases, at::IntArrayRef groups, at::IntArrayRef shuffles,
    const OptTensorList& perms, std::array<bool, 3> output_mask,
    const std::optional<at::Tensor>& input_index) {
  TORCH_CHECK(x.device().is_cpu() && grad_y.device().is_cpu(),
              "igc::chain_backward (cpu): x and grad_y must be CPU tensors");
  ChainDesc d = check_chain("igc::chain_backward", x, weights, biases, groups, shuffles, perms,
                            input_index, /*read_perms=*/true);
  check_grad_y("igc::chain_backward", grad_y, x, d);
  const bool need_x = output_mask[0], need_w = output_mask[1], need_b = output_mask[2];
  at::Tensor gx = need_x ? empty_layout(x, d.C_in) : at::empty({0}, x.options());
  at::Tensor gw = at::zeros({need_w ? d.num_weight_elems : 0}, x.options());
  at::Tensor gb = at::zeros({need_b ? d.num_bias_elems : 0}, x.options());
  const int64_t P = x.numel() / std::max<int64_t>(1, x.size(1));
  if (P == 0 || (!need_x && !need_w && !need_b)) return {gx, gw, gb};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "igc_chain_backward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    constexpr int VL = Simd<acc_t>::LANES;
    Prepared<scalar_t, acc_t> pr;
    pr.d = std::move(d);
    prepare(pr, x, weights, biases);
    auto& k = pr.ctx;
    k.need_x = need_x;
    k.need_w = need_w;
    k.need_b = need_b && k.nb > 0;
    k.dy = grad_y.data_ptr<scalar_t>();
    k.dy_ix = make_indexer(grad_y);
    if (need_x) {
      k.dx = gx.data_ptr<scalar_t>();
      k.dx_ix = make_indexer(gx);
    }
    const int64_t ntiles = (P + TILE - 1) / TILE;
    // One chunk (contiguous range of tiles, private lane accumulators) per thread; capped so
    // the lanes of all chunks stay under 256 MiB. The chunking depends only on the thread
    // count, so the fixed-order reduction below is bitwise reproducible at that count.
    const int64_t lane_bytes = (k.nw + k.nb) * VL * static_cast<int64_t>(sizeof(acc_t));
    const int64_t mem_cap = std::max<int64_t>(1, (int64_t(256) << 20) / std::max<int64_t>(1, lane_bytes));
    const int64_t nchunks =
        std::max<int64_t>(1, std::min<int64_t>({(int64_t)at::get_num_threads(), ntiles, mem_cap}));
    const int64_t per = (ntiles + nchunks - 1) / nchunks;
    std::vector<acc_t> part_w(static_cast<size_t>(nchunks * k.nw), acc_t(0));
    std::vector<acc_t> part_b(static_cast<size_t>(nchunks * k.nb), acc_t(0));
    at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        const int64_t tb = c * per, te = std::min(ntiles, tb + per);
        if (tb >= te) continue;
        run_backward(k, tb, te, part_w.data() + c * k.nw, part_b.data() + c * k.nb);
      }
    });
    if (need_w) {
      std::vector<acc_t> sum(static_cast<size_t>(k.nw), acc_t(0));
      for (int64_t c = 0; c < nchunks; ++c)
        for (int64_t e = 0; e < k.nw; ++e) sum[e] += part_w[c * k.nw + e];
      scalar_t* o = gw.data_ptr<scalar_t>();
      for (int64_t e = 0; e < k.nw; ++e) o[e] = static_cast<scalar_t>(sum[e]);
    }
    if (k.need_b) {
      std::vector<acc_t> sum(static_cast<size_t>(k.nb), acc_t(0));
      for (int64_t c = 0; c < nchunks; ++c)
        for (int64_t e = 0; e < k.nb; ++e) sum[e] += part_b[c * k.nb + e];
      scalar_t* o = gb.data_ptr<scalar_t>();
      for (int64_t e = 0; e < k.nb; ++e) o[e] = static_cast<scalar_t>(sum[e]);
    }
  });
  return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(igc, CPU, m) {
  m.impl("chain_forward", &chain_forward_cpu);
  m.impl("chain_backward", &chain_backward_cpu);
}

}  // namespace igc
