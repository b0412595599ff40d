// block_forward's kernels for bfloat16 (block_kernels.h), in a file of their own so that the
// build compiles the dtypes in parallel.
#define IGC_BLOCK_DTYPE(M) M(c10::BFloat16, float, bf16)
#include "block_kernels.h"
