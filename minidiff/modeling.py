"""The base class of every minidiff model: from_pretrained / save_pretrained and output types.

Loading is: read the foreign config -> dataclass config (the model's `weights_format`, a
weights_conversion.ModelFormat, handed the model's `config_class`), build the model on the meta
device (no memory, no random init), read the weights (minidiff.loading), rename them with the
strict converter against the meta model's exact keys and shapes, then
`load_state_dict(strict=True, assign=True)`, which adopts the loaded tensors instead of copying.
Original LDM single files go through minidiff.ldm_file, which needs only the class.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from weights_conversion import ModelFormat

from . import fast, files, ldm_file
from .layers import Attention
from .loading import LoadOptions, find_weight_files, load_config, read_state_dict, with_variant

# diffusers' processors that compute plain softmax attention, as minidiff's SDPA does
SDPA_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0")


class AttnProcessor2_0:
    """What `attn_processors` reports for each layer: attention through torch's SDPA (diffusers' name)."""

    def __repr__(self) -> str:
        return "AttnProcessor2_0()"


# -- weight files as diffusers / transformers write them ------------------------------------------

_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """`max_shard_size`: bytes as an int, or a string such as "5GB" (10^9) / "500MiB" (2^20)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str) and (m := re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", size.upper())):
        value = int(float(m.group(1)) * _SIZE_UNITS[m.group(2) or "B"])
    else:
        raise ValueError(f"max_shard_size must be a number of bytes or a size such as '5GB', got {size!r}")
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def _split_shards(state_dict: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Keys in order into shards of at most max_bytes (a larger tensor gets a shard of its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def save_weights(
    state_dict: dict[str, torch.Tensor],
    folder: Path,
    stem: str,
    safe_serialization: bool = True,
    variant: str | None = None,
    max_shard_size: int | str | None = None,
) -> list[Path]:
    """Write `stem[.variant].safetensors` (or `.bin`), or, past max_shard_size, the shards
    `stem[.variant]-00001-of-0000N.ext` and `stem.ext.index[.variant].json` (diffusers' and transformers'
    names). Weight files of the same stem, format and variant left from an earlier save are removed,
    so a loader never picks a stale single file over the new shards (diffusers does the same)."""
    ext = "safetensors" if safe_serialization else "bin"
    base = stem + (f".{variant}" if variant else "")
    shards = _split_shards(state_dict, parse_size(max_shard_size)) if max_shard_size is not None else [state_dict]
    names = (
        [f"{base}.{ext}"]
        if len(shards) == 1
        else [f"{base}-{i:05d}-of-{len(shards):05d}.{ext}" for i in range(1, len(shards) + 1)]
    )
    written = []
    for name, shard in zip(names, shards, strict=True):
        if safe_serialization:
            from safetensors.torch import save_file

            with files.atomic_file(folder / name) as tmp:
                save_file(shard, str(tmp), metadata={"format": "pt"})
        else:
            files.torch_save(shard, folder / name)
        written.append(folder / name)
    index_name = with_variant(f"{stem}.{ext}.index.json", variant)
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state_dict.values())
        weight_map = {key: name for name, shard in zip(names, shards, strict=True) for key in shard}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        written.append(files.write_text(folder / index_name, json.dumps(index, indent=2, sort_keys=True) + "\n"))
    stale = re.compile(rf"{re.escape(base)}(-\d{{5}}-of-\d{{5}})?\.{ext}|{re.escape(index_name)}")
    for old in folder.iterdir():
        if stale.fullmatch(old.name) and old not in written:
            old.unlink()
    return written


class ModelMixin(nn.Module):
    """Config handling, loading and saving shared by all models."""

    config_class: ClassVar[type]
    weights_format: ClassVar[ModelFormat]  # how the class is stored by diffusers / transformers
    # weight file stems, tried in order when loading; saving names safetensors after the first and
    # pickles after the last (transformers: model.safetensors but pytorch_model.bin)
    weights_names: ClassVar[tuple[str, ...]] = ("diffusion_pytorch_model",)
    config_name: ClassVar[str] = "config.json"

    def __init__(self, config: Any = None, **kwargs: Any) -> None:
        super().__init__()
        if config is None:
            config = self.config_class(**kwargs)
        elif kwargs:
            raise TypeError("pass either a config object or keyword arguments, not both")
        elif isinstance(config, dict):
            config = self._config_from_dict(config)
        elif not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    def __getattr__(self, name: str) -> Any:
        # diffusers code reads config values off the model too (`unet.in_channels`)
        try:
            return super().__getattr__(name)
        except AttributeError:
            config = self.__dict__.get("config")
            if config is not None and name in config:
                return config[name]
            raise

    @classmethod
    def _config_from_dict(cls, raw: dict[str, Any]) -> Any:
        """A foreign (diffusers / transformers) JSON config -> this class's config dataclass."""
        return cls.weights_format.config_from_dict(cls.config_class, raw)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs: Any
    ):
        """Load a diffusers / transformers folder (or Hub id): config, then one weight format.

        Keywords as diffusers: `dtype` (or its older name `torch_dtype`), `variant`, `use_safetensors`
        (True: safetensors only, False: pickles only, None: safetensors first), `local_files_only`, and
        for Hub ids `revision`, `token` (`use_auth_token`), `cache_dir`, `force_download`.
        `low_cpu_mem_usage` is accepted either way: minidiff always builds on the meta device."""
        opts = LoadOptions.pop(kwargs, f"{cls.__name__}.from_pretrained")
        if kwargs:
            raise TypeError(f"{cls.__name__}.from_pretrained got unknown arguments {sorted(kwargs)}")
        where = str(pretrained_model_name_or_path) + (f"/{subfolder}" if subfolder else "")
        path, local_only, hub = pretrained_model_name_or_path, opts.local_files_only, opts.hub
        raw = load_config(path, subfolder, cls.config_name, local_only, hub=hub)
        config = cls._config_from_dict(raw)
        files = find_weight_files(
            path, subfolder, cls.weights_names, opts.variant, local_only, opts.use_safetensors, hub=hub
        )
        state_dict = read_state_dict(files)
        return cls.from_foreign_state_dict(config, state_dict, opts.dtype, what=f"{cls.__name__} weights in {where}")

    @classmethod
    def from_foreign_state_dict(
        cls,
        config: Any,
        state_dict: dict[str, torch.Tensor],
        torch_dtype: torch.dtype | None = None,
        what: str = "",
        fmt: ModelFormat | None = None,
    ):
        """Build on the meta device, rename strictly against its exact keys/shapes, adopt the tensors.
        `fmt` is another weights_conversion format than the class's own (e.g. the LDM single-file one)."""
        with torch.device("meta"):
            model = cls(config)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        converted = (fmt or cls.weights_format).convert(state_dict, config, expected, what or cls.__name__)
        return model._adopt(converted, torch_dtype)

    @classmethod
    def from_single_file(
        cls,
        path: str | os.PathLike,
        torch_dtype: torch.dtype | str | None = None,
        use_ema: bool | None = None,
        prediction_type: str | None = None,
    ):
        """Load this model out of an original CompVis / LDM single file (.safetensors or .ckpt),
        its config inferred from the tensors' shapes, offline. See minidiff.ldm_file."""
        return ldm_file.load_model(cls, path, torch_dtype=torch_dtype, use_ema=use_ema, prediction_type=prediction_type)

    def _adopt(self, state_dict: dict[str, torch.Tensor], torch_dtype: torch.dtype | None):
        # diffusers loads in float32 unless told otherwise, whatever the file's dtype
        dtype = torch_dtype or torch.float32
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        self.load_state_dict(state_dict, strict=True, assign=True)
        return fast.apply(self.eval().requires_grad_(False))  # CPU speed-ups, same maths (minidiff/fast.py)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        overwrite: bool | None = None,
    ) -> None:
        """Write config.json + weights in the diffusers / transformers layout (loadable by them):
        `variant` names the files `*.fp16.*`, `max_shard_size` (bytes or "5GB"; default as diffusers
        "10GB", transformers "50GB") splits them into shards with a `*.index.json`. Every file is written
        atomically; `overwrite` as minidiff.files.output_folder: None writes into an existing folder as
        diffusers does, True replaces the whole folder, False refuses one."""
        fmt = self.weights_format
        state_dict = {k: v.detach().contiguous() for k, v in fmt.export(self.state_dict(), self.config).items()}
        stem = self.weights_names[0] if safe_serialization else self.weights_names[-1]
        config = json.dumps(fmt.config_to_dict(self.config), indent=2, sort_keys=True) + "\n"
        if max_shard_size is None:  # the library's default: diffusers 10GB, transformers 50GB
            max_shard_size = "50GB" if self.weights_names[0] == "model" else "10GB"
        parse_size(max_shard_size)  # a bad size refused before anything is written
        with files.output_folder(save_directory, overwrite, marker=self.config_name) as out:
            save_weights(state_dict, out, stem, safe_serialization, variant, max_shard_size)
            files.write_text(out / self.config_name, config)

    # -- attention: always SDPA; diffusers' processor and slicing calls ----------------------------

    def _attention_modules(self) -> dict[str, Attention]:
        return {name: m for name, m in self.named_modules() if isinstance(m, Attention)}

    def set_attention_slice(self, slice_size: str | int | list[int | None] | None = "auto") -> None:
        """Compute attention in slices of `slice_size` (batch x head) rows, as diffusers'
        SlicedAttnProcessor: "auto" halves each layer's heads, "max" one row at a time, an int for every
        layer, a list one per attention layer, None turns slicing off. Same result, less peak memory."""
        modules = list(self._attention_modules().values())
        if slice_size == "auto":
            sizes: list[int | None] = [max(m.heads // 2, 1) for m in modules]
        elif slice_size == "max":
            sizes = [1] * len(modules)
        elif isinstance(slice_size, list):
            if len(slice_size) != len(modules):
                raise ValueError(
                    f"{type(self).__name__} has {len(modules)} attention layers, got {len(slice_size)} slice sizes"
                )
            sizes = slice_size
        else:
            sizes = [slice_size] * len(modules)
        for size, module in zip(sizes, modules, strict=True):
            if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
                raise ValueError(
                    f"slice_size must be 'auto', 'max', a positive int, a list of them or None, got {size!r}"
                )
            if size is not None and size > module.heads:
                raise ValueError(f"slice_size {size} has to be smaller or equal to {module.heads}.")
        for size, module in zip(sizes, modules, strict=True):
            module.slice_size = size

    @property
    def attn_processors(self) -> dict[str, AttnProcessor2_0]:
        """diffusers' view of the attention layers: every one runs PyTorch's SDPA (AttnProcessor2_0).
        The keys are minidiff's module names (`<module>.processor`)."""
        return {f"{name}.processor": AttnProcessor2_0() for name in self._attention_modules()}

    def set_attn_processor(self, processor: Any) -> None:
        """Accepts diffusers' AttnProcessor / AttnProcessor2_0 (one, or a dict with one per layer): both
        compute softmax(QK^T/sqrt(d))V, which minidiff does with SDPA already, so nothing changes.
        Any other processor (xformers, IP-adapter, custom code) is refused: minidiff cannot run it."""
        count = len(self._attention_modules())
        if isinstance(processor, dict):
            if len(processor) != count:
                raise ValueError(
                    f"{type(self).__name__} has {count} attention layers; the dict of processors has "
                    f"{len(processor)} (pass one per layer, e.g. keyed as in `attn_processors`)"
                )
            processors = list(processor.values())
        else:
            processors = [processor]
        for p in processors:
            name = type(p).__name__
            if name not in SDPA_PROCESSORS or not type(p).__module__.startswith(("diffusers", "minidiff")):
                raise ValueError(
                    f"minidiff runs every attention layer with PyTorch's scaled_dot_product_attention and takes only "
                    f"the processors that compute the same ({', '.join(SDPA_PROCESSORS)}); got "
                    f"{type(p).__module__}.{name}"
                )

    def set_default_attn_processor(self) -> None:
        """diffusers' reset to plain attention: minidiff's attention is always plain SDPA (a no-op)."""

    def enable_xformers_memory_efficient_attention(self, attention_op: Any = None) -> None:
        """Fails as diffusers does without xformers (or without CUDA). minidiff always uses PyTorch's
        scaled_dot_product_attention, whose memory-efficient and flash kernels do the same job, so with
        xformers installed this changes nothing."""
        check_xformers()

    def disable_xformers_memory_efficient_attention(self) -> None:
        """A no-op: minidiff's attention is SDPA either way."""


def check_xformers() -> None:
    """What diffusers raises on `enable_xformers_memory_efficient_attention()` without xformers / CUDA."""
    if importlib.util.find_spec("xformers") is None:
        raise ModuleNotFoundError(
            "Refer to https://github.com/facebookresearch/xformers for more information on how to install xformers",
            name="xformers",
        )
    if not torch.cuda.is_available():
        raise ValueError(
            "torch.cuda.is_available() should be True but is False. xformers' memory efficient attention is only "
            "available for GPU "
        )
