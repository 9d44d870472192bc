"""q_sample: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, with eps drawn at each call.

The seed draws eps with ``torch.randn_like`` and gathers both coefficients with ``_extract``;
the fused op draws eps in-kernel (Philox) and returns it beside x_t (the training target).
Minimal bytes: read x_0, write x_t and eps.
"""

import pytest
import torch

from conftest import (COMPILE_SHAPES, DEVICE, STEP_SHAPES, assert_close, case_params, check_layout, cycle,
                      make_tensor, rotation_count, run_benchmark, seed_reference)
from ddpm_fast import ops, reference, schedules
from ddpm_fast.ops._common import draw_seed

NUM_TIMESTEPS = 1000


def seed_q_sample(sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, x_start, t):
    """The seed's GaussianDiffusion.q_sample with noise=None, line for line."""
    extract = seed_reference.GaussianDiffusion._extract
    noise = torch.randn_like(x_start)
    sqrt_alphas_cumprod_t = extract(sqrt_alphas_cumprod, t, x_start.shape)
    sqrt_one_minus_alphas_cumprod_t = extract(sqrt_one_minus_alphas_cumprod, t, x_start.shape)
    return sqrt_alphas_cumprod_t * x_start + sqrt_one_minus_alphas_cumprod_t * noise


compiled_seed_q_sample = torch.compile(seed_q_sample, dynamic=False)


@pytest.mark.parametrize("provider, shape, dtype, layout", case_params(STEP_SHAPES, COMPILE_SHAPES["step"]))
def test_q_sample(benchmark, copy_bandwidth, provider, shape, dtype, layout):
    quantities = schedules.diffusion_quantities(schedules.linear_betas(NUM_TIMESTEPS))
    table = schedules.q_sample_table(quantities).to(DEVICE, torch.float32)
    generator = torch.Generator(DEVICE).manual_seed(0)
    nbytes = 3 * torch.Size(shape).numel() * dtype.itemsize
    sets = [(make_tensor(shape, dtype, layout, generator),
             torch.randint(0, NUM_TIMESTEPS, (shape[0],), device=DEVICE, generator=generator))
            for _ in range(rotation_count(nbytes))]
    next_set = cycle(sets)

    if provider in ("seed_eager", "torch_compile"):
        expression = seed_q_sample if provider == "seed_eager" else compiled_seed_q_sample
        sqrt_ab, sqrt_1m_ab = table[:, 0].contiguous(), table[:, 1].contiguous()

        def fn():
            x_start, t = next_set()
            return expression(sqrt_ab, sqrt_1m_ab, x_start, t), x_start, t
    else:
        def fn():
            x_start, t = next_set()
            return ops.q_sample(x_start, t, table, seed=draw_seed(DEVICE), backend=provider), x_start, t

    info = dict(op="q_sample", provider=provider, shape=list(shape), dtype=str(dtype).replace("torch.", ""),
                layout=layout, buffers=len(sets),
                group=f"q_sample {'x'.join(map(str, shape))} {dtype} {layout}")
    out, x_start, t = run_benchmark(benchmark, fn, info=info, nbytes=nbytes, copy_gbps=copy_bandwidth)
    if provider not in ("seed_eager", "torch_compile"):
        x_t, noise = out
        check_layout(x_t, layout)
        check_layout(noise, layout)
        assert_close(x_t, reference.q_sample(x_start.double(), t, table.double(), noise.double()))
