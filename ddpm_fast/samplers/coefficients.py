"""The samplers as coefficient tables: every step is one row of the sampler-step table.

Each function here returns float64 rows of ``reference.sampler_step``'s table (columns named in
``ddpm_fast.reference``): a step computes x0 = A x + B m (m the model output, or the guided mix
of its two halves with weight s), then x_out = C x + D x0 + E h1 + F h2 + G z, with h1, h2 the
x0 predictions of the two previous steps and z standard normal noise. A sampler is nothing but
such a table and the loop in ``ddpm_fast.samplers.loops`` that runs it through the fused step.
"""

import math

import torch

from .. import reference
from ..schedules import VARIANCE_TYPES, x0_coefficients

SOLVER_TYPES = ("midpoint", "heun")


def step_rows(x0_from_x, x0_from_model, out_from_x, out_from_x0, out_from_h1=0.0, out_from_h2=0.0,
              out_from_z=0.0):
    """[..., 8] float64 rows from the named coefficients (tensors or numbers, broadcast together)."""
    values = (x0_from_x, x0_from_model, 1.0, out_from_x, out_from_x0, out_from_h1, out_from_h2, out_from_z)
    device = next((v.device for v in values if isinstance(v, torch.Tensor)), None)
    columns = torch.broadcast_tensors(*(torch.as_tensor(v, dtype=torch.float64, device=device) for v in values))
    rows = torch.stack(columns, dim=-1)
    assert rows.shape[-1] == reference.SAMPLER_STEP_COLUMNS
    return rows


def with_guidance(table, guidance_scale):
    """The table with every row's guidance weight s (used when the model output is a doubled batch)."""
    table = table.clone()
    table[..., reference.GUIDANCE_SCALE] = guidance_scale
    return table


# ----------------------------------------------------------------------------- DDPM

def ddpm_rows(quantities, prediction_type, variance_type):
    """[T, 8]: the ancestral step x_{t-1} = posterior mean + sigma_t z (Ho et al. 2020, eq. 6-7).

    mean = coef1 x0 + coef2 x_t; sigma_t^2 is the posterior variance (beta tilde) or beta_t, and
    sigma_0 = 0: the last step adds no noise.
    """
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")
    variance = quantities["posterior_variance" if variance_type == "posterior" else "betas"]
    sigma = variance.sqrt().clone()
    sigma[0] = 0.0
    x0_from_x, x0_from_model = x0_coefficients(quantities["alphas_cumprod"], prediction_type)
    return step_rows(x0_from_x, x0_from_model, out_from_x=quantities["posterior_mean_coef2"],
                     out_from_x0=quantities["posterior_mean_coef1"], out_from_z=sigma)


# ----------------------------------------------------------------------------- DDIM

def ddim_sigma(alphas_cumprod_t, alphas_cumprod_prev, eta):
    """Song et al. 2021, eq. 16: eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))."""
    ratio = (1 - alphas_cumprod_prev) / (1 - alphas_cumprod_t) * (1 - alphas_cumprod_t / alphas_cumprod_prev)
    return eta * ratio.sqrt()


def ddim_rows(alphas_cumprod_t, alphas_cumprod_prev, eta, prediction_type):
    """[..., 8]: the DDIM step from t to t_prev (Song et al. 2021, eq. 12).

    x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z, where
    eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t) is re-derived from the (possibly clipped)
    x0, as improved-diffusion does; that is linear in (x0, x_t). abar_prev = 1 (t_prev = -1) gives
    the final step x_prev = x0.
    """
    sigma = ddim_sigma(alphas_cumprod_t, alphas_cumprod_prev, eta)
    direction = (1 - alphas_cumprod_prev - sigma**2).clamp(min=0).sqrt()
    eps_from_x = 1 / (1 - alphas_cumprod_t).sqrt()
    eps_from_x0 = -alphas_cumprod_t.sqrt() * eps_from_x
    x0_from_x, x0_from_model = x0_coefficients(alphas_cumprod_t, prediction_type)
    return step_rows(x0_from_x, x0_from_model, out_from_x=direction * eps_from_x,
                     out_from_x0=alphas_cumprod_prev.sqrt() + direction * eps_from_x0, out_from_z=sigma)


# ----------------------------------------------------------------------------- DPM-Solver++

def dpm_solver_orders(num_steps, order, lower_order_final, final_sigma_zero):
    """The order of each of num_steps steps, as diffusers' DPMSolverMultistepScheduler.step picks it.

    A multistep solver warms up (step i has only i earlier x0s); the last step is first order
    when it ends on sigma = 0 or, with lower_order_final, below 15 steps, and then the one
    before it is at most second order.
    """
    orders = []
    for i in range(num_steps):
        short = lower_order_final and num_steps < 15
        if order == 1 or i < 1 or (i == num_steps - 1 and (short or final_sigma_zero)):
            orders.append(1)
        elif order == 2 or i < 2 or (i == num_steps - 2 and short):
            orders.append(2)
        else:
            orders.append(3)
    return orders


def dpm_solver_rows(sigmas, order=2, lower_order_final=True, prediction_type="epsilon", *, sde=False,
                    solver_type="midpoint"):
    """[N, 8] rows of DPM-Solver++ (Lu et al. 2022, data prediction, multistep) over sigmas [N + 1].

    sigmas are the variance-exploding noise levels s = sqrt((1 - abar) / abar) of the N
    evaluations and the final one (0: the solver ends on x_0). With alpha = 1 / sqrt(1 + s^2),
    the VP pair (alpha, alpha s), lambda = -log s, h = lambda' - lambda and r_k = h_k / h the
    ratios to the earlier steps, diffusers' updates written on m0 = x0, m1 = h1, m2 = h2:

        ODE ("dpmsolver++"):  x' = (alpha' s' / (alpha s)) x + c0 D0 + c1 D1 + c2 D2,
            c0 = alpha' (1 - e^-h), c1 = alpha' ((e^-h - 1) / h + 1),
            c2 = -alpha' ((e^-h - 1 + h) / h^2 - 1/2)
        SDE ("sde-dpmsolver++"):
            x' = (alpha' s' / (alpha s)) e^-h x + c0 D0 + c1 D1 + c2 D2 + alpha' s' sqrt(1 - e^-2h) z,
            c0 = alpha' (1 - e^-2h), c1 = alpha' ((1 - e^-2h) / (-2h) + 1),
            c2 = alpha' ((1 - e^-2h - 2h) / (2h)^2 - 1/2)

    with D0 = m0; second order D1 = (m0 - m1) / r0 (the midpoint solver weighs it by c0 / 2
    instead of c1); third order D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1),
    D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1. Orders per step: :func:`dpm_solver_orders`.
    """
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")
    s = [float(v) for v in sigmas]
    num_steps = len(s) - 1
    orders = dpm_solver_orders(num_steps, order, lower_order_final, s[-1] == 0.0)
    alpha = [1.0 / math.sqrt(1.0 + v * v) for v in s]
    rows = []
    for i, step_order in enumerate(orders):
        ratio = s[i + 1] / s[i]  # e^-h; 0 on the final step to sigma = 0 (h = inf)
        decay = ratio * ratio if sde else ratio  # e^-2h (SDE) or e^-h (ODE)
        out_from_x = alpha[i + 1] * ratio / alpha[i] * (ratio if sde else 1.0)
        c0 = alpha[i + 1] * (1.0 - decay)
        out_from_z = alpha[i + 1] * s[i + 1] * math.sqrt(1.0 - ratio * ratio) if sde else 0.0
        m = [c0, 0.0, 0.0]  # weights of m0, m1, m2
        if step_order >= 2:
            h = math.log(s[i] / s[i + 1])
            if sde:
                c1 = alpha[i + 1] * ((1.0 - decay) / (-2.0 * h) + 1.0)
                c2 = alpha[i + 1] * ((1.0 - decay - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
            else:
                c1 = alpha[i + 1] * ((decay - 1.0) / h + 1.0)
                c2 = -alpha[i + 1] * ((decay - 1.0 + h) / h**2 - 0.5)
            r0 = math.log(s[i - 1] / s[i]) / h
            if step_order == 2:
                weight = 0.5 * c0 if solver_type == "midpoint" else c1  # of D1 = (m0 - m1) / r0
                m = [c0 + weight / r0, -weight / r0, 0.0]
            else:
                r1 = math.log(s[i - 2] / s[i - 1]) / h
                # c1 D1 + c2 D2 = a D1_0 - b D1_1
                a = c1 * (1.0 + r0 / (r0 + r1)) + c2 / (r0 + r1)
                b = (c1 * r0 + c2) / (r0 + r1)
                m = [c0 + a / r0, -a / r0 - b / r1, b / r1]
        x0_from_x, x0_from_model = x0_coefficients(torch.tensor(alpha[i] ** 2, dtype=torch.float64), prediction_type)
        rows.append(step_rows(x0_from_x, x0_from_model, out_from_x=out_from_x, out_from_x0=m[0], out_from_h1=m[1],
                              out_from_h2=m[2], out_from_z=out_from_z))
    return torch.stack(rows)


def history_length(table):
    """How many earlier x0s a table's rows weigh (0, 1 or 2): what its loop must keep."""
    if bool((table[:, reference.OUT_FROM_H2] != 0).any()):
        return 2
    return 1 if bool((table[:, reference.OUT_FROM_H1] != 0).any()) else 0


# ----------------------------------------------------------------------------- [T, 5] tables of earlier releases

def reverse_step_table(quantities, prediction_type, variance_type):
    """[T, 5] rows of the DDPM step for ``ops.reverse_step`` (reference.LEGACY_* columns)."""
    return reference.legacy_table(ddpm_rows(quantities, prediction_type, variance_type))


def ddim_step_rows(alphas_cumprod_t, alphas_cumprod_prev, eta, prediction_type):
    """[..., 5] rows of the DDIM step for ``ops.ddim_step``."""
    rows = ddim_rows(alphas_cumprod_t, alphas_cumprod_prev, eta, prediction_type)
    return reference.legacy_table(rows.reshape(-1, rows.shape[-1])).reshape(*rows.shape[:-1], 5)


def dpm_solver_step_rows(sigmas, order, lower_order_final, prediction_type):
    """[N, 5] rows of DPM-Solver++ (order 1 or 2) for ``ops.dpm_solver_step``."""
    return reference.legacy_table(dpm_solver_rows(sigmas, order, lower_order_final, prediction_type), True)
