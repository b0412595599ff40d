// Limits of the fused CUDA kernels, shared by the device code (chain_kernels.cuh), its launcher
// and the Python backend (through igc_kernels._C, which compiles this header on every build,
// with or without CUDA): plain C++, free of torch and of CUDA headers.
//
// Shared memory. A tile of TP positions of one layer is a [channels][tile_ld(TP)] array in the
// accumulation type. The forward keeps two such buffers of the widest layer; the backward keeps
// the x tile, two gradient buffers of the widest layer, and either every intermediate
// u_1 .. u_{L-1} ("store-all") or two scratch buffers of the widest layer ("recompute"), plus
// 64-bit position offsets. A chain runs when the smallest plan (tiles of kMinTile positions,
// whichever backward mode is smaller) fits in a block's opt-in shared memory.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define IGC_HOST_DEVICE __host__ __device__
#else
#define IGC_HOST_DEVICE
#endif

namespace igc {
namespace cuda {

constexpr int kMaxLayers = 32;  // layers a chain may have (kernel parameters are fixed-size)
constexpr int kMaxTile = 128;   // positions per tile, largest
constexpr int kMinTile = 4;     // positions per tile, smallest (one 4-wide vector)

// Row length of a tile buffer: TP plus 4 elements, so that rows start 4 banks apart (float4
// reads of consecutive rows by 8 lanes then hit 32 distinct banks); TP alone for TP < 8.
IGC_HOST_DEVICE inline int tile_ld(int tp) { return tp >= 8 ? tp + 4 : tp; }

inline size_t forward_smem_bytes(int64_t cmax, int tp, size_t acc_size) {
  return static_cast<size_t>(2 * cmax) * tile_ld(tp) * acc_size + 2 * tp * sizeof(int64_t);
}

// Rows of the backward's buffers: c0 (x tile) + 2 cmax (gradients) + the intermediates
// (store-all: their widths' sum; recompute: two scratch buffers of cmax rows, when L > 1).
inline int64_t backward_rows(int64_t c0, int64_t cmax, int64_t middle_sum, int L,
                             bool store_all) {
  int64_t rows = c0 + 2 * cmax;
  if (store_all) {
    rows += middle_sum;
  } else if (L > 1) {
    rows += 2 * cmax;
  }
  return rows;
}

inline size_t backward_smem_bytes(int64_t rows, int tp, size_t acc_size) {
  return static_cast<size_t>(rows) * tile_ld(tp) * acc_size + 3 * tp * sizeof(int64_t);
}

// The shared memory (bytes) of the smallest plan for channels C[0..L] (C[0] = the chain's first
// width) with accumulation type of acc_size bytes: forward and backward both need this much.
inline size_t min_smem_bytes(const int64_t* C, int L, size_t acc_size) {
  int64_t cmax = 0, middle = 0;
  for (int l = 0; l <= L; ++l) cmax = C[l] > cmax ? C[l] : cmax;
  for (int l = 1; l < L; ++l) middle += C[l];
  const size_t fwd = forward_smem_bytes(cmax, kMinTile, acc_size);
  const size_t all = backward_smem_bytes(backward_rows(C[0], cmax, middle, L, true), kMinTile,
                                         acc_size);
  const size_t rec = backward_smem_bytes(backward_rows(C[0], cmax, middle, L, false), kMinTile,
                                         acc_size);
  const size_t bwd = all < rec ? all : rec;
  return fwd > bwd ? fwd : bwd;
}

}  // namespace cuda
}  // namespace igc
