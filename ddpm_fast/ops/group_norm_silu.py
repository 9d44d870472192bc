"""Fused GroupNorm + SiLU: the public function, fake impls and autograd.

``y = silu(gamma * (x - mean_g) / sqrt(var_g + eps) + beta)`` with per-(sample, group)
statistics in float32. The C++ extension registers ``torch.ops.ddpm_fast.group_norm_silu`` and
``torch.ops.ddpm_fast.group_norm_silu_backward`` (a CPU and a CUDA kernel each); the Triton
kernels are the custom ops ``torch.ops.ddpm_fast_triton.*`` of the same names. Each forward op
returns ``(y, mean, rstd)``; autograd saves only x, mean and rstd (and weight, bias) and calls
the matching backward op, which recomputes the rest.
"""

import torch

from .. import _ext, backends, reference
from ..validation import check_float, check_int, check_number
from ._common import batch_dense, same_layout

# ----------------------------------------------------------------------------- Triton ops


@torch.library.custom_op("ddpm_fast_triton::group_norm_silu", mutates_args=())
def _triton_group_norm_silu(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                            num_groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels import group_norm_silu

    return group_norm_silu.forward(x, weight, bias, num_groups, eps)


@torch.library.custom_op("ddpm_fast_triton::group_norm_silu_backward", mutates_args=())
def _triton_group_norm_silu_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                                     bias: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
                                     num_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels import group_norm_silu

    return group_norm_silu.backward(grad_y, x, weight, bias, mean, rstd, num_groups)


# ----------------------------------------------------------------------------- fake impls + autograd


def _fake_forward(x, weight, bias, num_groups, eps):
    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


def _fake_backward(grad_y, x, weight, bias, mean, rstd, num_groups):
    def like(param):
        return torch.empty_like(param) if param is not None else x.new_empty((0,))

    return torch.empty_like(x), like(weight), like(bias)


def _backward_op(namespace):
    return getattr(torch.ops, namespace).group_norm_silu_backward


def _setup_forward(ctx, inputs, output):
    x, weight, bias, num_groups, eps = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.num_groups = num_groups
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
    ctx.save_for_backward(x, weight, bias, mean, rstd)


def _make_backward(namespace):
    def backward(ctx, grad_y, grad_mean, grad_rstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        if grad_y is None:
            grad_y = torch.zeros_like(x)
        # The kernels read grad_y with x's strides.
        grad_y = same_layout(grad_y, x)
        grad_x, grad_weight, grad_bias = _backward_op(namespace)(grad_y, x, weight, bias, mean, rstd, ctx.num_groups)
        return (grad_x, grad_weight if ctx.has_weight else None, grad_bias if ctx.has_bias else None, None, None)

    return backward


def _register(namespace):
    torch.library.register_fake(f"{namespace}::group_norm_silu", _fake_forward)
    torch.library.register_fake(f"{namespace}::group_norm_silu_backward", _fake_backward)
    torch.library.register_autograd(f"{namespace}::group_norm_silu", _make_backward(namespace),
                                    setup_context=_setup_forward)


_register("ddpm_fast_triton")
if _ext.loaded:
    _register("ddpm_fast")

# ----------------------------------------------------------------------------- public function


def _check_param(name, param, x):
    if param is None:
        return None
    check_float(name, param)
    channels = x.shape[1]
    if param.dim() != 1 or param.shape[0] != channels:
        raise ValueError(f"{name} must have shape [{channels}] (the channels of x), got {list(param.shape)}")
    if param.device != x.device:
        raise ValueError(f"{name} must be on x's device ({x.device}), got {param.device}")
    return param


def check_args(x, weight, bias, num_groups, eps):
    """The checks of group_norm_silu; returns (weight, bias)."""
    check_float("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dimensions [N, C, ...], got shape {list(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"x must not be empty, got shape {list(x.shape)}")
    check_int("num_groups", num_groups, minimum=1)
    if x.shape[1] % num_groups:
        raise ValueError(f"num_groups must divide the channels of x ({x.shape[1]}), got num_groups={num_groups}")
    check_number("eps", eps, minimum=0.0, open_min=True)
    return _check_param("weight", weight, x), _check_param("bias", bias, x)


def group_norm_silu(x, weight=None, bias=None, num_groups=32, eps=1e-5, backend="auto"):
    """silu(group_norm(x, num_groups, weight, bias, eps)) in one fused pass; returns y.

    x: [N, C, *spatial] float32/float16/bfloat16 (float64 runs the PyTorch reference), NCHW or
    channels_last (y keeps x's dtype and memory format); weight, bias: [C] or None. Statistics
    and arithmetic are float32 for every input dtype. Differentiable in x, weight and bias.
    """
    weight, bias = check_args(x, weight, bias, num_groups, eps)
    name = backends.resolve(backend, x.device)
    if name == "torch" or x.dtype == torch.float64:
        return reference.group_norm_silu(x, weight, bias, num_groups, eps)
    ns = torch.ops.ddpm_fast_triton if name == "triton" else torch.ops.ddpm_fast
    return ns.group_norm_silu(batch_dense(x), weight, bias, num_groups, float(eps))[0]
