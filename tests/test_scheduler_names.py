"""The front-end sampler names (A1111 / ComfyUI), name by name: the class and options each promises, built from
SD 1.5's scheduler config, and diffusers' class with the same options giving the same timesteps and sigmas."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from conftest import reference_config, rel_err
from PIL import Image
from test_schedulers import normalized

import minidiff
from minidiff import schedulers as ms
from minidiff.cli import CLIError, main
from minidiff.schedulers import names

diffusers = pytest.importorskip("diffusers")

SD15 = reference_config("sd-v1-5.scheduler")
SCHED_TOL = 1e-5

# what the brief and diffusers' table promise, by name (A1111 first, then ComfyUI's spellings)
PROMISED = {
    "Euler": ("EulerDiscreteScheduler", {"use_karras_sigmas": False}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {"use_karras_sigmas": False}),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "Heun": ("HeunDiscreteScheduler", {"use_karras_sigmas": False}),
    "DPM2": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": False}),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": False}),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": False}),
    "DPM++ 2M SDE Karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "DPM++ SDE": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": False}),
    "DPM++ SDE Karras": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}),
    "DDIM": ("DDIMScheduler", {}),
    "DDPM": ("DDPMScheduler", {}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "UniPC": ("UniPCMultistepScheduler", {"use_karras_sigmas": False}),
    "LCM": ("LCMScheduler", {}),
    "TCD": ("TCDScheduler", {}),
    "DEIS": ("DEISMultistepScheduler", {"use_karras_sigmas": False}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_ancestral": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_sde": ("DPMSolverSinglestepScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "uni_pc": ("UniPCMultistepScheduler", {"solver_type": "bh1"}),
    "uni_pc_bh2": ("UniPCMultistepScheduler", {"solver_type": "bh2"}),
    "lcm": ("LCMScheduler", {}),
    "dpmpp_2m karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "dpmpp_2m_sde_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "euler exponential": ("EulerDiscreteScheduler", {"use_exponential_sigmas": True, "timestep_spacing": "linspace"}),
    "Euler Beta": ("EulerDiscreteScheduler", {"use_beta_sigmas": True, "timestep_spacing": "linspace"}),
    "DDIM SGM Uniform": ("DDIMScheduler", {"timestep_spacing": "trailing"}),
    "dpmpp_2m simple": ("DPMSolverMultistepScheduler", {"timestep_spacing": "trailing"}),
}  # fmt: skip
LEFT_OUT = [
    "DPM++ 2S a",
    "DPM++ 2S a Karras",
    "DPM fast",
    "DPM adaptive",
    "dpmpp_2s_ancestral",
    "dpm_fast",
    "Euler a Karras",
]


def built(name: str):
    """scheduler_from_name on SD 1.5's config; skipped while the class has not landed, or when minidiff's class
    does not implement an option the name asks for (it then refuses it, naming it)."""
    class_name, options = names.scheduler_options(name)
    cls = getattr(ms, class_name, None)
    if cls is None:
        with pytest.raises(ValueError, match="does not have"):
            minidiff.scheduler_from_name(name, SD15)
        pytest.skip(f"{class_name} is not in minidiff.schedulers yet")
    refused = [
        f.name
        for f in cls.config_class.__dataclass_fields__.values()
        if f.metadata.get("not_implemented") and options.get(f.name, f.default) != f.default
    ]
    if refused:
        with pytest.raises(ValueError, match="not implemented"):
            minidiff.scheduler_from_name(name, SD15)
        pytest.skip(f"{class_name} does not implement {refused} yet")
    return minidiff.scheduler_from_name(name, SD15), class_name, options


@pytest.mark.parametrize("name", list(PROMISED))
def test_name_gives_the_promised_class_and_options(name):
    sched, class_name, _ = built(name)
    want_class, want = PROMISED[name]
    assert type(sched).__name__ == class_name == want_class
    for key, value in want.items():
        assert sched.config[key] == value, (key, sched.config[key])


@pytest.mark.parametrize("name", names.SCHEDULER_NAMES)
def test_every_name_matches_diffusers(name):
    """The class and options of each name, on SD 1.5's config, as diffusers builds them: the same config, timesteps
    and sigmas; the SD 1.5 keys the class takes are kept."""
    sched, class_name, options = built(name)
    assert type(sched).__name__ == class_name
    assert all(sched.config[k] == v for k, v in options.items())
    for key in ("beta_schedule", "beta_start", "beta_end", "steps_offset"):
        if key in sched.config_keys() and key not in options:
            assert sched.config[key] == SD15[key]
    ref = getattr(diffusers, class_name).from_config(SD15, **options)
    assert normalized(sched.config) == normalized(ref.config)
    for steps in (4, 20):
        sched.set_timesteps(steps)
        ref.set_timesteps(steps)
        assert sched.timesteps.dtype == ref.timesteps.dtype and sched.timesteps.shape == ref.timesteps.shape
        assert rel_err(sched.timesteps, ref.timesteps) <= SCHED_TOL
        if getattr(ref, "sigmas", None) is not None:
            assert rel_err(sched.sigmas, torch.as_tensor(ref.sigmas)) <= SCHED_TOL


def test_names_cover_the_brief_and_leave_out_what_diffusers_lacks():
    assert set(PROMISED) <= {n.lower() for n in names.SCHEDULER_NAMES} | set(PROMISED)  # spellings aside
    for name in PROMISED:
        assert names.scheduler_options(name)[0] == PROMISED[name][0]
    for name in LEFT_OUT:
        with pytest.raises(ValueError, match="unknown scheduler name"):
            names.scheduler_options(name)
    assert len(set(map(str.lower, names.SCHEDULER_NAMES))) == len(names.SCHEDULER_NAMES)


def test_names_are_matched_loosely_and_errors_list_the_names():
    want = names.scheduler_options("DPM++ 2M Karras")
    for spelling in ("dpm++ 2m karras", "  DPM++   2M\tKARRAS ", "DPM++_2M_Karras"):
        assert names.scheduler_options(spelling) == want
    with pytest.raises(ValueError, match=r"choose a sampler: Euler, Euler a.*Karras, Exponential, Beta"):
        minidiff.scheduler_from_name("Euler b", SD15)
    with pytest.raises(ValueError, match="takes no Karras schedule"):
        minidiff.scheduler_from_name("DDIM Karras", SD15)


def test_the_table_agrees_with_diffusers_classes():
    """σ schedule types exactly for the classes whose diffusers __init__ takes use_karras_sigmas, spacing types for
    those that take timestep_spacing (and use it)."""
    for _, class_name, _ in names._SAMPLERS:
        takes = "use_karras_sigmas" in inspect.signature(getattr(diffusers, class_name).__init__).parameters
        assert takes == (class_name in names.SIGMA_SPACED), class_name
        spaced = "timestep_spacing" in inspect.signature(getattr(diffusers, class_name).__init__).parameters
        assert spaced or class_name in names.FIXED_SPACING, class_name
    assert "timestep_spacing" not in inspect.signature(diffusers.DPMSolverSinglestepScheduler.__init__).parameters


def test_exports_and_defaults(monkeypatch):
    assert minidiff.scheduler_from_name is ms.scheduler_from_name and minidiff.SCHEDULER_NAMES is ms.SCHEDULER_NAMES
    sched = minidiff.scheduler_from_name("Euler a")  # no config: the class defaults
    assert isinstance(sched, ms.EulerAncestralDiscreteScheduler) and sched.config.beta_schedule == "linear"
    # a class still to come is named by string and looked up when used
    monkeypatch.delattr(ms, "DDIMScheduler")
    with pytest.raises(ValueError, match="needs DDIMScheduler"):
        minidiff.scheduler_from_name("DDIM", SD15)


# -- the command line ---------------------------------------------------------------------------------

PROMPT = "a red circle on a white background"


def generate(tmp_path, scheduler: str) -> np.ndarray:
    out = tmp_path / f"{len(list(tmp_path.iterdir()))}.png"
    assert (
        main(["generate", PROMPT, "--steps", "4", "--seed", "5", "--scheduler", scheduler, "--output", str(out)]) == 0
    )
    return np.asarray(Image.open(out))


def test_cli_generate_takes_a_sampler_name(tmp_path):
    """`minidiff generate --scheduler "DPM++ 2M Karras"` is the Python API with scheduler_from_name; the old short
    names and class names still work."""
    pipe = minidiff.StableDiffusionPipeline.from_pretrained(minidiff.DEFAULT_MODEL, local_files_only=True)
    pipe.scheduler = minidiff.scheduler_from_name("DPM++ 2M Karras", pipe.scheduler.config)
    assert pipe.scheduler.config.use_karras_sigmas and type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    image = pipe(PROMPT, num_inference_steps=4, generator=torch.Generator().manual_seed(5), output_type="np").images
    cli = generate(tmp_path, "DPM++ 2M Karras")
    assert np.abs(cli.astype(int) - np.round(image[0] * 255).astype(int)).max() <= 1
    assert np.array_equal(cli, generate(tmp_path, "dpmpp_2m_karras"))
    assert not np.array_equal(cli, generate(tmp_path, "dpm++"))  # the short name: the class on the model's config
    assert np.array_equal(generate(tmp_path, "euler-a"), generate(tmp_path, "EulerAncestralDiscreteScheduler"))


def test_cli_help_lists_the_names_and_bad_names_are_one_line_errors(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for name in (*names.SAMPLER_NAMES, *names.SCHEDULE_TYPES, "dpm++", "euler-a"):
        assert name in shown, name
    with pytest.raises(CLIError) as e:
        main(["generate", PROMPT, "--scheduler", "DPM++ 2S a"])
    assert e.value.code == 2 and "choose a sampler: Euler" in str(e.value) and "dpm++" in str(e.value)
    with pytest.raises(CLIError, match="takes no Karras"):
        main(["generate", PROMPT, "--scheduler", "DDIM Karras"])
    with pytest.raises(CLIError, match="with --prompts, --scheduler is a short or class name"):
        main(["generate", "--prompts", "p.jsonl", "--outdir", "o", "--scheduler", "DPM++ 2M Karras"])
