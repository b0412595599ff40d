// Tensor-core forward of the chain for float16 / bfloat16 (sm_80 and newer): the group products
// as warp-level mma.sync, the permutations as the row addresses of the ldmatrix reads.
//
// Tile. A CTA takes TP = 16 * MT positions (MT in {1, 2, 4}) and keeps two [channel][TP] tiles
// of the storage dtype in shared memory (ping-pong), one row of zeros and one scratch row (where
// sm_90's stmatrix puts the padding outputs of a partial block of 8). Intermediates are
// rounded to the storage dtype between layers, as the unfused chain of the same dtype rounds
// each layer's output; products accumulate in fp32. Rows are TP elements long, in 16-byte
// chunks of 8 positions; chunk c of row r sits at chunk c ^ swizzle(r) of that row (below), so
// that the 8 rows an ldmatrix phase reads (consecutive rows, or the rows g * m + k of a shuffle)
// fall in different banks.
//
// Layer l (n inputs, m outputs per group). Work items are (group g, block of 8 outputs), or, with
// tiles of 16 and 32 positions, two blocks of a group where they pair up (one ldmatrix then
// feeds two products); a warp takes an item and computes D[position][output] =
// H[position][k] W_g^T[k][output] for every 16-position row block of the tile with mma.sync
// m16n8k16 (n > 8: ceil(n / 16) k-steps) or m16n8k8 (n <= 8): A = the activations, B = the
// weights, D = fp32 accumulators initialised with the bias. Groups are never mixed in one
// product (a non-finite input cannot leak into another group's outputs); inputs beyond n read
// the zero row and weights beyond n / m are zero. A is
// loaded with ldmatrix.trans from the channel-major tile: lane i gives the address of one
// 8-position row piece of input k = kstep * 16 + (i / 16) * 8 + i % 8, and that row is
// gather_{l-1}[g * n + k] of the previous layer's output: a permutation costs nothing. B comes
// from fragments packed once per call by pack_mma_weights_kernel (a 64-bit load per lane and
// k-step, reused by the MT row blocks). D is rounded and stored transposed to the other tile,
// in natural output order: on sm_90 (tiles of 32 and 64 positions) four 8x8 blocks per
// stmatrix.trans, otherwise per 8x8 block a movmatrix and 32-bit stores. The store of y reads
// row gather_L[j] for output channel j.
//
// Tile loads and stores: NCHW rows as 16-byte vectors; channels-last tiles with C % 32 == 0 as
// 16-byte vectors through ldmatrix.trans (store) and stmatrix.trans (load, sm_90), other
// channels-last tiles as 8x8 blocks through movmatrix (32-bit accesses); anything else (and
// unaligned tensors) element by element.
//
// Under IGC_EMULATE the warp-level instructions (ldmatrix, movmatrix, stmatrix, mma.sync) come
// from tests/csrc/host_emulation.h, which implements the PTX ISA's fragment layouts: the tests
// check this kernel's results on a machine without a GPU.
#pragma once

#include "chain_kernels.cuh"

namespace igc {
namespace cuda {

constexpr int kMmaMaxMt = 4;  // largest tile: 64 positions

// ---------------------------------------------------------------------------------------------
// Element formats of the tensor-core path (tiles hold raw 16-bit values)
// ---------------------------------------------------------------------------------------------
struct MmaBf16 {
  static constexpr bool is_bf16 = true;
};
struct MmaF16 {
  static constexpr bool is_bf16 = false;
};

template <class Fmt>
__host__ __device__ __forceinline__ uint16_t mma_from_float(float v) {
#ifdef IGC_EMULATE
  return Fmt::is_bf16 ? igc_emu::float_to_bf16(v) : igc_emu::float_to_f16(v);
#else
  if constexpr (Fmt::is_bf16) return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  else return __half_as_ushort(__float2half_rn(v));
#endif
}
// Two values in one 32-bit register, the lower index in the low half (mma operand order).
template <class Fmt>
__host__ __device__ __forceinline__ uint32_t mma_pack(float lo, float hi) {
  return static_cast<uint32_t>(mma_from_float<Fmt>(lo)) |
         (static_cast<uint32_t>(mma_from_float<Fmt>(hi)) << 16);
}

// ---------------------------------------------------------------------------------------------
// Warp-level instructions
// ---------------------------------------------------------------------------------------------
// ldmatrix of NM 8x8 matrices of 16-bit values (Trans: .trans); lane i gives the address of
// row i % 8 of matrix i / 8 (lanes 8 * NM and up: ignored), element `elem` of the shared array
// `base`. r[j] receives matrix j's fragment: without .trans, lane l holds elements (row l / 4,
// columns 2 (l % 4) + {0, 1}); with .trans, the transposed matrix's.
template <int NM, bool Trans>
__device__ __forceinline__ void ldmatrix(uint32_t* r, const uint16_t* base, int elem) {
  static_assert(NM == 2 || NM == 4, "x2 or x4");
#ifdef IGC_EMULATE
  igc_emu::warp_ldmatrix(r, base + elem, NM, Trans);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  // a 32-bit shared-window address (the conversion of `base` is loop-invariant)
  const unsigned a =
      static_cast<unsigned>(__cvta_generic_to_shared(base)) + 2u * static_cast<unsigned>(elem);
  if constexpr (NM == 4 && Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
  } else if constexpr (NM == 4) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
  } else if constexpr (Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(a));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(a));
  }
#else
  (void)r;
  (void)base;
  (void)elem;
  __trap();
#endif
}
template <int NM>
__device__ __forceinline__ void ldmatrix_trans(uint32_t* r, const uint16_t* base, int elem) {
  ldmatrix<NM, true>(r, base, elem);
}

// movmatrix .trans: r holds this lane's pair of an 8x8 matrix of 16-bit values in the mma
// fragment layout (row lane / 4, columns 2 (lane % 4) + {0, 1}); returns its pair of the
// transposed matrix in the same layout.
__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t r) {
#ifdef IGC_EMULATE
  return igc_emu::warp_movmatrix_trans(r);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t t;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(t) : "r"(r));
  return t;
#else
  (void)r;
  __trap();
  return 0;
#endif
}

// d = A (16 x K) * B (K x 8) + c, K = 16 (a: 4 registers, b: 2) or 8 (a: 2, b: 1), fp32 c
// and d (c may be d: an accumulation). A separate c costs no register copies: the first k-step
// of an item takes the bias as c.
template <class Fmt, int K>
__device__ __forceinline__ void mma_sync(float* d, const uint32_t* a, const uint32_t* b,
                                         const float* c) {
#ifdef IGC_EMULATE
  float t[4] = {c[0], c[1], c[2], c[3]};
  igc_emu::warp_mma(t, a, b, K, Fmt::is_bf16);
  for (int q = 0; q < 4; ++q) d[q] = t[q];
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (K == 16) {
    if constexpr (Fmt::is_bf16) {
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
          "{%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
          : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]),
            "f"(c[1]), "f"(c[2]), "f"(c[3]));
    } else {
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
          "{%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
          : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]),
            "f"(c[1]), "f"(c[2]), "f"(c[3]));
    }
  } else {
    static_assert(K == 8, "k16 or k8");
    if constexpr (Fmt::is_bf16) {
      asm volatile(
          "mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
          "{%4, %5}, {%6}, {%7, %8, %9, %10};\n"
          : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
          : "r"(a[0]), "r"(a[1]), "r"(b[0]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
    } else {
      asm volatile(
          "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
          "{%4, %5}, {%6}, {%7, %8, %9, %10};\n"
          : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
          : "r"(a[0]), "r"(a[1]), "r"(b[0]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
    }
  }
#else
  (void)d;
  (void)a;
  (void)b;
  (void)c;
  __trap();
#endif
}
// d += A B
template <class Fmt, int K>
__device__ __forceinline__ void mma_sync(float* d, const uint32_t* a, const uint32_t* b) {
  mma_sync<Fmt, K>(d, a, b, d);
}

// Whether the device has stmatrix (sm_90 and newer; under emulation, a switch of the emulated
// device, so that the tests run both epilogues).
__device__ __forceinline__ bool mma_has_stmatrix() {
#ifdef IGC_EMULATE
  return igc_emu::device().stmatrix != 0;
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return true;
#else
  return false;
#endif
}

// stmatrix.trans of four 8x8 matrices of 16-bit values: r[j] holds this lane's pair of matrix j
// in the mma fragment layout (row lane / 4, columns 2 (lane % 4) + {0, 1}); lane i gives the
// address of row i % 8 of matrix i / 8's transpose (8 consecutive values), element `elem` of
// the shared array `base`.
__device__ __forceinline__ void stmatrix_trans_x4(uint16_t* base, int elem, const uint32_t* r) {
#ifdef IGC_EMULATE
  igc_emu::warp_stmatrix_trans(base + elem, r, 4);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const unsigned a =
      static_cast<unsigned>(__cvta_generic_to_shared(base)) + 2u * static_cast<unsigned>(elem);
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n"
               :
               : "r"(a), "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3])
               : "memory");
#else
  (void)base;
  (void)elem;
  (void)r;
  __trap();
#endif
}

// ---------------------------------------------------------------------------------------------
// The chain as the tensor-core kernel sees it
// ---------------------------------------------------------------------------------------------
struct MmaLayer {
  int nblk;      // blocks of 8 outputs per group: ceil(m / 8)
  int ksteps;    // k-steps per item: 1 (m16n8k8, n <= 8) or ceil(n / 16) (m16n8k16)
  int k8;        // n <= 8: one m16n8k8 step
  int shift;     // swizzle shift of this layer's output tile (see mma_swizzle)
  int64_t f_off; // first fragment (uint2 units) of this layer
};

struct MmaParams {
  ChainParams<float> c;  // the chain; W: fp32 weights (packing input), B: fp32 biases
  const uint2* frag;     // packed weight fragments: [layer][group][block][kstep][lane]
  int64_t num_frag;
  int x_shift;           // swizzle shift of the x tile
  MmaLayer layer[kMaxLayers];
};

inline int log2_if_pow2(int64_t v) {
  int s = 0;
  while ((int64_t(1) << s) < v) ++s;
  return (int64_t(1) << s) == v ? s : -1;
}

// The swizzle shift of the tile that layer l's output goes to: with a shuffle of s groups after
// it, layer l + 1 reads rows q * (C / s) + k for consecutive q together, so the shift is
// log2(C / s) when that is a power of two; 3 otherwise (consecutive rows spread by their low
// bits).
inline int mma_shift_after(const HostChain& h, int l) {
  if (h.shuffle[l] > 0 && h.perm[l] == nullptr) {
    const int s = log2_if_pow2(h.C[l + 1] / h.shuffle[l]);
    if (s > 0) return s;
  }
  return 3;
}

inline MmaParams make_mma_params(const HostChain& h, const float* W, const float* B,
                                 const int32_t* table, const uint2* frag) {
  MmaParams mp;
  mp.c = make_params<float>(h, W, B, table);
  mp.frag = frag;
  mp.x_shift = 3;
  int64_t off = 0;
  for (int l = 0; l < kMaxLayers; ++l) {
    MmaLayer& ml = mp.layer[l];
    if (l >= h.L) {
      ml = MmaLayer{0, 0, 0, 3, off};
      continue;
    }
    const LayerDesc& d = mp.c.layer[l];
    ml.nblk = (d.m + 7) / 8;
    ml.k8 = d.n <= 8 ? 1 : 0;
    ml.ksteps = ml.k8 ? 1 : (d.n + 15) / 16;
    ml.shift = mma_shift_after(h, l);
    ml.f_off = off;
    off += static_cast<int64_t>(d.groups) * ml.nblk * ml.ksteps * 32;
  }
  mp.num_frag = off;
  return mp;
}

// Physical element of (row r, position t) in a tile of TP positions with swizzle shift s.
template <int TP>
__host__ __device__ __forceinline__ int mma_elem(int r, int t, int s) {
  constexpr int CPR = TP / 8;                                  // 16-byte chunks per row
  constexpr int LOW = CPR >= 8 ? 0 : (CPR == 4 ? 1 : 2);       // rows per 128-byte line: 2^LOW
  const int sw = ((r ^ (r >> s)) >> LOW) & (CPR - 1);
  return r * TP + ((((t >> 3) ^ sw) & (CPR - 1)) << 3) + (t & 7);
}

// ---------------------------------------------------------------------------------------------
// Weight fragments
// ---------------------------------------------------------------------------------------------
// Entry (layer l, group g, block b, k-step s, lane i): the lane's B registers of that product:
// k16: {W[o][k], W[o][k+1]}, {W[o][k+8], W[o][k+9]} with o = g m + 8 b + i / 4 and
// k = 16 s + 2 (i % 4); k8: {W[o][k], W[o][k+1]}, 0 with k = 2 (i % 4). Zero beyond n and m.
// Transposed (the backward's dh = W^T du, chain_mma_backward.cuh): mp's layers describe W_l^T
// (n and m swapped), and W[o][k] reads the stored weight W_l[g m_l + k][o].
template <class Fmt, bool Transposed = false>
__global__ void __launch_bounds__(kThreads)
    pack_mma_weights_kernel(const MmaParams mp, uint2* __restrict__ frag) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < mp.num_frag;
       e += stride) {
    int l = 0;
    while (l + 1 < mp.c.L && e >= mp.layer[l + 1].f_off) ++l;
    const MmaLayer& ml = mp.layer[l];
    const LayerDesc& d = mp.c.layer[l];
    int64_t t = e - ml.f_off;
    const int lane = static_cast<int>(t % 32);
    t /= 32;
    const int ks = static_cast<int>(t % ml.ksteps);
    t /= ml.ksteps;
    const int b = static_cast<int>(t % ml.nblk);
    const int g = static_cast<int>(t / ml.nblk);
    const int o = 8 * b + lane / 4;
    const int k = 16 * ks + 2 * (lane % 4);
    const float* wg = mp.c.W + d.w_off + static_cast<int64_t>(g) * d.m * d.n;
    auto at = [&](int kk) {
      if (o >= d.m || kk >= d.n) return 0.0f;
      return Transposed ? wg[kk * d.m + o] : wg[o * d.n + kk];
    };
    uint2 v;
    v.x = mma_pack<Fmt>(at(k), at(k + 1));
    v.y = ml.k8 ? 0u : mma_pack<Fmt>(at(k + 8), at(k + 9));
    frag[e] = v;
  }
}

// ---------------------------------------------------------------------------------------------
// Tile movement (raw 16-bit values, swizzled rows)
// ---------------------------------------------------------------------------------------------
// Whether every position of a tensor starts a 16-byte aligned run of 8 elements when its
// channel stride is 1: the base is aligned and every position stride is a multiple of 8.
template <typename T>
__device__ __forceinline__ bool rows_of_8_aligned(const TensorArg<T>& a) {
  bool ok = aligned16(a.ptr);
  for (int d = 0; d < a.ix.nd; ++d) ok = ok && a.ix.stride[d] % 8 == 0;
  return ok;
}

// Channels-last tiles, aligned, through 8x8 blocks (8 positions x 8 channels) and movmatrix.
// A warp takes NB blocks of the same 8 positions and neighbouring channels per iteration.
// Loading, lane (gid, tig) reads channels 2 tig, 2 tig + 1 of position gid of each block (the
// mma fragment layout of the [position][channel] block), movmatrix transposes it, and the lane
// writes positions 2 tig, 2 tig + 1 of channel gid into that channel's row: 32-bit accesses on
// both sides. Storing runs the same steps backwards. The loop bound is the same for every lane
// of a warp (movmatrix is warp-collective).
template <int TP, int NB, bool kDstRows>
__device__ __forceinline__ void cl_load_blocks(const uint16_t* __restrict__ src,
                                               const int64_t* pos_off, int tvalid, int C,
                                               uint16_t* tile, int s,
                                               const int32_t* __restrict__ dst_row) {
  const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
  constexpr int TB = TP / 8;  // blocks of 8 positions
  const int nit = TB * (C / (8 * NB));
  for (int it = threadIdx.x >> 5; it < nit; it += kThreads / 32) {
    const int tb = it % TB, c0 = (it / TB) * 8 * NB;
    const int t = 8 * tb + gid;
    uint32_t v[NB];
    const uint16_t* sp = src + (t < tvalid ? pos_off[t] : 0) + c0 + 2 * tig;
#pragma unroll
    for (int k = 0; k < NB; ++k)
      v[k] = t < tvalid ? *reinterpret_cast<const uint32_t*>(sp + 8 * k) : 0u;
#pragma unroll
    for (int k = 0; k < NB; ++k) {
      const int c = c0 + 8 * k + gid;
      *reinterpret_cast<uint32_t*>(
          tile + mma_elem<TP>(kDstRows ? dst_row[c] : c, 8 * tb + 2 * tig, s)) =
          movmatrix_trans(v[k]);
    }
  }
}

template <int TP, int NB>
__device__ __forceinline__ void cl_store_blocks(uint16_t* __restrict__ dst,
                                                const int64_t* pos_off, int tvalid, int C,
                                                const int32_t* __restrict__ src_row,
                                                const uint16_t* tile, int s) {
  const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
  constexpr int TB = TP / 8;
  const int nit = TB * (C / (8 * NB));
  for (int it = threadIdx.x >> 5; it < nit; it += kThreads / 32) {
    const int tb = it % TB, j0 = (it / TB) * 8 * NB;
    const int t = 8 * tb + gid;
    uint32_t v[NB];
#pragma unroll
    for (int k = 0; k < NB; ++k) {
      const int j = j0 + 8 * k + gid;  // output channel; its row: src_row(j)
      v[k] = movmatrix_trans(*reinterpret_cast<const uint32_t*>(
          tile + mma_elem<TP>(src_row ? src_row[j] : j, 8 * tb + 2 * tig, s)));
    }
    if (t < tvalid) {
      uint16_t* dp = dst + pos_off[t] + j0 + 2 * tig;
#pragma unroll
      for (int k = 0; k < NB; ++k) *reinterpret_cast<uint32_t*>(dp + 8 * k) = v[k];
    }
  }
}

// Channels-last tiles, aligned, C % 32 == 0: 8 positions x 32 channels per warp step, one
// 16-byte access per lane on the tensor side. Lane (gid, tig) = (lane / 4, lane % 4) takes
// channels 8 tig .. 8 tig + 7 of position gid: its four 32-bit words are its fragments of four
// 8x8 matrices, matrix k holding channels 8 q + 2 k + {0, 1} (q = 0..3) of the 8 positions.
// Transposed, row i of matrix k is channel c(i, k) = 8 (i / 2) + 2 k + i % 2 at the 8
// positions: one 16-byte chunk of that channel's tile row, whose address lane 8 k + i gives.
// Loading (sm_90): a 16-byte load, then stmatrix.trans; storing (sm_80 and newer):
// ldmatrix.trans from those rows, then a 16-byte store.
__device__ __forceinline__ int cl_wide_channel(int lane) {
  return 8 * ((lane & 7) >> 1) + 2 * (lane >> 3) + (lane & 1);
}

template <int TP, bool kDstRows>
__device__ __forceinline__ void cl_load_wide(const uint16_t* __restrict__ src,
                                             const int64_t* pos_off, int tvalid, int C,
                                             uint16_t* tile, int s,
                                             const int32_t* __restrict__ dst_row) {
  const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
  const int ci = cl_wide_channel(lane);
  constexpr int TB = TP / 8;  // blocks of 8 positions
  const int nit = TB * (C / 32);
  for (int it = threadIdx.x >> 5; it < nit; it += kThreads / 32) {
    const int tb = it % TB, c0 = (it / TB) * 32;
    const int t = 8 * tb + gid;
    uint4 v = {0u, 0u, 0u, 0u};
    if (t < tvalid) v = *reinterpret_cast<const uint4*>(src + pos_off[t] + c0 + 8 * tig);
    const uint32_t r[4] = {v.x, v.y, v.z, v.w};
    const int c = c0 + ci;
    stmatrix_trans_x4(tile, mma_elem<TP>(kDstRows ? dst_row[c] : c, 8 * tb, s), r);
  }
}

template <int TP>
__device__ __forceinline__ void cl_store_wide(uint16_t* __restrict__ dst, const int64_t* pos_off,
                                              int tvalid, int C,
                                              const int32_t* __restrict__ src_row,
                                              const uint16_t* tile, int s) {
  const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
  const int ci = cl_wide_channel(lane);
  constexpr int TB = TP / 8;
  const int nit = TB * (C / 32);
  for (int it = threadIdx.x >> 5; it < nit; it += kThreads / 32) {
    const int tb = it % TB, j0 = (it / TB) * 32;
    const int j = j0 + ci;  // output channel; its row: src_row(j)
    uint32_t r[4];
    ldmatrix_trans<4>(r, tile, mma_elem<TP>(src_row ? src_row[j] : j, 8 * tb, s));
    const int t = 8 * tb + gid;
    if (t < tvalid)
      *reinterpret_cast<uint4*>(dst + pos_off[t] + j0 + 8 * tig) = uint4{r[0], r[1], r[2], r[3]};
  }
}

// tile(row row(c), t) = x[pos t, channel chan(c)] for c < C, t < tvalid; 0 for
// tvalid <= t < TP; chan(c) = src_chan ? src_chan[c] : c, row(c) = kDstRows ? dst_row[c] : c
// (the backward scatters dy through the last gather index).
// The vector paths are separate loops, chosen once per tile (no alignment test per vector).
template <int TP, bool kDstRows = false>
__device__ __forceinline__ void mma_load_tile_inline(
    const uint16_t* __restrict__ src, int64_t cs, const int64_t* pos_off, bool contig,
    bool cl_vec, int tvalid, int C, const int32_t* __restrict__ src_chan, uint16_t* tile, int s,
    const int32_t* __restrict__ dst_row = nullptr) {
  const int tid = threadIdx.x;
  if (contig && tvalid == TP && aligned16(src + pos_off[0]) && cs % 8 == 0) {
    // NCHW-like, aligned: a row of TP consecutive elements per channel, 16-byte vectors
    constexpr int NV = TP / 8;
    const uint16_t* base = src + pos_off[0];
    for (int it = tid; it < C * NV; it += kThreads) {
      const int c = it / NV, v = it - c * NV;
      const int64_t chan = src_chan ? src_chan[c] : c;
      *reinterpret_cast<uint4*>(tile + mma_elem<TP>(kDstRows ? dst_row[c] : c, v * 8, s)) =
          *reinterpret_cast<const uint4*>(base + chan * cs + v * 8);
    }
    return;
  }
  if (cl_vec && cs == 1 && src_chan == nullptr && C % 8 == 0) {
    if (C % 32 == 0 && mma_has_stmatrix())
      cl_load_wide<TP, kDstRows>(src, pos_off, tvalid, C, tile, s, dst_row);
    else if (C % 32 == 0)
      cl_load_blocks<TP, 4, kDstRows>(src, pos_off, tvalid, C, tile, s, dst_row);
    else
      cl_load_blocks<TP, 1, kDstRows>(src, pos_off, tvalid, C, tile, s, dst_row);
    return;
  }
  // any other layout (and tile tails): scalar, positions fastest
  for (int it = tid; it < C * TP; it += kThreads) {
    const int c = it / TP, t = it - c * TP;
    const int64_t chan = src_chan ? src_chan[c] : c;
    tile[mma_elem<TP>(kDstRows ? dst_row[c] : c, t, s)] =
        t < tvalid ? src[pos_off[t] + chan * cs] : uint16_t(0);
  }
}

// Not inlined: one copy per tile size serves the forward's call sites (the inline form is for
// kernels whose state across a call would spill: the tensor-core backward).
template <int TP>
__device__ __noinline__ void mma_load_tile(const uint16_t* __restrict__ src, int64_t cs,
                                           const int64_t* pos_off, bool contig, bool cl_vec,
                                           int tvalid, int C,
                                           const int32_t* __restrict__ src_chan, uint16_t* tile,
                                           int s) {
  mma_load_tile_inline<TP>(src, cs, pos_off, contig, cl_vec, tvalid, C, src_chan, tile, s);
}

// y[pos t, channel j] = tile(row src_row(j), t) for j < C, t < tvalid.
template <int TP>
__device__ __forceinline__ void mma_store_tile_inline(uint16_t* __restrict__ dst, int64_t cs,
                                                      const int64_t* pos_off, bool contig,
                                                      bool cl_vec, int tvalid, int C,
                                                      const int32_t* __restrict__ src_row,
                                                      const uint16_t* tile, int s) {
  const int tid = threadIdx.x;
  if (contig && tvalid == TP && aligned16(dst + pos_off[0]) && cs % 8 == 0) {
    constexpr int NV = TP / 8;
    uint16_t* base = dst + pos_off[0];
    for (int it = tid; it < C * NV; it += kThreads) {
      const int j = it / NV, v = it - j * NV;
      const int r = src_row ? src_row[j] : j;
      *reinterpret_cast<uint4*>(base + static_cast<int64_t>(j) * cs + v * 8) =
          *reinterpret_cast<const uint4*>(tile + mma_elem<TP>(r, v * 8, s));
    }
    return;
  }
  if (cl_vec && cs == 1 && C % 8 == 0) {
    if (C % 32 == 0)
      cl_store_wide<TP>(dst, pos_off, tvalid, C, src_row, tile, s);
    else
      cl_store_blocks<TP, 1>(dst, pos_off, tvalid, C, src_row, tile, s);
    return;
  }
  for (int it = tid; it < C * TP; it += kThreads) {
    const int j = it / TP, t = it - j * TP;
    if (t < tvalid)
      dst[pos_off[t] + static_cast<int64_t>(j) * cs] =
          tile[mma_elem<TP>(src_row ? src_row[j] : j, t, s)];
  }
}

template <int TP>
__device__ __noinline__ void mma_store_tile(uint16_t* __restrict__ dst, int64_t cs,
                                            const int64_t* pos_off, bool contig, bool cl_vec,
                                            int tvalid, int C,
                                            const int32_t* __restrict__ src_row,
                                            const uint16_t* tile, int s) {
  mma_store_tile_inline<TP>(dst, cs, pos_off, contig, cl_vec, tvalid, C, src_row, tile, s);
}

// ---------------------------------------------------------------------------------------------
// One layer on tensor cores
// ---------------------------------------------------------------------------------------------
// The results of one 8-output block of an item (acc[mt]: its MT fragments, outputs 8 b .. 8 b + 7
// of group g) stored transposed to `out`: D[position][output]: acc[mt] = (p, o), (p, o + 1),
// (p + 8, o), (p + 8, o + 1) with p = 16 mt + gid, o = 8 b + 2 tig: per 8 positions, an 8x8
// [position][output] matrix in the fragment layout, rounded to the storage dtype. Stored in
// natural output order (or output r in row out_rows[r]): an 8x8 block is output rows
// 8 b .. 8 b + 7 at 8 positions, one 16-byte chunk of each row.
template <class Fmt, int MT>
__device__ __forceinline__ void mma_store_block(const float (&acc)[MT][4], int g, int b,
                                                const LayerDesc& d, uint16_t* out, int s_out,
                                                uint16_t* zero,
                                                const int32_t* __restrict__ out_rows) {
  constexpr int TP = MT * 16;
  const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
  if (MT > 1 && mma_has_stmatrix()) {
    // sm_90: stmatrix.trans, four blocks per instruction; lane i addresses row i % 8 of block
    // i / 8 (the row start and its swizzle computed once). The rows of a partial block's
    // padding outputs (zero weights and bias, but NaN from a non-finite input) go to the
    // scratch row after the zero row. (A 16-position tile has two blocks: the x2 form counted
    // no fewer instructions in the SASS than the movmatrix path.)
    const int i = lane & 7, j = lane >> 3;
    const int r = g * d.m + 8 * b + i;
    int e = 0;
    uint16_t* base = zero + TP;
    if (8 * b + i < d.m) {
      e = mma_elem<TP>(out_rows ? out_rows[r] : r, 0, s_out);
      base = out;
    }
    const int sw = e & ((TP / 8 - 1) << 3);
    uint16_t* row = base + (e - sw);
#pragma unroll
    for (int q = 0; q < MT / 2; ++q) {  // blocks (mt, h) = (2 q + j / 2, j % 2): chunk 4 q + j
      const uint32_t v[4] = {mma_pack<Fmt>(acc[2 * q][0], acc[2 * q][1]),
                             mma_pack<Fmt>(acc[2 * q][2], acc[2 * q][3]),
                             mma_pack<Fmt>(acc[2 * q + 1][0], acc[2 * q + 1][1]),
                             mma_pack<Fmt>(acc[2 * q + 1][2], acc[2 * q + 1][3])};
      stmatrix_trans_x4(row, ((4 * q + j) << 3) ^ sw, v);
    }
  } else {
    // movmatrix transposes a block, and lane (gid, tig) then holds output 8 b + gid at
    // positions 2 tig, 2 tig + 1 of the 8: one 32-bit store into that output's row
    const int orow = 8 * b + gid;  // this lane's output (within the group) after the transpose
    const bool ok = orow < d.m;
    const int r = g * d.m + orow;
    const int e = mma_elem<TP>(out_rows ? (ok ? out_rows[r] : 0) : r, 0, s_out);
    const int sw = e & ((TP / 8 - 1) << 3);  // the row's swizzle, in elements
    uint16_t* row = out + (e - sw) + 2 * tig;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // positions p (h = 0) and p + 8 (h = 1): chunk 2 mt + h
        const uint32_t v = movmatrix_trans(mma_pack<Fmt>(acc[mt][2 * h], acc[mt][2 * h + 1]));
        if (ok) *reinterpret_cast<uint32_t*>(row + (((2 * mt + h) << 3) ^ sw)) = v;
      }
    }
  }
}

// out (shift s_out) = layer l of in (shift s_in), in natural output order (out_rows null) or
// output o in row out_rows[o] (the backward's scatter of dh through a gather index); in_rows:
// the rows of the layer's inputs in `in` (gather of the previous layer; null: identity).
// A work item is (group g, NB consecutive blocks of 8 outputs): NB = 2 shares the item's
// activation fragments, row look-ups and loop step between two blocks (tiles of 16 and 32
// positions, where a group's blocks pair up); the caller guarantees ml.nblk % NB == 0. With
// kGroups (k8, NB = 2), an item is two consecutive groups of one block each (ml.nblk == 1,
// d.groups even): one ldmatrix x4 loads both groups' activations, and they share the loop step
// and the set-up.
// (Descriptors by value: a reference into the kernel's parameters would copy them all to local
// memory.)
template <class Fmt, int MT, int K, int NB = 1, bool kGroups = false>
__device__ __forceinline__ void mma_layer_k(const LayerDesc d, const MmaLayer ml,
                                            const float* __restrict__ B,
                                            const uint2* __restrict__ frag, const uint16_t* in,
                                            int s_in, const int32_t* __restrict__ in_rows,
                                            uint16_t* out, int s_out, uint16_t* zero,
                                            const int32_t* __restrict__ out_rows) {
  constexpr int TP = MT * 16;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int tig = lane & 3;
  const int nsb = kGroups ? 1 : ml.nblk / NB;  // items per group (kGroups: per NB groups)
  const int items = kGroups ? d.groups / NB : d.groups * nsb;
  const float* bias = d.has_bias ? B + d.b_off : nullptr;
  // the ldmatrix piece this lane addresses: input k_lane of the k-step, positions +pos_lane
  const int mat = K == 16 ? lane >> 3 : (lane >> 3) & 1;
  const int k_lane = (K == 16 ? (mat >> 1) * 8 : 0) + (lane & 7);
  const int pos_lane = (mat & 1) * 8;
  constexpr int kWarps = kThreads / 32;
  // item = g * nsb + sb, stepped by kWarps without a division per item (kGroups: g counts
  // pairs of groups, sb stays 0)
  int g = warp / nsb, sb = warp - g * nsb;
  const int gstep = kWarps / nsb, sbstep = kWarps - gstep * nsb;
  for (int item = warp; item < items; item += kWarps) {
    const int g0 = kGroups ? g * NB : g;  // the item's first group
    const int b = kGroups ? 0 : sb * NB;  // and its first block
    // The accumulators start at the bias: a k8 item's one k-step takes it as its c operand
    // (no register copies); a k16 item sets them first.
    float binit[NB][4];
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
      const int gg = kGroups ? g0 + nb : g0, bb = kGroups ? b : b + nb;
      const int o = 8 * bb + 2 * tig;  // this lane's first output column in the group
      const float b0 = (bias && o < d.m) ? bias[gg * d.m + o] : 0.0f;
      const float b1 = (bias && o + 1 < d.m) ? bias[gg * d.m + o + 1] : 0.0f;
      binit[nb][0] = b0;
      binit[nb][1] = b1;
      binit[nb][2] = b0;
      binit[nb][3] = b1;
    }
    float acc[NB][MT][4];
    if constexpr (K == 16) {
#pragma unroll
      for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int q = 0; q < 4; ++q) acc[nb][mt][q] = binit[nb][q];
    }
    // k8 layers have one k-step: a compile-time trip count, straight-line code; k16 layers a
    // loop that is not unrolled (unrolling only duplicated the addresses). Fragments:
    // [group][block][k-step][lane], so block b + 1's follow block b's k-steps.
    const int ksteps = K == 8 ? 1 : ml.ksteps;
    const uint2* fp = frag + ml.f_off + (static_cast<int64_t>(item) * NB * ksteps) * 32 + lane;
#pragma unroll 1
    for (int ks = 0; ks < ksteps; ++ks) {
      uint32_t breg[NB][2];
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) {
        const uint2 bw = fp[(nb * ksteps + ks) * 32];
        breg[nb][0] = bw.x;
        breg[nb][1] = bw.y;
      }
      const int kk = ks * 16 + k_lane;
      // this lane's row; the padding lanes read the zero row. With kGroups (k8), lanes 16..31
      // address the second group's rows, so that one ldmatrix x4 loads both operands.
      const bool valid = kk < d.n;
      int row = 0;
      if (valid) {
        const int j = (g0 + (kGroups ? lane >> 4 : 0)) * d.n + kk;
        row = in_rows ? in_rows[j] : j;
      }
      // one ldmatrix for the whole warp per row block (.aligned: no lane may take another
      // instruction), shared by the item's products. With several row blocks, the row start
      // and its swizzle are computed once, then one chunk of 8 positions per block (for a
      // single block that counted more instructions in the SASS).
      constexpr int NM = (K == 16 || kGroups) ? 4 : 2;  // 8x8 matrices per ldmatrix
      if constexpr (MT == 1) {
        uint32_t a[4];
        ldmatrix_trans<NM>(a, valid ? in : zero,
                           valid ? mma_elem<TP>(row, pos_lane, s_in) : pos_lane);
#pragma unroll
        for (int nb = 0; nb < NB; ++nb)
          mma_sync<Fmt, K>(acc[nb][0], a + (kGroups ? 2 * nb : 0), breg[nb],
                           K == 8 ? binit[nb] : acc[nb][0]);
      } else {
        const int e = valid ? mma_elem<TP>(row, 0, s_in) : 0;
        const int sw = e & ((TP / 8 - 1) << 3);
        const uint16_t* rp = (valid ? in : zero) + (e - sw);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          uint32_t a[4];
          ldmatrix_trans<NM>(a, rp, (mt * 16 + pos_lane) ^ sw);
#pragma unroll
          for (int nb = 0; nb < NB; ++nb)
            mma_sync<Fmt, K>(acc[nb][mt], a + (kGroups ? 2 * nb : 0), breg[nb],
                             K == 8 ? binit[nb] : acc[nb][mt]);
        }
      }
    }
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
      mma_store_block<Fmt, MT>(acc[nb], kGroups ? g0 + nb : g0, kGroups ? b : b + nb, d, out,
                               s_out, zero, out_rows);
    sb += sbstep;
    g += gstep;
    if (sb >= nsb) {
      sb -= nsb;
      ++g;
    }
  }
}

// Tiles of 16 or 32 positions: NB = 2 where the group's blocks of 8 outputs pair up, else,
// for k8 groups of one block, items of two groups. (With 64 positions the pair items'
// accumulators took the forward to 97 registers, past the 85 of three CTAs per SM.)
template <class Fmt, int MT>
__device__ __forceinline__ void mma_layer(const LayerDesc d, const MmaLayer ml, const float* B,
                                       const uint2* frag, const uint16_t* in, int s_in,
                                       const int32_t* in_rows, uint16_t* out, int s_out,
                                       uint16_t* zero,
                                       const int32_t* out_rows = nullptr) {
  if (MT <= 2 && ml.nblk % 2 == 0) {
    if (ml.k8)
      mma_layer_k<Fmt, MT, 8, 2>(d, ml, B, frag, in, s_in, in_rows, out, s_out, zero, out_rows);
    else
      mma_layer_k<Fmt, MT, 16, 2>(d, ml, B, frag, in, s_in, in_rows, out, s_out, zero, out_rows);
  } else if (MT <= 2 && ml.k8 && ml.nblk == 1 && d.groups % 2 == 0) {
    mma_layer_k<Fmt, MT, 8, 2, true>(d, ml, B, frag, in, s_in, in_rows, out, s_out, zero,
                                     out_rows);
  } else if (ml.k8) {
    mma_layer_k<Fmt, MT, 8>(d, ml, B, frag, in, s_in, in_rows, out, s_out, zero, out_rows);
  } else {
    mma_layer_k<Fmt, MT, 16>(d, ml, B, frag, in, s_in, in_rows, out, s_out, zero, out_rows);
  }
}

// Shared memory of a tile of TP positions: two tiles of cmax rows, the zero row and the scratch
// row, two offset arrays.
inline size_t mma_forward_smem_bytes(int64_t cmax, int tp) {
  return static_cast<size_t>(2 * cmax + 2) * tp * sizeof(uint16_t) + 2 * tp * sizeof(int64_t);
}

// Launch bounds of two CTAs per SM (at most 128 registers, which the tile chooser assumes):
// without a minimum, ptxas kept the kernel near 40-48 registers and spilled around its calls
// once the layers had pair items.
template <class Fmt, int MT>
__global__ void __launch_bounds__(kThreads, 2)
    chain_forward_mma_kernel(const MmaParams mp, const TensorArg<const uint16_t> x,
                             const TensorArg<uint16_t> y, int64_t P) {
  constexpr int TP = MT * 16;
  IGC_DECLARE_SMEM(smem);
  const ChainParams<float>& p = mp.c;
  // two named tiles, not an array indexed at run time: the compiler then keeps every access
  // to them a shared-memory instruction (LDS / STS / LDSM, not generic LD / ST)
  uint16_t* const tile0 = reinterpret_cast<uint16_t*>(smem);
  uint16_t* const tile1 = tile0 + static_cast<int64_t>(p.cmax) * TP;
  uint16_t* zero = tile1 + static_cast<int64_t>(p.cmax) * TP;
  // zero + TP: the scratch row (mma_layer_k)
  int64_t* off_x = reinterpret_cast<int64_t*>(zero + 2 * TP);  // 4 TP bytes: 8-byte aligned
  int64_t* off_y = off_x + TP;
  for (int t = threadIdx.x; t < TP; t += kThreads) zero[t] = 0;
  // The tile loads' and stores' arguments (index, layouts, the last gather) are computed at
  // each call from the parameters, not kept live across the calls (sm_90, 64-position tile:
  // 77 registers, three CTAs per SM; hoisted out of the tile loop: 82, two CTAs. Before the
  // launch bounds, the sm_80 build spilled with them hoisted).
  const int64_t ntiles = (P + TP - 1) / TP;
  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const int64_t p0 = tile * TP;
    const int tvalid = static_cast<int>(min64(TP, P - p0));
    __syncthreads();  // the previous tile's store has read the tile and the offsets
    tile_offsets(x.ix, p0, tvalid, off_x);
    tile_offsets(y.ix, p0, tvalid, off_y);
    __syncthreads();
    mma_load_tile<TP>(x.ptr, x.cs, off_x, x.ix.run_is_contiguous(p0, tvalid),
                      rows_of_8_aligned(x), tvalid, p.c0,
                      p.has_index ? p.table + p.index_off : nullptr, tile0, mp.x_shift);
    __syncthreads();
    int s_cur = mp.x_shift;
    for (int l = 0; l < p.L; ++l) {
      const bool odd = (l & 1) != 0;
      mma_layer<Fmt, MT>(p.layer[l], mp.layer[l], p.B, mp.frag, odd ? tile1 : tile0, s_cur,
                         input_rows(p, l), odd ? tile0 : tile1, mp.layer[l].shift, zero);
      __syncthreads();
      s_cur = mp.layer[l].shift;
    }
    const LayerDesc& last = p.layer[p.L - 1];
    mma_store_tile<TP>(y.ptr, y.cs, off_y, y.ix.run_is_contiguous(p0, tvalid),
                       rows_of_8_aligned(y), tvalid, last.cout,
                       last.gather_identity ? nullptr : p.table + last.g_off,
                       (p.L & 1) ? tile1 : tile0, s_cur);
  }
}

// ---------------------------------------------------------------------------------------------
// Host: plan and launch
// ---------------------------------------------------------------------------------------------
struct MmaPlan {
  int mt = 0;  // tile of 16 * mt positions (0: does not fit)
  size_t smem = 0;
  int grid = 0;
  int64_t ntiles = 0;
};

// The tile: the largest (64, 32, 16 positions) that leaves room for two CTAs per SM, else the
// largest that fits one; halved (down to 16) while there are fewer tiles than SMs.
inline int mma_choose_mt(int64_t cmax, const DeviceInfo& dev, int64_t P) {
  const int tp = choose_tile([&](int t) { return mma_forward_smem_bytes(cmax, t); }, dev, P, 16,
                             2);
  return tp >= 64 ? 4 : tp / 16;
}

template <class Fmt, int MT>
inline cudaError_t mma_configure(size_t smem, int* occ) {
  return configure(chain_forward_mma_kernel<Fmt, MT>, smem, occ);
}

template <class Fmt>
inline cudaError_t plan_forward_mma(const MmaParams& mp, int64_t P, const DeviceInfo& dev,
                                    MmaPlan* plan) {
  plan->mt = mma_choose_mt(mp.c.cmax, dev, P);
  if (plan->mt == 0) return cudaSuccess;
  const int tp = 16 * plan->mt;
  plan->smem = mma_forward_smem_bytes(mp.c.cmax, tp);
  plan->ntiles = (P + tp - 1) / tp;
  int occ = 0;
  cudaError_t e = plan->mt == 4   ? mma_configure<Fmt, 4>(plan->smem, &occ)
                  : plan->mt == 2 ? mma_configure<Fmt, 2>(plan->smem, &occ)
                                  : mma_configure<Fmt, 1>(plan->smem, &occ);
  if (e != cudaSuccess) return e;
  if (occ < 1) occ = 1;
  plan->grid = static_cast<int>(min64(plan->ntiles, static_cast<int64_t>(dev.sm_count) * occ));
  return cudaSuccess;
}

// frag: mp.num_frag entries of device memory; mp.frag must point to it. Packs the weights, then
// runs the chain.
template <class Fmt>
inline cudaError_t launch_forward_mma(const MmaParams& mp, uint2* frag,
                                      const TensorArg<const uint16_t>& x,
                                      const TensorArg<uint16_t>& y, int64_t P,
                                      const MmaPlan& plan, cudaStream_t stream) {
  if (plan.mt != 1 && plan.mt != 2 && plan.mt != 4) return cudaErrorInvalidValue;
  if (plan.grid < 1 || mp.frag != frag || frag == nullptr) return cudaErrorInvalidValue;
  IGC_LAUNCH((pack_mma_weights_kernel<Fmt>), blocks_for(mp.num_frag, 1024), 0, stream, mp, frag);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  if (plan.mt == 4)
    IGC_LAUNCH((chain_forward_mma_kernel<Fmt, 4>), plan.grid, plan.smem, stream, mp, x, y, P);
  else if (plan.mt == 2)
    IGC_LAUNCH((chain_forward_mma_kernel<Fmt, 2>), plan.grid, plan.smem, stream, mp, x, y, P);
  else
    IGC_LAUNCH((chain_forward_mma_kernel<Fmt, 1>), plan.grid, plan.smem, stream, mp, x, y, P);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace igc
