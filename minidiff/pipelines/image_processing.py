"""Images in and out of the VAE: PIL / numpy / tensor -> [-1, 1] tensors, masks -> {0, 1}, and back.

Mirrors diffusers' VaeImageProcessor for the inputs the Stable Diffusion pipelines take, so the
same picture gives the same tensor: PIL images are resized (Lanczos) to a multiple of 8, numpy
arrays and tensors are expected in [0, 1] (tensors already in [-1, 1] are passed through).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .base import numpy_to_pil

ImageInput = Image.Image | np.ndarray | torch.Tensor | list


def _as_list(image: ImageInput, what: str) -> list:
    images = image if isinstance(image, list) else [image]
    if not images:
        raise ValueError(f"`{what}` is an empty list")
    kinds = {type(i) for i in images}
    if len(kinds) > 1 or not isinstance(images[0], (Image.Image, np.ndarray, torch.Tensor)):
        raise TypeError(
            f"`{what}` must be a PIL image, a numpy array, a torch tensor, or a list of one of those; "
            f"got {', '.join(sorted(k.__name__ for k in kinds))}"
        )
    return images


def _default_size(
    image: Image.Image | torch.Tensor, height: int | None, width: int | None, multiple: int
) -> tuple[int, int]:
    if isinstance(image, Image.Image):
        w, h = image.size
    else:
        h, w = image.shape[-2:]
    height, width = height or h, width or w
    return height - height % multiple, width - width % multiple


def preprocess_image(
    image: ImageInput, height: int | None = None, width: int | None = None, multiple: int = 8, mask: bool = False
) -> torch.Tensor:
    """-> (B, C, H, W) float32: images in [-1, 1]; with `mask=True` one channel binarised at 0.5."""
    what = "mask_image" if mask else "image"
    images = _as_list(image, what)
    if isinstance(images[0], Image.Image):
        height, width = _default_size(images[0], height, width, multiple)
        images = [i.resize((width, height), resample=Image.Resampling.LANCZOS) for i in images]
        images = [i.convert("L") if mask else i.convert("RGB") for i in images]
        arrays = [np.asarray(i).astype(np.float32) / 255.0 for i in images]
        arrays = [a[..., None] if a.ndim == 2 else a for a in arrays]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    else:
        if isinstance(images[0], np.ndarray):
            arrays = [a[None] if a.ndim == 3 or (mask and a.ndim == 2) else a for a in images]
            arrays = [a[..., None] if a.ndim == 3 else a for a in arrays]  # (B, H, W) masks
            x = torch.from_numpy(np.concatenate(arrays).astype(np.float32)).permute(0, 3, 1, 2)
        else:
            tensors = [t[None] if t.ndim == 3 else t for t in images]
            tensors = [t[:, None] if t.ndim == 3 else t for t in tensors]
            tensors = [t[None, None] if t.ndim == 2 else t for t in tensors]
            x = torch.cat(tensors).float()
            if x.shape[1] == 4 and not mask:  # already VAE latents
                return x
        if x.ndim != 4:
            raise ValueError(f"`{what}` must have 3 or 4 dimensions, got shape {tuple(x.shape)}")
        height, width = _default_size(x, height, width, multiple)
        if x.shape[-2:] != (height, width):
            x = F.interpolate(x, size=(height, width))
    if mask:
        if x.shape[1] != 1:
            raise ValueError(f"`mask_image` must have one channel, got shape {tuple(x.shape)}")
        return (x >= 0.5).to(torch.float32)
    if x.min() < 0:
        warnings.warn(
            "`image` is already in [-1, 1]; minidiff (like diffusers) expects [0, 1] and will not rescale it",
            stacklevel=3,
        )
        return x
    return 2.0 * x - 1.0


def postprocess_image(image: torch.Tensor, output_type: str) -> Any:
    """VAE output in [-1, 1] -> "pt" tensor / "np" (B, H, W, C) array / "pil" images, all in [0, 1]."""
    image = (image / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return image
    array = image.cpu().permute(0, 2, 3, 1).float().numpy()
    return array if output_type == "np" else numpy_to_pil(array)
