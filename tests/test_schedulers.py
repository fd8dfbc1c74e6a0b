"""Differential tests of minidiff.schedulers against diffusers' own scheduler classes.

Every case builds the same config on both sides, compares timesteps / sigmas / init_noise_sigma,
then runs a whole sampling loop with a deterministic, non-trivial stand-in model and compares
every prev_sample (and pred_original_sample where diffusers has it). Stochastic samplers share
a seeded CPU generator on both sides. No test touches the network.
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import rel_err

from minidiff import schedulers as ms

diffusers = pytest.importorskip("diffusers")
warnings.filterwarnings("ignore", module="diffusers")
diffusers.utils.logging.set_verbosity_error()

SHAPE = (2, 4, 8, 8)
TRAJ_TOL = 1e-4  # relative, whole trajectories
SCHED_TOL = 1e-5  # timesteps, sigmas, init_noise_sigma
SD = dict(beta_start=0.00085, beta_end=0.012)  # Stable Diffusion's betas (with scaled_linear)
# the nine schedulers of round one; the later ones have their own files (test_schedulers_round2_*.py)
ROUND_ONE = {
    name: ms.SCHEDULERS[name]
    for name in (
        "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
        "UniPCMultistepScheduler",
    )
}  # fmt: skip


def reference(name: str) -> type:
    return getattr(diffusers, name)


def model(x: torch.Tensor, t: torch.Tensor | float, channels_out: int | None = None) -> torch.Tensor:
    """A fixed nonlinear stand-in for the UNet: depends on the sample and (smoothly) on t."""
    tf = float(t)
    out = 0.8 * torch.tanh(0.7 * x) + 0.1 * math.sin(tf / 91.0) * x + 0.05 * math.cos(tf / 137.0)
    out = out + 0.02 * torch.roll(x, 1, dims=-1)  # some spatial mixing
    if channels_out and channels_out > x.shape[1]:  # learned variance: extra channels, positive and in [-1, 1]
        out = torch.cat([out, 0.1 * torch.sigmoid(x)], dim=1)
    return out


def takes(sched: object, arg: str) -> bool:
    return arg in inspect.signature(sched.step).parameters


def run_loop(
    sched, steps: int, start: int = 0, begin_index: bool = False, step_kwargs: dict | None = None, shape: tuple = SHAPE
):
    """set_timesteps, then (img2img when start > 0) add_noise at timesteps[start] and step from there."""
    step_kwargs = dict(step_kwargs or {})
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(shape, generator=g)
    if start == 0:
        x = x0 * sched.init_noise_sigma
    else:
        noise = torch.randn(shape, generator=g)
        if begin_index:
            sched.set_begin_index(start)
        x = sched.add_noise(x0, noise, sched.timesteps[start : start + 1])
    learned = sched.config.get("variance_type") in ("learned", "learned_range")
    outs = [x]
    for t in sched.timesteps[start:]:
        inp = sched.scale_model_input(x, t)
        kw = dict(step_kwargs, generator=g) if takes(sched, "generator") else step_kwargs
        out = sched.step(model(inp, t, 2 * shape[1] if learned else None), t, x, **kw)
        x = out.prev_sample
        outs.append((out.prev_sample, getattr(out, "pred_original_sample", None)))
    # the generator must have advanced exactly as diffusers advances it (every draw, the last step's too)
    outs.append((torch.randn(SHAPE, generator=g), None))
    return outs


def run_in_dtype(sched, dtype: torch.dtype, steps: int = 6) -> torch.Tensor:
    """A whole loop on half-precision latents (the stand-in model runs in float32); the last sample."""
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(SHAPE, generator=g) * sched.init_noise_sigma).to(dtype)
    for t in sched.timesteps:
        kw = dict(generator=g) if takes(sched, "generator") else {}
        x = sched.step(model(sched.scale_model_input(x, t).float(), t).to(dtype), t, x, **kw).prev_sample
    return x


def assert_schedule_matches(mine, ref) -> None:
    assert mine.timesteps.dtype == ref.timesteps.dtype, (mine.timesteps.dtype, ref.timesteps.dtype)
    assert mine.timesteps.shape == ref.timesteps.shape
    assert rel_err(mine.timesteps, ref.timesteps) <= SCHED_TOL
    if hasattr(ref, "sigmas") and ref.sigmas is not None:
        assert mine.sigmas.shape == ref.sigmas.shape
        assert rel_err(mine.sigmas, ref.sigmas) <= SCHED_TOL
    assert rel_err(torch.as_tensor(mine.init_noise_sigma), torch.as_tensor(ref.init_noise_sigma)) <= SCHED_TOL
    if hasattr(ref, "alphas_cumprod"):  # (the EDM schedulers have no β schedule)
        assert rel_err(mine.alphas_cumprod, ref.alphas_cumprod) <= SCHED_TOL
    assert mine.order == ref.order
    assert mine.num_inference_steps == ref.num_inference_steps


def diffusers_nan_at_the_end(name: str, config: dict) -> bool:
    """UniPC bh1 steps to σ = 0 with B(h) = h = -inf and computes -inf · 0 = NaN; minidiff skips the empty term."""
    bh1_to_zero = config.get("solver_type") == "bh1" and config.get("final_sigmas_type", "zero") == "zero"
    return name == "UniPCMultistepScheduler" and bh1_to_zero


def assert_loops_match(name: str, config: dict, steps: int, step_kwargs: dict | None = None, **loop) -> None:
    mine, ref = getattr(ms, name)(**config), reference(name)(**config)
    got = run_loop(mine, steps, step_kwargs=step_kwargs, **loop)
    want = run_loop(ref, steps, step_kwargs=step_kwargs, **loop)
    assert_schedule_matches(mine, ref)
    assert len(got) == len(want)
    assert rel_err(got[0], want[0]) <= TRAJ_TOL  # the starting sample (add_noise / init_noise_sigma)
    if diffusers_nan_at_the_end(name, config):  # [-1] is the generator check, [-2] the final sample
        assert not torch.isfinite(want[-2][0]).all() and torch.isfinite(got[-2][0]).all()
        got, want = got[:-2] + got[-1:], want[:-2] + want[-1:]
    for i, ((x, x0), (y, y0)) in enumerate(zip(got[1:], want[1:])):
        assert torch.isfinite(y).all(), f"diffusers itself is not finite at step {i}: a bad test case"
        assert rel_err(x, y) <= TRAJ_TOL, f"prev_sample differs at step {i}: {rel_err(x, y):.2e}"
        if y0 is not None:
            assert rel_err(x0, y0) <= TRAJ_TOL, f"pred_original_sample differs at step {i}: {rel_err(x0, y0):.2e}"


# ---------------------------------------------------------------------------------------------
# The option matrix: (class, config, steps, step kwargs)


def grid(**axes) -> list[dict]:
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]


def betas(schedule: str) -> dict:
    return dict(SD, beta_schedule=schedule) if schedule == "scaled_linear" else dict(beta_schedule=schedule)


BASE = [  # beta schedule × prediction type × spacing (+ steps_offset with leading)
    dict(betas(b), prediction_type=p, timestep_spacing=s, steps_offset=1 if s == "leading" else 0)
    for b, p, s in itertools.product(
        ("linear", "scaled_linear", "squaredcos_cap_v2"),
        ("epsilon", "v_prediction", "sample"),
        ("leading", "linspace", "trailing"),
    )
]
TRAINED = dict(trained_betas=torch.linspace(0.0001, 0.03, 1000).tolist())
ZERO_SNR = dict(
    SD,
    beta_schedule="scaled_linear",
    rescale_betas_zero_snr=True,
    prediction_type="v_prediction",
    timestep_spacing="trailing",
)
SD_BETAS = dict(SD, beta_schedule="scaled_linear")

CASES: list[tuple[str, dict, int, dict]] = []


def add(name: str, configs: list[dict], steps: tuple[int, ...] = (10,), **step_kwargs) -> None:
    CASES.extend((name, c, n, step_kwargs) for c in configs for n in steps)


def no_sample(configs: list[dict]) -> list[dict]:
    return [c for c in configs if c.get("prediction_type") != "sample"]


# DDPM
add("DDPMScheduler", BASE + [TRAINED, ZERO_SNR, dict(clip_sample=False), dict(clip_sample_range=0.5)])
add(
    "DDPMScheduler",
    grid(
        variance_type=["fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range"],
        clip_sample=[True, False],
    ),
    steps=(7,),
)
add("DDPMScheduler", [dict(beta_schedule="sigmoid"), dict(timestep_spacing="trailing")], steps=(50,))
# DDIM
add("DDIMScheduler", BASE + [TRAINED, ZERO_SNR, dict(set_alpha_to_one=False, clip_sample=False)])
add(
    "DDIMScheduler",
    grid(set_alpha_to_one=[True, False], clip_sample=[True, False], prediction_type=["epsilon", "v_prediction"]),
    eta=0.7,
)
add("DDIMScheduler", [dict(clip_sample=True, clip_sample_range=0.8)], eta=1.0, use_clipped_model_output=True)
add("DDIMScheduler", [dict(SD_BETAS, steps_offset=1, clip_sample=False)], steps=(1, 50))
# PNDM: PRK + PLMS, and PLMS only (the SD default)
add("PNDMScheduler", no_sample(BASE))
add("PNDMScheduler", [dict(b, skip_prk_steps=True) for b in no_sample(BASE)] + [TRAINED])
add("PNDMScheduler", grid(skip_prk_steps=[True, False], set_alpha_to_one=[True, False]), steps=(4, 25))
add("PNDMScheduler", [dict(skip_prk_steps=True)], steps=(1, 2))
# LMS
add(
    "LMSDiscreteScheduler",
    BASE + [TRAINED, dict(use_karras_sigmas=True), dict(SD_BETAS, use_karras_sigmas=True, timestep_spacing="leading")],
)
add("LMSDiscreteScheduler", [SD_BETAS], steps=(1, 3, 30))
add("LMSDiscreteScheduler", [SD_BETAS], order=2)
# Euler
add("EulerDiscreteScheduler", BASE + [TRAINED, ZERO_SNR])
add(
    "EulerDiscreteScheduler",
    grid(
        interpolation_type=["linear", "log_linear"],
        use_karras_sigmas=[False, True],
        final_sigmas_type=["zero", "sigma_min"],
        timestep_spacing=["linspace", "leading"],
    ),
)
add(
    "EulerDiscreteScheduler",
    [
        dict(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0),
        dict(prediction_type="v_prediction", timestep_type="continuous"),
    ],
)
add("EulerDiscreteScheduler", [SD_BETAS, dict(prediction_type="v_prediction")], s_churn=1.0, s_tmin=0.5, s_tmax=50.0)
# Euler ancestral
add("EulerAncestralDiscreteScheduler", no_sample(BASE) + [TRAINED, ZERO_SNR])
add("EulerAncestralDiscreteScheduler", [SD_BETAS], steps=(1, 30))
# Heun
add("HeunDiscreteScheduler", BASE + [TRAINED, dict(beta_schedule="exp")])
add(
    "HeunDiscreteScheduler",
    grid(
        use_karras_sigmas=[False, True], clip_sample=[False, True], timestep_spacing=["linspace", "leading", "trailing"]
    ),
    steps=(6,),
)
# DPM-Solver++ (Karras σ's end at σ_min, so final_sigmas_type="sigma_min" makes the last h = 0: diffusers
# divides by it unless that step is first order)
add("DPMSolverMultistepScheduler", BASE + [TRAINED, ZERO_SNR])
DPM_GRID = grid(
    algorithm_type=["dpmsolver++", "sde-dpmsolver++"],
    solver_order=[1, 2, 3],
    lower_order_final=[True, False],
    use_karras_sigmas=[False, True],
    final_sigmas_type=["zero", "sigma_min"],
)
add(
    "DPMSolverMultistepScheduler",
    [
        c
        for c in DPM_GRID
        if not (c["use_karras_sigmas"] and c["final_sigmas_type"] == "sigma_min" and c["solver_order"] > 1)
    ],
    steps=(8, 20),  # below and above the 15 steps where lower_order_final kicks in
)
add(
    "DPMSolverMultistepScheduler",
    grid(
        algorithm_type=["dpmsolver++", "sde-dpmsolver++"],
        solver_type=["midpoint", "heun"],
        solver_order=[2, 3],
        prediction_type=["epsilon", "v_prediction", "sample"],
    ),
)
add(
    "DPMSolverMultistepScheduler",
    [
        dict(euler_at_final=True, final_sigmas_type="sigma_min"),
        dict(use_lu_lambdas=True),
        dict(use_karras_sigmas=True, final_sigmas_type="sigma_min"),
        dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1),
        dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1, timestep_spacing="trailing"),
        dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True, solver_order=2),
    ],
    steps=(12,),
)


# UniPC
def unipc_case(config: dict) -> dict:
    # diffusers overflows on a last step to σ = 0 without lower_order_final, or with predict_x0=False
    if not (config["lower_order_final"] and config["predict_x0"]):
        config["final_sigmas_type"] = "sigma_min"
    return config


UNIPC_GRID = grid(
    solver_type=["bh1", "bh2"],
    solver_order=[1, 2, 3],
    predict_x0=[True, False],
    lower_order_final=[True, False],
    use_karras_sigmas=[False, True],
)
add("UniPCMultistepScheduler", BASE + [TRAINED, ZERO_SNR])
add(  # (Karras + σ_min final + no lower_order_final: h = 0 again)
    "UniPCMultistepScheduler",
    [unipc_case(c) for c in UNIPC_GRID if c["lower_order_final"] or not c["use_karras_sigmas"]],
    steps=(8,),
)
add(
    "UniPCMultistepScheduler",
    [
        dict(disable_corrector=[0, 2]),
        dict(solver_order=3, disable_corrector=[1]),
        dict(predict_x0=False, prediction_type="v_prediction", final_sigmas_type="sigma_min"),
        dict(predict_x0=False, prediction_type="sample", final_sigmas_type="sigma_min"),
        dict(final_sigmas_type="sigma_min"),
        dict(use_karras_sigmas=True, final_sigmas_type="sigma_min"),
        dict(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0),
    ],
    steps=(5, 16),
)

# trailing spacing with n = 61: np.arange(T, 0, -T/n) has a 62nd point, so diffusers has 62 timesteps, the last -1
for _name in ROUND_ONE:
    _trailing = dict(timestep_spacing="trailing", **({"skip_prk_steps": True} if _name == "PNDMScheduler" else {}))
    add(_name, [_trailing], steps=(61,))


def case_id(case) -> str:
    name, config, steps, kw = case
    short = ",".join(f"{k}={v}" for k, v in config.items() if k not in ("trained_betas", "beta_start", "beta_end"))
    if "trained_betas" in config:
        short = "trained_betas," + short
    extra = ",".join(f"{k}={v}" for k, v in kw.items())
    return f"{name.replace('Scheduler', '')}[{short}]n={steps}" + (f"[{extra}]" if extra else "")


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_trajectory_matches_diffusers(case):
    name, config, steps, step_kwargs = case
    assert_loops_match(name, config, steps, step_kwargs)


def test_matrix_covers_every_scheduler():
    assert {c[0] for c in CASES} == set(ROUND_ONE)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(ROUND_ONE))
def test_low_precision_samples_match_diffusers(name, dtype):
    """Half-precision latents: the same upcasts (Euler, DPM-Solver step in float32) and the same output dtype."""
    outs = [run_in_dtype(getattr(lib, name)(), dtype) for lib in (ms, diffusers)]
    assert outs[0].dtype == outs[1].dtype == dtype
    assert rel_err(outs[0], outs[1]) <= 1e-3


# ---------------------------------------------------------------------------------------------
# img2img: add_noise at timesteps[start], then step from there


IMG2IMG = [
    ("DDPMScheduler", {}),
    ("DDIMScheduler", dict(SD_BETAS, steps_offset=1)),
    ("PNDMScheduler", dict(SD_BETAS, skip_prk_steps=True)),
    ("LMSDiscreteScheduler", SD_BETAS),
    ("EulerDiscreteScheduler", dict(use_karras_sigmas=True)),
    ("EulerAncestralDiscreteScheduler", {}),
    ("HeunDiscreteScheduler", {}),
    ("HeunDiscreteScheduler", dict(use_karras_sigmas=True)),
    ("DPMSolverMultistepScheduler", dict(solver_order=3)),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++")),
    ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True)),
    ("UniPCMultistepScheduler", dict(solver_order=3)),
]


@pytest.mark.parametrize("start", [1, 4, 7])
@pytest.mark.parametrize("name,config", IMG2IMG, ids=[f"{n}{c}" for n, c in IMG2IMG])
def test_img2img_matches_diffusers(name, config, start):
    # start counts steps, as pipelines do: Heun's timesteps hold two entries per step
    assert_loops_match(name, config, 12, start=start * reference(name).order)


def test_dpm_learned_variance_matches_diffusers():
    # diffusers keeps the first 3 channels of a learned-variance output, so this needs a 3-channel sample
    assert_loops_match("DPMSolverMultistepScheduler", dict(variance_type="learned_range"), 12, shape=(2, 3, 8, 8))


@pytest.mark.parametrize("name,config", [c for c in IMG2IMG if hasattr(reference(c[0]), "set_begin_index")])
def test_img2img_with_begin_index_matches_diffusers(name, config):
    order = reference(name).order
    assert_loops_match(name, config, 12, start=4 * order, begin_index=True)


# ---------------------------------------------------------------------------------------------
# Config: from_config swapping, save_pretrained / from_pretrained both ways


def normalized(config) -> dict:
    out = json.loads(json.dumps({k: v for k, v in config.items()}, default=lambda v: v.tolist()))
    out.pop("_diffusers_version", None)
    out["_use_default_values"] = sorted(out.get("_use_default_values", []))
    return out


SD_PNDM_JSON = {  # CompVis/stable-diffusion-v1-4's scheduler_config.json
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.7.0.dev0",
    **dict(beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085, num_train_timesteps=1000),
    **dict(set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, trained_betas=None, clip_sample=False),
}
SOURCES = {
    "sd-json": lambda lib: SD_PNDM_JSON,
    "dpm-built": lambda lib: lib.DPMSolverMultistepScheduler(solver_order=3, use_karras_sigmas=True, **SD).config,
    "unipc-built": lambda lib: lib.UniPCMultistepScheduler(solver_type="bh1", timestep_spacing="trailing").config,
    "ddpm-built": lambda lib: lib.DDPMScheduler(variance_type="fixed_large", clip_sample=False).config,
    # Karras σ's with a sigma range that Heun and DPM-Solver (which have no such keys) still honour
    "euler-karras-range": lambda lib: (
        lib.EulerDiscreteScheduler(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0, **SD).config
    ),
}


@pytest.mark.parametrize("target", list(ROUND_ONE))
@pytest.mark.parametrize("source", list(SOURCES))
def test_from_config_swaps_like_diffusers(source, target):
    mine = getattr(ms, target).from_config(SOURCES[source](ms))
    ref = reference(target).from_config(SOURCES[source](diffusers))
    assert normalized(mine.config) == normalized(ref.config)
    # a diffusers config object can be handed to minidiff directly, and vice versa
    assert normalized(getattr(ms, target).from_config(SOURCES[source](diffusers)).config) == normalized(ref.config)
    assert normalized(reference(target).from_config(SOURCES[source](ms)).config) == normalized(ref.config)
    mine.set_timesteps(9)
    ref.set_timesteps(9)
    assert_schedule_matches(mine, ref)


def test_from_config_keeps_unknown_keys_and_takes_overrides():
    pndm = ms.PNDMScheduler.from_config(SD_PNDM_JSON)
    ddim = ms.DDIMScheduler.from_config(pndm.config, timestep_spacing="trailing")
    assert ddim.config.skip_prk_steps is True and ddim.config["_class_name"] == "DDIMScheduler"
    assert ddim.config.timestep_spacing == "trailing" and ddim.config.steps_offset == 1
    back = ms.PNDMScheduler.from_config(ddim.config)
    assert back.config.skip_prk_steps is True
    with pytest.raises(TypeError):
        ddim.config["clip_sample"] = True  # configs are immutable


@pytest.mark.parametrize("name", list(ROUND_ONE))
def test_save_pretrained_round_trips_through_diffusers(name, tmp_path):
    config = dict(TRAINED, prediction_type="v_prediction", timestep_spacing="trailing")
    mine = getattr(ms, name)(**config)
    mine.save_pretrained(tmp_path / "mine" / "scheduler")
    ref = reference(name)(**config)
    ref.save_pretrained(tmp_path / "ref" / "scheduler")
    written = json.loads((tmp_path / "mine" / "scheduler" / "scheduler_config.json").read_text())
    assert written == json.loads((tmp_path / "ref" / "scheduler" / "scheduler_config.json").read_text())

    loaded_ref = reference(name).from_pretrained(tmp_path / "mine", subfolder="scheduler")
    loaded_mine = getattr(ms, name).from_pretrained(tmp_path / "ref", subfolder="scheduler", local_files_only=True)
    assert normalized(loaded_mine.config) == normalized(loaded_ref.config)
    for a, b in ((loaded_mine, loaded_ref), (getattr(ms, name).from_pretrained(tmp_path / "mine" / "scheduler"), ref)):
        a.set_timesteps(10)
        b.set_timesteps(10)
        assert_schedule_matches(a, b)


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("name", list(ROUND_ONE))
def test_bad_num_inference_steps(name):
    sched = getattr(ms, name)()
    for bad in (0, -3, 1001):
        with pytest.raises(ValueError, match="num_inference_steps"):
            sched.set_timesteps(bad)


@pytest.mark.parametrize("name", list(ROUND_ONE))
def test_step_before_set_timesteps(name):
    sched = getattr(ms, name)()
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(x, torch.tensor(999.0), x)


_BAD_OPTIONS = [
    ("beta_schedule", "cubic"),
    ("prediction_type", "noise"),
    ("timestep_spacing", "uniform"),
]


# only the options each class has (e.g. the sigma-based schedulers have no thresholding)
@pytest.mark.parametrize(
    "name,key,value",
    [(n, k, v) for n, cls in ROUND_ONE.items() for k, v in _BAD_OPTIONS if k in cls.config_keys()],
)
def test_bad_options(name, key, value):
    cls = getattr(ms, name)
    with pytest.raises(ValueError, match=key):
        cls(**{key: value})


def test_pndm_with_prk_needs_four_steps():
    with pytest.raises(ValueError, match="num_inference_steps"):
        ms.PNDMScheduler().set_timesteps(3)


@pytest.mark.parametrize(
    "name,key,value",
    [
        ("DDPMScheduler", "variance_type", "fixed_medium"),
        ("DPMSolverMultistepScheduler", "algorithm_type", "dpmsolver"),
        ("DPMSolverMultistepScheduler", "algorithm_type", "sde-dpmsolver"),
        ("DPMSolverMultistepScheduler", "solver_type", "rk4"),
        ("DPMSolverMultistepScheduler", "solver_order", 4),
        ("UniPCMultistepScheduler", "solver_type", "bh3"),
        ("EulerDiscreteScheduler", "interpolation_type", "cubic"),
        ("DPMSolverMultistepScheduler", "use_flow_sigmas", True),  # (thresholding, beta σ's: test_scheduler_options)
        ("EulerAncestralDiscreteScheduler", "prediction_type", "sample"),
        ("PNDMScheduler", "prediction_type", "sample"),
    ],
)
def test_bad_class_options(name, key, value):
    with pytest.raises(ValueError, match=key):
        getattr(ms, name)(**{key: value})


def test_unknown_constructor_keyword_is_an_error():
    with pytest.raises(TypeError):
        ms.DDIMScheduler(beta_shedule="linear")


def test_sigma_schedulers_refuse_unknown_timesteps_and_loop_indices():
    euler = ms.EulerDiscreteScheduler()
    euler.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep"):
        euler.step(torch.zeros(SHAPE), torch.tensor(3.5), torch.zeros(SHAPE))
    with pytest.raises(ValueError, match="loop index"):
        euler.step(torch.zeros(SHAPE), 3, torch.zeros(SHAPE))


# ---------------------------------------------------------------------------------------------
# Pieces


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_lms_coefficients_equal_scipy_quad(order):
    from scipy import integrate

    from minidiff.schedulers.lms import lms_coefficient

    sigmas = torch.tensor([14.6, 9.3, 5.1, 2.7, 1.2, 0.4, 0.0], dtype=torch.float64).numpy()
    for i in range(order - 1, len(sigmas) - 1):
        for j in range(order):

            def basis(tau, i=i, j=j):
                return math.prod(
                    (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k]) for k in range(order) if k != j
                )

            exact = integrate.quad(basis, sigmas[i], sigmas[i + 1], epsabs=0, epsrel=1e-13)[0]
            assert lms_coefficient(sigmas, order, i, j) == pytest.approx(exact, rel=1e-12, abs=1e-12)


def test_output_is_indexable_and_tuple_form_matches():
    sched = ms.DDIMScheduler()
    sched.set_timesteps(5)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    out = sched.step(model(x, 800), sched.timesteps[0], x)
    tup = sched.step(model(x, 800), sched.timesteps[0], x, return_dict=False)
    assert (
        out[0] is out.prev_sample
        and torch.equal(tup[0], out.prev_sample)
        and torch.equal(tup[1], out.pred_original_sample)
    )


def test_add_noise_matches_diffusers_for_a_batch_of_timesteps():
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    for name in ROUND_ONE:
        mine, ref = getattr(ms, name)(), reference(name)()
        mine.set_timesteps(20)
        ref.set_timesteps(20)
        t = ref.timesteps[[0, 7]]
        assert rel_err(mine.add_noise(x0, noise, t), ref.add_noise(x0, noise, t)) <= TRAJ_TOL, name
        if hasattr(ref, "set_begin_index"):  # a fixed begin index wins over the timesteps given
            mine.set_begin_index(3)
            ref.set_begin_index(3)
            assert rel_err(mine.add_noise(x0, noise, t), ref.add_noise(x0, noise, t)) <= TRAJ_TOL, name


def test_ddpm_fixed_large_log_is_fixed_large():
    # diffusers computes sqrt(log β) here, i.e. NaN; minidiff uses the variance β the name means
    outs = [run_loop(ms.DDPMScheduler(variance_type=kind), 8) for kind in ("fixed_large_log", "fixed_large")]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(outs[0][1:], outs[1][1:]))
    assert torch.isfinite(outs[0][-2][0]).all()


def test_ddpm_custom_timesteps_match_diffusers():
    mine, ref = ms.DDPMScheduler(), diffusers.DDPMScheduler()
    custom = [999, 800, 450, 200, 60, 0]
    mine.set_timesteps(timesteps=custom)
    ref.set_timesteps(timesteps=custom)
    assert torch.equal(mine.timesteps, ref.timesteps)
    with pytest.raises(ValueError, match="descending"):
        mine.set_timesteps(timesteps=[10, 20])


def test_euler_custom_sigmas_match_diffusers():
    custom = [14.6, 6.4, 3.8, 2.6, 1.8, 1.3, 0.9, 0.6, 0.4, 0.15, 0.0]
    mine, ref = ms.EulerDiscreteScheduler(**SD_BETAS), diffusers.EulerDiscreteScheduler(**SD_BETAS)
    mine.set_timesteps(sigmas=custom)
    ref.set_timesteps(sigmas=custom)
    assert_schedule_matches(mine, ref)


def test_importing_schedulers_does_not_import_scipy():
    code = (
        "import sys, minidiff.schedulers as s; s.LMSDiscreteScheduler().set_timesteps(5); "
        "assert 'scipy' not in sys.modules, 'scipy was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
