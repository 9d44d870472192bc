"""Bad input: every public entry point rejects it the same way on every backend.

One table of cases. Each runs on every backend available here (plain PyTorch included) and
must raise the expected exception type with a message that names the argument; a case that
computes something instead fails.
"""

import math
import re

import pytest
import torch

from conftest import backend_params
from ddpm_fast import GaussianDiffusion, SamplerDefaults, ops
from ddpm_fast.ema import EMA
from ddpm_fast.nn import GroupNormSiLU, UNet

T = 10


def _x(device, shape=(2, 3, 4, 4), dtype=torch.float32):
    return torch.randn(shape, device=device, dtype=dtype)


def _t(device, *values):
    return torch.tensor(values or (1, 7), device=device)


def _model(x, t):
    return 0.1 * x


def _diffusion(backend):
    return GaussianDiffusion(num_timesteps=T, backend=backend)


def _table(device, columns=5, rows=T):
    return torch.rand(rows, columns, device=device)


def _seed(device):
    return torch.tensor([7], device=device)


# (id, argument named in the message, exception type, call(backend, device))
CASES = [
    # --------------------------------------------------------------- GaussianDiffusion: forward process
    ("q_sample noise of batch 1", "noise", ValueError,
     lambda b, dev: _diffusion(b).q_sample(_x(dev), _t(dev), noise=_x(dev, (1, 3, 4, 4)))),
    ("q_sample noise [B, C, 1, 1]", "noise", ValueError,
     lambda b, dev: _diffusion(b).q_sample(_x(dev), _t(dev), noise=_x(dev, (2, 3, 1, 1)))),
    ("q_sample noise of another dtype", "noise", TypeError,
     lambda b, dev: _diffusion(b).q_sample(_x(dev), _t(dev), noise=_x(dev, dtype=torch.float64))),
    ("q_sample integer x_start", "x_start", TypeError,
     lambda b, dev: _diffusion(b).q_sample(torch.ones(2, 3, dtype=torch.long, device=dev), _t(dev))),
    ("q_sample x_start not a tensor", "x_start", TypeError,
     lambda b, dev: _diffusion(b).q_sample([[0.0, 1.0], [2.0, 3.0]], _t(dev))),
    ("q_sample scalar x_start", "x_start", ValueError,
     lambda b, dev: _diffusion(b).q_sample(torch.tensor(1.0, device=dev), _t(dev, 1))),
    ("q_sample float t", "t", TypeError,
     lambda b, dev: _diffusion(b).q_sample(_x(dev), torch.tensor([1.0, 2.0], device=dev))),
    ("q_sample t of the wrong length", "t", ValueError,
     lambda b, dev: _diffusion(b).q_sample(_x(dev), _t(dev, 1, 2, 3))),
    ("q_sample t = T", "t", ValueError,
     lambda b, dev: _diffusion(b).q_sample(_x(dev), _t(dev, 1, T))),
    ("q_sample negative t", "t", ValueError,
     lambda b, dev: _diffusion(b).q_sample(_x(dev), _t(dev, -1, 2))),
    ("q_mean_variance t as an int", "t", TypeError,
     lambda b, dev: _diffusion(b).q_mean_variance(_x(dev), 3)),
    ("q_posterior x_start of another shape", "x_start", ValueError,
     lambda b, dev: _diffusion(b).q_posterior_mean_variance(_x(dev, (1, 3, 4, 4)), _x(dev), _t(dev))),
    ("predict_start_from_noise noise [B, 1, 1, 1]", "noise", ValueError,
     lambda b, dev: _diffusion(b).predict_start_from_noise(_x(dev), _t(dev), _x(dev, (2, 1, 1, 1)))),
    ("training_target noise of another dtype", "noise", TypeError,
     lambda b, dev: _diffusion(b).training_target(_x(dev), _t(dev), _x(dev, dtype=torch.float16))),
    # --------------------------------------------------------------- training loss
    ("p_losses noise [B, C, 1, 1]", "noise", ValueError,
     lambda b, dev: _diffusion(b).p_losses(_model, _x(dev), _t(dev), noise=_x(dev, (2, 3, 1, 1)))),
    ("p_losses unknown loss_type", "loss_type", ValueError,
     lambda b, dev: _diffusion(b).p_losses(_model, _x(dev), _t(dev), loss_type="huber")),
    ("p_losses model not callable", "denoise_model", TypeError,
     lambda b, dev: _diffusion(b).p_losses("unet", _x(dev), _t(dev))),
    ("p_losses model output of another shape", "denoise_model", ValueError,
     lambda b, dev: _diffusion(b).p_losses(lambda x, t: x[:, :1], _x(dev), _t(dev))),
    # --------------------------------------------------------------- reverse process
    ("p_sample noise of batch 1", "noise", ValueError,
     lambda b, dev: _diffusion(b).p_sample(_model, _x(dev), _t(dev), noise=_x(dev, (1, 3, 4, 4)))),
    ("p_sample clip_denoised not a bool", "clip_denoised", TypeError,
     lambda b, dev: _diffusion(b).p_sample(_model, _x(dev), _t(dev), clip_denoised="yes")),
    ("p_sample generator of the wrong type", "generator", TypeError,
     lambda b, dev: _diffusion(b).p_sample(_model, _x(dev), _t(dev), generator=0)),
    ("reverse_step model_output [B, C, 1, 1]", "model_output", ValueError,
     lambda b, dev: _diffusion(b).reverse_step(_x(dev, (2, 3, 1, 1)), _x(dev), _t(dev))),
    ("reverse_step model_output of another dtype", "model_output", TypeError,
     lambda b, dev: _diffusion(b).reverse_step(_x(dev, dtype=torch.float16), _x(dev), _t(dev))),
    ("p_mean_variance model output of another shape", "denoise_model", ValueError,
     lambda b, dev: _diffusion(b).p_mean_variance(lambda x, t: x.sum(1), _x(dev), _t(dev))),
    ("p_sample_loop shape with a negative size", "shape", ValueError,
     lambda b, dev: _diffusion(b).p_sample_loop(_model, (2, -3, 4, 4))),
    ("p_sample_loop shape as an int", "shape", TypeError,
     lambda b, dev: _diffusion(b).p_sample_loop(_model, 16)),
    ("p_sample_loop x_T of another shape", "x_T", ValueError,
     lambda b, dev: _diffusion(b).p_sample_loop(_model, (2, 3, 4, 4), x_T=_x(dev, (2, 3, 4, 5)))),
    ("score t out of range", "t", ValueError,
     lambda b, dev: _diffusion(b).score(_model, _x(dev), _t(dev, 0, 99))),
    # --------------------------------------------------------------- DDIM
    ("ddim_sample t_prev >= t", "t_prev", ValueError,
     lambda b, dev: _diffusion(b).ddim_sample(_model, _x(dev), _t(dev, 5, 5), _t(dev, 2, 5))),
    ("ddim_sample t_prev below -1", "t_prev", ValueError,
     lambda b, dev: _diffusion(b).ddim_sample(_model, _x(dev), _t(dev, 5, 5), _t(dev, 2, -2))),
    ("ddim_sample negative eta", "eta", ValueError,
     lambda b, dev: _diffusion(b).ddim_sample(_model, _x(dev), _t(dev, 5, 5), _t(dev, 2, 2), eta=-1.0)),
    ("ddim_sample NaN eta", "eta", ValueError,
     lambda b, dev: _diffusion(b).ddim_sample(_model, _x(dev), _t(dev, 5, 5), _t(dev, 2, 2), eta=math.nan)),
    ("ddim_sample noise [B, C, 1, 1]", "noise", ValueError,
     lambda b, dev: _diffusion(b).ddim_sample(_model, _x(dev), _t(dev, 5, 5), _t(dev, 2, 2), eta=1.0,
                                              noise=_x(dev, (2, 3, 1, 1)))),
    ("ddim_sample_loop num_steps 0", "num_steps", ValueError,
     lambda b, dev: _diffusion(b).ddim_sample_loop(_model, (1, 3, 4, 4), num_steps=0)),
    ("ddim_sample_loop unknown spacing", "spacing", ValueError,
     lambda b, dev: _diffusion(b).ddim_sample_loop(_model, (1, 3, 4, 4), num_steps=5, spacing="log")),
    # --------------------------------------------------------------- DPM-Solver++
    ("dpm_solver order 4", "order", ValueError,
     lambda b, dev: _diffusion(b).dpm_solver_sample_loop(_model, (1, 3, 4, 4), num_steps=5, order=4)),
    ("dpm_solver num_steps above T", "num_steps", ValueError,
     lambda b, dev: _diffusion(b).dpm_solver_sample_loop(_model, (1, 3, 4, 4), num_steps=T + 1)),
    ("dpm_solver num_steps with repeated timesteps", "num_steps", ValueError,
     lambda b, dev: _diffusion(b).dpm_solver_sample_loop(_model, (1, 3, 4, 4), num_steps=T)),
    ("dpm_solver integer x_T", "x_T", TypeError,
     lambda b, dev: _diffusion(b).dpm_solver_sample_loop(_model, (1, 3), num_steps=5,
                                                         x_T=torch.ones(1, 3, dtype=torch.long, device=dev))),
    ("dpm_solver karras_sigmas not a bool", "karras_sigmas", TypeError,
     lambda b, dev: _diffusion(b).dpm_solver_sample_loop(_model, (1, 3), num_steps=5, karras_sigmas="yes")),
    # --------------------------------------------------------------- variational bound
    ("calc_bpd_loop integer x_start", "x_start", TypeError,
     lambda b, dev: _diffusion(b).calc_bpd_loop(_model, torch.zeros(2, 3, dtype=torch.uint8, device=dev))),
    # --------------------------------------------------------------- construction
    ("beta_start above beta_end", "beta_start", ValueError,
     lambda b, dev: GaussianDiffusion(beta_start=0.02, beta_end=0.01, backend=b)),
    ("beta = 1", "betas", ValueError, lambda b, dev: GaussianDiffusion(betas=[0.1, 1.0], backend=b)),
    ("betas not 1-D", "betas", ValueError, lambda b, dev: GaussianDiffusion(betas=[[0.1, 0.2]], backend=b)),
    ("NaN beta", "betas", ValueError, lambda b, dev: GaussianDiffusion(betas=[0.1, math.nan], backend=b)),
    ("fractional num_timesteps", "num_timesteps", ValueError,
     lambda b, dev: GaussianDiffusion(num_timesteps=2.5, backend=b)),
    ("unknown prediction_type", "prediction_type", ValueError,
     lambda b, dev: GaussianDiffusion(prediction_type="score", backend=b)),
    ("unknown sampler spacing", "spacing", ValueError, lambda b, dev: SamplerDefaults(spacing="cosine")),
    ("sampler_defaults of the wrong type", "sampler_defaults", TypeError,
     lambda b, dev: GaussianDiffusion(sampler_defaults={"order": 1}, backend=b)),
    # --------------------------------------------------------------- fused ops
    ("ops.q_sample noise [B, C, 1, 1]", "noise", ValueError,
     lambda b, dev: ops.q_sample(_x(dev), _t(dev), _table(dev, 2), noise=_x(dev, (2, 3, 1, 1)), backend=b)),
    ("ops.q_sample without noise or seed", "noise", ValueError,
     lambda b, dev: ops.q_sample(_x(dev), _t(dev), _table(dev, 2), backend=b)),
    ("ops.q_sample float seed", "seed", TypeError,
     lambda b, dev: ops.q_sample(_x(dev), _t(dev), _table(dev, 2), seed=torch.tensor([1.0], device=dev), backend=b)),
    ("ops.reverse_step model_output of batch 1", "model_output", ValueError,
     lambda b, dev: ops.reverse_step(_x(dev), _x(dev, (1, 3, 4, 4)), _t(dev), _table(dev), backend=b)),
    ("ops.reverse_step table with 4 columns", "table", ValueError,
     lambda b, dev: ops.reverse_step(_x(dev), _x(dev), _t(dev), _table(dev, 4), backend=b)),
    ("ops.reverse_step float64 table", "table", TypeError,
     lambda b, dev: ops.reverse_step(_x(dev), _x(dev), _t(dev), _table(dev).double(), backend=b)),
    ("ops.ddim_step clip_denoised as an int", "clip_denoised", TypeError,
     lambda b, dev: ops.ddim_step(_x(dev), _x(dev), _t(dev), _table(dev), clip_denoised=1, backend=b)),
    ("ops.dpm_solver_step x0_prev [B, C, 1, 1]", "x0_prev", ValueError,
     lambda b, dev: ops.dpm_solver_step(_x(dev), _x(dev), _x(dev, (2, 3, 1, 1)), _t(dev), _table(dev), backend=b)),
    ("ops.dpm_solver_step index out of range", "index", ValueError,
     lambda b, dev: ops.dpm_solver_step(_x(dev), _x(dev), None, _t(dev, 0, T), _table(dev), backend=b)),
    ("ops.group_norm_silu num_groups not dividing C", "num_groups", ValueError,
     lambda b, dev: ops.group_norm_silu(_x(dev, (2, 6, 4, 4)), num_groups=4, backend=b)),
    ("ops.group_norm_silu negative eps", "eps", ValueError,
     lambda b, dev: ops.group_norm_silu(_x(dev, (2, 6, 4, 4)), num_groups=3, eps=-1e-5, backend=b)),
    ("ops.group_norm_silu weight of another length", "weight", ValueError,
     lambda b, dev: ops.group_norm_silu(_x(dev, (2, 6, 4, 4)), torch.ones(5, device=dev), num_groups=3, backend=b)),
    # --------------------------------------------------------------- modules
    ("GroupNormSiLU negative eps", "eps", ValueError, lambda b, dev: GroupNormSiLU(8, 32, eps=-1.0, backend=b)),
    ("GroupNormSiLU num_groups 0", "num_groups", ValueError, lambda b, dev: GroupNormSiLU(0, 32, backend=b)),
    ("GroupNormSiLU input of other channels", "x", ValueError,
     lambda b, dev: GroupNormSiLU(4, 8, backend=b).to(dev)(_x(dev, (2, 4, 3, 3)))),
    ("UNet input of other channels", "x", ValueError,
     lambda b, dev: UNet.from_preset("digits", backend=b).to(dev)(_x(dev, (2, 3, 8, 8)), _t(dev))),
    ("EMA decay 1", "decay", ValueError, lambda b, dev: EMA(torch.nn.Linear(2, 2), decay=1.0)),
]


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_rejected_naming_the_argument(case, backend, device):
    _, argument, error_type, call = case
    with pytest.raises((TypeError, ValueError)) as info:
        call(backend, device)
    assert info.type is error_type, f"raised {info.type.__name__}, expected {error_type.__name__}: {info.value}"
    assert re.search(rf"(?<![\w.]){re.escape(argument)}(?!\w)", str(info.value)), \
        f"the message does not name {argument!r}: {info.value}"


def test_the_table_is_large_enough():
    assert len(CASES) >= 40 and len({case[0] for case in CASES}) == len(CASES)
