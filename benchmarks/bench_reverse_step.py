"""The sampling steps after the model call: the DDPM reverse step and the DDIM step.

The fused side is ``ops.sampler_step`` with the [T, 8] table each sampler builds
(``samplers.coefficients`` rows of the DDPM / DDIM steps).

Reverse step: the seed's ``p_sample`` arithmetic (``p_mean_variance`` after the model call,
``torch.randn_like``, the t == 0 mask) against the fused op drawing z in-kernel. Minimal bytes:
read x_t and the model output, write x_{t-1}. Guided: the same with classifier-free guidance,
the eager side mixing the two halves of a [2B, ...] model output first; minimal bytes: read x_t
and both halves, write x_{t-1}.

DDIM step (eta = 0, 50 of 1000 timesteps): the improved-diffusion expression
x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps with the seed's ``_extract`` gathers,
against the fused op. Deterministic on both sides: no noise is drawn. Same minimal bytes.
"""

import pytest
import torch

from conftest import (COMPILE_SHAPES, DEVICE, STEP_SHAPES, assert_close, case_params, check_layout, cycle,
                      make_tensor, rotation_count, run_benchmark, seed_reference)
from ddpm_fast import ops, reference, schedules
from ddpm_fast.ops._common import draw_seed
from ddpm_fast.samplers import coefficients

NUM_TIMESTEPS = 1000
DDIM_STRIDE = NUM_TIMESTEPS // 50
GUIDANCE_SCALE = 7.5


def seed_reverse_step(diffusion, x_t, model_output, t):
    """The seed's p_sample with the model call replaced by its precomputed output."""
    return diffusion.p_sample(lambda x, timesteps: model_output, x_t, t)


def eager_ddim_step(alphas_cumprod, alphas_cumprod_prev, x_t, model_output, t):
    """DDIM with eta = 0 as improved-diffusion writes it, gathering like the seed's _extract."""
    extract = seed_reference.GaussianDiffusion._extract
    alpha_bar = extract(alphas_cumprod, t, x_t.shape)
    alpha_bar_prev = extract(alphas_cumprod_prev, t, x_t.shape)
    pred_x0 = (x_t - torch.sqrt(1 - alpha_bar) * model_output) / torch.sqrt(alpha_bar)
    return torch.sqrt(alpha_bar_prev) * pred_x0 + torch.sqrt(1 - alpha_bar_prev) * model_output


def guided_seed_reverse_step(diffusion, x_t, model_output, t, scale=GUIDANCE_SCALE):
    """Classifier-free guidance as the pipelines write it, then the seed's p_sample."""
    cond, uncond = model_output.chunk(2)
    return seed_reverse_step(diffusion, x_t, uncond + scale * (cond - uncond), t)


def ddpm_table():
    """The DDPM sampler's [T, 8] table (epsilon prediction, posterior variance, sigma_0 = 0), float32."""
    q = schedules.diffusion_quantities(schedules.linear_betas(NUM_TIMESTEPS))
    return coefficients.ddpm_rows(q, "epsilon", "posterior").to(DEVICE, torch.float32)


compiled_seed_reverse_step = torch.compile(seed_reverse_step, dynamic=False)
compiled_guided_seed_reverse_step = torch.compile(guided_seed_reverse_step, dynamic=False)
compiled_eager_ddim_step = torch.compile(eager_ddim_step, dynamic=False)


def _input_sets(shape, dtype, layout, nbytes, guided=False):
    generator = torch.Generator(DEVICE).manual_seed(0)
    model_shape = (2 * shape[0], *shape[1:]) if guided else shape
    sets = [(make_tensor(shape, dtype, layout, generator), make_tensor(model_shape, dtype, layout, generator),
             torch.randint(0, NUM_TIMESTEPS, (shape[0],), device=DEVICE, generator=generator))
            for _ in range(rotation_count(nbytes))]
    return sets


def _info(op, provider, shape, dtype, layout, buffers):
    return dict(op=op, provider=provider, shape=list(shape), dtype=str(dtype).replace("torch.", ""),
                layout=layout, buffers=buffers, group=f"{op} {'x'.join(map(str, shape))} {dtype} {layout}")


def _reverse_step(benchmark, copy_bandwidth, op, provider, shape, dtype, layout, guided):
    nbytes = (4 if guided else 3) * torch.Size(shape).numel() * dtype.itemsize
    sets = _input_sets(shape, dtype, layout, nbytes, guided)
    next_set = cycle(sets)

    if provider in ("seed_eager", "torch_compile"):
        diffusion = seed_reference.GaussianDiffusion(NUM_TIMESTEPS, device=str(DEVICE))
        expression = {(False, "seed_eager"): seed_reverse_step, (False, "torch_compile"): compiled_seed_reverse_step,
                      (True, "seed_eager"): guided_seed_reverse_step,
                      (True, "torch_compile"): compiled_guided_seed_reverse_step}[guided, provider]

        def fn():
            x_t, model_output, t = next_set()
            return expression(diffusion, x_t, model_output, t)
    else:
        table = ddpm_table()
        table[:, reference.GUIDANCE_SCALE] = GUIDANCE_SCALE

        def fn():
            x_t, model_output, t = next_set()
            seed = draw_seed(DEVICE)
            out, _ = ops.sampler_step(x_t, model_output, t, table, seed=seed, backend=provider)
            return out, x_t, model_output, t, seed

    out = run_benchmark(benchmark, fn, info=_info(op, provider, shape, dtype, layout, len(sets)),
                        nbytes=nbytes, copy_gbps=copy_bandwidth)
    if provider not in ("seed_eager", "torch_compile"):
        out, x_t, model_output, t, seed = out
        check_layout(out, layout)
        noise = reference.philox_normal_like(x_t, int(seed)).double()
        assert_close(out, reference.sampler_step(x_t.double(), model_output.double(), t, table.double(),
                                                 noise=noise)[0])


@pytest.mark.parametrize("provider, shape, dtype, layout", case_params(STEP_SHAPES, COMPILE_SHAPES["step"]))
def test_reverse_step(benchmark, copy_bandwidth, provider, shape, dtype, layout):
    _reverse_step(benchmark, copy_bandwidth, "reverse_step", provider, shape, dtype, layout, False)


@pytest.mark.parametrize("provider, shape, dtype, layout", case_params(STEP_SHAPES[:1], COMPILE_SHAPES["step"]))
def test_guided_reverse_step(benchmark, copy_bandwidth, provider, shape, dtype, layout):
    _reverse_step(benchmark, copy_bandwidth, "guided_reverse_step", provider, shape, dtype, layout, True)


def _ddim_quantities():
    """(alphas_cumprod, alphas_cumprod of the previous DDIM timestep) per t, float64."""
    abar = schedules.diffusion_quantities(schedules.linear_betas(NUM_TIMESTEPS))["alphas_cumprod"]
    previous = torch.arange(NUM_TIMESTEPS) - DDIM_STRIDE
    abar_prev = torch.where(previous >= 0, abar[previous.clamp(min=0)], torch.ones_like(abar))
    return abar, abar_prev


@pytest.mark.parametrize("provider, shape, dtype, layout", case_params(STEP_SHAPES, COMPILE_SHAPES["step"]))
def test_ddim_step(benchmark, copy_bandwidth, provider, shape, dtype, layout):
    nbytes = 3 * torch.Size(shape).numel() * dtype.itemsize
    sets = _input_sets(shape, dtype, layout, nbytes)
    next_set = cycle(sets)
    abar, abar_prev = _ddim_quantities()

    if provider in ("seed_eager", "torch_compile"):
        expression = eager_ddim_step if provider == "seed_eager" else compiled_eager_ddim_step
        abar32, abar_prev32 = abar.to(DEVICE, torch.float32), abar_prev.to(DEVICE, torch.float32)

        def fn():
            x_t, model_output, t = next_set()
            return expression(abar32, abar_prev32, x_t, model_output, t)
    else:
        table = coefficients.ddim_rows(abar, abar_prev, 0.0, "epsilon").to(DEVICE, torch.float32)

        def fn():
            x_t, model_output, t = next_set()
            return ops.sampler_step(x_t, model_output, t, table, backend=provider)[0], x_t, model_output, t

    out = run_benchmark(benchmark, fn, info=_info("ddim_step", provider, shape, dtype, layout, len(sets)),
                        nbytes=nbytes, copy_gbps=copy_bandwidth)
    if provider not in ("seed_eager", "torch_compile"):
        out, x_t, model_output, t = out
        check_layout(out, layout)
        assert_close(out, reference.sampler_step(x_t.double(), model_output.double(), t, table.double())[0])
