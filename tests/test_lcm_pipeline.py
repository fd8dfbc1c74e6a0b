"""The LCM path end to end against diffusers: an LCM-distilled UNet (time_cond_proj_dim, timestep_cond) and
LatentConsistencyModelPipeline, on a tiny SD1-style pipeline with every weight perturbed, saved in the
diffusers layout by diffusers and loaded by both libraries through from_pretrained."""

from __future__ import annotations

import gc

import diffusers
import numpy as np
import pytest
import torch
from conftest import perturb, reference_config, rel_err, save_tiny_sd, tiny_sd_components

import minidiff
from minidiff.pipelines.latent_consistency import guidance_scale_embedding

TOL = 3e-4  # images in [0, 1]
COND_DIM = 32


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny LCM: the SD1 tiny pipeline's parts, its UNet rebuilt with a guidance embedding, LCMScheduler."""
    root = tmp_path_factory.mktemp("lcm")
    parts = tiny_sd_components("sd1", seed=3)
    torch.manual_seed(3)
    config = {k: v for k, v in parts["unet"].config.items() if not k.startswith("_")}
    unet = diffusers.UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": COND_DIM})
    parts["unet"] = perturb(unet.eval(), 7, scale=0.02)
    parts["scheduler"] = diffusers.LCMScheduler.from_config(parts["scheduler"].config)
    tokenizer = diffusers.StableDiffusionPipeline.from_pretrained(save_tiny_sd(root / "sd1", "sd1")).tokenizer
    pipe = diffusers.LatentConsistencyModelPipeline(
        **parts, tokenizer=tokenizer, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(root / "lcm")
    return root / "lcm"


def load_both(folder, name: str) -> tuple:
    """diffusers' pipeline `name` and minidiff's (picked by DiffusionPipeline from model_index.json)."""
    theirs = getattr(diffusers, name).from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ours = minidiff.DiffusionPipeline.from_pretrained(folder)
    for p in (theirs, ours):
        p.set_progress_bar_config(disable=True)
    return theirs, ours


@pytest.fixture(scope="module")
def pipes(folder):
    return load_both(folder, "LatentConsistencyModelPipeline")


def test_loads_as_an_lcm_pipeline(pipes):
    _, ours = pipes
    assert type(ours) is minidiff.LatentConsistencyModelPipeline
    assert type(ours.scheduler) is minidiff.LCMScheduler
    assert ours.unet.config.time_cond_proj_dim == COND_DIM


@pytest.mark.parametrize("with_cond", [True, False])
def test_unet_with_guidance_embedding_matches_diffusers(pipes, with_cond):
    theirs, ours = pipes
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    cond = guidance_scale_embedding(torch.tensor([7.5, 2.0]), COND_DIM) if with_cond else None
    with torch.no_grad():
        want = theirs.unet(x, torch.tensor([999, 259]), ctx, timestep_cond=cond).sample
        got = ours.unet(x, torch.tensor([999, 259]), encoder_hidden_states=ctx, timestep_cond=cond).sample
    assert rel_err(got, want) <= 1e-4


@pytest.mark.parametrize("guidance_scale", [8.5, 1.0, 3.7])
def test_guidance_scale_embedding_is_diffusers(pipes, guidance_scale):
    theirs, _ = pipes
    w = torch.tensor(guidance_scale - 1).repeat(3)
    for dim in (COND_DIM, 33, 256):
        assert torch.equal(guidance_scale_embedding(w, dim), theirs.get_guidance_scale_embedding(w, dim))


def run(pipe, seed: int = 0, **call) -> np.ndarray:
    call.setdefault("output_type", "np")
    n = call.pop("n_generators", None)
    generator = (
        torch.Generator().manual_seed(seed)
        if n is None
        else [torch.Generator().manual_seed(seed + i) for i in range(n)]
    )
    return np.asarray(pipe(generator=generator, **call).images)


CALLS = {
    "4 steps": dict(prompt="a photo of a cat"),
    "1 step": dict(prompt="a photo of a cat", num_inference_steps=1),
    "8 steps, no guidance": dict(prompt="a red car", num_inference_steps=8, guidance_scale=1.0),
    "original_inference_steps": dict(prompt="a red car", num_inference_steps=3, original_inference_steps=20),
    "custom timesteps": dict(prompt="a red car", timesteps=[999, 759, 499, 259]),
    "batch": dict(prompt=["a red car", "a blue house"], num_images_per_prompt=2, n_generators=4),
    "non-square": dict(prompt="a red car", height=48, width=32, guidance_scale=5.0),
    "latent output": dict(prompt="a red car", output_type="latent"),
}


@pytest.mark.parametrize("call", list(CALLS.values()), ids=list(CALLS))
def test_txt2img_matches_diffusers(pipes, call):
    theirs, ours = pipes
    a, b = run(theirs, **dict(call)), run(ours, **dict(call))
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= TOL


def test_prompt_embeds_and_callback_match_diffusers(pipes):
    theirs, ours = pipes
    embeds, _ = theirs.encode_prompt("a cat", torch.device("cpu"), 1, False)
    seen = {}

    def halve_denoised(pipe, i, t, tensors):
        seen.setdefault(type(pipe).__module__.split(".")[0], []).append(sorted(tensors))
        return {"denoised": tensors["denoised"] * 0.5} if i == len(pipe.scheduler.timesteps) - 1 else {}

    call = dict(
        prompt_embeds=embeds,
        callback_on_step_end=halve_denoised,
        callback_on_step_end_tensor_inputs=["latents", "denoised", "w_embedding"],
    )
    a, b = run(theirs, **call), run(ours, **call)
    assert np.abs(a - b).max() <= TOL
    assert seen["minidiff"] == seen["diffusers"] == [["denoised", "latents", "w_embedding"]] * 4


def test_save_pretrained_loads_in_diffusers(pipes, tmp_path):
    theirs, ours = pipes
    ours.save_pretrained(tmp_path / "saved")
    back = diffusers.LatentConsistencyModelPipeline.from_pretrained(
        tmp_path / "saved", safety_checker=None, requires_safety_checker=False
    )
    back.set_progress_bar_config(disable=True)
    assert back.unet.config.time_cond_proj_dim == COND_DIM
    for k, v in theirs.unet.state_dict().items():
        assert torch.equal(back.unet.state_dict()[k], v), k
    assert np.abs(run(back, prompt="a cat") - run(ours, prompt="a cat")).max() <= TOL


def test_a_unet_without_guidance_embedding_is_refused(folder):
    pipe = minidiff.LatentConsistencyModelPipeline.from_pretrained(folder)
    sd_unet = minidiff.UNet2DConditionModel(**{**pipe.unet.config.to_dict(), "time_cond_proj_dim": None})
    pipe.unet = sd_unet
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        pipe(prompt="a cat", num_inference_steps=1)


# the round-two schedulers in StableDiffusionPipeline (an LCM-LoRA runs this way): the seed must reach their noise
SD_SCHEDULERS = [
    ("LCMScheduler", {}),
    ("TCDScheduler", dict(eta=0.3)),  # TCD's γ arrives as the pipeline's eta, as in diffusers
    ("KDPM2DiscreteScheduler", {}),
    ("KDPM2AncestralDiscreteScheduler", {}),
    ("EDMEulerScheduler", {}),
    ("EDMDPMSolverMultistepScheduler", {}),
]


@pytest.fixture(scope="module")
def sd_pipes(tmp_path_factory):
    return load_both(save_tiny_sd(tmp_path_factory.mktemp("sd") / "sd1", "sd1"), "StableDiffusionPipeline")


@pytest.mark.parametrize("name,call", SD_SCHEDULERS, ids=[n for n, _ in SD_SCHEDULERS])
def test_stable_diffusion_with_round_two_schedulers_matches_diffusers(sd_pipes, name, call):
    theirs, ours = sd_pipes
    theirs.scheduler = getattr(diffusers, name).from_config(theirs.scheduler.config)
    ours.scheduler = getattr(minidiff, name).from_config(ours.scheduler.config)
    a = run(theirs, prompt="a red car", num_inference_steps=4, guidance_scale=4.0, **call)
    b = run(ours, prompt="a red car", num_inference_steps=4, guidance_scale=4.0, **call)
    assert np.abs(a - b).max() <= TOL


@pytest.mark.slow
def test_real_size_lcm_unet_matches_diffusers(tmp_path):
    """An LCM-distilled SD 1.5 UNet (the SD 1.5 config + time_cond_proj_dim 256, as LCM_Dreamshaper_v7 ships it):
    built by diffusers, every weight perturbed, saved, loaded by minidiff; one guided-embedding step."""
    torch.manual_seed(0)
    config = {**reference_config("sd-v1-5.unet"), "time_cond_proj_dim": 256}
    ref = perturb(diffusers.UNet2DConditionModel.from_config(config).eval(), seed=4)
    ref.save_pretrained(tmp_path)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 77, 768, generator=g)
    cond = guidance_scale_embedding(torch.tensor([7.0]), 256)
    with torch.no_grad():
        want = ref(x, torch.tensor([759]), ctx, timestep_cond=cond).sample
    del ref
    gc.collect()
    ours = minidiff.UNet2DConditionModel.from_pretrained(tmp_path)
    with torch.no_grad():
        got = ours(x, torch.tensor([759]), encoder_hidden_states=ctx, timestep_cond=cond).sample
    assert rel_err(got, want) <= 1e-4
