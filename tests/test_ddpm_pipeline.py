"""DDPMPipeline end to end against diffusers: same checkpoint, same seed -> same images."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from conftest import DDPM_FLAVOUR, TINY_UNET_2D, perturb, reference_config
from test_unet_2d import legacy_names

import minidiff

TINY_UNET = dict(TINY_UNET_2D, sample_size=16, **DDPM_FLAVOUR)


def save_pipeline(folder, unet_config: dict, legacy: bool) -> None:
    unet = perturb(diffusers.UNet2DModel.from_config(unet_config), scale=0.02).eval()
    scheduler = diffusers.DDPMScheduler.from_config(reference_config("ddpm-cat-256.scheduler"))
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    if legacy:
        legacy_names(folder / "unet")


def run_both(folder, scheduler: str | None, **call):
    theirs = diffusers.DDPMPipeline.from_pretrained(folder)
    ours = minidiff.DiffusionPipeline.from_pretrained(folder)
    assert type(ours) is minidiff.DDPMPipeline
    if scheduler:
        theirs.scheduler = getattr(diffusers, scheduler).from_config(theirs.scheduler.config)
        ours.scheduler = getattr(minidiff, scheduler).from_config(ours.scheduler.config)
    for pipe in (theirs, ours):
        pipe.set_progress_bar_config(disable=True)
    a = theirs(generator=torch.Generator().manual_seed(7), output_type="np", **call).images
    b = ours(generator=torch.Generator().manual_seed(7), output_type="np", **call).images
    return a, b


@pytest.mark.parametrize("scheduler", [None, "DDIMScheduler"])
def test_tiny_pipeline_matches(tmp_path, scheduler):
    save_pipeline(tmp_path, TINY_UNET, legacy=False)
    a, b = run_both(tmp_path, scheduler, num_inference_steps=5, batch_size=2)
    assert a.shape == b.shape == (2, 16, 16, 3)
    assert np.abs(a - b).max() <= 2e-4


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", [None, "DDIMScheduler"])
def test_ddpm_cat_256_architecture_with_legacy_names(tmp_path, scheduler):
    """The real google/ddpm-cat-256 UNet config and scheduler, stored with the legacy attention names.

    sample_size is lowered to 64 to keep the run short: every layer and weight shape is the real one.
    """
    config = dict(reference_config("ddpm-cat-256.unet"), sample_size=64)
    save_pipeline(tmp_path, config, legacy=True)
    a, b = run_both(tmp_path, scheduler, num_inference_steps=5)
    assert a.shape == b.shape == (1, 64, 64, 3)
    assert np.abs(a - b).max() <= 2e-4


def test_pil_output_and_generator_list(tmp_path):
    save_pipeline(tmp_path, TINY_UNET, legacy=False)
    pipe = minidiff.DDPMPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        batch_size=2, num_inference_steps=2, generator=[torch.Generator().manual_seed(i) for i in range(2)]
    ).images
    assert [im.size for im in images] == [(16, 16), (16, 16)]
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        pipe(batch_size=3, num_inference_steps=2, generator=[torch.Generator(), torch.Generator()])


def test_save_pretrained_round_trip(tmp_path):
    save_pipeline(tmp_path / "a", TINY_UNET, legacy=True)
    minidiff.DDPMPipeline.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b")
    theirs = diffusers.DDPMPipeline.from_pretrained(tmp_path / "b")
    reference = diffusers.DDPMPipeline.from_pretrained(tmp_path / "a")
    for k, v in reference.unet.state_dict().items():
        assert torch.equal(v, theirs.unet.state_dict()[k]), k
    assert dict(theirs.scheduler.config)["variance_type"] == "fixed_small"
