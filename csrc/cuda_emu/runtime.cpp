// The runtime of the CUDA-on-CPU harness (cuda_emu.h says what it emulates and checks).
//
// A launch starts blockDim OS threads.  Each thread runs its CUDA thread of every block, the
// blocks in one shuffled order, with a rendezvous between blocks (the shared statics pass
// from one block to the next).  Barrier and warp exchanges keep their bookkeeping under
// one mutex per block and release waiters through a generation counter (acquire/release,
// so the sanitizers see the happens-before edges), waited on with futex and a timeout.
#include "cuda_emu.h"

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace adpo_emu {
namespace {

struct Abort {};  // unwinds a device thread once the launch has failed

std::string basename(const char* path) {
  const char* s = std::strrchr(path, '/');
  return s ? s + 1 : path;
}

double env_double(const char* name, double fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  const double x = std::strtod(v, &end);
  if (end == v || *end || !(x > 0)) throw std::runtime_error(std::string(name) + ": expected a positive number, got '" + v + "'");
  return x;
}

uint64_t env_seed() {
  const char* v = std::getenv("ADPO_CUDA_EMU_SEED");
  if (!v || !*v) return 0;
  char* end = nullptr;
  const unsigned long long x = std::strtoull(v, &end, 10);
  if (end == v || *end) throw std::runtime_error(std::string("ADPO_CUDA_EMU_SEED: expected an unsigned integer, got '") + v + "'");
  return x;
}

void futex_wait(std::atomic<uint32_t>* word, uint32_t seen, long timeout_ns) {
  timespec ts{timeout_ns / 1000000000L, timeout_ns % 1000000000L};
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT_PRIVATE, seen, &ts, nullptr, 0);
}

void futex_wake_all(std::atomic<uint32_t>* word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
}

// Where a thread of the block is, for the timeout's report.
enum Where : int { RUNNING = 0, AT_BARRIER = 1, AT_SHUFFLE = 2, RETURNED = 3 };

struct Warp {
  int live = 32, arrived = 0;
  std::atomic<uint32_t> gen{0};
  uint64_t slot[2][32] = {};  // double-buffered: one barrier per exchange
};

struct Launch {
  LaunchConfig cfg;
  int64_t nthreads = 0, nblocks = 0;
  double timeout_s = 120.0;
  std::vector<int64_t> order;

  std::mutex m;  // guards the counters below and the error
  int live = 0, arrived = 0;  // this block's barrier
  int waiting = 0;            // threads blocked in a barrier or a shuffle
  const char* site_file = nullptr;
  int site_line = 0;
  std::atomic<uint32_t> gen{0};
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<int> where, where_line, shuffles;
  int64_t step = 0, block = 0;  // the position in order of the block running now, and its index
  int done = 0;                  // threads finished with this block
  std::atomic<uint32_t> block_gen{0};

  std::atomic<bool> failed{false};
  std::string error;

  void reset_block() {
    live = (int)nthreads;
    arrived = 0;
    waiting = 0;
    site_file = nullptr;
    for (auto& w : warps) {
      w->live = 32;
      w->arrived = 0;
    }
    std::fill(where.begin(), where.end(), (int)RUNNING);
    std::fill(shuffles.begin(), shuffles.end(), 0);
  }
};

thread_local Launch* tl_launch = nullptr;
thread_local int64_t tl_tid = 0;

std::string thread_name(const Launch& L, int64_t tid) {
  const int64_t b = L.block;
  const dim3 g = L.cfg.grid, bd = L.cfg.block;
  char buf[160];
  std::snprintf(buf, sizeof buf, "block (%lld, %lld, %lld) thread (%lld, %lld, %lld)", (long long)(b % g.x),
                (long long)(b / g.x % g.y), (long long)(b / ((int64_t)g.x * g.y)), (long long)(tid % bd.x),
                (long long)(tid / bd.x % bd.y), (long long)(tid / ((int64_t)bd.x * bd.y)));
  return buf;
}

std::string kernel_name(const Launch& L) {
  return std::string("kernel ") + L.cfg.kernel + " (launched at " + basename(L.cfg.file) + ":" +
         std::to_string(L.cfg.line) + ")";
}

// Records the first failure (under L.m) and wakes every waiter; the caller then throws Abort.
void record_failure_locked(Launch& L, const std::string& msg) {
  if (!L.failed.load(std::memory_order_relaxed)) {
    L.error = msg;
    L.failed.store(true, std::memory_order_release);
  }
  futex_wake_all(&L.gen);
  futex_wake_all(&L.block_gen);
  for (auto& w : L.warps) futex_wake_all(&w->gen);
}

[[noreturn]] void fail_locked(Launch& L, const std::string& what) {
  record_failure_locked(L, kernel_name(L) + ", " + thread_name(L, tl_tid) + ": " + what);
  throw Abort{};
}

std::string where_summary(Launch& L) {
  std::map<std::string, int> counts;
  for (int64_t t = 0; t < L.nthreads; ++t) {
    std::string w;
    switch (L.where[t]) {
      case AT_BARRIER: w = "wait at __syncthreads (line " + std::to_string(L.where_line[t]) + ")"; break;
      case AT_SHUFFLE: w = "wait at __shfl_down_sync (line " + std::to_string(L.where_line[t]) + ")"; break;
      case RETURNED: w = "returned"; break;
      default: w = "run";
    }
    ++counts[w];
  }
  std::string s;
  for (auto& [w, n] : counts) s += (s.empty() ? "" : ", ") + std::to_string(n) + " " + w;
  return s;
}

// Called with the lock held by a thread about to block: when every thread of the block that has
// not returned is blocked, no barrier or shuffle can complete any more.
void check_deadlock_locked(Launch& L) {
  if (L.live > 0 && L.waiting == L.live)
    fail_locked(L, "deadlock: every thread of the block is blocked or has returned: " + where_summary(L));
}

// Waits (lock released) until gen moves past seen; fails at the timeout.
void wait_for(Launch& L, std::unique_lock<std::mutex>& lk, std::atomic<uint32_t>& gen, uint32_t seen,
              const char* what, const char* file, int line) {
  lk.unlock();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(L.timeout_s);
  while (gen.load(std::memory_order_acquire) == seen) {
    if (L.failed.load(std::memory_order_acquire)) throw Abort{};
    if (std::chrono::steady_clock::now() > deadline) {
      lk.lock();
      if (gen.load(std::memory_order_acquire) != seen) return;
      char buf[96];
      std::snprintf(buf, sizeof buf, "%s (%s:%d) timed out after %g s; the block's threads: ", what,
                    basename(file).c_str(), line, L.timeout_s);
      fail_locked(L, buf + where_summary(L));
    }
    futex_wait(&gen, seen, 50 * 1000 * 1000);  // 50 ms slices: a failure elsewhere is seen soon
  }
}

void release_barrier_locked(Launch& L, int waiters) {
  L.waiting -= waiters;
  L.arrived = 0;
  L.site_file = nullptr;
  for (int64_t t = 0; t < L.nthreads; ++t)
    if (L.where[t] == AT_BARRIER) L.where[t] = RUNNING;
  L.gen.fetch_add(1, std::memory_order_acq_rel);
  futex_wake_all(&L.gen);
}

// A device thread returned from the kernel: it counts as arrived at the block's barriers; a
// warp that still exchanges values needs all its lanes.
void thread_returned(Launch& L, int64_t tid) {
  std::unique_lock<std::mutex> lk(L.m);
  L.where[tid] = RETURNED;
  --L.live;
  Warp& w = *L.warps[tid / 32];
  --w.live;
  if (w.arrived > 0 && !L.failed.load())
    fail_locked(L, "returned while other lanes of its warp wait at __shfl_down_sync");
  if (L.arrived > 0 && L.arrived == L.live) release_barrier_locked(L, L.arrived);
  check_deadlock_locked(L);
}

void end_of_block(Launch& L) {
  std::unique_lock<std::mutex> lk(L.m);
  const uint32_t seen = L.block_gen.load(std::memory_order_relaxed);
  if (++L.done == L.nthreads) {
    L.done = 0;
    L.reset_block();
    if (++L.step < L.nblocks) L.block = L.order[L.step];
    L.block_gen.fetch_add(1, std::memory_order_acq_rel);
    futex_wake_all(&L.block_gen);
    return;
  }
  lk.unlock();
  // no timeout here: every thread of the block has left the kernel or is leaving it
  while (L.block_gen.load(std::memory_order_acquire) == seen) futex_wait(&L.block_gen, seen, 50 * 1000 * 1000);
}

void set_index(uint3& out, int64_t i, dim3 d) {
  out = {(unsigned)(i % d.x), (unsigned)(i / d.x % d.y), (unsigned)(i / ((int64_t)d.x * d.y))};
}

void device_thread(Launch& L, int64_t tid, const std::function<void()>& body) {
  tl_launch = &L;
  tl_tid = tid;
  set_index(threadIdx, tid, L.cfg.block);
  blockDim = L.cfg.block;
  gridDim = L.cfg.grid;
  for (int64_t k = 0; k < L.nblocks; ++k) {
    const int64_t b = L.order[k];
    set_index(blockIdx, b, L.cfg.grid);
    try {
      body();
      thread_returned(L, tid);
    } catch (const Abort&) {
    } catch (const std::exception& e) {
      std::unique_lock<std::mutex> lk(L.m);
      record_failure_locked(L, kernel_name(L) + ", " + thread_name(L, tid) + ": " + e.what());
    }
    end_of_block(L);
    if (L.failed.load(std::memory_order_acquire)) break;
  }
  tl_launch = nullptr;
}

std::mutex g_launch_mutex;
uint64_t g_launch_count = 0;

Launch& current(const char* file, int line, const char* what) {
  if (!tl_launch) {
    std::fprintf(stderr, "%s:%d: %s called outside a kernel\n", basename(file).c_str(), line, what);
    std::abort();
  }
  return *tl_launch;
}

}  // namespace

void launch(const LaunchConfig& cfg, const std::function<void()>& body) {
  const std::lock_guard<std::mutex> one_at_a_time(g_launch_mutex);
  Launch L;
  L.cfg = cfg;
  L.nthreads = (int64_t)cfg.block.x * cfg.block.y * cfg.block.z;
  L.nblocks = (int64_t)cfg.grid.x * cfg.grid.y * cfg.grid.z;
  if (L.nblocks <= 0 || L.nthreads <= 0 || L.nthreads > 1024 || cfg.grid.y > 65535 || cfg.grid.z > 65535) {
    char buf[160];
    std::snprintf(buf, sizeof buf, ": invalid configuration argument (grid %u x %u x %u, block %u x %u x %u)", cfg.grid.x,
                  cfg.grid.y, cfg.grid.z, cfg.block.x, cfg.block.y, cfg.block.z);
    throw std::runtime_error(kernel_name(L) + buf);
  }
  L.timeout_s = env_double("ADPO_CUDA_EMU_TIMEOUT_S", 120.0);
  L.order.resize(L.nblocks);
  std::iota(L.order.begin(), L.order.end(), 0);
  std::mt19937_64 rng(env_seed() * 0x9E3779B97F4A7C15ull + ++g_launch_count);
  std::shuffle(L.order.begin(), L.order.end(), rng);
  const int64_t nwarps = (L.nthreads + 31) / 32;
  for (int64_t w = 0; w < nwarps; ++w) L.warps.push_back(std::make_unique<Warp>());
  L.where.assign(L.nthreads, RUNNING);
  L.where_line.assign(L.nthreads, 0);
  L.shuffles.assign(L.nthreads, 0);
  L.reset_block();
  L.block = L.order[0];
  std::vector<std::thread> threads;
  threads.reserve(L.nthreads);
  for (int64_t t = 0; t < L.nthreads; ++t) threads.emplace_back(device_thread, std::ref(L), t, std::cref(body));
  for (auto& th : threads) th.join();
  if (L.failed.load()) throw std::runtime_error("CUDA-on-CPU harness: " + L.error);
}

void device_fail(const char* file, int line, const char* what) {
  Launch& L = current(file, line, what);
  std::unique_lock<std::mutex> lk(L.m);
  fail_locked(L, std::string(what) + " at " + basename(file) + ":" + std::to_string(line));
}

void sync_threads(const char* file, int line) {
  Launch& L = current(file, line, "__syncthreads");
  std::unique_lock<std::mutex> lk(L.m);
  if (L.failed.load()) throw Abort{};
  if (L.arrived > 0 && (L.site_line != line || std::strcmp(L.site_file, file) != 0)) {
    fail_locked(L, "divergent __syncthreads: this thread is at " + basename(file) + ":" + std::to_string(line) +
                       ", " + std::to_string(L.arrived) + " other(s) wait at " + basename(L.site_file) + ":" +
                       std::to_string(L.site_line));
  }
  L.site_file = file;
  L.site_line = line;
  L.where[tl_tid] = AT_BARRIER;
  L.where_line[tl_tid] = line;
  if (++L.arrived == L.live) {
    release_barrier_locked(L, L.arrived - 1);
    return;
  }
  ++L.waiting;
  check_deadlock_locked(L);
  wait_for(L, lk, L.gen, L.gen.load(std::memory_order_relaxed), "__syncthreads", file, line);
}

uint64_t shfl_down_bits(const char* file, int line, unsigned mask, uint64_t bits, unsigned delta, int width) {
  Launch& L = current(file, line, "__shfl_down_sync");
  const int64_t tid = tl_tid;
  const int lane = (int)(tid % 32);
  {
    std::unique_lock<std::mutex> lk(L.m);
    if (L.failed.load()) throw Abort{};
    char buf[128];
    if (mask != 0xffffffffu) {
      std::snprintf(buf, sizeof buf, "__shfl_down_sync with mask 0x%08x (the harness supports the full mask only)", mask);
      fail_locked(L, buf + std::string(" at ") + basename(file) + ":" + std::to_string(line));
    }
    if (width != 32) fail_locked(L, "__shfl_down_sync with width " + std::to_string(width) + " (supported: 32)");
    if (L.nthreads % 32 != 0)
      fail_locked(L, "__shfl_down_sync in a block of " + std::to_string(L.nthreads) + " threads (not whole warps)");
    Warp& w = *L.warps[tid / 32];
    if (w.live != 32)
      fail_locked(L, "__shfl_down_sync at " + basename(file) + ":" + std::to_string(line) + " with " +
                         std::to_string(32 - w.live) + " lane(s) of the warp returned (the full mask names them)");
    const int phase = L.shuffles[tid]++ & 1;
    w.slot[phase][lane] = bits;
    L.where[tid] = AT_SHUFFLE;
    L.where_line[tid] = line;
    if (++w.arrived == 32) {
      w.arrived = 0;
      L.waiting -= 31;
      for (int64_t t = tid - lane; t < tid - lane + 32; ++t) L.where[t] = RUNNING;
      w.gen.fetch_add(1, std::memory_order_acq_rel);
      futex_wake_all(&w.gen);
    } else {
      ++L.waiting;
      check_deadlock_locked(L);
      wait_for(L, lk, w.gen, w.gen.load(std::memory_order_relaxed), "__shfl_down_sync", file, line);
    }
    const unsigned src = (unsigned)lane + delta;
    return src < 32 ? w.slot[phase][src] : bits;  // out of range: the lane keeps its own value
  }
}

void check_vector_access(const char* file, int line, const void* ptr, const char* op) {
  if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) {
    char buf[128];
    std::snprintf(buf, sizeof buf, "misaligned %s at address %p", op, ptr);
    device_fail(file, line, buf);
  }
}

}  // namespace adpo_emu
