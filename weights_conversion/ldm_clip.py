"""The text encoders of SD 1.x / 2.x / XL single files <-> minidiff's CLIPTextModel(WithProjection).

SD 1.x (`cond_stage_model.transformer.*`) and SDXL's first encoder (`conditioner.embedders.0.transformer.*`),
prefixes stripped, hold a transformers CLIPTextModel as it is (`text_model.embeddings…`): the
transformers converter (clip_text.FORMAT) applies unchanged.

SD 2.x (`cond_stage_model.model.*`, prefix stripped) holds OpenCLIP ViT-H's text tower:
  token_embedding.                           ->  token_embedding.
  positional_embedding                       ->  position_embedding.weight
  transformer.resblocks.{i}.ln_1. / ln_2.    ->  layers.{i}.layer_norm1. / layer_norm2.
  transformer.resblocks.{i}.attn.in_proj_{weight,bias}  ->  layers.{i}.self_attn.to_q / to_k / to_v
                                                 (q, k, v stacked along dim 0: split on load, stacked on save)
  transformer.resblocks.{i}.attn.out_proj.   ->  layers.{i}.self_attn.to_out.
  transformer.resblocks.{i}.mlp.c_fc. / c_proj.  ->  layers.{i}.mlp.fc1. / fc2.
  ln_final.                                  ->  final_layer_norm.
Dropped on load: the last resblock (SD2 conditions on the penultimate layer, so the text model has
one layer fewer than the file), `text_projection` (stored transposed; only CLIP's contrastive head
uses it) and `logit_scale`. Written on save so the file has OpenCLIP's layout: the last resblock as
zeros, which makes it an exact identity (every branch adds 0), `text_projection` as the identity
and `logit_scale` at OpenCLIP's initial log(1/0.07). None of the three changes what SD2 computes.

SDXL's OpenCLIP ViT-bigG (`conditioner.embedders.1.model.*`, the refiner's `conditioner.embedders.0.model.*`)
has the same names and becomes a CLIPTextModelWithProjection with EVERY layer (SDXL reads the
penultimate hidden state itself, and the pooled output runs through the last layer):
  text_projection                            ->  text_projection.weight   (stored (width, proj): transposed)
`logit_scale` is dropped on load and written as log(1/0.07) on save, as for SD2.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from . import ModelFormat
from .clip_text import FORMAT as TRANSFORMERS_FORMAT
from .clip_text import FORMAT_WITH_PROJECTION
from .rules import ConversionError, Rule

OPENCLIP_HEAD_CHANNELS = 64  # ViT-L/14 (SD1) and ViT-H/14 (SD2) text towers both use 64-wide heads
QKV = ("q", "k", "v")
# the values of the diffusers/transformers configs of SD 1.5 and SD 2.1's text encoders that
# shapes cannot give (the eos id 2 predates transformers' fix and selects argmax pooling)
COMMON = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "layer_norm_eps": 1e-5}


def openclip_rules(config: Any = None) -> list[Rule]:
    block, layer = "transformer.resblocks.{i}.", "layers.{i}."
    return [
        Rule("token_embedding.", "token_embedding."),
        Rule("positional_embedding", "position_embedding.weight"),
        Rule(f"{block}ln_1.", f"{layer}layer_norm1."),
        Rule(f"{block}ln_2.", f"{layer}layer_norm2."),
        # attn.q / attn.k / attn.v: the thirds of in_proj_*, named by split_in_proj
        *(Rule(f"{block}attn.{x}.", f"{layer}self_attn.to_{x}.") for x in QKV),
        Rule(f"{block}attn.out_proj.", f"{layer}self_attn.to_out."),
        Rule(f"{block}mlp.c_fc.", f"{layer}mlp.fc1."),
        Rule(f"{block}mlp.c_proj.", f"{layer}mlp.fc2."),
        Rule("ln_final.", "final_layer_norm."),
    ]


def bigg_rules(config: Any = None) -> list[Rule]:
    return [
        *openclip_rules(config),
        Rule("text_projection", "text_projection.weight", transform=_transpose, inverse=_transpose),
    ]


def _transpose(t: torch.Tensor) -> torch.Tensor:
    """OpenCLIP applies `x @ text_projection`; a Linear weight is its transpose."""
    return t.T.contiguous()


def split_in_proj(sd: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """Drop SD2's unused last layer (a bigG config keeps every layer); split each fused in_proj into
    attn.q / attn.k / attn.v."""
    unused = f"transformer.resblocks.{config.num_hidden_layers}."
    out = {}
    for key, tensor in sd.items():
        if key.startswith(unused):
            continue
        base, fused, leaf = key.rpartition(".in_proj_")
        if fused and leaf in ("weight", "bias"):
            for x, part in zip(QKV, tensor.chunk(3, dim=0)):
                out[f"{base}.{x}.{leaf}"] = part.clone()  # views of one storage could not be saved apart
        else:
            out[key] = tensor
    return out


def _fuse(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """attn.q / attn.k / attn.v -> attn.in_proj_* (stacked along dim 0)."""
    out = {}
    for key, tensor in sd.items():
        base, _, rest = key.rpartition(".attn.")
        x, _, leaf = rest.partition(".")
        if base and x in QKV:
            if x == "q":
                out[f"{base}.attn.in_proj_{leaf}"] = torch.cat([sd[f"{base}.attn.{y}.{leaf}"] for y in QKV])
        else:
            out[key] = tensor
    return out


def _logit_scale(like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(math.log(1 / 0.07), dtype=like.dtype)


def fuse_in_proj(sd: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """The inverse of split_in_proj, plus the unused last layer, text_projection and logit_scale."""
    out = _fuse(sd)
    n, width = config.num_hidden_layers, config.hidden_size
    like = sd["ln_final.weight"]
    for key in [k for k in out if k.startswith("transformer.resblocks.0.")]:
        out[key.replace(".0.", f".{n}.", 1)] = torch.zeros_like(out[key])
    out["text_projection"] = torch.eye(width, dtype=like.dtype)
    out["logit_scale"] = _logit_scale(like)
    return out


def fuse_bigg(sd: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """SDXL's bigG: the fused in_proj and OpenCLIP's logit_scale (every layer and the projection are real)."""
    out = _fuse(sd)
    out["logit_scale"] = _logit_scale(sd["ln_final.weight"])
    return out


def _count(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    return len({k[len(prefix) :].split(".", 1)[0] for k in sd if k.startswith(prefix)})


def _need(sd: Mapping[str, torch.Tensor], key: str, what: str) -> torch.Size:
    if key not in sd:
        raise ConversionError(f"{what}: the text encoder has no {key!r}")
    return sd[key].shape


def _heads(width: int, what: str) -> int:
    if width % OPENCLIP_HEAD_CHANNELS:
        raise ConversionError(f"{what}: width {width} is not a multiple of the {OPENCLIP_HEAD_CHANNELS}-wide heads")
    return width // OPENCLIP_HEAD_CHANNELS


def clip_config(sd: Mapping[str, torch.Tensor], what: str = "LDM CLIP text encoder") -> dict[str, Any]:
    """SD 1.x: a transformers CLIPTextConfig from shapes (quick_gelu, as OpenAI's CLIP)."""
    vocab, width = _need(sd, "text_model.embeddings.token_embedding.weight", what)
    return {
        **COMMON,
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": _need(sd, "text_model.encoder.layers.0.mlp.fc1.weight", what)[0],
        "num_hidden_layers": _count(sd, "text_model.encoder.layers."),
        "num_attention_heads": _heads(width, what),
        "max_position_embeddings": _need(sd, "text_model.embeddings.position_embedding.weight", what)[0],
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
    }


def _openclip_tower(
    sd: Mapping[str, torch.Tensor], what: str, num_hidden_layers: int, projection_dim: int
) -> dict[str, Any]:
    """OpenCLIP's text tower (gelu) as a CLIPTextConfig: widths from the shapes, the layer count and
    projection width as the caller decides them."""
    vocab, width = _need(sd, "token_embedding.weight", what)
    return {
        **COMMON,
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": _need(sd, "transformer.resblocks.0.mlp.c_fc.weight", what)[0],
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": _heads(width, what),
        "max_position_embeddings": _need(sd, "positional_embedding", what)[0],
        "hidden_act": "gelu",
        "projection_dim": projection_dim,
    }


def openclip_config(sd: Mapping[str, torch.Tensor], what: str = "LDM OpenCLIP text encoder") -> dict[str, Any]:
    """SD 2.x: one layer fewer than the file holds."""
    _need(sd, "token_embedding.weight", what)
    layers = _count(sd, "transformer.resblocks.")
    if layers < 2:
        raise ConversionError(
            f"{what}: {layers} OpenCLIP layer(s); SD2 uses all but the last, so at least 2 are needed"
        )
    # projection_dim as in SD 2.1's text_encoder/config.json (unused by the text model)
    return _openclip_tower(sd, what, layers - 1, projection_dim=512)


def bigg_config(sd: Mapping[str, torch.Tensor], what: str = "SDXL OpenCLIP ViT-bigG text encoder") -> dict[str, Any]:
    """SDXL: OpenCLIP bigG with all the file's layers and the projection's width."""
    width = _need(sd, "token_embedding.weight", what)[1]
    projection = _need(sd, "text_projection", what)
    if len(projection) != 2 or projection[0] != width:
        raise ConversionError(
            f"{what}: text_projection has shape {tuple(projection)}; OpenCLIP stores it as (width {width}, projection)"
        )
    return _openclip_tower(sd, what, _count(sd, "transformer.resblocks."), projection_dim=projection[1])


CLIP_FORMAT = TRANSFORMERS_FORMAT

OPENCLIP_FORMAT = ModelFormat(
    class_name="CLIPTextModel",
    rules=openclip_rules,
    config_from_dict=TRANSFORMERS_FORMAT.config_from_dict,
    config_to_dict=TRANSFORMERS_FORMAT.config_to_dict,
    ignore=("text_projection", "logit_scale"),
    before_convert=split_in_proj,
    after_export=fuse_in_proj,
)

BIGG_FORMAT = ModelFormat(
    class_name="CLIPTextModelWithProjection",
    rules=bigg_rules,
    config_from_dict=FORMAT_WITH_PROJECTION.config_from_dict,
    config_to_dict=FORMAT_WITH_PROJECTION.config_to_dict,
    ignore=("logit_scale",),
    before_convert=split_in_proj,  # drops nothing here: the config keeps every layer
    after_export=fuse_bigg,
)
