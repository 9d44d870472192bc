"""Classifier-free guidance: the guided fused step and 20-step loop against diffusers' eager CFG.

Step: one guided DPM-Solver++ 2M update on the same tensors. diffusers (what its guided pipelines
do): ``chunk`` the doubled model output, ``uncond + s * (cond - uncond)``, then
``scheduler.step``; fused: ``ops.sampler_step`` reading both halves of the [2B] output with s in
the table (reads x, both halves and h1, writes x_next and the new x0: 4 reads, 2 writes).

Loop: 20 guided steps from the same x_T with a constant class-conditional model (the sampler's
own cost): diffusers' set_timesteps + CFG + step loop against ``dpm_solver_sample_loop(y=,
guidance_scale=)``.

Sizes: B = 256 (a 512-sample model output) at 3x32x32 fp32 on the CPU; on a GPU also B = 128 in
bf16 (a 2 x 128 doubled batch).
"""

import pytest
import torch

from conftest import (DEVICE, FUSED_PROVIDERS, ON_GPU, assert_close, check_layout, cycle, make_tensor,
                      provider_skip_reason, rotation_count, run_benchmark)
from ddpm_fast import GaussianDiffusion, ops, reference, schedules
from ddpm_fast.samplers import coefficients

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install diffusers)")

NUM_STEPS = 20
SCALE = 5.0
MID_LOOP = 10
STEP_CASES = [((256, 3, 32, 32), torch.float32)] + ([((128, 3, 32, 32), torch.bfloat16)] if ON_GPU else [])
LAYOUTS = ["contiguous", "channels_last"]


def _scheduler():
    scheduler = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(NUM_STEPS, device=DEVICE)
    return scheduler


def _step_params():
    params = []
    for provider in ("diffusers",) + FUSED_PROVIDERS:
        why = None if provider == "diffusers" else provider_skip_reason(provider)
        for shape, dtype in STEP_CASES:
            for layout in LAYOUTS:
                case_id = f"{provider}-{'x'.join(map(str, shape))}-{str(dtype).replace('torch.', '')}-{layout}"
                params.append(pytest.param(provider, shape, dtype, layout, id=case_id,
                                           marks=[pytest.mark.skip(reason=why)] if why else []))
    return params


@pytest.mark.parametrize("provider, shape, dtype, layout", _step_params())
def test_guided_step(benchmark, copy_bandwidth, provider, shape, dtype, layout):
    doubled = (2 * shape[0], *shape[1:])
    nbytes = 6 * torch.Size(shape).numel() * dtype.itemsize
    generator = torch.Generator(DEVICE).manual_seed(0)
    sets = [(make_tensor(shape, dtype, layout, generator), make_tensor(doubled, dtype, layout, generator),
             make_tensor(shape, dtype, layout, generator)) for _ in range(rotation_count(nbytes))]
    next_set = cycle(sets)
    scheduler = _scheduler()
    timestep = scheduler.timesteps[MID_LOOP]

    if provider == "diffusers":
        def fn():
            x, model_output, h1 = next_set()
            scheduler._step_index, scheduler.lower_order_nums = MID_LOOP, 2
            scheduler.model_outputs = [h1, h1]
            cond, uncond = model_output.chunk(2)
            return scheduler.step(uncond + SCALE * (cond - uncond), timestep, x).prev_sample
    else:
        _, sigmas = schedules.dpm_solver_timesteps(scheduler.alphas_cumprod.double(), NUM_STEPS)
        table = coefficients.with_guidance(coefficients.dpm_solver_rows(sigmas), SCALE).to(DEVICE, torch.float32)
        index = torch.full((shape[0],), MID_LOOP, device=DEVICE)

        def fn():
            x, model_output, h1 = next_set()
            return (ops.sampler_step(x, model_output, index, table, h1=h1, store_x0=True, backend=provider),
                    x, model_output, h1)

    info = dict(op="guided_dpm_solver_step", provider=provider, shape=list(shape),
                dtype=str(dtype).replace("torch.", ""), layout=layout, buffers=len(sets),
                group=f"guided_dpm_solver_step {'x'.join(map(str, shape))} {dtype} {layout}")
    out = run_benchmark(benchmark, fn, info=info, nbytes=nbytes, copy_gbps=copy_bandwidth)
    if provider != "diffusers" and out is not None:
        (x_next, x0), x, model_output, h1 = out
        check_layout(x_next, layout)
        expected = reference.sampler_step(x.double(), model_output.double(), index, table.double(), h1=h1.double())
        assert_close(x_next, expected[0])
        assert_close(x0, expected[1])


class ConstantConditionalModel(torch.nn.Module):
    """A class-conditional stand-in whose output costs nothing: the loop's own cost is timed."""

    num_classes, null_class = 10, 10

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, x, t, y=None):
        return self.output[: x.shape[0]]


@pytest.mark.parametrize("provider", ["diffusers", "fused"])
def test_guided_loop_constant_model(benchmark, provider):
    batch = 256
    x_T = torch.randn(batch, 3, 32, 32, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    model = ConstantConditionalModel(0.1 * torch.randn(2 * batch, 3, 32, 32, device=DEVICE))
    labels = torch.arange(batch, device=DEVICE) % 10

    if provider == "diffusers":
        scheduler = _scheduler()

        def fn():
            scheduler.set_timesteps(NUM_STEPS, device=DEVICE)
            x = x_T
            for t in scheduler.timesteps:
                output = model(torch.cat([x, x]), t, torch.cat([labels, torch.full_like(labels, 10)]))
                cond, uncond = output.chunk(2)
                x = scheduler.step(uncond + SCALE * (cond - uncond), t, x).prev_sample
            return x
    else:
        diffusion = GaussianDiffusion()

        def fn():
            return diffusion.dpm_solver_sample_loop(model, x_T.shape, num_steps=NUM_STEPS, x_T=x_T, y=labels,
                                                    guidance_scale=SCALE)

    info = dict(op="guided_dpm_solver_loop", provider=provider, preset="constant", batch=batch,
                shape=[batch, 3, 32, 32], dtype="float32", layout="contiguous", steps=NUM_STEPS,
                group=f"guided_dpm_solver_loop constant batch {batch} float32 contiguous")
    out = run_benchmark(benchmark, fn, info=info, images=batch)
    assert out.shape == x_T.shape and torch.isfinite(out).all()
