// Grouped 1x1 layers on channels-last float tiles (block_kernels.h's channels-last path): a tile
// holds position t's channels contiguously at row t (row stride ld), and a layer's outputs are
// computed as vectors of LANES consecutive output channels of one group, R positions at once:
// each input value is one broadcast, each step of the sum R x NB vector FMAs on NB weight vectors.
// Unlike the [channel][position] kernel of tiles.h, every lane of a vector holds a real output
// whatever the number of positions (a 7x7 image fills its vectors), and the tiles need no
// transposes from and to channels-last tensors.
//
// Weights are packed once per layer (pack_cl_layer): per group, mp = m rounded up to LANES
// outputs (zero padded) in the blocks of NB vectors the layer computes together
// (cl_block_vectors), each block [n][NB LANES], so that a block's weights are one contiguous
// stream, read in order; then the bias [G][mp], zero padded. A group's last vector may extend
// past the group (m not a multiple of LANES): its extra lanes are computed with zero weights and
// stored over the next group's first outputs, which that group then overwrites (groups are
// computed in order); past the last group they land in the row's padding. A tile's rows are
// therefore cl_row_extent() floats wide at least. Input columns are given per layer (cols[g * n + i]: the
// tile column holding input i of group g), which is how permutations are applied: as the
// addresses of the broadcasts, moving no data.
#pragma once

#include "tiles.h"

namespace igc {
namespace {

constexpr int kClLanes = Simd<float>::LANES;

IGC_INLINE int64_t cl_round_up(int64_t v) { return (v + kClLanes - 1) / kClLanes * kClLanes; }

// Floats of a tile row a layer of G groups of m outputs writes (its last group's last vector).
IGC_INLINE int64_t cl_row_extent(int64_t G, int64_t m) {
  return std::max<int64_t>((G - 1) * m + cl_round_up(m), cl_round_up(G * m));
}

// Floats of a layer's packed weights and bias.
IGC_INLINE int64_t cl_packed_size(int64_t G, int64_t n, int64_t m) {
  return G * (n + 1) * cl_round_up(m);
}

// Vectors computed together from vector v of a group of nvec: blocks of 4, with 5 = 3 + 2 (4 + 1
// would leave one vector of 6 x 1 accumulators), then 3, 2, 1.
IGC_INLINE int cl_block_vectors(int64_t rest) {
  if (rest >= 4 && rest != 5) return 4;
  if (rest == 3 || rest == 5) return 3;
  return static_cast<int>(rest);
}

// w: (G * m, n) row-major (W[g m + q][i]); b: G * m values or null; out: cl_packed_size floats.
// The block of vectors v .. v + NB - 1 of group g starts at (g * n * mp + v * LANES * n): its
// element (i, jj) is output q = v LANES + jj of input i.
inline void pack_cl_layer(const float* w, const float* b, int64_t G, int64_t n, int64_t m,
                          float* out) {
  const int64_t mp = cl_round_up(m), nvec = mp / kClLanes;
  std::fill(out, out + cl_packed_size(G, n, m), 0.0f);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t v = 0; v < nvec;) {
      const int nb = cl_block_vectors(nvec - v);
      float* blk = out + g * n * mp + v * kClLanes * n;
      for (int64_t i = 0; i < n; ++i)
        for (int64_t jj = 0; jj < nb * kClLanes; ++jj) {
          const int64_t q = v * kClLanes + jj;
          if (q < m) blk[i * nb * kClLanes + jj] = w[(g * m + q) * n + i];
        }
      v += nb;
    }
  if (b != nullptr)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t q = 0; q < m; ++q) out[G * n * mp + g * mp + q] = b[g * m + q];
}

// R positions x NB vectors: out[o_r + j * LANES + lane] = act(bias[j LANES + lane] +
// sum_i in[r * ldi + cols[i]] * w[i * ldw + j LANES + lane]), where o_r is r * ldo, or oofs[r]
// when output offsets are given (rows of a padded image, as in a spatial layer's scratch).
template <int R, int NB, int ACT>
IGC_INLINE void cl_micro(const float* __restrict in, int64_t ldi, const int32_t* __restrict cols,
                         int64_t n, const float* __restrict w, int64_t ldw,
                         const float* __restrict bias, float* __restrict out, int64_t ldo,
                         const int64_t* __restrict oofs) {
  using S = Simd<float>;
  using V = S::V;
  V acc[R][NB];
#pragma GCC unroll 8
  for (int j = 0; j < NB; ++j) {
    const V b = S::load(bias + j * kClLanes);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r][j] = b;
  }
  // the rows' addresses, so that each broadcast is one address mode (row + column * 4)
  const float* rows[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) rows[r] = in + r * ldi;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = cols[i];
    V wv[NB];
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) wv[j] = S::load(w + i * ldw + j * kClLanes);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      // scalar * vector: one broadcast load (S::splat would add a zero vector first)
      const float av = rows[r][c];
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) acc[r][j] += av * wv[j];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    float* o = out + (oofs != nullptr ? oofs[r] : r * ldo);
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) S::store(o + j * kClLanes, activate_vec<ACT>(acc[r][j]));
  }
}

// Positions per micro-kernel call for NB vectors (about 24 accumulators), and the tail calls.
template <int NB>
constexpr int kClRows = NB >= 3 ? 6 : 12;

IGC_INLINE const int64_t* cl_offsets_from(const int64_t* oofs, int t) {
  return oofs != nullptr ? oofs + t : nullptr;
}

template <int NB, int ACT>
IGC_INLINE void cl_positions(const float* in, int64_t ldi, const int32_t* cols, int64_t n,
                             const float* w, int64_t ldw, const float* bias, float* out,
                             int64_t ldo, const int64_t* oofs, int T) {
  constexpr int R = kClRows<NB>;
  // positions t ..: rows from out + t * ldo, or at out + oofs[t ..]
  const int64_t step = oofs != nullptr ? 0 : ldo;
  int t = 0;
  for (; t + R <= T; t += R)
    cl_micro<R, NB, ACT>(in + t * ldi, ldi, cols, n, w, ldw, bias, out + t * step, ldo,
                         cl_offsets_from(oofs, t));
  for (; t + 4 <= T; t += 4)
    cl_micro<4, NB, ACT>(in + t * ldi, ldi, cols, n, w, ldw, bias, out + t * step, ldo,
                         cl_offsets_from(oofs, t));
  if (t + 2 <= T) {
    cl_micro<2, NB, ACT>(in + t * ldi, ldi, cols, n, w, ldw, bias, out + t * step, ldo,
                         cl_offsets_from(oofs, t));
    t += 2;
  }
  if (t < T)
    cl_micro<1, NB, ACT>(in + t * ldi, ldi, cols, n, w, ldw, bias, out + t * step, ldo,
                         cl_offsets_from(oofs, t));
}

// One grouped layer on T positions: out[o_t + g * m + q] = act(layer output g m + q at
// position t) for every group g and q < m (and the extra lanes described above), where o_t is
// t * ldo, or oofs[t] when output offsets are given.
template <int ACT>
IGC_INLINE void cl_layer_act(const float* in, int64_t ldi, const int32_t* cols,
                             const float* packed, int64_t G, int64_t n, int64_t m, float* out,
                             int64_t ldo, const int64_t* oofs, int T) {
  const int64_t mp = cl_round_up(m), nvec = mp / kClLanes;
  const float* bias = packed + G * n * mp;
  for (int64_t g = 0; g < G; ++g) {
    const float* wg = packed + g * n * mp;
    const int32_t* cg = cols + g * n;
    for (int64_t v = 0; v < nvec;) {
      const int nb = cl_block_vectors(nvec - v);
      const float* w = wg + v * kClLanes * n;  // [n][nb LANES]
      const float* b = bias + g * mp + v * kClLanes;
      float* o = out + g * m + v * kClLanes;
      switch (nb) {
        case 4: cl_positions<4, ACT>(in, ldi, cg, n, w, 4 * kClLanes, b, o, ldo, oofs, T); break;
        case 3: cl_positions<3, ACT>(in, ldi, cg, n, w, 3 * kClLanes, b, o, ldo, oofs, T); break;
        case 2: cl_positions<2, ACT>(in, ldi, cg, n, w, 2 * kClLanes, b, o, ldo, oofs, T); break;
        default: cl_positions<1, ACT>(in, ldi, cg, n, w, kClLanes, b, o, ldo, oofs, T); break;
      }
      v += nb;
    }
  }
}

// act: an Act code (tiles.h). oofs: null (rows t * ldo) or the output offset of each position.
IGC_INLINE void cl_layer(const float* in, int64_t ldi, const int32_t* cols, const float* packed,
                         int64_t G, int64_t n, int64_t m, float* out, int64_t ldo,
                         const int64_t* oofs, int T, int act) {
#define IGC_CL_LAYER(A) cl_layer_act<A>(in, ldi, cols, packed, G, n, m, out, ldo, oofs, T)
  switch (act) {
    case kRelu: return IGC_CL_LAYER(kRelu);
    case kRelu6: return IGC_CL_LAYER(kRelu6);
    case kHardswish: return IGC_CL_LAYER(kHardswish);
    default: return IGC_CL_LAYER(kNone);
  }
#undef IGC_CL_LAYER
}

}  // namespace
}  // namespace igc
