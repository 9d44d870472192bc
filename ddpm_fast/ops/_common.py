"""Layout handling and seeds shared by the fused ops' Python front ends (argument checks: ddpm_fast.validation)."""

import torch


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
