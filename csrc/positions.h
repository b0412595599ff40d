// Positions -> element offsets, shared by the CPU kernels and the (torch-free) CUDA device code.
//
// A tensor (N, C, *spatial) is addressed by a linear position index p, row-major over
// (N, *spatial); the channel dim is not part of it. Size-1 dims are dropped and adjacent dims
// that are contiguous with respect to each other are merged, so a contiguous NCHW tensor has
// two position dims (N, H*W) and a channels-last one a single dim.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define IGC_POS_FN __host__ __device__ __forceinline__
#else
#define IGC_POS_FN inline __attribute__((always_inline))
#endif

namespace igc {

constexpr int kMaxPosDims = 4;  // N and up to 3 spatial dims

struct PosIndexer {
  int nd = 1;
  int64_t size[kMaxPosDims] = {1, 1, 1, 1};
  int64_t stride[kMaxPosDims] = {0, 0, 0, 0};

  IGC_POS_FN int64_t offset(int64_t p) const {
    int64_t off = 0;
    for (int d = nd - 1; d > 0; --d) {
      const int64_t q = p / size[d];
      off += (p - q * size[d]) * stride[d];
      p = q;
    }
    return off + p * stride[0];
  }
  // Whether positions p0 .. p0 + count - 1 are consecutive elements (stride 1).
  IGC_POS_FN bool run_is_contiguous(int64_t p0, int count) const {
    const int64_t inner = size[nd - 1];
    return stride[nd - 1] == 1 && (p0 % inner) + count <= inner;
  }
};

// The indexer of a tensor with `dim` dims (dim 1, the channels, is skipped).
inline PosIndexer make_pos_indexer(int dim, const int64_t* sizes, const int64_t* strides) {
  int64_t sz[kMaxPosDims], st[kMaxPosDims];
  int nd = 0;
  for (int d = 0; d < dim; ++d) {
    if (d == 1 || sizes[d] == 1) continue;
    sz[nd] = sizes[d];
    st[nd] = strides[d];
    ++nd;
  }
  if (nd == 0) {
    sz[0] = 1;
    st[0] = 0;
    nd = 1;
  }
  int out = 0;
  for (int d = 1; d < nd; ++d) {
    if (st[out] == st[d] * sz[d]) {
      sz[out] *= sz[d];
      st[out] = st[d];
    } else {
      ++out;
      sz[out] = sz[d];
      st[out] = st[d];
    }
  }
  PosIndexer ix;
  ix.nd = out + 1;
  for (int d = 0; d < ix.nd; ++d) {
    ix.size[d] = sz[d];
    ix.stride[d] = st[d];
  }
  return ix;
}

}  // namespace igc
