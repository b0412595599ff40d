// block_forward's kernels for float32 (block_kernels.h), in a file of their own so that the
// build compiles the dtypes in parallel.
#define IGC_BLOCK_DTYPE(M) M(float, float, f32)
#include "block_kernels.h"
