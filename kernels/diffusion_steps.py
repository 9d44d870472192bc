"""Triton kernel of q_sample: one pass over memory.

Semantics, table layout and the in-kernel noise contract are those of ``ddpm_fast.reference``::

    x_t = table[t, 0] * x_start + table[t, 1] * z

with ``t = t[b]`` for the batch element b of each element; z is the given noise or Philox noise
drawn in-kernel from the one-element seed tensor (and then returned). Layout, dtypes, 64-bit
offsets and the device-side range check of t: ``kernels._common``. The sampler step is in
``kernels.sampler_step``.
"""

import torch
import triton
import triton.language as tl

from ..ops._common import check_seed, check_table
from ._common import (
    NOISE_DRAWN,
    NOISE_GIVEN,
    check_index,
    check_input,
    check_same,
    coef,
    launch,
    noise_block,
    round_to,
    table_rows,
)

Q_SAMPLE_COLUMNS = 2


@triton.jit
def _q_sample_kernel(x_ptr, noise_ptr, seed_ptr, t_ptr, table_ptr, out_ptr, drawn_ptr,
                     numel, per_batch, batch, num_t,
                     NOISE: tl.constexpr, FEW_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    t_a, t_b, use_b = table_rows(t_ptr, offs, start, per_batch, batch, num_t, FEW_ROWS)
    sqrt_abar = coef(table_ptr, t_a, t_b, use_b, 0, 2, FEW_ROWS)
    sqrt_one_minus_abar = coef(table_ptr, t_a, t_b, use_b, 1, 2, FEW_ROWS)

    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    z = noise_block(noise_ptr, seed_ptr, offs, mask, start, NOISE, BLOCK)
    if NOISE == 2:
        # x_t is computed from the noise as returned (rounded to x's dtype), so the pair
        # (x_t, noise) is exactly consistent as a p_losses input and target.
        z_out = round_to(z, drawn_ptr.dtype.element_ty)
        tl.store(drawn_ptr + offs, z_out, mask=mask)
        z = z_out.to(tl.float32)
    x_t = sqrt_abar * x + sqrt_one_minus_abar * z
    tl.store(out_ptr + offs, round_to(x_t, out_ptr.dtype.element_ty), mask=mask)


def q_sample(x_start, t, table, noise, seed):
    """(x_t, drawn noise): x_t = table[t, 0] * x_start + table[t, 1] * z in one pass.

    Exactly one of ``noise`` (given z) and ``seed`` (one-element int64 tensor: z drawn
    in-kernel and returned with x_start's dtype and strides) must be given; with given noise
    the second output is an empty [0] tensor.
    """
    check_input("x_start", x_start)
    t = check_index(t, x_start, "t")
    table = check_table(table, Q_SAMPLE_COLUMNS, x_start.device)
    if (noise is None) == (seed is None):
        raise ValueError("q_sample takes exactly one of noise (given z) and seed (z drawn in-kernel)")
    out = torch.empty_like(x_start)
    if noise is not None:
        check_same("noise", noise, "x_start", x_start)
        drawn, mode = x_start.new_empty((0,)), NOISE_GIVEN
    else:
        check_seed(seed, x_start.device)
        drawn, mode = torch.empty_like(x_start), NOISE_DRAWN
    if x_start.numel():
        launch(_q_sample_kernel, x_start, table.shape[0], x_start, noise, seed, t, table, out, drawn, NOISE=mode)
    return out, drawn
