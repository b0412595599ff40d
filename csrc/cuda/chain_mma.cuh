// Tensor-core forward of the chain for float16 / bfloat16 (sm_80 and newer): the group products
// as warp-level mma.sync, the permutations as the row addresses of the ldmatrix reads.
//
// Tile. A CTA takes TP = 16 * MT positions (MT in {1, 2, 4}) and keeps two [channel][TP] tiles of
// the storage dtype in shared memory (ping-pong, as high as the widest of C_0, C_2, ... and of C_1,
// C_3, ...; one tile with in-place layers, below), one row of zeros and one scratch row (where
// sm_90's stmatrix puts the padding outputs of a partial block of 8). Intermediates are rounded to
// the storage dtype between layers, as the unfused chain of the same dtype rounds each layer's
// output; products accumulate in fp32. Rows are TP elements long, in 16-byte chunks of 8 positions,
// swizzled within 128-byte lines (mma_elem) so that the 8 rows an ldmatrix phase reads (consecutive
// rows, or rows a power of two apart: a shuffle's) fall in different banks.
//
// Layer l (n inputs, m outputs per group). Work items are (group g, block of 8 outputs), or, with
// tiles of 16 and 32 positions (in place: any), two blocks of a group where they pair up (one
// ldmatrix then feeds two products; in place, groups of 25 to 32 take four); a warp takes an item
// and computes D[position][output] = H[position][k] W_g^T[k][output] for every 16-position row
// block of the tile with mma.sync m16n8k16 (n > 8: ceil(n / 16) k-steps) or m16n8k8 (n <= 8): A =
// the activations, B = the weights, D = fp32 accumulators initialised with the bias (kBiasBranch,
// the forward kernels but one and the backward's recompute: with zero, by a branch per item,
// where the layer has none; the backward's dh passes no bias: zero, and no bias code). Groups are
// never mixed in one product (a non-finite input cannot leak into another group's outputs);
// inputs beyond n read the zero row and weights beyond n / m are zero. A is loaded with
// ldmatrix.trans from the channel-major tile: lane i gives the address of one 8-position row
// piece of input k = kstep * 16 + (i / 16) * 8 + i % 8, and that row is gather_{l-1}[g * n + k]
// of the previous layer's output: a permutation costs nothing (the lane looks the row's swizzled
// start up in the row tables, built once per call). B comes from fragments packed once per call by
// mma_prepare_kernel (a 64-bit load per lane and k-step, reused by the MT row blocks). D is
// rounded and stored transposed to the other tile, in natural output order (in place: to the rows
// of the group's inputs): on sm_90 (tiles of 32 and 64 positions) four 8x8 blocks per
// stmatrix.trans, otherwise per 8x8 block a movmatrix and 32-bit stores. The store of y reads row
// gather_L[j] for output channel j (in place: the composed gathers' row).
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

#include <cstring>
#include <type_traits>

#include "chain_kernels.cuh"

namespace igc {
namespace cuda {

constexpr int kMmaMaxMt = 4;  // largest tile: 64 positions

// ---------------------------------------------------------------------------------------------
// Element formats of the tensor-core path (tiles hold raw 16-bit values)
// ---------------------------------------------------------------------------------------------
// kPlanes: bfloat16 planes per tile element (1: the tile holds the storage dtype itself);
// Storage: the tensors' element type.
struct MmaBf16 {
  static constexpr bool is_bf16 = true;
  static constexpr int kPlanes = 1;
  using Storage = uint16_t;
};
struct MmaF16 {
  static constexpr bool is_bf16 = false;
  static constexpr int kPlanes = 1;
  using Storage = uint16_t;
};
// float32 chains on bfloat16 tensor cores: every value v (activations, weights) is held as three
// bfloat16 planes, v = hi + mid + lo exactly (mma_split<3>), and a product W h as the six
// bfloat16 products whose sum of plane indices is at most 2 (hi hi, hi mid, mid hi, hi lo,
// mid mid, lo hi), accumulated in fp32. Intermediates stay fp32 values (the three planes hold
// the accumulator exactly); only the dropped products mid lo, lo mid, lo lo (at most about
// 2^-24 of |W_ok h_k| each), the order of the fp32 sums and non-finite results (mma_split)
// differ from an fp32 FMA chain. Opt-in (chain_cuda.cu: IGC_CUDA_FP32_MMA=1).
struct MmaF32x3 {
  static constexpr bool is_bf16 = true;
  static constexpr int kPlanes = 3;
  using Storage = float;
};
// The same with two planes, v ~ hi + lo (mma_split<2>: v to about 16 significant bits, a
// relative error of at most 2^-16), and three products (hi hi, hi lo, lo hi; the dropped lo lo
// is at most about 2^-16 of |W_ok h_k|): each product's operands as torch's "high" float32
// matmul precision allows (a float32 value as the sum of two bfloat16 values), so a product
// errs by at most about 3 * 2^-16 of |W_ok h_k|. Taken instead of MmaF32x3 only where the user
// allows TF32 for matmul (chain_cuda.cu).
struct MmaF32x2 {
  static constexpr bool is_bf16 = true;
  static constexpr int kPlanes = 2;
  using Storage = float;
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

// The value of 16-bit storage bits v16 (bf16: bfloat16, else float16).
__device__ __forceinline__ float mma_bits_to_float(uint32_t v16, bool bf16) {
#ifdef IGC_EMULATE
  return bf16 ? igc_emu::bf16_to_float(static_cast<uint16_t>(v16))
              : igc_emu::f16_to_float(static_cast<uint16_t>(v16));
#else
  if (bf16) return __uint_as_float(v16 << 16);
  return __half2float(__ushort_as_half(static_cast<unsigned short>(v16)));
#endif
}

// The float of bits v.
__host__ __device__ __forceinline__ float mma_as_float(uint32_t v) {
#if defined(IGC_EMULATE)
  return igc_emu::bits_to_float(v);
#elif defined(__CUDA_ARCH__)
  return __uint_as_float(v);
#else
  float f;
  std::memcpy(&f, &v, sizeof f);
  return f;
#endif
}
// The float in the low / high half of a pair of bfloat16 values.
__host__ __device__ __forceinline__ float mma_bf16_lo(uint32_t v) { return mma_as_float(v << 16); }
__host__ __device__ __forceinline__ float mma_bf16_hi(uint32_t v) {
  return mma_as_float(v & 0xffff0000u);
}

// The NP (2 or 3) bfloat16 planes of two floats x0 (low halves) and x1 (high halves): hi = x
// rounded to bfloat16, mid = (x - hi) rounded, lo = x - hi - mid (NP = 2: lo = (x - hi)
// rounded, and x - hi - lo is the split's error, at most max(2^-16 |x|, 2^-134)). Both
// differences are exact in fp32 and the last plane of three has at most 8 significant bits, so
// hi + mid + lo == x exactly for |x| >= 2^-110 (and (lo + mid) + hi gives it back in fp32,
// mma_join); below, lo's last bits lie under bfloat16's smallest subnormal (2^-133), an absolute
// error of at most 2^-134. Non-finite values (and |x| of at least 2^128 (1 - 2^-9), whose hi
// overflows) give non-finite planes, and the cross products then NaN (inf * a zero plane, or
// two opposite infinities): a chain whose input is infinite or whose result overflows gives NaN
// where the float32 chain gives +-inf.
template <int NP>
__host__ __device__ __forceinline__ void mma_split(float x0, float x1, uint32_t (&p)[NP]) {
  static_assert(NP == 2 || NP == 3, "two or three planes");
  p[0] = mma_pack<MmaBf16>(x0, x1);
  const float r0 = x0 - mma_bf16_lo(p[0]), r1 = x1 - mma_bf16_hi(p[0]);
  p[1] = mma_pack<MmaBf16>(r0, r1);
  if constexpr (NP == 3)
    p[2] = mma_pack<MmaBf16>(r0 - mma_bf16_lo(p[1]), r1 - mma_bf16_hi(p[1]));
}

// mma_split<planes> with the plane count known only at run time (2 or 3; the per-call weight
// packing): p[0 .. planes - 1], and p[2] = 0 with two.
__host__ __device__ __forceinline__ void mma_split_planes(int planes, float x0, float x1,
                                                          uint32_t (&p)[3]) {
  if (planes == 3) return mma_split<3>(x0, x1, p);
  uint32_t q[2];
  mma_split<2>(x0, x1, q);
  p[0] = q[0];
  p[1] = q[1];
  p[2] = 0u;
}

// The float that planes p (hi, mid, lo, or hi, lo) hold in their low (h = 0) or high (h = 1)
// halves, the smallest plane first (exact: the planes of one value span at most 24 bits).
template <int NP>
__host__ __device__ __forceinline__ float mma_join(const uint32_t (&p)[NP], int h) {
  static_assert(NP == 2 || NP == 3, "two or three planes");
  const auto half = [h](uint32_t v) { return h ? mma_bf16_hi(v) : mma_bf16_lo(v); };
  if constexpr (NP == 3) return (half(p[2]) + half(p[1])) + half(p[0]);
  else return half(p[1]) + half(p[0]);
}
// f[i] = the float of pair i / 2, half i % 2, of four words of planes q[k] (a lane's 8 values of
// a row chunk or of 4 ldmatrix fragments, every plane loaded).
template <int NP>
__host__ __device__ __forceinline__ void mma_join8(const uint32_t (&q)[NP][4], float (&f)[8]) {
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    uint32_t r[NP];
#pragma unroll
    for (int k = 0; k < NP; ++k) r[k] = q[k][i / 2];
    f[i] = mma_join<NP>(r, i % 2);
  }
}
// The same of planes p[0], p[ps], ... of a tile (16-bit elements ps apart), low halves.
template <int NP>
__host__ __device__ __forceinline__ float mma_join_elem(const uint16_t* p, int ps) {
  uint32_t q[NP];
#pragma unroll
  for (int k = 0; k < NP; ++k) q[k] = p[k * ps];
  return mma_join<NP>(q, 0);
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

// d = c + A B over the planes of the operands (plane k of A at a + k AS, of B at b + k BS): the
// product itself, or with three planes (MmaF32x3) the six plane products whose plane indices sum
// to at most 2, with two (MmaF32x2) the three whose indices sum to at most 1, largest first.
template <class Fmt, int K, int AS, int BS>
__device__ __forceinline__ void mma_sync_planes(float* d, const uint32_t* a, const uint32_t* b,
                                                const float* c) {
  mma_sync<Fmt, K>(d, a, b, c);
  if constexpr (Fmt::kPlanes == 2) {
    mma_sync<Fmt, K>(d, a, b + BS);
    mma_sync<Fmt, K>(d, a + AS, b);
  } else if constexpr (Fmt::kPlanes == 3) {
    mma_sync<Fmt, K>(d, a, b + BS);
    mma_sync<Fmt, K>(d, a + AS, b);
    mma_sync<Fmt, K>(d, a, b + 2 * BS);
    mma_sync<Fmt, K>(d, a + AS, b + BS);
    mma_sync<Fmt, K>(d, a + 2 * AS, b);
  }
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

// A 32-bit store to element `elem` of the shared array `base`, through a shared-window address:
// a plain store through the generic pointer made the compiler recompute the window's base
// (S2R SR_CgaCtaId, a variable-latency instruction) for every store of the movmatrix epilogue.
__device__ __forceinline__ void st_shared_b32(uint16_t* base, int elem, uint32_t v) {
#ifdef IGC_EMULATE
  *reinterpret_cast<uint32_t*>(base + elem) = v;
#elif defined(__CUDA_ARCH__)
  const unsigned a =
      static_cast<unsigned>(__cvta_generic_to_shared(base)) + 2u * static_cast<unsigned>(elem);
  asm volatile("st.shared.b32 [%0], %1;\n" : : "r"(a), "r"(v) : "memory");
#else
  (void)base;
  (void)elem;
  (void)v;
  __trap();
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
// Rows of a tile buffer for c channels: a multiple of 4, the most rows a line holds (mma_elem).
__host__ __device__ __forceinline__ int64_t mma_tile_rows(int64_t c) {
  return (c + 3) & ~int64_t(3);
}

struct MmaLayer {
  int nblk;      // blocks of 8 outputs per group: ceil(m / 8)
  int ksteps;    // k-steps per item: 1 (m16n8k8, n <= 8) or ceil(n / 16) (m16n8k16)
  int k8;        // n <= 8: one m16n8k8 step
  int64_t f_off; // first fragment (uint2 units) of this layer
  int64_t e_off; // the element table of this layer's input rows: its first entry
};

struct MmaParams {
  ChainParams<float> c;  // the chain; B: fp32 biases (mma_prepare_kernel); W: unused
  const uint2* frag;     // packed weight fragments: [layer][group][block][kstep][lane]
  int64_t num_frag;
  // the element tables (mma_prepare_kernel): layer l's input rows at elem + layer[l].e_off,
  // rows in natural order at elem_out
  const int32_t* elem;
  const int32_t* elem_out;
  int64_t tile_rows[2];  // the two-tile forward's tiles (mma_forward_smem_bytes)
  MmaLayer layer[kMaxLayers];
};

// The weights and biases as the per-call preparation reads them, in the chain's dtype (16-bit,
// or float32 for MmaF32x3): layer l's (C_{l+1} x n_l) weight, row-major (16-bit: its bits go
// into the fragments as they are; float32: split into three planes), and its bias (C_{l+1}
// values, null for none; converted to the fp32 the kernels add).
struct MmaWeights {
  const void* w[kMaxLayers];
  const void* b[kMaxLayers];
};

inline MmaParams make_mma_params(const HostChain& h, const float* B, const int32_t* table,
                                 const uint2* frag) {
  MmaParams mp;
  mp.c = make_params<float>(h, static_cast<const float*>(nullptr), B, table);
  mp.frag = frag;
  mp.elem = mp.elem_out = nullptr;
  int64_t off = 0, eo = 0;
  for (int l = 0; l < kMaxLayers; ++l) {
    MmaLayer& ml = mp.layer[l];
    if (l >= h.L) {
      ml = MmaLayer{0, 0, 0, off, eo};
      continue;
    }
    const LayerDesc& d = mp.c.layer[l];
    ml.nblk = (d.m + 7) / 8;
    ml.k8 = d.n <= 8 ? 1 : 0;
    ml.ksteps = ml.k8 ? 1 : (d.n + 15) / 16;
    ml.f_off = off;
    off += static_cast<int64_t>(d.groups) * ml.nblk * ml.ksteps * 32;
    ml.e_off = eo;
    eo += d.cin;
  }
  mp.num_frag = off;
  // the two-tile forward's tiles: the widest of C_0, C_2, ... and of C_1, C_3, ..., each
  // rounded up to a multiple of 4 rows (mma_tile_rows)
  int64_t r[2] = {h.C[0], 0};
  for (int l = 1; l <= h.L; ++l) r[l & 1] = h.C[l] > r[l & 1] ? h.C[l] : r[l & 1];
  mp.tile_rows[0] = mma_tile_rows(r[0]);
  mp.tile_rows[1] = mma_tile_rows(r[1]);
  return mp;
}

// Parity of the set bits of v (0 or 1).
__host__ __device__ __forceinline__ int mma_parity(unsigned v) {
#ifdef __CUDA_ARCH__
  return __popc(v) & 1;
#else
  return __builtin_popcount(v) & 1;
#endif
}

// Physical element of (row r, position t) in a tile of TP positions. A row is TP / 8 chunks of
// 8 positions (16 bytes); a 128-byte line (8 chunks: the 8 bank groups) holds 2^LOW rows, and
// chunk k of line q (k = (r mod 2^LOW) * TP / 8 + t / 8, q = r >> LOW) is stored at chunk
// k ^ h(q) of that line, h(q) the XOR of q's 3-bit digits. Rows whose numbers differ only in 3
// consecutive bits (8 consecutive rows, or 8 rows a power of two apart: a shuffle's stride)
// then lie in 8 different bank groups at every position, so ldmatrix, stmatrix and 16-byte
// vector accesses of such rows are free of bank conflicts. Rows move within their line: a tile
// buffer holds a multiple of 4 rows (mma_tile_rows). With c = t / 8 < TP / 8, mma_elem(r, t) =
// base + ((c << 3) ^ sw) + t % 8, where sw = mma_elem(r, 0) & ((TP / 8 - 1) << 3) and base =
// mma_elem(r, 0) - sw: the kernels compute a row's base and swizzle once and then address its
// chunks. As base has no bits under TP, that is (mma_elem(r, 0) ^ (c << 3)) + t % 8: one XOR per
// chunk from the row's element (the layer items and their epilogues address chunks so).
// kWrap (the forward with in-place layers): h is another linear map of the bits, where bit i of
// r moves a row's chunks by F[i] (a nonzero 3-bit vector; for the LOW bits below the line, the
// chunk offset itself), F found by an exhaustive search so that any three bits consecutive
// modulo nb, 5 <= nb <= 12, have independent F. Then also, in a tile of 2^nb rows, 8 rows whose
// numbers differ in 3 bits consecutive modulo nb lie in 8 different bank groups: the rows of a
// group's inputs after composed shuffles of power-of-two channel counts, which rotate the row
// numbers' bits (with the digit XOR, IGCV2(1024, 16)'s third in-place layer read and wrote
// rows differing in bits 0, 8 and 9 with 2-way bank conflicts). Bit k of h(q) is the parity of
// q & mask_k; it costs more instructions and registers than the digit XOR (the backward, at
// its register limit, spilled with it), so only the in-place forward, which needs it, uses it.
template <int TP, bool kWrap = false>
__host__ __device__ __forceinline__ int mma_elem(int r, int t) {
  constexpr int CPR = TP / 8;                             // 16-byte chunks per row
  constexpr int LOW = CPR >= 8 ? 0 : (CPR == 4 ? 1 : 2);  // rows per 128-byte line: 2^LOW
  int h;
  if constexpr (kWrap) {
    // F over r's bits from bit LOW on, one mask per bit of h: TP 64: F = 1 2 4 3 5 7 4 6 5 7 4
    // 6 1; TP 32: (4) 1 2 5 3 2 7 6 3 2 7 6 2; TP 16: (2 4) 1 3 5 1 7 3 5 1 7 3 1
    constexpr unsigned m0 = TP >= 64 ? 0x1339u : (TP == 32 ? 0x2adu : 0x7ffu);
    constexpr unsigned m1 = TP >= 64 ? 0xaaau : (TP == 32 ? 0xffau : 0x332u);
    constexpr unsigned m2 = TP >= 64 ? 0xff4u : (TP == 32 ? 0x664u : 0x154u);
    const unsigned q = static_cast<unsigned>(r) >> LOW;
    h = mma_parity(q & m0) | (mma_parity(q & m1) << 1) | (mma_parity(q & m2) << 2);
  } else {
    const int q = r >> LOW;
    h = (q ^ (q >> 3) ^ (q >> 6) ^ (q >> 9)) & 7;
  }
  return (((r * CPR + (t >> 3)) ^ h) << 3) + (t & 7);
}

// ---------------------------------------------------------------------------------------------
// Weight fragments
// ---------------------------------------------------------------------------------------------
// Entry e = (layer l, group g, block b, k-step s, lane i): the lane's B registers of that
// product: k16: {W[o][k], W[o][k+1]}, {W[o][k+8], W[o][k+9]} with o = g m + 8 b + i / 4 and
// k = 16 s + 2 (i % 4); k8: {W[o][k], W[o][k+1]}, 0 with k = 2 (i % 4). Zero beyond n and m (the
// bits of +0 in both formats). Transposed (the backward's dh = W^T du, chain_mma_backward.cuh):
// mp's layers describe W_l^T (n and m swapped), and W[o][k] reads the stored weight
// W_l[g m_l + k][o].
// f32_planes 2 or 3 (MmaF32x2, MmaF32x3): the weights are float32, and the fragment is the one
// of bfloat16 plane `plane` of mma_split<f32_planes> (0: hi, then mid and lo, or lo).
template <bool Transposed>
__device__ __forceinline__ uint2 mma_weight_fragment(const MmaParams& mp, const MmaWeights& w,
                                                     int64_t e, int f32_planes = 0,
                                                     int plane = 0) {
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
  const int64_t g0 = static_cast<int64_t>(g) * d.m * d.n;
  if (f32_planes) {
    const float* wg = static_cast<const float*>(w.w[l]) + g0;
    auto at = [&](int kk) -> float {
      if (o >= d.m || kk >= d.n) return 0.0f;
      return Transposed ? wg[kk * d.m + o] : wg[o * d.n + kk];
    };
    uint32_t x[3], y[3] = {0u, 0u, 0u};
    mma_split_planes(f32_planes, at(k), at(k + 1), x);
    if (!ml.k8) mma_split_planes(f32_planes, at(k + 8), at(k + 9), y);
    // (selected, not indexed at run time: that put the arrays in local memory)
    return plane == 0 ? uint2{x[0], y[0]} : plane == 1 ? uint2{x[1], y[1]} : uint2{x[2], y[2]};
  }
  const uint16_t* wg = static_cast<const uint16_t*>(w.w[l]) + g0;
  auto at = [&](int kk) -> uint32_t {
    if (o >= d.m || kk >= d.n) return 0u;
    return Transposed ? wg[kk * d.m + o] : wg[o * d.n + kk];
  };
  uint2 v;
  v.x = at(k) | (at(k + 1) << 16);
  v.y = ml.k8 ? 0u : (at(k + 8) | (at(k + 9) << 16));
  return v;
}

// ---------------------------------------------------------------------------------------------
// Tile movement (raw 16-bit values, swizzled rows)
// ---------------------------------------------------------------------------------------------
// Whether every position of a tensor starts a 16-byte aligned run of channels when its channel
// stride is 1: the base is aligned and every position stride is a multiple of 16 bytes (8
// 16-bit elements, 4 floats).
template <typename T>
__device__ __forceinline__ bool rows_aligned16(const TensorArg<T>& a) {
  return aligned16(a.ptr) && a.ix.strides_multiple_of(16 / sizeof(T));
}

// The warp steps of a channels-last tile move: f(tb, c0) for block tb of 8 positions and the
// CW channels from c0, the steps dealt to the warps in turn. The bound is the same for every
// lane of a warp (the movmatrix / ldmatrix / stmatrix inside are warp-collective).
template <int TP, int CW, class F>
__device__ __forceinline__ void cl_warp_steps(int C, F f) {
  constexpr int TB = TP / 8;  // blocks of 8 positions
  const int nit = TB * (C / CW);
  for (int it = threadIdx.x >> 5; it < nit; it += kThreads / 32) f(it % TB, (it / TB) * CW);
}

// Channels-last tiles, aligned, through 8x8 blocks (8 positions x 8 channels) and movmatrix.
// A warp takes NB blocks of the same 8 positions and neighbouring channels per iteration.
// Loading, lane (gid, tig) reads channels 2 tig, 2 tig + 1 of position gid of each block (the
// mma fragment layout of the [position][channel] block), movmatrix transposes it, and the lane
// writes positions 2 tig, 2 tig + 1 of channel gid into that channel's row: 32-bit accesses on
// both sides. Storing runs the same steps backwards.
template <int TP, int NB, bool kDstRows, bool kWrap = false>
__device__ __forceinline__ void cl_load_blocks(const uint16_t* __restrict__ src,
                                               const int64_t* pos_off, int tvalid, int C,
                                               uint16_t* tile,
                                               const int32_t* __restrict__ dst_row) {
  const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
  cl_warp_steps<TP, 8 * NB>(C, [&](int tb, int c0) {
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
          tile + mma_elem<TP, kWrap>(kDstRows ? dst_row[c] : c, 8 * tb + 2 * tig)) =
          movmatrix_trans(v[k]);
    }
  });
}

template <int TP, int NB, bool kWrap = false>
__device__ __forceinline__ void cl_store_blocks(uint16_t* __restrict__ dst,
                                                const int64_t* pos_off, int tvalid, int C,
                                                const int32_t* __restrict__ src_row,
                                                const uint16_t* tile) {
  const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
  cl_warp_steps<TP, 8 * NB>(C, [&](int tb, int j0) {
    const int t = 8 * tb + gid;
    uint32_t v[NB];
#pragma unroll
    for (int k = 0; k < NB; ++k) {
      const int j = j0 + 8 * k + gid;  // output channel; its row: src_row(j)
      v[k] = movmatrix_trans(*reinterpret_cast<const uint32_t*>(
          tile + mma_elem<TP, kWrap>(src_row ? src_row[j] : j, 8 * tb + 2 * tig)));
    }
    if (t < tvalid) {
      uint16_t* dp = dst + pos_off[t] + j0 + 2 * tig;
#pragma unroll
      for (int k = 0; k < NB; ++k) *reinterpret_cast<uint32_t*>(dp + 8 * k) = v[k];
    }
  });
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

template <int TP, bool kDstRows, bool kWrap = false>
__device__ __forceinline__ void cl_load_wide(const uint16_t* __restrict__ src,
                                             const int64_t* pos_off, int tvalid, int C,
                                             uint16_t* tile,
                                             const int32_t* __restrict__ dst_row) {
  const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
  const int ci = cl_wide_channel(lane);
  cl_warp_steps<TP, 32>(C, [&](int tb, int c0) {
    const int t = 8 * tb + gid;
    uint4 v = {0u, 0u, 0u, 0u};
    if (t < tvalid) v = *reinterpret_cast<const uint4*>(src + pos_off[t] + c0 + 8 * tig);
    const uint32_t r[4] = {v.x, v.y, v.z, v.w};
    const int c = c0 + ci;
    stmatrix_trans_x4(tile, mma_elem<TP, kWrap>(kDstRows ? dst_row[c] : c, 8 * tb), r);
  });
}

template <int TP, bool kWrap = false>
__device__ __forceinline__ void cl_store_wide(uint16_t* __restrict__ dst, const int64_t* pos_off,
                                              int tvalid, int C,
                                              const int32_t* __restrict__ src_row,
                                              const uint16_t* tile) {
  const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
  const int ci = cl_wide_channel(lane);
  cl_warp_steps<TP, 32>(C, [&](int tb, int j0) {
    const int j = j0 + ci;  // output channel; its row: src_row(j)
    uint32_t r[4];
    ldmatrix_trans<4>(r, tile, mma_elem<TP, kWrap>(src_row ? src_row[j] : j, 8 * tb));
    const int t = 8 * tb + gid;
    if (t < tvalid)
      *reinterpret_cast<uint4*>(dst + pos_off[t] + j0 + 8 * tig) = uint4{r[0], r[1], r[2], r[3]};
  });
}

// tile(row row(c), t) = x[pos t, channel chan(c)] for c < C, t < tvalid; 0 for
// tvalid <= t < TP; chan(c) = src_chan ? src_chan[c] : c, row(c) = kDstRows ? dst_row[c] : c
// (the backward scatters dy through the last gather index).
// The vector paths are separate loops, chosen once per tile (no alignment test per vector).
template <int TP, bool kDstRows = false, bool kWrap = false>
__device__ __forceinline__ void mma_load_tile_inline(
    const uint16_t* __restrict__ src, int64_t cs, const int64_t* pos_off, bool contig,
    bool cl_vec, int tvalid, int C, const int32_t* __restrict__ src_chan, uint16_t* tile,
    const int32_t* __restrict__ dst_row = nullptr) {
  const int tid = threadIdx.x;
  if (contig && tvalid == TP && aligned16(src + pos_off[0]) && cs % 8 == 0) {
    // NCHW-like, aligned: a row of TP consecutive elements per channel, 16-byte vectors. A
    // thread keeps one vector v of every row it moves (kThreads is a multiple of the NV vectors
    // of a row), so only the row changes from one iteration to the next: a warp still reads
    // whole rows.
    constexpr int NV = TP / 8;
    static_assert(kThreads % NV == 0, "a pass covers whole rows");
    const int v = tid % NV;
    const uint16_t* base = src + pos_off[0] + v * 8;
    if (src_chan == nullptr) {  // channel c: the source pointer steps by a pass's rows
      const int64_t step = static_cast<int64_t>(kThreads / NV) * cs;
      const uint16_t* sp = base + static_cast<int64_t>(tid / NV) * cs;
      for (int c = tid / NV; c < C; c += kThreads / NV, sp += step)
        *reinterpret_cast<uint4*>(tile + mma_elem<TP, kWrap>(kDstRows ? dst_row[c] : c, v * 8)) =
            *reinterpret_cast<const uint4*>(sp);
    } else {
      for (int c = tid / NV; c < C; c += kThreads / NV) {
        const int64_t chan = src_chan[c];
        *reinterpret_cast<uint4*>(tile + mma_elem<TP, kWrap>(kDstRows ? dst_row[c] : c, v * 8)) =
            *reinterpret_cast<const uint4*>(base + chan * cs);
      }
    }
    return;
  }
  if (cl_vec && cs == 1 && src_chan == nullptr && C % 8 == 0) {
    if (C % 32 == 0 && mma_has_stmatrix())
      cl_load_wide<TP, kDstRows, kWrap>(src, pos_off, tvalid, C, tile, dst_row);
    else if (C % 32 == 0)
      cl_load_blocks<TP, 4, kDstRows, kWrap>(src, pos_off, tvalid, C, tile, dst_row);
    else
      cl_load_blocks<TP, 1, kDstRows, kWrap>(src, pos_off, tvalid, C, tile, dst_row);
    return;
  }
  // any other layout (and tile tails): scalar, positions fastest
  for (int it = tid; it < C * TP; it += kThreads) {
    const int c = it / TP, t = it - c * TP;
    const int64_t chan = src_chan ? src_chan[c] : c;
    tile[mma_elem<TP, kWrap>(kDstRows ? dst_row[c] : c, t)] =
        t < tvalid ? src[pos_off[t] + chan * cs] : uint16_t(0);
  }
}

// Not inlined: one copy per tile size serves the forward's call sites (the inline form is for
// kernels whose state across a call would spill: the tensor-core backward).
template <int TP, bool kWrap = false>
__device__ __noinline__ void mma_load_tile(const uint16_t* __restrict__ src, int64_t cs,
                                           const int64_t* pos_off, bool contig, bool cl_vec,
                                           int tvalid, int C,
                                           const int32_t* __restrict__ src_chan,
                                           uint16_t* tile) {
  mma_load_tile_inline<TP, false, kWrap>(src, cs, pos_off, contig, cl_vec, tvalid, C, src_chan,
                                         tile);
}

// y[pos t, channel j] = tile(row src_row(j), t) for j < C, t < tvalid.
template <int TP, bool kWrap = false>
__device__ __forceinline__ void mma_store_tile_inline(uint16_t* __restrict__ dst, int64_t cs,
                                                      const int64_t* pos_off, bool contig,
                                                      bool cl_vec, int tvalid, int C,
                                                      const int32_t* __restrict__ src_row,
                                                      const uint16_t* tile) {
  const int tid = threadIdx.x;
  if (contig && tvalid == TP && aligned16(dst + pos_off[0]) && cs % 8 == 0) {
    constexpr int NV = TP / 8;  // (one vector v of every row per thread, as in the load)
    static_assert(kThreads % NV == 0, "a pass covers whole rows");
    const int v = tid % NV;
    const int64_t step = static_cast<int64_t>(kThreads / NV) * cs;
    uint16_t* dp = dst + pos_off[0] + v * 8 + static_cast<int64_t>(tid / NV) * cs;
    for (int j = tid / NV; j < C; j += kThreads / NV, dp += step) {
      const int r = src_row ? src_row[j] : j;
      *reinterpret_cast<uint4*>(dp) =
          *reinterpret_cast<const uint4*>(tile + mma_elem<TP, kWrap>(r, v * 8));
    }
    return;
  }
  if (cl_vec && cs == 1 && C % 8 == 0) {
    if (C % 32 == 0)
      cl_store_wide<TP, kWrap>(dst, pos_off, tvalid, C, src_row, tile);
    else
      cl_store_blocks<TP, 1, kWrap>(dst, pos_off, tvalid, C, src_row, tile);
    return;
  }
  for (int it = tid; it < C * TP; it += kThreads) {
    const int j = it / TP, t = it - j * TP;
    if (t < tvalid)
      dst[pos_off[t] + static_cast<int64_t>(j) * cs] =
          tile[mma_elem<TP, kWrap>(src_row ? src_row[j] : j, t)];
  }
}

template <int TP, bool kWrap = false>
__device__ __noinline__ void mma_store_tile(uint16_t* __restrict__ dst, int64_t cs,
                                            const int64_t* pos_off, bool contig, bool cl_vec,
                                            int tvalid, int C,
                                            const int32_t* __restrict__ src_row,
                                            const uint16_t* tile) {
  mma_store_tile_inline<TP, kWrap>(dst, cs, pos_off, contig, cl_vec, tvalid, C, src_row, tile);
}

// Whether every position of a float32 tensor with channel stride 1 starts 8-byte aligned (the
// channels-last float32 tile moves take channel pairs as float2).
template <typename T>
__device__ __forceinline__ bool pairs_aligned(const TensorArg<T>& a) {
  return (reinterpret_cast<uintptr_t>(a.ptr) & 7) == 0 && a.ix.strides_multiple_of(2);
}

// Channels-last float32 tiles (NP planes: MmaF32x3, MmaF32x2), C % 8 == 0, pairs aligned: 8x8
// blocks (8 positions x 8 channels) as in cl_load_blocks; lane (gid, tig) loads channels 2 tig,
// 2 tig + 1 of position gid as a float2, whose NP planes are its fragments of NP 8x8 bfloat16
// matrices, and movmatrix transposes each into positions 2 tig, 2 tig + 1 of channel gid's row
// of its plane. A warp reads 8 positions x 32 bytes.
template <int NP, int TP, bool kWrap = false, bool kDstRows = false>
__device__ __forceinline__ void cl_load_blocks_f32(const float* __restrict__ src,
                                                   const int64_t* pos_off, int tvalid, int C,
                                                   uint16_t* tile, int ps,
                                                   const int32_t* __restrict__ dst_row) {
  const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
  cl_warp_steps<TP, 8>(C, [&](int tb, int c0) {
    const int t = 8 * tb + gid;
    float2 v = {0.0f, 0.0f};
    if (t < tvalid) v = *reinterpret_cast<const float2*>(src + pos_off[t] + c0 + 2 * tig);
    uint32_t q[NP];
    mma_split<NP>(v.x, v.y, q);
    const int c = c0 + gid;
    uint16_t* dp = tile + mma_elem<TP, kWrap>(kDstRows ? dst_row[c] : c, 8 * tb + 2 * tig);
#pragma unroll
    for (int k = 0; k < NP; ++k) *reinterpret_cast<uint32_t*>(dp + k * ps) = movmatrix_trans(q[k]);
  });
}

// The store's blocks: each plane's 32-bit piece of output row src_row(j) (j = j0 + gid,
// positions 2 tig, 2 tig + 1) transposed back by movmatrix, the planes added (mma_join) and
// stored as a float2 (position gid, channels j0 + 2 tig, + 1).
template <int NP, int TP, bool kWrap = false>
__device__ __forceinline__ void cl_store_blocks_f32(float* __restrict__ dst,
                                                    const int64_t* pos_off, int tvalid, int C,
                                                    const int32_t* __restrict__ src_row,
                                                    const uint16_t* tile, int ps) {
  const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
  cl_warp_steps<TP, 8>(C, [&](int tb, int j0) {
    const int j = j0 + gid;
    const uint16_t* sp = tile + mma_elem<TP, kWrap>(src_row ? src_row[j] : j, 8 * tb + 2 * tig);
    uint32_t q[NP];
#pragma unroll
    for (int k = 0; k < NP; ++k)
      q[k] = movmatrix_trans(*reinterpret_cast<const uint32_t*>(sp + k * ps));
    const int t = 8 * tb + gid;
    if (t < tvalid)
      *reinterpret_cast<float2*>(dst + pos_off[t] + j0 + 2 * tig) =
          float2{mma_join<NP>(q, 0), mma_join<NP>(q, 1)};
  });
}

// Channels-last float32 tiles, C % 32 == 0, positions 16-byte aligned: 8 positions x 32
// channels per warp step, as cl_load_wide / cl_store_wide. Lane (gid, tig) moves channels
// 8 tig .. 8 tig + 7 of position gid (two 16-byte accesses); its four pairs are its fragments
// of four 8x8 matrices, in each plane, so one stmatrix.trans per plane writes them (the load,
// sm_90) and one ldmatrix.trans per plane reads them (the store).
template <int NP, int TP, bool kWrap = false, bool kDstRows = false>
__device__ __forceinline__ void cl_load_wide_f32(const float* __restrict__ src,
                                                 const int64_t* pos_off, int tvalid, int C,
                                                 uint16_t* tile, int ps,
                                                 const int32_t* __restrict__ dst_row) {
  const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
  const int ci = cl_wide_channel(lane);
  cl_warp_steps<TP, 32>(C, [&](int tb, int c0) {
    const int t = 8 * tb + gid;
    uint4 a = {0u, 0u, 0u, 0u}, b = {0u, 0u, 0u, 0u};
    if (t < tvalid) {
      const float* sp = src + pos_off[t] + c0 + 8 * tig;
      a = ldg16(sp);
      b = ldg16(sp + 4);
    }
    uint32_t q[4][NP];
    mma_split<NP>(mma_as_float(a.x), mma_as_float(a.y), q[0]);
    mma_split<NP>(mma_as_float(a.z), mma_as_float(a.w), q[1]);
    mma_split<NP>(mma_as_float(b.x), mma_as_float(b.y), q[2]);
    mma_split<NP>(mma_as_float(b.z), mma_as_float(b.w), q[3]);
    const int c = c0 + ci;
    const int e = mma_elem<TP, kWrap>(kDstRows ? dst_row[c] : c, 8 * tb);
#pragma unroll
    for (int k = 0; k < NP; ++k) {
      const uint32_t r[4] = {q[0][k], q[1][k], q[2][k], q[3][k]};
      stmatrix_trans_x4(tile + k * ps, e, r);
    }
  });
}

template <int NP, int TP, bool kWrap = false>
__device__ __forceinline__ void cl_store_wide_f32(float* __restrict__ dst,
                                                  const int64_t* pos_off, int tvalid, int C,
                                                  const int32_t* __restrict__ src_row,
                                                  const uint16_t* tile, int ps) {
  const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
  const int ci = cl_wide_channel(lane);
  cl_warp_steps<TP, 32>(C, [&](int tb, int j0) {
    const int j = j0 + ci;  // output channel; its row: src_row(j)
    const int e = mma_elem<TP, kWrap>(src_row ? src_row[j] : j, 8 * tb);
    uint32_t r[NP][4];
#pragma unroll
    for (int k = 0; k < NP; ++k) ldmatrix_trans<4>(r[k], tile + k * ps, e);
    float f[8];
    mma_join8<NP>(r, f);
    const int t = 8 * tb + gid;
    if (t < tvalid) {
      float* dp = dst + pos_off[t] + j0 + 8 * tig;
      reinterpret_cast<float4*>(dp)[0] = float4{f[0], f[1], f[2], f[3]};
      reinterpret_cast<float4*>(dp)[1] = float4{f[4], f[5], f[6], f[7]};
    }
  });
}

// float32 tiles as NP bfloat16 planes (MmaF32x3, MmaF32x2), plane k ps elements after plane 0.
// tile(row row(c), t) = the planes of x[pos t, channel chan(c)] for c < C, t < tvalid; 0 for
// tvalid <= t < TP; chan(c) = src_chan ? src_chan[c] : c, row(c) = kDstRows ? dst_row[c] : c
// (the backward's dy, as mma_load_tile_inline). NCHW-like aligned rows: per thread
// one chunk of 8 positions of a row (two 16-byte loads, NP 16-byte stores); channels-last
// (cl_vec: pairs aligned; C % 8 == 0, no input index): with C % 32 == 0 and 16-byte aligned
// positions 8 x 32 steps through stmatrix (the load: sm_90) or ldmatrix (the store,
// cl_load_wide_f32 / cl_store_wide_f32), else 8x8 blocks through movmatrix
// (cl_load_blocks_f32 / cl_store_blocks_f32); otherwise element by element, channels fastest
// where the channel stride is 1, else positions fastest.
template <int NP, int TP, bool kWrap = false, bool kDstRows = false>
__device__ __forceinline__ void mma_load_tile_f32_inline(
    const float* __restrict__ src, int64_t cs, const int64_t* pos_off, bool contig, bool cl_vec,
    bool rows_aligned, int tvalid, int C, const int32_t* __restrict__ src_chan, uint16_t* tile,
    int ps, const int32_t* __restrict__ dst_row = nullptr) {
  IGC_ASSUME_SHARED(tile);
  const int tid = threadIdx.x;
  if (contig && tvalid == TP && aligned16(src + pos_off[0]) && cs % 4 == 0) {
    constexpr int NV = TP / 8;
    static_assert(kThreads % NV == 0, "a pass covers whole rows");
    const int v = tid % NV;
    const float* base = src + pos_off[0] + v * 8;
    for (int c = tid / NV; c < C; c += kThreads / NV) {
      const float* sp = base + (src_chan ? static_cast<int64_t>(src_chan[c]) : c) * cs;
      const uint4 a = ldg16(sp), b = ldg16(sp + 4);
      const float f[8] = {mma_as_float(a.x), mma_as_float(a.y), mma_as_float(a.z),
                          mma_as_float(a.w), mma_as_float(b.x), mma_as_float(b.y),
                          mma_as_float(b.z), mma_as_float(b.w)};
      uint32_t q[4][NP];
#pragma unroll
      for (int i = 0; i < 4; ++i) mma_split<NP>(f[2 * i], f[2 * i + 1], q[i]);
      uint16_t* dp = tile + mma_elem<TP, kWrap>(kDstRows ? dst_row[c] : c, v * 8);
#pragma unroll
      for (int k = 0; k < NP; ++k)
        *reinterpret_cast<uint4*>(dp + k * ps) = uint4{q[0][k], q[1][k], q[2][k], q[3][k]};
    }
    return;
  }
  if (cl_vec && cs == 1 && src_chan == nullptr && C % 8 == 0) {
    if (C % 32 == 0 && mma_has_stmatrix() && rows_aligned)
      cl_load_wide_f32<NP, TP, kWrap, kDstRows>(src, pos_off, tvalid, C, tile, ps, dst_row);
    else
      cl_load_blocks_f32<NP, TP, kWrap, kDstRows>(src, pos_off, tvalid, C, tile, ps, dst_row);
    return;
  }
  const bool cfast = cs == 1;
  for (int it = tid; it < C * TP; it += kThreads) {
    const int c = cfast ? it % C : it / TP, t = cfast ? it / C : it - c * TP;
    const int64_t chan = src_chan ? src_chan[c] : c;
    uint32_t q[NP];
    mma_split<NP>(t < tvalid ? src[pos_off[t] + chan * cs] : 0.0f, 0.0f, q);
    uint16_t* dp = tile + mma_elem<TP, kWrap>(kDstRows ? dst_row[c] : c, t);
#pragma unroll
    for (int k = 0; k < NP; ++k) dp[k * ps] = static_cast<uint16_t>(q[k]);
  }
}

// Not inlined: one copy per tile size serves the forward's call sites (the inline form is for
// the tensor-core backward, as mma_load_tile).
template <int NP, int TP, bool kWrap = false>
__device__ __noinline__ void mma_load_tile_f32(const float* __restrict__ src, int64_t cs,
                                               const int64_t* pos_off, bool contig,
                                               bool cl_vec, bool rows_aligned, int tvalid,
                                               int C, const int32_t* __restrict__ src_chan,
                                               uint16_t* tile, int ps) {
  mma_load_tile_f32_inline<NP, TP, kWrap>(src, cs, pos_off, contig, cl_vec, rows_aligned, tvalid,
                                          C, src_chan, tile, ps);
}

// y[pos t, channel j] = the float tile(row src_row(j), t) holds in its planes (mma_join), for
// j < C, t < tvalid; the paths as in the load.
template <int NP, int TP, bool kWrap = false>
__device__ __forceinline__ void mma_store_tile_f32_inline(
    float* __restrict__ dst, int64_t cs, const int64_t* pos_off, bool contig, bool cl_vec,
    bool rows_aligned, int tvalid, int C, const int32_t* __restrict__ src_row,
    const uint16_t* tile, int ps) {
  IGC_ASSUME_SHARED(tile);
  const int tid = threadIdx.x;
  if (contig && tvalid == TP && aligned16(dst + pos_off[0]) && cs % 4 == 0) {
    constexpr int NV = TP / 8;
    static_assert(kThreads % NV == 0, "a pass covers whole rows");
    const int v = tid % NV;
    const int64_t step = static_cast<int64_t>(kThreads / NV) * cs;
    float* dp = dst + pos_off[0] + v * 8 + static_cast<int64_t>(tid / NV) * cs;
    for (int j = tid / NV; j < C; j += kThreads / NV, dp += step) {
      const uint16_t* sp = tile + mma_elem<TP, kWrap>(src_row ? src_row[j] : j, v * 8);
      uint32_t q[NP][4];
#pragma unroll
      for (int k = 0; k < NP; ++k) {
        const uint4 w = *reinterpret_cast<const uint4*>(sp + k * ps);
        q[k][0] = w.x;
        q[k][1] = w.y;
        q[k][2] = w.z;
        q[k][3] = w.w;
      }
      float f[8];
      mma_join8<NP>(q, f);
      reinterpret_cast<float4*>(dp)[0] = float4{f[0], f[1], f[2], f[3]};
      reinterpret_cast<float4*>(dp)[1] = float4{f[4], f[5], f[6], f[7]};
    }
    return;
  }
  if (cl_vec && cs == 1 && C % 8 == 0) {
    if (C % 32 == 0 && rows_aligned)
      cl_store_wide_f32<NP, TP, kWrap>(dst, pos_off, tvalid, C, src_row, tile, ps);
    else
      cl_store_blocks_f32<NP, TP, kWrap>(dst, pos_off, tvalid, C, src_row, tile, ps);
    return;
  }
  const bool cfast = cs == 1;
  for (int it = tid; it < C * TP; it += kThreads) {
    const int j = cfast ? it % C : it / TP, t = cfast ? it / C : it - j * TP;
    if (t >= tvalid) continue;
    const uint16_t* sp = tile + mma_elem<TP, kWrap>(src_row ? src_row[j] : j, t);
    dst[pos_off[t] + static_cast<int64_t>(j) * cs] = mma_join_elem<NP>(sp, ps);
  }
}

template <int NP, int TP, bool kWrap = false>
__device__ __noinline__ void mma_store_tile_f32(float* __restrict__ dst, int64_t cs,
                                                const int64_t* pos_off, bool contig,
                                                bool cl_vec, bool rows_aligned, int tvalid,
                                                int C, const int32_t* __restrict__ src_row,
                                                const uint16_t* tile, int ps) {
  mma_store_tile_f32_inline<NP, TP, kWrap>(dst, cs, pos_off, contig, cl_vec, rows_aligned,
                                           tvalid, C, src_row, tile, ps);
}

// ---------------------------------------------------------------------------------------------
// One layer on tensor cores
// ---------------------------------------------------------------------------------------------
// The results of one 8-output block of an item (acc[mt]: its MT fragments, outputs 8 b .. 8 b + 7
// of group g) stored transposed to `out`: D[position][output]: acc[mt] = (p, o), (p, o + 1),
// (p + 8, o), (p + 8, o + 1) with p = 16 mt + gid, o = 8 b + 2 tig: per 8 positions, an 8x8
// [position][output] matrix in the fragment layout, rounded to the storage dtype. Stored in
// the rows out_elem gives (output r of the layer: the element mma_elem(row, 0) of its row): an
// 8x8 block is output rows 8 b .. 8 b + 7 at 8 positions, one 16-byte chunk of each row.
// MmaF32x3 / MmaF32x2: every value as its three / two planes (mma_split), plane k at the same
// element of the buffer ps elements further on.
template <class Fmt, int MT>
__device__ __forceinline__ void mma_store_block(const float (&acc)[MT][4], int g, int b,
                                                const LayerDesc& d, uint16_t* out,
                                                uint16_t* zero,
                                                const int32_t* __restrict__ out_elem,
                                                int ps = 0) {
  constexpr int NP = Fmt::kPlanes;
  // this lane's pair (acc[mt][2 h], acc[mt][2 h + 1]) in plane k
  const auto pack = [&](int mt, int h, uint32_t (&v)[NP]) {
    if constexpr (NP == 1) {
      v[0] = mma_pack<Fmt>(acc[mt][2 * h], acc[mt][2 * h + 1]);
    } else {
      mma_split<NP>(acc[mt][2 * h], acc[mt][2 * h + 1], v);
    }
  };
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
      e = out_elem[r];
      base = out;
    }
#pragma unroll
    for (int q = 0; q < MT / 2; ++q) {  // blocks (mt, h) = (2 q + j / 2, j % 2): chunk 4 q + j
      uint32_t v[4][NP];
      pack(2 * q, 0, v[0]);
      pack(2 * q, 1, v[1]);
      pack(2 * q + 1, 0, v[2]);
      pack(2 * q + 1, 1, v[3]);
#pragma unroll
      for (int k = 0; k < NP; ++k) {
        const uint32_t vk[4] = {v[0][k], v[1][k], v[2][k], v[3][k]};
        stmatrix_trans_x4(base + k * ps, e ^ ((4 * q + j) << 3), vk);  // (mma_elem)
      }
    }
  } else {
    // movmatrix transposes a block, and lane (gid, tig) then holds output 8 b + gid at
    // positions 2 tig, 2 tig + 1 of the 8: one 32-bit store into that output's row
    const int orow = 8 * b + gid;  // this lane's output (within the group) after the transpose
    const bool ok = orow < d.m;
    const int r = g * d.m + orow;
    const int e = ok ? out_elem[r] : 0;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // positions p (h = 0) and p + 8 (h = 1): chunk 2 mt + h
        uint32_t v[NP];
        pack(mt, h, v);
#pragma unroll
        for (int k = 0; k < NP; ++k) {
          const uint32_t t = movmatrix_trans(v[k]);
          if (ok) st_shared_b32(out, k * ps + 2 * tig + (e ^ ((2 * mt + h) << 3)), t);
        }
      }
    }
  }
}

// out = layer l of in. in_elem[j]: the row of the layer's input j in `in` (the previous layer's
// gather), out_elem[o]: the row of its output o in `out` (natural order; with in-place layers
// the input rows; the backward's dh: the layer's input rows), each as the element
// mma_elem(row, 0) from the row tables (mma_prepare_kernel): an item looks its addresses up
// instead of computing the swizzle.
// A work item is (group g, NB consecutive blocks of 8 outputs): NB = 2 shares the item's
// activation fragments, row look-ups and loop step between two blocks (tiles of 16 and 32
// positions, where a group's blocks pair up); the caller guarantees ml.nblk % NB == 0. With
// kGroups (k8, NB = 2), an item is two consecutive groups of one block each (ml.nblk == 1,
// d.groups even): one ldmatrix x4 loads both groups' activations, and they share the loop step
// and the set-up.
// (Descriptors by value: a reference into the kernel's parameters would copy them all to local
// memory.)
// MmaF32x3: the tiles' planes lie ps elements apart, the fragments' planes fps entries apart;
// a k-step loads all three of A and of B and issues the six products.
// kBiasBranch: the item's first k-step in two copies, with the bias as the products' c or from
// zero (a layer without bias then loads none and copies no zeros into the c registers), chosen
// per item; without it, one copy takes the bias, or zeros where there is none.
template <class Fmt, int MT, int K, int NB = 1, bool kGroups = false, bool kBiasBranch = false>
__device__ __forceinline__ void mma_layer_k(const LayerDesc d, const MmaLayer ml,
                                            const float* __restrict__ B,
                                            const uint2* __restrict__ frag, const uint16_t* in,
                                            const int32_t* __restrict__ in_elem,
                                            uint16_t* out, uint16_t* zero,
                                            const int32_t* __restrict__ out_elem, int ps = 0,
                                            int64_t fps = 0) {
  constexpr int NP = Fmt::kPlanes;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int tig = lane & 3;
  const int nsb = kGroups ? 1 : ml.nblk / NB;  // items per group (kGroups: per NB groups)
  const int items = kGroups ? d.groups / NB : d.groups * nsb;
  // (B is null for the backward's transposed products: then the bias code folds away)
  const float* bias = (B != nullptr && d.has_bias) ? B + d.b_off : nullptr;
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
    float acc[NB][MT][4];
    // Fragments: [group][block][k-step][lane], so block b + 1's follow block b's k-steps.
    const int ksteps = K == 8 ? 1 : ml.ksteps;
    const uint2* fp = frag + ml.f_off + (static_cast<int64_t>(item) * NB * ksteps) * 32 + lane;
    // One k-step. The first (kind 1 or 2) starts the accumulators: its products take the bias
    // as their c operand (kind 1: no copies into the accumulators), or zero (kind 2, a layer
    // without bias: no bias loads, and no register copies of zeros); k8 layers have only that
    // one: straight-line code. The other k-steps (kind 0) of k16 layers are a loop that is not
    // unrolled (unrolling only duplicated the addresses).
    const auto kstep = [&](int ks, auto kind) {
      constexpr int kKind = decltype(kind)::value;
      float binit[NB][4] = {};
      if constexpr (kKind == 1) {
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
      }
      uint32_t breg[NB][NP][2];
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
        for (int k = 0; k < NP; ++k) {
          const uint2 bw = fp[(nb * ksteps + ks) * 32 + k * fps];
          breg[nb][k][0] = bw.x;
          breg[nb][k][1] = bw.y;
        }
      }
      const int kk = ks * 16 + k_lane;
      // this lane's row; the padding lanes read the zero row. With kGroups (k8), lanes 16..31
      // address the second group's rows, so that one ldmatrix x4 loads both operands.
      const bool valid = kk < d.n;
      int e = 0;  // the row's element mma_elem(row, 0)
      if (valid) e = in_elem[(g0 + (kGroups ? lane >> 4 : 0)) * d.n + kk];
      // one ldmatrix for the whole warp per row block (.aligned: no lane may take another
      // instruction), shared by the item's products: one chunk of 8 positions per block, at
      // element e ^ (its first position) (mma_elem).
      constexpr int NM = (K == 16 || kGroups) ? 4 : 2;  // 8x8 matrices per ldmatrix
      const uint16_t* rp = valid ? in : zero;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        uint32_t a[NP][4];
#pragma unroll
        for (int k = 0; k < NP; ++k)
          ldmatrix_trans<NM>(a[k], rp + k * ps, e ^ (mt * 16 + pos_lane));
        const int ao = kGroups ? 2 : 0;  // the second group's operand (kGroups)
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) {
          mma_sync_planes<Fmt, K, 4, 2>(acc[nb][mt], a[0] + ao * nb, breg[nb][0],
                                        kKind != 0 ? binit[nb] : acc[nb][mt]);
        }
      }
    };
    if (kBiasBranch && !bias)
      kstep(0, std::integral_constant<int, 2>{});
    else
      kstep(0, std::integral_constant<int, 1>{});
#pragma unroll 1
    for (int ks = 1; ks < ksteps; ++ks) kstep(ks, std::integral_constant<int, 0>{});
#pragma unroll
    for (int nb = 0; nb < NB; ++nb)
      mma_store_block<Fmt, MT>(acc[nb], kGroups ? g0 + nb : g0, kGroups ? b : b + nb, d, out,
                               zero, out_elem, ps);
    sb += sbstep;
    g += gstep;
    if (sb >= nsb) {
      sb -= nsb;
      ++g;
    }
  }
}

// Tiles of 16 or 32 positions: NB = 2 where the group's blocks of 8 outputs pair up, else,
// for k8 groups of one block, items of two groups. kWhole (the in-place forward, whose items
// must cover whole groups): pair items with 64 positions too (their accumulators take that
// kernel to 94 registers, past the 85 of three CTAs per SM, which is why the two-tile kernels
// do without), and items of four blocks for groups of 25 to 32 outputs with 16 or 32.
template <class Fmt, int MT, bool kWhole = false, bool kBiasBranch = false>
__device__ __forceinline__ void mma_layer(const LayerDesc d, const MmaLayer ml, const float* B,
                                       const uint2* frag, const uint16_t* in,
                                       const int32_t* in_elem, uint16_t* out, uint16_t* zero,
                                       const int32_t* out_elem, int ps = 0, int64_t fps = 0) {
  const auto run = [&](auto k, auto nb, auto groups) {
    mma_layer_k<Fmt, MT, decltype(k)::value, decltype(nb)::value, decltype(groups)::value,
                kBiasBranch>(d, ml, B, frag, in, in_elem, out, zero, out_elem, ps, fps);
  };
  using K8 = std::integral_constant<int, 8>;
  using K16 = std::integral_constant<int, 16>;
  using One = std::integral_constant<int, 1>;
  using Two = std::integral_constant<int, 2>;
  using Four = std::integral_constant<int, 4>;
  using OneGroup = std::false_type;  // (kGroups: items of two groups)
  if (kWhole && MT <= 2 && ml.nblk == 4 && !ml.k8) {
    run(K16{}, Four{}, OneGroup{});
  } else if ((MT <= 2 || kWhole) && ml.nblk % 2 == 0) {
    if (ml.k8)
      run(K8{}, Two{}, OneGroup{});
    else
      run(K16{}, Two{}, OneGroup{});
  } else if (MT <= 2 && ml.k8 && ml.nblk == 1 && d.groups % 2 == 0) {
    run(K8{}, Two{}, std::true_type{});
  } else if (ml.k8) {
    run(K8{}, One{}, OneGroup{});
  } else {
    run(K16{}, One{}, OneGroup{});
  }
}

// Shared memory of a tile of TP positions: the two tiles (mp.tile_rows: the first holds x and
// the inputs of layers 2, 4, ..., the second those of layers 1, 3, ..., so that an expanding or
// reducing layer takes two tiles of different heights, not two of the widest; with in-place
// layers one tile of the widest), the zero row and the scratch row, two offset arrays.
// MmaF32x3 (planes = 3): the tiles, zero and scratch rows three times, one bfloat16 plane after
// the other (mma_plane_elems apart).
inline size_t mma_forward_smem_bytes(const MmaParams& mp, int tp, bool in_place = false,
                                     int planes = 1) {
  const int64_t rows =
      in_place ? mma_tile_rows(mp.c.cmax) : mp.tile_rows[0] + mp.tile_rows[1];
  return static_cast<size_t>(planes) * (rows + 2) * tp * sizeof(uint16_t) +
         2 * tp * sizeof(int64_t);
}

// Elements of one plane of the forward's shared memory: its tiles, zero row and scratch row.
__host__ __device__ __forceinline__ int mma_plane_elems(const MmaParams& mp, int tp,
                                                        bool in_place) {
  const int64_t rows =
      in_place ? mma_tile_rows(mp.c.cmax) : mp.tile_rows[0] + mp.tile_rows[1];
  return static_cast<int>((rows + 2) * tp);
}

// In-place layers: one tile instead of two. Layer l writes output o of group g into the row it
// read input o of that group from, so the rows of a layer's output are those of its input:
// the input of layer l sits in rows R_l = gather_0 o gather_1 o ... o gather_{l-1} (R_0 the
// identity; input j of layer l in row R_l[j]) and the output y_j in row R_L[j]. The kernel
// looks these composed gathers up in the row tables (mma_prepare_kernel), so a
// permutation still costs nothing. It needs square groups (n == m: outputs and inputs share
// rows) and work items that cover whole groups (no other warp may still read a row an item
// overwrites): groups of at most 8 (one block of outputs), of at most 16 (pair items, at
// every tile size), or of 25 to 32 (items of four blocks, tiles of 16 or 32 positions): see
// mma_layer's kWhole. Returns the largest tile in positions those items allow (0: none). It
// is chosen where it gives a larger tile than two tiles do (otherwise two tiles: composed
// shuffles are not always rows a power of two apart, whose reads the swizzle keeps free of
// bank conflicts). With three planes (MmaF32x3) at most 32 positions: the in-place
// 64-position float32 kernel spilled at 128 registers, and is not built.
inline int mma_in_place_max_tp(const MmaParams& mp, int planes = 1) {
  int max_tp = planes > 1 ? 32 : 16 * kMmaMaxMt;
  for (int l = 0; l < mp.c.L; ++l) {
    const LayerDesc& d = mp.c.layer[l];
    if (d.n != d.m || d.m > 32 || (d.m > 16 && d.m <= 24)) return 0;
    if (d.m > 16) max_tp = 32;
  }
  return max_tp;
}

// The row tables, int32: [rows | inputs | natural]. rows (filled only with in-place layers; two
// tiles read the index table itself): the index table's layout, the input index and then the
// composed gathers R_1 .. R_L; inputs: layer l's input j as the element mma_elem(row, 0) of its
// row (in place: R_l[j]; two tiles: gather_{l-1}[j], j for layer 0), from entry
// layer[l].e_off; natural: mma_elem(o, 0) for o < cmax (rows in natural order: the two-tile
// forward's layer outputs, the backward's gradient tiles). A work item looks its row addresses
// up instead of computing the swizzle.
__host__ __device__ __forceinline__ int64_t mma_row_table_size(const MmaParams& mp) {
  const ChainParams<float>& p = mp.c;
  const LayerDesc& last = p.layer[p.L - 1];
  return last.g_off + last.cout + mp.layer[p.L - 1].e_off + last.cin + p.cmax;
}

// The first row-table entry that is filled (the composed gathers only with in-place layers).
__host__ __device__ __forceinline__ int64_t mma_row_table_first(const MmaParams& mp,
                                                                bool in_place) {
  const LayerDesc& last = mp.c.layer[mp.c.L - 1];
  return in_place ? 0 : last.g_off + last.cout;
}

// Row-table entry e (above) for tiles of TP positions, from the index table's definition a
// (entries are computed, not read back: the table is built in the same launch).
template <int TP>
__device__ __forceinline__ int32_t mma_row_table_entry(const MmaParams& mp,
                                                       const IndexTableArgs& a, bool in_place,
                                                       bool wrap, int64_t e) {
  const ChainParams<float>& p = mp.c;
  const LayerDesc& last = p.layer[p.L - 1];
  const int64_t nrows = last.g_off + last.cout;
  const int64_t nin = mp.layer[p.L - 1].e_off + last.cin;
  if (e >= nrows + nin) {  // natural order
    const int o = static_cast<int>(e - nrows - nin);
    return wrap ? mma_elem<TP, true>(o, 0) : mma_elem<TP>(o, 0);
  }
  if (e < p.layer[0].g_off)  // the input index, as it is
    return index_entry(a, e);
  int l = 0;  // composed rows: R_{l+1}[v]; inputs: layer l's input v
  int64_t v;
  if (e < nrows) {
    while (l + 1 < p.L && e >= p.layer[l + 1].g_off) ++l;
    v = e - p.layer[l].g_off;
    for (int k = l; k >= 0; --k)
      if (!p.layer[k].gather_identity) v = index_entry(a, p.layer[k].g_off + v);
    return static_cast<int32_t>(v);
  }
  const int64_t f = e - nrows;
  while (l + 1 < p.L && f >= mp.layer[l + 1].e_off) ++l;
  v = f - mp.layer[l].e_off;
  // in place: R_l = gather_0 o ... o gather_{l-1}; two tiles: gather_{l-1}
  for (int k = l - 1; k >= (in_place ? 0 : l - 1) && k >= 0; --k)
    if (!p.layer[k].gather_identity) v = index_entry(a, p.layer[k].g_off + v);
  const int row = static_cast<int>(v);
  return wrap ? mma_elem<TP, true>(row, 0) : mma_elem<TP>(row, 0);
}

// Everything the tensor-core kernels read besides the tensors, in one launch: the index table
// (table: index_table_size entries, the segments of a), the row tables of tiles of TP positions
// (rows: mma_row_table_size(mp) entries; in place: also the composed gathers), the weight
// fragments of mp (frag) and of mt, the transposed chain of the backward (frag_t; mt.num_frag =
// 0 in the forward), and the biases in fp32 (bias: mp.c.num_b entries, in layer order). Every
// entry is computed from a and w directly, so no part waits for another. mode: 1 in-place
// layers, 2 the kWrap layout, 4 bfloat16 weights and biases (else float16), 8 float32 weights
// and biases (MmaF32x3: frag holds three planes of mp.num_frag fragments, hi, mid, lo, and
// frag_t three of mt.num_frag), 16 float32 in two planes (MmaF32x2: hi, lo).
template <int TP>
__global__ void __launch_bounds__(kThreads)
    mma_prepare_kernel(const IndexTableArgs a, const MmaParams mp, const MmaParams mt,
                       const MmaWeights w, int mode, int32_t* __restrict__ table,
                       int32_t* __restrict__ rows, uint2* __restrict__ frag,
                       uint2* __restrict__ frag_t, float* __restrict__ bias) {
  const IndexSegment& last = a.seg[a.count - 1];
  const int64_t n_table = last.offset + last.length;
  const bool in_place = (mode & 1) != 0, wrap = (mode & 2) != 0, bf16 = (mode & 4) != 0;
  const int f32_planes = (mode & 8) != 0 ? 3 : (mode & 16) != 0 ? 2 : 0;
  const bool f32 = f32_planes != 0;
  const int64_t r0 = mma_row_table_first(mp, in_place);
  const int64_t n_rows = mma_row_table_size(mp) - r0;
  const int64_t n_fwd = (f32 ? f32_planes : 1) * mp.num_frag;
  const int64_t n_frag = n_fwd + (f32 ? f32_planes : 1) * mt.num_frag;
  const int64_t total = n_table + n_rows + n_frag + mp.c.num_b;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += stride) {
    int64_t i = e;
    if (i < n_table) {
      table[i] = index_entry(a, i);
      continue;
    }
    i -= n_table;
    if (i < n_rows) {
      rows[r0 + i] = mma_row_table_entry<TP>(mp, a, in_place, wrap, r0 + i);
      continue;
    }
    i -= n_rows;
    if (i < n_fwd) {
      const int plane = static_cast<int>(i / mp.num_frag);
      frag[i] = mma_weight_fragment<false>(mp, w, i - plane * mp.num_frag, f32_planes, plane);
      continue;
    }
    if (i < n_frag) {
      i -= n_fwd;
      const int plane = static_cast<int>(i / mt.num_frag);
      frag_t[i] = mma_weight_fragment<true>(mt, w, i - plane * mt.num_frag, f32_planes, plane);
      continue;
    }
    i -= n_frag;
    int l = 0;  // the layer whose bias holds entry i
    while (mp.c.layer[l].b_off < 0 || i >= mp.c.layer[l].b_off + mp.c.layer[l].cout) ++l;
    const int64_t j = i - mp.c.layer[l].b_off;
    bias[i] = f32 ? static_cast<const float*>(w.b[l])[j]
                  : mma_bits_to_float(static_cast<const uint16_t*>(w.b[l])[j], bf16);
  }
}

// Launches mma_prepare_kernel for tiles of 16 * mt_tile positions: table, rows, frag, frag_t and
// the biases as above (mp.c.table == table, mp.frag == frag, mp.c.B the biases' mp.c.num_b
// floats; mt null in the forward, else mt->frag == frag_t), and returns mp pointing at the row
// tables (elem, elem_out; with in-place layers also the composed gathers as its index table,
// identity while every gather so far is). wrap: the row elements in mma_elem's kWrap layout.
// Fmt: the format of the weights and biases (MmaF32x3 / MmaF32x2: float32, packed in three /
// two planes).
template <class Fmt>
inline cudaError_t launch_mma_prepare(const HostChain& h, const MmaParams& mp,
                                      const MmaParams* mt, const MmaWeights& w, int mt_tile,
                                      bool in_place, bool wrap, int32_t* table, int32_t* rows,
                                      uint2* frag, uint2* frag_t, cudaStream_t stream,
                                      MmaParams* out) {
  if (mp.c.table != table || mp.frag != frag || table == nullptr || rows == nullptr ||
      frag == nullptr || (mt != nullptr && (mt->frag != frag_t || frag_t == nullptr)) ||
      (mp.c.num_b > 0 && mp.c.B == nullptr))
    return cudaErrorInvalidValue;
  MmaParams none{};  // the forward: no transposed fragments
  const MmaParams& t = mt != nullptr ? *mt : none;
  const IndexTableArgs a = make_index_table_args(h);
  const int64_t total = index_table_size(h) + mma_row_table_size(mp) -
                        mma_row_table_first(mp, in_place) +
                        Fmt::kPlanes * (mp.num_frag + t.num_frag) + mp.c.num_b;
  const int blocks = blocks_for(total, 1024);
  // mma_prepare_kernel's mode
  const int ip = (in_place ? 1 : 0) | (wrap ? 2 : 0) |
                 (Fmt::kPlanes == 3 ? 8 : Fmt::kPlanes == 2 ? 16 : (Fmt::is_bf16 ? 4 : 0));
  float* bias = const_cast<float*>(mp.c.B);
  if (mt_tile == 4)
    IGC_LAUNCH(mma_prepare_kernel<64>, blocks, 0, stream, a, mp, t, w, ip, table, rows, frag,
               frag_t, bias);
  else if (mt_tile == 2)
    IGC_LAUNCH(mma_prepare_kernel<32>, blocks, 0, stream, a, mp, t, w, ip, table, rows, frag,
               frag_t, bias);
  else
    IGC_LAUNCH(mma_prepare_kernel<16>, blocks, 0, stream, a, mp, t, w, ip, table, rows, frag,
               frag_t, bias);
  const ChainParams<float>& p = mp.c;
  *out = mp;
  const LayerDesc& last = p.layer[p.L - 1];
  out->elem = rows + last.g_off + last.cout;
  out->elem_out = out->elem + mp.layer[p.L - 1].e_off + last.cin;
  if (in_place) {
    out->c.table = rows;
    bool identity = true;
    for (int l = 0; l < p.L; ++l) {
      identity = identity && p.layer[l].gather_identity;
      out->c.layer[l].gather_identity = identity ? 1 : 0;
    }
  }
  return cudaGetLastError();
}



// The forward kernel's launch-bounds minimum of CTAs per SM (below).
constexpr int mma_forward_min_ctas(int mt, bool in_place, int planes = 1) {
  return (in_place && mt == 4) || planes > 1 ? 2 : 3;
}

// Launch bounds of three CTAs per SM (at most 80 registers; the in-place 64-position kernel,
// whose pair items spilled 24 bytes at 80, and the float32 kernels (MmaF32x3: three planes of
// each operand, which spilled up to 148 bytes at 80, and three times the tile bytes), two: at
// most 128). Without a minimum, ptxas kept the
// kernel near 40-48 registers and spilled around its calls once the layers had pair items. The
// tile chooser sizes tiles for two CTAs per SM; where three tiles fit the SM's shared memory
// (IGCV2(256, *) at 64 positions, (512, 32) and (1024, *) at 32: about 67 KB each), the
// occupancy query and so the grid count three (DeviceInfo::max_ctas may cap it).
// mp.elem / elem_out: the element tables (mma_prepare_kernel). kInPlace: one tile, the layers
// in place (above); mp's table and identity flags are then the composed gathers'. kWrap (in
// place only): the tile in mma_elem's kWrap layout (mma_wrap_layout decides).
// MmaF32x3 / MmaF32x2: x and y float32, the tiles in three / two planes (mma_plane_elems
// apart), the weight fragments likewise (mp.num_frag apart).
template <class Fmt, int MT, bool kInPlace, bool kWrap = false>
__global__ void __launch_bounds__(kThreads, mma_forward_min_ctas(MT, kInPlace, Fmt::kPlanes))
    chain_forward_mma_kernel(const MmaParams mp,
                             const TensorArg<const typename Fmt::Storage> x,
                             const TensorArg<typename Fmt::Storage> y, int64_t P) {
  constexpr int TP = MT * 16;
  constexpr int NP = Fmt::kPlanes;
  // the items' first k-step without bias code where a layer has none (mma_layer_k), but in the
  // in-place three-plane kernel of 32 positions, which spilled 20 bytes on sm_90 with it
  constexpr bool kBiasBranch = !(NP == 3 && kInPlace && MT == 2);
  IGC_DECLARE_SMEM(smem);
  const ChainParams<float>& p = mp.c;
  // two named tiles, not an array indexed at run time: the compiler then keeps every access
  // to them a shared-memory instruction (LDS / STS / LDSM, not generic LD / ST)
  uint16_t* const tile0 = reinterpret_cast<uint16_t*>(smem);
  uint16_t* const tile1 = kInPlace ? tile0 : tile0 + mp.tile_rows[0] * TP;
  uint16_t* zero = kInPlace ? tile0 + mma_tile_rows(p.cmax) * TP : tile1 + mp.tile_rows[1] * TP;
  // zero + TP: the scratch row (mma_layer_k)
  const int ps = NP > 1 ? mma_plane_elems(mp, TP, kInPlace) : 0;  // == zero + 2 TP - tile0
  const int64_t fps = NP > 1 ? mp.num_frag : 0;
  // 4 TP bytes per plane: 8-byte aligned
  int64_t* off_x = reinterpret_cast<int64_t*>(zero + 2 * TP + (NP - 1) * ps);
  int64_t* off_y = off_x + TP;
  for (int t = threadIdx.x; t < NP * TP; t += kThreads) zero[(t / TP) * ps + t % TP] = 0;
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
    if constexpr (NP == 1)
      mma_load_tile<TP, kWrap>(x.ptr, x.cs, off_x, x.ix.run_is_contiguous(p0, tvalid),
                               rows_aligned16(x), tvalid, p.c0,
                               p.has_index ? p.table + p.index_off : nullptr, tile0);
    else
      mma_load_tile_f32<NP, TP, kWrap>(x.ptr, x.cs, off_x, x.ix.run_is_contiguous(p0, tvalid),
                                       pairs_aligned(x), rows_aligned16(x), tvalid, p.c0,
                                       p.has_index ? p.table + p.index_off : nullptr, tile0, ps);
    __syncthreads();
    for (int l = 0; l < p.L; ++l) {
      const int32_t* in_elems = mp.elem + mp.layer[l].e_off;
      if constexpr (kInPlace) {
        mma_layer<Fmt, MT, true, kBiasBranch>(p.layer[l], mp.layer[l], p.B, mp.frag, tile0,
                                              in_elems, tile0, zero, in_elems, ps, fps);
      } else {
        const bool odd = (l & 1) != 0;
        mma_layer<Fmt, MT, false, kBiasBranch>(p.layer[l], mp.layer[l], p.B, mp.frag,
                                               odd ? tile1 : tile0, in_elems, odd ? tile0 : tile1,
                                               zero, mp.elem_out, ps, fps);
      }
      __syncthreads();
    }
    const LayerDesc& last = p.layer[p.L - 1];
    const int32_t* out_rows = last.gather_identity ? nullptr : p.table + last.g_off;
    if constexpr (NP == 1)
      mma_store_tile<TP, kWrap>(y.ptr, y.cs, off_y, y.ix.run_is_contiguous(p0, tvalid),
                                rows_aligned16(y), tvalid, last.cout, out_rows,
                                (p.L & 1) ? tile1 : tile0);
    else
      mma_store_tile_f32<NP, TP, kWrap>(y.ptr, y.cs, off_y, y.ix.run_is_contiguous(p0, tvalid),
                                        pairs_aligned(y), rows_aligned16(y), tvalid, last.cout,
                                        out_rows, (p.L & 1) ? tile1 : tile0, ps);
  }
}

// ---------------------------------------------------------------------------------------------
// Host: plan and launch
// ---------------------------------------------------------------------------------------------
struct MmaPlan {
  int mt = 0;  // tile of 16 * mt positions (0: does not fit)
  bool in_place = false;  // the forward's layers in place (one tile)
  bool wrap = false;      // in place, the tile in mma_elem's kWrap layout
  bool reload_x = false;  // the backward's x and dy in one tile (chain_mma_backward.cuh)
  bool prefetch = false;  // the backward prefetches its next tile into L2 (same)
  size_t smem = 0;
  int grid = 0;
  int64_t ntiles = 0;
};

// The tile: the largest (64, 32, 16 positions; at most max_tp) that leaves room for two CTAs
// per SM, else the largest that fits one; halved (down to 16) while there are fewer tiles than
// SMs.
inline int mma_choose_mt(const MmaParams& mp, const DeviceInfo& dev, int64_t P,
                         bool in_place = false, int max_tp = 16 * kMmaMaxMt, int planes = 1) {
  const int tp = choose_tile(
      [&](int t) {
        return t > max_tp ? ~size_t(0) : mma_forward_smem_bytes(mp, t, in_place, planes);
      },
      dev, P, 16, 2);
  return tp >= 64 ? 4 : tp / 16;
}

// f(chain_forward_mma_kernel<Fmt, mt, in_place, wrap>) for a run-time tile mt (1, 2 or 4; in
// place with three planes 1 or 2: mma_in_place_max_tp)
template <class Fmt, class F>
inline cudaError_t with_forward_mma_kernel(int mt, bool in_place, bool wrap, F f) {
  if constexpr (Fmt::kPlanes > 1) {
    if (in_place && mt == 4) return cudaErrorInvalidValue;
  }
  if (in_place && wrap) {
    if constexpr (Fmt::kPlanes == 1)
      if (mt == 4) return f(chain_forward_mma_kernel<Fmt, 4, true, true>);
    if (mt == 2) return f(chain_forward_mma_kernel<Fmt, 2, true, true>);
    return f(chain_forward_mma_kernel<Fmt, 1, true, true>);
  }
  if (in_place) {
    if constexpr (Fmt::kPlanes == 1)
      if (mt == 4) return f(chain_forward_mma_kernel<Fmt, 4, true>);
    if (mt == 2) return f(chain_forward_mma_kernel<Fmt, 2, true>);
    return f(chain_forward_mma_kernel<Fmt, 1, true>);
  }
  if (mt == 4) return f(chain_forward_mma_kernel<Fmt, 4, false>);
  if (mt == 2) return f(chain_forward_mma_kernel<Fmt, 2, false>);
  return f(chain_forward_mma_kernel<Fmt, 1, false>);
}

// Whether the in-place forward takes mma_elem's kWrap layout: its rows are 2^nb channels with
// nb % 3 != 0 (nb % 3 == 0: the digit XOR already spreads bits consecutive modulo nb) and at
// least two gathers compose before a layer (L >= 3): a group's input rows after two or more
// power-of-two shuffles can differ in bits that wrap around (IGCV2(1024, 8), (1024, 16)). The
// layout costs a few instructions per row address in the tile loads and stores, so chains that
// cannot need it keep the plain one.
inline bool mma_wrap_layout(const MmaParams& mp) {
  const int c = mp.c.cmax;
  if (mp.c.L < 3 || c < 32 || (c & (c - 1)) != 0) return false;
  int nb = 0;
  while ((1 << nb) < c) ++nb;
  return nb % 3 != 0;
}

template <class Fmt>
inline cudaError_t plan_forward_mma(const MmaParams& mp, int64_t P, const DeviceInfo& dev,
                                    MmaPlan* plan) {
  constexpr int NP = Fmt::kPlanes;
  plan->mt = mma_choose_mt(mp, dev, P, false, 16 * kMmaMaxMt, NP);
  plan->in_place = false;
  const int max_tp = mma_in_place_max_tp(mp, NP);
  if (max_tp > 0) {
    const int mt = mma_choose_mt(mp, dev, P, true, max_tp, NP);
    bool take = mt > plan->mt;
    if constexpr (NP > 1) {
      // float32: by positions per SM (the tile times the CTAs, two or one, whose shared memory
      // fits), since three planes often leave the two-tile kernel one CTA per SM at 16
      // positions where in-place layers fit two (IGCV2(1024, 32))
      const auto per_sm = [&](int m, bool ip) {
        return m * (mma_forward_smem_bytes(mp, 16 * m, ip, NP) <= cta_smem_budget(dev, 2) ? 2
                                                                                       : 1);
      };
      take = mt > 0 && (plan->mt == 0 || per_sm(mt, true) > per_sm(plan->mt, false));
    }
    if (take) {
      plan->mt = mt;
      plan->in_place = true;
      plan->wrap = mma_wrap_layout(mp);
    }
  }
  if (plan->mt == 0) return cudaSuccess;
  const int tp = 16 * plan->mt;
  plan->smem = mma_forward_smem_bytes(mp, tp, plan->in_place, NP);
  plan->ntiles = (P + tp - 1) / tp;
  int occ = 0;
  const cudaError_t e = with_forward_mma_kernel<Fmt>(
      plan->mt, plan->in_place, plan->wrap,
      [&](auto kernel) { return configure(kernel, plan->smem, &occ); });
  if (e != cudaSuccess) return e;
  if (dev.max_ctas > 0 && occ > dev.max_ctas) occ = dev.max_ctas;
  if (occ < 1) occ = 1;
  plan->grid = static_cast<int>(min64(plan->ntiles, static_cast<int64_t>(dev.sm_count) * occ));
  return cudaSuccess;
}

// table: index_table_size(h) entries of device memory, mp.c.table must point to it; frag:
// Fmt::kPlanes * mp.num_frag entries, mp.frag must point to it; tables:
// mma_row_table_size(mp) entries for the row tables. w: the weights (MmaWeights). Builds the
// tables and packs the weights in one launch, then runs the chain.
template <class Fmt>
inline cudaError_t launch_forward_mma(const HostChain& h, const MmaParams& mp,
                                      const MmaWeights& w, int32_t* table, uint2* frag,
                                      int32_t* tables,
                                      const TensorArg<const typename Fmt::Storage>& x,
                                      const TensorArg<typename Fmt::Storage>& y, int64_t P,
                                      const MmaPlan& plan, cudaStream_t stream) {
  if (plan.mt != 1 && plan.mt != 2 && plan.mt != 4) return cudaErrorInvalidValue;
  if (plan.grid < 1 ||
      (plan.in_place && 16 * plan.mt > mma_in_place_max_tp(mp, Fmt::kPlanes)))
    return cudaErrorInvalidValue;
  MmaParams tp;
  const cudaError_t e = launch_mma_prepare<Fmt>(h, mp, nullptr, w, plan.mt, plan.in_place,
                                           plan.in_place && plan.wrap, table,
                                           tables, frag, nullptr, stream, &tp);
  if (e != cudaSuccess) return e;
  return with_forward_mma_kernel<Fmt>(plan.mt, plan.in_place, plan.wrap, [&](auto kernel) {
    IGC_LAUNCH(kernel, plan.grid, plan.smem, stream, tp, x, y, P);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace igc
