"""AutoencoderKL: the VAE that maps images to Stable Diffusion's latents and back.

References:
1. Rombach, Blattmann, Lorenz, Esser, Ommer. "High-Resolution Image Synthesis with Latent Diffusion
   Models", CVPR 2022 (the KL-regularised autoencoder, the latent scaling factor). https://arxiv.org/abs/2112.10752
2. Kingma, Welling. "Auto-Encoding Variational Bayes", 2014 (the diagonal Gaussian posterior).
3. Esser, Rombach, Ommer. "Taming Transformers for High-Resolution Image Synthesis", 2021 (the
   encoder / decoder architecture).
4. diffusers' AutoencoderKL, whose config keys and checkpoints this model reads.

Encoder: conv_in -> levels of ResNet blocks with stride-2 downsampling (input padded (0,1,0,1)
first, as the original) -> mid (ResNet, one-head self-attention, ResNet) -> GroupNorm, SiLU, conv to
2 x latent_channels (mean and log-variance) -> quant_conv. The decoder mirrors it from
post_quant_conv, with nearest x2 upsampling. The levels and mid block are the UNets' (minidiff/layers.py)
without a time embedding, skip connections or attention in the levels. `scaling_factor` is not applied here: pipelines
scale latents by it after encoding and divide by it before decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from weights_conversion.autoencoder_kl import FORMAT

from .config import ConfigBase, check_levels, check_supported
from .layers import AttentionBlock2D, MidBlock, UNetBlock2D
from .modeling import ModelMixin
from .noise import randn_tensor  # noise drawn exactly as diffusers draws it
from .outputs import BaseOutput
from .tiling import tiled


@dataclass(frozen=True)
class AutoencoderKLConfig(ConfigBase):
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"  # the only activation (swish is its other name); read by code written for diffusers
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 512
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True  # read by pipelines that run the VAE in fp32 when the rest is fp16
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        check_levels("AutoencoderKL", self.block_out_channels, self.down_block_types, self.up_block_types)
        check_supported(
            "AutoencoderKL",
            (
                ("down_block_types", self.down_block_types, ("DownEncoderBlock2D",)),
                ("up_block_types", self.up_block_types, ("UpDecoderBlock2D",)),
                ("act_fn", (self.act_fn,), ("silu", "swish")),
            ),
        )


class DiagonalGaussianDistribution:
    """The encoder's posterior N(mean, exp(logvar)), per latent element."""

    def __init__(self, parameters: torch.Tensor) -> None:
        self.parameters = parameters
        self.mean, logvar = parameters.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # keeps exp() finite for untrained or extreme inputs
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        noise = randn_tensor(self.mean.shape, generator, self.parameters.device, self.parameters.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean


@dataclass
class AutoencoderKLOutput(BaseOutput):
    latent_dist: DiagonalGaussianDistribution


@dataclass
class DecoderOutput(BaseOutput):
    sample: torch.Tensor


def _mid_block(c: AutoencoderKLConfig, channels: int) -> MidBlock:
    """ResNet, one-head self-attention, ResNet."""
    attention = partial(AttentionBlock2D, heads=1, groups=c.norm_num_groups) if c.mid_block_add_attention else None
    return MidBlock(channels, attention=attention, groups=c.norm_num_groups)


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> posterior parameters (B, 2 * latent_channels, H / 2^(L-1), W / 2^(L-1))."""

    def __init__(self, c: AutoencoderKLConfig) -> None:
        super().__init__()
        chs, groups = c.block_out_channels, c.norm_num_groups
        self.conv_in = nn.Conv2d(c.in_channels, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            UNetBlock2D(
                chs[max(i - 1, 0)],
                ch,
                c.layers_per_block,
                groups=groups,
                downsample=i < len(chs) - 1,
                downsample_padding=0,
            )
            for i, ch in enumerate(chs)
        )
        self.mid_block = _mid_block(c, chs[-1])
        self.conv_norm_out = nn.GroupNorm(groups, chs[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chs[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latent (B, latent_channels, h, w) -> image (B, 3, h * 2^(L-1), w * 2^(L-1))."""

    def __init__(self, c: AutoencoderKLConfig) -> None:
        super().__init__()
        chs, groups = c.block_out_channels[::-1], c.norm_num_groups
        self.conv_in = nn.Conv2d(c.latent_channels, chs[0], 3, padding=1)
        self.mid_block = _mid_block(c, chs[0])
        # one more ResNet per level than the encoder, as in the original
        self.up_blocks = nn.ModuleList(
            UNetBlock2D(chs[max(i - 1, 0)], ch, c.layers_per_block + 1, groups=groups, upsample=i < len(chs) - 1)
            for i, ch in enumerate(chs)
        )
        self.conv_norm_out = nn.GroupNorm(groups, chs[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chs[-1], c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(ModelMixin):
    """`encode(images).latent_dist` -> DiagonalGaussianDistribution; `decode(latents).sample` -> images in [-1, 1].

    Memory helpers, as diffusers': `enable_slicing()` runs a batch one image at a time;
    `enable_tiling()` runs images larger than `tile_sample_min_size` (the config's sample_size) in
    overlapping tiles blended at the seams (minidiff/tiling.py), which changes the result slightly.
    """

    config_class = AutoencoderKLConfig
    weights_format = FORMAT

    def __init__(self, config: AutoencoderKLConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        c: AutoencoderKLConfig = self.config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.quant_conv = nn.Conv2d(2 * c.latent_channels, 2 * c.latent_channels, 1) if c.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c.latent_channels, c.latent_channels, 1) if c.use_post_quant_conv else None
        self.use_slicing = False
        self.use_tiling = False
        # tiles: the training size in pixels and latents, a quarter of each tile overlapping the next
        size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
        self.tile_sample_min_size = size
        self.tile_latent_min_size = int(size / 2 ** (len(c.block_out_channels) - 1))
        self.tile_overlap_factor = 0.25

    def enable_tiling(self) -> None:
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def enable_slicing(self) -> None:
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior parameters of a batch: tiled when tiling is on and the image exceeds a tile."""
        if self.use_tiling and max(x.shape[-2:]) > self.tile_sample_min_size:
            return self._tiled_moments(x)
        h = self.encoder(x)
        return h if self.quant_conv is None else self.quant_conv(h)

    def _tiled_moments(self, x: torch.Tensor) -> torch.Tensor:
        def encode_tile(tile: torch.Tensor) -> torch.Tensor:
            h = self.encoder(tile)
            return h if self.quant_conv is None else self.quant_conv(h)

        size, latent = self.tile_sample_min_size, self.tile_latent_min_size
        return tiled(encode_tile, x, size, latent, self.tile_overlap_factor)

    def _pixels(self, z: torch.Tensor) -> torch.Tensor:
        """Images of a batch of latents: tiled when tiling is on and the latents exceed a tile."""
        if self.use_tiling and max(z.shape[-2:]) > self.tile_latent_min_size:
            return self._tiled_pixels(z)
        return self._decode_tile(z)

    def _decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z if self.post_quant_conv is None else self.post_quant_conv(z))

    def _tiled_pixels(self, z: torch.Tensor) -> torch.Tensor:
        size, latent = self.tile_latent_min_size, self.tile_sample_min_size
        return tiled(self._decode_tile, z, size, latent, self.tile_overlap_factor)

    def encode(
        self, x: torch.Tensor, return_dict: bool = True
    ) -> AutoencoderKLOutput | tuple[DiagonalGaussianDistribution]:
        if self.use_slicing and x.shape[0] > 1:
            h = torch.cat([self._moments(image) for image in x.split(1)])
        else:
            h = self._moments(x)
        posterior = DiagonalGaussianDistribution(h)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(
        self, z: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None
    ) -> DecoderOutput | tuple[torch.Tensor]:
        """`generator` is accepted and unused, as in diffusers (its pipelines pass one)."""
        if self.use_slicing and z.shape[0] > 1:
            x = torch.cat([self._pixels(latent) for latent in z.split(1)])
        else:
            x = self._pixels(z)
        return DecoderOutput(sample=x) if return_dict else (x,)

    def tiled_encode(
        self, x: torch.Tensor, return_dict: bool = True
    ) -> AutoencoderKLOutput | tuple[DiagonalGaussianDistribution]:
        """encode() in tiles whatever the size (diffusers' public method)."""
        posterior = DiagonalGaussianDistribution(self._tiled_moments(x))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def tiled_decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        """decode() in tiles whatever the size (diffusers' public method)."""
        x = self._tiled_pixels(z)
        return DecoderOutput(sample=x) if return_dict else (x,)

    def forward(
        self,
        sample: torch.Tensor,
        sample_posterior: bool = False,
        return_dict: bool = True,
        generator: torch.Generator | None = None,
    ) -> DecoderOutput | tuple[torch.Tensor]:
        """Reconstruct: encode, take the posterior's mode (or a sample), decode."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)
