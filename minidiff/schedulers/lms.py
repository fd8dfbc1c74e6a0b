"""Linear multistep (Adams-Bashforth in σ) on the probability-flow ODE dx/dσ = d = (x - x̂_0) / σ.

x_{i+1} = x_i + Σ_j c_j d_{i-j}, where c_j = ∫_{σ_i}^{σ_{i+1}} ℓ_j(σ) dσ integrates the Lagrange
basis polynomial through the last `order` sigmas. ℓ_j has degree order - 1, so Gauss-Legendre
quadrature with `order` nodes (exact to degree 2·order - 1) gives the integral exactly: no scipy.

References:
1. Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", 2022.
2. Crowson, k-diffusion `sample_lms` (https://github.com/crowsonkb/k-diffusion).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .base import SchedulerOutput, SigmaScheduler, Tensor, Timestep
from .config import NoiseScheduleConfig, SigmaSpacingKeys
from .schedule import ve_denoised


@dataclass(frozen=True)
class LMSDiscreteConfig(SigmaSpacingKeys, NoiseScheduleConfig):
    """LMS takes the shared keys and the σ-spacing ones."""


def lms_coefficient(sigmas: np.ndarray, order: int, i: int, j: int) -> float:
    """∫_{σ_i}^{σ_{i+1}} Π_{k≠j} (σ - σ_{i-k}) / (σ_{i-j} - σ_{i-k}) dσ, exactly."""
    nodes, weights = np.polynomial.legendre.leggauss(order)
    lo, hi = float(sigmas[i]), float(sigmas[i + 1])
    tau = (hi - lo) / 2 * nodes + (hi + lo) / 2  # the nodes mapped from [-1, 1] to [σ_i, σ_{i+1}]
    basis = np.ones_like(tau)
    for k in range(order):
        if k != j:
            basis *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
    return (hi - lo) / 2 * float(np.sum(weights * basis))


class LMSDiscreteScheduler(SigmaScheduler):
    """Linear multistep sampler in σ (Karras et al., 2022; k-diffusion's sample_lms)."""

    config_class = LMSDiscreteConfig

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self.derivatives: list[torch.Tensor] = []

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        n = self.num_inference_steps = self._check_num_steps(num_inference_steps)
        ts, sigmas = self._spaced_sigmas(n)
        if respaced := self._respaced(sigmas[-1].item(), sigmas[0].item(), n, karras_config=False):
            sigmas, ts = respaced
        self._set_table(ts, np.append(sigmas, 0.0), device, torch.float32)
        self.derivatives = []

    def step(
        self, model_output: Tensor, timestep: Timestep, sample: Tensor, order: int = 4, return_dict: bool = True
    ) -> SchedulerOutput | tuple:
        self._init_step_index(timestep)
        i = self._step_index
        sigma = self.sigmas[i]
        denoised = ve_denoised(model_output, sample, sigma, self.config.prediction_type)
        self.derivatives.append((sample - denoised) / sigma)
        if len(self.derivatives) > order:
            self.derivatives.pop(0)
        # the order ramps up with the step index; after an img2img start fewer d's exist than the
        # order asks for, and (as in diffusers) only the first coefficients are then used
        order = min(i + 1, order)
        sigmas = self.sigmas.double().numpy()
        coeffs = [lms_coefficient(sigmas, order, i, j) for j in range(order)]
        prev_sample = sample + sum(c * d for c, d in zip(coeffs, reversed(self.derivatives)))
        self._step_index += 1
        if not return_dict:
            return prev_sample, denoised
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)
