// The CUDA emulation's own semantics, on small kernels of its own (tests/test_cuda_emulated.py
// compiles and runs this with the host compiler; exit status 0 when every check holds).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "ddpm_fast/cuda_launch.h"

using ddpm_fast::launch;

static int failures = 0;

#define CHECK(cond, ...)                                   \
  do {                                                     \
    if (!(cond)) {                                         \
      std::printf("FAILED %s:%d: ", __FILE__, __LINE__);   \
      std::printf(__VA_ARGS__);                            \
      std::printf("\n");                                   \
      ++failures;                                          \
    }                                                      \
  } while (0)

// The launch error, checked against its code and a piece of its description.
static void expect_error(cudaError_t expected, const char* text, const char* what) {
  const cudaError_t error = cudaGetLastError();
  const std::string message = cudaGetErrorString(error);
  CHECK(error == expected && message.find(text) != std::string::npos, "%s: got %d (%s), expected %d with '%s'", what,
        static_cast<int>(error), message.c_str(), static_cast<int>(expected), text);
  CHECK(cudaGetLastError() == cudaSuccess, "%s: cudaGetLastError() must reset the error", what);
}

static void expect_success(const char* what) {
  const cudaError_t error = cudaGetLastError();
  CHECK(error == cudaSuccess, "%s: launch error %s", what, cudaGetErrorString(error));
}

// ------------------------------------------------------------------------------ kernels

__global__ void read_shared_before_write(float* out) {
  __shared__ float s[64];
  out[blockIdx.x * blockDim.x + threadIdx.x] = s[threadIdx.x];
  s[threadIdx.x] = 1.0f;
}

// Each thread takes a ticket (its block's running count) before and after a barrier or a shuffle.
__global__ void tickets(int* before, int* after, int* counters, bool barrier) {
  const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  int& counter = counters[blockIdx.x];
  before[i] = counter++;
  if (barrier) {
    __syncthreads();
  } else {
    __shfl_xor_sync(0xffffffffu, 0, 1);
  }
  after[i] = counter++;
}

// A block reduction through shared memory: needs both barriers.
__global__ void block_total(const int* in, int* out) {
  __shared__ int partial[8];
  int v = in[threadIdx.x];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  int total = 0;
  for (unsigned w = 0; w < blockDim.x / 32; ++w) total += partial[w];
  out[threadIdx.x] = total;
}

__global__ void shuffles(int* out, int width) {
  const int lane = static_cast<int>(threadIdx.x % 32), i = static_cast<int>(threadIdx.x) * 4;
  out[i + 0] = __shfl_sync(0xffffffffu, lane * 10, 3 + lane, width);
  out[i + 1] = __shfl_up_sync(0xffffffffu, lane * 10, 2, width);
  out[i + 2] = __shfl_down_sync(0xffffffffu, lane * 10, 5, width);
  out[i + 3] = __shfl_xor_sync(0xffffffffu, lane * 10, 9, width);
}

__global__ void shuffle_double(double* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 0.5 + threadIdx.x, 1);
}

__global__ void divergent_barrier(int* out) {
  if (threadIdx.x < 16) __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void shuffle_after_exit(int* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

__global__ void shuffle_outside_mask(int* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, static_cast<int>(threadIdx.x), 16);
}

__global__ void misaligned_vector(const float* p, float* out) {
  struct alignas(16) Pack {
    float v[4];
  };
  out[threadIdx.x] = reinterpret_cast<const Pack*>(p)->v[0];
}

__global__ void shared_out_of_bounds(int* out, int index) {
  __shared__ int s[4];
  s[threadIdx.x % 4] = 1;
  __syncthreads();
  out[threadIdx.x] = s[index];
}

__global__ void trap_in_block_one(int* blocks_done) {
  if (blockIdx.x == 1 && threadIdx.x == 5) __trap();
  __syncthreads();
  if (threadIdx.x == 0) ++*blocks_done;
}

__global__ void indices(unsigned* out) {
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  out[b * blockDim.x * blockDim.y * blockDim.z + t] = b * 1000 + t;
}

// ------------------------------------------------------------------------------ checks

int main() {
  {  // __shared__ is NaN until the block writes it, in every block
    std::vector<float> out(3 * 64, 0.0f);
    launch(read_shared_before_write, 3, 64, 0, nullptr, out.data());
    expect_success("read_shared_before_write");
    int nan = 0;
    for (float v : out) nan += std::isnan(v);
    CHECK(nan == 3 * 64, "shared memory read before the block's write: %d of %d NaN", nan, 3 * 64);
  }
  {  // the barrier is real; threads start warp by warp, warps and lanes in a permuted order
    constexpr int kBlocks = 8, kThreads = 128;
    std::vector<int> before(kBlocks * kThreads), after(kBlocks * kThreads), counters(kBlocks, 0);
    launch(tickets, kBlocks, kThreads, 0, nullptr, before.data(), after.data(), counters.data(), true);
    expect_success("tickets");
    int lanes_in_place = 0, warps_in_place = 0;
    for (int b = 0; b < kBlocks; ++b) {
      const int* bef = &before[b * kThreads];
      const int* aft = &after[b * kThreads];
      int last_before = 0, first_after = 1 << 30;
      for (int i = 0; i < kThreads; ++i) {
        last_before = std::max(last_before, bef[i]);
        first_after = std::min(first_after, aft[i]);
        lanes_in_place += bef[i] % 32 == i % 32;
      }
      CHECK(last_before < first_after, "block %d: a thread passed __syncthreads() before all reached it", b);
      for (int w = 0; w < kThreads / 32; ++w) {  // the 32 lanes of a warp take consecutive tickets
        int lo = 1 << 30, hi = -1;
        for (int l = 0; l < 32; ++l) {
          lo = std::min(lo, bef[w * 32 + l]);
          hi = std::max(hi, bef[w * 32 + l]);
        }
        CHECK(hi - lo == 31, "block %d: warp %d did not start as a unit (tickets %d .. %d)", b, w, lo, hi);
        warps_in_place += lo == w * 32;
      }
    }
    CHECK(lanes_in_place < kBlocks * kThreads / 4, "lanes ran in index order (%d in place)", lanes_in_place);
    CHECK(warps_in_place < kBlocks * kThreads / 32 / 2, "warps ran in index order (%d in place)", warps_in_place);
    const std::vector<int> first_order = before;
    setenv("DDPM_FAST_EMULATION_SCHEDULE", "7", 1);
    std::fill(counters.begin(), counters.end(), 0);
    launch(tickets, kBlocks, kThreads, 0, nullptr, before.data(), after.data(), counters.data(), true);
    unsetenv("DDPM_FAST_EMULATION_SCHEDULE");
    CHECK(before != first_order, "another schedule seed gave the same thread order");
  }
  {  // a warp whose shuffle completes runs on ahead: the first warp's lanes take tickets 32 .. 63
    std::vector<int> before(128), after(128), counter(1, 0);
    launch(tickets, 1, 128, 0, nullptr, before.data(), after.data(), counter.data(), false);
    expect_success("tickets after a shuffle");
    for (int i = 0; i < 128; ++i) {
      if (before[i] < 32) CHECK(after[i] >= 32 && after[i] < 64, "the first warp did not run ahead (thread %d)", i);
    }
  }
  {  // a reduction over warps and shared memory
    std::vector<int> in(256), out(256, -1);
    int expected = 0;
    for (int i = 0; i < 256; ++i) expected += in[i] = i * 7 % 13;
    launch(block_total, 1, 256, 0, nullptr, in.data(), out.data());
    expect_success("block_total");
    for (int i = 0; i < 256; ++i) CHECK(out[i] == expected, "block_total[%d] = %d, expected %d", i, out[i], expected);
  }
  for (int width : {32, 16, 8}) {  // shuffles: PTX shfl.sync semantics within segments of `width` lanes
    std::vector<int> out(64 * 4);
    launch(shuffles, 1, 64, 0, nullptr, out.data(), width);
    expect_success("shuffles");
    for (int t = 0; t < 64; ++t) {
      const int lane = t % 32, lo = lane / width * width, hi = lo + width - 1;
      const int idx = lo + (3 + lane) % width, up = lane - 2 >= lo ? lane - 2 : lane;
      const int down = lane + 5 <= hi ? lane + 5 : lane, x = (lane ^ 9) <= hi ? lane ^ 9 : lane;
      const int expected[4] = {idx * 10, up * 10, down * 10, x * 10};
      for (int k = 0; k < 4; ++k) {
        CHECK(out[t * 4 + k] == expected[k], "shuffle %d, width %d, thread %d: %d, expected %d", k, width, t,
              out[t * 4 + k], expected[k]);
      }
    }
  }
  {
    std::vector<double> out(32);
    launch(shuffle_double, 1, 32, 0, nullptr, out.data());
    expect_success("shuffle_double");
    for (int i = 0; i < 32; ++i) CHECK(out[i] == 0.5 + (i ^ 1), "a double shuffle lost bits at lane %d", i);
  }
  {  // synchronisation misuse, faults and bad configurations are launch errors
    std::vector<int> out(64);
    launch(divergent_barrier, 1, 64, 0, nullptr, out.data());
    expect_error(cudaErrorLaunchFailure, "__syncthreads() reached by 16 threads", "divergent __syncthreads()");
    launch(shuffle_after_exit, 1, 32, 0, nullptr, out.data());
    expect_error(cudaErrorLaunchFailure, "deadlock", "shuffle with exited lanes");
    launch(shuffle_outside_mask, 1, 32, 0, nullptr, out.data());
    expect_error(cudaErrorLaunchFailure, "which mask 0x0000ffff excludes", "shuffle from a lane outside the mask");
    alignas(16) float data[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    float fout[4];
    launch(misaligned_vector, 1, 4, 0, nullptr, data + 1, fout);
    expect_error(cudaErrorMisalignedAddress, "not 16-byte aligned", "misaligned vector load");
    launch(misaligned_vector, 1, 4, 0, nullptr, data + 4, fout);
    expect_success("aligned vector load");
    launch(shared_out_of_bounds, 1, 32, 0, nullptr, out.data(), 4);
    expect_error(cudaErrorIllegalAddress, "array index 4 out of bounds", "__shared__ index out of bounds");
    int blocks_done = 0;
    launch(trap_in_block_one, 64, 32, 0, nullptr, &blocks_done);
    expect_error(cudaErrorLaunchFailure, "__trap() in thread (5,0,0) of block (1,0,0)", "__trap()");
    CHECK(blocks_done < 64, "__trap() did not stop the launch (%d of 64 blocks finished)", blocks_done);
    launch(trap_in_block_one, 1, 2048, 0, nullptr, &blocks_done);
    expect_error(cudaErrorInvalidConfiguration, "at most 1024 threads", "too many threads");
    launch(trap_in_block_one, 1, 32, 16, nullptr, &blocks_done);
    expect_error(cudaErrorInvalidValue, "dynamic shared memory", "dynamic shared memory");
  }
  {  // 3-D grids and blocks: every (block, thread) runs once with its indices
    const dim3 grid(3, 2, 2), block(4, 3, 2);
    std::vector<unsigned> out(12 * 24, 0xffffffffu);
    launch(indices, grid, block, 0, nullptr, out.data());
    expect_success("indices");
    for (unsigned b = 0; b < 12; ++b) {
      for (unsigned t = 0; t < 24; ++t) CHECK(out[b * 24 + t] == b * 1000 + t, "block %u thread %u missing", b, t);
    }
  }
  if (failures == 0) std::printf("all emulation checks passed\n");
  return failures == 0 ? 0 : 1;
}
