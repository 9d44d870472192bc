"""Pure-PyTorch reference of every fused op: the oracle the kernels are tested against.

Each function computes in the dtype of its inputs (call it with float64 tensors for the exact
value) and has the same signature and meaning as the fused op of the same name. The kernels
know nothing of schedules: the diffusion layer turns a schedule into per-timestep coefficient
tables (``ddpm_fast.schedules``) and the ops read row ``t[b]`` of the table for batch element b.

Coefficient tables (float32, shape [T, K], contiguous):

* q_sample, K = 2: ``x_t = table[t, 0] * x_start + table[t, 1] * eps``
  (``sqrt(abar_t)``, ``sqrt(1 - abar_t)``).
* the sampler step, K = 8: one step of every sampler (DDPM, DDIM, DPM-Solver++ 1/2/3M and its
  SDE form, each optionally with classifier-free guidance), row ``index[b]`` for batch element b::

      m     = model_output[b]                                  # unguided: model_output is [B, ...]
      m     = m_u + table[i, GUIDANCE_SCALE] * (m_c - m_u)      # guided: model_output is [2B, ...],
                                                               # m_c = model_output[b], m_u = model_output[B + b]
      x0    = table[i, X0_FROM_X] * x + table[i, X0_FROM_MODEL] * m
      x0    = clamp(x0, -1, 1)                                 # only with clip_denoised
      x_out = table[i, OUT_FROM_X] * x + table[i, OUT_FROM_X0] * x0
              + table[i, OUT_FROM_H1] * h1 + table[i, OUT_FROM_H2] * h2 + table[i, OUT_FROM_Z] * z

  h1 and h2 are earlier x0 predictions (multistep solvers; absent means 0), z the noise (given,
  drawn in-kernel from a seed, or 0). The step returns x_out and, when asked (``store_x0``), the
  x0 it used: the next step's h1. The samplers (``ddpm_fast.samplers``) build these rows in
  float64, once per loop.
* the legacy step tables of ``ops.reverse_step`` / ``ops.ddim_step`` / ``ops.dpm_solver_step``,
  K = 5 (columns LEGACY_*): ``x0 = A x + B m``, ``out = P x0 + Q x + S z`` (for the DPM-Solver++
  step, S weights the previous x0); :func:`sampler_table_from_legacy` maps them onto the sampler
  step.

In-kernel noise (every backend draws the same numbers): for a one-element int64 ``seed``
tensor and the element at linear storage index ``i`` (batch-outermost dense layout),
Philox4x32-10 with key ``(lo32(seed), hi32(seed))`` and counter ``(lo32(i >> 2),
hi32(i >> 2), 0, 0)`` gives four uint32 ``r0..r3``; ``u_j = ((r_j >> 8) + 0.5) * 2**-24``;
Box-Muller gives ``n0, n1 = sqrt(-2 ln u0) * (cos, sin)(2 pi u1)`` and ``n2, n3`` likewise
from ``u2, u3``; the element takes ``n_(i & 3)``.
"""

import math

import torch
import torch.nn.functional as F

# Columns of the q_sample table.
SQRT_ALPHAS_CUMPROD, SQRT_ONE_MINUS_ALPHAS_CUMPROD = 0, 1
Q_SAMPLE_COLUMNS = 2
# Columns of the sampler-step table.
X0_FROM_X, X0_FROM_MODEL, GUIDANCE_SCALE, OUT_FROM_X, OUT_FROM_X0, OUT_FROM_H1, OUT_FROM_H2, OUT_FROM_Z = range(8)
SAMPLER_STEP_COLUMNS = 8
# Columns of the legacy [T, 5] tables of reverse_step / ddim_step / dpm_solver_step.
LEGACY_X0_FROM_XT, LEGACY_X0_FROM_MODEL, LEGACY_OUT_FROM_X0, LEGACY_OUT_FROM_XT, LEGACY_SIGMA = range(5)
LEGACY_STEP_COLUMNS = 5

PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF


def _rows(table, t, x):
    """table[t] as [B, K] in x's dtype, shaped to broadcast column by column over x."""
    rows = table.index_select(0, t).to(x.dtype)
    return [rows[:, k].reshape(-1, *([1] * (x.dim() - 1))) for k in range(table.shape[1])]


def q_sample(x_start, t, table, noise):
    """x_t = sqrt(abar_t) * x_start + sqrt(1 - abar_t) * noise."""
    a, s = _rows(table, t, x_start)
    return a * x_start + s * noise


def guided_model_output(model_output, batch, guidance_scale):
    """m_u + s (m_c - m_u) for a [2B, ...] model output (cond first, then uncond), else the output itself."""
    if model_output.shape[0] == batch:
        return model_output
    cond, uncond = model_output[:batch], model_output[batch:]
    return uncond + guidance_scale * (cond - uncond)


def sampler_step(x, model_output, index, table, clip_denoised=False, h1=None, h2=None, noise=None, store_x0=True):
    """One sampler step from the sampler-step table; returns (x_out, x0).

    ``model_output`` is [B, ...] or, guided, [2B, ...] (cond first); h1, h2 and noise are
    None for 0. x0 is an empty tensor unless ``store_x0``.
    """
    (x0_from_x, x0_from_model, guidance_scale, out_from_x, out_from_x0, out_from_h1, out_from_h2,
     out_from_z) = _rows(table, index, x)
    m = guided_model_output(model_output, x.shape[0], guidance_scale)
    x0 = x0_from_x * x + x0_from_model * m
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
    out = out_from_x * x + out_from_x0 * x0
    for weight, term in ((out_from_h1, h1), (out_from_h2, h2), (out_from_z, noise)):
        if term is not None:
            out = out + weight * term
    return out, (x0 if store_x0 else x.new_empty((0,)))


def sampler_table_from_legacy(table, previous_x0=False):
    """A [T, 8] sampler-step table from a legacy [T, 5] one (S weights z, or h1 with previous_x0)."""
    out = table.new_zeros(table.shape[0], SAMPLER_STEP_COLUMNS)
    out[:, X0_FROM_X] = table[:, LEGACY_X0_FROM_XT]
    out[:, X0_FROM_MODEL] = table[:, LEGACY_X0_FROM_MODEL]
    out[:, GUIDANCE_SCALE] = 1.0
    out[:, OUT_FROM_X] = table[:, LEGACY_OUT_FROM_XT]
    out[:, OUT_FROM_X0] = table[:, LEGACY_OUT_FROM_X0]
    out[:, OUT_FROM_H1 if previous_x0 else OUT_FROM_Z] = table[:, LEGACY_SIGMA]
    return out


def legacy_table(table, previous_x0=False):
    """A legacy [T, 5] table from a [T, 8] sampler-step table without guidance or a second history term."""
    z = OUT_FROM_H1 if previous_x0 else OUT_FROM_Z
    return table[:, [X0_FROM_X, X0_FROM_MODEL, OUT_FROM_X0, OUT_FROM_X, z]]


def group_norm_silu(x, weight, bias, num_groups, eps=1e-5):
    """y = silu(group_norm(x)): the eager two-op expression the fused kernel replaces."""
    return F.silu(F.group_norm(x, num_groups, weight, bias, eps))


def group_norm_silu_stats(x, num_groups, eps=1e-5):
    """Per (sample, group) mean and 1/sqrt(var + eps), biased variance, as [N, G] float32."""
    xg = x.reshape(x.shape[0], num_groups, -1).double()
    mean = xg.mean(dim=-1)
    var = ((xg - mean[..., None]) ** 2).mean(dim=-1)
    return mean.float(), torch.rsqrt(var + eps).float()


# ----------------------------------------------------------------------------- Philox noise

def _mulhilo32(a, b):
    """(hi, lo) 32-bit halves of the 64-bit product of two uint32 held in int64 tensors."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    mid = a_hi * b_lo + a_lo * b_hi  # < 2**33: no int64 overflow anywhere below
    low = a_lo * b_lo + ((mid & 0xFFFF) << 16)
    hi = a_hi * b_hi + (mid >> 16) + (low >> 32)
    return hi & _MASK32, low & _MASK32


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (Salmon et al. 2011) on uint32 values held in int64 tensors."""
    for round_index in range(PHILOX_ROUNDS):
        if round_index:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(torch.full_like(c0, PHILOX_M0), c0)
        hi1, lo1 = _mulhilo32(torch.full_like(c2, PHILOX_M1), c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox_normal(seed, numel, device="cpu"):
    """The standard normals the kernels draw for elements 0..numel-1 (float32)."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    k0, k1 = seed & _MASK32, seed >> 32
    groups = (numel + 3) // 4
    counter = torch.arange(groups, dtype=torch.int64, device=device)
    zeros = torch.zeros_like(counter)
    r = philox4x32_10(counter & _MASK32, counter >> 32, zeros, zeros, k0, k1)
    u = [((rj >> 8).to(torch.float32) + 0.5) * 2.0**-24 for rj in r]
    normals = []
    for u_a, u_b in ((u[0], u[1]), (u[2], u[3])):
        radius = torch.sqrt(-2.0 * torch.log(u_a))
        theta = (2.0 * math.pi) * u_b
        normals += [radius * torch.cos(theta), radius * torch.sin(theta)]
    return torch.stack(normals, dim=1).reshape(-1)[:numel]


def philox_normal_like(x, seed):
    """philox_normal laid out in x's memory order (the order the kernels index storage in)."""
    flat = philox_normal(seed, x.numel(), x.device)
    out = torch.empty_like(x, dtype=torch.float32)
    # empty_like keeps x's dense strides; write the values in storage order.
    out.as_strided((x.numel(),), (1,)).copy_(flat)
    return out
