"""The sampler step: one fused op for a step of every sampler (public function, fake impl, autograd).

Every step of DDPM, DDIM and DPM-Solver++ (2M, 3M, SDE), guided or not, is the per-element
arithmetic of ``reference.sampler_step``: x0 from (x, the model output, or the guided mix of its
two halves), optionally clamped, then a linear combination of x, x0, up to two earlier x0s and
the noise. The samplers (``ddpm_fast.samplers``) differ only in the rows of the table they give.

The C++ extension registers ``torch.ops.ddpm_fast.sampler_step`` (a CPU and a CUDA kernel); the
Triton kernel is ``torch.ops.ddpm_fast_triton.sampler_step``. Each kernel is specialised on what
is present (guidance, history terms, the kind of noise, clip, the x0 output), so a call moves no
more memory than the step it stands for needs.
"""

import torch

from .. import _ext, backends, reference
from ..validation import check_batched, check_bool, check_float, check_like, check_timesteps
from ._common import batch_dense, check_seed, check_table, match_layout


@torch.library.custom_op("ddpm_fast_triton::sampler_step", mutates_args=())
def _triton_sampler_step(x: torch.Tensor, model_output: torch.Tensor, index: torch.Tensor, table: torch.Tensor,
                         clip_denoised: bool, h1: torch.Tensor | None, h2: torch.Tensor | None,
                         noise: torch.Tensor | None, seed: torch.Tensor | None,
                         store_x0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels import sampler_step

    return sampler_step.sampler_step(x, model_output, index, table, clip_denoised, h1, h2, noise, seed, store_x0)


def _fake_sampler_step(x, model_output, index, table, clip_denoised, h1, h2, noise, seed, store_x0):
    return torch.empty_like(x), (torch.empty_like(x) if store_x0 else x.new_empty((0,)))


def _setup_sampler_step(ctx, inputs, output):
    x, model_output, index, table, clip_denoised, h1, h2, noise, seed, store_x0 = inputs
    ctx.clip_denoised = clip_denoised
    ctx.given = (h1 is not None, h2 is not None, noise is not None)
    ctx.save_for_backward(x, model_output, index, table)


def _backward_sampler_step(ctx, grad_out, grad_x0):
    # out = C x + D x0 + E h1 + F h2 + G z, x0 = clip(A x + B m), m = m_u + s (m_c - m_u) when guided;
    # x0 is the second output too. The clamp passes gradient only inside (-1, 1).
    x, model_output, index, table = ctx.saved_tensors
    batch = x.shape[0]
    like = grad_out if grad_out is not None else grad_x0
    rows = table.index_select(0, index).to(like.dtype)

    def col(column):
        return rows[:, column].reshape(-1, *([1] * (x.dim() - 1)))

    grad_x0_total = torch.zeros_like(x)
    if grad_out is not None:
        grad_x0_total = grad_x0_total + grad_out * col(reference.OUT_FROM_X0)
    if grad_x0 is not None and grad_x0.numel():
        grad_x0_total = grad_x0_total + grad_x0
    if ctx.clip_denoised:
        m = reference.guided_model_output(model_output, batch, col(reference.GUIDANCE_SCALE))
        x0 = col(reference.X0_FROM_X) * x + col(reference.X0_FROM_MODEL) * m
        grad_x0_total = grad_x0_total * ((x0 > -1.0) & (x0 < 1.0))
    grad_x = grad_x0_total * col(reference.X0_FROM_X)
    if grad_out is not None:
        grad_x = grad_x + grad_out * col(reference.OUT_FROM_X)
    grad_m = grad_x0_total * col(reference.X0_FROM_MODEL)
    if model_output.shape[0] != batch:
        scale = col(reference.GUIDANCE_SCALE)
        grad_m = torch.cat([grad_m * scale, grad_m * (1 - scale)])
    terms = []
    for given, column in zip(ctx.given, (reference.OUT_FROM_H1, reference.OUT_FROM_H2, reference.OUT_FROM_Z)):
        if not given:
            terms.append(None)
        else:
            terms.append(grad_out * col(column) if grad_out is not None else torch.zeros_like(x))
    return grad_x, grad_m, None, None, None, terms[0], terms[1], terms[2], None, None


def _register(namespace):
    torch.library.register_fake(f"{namespace}::sampler_step", _fake_sampler_step)
    torch.library.register_autograd(f"{namespace}::sampler_step", _backward_sampler_step,
                                    setup_context=_setup_sampler_step)


_register("ddpm_fast_triton")
if _ext.loaded:
    _register("ddpm_fast")


def _kernel_op(backend):
    return torch.ops.ddpm_fast_triton.sampler_step if backend == "triton" else torch.ops.ddpm_fast.sampler_step


def check_model_output(model_output, x, x_name="x"):
    """A [B, ...] model output (x's shape) or, guided, [2B, ...] (cond first, then uncond)."""
    check_float("model_output", model_output)
    batch = x.shape[0]
    if model_output.dim() == x.dim() and model_output.shape[0] == 2 * batch and \
            model_output.shape[1:] == x.shape[1:]:
        if model_output.dtype != x.dtype or model_output.device != x.device:
            check_like("model_output", model_output[:batch], x_name, x)
        return model_output
    if model_output.shape != x.shape:
        raise ValueError(f"model_output must have the shape of {x_name} {list(x.shape)} (or, guided, "
                         f"[{2 * batch}, ...]: the conditional then the unconditional half), "
                         f"got {list(model_output.shape)}")
    check_like("model_output", model_output, x_name, x)
    return model_output


def run_sampler_step(x, model_output, index, table, clip_denoised, h1, h2, noise, seed, store_x0, backend):
    """sampler_step for checked arguments on the named backend; returns (x_out, x0)."""
    if backend == "torch" or x.dtype == torch.float64:
        if seed is not None:
            noise = reference.philox_normal_like(x, int(seed)).to(x.dtype)
        return reference.sampler_step(x, model_output, index, table.to(x.dtype), clip_denoised, h1, h2, noise,
                                      store_x0)
    x = batch_dense(x)
    model_output, h1, h2, noise = (None if t is None else match_layout(t, x) for t in (model_output, h1, h2, noise))
    return _kernel_op(backend)(x, model_output, index, table, clip_denoised, h1, h2, noise, seed, store_x0)


def sampler_step(x, model_output, index, table, *, clip_denoised=False, h1=None, h2=None, noise=None, seed=None,
                 store_x0=False, backend="auto"):
    """One step of any sampler in one pass over memory; returns (x_out, x0).

    For batch element b with row i = index[b] of the float32 [R, 8] ``table`` (columns in
    ``ddpm_fast.reference``)::

        m     = model_output[b], or m_u + s (m_c - m_u) when model_output is [2B, ...]
        x0    = A x + B m                     (clamped to [-1, 1] with clip_denoised)
        x_out = C x + D x0 + E h1 + F h2 + G z

    h1, h2: earlier x0 predictions (None: 0). z: ``noise``, or noise drawn in-kernel from the
    one-element int64 ``seed`` (``ops._common.draw_seed``), or 0. x0 is returned when
    ``store_x0`` (else an empty tensor): a multistep solver passes it as the next step's h1.
    """
    check_batched("x", x)
    check_model_output(model_output, x)
    for name, term in (("h1", h1), ("h2", h2), ("noise", noise)):
        if term is not None:
            check_like(name, term, "x", x)
    if noise is not None and seed is not None:
        raise ValueError("give at most one of noise= (given noise) and seed= (noise drawn in-kernel)")
    if seed is not None:
        check_seed(seed, x.device)
    table = check_table(table, reference.SAMPLER_STEP_COLUMNS, x.device)
    index = check_timesteps(index, x.shape[0], table.shape[0], x.device, name="index")
    check_bool("clip_denoised", clip_denoised)
    check_bool("store_x0", store_x0)
    return run_sampler_step(x, model_output, index, table, clip_denoised, h1, h2, noise, seed, store_x0,
                            backends.resolve(backend, x.device))


__all__ = ["sampler_step", "run_sampler_step", "check_model_output"]
