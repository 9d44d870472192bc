"""GroupNormSiLU: nn.GroupNorm followed by SiLU as one fused op, with nn.GroupNorm's state_dict."""

import torch
from torch import nn

from .. import backends
from ..ops.group_norm_silu import group_norm_silu
from ..validation import check_bool, check_float, check_int, check_number


class GroupNormSiLU(nn.Module):
    """``silu(group_norm(x))`` through :func:`ddpm_fast.ops.group_norm_silu`.

    Parameters and state_dict are nn.GroupNorm's (``weight`` [C] initialised to 1, ``bias`` [C]
    to 0, both absent without ``affine``), so checkpoints load either way. ``backend`` picks the
    kernel ("auto", "torch", "triton", "cuda", "cpu"; ``DDPM_FAST_BACKEND`` overrides "auto") and
    can be changed after construction.
    """

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, backend="auto"):
        super().__init__()
        self.num_groups = check_int("num_groups", num_groups, minimum=1)
        self.num_channels = check_int("num_channels", num_channels, minimum=1)
        if num_channels % num_groups:
            raise ValueError(f"num_channels must be divisible by num_groups={num_groups}, got {num_channels}")
        self.eps = check_number("eps", eps, minimum=0.0, open_min=True)
        self.affine = check_bool("affine", affine)
        self.backend = backend
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels))
            self.bias = nn.Parameter(torch.zeros(num_channels))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    @property
    def backend(self):
        return self._backend

    @backend.setter
    def backend(self, value):
        self._backend = backends.check_name(value)

    @classmethod
    def from_group_norm(cls, gn, backend="auto"):
        """A GroupNormSiLU with gn's configuration and (shared) parameters, for ``silu(gn(x))``."""
        if not isinstance(gn, nn.GroupNorm):
            raise TypeError(f"gn must be an nn.GroupNorm, got {type(gn).__name__}")
        module = cls(gn.num_groups, gn.num_channels, eps=gn.eps, affine=gn.affine, backend=backend)
        if gn.affine:
            module.weight, module.bias = gn.weight, gn.bias
        return module

    def forward(self, x):
        check_float("x", x)
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"x must have shape [N, {self.num_channels}, ...] (num_channels={self.num_channels}), "
                             f"got {list(x.shape)}")
        return group_norm_silu(x, self.weight, self.bias, self.num_groups, self.eps, backend=self.backend)

    def extra_repr(self):
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
                f"backend={self.backend!r}")
