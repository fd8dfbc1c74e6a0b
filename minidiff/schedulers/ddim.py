"""DDIM: the non-Markovian sampler x_{t-1} = sqrt(ᾱ_{t-1}) x̂_0 + sqrt(1 - ᾱ_{t-1} - σ_t²) ε̂ + σ_t z.

η = 0 is deterministic (DDIM proper), η = 1 recovers DDPM's posterior variance.

References:
1. Song, Meng & Ermon, "Denoising Diffusion Implicit Models", 2021 (eqs. 12 and 16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..noise import randn_tensor
from .base import RNG, DiscreteScheduler, SchedulerOutput, Tensor, Timestep
from .config import TIMESTEP_SPACINGS, DynamicThresholdingKeys, NoiseScheduleConfig, one_of
from .schedule import dynamic_threshold, spaced_timesteps, vp_x0_eps


@dataclass(frozen=True)
class DDIMConfig(DynamicThresholdingKeys, NoiseScheduleConfig):
    timestep_spacing: str = one_of("leading", TIMESTEP_SPACINGS)
    clip_sample: bool = True  # clamp x̂_0 to ±clip_sample_range
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True  # ᾱ "before" step 0: 1 (a clean x_0) or ᾱ_0 as the original implementation had it
    rescale_betas_zero_snr: bool = False


class DDIMScheduler(DiscreteScheduler):
    """Denoising Diffusion Implicit Models (Song et al., 2021)."""

    config_class = DDIMConfig

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self.final_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        self.num_inference_steps = self._check_num_steps(num_inference_steps)
        c = self.config
        n, T = self.num_inference_steps, c.num_train_timesteps
        ts = spaced_timesteps(c.timestep_spacing, n, T, c.steps_offset)
        self._set_discrete_timesteps(ts.round().astype(np.int64), device)

    def _get_variance(self, timestep: int, prev_timestep: int) -> torch.Tensor:
        """σ_t(1)², the variance of the DDPM-like step from t to prev_t [1, eq. 16] (diffusers' name)."""
        ab_t = self.alphas_cumprod[timestep]
        ab_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        return (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)

    def step(
        self,
        model_output: Tensor,
        timestep: Timestep,
        sample: Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: RNG = None,
        variance_noise: Tensor | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        self._check_ready()
        if variance_noise is not None and generator is not None:
            raise ValueError("pass either generator or variance_noise, not both")
        t = self._timestep_value(timestep)
        # diffusers steps back by T // N whatever the spacing (so trailing / linspace may skip a listed step)
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        ab_t = self.alphas_cumprod[t]
        ab_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod

        x0, eps = vp_x0_eps(model_output, sample, ab_t**0.5, (1 - ab_t) ** 0.5, self.config.prediction_type)
        if self.config.thresholding:
            x0 = dynamic_threshold(x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
        elif self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        if use_clipped_model_output:  # re-derive ε̂ from the clipped x̂_0 (as in GLIDE)
            eps = (sample - ab_t**0.5 * x0) / (1 - ab_t) ** 0.5

        sigma = eta * self._get_variance(t, prev_t) ** 0.5  # σ_t(η) [1, eq. 16]
        # [1, eq. 12]: predicted x_0, direction pointing to x_t, random noise
        prev_sample = ab_prev**0.5 * x0 + (1 - ab_prev - sigma**2) ** 0.5 * eps
        if eta > 0:
            if variance_noise is None:
                variance_noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
            prev_sample = prev_sample + sigma * variance_noise
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
