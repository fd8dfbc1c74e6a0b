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

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigBase, check_levels, check_supported
from .layers import (
    AttentionBlock2D,
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Upsample2D,
    as_timestep_batch,
    timestep_embedding,
)
from .modeling import BaseOutput, ModelMixin

DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")


@dataclass(frozen=True)
class UNet2DConfig(ConfigBase):
    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False
    time_embedding_type: str = "positional"
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
    downsample_type: str = "conv"
    upsample_type: str = "conv"
    dropout: float = 0.0  # inference only: kept so configs round-trip
    act_fn: str = "silu"
    attention_head_dim: int | None = 8
    norm_num_groups: int = 32
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"
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
                ("time_embedding_type", (self.time_embedding_type,), ("positional",)),
                ("downsample_type", (self.downsample_type,), ("conv",)),
                ("upsample_type", (self.upsample_type,), ("conv",)),
                ("act_fn", (self.act_fn,), ("silu", "swish")),
                ("resnet_time_scale_shift", (self.resnet_time_scale_shift,), ("default",)),
            ),
        )


@dataclass
class UNet2DOutput(BaseOutput):
    sample: torch.Tensor


class UNetLevel(nn.Module):
    """One resolution level: `num_layers` ResNet blocks (each optionally followed by attention),
    then an optional stride-2 downsample (encoder) or x2 upsample (decoder).

    Decoder levels take skip connections: block i sees its input concatenated with one skip,
    so its input width is `in_channels[i] + skip_channels[i]`.
    """

    def __init__(
        self,
        in_channels: list[int],
        out_channels: int,
        temb_channels: int,
        attention: bool,
        heads: int,
        groups: int,
        eps: float,
        downsample: bool = False,
        downsample_padding: int = 1,
        upsample: bool = False,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(c, out_channels, temb_channels, groups, eps) for c in in_channels)
        self.attentions = (
            nn.ModuleList(AttentionBlock2D(out_channels, heads, groups, eps) for _ in in_channels)
            if attention
            else None
        )
        self.downsample = Downsample2D(out_channels, padding=downsample_padding) if downsample else None
        self.upsample = Upsample2D(out_channels) if upsample else None

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor, skips: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns the level's output and, for an encoder level, the states its decoder twin will consume."""
        states = []
        for i, resnet in enumerate(self.resnets):
            if skips is not None:
                x = torch.cat([x, skips.pop()], dim=1)
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x)
            states.append(x)
        if self.downsample is not None:
            x = self.downsample(x)
            states.append(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x, states


class MidBlock(nn.Module):
    """ResNet -> self-attention -> ResNet at the lowest resolution."""

    def __init__(
        self,
        channels: int,
        temb_channels: int,
        heads: int,
        groups: int,
        attn_groups: int,
        eps: float,
        scale: float,
        attention: bool,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(channels, channels, temb_channels, groups, eps, scale) for _ in range(2)
        )
        self.attention = AttentionBlock2D(channels, heads, attn_groups, eps, scale) if attention else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        if self.attention is not None:
            x = self.attention(x)
        return self.resnets[1](x, temb)


class UNet2DModel(ModelMixin):
    """Unconditional (optionally class-conditional) image-space UNet."""

    config_class = UNet2DConfig
    conversion = "weights_conversion.unet_2d"

    def __init__(self, config: UNet2DConfig | None = None, **kwargs) -> None:
        super().__init__(config, **kwargs)
        c: UNet2DConfig = self.config
        chs = list(c.block_out_channels)
        temb = c.time_embedding_dim or chs[0] * 4

        def heads(ch: int) -> int:
            return 1 if c.attention_head_dim is None else ch // c.attention_head_dim

        self.conv_in = nn.Conv2d(c.in_channels, chs[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chs[0], temb)
        self.class_embedding = nn.Embedding(c.num_class_embeds, temb) if c.num_class_embeds else None

        self.down_blocks = nn.ModuleList()
        prev = chs[0]
        for i, (kind, ch) in enumerate(zip(c.down_block_types, chs)):
            ins = [prev] + [ch] * (c.layers_per_block - 1)
            last = i == len(chs) - 1
            self.down_blocks.append(
                UNetLevel(
                    ins,
                    ch,
                    temb,
                    kind == "AttnDownBlock2D",
                    heads(ch),
                    c.norm_num_groups,
                    c.norm_eps,
                    downsample=not last,
                    downsample_padding=c.downsample_padding,
                )
            )
            prev = ch

        self.mid_block = None
        if c.mid_block_type is not None:
            self.mid_block = MidBlock(
                chs[-1],
                temb,
                heads(chs[-1]),
                c.norm_num_groups,
                c.attn_norm_num_groups or c.norm_num_groups,
                c.norm_eps,
                c.mid_block_scale_factor,
                c.add_attention,
            )

        # decoder: each level has one more ResNet than the encoder; the skips it consumes come from
        # the encoder level's outputs in reverse, the last one from the level below (or conv_in)
        self.up_blocks = nn.ModuleList()
        rev = chs[::-1]
        prev = rev[0]
        for i, (kind, ch) in enumerate(zip(c.up_block_types, rev)):
            skip_last = rev[min(i + 1, len(chs) - 1)]
            n = c.layers_per_block + 1
            ins = [(prev if j == 0 else ch) + (skip_last if j == n - 1 else ch) for j in range(n)]
            last = i == len(chs) - 1
            self.up_blocks.append(
                UNetLevel(
                    ins, ch, temb, kind == "AttnUpBlock2D", heads(ch), c.norm_num_groups, c.norm_eps, upsample=not last
                )
            )
            prev = ch

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
        skips = [x]
        for level in self.down_blocks:
            x, states = level(x, emb)
            skips.extend(states)
        if self.mid_block is not None:
            x = self.mid_block(x, emb)
        for level in self.up_blocks:
            x, _ = level(x, emb, skips)
        x = self.conv_out(F.silu(self.conv_norm_out(x)))
        return UNet2DOutput(sample=x) if return_dict else (x,)
