"""AutoPipelineForText2Image / Image2Image / Inpainting: the pipeline of a task for a model family.

As diffusers' auto_pipeline: the family is read from the pipeline class a folder names in
model_index.json (`from_pretrained`) or from a live pipeline (`from_pipe`), and the task picks the
class of that family. Classes are named, not imported: a family whose pipelines minidiff does not
have (yet) fails with the missing class's name.
"""

from __future__ import annotations

import os
from typing import Any

from ..loading import LoadOptions, load_config
from .base import PIPELINES, DiffusionPipeline, pop_dtype

# family -> (text-to-image, image-to-image, inpainting) class names, as in diffusers' mappings
FAMILIES: dict[str, tuple[str | None, str | None, str | None]] = {
    "stable-diffusion": (
        "StableDiffusionPipeline",
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionInpaintPipeline",
    ),
    "stable-diffusion-xl": (
        "StableDiffusionXLPipeline",
        "StableDiffusionXLImg2ImgPipeline",
        "StableDiffusionXLInpaintPipeline",
    ),
    "lcm": ("LatentConsistencyModelPipeline", "LatentConsistencyModelImg2ImgPipeline", None),
}
TASKS = ("text-to-image", "image-to-image", "inpainting")


def task_class(pipeline_class_name: str, task: str) -> type[DiffusionPipeline]:
    """The class for `task` in the family of `pipeline_class_name`."""
    family = next((f for f, names in FAMILIES.items() if pipeline_class_name in names), None)
    if family is None:
        raise ValueError(
            f"AutoPipeline can't find a pipeline linked to {pipeline_class_name}: minidiff maps "
            f"{', '.join(n for names in FAMILIES.values() for n in names if n)}"
        )
    name = FAMILIES[family][TASKS.index(task)]
    if name is None:
        raise ValueError(f"AutoPipeline can't find a {task} pipeline linked to {pipeline_class_name} ({family})")
    if name not in PIPELINES:
        raise ValueError(f"the {task} pipeline of {pipeline_class_name} is {name}, which minidiff does not have")
    return PIPELINES[name]


class _AutoPipeline:
    """Not instantiated: `from_pretrained` and `from_pipe` return the task's pipeline class."""

    task: str

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        name = type(self).__name__
        raise OSError(f"{name} is not built directly: use {name}.from_pretrained(path) or {name}.from_pipe(pipe)")

    @classmethod
    def from_pretrained(cls, pretrained_model_or_path: str | os.PathLike, **kwargs: Any) -> DiffusionPipeline:
        """Read model_index.json's `_class_name`, then that family's pipeline for the task loads the folder
        (every from_pretrained keyword of DiffusionPipeline is accepted)."""
        peek = dict(kwargs)
        opts = LoadOptions.pop(peek, f"{cls.__name__}.from_pretrained")
        index = load_config(pretrained_model_or_path, None, "model_index.json", opts.local_files_only, hub=opts.hub)
        name = index.get("_class_name")
        if not isinstance(name, str):
            raise ValueError(f"{pretrained_model_or_path}/model_index.json has no pipeline `_class_name`")
        return task_class(name, cls.task).from_pretrained(pretrained_model_or_path, **kwargs)

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **kwargs: Any) -> DiffusionPipeline:
        """The task's pipeline sharing `pipeline`'s components (the same objects); keywords replace
        components or settings. Unlike DiffusionPipeline.from_pipe (and as diffusers), the models keep their
        dtype unless `dtype` is given."""
        if not isinstance(pipeline, DiffusionPipeline):
            raise TypeError(f"from_pipe takes a pipeline, got {type(pipeline).__name__}")
        dtype = pop_dtype(kwargs, f"{cls.__name__}.from_pipe")
        new = task_class(type(pipeline).__name__, cls.task)._share(pipeline, kwargs)
        return new.to(dtype=dtype) if dtype is not None else new


class AutoPipelineForText2Image(_AutoPipeline):
    task = "text-to-image"


class AutoPipelineForImage2Image(_AutoPipeline):
    task = "image-to-image"


class AutoPipelineForInpainting(_AutoPipeline):
    task = "inpainting"
