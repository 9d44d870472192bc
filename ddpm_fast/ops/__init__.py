"""One public function per fused op; each dispatches to the backend ddpm_fast.backends picks."""

from .diffusion_steps import ddim_step, q_sample, reverse_step  # noqa: F401
