"""GaussianDiffusion: the DDPM forward and reverse processes (Ho et al. 2020).

A drop-in for the classic reference class (same constructor, attributes, methods and return
values), plus the rest of the math: cosine schedule, x0/v prediction, posterior, the variational
bound in bits/dim and the score. Its sampling methods delegate to ``ddpm_fast.samplers`` (DDPM,
DDIM, DPM-Solver++; every step one fused op), and q_sample runs in a fused kernel chosen by
``ddpm_fast.backends``; with ``backend="torch"`` everything is plain PyTorch.

Schedules are computed in float64 and stored in float32 on the device of the tensors they meet
(built once per device), so the loops make no host-to-device copies per step and no host syncs.
Every public method validates its arguments once, before a backend is chosen. The range of ``t``
is checked on the host for CPU tensors; on CUDA an out-of-range ``t`` stops the kernel.
"""

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import backends, conditioning, reference, samplers, schedules
from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .ops import diffusion_steps as step_ops
from .ops._common import draw_seed
from .ops.sampler_step import check_model_output
from .samplers import SamplerDefaults
from .validation import (check_batched, check_bool, check_choice, check_device, check_generator, check_like,
                         check_model, check_number, check_one_timestep_per_item, check_optional_like, check_t_prev,
                         check_timesteps, describe)

LOSS_TYPES = ("mse", "l1", "vlb")

# The reference class's public schedule attributes (float32, on self.device), and a few more.
_SEED_ATTRIBUTES = (
    "betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "posterior_variance", "posterior_mean_coef1", "posterior_mean_coef2",
)
_MORE_ATTRIBUTES = (
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_log_variance_clipped",
)


class GaussianDiffusion:
    """DDPM diffusion process.

    Args:
        num_timesteps, beta_start, beta_end: the linear schedule of the reference class.
        device: where the public schedule attributes live (None: follow the inputs' device).
        schedule: "linear" or "cosine"; betas: an explicit 1-D sequence of betas instead.
        prediction_type: what the model predicts: "epsilon" (the reference class), "x0" or "v".
        variance_type: the fixed reverse variance, "posterior" (beta tilde, the reference class) or "beta".
        backend: "auto", "torch", "triton", "cuda" or "cpu" (``ddpm_fast.backends``; DDPM_FAST_BACKEND).
        sampler_defaults: a :class:`SamplerDefaults` for the options sampling loops are called without.
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
        self.device = check_device(device)
        if not isinstance(sampler_defaults, (SamplerDefaults, type(None))):
            raise TypeError(f"sampler_defaults must be a SamplerDefaults or None, got {describe(sampler_defaults)}")
        self.sampler_defaults = sampler_defaults or SamplerDefaults()

        betas64 = schedules.make_betas(schedule, num_timesteps, beta_start, beta_end, betas)
        self.num_timesteps = len(betas64)
        self._float64 = schedules.diffusion_quantities(betas64)
        self._step_table64 = samplers.ddpm_rows(self._float64, prediction_type, variance_type)
        self._tables_by_device = {}
        home = self._tables(self.device or torch.device("cpu"))
        for name in _SEED_ATTRIBUTES + _MORE_ATTRIBUTES:
            setattr(self, name, getattr(home, name))

    @property
    def backend(self):
        return self._backend

    @backend.setter
    def backend(self, value):
        self._backend = backends.check_name(value)

    def _tables(self, device):
        """Every table in float32 on ``device`` (and float64 alphas_cumprod for DDIM), built once."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._tables_by_device:
            tables = SimpleNamespace(**{name: value.to(device, torch.float32) for name, value in self._float64.items()})
            tables.q_table = schedules.q_sample_table(self._float64).to(device, torch.float32)
            tables.step_table = self._step_table64.to(device, torch.float32)
            tables.alphas_cumprod64 = self._float64["alphas_cumprod"].to(device)
            self._tables_by_device[device] = tables
        return self._tables_by_device[device]

    def _check(self, name, x, t):
        """x: a floating [batch, ...] tensor; t: its timesteps. Returns t as int64."""
        check_batched(name, x)
        return check_timesteps(t, x.shape[0], self.num_timesteps, x.device)

    @staticmethod
    def _extract(a, t, x_shape):
        """a[t] reshaped to [batch, 1, 1, ...] to broadcast over a tensor of shape x_shape."""
        return a.to(t.device).gather(-1, t).reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))

    def _column(self, name, t, x):
        return self._extract(getattr(self._tables(x.device), name), t, x.shape)

    # ------------------------------------------------------------------ forward process and posterior

    def q_mean_variance(self, x_start, t):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        t = self._check("x_start", x_start, t)
        mean = self._column("sqrt_alphas_cumprod", t, x_start) * x_start
        return mean, 1.0 - self._column("alphas_cumprod", t, x_start), self._column("log_one_minus_alphas_cumprod",
                                                                                    t, x_start)

    def _q_sample_with_noise(self, x_start, t, noise=None, generator=None):
        """(x_t, noise) for checked arguments: the fused op draws the noise in-kernel when none is given."""
        backend = backends.resolve(self._backend, x_start.device)
        if backend == "torch" and noise is None:
            noise = torch.empty_like(x_start).normal_(generator=generator)
        seed = draw_seed(x_start.device, generator) if noise is None else None
        return step_ops.run_q_sample(x_start, t, self._tables(x_start.device).q_table, noise, seed, backend)

    def q_sample(self, x_start, t, noise=None):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, eps ~ N(0, I) unless ``noise`` is given."""
        t = self._check("x_start", x_start, t)
        check_optional_like("noise", noise, "x_start", x_start)
        return self._q_sample_with_noise(x_start, t, noise)[0]

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of the posterior q(x_{t-1} | x_t, x_0)."""
        t = self._check("x_t", x_t, t)
        check_like("x_start", x_start, "x_t", x_t)
        return self._q_posterior(x_start, x_t, t)

    def _q_posterior(self, x_start, x_t, t):
        mean = (self._column("posterior_mean_coef1", t, x_t) * x_start
                + self._column("posterior_mean_coef2", t, x_t) * x_t)
        return mean, self._column("posterior_variance", t, x_t), self._column("posterior_log_variance_clipped", t, x_t)

    def predict_start_from_noise(self, x_t, t, noise):
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        t = self._check("x_t", x_t, t)
        check_like("noise", noise, "x_t", x_t)
        return self._column("sqrt_recip_alphas_cumprod", t, x_t) * x_t - self._column("sqrt_recipm1_alphas_cumprod",
                                                                                       t, x_t) * noise

    def predict_noise_from_start(self, x_t, t, x_start):
        """eps = (x_t / sqrt(abar_t) - x_0) / sqrt(1 / abar_t - 1)."""
        t = self._check("x_t", x_t, t)
        check_like("x_start", x_start, "x_t", x_t)
        return self._noise_from_start(x_t, t, x_start)

    def _noise_from_start(self, x_t, t, x_start):
        return (self._column("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x_start) / self._column(
            "sqrt_recipm1_alphas_cumprod", t, x_t)

    def _predict_start(self, model_output, x_t, t, clip_denoised=False):
        """x_0 from the model output, for any prediction type (the step table's first columns)."""
        table = self._tables(x_t.device).step_table
        x_start = (self._extract(table[:, reference.X0_FROM_X], t, x_t.shape) * x_t
                   + self._extract(table[:, reference.X0_FROM_MODEL], t, x_t.shape) * model_output)
        return x_start.clamp(-1.0, 1.0) if clip_denoised else x_start

    def training_target(self, x_start, t, noise):
        """What the model is trained to predict: eps, x_0, or v = sqrt(abar) eps - sqrt(1 - abar) x_0."""
        t = self._check("x_start", x_start, t)
        check_like("noise", noise, "x_start", x_start)
        return self._training_target(x_start, t, noise)

    def _training_target(self, x_start, t, noise):
        if self.prediction_type != "v":
            return noise if self.prediction_type == "epsilon" else x_start
        return (self._column("sqrt_alphas_cumprod", t, x_start) * noise
                - self._column("sqrt_one_minus_alphas_cumprod", t, x_start) * x_start)

    # ------------------------------------------------------------------ training losses

    def p_losses(self, denoise_model, x_start, t, noise=None, loss_type="mse", *, y=None, cond_drop_prob=0.0,
                 generator=None):
        """The training loss at timesteps t: "mse" / "l1" (L_simple) or "vlb" (the bound's terms, bits/dim).

        y: class labels [batch] of a class-conditional model, each replaced by its null label with
        probability ``cond_drop_prob`` (label dropout for classifier-free guidance), drawn from ``generator``.
        """
        check_model(denoise_model)
        check_one_timestep_per_item("x_start", x_start, t)
        t = self._check("x_start", x_start, t)
        check_optional_like("noise", noise, "x_start", x_start)
        check_choice("loss_type", loss_type, LOSS_TYPES)
        y = conditioning.training_labels(denoise_model, y, x_start.shape[0], x_start.device, cond_drop_prob,
                                         check_generator(generator, x_start.device))
        x_t, noise = self._q_sample_with_noise(x_start, t, noise)
        model_output = samplers.call_model(denoise_model, x_t, t, y, cast=False)
        if loss_type == "vlb":
            return self._vb_terms_bpd(model_output.to(x_t.dtype), x_start, x_t, t)[0].mean()
        target = self._training_target(x_start, t, noise)
        if model_output.dtype != target.dtype:
            model_output, target = model_output.float(), target.float()
        return (F.mse_loss if loss_type == "mse" else F.l1_loss)(model_output, target)

    # ------------------------------------------------------------------ reverse process

    def _p_mean_variance(self, model_output, x_t, t, clip_denoised=False):
        """Mean, variance, log-variance and predicted x_0 of p(x_{t-1} | x_t)."""
        pred_xstart = self._predict_start(model_output, x_t, t, clip_denoised)
        mean, _, _ = self._q_posterior(pred_xstart, x_t, t)
        names = (("posterior_variance", "posterior_log_variance_clipped") if self.variance_type == "posterior"
                 else ("beta_variance", "beta_log_variance"))
        return SimpleNamespace(mean=mean, variance=self._column(names[0], t, x_t),
                               log_variance=self._column(names[1], t, x_t), pred_xstart=pred_xstart)

    def p_mean_variance(self, denoise_model, x_t, t, *, clip_denoised=None):
        """(mean, variance) of p(x_{t-1} | x_t), as the reference class returns them."""
        check_model(denoise_model)
        t = self._check("x_t", x_t, t)
        clip_denoised = check_bool("clip_denoised", self._default("clip_denoised", clip_denoised))
        out = self._p_mean_variance(samplers.call_model(denoise_model, x_t, t), x_t, t, clip_denoised)
        return out.mean, out.variance

    def _default(self, name, value):
        return getattr(self.sampler_defaults, name) if value is None else value

    def _check_step(self, x_t, t, noise, generator, clip_denoised):
        t = self._check("x_t", x_t, t)
        check_optional_like("noise", noise, "x_t", x_t)
        check_generator(generator, x_t.device)
        return t, check_bool("clip_denoised", self._default("clip_denoised", clip_denoised))

    def reverse_step(self, model_output, x_t, t, *, noise=None, generator=None, clip_denoised=None,
                     guidance_scale=1.0):
        """x_{t-1} = mean + sqrt(var) * z from a model output ([2B, ...] when guided), in one fused pass."""
        t, clip_denoised = self._check_step(x_t, t, noise, generator, clip_denoised)
        check_model_output(model_output, x_t, "x_t")
        return samplers.step(self, model_output, x_t, t, self._tables(x_t.device).step_table, noise=noise,
                             generator=generator, clip_denoised=clip_denoised, guidance_scale=guidance_scale)

    def p_sample(self, denoise_model, x_t, t, *, noise=None, generator=None, clip_denoised=None, y=None,
                 guidance_scale=1.0):
        """One reverse step x_t -> x_{t-1}; no noise is added where t == 0."""
        check_model(denoise_model)
        t, clip_denoised = self._check_step(x_t, t, noise, generator, clip_denoised)
        model_output, guidance_scale = samplers.loops.guided_call(denoise_model, x_t, t, y, guidance_scale)
        return samplers.step(self, model_output, x_t, t, self._tables(x_t.device).step_table, noise=noise,
                             generator=generator, clip_denoised=clip_denoised, guidance_scale=guidance_scale)

    def p_sample_loop(self, denoise_model, shape, **options):
        """Ancestral sampling from x_T ~ N(0, I) down to x_0; options: see ``samplers.sample_ddpm``."""
        return samplers.sample_ddpm(self, denoise_model, shape, **options)

    def score(self, denoise_model, x_t, t):
        """grad_x log q_t(x_t) estimated by the model: -eps_theta / sqrt(1 - abar_t)."""
        check_model(denoise_model)
        t = self._check("x_t", x_t, t)
        eps = samplers.call_model(denoise_model, x_t, t)
        if self.prediction_type != "epsilon":
            eps = self._noise_from_start(x_t, t, self._predict_start(eps, x_t, t))
        return -eps / self._column("sqrt_one_minus_alphas_cumprod", t, x_t)

    def ddim_sample(self, denoise_model, x_t, t, t_prev, *, eta=0.0, noise=None, generator=None,
                    clip_denoised=None, y=None, guidance_scale=1.0):
        """One DDIM step x_t -> x_{t_prev} (Song et al. 2021); t_prev = -1 steps to x_0."""
        check_model(denoise_model)
        t, clip_denoised = self._check_step(x_t, t, noise, generator, clip_denoised)
        t_prev = check_t_prev(t_prev, t, self.num_timesteps)
        eta = check_number("eta", eta, minimum=0.0)
        model_output, guidance_scale = samplers.loops.guided_call(denoise_model, x_t, t, y, guidance_scale)
        noise = None if eta == 0.0 else noise  # sigma = 0: a deterministic step draws nothing
        return samplers.step(self, model_output, x_t, torch.arange(x_t.shape[0], device=x_t.device),
                             samplers.loops.ddim_step_rows(self, t, t_prev, eta), noise=noise, generator=generator,
                             clip_denoised=clip_denoised, guidance_scale=guidance_scale)

    def ddim_sample_loop(self, denoise_model, shape, **options):
        """DDIM sampling over ``num_steps`` timesteps (eta = 0: deterministic); see ``samplers.sample_ddim``."""
        return samplers.sample_ddim(self, denoise_model, shape, **options)

    def dpm_solver_plan(self, num_steps=20, **options):
        """(timesteps [N], float64 rows [N, 8] of the sampler step) of a DPM-Solver++ loop."""
        timesteps, rows = samplers.dpm_solver_plan(self, num_steps, self.sampler_defaults.with_options(**options))
        return torch.tensor(timesteps, dtype=torch.int64), rows

    def dpm_solver_sample_loop(self, denoise_model, shape, **options):
        """DPM-Solver++ (Lu et al. 2022), orders 1-3, ODE or SDE; see ``samplers.sample_dpm_solver``."""
        return samplers.sample_dpm_solver(self, denoise_model, shape, **options)

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
        check_model(denoise_model)
        check_batched("x_start", x_start)
        check_generator(generator, x_start.device)
        clip_denoised = check_bool("clip_denoised", self._default("clip_denoised", clip_denoised))
        batch = x_start.shape[0]
        vb = x_start.new_zeros(batch, self.num_timesteps, dtype=torch.float32)
        xstart_mse, mse = torch.zeros_like(vb), torch.zeros_like(vb)
        for i in tqdm(range(self.num_timesteps - 1, -1, -1), disable=not progress, desc="bits/dim"):
            t = torch.full((batch,), i, device=x_start.device, dtype=torch.long)
            noise = torch.empty_like(x_start).normal_(generator=generator)
            x_t = self._q_sample_with_noise(x_start, t, noise)[0]
            terms, pred_xstart = self._vb_terms_bpd(samplers.call_model(denoise_model, x_t, t), x_start, x_t, t,
                                                    clip_denoised)
            vb[:, i] = terms
            xstart_mse[:, i] = mean_flat((pred_xstart - x_start) ** 2)
            mse[:, i] = mean_flat((self._noise_from_start(x_t, t, pred_xstart) - noise) ** 2)
        prior = self.prior_bpd(x_start)
        return {"total_bpd": vb.sum(dim=1) + prior, "prior_bpd": prior, "vb": vb, "xstart_mse": xstart_mse,
                "mse": mse}

    def __repr__(self):
        return (f"GaussianDiffusion(num_timesteps={self.num_timesteps}, schedule={self.schedule!r}, "
                f"prediction_type={self.prediction_type!r}, variance_type={self.variance_type!r}, "
                f"backend={self._backend!r}, device={self.device})")


__all__ = ["GaussianDiffusion", "SamplerDefaults", "LOSS_TYPES"]
