"""SDXL single files (Stability's original base / refiner layout): loading, `minidiff convert` both ways, bad files.

The fixtures are tiny perturbed diffusers / transformers SDXL components at reduced width with SDXL's
structure (base: three levels, no attention in the first, transformer depth [1, 2, 10]; refiner:
four levels, depth 2 everywhere; CLIP ViT-L + an OpenCLIP bigG whose projection is narrower than its
width), written in the original layout by this file's OWN inverse key map (the UNet and VAE parts are
test_single_file's, plus `label_emb`). Each fixture is first proven with diffusers' own
`from_single_file` (offline, the saved diffusers folder as its config): every tensor must come back.
Then minidiff must load the file to the folder's configs and tensors. The real SDXL configs are
checked on the meta device (shapes only: no weights are allocated).
"""

from __future__ import annotations

import math
from pathlib import Path

import diffusers
import huggingface_hub.constants
import numpy as np
import pytest
import torch
import transformers
from conftest import CLIP_BPE, clip_config, perturb, reference_config, rel_err, vae_config
from safetensors.torch import load_file, save_file
from test_single_file import assert_same_tensors, ldm_unet, ldm_vae, plain, read

import minidiff
from minidiff import (
    AutoencoderKL,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from minidiff.cli import main as cli
from minidiff.ldm_file import SingleFile, from_variant, inferred
from minidiff.loading import CheckpointError
from minidiff.single_file import load_pipeline
from weights_conversion import ConversionError, ldm
from weights_conversion.clip_vocab import write_hf_tokenizer_files

CLIP_L, BIGG, PROJECTION = 64, 128, 96  # text widths (tiny) and bigG's projection width
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
BIGG_PREFIX = {False: "conditioner.embedders.1.model.", True: "conditioner.embedders.0.model."}  # refiner?
MODELS = {False: ("unet", "vae", "text_encoder", "text_encoder_2"), True: ("unet", "vae", "text_encoder_2")}  # refiner?
# the pipeline class each fixture is, and what `minidiff convert` saves it as
PIPELINES = {
    "base": "StableDiffusionXLPipeline",
    "refiner": "StableDiffusionXLImg2ImgPipeline",
    "inpaint": "StableDiffusionXLInpaintPipeline",
}

# ---------------------------------------------------------------- the test's own diffusers -> original map


def sdxl_unet(sd: dict, cfg) -> dict:
    """diffusers UNet2DConditionModel -> model.diffusion_model.*: label_emb.0.0 / .0.2 for the added MLP."""
    added = {"add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2."}
    out = {}
    for old, new in added.items():
        out |= {"model.diffusion_model." + new + k[len(old) :]: v for k, v in sd.items() if k.startswith(old)}
    return out | ldm_unet({k: v for k, v in sd.items() if not k.startswith("add_embedding.")}, cfg)


def sdxl_clip_l(sd: dict) -> dict:
    """transformers CLIPTextModel -> conditioner.embedders.0.transformer.text_model.* (+ position_ids)."""
    out = {CLIP_L_PREFIX + "text_model." + k.removeprefix("text_model."): v for k, v in sd.items()}
    out[CLIP_L_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return out


def openclip_bigg(sd: dict, prefix: str) -> dict:
    """transformers CLIPTextModelWithProjection -> OpenCLIP: fused in_proj, text_projection as (width, proj)."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    n = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
    out = {
        "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        "positional_embedding": sd["embeddings.position_embedding.weight"],
        "ln_final.weight": sd["final_layer_norm.weight"],
        "ln_final.bias": sd["final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].T,
        "logit_scale": torch.tensor(math.log(100.0)),
    }
    names = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
        "self_attn.out_proj": "attn.out_proj",
    }
    for i in range(n):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out |= {f"{dst}{b}.{leaf}": sd[f"{src}{a}.{leaf}"] for a, b in names.items()}
            out[f"{dst}attn.in_proj_{leaf}"] = torch.cat([sd[f"{src}self_attn.{x}_proj.{leaf}"] for x in "qkv"])
    return {prefix + k: v for k, v in out.items()}


def original_layout(models: dict, refiner: bool) -> dict:
    sd = {
        **sdxl_unet(models["unet"].state_dict(), models["unet"].config),
        **ldm_vae(models["vae"].state_dict(), models["vae"].config),
        **openclip_bigg(models["text_encoder_2"].state_dict(), BIGG_PREFIX[refiner]),
    }
    if not refiner:
        sd |= sdxl_clip_l(models["text_encoder"].state_dict())
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


# ---------------------------------------------------------------- tiny fixtures


def sdxl_components(kind: str, seed: int = 0) -> dict:
    """diffusers / transformers SDXL components in the original configs' conventions (GroupNorm 32,
    64-wide heads, 256-wide micro-conditioning embeddings), every weight perturbed. `kind`: "base",
    "refiner" or "inpaint" (the base's structure, 9 input channels, shallower)."""
    torch.manual_seed(seed)
    refiner = kind == "refiner"
    if refiner:
        levels = dict(
            block_out_channels=(64, 64, 128, 128),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=2,
            attention_head_dim=(1, 1, 2, 2),
        )
        context, time_ids = BIGG, 5  # the refiner: bigG alone; size, crop, aesthetic score
    else:
        levels = dict(
            block_out_channels=(64, 128, 128),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 3) if kind == "inpaint" else (1, 2, 10),
            attention_head_dim=(1, 2, 2),
        )
        context, time_ids = CLIP_L + BIGG, 6  # both encoders; size, crop, target size
    unet = diffusers.UNet2DConditionModel(
        sample_size=128,
        in_channels=9 if kind == "inpaint" else 4,
        layers_per_block=2,
        norm_num_groups=32,
        cross_attention_dim=context,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=PROJECTION + time_ids * 256,
        **levels,
    )
    vae = diffusers.AutoencoderKL(
        **vae_config((32, 32, 64), 32, latent_channels=4, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
    )
    common = dict(max_position_embeddings=77, pad_token_id=1)
    bigg = clip_config(BIGG, 3, 2, **common, hidden_act="gelu", projection_dim=PROJECTION)
    models = dict(
        unet=unet, vae=vae, text_encoder_2=transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**bigg))
    )
    if not refiner:
        clip_l = clip_config(CLIP_L, 2, 1, **common, hidden_act="quick_gelu", projection_dim=768)
        models["text_encoder"] = transformers.CLIPTextModel(transformers.CLIPTextConfig(**clip_l))
    for i, model in enumerate(models.values()):
        perturb(model.eval(), seed + i, scale=0.02)
    return models


class TinyXL:
    """A saved diffusers SDXL folder and the original-layout state dict of the same weights."""

    def __init__(self, root, kind: str) -> None:
        self.kind, self.refiner = kind, kind == "refiner"
        self.models = sdxl_components(kind)
        scheduler = diffusers.EulerDiscreteScheduler.from_config(reference_config("sdxl-base-1.0.scheduler"))
        tok_2 = transformers.CLIPTokenizer.from_pretrained(
            write_hf_tokenizer_files(CLIP_BPE, root / "_t2", pad_token="!")
        )
        if self.refiner:
            self.pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
                **self.models,
                text_encoder=None,
                tokenizer=None,
                tokenizer_2=tok_2,
                scheduler=scheduler,
                requires_aesthetics_score=True,
                force_zeros_for_empty_prompt=False,
                add_watermarker=False,
            )
        else:
            tok = transformers.CLIPTokenizer.from_pretrained(write_hf_tokenizer_files(CLIP_BPE, root / "_t1"))
            self.pipe = self.diffusers_class(
                **self.models, tokenizer=tok, tokenizer_2=tok_2, scheduler=scheduler, add_watermarker=False
            )
        self.folder = root / "diffusers"
        self.pipe.save_pretrained(self.folder)
        self.sd = original_layout(self.models, self.refiner)

    def write(self, path, sd: dict | None = None, nested: bool = False):
        sd = self.sd if sd is None else sd
        if path.suffix == ".safetensors":
            save_file(sd, str(path))
        else:
            torch.save({"state_dict": sd, "global_step": 1} if nested else sd, path)
        return path

    @property
    def diffusers_class(self) -> type:
        return getattr(diffusers, PIPELINES[self.kind])

    @property
    def minidiff_class(self) -> type:
        return getattr(minidiff, PIPELINES[self.kind])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    built: dict[str, TinyXL] = {}

    def get(name: str) -> TinyXL:
        if name not in built:
            built[name] = TinyXL(tmp_path_factory.mktemp(name), name)
        return built[name]

    return get


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    """Each fixture written once: {(name, filename): path}."""
    root, written = tmp_path_factory.mktemp("files"), {}

    def get(name: str, filename: str = "model.safetensors"):
        if (name, filename) not in written:
            written[name, filename] = tiny(name).write(root / f"{name}-{filename}", nested=filename.endswith(".ckpt"))
        return written[name, filename]

    return get


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def assert_same_models(ours, t: TinyXL, round_to=None) -> None:
    """Each model: the folder's minidiff config and bit-identical tensors (rounded through `round_to`)."""
    classes = dict(
        unet=UNet2DConditionModel,
        vae=AutoencoderKL,
        text_encoder=CLIPTextModel,
        text_encoder_2=CLIPTextModelWithProjection,
    )
    for name in MODELS[t.refiner]:
        ref = classes[name].from_pretrained(t.folder, subfolder=name)
        model = getattr(ours, name)
        assert type(model) is classes[name] and model.config == ref.config, name
        expected = {k: v.to(round_to).float() if round_to else v for k, v in ref.state_dict().items()}
        assert_same_tensors(model.state_dict(), expected, name)


# ---------------------------------------------------------------- the fixtures are what diffusers reads


@pytest.mark.parametrize("name", ["base", "refiner", "inpaint"])
def test_diffusers_reads_the_fixture(tiny, files, offline, name):
    """diffusers' own from_single_file, told the saved folder as its offline config, gets every tensor back."""
    t = tiny(name)
    pipe = t.diffusers_class.from_single_file(str(files(name)), config=str(t.folder), local_files_only=True)
    for part in MODELS[t.refiner]:
        assert_same_tensors(getattr(pipe, part).state_dict(), t.models[part].state_dict(), part)
    assert (pipe.text_encoder is None) == t.refiner


# ---------------------------------------------------------------- minidiff loads them like the folder


@pytest.mark.parametrize(
    "name, filename, half",
    [
        ("base", "model.safetensors", False),
        ("refiner", "model.safetensors", False),
        ("base", "model.ckpt", False),
        ("refiner", "fp16.safetensors", True),
        ("inpaint", "model.safetensors", False),
    ],
)
def test_loads_like_the_folder(tiny, files, tmp_path, name, filename, half):
    t = tiny(name)
    path = files(name, filename) if not half else t.write(tmp_path / filename, {k: v.half() for k, v in t.sd.items()})
    ours = t.minidiff_class.from_single_file(path)
    assert_same_models(ours, t, round_to=torch.float16 if half else None)
    assert all(p.dtype == torch.float32 for p in ours.unet.parameters())  # loaded in fp32, like diffusers
    # the configs diffusers' folder has, key for key where minidiff has the key
    for part in ("unet", "vae"):
        ref = plain(getattr(t.pipe, part).config)
        got = plain(getattr(ours, part).config)
        assert {k: got[k] for k in got if k in ref} == {k: ref[k] for k in got if k in ref}, part
    assert plain(ours.scheduler.config) == plain(t.pipe.scheduler.config)
    assert type(ours.scheduler).__name__ == "EulerDiscreteScheduler"
    assert ours.force_zeros_for_empty_prompt == t.pipe.config.force_zeros_for_empty_prompt
    assert getattr(ours, "requires_aesthetics_score", False) is t.refiner  # only the img2img class has it
    prompt = ["a photo of an astronaut!! riding a horse", ""]
    for tok in ("tokenizer", "tokenizer_2"):
        if getattr(t.pipe, tok) is None:
            assert getattr(ours, tok) is None and ours.text_encoder is None
            continue
        ids = [getattr(p, tok)(prompt, padding="max_length", return_tensors="pt").input_ids for p in (ours, t.pipe)]
        assert torch.equal(*ids), tok
        assert getattr(ours, tok).pad_token == getattr(t.pipe, tok).pad_token


def test_outputs_match_diffusers(tiny, files):
    """A UNet step with micro-conditioning and both encoders' outputs, against diffusers' models."""
    t = tiny("base")
    ours = StableDiffusionXLPipeline.from_single_file(files("base"))
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, CLIP_L + BIGG, generator=g)
    added = {
        "text_embeds": torch.randn(2, PROJECTION, generator=g),
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
    }
    ids = ours.tokenizer_2(["a red cube!"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        a = ours.unet(x, 500, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        b = t.models["unet"](x, 500, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        assert rel_err(a, b) <= 1e-4
        theirs = t.models["text_encoder_2"](ids, output_hidden_states=True)
        mine = ours.text_encoder_2(ids, output_hidden_states=True)
        assert rel_err(mine.text_embeds, theirs.text_embeds) <= 1e-5
        assert rel_err(mine.hidden_states[-2], theirs.hidden_states[-2]) <= 1e-5


def test_images_match_diffusers(tiny, files):
    """The whole pipelines from the files (models, scheduler, tokenizers, settings) against diffusers
    running the folders: the base's seeded 2-step image, then the refiner on it, within 3e-4."""
    base, refiner = tiny("base"), tiny("refiner")
    ours = {"base": StableDiffusionXLPipeline.from_single_file(files("base"))}
    ours["refiner"] = StableDiffusionXLImg2ImgPipeline.from_single_file(files("refiner"))

    def run(pipe, **extra):
        pipe.set_progress_bar_config(disable=True)
        kwargs = dict(prompt="a red cube!", negative_prompt="blurry", num_inference_steps=2, output_type="np")
        return np.asarray(pipe(**kwargs, **extra, generator=torch.Generator().manual_seed(1)).images)

    size = dict(height=32, width=24)
    image = run(base.pipe, **size)
    assert np.abs(run(ours["base"], **size) - image).max() <= 3e-4
    refine = dict(image=image, strength=0.6)  # the same input image for both refiners
    assert np.abs(run(ours["refiner"], **refine) - run(refiner.pipe, **refine)).max() <= 3e-4


def test_each_model_alone(tiny, files):
    t = tiny("base")
    for cls, sub in (
        (UNet2DConditionModel, "unet"),
        (AutoencoderKL, "vae"),
        (CLIPTextModel, "text_encoder"),
        (CLIPTextModelWithProjection, "text_encoder_2"),
    ):
        ours, ref = cls.from_single_file(files("base")), cls.from_pretrained(t.folder, subfolder=sub)
        assert ours.config == ref.config, sub
        assert_same_tensors(ours.state_dict(), ref.state_dict(), sub)
    assert AutoencoderKL.from_single_file(files("refiner")).config.scaling_factor == 0.13025
    with pytest.raises(CheckpointError, match=r"holds no text_encoder \(conditioner\.embedders\.0\.transformer\.\*"):
        CLIPTextModel.from_single_file(files("refiner"))


def test_settings_and_overrides(tiny, files):
    """prediction_type=, a pipeline setting and a component given by the caller; the refiner also
    loads into the inpainting class (diffusers' refiner inpainting recipe) and a base into img2img."""
    base = files("base")
    pipe = StableDiffusionXLPipeline.from_single_file(
        base, prediction_type="v_prediction", force_zeros_for_empty_prompt=False
    )
    assert (pipe.scheduler.config.prediction_type, pipe.force_zeros_for_empty_prompt) == ("v_prediction", False)
    img2img = StableDiffusionXLImg2ImgPipeline.from_single_file(base, scheduler=pipe.scheduler)
    assert img2img.scheduler is pipe.scheduler and img2img.requires_aesthetics_score is False
    # a pipeline folder gives both tokenizers
    custom = load_pipeline(StableDiffusionXLPipeline, base, tokenizer=str(tiny("base").folder))
    assert (custom.tokenizer.pad_token, custom.tokenizer_2.pad_token) == ("<|endoftext|>", "!")


# ---------------------------------------------------------------- minidiff convert, both ways


@pytest.mark.parametrize("name", ["base", "refiner", "inpaint"])
def test_file_to_folder_to_file(tiny, files, tmp_path, offline, name):
    t = tiny(name)
    source = files(name)
    assert cli(["convert", str(source), str(tmp_path / "folder")]) == 0
    # diffusers reads the converted folder bit-exact, as the class the file calls for
    pipe = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "folder", local_files_only=True)
    assert type(pipe) is t.diffusers_class
    for part in MODELS[t.refiner]:
        assert_same_tensors(getattr(pipe, part).state_dict(), t.models[part].state_dict(), part)
    assert plain(pipe.scheduler.config) == plain(t.pipe.scheduler.config)
    for key in ("force_zeros_for_empty_prompt", "requires_aesthetics_score"):
        assert pipe.config.get(key) == t.pipe.config.get(key), key

    assert cli(["convert", str(tmp_path / "folder"), str(tmp_path / "back.safetensors")]) == 0
    before, after = read(source), read(tmp_path / "back.safetensors")
    dropped = {CLIP_L_PREFIX + "text_model.embeddings.position_ids"}
    assert set(after) == set(before) - dropped
    # logit_scale (only CLIP's contrastive loss uses it) has no place in a diffusers folder: written
    # back at OpenCLIP's initial value; every other tensor comes back bit for bit
    scale = BIGG_PREFIX[t.refiner] + "logit_scale"
    assert after[scale].item() == pytest.approx(math.log(1 / 0.07))
    assert_same_tensors({k: v for k, v in after.items() if k != scale}, {k: before[k] for k in after if k != scale})
    # what minidiff writes is a fixed point: file -> folder -> file gives the same tensors
    assert cli(["convert", str(tmp_path / "back.safetensors"), str(tmp_path / "folder2")]) == 0
    assert cli(["convert", str(tmp_path / "folder2"), str(tmp_path / "again.ckpt")]) == 0
    assert_same_tensors(read(tmp_path / "again.ckpt"), after, "second round trip")


@pytest.mark.parametrize("name", ["base", "refiner"])
def test_folder_to_file_to_folder(tiny, tmp_path, offline, name):
    t = tiny(name)
    assert cli(["convert", str(t.folder), str(tmp_path / "model.safetensors")]) == 0
    # the file minidiff writes is one diffusers' own from_single_file reads, tensor for tensor
    theirs = t.diffusers_class.from_single_file(
        str(tmp_path / "model.safetensors"), config=str(t.folder), local_files_only=True
    )
    for part in MODELS[t.refiner]:
        assert_same_tensors(getattr(theirs, part).state_dict(), t.models[part].state_dict(), part)
    assert cli(["convert", str(tmp_path / "model.safetensors"), str(tmp_path / "back")]) == 0
    back = t.diffusers_class.from_pretrained(tmp_path / "back", local_files_only=True)
    for part in MODELS[t.refiner]:
        assert_same_tensors(getattr(back, part).state_dict(), t.models[part].state_dict(), part)
    for part in ("unet", "vae", "scheduler"):
        assert plain(getattr(back, part).config) == plain(getattr(t.pipe, part).config), part
    for part in MODELS[t.refiner][2:]:
        ours, ref = getattr(back, part).config.to_dict(), t.models[part].config.to_dict()
        keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act")
        keys += ("projection_dim", "max_position_embeddings", "layer_norm_eps", "bos_token_id", "eos_token_id")
        assert {k: ours[k] for k in keys} == {k: ref[k] for k in keys}, part
    assert type(back.text_encoder).__name__ == ("NoneType" if t.refiner else "CLIPTextModel")


def test_half_precision_round_trip(tiny, tmp_path):
    t = tiny("refiner")
    assert cli(["convert", str(t.folder), str(tmp_path / "half.safetensors"), "--half"]) == 0
    half = read(tmp_path / "half.safetensors")
    assert {v.dtype for v in half.values()} == {torch.float16}
    assert cli(["convert", str(tmp_path / "half.safetensors"), str(tmp_path / "folder")]) == 0  # stays fp16
    unet = load_file(str(tmp_path / "folder/unet/diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in unet.values()} == {torch.float16}
    assert cli(["convert", str(tmp_path / "folder"), str(tmp_path / "again.safetensors")]) == 0
    assert_same_tensors(read(tmp_path / "again.safetensors"), half, "fp16 round trip")


# ---------------------------------------------------------------- bad files


def write_tensors(path, sd: dict):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def test_wrong_pipeline_class_is_named(files, tmp_path):
    with pytest.raises(CheckpointError, match="SDXL refiner checkpoint.*StableDiffusionXLImg2ImgPipeline") as err:
        StableDiffusionXLPipeline.from_single_file(files("refiner"))
    assert str(files("refiner")) in str(err.value)
    with pytest.raises(CheckpointError, match="SDXL base checkpoint.*StableDiffusionXLPipeline.from_single_file"):
        StableDiffusionPipeline.from_single_file(files("base"))
    sd1 = write_tensors(tmp_path / "sd1.safetensors", {"cond_stage_model.transformer.text_model.x": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="Stable Diffusion 1.x / 2.x checkpoint.*StableDiffusionPipeline"):
        StableDiffusionXLImg2ImgPipeline.from_single_file(sd1)


def test_broken_files_are_named(tiny, tmp_path):
    t = tiny("base")
    sd, bigg = t.sd, BIGG_PREFIX[False]
    cases = {
        "truncated_bigg": (
            {k: v for k, v in sd.items() if k != bigg + "transformer.resblocks.1.attn.in_proj_weight"},
            r"missing 3 key\(s\): layers.1.self_attn.to_k.weight, layers.1.self_attn.to_q.weight",
        ),
        "truncated_unet": (
            {k: v for k, v in sd.items() if k != "model.diffusion_model.label_emb.0.2.bias"},
            r"missing 1 key\(s\): add_embedding.linear_2.bias",
        ),
        "no_bigg": ({k: v for k, v in sd.items() if not k.startswith(bigg)}, r"holds no text_encoder_2 \(" + bigg),
        "no_clip_l": (
            {k: v for k, v in sd.items() if not k.startswith(CLIP_L_PREFIX)},
            r"holds no text_encoder \(conditioner\.embedders\.0\.transformer\.\* keys\)",
        ),
        "projection": (
            {**sd, bigg + "text_projection": sd[bigg + "text_projection"].T},
            r"text_projection has shape \(96, 128\); OpenCLIP stores it as \(width 128, projection\)",
        ),
        "mixed": ({**sd, "cond_stage_model.model.ln_final.weight": torch.zeros(1)}, "mixes the SD 1.x / 2.x"),
        "stray": ({**sd, "conditioner.embedders.2.model.x": torch.zeros(1)}, "outside the SDXL base layout"),
    }
    for case, (broken, message) in cases.items():
        path = write_tensors(tmp_path / f"{case}.safetensors", broken)
        with pytest.raises((CheckpointError, ConversionError), match=message) as err:
            StableDiffusionXLPipeline.from_single_file(path)
        assert str(path) in str(err.value), case


# ---------------------------------------------------------------- the real SDXL architectures (meta device)


def meta_models(name: str) -> dict:
    """The real configs' diffusers / transformers models with meta tensors (shapes, no memory)."""
    with torch.device("meta"):
        models = dict(
            unet=diffusers.UNet2DConditionModel.from_config(reference_config(f"{name}.unet")),
            vae=diffusers.AutoencoderKL.from_config(reference_config("sdxl-base-1.0.vae")),
            text_encoder_2=transformers.CLIPTextModelWithProjection(
                transformers.CLIPTextConfig(**reference_config("sdxl-base-1.0.text_encoder_2"))
            ),
        )
        if name == "sdxl-base-1.0":
            config = transformers.CLIPTextConfig(**reference_config("sdxl-base-1.0.text_encoder"))
            models["text_encoder"] = transformers.CLIPTextModel(config)
    return models


@pytest.mark.parametrize("name", ["sdxl-base-1.0", "sdxl-refiner-1.0"])
def test_real_configs_are_inferred(name):
    """The inferred configs are the Hub's (every key minidiff has), and the renamed keys and shapes are
    exactly those of minidiff's models built from them."""
    refiner = name == "sdxl-refiner-1.0"
    models = meta_models(name)
    layout, parts = ldm.split(original_layout(models, refiner), name)
    assert layout == ("sdxl-refiner" if refiner else "sdxl")
    f = SingleFile(Path(name), parts, layout)
    variant = f.variant()
    classes = dict(
        unet=UNet2DConditionModel,
        vae=AutoencoderKL,
        text_encoder=CLIPTextModel,
        text_encoder_2=CLIPTextModelWithProjection,
    )
    for part in MODELS[refiner]:
        fmt, raw, sd = inferred(f.parts, part, name)
        ref_name = f"{name}.{part}" if part == "unet" else f"sdxl-base-1.0.{part}"
        ref = plain(reference_config(ref_name))
        config = classes[part]._config_from_dict({**raw, **from_variant(part, variant)})
        got = plain(config)
        assert {k: got[k] for k in got if k in ref} == {k: ref[k] for k in got if k in ref}, part
        with torch.device("meta"):
            model = classes[part](config)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        fmt.convert(sd, config, expected, part)  # raises on any missing, extra or misshapen key
