"""The sampling loops: every sampler is a plan (timesteps and coefficient rows) run by one loop.

A plan lists the timesteps at which the model is evaluated and, for each, a float64 row of the
sampler-step table (``samplers.coefficients``). :func:`run` evaluates the model, then takes the
step with the one fused op (``ops.sampler_step``), keeping the earlier x0 predictions a
multistep solver weighs and drawing noise where a row asks for it. Classifier-free guidance
lives here too, once for every sampler: the model is called on the doubled batch (conditional
half first, then the null class, as diffusers does) and the fused step mixes the two halves.

The functions take a ``GaussianDiffusion`` for its schedule, prediction type, backend and
defaults; ``GaussianDiffusion``'s loop methods call them.
"""

import torch
from tqdm.auto import tqdm

from .. import backends, reference, schedules
from ..ops._common import draw_seed
from ..ops.sampler_step import run_sampler_step
from ..validation import (check_bool, check_choice, check_float, check_generator, check_class_labels, check_model,
                          check_number, check_shape, describe)
from .coefficients import ddim_rows, ddpm_rows, dpm_solver_rows, history_length, with_guidance

# ----------------------------------------------------------------------------- the model call


def is_guided(y, guidance_scale):
    """Whether a call mixes a conditional and an unconditional output (a doubled batch)."""
    return y is not None and guidance_scale != 1.0


def check_guidance(model, y, guidance_scale, guidance_rescale, batch_size, device):
    """Checks the class labels and guidance options of a sampling call; returns them."""
    guidance_scale = check_number("guidance_scale", guidance_scale)
    guidance_rescale = check_number("guidance_rescale", guidance_rescale, minimum=0.0, maximum=1.0)
    num_classes = getattr(model, "num_classes", None)
    if y is None:
        if guidance_scale != 1.0:
            raise ValueError(f"guidance_scale={guidance_scale} needs y=, the classes to guide towards "
                             f"(guidance_scale=1 samples the model as it is)")
        return None, guidance_scale, guidance_rescale
    if hasattr(model, "num_classes") and num_classes is None:
        raise ValueError("y was given, but the model is unconditional (it has no classes); pass y=None, or train "
                         "a class-conditional model (num_classes=K)")
    if num_classes is not None:
        y = check_class_labels(y, batch_size, num_classes, device)
    elif not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be an integer tensor of class labels, got {describe(y)}")
    if guidance_scale != 1.0 and not isinstance(getattr(model, "null_class", None), int):
        raise ValueError(f"guidance_scale={guidance_scale} needs a model with a null class (model.null_class, as "
                         f"ddpm_fast's UNet(num_classes=K) has) for the unconditional half")
    return y, guidance_scale, guidance_rescale


def call_model(model, x, t, y=None, guidance_scale=1.0, cast=True):
    """The model output of one step: [B, ...], or [2B, ...] when guided (cond, then uncond).

    With ``cast`` it comes in x's dtype (a model under autocast may answer in another).
    """
    if is_guided(y, guidance_scale):
        labels = torch.cat([y, torch.full_like(y, model.null_class)])
        output = model(torch.cat([x, x]), torch.cat([t, t]), y=labels)
        expected = (2 * x.shape[0], *x.shape[1:])
    else:
        output = model(x, t) if y is None else model(x, t, y=y)
        expected = tuple(x.shape)
    if not isinstance(output, torch.Tensor) or tuple(output.shape) != expected:
        got = list(output.shape) if isinstance(output, torch.Tensor) else describe(output)
        what = f"x_t's shape {list(x.shape)}" if expected == tuple(x.shape) else \
            f"shape {list(expected)} (x_t's, doubled for guidance)"
        raise ValueError(f"denoise_model(x_t, t) must return a tensor of {what}, got {got}")
    return output.to(x.dtype) if cast and output.dtype != x.dtype else output


def guided_call(model, x, t, y=None, guidance_scale=1.0):
    """(model output, guidance_scale) of a single step, its class and guidance options checked."""
    y, guidance_scale, _ = check_guidance(model, y, guidance_scale, 0.0, x.shape[0], x.device)
    return call_model(model, x, t, y, guidance_scale), guidance_scale


def _rescaled_rows(rows, model_output, batch, guidance_scale, guidance_rescale):
    """[B, 8] rows whose model weight carries diffusers' rescale_noise_cfg (Lin et al. 2023).

    rescale_noise_cfg gives m = m_cfg (phi std(m_c) / std(m_cfg) + 1 - phi) per sample: a factor
    on the model's weight B, so the fused step still forms m_cfg itself.
    """
    cond, uncond = model_output[:batch].float(), model_output[batch:].float()
    dims = list(range(1, model_output.dim()))
    cfg = uncond + guidance_scale * (cond - uncond)
    factor = guidance_rescale * cond.std(dim=dims) / cfg.std(dim=dims) + (1.0 - guidance_rescale)
    rows = rows.expand(batch, -1).clone()
    rows[:, reference.X0_FROM_MODEL] *= factor
    return rows


# ----------------------------------------------------------------------------- the loop


def model_device(diffusion, model):
    """Where a loop samples: the diffusion's device, else the model's, else the CPU."""
    if diffusion.device is not None:
        return diffusion.device
    parameter = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    return parameter.device if parameter is not None else torch.device("cpu")


def start(diffusion, model, shape, x_T, generator):
    """x_T of a sampling loop: the given starting noise, checked, or one drawn."""
    check_model(model)
    shape = check_shape("shape", shape)
    device = model_device(diffusion, model)
    if x_T is None:
        check_generator(generator, device)
        return torch.randn(shape, device=device, generator=generator)
    check_float("x_T", x_T)
    if tuple(x_T.shape) != shape:
        raise ValueError(f"x_T must have the sampling shape {list(shape)}, got {list(x_T.shape)}")
    if x_T.device != device and not (x_T.device.type == device.type == "cuda" and device.index is None):
        raise ValueError(f"x_T must be on the model's device ({device}), got {x_T.device}")
    check_generator(generator, x_T.device)
    return x_T


def run(diffusion, model, x, timesteps, rows, *, clip_denoised=False, generator=None, y=None, guidance_scale=1.0,
        guidance_rescale=0.0, progress=False, desc="sampling", intermediates=None):
    """Runs a plan from x: at step i the model at timesteps[i], then the fused step with rows[i].

    ``rows``: float64 [N, 8] (``samplers.coefficients``). Noise is drawn at every step of a plan
    whose rows weigh it (in-kernel from a seed drawn from ``generator``, or by torch for the torch
    backend); the x0 of each step is kept when later rows weigh it.
    """
    batch, device = x.shape[0], x.device
    y, guidance_scale, guidance_rescale = check_guidance(model, y, guidance_scale, guidance_rescale, batch, device)
    guided = is_guided(y, guidance_scale)
    stochastic = bool((rows[:, reference.OUT_FROM_Z] != 0).any())
    history = history_length(rows)
    table = (with_guidance(rows, guidance_scale) if guided else rows).to(device, torch.float32)
    backend = backends.resolve(diffusion.backend, device)
    h1 = h2 = None
    for i, step in enumerate(tqdm(timesteps, disable=not progress, desc=desc)):
        t = torch.full((batch,), step, device=device, dtype=torch.long)
        model_output = call_model(model, x, t, y, guidance_scale)
        step_table, index = table, torch.full((batch,), i, device=device, dtype=torch.long)
        if guided and guidance_rescale > 0:
            step_table = _rescaled_rows(table[i:i + 1], model_output, batch, guidance_scale, guidance_rescale)
            index = torch.arange(batch, device=device)
        noise = seed = None
        if stochastic and backend == "torch":
            noise = torch.empty_like(x).normal_(generator=generator)
        elif stochastic:
            seed = draw_seed(device, generator)
        x, x0 = run_sampler_step(x, model_output, index, step_table, clip_denoised, h1 if history >= 1 else None,
                                 h2 if history >= 2 else None, noise, seed, history > 0, backend)
        h1, h2 = x0, h1
        if intermediates is not None:
            intermediates.append(x)
    return x


def step(diffusion, model_output, x, index, table, *, noise=None, generator=None, clip_denoised=False,
         guidance_scale=1.0):
    """One fused step of batch element b with row index[b] of the float32 ``table`` (single-step methods).

    z is ``noise``, or drawn when the rows used weigh it (in-kernel from a seed drawn from
    ``generator``; by torch for the torch backend).
    """
    backend = backends.resolve(diffusion.backend, x.device)
    if check_number("guidance_scale", guidance_scale) != 1.0:
        table = with_guidance(table, guidance_scale)
    seed = None
    if noise is None and bool((table.index_select(0, index)[:, reference.OUT_FROM_Z] != 0).any()):
        if backend == "torch":
            noise = torch.empty_like(x).normal_(generator=generator)
        else:
            seed = draw_seed(x.device, generator)
    return run_sampler_step(x, model_output, index, table, clip_denoised, None, None, noise, seed, False,
                            backend)[0]


def ddim_step_rows(diffusion, t, t_prev, eta):
    """float32 [B, 8] DDIM rows of the steps t -> t_prev (t_prev = -1: the final step to x_0), on t's device."""
    abar = diffusion._tables(t.device).alphas_cumprod64
    abar_prev = torch.where(t_prev >= 0, abar[t_prev.clamp(min=0)], torch.ones_like(abar[t]))
    return ddim_rows(abar[t], abar_prev, eta, diffusion.prediction_type).float()


# ----------------------------------------------------------------------------- the samplers' plans


def ddpm_plan(diffusion):
    """Ancestral sampling: every timestep from T - 1 down to 0."""
    timesteps = list(range(diffusion.num_timesteps - 1, -1, -1))
    rows = ddpm_rows(diffusion._float64, diffusion.prediction_type, diffusion.variance_type)
    return timesteps, rows[timesteps]


def ddim_plan(diffusion, num_steps, eta, spacing, steps_offset):
    """DDIM over num_steps timesteps placed by ``spacing``; each step goes to the next, the last to x_0."""
    timesteps = schedules.ddim_timesteps(diffusion.num_timesteps, num_steps, spacing, steps_offset)
    abar = diffusion._float64["alphas_cumprod"]
    abar_next = torch.cat([abar[timesteps[1:]], abar.new_ones(1)])  # abar = 1 after the last step: x_0
    return timesteps.tolist(), ddim_rows(abar[timesteps], abar_next, eta, diffusion.prediction_type)


def dpm_solver_plan(diffusion, num_steps, options):
    """DPM-Solver++ with the options of a SamplerDefaults (order, spacing, Karras, final sigma, SDE)."""
    timesteps, sigmas = schedules.dpm_solver_timesteps(
        diffusion._float64["alphas_cumprod"], num_steps, options.spacing, options.steps_offset,
        options.karras_sigmas, options.final_sigma, round_karras=diffusion.schedule != "cosine")
    rows = dpm_solver_rows(sigmas, options.order, options.lower_order_final, diffusion.prediction_type,
                           sde=options.sde, solver_type=options.solver_type)
    return timesteps.tolist(), rows


SAMPLERS = ("ddpm", "ddim", "dpm_solver")


def fit_num_steps(diffusion, sampler, num_steps, **options):
    """The largest step count <= num_steps that the schedule allows for this sampler and spacing.

    A schedule of few timesteps cannot place every step count ("leading" spacing needs
    T // (num_steps + 1) >= 1, for example); a default step count is capped with this.
    """
    check_choice("sampler", sampler, SAMPLERS)
    if sampler == "ddpm":
        return diffusion.num_timesteps
    options = diffusion.sampler_defaults.with_options(**options)
    for n in range(min(num_steps, diffusion.num_timesteps), 0, -1):
        try:
            if sampler == "ddim":
                ddim_plan(diffusion, n, 0.0, options.spacing, options.steps_offset)
            else:
                dpm_solver_plan(diffusion, n, options)
            return n
        except ValueError:
            continue
    raise ValueError(f"no step count fits the {diffusion.num_timesteps}-step schedule with spacing="
                     f"{options.spacing!r} and steps_offset={options.steps_offset}")


# ----------------------------------------------------------------------------- the loops


def _loop_options(diffusion, clip_denoised, **options):
    """The diffusion's sampler defaults with a call's options, and clip_denoised checked."""
    options = diffusion.sampler_defaults.with_options(clip_denoised=clip_denoised, **options)
    return options, check_bool("clip_denoised", options.clip_denoised)


@torch.no_grad()
def sample_ddpm(diffusion, model, shape, *, x_T=None, generator=None, progress=False, clip_denoised=None,
                return_intermediates=False, y=None, guidance_scale=1.0, guidance_rescale=0.0):
    """Ancestral sampling (Ho et al. 2020, alg. 2) from x_T down to x_0; see GaussianDiffusion.p_sample_loop."""
    x = start(diffusion, model, shape, x_T, generator)
    _, clip_denoised = _loop_options(diffusion, clip_denoised)
    timesteps, rows = ddpm_plan(diffusion)
    intermediates = [] if return_intermediates else None
    x = run(diffusion, model, x, timesteps, rows, clip_denoised=clip_denoised, generator=generator, y=y,
            guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, progress=progress, desc="sampling",
            intermediates=intermediates)
    return (x, intermediates) if return_intermediates else x


@torch.no_grad()
def sample_ddim(diffusion, model, shape, *, num_steps=50, eta=0.0, spacing=None, x_T=None, generator=None,
                progress=False, clip_denoised=None, y=None, guidance_scale=1.0, guidance_rescale=0.0):
    """DDIM (Song et al. 2021) over num_steps timesteps; see GaussianDiffusion.ddim_sample_loop."""
    eta = check_number("eta", eta, minimum=0.0)
    options, clip_denoised = _loop_options(diffusion, clip_denoised, spacing=spacing)
    timesteps, rows = ddim_plan(diffusion, num_steps, eta, options.spacing, options.steps_offset)
    x = start(diffusion, model, shape, x_T, generator)
    return run(diffusion, model, x, timesteps, rows, clip_denoised=clip_denoised, generator=generator, y=y,
               guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, progress=progress,
               desc="DDIM sampling")


@torch.no_grad()
def sample_dpm_solver(diffusion, model, shape, *, num_steps=20, x_T=None, generator=None, progress=False,
                      clip_denoised=None, y=None, guidance_scale=1.0, guidance_rescale=0.0, **options):
    """DPM-Solver++ (Lu et al. 2022); see GaussianDiffusion.dpm_solver_sample_loop."""
    check_model(model)
    options, clip_denoised = _loop_options(diffusion, clip_denoised, **options)
    timesteps, rows = dpm_solver_plan(diffusion, num_steps, options)
    x = start(diffusion, model, shape, x_T, generator)
    return run(diffusion, model, x, timesteps, rows, clip_denoised=clip_denoised, generator=generator, y=y,
               guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, progress=progress,
               desc="DPM-Solver++")
