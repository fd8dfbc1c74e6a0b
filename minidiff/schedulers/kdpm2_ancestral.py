"""Ancestral DPM-Solver-2: the DPM2 step aimed at σ_down, then fresh noise of std σ_up, σ_down² + σ_up² = σ_next².

σ_up = sqrt(σ_next² (σ² - σ_next²) / σ²) is the DDPM posterior std in σ units (η = 1). Each step
evaluates the network at σ and at σ_mid = sqrt(σ σ_down) [1, Algorithm 1, r = 1/2], then draws the noise:
    x_next = x + d_mid (σ_down - σ) + σ_up z
The last step (σ_down = 0) is a single Euler step and draws nothing.

References:
1. Lu et al., "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling", 2022 (DPM-Solver-2).
2. Ho et al., "Denoising Diffusion Probabilistic Models", 2020 (ancestral sampling).
3. Crowson, k-diffusion `sample_dpm_2_ancestral` / `get_ancestral_step` (https://github.com/crowsonkb/k-diffusion).
"""

from __future__ import annotations

import torch

from ..noise import randn_tensor
from .base import RNG, SchedulerOutput, Tensor, Timestep
from .kdpm2 import KDPM2DiscreteScheduler


class KDPM2AncestralDiscreteScheduler(KDPM2DiscreteScheduler):
    """Ancestral DPM-Solver-2 (k-diffusion's sample_dpm_2_ancestral): the "DPM2 a" sampler."""

    def _step_targets(self, sigmas: torch.Tensor) -> torch.Tensor:
        """σ_down of each step σ → σ_next (and σ_up, the std of the noise added after it)."""
        sigma, sigma_next = sigmas[:-1], sigmas[1:]
        self.up_sigmas = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        return (sigma_next**2 - self.up_sigmas**2) ** 0.5

    def step(
        self, model_output: Tensor, timestep: Timestep, sample: Tensor, generator: RNG = None, return_dict: bool = True
    ) -> SchedulerOutput | tuple:
        prev_sample, denoised, k, finished = self._evaluate(model_output, timestep, sample)
        if finished:
            noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
            prev_sample = prev_sample + noise * self.up_sigmas[k]
        if not return_dict:
            return prev_sample, denoised
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)
