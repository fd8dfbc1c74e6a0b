"""Differential tests of the round-two samplers against diffusers: KDPM2 (DPM2 and DPM2 a), LCM, TCD, EDM.

Each case builds the same config on both sides, compares timesteps / sigmas / init_noise_sigma,
then runs a whole sampling loop with a deterministic stand-in model and compares every field of
every step's output. Stochastic samplers share a seeded CPU generator, and the generator must
have advanced the same way at the end. No test touches the network.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from conftest import rel_err
from test_schedulers import SD, SHAPE, TRAINED, grid, model, normalized, run_in_dtype, takes

from minidiff import schedulers as ms

diffusers = pytest.importorskip("diffusers")

TRAJ_TOL = 1e-4  # relative, whole trajectories
SCHED_TOL = 1e-5  # timesteps, sigmas, init_noise_sigma

ROUND_TWO = (
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "LCMScheduler",
    "TCDScheduler",
    "EDMEulerScheduler",
    "EDMDPMSolverMultistepScheduler",
)


def run_loop(sched, set_kwargs: dict, step_kwargs: dict, start: int = 0, begin_index: bool = False) -> list:
    """set_timesteps, then (img2img when start > 0) add_noise at timesteps[start], and step to the end."""
    sched.set_timesteps(**set_kwargs)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(SHAPE, generator=g)
    if start == 0:
        x = x0 * sched.init_noise_sigma
    else:
        if begin_index:
            sched.set_begin_index(start)
        x = sched.add_noise(x0, torch.randn(SHAPE, generator=g), sched.timesteps[start : start + 1])
    outs = [x]
    for t in sched.timesteps[start:]:
        kw = dict(step_kwargs, generator=g) if takes(sched, "generator") else step_kwargs
        out = sched.step(model(sched.scale_model_input(x, t), t), t, x, **kw)
        x = out.prev_sample
        outs.append({f.name: getattr(out, f.name) for f in dataclasses.fields(out)})
    return outs + [torch.randn(SHAPE, generator=g)]  # the generator advanced as in diffusers


def assert_schedule_matches(mine, ref) -> None:
    assert mine.timesteps.dtype == ref.timesteps.dtype, (mine.timesteps.dtype, ref.timesteps.dtype)
    assert mine.timesteps.shape == ref.timesteps.shape, (mine.timesteps, ref.timesteps)
    assert rel_err(mine.timesteps, ref.timesteps) <= SCHED_TOL
    if getattr(ref, "sigmas", None) is not None:
        assert mine.sigmas.shape == ref.sigmas.shape, (mine.sigmas, ref.sigmas)
        assert rel_err(mine.sigmas, ref.sigmas) <= SCHED_TOL
    assert rel_err(torch.as_tensor(mine.init_noise_sigma), torch.as_tensor(ref.init_noise_sigma)) <= SCHED_TOL
    if hasattr(ref, "alphas_cumprod"):
        assert rel_err(mine.alphas_cumprod, ref.alphas_cumprod) <= SCHED_TOL
    assert mine.order == ref.order
    # (after a custom EDM ramp diffusers leaves num_inference_steps at None; minidiff counts the steps)
    assert mine.num_inference_steps == (ref.num_inference_steps or len(ref.timesteps))


def assert_loops_match(mine, ref, set_kwargs: dict, step_kwargs: dict | None = None, **loop) -> None:
    got = run_loop(mine, set_kwargs, step_kwargs or {}, **loop)
    want = run_loop(ref, set_kwargs, step_kwargs or {}, **loop)
    assert_schedule_matches(mine, ref)
    assert len(got) == len(want)
    assert rel_err(got[0], want[0]) <= TRAJ_TOL  # the starting sample
    assert torch.equal(got[-1], want[-1]), "the generator advanced differently"
    for i, (a, b) in enumerate(zip(got[1:-1], want[1:-1])):
        for name, y in b.items():  # every output diffusers gives, under its name (LCM: denoised)
            if y is None:
                continue
            x = a.get(name)
            assert x is not None, f"step {i}: no {name} in {list(a)}"
            assert torch.isfinite(y).all(), f"diffusers itself is not finite at step {i}: a bad test case"
            assert x.dtype == y.dtype, (name, x.dtype, y.dtype)
            assert rel_err(x, y) <= TRAJ_TOL, f"{name} differs at step {i}: {rel_err(x, y):.2e}"


# ---------------------------------------------------------------------------------------------
# The option matrix: (class, config, set_timesteps kwargs, step kwargs)

CASES: list[tuple[str, dict, dict, dict]] = []


def add(name: str, configs: list[dict], steps=(8,), set_kwargs: dict | None = None, **step_kwargs) -> None:
    for config, n in itertools.product(configs, steps):
        CASES.append((name, config, dict(set_kwargs or {}, num_inference_steps=n), step_kwargs))


def betas(schedule: str) -> dict:
    return dict(SD, beta_schedule=schedule) if schedule == "scaled_linear" else dict(beta_schedule=schedule)


# DPM2 and DPM2 a: beta schedule × prediction × spacing (+ steps_offset with leading) × Karras σ's
KDPM2_GRID = [
    dict(betas(b), prediction_type=p, timestep_spacing=s, steps_offset=int(s == "leading"), use_karras_sigmas=k)
    for b, p, s, k in itertools.product(
        ("linear", "scaled_linear"), ("epsilon", "v_prediction"), ("leading", "linspace", "trailing"), (False, True)
    )
]
# the cosine schedule's σ_max ≈ 2e4 breaks diffusers in float32 elsewhere: σ_down = sqrt(σ_next² - σ_up²) cancels
# to 0 (DPM2 a), and rounded Karras timesteps repeat 999, so the loop starts at the second copy (DPM2)
COSINE = [dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="leading")]
for _name in ("KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"):
    add(_name, KDPM2_GRID + COSINE, steps=(7,))
    add(_name, [TRAINED, dict(SD, beta_schedule="scaled_linear")], steps=(1, 3, 25))
    add(_name, [dict(timestep_spacing="trailing")], steps=(61,))  # np.arange's extra point
add("KDPM2DiscreteScheduler", [dict(beta_schedule="squaredcos_cap_v2")], steps=(7,))

# LCM: prediction × the distillation schedule's length, 1-8 steps; custom and shortened schedules
LCM_GRID = grid(prediction_type=["epsilon", "v_prediction", "sample"], original_inference_steps=[50, 20])
LCM_MORE = [
    dict(timestep_scaling=5.0),
    dict(rescale_betas_zero_snr=True, prediction_type="v_prediction"),
    dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    dict(beta_schedule="squaredcos_cap_v2", set_alpha_to_one=False),
    dict(timestep_spacing="trailing", steps_offset=1),  # accepted, and ignored as diffusers ignores them
    TRAINED,
]
add("LCMScheduler", LCM_GRID, steps=(1, 4, 8))
add(
    "LCMScheduler",
    LCM_MORE
    + [
        dict(clip_sample=True, clip_sample_range=0.5),
        dict(thresholding=True, sample_max_value=1.5, dynamic_thresholding_ratio=0.9),
    ],
    steps=(4,),
)
add(
    "LCMScheduler", [{}, dict(original_inference_steps=100)], steps=(2, 6), set_kwargs=dict(original_inference_steps=30)
)
add("LCMScheduler", [{}], steps=(4, 10), set_kwargs=dict(strength=0.5))
add("LCMScheduler", [{}], steps=(50,))
# TCD: prediction × γ (`eta`), the arbitrary-timestep schedule when original_inference_steps is passed
TCD_GRID = grid(prediction_type=["epsilon", "v_prediction", "sample"])
for _eta in (0.0, 0.3, 1.0):
    add("TCDScheduler", TCD_GRID, steps=(1, 4, 8), eta=_eta)
    add("TCDScheduler", [{}], steps=(3, 7), set_kwargs=dict(original_inference_steps=25), eta=_eta)
add("TCDScheduler", LCM_MORE, steps=(4,))
add("TCDScheduler", [{}], steps=(4,), set_kwargs=dict(strength=0.6), eta=0.5)
# EDM Euler: σ schedule × prediction × last σ × ρ; with churn
EDM_GRID = grid(
    sigma_schedule=["karras", "exponential"],
    prediction_type=["epsilon", "v_prediction"],
    final_sigmas_type=["zero", "sigma_min"],
    rho=[7.0, 3.0],
)
add("EDMEulerScheduler", EDM_GRID, steps=(1, 6, 20))
add("EDMEulerScheduler", [dict(sigma_min=0.01, sigma_max=20.0, sigma_data=1.0)], steps=(10,))
add("EDMEulerScheduler", [{}, dict(sigma_schedule="exponential")], s_churn=2.0, s_tmin=0.1, s_tmax=30.0, s_noise=1.01)
# EDM DPM-Solver++: orders × ODE/SDE × midpoint/heun × lower_order_final × last σ, below and above 15 steps
for _c, _n in itertools.product(
    grid(
        sigma_schedule=["karras", "exponential"],
        solver_order=[1, 2, 3],
        algorithm_type=["dpmsolver++", "sde-dpmsolver++"],
        solver_type=["midpoint", "heun"],
        lower_order_final=[True, False],
        final_sigmas_type=["zero", "sigma_min"],
    ),
    (8, 20),
):
    # diffusers has no third-order SDE update (UnboundLocalError); and σ_min twice at the end makes the last
    # h = 0, so a last step above first order divides 0 by 0 (heun's (e^{-h} - 1) / h, the third order's / h²)
    if _c["solver_order"] == 3 and _c["algorithm_type"] == "sde-dpmsolver++":
        continue
    first_order_last = _c["solver_order"] == 1 or (_c["lower_order_final"] and _n < 15)
    if _c["final_sigmas_type"] == "sigma_min" and not first_order_last:
        if _c["solver_type"] == "heun" or _c["solver_order"] == 3:
            continue
    add("EDMDPMSolverMultistepScheduler", [_c], steps=(_n,))
add(
    "EDMDPMSolverMultistepScheduler",
    grid(prediction_type=["epsilon", "v_prediction"], solver_order=[2, 3], solver_type=["midpoint", "heun"]),
)
add(
    "EDMDPMSolverMultistepScheduler",
    [
        dict(euler_at_final=True, final_sigmas_type="sigma_min"),
        dict(rho=5.0, sigma_min=0.02, sigma_max=14.6, sigma_data=1.0),
        dict(algorithm_type="sde-dpmsolver++", prediction_type="v_prediction", sigma_schedule="exponential"),
        # a sibling solver's names map to DPM-Solver++'s (diffusers then wants a last σ > 0)
        dict(algorithm_type="deis", solver_type="logrho", final_sigmas_type="sigma_min"),
    ],
    steps=(1, 2, 12),
)


def case_id(case) -> str:
    name, config, set_kwargs, kw = case
    short = ",".join(f"{k}={v}" for k, v in config.items() if k not in ("trained_betas", "beta_start", "beta_end"))
    if "trained_betas" in config:
        short = "trained_betas," + short
    sets = ",".join(f"{k}={v}" for k, v in set_kwargs.items()).replace("num_inference_steps", "n")
    extra = ",".join(f"{k}={v}" for k, v in kw.items())
    return f"{name.replace('Scheduler', '')}[{short}][{sets}]" + (f"[{extra}]" if extra else "")


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_trajectory_matches_diffusers(case):
    name, config, set_kwargs, step_kwargs = case
    assert_loops_match(getattr(ms, name)(**config), getattr(diffusers, name)(**config), set_kwargs, step_kwargs)


def test_matrix_covers_every_new_scheduler():
    assert {c[0] for c in CASES} == set(ROUND_TWO)


CUSTOM = [  # set_timesteps without num_inference_steps: LCM / TCD timesteps, EDM's ramp in [0, 1]
    ("LCMScheduler", {}, dict(timesteps=[999, 759, 499, 259])),
    ("LCMScheduler", {}, dict(timesteps=[980, 700, 421, 100, 3])),  # off the distillation schedule (a warning)
    ("LCMScheduler", {}, dict(timesteps=[999, 759, 499, 259], strength=0.5)),
    ("TCDScheduler", {}, dict(timesteps=[999, 759, 499, 259])),
    ("TCDScheduler", {}, dict(timesteps=[980, 700, 421, 100], original_inference_steps=30)),
    ("EDMEulerScheduler", {}, dict(sigmas=torch.tensor([0.0, 0.2, 0.45, 0.7, 1.0]))),
    ("EDMEulerScheduler", dict(sigma_schedule="exponential"), dict(sigmas=torch.tensor([0.0, 0.3, 0.9]))),
]


@pytest.mark.parametrize("name,config,set_kwargs", CUSTOM, ids=[f"{n}{c}{s}" for n, c, s in CUSTOM])
def test_custom_schedules_match_diffusers(name, config, set_kwargs):
    assert_loops_match(getattr(ms, name)(**config), getattr(diffusers, name)(**config), set_kwargs)


IMG2IMG = [
    ("KDPM2DiscreteScheduler", {}),
    ("KDPM2DiscreteScheduler", dict(use_karras_sigmas=True)),
    ("KDPM2AncestralDiscreteScheduler", {}),
    ("LCMScheduler", {}),
    ("TCDScheduler", {}),
    ("EDMEulerScheduler", {}),
    ("EDMDPMSolverMultistepScheduler", dict(solver_order=3)),
    ("EDMDPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++")),
]


@pytest.mark.parametrize("begin_index", [False, True])
@pytest.mark.parametrize("start", [1, 3])
@pytest.mark.parametrize("name,config", IMG2IMG, ids=[f"{n}{c}" for n, c in IMG2IMG])
def test_img2img_matches_diffusers(name, config, start, begin_index):
    # start counts steps, as pipelines do: DPM2's timesteps hold two entries per step
    mine, ref = getattr(ms, name)(**config), getattr(diffusers, name)(**config)
    set_kwargs = dict(num_inference_steps=8)
    assert_loops_match(mine, ref, set_kwargs, start=start * ref.order, begin_index=begin_index)


# ---------------------------------------------------------------------------------------------
# Swaps: A.from_config(B.config) for every pair with a new scheduler on one side


def sources(lib) -> dict:
    """A config of every scheduler, most with a non-default option that the swap must carry."""
    options = {
        "DPMSolverMultistepScheduler": dict(solver_order=3, use_karras_sigmas=True, **SD),
        "EulerDiscreteScheduler": dict(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0, **SD),
        "KDPM2DiscreteScheduler": dict(use_karras_sigmas=True, prediction_type="v_prediction"),
        "KDPM2AncestralDiscreteScheduler": dict(timestep_spacing="trailing"),
        "LCMScheduler": dict(original_inference_steps=20, timestep_scaling=5.0),
        "TCDScheduler": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
        "EDMEulerScheduler": dict(sigma_schedule="exponential", sigma_max=20.0),
        "EDMDPMSolverMultistepScheduler": dict(solver_order=3, sigma_data=1.0),
    }
    return {name: lambda name=name: getattr(lib, name)(**options.get(name, {})).config for name in ms.SCHEDULERS}


SWAPS = [(a, b) for a in ms.SCHEDULERS for b in ms.SCHEDULERS if ROUND_TWO.count(a) + ROUND_TWO.count(b) > 0]


@pytest.mark.parametrize("target,source", SWAPS)
def test_from_config_swaps_like_diffusers(target, source):
    seeded = dict(noise_sampler_seed=0) if target == "DPMSolverSDEScheduler" else {}  # its Brownian tree's seed
    ref = getattr(diffusers, target).from_config(sources(diffusers)[source](), **seeded)
    mine = getattr(ms, target).from_config(sources(ms)[source](), **seeded)
    assert normalized(mine.config) == normalized(ref.config)
    # a diffusers config object can be handed to minidiff directly, and the reverse
    crossed = getattr(ms, target).from_config(sources(diffusers)[source](), **seeded)
    assert normalized(crossed.config) == normalized(ref.config)
    crossed = getattr(diffusers, target).from_config(sources(ms)[source](), **seeded)
    assert normalized(crossed.config) == normalized(ref.config)
    assert_loops_match(mine, ref, dict(num_inference_steps=9))


@pytest.mark.parametrize("name", ROUND_TWO)
def test_save_pretrained_round_trips_through_diffusers(name, tmp_path):
    config = dict(prediction_type="v_prediction")
    mine, ref = getattr(ms, name)(**config), getattr(diffusers, name)(**config)
    mine.save_pretrained(tmp_path / "mine")
    ref.save_pretrained(tmp_path / "ref")
    written = (tmp_path / "mine" / "scheduler_config.json").read_text()
    assert written == (tmp_path / "ref" / "scheduler_config.json").read_text()
    back_ref = getattr(diffusers, name).from_pretrained(tmp_path / "mine")
    back_mine = getattr(ms, name).from_pretrained(tmp_path / "ref")
    assert normalized(back_mine.config) == normalized(back_ref.config)
    assert_loops_match(back_mine, back_ref, dict(num_inference_steps=5))


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("name", ROUND_TWO)
def test_low_precision_samples_match_diffusers(name, dtype, tol):
    """Half-precision latents keep their dtype. Within rounding only: minidiff's EDM DPM-Solver++ step runs in
    float32 (DPMSolverMultistepScheduler's), diffusers' in the latents' dtype."""
    outs = [run_in_dtype(getattr(lib, name)(), dtype, steps=4) for lib in (ms, diffusers)]
    assert outs[0].dtype == outs[1].dtype == dtype
    assert rel_err(outs[0], outs[1]) <= tol


# ---------------------------------------------------------------------------------------------
# Bad input: refused at construction or at set_timesteps, with the option's name


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("KDPM2DiscreteScheduler", dict(prediction_type="sample"), "prediction_type"),  # diffusers: at step()
        ("KDPM2AncestralDiscreteScheduler", dict(prediction_type="sample"), "prediction_type"),
        ("KDPM2DiscreteScheduler", dict(beta_schedule="cubic"), "beta_schedule"),
        ("KDPM2DiscreteScheduler", dict(use_karras_sigmas=True, use_exponential_sigmas=True), "only one"),
        ("LCMScheduler", dict(prediction_type="noise"), "prediction_type"),
        ("TCDScheduler", dict(beta_schedule="sigmoid"), "beta_schedule"),
        ("EDMEulerScheduler", dict(sigma_schedule="linear"), "sigma_schedule"),
        ("EDMEulerScheduler", dict(final_sigmas_type="denoise_to_zero"), "final_sigmas_type"),
        ("EDMEulerScheduler", dict(prediction_type="sample"), "prediction_type"),
        ("EDMDPMSolverMultistepScheduler", dict(prediction_type="sample"), "prediction_type"),  # diffusers: at step()
        ("EDMDPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver"), "algorithm_type"),
        ("EDMDPMSolverMultistepScheduler", dict(algorithm_type="deis"), "final_sigmas_type"),
        ("EDMDPMSolverMultistepScheduler", dict(solver_order=4), "solver_order"),
    ],
)
def test_bad_options(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        getattr(ms, name)(**kwargs)


@pytest.mark.parametrize("key", ["clip_sample", "thresholding"])
def test_tcd_ignored_options_warn_and_match_diffusers(key, caplog):
    """TCD's config carries LCM's clip_sample / thresholding, which its step never applies (diffusers' neither):
    accepted as diffusers does, with a warning instead of silence, and the same steps as diffusers."""
    with caplog.at_level("WARNING"):
        ours = ms.TCDScheduler(**{key: True})
    assert f"{key}=True has no effect" in caplog.text
    outs = [run_in_dtype(s, torch.float32, steps=4) for s in (ours, diffusers.TCDScheduler(**{key: True}))]
    assert rel_err(outs[0], outs[1]) <= 1e-6


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("LCMScheduler", dict(num_inference_steps=51), "original_inference_steps"),
        ("LCMScheduler", dict(num_inference_steps=4, original_inference_steps=1001), "num_train_timesteps"),
        ("LCMScheduler", dict(timesteps=[999, 800, 900]), "descending"),
        ("LCMScheduler", dict(timesteps=[1000, 800]), "num_train_timesteps"),
        ("LCMScheduler", dict(num_inference_steps=4, timesteps=[999, 500]), "one of"),
        ("TCDScheduler", dict(num_inference_steps=8, strength=0.1), "strength"),
    ],
)
def test_bad_set_timesteps(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        getattr(ms, name)().set_timesteps(**kwargs)


@pytest.mark.parametrize("name", ROUND_TWO)
def test_step_before_set_timesteps_and_bad_step_counts(name):
    sched = getattr(ms, name)()
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(x, sched.timesteps[0], x)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="num_inference_steps"):
            sched.set_timesteps(bad)


def test_tcd_refuses_eta_out_of_range():
    tcd = ms.TCDScheduler()
    tcd.set_timesteps(4)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="eta"):
        tcd.step(x, tcd.timesteps[0], x, eta=1.5)
