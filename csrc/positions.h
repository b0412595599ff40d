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

  // The innermost dim's size and stride (= size[nd - 1], stride[nd - 1]), kept apart.
  int64_t inner_size = 1;
  int64_t inner_stride = 0;

  // Every access below uses constant indices (a case per dim count): indexing size / stride
  // with a run-time value makes the CUDA compiler copy the whole indexer, a kernel argument,
  // into local memory and read it from there.
  IGC_POS_FN int64_t offset(int64_t p) const {
    int64_t off = 0;
    switch (nd) {
      case 4: {
        const int64_t q = p / size[3];
        off += (p - q * size[3]) * stride[3];
        p = q;
      }
        [[fallthrough]];
      case 3: {
        const int64_t q = p / size[2];
        off += (p - q * size[2]) * stride[2];
        p = q;
      }
        [[fallthrough]];
      case 2: {
        const int64_t q = p / size[1];
        off += (p - q * size[1]) * stride[1];
        p = q;
      }
        [[fallthrough]];
      default:
        break;
    }
    return off + p * stride[0];
  }
  // Whether every position stride is a multiple of m.
  IGC_POS_FN bool strides_multiple_of(int64_t m) const {
    bool ok = true;
#pragma unroll
    for (int d = 0; d < kMaxPosDims; ++d) ok = ok && (d >= nd || stride[d] % m == 0);
    return ok;
  }
  // Whether positions p0 .. p0 + count - 1 are consecutive elements (stride 1).
  IGC_POS_FN bool run_is_contiguous(int64_t p0, int count) const {
    return inner_stride == 1 && (p0 % inner_size) + count <= inner_size;
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
  ix.inner_size = sz[ix.nd - 1];
  ix.inner_stride = st[ix.nd - 1];
  return ix;
}

}  // namespace igc
