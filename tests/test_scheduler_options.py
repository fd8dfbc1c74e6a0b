"""The schedule options of the nine round-one schedulers against diffusers, over their cross product.

Options: use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas, timestep_spacing,
final_sigmas_type, custom `timesteps=` / `sigmas=` in set_timesteps, rescale_betas_zero_snr and
dynamic thresholding, each where diffusers has it. Every case compares timesteps and sigmas
(1e-5) and every step of a full loop with a deterministic stand-in model (1e-4 relative), as
test_schedulers.py does. Also: the shared maths (beta quantile, dynamic threshold) against
scipy / diffusers, and no host read of the timesteps (or σ) inside the sampling loops.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import rel_err
from test_schedulers import SD, SHAPE, grid, model, normalized, takes
from torch.utils._python_dispatch import TorchDispatchMode

from minidiff import schedulers as ms
from minidiff.schedulers.schedule import beta_ppf, betainc, dynamic_threshold

diffusers = pytest.importorskip("diffusers")

TRAJ_TOL = 1e-4
SCHED_TOL = 1e-5
SD_BETAS = dict(SD, beta_schedule="scaled_linear")
SPACINGS = [{}, dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True), dict(use_beta_sigmas=True)]
TIMESTEP_SPACINGS = [
    dict(timestep_spacing="linspace"),
    dict(timestep_spacing="leading", steps_offset=1),
    dict(timestep_spacing="trailing"),
]
# a max above 1 and a lower ratio, so that thresholding differs from plain clipping
THRESHOLD = dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5)
ZERO_SNR = dict(rescale_betas_zero_snr=True, prediction_type="v_prediction")


def run(sched, set_kwargs: dict, step_kwargs: dict | None = None) -> list:
    """set_timesteps(**set_kwargs), then the whole loop from pure noise; every step's outputs."""
    sched.set_timesteps(**set_kwargs)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g) * sched.init_noise_sigma
    outs = [(x, None)]
    for t in sched.timesteps:
        kw = dict(step_kwargs or {}, generator=g) if takes(sched, "generator") else dict(step_kwargs or {})
        out = sched.step(model(sched.scale_model_input(x, t), t), t, x, **kw)
        x = out.prev_sample
        outs.append((x, getattr(out, "pred_original_sample", None)))
    return outs + [(torch.randn(SHAPE, generator=g), None)]  # the generator advanced as in diffusers


def assert_matches(name: str, config: dict, set_kwargs: dict, step_kwargs: dict | None = None) -> list:
    mine, ref = getattr(ms, name)(**config), getattr(diffusers, name)(**config)
    got, want = run(mine, set_kwargs, step_kwargs), run(ref, set_kwargs, step_kwargs)
    assert mine.timesteps.dtype == ref.timesteps.dtype and mine.timesteps.shape == ref.timesteps.shape
    assert rel_err(mine.timesteps, ref.timesteps) <= SCHED_TOL, (mine.timesteps, ref.timesteps)
    if getattr(ref, "sigmas", None) is not None:
        assert mine.sigmas.shape == ref.sigmas.shape
        assert rel_err(mine.sigmas, ref.sigmas) <= SCHED_TOL, (mine.sigmas, ref.sigmas)
    # (diffusers' DDPM leaves num_inference_steps at None with custom timesteps; minidiff counts them)
    assert mine.num_inference_steps == (ref.num_inference_steps or len(ref.timesteps))
    assert len(got) == len(want)
    for i, ((x, x0), (y, y0)) in enumerate(zip(got, want)):
        assert torch.isfinite(y).all(), f"diffusers itself is not finite at step {i}: a bad test case"
        assert rel_err(x, y) <= TRAJ_TOL, f"prev_sample differs at step {i}: {rel_err(x, y):.2e}"
        if y0 is not None:
            assert rel_err(x0, y0) <= TRAJ_TOL, f"pred_original_sample differs at step {i}: {rel_err(x0, y0):.2e}"
    return got


# ---------------------------------------------------------------------------------------------
# The cross products: (class, config, set_timesteps kwargs, step kwargs)

CASES: list[tuple[str, dict, dict, dict]] = []


def add(name: str, configs: list[dict], set_kwargs: list[dict] | None = None, **step_kwargs) -> None:
    for config, kw in itertools.product(configs, set_kwargs or [dict(num_inference_steps=10)]):
        CASES.append((name, config, kw, step_kwargs))


def product(*axes: list[dict]) -> list[dict]:
    return [{k: v for d in combo for k, v in d.items()} for combo in itertools.product(*axes)]


BETAS = [SD_BETAS, {}]  # scaled_linear (Stable Diffusion) and linear
PREDICTIONS = [dict(prediction_type=p) for p in ("epsilon", "v_prediction", "sample")]

# σ spacings: LMS, Euler, Heun
add("LMSDiscreteScheduler", product(SPACINGS, TIMESTEP_SPACINGS, BETAS, PREDICTIONS[:2]))
add(
    "EulerDiscreteScheduler",
    product(SPACINGS, TIMESTEP_SPACINGS, grid(final_sigmas_type=["zero", "sigma_min"]), [{}, SD_BETAS]),
)
add("EulerDiscreteScheduler", product(SPACINGS, [dict(interpolation_type="log_linear"), dict(SD_BETAS, **ZERO_SNR)]))
add("EulerDiscreteScheduler", product(SPACINGS[1:], [dict(sigma_min=0.1, sigma_max=10.0)]))  # the σ range wins
add("HeunDiscreteScheduler", product(SPACINGS, TIMESTEP_SPACINGS, BETAS, [{}, dict(clip_sample=True)]))
add(
    "HeunDiscreteScheduler",
    [{}, dict(timestep_spacing="leading")],
    [dict(num_inference_steps=8, num_train_timesteps=500)],
)
# custom timesteps / sigmas
EULER_SIGMAS = [14.6, 6.4, 3.8, 2.6, 1.8, 1.3, 0.9, 0.6, 0.4, 0.15, 0.0]
add("EulerDiscreteScheduler", product(BETAS, [{}, dict(prediction_type="v_prediction")]), [
    dict(timesteps=[999.0, 850.5, 700.0, 523.25, 300.0, 151.0, 40.0, 3.0]),
    dict(sigmas=EULER_SIGMAS),
    dict(sigmas=EULER_SIGMAS[:-1] + [0.03]),
])  # fmt: skip
add("HeunDiscreteScheduler", BETAS, [dict(timesteps=[999.0, 850.5, 700.0, 523.25, 300.0, 151.0, 40.0, 3.0])])
add("DDPMScheduler", product(PREDICTIONS, [{}, THRESHOLD]), [dict(timesteps=[999, 850, 700, 500, 300, 120, 40, 0])])
DPM_CUSTOM = [dict(timesteps=[999, 850, 700, 500, 300, 150, 60, 10])]
add("DPMSolverMultistepScheduler", product(grid(solver_order=[1, 2, 3]), [{}, THRESHOLD], BETAS), DPM_CUSTOM)
add("DPMSolverMultistepScheduler", [dict(algorithm_type="sde-dpmsolver++")], DPM_CUSTOM)

# DPM-Solver++: spacing × final σ × order × ODE/SDE × thresholding; lu_lambdas too. With a final
# σ_min after σ's that already end at σ_min (Karras, exponential, beta, λ-uniform), the last h is 0:
# diffusers divides by it unless that step is first order, which lower_order_final gives below 15 steps
add(
    "DPMSolverMultistepScheduler",
    product(
        SPACINGS + [dict(use_lu_lambdas=True)],
        grid(final_sigmas_type=["zero", "sigma_min"]),
        grid(solver_order=[1, 2, 3]),
        grid(algorithm_type=["dpmsolver++", "sde-dpmsolver++"]),
        [{}, THRESHOLD],
    ),
    [dict(num_inference_steps=8)],
)
# (beta σ's with zero-SNR betas start at σ_T = 4096, and their first nine timesteps are all 998: the
# loop, in diffusers too, takes the repeated first timestep for the second step and runs off the end)
NOT_BETA = SPACINGS[:3]
add(
    "DPMSolverMultistepScheduler",
    product(SPACINGS, TIMESTEP_SPACINGS, [SD_BETAS])
    + product(NOT_BETA, TIMESTEP_SPACINGS, [dict(SD_BETAS, **ZERO_SNR)]),
    [dict(num_inference_steps=20)],
)
add("DPMSolverMultistepScheduler", product(SPACINGS, PREDICTIONS, [THRESHOLD]))


# UniPC: spacing × final σ × bh1/bh2 × order × predict_x0 × thresholding (diffusers overflows on a
# last step to σ = 0 with predict_x0=False, and computes -inf · 0 with bh1: those end at σ_min)
def unipc(config: dict) -> dict:
    if not config["predict_x0"] or config["solver_type"] == "bh1":
        config = dict(config, final_sigmas_type="sigma_min")
    return config


add(
    "UniPCMultistepScheduler",
    [
        unipc(c)
        for c in product(
            SPACINGS,
            grid(final_sigmas_type=["zero", "sigma_min"]),
            grid(solver_type=["bh1", "bh2"]),
            grid(solver_order=[1, 2, 3]),
            grid(predict_x0=[True, False]),
            [{}, THRESHOLD],
        )
    ],
    [dict(num_inference_steps=8)],
)
add(
    "UniPCMultistepScheduler",
    product(SPACINGS, TIMESTEP_SPACINGS, [SD_BETAS])
    + product(NOT_BETA, TIMESTEP_SPACINGS, [dict(SD_BETAS, **ZERO_SNR)]),
)
add("UniPCMultistepScheduler", product(SPACINGS[1:], [dict(sigma_min=0.1, sigma_max=10.0)]))

# DDPM, DDIM: thresholding × prediction × spacing (× zero-SNR betas, which need v-prediction at ᾱ_T = 0)
DISCRETE = product([{}, THRESHOLD, dict(THRESHOLD, clip_sample=False)], PREDICTIONS, TIMESTEP_SPACINGS)
add("DDPMScheduler", DISCRETE + product([{}, THRESHOLD], [dict(SD_BETAS, **ZERO_SNR)], TIMESTEP_SPACINGS))
add("DDPMScheduler", product([THRESHOLD], grid(variance_type=["fixed_small_log", "fixed_large"])))
add("DDIMScheduler", DISCRETE + product([{}, THRESHOLD], [dict(SD_BETAS, **ZERO_SNR)], TIMESTEP_SPACINGS))
add("DDIMScheduler", product([THRESHOLD], grid(set_alpha_to_one=[True, False])), eta=0.6)
add("DDIMScheduler", [THRESHOLD], eta=1.0, use_clipped_model_output=True)
# PNDM and Euler ancestral: the spacing (and zero-SNR betas) are their only schedule options
add("PNDMScheduler", product(TIMESTEP_SPACINGS, grid(skip_prk_steps=[True, False]), [SD_BETAS]))
add("EulerAncestralDiscreteScheduler", product(TIMESTEP_SPACINGS, [SD_BETAS, dict(SD_BETAS, **ZERO_SNR)]))


def case_id(case) -> str:
    name, config, set_kwargs, step_kwargs = case
    parts = [f"{k}={v}" for k, v in config.items() if k not in ("beta_start", "beta_end", "dynamic_thresholding_ratio")]
    parts += [f"{k}={'custom' if isinstance(v, list) else v}" for k, v in set_kwargs.items()]
    parts += [f"{k}={v}" for k, v in step_kwargs.items()]
    return f"{name.replace('Scheduler', '')}[{','.join(parts)}]"


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_options_match_diffusers(case):
    name, config, set_kwargs, step_kwargs = case
    assert_matches(name, config, set_kwargs, step_kwargs)


def test_every_scheduler_and_option_is_covered():
    assert {c[0] for c in CASES} == {
        "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
        "UniPCMultistepScheduler",
    }  # fmt: skip
    for name, cls in ms.SCHEDULERS.items():
        if name not in {c[0] for c in CASES}:
            continue
        for key in ("use_exponential_sigmas", "use_beta_sigmas", "thresholding", "final_sigmas_type"):
            if key in cls.config_keys():
                assert any(key in c[1] for c in CASES if c[0] == name), (name, key)


@pytest.mark.parametrize(
    "name", ["DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"]
)
def test_thresholding_changes_the_trajectory(name):
    """The thresholding cases are not vacuous: the same loop without it ends elsewhere."""
    plain = run(getattr(ms, name)(), dict(num_inference_steps=10))
    thresholded = run(getattr(ms, name)(**THRESHOLD), dict(num_inference_steps=10))
    assert rel_err(plain[-2][0], thresholded[-2][0]) > 1e-3


# ---------------------------------------------------------------------------------------------
# Refused combinations: the same errors as diffusers


@pytest.mark.parametrize(
    "name,config,set_kwargs",
    [
        (n, s, dict(timesteps=[900, 500, 100]))
        for n in ("EulerDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler")
        for s in SPACINGS[1:]
    ]
    + [
        ("DPMSolverMultistepScheduler", dict(use_lu_lambdas=True), dict(timesteps=[900, 500, 100])),
        ("UniPCMultistepScheduler", {}, dict(sigmas=[14.6, 3.0, 0.5, 0.0])),
        ("EulerDiscreteScheduler", {}, dict(num_inference_steps=5, sigmas=[14.6, 3.0, 0.0])),
        ("HeunDiscreteScheduler", {}, dict(num_inference_steps=5, timesteps=[900, 500])),
        ("DPMSolverMultistepScheduler", {}, dict(num_inference_steps=5, timesteps=[900, 500])),
        ("DPMSolverMultistepScheduler", {}, {}),
    ],
)
def test_refused_set_timesteps_like_diffusers(name, config, set_kwargs):
    for lib in (diffusers, ms):
        sched = getattr(lib, name)(**config)
        with pytest.raises(ValueError):
            sched.set_timesteps(**set_kwargs)


@pytest.mark.parametrize(
    "name",
    [
        "LMSDiscreteScheduler",
        "EulerDiscreteScheduler",
        "HeunDiscreteScheduler",
        "DPMSolverMultistepScheduler",
        "UniPCMultistepScheduler",
    ],
)
@pytest.mark.parametrize("pair", list(itertools.combinations(("karras", "exponential", "beta"), 2)))
def test_two_sigma_spacings_are_refused_like_diffusers(name, pair):
    config = {f"use_{kind}_sigmas": True for kind in pair}
    with pytest.raises(ValueError):
        getattr(diffusers, name)(**config)
    with pytest.raises(ValueError, match="only one of"):
        getattr(ms, name)(**config)


@pytest.mark.parametrize("target", ["LMSDiscreteScheduler", "HeunDiscreteScheduler", "UniPCMultistepScheduler"])
@pytest.mark.parametrize("source", ["use_exponential_sigmas", "use_beta_sigmas"])
def test_from_config_carries_the_spacing_like_diffusers(source, target):
    """An Euler config with a σ spacing and a σ range, handed on: both sides keep and honour the same keys."""
    config = dict(SD_BETAS, sigma_min=0.2, sigma_max=8.0, **{source: True})
    mine = getattr(ms, target).from_config(ms.EulerDiscreteScheduler(**config).config)
    ref = getattr(diffusers, target).from_config(diffusers.EulerDiscreteScheduler(**config).config)
    assert normalized(mine.config) == normalized(ref.config)
    mine.set_timesteps(9)
    ref.set_timesteps(9)
    assert rel_err(mine.sigmas, ref.sigmas) <= SCHED_TOL and rel_err(mine.timesteps, ref.timesteps) <= SCHED_TOL


# ---------------------------------------------------------------------------------------------
# The shared maths


def test_betainc_and_beta_ppf_match_scipy():
    special, stats = pytest.importorskip("scipy.special"), pytest.importorskip("scipy.stats")
    x = np.linspace(0, 1, 401)
    for a, b in ((0.6, 0.6), (2.0, 3.0), (0.5, 4.0), (5.0, 0.7)):
        assert np.abs(betainc(a, b, x) - special.betainc(a, b, x)).max() < 1e-13
        u = 1 - np.linspace(0, 1, 57)
        assert np.abs(beta_ppf(u, a, b) - stats.beta.ppf(u, a, b)).max() < 1e-12
    assert beta_ppf(np.array([0.0, 1.0]), 0.6, 0.6).tolist() == [0.0, 1.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dynamic_threshold_matches_diffusers(dtype):
    ref = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5)
    scale = torch.tensor([0.5, 2.0, 4.0])[:, None, None, None]  # below 1, inside and beyond the max
    x0 = (torch.randn(3, 4, 6, 5, generator=torch.Generator().manual_seed(0)) * scale).to(dtype)
    got, want = dynamic_threshold(x0, 0.9, 2.5), ref._threshold_sample(x0)
    assert got.dtype == want.dtype == dtype
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------
# No host read of the timesteps inside the sampling loops (DDPM / DDIM / PNDM read t every step; the σ
# schedulers find their place at the first step)

# what makes the host wait for the device: a scalar read, a data-dependent shape, a tensor comparison
SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::equal", "aten::is_nonzero", "aten::item"}


class HostReads(TorchDispatchMode):
    """Counts the ops that would synchronise with a CUDA device (on the CPU they are counted all the same)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func._schema.name in SYNC_OPS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "name,config",
    [
        ("DDPMScheduler", {}),
        ("DDPMScheduler", dict(THRESHOLD, variance_type="fixed_small_log")),
        ("DDIMScheduler", {}),
        ("PNDMScheduler", {}),
        ("PNDMScheduler", dict(skip_prk_steps=True)),
        ("DPMSolverMultistepScheduler", {}),
        ("UniPCMultistepScheduler", {}),
        ("LMSDiscreteScheduler", {}),
        ("EulerDiscreteScheduler", {}),
        ("EulerAncestralDiscreteScheduler", {}),
        ("HeunDiscreteScheduler", {}),
    ],
)
@pytest.mark.parametrize("img2img", [False, True])
def test_loop_reads_no_timestep_from_the_device(name, config, img2img):
    """step() on the elements of `timesteps` (or of a slice, as img2img loops) reads nothing from them, and the
    samples are the ones stepping with Python ints gives."""
    results = []
    for as_ints in (False, True):
        sched = getattr(ms, name)(**config)
        sched.set_timesteps(10)
        start = 3 if img2img else 0
        if img2img and hasattr(sched, "set_begin_index"):
            sched.set_begin_index(start)
        timesteps = sched.timesteps[start:]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(SHAPE, generator=g)
        ts = timesteps.tolist() if as_ints else timesteps
        with HostReads() as reads:
            for t, t_value in zip(ts, timesteps.tolist()):
                kw = dict(generator=g) if takes(sched, "generator") else {}
                x = sched.step(model(x, t_value), t, x, **kw).prev_sample
        if not as_ints:
            assert reads.count == 0, f"{reads.count} host reads in the loop"
        results.append(x)
    assert torch.equal(results[0], results[1])


def test_a_replaced_or_modified_timesteps_table_is_read_again():
    sched = ms.DDIMScheduler()
    sched.set_timesteps(10)
    assert sched._timestep_value(sched.timesteps[2]) == 700
    sched.timesteps[2] = 650  # in place: the host copy is stale, and is read again
    assert sched._timestep_value(sched.timesteps[2]) == 650
    sched.timesteps = torch.tensor([900, 400, 3])
    assert sched._timestep_value(sched.timesteps[1]) == 400
    assert sched._timestep_value(torch.tensor(123)) == 123 and sched._timestep_value(7) == 7
    with torch.inference_mode():  # inference tensors keep no version counter
        sched.set_timesteps(4)
        assert [sched._timestep_value(t) for t in sched.timesteps] == sched.timesteps.tolist()
    assert math.isfinite(sched.step(torch.zeros(SHAPE), sched.timesteps[0], torch.ones(SHAPE)).prev_sample.sum())
