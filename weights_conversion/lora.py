"""LoRA and textual-inversion files: which format a file is, and its key names -> minidiff's layers.

LoRA formats, detected from the keys (every key must be understood, or nothing loads):
  diffusers / PEFT       unet.{module}.lora_A.weight / lora_B.weight, text_encoder.…, text_encoder_2.…,
                         optional {module}.alpha; alphas may also come from the safetensors header
                         (`lora_adapter_metadata`: r, lora_alpha, alpha_pattern, as diffusers saves them)
  diffusers, older       {module}.lora.down.weight / .lora.up.weight, {module}.lora_linear_layer.down/up
  attention processors   {attn}.processor.to_q_lora.down.weight / .up.weight (to_k, to_v, to_out);
                         text encoders: {self_attn}.to_q_lora.down.weight; without a prefix: the UNet
  kohya-ss / A1111       lora_unet_{path}.lora_down.weight / .lora_up.weight / .alpha, lora_te_ (SD 1/2),
                         lora_te1_ / lora_te2_ (SDXL): {path} is a module path with '_' for '.', in
                         diffusers' names or the original LDM ones (lora_unet_input_blocks_4_1_proj_in);
                         LoCon adds conv layers (down: a conv with the layer's kernel, up: 1x1)
Module paths are those of the foreign model (diffusers UNet, transformers CLIP, LDM UNet); they are
mapped to minidiff's by the same rename rules the model converters use, so a LoRA on a module
the model does not have is refused by name. LoHa, LoKr, DoRA and LoRA biases are refused.

Textual inversion: A1111 .pt ({"string_to_param": {"*": (n, d)}, "name": token}), A1111 and
diffusers single-tensor files ({token: (d,) or (n, d)}, e.g. {"emb_params": …}), SDXL
({"clip_l": (n, 768), "clip_g": (n, 1280)}).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from . import clip_text, ldm_unet, unet_2d_condition
from .rules import ConversionError, Rule, export

DIFFUSERS, OLD_DIFFUSERS, ATTN_PROCS, KOHYA = "diffusers/PEFT", "diffusers (old)", "attention processors", "kohya-ss"
COMPONENTS = {"unet": "unet", "text_encoder": "clip", "text_encoder_2": "clip"}
KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors header entry with the LoraConfig values
# (suffix, part) of one tensor of a diffusers-family key
DIFFUSERS_TAILS = (
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".alpha", "alpha"),
)
KOHYA_TAILS = ((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha"))
# attention-processor LoRA: {attn}.processor.to_q_lora.down.weight -> {attn}.to_q (UNet) / q_proj (CLIP)
PROCESSOR = re.compile(
    r"^(?P<attn>.*?)(\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight$"
)
PROCESSOR_TARGET = {
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "clip": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}
# SDXL's LDM names for the added-conditioning MLP, which ldm_unet (SD 1/2) does not have
LDM_EXTRA = (Rule("label_emb.0.0.", "add_embedding.linear_1."), Rule("label_emb.0.2.", "add_embedding.linear_2."))
UNSUPPORTED_HINT = "LoHa, LoKr, DoRA, LoRA biases and Tucker-decomposed LoCon are not supported"


@dataclass(frozen=True)
class Target:
    """One model that takes adapters: its kind ("unet" or "clip"), config and Linear/Conv2d layers."""

    kind: str
    config: Any
    layers: Mapping[str, torch.Size]  # minidiff layer name -> weight shape


@dataclass
class LoRAWeights:
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None  # None: alpha = rank
    key: str  # the file's down key, for messages


def _foreign_names(layers: Mapping[str, torch.Size], rules: list[Rule]) -> dict[str, str]:
    """foreign module path -> minidiff layer name, for every layer the rules can name."""
    out = {}
    empty = torch.empty(0)
    for name in layers:
        try:
            (key,) = export({f"{name}.weight": empty}, rules)
        except ConversionError:
            continue
        out[key.removesuffix(".weight")] = name
    return out


def module_tables(target: Target) -> tuple[dict[str, str], dict[str, str]]:
    """(dotted foreign names, kohya underscore names) -> minidiff layer names, for one model."""
    if target.kind == "unet":
        dotted = _foreign_names(target.layers, unet_2d_condition.rules(target.config))
        ldm = _foreign_names(target.layers, [*ldm_unet.rules(target.config), *LDM_EXTRA])
    else:
        # transformers 4 names (text_model.encoder.…, every file on the Hub) and transformers 5's (encoder.…)
        # SDXL's second encoder (CLIPTextModelWithProjection) adds text_projection, a LoRA target too
        rules = [*clip_text.rules(target.config), Rule("text_projection.", "text_projection.", legacy=True)]
        bare = [Rule(r.src, r.dst) for r in rules if r.legacy]
        dotted = {
            **_foreign_names(target.layers, [r for r in rules if not r.legacy]),
            **_foreign_names(target.layers, bare),
        }
        ldm = {}
    kohya: dict[str, str] = {}
    for foreign, name in [*dotted.items(), *ldm.items()]:
        kohya.setdefault(foreign.replace(".", "_"), name)
    return dotted, kohya


def detect_format(state_dict: Mapping[str, Any]) -> str:
    keys = list(state_dict)
    if not keys:
        raise ConversionError("LoRA: the file holds no tensors")
    if all(k.startswith(tuple(KOHYA_PREFIXES)) for k in keys):
        return KOHYA
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return DIFFUSERS
    if any(PROCESSOR.match(k) for k in keys):
        return ATTN_PROCS
    if any(".lora.down." in k or ".lora_linear_layer." in k for k in keys):
        return OLD_DIFFUSERS
    raise ConversionError(
        f"LoRA: unknown file format (keys such as {keys[:3]}); expected diffusers/PEFT (lora_A/lora_B), "
        "diffusers attention processors (to_q_lora.down) or kohya-ss (lora_unet_…lora_down)"
    )


def _split_key(key: str, fmt: str) -> tuple[str, str, str]:
    """(component, foreign module path, part) of one key, part in down / up / alpha."""
    if fmt == KOHYA:
        prefix = next(p for p in KOHYA_PREFIXES if key.startswith(p))
        component, rest = KOHYA_PREFIXES[prefix], key[len(prefix) :]
        tails = KOHYA_TAILS
    else:
        component, _, rest = key.partition(".")
        if component not in COMPONENTS:  # the old save_attn_procs files hold the UNet alone, unprefixed
            component, rest = "unet", key
        tails = DIFFUSERS_TAILS
        m = PROCESSOR.match(rest)
        if m is not None:
            proj = PROCESSOR_TARGET[COMPONENTS[component]][m["proj"]]
            return component, f"{m['attn']}.{proj}", m["part"]
    for tail, part in tails:
        if rest.endswith(tail):
            return component, rest[: -len(tail)], part
    raise ConversionError(f"LoRA ({fmt}): key {key!r} is not a LoRA down/up/alpha tensor ({UNSUPPORTED_HINT})")


def _metadata_alphas(metadata: Mapping[str, str] | None, component: str) -> tuple[float | None, dict[str, float]]:
    """(lora_alpha, alpha_pattern) of `component` from diffusers' safetensors header, if any."""
    if not metadata or METADATA_KEY not in metadata:
        return None, {}
    config = {
        k.removeprefix(f"{component}."): v
        for k, v in json.loads(metadata[METADATA_KEY]).items()
        if k.startswith(f"{component}.")
    }
    for flag in ("use_dora", "use_rslora"):
        if config.get(flag):
            raise ConversionError(f"LoRA ({DIFFUSERS}): {component} uses {flag}, which is not supported")
    return config.get("lora_alpha"), dict(config.get("alpha_pattern") or {})


def _pattern_alpha(module: str, default: float | None, patterns: Mapping[str, float]) -> float | None:
    # PEFT's rule: a pattern matches a module path that ends with it at a '.' boundary
    for pattern, alpha in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return alpha
    return default


def convert_lora(
    state_dict: Mapping[str, torch.Tensor], targets: Mapping[str, Target], metadata: Mapping[str, str] | None = None
) -> tuple[str, dict[str, dict[str, LoRAWeights]]]:
    """(format, {component: {minidiff layer: weights}}) for a LoRA state dict; every key must map."""
    fmt = detect_format(state_dict)
    groups: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in state_dict.items():
        component, module, part = _split_key(key, fmt)
        if part in groups.setdefault((component, module), {}):
            raise ConversionError(
                f"LoRA ({fmt}): {key!r} and {groups[component, module][part][0]!r} are the same tensor"
            )
        groups[component, module][part] = (key, tensor)

    tables = {c: module_tables(t) for c, t in targets.items()}
    header = {c: _metadata_alphas(metadata, c) for c in targets}
    out: dict[str, dict[str, LoRAWeights]] = {}
    for (component, module), parts in groups.items():
        key = next(iter(parts.values()))[0]
        if component not in targets:
            raise ConversionError(f"LoRA ({fmt}): {key!r} is for a {component}, which this pipeline does not have")
        dotted, kohya = tables[component]
        name = (kohya if fmt == KOHYA else dotted).get(module)
        if name is None:
            raise ConversionError(
                f"LoRA ({fmt}): key {key!r} names a module {module!r} that the {component} does not have"
            )
        if "down" not in parts or "up" not in parts:
            raise ConversionError(f"LoRA ({fmt}): {key!r} has no matching {'up' if 'down' in parts else 'down'} weight")
        alpha = float(parts["alpha"][1]) if "alpha" in parts else None
        if alpha is None and fmt == DIFFUSERS:
            alpha = _pattern_alpha(module, *header[component])
        down, up = parts["down"][1], parts["up"][1]
        out.setdefault(component, {})[name] = LoRAWeights(
            *_shaped(down, up, targets[component].layers[name], parts["down"][0], fmt), alpha, parts["down"][0]
        )
    return fmt, out


def _shaped(
    down: torch.Tensor, up: torch.Tensor, weight: torch.Size, key: str, fmt: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """down/up in the layer's layout: 2-d for a Linear, 4-d for a conv (a 1x1 conv may come as 2-d)."""
    rank = down.shape[0]
    if len(weight) == 4:
        down = down.reshape(*down.shape, 1, 1) if down.ndim == 2 else down
        up = up.reshape(*up.shape, 1, 1) if up.ndim == 2 else up
        want_down, want_up = (rank, *weight[1:]), (weight[0], rank, 1, 1)
    else:
        down = down.flatten(1) if down.ndim == 4 and down.shape[2:] == (1, 1) else down
        up = up.flatten(1) if up.ndim == 4 and up.shape[2:] == (1, 1) else up
        want_down, want_up = (rank, weight[1]), (weight[0], rank)
    if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
        raise ConversionError(
            f"LoRA ({fmt}): {key!r}: down {tuple(down.shape)} / up {tuple(up.shape)} do not fit a layer of weight "
            f"{tuple(weight)} (want {want_down} / {want_up})"
        )
    return down, up


# ------------------------------------------------------------------ textual inversion


def embeddings_from_file(data: Any, token: str | None, encoder_key: str | None = None) -> tuple[str, torch.Tensor]:
    """(token, vectors (n, d)) of one textual-inversion file or tensor, diffusers' rules.

    `encoder_key`: for an SDXL file ({"clip_l", "clip_g"}), which of the two to take.
    """
    if isinstance(data, torch.Tensor):
        if token is None:
            raise ValueError("textual inversion: a bare tensor needs its token (token=...)")
        found, vectors = token, data
    elif not isinstance(data, Mapping):
        raise ValueError(f"textual inversion: expected a dict of tensors or a tensor, got {type(data).__name__}")
    elif encoder_key is not None and {"clip_l", "clip_g"} <= set(data):
        if token is None:
            raise ValueError("textual inversion: an SDXL embedding (clip_l / clip_g) needs its token (token=...)")
        found, vectors = token, data[encoder_key]
    elif "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        if not isinstance(params, Mapping) or "*" not in params:
            raise ValueError("textual inversion (A1111): string_to_param has no '*' entry")
        found, vectors = data.get("name"), params["*"]
    elif len(data) == 1:  # diffusers learned_embeds ({token: vector}) and A1111 .safetensors ({"emb_params": …})
        found, vectors = next(iter(data.items()))
    elif {"clip_l", "clip_g"} <= set(data):
        raise ValueError(
            "textual inversion: an SDXL embedding (clip_l / clip_g): load each part into its own encoder "
            "(pipe.load_textual_inversion(sd['clip_l'], token=..., text_encoder=..., tokenizer=...))"
        )
    else:
        raise ValueError(
            f"textual inversion: unknown embedding file (keys {sorted(data)[:5]}): expected one "
            "{token: vector} entry, A1111's string_to_param or SDXL's clip_l / clip_g"
        )
    if not isinstance(vectors, torch.Tensor) or vectors.ndim not in (1, 2) or not vectors.is_floating_point():
        raise ValueError(f"textual inversion: the embedding must be a float tensor (d,) or (n, d), got {vectors!r:.80}")
    return token if token is not None else str(found), vectors.reshape(-1, vectors.shape[-1])
