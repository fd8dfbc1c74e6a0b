"""UNet2DModel: the pixel-space denoiser of DDPM (e.g. google/ddpm-cat-256, ddpm-cifar10-32).

References:
1. Ho, Jain, Abbeel. "Denoising Diffusion Probabilistic Models", 2020. https://arxiv.org/abs/2006.11239
2. Ronneberger, Fischer, Brox. "U-Net: Convolutional Networks for Biomedical Image Segmentation", 2015.
3. diffusers' UNet2DModel, whose config keys and checkpoints this model reads.

Shape of the network: conv_in -> down levels (ResNet blocks, optional spatial self-attention,
stride-2 conv) -> mid (ResNet, attention, ResNet) -> up levels (ResNet blocks on the upsampled
features concatenated with the matching skip, optional attention, nearest x2 + conv) -> conv_out.
Note the DDPM meaning of `attention_head_dim`: channels per head, None = one head.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from weights_conversion.unet_2d import FORMAT

from .config import ConfigBase, check_levels, check_supported
from .layers import (
    AttentionBlock2D,
    MidBlock,
    TimestepEmbedding,
    as_timestep_batch,
    timestep_embedding,
    unet_levels,
)
from .modeling import ModelMixin
from .outputs import BaseOutput

DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")


@dataclass(frozen=True)
class UNet2DConfig(ConfigBase):
    """What the network is built from (diffusers' key names; weights_conversion refuses the features
    minidiff does not implement when it reads a diffusers config)."""

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False
    time_embedding_dim: int | None = None
    freq_shift: int = 0
    flip_sin_to_cos: bool = True
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2D"
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    block_out_channels: tuple[int, ...] = (224, 448, 672, 896)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1.0
    downsample_padding: int = 1
    attention_head_dim: int | None = 8
    norm_num_groups: int = 32
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    add_attention: bool = True
    num_class_embeds: int | None = None

    def __post_init__(self) -> None:
        check_levels("UNet2DModel", self.block_out_channels, self.down_block_types, self.up_block_types)
        check_supported(
            "UNet2DModel",
            (
                ("down_block_types", self.down_block_types, DOWN_BLOCKS),
                ("up_block_types", self.up_block_types, UP_BLOCKS),
                ("mid_block_type", (self.mid_block_type,), ("UNetMidBlock2D", None)),
            ),
        )


@dataclass
class UNet2DOutput(BaseOutput):
    sample: torch.Tensor


class UNet2DModel(ModelMixin):
    """Unconditional (optionally class-conditional) image-space UNet."""

    config_class = UNet2DConfig
    weights_format = FORMAT

    def __init__(self, config: UNet2DConfig | None = None, **kwargs) -> None:
        super().__init__(config, **kwargs)
        c: UNet2DConfig = self.config
        chs = list(c.block_out_channels)
        temb = c.time_embedding_dim or chs[0] * 4

        def attention(ch: int, groups: int | None = None, scale: float = 1.0) -> partial[AttentionBlock2D]:
            heads = 1 if c.attention_head_dim is None else ch // c.attention_head_dim
            return partial(
                AttentionBlock2D,
                heads=heads,
                groups=groups or c.norm_num_groups,
                eps=c.norm_eps,
                rescale_output_factor=scale,
            )

        self.conv_in = nn.Conv2d(c.in_channels, chs[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chs[0], temb)
        self.class_embedding = nn.Embedding(c.num_class_embeds, temb) if c.num_class_embeds else None

        down_blocks, up_blocks = unet_levels(
            chs,
            [c.layers_per_block] * len(chs),
            temb,
            [attention(ch) if kind == "AttnDownBlock2D" else None for kind, ch in zip(c.down_block_types, chs)],
            [attention(ch) if kind == "AttnUpBlock2D" else None for kind, ch in zip(c.up_block_types, chs[::-1])],
            c.norm_num_groups,
            c.norm_eps,
            c.downsample_padding,
        )
        self.down_blocks = down_blocks
        self.mid_block = None
        if c.mid_block_type is not None:
            scale = c.mid_block_scale_factor
            self.mid_block = MidBlock(
                chs[-1],
                temb,
                attention(chs[-1], c.attn_norm_num_groups, scale) if c.add_attention else None,
                c.norm_num_groups,
                c.norm_eps,
                scale,
            )
        self.up_blocks = up_blocks

        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, chs[0], eps=c.norm_eps)
        self.conv_out = nn.Conv2d(chs[0], c.out_channels, 3, padding=1)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple[torch.Tensor]:
        c: UNet2DConfig = self.config
        if c.center_input_sample:
            sample = 2 * sample - 1.0
        # like diffusers' UNet2DModel, a Python float timestep is truncated to an integer
        t = as_timestep_batch(timestep, sample.shape[0], sample.device, scalar_dtype=torch.int64)
        emb = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        emb = self.time_embedding(emb.to(self.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("this UNet2DModel is class-conditional: pass class_labels")
            emb = emb + self.class_embedding(class_labels).to(emb.dtype)
        elif class_labels is not None:
            raise ValueError("class_labels given, but this UNet2DModel has no class embedding")

        x = self.conv_in(sample)
        skips = [x]  # every encoder state, consumed in reverse by the decoder
        for block in self.down_blocks:
            x = block(x, emb, skips=skips)
        if self.mid_block is not None:
            x = self.mid_block(x, emb)
        for block in self.up_blocks:
            x = block(x, emb, skips=skips)
        x = self.conv_out(F.silu(self.conv_norm_out(x)))
        return UNet2DOutput(sample=x) if return_dict else (x,)
