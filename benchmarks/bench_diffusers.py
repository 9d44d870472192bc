"""diffusers' pipelines against ddpm_fast on the same saved pipeline folder, as images/s.

One folder is written by diffusers' ``DDPMPipeline.save_pretrained`` (random weights; a
DDPMScheduler of STEPS timesteps, "trailing" spacing) and loaded twice: by
``diffusers.DDPMPipeline.from_pretrained`` and by ``ddpm_fast.load_diffusers_pipeline``. Every
sampler takes STEPS steps, one per timestep (trailing spacing lets DPM-Solver++ take them all).
Each case draws x_T and runs every step:

  op             provider   what runs
  pipeline_ddpm  diffusers  DDPMPipeline, all STEPS timesteps
                 fused      ddpm_fast's p_sample_loop (fused UNet + fused reverse step)
  pipeline_ddim  diffusers  DDIMPipeline, STEPS steps, eta 0
                 fused      ddim_sample_loop
  pipeline_dpm   diffusers  DDPMPipeline with DPMSolverMultistepScheduler.from_config (DPM-Solver++ 2M)
                 fused      dpm_solver_sample_loop

Both sides use the scheduler's clip_sample (on) where their sampler clips, and diffusers' pipelines
return tensors (output_type="pt"), so no image conversion is timed. On the CPU: a small UNet2DModel
(32x32, widths 32/64/64, attention at 8x8), float32, batch 4, 5 steps. On a GPU: google/ddpm-cifar10-32's
UNet (35.7M parameters), batch 128, bf16 autocast, channels_last weights and inputs, 20 steps.
Skipped (with the reason) where diffusers cannot be imported.
"""

import contextlib
import os

import pytest
import torch

from conftest import DEVICE, ON_GPU, run_benchmark

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers is imported: no hub look-ups
try:
    import diffusers
except ImportError as error:  # the GPU machine may lack it
    pytest.skip(f"diffusers cannot be imported ({error}): nothing to compare against", allow_module_level=True)

from ddpm_fast import GaussianDiffusion, load_diffusers_pipeline  # noqa: E402

if ON_GPU:
    PRESET, BATCH, STEPS, DTYPE, LAYOUT = "cifar10", 128, 20, "bf16-autocast", "channels_last"
    UNET_CONFIG = dict(  # google/ddpm-cifar10-32's unet/config.json
        sample_size=32, block_out_channels=[128, 256, 256, 256], layers_per_block=2, attention_head_dim=None,
        down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], downsample_padding=0,
        flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32)
else:
    PRESET, BATCH, STEPS, DTYPE, LAYOUT = "small", 4, 5, "float32", "contiguous"
    UNET_CONFIG = dict(
        sample_size=32, block_out_channels=[32, 64, 64], layers_per_block=1, norm_num_groups=8, attention_head_dim=16,
        down_block_types=["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
        up_block_types=["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"])
SIZE = UNET_CONFIG["sample_size"]
SHAPE = (BATCH, 3, SIZE, SIZE)
MEMORY_FORMAT = torch.channels_last if LAYOUT == "channels_last" else torch.contiguous_format
SAMPLERS = ("ddpm", "ddim", "dpm")


def _autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16) if ON_GPU else contextlib.nullcontext()


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """{sampler: diffusers pipeline}, and ddpm_fast's (unet, {sampler: diffusion}), of one saved folder."""
    folder = tmp_path_factory.mktemp("pipeline")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**UNET_CONFIG)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=STEPS, timestep_spacing="trailing")
    diffusers.DDPMPipeline(unet, scheduler).save_pretrained(folder)

    ddpm = diffusers.DDPMPipeline.from_pretrained(folder)
    ddpm.unet.to(DEVICE, memory_format=MEMORY_FORMAT)
    dpm_scheduler = diffusers.DPMSolverMultistepScheduler.from_config(ddpm.scheduler.config)
    theirs = {"ddpm": ddpm, "ddim": diffusers.DDIMPipeline(ddpm.unet, ddpm.scheduler),
              "dpm": diffusers.DDPMPipeline(ddpm.unet, dpm_scheduler)}
    for pipeline in theirs.values():
        pipeline.set_progress_bar_config(disable=True)

    ours, diffusion = load_diffusers_pipeline(folder)
    ours.to(DEVICE, memory_format=MEMORY_FORMAT)
    # DPM-Solver++ as diffusers' scheduler of it says: no clipping (DPMSolverMultistepScheduler never clips).
    diffusions = {"ddpm": diffusion, "ddim": diffusion, "dpm": GaussianDiffusion.from_diffusers(dpm_scheduler)}
    return theirs, (ours, diffusions)


def _ours(unet, diffusion, sampler, generator):
    x_T = torch.randn(SHAPE, device=DEVICE, generator=generator).to(memory_format=MEMORY_FORMAT)
    if sampler == "ddpm":
        return diffusion.p_sample_loop(unet, SHAPE, x_T=x_T, generator=generator)
    if sampler == "ddim":
        return diffusion.ddim_sample_loop(unet, SHAPE, num_steps=STEPS, x_T=x_T, generator=generator)
    return diffusion.dpm_solver_sample_loop(unet, SHAPE, num_steps=STEPS, x_T=x_T, generator=generator)


@pytest.mark.parametrize("provider", ["diffusers", "fused"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_pipeline_sampling(benchmark, pipelines, sampler, provider):
    theirs, (unet, diffusions) = pipelines
    generator = torch.Generator(DEVICE).manual_seed(0)

    def fn():
        with torch.no_grad(), _autocast():
            if provider == "diffusers":
                return theirs[sampler](batch_size=BATCH, generator=generator, num_inference_steps=STEPS,
                                       output_type="pt").images
            return _ours(unet, diffusions[sampler], sampler, generator)

    info = dict(op=f"pipeline_{sampler}", provider=provider, preset=PRESET, batch=BATCH, shape=list(SHAPE),
                dtype=DTYPE, layout=LAYOUT, steps=STEPS,
                group=f"pipeline_{sampler} {PRESET} batch {BATCH} {STEPS} steps {DTYPE} {LAYOUT}")
    out = run_benchmark(benchmark, fn, info=info, images=BATCH)
    assert out.shape == SHAPE and torch.isfinite(out).all()
