"""DDPM ancestral sampling: x_{t-1} ~ q(x_{t-1} | x_t, x̂_0), the posterior of the forward process.

References:
1. Ho et al., "Denoising Diffusion Probabilistic Models", 2020 (eqs. 6-7).
2. Nichol & Dhariwal, "Improved Denoising Diffusion Probabilistic Models", 2021 (learned variance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..noise import randn_tensor
from .base import RNG, Device, DiscreteScheduler, SchedulerOutput, Tensor, Timestep
from .config import BETA_SCHEDULES, TIMESTEP_SPACINGS, DynamicThresholdingKeys, NoiseScheduleConfig, one_of
from .schedule import check_custom_timesteps, dynamic_threshold, spaced_timesteps, vp_x0_eps

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")


@dataclass(frozen=True)
class DDPMConfig(DynamicThresholdingKeys, NoiseScheduleConfig):
    beta_schedule: str = one_of("linear", (*BETA_SCHEDULES, "sigmoid"))
    timestep_spacing: str = one_of("leading", TIMESTEP_SPACINGS)
    # the std of the noise added at each step (None, which DPM-Solver's configs carry, is fixed_small)
    variance_type: str | None = one_of("fixed_small", (*VARIANCE_TYPES, None))
    clip_sample: bool = True  # clamp x̂_0 to ±clip_sample_range
    clip_sample_range: float = 1.0
    rescale_betas_zero_snr: bool = False


class DDPMScheduler(DiscreteScheduler):
    """Denoising Diffusion Probabilistic Models (Ho et al., 2020), with sub-sampled timesteps."""

    config_class = DDPMConfig

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self.one = torch.tensor(1.0)
        self.custom_timesteps = False
        self.variance_type = self.config.variance_type

    def set_timesteps(
        self, num_inference_steps: int | None = None, device: Device = None, timesteps: list[int] | None = None
    ) -> None:
        """Choose the steps to sample at: `num_inference_steps` spaced ones, or a descending custom list."""
        T = self.config.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None:
            check_custom_timesteps(timesteps, T)
            if any(b >= a for a, b in zip(timesteps, timesteps[1:])):
                raise ValueError(f"custom timesteps must be strictly descending, got {list(timesteps)}")
            if timesteps[0] >= T:
                raise ValueError(f"custom timesteps must be below num_train_timesteps={T}, got {timesteps[0]}")
            ts = np.array(timesteps, dtype=np.int64)
            self.num_inference_steps = len(ts)
        else:
            self.num_inference_steps = self._check_num_steps(num_inference_steps)
            c = self.config
            ts = spaced_timesteps(c.timestep_spacing, self.num_inference_steps, T, c.steps_offset)
            ts = ts.round().astype(np.int64)
        self.custom_timesteps = timesteps is not None
        self._set_discrete_timesteps(ts, device)

    def _get_variance(
        self, t: int, predicted_variance: torch.Tensor | None = None, variance_type: str | None = None
    ) -> torch.Tensor:
        """The variance of the noise step() adds at t (diffusers' private name, which its tests read; for the
        *_log and learned_range kinds diffusers returns the std or the log-variance instead)."""
        prev_t = t - 1 if self.num_inference_steps is None else self._previous(t)
        return self._variance(t, prev_t, predicted_variance, variance_type) ** 2

    def _variance(
        self, t: int, prev_t: int, predicted_variance: torch.Tensor | None, kind: str | None = None
    ) -> torch.Tensor:
        """The std of the noise added on the way from t to prev_t, for `kind` (default: the configured
        variance_type)."""
        ab_t = self.alphas_cumprod[t]
        ab_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        beta_t = 1 - ab_t / ab_prev
        # β̃_t = (1 - ᾱ_{t-1}) / (1 - ᾱ_t) β_t: the true posterior variance ("small"); β_t is the "large" bound
        small = torch.clamp((1 - ab_prev) / (1 - ab_t) * beta_t, min=1e-20)
        kind = kind or self.config.variance_type
        if kind in ("fixed_small", None):
            return small**0.5
        if kind == "fixed_small_log":
            return torch.exp(0.5 * torch.log(small))
        if kind in ("fixed_large", "fixed_large_log"):
            # diffusers' fixed_large_log takes the square root of log β_t, which is NaN; the log form
            # of the same variance β_t is meant, and gives this
            return beta_t**0.5
        if predicted_variance is None:
            raise ValueError(f"variance_type={kind!r} needs a model output with twice the sample's channels")
        if kind == "learned":  # the network predicts the variance itself
            return predicted_variance**0.5
        frac = (predicted_variance + 1) / 2  # learned_range: interpolate log-variances [2, eq. 15]
        return torch.exp(0.5 * (frac * torch.log(beta_t) + (1 - frac) * torch.log(small)))

    def step(
        self, model_output: Tensor, timestep: Timestep, sample: Tensor, generator: RNG = None, return_dict: bool = True
    ) -> SchedulerOutput | tuple:
        """Sample x_{t-1} from the posterior q(x_{t-1} | x_t, x̂_0) [1, eqs. 6-7]."""
        self._check_ready()
        t = self._timestep_value(timestep)
        prev_t = self._previous(t)
        predicted_variance = None
        if self.variance_type in ("learned", "learned_range") and model_output.shape[1] == 2 * sample.shape[1]:
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)

        ab_t = self.alphas_cumprod[t]
        ab_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        alpha_t = ab_t / ab_prev  # the one-step α between the two (possibly distant) timesteps
        beta_t = 1 - alpha_t
        x0, _ = vp_x0_eps(model_output, sample, ab_t**0.5, (1 - ab_t) ** 0.5, self.config.prediction_type)
        if self.config.thresholding:
            x0 = dynamic_threshold(x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
        elif self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)

        # posterior mean μ̃_t(x_t, x_0) [1, eq. 7]
        mean = (ab_prev**0.5 * beta_t / (1 - ab_t)) * x0 + (alpha_t**0.5 * (1 - ab_prev) / (1 - ab_t)) * sample
        prev_sample = mean
        if t > 0:
            noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
            prev_sample = mean + self._variance(t, prev_t, predicted_variance) * noise
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
