"""Argument checks shared by every public entry point (diffusion, ops, nn, CLI).

Each public function validates its arguments once, before a backend is chosen, so every
backend (plain PyTorch included) rejects the same inputs with a ``TypeError`` (wrong kind or
dtype) or ``ValueError`` (wrong shape, device or value) whose message names the argument, what
was expected and what came. A tensor that must match another one matches it exactly: never a
broadcast, never a silent cast.
"""

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def describe(value):
    """A short description of what was passed, for messages."""
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).replace('torch.', '')} tensor of shape {list(value.shape)} on {value.device}"
    return f"{value!r} ({type(value).__name__})"


def check_tensor(name, value):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {describe(value)}")
    return value


def check_float(name, tensor, allow_float64=True):
    """A floating tensor of a dtype the kernels take (float64 only for the torch backend)."""
    check_tensor(name, tensor)
    allowed = FLOAT_DTYPES + ((torch.float64,) if allow_float64 else ())
    if tensor.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must have a floating dtype ({names}), got {tensor.dtype}")
    return tensor


def check_batched(name, tensor):
    """A floating tensor [batch, ...] with a non-empty batch."""
    check_float(name, tensor)
    if tensor.dim() < 1 or tensor.shape[0] == 0:
        raise ValueError(f"{name} must have a non-empty batch dimension first, got shape {list(tensor.shape)}")
    return tensor


def check_like(name, tensor, like_name, like):
    """Same shape, dtype and device as ``like``: never a silent broadcast or cast."""
    check_tensor(name, tensor)
    if tensor.shape != like.shape:
        raise ValueError(f"{name} must have the shape of {like_name} {list(like.shape)}, got {list(tensor.shape)}")
    if tensor.dtype != like.dtype:
        raise TypeError(f"{name} must have the dtype of {like_name} ({like.dtype}), got {tensor.dtype}")
    if tensor.device != like.device:
        raise ValueError(f"{name} must be on {like_name}'s device ({like.device}), got {tensor.device}")
    return tensor


def check_timesteps(t, batch_size, num_timesteps, device, name="t"):
    """t: an integer tensor of shape [batch] on ``device`` with values in [0, num_timesteps).

    The range is checked on the host for CPU tensors. On CUDA tensors it is not, since that
    would need a host sync: there the kernels' gather (torch.index_select, or the fused
    kernel's own check) stops with a device-side assert on an out-of-range t. Inside
    torch.compile the host check is left to the kernels too (the C++ CPU kernels check t
    before reading the table), so a compiled graph has no break.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer timesteps, got {describe(t)}")
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


def check_one_timestep_per_item(name, x, t):
    """A clearer message than t's shape check when x has no batch dimension (one [C, H, W] image):
    x must be [batch, channels, height, width] with one timestep per item of the batch."""
    if isinstance(x, torch.Tensor) and isinstance(t, torch.Tensor) and x.dim() >= 1 and t.dim() == 1 \
            and t.shape[0] != x.shape[0]:
        raise ValueError(f"{name} must be a batch [batch, channels, height, width] with one timestep per item in "
                         f"t; got {name} of shape {list(x.shape)} and t of shape {list(t.shape)} (a single image "
                         f"needs a batch dimension: {name}[None])")


def check_class_labels(y, batch_size, num_classes, device, name="y"):
    """y: integer class labels [batch] on ``device`` in [0, num_classes] (num_classes: the null label).

    As for timesteps, the range is checked on the host for CPU tensors only (no host sync on
    CUDA, where the embedding's gather stops on an out-of-range label). Returned as int64.
    """
    expected = (f"{name} must be an integer tensor (torch.long) of class labels of shape [batch] = "
                f"[{batch_size}] with values in [0, {num_classes}] ({num_classes}: the null label)")
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{expected}, got {describe(y)}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"{expected}, got dtype {y.dtype}")
    if y.dim() != 1 or y.shape[0] != batch_size:
        raise ValueError(f"{expected}, got shape {list(y.shape)}")
    if y.device != device:
        raise ValueError(f"{name} must be on the device of the input ({device}), got {y.device}")
    if y.device.type == "cpu" and y.numel() and not torch.compiler.is_compiling():
        low, high = int(y.min()), int(y.max())
        if low < 0 or high > num_classes:
            raise ValueError(f"{expected}, got values from {low} to {high}")
    return y.long()


def check_int(name, value, minimum=None, maximum=None):
    """A Python int (not a bool) in [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {describe(value)}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be an int {bounds}, got {value}")
    return value


def check_number(name, value, minimum=None, maximum=None, *, open_min=False, open_max=False):
    """A finite real number (not a bool) within the given bounds; returned as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {describe(value)}")
    value = float(value)
    low_ok = minimum is None or (value > minimum if open_min else value >= minimum)
    high_ok = maximum is None or (value < maximum if open_max else value <= maximum)
    if not math.isfinite(value) or not (low_ok and high_ok):
        if maximum is None and minimum is None:
            where = ""
        elif maximum is None:
            where = f" {'>' if open_min else '>='} {minimum:g}"
        elif minimum is None:
            where = f" {'<' if open_max else '<='} {maximum:g}"
        else:
            where = f" in {'(' if open_min else '['}{minimum:g}, {maximum:g}{')' if open_max else ']'}"
        raise ValueError(f"{name} must be a finite number{where}, got {value}")
    return value


def check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {describe(value)}")
    return value


def check_choice(name, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_shape(name, shape):
    """A sampling shape: a non-empty sequence of positive ints (batch first); returned as a tuple."""
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)) or not shape:
        raise TypeError(f"{name} must be a non-empty tuple of positive ints like (16, 3, 32, 32), "
                        f"got {describe(shape)}")
    for size in shape:
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
            raise ValueError(f"{name} must contain positive ints only, got {tuple(shape)}")
    return tuple(int(size) for size in shape)


def check_model(model):
    """A denoising model callable as model(x_t, t)."""
    if not callable(model):
        raise TypeError(f"denoise_model must be callable as denoise_model(x_t, t), got {describe(model)}")
    return model


def check_optional_like(name, tensor, like_name, like):
    """None, or a floating tensor matching ``like`` exactly."""
    if tensor is not None:
        check_float(name, tensor)
        check_like(name, tensor, like_name, like)
    return tensor


def check_generator(generator, device):
    """None, or a torch.Generator on the device type where the samples are drawn."""
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {describe(generator)}")
    if generator.device.type != torch.device(device).type:
        raise ValueError(f"generator must be a generator on {torch.device(device).type} (where the samples are "
                         f"drawn), got one on {generator.device}")
    return generator


def check_device(device):
    """None, or a torch device that exists here."""
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be a torch device or None, got {device!r}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} was asked for but CUDA is not available; "
                         "pass device=None to follow the inputs' device")
    return device


def check_t_prev(t_prev, t, num_timesteps):
    """DDIM's target timesteps: integers in [-1, t) (-1: the final step to x_0); order checked on the host for CPU."""
    if not isinstance(t_prev, torch.Tensor) or t_prev.dtype.is_floating_point or t_prev.dtype.is_complex \
            or t_prev.dtype == torch.bool:
        got = t_prev.dtype if isinstance(t_prev, torch.Tensor) else describe(t_prev)
        raise TypeError(f"t_prev must be an integer tensor of timesteps (-1 for the final step), got {got}")
    try:
        t_prev = check_timesteps(t_prev + 1, t.shape[0], num_timesteps + 1, t.device, name="t_prev") - 1
    except ValueError as error:
        raise ValueError(f"{error} (as t_prev + 1: t_prev must lie in [-1, {num_timesteps - 1}])") from None
    if t.device.type == "cpu" and not torch.compiler.is_compiling() and bool((t_prev >= t).any()):
        raise ValueError(f"t_prev must be smaller than t element by element (DDIM steps go backwards in time), "
                         f"got t={t.tolist()} and t_prev={t_prev.tolist()}")
    return t_prev
