"""Shared test helpers: perturbing every weight, relative error, paths to the reference configs."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from pathlib import Path

import pytest
import torch

# the shared plan (reference configs, tutorials) sits beside the repository
SHARED = Path(os.environ.get("MINIDIFF_SHARED", Path(__file__).resolve().parents[2] / "shared"))
REFERENCE_CONFIGS = SHARED / "reference-configs"


def reference_config(name: str) -> dict:
    """A real public config from ../shared/reference-configs, e.g. 'ddpm-cat-256.unet'."""
    path = REFERENCE_CONFIGS / f"{name}.json"
    if not path.is_file():
        pytest.fail(f"missing reference config {path} (set MINIDIFF_SHARED to the shared/ folder)")
    return json.loads(path.read_text())


@torch.no_grad()
def perturb(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Add seeded noise to EVERY parameter: zero-initialised layers would hide a wrong mapping."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)
    return module


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a-b| / max|b| (PARITY.md's measure)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline, hand-built Hugging Face cache. Returns `add(repo_id, folder)` that copies a
    local folder into the cache as the repo's `main` snapshot (the layout huggingface_hub reads)."""
    import shutil

    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these at import time
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)

    def add(repo_id: str, folder: Path, commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        shutil.copytree(folder, repo / "snapshots" / commit)
        return repo

    return add


CLIP_BPE = Path(__file__).resolve().parents[1] / "minidiff" / "data" / "bpe_simple_vocab_16e6.txt.gz"

# ---------------------------------------------------------------- tiny model configs (diffusers and minidiff alike)

# a DDPM-style UNet2DModel: two levels, attention on the lower one
TINY_UNET_2D = dict(
    sample_size=8,
    block_out_channels=(16, 32),
    layers_per_block=1,
    norm_num_groups=8,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
)
# the DDPM flavour: one attention head, sin-first embedding, freq_shift 1, padded downsampling
DDPM_FLAVOUR = dict(attention_head_dim=None, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, norm_eps=1e-6)
# an SD-style UNet2DConditionModel: cross-attention on the upper level only
TINY_COND_UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=32,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)


def vae_config(block_out_channels: tuple, norm_num_groups: int = 8, layers_per_block: int = 1, **more) -> dict:
    """An AutoencoderKL config with one plain encoder / decoder block per level."""
    levels = len(block_out_channels)
    return dict(
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        **more,
    )


def clip_config(hidden_size: int, num_hidden_layers: int, num_attention_heads: int, **more) -> dict:
    """A CLIP text config on the real 49408-id vocabulary with SD 1's token ids, an MLP twice as wide."""
    base = dict(vocab_size=49408, intermediate_size=2 * hidden_size, bos_token_id=0, eos_token_id=2)
    size = dict(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads)
    return base | size | more


def assert_missing_keys_mean_diffusers_defaults(ours_cls, diffusers_cls):
    """A config.json without a key means diffusers' default for it, not minidiff's SD1.5 default."""
    ours = ours_cls._config_from_dict({"_class_name": diffusers_cls.__name__})
    defaults = inspect.signature(diffusers_cls.__init__).parameters
    for f in dataclasses.fields(ours):
        default = defaults[f.name].default
        assert getattr(ours, f.name) == (tuple(default) if isinstance(default, list) else default), f.name


def tiny_sd_components(kind: str, seed: int = 0, inpaint: bool = False) -> dict:
    """diffusers / transformers components of a tiny SD1- or SD2-style pipeline, every weight perturbed.

    The text side uses the real CLIP vocabulary (49408 ids) so prompts tokenize as in real SD.
    """
    import diffusers
    import transformers

    sd2 = kind == "sd2"
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        **TINY_COND_UNET,
        sample_size=16,
        in_channels=9 if inpaint else 4,
        out_channels=4,
        attention_head_dim=(2, 4) if sd2 else 2,
        use_linear_projection=sd2,
        upcast_attention=sd2,
    )
    vae = diffusers.AutoencoderKL(
        **vae_config((16, 32), in_channels=3, out_channels=3, latent_channels=4, sample_size=32)
    )
    text = clip_config(32, 3, 4, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32, pad_token_id=1)
    if sd2:
        text |= dict(hidden_act="gelu", bos_token_id=49406, eos_token_id=49407)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text))
    for i, model in enumerate((unet, vae, text_encoder)):
        perturb(model.eval(), seed + i, scale=0.02)
    name = "sd-v2-1" if sd2 else "sd-v1-5"
    scheduler_cls = getattr(diffusers, reference_config(f"{name}.scheduler")["_class_name"])
    scheduler = scheduler_cls.from_config(reference_config(f"{name}.scheduler"))  # SD2.1: v-prediction
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, scheduler=scheduler)


def save_tiny_sd(folder: Path, kind: str, inpaint: bool = False, seed: int = 0) -> Path:
    """Save a tiny diffusers Stable Diffusion pipeline folder (Hub layout) and return it."""
    import diffusers
    import transformers

    from weights_conversion.clip_vocab import write_hf_tokenizer_files

    tok_dir = write_hf_tokenizer_files(CLIP_BPE, folder / "_tok", pad_token="!" if kind == "sd2" else "<|endoftext|>")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tok_dir)
    cls = diffusers.StableDiffusionInpaintPipeline if inpaint else diffusers.StableDiffusionPipeline
    pipe = cls(
        **tiny_sd_components(kind, seed, inpaint),
        tokenizer=tokenizer,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder
