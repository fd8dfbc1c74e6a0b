"""Original CompVis / LDM Stable Diffusion single files (SD 1.x / 2.x): load them, write them.

Loading, offline and from the weights alone (diffusers needs a config from the Hub for this):
  1. read the file safely (minidiff.loading.read_tensors: safetensors, or a .ckpt only through
     torch.load(weights_only=True)); unwrap a nested "state_dict";
  2. split it into UNet / VAE / text encoder (weights_conversion.ldm); the UNet is the EMA copy when
     the file has a complete one (`use_ema=None`), unless `use_ema=False`;
  3. infer each model's config from tensor shapes and key presence (weights_conversion.ldm_*);
  4. fill what the weights cannot tell from the variant (weights_conversion.ldm.VARIANTS), chosen as:
     SD 1.x (conv projections in the UNet, CLIP text encoder) -> epsilon, 512 px;
     SD 2.x (linear projections, OpenCLIP) -> v_prediction, 768 px, upcast attention (SD 2.1, the
       config diffusers picks for every SD2 file), except 9-channel inpainting UNets and .ckpt
       files saved at global_step 875000 (2.0-base), which are epsilon at 512 px;
     an explicit `prediction_type=` always wins (e.g. "epsilon" for SD 2.1-base);
  5. build each model on the meta device and adopt the renamed tensors (ModelMixin).
The tokenizer is the folder the user names (`tokenizer=`), else the CLIP BPE vocabulary shipped with
minidiff (minidiff/data, the same file for SD1 and SD2; SD2 pads with "!").

Writing: the three models' weights under their LDM names, in a .safetensors or a .ckpt (nested
under "state_dict", as LDM saves). EMA copies, the noise-schedule buffers and the tokenizer and
scheduler are not part of what is written: the file holds the weights a pipeline runs on.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weights_conversion import ConversionError, ldm, ldm_clip, ldm_unet, ldm_vae

from .loading import CheckpointError, find_weight_files, load_config, read_state_dict, read_tensors

PREDICTION_TYPES = ("epsilon", "v_prediction")
COMPONENT = {"UNet2DConditionModel": "unet", "AutoencoderKL": "vae", "CLIPTextModel": "text_encoder"}


@dataclass
class SingleFile:
    """A read LDM file: each model's state dict (LDM names, prefix stripped) and what else it says."""

    path: Path
    parts: dict[str, dict[str, torch.Tensor]]
    global_step: int | None = None

    @property
    def what(self) -> str:
        return str(self.path)

    def unet_config(self) -> dict[str, Any] | None:
        return ldm_unet.config_from_state_dict(self.parts["unet"], self.what) if "unet" in self.parts else None

    def variant(self, prediction_type: str | None = None) -> ldm.Variant:
        """The settings the weights cannot give; see the module docstring for the rule."""
        if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        unet = self.unet_config()
        sd2 = unet["use_linear_projection"] if unet is not None else "openclip" in self.parts
        if not sd2:
            name = "sd1"
        elif prediction_type is not None:
            name = "sd2-v" if prediction_type == "v_prediction" else "sd2-epsilon"
        elif (unet is not None and unet["in_channels"] == 9) or self.global_step == ldm.SD2_BASE_GLOBAL_STEP:
            name = "sd2-epsilon"
        else:
            name = "sd2-v"
        variant = ldm.VARIANTS[name]
        if prediction_type is not None and prediction_type != variant.prediction_type:  # e.g. an SD1 v-model
            variant = dataclasses.replace(
                variant,
                prediction_type=prediction_type,
                scheduler={**variant.scheduler, "prediction_type": prediction_type},
            )
        return variant


def read_single_file(path: str | os.PathLike, use_ema: bool | None = None) -> SingleFile:
    """Read and split an LDM file; every failure names the file."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a folder; from_single_file reads one .safetensors / .ckpt file "
            f"(use from_pretrained for a diffusers folder)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    try:
        flat, meta = ldm.unwrap(read_tensors(path), str(path))
        if ldm.standalone_vae(flat):
            flat = {ldm.VAE + k: v for k, v in flat.items()}
        parts = ldm.split(flat, str(path), use_ema)
    except ConversionError as e:
        raise CheckpointError(str(e)) from None
    step = meta.get("global_step")
    return SingleFile(path, parts, step if isinstance(step, int) else None)


def _dtype(torch_dtype: torch.dtype | str | None, sd: dict[str, torch.Tensor]) -> torch.dtype | None:
    """torch_dtype="auto": the file's own float dtype (float32 if it mixes several)."""
    if torch_dtype != "auto":
        return torch_dtype  # type: ignore[return-value]
    dtypes = {t.dtype for t in sd.values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _inferred(
    parts: dict[str, dict[str, torch.Tensor]], component: str, what: str
) -> tuple[Any, dict[str, Any], dict[str, torch.Tensor]]:
    """One model's weights_conversion format, the config its weights determine, and its state dict."""
    if component == "unet":
        sd = parts["unet"]
        return ldm_unet.FORMAT, ldm_unet.config_from_state_dict(sd, what), sd
    if component == "vae":
        sd = parts["vae"]
        return ldm_vae.FORMAT, ldm_vae.config_from_state_dict(sd, what), sd
    if "clip" in parts:
        sd = parts["clip"]
        return ldm_clip.CLIP_FORMAT, ldm_clip.clip_config(sd, what), sd
    sd = parts["openclip"]
    return ldm_clip.OPENCLIP_FORMAT, ldm_clip.openclip_config(sd, what), sd


def _from_variant(component: str, variant: ldm.Variant) -> dict[str, Any]:
    """The config keys the weights cannot give, filled from the variant (SD1 / SD2)."""
    if component == "unet":
        return {"sample_size": variant.image_size // 8, "upcast_attention": variant.upcast_attention}
    if component == "vae":
        return {"sample_size": variant.image_size}
    return {}


_NAMES = {"unet": "UNet", "vae": "VAE", "text_encoder": "text encoder"}


def _load(component: str, f: SingleFile, variant: ldm.Variant, torch_dtype: Any):
    from .autoencoder_kl import AutoencoderKL
    from .clip_text import CLIPTextModel
    from .unet_2d_condition import UNet2DConditionModel

    cls = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}[component]
    _require(f, component)
    fmt, raw, sd = _inferred(f.parts, component, f.what)
    config = fmt.config_from_dict({**raw, **_from_variant(component, variant)})
    what = f"the {_NAMES[component]} in {f.what}"
    return cls.from_foreign_state_dict(config, sd, _dtype(torch_dtype, sd), what=what, fmt=fmt)


def _require(f: SingleFile, component: str) -> None:
    present = {
        "unet": "unet" in f.parts,
        "vae": "vae" in f.parts,
        "text_encoder": "clip" in f.parts or "openclip" in f.parts,
    }[component]
    if not present:
        where = {"unet": ldm.UNET, "vae": ldm.VAE, "text_encoder": "cond_stage_model."}[component]
        raise CheckpointError(f"{f.path} holds no {component} ({where}* keys); found {sorted(f.parts)}")


def load_model(
    cls: type,
    path: str | os.PathLike,
    torch_dtype: Any = None,
    use_ema: bool | None = None,
    prediction_type: str | None = None,
):
    """One model (UNet2DConditionModel, AutoencoderKL or CLIPTextModel) out of an LDM file."""
    component = COMPONENT.get(cls.__name__)
    if component is None:
        raise TypeError(f"{cls.__name__} cannot be loaded from an LDM single file (only {sorted(COMPONENT)})")
    f = read_single_file(path, use_ema)
    return _load(component, f, f.variant(prediction_type), torch_dtype)


def _tokenizer(tokenizer: Any, variant: ldm.Variant):
    from .tokenizer import CLIPTokenizer

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
    from .schedulers import SCHEDULERS

    unknown = sorted(set(components) - set(cls.component_names))
    if unknown:
        raise TypeError(f"{cls.__name__}.from_single_file got unknown arguments {unknown}")
    f = read_single_file(path, use_ema)
    variant = f.variant(prediction_type)
    for component in ("unet", "vae", "text_encoder"):
        if component not in components:
            components[component] = _load(component, f, variant, torch_dtype)
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
        fmt, raw, _ = _inferred(parts, name, "the written file")
        config = fmt.config_from_dict(raw)
        from_variant = _from_variant(name, ldm.VARIANTS["sd1"])  # filled on reading, never compared
        diff = [
            f"{k}={model.config[k]!r} (would read back as {config[k]!r})"
            for k in model.config.keys()
            if k not in from_variant and model.config[k] != config[k]
        ]
        if diff:
            raise ConversionError(
                f"the {name} cannot be written as an LDM single file, which has no config: "
                f"its weights do not determine {', '.join(diff[:4])}"
            )


def save_single_file(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, half: bool = False) -> Path:
    """Write .safetensors, or a .ckpt nested under "state_dict" like LDM's own checkpoints."""
    path = Path(path)
    sd = {k: (v.half() if half and v.is_floating_point() else v).detach().contiguous() for k, v in state_dict.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path), metadata={"format": "pt"})
    elif path.suffix == ".ckpt":
        torch.save({"state_dict": sd}, path)
    else:
        raise ValueError(f"{path}: a single file ends in .safetensors or .ckpt")
    return path


def load_folder_models(folder: str | os.PathLike, torch_dtype: Any = "auto") -> dict[str, Any]:
    """The three models of a diffusers Stable Diffusion folder, each in its files' dtype by default."""
    from .autoencoder_kl import AutoencoderKL
    from .clip_text import CLIPTextModel
    from .unet_2d_condition import UNet2DConditionModel

    load_config(folder, None, "model_index.json", local_files_only=True)  # a pipeline folder, or a clear error
    models = {}
    for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel)):
        config = cls._format().config_from_dict(load_config(folder, name, cls.config_name, local_files_only=True))
        sd = read_state_dict(find_weight_files(folder, name, cls.weights_names, local_files_only=True))
        models[name] = cls.from_foreign_state_dict(
            config, sd, _dtype(torch_dtype, sd), what=f"{cls.__name__} weights in {folder}/{name}"
        )
    return models
