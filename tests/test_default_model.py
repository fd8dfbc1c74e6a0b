"""The bundled default model (minidiff.DEFAULT_MODEL): trained with minidiff/train.py, graded by
pixel statistics, loaded by diffusers to the same image, and the training code itself."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

import minidiff
from minidiff import shapes, train
from minidiff.cli import main as cli_main
from tests.conftest import rel_err

GRAMMAR_PROMPTS = 8


def as_uint8(images: np.ndarray) -> torch.Tensor:
    """Pipeline "np" output (N, H, W, 3) in [0, 1] -> uint8 (N, 3, H, W) as saved to PNG."""
    return torch.from_numpy((images * 255).round().astype(np.uint8)).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def pipe() -> minidiff.StableDiffusionPipeline:
    return minidiff.StableDiffusionPipeline.from_pretrained(minidiff.DEFAULT_MODEL, local_files_only=True)


# -- the data and its judge ---------------------------------------------------------------------------


def test_judge_reads_rendered_scenes_back():
    rng = random.Random(0)
    scenes = [shapes.random_scene(rng) for _ in range(500)]
    images = shapes.render(scenes, rng)
    assert [shapes.judge(im) for im in images] == scenes
    assert {s.shape for s in scenes} == set(shapes.SHAPES) and all(s.color != s.background for s in scenes)


def test_judge_ignores_a_stray_speck_but_not_a_wrong_shape():
    rng = random.Random(1)
    scene = shapes.Scene("circle", "red", "white")
    image = shapes.render([scene], rng)[0]
    speck = image.clone()
    speck[:, 5:7, 5:7] = torch.tensor(shapes.COLORS["blue"]).view(3, 1, 1)  # would stretch the bounding box
    assert shapes.judge(speck) == scene
    square = shapes.render([shapes.Scene("square", "red", "white")], rng)[0]
    assert shapes.judge(square) == shapes.Scene("square", "red", "white")


def test_judge_says_none_for_an_empty_image():
    blank = torch.full((3, 64, 64), 245, dtype=torch.uint8)
    assert shapes.judge(blank) == shapes.Scene("none", "none", "white")


def test_parse_caption():
    assert shapes.parse_caption("a red circle on a white background") == shapes.Scene("circle", "red", "white")
    with pytest.raises(ValueError, match="not 'a <colour> <shape>"):
        shapes.parse_caption("a purple circle on a white background")


# -- the shipped model --------------------------------------------------------------------------------


def test_default_model_is_the_training_code_s_architecture(pipe):
    vae, text_encoder, unet = train.build_models(train.toy_tokenizer())
    assert pipe.unet.config == unet.config
    assert pipe.text_encoder.config == text_encoder.config
    assert {k: v for k, v in pipe.vae.config.items() if k != "scaling_factor"} == {
        k: v for k, v in vae.config.items() if k != "scaling_factor"
    }
    assert pipe.tokenizer.get_vocab() == train.toy_tokenizer().get_vocab()
    size = sum(f.stat().st_size for f in Path(minidiff.DEFAULT_MODEL).rglob("*") if f.is_file())
    assert size < 10e6, f"the bundled model is {size / 1e6:.1f} MB"


def test_toy_tokenizer_splits_words_as_clip_does():
    toy, clip = train.toy_tokenizer(), minidiff.CLIPTokenizer.from_default_vocab()
    words = " ".join(["a on background", *shapes.COLORS, *shapes.SHAPES])
    assert toy.tokenize(words) == clip.tokenize(words)
    assert len(toy(words).input_ids) == len(words.split()) + 2  # one token per word, as in CLIP
    # any other text still tokenizes, into byte symbols: nothing becomes the unknown token
    assert toy.tokenize("zebra!") == ["z", "e", "b", "r", "a</w>", "!</w>"]
    assert len(toy) < 600


def test_generated_images_match_their_prompts(pipe):
    """For random prompts of the grammar, background, shape colour and shape are right in >= 7 of 8."""
    rng = random.Random(2026)
    scenes = [shapes.random_scene(rng) for _ in range(GRAMMAR_PROMPTS)]
    images = pipe([s.caption for s in scenes], generator=torch.Generator().manual_seed(0), output_type="np").images
    judged = [shapes.judge(im) for im in as_uint8(images)]
    right = sum(j == s for j, s in zip(judged, scenes))
    assert right >= 7, "\n".join(f"{s.caption!r} -> judged {j}" for s, j in zip(scenes, judged))


def test_diffusers_loads_the_default_model_to_the_same_image(pipe):
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(
        minidiff.DEFAULT_MODEL, safety_checker=None, local_files_only=True
    )
    prompt = ["a green square on a yellow background", "a white triangle on a blue background"]
    kwargs = dict(num_inference_steps=20, guidance_scale=7.5, output_type="pt")
    ours = pipe(prompt, generator=torch.Generator().manual_seed(3), **kwargs).images
    ref = theirs(prompt, generator=torch.Generator().manual_seed(3), **kwargs).images
    assert ours.shape == ref.shape == (2, 3, 64, 64)
    assert rel_err(ours, ref) < 1e-4


def test_cli_generate_uses_the_default_model(tmp_path, capsys):
    out = tmp_path / "circle.png"
    assert cli_main(["generate", "a red circle on a white background", "--output", str(out)]) == 0
    from PIL import Image

    image = torch.from_numpy(np.asarray(Image.open(out).convert("RGB"))).permute(2, 0, 1)
    assert image.shape == (3, 64, 64)
    assert shapes.judge(image) == shapes.Scene("circle", "red", "white")


# -- the training code --------------------------------------------------------------------------------


def _weights(trainer: train.Trainer) -> dict[str, torch.Tensor]:
    return {
        **{f"vae.{k}": v for k, v in trainer.vae.state_dict().items()},
        **{f"ema.{k}": v for k, v in trainer.ema.state_dict().items()},
        **{f"model.{k}": v for k, v in trainer.denoiser.state_dict().items()},
    }


def test_training_resumes_exactly(tmp_path):
    """Stopping and resuming gives bit for bit the weights of an uninterrupted run, and the
    exported folder loads as a pipeline."""
    cfg = train.TrainConfig(vae_steps=3, unet_steps=3, vae_batch=2, unet_batch=2, checkpoint_every=100)
    whole = train.Trainer(cfg, tmp_path / "whole")
    (tmp_path / "whole").mkdir()
    folder = whole.run()

    (tmp_path / "split").mkdir()
    first = train.Trainer(cfg, tmp_path / "split")
    first.steps_left = 4  # the 3 VAE steps and 1 UNet step
    with pytest.raises(train.Paused, match="unet step 1/3"):
        first.run()
    second = train.Trainer(cfg, tmp_path / "split")
    second.load_checkpoint()
    assert (second.stage, second.step) == ("unet", 1)
    second.run()

    a, b = _weights(whole), _weights(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    loaded = minidiff.StableDiffusionPipeline.from_pretrained(folder)
    assert loaded.vae.config.scaling_factor == round(whole.scaling_factor, 5)


def test_training_refuses_a_checkpoint_of_another_config(tmp_path):
    cfg = train.TrainConfig(vae_steps=1, unet_steps=1, vae_batch=2, unet_batch=2)
    trainer = train.Trainer(cfg, tmp_path)
    trainer.save_checkpoint()
    other = train.Trainer(train.TrainConfig(vae_steps=2, unet_steps=1, vae_batch=2, unet_batch=2), tmp_path)
    with pytest.raises(ValueError, match="trained with"):
        other.load_checkpoint()
