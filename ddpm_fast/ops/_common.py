"""Input checks and layout handling shared by the fused ops' Python front ends."""

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float(name, tensor, allow_float64=True):
    """A floating tensor of a dtype the kernels take (float64 only for the torch backend)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    allowed = FLOAT_DTYPES + ((torch.float64,) if allow_float64 else ())
    if tensor.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must have a floating dtype ({names}), got {tensor.dtype}")


def check_like(name, tensor, like_name, like):
    """Same shape, dtype and device as ``like``: never a silent broadcast or cast."""
    if tensor.shape != like.shape:
        raise ValueError(f"{name} must have the shape of {like_name} {tuple(like.shape)}, got {tuple(tensor.shape)}")
    if tensor.dtype != like.dtype:
        raise TypeError(f"{name} must have the dtype of {like_name} ({like.dtype}), got {tensor.dtype}")
    if tensor.device != like.device:
        raise ValueError(f"{name} must be on {like_name}'s device ({like.device}), got {tensor.device}")


def check_timesteps(t, batch_size, num_timesteps, device, name="t"):
    """t: an integer tensor of shape [batch] on ``device`` with values in [0, num_timesteps).

    The range is checked on the host for CPU tensors. On CUDA tensors it is not, since that
    would need a host sync: there the kernels' gather (torch.index_select, or the fused
    kernel's own check) stops with a device-side assert on an out-of-range t. Inside
    torch.compile the host check is left to the kernels too (the C++ CPU kernels check t
    before reading the table), so a compiled graph has no break.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer timesteps, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (torch.long), got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != batch_size:
        raise ValueError(f"{name} must have shape [batch_size] = [{batch_size}], got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on the device of the input ({device}), got {t.device}")
    if t.device.type == "cpu" and t.numel() and not torch.compiler.is_compiling():
        low, high = int(t.min()), int(t.max())
        if low < 0 or high >= num_timesteps:
            raise ValueError(f"{name} must lie in [0, {num_timesteps}), got values from {low} to {high}")
    return t.long()


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
