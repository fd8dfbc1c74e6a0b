"""DiffusionPipeline: a bundle of components (models, scheduler, tokenizer) read from model_index.json.

A diffusers pipeline folder has `model_index.json` naming, for each component, the library and
class that stores it (`"unet": ["diffusers", "UNet2DConditionModel"]`) and a subfolder of the same
name. minidiff maps those class names onto its own classes (COMPONENT_CLASSES), loads each
subfolder, and picks the pipeline class from `_class_name` when called as
`DiffusionPipeline.from_pretrained` (every subclass registers itself by name when it is defined).
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from weights_conversion.configs import DIFFUSERS_VERSION

from .. import files
from ..autoencoder_kl import AutoencoderKL
from ..clip_text import CLIPTextModel, CLIPTextModelWithProjection
from ..config import FrozenDict
from ..loading import LoadOptions, download_pipeline, load_config
from ..modeling import check_xformers
from ..outputs import BaseOutput
from ..schedulers import SCHEDULERS
from ..tokenizer import CLIPTokenizer
from ..unet_2d import UNet2DModel
from ..unet_2d_condition import UNet2DConditionModel
from .image_processing import VaeImageProcessor, numpy_to_pil
from .offload import ModelOffload, SequentialOffload, offload_device

# components a diffusers folder may list that minidiff does not run (and does not need)
OPTIONAL_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")


@dataclass
class ImagePipelineOutput(BaseOutput):
    images: Any  # list of PIL images, an (B, H, W, C) numpy array, or a (B, C, H, W) tensor


# diffusers / transformers class names -> the minidiff classes that read them
COMPONENT_CLASSES: dict[str, type] = {
    "UNet2DModel": UNet2DModel,
    "UNet2DConditionModel": UNet2DConditionModel,
    "AutoencoderKL": AutoencoderKL,
    "CLIPTextModel": CLIPTextModel,
    "CLIPTextModelWithProjection": CLIPTextModelWithProjection,
    "CLIPTokenizer": CLIPTokenizer,
    "CLIPTokenizerFast": CLIPTokenizer,  # same files, same ids
    **SCHEDULERS,
}


def _library_entry(component: Any) -> tuple[str | None, str | None]:
    """model_index.json's [library, class] of a component: transformers' classes for the text side."""
    if component is None:
        return (None, None)
    name = type(component).__name__
    return ("transformers" if name.startswith("CLIP") else "diffusers", name)


def pop_dtype(kwargs: dict[str, Any], what: str) -> torch.dtype | None:
    """`dtype` / `torch_dtype` out of kwargs, checked as from_pretrained checks them."""
    return LoadOptions.pop({k: kwargs.pop(k) for k in ("dtype", "torch_dtype") if k in kwargs}, what).dtype


# pipeline class names (model_index.json's `_class_name`) -> classes; filled by __init_subclass__
PIPELINES: dict[str, type[DiffusionPipeline]] = {}


class DiffusionPipeline:
    """Base class: loading, saving, device/dtype moves and the progress bar."""

    component_names: ClassVar[tuple[str, ...]] = ()
    optional_components: ClassVar[tuple[str, ...]] = ()
    # settings kept in model_index.json beside the components (SDXL's force_zeros_for_empty_prompt):
    # from_pretrained passes them to __init__, save_pretrained writes back the pipeline's attributes
    config_names: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        PIPELINES[cls.__name__] = cls

    def __init__(self, **components: Any) -> None:
        for name in self.component_names:
            if name not in components and name not in self.optional_components:
                raise TypeError(f"{type(self).__name__} needs the component {name!r}")
            setattr(self, name, components.get(name))
        self._progress_bar_config: dict[str, Any] = {}

    # -- loading and saving --------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> DiffusionPipeline:
        """Load every component listed in model_index.json; `unet=...` etc. replace one instead.

        Keywords as diffusers: `dtype` (or `torch_dtype`), `variant`, `use_safetensors`, `local_files_only`,
        for Hub ids `revision`, `token` (`use_auth_token`), `cache_dir`, `force_download` (the whole
        pipeline is fetched first, as diffusers does, then read from that folder); the pipeline's own
        settings (`requires_safety_checker`, ...); `low_cpu_mem_usage` either way (always meta + assign)."""
        opts = LoadOptions.pop(kwargs, f"{cls.__name__}.from_pretrained")
        path = pretrained_model_name_or_path
        index = load_config(path, None, "model_index.json", opts.local_files_only, hub=opts.hub)
        pipeline_cls = cls._class_from_index(index, path)
        names = pipeline_cls.component_names
        if not Path(path).is_dir():  # a Hub id: one snapshot holding the components not given
            needed = [n for n in names if n not in kwargs and isinstance(index.get(n), list) and index[n][1]]
            path = download_pipeline(
                str(path),
                needed,
                use_safetensors=opts.use_safetensors,
                variant=opts.variant,
                local_files_only=opts.local_files_only,
                hub=opts.hub,
            )
        components: dict[str, Any] = {}
        for name in names:
            if name in kwargs:
                components[name] = kwargs.pop(name)
                continue
            entry = index.get(name)
            if entry is None or entry == [None, None] or entry[1] is None:
                if name in pipeline_cls.optional_components:
                    components[name] = None
                    continue
                raise ValueError(f"{path}/model_index.json has no entry for the component {name!r}")
            component_cls = COMPONENT_CLASSES.get(entry[1])
            if component_cls is None:
                raise ValueError(
                    f"{path}: component {name!r} is a {entry[0]}.{entry[1]}, which minidiff cannot load "
                    f"(it reads {sorted(COMPONENT_CLASSES)})"
                )
            args: dict[str, Any] = {"subfolder": name, "local_files_only": opts.local_files_only}
            if isinstance(component_cls, type) and issubclass(component_cls, torch.nn.Module):
                args.update(dtype=opts.dtype, variant=opts.variant, use_safetensors=opts.use_safetensors)
            components[name] = component_cls.from_pretrained(path, **args)
        settings = pipeline_cls._setting_names()
        for name in settings:
            if name in kwargs:
                components[name] = kwargs.pop(name)
            elif name in index:
                components[name] = index[name]
        for name in pipeline_cls._unused_components():
            if kwargs.get(name, None) is None:  # diffusers' `safety_checker=None`: nothing to load
                kwargs.pop(name, None)
        params = pipeline_cls._init_parameters()  # other keywords of the pipeline's own (add_watermarker)
        components |= {k: kwargs.pop(k) for k in list(kwargs) if k in params and k not in components}
        if kwargs:
            raise TypeError(f"{pipeline_cls.__name__}.from_pretrained got unknown arguments {sorted(kwargs)}")
        pipe = pipeline_cls(**components)
        pipe._name_or_path = pretrained_model_name_or_path
        pipe._settings = {k: components[k] for k in settings if k in components}  # for `config`
        return pipe

    @classmethod
    def _class_from_index(cls, index: dict[str, Any], path: Any) -> type[DiffusionPipeline]:
        if cls is not DiffusionPipeline:
            return cls
        name = index.get("_class_name")
        if name not in PIPELINES:
            raise ValueError(
                f"{path}/model_index.json names the pipeline {name!r}, which minidiff does not have "
                f"(it has {sorted(PIPELINES)})"
            )
        return PIPELINES[name]

    @classmethod
    def _init_parameters(cls) -> dict[str, inspect.Parameter]:
        params = inspect.signature(cls.__init__).parameters
        return {k: p for k, p in params.items() if k != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}

    @classmethod
    def _unused_components(cls) -> tuple[str, ...]:
        """diffusers' components that minidiff does not run, listed as None in `.components` / `.config`:
        a pipeline taking diffusers' `safety_checker` lists all three as diffusers' SD pipelines do
        (safety checker, its feature extractor, the IP-adapter image encoder); others the ones they take."""
        params = cls._init_parameters()
        if "safety_checker" in params:
            return OPTIONAL_COMPONENTS
        return tuple(n for n in params if n in OPTIONAL_COMPONENTS and n not in cls.component_names)

    @classmethod
    def _setting_names(cls) -> tuple[str, ...]:
        """The pipeline's settings kept in model_index.json: config_names (SDXL's
        force_zeros_for_empty_prompt), and requires_safety_checker where __init__ takes it, as diffusers
        registers it for the pipelines with a safety checker."""
        extra = ("requires_safety_checker",) if "requires_safety_checker" in cls._init_parameters() else ()
        return tuple(cls.config_names) + tuple(n for n in extra if n not in cls.config_names)

    @property
    def config(self) -> FrozenDict:
        """diffusers' `pipe.config`: each component as (library, class) -- (None, None) for one minidiff
        does not run -- then the pipeline's settings, `_name_or_path` after from_pretrained, the class
        name and the diffusers version model_index.json carries."""
        entries: dict[str, Any] = {name: _library_entry(c) for name, c in self.components.items()}
        params = self._init_parameters()
        given = getattr(self, "_settings", {})  # what from_pretrained / from_pipe handed __init__
        for name in self._setting_names():
            default = params[name].default if name in params else None
            default = given.get(name, None if default is inspect.Parameter.empty else default)
            entries[name] = getattr(self, name, default)
        entries.update(getattr(self, "_extra_config", {}))
        if getattr(self, "_name_or_path", None) is not None:
            entries["_name_or_path"] = self._name_or_path
        entries |= {"_class_name": type(self).__name__, "_diffusers_version": DIFFUSERS_VERSION}
        return FrozenDict(entries)

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **kwargs: Any) -> DiffusionPipeline:
        """A pipeline of this class sharing `pipeline`'s components (the same objects: no copy, no extra
        memory), as diffusers: keywords replace components or settings; settings the new class does not
        take are kept in its config as `_name`. Like diffusers, the models are then moved to `dtype`
        (default float32) -- in place, so the original pipeline's shared models move too."""
        dtype = pop_dtype(kwargs, f"{cls.__name__}.from_pipe")
        new_cls = type(pipeline) if cls is DiffusionPipeline else cls
        return new_cls._share(pipeline, kwargs).to(dtype=dtype or torch.float32)

    @classmethod
    def _share(cls, pipeline: DiffusionPipeline, kwargs: dict[str, Any]) -> DiffusionPipeline:
        """A `cls` built from `pipeline`'s components and settings, `kwargs` replacing some."""
        new_cls = cls
        old_config = dict(pipeline.config)
        name_or_path = old_config.pop("_name_or_path", None)
        del old_config["_class_name"], old_config["_diffusers_version"]
        init: dict[str, Any] = {}
        params = new_cls._init_parameters()
        for name in new_cls.component_names + tuple(n for n in new_cls._unused_components() if n in params):
            init[name] = kwargs.pop(name) if name in kwargs else pipeline.components.get(name)
        for name in new_cls._setting_names():
            if name in kwargs:
                init[name] = kwargs.pop(name)
            elif name in old_config or f"_{name}" in old_config:
                init[name] = old_config.pop(name) if name in old_config else old_config.pop(f"_{name}")
        init |= {k: kwargs.pop(k) for k in list(kwargs) if k in params and k not in init}
        if kwargs:
            raise TypeError(f"{new_cls.__name__}.from_pipe got unknown arguments {sorted(kwargs)}")
        new = new_cls(**init)
        old_components = set(pipeline.components) | set(new.components)
        extra = {k if k.startswith("_") else f"_{k}": v for k, v in old_config.items() if k not in old_components}
        new._extra_config = extra
        new._name_or_path = name_or_path
        new._settings = {k: init[k] for k in new_cls._setting_names() if k in init}
        return new

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        overwrite: bool | None = None,
    ) -> None:
        """Write one subfolder per component and model_index.json (last), in the diffusers layout;
        `safe_serialization`, `variant` and `max_shard_size` go to every model's save_pretrained.
        Every file is written atomically. overwrite=None writes into an existing folder as diffusers
        does (a new folder appears complete or not at all); True builds the new folder beside the old
        one and swaps it in whole, so no stale file (an old fp16 variant) stays; False refuses one."""
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in self.config.items() if k != "_name_or_path"}
        weights = {"safe_serialization": safe_serialization, "variant": variant, "max_shard_size": max_shard_size}
        with files.output_folder(save_directory, overwrite, marker="model_index.json") as out:
            for name in self.component_names:
                component = getattr(self, name)
                if component is None:
                    continue
                if isinstance(component, torch.nn.Module):
                    component.save_pretrained(out / name, **weights)
                else:
                    component.save_pretrained(out / name)
            for name in OPTIONAL_COMPONENTS:
                config.setdefault(name, [None, None])
            files.write_text(out / "model_index.json", json.dumps(config, indent=2, sort_keys=True) + "\n")

    # -- devices, dtypes, progress ---------------------------------------------------------------

    @property
    def components(self) -> dict[str, Any]:
        """diffusers' key set: the components minidiff runs, then those it does not run, as None."""
        components = {name: getattr(self, name) for name in self.component_names}
        return components | {name: None for name in self._unused_components() if name not in components}

    def _modules(self) -> list[torch.nn.Module]:
        return [c for c in self.components.values() if isinstance(c, torch.nn.Module)]

    def to(self, *args: Any, **kwargs: Any) -> DiffusionPipeline:
        """`pipe.to("cuda")`, `pipe.to(torch.float16)` or both: moves every model."""
        moves_device = any(not isinstance(a, torch.dtype) for a in args) or "device" in kwargs
        if moves_device and getattr(self, "_offload", None) is not None:
            raise ValueError(
                "CPU offload is on: the hooks place the models; call remove_all_hooks() before .to(device)"
            )
        for module in self._modules():
            module.to(*args, **kwargs)
        return self

    @property
    def device(self) -> torch.device:
        """Where the pipeline computes: the models' device, or with CPU offload the accelerator."""
        offload = getattr(self, "_offload", None)
        if offload is not None:
            return offload.device
        modules = self._modules()
        return modules[0].device if modules else torch.device("cpu")

    _execution_device = device  # diffusers' name for where a call computes

    @property
    def dtype(self) -> torch.dtype:
        modules = self._modules()
        return modules[0].dtype if modules else torch.float32

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """e.g. `pipe.set_progress_bar_config(disable=True)`; kwargs go to tqdm."""
        self._progress_bar_config = kwargs

    def progress_bar(self, iterable: Any = None, total: int | None = None) -> tqdm:
        if iterable is not None:
            return tqdm(iterable, **self._progress_bar_config)
        return tqdm(total=total, **self._progress_bar_config)

    numpy_to_pil = staticmethod(numpy_to_pil)

    @functools.cached_property
    def image_processor(self) -> VaeImageProcessor:
        """diffusers' `pipe.image_processor` (for a pipeline with a VAE)."""
        return VaeImageProcessor(vae_scale_factor=self._vae_scale_factor())

    @functools.cached_property
    def mask_processor(self) -> VaeImageProcessor:
        """diffusers' inpainting `pipe.mask_processor`: one channel, binarised at 0.5, not normalised."""
        return VaeImageProcessor(
            vae_scale_factor=self._vae_scale_factor(), do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )

    def _vae_scale_factor(self) -> int:
        vae = getattr(self, "vae", None)
        if vae is None:
            raise AttributeError(f"{type(self).__name__} has no VAE, so no image processor")
        return 2 ** (len(vae.config.block_out_channels) - 1)

    # -- memory: offload, slicing, tiling --------------------------------------------------------

    # the order a call runs its models in (diffusers' attribute); None: text encoders, unet, vae
    model_cpu_offload_seq: ClassVar[str | None] = None

    def _offload_models(self) -> list[torch.nn.Module]:
        components = {k: v for k, v in self.components.items() if isinstance(v, torch.nn.Module)}
        names = sorted(components, key=lambda n: (not n.startswith("text_encoder"), n != "unet", n != "vae"))
        if self.model_cpu_offload_seq:
            seq = self.model_cpu_offload_seq.split("->")
            names = [n for n in seq if n in components] + [n for n in names if n not in seq]
        return [components[n] for n in names]

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None) -> None:
        """Keep the models in CPU memory and move each whole model to the accelerator when it runs
        (the one before goes back): much less accelerator memory, little slower. As diffusers: the
        accelerator is found (or `device` given, `gpu_id` its index); with none, RuntimeError."""
        device = offload_device("enable_model_cpu_offload", gpu_id, device)
        self.remove_all_hooks()
        self._offload = ModelOffload(self._offload_models(), device)

    def enable_sequential_cpu_offload(
        self, gpu_id: int | None = None, device: torch.device | str | None = None
    ) -> None:
        """Keep the weights in CPU memory and copy each layer's to the accelerator only for its own
        forward: the least accelerator memory, slow. Device rules as enable_model_cpu_offload."""
        device = offload_device("enable_sequential_cpu_offload", gpu_id, device)
        self.remove_all_hooks()
        self._offload = SequentialOffload(self._offload_models(), device)

    def maybe_free_model_hooks(self) -> None:
        """After a call with model offload: the last model that ran back to the CPU (diffusers' name)."""
        if getattr(self, "_offload", None) is not None:
            self._offload.offload()

    def remove_all_hooks(self) -> None:
        """Undo CPU offload: the models stay on the CPU, and run where they are again."""
        if getattr(self, "_offload", None) is not None:
            self._offload.remove()
        self._offload = None

    def enable_attention_slicing(self, slice_size: str | int | None = "auto") -> None:
        """Attention in slices (less peak memory, same result): on the UNet, as diffusers.
        See ModelMixin.set_attention_slice for `slice_size`."""
        self.set_attention_slice(slice_size)

    def disable_attention_slicing(self) -> None:
        self.enable_attention_slicing(None)

    def set_attention_slice(self, slice_size: str | int | None) -> None:
        for module in self._modules():
            if isinstance(module, UNet2DConditionModel):  # the component diffusers slices
                module.set_attention_slice(slice_size)

    def enable_xformers_memory_efficient_attention(self, attention_op: Any = None) -> None:
        """Raises as diffusers does without xformers (ModuleNotFoundError) or without CUDA. minidiff
        always computes attention with PyTorch's scaled_dot_product_attention (flash / memory-efficient
        kernels included), so with xformers present this changes nothing."""
        check_xformers()

    def disable_xformers_memory_efficient_attention(self) -> None:
        """A no-op: minidiff's attention is SDPA either way."""

    # older diffusers spellings of the VAE's own switches (diffusers 0.42 has only pipe.vae.enable_tiling())
    def enable_vae_slicing(self) -> None:
        self.vae.enable_slicing()

    def disable_vae_slicing(self) -> None:
        self.vae.disable_slicing()

    def enable_vae_tiling(self) -> None:
        self.vae.enable_tiling()

    def disable_vae_tiling(self) -> None:
        self.vae.disable_tiling()
