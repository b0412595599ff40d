// Host emulation of the small part of the CUDA execution model that chain_kernels.cuh uses, so
// that the kernels can be compiled as plain C++ (with IGC_EMULATE defined) and their results
// checked on a machine without a GPU (tests/test_cuda_compile_nvcc.py).
//
// A launch runs its blocks one after the other; every thread of a block is a host thread, and
// __syncthreads() is a std::barrier over the block's threads. Dynamic shared memory is a fresh
// buffer per block filled with 0xFF bytes (NaN as float or double, so a read of a location that
// was never written shows up in the results) and surrounded by guard bytes that are checked
// after the block (an out-of-range shared-memory write makes cudaGetLastError() fail).
// Only what the kernels use is emulated: no warp intrinsics, atomics or streams.
#pragma once

#include <atomic>
#include <barrier>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

typedef int cudaError_t;
typedef void* cudaStream_t;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
constexpr cudaError_t cudaErrorIllegalAddress = 700;
constexpr cudaError_t cudaErrorAssert = 710;
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount,
  cudaDevAttrMaxSharedMemoryPerBlockOptin,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };

namespace igc_emu {

struct Device {
  int sm_count = 2;
  int smem_optin = 232448;   // H100
  int smem_per_sm = 233472;
  int occupancy = 1;
};
inline Device& device() {
  static Device d;
  return d;
}
inline cudaError_t& last_error() {
  static cudaError_t e = cudaSuccess;
  return e;
}
// A device-side assert: the launch that raised it reports cudaErrorAssert (threads go on, as
// they would not on a GPU, so the kernels' clamping after the assert is exercised too).
inline std::atomic<bool>& assert_raised() {
  static std::atomic<bool> a{false};
  return a;
}
inline void device_assert_fail(const char*) { assert_raised() = true; }

struct ThreadState {
  dim3 thread_idx, block_idx;
  unsigned char* smem = nullptr;
  std::barrier<>* barrier = nullptr;
};
inline ThreadState& state() {
  thread_local ThreadState s;
  return s;
}
inline dim3& grid_dim() {
  static dim3 g;
  return g;
}
inline dim3& block_dim() {
  static dim3 b;
  return b;
}
inline unsigned char* block_smem() { return state().smem; }

constexpr size_t kGuard = 256;
constexpr unsigned char kGuardByte = 0xA5;

template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, size_t smem_bytes, Args... args) {
  grid_dim() = grid;
  block_dim() = block;
  for (unsigned b = 0; b < grid.x; ++b) {
    std::vector<float4> storage((smem_bytes + 2 * kGuard) / sizeof(float4) + 1);
    unsigned char* raw = reinterpret_cast<unsigned char*>(storage.data());
    std::memset(raw, kGuardByte, kGuard);
    std::memset(raw + kGuard, 0xFF, smem_bytes);
    std::memset(raw + kGuard + smem_bytes, kGuardByte, kGuard);
    std::barrier<> bar(static_cast<std::ptrdiff_t>(block.x));
    std::vector<std::thread> threads;
    threads.reserve(block.x);
    for (unsigned t = 0; t < block.x; ++t) {
      threads.emplace_back([&, t]() {
        ThreadState& s = state();
        s.thread_idx = dim3(t);
        s.block_idx = dim3(b);
        s.smem = raw + kGuard;
        s.barrier = &bar;
        kernel(args...);
      });
    }
    for (auto& th : threads) th.join();
    for (size_t i = 0; i < kGuard; ++i) {
      if (raw[i] != kGuardByte || raw[kGuard + smem_bytes + i] != kGuardByte)
        last_error() = cudaErrorIllegalAddress;
    }
    if (assert_raised().exchange(false)) last_error() = cudaErrorAssert;
  }
}

}  // namespace igc_emu

#define threadIdx (igc_emu::state().thread_idx)
#define blockIdx (igc_emu::state().block_idx)
#define gridDim (igc_emu::grid_dim())
#define blockDim (igc_emu::block_dim())

inline void __syncthreads() { igc_emu::state().barrier->arrive_and_wait(); }

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = igc_emu::last_error();
  igc_emu::last_error() = cudaSuccess;
  return e;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  const igc_emu::Device& d = igc_emu::device();
  *v = a == cudaDevAttrMultiProcessorCount ? d.sm_count
       : a == cudaDevAttrMaxSharedMemoryPerBlockOptin ? d.smem_optin
                                                      : d.smem_per_sm;
  return cudaSuccess;
}
template <typename K>
inline cudaError_t cudaFuncSetAttribute(K, cudaFuncAttribute, int v) {
  return v <= igc_emu::device().smem_optin ? cudaSuccess : cudaErrorInvalidValue;
}
template <typename K>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, K, int, size_t) {
  *n = igc_emu::device().occupancy;
  return cudaSuccess;
}
