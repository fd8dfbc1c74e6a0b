"""CPU speed-ups for loaded models, kept out of the maths.

The model files and layers.py are written as the maths (conv, norm, SiLU, attention, residual).
`apply(model)` re-dresses a model's modules for inference speed without touching a parameter or a
state-dict key: it swaps a module's class for a subclass whose forward computes the same thing
faster, and adds forward hooks. `ModelMixin.from_pretrained` (and every other loader) applies it;
a model built directly stays plain. Each trick was measured on CPU (benchmarks/README.md):

1. 3x3 convs of the ResNet blocks and upsamplers on tiny fp32 CPU maps (<= 8x8: the UNet's lowest
   levels, 1280-2560 channels) run as unfold + one GEMM. oneDNN spends most of such a conv
   re-laying out the large weight (30-100 GFLOP/s); the GEMM reads it as stored (1.4-2.8x faster).
   Everywhere else, and under torch.compile (inductor pre-packs frozen weights), the conv is faster.
2. ResNet blocks under no_grad apply SiLU and add the time embedding and the residual in place on
   fresh intermediates: fewer full-size temporaries, less memory traffic.
3. The VAE decoder runs channels_last: oneDNN then convolves the large maps without reordering each
   conv's input and output to its blocked layout and back (VAE decode 256² bf16: -11%).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ResnetBlock2D, Upsample2D


class GemmConv2d(nn.Conv2d):
    """nn.Conv2d that runs a 3x3, stride-1, padding-1 conv on a <= 8x8 fp32 CPU map as unfold + GEMM."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        if (
            h * w > 64
            or x.dtype != torch.float32
            or x.device.type != "cpu"
            or torch.compiler.is_compiling()
            or self.kernel_size != (3, 3)
            or self.stride != (1, 1)
            or self.padding != (1, 1)
            or self.groups != 1
        ):
            return super().forward(x)
        cols = F.unfold(x, 3, padding=1)  # (B, C_in*9, H*W)
        y = torch.matmul(self.weight.flatten(1), cols)  # (B, C_out, H*W)
        if self.bias is not None:
            y += self.bias[:, None]
        return y.view(b, -1, h, w)


class InplaceResnetBlock2D(ResnetBlock2D):
    """ResnetBlock2D whose SiLUs and additions work in place on fresh intermediates when no gradient
    is recorded (the plain forward otherwise)."""

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        if torch.is_grad_enabled():
            return super().forward(x, temb)
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        if self.time_emb_proj is not None:
            h += self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        h += x
        return h if self.output_scale_factor == 1.0 else h / self.output_scale_factor


def _to_channels_last(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])


def _to_contiguous(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    return output.contiguous()


def _swap(module: nn.Module, cls: type[nn.Module]) -> None:
    """Give `module` the subclass `cls` of its class: same attributes, parameters and keys, cls.forward."""
    if type(module) is cls.__base__:
        module.__class__ = cls


def apply(model: nn.Module) -> nn.Module:
    """Dress `model`'s modules with the fast paths above, in place; returns the model. Idempotent."""
    for module in model.modules():
        if isinstance(module, ResnetBlock2D):
            _swap(module, InplaceResnetBlock2D)
            _swap(module.conv1, GemmConv2d)
            _swap(module.conv2, GemmConv2d)
        elif isinstance(module, Upsample2D):
            _swap(module.conv, GemmConv2d)
    decoder = getattr(model, "decoder", None)  # AutoencoderKL's
    if isinstance(decoder, nn.Module) and _to_channels_last not in decoder._forward_pre_hooks.values():
        decoder.register_forward_pre_hook(_to_channels_last)
        decoder.register_forward_hook(_to_contiguous)
    return model
