"""DPM-Solver++ (2M): the fused step and whole 20-step loops against diffusers' DPMSolverMultistepScheduler.

Step: one multistep update on the same tensors, second order (2M) and third order (3M).
diffusers: ``scheduler.step`` (model-output conversion, the update, its bookkeeping), with the
scheduler reset to the same mid-loop state before every call; fused: ``ops.sampler_step`` with
the solver's rows as an [N, 8] table (2M reads x, the model output and h1 = the previous x0,
writes x_next and the new x0: 3 reads, 2 writes; 3M reads h2 too: 4 reads, 2 writes). The 3M
table adds an h2 weight to the 2M rows: the cost does not depend on the values.

Loop: 20 steps from the same x_T with a constant model (the solver's own cost), diffusers'
``set_timesteps`` + ``step`` loop against ``dpm_solver_sample_loop``; and the same loop with a
UNet (the tiny preset at batch 4 on the CPU; the cifar10 preset at batch 128 in bf16 autocast,
channels_last, on a GPU): diffusers' scheduler driving the unfused network against the fused
network and loop.
"""

import contextlib

import pytest
import torch

from conftest import (DEVICE, FUSED_PROVIDERS, ON_GPU, assert_close, check_layout, cycle, make_tensor,
                      provider_skip_reason, rotation_count, run_benchmark)
from ddpm_fast import GaussianDiffusion, ops, reference, schedules
from ddpm_fast.nn import UNet
from ddpm_fast.samplers import coefficients

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install diffusers)")

NUM_STEPS = 20
STEP_CASES = [((256, 3, 32, 32), torch.float32)] + ([((128, 3, 32, 32), torch.bfloat16),
                                                      ((256, 4, 128, 128), torch.float32)] if ON_GPU else [])
LAYOUTS = ["contiguous", "channels_last"]
MID_LOOP = 10  # the step index timed: a second-order step with a previous x0


def _scheduler(order=2):
    scheduler = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, solver_order=order)
    scheduler.set_timesteps(NUM_STEPS, device=DEVICE)
    return scheduler


def _step_params():
    params = []
    for provider in ("diffusers",) + FUSED_PROVIDERS:
        why = None if provider == "diffusers" else provider_skip_reason(provider)
        for (shape, dtype) in STEP_CASES:
            for layout in LAYOUTS:
                case_id = f"{provider}-{'x'.join(map(str, shape))}-{str(dtype).replace('torch.', '')}-{layout}"
                params.append(pytest.param(provider, shape, dtype, layout, id=case_id,
                                           marks=[pytest.mark.skip(reason=why)] if why else []))
    return params


@pytest.mark.parametrize("order", [2, 3], ids=["2m", "3m"])
@pytest.mark.parametrize("provider, shape, dtype, layout", _step_params())
def test_dpm_solver_step(benchmark, copy_bandwidth, provider, shape, dtype, layout, order):
    nbytes = (order + 3) * torch.Size(shape).numel() * dtype.itemsize
    generator = torch.Generator(DEVICE).manual_seed(0)
    sets = [tuple(make_tensor(shape, dtype, layout, generator) for _ in range(order + 1))
            for _ in range(rotation_count(nbytes))]
    next_set = cycle(sets)
    scheduler = _scheduler(order)
    timestep = scheduler.timesteps[MID_LOOP]

    if provider == "diffusers":
        def fn():
            x, model_output, *earlier = next_set()
            scheduler._step_index, scheduler.lower_order_nums = MID_LOOP, order
            # step() shifts the list left, then appends the new x0: the last two entries are h2, h1.
            scheduler.model_outputs = [earlier[0], earlier[1], earlier[0]] if order == 3 else [earlier[0]] * 2
            return scheduler.step(model_output, timestep, x).prev_sample
    else:
        _, sigmas = schedules.dpm_solver_timesteps(scheduler.alphas_cumprod.double(), NUM_STEPS)
        table = coefficients.dpm_solver_rows(sigmas, order, True, "epsilon").to(DEVICE, torch.float32)
        index = torch.full((shape[0],), MID_LOOP, device=DEVICE)

        def fn():
            x, model_output, h1, *h2 = next_set()
            h2 = h2[0] if h2 else None
            return (ops.sampler_step(x, model_output, index, table, h1=h1, h2=h2, store_x0=True, backend=provider),
                    x, model_output, h1, h2)

    op = f"dpm_solver_{order}m_step" if order == 3 else "dpm_solver_step"
    info = dict(op=op, provider=provider, shape=list(shape), dtype=str(dtype).replace("torch.", ""),
                layout=layout, buffers=len(sets), group=f"{op} {'x'.join(map(str, shape))} {dtype} {layout}")
    out = run_benchmark(benchmark, fn, info=info, nbytes=nbytes, copy_gbps=copy_bandwidth)
    if provider != "diffusers" and out is not None:
        (x_next, x0), x, model_output, h1, h2 = out
        check_layout(x_next, layout)
        expected = reference.sampler_step(x.double(), model_output.double(), index, table.double(), h1=h1.double(),
                                          h2=None if h2 is None else h2.double(), store_x0=True)
        assert_close(x_next, expected[0])
        assert_close(x0, expected[1])


# ----------------------------------------------------------------------------- whole loops

def _autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16) if ON_GPU else contextlib.nullcontext()


def _loop_info(op, provider, model, batch, dtype, layout):
    return dict(op=op, provider=provider, preset=model, batch=batch, shape=[batch, 3, 32, 32], dtype=dtype,
                layout=layout, steps=NUM_STEPS, group=f"{op} {model} batch {batch} {dtype} {layout}")


@pytest.mark.parametrize("provider", ["diffusers", "fused"])
def test_dpm_solver_loop_constant_model(benchmark, provider):
    batch = 256
    x_T = torch.randn(batch, 3, 32, 32, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    constant = 0.1 * torch.randn_like(x_T)

    def model(x, t):
        return constant

    if provider == "diffusers":
        scheduler = _scheduler()

        def fn():
            scheduler.set_timesteps(NUM_STEPS, device=DEVICE)
            x = x_T
            for t in scheduler.timesteps:
                x = scheduler.step(model(x, t), t, x).prev_sample
            return x
    else:
        diffusion = GaussianDiffusion()

        def fn():
            return diffusion.dpm_solver_sample_loop(model, x_T.shape, num_steps=NUM_STEPS, x_T=x_T)

    out = run_benchmark(benchmark, fn, info=_loop_info("dpm_solver_loop", provider, "constant", batch, "float32",
                                                       "contiguous"), images=batch)
    assert out.shape == x_T.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("provider", ["diffusers", "fused"])
def test_dpm_solver_loop_unet(benchmark, provider):
    preset, batch = ("cifar10", 128) if ON_GPU else ("tiny", 4)
    layout, dtype = ("channels_last", "bf16-autocast") if ON_GPU else ("contiguous", "float32")
    torch.manual_seed(0)
    unet = UNet.from_preset(preset, fused=provider == "fused").to(DEVICE).eval()
    memory_format = torch.channels_last if ON_GPU else torch.contiguous_format
    unet = unet.to(memory_format=memory_format)
    x_T = torch.randn(batch, 3, 32, 32, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    x_T = x_T.contiguous(memory_format=memory_format)

    if provider == "diffusers":
        scheduler = _scheduler()

        def fn():
            scheduler.set_timesteps(NUM_STEPS, device=DEVICE)
            x = x_T
            with torch.no_grad(), _autocast():
                for t in scheduler.timesteps:
                    x = scheduler.step(unet(x, t.expand(batch)), t, x).prev_sample
            return x
    else:
        diffusion = GaussianDiffusion()

        def fn():
            with _autocast():
                return diffusion.dpm_solver_sample_loop(unet, x_T.shape, num_steps=NUM_STEPS, x_T=x_T)

    out = run_benchmark(benchmark, fn, info=_loop_info("dpm_solver_loop", provider, preset, batch, dtype, layout),
                        images=batch)
    assert out.shape == x_T.shape and torch.isfinite(out).all()
