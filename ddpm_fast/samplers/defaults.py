"""SamplerDefaults: the options the sampling loops use when a call leaves them at None."""

import dataclasses

from .. import schedules
from ..validation import check_bool, check_choice, check_int
from .coefficients import SOLVER_TYPES


@dataclasses.dataclass(frozen=True)
class SamplerDefaults:
    """What the sampling loops use for the options a call leaves at None.

    The defaults are the reference class's (no clipping) and those of diffusers'
    DPMSolverMultistepScheduler; ``GaussianDiffusion.from_diffusers`` takes them from a
    scheduler's configuration, as diffusers' own samplers would.
    """

    clip_denoised: bool = False      # clamp the predicted x_0 to [-1, 1] at every step
    spacing: str = "linspace"        # DDIM / DPM-Solver++ timesteps: "linspace", "leading", "trailing"
    steps_offset: int = 0            # added to "leading" timesteps
    order: int = 2                   # DPM-Solver++ order (1, 2 or 3)
    lower_order_final: bool = True   # first-order last step for fewer than 15 steps (sigma_min ending)
    karras_sigmas: bool = False      # DPM-Solver++ on Karras et al.'s noise levels
    final_sigma: str = "zero"        # DPM-Solver++ ends on sigma = 0 ("zero") or on sigma_0 ("sigma_min")
    sde: bool = False                # the stochastic DPM-Solver++ (diffusers' "sde-dpmsolver++")
    solver_type: str = "midpoint"    # DPM-Solver++'s second-order update: "midpoint" or "heun"

    def __post_init__(self):
        check_bool("clip_denoised", self.clip_denoised)
        check_choice("spacing", self.spacing, schedules.SPACINGS)
        check_int("steps_offset", self.steps_offset, minimum=0)
        check_int("order", self.order, minimum=1, maximum=3)
        check_bool("lower_order_final", self.lower_order_final)
        check_bool("karras_sigmas", self.karras_sigmas)
        check_choice("final_sigma", self.final_sigma, schedules.FINAL_SIGMAS)
        check_bool("sde", self.sde)
        check_choice("solver_type", self.solver_type, SOLVER_TYPES)

    def with_options(self, **options):
        """A copy with the options that are not None replaced (the options of one loop call)."""
        return dataclasses.replace(self, **{name: value for name, value in options.items() if value is not None})
