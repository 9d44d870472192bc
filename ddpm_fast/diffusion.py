"""GaussianDiffusion: the DDPM forward and reverse processes (Ho et al. 2020).

A drop-in for the classic reference class (same constructor, attributes, methods and return
values), plus the rest of the math: cosine schedule, x0/v prediction, posterior, the
variational bound in bits/dim, the score, DDIM and DPM-Solver++. The per-element hot paths
(q_sample, the reverse step, the DDIM step, the DPM-Solver++ step) run in fused kernels chosen
by ``ddpm_fast.backends``; with ``backend="torch"`` they run as plain PyTorch
(``ddpm_fast.reference``).

Schedules are computed in float64 and stored in float32. Tables live on the device of the
tensors they meet (built once per device), so the sampling loops do no host-to-device copies
and no host syncs. Every public method validates its arguments once, before a backend is
chosen (``ddpm_fast.validation``). The range of ``t`` is checked on the host for CPU tensors;
for CUDA tensors it is not (that would sync): an out-of-range ``t`` stops the kernel with a
device-side assert.
"""

import dataclasses
import functools
import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import backends, conditioning, reference, schedules
from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .ops import diffusion_steps as step_ops
from .ops._common import draw_seed
from .validation import (check_batched, check_bool, check_choice, check_float, check_int, check_like, check_number,
                         check_shape, check_timesteps, describe)

LOSS_TYPES = ("mse", "l1", "vlb")

# The reference class's public schedule attributes (float32, on self.device).
_SEED_ATTRIBUTES = (
    "betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "posterior_variance", "posterior_mean_coef1", "posterior_mean_coef2",
)
_MORE_ATTRIBUTES = (
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_log_variance_clipped",
)


@dataclasses.dataclass(frozen=True)
class SamplerDefaults:
    """What the sampling loops use for the options a call leaves at None.

    The defaults are the reference class's (no clipping) and those of diffusers'
    DPMSolverMultistepScheduler; ``GaussianDiffusion.from_diffusers`` takes them from a
    scheduler's configuration, as diffusers' own samplers would.
    """

    clip_denoised: bool = False      # clamp the predicted x_0 to [-1, 1] at every step
    spacing: str = "linspace"        # DDIM / DPM-Solver++ timesteps: "linspace", "leading", "trailing"
    steps_offset: int = 0            # added to "leading" timesteps
    order: int = 2                   # DPM-Solver++ order (1 or 2)
    lower_order_final: bool = True   # first-order last step for fewer than 15 steps (sigma_min ending)
    karras_sigmas: bool = False      # DPM-Solver++ on Karras et al.'s noise levels
    final_sigma: str = "zero"        # DPM-Solver++ ends on sigma = 0 ("zero") or on sigma_0 ("sigma_min")

    def __post_init__(self):
        check_bool("clip_denoised", self.clip_denoised)
        check_choice("spacing", self.spacing, schedules.SPACINGS)
        check_int("steps_offset", self.steps_offset, minimum=0)
        check_int("order", self.order, minimum=1, maximum=2)
        check_bool("lower_order_final", self.lower_order_final)
        check_bool("karras_sigmas", self.karras_sigmas)
        check_choice("final_sigma", self.final_sigma, schedules.FINAL_SIGMAS)


class GaussianDiffusion:
    """DDPM diffusion process.

    Args:
        num_timesteps, beta_start, beta_end: the linear schedule of the reference class.
        device: where the public schedule attributes live. ``None`` (the default) follows the
            inputs: tables are kept on whatever device the tensors passed in are on.
        schedule: "linear" or "cosine" (ignored when ``betas`` is given).
        betas: an explicit 1-D sequence of betas.
        prediction_type: what the model predicts: "epsilon" (the reference class), "x0" or "v".
        variance_type: the fixed reverse variance, "posterior" (beta tilde, the reference class)
            or "beta".
        backend: "auto", "torch", "triton", "cuda" or "cpu" (see ``ddpm_fast.backends``);
            ``DDPM_FAST_BACKEND`` in the environment replaces "auto".
        sampler_defaults: a :class:`SamplerDefaults` for the options the sampling loops are
            called without.
    """

    def __init__(self, num_timesteps=1000, beta_start=0.0001, beta_end=0.02, device=None, *,
                 schedule="linear", betas=None, prediction_type="epsilon", variance_type="posterior",
                 backend="auto", sampler_defaults=None):
        self.prediction_type = check_choice("prediction_type", prediction_type, schedules.PREDICTION_TYPES)
        self.variance_type = check_choice("variance_type", variance_type, schedules.VARIANCE_TYPES)
        if betas is None:
            check_choice("schedule", schedule, schedules.SCHEDULES)
        self.schedule = schedule if betas is None else "custom"
        self.backend = backend
        self.device = self._check_device(device)
        if sampler_defaults is None:
            sampler_defaults = SamplerDefaults()
        elif not isinstance(sampler_defaults, SamplerDefaults):
            raise TypeError(f"sampler_defaults must be a SamplerDefaults or None, got {describe(sampler_defaults)}")
        self.sampler_defaults = sampler_defaults

        betas64 = schedules.make_betas(schedule, num_timesteps, beta_start, beta_end, betas)
        self.num_timesteps = len(betas64)
        self._float64 = schedules.diffusion_quantities(betas64)
        self._q_table64 = schedules.q_sample_table(self._float64)
        self._step_table64 = schedules.reverse_step_table(self._float64, prediction_type, variance_type)
        self._tables_by_device = {}

        home = self._tables(self.device or torch.device("cpu"))
        for name in _SEED_ATTRIBUTES + _MORE_ATTRIBUTES:
            setattr(self, name, getattr(home, name))

    # ------------------------------------------------------------------ configuration

    @property
    def backend(self):
        return self._backend

    @backend.setter
    def backend(self, value):
        self._backend = backends.check_name(value)

    @staticmethod
    def _check_device(device):
        if device is None:
            return None
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"device must be a torch device or None, got {device!r}") from error
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} was asked for but CUDA is not available; "
                             "pass device=None to follow the inputs' device")
        return device

    def _tables(self, device):
        """Every table in float32 on ``device`` (and float64 alphas_cumprod for DDIM), built once."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        tables = self._tables_by_device.get(device)
        if tables is None:
            tables = SimpleNamespace(**{name: value.to(device, torch.float32) for name, value in self._float64.items()})
            tables.q_table = self._q_table64.to(device, torch.float32)
            tables.step_table = self._step_table64.to(device, torch.float32)
            tables.alphas_cumprod64 = self._float64["alphas_cumprod"].to(device)
            self._tables_by_device[device] = tables
        return tables

    def _resolve_backend(self, x):
        return backends.resolve(self._backend, x.device)

    def _default(self, name, value):
        """``value``, or the diffusion's default for the sampler option ``name`` when it is None."""
        return getattr(self.sampler_defaults, name) if value is None else value

    # ------------------------------------------------------------------ argument checks

    def _check(self, name, x, t):
        """x: a floating [batch, ...] tensor; t: its timesteps. Returns t as int64."""
        check_batched(name, x)
        return check_timesteps(t, x.shape[0], self.num_timesteps, x.device)

    @staticmethod
    def _check_model(denoise_model):
        if not callable(denoise_model):
            raise TypeError(f"denoise_model must be callable as denoise_model(x_t, t), got {describe(denoise_model)}")

    @staticmethod
    def _check_optional_like(name, tensor, like_name, like):
        if tensor is not None:
            check_float(name, tensor)
            check_like(name, tensor, like_name, like)
        return tensor

    @staticmethod
    def _check_generator(generator, device):
        if generator is None:
            return None
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {describe(generator)}")
        if generator.device.type != torch.device(device).type:
            raise ValueError(f"generator must be a generator on {torch.device(device).type} (where the samples are "
                             f"drawn), got one on {generator.device}")
        return generator

    def _check_t_prev(self, t_prev, t, x_t):
        """t_prev: integer timesteps in [-1, t) (-1: the final step to x_0); checked on the host for CPU."""
        if not isinstance(t_prev, torch.Tensor) or t_prev.dtype.is_floating_point or t_prev.dtype.is_complex \
                or t_prev.dtype == torch.bool:
            got = t_prev.dtype if isinstance(t_prev, torch.Tensor) else describe(t_prev)
            raise TypeError(f"t_prev must be an integer tensor of timesteps (-1 for the final step), got {got}")
        try:
            t_prev = check_timesteps(t_prev + 1, x_t.shape[0], self.num_timesteps + 1, x_t.device, name="t_prev") - 1
        except ValueError as error:
            raise ValueError(f"{error} (as t_prev + 1: t_prev must lie in [-1, {self.num_timesteps - 1}])") from None
        if t.device.type == "cpu" and not torch.compiler.is_compiling() and bool((t_prev >= t).any()):
            raise ValueError(f"t_prev must be smaller than t element by element (DDIM steps go backwards in time), "
                             f"got t={t.tolist()} and t_prev={t_prev.tolist()}")
        return t_prev

    def _start(self, denoise_model, shape, x_T, generator):
        """(device, x_T) of a sampling loop: the given starting noise, checked, or one drawn."""
        self._check_model(denoise_model)
        shape = check_shape("shape", shape)
        device = self._model_device(denoise_model)
        if x_T is not None:
            check_float("x_T", x_T)
            if tuple(x_T.shape) != shape:
                raise ValueError(f"x_T must have the sampling shape {list(shape)}, got {list(x_T.shape)}")
            if x_T.device != device and not (x_T.device.type == device.type == "cuda" and device.index is None):
                raise ValueError(f"x_T must be on the model's device ({device}), got {x_T.device}")
            self._check_generator(generator, x_T.device)
            return x_T.device, x_T
        self._check_generator(generator, device)
        return device, torch.randn(shape, device=device, generator=generator)

    @staticmethod
    def _extract(a, t, x_shape):
        """a[t] reshaped to [batch, 1, 1, ...] to broadcast over a tensor of shape x_shape."""
        batch_size = t.shape[0]
        out = a.to(t.device).gather(-1, t)
        return out.reshape(batch_size, *((1,) * (len(x_shape) - 1)))

    def _model_device(self, model):
        if self.device is not None:
            return self.device
        parameter = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
        return parameter.device if parameter is not None else torch.device("cpu")

    @staticmethod
    def _call_model(model, x_t, t):
        output = model(x_t, t)
        if not isinstance(output, torch.Tensor) or output.shape != x_t.shape:
            got = list(output.shape) if isinstance(output, torch.Tensor) else describe(output)
            raise ValueError(f"denoise_model(x_t, t) must return a tensor of x_t's shape {list(x_t.shape)}, got {got}")
        return output

    @staticmethod
    def _as_step_input(model_output, x_t):
        """The model's output in x_t's dtype (a model under autocast may answer in another)."""
        return model_output if model_output.dtype == x_t.dtype else model_output.to(x_t.dtype)

    # ------------------------------------------------------------------ forward process

    def q_mean_variance(self, x_start, t):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        t = self._check("x_start", x_start, t)
        tables = self._tables(x_start.device)
        mean = self._extract(tables.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = self._extract(1.0 - tables.alphas_cumprod, t, x_start.shape)
        log_variance = self._extract(tables.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def _q_sample_with_noise(self, x_start, t, noise=None, generator=None):
        """(x_t, noise) for checked arguments: the fused op draws the noise in-kernel when none is given."""
        tables = self._tables(x_start.device)
        backend = self._resolve_backend(x_start)
        if backend == "torch":
            if noise is None:
                noise = torch.empty_like(x_start).normal_(generator=generator)
            return reference.q_sample(x_start, t, tables.q_table, noise), noise
        seed = draw_seed(x_start.device, generator) if noise is None else None
        return step_ops.run_q_sample(x_start, t, tables.q_table, noise, seed, backend)

    def q_sample(self, x_start, t, noise=None):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, eps ~ N(0, I) unless ``noise`` is given."""
        t = self._check("x_start", x_start, t)
        self._check_optional_like("noise", noise, "x_start", x_start)
        return self._q_sample_with_noise(x_start, t, noise)[0]

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of the posterior q(x_{t-1} | x_t, x_0)."""
        t = self._check("x_t", x_t, t)
        check_like("x_start", x_start, "x_t", x_t)
        return self._q_posterior(x_start, x_t, t)

    def _q_posterior(self, x_start, x_t, t):
        tables = self._tables(x_t.device)
        mean = (self._extract(tables.posterior_mean_coef1, t, x_t.shape) * x_start
                + self._extract(tables.posterior_mean_coef2, t, x_t.shape) * x_t)
        variance = self._extract(tables.posterior_variance, t, x_t.shape)
        log_variance = self._extract(tables.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    def predict_start_from_noise(self, x_t, t, noise):
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        t = self._check("x_t", x_t, t)
        check_like("noise", noise, "x_t", x_t)
        tables = self._tables(x_t.device)
        return (self._extract(tables.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - self._extract(tables.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise)

    def predict_noise_from_start(self, x_t, t, x_start):
        """eps = (x_t / sqrt(abar_t) - x_0) / sqrt(1 / abar_t - 1)."""
        t = self._check("x_t", x_t, t)
        check_like("x_start", x_start, "x_t", x_t)
        return self._noise_from_start(x_t, t, x_start)

    def _noise_from_start(self, x_t, t, x_start):
        tables = self._tables(x_t.device)
        return ((self._extract(tables.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - x_start)
                / self._extract(tables.sqrt_recipm1_alphas_cumprod, t, x_t.shape))

    def _predict_start(self, model_output, x_t, t, clip_denoised=False):
        """x_0 from the model output, for any prediction type (the step table's first columns)."""
        tables = self._tables(x_t.device)
        x0_from_xt = self._extract(tables.step_table[:, reference.X0_FROM_XT], t, x_t.shape)
        x0_from_model = self._extract(tables.step_table[:, reference.X0_FROM_MODEL], t, x_t.shape)
        x_start = x0_from_xt * x_t + x0_from_model * model_output
        return x_start.clamp(-1.0, 1.0) if clip_denoised else x_start

    def training_target(self, x_start, t, noise):
        """What the model is trained to predict: eps, x_0, or v = sqrt(abar) eps - sqrt(1 - abar) x_0."""
        t = self._check("x_start", x_start, t)
        check_like("noise", noise, "x_start", x_start)
        return self._training_target(x_start, t, noise)

    def _training_target(self, x_start, t, noise):
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "x0":
            return x_start
        tables = self._tables(x_start.device)
        return (self._extract(tables.sqrt_alphas_cumprod, t, x_start.shape) * noise
                - self._extract(tables.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * x_start)

    # ------------------------------------------------------------------ training losses

    def p_losses(self, denoise_model, x_start, t, noise=None, loss_type="mse", *, y=None, cond_drop_prob=0.0,
                 generator=None):
        """The training loss at timesteps t: "mse" / "l1" (L_simple) or "vlb" (the bound's terms, bits/dim).

        y: class labels [batch] for a class-conditional model (``model(x, t, y=y)``); each is
        replaced by the model's null label with probability ``cond_drop_prob`` (label dropout for
        classifier-free guidance), drawn from ``generator`` (torch's default one when None).
        """
        self._check_model(denoise_model)
        t = self._check("x_start", x_start, t)
        self._check_optional_like("noise", noise, "x_start", x_start)
        check_choice("loss_type", loss_type, LOSS_TYPES)
        y = conditioning.training_labels(denoise_model, y, x_start.shape[0], x_start.device, cond_drop_prob,
                                         self._check_generator(generator, x_start.device))
        if y is not None:
            denoise_model = functools.partial(denoise_model, y=y)
        x_t, noise = self._q_sample_with_noise(x_start, t, noise)
        model_output = self._call_model(denoise_model, x_t, t)
        if loss_type == "vlb":
            return self._vb_terms_bpd(self._as_step_input(model_output, x_t), x_start, x_t, t)[0].mean()
        target = self._training_target(x_start, t, noise)
        if model_output.dtype != target.dtype:
            model_output, target = model_output.float(), target.float()
        if loss_type == "mse":
            return F.mse_loss(model_output, target)
        return F.l1_loss(model_output, target)

    # ------------------------------------------------------------------ reverse process

    def _p_mean_variance(self, model_output, x_t, t, clip_denoised=False):
        """Mean, variance, log-variance and predicted x_0 of p(x_{t-1} | x_t)."""
        tables = self._tables(x_t.device)
        pred_xstart = self._predict_start(model_output, x_t, t, clip_denoised)
        mean, _, _ = self._q_posterior(pred_xstart, x_t, t)
        if self.variance_type == "posterior":
            variance, log_variance = tables.posterior_variance, tables.posterior_log_variance_clipped
        else:
            variance, log_variance = tables.beta_variance, tables.beta_log_variance
        return SimpleNamespace(mean=mean, variance=self._extract(variance, t, x_t.shape),
                               log_variance=self._extract(log_variance, t, x_t.shape), pred_xstart=pred_xstart)

    def p_mean_variance(self, denoise_model, x_t, t, *, clip_denoised=None):
        """(mean, variance) of p(x_{t-1} | x_t), as the reference class returns them."""
        self._check_model(denoise_model)
        t = self._check("x_t", x_t, t)
        clip_denoised = check_bool("clip_denoised", self._default("clip_denoised", clip_denoised))
        model_output = self._as_step_input(self._call_model(denoise_model, x_t, t), x_t)
        out = self._p_mean_variance(model_output, x_t, t, clip_denoised)
        return out.mean, out.variance

    def _check_step(self, x_t, t, noise, generator, clip_denoised):
        """The checks shared by the single-step methods; returns (t, clip_denoised)."""
        t = self._check("x_t", x_t, t)
        self._check_optional_like("noise", noise, "x_t", x_t)
        self._check_generator(generator, x_t.device)
        return t, check_bool("clip_denoised", self._default("clip_denoised", clip_denoised))

    def reverse_step(self, model_output, x_t, t, *, noise=None, generator=None, clip_denoised=None):
        """x_{t-1} = mean + sqrt(var) * z from a model output already computed (one fused pass)."""
        t, clip_denoised = self._check_step(x_t, t, noise, generator, clip_denoised)
        check_like("model_output", model_output, "x_t", x_t)
        return self._reverse_step(model_output, x_t, t, noise, generator, clip_denoised)

    def _reverse_step(self, model_output, x_t, t, noise, generator, clip_denoised):
        """reverse_step for checked arguments."""
        tables = self._tables(x_t.device)
        backend = self._resolve_backend(x_t)
        if backend == "torch":
            if noise is None:
                noise = torch.empty_like(x_t).normal_(generator=generator)
            return reference.reverse_step(x_t, model_output, t, tables.step_table, clip_denoised, noise)
        seed = draw_seed(x_t.device, generator) if noise is None else None
        return step_ops.run_step("reverse_step", x_t, model_output, t, tables.step_table, clip_denoised, noise, seed,
                                 backend)

    def p_sample(self, denoise_model, x_t, t, *, noise=None, generator=None, clip_denoised=None):
        """One reverse step x_t -> x_{t-1}; no noise is added where t == 0."""
        self._check_model(denoise_model)
        t, clip_denoised = self._check_step(x_t, t, noise, generator, clip_denoised)
        model_output = self._as_step_input(self._call_model(denoise_model, x_t, t), x_t)
        return self._reverse_step(model_output, x_t, t, noise, generator, clip_denoised)

    @torch.no_grad()
    def p_sample_loop(self, denoise_model, shape, *, x_T=None, generator=None, progress=False, clip_denoised=None,
                      return_intermediates=False):
        """Ancestral sampling from x_T ~ N(0, I) (or the given ``x_T``) down to x_0.

        Returns x_0, or (x_0, [x_{T-1}, ..., x_0]) with ``return_intermediates``.
        """
        device, x = self._start(denoise_model, shape, x_T, generator)
        clip_denoised = check_bool("clip_denoised", self._default("clip_denoised", clip_denoised))
        intermediates = []
        for i in tqdm(range(self.num_timesteps - 1, -1, -1), disable=not progress, desc="sampling"):
            t = torch.full((x.shape[0],), i, device=device, dtype=torch.long)
            model_output = self._as_step_input(self._call_model(denoise_model, x, t), x)
            x = self._reverse_step(model_output, x, t, None, generator, clip_denoised)
            if return_intermediates:
                intermediates.append(x)
        return (x, intermediates) if return_intermediates else x

    # ------------------------------------------------------------------ score

    def score(self, denoise_model, x_t, t):
        """grad_x log q_t(x_t) estimated by the model: -eps_theta / sqrt(1 - abar_t)."""
        self._check_model(denoise_model)
        t = self._check("x_t", x_t, t)
        model_output = self._as_step_input(self._call_model(denoise_model, x_t, t), x_t)
        if self.prediction_type == "epsilon":
            eps = model_output
        else:
            eps = self._noise_from_start(x_t, t, self._predict_start(model_output, x_t, t))
        tables = self._tables(x_t.device)
        return -eps / self._extract(tables.sqrt_one_minus_alphas_cumprod, t, x_t.shape)

    # ------------------------------------------------------------------ DDIM

    def _ddim_rows(self, t, t_prev, eta):
        """[B, 5] float32 DDIM rows for steps t -> t_prev (t_prev = -1: the final step to x_0)."""
        abar = self._tables(t.device).alphas_cumprod64
        abar_prev = torch.where(t_prev >= 0, abar[t_prev.clamp(min=0)], torch.ones_like(abar[t]))
        return schedules.ddim_step_rows(abar[t], abar_prev, eta, self.prediction_type).float()

    def _ddim_apply(self, model_output, x_t, index, table, eta, noise, generator, clip_denoised):
        backend = self._resolve_backend(x_t)
        seed = None
        if eta == 0.0:
            noise = None  # sigma = 0: a deterministic step draws nothing
        elif noise is None:
            if backend == "torch":
                noise = torch.empty_like(x_t).normal_(generator=generator)
            else:
                seed = draw_seed(x_t.device, generator)
        if backend == "torch":
            return reference.ddim_step(x_t, model_output, index, table, clip_denoised, noise)
        return step_ops.run_step("ddim_step", x_t, model_output, index, table, clip_denoised, noise, seed, backend)

    def ddim_sample(self, denoise_model, x_t, t, t_prev, *, eta=0.0, noise=None, generator=None,
                    clip_denoised=None):
        """One DDIM step x_t -> x_{t_prev} (Song et al. 2021); t_prev = -1 steps to x_0."""
        self._check_model(denoise_model)
        t, clip_denoised = self._check_step(x_t, t, noise, generator, clip_denoised)
        t_prev = self._check_t_prev(t_prev, t, x_t)
        eta = check_number("eta", eta, minimum=0.0)
        model_output = self._as_step_input(self._call_model(denoise_model, x_t, t), x_t)
        rows = self._ddim_rows(t, t_prev, eta)
        index = torch.arange(x_t.shape[0], device=x_t.device)
        return self._ddim_apply(model_output, x_t, index, rows, eta, noise, generator, clip_denoised)

    @torch.no_grad()
    def ddim_sample_loop(self, denoise_model, shape, *, num_steps=50, eta=0.0, spacing=None, x_T=None,
                         generator=None, progress=False, clip_denoised=None):
        """DDIM sampling over ``num_steps`` timesteps (eta = 0: deterministic).

        ``spacing`` ("linspace", "leading", "trailing"; see ``schedules.ddim_timesteps``) places
        the timesteps as diffusers' DDIMScheduler does; each step goes to the next timestep of the
        list, the last one to x_0.
        """
        eta = check_number("eta", eta, minimum=0.0)
        spacing = check_choice("spacing", self._default("spacing", spacing), schedules.SPACINGS)
        clip_denoised = check_bool("clip_denoised", self._default("clip_denoised", clip_denoised))
        steps = schedules.ddim_timesteps(self.num_timesteps, num_steps, spacing, self.sampler_defaults.steps_offset)
        device, x = self._start(denoise_model, shape, x_T, generator)
        steps = steps.to(device)
        # One table for the whole loop: row t holds the coefficients of the step t -> its successor.
        following = torch.cat([steps[1:], steps.new_full((1,), -1)])
        table = torch.zeros(self.num_timesteps, reference.STEP_TABLE_COLUMNS, device=device)
        table[steps] = self._ddim_rows(steps, following, eta)
        for i in tqdm(steps.tolist(), disable=not progress, desc="DDIM sampling"):
            t = torch.full((x.shape[0],), i, device=device, dtype=torch.long)
            model_output = self._as_step_input(self._call_model(denoise_model, x, t), x)
            x = self._ddim_apply(model_output, x, t, table, eta, None, generator, clip_denoised)
        return x

    # ------------------------------------------------------------------ DPM-Solver++

    def dpm_solver_plan(self, num_steps=20, *, order=None, spacing=None, karras_sigmas=None,
                        lower_order_final=None, final_sigma=None):
        """(timesteps [N], float64 step rows [N, 5]) of a DPM-Solver++ loop (see ``dpm_solver_sample_loop``)."""
        defaults = dataclasses.replace(
            self.sampler_defaults, **{name: value for name, value in dict(
                order=order, spacing=spacing, karras_sigmas=karras_sigmas, lower_order_final=lower_order_final,
                final_sigma=final_sigma).items() if value is not None})
        timesteps, sigmas = schedules.dpm_solver_timesteps(
            self._float64["alphas_cumprod"], num_steps, defaults.spacing, defaults.steps_offset,
            defaults.karras_sigmas, defaults.final_sigma, round_karras=self.schedule != "cosine")
        rows = schedules.dpm_solver_step_rows(sigmas, defaults.order, defaults.lower_order_final, self.prediction_type)
        return timesteps, rows

    @torch.no_grad()
    def dpm_solver_sample_loop(self, denoise_model, shape, *, num_steps=20, order=None, spacing=None,
                               karras_sigmas=None, lower_order_final=None, final_sigma=None, x_T=None,
                               generator=None, progress=False, clip_denoised=None):
        """DPM-Solver++ (Lu et al. 2022): the multistep data-prediction solver of the probability-flow ODE.

        Order 2 ("DPM++ 2M", midpoint form) or 1 (equal to DDIM with eta = 0 on the same
        timesteps); every option left at None takes ``self.sampler_defaults`` (by default the
        configuration of diffusers' DPMSolverMultistepScheduler: order 2, "linspace" spacing, no
        Karras sigmas, ending on sigma = 0). One fused op per step; its coefficients are computed
        once per loop in float64 into a small device table.
        """
        self._check_model(denoise_model)
        timesteps, rows = self.dpm_solver_plan(num_steps, order=order, spacing=spacing, karras_sigmas=karras_sigmas,
                                               lower_order_final=lower_order_final, final_sigma=final_sigma)
        clip_denoised = check_bool("clip_denoised", self._default("clip_denoised", clip_denoised))
        device, x = self._start(denoise_model, shape, x_T, generator)
        table = rows.to(device, torch.float32)
        backend = self._resolve_backend(x)
        batch = x.shape[0]
        x0 = None
        for i, step in enumerate(tqdm(timesteps.tolist(), disable=not progress, desc="DPM-Solver++")):
            t = torch.full((batch,), step, device=device, dtype=torch.long)
            index = torch.full((batch,), i, device=device, dtype=torch.long)
            model_output = self._as_step_input(self._call_model(denoise_model, x, t), x)
            x, x0 = step_ops.run_dpm_solver_step(x, model_output, x0, index, table, clip_denoised, backend)
        return x

    # ------------------------------------------------------------------ variational bound

    def _vb_terms_bpd(self, model_output, x_start, x_t, t, clip_denoised=False):
        """L_{t-1} (KL of posterior and model, t > 0) or L_0 (decoder NLL, t = 0), in bits/dim."""
        true_mean, _, true_log_variance = self._q_posterior(x_start, x_t, t)
        out = self._p_mean_variance(model_output, x_t, t, clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out.mean, out.log_variance)) / math.log(2.0)
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
            x_start, means=out.mean, log_scales=0.5 * out.log_variance)) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl), out.pred_xstart

    def prior_bpd(self, x_start):
        """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, per sample."""
        check_batched("x_start", x_start)
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=torch.long)
        mean, _, log_variance = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)

    @torch.no_grad()
    def calc_bpd_loop(self, denoise_model, x_start, clip_denoised=None, *, generator=None, progress=False):
        """The whole variational bound in bits per dimension for data x_start in [-1, 1].

        Returns a dict of per-sample tensors: ``total_bpd`` [B], ``prior_bpd`` [B] (L_T), ``vb``
        [B, T] (column t: L_{t-1} for t > 0, the decoder term L_0 for t = 0), ``xstart_mse`` and
        ``mse`` [B, T] (x_0 and eps prediction errors).
        """
        self._check_model(denoise_model)
        check_batched("x_start", x_start)
        self._check_generator(generator, x_start.device)
        clip_denoised = check_bool("clip_denoised", self._default("clip_denoised", clip_denoised))
        batch = x_start.shape[0]
        vb = x_start.new_zeros(batch, self.num_timesteps, dtype=torch.float32)
        xstart_mse, mse = torch.zeros_like(vb), torch.zeros_like(vb)
        for i in tqdm(range(self.num_timesteps - 1, -1, -1), disable=not progress, desc="bits/dim"):
            t = torch.full((batch,), i, device=x_start.device, dtype=torch.long)
            noise = torch.empty_like(x_start).normal_(generator=generator)
            x_t = self._q_sample_with_noise(x_start, t, noise)[0]
            model_output = self._as_step_input(self._call_model(denoise_model, x_t, t), x_t)
            terms, pred_xstart = self._vb_terms_bpd(model_output, x_start, x_t, t, clip_denoised)
            vb[:, i] = terms
            xstart_mse[:, i] = mean_flat((pred_xstart - x_start) ** 2)
            mse[:, i] = mean_flat((self._noise_from_start(x_t, t, pred_xstart) - noise) ** 2)
        prior = self.prior_bpd(x_start)
        return {"total_bpd": vb.sum(dim=1) + prior, "prior_bpd": prior, "vb": vb,
                "xstart_mse": xstart_mse, "mse": mse}

    def __repr__(self):
        return (f"GaussianDiffusion(num_timesteps={self.num_timesteps}, schedule={self.schedule!r}, "
                f"prediction_type={self.prediction_type!r}, variance_type={self.variance_type!r}, "
                f"backend={self._backend!r}, device={self.device})")


__all__ = ["GaussianDiffusion", "SamplerDefaults", "LOSS_TYPES"]
