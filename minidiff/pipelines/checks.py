"""Checks on what a pipeline is given, made before any model runs, and NaN/Inf detection after it ran.

Each check names the argument it refuses. The size bound (MAX_PIXELS, or the MINIDIFF_MAX_PIXELS
environment variable) keeps a typo such as height=100000 from allocating tens of gigabytes.

FiniteWatch finds where NaN or Inf first appeared without a host sync per step: each `see` queues
an on-device "all finite" flag, and `verify` reads them all at once, at the end.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from typing import Any

import torch

# the largest height * width a pipeline makes or reads (8192 x 8192); the environment variable wins
MAX_PIXELS = 8192 * 8192
MAX_PIXELS_ENV = "MINIDIFF_MAX_PIXELS"


def max_pixels() -> int:
    value = os.environ.get(MAX_PIXELS_ENV)
    if value is None:
        return MAX_PIXELS
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{MAX_PIXELS_ENV} must be a whole number of pixels, got {value!r}") from None


def check_int(name: str, value: Any, low: int = 1) -> int:
    """A whole number >= low (bools and floats refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"`{name}` must be >= {low}, got {value}")
    return int(value)


def check_real(name: str, value: Any, low: float | None = None, high: float | None = None) -> float:
    """A finite real number in [low, high]: NaN would silently switch guidance off, Inf gives NaN images."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        if low is not None and high is not None:
            bounds = f"in [{low}, {high}]"
        else:
            bounds = f">= {low}" if low is not None else f"<= {high}"
        raise ValueError(f"`{name}` must be {bounds}, got {value}")
    return float(value)


def check_size(height: Any, width: Any, multiple: int, names: tuple[str, str] = ("height", "width")) -> tuple[int, int]:
    """Positive, divisible by the VAE factor (diffusers' rule), within max_pixels(); as ints."""
    for name, value in zip(names, (height, width), strict=True):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"`{name}` must be an int, got {type(value).__name__} {value!r}")
        if value <= 0:
            raise ValueError(f"`{name}` must be a positive number of pixels, got {value}")
    if height % multiple or width % multiple:
        raise ValueError(f"`height` and `width` have to be divisible by {multiple} but are {height} and {width}")
    limit = max_pixels()
    if height * width > limit:
        raise ValueError(
            f"{names[0]} x {names[1]} = {height} x {width} is more than the {limit} pixels allowed; "
            f"raise minidiff.pipelines.checks.MAX_PIXELS (or {MAX_PIXELS_ENV}) if you mean it"
        )
    return int(height), int(width)


def check_text(name: str, text: str | list[str]) -> None:
    """Refuse a string the tokenizer cannot take (a lone surrogate such as '\\ud800' is not Unicode text)."""
    for k, s in enumerate([text] if isinstance(text, str) else text):
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            where = "" if isinstance(text, str) else f"[{k}]"
            raise ValueError(
                f"`{name}{where}` is not valid Unicode text: it holds a lone surrogate {s[e.start]!r} at "
                f"index {e.start}"
            ) from None


def is_text(prompt: Any) -> bool:
    return isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt))


def check_prompts(
    prompt: Any, negative_prompt: Any, prompt_embeds: Any, negative_prompt_embeds: Any, width: int
) -> None:
    """One of prompt / prompt_embeds; text that tokenizes; embeddings as wide as the UNet's cross-attention."""
    if prompt is not None and prompt_embeds is not None:
        raise ValueError("give either `prompt` or `prompt_embeds`, not both")
    if prompt is None and prompt_embeds is None:
        raise ValueError("give `prompt` or `prompt_embeds`")
    if isinstance(prompt, list) and not prompt:
        raise ValueError("`prompt` is an empty list")
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("give either `negative_prompt` or `negative_prompt_embeds`, not both")
    for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if text is not None and not is_text(text):
            raise TypeError(f"`{name}` must be a str or a list of str, got {type(text).__name__}")
        if text is not None:
            check_text(name, text)
    for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
        check_embeds(name, embeds, width)
    if prompt_embeds is not None and negative_prompt_embeds is not None:
        if prompt_embeds.shape != negative_prompt_embeds.shape:
            raise ValueError(
                f"`prompt_embeds` {tuple(prompt_embeds.shape)} and `negative_prompt_embeds` "
                f"{tuple(negative_prompt_embeds.shape)} must have the same shape"
            )


def check_embeds(name: str, embeds: torch.Tensor | None, width: int) -> None:
    """(batch, tokens, width) floats, the width the UNet's cross-attention takes."""
    if embeds is None:
        return
    if not isinstance(embeds, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(embeds).__name__}")
    if embeds.ndim != 3 or not embeds.is_floating_point():
        raise ValueError(
            f"`{name}` must be a 3-d float tensor (batch, tokens, {width}), got {embeds.dtype} {tuple(embeds.shape)}"
        )
    if embeds.shape[-1] != width:
        raise ValueError(
            f"`{name}` has width {embeds.shape[-1]}, but the UNet's cross_attention_dim is {width}: "
            f"embeddings from another text encoder?"
        )


def check_clip_skip(clip_skip: Any, text_encoder: Any) -> None:
    """None, or how many of the text encoder's last layers to skip: 0 .. depth - 1."""
    if clip_skip is None:
        return
    check_int("clip_skip", clip_skip, low=0)
    depth = text_encoder.config.num_hidden_layers if text_encoder is not None else None
    if depth is not None and clip_skip >= depth:
        raise ValueError(f"`clip_skip` is {clip_skip}, but the text encoder has {depth} layers: skip 0 to {depth - 1}")


def callback_inputs(callback: Any, names: list[str]) -> list[str]:
    """The tensors a callback sees: a diffusers PipelineCallback (SDCFGCutoffCallback, MultiPipelineCallbacks)
    names its own in `tensor_inputs`, which replace `callback_on_step_end_tensor_inputs` as in diffusers."""
    own = getattr(callback, "tensor_inputs", None)
    return list(own) if isinstance(own, (list, tuple)) else names


def check_callback_output(out: Any, tensors: dict[str, torch.Tensor | None], step: int) -> dict[str, Any]:
    """callback_on_step_end must return a dict (diffusers' rule), its tensors shaped as the ones they replace,
    except that a guidance batch (2n rows) may be cut to its conditional half (n), as SDCFGCutoffCallback does."""
    if not isinstance(out, dict):
        raise TypeError(
            f"`callback_on_step_end` must return a dict (e.g. the callback_kwargs it was given), "
            f"got {type(out).__name__} at step {step}"
        )
    for k, v in tensors.items():
        if k not in out:
            continue
        new = out[k]
        if new is v or (isinstance(new, torch.Tensor) and (v is None or new.shape == v.shape)):
            continue
        if isinstance(new, torch.Tensor) and new.shape[1:] == v.shape[1:] and 2 * len(new) == len(v):
            continue
        got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
        expected = tuple(v.shape) if v is not None else None
        raise ValueError(f"`callback_on_step_end` returned {k} {got} at step {step}, expected shape {expected}")
    return out


def check_cross_attention_kwargs(kwargs: Any) -> None:
    """None or a dict; its "scale" (the LoRA scale) a finite number. minidiff has no attention processors,
    so any other key is ignored with a warning, as diffusers' default processor does."""
    if kwargs is None:
        return
    if not isinstance(kwargs, dict):
        raise TypeError(f"`cross_attention_kwargs` must be a dict or None, got {type(kwargs).__name__}")
    if "scale" in kwargs:
        check_real('cross_attention_kwargs["scale"]', kwargs["scale"])
    ignored = sorted(k for k in kwargs if k != "scale")
    if ignored:
        warnings.warn(
            f"cross_attention_kwargs {ignored} are not expected by minidiff's attention and are ignored",
            UserWarning,
            stacklevel=3,
        )


def check_generator(generator: Any) -> None:
    gens = generator if isinstance(generator, list) else [generator]
    if generator is not None and not all(isinstance(g, torch.Generator) for g in gens):
        kinds = sorted({type(g).__name__ for g in gens})
        raise TypeError(
            f"`generator` must be a torch.Generator or a list of them, got {', '.join(kinds)} "
            f"(for a seed n pass torch.Generator().manual_seed(n))"
        )


def check_finite(**tensors: torch.Tensor | None) -> None:
    """The tensors a user handed in hold no NaN or Inf (one host sync for all of them)."""
    given = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    if not given:
        return
    flags = torch.stack([torch.isfinite(v).all().to(torch.device("cpu")) for v in given.values()])
    for name, ok in zip(given, flags.tolist(), strict=True):
        if not ok:
            raise ValueError(f"`{name}` holds NaN or Inf values")


def check_weights(components: dict[str, Any]) -> None:
    """Every model's weights are floating point (an int32 checkpoint would fail deep inside a conv)."""
    for name, module in components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        for key, p in module.named_parameters():
            if not p.is_floating_point():
                raise TypeError(
                    f"the {name}'s weight {key} is {p.dtype}: minidiff runs float32, float16 or bfloat16 weights "
                    f"(load with torch_dtype=torch.float32, or convert the checkpoint)"
                )


# what each component of the loop is called in FiniteWatch's message, and where to look
_WHERE = {
    "text_encoder": ("the prompt embeddings (text_encoder)", "check the text encoder's weights"),
    "vae.encode": ("the VAE encoding of `image` (vae.encode)", "check the VAE's weights and the image"),
    "unet": ("the UNet's noise prediction (unet)", "check the UNet's weights, guidance_scale and the dtype"),
    "scheduler.step": ("the latents after scheduler.step", "check the scheduler's settings (betas, eta)"),
    "callback_on_step_end": ("the latents returned by callback_on_step_end", "check the callback"),
    "vae.decode": ("the decoded image (vae.decode)", "check the VAE's weights; a float16 VAE can overflow"),
}


class FiniteWatch:
    """Records on-device "all finite" flags as the loop runs; `verify` reads them once and names the
    component and step where NaN or Inf first appeared. strict=False warns instead of raising."""

    def __init__(self, strict: bool = True) -> None:
        self.strict = strict
        self.flags: list[torch.Tensor] = []
        self.where: list[tuple[str, int | None, Any]] = []

    def see(self, component: str, x: torch.Tensor, step: int | None = None, t: Any = None) -> None:
        self.flags.append(torch.isfinite(x).all())
        self.where.append((component, step, t))

    def verify(self) -> None:
        if not self.flags:
            return
        device = self.flags[0].device
        ok = torch.stack([f.to(device) for f in self.flags]).cpu()  # the one host sync
        self.flags.clear()
        if bool(ok.all()):
            return
        component, step, t = self.where[int((~ok).nonzero()[0, 0])]
        what, hint = _WHERE.get(component, (component, ""))
        if step is not None:
            t = t.item() if isinstance(t, torch.Tensor) else t
            what += f" at step {step} (timestep {t})"
        message = f"NaN or Inf values first appeared in {what}; {hint}"
        if self.strict:
            raise FloatingPointError(message + " (strict=False warns instead)")
        warnings.warn(message, RuntimeWarning, stacklevel=3)
