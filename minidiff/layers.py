"""Building blocks shared by the UNets, the VAE and the text encoder: timestep embedding, ResNet block,
attention, down/up sampling, and the resolution level (UNetBlock2D) and MidBlock both UNets and the VAE
are made of. Plain maths: the CPU speed-ups applied to loaded models live in minidiff/fast.py.

References:
1. Ho, Jain, Abbeel. "Denoising Diffusion Probabilistic Models", 2020 (ResNet blocks, timestep embedding).
2. Vaswani et al. "Attention Is All You Need", 2017 (multi-head attention, sinusoidal embedding).
3. Rombach et al. "High-Resolution Image Synthesis with Latent Diffusion Models", 2022.

Parameter names follow diffusers' leaves where the structure is the same (norm1, conv1,
time_emb_proj, to_q, ...). Deliberate differences, mapped in weights_conversion/:
`to_out` is one Linear (diffusers: `to_out.0`, a ModuleList with a dropout),
`Downsample2D.conv`/`Upsample2D.conv` sit directly on the block as `downsample`/`upsample`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(
    timesteps: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = False,
    freq_shift: float = 1.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, (B,) -> (B, dim), in fp32.

    freq_i = max_period^(-i / (half - freq_shift)); DDPM uses freq_shift=1 and [sin, cos],
    Stable Diffusion freq_shift=0 and [cos, sin] (flip_sin_to_cos).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = timesteps[:, None].float() * freqs[None, :]
    emb = torch.cat(
        [torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)], dim=-1
    )
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def as_timestep_batch(
    timestep: torch.Tensor | float | int, batch: int, device: torch.device, scalar_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """An int, float, 0-d or 1-d timestep broadcast to one value per sample.

    A Python number becomes `scalar_dtype`, by default int64 for ints and float64 for floats.
    """
    if not torch.is_tensor(timestep):
        dtype = scalar_dtype or (torch.float64 if isinstance(timestep, float) else torch.int64)
        timestep = torch.tensor([timestep], dtype=dtype, device=device)
    elif timestep.ndim == 0:
        timestep = timestep[None].to(device)
    if timestep.ndim != 1 or timestep.shape[0] not in (1, batch):
        raise ValueError(
            f"timestep must be a scalar or have one value per sample ({batch}), got shape {tuple(timestep.shape)}"
        )
    return timestep.expand(batch)


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding: Linear -> SiLU -> Linear. With `cond_dim`, a condition (an LCM's
    guidance-scale embedding) is projected to the sinusoidal width and added to it first."""

    def __init__(self, in_dim: int, dim: int, cond_dim: int | None = None) -> None:
        super().__init__()
        self.cond_proj = nn.Linear(cond_dim, in_dim, bias=False) if cond_dim else None
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            t = t + self.cond_proj(condition)
        return self.linear_2(F.silu(self.linear_1(t)))


class ResnetBlock2D(nn.Module):
    """GroupNorm -> SiLU -> conv, (+ time embedding), GroupNorm -> SiLU -> conv, plus a shortcut."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None = None,
        groups: int = 32,
        eps: float = 1e-6,
        output_scale_factor: float = 1.0,
    ) -> None:
        super().__init__()
        self.output_scale_factor = output_scale_factor
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # a 1x1 conv only where the channel count changes
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. With padding 0 the input is padded (0,1,0,1) first, as the original DDPM / VAE."""

    def __init__(self, channels: int, out_channels: int | None = None, padding: int = 1) -> None:
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest x2 (or to an explicit size, to match an odd-sized skip connection), then a 3x3 conv."""

    def __init__(self, channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        # nearest copies values, so no upcast is needed in bf16/fp16 (diffusers upcasts bf16 for torch < 2.1)
        x = (
            F.interpolate(x, scale_factor=2.0, mode="nearest")
            if size is None
            else F.interpolate(x, size=size, mode="nearest")
        )
        return self.conv(x)


class Attention(nn.Module):
    """Multi-head (self or cross) attention through PyTorch's scaled_dot_product_attention.

    Used for the UNet transformer blocks (self/cross), the spatial attention of the DDPM UNet and
    the VAE mid-block (subclass below), and CLIP (causal).

    `slice_size` (None = off; set by ModelMixin.set_attention_slice) is diffusers' attention slicing:
    the batch x heads attention maps are computed `slice_size` at a time, so that only those maps
    are held in memory at once. The result is the unsliced one (within float rounding).
    """

    slice_size: int | None = None

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        head_dim: int = 64,
        bias: bool = False,
        out_bias: bool = True,
        upcast: bool = False,
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.upcast = upcast  # SD2.x: attention scores in fp32 even when the model runs in fp16
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_out = nn.Linear(inner, query_dim, bias=out_bias)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        causal: bool = False,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`mask`: an explicit boolean mask (True = may attend), used instead of `causal` when given."""
        context = x if context is None else context
        b, n, _ = x.shape
        # (B, N, heads*d) -> (B, heads, N, d)
        q, k, v = (
            proj(inp).view(b, -1, self.heads, proj.out_features // self.heads).transpose(1, 2)
            for proj, inp in ((self.to_q, x), (self.to_k, context), (self.to_v, context))
        )
        causal = causal and mask is None
        if self.slice_size is None:
            out = self._attend(q, k, v, mask, causal)
        else:
            out = self._sliced(q, k, v, mask, causal)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool
    ) -> torch.Tensor:
        if self.upcast and q.dtype in (torch.float16, torch.bfloat16):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=causal)
            return out.to(q.dtype)
        # a query whose every key is masked gets an all-zero row (as in transformers)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)

    def _sliced(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool
    ) -> torch.Tensor:
        """_attend over (B, heads) flattened into one batch-major axis, `slice_size` maps at a time."""
        b, h, n, d = q.shape
        q, k, v = (t.flatten(0, 1) for t in (q, k, v))  # (B*heads, N, d): index b * heads + h, as diffusers
        if mask is not None:
            mask = mask.expand(b, h, *mask.shape[-2:]).flatten(0, 1)
        out = q.new_empty(b * h, n, v.shape[-1])
        for start in range(0, b * h, self.slice_size):
            part = slice(start, start + self.slice_size)
            out[part] = self._attend(q[part], k[part], v[part], None if mask is None else mask[part], causal)
        return out.view(b, h, n, -1)


class AttentionBlock2D(Attention):
    """Spatial self-attention on a feature map: GroupNorm, attention over H*W positions, residual."""

    def __init__(
        self,
        channels: int,
        heads: int = 1,
        groups: int | None = 32,
        eps: float = 1e-6,
        rescale_output_factor: float = 1.0,
    ) -> None:
        super().__init__(channels, heads=heads, head_dim=channels // heads, bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps) if groups else None
        self.rescale_output_factor = rescale_output_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        b, c, h, w = x.shape
        y = self.group_norm(x) if self.group_norm is not None else x
        y = super().forward(y.permute(0, 2, 3, 1).reshape(b, h * w, c))  # over (B, H*W, C)
        return (x + y.view(b, h, w, c).permute(0, 3, 1, 2)) / self.rescale_output_factor


def _attend(attention: nn.Module, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    """Self-attention blocks take the feature map alone, cross-attention ones the text context too."""
    return attention(x) if context is None else attention(x, context)


class UNetBlock2D(nn.Module):
    """One resolution level of a UNet or of the VAE: `num_layers` ResNet blocks, each followed by an
    attention block if `attention` (a constructor taking the channel count) is given, then an optional
    stride-2 downsample or x2 upsample.

    Skip connections: an encoder level pushes each state it produces onto `skips` (when it is given);
    a decoder level, built with one `skip_channels` entry per ResNet block, pops one skip per block and
    takes it concatenated to its input, then upsamples to the size of the skip that comes next.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        temb_channels: int | None = None,
        skip_channels: Sequence[int] = (),
        attention: Callable[[int], nn.Module] | None = None,
        groups: int = 32,
        eps: float = 1e-6,
        downsample: bool = False,
        downsample_padding: int = 1,
        upsample: bool = False,
    ) -> None:
        super().__init__()
        widths = [in_channels] + [out_channels] * (num_layers - 1)
        self.takes_skips = bool(skip_channels)
        if self.takes_skips:
            widths = [w + s for w, s in zip(widths, skip_channels, strict=True)]
        self.resnets = nn.ModuleList(ResnetBlock2D(w, out_channels, temb_channels, groups, eps) for w in widths)
        self.attentions = nn.ModuleList(attention(out_channels) for _ in widths) if attention else None
        self.downsample = Downsample2D(out_channels, padding=downsample_padding) if downsample else None
        self.upsample = Upsample2D(out_channels) if upsample else None

    def forward(
        self,
        x: torch.Tensor,
        temb: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        skips: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            if self.takes_skips:
                x = torch.cat([x, skips.pop()], dim=1)
            x = resnet(x, temb)
            if self.attentions is not None:
                x = _attend(self.attentions[i], x, context)
            if skips is not None and not self.takes_skips:
                skips.append(x)
        if self.downsample is not None:
            x = self.downsample(x)
            if skips is not None:
                skips.append(x)
        if self.upsample is not None:
            # to the next skip's size, so that odd sizes (e.g. a 44x36 latent) line up
            x = self.upsample(x, size=skips[-1].shape[-2:] if skips else None)
        return x


def unet_levels(
    block_out_channels: Sequence[int],
    layers_per_block: Sequence[int],
    temb_channels: int,
    down_attention: Sequence[Callable[[int], nn.Module] | None],
    up_attention: Sequence[Callable[[int], nn.Module] | None],
    groups: int,
    eps: float,
    downsample_padding: int = 1,
) -> tuple[nn.ModuleList, nn.ModuleList]:
    """A UNet's encoder and decoder levels, given each one's attention (or None), in their own order.

    Encoder level i: `layers_per_block[i]` ResNets at `block_out_channels[i]`, then a downsample (not
    the last). Decoder level i mirrors encoder level L-1-i with one more ResNet; its ResNets see
    [features from below | skip], the last skip coming from the encoder level below (or conv_in).
    """
    chs, L = block_out_channels, len(block_out_channels)
    down = nn.ModuleList(
        UNetBlock2D(
            chs[max(i - 1, 0)],
            chs[i],
            layers_per_block[i],
            temb_channels,
            attention=down_attention[i],
            groups=groups,
            eps=eps,
            downsample=i < L - 1,
            downsample_padding=downsample_padding,
        )
        for i in range(L)
    )
    up = nn.ModuleList()
    for i in range(L):
        lvl = L - 1 - i  # the encoder level this decoder level mirrors
        up.append(
            UNetBlock2D(
                chs[min(lvl + 1, L - 1)],
                chs[lvl],
                layers_per_block[lvl] + 1,
                temb_channels,
                skip_channels=[chs[lvl]] * layers_per_block[lvl] + [chs[max(lvl - 1, 0)]],
                attention=up_attention[i],
                groups=groups,
                eps=eps,
                upsample=i < L - 1,
            )
        )
    return down, up


class MidBlock(nn.Module):
    """ResNet -> attention (if `attention`, a constructor taking the channel count) -> ResNet, at the
    lowest resolution."""

    def __init__(
        self,
        channels: int,
        temb_channels: int | None = None,
        attention: Callable[[int], nn.Module] | None = None,
        groups: int = 32,
        eps: float = 1e-6,
        output_scale_factor: float = 1.0,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(channels, channels, temb_channels, groups, eps, output_scale_factor) for _ in range(2)
        )
        self.attention = attention(channels) if attention else None

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor | None = None, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        if self.attention is not None:
            x = _attend(self.attention, x, context)
        return self.resnets[1](x, temb)
