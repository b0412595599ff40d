// The CPU block kernel's declarations shared by its files: block_cpu.cpp checks the arguments
// (check_block) and calls the kernels of x's dtype, block_forward_<suffix>, each compiled in
// its own file (block_cpu_<suffix>.cpp, from block_kernels.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "chain_args.h"
#include "tiles.h"

namespace igc {

// Largest k of a spatial layer (k x k, k odd).
constexpr int64_t kMaxKernel = 7;

// A checked block: the chain's description and its spatial layer (sl < 0: none; k x k, stride s).
struct BlockDesc {
  ChainDesc d;
  int64_t sl = -1, k = 1, s = 1;
};

// block_forward on one dtype: bd from check_block, y allocated (H, Wd: x's spatial size; Ho,
// Wo: y's; 1 without a spatial layer); packed: the channels-last weights (block_pack) or null.
#define IGC_DECLARE_BLOCK_FORWARD(scalar_t, acc_t, suffix)                                      \
  void block_forward_##suffix(const BlockDesc& bd, const at::Tensor& x, at::TensorList weights, \
                              at::TensorList biases, at::IntArrayRef activations,              \
                              bool residual, const std::vector<at::Tensor>* packed,             \
                              const at::Tensor& y, int64_t H, int64_t Wd, int64_t Ho,            \
                              int64_t Wo)
#define IGC_DECLARE_BLOCK_FORWARD_STMT(scalar_t, acc_t, suffix) \
  IGC_DECLARE_BLOCK_FORWARD(scalar_t, acc_t, suffix);
IGC_FOR_EACH_CPU_DTYPE(IGC_DECLARE_BLOCK_FORWARD_STMT)
#undef IGC_DECLARE_BLOCK_FORWARD_STMT

}  // namespace igc
