"""What a diffusers script or callback reads from a pipeline during a call, and the loop steps that serve it.

diffusers' pipelines keep the settings of the running call on the pipeline (`pipe.guidance_scale`,
`pipe.num_timesteps`, `pipe.do_classifier_free_guidance`, ...), so a `callback_on_step_end` can read
them and change some: SDCFGCutoffCallback sets `pipe._guidance_scale = 0.0` to stop guidance part
way, and the docs' early stop sets `pipe._interrupt = True`, after which the loop skips its
remaining steps. CallState holds them for every Stable Diffusion pipeline (txt2img, img2img,
inpainting, LCM and the SDXL subclasses), with the three steps each loop shares: the timesteps
(custom ones as diffusers' retrieve_timesteps), the progress bar, and the callback at a step's end.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from ..schedulers import STOCHASTIC_SCHEDULERS, DDIMScheduler, TCDScheduler
from .checks import FiniteWatch, check_callback_output, check_cross_attention_kwargs, check_int, check_real

Generator = torch.Generator | list[torch.Generator] | None


def scheduler_step_kwargs(scheduler: Any, eta: float, generator: Generator) -> dict[str, Any]:
    """What `scheduler.step` takes besides (noise_pred, t, latents): the generator of the schedulers that draw
    noise, and `eta` for DDIM (0 = deterministic DDIM, 1 = DDPM-like) and TCD (the paper's γ), as diffusers gives."""
    kwargs: dict[str, Any] = {"generator": generator} if isinstance(scheduler, STOCHASTIC_SCHEDULERS) else {}
    if isinstance(scheduler, (DDIMScheduler, TCDScheduler)):
        kwargs["eta"] = eta
    return kwargs


def guidance_scale_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """An LCM-distilled UNet's guidance input (latent_consistency.py): (B,) -> (B, dim), [sin, cos] of
    1000 w at the frequencies 10000^(-i / (dim/2 - 1)).

    layers.timestep_embedding(1000 w, dim, freq_shift=1) with the frequencies computed in diffusers'
    order (log 10000 / (half - 1) first), so that float32 rounds them the same way.
    """
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    args = (w.float() * 1000.0)[:, None] * freqs[None, :]
    return F.pad(torch.cat([torch.sin(args), torch.cos(args)], dim=1), (0, dim % 2))


class CallState:
    """Mixin of StableDiffusionPipeline (needs `unet`, `scheduler` and `progress_bar`): the call's settings
    as diffusers' properties, set by `_begin_call` at the start of every __call__."""

    _guidance_scale: float = 1.0
    _guidance_rescale: float = 0.0
    _clip_skip: int | None = None
    _cross_attention_kwargs: dict[str, Any] | None = None
    _num_timesteps: int = 0
    _interrupt: bool = False  # a callback sets it to skip the remaining steps (diffusers' early stop)
    # the loop tensors with one row per UNet input: [negative; positive] halves while guidance is on
    _guidance_batch_inputs: tuple[str, ...] = ("prompt_embeds",)

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def guidance_rescale(self) -> float:
        return self._guidance_rescale

    @property
    def clip_skip(self) -> int | None:
        return self._clip_skip

    @property
    def cross_attention_kwargs(self) -> dict[str, Any] | None:
        return self._cross_attention_kwargs

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Two UNet passes per step; an LCM-distilled UNet embeds the guidance scale instead."""
        return self._guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None

    @property
    def num_timesteps(self) -> int:
        """How many timesteps the loop visits (set when it starts)."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def _lora_scale(self) -> float | None:
        """cross_attention_kwargs["scale"]: the LoRA scale of the UNet and (in encode_prompt) the text encoder."""
        return (self._cross_attention_kwargs or {}).get("scale")

    @property
    def _unet_attention_kwargs(self) -> dict[str, float] | None:
        """What the UNet takes of cross_attention_kwargs: the LoRA scale (UNet2DConditionModel.forward applies it)."""
        return None if self._lora_scale is None else {"scale": self._lora_scale}

    def _begin_call(
        self,
        guidance_scale: float,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """Record the call's settings where the properties (and callbacks) read them; no interrupt yet."""
        check_real("guidance_rescale", guidance_rescale)
        check_cross_attention_kwargs(cross_attention_kwargs)
        self._guidance_scale, self._guidance_rescale = guidance_scale, guidance_rescale
        self._clip_skip, self._cross_attention_kwargs = clip_skip, cross_attention_kwargs
        self._num_timesteps, self._interrupt = 0, False

    def _set_timesteps(
        self,
        num_inference_steps: int | None,
        device: torch.device,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, int]:
        """The scheduler's timesteps and their step count, as diffusers' retrieve_timesteps: custom `timesteps`
        or `sigmas` replace the spacing (num_inference_steps becomes their count) on the schedulers whose
        set_timesteps takes them; `kwargs` go to set_timesteps too."""
        if timesteps is not None and sigmas is not None:
            raise ValueError("give either custom `timesteps` or custom `sigmas`, not both")
        for name, custom in (("timesteps", timesteps), ("sigmas", sigmas)):
            if custom is None:
                continue
            if name not in inspect.signature(self.scheduler.set_timesteps).parameters:
                raise ValueError(
                    f"{type(self.scheduler).__name__}.set_timesteps does not take custom {name}; use a scheduler "
                    f"that does, or num_inference_steps"
                )
            self.scheduler.set_timesteps(device=device, **{name: custom}, **kwargs)
            return self.scheduler.timesteps, len(self.scheduler.timesteps)
        num_inference_steps = check_int("num_inference_steps", num_inference_steps)
        self.scheduler.set_timesteps(num_inference_steps, device=device, **kwargs)
        return self.scheduler.timesteps, num_inference_steps

    def _progress(self, timesteps: torch.Tensor, num_steps: int) -> Iterator[tuple[int, torch.Tensor]]:
        """enumerate(timesteps) under a progress bar of `num_steps` denoising steps (Heun, of order 2,
        visits two timesteps per step)."""
        order = self.scheduler.order
        warmup = len(timesteps) - num_steps * order
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=num_steps) as bar:
            for i, t in enumerate(timesteps):
                yield i, t
                if i == len(timesteps) - 1 or (i + 1 > warmup and (i + 1) % order == 0):
                    bar.update()

    def _step_end(
        self, callback: Callable, names: list[str], i: int, t: torch.Tensor, watch: FiniteWatch | None, **tensors: Any
    ) -> dict[str, Any]:
        """callback_on_step_end(pipe, i, t, {name: tensor}) sees the loop's tensors it names (the `tensors`
        given, by their diffusers names) and must hand back a dict (diffusers' rule); what it returns
        replaces them, in the order given, for the steps that follow.

        As in diffusers, `prompt_embeds` is what the UNet reads: with guidance the [negative; positive]
        batch, which a callback may cut to its positive half when it turns guidance off."""
        out = check_callback_output(callback(self, i, t, {k: tensors[k] for k in names}), tensors, i)
        tensors = {k: out.get(k, v) for k, v in tensors.items()}
        latents = tensors.get("latents")
        if latents is not None and self.unet.config.time_cond_proj_dim is None:
            rows = len(latents) * (2 if self.do_classifier_free_guidance else 1)
            for name in self._guidance_batch_inputs:
                if tensors.get(name) is not None and len(tensors[name]) != rows:
                    state = "on" if self.do_classifier_free_guidance else "off"
                    raise ValueError(
                        f"`callback_on_step_end` left {name} with {len(tensors[name])} rows at step {i}; with "
                        f"guidance {state} (guidance_scale {self.guidance_scale}) the next step needs {rows}"
                    )
        if watch is not None and latents is not None:
            watch.see("callback_on_step_end", latents, i, t)
        return tensors

    def _guidance_embedding(self, n: int, dtype: torch.dtype) -> torch.Tensor | None:
        """An LCM-distilled UNet's guidance input: w = guidance_scale - 1, embedded (None for other UNets)."""
        dim = self.unet.config.time_cond_proj_dim
        if dim is None:
            return None
        w = guidance_scale_embedding(torch.full((n,), self.guidance_scale - 1.0), dim)
        return w.to(device=self.device, dtype=dtype)
