// torch.ops.ddpm_fast.group_norm_silu and its backward: schemas, input checks, and the CPU and
// CUDA implementations (the kernels live in csrc/cpu/ and csrc/cuda/; the math in
// csrc/include/ddpm_fast/group_norm_silu.h).
#include <ddpm_fast/group_norm_silu.h>
#include <ddpm_fast/op_registration.h>

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <tuple>

namespace ddpm_fast {
namespace cpu {
// csrc/cpu/group_norm_silu.cpp
void group_norm_silu_forward_cpu(const at::Tensor& x, const float* weight, const float* bias, at::Tensor& y,
                                 float* mean, float* rstd, const GnsShape& shape, double eps);
void group_norm_silu_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x, const float* weight,
                                  const float* bias, const float* mean, const float* rstd, at::Tensor& grad_x,
                                  float* grad_weight, float* grad_bias, const GnsShape& shape);
}  // namespace cpu

namespace {

using Tensors = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// x read in place when dense with the batch outermost (NCHW or channels_last), the kernels'
// view of its sizes, and float32 copies of the (length-C) affine parameters.
struct Prepared {
  at::Tensor x;
  GnsShape shape;
  at::Tensor weight, bias;  // float32 [C], contiguous, or undefined
};

bool is_channels_last(const at::Tensor& x) {
  if (x.is_contiguous()) return false;
  if (x.dim() == 4) return x.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (x.dim() == 5) return x.is_contiguous(at::MemoryFormat::ChannelsLast3d);
  return false;
}

at::Tensor check_param(const char* op, const char* name, const c10::optional<at::Tensor>& p, const at::Tensor& x) {
  if (!p.has_value() || !p->defined()) return at::Tensor();
  const int64_t c = x.size(1);
  TORCH_CHECK_VALUE(p->dim() == 1 && p->size(0) == c, op, ": ", name, " must have shape [", c,
                    "] (the channels of x), got ", p->sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(p->scalar_type()), op, ": ", name, " must be a floating tensor, got ",
                   p->scalar_type());
  TORCH_CHECK_VALUE(p->device() == x.device(), op, ": ", name, " must be on x's device (", x.device(), "), got ",
                    p->device());
  return p->to(at::kFloat).contiguous();
}

Prepared prepare(const char* op, const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
                 const c10::optional<at::Tensor>& bias, int64_t num_groups) {
  TORCH_CHECK_VALUE(x_in.dim() >= 2, op, ": x must have at least 2 dimensions [N, C, ...], got shape ",
                    x_in.sizes());
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
                   ": x must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK_VALUE(x_in.numel() > 0, op, ": x must not be empty, got shape ", x_in.sizes());
  const int64_t c = x_in.size(1);
  TORCH_CHECK_VALUE(num_groups > 0 && c % num_groups == 0, op, ": num_groups must divide the channels of x (",
                    c, "), got num_groups = ", num_groups);
  Prepared p;
  // Any other layout is copied once to the dense layout it is closest to.
  p.x = (x_in.is_contiguous() || is_channels_last(x_in)) ? x_in : x_in.contiguous(x_in.suggest_memory_format());
  p.shape.n = x_in.size(0);
  p.shape.c = c;
  p.shape.s = x_in.numel() / (p.shape.n * c);
  p.shape.groups = num_groups;
  p.shape.channels_last = is_channels_last(p.x);
  p.shape.dtype = dtype == at::kFloat ? 0 : (dtype == at::kHalf ? 1 : 2);
  p.weight = check_param(op, "weight", weight, x_in);
  p.bias = check_param(op, "bias", bias, x_in);
  return p;
}

const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_outputs(const Prepared& p) {
  auto stats = p.x.options().dtype(at::kFloat);
  return {at::empty_like(p.x), at::empty({p.shape.n, p.shape.groups}, stats),
          at::empty({p.shape.n, p.shape.groups}, stats)};
}

struct BackwardArgs {
  at::Tensor grad_y, mean, rstd;
};

BackwardArgs check_backward(const char* op, const at::Tensor& grad_y, const Prepared& p, const at::Tensor& mean,
                            const at::Tensor& rstd) {
  TORCH_CHECK_VALUE(grad_y.sizes() == p.x.sizes(), op, ": grad_y must have the shape of x ", p.x.sizes(), ", got ",
                    grad_y.sizes());
  TORCH_CHECK_TYPE(grad_y.scalar_type() == p.x.scalar_type(), op, ": grad_y must have x's dtype (",
                   p.x.scalar_type(), "), got ", grad_y.scalar_type());
  TORCH_CHECK_VALUE(grad_y.device() == p.x.device(), op, ": grad_y must be on x's device");
  for (const auto* t : {&mean, &rstd}) {
    const char* name = t == &mean ? "mean" : "rstd";
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == p.shape.n && t->size(1) == p.shape.groups, op, ": ", name,
                      " must have shape [", p.shape.n, ", ", p.shape.groups, "], got ", t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == p.x.device(), op, ": ", name, " must be on x's device");
  }
  // grad_y is read with x's strides.
  const auto format = p.shape.channels_last
                          ? (p.x.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d)
                          : at::MemoryFormat::Contiguous;
  return {grad_y.contiguous(format), mean.contiguous(), rstd.contiguous()};
}

// grad_weight / grad_bias in the parameter's dtype, or an empty [0] tensor without one.
at::Tensor param_grad(const c10::optional<at::Tensor>& param, const at::Tensor& grad32, const at::Tensor& x) {
  if (!param.has_value() || !param->defined()) return at::empty({0}, x.options());
  return grad32.to(param->scalar_type());
}

Tensors group_norm_silu_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                            const c10::optional<at::Tensor>& bias, int64_t num_groups, double eps) {
  const Prepared p = prepare("group_norm_silu", x, weight, bias, num_groups);
  auto [y, mean, rstd] = forward_outputs(p);
  cpu::group_norm_silu_forward_cpu(p.x, ptr_or_null(p.weight), ptr_or_null(p.bias), y, mean.mutable_data_ptr<float>(),
                                   rstd.mutable_data_ptr<float>(), p.shape, eps);
  return {y, mean, rstd};
}

Tensors group_norm_silu_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                     const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                                     const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups) {
  const char* op = "group_norm_silu_backward";
  const Prepared p = prepare(op, x, weight, bias, num_groups);
  const BackwardArgs a = check_backward(op, grad_y, p, mean, rstd);
  at::Tensor grad_x = at::empty_like(p.x);
  // dgamma, dbeta in float32 (separate tensors: outputs must not alias)
  at::Tensor grad_w = at::empty({p.shape.c}, p.x.options().dtype(at::kFloat)), grad_b = at::empty_like(grad_w);
  cpu::group_norm_silu_backward_cpu(a.grad_y, p.x, ptr_or_null(p.weight), ptr_or_null(p.bias),
                                    a.mean.const_data_ptr<float>(), a.rstd.const_data_ptr<float>(), grad_x,
                                    grad_w.mutable_data_ptr<float>(), grad_b.mutable_data_ptr<float>(), p.shape);
  return {grad_x, param_grad(weight, grad_w, x), param_grad(bias, grad_b, x)};
}

#ifdef DDPM_FAST_WITH_CUDA
void check_launch(const char* op, int error) {
  TORCH_CHECK(error == 0, op, ": CUDA kernel launch failed (cudaError_t ", error, ")");
}

Tensors group_norm_silu_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                             const c10::optional<at::Tensor>& bias, int64_t num_groups, double eps) {
  const Prepared p = prepare("group_norm_silu", x, weight, bias, num_groups);
  c10::DeviceGuard guard(p.x.device());
  auto [y, mean, rstd] = forward_outputs(p);
  check_launch("group_norm_silu",
               gns_forward_cuda(p.x.const_data_ptr(), ptr_or_null(p.weight), ptr_or_null(p.bias), y.mutable_data_ptr(),
                                mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(), p.shape,
                                static_cast<float>(eps), cuda_stream(p.x.device())));
  return {y, mean, rstd};
}

Tensors group_norm_silu_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                      const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                                      const at::Tensor& mean, const at::Tensor& rstd, int64_t num_groups) {
  const char* op = "group_norm_silu_backward";
  const Prepared p = prepare(op, x, weight, bias, num_groups);
  const BackwardArgs a = check_backward(op, grad_y, p, mean, rstd);
  c10::DeviceGuard guard(p.x.device());
  at::Tensor grad_x = at::empty_like(p.x);
  const auto f32 = p.x.options().dtype(at::kFloat);
  at::Tensor grad_w = at::empty({p.shape.c}, f32), grad_b = at::empty_like(grad_w);
  at::Tensor workspace = at::empty({2 * p.shape.n * p.shape.c + 2 * p.shape.n * p.shape.groups}, f32);
  check_launch(op, gns_backward_cuda(a.grad_y.const_data_ptr(), p.x.const_data_ptr(), ptr_or_null(p.weight),
                                     ptr_or_null(p.bias), a.mean.const_data_ptr<float>(),
                                     a.rstd.const_data_ptr<float>(), grad_x.mutable_data_ptr(),
                                     grad_w.mutable_data_ptr<float>(), grad_b.mutable_data_ptr<float>(),
                                     workspace.mutable_data_ptr<float>(), p.shape, cuda_stream(p.x.device())));
  return {grad_x, param_grad(weight, grad_w, x), param_grad(bias, grad_b, x)};
}
#endif

}  // namespace
}  // namespace ddpm_fast

using namespace ddpm_fast;

DDPM_FAST_LIBRARY(m) {
  m.def("group_norm_silu(Tensor x, Tensor? weight, Tensor? bias, int num_groups, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("group_norm_silu_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, "
        "int num_groups) -> (Tensor, Tensor, Tensor)");
}

DDPM_FAST_CPU_KERNELS(m) {
  m.impl("group_norm_silu", &group_norm_silu_cpu);
  m.impl("group_norm_silu_backward", &group_norm_silu_backward_cpu);
}

#ifdef DDPM_FAST_WITH_CUDA
DDPM_FAST_CUDA_KERNELS(m) {
  m.impl("group_norm_silu", &group_norm_silu_cuda);
  m.impl("group_norm_silu_backward", &group_norm_silu_backward_cuda);
}
#endif
