"""Bad inputs to the pipelines: each is refused by name before any model runs, or read for what it is.

Every case of the table runs against a tiny saved SD1-style pipeline; a forward hook on the UNet,
VAE and text encoder proves no model ran before the error. Where the same input is given to
diffusers 0.42.1, the table records what diffusers does: "raises" (minidiff must raise too, naming
the argument instead of a library's internals) or "accepts" (diffusers goes on, with a silently
wrong result the comment names; minidiff refuses). Images diffusers misreads (16-bit, uint8 arrays,
RGBA) are converted by their bit depth and compared with the 8-bit / float equivalent.
Then NaN/Inf detection: a NaN weight gives an error naming the component and the step, without a
host sync per step.
"""

from __future__ import annotations

import copy
import math
import os
import traceback
import warnings

import diffusers
import numpy as np
import pytest
import torch
from conftest import TINY_UNET_2D, save_tiny_sd
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import minidiff
from minidiff.noise import seeded_generator
from minidiff.pipelines import checks
from minidiff.pipelines.image_processing import preprocess_image

NAN = float("nan")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    return {"sd1": save_tiny_sd(root / "sd1", "sd1"), "inpaint9": save_tiny_sd(root / "in9", "sd1", inpaint=True)}


_cache: dict = {}


def pipes(folders, kind: str, cls_name: str):
    """(diffusers, minidiff) pipelines of class `cls_name` on the tiny `kind` folder, loaded once."""
    key = (kind, cls_name)
    if key not in _cache:
        theirs = getattr(diffusers, cls_name).from_pretrained(
            folders[kind], safety_checker=None, requires_safety_checker=False
        )
        ours = getattr(minidiff, cls_name).from_pretrained(folders[kind])
        for p in (theirs, ours):
            p.set_progress_bar_config(disable=True)
        _cache[key] = (theirs, ours)
    return _cache[key]


def fresh(folders, kind: str = "sd1", cls_name: str = "StableDiffusionPipeline"):
    """A minidiff pipeline of its own, to break a weight of."""
    pipe = getattr(minidiff, cls_name).from_pretrained(folders[kind])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def rgb(h: int = 32, w: int = 32, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def mask(h: int = 32, w: int = 32) -> Image.Image:
    m = np.zeros((h, w), dtype=np.uint8)
    m[h // 4 : 3 * h // 4, w // 3 :] = 255
    return Image.fromarray(m)


def gray16(h: int = 32, w: int = 32) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 65536, (h, w), dtype=np.uint16)


def returns(value):
    return lambda pipe, i, t, kwargs: value


RUN = dict(num_inference_steps=2, output_type="np")
T2I, I2I, INP = "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"
IMG = dict(image=rgb(), strength=0.5)
INPAINT = dict(image=rgb(), mask_image=mask())

# (id, pipeline, kwargs, minidiff's error, a regex its message matches, diffusers: "raises" / "accepts" / None)
CASES = [
    # sizes
    (
        "height 0",
        T2I,
        dict(height=0, width=32),
        ValueError,
        "`height` must be a positive",
        "accepts",
    ),  # -> default size
    ("height -8", T2I, dict(height=-8, width=32), ValueError, "`height` must be a positive", "raises"),
    ("width -16", T2I, dict(height=32, width=-16), ValueError, "`width` must be a positive", "raises"),
    ("height 33", T2I, dict(height=33, width=32), ValueError, "`height` and `width` have to be divisible by", "raises"),
    ("height 32.5", T2I, dict(height=32.5, width=32), ValueError, "divisible by", "raises"),
    ("height '32'", T2I, dict(height="32", width=32), TypeError, "`height` must be an int", "raises"),
    ("height alone 33", T2I, dict(height=33), ValueError, "divisible by", "accepts"),  # both -> the default size
    ("100000 x 100000", T2I, dict(height=100000, width=100000), ValueError, "more than the 67108864 pixels", None),
    ("inpaint height 0", INP, dict(height=0, **INPAINT), ValueError, "`height` must be a positive", "accepts"),
    ("inpaint width -8", INP, dict(width=-8, **INPAINT), ValueError, "`width` must be a positive", "raises"),
    # numbers
    ("guidance nan", T2I, dict(guidance_scale=NAN), ValueError, "`guidance_scale` must be a finite", "accepts"),
    ("guidance inf", T2I, dict(guidance_scale=math.inf), ValueError, "`guidance_scale` must be a finite", "accepts"),
    ("guidance str", T2I, dict(guidance_scale="7.5"), TypeError, "`guidance_scale` must be a number", "raises"),
    ("eta nan", T2I, dict(eta=NAN), ValueError, "`eta` must be a finite", "accepts"),
    ("eta -0.5", T2I, dict(eta=-0.5), ValueError, r"`eta` must be in \[0.0, 1.0\]", "accepts"),
    ("eta 1.5", T2I, dict(eta=1.5), ValueError, r"`eta` must be in \[0.0, 1.0\]", "accepts"),  # DDIM: NaN image
    ("strength nan", I2I, dict(image=rgb(), strength=NAN), ValueError, "`strength` must be a finite", "raises"),
    ("strength 1.5", I2I, dict(image=rgb(), strength=1.5), ValueError, r"`strength` must be in \[0.0, 1.0\]", "raises"),
    ("inpaint strength nan", INP, dict(strength=NAN, **INPAINT), ValueError, "`strength` must be a finite", "raises"),
    (
        "images/prompt 0",
        T2I,
        dict(num_images_per_prompt=0),
        ValueError,
        "`num_images_per_prompt` must be >= 1",
        "raises",
    ),
    ("images/prompt -1", T2I, dict(num_images_per_prompt=-1), ValueError, "`num_images_per_prompt` must be", "raises"),
    (
        "images/prompt 1.5",
        T2I,
        dict(num_images_per_prompt=1.5),
        TypeError,
        "`num_images_per_prompt` must be an int",
        "raises",
    ),
    ("steps 0", T2I, dict(num_inference_steps=0), ValueError, "`num_inference_steps` must be >= 1", "raises"),
    ("steps -1", T2I, dict(num_inference_steps=-1), ValueError, "`num_inference_steps` must be >= 1", "accepts"),
    ("steps 2.5", T2I, dict(num_inference_steps=2.5), TypeError, "`num_inference_steps` must be an int", "raises"),
    ("img2img steps 0", I2I, dict(num_inference_steps=0, **IMG), ValueError, "`num_inference_steps`", "raises"),
    # text and embeddings
    (
        "surrogate",
        T2I,
        dict(prompt="a\ud800b"),
        ValueError,
        r"`prompt` is not valid Unicode.*'\\ud800' at index 1",
        "raises",
    ),
    (
        "surrogate in list",
        T2I,
        dict(prompt=["ok", "\udfff"]),
        ValueError,
        r"`prompt\[1\]` is not valid Unicode",
        "raises",
    ),
    ("negative surrogate", T2I, dict(negative_prompt="\ud800"), ValueError, "`negative_prompt` is not valid", "raises"),
    (
        "embeds width 16",
        T2I,
        dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 16)),
        ValueError,
        "`prompt_embeds` has width 16, but the UNet's cross_attention_dim is 32",
        "raises",
    ),
    (
        "embeds 2-d",
        T2I,
        dict(prompt=None, prompt_embeds=torch.zeros(77, 32)),
        ValueError,
        "`prompt_embeds` must be a 3-d float tensor",
        "raises",
    ),
    (
        "negative embeds width 16",
        T2I,
        dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 32), negative_prompt_embeds=torch.zeros(1, 77, 16)),
        ValueError,
        "`negative_prompt_embeds` has width 16",
        "raises",
    ),
    (
        "embeds nan",
        T2I,
        dict(prompt=None, prompt_embeds=torch.full((1, 77, 32), NAN)),
        ValueError,
        "`prompt_embeds` holds NaN",
        "accepts",
    ),  # a NaN image
    (
        "clip_skip = depth",
        T2I,
        dict(clip_skip=3),
        ValueError,
        "`clip_skip` is 3, but the text encoder has 3 layers",
        "raises",
    ),
    ("clip_skip > depth", T2I, dict(clip_skip=5), ValueError, "`clip_skip` is 5", "raises"),
    ("clip_skip -1", T2I, dict(clip_skip=-1), ValueError, "`clip_skip` must be >= 0", "raises"),
    ("clip_skip str", T2I, dict(clip_skip="1"), TypeError, "`clip_skip` must be an int", "raises"),
    # tensors, generators, outputs, callbacks
    ("latents nan", T2I, dict(latents=torch.full((1, 4, 16, 16), NAN)), ValueError, "`latents` holds NaN", "accepts"),
    ("latents list", T2I, dict(latents=[0.0]), TypeError, "`latents` must be a torch.Tensor", "raises"),
    ("generator int", T2I, dict(generator=42), TypeError, "`generator` must be a torch.Generator", "raises"),
    ("output_type", T2I, dict(output_type="jpeg"), ValueError, "output_type must be", "accepts"),  # -> np
    (
        "callback not callable",
        T2I,
        dict(callback_on_step_end=3),
        TypeError,
        "`callback_on_step_end` must be callable",
        "raises",
    ),
    # images
    (
        "image float 0..255",
        I2I,
        dict(image=np.full((32, 32, 3), 200.0, np.float32), strength=0.5),
        ValueError,
        r"`image` has values in \[200, 200\] \(0..255\? divide by 255\)",
        "accepts",
    ),  # taken as 0..1
    (
        "image nan",
        I2I,
        dict(image=np.full((32, 32, 3), NAN, np.float32), strength=0.5),
        ValueError,
        "`image` holds NaN",
        "accepts",
    ),  # a NaN image
    (
        "image int64",
        I2I,
        dict(image=np.zeros((32, 32, 3), np.int64), strength=0.5),
        TypeError,
        "`image` has dtype int64",
        None,
    ),
    (
        "image RGBA array",
        I2I,
        dict(image=np.zeros((32, 32, 4), np.float32), strength=0.5),
        ValueError,
        "`image` has 4 channels",
        None,
    ),  # diffusers: taken for latents
    (
        "image tensor below -1",
        I2I,
        dict(image=torch.full((1, 3, 32, 32), -3.0), strength=0.5),
        ValueError,
        r"`image` has values in \[-3, -3\]",
        "accepts",
    ),
    ("image 1x1", I2I, dict(image=rgb(1, 1), strength=0.5), ValueError, "`image` would be 1 x 1 pixels", "raises"),
    (
        "image mode I too wide",
        I2I,
        dict(image=Image.fromarray(np.full((32, 32), 70000, np.int32)), strength=0.5),
        ValueError,
        "mode I.*0..65535",
        "raises",
    ),
    (
        "image mode F 0..255",
        I2I,
        dict(image=Image.fromarray(np.full((32, 32), 128.0, np.float32)), strength=0.5),
        ValueError,
        r"mode F.*expected \[0, 1\]",
        "raises",
    ),
    (
        "mask float 0..255",
        INP,
        dict(image=rgb(), mask_image=np.full((32, 32), 255.0, np.float32)),
        ValueError,
        r"`mask_image` has values in \[255, 255\]",
        "accepts",
    ),
    (
        "mask RGB array",
        INP,
        dict(image=rgb(), mask_image=np.ones((1, 32, 32, 3), np.float32)),
        ValueError,
        "`mask_image` must have one channel",
        None,
    ),
]


def _kind(cls_name: str) -> str:
    return "inpaint9" if cls_name == INP else "sd1"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_refused_by_name_before_any_model_runs(folders, case):
    _, cls_name, kwargs, error, match, diffusers_does = case
    theirs, ours = pipes(folders, _kind(cls_name), cls_name)
    call = {"prompt": "x", **RUN, **kwargs}
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in (ours.unet, ours.vae, ours.text_encoder)]
    try:
        with pytest.raises(error, match=match):
            ours(**call)
    finally:
        for h in hooks:
            h.remove()
    assert not calls, "a model ran before the error"
    if diffusers_does is None:
        return
    if cls_name == T2I and "eta" in kwargs:  # diffusers' PNDM ignores eta: give it DDIM, which takes it
        theirs = diffusers.StableDiffusionPipeline(
            **{**theirs.components, "scheduler": diffusers.DDIMScheduler.from_config(theirs.scheduler.config)}
        )
        theirs.set_progress_bar_config(disable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if diffusers_does == "raises":
            with pytest.raises(Exception):  # noqa: B017 (diffusers raises from wherever it breaks)
                theirs(**call)
        else:
            theirs(**call)


def test_callback_must_return_a_dict(folders):
    theirs, ours = pipes(folders, "sd1", T2I)
    for value in (None, 3, [1]):
        with pytest.raises(TypeError, match=f"`callback_on_step_end` must return a dict.*got {type(value).__name__}"):
            ours("x", callback_on_step_end=returns(value), **RUN)
        with pytest.raises(Exception):  # noqa: B017 (AttributeError: 'NoneType' object has no attribute 'pop')
            theirs("x", callback_on_step_end=returns(value), **RUN)
    with pytest.raises(ValueError, match=r"returned latents \(1, 4, 2, 2\) at step 0, expected shape \(1, 4, 16, 16\)"):
        ours("x", callback_on_step_end=returns({"latents": torch.zeros(1, 4, 2, 2)}), **RUN)
    assert ours("x", callback_on_step_end=returns({}), **RUN).images.shape == (1, 32, 32, 3)


def test_generator_list_of_the_wrong_length(folders):
    theirs, ours = pipes(folders, "sd1", T2I)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    with pytest.raises(ValueError, match="3 generators for an effective batch of 2"):
        ours("x", num_images_per_prompt=2, generator=gens, **RUN)
    with pytest.raises(ValueError, match="generators of length 3"):
        theirs("x", num_images_per_prompt=2, generator=gens, **RUN)


def test_seed_out_of_range_is_named():
    with pytest.raises(ValueError, match=r"`seed` must be in \[-9223372036854775808, 18446744073709551615\]"):
        seeded_generator(2**70)
    with pytest.raises(ValueError, match="Overflow when unpacking"):  # what torch itself says
        torch.Generator().manual_seed(2**70)
    with pytest.raises(TypeError, match="`seed` must be an int"):
        seeded_generator(1.5)
    assert seeded_generator(2**64 - 1).initial_seed() == 2**64 - 1
    assert seeded_generator(-1).initial_seed() == 2**64 - 1  # torch reads it modulo 2**64


def test_max_pixels_is_configurable(folders, monkeypatch):
    _, ours = pipes(folders, "sd1", T2I)
    monkeypatch.setenv(checks.MAX_PIXELS_ENV, str(32 * 24))
    with pytest.raises(ValueError, match=r"height x width = 32 x 32 is more than the 768 pixels.*MINIDIFF_MAX_PIXELS"):
        ours("x", **RUN)
    assert ours("x", height=32, width=24, **RUN).images.shape == (1, 32, 24, 3)
    _, img2img = pipes(folders, "sd1", I2I)
    with pytest.raises(ValueError, match="image height x image width = 32 x 32 is more than the 768"):
        img2img("x", image=rgb(), strength=0.5, **RUN)
    monkeypatch.delenv(checks.MAX_PIXELS_ENV)
    monkeypatch.setattr(checks, "MAX_PIXELS", 100)
    with pytest.raises(ValueError, match="more than the 100 pixels"):
        ours("x", **RUN)


def test_a_str_negative_prompt_serves_every_prompt(folders):
    _, ours = pipes(folders, "sd1", T2I)
    embeds = ours.encode_prompt(["a", "b"], torch.device("cpu"), 1, True)[0]
    out = ours(prompt_embeds=embeds, negative_prompt="blurry", **RUN).images  # diffusers: a shape error
    assert out.shape == (2, 32, 32, 3)


# -- images read by their bit depth --------------------------------------------------------------------


def _pre(image, **kw) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "already in [-1, 1]" warning for these
        return preprocess_image(image, **kw)


def test_sixteen_bit_and_float_pil_images_are_scaled_by_their_depth():
    a = gray16()
    expected = torch.from_numpy(a.astype(np.float32) / 65535).expand(1, 3, 32, 32) * 2 - 1
    big_endian = Image.frombytes("I;16B", (32, 32), a.astype(">u2").tobytes())
    for image in (
        Image.fromarray(a),
        big_endian,
        Image.fromarray(a.astype(np.int32)),
        Image.fromarray(a.astype(np.float32) / 65535),
    ):
        assert image.mode in ("I;16", "I;16B", "I", "F")
        x = _pre(image)
        assert x.shape == (1, 3, 32, 32) and torch.allclose(x, expected, atol=1e-6), image.mode
    # diffusers' convert("RGB") / PIL clip at 255: the 16-bit image would be almost all white
    assert (np.asarray(Image.fromarray(a).convert("RGB")) == 255).mean() > 0.9
    # resized like 8-bit images (Lanczos), and a 16-bit mask binarised at half its range
    assert _pre(Image.fromarray(gray16(40, 48))).shape == (1, 3, 40, 48)
    half = np.full((32, 32), 30000, np.uint16)
    half[:, 16:] = 40000
    m = _pre(Image.fromarray(half), mask=True)
    assert m[..., :16].sum() == 0 and m[..., 16:].min() == 1


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "1"])
def test_8bit_pil_modes_are_converted_to_rgb(mode):
    image = rgb().convert(mode)
    expected = torch.from_numpy(np.asarray(image.convert("RGB"), np.float32) / 255).permute(2, 0, 1)[None] * 2 - 1
    assert torch.equal(_pre(image), expected)


def test_integer_arrays_and_tensors_are_scaled_by_their_dtype():
    a = np.array(rgb())
    expected = _pre(a.astype(np.float32) / 255)
    assert torch.equal(_pre(a), expected) and torch.equal(_pre(a[None]), expected)
    assert torch.equal(_pre(torch.from_numpy(a).permute(2, 0, 1)), expected)
    assert torch.allclose(_pre(a.astype(np.uint16) * 257), expected, atol=1e-6)
    gray = np.asarray(rgb().convert("L"))
    assert torch.equal(_pre(gray), _pre(rgb().convert("L")))  # gray arrays spread to RGB like PIL's L
    # masks: 0/255 and 0/1 integer masks both mean what they say; gray ones binarise at half
    m = np.asarray(mask())
    reference = _pre(mask(), mask=True)
    for variant in (m, (m > 0).astype(np.uint8), (m > 0), m.astype(np.float32) / 255, torch.from_numpy(m.copy())):
        assert torch.equal(_pre(variant, mask=True), reference)
    assert _pre(np.full((32, 32), 100, np.uint8), mask=True).sum() == 0


def test_uint8_images_through_img2img_equal_their_float_form(folders):
    _, ours = pipes(folders, "sd1", I2I)
    a = np.asarray(rgb())
    run = lambda image: ours("x", image=image, strength=0.5, generator=torch.Generator().manual_seed(0), **RUN)  # noqa: E731
    assert np.array_equal(run(a).images, run(a.astype(np.float32) / 255).images)
    sixteen = run(Image.fromarray(gray16())).images
    assert sixteen.shape == (1, 32, 32, 3) and np.isfinite(sixteen).all()


# -- NaN / Inf found, named, without a sync per step -------------------------------------------------------


def _break(module: torch.nn.Module, name: str) -> None:
    with torch.no_grad():
        dict(module.named_parameters())[name].fill_(NAN)


def test_nan_weights_are_named_by_component_and_step(folders):
    pipe = fresh(folders)
    _break(pipe.unet, "conv_out.bias")
    with pytest.raises(FloatingPointError, match=r"first appeared in the UNet's noise prediction \(unet\) at step 0"):
        pipe("x", **RUN)
    with pytest.warns(RuntimeWarning, match="the UNet's noise prediction"):
        out = pipe("x", strict=False, **RUN).images
    assert np.isnan(out).all()
    # diffusers returns the NaN image without a word (a black picture once saved)
    theirs, _ = pipes(folders, "sd1", T2I)
    broken = diffusers.StableDiffusionPipeline(**{**theirs.components, "unet": _nan_copy(theirs.unet, "conv_out.bias")})
    broken.set_progress_bar_config(disable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.isnan(broken("x", **RUN).images).all()

    pipe = fresh(folders)
    _break(pipe.vae.decoder, next(n for n, _ in pipe.vae.decoder.named_parameters() if n.endswith("weight")))
    with pytest.raises(FloatingPointError, match=r"the decoded image \(vae.decode\)"):
        pipe("x", **RUN)
    assert pipe("x", output_type="latent", num_inference_steps=2).images.shape == (1, 4, 16, 16)  # no decode

    pipe = fresh(folders)
    _break(pipe.text_encoder, "final_layer_norm.weight")
    with pytest.raises(FloatingPointError, match=r"the prompt embeddings \(text_encoder\)"):
        pipe("x", **RUN)

    pipe = fresh(folders, cls_name=I2I)
    _break(pipe.vae.encoder, "conv_in.weight")
    with pytest.raises(FloatingPointError, match=r"the VAE encoding of `image` \(vae.encode\)"):
        pipe("x", image=rgb(), strength=0.5, **RUN)


def _nan_copy(module, name):
    module = copy.deepcopy(module)
    with torch.no_grad():
        dict(module.named_parameters())[name].fill_(NAN)
    return module


def test_nan_from_the_scheduler_or_a_callback_names_it(folders):
    pipe = fresh(folders)
    step, calls = pipe.scheduler.step, []

    def bad_step(model_output, t, sample, **kw):
        out = step(model_output, t, sample, **kw)
        calls.append(t)
        if len(calls) == 3:
            out.prev_sample[0, 0, 0, 0] = math.inf
        return out

    pipe.scheduler.step = bad_step
    with pytest.raises(FloatingPointError, match=r"the latents after scheduler.step at step 2 \(timestep \d+\)"):
        pipe("x", num_inference_steps=4, output_type="pt")
    pipe = fresh(folders, "inpaint9", INP)
    poison = lambda p, i, t, kw: {"latents": kw["latents"] * (NAN if i == 1 else 1)}  # noqa: E731
    with pytest.raises(FloatingPointError, match="returned by callback_on_step_end at step 1"):
        pipe("x", callback_on_step_end=poison, num_inference_steps=3, **INPAINT)


def test_ddpm_pipeline_checks(folders, tmp_path):
    with pytest.raises(TypeError, match="DDPMPipeline runs a pixel-space UNet2DModel, got a UNet2DConditionModel"):
        minidiff.DDPMPipeline.from_pretrained(folders["sd1"])
    no_attention = dict(down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    unet = minidiff.UNet2DModel(**TINY_UNET_2D | no_attention | dict(block_out_channels=(8, 16), norm_num_groups=4))
    unet.eval()
    pipe = minidiff.DDPMPipeline(unet, minidiff.DDPMScheduler(num_train_timesteps=10))
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="`num_inference_steps` must be >= 1"):
        pipe(num_inference_steps=0)
    with pytest.raises(TypeError, match="`generator` must be a torch.Generator"):
        pipe(generator=7, num_inference_steps=2)
    _break(unet, "conv_out.bias")
    with pytest.raises(FloatingPointError, match=r"unet\) at step 0"):
        pipe(num_inference_steps=2, output_type="np")


def test_int32_weights_are_named(folders):
    pipe = fresh(folders)
    pipe.unet.conv_in.weight.data = pipe.unet.conv_in.weight.data.to(torch.int32)
    with pytest.raises(TypeError, match="the unet's weight conv_in.weight is torch.int32"):
        pipe("x", **RUN)
    theirs, _ = pipes(folders, "sd1", T2I)
    unet = copy.deepcopy(theirs.unet).requires_grad_(False)
    unet.conv_in.weight.data = unet.conv_in.weight.data.to(torch.int32)
    broken = diffusers.StableDiffusionPipeline(**{**theirs.components, "unet": unet})
    broken.set_progress_bar_config(disable=True)
    with pytest.raises(RuntimeError):  # a dtype mismatch from inside torch's conv
        broken("x", **RUN)


class SyncCounter(TorchDispatchMode):
    """Counts the aten ops that make the host wait for the device (as benchmarks/cuda_suite.py does)
    issued from the pipelines' own code (minidiff/pipelines/), not from the models or schedulers."""

    OPS = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero", "aten::equal", "aten::item"}

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.OPS:
            ours = [f.filename for f in traceback.extract_stack() if f"minidiff{os.sep}" in f.filename]
            self.n += bool(ours) and f"minidiff{os.sep}pipelines{os.sep}" in ours[-1]
        return func(*args, **(kwargs or {}))


def test_nan_watch_reads_the_device_once_per_call(folders):
    """The watch's flags stay on the device: the host syncs of a call do not grow with its steps."""
    _, ours = pipes(folders, "sd1", T2I)
    embeds, negative = ours.encode_prompt("x", torch.device("cpu"), 1, True)
    counts = {}
    for steps in (2, 6):
        with SyncCounter() as counter:
            ours(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=steps, output_type="latent")
        counts[steps] = counter.n
    assert counts[2] == counts[6], counts
    watch = checks.FiniteWatch()
    with SyncCounter() as counter:
        for i in range(10):
            watch.see("unet", torch.ones(4), i, torch.tensor(999 - i))
        watch.verify()
    assert counter.n <= 2, counter.n  # the one read of all flags (stack -> cpu, then .all())


# -- schedulers: custom timesteps, betas, add_noise ---------------------------------------------------------

CUSTOM = ["DDPMScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "EulerDiscreteScheduler",
          "HeunDiscreteScheduler", "LCMScheduler"]  # fmt: skip


@pytest.mark.parametrize("name", CUSTOM)
@pytest.mark.parametrize(
    "timesteps,match",
    [
        ([500, -1], r"must lie in \[0, 999\]"),  # diffusers' DDPM takes it: ᾱ[-1] is the last step's
        ([100, 500], "descending"),
        ([500, 500], "descending"),
        ([1000, 10], "num_train_timesteps=1000"),
        ([], "non-empty"),
        ([500, NAN], "finite"),
    ],
)
def test_custom_timesteps_are_descending_and_in_range(name, timesteps, match):
    with pytest.raises(ValueError, match=match):
        getattr(minidiff, name)().set_timesteps(timesteps=timesteps)


def test_diffusers_takes_a_negative_custom_timestep():
    theirs = diffusers.DDPMScheduler()
    theirs.set_timesteps(timesteps=[500, -1])
    assert theirs.timesteps.tolist() == [500, -1]


@pytest.mark.parametrize(
    "config,match,diffusers_goes_negative",
    [
        (dict(trained_betas=[0.01] * 9 + [1.2]), r"trained_betas\) must be .* in \(0, 1\): β\[9\] = 1.2", True),
        (dict(trained_betas=[0.0] + [0.01] * 9), r"β\[0\] = 0.0", False),
        (dict(trained_betas=[]), "non-empty", False),
        (dict(beta_schedule="linear", beta_start=0.0001, beta_end=1.5), r"linear from beta_start/beta_end", True),
        (dict(beta_schedule="linear", beta_start=NAN, beta_end=0.02), r"in \(0, 1\)", False),
    ],
)
def test_betas_must_lie_in_zero_one(config, match, diffusers_goes_negative):
    for name in ("DDPMScheduler", "EulerDiscreteScheduler"):
        with pytest.raises(ValueError, match=match):
            getattr(minidiff, name)(**config)
    if diffusers_goes_negative:  # diffusers takes them: ᾱ turns negative, and its square root NaN
        assert (diffusers.DDPMScheduler(**config).alphas_cumprod <= 0).any()


def test_add_noise_checks_its_arguments():
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for name in ("DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler"):
        ours, theirs = getattr(minidiff, name)(), getattr(diffusers, name)()
        ours.set_timesteps(10)
        theirs.set_timesteps(10)
        t = ours.timesteps[:1]
        with pytest.raises(ValueError, match=r"`noise` \(2, 4, 4, 4\) and `original_samples` \(2, 4, 8, 8\)"):
            ours.add_noise(x0, torch.randn(2, 4, 4, 4), t)
        with pytest.raises(RuntimeError):  # diffusers: a broadcasting error from torch
            theirs.add_noise(x0, torch.randn(2, 4, 4, 4), theirs.timesteps[:1])
        with pytest.raises(ValueError, match=r"`timesteps` must be one timestep or one per sample \(2\)"):
            ours.add_noise(x0, noise, ours.timesteps[:3])
    ddpm, theirs = minidiff.DDPMScheduler(), diffusers.DDPMScheduler()
    with pytest.raises(ValueError, match=r"add_noise: `timesteps` must lie in \[0, 999\], got \[-1\]"):
        ddpm.add_noise(x0, noise, torch.tensor([-1]))
    wrapped = theirs.add_noise(x0, noise, torch.tensor([-1]))  # diffusers: t = -1 is silently t = 999
    assert torch.equal(wrapped, theirs.add_noise(x0, noise, torch.tensor([999])))
    with pytest.raises(ValueError, match="got \\[500, 1000\\]"):
        ddpm.add_noise(x0, noise, torch.tensor([500, 1000]))
    with pytest.raises(TypeError, match="`timesteps` must be integers"):
        ddpm.add_noise(x0, noise, torch.tensor([500.0]))
    assert torch.equal(ddpm.add_noise(x0, noise, 999), ddpm.add_noise(x0, noise, torch.tensor([999, 999])))
