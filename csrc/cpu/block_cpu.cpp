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
//   transposed tile store; each output position is K*K vector FMAs per 16 channels with the
//   tap weights in registers, and the channels-last result enters the tile by a transposed load;
// - other grouped layers: a planar scratch [channel][row][column phase][column / stride]
//   (stride-2 columns de-interleaved), read tap by tap as contiguous runs of each output row.
// The suffix layers, the residual add (x reloaded at the tile's positions) and the store follow
// on the same tile.
//
// Work split. Few images (fewer than threads): the scratch holds every image's whole padded
// plane (small for the spatial sizes of such calls); phase 1 fills it tile by tile in parallel,
// phase 2 computes the spatial layer and the suffix tile by tile in parallel, with tiles
// narrowed (tile_width) so that every thread gets a part of each image. Otherwise each unit of
// work is one image's band of output rows, run start to end by one thread with a private
// scratch of the band's input rows (bands are sized to keep the scratch near 512 KiB; the
// k - stride halo rows between bands are computed twice). Outputs come from the output cache
// (output_cache.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "chain_args.h"
#include "output_cache.h"
#include "tiles.h"

namespace igc {
namespace {

constexpr int64_t kMaxKernel = 7;
// Scratch of one band of rows (banded work split): about this many bytes.
constexpr int64_t kBandScratchBytes = int64_t(512) << 10;

enum Act : int { kNone = 0, kRelu = 1, kRelu6 = 2, kHardswish = 3 };

template <typename V>
IGC_INLINE V activate_vec(V v, int act) {
  const V zero{}, six = zero + 6, three = zero + 3;
  switch (act) {
    case kRelu:
      return v > zero ? v : zero;
    case kRelu6: {
      const V r = v > zero ? v : zero;
      return r < six ? r : six;
    }
    case kHardswish: {
      V r = v + three;
      r = r > zero ? r : zero;
      r = r < six ? r : six;
      return v * r / six;
    }
    default:
      return v;
  }
}

// The activation on n elements of a tile buffer (n a multiple of LANES: whole tile rows).
template <typename acc_t>
IGC_INLINE void activate(acc_t* v, int64_t n, int act) {
  using S = Simd<acc_t>;
  if (act == kNone) return;
  for (int64_t i = 0; i < n; i += S::LANES) S::store(v + i, activate_vec(S::load(v + i), act));
}

// Positions per tile: TILE, or (float tiles, when the images' tiles are fewer than the threads)
// the multiple of LANES that gives every thread a part of every image: at batch 1 and 7x7, two
// tiles of 32 positions computed on two vectors each instead of one of 64 on four.
template <typename acc_t>
int64_t tile_width(int64_t positions, int64_t images, int64_t threads) {
  constexpr int64_t LN = Simd<acc_t>::LANES;
  if (Simd<acc_t>::PER_ROW != 4 || images * ((positions + TILE - 1) / TILE) >= threads)
    return TILE;
  const int64_t parts = (threads + images - 1) / images;
  const int64_t per = (positions + parts - 1) / parts;
  return std::min<int64_t>(TILE, std::max<int64_t>(LN, (per + LN - 1) / LN * LN));
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
  int64_t tw = TILE;  // positions per tile (<= TILE; fewer when there are fewer tiles than threads)
  int nv = Simd<acc_t>::PER_ROW;  // vectors of positions computed per tile row
  // spatial layer (sl < 0: none)
  int64_t sl = -1, k = 1, s = 1, pad = 0;
  int64_t H = 1, Wd = 1, Ho = 1, Wo = 1;
  int64_t wph = 0, row_len = 0;  // planar: padded columns per phase, s * wph
  // Depth-wise layers (one input per group; C_s outputs, m per input) use a channels-last
  // scratch: [row][padded column][cp channels], channel o holding input channel o / m (so a
  // channel multiplier is a plain depth-wise product), computed 16 channels per vector.
  bool cl = false;
  int64_t cp = 0;                // channels per scratch position (C_s rounded up to LANES)
  int64_t scr_ch = 0;            // planar: C_{s-1} channel planes; channels-last: 1
  const int32_t* exp_rows = nullptr;  // channels-last: buffer row of scratch channel o
  const acc_t* wt = nullptr;     // channels-last: weights [tap][cp], bias [cp] (zero padded)
  const acc_t* bt = nullptr;
};

// Layers [l0, l1) on the tile in buf[cur]; returns the buffer holding the result.
template <typename scalar_t, typename acc_t>
IGC_INLINE int pointwise_layers_impl(const BlockCtx<scalar_t, acc_t>& k, int64_t l0, int64_t l1,
                                     acc_t* const* buf, int cur) {
  for (int64_t l = l0; l < l1; ++l) {
    const int32_t* in_rows = l == 0 ? k.in_rows0 : k.gather[l - 1];
    grouped_layer_narrow(buf[cur], in_rows, k.W[l], k.b[l], k.G[l], k.m[l], k.n[l], k.n[l],
                         int64_t(1), buf[cur ^ 1], k.iota, k.nv);
    cur ^= 1;
    activate(buf[cur], k.C[l + 1] * TILE, k.act[l]);
  }
  return cur;
}

// One compiled copy of the layers per dtype and ISA (target_clones), called from every tile
// loop: inlining the micro-kernels' variants (4 widths x 3 row blocks) at each call site made
// this file take minutes to compile.
#define IGC_DEFINE_LAYERS(scalar_t, acc_t, suffix)                                            \
  IGC_TARGET_CLONES int layers_##suffix(const BlockCtx<scalar_t, acc_t>& k, int64_t l0,       \
                                        int64_t l1, acc_t* const* buf, int cur) {             \
    return pointwise_layers_impl(k, l0, l1, buf, cur);                                        \
  }                                                                                           \
  inline int pointwise_layers(const BlockCtx<scalar_t, acc_t>& k, int64_t l0, int64_t l1,     \
                              acc_t* const* buf, int cur) {                                   \
    return layers_##suffix(k, l0, l1, buf, cur);                                              \
  }
IGC_FOR_EACH_CPU_DTYPE(IGC_DEFINE_LAYERS)
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
    for (int64_t i = 0; i < CL * TILE; ++i) a[i] += r[i];
  }
  const bool cy = tile_offsets(k.y_ix, q0, tvalid, off);
  store_tile(k.y, off, cy, tvalid, CL, k.y_ix.chan_stride, rows, buf[cur]);
}

// Two tile buffers of a thread.
template <typename acc_t>
struct TileBuffers {
  std::vector<acc_t> storage;
  acc_t* buf[2];
  explicit TileBuffers(int64_t cmax) : storage(static_cast<size_t>(2 * cmax * TILE)) {
    buf[0] = storage.data();
    buf[1] = storage.data() + cmax * TILE;
  }
};

// A block without a spatial layer: tiles over positions.
template <typename scalar_t, typename acc_t>
IGC_INLINE void pointwise_tiles_impl(const BlockCtx<scalar_t, acc_t>& k, int64_t tb, int64_t te) {
  TileBuffers<acc_t> b(k.cmax);
  acc_t* const* buf = b.buf;
  int64_t off[TILE];
  for (int64_t t = tb; t < te; ++t) {
    const int64_t p0 = t * k.tw;
    const int tvalid = static_cast<int>(std::min<int64_t>(k.tw, k.P_out - p0));
    const bool cx = tile_offsets(k.x_ix, p0, tvalid, off);
    load_tile(k.x, off, cx, tvalid, k.cin, k.x_ix.chan_stride, k.iota, buf[0]);
    const int cur = pointwise_layers(k, 0, k.L, buf, 0);
    finish_tile(k, p0, tvalid, buf, cur);
  }
}

// Phase 1 for input positions p_begin .. p_end - 1 of image img (flat within the image, whole
// or partial rows): the prefix layers, scattered into the scratch of a band starting at row0.
template <typename scalar_t, typename acc_t>
IGC_INLINE void fill_scratch_impl(const BlockCtx<scalar_t, acc_t>& k, int64_t img, int64_t p_begin,
                             int64_t p_end, int64_t row0, int64_t plane, acc_t* scratch,
                             acc_t* const* buf) {
  const int64_t cs = k.C[k.sl];  // the spatial layer's input channels
  const int32_t* src_rows = k.sl == 0 ? k.in_rows0 : k.gather[k.sl - 1];
  int64_t off[TILE], dst[TILE];
  for (int64_t p0 = p_begin; p0 < p_end; p0 += k.tw) {
    const int tvalid = static_cast<int>(std::min<int64_t>(k.tw, p_end - p0));
    const int64_t g0 = img * k.H * k.Wd + p0;
    const bool cx = tile_offsets(k.x_ix, g0, tvalid, off);
    load_tile(k.x, off, cx, tvalid, k.cin, k.x_ix.chan_stride, k.iota, buf[0]);
    const int cur = pointwise_layers(k, 0, k.sl, buf, 0);
    if (k.cl) {  // channels-last scratch: a transposed store of the tile
      for (int t = 0; t < tvalid; ++t) {
        const int64_t iy = (p0 + t) / k.Wd, ix = (p0 + t) - iy * k.Wd;
        dst[t] = (iy - row0) * k.row_len + (ix + k.pad) * k.cp;
      }
      store_tile(scratch, dst, false, tvalid, k.C[k.sl + 1], int64_t(1), k.exp_rows, buf[cur]);
      continue;
    }
    for (int t = 0; t < tvalid; ++t) {
      const int64_t iy = (p0 + t) / k.Wd, ix = (p0 + t) - iy * k.Wd;
      const int64_t cp = ix + k.pad;
      dst[t] = (iy - row0) * k.row_len + (cp % k.s) * k.wph + cp / k.s;
    }
    for (int64_t j = 0; j < cs; ++j) {
      const acc_t* __restrict r = buf[cur] + static_cast<int64_t>(src_rows[j]) * TILE;
      acc_t* __restrict d = scratch + j * plane;
      for (int t = 0; t < tvalid; ++t) d[dst[t]] = r[t];
    }
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
        std::fill(row, row + k.pad * k.cp, acc_t(0));
        std::fill(row + (k.pad + k.Wd) * k.cp, row + k.row_len, acc_t(0));
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
// FMAs; the channels-last result goes to the [channel][position] buffer by a transposed load.
template <int K, typename scalar_t, typename acc_t>
IGC_INLINE void depthwise_tile(const BlockCtx<scalar_t, acc_t>& k, const int64_t* base, int tvalid,
                               const acc_t* scratch, acc_t* tmp, acc_t* out) {
  using S = Simd<acc_t>;
  using V = typename S::V;
  constexpr int KK = K * K;
  int64_t tap[KK];
  for (int ky = 0; ky < K; ++ky)
    for (int kx = 0; kx < K; ++kx) tap[ky * K + kx] = ky * k.row_len + kx * k.cp;
  const int act = k.act[k.sl];
  for (int64_t c0 = 0; c0 < k.cp; c0 += S::LANES) {
    V w[KK];
#pragma GCC unroll 9
    for (int i = 0; i < KK; ++i) w[i] = S::load(k.wt + i * k.cp + c0);
    const V b = S::load(k.bt + c0);
    for (int t = 0; t < tvalid; ++t) {
      const acc_t* src = scratch + base[t] + c0;
      V a = b;
#pragma GCC unroll 9
      for (int i = 0; i < KK; ++i) a += w[i] * S::load(src + tap[i]);
      S::store(tmp + t * k.cp + c0, activate_vec(a, act));
    }
  }
  int64_t off[TILE];
  for (int t = 0; t < tvalid; ++t) off[t] = t * k.cp;
  load_tile(tmp, off, false, tvalid, k.C[k.sl + 1], int64_t(1), k.iota, out);
}

// Phase 2 for output positions q_begin .. q_end - 1 of image img (flat within the image): the
// spatial layer from the scratch of a band starting at input row row0, the suffix, the store.
template <typename scalar_t, typename acc_t>
IGC_INLINE void spatial_tiles_impl(const BlockCtx<scalar_t, acc_t>& k, int64_t img, int64_t q_begin,
                              int64_t q_end, int64_t row0, int64_t plane, const acc_t* scratch,
                              acc_t* const* buf, acc_t* tmp) {
  const int64_t l = k.sl, ns = k.n[l], ms = k.m[l], K = k.k, KK = K * K;
  const int64_t cout = k.C[l + 1];
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
  for (int64_t q0 = q_begin; q0 < q_end; q0 += k.tw) {
    const int tvalid = static_cast<int>(std::min<int64_t>(k.tw, q_end - q0));
    if (k.cl) {
      int64_t base[TILE];
      for (int t = 0; t < tvalid; ++t) {
        const int64_t oy = (q0 + t) / k.Wo, ox = (q0 + t) - oy * k.Wo;
        base[t] = (oy * k.s - k.pad - row0) * k.row_len + ox * k.s * k.cp;
      }
      switch (K) {
        case 3: depthwise_tile<3>(k, base, tvalid, scratch, tmp, buf[0]); break;
        case 5: depthwise_tile<5>(k, base, tvalid, scratch, tmp, buf[0]); break;
        default: depthwise_tile<7>(k, base, tvalid, scratch, tmp, buf[0]); break;
      }
      const int cur = pointwise_layers(k, l + 1, k.L, buf, 0);
      finish_tile(k, img * k.Ho * k.Wo + q0, tvalid, buf, cur);
      continue;
    }
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
    acc_t* out = buf[0];
    for (int64_t o = 0; o < cout; ++o) {
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
    activate(out, cout * TILE, k.act[l]);
    const int cur = pointwise_layers(k, l + 1, k.L, buf, 0);
    finish_tile(k, img * k.Ho * k.Wo + q0, tvalid, buf, cur);
  }
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
  IGC_TARGET_CLONES void pointwise_##suffix(const BlockCtx<scalar_t, acc_t>& k, int64_t tb,   \
                                            int64_t te) {                                     \
    pointwise_tiles_impl(k, tb, te);                                                          \
  }                                                                                           \
  inline void fill_scratch(const BlockCtx<scalar_t, acc_t>& k, int64_t img, int64_t p_begin,  \
                           int64_t p_end, int64_t row0, int64_t plane, acc_t* scratch,        \
                           acc_t* const* buf) {                                               \
    fill_##suffix(k, img, p_begin, p_end, row0, plane, scratch, buf);                         \
  }                                                                                           \
  inline void spatial_tiles(const BlockCtx<scalar_t, acc_t>& k, int64_t img, int64_t q_begin, \
                            int64_t q_end, int64_t row0, int64_t plane, const acc_t* scratch, \
                            acc_t* const* buf, acc_t* tmp) {                                  \
    spatial_##suffix(k, img, q_begin, q_end, row0, plane, scratch, buf, tmp);                 \
  }                                                                                           \
  inline void pointwise_tiles(const BlockCtx<scalar_t, acc_t>& k, int64_t tb, int64_t te) {   \
    pointwise_##suffix(k, tb, te);                                                            \
  }
IGC_FOR_EACH_CPU_DTYPE(IGC_DEFINE_PHASES)
#undef IGC_DEFINE_PHASES

// Whole padded planes of every image (few images): the scratch of image img at
// img * scr_ch * plane; phase 1 over every image's input tiles, then phase 2 over their output
// tiles.
template <typename scalar_t, typename acc_t>
void run_global(const BlockCtx<scalar_t, acc_t>& k, int64_t N, acc_t* scratch, int64_t plane,
                int64_t row0, int64_t nrows) {
  const int64_t HW = k.H * k.Wd, HWo = k.Ho * k.Wo, img_elems = k.scr_ch * plane;
  const int64_t in_tiles = (HW + k.tw - 1) / k.tw, out_tiles = (HWo + k.tw - 1) / k.tw;
  at::parallel_for(0, N * in_tiles, 1, [&](int64_t u0, int64_t u1) {
    TileBuffers<acc_t> tb(k.cmax);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t img = u / in_tiles, t = u % in_tiles;
      acc_t* sc = scratch + img * img_elems;
      if (t == 0) zero_padding(k, row0, 0, nrows, plane, sc);
      fill_scratch(k, img, t * k.tw, std::min(HW, (t + 1) * k.tw), row0, plane, sc, tb.buf);
    }
  });
  at::parallel_for(0, N * out_tiles, 1, [&](int64_t u0, int64_t u1) {
    TileBuffers<acc_t> tb(k.cmax);
    std::vector<acc_t> tmp(static_cast<size_t>(k.cl ? TILE * k.cp : 0));
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t img = u / out_tiles, t = u % out_tiles;
      spatial_tiles(k, img, t * k.tw, std::min(HWo, (t + 1) * k.tw), row0, plane,
                    scratch + img * img_elems, tb.buf, tmp.data());
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
    std::vector<acc_t> sc(static_cast<size_t>(k.scr_ch * plane));
    std::vector<acc_t> tmp(static_cast<size_t>(k.cl ? TILE * k.cp : 0));
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t img = u / nbands, band = u % nbands;
      const int64_t oy0 = band * band_rows, oy1 = std::min(k.Ho, oy0 + band_rows);
      const int64_t row0 = oy0 * k.s - k.pad, nrows = (oy1 - 1 - oy0) * k.s + k.k;
      const int64_t iy0 = std::max<int64_t>(0, row0);
      const int64_t iy1 = std::min<int64_t>(k.H, row0 + nrows);
      zero_padding(k, row0, 0, nrows, plane, sc.data());
      fill_scratch(k, img, iy0 * k.Wd, iy1 * k.Wd, row0, plane, sc.data(), tb.buf);
      spatial_tiles(k, img, oy0 * k.Wo, oy1 * k.Wo, row0, plane, sc.data(), tb.buf, tmp.data());
    }
  });
}

// Checks of the block fields (the chain's own are check_chain's, on 2-D views of the weights).
struct BlockDesc {
  ChainDesc d;
  int64_t sl = -1, k = 1, s = 1;
};

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
  std::vector<at::Tensor> w2d;
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
      w2d.push_back(W.select(3, 0).select(2, 0));
    } else {
      TORCH_CHECK(strides[l] == 1, op, ": layer ", l + 1, ": a pointwise layer has stride 1, got ",
                  strides[l]);
      w2d.push_back(W);
    }
    TORCH_CHECK(strides[l] == 1 || strides[l] == 2, op, ": layer ", l + 1,
                ": stride must be 1 or 2, got ", strides[l]);
    TORCH_CHECK(activations[l] >= kNone && activations[l] <= kHardswish, op, ": layer ", l + 1,
                ": unknown activation code ", activations[l], " (0 none, 1 relu, 2 relu6, 3 "
                "hardswish)");
  }
  bd.d = check_chain(op, x, w2d, biases, groups, shuffles, perms, input_index,
                     /*read_perms=*/true);
  if (residual) {
    TORCH_CHECK(bd.d.C.back() == bd.d.C_in, op, ": residual adds x: x has ", bd.d.C_in,
                " channels but C_L = ", bd.d.C.back());
    TORCH_CHECK(bd.s == 1, op, ": residual needs stride 1 (the output's size must be x's)");
  }
  return bd;
}

at::Tensor block_forward_cpu(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                             at::IntArrayRef groups, at::IntArrayRef shuffles,
                             const OptTensorList& perms, at::IntArrayRef strides,
                             at::IntArrayRef activations, bool residual,
                             const std::optional<at::Tensor>& input_index) {
  TORCH_CHECK(x.device().is_cpu(), "igc::block_forward (cpu): x must be a CPU tensor");
  BlockDesc bd = check_block(x, weights, biases, groups, shuffles, perms, strides, activations,
                             residual, input_index);
  const ChainDesc& d = bd.d;
  const bool spatial = bd.sl >= 0;
  const int64_t pad = bd.k / 2;
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "igc_block_forward", [&] {
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
      at::Tensor w = weights[l].to(acc_type).contiguous();
      keep.push_back(w);
      k.W.push_back(w.data_ptr<acc_t>());
      if (d.has_bias[l]) {
        at::Tensor bc = biases[l].to(acc_type).contiguous();
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
    if (!spatial) {
      k.tw = tile_width<acc_t>(k.P_out, 1, at::get_num_threads());
      k.nv = static_cast<int>(k.tw / Simd<acc_t>::LANES);
      const int64_t ntiles = (k.P_out + k.tw - 1) / k.tw;
      at::parallel_for(0, ntiles, 1, [&](int64_t b, int64_t e) { pointwise_tiles(k, b, e); });
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
      k.row_len = (Wd + 2 * pad) * k.cp;
      k.scr_ch = 1;
      const int32_t* src_rows = sl == 0 ? k.in_rows0 : k.gather[sl - 1];
      exp_rows.resize(static_cast<size_t>(cs_out));
      for (int64_t o = 0; o < cs_out; ++o) exp_rows[o] = src_rows[o / ms];
      wt.assign(static_cast<size_t>(KK * k.cp), acc_t(0));
      bt.assign(static_cast<size_t>(k.cp), acc_t(0));
      for (int64_t o = 0; o < cs_out; ++o) {
        for (int64_t t = 0; t < KK; ++t) wt[t * k.cp + o] = k.W[sl][o * KK + t];
        if (k.b[sl] != nullptr) bt[o] = k.b[sl][o];
      }
      k.exp_rows = exp_rows.data();
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
    if (N < threads && N * cs * full_plane * elem <= (int64_t(64) << 20)) {
      k.tw = tile_width<acc_t>(Ho * Wo, N, threads);
      k.nv = static_cast<int>(k.tw / Simd<acc_t>::LANES);
      std::vector<acc_t> scratch(static_cast<size_t>(N * cs * full_plane));
      run_global(k, N, scratch.data(), full_plane, -pad, full_rows);
      return;
    }
    // bands: as many output rows as keep the scratch near kBandScratchBytes (at least one)
    const int64_t row_bytes = cs * k.row_len * elem;
    int64_t band = (kBandScratchBytes / std::max<int64_t>(1, row_bytes) - bd.k) / bd.s + 1;
    band = std::max<int64_t>(1, std::min(band, Ho));
    run_bands(k, N, band);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(igc, CPU, m) { m.impl("block_forward", &block_forward_cpu); }

}  // namespace igc
