"""Differential tests of the round-two solvers against diffusers: DPM-Solver singlestep, DEIS, DPM-Solver SDE.

The method of test_schedulers.py, whose helpers this reuses: each case builds one config on both
sides, compares timesteps / sigmas / init_noise_sigma, then runs a whole sampling loop with the
deterministic stand-in model and compares every step. The SDE variants of DPM-Solver draw from a
shared seeded generator; DPMSolverSDEScheduler draws from a torchsde Brownian tree seeded by
`noise_sampler_seed` on both sides. No test touches the network.
"""

from __future__ import annotations

import builtins

import pytest
import torch
from conftest import rel_err
from test_schedulers import (
    BASE,
    SD,
    SHAPE,
    SOURCES,
    TRAINED,
    assert_schedule_matches,
    betas,
    case_id,
    grid,
    model,
    normalized,
    run_in_dtype,
    run_loop,
)

from minidiff import schedulers as ms
from minidiff.pipelines.stable_diffusion import scheduler_step_kwargs

diffusers = pytest.importorskip("diffusers")
torchsde = pytest.importorskip("torchsde")

# torchsde warns when a query lands a float32 rounding outside the tree's [σ_min, σ_max]: harmless, diffusers too
pytestmark = pytest.mark.filterwarnings("ignore:Should have:UserWarning")
TRAJ_TOL = 1e-4  # relative, whole trajectories
SINGLE, DEIS, SDE = "DPMSolverSinglestepScheduler", "DEISMultistepScheduler", "DPMSolverSDEScheduler"
NEW = (SINGLE, DEIS, SDE)


def assert_runs_match(mine, ref, steps: int, step_kwargs: dict | None = None, **loop) -> None:
    """The same loop on both schedulers: the schedule, the config after set_timesteps, every step."""
    got, want = (
        run_loop(mine, steps, step_kwargs=step_kwargs, **loop),
        run_loop(ref, steps, step_kwargs=step_kwargs, **loop),
    )
    assert_schedule_matches(mine, ref)
    assert normalized(mine.config) == normalized(ref.config)  # set_timesteps may switch lower_order_final on
    assert len(got) == len(want)
    assert rel_err(got[0], want[0]) <= TRAJ_TOL  # the starting sample (add_noise / init_noise_sigma)
    for i, ((x, x0), (y, y0)) in enumerate(zip(got[1:], want[1:])):
        assert torch.isfinite(y).all(), f"diffusers itself is not finite at step {i}: a bad test case"
        assert x.dtype == y.dtype
        assert rel_err(x, y) <= TRAJ_TOL, f"prev_sample differs at step {i}: {rel_err(x, y):.2e}"
        if y0 is not None:
            assert rel_err(x0, y0) <= TRAJ_TOL, f"pred_original_sample differs at step {i}: {rel_err(x0, y0):.2e}"


def both(name: str, config: dict) -> tuple:
    return getattr(ms, name)(**config), getattr(diffusers, name)(**config)


# ---------------------------------------------------------------------------------------------
# The option matrix: (class, config, steps, step kwargs)

CASES: list[tuple[str, dict, int, dict]] = []


def add(name: str, configs: list[dict], steps: tuple[int, ...] = (10,), **step_kwargs) -> None:
    CASES.extend((name, c, n, step_kwargs) for c in configs for n in steps)


SPACINGS = [{}, dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True), dict(use_beta_sigmas=True)]


def spaced(configs: list[dict], spacings: list[dict] = SPACINGS) -> list[dict]:
    """Each config with each σ spacing: as the timesteps fall, Karras, exponential, beta."""
    return [dict(c, **s) for c in configs for s in spacings]


def diffusers_divides_by_zero_h(c: dict, n: int) -> bool:
    """Respaced σ's end at σ_min, so with final_sigmas_type="sigma_min" the last step has h = 0: diffusers
    divides by it (r = 0 / 0) unless that step is first order, i.e. unless the last group ends it."""
    respaced = any(c.get(f"use_{kind}_sigmas") for kind in ("karras", "exponential", "beta"))
    if not (respaced and c.get("final_sigmas_type") == "sigma_min"):
        return False
    order = c["solver_order"]
    return (n % order or (order if not c["lower_order_final"] else 1)) > 1


ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++")
# DPM-Solver singlestep: algorithm × solver type × order × lower_order_final × Karras × last σ, with the
# step counts that end on a whole group (12) and on a cut one (7, 8), then the other σ spacings and
# thresholding. Plain DPM-Solver needs σ_min last.
SINGLE_GRID = [
    c
    for c in grid(
        algorithm_type=ALGORITHMS,
        solver_type=["midpoint", "heun"],
        solver_order=[1, 2, 3],
        lower_order_final=[True, False],
        use_karras_sigmas=[False, True],
        final_sigmas_type=["zero", "sigma_min"],
    )
    if not (c["algorithm_type"] == "dpmsolver" and c["final_sigmas_type"] == "zero")
    and not (c["solver_order"] == 1 and c["solver_type"] == "heun")  # the same as midpoint
]
for _n in (7, 8, 12):
    add(SINGLE, [c for c in SINGLE_GRID if not diffusers_divides_by_zero_h(c, _n)], steps=(_n,))
_SPACED = spaced(
    [
        dict(algorithm_type="dpmsolver++", solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min"),
        dict(algorithm_type="dpmsolver", solver_order=2, final_sigmas_type="sigma_min"),
        dict(algorithm_type="sde-dpmsolver++", solver_order=3, solver_type="heun"),
    ],
    SPACINGS[2:],
)
add(SINGLE, [c for c in _SPACED if not diffusers_divides_by_zero_h(c, 9)], steps=(9,))
add(
    SINGLE,  # (diffusers' DPM-Solver thresholding reads alpha_t[None]: only the data-prediction forms)
    grid(
        thresholding=[True],
        algorithm_type=["dpmsolver++", "sde-dpmsolver++"],
        solver_order=[2, 3],
        prediction_type=["epsilon", "v_prediction", "sample"],
    )
    + [dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5, solver_order=3)],
)
add(
    SINGLE,
    [
        dict(c, final_sigmas_type="sigma_min" if c["algorithm_type"] == "dpmsolver" else "zero")
        for c in grid(
            prediction_type=["epsilon", "v_prediction", "sample"],
            algorithm_type=ALGORITHMS,
            solver_order=[2, 3],
            solver_type=["midpoint", "heun"],
        )
    ],
)
add(
    SINGLE,
    [
        dict(betas(b), algorithm_type=a, final_sigmas_type="sigma_min")
        for b in ("linear", "scaled_linear", "squaredcos_cap_v2")
        for a in ALGORITHMS
    ],
)
add(
    SINGLE,
    [
        TRAINED,
        dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1),
        dict(solver_order=3, **SD, beta_schedule="scaled_linear", use_karras_sigmas=True),
    ],
    steps=(1, 2, 3, 25),
)

# DEIS: order × lower_order_final × σ spacing × timestep spacing, below and above the 15 steps where
# lower_order_final acts
DEIS_GRID = spaced(
    grid(solver_order=[1, 2, 3], lower_order_final=[True, False], timestep_spacing=["leading", "linspace", "trailing"])
)
# beta σ's crowd near σ_max: three nodes close in log ρ, where diffusers' float32 coefficients lose ~3e-4 to
# cancellation (minidiff computes them in float64); those are compared with diffusers' float64 maths below
DENSE_DEIS = [c for c in DEIS_GRID if c.get("use_beta_sigmas") and c["solver_order"] == 3]
add(DEIS, [c for c in DEIS_GRID if c not in DENSE_DEIS], steps=(8, 20))
add(
    DEIS,
    grid(thresholding=[True], solver_order=[1, 2, 3], prediction_type=["epsilon", "v_prediction", "sample"])
    + [dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5, solver_order=3)],
)
add(DEIS, [dict(c, solver_order=3) for c in BASE] + [TRAINED])
add(DEIS, [dict(solver_order=3), dict(solver_order=3, use_karras_sigmas=True)], steps=(1, 2, 3))
add(DEIS, [dict(timestep_spacing="trailing")], steps=(61,))  # np.arange's extra point

# DPM-Solver SDE: beta schedule × prediction × spacing, then Karras × spacing with a few step counts
add(
    SDE,
    [dict(c, noise_sampler_seed=0) for c in BASE if c["prediction_type"] != "sample"]
    + [dict(TRAINED, noise_sampler_seed=0)],
)
add(
    SDE,
    [
        dict(c, noise_sampler_seed=42, **SD)
        for c in spaced(
            grid(timestep_spacing=["leading", "linspace", "trailing"], prediction_type=["epsilon", "v_prediction"])
        )
    ],
    steps=(1, 2, 7),
)
add(SDE, [dict(noise_sampler_seed=3), dict(noise_sampler_seed=3, use_karras_sigmas=True)], s_noise=0.5)
add(SDE, [dict(noise_sampler_seed=[3, 4])])  # one tree per sample


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_trajectory_matches_diffusers(case):
    name, config, steps, step_kwargs = case
    assert_runs_match(*both(name, config), steps, step_kwargs)


def test_matrix_covers_every_new_scheduler():
    assert {c[0] for c in CASES} == set(NEW)


def with_float64_sigmas(sched):
    """diffusers' DEIS with its σ table in float64, so that its coefficients are computed in float64 too."""
    set_timesteps = sched.set_timesteps

    def set_float64(*args, **kwargs):
        set_timesteps(*args, **kwargs)
        sched.sigmas = sched.sigmas.double()

    sched.set_timesteps = set_float64
    return sched


@pytest.mark.parametrize("steps", [8, 20])
@pytest.mark.parametrize("config", DENSE_DEIS, ids=[str(c) for c in DENSE_DEIS])
def test_deis_close_nodes_match_diffusers_maths_in_float64(config, steps):
    mine, ref = both(DEIS, config)
    assert_runs_match(mine, with_float64_sigmas(ref), steps)


IMG2IMG = [
    (SINGLE, dict(solver_order=2)),
    (SINGLE, dict(solver_order=3, solver_type="heun")),
    (SINGLE, dict(solver_order=3, algorithm_type="sde-dpmsolver++")),
    (SINGLE, dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", use_karras_sigmas=True)),
    (DEIS, dict(solver_order=3)),
    (SDE, dict(noise_sampler_seed=5)),
    (SDE, dict(noise_sampler_seed=5, use_karras_sigmas=True)),
]


@pytest.mark.parametrize("begin_index", [False, True])
@pytest.mark.parametrize("start", [1, 4, 7])  # singlestep order 3: 4 and 7 start inside a group
@pytest.mark.parametrize("name,config", IMG2IMG, ids=[f"{n}{c}" for n, c in IMG2IMG])
def test_img2img_matches_diffusers(name, config, start, begin_index):
    # start counts steps, as pipelines do: the SDE sampler's timesteps hold two entries per step
    mine, ref = both(name, config)
    assert_runs_match(mine, ref, 12, start=start * ref.order, begin_index=begin_index)


@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "dpmsolver"])
def test_singlestep_learned_variance_matches_diffusers(algorithm_type):
    # diffusers keeps the first 3 channels of a learned-variance output, so this needs a 3-channel sample
    config = dict(variance_type="learned_range", algorithm_type=algorithm_type, final_sigmas_type="sigma_min")
    assert_runs_match(*both(SINGLE, config), 12, shape=(2, 3, 8, 8))


def test_singlestep_custom_timesteps_match_diffusers():
    custom = [999, 850, 700, 520, 400, 260, 130, 60, 10]
    mine, ref = both(SINGLE, dict(solver_order=3))
    for sched in (mine, ref):
        sched.set_timesteps(timesteps=custom)
    assert_schedule_matches(mine, ref)
    assert normalized(mine.config) == normalized(ref.config)
    x = y = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for t in ref.timesteps:
        x = mine.step(model(x, t), t, x).prev_sample
        y = ref.step(model(y, t), t, y).prev_sample
        assert rel_err(x, y) <= TRAJ_TOL
    with pytest.raises(ValueError, match="exactly one"):
        mine.set_timesteps(4, timesteps=custom)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        ms.DPMSolverSinglestepScheduler(use_karras_sigmas=True).set_timesteps(timesteps=custom)


def test_pipelines_hand_the_generator_to_the_singlestep_sde():
    g = torch.Generator()
    sched = ms.DPMSolverSinglestepScheduler(algorithm_type="sde-dpmsolver++")
    assert scheduler_step_kwargs(sched, 0.0, g) == {"generator": g}


def test_sde_unseeded_tree_draws_its_seed_from_torch_like_diffusers():
    outs = []
    for sched in both(SDE, {}):
        torch.manual_seed(1234)
        outs.append(run_loop(sched, 6))
    for (x, _), (y, _) in zip(outs[0][1:], outs[1][1:]):
        assert rel_err(x, y) <= TRAJ_TOL


def test_sde_noise_does_not_depend_on_the_step_count_seen_so_far():
    """A Brownian tree's increments are consistent: the noise over [σ_1, σ_0] is the sum of its halves."""
    sched = ms.DPMSolverSDEScheduler(noise_sampler_seed=7)
    sched.set_timesteps(4)
    x = torch.zeros(SHAPE)
    sched.step(model(x, sched.timesteps[0]), sched.timesteps[0], x)
    tree, (s0, s1) = sched.noise_sampler, sched.sigmas[:2]
    mid = (s0 * s1) ** 0.5
    whole = tree(s0, s1) * (s0 - s1).sqrt()
    halves = tree(s0, mid) * (s0 - mid).sqrt() + tree(mid, s1) * (mid - s1).sqrt()
    assert rel_err(whole, halves) <= 1e-5


# ---------------------------------------------------------------------------------------------
# Swaps: A.from_config(B.config) for every pair with a new scheduler on one side


def new_sources(lib) -> dict:
    return {
        "singlestep-3-sde-karras": lambda: (
            getattr(lib, SINGLE)(solver_order=3, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True, **SD).config
        ),
        "singlestep-dpmsolver": lambda: (
            getattr(lib, SINGLE)(
                algorithm_type="dpmsolver", final_sigmas_type="sigma_min", prediction_type="v_prediction"
            ).config
        ),
        "deis-3-trailing": lambda: getattr(lib, DEIS)(solver_order=3, timestep_spacing="trailing", **SD).config,
        "sde-karras": lambda: getattr(lib, SDE)(use_karras_sigmas=True, noise_sampler_seed=3).config,
    }


ALL_SOURCES = {
    **{k: lambda lib, k=k: SOURCES[k](lib) for k in SOURCES},
    **{k: lambda lib, k=k: new_sources(lib)[k]() for k in new_sources(ms)},
}


def refused(source: str, target: str) -> bool:
    """Swaps diffusers itself refuses (DEIS has no SDE form) or that name an option minidiff refuses."""
    return (target == DEIS and source == "singlestep-3-sde-karras") or (
        target == "EDMDPMSolverMultistepScheduler" and source == "singlestep-dpmsolver"  # (so does diffusers' EDM)
    )


SWAPS = [(s, t) for s in ALL_SOURCES for t in ms.SCHEDULERS if t in NEW or s in new_sources(ms)]


@pytest.mark.parametrize("source,target", SWAPS)
def test_from_config_swaps_like_diffusers(source, target):
    if refused(source, target):
        with pytest.raises(ValueError):
            getattr(ms, target).from_config(ALL_SOURCES[source](ms))
        return
    mine = getattr(ms, target).from_config(ALL_SOURCES[source](ms))
    ref = getattr(diffusers, target).from_config(ALL_SOURCES[source](diffusers))
    assert normalized(mine.config) == normalized(ref.config)
    # a diffusers config object can be handed to minidiff directly, and vice versa
    assert normalized(getattr(ms, target).from_config(ALL_SOURCES[source](diffusers)).config) == normalized(ref.config)
    assert normalized(getattr(diffusers, target).from_config(ALL_SOURCES[source](ms)).config) == normalized(ref.config)
    mine.set_timesteps(9)
    ref.set_timesteps(9)
    assert_schedule_matches(mine, ref)


def test_deis_refuses_the_sde_like_diffusers():
    with pytest.raises(NotImplementedError):
        diffusers.DEISMultistepScheduler(algorithm_type="sde-dpmsolver++")
    with pytest.raises(ValueError, match="algorithm_type"):
        ms.DEISMultistepScheduler(algorithm_type="sde-dpmsolver++")


@pytest.mark.parametrize("name", NEW)
def test_save_pretrained_round_trips_through_diffusers(name, tmp_path):
    config = dict(TRAINED, prediction_type="v_prediction", **({"noise_sampler_seed": 1} if name == SDE else {}))
    mine, ref = both(name, config)
    mine.save_pretrained(tmp_path / "mine")
    ref.save_pretrained(tmp_path / "ref")
    assert (tmp_path / "mine" / "scheduler_config.json").read_text() == (
        tmp_path / "ref" / "scheduler_config.json"
    ).read_text()
    back_ref = getattr(diffusers, name).from_pretrained(tmp_path / "mine")
    back_mine = getattr(ms, name).from_pretrained(tmp_path / "ref")
    assert normalized(back_mine.config) == normalized(back_ref.config)
    assert_runs_match(back_mine, back_ref, 5)


LOW_PRECISION = [
    (SINGLE, {}),
    (SINGLE, dict(algorithm_type="sde-dpmsolver++", solver_order=3)),
    (DEIS, dict(solver_order=3)),
    (SDE, dict(noise_sampler_seed=0)),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name,config", LOW_PRECISION, ids=[f"{n}{c}" for n, c in LOW_PRECISION])
def test_low_precision_samples_match_diffusers(name, config, dtype):
    """Half-precision latents: the same arithmetic precision and the same output dtype as diffusers."""
    outs = [run_in_dtype(sched, dtype) for sched in both(name, config)]
    assert outs[0].dtype == outs[1].dtype == dtype
    assert rel_err(outs[0], outs[1]) <= 1e-2


# ---------------------------------------------------------------------------------------------
# Bad input and the optional dependency


@pytest.mark.parametrize(
    "name,key,value",
    [
        (SINGLE, "algorithm_type", "sde-dpmsolver"),
        (SINGLE, "solver_type", "rk4"),
        (SINGLE, "solver_order", 4),
        (SINGLE, "use_flow_sigmas", True),
        (SINGLE, "prediction_type", "flow_prediction"),
        (DEIS, "algorithm_type", "dpmsolver-sde"),
        (DEIS, "solver_order", 4),
        (DEIS, "use_dynamic_shifting", True),
        (SDE, "prediction_type", "sample"),
        (SDE, "beta_schedule", "cubic"),
    ],
)
def test_bad_options(name, key, value):
    with pytest.raises(ValueError, match=key):
        getattr(ms, name)(**{key: value})


@pytest.mark.parametrize("name", NEW)
def test_one_sigma_spacing_at_a_time(name):
    with pytest.raises(ValueError, match="only one of"):
        getattr(ms, name)(use_karras_sigmas=True, use_beta_sigmas=True)


def test_plain_dpm_solver_needs_a_nonzero_last_sigma():
    with pytest.raises(ValueError, match="final_sigmas_type"):
        ms.DPMSolverSinglestepScheduler(algorithm_type="dpmsolver")


@pytest.mark.parametrize("name", NEW)
def test_bad_num_inference_steps_and_step_before_set_timesteps(name):
    sched = getattr(ms, name)()
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(x, torch.tensor(999), x)
    for bad in (0, -3, 1001):
        with pytest.raises(ValueError, match="num_inference_steps"):
            sched.set_timesteps(bad)


def test_sde_without_torchsde_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_torchsde(name, *args, **kwargs):
        if name == "torchsde" or name.startswith("torchsde."):
            raise ModuleNotFoundError("No module named 'torchsde'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchsde)
    with pytest.raises(ImportError, match=r"pip install minidiff\[sde\]"):
        ms.DPMSolverSDEScheduler()
