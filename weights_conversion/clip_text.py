"""transformers CLIPTextModel <-> minidiff.clip_text.CLIPTextModel, and CLIPTextModelWithProjection
(SDXL's text_encoder_2) <-> minidiff.clip_text.CLIPTextModelWithProjection.

Deviations from transformers' names (everything else is kept as it is):
  text_model.embeddings.token_embedding.      ->  token_embedding.
  text_model.embeddings.position_embedding.   ->  position_embedding.
  text_model.encoder.layers.{i}.self_attn.q_proj.   ->  layers.{i}.self_attn.to_q.
                                      k_proj / v_proj / out_proj  ->  to_k / to_v / to_out
  text_model.encoder.layers.{i}.              ->  layers.{i}.   (layer_norm1/2, mlp.fc1/fc2 kept)
  text_model.final_layer_norm.                ->  final_layer_norm.

Two layouts load. transformers 4 (every real SD checkpoint) prefixes all keys with `text_model.`;
transformers 5 saves without the prefix (accepted as `legacy`, i.e. load only). save_pretrained
writes the prefixed layout because both transformers 4 and 5 load it, while transformers 4 cannot
load the unprefixed one.

CLIPTextModelWithProjection: the same names plus `text_projection.weight`, which transformers (4 and 5)
writes without any prefix, beside the `text_model.`-prefixed tower; the unprefixed tower loads too.

Dropped on purpose (CLIPTextModel): the `embeddings.position_ids` buffer some old checkpoints stored (minidiff
computes positions), and the rest of a full CLIPModel checkpoint (`vision_model.`, the
projections, `logit_scale`), which transformers' CLIPTextModel ignores too (e.g. the tutorial's
openai/clip-vit-large-patch14).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import ModelFormat
from .configs import config_from_dict, config_to_dict
from .rules import Rule

PREFIX = "text_model."
ATTENTION = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}

# the transformers version whose loading of what minidiff writes is tested
TRANSFORMERS_VERSION = "5.23.0"

# transformers' CLIPTextConfig defaults, for configs that leave a key out (minidiff's own defaults
# are SD1.5's, which differ, and a silently different eos_token_id changes the pooled output)
TRANSFORMERS_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "pad_token_id": 1,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
}


def _layout(prefix: str, legacy: bool) -> list[Rule]:
    return [
        Rule(f"{prefix}embeddings.token_embedding.", "token_embedding.", legacy),
        Rule(f"{prefix}embeddings.position_embedding.", "position_embedding.", legacy),
        *(
            Rule(f"{prefix}encoder.layers.{{i}}.self_attn.{old}.", f"layers.{{i}}.self_attn.{new}.", legacy)
            for old, new in ATTENTION.items()
        ),
        Rule(f"{prefix}encoder.layers.{{i}}.", "layers.{i}.", legacy),
        Rule(f"{prefix}final_layer_norm.", "final_layer_norm.", legacy),
    ]


def rules(config: Any = None) -> list[Rule]:
    return [*_layout(PREFIX, legacy=False), *_layout("", legacy=True)]


def rules_with_projection(config: Any = None) -> list[Rule]:
    return [Rule("text_projection.", "text_projection."), *rules(config)]


def _config_from_dict(config_class: type, raw: Mapping[str, Any]) -> Any:
    model_type = raw.get("model_type")
    if model_type == "clip" or "text_config" in raw or "text_config_dict" in raw:
        # a full CLIPConfig: the text tower's settings are nested; the old `text_config_dict`
        # wins over `text_config`, as in transformers' CLIPConfig
        nested = raw.get("text_config_dict") or raw.get("text_config") or {}
        if not isinstance(nested, Mapping):
            raise ValueError(f"invalid CLIPTextModel config: text_config must be a JSON object, got {nested!r}")
        raw = nested
        model_type = raw.get("model_type")
    if model_type not in (None, "clip_text_model"):
        raise ValueError(f"CLIPTextModel: the config is for model_type={model_type!r}, not a CLIP text model")
    return config_from_dict(config_class, raw, "CLIPTextModel", defaults=TRANSFORMERS_DEFAULTS)


def _config_to_dict(config: Any, class_name: str = "CLIPTextModel") -> dict[str, Any]:
    """The config.json transformers writes for a CLIPTextModel(WithProjection) (and needs to pick the class)."""
    out = config_to_dict(config, class_name, "transformers_version")
    del out["_class_name"]  # a diffusers key; transformers names the class in `architectures`
    out.update(architectures=[class_name], model_type="clip_text_model", transformers_version=TRANSFORMERS_VERSION)
    return out


FORMAT = ModelFormat(
    class_name="CLIPTextModel",
    rules=rules,
    config_from_dict=_config_from_dict,
    config_to_dict=_config_to_dict,
    ignore=(
        f"{PREFIX}embeddings.position_ids",
        "embeddings.position_ids",
        "vision_model.",
        "visual_projection.",
        "text_projection.",
        "logit_scale",
    ),
)

FORMAT_WITH_PROJECTION = ModelFormat(
    class_name="CLIPTextModelWithProjection",
    rules=rules_with_projection,
    config_from_dict=_config_from_dict,
    config_to_dict=lambda config: _config_to_dict(config, "CLIPTextModelWithProjection"),
    # a full CLIPModel checkpoint's vision side, as transformers' CLIPTextModelWithProjection ignores it
    ignore=(
        f"{PREFIX}embeddings.position_ids",
        "embeddings.position_ids",
        "vision_model.",
        "visual_projection.",
        "logit_scale",
    ),
)
