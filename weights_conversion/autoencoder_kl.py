"""diffusers AutoencoderKL <-> minidiff.autoencoder_kl.AutoencoderKL: weights and config.

Deviations from diffusers' names (everything else is kept as it is):
  {encoder,decoder}.mid_block.attentions.0.         ->  {encoder,decoder}.mid_block.attention.
  {encoder,decoder}.mid_block.attentions.0.to_out.0. ->  {encoder,decoder}.mid_block.attention.to_out.
  encoder.down_blocks.{i}.downsamplers.0.conv.      ->  encoder.down_blocks.{i}.downsample.conv.
  decoder.up_blocks.{i}.upsamplers.0.conv.          ->  decoder.up_blocks.{i}.upsample.conv.
Legacy attention names (diffusers < 0.14 VAEs, e.g. older SD 1.x / 2.x uploads), load only:
  query / key / value / proj_attn                   ->  to_q / to_k / to_v / to_out
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import ModelFormat
from .configs import config_from_dict, config_to_dict
from .rules import Rule, same
from .unet_2d import attention_rules, resample_rules

# diffusers' constructor defaults where they differ from minidiff's SD dataclass defaults:
# a key missing from a config.json means diffusers' default, so that is what fills it.
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64],
    "layers_per_block": 1,
    "sample_size": 32,
}


def rules(config: Any = None) -> list[Rule]:
    return [
        *resample_rules("encoder.", "decoder."),
        *attention_rules("encoder.mid_block.attentions.0.", "encoder.mid_block.attention."),
        *attention_rules("decoder.mid_block.attentions.0.", "decoder.mid_block.attention."),
        *same(
            "encoder.conv_in.",
            "encoder.down_blocks.{i}.resnets.{j}.",
            "encoder.mid_block.resnets.{j}.",
            "encoder.conv_norm_out.",
            "encoder.conv_out.",
            "quant_conv.",
            "post_quant_conv.",
            "decoder.conv_in.",
            "decoder.mid_block.resnets.{j}.",
            "decoder.up_blocks.{i}.resnets.{j}.",
            "decoder.conv_norm_out.",
            "decoder.conv_out.",
        ),
    ]


def _config_from_dict(config_class: type, raw: Mapping[str, Any]) -> Any:
    return config_from_dict(config_class, raw, "AutoencoderKL", defaults=DIFFUSERS_DEFAULTS)


FORMAT = ModelFormat(
    class_name="AutoencoderKL",
    rules=rules,
    config_from_dict=_config_from_dict,
    config_to_dict=lambda config: config_to_dict(config, "AutoencoderKL"),
)
