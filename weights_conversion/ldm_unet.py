"""CompVis / LDM and SDXL UNet (`model.diffusion_model.*`, prefix stripped) <-> minidiff's UNet2DConditionModel.

The LDM UNet numbers its blocks flat, so the table is generated per config (`_walk`):

  input_blocks.0.0.                 ->  conv_in.
  input_blocks.{n}.0.               ->  down_blocks.{i}.resnets.{j}.     (a ResBlock, names below)
  input_blocks.{n}.1.               ->  down_blocks.{i}.attentions.{j}.  (a SpatialTransformer)
  input_blocks.{n}.0.op.            ->  down_blocks.{i}.downsample.conv.  (after the last ResBlock of a level)
  middle_block.0. / .1. / .2.       ->  mid_block.resnets.0. / mid_block.attention. / mid_block.resnets.1.
  output_blocks.{m}.0.              ->  up_blocks.{i}.resnets.{j}.
  output_blocks.{m}.1.              ->  up_blocks.{i}.attentions.{j}.
  output_blocks.{m}.{1|2}.conv.     ->  up_blocks.{i}.upsample.conv.    (.2 when the block has a transformer)
  time_embed.0. / time_embed.2.     ->  time_embedding.linear_1. / linear_2.
  out.0. / out.2.                   ->  conv_norm_out. / conv_out.
  label_emb.0.0. / label_emb.0.2.   ->  add_embedding.linear_1. / linear_2.   (SDXL's micro-conditioning MLP)
ResBlock leaves:
  in_layers.0 -> norm1, in_layers.2 -> conv1, emb_layers.1 -> time_emb_proj,
  out_layers.0 -> norm2, out_layers.3 -> conv2, skip_connection -> conv_shortcut
The transformers inside use diffusers' own names (diffusers took them from LDM), so the diffusers
converter's `transformer_rules` apply unchanged.

The config is read from shapes and key presence; what shapes cannot tell (the number of heads, the
width of SDXL's micro-conditioning embedding) is filled the way the original configs define it
(see `config_from_state_dict`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from . import ModelFormat
from .rules import ConversionError, Rule
from .unet_2d_condition import FORMAT as DIFFUSERS_FORMAT
from .unet_2d_condition import transformer_rules

RESNET = {
    "in_layers.0.": "norm1.",
    "in_layers.2.": "conv1.",
    "emb_layers.1.": "time_emb_proj.",
    "out_layers.0.": "norm2.",
    "out_layers.3.": "conv2.",
    "skip_connection.": "conv_shortcut.",
}
# the per-head width of SD2's and SDXL's UNets (`num_head_channels: 64`); SD1 has 8 heads (`num_heads: 8`)
SD2_HEAD_CHANNELS = 64
SD1_HEADS = 8
# SDXL: the sinusoidal width of each micro-conditioning number (sgm's ConcatTimestepEmbedderND
# `outdim`; no weights depend on it, only label_emb's input width, pooled width + K * 256)
SDXL_TIME_EMBED_DIM = 256
ADDED = {"label_emb.0.0.": "add_embedding.linear_1.", "label_emb.0.2.": "add_embedding.linear_2."}


def resnet_rules(src: str, dst: str) -> list[Rule]:
    return [Rule(src + old, dst + new) for old, new in RESNET.items()]


def _walk(config: Any) -> Iterator[tuple[str, str, str]]:
    """(kind, LDM prefix, minidiff prefix) for every block, in LDM's flat numbering."""
    layers = config.level("layers_per_block")
    levels = len(config.block_out_channels)
    yield "conv", "input_blocks.0.0.", "conv_in."
    n = 0
    for i, kind in enumerate(config.down_block_types):
        for j in range(layers[i]):
            n += 1
            yield "resnet", f"input_blocks.{n}.0.", f"down_blocks.{i}.resnets.{j}."
            if kind.startswith("CrossAttn"):
                yield "transformer", f"input_blocks.{n}.1.", f"down_blocks.{i}.attentions.{j}."
        if i < levels - 1:
            n += 1
            yield "conv", f"input_blocks.{n}.0.op.", f"down_blocks.{i}.downsample.conv."
    if config.mid_block_type is not None:
        yield "resnet", "middle_block.0.", "mid_block.resnets.0."
        yield "transformer", "middle_block.1.", "mid_block.attention."
        yield "resnet", "middle_block.2.", "mid_block.resnets.1."
    m = 0
    for i, kind in enumerate(config.up_block_types):
        cross = kind.startswith("CrossAttn")
        count = layers[levels - 1 - i] + 1
        for j in range(count):
            yield "resnet", f"output_blocks.{m}.0.", f"up_blocks.{i}.resnets.{j}."
            if cross:
                yield "transformer", f"output_blocks.{m}.1.", f"up_blocks.{i}.attentions.{j}."
            if j == count - 1 and i < levels - 1:
                yield "conv", f"output_blocks.{m}.{2 if cross else 1}.conv.", f"up_blocks.{i}.upsample.conv."
            m += 1


def rules(config: Any) -> list[Rule]:
    out = [
        Rule("time_embed.0.", "time_embedding.linear_1."),
        Rule("time_embed.2.", "time_embedding.linear_2."),
        Rule("out.0.", "conv_norm_out."),
        Rule("out.2.", "conv_out."),
    ]
    if config.addition_embed_type == "text_time":
        out += [Rule(src, dst) for src, dst in ADDED.items()]
    for kind, src, dst in _walk(config):
        if kind == "resnet":
            out += resnet_rules(src, dst)
        elif kind == "transformer":
            out += transformer_rules(src, dst)
        else:
            out.append(Rule(src, dst))
    return out


def _indices(sd: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    """The sorted integers n of keys `prefix{n}.…`."""
    return sorted({int(k[len(prefix) :].split(".", 1)[0]) for k in sd if k.startswith(prefix)})


def _shape(sd: Mapping[str, torch.Tensor], key: str, what: str) -> torch.Size:
    if key not in sd:
        raise ConversionError(f"{what}: the LDM UNet has no {key!r} (not a Stable Diffusion 1.x / 2.x / XL UNet?)")
    return sd[key].shape


def config_from_state_dict(sd: Mapping[str, torch.Tensor], what: str = "LDM UNet") -> dict[str, Any]:
    """A diffusers-style UNet2DConditionModel config read from the tensors' shapes.

    Shapes give the channels, levels, ResBlocks per level, which levels attend, the context width,
    conv vs linear projections, the transformer depth per level and SDXL's added-conditioning input
    width. They do not give the number of heads: SD2's and SDXL's configs fix the head WIDTH at 64
    (`num_head_channels`), SD1's fixes 8 heads. SD2 / SDXL are recognised by their linear proj_in
    (SD1 uses 1x1 convs), so heads = channels // 64 per level ([5, 10, 20, 20] for SD2.x, [5, 10, 20]
    for SDXL) with linear projections, else 8. SDXL's `addition_time_embed_dim` is 256 in every
    SDXL config. sample_size and upcast_attention are not in the weights at all; the caller sets
    them (weights_conversion.ldm.VARIANTS).
    """
    conv_in = _shape(sd, "input_blocks.0.0.weight", what)
    channels, layers, cross, depths = [], [], [], []
    count = 0
    for n in _indices(sd, "input_blocks.")[1:]:
        if f"input_blocks.{n}.0.op.weight" in sd:  # a downsample closes the level
            layers.append(count)
            count = 0
            continue
        if count == 0:
            channels.append(_shape(sd, f"input_blocks.{n}.0.out_layers.3.weight", what)[0])
            cross.append(f"input_blocks.{n}.1.proj_in.weight" in sd)
            depths.append(len(_indices(sd, f"input_blocks.{n}.1.transformer_blocks.")))
        count += 1
    layers.append(count)
    if not channels or len(layers) != len(channels):
        raise ConversionError(
            f"{what}: cannot read the levels from input_blocks.* (found blocks {_indices(sd, 'input_blocks.')})"
        )

    transformers = sorted({k.split(".proj_in.")[0] for k in sd if ".proj_in." in k})
    if not transformers:
        raise ConversionError(f"{what}: no spatial transformer (…proj_in.weight) found: not a text-conditioned SD UNet")
    first = transformers[0]
    linear = sd[f"{first}.proj_in.weight"].ndim == 2
    context = _shape(sd, f"{first}.transformer_blocks.0.attn2.to_k.weight", what)[1]

    has_mid = any(k.startswith("middle_block.") for k in sd)
    if has_mid and "middle_block.1.proj_in.weight" not in sd:
        raise ConversionError(f"{what}: a middle block without a transformer is not a Stable Diffusion UNet")
    levels = len(channels)
    up_cross = []
    m = 0
    for lvl in reversed(range(levels)):
        up_cross.append(f"output_blocks.{m}.1.proj_in.weight" in sd)
        m += layers[lvl] + 1
    if len(_indices(sd, "output_blocks.")) != m:
        raise ConversionError(
            f"{what}: expected {m} output_blocks for {levels} levels of {layers} ResBlocks, "
            f"found {len(_indices(sd, 'output_blocks.'))}"
        )

    if linear:
        odd = [c for c in channels if c % SD2_HEAD_CHANNELS]
        if odd:
            raise ConversionError(
                f"{what}: SD2-style UNet (linear projections) with widths {odd} that are not "
                f"multiples of the {SD2_HEAD_CHANNELS}-wide heads"
            )
        heads: int | list[int] = [c // SD2_HEAD_CHANNELS for c in channels]
    else:
        heads = SD1_HEADS
    time_dim = _shape(sd, "time_embed.0.weight", what)[0]
    added = {}
    if "label_emb.0.0.weight" in sd:  # SDXL
        added = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": SDXL_TIME_EMBED_DIM,
            "projection_class_embeddings_input_dim": sd["label_emb.0.0.weight"].shape[1],
        }
    return {
        "in_channels": conv_in[1],
        "out_channels": _shape(sd, "out.2.weight", what)[0],
        "conv_in_kernel": conv_in[-1],
        "conv_out_kernel": sd["out.2.weight"].shape[-1],
        "block_out_channels": channels,
        "layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
        "down_block_types": ["CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cross],
        "up_block_types": ["CrossAttnUpBlock2D" if c else "UpBlock2D" for c in up_cross],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if has_mid else None,
        "cross_attention_dim": context,
        "attention_head_dim": heads,
        "use_linear_projection": linear,
        "transformer_layers_per_block": _depths(sd, depths, cross, has_mid, what),
        "time_embedding_dim": None if time_dim == channels[0] * 4 else time_dim,
        # LDM's normalization() is GroupNorm(32, ...) everywhere, eps 1e-5
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        **added,
    }


def _depths(
    sd: Mapping[str, torch.Tensor], depths: list[int], cross: list[bool], has_mid: bool, what: str
) -> int | list[int]:
    """transformer_layers_per_block as diffusers writes it: one int when every transformer (the
    mid block's too) has the same depth (SD 1.x / 2.x: 1, the SDXL refiner: 4), else one per level
    with 1 at the levels without attention (SDXL base: [1, 2, 10]); a folder that spelled one depth
    as a list comes back as the int (the same network). diffusers gives the mid block the last
    level's depth, so a file where they differ has no diffusers config."""
    mid = len(_indices(sd, "middle_block.1.transformer_blocks.")) if has_mid else None
    found = {d for d, c in zip(depths, cross) if c} | ({mid} if has_mid else set())
    if len(found) == 1:
        return found.pop()
    per_level = [d if c else 1 for d, c in zip(depths, cross)]
    if has_mid and not cross[-1]:
        per_level[-1] = mid
    if has_mid and per_level[-1] != mid:
        raise ConversionError(
            f"{what}: the middle block has {mid} transformer layers but the last level {per_level[-1]}; "
            "diffusers' UNet2DConditionModel gives both the same depth"
        )
    return per_level


FORMAT = ModelFormat(
    class_name="UNet2DConditionModel",
    rules=rules,
    config_from_dict=DIFFUSERS_FORMAT.config_from_dict,
    config_to_dict=DIFFUSERS_FORMAT.config_to_dict,
)
