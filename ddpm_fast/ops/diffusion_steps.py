"""Fused q_sample (public function, fake impl, autograd) and the step ops of earlier releases.

The C++ extension registers ``torch.ops.ddpm_fast.q_sample`` (a CPU and a CUDA kernel); the
Triton kernel is a custom op of its own, ``torch.ops.ddpm_fast_triton.q_sample``, since one op
has one kernel per device. :func:`reverse_step`, :func:`ddim_step` and :func:`dpm_solver_step`
keep their signatures and [T, 5] tables; they run on the one sampler step (``ops.sampler_step``).

The arithmetic and the coefficient tables are documented in ``ddpm_fast.reference``.
"""

import torch

from .. import _ext, backends, reference
from ..validation import check_batched, check_bool, check_like, check_timesteps
from ._common import batch_dense, check_seed, check_table, match_layout
from .sampler_step import run_sampler_step


@torch.library.custom_op("ddpm_fast_triton::q_sample", mutates_args=())
def _triton_q_sample(x_start: torch.Tensor, t: torch.Tensor, table: torch.Tensor,
                     noise: torch.Tensor | None, seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels import diffusion_steps

    return diffusion_steps.q_sample(x_start, t, table, noise, seed)


def _fake_q_sample(x_start, t, table, noise, seed):
    drawn = torch.empty_like(x_start) if noise is None else x_start.new_empty((0,))
    return torch.empty_like(x_start), drawn


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


def _register(namespace):
    torch.library.register_fake(f"{namespace}::q_sample", _fake_q_sample)
    torch.library.register_autograd(f"{namespace}::q_sample", _backward_q_sample, setup_context=_setup_q_sample)


_register("ddpm_fast_triton")
if _ext.loaded:
    _register("ddpm_fast")


def run_q_sample(x_start, t, table, noise, seed, backend):
    """q_sample for checked arguments on the named backend; returns (x_t, noise)."""
    if backend == "torch" or x_start.dtype == torch.float64:
        if noise is None:
            noise = reference.philox_normal_like(x_start, int(seed)).to(x_start.dtype)
        return reference.q_sample(x_start, t, table, noise), noise
    x_start = batch_dense(x_start)
    noise = None if noise is None else match_layout(noise, x_start)
    op = torch.ops.ddpm_fast_triton.q_sample if backend == "triton" else torch.ops.ddpm_fast.q_sample
    x_t, drawn = op(x_start, t, table, noise, seed)
    return x_t, (drawn if noise is None else noise)


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
        check_seed(seed, x_start.device)
    table = check_table(table, reference.Q_SAMPLE_COLUMNS, x_start.device)
    t = check_timesteps(t, x_start.shape[0], table.shape[0], x_start.device)
    return run_q_sample(x_start, t, table, noise, seed, backends.resolve(backend, x_start.device))


# ----------------------------------------------------------------------------- earlier step ops


def _legacy_step(x_name, x, model_output, t_name, t, table, clip_denoised, z_name, z, seed, backend, previous_x0):
    """A step with a [T, 5] table (reference.LEGACY_*) run as the sampler step; returns (x_out, x0)."""
    check_batched(x_name, x)
    check_like("model_output", model_output, x_name, x)
    if z is not None:
        check_like(z_name, z, x_name, x)
    if seed is not None:
        if z is not None:
            raise ValueError("give at most one of noise= (given noise) and seed= (noise drawn in-kernel)")
        check_seed(seed, x.device)
    table = check_table(table, reference.LEGACY_STEP_COLUMNS, x.device)
    t = check_timesteps(t, x.shape[0], table.shape[0], x.device, name=t_name)
    check_bool("clip_denoised", clip_denoised)
    table = reference.sampler_table_from_legacy(table, previous_x0)
    h1, noise = (z, None) if previous_x0 else (None, z)
    return run_sampler_step(x, model_output, t, table, clip_denoised, h1, None, noise, seed, previous_x0,
                            backends.resolve(backend, x.device))


def reverse_step(x_t, model_output, t, table, clip_denoised=False, noise=None, seed=None, backend="auto"):
    """x_{t-1} = mean + sqrt(var) * z in one pass, from a [T, 5] step table.

    x0 = A x_t + B m (clamped with clip_denoised), x_{t-1} = P x0 + Q x_t + S z with (A, B, P,
    Q, S) = table[t] (``reference.LEGACY_*``); z is ``noise`` when given, drawn in-kernel from
    ``seed`` when that is given, else 0.
    """
    return _legacy_step("x_t", x_t, model_output, "t", t, table, clip_denoised, "noise", noise, seed, backend,
                        False)[0]


def ddim_step(x_t, model_output, t, table, clip_denoised=False, noise=None, seed=None, backend="auto"):
    """The DDIM step from t to t_prev in one pass; ``table`` holds the DDIM coefficients ([T, 5])."""
    return _legacy_step("x_t", x_t, model_output, "t", t, table, clip_denoised, "noise", noise, seed, backend,
                        False)[0]


def dpm_solver_step(x, model_output, x0_prev, index, table, clip_denoised=False, backend="auto"):
    """One DPM-Solver++ multistep update in one pass; returns (x_next, x0).

    x0 = table[i, 0] * x + table[i, 1] * model_output (clamped to [-1, 1] with clip_denoised)
    and x_next = table[i, 2] * x0 + table[i, 3] * x + table[i, 4] * x0_prev, with i = index[b]
    for batch element b. ``x0_prev`` is the x0 this op returned at the previous solver step, or
    None for the first step.
    """
    return _legacy_step("x", x, model_output, "index", index, table, clip_denoised, "x0_prev", x0_prev, None,
                        backend, True)
