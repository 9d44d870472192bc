// torch.ops.ddpm_fast.{q_sample, sampler_step}: schemas, input checks, and the CPU and CUDA
// implementations (fake impls and autograd are registered from Python, in
// ddpm_fast/ops/diffusion_steps.py and ddpm_fast/ops/sampler_step.py). The kernels take raw pointers; this file checks every
// tensor first so that a bad input is a Python ValueError/TypeError, never an out-of-bounds read.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "ddpm_fast/diffusion_steps.h"
#include "ddpm_fast/diffusion_steps_kernels.h"
#include "ddpm_fast/op_registration.h"

namespace ddpm_fast {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

DType kernel_dtype(const Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default:
      TORCH_CHECK_TYPE(false, name, " must have dtype float32, float16 or bfloat16, got ", x.scalar_type());
  }
  return DType::Float32;  // not reached
}

// Dense storage with the batch outermost (contiguous, channels_last, ...): the kernels index
// storage linearly and find the batch element as index / (numel / batch).
void check_batch_dense(const Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(0) > 0, name,
                    " must have a non-empty batch dimension first, got shape ", x.sizes());
  const bool dense = x.numel() == 0 || (x.is_non_overlapping_and_dense() &&
                                        (x.size(0) == 1 || x.stride(0) == x.numel() / x.size(0)));
  TORCH_CHECK_VALUE(dense, name, " must be dense with the batch dimension outermost (contiguous or ",
                    "channels_last), got shape ", x.sizes(), " and strides ", x.strides());
}

// Same shape, dtype, device and storage order as x: element i of both storages is the same element.
void check_like(const Tensor& y, const char* name, const Tensor& x, const char* x_name) {
  TORCH_CHECK_VALUE(y.sizes() == x.sizes(), name, " must have the shape of ", x_name, " ", x.sizes(),
                    ", got ", y.sizes());
  TORCH_CHECK_TYPE(y.scalar_type() == x.scalar_type(), name, " must have the dtype of ", x_name, " (",
                   x.scalar_type(), "), got ", y.scalar_type());
  TORCH_CHECK_VALUE(y.device() == x.device(), name, " must be on ", x_name, "'s device (", x.device(),
                    "), got ", y.device());
  for (int64_t d = 0; d < x.dim(); ++d) {
    TORCH_CHECK_VALUE(x.size(d) <= 1 || y.stride(d) == x.stride(d), name, " must have the memory layout of ",
                      x_name, " (strides ", x.strides(), "), got strides ", y.strides());
  }
}

// t: int64 [batch] on x's device; returned contiguous. On the CPU its values are range-checked
// here, before any table read; on CUDA (and in the emulated CUDA build) the kernel checks them
// (a device-side trap), so that no host sync is needed.
Tensor check_timesteps(const Tensor& t, const Tensor& x, int64_t num_timesteps, const char* name = "t") {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, name, " must be an int64 tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == x.size(0), name, " must have shape [batch_size] = [", x.size(0),
                    "], got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " must be on the input's device (", x.device(), "), got ",
                    t.device());
  Tensor tc = t.contiguous();
  if (tc.device().is_cpu() && !kEmulatedCuda) {
    const int64_t* values = tc.const_data_ptr<int64_t>();
    for (int64_t b = 0; b < tc.numel(); ++b) {
      TORCH_CHECK_VALUE(values[b] >= 0 && values[b] < num_timesteps, name, " must lie in [0, ", num_timesteps,
                        "), got ", name, "[", b, "] = ", values[b]);
    }
  }
  return tc;
}

void check_table(const Tensor& table, int64_t columns, const Tensor& x) {
  TORCH_CHECK_VALUE(table.scalar_type() == at::kFloat && table.dim() == 2 && table.size(0) > 0 &&
                        table.size(1) == columns,
                    "table must be a float32 tensor of shape [T, ", columns, "] with T > 0, got ",
                    table.scalar_type(), " ", table.sizes());
  TORCH_CHECK_VALUE(table.is_contiguous(), "table must be contiguous, got strides ", table.strides());
  TORCH_CHECK_VALUE(table.device() == x.device(), "table must be on the input's device (", x.device(),
                    "), got ", table.device());
}

const int64_t* check_seed(const OptTensor& seed, const Tensor& x) {
  if (!seed.has_value()) return nullptr;
  TORCH_CHECK_TYPE(seed->scalar_type() == at::kLong, "seed must be an int64 tensor, got ", seed->scalar_type());
  TORCH_CHECK_VALUE(seed->numel() == 1, "seed must have exactly one element, got shape ", seed->sizes());
  TORCH_CHECK_VALUE(seed->device() == x.device(), "seed must be on the input's device (", x.device(), "), got ",
                    seed->device());
  return seed->const_data_ptr<int64_t>();
}

const void* check_noise(const OptTensor& noise, const Tensor& x, const char* x_name, const char* name = "noise") {
  if (!noise.has_value()) return nullptr;
  check_like(*noise, name, x, x_name);
  return noise->const_data_ptr();
}

// Checked inputs and allocated outputs of one call, ready for either device's kernel.
struct QSampleCall {
  QSampleArgs args;
  Tensor out, drawn;
};

QSampleCall prepare_q_sample(const Tensor& x_start, const Tensor& t, const Tensor& table, const OptTensor& noise,
                             const OptTensor& seed) {
  QSampleCall call;
  QSampleArgs& a = call.args;
  a.dtype = kernel_dtype(x_start, "x_start");
  check_batch_dense(x_start, "x_start");
  check_table(table, kQSampleColumns, x_start);
  TORCH_CHECK_VALUE(noise.has_value() != seed.has_value(),
                    "q_sample takes exactly one of noise (given noise) and seed (noise drawn in-kernel)");
  a.noise = check_noise(noise, x_start, "x_start");
  a.seed = check_seed(seed, x_start);
  call.args.num_timesteps = table.size(0);
  const Tensor tc = check_timesteps(t, x_start, a.num_timesteps);
  call.out = at::empty_like(x_start);
  call.drawn = seed.has_value() ? at::empty_like(x_start) : at::empty({0}, x_start.options());
  a.x_start = x_start.const_data_ptr();
  a.t = tc.const_data_ptr<int64_t>();
  a.table = table.const_data_ptr<float>();
  a.out = call.out.mutable_data_ptr();
  a.drawn_noise = seed.has_value() ? call.drawn.mutable_data_ptr() : nullptr;
  a.numel = x_start.numel();
  a.per_batch = a.numel / x_start.size(0);
  return call;
}

// model_output: x's shape, dtype, device and layout, or (guided) [2B, ...] with each half so.
void check_model_output(const Tensor& m, const Tensor& x) {
  if (m.dim() != x.dim() || m.size(0) != 2 * x.size(0) || m.sizes().slice(1) != x.sizes().slice(1)) {
    return check_like(m, "model_output", x, "x");
  }
  TORCH_CHECK_TYPE(m.scalar_type() == x.scalar_type(), "model_output must have the dtype of x (", x.scalar_type(),
                   "), got ", m.scalar_type());
  TORCH_CHECK_VALUE(m.device() == x.device(), "model_output must be on x's device (", x.device(), "), got ",
                    m.device());
  check_batch_dense(m, "model_output");
  for (int64_t d = 1; d < x.dim(); ++d) {
    TORCH_CHECK_VALUE(x.size(d) <= 1 || m.stride(d) == x.stride(d), "model_output (guided, [", m.size(0),
                      ", ...]) must have the memory layout of x (strides ", x.strides(), "), got strides ",
                      m.strides());
  }
}

struct StepCall {
  StepArgs args;
  Tensor out, x0;
};

StepCall prepare_sampler_step(const Tensor& x, const Tensor& model_output, const Tensor& index, const Tensor& table,
                              bool clip_denoised, const OptTensor& h1, const OptTensor& h2, const OptTensor& noise,
                              const OptTensor& seed, bool store_x0) {
  StepCall call;
  StepArgs& a = call.args;
  a.dtype = kernel_dtype(x, "x");
  check_batch_dense(x, "x");
  check_model_output(model_output, x);
  check_table(table, kStepColumns, x);
  TORCH_CHECK_VALUE(!(noise.has_value() && seed.has_value()),
                    "give at most one of noise (given noise) and seed (noise drawn in-kernel)");
  a.h1 = check_noise(h1, x, "x", "h1");
  a.h2 = check_noise(h2, x, "x", "h2");
  a.noise = check_noise(noise, x, "x");
  a.seed = check_seed(seed, x);
  a.num_rows = table.size(0);
  const Tensor index_c = check_timesteps(index, x, a.num_rows, "index");
  call.out = at::empty_like(x);
  call.x0 = store_x0 ? at::empty_like(x) : at::empty({0}, x.options());
  a.x = x.const_data_ptr();
  a.model_output = model_output.const_data_ptr();
  a.index = index_c.const_data_ptr<int64_t>();
  a.table = table.const_data_ptr<float>();
  a.out = call.out.mutable_data_ptr();
  a.x0_out = store_x0 ? call.x0.mutable_data_ptr() : nullptr;
  a.numel = x.numel();
  a.per_batch = a.numel / x.size(0);
  a.guided = model_output.size(0) != x.size(0);
  a.clip_denoised = clip_denoised;
  return call;
}

// ----------------------------------------------------------------------------- CPU

std::tuple<Tensor, Tensor> q_sample_cpu_op(const Tensor& x_start, const Tensor& t, const Tensor& table,
                                           const OptTensor& noise, const OptTensor& seed) {
  QSampleCall call = prepare_q_sample(x_start, t, table, noise, seed);
  q_sample_cpu(call.args);
  return {call.out, call.drawn};
}

std::tuple<Tensor, Tensor> sampler_step_cpu_op(const Tensor& x, const Tensor& model_output, const Tensor& index,
                                               const Tensor& table, bool clip_denoised, const OptTensor& h1,
                                               const OptTensor& h2, const OptTensor& noise, const OptTensor& seed,
                                               bool store_x0) {
  StepCall call = prepare_sampler_step(x, model_output, index, table, clip_denoised, h1, h2, noise, seed, store_x0);
  sampler_step_cpu(call.args);
  return {call.out, call.x0};
}

// ----------------------------------------------------------------------------- CUDA

#ifdef DDPM_FAST_WITH_CUDA
// The tensors' pointers are checked above; a t out of range traps on the device.
std::tuple<Tensor, Tensor> q_sample_cuda_op(const Tensor& x_start, const Tensor& t, const Tensor& table,
                                            const OptTensor& noise, const OptTensor& seed) {
  const c10::DeviceGuard guard(x_start.device());
  QSampleCall call = prepare_q_sample(x_start, t, table, noise, seed);
  const char* error = q_sample_cuda(call.args, cuda_stream(x_start.device()));
  TORCH_CHECK(error == nullptr, "ddpm_fast::q_sample: CUDA kernel launch failed: ", error);
  return {call.out, call.drawn};
}

std::tuple<Tensor, Tensor> sampler_step_cuda_op(const Tensor& x, const Tensor& model_output, const Tensor& index,
                                                const Tensor& table, bool clip_denoised, const OptTensor& h1,
                                                const OptTensor& h2, const OptTensor& noise, const OptTensor& seed,
                                                bool store_x0) {
  const c10::DeviceGuard guard(x.device());
  StepCall call = prepare_sampler_step(x, model_output, index, table, clip_denoised, h1, h2, noise, seed, store_x0);
  const char* error = sampler_step_cuda(call.args, cuda_stream(x.device()));
  TORCH_CHECK(error == nullptr, "ddpm_fast::sampler_step: CUDA kernel launch failed: ", error);
  return {call.out, call.x0};
}
#endif

}  // namespace
}  // namespace ddpm_fast

DDPM_FAST_LIBRARY(m) {
  m.def("q_sample(Tensor x_start, Tensor t, Tensor table, Tensor? noise, Tensor? seed) -> (Tensor, Tensor)");
  // One step of every sampler: the rows of the [R, 8] table say which (ddpm_fast/reference.py).
  m.def("sampler_step(Tensor x, Tensor model_output, Tensor index, Tensor table, bool clip_denoised, Tensor? h1, "
        "Tensor? h2, Tensor? noise, Tensor? seed, bool store_x0) -> (Tensor, Tensor)");
}

DDPM_FAST_CPU_KERNELS(m) {
  m.impl("q_sample", &ddpm_fast::q_sample_cpu_op);
  m.impl("sampler_step", &ddpm_fast::sampler_step_cpu_op);
}

#ifdef DDPM_FAST_WITH_CUDA
DDPM_FAST_CUDA_KERNELS(m) {
  m.impl("q_sample", &ddpm_fast::q_sample_cuda_op);
  m.impl("sampler_step", &ddpm_fast::sampler_step_cuda_op);
}
#endif
