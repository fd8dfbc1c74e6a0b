"""SDXL pipelines end to end against diffusers, on the same saved tiny checkpoints.

Tiny SDXL base, refiner and 9-channel inpainting pipelines are built by diffusers / transformers
(CLIP-L-style text_encoder, a bigG-style text_encoder_2 with a projection, a UNet with SDXL's
text_time conditioning and transformer_layers_per_block, no attention in its first level), every
weight perturbed, saved in the Hub layout with diffusers' save_pretrained and loaded by both
libraries. Same seed and arguments -> the same images within 3e-4 on [0, 1].
"""

from __future__ import annotations

import json

import diffusers
import numpy as np
import pytest
import torch
import transformers
from conftest import CLIP_BPE, clip_config, perturb, reference_config, vae_config
from PIL import Image

import minidiff
from minidiff.pipelines.stable_diffusion_xl import StableDiffusionXLPipeline
from minidiff.pipelines.stable_diffusion_xl_img2img import StableDiffusionXLImg2ImgPipeline
from minidiff.pipelines.stable_diffusion_xl_inpaint import StableDiffusionXLInpaintPipeline
from weights_conversion.clip_vocab import write_hf_tokenizer_files

TOL = 3e-4
OURS = {
    "StableDiffusionXLPipeline": StableDiffusionXLPipeline,
    "StableDiffusionXLImg2ImgPipeline": StableDiffusionXLImg2ImgPipeline,
    "StableDiffusionXLInpaintPipeline": StableDiffusionXLInpaintPipeline,
}
TIME_DIM = 8  # addition_time_embed_dim
PROJECTION = 16  # text_encoder_2's projection_dim, the pooled width


def tiny_unet(refiner: bool, in_channels: int = 4) -> diffusers.UNet2DConditionModel:
    """SDXL's UNet layout in miniature: a plain first level, 2 transformer layers in the second (refiner: 3),
    context = the two encoders' states side by side (the refiner: bigG's only), 6 (5) time ids."""
    return diffusers.UNet2DConditionModel(
        sample_size=16,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 3) if refiner else (1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=32 if refiner else 64,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=PROJECTION + (5 if refiner else 6) * TIME_DIM,
    )


def save_tiny_sdxl(folder, kind: str, seed: int = 0):
    """kind: 'base', 'refiner' (no text_encoder, aesthetic score) or 'inpaint9'."""
    refiner = kind == "refiner"
    torch.manual_seed(seed)
    unet = tiny_unet(refiner, 9 if kind == "inpaint9" else 4)
    vae = diffusers.AutoencoderKL(
        **vae_config((16, 32), in_channels=3, out_channels=3, latent_channels=4, sample_size=32)
    )
    bigg = clip_config(32, 3, 4, max_position_embeddings=77, hidden_act="gelu", projection_dim=PROJECTION)
    bigg |= dict(bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    text_encoder_2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**bigg))
    models = [unet, vae, text_encoder_2]
    text_encoder = tokenizer = None
    if not refiner:
        clip_l = clip_config(32, 3, 4, max_position_embeddings=77, hidden_act="quick_gelu", pad_token_id=1)
        text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**clip_l))
        models.append(text_encoder)
        tok_dir = write_hf_tokenizer_files(CLIP_BPE, folder / "_tok", pad_token="<|endoftext|>")
        tokenizer = transformers.CLIPTokenizer.from_pretrained(tok_dir)
    tokenizer_2 = transformers.CLIPTokenizer.from_pretrained(
        write_hf_tokenizer_files(CLIP_BPE, folder / "_tok2", pad_token="!")
    )
    for i, model in enumerate(models):
        perturb(model.eval(), seed + i, scale=0.02)
    scheduler = diffusers.EulerDiscreteScheduler.from_config(reference_config("sdxl-base-1.0.scheduler"))
    components = dict(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    if refiner:
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
            **components, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False
        )
    elif kind == "inpaint9":
        pipe = diffusers.StableDiffusionXLInpaintPipeline(**components)
    else:
        pipe = diffusers.StableDiffusionXLPipeline(**components)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    return {kind: save_tiny_sdxl(root / kind, kind, seed) for seed, kind in enumerate(("base", "refiner", "inpaint9"))}


_loaded: dict = {}


def pipes(folder, cls_name: str):
    """(diffusers', minidiff's) pipeline of that class from the folder, loaded once per module."""
    key = (str(folder), cls_name)
    if key not in _loaded:
        theirs = getattr(diffusers, cls_name).from_pretrained(folder, add_watermarker=False)
        ours = OURS[cls_name].from_pretrained(folder)
        for p in (theirs, ours):
            p.set_progress_bar_config(disable=True)
        _loaded[key] = (theirs, ours)
    return _loaded[key]


def seeded(seed: int = 0):
    return torch.Generator().manual_seed(seed)


def compare(folder, cls_name: str, seed: int = 0, **call):
    theirs, ours = pipes(folder, cls_name)
    call.setdefault("num_inference_steps", 4)
    call.setdefault("output_type", "np")
    a = np.asarray(theirs(generator=seeded(seed), **call).images)
    b = np.asarray(ours(generator=seeded(seed), **call).images)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = np.abs(a - b).max()
    assert err <= TOL, f"max abs difference {err:.2e}"
    return b


def picture(size: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def mask_picture(size: int = 32) -> Image.Image:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4 : 3 * size // 4, size // 3 :] = 255
    return Image.fromarray(mask)


# -- text to image ------------------------------------------------------------------------------------


def test_txt2img_micro_conditioning_and_negatives(folders):
    out = compare(
        folders["base"],
        "StableDiffusionXLPipeline",
        prompt="a photo of a cat",
        prompt_2="a painting of a dog",
        negative_prompt="blurry",
        negative_prompt_2="dark, grainy",
        original_size=(64, 48),
        crops_coords_top_left=(4, 8),
        target_size=(40, 24),
        negative_original_size=(16, 16),
        negative_crops_coords_top_left=(2, 2),
        negative_target_size=(24, 32),
    )
    assert out.shape == (1, 32, 32, 3)  # the UNet's sample_size x the VAE's factor


def test_txt2img_options(folders):
    run = lambda **kw: compare(folders["base"], "StableDiffusionXLPipeline", **kw)  # noqa: E731
    run(prompt="force zeros: no negative prompt")  # the unconditional context is zeros
    run(prompt=["a red car", "a blue house"], negative_prompt=["a", "b"], num_images_per_prompt=2, height=24)
    run(prompt="rescaled", guidance_rescale=0.7, guidance_scale=8.0)
    run(prompt="skip one layer", clip_skip=1)
    run(prompt="no guidance", guidance_scale=1.0)
    run(prompt="custom timesteps", timesteps=[999, 700, 400, 100])
    out = run(prompt="stop early", denoising_end=0.6, output_type="latent")
    assert out.shape == (1, 4, 16, 16)
    theirs, ours = pipes(folders["base"], "StableDiffusionXLPipeline")
    theirs.register_to_config(force_zeros_for_empty_prompt=False)
    ours.force_zeros_for_empty_prompt = False
    try:
        run(prompt="force zeros off: the empty prompt's encoding")
    finally:
        theirs.register_to_config(force_zeros_for_empty_prompt=True)
        ours.force_zeros_for_empty_prompt = True


def test_encode_prompt_and_embeddings_passed_in(folders):
    theirs, ours = pipes(folders["base"], "StableDiffusionXLPipeline")
    args = dict(prompt=["a cat", "a dog"], prompt_2=["one", "two"], negative_prompt=["blurry", "dark"])
    ref = theirs.encode_prompt(**args, device=torch.device("cpu"), num_images_per_prompt=2)
    got = ours.encode_prompt(**args, device=torch.device("cpu"), num_images_per_prompt=2)
    for a, b in zip(ref, got, strict=True):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
    assert ref[0].shape == (4, 77, 64) and ref[2].shape == (4, PROJECTION)
    embeds = dict(
        prompt_embeds=ref[0][::2],
        negative_prompt_embeds=ref[1][::2],
        pooled_prompt_embeds=ref[2][::2],
        negative_pooled_prompt_embeds=ref[3][::2],
    )
    compare(folders["base"], "StableDiffusionXLPipeline", **embeds)
    compare(
        folders["base"],
        "StableDiffusionXLPipeline",
        prompt_embeds=embeds["prompt_embeds"][:1],
        pooled_prompt_embeds=embeds["pooled_prompt_embeds"][:1],
    )
    # without text encoders: embeddings only (the negatives are zeros under force_zeros_for_empty_prompt)
    blind = StableDiffusionXLPipeline(**{**ours.components, "text_encoder": None, "text_encoder_2": None})
    one = dict(prompt_embeds=embeds["prompt_embeds"][:1], pooled_prompt_embeds=embeds["pooled_prompt_embeds"][:1])
    run = lambda pipe: pipe(**one, num_inference_steps=2, output_type="np", generator=seeded(5)).images  # noqa: E731
    blind.set_progress_bar_config(disable=True)
    assert np.array_equal(run(blind), run(ours))


def test_fp16_vae_decodes_in_float32(folders):
    """force_upcast: a float16 VAE decodes in float32 and is float16 again afterwards, as in diffusers."""
    ours = StableDiffusionXLPipeline.from_pretrained(folders["base"])  # its own: a float16 round trip rounds weights
    seen = []
    hook = ours.vae.post_quant_conv.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    ours.vae.to(torch.float16)
    try:
        latents = torch.randn(1, 4, 16, 16, generator=seeded(1))
        image = ours._decode(latents.half(), "pt")
        assert seen == [torch.float32] and image.dtype == torch.float32
        assert ours.vae.dtype == torch.float16  # back as it was
    finally:
        hook.remove()
    # the whole pipeline in float16, both libraries (VAE upcast for the decode): float16 arithmetic's agreement
    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(
        folders["base"], torch_dtype=torch.float16, add_watermarker=False
    )
    for p in (theirs, ours):
        p.set_progress_bar_config(disable=True)
    ours.to(torch.float16)
    a = theirs("a cat", num_inference_steps=3, output_type="np", generator=seeded(2)).images
    b = ours("a cat", num_inference_steps=3, output_type="np", generator=seeded(2)).images
    assert ours.vae.dtype == torch.float16 and np.abs(a - b).max() < 1e-2


def test_callbacks_and_lora_scale_without_lora(folders):
    """A callback that edits the latents and reads the added conditioning; diffusers' SDXLCFGCutoffCallback
    (guidance off half way, every guidance-batch tensor cut to its positive half); a LoRA scale with no
    LoRA loaded changes nothing."""
    from diffusers.callbacks import SDXLCFGCutoffCallback

    seen = []

    def halve(pipe, i, t, tensors):
        seen.append(tuple(tensors["add_time_ids"].shape))
        return {"latents": tensors["latents"] * 0.5} if i == 1 else tensors

    inputs = ["latents", "add_time_ids"]
    run = lambda **kw: compare(folders["base"], "StableDiffusionXLPipeline", prompt="a cat", **kw)  # noqa: E731
    run(callback_on_step_end=halve, callback_on_step_end_tensor_inputs=inputs)
    assert seen[:4] == [(2, 6)] * 4  # diffusers' 4 steps, then ours
    run(callback_on_step_end=SDXLCFGCutoffCallback(cutoff_step_ratio=0.5), negative_prompt="blurry")
    run(cross_attention_kwargs={"scale": 0.5})


# -- the refiner, image to image ------------------------------------------------------------------------


def test_refiner_ensemble_of_experts(folders):
    """base (denoising_end=0.8, latents out) -> refiner (denoising_start=0.8, latents in), both libraries."""
    base_theirs, base_ours = pipes(folders["base"], "StableDiffusionXLPipeline")
    call = dict(prompt="a lighthouse at dusk", num_inference_steps=10, denoising_end=0.8, output_type="latent")
    latents_theirs = base_theirs(generator=seeded(3), **call).images
    latents_ours = base_ours(generator=seeded(3), **call).images
    assert torch.allclose(latents_ours, latents_theirs, atol=1e-4)
    refined = compare(
        folders["refiner"],
        "StableDiffusionXLImg2ImgPipeline",
        prompt="a lighthouse at dusk",
        image=latents_theirs,
        num_inference_steps=10,
        denoising_start=0.8,
    )
    assert refined.shape == (1, 32, 32, 3)
    _, refiner = pipes(folders["refiner"], "StableDiffusionXLImg2ImgPipeline")
    assert refiner.text_encoder is None and refiner.requires_aesthetics_score


def test_refiner_img2img_options(folders):
    run = lambda **kw: compare(folders["refiner"], "StableDiffusionXLImg2ImgPipeline", **kw)  # noqa: E731
    run(prompt="sdedit", image=picture(), strength=0.5, aesthetic_score=7.5, negative_aesthetic_score=1.0)
    run(prompt=["a", "b"], image=picture(seed=1), negative_prompt="blurry", original_size=(64, 64))
    run(prompt="rescaled", image=picture(), strength=0.75, guidance_rescale=0.5, num_images_per_prompt=2)


def test_base_components_as_img2img(folders):
    """The base folder loads as image-to-image too (no aesthetic score: the six time ids)."""
    compare(
        folders["base"],
        "StableDiffusionXLImg2ImgPipeline",
        prompt="a cat",
        image=picture(seed=2),
        strength=0.6,
        negative_target_size=(16, 16),
    )


# -- inpainting ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["base", "inpaint9"])
def test_inpaint(folders, kind):
    run = lambda **kw: compare(folders[kind], "StableDiffusionXLInpaintPipeline", **kw)  # noqa: E731
    run(prompt="a cat on a sofa", image=picture(), mask_image=mask_picture())  # strength 0.9999
    run(prompt="full strength", image=picture(seed=3), mask_image=mask_picture(), strength=1.0, prompt_2="x")
    run(prompt="part", image=picture(), mask_image=mask_picture(), strength=0.6, negative_prompt="blurry")


# -- loading, saving, bad inputs ------------------------------------------------------------------------


def test_from_pretrained_picks_the_class_and_save_round_trips(folders, tmp_path):
    base = minidiff.DiffusionPipeline.from_pretrained(folders["base"])
    refiner = minidiff.DiffusionPipeline.from_pretrained(folders["refiner"])
    assert type(base) is StableDiffusionXLPipeline and base.force_zeros_for_empty_prompt
    assert type(refiner) is StableDiffusionXLImg2ImgPipeline and refiner.tokenizer is None
    assert refiner.requires_aesthetics_score and not refiner.force_zeros_for_empty_prompt
    refiner.save_pretrained(tmp_path / "refiner")
    index = json.loads((tmp_path / "refiner" / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None] and index["requires_aesthetics_score"] is True
    assert index["force_zeros_for_empty_prompt"] is False
    again = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "refiner")
    assert type(again).__name__ == "StableDiffusionXLImg2ImgPipeline" and again.config.requires_aesthetics_score
    override = StableDiffusionXLPipeline.from_pretrained(folders["base"], force_zeros_for_empty_prompt=False)
    assert not override.force_zeros_for_empty_prompt


def test_bad_inputs(folders):
    _, ours = pipes(folders["base"], "StableDiffusionXLPipeline")
    embeds = torch.zeros(1, 77, 64)
    with pytest.raises(ValueError, match="without `pooled_prompt_embeds`"):
        ours(prompt_embeds=embeds, num_inference_steps=1)
    with pytest.raises(ValueError, match="without `negative_pooled_prompt_embeds`"):
        ours(prompt="a", negative_prompt_embeds=embeds, num_inference_steps=1)
    with pytest.raises(ValueError, match="text_encoder_2 projects to 16"):
        ours(prompt_embeds=embeds, pooled_prompt_embeds=torch.zeros(1, 8), num_inference_steps=1)
    with pytest.raises(ValueError, match="`negative_prompt_2` or `negative_prompt_embeds`"):
        ours(prompt="a", negative_prompt_2="b", negative_prompt_embeds=embeds, num_inference_steps=1)
    with pytest.raises(ValueError, match="`original_size` must be a pair"):
        ours(prompt="a", original_size=(1024,), num_inference_steps=1)
    with pytest.raises(ValueError, match="`denoising_end` must be in"):
        ours(prompt="a", denoising_end=1.5, num_inference_steps=1)
    _, refiner = pipes(folders["refiner"], "StableDiffusionXLImg2ImgPipeline")
    with pytest.raises(ValueError, match="must be below `denoising_end`"):
        refiner(prompt="a", image=picture(), denoising_start=0.8, denoising_end=0.5, num_inference_steps=2)
    refiner.requires_aesthetics_score = False  # the refiner UNet reads 5 time ids, not 6
    try:
        with pytest.raises(ValueError, match="pass requires_aesthetics_score=True"):
            refiner(prompt="a", image=picture(), num_inference_steps=4)
    finally:
        refiner.requires_aesthetics_score = True
    with pytest.raises(ValueError, match="no text_encoder_2"):
        StableDiffusionXLPipeline(**{**ours.components, "text_encoder_2": None})(prompt="a", num_inference_steps=1)
    _, inpaint = pipes(folders["base"], "StableDiffusionXLInpaintPipeline")
    with pytest.raises(NotImplementedError, match="padding_mask_crop"):
        inpaint(prompt="a", image=picture(), mask_image=mask_picture(), padding_mask_crop=8)
