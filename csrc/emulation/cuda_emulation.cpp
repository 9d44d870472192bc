// The engine of the CUDA emulation declared in ddpm_fast/cuda_emulation.h: fibers, the block
// scheduler, barriers, warp exchanges, launch errors. Compiled only into the test-only emulated
// build (ddpm_fast.testing.cuda_emulation), never into ddpm_fast._C.
//
// One worker OS thread runs every launch, one block at a time. The threads of a block are
// fibers with their own stacks; a fiber runs until it waits (barrier, warp exchange) or ends,
// and hands control back to the scheduler, which picks the next one (see the header for the
// order and why). The caller of a launch waits for the worker, so launches are synchronous.
#include "ddpm_fast/cuda_emulation.h"

#include <link.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

// ------------------------------------------------------------------------------ context switch
//
// x86-64: a suspended context is its stack pointer, with the callee-saved registers pushed on
// its stack (all the System V ABI asks a call to preserve). Elsewhere: ucontext (slower: a
// signal-mask syscall per switch).
#if defined(__x86_64__)
extern "C" void ddpm_fast_emu_switch(void** save_sp, void* load_sp);
extern "C" void ddpm_fast_emu_start();
extern "C" __attribute__((visibility("hidden"), used)) void ddpm_fast_emu_fiber_main();

asm(R"(
  .text
  .globl ddpm_fast_emu_switch
  .hidden ddpm_fast_emu_switch
  .type ddpm_fast_emu_switch, @function
  .p2align 4
ddpm_fast_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size ddpm_fast_emu_switch, .-ddpm_fast_emu_switch

  .globl ddpm_fast_emu_start
  .hidden ddpm_fast_emu_start
  .type ddpm_fast_emu_start, @function
  .p2align 4
ddpm_fast_emu_start:
  call ddpm_fast_emu_fiber_main
  ud2
  .size ddpm_fast_emu_start, .-ddpm_fast_emu_start
)");
#else
extern "C" void ddpm_fast_emu_fiber_main();
#endif

namespace ddpm_fast {
namespace emu {

Indices current_indices{};

namespace {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = size_t{64} << 10;

#if defined(__x86_64__)
struct Context {
  void* sp = nullptr;
};

// The first switch to a fresh stack "returns" into ddpm_fast_emu_start with the stack 16-byte
// aligned, which calls ddpm_fast_emu_fiber_main as the ABI expects.
void make_context(Context& context, char* stack, size_t bytes) {
  void** sp = reinterpret_cast<void**>(reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t{15});
  *--sp = reinterpret_cast<void*>(&ddpm_fast_emu_start);
  for (int reg = 0; reg < 6; ++reg) *--sp = nullptr;  // rbp, rbx, r12 .. r15
  context.sp = sp;
}

void switch_context(Context& from, Context& to) { ddpm_fast_emu_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};

void make_context(Context& context, char* stack, size_t bytes) {
  getcontext(&context.uc);
  context.uc.uc_stack.ss_sp = stack;
  context.uc.uc_stack.ss_size = bytes;
  context.uc.uc_link = nullptr;
  makecontext(&context.uc, &ddpm_fast_emu_fiber_main, 0);
}

void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// One stack per thread of the largest block, each above a guard page (an overflow faults).
class Stacks {
 public:
  char* stack(int i) {
    if (base_ == nullptr) allocate();
    return base_ + static_cast<size_t>(i) * stride_ + page_;
  }

 private:
  void allocate() {
    page_ = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    stride_ = kStackBytes + page_;
    void* p = mmap(nullptr, stride_ * kMaxThreads, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) {
      std::fprintf(stderr, "ddpm_fast CUDA emulation: cannot map the fiber stacks\n");
      std::abort();
    }
    base_ = static_cast<char*>(p);
    for (int i = 0; i < kMaxThreads; ++i) mprotect(base_ + static_cast<size_t>(i) * stride_, page_, PROT_NONE);
  }

  char* base_ = nullptr;
  size_t page_ = 0, stride_ = 0;
};

// ------------------------------------------------------------------------------ shared memory

// __shared__ variables are the thread_local statics of this library. On the worker thread they
// are the only thread_local data used, so the worker's whole TLS block of this library is the
// shared memory, and it is poisoned before each block.
thread_local unsigned char tls_anchor;  // a thread_local of this library, to find its TLS block

struct TlsBlock {
  void* data = nullptr;
  size_t bytes = 0;
};

int find_tls_block(dl_phdr_info* info, size_t, void* out) {
  TlsBlock& block = *static_cast<TlsBlock*>(out);
  const uintptr_t anchor = reinterpret_cast<uintptr_t>(&tls_anchor);
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    const uintptr_t data = reinterpret_cast<uintptr_t>(info->dlpi_tls_data);
    if (ph.p_type == PT_TLS && data != 0 && anchor >= data && anchor < data + ph.p_memsz) {
      block.data = info->dlpi_tls_data;
      block.bytes = ph.p_memsz;
      return 1;
    }
  }
  return 0;
}

void poison_shared_memory() {
  static TlsBlock block = [] {
    tls_anchor = 1;  // makes sure this thread's block exists
    TlsBlock b;
    dl_iterate_phdr(&find_tls_block, &b);
    if (b.data == nullptr) {
      std::fprintf(stderr, "ddpm_fast CUDA emulation: cannot find the thread_local block of __shared__ memory\n");
      std::abort();
    }
    return b;
  }();
  std::memset(block.data, 0xff, block.bytes);
}

// ------------------------------------------------------------------------------ scheduler

enum class State : unsigned char { kReady, kAtBarrier, kAtExchange, kExited, kFaulted };

struct Fiber {
  Context context;
  uint3 index;
  int warp, lane;
  State state;
  // The pending warp exchange.
  Exchange kind;
  unsigned mask;
  int arg, width;
  uint64_t value, result;
};

uint64_t mix(uint64_t x) {  // splitmix64
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

struct Rng {
  uint64_t state;
  uint64_t below(uint64_t n) { return mix(state++) % n; }
  template <typename V>
  void shuffle(V& v) {
    for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[below(i)]);
  }
};

struct Failure {
  cudaError_t error = cudaSuccess;
  std::string message;
};

std::string format(const char* fmt, va_list args) {
  char buffer[512];
  std::vsnprintf(buffer, sizeof buffer, fmt, args);
  return buffer;
}

// One launch, run by the worker thread.
class Grid {
 public:
  Grid(dim3 grid, dim3 block, void (*body)(const void*), const void* closure, uint64_t seed)
      : grid_(grid), block_(block), body_(body), closure_(closure), seed_(seed) {
    threads_ = static_cast<int>(block.x * block.y * block.z);
    warps_ = (threads_ + kWarp - 1) / kWarp;
    fibers_.resize(threads_);
  }

  Failure run(Stacks& stacks) {
    current_indices.block_dim = block_;
    current_indices.grid_dim = grid_;
    const uint64_t blocks = uint64_t{grid_.x} * grid_.y * grid_.z;
    // Blocks in a permuted order k -> (a k + b) mod blocks, a coprime to blocks.
    Rng rng{mix(seed_ ^ 0x5bd1e995u)};
    uint64_t a = 1 + rng.below(blocks);
    while (std::gcd(a, blocks) != 1) a = a % blocks + 1;
    const uint64_t b = rng.below(blocks);
    for (uint64_t k = 0; k < blocks && failure_.error == cudaSuccess; ++k) {
      const uint64_t linear = static_cast<uint64_t>((static_cast<unsigned __int128>(a) * k + b) % blocks);
      run_block(stacks, linear);
    }
    return failure_;
  }

  // Called on a fiber: wait at the barrier / at a warp exchange / stop the launch.
  void wait_at_barrier() {
    current_->state = State::kAtBarrier;
    yield();
  }

  uint64_t exchange(Exchange kind, unsigned mask, uint64_t value, int arg, int width) {
    Fiber& f = *current_;
    f.kind = kind;
    f.mask = mask;
    f.value = value;
    f.arg = arg;
    f.width = width;
    f.state = State::kAtExchange;
    yield();
    return f.result;
  }

  [[noreturn]] void fault(cudaError_t error, const std::string& what) {
    Fiber& f = *current_;
    fail(error, "%s in thread (%u,%u,%u) of block (%u,%u,%u)", what.c_str(), f.index.x, f.index.y, f.index.z,
         current_indices.block_idx.x, current_indices.block_idx.y, current_indices.block_idx.z);
    f.state = State::kFaulted;
    yield();
    std::abort();  // a faulted fiber is never resumed
  }

  void thread_main() {
    body_(closure_);
    current_->state = State::kExited;
    yield();
    std::abort();  // an exited fiber is never resumed
  }

  bool in_kernel() const { return current_ != nullptr; }

 private:
  void yield() { switch_context(current_->context, scheduler_); }

  __attribute__((format(printf, 3, 4))) void fail(cudaError_t error, const char* fmt, ...) {
    if (failure_.error != cudaSuccess) return;
    va_list args;
    va_start(args, fmt);
    failure_.error = error;
    failure_.message = format(fmt, args);
    va_end(args);
  }

  void run_block(Stacks& stacks, uint64_t linear) {
    current_indices.block_idx = uint3{static_cast<unsigned>(linear % grid_.x),
                                      static_cast<unsigned>(linear / grid_.x % grid_.y),
                                      static_cast<unsigned>(linear / (uint64_t{grid_.x} * grid_.y))};
    block_linear_ = linear;
    phase_ = 0;
    poison_shared_memory();
    for (int i = 0; i < threads_; ++i) {
      Fiber& f = fibers_[i];
      f.index = uint3{static_cast<unsigned>(i % block_.x), static_cast<unsigned>(i / block_.x % block_.y),
                      static_cast<unsigned>(i / (block_.x * block_.y))};
      f.warp = i / kWarp;
      f.lane = i % kWarp;
      make_context(f.context, stacks.stack(i), kStackBytes);
    }
    release_all();
    int exited = 0;
    while (failure_.error == cudaSuccess) {
      if (ready_.empty()) {
        if (exited == threads_) return;
        if (!everyone_waits_at_barrier(exited)) return;
        release_all();
        continue;
      }
      Fiber& f = fibers_[ready_.front()];
      ready_.pop_front();
      current_ = &f;
      current_indices.thread_idx = f.index;
      switch_context(scheduler_, f.context);
      current_ = nullptr;
      if (f.state == State::kExited) ++exited;
      if (f.state == State::kAtExchange) arrive_at_exchange(f);
    }
  }

  // All threads start (or leave a barrier) warp by warp, warps and lanes in a fresh order.
  void release_all() {
    Rng rng{mix(seed_ ^ mix(block_linear_ ^ mix(static_cast<uint64_t>(phase_++))))};
    std::vector<int> warps(warps_);
    std::iota(warps.begin(), warps.end(), 0);
    rng.shuffle(warps);
    for (const int w : warps) {
      std::vector<int> lanes;
      for (int i = w * kWarp; i < std::min(threads_, (w + 1) * kWarp); ++i) lanes.push_back(i);
      rng.shuffle(lanes);
      for (const int i : lanes) {
        fibers_[i].state = State::kReady;
        ready_.push_back(i);
      }
    }
  }

  // Nobody can run: either the whole block waits at __syncthreads() (release it), or it is stuck.
  bool everyone_waits_at_barrier(int exited) {
    int at_barrier = 0;
    for (const Fiber& f : fibers_) {
      if (f.state == State::kAtExchange) {
        fail(cudaErrorLaunchFailure,
             "deadlock: thread (%u,%u,%u) of block (%u,%u,%u) waits at a warp exchange (mask 0x%08x) that "
             "its warp never completes",
             f.index.x, f.index.y, f.index.z, current_indices.block_idx.x, current_indices.block_idx.y,
             current_indices.block_idx.z, f.mask);
        return false;
      }
      if (f.state == State::kAtBarrier) ++at_barrier;
    }
    if (exited > 0) {
      fail(cudaErrorLaunchFailure,
           "__syncthreads() reached by %d threads of block (%u,%u,%u) while %d of its threads have exited", at_barrier,
           current_indices.block_idx.x, current_indices.block_idx.y, current_indices.block_idx.z, exited);
      return false;
    }
    return true;
  }

  // Lane f arrived at a warp exchange; once every lane of its mask is there, exchange and run the
  // warp on ahead of the others.
  void arrive_at_exchange(const Fiber& f) {
    const int first = f.warp * kWarp;
    const int lanes_here = std::min(kWarp, threads_ - first);
    const unsigned present = lanes_here == kWarp ? 0xffffffffu : (1u << lanes_here) - 1;
    if (!(f.mask >> f.lane & 1u)) {
      return fail(cudaErrorLaunchFailure, "warp exchange with mask 0x%08x called by lane %d, which the mask excludes",
                  f.mask, f.lane);
    }
    if (f.mask & ~present) {
      return fail(cudaErrorLaunchFailure, "warp exchange mask 0x%08x names lanes beyond the %d threads of warp %d",
                  f.mask, lanes_here, f.warp);
    }
    if (f.kind != Exchange::kSync && (f.width < 1 || f.width > kWarp || (f.width & (f.width - 1)) != 0)) {
      return fail(cudaErrorLaunchFailure, "warp shuffle width %d is not a power of two in [1, 32]", f.width);
    }
    for (int lane = 0; lane < kWarp; ++lane) {
      if (!(f.mask >> lane & 1u)) continue;
      const Fiber& o = fibers_[first + lane];
      if (o.state == State::kExited || o.state == State::kAtBarrier) {
        return fail(cudaErrorLaunchFailure,
                    "deadlock: warp %d exchanges with mask 0x%08x but lane %d has %s", f.warp, f.mask, lane,
                    o.state == State::kExited ? "exited" : "gone to __syncthreads()");
      }
      if (o.state != State::kAtExchange) return;  // still on its way
      if (o.mask != f.mask || o.kind != f.kind || o.width != f.width) {
        return fail(cudaErrorLaunchFailure, "lanes %d and %d of warp %d are at different warp exchanges (mask 0x%08x "
                    "vs 0x%08x)", f.lane, lane, f.warp, f.mask, o.mask);
      }
    }
    std::vector<int> lanes;
    for (int lane = 0; lane < kWarp; ++lane) {
      if (!(f.mask >> lane & 1u)) continue;
      Fiber& o = fibers_[first + lane];
      if (o.kind != Exchange::kSync) {
        const int src = source_lane(o);
        if (!(f.mask >> src & 1u)) {
          return fail(cudaErrorLaunchFailure, "lane %d of warp %d shuffles from lane %d, which mask 0x%08x excludes",
                      lane, f.warp, src, f.mask);
        }
        o.result = fibers_[first + src].value;
      }
      lanes.push_back(first + lane);
    }
    Rng rng{mix(seed_ ^ mix(block_linear_ ^ mix(static_cast<uint64_t>(phase_++))))};
    rng.shuffle(lanes);
    for (auto it = lanes.rbegin(); it != lanes.rend(); ++it) {
      fibers_[*it].state = State::kReady;
      ready_.push_front(*it);
    }
  }

  // The lane a shuffle reads (PTX shfl.sync semantics: outside its width segment, a lane reads itself).
  static int source_lane(const Fiber& f) {
    const int lo = f.lane & ~(f.width - 1), hi = lo + f.width - 1;
    switch (f.kind) {
      case Exchange::kIndex: return lo + (f.arg & (f.width - 1));
      case Exchange::kXor: { const int j = f.lane ^ f.arg; return j >= 0 && j <= hi ? j : f.lane; }
      case Exchange::kUp: { const int j = f.lane - f.arg; return j >= lo ? j : f.lane; }
      case Exchange::kDown: { const int j = f.lane + f.arg; return j <= hi ? j : f.lane; }
      case Exchange::kSync: break;
    }
    return f.lane;
  }

  dim3 grid_, block_;
  void (*body_)(const void*);
  const void* closure_;
  uint64_t seed_;
  int threads_ = 0, warps_ = 0;
  std::vector<Fiber> fibers_;
  std::deque<int> ready_;
  Fiber* current_ = nullptr;
  Context scheduler_;
  uint64_t block_linear_ = 0;
  int phase_ = 0;
  Failure failure_;
};

Grid* running = nullptr;  // the launch the worker runs, if any
std::thread::id worker_id;

// The launch whose kernel code is calling, or nullptr in host code.
Grid* calling_grid() {
  return running != nullptr && running->in_kernel() && std::this_thread::get_id() == worker_id ? running : nullptr;
}

Grid& running_grid(const char* what) {
  if (calling_grid() == nullptr) {
    std::fprintf(stderr, "ddpm_fast CUDA emulation: %s called outside a kernel\n", what);
    std::abort();
  }
  return *running;
}

// ------------------------------------------------------------------------------ worker thread

// The one OS thread that runs kernels. Intentionally never destroyed (it may wait forever).
class Worker {
 public:
  Failure run(Grid& grid) {
    std::unique_lock<std::mutex> lock(mutex_);
    job_ = &grid;
    done_ = false;
    wake_.notify_all();
    finished_.wait(lock, [this] { return done_; });
    return result_;
  }

  static Worker& get() {
    static Worker* worker = new Worker;
    return *worker;
  }

 private:
  Worker() {
    std::thread thread([this] { loop(); });
    worker_id = thread.get_id();
    thread.detach();
  }

  void loop() {
    for (;;) {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [this] { return job_ != nullptr; });
      Grid* grid = job_;
      job_ = nullptr;
      lock.unlock();
      running = grid;
      Failure result = grid->run(stacks_);
      running = nullptr;
      lock.lock();
      result_ = std::move(result);
      done_ = true;
      finished_.notify_all();
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_, finished_;
  Grid* job_ = nullptr;
  bool done_ = false;
  Failure result_;
  Stacks stacks_;
};

std::mutex launch_mutex;  // one launch at a time, whichever thread calls

// cudaGetLastError is per host thread; the description of the last failure is kept for
// cudaGetErrorString. (Trivial types only: the worker's copies are poisoned with the shared memory.)
thread_local cudaError_t last_error = cudaSuccess;
thread_local cudaError_t described_error = cudaSuccess;
thread_local char description[512];

void set_error(cudaError_t error, const std::string& message) {
  last_error = error;
  described_error = error;
  std::snprintf(description, sizeof description, "%s", message.c_str());
}

const char* error_name(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorMisalignedAddress: return "misaligned address";
    default: return "unknown error";
  }
}

uint64_t schedule_seed() {
  const char* value = std::getenv("DDPM_FAST_EMULATION_SCHEDULE");
  return value ? std::strtoull(value, nullptr, 0) : 0;
}

// A launch configuration CUDA would reject, or an empty string.
std::string bad_configuration(dim3 grid, dim3 block, size_t shared_bytes) {
  char buffer[160];
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (threads == 0 || threads > kMaxThreads || block.z > 64) {
    std::snprintf(buffer, sizeof buffer, "block (%u,%u,%u): at most 1024 threads and block.z <= 64", block.x,
                  block.y, block.z);
    return buffer;
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    std::snprintf(buffer, sizeof buffer, "grid (%u,%u,%u) out of range", grid.x, grid.y, grid.z);
    return buffer;
  }
  if (shared_bytes != 0) return "dynamic shared memory is not emulated (launch with shared_bytes = 0)";
  return "";
}

}  // namespace

void syncthreads() { running_grid("__syncthreads()").wait_at_barrier(); }

uint64_t warp_exchange(Exchange kind, unsigned mask, uint64_t value, int arg, int width) {
  return running_grid("a warp shuffle").exchange(kind, mask, value, arg, width);
}

void trap() { running_grid("__trap()").fault(cudaErrorLaunchFailure, "__trap()"); }

cudaError_t get_last_error() {
  const cudaError_t error = last_error;
  last_error = cudaSuccess;
  return error;
}

const char* get_error_string(cudaError_t error) {
  if (error != cudaSuccess && error == described_error && description[0] != '\0') return description;
  return error_name(error);
}

void launch_grid(dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t, void (*thread_body)(const void*),
                 const void* closure) {
  if (std::this_thread::get_id() == worker_id) {
    return set_error(cudaErrorNotSupported, "operation not supported (CUDA emulation: a launch from a kernel)");
  }
  const std::string bad = bad_configuration(grid, block, shared_bytes);
  if (!bad.empty()) {
    const cudaError_t error = shared_bytes != 0 ? cudaErrorInvalidValue : cudaErrorInvalidConfiguration;
    return set_error(error, std::string(error_name(error)) + " (CUDA emulation: " + bad + ")");
  }
  std::lock_guard<std::mutex> lock(launch_mutex);
  Grid run(grid, block, thread_body, closure, schedule_seed());
  const Failure failure = Worker::get().run(run);
  if (failure.error != cudaSuccess) {
    set_error(failure.error, std::string(error_name(failure.error)) + " (CUDA emulation: " + failure.message + ")");
  }
}

// A kernel thread that misbehaves in a way the GPU would fault on: the launch stops with `error`.
// Outside a kernel (host code of the same build) the report is printed and execution goes on.
void sanitizer_fault(cudaError_t error, const std::string& what) {
  if (Grid* grid = calling_grid()) grid->fault(error, what);
  std::fprintf(stderr, "ddpm_fast CUDA emulation, host code: %s\n", what.c_str());
}

}  // namespace emu
}  // namespace ddpm_fast

extern "C" void ddpm_fast_emu_fiber_main() { ddpm_fast::emu::running->thread_main(); }

// ------------------------------------------------------------------------------ sanitizer hooks
//
// The build passes -fsanitize=alignment,bounds; these receive GCC's/Clang's reports instead of
// libubsan (the layouts are those of the sanitizer runtime's ubsan_handlers.h).
namespace {
struct SourceLocation {
  const char* file;
  unsigned line, column;
};
struct TypeMismatchData {
  SourceLocation location;
  const void* type;
  unsigned char log_alignment;
  unsigned char check_kind;
};
struct OutOfBoundsData {
  SourceLocation location;
  const void* array_type;
  const void* index_type;
};

std::string where(const SourceLocation& location) {
  return std::string(location.file ? location.file : "?") + ":" + std::to_string(location.line);
}

void misaligned(const TypeMismatchData* data, uintptr_t pointer) {
  char what[96];
  std::snprintf(what, sizeof what, "access to %p, which is not %u-byte aligned,", reinterpret_cast<void*>(pointer),
                1u << data->log_alignment);
  ddpm_fast::emu::sanitizer_fault(cudaErrorMisalignedAddress, what + (" at " + where(data->location)));
}

void out_of_bounds(const OutOfBoundsData* data, uintptr_t index) {
  const std::string what = "array index " + std::to_string(static_cast<intptr_t>(index)) + " out of bounds";
  ddpm_fast::emu::sanitizer_fault(cudaErrorIllegalAddress, what + " at " + where(data->location));
}
}  // namespace

#define DDPM_EMU_HOOK extern "C" __attribute__((visibility("hidden")))
DDPM_EMU_HOOK void __ubsan_handle_type_mismatch_v1(TypeMismatchData* data, uintptr_t pointer) {
  misaligned(data, pointer);
}
DDPM_EMU_HOOK void __ubsan_handle_type_mismatch_v1_abort(TypeMismatchData* data, uintptr_t pointer) {
  misaligned(data, pointer);
}
DDPM_EMU_HOOK void __ubsan_handle_out_of_bounds(OutOfBoundsData* data, uintptr_t index) { out_of_bounds(data, index); }
DDPM_EMU_HOOK void __ubsan_handle_out_of_bounds_abort(OutOfBoundsData* data, uintptr_t index) {
  out_of_bounds(data, index);
}
#undef DDPM_EMU_HOOK
