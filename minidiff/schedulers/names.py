"""The sampler names of SD front-ends (A1111, ComfyUI) -> a scheduler class and the config options they mean.

The equivalences are diffusers' (docs/source/en/api/schedulers/overview.md: "A1111/k-diffusion"
and "Noise schedules and schedule types"). A name is a sampler, optionally followed by a schedule
type, matched case-insensitively with "_" and " " alike:

    "DPM++ 2M Karras"      DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
                                                       use_karras_sigmas=True)
    "dpmpp_2m_sde karras"  the same with algorithm_type="sde-dpmsolver++" (ComfyUI's sampler + scheduler)
    "Euler Exponential"    EulerDiscreteScheduler(timestep_spacing="linspace", use_exponential_sigmas=True)

Schedule types: Karras (use_karras_sigmas), Exponential and Beta (linspace spacing with
use_exponential_sigmas / use_beta_sigmas), SGM Uniform and Simple (trailing spacing); the σ
types apply to the samplers that space σ's, the spacing types to all but DPM-Solver singlestep
(no timestep_spacing: its timesteps are linspace), LCM and TCD (their own schedule). A sampler
named without a σ type gets all three σ options off, as the front-ends mean it.

Classes are named by string and looked up in minidiff.schedulers when a name is used, so a row
may name a class that is still to come. Left out, having no diffusers equivalent: DPM++ 2S a
(and Karras), DPM fast, DPM adaptive, DPM++ 3M SDE, Restart, Heun PP2, the CFG++ samplers, and
ComfyUI's dpmpp_2s_ancestral, dpm_fast, dpm_adaptive, dpmpp_3m_sde, euler_cfg_pp, ipndm, res_multistep;
the schedule types Uniform, Polyexponential, KL Optimal, Align Your Steps and ComfyUI's normal,
ddim_uniform, linear_quadratic. ComfyUI's uni_pc is UniPC's bh1 variant, uni_pc_bh2 the bh2 one.

Note: diffusers' table gives DPMSolverSinglestepScheduler for "DPM++ SDE", and so does this one;
DPMSolverSDEScheduler, a port of k-diffusion's sample_dpmpp_sde (Brownian-tree noise, needs
torchsde), is chosen by its class name.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from typing import Any

# (names, class name, options): the first name is A1111's spelling (or diffusers' where A1111 has none), the
# others ComfyUI's; each name takes the schedule types its class allows
_SAMPLERS: tuple[tuple[tuple[str, ...], str, dict[str, Any]], ...] = (
    (("Euler",), "EulerDiscreteScheduler", {}),
    (("Euler a", "euler_ancestral"), "EulerAncestralDiscreteScheduler", {}),
    (("Heun",), "HeunDiscreteScheduler", {}),
    (("LMS",), "LMSDiscreteScheduler", {}),
    (("DPM2", "dpm_2"), "KDPM2DiscreteScheduler", {}),
    (("DPM2 a", "dpm_2_ancestral"), "KDPM2AncestralDiscreteScheduler", {}),
    (("DPM++ 2M", "dpmpp_2m"), "DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2)),
    (
        ("DPM++ 2M SDE", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu"),
        "DPMSolverMultistepScheduler",
        dict(algorithm_type="sde-dpmsolver++", solver_order=2),
    ),
    (("DPM++ SDE", "dpmpp_sde", "dpmpp_sde_gpu"), "DPMSolverSinglestepScheduler", {}),
    (("DDIM",), "DDIMScheduler", {}),
    (("DDPM",), "DDPMScheduler", {}),
    (("PLMS",), "PNDMScheduler", dict(skip_prk_steps=True)),
    (("UniPC",), "UniPCMultistepScheduler", {}),
    (("uni_pc",), "UniPCMultistepScheduler", dict(solver_type="bh1")),
    (("uni_pc_bh2",), "UniPCMultistepScheduler", dict(solver_type="bh2")),
    (("DEIS",), "DEISMultistepScheduler", {}),
    (("LCM",), "LCMScheduler", {}),
    (("TCD",), "TCDScheduler", {}),
)

SIGMA_OPTIONS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
_SIGMA_OFF = dict.fromkeys(SIGMA_OPTIONS, False)
SCHEDULE_TYPES: dict[str, dict[str, Any]] = {
    "Karras": dict(_SIGMA_OFF, use_karras_sigmas=True),
    "Exponential": dict(_SIGMA_OFF, timestep_spacing="linspace", use_exponential_sigmas=True),
    "Beta": dict(_SIGMA_OFF, timestep_spacing="linspace", use_beta_sigmas=True),
    "SGM Uniform": dict(timestep_spacing="trailing"),
    "Simple": dict(timestep_spacing="trailing"),
}
SIGMA_TYPES = ("Karras", "Exponential", "Beta")
# the classes that space σ's (they take SIGMA_OPTIONS)
SIGMA_SPACED = {
    "EulerDiscreteScheduler", "LMSDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
    "DEISMultistepScheduler", "UniPCMultistepScheduler",
}  # fmt: skip
# the classes whose timesteps timestep_spacing does not pick: DPM-Solver singlestep has no such key, LCM and TCD
# follow their distillation schedule
FIXED_SPACING = {"DPMSolverSinglestepScheduler", "LCMScheduler", "TCDScheduler"}


def _key(name: str) -> str:
    """Case, "_" versus " " and repeated spaces do not matter."""
    return re.sub(r"[\s_]+", " ", name).strip().lower()


def _types_for(class_name: str) -> list[str]:
    """The schedule types a class takes: the σ ones if it spaces σ's, the spacing ones if its spacing is free."""
    sigma, spacing = class_name in SIGMA_SPACED, class_name not in FIXED_SPACING
    return [t for t in SCHEDULE_TYPES if (sigma if t in SIGMA_TYPES else spacing)]


def _spelled(sampler: str, schedule_type: str) -> str:
    """A1111 names take "Karras", ComfyUI's (lower case, with "_") take "karras", "sgm_uniform"."""
    comfy = sampler.islower() or "_" in sampler
    return f"{sampler} {schedule_type.lower().replace(' ', '_') if comfy else schedule_type}"


def _table() -> dict[str, tuple[str, str, dict[str, Any]]]:
    """normalized name -> (display name, class name, options)."""
    table = {}
    for names, class_name, options in _SAMPLERS:
        plain = dict(_SIGMA_OFF, **options) if class_name in SIGMA_SPACED else dict(options)
        for sampler in names:
            table[_key(sampler)] = (sampler, class_name, plain)
            for t in _types_for(class_name):
                typed = {**plain, **SCHEDULE_TYPES[t]}
                if class_name in FIXED_SPACING:
                    typed.pop("timestep_spacing", None)
                table[_key(_spelled(sampler, t))] = (_spelled(sampler, t), class_name, typed)
    return table


_TABLE = _table()
SAMPLER_NAMES: tuple[str, ...] = tuple(name for names, _, _ in _SAMPLERS for name in names)
SCHEDULER_NAMES: tuple[str, ...] = tuple(display for display, _, _ in _TABLE.values())


def scheduler_options(name: str) -> tuple[str, dict[str, Any]]:
    """(class name, config options) of a front-end sampler name (or of a class name: no options); a ValueError
    naming the valid ones if unknown."""
    key = _key(name)
    if key in _TABLE:
        _, class_name, options = _TABLE[key]
        return class_name, dict(options)
    if name in getattr(sys.modules[__package__], "SCHEDULERS", {}):
        return name, {}
    for t in SCHEDULE_TYPES:  # a known sampler with a schedule type it does not take
        sampler = key.removesuffix(" " + _key(t))
        if sampler != key and sampler in _TABLE:
            class_name = _TABLE[sampler][1]
            raise ValueError(
                f"unknown scheduler name {name!r}: {_TABLE[sampler][0]} ({class_name}) takes no {t} schedule; "
                f"it takes {', '.join(_types_for(class_name)) or 'none'}"
            )
    raise ValueError(
        f"unknown scheduler name {name!r}; choose a sampler: {', '.join(SAMPLER_NAMES)}, optionally followed by a "
        f"schedule type: {', '.join(SCHEDULE_TYPES)} (case, spaces and underscores do not matter), or a class name"
    )


NAMES_HELP = (  # for --help
    f"Sampler names (A1111 / ComfyUI): {', '.join(SAMPLER_NAMES)}, each optionally followed by a schedule type: "
    f"{', '.join(SCHEDULE_TYPES)}, where the sampler takes it (case, spaces and underscores do not matter)."
)


def scheduler_from_name(name: str, config: Mapping[str, Any] | None = None) -> Any:
    """The scheduler a front-end sampler name (or a class name) means, built from `config` (e.g. a pipeline's
    `scheduler.config`, or a scheduler_config.json read as a dict; the class defaults when None) with the name's
    options on top."""
    class_name, options = scheduler_options(name)
    cls = getattr(sys.modules[__package__], class_name, None)  # looked up now: a later class counts too
    if cls is None:
        raise ValueError(f"scheduler name {name!r} needs {class_name}, which this minidiff does not have")
    if missing := [k for k in options if k not in cls.config_keys()]:
        raise ValueError(f"scheduler name {name!r}: {class_name} takes no {', '.join(missing)}")
    return cls.from_config(dict(config or {}), **options)
