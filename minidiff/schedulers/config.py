"""The scheduler config scheme: one frozen dataclass per scheduler, extending `NoiseScheduleConfig`.

Every key has diffusers' name and default, so configs pass between minidiff and diffusers as they
are. A key that takes a fixed set of values is declared with `one_of` (anything else is refused
when the scheduler is built, naming the key); a diffusers option minidiff does not implement is
declared `not_implemented` (only its off value is taken). Keys several schedulers share come in
small groups (`ThresholdingKeys`, `SigmaKeys`, `FlowKeys`) that a config lists among its bases; a group
whose options are only partly implemented has a sibling with all of them (`DynamicThresholdingKeys`,
`SigmaSpacingKeys`) for the schedulers that implement them:

    @dataclass(frozen=True)
    class DDIMConfig(DynamicThresholdingKeys, NoiseScheduleConfig):
        timestep_spacing: str = one_of("leading", TIMESTEP_SPACINGS)  # a shared key, another default
        set_alpha_to_one: bool = True  # a key of its own
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigBase

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


def one_of(default: Any, choices: Sequence[Any], aliases: Mapping[Any, Any] | None = None) -> Any:
    """A key whose value must be one of `choices`; `aliases` maps a sibling class's values onto them."""
    return field(default=default, metadata={"choices": tuple(choices), "aliases": dict(aliases or {})})


def not_implemented(default: Any) -> Any:
    """A diffusers key minidiff does not implement: refused unless left at its (off) default."""
    return field(default=default, metadata={"not_implemented": True})


def check_choice(name: str, value: Any, choices: Sequence[Any], owner: str) -> None:
    if value not in choices:
        raise ValueError(f"{owner}: {name}={value!r} is not supported; choose one of {', '.join(map(repr, choices))}")


class SchedulerConfig(ConfigBase):
    """What every scheduler config does with its keys (the EDM schedulers have no β ones)."""

    @classmethod
    def validated(cls, owner: str, **given: Any) -> SchedulerConfig:
        """The config of scheduler `owner`: aliases mapped, unknown keys a TypeError, refused values a ValueError."""
        fields = dataclasses.fields(cls)
        if unknown := sorted(given.keys() - {f.name for f in fields}):
            raise TypeError(f"{owner}.__init__() got an unexpected keyword argument {unknown[0]!r}")
        for f in fields:  # a sibling class's name for a value (e.g. UniPC's solver_type "bh2" given to DPM-Solver)
            if f.name in given and isinstance(given[f.name], Hashable):
                given[f.name] = f.metadata.get("aliases", {}).get(given[f.name], given[f.name])
        config = cls(**given)
        for f in fields:
            value = getattr(config, f.name)
            # (with trained_betas the schedule's name is unused: diffusers does not look at it either)
            if "choices" in f.metadata and not (f.name == "beta_schedule" and config.get("trained_betas") is not None):
                check_choice(f.name, value, f.metadata["choices"], owner)
            if f.metadata.get("not_implemented") and value != f.default:
                raise ValueError(f"{owner}: {f.name}={value!r} is not implemented in minidiff")
        return config


@dataclass(frozen=True)
class BetaScheduleConfig(SchedulerConfig):
    """The keys every scheduler but EDM's takes: the training schedule β_1..β_T and what the network predicts."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = one_of("linear", BETA_SCHEDULES)
    trained_betas: Any = None  # β given outright: beta_schedule is then unused
    prediction_type: str = one_of("epsilon", PREDICTION_TYPES)


@dataclass(frozen=True)
class NoiseScheduleConfig(BetaScheduleConfig):
    """The β keys, and how the sampling steps are picked from the T training steps (all but DPM-Solver
    singlestep, which always spaces them linearly)."""

    timestep_spacing: str = one_of("linspace", TIMESTEP_SPACINGS)
    steps_offset: int = 0


# ---------------------------------------------------------------------------------------------
# Keys several schedulers share


@dataclass(frozen=True)
class ThresholdingKeys:
    """Dynamic thresholding of x̂_0 (Saharia et al., 2022): DDPM, DDIM and the multistep solvers."""

    thresholding: bool = not_implemented(False)
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0


@dataclass(frozen=True)
class SigmaKeys:
    """How the σ's of the sampling steps are spaced: as the timesteps fall, or Karras et al.'s ρ-schedule."""

    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = not_implemented(False)
    use_beta_sigmas: bool = not_implemented(False)


@dataclass(frozen=True)
class DynamicThresholdingKeys(ThresholdingKeys):
    """`ThresholdingKeys` with thresholding implemented (schedule.dynamic_threshold applied to x̂_0)."""

    thresholding: bool = False


@dataclass(frozen=True)
class SigmaSpacingKeys(SigmaKeys):
    """`SigmaKeys` with all three spacings implemented: Karras' ρ-schedule, evenly in log σ, or the
    Beta(0.6, 0.6) quantiles (schedule.karras_sigmas / exponential_sigmas / beta_sigmas)."""

    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False


@dataclass(frozen=True)
class FlowKeys:
    """The flow-matching options of the multistep solvers (SD 3 / Flux models): accepted only when off, but
    UniPC implements use_flow_sigmas (and flow_shift)."""

    use_flow_sigmas: bool = not_implemented(False)
    flow_shift: float = 1.0
    use_dynamic_shifting: bool = not_implemented(False)
    time_shift_type: str = "exponential"
