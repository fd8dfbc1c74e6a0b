"""Heun's method (explicit trapezoid) on dx/dσ = (x - D(x; σ)) / σ  [1, Algorithm 1].

Each step costs two network evaluations, so `timesteps` lists every step but the first twice
and step() alternates: an Euler predictor to σ_{i+1}, then the corrector that averages the
slopes at σ_i and σ_{i+1} and redoes the step from x_i. The last step (to σ = 0) is Euler only.

References:
1. Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", 2022.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .base import Device, SchedulerOutput, SigmaScheduler
from .config import BETA_SCHEDULES, NoiseScheduleConfig, SigmaSpacingKeys, one_of
from .schedule import check_custom_timesteps, ve_denoised


@dataclass(frozen=True)
class HeunDiscreteConfig(SigmaSpacingKeys, NoiseScheduleConfig):
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = one_of("linear", (*BETA_SCHEDULES, "exp"))
    clip_sample: bool = False  # clamp x̂_0 to ±clip_sample_range
    clip_sample_range: float = 1.0


class HeunDiscreteScheduler(SigmaScheduler):
    """Heun's second-order sampler in σ (Karras et al., 2022, Algorithm 1)."""

    config_class = HeunDiscreteConfig
    order = 2

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self._reset_stage()

    def _reset_stage(self) -> None:
        self.prev_derivative: torch.Tensor | None = None  # slope at σ_i, kept for the corrector
        self.dt: torch.Tensor | None = None
        self.sample: torch.Tensor | None = None  # x_i, the corrector restarts from it

    @property
    def state_in_first_order(self) -> bool:
        """True when the next step() call is a predictor (Euler) stage."""
        return self.dt is None

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: Device = None,
        num_train_timesteps: int | None = None,
        timesteps: list[float] | None = None,
    ) -> None:
        """`num_inference_steps` spaced steps (over `num_train_timesteps` if given), or custom `timesteps`."""
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None and self._sigma_spacing is not None:
            raise ValueError(f"custom timesteps cannot be combined with use_{self._sigma_spacing}_sigmas=True")
        if timesteps is not None:
            n = self.num_inference_steps = len(timesteps)
            ts = check_custom_timesteps(timesteps, len(self.train_sigmas)).astype(np.float32)
            sigmas = np.interp(ts, np.arange(len(self.train_sigmas)), self.train_sigmas)
        else:
            n = self.num_inference_steps = self._check_num_steps(num_inference_steps)
            ts, sigmas = self._spaced_sigmas(n, num_train_timesteps)
        if respaced := self._respaced(sigmas[-1].item(), sigmas[0].item(), n):
            sigmas, ts = respaced
        sigmas = np.append(sigmas, 0.0).astype(np.float32)
        # [σ_0, σ_1, σ_1, σ_2, σ_2, ..., σ_{n-1}, σ_{n-1}, 0] and [t_0, t_1, t_1, ..., t_{n-1}, t_{n-1}]
        sigmas = np.concatenate([sigmas[:1], sigmas[1:-1].repeat(2), sigmas[-1:]])
        ts = np.concatenate([ts[:1], np.asarray(ts[1:]).repeat(2)])
        self._set_table(ts, sigmas, device, torch.float32)
        self._reset_stage()

    def step(
        self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor, return_dict: bool = True
    ) -> SchedulerOutput | tuple:
        self._init_step_index(timestep)
        i = self._step_index
        first = self.state_in_first_order
        # predictor: from sigmas[i] to sigmas[i+1]; corrector: the same step, seen from index i = (that) + 1
        sigma, sigma_next = (self.sigmas[i], self.sigmas[i + 1]) if first else (self.sigmas[i - 1], self.sigmas[i])
        # the network was evaluated at σ (predictor) or at σ_next (corrector)
        denoised = ve_denoised(model_output, sample, sigma if first else sigma_next, self.config.prediction_type)
        if self.config.clip_sample:
            denoised = denoised.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        if first:
            d = (sample - denoised) / sigma
            self.prev_derivative, self.dt, self.sample = d, sigma_next - sigma, sample
            prev_sample = sample + d * self.dt
        else:
            d = (sample - denoised) / sigma_next
            d = (self.prev_derivative + d) / 2
            prev_sample = self.sample + d * self.dt
            self._reset_stage()
        self._step_index += 1
        if not return_dict:
            return prev_sample, denoised
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)
