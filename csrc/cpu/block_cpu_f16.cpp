// block_forward's kernels for float16 (block_kernels.h), in a file of their own so that the
// build compiles the dtypes in parallel.
#define IGC_BLOCK_DTYPE(M) M(c10::Half, float, f16)
#include "block_kernels.h"
