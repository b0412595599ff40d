// The CPU output cache (output_cache.h).
#include "output_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <new>

namespace igc {
namespace {

constexpr size_t kMinBytes = size_t(1) << 20;
constexpr size_t kRound = size_t(2) << 20;

class OutputCache {
 public:
  OutputCache() {
    const char* env = std::getenv("IGC_CPU_OUTPUT_CACHE_MB");
    long long mb = 1024;
    if (env != nullptr && *env != '\0') {
      char* end = nullptr;
      mb = std::strtoll(env, &end, 10);
      TORCH_CHECK(end != env && *end == '\0' && mb >= 0,
                  "IGC_CPU_OUTPUT_CACHE_MB must be a non-negative integer, got '", env, "'");
    }
    limit_ = static_cast<size_t>(mb) << 20;
  }

  size_t limit() const { return limit_; }

  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> g(m_);
      auto it = free_.find(bytes);
      if (it != free_.end()) {
        void* p = it->second;
        free_.erase(it);
        cached_ -= bytes;
        return p;
      }
    }
    void* p = std::aligned_alloc(64, bytes);
    if (p == nullptr) throw std::bad_alloc();
    return p;
  }

  void give(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> g(m_);
      if (cached_ + bytes <= limit_) {
        free_.emplace(bytes, p);
        cached_ += bytes;
        return;
      }
    }
    std::free(p);
  }

  size_t bytes() {
    std::lock_guard<std::mutex> g(m_);
    return cached_;
  }

  void clear() {
    std::multimap<size_t, void*> drop;
    {
      std::lock_guard<std::mutex> g(m_);
      drop.swap(free_);
      cached_ = 0;
    }
    for (auto& e : drop) std::free(e.second);
  }

 private:
  std::mutex m_;
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0;
  size_t limit_ = 0;
};

// Never destroyed: tensors freed during interpreter shutdown still return their buffers.
OutputCache& cache() {
  static OutputCache* c = new OutputCache();
  return *c;
}

struct Block {
  void* ptr;
  size_t bytes;
};

void give_back(void* ctx) {
  Block* b = static_cast<Block*>(ctx);
  cache().give(b->ptr, b->bytes);
  delete b;
}

// The storages' allocator: large requests through the cache, small ones to PyTorch's CPU
// allocator. Tensors made with it are ordinary resizable CPU tensors (a resize allocates here).
class CacheAllocator final : public at::Allocator {
 public:
  at::DataPtr allocate(size_t n) override {
    OutputCache& c = cache();
    if (n < kMinBytes || c.limit() == 0) return c10::GetCPUAllocator()->allocate(n);
    const size_t rounded = (n + kRound - 1) / kRound * kRound;
    void* p = c.take(rounded);
    return {p, new Block{p, rounded}, &give_back, at::Device(at::kCPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

CacheAllocator& allocator() {
  static CacheAllocator* a = new CacheAllocator();
  return *a;
}

}  // namespace

at::Tensor cached_empty_strided(at::IntArrayRef sizes, at::IntArrayRef strides,
                                const at::TensorOptions& options) {
  return at::detail::empty_strided_generic(sizes, strides, &allocator(),
                                           c10::DispatchKeySet(c10::DispatchKey::CPU),
                                           c10::typeMetaToScalarType(options.dtype()));
}

size_t cpu_output_cache_bytes() { return cache().bytes(); }
void cpu_output_cache_clear() { cache().clear(); }

}  // namespace igc
