"""CompVis / LDM autoencoder (`first_stage_model.*`, prefix stripped) <-> minidiff's AutoencoderKL.

{encoder,decoder}.mid.block_1. / block_2.   ->  {encoder,decoder}.mid_block.resnets.0. / 1.
{encoder,decoder}.mid.attn_1.norm.          ->  {encoder,decoder}.mid_block.attention.group_norm.
{encoder,decoder}.mid.attn_1.q/k/v/proj_out. ->  ….mid_block.attention.to_q/to_k/to_v/to_out.   (1x1 conv <-> Linear)
{encoder,decoder}.norm_out.                 ->  {encoder,decoder}.conv_norm_out.
encoder.down.{i}.block.{j}.                 ->  encoder.down_blocks.{i}.resnets.{j}.   (nin_shortcut -> conv_shortcut)
encoder.down.{i}.downsample.conv.           ->  encoder.down_blocks.{i}.downsample.conv.
decoder.up.{L-1-i}.block.{j}.               ->  decoder.up_blocks.{i}.resnets.{j}.     (LDM counts upwards)
decoder.up.{L-1-i}.upsample.conv.           ->  decoder.up_blocks.{i}.upsample.conv.
conv_in, conv_out, quant_conv, post_quant_conv and the ResBlocks' norm1/conv1/norm2/conv2 keep their names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from . import ModelFormat
from .autoencoder_kl import FORMAT as DIFFUSERS_FORMAT
from .rules import ConversionError, Rule, same

ATTENTION = {"norm.": "group_norm.", "q.": "to_q.", "k.": "to_k.", "v.": "to_v.", "proj_out.": "to_out."}
LDM_SCALE_FACTOR = 0.18215  # `scale_factor` of every SD 1.x / 2.x LDM config (diffusers' default too)


def _conv_to_linear(t: torch.Tensor) -> torch.Tensor:
    return t[:, :, 0, 0] if t.ndim == 4 else t


def _linear_to_conv(t: torch.Tensor) -> torch.Tensor:
    return t[:, :, None, None] if t.ndim == 2 else t


def _mid_rules(side: str) -> list[Rule]:
    src, dst = f"{side}.mid.", f"{side}.mid_block."
    return [
        Rule(f"{src}block_1.", f"{dst}resnets.0."),
        Rule(f"{src}block_2.", f"{dst}resnets.1."),
        *(
            Rule(f"{src}attn_1.{old}", f"{dst}attention.{new}", transform=_conv_to_linear, inverse=_linear_to_conv)
            for old, new in ATTENTION.items()
        ),
        Rule(f"{side}.norm_out.", f"{side}.conv_norm_out."),
    ]


def rules(config: Any) -> list[Rule]:
    levels = len(config.block_out_channels)
    decoder = []
    for i in range(levels):
        ldm = levels - 1 - i
        decoder += [
            Rule(f"decoder.up.{ldm}.block.{{j}}.nin_shortcut.", f"decoder.up_blocks.{i}.resnets.{{j}}.conv_shortcut."),
            Rule(f"decoder.up.{ldm}.block.{{j}}.", f"decoder.up_blocks.{i}.resnets.{{j}}."),
            Rule(f"decoder.up.{ldm}.upsample.conv.", f"decoder.up_blocks.{i}.upsample.conv."),
        ]
    return [
        Rule("encoder.down.{i}.block.{j}.nin_shortcut.", "encoder.down_blocks.{i}.resnets.{j}.conv_shortcut."),
        Rule("encoder.down.{i}.block.{j}.", "encoder.down_blocks.{i}.resnets.{j}."),
        Rule("encoder.down.{i}.downsample.conv.", "encoder.down_blocks.{i}.downsample.conv."),
        *decoder,
        *_mid_rules("encoder"),
        *_mid_rules("decoder"),
        *same(
            "encoder.conv_in.",
            "encoder.conv_out.",
            "decoder.conv_in.",
            "decoder.conv_out.",
            "quant_conv.",
            "post_quant_conv.",
        ),
    ]


def _count(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    return len({k[len(prefix) :].split(".", 1)[0] for k in sd if k.startswith(prefix)})


def config_from_state_dict(sd: Mapping[str, torch.Tensor], what: str = "LDM autoencoder") -> dict[str, Any]:
    """A diffusers-style AutoencoderKL config from shapes. LDM's Normalize() is always
    GroupNorm(32, …) and `scale_factor` is not stored in the weights: 0.18215 as in the SD 1.x / 2.x
    configs (SDXL files get theirs from weights_conversion.ldm.VARIANTS)."""
    for key in (
        "encoder.conv_in.weight",
        "decoder.conv_out.weight",
        "decoder.conv_in.weight",
        "encoder.down.0.block.0.conv1.weight",
    ):
        if key not in sd:
            raise ConversionError(f"{what}: the LDM autoencoder has no {key!r}")
    levels = _count(sd, "encoder.down.")
    return {
        "in_channels": sd["encoder.conv_in.weight"].shape[1],
        "out_channels": sd["decoder.conv_out.weight"].shape[0],
        "latent_channels": sd["decoder.conv_in.weight"].shape[1],
        "block_out_channels": [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)],
        "layers_per_block": _count(sd, "encoder.down.0.block."),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "norm_num_groups": 32,
        "scaling_factor": LDM_SCALE_FACTOR,
        "use_quant_conv": "quant_conv.weight" in sd,
        "use_post_quant_conv": "post_quant_conv.weight" in sd,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in sd,
    }


FORMAT = ModelFormat(
    class_name="AutoencoderKL",
    rules=rules,
    config_from_dict=DIFFUSERS_FORMAT.config_from_dict,
    config_to_dict=DIFFUSERS_FORMAT.config_to_dict,
)
