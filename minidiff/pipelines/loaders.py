"""LoRA and textual-inversion loading for the Stable Diffusion pipelines (diffusers' loader API).

`LoraLoaderMixin`: load_lora_weights, set_adapters, get_active_adapters, get_list_adapters,
delete_adapters, fuse_lora / unfuse_lora, unload_lora_weights, enable_lora / disable_lora.
Adapters live on the layers (minidiff/lora.py); file formats and key names in
weights_conversion/lora.py. A file is converted completely before anything is attached, so a
bad key leaves the pipeline as it was.

`TextualInversionLoaderMixin`: load_textual_inversion, maybe_convert_prompt,
unload_textual_inversion. A learned token is an added token of the tokenizer (the next free id,
as transformers' add_tokens gives it) and a new row of the text encoder's embedding table.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from weights_conversion import ConversionError
from weights_conversion.lora import LoRAWeights, Target, convert_lora, embeddings_from_file

from .. import lora
from ..loading import CheckpointError, read_tensors, resolve_file

LORA_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
EMBEDDING_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
Source = str | os.PathLike | Mapping[str, Any] | torch.Tensor


def _read(path: Path) -> tuple[dict[str, Any], dict[str, str] | None]:
    """(tensors, safetensors header metadata) of one file; pickles only with weights_only=True."""
    metadata = None
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata()
        except Exception:  # noqa: BLE001 - read_tensors below names what is wrong with the file
            metadata = None
    data = read_tensors(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a dict")
    return data, metadata


def _resolve(source: str | os.PathLike, weight_name: str | None, defaults: Sequence[str], what: str, hub: dict) -> Path:
    """A file, or `weight_name` (else the first default present, else the folder's only .safetensors) in a
    folder or Hub repo."""
    path = Path(source)
    if path.is_file():
        return path
    if weight_name is not None:
        return resolve_file(source, weight_name, hub=hub)
    for name in defaults:
        found = resolve_file(source, name, required=False, hub=hub)
        if found is not None:
            return found
    if path.is_dir():
        candidates = sorted(path.glob("*.safetensors"))
        if len(candidates) == 1:
            return candidates[0]
    raise FileNotFoundError(f"{what}: no {' or '.join(defaults)} in {source} (name the file with weight_name=...)")


def _layer(model: nn.Module, name: str) -> lora.Layer:
    return model.get_submodule(name)


class LoraLoaderMixin:
    """diffusers' LoRA methods for a pipeline with `unet` and `text_encoder` (and `text_encoder_2`)."""

    def _lora_components(self) -> dict[str, nn.Module]:
        names = ("unet", *TEXT_ENCODERS)
        return {n: m for n in names if isinstance(m := getattr(self, n, None), nn.Module)}

    def get_list_adapters(self) -> dict[str, list[str]]:
        """{component: adapter names}, in loading order."""
        out = {}
        for name, model in self._lora_components().items():
            adapters = list(dict.fromkeys(a for _, _, lo in lora.lora_layers(model) for a in lo.adapters))
            if adapters:
                out[name] = adapters
        return out

    def _all_adapters(self) -> list[str]:
        return list(dict.fromkeys(a for names in self.get_list_adapters().values() for a in names))

    def get_active_adapters(self) -> list[str]:
        for _, model in self._lora_components().items():
            for _, _, lo in lora.lora_layers(model):
                return list(lo.active)
        return []

    def lora_state_dict(self, source: Source, weight_name: str | None = None, **hub: Any) -> dict[str, torch.Tensor]:
        """The tensors of a LoRA file, folder, Hub repo or dict, as stored (no renaming)."""
        return self._read_lora(source, weight_name, hub)[0]

    def _read_lora(self, source: Source, weight_name: str | None, hub: dict) -> tuple[dict, dict | None]:
        if isinstance(source, Mapping):
            return dict(source), None
        return _read(_resolve(source, weight_name, LORA_NAMES, "load_lora_weights", hub))

    def load_lora_weights(
        self, source: Source, adapter_name: str | None = None, weight_name: str | None = None, **hub: Any
    ) -> None:
        """Load a LoRA (file, folder, Hub id or state dict; any format of weights_conversion/lora.py) as
        the adapter `adapter_name` (default: default_0, default_1, ...) of the UNet and text encoders."""
        hub.pop("low_cpu_mem_usage", None)
        state_dict, metadata = self._read_lora(source, weight_name, hub)
        existing = self._all_adapters()
        if adapter_name is None:
            adapter_name = f"default_{len(existing)}"
        if adapter_name in existing:
            raise ValueError(f"load_lora_weights: an adapter named {adapter_name!r} is already loaded")
        components = self._lora_components()
        targets = {}
        for name, model in components.items():
            layers = {n: m.weight.shape for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
            kind = "unet" if name == "unet" else "clip"
            targets[name] = Target(kind, model.config, layers)
        try:
            _, converted = convert_lora(state_dict, targets, metadata)
        except ConversionError as e:
            raise ValueError(f"load_lora_weights: {e}") from None
        for component, layers in converted.items():
            self._attach(components[component], layers, adapter_name)
        # as diffusers: the adapter just loaded becomes the only active one
        self._activate([adapter_name], None)

    @staticmethod
    def _attach(model: nn.Module, layers: Mapping[str, LoRAWeights], adapter_name: str) -> None:
        param = next(model.parameters())
        for name, w in layers.items():
            adapter = lora.LoRAAdapter(
                w.down.to(param.device, param.dtype), w.up.to(param.device, param.dtype), w.alpha
            )
            lora.attach(_layer(model, name)).add(adapter_name, adapter)

    def _activate(self, names: list[str], weights: list[Any] | None) -> None:
        for component, model in self._lora_components().items():
            for _, _, lo in lora.lora_layers(model):
                lo.active = [n for n in names]
                for i, name in enumerate(names):
                    if name in lo.adapters:
                        w = 1.0 if weights is None else weights[i]
                        if isinstance(w, Mapping):
                            w = w.get(component, 1.0)
                        lo.adapters[name].weight = float(w)

    def set_adapters(
        self, adapter_names: str | list[str], adapter_weights: float | dict | list[float | dict | None] | None = None
    ) -> None:
        """Make `adapter_names` the active adapters, each scaled by its weight (default 1); a weight may be a
        {component: weight} dict ("unet", "text_encoder", "text_encoder_2")."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self._all_adapters()]
        if unknown:
            raise ValueError(f"set_adapters: no adapter named {unknown}; loaded: {self._all_adapters()}")
        if adapter_weights is not None and not isinstance(adapter_weights, list):
            adapter_weights = [adapter_weights] * len(names)
        if adapter_weights is not None and len(adapter_weights) != len(names):
            raise ValueError(
                f"set_adapters: {len(adapter_weights)} weights for {len(names)} adapters; give one per adapter"
            )
        if adapter_weights is not None:
            adapter_weights = [1.0 if w is None else w for w in adapter_weights]
            for w in adapter_weights:
                if isinstance(w, Mapping):
                    bad = [
                        k for k, v in w.items() if k not in ("unet", *TEXT_ENCODERS) or not isinstance(v, (int, float))
                    ]
                    if bad:
                        raise ValueError(
                            f"set_adapters: a weight dict maps 'unet' / 'text_encoder' / 'text_encoder_2' to numbers "
                            f"(per-block weights are not supported); got keys {bad}"
                        )
                elif not isinstance(w, (int, float)):
                    raise TypeError(f"set_adapters: an adapter weight must be a number or a dict, got {w!r}")
        self._activate(names, adapter_weights)

    def disable_lora(self) -> None:
        """Turn the (unfused) adapters off, keeping which are active and their weights."""
        self._enable(False)

    def enable_lora(self) -> None:
        self._enable(True)

    def _enable(self, on: bool) -> None:
        for model in self._lora_components().values():
            for _, _, lo in lora.lora_layers(model):
                lo.enabled = on

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for component, model in self._lora_components().items():
            for _, layer, lo in list(lora.lora_layers(model)):
                if any(n in lo.merged for n in names):
                    raise ValueError(f"delete_adapters: {names} are fused into the {component}; unfuse_lora() first")
                for n in names:
                    if n in lo.adapters:
                        del lo.adapters[n]
                lo.active = [n for n in lo.active if n not in names]
                if not len(lo.adapters):
                    lora.detach(layer)

    def unload_lora_weights(self) -> None:
        """Remove every adapter (fused ones are taken out first): the models are as before loading."""
        for model in self._lora_components().values():
            for _, layer, _ in list(lora.lora_layers(model)):
                lora.detach(layer)

    def fuse_lora(
        self,
        components: Sequence[str] = ("unet", "text_encoder"),
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
    ) -> None:
        """Add the active (or the named) adapters, times lora_scale, into the weights of `components`."""
        models = self._lora_components()
        for component in components:
            if component not in models:
                continue
            for _, layer, lo in lora.lora_layers(models[component]):
                lo.fuse(layer, lora_scale, adapter_names)
                if safe_fusing and not torch.isfinite(layer.weight).all():
                    lo.unfuse(layer)
                    raise ValueError(f"fuse_lora: the fused weights of the {component} hold NaN or Inf; not fused")

    def unfuse_lora(self, components: Sequence[str] = ("unet", "text_encoder")) -> None:
        """Restore the weights of `components` exactly as they were before fuse_lora."""
        models = self._lora_components()
        for component in components:
            if component in models:
                for _, layer, lo in lora.lora_layers(models[component]):
                    lo.unfuse(layer)


class TextualInversionLoaderMixin:
    """diffusers' textual-inversion methods for a pipeline with `tokenizer` and `text_encoder`."""

    def load_textual_inversion(
        self,
        pretrained_model_name_or_path: Source | list[Source],
        token: str | list[str] | None = None,
        tokenizer: Any = None,
        text_encoder: nn.Module | None = None,
        weight_name: str | None = None,
        **hub: Any,
    ) -> None:
        """Add learned tokens: A1111 .pt / .safetensors, diffusers learned_embeds, a tensor, or a list of
        them (with a list of tokens). An (n, d) embedding becomes the tokens `tok tok_1 … tok_{n-1}`."""
        tokenizer = tokenizer if tokenizer is not None else getattr(self, "tokenizer", None)
        text_encoder = text_encoder if text_encoder is not None else getattr(self, "text_encoder", None)
        if tokenizer is None or text_encoder is None:
            raise ValueError("load_textual_inversion needs a tokenizer and a text encoder (pass them explicitly)")
        sources = pretrained_model_name_or_path
        sources = list(sources) if isinstance(sources, list) else [sources]
        tokens = list(token) if isinstance(token, list) else [token] * len(sources)
        if len(sources) == 1 and len(tokens) > 1 and isinstance(sources[0], torch.Tensor):
            sources = list(sources[0])  # one (n, d) tensor for n tokens
        if len(tokens) != len(sources):
            raise ValueError(f"load_textual_inversion: {len(sources)} embeddings but {len(tokens)} tokens")
        encoder_key = "clip_g" if text_encoder is getattr(self, "text_encoder_2", None) else "clip_l"

        new_tokens: list[str] = []
        vectors: list[torch.Tensor] = []
        vocab = tokenizer.get_vocab()
        for source, tok in zip(sources, tokens, strict=True):
            if not isinstance(source, (Mapping, torch.Tensor)):
                source = _read(_resolve(source, weight_name, EMBEDDING_NAMES, "load_textual_inversion", hub))[0]
            tok, emb = embeddings_from_file(source, tok, encoder_key)
            if tok in vocab or f"{tok}_1" in vocab or tok in new_tokens:
                raise ValueError(
                    f"load_textual_inversion: the token {tok!r} is already in the tokenizer; choose another token "
                    "or unload_textual_inversion() it first"
                )
            names = [tok] + [f"{tok}_{i}" for i in range(1, emb.shape[0])]
            new_tokens += names
            vectors += list(emb)
        width = text_encoder.get_input_embeddings().weight.shape[-1]
        bad = [tuple(v.shape) for v in vectors if v.shape[-1] != width]
        if bad:
            raise ValueError(f"load_textual_inversion: embeddings of width {bad[0][-1]}, the text encoder's is {width}")

        old = text_encoder.get_input_embeddings()
        table = torch.cat(
            [old.weight.detach(), torch.zeros(len(new_tokens), width, dtype=old.weight.dtype, device=old.weight.device)]
        )
        ids = []
        for name in new_tokens:
            tokenizer.add_tokens(name)
            ids.append(tokenizer.convert_tokens_to_ids(name))
        # ids follow the existing vocabulary (transformers' resize to len(tokenizer) + new tokens)
        size = max(len(tokenizer), old.weight.shape[0])
        if table.shape[0] < size:
            table = torch.cat([table, table.new_zeros(size - table.shape[0], width)])
        for i, v in zip(ids, vectors, strict=True):
            table[i] = v.to(table.dtype)
        self._set_embeddings(text_encoder, table)

    @staticmethod
    def _set_embeddings(text_encoder: nn.Module, table: torch.Tensor) -> None:
        embedding = nn.Embedding(table.shape[0], table.shape[1], device=table.device, dtype=table.dtype)
        embedding.weight.data.copy_(table)
        text_encoder.token_embedding = embedding
        # the config says how many ids the encoder accepts (it checks input ids against it)
        text_encoder.config = dataclasses.replace(text_encoder.config, vocab_size=table.shape[0])

    def maybe_convert_prompt(self, prompt: str | list[str], tokenizer: Any) -> str | list[str]:
        """Expand each multi-vector token to `tok tok_1 … tok_{n-1}` (prompts without one are unchanged)."""
        if isinstance(prompt, list):
            return [self._convert_prompt(p, tokenizer) for p in prompt]
        return self._convert_prompt(prompt, tokenizer)

    @staticmethod
    def _convert_prompt(prompt: str, tokenizer: Any) -> str:
        added = tokenizer.added_tokens_encoder
        for token in set(tokenizer.tokenize(prompt)):
            if token in added:
                i, replacement = 1, token
                while f"{token}_{i}" in added:
                    replacement += f" {token}_{i}"
                    i += 1
                prompt = prompt.replace(token, replacement)
        return prompt

    def unload_textual_inversion(
        self, tokens: str | list[str] | None = None, tokenizer: Any = None, text_encoder: nn.Module | None = None
    ) -> None:
        """Remove learned tokens (all of them by default) from the tokenizer and the embedding table."""
        tokenizer = tokenizer if tokenizer is not None else getattr(self, "tokenizer", None)
        text_encoder = text_encoder if text_encoder is not None else getattr(self, "text_encoder", None)
        learned = {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if not t.special}
        if tokens is None:
            remove = learned
        else:
            wanted = [tokens] if isinstance(tokens, str) else list(tokens)
            remove = {i: t for i, t in learned.items() if t in wanted}
            if not remove:
                raise ValueError(f"unload_textual_inversion: none of {wanted} is a loaded token")
        tokenizer.remove_added_tokens(list(remove.values()))
        old = text_encoder.get_input_embeddings().weight.detach()
        keep = [i for i in range(old.shape[0]) if i not in remove]
        self._set_embeddings(text_encoder, old[keep].clone())


def load_lora_and_embeddings(
    pipe: Any, loras: Sequence[tuple[str, float]] = (), embeddings: Sequence[tuple[str, str | None]] = ()
) -> None:
    """The CLI's --lora FILE[:SCALE] and --embedding FILE[:TOKEN]: every LoRA active at its scale, every
    embedding added (an SDXL file's clip_l / clip_g into both encoders). A file whose token is not in it
    (A1111 .safetensors, SDXL) gets its file name's stem as the token unless one is given."""
    for i, (path, _) in enumerate(loras):
        pipe.load_lora_weights(path, adapter_name=f"lora_{i}")
    if loras:
        pipe.set_adapters([f"lora_{i}" for i in range(len(loras))], [scale for _, scale in loras])
    for path, token in embeddings:
        data, _ = _read(Path(path))
        if token is None and ("emb_params" in data or "clip_l" in data):
            token = Path(path).stem
        if "clip_l" in data and getattr(pipe, "text_encoder_2", None) is not None:
            pipe.load_textual_inversion(data, token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
            pipe.load_textual_inversion(data, token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
        else:
            pipe.load_textual_inversion(data, token=token)
