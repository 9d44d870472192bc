"""Fused q_sample, reverse step, DDIM step and DPM-Solver++ step: public functions, fake impls and autograd.

The C++ extension registers ``torch.ops.ddpm_fast.{q_sample,reverse_step,ddim_step,dpm_solver_step}``
(a CPU and a CUDA kernel each); the Triton kernels are custom ops of their own,
``torch.ops.ddpm_fast_triton.*``, since one op has one kernel per device. This module gives
both a fake (meta) implementation and autograd, and :func:`q_sample` / :func:`reverse_step` /
:func:`ddim_step` / :func:`dpm_solver_step` send each call to the backend that
``ddpm_fast.backends`` picks.

The arithmetic and the coefficient tables are documented in ``ddpm_fast.reference``.
"""

import torch

from .. import _ext, backends, reference
from ..validation import check_batched, check_bool, check_like, check_tensor, check_timesteps, describe
from ._common import batch_dense, same_layout

# ----------------------------------------------------------------------------- Triton ops


@torch.library.custom_op("ddpm_fast_triton::q_sample", mutates_args=())
def _triton_q_sample(x_start: torch.Tensor, t: torch.Tensor, table: torch.Tensor,
                     noise: torch.Tensor | None, seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels import diffusion_steps

    return diffusion_steps.q_sample(x_start, t, table, noise, seed)


@torch.library.custom_op("ddpm_fast_triton::reverse_step", mutates_args=())
def _triton_reverse_step(x_t: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor, table: torch.Tensor,
                         clip_denoised: bool, noise: torch.Tensor | None, seed: torch.Tensor | None) -> torch.Tensor:
    from ..kernels import diffusion_steps

    return diffusion_steps.reverse_step(x_t, model_output, t, table, clip_denoised, noise, seed)


@torch.library.custom_op("ddpm_fast_triton::ddim_step", mutates_args=())
def _triton_ddim_step(x_t: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor, table: torch.Tensor,
                      clip_denoised: bool, noise: torch.Tensor | None, seed: torch.Tensor | None) -> torch.Tensor:
    from ..kernels import diffusion_steps

    return diffusion_steps.reverse_step(x_t, model_output, t, table, clip_denoised, noise, seed)


@torch.library.custom_op("ddpm_fast_triton::dpm_solver_step", mutates_args=())
def _triton_dpm_solver_step(x: torch.Tensor, model_output: torch.Tensor, x0_prev: torch.Tensor | None,
                            index: torch.Tensor, table: torch.Tensor,
                            clip_denoised: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels import diffusion_steps

    return diffusion_steps.dpm_solver_step(x, model_output, x0_prev, index, table, clip_denoised)


# ----------------------------------------------------------------------------- fake impls + autograd


def _fake_q_sample(x_start, t, table, noise, seed):
    drawn = torch.empty_like(x_start) if noise is None else x_start.new_empty((0,))
    return torch.empty_like(x_start), drawn


def _fake_step(x_t, model_output, t, table, clip_denoised, noise, seed):
    return torch.empty_like(x_t)


def _column(table, t, column, like):
    return table[:, column].index_select(0, t).to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def _setup_q_sample(ctx, inputs, output):
    x_start, t, table, noise, seed = inputs
    ctx.save_for_backward(t, table)
    ctx.noise_given = noise is not None


def _backward_q_sample(ctx, grad_x_t, grad_drawn):
    t, table = ctx.saved_tensors
    grad_x_start = grad_x_t * _column(table, t, reference.SQRT_ALPHAS_CUMPROD, grad_x_t)
    grad_noise = None
    if ctx.noise_given:
        grad_noise = grad_x_t * _column(table, t, reference.SQRT_ONE_MINUS_ALPHAS_CUMPROD, grad_x_t)
    return grad_x_start, None, None, grad_noise, None


def _setup_step(ctx, inputs, output):
    x_t, model_output, t, table, clip_denoised, noise, seed = inputs
    ctx.clip_denoised = clip_denoised
    ctx.noise_given = noise is not None
    ctx.save_for_backward(x_t, model_output, t, table)


def _backward_step(ctx, grad_out):
    # out = P * clip(A x_t + B m) + Q x_t + S z; clamp passes gradient only inside (-1, 1).
    x_t, model_output, t, table = ctx.saved_tensors
    col = lambda c: _column(table, t, c, grad_out)  # noqa: E731
    grad_x0 = grad_out * col(reference.OUT_FROM_X0)
    if ctx.clip_denoised:
        x0 = col(reference.X0_FROM_XT) * x_t + col(reference.X0_FROM_MODEL) * model_output
        grad_x0 = grad_x0 * ((x0 > -1.0) & (x0 < 1.0))
    grad_x_t = grad_out * col(reference.OUT_FROM_XT) + grad_x0 * col(reference.X0_FROM_XT)
    grad_model = grad_x0 * col(reference.X0_FROM_MODEL)
    grad_noise = grad_out * col(reference.SIGMA) if ctx.noise_given else None
    return grad_x_t, grad_model, None, None, None, grad_noise, None


def _fake_dpm_solver_step(x, model_output, x0_prev, index, table, clip_denoised):
    return torch.empty_like(x), torch.empty_like(x)


def _setup_dpm_solver_step(ctx, inputs, output):
    x, model_output, x0_prev, index, table, clip_denoised = inputs
    ctx.clip_denoised = clip_denoised
    ctx.x0_prev_given = x0_prev is not None
    ctx.save_for_backward(x, model_output, index, table)


def _backward_dpm_solver_step(ctx, grad_out, grad_x0):
    # out = P * x0 + Q x + R x0_prev with x0 = clip(A x + B m), itself the second output.
    x, model_output, index, table = ctx.saved_tensors
    like = grad_out if grad_out is not None else grad_x0
    col = lambda c: _column(table, index, c, like)  # noqa: E731
    grad_x0_total = torch.zeros_like(like)
    if grad_out is not None:
        grad_x0_total = grad_x0_total + grad_out * col(reference.OUT_FROM_X0)
    if grad_x0 is not None:
        grad_x0_total = grad_x0_total + grad_x0
    if ctx.clip_denoised:
        x0 = col(reference.X0_FROM_XT) * x + col(reference.X0_FROM_MODEL) * model_output
        grad_x0_total = grad_x0_total * ((x0 > -1.0) & (x0 < 1.0))
    grad_x = grad_x0_total * col(reference.X0_FROM_XT)
    if grad_out is not None:
        grad_x = grad_x + grad_out * col(reference.OUT_FROM_XT)
    grad_model = grad_x0_total * col(reference.X0_FROM_MODEL)
    grad_x0_prev = None
    if ctx.x0_prev_given:
        grad_x0_prev = grad_out * col(reference.X0_PREV) if grad_out is not None else torch.zeros_like(like)
    return grad_x, grad_model, grad_x0_prev, None, None, None


def _register(namespace):
    torch.library.register_fake(f"{namespace}::q_sample", _fake_q_sample)
    torch.library.register_autograd(f"{namespace}::q_sample", _backward_q_sample, setup_context=_setup_q_sample)
    for name in ("reverse_step", "ddim_step"):
        torch.library.register_fake(f"{namespace}::{name}", _fake_step)
        torch.library.register_autograd(f"{namespace}::{name}", _backward_step, setup_context=_setup_step)
    torch.library.register_fake(f"{namespace}::dpm_solver_step", _fake_dpm_solver_step)
    torch.library.register_autograd(f"{namespace}::dpm_solver_step", _backward_dpm_solver_step,
                                    setup_context=_setup_dpm_solver_step)


_register("ddpm_fast_triton")
if _ext.loaded:
    _register("ddpm_fast")

# ----------------------------------------------------------------------------- public functions


def _kernel_op(backend, name):
    return getattr(torch.ops.ddpm_fast_triton if backend == "triton" else torch.ops.ddpm_fast, name)


def _check_table(table, columns, device):
    check_tensor("table", table)
    if table.dtype != torch.float32:
        raise TypeError(f"table must be a float32 tensor of shape [T, {columns}], got {describe(table)}")
    if table.dim() != 2 or table.shape[1] != columns or table.shape[0] == 0:
        raise ValueError(f"table must be a float32 tensor of shape [T, {columns}] with T > 0, got {describe(table)}")
    if table.device != device:
        raise ValueError(f"table must be on the input's device ({device}), got {table.device}")
    return table.contiguous()


def _check_seed(seed, device):
    check_tensor("seed", seed)
    if seed.dtype != torch.int64 or seed.numel() != 1:
        error = TypeError if seed.dtype != torch.int64 else ValueError
        raise error(f"seed must be a one-element int64 tensor (see ddpm_fast.ops._common.draw_seed), "
                         f"got {describe(seed)}")
    if seed.device != device:
        raise ValueError(f"seed must be on the input's device ({device}), got {seed.device}")


def _check_step_args(x_name, x, model_output, t, t_name, table, clip_denoised, noise_name, noise, seed):
    """The checks shared by the step ops; returns (t as int64, contiguous table)."""
    check_batched(x_name, x)
    check_like("model_output", model_output, x_name, x)
    if noise is not None:
        check_like(noise_name, noise, x_name, x)
    if seed is not None:
        _check_seed(seed, x.device)
    table = _check_table(table, reference.STEP_TABLE_COLUMNS, x.device)
    t = check_timesteps(t, x.shape[0], table.shape[0], x.device, name=t_name)
    check_bool("clip_denoised", clip_denoised)
    return t, table


# The run_* functions take checked arguments and the name of the backend that runs; the
# diffusion layer calls them after validating its own arguments.

def run_q_sample(x_start, t, table, noise, seed, backend):
    if backend == "torch" or x_start.dtype == torch.float64:
        if noise is None:
            noise = reference.philox_normal_like(x_start, int(seed)).to(x_start.dtype)
        return reference.q_sample(x_start, t, table, noise), noise
    x_start = batch_dense(x_start)
    noise = None if noise is None else same_layout(noise, x_start)
    x_t, drawn = _kernel_op(backend, "q_sample")(x_start, t, table, noise, seed)
    return x_t, (drawn if noise is None else noise)


def run_step(op_name, x_t, model_output, t, table, clip_denoised, noise, seed, backend):
    """reverse_step / ddim_step."""
    if backend == "torch" or x_t.dtype == torch.float64:
        if seed is not None:
            noise = reference.philox_normal_like(x_t, int(seed)).to(x_t.dtype)
        return reference.reverse_step(x_t, model_output, t, table, clip_denoised, noise)
    x_t = batch_dense(x_t)
    model_output = same_layout(model_output, x_t)
    noise = None if noise is None else same_layout(noise, x_t)
    return _kernel_op(backend, op_name)(x_t, model_output, t, table, clip_denoised, noise, seed)


def run_dpm_solver_step(x, model_output, x0_prev, index, table, clip_denoised, backend):
    if backend == "torch" or x.dtype == torch.float64:
        return reference.dpm_solver_step(x, model_output, x0_prev, index, table, clip_denoised)
    x = batch_dense(x)
    model_output = same_layout(model_output, x)
    x0_prev = None if x0_prev is None else same_layout(x0_prev, x)
    return _kernel_op(backend, "dpm_solver_step")(x, model_output, x0_prev, index, table, clip_denoised)


def q_sample(x_start, t, table, noise=None, seed=None, backend="auto"):
    """x_t = table[t, 0] * x_start + table[t, 1] * noise in one pass; returns (x_t, noise).

    Give ``noise``, or a one-element int64 ``seed`` tensor (``_common.draw_seed``) to draw it
    in-kernel; the noise drawn is returned as the second output (the p_losses target).
    """
    check_batched("x_start", x_start)
    if (noise is None) == (seed is None):
        raise ValueError("q_sample takes exactly one of noise= (given noise) or seed= (noise drawn in-kernel)")
    if noise is not None:
        check_like("noise", noise, "x_start", x_start)
    else:
        _check_seed(seed, x_start.device)
    table = _check_table(table, reference.Q_SAMPLE_COLUMNS, x_start.device)
    t = check_timesteps(t, x_start.shape[0], table.shape[0], x_start.device)
    return run_q_sample(x_start, t, table, noise, seed, backends.resolve(backend, x_start.device))


def _step(op_name, x_t, model_output, t, table, clip_denoised, noise, seed, backend):
    if noise is not None and seed is not None:
        raise ValueError("give at most one of noise= (given noise) and seed= (noise drawn in-kernel)")
    t, table = _check_step_args("x_t", x_t, model_output, t, "t", table, clip_denoised, "noise", noise, seed)
    return run_step(op_name, x_t, model_output, t, table, clip_denoised, noise, seed,
                    backends.resolve(backend, x_t.device))


def reverse_step(x_t, model_output, t, table, clip_denoised=False, noise=None, seed=None, backend="auto"):
    """x_{t-1} = mean + sqrt(var) * z in one pass (see ``reference.reverse_step``).

    z is ``noise`` when given, drawn in-kernel from ``seed`` when that is given, else 0.
    """
    return _step("reverse_step", x_t, model_output, t, table, clip_denoised, noise, seed, backend)


def ddim_step(x_t, model_output, t, table, clip_denoised=False, noise=None, seed=None, backend="auto"):
    """The DDIM step from t to t_prev in one pass; ``table`` holds the DDIM coefficients."""
    return _step("ddim_step", x_t, model_output, t, table, clip_denoised, noise, seed, backend)


def dpm_solver_step(x, model_output, x0_prev, index, table, clip_denoised=False, backend="auto"):
    """One DPM-Solver++ multistep update in one pass; returns (x_next, x0).

    x0 = table[i, 0] * x + table[i, 1] * model_output (clamped to [-1, 1] with clip_denoised)
    and x_next = table[i, 2] * x0 + table[i, 3] * x + table[i, 4] * x0_prev, with i = index[b]
    for batch element b (see ``reference.dpm_solver_step``). ``x0_prev`` is the x0 this op
    returned at the previous solver step, or None for the first step (a zero column).
    """
    index, table = _check_step_args("x", x, model_output, index, "index", table, clip_denoised, "x0_prev",
                                    x0_prev, None)
    return run_dpm_solver_step(x, model_output, x0_prev, index, table, clip_denoised,
                               backends.resolve(backend, x.device))
