"""The layout of an original Stable Diffusion single file: CompVis / LDM (SD 1.x / 2.x) and
Stability's generative-models (SDXL base and refiner).

One flat state dict (in a `.ckpt`, possibly nested under "state_dict") holds the whole model:
  model.diffusion_model.*        the UNet                 (weights_conversion/ldm_unet.py)
  first_stage_model.*            the autoencoder          (weights_conversion/ldm_vae.py)
  model_ema.*                    an EMA copy of the UNet, each key without its dots:
                                 model.diffusion_model.out.0.weight -> model_ema.diffusion_modelout0weight
and a text side that tells the layout (LAYOUTS; text encoders in weights_conversion/ldm_clip.py):
  "sd"            cond_stage_model.transformer.*       SD1: transformers CLIP ViT-L    ("clip")
                  cond_stage_model.model.*             SD2: OpenCLIP ViT-H             ("openclip")
  "sdxl"          conditioner.embedders.0.transformer.*  transformers CLIP ViT-L       ("clip")
                  conditioner.embedders.1.model.*        OpenCLIP ViT-bigG             ("bigg")
  "sdxl-refiner"  conditioner.embedders.0.model.*        OpenCLIP ViT-bigG only        ("bigg")
(SDXL's embedders are a list, so the refiner's one text encoder sits at index 0.) Training state
minidiff does not need is dropped (TRAINING_KEYS). This module splits a file into the models'
state dicts (prefixes stripped) and joins them back, and holds what diffusers' from_single_file
takes from its default Hub configs when the weights cannot tell (VARIANTS).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .ldm_vae import LDM_SCALE_FACTOR
from .rules import ConversionError, _show

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer."  # SD 1.x
OPENCLIP = "cond_stage_model.model."  # SD 2.x
SDXL_CLIP = "conditioner.embedders.0.transformer."
SDXL_BIGG = "conditioner.embedders.1.model."
REFINER_BIGG = "conditioner.embedders.0.model."
EMA = "model_ema."
LAYOUTS: dict[str, dict[str, str]] = {
    "sd": {"unet": UNET, "vae": VAE, "clip": CLIP, "openclip": OPENCLIP},
    "sdxl": {"unet": UNET, "vae": VAE, "clip": SDXL_CLIP, "bigg": SDXL_BIGG},
    "sdxl-refiner": {"unet": UNET, "vae": VAE, "bigg": REFINER_BIGG},
}
LAYOUT_NAMES = {"sd": "SD 1.x / 2.x", "sdxl": "SDXL base", "sdxl-refiner": "SDXL refiner"}

# LatentDiffusion's noise-schedule buffers (sgm's discretised sigmas), EMA bookkeeping, CLIP's
# position ids, the VAE's training loss (in unpruned files): dropped on load, never written
TRAINING_KEYS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
    "lvlb_weights",
    "denoiser.sigmas",
    "model_ema.decay",
    "model_ema.num_updates",
    f"{CLIP}text_model.embeddings.position_ids",
    f"{SDXL_CLIP}text_model.embeddings.position_ids",
)
TRAINING_PREFIXES = (f"{VAE}loss.",)
# layouts minidiff does not read, named in the error
OTHER_LAYOUTS = {
    "control_model.": "ControlNet",
    "text_encoders.": "SD3",
    "down_blocks.": "diffusers (not LDM)",
    "double_blocks.": "Flux",
}


# diffusers' SD 1.5 and SD 2.1 scheduler configs (what from_single_file loads from their Hub repos)
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SD21_SCHEDULER = {**SD15_SCHEDULER, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}
# stable-diffusion-xl-base-1.0's and -refiner-1.0's (the same file)
SDXL_SCHEDULER = {
    **SD15_SCHEDULER,
    "_class_name": "EulerDiscreteScheduler",
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}
SDXL_SCALE_FACTOR = 0.13025  # the SDXL VAE's latent scaling (`scale_factor` of sgm's SDXL configs)


@dataclass(frozen=True)
class Variant:
    """What a file's weights cannot say: the training resolution, the prediction target, ..."""

    image_size: int
    prediction_type: str
    upcast_attention: bool
    scheduler: Mapping[str, Any]
    pad_token: str  # the tokenizer's; SDXL's tokenizer_2 (OpenCLIP's) pads with "!"
    vae_scaling_factor: float = LDM_SCALE_FACTOR
    pipeline: Mapping[str, Any] = field(default_factory=dict)  # model_index.json settings (SDXL)


# SD1 -> stable-diffusion-v1-5's configs; SD2 v-prediction -> stable-diffusion-2-1 (768 px, upcast
# attention), the config diffusers uses for every SD2 file; SD2 epsilon -> 2-base / 2-inpainting
# (512 px, no upcast). The SD2 tokenizer pads with "!", SD1's with <|endoftext|>. SDXL -> the
# base-1.0 / refiner-1.0 configs (1024 px; the refiner conditions on an aesthetic score and
# encodes an empty prompt instead of zeroing it).
VARIANTS = {
    "sd1": Variant(512, "epsilon", False, {**SD15_SCHEDULER, "prediction_type": "epsilon"}, "<|endoftext|>"),
    "sd2-v": Variant(768, "v_prediction", True, SD21_SCHEDULER, "!"),
    "sd2-epsilon": Variant(512, "epsilon", False, {**SD21_SCHEDULER, "prediction_type": "epsilon"}, "!"),
    "sdxl": Variant(
        1024,
        "epsilon",
        False,
        SDXL_SCHEDULER,
        "<|endoftext|>",
        SDXL_SCALE_FACTOR,
        {"force_zeros_for_empty_prompt": True, "requires_aesthetics_score": False},
    ),
    "sdxl-refiner": Variant(
        1024,
        "epsilon",
        False,
        SDXL_SCHEDULER,
        "<|endoftext|>",
        SDXL_SCALE_FACTOR,
        {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True},
    ),
}
# diffusers' legacy converter: an SD2 .ckpt saved at this global_step is 2.0-base (512 px, epsilon)
SD2_BASE_GLOBAL_STEP = 875000


def unwrap(obj: Any, what: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The flat tensor dict of a loaded file (a Lightning .ckpt nests it under "state_dict"), and
    the other top-level entries (e.g. "global_step")."""
    meta: dict[str, Any] = {}
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        meta.update({k: v for k, v in obj.items() if k != "state_dict"})
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConversionError(f"{what} does not hold a dict of tensors (found {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"{what}: entries that are not tensors: {_show([str(k) for k in bad])}")
    return obj, meta


def ema_key(key: str) -> str:
    """model.diffusion_model.a.0.b -> model_ema.diffusion_modela0b (LDM's LitEma naming)."""
    return EMA + key[len("model.") :].replace(".", "")


def _take_ema(sd: Mapping[str, torch.Tensor], use_ema: bool | None, what: str) -> tuple[dict[str, torch.Tensor], bool]:
    """The UNet weights: the EMA copy when asked, or by default when the file has a complete one."""
    names = [k for k in sd if k.startswith(UNET)]
    ema = {k for k in sd if k.startswith(EMA)} - set(TRAINING_KEYS)
    if use_ema is False or (use_ema is None and not ema):
        return {k: sd[k] for k in names}, False
    if not ema:
        raise ConversionError(f"{what}: use_ema=True but the file has no EMA weights ({EMA}*)")
    missing = [ema_key(k) for k in names if ema_key(k) not in ema]
    extra = ema - {ema_key(k) for k in names}
    if missing or extra:
        detail = "; ".join(
            p for p in (missing and f"missing {_show(missing)}", extra and f"unmatched {_show(sorted(extra))}") if p
        )
        raise ConversionError(
            f"{what}: the EMA copy does not match the UNet ({detail}); pass use_ema=False to use the raw weights"
        )
    return {k: sd[ema_key(k)] for k in names}, True


def layout_of(keys: Any, what: str) -> str:
    """ "sd", "sdxl" or "sdxl-refiner", from the text encoders' prefixes (a file without text
    encoders reads as "sd": its UNet and VAE sit under the same prefixes in every layout)."""
    keys = list(keys)
    sdxl = any(k.startswith("conditioner.embedders.") for k in keys)
    if sdxl and any(k.startswith("cond_stage_model.") for k in keys):
        raise ConversionError(
            f"{what} mixes the SD 1.x / 2.x text encoder (cond_stage_model.*) with SDXL's (conditioner.embedders.*)"
        )
    if not sdxl:
        return "sd"
    return "sdxl-refiner" if any(k.startswith(REFINER_BIGG) for k in keys) else "sdxl"


def split(
    sd: Mapping[str, torch.Tensor], what: str, use_ema: bool | None = None
) -> tuple[str, dict[str, dict[str, torch.Tensor]]]:
    """The layout, and {"unet"|"vae"|"clip"|"openclip"|"bigg": its state dict without the prefix};
    every key is placed or is known training state, else the error lists the strangers."""
    for prefix, name in OTHER_LAYOUTS.items():
        if any(k.startswith(prefix) for k in sd):
            raise ConversionError(
                f"{what} is a {name} checkpoint ({prefix}* keys); minidiff reads SD 1.x / 2.x and SDXL files"
            )
    layout = layout_of(sd, what)
    prefixes = LAYOUTS[layout]
    unet, _ = _take_ema(sd, use_ema, what)
    parts: dict[str, dict[str, torch.Tensor]] = {"unet": {k[len(UNET) :]: v for k, v in unet.items()}}
    for name, prefix in prefixes.items():
        if name != "unet":
            part = {
                k[len(prefix) :]: v
                for k, v in sd.items()
                if k.startswith(prefix) and k not in TRAINING_KEYS and not k.startswith(TRAINING_PREFIXES)
            }
            if part:
                parts[name] = part
    if not parts["unet"]:
        del parts["unet"]
    if "clip" in parts and "openclip" in parts:
        raise ConversionError(f"{what} holds both a CLIP ({CLIP}*) and an OpenCLIP ({OPENCLIP}*) text encoder")
    known = tuple(prefixes.values()) + TRAINING_PREFIXES + (EMA,)
    strangers = [k for k in sd if not k.startswith(known) and k not in TRAINING_KEYS]
    if strangers:
        where = ", ".join(f"{p}*" for p in prefixes.values())
        raise ConversionError(f"{what}: keys outside the {LAYOUT_NAMES[layout]} layout ({where}): {_show(strangers)}")
    if not parts:
        raise ConversionError(f"{what} holds no Stable Diffusion weights")
    return layout, parts


def parts_layout(parts: Mapping[str, Any]) -> str:
    """The layout a set of parts is written in: SDXL's when it has the bigG encoder (the base's when
    CLIP ViT-L comes with it, else the refiner's)."""
    if "bigg" in parts and "openclip" in parts:
        raise ConversionError("an SDXL (OpenCLIP bigG) and an SD2 (OpenCLIP ViT-H) text encoder cannot share a file")
    return "sd" if "bigg" not in parts else "sdxl" if "clip" in parts else "sdxl-refiner"


def join(parts: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The inverse of split (without EMA or training state): one flat state dict, in the layout
    its text encoders call for (SDXL's bigG sits at index 1 after CLIP ViT-L, else at index 0)."""
    prefixes = LAYOUTS[parts_layout(parts)]
    return {prefixes[name] + k: v for name, part in parts.items() for k, v in part.items()}


def standalone_vae(sd: Mapping[str, torch.Tensor]) -> bool:
    """A VAE-only file (e.g. vae-ft-mse-840000-ema-pruned) keeps the LDM names without the prefix."""
    return "encoder.conv_in.weight" in sd and "decoder.conv_out.weight" in sd
