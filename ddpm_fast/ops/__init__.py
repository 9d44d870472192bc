"""One public function per fused op; each dispatches to the backend ddpm_fast.backends picks."""

from .diffusion_steps import ddim_step, dpm_solver_step, q_sample, reverse_step  # noqa: F401
from .group_norm_silu import group_norm_silu  # noqa: F401
from .sampler_step import sampler_step  # noqa: F401
