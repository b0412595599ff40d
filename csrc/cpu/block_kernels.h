// Fused CPU kernel of a whole block (igc::block_forward, inference only): a chain of grouped
// layers, each pointwise (1x1) or spatial (grouped / depth-wise k x k, k odd <= 7, stride 1 or
// 2, padding k // 2), each with an optional bias and activation (relu, relu6, hardswish) and the
// permutation after it, and an optional residual add of x. x is read once and y written once.
//
// Algorithm. Pointwise layers run on tiles of positions held [channel][position] (tiles.h, the
// chain kernel's micro-kernel), activations applied to the tile in place. A block has at most
// one spatial layer s (more are refused). Layers 1 .. s-1 (the prefix) map x's positions to the
// spatial layer's input h_{s-1}; layers s+1 .. L (the suffix) map the spatial layer's output
// positions to y. The prefix's output goes into a zero-padded scratch, which the spatial layer
// reads back:
// - depth-wise layers (one input per group): a channels-last scratch [row][column][channel],
//   channel o holding input channel o / m (m: the channel multiplier), written by the
//   transposed tile store (or, without a prefix, input index or multiplier, copied from a
//   channels-last x position by position); each output position is K*K vector FMAs per 16
//   channels with the tap weights in registers, and the channels-last result enters the tile
//   by a transposed load;
// - other grouped layers: a planar scratch [channel][row][column phase][column / stride]
//   (stride-2 columns de-interleaved), read tap by tap as contiguous runs of each output row.
// The suffix layers, the residual add (x reloaded at the tile's positions) and the store follow
// on the same tile.
//
// Work split. Each unit of work is one image's band of output rows, run start to end by one
// thread with a private scratch of the band's input rows (bands are sized to keep the scratch
// near 512 KiB, and narrowed at batch sizes below the thread count so that every thread gets
// an equal share; the k - s halo rows between bands are computed twice). When bands that small
// would compute more than an eighth of their prefix twice (small images, few of them), the
// scratch holds every image's whole padded plane instead: phase 1 fills it in parallel, phase
// 2 computes the spatial layer and the suffix in parallel, each image split into one range of
// positions per thread (unit_length). A tile of a partial range is computed on its valid
// vectors only. Outputs and the whole-plane scratch come from the output cache
//
// This header holds the kernels of one dtype: block_cpu_<dtype>.cpp defines IGC_BLOCK_DTYPE(M)
// as M(scalar_t, acc_t, suffix) of its dtype and includes it, so that the build compiles the
// dtypes' kernels in parallel (in one file they took minutes on one core); block_cpu.cpp checks
// the arguments and calls block_forward_<suffix>.
#pragma once

#ifndef IGC_BLOCK_DTYPE
#error "define IGC_BLOCK_DTYPE(M) as M(scalar_t, acc_t, suffix) before including block_kernels.h"
#endif

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "block_cpu.h"
#include "chain_args.h"
#include "gemm_cl.h"
#include "output_cache.h"
#include "tiles.h"

namespace igc {
namespace {

// Scratch of one band of rows (banded work split): about this many bytes.
constexpr int64_t kBandScratchBytes = int64_t(512) << 10;

// Vectors of positions a tile of tvalid positions is computed on: the valid ones rounded up to
// whole vectors (float tiles; double tiles are always computed whole, see grouped_layer_narrow).
template <typename acc_t>
IGC_INLINE int tile_vectors(int tvalid) {
  constexpr int LN = Simd<acc_t>::LANES;
  return Simd<acc_t>::PER_ROW == 4 ? (tvalid + LN - 1) / LN : Simd<acc_t>::PER_ROW;
}

// The activation on the first nv vectors of `rows` tile rows. (Loops are specialised per
// activation by switches, not lambdas: a lambda's body would not inherit the target_clones ISA
// of its caller and compile for the baseline ISA.)
template <int ACT, typename acc_t>
IGC_INLINE void activate_rows(acc_t* v, int64_t rows, int nv) {
  using S = Simd<acc_t>;
  for (int64_t r = 0; r < rows; ++r)
    for (int j = 0; j < nv; ++j) {
      acc_t* p = v + r * TILE + j * S::LANES;
      S::store(p, activate_vec<ACT>(S::load(p)));
    }
}

template <typename acc_t>
IGC_INLINE void activate(acc_t* v, int64_t rows, int nv, int act) {
  switch (act) {
    case kRelu: return activate_rows<kRelu>(v, rows, nv);
    case kRelu6: return activate_rows<kRelu6>(v, rows, nv);
    case kHardswish: return activate_rows<kHardswish>(v, rows, nv);
    default: return;
  }
}

// Positions per unit of parallel work over `positions` positions of each of `images` images:
// TILE when there are many tiles per thread; else an equal share of an image per thread,
// rounded up to a multiple of `grain` (the vector width for [channel][position] tiles, which
// compute whole vectors of positions; 1 for channels-last tiles), which the unit computes as
// tiles of TILE and a narrower last one. At batch 1 and 14x14 on two threads, [channel][position]
// tiles: two units of 112 and 84 positions (64 + 48 and 64 + 32 computed) instead of tiles of
// 64, 64 | 64, 4 (128 against 68 positions, the last tile computed whole); channels-last
// tiles: 98 and 98.
inline int64_t unit_length(int64_t positions, int64_t images, int64_t threads, int64_t grain) {
  const int64_t parts = std::max<int64_t>(1, (threads + images - 1) / images);
  if ((positions + TILE - 1) / TILE >= 8 * parts) return TILE;
  const int64_t per = (positions + parts - 1) / parts;
  return std::max<int64_t>(grain, (per + grain - 1) / grain * grain);
}

template <typename scalar_t, typename acc_t>
struct BlockCtx {
  int64_t L = 0;
  const int64_t* C = nullptr;
  const int64_t* G = nullptr;
  const int64_t* n = nullptr;
  const int64_t* m = nullptr;
  int64_t cin = 0, cmax = 0;
  const int32_t* in_rows0 = nullptr;  // layer 1's input rows: the input index, or iota
  const int32_t* iota = nullptr;
  std::vector<const acc_t*> W, b;
  std::vector<const int32_t*> gather;
  std::vector<int> act;
  bool residual = false;
  const scalar_t* x = nullptr;
  TensorIndexer x_ix;
  scalar_t* y = nullptr;
  TensorIndexer y_ix;
  int64_t P_out = 0;  // output positions
  // spatial layer (sl < 0: none)
  int64_t sl = -1, k = 1, s = 1, pad = 0;
  int64_t H = 1, Wd = 1, Ho = 1, Wo = 1;
  int64_t wph = 0, row_len = 0;  // planar: padded columns per phase, s * wph
  // Depth-wise layers (one input per group; C_s outputs, m per input) use a channels-last
  // scratch: [row][padded column][cps floats], channel o holding input channel o / m (so a
  // channel multiplier is a plain depth-wise product), computed 16 channels per vector.
  bool cl = false;
  int64_t cp = 0;                // channels computed per position (C_s rounded up to LANES)
  int64_t cps = 0;               // floats per scratch position (cp, or more: see cl_fill_impl)
  int64_t scr_ch = 0;            // planar: C_{s-1} channel planes; channels-last: 1
  const int32_t* exp_rows = nullptr;  // channels-last: buffer row of scratch channel o
  // channels-last, no prefix: scratch channel o is x's channel o (no input index or channel
  // multiplier) and x's channels are contiguous, so phase 1 copies x (copy_x_to_scratch)
  bool x_copy = false;
  const acc_t* wt = nullptr;     // channels-last: weights [tap][cp], bias [cp] (zero padded)
  const acc_t* bt = nullptr;
  // Channels-last tiles (float32 x with contiguous channels and packed weights: gemm_cl.h).
  // Tiles hold position t's channels at row t (stride cl_ld); layer l's input i of group g is
  // column cl_cols[l][g n + i] of its input tile, y channel j column cl_ymap[j] of the last one.
  // A depth-wise layer computes its output o in the column of its input o (the layers'
  // permutations commute with it), so its output tile is column-permuted like its input.
  bool gemm = false;
  int64_t cl_ld = 0;
  std::vector<const float*> cl_packed;
  std::vector<std::vector<int32_t>> cl_cols;
  std::vector<int32_t> cl_ymap;
  // The store's vectors of y channels (plan_cl_store): y channels 16 v .. 16 v + 15 are lanes
  // cl_ysel[16 v ..] of the 32 tile columns from cl_ybase[v]; -1: stored channel by channel.
  std::vector<int32_t> cl_ybase, cl_ysel;
};

// unit_length's grain for the block's tiles; 0 for tiles that are always computed whole
// (double), which then take units of TILE.
template <typename scalar_t, typename acc_t>
int64_t unit_grain(const BlockCtx<scalar_t, acc_t>& k) {
  if (k.gemm) return 1;
  return Simd<acc_t>::PER_ROW == 4 ? Simd<acc_t>::LANES : 0;
}

// Layers [l0, l1) on the tile in buf[cur]; returns the buffer holding the result.
template <typename scalar_t, typename acc_t>
IGC_INLINE int pointwise_layers_impl(const BlockCtx<scalar_t, acc_t>& k, int64_t l0, int64_t l1,
                                     acc_t* const* buf, int cur, int nv) {
  for (int64_t l = l0; l < l1; ++l) {
    const int32_t* in_rows = l == 0 ? k.in_rows0 : k.gather[l - 1];
    grouped_layer_narrow(buf[cur], in_rows, k.W[l], k.b[l], k.G[l], k.m[l], k.n[l], k.n[l],
                         int64_t(1), buf[cur ^ 1], k.iota, nv);
    cur ^= 1;
    activate(buf[cur], k.C[l + 1], nv, k.act[l]);
  }
  return cur;
}

// One compiled copy of the layers per dtype and ISA (target_clones), called from every tile
// loop: inlining the micro-kernels' variants (4 widths x 3 row blocks) at each call site made
// this file take minutes to compile.
#define IGC_DEFINE_LAYERS(scalar_t, acc_t, suffix)                                            \
  IGC_TARGET_CLONES int layers_##suffix(const BlockCtx<scalar_t, acc_t>& k, int64_t l0,       \
                                        int64_t l1, acc_t* const* buf, int cur, int nv) {     \
    return pointwise_layers_impl(k, l0, l1, buf, cur, nv);                                    \
  }                                                                                           \
  inline int pointwise_layers(const BlockCtx<scalar_t, acc_t>& k, int64_t l0, int64_t l1,     \
                              acc_t* const* buf, int cur, int nv) {                           \
    return layers_##suffix(k, l0, l1, buf, cur, nv);                                          \
  }
IGC_BLOCK_DTYPE(IGC_DEFINE_LAYERS)
#undef IGC_DEFINE_LAYERS

// The last layer's result in buf[cur] (+ x), stored to y at output positions q0 .. q0+tvalid-1.
template <typename scalar_t, typename acc_t>
IGC_INLINE void finish_tile(const BlockCtx<scalar_t, acc_t>& k, int64_t q0, int tvalid,
                            acc_t* const* buf, int cur) {
  const int64_t CL = k.C[k.L];
  const int32_t* rows = k.gather[k.L - 1];
  int64_t off[TILE];
  if (k.residual) {  // x at the same positions (stride 1), row rows[j] <- x channel j
    const bool cx = tile_offsets(k.x_ix, q0, tvalid, off);
    load_tile(k.x, off, cx, tvalid, k.cin, k.x_ix.chan_stride, rows, buf[cur ^ 1]);
    acc_t* __restrict a = buf[cur];
    const acc_t* __restrict r = buf[cur ^ 1];
    const int64_t n = std::min<int64_t>(TILE, tile_vectors<acc_t>(tvalid) * Simd<acc_t>::LANES);
    for (int64_t c = 0; c < CL; ++c)
      for (int64_t t = 0; t < n; ++t) a[c * TILE + t] += r[c * TILE + t];
  }
  const bool cy = tile_offsets(k.y_ix, q0, tvalid, off);
  store_tile(k.y, off, cy, tvalid, CL, k.y_ix.chan_stride, rows, buf[cur]);
}

// Working memory of the calling thread, reused across calls (grow-only, one slot per use):
// fresh allocations of these buffers (up to ~1 MiB per call: two tiles of C_max channels, the
// depth-wise result tile, a band's scratch) cost a memset and page faults on every call, which at
// batch 1 is a large part of a block's time. Requests over kThreadBufferCap get a buffer of the
// call's own instead, so that one huge call does not pin memory for the thread's life.
constexpr size_t kThreadBufferCap = size_t(8) << 20;

template <typename acc_t>
struct ThreadBuffer {
  std::vector<acc_t> own;  // used when the request exceeds the cap
  acc_t* ptr = nullptr;
  ThreadBuffer(int slot, int64_t count) {
    const size_t n = static_cast<size_t>(std::max<int64_t>(count, 1));
    if (n * sizeof(acc_t) > kThreadBufferCap) {
      own.resize(n);
      ptr = own.data();
      return;
    }
    thread_local std::vector<acc_t> slots[3];
    std::vector<acc_t>& b = slots[slot];
    if (b.size() < n) {
      b.clear();
      b.shrink_to_fit();
      b.resize(n);  // zeroed once: later calls see only finite leftovers in unused lanes
    }
    ptr = b.data();
  }
};
enum ThreadBufferSlot : int { kTilesSlot = 0, kDepthwiseSlot = 1, kScratchSlot = 2 };

// Two tile buffers of a thread.
template <typename acc_t>
struct TileBuffers {
  ThreadBuffer<acc_t> storage;
  acc_t* buf[2];
  explicit TileBuffers(int64_t cmax) : storage(kTilesSlot, 2 * cmax * TILE) {
    buf[0] = storage.ptr;
    buf[1] = storage.ptr + cmax * TILE;
  }
};

// A block without a spatial layer: tiles over positions.
template <typename scalar_t, typename acc_t>
IGC_INLINE void pointwise_tiles_impl(const BlockCtx<scalar_t, acc_t>& k, int64_t p_begin,
                                     int64_t p_end) {
  TileBuffers<acc_t> b(k.cmax);
  acc_t* const* buf = b.buf;
  int64_t off[TILE];
  for (int64_t p0 = p_begin; p0 < p_end; p0 += TILE) {
    const int tvalid = static_cast<int>(std::min<int64_t>(TILE, p_end - p0));
    const bool cx = tile_offsets(k.x_ix, p0, tvalid, off);
    load_tile(k.x, off, cx, tvalid, k.cin, k.x_ix.chan_stride, k.iota, buf[0]);
    const int cur = pointwise_layers(k, 0, k.L, buf, 0, tile_vectors<acc_t>(tvalid));
    finish_tile(k, p0, tvalid, buf, cur);
  }
}

// Scratch offsets of the input positions p0 .. p0+tvalid-1 (flat within the image) in the
// scratch of a band starting at row0.
template <typename scalar_t, typename acc_t>
IGC_INLINE void scratch_offsets(const BlockCtx<scalar_t, acc_t>& k, int64_t p0, int tvalid,
                                int64_t row0, int64_t* dst) {
  for (int t = 0; t < tvalid; ++t) {
    const int64_t iy = (p0 + t) / k.Wd, ix = (p0 + t) - iy * k.Wd;
    if (k.cl) {
      dst[t] = (iy - row0) * k.row_len + (ix + k.pad) * k.cps;
    } else {
      const int64_t cp = ix + k.pad;
      dst[t] = (iy - row0) * k.row_len + (cp % k.s) * k.wph + cp / k.s;
    }
  }
}

// The prefix's result (tile) into the scratch at offsets dst: channels-last, a transposed store
// (channel o of the spatial layer's output holds input o / m); planar, one channel plane per
// input channel.
template <typename scalar_t, typename acc_t>
IGC_INLINE void scatter_to_scratch(const BlockCtx<scalar_t, acc_t>& k, const int64_t* dst,
                                   int tvalid, int64_t plane, acc_t* scratch, const acc_t* tile) {
  if (k.cl) {
    store_tile(scratch, dst, false, tvalid, k.C[k.sl + 1], int64_t(1), k.exp_rows, tile);
    return;
  }
  const int32_t* src_rows = k.sl == 0 ? k.in_rows0 : k.gather[k.sl - 1];
  for (int64_t j = 0; j < k.C[k.sl]; ++j) {
    const acc_t* __restrict r = tile + static_cast<int64_t>(src_rows[j]) * TILE;
    acc_t* __restrict d = scratch + j * plane;
    for (int t = 0; t < tvalid; ++t) d[dst[t]] = r[t];
  }
}

// x's channels-last rows at offsets off into the channels-last scratch at offsets dst: scratch
// channel o of position t is x channel rows[o] (rows null: o), for o < C.
template <typename scalar_t, typename acc_t>
IGC_INLINE void copy_x_to_scratch(const scalar_t* x, const int64_t* off, const int64_t* dst,
                                  int tvalid, int64_t C, const int32_t* rows, acc_t* scratch) {
  for (int t = 0; t < tvalid; ++t) {
    const scalar_t* __restrict xr = x + off[t];
    acc_t* __restrict d = scratch + dst[t];
    if (rows == nullptr)
      for (int64_t o = 0; o < C; ++o) d[o] = static_cast<acc_t>(xr[o]);
    else
      for (int64_t o = 0; o < C; ++o) d[o] = static_cast<acc_t>(xr[rows[o]]);
  }
}

// Phase 1 for input positions p_begin .. p_end - 1 of image img (flat within the image, whole
// or partial rows): the prefix layers, scattered into the scratch of a band starting at row0.
template <typename scalar_t, typename acc_t>
IGC_INLINE void fill_scratch_impl(const BlockCtx<scalar_t, acc_t>& k, int64_t img, int64_t p_begin,
                             int64_t p_end, int64_t row0, int64_t plane, acc_t* scratch,
                             acc_t* const* buf) {
  int64_t off[TILE], dst[TILE];
  for (int64_t p0 = p_begin; p0 < p_end; p0 += TILE) {
    const int tvalid = static_cast<int>(std::min<int64_t>(TILE, p_end - p0));
    const int64_t g0 = img * k.H * k.Wd + p0;
    const bool cx = tile_offsets(k.x_ix, g0, tvalid, off);
    if (k.x_copy) {  // x straight into the scratch, not through the tile and two transposes
      scratch_offsets(k, p0, tvalid, row0, dst);
      copy_x_to_scratch(k.x, off, dst, tvalid, k.cin, nullptr, scratch);
      continue;
    }
    load_tile(k.x, off, cx, tvalid, k.cin, k.x_ix.chan_stride, k.iota, buf[0]);
    const int cur = pointwise_layers(k, 0, k.sl, buf, 0, tile_vectors<acc_t>(tvalid));
    scratch_offsets(k, p0, tvalid, row0, dst);
    scatter_to_scratch(k, dst, tvalid, plane, scratch, buf[cur]);
  }
}

// Zero the padding of the scratch rows [r_begin, r_end) (relative rows): rows outside the image
// entirely, columns outside it in the others.
template <typename scalar_t, typename acc_t>
IGC_INLINE void zero_padding(const BlockCtx<scalar_t, acc_t>& k, int64_t row0, int64_t r_begin,
                             int64_t r_end, int64_t plane, acc_t* scratch) {
  if (k.cl) {
    for (int64_t r = r_begin; r < r_end; ++r) {
      acc_t* row = scratch + r * k.row_len;
      const int64_t iy = row0 + r;
      if (iy < 0 || iy >= k.H) {
        std::fill(row, row + k.row_len, acc_t(0));
      } else {
        std::fill(row, row + k.pad * k.cps, acc_t(0));
        std::fill(row + (k.pad + k.Wd) * k.cps, row + k.row_len, acc_t(0));
        // channels past C_s of the image's columns (not all written; reused memory)
        const int64_t cs_out = k.C[k.sl + 1];
        if (cs_out < k.cps)
          for (int64_t c = k.pad; c < k.pad + k.Wd; ++c)
            std::fill(row + c * k.cps + cs_out, row + (c + 1) * k.cps, acc_t(0));
      }
    }
    return;
  }
  const int64_t cs = k.C[k.sl];
  for (int64_t j = 0; j < cs; ++j) {
    acc_t* pl = scratch + j * plane;
    for (int64_t r = r_begin; r < r_end; ++r) {
      acc_t* row = pl + r * k.row_len;
      const int64_t iy = row0 + r;
      if (iy < 0 || iy >= k.H) {
        std::fill(row, row + k.row_len, acc_t(0));
        continue;
      }
      for (int64_t ph = 0; ph < k.s; ++ph) {
        acc_t* pr = row + ph * k.wph;
        for (int64_t i = 0; i < k.wph; ++i) {
          const int64_t cp = i * k.s + ph;
          if (cp < k.pad || cp >= k.pad + k.Wd) pr[i] = acc_t(0);
        }
      }
    }
  }
}

// The depth-wise layer on one tile of outputs from the channels-last scratch: for every block of
// LANES channels, the K*K tap weights stay in registers and each output position is K*K vector
// FMAs, the activation specialised; results to tmp, [position][cp]. Runs of P positions of one
// output row (stride ST) are computed together: each kernel row's (P - 1) ST + K input columns
// are loaded once and shared by the P positions (P K K FMAs on (P - 1) ST + K loads per kernel
// row, against one load per FMA a position at a time), and the P chains of dependent FMAs
// overlap. Positions of shorter runs go one at a time.
template <int K, int ST, int ACT, typename scalar_t, typename acc_t>
IGC_INLINE void depthwise_rows(const BlockCtx<scalar_t, acc_t>& k, const int64_t* base,
                               int tvalid, const acc_t* scratch, acc_t* tmp) {
  using S = Simd<acc_t>;
  using V = typename S::V;
  constexpr int KK = K * K, P = 4, NC = (P - 1) * ST + K;
  const int64_t cp = k.cp, cps = k.cps, row_len = k.row_len;
  for (int64_t c0 = 0; c0 < cp; c0 += S::LANES) {
    V w[KK];
#pragma GCC unroll 49
    for (int i = 0; i < KK; ++i) w[i] = S::load(k.wt + i * cp + c0);
    const V b = S::load(k.bt + c0);
    for (int t = 0; t < tvalid;) {
      if (t + P <= tvalid && base[t + P - 1] - base[t] == (P - 1) * ST * cps) {
        const acc_t* src = scratch + base[t] + c0;
        V a[P];
#pragma GCC unroll 4
        for (int p = 0; p < P; ++p) a[p] = b;
#pragma GCC unroll 7
        for (int ky = 0; ky < K; ++ky) {
          const acc_t* r = src + ky * row_len;
          V col[NC];
#pragma GCC unroll 16
          for (int j = 0; j < NC; ++j) col[j] = S::load(r + j * cps);
#pragma GCC unroll 7
          for (int kx = 0; kx < K; ++kx)
#pragma GCC unroll 4
            for (int p = 0; p < P; ++p) a[p] += w[ky * K + kx] * col[p * ST + kx];
        }
#pragma GCC unroll 4
        for (int p = 0; p < P; ++p) S::store(tmp + (t + p) * cp + c0, activate_vec<ACT>(a[p]));
        t += P;
        continue;
      }
      const acc_t* src = scratch + base[t] + c0;
      V a = b;
#pragma GCC unroll 7
      for (int ky = 0; ky < K; ++ky)
#pragma GCC unroll 7
        for (int kx = 0; kx < K; ++kx) a += w[ky * K + kx] * S::load(src + ky * row_len + kx * cps);
      S::store(tmp + t * cp + c0, activate_vec<ACT>(a));
      ++t;
    }
  }
}

template <int ACT, typename scalar_t, typename acc_t>
IGC_INLINE void depthwise_k(const BlockCtx<scalar_t, acc_t>& k, const int64_t* base, int tvalid,
                            const acc_t* scratch, acc_t* tmp) {
  const bool s2 = k.s == 2;
  switch (k.k) {
    case 3:
      return s2 ? depthwise_rows<3, 2, ACT>(k, base, tvalid, scratch, tmp)
                : depthwise_rows<3, 1, ACT>(k, base, tvalid, scratch, tmp);
    case 5:
      return s2 ? depthwise_rows<5, 2, ACT>(k, base, tvalid, scratch, tmp)
                : depthwise_rows<5, 1, ACT>(k, base, tvalid, scratch, tmp);
    default:
      return s2 ? depthwise_rows<7, 2, ACT>(k, base, tvalid, scratch, tmp)
                : depthwise_rows<7, 1, ACT>(k, base, tvalid, scratch, tmp);
  }
}

// The depth-wise layer (channels-last scratch) for output positions q0 .. q0+tvalid-1 (flat
// within the image), activated, into tmp ([position][cp]).
template <typename scalar_t, typename acc_t>
IGC_INLINE void depthwise_tile(const BlockCtx<scalar_t, acc_t>& k, int64_t q0, int tvalid,
                               int64_t row0, const acc_t* scratch, acc_t* tmp) {
  int64_t base[TILE];
  for (int t = 0; t < tvalid; ++t) {
    const int64_t oy = (q0 + t) / k.Wo, ox = (q0 + t) - oy * k.Wo;
    base[t] = (oy * k.s - k.pad - row0) * k.row_len + ox * k.s * k.cps;
  }
  switch (k.act[k.sl]) {
    case kRelu: return depthwise_k<kRelu>(k, base, tvalid, scratch, tmp);
    case kRelu6: return depthwise_k<kRelu6>(k, base, tvalid, scratch, tmp);
    case kHardswish: return depthwise_k<kHardswish>(k, base, tvalid, scratch, tmp);
    default: return depthwise_k<kNone>(k, base, tvalid, scratch, tmp);
  }
}

// The spatial layer for output positions q0 .. q0+tvalid-1 (flat within the image) from the
// scratch of a band starting at input row row0, activated, into the tile out: channels-last
// (depth-wise), through tmp ([position][cp]) and a transposed load; planar, directly.
template <typename scalar_t, typename acc_t>
IGC_INLINE void spatial_layer(const BlockCtx<scalar_t, acc_t>& k, int64_t q0, int tvalid,
                              int64_t row0, int64_t plane, const acc_t* scratch, acc_t* tmp,
                              acc_t* out) {
  if (k.cl) {
    depthwise_tile(k, q0, tvalid, row0, scratch, tmp);
    int64_t off[TILE];
    for (int t = 0; t < tvalid; ++t) off[t] = t * k.cp;
    load_tile(tmp, off, false, tvalid, k.C[k.sl + 1], int64_t(1), k.iota, out);
    return;
  }
  const int64_t l = k.sl, ns = k.n[l], ms = k.m[l], K = k.k, KK = K * K;
  const acc_t* W = k.W[l];
  const acc_t* bias = k.b[l];
  // runs of consecutive outputs within one output row: tile start, length, scratch offset of
  // tap (0, 0)
  int seg_t[TILE + 1], seg_n[TILE + 1];
  int64_t seg_off[TILE + 1];
  int64_t tap_off[kMaxKernel * kMaxKernel];
  for (int64_t ky = 0; ky < K; ++ky)
    for (int64_t kx = 0; kx < K; ++kx)
      tap_off[ky * K + kx] = ky * k.row_len + (kx % k.s) * k.wph + kx / k.s;
  int nseg = 0;
  for (int t = 0; t < tvalid;) {
    const int64_t oy = (q0 + t) / k.Wo, ox = (q0 + t) - oy * k.Wo;
    const int len = static_cast<int>(std::min<int64_t>(tvalid - t, k.Wo - ox));
    seg_t[nseg] = t;
    seg_n[nseg] = len;
    seg_off[nseg] = (oy * k.s - k.pad - row0) * k.row_len + ox;
    ++nseg;
    t += len;
  }
  for (int64_t o = 0; o < k.C[l + 1]; ++o) {
    acc_t* __restrict a = out + o * TILE;
    const acc_t b0 = bias ? bias[o] : acc_t(0);
    for (int t = 0; t < TILE; ++t) a[t] = b0;
    const int64_t g = o / ms;
    for (int64_t i = 0; i < ns; ++i) {
      const acc_t* __restrict pl = scratch + (g * ns + i) * plane;
      const acc_t* w = W + (o * ns + i) * KK;
      for (int64_t tap = 0; tap < KK; ++tap) {
        const acc_t wv = w[tap];
        const int64_t to = tap_off[tap];
        for (int sg = 0; sg < nseg; ++sg) {
          acc_t* __restrict as = a + seg_t[sg];
          const acc_t* __restrict src = pl + seg_off[sg] + to;
          const int len = seg_n[sg];
          for (int t = 0; t < len; ++t) as[t] += wv * src[t];
        }
      }
    }
  }
  activate(out, k.C[l + 1], tile_vectors<acc_t>(tvalid), k.act[l]);
}

// Phase 2 for output positions q_begin .. q_end - 1 of image img (flat within the image): the
// spatial layer from the scratch of a band starting at input row row0, the suffix, the store.
template <typename scalar_t, typename acc_t>
IGC_INLINE void spatial_tiles_impl(const BlockCtx<scalar_t, acc_t>& k, int64_t img, int64_t q_begin,
                              int64_t q_end, int64_t row0, int64_t plane, const acc_t* scratch,
                              acc_t* const* buf, acc_t* tmp) {
  for (int64_t q0 = q_begin; q0 < q_end; q0 += TILE) {
    const int tvalid = static_cast<int>(std::min<int64_t>(TILE, q_end - q0));
    spatial_layer(k, q0, tvalid, row0, plane, scratch, tmp, buf[0]);
    const int cur = pointwise_layers(k, k.sl + 1, k.L, buf, 0, tile_vectors<acc_t>(tvalid));
    finish_tile(k, img * k.Ho * k.Wo + q0, tvalid, buf, cur);
  }
}

// ---- Channels-last tiles (k.gemm; float32 only) ----

using ClCtx = BlockCtx<float, float>;

// x's rows at global positions g0 .. g0+tvalid-1: x itself (*ld its position stride) when they
// are evenly spaced, as in a channels-last tensor; else copied into buf (stride cl_ld).
IGC_INLINE const float* cl_x_rows(const ClCtx& k, int64_t g0, int tvalid, float* buf,
                                  int64_t* ld) {
  int64_t off[TILE];
  tile_offsets(k.x_ix, g0, tvalid, off);
  const int64_t d = tvalid > 1 ? off[1] - off[0] : k.cin;
  bool even = true;
  for (int t = 2; t < tvalid; ++t) even &= off[t] - off[t - 1] == d;
  if (even) {
    *ld = d;
    return k.x + off[0];
  }
  for (int t = 0; t < tvalid; ++t) std::copy(k.x + off[t], k.x + off[t] + k.cin, buf + t * k.cl_ld);
  *ld = k.cl_ld;
  return buf;
}

// Layer l on T positions from the rows (in, ldi) to rows (out, ldo), or to out + oofs[t]. One
// compiled copy per ISA, called by the tile loops (see IGC_DEFINE_LAYERS).
IGC_TARGET_CLONES void cl_layer_of(const ClCtx& k, int64_t l, const float* in, int64_t ldi,
                                   float* out, int64_t ldo, const int64_t* oofs, int T) {
  cl_layer(in, ldi, k.cl_cols[l].data(), k.cl_packed[l], k.G[l], k.n[l], k.m[l], out, ldo, oofs,
           T, k.act[l]);
}

// Layers [l0, l1) on T positions from the rows (in, ldi), results alternately in buf[cur] and
// buf[cur ^ 1]; returns the buffer holding the last one.
inline int cl_layers(const ClCtx& k, int64_t l0, int64_t l1, const float* in, int64_t ldi,
                     float* const* buf, int cur, int T) {
  for (int64_t l = l0; l < l1; ++l) {
    cl_layer_of(k, l, in, ldi, buf[cur], k.cl_ld, nullptr, T);
    in = buf[cur];
    ldi = k.cl_ld;
    cur ^= 1;
  }
  return cur ^ 1;
}

// The vector store's plan for tiles of row stride ld (see BlockCtx::cl_ybase): a vector of 16
// y channels is one two-source shuffle of the 32 columns from the smallest one it takes (or
// from ld - 32, so that the loads stay in the row), when they span fewer than 32 columns, as
// they do after a shuffle of a few groups; else, and for the last partial vector, channel by
// channel. Nothing without the channels-last tiles.
template <typename scalar_t, typename acc_t>
IGC_INLINE void plan_cl_store(BlockCtx<scalar_t, acc_t>&, int64_t) {}
inline void plan_cl_store(ClCtx& k, int64_t ld) {
  if (!k.gemm) return;
  const int64_t CL = k.C[k.L], nvec = CL / kClLanes;
  k.cl_ybase.assign(static_cast<size_t>(nvec), -1);
  k.cl_ysel.assign(static_cast<size_t>(nvec * kClLanes), 0);
  if (ld < 2 * kClLanes) return;
  for (int64_t v = 0; v < nvec; ++v) {
    const int32_t* ym = k.cl_ymap.data() + v * kClLanes;
    const int64_t lo = *std::min_element(ym, ym + kClLanes);
    const int64_t hi = *std::max_element(ym, ym + kClLanes);
    const int64_t base = std::min(lo, ld - 2 * kClLanes);
    if (hi - base >= 2 * kClLanes) continue;
    k.cl_ybase[v] = static_cast<int32_t>(base);
    for (int i = 0; i < kClLanes; ++i)
      k.cl_ysel[v * kClLanes + i] = static_cast<int32_t>(ym[i] - base);
  }
}

// y at global output positions q0 .. q0+tvalid-1: channel j is column cl_ymap[j] of the tile
// (+ x channel j). Channels-last y: vectors of 16 channels as planned by plan_cl_store.
IGC_INLINE void cl_store(const ClCtx& k, int64_t q0, int tvalid, const float* tile, int64_t ld) {
  int64_t offy[TILE], offx[TILE];
  tile_offsets(k.y_ix, q0, tvalid, offy);
  if (k.residual) tile_offsets(k.x_ix, q0, tvalid, offx);
  const int64_t CL = k.C[k.L], cs = k.y_ix.chan_stride;
  const int32_t* __restrict ym = k.cl_ymap.data();
  // vectors of 16 channels: GCC's __builtin_shuffle with a variable mask, as the transposes
#if IGC_HAVE_SIMD_TRANSPOSE
  using S = Simd<float>;
  using M = SimdIndex<float>::M;
  const int64_t nvec = cs == 1 ? CL / kClLanes : 0;
#else
  const int64_t nvec = 0;
#endif
  for (int t = 0; t < tvalid; ++t) {
    const float* __restrict r = tile + t * ld;
    float* __restrict yd = k.y + offy[t];
    const float* __restrict xr = k.residual ? k.x + offx[t] : nullptr;
    int64_t j = 0;
#if IGC_HAVE_SIMD_TRANSPOSE
    for (int64_t v = 0; v < nvec; ++v, j += kClLanes) {
      const int32_t base = k.cl_ybase[v];
      if (base < 0) {  // no plan: channel by channel
        for (int64_t c = j; c < j + kClLanes; ++c)
          yd[c] = xr != nullptr ? r[ym[c]] + xr[c] : r[ym[c]];
        continue;
      }
      M sel;
      std::memcpy(&sel, k.cl_ysel.data() + j, sizeof sel);
      S::V o = __builtin_shuffle(S::load(r + base), S::load(r + base + kClLanes), sel);
      if (xr != nullptr) o += S::load(xr + j);
      S::store(yd + j, o);
    }
#endif
    for (; j < CL; ++j) yd[j * cs] = xr != nullptr ? r[ym[j]] + xr[j] : r[ym[j]];
  }
}

// Phase 1 (see fill_scratch_impl): the prefix, its last layer writing straight into the
// scratch's position slots (cps floats each, room for the layer's whole row extent; the lanes
// past C_s hold zeros: zero weights and bias); without a prefix, x's channels (through the
// input index) copied into them.
IGC_INLINE void cl_fill_impl(const ClCtx& k, int64_t img, int64_t p_begin, int64_t p_end,
                             int64_t row0, float* scratch, float* const* buf) {
  int64_t dst[TILE], off[TILE];
  const int64_t C = k.C[k.sl], last = k.sl - 1;
  for (int64_t p0 = p_begin; p0 < p_end; p0 += TILE) {
    const int tvalid = static_cast<int>(std::min<int64_t>(TILE, p_end - p0));
    const int64_t g0 = img * k.H * k.Wd + p0;
    scratch_offsets(k, p0, tvalid, row0, dst);
    if (k.sl == 0) {
      tile_offsets(k.x_ix, g0, tvalid, off);
      copy_x_to_scratch(k.x, off, dst, tvalid, C, k.in_rows0 == k.iota ? nullptr : k.in_rows0,
                        scratch);
      continue;
    }
    int64_t ldi = 0;
    const float* in = cl_x_rows(k, g0, tvalid, buf[0], &ldi);
    if (last > 0) {
      in = buf[cl_layers(k, 0, last, in, ldi, buf, in == buf[0] ? 1 : 0, tvalid)];
      ldi = k.cl_ld;
    }
    cl_layer_of(k, last, in, ldi, scratch, 0, dst, tvalid);
  }
}

// Phase 2 (see spatial_tiles_impl): the depth-wise layer into tmp, the suffix, the store.
IGC_INLINE void cl_spatial_impl(const ClCtx& k, int64_t img, int64_t q_begin, int64_t q_end,
                                int64_t row0, const float* scratch, float* const* buf,
                                float* tmp) {
  for (int64_t q0 = q_begin; q0 < q_end; q0 += TILE) {
    const int tvalid = static_cast<int>(std::min<int64_t>(TILE, q_end - q0));
    depthwise_tile(k, q0, tvalid, row0, scratch, tmp);
    const float* tl = tmp;
    int64_t ld = k.cp;
    if (k.sl + 1 < k.L) {
      tl = buf[cl_layers(k, k.sl + 1, k.L, tmp, k.cp, buf, 0, tvalid)];
      ld = k.cl_ld;
    }
    cl_store(k, img * k.Ho * k.Wo + q0, tvalid, tl, ld);
  }
}

// A block without a spatial layer (see pointwise_tiles_impl).
IGC_INLINE void cl_pointwise_impl(const ClCtx& k, int64_t p_begin, int64_t p_end) {
  TileBuffers<float> b(k.cmax);
  for (int64_t p0 = p_begin; p0 < p_end; p0 += TILE) {
    const int tvalid = static_cast<int>(std::min<int64_t>(TILE, p_end - p0));
    int64_t ldi = 0;
    const float* in = cl_x_rows(k, p0, tvalid, b.buf[0], &ldi);
    const int cur = cl_layers(k, 0, k.L, in, ldi, b.buf, in == b.buf[0] ? 1 : 0, tvalid);
    cl_store(k, p0, tvalid, b.buf[cur], k.cl_ld);
  }
}

IGC_TARGET_CLONES void cl_fill_f32(const ClCtx& k, int64_t img, int64_t p_begin, int64_t p_end,
                                   int64_t row0, float* scratch, float* const* buf) {
  cl_fill_impl(k, img, p_begin, p_end, row0, scratch, buf);
}
IGC_TARGET_CLONES void cl_spatial_f32(const ClCtx& k, int64_t img, int64_t q_begin,
                                      int64_t q_end, int64_t row0, const float* scratch,
                                      float* const* buf, float* tmp) {
  cl_spatial_impl(k, img, q_begin, q_end, row0, scratch, buf, tmp);
}
IGC_TARGET_CLONES void cl_pointwise_f32(const ClCtx& k, int64_t p_begin, int64_t p_end) {
  cl_pointwise_impl(k, p_begin, p_end);
}

// The phase wrappers below take the channels-last path through these (false: not taken).
template <typename scalar_t, typename acc_t>
IGC_INLINE bool cl_fill(const BlockCtx<scalar_t, acc_t>&, int64_t, int64_t, int64_t, int64_t,
                        acc_t*, acc_t* const*) {
  return false;
}
inline bool cl_fill(const ClCtx& k, int64_t img, int64_t p_begin, int64_t p_end, int64_t row0,
                    float* scratch, float* const* buf) {
  if (!k.gemm) return false;
  cl_fill_f32(k, img, p_begin, p_end, row0, scratch, buf);
  return true;
}
template <typename scalar_t, typename acc_t>
IGC_INLINE bool cl_spatial(const BlockCtx<scalar_t, acc_t>&, int64_t, int64_t, int64_t, int64_t,
                           const acc_t*, acc_t* const*, acc_t*) {
  return false;
}
inline bool cl_spatial(const ClCtx& k, int64_t img, int64_t q_begin, int64_t q_end, int64_t row0,
                       const float* scratch, float* const* buf, float* tmp) {
  if (!k.gemm) return false;
  cl_spatial_f32(k, img, q_begin, q_end, row0, scratch, buf, tmp);
  return true;
}
template <typename scalar_t, typename acc_t>
IGC_INLINE bool cl_pointwise(const BlockCtx<scalar_t, acc_t>&, int64_t, int64_t) {
  return false;
}
inline bool cl_pointwise(const ClCtx& k, int64_t p_begin, int64_t p_end) {
  if (!k.gemm) return false;
  cl_pointwise_f32(k, p_begin, p_end);
  return true;
}

// The tile loops compiled once per dtype and ISA (see IGC_DEFINE_LAYERS): phase 1, phase 2,
// and the tiles of a block without a spatial layer. The work splits below only call them.
#define IGC_DEFINE_PHASES(scalar_t, acc_t, suffix)                                            \
  IGC_TARGET_CLONES void fill_##suffix(const BlockCtx<scalar_t, acc_t>& k, int64_t img,       \
                                       int64_t p_begin, int64_t p_end, int64_t row0,          \
                                       int64_t plane, acc_t* scratch, acc_t* const* buf) {    \
    fill_scratch_impl(k, img, p_begin, p_end, row0, plane, scratch, buf);                     \
  }                                                                                           \
  IGC_TARGET_CLONES void spatial_##suffix(const BlockCtx<scalar_t, acc_t>& k, int64_t img,    \
                                          int64_t q_begin, int64_t q_end, int64_t row0,       \
                                          int64_t plane, const acc_t* scratch,                \
                                          acc_t* const* buf, acc_t* tmp) {                    \
    spatial_tiles_impl(k, img, q_begin, q_end, row0, plane, scratch, buf, tmp);               \
  }                                                                                           \
  IGC_TARGET_CLONES void pointwise_##suffix(const BlockCtx<scalar_t, acc_t>& k, int64_t pb,   \
                                            int64_t pe) {                                     \
    pointwise_tiles_impl(k, pb, pe);                                                          \
  }                                                                                           \
  inline void fill_scratch(const BlockCtx<scalar_t, acc_t>& k, int64_t img, int64_t p_begin,  \
                           int64_t p_end, int64_t row0, int64_t plane, acc_t* scratch,        \
                           acc_t* const* buf) {                                               \
    if (cl_fill(k, img, p_begin, p_end, row0, scratch, buf)) return;                          \
    fill_##suffix(k, img, p_begin, p_end, row0, plane, scratch, buf);                         \
  }                                                                                           \
  inline void spatial_tiles(const BlockCtx<scalar_t, acc_t>& k, int64_t img, int64_t q_begin, \
                            int64_t q_end, int64_t row0, int64_t plane, const acc_t* scratch, \
                            acc_t* const* buf, acc_t* tmp) {                                  \
    if (cl_spatial(k, img, q_begin, q_end, row0, scratch, buf, tmp)) return;                  \
    spatial_##suffix(k, img, q_begin, q_end, row0, plane, scratch, buf, tmp);                 \
  }                                                                                           \
  inline void pointwise_tiles(const BlockCtx<scalar_t, acc_t>& k, int64_t pb, int64_t pe) {   \
    if (cl_pointwise(k, pb, pe)) return;                                                      \
    pointwise_##suffix(k, pb, pe);                                                            \
  }
IGC_BLOCK_DTYPE(IGC_DEFINE_PHASES)
#undef IGC_DEFINE_PHASES

// Whole padded planes of every image (few images): the scratch of image img at
// img * scr_ch * plane; phase 1 over every image's input tiles, then phase 2 over their output
// tiles.
template <typename scalar_t, typename acc_t>
void run_global(const BlockCtx<scalar_t, acc_t>& k, int64_t N, acc_t* scratch, int64_t plane,
                int64_t row0, int64_t nrows) {
  const int64_t HW = k.H * k.Wd, HWo = k.Ho * k.Wo, img_elems = k.scr_ch * plane;
  const int64_t threads = at::get_num_threads();
  const int64_t grain = unit_grain(k);
  const int64_t in_unit = grain ? unit_length(HW, N, threads, grain) : TILE;
  const int64_t out_unit = grain ? unit_length(HWo, N, threads, grain) : TILE;
  const int64_t in_tiles = (HW + in_unit - 1) / in_unit;
  const int64_t out_tiles = (HWo + out_unit - 1) / out_unit;
  at::parallel_for(0, N * in_tiles, 1, [&](int64_t u0, int64_t u1) {
    TileBuffers<acc_t> tb(k.cmax);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t img = u / in_tiles, t = u % in_tiles;
      acc_t* sc = scratch + img * img_elems;
      if (t == 0) zero_padding(k, row0, 0, nrows, plane, sc);
      fill_scratch(k, img, t * in_unit, std::min(HW, (t + 1) * in_unit), row0, plane, sc,
                   tb.buf);
    }
  });
  at::parallel_for(0, N * out_tiles, 1, [&](int64_t u0, int64_t u1) {
    TileBuffers<acc_t> tb(k.cmax);
    ThreadBuffer<acc_t> tmp(kDepthwiseSlot, k.cl ? TILE * k.cp : 0);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t img = u / out_tiles, t = u % out_tiles;
      spatial_tiles(k, img, t * out_unit, std::min(HWo, (t + 1) * out_unit), row0, plane,
                    scratch + img * img_elems, tb.buf, tmp.ptr);
    }
  });
}

// Bands of band_rows output rows, each run start to end by one thread with a private scratch.
template <typename scalar_t, typename acc_t>
void run_bands(const BlockCtx<scalar_t, acc_t>& k, int64_t N, int64_t band_rows) {
  const int64_t nbands = (k.Ho + band_rows - 1) / band_rows;
  at::parallel_for(0, N * nbands, 1, [&](int64_t u0, int64_t u1) {
    TileBuffers<acc_t> tb(k.cmax);
    const int64_t plane = ((band_rows - 1) * k.s + k.k) * k.row_len;
    ThreadBuffer<acc_t> sc(kScratchSlot, k.scr_ch * plane);
    ThreadBuffer<acc_t> tmp(kDepthwiseSlot, k.cl ? TILE * k.cp : 0);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t img = u / nbands, band = u % nbands;
      const int64_t oy0 = band * band_rows, oy1 = std::min(k.Ho, oy0 + band_rows);
      const int64_t row0 = oy0 * k.s - k.pad, nrows = (oy1 - 1 - oy0) * k.s + k.k;
      const int64_t iy0 = std::max<int64_t>(0, row0);
      const int64_t iy1 = std::min<int64_t>(k.H, row0 + nrows);
      zero_padding(k, row0, 0, nrows, plane, sc.ptr);
      fill_scratch(k, img, iy0 * k.Wd, iy1 * k.Wd, row0, plane, sc.ptr, tb.buf);
      spatial_tiles(k, img, oy0 * k.Wo, oy1 * k.Wo, row0, plane, sc.ptr, tb.buf, tmp.ptr);
    }
  });
}
// Sets up the channels-last tiles (gemm_cl.h) when they apply: float32 x with contiguous
// channels, packed weights (pack_cl_layer) for every pointwise layer, a spatial layer, if any,
// depth-wise with one output per input, and vectors of output channels at least 3/4 as full
// as the other tiles' vectors of positions would be. Else false: [channel][position] tiles.
// out_positions: output positions per image (images of them).
template <typename scalar_t, typename acc_t>
bool setup_cl(BlockCtx<scalar_t, acc_t>&, const ChainDesc&, int64_t, const at::Tensor&,
              const std::vector<at::Tensor>*, int64_t, int64_t) {
  return false;
}
inline bool setup_cl(ClCtx& k, const ChainDesc& d, int64_t sl, const at::Tensor& x,
              const std::vector<at::Tensor>* packed, int64_t out_positions, int64_t images) {
  const char* op = "igc::block_forward";
  if (packed == nullptr || x.stride(1) != 1 || x.size(1) == 1) return false;
  const int64_t L = d.L;
  TORCH_CHECK_VALUE(static_cast<int64_t>(packed->size()) == L, op, ": ", L,
                    " packed layers expected, got ", packed->size());
  if (sl >= 0 && (d.n[sl] != 1 || d.m[sl] != 1)) return false;
  for (int64_t l = 0; l < L; ++l)
    if (l != sl && !(*packed)[l].defined()) return false;
  // Filled lanes: of the channels-last vectors, the pointwise multiply-adds over those
  // computed (a group of m outputs takes m rounded up to LANES); of the [channel][position]
  // tiles, a thread's share of positions over the whole vectors it computes. Channels-last
  // tiles unless theirs are less than 3/4 as full: they need no transposes, which pays for
  // some empty lanes (benchmarks/blocks.py, IGCV3Net at batch 1 on two threads, per block:
  // 7x7 and 14x14 blocks 1.3-1.4x faster on them (filled 100% against 77-88%), the 112x112
  // and 56x56 stride-2 blocks (83% and 95% against 100%) 1.6x, the 56x56 stride-1 block (82%)
  // 1.1x, the 112x112 block with 8-output groups (75%) 1.1x; IGCV2's 8-output groups (50%)
  // stay on the other tiles).
  int64_t real = 0, computed = 0;
  for (int64_t l = 0; l < L; ++l) {
    if (l == sl) continue;
    real += d.G[l] * d.m[l] * d.n[l];
    computed += d.G[l] * cl_round_up(d.m[l]) * d.n[l];
  }
  // IGC_CPU_BLOCK_TILES (read at every call): "channels_last" takes them wherever they apply,
  // "channel_major" never, anything else lets the rule decide (tests and comparisons).
  const char* env = std::getenv("IGC_CPU_BLOCK_TILES");
  const std::string choice = env ? env : "";
  if (choice == "channel_major") return false;
  // a thread's share of an image (unit_length before rounding; whole tiles when there are many)
  const int64_t parts = std::max<int64_t>(1, (at::get_num_threads() + images - 1) / images);
  const int64_t share = (out_positions + TILE - 1) / TILE >= 8 * parts
                            ? TILE
                            : std::max<int64_t>(1, (out_positions + parts - 1) / parts);
  if (choice != "channels_last" && 4 * real * cl_round_up(share) < 3 * computed * share)
    return false;
  k.cl_packed.assign(static_cast<size_t>(L), nullptr);
  k.cl_cols.assign(static_cast<size_t>(L), {});
  int64_t ld = cl_round_up(d.C_in);
  std::vector<int32_t> pos;  // tile column of the previous layer's output c
  for (int64_t l = 0; l < L; ++l) {
    std::vector<int32_t>& cols = k.cl_cols[l];
    cols.resize(static_cast<size_t>(d.C[l]));
    for (int64_t i = 0; i < d.C[l]; ++i)
      cols[i] = l > 0     ? pos[k.gather[l - 1][i]]
                : l == sl ? static_cast<int32_t>(i)  // x through the index into the scratch
                          : k.in_rows0[i];
    if (l == sl) {  // output o in the column of input o (without a prefix: x through the index)
      pos = cols;
      continue;
    }
    const at::Tensor& pt = (*packed)[l];
    const int64_t need = cl_packed_size(d.G[l], d.n[l], d.m[l]);
    TORCH_CHECK_VALUE(pt.scalar_type() == at::kFloat && pt.device().is_cpu() &&
                          pt.is_contiguous() && pt.numel() == need,
                      op, ": layer ", l + 1, ": packed weights must be a contiguous float32 CPU "
                      "tensor of ", need, " elements, got ", pt.scalar_type(), " ", pt.sizes());
    k.cl_packed[l] = pt.data_ptr<float>();
    ld = std::max(ld, cl_row_extent(d.G[l], d.m[l]));
    pos.resize(static_cast<size_t>(d.C[l + 1]));
    for (int64_t c = 0; c < d.C[l + 1]; ++c) pos[c] = static_cast<int32_t>(c);
  }
  k.cl_ymap.resize(static_cast<size_t>(d.C[L]));
  for (int64_t j = 0; j < d.C[L]; ++j) k.cl_ymap[j] = pos[k.gather[L - 1][j]];
  k.cl_ld = ld;
  k.cmax = std::max(k.cmax, ld);
  k.gemm = true;
  return true;
}

// block_forward on scalar_t: bd from check_block, y allocated (H, Wd: x's spatial size, Ho, Wo:
// y's; 1 without a spatial layer).
template <typename scalar_t>
void block_forward_typed(const BlockDesc& bd, const at::Tensor& x, at::TensorList weights,
                         at::TensorList biases, at::IntArrayRef activations, bool residual,
                         const std::vector<at::Tensor>* packed, const at::Tensor& y, int64_t H,
                         int64_t Wd, int64_t Ho, int64_t Wo) {
  const ChainDesc& d = bd.d;
  const bool spatial = bd.sl >= 0;
  const int64_t pad = bd.k / 2;
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  BlockCtx<scalar_t, acc_t> k;
  std::vector<at::Tensor> keep;
  k.L = d.L;
  k.C = d.C.data();
  k.G = d.G.data();
  k.n = d.n.data();
  k.m = d.m.data();
  k.cin = d.C_in;
  k.cmax = std::max(d.C_in, *std::max_element(d.C.begin(), d.C.end()));
  std::vector<int32_t> iota(static_cast<size_t>(k.cmax));
  for (int64_t i = 0; i < k.cmax; ++i) iota[i] = static_cast<int32_t>(i);
  k.iota = iota.data();
  k.in_rows0 = d.has_index ? d.input_gather.data() : k.iota;
  for (int64_t l = 0; l < d.L; ++l) {
    // (no conversion op when the dtype already is the accumulation type: each op through
    // the dispatcher costs microseconds, a fair part of a small block's call)
    at::Tensor w = weights[l].scalar_type() == acc_type ? weights[l].contiguous()
                                                         : weights[l].to(acc_type).contiguous();
    keep.push_back(w);
    k.W.push_back(w.data_ptr<acc_t>());
    if (d.has_bias[l]) {
      at::Tensor bc = biases[l].scalar_type() == acc_type
                          ? biases[l].contiguous()
                          : biases[l].to(acc_type).contiguous();
      keep.push_back(bc);
      k.b.push_back(bc.data_ptr<acc_t>());
    } else {
      k.b.push_back(nullptr);
    }
    k.gather.push_back(d.gather[l].data());
    k.act.push_back(static_cast<int>(activations[l]));
  }
  k.residual = residual;
  k.x = x.data_ptr<scalar_t>();
  k.x_ix = make_indexer(x);
  k.y = y.data_ptr<scalar_t>();
  k.y_ix = make_indexer(y);
  k.P_out = y.numel() / std::max<int64_t>(1, y.size(1));
  setup_cl(k, d, bd.sl, x, packed, spatial ? Ho * Wo : k.P_out, spatial ? x.size(0) : 1);
  if (!spatial) {
    plan_cl_store(k, k.cl_ld);
    const int64_t grain = unit_grain(k);
    const int64_t unit = grain ? unit_length(k.P_out, 1, at::get_num_threads(), grain) : TILE;
    const int64_t units = (k.P_out + unit - 1) / unit;
    at::parallel_for(0, units, 1, [&](int64_t b, int64_t e) {
      pointwise_tiles(k, b * unit, std::min(k.P_out, e * unit));
    });
    return;
  }
  k.sl = bd.sl;
  k.k = bd.k;
  k.s = bd.s;
  k.pad = pad;
  k.H = H;
  k.Wd = Wd;
  k.Ho = Ho;
  k.Wo = Wo;
  const int64_t sl = bd.sl, cs_out = d.C[sl + 1], ms = d.m[sl], KK = bd.k * bd.k;
  std::vector<int32_t> exp_rows;
  std::vector<acc_t> wt, bt;
  k.cl = d.n[sl] == 1;
  if (k.cl) {
    constexpr int64_t LN = Simd<acc_t>::LANES;
    k.cp = (cs_out + LN - 1) / LN * LN;
    k.cps = k.cp;
    if (k.gemm && sl > 0)  // room for the prefix's last layer's row (cl_fill_impl)
      k.cps = std::max(k.cp, cl_round_up(cl_row_extent(d.G[sl - 1], d.m[sl - 1])));
    k.row_len = (Wd + 2 * pad) * k.cps;
    k.scr_ch = 1;
    const int32_t* src_rows = sl == 0 ? k.in_rows0 : k.gather[sl - 1];
    exp_rows.resize(static_cast<size_t>(cs_out));
    for (int64_t o = 0; o < cs_out; ++o) exp_rows[o] = src_rows[o / ms];
    wt.assign(static_cast<size_t>(KK * k.cp), acc_t(0));
    bt.assign(static_cast<size_t>(k.cp), acc_t(0));
    for (int64_t o = 0; o < cs_out; ++o) {  // channels-last tiles: in the column of input o
      const int64_t col = k.gemm ? k.cl_cols[sl][o] : o;
      for (int64_t t = 0; t < KK; ++t) wt[t * k.cp + col] = k.W[sl][o * KK + t];
      if (k.b[sl] != nullptr) bt[col] = k.b[sl][o];
    }
    k.exp_rows = exp_rows.data();
    k.x_copy = sl == 0 && k.x_ix.chan_stride == 1 && cs_out == k.cin;
    for (int64_t o = 0; k.x_copy && o < cs_out; ++o) k.x_copy = exp_rows[o] == o;
    k.wt = wt.data();
    k.bt = bt.data();
  } else {
    k.wph = (Wd + 2 * pad + bd.s - 1) / bd.s;
    k.row_len = bd.s * k.wph;
    k.scr_ch = d.C[sl];
  }
  const int64_t N = x.size(0);
  const int64_t cs = k.scr_ch;
  const int64_t threads = at::get_num_threads();
  const int64_t full_rows = (Ho - 1) * bd.s + bd.k;
  const int64_t full_plane = full_rows * k.row_len;
  const int64_t elem = static_cast<int64_t>(sizeof(acc_t));
  // Bands of as many output rows as keep the scratch near kBandScratchBytes (at least one).
  const int64_t row_bytes = cs * k.row_len * elem;
  int64_t band = (kBandScratchBytes / std::max<int64_t>(1, row_bytes) - bd.k) / bd.s + 1;
  band = std::max<int64_t>(1, std::min(band, Ho));
  bool bands = N >= threads;
  if (!bands) {
    // Few images: bands still, when every thread can get an equal share of them and the rows
    // computed twice (k - s per band) cost at most an eighth of a band's prefix work; else
    // whole planes (run_global; measured faster for 3x3 stride-1 layers at 56x56 and
    // smaller, slower at stride 2, at batch 1 on two threads).
    const int64_t per_img = (threads + N - 1) / N;
    int64_t nb = std::max((Ho + band - 1) / band, per_img);
    nb = (nb + per_img - 1) / per_img * per_img;
    const int64_t b = (Ho + nb - 1) / nb;
    if (N * ((Ho + b - 1) / b) >= threads && 8 * (bd.k - bd.s) <= b * bd.s) {
      band = b;
      bands = true;
    }
  }
  plan_cl_store(k, sl == d.L - 1 ? k.cp : k.cl_ld);
  if (!bands && N * cs * full_plane * elem <= (int64_t(64) << 20)) {
    // from the output cache: no page faults of a fresh multi-megabyte buffer on every call
    at::Tensor scratch = cached_empty_strided({N * cs * full_plane}, {1},
                                              x.options().dtype(acc_type));
    run_global(k, N, scratch.data_ptr<acc_t>(), full_plane, -pad, full_rows);
    return;
  }
  run_bands(k, N, band);
}

}  // namespace

#define IGC_DEFINE_BLOCK_FORWARD(scalar_t, acc_t, suffix)                                     \
  IGC_DECLARE_BLOCK_FORWARD(scalar_t, acc_t, suffix) {                                        \
    block_forward_typed<scalar_t>(bd, x, weights, biases, activations, residual, packed, y, H, \
                                  Wd, Ho, Wo);                                                \
  }
IGC_BLOCK_DTYPE(IGC_DEFINE_BLOCK_FORWARD)
#undef IGC_DEFINE_BLOCK_FORWARD

}  // namespace igc
