// Explicit instantiations of every kernel and host launch function of chain_kernels.cuh for
// every supported dtype. Needs no torch headers: tests/test_cuda_compile_nvcc.py compiles it with
// `nvcc -c` for sm_80 and sm_90 on machines without a GPU. Not part of the extension build
// (chain_cuda.cu instantiates what it launches).
#include "chain_kernels.cuh"
#include "chain_mma.cuh"
#include "chain_mma_backward.cuh"

namespace igc {
namespace cuda {

#define IGC_INSTANTIATE(T, A)                                                                   \
  template __global__ void chain_forward_kernel<T, A>(const ChainParams<A>,                     \
                                                      const TensorArg<const T>,                 \
                                                      const TensorArg<T>, int64_t, int, int,    \
                                                      int);                                     \
  template __global__ void chain_backward_kernel<T, A>(                                         \
      const ChainParams<A>, const TensorArg<const T>, const TensorArg<const T>,                 \
      const TensorArg<T>, const int32_t*, const int32_t*, A*, const BackwardFlags, int64_t,     \
      int, int);                                                                                \
  template __global__ void reduce_partials_kernel<T, A>(const A*, int64_t, int64_t, int64_t,    \
                                                        T*, T*);                                \
  template cudaError_t plan_forward<T, A>(const ChainParams<A>&, int64_t, const DeviceInfo&,    \
                                          LaunchPlan*);                                         \
  template cudaError_t launch_forward<T, A>(const ChainParams<A>&, const TensorArg<const T>&,   \
                                            const TensorArg<T>&, int64_t, const LaunchPlan&,    \
                                            cudaStream_t);                                      \
  template cudaError_t plan_backward<T, A>(const ChainParams<A>&, int64_t, bool,                \
                                           const DeviceInfo&, LaunchPlan*);                     \
  template cudaError_t launch_backward<T, A>(                                                   \
      const ChainParams<A>&, const TensorArg<const T>&, const TensorArg<const T>&,              \
      const TensorArg<T>&, const int32_t*, const int32_t*, A*, T*, T*, BackwardFlags, int64_t,  \
      const LaunchPlan&, cudaStream_t);

IGC_INSTANTIATE(float, float)
IGC_INSTANTIATE(double, double)
IGC_INSTANTIATE(__half, float)
IGC_INSTANTIATE(__nv_bfloat16, float)
#undef IGC_INSTANTIATE

// the tensor-core forward: every element format and tile, two tiles, in place, and in place in
// the kWrap layout
#define IGC_FORWARD_MMA(F, MT, IP, W)                                                           \
  template __global__ void chain_forward_mma_kernel<F, MT, IP, W>(                              \
      const MmaParams, const TensorArg<const F::Storage>, const TensorArg<F::Storage>, int64_t);
// (float32, three or two planes: in place at most 32 positions, so not the 64-position in-place
// ones)
#define IGC_INSTANTIATE_MMA(F)                                                                  \
  IGC_INSTANTIATE_MMA_BASE(F)                                                                   \
  IGC_FORWARD_MMA(F, 4, true, false)                                                            \
  IGC_FORWARD_MMA(F, 4, true, true)
#define IGC_INSTANTIATE_MMA_BASE(F)                                                             \
  IGC_FORWARD_MMA(F, 1, false, false)                                                           \
  IGC_FORWARD_MMA(F, 2, false, false)                                                           \
  IGC_FORWARD_MMA(F, 4, false, false)                                                           \
  IGC_FORWARD_MMA(F, 1, true, false)                                                            \
  IGC_FORWARD_MMA(F, 2, true, false)                                                            \
  IGC_FORWARD_MMA(F, 1, true, true)                                                             \
  IGC_FORWARD_MMA(F, 2, true, true)                                                             \
  template cudaError_t plan_forward_mma<F>(const MmaParams&, int64_t, const DeviceInfo&,        \
                                           MmaPlan*);                                           \
  template cudaError_t launch_forward_mma<F>(const HostChain&, const MmaParams&,                \
                                             const MmaWeights&, int32_t*, uint2*, int32_t*,     \
                                             const TensorArg<const F::Storage>&,                \
                                             const TensorArg<F::Storage>&, int64_t,             \
                                             const MmaPlan&, cudaStream_t);

IGC_INSTANTIATE_MMA(MmaBf16)
IGC_INSTANTIATE_MMA(MmaF16)
IGC_INSTANTIATE_MMA_BASE(MmaF32x3)
IGC_INSTANTIATE_MMA_BASE(MmaF32x2)
#undef IGC_INSTANTIATE_MMA
#undef IGC_INSTANTIATE_MMA_BASE
#undef IGC_FORWARD_MMA

// the tensor-core backward: every element format and tile, the transposed weight packing and
// the reduction of the partial rows
#define IGC_BACKWARD_MMA(F, MT)                                                                 \
  template __global__ void chain_backward_mma_kernel<F, MT>(                                    \
      const MmaParams, const MmaParams, const TensorArg<const F::Storage>,                      \
      const TensorArg<const F::Storage>, const TensorArg<F::Storage>, const int32_t*,           \
      const int32_t*, float*, const BackwardFlags, int64_t);
#define IGC_INSTANTIATE_MMA_BACKWARD(F)                                                         \
  IGC_BACKWARD_MMA(F, 1)                                                                        \
  IGC_BACKWARD_MMA(F, 2)                                                                        \
  IGC_BACKWARD_MMA(F, 4)                                                                        \
  template __global__ void reduce_partials_mma_kernel<F>(const float*, int64_t, int64_t,        \
                                                         int64_t, F::Storage*, F::Storage*);    \
  template cudaError_t plan_backward_mma<F>(const MmaParams&, int64_t, bool, const DeviceInfo&, \
                                            MmaPlan*);                                          \
  template cudaError_t launch_backward_mma<F>(                                                  \
      const HostChain&, const MmaParams&, const MmaParams&, const MmaWeights&, int32_t*, uint2*,\
      uint2*, int32_t*, const TensorArg<const F::Storage>&, const TensorArg<const F::Storage>&, \
      const TensorArg<F::Storage>&, const int32_t*, const int32_t*, float*, F::Storage*,        \
      F::Storage*, BackwardFlags, int64_t, const MmaPlan&, cudaStream_t);

IGC_INSTANTIATE_MMA_BACKWARD(MmaBf16)
IGC_INSTANTIATE_MMA_BACKWARD(MmaF16)
IGC_INSTANTIATE_MMA_BACKWARD(MmaF32x3)
IGC_INSTANTIATE_MMA_BACKWARD(MmaF32x2)
#undef IGC_INSTANTIATE_MMA_BACKWARD
#undef IGC_BACKWARD_MMA

}  // namespace cuda
}  // namespace igc
