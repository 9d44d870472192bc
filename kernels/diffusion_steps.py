"""Triton kernels of q_sample and the reverse / DDIM / DPM-Solver++ step: one pass over memory each.

Semantics, table layout and the in-kernel noise contract are those of ``ddpm_fast.reference``:

    q_sample:  x_t   = table[t, 0] * x_start + table[t, 1] * z
    step:      x0    = table[t, 0] * x_t + table[t, 1] * model_output   (clamped to [-1, 1] if clip)
               x_tm1 = table[t, 2] * x0 + table[t, 3] * x_t + table[t, 4] * z

with ``t = t[b]`` for the batch element b = storage index // (numel // batch). z is the given
noise, Philox noise drawn in-kernel from the one-element seed tensor, or 0 (no RNG work at all).
The DPM-Solver++ step is the step kernel with the previous x0 as the given z (or z = 0) and
the new x0 stored as a second output.

The kernels walk storage linearly (inputs are batch-dense: contiguous or channels_last with the
batch outermost, and all share one set of strides), load fp32/fp16/bf16, compute in fp32 and
store in the input dtype. Offsets are int64. The launchers check these preconditions and raise
a ValueError/TypeError naming the argument.

Out-of-range timesteps: the index used to load a table row is always clamped to [0, T), so no
load is ever out of bounds, and the kernels check ``0 <= t < T`` with ``tl.device_assert``
without any host sync. The launchers compile that assert in (``debug=True``), so on CUDA an
out-of-range t stops the kernel with a device-side assert, like ``torch.index_select`` does.
(The Triton interpreter skips device asserts; the ``ddpm_fast.ops`` front ends check the range
of CPU timesteps on the host.)
"""

import contextlib
import os

import torch
import triton
import triton.language as tl

from ..ops._common import is_batch_dense
from ..validation import check_like
from .philox import philox_normal_block

# Memory-bound: 2048 elements per program over 8 warps is 8 elements per thread, two 16-byte
# loads per fp32 input in flight, and 2 Philox counters per thread when noise is drawn (about
# 40 registers on sm_90, no spills: high occupancy to hide the latency of the loads).
BLOCK = 2048
NUM_WARPS = 8
# Compile options of every launch on a GPU (the interpreter takes none): debug=True compiles the
# t-range device assert in; overflow checks stay off, since Philox relies on uint32 arithmetic
# wrapping.
GPU_OPTIONS = dict(num_warps=NUM_WARPS, debug=True, sanitize_overflow=False)

NOISE_NONE, NOISE_GIVEN, NOISE_DRAWN = 0, 1, 2
Q_SAMPLE_COLUMNS, STEP_COLUMNS = 2, 5
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# ----------------------------------------------------------------------------- device code


@triton.jit
def _timestep_rows(t_ptr, offs, start, per_batch, batch, num_t, FEW_ROWS: tl.constexpr):
    """The table row of every element, as (row_a, row_b, use_b), with rows clamped to [0, T).

    FEW_ROWS (per_batch >= BLOCK): the block spans at most two batch elements, so two scalar
    rows and a per-element select replace a per-element division and gather. Otherwise every
    element divides its own offset (small images only) and row_b / use_b are unused.
    """
    if FEW_ROWS:
        b_a = start // per_batch
        b_b = tl.minimum(b_a + 1, batch - 1)
        t_a = tl.load(t_ptr + b_a).to(tl.int64)
        t_b = tl.load(t_ptr + b_b).to(tl.int64)
        tl.device_assert((t_a >= 0) & (t_a < num_t) & (t_b >= 0) & (t_b < num_t), "t out of range [0, T)")
        use_b = offs >= (b_a + 1) * per_batch
    else:
        b = tl.minimum(offs // per_batch, batch - 1)  # masked tail lanes read the last row
        t_a = tl.load(t_ptr + b).to(tl.int64)
        tl.device_assert((t_a >= 0) & (t_a < num_t), "t out of range [0, T)")
        t_b = t_a
        use_b = False
    t_a = tl.minimum(tl.maximum(t_a, 0), num_t - 1)
    t_b = tl.minimum(tl.maximum(t_b, 0), num_t - 1)
    return t_a, t_b, use_b


@triton.jit
def _coef(table_ptr, t_a, t_b, use_b, COLUMN: tl.constexpr, COLUMNS: tl.constexpr, FEW_ROWS: tl.constexpr):
    """table[t, COLUMN] for every element (fp32)."""
    if FEW_ROWS:
        return tl.where(use_b, tl.load(table_ptr + t_b * COLUMNS + COLUMN), tl.load(table_ptr + t_a * COLUMNS + COLUMN))
    else:
        return tl.load(table_ptr + t_a * COLUMNS + COLUMN)


@triton.jit
def _noise(noise_ptr, seed_ptr, offs, mask, start, NOISE: tl.constexpr, BLOCK: tl.constexpr):
    """z in fp32: given (NOISE_GIVEN = 1), drawn in-kernel (NOISE_DRAWN = 2: Philox, in storage
    index order) or 0 (NOISE_NONE = 0)."""
    if NOISE == 1:
        return tl.load(noise_ptr + offs, mask=mask).to(tl.float32)
    elif NOISE == 2:
        return philox_normal_block(seed_ptr, start, BLOCK)
    else:
        return 0.0


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    """fp32 -> dtype, rounded to nearest even.

    bfloat16 is rounded by hand on the bits, since the Triton interpreter truncates (and its
    optional rounding drops the carry into the exponent); a few integer ops, same on every target.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x != x, x.to(tl.bfloat16), rounded)  # NaN stays NaN
    else:
        return x.to(dtype)


@triton.jit
def _q_sample_kernel(x_ptr, noise_ptr, seed_ptr, t_ptr, table_ptr, out_ptr, drawn_ptr,
                     numel, per_batch, batch, num_t,
                     NOISE: tl.constexpr, FEW_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    t_a, t_b, use_b = _timestep_rows(t_ptr, offs, start, per_batch, batch, num_t, FEW_ROWS)
    sqrt_abar = _coef(table_ptr, t_a, t_b, use_b, 0, 2, FEW_ROWS)
    sqrt_one_minus_abar = _coef(table_ptr, t_a, t_b, use_b, 1, 2, FEW_ROWS)

    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    z = _noise(noise_ptr, seed_ptr, offs, mask, start, NOISE, BLOCK)
    if NOISE == 2:
        # x_t is computed from the noise as returned (rounded to x's dtype), so the pair
        # (x_t, noise) is exactly consistent as a p_losses input and target.
        z_out = _round_to(z, drawn_ptr.dtype.element_ty)
        tl.store(drawn_ptr + offs, z_out, mask=mask)
        z = z_out.to(tl.float32)
    x_t = sqrt_abar * x + sqrt_one_minus_abar * z
    tl.store(out_ptr + offs, _round_to(x_t, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _step_kernel(x_ptr, model_ptr, noise_ptr, seed_ptr, t_ptr, table_ptr, out_ptr,
                 numel, per_batch, batch, num_t,
                 CLIP: tl.constexpr, NOISE: tl.constexpr, FEW_ROWS: tl.constexpr, BLOCK: tl.constexpr,
                 x0_ptr=None, STORE_X0: tl.constexpr = False):
    """out (and, with STORE_X0, the clamped x0 at x0_ptr: the DPM-Solver++ step)."""
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    t_a, t_b, use_b = _timestep_rows(t_ptr, offs, start, per_batch, batch, num_t, FEW_ROWS)
    x0_from_xt = _coef(table_ptr, t_a, t_b, use_b, 0, 5, FEW_ROWS)
    x0_from_model = _coef(table_ptr, t_a, t_b, use_b, 1, 5, FEW_ROWS)
    out_from_x0 = _coef(table_ptr, t_a, t_b, use_b, 2, 5, FEW_ROWS)
    out_from_xt = _coef(table_ptr, t_a, t_b, use_b, 3, 5, FEW_ROWS)

    x_t = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    model_output = tl.load(model_ptr + offs, mask=mask).to(tl.float32)
    x0 = x0_from_xt * x_t + x0_from_model * model_output
    if CLIP:
        x0 = tl.clamp(x0, -1.0, 1.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as torch.clamp
    if STORE_X0:
        tl.store(x0_ptr + offs, _round_to(x0, x0_ptr.dtype.element_ty), mask=mask)
    out = out_from_x0 * x0 + out_from_xt * x_t
    if NOISE != 0:
        sigma = _coef(table_ptr, t_a, t_b, use_b, 4, 5, FEW_ROWS)
        out += sigma * _noise(noise_ptr, seed_ptr, offs, mask, start, NOISE, BLOCK)
    tl.store(out_ptr + offs, _round_to(out, out_ptr.dtype.element_ty), mask=mask)

# ----------------------------------------------------------------------------- launchers


def _interpreted():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check_input(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16 for the Triton kernels, got {x.dtype}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must have a non-empty batch dimension first, got shape {tuple(x.shape)}")
    if x.device.type != "cuda" and not (x.device.type == "cpu" and _interpreted()):
        raise ValueError(f"{name} must be a CUDA tensor for the Triton kernels (CPU tensors only with "
                         f"TRITON_INTERPRET=1), got a tensor on {x.device}")
    if not is_batch_dense(x):
        raise ValueError(f"{name} must be batch-dense (contiguous or channels_last, batch outermost), "
                         f"got shape {tuple(x.shape)} with strides {x.stride()}")


def _check_same(name, tensor, like_name, like):
    """Same shape, dtype, device and strides as ``like``: the kernels walk both storages in step."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    check_like(name, tensor, like_name, like)
    if tensor.stride() != like.stride():
        raise ValueError(f"{name} must have the strides of {like_name} {like.stride()}, got {tensor.stride()}")


def _check_timesteps(t, x, name="t"):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer timesteps, got {type(t).__name__}")
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 or int32 tensor, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"{name} must have shape [batch_size] = [{x.shape[0]}], got {list(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on the input's device ({x.device}), got {t.device}")
    return t.contiguous()


def _check_table(table, columns, x):
    if not isinstance(table, torch.Tensor):
        raise TypeError(f"table must be a torch.Tensor, got {type(table).__name__}")
    if table.dtype != torch.float32 or table.dim() != 2 or table.shape[1] != columns or table.shape[0] == 0:
        raise ValueError(f"table must be a float32 tensor of shape [T, {columns}] with T > 0, "
                         f"got {table.dtype} {list(table.shape)}")
    if table.device != x.device:
        raise ValueError(f"table must be on the input's device ({x.device}), got {table.device}")
    return table.contiguous()


def _check_seed(seed, x):
    if not isinstance(seed, torch.Tensor):
        raise TypeError(f"seed must be a one-element int64 torch.Tensor, got {type(seed).__name__}")
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError(f"seed must be a one-element int64 tensor, got {seed.dtype} of shape {list(seed.shape)}")
    if seed.device != x.device:
        raise ValueError(f"seed must be on the input's device ({x.device}), got {seed.device}")


def _launch(kernel, x, num_t, *args, **constexprs):
    """One program per BLOCK elements of storage; a table row lookup per batch element."""
    numel = x.numel()
    per_batch = numel // x.shape[0]
    options = {} if _interpreted() else GPU_OPTIONS
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        kernel[(triton.cdiv(numel, BLOCK),)](*args, numel, per_batch, x.shape[0], num_t,
                                             FEW_ROWS=per_batch >= BLOCK, BLOCK=BLOCK, **constexprs, **options)


def q_sample(x_start, t, table, noise, seed):
    """(x_t, drawn noise): x_t = table[t, 0] * x_start + table[t, 1] * z in one pass.

    Exactly one of ``noise`` (given z) and ``seed`` (one-element int64 tensor: z drawn
    in-kernel and returned with x_start's dtype and strides) must be given; with given noise
    the second output is an empty [0] tensor.
    """
    _check_input("x_start", x_start)
    t = _check_timesteps(t, x_start)
    table = _check_table(table, Q_SAMPLE_COLUMNS, x_start)
    if (noise is None) == (seed is None):
        raise ValueError("q_sample takes exactly one of noise (given z) and seed (z drawn in-kernel)")
    out = torch.empty_like(x_start)
    if noise is not None:
        _check_same("noise", noise, "x_start", x_start)
        drawn, mode = x_start.new_empty((0,)), NOISE_GIVEN
    else:
        _check_seed(seed, x_start)
        drawn, mode = torch.empty_like(x_start), NOISE_DRAWN
    if x_start.numel():
        _launch(_q_sample_kernel, x_start, table.shape[0], x_start, noise, seed, t, table, out, drawn, NOISE=mode)
    return out, drawn


def reverse_step(x_t, model_output, t, table, clip_denoised, noise, seed):
    """x_{t-1} from the step table in one pass (also the DDIM step, with a DDIM table).

    z is ``noise`` when given, drawn in-kernel from ``seed`` when that is given, else 0.
    """
    _check_input("x_t", x_t)
    _check_same("model_output", model_output, "x_t", x_t)
    t = _check_timesteps(t, x_t)
    table = _check_table(table, STEP_COLUMNS, x_t)
    if noise is not None and seed is not None:
        raise ValueError("give at most one of noise (given z) and seed (z drawn in-kernel)")
    if noise is not None:
        _check_same("noise", noise, "x_t", x_t)
        mode = NOISE_GIVEN
    elif seed is not None:
        _check_seed(seed, x_t)
        mode = NOISE_DRAWN
    else:
        mode = NOISE_NONE
    out = torch.empty_like(x_t)
    if x_t.numel():
        _launch(_step_kernel, x_t, table.shape[0], x_t, model_output, noise, seed, t, table, out,
                CLIP=bool(clip_denoised), NOISE=mode)
    return out


def dpm_solver_step(x, model_output, x0_prev, index, table, clip_denoised):
    """(x_next, x0) of one DPM-Solver++ step in one pass: the step kernel with ``x0_prev`` as z.

    ``x0_prev`` None (the first step) means z = 0; x0 (clamped with ``clip_denoised``) is
    returned with x's dtype and strides.
    """
    _check_input("x", x)
    _check_same("model_output", model_output, "x", x)
    if x0_prev is not None:
        _check_same("x0_prev", x0_prev, "x", x)
    index = _check_timesteps(index, x, name="index")
    table = _check_table(table, STEP_COLUMNS, x)
    out, x0 = torch.empty_like(x), torch.empty_like(x)
    if x.numel():
        _launch(_step_kernel, x, table.shape[0], x, model_output, x0_prev, None, index, table, out,
                CLIP=bool(clip_denoised), NOISE=NOISE_NONE if x0_prev is None else NOISE_GIVEN,
                STORE_X0=True, x0_ptr=x0)
    return out, x0
