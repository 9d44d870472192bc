// Raw-pointer entry points of the q_sample and sampler-step kernels, for CPU
// (csrc/cpu/diffusion_steps.cpp) and CUDA (csrc/cuda/diffusion_steps.cu). Free of torch and
// CUDA headers: csrc/diffusion_steps_ops.cpp checks the tensors and fills these structs.
//
// Tensors are "batch-dense": element i of the storage (0 <= i < numel) belongs to batch
// element i / per_batch, and x, model_output (each half of it when guided), h1, h2, noise and
// the outputs share that storage order.
#pragma once

#include <cstdint>

namespace ddpm_fast {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

struct StepArgs {
  const void* x;
  const void* model_output;  // [B, ...], or guided [2B, ...]: m_c at storage index i, m_u at i + numel
  const void* h1;            // earlier x0 predictions (x's dtype), or nullptr for an absent term
  const void* h2;
  const void* noise;         // given noise (x's dtype), or nullptr
  const int64_t* seed;       // one-element seed for in-kernel noise, or nullptr; no z term when both are null
  const int64_t* index;      // [batch] table rows, each in [0, num_rows)
  const float* table;        // [num_rows, 8] float32, contiguous
  void* out;
  void* x0_out;              // receives the (clamped) x0 prediction (x's dtype), or nullptr
  int64_t num_rows;
  int64_t numel;             // of x
  int64_t per_batch;         // numel / batch
  bool guided;
  bool clip_denoised;
  DType dtype;
};

struct QSampleArgs {
  const void* x_start;
  const void* noise;        // given noise, or nullptr when drawn from seed
  const int64_t* seed;      // exactly one of noise and seed is set
  const int64_t* t;
  const float* table;       // [num_timesteps, 2] float32, contiguous
  void* out;
  void* drawn_noise;        // receives the drawn noise when seed is set
  int64_t num_timesteps;
  int64_t numel;
  int64_t per_batch;
  DType dtype;
};

// CPU kernels. The caller has checked every t / index against the table's rows.
void q_sample_cpu(const QSampleArgs& args);
void sampler_step_cpu(const StepArgs& args);

// CUDA kernels, launched on `stream` (a cudaStream_t). Return nullptr on success, else the
// CUDA error string of the launch. A t / index outside the table stops the kernel with a
// device-side trap (the CUDA context then reports an error) before any table read.
const char* q_sample_cuda(const QSampleArgs& args, void* stream);
const char* sampler_step_cuda(const StepArgs& args, void* stream);

}  // namespace ddpm_fast
