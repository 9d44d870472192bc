"""What the elementwise Triton kernels (q_sample, the sampler step) share: device helpers, launch
options and the launchers' argument checks.

The kernels walk storage linearly: inputs are batch-dense (contiguous or channels_last, batch
outermost) and share one set of strides, so the element at storage index e belongs to batch
element e // (numel // batch). They load fp32/fp16/bf16, compute in fp32 and store in the input
dtype; offsets are int64.

Out-of-range rows: the index used to load a table row is always clamped to [0, R), so no load is
ever out of bounds, and the kernels check ``0 <= index < R`` with ``tl.device_assert`` without a
host sync. The launchers compile that assert in (``debug=True``), so on CUDA an out-of-range
index stops the kernel with a device-side assert, like ``torch.index_select`` does. (The Triton
interpreter skips device asserts; the ``ddpm_fast.ops`` front ends check CPU indices on the host.)
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
# loads per fp32 input in flight, and 2 Philox counters per thread when noise is drawn (no
# spills: high occupancy to hide the latency of the loads).
BLOCK = 2048
NUM_WARPS = 8
# Compile options of every launch on a GPU (the interpreter takes none): debug=True compiles the
# index-range device assert in; overflow checks stay off, since Philox relies on uint32
# arithmetic wrapping.
GPU_OPTIONS = dict(num_warps=NUM_WARPS, debug=True, sanitize_overflow=False)

NOISE_NONE, NOISE_GIVEN, NOISE_DRAWN = 0, 1, 2
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# ----------------------------------------------------------------------------- device code


@triton.jit
def table_rows(index_ptr, offs, start, per_batch, batch, num_rows, FEW_ROWS: tl.constexpr):
    """The table row of every element, as (row_a, row_b, use_b), with rows clamped to [0, R).

    FEW_ROWS (per_batch >= BLOCK): the block spans at most two batch elements, so two scalar
    rows and a per-element select replace a per-element division and gather. Otherwise every
    element divides its own offset (small images only) and row_b / use_b are unused.
    """
    if FEW_ROWS:
        b_a = start // per_batch
        b_b = tl.minimum(b_a + 1, batch - 1)
        row_a = tl.load(index_ptr + b_a).to(tl.int64)
        row_b = tl.load(index_ptr + b_b).to(tl.int64)
        tl.device_assert((row_a >= 0) & (row_a < num_rows) & (row_b >= 0) & (row_b < num_rows),
                         "table row index out of range [0, R)")
        use_b = offs >= (b_a + 1) * per_batch
    else:
        b = tl.minimum(offs // per_batch, batch - 1)  # masked tail lanes read the last row
        row_a = tl.load(index_ptr + b).to(tl.int64)
        tl.device_assert((row_a >= 0) & (row_a < num_rows), "table row index out of range [0, R)")
        row_b = row_a
        use_b = False
    row_a = tl.minimum(tl.maximum(row_a, 0), num_rows - 1)
    row_b = tl.minimum(tl.maximum(row_b, 0), num_rows - 1)
    return row_a, row_b, use_b


@triton.jit
def coef(table_ptr, row_a, row_b, use_b, COLUMN: tl.constexpr, COLUMNS: tl.constexpr, FEW_ROWS: tl.constexpr):
    """table[row, COLUMN] for every element (fp32)."""
    if FEW_ROWS:
        return tl.where(use_b, tl.load(table_ptr + row_b * COLUMNS + COLUMN),
                        tl.load(table_ptr + row_a * COLUMNS + COLUMN))
    else:
        return tl.load(table_ptr + row_a * COLUMNS + COLUMN)


@triton.jit
def noise_block(noise_ptr, seed_ptr, offs, mask, start, NOISE: tl.constexpr, BLOCK: tl.constexpr):
    """z in fp32: given (NOISE_GIVEN = 1) or drawn in-kernel (NOISE_DRAWN = 2: Philox, in
    storage index order)."""
    if NOISE == 1:
        return tl.load(noise_ptr + offs, mask=mask).to(tl.float32)
    else:
        return philox_normal_block(seed_ptr, start, BLOCK)


@triton.jit
def round_to(x, dtype: tl.constexpr):
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

# ----------------------------------------------------------------------------- launcher side


def interpreted():
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_input(name, x):
    """The tensor the kernel walks: a float tensor the kernels can index, batch first."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16 for the Triton kernels, got {x.dtype}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must have a non-empty batch dimension first, got shape {tuple(x.shape)}")
    if x.device.type != "cuda" and not (x.device.type == "cpu" and interpreted()):
        raise ValueError(f"{name} must be a CUDA tensor for the Triton kernels (CPU tensors only with "
                         f"TRITON_INTERPRET=1), got a tensor on {x.device}")
    if not is_batch_dense(x):
        raise ValueError(f"{name} must be batch-dense (contiguous or channels_last, batch outermost), "
                         f"got shape {tuple(x.shape)} with strides {x.stride()}")


def check_same(name, tensor, like_name, like):
    """Same shape, dtype, device and storage order as ``like``: the kernels walk both in step.

    Strides of size-1 dimensions do not move an element, so they may differ.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    check_like(name, tensor, like_name, like)
    if any(size > 1 and a != b for size, a, b in zip(like.shape, tensor.stride(), like.stride())):
        raise ValueError(f"{name} must have the strides of {like_name} {like.stride()}, got {tensor.stride()}")


def check_index(index, x, name):
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer row indices, got {type(index).__name__}")
    if index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 or int32 tensor, got {index.dtype}")
    if index.dim() != 1 or index.shape[0] != x.shape[0]:
        raise ValueError(f"{name} must have shape [batch_size] = [{x.shape[0]}], got {list(index.shape)}")
    if index.device != x.device:
        raise ValueError(f"{name} must be on the input's device ({x.device}), got {index.device}")
    return index.contiguous()


def launch(kernel, x, num_rows, *args, **constexprs):
    """One program per BLOCK elements of storage; a table row lookup per batch element."""
    numel = x.numel()
    per_batch = numel // x.shape[0]
    options = {} if interpreted() else GPU_OPTIONS
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        kernel[(triton.cdiv(numel, BLOCK),)](*args, numel, per_batch, x.shape[0], num_rows,
                                             FEW_ROWS=per_batch >= BLOCK, BLOCK=BLOCK, **constexprs, **options)
