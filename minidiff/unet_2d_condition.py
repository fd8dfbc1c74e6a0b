"""UNet2DConditionModel: the text-conditioned latent denoiser of Stable Diffusion 1.x / 2.x and SDXL.

References:
1. Rombach, Blattmann, Lorenz, Esser, Ommer. "High-Resolution Image Synthesis with Latent Diffusion
   Models", CVPR 2022. https://arxiv.org/abs/2112.10752
2. Ronneberger, Fischer, Brox. "U-Net: Convolutional Networks for Biomedical Image Segmentation", 2015.
3. Vaswani et al. "Attention Is All You Need", 2017 (the transformer block, sinusoidal embedding).
4. Shazeer. "GLU Variants Improve Transformer", 2020 (the GEGLU feed-forward).
5. Podell et al. "SDXL: Improving Latent Diffusion Models for High-Resolution Image Synthesis", 2023
   (the micro-conditioning: image size, crop and aesthetic score). https://arxiv.org/abs/2307.01952
6. diffusers' UNet2DConditionModel, whose config keys and checkpoints this model reads.

Shape of the network: conv_in -> down levels (ResNet block, then a spatial transformer attending to
the text context, repeated; stride-2 conv) -> mid (ResNet, transformer, ResNet) -> up levels (ResNet
blocks on the features concatenated with the matching skip, transformers, nearest x2 + conv) -> conv_out.

Note the Stable Diffusion meaning of `attention_head_dim`: it is the NUMBER of heads per level (an int
or one per level, SD2: [5, 10, 20, 20]); the per-head width is channels / heads. diffusers kept the
misleading name for compatibility with existing configs; `num_attention_heads` overrides it if given.

SDXL (`addition_embed_type="text_time"`) adds a second embedding to the timestep's: each of the K
micro-conditioning numbers (`time_ids`: original size, crop corner, target size or aesthetic score)
gets the same sinusoidal embedding as a timestep, `addition_time_embed_dim` wide; the K embeddings
are flattened, appended to the pooled text embedding, and go through a 2-layer MLP (`add_embedding`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from weights_conversion.unet_2d_condition import FORMAT

from .config import ConfigBase, check_levels, check_supported
from .layers import (
    Attention,
    MidBlock,
    TimestepEmbedding,
    as_timestep_batch,
    timestep_embedding,
    unet_levels,
)
from .lora import lora_scale
from .modeling import ModelMixin
from .outputs import BaseOutput

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", None)
ADDITION_EMBED_TYPES = (None, "text_time")


def _per_level(value: Any, n: int, name: str) -> tuple:
    """An int (or bool) for every level, or one value per level."""
    if isinstance(value, tuple):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries, one per level ({n}) expected")
        return value
    return (value,) * n


@dataclass(frozen=True)
class UNet2DConditionConfig(ConfigBase):
    """What the network is built from (diffusers' key names; weights_conversion refuses the features
    minidiff does not implement, SDXL's and others', when it reads a diffusers config)."""

    sample_size: int | tuple[int, int] | None = 64
    in_channels: int = 4  # 9 for inpainting UNets (latents + mask + masked-image latents)
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 768  # 1024 for SD2 (OpenCLIP ViT-H)
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8  # the number of heads, see the module docstring
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False  # SD2: proj_in / proj_out are Linear, not 1x1 convs
    upcast_attention: bool = False  # SD2.1: attention in fp32 even when the model runs in fp16
    time_embedding_dim: int | None = None
    time_cond_proj_dim: int | None = None  # LCM-distilled UNets: the width of the guidance-scale embedding
    # SDXL: "text_time" (pooled text + micro-conditioning), the width of each number's sinusoidal
    # embedding, and the MLP's input width (pooled width + K * addition_time_embed_dim)
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        check_levels("UNet2DConditionModel", self.block_out_channels, self.down_block_types, self.up_block_types)
        check_supported(
            "UNet2DConditionModel",
            (
                ("down_block_types", self.down_block_types, DOWN_BLOCKS),
                ("up_block_types", self.up_block_types, UP_BLOCKS),
                ("mid_block_type", (self.mid_block_type,), MID_BLOCKS),
                ("addition_embed_type", (self.addition_embed_type,), ADDITION_EMBED_TYPES),
            ),
        )
        if self.addition_embed_type == "text_time":
            for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
                value = getattr(self, key)
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                    raise ValueError(
                        f"UNet2DConditionModel: addition_embed_type='text_time' needs {key} "
                        f"(a positive int), got {value!r}"
                    )
        for key in (
            "layers_per_block",
            "attention_head_dim",
            "num_attention_heads",
            "cross_attention_dim",
            "transformer_layers_per_block",
        ):
            for v in _per_level(getattr(self, key), n, key):
                if not (isinstance(v, int) or (v is None and key == "num_attention_heads")):
                    raise ValueError(
                        f"UNet2DConditionModel: {key} must be an int or one int per level, got {getattr(self, key)!r}"
                    )

    def level(self, key: str) -> tuple:
        """A per-level setting, expanded to one value per down level."""
        if key == "heads":  # see the module docstring: `attention_head_dim` counts heads
            return _per_level(self.num_attention_heads or self.attention_head_dim, len(self.block_out_channels), key)
        return _per_level(getattr(self, key), len(self.block_out_channels), key)


@dataclass
class UNet2DConditionOutput(BaseOutput):
    sample: torch.Tensor


class FeedForward(nn.Module):
    """GEGLU MLP: one projection gives a value half and a gate half, value * gelu(gate), then back to dim."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.proj_in = nn.Linear(dim, dim * mult * 2)
        self.proj_out = nn.Linear(dim * mult, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(value * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention, cross-attention on the text context, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int, upcast: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads=heads, head_dim=dim // heads, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, heads=heads, head_dim=dim // heads, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer blocks over the H*W positions of a feature map, with a residual around them all."""

    def __init__(
        self,
        channels: int,
        heads: int,
        context_dim: int,
        depth: int,
        groups: int,
        linear_projection: bool,
        upcast: bool,
    ) -> None:
        super().__init__()
        inner = heads * (channels // heads)
        self.linear_projection = linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        # SD1 projects with 1x1 convs, SD2 with Linear layers: the same map, stored differently
        self.proj_in = nn.Linear(channels, inner) if linear_projection else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(inner, heads, context_dim, upcast) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if linear_projection else nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        if not self.linear_projection:
            y = self.proj_in(y)
        y = y.permute(0, 2, 3, 1).reshape(b, h * w, -1)  # (B, H*W, C)
        if self.linear_projection:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context)
        if self.linear_projection:
            y = self.proj_out(y)
        y = y.reshape(b, h, w, -1).permute(0, 3, 1, 2)  # (B, C, H, W)
        if not self.linear_projection:
            y = self.proj_out(y.contiguous())
        return y + x


class UNet2DConditionModel(ModelMixin):
    """Predicts the noise (or v) in a latent, given the timestep and the text encoder's hidden states."""

    config_class = UNet2DConditionConfig
    weights_format = FORMAT

    def __init__(self, config: UNet2DConditionConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        c: UNet2DConditionConfig = self.config
        chs = list(c.block_out_channels)
        temb = c.time_embedding_dim or chs[0] * 4
        heads, context_dims, layers, depths = (
            c.level(k) for k in ("heads", "cross_attention_dim", "layers_per_block", "transformer_layers_per_block")
        )

        def transformer(i: int) -> partial[SpatialTransformer]:
            """The spatial transformer of level i (the mid block's: i = -1), given its channels when built."""
            return partial(
                SpatialTransformer,
                heads=heads[i],
                context_dim=context_dims[i],
                depth=depths[i],
                groups=c.norm_num_groups,
                linear_projection=c.use_linear_projection,
                upcast=c.upcast_attention,
            )

        self.conv_in = nn.Conv2d(c.in_channels, chs[0], c.conv_in_kernel, padding=(c.conv_in_kernel - 1) // 2)
        self.time_embedding = TimestepEmbedding(chs[0], temb, c.time_cond_proj_dim)
        # SDXL's micro-conditioning MLP (the same Linear -> SiLU -> Linear), added to the time embedding
        self.add_embedding = (
            TimestepEmbedding(c.projection_class_embeddings_input_dim, temb)
            if c.addition_embed_type == "text_time"
            else None
        )

        L = len(chs)
        down_blocks, up_blocks = unet_levels(
            chs,
            layers,
            temb,
            [transformer(i) if kind == "CrossAttnDownBlock2D" else None for i, kind in enumerate(c.down_block_types)],
            [
                transformer(L - 1 - i) if kind == "CrossAttnUpBlock2D" else None
                for i, kind in enumerate(c.up_block_types)
            ],
            c.norm_num_groups,
            c.norm_eps,
            c.downsample_padding,
        )
        self.down_blocks = down_blocks
        self.mid_block = (
            MidBlock(chs[-1], temb, transformer(-1), c.norm_num_groups, c.norm_eps, c.mid_block_scale_factor)
            if c.mid_block_type is not None
            else None
        )
        self.up_blocks = up_blocks

        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, chs[0], eps=c.norm_eps)
        self.conv_out = nn.Conv2d(chs[0], c.out_channels, c.conv_out_kernel, padding=(c.conv_out_kernel - 1) // 2)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        timestep_cond: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> UNet2DConditionOutput | tuple[torch.Tensor]:
        """sample (B, C, H, W), timestep (an int, float, 0-d or (B,) tensor), encoder_hidden_states (B, N, D);
        timestep_cond (B, time_cond_proj_dim), an LCM's guidance-scale embedding, is added into the time embedding;
        added_cond_kwargs {"text_embeds": (B, P), "time_ids": (B, K)}, SDXL's pooled text embedding and
        micro-conditioning (required by, and only accepted by, a UNet with addition_embed_type="text_time");
        cross_attention_kwargs: None or {"scale": the LoRA scale}."""
        c: UNet2DConditionConfig = self.config
        _check_cross_attention_kwargs(cross_attention_kwargs)
        if c.center_input_sample:
            sample = 2 * sample - 1.0
        t = as_timestep_batch(timestep, sample.shape[0], sample.device)
        # cross_attention_kwargs["scale"]: the LoRA adapters' scale for this call (minidiff/lora.py)
        with lora_scale(self, (cross_attention_kwargs or {}).get("scale")):
            # the sinusoidal features are computed in fp32, then cast to the model's dtype
            emb = self.time_embedding(
                timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift).to(sample.dtype),
                timestep_cond,
            )
            if self.add_embedding is not None:  # SDXL
                emb = emb + self.added_embedding(added_cond_kwargs, sample.shape[0])
            elif added_cond_kwargs:
                raise ValueError(
                    f"UNet2DConditionModel: added_cond_kwargs ({sorted(added_cond_kwargs)}) given to a UNet without "
                    "added conditioning (addition_embed_type=None): only SDXL-style UNets ('text_time') take them"
                )

            x = self.conv_in(sample)
            skips = [x]  # every encoder state, consumed in reverse by the decoder
            for block in self.down_blocks:
                x = block(x, emb, encoder_hidden_states, skips)
            if self.mid_block is not None:
                x = self.mid_block(x, emb, encoder_hidden_states)
            for block in self.up_blocks:
                x = block(x, emb, encoder_hidden_states, skips)
            x = self.conv_out(F.silu(self.conv_norm_out(x)))
        return UNet2DConditionOutput(sample=x) if return_dict else (x,)

    def added_embedding(self, added_cond_kwargs: dict[str, torch.Tensor] | None, batch: int) -> torch.Tensor:
        """SDXL's micro-conditioning: [pooled text | sinusoidal(time_ids) flattened] -> add_embedding, (B, temb)."""
        c: UNet2DConditionConfig = self.config
        need = "added_cond_kwargs={'text_embeds': pooled text embedding (B, P), 'time_ids': micro-conditioning (B, K)}"
        if added_cond_kwargs is None:
            raise ValueError(f"UNet2DConditionModel: this UNet has addition_embed_type='text_time' (SDXL): pass {need}")
        missing = [k for k in ("text_embeds", "time_ids") if added_cond_kwargs.get(k) is None]
        if missing:
            raise ValueError(f"UNet2DConditionModel: added_cond_kwargs has no {' and no '.join(missing)}: pass {need}")
        unknown = sorted(set(added_cond_kwargs) - {"text_embeds", "time_ids"})
        if unknown:
            raise ValueError(f"UNet2DConditionModel: added_cond_kwargs has unknown keys {unknown}: pass {need}")
        text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
        n = text_embeds.shape[0] if text_embeds.ndim == 2 else -1
        if n not in (1, batch) or time_ids.numel() % n or time_ids.ndim > 2:
            raise ValueError(
                f"UNet2DConditionModel: added_cond_kwargs text_embeds must be (B, P) and time_ids (B, K) with B the "
                f"sample batch ({batch}) or 1, got text_embeds {tuple(text_embeds.shape)}, "
                f"time_ids {tuple(time_ids.shape)}"
            )
        # each number embedded like a timestep (fp32), then one row of K embeddings per sample
        times = timestep_embedding(time_ids.flatten(), c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift)
        features = torch.cat([text_embeds.to(times.dtype), times.reshape(n, -1)], dim=-1)
        if features.shape[-1] != c.projection_class_embeddings_input_dim:
            k = time_ids.numel() // n
            raise ValueError(
                f"UNet2DConditionModel: text_embeds width {text_embeds.shape[-1]} + {k} time_ids x "
                f"addition_time_embed_dim {c.addition_time_embed_dim} = {features.shape[-1]}, but "
                f"projection_class_embeddings_input_dim is {c.projection_class_embeddings_input_dim} "
                "(SDXL base: 1280 + 6 x 256; refiner: 1280 + 5 x 256)"
            )
        return self.add_embedding(features.to(self.add_embedding.linear_1.weight.dtype))


def _check_cross_attention_kwargs(kwargs: dict[str, Any] | None) -> None:
    if kwargs is None:
        return
    if not isinstance(kwargs, dict):
        raise ValueError(f"UNet2DConditionModel: cross_attention_kwargs must be None or a dict, got {type(kwargs)}")
    unknown = sorted(set(kwargs) - {"scale"})
    if unknown:
        raise ValueError(
            f"UNet2DConditionModel: cross_attention_kwargs keys {unknown} are not supported "
            "(minidiff takes only 'scale', the LoRA scale)"
        )
