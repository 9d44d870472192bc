"""DPM-Solver++ sampling (orders 1-3, midpoint and Heun, ODE and SDE): step for step equal to diffusers,
equal to DDIM at order 1, and its accuracy measured against the exact probability-flow ODE solution of
Gaussian data."""

import os

import pytest
import torch

from conftest import backend_params
from ddpm_fast import GaussianDiffusion, SamplerDefaults, ops, reference, schedules

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")

MU, S = 0.3, 0.5  # the analytic Gaussian data x0 ~ N(MU, S^2)


def smooth_model(x, t):
    """A fixed nonlinear 'network' for equality tests: any model works, the solvers must agree."""
    tt = t.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return torch.tanh(0.7 * x + 1e-3 * tt)


def gaussian_denoiser(diffusion):
    """The exact E[eps | x_t] for x0 ~ N(MU, S^2): x_t ~ N(sqrt(abar) MU, abar S^2 + 1 - abar)."""
    abar_all = diffusion.alphas_cumprod.double()

    def model(x_t, t):
        abar = abar_all[t].reshape(-1, *([1] * (x_t.dim() - 1)))
        return ((1 - abar).sqrt() * (x_t.double() - abar.sqrt() * MU) / (abar * S**2 + 1 - abar)).to(x_t.dtype)

    return model


def ode_solution(diffusion, x_T, t_start, sigma_end):
    """The probability-flow ODE from x_T at timestep t_start to noise level sigma_end, exactly.

    The flow keeps each sample's standardised value (x - alpha MU) / sqrt(alpha^2 S^2 + sigma^2).
    """
    abar = diffusion.alphas_cumprod.double()[t_start]
    z = (x_T - abar.sqrt() * MU) / (abar * S**2 + 1 - abar).sqrt()
    alpha_end = (1 + sigma_end**2) ** -0.5
    return alpha_end * MU + z * (alpha_end**2 * S**2 + 1 - alpha_end**2) ** 0.5


def diffusers_loop(scheduler, model, x_T, num_steps):
    scheduler.set_timesteps(num_steps)
    x = x_T.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.expand(x.shape[0])), t, x).prev_sample
    return x


PREDICTIONS = {"epsilon": "epsilon", "x0": "sample", "v": "v_prediction"}
OPTIONS = {  # ours -> diffusers' scheduler configuration
    "default": ({}, {}),
    "leading": ({"spacing": "leading"}, {"timestep_spacing": "leading"}),
    "leading, offset 1": ({"spacing": "leading", "steps_offset": 1},
                          {"timestep_spacing": "leading", "steps_offset": 1}),
    "trailing": ({"spacing": "trailing"}, {"timestep_spacing": "trailing"}),
    "karras": ({"karras_sigmas": True}, {"use_karras_sigmas": True}),
    "order 1": ({"order": 1}, {"solver_order": 1}),
    "sigma_min": ({"final_sigma": "sigma_min"}, {"final_sigmas_type": "sigma_min"}),
    "sigma_min, no lower order final": ({"final_sigma": "sigma_min", "lower_order_final": False},
                                        {"final_sigmas_type": "sigma_min", "lower_order_final": False}),
    "heun": ({"solver_type": "heun"}, {"solver_type": "heun"}),
    "order 3": ({"order": 3}, {"solver_order": 3}),
    "order 3, karras": ({"order": 3, "karras_sigmas": True}, {"solver_order": 3, "use_karras_sigmas": True}),
    "order 3, sigma_min, no lower order final": (
        {"order": 3, "final_sigma": "sigma_min", "lower_order_final": False},
        {"solver_order": 3, "final_sigmas_type": "sigma_min", "lower_order_final": False}),
    "order 3, trailing": ({"order": 3, "spacing": "trailing"}, {"solver_order": 3, "timestep_spacing": "trailing"}),
}


def _ours_and_diffusers(prediction, option, schedule, num_steps, backend="torch", device="cpu"):
    ours, theirs = OPTIONS[option]
    beta_schedule = {"linear": "linear", "cosine": "squaredcos_cap_v2"}[schedule]
    scheduler = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule,
                                                      prediction_type=PREDICTIONS[prediction], **theirs)
    d = GaussianDiffusion(betas=scheduler.betas.double(), prediction_type=prediction, backend=backend,
                          sampler_defaults=SamplerDefaults(**ours))
    if schedule == "cosine":
        d.schedule = "cosine"  # diffusers truncates (not rounds) the Karras timesteps of this schedule
    x_T = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(num_steps)).to(device)
    expected = diffusers_loop(scheduler, smooth_model, x_T.cpu(), num_steps)
    timesteps, _ = d.dpm_solver_plan(num_steps)
    assert timesteps.tolist() == scheduler.timesteps.tolist()
    got = d.dpm_solver_sample_loop(smooth_model, x_T.shape, num_steps=num_steps, x_T=x_T)
    return got.cpu(), expected


def _relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("num_steps", [10, 20, 25])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_equals_diffusers_step_for_step(option, num_steps):
    """Default configuration and every option, epsilon prediction: within 2e-5 of diffusers (fp32)."""
    got, expected = _ours_and_diffusers("epsilon", option, "linear", num_steps)
    assert _relative(got, expected) < 2e-5


# Karras sigmas on the cosine schedule are left out: diffusers truncates their timesteps into
# repeats there and its step-index lookup then runs off the end of its noise levels.
@pytest.mark.parametrize("schedule, option", [("linear", "default"), ("linear", "karras"), ("linear", "sigma_min"),
                                              ("cosine", "default"), ("cosine", "sigma_min")])
@pytest.mark.parametrize("prediction", list(PREDICTIONS))
def test_equals_diffusers_for_every_prediction_type_and_schedule(prediction, option, schedule):
    # diffusers computes its noise levels from float32 alpha_bar and rounds them to float32
    # before forming the step coefficients; ours come from float64. With x0 prediction and
    # Karras or sigma_min endings (a final noise level sqrt(1 - alpha_bar_0), where float32
    # cancels) that rounding alone reaches 7.8e-5; given our float64 noise levels, diffusers
    # agrees to 1e-6 (the next test). Hence the looser bound for x0 and v.
    got, expected = _ours_and_diffusers(prediction, option, schedule, 20)
    assert _relative(got, expected) < (2e-5 if prediction == "epsilon" else 1e-4)


@pytest.mark.parametrize("schedule, option", [("linear", "karras"), ("linear", "sigma_min"), ("cosine", "sigma_min")])
def test_equals_diffusers_arithmetic_on_the_same_noise_levels(schedule, option):
    """Given diffusers our float64 noise levels, the two loops agree to float32 rounding."""
    ours, theirs = OPTIONS[option]
    beta_schedule = {"linear": "linear", "cosine": "squaredcos_cap_v2"}[schedule]
    scheduler = diffusers.DPMSolverMultistepScheduler(prediction_type="sample", beta_schedule=beta_schedule, **theirs)
    d = GaussianDiffusion(betas=scheduler.betas.double(), prediction_type="x0", backend="torch",
                          sampler_defaults=SamplerDefaults(**ours))
    scheduler.set_timesteps(20)
    _, sigmas = schedules.dpm_solver_timesteps(d._float64["alphas_cumprod"], 20, **{
        "karras": ours.get("karras_sigmas", False), "final_sigma": ours.get("final_sigma", "zero")})
    x_T = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x = x_T.clone()
    for t in scheduler.timesteps:
        scheduler.sigmas = sigmas.float()  # float32 copies of our float64 noise levels
        x = scheduler.step(smooth_model(x, t.expand(3)), t, x).prev_sample
    got = d.dpm_solver_sample_loop(smooth_model, x_T.shape, num_steps=20, x_T=x_T)
    assert _relative(got, x) < 2e-6  # 20 float32 steps of rounding (measured: at most 1.0e-6)


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("prediction", list(PREDICTIONS))
def test_every_backend_runs_the_same_loop(prediction, backend, device):
    got, expected = _ours_and_diffusers(prediction, "default", "linear", 20, backend=backend, device=device)
    assert _relative(got, expected) < 5e-5


@pytest.mark.parametrize("num_steps", [10, 25])
def test_order_one_is_ddim_with_eta_zero_on_the_same_timesteps(num_steps):
    d = GaussianDiffusion(backend="torch")
    model = gaussian_denoiser(d)
    x_T = torch.randn(4, 256, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    timesteps, _ = d.dpm_solver_plan(num_steps, order=1)
    x = x_T
    for i, step in enumerate(timesteps.tolist()):
        following = timesteps[i + 1].item() if i + 1 < len(timesteps) else -1
        x = d.ddim_sample(model, x, torch.full((4,), step), torch.full((4,), following))
    dpm = d.dpm_solver_sample_loop(model, x_T.shape, num_steps=num_steps, order=1, x_T=x_T)
    torch.testing.assert_close(dpm, x, rtol=1e-6, atol=1e-6)


def _ode_errors(schedule, num_steps, steps_taken=None):
    """RMS distance to the exact ODE solution of DDIM (order 1) and DPM-Solver++ 2M on the same timesteps."""
    d = GaussianDiffusion(schedule=schedule, backend="torch")
    model = gaussian_denoiser(d)
    x_T = torch.randn(8, 4096, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = []
    for order in (1, 2):
        timesteps, rows = d.dpm_solver_plan(num_steps, order=order)
        _, sigmas = schedules.dpm_solver_timesteps(d._float64["alphas_cumprod"], num_steps)
        steps = len(timesteps) if steps_taken is None else steps_taken
        x, x0 = x_T, None
        for i in range(steps):
            t, index = torch.full((8,), int(timesteps[i])), torch.full((8,), i)
            x, x0 = reference.sampler_step(x, model(x, t), index, rows, h1=x0)
        exact = ode_solution(d, x_T, timesteps[0], sigmas[steps].item())
        errors.append(((x - exact) ** 2).mean().sqrt().item())
    return errors


# Measured RMS distances to the exact solution (linear schedule, x0 ~ N(0.3, 0.5^2)), see docs/sampling.md:
#   steps  DDIM    2M      ratio | before the last step: DDIM   2M      ratio
#   10     0.1316  0.0971  0.74  |                       0.0607 0.0128  0.21
#   20     0.0696  0.0232  0.33  |                       0.0454 0.0059  0.13
#   25     0.0564  0.0123  0.22  |                       0.0394 0.0078  0.20
# Both solvers end with the same first-order step onto sigma = 0 (diffusers' lower_order_final
# with final sigma zero), which returns the model's x0 prediction E[x0 | x]: its distance to
# the ODE's end point is a floor both share, and at 10 steps it dominates.

@pytest.mark.parametrize("num_steps", [10, 20, 25])
def test_second_order_is_at_least_three_times_closer_before_the_final_step(num_steps):
    ddim, dpm2m = _ode_errors("linear", num_steps, steps_taken=num_steps - 1)
    assert dpm2m <= ddim / 3, (ddim, dpm2m)


@pytest.mark.parametrize("num_steps, ratio", [(10, 0.75), (20, 0.34), (25, 0.25)])
def test_second_order_is_closer_to_the_exact_solution(num_steps, ratio):
    ddim, dpm2m = _ode_errors("linear", num_steps)
    assert dpm2m <= ratio * ddim, (ddim, dpm2m)
    assert ddim > 0.05, "the DDIM baseline has a real discretisation error at these step counts"


@pytest.mark.parametrize("num_steps", [20, 25])
def test_cosine_schedule_second_order_is_far_closer(num_steps):
    ddim, dpm2m = _ode_errors("cosine", num_steps)
    assert dpm2m <= ddim / 10, (ddim, dpm2m)


def test_errors_shrink_with_more_steps_faster_for_second_order():
    (d10, m10), (d25, m25) = _ode_errors("linear", 10, 9), _ode_errors("linear", 25, 24)
    assert d25 < d10 and m25 < m10


def test_given_x_T_is_used_and_reproducible():
    d = GaussianDiffusion(num_timesteps=50)
    x_T = torch.randn(2, 3, 4, 4)
    one = d.dpm_solver_sample_loop(smooth_model, x_T.shape, num_steps=5, x_T=x_T)
    two = d.dpm_solver_sample_loop(smooth_model, x_T.shape, num_steps=5, x_T=x_T.clone())
    other = d.dpm_solver_sample_loop(smooth_model, x_T.shape, num_steps=5, x_T=x_T + 1)
    assert torch.equal(one, two) and not torch.allclose(one, other)
    drawn = d.dpm_solver_sample_loop(smooth_model, x_T.shape, num_steps=5, generator=torch.Generator().manual_seed(3))
    again = d.dpm_solver_sample_loop(smooth_model, x_T.shape, num_steps=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(drawn, again)


def test_sampler_defaults_and_explicit_options():
    d = GaussianDiffusion(sampler_defaults=SamplerDefaults(spacing="trailing", order=1), backend="torch")
    assert d.dpm_solver_plan(10)[0].tolist() == list(range(999, 0, -100))
    assert torch.equal(d.dpm_solver_plan(10)[1], d.dpm_solver_plan(10, order=1)[1])
    assert not torch.equal(d.dpm_solver_plan(10)[1], d.dpm_solver_plan(10, order=2)[1])
    assert d.dpm_solver_plan(10, spacing="linspace")[0].tolist()[:2] == [999, 899]


def test_the_final_step_returns_the_x0_prediction():
    d = GaussianDiffusion(backend="torch")
    _, rows = d.dpm_solver_plan(10)
    last = rows[-1]
    assert last[reference.OUT_FROM_X0] == 1 and last[reference.OUT_FROM_X] == 0 and last[reference.OUT_FROM_H1] == 0


# ----------------------------------------------------------------------------- third order and SDE


@pytest.mark.parametrize("prediction", list(PREDICTIONS))
@pytest.mark.parametrize("option", ["order 3", "order 3, sigma_min, no lower order final"])
def test_third_order_equals_diffusers_for_every_prediction_type(prediction, option):
    got, expected = _ours_and_diffusers(prediction, option, "linear", 20)
    assert _relative(got, expected) < (2e-5 if prediction == "epsilon" else 1e-4)


def test_third_order_weighs_two_earlier_predictions():
    d = GaussianDiffusion(backend="torch")
    _, rows = d.dpm_solver_plan(20, order=3)
    uses_h2 = (rows[:, reference.OUT_FROM_H2] != 0).tolist()
    assert uses_h2 == [False, False] + [True] * 17 + [False]  # warm-up, then third order, a first-order end
    assert d.dpm_solver_plan(20, order=2)[1][:, reference.OUT_FROM_H2].eq(0).all()


def _sde_scheduler(order, **config):
    return diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=order, **config)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_sde_equals_diffusers_given_the_same_noise(order, final):
    """The torch backend draws each step's noise from the generator as diffusers does: same numbers, same samples."""
    scheduler = _sde_scheduler(order, final_sigmas_type=final)
    d = GaussianDiffusion(betas=scheduler.betas.double(), backend="torch",
                          sampler_defaults=SamplerDefaults(sde=True, order=order, final_sigma=final))
    x_T = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    scheduler.set_timesteps(20)
    x, generator = x_T.clone(), torch.Generator().manual_seed(5)
    for t in scheduler.timesteps:
        x = scheduler.step(smooth_model(x, t.expand(3)), t, x, generator=generator).prev_sample
    got = d.dpm_solver_sample_loop(smooth_model, x_T.shape, num_steps=20, x_T=x_T,
                                   generator=torch.Generator().manual_seed(5))
    assert _relative(got, x) < 2e-5


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("order", [2, 3])
def test_sde_steps_of_every_backend_equal_diffusers_given_its_noise(backend, device, order):
    """Each fused step, given diffusers' per-step noise (variance_noise), gives diffusers' next sample."""
    scheduler = _sde_scheduler(order)
    d = GaussianDiffusion(betas=scheduler.betas.double(), backend=backend)
    timesteps, rows = d.dpm_solver_plan(20, order=order, sde=True)
    table = rows.to(device, torch.float32)
    scheduler.set_timesteps(20)
    assert timesteps.tolist() == scheduler.timesteps.tolist()
    g = torch.Generator().manual_seed(6)
    x_ours = x_theirs = torch.randn(3, 3, 8, 8, generator=g)
    x_ours = x_ours.to(device)
    h1 = h2 = None
    for i, t in enumerate(scheduler.timesteps):
        noise = torch.randn(3, 3, 8, 8, generator=g)
        x_theirs = scheduler.step(smooth_model(x_theirs, t.expand(3)), t, x_theirs, variance_noise=noise).prev_sample
        index = torch.full((3,), i, device=device)
        x_ours, x0 = ops.sampler_step(x_ours, smooth_model(x_ours, t.expand(3).to(device)), index, table, h1=h1,
                                      h2=h2, noise=noise.to(device), store_x0=True, backend=backend)
        h1, h2 = x0, (h1 if order == 3 else None)
    assert _relative(x_ours.cpu(), x_theirs) < 5e-5


@pytest.mark.parametrize("backend, device", backend_params())
def test_sde_in_kernel_noise_is_reproducible_under_a_generator(backend, device):
    d = GaussianDiffusion(num_timesteps=100, backend=backend)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(device)

    def run(seed):
        generator = torch.Generator(device).manual_seed(seed)
        return d.dpm_solver_sample_loop(smooth_model, x_T.shape, num_steps=10, sde=True, x_T=x_T,
                                        generator=generator)

    one, two, other = run(1), run(1), run(2)
    ode = d.dpm_solver_sample_loop(smooth_model, x_T.shape, num_steps=10, x_T=x_T)
    assert torch.equal(one, two) and not torch.allclose(one, other)
    assert not torch.allclose(one, ode)  # the SDE adds noise the ODE solver does not
