"""diffusers schedulers and pipeline folders <-> GaussianDiffusion and UNet: the scheduler mapping key
by key, loading a DDPMPipeline.save_pretrained folder, sampling it as diffusers does (DDPM, DDIM,
DPM-Solver++), exporting back, and the command line's --pipeline / export --diffusers.

Every diffusers model here is built from a config with random weights; nothing is downloaded.
"""

import dataclasses
import inspect
import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers is imported: no hub look-ups at all

import numpy as np
import pytest
import torch
from conftest import randomize_weights

diffusers = pytest.importorskip("diffusers")
from diffusers import (DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler,  # noqa: E402
                       DPMSolverMultistepScheduler, UNet2DModel)

import ddpm_fast  # noqa: E402
from ddpm_fast import GaussianDiffusion, SamplerDefaults, load_diffusers_pipeline, save_diffusers_pipeline  # noqa: E402
from ddpm_fast import checkpoint as ckpt  # noqa: E402
from ddpm_fast.cli import main  # noqa: E402
from ddpm_fast.interop import diffusers as interop  # noqa: E402
from ddpm_fast.nn import UNet  # noqa: E402
from ddpm_fast.train import model_config_for  # noqa: E402

diffusers.utils.logging.set_verbosity_error()  # from_pretrained's notes on accelerate

SCHEDULERS = {"DDPMScheduler": DDPMScheduler, "DDIMScheduler": DDIMScheduler,
              "DPMSolverMultistepScheduler": DPMSolverMultistepScheduler}
# A small UNet2DModel: attention at the 4x4 level, several heads, a short schedule.
UNET_CONFIG = dict(sample_size=8, block_out_channels=[32, 64], layers_per_block=1,
                   down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
                   norm_num_groups=8, attention_head_dim=16)
NUM_TRAIN_TIMESTEPS = 20
SHAPE = (2, 3, 8, 8)
# google/ddpm-cifar10-32's scheduler/scheduler_config.json (diffusers 0.1.1: the later keys absent).
GOOGLE_DDPM_SCHEDULER = {"_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1", "beta_end": 0.02,
                         "beta_schedule": "linear", "beta_start": 0.0001, "clip_sample": True,
                         "num_train_timesteps": 1000, "trained_betas": None, "variance_type": "fixed_small"}


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def diffusion_tensors(d):
    return {name: getattr(d, name) for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance",
                                                 "posterior_mean_coef1", "posterior_mean_coef2",
                                                 "posterior_log_variance_clipped")}


def same_diffusion(a, b):
    ta, tb = diffusion_tensors(a), diffusion_tensors(b)
    return (all(torch.equal(ta[k], tb[k]) for k in ta) and a.num_timesteps == b.num_timesteps
            and (a.schedule, a.prediction_type, a.variance_type, a.sampler_defaults)
            == (b.schedule, b.prediction_type, b.variance_type, b.sampler_defaults))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The networks here are tiny (8x8 images, batch 2): one thread runs them fastest, and on a shared,
    loaded CPU several threads mostly wait for each other at every op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A folder written by diffusers' DDPMPipeline.save_pretrained: random UNet, DDPMScheduler(T = 20)."""
    folder = tmp_path_factory.mktemp("pipeline")
    unet = randomize_weights(UNet2DModel(**UNET_CONFIG)).eval()
    DDPMPipeline(unet, DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipelines(pipeline_dir):
    """(diffusers' DDPMPipeline.from_pretrained, our (unet, diffusion)) of the same folder."""
    theirs = DDPMPipeline.from_pretrained(pipeline_dir)
    theirs.set_progress_bar_config(disable=True)
    return theirs, load_diffusers_pipeline(pipeline_dir)


# ----------------------------------------------------------------------------- the scheduler mapping


@pytest.mark.parametrize("name", SCHEDULERS)
def test_defaults_are_diffusers_own(name):
    parameters = inspect.signature(SCHEDULERS[name].__init__).parameters
    defaults = {key: p.default for key, p in parameters.items() if key != "self"}
    assert defaults == interop.SCHEDULER_DEFAULTS[name]


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("num_timesteps", [20, 1000])
@pytest.mark.parametrize("beta_schedule, betas", [
    ("linear", {}), ("linear", dict(beta_start=0.00085, beta_end=0.012)),
    ("scaled_linear", dict(beta_start=0.00085, beta_end=0.012)), ("squaredcos_cap_v2", {}), ("trained", {}),
])
def test_betas_equal_diffusers(name, num_timesteps, beta_schedule, betas):
    if beta_schedule == "trained":
        trained = (0.001 + 0.02 * torch.rand(num_timesteps, generator=torch.Generator().manual_seed(0))).tolist()
        scheduler = SCHEDULERS[name](num_train_timesteps=num_timesteps, trained_betas=trained)
    else:
        scheduler = SCHEDULERS[name](num_train_timesteps=num_timesteps, beta_schedule=beta_schedule, **betas)
    ours = GaussianDiffusion.from_diffusers(scheduler)
    assert ours.num_timesteps == num_timesteps
    # diffusers builds its betas in float32 (torch.linspace, and its square for scaled_linear); ours
    # are float64, stored in float32: they agree to about two float32 ulps.
    torch.testing.assert_close(ours.betas.double(), scheduler.betas.double(), rtol=2.5e-7, atol=0)
    if beta_schedule == "squaredcos_cap_v2":  # the same formula in float64, rounded once: equal
        assert ours.schedule == "cosine" and torch.equal(ours.betas, scheduler.betas)
    if beta_schedule == "trained":  # our float64 -> float32 rounding is diffusers' torch.tensor(float32)
        assert ours.schedule == "custom" and torch.equal(ours.betas, scheduler.betas)
    # diffusers' float32 cumulative product drifts by about T float32 ulps, and its 1 - beta loses digits
    # where beta is close to 1 (the cosine schedule's last beta, 0.999: 1.3e-5 relative).
    torch.testing.assert_close(ours.alphas_cumprod, scheduler.alphas_cumprod, rtol=2e-5 + num_timesteps * 1.2e-7,
                               atol=0)


# (scheduler class, config keys, expected GaussianDiffusion attributes and sampler defaults)
MAPPINGS = [
    ("DDPMScheduler", {}, dict(prediction_type="epsilon", variance_type="posterior", clip_denoised=True,
                               spacing="leading", steps_offset=0, order=2, karras_sigmas=False)),
    ("DDPMScheduler", {"prediction_type": "sample"}, dict(prediction_type="x0")),
    ("DDPMScheduler", {"prediction_type": "v_prediction"}, dict(prediction_type="v")),
    ("DDPMScheduler", {"variance_type": "fixed_small_log"}, dict(variance_type="posterior")),
    ("DDPMScheduler", {"variance_type": "fixed_large"}, dict(variance_type="beta")),
    ("DDPMScheduler", {"variance_type": "fixed_large_log"}, dict(variance_type="beta")),
    ("DDPMScheduler", {"clip_sample": False}, dict(clip_denoised=False)),
    ("DDPMScheduler", {"timestep_spacing": "trailing"}, dict(spacing="trailing")),
    ("DDPMScheduler", {"timestep_spacing": "leading", "steps_offset": 1}, dict(spacing="leading", steps_offset=1)),
    ("DDIMScheduler", {}, dict(variance_type="posterior", clip_denoised=True, spacing="leading")),
    ("DDIMScheduler", {"clip_sample": False, "timestep_spacing": "linspace"}, dict(clip_denoised=False,
                                                                                   spacing="linspace")),
    ("DPMSolverMultistepScheduler", {}, dict(clip_denoised=False, spacing="linspace", order=2, lower_order_final=True,
                                             karras_sigmas=False, final_sigma="zero")),
    ("DPMSolverMultistepScheduler", {"solver_order": 1}, dict(order=1)),
    ("DPMSolverMultistepScheduler", {"solver_order": 3}, dict(order=3)),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, dict(sde=True)),
    ("DPMSolverMultistepScheduler", {"solver_type": "heun", "solver_order": 3}, dict(solver_type="heun", order=3)),
    ("DPMSolverMultistepScheduler", {"lower_order_final": False}, dict(lower_order_final=False)),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, dict(karras_sigmas=True)),
    ("DPMSolverMultistepScheduler", {"final_sigmas_type": "sigma_min"}, dict(final_sigma="sigma_min")),
    ("DPMSolverMultistepScheduler", {"prediction_type": "v_prediction", "timestep_spacing": "trailing"},
     dict(prediction_type="v", spacing="trailing")),
    ("DPMSolverMultistepScheduler", {"variance_type": "fixed_large"}, dict(variance_type="beta")),
    # Inert given the others: nothing changes.
    ("DDPMScheduler", {"dynamic_thresholding_ratio": 0.9, "sample_max_value": 3.0}, {}),
    ("DDPMScheduler", {"clip_sample": False, "clip_sample_range": 2.0}, dict(clip_denoised=False)),
    # The keys of the other schedulers configure their samplers, as from_config to those would.
    ("DDPMScheduler", {"solver_order": 1, "use_karras_sigmas": True, "set_alpha_to_one": True},
     dict(order=1, karras_sigmas=True)),
    ("DDIMScheduler", {"variance_type": "fixed_large", "final_sigmas_type": "sigma_min"},
     dict(variance_type="beta", final_sigma="sigma_min")),
    # ... except clip_sample for DPMSolverMultistepScheduler, which never clips: inert.
    ("DPMSolverMultistepScheduler", {"clip_sample": True, "clip_sample_range": 2.0}, dict(clip_denoised=False)),
    ("DPMSolverMultistepScheduler", {"euler_at_final": True}, dict(final_sigma="zero")),
    ("DPMSolverMultistepScheduler", {"flow_shift": 3.0, "time_shift_type": "exponential"}, {}),
    ("DPMSolverMultistepScheduler", {"lambda_min_clipped": -5.1}, {}),  # below every log-SNR of this schedule
]


@pytest.mark.parametrize("name, config, expected", MAPPINGS)
def test_each_key_maps(name, config, expected):
    ours = GaussianDiffusion.from_diffusers({"_class_name": name, **config})
    defaults = GaussianDiffusion.from_diffusers({"_class_name": name})
    got = dict(prediction_type=ours.prediction_type, variance_type=ours.variance_type,
               **dataclasses.asdict(ours.sampler_defaults))
    unchanged = dict(prediction_type=defaults.prediction_type, variance_type=defaults.variance_type,
                     **dataclasses.asdict(defaults.sampler_defaults))
    assert got == {**unchanged, **expected}
    # The diffusers object of the same config (from_config keeps the keys its class does not take)
    # gives the same diffusion as the dict.
    assert same_diffusion(GaussianDiffusion.from_diffusers(SCHEDULERS[name].from_config(config)), ours)


def test_other_schedulers_keys_act_as_from_config_to_their_scheduler():
    # DPM-Solver++ settings in a DDPMScheduler config (as DDPMScheduler.from_config of a
    # DPMSolverMultistepScheduler config holds them) are what DPMSolverMultistepScheduler.from_config
    # of it brings back into effect.
    dpm = DPMSolverMultistepScheduler(num_train_timesteps=100, use_karras_sigmas=True, solver_order=1,
                                      final_sigmas_type="sigma_min", timestep_spacing="trailing")
    ddpm = DDPMScheduler.from_config(dpm.config)
    assert ddpm.config.use_karras_sigmas  # carried along, unread by DDPMScheduler
    via_ddpm = GaussianDiffusion.from_diffusers(ddpm)
    back = GaussianDiffusion.from_diffusers(DPMSolverMultistepScheduler.from_config(ddpm.config))
    assert via_ddpm.sampler_defaults == dataclasses.replace(back.sampler_defaults, clip_denoised=True)
    assert GaussianDiffusion.from_diffusers(dpm).sampler_defaults == back.sampler_defaults


def test_inert_lambda_min_clipped_is_inert_in_diffusers_too():
    plain, clipped = DPMSolverMultistepScheduler(), DPMSolverMultistepScheduler(lambda_min_clipped=-5.1)
    plain.set_timesteps(25)
    clipped.set_timesteps(25)
    assert torch.equal(plain.timesteps, clipped.timesteps) and torch.equal(plain.sigmas, clipped.sigmas)


def test_google_ddpm_scheduler_config():
    ours = GaussianDiffusion.from_diffusers(GOOGLE_DDPM_SCHEDULER)
    assert (ours.num_timesteps, ours.schedule, ours.prediction_type, ours.variance_type) == (1000, "linear", "epsilon",
                                                                                             "posterior")
    # The keys it lacks take DDPMScheduler's defaults, as diffusers gives them.
    assert ours.sampler_defaults == SamplerDefaults(clip_denoised=True, spacing="leading")


@pytest.mark.parametrize("name, config, key", [
    ("DDPMScheduler", {"thresholding": True}, "thresholding"),
    ("DPMSolverMultistepScheduler", {"thresholding": True}, "thresholding"),
    ("DDPMScheduler", {"variance_type": "learned"}, "variance_type"),
    ("DDPMScheduler", {"variance_type": "learned_range"}, "variance_type"),
    ("DPMSolverMultistepScheduler", {"variance_type": "learned_range"}, "variance_type"),
    ("DDPMScheduler", {"variance_type": "fixed_medium"}, "variance_type"),
    ("DDPMScheduler", {"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
    ("DDIMScheduler", {"set_alpha_to_one": False}, "set_alpha_to_one"),
    ("DDPMScheduler", {"set_alpha_to_one": False}, "set_alpha_to_one"),  # what DDIMScheduler.from_config takes
    ("DDIMScheduler", {"solver_order": 4}, "solver_order"),
    ("DDIMScheduler", {"variance_type": "learned_range"}, "variance_type"),
    ("DDPMScheduler", {"prediction_type": ["epsilon"]}, "prediction_type"),
    ("DDPMScheduler", {"clip_sample_range": 2.0}, "clip_sample_range"),
    ("DDIMScheduler", {"clip_sample_range": 0.5}, "clip_sample_range"),
    ("DDPMScheduler", {"beta_schedule": "sigmoid"}, "beta_schedule"),
    ("DDPMScheduler", {"prediction_type": "flow_prediction"}, "prediction_type"),
    ("DDPMScheduler", {"timestep_spacing": "uniform"}, "timestep_spacing"),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}, "algorithm_type"),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver"}, "algorithm_type"),
    ("DPMSolverMultistepScheduler", {"solver_type": "bh2"}, "solver_type"),
    ("DPMSolverMultistepScheduler", {"solver_order": 4}, "solver_order"),
    ("DPMSolverMultistepScheduler", {"use_exponential_sigmas": True}, "use_exponential_sigmas"),
    ("DPMSolverMultistepScheduler", {"use_beta_sigmas": True}, "use_beta_sigmas"),
    ("DPMSolverMultistepScheduler", {"use_lu_lambdas": True}, "use_lu_lambdas"),
    ("DPMSolverMultistepScheduler", {"use_flow_sigmas": True}, "use_flow_sigmas"),
    ("DPMSolverMultistepScheduler", {"use_dynamic_shifting": True}, "use_dynamic_shifting"),
    ("DPMSolverMultistepScheduler", {"final_sigmas_type": "one"}, "final_sigmas_type"),
    ("DPMSolverMultistepScheduler", {"euler_at_final": True, "final_sigmas_type": "sigma_min"}, "euler_at_final"),
    # The cosine schedule's last log-SNRs lie below -5.1: it would drop timesteps.
    ("DPMSolverMultistepScheduler", {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1},
     "lambda_min_clipped"),
    ("DPMSolverMultistepScheduler", {"trained_betas": [0.01] * 1000, "beta_schedule": "squaredcos_cap_v2",
                                     "use_karras_sigmas": True}, "beta_schedule"),
    ("EulerDiscreteScheduler", {}, None),
    ("DDPMScheduler", {"skip_prk_steps": True}, "skip_prk_steps"),
])
def test_what_ddpm_fast_cannot_express_names_the_key(name, config, key):
    with pytest.raises(ValueError) as info:
        GaussianDiffusion.from_diffusers({"_class_name": name, **config})
    message = str(info.value)
    assert isinstance(info.value, interop.DiffusersFormatError)
    if key is None:
        expected = f"scheduler class {name!r} is not supported"
    elif key == "skip_prk_steps":
        expected = "unknown key 'skip_prk_steps' (value True)"
    else:
        expected = f"{name} config: {key}={config[key]!r} is not supported"
    assert expected in message, message


@pytest.mark.parametrize("config, error, match", [
    ({"trained_betas": [0.01] * 10}, ValueError, "trained_betas has 10 values but num_train_timesteps=1000"),
    ({"num_train_timesteps": "1000"}, TypeError, "num_train_timesteps must be an int"),
    ({"num_train_timesteps": 0}, ValueError, "num_train_timesteps must be an int >= 1"),
    ({"clip_sample": "yes"}, TypeError, "clip_sample must be True or False"),
    ({"beta_start": None}, TypeError, "beta_start must be a number"),
    ({"beta_start": 0.03}, ValueError, "DDPMScheduler config: the linear schedule needs 0 < beta_start < beta_end"),
    ({"trained_betas": "0.1, 0.2"}, TypeError, "trained_betas must be a list of numbers"),
    ({"trained_betas": [0.1, 1.5], "num_train_timesteps": 2}, ValueError, "betas must lie in \\(0, 1\\)"),
    ({"steps_offset": -1}, ValueError, "steps_offset must be an int >= 0"),
])
def test_bad_values_name_the_key(config, error, match):
    with pytest.raises(error, match=match):
        GaussianDiffusion.from_diffusers(config)


def test_scheduler_sources_object_dict_and_path(tmp_path, monkeypatch):
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=50, beta_schedule="squaredcos_cap_v2",
                                            prediction_type="v_prediction", use_karras_sigmas=True)
    scheduler.save_pretrained(tmp_path)  # scheduler_config.json
    from_object = GaussianDiffusion.from_diffusers(scheduler)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now fails: not needed below
    for source in (json.loads((tmp_path / interop.SCHEDULER_CONFIG_NAME).read_text()),
                   tmp_path / interop.SCHEDULER_CONFIG_NAME, str(tmp_path)):
        assert same_diffusion(GaussianDiffusion.from_diffusers(source), from_object)
    assert from_object.sampler_defaults.karras_sigmas and from_object.prediction_type == "v"
    with pytest.raises(TypeError, match="must be a diffusers DDPMScheduler"):
        GaussianDiffusion.from_diffusers(42)
    with pytest.raises(ValueError, match="does not exist: expected a scheduler_config.json"):
        GaussianDiffusion.from_diffusers(tmp_path / "nowhere.json")


def test_overrides():
    defaults = SamplerDefaults(order=1)
    ours = GaussianDiffusion.from_diffusers(DDPMScheduler(), backend="torch", device="cpu", sampler_defaults=defaults)
    assert (ours.backend, ours.device, ours.sampler_defaults) == ("torch", torch.device("cpu"), defaults)
    with pytest.raises(TypeError, match="overrides backend, device, sampler_defaults only .* got num_timesteps"):
        GaussianDiffusion.from_diffusers(DDPMScheduler(), num_timesteps=10)


# ----------------------------------------------------------------------------- sampling a saved pipeline


def diffusers_sample(unet, scheduler, num_steps, seed, **step_kwargs):
    """diffusers' DDPMPipeline / DDIMPipeline loop without the final (x / 2 + 0.5).clamp(0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=generator)
    scheduler.set_timesteps(num_steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, generator=generator, **step_kwargs).prev_sample
    return x


def ddpm_sample_with_diffusers_noise(unet, diffusion, seed):
    """Our DDPM loop fed diffusers' random numbers: it draws x_T, then one noise tensor per step
    with t > 0, from its generator."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=generator)
    with torch.no_grad():
        for step in range(NUM_TRAIN_TIMESTEPS - 1, -1, -1):
            noise = torch.randn(SHAPE, generator=generator) if step > 0 else torch.zeros(SHAPE)
            x = diffusion.p_sample(unet, x, torch.full((SHAPE[0],), step), noise=noise)
    return x


def to_image(x):
    return (x / 2 + 0.5).clamp(0, 1)


def test_loads_a_save_pretrained_folder_without_diffusers(pipeline_dir, pipelines, monkeypatch):
    theirs, _ = pipelines
    reference = UNet.from_diffusers(theirs.unet).state_dict()
    reference_diffusion = GaussianDiffusion.from_diffusers(theirs.scheduler)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now fails
    unet, diffusion = load_diffusers_pipeline(pipeline_dir)
    assert isinstance(unet, UNet) and not unet.training
    assert unet.state_dict().keys() == reference.keys()
    assert all(torch.equal(unet.state_dict()[k], reference[k]) for k in reference)
    assert same_diffusion(diffusion, reference_diffusion)
    assert diffusion.num_timesteps == NUM_TRAIN_TIMESTEPS and diffusion.sampler_defaults.clip_denoised


def test_the_loop_above_is_diffusers_pipeline(pipelines):
    theirs, _ = pipelines
    images = theirs(batch_size=SHAPE[0], generator=torch.Generator().manual_seed(3),
                    num_inference_steps=NUM_TRAIN_TIMESTEPS, output_type="pt").images
    raw = diffusers_sample(theirs.unet, DDPMScheduler.from_config(theirs.scheduler.config), NUM_TRAIN_TIMESTEPS, 3)
    assert torch.equal(images, to_image(raw))
    ddim = DDIMPipeline(theirs.unet, theirs.scheduler)
    ddim.set_progress_bar_config(disable=True)
    images = ddim(batch_size=SHAPE[0], generator=torch.Generator().manual_seed(4), num_inference_steps=5, eta=0.5,
                  output_type="pt").images
    raw = diffusers_sample(theirs.unet, DDIMScheduler.from_config(theirs.scheduler.config), 5, 4, eta=0.5)
    assert torch.equal(images, to_image(raw))


@pytest.mark.parametrize("changes", [{}, {"variance_type": "fixed_large", "prediction_type": "v_prediction"},
                                     {"prediction_type": "sample", "clip_sample": False},
                                     {"beta_schedule": "squaredcos_cap_v2", "variance_type": "fixed_small_log"}])
def test_ddpm_sampling_matches_diffusers(pipelines, changes):
    theirs, (unet, diffusion) = pipelines
    scheduler = DDPMScheduler.from_config(theirs.scheduler.config, **changes)
    if changes:
        diffusion = GaussianDiffusion.from_diffusers(scheduler)
    expected = diffusers_sample(theirs.unet, scheduler, NUM_TRAIN_TIMESTEPS, seed=0)
    x = ddpm_sample_with_diffusers_noise(unet, diffusion, seed=0)
    error = relative_error(x, expected)
    print(f"DDPM {changes}, {NUM_TRAIN_TIMESTEPS} steps: max relative error {error:.2e}")
    # Each step's coefficients differ by diffusers' float32 alpha_bar (ours come from float64) and the
    # networks by ~1e-6; twenty steps, each adding noise, carry that to ~1e-5.
    assert error < 1e-4


@pytest.mark.parametrize("spacing, num_steps, clip", [("leading", 5, True), ("leading", 7, False),
                                                      ("trailing", 4, True), ("trailing", 10, False)])
def test_ddim_sampling_matches_diffusers(pipelines, spacing, num_steps, clip):
    """diffusers' DDIM with use_clipped_model_output=True (the epsilon of the clipped x_0, as ours)."""
    theirs, (unet, _) = pipelines
    scheduler = DDIMScheduler.from_config(theirs.scheduler.config, timestep_spacing=spacing, clip_sample=clip)
    assert (scheduler.config.timestep_spacing, scheduler.config.clip_sample) == (spacing, clip)
    expected = diffusers_sample(theirs.unet, scheduler, num_steps, seed=1, use_clipped_model_output=True)
    diffusion = GaussianDiffusion.from_diffusers(scheduler)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    got = diffusion.ddim_sample_loop(unet, SHAPE, num_steps=num_steps, x_T=x_T)
    error = relative_error(got, expected)
    print(f"DDIM {spacing} {num_steps} steps, clip {clip}: max relative error {error:.2e}")
    assert error < 1e-5  # a few steps, no noise: float32 rounding of the network and the coefficients


def test_ddim_with_noise_matches_diffusers(pipelines):
    theirs, (unet, diffusion) = pipelines
    scheduler, eta, num_steps = DDIMScheduler.from_config(theirs.scheduler.config), 0.7, 5
    expected = diffusers_sample(theirs.unet, scheduler, num_steps, seed=2, eta=eta, use_clipped_model_output=True)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(SHAPE, generator=generator)
    timesteps = scheduler.timesteps.tolist() + [-1]
    with torch.no_grad():
        for t, t_prev in zip(timesteps[:-1], timesteps[1:]):
            noise = torch.randn(SHAPE, generator=generator)  # diffusers draws one at every step with eta > 0
            x = diffusion.ddim_sample(unet, x, torch.full((SHAPE[0],), t), torch.full((SHAPE[0],), t_prev), eta=eta,
                                      noise=noise)
    assert relative_error(x, expected) < 1e-5


def test_ddim_differs_from_diffusers_default_when_clipping(pipelines):
    """The documented difference: diffusers' default keeps the unclipped epsilon in its direction term."""
    theirs, (unet, diffusion) = pipelines
    scheduler = DDIMScheduler.from_config(theirs.scheduler.config)
    assert scheduler.config.clip_sample and diffusion.sampler_defaults.clip_denoised
    unclipped_eps = diffusers_sample(theirs.unet, scheduler, 5, seed=1)
    clipped_eps = diffusers_sample(theirs.unet, scheduler, 5, seed=1, use_clipped_model_output=True)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    got = diffusion.ddim_sample_loop(unet, SHAPE, num_steps=5, x_T=x_T)
    assert relative_error(got, clipped_eps) < 1e-5 and relative_error(got, unclipped_eps) > 1e-2


@pytest.mark.parametrize("changes", [{}, {"timestep_spacing": "linspace", "solver_order": 1},
                                     {"final_sigmas_type": "sigma_min", "lower_order_final": False}])
def test_dpm_solver_matches_diffusers(pipelines, changes):
    theirs, (unet, _) = pipelines
    # As a diffusers user switches samplers: DPMSolverMultistepScheduler.from_config(pipe.scheduler.config).
    scheduler = DPMSolverMultistepScheduler.from_config(theirs.scheduler.config, **changes)
    assert all(scheduler.config[key] == value for key, value in changes.items())
    expected = diffusers_sample(theirs.unet, scheduler, 8, seed=5)
    diffusion = GaussianDiffusion.from_diffusers(scheduler)
    assert not diffusion.sampler_defaults.clip_denoised  # DPMSolverMultistepScheduler ignores clip_sample
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    got = diffusion.dpm_solver_sample_loop(unet, SHAPE, num_steps=8, x_T=x_T)
    error = relative_error(got, expected)
    print(f"DPM-Solver++ {changes}: max relative error {error:.2e}")
    # diffusers rounds its noise levels to float32 before forming the step coefficients (see
    # tests/test_dpm_solver.py); with the network's ~1e-6 that stays well below 1e-5 in 8 steps.
    assert error < 1e-5


# ----------------------------------------------------------------------------- exporting

# Diffusions `ddpm-fast train` makes, and more that a DDPMScheduler expresses.
EXPORTS = {
    "linear": dict(num_timesteps=NUM_TRAIN_TIMESTEPS),
    "cosine-x0": dict(num_timesteps=NUM_TRAIN_TIMESTEPS, schedule="cosine", prediction_type="x0"),
    "custom-v-beta": dict(betas=torch.linspace(1e-3, 0.2, NUM_TRAIN_TIMESTEPS) ** 1.5, prediction_type="v",
                          variance_type="beta"),
    "linear-clip-trailing": dict(num_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=3e-4, beta_end=0.05,
                                 sampler_defaults=SamplerDefaults(clip_denoised=True, spacing="trailing")),
    "leading-offset": dict(num_timesteps=NUM_TRAIN_TIMESTEPS,
                           sampler_defaults=SamplerDefaults(spacing="leading", steps_offset=1)),
}


@pytest.fixture(scope="module")
def our_unet():
    return randomize_weights(UNet(**interop.unet_config_from_diffusers(UNET_CONFIG)), seed=7).eval()


@pytest.mark.parametrize("name", EXPORTS)
def test_export_round_trip(our_unet, name, tmp_path):
    diffusion = GaussianDiffusion(**EXPORTS[name])
    assert save_diffusers_pipeline(our_unet, diffusion, tmp_path) == str(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["model_index.json", "scheduler", "unet"]
    unet, back = load_diffusers_pipeline(tmp_path)
    assert unet.state_dict().keys() == our_unet.state_dict().keys()
    assert all(torch.equal(unet.state_dict()[k], our_unet.state_dict()[k]) for k in unet.state_dict())
    assert unet.config == our_unet.config
    assert same_diffusion(back, diffusion) and torch.equal(back._float64["betas"], diffusion._float64["betas"])


@pytest.mark.parametrize("name", EXPORTS)
def test_diffusers_loads_our_export(our_unet, name, tmp_path):
    diffusion = GaussianDiffusion(**EXPORTS[name])
    save_diffusers_pipeline(our_unet, diffusion, tmp_path)
    scheduler = DDPMScheduler.from_pretrained(tmp_path / "scheduler")
    torch.testing.assert_close(scheduler.betas.double(), diffusion.betas.double(), rtol=2.5e-7, atol=0)
    expected_config = interop.scheduler_config_to_diffusers(diffusion)
    assert {k: scheduler.config[k] for k in expected_config if not k.startswith("_")} == \
        {k: v for k, v in expected_config.items() if not k.startswith("_")}
    if name != "linear":
        return
    # The whole pipeline: diffusers' UNet computes ours, and its DDPM loop samples as ours does.
    theirs = DDPMPipeline.from_pretrained(tmp_path)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8))
    t = torch.tensor([3, 17])
    with torch.no_grad():
        assert relative_error(our_unet(x, t), theirs.unet(x, t).sample) < 1e-4
    expected = diffusers_sample(theirs.unet, theirs.scheduler, NUM_TRAIN_TIMESTEPS, seed=9)
    x = ddpm_sample_with_diffusers_noise(our_unet, diffusion, seed=9)
    assert (x - expected).abs().max() < 1e-4


@pytest.mark.parametrize("preset, channels, size", [("digits", 1, 8), ("tiny", 3, 16)])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "x0", "v"])
def test_every_trained_model_exports(preset, channels, size, schedule, prediction_type, tmp_path):
    # What `ddpm-fast train` builds: a preset UNet and GaussianDiffusion(**config["diffusion"]).
    unet = UNet(**model_config_for(preset, channels, size)).eval()
    diffusion = GaussianDiffusion(num_timesteps=1000, schedule=schedule, prediction_type=prediction_type)
    save_diffusers_pipeline(unet, diffusion, tmp_path)
    scheduler = DDPMScheduler.from_pretrained(tmp_path / "scheduler")
    assert scheduler.config.beta_schedule == {"linear": "linear", "cosine": "squaredcos_cap_v2"}[schedule]
    assert same_diffusion(GaussianDiffusion.from_diffusers(scheduler), diffusion)
    back, _ = load_diffusers_pipeline(tmp_path)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in unet.state_dict().items())


def test_what_diffusers_cannot_express_gets_a_clear_error(our_unet, tmp_path):
    diffusion = GaussianDiffusion(num_timesteps=NUM_TRAIN_TIMESTEPS)
    for defaults, field in ((SamplerDefaults(karras_sigmas=True), "karras_sigmas=True"),
                            (SamplerDefaults(order=1), "order=1"),
                            (SamplerDefaults(final_sigma="sigma_min"), "final_sigma='sigma_min'")):
        with pytest.raises(ValueError, match=f"cannot express sampler_defaults.{field}"):
            save_diffusers_pipeline(our_unet, GaussianDiffusion(num_timesteps=20, sampler_defaults=defaults), tmp_path)
    with pytest.raises(ValueError, match="cannot express this UNet"):
        save_diffusers_pipeline(UNet(**model_config_for("tiny", 3, 16, ch_mult=[2, 2])), diffusion, tmp_path)
    with pytest.raises(ValueError, match="out_channels=6 for in_channels=3 \\(a model that also predicts"):
        save_diffusers_pipeline(UNet(**dict(model_config_for("tiny", 3, 16), out_channels=6)), diffusion, tmp_path)
    assert not os.listdir(tmp_path)  # nothing written
    with pytest.raises(TypeError, match="unet must be a ddpm_fast UNet"):
        save_diffusers_pipeline(torch.nn.Linear(2, 2), diffusion, tmp_path)
    with pytest.raises(TypeError, match="diffusion must be a ddpm_fast GaussianDiffusion"):
        save_diffusers_pipeline(our_unet, DDPMScheduler(), tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        save_diffusers_pipeline(our_unet, diffusion, tmp_path / "file")


# ----------------------------------------------------------------------------- folders that are not pipelines


def _copy_pipeline(source, destination):
    for root, _, files in os.walk(source):
        for file in files:
            path = os.path.join(root, file)
            target = os.path.join(destination, os.path.relpath(path, source))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(path, "rb") as f, open(target, "wb") as g:
                g.write(f.read())
    return destination


def _edit_json(path, **changes):
    value = json.loads(path.read_text())
    value.update(changes)
    path.write_text(json.dumps({k: v for k, v in value.items() if v is not None}))


def test_folders_that_are_not_pipelines_say_what_is_missing(pipeline_dir, tmp_path):
    def fails(folder, match):
        with pytest.raises(ValueError, match=match):
            load_diffusers_pipeline(folder)

    fails(tmp_path / "nowhere", "does not exist")
    fails(pipeline_dir / "unet", r"holds no model_index.json .* looks like a UNet2DModel folder")
    fails(pipeline_dir / "scheduler", r"looks like a scheduler folder")
    bad = _copy_pipeline(pipeline_dir, tmp_path / "bad")
    index = bad / "model_index.json"
    _edit_json(index, _class_name="LDMPipeline")
    fails(bad, "_class_name='LDMPipeline' is not supported .* DDPMPipeline, DDIMPipeline")
    _edit_json(index, _class_name="DDPMPipeline", vqvae=["diffusers", "VQModel"])
    fails(bad, "names a component 'vqvae' that a DDPMPipeline does not have")
    _edit_json(index, vqvae=None, scheduler=["diffusers", "PNDMScheduler"])
    fails(bad, r"scheduler=\['diffusers', 'PNDMScheduler'\] is not supported")
    _edit_json(index, scheduler=None)
    fails(bad, "names no 'scheduler' component")
    _edit_json(index, scheduler=["diffusers", "DDPMScheduler"])
    config = bad / "scheduler" / "scheduler_config.json"
    _edit_json(config, thresholding=True)
    fails(bad, r"pipeline .*bad', scheduler: DDPMScheduler config: thresholding=True is not supported")
    config.unlink()
    fails(bad, "has no scheduler/scheduler_config.json")
    _copy_pipeline(pipeline_dir, bad)
    _edit_json(bad / "unet" / "config.json", norm_num_groups="8")
    fails(bad, r"pipeline .*bad', unet: norm_num_groups must be an int")
    _edit_json(bad / "unet" / "config.json", norm_num_groups=8, out_channels=6)
    fails(bad, "do not fit its config")  # the weights hold a 3-channel output
    (bad / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    fails(bad, "holds no weights")


def test_learned_variance_unet_is_refused(tmp_path):
    unet = UNet2DModel(**dict(UNET_CONFIG, out_channels=6))
    DDPMPipeline(unet, DDPMScheduler(num_train_timesteps=10)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="out_channels=6 for in_channels=3 \\(a model that also predicts its variance"):
        load_diffusers_pipeline(tmp_path)


def test_package_exports():
    assert ddpm_fast.load_diffusers_pipeline is interop.load_diffusers_pipeline
    assert ddpm_fast.save_diffusers_pipeline is interop.save_diffusers_pipeline


# ----------------------------------------------------------------------------- the command line


def _fails(argv, capsys, *fragments):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("ddpm-fast: error: ") and "Traceback" not in err and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory):
    """A sampling checkpoint as `ddpm-fast export --out` writes it: the digits UNet, T = 20."""
    torch.manual_seed(0)
    model_config = model_config_for("digits", 1, 8)
    model = randomize_weights(UNet(**model_config), seed=11)
    config = {"model": model_config, "diffusion": dict(num_timesteps=NUM_TRAIN_TIMESTEPS, schedule="linear",
                                                       prediction_type="epsilon"), "train": {"data": "digits"}}
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    ckpt.save({"config": config, "ema": model.state_dict(), "step": 0}, path)
    return path


def _samples(argv, path):
    assert main([*argv, "--npz", str(path), "--out", str(path.with_suffix(".png")), "--device", "cpu"]) == 0
    with np.load(path) as data:
        return data["samples"]


def test_export_then_sample_the_pipeline(checkpoint_path, tmp_path, capsys):
    folder = tmp_path / "pipe"
    assert main(["export", "--ckpt", str(checkpoint_path), "--diffusers", str(folder)]) == 0
    assert f"wrote the diffusers pipeline folder {folder}" in capsys.readouterr().out
    theirs = DDPMPipeline.from_pretrained(folder)
    assert theirs.scheduler.config.clip_sample and theirs.unet.config.in_channels == 1
    # The export is exact: --pipeline samples what --ckpt samples, every sampler.
    for sampler in ("ddpm", "ddim", "dpm++2m"):
        common = ["sample", "--n", "3", "--batch-size", "2", "--sampler", sampler, "--steps", "4", "--seed", "1"]
        from_ckpt = _samples([*common, "--ckpt", str(checkpoint_path)], tmp_path / f"ckpt-{sampler}.npz")
        from_pipeline = _samples([*common, "--pipeline", str(folder)], tmp_path / f"pipe-{sampler}.npz")
        assert from_ckpt.shape == (3, 1, 8, 8)
        np.testing.assert_array_equal(from_pipeline, from_ckpt)
    assert main(["export", "--ckpt", str(checkpoint_path), "--diffusers", str(folder), "--no-clip"]) == 0
    assert not DDPMScheduler.from_pretrained(folder / "scheduler").config.clip_sample


def test_clip_default_of_a_pipeline_is_its_clip_sample(pipeline_dir, tmp_path):
    folder = _copy_pipeline(pipeline_dir, tmp_path / "pipe")
    common = ["sample", "--pipeline", str(folder), "--n", "2", "--steps", "3", "--seed", "2"]
    for clip_sample in (True, False):
        _edit_json(folder / "scheduler" / "scheduler_config.json", clip_sample=clip_sample)
        default = _samples(common, tmp_path / "default.npz")
        same = _samples([*common, "--clip" if clip_sample else "--no-clip"], tmp_path / "same.npz")
        other = _samples([*common, "--no-clip" if clip_sample else "--clip"], tmp_path / "other.npz")
        np.testing.assert_array_equal(default, same)
        assert not np.array_equal(default, other)


def test_eval_bpd_of_a_pipeline_equals_its_checkpoint(checkpoint_path, tmp_path, capsys):
    folder = tmp_path / "pipe"
    assert main(["export", "--ckpt", str(checkpoint_path), "--diffusers", str(folder)]) == 0
    capsys.readouterr()
    args = ["eval-bpd", "--data", "digits", "--n", "3", "--batch-size", "2", "--device", "cpu"]
    assert main([*args, "--ckpt", str(checkpoint_path)]) == 0
    from_ckpt = capsys.readouterr().out
    assert main([*args, "--pipeline", str(folder)]) == 0
    from_pipeline = capsys.readouterr().out
    assert "bits/dim" in from_ckpt and from_pipeline == from_ckpt


def test_command_line_errors(checkpoint_path, pipeline_dir, tmp_path, capsys):
    _fails(["sample", "--pipeline", str(tmp_path / "nowhere"), "--out", str(tmp_path / "g.png")], capsys,
           "does not exist")
    _fails(["sample", "--pipeline", str(pipeline_dir / "unet")], capsys, "holds no model_index.json")
    _fails(["sample", "--pipeline", str(pipeline_dir), "--no-ema"], capsys, "--no-ema applies to checkpoints")
    _fails(["eval-bpd", "--pipeline", str(pipeline_dir)], capsys, "eval-bpd --pipeline needs --data")
    _fails(["export", "--ckpt", str(checkpoint_path), "--diffusers", str(tmp_path / "d"), "--half"], capsys,
           "--half applies to --out")
    _fails(["export", "--ckpt", str(checkpoint_path), "--out", str(tmp_path / "x.pt"), "--no-clip"], capsys,
           "--clip/--no-clip apply to --diffusers")
    state = torch.load(checkpoint_path, weights_only=True)
    state["config"]["model"]["ch_mult"] = [2, 2]
    state["ema"] = UNet(**state["config"]["model"]).state_dict()
    torch.save(state, tmp_path / "wide.pt")
    _fails(["export", "--ckpt", str(tmp_path / "wide.pt"), "--diffusers", str(tmp_path / "d")], capsys,
           "cannot express this UNet")
    _fails(["export", "--ckpt", str(tmp_path / "nope.pt"), "--diffusers", str(tmp_path / "d")], capsys,
           "does not exist")
    assert sorted(os.listdir(tmp_path)) == ["wide.pt"]  # no grid, no folder left behind
    for argv in (["sample", "--ckpt", str(checkpoint_path), "--pipeline", str(pipeline_dir)],
                 ["export", "--ckpt", str(checkpoint_path)],
                 ["export", "--ckpt", str(checkpoint_path), "--out", "a.pt", "--diffusers", "d"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("sampler", ["dpm++2m", "dpm++3m", "dpm++2m-sde", "ddim"])
def test_default_step_count_fits_a_short_schedule(pipeline_dir, tmp_path, capsys, sampler):
    """A 20-step schedule with "leading" spacing cannot place 20 DPM-Solver++ steps: the default is capped,
    stderr says so, and an explicit impossible --steps stays an error naming --steps."""
    folder = _copy_pipeline(pipeline_dir, tmp_path / "pipe")
    _edit_json(folder / "scheduler" / "scheduler_config.json", timestep_spacing="leading")
    samples = _samples(["sample", "--pipeline", str(folder), "--n", "2", "--sampler", sampler], tmp_path / "s.npz")
    assert samples.shape == (2, 3, 8, 8) and np.isfinite(samples).all()
    err = capsys.readouterr().err
    if sampler != "ddim":  # DDIM's leading spacing places 20 steps in 20 timesteps
        assert "sampling with 19 steps, the most this model's 20-step schedule allows" in err, err
        _fails(["sample", "--pipeline", str(folder), "--sampler", sampler, "--steps", "20", "--out",
                str(tmp_path / "g.png")], capsys, "--steps 20 does not fit", "choose --steps at most 19")
