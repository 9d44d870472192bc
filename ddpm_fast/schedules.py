"""Beta schedules and the coefficient tables the fused ops read, all computed in float64.

The diffusion layer stores what it needs in float32 on the tensors' device; everything here is
float64 on the CPU and computed once per GaussianDiffusion (or once per DDIM loop).
"""

import math

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
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu().clone()
        if betas.dim() != 1 or betas.numel() == 0:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {list(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError(f"betas must lie in (0, 1], got values from {betas.min().item()} to {betas.max().item()}")
        return betas
    if not isinstance(num_timesteps, int) or isinstance(num_timesteps, bool) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
    if schedule == "linear":
        if not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
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
    table = torch.empty(len(sigma), reference.STEP_TABLE_COLUMNS, dtype=torch.float64)
    table[:, reference.X0_FROM_XT] = x0_from_xt
    table[:, reference.X0_FROM_MODEL] = x0_from_model
    table[:, reference.OUT_FROM_X0] = quantities["posterior_mean_coef1"]
    table[:, reference.OUT_FROM_XT] = quantities["posterior_mean_coef2"]
    table[:, reference.SIGMA] = sigma
    return table


def ddim_sigma(alphas_cumprod_t, alphas_cumprod_prev, eta):
    """Song et al. 2021, eq. 16: eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))."""
    return eta * ((1 - alphas_cumprod_prev) / (1 - alphas_cumprod_t) * (1 - alphas_cumprod_t / alphas_cumprod_prev)).sqrt()


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


def ddim_timesteps(num_timesteps, num_steps):
    """num_steps timesteps evenly spaced over [0, T - 1], ascending (T - 1 always included)."""
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be an int in [1, {num_timesteps}], got {num_steps!r}")
    return torch.linspace(0, num_timesteps - 1, num_steps, dtype=torch.float64).round().long().unique()
