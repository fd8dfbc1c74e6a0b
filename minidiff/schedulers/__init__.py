"""The samplers Stable Diffusion users swap in, each in its own file, diffusers-exact.

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
from .edm_dpm_solver_multistep import EDMDPMSolverMultistepScheduler
from .edm_euler import EDMEulerScheduler
from .euler import EulerDiscreteScheduler
from .euler_ancestral import EulerAncestralDiscreteScheduler
from .heun import HeunDiscreteScheduler
from .kdpm2 import KDPM2DiscreteScheduler
from .kdpm2_ancestral import KDPM2AncestralDiscreteScheduler
from .lcm import LCMScheduler
from .lms import LMSDiscreteScheduler
from .names import SCHEDULER_NAMES, scheduler_from_name
from .pndm import PNDMScheduler
from .tcd import TCDScheduler
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
        KDPM2DiscreteScheduler,
        KDPM2AncestralDiscreteScheduler,
        LCMScheduler,
        TCDScheduler,
        EDMEulerScheduler,
        EDMDPMSolverMultistepScheduler,
    )
}
# the schedulers whose step() takes a `generator` to draw noise with (pipelines pass theirs; DPM-Solver
# draws only as sde-dpmsolver(++), TCD only with eta > 0)
STOCHASTIC_SCHEDULERS = (
    DDPMScheduler,
    DDIMScheduler,
    EulerDiscreteScheduler,
    EulerAncestralDiscreteScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    KDPM2AncestralDiscreteScheduler,
    LCMScheduler,
    TCDScheduler,
    EDMEulerScheduler,
    EDMDPMSolverMultistepScheduler,
)

__all__ = [
    *SCHEDULERS,
    "SCHEDULERS",
    "STOCHASTIC_SCHEDULERS",
    "SCHEDULER_NAMES",
    "NoiseScheduleConfig",
    "SchedulerMixin",
    "SchedulerOutput",
    "scheduler_from_name",
]
