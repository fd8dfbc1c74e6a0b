"""CompVis / LDM single files: loading (from_single_file), `minidiff convert` both ways, bad inputs.

The fixtures are LDM files written from perturbed diffusers / transformers models by this file's
OWN inverse key map (diffusers names -> LDM names, independent of weights_conversion/ldm_*.py).
Each fixture is first proven with diffusers' own `from_single_file` (given the saved diffusers
folder as its offline `config=`): every tensor must come back. Then minidiff must load the file to
the folder's configs, tensors and outputs. Tiny configs cover every variant; the real SD 1.5 and
SD 2.1 architectures are checked once each at the end.
"""

from __future__ import annotations

import gc
import os
import re
from pathlib import Path

import diffusers
import huggingface_hub.constants
import numpy as np
import pytest
import torch
import transformers
from conftest import CLIP_BPE, clip_config, perturb, reference_config, rel_err, vae_config
from safetensors.torch import load_file, save_file

from minidiff import (
    AutoencoderKL,
    CLIPTextModel,
    CLIPTokenizer,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from minidiff.cli import main as cli
from minidiff.loading import CheckpointError
from weights_conversion import ConversionError
from weights_conversion.clip_vocab import write_hf_tokenizer_files

# ---------------------------------------------------------------- the test's own diffusers -> LDM map

RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "mid_block.resnets.0": "middle_block.0",
    "mid_block.attentions.0": "middle_block.1",
    "mid_block.resnets.1": "middle_block.2",
}
LDM_TRAINING = {
    "betas": torch.linspace(1e-4, 2e-2, 1000),
    "alphas_cumprod": torch.linspace(1, 0, 1000),
    "model_ema.decay": torch.tensor(0.9999),
    "model_ema.num_updates": torch.tensor(10, dtype=torch.int32),
}


def _resnet_leaf(rest: str) -> str:
    layer, leaf = rest.split(".", 1)
    return f"{RESNET[layer]}.{leaf}" if layer in RESNET else rest


def ldm_unet(sd: dict, cfg) -> dict:
    """diffusers UNet2DConditionModel -> model.diffusion_model.* (as diffusers' own export script numbers it)."""
    per = cfg.layers_per_block + 1
    out = {}
    for k, v in sd.items():
        m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", k)
        if m is None:
            old = next(o for o in UNET_FIXED if k.startswith(o + "."))
            rest = k[len(old) + 1 :]
            new = f"{UNET_FIXED[old]}.{_resnet_leaf(rest) if 'resnets' in old else rest}"
        else:
            side, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            if kind == "downsamplers":
                new = f"input_blocks.{(i + 1) * per}.0.op.{rest.removeprefix('conv.')}"
            elif kind == "upsamplers":
                new = f"output_blocks.{i * per + per - 1}.{2 if 'CrossAttn' in cfg.up_block_types[i] else 1}.{rest}"
            else:
                n = i * per + j + 1 if side == "down" else i * per + j
                block = "input_blocks" if side == "down" else "output_blocks"
                new = f"{block}.{n}.0.{_resnet_leaf(rest)}" if kind == "resnets" else f"{block}.{n}.1.{rest}"
        out["model.diffusion_model." + new] = v
    return out


def ldm_vae(sd: dict, cfg) -> dict:
    """diffusers AutoencoderKL -> first_stage_model.* (attention as 1x1 convs, decoder levels counted upwards)."""
    top = len(cfg.block_out_channels) - 1
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for k, v in sd.items():
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{top - int(m[1])}.block.", k)
        k = re.sub(
            r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{top - int(m[1])}.upsample.", k
        )
        k = k.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        for old, new in attn.items():
            if f"mid_block.attentions.0.{old}." in k:
                k = k.replace(f"mid_block.attentions.0.{old}.", f"mid.attn_1.{new}.")
                v = v[:, :, None, None] if v.ndim == 2 else v
        k = k.replace("conv_norm_out.", "norm_out.").replace("conv_shortcut.", "nin_shortcut.")
        out["first_stage_model." + k] = v
    return out


def ldm_clip(sd: dict) -> dict:
    """transformers CLIPTextModel -> cond_stage_model.transformer.text_model.* (+ the old position_ids buffer)."""
    out = {"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v for k, v in sd.items()}
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return out


def ldm_openclip(sd: dict, seed: int = 7) -> dict:
    """transformers CLIPTextModel (n layers) -> OpenCLIP cond_stage_model.model.* with n + 1 resblocks:
    fused in_proj, a random unused last layer, a random text_projection, logit_scale."""
    g = torch.Generator().manual_seed(seed)
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    p = "cond_stage_model.model."
    n = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
    width = sd["embeddings.token_embedding.weight"].shape[1]
    out = {
        p + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        p + "positional_embedding": sd["embeddings.position_embedding.weight"],
        p + "ln_final.weight": sd["final_layer_norm.weight"],
        p + "ln_final.bias": sd["final_layer_norm.bias"],
        p + "text_projection": torch.randn(width, width, generator=g),
        p + "logit_scale": torch.tensor(4.6052),
    }
    names = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
        "self_attn.out_proj": "attn.out_proj",
    }
    for i in range(n + 1):
        src, dst = f"encoder.layers.{min(i, n - 1)}.", f"{p}transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            tensors = {f"{b}.{leaf}": sd[f"{src}{a}.{leaf}"] for a, b in names.items()}
            tensors[f"attn.in_proj_{leaf}"] = torch.cat([sd[f"{src}self_attn.{x}_proj.{leaf}"] for x in "qkv"])
            for name, t in tensors.items():
                out[dst + name] = t if i < n else torch.randn(t.shape, generator=g)
    return out


# ---------------------------------------------------------------- tiny fixtures


def tiny_components(kind: str, inpaint: bool = False, seed: int = 0) -> dict:
    """diffusers / transformers SD components in LDM's fixed conventions (GroupNorm 32; SD1: 8 heads;
    SD2: 64-wide heads, 23 + 1 OpenCLIP layers), every weight perturbed."""
    sd2 = kind == "sd2"
    torch.manual_seed(seed)
    levels = dict(
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    unet = diffusers.UNet2DConditionModel(
        sample_size=96 if sd2 and not inpaint else 64,
        in_channels=9 if inpaint else 4,
        out_channels=4,
        block_out_channels=(64, 128, 128) if sd2 else (32, 64, 64),
        layers_per_block=1 if sd2 else 2,
        norm_num_groups=32,
        cross_attention_dim=128,
        attention_head_dim=[1, 2, 2] if sd2 else 8,
        use_linear_projection=sd2,
        upcast_attention=sd2 and not inpaint,
        **levels,
    )
    vae_size = 768 if sd2 and not inpaint else 512
    vae = diffusers.AutoencoderKL(**vae_config((32, 32, 64), 32, latent_channels=4, sample_size=vae_size))
    text = clip_config(128, 23 if sd2 else 2, 2, max_position_embeddings=77, pad_token_id=1)
    text |= dict(hidden_act="gelu", projection_dim=512) if sd2 else dict(hidden_act="quick_gelu", projection_dim=768)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text))
    for i, model in enumerate((unet, vae, text_encoder)):
        perturb(model.eval(), seed + i, scale=0.02)
    config = reference_config(f"{'sd-v2-1' if sd2 else 'sd-v1-5'}.scheduler")
    if inpaint:
        config["prediction_type"] = "epsilon"
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, scheduler=scheduler)


class Tiny:
    """A saved diffusers folder and the LDM state dict of the same weights."""

    def __init__(self, root: Path, kind: str, inpaint: bool) -> None:
        self.kind, self.inpaint = kind, inpaint
        self.models = tiny_components(kind, inpaint)
        pad = "!" if kind == "sd2" else "<|endoftext|>"
        tokenizer = transformers.CLIPTokenizer.from_pretrained(
            write_hf_tokenizer_files(CLIP_BPE, root / "_tok", pad_token=pad)
        )
        cls = diffusers.StableDiffusionInpaintPipeline if inpaint else diffusers.StableDiffusionPipeline
        self.pipe = cls(
            **self.models,
            tokenizer=tokenizer,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        self.folder = root / "diffusers"
        self.pipe.save_pretrained(self.folder)
        m = self.models
        text = (
            ldm_openclip(m["text_encoder"].state_dict()) if kind == "sd2" else ldm_clip(m["text_encoder"].state_dict())
        )
        self.ldm = {
            **ldm_unet(m["unet"].state_dict(), m["unet"].config),
            **ldm_vae(m["vae"].state_dict(), m["vae"].config),
            **text,
            **LDM_TRAINING,
        }
        self.ldm = {k: v.detach().clone().contiguous() for k, v in self.ldm.items()}

    def write(self, path: Path, sd: dict | None = None, nested: bool = False, **top) -> Path:
        sd = self.ldm if sd is None else sd
        if path.suffix == ".safetensors":
            save_file(sd, str(path))
        else:
            torch.save({"state_dict": sd, **top} if nested else sd, path)
        return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    built: dict[str, Tiny] = {}

    def get(name: str) -> Tiny:
        if name not in built:
            kind, _, inpaint = name.partition("-")
            built[name] = Tiny(tmp_path_factory.mktemp(name), kind, bool(inpaint))
        return built[name]

    return get


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def assert_same_tensors(a: dict, b: dict, what: str = "") -> None:
    assert sorted(a) == sorted(b), f"{what}: keys differ: {sorted(set(a) ^ set(b))[:8]}"
    bad = [k for k in b if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not bad, f"{what}: {len(bad)} tensors differ, e.g. {bad[:5]}"


def plain(config) -> dict:
    """A config without bookkeeping keys, JSON lists and tuples alike."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in dict(config).items() if not k.startswith("_")}


def minidiff_folder(t: Tiny):
    cls = StableDiffusionInpaintPipeline if t.inpaint else StableDiffusionPipeline
    return cls.from_pretrained(t.folder)


MODELS = ("unet", "vae", "text_encoder")


def assert_same_pipeline(ours, ref, round_to=None) -> None:
    """Same configs and bit-identical tensors (the reference rounded through `round_to` first)."""
    for name in MODELS:
        a, b = getattr(ours, name), getattr(ref, name)
        assert a.config == b.config, name
        expected = {k: v.to(round_to).float() if round_to else v for k, v in b.state_dict().items()}
        assert_same_tensors(a.state_dict(), expected, name)
    assert plain(ours.scheduler.config) == plain(ref.scheduler.config)
    prompt = ["a photo of an astronaut!! riding a horse", ""]
    assert torch.equal(
        ours.tokenizer(prompt, padding="max_length", return_tensors="pt").input_ids,
        ref.tokenizer(prompt, padding="max_length", return_tensors="pt").input_ids,
    )


# ---------------------------------------------------------------- the fixtures are what diffusers reads


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_diffusers_reads_the_fixture(tiny, tmp_path, offline, name):
    """diffusers' own from_single_file, told the saved folder as its offline config, gets every tensor back."""
    t = tiny(name)
    path = t.write(tmp_path / "model.safetensors")
    pipe = diffusers.StableDiffusionPipeline.from_single_file(str(path), config=str(t.folder), local_files_only=True)
    for part in MODELS:
        assert_same_tensors(getattr(pipe, part).state_dict(), t.models[part].state_dict(), part)


def test_diffusers_reads_the_ema_fixture(tiny, tmp_path, offline):
    t = tiny("sd1")
    unet = diffusers.UNet2DConditionModel.from_single_file(
        str(t.write(tmp_path / "ema.safetensors", with_ema(t.ldm))),
        config=str(t.folder),
        subfolder="unet",
        local_files_only=True,
        extract_ema=True,
    )
    assert_same_tensors(unet.state_dict(), t.models["unet"].state_dict(), "EMA UNet")


def with_ema(sd: dict) -> dict:
    """The weights moved to LDM's EMA names; the raw UNet slots get other (noisy) values."""
    out = dict(sd)
    for k in [k for k in sd if k.startswith("model.diffusion_model.")]:
        out["model_ema." + k[len("model.") :].replace(".", "")] = sd[k]
        out[k] = sd[k] + 0.5
    return out


# ---------------------------------------------------------------- minidiff loads them like the folder


CASES = {
    "sd1-safetensors": ("sd1", "model.safetensors", {}),
    "sd2-safetensors": ("sd2", "model.safetensors", {}),
    "sd1-ckpt-nested": ("sd1", "model.ckpt", dict(nested=True, global_step=470000, epoch=3)),
    "sd2-ckpt-flat": ("sd2", "model.ckpt", {}),
    "sd2-ckpt-nested": ("sd2", "model.ckpt", dict(nested=True)),
    "sd1-ema": ("sd1", "model.safetensors", dict(ema=True)),
    "sd2-fp16": ("sd2", "model.safetensors", dict(half=True)),
    "sd1-inpaint": ("sd1-inpaint", "model.safetensors", {}),
    "sd2-inpaint": ("sd2-inpaint", "model.ckpt", {}),
}


@pytest.mark.parametrize("case", CASES)
def test_loads_like_the_folder(tiny, tmp_path, case):
    name, filename, opts = CASES[case]
    t = tiny(name)
    sd = with_ema(t.ldm) if opts.get("ema") else t.ldm
    if opts.get("half"):
        sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    top = {k: v for k, v in opts.items() if k in ("global_step", "epoch")}
    path = t.write(tmp_path / filename, sd, nested=opts.get("nested", False), **top)
    cls = StableDiffusionInpaintPipeline if t.inpaint else StableDiffusionPipeline
    ours = cls.from_single_file(path)
    assert_same_pipeline(ours, minidiff_folder(t), round_to=torch.float16 if opts.get("half") else None)
    assert all(p.dtype == torch.float32 for p in ours.unet.parameters())  # loaded in fp32, like diffusers


def test_raw_weights_of_an_ema_file(tiny, tmp_path):
    t = tiny("sd1")
    path = t.write(tmp_path / "ema.safetensors", with_ema(t.ldm))
    raw = UNet2DConditionModel.from_single_file(path, use_ema=False)
    ref = UNet2DConditionModel.from_pretrained(t.folder, subfolder="unet")
    assert_same_tensors(raw.state_dict(), {k: v + 0.5 for k, v in ref.state_dict().items()}, "raw UNet")
    with pytest.raises(CheckpointError, match="no EMA weights"):
        UNet2DConditionModel.from_single_file(t.write(tmp_path / "plain.safetensors"), use_ema=True)


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_outputs_match_the_diffusers_folder(tiny, tmp_path, name):
    """The whole pipeline from the file (UNet, VAE, text encoder, scheduler, tokenizer) against
    diffusers running the folder: a UNet step within 1e-4, a seeded 2-step image within 3e-4."""
    t = tiny(name)
    ours = StableDiffusionPipeline.from_single_file(t.write(tmp_path / "model.safetensors"))
    ref = t.pipe
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 12, 10, generator=g), torch.randn(2, 77, 128, generator=g)
    with torch.no_grad():
        assert (
            rel_err(
                ours.unet(x, 500, encoder_hidden_states=ctx).sample, ref.unet(x, 500, encoder_hidden_states=ctx).sample
            )
            <= 1e-4
        )
    kwargs = dict(
        prompt="a red cube!", negative_prompt="blurry", height=32, width=24, num_inference_steps=2, output_type="np"
    )
    for p in (ours, ref):
        p.set_progress_bar_config(disable=True)
    a = ours(**kwargs, generator=torch.Generator().manual_seed(1)).images
    b = ref(**kwargs, generator=torch.Generator().manual_seed(1)).images
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 3e-4


def test_each_model_alone(tiny, tmp_path):
    t = tiny("sd2")
    path = t.write(tmp_path / "model.safetensors")
    for cls, sub in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae"), (CLIPTextModel, "text_encoder")):
        ours, ref = cls.from_single_file(path), cls.from_pretrained(t.folder, subfolder=sub)
        assert ours.config == ref.config, sub
        assert_same_tensors(ours.state_dict(), ref.state_dict(), sub)
    half = UNet2DConditionModel.from_single_file(path, torch_dtype=torch.float16)
    assert half.dtype == torch.float16
    # a VAE-only file (like vae-ft-mse-840000-ema-pruned) keeps the LDM names without the prefix
    vae_only = {k[len("first_stage_model.") :]: v for k, v in t.ldm.items() if k.startswith("first_stage_model.")}
    ours = AutoencoderKL.from_single_file(t.write(tmp_path / "vae.safetensors", vae_only))
    assert_same_tensors(ours.state_dict(), AutoencoderKL.from_pretrained(t.folder, subfolder="vae").state_dict(), "vae")


# ---------------------------------------------------------------- what the weights cannot say


@pytest.mark.parametrize(
    "name, filename, top, override, expected",
    [
        ("sd1", "m.safetensors", {}, None, ("epsilon", 64, False, "PNDMScheduler")),
        ("sd1", "m.safetensors", {}, "v_prediction", ("v_prediction", 64, False, "PNDMScheduler")),
        ("sd2", "m.safetensors", {}, None, ("v_prediction", 96, True, "DDIMScheduler")),
        ("sd2", "m.safetensors", {}, "epsilon", ("epsilon", 64, False, "DDIMScheduler")),
        ("sd2", "m.ckpt", {"global_step": 875000}, None, ("epsilon", 64, False, "DDIMScheduler")),  # 2.x-base
        ("sd2", "m.ckpt", {"global_step": 875000}, "v_prediction", ("v_prediction", 96, True, "DDIMScheduler")),
        ("sd2-inpaint", "m.safetensors", {}, None, ("epsilon", 64, False, "DDIMScheduler")),
    ],
)
def test_prediction_type_rule(tiny, tmp_path, name, filename, top, override, expected):
    t = tiny(name)
    path = t.write(tmp_path / filename, nested=bool(top), **top)
    cls = StableDiffusionInpaintPipeline if t.inpaint else StableDiffusionPipeline
    pipe = cls.from_single_file(path, prediction_type=override)
    got = (
        pipe.scheduler.config.prediction_type,
        pipe.unet.config.sample_size,
        pipe.unet.config.upcast_attention,
        type(pipe.scheduler).__name__,
    )
    assert got == expected
    assert pipe.vae.config.sample_size == 8 * expected[1]
    assert pipe.tokenizer.pad_token == ("!" if name.startswith("sd2") else "<|endoftext|>")


def test_tokenizer_folder(tiny, tmp_path):
    t = tiny("sd1")
    custom = CLIPTokenizer.from_default_vocab(pad_token="!", model_max_length=40)
    custom.save_pretrained(tmp_path / "tok")
    pipe = StableDiffusionPipeline.from_single_file(t.write(tmp_path / "m.safetensors"), tokenizer=tmp_path / "tok")
    assert (pipe.tokenizer.pad_token, pipe.tokenizer.model_max_length) == ("!", 40)
    # a pipeline folder works too (its tokenizer/ subfolder)
    pipe = StableDiffusionPipeline.from_single_file(tmp_path / "m.safetensors", tokenizer=str(t.folder))
    assert pipe.tokenizer.pad_token == "<|endoftext|>"
    with pytest.raises(ValueError, match="prediction_type"):
        StableDiffusionPipeline.from_single_file(tmp_path / "m.safetensors", prediction_type="v")


# ---------------------------------------------------------------- minidiff convert, both ways


def read(path: Path) -> dict:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    obj = torch.load(path, weights_only=True)
    return obj["state_dict"]


def unused_openclip(keys) -> list[str]:
    """What SD2 does not compute with, so a diffusers folder has no place for it (filled on the way back)."""
    return [
        k
        for k in keys
        if k.startswith("cond_stage_model.model.transformer.resblocks.23.")
        or k in ("cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale")
    ]


@pytest.mark.parametrize(
    "name, src, dst",
    [("sd1", "a.ckpt", "b.ckpt"), ("sd2", "a.safetensors", "b.safetensors"), ("sd2", "a.safetensors", "b.ckpt")],
)
def test_file_to_folder_to_file(tiny, tmp_path, offline, name, src, dst):
    t = tiny(name)
    source = t.write(tmp_path / src, nested=src.endswith(".ckpt"))
    assert cli(["convert", str(source), str(tmp_path / "folder")]) == 0
    # diffusers reads the converted folder bit-exact
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "folder", local_files_only=True)
    for part in MODELS:
        assert_same_tensors(getattr(pipe, part).state_dict(), t.models[part].state_dict(), part)
    assert plain(pipe.scheduler.config) == plain(t.pipe.scheduler.config)

    assert cli(["convert", str(tmp_path / "folder"), str(tmp_path / dst)]) == 0
    before, after = read(source), read(tmp_path / dst)
    dropped = set(LDM_TRAINING) | {"cond_stage_model.transformer.text_model.embeddings.position_ids"}
    assert set(after) == set(before) - dropped
    filled = unused_openclip(after)
    assert bool(filled) == (name == "sd2")
    assert_same_tensors(
        {k: after[k] for k in after if k not in filled}, {k: before[k] for k in after if k not in filled}
    )
    # what minidiff writes is a fixed point: file -> folder -> file is byte-for-byte the same tensors
    assert cli(["convert", str(tmp_path / dst), str(tmp_path / "folder2")]) == 0
    assert cli(["convert", str(tmp_path / "folder2"), str(tmp_path / ("c" + Path(dst).suffix))]) == 0
    assert_same_tensors(read(tmp_path / ("c" + Path(dst).suffix)), after, "second round trip")


@pytest.mark.parametrize("name", ["sd1", "sd2", "sd1-inpaint"])
def test_folder_to_file_to_folder(tiny, tmp_path, offline, name):
    t = tiny(name)
    assert cli(["convert", str(t.folder), str(tmp_path / "model.safetensors")]) == 0
    cls = diffusers.StableDiffusionInpaintPipeline if t.inpaint else diffusers.StableDiffusionPipeline
    # the file minidiff writes is one diffusers' own from_single_file reads, tensor for tensor
    theirs = cls.from_single_file(str(tmp_path / "model.safetensors"), config=str(t.folder), local_files_only=True)
    for part in MODELS:
        assert_same_tensors(getattr(theirs, part).state_dict(), t.models[part].state_dict(), part)
    assert cli(["convert", str(tmp_path / "model.safetensors"), str(tmp_path / "back")]) == 0
    back = cls.from_pretrained(tmp_path / "back", local_files_only=True)
    assert type(back) is cls
    for part in MODELS:
        assert_same_tensors(getattr(back, part).state_dict(), t.models[part].state_dict(), part)
    for part in ("unet", "vae", "scheduler"):
        assert plain(getattr(back, part).config) == plain(getattr(t.pipe, part).config), part
    keys = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "hidden_act",
        "max_position_embeddings",
        "layer_norm_eps",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "projection_dim",
    )
    for key in keys:
        assert getattr(back.text_encoder.config, key) == getattr(t.models["text_encoder"].config, key), key


def test_convert_options(tiny, tmp_path):
    t = tiny("sd2")
    src = t.write(tmp_path / "m.safetensors")
    assert (
        cli(["convert", str(src), str(tmp_path / "eps"), "--prediction-type", "epsilon", "--tokenizer", str(t.folder)])
        == 0
    )
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "eps")
    assert (pipe.scheduler.config.prediction_type, pipe.unet.config.sample_size) == ("epsilon", 64)


def test_a_folder_the_ldm_format_cannot_describe_is_refused(tmp_path):
    """LDM files carry no config: the bundled shapes model (16 norm groups, 2 heads) would read back
    as a different network, so writing it is an error naming what would change, and no file."""
    import minidiff

    out = tmp_path / "shapes.safetensors"
    with pytest.raises(SystemExit, match=r"norm_num_groups=16 \(would read back as 32\)"):
        cli(["convert", minidiff.DEFAULT_MODEL, str(out)])
    assert not out.exists()


def test_half_precision_round_trip(tiny, tmp_path):
    t = tiny("sd2")
    assert cli(["convert", str(t.folder), str(tmp_path / "half.safetensors"), "--half"]) == 0
    half = read(tmp_path / "half.safetensors")
    assert {v.dtype for v in half.values()} == {torch.float16}
    assert cli(["convert", str(tmp_path / "half.safetensors"), str(tmp_path / "folder")]) == 0  # stays fp16
    assert {v.dtype for v in load_file(str(tmp_path / "folder/unet/diffusion_pytorch_model.safetensors")).values()} == {
        torch.float16
    }
    assert cli(["convert", str(tmp_path / "folder"), str(tmp_path / "again.safetensors")]) == 0
    assert_same_tensors(read(tmp_path / "again.safetensors"), half, "fp16 round trip")


# ---------------------------------------------------------------- bad inputs


class Canary:
    """A pickle whose loading would run a command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.out.2.weight": torch.zeros(1), "x": Canary(marker)}}, path)
    with pytest.raises(CheckpointError, match=r"refused to load .*evil\.ckpt"):
        StableDiffusionPipeline.from_single_file(path)
    with pytest.raises(SystemExit, match="refused"):
        cli(["convert", str(path), str(tmp_path / "out")])
    assert not marker.exists()


def test_broken_files_are_named(tiny, tmp_path):
    t = tiny("sd1")
    good = t.write(tmp_path / "good.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    ckpt = t.write(tmp_path / "good.ckpt")
    cut_ckpt = tmp_path / "cut.ckpt"
    cut_ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    lfs = tmp_path / "lfs.safetensors"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 4265146304\n")
    pickle_named = tmp_path / "pickle.safetensors"
    pickle_named.write_bytes(ckpt.read_bytes())
    for path, message in (
        (cut, "truncated or corrupt"),
        (cut_ckpt, "truncated or corrupt"),
        (lfs, "Git LFS pointer"),
        (pickle_named, "holds a pickle"),
    ):
        with pytest.raises(CheckpointError, match=message) as err:
            StableDiffusionPipeline.from_single_file(path)
        assert str(path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        StableDiffusionPipeline.from_single_file(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="is a folder"):
        StableDiffusionPipeline.from_single_file(t.folder)


def test_wrong_layouts_are_named(tiny, tmp_path):
    t = tiny("sd1")
    cases = {
        "diffusers": ({k: v for k, v in t.models["unet"].state_dict().items()}, "diffusers \\(not LDM\\)"),
        "sdxl": ({**t.ldm, "conditioner.embedders.0.transformer.x": torch.zeros(1)}, "SDXL"),
        "stray": ({**t.ldm, "something_else.weight": torch.zeros(1)}, "something_else.weight"),
        "no_vae": ({k: v for k, v in t.ldm.items() if not k.startswith("first_stage_model.")}, "holds no vae"),
        "missing": (
            {k: v for k, v in t.ldm.items() if k != "model.diffusion_model.middle_block.0.in_layers.2.bias"},
            "missing 1 key\\(s\\): mid_block.resnets.0.conv1.bias",
        ),
        "shape": (
            {**t.ldm, "model.diffusion_model.middle_block.0.in_layers.2.weight": torch.zeros(3, 3)},
            "wrong shape for 1: mid_block.resnets.0.conv1.weight \\(3, 3\\)",
        ),
        "half_ema": ({**t.ldm, "model_ema.diffusion_modelout2weight": torch.zeros(1)}, "EMA copy does not match"),
    }
    for case, (sd, message) in cases.items():
        path = t.write(tmp_path / f"{case}.safetensors", {k: v.contiguous() for k, v in sd.items()})
        with pytest.raises((CheckpointError, ConversionError), match=message) as err:
            StableDiffusionPipeline.from_single_file(path)
        assert str(path) in str(err.value), case
    with pytest.raises(SystemExit, match="needs a DST ending in .safetensors"):
        cli(["convert", str(t.folder), str(tmp_path / "x.bin")])


# ---------------------------------------------------------------- the real SD 1.5 / SD 2.1 architectures


def real_models(name: str, fp16_exact: bool) -> dict:
    """diffusers / transformers models at the reference configs, perturbed (rounded to fp16 if the
    file will be fp16, so the file holds them exactly)."""
    unet = perturb(diffusers.UNet2DConditionModel.from_config(reference_config(f"{name}.unet")).eval(), seed=3)
    vae = perturb(
        diffusers.AutoencoderKL.from_config(reference_config("sd-v1-5.vae")).eval(), seed=4
    )  # SD2 keeps SD1's VAE
    text = perturb(
        transformers.CLIPTextModel(transformers.CLIPTextConfig(**reference_config(f"{name}.text_encoder"))).eval(),
        seed=5,
    )
    models = dict(unet=unet, vae=vae, text_encoder=text)
    if fp16_exact:
        with torch.no_grad():
            for m in models.values():
                for p in m.parameters():
                    p.copy_(p.half().float())
    return models


@pytest.fixture(
    scope="module", params=[("sd-v1-5", "model.safetensors"), ("sd-v2-1", "model.ckpt")], ids=["sd-v1-5", "sd-v2-1"]
)
def real(request, tmp_path_factory):
    """SD 1.5 as an fp32 .safetensors; SD 2.1 as an fp16 .ckpt nested under state_dict (24 OpenCLIP layers)."""
    name, filename = request.param
    sd2 = name == "sd-v2-1"
    models = real_models(name, fp16_exact=sd2)
    text = ldm_openclip(models["text_encoder"].state_dict()) if sd2 else ldm_clip(models["text_encoder"].state_dict())
    sd = {
        **ldm_unet(models["unet"].state_dict(), models["unet"].config),
        **ldm_vae(models["vae"].state_dict(), models["vae"].config),
        **text,
    }
    path = tmp_path_factory.mktemp(name) / filename
    if sd2:
        torch.save(
            {"state_dict": {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, "global_step": 110000},
            path,
        )
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    del sd, text
    ours = StableDiffusionPipeline.from_single_file(path)
    path.unlink()  # GBs: keep the disk free for the next config
    yield name, models, ours
    del models, ours
    gc.collect()


def test_real_configs_are_inferred(real):
    name, models, ours = real
    for part in ("unet", "text_encoder"):
        ref = plain(reference_config(f"{name}.{part}"))
        got = plain(getattr(ours, part).config)
        assert {k: got[k] for k in ref if k in got} == {k: v for k, v in ref.items() if k in got}, part
    assert {k: v for k, v in plain(ours.vae.config).items() if k in reference_config("sd-v1-5.vae")} == {
        **plain(reference_config("sd-v1-5.vae")),
        "sample_size": 768 if name == "sd-v2-1" else 512,
    }
    assert ours.scheduler.config.prediction_type == ("v_prediction" if name == "sd-v2-1" else "epsilon")


def test_real_weights_come_back(real):
    """Every tensor, through minidiff's own diffusers export (an independent name map), equals the reference."""
    _, models, ours = real
    for part in MODELS:
        model = getattr(ours, part)
        exported = model.weights_format.export(model.state_dict(), model.config)
        ref = {
            ("text_model." + k if part == "text_encoder" and not k.startswith("text_model.") else k): v
            for k, v in models[part].state_dict().items()
        }
        ref.pop("text_model.embeddings.position_ids", None)
        assert_same_tensors(exported, ref, part)


def test_real_outputs(real):
    name, models, ours = real
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 12, generator=g)
    ctx = torch.randn(1, 77, models["unet"].config.cross_attention_dim, generator=g)
    ids = ours.tokenizer(
        ["a photograph of an astronaut riding a horse"], padding="max_length", return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        assert (
            rel_err(
                ours.unet(x, 999, encoder_hidden_states=ctx).sample,
                models["unet"](x, 999, encoder_hidden_states=ctx).sample,
            )
            <= 1e-4
        )
        assert rel_err(ours.text_encoder(ids)[0], models["text_encoder"](ids)[0]) <= 1e-4
        z = torch.randn(1, 4, 8, 8, generator=g)
        assert rel_err(ours.vae.decode(z).sample, models["vae"].decode(z).sample) <= 1e-4
