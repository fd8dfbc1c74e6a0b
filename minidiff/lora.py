"""Low-rank adapters (LoRA) on a model's Linear and Conv2d layers.

Reference: Hu et al. "LoRA: Low-Rank Adaptation of Large Language Models", 2021.

An adapter adds `scale * up(down(x))` to a layer's output, with `down` a rank-r projection (a Linear,
or for a conv a conv with the layer's kernel, stride and padding) and `up` a 1x1 map back to the
layer's width; scale = weight * alpha / r (`weight` is what set_adapters chooses). `LoRA` holds the
adapters of one layer. It rides on the layer as a forward hook plus a child module whose tensors are
non-persistent buffers, so the layer keeps its class, its parameters and its state-dict keys: with
or without adapters, `state_dict()`, save_pretrained and weights_conversion see the same model
(fast.py swaps layer classes, which a wrapper class would fight with).

`fuse` adds the deltas `scale * up @ down` into the layer's weight and `unfuse` puts back the copy
taken before, bit for bit. File formats and key names live in weights_conversion/lora.py; the
pipeline methods (load_lora_weights, set_adapters, ...) in minidiff/pipelines/loaders.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

Layer = nn.Linear | nn.Conv2d


class LoRAAdapter(nn.Module):
    """One (down, up, scale) adapter. Linear: down (r, in), up (out, r). Conv2d: down (r, in, kh, kw),
    up (out, r, 1, 1)."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, alpha: float | None = None) -> None:
        super().__init__()
        rank = down.shape[0]
        if up.shape[1] != rank:
            raise ValueError(f"LoRA: down has rank {rank} but up has {up.shape[1]} input features")
        self.register_buffer("down", down, persistent=False)
        self.register_buffer("up", up, persistent=False)
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)  # no alpha stored means alpha = r (scale 1)
        self.weight = 1.0  # set_adapters' weight for this adapter

    @property
    def scale(self) -> float:
        return self.weight * self.alpha / self.rank

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, weight={self.weight}"


class LoRA(nn.Module):
    """The adapters of one Linear or Conv2d: which are active, the runtime scale, the fused state."""

    def __init__(self) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []  # adapters fused into the layer's weight (skipped in forward)
        self.runtime_scale = 1.0  # lora_scale(...): multiplies every active adapter's contribution
        self.enabled = True  # disable_lora() turns every unfused adapter off, keeping the active set
        self.register_buffer("original_weight", None, persistent=False)  # the weight before fuse
        self.handle: torch.utils.hooks.RemovableHandle | None = None

    def add(self, name: str, adapter: LoRAAdapter) -> None:
        self.adapters[name] = adapter
        self.active.append(name)

    def delta(self, layer: Layer, x: torch.Tensor) -> torch.Tensor | None:
        """Sum of the active, unfused adapters' outputs for the layer input x (None if there are none)."""
        out = None
        for name in self.active if self.enabled else ():
            if name not in self.adapters or name in self.merged:
                continue
            a: LoRAAdapter = self.adapters[name]
            if isinstance(layer, nn.Conv2d):
                h = F.conv2d(x, a.down.to(x.dtype), stride=layer.stride, padding=layer.padding)
                h = F.conv2d(h, a.up.to(x.dtype))
            else:
                h = F.linear(F.linear(x, a.down.to(x.dtype)), a.up.to(x.dtype))
            h = h * (a.scale * self.runtime_scale)
            out = h if out is None else out + h
        return out

    def delta_weight(self, layer: Layer, name: str, scale: float) -> torch.Tensor:
        """`scale * adapter scale * up @ down` in the layer weight's shape (conv kernels flattened)."""
        a: LoRAAdapter = self.adapters[name]
        w = a.up.flatten(1).float() @ a.down.flatten(1).float()
        return (w * (a.scale * scale)).view(layer.weight.shape)

    @torch.no_grad()
    def fuse(self, layer: Layer, lora_scale: float = 1.0, names: Sequence[str] | None = None) -> None:
        """Add the active (or the named) adapters into the layer's weight, keeping the weight before."""
        names = [n for n in (self.active if names is None else names) if n in self.adapters and n not in self.merged]
        if not names:
            return
        if self.original_weight is None:
            self.original_weight = layer.weight.detach().clone()
        w = layer.weight.float()
        for name in names:
            w = w + self.delta_weight(layer, name, lora_scale)
            self.merged.append(name)
        layer.weight.copy_(w.to(layer.weight.dtype))

    @torch.no_grad()
    def unfuse(self, layer: Layer) -> None:
        """Put back the weight as it was before the first fuse (bit for bit)."""
        if self.original_weight is not None:
            layer.weight.copy_(self.original_weight)
            self.original_weight = None
        self.merged = []


def _add_lora(layer: Layer, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    delta = layer.lora.delta(layer, args[0])
    return output if delta is None else output + delta


def attach(layer: Layer) -> LoRA:
    """The LoRA of `layer`, added (as `layer.lora` and a forward hook) on first use."""
    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
        raise TypeError(f"LoRA: only Linear and Conv2d layers take adapters, not {type(layer).__name__}")
    lora = getattr(layer, "lora", None)
    if lora is None:
        lora = LoRA().to(layer.weight.device)
        layer.lora = lora
        lora.handle = layer.register_forward_hook(_add_lora)
    return lora


def detach(layer: Layer) -> None:
    """Remove every adapter from `layer` (unfusing first): the layer is as it was before attach."""
    lora = getattr(layer, "lora", None)
    if lora is None:
        return
    lora.unfuse(layer)
    lora.handle.remove()
    del layer.lora


def lora_layers(module: nn.Module) -> Iterator[tuple[str, Layer, LoRA]]:
    """(name, layer, its LoRA) for every layer inside `module` that carries adapters."""
    for name, layer in module.named_modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)) and isinstance(getattr(layer, "lora", None), LoRA):
            yield name, layer, layer.lora


@contextmanager
def lora_scale(module: nn.Module, scale: float | None) -> Iterator[None]:
    """Multiply every active adapter's contribution inside `module` by `scale` while the block runs.

    diffusers' `cross_attention_kwargs={"scale": s}` (UNet) and `lora_scale` (text encoders). None or
    1.0 changes nothing; fused adapters are part of the weight and are not rescaled (as in peft).
    """
    if scale is None or scale == 1.0:
        yield
        return
    loras = [lora for _, _, lora in lora_layers(module)]
    before = [lora.runtime_scale for lora in loras]
    for lora in loras:
        lora.runtime_scale *= scale
    try:
        yield
    finally:
        for lora, value in zip(loras, before, strict=True):
            lora.runtime_scale = value
