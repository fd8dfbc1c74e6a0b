"""diffusers UNet2DConditionModel (SD 1.x / 2.x, SDXL) <-> minidiff.unet_2d_condition.UNet2DConditionModel: weights
and config.

Deviations from diffusers' names (everything else is kept as it is):
  down_blocks.{i}.downsamplers.0.conv.     ->  down_blocks.{i}.downsample.conv.
  up_blocks.{i}.upsamplers.0.conv.         ->  up_blocks.{i}.upsample.conv.
  mid_block.attentions.0.                  ->  mid_block.attention.
  *.transformer_blocks.{k}.attn{n}.to_out.0.  ->  *.transformer_blocks.{k}.attn{n}.to_out.
  *.transformer_blocks.{k}.ff.net.0.proj.  ->  *.transformer_blocks.{k}.ff.proj_in.   (GEGLU value+gate projection)
  *.transformer_blocks.{k}.ff.net.2.       ->  *.transformer_blocks.{k}.ff.proj_out.
SDXL's `add_embedding.linear_1/2` (addition_embed_type="text_time") keep their names; the rule exists
only for such a config, so an SD 1.x checkpoint with the keys is refused by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import ModelFormat
from .configs import config_from_dict, config_to_dict
from .rules import Rule
from .unet_2d import unet_rules

# diffusers' constructor defaults where they differ from minidiff's SD1.5 dataclass defaults:
# a key missing from a config.json means diffusers' default, so that is what fills it.
DIFFUSERS_DEFAULTS: dict[str, Any] = {"sample_size": None, "cross_attention_dim": 1280}

# diffusers keys UNet2DConditionConfig leaves out: features minidiff does not implement (class /
# image conditioning, ...), each accepted only at the values that switch it off, so a config using
# one fails loudly. The first value is diffusers' default, which save_pretrained writes back.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "act_fn": ("silu", "swish"),
    "only_cross_attention": (False,),  # or one per level
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "dual_cross_attention": (False,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
    "mid_block_only_cross_attention": (None, False),
}
# unused at inference (or by the features above): written back at diffusers' defaults
UNUSED: dict[str, Any] = {"dropout": 0.0, "addition_embed_type_num_heads": 64}
LEFT_OUT = {**{key: values[0] for key, values in UNSUPPORTED.items()}, **UNUSED}


def transformer_rules(src: str, dst: str) -> list[Rule]:
    """A spatial transformer at `src` (diffusers) / `dst` (minidiff)."""
    block_src, block_dst = f"{src}transformer_blocks.{{k}}.", f"{dst}transformer_blocks.{{k}}."
    return [
        Rule(f"{block_src}attn1.to_out.0.", f"{block_dst}attn1.to_out."),
        Rule(f"{block_src}attn2.to_out.0.", f"{block_dst}attn2.to_out."),
        Rule(f"{block_src}ff.net.0.proj.", f"{block_dst}ff.proj_in."),
        Rule(f"{block_src}ff.net.2.", f"{block_dst}ff.proj_out."),
        Rule(src, dst),
    ]


def rules(config: Any = None) -> list[Rule]:
    added = ("add_embedding.",) if config is not None and config.addition_embed_type == "text_time" else ()
    return unet_rules(transformer_rules, "time_embedding.", *added)


def _config_from_dict(config_class: type, raw: Mapping[str, Any]) -> Any:
    return config_from_dict(
        config_class,
        raw,
        "UNet2DConditionModel",
        defaults=DIFFUSERS_DEFAULTS,
        unsupported=UNSUPPORTED,
        per_level=("only_cross_attention",),
    )


FORMAT = ModelFormat(
    class_name="UNet2DConditionModel",
    rules=rules,
    config_from_dict=_config_from_dict,
    config_to_dict=lambda config: config_to_dict(config, "UNet2DConditionModel", left_out=LEFT_OUT),
)
