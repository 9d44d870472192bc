"""Beta schedules and the coefficient tables the fused ops read, all computed in float64.

The diffusion layer stores what it needs in float32 on the tensors' device; everything here is
float64 on the CPU and computed once per GaussianDiffusion (or once per DDIM loop).
"""

import math

import numpy as np
import torch

from . import reference

SCHEDULES = ("linear", "cosine")
PREDICTION_TYPES = ("epsilon", "x0", "v")
VARIANCE_TYPES = ("posterior", "beta")


def linear_betas(num_timesteps, beta_start=1e-4, beta_end=0.02):
    """Ho et al. 2020: betas linear from beta_start to beta_end."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def cosine_alpha_bar(t, s=0.008):
    """Nichol & Dhariwal 2021: alpha_bar(t) = cos^2((t + s) / (1 + s) * pi / 2), t in [0, 1]."""
    return torch.cos((t + s) / (1 + s) * (math.pi / 2)) ** 2


def cosine_betas(num_timesteps, s=0.008, max_beta=0.999):
    """betas_t = 1 - alpha_bar((t+1)/T) / alpha_bar(t/T), clipped at max_beta (improved-diffusion)."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    alpha_bar = cosine_alpha_bar(steps, s)
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def make_betas(schedule="linear", num_timesteps=1000, beta_start=1e-4, beta_end=0.02, betas=None):
    """The float64 betas for a named schedule or an explicit sequence, validated."""
    if betas is not None:
        try:
            betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu().clone()
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"betas must be a 1-D sequence of numbers, got {type(betas).__name__}: {error}") from None
        if betas.dim() != 1 or betas.numel() == 0:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {list(betas.shape)}")
        if not bool((torch.isfinite(betas) & (betas > 0) & (betas < 1)).all()):
            raise ValueError(f"betas must lie in (0, 1) (beta = 1 leaves no signal: alpha_bar = 0), got values from "
                             f"{betas.min().item()} to {betas.max().item()}")
        return betas
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
    if schedule == "linear":
        for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"{name} must be a finite number, got {value!r}")
        if not 0 < beta_start < beta_end < 1:
            raise ValueError(f"the linear schedule needs 0 < beta_start < beta_end < 1 (noise grows with t), "
                             f"got beta_start={beta_start}, beta_end={beta_end}")
        return linear_betas(num_timesteps, beta_start, beta_end)
    if schedule == "cosine":
        return cosine_betas(num_timesteps)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def diffusion_quantities(betas):
    """Every per-timestep quantity of the forward process and its posterior (float64, [T])."""
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # posterior_variance[0] is 0: log-variance clipped to its t=1 value (improved-diffusion).
    posterior_log_variance_clipped = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
    # "beta" variance: sigma_t^2 = beta_t, with the t=0 value replaced like the log above.
    beta_variance = torch.cat([posterior_variance[1:2], betas[1:]])
    return {
        "betas": betas,
        "alphas": alphas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": torch.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_log_variance_clipped,
        "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
        "beta_variance": beta_variance,
        "beta_log_variance": torch.log(beta_variance),
    }


def x0_coefficients(alphas_cumprod, prediction_type):
    """(A, B) with x0 = A * x_t + B * model_output for each prediction type."""
    if prediction_type == "epsilon":  # x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
        return (1.0 / alphas_cumprod).sqrt(), -(1.0 / alphas_cumprod - 1).sqrt()
    if prediction_type == "x0":
        return torch.zeros_like(alphas_cumprod), torch.ones_like(alphas_cumprod)
    if prediction_type == "v":  # v = sqrt(abar) eps - sqrt(1 - abar) x0  =>  x0 = sqrt(abar) x_t - sqrt(1 - abar) v
        return alphas_cumprod.sqrt(), -(1.0 - alphas_cumprod).sqrt()
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def q_sample_table(quantities):
    """[T, 2]: (sqrt(abar_t), sqrt(1 - abar_t))."""
    return torch.stack([quantities["sqrt_alphas_cumprod"], quantities["sqrt_one_minus_alphas_cumprod"]], dim=1)


def reverse_step_table(quantities, prediction_type, variance_type):
    """[T, 5] rows of the DDPM step: x0 from (x_t, model output), posterior mean, sigma_t.

    sigma_0 = 0: the last step (t = 0) adds no noise.
    """
    if variance_type == "posterior":
        variance = quantities["posterior_variance"]
    elif variance_type == "beta":
        variance = quantities["betas"]
    else:
        raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")
    sigma = variance.sqrt().clone()
    sigma[0] = 0.0
    x0_from_xt, x0_from_model = x0_coefficients(quantities["alphas_cumprod"], prediction_type)
    table = torch.empty(len(sigma), reference.LEGACY_STEP_COLUMNS, dtype=torch.float64)
    table[:, reference.LEGACY_X0_FROM_XT] = x0_from_xt
    table[:, reference.LEGACY_X0_FROM_MODEL] = x0_from_model
    table[:, reference.LEGACY_OUT_FROM_X0] = quantities["posterior_mean_coef1"]
    table[:, reference.LEGACY_OUT_FROM_XT] = quantities["posterior_mean_coef2"]
    table[:, reference.LEGACY_SIGMA] = sigma
    return table


def ddim_sigma(alphas_cumprod_t, alphas_cumprod_prev, eta):
    """Song et al. 2021, eq. 16: eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))."""
    ratio = (1 - alphas_cumprod_prev) / (1 - alphas_cumprod_t) * (1 - alphas_cumprod_t / alphas_cumprod_prev)
    return eta * ratio.sqrt()


def ddim_step_rows(alphas_cumprod_t, alphas_cumprod_prev, eta, prediction_type):
    """[..., 5] rows of the DDIM step from t to t_prev (float64 in, float64 out).

    x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z, where
    eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t) is re-derived from the (possibly clipped)
    x0, as improved-diffusion does; that is linear in (x0, x_t), hence the table's form.
    abar_prev = 1 (t_prev = -1) gives the final step x_prev = x0.
    """
    sigma = ddim_sigma(alphas_cumprod_t, alphas_cumprod_prev, eta)
    direction = (1 - alphas_cumprod_prev - sigma**2).clamp(min=0).sqrt()
    eps_from_xt = 1 / (1 - alphas_cumprod_t).sqrt()
    eps_from_x0 = -alphas_cumprod_t.sqrt() * eps_from_xt
    x0_from_xt, x0_from_model = x0_coefficients(alphas_cumprod_t, prediction_type)
    return torch.stack([
        x0_from_xt,
        x0_from_model,
        alphas_cumprod_prev.sqrt() + direction * eps_from_x0,
        direction * eps_from_xt,
        sigma,
    ], dim=-1)


SPACINGS = ("linspace", "leading", "trailing")
FINAL_SIGMAS = ("zero", "sigma_min")


def _check_steps(num_steps, upper):
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= upper:
        raise ValueError(f"num_steps must be an int in [1, {upper}], got {num_steps!r}")


def _strictly_descending(timesteps, num_timesteps, what):
    """The timesteps as int64 (descending); raises when they repeat or leave [0, T)."""
    timesteps = torch.from_numpy(np.ascontiguousarray(timesteps, dtype=np.int64))
    if len(timesteps) > 1 and not bool((timesteps[1:] < timesteps[:-1]).all()):
        raise ValueError(f"num_steps is too large for {what}: the timesteps {timesteps.tolist()} repeat")
    if int(timesteps.min()) < 0 or int(timesteps.max()) >= num_timesteps:
        raise ValueError(f"{what} gives timesteps outside [0, {num_timesteps}): {timesteps.tolist()} "
                         f"(is steps_offset too large?)")
    return timesteps


def ddim_timesteps(num_timesteps, num_steps, spacing="linspace", steps_offset=0):
    """The timesteps of a strided sampler (DDIM), descending: diffusers' DDIMScheduler.set_timesteps.

    "linspace": num_steps rounded points of [0, T - 1] (T - 1 and 0 included); "leading":
    multiples of T // num_steps plus steps_offset; "trailing": T - 1 down in steps of
    T / num_steps. The sampler steps from each timestep to the next one, then to x_0.
    Computed with numpy as diffusers does, so the rounding agrees to the last tie.
    """
    _check_steps(num_steps, num_timesteps)
    if spacing == "linspace":
        timesteps = np.linspace(0, num_timesteps - 1, num_steps).round()[::-1]
    elif spacing == "leading":
        timesteps = (np.arange(0, num_steps) * (num_timesteps // num_steps)).round()[::-1] + steps_offset
    elif spacing == "trailing":
        timesteps = np.round(np.arange(num_timesteps, 0, -num_timesteps / num_steps)) - 1
    else:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    return _strictly_descending(timesteps, num_timesteps, f"spacing={spacing!r} with num_steps={num_steps}")


# ----------------------------------------------------------------------------- DPM-Solver++

def sigmas_from_alphas_cumprod(alphas_cumprod):
    """The noise levels sigma_t = sqrt((1 - abar_t) / abar_t) of the variance-exploding view."""
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def karras_sigmas(sigma_min, sigma_max, num_steps, rho=7.0):
    """Karras et al. 2022, eq. 5: num_steps noise levels from sigma_max down to sigma_min."""
    ramp = np.linspace(0, 1, num_steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_timestep(sigma, log_sigmas):
    """The fractional timestep of each sigma, interpolating log sigma (diffusers' _sigma_to_t)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    low, high = log_sigmas[low_idx], log_sigmas[low_idx + 1]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * (low_idx + 1)).reshape(sigma.shape)


def dpm_solver_timesteps(alphas_cumprod, num_steps, spacing="linspace", steps_offset=0, karras=False,
                         final_sigma="zero", round_karras=True):
    """(timesteps [N] int64 descending, sigmas [N + 1] float64) of diffusers' DPMSolverMultistepScheduler.

    The model is evaluated at timestep i with noise level sigmas[i]; the last sigma is 0
    ("zero": the solver ends on x_0) or sigma_0 ("sigma_min"). With Karras sigmas the noise
    levels come from Karras et al.'s schedule and the timesteps from interpolating log sigma
    (rounded, except for the cosine schedule, where diffusers truncates: round_karras=False).
    """
    num_timesteps = len(alphas_cumprod)
    _check_steps(num_steps, num_timesteps)
    if final_sigma not in FINAL_SIGMAS:
        raise ValueError(f"final_sigma must be one of {FINAL_SIGMAS}, got {final_sigma!r}")
    all_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod.double()).numpy()
    if karras:
        sigmas = karras_sigmas(all_sigmas[0], all_sigmas[-1], num_steps)
        timesteps = sigma_to_timestep(sigmas, np.log(all_sigmas))
        timesteps = timesteps.round() if round_karras else np.trunc(timesteps)
        what = f"Karras sigmas with num_steps={num_steps}"
    else:
        if spacing == "linspace":
            timesteps = np.linspace(0, num_timesteps - 1, num_steps + 1).round()[::-1][:-1]
        elif spacing == "leading":
            step_ratio = num_timesteps // (num_steps + 1)
            timesteps = (np.arange(0, num_steps + 1) * step_ratio).round()[::-1][:-1] + steps_offset
        elif spacing == "trailing":
            timesteps = np.arange(num_timesteps, 0, -num_timesteps / num_steps).round() - 1
        else:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
        what = f"spacing={spacing!r} with num_steps={num_steps}"
        timesteps = _strictly_descending(timesteps, num_timesteps, what).numpy()
        sigmas = all_sigmas[timesteps]
    timesteps = torch.from_numpy(np.ascontiguousarray(timesteps, dtype=np.int64))
    last = 0.0 if final_sigma == "zero" else all_sigmas[0]
    return timesteps, torch.from_numpy(np.concatenate([sigmas, [last]])).double()


def dpm_solver_step_rows(sigmas, order, lower_order_final, prediction_type):
    """[N, 5] float64 rows of DPM-Solver++ (data prediction, multistep, midpoint) over sigmas [N + 1].

    With alpha(s) = 1 / sqrt(1 + s^2), the VP pair (alpha_s, alpha_s * s) and h = log(s / s_next):
    first order (= DDIM with eta = 0):  x' = (alpha' s' / (alpha s)) x + alpha' (1 - e^-h) x0;
    second order, midpoint (Lu et al. 2022, alg. 2), with r = h_prev / h:
        x' = (alpha' s' / (alpha s)) x + alpha' (1 - e^-h) (x0 + (x0 - x0_prev) / (2 r)).
    The first step, every step of order 1, and the last step when it ends on sigma = 0 (or,
    with lower_order_final, when there are fewer than 15 steps) are first order, as in diffusers.
    """
    num_steps = len(sigmas) - 1
    sigma, sigma_next = sigmas[:-1], sigmas[1:]
    alpha, alpha_next = (1 + sigma**2).rsqrt(), (1 + sigma_next**2).rsqrt()
    ratio = sigma_next / sigma  # e^-h
    out_from_x0 = alpha_next * (1 - ratio)
    x0_prev = torch.zeros_like(sigma)
    second = torch.full_like(sigma, order >= 2, dtype=torch.bool)
    second[0] = False
    final_first_order = sigma_next[-1] == 0 or (lower_order_final and num_steps < 15)
    if final_first_order:
        second[-1] = False
    if bool(second.any()):
        h = torch.log(sigma / sigma_next)
        h_prev = torch.cat([h.new_ones(1), h[:-1]])
        half_over_r = 0.5 * h / h_prev
        x0_prev = torch.where(second, -out_from_x0 * half_over_r, x0_prev)
        out_from_x0 = torch.where(second, out_from_x0 * (1 + half_over_r), out_from_x0)
    x0_from_x, x0_from_model = x0_coefficients(alpha**2, prediction_type)
    return torch.stack([x0_from_x, x0_from_model, out_from_x0, alpha_next * ratio / alpha, x0_prev], dim=-1)
