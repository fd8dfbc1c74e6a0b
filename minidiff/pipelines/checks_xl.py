"""What SDXL adds to a pipeline's inputs, checked before any model runs: the second prompts, the pooled
embeddings, the micro-conditioning sizes and the schedule fractions (denoising_start / _end), and
where such a fraction cuts the schedule.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

from .checks import check_finite, check_real, check_text, is_text


def as_fraction(value: float | None) -> float | None:
    """denoising_start / _end: a fraction in (0, 1) takes effect; None, 0 and 1 mean the whole schedule,
    as in diffusers (which ignores anything but a float strictly inside (0, 1))."""
    return value if value is not None and 0 < value < 1 else None


def timestep_cutoff(scheduler: Any, fraction: float) -> int:
    """The training timestep at `fraction` of the way from pure noise, as diffusers rounds it: 0.8 of 1000 -> 200."""
    steps = scheduler.config.num_train_timesteps
    return int(round(steps - fraction * steps))


def check_fractions(denoising_start: Any, denoising_end: Any) -> None:
    for name, value in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
        if value is not None:
            check_real(name, value, 0.0, 1.0)
    start, end = as_fraction(denoising_start), as_fraction(denoising_end)
    if start is not None and end is not None and start >= end:
        raise ValueError(f"`denoising_start` ({start}) must be below `denoising_end` ({end})")


def check_pair(name: str, value: Any) -> None:
    """None or two finite numbers: (height, width) or (top, left)."""
    if value is None:
        return
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value)
    ):
        raise ValueError(f"`{name}` must be a pair of numbers, (height, width) or (top, left); got {value!r}")
    for v in value:
        check_real(name, v)


def check_xl_prompts(
    prompt: Any,
    prompt_2: Any,
    negative_prompt_2: Any,
    prompt_embeds: torch.Tensor | None,
    negative_prompt_embeds: torch.Tensor | None,
    pooled_prompt_embeds: Any,
    negative_pooled_prompt_embeds: Any,
    projection_dim: int | None,
) -> None:
    """prompt_2 / negative_prompt_2 as text (not beside embeddings); pooled embeddings with every given
    context, (batch, projection_dim) floats. check_prompts has checked the rest."""
    for name, text, embeds in (
        ("prompt_2", prompt_2, prompt_embeds),
        ("negative_prompt_2", negative_prompt_2, negative_prompt_embeds),
    ):
        if text is None:
            continue
        if embeds is not None:
            raise ValueError(f"give either `{name}` or `{name[:-2]}_embeds`, not both")
        if not is_text(text):
            raise TypeError(f"`{name}` must be a str or a list of str, got {type(text).__name__}")
        check_text(name, text)
    batch = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else None
    if isinstance(prompt_2, list) and batch is not None and len(prompt_2) != batch:
        raise ValueError(f"`prompt_2` has {len(prompt_2)} entries but `prompt` has {batch}")
    for embeds, pooled, name in (
        (prompt_embeds, pooled_prompt_embeds, "pooled_prompt_embeds"),
        (negative_prompt_embeds, negative_pooled_prompt_embeds, "negative_pooled_prompt_embeds"),
    ):
        if embeds is not None and pooled is None:
            raise ValueError(
                f"`{name.replace('pooled_', '')}` given without `{name}`: pass both, from the same text "
                f"encoder (the pooled one is text_encoder_2's text_embeds)"
            )
        if pooled is None:
            continue
        if not isinstance(pooled, torch.Tensor) or pooled.ndim != 2 or not pooled.is_floating_point():
            got = f"{pooled.dtype} {tuple(pooled.shape)}" if isinstance(pooled, torch.Tensor) else type(pooled).__name__
            raise ValueError(f"`{name}` must be a 2-d float tensor (batch, width), got {got}")
        if embeds is not None and pooled.shape[0] != embeds.shape[0]:
            raise ValueError(f"`{name}` has {pooled.shape[0]} rows but its prompt embeddings have {embeds.shape[0]}")
        if projection_dim is not None and pooled.shape[-1] != projection_dim:
            raise ValueError(f"`{name}` has width {pooled.shape[-1]}; text_encoder_2 projects to {projection_dim}")
    check_finite(pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds)
