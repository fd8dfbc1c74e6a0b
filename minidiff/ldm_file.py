"""Original CompVis / LDM Stable Diffusion single files (SD 1.x / 2.x): read one, load a model from it.

Offline and from the weights alone (diffusers needs a config from the Hub for this):
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
  5. build the model class it is handed on the meta device and adopt the renamed tensors
     (ModelMixin.from_foreign_state_dict).
This module sits below the model classes: it is handed a class and never imports one, so that
`UNet2DConditionModel.from_single_file` can use it. Whole pipelines, and writing single files, are
minidiff.single_file's.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weights_conversion import ConversionError, ModelFormat, ldm, ldm_clip, ldm_unet, ldm_vae

from .loading import CheckpointError, read_tensors

PREDICTION_TYPES = ("epsilon", "v_prediction")
# the diffusers / transformers class a component is stored as -> its name in an SD pipeline
COMPONENT = {"UNet2DConditionModel": "unet", "AutoencoderKL": "vae", "CLIPTextModel": "text_encoder"}
_NAMES = {"unet": "UNet", "vae": "VAE", "text_encoder": "text encoder"}


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


def file_dtype(torch_dtype: torch.dtype | str | None, sd: dict[str, torch.Tensor]) -> torch.dtype | None:
    """torch_dtype="auto": the file's own float dtype (float32 if it mixes several)."""
    if torch_dtype != "auto":
        return torch_dtype  # type: ignore[return-value]
    dtypes = {t.dtype for t in sd.values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def inferred(
    parts: dict[str, dict[str, torch.Tensor]], component: str, what: str
) -> tuple[ModelFormat, dict[str, Any], dict[str, torch.Tensor]]:
    """One model's LDM format, the raw config its weights determine, and its state dict."""
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


def from_variant(component: str, variant: ldm.Variant) -> dict[str, Any]:
    """The config keys the weights cannot give, filled from the variant (SD1 / SD2)."""
    if component == "unet":
        return {"sample_size": variant.image_size // 8, "upcast_attention": variant.upcast_attention}
    if component == "vae":
        return {"sample_size": variant.image_size}
    return {}


def component_of(cls: type) -> str:
    """The pipeline component ("unet", "vae", "text_encoder") a model class is in an LDM file."""
    component = COMPONENT.get(cls.__name__)
    if component is None:
        raise TypeError(f"{cls.__name__} cannot be loaded from an LDM single file (only {sorted(COMPONENT)})")
    return component


def _require(f: SingleFile, component: str) -> None:
    present = {
        "unet": "unet" in f.parts,
        "vae": "vae" in f.parts,
        "text_encoder": "clip" in f.parts or "openclip" in f.parts,
    }[component]
    if not present:
        where = {"unet": ldm.UNET, "vae": ldm.VAE, "text_encoder": "cond_stage_model."}[component]
        raise CheckpointError(f"{f.path} holds no {component} ({where}* keys); found {sorted(f.parts)}")


def load_component(cls: Any, f: SingleFile, variant: ldm.Variant, torch_dtype: Any = None):
    """The model of class `cls` (a ModelMixin: UNet2DConditionModel, AutoencoderKL or CLIPTextModel)
    out of a read LDM file."""
    component = component_of(cls)
    _require(f, component)
    fmt, raw, sd = inferred(f.parts, component, f.what)
    config = cls._config_from_dict({**raw, **from_variant(component, variant)})
    what = f"the {_NAMES[component]} in {f.what}"
    return cls.from_foreign_state_dict(config, sd, file_dtype(torch_dtype, sd), what=what, fmt=fmt)


def load_model(
    cls: Any,
    path: str | os.PathLike,
    torch_dtype: Any = None,
    use_ema: bool | None = None,
    prediction_type: str | None = None,
):
    """One model (UNet2DConditionModel, AutoencoderKL or CLIPTextModel) out of an LDM file."""
    component_of(cls)  # refuse other classes before reading the file
    f = read_single_file(path, use_ema)
    return load_component(cls, f, f.variant(prediction_type), torch_dtype)
