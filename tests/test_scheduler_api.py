"""The scheduler API diffusers users write, against diffusers' own classes.

save_config / from_pretrained (the file, the `.config` after loading, its `_class_name` /
`_diffusers_version`), `compatibles`, `register_to_config`, config keys read as attributes, dict-like
outputs (SchedulerOutput and the models' BaseOutput), PNDM's public `step_prk` / `step_plms`,
DDPM's `previous_timestep` (a tensor) and `variance_type=None` (which DPM-Solver's configs carry).
Every check builds both libraries' schedulers from the same config and compares what they give.
"""

from __future__ import annotations

import json
import pickle
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from test_schedulers import SD, SHAPE, model, normalized, takes

from minidiff import schedulers as ms
from minidiff.outputs import BaseOutput

diffusers = pytest.importorskip("diffusers")
from diffusers.utils import BaseOutput as DiffusersBaseOutput  # noqa: E402

NAMES = sorted(ms.SCHEDULERS)
# a config with a few keys set and the rest defaulted (so that `_use_default_values` is not empty)
CONFIGS = {name: {} for name in NAMES} | {
    name: dict(SD, beta_schedule="scaled_linear") for name in NAMES if not name.startswith("EDM")
}
CONFIGS["DPMSolverSDEScheduler"]["noise_sampler_seed"] = 0  # the same Brownian tree in both


def both(name: str, **config):
    return getattr(ms, name)(**config), getattr(diffusers, name)(**config)


def loop(sched, steps: int = 6) -> list[torch.Tensor]:
    """A short deterministic loop: every step's sample."""
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g) * sched.init_noise_sigma
    out = [x]
    for t in sched.timesteps:
        kw = {"generator": g} if takes(sched, "generator") else {}
        x = sched.step(model(sched.scale_model_input(x, t), t), t, x, **kw).prev_sample
        out.append(x)
    return out


def assert_same_loop(mine, ref, steps: int = 6) -> None:
    for a, b in zip(loop(mine, steps), loop(ref, steps), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_save_config_round_trip_between_libraries(name, tmp_path):
    """save_config writes diffusers' file; each library loads the other's; `.config` after loading and after
    saving (which records `_class_name` / `_diffusers_version`) equals diffusers'."""
    mine, ref = both(name, **CONFIGS[name])
    mine.save_config(tmp_path / "mine")
    ref.save_config(tmp_path / "ref")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["scheduler_config.json"]
    saved = [json.loads((tmp_path / d / "scheduler_config.json").read_text()) for d in ("mine", "ref")]
    assert normalized(saved[0]) == normalized(saved[1])
    assert normalized(mine.config) == normalized(ref.config)  # both now carry _class_name
    assert mine.config["_class_name"] == name

    mine_from_ref = getattr(ms, name).from_pretrained(tmp_path / "ref")
    ref_from_mine = getattr(diffusers, name).from_pretrained(tmp_path / "mine")
    assert normalized(mine_from_ref.config) == normalized(ref_from_mine.config)
    assert "_use_default_values" not in mine_from_ref.config
    assert mine_from_ref.config["_diffusers_version"] == ref_from_mine.config["_diffusers_version"]
    assert_same_loop(mine_from_ref, ref_from_mine)


@pytest.mark.parametrize("name", NAMES)
def test_compatibles_are_diffusers_within_minidiff(name):
    mine, ref = both(name, **CONFIGS[name])
    want = {c.__name__ for c in ref.compatibles} & set(ms.SCHEDULERS)
    assert {c.__name__ for c in mine.compatibles} == want
    assert all(c is ms.SCHEDULERS[c.__name__] for c in mine.compatibles)
    for other in mine.compatibles:  # each swap, and back, as diffusers' own test_compatibles does
        swapped, ref_swapped = (
            other.from_config(mine.config),
            getattr(diffusers, other.__name__).from_config(ref.config),
        )
        assert normalized(swapped.config) == normalized(ref_swapped.config)
        back = type(mine).from_config(swapped.config)
        assert {k: v for k, v in back.config.items() if k in mine.config} == dict(mine.config)


def test_ddpm_from_a_saved_dpm_solver_config(tmp_path):
    """Saved DPM-Solver configs carry variance_type=None; DDPM takes it (as fixed_small, as diffusers does)."""
    mine, ref = both("DPMSolverMultistepScheduler", **SD)
    mine.save_config(tmp_path)
    config = ms.DPMSolverMultistepScheduler.load_config(tmp_path)
    assert config["variance_type"] is None
    ddpm, ref_ddpm = ms.DDPMScheduler.from_config(config), diffusers.DDPMScheduler.from_config(config)
    assert ddpm.config.variance_type is None and normalized(ddpm.config) == normalized(ref_ddpm.config)
    assert_same_loop(ddpm, ref_ddpm)
    assert_same_loop(ms.DDPMScheduler(variance_type=None), diffusers.DDPMScheduler(variance_type=None))


def test_register_to_config_and_config_keys_as_attributes():
    mine, ref = both("EulerDiscreteScheduler", **SD)
    mine.register_to_config(test_attribute=5, timestep_spacing="trailing")
    ref.register_to_config(test_attribute=5, timestep_spacing="trailing")
    assert normalized(mine.config) == normalized(ref.config)
    with pytest.warns(FutureWarning):
        assert mine.test_attribute == 5
    with pytest.warns(FutureWarning):
        assert mine.beta_start == SD["beta_start"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mine.dummy = 1  # an attribute of its own: no warning
        assert mine.dummy == 1 and mine.save_pretrained == mine.save_pretrained
    with pytest.raises(AttributeError) as error:
        _ = mine.does_not_exist
    assert str(error.value) == "'EulerDiscreteScheduler' object has no attribute 'does_not_exist'"


def test_scheduler_output_is_dict_like_as_diffusers():
    mine, ref = both("DDIMScheduler", **SD)
    for s in (mine, ref):
        s.set_timesteps(5)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    t = mine.timesteps[0]
    got, want = mine.step(model(x, t), t, x), ref.step(model(x, t), t, x)
    assert list(got.keys()) == list(want.keys()) == ["prev_sample", "pred_original_sample"]
    for a, b in [(got[0], want[0]), (got["prev_sample"], want["prev_sample"]), (got[1], want[1])]:
        torch.testing.assert_close(a, b)
    assert [k for k, _ in got.items()] == [k for k, _ in want.items()] and len(got.values()) == 2
    assert "prev_sample" in got and len(got.to_tuple()) == len(want.to_tuple()) == 2
    torch.testing.assert_close(got.to_tuple()[1], want.to_tuple()[1])
    torch.testing.assert_close(got[:1][0], want[:1][0])


@dataclass
class _Mine(BaseOutput):
    sample: torch.Tensor
    extra: torch.Tensor | None = None


@dataclass
class _Theirs(DiffusersBaseOutput):
    sample: torch.Tensor
    extra: torch.Tensor | None = None


def test_base_output_behaves_as_diffusers():
    """None fields are not keys; setting an attribute or a key keeps both views in step; keys cannot be removed;
    pickling / copying keeps the class (the models' and pipelines' outputs share this base)."""
    a, b = torch.ones(2), torch.zeros(3)
    mine, theirs = _Mine(sample=a), _Theirs(sample=a)
    assert list(mine.keys()) == list(theirs.keys()) == ["sample"]
    assert ("extra" in mine) == ("extra" in theirs) is False
    with pytest.raises(KeyError):
        mine["extra"]
    mine.extra, theirs.extra = b, b  # not a key yet: an attribute only, as in diffusers
    assert list(mine.keys()) == list(theirs.keys())
    mine["extra"], theirs["extra"] = b, b
    assert list(mine.keys()) == list(theirs.keys()) == ["sample", "extra"] and mine.extra is b
    mine.sample = theirs.sample = b
    assert mine["sample"] is b and theirs["sample"] is b and len(mine.to_tuple()) == len(theirs.to_tuple())
    with pytest.raises(TypeError):
        del mine["sample"]
    with pytest.raises(TypeError):
        mine.update(sample=a)
    again = pickle.loads(pickle.dumps(_Mine(sample=a, extra=b)))
    assert type(again) is _Mine and list(again.keys()) == ["sample", "extra"]
    torch.testing.assert_close(again[1], b)


def test_pndm_step_prk_and_step_plms():
    """diffusers' full PNDM loop through the public stage methods, and the same through step()."""
    mine, ref = both("PNDMScheduler", **SD)
    results = []
    for s in (mine, ref):
        s.set_timesteps(10)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        for t in s.prk_timesteps:
            x = s.step_prk(model(x, t), t, x).prev_sample
        for t in s.plms_timesteps:
            x = s.step_plms(model(x, t), t, x, return_dict=False)[0]
        results.append(x)
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-5)
    assert_same_loop(*both("PNDMScheduler", **SD), steps=10)
    assert_same_loop(*both("PNDMScheduler", skip_prk_steps=True, **SD), steps=10)


@pytest.mark.parametrize("name", ["DDPMScheduler", "LCMScheduler", "TCDScheduler"])
def test_previous_timestep_is_a_tensor(name):
    mine, ref = both(name)
    assert mine.previous_timestep(500) == ref.previous_timestep(500) == 499  # before set_timesteps: t - 1
    for timesteps in ({"num_inference_steps": 7}, {"timesteps": [899, 499, 119, 39]}):
        mine.set_timesteps(**timesteps)
        ref.set_timesteps(**timesteps)
        for t_mine, t_ref in zip(mine.timesteps, ref.timesteps, strict=True):
            got, want = mine.previous_timestep(t_mine), ref.previous_timestep(t_ref)
            assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and got.shape == want.shape
            assert got.item() == want.item()
            assert mine.previous_timestep(int(t_mine)).item() == want.item()
    with pytest.raises(ValueError, match="not one of scheduler.timesteps"):
        mine.previous_timestep(1)


def test_ddpm_and_ddim_get_variance():
    """diffusers' private _get_variance, which its tests read (DDPM: before set_timesteps; DDIM: t, prev_t)."""
    mine, ref = both("DDPMScheduler")
    for t in (0, 487, 999):
        torch.testing.assert_close(mine._get_variance(t), ref._get_variance(t))
    mine, ref = both("DDIMScheduler")
    for t, prev in ((0, 0), (420, 400), (980, 960), (5, -15)):
        torch.testing.assert_close(mine._get_variance(t, prev), ref._get_variance(t, prev))


FLOW_CASES = [
    (dict(use_flow_sigmas=True, prediction_type="flow_prediction"), dict(num_inference_steps=8)),
    (dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0), dict(num_inference_steps=7)),
    (dict(use_flow_sigmas=True, prediction_type="flow_prediction"), dict(sigmas=np.array([1.0, 0.8, 0.5, 0.3, 0.1]))),
    (dict(use_flow_sigmas=True, use_karras_sigmas=True, sigma_min=0.01, sigma_max=200.0), dict(num_inference_steps=5)),
    (dict(use_flow_sigmas=True, final_sigmas_type="sigma_min", solver_order=3), dict(num_inference_steps=6)),
]


@pytest.mark.parametrize("config,set_kwargs", FLOW_CASES)
def test_unipc_flow_sigmas(config, set_kwargs):
    """UniPC for flow-matching models (x = (1 - σ) x_0 + σ ε): timesteps, σ's, add_noise and a whole loop."""
    mine, ref = both("UniPCMultistepScheduler", **config)
    for s in (mine, ref):
        s.set_timesteps(**set_kwargs)
    assert mine.timesteps.dtype == ref.timesteps.dtype and torch.equal(mine.timesteps, ref.timesteps)
    torch.testing.assert_close(mine.sigmas, ref.sigmas, rtol=1e-6, atol=1e-7)
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    t = mine.timesteps[2:3]
    torch.testing.assert_close(mine.add_noise(x0, noise, t), ref.add_noise(x0, noise, ref.timesteps[2:3]))
    trajectories = []
    for s in (mine, ref):
        s.set_timesteps(**set_kwargs)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        for t in s.timesteps:
            x = s.step(model(x, t), t, x).prev_sample
        trajectories.append(x)
    torch.testing.assert_close(trajectories[0], trajectories[1], rtol=1e-4, atol=1e-5)


def test_unipc_flow_bad_inputs():
    with pytest.raises(ValueError, match="use_flow_sigmas"):
        ms.UniPCMultistepScheduler().set_timesteps(sigmas=[0.5, 0.2])
    with pytest.raises(ValueError, match="predict_x0"):
        ms.UniPCMultistepScheduler(prediction_type="flow_prediction", predict_x0=False)
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        ms.UniPCMultistepScheduler(use_flow_sigmas=True).set_timesteps(sigmas=[1.5, 0.2])
    with pytest.raises(ValueError, match="only with use_karras_sigmas"):
        ms.UniPCMultistepScheduler(use_flow_sigmas=True, use_beta_sigmas=True).set_timesteps(4)
