"""Triton kernel of the sampler step: one step of every sampler in one pass over memory.

The arithmetic is ``reference.sampler_step``, term for term and in the same order (for row
i = index[b] of the float32 [R, 8] table; columns in ``ddpm_fast.reference``)::

    m     = m_c, or m_u + s (m_c - m_u) when guided       (s = table[i, GUIDANCE_SCALE])
    x0    = A x + B m                                      (clamped to [-1, 1] with CLIP)
    x_out = C x + D x0 + E h1 + F h2 + G z

The kernel is specialised (constexprs) on what is present: guidance (a second, unconditional
model output), h1, h2, the noise (none, given, or Philox noise drawn in-kernel from the seed
with the counters of ``kernels.philox``: element e of x's storage), clip and the x0 output. An
absent term costs neither a load nor its table column, so each call moves only the memory of
the step it stands for. Layout, dtypes, 64-bit offsets and the device-side index check:
``kernels._common``.
"""

import torch
import triton
import triton.language as tl

from ..ops._common import check_seed, check_table
from ..validation import check_bool
from ._common import (
    NOISE_DRAWN,
    NOISE_GIVEN,
    NOISE_NONE,
    check_index,
    check_input,
    check_same,
    coef,
    launch,
    noise_block,
    round_to,
    table_rows,
)

SAMPLER_STEP_COLUMNS = 8  # reference.SAMPLER_STEP_COLUMNS; columns 0-7 below as in reference


@triton.jit
def _sampler_step_kernel(x_ptr, cond_ptr, uncond_ptr, h1_ptr, h2_ptr, noise_ptr, seed_ptr, index_ptr, table_ptr,
                         out_ptr, x0_ptr, numel, per_batch, batch, num_rows,
                         GUIDED: tl.constexpr, HAS_H1: tl.constexpr, HAS_H2: tl.constexpr, NOISE: tl.constexpr,
                         CLIP: tl.constexpr, STORE_X0: tl.constexpr, FEW_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    row_a, row_b, use_b = table_rows(index_ptr, offs, start, per_batch, batch, num_rows, FEW_ROWS)

    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    m = tl.load(cond_ptr + offs, mask=mask).to(tl.float32)
    if GUIDED:
        m_u = tl.load(uncond_ptr + offs, mask=mask).to(tl.float32)
        m = m_u + coef(table_ptr, row_a, row_b, use_b, 2, 8, FEW_ROWS) * (m - m_u)
    x0_from_x = coef(table_ptr, row_a, row_b, use_b, 0, 8, FEW_ROWS)
    x0_from_model = coef(table_ptr, row_a, row_b, use_b, 1, 8, FEW_ROWS)
    x0 = x0_from_x * x + x0_from_model * m
    if CLIP:
        x0 = tl.clamp(x0, -1.0, 1.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as torch.clamp
    if STORE_X0:
        tl.store(x0_ptr + offs, round_to(x0, x0_ptr.dtype.element_ty), mask=mask)
    out_from_x = coef(table_ptr, row_a, row_b, use_b, 3, 8, FEW_ROWS)
    out_from_x0 = coef(table_ptr, row_a, row_b, use_b, 4, 8, FEW_ROWS)
    out = out_from_x * x + out_from_x0 * x0
    # Absent terms: no load, no table column (the reference adds nothing for them either).
    if HAS_H1:
        h1 = tl.load(h1_ptr + offs, mask=mask).to(tl.float32)
        out = out + coef(table_ptr, row_a, row_b, use_b, 5, 8, FEW_ROWS) * h1
    if HAS_H2:
        h2 = tl.load(h2_ptr + offs, mask=mask).to(tl.float32)
        out = out + coef(table_ptr, row_a, row_b, use_b, 6, 8, FEW_ROWS) * h2
    if NOISE != 0:
        z = noise_block(noise_ptr, seed_ptr, offs, mask, start, NOISE, BLOCK)
        out = out + coef(table_ptr, row_a, row_b, use_b, 7, 8, FEW_ROWS) * z
    tl.store(out_ptr + offs, round_to(out, out_ptr.dtype.element_ty), mask=mask)


def sampler_step(x, model_output, index, table, clip_denoised, h1, h2, noise, seed, store_x0):
    """(x_out, x0) of one sampler step in one pass; x0 is an empty [0] tensor unless ``store_x0``.

    ``model_output`` is [B, ...] with x's shape and strides or, guided, [2B, ...] whose two
    halves (conditional first) each have them. h1, h2 and noise (or a one-element int64 ``seed``
    to draw the noise in-kernel) are None when absent.
    """
    check_input("x", x)
    if not isinstance(model_output, torch.Tensor):
        raise TypeError(f"model_output must be a torch.Tensor, got {type(model_output).__name__}")
    batch = x.shape[0]
    guided = model_output.dim() == x.dim() and model_output.shape[0] == 2 * batch
    if not guided and model_output.shape != x.shape:
        raise ValueError(f"model_output must have the shape of x {list(x.shape)} or, guided, "
                         f"[{2 * batch}, {', '.join(map(str, x.shape[1:]))}], got {list(model_output.shape)}")
    cond, uncond = (model_output[:batch], model_output[batch:]) if guided else (model_output, None)
    check_same("model_output", cond, "x", x)
    if guided:
        check_same("model_output (its unconditional half)", uncond, "x", x)
    index = check_index(index, x, "index")
    table = check_table(table, SAMPLER_STEP_COLUMNS, x.device)
    for name, term in (("h1", h1), ("h2", h2), ("noise", noise)):
        if term is not None:
            check_same(name, term, "x", x)
    if noise is not None and seed is not None:
        raise ValueError("give at most one of noise (given z) and seed (z drawn in-kernel)")
    if seed is not None:
        check_seed(seed, x.device)
    check_bool("clip_denoised", clip_denoised)
    check_bool("store_x0", store_x0)
    out = torch.empty_like(x)
    x0 = torch.empty_like(x) if store_x0 else x.new_empty((0,))
    mode = NOISE_GIVEN if noise is not None else NOISE_DRAWN if seed is not None else NOISE_NONE
    if x.numel():
        launch(_sampler_step_kernel, x, table.shape[0], x, cond, uncond, h1, h2, noise, seed, index, table, out,
               x0 if store_x0 else None, GUIDED=guided, HAS_H1=h1 is not None, HAS_H2=h2 is not None, NOISE=mode,
               CLIP=clip_denoised, STORE_X0=store_x0)
    return out, x0
