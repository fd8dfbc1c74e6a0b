"""Original Stable Diffusion single files (CompVis / LDM SD 1.x / 2.x, SDXL base and refiner): read
one, load a model from it.

Offline and from the weights alone (diffusers needs a config from the Hub for this):
  1. read the file safely (minidiff.loading.read_tensors: safetensors, or a .ckpt only through
     torch.load(weights_only=True)); unwrap a nested "state_dict";
  2. split it into UNet / VAE / text encoder(s) (weights_conversion.ldm, which also tells the layout:
     SD 1.x / 2.x, SDXL base or SDXL refiner); the UNet is the EMA copy when the file has a complete
     one (`use_ema=None`), unless `use_ema=False`;
  3. infer each model's config from tensor shapes and key presence (weights_conversion.ldm_*);
  4. fill what the weights cannot tell from the variant (weights_conversion.ldm.VARIANTS), chosen as:
     SD 1.x (conv projections in the UNet, CLIP text encoder) -> epsilon, 512 px;
     SD 2.x (linear projections, OpenCLIP) -> v_prediction, 768 px, upcast attention (SD 2.1, the
       config diffusers picks for every SD2 file), except 9-channel inpainting UNets and .ckpt
       files saved at global_step 875000 (2.0-base), which are epsilon at 512 px;
     SDXL (conditioner.embedders.*, or a UNet with label_emb) -> base-1.0 or refiner-1.0: epsilon,
       1024 px, EulerDiscrete, VAE scaling 0.13025; the refiner layout (bigG alone at index 0)
       also sets the pipeline's requires_aesthetics_score and force_zeros_for_empty_prompt=False;
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
# the diffusers / transformers class a component is stored as -> its name in an SD / SDXL pipeline
COMPONENT = {
    "UNet2DConditionModel": "unet",
    "AutoencoderKL": "vae",
    "CLIPTextModel": "text_encoder",
    "CLIPTextModelWithProjection": "text_encoder_2",
}
_NAMES = {"unet": "UNet", "vae": "VAE", "text_encoder": "text encoder", "text_encoder_2": "second text encoder"}
# the file's parts (weights_conversion.ldm) each component can come from
PARTS = {"unet": ("unet",), "vae": ("vae",), "text_encoder": ("clip", "openclip"), "text_encoder_2": ("bigg",)}
# the models a pipeline file of each family holds (the SDXL refiner has no CLIP ViT-L)
FAMILY_COMPONENTS = {
    "sd": ("unet", "vae", "text_encoder"),
    "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2"),
    "sdxl-refiner": ("unet", "vae", "text_encoder_2"),
}


@dataclass
class SingleFile:
    """A read LDM file: each model's state dict (LDM names, prefix stripped) and what else it says."""

    path: Path
    parts: dict[str, dict[str, torch.Tensor]]
    layout: str = "sd"  # weights_conversion.ldm.LAYOUTS
    global_step: int | None = None

    @property
    def what(self) -> str:
        return str(self.path)

    @property
    def components(self) -> list[str]:
        """The pipeline components the file holds ("unet", "vae", "text_encoder", "text_encoder_2")."""
        return [c for c, parts in PARTS.items() if any(p in self.parts for p in parts)]

    @property
    def family(self) -> str:
        """ "sd" (1.x / 2.x), "sdxl" or "sdxl-refiner"; a file without text encoders is SDXL if its
        UNet has the added-conditioning MLP (and then read as a base model)."""
        if self.layout == "sd" and "label_emb.0.0.weight" in self.parts.get("unet", {}):
            return "sdxl"
        return self.layout

    def unet_config(self) -> dict[str, Any] | None:
        return ldm_unet.config_from_state_dict(self.parts["unet"], self.what) if "unet" in self.parts else None

    def variant(self, prediction_type: str | None = None) -> ldm.Variant:
        """The settings the weights cannot give; see the module docstring for the rule."""
        if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if self.family != "sd":
            return _with_prediction(ldm.VARIANTS[self.family], prediction_type)
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
        return _with_prediction(ldm.VARIANTS[name], prediction_type)


def _with_prediction(variant: ldm.Variant, prediction_type: str | None) -> ldm.Variant:
    """An explicit prediction_type that differs from the variant's (e.g. an SD1 or SDXL v-model)."""
    if prediction_type is None or prediction_type == variant.prediction_type:
        return variant
    return dataclasses.replace(
        variant, prediction_type=prediction_type, scheduler={**variant.scheduler, "prediction_type": prediction_type}
    )


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
        layout, parts = ldm.split(flat, str(path), use_ema)
    except ConversionError as e:
        raise CheckpointError(str(e)) from None
    step = meta.get("global_step")
    return SingleFile(path, parts, layout, step if isinstance(step, int) else None)


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
    if component == "text_encoder_2":
        sd = parts["bigg"]
        return ldm_clip.BIGG_FORMAT, ldm_clip.bigg_config(sd, what), sd
    if "clip" in parts:
        sd = parts["clip"]
        return ldm_clip.CLIP_FORMAT, ldm_clip.clip_config(sd, what), sd
    sd = parts["openclip"]
    return ldm_clip.OPENCLIP_FORMAT, ldm_clip.openclip_config(sd, what), sd


def from_variant(component: str, variant: ldm.Variant) -> dict[str, Any]:
    """The config keys the weights cannot give, filled from the variant (SD1 / SD2 / SDXL)."""
    if component == "unet":
        return {"sample_size": variant.image_size // 8, "upcast_attention": variant.upcast_attention}
    if component == "vae":
        return {"sample_size": variant.image_size, "scaling_factor": variant.vae_scaling_factor}
    return {}


def component_of(cls: type) -> str:
    """The pipeline component ("unet", "vae", "text_encoder", "text_encoder_2") a model class is in a file."""
    component = COMPONENT.get(cls.__name__)
    if component is None:
        raise TypeError(f"{cls.__name__} cannot be loaded from a single file (only {sorted(COMPONENT)})")
    return component


def _where(layout: str, component: str) -> str:
    """The key prefix a component would have in a file of this layout."""
    if component == "text_encoder":
        return "cond_stage_model." if layout == "sd" else ldm.SDXL_CLIP
    if component == "text_encoder_2":
        return ldm.REFINER_BIGG if layout == "sdxl-refiner" else ldm.SDXL_BIGG
    return ldm.LAYOUTS[layout][component]


def _require(f: SingleFile, component: str) -> None:
    """A clear error when the file lacks a component (e.g. an SDXL refiner's CLIP ViT-L)."""
    if component not in f.components:
        raise CheckpointError(
            f"{f.path} holds no {component} ({_where(f.layout, component)}* keys); it holds {f.components}"
        )


def load_component(cls: Any, f: SingleFile, variant: ldm.Variant, torch_dtype: Any = None):
    """The model of class `cls` (a ModelMixin: UNet2DConditionModel, AutoencoderKL, CLIPTextModel or
    CLIPTextModelWithProjection) out of a read single file."""
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
    """One model (UNet2DConditionModel, AutoencoderKL, CLIPTextModel or CLIPTextModelWithProjection)
    out of a single file."""
    component_of(cls)  # refuse other classes before reading the file
    f = read_single_file(path, use_ema)
    return load_component(cls, f, f.variant(prediction_type), torch_dtype)
