// The CUDA execution model on the CPU, for the test-only emulated build of csrc/cuda/*.cu
// (ddpm_fast.testing.cuda_emulation). The kernel files compile unchanged with the host C++
// compiler against this header; the engine is csrc/emulation/cuda_emulation.cpp.
//
// What a kernel sees:
// - threadIdx, blockIdx, blockDim, gridDim (the types of CUDA's vector_types.h), warpSize.
// - __syncthreads(): a barrier of the block's threads. Every thread of the block must reach it;
//   a thread that has exited while others wait there is a launch error, as is any deadlock.
// - __shfl_sync / __shfl_xor_sync / __shfl_up_sync / __shfl_down_sync and __syncwarp: an
//   exchange among the lanes named in the mask, which must all arrive at the same call with the
//   same mask; reading a lane outside the mask is a launch error.
// - __shared__ variables: thread_local statics of the one OS thread that runs all blocks, one
//   block at a time; before each block they are filled with 0xff bytes (NaN as float), so a read
//   before the block's own write gives NaN. Dynamic shared memory (extern __shared__) is not
//   emulated: launch with shared_bytes = 0.
// - __trap(): stops the launch; cudaGetLastError() then returns cudaErrorLaunchFailure.
// - fp16 / bf16: CUDA's own cuda_fp16.h / cuda_bf16.h, whose host code compiles with g++.
// - cudaStream_t, cudaError_t, dim3 from CUDA's headers; cudaGetLastError / cudaGetErrorString
//   are the emulator's. Launches are synchronous; the stream is ignored.
//
// How it runs: one block at a time, its threads as fibers on one OS thread of the emulator's
// own (so that nothing else uses its thread_local storage, which holds __shared__). A thread
// runs until it reaches a barrier, a warp exchange or its end, then the scheduler picks the
// next. The order is chosen to expose races rather than hide them: after each barrier the
// warps restart in a fresh pseudo-random order (lanes too), and a warp whose exchange completes
// runs on ahead of the others up to its next barrier. So one warp overtakes the rest across
// reductions and reads of shared memory, and a missing __syncthreads() or a wrong exchange shows
// up as a wrong result. The order depends only on the block index and on the seed in the
// environment variable DDPM_FAST_EMULATION_SCHEDULE (default 0): a race-free kernel gives the
// same bits for every seed.
//
// Built with -fsanitize=alignment,bounds (as ddpm_fast.testing does), a misaligned vector
// access (a fault on the GPU) or an out-of-bounds index into a fixed-size array such as a
// __shared__ one is a launch error too (cudaErrorMisalignedAddress / cudaErrorIllegalAddress).
#pragma once

#if defined(__CUDACC__)
#error "cuda_emulation.h is for the host compiler; nvcc builds the kernels for the GPU"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// crt/host_defines.h gives empty __global__ / __device__ / __host__ and __forceinline__ on the host.
#undef __shared__
#define __shared__ static thread_local
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace ddpm_fast {
namespace emu {

// The launch indices of the thread that runs (set by the scheduler before it resumes a thread).
struct Indices {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};
extern Indices current_indices;

enum class Exchange : int { kIndex, kXor, kUp, kDown, kSync };

// The calling thread waits at the block barrier / exchanges `value` (up to 8 bytes) within its warp.
void syncthreads();
uint64_t warp_exchange(Exchange kind, unsigned mask, uint64_t value, int arg, int width);
[[noreturn]] void trap();

cudaError_t get_last_error();
const char* get_error_string(cudaError_t error);

// Runs `thread_body(closure)` for every thread of the grid (the type-erased kernel call).
void launch_grid(dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream, void (*thread_body)(const void*),
                 const void* closure);

// kernel<<<grid, block, shared_bytes, stream>>>(args...): every thread calls the kernel with its
// own copies of the arguments, converted to the kernel's parameter types once, as CUDA does.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
            Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "launch: wrong number of kernel arguments");
  struct Closure {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> params;
  };
  const Closure closure{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
  launch_grid(grid, block, shared_bytes, stream,
              [](const void* p) {
                const Closure& c = *static_cast<const Closure*>(p);
                std::apply(c.kernel, c.params);
              },
              &closure);
}

template <typename T>
T shuffle(Exchange kind, unsigned mask, T value, int arg, int width) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "a warp shuffle moves at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = warp_exchange(kind, mask, bits, arg, width);
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

}  // namespace emu
}  // namespace ddpm_fast

// The CUDA built-ins, under their CUDA names.
inline const uint3& threadIdx = ddpm_fast::emu::current_indices.thread_idx;
inline const uint3& blockIdx = ddpm_fast::emu::current_indices.block_idx;
inline const dim3& blockDim = ddpm_fast::emu::current_indices.block_dim;
inline const dim3& gridDim = ddpm_fast::emu::current_indices.grid_dim;
inline constexpr int warpSize = 32;

inline void __syncthreads() { ddpm_fast::emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ddpm_fast::emu::warp_exchange(ddpm_fast::emu::Exchange::kSync, mask, 0, 0, warpSize);
}
[[noreturn]] inline void __trap() { ddpm_fast::emu::trap(); }

template <typename T>
T __shfl_sync(unsigned mask, T value, int src_lane, int width = warpSize) {
  return ddpm_fast::emu::shuffle(ddpm_fast::emu::Exchange::kIndex, mask, value, src_lane, width);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = warpSize) {
  return ddpm_fast::emu::shuffle(ddpm_fast::emu::Exchange::kXor, mask, value, lane_mask, width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = warpSize) {
  return ddpm_fast::emu::shuffle(ddpm_fast::emu::Exchange::kUp, mask, value, static_cast<int>(delta), width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = warpSize) {
  return ddpm_fast::emu::shuffle(ddpm_fast::emu::Exchange::kDown, mask, value, static_cast<int>(delta), width);
}

// The runtime calls the launchers make, answered by the emulator (CUDA's declarations stay unused).
#define cudaGetLastError ::ddpm_fast::emu::get_last_error
#define cudaGetErrorString ::ddpm_fast::emu::get_error_string
