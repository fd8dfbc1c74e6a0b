"""Original Stable Diffusion single files (CompVis / LDM SD 1.x / 2.x, SDXL base and refiner): whole
pipelines, and writing them.

Reading a file, and loading one model from it, is minidiff.ldm_file's (it sits below the model
classes, so that `UNet2DConditionModel.from_single_file` can use it); this module puts the models
together with a scheduler and tokenizers into a pipeline, and goes the other way for `minidiff convert`.

The pipeline class must fit the file (SD 1.x / 2.x files -> the SD pipelines; SDXL files -> the SDXL
ones; a refiner file, whose UNet is conditioned on an aesthetic score and which has no CLIP ViT-L,
-> a pipeline with `requires_aesthetics_score`, i.e. StableDiffusionXLImg2ImgPipeline). Tokenizers are
the folders the user names (`tokenizer=`, `tokenizer_2=`; a pipeline folder gives both), else the
CLIP BPE vocabulary shipped with minidiff (minidiff/data: the same file for every SD model; the
OpenCLIP encoders' tokenizers pad with "!"). The scheduler and SDXL's pipeline settings are the
variant's (weights_conversion.ldm.VARIANTS; see minidiff.ldm_file for how it is chosen).

Writing: the models' weights under their original names, in a .safetensors or a .ckpt (nested
under "state_dict", as LDM saves), in the SDXL layout when there is a text_encoder_2. EMA copies,
the noise-schedule buffers, tokenizers and scheduler are not part of what is written: the file
holds the weights a pipeline runs on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from weights_conversion import ConversionError, ldm, ldm_clip, ldm_unet, ldm_vae

from . import files
from .autoencoder_kl import AutoencoderKL
from .clip_text import CLIPTextModel, CLIPTextModelWithProjection
from .ldm_file import (
    FAMILY_COMPONENTS,
    SingleFile,
    file_dtype,
    from_variant,
    inferred,
    load_component,
    read_single_file,
)
from .loading import CheckpointError, find_weight_files, load_config, read_state_dict
from .schedulers import SCHEDULERS
from .tokenizer import CLIPTokenizer
from .unet_2d_condition import UNet2DConditionModel

MODELS = {
    "unet": UNet2DConditionModel,
    "vae": AutoencoderKL,
    "text_encoder": CLIPTextModel,
    "text_encoder_2": CLIPTextModelWithProjection,
}
TOKENIZERS = {"tokenizer": "text_encoder", "tokenizer_2": "text_encoder_2"}  # each serves this encoder
OPENCLIP_PAD_TOKEN = "!"  # SDXL's tokenizer_2, like every OpenCLIP tokenizer
FAMILIES = {"sd": "a Stable Diffusion 1.x / 2.x", "sdxl": "an SDXL base", "sdxl-refiner": "an SDXL refiner"}


def _tokenizer(given: Any, name: str, pad_token: str):
    """The tokenizer object or folder given (a pipeline folder: its `name` subfolder), else the
    shipped CLIP vocabulary padding with `pad_token`."""
    if given is None:
        return CLIPTokenizer.from_default_vocab(pad_token=pad_token)
    if isinstance(given, (str, os.PathLike)):
        folder = Path(given)
        sub = name if (folder / name).is_dir() else None
        return CLIPTokenizer.from_pretrained(folder, subfolder=sub, local_files_only=True)
    return given


def check_family(cls: type, f: SingleFile) -> None:
    """The pipeline class must be able to run the file's models (see the module docstring)."""
    sdxl_class = "text_encoder_2" in cls.component_names
    use = None
    if f.family == "sd" and sdxl_class:
        use = "StableDiffusionPipeline.from_single_file (or the SD img2img / inpaint pipelines')"
    elif f.family != "sd" and not sdxl_class:
        use = "StableDiffusionXLPipeline.from_single_file (a refiner: StableDiffusionXLImg2ImgPipeline's)"
    elif f.family == "sdxl-refiner" and "requires_aesthetics_score" not in cls.config_names:
        use = (
            "StableDiffusionXLImg2ImgPipeline.from_single_file: the refiner's UNet is conditioned on an "
            "aesthetic score, and it has no CLIP ViT-L text encoder"
        )
    if use is not None:
        raise CheckpointError(
            f"{f.path} is {FAMILIES[f.family]} checkpoint, which {cls.__name__} cannot run: load it with {use}"
        )


def load_pipeline(
    cls: type,
    path: str | os.PathLike | SingleFile,
    prediction_type: str | None = None,
    tokenizer: Any = None,
    tokenizer_2: Any = None,
    torch_dtype: Any = None,
    use_ema: bool | None = None,
    **components: Any,
):
    """A Stable Diffusion 1.x / 2.x / XL pipeline from a single file (a path, or a file already read
    by read_single_file); `unet=`, `scheduler=`, ... replace a component, and SDXL's
    `force_zeros_for_empty_prompt=` / `requires_aesthetics_score=` a setting."""
    unknown = sorted(set(components) - set(cls.component_names) - set(cls.config_names))
    if unknown:
        raise TypeError(f"{cls.__name__}.from_single_file got unknown arguments {unknown}")
    if isinstance(path, SingleFile):
        if use_ema is not None:
            raise TypeError("use_ema is read with the file: pass it to read_single_file")
        f = path
    else:
        f = read_single_file(path, use_ema)
    check_family(cls, f)
    variant = f.variant(prediction_type)
    given = {"tokenizer": tokenizer, "tokenizer_2": tokenizer_2}
    if tokenizer_2 is None and isinstance(tokenizer, (str, os.PathLike)) and (Path(tokenizer) / "tokenizer_2").is_dir():
        given["tokenizer_2"] = tokenizer  # a pipeline folder: both tokenizers
    pads = {"tokenizer": variant.pad_token, "tokenizer_2": OPENCLIP_PAD_TOKEN}
    for name in cls.component_names:
        if name in components:
            continue
        if name in MODELS:
            # every model of the file's family is required (load_component names a missing one)
            absent = name not in FAMILY_COMPONENTS[f.family] and name in cls.optional_components
            components[name] = None if absent else load_component(MODELS[name], f, variant, torch_dtype)
        elif name == "scheduler":
            config = dict(variant.scheduler)
            components[name] = SCHEDULERS[config["_class_name"]].from_config(config)
    for name in [n for n in TOKENIZERS if n in cls.component_names and n not in components]:
        # a tokenizer only beside its text encoder (the refiner has no tokenizer)
        has_encoder = components.get(TOKENIZERS[name]) is not None
        components[name] = _tokenizer(given[name], name, pads[name]) if has_encoder else None
    for name in cls.config_names:
        if name not in components and name in variant.pipeline:
            components[name] = variant.pipeline[name]
    return cls(**components)


# -- writing ---------------------------------------------------------------------------------------


def to_ldm_state_dict(
    unet: Any = None, vae: Any = None, text_encoder: Any = None, text_encoder_2: Any = None
) -> dict[str, torch.Tensor]:
    """minidiff models -> one flat single-file state dict. With a text_encoder_2 (SDXL's OpenCLIP
    bigG) the file has SDXL's layout and the text encoder is its CLIP ViT-L; without one, the text
    encoder is written as OpenCLIP (SD2) when it uses gelu, as OpenAI CLIP (SD1, quick_gelu) otherwise."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    if unet is not None:
        parts["unet"] = ldm_unet.FORMAT.export(unet.state_dict(), unet.config)
    if vae is not None:
        parts["vae"] = ldm_vae.FORMAT.export(vae.state_dict(), vae.config)
    if text_encoder is not None:
        openclip = text_encoder.config.hidden_act == "gelu" and text_encoder_2 is None
        fmt = ldm_clip.OPENCLIP_FORMAT if openclip else ldm_clip.CLIP_FORMAT
        parts["openclip" if openclip else "clip"] = fmt.export(text_encoder.state_dict(), text_encoder.config)
    if text_encoder_2 is not None:
        parts["bigg"] = ldm_clip.BIGG_FORMAT.export(text_encoder_2.state_dict(), text_encoder_2.config)
    models = dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2)
    _check_reads_back(parts, {k: v for k, v in models.items() if v is not None})
    return ldm.join(parts)


# set on reading from the prediction type the reader picks (SD2: 512 or 768 px), so never compared
READ_TIME_KEYS = ("sample_size", "upcast_attention")


def _check_reads_back(parts: dict[str, dict[str, torch.Tensor]], models: dict[str, Any]) -> None:
    """A single file carries no config: refuse to write a model whose weights would read back as a
    different architecture (a norm group count, head count or scaling factor the format does not use)."""
    written = SingleFile(Path("the written file"), parts, ldm.parts_layout(parts))
    variant = written.variant()
    for name, model in models.items():
        _, raw, _ = inferred(parts, name, written.what)
        config = type(model)._config_from_dict({**raw, **from_variant(name, variant)})
        diff = [
            f"{k}={model.config[k]!r} (would read back as {config[k]!r})"
            for k in model.config.keys()
            if k not in READ_TIME_KEYS and model.config[k] != config[k]
        ]
        if diff:
            raise ConversionError(
                f"the {name} cannot be written as a single file, which has no config: "
                f"its weights do not determine {', '.join(diff[:4])}"
            )


def save_single_file(
    state_dict: dict[str, torch.Tensor], path: str | os.PathLike, half: bool = False, overwrite: bool = False
) -> Path:
    """Write .safetensors, or a .ckpt nested under "state_dict" like LDM's own checkpoints. Written
    under a temporary name and renamed into place when complete; an existing file is refused unless
    `overwrite`, and then replaced only by the complete new one."""
    path = Path(path)
    if path.suffix not in (".safetensors", ".ckpt"):
        raise ValueError(f"{path}: a single file ends in .safetensors or .ckpt")
    files.check_file_destination(path, overwrite)
    sd = {k: (v.half() if half and v.is_floating_point() else v).detach().contiguous() for k, v in state_dict.items()}
    if path.suffix == ".ckpt":
        return files.torch_save({"state_dict": sd}, path, overwrite)
    from safetensors.torch import save_file

    with files.atomic_file(path, overwrite) as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt"})
    return path


def load_folder_models(folder: str | os.PathLike, torch_dtype: Any = "auto") -> dict[str, Any]:
    """The models of a diffusers Stable Diffusion (XL) folder, each in its files' dtype by default:
    UNet, VAE and the text encoders model_index.json names (SDXL's refiner has only text_encoder_2)."""
    index = load_config(folder, None, "model_index.json", local_files_only=True)  # a pipeline folder, or an error
    listed = {name for name in MODELS if isinstance(index.get(name), list) and None not in index[name]}
    if "text_encoder_2" in listed and "text_encoder" not in listed:  # an SDXL refiner
        names = ["unet", "vae", "text_encoder_2"]
    else:
        names = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if "text_encoder_2" in listed else [])
    models = {}
    for name in names:
        cls = MODELS[name]
        config = cls._config_from_dict(load_config(folder, name, cls.config_name, local_files_only=True))
        sd = read_state_dict(find_weight_files(folder, name, cls.weights_names, local_files_only=True))
        models[name] = cls.from_foreign_state_dict(
            config, sd, file_dtype(torch_dtype, sd), what=f"{cls.__name__} weights in {folder}/{name}"
        )
    return models
