"""The nine samplers the Stable Diffusion tutorials swap in, each in its own file, diffusers-exact.

`SCHEDULERS` maps each class name to its class (the CLI lists these names). Every class takes
diffusers' config keys, and `Other.from_config(scheduler.config)` swaps one for another.

Reading order: schedule.py (the maths of β, ᾱ and σ), config.py (the keys, one frozen dataclass
per scheduler), base.py (config IO and the loop state), then one file per algorithm.
"""

from .base import SchedulerMixin, SchedulerOutput
from .config import NoiseScheduleConfig
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .deis_multistep import DEISMultistepScheduler
from .dpm_solver_multistep import DPMSolverMultistepScheduler
from .dpm_solver_sde import DPMSolverSDEScheduler
from .dpm_solver_singlestep import DPMSolverSinglestepScheduler
from .euler import EulerDiscreteScheduler
from .euler_ancestral import EulerAncestralDiscreteScheduler
from .heun import HeunDiscreteScheduler
from .lms import LMSDiscreteScheduler
from .pndm import PNDMScheduler
from .unipc import UniPCMultistepScheduler

SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    cls.__name__: cls
    for cls in (
        DDPMScheduler,
        DDIMScheduler,
        PNDMScheduler,
        LMSDiscreteScheduler,
        EulerDiscreteScheduler,
        EulerAncestralDiscreteScheduler,
        HeunDiscreteScheduler,
        DPMSolverMultistepScheduler,
        UniPCMultistepScheduler,
        DPMSolverSinglestepScheduler,
        DEISMultistepScheduler,
        DPMSolverSDEScheduler,
    )
}

__all__ = [*SCHEDULERS, "SCHEDULERS", "NoiseScheduleConfig", "SchedulerMixin", "SchedulerOutput"]
