// CUDA kernels of q_sample and the sampler step (declared in diffusion_steps_kernels.h).
//
// Memory-bound elementwise kernels. Each thread handles a group of four consecutive storage
// elements 4g .. 4g+3: one vector load per tensor when the pointers allow it, and one Philox
// call feeding the group's four normals (the counter-group layout of philox.h). Grid-stride
// loop, 64-bit indices. The seed is read from device memory, so a captured CUDA graph draws
// new noise whenever the seed tensor is refilled before a replay.
//
// A t / index outside the table's rows stops the kernel with __trap() before the table row is
// read (the launch then fails with cudaErrorLaunchFailure / an illegal-instruction error, which
// torch reports at the next synchronising call). This replaces a host-side range check, which
// would need a device-to-host sync.
//
// No torch header here: the binding in csrc/diffusion_steps_ops.cpp passes raw pointers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ddpm_fast/cuda_dtype.cuh"
#include "ddpm_fast/cuda_launch.h"
#include "ddpm_fast/diffusion_steps.h"
#include "ddpm_fast/diffusion_steps_kernels.h"
#include "ddpm_fast/philox.h"

namespace ddpm_fast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;  // the grid-stride loop covers the rest

enum NoiseMode { kNoNoise = 0, kGivenNoise = 1, kDrawnNoise = 2 };

// Four consecutive elements: one 16-byte (float) or 8-byte (half) access.
template <typename T>
struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

// Elements i .. i+3 as floats; past numel reads nothing (those lanes are never stored).
template <typename T, bool kVec>
__device__ __forceinline__ void load4(const T* __restrict__ p, int64_t i, int64_t numel, float out[4]) {
  if (kVec && i + 4 <= numel) {
    const Pack4<T> pack = *reinterpret_cast<const Pack4<T>*>(p + i);
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = to_float(pack.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = i + k < numel ? to_float(p[i + k]) : 0.0f;
  }
}

template <typename T, bool kVec>
__device__ __forceinline__ void store4(T* __restrict__ p, int64_t i, int64_t numel, const float v[4]) {
  if (kVec && i + 4 <= numel) {
    Pack4<T> pack;
#pragma unroll
    for (int k = 0; k < 4; ++k) pack.v[k] = from_float<T>(v[k]);
    *reinterpret_cast<Pack4<T>*>(p + i) = pack;
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (i + k < numel) p[i + k] = from_float<T>(v[k]);
    }
  }
}

// The four normals of group g, rounded to T: the value returned as noise is the value used.
template <typename T>
__device__ __forceinline__ void drawn_normals(uint64_t seed, int64_t g, float z[4]) {
  philox_normal4(seed, static_cast<uint64_t>(g), z);
#pragma unroll
  for (int k = 0; k < 4; ++k) z[k] = to_float(from_float<T>(z[k]));
}

// Batch element of storage index e; 32-bit division whenever the operands fit (much cheaper).
__device__ __forceinline__ int64_t batch_of(int64_t e, int64_t per_batch) {
  if ((static_cast<uint64_t>(e | per_batch) >> 32) == 0) {
    return static_cast<uint32_t>(e) / static_cast<uint32_t>(per_batch);
  }
  return e / per_batch;
}

// Row table[t[b]] of a [num_rows, columns] table; traps on an out-of-range t.
__device__ __forceinline__ const float* table_row(const float* table, const int64_t* t, int64_t b, int64_t num_rows,
                                                  int columns) {
  const int64_t tb = t[b];
  if (tb < 0 || tb >= num_rows) __trap();
  return table + tb * columns;
}

// Calls f(k, c) for each in-range element 4g + k of the group, with c = load(row of its batch
// element). The row is looked up and loaded again only when the group crosses into the next one.
template <typename Load, typename F>
__device__ __forceinline__ void for_each_in_group(int64_t i, int64_t numel, int64_t per_batch, const int64_t* t,
                                                  const float* table, int64_t num_rows, int columns, Load load, F f) {
  int64_t batch_end = 0;
  decltype(load(table)) c{};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int64_t e = i + k;
    if (e < numel) {
      if (e >= batch_end) {
        const int64_t b = batch_of(e, per_batch);
        batch_end = (b + 1) * per_batch;
        c = load(table_row(table, t, b, num_rows, columns));
      }
      f(k, c);
    }
  }
}

// Template parameters: what decides the memory accesses per element (dtype, vector width, the
// noise source). The other terms are uniform flags: an absent tensor is never loaded or stored.
template <typename T, bool kVec, int kNoise>
__global__ void __launch_bounds__(kThreads) step_kernel(StepArgs a) {
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const T* __restrict__ m = static_cast<const T*>(a.model_output);
  const StepTerms terms{a.guided, a.clip_denoised, a.h1 != nullptr, a.h2 != nullptr, kNoise != kNoNoise};
  const uint64_t seed = kNoise == kDrawnNoise ? static_cast<uint64_t>(*a.seed) : 0;
  const int64_t groups = (a.numel + 3) / 4;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t i = g * 4;
    float xv[4], mc[4], mu[4] = {}, h1[4] = {}, h2[4] = {}, z[4] = {}, o[4], x0[4];
    load4<T, kVec>(x, i, a.numel, xv);
    load4<T, kVec>(m, i, a.numel, mc);
    if (terms.guided) load4<T, kVec>(m + a.numel, i, a.numel, mu);
    if (terms.h1) load4<T, kVec>(static_cast<const T*>(a.h1), i, a.numel, h1);
    if (terms.h2) load4<T, kVec>(static_cast<const T*>(a.h2), i, a.numel, h2);
    if (kNoise == kGivenNoise) load4<T, kVec>(static_cast<const T*>(a.noise), i, a.numel, z);
    if (kNoise == kDrawnNoise) drawn_normals<T>(seed, g, z);
    for_each_in_group(
        i, a.numel, a.per_batch, a.index, a.table, a.num_rows, kStepColumns,
        [](const float* row) { return step_coefficients(row); },
        [&](int k, const StepCoefficients& c) {
          const StepValues v = step_values(c, terms, xv[k], mc[k], mu[k], h1[k], h2[k], z[k]);
          o[k] = v.out;
          x0[k] = v.x0;
        });
    store4<T, kVec>(static_cast<T*>(a.out), i, a.numel, o);
    if (a.x0_out != nullptr) store4<T, kVec>(static_cast<T*>(a.x0_out), i, a.numel, x0);
  }
}

template <typename T, bool kVec, bool kDrawn>
__global__ void __launch_bounds__(kThreads) q_sample_kernel(QSampleArgs a) {
  const T* __restrict__ x = static_cast<const T*>(a.x_start);
  T* __restrict__ out = static_cast<T*>(a.out);
  const uint64_t seed = kDrawn ? static_cast<uint64_t>(*a.seed) : 0;
  const int64_t groups = (a.numel + 3) / 4;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t i = g * 4;
    float xv[4], z[4], o[4];
    load4<T, kVec>(x, i, a.numel, xv);
    if (kDrawn) {
      drawn_normals<T>(seed, g, z);
      store4<T, kVec>(static_cast<T*>(a.drawn_noise), i, a.numel, z);
    } else {
      load4<T, kVec>(static_cast<const T*>(a.noise), i, a.numel, z);
    }
    for_each_in_group(i, a.numel, a.per_batch, a.t, a.table, a.num_timesteps, kQSampleColumns,
                      [](const float* row) { return row; }, [&](int k, const float* row) {
                        o[k] = q_sample_value(row[kSqrtAlphasCumprod], row[kSqrtOneMinusAlphasCumprod], xv[k], z[k]);
                      });
    store4<T, kVec>(out, i, a.numel, o);
  }
}

bool aligned(const void* p, int bytes) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0; }

unsigned int grid_for(int64_t numel) {
  const int64_t groups = (numel + 3) / 4;
  const int64_t blocks = (groups + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

const char* launch_error() {
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

template <typename T, bool kVec>
void launch_step(const StepArgs& a, cudaStream_t stream) {
  const unsigned int grid = grid_for(a.numel);
  if (a.seed != nullptr) {
    launch(step_kernel<T, kVec, kDrawnNoise>, grid, kThreads, 0, stream, a);
  } else if (a.noise != nullptr) {
    launch(step_kernel<T, kVec, kGivenNoise>, grid, kThreads, 0, stream, a);
  } else {
    launch(step_kernel<T, kVec, kNoNoise>, grid, kThreads, 0, stream, a);
  }
}

// The vector path needs every tensor it touches 4-element aligned, the unconditional half too.
template <typename T>
void launch_step(const StepArgs& a, cudaStream_t stream) {
  const int bytes = 4 * sizeof(T);
  const void* m_u = a.guided ? static_cast<const T*>(a.model_output) + a.numel : nullptr;
  if (aligned(a.x, bytes) && aligned(a.model_output, bytes) && aligned(m_u, bytes) && aligned(a.h1, bytes) &&
      aligned(a.h2, bytes) && aligned(a.noise, bytes) && aligned(a.out, bytes) && aligned(a.x0_out, bytes)) {
    launch_step<T, true>(a, stream);
  } else {
    launch_step<T, false>(a, stream);
  }
}

template <typename T>
void launch_q_sample(const QSampleArgs& a, cudaStream_t stream) {
  const unsigned int grid = grid_for(a.numel);
  const int bytes = 4 * sizeof(T);
  const bool vec = aligned(a.x_start, bytes) && aligned(a.noise, bytes) && aligned(a.out, bytes) &&
                   aligned(a.drawn_noise, bytes);
  const bool drawn = a.seed != nullptr;
  if (vec && drawn) launch(q_sample_kernel<T, true, true>, grid, kThreads, 0, stream, a);
  if (vec && !drawn) launch(q_sample_kernel<T, true, false>, grid, kThreads, 0, stream, a);
  if (!vec && drawn) launch(q_sample_kernel<T, false, true>, grid, kThreads, 0, stream, a);
  if (!vec && !drawn) launch(q_sample_kernel<T, false, false>, grid, kThreads, 0, stream, a);
}

}  // namespace

const char* sampler_step_cuda(const StepArgs& args, void* stream) {
  if (args.numel == 0) return nullptr;
  const auto s = static_cast<cudaStream_t>(stream);
  switch (args.dtype) {
    case DType::Float32: launch_step<float>(args, s); break;
    case DType::Float16: launch_step<__half>(args, s); break;
    case DType::BFloat16: launch_step<__nv_bfloat16>(args, s); break;
  }
  return launch_error();
}

const char* q_sample_cuda(const QSampleArgs& args, void* stream) {
  if (args.numel == 0) return nullptr;
  const auto s = static_cast<cudaStream_t>(stream);
  switch (args.dtype) {
    case DType::Float32: launch_q_sample<float>(args, s); break;
    case DType::Float16: launch_q_sample<__half>(args, s); break;
    case DType::BFloat16: launch_q_sample<__nv_bfloat16>(args, s); break;
  }
  return launch_error();
}

}  // namespace ddpm_fast
