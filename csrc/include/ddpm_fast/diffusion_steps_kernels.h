// Raw-pointer entry points of the q_sample / reverse-step / DDIM-step / DPM-Solver++-step kernels, for CPU
// (csrc/cpu/diffusion_steps.cpp) and CUDA (csrc/cuda/diffusion_steps.cu). Free of torch and
// CUDA headers: csrc/diffusion_steps_ops.cpp checks the tensors and fills these structs.
//
// Tensors are "batch-dense": element i of the storage (0 <= i < numel) belongs to batch
// element i / per_batch, and x, model_output, noise and the outputs share that storage order.
//
// The DPM-Solver++ step runs on the step kernels: the previous x0 is the given noise (or z = 0
// when there is none) and x0_out receives the new x0.
#pragma once

#include <cstdint>

namespace ddpm_fast {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

struct StepArgs {
  const void* x_t;
  const void* model_output;
  const void* noise;        // given noise (x_t's dtype), or nullptr
  const int64_t* seed;      // one-element seed for in-kernel noise, or nullptr; z = 0 when both are null
  const int64_t* t;         // [batch] timesteps, each in [0, num_timesteps)
  const float* table;       // [num_timesteps, 5] float32, contiguous
  void* out;
  void* x0_out;             // receives the (clamped) x0 prediction (x_t's dtype), or nullptr
  int64_t num_timesteps;
  int64_t numel;
  int64_t per_batch;        // numel / batch
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

// CPU kernels. The caller has checked every t against num_timesteps.
void q_sample_cpu(const QSampleArgs& args);
void step_cpu(const StepArgs& args);  // also the DPM-Solver++ step, with x0_out set

// CUDA kernels, launched on `stream` (a cudaStream_t). Return nullptr on success, else the
// CUDA error string of the launch. A t outside [0, num_timesteps) stops the kernel with a
// device-side trap (the CUDA context then reports an error) before any table read.
const char* q_sample_cuda(const QSampleArgs& args, void* stream);
const char* step_cuda(const StepArgs& args, void* stream);  // x0_out must be nullptr
// The DPM-Solver++ step: x0_out set, seed nullptr, noise = x0_prev or nullptr.
const char* dpm_solver_step_cuda(const StepArgs& args, void* stream);

}  // namespace ddpm_fast
