"""Latent consistency models: each step maps x_t straight to x̂_0 = f(x_t, t), then re-noises it to the next t.

A consistency model is parameterised so that f(x, t) = c_skip(t) x + c_out(t) F(x, t) meets the boundary
condition f(x, 0) = x [1, eq. 3], with σ_data = 0.5 and t scaled by `timestep_scaling` [2, §4.1]:
    c_skip = σ_data² / ((s t)² + σ_data²),   c_out = s t / sqrt((s t)² + σ_data²)
Multistep sampling [1, Algorithm 1]: x̂_0 = f(x_t, t), then x_{t'} = sqrt(ᾱ_t') x̂_0 + sqrt(1 - ᾱ_t') z
for the next t' of the schedule; the last step returns x̂_0 itself. The schedule is a subset of the
distillation schedule, `original_inference_steps` evenly spaced training steps [2, §4.3].

References:
1. Song et al., "Consistency Models", 2023.
2. Luo et al., "Latent Consistency Models: Synthesizing High-Resolution Images with Few-Step Inference", 2023.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..noise import randn_tensor
from ..outputs import BaseOutput
from .base import RNG, Device, DiscreteScheduler, Tensor, Timestep
from .config import TIMESTEP_SPACINGS, DynamicThresholdingKeys, NoiseScheduleConfig, one_of
from .schedule import check_custom_timesteps, dynamic_threshold, vp_x0_eps

logger = logging.getLogger(__name__)
SIGMA_DATA = 0.5


@dataclass(frozen=True)
class LCMConfig(DynamicThresholdingKeys, NoiseScheduleConfig):
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = one_of("scaled_linear", ("linear", "scaled_linear", "squaredcos_cap_v2"))
    original_inference_steps: int = 50  # the length of the distillation schedule
    clip_sample: bool = False  # clamp x̂_0 to ±clip_sample_range
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True  # ᾱ after the last step: 1, or ᾱ_0
    timestep_spacing: str = one_of("leading", TIMESTEP_SPACINGS)  # (kept for diffusers; LCM's spacing is its own)
    timestep_scaling: float = 10.0  # s in the boundary conditions
    rescale_betas_zero_snr: bool = False


@dataclass
class LCMSchedulerOutput(BaseOutput):
    """`prev_sample` is x at the next timestep; `denoised` the consistency function's x̂_0."""

    prev_sample: torch.Tensor
    denoised: torch.Tensor | None = None


class LCMScheduler(DiscreteScheduler):
    """Multistep latent consistency sampling (Luo et al., 2023; Song et al., 2023)."""

    config_class = LCMConfig
    _compatibles = ()  # diffusers lists no class this config swaps into

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self.final_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        self.custom_timesteps = False
        self.step_index: int | None = None  # the place in `timesteps` of the next step
        self.begin_index: int | None = None  # where the loop starts, when fixed (img2img)

    def set_begin_index(self, begin_index: int = 0) -> None:
        self.begin_index = begin_index

    def _origin_timesteps(self, original_inference_steps: int | None, strength: float) -> np.ndarray:
        """The distillation schedule (ascending): k - 1, 2k - 1, .., with k = T // original_inference_steps [2]."""
        T = self.config.num_train_timesteps
        original = original_inference_steps or self.config.original_inference_steps
        if original > T:
            raise ValueError(f"original_inference_steps={original} is more than num_train_timesteps={T}")
        return np.arange(1, int(original * strength) + 1) * (T // original) - 1

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: Device = None,
        original_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        strength: float = 1.0,
    ) -> None:
        """`num_inference_steps` of the distillation schedule, evenly picked, or custom descending `timesteps`.

        `strength` < 1 (img2img) keeps only that fraction of the schedule's lower end.
        """
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        origin = self._origin_timesteps(original_inference_steps, strength)
        if timesteps is not None:
            ts = self._custom_timesteps(timesteps, origin, strength)
        else:
            n = self.num_inference_steps = self._check_num_steps(num_inference_steps)
            original = original_inference_steps or self.config.original_inference_steps
            if n > min(len(origin), original):
                raise ValueError(
                    f"num_inference_steps={n} is more than the distillation schedule has: {len(origin)} steps "
                    f"(original_inference_steps={original}, strength={strength})"
                )
            ts = origin[::-1][np.floor(np.linspace(0, len(origin), n, endpoint=False)).astype(np.int64)]
        self._set_discrete_timesteps(ts, device)
        self.step_index = self.begin_index = None

    def _custom_timesteps(self, timesteps: list[int], origin: np.ndarray, strength: float) -> np.ndarray:
        T = self.config.num_train_timesteps
        check_custom_timesteps(timesteps, T)
        if any(b >= a for a, b in zip(timesteps, timesteps[1:])):
            raise ValueError(f"custom timesteps must be in descending order, got {timesteps}")
        if timesteps[0] >= T:
            raise ValueError(f"custom timesteps must be below num_train_timesteps={T}, got {timesteps[0]}")
        if off := sorted(set(timesteps[1:]) - set(origin.tolist()), reverse=True):
            logger.warning("custom timesteps %s are not on the distillation schedule; results may suffer", off)
        n = self.num_inference_steps = len(timesteps)
        self.custom_timesteps = True
        # img2img keeps the last strength · n of them (num_inference_steps stays n, as in diffusers)
        return np.array(timesteps, dtype=np.int64)[n - min(int(n * strength), n) :]

    def _init_step_index(self, t: int) -> None:
        self._check_ready()
        if self.step_index is None and self.begin_index is not None:
            self.step_index = self.begin_index
        elif self.step_index is None:
            if t not in self._host_timesteps():
                raise ValueError(f"{type(self).__name__}: timestep {t} is not one of scheduler.timesteps")
            self.step_index = self._host_timesteps().index(t)

    def _next_timestep(self) -> int | None:
        """The timestep after the current one, or None after the last."""
        ts = self._host_timesteps()
        return ts[self.step_index + 1] if self.step_index + 1 < len(ts) else None

    def _alpha_cumprod(self, t: int) -> torch.Tensor:
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def step(
        self, model_output: Tensor, timestep: Timestep, sample: Tensor, generator: RNG = None, return_dict: bool = True
    ) -> LCMSchedulerOutput | tuple:
        t = self._timestep_value(timestep)
        self._init_step_index(t)
        c = self.config
        t_next = self._next_timestep()
        ab_t = self.alphas_cumprod[t]
        x0, _ = vp_x0_eps(model_output, sample, ab_t**0.5, (1 - ab_t) ** 0.5, c.prediction_type)
        if c.thresholding:
            x0 = dynamic_threshold(x0, c.dynamic_thresholding_ratio, c.sample_max_value)
        elif c.clip_sample:
            x0 = x0.clamp(-c.clip_sample_range, c.clip_sample_range)
        # the consistency function f(x, t) = c_skip x + c_out x̂_0 [1, eq. 3]
        st = t * c.timestep_scaling
        c_skip, c_out = SIGMA_DATA**2 / (st**2 + SIGMA_DATA**2), st / (st**2 + SIGMA_DATA**2) ** 0.5
        denoised = c_out * x0 + c_skip * sample
        if self.step_index == self.num_inference_steps - 1:  # the last step: x̂_0, no noise
            prev_sample = denoised
        else:  # (strength < 1 with custom timesteps: diffusers re-noises the last step to t itself)
            ab_next = self._alpha_cumprod(t if t_next is None else t_next)
            noise = randn_tensor(model_output.shape, generator, model_output.device, denoised.dtype)
            prev_sample = ab_next**0.5 * denoised + (1 - ab_next) ** 0.5 * noise
        self.step_index += 1
        if not return_dict:
            return prev_sample, denoised
        return LCMSchedulerOutput(prev_sample=prev_sample, denoised=denoised)
