"""Samplers as coefficient tables run by one fused step (``ops.sampler_step``).

- :mod:`.coefficients`: the float64 rows of each sampler's steps (DDPM, DDIM, DPM-Solver++ of
  orders 1-3, ODE or SDE), one formula-named function each;
- :mod:`.loops`: the plans (timesteps and rows) and the one loop that runs them, with
  classifier-free guidance;
- :class:`SamplerDefaults`: the options a loop call leaves at None.
"""

from .coefficients import (SOLVER_TYPES, ddim_rows, ddim_sigma, ddpm_rows, dpm_solver_orders,  # noqa: F401
                           dpm_solver_rows, step_rows, with_guidance)
from .defaults import SamplerDefaults  # noqa: F401
from .loops import (SAMPLERS, call_model, ddim_plan, ddpm_plan, dpm_solver_plan, fit_num_steps, run, step,  # noqa: F401
                    sample_ddim, sample_ddpm, sample_dpm_solver)
