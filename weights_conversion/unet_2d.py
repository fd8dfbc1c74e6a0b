"""diffusers UNet2DModel (DDPM) <-> minidiff.unet_2d.UNet2DModel: weights and config.

Deviations from diffusers' names (everything else is kept as it is):
  down_blocks.{i}.downsamplers.0.conv.  ->  down_blocks.{i}.downsample.conv.
  up_blocks.{i}.upsamplers.0.conv.      ->  up_blocks.{i}.upsample.conv.
  mid_block.attentions.0.               ->  mid_block.attention.
  *.attentions.{j}.to_out.0.            ->  *.attentions.{j}.to_out.
Legacy attention names (diffusers < 0.12, e.g. the google/ddpm-* checkpoints), load only:
  query / key / value / proj_attn       ->  to_q / to_k / to_v / to_out
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from . import ModelFormat
from .configs import config_from_dict, config_to_dict
from .rules import Rule, same

LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out"}


def attention_rules(src: str, dst: str) -> list[Rule]:
    """A spatial attention block at `src` (diffusers) / `dst` (minidiff), current and legacy names."""
    return [
        Rule(f"{src}to_out.0.", f"{dst}to_out."),
        *(Rule(f"{src}{old}.", f"{dst}{new}.", legacy=True) for old, new in LEGACY_ATTENTION.items()),
        Rule(src, dst),
    ]


def resample_rules(down: str = "", up: str = "") -> list[Rule]:
    """The down/up-sampling convs of the `down`-prefixed down blocks and the `up`-prefixed up blocks."""
    return [
        Rule(f"{down}down_blocks.{{i}}.downsamplers.0.conv.", f"{down}down_blocks.{{i}}.downsample.conv."),
        Rule(f"{up}up_blocks.{{i}}.upsamplers.0.conv.", f"{up}up_blocks.{{i}}.upsample.conv."),
    ]


def unet_rules(block_rules: Callable[[str, str], list[Rule]], *embeddings: str) -> list[Rule]:
    """The UNet layout UNet2DModel and UNet2DConditionModel share: `block_rules` maps one attention block,
    `embeddings` are the embedding modules kept as they are."""
    return [
        *resample_rules(),
        *block_rules("down_blocks.{i}.attentions.{j}.", "down_blocks.{i}.attentions.{j}."),
        *block_rules("up_blocks.{i}.attentions.{j}.", "up_blocks.{i}.attentions.{j}."),
        *block_rules("mid_block.attentions.0.", "mid_block.attention."),
        *same(
            "conv_in.",
            *embeddings,
            "down_blocks.{i}.resnets.{j}.",
            "mid_block.resnets.{j}.",
            "up_blocks.{i}.resnets.{j}.",
            "conv_norm_out.",
            "conv_out.",
        ),
    ]


def rules(config: Any = None) -> list[Rule]:
    return unet_rules(attention_rules, "time_embedding.", "class_embedding.")


# diffusers keys UNet2DConfig leaves out: features minidiff does not implement, each accepted only at
# the values that switch it off; the first is diffusers' default, which save_pretrained writes back
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "time_embedding_type": ("positional",),
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
    "act_fn": ("silu", "swish"),
    "resnet_time_scale_shift": ("default",),
}
UNUSED = {"dropout": 0.0}  # inference only: written back at diffusers' default
LEFT_OUT = {**{key: values[0] for key, values in UNSUPPORTED.items()}, **UNUSED}


def _config_from_dict(config_class: type, raw: Mapping[str, Any]) -> Any:
    # refused but, unlike the keys above, never written (minidiff's config.json has not had it)
    unsupported = {**UNSUPPORTED, "class_embed_type": (None,)}
    return config_from_dict(config_class, raw, "UNet2DModel", unsupported=unsupported)


FORMAT = ModelFormat(
    class_name="UNet2DModel",
    rules=rules,
    config_from_dict=_config_from_dict,
    config_to_dict=lambda config: config_to_dict(config, "UNet2DModel", left_out=LEFT_OUT),
)
