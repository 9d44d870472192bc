"""diffusers' schedulers (DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler) <-> GaussianDiffusion.

:func:`diffusion_from_diffusers` builds the diffusion (and its sampler defaults) of a scheduler
object, config dict or scheduler_config.json; :func:`scheduler_config_to_diffusers` writes one.
Every key of those schedulers is mapped, inert or rejected by name.
"""

import math
import os
from collections.abc import Mapping

import torch

from ... import schedules
from ...diffusion import GaussianDiffusion
from ...samplers import SOLVER_TYPES, SamplerDefaults
from ...validation import check_bool, check_int, check_number, describe
from ._files import DiffusersFormatError, _read_json

# ----------------------------------------------------------------------------- schedulers

SCHEDULER_CONFIG_NAME = "scheduler_config.json"

# The keys of the schedulers ddpm_fast reads, with their __init__ defaults (diffusers 0.42),
# which apply to the keys a config leaves out. The tests check these tables against the
# installed diffusers.
_SCHEDULER_COMMON = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}
SCHEDULER_DEFAULTS = {
    "DDPMScheduler": {**_SCHEDULER_COMMON, "variance_type": "fixed_small", "clip_sample": True,
                      "clip_sample_range": 1.0},
    "DDIMScheduler": {**_SCHEDULER_COMMON, "clip_sample": True, "clip_sample_range": 1.0, "set_alpha_to_one": True},
    "DPMSolverMultistepScheduler": {
        **_SCHEDULER_COMMON, "timestep_spacing": "linspace", "variance_type": None, "solver_order": 2,
        "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "lower_order_final": True,
        "euler_at_final": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
        "use_beta_sigmas": False, "use_lu_lambdas": False, "use_flow_sigmas": False, "flow_shift": 1.0,
        "final_sigmas_type": "zero", "lambda_min_clipped": -math.inf, "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
    },
}
DEFAULT_SCHEDULER = "DDPMScheduler"  # the class of a config dict without _class_name
# A config may hold keys of the other two schedulers too: diffusers' from_config keeps the keys of
# the config it converts (DPMSolverMultistepScheduler.from_config of a DDPMScheduler config holds
# clip_sample and variance_type), and converting again brings them back into effect. ddpm_fast
# has one diffusion for all its samplers, so each key configures the sampler it belongs to
# whatever the class (a DDPMScheduler config's use_karras_sigmas sets the DPM-Solver++ noise
# levels, as DPMSolverMultistepScheduler.from_config of it would); keys the config leaves out take
# the defaults of the class they belong to, the config's own class first.
_SCHEDULER_KEYS = set().union(*SCHEDULER_DEFAULTS.values())

PREDICTION_TYPES = {"epsilon": "epsilon", "sample": "x0", "v_prediction": "v"}  # diffusers -> ddpm_fast
ALGORITHM_TYPES = {"dpmsolver++": False, "sde-dpmsolver++": True}  # diffusers -> SamplerDefaults.sde
# The fixed variances. The "_log" variants name the same variances (diffusers' DDPMScheduler
# interpolates learned ones in log space). None: no choice made, DDPMScheduler's fixed_small.
VARIANCE_TYPES = {None: "posterior", "fixed_small": "posterior", "fixed_small_log": "posterior",
                  "fixed_large": "beta", "fixed_large_log": "beta"}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# The noise-level families of DPMSolverMultistepScheduler other than the schedule's own and Karras'.
_OTHER_SIGMAS = ("use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas",
                 "use_dynamic_shifting")


def _one_of(value, choices):
    """value in choices, for any value (a list from a json file is not hashable)."""
    return isinstance(value, (str, type(None))) and value in choices


def _betas_tensor(where, value):
    """trained_betas (a list, array or tensor of numbers) as a float64 tensor."""
    try:
        betas = torch.as_tensor(value.tolist() if hasattr(value, "tolist") else value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{where}: trained_betas must be a list of numbers or null, got {describe(value)}") from None
    if betas.dim() != 1:
        raise DiffusersFormatError(f"{where}: trained_betas must be a flat list, got shape {list(betas.shape)}")
    return betas


def diffusion_config_from_diffusers(config, class_name=None):
    """The :class:`GaussianDiffusion` keyword arguments of a scheduler config dict.

    ``class_name``: the scheduler class (DDPMScheduler, DDIMScheduler or
    DPMSolverMultistepScheduler); by default the config's ``_class_name``, else DDPMScheduler.
    Keys the config leaves out take that class's defaults, as in diffusers; the keys of the other
    two schedulers configure those schedulers' samplers and default to theirs (see the comment
    above _SCHEDULER_KEYS).

    Mapping (diffusers -> ddpm_fast):
        num_train_timesteps, beta_start, beta_end, beta_schedule  -> the betas: "linear" ->
            schedule="linear"; "squaredcos_cap_v2" -> schedule="cosine" (the same betas_for_alpha_bar,
            beta_start/beta_end inert); "scaled_linear" -> betas=linspace(sqrt(start), sqrt(end))^2
        trained_betas            -> betas= (beta_start, beta_end, beta_schedule inert); its length
                                    must be num_train_timesteps
        prediction_type          -> epsilon -> "epsilon", sample -> "x0", v_prediction -> "v"
        variance_type            -> fixed_small, fixed_small_log, None -> "posterior" (beta tilde);
                                    fixed_large, fixed_large_log -> "beta"
        clip_sample              -> sampler_defaults.clip_denoised (clip_sample_range must be 1.0 when
                                    clipping, inert otherwise); a DPMSolverMultistepScheduler config
                                    never clips (that class ignores the clip_sample from_config brings)
        timestep_spacing, steps_offset -> sampler_defaults.spacing, .steps_offset
        solver_order, lower_order_final, use_karras_sigmas, final_sigmas_type, solver_type ->
                                    sampler_defaults.order (1-3), .lower_order_final, .karras_sigmas,
                                    .final_sigma, .solver_type ("midpoint", "heun")
        algorithm_type           -> "dpmsolver++" -> sampler_defaults.sde=False,
                                    "sde-dpmsolver++" -> sde=True
    Inert, so accepted: dynamic_thresholding_ratio and sample_max_value (thresholding off),
    flow_shift and time_shift_type (no flow sigmas, no dynamic shifting), euler_at_final with
    final_sigmas_type "zero" (that last step is first order anyway), a lambda_min_clipped below
    every log-SNR of the schedule (it clips no timestep), set_alpha_to_one=True (ddpm_fast's DDIM
    ends on x_0). Keys starting with "_" are diffusers' bookkeeping.
    Everything else ddpm_fast cannot express raises DiffusersFormatError naming the key and its
    value: thresholding, learned variances, zero terminal SNR, set_alpha_to_one=False, other
    solvers, solver orders or noise levels, a clipping lambda_min_clipped, unknown keys, other
    scheduler classes. Wrong value types raise TypeError naming the key.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict (a scheduler config), got {describe(config)}")
    class_name = config.get("_class_name", DEFAULT_SCHEDULER) if class_name is None else class_name
    if class_name not in SCHEDULER_DEFAULTS:
        raise DiffusersFormatError(f"scheduler class {class_name!r} is not supported: ddpm_fast reads "
                                   f"{', '.join(SCHEDULER_DEFAULTS)}")
    where = f"{class_name} config"
    unknown = [key for key in config if not key.startswith("_") and key not in _SCHEDULER_KEYS]
    if unknown:
        raise DiffusersFormatError(f"{where}: unknown key {unknown[0]!r} (value {config[unknown[0]]!r}); ddpm_fast "
                                   f"reads the keys of {', '.join(SCHEDULER_DEFAULTS)}")
    defaults = {}
    for name in reversed(SCHEDULER_DEFAULTS):  # DDPMScheduler's shared defaults last, then the class's own
        defaults.update(SCHEDULER_DEFAULTS[name])
    c = {**defaults, **SCHEDULER_DEFAULTS[class_name], **{k: v for k, v in config.items() if not k.startswith("_")}}

    def unsupported(key, why):
        return DiffusersFormatError(f"{where}: {key}={c[key]!r} is not supported ({why})")

    def flag(key):
        return check_bool(f"{where}: {key}", c[key])

    if flag("rescale_betas_zero_snr"):
        raise unsupported("rescale_betas_zero_snr", "zero terminal SNR sets beta_T = 1; ddpm_fast's schedules keep "
                                                    "every beta below 1")
    if flag("thresholding"):
        raise unsupported("thresholding", "ddpm_fast has no dynamic thresholding; it clamps the predicted x_0 to "
                                          "[-1, 1] with clip_sample")
    schedule = _schedule_from_diffusers(c, where, unsupported)
    try:  # the betas, checked as GaussianDiffusion will check them
        betas = schedules.make_betas(**schedule)
    except (TypeError, ValueError) as error:
        raise DiffusersFormatError(f"{where}: {error}") from None
    if not _one_of(c["prediction_type"], PREDICTION_TYPES):
        raise unsupported("prediction_type", f"ddpm_fast reads {', '.join(map(repr, PREDICTION_TYPES))}")
    if _one_of(c["variance_type"], ("learned", "learned_range")):
        raise unsupported("variance_type", "a learned variance (the model predicts it too); ddpm_fast's reverse "
                                           "process has a fixed variance: fixed_small or fixed_large")
    if not _one_of(c["variance_type"], VARIANCE_TYPES):
        raise unsupported("variance_type", f"ddpm_fast reads {', '.join(map(repr, VARIANCE_TYPES))}")
    # DPMSolverMultistepScheduler never clips, and ddpm_fast's clipping applies to every sampler:
    # there the clip_sample that from_config carries along stays inert.
    clip = class_name != "DPMSolverMultistepScheduler" and flag("clip_sample")
    if clip and check_number(f"{where}: clip_sample_range", c["clip_sample_range"]) != 1.0:
        raise unsupported("clip_sample_range", "ddpm_fast clamps the predicted x_0 to [-1, 1]: 1.0, or "
                                               "clip_sample=False")
    if not flag("set_alpha_to_one"):
        raise unsupported("set_alpha_to_one", "ddpm_fast's DDIM ends on x_0 itself, as with True")
    if not _one_of(c["timestep_spacing"], schedules.SPACINGS):
        raise unsupported("timestep_spacing", f"ddpm_fast reads {', '.join(map(repr, schedules.SPACINGS))}")
    return dict(
        **schedule,
        prediction_type=PREDICTION_TYPES[c["prediction_type"]],
        variance_type=VARIANCE_TYPES[c["variance_type"]],
        sampler_defaults=SamplerDefaults(
            clip_denoised=clip, spacing=c["timestep_spacing"],
            steps_offset=check_int(f"{where}: steps_offset", c["steps_offset"], minimum=0),
            **_solver_from_diffusers(c, where, unsupported, flag, betas)),
    )


def _schedule_from_diffusers(c, where, unsupported):
    """The schedule keywords of GaussianDiffusion (and of schedules.make_betas)."""
    num_timesteps = check_int(f"{where}: num_train_timesteps", c["num_train_timesteps"], minimum=1)
    if c["trained_betas"] is not None:
        betas = _betas_tensor(where, c["trained_betas"])
        if len(betas) != num_timesteps:
            raise DiffusersFormatError(f"{where}: trained_betas has {len(betas)} values but num_train_timesteps="
                                       f"{num_timesteps}; diffusers' samplers step through num_train_timesteps "
                                       f"timesteps of these betas, so the two must agree")
        return dict(betas=betas)
    if c["beta_schedule"] == "squaredcos_cap_v2":  # diffusers' betas_for_alpha_bar is ddpm_fast's cosine schedule
        return dict(num_timesteps=num_timesteps, schedule="cosine")
    if c["beta_schedule"] not in ("linear", "scaled_linear"):
        raise unsupported("beta_schedule", f"ddpm_fast reads {', '.join(map(repr, BETA_SCHEDULES))} and trained_betas")
    start = check_number(f"{where}: beta_start", c["beta_start"], minimum=0.0, open_min=True)
    end = check_number(f"{where}: beta_end", c["beta_end"], minimum=0.0, open_min=True)
    if c["beta_schedule"] == "linear":
        return dict(num_timesteps=num_timesteps, beta_start=start, beta_end=end, schedule="linear")
    return dict(betas=torch.linspace(start**0.5, end**0.5, num_timesteps, dtype=torch.float64) ** 2)


def _solver_from_diffusers(c, where, unsupported, flag, betas):
    """The DPM-Solver++ fields of SamplerDefaults from a DPMSolverMultistepScheduler config."""
    if c["algorithm_type"] not in ALGORITHM_TYPES:
        raise unsupported("algorithm_type", "ddpm_fast's solver is DPM-Solver++ (data prediction), without or with "
                                            "noise: 'dpmsolver++' or 'sde-dpmsolver++'")
    if not _one_of(c["solver_type"], SOLVER_TYPES):
        raise unsupported("solver_type", f"ddpm_fast reads {', '.join(map(repr, SOLVER_TYPES))}")
    if check_int(f"{where}: solver_order", c["solver_order"]) not in (1, 2, 3):
        raise unsupported("solver_order", "ddpm_fast's DPM-Solver++ has orders 1, 2 and 3")
    for key in _OTHER_SIGMAS:
        if flag(key):
            raise unsupported(key, "ddpm_fast's DPM-Solver++ runs on the schedule's noise levels or on Karras "
                                   "et al.'s (use_karras_sigmas)")
    karras = flag("use_karras_sigmas")
    if not _one_of(c["final_sigmas_type"], schedules.FINAL_SIGMAS):
        raise unsupported("final_sigmas_type", f"ddpm_fast reads {', '.join(map(repr, schedules.FINAL_SIGMAS))}")
    if flag("euler_at_final") and c["final_sigmas_type"] != "zero":
        raise unsupported("euler_at_final", "ddpm_fast's last step is first order when it ends on sigma = 0 "
                                            "(final_sigmas_type='zero', where euler_at_final is inert) or, with "
                                            "lower_order_final, below 15 steps")
    clipped = c["lambda_min_clipped"]
    if not (isinstance(clipped, (int, float)) and not isinstance(clipped, bool) and clipped == -math.inf):
        clipped = check_number(f"{where}: lambda_min_clipped", clipped)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        log_snr = 0.5 * torch.log(alphas_cumprod / (1 - alphas_cumprod))  # diffusers' lambda_t
        dropped = int((log_snr < clipped).sum())
        if dropped:
            raise unsupported("lambda_min_clipped", f"it drops the {dropped} last of {len(betas)} timesteps, whose "
                                                    f"log-SNR lies below it; ddpm_fast's DPM-Solver++ spans every "
                                                    f"timestep: -inf, or a value <= {log_snr.min().item():.6g} "
                                                    f"(the schedule's least log-SNR), which drops none")
    if karras and c["trained_betas"] is not None and c["beta_schedule"] == "squaredcos_cap_v2":
        raise unsupported("beta_schedule", "with trained_betas and use_karras_sigmas diffusers truncates the Karras "
                                           "timesteps as for its cosine schedule, which ddpm_fast does only for its "
                                           "own cosine schedule: drop trained_betas, or use beta_schedule='linear' "
                                           "(inert with trained_betas)")
    return dict(order=c["solver_order"], lower_order_final=flag("lower_order_final"), karras_sigmas=karras,
                final_sigma=c["final_sigmas_type"], sde=ALGORITHM_TYPES[c["algorithm_type"]],
                solver_type=c["solver_type"])


# Keyword arguments of GaussianDiffusion that do not define the noise process.
_DIFFUSION_OVERRIDES = ("backend", "device", "sampler_defaults")


def _scheduler_contents(scheduler_or_config):
    """(config dict, class name or None) of a scheduler object, config dict or scheduler_config.json path."""
    if isinstance(scheduler_or_config, (str, os.PathLike)):
        path = os.fspath(scheduler_or_config)
        if os.path.isdir(path):
            path = os.path.join(path, SCHEDULER_CONFIG_NAME)
        if not os.path.isfile(path):
            raise DiffusersFormatError(f"{path!r} does not exist: expected a {SCHEDULER_CONFIG_NAME} (or a folder "
                                       f"holding one)")
        return _read_json(path), None
    if isinstance(scheduler_or_config, Mapping):
        return dict(scheduler_or_config), None
    try:
        import diffusers
    except ImportError:
        diffusers = None
    for name in SCHEDULER_DEFAULTS:
        if diffusers is not None and isinstance(scheduler_or_config, getattr(diffusers, name)):
            return dict(scheduler_or_config.config), name
    raise TypeError(f"scheduler_or_config must be a diffusers {', '.join(SCHEDULER_DEFAULTS)}, its config dict or "
                    f"the path of its {SCHEDULER_CONFIG_NAME}, got {describe(scheduler_or_config)}")


def diffusion_from_diffusers(scheduler_or_config, **overrides):
    """The :class:`GaussianDiffusion` of a diffusers scheduler (see :func:`diffusion_config_from_diffusers`).

    ``scheduler_or_config``: a DDPMScheduler, DDIMScheduler or DPMSolverMultistepScheduler (diffusers
    is imported only for these), its config dict, or the path of a scheduler_config.json (or of
    the folder holding it). ``overrides``: ``backend``, ``device`` and ``sampler_defaults`` of the
    GaussianDiffusion; the noise process itself comes from the scheduler.

    Where the samplers differ: diffusers' DDIMScheduler with clip_sample=True keeps the model's
    own epsilon in its direction term unless ``use_clipped_model_output=True``; ddpm_fast re-derives
    epsilon from the clipped x_0 (as improved-diffusion does), which is diffusers' DDIM with
    use_clipped_model_output=True. And diffusers' DDIMScheduler steps from t to
    t - num_train_timesteps // num_steps whatever the spacing, which is its next timestep for
    "leading" spacing (its default) and for "trailing" when num_steps divides num_train_timesteps;
    ddpm_fast's DDIM always steps to the next timestep of the list.
    """
    extra = sorted(set(overrides) - set(_DIFFUSION_OVERRIDES))
    if extra:
        raise TypeError(f"diffusion_from_diffusers takes the overrides {', '.join(_DIFFUSION_OVERRIDES)} only (the "
                        f"noise process comes from the scheduler), got {', '.join(extra)}")
    config, class_name = _scheduler_contents(scheduler_or_config)
    return GaussianDiffusion(**{**diffusion_config_from_diffusers(config, class_name), **overrides})


def scheduler_config_to_diffusers(diffusion):
    """The DDPMScheduler config dict (with ``_class_name``) of a :class:`GaussianDiffusion`, exactly.

    Every key is written, so diffusers' defaults do not matter. The betas: beta_schedule "linear"
    (beta_start, beta_end) or "squaredcos_cap_v2" when they are those schedules' to the last bit,
    trained_betas (float64 values) otherwise. clip_sample, timestep_spacing and steps_offset come
    from ``diffusion.sampler_defaults``; its DPM-Solver++ fields must keep their defaults (those of
    DPMSolverMultistepScheduler, which a DDPMScheduler config cannot change), else
    DiffusersFormatError.
    """
    if not isinstance(diffusion, GaussianDiffusion):
        raise TypeError(f"diffusion must be a ddpm_fast GaussianDiffusion, got {describe(diffusion)}")
    defaults, solver_defaults = diffusion.sampler_defaults, SamplerDefaults()
    for field in ("order", "lower_order_final", "karras_sigmas", "final_sigma", "sde", "solver_type"):
        if getattr(defaults, field) != getattr(solver_defaults, field):
            raise DiffusersFormatError(
                f"a DDPMScheduler config cannot express sampler_defaults.{field}={getattr(defaults, field)!r}: it "
                f"has no DPM-Solver++ keys, and DPMSolverMultistepScheduler.from_config of it takes "
                f"{field}={getattr(solver_defaults, field)!r}; export a diffusion with that value")
    betas = diffusion._float64["betas"]  # the exact float64 schedule (the public tables are float32)
    num_timesteps = diffusion.num_timesteps
    start, end = betas[0].item(), betas[-1].item()
    if start < end and torch.equal(schedules.linear_betas(num_timesteps, start, end), betas):
        schedule = {"beta_schedule": "linear", "beta_start": start, "beta_end": end, "trained_betas": None}
    elif torch.equal(schedules.cosine_betas(num_timesteps), betas):
        schedule = {"beta_schedule": "squaredcos_cap_v2", "beta_start": 0.0001, "beta_end": 0.02,
                    "trained_betas": None}
    else:
        schedule = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "trained_betas": betas.tolist()}
    return {
        "_class_name": DEFAULT_SCHEDULER,
        "num_train_timesteps": num_timesteps,
        **schedule,
        "variance_type": {"posterior": "fixed_small", "beta": "fixed_large"}[diffusion.variance_type],
        "clip_sample": defaults.clip_denoised,
        "clip_sample_range": 1.0,
        "prediction_type": {ours: theirs for theirs, ours in PREDICTION_TYPES.items()}[diffusion.prediction_type],
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "timestep_spacing": defaults.spacing,
        "steps_offset": defaults.steps_offset,
        "rescale_betas_zero_snr": False,
    }
