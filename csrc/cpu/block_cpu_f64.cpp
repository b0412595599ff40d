// block_forward's kernels for float64 (block_kernels.h), in a file of their own so that the
// build compiles the dtypes in parallel.
#define IGC_BLOCK_DTYPE(M) M(double, double, f64)
#include "block_kernels.h"
