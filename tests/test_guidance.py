"""Classifier-free guidance inside the fused step: every loop against an eager reference.

The reference is what diffusers' guided pipelines do: diffusers' class-conditional UNet2DModel on
the doubled batch (conditional labels first, then the null class), the CFG formula
m_u + s (m_c - m_u) in PyTorch (and rescale_noise_cfg for guidance_rescale), then diffusers'
scheduler step. Ours loads the same UNet (UNet.from_diffusers) and samples with y= and
guidance_scale=, which mixes the two halves inside the step.
"""

import os

import pytest
import torch

from conftest import backend_params, randomize_weights
from ddpm_fast import GaussianDiffusion, SamplerDefaults, ops, reference, samplers
from ddpm_fast.nn import UNet

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")

NUM_CLASSES = 4
UNET_CONFIG = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=[16, 32], layers_per_block=1,
                   down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
                   norm_num_groups=8, attention_head_dim=8, num_class_embeds=NUM_CLASSES + 1)
SHAPE = (3, 1, 8, 8)
LABELS = torch.tensor([0, 3, 1])


@pytest.fixture(scope="module")
def theirs():
    return randomize_weights(diffusers.UNet2DModel(**UNET_CONFIG), seed=3).eval()


def rescale_noise_cfg(noise_cfg, noise_pred_text, guidance_rescale):
    """diffusers' rescale_noise_cfg (pipeline_stable_diffusion.py), as written there."""
    std_text = noise_pred_text.std(dim=list(range(1, noise_pred_text.ndim)), keepdim=True)
    std_cfg = noise_cfg.std(dim=list(range(1, noise_cfg.ndim)), keepdim=True)
    noise_pred_rescaled = noise_cfg * (std_text / std_cfg)
    return guidance_rescale * noise_pred_rescaled + (1 - guidance_rescale) * noise_cfg


def eager_guided_loop(unet, scheduler, x_T, num_steps, scale, rescale=0.0):
    scheduler.set_timesteps(num_steps)
    x = x_T.clone()
    null = torch.full_like(LABELS, NUM_CLASSES)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(torch.cat([x, x]), t, class_labels=torch.cat([LABELS, null])).sample
            cond, uncond = out.chunk(2)
            guided = uncond + scale * (cond - uncond)
            if rescale:
                guided = rescale_noise_cfg(guided, cond, rescale)
            x = scheduler.step(guided, t, x).prev_sample
    return x


def _relative(a, b):
    return ((a.cpu().double() - b.double()).abs().max() / b.abs().max()).item()


SCHEDULERS = {
    "ddim": lambda: diffusers.DDIMScheduler(num_train_timesteps=100, clip_sample=False),
    "dpm++2m": lambda: diffusers.DPMSolverMultistepScheduler(num_train_timesteps=100),
    "dpm++3m": lambda: diffusers.DPMSolverMultistepScheduler(num_train_timesteps=100, solver_order=3),
}


def _ours(theirs, scheduler, backend, device, x_T, scale, rescale=0.0, num_steps=10):
    unet = UNet.from_diffusers(theirs).to(device)
    diffusion = GaussianDiffusion.from_diffusers(scheduler, backend=backend)
    loop = diffusion.ddim_sample_loop if isinstance(scheduler, diffusers.DDIMScheduler) else \
        diffusion.dpm_solver_sample_loop
    return loop(unet, x_T.shape, num_steps=num_steps, x_T=x_T.to(device), y=LABELS.to(device),
                guidance_scale=scale, guidance_rescale=rescale)


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("sampler", list(SCHEDULERS))
@pytest.mark.parametrize("scale", [0.0, 1.0, 3.0])
def test_guided_loops_equal_the_eager_reference(theirs, backend, device, sampler, scale):
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    expected = eager_guided_loop(theirs, SCHEDULERS[sampler](), x_T, 10, scale)
    got = _ours(theirs, SCHEDULERS[sampler](), backend, device, x_T, scale)
    assert _relative(got, expected) < 1e-4


@pytest.mark.parametrize("backend, device", backend_params())
def test_guidance_rescale_equals_diffusers_rescale_noise_cfg(theirs, backend, device):
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    expected = eager_guided_loop(theirs, SCHEDULERS["dpm++2m"](), x_T, 10, 5.0, rescale=0.7)
    got = _ours(theirs, SCHEDULERS["dpm++2m"](), backend, device, x_T, 5.0, rescale=0.7)
    assert _relative(got, expected) < 1e-4
    plain = _ours(theirs, SCHEDULERS["dpm++2m"](), backend, device, x_T, 5.0)
    assert _relative(plain, got) > 1e-3  # the rescale did something


class CountingModel(torch.nn.Module):
    """A class-conditional stand-in that records the batch size of every call."""

    num_classes, null_class = NUM_CLASSES, NUM_CLASSES

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(NUM_CLASSES + 1, 1)
        self.calls = []

    def forward(self, x, t, y=None):
        self.calls.append(x.shape[0])
        y = torch.full((x.shape[0],), self.null_class) if y is None else y
        return torch.tanh(x + self.embed(y).reshape(-1, 1, 1, 1) + 1e-3 * t.reshape(-1, 1, 1, 1))


@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_sample_loop", "dpm_solver_sample_loop"])
def test_one_call_per_step_doubled_only_when_guided(loop):
    diffusion = GaussianDiffusion(num_timesteps=20)
    options = {} if loop == "p_sample_loop" else {"num_steps": 5}
    steps = 20 if loop == "p_sample_loop" else 5
    for scale, batch in ((1.0, 3), (2.5, 6), (0.0, 6)):
        model = CountingModel()
        getattr(diffusion, loop)(model, SHAPE, y=LABELS, guidance_scale=scale, **options)
        assert model.calls == [batch] * steps, (scale, model.calls)
    model = CountingModel()
    getattr(diffusion, loop)(model, SHAPE, **options)  # no classes asked: the model as it is
    assert model.calls == [3] * steps


@pytest.mark.parametrize("prediction_type", ["epsilon", "x0", "v"])
@pytest.mark.parametrize("backend, device", backend_params())
def test_guidance_applies_to_the_model_output_in_every_prediction_type(prediction_type, backend, device):
    """One guided step equals the unguided step fed the CFG mix of the two outputs (eager)."""
    diffusion = GaussianDiffusion(num_timesteps=50, prediction_type=prediction_type, backend=backend)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g).to(device)
    both = torch.randn((2 * SHAPE[0], *SHAPE[1:]), generator=g).to(device)
    t = torch.tensor([0, 17, 49], device=device)
    noise = torch.randn(SHAPE, generator=g).to(device)
    guided = diffusion.reverse_step(both, x, t, noise=noise, guidance_scale=4.0)
    cond, uncond = both.chunk(2)
    mixed = uncond + 4.0 * (cond - uncond)
    expected = diffusion.reverse_step(mixed, x, t, noise=noise)
    torch.testing.assert_close(guided, expected, rtol=1e-5, atol=1e-5)


def test_scale_one_is_the_conditional_model_and_zero_the_unconditional():
    diffusion = GaussianDiffusion(num_timesteps=20, backend="torch")
    model = CountingModel()
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    cond = diffusion.ddim_sample_loop(model, SHAPE, num_steps=5, x_T=x_T, y=LABELS)
    uncond = diffusion.ddim_sample_loop(model, SHAPE, num_steps=5, x_T=x_T)
    zero = diffusion.ddim_sample_loop(model, SHAPE, num_steps=5, x_T=x_T, y=LABELS, guidance_scale=0.0)
    torch.testing.assert_close(zero, uncond, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(cond, uncond)


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("case", ["out of range", "negative", "float labels", "wrong shape", "unconditional model",
                                  "scale without labels", "rescale above 1"])
def test_bad_labels_and_guidance_name_the_argument(backend, device, case):
    diffusion = GaussianDiffusion(num_timesteps=60, backend=backend)
    model, kwargs, name = CountingModel().to(device), {}, "y"
    if case == "out of range":
        kwargs = dict(y=torch.tensor([0, 5, 1], device=device))  # 4 is the null label
    elif case == "negative":
        kwargs = dict(y=torch.tensor([0, -1, 1], device=device))
    elif case == "float labels":
        kwargs = dict(y=torch.tensor([0.0, 1.0, 2.0], device=device))
    elif case == "wrong shape":
        kwargs = dict(y=torch.tensor([0, 1], device=device))
    elif case == "unconditional model":
        model = UNet.from_preset("tiny", in_channels=1, image_size=8).to(device)
        kwargs = dict(y=LABELS.to(device))
    elif case == "scale without labels":
        kwargs, name = dict(guidance_scale=3.0), "guidance_scale"
    else:
        kwargs, name = dict(y=LABELS.to(device), guidance_scale=3.0, guidance_rescale=1.5), "guidance_rescale"
    for loop in ("p_sample_loop", "ddim_sample_loop", "dpm_solver_sample_loop"):
        with pytest.raises((TypeError, ValueError), match=name):
            getattr(diffusion, loop)(model, SHAPE, **kwargs)


@pytest.mark.parametrize("backend, device", backend_params())
def test_the_step_reads_both_halves(backend, device):
    """The fused op itself: a [2B] model output with s in the table is the CFG mix, on every backend."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(SHAPE, generator=g).to(device)
    both = torch.randn((2 * SHAPE[0], *SHAPE[1:]), generator=g).to(device)
    rows = samplers.with_guidance(samplers.step_rows(0.5, -0.7, 0.9, 0.3), 2.0).reshape(1, -1)
    table = rows.float().to(device)
    index = torch.zeros(SHAPE[0], dtype=torch.long, device=device)
    got, x0 = ops.sampler_step(x, both, index, table, store_x0=True, backend=backend)
    ref, ref_x0 = reference.sampler_step(x.double(), both.double(), index, table.double())
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x0.double(), ref_x0, rtol=1e-5, atol=1e-6)
    assert SamplerDefaults() == SamplerDefaults()  # a frozen value type: defaults compare by value
