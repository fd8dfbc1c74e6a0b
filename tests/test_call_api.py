"""diffusers' calling API on minidiff's Stable Diffusion pipelines, against diffusers on the same saved checkpoint.

The arguments and pipeline state a diffusers script or callback uses: `guidance_rescale`, custom
`timesteps` / `sigmas`, `cross_attention_kwargs`, `pipe.num_timesteps` / `guidance_scale` /
`do_classifier_free_guidance` read inside a callback, diffusers' own SDCFGCutoffCallback and
MultiPipelineCallbacks, and the docs' early stop (`pipe._interrupt = True`). Each runs both
libraries with the same seed and compares the images (the tiny perturbed SD1 pipeline of
conftest, PNDM as saved, other schedulers swapped in from its config).
"""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from conftest import TINY_COND_UNET, perturb, save_tiny_sd
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback, SDCFGCutoffCallback
from PIL import Image

import minidiff

TOL = 3e-4
CLASSES = ["StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("sd1"), "sd1")


@pytest.fixture(scope="module")
def loaded(folder):
    """(diffusers, minidiff) pipelines of each class, sharing nothing but the files, loaded once."""
    out = {}
    for name in CLASSES:
        theirs = getattr(diffusers, name).from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
        ours = getattr(minidiff, name).from_pretrained(folder)
        for p in (theirs, ours):
            p.set_progress_bar_config(disable=True)
        out[name] = (theirs, ours)
    return out


def image(h: int = 32, w: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def mask(h: int = 32, w: int = 32) -> Image.Image:
    m = np.zeros((h, w), dtype=np.uint8)
    m[h // 4 : 3 * h // 4, w // 4 :] = 255
    return Image.fromarray(m)


EXTRA = {
    "LatentConsistencyModelPipeline": {},
    "StableDiffusionPipeline": {},
    "StableDiffusionImg2ImgPipeline": dict(image=image(), strength=0.75),
    "StableDiffusionInpaintPipeline": dict(image=image(), mask_image=mask(), strength=0.9),
}


def run_both(loaded, cls_name: str, scheduler: str | None = None, callback=None, **call):
    """The images of both libraries, same seed and arguments; `callback(lib)` gives each its own callback."""
    theirs, ours = loaded[cls_name]
    if scheduler is not None:
        theirs_sched, ours_sched = theirs.scheduler, ours.scheduler
        theirs.scheduler = getattr(diffusers, scheduler).from_config(theirs_sched.config)
        ours.scheduler = getattr(minidiff, scheduler).from_config(ours_sched.config)
    call = dict(prompt="a cat", num_inference_steps=4, output_type="np") | EXTRA[cls_name] | call
    try:
        images = []
        for lib, pipe in (("diffusers", theirs), ("minidiff", ours)):
            extra = {} if callback is None else dict(callback_on_step_end=callback(lib))
            images.append(np.asarray(pipe(generator=torch.Generator().manual_seed(0), **call, **extra).images))
    finally:
        if scheduler is not None:
            theirs.scheduler, ours.scheduler = theirs_sched, ours_sched
    a, b = images
    assert a.shape == b.shape, (a.shape, b.shape)
    err = np.abs(a - b).max()
    assert err <= TOL, f"max abs difference {err:.2e}"
    return a, b


def test_guidance_rescale(loaded):
    plain, _ = run_both(loaded, "StableDiffusionPipeline", guidance_scale=9.0)
    rescaled, _ = run_both(loaded, "StableDiffusionPipeline", guidance_scale=9.0, guidance_rescale=0.7)
    assert np.abs(plain - rescaled).max() > 1e-3  # it did something


@pytest.mark.parametrize("cls_name", CLASSES)
def test_custom_timesteps_and_sigmas(loaded, cls_name):
    run_both(loaded, cls_name, "DDPMScheduler", timesteps=[900, 700, 400, 200, 50])
    run_both(loaded, cls_name, "EulerDiscreteScheduler", sigmas=[14.0, 6.0, 2.5, 1.0, 0.3])
    theirs, ours = loaded[cls_name]
    # PNDM takes neither: both refuse; both at once is refused too
    for kwargs in (dict(timesteps=[900, 500]), dict(sigmas=[3.0, 1.0]), dict(timesteps=[9], sigmas=[1.0])):
        call = dict(prompt="x", num_inference_steps=None, output_type="np", **kwargs) | EXTRA[cls_name]
        for pipe in (theirs, ours):
            with pytest.raises(ValueError, match="timesteps|sigmas"):
                pipe(**call)


def test_custom_timesteps_set_num_timesteps(loaded):
    seen = {}

    def record(lib):
        def callback(pipe, i, t, kwargs):
            seen.setdefault(lib, []).append((i, int(t), pipe.num_timesteps, pipe.guidance_scale))
            seen[lib].append(pipe.do_classifier_free_guidance)
            return kwargs

        return callback

    run_both(loaded, "StableDiffusionPipeline", "DDPMScheduler", timesteps=[800, 500, 100], callback=record)
    run_both(loaded, "StableDiffusionImg2ImgPipeline", "DDPMScheduler", timesteps=[800, 500, 100], callback=record)
    assert seen["minidiff"] == seen["diffusers"] and len(seen["minidiff"]) == 2 * (3 + 2)


@pytest.mark.parametrize("cls_name", CLASSES[:2])
def test_sd_cfg_cutoff_callback(loaded, cls_name):
    """diffusers' own callback object: reads pipe.num_timesteps, cuts prompt_embeds to the conditional
    row and sets pipe._guidance_scale = 0, after which the loop runs one UNet pass per step."""
    plain, _ = run_both(loaded, cls_name, num_inference_steps=6)
    cut, _ = run_both(
        loaded, cls_name, num_inference_steps=6, callback=lambda lib: SDCFGCutoffCallback(cutoff_step_ratio=0.4)
    )
    assert np.abs(plain - cut).max() > 1e-3
    at_step_1 = lambda lib: SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=1)  # noqa: E731
    run_both(loaded, cls_name, num_inference_steps=6, callback=at_step_1)


def test_sd_cfg_cutoff_callback_on_inpaint_is_refused(loaded):
    """SDCFGCutoffCallback cuts prompt_embeds but not the inpaint loop's mask tensors, which keep both halves:
    diffusers fails deep in the UNet (or, with a 4-channel UNet, doubles the batch); minidiff says why."""
    _, ours = loaded["StableDiffusionInpaintPipeline"]
    cutoff = SDCFGCutoffCallback(cutoff_step_ratio=0.4)
    with pytest.raises(ValueError, match="left mask with 2 rows at step 2; with guidance off.*needs 1"):
        ours("x", **EXTRA["StableDiffusionInpaintPipeline"], num_inference_steps=6, callback_on_step_end=cutoff)


class ScaleLatents(PipelineCallback):
    """A PipelineCallback written for diffusers: its own tensor_inputs, modifying the latents."""

    tensor_inputs = ["latents", "prompt_embeds"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        assert "prompt_embeds" in callback_kwargs  # its own list, not callback_on_step_end_tensor_inputs
        callback_kwargs["latents"] = callback_kwargs["latents"] * 0.9
        return callback_kwargs


def test_pipeline_callback_objects(loaded):
    run_both(loaded, "StableDiffusionPipeline", callback=lambda lib: ScaleLatents(cutoff_step_ratio=0.5))
    cutoff = SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=2)
    both = lambda lib: MultiPipelineCallbacks([ScaleLatents(), cutoff])  # noqa: E731
    run_both(loaded, "StableDiffusionPipeline", num_inference_steps=5, callback=both)


@pytest.mark.parametrize("cls_name", CLASSES)
def test_interrupt_stops_early(loaded, cls_name):
    """The docs' recipe: a callback sets pipe._interrupt; the remaining steps are skipped, the latents so far
    decoded."""
    calls = {}

    def stop_after(lib):
        def callback(pipe, i, t, kwargs):
            calls[lib] = calls.get(lib, 0) + 1
            if i == 1:
                pipe._interrupt = True
            return kwargs

        return callback

    stopped, _ = run_both(loaded, cls_name, num_inference_steps=6, callback=stop_after)
    assert calls["minidiff"] == calls["diffusers"] == 2
    full, _ = run_both(loaded, cls_name, num_inference_steps=6)
    assert np.abs(stopped - full).max() > 1e-3
    assert not loaded[cls_name][1].interrupt  # the next call starts afresh


@pytest.mark.parametrize("cls_name", CLASSES)
def test_callback_changes_latents_and_embeddings(loaded, cls_name):
    def change(lib):
        def callback(pipe, i, t, kwargs):
            return {"latents": kwargs["latents"] * 0.95, "prompt_embeds": kwargs["prompt_embeds"] * 1.1}

        return callback

    names = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    run_both(loaded, cls_name, callback=change, callback_on_step_end_tensor_inputs=names)


def test_inpaint_callback_sees_mask_as_diffusers(loaded):
    shapes = {}

    def look(lib):
        def callback(pipe, i, t, kwargs):
            shapes.setdefault(lib, []).append(tuple(tuple(kwargs[k].shape) for k in ("mask", "masked_image_latents")))
            return {"mask": kwargs["mask"] * 0.5}

        return callback

    names = ["latents", "mask", "masked_image_latents"]
    run_both(loaded, "StableDiffusionInpaintPipeline", callback=look, callback_on_step_end_tensor_inputs=names)
    assert shapes["minidiff"] == shapes["diffusers"]


@pytest.mark.parametrize("cls_name", CLASSES)
def test_cross_attention_scale_without_lora_is_a_no_op(loaded, cls_name):
    base, _ = run_both(loaded, cls_name)
    scaled, _ = run_both(loaded, cls_name, cross_attention_kwargs={"scale": 0.3})
    np.testing.assert_array_equal(base, scaled)


def test_bad_calling_arguments(loaded):
    _, ours = loaded["StableDiffusionPipeline"]
    call = dict(prompt="x", num_inference_steps=2, output_type="np")
    with pytest.raises(TypeError, match="cross_attention_kwargs"):
        ours(**call, cross_attention_kwargs=[("scale", 1.0)])
    with pytest.raises(ValueError, match='cross_attention_kwargs\\["scale"\\]'):
        ours(**call, cross_attention_kwargs={"scale": float("nan")})
    with pytest.raises(ValueError, match="guidance_rescale"):
        ours(**call, guidance_rescale=float("inf"))
    with pytest.warns(UserWarning, match="not expected"):
        ours(**call, cross_attention_kwargs={"foo": 1})

    def keep_both_halves_but_stop_guidance(pipe, i, t, kwargs):
        pipe._guidance_scale = 0.0
        return kwargs

    with pytest.raises(ValueError, match="prompt_embeds with 2 rows at step 0.*needs 1"):
        ours(**call, callback_on_step_end=keep_both_halves_but_stop_guidance)


def test_vae_tiling_and_slicing_in_the_pipeline(loaded):
    """pipe.vae.enable_tiling() / enable_slicing() as a diffusers script writes them: the tiny VAE's tiles
    are 32 pixels, the image 64 x 48."""
    theirs, ours = loaded["StableDiffusionPipeline"]
    for pipe in (theirs, ours):
        pipe.vae.enable_tiling()
        pipe.vae.enable_slicing()
    try:
        tiled, _ = run_both(loaded, "StableDiffusionPipeline", prompt=["a", "b"], height=64, width=48)
    finally:
        for pipe in (theirs, ours):
            pipe.vae.disable_tiling()
            pipe.vae.disable_slicing()
    plain, _ = run_both(loaded, "StableDiffusionPipeline", prompt=["a", "b"], height=64, width=48)
    assert np.abs(tiled - plain).max() > 1e-4  # the tiles were blended


@pytest.fixture(scope="module")
def lcm_unet_folder(tmp_path_factory):
    """The tiny SD1 pipeline with an LCM-distilled UNet (time_cond_proj_dim) in place of its own."""
    folder = save_tiny_sd(tmp_path_factory.mktemp("sd1-lcm-unet"), "sd1")
    unet = diffusers.UNet2DConditionModel(**TINY_COND_UNET, sample_size=16, attention_head_dim=2, time_cond_proj_dim=16)
    perturb(unet.eval(), seed=9, scale=0.02).save_pretrained(folder / "unet")
    return folder


@pytest.mark.parametrize("cls_name", CLASSES[:2])
def test_lcm_unet_in_the_sd_pipelines(lcm_unet_folder, cls_name):
    """diffusers' SD pipelines feed such a UNet the embedded guidance scale and run no unconditional pass."""
    theirs = getattr(diffusers, cls_name).from_pretrained(lcm_unet_folder, safety_checker=None)
    ours = getattr(minidiff, cls_name).from_pretrained(lcm_unet_folder)
    theirs.scheduler = diffusers.LCMScheduler.from_config(theirs.scheduler.config)
    ours.scheduler = minidiff.LCMScheduler.from_config(ours.scheduler.config)
    pair = {cls_name: (theirs, ours)}
    for p in (theirs, ours):
        p.set_progress_bar_config(disable=True)
    seen = {}

    def record(lib):
        def callback(pipe, i, t, kwargs):
            seen.setdefault(lib, []).append((pipe.do_classifier_free_guidance, tuple(kwargs["prompt_embeds"].shape)))
            return kwargs

        return callback

    names = ["latents", "prompt_embeds"]
    run_both(pair, cls_name, guidance_scale=6.0, callback=record, callback_on_step_end_tensor_inputs=names)
    assert seen["minidiff"] == seen["diffusers"] and seen["minidiff"][0] == (False, (1, 77, 32))
    run_both(pair, cls_name, guidance_scale=1.5, num_inference_steps=2)


class HalveDenoised(PipelineCallback):
    tensor_inputs = ["latents", "denoised"]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        return {"denoised": callback_kwargs["denoised"] * 0.5, "latents": callback_kwargs["latents"]}


def test_lcm_pipeline_calling_api(lcm_unet_folder):
    name = "LatentConsistencyModelPipeline"
    theirs = diffusers.LatentConsistencyModelPipeline.from_pretrained(lcm_unet_folder, safety_checker=None)
    ours = minidiff.LatentConsistencyModelPipeline.from_pretrained(lcm_unet_folder)
    theirs.scheduler = diffusers.LCMScheduler.from_config(theirs.scheduler.config)
    ours.scheduler = minidiff.LCMScheduler.from_config(ours.scheduler.config)
    for p in (theirs, ours):
        p.set_progress_bar_config(disable=True)
    pair = {name: (theirs, ours)}
    base, _ = run_both(pair, name, timesteps=[999, 759, 499, 259])
    scaled, _ = run_both(pair, name, timesteps=[999, 759, 499, 259], cross_attention_kwargs={"scale": 0.5})
    np.testing.assert_array_equal(base, scaled)
    # diffusers' LCM pipeline ignores a PipelineCallback's own tensor_inputs (minidiff honours them): name them
    halve = lambda lib: HalveDenoised(cutoff_step_ratio=0.5)  # noqa: E731
    run_both(
        pair, name, num_inference_steps=3, callback=halve, callback_on_step_end_tensor_inputs=["latents", "denoised"]
    )
