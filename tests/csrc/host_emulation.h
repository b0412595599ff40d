// Host emulation of the small part of the CUDA execution model that chain_kernels.cuh uses, so
// that the kernels can be compiled as plain C++ (with IGC_EMULATE defined) and their results
// checked on a machine without a GPU (tests/test_cuda_compile_nvcc.py).
//
// A launch runs its blocks one after the other, on the calling thread; every thread of a block
// is a fiber (its own stack) that runs until it waits at a barrier or returns, and the
// launch resumes the block's fibers in turn (deterministic order: thread 0, 1, ...) until all
// have returned. __syncthreads() is a barrier over the block's threads; a block whose threads
// all wait at barriers that can never complete aborts the process with a message (a hang on a
// GPU). Threads on one host thread rather than one host thread each: the warp collectives below
// meet at two barriers each, which cost OS threads a futex round trip and a context switch per
// lane. Dynamic shared memory is a fresh
// buffer per block filled with 0xFF bytes (NaN as float or double, so a read of a location that
// was never written shows up in the results) and surrounded by guard bytes that are checked
// after the block (an out-of-range shared-memory write makes cudaGetLastError() fail; so does
// an ldmatrix / stmatrix row address that is not 16-byte aligned).
// Warp-level instructions of the tensor-core kernel (ldmatrix, movmatrix, stmatrix, mma.sync) are
// collective over the 32 threads of a warp: every lane deposits its operands, the warp meets at
// a barrier, each lane computes its own results from all deposits with the PTX ISA's fragment
// layouts (written from the ISA's tables, independently of the kernel), and the warp meets again
// before the deposits are reused. stmatrix (sm_90) is used where Device::stmatrix is set: the
// tests run the kernels both ways. float16 / bfloat16 values are raw 16-bit patterns, converted
// with round-to-nearest-even. The float32 reduction to global memory (red.add.f32) flushes
// subnormal operands and results to zero, as the PTX ISA specifies; a CTA's threads run one at a
// time, so it needs no atomicity. Nothing else is emulated: no other warp intrinsics, atomics
// or streams.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
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
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) double2 {
  double x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};

typedef int cudaError_t;
typedef void* cudaStream_t;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
constexpr cudaError_t cudaErrorIllegalAddress = 700;
constexpr cudaError_t cudaErrorMisalignedAddress = 716;
constexpr cudaError_t cudaErrorAssert = 710;
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount,
  cudaDevAttrComputeCapabilityMajor,
  cudaDevAttrMaxSharedMemoryPerBlockOptin,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor,
  cudaDevAttrL2CacheSize
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };

namespace igc_emu {

struct Device {
  int sm_count = 2;
  int smem_optin = 232448;   // H100
  int smem_per_sm = 233472;
  int occupancy = 1;
  int l2_bytes = 0;  // 0: unknown (the backward's tile rule ignores the L2)
  int stmatrix = 1;  // sm_90's stmatrix (0: the sm_80 code paths)
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
// A row address of ldmatrix / stmatrix that is not 16-byte aligned, or the address of an 8-byte
// reduction (red.v2.f32) that is not 8-byte aligned (a fault on a GPU): the launch reports
// cudaErrorMisalignedAddress.
inline std::atomic<bool>& misaligned() {
  static std::atomic<bool> a{false};
  return a;
}
inline void check_row_aligned(const void* row) {
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) misaligned() = true;
}

// L2 prefetches (prefetch.global.L2): the addresses a launch asked for, recorded while `on`.
struct PrefetchLog {
  std::mutex mu;
  bool on = false;
  std::vector<uintptr_t> addr;
};
inline PrefetchLog& prefetch_log() {
  static PrefetchLog l;
  return l;
}
inline void prefetch_l2(const void* a) {
  PrefetchLog& l = prefetch_log();
  std::lock_guard<std::mutex> g(l.mu);
  if (l.on) l.addr.push_back(reinterpret_cast<uintptr_t>(a));
}

// ---- threads as fibers ---------------------------------------------------------------------
// A context switch: x86-64 saves the callee-saved registers on the old stack and loads the new
// stack's (a few instructions; every fiber shares the floating-point control state, which the
// kernels never change); elsewhere ucontext's swapcontext (a system call per switch).
#if defined(__x86_64__) && !defined(IGC_EMU_UCONTEXT)
#define IGC_EMU_ASM_SWITCH 1
// Saves rbp, rbx, r12..r15 and the return address on the current stack, stores the stack
// pointer to *save, loads `load` and pops the same from it.
__attribute__((naked, noinline)) static void igc_emu_switch(void** /*save*/, void* /*load*/) {
  asm volatile(
      "pushq %rbp\n\t"
      "pushq %rbx\n\t"
      "pushq %r12\n\t"
      "pushq %r13\n\t"
      "pushq %r14\n\t"
      "pushq %r15\n\t"
      "movq %rsp, (%rdi)\n\t"
      "movq %rsi, %rsp\n\t"
      "popq %r15\n\t"
      "popq %r14\n\t"
      "popq %r13\n\t"
      "popq %r12\n\t"
      "popq %rbx\n\t"
      "popq %rbp\n\t"
      "ret\n\t");
}
#endif

struct Context {
#ifdef IGC_EMU_ASM_SWITCH
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

struct Fiber;
// The body every fiber of a launch runs (the kernel with its arguments), type-erased.
struct Body {
  void (*fn)(const void*);
  const void* arg;
};
// The block being run on this host thread: its body, the fiber running and the context that
// resumes the fibers.
struct Block {
  const Body* body = nullptr;
  Context sched;
  Fiber* cur = nullptr;
  uint64_t events = 0;  // barrier arrivals and returns: progress, for the deadlock check
};
inline thread_local Block* tls_block = nullptr;

// Back to the launch loop (from a fiber waiting at a barrier).
void yield_to_block();

// A barrier of `expected` threads (fibers of one block): the last arrival opens it for all.
struct Barrier {
  explicit Barrier(int n = 32) : expected(n) {}
  int expected, count = 0;
  uint64_t generation = 0;
  void arrive_and_wait() {
    const uint64_t g = generation;
    ++tls_block->events;
    if (++count == expected) {
      count = 0;
      ++generation;
      return;
    }
    while (generation == g) yield_to_block();
  }
};

// The exchange area of one warp's collective instructions.
struct Warp {
  Barrier barrier{32};
  const void* addr[32];
  uint32_t regs[32][6];
};

struct ThreadState {
  dim3 thread_idx, block_idx;
  unsigned char* smem = nullptr;
  Barrier* barrier = nullptr;
  Warp* warp = nullptr;
};

struct Fiber {
  Context ctx;
  ThreadState st;
  bool done = false;
};

inline void switch_context(Context& save, Context& load) {
#ifdef IGC_EMU_ASM_SWITCH
  igc_emu_switch(&save.sp, load.sp);
#else
  swapcontext(&save.uc, &load.uc);
#endif
}

inline void yield_to_block() {
  Block* b = tls_block;
  switch_context(b->cur->ctx, b->sched);
}

inline ThreadState& state() { return tls_block->cur->st; }
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

// Fiber stacks: the largest kernel frame plus the launch's copy of the arguments is under
// 16 KB at -O1 (g++ -fstack-usage); an overflow runs into a PROT_NONE page and faults.
constexpr size_t kStackBytes = 256 << 10;
struct Stacks {
  unsigned char* base = nullptr;
  size_t n = 0, page = 0;
  explicit Stacks(size_t count) : n(count), page(static_cast<size_t>(sysconf(_SC_PAGESIZE))) {
    void* p = mmap(nullptr, n * (kStackBytes + page), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      std::fprintf(stderr, "igc_emu: cannot map %zu fiber stacks\n", n);
      std::abort();
    }
    base = static_cast<unsigned char*>(p);
    for (size_t i = 0; i < n; ++i) mprotect(base + i * (kStackBytes + page), page, PROT_NONE);
  }
  ~Stacks() { munmap(base, n * (kStackBytes + page)); }
  unsigned char* stack(size_t i) const { return base + i * (kStackBytes + page) + page; }
};

// A fiber's first instructions: the kernel, then back to the launch loop for good (never
// resumed, never returns: its stack has no caller).
inline void fiber_entry() {
  Block* b = tls_block;
  (*b->body->fn)(b->body->arg);
  b->cur->done = true;
  ++b->events;
  switch_context(b->cur->ctx, b->sched);
  std::abort();
}

// A fiber that starts at fiber_entry on stack [base, base + bytes).
inline void make_fiber(Fiber& f, unsigned char* base, size_t bytes) {
#ifdef IGC_EMU_ASM_SWITCH
  // igc_emu_switch pops six registers and returns: a zeroed frame with fiber_entry as the
  // return address, placed so that fiber_entry starts as if called (rsp + 8 a multiple of 16)
  void** top = reinterpret_cast<void**>(base + bytes - 64);
  top[6] = reinterpret_cast<void*>(&fiber_entry);
  top[7] = nullptr;
  for (int i = 0; i < 6; ++i) top[i] = nullptr;
  f.ctx.sp = top;
#else
  getcontext(&f.ctx.uc);
  f.ctx.uc.uc_stack.ss_sp = base;
  f.ctx.uc.uc_stack.ss_size = bytes;
  f.ctx.uc.uc_link = nullptr;
  makecontext(&f.ctx.uc, fiber_entry, 0);
#endif
}

template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, size_t smem_bytes, Args... args) {
  grid_dim() = grid;
  block_dim() = block;
  const auto run = [&]() { kernel(args...); };
  using Run = decltype(run);
  const Body body{[](const void* r) { (*static_cast<const Run*>(r))(); }, &run};
  Stacks stacks(block.x);
  std::vector<Fiber> fibers(block.x);
  for (unsigned b = 0; b < grid.x; ++b) {
    std::vector<float4> storage((smem_bytes + 2 * kGuard) / sizeof(float4) + 1);
    unsigned char* raw = reinterpret_cast<unsigned char*>(storage.data());
    std::memset(raw, kGuardByte, kGuard);
    std::memset(raw + kGuard, 0xFF, smem_bytes);
    std::memset(raw + kGuard + smem_bytes, kGuardByte, kGuard);
    Barrier bar(static_cast<int>(block.x));
    std::vector<std::unique_ptr<Warp>> warps;
    for (unsigned w = 0; w < (block.x + 31) / 32; ++w) warps.push_back(std::make_unique<Warp>());
    Block blk;
    blk.body = &body;
    tls_block = &blk;
    for (unsigned t = 0; t < block.x; ++t) {
      Fiber& f = fibers[t];
      f.done = false;
      f.st = ThreadState{dim3(t), dim3(b), raw + kGuard, &bar, warps[t / 32].get()};
      make_fiber(f, stacks.stack(t), kStackBytes);
    }
    for (unsigned left = block.x; left > 0;) {
      const uint64_t before = blk.events;
      for (unsigned t = 0; t < block.x; ++t) {
        if (fibers[t].done) continue;
        blk.cur = &fibers[t];
        switch_context(blk.sched, fibers[t].ctx);
        if (fibers[t].done) --left;
      }
      if (left > 0 && blk.events == before) {
        std::fprintf(stderr, "igc_emu: block %u: every unfinished thread waits at a barrier "
                             "that cannot complete (deadlock)\n", b);
        std::abort();
      }
    }
    tls_block = nullptr;
    for (size_t i = 0; i < kGuard; ++i) {
      if (raw[i] != kGuardByte || raw[kGuard + smem_bytes + i] != kGuardByte)
        last_error() = cudaErrorIllegalAddress;
    }
    if (assert_raised().exchange(false)) last_error() = cudaErrorAssert;
    if (misaligned().exchange(false)) last_error() = cudaErrorMisalignedAddress;
  }
}

// ---- 16-bit floating-point formats (raw bit patterns) ----------------------------------------
inline float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}
inline float bf16_to_float(uint16_t v) { return bits_to_float(static_cast<uint32_t>(v) << 16); }
inline uint16_t float_to_bf16(float f) {
  const uint32_t b = float_to_bits(f);
  if ((b & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((b >> 16) | 0x40);  // NaN
  return static_cast<uint16_t>((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);  // nearest, ties even
}
inline float f16_to_float(uint16_t v) {
  _Float16 h;
  std::memcpy(&h, &v, 2);
  return static_cast<float>(h);
}
inline uint16_t float_to_f16(float f) {
  const _Float16 h = static_cast<_Float16>(f);  // IEEE conversion: nearest, ties even
  uint16_t v;
  std::memcpy(&v, &h, 2);
  return v;
}

inline void check_aligned8(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % 8 != 0) misaligned() = true;
}

// red.global.add.f32 (without .noftz): *p = ftz(ftz(*p) + ftz(v)), rounded to nearest even
inline float ftz_f32(float v) {
  return std::fpclassify(v) == FP_SUBNORMAL ? std::copysign(0.0f, v) : v;
}
inline void red_add_f32(float* p, float v) { *p = ftz_f32(ftz_f32(*p) + ftz_f32(v)); }

// ---- warp-level instructions -------------------------------------------------------------
inline int lane_id() { return static_cast<int>(state().thread_idx.x & 31u); }

// ldmatrix.sync.aligned.m8n8.x{nm}[.trans].shared.b16: lanes 8 j .. 8 j + 7 give the addresses
// of rows 0..7 of matrix j (8 consecutive 16-bit values each). Without .trans, lane i receives
// elements (row i / 4, columns 2 (i % 4), 2 (i % 4) + 1) of each matrix; with .trans, elements
// (rows 2 (i % 4), 2 (i % 4) + 1, column i / 4), the lower index in the low half.
inline void warp_ldmatrix(uint32_t* r, const uint16_t* row, int nm, bool trans) {
  Warp& w = *state().warp;
  const int lane = lane_id();
  w.addr[lane] = row;
  if (lane < 8 * nm) check_row_aligned(row);
  w.barrier.arrive_and_wait();
  for (int j = 0; j < nm; ++j) {
    uint16_t e[2];
    for (int h = 0; h < 2; ++h) {
      const int a = lane / 4, b = 2 * (lane % 4) + h;  // (row, column) of the fragment element
      const int srow = trans ? b : a, scol = trans ? a : b;
      e[h] = static_cast<const uint16_t*>(w.addr[8 * j + srow])[scol];
    }
    r[j] = static_cast<uint32_t>(e[0]) | (static_cast<uint32_t>(e[1]) << 16);
  }
  w.barrier.arrive_and_wait();
}

// movmatrix.sync.aligned.m8n8.trans.b16: lane i holds elements (row i / 4, columns 2 (i % 4),
// 2 (i % 4) + 1) of an 8x8 matrix and receives the same elements of its transpose.
inline uint32_t warp_movmatrix_trans(uint32_t r) {
  Warp& w = *state().warp;
  const int lane = lane_id();
  w.regs[lane][0] = r;
  w.barrier.arrive_and_wait();
  uint32_t out = 0;
  for (int h = 0; h < 2; ++h) {
    // element (lane / 4, 2 (lane % 4) + h) of the transpose = element (2 (lane % 4) + h,
    // lane / 4) of the matrix, held by lane 4 row + column / 2, in half column % 2
    const int row = 2 * (lane % 4) + h, col = lane / 4;
    const uint32_t src = w.regs[4 * row + col / 2][0];
    const uint32_t v = (col % 2) ? src >> 16 : src & 0xffffu;
    out |= v << (16 * h);
  }
  w.barrier.arrive_and_wait();
  return out;
}

// stmatrix.sync.aligned.m8n8.x{nm}.trans.shared.b16: lane i holds elements (row i / 4, columns
// 2 (i % 4), 2 (i % 4) + 1) of each matrix j (r[j]); lanes 8 j .. 8 j + 7 give the addresses of
// rows 0..7 of matrix j's transpose, each 8 consecutive 16-bit values. Row c of the transpose is
// column c of the matrix: element (c, q) = matrix element (q, c), held by lane 4 q + c / 2 in
// half c % 2. Each lane writes the row it addressed.
inline void warp_stmatrix_trans(uint16_t* row, const uint32_t* r, int nm) {
  Warp& w = *state().warp;
  const int lane = lane_id();
  w.addr[lane] = row;
  for (int j = 0; j < nm; ++j) w.regs[lane][j] = r[j];
  if (lane < 8 * nm) check_row_aligned(row);
  w.barrier.arrive_and_wait();
  if (lane < 8 * nm) {
    const int j = lane / 8, c = lane % 8;
    uint16_t* dst = static_cast<uint16_t*>(const_cast<void*>(w.addr[lane]));
    for (int q = 0; q < 8; ++q) {
      const uint32_t src = w.regs[4 * q + c / 2][j];
      dst[q] = static_cast<uint16_t>((c % 2) ? src >> 16 : src & 0xffffu);
    }
  }
  w.barrier.arrive_and_wait();
}

// mma.sync.aligned.m16n8k{K}.row.col.f32.{bf16,f16}.{bf16,f16}.f32, d = A B + d, with
// groupID = lane / 4 and t = lane % 4:
//   A (16 x K): register q holds (row groupID + 8 (q % 2), columns 2 t + 8 (q / 2) + {0, 1});
//   B (K x 8):  register q holds (rows 2 t + 8 q + {0, 1}, column groupID);
//   D (16 x 8): d[q] is (row groupID + 8 (q / 2), column 2 t + q % 2).
// Products of 16-bit values are exact in fp32; the sum is taken in fp32 in k order.
inline void warp_mma(float* d, const uint32_t* a, const uint32_t* b, int K, bool bf16) {
  Warp& w = *state().warp;
  const int lane = lane_id();
  const int na = K / 4, nb = K / 8;
  for (int q = 0; q < na; ++q) w.regs[lane][q] = a[q];
  for (int q = 0; q < nb; ++q) w.regs[lane][4 + q] = b[q];
  w.barrier.arrive_and_wait();
  auto val = [&](uint32_t reg, int h) {
    const uint16_t v = static_cast<uint16_t>(h ? reg >> 16 : reg & 0xffffu);
    return bf16 ? bf16_to_float(v) : f16_to_float(v);
  };
  auto A = [&](int row, int k) {
    const int src = (row % 8) * 4 + (k % 8) / 2;
    return val(w.regs[src][(row / 8) + 2 * (k / 8)], k % 2);
  };
  auto B = [&](int k, int col) {
    const int src = col * 4 + (k % 8) / 2;
    return val(w.regs[src][4 + k / 8], k % 2);
  };
  for (int q = 0; q < 4; ++q) {
    const int row = lane / 4 + 8 * (q / 2), col = 2 * (lane % 4) + q % 2;
    float s = d[q];
    for (int k = 0; k < K; ++k) s += A(row, k) * B(k, col);
    d[q] = s;
  }
  w.barrier.arrive_and_wait();
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
  *v = a == cudaDevAttrMultiProcessorCount      ? d.sm_count
       : a == cudaDevAttrComputeCapabilityMajor ? 9
       : a == cudaDevAttrMaxSharedMemoryPerBlockOptin ? d.smem_optin
       : a == cudaDevAttrL2CacheSize                  ? d.l2_bytes
                                                      : d.smem_per_sm;
  return cudaSuccess;
}
template <typename K>
inline cudaError_t cudaFuncSetAttribute(K, cudaFuncAttribute, int v) {
  return v <= igc_emu::device().smem_optin ? cudaSuccess : cudaErrorInvalidValue;
}
template <typename K>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, K, int,
                                                                 size_t smem) {
  // the device's occupancy (registers are not emulated), at most the CTAs whose shared memory
  // (and 1 KB reserved per CTA) fits the SM's
  const igc_emu::Device& d = igc_emu::device();
  const size_t by_smem = static_cast<size_t>(d.smem_per_sm) / (smem + 1024);
  *n = static_cast<size_t>(d.occupancy) < by_smem ? d.occupancy : static_cast<int>(by_smem);
  return cudaSuccess;
}
