"""Images in and out of the VAE: PIL / numpy / tensor -> [-1, 1] tensors, masks -> {0, 1}, and back.

Mirrors diffusers' VaeImageProcessor for the inputs the Stable Diffusion pipelines take, so the
same picture gives the same tensor: PIL images are resized (Lanczos) to a multiple of 8, float
numpy arrays and tensors are expected in [0, 1] (tensors already in [-1, 1] are passed through).

Where diffusers misreads an input, minidiff reads it by what it is, or refuses it by name:
- PIL images of any 8-bit mode (L, LA, P, RGBA, CMYK, ...) are converted to RGB (masks to L), as
  diffusers' `do_convert_rgb` does (its Stable Diffusion pipelines take RGBA/CMYK for latents and
  fail on L/LA/P); 16-bit ones (I;16, I;16B, and I, how Pillow opens 16-bit PNG/TIFF files) are
  scaled by 65535, float ones (F) must lie in [0, 1].
- Integer arrays and tensors are scaled by their dtype (uint8 / 255, uint16 / 65535) where
  diffusers would take 0..255 as if it were 0..1; an integer mask whose values are all 0 or 1 is
  taken as is. Other integer dtypes are refused.
- Float values outside [0, 1] (or [-1, 1]) and NaN/Inf are refused, naming the argument.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..config import FrozenDict
from .checks import check_size

ImageInput = Image.Image | np.ndarray | torch.Tensor | list

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_SCALE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0, np.dtype(">u2"): 65535.0}
_TOLERANCE = 1e-3  # float rounding may leave [0, 1] by a hair


def numpy_to_pil(images: np.ndarray) -> list[Image.Image]:
    """(B, H, W, C) floats in [0, 1] -> PIL images, rounding as diffusers does."""
    if images.ndim == 3:
        images = images[None]
    images = (images * 255).round().astype("uint8")
    if images.shape[-1] == 1:
        return [Image.fromarray(im.squeeze(-1), mode="L") for im in images]
    return [Image.fromarray(im) for im in images]


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
    image: Image.Image | torch.Tensor, height: int | None, width: int | None, multiple: int, what: str
) -> tuple[int, int]:
    if isinstance(image, Image.Image):
        w, h = image.size
    else:
        h, w = image.shape[-2:]
    height, width = height or h, width or w
    if height < multiple or width < multiple:
        raise ValueError(f"`{what}` would be {width} x {height} pixels, less than the {multiple} the VAE needs")
    height, width = height - height % multiple, width - width % multiple
    return check_size(height, width, multiple, (f"{what} height", f"{what} width"))


def _high_depth_to_float(image: Image.Image, what: str) -> Image.Image:
    """A 16-bit or float PIL image -> an 'F' image in [0, 1] (resizable with Lanczos like the rest)."""
    a = np.asarray(image).astype(np.float32)
    if image.mode == "F":
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if not np.isfinite(a).all() or lo < 0 or hi > 1 + _TOLERANCE:
            raise ValueError(f"`{what}` is a float (mode F) PIL image with values in [{lo}, {hi}]; expected [0, 1]")
        return Image.fromarray(a.clip(0, 1))
    if a.size and (a.min() < 0 or a.max() > 65535):
        raise ValueError(
            f"`{what}` is a 32-bit integer (mode I) PIL image with values in [{a.min():.0f}, {a.max():.0f}]; "
            f"minidiff reads mode I as 16-bit (0..65535)"
        )
    return Image.fromarray(a / 65535.0)


def _pil_to_tensor(images: list[Image.Image], height: int, width: int, mask: bool, what: str) -> torch.Tensor:
    arrays = []
    for image in images:
        if image.mode in _SIXTEEN_BIT or image.mode == "F":
            image = _high_depth_to_float(image, what).resize((width, height), resample=Image.Resampling.LANCZOS)
            a = np.asarray(image).clip(0, 1)[..., None]
            arrays.append(a if mask else a.repeat(3, axis=-1))
            continue
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
        a = np.asarray(image.convert("L") if mask else image.convert("RGB")).astype(np.float32) / 255.0
        arrays.append(a[..., None] if a.ndim == 2 else a)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def _to_unit_float(x: torch.Tensor, what: str, mask: bool) -> torch.Tensor:
    """Scale integer pixels by their dtype (uint8 / 255, uint16 / 65535); floats and bools as they are."""
    if x.dtype == torch.bool or x.is_floating_point():
        return x.float()
    scale = {torch.uint8: 255.0, torch.uint16: 65535.0}.get(x.dtype)
    if scale is None:
        raise TypeError(
            f"`{what}` has dtype {x.dtype}, whose value range minidiff cannot tell: pass uint8 (0..255), "
            f"uint16 (0..65535) or floats in [0, 1]"
        )
    if mask and int(x.max()) <= 1:  # a 0/1 mask, as diffusers binarises it
        return x.float()
    return x.float() / scale


def _array_to_tensor(images: list[np.ndarray], what: str, mask: bool) -> torch.Tensor:
    if len({a.shape for a in images}) > 1:
        raise ValueError(f"`{what}` arrays differ in shape: {sorted({a.shape for a in images})}")
    arrays = []
    for a in images:
        if a.ndim == 2:  # (H, W): one gray image
            a = a[None, ..., None]
        elif a.ndim == 3 and (not mask or a.shape[-1] == 1):  # (H, W, C)
            a = a[None]
        elif a.ndim == 3:  # masks, as diffusers: (B, H, W)
            a = a[..., None]
        elif a.ndim != 4:
            raise ValueError(f"`{what}` must be (H, W, C) or (B, H, W, C), got shape {a.shape}")
        arrays.append(a)
    array = np.concatenate(arrays)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"`{what}` has dtype {array.dtype}, not numbers")
    if array.dtype.kind in "iu":
        scale = _SCALE.get(array.dtype)
        if scale is None:
            raise TypeError(
                f"`{what}` has dtype {array.dtype}, whose value range minidiff cannot tell: pass uint8 (0..255), "
                f"uint16 (0..65535) or floats in [0, 1]"
            )
        if mask and array.size and array.max() <= 1:  # a 0/1 mask, as diffusers binarises it
            scale = 1.0
        array = array.astype(np.float32) / scale
    x = torch.from_numpy(array.astype(np.float32)).permute(0, 3, 1, 2)
    if x.shape[1] == 4 and not mask:
        raise ValueError(
            f"`{what}` has 4 channels (RGBA?); pass RGB, e.g. `array[..., :3]` (only tensors are taken as latents)"
        )
    return x


def _tensor_to_tensor(images: list[torch.Tensor], what: str, mask: bool) -> torch.Tensor:
    tensors = []
    for t in images:
        if t.ndim == 3:  # an image (C, H, W); a mask (B, H, W), as diffusers
            t = t[:, None] if mask else t[None]
        elif t.ndim == 2:
            t = t[None, None]
        elif t.ndim != 4:
            raise ValueError(f"`{what}` must be (C, H, W) or (B, C, H, W), got shape {tuple(t.shape)}")
        tensors.append(t)
    if len({t.shape[1:] for t in tensors}) > 1:
        raise ValueError(f"`{what}` tensors differ in shape: {sorted({tuple(t.shape) for t in tensors})}")
    return _to_unit_float(torch.cat(tensors), what, mask)


def _check_range(x: torch.Tensor, what: str, mask: bool) -> bool:
    """Finite and in [0, 1] (or, for images, [-1, 1]); returns whether it is already in [-1, 1]."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"`{what}` holds NaN or Inf values")
    lo, hi = (float(v) for v in torch.aminmax(x))
    signed = lo < 0 and not mask
    if lo < (-1 if signed else 0) - _TOLERANCE or hi > 1 + _TOLERANCE:
        hint = " (0..255? divide by 255)" if hi > 1 else ""
        expected = "[0, 1]" if mask else "[0, 1] (or [-1, 1])"
        raise ValueError(f"`{what}` has values in [{lo:g}, {hi:g}]{hint}; expected floats in {expected}")
    return signed


def preprocess_image(
    image: ImageInput, height: int | None = None, width: int | None = None, multiple: int = 8, mask: bool = False
) -> torch.Tensor:
    """-> (B, C, H, W) float32: images in [-1, 1]; with `mask=True` one channel binarised at 0.5."""
    what = "mask_image" if mask else "image"
    images = _as_list(image, what)
    if isinstance(images[0], Image.Image):
        height, width = _default_size(images[0], height, width, multiple, what)
        x = _pil_to_tensor(images, height, width, mask, what)
    else:
        x = _array_to_tensor(images, what, mask) if isinstance(images[0], np.ndarray) else None
        if x is None:
            x = _tensor_to_tensor(images, what, mask)
            if x.shape[1] == 4 and not mask:  # already VAE latents
                return x
        if not mask and x.shape[1] == 1:  # gray, as PIL's convert("RGB") spreads it
            x = x.repeat(1, 3, 1, 1)
        if x.shape[1] != (1 if mask else 3):
            raise ValueError(
                f"`{what}` must have {'one channel' if mask else '3 channels (RGB)'}, got shape {tuple(x.shape)}"
            )
        height, width = _default_size(x, height, width, multiple, what)
        if x.shape[-2:] != (height, width):
            x = F.interpolate(x, size=(height, width))
    signed = _check_range(x, what, mask)
    if mask:
        return (x >= 0.5).to(torch.float32)
    if signed:
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


class VaeImageProcessor:
    """diffusers' VaeImageProcessor for scripts that call `pipe.image_processor`: `preprocess` reads
    images as the pipelines do (preprocess_image above, with its stricter reading of odd inputs),
    `postprocess` is the pipelines' own last step, and the static conversions keep diffusers' numerics.

    The mask processor of inpainting is the same class with do_normalize=False, do_binarize=True,
    do_convert_grayscale=True."""

    def __init__(
        self,
        do_resize: bool = True,
        vae_scale_factor: int = 8,
        vae_latent_channels: int = 4,
        resample: str = "lanczos",
        reducing_gap: int | None = None,
        do_normalize: bool = True,
        do_binarize: bool = False,
        do_convert_rgb: bool = False,
        do_convert_grayscale: bool = False,
    ) -> None:
        if do_convert_rgb and do_convert_grayscale:
            raise ValueError("do_convert_rgb and do_convert_grayscale cannot both be True")
        if (resample, reducing_gap, do_resize) != ("lanczos", None, True):
            raise ValueError(
                "minidiff's VaeImageProcessor resizes with Lanczos only (resample='lanczos', do_resize=True)"
            )
        mask = (do_normalize, do_binarize, do_convert_grayscale) == (False, True, True)
        image = (do_normalize, do_binarize, do_convert_grayscale) == (True, False, False)
        if not (mask or image):
            raise ValueError(
                "minidiff's VaeImageProcessor is either an image processor (do_normalize=True) or a mask processor "
                "(do_normalize=False, do_binarize=True, do_convert_grayscale=True)"
            )
        self.config = FrozenDict(
            do_resize=do_resize,
            vae_scale_factor=vae_scale_factor,
            vae_latent_channels=vae_latent_channels,
            resample=resample,
            reducing_gap=reducing_gap,
            do_normalize=do_normalize,
            do_binarize=do_binarize,
            do_convert_rgb=do_convert_rgb,
            do_convert_grayscale=do_convert_grayscale,
        )

    def preprocess(
        self,
        image: ImageInput,
        height: int | None = None,
        width: int | None = None,
        resize_mode: str = "default",
        crops_coords: tuple[int, int, int, int] | None = None,
    ) -> torch.Tensor:
        """-> (B, C, H, W) float32: an image in [-1, 1], a mask binarised to {0, 1}; sizes rounded down to a
        multiple of vae_scale_factor. Only diffusers' default resize (no fill / crop modes)."""
        if resize_mode != "default" or crops_coords is not None:
            raise NotImplementedError("minidiff's preprocess has only resize_mode='default' and no crops_coords")
        mask = self.config.do_binarize
        return preprocess_image(image, height, width, self.config.vae_scale_factor, mask=mask)

    def postprocess(
        self, image: torch.Tensor, output_type: str = "pil", do_denormalize: list[bool] | None = None
    ) -> Any:
        """(B, C, H, W) VAE output -> "latent" (as is) / "pt" / "np" / "pil", in [0, 1]."""
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"postprocess takes a (B, C, H, W) torch tensor, got {type(image).__name__}")
        if output_type not in ("latent", "pt", "np", "pil"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        if output_type == "latent":
            return image
        if do_denormalize is None and self.config.do_normalize:
            return postprocess_image(image, output_type)  # the pipelines' own numbers
        flags = do_denormalize if do_denormalize is not None else [False] * image.shape[0]
        image = torch.stack([self.denormalize(x) if flag else x for x, flag in zip(image, flags, strict=True)])
        if output_type == "pt":
            return image
        array = self.pt_to_numpy(image)
        return array if output_type == "np" else numpy_to_pil(array)

    def get_default_height_width(
        self, image: Image.Image | np.ndarray | torch.Tensor, height: int | None = None, width: int | None = None
    ) -> tuple[int, int]:
        """The image's size (or the one given), rounded down to a multiple of vae_scale_factor."""
        if isinstance(image, Image.Image):
            h, w = image.height, image.width
        elif isinstance(image, torch.Tensor):
            h, w = image.shape[2], image.shape[3]
        else:
            h, w = image.shape[1], image.shape[2]
        f = self.config.vae_scale_factor
        height, width = height or h, width or w
        return height - height % f, width - width % f

    numpy_to_pil = staticmethod(numpy_to_pil)

    @staticmethod
    def pil_to_numpy(images: Image.Image | list[Image.Image]) -> np.ndarray:
        """PIL image(s) -> (B, H, W, C) float32 in [0, 1] (8-bit images, as diffusers)."""
        images = images if isinstance(images, list) else [images]
        return np.stack([np.array(im).astype(np.float32) / 255.0 for im in images])

    @staticmethod
    def numpy_to_pt(images: np.ndarray) -> torch.Tensor:
        """(B, H, W, C) or (B, H, W) -> (B, C, H, W)."""
        if images.ndim == 3:
            images = images[..., None]
        return torch.from_numpy(images.transpose(0, 3, 1, 2))

    @staticmethod
    def pt_to_numpy(images: torch.Tensor) -> np.ndarray:
        """(B, C, H, W) -> (B, H, W, C) float numpy."""
        return images.cpu().permute(0, 2, 3, 1).float().numpy()

    @staticmethod
    def normalize(images: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """[0, 1] -> [-1, 1]."""
        return 2.0 * images - 1.0

    @staticmethod
    def denormalize(images: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """[-1, 1] -> [0, 1], clamped (the same numbers as the pipelines' postprocess)."""
        return (images / 2 + 0.5).clamp(0, 1) if isinstance(images, torch.Tensor) else (images / 2 + 0.5).clip(0, 1)

    @staticmethod
    def convert_to_rgb(image: Image.Image) -> Image.Image:
        return image.convert("RGB")

    @staticmethod
    def convert_to_grayscale(image: Image.Image) -> Image.Image:
        return image.convert("L")

    @staticmethod
    def binarize(image: torch.Tensor) -> torch.Tensor:
        """Values below 0.5 -> 0, the rest -> 1 (in place, as diffusers)."""
        image[image < 0.5] = 0
        image[image >= 0.5] = 1
        return image
