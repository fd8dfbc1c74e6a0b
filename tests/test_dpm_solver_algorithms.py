"""DPMSolverMultistepScheduler's noise-prediction forms, algorithm_type="dpmsolver" and "sde-dpmsolver",
against diffusers: the method of test_schedulers.py (whose helpers this reuses): timesteps / sigmas, then a
whole loop with the deterministic stand-in model compared at every step (1e-4 relative); the SDE form draws
from a shared seeded generator. Both forms need final_sigmas_type="sigma_min" (λ of σ = 0 is infinite).
"""

from __future__ import annotations

import pytest
import torch
from test_schedulers import (
    SD,
    TRAINED,
    assert_loops_match,
    assert_schedule_matches,
    case_id,
    grid,
    normalized,
    run_loop,
)

from minidiff import schedulers as ms

diffusers = pytest.importorskip("diffusers")

NAME = "DPMSolverMultistepScheduler"
NOISE_FORMS = ("dpmsolver", "sde-dpmsolver")


def last_step_order(c: dict, n: int) -> int:
    low = c.get("euler_at_final") or (c.get("lower_order_final", True) and n < 15)
    return 1 if low else min(c.get("solver_order", 2), n)


def diffusers_divides_by_zero_h(c: dict, n: int) -> bool:
    """Karras σ's end at σ_min, so with final_sigmas_type="sigma_min" the last step has h = 0: diffusers
    divides by it (r0 = h_0 / 0) unless that step is first order."""
    return bool(c.get("use_karras_sigmas")) and last_step_order(c, n) > 1


def takes_third_order_step(c: dict, n: int) -> bool:
    """Whether a loop of n steps takes a third-order step (the third step on, but the last two when lowered)."""
    if c.get("solver_order", 2) < 3:
        return False
    low = c.get("lower_order_final", True) and n < 15
    return any(
        i >= 2 and not (low and i >= n - 2) and not (i == n - 1 and last_step_order(c, n) == 1) for i in range(n)
    )


# algorithm × order × lower_order_final × Karras × prediction type, below and above the 15 steps where
# lower_order_final kicks in (sde-dpmsolver has no third-order step: diffusers fails there, see below)
MATRIX = [
    (NAME, dict(c, final_sigmas_type="sigma_min", **SD, beta_schedule="scaled_linear"), n, {})
    for c in grid(
        algorithm_type=NOISE_FORMS,
        solver_order=[1, 2, 3],
        lower_order_final=[True, False],
        use_karras_sigmas=[False, True],
        prediction_type=["epsilon", "v_prediction", "sample"],
    )
    for n in (8, 20)
    if not diffusers_divides_by_zero_h(c, n)
    and not (c["algorithm_type"] == "sde-dpmsolver" and takes_third_order_step(c, n))
]
# solver type (orders 2 and 3 use it), other schedules and options
MATRIX += [
    (NAME, dict(c, final_sigmas_type="sigma_min"), 10, {})
    for c in grid(algorithm_type=NOISE_FORMS, solver_type=["midpoint", "heun"], solver_order=[2, 3])
    if not (c["algorithm_type"] == "sde-dpmsolver" and c["solver_order"] == 3)
]
MATRIX += [
    (NAME, dict(c, algorithm_type=a, final_sigmas_type="sigma_min"), 12, {})
    for a in NOISE_FORMS
    for c in [
        dict(TRAINED),
        dict(euler_at_final=True),
        dict(use_lu_lambdas=True),
        dict(timestep_spacing="trailing", solver_type="heun"),
        dict(timestep_spacing="leading", steps_offset=1),
        dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1),
        dict(thresholding=True, prediction_type="sample", sample_max_value=1.5),
        dict(thresholding=True, prediction_type="v_prediction", dynamic_thresholding_ratio=0.9),
        dict(thresholding=True, prediction_type="epsilon"),
        dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
    ]
]


@pytest.mark.parametrize("case", MATRIX, ids=[case_id(c) for c in MATRIX])
def test_noise_forms_match_diffusers(case):
    name, config, steps, step_kwargs = case
    assert_loops_match(name, config, steps, step_kwargs)


def test_matrix_covers_both_forms_every_order_and_prediction_type():
    seen = {
        (c["algorithm_type"], c.get("solver_order", 2), c.get("prediction_type", "epsilon")) for _, c, _, _ in MATRIX
    }
    for a in NOISE_FORMS:
        for p in ("epsilon", "v_prediction", "sample"):
            assert {o for (a2, o, p2) in seen if a2 == a and p2 == p} == ({1, 2, 3} if a == "dpmsolver" else {1, 2})


@pytest.mark.parametrize("algorithm", [*NOISE_FORMS, "sde-dpmsolver++"])
def test_learned_variance_matches_diffusers(algorithm):
    # diffusers keeps the first 3 channels of a learned-variance output, so this needs a 3-channel sample
    config = dict(algorithm_type=algorithm, final_sigmas_type="sigma_min", variance_type="learned_range")
    assert_loops_match(NAME, config, 12, shape=(2, 3, 8, 8))


@pytest.mark.parametrize("algorithm", NOISE_FORMS)
@pytest.mark.parametrize("start", [3, 6])
def test_img2img_matches_diffusers(algorithm, start):
    assert_loops_match(NAME, dict(algorithm_type=algorithm, final_sigmas_type="sigma_min"), 10, start=start)


@pytest.mark.parametrize("algorithm", NOISE_FORMS)
def test_variance_noise_is_used_as_given(algorithm):
    config = dict(algorithm_type=algorithm, final_sigmas_type="sigma_min", solver_order=2)
    mine, ref = ms.DPMSolverMultistepScheduler(**config), diffusers.DPMSolverMultistepScheduler(**config)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    got = run_loop(mine, 6, step_kwargs=dict(variance_noise=noise))
    want = run_loop(ref, 6, step_kwargs=dict(variance_noise=noise))
    for (x, _), (y, _) in zip(got[1:-1], want[1:-1]):
        assert (x - y).abs().max() <= 1e-4 * y.abs().max()


@pytest.mark.parametrize("algorithm", NOISE_FORMS)
def test_a_last_sigma_of_zero_is_refused_like_diffusers(algorithm):
    with pytest.raises(ValueError, match="final_sigmas_type"):
        diffusers.DPMSolverMultistepScheduler(algorithm_type=algorithm)
    with pytest.raises(ValueError, match="final_sigmas_type"):
        ms.DPMSolverMultistepScheduler(algorithm_type=algorithm)


def test_sde_dpmsolver_has_no_third_order_step():
    """diffusers' third-order update has no sde-dpmsolver branch (it fails on its unset result); minidiff
    says so at the same step. A loop that never reaches third order (3 steps, lowered at the end) runs."""
    config = dict(algorithm_type="sde-dpmsolver", solver_order=3, final_sigmas_type="sigma_min")
    with pytest.raises(UnboundLocalError):
        run_loop(diffusers.DPMSolverMultistepScheduler(**config), 8)
    with pytest.raises(NotImplementedError, match="third-order"):
        run_loop(ms.DPMSolverMultistepScheduler(**config), 8)
    assert_loops_match(NAME, config, 3)


def singlestep_dpmsolver(lib):
    return lib.DPMSolverSinglestepScheduler(
        algorithm_type="dpmsolver", final_sigmas_type="sigma_min", prediction_type="v_prediction"
    ).config


def multistep_sde_dpmsolver(lib):
    return lib.DPMSolverMultistepScheduler(
        algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min", use_karras_sigmas=True, **SD
    ).config


def test_multistep_from_a_singlestep_dpmsolver_config_like_diffusers():
    mine = ms.DPMSolverMultistepScheduler.from_config(singlestep_dpmsolver(ms))
    ref = diffusers.DPMSolverMultistepScheduler.from_config(singlestep_dpmsolver(diffusers))
    assert mine.config.algorithm_type == "dpmsolver"
    assert normalized(mine.config) == normalized(ref.config)
    got, want = run_loop(mine, 9), run_loop(ref, 9)
    assert_schedule_matches(mine, ref)
    for (x, _), (y, _) in zip(got[1:-1], want[1:-1]):
        assert (x - y).abs().max() <= 1e-4 * y.abs().max()


def test_edm_keeps_refusing_the_noise_forms():
    """diffusers' EDM DPM-Solver takes only dpmsolver++ / sde-dpmsolver++, and so does minidiff's."""
    for algorithm in NOISE_FORMS:
        with pytest.raises((ValueError, NotImplementedError)):
            diffusers.EDMDPMSolverMultistepScheduler(algorithm_type=algorithm, final_sigmas_type="sigma_min")
        with pytest.raises(ValueError, match="algorithm_type"):
            ms.EDMDPMSolverMultistepScheduler(algorithm_type=algorithm, final_sigmas_type="sigma_min")
    with pytest.raises(ValueError, match="algorithm_type"):
        ms.EDMDPMSolverMultistepScheduler.from_config(singlestep_dpmsolver(ms))


@pytest.mark.parametrize("source", [singlestep_dpmsolver, multistep_sde_dpmsolver], ids=["single", "multi-sde"])
@pytest.mark.parametrize("target", sorted(ms.SCHEDULERS))
def test_every_scheduler_from_a_noise_form_config_like_diffusers(source, target):
    """Each class built from such a config: as diffusers, it is refused or takes the same config and schedule."""
    try:
        ref = getattr(diffusers, target).from_config(source(diffusers))
    except (ValueError, NotImplementedError):
        with pytest.raises(ValueError):
            getattr(ms, target).from_config(source(ms))
        return
    mine = getattr(ms, target).from_config(source(ms))
    assert normalized(mine.config) == normalized(ref.config)
    mine.set_timesteps(9)
    ref.set_timesteps(9)
    assert_schedule_matches(mine, ref)
