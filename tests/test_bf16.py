"""bf16 path: minidiff in bfloat16 against the fp32 reference (diffusers + transformers).

Model size: the SD 1.5 architecture at full DEPTH (4 UNet levels with 2 ResNets + transformers
each, 3-block up levels, the VAE's 4 levels, 12 CLIP layers, 32 GroupNorm groups) and reduced
WIDTH (UNet 64-256 channels, VAE 32-128, CLIP 256). bf16 rounding errors compound through the
layers, so depth is what must match the real model; width only lengthens the dot products, which
oneDNN / MKL accumulate in fp32 either way. At full width one fp32 UNet step alone takes ~3 s on
2 cores; this whole file takes a few seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import CLIP_BPE, clip_config, perturb, reference_config, vae_config

from minidiff import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

PROMPT = "a photograph of an astronaut riding a horse"
SIZE = 128  # image side: 16x16 latents, so the UNet's lowest level is 2x2


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return (a @ b / (a.norm() * b.norm())).item()


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    """An SD 1.5-deep, narrow pipeline saved by diffusers, every weight perturbed."""
    import diffusers
    import transformers

    from weights_conversion.clip_vocab import write_hf_tokenizer_files

    folder = tmp_path_factory.mktemp("sd15-narrow")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=SIZE // 8,
        block_out_channels=(64, 128, 256, 256),
        layers_per_block=2,
        norm_num_groups=32,
        cross_attention_dim=256,
        attention_head_dim=8,
    )  # SD 1.5's block types and 8 heads
    vae = diffusers.AutoencoderKL(**vae_config((32, 64, 128, 128), 32, 2, latent_channels=4, sample_size=SIZE))
    text = clip_config(256, 12, 4, intermediate_size=1024, max_position_embeddings=77, projection_dim=256)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text, hidden_act="quick_gelu"))
    for i, model in enumerate((unet, vae, text_encoder)):
        perturb(model.eval(), i, scale=0.02)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(write_hf_tokenizer_files(CLIP_BPE, folder / "_tok"))
    scheduler = diffusers.PNDMScheduler.from_config(reference_config("sd-v1-5.scheduler"))
    diffusers.StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder)
    return folder


def test_bf16_models_match_fp32(sd_folder: Path) -> None:
    """One UNet step and one VAE decode in bf16 against diffusers in fp32."""
    import diffusers

    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=g), torch.randn(2, 77, 256, generator=g)
    ref = diffusers.UNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet")
    mine = UNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet", torch_dtype=torch.bfloat16)
    with torch.no_grad():
        want = ref(x, 500, encoder_hidden_states=ctx).sample
        got = mine(x.bfloat16(), 500, encoder_hidden_states=ctx.bfloat16()).sample
    assert got.dtype == torch.bfloat16
    assert cosine(got, want) >= 0.999

    z = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=g)
    ref = diffusers.AutoencoderKL.from_pretrained(sd_folder, subfolder="vae")
    mine = AutoencoderKL.from_pretrained(sd_folder, subfolder="vae", torch_dtype=torch.bfloat16)
    with torch.no_grad():
        want, got = ref.decode(z).sample, mine.decode(z.bfloat16()).sample
    assert cosine(got, want) >= 0.999


def test_bf16_txt2img_matches_fp32_reference(sd_folder: Path) -> None:
    """The whole bf16 pipeline (CLIP, 5 PNDM steps with guidance, VAE) against diffusers' fp32 image.

    The cosine is taken on images in [-1, 1]: in [0, 1] every pixel is positive, which would
    flatter the score.
    """
    import diffusers

    latents = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))
    kwargs = dict(height=SIZE, width=SIZE, num_inference_steps=5, output_type="pt")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(
        sd_folder, safety_checker=None, requires_safety_checker=False
    )
    ref.set_progress_bar_config(disable=True)
    want = ref(PROMPT, latents=latents, **kwargs).images * 2 - 1
    pipe = StableDiffusionPipeline.from_pretrained(sd_folder, torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    got = pipe(PROMPT, latents=latents.bfloat16(), **kwargs).images * 2 - 1
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16
    assert cosine(got, want) >= 0.999
