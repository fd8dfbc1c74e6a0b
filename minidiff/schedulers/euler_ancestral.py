"""Ancestral Euler: an Euler step down to σ_down, then fresh noise of std σ_up, with σ_down² + σ_up² = σ_next².

σ_up = sqrt(σ_next² (σ² - σ_next²) / σ²) is the DDPM posterior std in σ units (η = 1).

References:
1. Ho et al., "Denoising Diffusion Probabilistic Models", 2020 (ancestral sampling).
2. Crowson, k-diffusion `sample_euler_ancestral` / `get_ancestral_step` (https://github.com/crowsonkb/k-diffusion).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..noise import randn_tensor
from .base import RNG, SchedulerOutput, SigmaScheduler, Tensor, Timestep, reject_step_indices
from .config import NoiseScheduleConfig, one_of
from .schedule import ve_denoised


@dataclass(frozen=True)
class EulerAncestralDiscreteConfig(NoiseScheduleConfig):
    prediction_type: str = one_of("epsilon", ("epsilon", "v_prediction"))  # diffusers has no "sample" here either
    rescale_betas_zero_snr: bool = False


class EulerAncestralDiscreteScheduler(SigmaScheduler):
    """Euler ancestral sampler (k-diffusion's sample_euler_ancestral; Ho et al., 2020)."""

    config_class = EulerAncestralDiscreteConfig

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        self.num_inference_steps = self._check_num_steps(num_inference_steps)
        ts, sigmas = self._spaced_sigmas(self.num_inference_steps)
        self._set_table(ts, np.append(sigmas, 0.0), device, torch.float32)

    def step(
        self, model_output: Tensor, timestep: Timestep, sample: Tensor, generator: RNG = None, return_dict: bool = True
    ) -> SchedulerOutput | tuple:
        reject_step_indices(timestep, type(self).__name__)
        self._init_step_index(timestep)
        i = self._step_index
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x = sample.to(torch.float32)
        denoised = ve_denoised(model_output, x, sigma, self.config.prediction_type)
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        d = (x - denoised) / sigma
        x = x + d * (sigma_down - sigma)
        # drawn on every step, the last (σ_up = 0) included: the generator advances as in diffusers
        noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
        prev_sample = (x + noise * sigma_up).to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return prev_sample, denoised
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)
