"""End to end: one sampling step (UNet + reverse step) and a short p_sample_loop.

fused:      ddpm_fast.nn.UNet(fused=True) (GroupNormSiLU) + ddpm_fast.GaussianDiffusion (backend auto)
seed_eager: the same UNet with nn.GroupNorm + SiLU (fused=False) + the seed's GaussianDiffusion

Both networks hold the same weights and run in eval mode under torch.no_grad(). On the CPU: the
tiny preset, float32, batch 4. On a GPU: the cifar10 preset (35.7M parameters) under bf16
autocast in channels_last, batch 1 and 128, and each step also captured once in a CUDA graph
and replayed (static input buffers; the fused step draws its noise in-kernel from a seed read
on the device, so each replay draws new noise).
"""

import contextlib

import pytest
import torch

from conftest import DEVICE, ON_GPU, run_benchmark, seed_reference
import ddpm_fast
from ddpm_fast.nn import UNet

if ON_GPU:
    PRESET, BATCHES, LAYOUT, DTYPE = "cifar10", [1, 128], "channels_last", "bf16-autocast"
else:
    # A tiny-preset forward at batch 4 is a few hundred ms of convolution on 2 cores.
    PRESET, BATCHES, LAYOUT, DTYPE = "tiny", [4], "contiguous", "float32"
STEP_PROVIDERS = ["seed_eager", "fused", "seed_eager_cuda_graph", "fused_cuda_graph"]
NUM_TIMESTEPS = 1000
LOOP_STEPS = 10  # p_sample_loop over a GaussianDiffusion of 10 timesteps


def _models():
    """(unfused, fused) UNets with the same weights, on DEVICE, eval mode."""
    torch.manual_seed(0)
    unfused = UNet.from_preset(PRESET, fused=False)
    fused = UNet.from_preset(PRESET, fused=True)
    fused.load_state_dict(unfused.state_dict())
    memory_format = torch.channels_last if LAYOUT == "channels_last" else torch.contiguous_format
    return [m.to(DEVICE, memory_format=memory_format).eval() for m in (unfused, fused)]


@pytest.fixture(scope="module")
def models():
    return _models()


def _autocast():
    if ON_GPU:  # no weight cache: a cached cast would be a stale tensor inside a CUDA graph
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def _pipeline(provider, models, num_timesteps):
    """(model, diffusion) for the seed's code or the fused one."""
    unfused, fused = models
    if provider.startswith("seed_eager"):
        return unfused, seed_reference.GaussianDiffusion(num_timesteps, device=str(DEVICE))
    return fused, ddpm_fast.GaussianDiffusion(num_timesteps)


def _capture(step, x, t):
    """One step captured in a CUDA graph: returns replay; the output lands in a static buffer."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream (allocator, autotuning)
        for _ in range(3):
            step(x, t)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(x, t)
    return graph.replay


def _info(op, provider, batch):
    return dict(op=op, provider=provider, preset=PRESET, batch=batch, shape=[batch, 3, 32, 32], dtype=DTYPE,
                layout=LAYOUT, group=f"{op} {PRESET} batch {batch} {DTYPE} {LAYOUT}")


def _provider_params(providers):
    skip_graph = pytest.mark.skip(reason="CUDA graphs need a CUDA device")
    return [pytest.param(p, id=p, marks=[skip_graph] if p.endswith("cuda_graph") and not ON_GPU else [])
            for p in providers]


@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"batch{b}")
@pytest.mark.parametrize("provider", _provider_params(STEP_PROVIDERS))
def test_sampling_step(benchmark, models, provider, batch):
    model, diffusion = _pipeline(provider, models, NUM_TIMESTEPS)
    generator = torch.Generator(DEVICE).manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, device=DEVICE, generator=generator)
    if LAYOUT == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    t = torch.randint(1, NUM_TIMESTEPS, (batch,), device=DEVICE, generator=generator)

    def step(x, t):
        with torch.no_grad(), _autocast():
            return diffusion.p_sample(model, x, t)

    fn = _capture(step, x, t) if provider.endswith("cuda_graph") else (lambda: step(x, t))
    info = _info("sampling_step", provider, batch)
    out = run_benchmark(benchmark, fn, info=info, images=batch)
    if out is None:  # a graph replay writes into its static output; check an eager step instead
        out = step(x, t)
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"batch{b}")
@pytest.mark.parametrize("provider", _provider_params(["seed_eager", "fused"]))
def test_p_sample_loop(benchmark, models, provider, batch):
    model, diffusion = _pipeline(provider, models, LOOP_STEPS)

    def fn():
        with torch.no_grad(), _autocast():
            return diffusion.p_sample_loop(model, (batch, 3, 32, 32))

    info = dict(_info("p_sample_loop", provider, batch), steps=LOOP_STEPS)
    out = run_benchmark(benchmark, fn, info=info, images=batch)
    assert out.shape == (batch, 3, 32, 32) and torch.isfinite(out).all()
