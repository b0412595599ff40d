// Tile primitives shared by the CPU kernels (chain_cpu.cpp, block_kernels.h): tiles of TILE
// positions held [channel][position] in the accumulation type, loaded from and stored to any
// strided layout (channels-last through in-register transposes), and the grouped-layer
// micro-kernel (OUT_BLOCK output rows at once, accumulators in registers). Everything is in an
// anonymous namespace: each kernel file gets its own copy, compiled inside its target_clones.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <ATen/core/Tensor.h>

#include "../positions.h"

// (IGC_NO_TARGET_CLONES: the default ISA alone, a faster build: setup.py, IGC_CPU_TARGET_CLONES=0)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(IGC_NO_TARGET_CLONES)
#define IGC_TARGET_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define IGC_TARGET_CLONES
#endif
#define IGC_INLINE inline __attribute__((always_inline))
// M(scalar_t, acc_t, suffix) for every dtype the CPU kernels instantiate their per-ISA
// functions for.
#define IGC_FOR_EACH_CPU_DTYPE(M) \
  M(float, float, f32)            \
  M(double, double, f64)          \
  M(c10::Half, float, f16)        \
  M(c10::BFloat16, float, bf16)

namespace igc {
namespace {


// Positions per tile. 64 floats = four AVX-512 registers per row: with OUT_BLOCK = 4 the forward
// micro-kernel keeps 16 vector accumulators, and the weight-gradient lanes are read and written
// once per 64 positions. The backward's per-tile working set for C = 256, L = 3 is about 400 KB
// (L2). Chosen by measurement (64 against 32: docs/backends.md, "CPU backend").
constexpr int TILE = 64;
// Output rows computed together by one micro-kernel call (accumulators in registers).
constexpr int OUT_BLOCK = 4;

// Positions -> element offsets (positions.h) plus the channel stride of the tensor.
struct TensorIndexer : PosIndexer {
  int64_t chan_stride = 0;
};

TensorIndexer make_indexer(const at::Tensor& t) {
  TensorIndexer ix;
  static_cast<PosIndexer&>(ix) =
      make_pos_indexer(static_cast<int>(t.dim()), t.sizes().data(), t.strides().data());
  ix.chan_stride = t.stride(1);
  return ix;
}

// Element offsets of the tile's positions; returns true when they are consecutive (stride 1).
IGC_INLINE bool tile_offsets(const PosIndexer& ix, int64_t p0, int tvalid, int64_t* off) {
  for (int t = 0; t < tvalid; ++t) off[t] = ix.offset(p0 + t);
  bool contig = true;
  for (int t = 1; t < tvalid; ++t) contig &= (off[t] == off[0] + t);
  return contig;
}

// 64-byte SIMD vectors through GCC/Clang vector extensions: one AVX-512 register in the
// x86-64-v4 clone, two AVX2 registers in the v3 clone, four SSE registers otherwise. The aligned(
// sizeof(T)) variant makes loads and stores safe at any element alignment.
template <typename T>
struct Simd {
  typedef T V __attribute__((vector_size(64)));
  typedef T VU __attribute__((vector_size(64), aligned(sizeof(T))));
  static constexpr int LANES = 64 / sizeof(T);
  static constexpr int PER_ROW = TILE / LANES;  // vectors per tile row
  static IGC_INLINE V load(const T* p) { return *reinterpret_cast<const VU*>(p); }
  static IGC_INLINE void store(T* p, V v) { *reinterpret_cast<VU*>(p) = v; }
  static IGC_INLINE V splat(T v) { return V{} + v; }
};

template <typename T>
struct SimdIndex;
template <>
struct SimdIndex<float> {
  typedef int32_t M __attribute__((vector_size(64)));
};
template <>
struct SimdIndex<double> {
  typedef int64_t M __attribute__((vector_size(64)));
};

#if defined(__GNUC__) && !defined(__clang__)
#define IGC_HAVE_SIMD_TRANSPOSE 1
// Shuffle masks of the transpose stages (stage s swaps sub-blocks of size b = N >> (s + 1)),
// built at compile time and loaded as vectors.
template <typename I, int N>
struct TransposeMasks {
  alignas(64) I lo[8][N];
  alignas(64) I hi[8][N];
  constexpr TransposeMasks() : lo(), hi() {
    int s = 0;
    for (int b = N / 2; b >= 1; b /= 2, ++s) {
      for (int lane = 0; lane < N; ++lane) {
        lo[s][lane] = static_cast<I>((lane & b) ? N + lane - b : lane);
        hi[s][lane] = static_cast<I>((lane & b) ? N + lane : lane + b);
      }
    }
  }
};
template <typename I, int N>
inline constexpr TransposeMasks<I, N> kTransposeMasks{};

// In-register transpose of a LANES x LANES block (r[i][lane] -> r[lane][i]): log2(LANES) stages,
// each swapping the off-diagonal b x b sub-blocks with two-source shuffles.
template <typename T>
IGC_INLINE void transpose_block(typename Simd<T>::V* r) {
  constexpr int N = Simd<T>::LANES;
  using M = typename SimdIndex<T>::M;
  using V = typename Simd<T>::V;
  using I = std::remove_reference_t<decltype(M{}[0])>;
  const auto& masks = kTransposeMasks<I, N>;
  int s = 0;
#pragma GCC unroll 4
  for (int b = N / 2; b >= 1; b /= 2, ++s) {
    const M lo = *reinterpret_cast<const M*>(masks.lo[s]);
    const M hi = *reinterpret_cast<const M*>(masks.hi[s]);
#pragma GCC unroll 16
    for (int i = 0; i < N; ++i) {
      if (i & b) continue;
      const V a = r[i], c = r[i + b];
      r[i] = __builtin_shuffle(a, c, lo);
      r[i + b] = __builtin_shuffle(a, c, hi);
    }
  }
}
#else
#define IGC_HAVE_SIMD_TRANSPOSE 0
#endif

#if IGC_HAVE_SIMD_TRANSPOSE
// Moves a channels-last tile (the channels of position t contiguous at mem + off[t]) to or from
// the [channel][position] buffer (row rowmap[c] for channel c) through LANES x LANES register
// transposes. kLoad: memory -> buffer, positions >= tvalid zero; else buffer -> memory.
template <bool kLoad, typename T>
IGC_INLINE void transpose_tile(std::conditional_t<kLoad, const T*, T*> mem, const int64_t* off,
                               int tvalid, int64_t C, const int32_t* rowmap,
                               std::conditional_t<kLoad, T*, const T*> buf) {
  using S = Simd<T>;
  constexpr int N = S::LANES;
  int64_t c0 = 0;
  for (; c0 + N <= C; c0 += N) {
    for (int t0 = 0; t0 < (kLoad ? TILE : tvalid); t0 += N) {
      typename S::V r[N];
#pragma GCC unroll 16
      for (int i = 0; i < N; ++i) {
        if constexpr (kLoad)
          r[i] = t0 + i < tvalid ? S::load(mem + off[t0 + i] + c0) : typename S::V{};
        else
          r[i] = S::load(buf + static_cast<int64_t>(rowmap[c0 + i]) * TILE + t0);
      }
      transpose_block<T>(r);
#pragma GCC unroll 16
      for (int i = 0; i < N; ++i) {
        if constexpr (kLoad)
          S::store(buf + static_cast<int64_t>(rowmap[c0 + i]) * TILE + t0, r[i]);
        else if (t0 + i < tvalid)
          S::store(mem + off[t0 + i] + c0, r[i]);
      }
    }
  }
  for (int64_t c = c0; c < C; ++c) {  // channels past the last full block
    const auto row = buf + static_cast<int64_t>(rowmap[c]) * TILE;
    for (int t = 0; t < tvalid; ++t) {
      if constexpr (kLoad)
        row[t] = mem[off[t] + c];
      else
        mem[off[t] + c] = row[t];
    }
    if constexpr (kLoad)
      for (int t = tvalid; t < TILE; ++t) row[t] = T(0);
  }
}
#endif

// buf[rowmap[c]][t] = src[c, position t] for c < C; positions >= tvalid are zero.
template <typename scalar_t, typename acc_t>
IGC_INLINE void load_tile(const scalar_t* __restrict src, const int64_t* off, bool contig,
                          int tvalid, int64_t C, int64_t cs, const int32_t* rowmap,
                          acc_t* __restrict buf) {
#if IGC_HAVE_SIMD_TRANSPOSE
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (cs == 1 && !contig) {  // channels-last
      transpose_tile<true, acc_t>(src, off, tvalid, C, rowmap, buf);
      return;
    }
  }
#endif
  if (tvalid == TILE && contig) {
    const scalar_t* s0 = src + off[0];
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* s = s0 + c * cs;
      acc_t* r = buf + static_cast<int64_t>(rowmap[c]) * TILE;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        // explicit vector copies: GCC turns the plain loop into a memcpy call per 256-byte row
        // (a large share of the NCHW backward's time: docs/backends.md, "CPU backend")
        using S = Simd<acc_t>;
#pragma GCC unroll 8
        for (int j = 0; j < S::PER_ROW; ++j) S::store(r + j * S::LANES, S::load(s + j * S::LANES));
      } else {
        for (int t = 0; t < TILE; ++t) r[t] = static_cast<acc_t>(s[t]);
      }
    }
    return;
  }
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* s = src + c * cs;
    acc_t* r = buf + static_cast<int64_t>(rowmap[c]) * TILE;
    for (int t = 0; t < tvalid; ++t) r[t] = static_cast<acc_t>(s[off[t]]);
    for (int t = tvalid; t < TILE; ++t) r[t] = acc_t(0);
  }
}

// dst[c, position t] = buf[rowmap[c]][t] for c < C, t < tvalid.
template <typename scalar_t, typename acc_t>
IGC_INLINE void store_tile(scalar_t* __restrict dst, const int64_t* off, bool contig, int tvalid,
                           int64_t C, int64_t cs, const int32_t* rowmap,
                           const acc_t* __restrict buf) {
#if IGC_HAVE_SIMD_TRANSPOSE
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (cs == 1 && !contig) {  // channels-last
      transpose_tile<false, acc_t>(dst, off, tvalid, C, rowmap, buf);
      return;
    }
  }
#endif
  if (tvalid == TILE && contig) {
    scalar_t* d0 = dst + off[0];
    for (int64_t c = 0; c < C; ++c) {
      scalar_t* d = d0 + c * cs;
      const acc_t* r = buf + static_cast<int64_t>(rowmap[c]) * TILE;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {  // explicit vector copies, see load_tile
        using S = Simd<acc_t>;
#pragma GCC unroll 8
        for (int j = 0; j < S::PER_ROW; ++j) S::store(d + j * S::LANES, S::load(r + j * S::LANES));
      } else {
        for (int t = 0; t < TILE; ++t) d[t] = static_cast<scalar_t>(r[t]);
      }
    }
    return;
  }
  for (int64_t c = 0; c < C; ++c) {
    scalar_t* d = dst + c * cs;
    const acc_t* r = buf + static_cast<int64_t>(rowmap[c]) * TILE;
    for (int t = 0; t < tvalid; ++t) d[off[t]] = static_cast<scalar_t>(r[t]);
  }
}

// OB output rows: out[out_rows[k]][t] = bias[k] + sum_{i < nin} w[k * wk + i * wi] * in[in_rows[i]][t].
// OB output rows of a group over the first NV vectors of the tile's positions.
template <typename acc_t, int OB, int NV = Simd<acc_t>::PER_ROW>
IGC_INLINE void micro_rows(const acc_t* __restrict in, const int32_t* in_rows, int64_t nin,
                           const acc_t* __restrict w, int64_t wk, int64_t wi,
                           const acc_t* __restrict bias, acc_t* __restrict out,
                           const int32_t* out_rows) {
  using S = Simd<acc_t>;
  using V = typename S::V;
  V acc[OB][NV];
#pragma GCC unroll 8
  for (int k = 0; k < OB; ++k) {
    const V b0 = S::splat(bias ? bias[k] : acc_t(0));
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) acc[k][j] = b0;
  }
  for (int64_t i = 0; i < nin; ++i) {
    const acc_t* __restrict r = in + static_cast<int64_t>(in_rows[i]) * TILE;
    V rv[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) rv[j] = S::load(r + j * S::LANES);
#pragma GCC unroll 8
    for (int k = 0; k < OB; ++k) {
      const acc_t wv = w[k * wk + i * wi];
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[k][j] += wv * rv[j];
    }
  }
#pragma GCC unroll 8
  for (int k = 0; k < OB; ++k) {
    acc_t* __restrict o = out + static_cast<int64_t>(out_rows[k]) * TILE;
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) S::store(o + j * S::LANES, acc[k][j]);
  }
}

// OB output rows per micro-kernel call (OUT_BLOCK unless given: narrow tiles take more rows,
// OB * NV accumulators).
template <typename acc_t, int NV, int OB = OUT_BLOCK>
IGC_INLINE void grouped_layer_nv(const acc_t* in, const int32_t* in_rows, const acc_t* w,
                                 const acc_t* bias, int64_t G, int64_t rows, int64_t nin,
                                 int64_t wk, int64_t wi, acc_t* out, const int32_t* out_rows) {
  const int64_t w_group = rows * nin;
  for (int64_t g = 0; g < G; ++g) {
    const acc_t* wg = w + g * w_group;
    const int32_t* ir = in_rows + g * nin;
    int64_t q = 0;
    for (; q + OB <= rows; q += OB)
      micro_rows<acc_t, OB, NV>(in, ir, nin, wg + q * wk, wk, wi,
                                bias ? bias + g * rows + q : nullptr, out, out_rows + g * rows + q);
    if constexpr (OB > OUT_BLOCK)
      for (; q + OUT_BLOCK <= rows; q += OUT_BLOCK)
        micro_rows<acc_t, OUT_BLOCK, NV>(in, ir, nin, wg + q * wk, wk, wi,
                                         bias ? bias + g * rows + q : nullptr, out,
                                         out_rows + g * rows + q);
    for (; q + 2 <= rows; q += 2)
      micro_rows<acc_t, 2, NV>(in, ir, nin, wg + q * wk, wk, wi,
                               bias ? bias + g * rows + q : nullptr, out, out_rows + g * rows + q);
    for (; q < rows; ++q)
      micro_rows<acc_t, 1, NV>(in, ir, nin, wg + q * wk, wk, wi,
                               bias ? bias + g * rows + q : nullptr, out, out_rows + g * rows + q);
  }
}

// One grouped layer on a tile: out row out_rows[g * rows + q] = bias + sum_i W[g, q, i] * in row
// in_rows[g * nin + i] (W[g, q, i] at w + g * rows * nin + q * wk + i * wi), every position.
template <typename acc_t>
IGC_INLINE void grouped_layer(const acc_t* in, const int32_t* in_rows, const acc_t* w,
                              const acc_t* bias, int64_t G, int64_t rows, int64_t nin,
                              int64_t wk, int64_t wi, acc_t* out, const int32_t* out_rows) {
  grouped_layer_nv<acc_t, Simd<acc_t>::PER_ROW>(in, in_rows, w, bias, G, rows, nin, wk, wi, out,
                                                out_rows);
}

// grouped_layer on the tile's first nv * LANES positions only (float tiles; others whole):
// narrow tiles cost what they hold.
template <typename acc_t>
IGC_INLINE void grouped_layer_narrow(const acc_t* in, const int32_t* in_rows, const acc_t* w,
                                     const acc_t* bias, int64_t G, int64_t rows, int64_t nin,
                                     int64_t wk, int64_t wi, acc_t* out, const int32_t* out_rows,
                                     int nv) {
  if constexpr (Simd<acc_t>::PER_ROW == 4) {
    switch (nv) {
      case 1:  // 16 rows x 1 vector, 8 x 2: 16 accumulators as in the 4 x 4 kernel
        return grouped_layer_nv<acc_t, 1, 16>(in, in_rows, w, bias, G, rows, nin, wk, wi, out,
                                              out_rows);
      case 2:
        return grouped_layer_nv<acc_t, 2, 8>(in, in_rows, w, bias, G, rows, nin, wk, wi, out,
                                             out_rows);
      case 3:
        return grouped_layer_nv<acc_t, 3>(in, in_rows, w, bias, G, rows, nin, wk, wi, out,
                                          out_rows);
      default:
        break;
    }
  }
  grouped_layer_nv<acc_t, Simd<acc_t>::PER_ROW>(in, in_rows, w, bias, G, rows, nin, wk, wi, out,
                                                out_rows);
}

// Activation codes of igc::block_forward.
enum Act : int { kNone = 0, kRelu = 1, kRelu6 = 2, kHardswish = 3 };

// An activation on a vector, NaN in NaN out as torch.relu / relu6 / hardswish (written so that
// the comparisons are false for NaN, which then passes through unchanged).
template <int ACT, typename V>
IGC_INLINE V activate_vec(V v) {
  const V zero{}, six = zero + 6, three = zero + 3;
  if constexpr (ACT == kRelu) {
    return v < zero ? zero : v;
  } else if constexpr (ACT == kRelu6) {
    const V r = v < zero ? zero : v;
    return r > six ? six : r;
  } else if constexpr (ACT == kHardswish) {
    V r = v + three;
    r = r < zero ? zero : r;
    r = r > six ? six : r;
    return v * r / six;
  } else {
    return v;
  }
}

}  // namespace
}  // namespace igc
