// Fused CUDA kernels of the interleaved group convolution chain: torch-free device code and the
// torch-free host code that plans and launches it (raw pointers, strides, cudaStream_t).
//
// Algorithm (forward). A CTA of kThreads threads takes a tile of TP positions (pixels or tokens)
// and stages all C_0 channels of it in shared memory as an accumulation-type (fp32, or fp64 for
// float64 inputs) array [channel][TP + pad]. Every layer is a set of small dense blocks: a thread
// computes OUTS consecutive output rows of one group for 4 (float items of 4 rows: 8)
// consecutive positions (u[o][t..t+3] = b[o] + sum_k W[o][k] * h[in_row(k)][t..t+3], one 16-byte
// shared-memory read of h per OUTS * 4 FMAs, weights read through the L1 cache), the group width
// K is a compile-time constant for K in {1, 2, 4, 8, 16, 32, 64} (loops unrolled) with a runtime
// fallback.
// Results go to the other of two ping-pong buffers. Permutations never move data: layer l+1 reads
// its input j from row gather_l[j] of layer l's output buffer, and the store of y reads channel
// j from row gather_L[j]. y is written once. Byte budget: bytes(x) + bytes(y); FLOPs
// 2 * sum_l C_l n_l per position, all in fp32 (fp64 for float64).
//
// Loads and stores. Per tile the element offsets of its TP positions are computed once (any
// strides, 64-bit); then one of three paths moves the tile: (a) the TP positions are
// consecutive in memory (NCHW-like): per channel a contiguous row, moved with 16-byte vector
// accesses when the row is 16-byte aligned (scalar otherwise); (b) channel stride 1
// (channels_last): per position C contiguous channels, 16-byte vectors where aligned; (c) any
// other strides: scalar, positions fastest.
//
// Backward. A persistent grid (CTAs loop over tiles in a fixed order) reloads the x tile,
// recomputes u_1 .. u_{L-1} on chip (kept in shared memory when they fit, "store-all" mode; else
// recomputed from the x tile for each layer, "recompute" mode), loads dy with the inverse of the
// last permutation, and walks the layers back: db and dW (dot products over the tile's
// positions, added to the CTA's private fp32 row of a [num_ctas, num_weights + num_biases]
// buffer; every element is owned by one thread of the CTA, so no atomics), dh = W^T du scattered
// by the previous layer's gather index into the other gradient buffer, and finally dx (written
// once; with an input index, dx channel c sums the rows j with input_index[j] == c through a CSR
// list built by the launcher). A second kernel sums the per-CTA rows in CTA order: the weight
// and bias gradients are bitwise reproducible for a given device (grid size) and problem.
//
// Everything a kernel relies on is checked on the host before the launch (check_chain in
// ../chain_args.h, the layer limit in chain_cuda.cu, the plan functions below). Index tables
// are built on the device by build_index_table_kernel, which
// fails a device-side assert on an entry outside its range and clamps it to 0, so that unchecked
// direct calls stay memory safe (the Python front end validates index values first).
//
// With IGC_EMULATE defined, this header compiles as plain C++ against host_emulation.h (a test
// header, tests/csrc/, on the include path of the tests' emulation build), which
// runs every CUDA thread of a block as a host thread (tests/test_cuda_compile_nvcc.py uses it to
// check the kernels' results on a machine without a GPU).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "../positions.h"
#include "chain_limits.h"

#ifdef IGC_EMULATE
#include "host_emulation.h"
#define IGC_DEVICE_ASSERT_FAIL(msg) igc_emu::device_assert_fail(msg)
#else
#include <cassert>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
// A device-side assert that NDEBUG does not remove (ATen's CUDA_KERNEL_ASSERT does the same).
#define IGC_DEVICE_ASSERT_FAIL(msg) __assert_fail(msg, __FILE__, __LINE__, __func__)
#endif

// Tells the compiler that a generic pointer points to shared memory (a callee that is not
// inlined cannot see it), so that its loads and stores are 32-bit shared ones.
#if defined(__CUDA_ARCH__)
#define IGC_ASSUME_SHARED(p) __builtin_assume(__isShared(p))
#else
#define IGC_ASSUME_SHARED(p) ((void)0)
#endif

namespace igc {
namespace cuda {

constexpr int kThreads = 256;      // threads per CTA (tile limits: chain_limits.h)
// Cap of the per-CTA partial-sum buffer of the backward (bytes); fewer CTAs beyond it.
constexpr int64_t kMaxPartialBytes = int64_t(256) << 20;

static_assert(kThreads % 32 == 0, "kThreads must be a multiple of the warp size");
static_assert(kMaxTile % kMinTile == 0 && kMinTile == 4, "tiles are made of 4-wide vectors");

// ---------------------------------------------------------------------------------------------
// Element types
// ---------------------------------------------------------------------------------------------
template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  using acc = float;
  static __host__ __device__ __forceinline__ float load(float v) { return v; }
  static __host__ __device__ __forceinline__ float store(float v) { return v; }
};
template <>
struct Cvt<double> {
  using acc = double;
  static __host__ __device__ __forceinline__ double load(double v) { return v; }
  static __host__ __device__ __forceinline__ double store(double v) { return v; }
};
#ifndef IGC_EMULATE
template <>
struct Cvt<__half> {
  using acc = float;
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};
template <>
struct Cvt<__nv_bfloat16> {
  using acc = float;
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};
#endif

// Four accumulation-type values of one shared-memory row (16-byte aligned).
template <typename A>
struct V4 {
  A x, y, z, w;
};
__device__ __forceinline__ V4<float> lds4(const float* p) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  return {v.x, v.y, v.z, v.w};
}
// 16 bytes of read-only global memory (p 16-byte aligned).
__device__ __forceinline__ float4 ldg4(const float* p) {
  return *reinterpret_cast<const float4*>(p);
}
// 16 bytes of a tensor the kernel only reads (p 16-byte aligned): one 128-bit load (a plain
// uint4 load of a float row was split into four 32-bit ones).
__device__ __forceinline__ uint4 ldg16(const void* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(reinterpret_cast<const uint4*>(p));
#else
  return *reinterpret_cast<const uint4*>(p);
#endif
}
// Four floats of shared memory at element `elem` of `base` (16-byte aligned), by a 32-bit shared
// address: a buffer picked from an array at run time took generic 64-bit loads (LD.E.128), and
// IGC_ASSUME_SHARED on it, or picking it with a select, took the backward kernel to 92 to 136
// bytes of spills on sm_90 (sm_90 SASS of the instantiation file).
__device__ __forceinline__ V4<float> lds4_shared(const float* base, int elem) {
#if defined(__CUDA_ARCH__)
  const unsigned a =
      static_cast<unsigned>(__cvta_generic_to_shared(base)) + 4u * static_cast<unsigned>(elem);
  V4<float> v;
  asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
               : "r"(a));
  return v;
#else
  return lds4(base + elem);
#endif
}
__device__ __forceinline__ V4<double> lds4(const double* p) {
  const double2 a = reinterpret_cast<const double2*>(p)[0];
  const double2 b = reinterpret_cast<const double2*>(p)[1];
  return {a.x, a.y, b.x, b.y};
}
__device__ __forceinline__ V4<double> lds4_shared(const double* base, int elem) {
  return lds4(base + elem);
}
// p: shared memory (one 128-bit store; written as a C++ float4 store, the compiler split the
// stores to rows it addressed as a previous row plus the row stride into four scalar ones)
__device__ __forceinline__ void sts4(float* p, float a, float b, float c, float d) {
#if defined(__CUDA_ARCH__)
  asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};\n"
               :
               : "r"(static_cast<unsigned>(__cvta_generic_to_shared(p))), "f"(a), "f"(b),
                 "f"(c), "f"(d)
               : "memory");
#else
  float4 v;
  v.x = a;
  v.y = b;
  v.z = c;
  v.w = d;
  *reinterpret_cast<float4*>(p) = v;
#endif
}
__device__ __forceinline__ void sts4(double* p, double a, double b, double c, double d) {
  double2 u, v;
  u.x = a;
  u.y = b;
  v.x = c;
  v.y = d;
  reinterpret_cast<double2*>(p)[0] = u;
  reinterpret_cast<double2*>(p)[1] = v;
}

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
// floor(a / d) for a d >= 1 and an a >= 0 with a d < 2^32, from m = div_magic(d) = ceil(2^32 /
// d) (exactly 2^32 / d for a power of two; d = 1: 2^32 wraps to 0, and the quotient is a): with
// m d = 2^32 + e, 0 <= e < d, a m / 2^32 = a / d + a e / (d 2^32), whose second term stays
// below 1 / d while a d < 2^32, so the floor is that of a / d. A few instructions instead of a
// division's twenty.
__host__ __device__ __forceinline__ unsigned div_magic(unsigned d) { return 0xFFFFFFFFu / d + 1u; }
__host__ __device__ __forceinline__ int div_by_magic(int a, unsigned m) {
  const unsigned u = static_cast<unsigned>(a);
#if defined(__CUDA_ARCH__)
  const unsigned q = __umulhi(u, m);
#else
  const unsigned q = static_cast<unsigned>((static_cast<uint64_t>(u) * m) >> 32);
#endif
  return static_cast<int>(m == 0u ? u : q);
}
__host__ __device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// ---------------------------------------------------------------------------------------------
// Positions -> element offsets
// ---------------------------------------------------------------------------------------------
// PosIndexer (positions -> element offsets) and make_pos_indexer come from ../positions.h,
// shared with the CPU kernels.
using ::igc::PosIndexer;
using ::igc::kMaxPosDims;

// A tensor (N, C, *spatial) of element type T: base pointer, channel stride, position indexer.
template <typename T>
struct TensorArg {
  T* ptr;
  int64_t cs;
  PosIndexer ix;
};

template <typename T>
inline TensorArg<T> make_tensor_arg(T* ptr, int dim, const int64_t* sizes, const int64_t* strides) {
  TensorArg<T> a;
  a.ptr = ptr;
  a.cs = strides[1];
  a.ix = ::igc::make_pos_indexer(dim, sizes, strides);
  return a;
}

// Number of positions of a (N, C, *spatial) shape.
inline int64_t num_positions(int dim, const int64_t* sizes) {
  int64_t p = 1;
  for (int d = 0; d < dim; ++d)
    if (d != 1) p *= sizes[d];
  return p;
}

// ---------------------------------------------------------------------------------------------
// The chain
// ---------------------------------------------------------------------------------------------
struct LayerDesc {
  int cin, cout, groups, n, m;  // n = cin / groups inputs, m = cout / groups outputs per group
  int has_bias;
  int gather_identity;  // the gather index after this layer is the identity
  int64_t w_off;        // offset of W_l (cout x n, row-major) in the flat weights
  int64_t b_off;        // offset of b_l in the flat biases (-1: none)
  int64_t g_off;        // offset of gather_l (cout entries) in the index table
};

template <typename A>
struct ChainParams {
  int L;
  int c0;      // C_0 (channels of the first layer's input)
  int c_in;    // channels of x (= C_0 without an input index)
  int cmax;    // max over C_0 .. C_L
  int has_index;
  int64_t index_off;  // offset of the input index (C_0 entries) in the index table
  int64_t x_rows_off; // offset of the identity of C_0 entries (the x tile's rows: forward_layer)
  int64_t num_w, num_b;
  const A* W;              // every W_l, flattened, in layer order
  const A* B;              // every present b_l, in layer order
  const int32_t* table;    // index table (input index, gather_0 .. gather_{L-1}, x rows)
  LayerDesc layer[kMaxLayers];
  // 1: the CUDA-core layer items take 4 positions only (set by the launchers from their plan:
  // DeviceInfo::narrow_items)
  int narrow_items = 0;
};

// Host description of a chain, everything the launch needs besides the tensors. perm[l] and
// index are device pointers to contiguous int64 (or int32 where *_is_int32) index tensors.
struct HostChain {
  int L;
  int has_index;
  int index_is_int32;
  int64_t c_in;
  const void* index;
  int64_t C[kMaxLayers + 1];
  int64_t G[kMaxLayers];
  int has_bias[kMaxLayers];
  int shuffle[kMaxLayers];  // > 0: channel shuffle with that many groups after layer l
  const void* perm[kMaxLayers];
  int perm_is_int32[kMaxLayers];
};

inline int64_t index_table_size(const HostChain& h) {
  int64_t s = h.has_index ? h.C[0] : 0;
  for (int l = 0; l < h.L; ++l) s += h.C[l + 1];
  return s + h.C[0];  // + the identity of C_0 entries (the x tile's rows, ChainParams::x_rows_off)
}

template <typename A>
inline ChainParams<A> make_params(const HostChain& h, const A* W, const A* B,
                                  const int32_t* table) {
  ChainParams<A> p;
  p.L = h.L;
  p.c0 = static_cast<int>(h.C[0]);
  p.c_in = static_cast<int>(h.c_in);
  p.has_index = h.has_index;
  p.index_off = 0;
  p.W = W;
  p.B = B;
  p.table = table;
  int64_t cmax = h.C[0];
  int64_t wo = 0, bo = 0, go = h.has_index ? h.C[0] : 0;
  for (int l = 0; l < kMaxLayers; ++l) {
    LayerDesc& d = p.layer[l];
    if (l >= h.L) {
      d = LayerDesc{0, 0, 0, 0, 0, 0, 1, 0, -1, 0};
      continue;
    }
    d.cin = static_cast<int>(h.C[l]);
    d.cout = static_cast<int>(h.C[l + 1]);
    d.groups = static_cast<int>(h.G[l]);
    d.n = static_cast<int>(h.C[l] / h.G[l]);
    d.m = static_cast<int>(h.C[l + 1] / h.G[l]);
    d.has_bias = h.has_bias[l] ? 1 : 0;
    d.gather_identity = (h.shuffle[l] == 0 && h.perm[l] == nullptr) ? 1 : 0;
    d.w_off = wo;
    wo += h.C[l + 1] * d.n;
    d.b_off = d.has_bias ? bo : -1;
    if (d.has_bias) bo += h.C[l + 1];
    d.g_off = go;
    go += h.C[l + 1];
    if (h.C[l + 1] > cmax) cmax = h.C[l + 1];
  }
  p.x_rows_off = go;  // after the input index and every layer's gather
  p.cmax = static_cast<int>(cmax);
  p.num_w = wo;
  p.num_b = bo;
  return p;
}

// ---------------------------------------------------------------------------------------------
// Index table: input index, the gather index after every layer and the identity of C_0 entries
// (the x tile's rows), as int32 on the device
// ---------------------------------------------------------------------------------------------
struct IndexSegment {
  int64_t offset;  // first entry in the table
  int64_t length;
  int64_t range;   // valid entries lie in [0, range)
  int64_t shuffle; // > 0: channel shuffle with that many groups (p64/p32 null)
  const int64_t* p64;
  const int32_t* p32;
};
struct IndexTableArgs {
  int count;
  IndexSegment seg[kMaxLayers + 2];
};

// Entry e of the index table (the table's layout: the segments of a, in order).
__device__ __forceinline__ int32_t index_entry(const IndexTableArgs& a, int64_t e) {
  int s = 0;
  while (s + 1 < a.count && e >= a.seg[s + 1].offset) ++s;
  const IndexSegment& sg = a.seg[s];
  const int64_t j = e - sg.offset;
  int64_t v;
  if (sg.p64 != nullptr) {
    v = sg.p64[j];
  } else if (sg.p32 != nullptr) {
    v = sg.p32[j];
  } else if (sg.shuffle > 0) {
    // perm[k * s + q] = q * (C / s) + k
    const int64_t k = j / sg.shuffle, q = j - k * sg.shuffle;
    v = q * (sg.length / sg.shuffle) + k;
  } else {
    v = j;
  }
  if (v < 0 || v >= sg.range) {
    // A direct call with an entry outside its range: a device-side assert (the launch fails
    // with cudaErrorAssert, as ATen's index kernels do), and the entry is clamped so that
    // nothing reads outside its tensor even where asserts are compiled out. The Python front
    // end checks values (duplicates included) before it gets here.
    IGC_DEVICE_ASSERT_FAIL("igc: a permutation or input_index entry is outside its range");
    v = 0;
  }
  return static_cast<int32_t>(v);
}

__global__ void __launch_bounds__(kThreads)
    build_index_table_kernel(IndexTableArgs a, int32_t* __restrict__ table, int64_t total) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += stride)
    table[e] = index_entry(a, e);
}

inline IndexTableArgs make_index_table_args(const HostChain& h) {
  IndexTableArgs a;
  a.count = 0;
  int64_t off = 0;
  if (h.has_index) {
    IndexSegment& s = a.seg[a.count++];
    s.offset = off;
    s.length = h.C[0];
    s.range = h.c_in;
    s.shuffle = 0;
    s.p64 = h.index_is_int32 ? nullptr : static_cast<const int64_t*>(h.index);
    s.p32 = h.index_is_int32 ? static_cast<const int32_t*>(h.index) : nullptr;
    off += h.C[0];
  }
  for (int l = 0; l < h.L; ++l) {
    IndexSegment& s = a.seg[a.count++];
    s.offset = off;
    s.length = h.C[l + 1];
    s.range = h.C[l + 1];
    s.shuffle = h.shuffle[l];
    s.p64 = (h.perm[l] != nullptr && !h.perm_is_int32[l])
                ? static_cast<const int64_t*>(h.perm[l]) : nullptr;
    s.p32 = (h.perm[l] != nullptr && h.perm_is_int32[l])
                ? static_cast<const int32_t*>(h.perm[l]) : nullptr;
    off += h.C[l + 1];
  }
  IndexSegment& s = a.seg[a.count++];  // the identity of C_0 entries: the x tile's rows
  s.offset = off;
  s.length = h.C[0];
  s.range = h.C[0];
  s.shuffle = 0;
  s.p64 = nullptr;
  s.p32 = nullptr;
  return a;
}

// ---------------------------------------------------------------------------------------------
// Tile movement between global memory and the [channel][ld] shared-memory tile
// ---------------------------------------------------------------------------------------------
// One 16-byte vector of T (VEC elements) to / from VEC consecutive elements of a shared-memory
// row of the accumulation type A, 16-byte aligned there too (tile_ld is a multiple of 4 and
// vectors start at multiples of VEC >= 2): 128-bit shared accesses for float rows.
template <typename T, typename A>
__device__ __forceinline__ void row_from_vec(A* d, const uint4& u) {
  constexpr int VEC = 16 / static_cast<int>(sizeof(T));
  const T* e = reinterpret_cast<const T*>(&u);
  if constexpr (std::is_same<A, float>::value && VEC % 4 == 0) {
#pragma unroll
    for (int k = 0; k < VEC; k += 4)
      sts4(d + k, Cvt<T>::load(e[k]), Cvt<T>::load(e[k + 1]), Cvt<T>::load(e[k + 2]),
           Cvt<T>::load(e[k + 3]));
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) d[k] = Cvt<T>::load(e[k]);
  }
}
template <typename T, typename A>
__device__ __forceinline__ uint4 vec_from_row(const A* s) {
  constexpr int VEC = 16 / static_cast<int>(sizeof(T));
  uint4 u;
  T* e = reinterpret_cast<T*>(&u);
  if constexpr (std::is_same<A, float>::value && VEC % 4 == 0) {
#pragma unroll
    for (int k = 0; k < VEC; k += 4) {
      const V4<float> v = lds4(s + k);
      e[k] = Cvt<T>::store(v.x);
      e[k + 1] = Cvt<T>::store(v.y);
      e[k + 2] = Cvt<T>::store(v.z);
      e[k + 3] = Cvt<T>::store(v.w);
    }
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) e[k] = Cvt<T>::store(s[k]);
  }
  return u;
}

// The channels-last tile moves of load_tile / store_tile (channel vectors of VEC = 16 / sizeof(T)
// elements, C % VEC == 0): a warp moves CV vectors (CV * VEC consecutive channels) of each of
// PB = 32 / CV positions per step, so that its lanes' tile accesses hit distinct banks in float
// tiles of 16 or more positions (CV = 2; with a position per lane, rows 4 apart shared two
// banks: 16-way conflicts) and each position's CV * 16 bytes are one sector. A warp takes
// channel groups warp, warp + 8, ...; for each of its lane's vectors it calls
// f(rows, c0, t0, PB): rows[k] = the tile offset of channel c0 + k's row (row_map(c) or c),
// positions t0, t0 + PB, ... for the lane.
template <typename T, typename A, typename F>
__device__ __forceinline__ void cl_vector_groups(int C, const int32_t* __restrict__ row_map,
                                                 int ld, F&& f) {
  constexpr int VEC = 16 / static_cast<int>(sizeof(T));
  constexpr int CV = (std::is_same<A, float>::value && VEC == 4) ? 2 : 1;
  constexpr int PB = 32 / CV;
  const int lane = threadIdx.x & 31, tl = lane % PB, cv = lane / PB;
  const int nvc = C / VEC, ncg = (nvc + CV - 1) / CV;
  for (int cg = threadIdx.x >> 5; cg < ncg; cg += kThreads / 32) {
    const int vi = cg * CV + cv;
    if (vi >= nvc) continue;
    const int c0 = vi * VEC;
    int rows[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) rows[k] = (row_map ? row_map[c0 + k] : c0 + k) * ld;
    f(rows, c0, tl, PB);
  }
}

// buf[row(c) * ld + t] = src[pos_off[t] + chan(c) * cs] for c < C and t < tvalid, 0 for
// tvalid <= t < tp; row(c) = dst_row ? dst_row[c] : c, chan(c) = src_chan ? src_chan[c] : c.
// load_tile / store_tile are not inlined: one copy per element type serves every call site
// (ptxas time of the unrolled vector paths dominated the build when they were inlined).
template <typename T, typename A>
__device__ __noinline__ void load_tile(const T* __restrict__ src, int64_t cs,
                                          const int64_t* pos_off, bool contig, int tvalid, int tp,
                                          int C, const int32_t* __restrict__ src_chan,
                                          const int32_t* __restrict__ dst_row, A* buf, int ld) {
  constexpr int VEC = 16 / static_cast<int>(sizeof(T));
  static_assert(16 % sizeof(T) == 0, "element size must divide 16 bytes");
  IGC_ASSUME_SHARED(buf);
  const int tid = threadIdx.x;
  if (contig) {  // (a) the tile's positions are consecutive elements
    const int64_t base = pos_off[0];
    if (tvalid == tp && tp % VEC == 0 && cs % VEC == 0 && aligned16(src + base)) {
      // every row 16-byte aligned: a thread keeps one vector v of every row it moves (tiles
      // are powers of two, so the nv vectors of a row divide kThreads) and steps its channel
      // by a pass's rows; a warp still reads whole rows
      const int nv = tp / VEC;
      const int v = tid % nv, cstep = kThreads / nv;
      const T* sv = src + base + v * VEC;
      if (src_chan == nullptr) {  // channel c: the source pointer steps by a pass's rows
        const int64_t step = static_cast<int64_t>(cstep) * cs;
        const T* sp = sv + static_cast<int64_t>(tid / nv) * cs;
        for (int c = tid / nv; c < C; c += cstep, sp += step)
          row_from_vec<T>(buf + (dst_row ? dst_row[c] : c) * ld + v * VEC, ldg16(sp));
      } else {
        for (int c = tid / nv; c < C; c += cstep)
          row_from_vec<T>(buf + (dst_row ? dst_row[c] : c) * ld + v * VEC,
                          ldg16(sv + static_cast<int64_t>(src_chan[c]) * cs));
      }
    } else if (tvalid == tp && tp % VEC == 0) {
      const int nv = tp / VEC;
      for (int it = tid; it < C * nv; it += kThreads) {
        const int c = it / nv, v = it - c * nv;
        const int64_t chan = src_chan ? src_chan[c] : c;
        const T* s = src + base + chan * cs + v * VEC;
        A* d = buf + static_cast<int64_t>(dst_row ? dst_row[c] : c) * ld + v * VEC;
        if (aligned16(s)) {
          const uint4 u = *reinterpret_cast<const uint4*>(s);
          const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
          for (int k = 0; k < VEC; ++k) d[k] = Cvt<T>::load(e[k]);
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) d[k] = Cvt<T>::load(s[k]);
        }
      }
    } else {
      for (int it = tid; it < C * tp; it += kThreads) {
        const int c = it / tp, t = it - c * tp;
        const int64_t chan = src_chan ? src_chan[c] : c;
        A v = A(0);
        if (t < tvalid) v = Cvt<T>::load(src[base + chan * cs + t]);
        buf[static_cast<int64_t>(dst_row ? dst_row[c] : c) * ld + t] = v;
      }
    }
    return;
  }
  if (cs == 1 && src_chan == nullptr && C % VEC == 0) {  // (b) channels-last, vectors of VEC
    cl_vector_groups<T, A>(C, dst_row, ld, [&](const int (&rows)[VEC], int c0, int t0, int step) {
      for (int t = t0; t < tp; t += step) {
        if (t >= tvalid) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) buf[rows[k] + t] = A(0);
          continue;
        }
        const T* s = src + pos_off[t] + c0;
        if (aligned16(s)) {
          const uint4 u = ldg16(s);
          const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
          for (int k = 0; k < VEC; ++k) buf[rows[k] + t] = Cvt<T>::load(e[k]);
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) buf[rows[k] + t] = Cvt<T>::load(s[k]);
        }
      }
    });
    return;
  }
  if (cs == 1) {  // (b') channels-last, scalar (gathered channels or C not a multiple of VEC)
    for (int it = tid; it < tp * C; it += kThreads) {
      const int t = it / C, c = it - t * C;
      const int64_t chan = src_chan ? src_chan[c] : c;
      A v = A(0);
      if (t < tvalid) v = Cvt<T>::load(src[pos_off[t] + chan]);
      buf[static_cast<int64_t>(dst_row ? dst_row[c] : c) * ld + t] = v;
    }
    return;
  }
  // (c) any strides: scalar, positions fastest
  for (int it = tid; it < C * tp; it += kThreads) {
    const int c = it / tp, t = it - c * tp;
    const int64_t chan = src_chan ? src_chan[c] : c;
    A v = A(0);
    if (t < tvalid) v = Cvt<T>::load(src[pos_off[t] + chan * cs]);
    buf[static_cast<int64_t>(dst_row ? dst_row[c] : c) * ld + t] = v;
  }
}

// The value of output channel c at tile position t: buf row src_row(c), or with a CSR list
// (starts, order) the sum of rows order[starts[c] .. starts[c+1]-1] in that order.
template <typename A>
__device__ __forceinline__ A tile_value(const A* buf, int ld, int c, int t,
                                        const int32_t* __restrict__ src_row,
                                        const int32_t* __restrict__ starts,
                                        const int32_t* __restrict__ order) {
  if (starts != nullptr) {
    A s = A(0);
    const int e = starts[c + 1];
    for (int k = starts[c]; k < e; ++k) s += buf[static_cast<int64_t>(order[k]) * ld + t];
    return s;
  }
  return buf[static_cast<int64_t>(src_row ? src_row[c] : c) * ld + t];
}

// dst[pos_off[t] + c * cs] = tile_value(c, t) for c < C and t < tvalid.
template <typename T, typename A>
__device__ __noinline__ void store_tile(T* __restrict__ dst, int64_t cs, const int64_t* pos_off,
                                           bool contig, int tvalid, int tp, int C,
                                           const int32_t* __restrict__ src_row,
                                           const int32_t* __restrict__ starts,
                                           const int32_t* __restrict__ order, const A* buf,
                                           int ld) {
  constexpr int VEC = 16 / static_cast<int>(sizeof(T));
  IGC_ASSUME_SHARED(buf);
  const int tid = threadIdx.x;
  if (contig) {  // (a)
    const int64_t base = pos_off[0];
    if (starts == nullptr && tvalid == tp && tp % VEC == 0 && cs % VEC == 0 &&
        aligned16(dst + base)) {
      // every row 16-byte aligned, no input-index sums: one vector v of every row per thread,
      // as in load_tile, the destination pointer stepping by a pass's rows
      const int nv = tp / VEC;
      const int v = tid % nv, cstep = kThreads / nv;
      const int64_t step = static_cast<int64_t>(cstep) * cs;
      T* dp = dst + base + v * VEC + static_cast<int64_t>(tid / nv) * cs;
      for (int c = tid / nv; c < C; c += cstep, dp += step)
        *reinterpret_cast<uint4*>(dp) =
            vec_from_row<T>(buf + (src_row ? src_row[c] : c) * ld + v * VEC);
    } else if (tvalid == tp && tp % VEC == 0) {
      const int nv = tp / VEC;
      for (int it = tid; it < C * nv; it += kThreads) {
        const int c = it / nv, t0 = (it - c * nv) * VEC;
        T* d = dst + base + static_cast<int64_t>(c) * cs + t0;
        if (aligned16(d)) {
          uint4 u;
          T* e = reinterpret_cast<T*>(&u);
#pragma unroll
          for (int k = 0; k < VEC; ++k)
            e[k] = Cvt<T>::store(tile_value(buf, ld, c, t0 + k, src_row, starts, order));
          *reinterpret_cast<uint4*>(d) = u;
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k)
            d[k] = Cvt<T>::store(tile_value(buf, ld, c, t0 + k, src_row, starts, order));
        }
      }
    } else {
      for (int it = tid; it < C * tp; it += kThreads) {
        const int c = it / tp, t = it - c * tp;
        if (t < tvalid)
          dst[base + static_cast<int64_t>(c) * cs + t] =
              Cvt<T>::store(tile_value(buf, ld, c, t, src_row, starts, order));
      }
    }
    return;
  }
  if (cs == 1 && C % VEC == 0 && starts == nullptr) {  // (b) channels-last, as load_tile's
    cl_vector_groups<T, A>(C, src_row, ld, [&](const int (&rows)[VEC], int c0, int t0, int step) {
      for (int t = t0; t < tvalid; t += step) {
        T* d = dst + pos_off[t] + c0;
        uint4 u;
        T* e = reinterpret_cast<T*>(&u);
#pragma unroll
        for (int k = 0; k < VEC; ++k) e[k] = Cvt<T>::store(buf[rows[k] + t]);
        if (aligned16(d)) {
          *reinterpret_cast<uint4*>(d) = u;
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) d[k] = e[k];
        }
      }
    });
    return;
  }
  if (cs == 1 && C % VEC == 0) {  // (b) channels-last, with input-index sums
    const int nv = C / VEC;
    for (int it = tid; it < tvalid * nv; it += kThreads) {
      const int t = it / nv, c0 = (it - t * nv) * VEC;
      T* d = dst + pos_off[t] + c0;
      if (aligned16(d)) {
        uint4 u;
        T* e = reinterpret_cast<T*>(&u);
#pragma unroll
        for (int k = 0; k < VEC; ++k)
          e[k] = Cvt<T>::store(tile_value(buf, ld, c0 + k, t, src_row, starts, order));
        *reinterpret_cast<uint4*>(d) = u;
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k)
          d[k] = Cvt<T>::store(tile_value(buf, ld, c0 + k, t, src_row, starts, order));
      }
    }
    return;
  }
  if (cs == 1) {  // (b') channels-last, scalar
    for (int it = tid; it < tvalid * C; it += kThreads) {
      const int t = it / C, c = it - t * C;
      dst[pos_off[t] + c] = Cvt<T>::store(tile_value(buf, ld, c, t, src_row, starts, order));
    }
    return;
  }
  for (int it = tid; it < C * tp; it += kThreads) {  // (c)
    const int c = it / tp, t = it - c * tp;
    if (t < tvalid)
      dst[pos_off[t] + static_cast<int64_t>(c) * cs] =
          Cvt<T>::store(tile_value(buf, ld, c, t, src_row, starts, order));
  }
}

// Element offsets of the tile's valid positions.
__device__ __forceinline__ void tile_offsets(const PosIndexer& ix, int64_t p0, int tvalid,
                                             int64_t* off) {
  for (int t = threadIdx.x; t < tvalid; t += kThreads) off[t] = ix.offset(p0 + t);
}

// ---------------------------------------------------------------------------------------------
// One grouped layer over a tile (forward, and the transposed product of the backward)
// ---------------------------------------------------------------------------------------------
// Whether grouped_rows_impl runs the first k-steps of its 16-byte-weight items ahead of their
// loop (32 accumulator copies fewer per item of 8 positions). Not for sm_80: there the forward
// kernel went past 128 registers with it (a 4-byte spill). IGC_EMU_NO_PEEL: sm_80's items in the
// host emulation (a test builds it so and compares the bits).
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900) || defined(IGC_EMU_NO_PEEL)
constexpr bool kPeelFirstSteps = false;
#else
constexpr bool kPeelFirstSteps = true;
#endif

// For every group g < rows_total / R and row r < R (o = g * R + r):
//   out[orow(o)][t] = bias[o] + sum_{k < K} w[g * R * K + r * wk + k * wi] * in[irow(g * K + k)][t]
// irow(i) = in_rows ? in_rows[i] : i (TABLE: in_rows[i], never null; TRANS: i, its callers pass
// none), orow(o) = out_rows ? out_rows[o] : o; t < tp (all tile positions, padding included).
// Forward: R = m, K = n, wk = n, wi = 1. Transposed (dh = W^T du,
// TRANS): R = n, K = m, wk = 1, wi = n = R. Each item is OUTS rows x PV positions (PV = 4, or
// 8 where grouped_rows_k allows it: one input-row entry, weight load and address per k-step then
// serves 8 positions' FMAs instead of 4).
// Addressing: in and out are shared memory (the noinline caller loses that, so it is asserted
// to the compiler: 32-bit shared loads and stores instead of generic ones); per item the weight
// pointer of its first row and the group's input-row entries are set once, so that with K known
// at compile time every weight of a k-step is an immediate offset of one pointer (forward: all
// of them; transposed: the pointer steps by R per k-step).
template <int K, int OUTS, int PV, bool TRANS, bool VW, bool TABLE, typename A>
__device__ __forceinline__ void grouped_rows_impl(const A* in, int ld,
                                                  const int32_t* __restrict__ in_rows,
                                                  const A* __restrict__ w, int wk, int wi,
                                                  const A* __restrict__ bias, int rows_total,
                                                  int R, int k_dyn, A* out,
                                                  const int32_t* __restrict__ out_rows, int tp) {
  IGC_ASSUME_SHARED(in);
  IGC_ASSUME_SHARED(out);
  const int kc = K > 0 ? K : k_dyn;
  // compile-time strides where K is known: forward wk = K, wi = 1; transposed wk = 1, wi = R
  const int sk = K > 0 ? (TRANS ? 1 : K) : wk;
  // Item it (it = threadIdx.x, + kThreads, ...) is output block it / nq at the positions of
  // run it % nq (PV positions). Tiles are powers of two of at most kMaxTile positions
  // (plan_forward, plan_backward) and PV divides them, so nq divides kThreads: a thread keeps
  // its run q and steps its block by bstep, and the block's group and row within it step by
  // (dg, dr), without a division per item.
  static_assert(PV == 4 || PV == 8, "items of 4 or 8 positions");
  constexpr int NV = PV / 4;  // 4-wide vectors per item row
  const int nq = tp / PV;
  const int nblk = rows_total / OUTS;
  const int q = threadIdx.x % nq;
  const int bstep = kThreads / nq;
  const int dg = bstep * OUTS / R, dr = bstep * OUTS - dg * R;
  const A* in_q = in + PV * q;
  const int ld_bytes = ld * static_cast<int>(sizeof(A));
  int blk = threadIdx.x / nq;
  int g = blk * OUTS / R;
  int r0 = blk * OUTS - g * R;
  for (; blk < nblk; blk += bstep, g += dg, r0 += dr) {
    if (r0 >= R) {
      r0 -= R;
      ++g;
    }
    const int o0 = blk * OUTS;
    const A* wg = w + static_cast<int64_t>(g) * R * kc + static_cast<int64_t>(r0) * sk;
    const int i0 = g * kc;
    // forward: the rows from in_rows (TABLE: never null), or in order without them; transposed:
    // in order (its callers pass none)
    const int32_t* irow = !TRANS && (TABLE || in_rows) ? in_rows + i0 : nullptr;
    A acc[OUTS][PV];
#pragma unroll
    for (int j = 0; j < OUTS; ++j) {
      const A b = bias ? bias[o0 + j] : A(0);
#pragma unroll
      for (int t = 0; t < PV; ++t) acc[j][t] = b;
    }
    // k-step k with the weights wv[j] of its rows
    auto fma_step = [&](int k, const A (&wv)[OUTS]) {
      const int row = TABLE || irow ? irow[k] : i0 + k;
      // TABLE: the row's address as one multiply-add in bytes on the run's shared address
      const A* in_row = TABLE ? reinterpret_cast<const A*>(reinterpret_cast<const char*>(in_q) +
                                                           row * ld_bytes)
                              : in_q + row * ld;
#pragma unroll
      for (int u = 0; u < NV; ++u) {
        const V4<A> v = lds4(in_row + 4 * u);
#pragma unroll
        for (int j = 0; j < OUTS; ++j) {
          acc[j][4 * u + 0] += wv[j] * v.x;
          acc[j][4 * u + 1] += wv[j] * v.y;
          acc[j][4 * u + 2] += wv[j] * v.z;
          acc[j][4 * u + 3] += wv[j] * v.w;
        }
      }
    };
    // wk_ptr: the weights of k-step k, row j at wk_ptr[j * sk]
    auto step = [&](int k, const A* __restrict__ wk_ptr) {
      A wv[OUTS];
#pragma unroll
      for (int j = 0; j < OUTS; ++j) wv[j] = wk_ptr[j * sk];
      fma_step(k, wv);
    };
    // unrolled 16 inputs at a time (4 for items of 8 positions): K = 32 / 64 unrolled whole
    // held every input's loads in flight and took the backward kernel past its register budget
    // (spills)
    constexpr int UMAX = PV == 8 ? 4 : 16;
    constexpr int U = K > 0 && K < UMAX ? K : UMAX;
    if constexpr (VW) {
      // 16-byte weight loads: forward, 4 k-steps of one row; transposed, the 4 rows of one
      // k-step (grouped_rows_k: A = float, K % 4 == 0, OUTS == 4, w 16-byte aligned). The first
      // U k-steps run ahead of the loop (kPeelFirstSteps), so that their FMAs take the bias as
      // their addend (the accumulators are not copied from it first).
      auto vw_steps = [&](int k0) {
#pragma unroll
        for (int k = k0; k < k0 + U; k += 4) {
          A wv[4][OUTS];
#pragma unroll
          for (int t = 0; t < 4; ++t) {
            const float4 f = TRANS ? ldg4(wg + static_cast<int64_t>(k + t) * R)
                                   : ldg4(wg + t * sk + k);
            if (TRANS) {
              wv[t][0] = f.x;
              wv[t][1] = f.y;
              wv[t][2] = f.z;
              wv[t][3] = f.w;
            } else {
              wv[0][t] = f.x;
              wv[1][t] = f.y;
              wv[2][t] = f.z;
              wv[3][t] = f.w;
            }
          }
#pragma unroll
          for (int t = 0; t < 4; ++t) fma_step(k + t, wv[t]);
        }
      };
      int k0 = 0;
      if constexpr (kPeelFirstSteps) {
        vw_steps(0);
        k0 = U;
      }
#pragma unroll 1
      for (; k0 < kc; k0 += U) vw_steps(k0);
    } else if (K > 0) {
#pragma unroll 1
      for (int k0 = 0; k0 < K; k0 += U) {
        const A* w0 = TRANS ? wg + static_cast<int64_t>(k0) * R : wg + k0;
#pragma unroll
        for (int k = 0; k < U; ++k) step(k0 + k, TRANS ? w0 + k * R : w0 + k);
      }
    } else {
#pragma unroll 4
      for (int k = 0; k < kc; ++k) step(k, wg + static_cast<int64_t>(k) * wi);
    }
#pragma unroll
    for (int j = 0; j < OUTS; ++j) {
      const int orow = out_rows ? out_rows[o0 + j] : o0 + j;
#pragma unroll
      for (int u = 0; u < NV; ++u)
        sts4(out + orow * ld + PV * q + 4 * u, acc[j][4 * u], acc[j][4 * u + 1],
             acc[j][4 * u + 2], acc[j][4 * u + 3]);
    }
  }
}

template <int OUTS, bool TRANS, bool TABLE, typename A>
__device__ __forceinline__ void grouped_rows_k(const A* in, int ld, const int32_t* in_rows,
                                               const A* w, int wk, int wi, const A* bias,
                                               int rows_total, int R, int K, A* out,
                                               const int32_t* out_rows, int tp, int narrow) {
  // 16-byte weight loads (VW) for float with 4 rows per item and K a multiple of 4; those items
  // take 8 positions where the tile's length is a multiple of 8 (unless `narrow`)
  constexpr bool kVec = OUTS == 4 && std::is_same<A, float>::value;
  constexpr int kWide = kVec ? 8 : 4;
  const bool vw = kVec && aligned16(w);
#define IGC_ROWS_CASE(KK, PV, V)                                                              \
  grouped_rows_impl<KK, OUTS, PV, TRANS, V, TABLE>(in, ld, in_rows, w, wk, wi, bias, rows_total, \
                                                   R, K, out, out_rows, tp)
#define IGC_ROWS_CASE_VW(KK)         \
  if (vw && !narrow && tp % 8 == 0)  \
    IGC_ROWS_CASE(KK, kWide, kVec);  \
  else if (vw)                       \
    IGC_ROWS_CASE(KK, 4, kVec);      \
  else                               \
    IGC_ROWS_CASE(KK, 4, false);
  switch (K) {
    case 1: IGC_ROWS_CASE(1, 4, false); break;
    case 2: IGC_ROWS_CASE(2, 4, false); break;
    case 4: IGC_ROWS_CASE_VW(4) break;
    case 8: IGC_ROWS_CASE_VW(8) break;
    case 16: IGC_ROWS_CASE_VW(16) break;
    case 32: IGC_ROWS_CASE_VW(32) break;
    case 64: IGC_ROWS_CASE_VW(64) break;
    default:
      // a width known at run time: in the forward kernel (TABLE), 16-byte weight loads in
      // steps of 16 inputs (K % 16 == 0) on items of 4 positions; else one input at a time
      // (the backward kernels, at their register limit, spilled 124 bytes on sm_90 with such a
      // variant, and the forward 8 bytes with items of 8 positions)
      if (TABLE && vw && K % 16 == 0)
        IGC_ROWS_CASE(0, 4, kVec);
      else
        IGC_ROWS_CASE(0, 4, false);
      break;
  }
#undef IGC_ROWS_CASE_VW
#undef IGC_ROWS_CASE
}

// Not inlined: one copy per accumulation type and direction serves every kernel and call site
// (inlined into each of them, the unrolled variants multiplied the device compile time several
// times over). TRANS: the transposed product (wk == 1, wi == R), else the forward's (wi == 1,
// wk == K).
template <bool TRANS, typename A, bool TABLE = false>
__device__ __noinline__ void grouped_rows(const A* in, int ld, const int32_t* in_rows,
                                             const A* w, int wk, int wi, const A* bias,
                                             int rows_total, int R, int K, A* out,
                                             const int32_t* out_rows, int tp_arg) {
  // tp_arg: the tile's positions, negated for items of 4 positions only (ChainParams::
  // narrow_items; folded into one argument: a further argument of this shared function took
  // the backward kernel past its registers, 136 bytes of spills on sm_90)
  const int tp = tp_arg < 0 ? -tp_arg : tp_arg, narrow = tp_arg < 0;  // (layer_tile_arg)
  if (R % 4 == 0)
    grouped_rows_k<4, TRANS, TABLE>(in, ld, in_rows, w, wk, wi, bias, rows_total, R, K, out,
                                    out_rows, tp, narrow);
  else if (R % 2 == 0)
    grouped_rows_k<2, TRANS, TABLE>(in, ld, in_rows, w, wk, wi, bias, rows_total, R, K, out,
                                    out_rows, tp, narrow);
  else
    grouped_rows_k<1, TRANS, TABLE>(in, ld, in_rows, w, wk, wi, bias, rows_total, R, K, out,
                                    out_rows, tp, narrow);
}

// grouped_rows's tile argument: tp, negated where the items take 4 positions only.
template <typename A>
__device__ __forceinline__ int layer_tile_arg(const ChainParams<A>& p, int tp) {
  return p.narrow_items ? -tp : tp;
}

// Rows of layer l's input h_l inside the buffer holding u_l (l >= 1): gather_{l-1}, or null
// for the identity; for l == 0 (the x tile, already gathered by the input index) null.
template <typename A>
__device__ __forceinline__ const int32_t* input_rows(const ChainParams<A>& p, int l) {
  if (l == 0) return nullptr;
  const LayerDesc& prev = p.layer[l - 1];
  return prev.gather_identity ? nullptr : p.table + prev.g_off;
}

// Forward of layer l: out[o] = b_l[o] + W_l[o] . h_l, h_l[j] = in[rows(j)]. TABLE (the forward
// kernel): the rows always read from the index table (gather_{l-1}, an identity one included,
// or the x tile's identity run), so that the items load a k-step's row instead of choosing
// between a load and i0 + k; its own instantiation of the layer function. Else (the backward's
// recompute) input_rows: null for the identity (the backward kernel spilled 128 bytes on sm_90
// calling the TABLE instantiation).
template <bool TABLE, typename A>
__device__ __forceinline__ void forward_layer(const ChainParams<A>& p, int l, const A* in, A* out,
                                              int tp, int ld) {
  const LayerDesc& d = p.layer[l];
  const A* bias = d.has_bias ? p.B + d.b_off : nullptr;
  const int32_t* rows = TABLE ? p.table + (l == 0 ? p.x_rows_off : p.layer[l - 1].g_off)
                              : input_rows(p, l);
  grouped_rows<false, A, TABLE>(in, ld, rows, p.W + d.w_off, d.n, 1, bias, d.cout, d.m, d.n,
                                out, static_cast<const int32_t*>(nullptr),
                                layer_tile_arg(p, tp));
}

// ---------------------------------------------------------------------------------------------
// Shared-memory plan
// ---------------------------------------------------------------------------------------------
// Backward rows (chain_limits.h) of a chain's parameters.
template <typename A>
inline int64_t backward_rows(const ChainParams<A>& p, bool store_all) {
  int64_t middle = 0;
  for (int l = 1; l < p.L; ++l) middle += p.layer[l].cin;
  return backward_rows(p.c0, p.cmax, middle, p.L, store_all);
}

template <typename A>
inline size_t backward_smem_bytes(const ChainParams<A>& p, bool store_all, int tp) {
  return backward_smem_bytes(backward_rows(p, store_all), tp, sizeof(A));
}

struct DeviceInfo {
  int sm_count;
  int smem_optin;   // max dynamic shared memory per block (opt-in)
  int smem_per_sm;  // shared memory per multiprocessor
  int cc_major;     // compute capability (major)
  int l2_bytes;     // L2 cache size (0: unknown; the backward's tile rule then ignores it)
  int max_ctas;     // cap of the tensor-core forward's CTAs per SM (0: none)
  int l2_prefetch;  // a kernel may prefetch its next tile into L2 (1) or not (0)
  int narrow_items;  // 1: the CUDA-core layer items take 4 positions only, no items of 8
};

inline cudaError_t query_device(int device, DeviceInfo* info) {
  info->max_ctas = 0;
  info->l2_prefetch = 1;
  info->narrow_items = 0;
  cudaError_t e = cudaDeviceGetAttribute(&info->sm_count, cudaDevAttrMultiProcessorCount, device);
  if (e != cudaSuccess) return e;
  e = cudaDeviceGetAttribute(&info->cc_major, cudaDevAttrComputeCapabilityMajor, device);
  if (e != cudaSuccess) return e;
  e = cudaDeviceGetAttribute(&info->smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (e != cudaSuccess) return e;
  e = cudaDeviceGetAttribute(&info->l2_bytes, cudaDevAttrL2CacheSize, device);
  if (e != cudaSuccess) return e;
  return cudaDeviceGetAttribute(&info->smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor,
                                device);
}

struct LaunchPlan {
  int tp = 0;         // positions per tile (0: does not fit)
  int ld = 0;
  int store_all = 1;  // backward: intermediates kept in shared memory
  bool prefetch = false;  // the next tile's x (backward: and dy) prefetched into L2
  bool narrow_items = false;  // the CUDA-core kernels' layer items: 4 positions only
  size_t smem = 0;
  int grid = 0;
  int64_t ntiles = 0;
};

// Register budget of the chain kernels. ptxas compiles a 256-thread CTA for at most 128
// registers per thread unless told otherwise, which fits the float32 / 16-bit kernels (113 to
// 128 registers on sm_80 / sm_90, no spills) and leaves two CTAs per SM; the float64
// kernels need more and spilled at 128, so they are compiled for one CTA per SM (255
// registers).
// `min_blocks` is the __launch_bounds__ minimum (0: none given); `ctas` is the CTA count per SM
// the tile chooser sizes shared memory for. tests/test_cuda_compile_nvcc.py asserts no spills.
template <typename A>
struct CtasPerSm {
  static constexpr int min_blocks = sizeof(A) > 4 ? 1 : 0;
  static constexpr int ctas = sizeof(A) > 4 ? 1 : 2;
};

// Dynamic shared memory a CTA may take so that `ctas` CTAs fit on an SM (1 KB per CTA reserved
// by the runtime; at most the opt-in limit).
inline size_t cta_smem_budget(const DeviceInfo& dev, int ctas) {
  const int share = dev.smem_per_sm / ctas;
  return std::min(static_cast<size_t>(share > 1024 ? share - 1024 : 0),
                  static_cast<size_t>(dev.smem_optin));
}

// Tile size choice (not yet tuned on a GPU): the largest TP whose shared memory leaves room for
// `ctas` CTAs per SM (cta_smem_budget), else the largest that fits one; halved (down to 16)
// while there are fewer tiles than SMs.
template <typename F>
inline int choose_tile(F bytes_for_tp, const DeviceInfo& dev, int64_t P, int min_tp, int ctas) {
  const size_t optin = static_cast<size_t>(dev.smem_optin);
  const size_t per_cta = cta_smem_budget(dev, ctas);
  int best = 0;
  for (int tp = kMaxTile; tp >= min_tp; tp /= 2) {
    if (bytes_for_tp(tp) <= per_cta) {
      best = tp;
      break;
    }
  }
  if (best == 0) {
    for (int tp = kMaxTile; tp >= min_tp; tp /= 2) {
      if (bytes_for_tp(tp) <= optin) {
        best = tp;
        break;
      }
    }
  }
  while (best > 16 && (P + best - 1) / best < dev.sm_count) best /= 2;
  return best;
}

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------
#ifdef IGC_EMULATE
#define IGC_DECLARE_SMEM(name) unsigned char* name = igc_emu::block_smem()
#else
#define IGC_DECLARE_SMEM(name)                             \
  extern __shared__ __align__(16) unsigned char name##_[]; \
  unsigned char* name = name##_
#endif

// One L2 prefetch (prefetch.global.L2: the line holding addr is fetched into L2; nothing waits
// for it and no result depends on it).
__device__ __forceinline__ void prefetch_l2(const void* addr) {
#ifdef IGC_EMULATE
  igc_emu::prefetch_l2(addr);
#else
  asm volatile("prefetch.global.L2 [%0];" ::"l"(addr));
#endif
}

// Prefetch into L2 the channels of positions p0 .. p0 + n - 1 of t that a tile load reads, one
// prefetch per 128-byte line they touch, each at an address of one of those elements: where
// the positions are one run of consecutive elements (NCHW rows), the run of channel index[c]
// (c without an index) for c < C, a thread per c; where the channels of a position are
// consecutive (channels-last), the lines of its C_t channels (all of them: with an index, those
// it skips too), a warp per position; otherwise none (the loads then come from DRAM).
template <typename S>
__device__ __forceinline__ void prefetch_tile_l2(const TensorArg<const S>& t, int64_t p0, int n,
                                                 int C, const int32_t* index, int C_t) {
  constexpr int64_t kLine = 128;
  constexpr int64_t es = sizeof(S);
  const char* const base = reinterpret_cast<const char*>(t.ptr);
  // the first line from a (at a itself), then every line start before end
  const auto lines = [](const char* a, const char* end, int first, int step) {
    const char* l = a - (reinterpret_cast<uintptr_t>(a) & (kLine - 1)) + first * kLine;
    for (; l < end; l += step * kLine) prefetch_l2(l > a ? l : a);
  };
  if (t.ix.run_is_contiguous(p0, n)) {
    const char* const first = base + t.ix.offset(p0) * es;
    for (int c = threadIdx.x; c < C; c += kThreads) {
      const char* a = first + (index != nullptr ? index[c] : c) * t.cs * es;
      lines(a, a + n * es, 0, 1);
    }
  } else if (t.cs == 1) {
    const int lane = threadIdx.x % 32;
    for (int q = threadIdx.x / 32; q < n; q += kThreads / 32) {
      const char* a = base + t.ix.offset(p0 + q) * es;
      lines(a, a + C_t * es, lane, 32);
    }
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads, CtasPerSm<A>::min_blocks)
    chain_forward_kernel(const ChainParams<A> p, const TensorArg<const T> x, const TensorArg<T> y,
                         int64_t P, int tp, int ld, int prefetch) {
  IGC_DECLARE_SMEM(smem);
  // The buffers, the offsets and the last layer's row map are recomputed from the parameters
  // where they are used rather than kept across the layers' calls: the layer function takes
  // most registers, and values kept across its calls had spilled (20 bytes on sm_90).
  const auto buffer = [&](int i) {
    return reinterpret_cast<A*>(smem) + i * static_cast<int64_t>(p.cmax) * ld;
  };
  const auto offsets = [&](int i) { return reinterpret_cast<int64_t*>(buffer(2)) + i * tp; };
  const int32_t* index = p.has_index ? p.table + p.index_off : nullptr;
  for (int64_t tile = blockIdx.x; tile * tp < P; tile += gridDim.x) {
    const int64_t p0 = tile * tp;
    const int tvalid = static_cast<int>(min64(tp, P - p0));
    __syncthreads();  // the previous tile's store has read the buffers and offsets
    tile_offsets(x.ix, p0, tvalid, offsets(0));
    tile_offsets(y.ix, p0, tvalid, offsets(1));
    __syncthreads();
    load_tile(x.ptr, x.cs, offsets(0), x.ix.run_is_contiguous(p0, tvalid), tvalid, tp, p.c0,
              index, static_cast<const int32_t*>(nullptr), buffer(0), ld);
    if (prefetch && (tile + gridDim.x) * tp < P) {  // the next tile's x, into L2
      const int64_t pn = (tile + gridDim.x) * tp;
      prefetch_tile_l2(x, pn, static_cast<int>(min64(tp, P - pn)), p.c0, index, p.c_in);
    }
    __syncthreads();
    int cur = 0;
    for (int l = 0; l < p.L; ++l) {
      forward_layer<true>(p, l, buffer(cur), buffer(cur ^ 1), tp, ld);
      __syncthreads();
      cur ^= 1;
    }
    const LayerDesc& last = p.layer[p.L - 1];
    store_tile(y.ptr, y.cs, offsets(1), y.ix.run_is_contiguous(p0, tvalid), tvalid, tp, last.cout,
               last.gather_identity ? nullptr : p.table + last.g_off,
               static_cast<const int32_t*>(nullptr), static_cast<const int32_t*>(nullptr),
               buffer(cur), ld);
  }
}

struct BackwardFlags {
  int need_x, need_w, need_b;
  int store_all;
  // tensor-core backward (chain_mma_backward.cuh): x and dy share one tile, x reloaded for
  // layer 1's weight gradient (set by launch_backward_mma from its plan)
  int reload_x = 0;
  // both backwards: x and dy of the CTA's next tile prefetched into L2 (set by the launchers
  // from their plans)
  int prefetch = 0;
};


// partial: [gridDim.x, num_w + num_b] accumulation-type partial sums (weights, then biases);
// dx_starts / dx_order: CSR of the input index (dx channel c sums dh_0 rows
// dx_order[dx_starts[c] .. dx_starts[c+1]-1]); null without an input index.
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads, CtasPerSm<A>::min_blocks)
    chain_backward_kernel(const ChainParams<A> p, const TensorArg<const T> x,
                          const TensorArg<const T> dy, const TensorArg<T> dx,
                          const int32_t* __restrict__ dx_starts,
                          const int32_t* __restrict__ dx_order, A* __restrict__ partial,
                          const BackwardFlags f, int64_t P, int tp, int ld) {
  IGC_DECLARE_SMEM(smem);
  const int L = p.L;
  const int64_t cm = static_cast<int64_t>(p.cmax) * ld;
  A* X = reinterpret_cast<A*>(smem);
  A* next = X + static_cast<int64_t>(p.c0) * ld;
  A* ubase = next;  // store-all: u_1 .. u_{L-1} back to back; recompute: two scratch buffers
  if (f.store_all) {
    for (int l = 1; l < L; ++l) next += static_cast<int64_t>(p.layer[l].cin) * ld;
  } else if (L > 1) {
    next += 2 * cm;
  }
  A* D[2] = {next, next + cm};
  int64_t* off_x = reinterpret_cast<int64_t*>(next + 2 * cm);
  int64_t* off_dy = off_x + tp;
  int64_t* off_dx = off_dy + tp;

  const int64_t row_len = p.num_w + p.num_b;
  A* part = partial ? partial + static_cast<int64_t>(blockIdx.x) * row_len : nullptr;
  if (part != nullptr)
    for (int64_t e = threadIdx.x; e < row_len; e += kThreads) part[e] = A(0);

  const int32_t* index = p.has_index ? p.table + p.index_off : nullptr;
  const LayerDesc& last = p.layer[L - 1];
  const int32_t* dy_rows = last.gather_identity ? nullptr : p.table + last.g_off;
  const int64_t ntiles = (P + tp - 1) / tp;

  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const int64_t p0 = tile * tp;
    const int tvalid = static_cast<int>(min64(tp, P - p0));
    __syncthreads();  // previous tile done with every buffer (and the partial row zeroed)
    tile_offsets(x.ix, p0, tvalid, off_x);
    tile_offsets(dy.ix, p0, tvalid, off_dy);
    if (f.need_x) tile_offsets(dx.ix, p0, tvalid, off_dx);
    __syncthreads();
    load_tile(x.ptr, x.cs, off_x, x.ix.run_is_contiguous(p0, tvalid), tvalid, tp, p.c0, index,
              static_cast<const int32_t*>(nullptr), X, ld);
    // du_L in natural (u) row order: dy channel j goes to row gather_{L-1}[j]
    load_tile(dy.ptr, dy.cs, off_dy, dy.ix.run_is_contiguous(p0, tvalid), tvalid, tp, last.cout,
              static_cast<const int32_t*>(nullptr), dy_rows, D[0], ld);
    if (f.prefetch && tile + gridDim.x < ntiles) {  // the next tile's x and dy, into L2
      const int64_t pn = (tile + gridDim.x) * tp;
      const int nn = static_cast<int>(min64(tp, P - pn));
      prefetch_tile_l2(x, pn, nn, p.c0, index, p.c_in);
      prefetch_tile_l2(dy, pn, nn, last.cout, nullptr, last.cout);
    }
    __syncthreads();
    if (f.store_all) {  // u_1 .. u_{L-1}
      A* u = ubase;
      const A* in = X;
      for (int l = 0; l + 1 < L; ++l) {
        forward_layer<false>(p, l, in, u, tp, ld);
        __syncthreads();
        in = u;
        u += static_cast<int64_t>(p.layer[l].cout) * ld;
      }
    }
    int cur = 0;
    for (int l = L - 1; l >= 0; --l) {
      const LayerDesc& d = p.layer[l];
      // h_l: the x tile, or u_l read through gather_{l-1}
      const A* h = X;
      if (l > 0) {
        if (f.store_all) {
          h = ubase;
          for (int k = 1; k < l; ++k) h += static_cast<int64_t>(p.layer[k].cin) * ld;
        } else {  // recompute u_1 .. u_l into the scratch pair; u_k lands in scratch[(k-1) & 1]
          for (int k = 0; k < l; ++k) {
            const A* in = k == 0 ? X : ubase + ((k - 1) & 1) * cm;
            forward_layer<false>(p, k, in, ubase + (k & 1) * cm, tp, ld);
            __syncthreads();
          }
          h = ubase + ((l - 1) & 1) * cm;
        }
      }
      const int32_t* h_rows = input_rows(p, l);
      const A* du = D[cur];
      if (f.need_b && d.has_bias) {
        A* pb = part + p.num_w + d.b_off;
        for (int o = threadIdx.x; o < d.cout; o += kThreads) {
          const A* r = du + static_cast<int64_t>(o) * ld;
          A s = A(0);
          for (int q = 0; q < tp; q += 4) {
            const V4<A> v = lds4(r + q);
            s += (v.x + v.y) + (v.z + v.w);
          }
          pb[o] += s;
        }
      }
      // (the blocks' index divisions by multiplication, div_by_magic, need nb bn and cout m
      // below 2^32: every chain whose tiles fit shared memory)
      if (std::is_same<A, float>::value && f.need_w && d.m % 2 == 0 && d.n % 4 == 0 &&
          static_cast<int64_t>(d.cout / 2) * (d.n / 4) * (d.n / 4) < (int64_t{1} << 32) &&
          static_cast<int64_t>(d.cout) * d.m < (int64_t{1} << 32)) {
        // (float: the float64 kernel, at the register limit, keeps the loop below)
        // blocks of 2 outputs x 4 inputs of a group per thread: 6 activation loads per 32
        // multiply-adds (one element per thread: 2 per 4), one FFMA each, positions in order
        // from vector ob % 8 of the tile, wrapping (tiles are powers of two), which spreads the
        // rows of a warp's blocks over the banks.
        A* pw = part + d.w_off;
        const int bn = d.n / 4, nb = d.cout / 2 * bn, nq = tp / 4;
        const unsigned mbn = div_magic(bn), mm = div_magic(d.m);  // b / bn, o0 / m
        for (int b = threadIdx.x; b < nb; b += kThreads) {
          const int ob = div_by_magic(b, mbn), o0 = 2 * ob, i0 = 4 * (b - ob * bn);
          const int hi0 = div_by_magic(o0, mm) * d.n + i0;
          const int ra = o0 * ld;  // output rows o0, o0 + 1
          int rb[4];               // input rows
#pragma unroll
          for (int k = 0; k < 4; ++k) rb[k] = (h_rows ? h_rows[hi0 + k] : hi0 + k) * ld;
          A acc[2][4];
#pragma unroll
          for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int k = 0; k < 4; ++k) acc[j][k] = A(0);
          for (int sq = 0, qv = ob & 7; sq < nq; ++sq, ++qv) {
            const int q = 4 * (qv & (nq - 1));
            V4<A> vb[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) vb[k] = lds4(h + rb[k] + q);
#pragma unroll
            for (int j = 0; j < 2; ++j) {
              const V4<A> va = lds4_shared(du, ra + j * ld + q);
#pragma unroll
              for (int k = 0; k < 4; ++k) {
                acc[j][k] += va.x * vb[k].x;
                acc[j][k] += va.y * vb[k].y;
                acc[j][k] += va.z * vb[k].z;
                acc[j][k] += va.w * vb[k].w;
              }
            }
          }
#pragma unroll
          for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int k = 0; k < 4; ++k) pw[(o0 + j) * d.n + i0 + k] += acc[j][k];
        }
      } else if (f.need_w) {
        A* pw = part + d.w_off;
        const int ne = d.cout * d.n;
        for (int e = threadIdx.x; e < ne; e += kThreads) {
          const int o = e / d.n, i = e - o * d.n;
          const int hi = (o / d.m) * d.n + i;
          const A* a = du + static_cast<int64_t>(o) * ld;
          const A* b = h + static_cast<int64_t>(h_rows ? h_rows[hi] : hi) * ld;
          A s = A(0);
          for (int q = 0; q < tp; q += 4) {
            const V4<A> va = lds4(a + q), vb = lds4(b + q);
            s += (va.x * vb.x + va.y * vb.y) + (va.z * vb.z + va.w * vb.w);
          }
          pw[e] += s;
        }
      }
      if (l > 0 || f.need_x) {
        // dh_l = W_l^T du_l; entry j lands in row gather_{l-1}[j] (du of the layer below, in
        // natural order), or row j for l == 0
        grouped_rows<true>(du, ld, static_cast<const int32_t*>(nullptr), p.W + d.w_off, 1, d.n,
                     static_cast<const A*>(nullptr), d.cin, d.n, d.m, D[cur ^ 1], h_rows,
                     layer_tile_arg(p, tp));
        cur ^= 1;
      }
      __syncthreads();
    }
    if (f.need_x) {
      const int cx = p.has_index ? p.c_in : p.c0;
      store_tile(dx.ptr, dx.cs, off_dx, dx.ix.run_is_contiguous(p0, tvalid), tvalid, tp, cx,
                 static_cast<const int32_t*>(nullptr), dx_starts, dx_order, D[cur], ld);
    }
  }
}

// out[e] = sum over CTA rows r = 0, 1, ... of partial[r][e], in that order.
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
    reduce_partials_kernel(const A* __restrict__ partial, int64_t rows, int64_t row_len,
                           int64_t num_w, T* __restrict__ gw, T* __restrict__ gb) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < row_len;
       e += stride) {
    A s = A(0);
    for (int64_t r = 0; r < rows; ++r) s += partial[r * row_len + e];
    if (e < num_w) {
      if (gw != nullptr) gw[e] = Cvt<T>::store(s);
    } else if (gb != nullptr) {
      gb[e - num_w] = Cvt<T>::store(s);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host: plans and launches (torch-free; errors are returned, the caller checks them)
// ---------------------------------------------------------------------------------------------
#ifdef IGC_EMULATE
#define IGC_LAUNCH(kernel, grid, smem, stream, ...) \
  ((void)(stream), igc_emu::launch(kernel, dim3(grid), dim3(kThreads), smem, __VA_ARGS__))
#else
#define IGC_LAUNCH(kernel, grid, smem, stream, ...) \
  kernel<<<dim3(grid), dim3(kThreads), smem, stream>>>(__VA_ARGS__)
#endif

inline int blocks_for(int64_t n, int max_blocks) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(b < 1 ? 1 : (b > max_blocks ? max_blocks : b));
}

inline cudaError_t launch_build_index_table(const HostChain& h, int32_t* table,
                                            cudaStream_t stream) {
  const int64_t total = index_table_size(h);
  if (total == 0) return cudaSuccess;
  const IndexTableArgs a = make_index_table_args(h);
  IGC_LAUNCH(build_index_table_kernel, blocks_for(total, 1024), 0, stream, a, table, total);
  return cudaGetLastError();
}

// Whether a backward that runs one CTA per SM prefetches its next tile (tile_bytes of x and dy)
// into L2: allowed (DeviceInfo::l2_prefetch), the L2 size known, and the CTAs' partial rows
// (row_bytes each) and those tiles within three quarters of it (the margin of the tensor-core
// backward's wide-tile rule, mma_backward_wide_tile).
inline bool l2_prefetch_fits(const DeviceInfo& dev, int64_t row_bytes, int64_t tile_bytes) {
  return dev.l2_prefetch != 0 && dev.l2_bytes > 0 &&
         4 * dev.sm_count * (row_bytes + tile_bytes) <= 3 * int64_t{dev.l2_bytes};
}

// Whether the fp32 weight-gradient rows (row_bytes each) of `ctas` CTAs per SM exceed three
// quarters of the L2 (the margin of the tensor-core backward's wide-tile rule,
// mma_backward_wide_tile): every tile reads and writes its CTA's whole row, so rows that do not
// stay in L2 go through DRAM once per tile. False where the L2 size is unknown.
inline bool partial_rows_exceed_l2(const DeviceInfo& dev, int ctas, int64_t row_bytes) {
  return dev.l2_bytes > 0 &&
         4 * (ctas * static_cast<int64_t>(dev.sm_count) * row_bytes) > 3 * int64_t{dev.l2_bytes};
}

template <typename K>
inline cudaError_t configure(K kernel, size_t smem, int* occupancy) {
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(smem));
  if (e != cudaSuccess) return e;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(occupancy, kernel, kThreads, smem);
}

template <typename T, typename A>
inline cudaError_t plan_forward(const ChainParams<A>& p, int64_t P, const DeviceInfo& dev,
                                LaunchPlan* plan) {
  plan->tp = choose_tile([&](int tp) { return forward_smem_bytes(p.cmax, tp, sizeof(A)); }, dev,
                         P, kMinTile, CtasPerSm<A>::ctas);
  if (plan->tp == 0) return cudaSuccess;  // caller reports "does not fit"
  plan->ld = tile_ld(plan->tp);
  plan->smem = forward_smem_bytes(p.cmax, plan->tp, sizeof(A));
  plan->ntiles = (P + plan->tp - 1) / plan->tp;
  int occ = 0;
  const cudaError_t e = configure(chain_forward_kernel<T, A>, plan->smem, &occ);
  if (e != cudaSuccess) return e;
  if (occ < 1) occ = 1;
  plan->grid = static_cast<int>(min64(plan->ntiles, static_cast<int64_t>(dev.sm_count) * occ));
  // the CTAs prefetch their next tile's x into L2 where those tiles fit (l2_prefetch_fits)
  plan->prefetch = l2_prefetch_fits(
      dev, 0, occ * static_cast<int64_t>(plan->tp) * p.c_in * static_cast<int64_t>(sizeof(T)));
  plan->narrow_items = dev.narrow_items != 0;
  return cudaSuccess;
}

template <typename T, typename A>
inline cudaError_t launch_forward(const ChainParams<A>& p, const TensorArg<const T>& x,
                                  const TensorArg<T>& y, int64_t P, const LaunchPlan& plan,
                                  cudaStream_t stream) {
  if (plan.tp < kMinTile || plan.tp % 4 != 0 || plan.grid < 1) return cudaErrorInvalidValue;
  ChainParams<A> q = p;
  q.narrow_items = plan.narrow_items ? 1 : 0;
  IGC_LAUNCH((chain_forward_kernel<T, A>), plan.grid, plan.smem, stream, q, x, y, P, plan.tp,
             plan.ld, plan.prefetch ? 1 : 0);
  return cudaGetLastError();
}

// The backward's tile and mode for `ctas` CTAs per SM (choose_tile's rule): store-all with
// TP >= 16 where it fits; else the mode whose tile gives more positions per SM (the tile times
// the CTAs, `ctas` or 1, whose shared memory fits), store-all on a tie (the same tile without
// recomputing the intermediates; recompute mode, two scratch buffers, takes fewer rows than
// store-all only from four layers of equal widths on). 0: nothing fits.
template <typename A>
inline int choose_backward_tile(const ChainParams<A>& p, const DeviceInfo& dev, int64_t P,
                                int ctas, int* store_all) {
  auto tile = [&](bool all, int min_tp) {
    return choose_tile([&](int tp) { return backward_smem_bytes(p, all, tp); }, dev, P, min_tp,
                       ctas);
  };
  *store_all = 1;
  const int tp = tile(true, 16);
  if (tp != 0) return tp;
  auto per_sm = [&](bool all, int t) {
    return t * (backward_smem_bytes(p, all, t) <= cta_smem_budget(dev, ctas) ? ctas : 1);
  };
  const int all = tile(true, kMinTile);
  const int rec = p.L > 1 ? tile(false, kMinTile) : 0;
  if (rec != 0 && (all == 0 || per_sm(false, rec) > per_sm(true, all))) {
    *store_all = 0;
    return rec;
  }
  return all;
}

// Backward plan: choose_backward_tile for the CTAs per SM the registers allow. The number of
// CTAs (rows of the partial buffer) is capped by kMaxPartialBytes. Where the partial rows of
// the CTAs that fit an SM would exceed the L2 but one CTA's fit (partial_rows_exceed_l2), one
// CTA per SM with the tile chosen for one CTA, its shared memory request raised past two CTAs'
// share (IGCV2(1024, 16) and (1024, 32) in float32, whose rows of 192 and 256 KiB at two CTAs
// per SM take 50 and 66 MiB: tiles of 4 and 8 positions, store-all). A lone CTA per SM
// prefetches its next tile's x and dy into L2 where the CTAs' partial rows and those tiles take
// at most three quarters of the L2 (l2_prefetch_fits).
template <typename T, typename A>
inline cudaError_t plan_backward(const ChainParams<A>& p, int64_t P, bool need_grads_wb,
                                 const DeviceInfo& dev, LaunchPlan* plan) {
  // the tile, its mode and shared memory for `ctas` CTAs per SM
  const auto set_tile = [&](int ctas) {
    plan->tp = choose_backward_tile(p, dev, P, ctas, &plan->store_all);
    plan->ld = tile_ld(plan->tp);
    plan->smem = backward_smem_bytes(p, plan->store_all != 0, plan->tp);
    plan->ntiles = plan->tp > 0 ? (P + plan->tp - 1) / plan->tp : 0;
  };
  set_tile(CtasPerSm<A>::ctas);
  if (plan->tp == 0) return cudaSuccess;
  const int64_t row_bytes =
      need_grads_wb ? (p.num_w + p.num_b) * static_cast<int64_t>(sizeof(A)) : 0;
  int occ = 0;
  cudaError_t e = configure(chain_backward_kernel<T, A>, plan->smem, &occ);
  if (e != cudaSuccess) return e;
  if (occ > 1 && row_bytes > 0 && partial_rows_exceed_l2(dev, occ, row_bytes) &&
      !partial_rows_exceed_l2(dev, 1, row_bytes) &&
      cta_smem_budget(dev, 2) + 16 <= static_cast<size_t>(dev.smem_optin)) {
    set_tile(1);  // (one CTA fits whatever two did: the tile is at least as long)
    plan->smem = std::max(plan->smem, cta_smem_budget(dev, 2) + 16);
    e = configure(chain_backward_kernel<T, A>, plan->smem, &occ);
    if (e != cudaSuccess) return e;
  }
  if (occ < 1) occ = 1;
  int64_t grid = min64(plan->ntiles, static_cast<int64_t>(dev.sm_count) * occ);
  if (row_bytes > 0) grid = min64(grid, std::max<int64_t>(1, kMaxPartialBytes / row_bytes));
  plan->grid = static_cast<int>(grid);
  plan->prefetch = occ == 1 && l2_prefetch_fits(dev, row_bytes,
                                                plan->tp * (p.c_in + p.layer[p.L - 1].cout) *
                                                    static_cast<int64_t>(sizeof(T)));
  plan->narrow_items = dev.narrow_items != 0;
  return cudaSuccess;
}

// partial: plan.grid rows of (num_w + num_b) accumulation-type elements when weight or bias
// gradients are requested (else null); gw / gb: num_w / num_b outputs, or null when not needed.
template <typename T, typename A>
inline cudaError_t launch_backward(const ChainParams<A>& p, const TensorArg<const T>& x,
                                   const TensorArg<const T>& dy, const TensorArg<T>& dx,
                                   const int32_t* dx_starts, const int32_t* dx_order, A* partial,
                                   T* gw, T* gb, BackwardFlags f, int64_t P,
                                   const LaunchPlan& plan, cudaStream_t stream) {
  if (plan.tp < kMinTile || plan.tp % 4 != 0 || plan.grid < 1) return cudaErrorInvalidValue;
  if ((f.need_w || f.need_b) && partial == nullptr) return cudaErrorInvalidValue;
  if (p.has_index && f.need_x && (dx_starts == nullptr || dx_order == nullptr))
    return cudaErrorInvalidValue;
  f.store_all = plan.store_all;
  f.prefetch = plan.prefetch ? 1 : 0;
  ChainParams<A> q = p;
  q.narrow_items = plan.narrow_items ? 1 : 0;
  IGC_LAUNCH((chain_backward_kernel<T, A>), plan.grid, plan.smem, stream, q, x, dy, dx,
             dx_starts, dx_order, (f.need_w || f.need_b) ? partial : static_cast<A*>(nullptr),
             f, P, plan.tp, plan.ld);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess || !(f.need_w || f.need_b)) return e;
  const int64_t row_len = p.num_w + p.num_b;
  IGC_LAUNCH((reduce_partials_kernel<T, A>), blocks_for(row_len, 4096), 0, stream,
             static_cast<const A*>(partial), static_cast<int64_t>(plan.grid), row_len, p.num_w,
             f.need_w ? gw : static_cast<T*>(nullptr), f.need_b ? gb : static_cast<T*>(nullptr));
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace igc
