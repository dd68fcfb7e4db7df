// The CUDA-on-CPU harness: what csrc/cuda/kernels.cu needs of CUDA, as C++20 on OS threads.
//
// kernels.cu compiles unchanged with g++ when include/ (shims of cuda_runtime.h, cuda_fp16.h,
// cuda_bf16.h, cuda_runtime_api.h) comes first on the include path.  Its launches go through
// ADPO_LAUNCH, which nvcc expands to <<<>>> and this header to adpo_emu::launch (runtime.cpp):
//
// * every block runs with one OS thread per CUDA thread; the blocks of a launch run one at a
//   time, in an order shuffled from ADPO_CUDA_EMU_SEED and the launch count, so `__shared__`
//   is a static (one block owns it at a time) and a result that depends on block order shows;
// * threadIdx, blockIdx, blockDim and gridDim are thread-locals;
// * __syncthreads is a real barrier with a timeout (ADPO_CUDA_EMU_TIMEOUT_S, default 120 s).
//   Threads that returned count as arrived, as on the GPU; threads waiting at two different
//   __syncthreads of one block fail at once (divergent barrier); a barrier that never
//   completes fails at the timeout, with where every thread of the block waits;
// * __shfl_down_sync exchanges values within a warp: it requires the full mask, a width of
//   32, a block of whole warps and all 32 lanes live (none returned);
// * 16-byte vector loads and stores (__ldg / __stwb on uint4) require 16-byte alignment,
//   as the GPU faults on a misaligned vector access.
//
// A failure in any device thread stops the launch: the other threads leave at their next
// barrier or shuffle, and launch() throws std::runtime_error naming the kernel, the block and
// the thread.  With -fsanitize=address or -fsanitize=thread the same code is memcheck and
// racecheck: ASan sees every global access (one past a row end is a heap overflow when the
// row is the buffer's last), TSan every unsynchronised pair of accesses within a block, since
// the barrier and the shuffles synchronise through mutexes and acquire/release atomics.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- qualifiers ----------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static  // one block at a time owns it (see above); __restrict__ is GCC's own

// ---- built-in types and index variables ----------------------------------------------
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
typedef struct CUstream_st* cudaStream_t;

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

// ---- half and bfloat16: storage and round-to-nearest-even conversions (all kernels.cu uses)
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return (float)f;
}
inline __half __float2half_rn(float x) {
  const _Float16 f = (_Float16)x;  // IEEE round to nearest even
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = (uint32_t)b.bits << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {0x7fffu};  // NaN: CUDA's canonical bf16 NaN
  u += 0x7fffu + ((u >> 16) & 1u);                          // round to nearest even
  return {(uint16_t)(u >> 16)};
}

namespace adpo_emu {

struct LaunchConfig {
  const char* kernel;  // the kernel expression as written at the launch
  const char* file;
  int line;
  dim3 grid, block;
  size_t shared_bytes;
  cudaStream_t stream;
};

// Runs body() as every thread of every block of the launch; throws std::runtime_error on a
// device-side failure.  Launches are serialised (one process-wide mutex).
void launch(const LaunchConfig& cfg, const std::function<void()>& body);

// Device-side failure: records the first message (with kernel, block and thread) and
// unwinds the calling device thread.
[[noreturn]] void device_fail(const char* file, int line, const char* what);

void sync_threads(const char* file, int line);
uint64_t shfl_down_bits(const char* file, int line, unsigned mask, uint64_t bits, unsigned delta, int width);
void check_vector_access(const char* file, int line, const void* ptr, const char* op);

template <typename K> struct Launcher;
template <typename... P> struct Launcher<void (*)(P...)> {
  LaunchConfig cfg;
  void (*kernel)(P...);
  template <typename... A> void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
    // converted once, like the kernel parameter buffer; every device thread gets its own copies
    const std::tuple<std::decay_t<P>...> params(static_cast<std::decay_t<P>>(std::forward<A>(args))...);
    launch(cfg, [&] { std::apply(kernel, params); });
  }
};

template <typename K> Launcher<K> launcher(const char* name, const char* file, int line, dim3 grid, dim3 block,
                                           size_t shared_bytes, cudaStream_t stream, K kernel) {
  return Launcher<K>{LaunchConfig{name, file, line, grid, block, shared_bytes, stream}, kernel};
}

template <typename T> T shfl_down(const char* file, int line, unsigned mask, T v, unsigned delta, int width) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "__shfl_down_sync of a type wider than 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = shfl_down_bits(file, line, mask, bits, delta, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

inline uint4 ldg16(const char* file, int line, const uint4* ptr) {
  check_vector_access(file, line, ptr, "16-byte load (__ldg)");
  return *ptr;
}

inline void stwb16(const char* file, int line, uint4* ptr, uint4 v) {
  check_vector_access(file, line, ptr, "16-byte store (__stwb)");
  *ptr = v;
}

}  // namespace adpo_emu

// ---- device functions ----------------------------------------------------------------
#define ADPO_LAUNCH(GRID, BLOCK, SMEM, STREAM, ...) \
  ::adpo_emu::launcher(#__VA_ARGS__, __FILE__, __LINE__, GRID, BLOCK, SMEM, STREAM, &__VA_ARGS__)
#define __syncthreads() ::adpo_emu::sync_threads(__FILE__, __LINE__)
#define __shfl_down_sync(MASK, VAR, DELTA, ...) \
  ::adpo_emu::shfl_down(__FILE__, __LINE__, MASK, VAR, DELTA, ::adpo_emu::shfl_width(__VA_ARGS__))
#define __ldg(PTR) ::adpo_emu::ldg16(__FILE__, __LINE__, PTR)
#define __stwb(PTR, V) ::adpo_emu::stwb16(__FILE__, __LINE__, PTR, V)

namespace adpo_emu {
constexpr int shfl_width(int w = 32) { return w; }
}  // namespace adpo_emu

// atomicMin on a 64-bit word (the scalar stage's shared flip index); returns the old value.
inline unsigned long long atomicMin(unsigned long long* addr, unsigned long long v) {
  unsigned long long old = __atomic_load_n(addr, __ATOMIC_RELAXED);
  while (v < old && !__atomic_compare_exchange_n(addr, &old, v, true, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
  }
  return old;
}
