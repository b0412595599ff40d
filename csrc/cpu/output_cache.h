// A cache of the CPU kernels' large output buffers.
//
// A freshly allocated buffer of more than 32 MiB comes from mmap, and writing it page-faults
// every 4 KiB page (the kernel zeroes each one): for a network whose blocks each produce a
// (64, 416, 32, 32) float32 tensor, allocating and faulting the output took 26 ms of a 38 ms
// copy-sized pass (x.clone() 32 ms against copy_ into an existing tensor 6 ms, 2 threads).
// PyTorch's CPU allocator does not cache; this one keeps the buffers of freed outputs (exact
// sizes, rounded up to 2 MiB) for the next output of the same size, up to a byte limit
// (IGC_CPU_OUTPUT_CACHE_MB, default 1024; 0 turns the cache off). A buffer is reused only after
// the tensor that owned it is freed: nothing is aliased. Outputs under 1 MiB are plain
// at::empty_strided tensors (malloc's own free lists serve them).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <vector>

#include "../chain_args.h"

namespace igc {

// An uninitialised tensor of these sizes and strides (a dense layout) on the CPU.
at::Tensor cached_empty_strided(at::IntArrayRef sizes, at::IntArrayRef strides,
                                const at::TensorOptions& options);
// An uninitialised (N, channels, *spatial) output in the memory format the layout rule gives
// for outputs shaped like x (chain_args.h: out_is_channels_last), from the cache.
inline at::Tensor cached_output(const at::Tensor& x, int64_t channels,
                                const std::vector<int64_t>& spatial) {
  std::vector<int64_t> sizes{x.size(0), channels};
  sizes.insert(sizes.end(), spatial.begin(), spatial.end());
  const size_t nd = sizes.size();
  std::vector<int64_t> strides(nd);
  int64_t st = 1;
  if (out_is_channels_last(x)) {  // C innermost, then the spatial dims, then N
    strides[1] = st;
    st *= channels;
    for (size_t d = nd - 1; d >= 2; --d) {
      strides[d] = st;
      st *= sizes[d];
    }
    strides[0] = st;
  } else {
    for (size_t d = nd; d-- > 0;) {
      strides[d] = st;
      st *= sizes[d];
    }
  }
  return cached_empty_strided(sizes, strides, x.options());
}

// Bytes held by the cache now, and releasing them.
size_t cpu_output_cache_bytes();
void cpu_output_cache_clear();

}  // namespace igc
