"""diffusers UNet2DModel (DDPM) <-> minidiff.unet_2d.UNet2DModel.

Deviations from diffusers' names (everything else is kept as it is):
  down_blocks.{i}.downsamplers.0.conv.  ->  down_blocks.{i}.downsample.conv.
  up_blocks.{i}.upsamplers.0.conv.      ->  up_blocks.{i}.upsample.conv.
  mid_block.attentions.0.               ->  mid_block.attention.
  *.attentions.{j}.to_out.0.            ->  *.attentions.{j}.to_out.
Legacy attention names (diffusers < 0.12, e.g. the google/ddpm-* checkpoints), load only:
  query / key / value / proj_attn       ->  to_q / to_k / to_v / to_out
"""

from __future__ import annotations

from collections.abc import Mapping
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


def rules(config: Any = None) -> list[Rule]:
    return [
        Rule("down_blocks.{i}.downsamplers.0.conv.", "down_blocks.{i}.downsample.conv."),
        Rule("up_blocks.{i}.upsamplers.0.conv.", "up_blocks.{i}.upsample.conv."),
        *attention_rules("down_blocks.{i}.attentions.{j}.", "down_blocks.{i}.attentions.{j}."),
        *attention_rules("up_blocks.{i}.attentions.{j}.", "up_blocks.{i}.attentions.{j}."),
        *attention_rules("mid_block.attentions.0.", "mid_block.attention."),
        *same(
            "conv_in.",
            "time_embedding.",
            "class_embedding.",
            "down_blocks.{i}.resnets.{j}.",
            "mid_block.resnets.{j}.",
            "up_blocks.{i}.resnets.{j}.",
            "conv_norm_out.",
            "conv_out.",
        ),
    ]


def _config_from_dict(raw: Mapping[str, Any]):
    from minidiff.unet_2d import UNet2DConfig

    if raw.get("class_embed_type") is not None:
        raise ValueError(f"UNet2DModel: class_embed_type={raw['class_embed_type']!r} is not supported by minidiff")
    return config_from_dict(UNet2DConfig, raw, what="UNet2DModel config")


FORMAT = ModelFormat(
    class_name="UNet2DModel",
    rules=rules,
    config_from_dict=_config_from_dict,
    config_to_dict=lambda config: config_to_dict(config, "UNet2DModel"),
)
