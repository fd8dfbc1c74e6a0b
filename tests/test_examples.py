"""The tutorials in examples/ run the same code on minidiff and on diffusers + transformers.

Each example's functions take `lib`, the library the classes come from. Here they run once with
`minidiff` and once with DIFFUSERS (diffusers' and transformers' classes under the same names) on
the same saved tiny checkpoints, and every intermediate and final result is compared: embeddings
and latents within 1e-4 relative, images within 3e-4 on [0, 1].
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import diffusers
import numpy as np
import pytest
import torch
import transformers
from conftest import rel_err, save_tiny_sd
from PIL import Image
from test_ddpm_pipeline import TINY_UNET, save_pipeline

import minidiff

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import ddpm_loop  # noqa: E402
import embedding_mixing  # noqa: E402
import img2img_loop  # noqa: E402
import stable_diffusion_loop as sd_loop  # noqa: E402

DIFFUSERS = SimpleNamespace(
    **{
        name: getattr(diffusers, name)
        for name in (
            "UNet2DModel",
            "UNet2DConditionModel",
            "AutoencoderKL",
            "DDPMScheduler",
            "LMSDiscreteScheduler",
            "UniPCMultistepScheduler",
        )
    },
    CLIPTextModel=transformers.CLIPTextModel,
    CLIPTokenizer=transformers.CLIPTokenizer,
)
LIBS = {"minidiff": minidiff, "diffusers": DIFFUSERS}
IMAGE_TOL = 3e-4  # max abs difference of images in [0, 1]
TENSOR_TOL = 1e-4  # max|a - b| / max|b| of embeddings and latents


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    assert ours.shape == theirs.shape, what
    assert rel_err(ours, theirs) <= TENSOR_TOL, f"{what}: relative error {rel_err(ours, theirs):.2e}"


def assert_same_images(ours: np.ndarray, theirs: np.ndarray, shape: tuple[int, ...]) -> None:
    assert ours.shape == theirs.shape == shape
    assert theirs.std() > 1e-3, "the reference image is flat: the comparison would prove nothing"
    assert np.abs(ours - theirs).max() <= IMAGE_TOL


@pytest.fixture(scope="module")
def ddpm_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ddpm")
    save_pipeline(folder, TINY_UNET, legacy=False)
    return folder


@pytest.fixture(scope="module")
def sd_models(tmp_path_factory) -> dict[str, Path]:
    return {kind: save_tiny_sd(tmp_path_factory.mktemp(kind), kind) for kind in ("sd1", "sd2")}


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    """A smooth colour picture with an edge: something the VAE can encode."""
    y, x = np.mgrid[0:48, 0:40] / 48.0
    rgb = np.stack([x, y, ((x - 0.4) ** 2 + (y - 0.5) ** 2 < 0.1).astype(float)], axis=-1)
    path = tmp_path_factory.mktemp("picture") / "picture.png"
    Image.fromarray((rgb * 255).astype(np.uint8)).save(path)
    return path


# ---------------------------------------------------------------- ddpm_loop.py


def test_ddpm_loop_matches(ddpm_model):
    images = {}
    for name, lib in LIBS.items():
        unet, scheduler = ddpm_loop.load(lib, str(ddpm_model))
        x = ddpm_loop.sample(unet, scheduler, steps=4, generator=torch.Generator().manual_seed(3), batch_size=2)
        images[name] = ddpm_loop.to_images(x)
    assert_same_images(images["minidiff"], images["diffusers"], (2, 16, 16, 3))


# ---------------------------------------------------------------- stable_diffusion_loop.py


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_stable_diffusion_loop_matches(sd_models, kind):
    prompts = ["a photograph of an astronaut riding a horse", "a watercolor painting of a cat"]
    runs = {}
    for name, lib in LIBS.items():
        c = sd_loop.load_components(lib, str(sd_models[kind]))
        assert type(c.scheduler).__name__ == "UniPCMultistepScheduler"
        prompt_embeds = sd_loop.encode_prompt(c.tokenizer, c.text_encoder, prompts)
        cfg_embeds = sd_loop.with_unconditional(c, prompt_embeds)
        # non-square: 40x24 pixels, 20x12 latents with the tiny VAE's factor 2
        latents = sd_loop.sample_latents(c, prompt_embeds, 4, torch.Generator().manual_seed(0), 40, 24)
        runs[name] = dict(cfg_embeds=cfg_embeds, latents=latents, images=sd_loop.decode_latents(c.vae, latents))
    ours, theirs = runs["minidiff"], runs["diffusers"]
    assert_close(ours["cfg_embeds"], theirs["cfg_embeds"], "text embeddings")
    assert_close(ours["latents"], theirs["latents"], "final latents")
    assert_same_images(ours["images"], theirs["images"], (2, 40, 24, 3))


# ---------------------------------------------------------------- img2img_loop.py


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_img2img_loop_matches(sd_models, picture, kind):
    steps, start_step = 6, 2
    runs = {}
    for name, lib in LIBS.items():
        c = sd_loop.load_components(lib, str(sd_models[kind]), scheduler="LMSDiscreteScheduler")
        c.scheduler.set_timesteps(steps)
        generator = torch.Generator().manual_seed(32)
        clean = img2img_loop.encode_image(c.vae, img2img_loop.load_image(picture, 48, 40), generator)
        noised = img2img_loop.noise_to_step(c.scheduler, clean, start_step, generator)
        runs[name] = dict(clean=clean, noised=noised)
        runs[name]["images"] = img2img_loop.img2img(
            lib, str(sd_models[kind]), picture, "a dancer", steps, start_step, seed=32, height=48, width=40
        )
    ours, theirs = runs["minidiff"], runs["diffusers"]
    assert_close(ours["clean"], theirs["clean"], "encoded picture")
    assert_close(ours["noised"], theirs["noised"], "noised start latents")
    assert not torch.allclose(theirs["noised"], theirs["clean"]), "add_noise added nothing"
    assert_same_images(ours["images"], theirs["images"], (1, 48, 40, 3))


def test_img2img_keeps_the_picture_when_starting_late(sd_models, picture):
    """The later the start, the closer the result stays to the input (the point of the tutorial)."""
    model = str(sd_models["sd1"])
    c = sd_loop.load_components(minidiff, model)
    pixels = img2img_loop.load_image(picture, 32, 32)
    roundtrip = sd_loop.decode_latents(c.vae, img2img_loop.encode_image(c.vae, pixels, torch.Generator()))[0]
    early, late = (
        img2img_loop.img2img(minidiff, model, picture, "a dancer", steps=6, start_step=s, guidance_scale=1.0)[0]
        for s in (0, 5)
    )
    assert np.abs(late - roundtrip).mean() < np.abs(early - roundtrip).mean()


# ---------------------------------------------------------------- embedding_mixing.py


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_embedding_mixing_matches(sd_models, kind):
    runs = {}
    for name, lib in LIBS.items():
        c = sd_loop.load_components(lib, str(sd_models[kind]), scheduler="LMSDiscreteScheduler")
        assert embedding_mixing.word_token_id(c.tokenizer, "puppy") == 6829  # CLIP's vocabulary
        assert embedding_mixing.word_token_id(c.tokenizer, "skunk") == 42194
        mixed = embedding_mixing.mixed_prompt_embeddings(c.tokenizer, c.text_encoder, "a picture of a puppy")
        plain = sd_loop.encode_prompt(c.tokenizer, c.text_encoder, ["a picture of a puppy"])
        unmixed = embedding_mixing.mixed_prompt_embeddings(c.tokenizer, c.text_encoder, "a picture of a puppy", mix=0.0)
        latents = sd_loop.sample_latents(c, mixed, 3, torch.Generator().manual_seed(32), 32, 32)
        runs[name] = dict(mixed=mixed, plain=plain, unmixed=unmixed, images=sd_loop.decode_latents(c.vae, latents))
    ours, theirs = runs["minidiff"], runs["diffusers"]
    for run in runs.values():
        # mix=0 is the ordinary encoding; mix=0.5 changes the puppy token and (causally) what follows it
        assert_close(run["unmixed"], run["plain"], "mix=0 vs plain encoding")
        changed = (run["mixed"] - run["plain"]).abs().amax(dim=-1)[0] > 1e-6
        assert not changed[:5].any() and changed[5:].all()  # <start> a picture of a | puppy <end> ...
    assert_close(ours["mixed"], theirs["mixed"], "mixed prompt embeddings")
    assert_same_images(ours["images"], theirs["images"], (1, 32, 32, 3))


def test_minidiff_inputs_embeds_equals_the_hook_route(sd_models):
    """minidiff's `CLIPTextModel(inputs_embeds=...)` is the direct form of the example's hook."""
    c = sd_loop.load_components(minidiff, str(sd_models["sd1"]))
    ids = sd_loop.tokenize(c.tokenizer, ["a picture of a skunk"])
    token_embeds = c.text_encoder.get_input_embeddings()(ids) * 1.5  # anything but the plain lookup
    with torch.no_grad():
        direct = c.text_encoder(inputs_embeds=token_embeds)[0]
    hooked = embedding_mixing.encode_token_embeddings(c.text_encoder, ids, token_embeds)
    assert_close(hooked, direct, "hook vs inputs_embeds")


# ---------------------------------------------------------------- main(): argparse to PNG


def read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.float32) / 255


def test_ddpm_main_writes_the_generated_image(ddpm_model, tmp_path):
    out = tmp_path / "ddpm.png"
    ddpm_loop.main(["--model", str(ddpm_model), "--steps", "3", "--seed", "1", "--output", str(out)])
    expected = ddpm_loop.generate(DIFFUSERS, str(ddpm_model), steps=3, seed=1)[0]
    assert np.abs(read_png(out) - expected).max() <= 1 / 255  # 8-bit rounding


def test_stable_diffusion_main_writes_the_generated_image(sd_models, tmp_path):
    out, model = tmp_path / "sd.png", str(sd_models["sd2"])
    sd_loop.main(["--model", model, "--prompt", "a cat", "--steps", "2", "--seed", "4", "--height", "24",
                  "--width", "40", "--output", str(out)])  # fmt: skip
    expected = sd_loop.generate(DIFFUSERS, model, "a cat", steps=2, seed=4, height=24, width=40)[0]
    assert np.abs(read_png(out) - expected).max() <= 1 / 255


def test_img2img_main_writes_the_generated_image(sd_models, picture, tmp_path):
    out, model = tmp_path / "img2img.png", str(sd_models["sd1"])
    img2img_loop.main(["--model", model, "--image", str(picture), "--prompt", "a dancer", "--steps", "3",
                       "--start-step", "1", "--output", str(out)])  # fmt: skip
    expected = img2img_loop.img2img(DIFFUSERS, model, picture, "a dancer", steps=3, start_step=1)[0]
    assert np.abs(read_png(out) - expected).max() <= 1 / 255


def test_embedding_mixing_main_writes_the_generated_image(sd_models, tmp_path):
    out, model = tmp_path / "mix.png", str(sd_models["sd1"])
    embedding_mixing.main(["--model", model, "--steps", "2", "--mix", "0.3", "--output", str(out)])
    expected = embedding_mixing.generate(DIFFUSERS, model, mix=0.3, steps=2)[0]
    assert np.abs(read_png(out) - expected).max() <= 1 / 255


def test_examples_refuse_bad_arguments(sd_models, picture):
    model = str(sd_models["sd1"])
    with pytest.raises(SystemExit):
        img2img_loop.main(["--model", model])  # --image is required
    with pytest.raises(ValueError, match="start_step"):
        img2img_loop.img2img(minidiff, model, picture, "x", steps=3, start_step=3)
    with pytest.raises(ValueError, match="does not occur"):
        embedding_mixing.generate(minidiff, model, prompt="a picture of a cat", steps=1)
    with pytest.raises(ValueError, match="multiples of 2"):
        sd_loop.generate(minidiff, model, "a cat", steps=1, height=33, width=32)
