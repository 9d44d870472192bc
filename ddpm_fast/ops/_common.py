"""Layout handling and seeds shared by the fused ops' Python front ends (argument checks: ddpm_fast.validation)."""

import torch

from ..validation import check_tensor, describe


def is_batch_dense(x):
    """Dense storage with the batch outermost: contiguous or channels_last (2D/3D)."""
    if x.is_contiguous():
        return True
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return True
    return x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)


def batch_dense(x):
    """x itself when the kernels can index it natively, else a contiguous copy."""
    return x if is_batch_dense(x) else x.contiguous()


def same_layout(tensor, like):
    """``tensor`` with the strides of ``like`` (copied only when they differ)."""
    if tensor.stride() == like.stride():
        return tensor
    out = torch.empty_like(like, dtype=tensor.dtype)
    out.copy_(tensor)
    return out


def draw_seed(device, generator=None):
    """A one-element int64 seed for in-kernel Philox noise, drawn from torch's generator.

    It is drawn on the tensors' device, so under CUDA-graph capture each replay draws a new
    seed (the kernel reads it from device memory rather than as a baked-in constant).
    """
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64, generator=generator)


def match_layout(tensor, like):
    """``tensor`` in the storage order of the batch-dense ``like`` (copied only when it differs).

    ``tensor`` may have another batch size (a guided model output is [2B, ...]); every other
    dimension must match. Strides of size-1 dimensions do not matter to the kernels.
    """
    same_inner = all(size <= 1 or a == b for size, a, b in zip(like.shape[1:], tensor.stride()[1:], like.stride()[1:]))
    per_batch = tensor[0].numel() if tensor.shape[0] else 0
    if same_inner and (tensor.shape[0] <= 1 or tensor.stride(0) == per_batch):
        return tensor
    if like.is_contiguous():
        return tensor.contiguous()
    fmt = torch.channels_last if like.dim() == 4 else torch.channels_last_3d
    return tensor.contiguous(memory_format=fmt)


def check_table(table, columns, device):
    """A float32 [R, columns] coefficient table on ``device``, returned contiguous."""
    check_tensor("table", table)
    if table.dtype != torch.float32:
        raise TypeError(f"table must be a float32 tensor of shape [R, {columns}], got {describe(table)}")
    if table.dim() != 2 or table.shape[1] != columns or table.shape[0] == 0:
        raise ValueError(f"table must be a float32 tensor of shape [R, {columns}] with R > 0, got {describe(table)}")
    if table.device != device:
        raise ValueError(f"table must be on the input's device ({device}), got {table.device}")
    return table.contiguous()


def check_seed(seed, device):
    """A one-element int64 seed tensor on ``device``."""
    check_tensor("seed", seed)
    if seed.dtype != torch.int64 or seed.numel() != 1:
        error = TypeError if seed.dtype != torch.int64 else ValueError
        raise error(f"seed must be a one-element int64 tensor (see ddpm_fast.ops._common.draw_seed), "
                    f"got {describe(seed)}")
    if seed.device != device:
        raise ValueError(f"seed must be on the input's device ({device}), got {seed.device}")
