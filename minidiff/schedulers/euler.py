"""Euler's method on the probability-flow ODE dx/dσ = (x - D(x; σ)) / σ  [1, Algorithm 2 without Heun's correction].

With s_churn > 0 each step first adds noise to raise σ to σ̂ = σ (1 + γ): the stochastic sampler of [1, Algorithm 2].

References:
1. Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", 2022.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..noise import randn_tensor
from .base import RNG, Device, SchedulerOutput, SigmaScheduler, Tensor, Timestep, reject_step_indices
from .config import FINAL_SIGMAS_TYPES, NoiseScheduleConfig, SigmaSpacingKeys, one_of
from .schedule import check_custom_timesteps, sigma_to_t, ve_denoised


@dataclass(frozen=True)
class EulerDiscreteConfig(SigmaSpacingKeys, NoiseScheduleConfig):
    interpolation_type: str = one_of("linear", ("linear", "log_linear"))  # σ between the spaced t's
    sigma_min: float | None = None  # the Karras σ range, when set
    sigma_max: float | None = None
    timestep_type: str = one_of("discrete", ("discrete", "continuous"))
    rescale_betas_zero_snr: bool = False
    final_sigmas_type: str = one_of("zero", FINAL_SIGMAS_TYPES)  # the σ after the last step: 0 or σ_min


class EulerDiscreteScheduler(SigmaScheduler):
    """Euler sampler in σ (Karras et al., 2022, Algorithm 2 with first-order steps)."""

    config_class = EulerDiscreteConfig

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        if self._continuous_timesteps:
            self.timesteps = 0.25 * self.sigmas[:-1].log()

    @property
    def _continuous_timesteps(self) -> bool:
        # EDM-style v-prediction models (e.g. SD 2 upscalers) are conditioned on c_noise = log(σ) / 4
        return self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction"

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: Device = None,
        timesteps: list[float] | None = None,
        sigmas: list[float] | None = None,
    ) -> None:
        """`num_inference_steps` spaced steps, or custom descending `timesteps`, or `sigmas` (final one included)."""
        c = self.config
        if sum(x is not None for x in (num_inference_steps, timesteps, sigmas)) != 1:
            raise ValueError("pass exactly one of num_inference_steps, timesteps or sigmas")
        if timesteps is not None and self._sigma_spacing is not None:
            raise ValueError(f"custom timesteps cannot be combined with use_{self._sigma_spacing}_sigmas=True")
        if timesteps is not None and self._continuous_timesteps:
            raise ValueError("custom timesteps cannot be combined with continuous timesteps")
        train = self.train_sigmas
        if sigmas is not None:
            self.num_inference_steps = len(sigmas) - 1
            sigmas = np.array(sigmas, dtype=np.float32)
            ts = sigma_to_t(sigmas[:-1], np.log(train))
        else:
            if timesteps is not None:
                n = self.num_inference_steps = len(timesteps)
                ts = check_custom_timesteps(timesteps, len(train)).astype(np.float32)
                sigmas = np.interp(ts, np.arange(len(train)), train)
            else:
                n = self.num_inference_steps = self._check_num_steps(num_inference_steps)
                ts, sigmas = self._spaced_sigmas(n)  # σ linear in t between training steps
            if c.interpolation_type == "log_linear":  # n + 1 log-spaced σ, σ_max to σ_min, whatever the t's (diffusers)
                sigmas = torch.linspace(np.log(train[-1]), np.log(train[0]), n + 1).exp().numpy()
            if respaced := self._respaced(sigmas[-1].item(), sigmas[0].item(), n):
                sigmas, ts = respaced
            sigma_last = 0.0 if c.final_sigmas_type == "zero" else train[0].item()
            sigmas = np.append(sigmas, sigma_last).astype(np.float32)
        self._set_table(ts, sigmas, device, torch.float32)
        if self._continuous_timesteps:
            self.timesteps = (0.25 * self.sigmas[:-1].log()).to(device)

    def _denoised(
        self, model_output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, sigma_hat: torch.Tensor
    ) -> torch.Tensor:
        """D(x; σ̂) from the network output (diffusers evaluates ε at σ̂ but v at σ: they differ only when churning)."""
        pt = self.config.prediction_type
        return ve_denoised(model_output, x, sigma_hat if pt == "epsilon" else sigma, pt)

    def step(
        self,
        model_output: Tensor,
        timestep: Timestep,
        sample: Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: RNG = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        reject_step_indices(timestep, type(self).__name__)
        self._init_step_index(timestep)
        i = self._step_index
        x = sample.to(torch.float32)
        sigma = self.sigmas[i]
        # (s_churn = 0: no comparison, which would read σ, a tensor, on the host)
        gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) if s_churn > 0 and s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:  # churn: add noise to go up from σ to σ̂
            eps = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype) * s_noise
            x = x + eps * (sigma_hat**2 - sigma**2) ** 0.5
        denoised = self._denoised(model_output, x, sigma, sigma_hat)
        d = (x - denoised) / sigma_hat
        dt = self.sigmas[i + 1] - sigma_hat
        prev_sample = (x + d * dt).to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return prev_sample, denoised
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)
