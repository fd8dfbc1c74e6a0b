"""Stable Diffusion pipelines end to end against diffusers, on the same saved tiny checkpoints.

Tiny SD1-style (quick_gelu CLIP, eos_token_id 2, conv projections, PNDM) and SD2-style (gelu,
linear projections, per-level heads, upcast attention, v-prediction DDIM) pipelines are built by
diffusers / transformers with every weight perturbed, saved in the Hub layout, and loaded by
both libraries. Same seed and arguments -> the same images within 3e-4 on [0, 1].
"""

from __future__ import annotations

import logging

import diffusers
import numpy as np
import pytest
import torch
from conftest import save_tiny_sd
from PIL import Image

import minidiff

TOL = 3e-4
SCHEDULERS = [
    None,
    "DDIMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
    "HeunDiscreteScheduler",
    "DDPMScheduler",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    return {
        "sd1": save_tiny_sd(root / "sd1", "sd1"),
        "sd2": save_tiny_sd(root / "sd2", "sd2", seed=1),
        "inpaint9": save_tiny_sd(root / "inpaint9", "sd1", inpaint=True, seed=2),
    }


_loaded: dict = {}


def pipes(folder, cls_name: str, scheduler: str | None = None):
    key = (str(folder), cls_name)
    if key not in _loaded:
        theirs = getattr(diffusers, cls_name).from_pretrained(
            folder, safety_checker=None, requires_safety_checker=False
        )
        ours = getattr(minidiff, cls_name).from_pretrained(folder)
        _loaded[key] = (theirs, ours, theirs.scheduler, ours.scheduler)
    theirs, ours, their_sched, our_sched = _loaded[key]
    theirs.scheduler, ours.scheduler = their_sched, our_sched
    if scheduler:
        theirs.scheduler = getattr(diffusers, scheduler).from_config(their_sched.config)
        ours.scheduler = getattr(minidiff, scheduler).from_config(our_sched.config)
    for p in (theirs, ours):
        p.set_progress_bar_config(disable=True)
    return theirs, ours


def seeded(seed: int = 0, n: int | None = None):
    if n is None:
        return torch.Generator().manual_seed(seed)
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def compare(
    folder, cls_name: str, scheduler: str | None = None, seed: int = 0, n_generators: int | None = None, **call
):
    theirs, ours = pipes(folder, cls_name, scheduler)
    call.setdefault("num_inference_steps", 4)
    call.setdefault("output_type", "np")
    a = theirs(generator=seeded(seed, n_generators), **call).images
    b = ours(generator=seeded(seed, n_generators), **call).images
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = np.abs(a - b).max()
    assert err <= TOL, f"max abs difference {err:.2e}"
    return b


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_txt2img_with_swapped_schedulers(folders, kind, scheduler):
    compare(folders[kind], "StableDiffusionPipeline", scheduler, prompt="a photo of a cat", guidance_scale=5.0)


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_txt2img_options(folders, kind):
    folder = folders[kind]
    run = lambda **kw: compare(folder, "StableDiffusionPipeline", **kw)  # noqa: E731
    run(prompt="a red car", height=48, width=32)  # non-square
    run(prompt=["a red car", "a blue house"], negative_prompt=["blurry", "dark"], num_images_per_prompt=2)
    run(prompt="a red car", guidance_scale=1.0)  # CFG off: one UNet pass per step
    run(prompt=["a", "b"], scheduler="DDIMScheduler", eta=0.7, n_generators=2)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    run(prompt="given latents", latents=latents)
    out = run(prompt="pt output", output_type="pt")
    assert out.shape == (1, 3, 32, 32)
    out = run(prompt="latent output", output_type="latent")
    assert out.shape == (1, 4, 16, 16)


def test_prompt_embeds(folders):
    theirs, ours = pipes(folders["sd1"], "StableDiffusionPipeline")
    embeds, negative = ours.encode_prompt(["a cat", "a dog"], torch.device("cpu"), 1, True, ["blurry", "dark"])
    ref_embeds, ref_negative = theirs.encode_prompt(
        ["a cat", "a dog"], torch.device("cpu"), 1, True, ["blurry", "dark"]
    )
    assert torch.allclose(embeds, ref_embeds, atol=1e-5) and torch.allclose(negative, ref_negative, atol=1e-5)
    compare(folders["sd1"], "StableDiffusionPipeline", prompt_embeds=ref_embeds, negative_prompt_embeds=ref_negative)
    compare(folders["sd1"], "StableDiffusionPipeline", prompt_embeds=ref_embeds[:1], num_images_per_prompt=2)


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_clip_skip(folders, kind):
    """diffusers 0.42's clip_skip reaches for `text_encoder.text_model`, which transformers 5 no longer has,
    so the reference embeddings are built the way diffusers documents it: the state `clip_skip` layers
    before the last, through the final layer norm; the unconditional side never skips."""
    theirs, ours = pipes(folders[kind], "StableDiffusionPipeline")
    ids = theirs.tokenizer(
        ["a red car"], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        hidden = theirs.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        skipped = theirs.text_encoder.final_layer_norm(hidden)
    _, negative = theirs.encode_prompt("a red car", torch.device("cpu"), 1, True, "ugly")
    a = theirs(
        prompt_embeds=skipped,
        negative_prompt_embeds=negative,
        num_inference_steps=3,
        output_type="np",
        generator=seeded(),
    ).images
    b = ours(
        "a red car", negative_prompt="ugly", clip_skip=1, num_inference_steps=3, output_type="np", generator=seeded()
    ).images
    assert np.abs(a - b).max() <= TOL
    plain = ours(
        "a red car", negative_prompt="ugly", num_inference_steps=3, output_type="np", generator=seeded()
    ).images
    assert np.abs(plain - b).max() > 1e-3  # clip_skip really changes the conditioning


def test_default_pil_output(folders):
    _, ours = pipes(folders["sd1"], "StableDiffusionPipeline")
    images = ours("a cat", num_inference_steps=2, generator=seeded()).images
    assert isinstance(images[0], Image.Image) and images[0].size == (32, 32)


def init_image(h: int = 32, w: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def mask_image(h: int = 32, w: int = 32) -> Image.Image:
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[h // 4 : 3 * h // 4, w // 3 :] = 255
    return Image.fromarray(mask)


@pytest.mark.parametrize(
    "scheduler", [None, "LMSDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler"]
)
@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_img2img(folders, kind, scheduler):
    inputs = dict(prompt="a painting", image=init_image(), strength=0.6, num_inference_steps=6)
    compare(folders[kind], "StableDiffusionImg2ImgPipeline", scheduler, **inputs)


def test_img2img_batches_and_inputs(folders):
    folder = folders["sd1"]
    run = lambda **kw: compare(folder, "StableDiffusionImg2ImgPipeline", **kw)  # noqa: E731
    run(prompt=["a", "b"], image=init_image(48, 32), strength=0.75, num_images_per_prompt=2)
    run(prompt=["a", "b"], image=[init_image(seed=1), init_image(seed=2)], strength=0.5, n_generators=2)
    tensor = torch.from_numpy(np.asarray(init_image(), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    run(prompt="a tensor image", image=tensor, strength=1.0, guidance_scale=1.0)


@pytest.mark.parametrize(
    "kind,scheduler",
    [("inpaint9", None), ("inpaint9", "DDIMScheduler"), ("sd1", None), ("sd2", "EulerDiscreteScheduler")],
)
def test_inpaint(folders, kind, scheduler):
    inputs = dict(prompt="a hat", image=init_image(), mask_image=mask_image())
    compare(folders[kind], "StableDiffusionInpaintPipeline", scheduler, **inputs)


def test_inpaint_options(folders):
    compare(
        folders["inpaint9"],
        "StableDiffusionInpaintPipeline",
        prompt=["a", "b"],
        image=init_image(48, 32),
        mask_image=mask_image(48, 32),
        height=48,
        width=32,
        strength=0.7,
        num_images_per_prompt=2,
    )
    compare(
        folders["sd1"],
        "StableDiffusionInpaintPipeline",
        prompt="a",
        image=init_image(),
        mask_image=mask_image(),
        strength=0.5,
        guidance_scale=1.0,
    )


def test_callback_on_step_end_sees_and_changes_latents(folders):
    seen = []

    def halve(pipe, i, t, kwargs):
        seen.append((i, int(t)))
        return {"latents": kwargs["latents"] * 0.5}

    compare(folders["sd1"], "StableDiffusionPipeline", prompt="x", callback_on_step_end=halve)
    steps = len(pipes(folders["sd1"], "StableDiffusionPipeline")[1].scheduler.timesteps)  # PNDM: N + 1
    assert len(seen) == 2 * steps and seen[:steps] == seen[steps:] and seen[0][0] == 0


@pytest.mark.parametrize("cls_name", ["StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"])
@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
def test_callback_sees_and_changes_prompt_embeds_as_diffusers(folders, cls_name, guidance_scale):
    """diffusers hands the callback the embeddings the UNet reads ([negative; positive] with guidance) and
    uses the ones it returns; a negative half returned on its own is not used."""
    shapes = {"theirs": [], "ours": []}

    def scale_embeds(pipe, i, t, kwargs):
        shapes["ours" if type(pipe).__module__.startswith("minidiff") else "theirs"].append(
            (tuple(kwargs["prompt_embeds"].shape), None if kwargs["negative_prompt_embeds"] is None else 0)
        )
        negative = kwargs["negative_prompt_embeds"]
        out = {"prompt_embeds": kwargs["prompt_embeds"] * 1.5}
        return out if negative is None else {**out, "negative_prompt_embeds": negative * 100}

    extra = dict(image=init_image(), strength=0.75) if "Img2Img" in cls_name else {}
    compare(
        folders["sd1"],
        cls_name,
        prompt=["x", "a cat"],
        guidance_scale=guidance_scale,
        callback_on_step_end=scale_embeds,
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds", "negative_prompt_embeds"],
        **extra,
    )
    assert shapes["ours"] == shapes["theirs"] and shapes["ours"][0][0][0] == (4 if guidance_scale > 1 else 2)


def test_diffusion_pipeline_picks_the_class(folders, tmp_path):
    pipe = minidiff.DiffusionPipeline.from_pretrained(folders["sd2"])
    assert type(pipe) is minidiff.StableDiffusionPipeline
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    pipe.save_pretrained(tmp_path)
    back = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folders["sd2"])
    for name in ("unet", "vae", "text_encoder"):
        theirs = getattr(ref, name).state_dict()
        for k, v in getattr(back, name).state_dict().items():
            assert torch.equal(v, theirs[k]), (name, k)


def test_to_dtype_and_device(folders):
    pipe = minidiff.StableDiffusionPipeline.from_pretrained(folders["sd1"])
    pipe.to(torch.bfloat16)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat", num_inference_steps=2, generator=seeded(), output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    pipe.to("cpu", torch.float32)
    assert pipe.device.type == "cpu" and pipe.dtype == torch.float32


def test_long_prompt_is_truncated_with_a_warning(folders, caplog):
    _, ours = pipes(folders["sd1"], "StableDiffusionPipeline")
    long = " ".join(["word"] * 80) + " tailend"
    with caplog.at_level(logging.WARNING):
        ours(long, num_inference_steps=1, output_type="latent")
    assert "truncated" in caplog.text and "tailend" in caplog.text


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(prompt="x", height=33), ValueError, "divisible by"),
        (dict(prompt="x", prompt_embeds=torch.zeros(1, 77, 32)), ValueError, "not both"),
        (dict(), ValueError, "give `prompt` or `prompt_embeds`"),
        (dict(prompt=["a", "b"], negative_prompt=["c"]), ValueError, "one negative prompt per prompt"),
        (dict(prompt=3), TypeError, "str or a list of str"),
        (dict(prompt=["a", 3]), TypeError, "str or a list of str"),
        (dict(prompt="x", generator=[torch.Generator()] * 3), ValueError, "3 generators"),
        (dict(prompt="x", output_type="jpeg"), ValueError, "output_type"),
        (dict(prompt="x", num_inference_steps=0), ValueError, "num_inference_steps"),
        (dict(prompt="x", callback_on_step_end_tensor_inputs=["noise_pred"]), ValueError, "noise_pred"),
    ],
)
def test_txt2img_bad_input(folders, kwargs, error, match):
    _, ours = pipes(folders["sd1"], "StableDiffusionPipeline")
    with pytest.raises(error, match=match):
        ours(**kwargs)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(prompt="x", image=init_image(), strength=1.5), ValueError, "strength"),
        (dict(prompt="x", image=init_image(), strength=-0.1), ValueError, "strength"),
        (dict(prompt="x", image="picture.png"), TypeError, "PIL image"),
        (dict(prompt="x"), ValueError, "needs an `image`"),
        (dict(prompt="x", image=init_image(), strength=0.01, num_inference_steps=5), ValueError, "no denoising step"),
    ],
)
def test_img2img_bad_input(folders, kwargs, error, match):
    _, ours = pipes(folders["sd1"], "StableDiffusionImg2ImgPipeline")
    with pytest.raises(error, match=match):
        ours(**kwargs)


def test_inpaint_bad_input(folders):
    _, ours = pipes(folders["inpaint9"], "StableDiffusionInpaintPipeline")
    with pytest.raises(ValueError, match="both `image` and `mask_image`"):
        ours("x", image=init_image())
    with pytest.raises(TypeError, match="mask_image"):
        ours("x", image=init_image(), mask_image=[mask_image(), np.zeros((32, 32))])


def test_cli_generate_equals_api(folders, tmp_path, capsys):
    from minidiff.cli import main

    out = tmp_path / "cli.png"
    args = [
        "generate",
        "a red circle",
        "--model",
        str(folders["sd2"]),
        "--steps",
        "3",
        "--seed",
        "5",
        "--scheduler",
        "euler-a",
        "--guidance",
        "4",
        "--height",
        "48",
        "--width",
        "32",
        "--negative-prompt",
        "blue",
        "--num-images",
        "2",
        "--output",
        str(out),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "cli-0.png"), str(tmp_path / "cli-1.png")]

    pipe = minidiff.StableDiffusionPipeline.from_pretrained(folders["sd2"])
    pipe.scheduler = minidiff.EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    images = pipe(
        "a red circle",
        negative_prompt="blue",
        num_inference_steps=3,
        guidance_scale=4,
        height=48,
        width=32,
        num_images_per_prompt=2,
        generator=torch.Generator().manual_seed(5),
    ).images
    for i, image in enumerate(images):
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"cli-{i}.png")), np.asarray(image))


def test_cli_rejects_unknown_scheduler(folders):
    from minidiff.cli import main

    with pytest.raises(SystemExit, match="unknown --scheduler 'magic'"):
        main(["generate", "x", "--model", str(folders["sd1"]), "--scheduler", "magic", "--steps", "1"])
