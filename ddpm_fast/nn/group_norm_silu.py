"""GroupNormSiLU: nn.GroupNorm followed by SiLU as one fused op, with nn.GroupNorm's state_dict."""

import torch
from torch import nn

from .. import backends
from ..ops.group_norm_silu import group_norm_silu


class GroupNormSiLU(nn.Module):
    """``silu(group_norm(x))`` through :func:`ddpm_fast.ops.group_norm_silu`.

    Parameters and state_dict are nn.GroupNorm's (``weight`` [C] initialised to 1, ``bias`` [C]
    to 0, both absent without ``affine``), so checkpoints load either way. ``backend`` picks the
    kernel ("auto", "torch", "triton", "cuda", "cpu"; ``DDPM_FAST_BACKEND`` overrides "auto") and
    can be changed after construction.
    """

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, backend="auto"):
        super().__init__()
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
            raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
        if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels % num_groups:
            raise ValueError(f"num_channels must be an int divisible by num_groups={num_groups}, got {num_channels!r}")
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
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
        return group_norm_silu(x, self.weight, self.bias, self.num_groups, self.eps, backend=self.backend)

    def extra_repr(self):
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
                f"backend={self.backend!r}")
