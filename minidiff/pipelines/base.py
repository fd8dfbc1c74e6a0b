"""DiffusionPipeline: a bundle of components (models, scheduler, tokenizer) read from model_index.json.

A diffusers pipeline folder has `model_index.json` naming, for each component, the library and
class that stores it (`"unet": ["diffusers", "UNet2DConditionModel"]`) and a subfolder of the same
name. minidiff maps those class names onto its own classes (COMPONENT_CLASSES), loads each
subfolder, and picks the pipeline class from `_class_name` when called as
`DiffusionPipeline.from_pretrained` (every subclass registers itself by name when it is defined).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from weights_conversion.configs import DIFFUSERS_VERSION

from .. import files
from ..autoencoder_kl import AutoencoderKL
from ..clip_text import CLIPTextModel, CLIPTextModelWithProjection
from ..loading import load_config
from ..outputs import BaseOutput
from ..schedulers import SCHEDULERS
from ..tokenizer import CLIPTokenizer
from ..unet_2d import UNet2DModel
from ..unet_2d_condition import UNet2DConditionModel

# components a diffusers folder may list that minidiff does not run (and does not need)
OPTIONAL_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")


@dataclass
class ImagePipelineOutput(BaseOutput):
    images: Any  # list of PIL images, an (B, H, W, C) numpy array, or a (B, C, H, W) tensor


def numpy_to_pil(images: np.ndarray) -> list[Image.Image]:
    """(B, H, W, C) floats in [0, 1] -> PIL images, rounding as diffusers does."""
    if images.ndim == 3:
        images = images[None]
    images = (images * 255).round().astype("uint8")
    if images.shape[-1] == 1:
        return [Image.fromarray(im.squeeze(-1), mode="L") for im in images]
    return [Image.fromarray(im) for im in images]


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
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        torch_dtype: torch.dtype | None = None,
        variant: str | None = None,
        local_files_only: bool = False,
        **overrides: Any,
    ) -> DiffusionPipeline:
        """Load every component listed in model_index.json; `unet=...` etc. replace one instead."""
        path = pretrained_model_name_or_path
        index = load_config(path, None, "model_index.json", local_files_only)
        pipeline_cls = cls
        if cls is DiffusionPipeline:
            name = index.get("_class_name")
            pipeline_cls = PIPELINES.get(name)  # type: ignore[assignment]
            if pipeline_cls is None:
                raise ValueError(
                    f"{path}/model_index.json names the pipeline {name!r}, which minidiff does not have "
                    f"(it has {sorted(PIPELINES)})"
                )
        known = COMPONENT_CLASSES
        components: dict[str, Any] = {}
        for name in pipeline_cls.component_names:
            if name in overrides:
                components[name] = overrides.pop(name)
                continue
            entry = index.get(name)
            if entry is None or entry == [None, None] or entry[1] is None:
                if name in pipeline_cls.optional_components:
                    components[name] = None
                    continue
                raise ValueError(f"{path}/model_index.json has no entry for the component {name!r}")
            component_cls = known.get(entry[1])
            if component_cls is None:
                raise ValueError(
                    f"{path}: component {name!r} is a {entry[0]}.{entry[1]}, which minidiff cannot load "
                    f"(it reads {sorted(known)})"
                )
            kwargs: dict[str, Any] = {"subfolder": name, "local_files_only": local_files_only}
            if isinstance(component_cls, type) and issubclass(component_cls, torch.nn.Module):
                kwargs.update(torch_dtype=torch_dtype, variant=variant)
            components[name] = component_cls.from_pretrained(path, **kwargs)
        for name in pipeline_cls.config_names:
            if name in overrides:
                components[name] = overrides.pop(name)
            elif name in index:
                components[name] = index[name]
        if overrides:
            unknown = sorted(k for k in overrides if k not in OPTIONAL_COMPONENTS)
            if unknown:
                raise TypeError(f"{pipeline_cls.__name__}.from_pretrained got unknown arguments {unknown}")
        return pipeline_cls(**components)

    def save_pretrained(self, save_directory: str | os.PathLike, overwrite: bool | None = None) -> None:
        """Write one subfolder per component and model_index.json (last), in the diffusers layout.
        Every file is written atomically. overwrite=None writes into an existing folder as diffusers
        does (a new folder appears complete or not at all); True builds the new folder beside the old
        one and swaps it in whole, so no stale file (an old fp16 variant) stays; False refuses one."""
        index: dict[str, Any] = {"_class_name": type(self).__name__, "_diffusers_version": DIFFUSERS_VERSION}
        with files.output_folder(save_directory, overwrite, marker="model_index.json") as out:
            for name in self.component_names:
                component = getattr(self, name)
                if component is None:
                    index[name] = [None, None]
                    continue
                library = "transformers" if type(component).__name__.startswith("CLIP") else "diffusers"
                index[name] = [library, type(component).__name__]
                component.save_pretrained(out / name)
            for name in OPTIONAL_COMPONENTS:
                index.setdefault(name, [None, None])
            for name in self.config_names:
                index[name] = getattr(self, name)
            files.write_text(out / "model_index.json", json.dumps(index, indent=2, sort_keys=True) + "\n")

    # -- devices, dtypes, progress ---------------------------------------------------------------

    @property
    def components(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.component_names}

    def _modules(self) -> list[torch.nn.Module]:
        return [c for c in self.components.values() if isinstance(c, torch.nn.Module)]

    def to(self, *args: Any, **kwargs: Any) -> DiffusionPipeline:
        """`pipe.to("cuda")`, `pipe.to(torch.float16)` or both: moves every model."""
        for module in self._modules():
            module.to(*args, **kwargs)
        return self

    @property
    def device(self) -> torch.device:
        modules = self._modules()
        return modules[0].device if modules else torch.device("cpu")

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
