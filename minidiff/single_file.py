"""Original CompVis / LDM Stable Diffusion single files (SD 1.x / 2.x): whole pipelines, and writing them.

Reading a file, and loading one model from it, is minidiff.ldm_file's (it sits below the model
classes, so that `UNet2DConditionModel.from_single_file` can use it); this module puts the three
models together with a scheduler and a tokenizer into a pipeline, and goes the other way for
`minidiff convert`.

The tokenizer is the folder the user names (`tokenizer=`), else the CLIP BPE vocabulary shipped with
minidiff (minidiff/data, the same file for SD1 and SD2; SD2 pads with "!"). The scheduler is the
variant's (weights_conversion.ldm.VARIANTS; see minidiff.ldm_file for how it is chosen).

Writing: the three models' weights under their LDM names, in a .safetensors or a .ckpt (nested
under "state_dict", as LDM saves). EMA copies, the noise-schedule buffers and the tokenizer and
scheduler are not part of what is written: the file holds the weights a pipeline runs on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from weights_conversion import ConversionError, ldm, ldm_clip, ldm_unet, ldm_vae

from . import files
from .autoencoder_kl import AutoencoderKL
from .clip_text import CLIPTextModel
from .ldm_file import file_dtype, from_variant, inferred, load_component, read_single_file
from .loading import find_weight_files, load_config, read_state_dict
from .schedulers import SCHEDULERS
from .tokenizer import CLIPTokenizer
from .unet_2d_condition import UNet2DConditionModel

MODELS = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}


def _tokenizer(tokenizer: Any, variant: ldm.Variant):
    if tokenizer is None:
        return CLIPTokenizer.from_default_vocab(pad_token=variant.pad_token)
    if isinstance(tokenizer, (str, os.PathLike)):
        folder = Path(tokenizer)
        sub = "tokenizer" if (folder / "tokenizer").is_dir() else None  # a pipeline folder works too
        return CLIPTokenizer.from_pretrained(folder, subfolder=sub, local_files_only=True)
    return tokenizer


def load_pipeline(
    cls: type,
    path: str | os.PathLike,
    prediction_type: str | None = None,
    tokenizer: Any = None,
    torch_dtype: Any = None,
    use_ema: bool | None = None,
    **components: Any,
):
    """A Stable Diffusion pipeline from an LDM file; `unet=`, `scheduler=`, ... replace a component."""
    unknown = sorted(set(components) - set(cls.component_names))
    if unknown:
        raise TypeError(f"{cls.__name__}.from_single_file got unknown arguments {unknown}")
    f = read_single_file(path, use_ema)
    variant = f.variant(prediction_type)
    for component in ("unet", "vae", "text_encoder"):
        if component not in components:
            components[component] = load_component(MODELS[component], f, variant, torch_dtype)
    if "scheduler" not in components:
        config = dict(variant.scheduler)
        components["scheduler"] = SCHEDULERS[config["_class_name"]].from_config(config)
    components["tokenizer"] = _tokenizer(tokenizer, variant)
    return cls(**components)


# -- writing ---------------------------------------------------------------------------------------


def to_ldm_state_dict(unet: Any = None, vae: Any = None, text_encoder: Any = None) -> dict[str, torch.Tensor]:
    """minidiff models -> one flat LDM state dict. The text encoder is written as OpenCLIP (SD2)
    when it uses gelu, as OpenAI CLIP (SD1, quick_gelu) otherwise."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    if unet is not None:
        parts["unet"] = ldm_unet.FORMAT.export(unet.state_dict(), unet.config)
    if vae is not None:
        parts["vae"] = ldm_vae.FORMAT.export(vae.state_dict(), vae.config)
    if text_encoder is not None:
        openclip = text_encoder.config.hidden_act == "gelu"
        fmt = ldm_clip.OPENCLIP_FORMAT if openclip else ldm_clip.CLIP_FORMAT
        parts["openclip" if openclip else "clip"] = fmt.export(text_encoder.state_dict(), text_encoder.config)
    _check_reads_back(parts, unet=unet, vae=vae, text_encoder=text_encoder)
    return ldm.join(parts)


def _check_reads_back(parts: dict[str, dict[str, torch.Tensor]], **models: Any) -> None:
    """An LDM file carries no config: refuse to write a model whose weights would read back as a
    different architecture (a norm group count, head count or scaling factor SD does not use)."""
    for name, model in models.items():
        if model is None:
            continue
        _, raw, _ = inferred(parts, name, "the written file")
        config = type(model)._config_from_dict(raw)
        filled = from_variant(name, ldm.VARIANTS["sd1"])  # filled on reading, never compared
        diff = [
            f"{k}={model.config[k]!r} (would read back as {config[k]!r})"
            for k in model.config.keys()
            if k not in filled and model.config[k] != config[k]
        ]
        if diff:
            raise ConversionError(
                f"the {name} cannot be written as an LDM single file, which has no config: "
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
    """The three models of a diffusers Stable Diffusion folder, each in its files' dtype by default."""
    load_config(folder, None, "model_index.json", local_files_only=True)  # a pipeline folder, or a clear error
    models = {}
    for name, cls in MODELS.items():
        config = cls._config_from_dict(load_config(folder, name, cls.config_name, local_files_only=True))
        sd = read_state_dict(find_weight_files(folder, name, cls.weights_names, local_files_only=True))
        models[name] = cls.from_foreign_state_dict(
            config, sd, file_dtype(torch_dtype, sd), what=f"{cls.__name__} weights in {folder}/{name}"
        )
    return models
