"""Euler's method in Karras et al.'s own parameterisation (EDM): their σ schedule and network preconditioning.

No β schedule: the σ's come straight from a ramp t ∈ [0, 1] [1, eq. 5] (or evenly in log σ), and the
network F sees a preconditioned input and noise level [1, Table 1]:
    D(x; σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x; c_noise(σ))
    c_in = 1 / sqrt(σ² + σ_data²),  c_noise = ¼ ln σ,  c_skip = σ_data² / (σ² + σ_data²),  c_out = σ σ_data c_in
The step itself is EulerDiscreteScheduler's (with churn when s_churn > 0) [1, Algorithm 2].

References:
1. Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", 2022.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .base import Device, SchedulerMixin, Tensor
from .config import FINAL_SIGMAS_TYPES, SchedulerConfig, one_of
from .euler import EulerDiscreteScheduler


@dataclass(frozen=True)
class EDMEulerConfig(SchedulerConfig):
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5  # the std of the data
    sigma_schedule: str = one_of("karras", ("karras", "exponential"))
    num_train_timesteps: int = 1000
    prediction_type: str = one_of("epsilon", ("epsilon", "v_prediction"))  # v: F is -F_ε (c_out < 0)
    rho: float = 7.0
    final_sigmas_type: str = one_of("zero", FINAL_SIGMAS_TYPES)  # the σ after the last step: 0 or σ_min


def edm_sigmas(ramp: torch.Tensor, c: Any) -> torch.Tensor:
    """σ at ramp positions t ∈ [0, 1], from σ_max at 0 to σ_min at 1: Karras' ρ-schedule [1, eq. 5], or
    evenly spaced in log σ (over as many points as the ramp has, whatever their values: diffusers)."""
    if c.sigma_schedule == "karras":
        max_inv_rho, min_inv_rho = c.sigma_max ** (1 / c.rho), c.sigma_min ** (1 / c.rho)
        return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** c.rho
    return torch.linspace(math.log(c.sigma_min), math.log(c.sigma_max), len(ramp)).exp().flip(0)


def edm_denoised(
    model_output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, sigma_data: float, prediction_type: str
) -> torch.Tensor:
    """D(x; σ) = c_skip x + c_out F  [1, eq. 7, Table 1]."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
    return c_skip * x + (c_out if prediction_type == "epsilon" else -c_out) * model_output


class EDMPreconditioning:
    """What the EDM schedulers share: the σ table from a ramp, the network input c_in x, the starting noise."""

    config: Any

    def _init_edm(self, config: dict[str, Any], ramp: torch.Tensor) -> None:
        SchedulerMixin.__init__(self, **config)  # (not SigmaScheduler's: there is no β schedule to derive σ's from)
        self._set_sigmas(ramp, None)
        self.num_inference_steps = None

    def _set_sigmas(self, ramp: torch.Tensor, device: Any) -> None:
        """The σ's at the ramp, then the final one; each step's timestep is the network's c_noise = ¼ ln σ."""
        sigmas = edm_sigmas(ramp, self.config).to(torch.float32)
        self.timesteps = (0.25 * sigmas.log()).to(device)
        sigma_last = self._sigma_min(sigmas) if self.config.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = torch.cat([sigmas, torch.full((1,), float(sigma_last))])
        self._reset_index()

    def _sigma_min(self, sigmas: torch.Tensor) -> float:
        """The last σ with final_sigmas_type="sigma_min": the schedule's last σ again (Euler)."""
        return sigmas[-1].item()

    @property
    def init_noise_sigma(self) -> float:
        """sqrt(σ_max² + 1), as in diffusers (EDM itself starts from σ_max)."""
        return (self.config.sigma_max**2 + 1) ** 0.5

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor = None) -> torch.Tensor:
        """c_in(σ) x = x / sqrt(σ² + σ_data²)."""
        self._init_step_index(timestep)
        return sample / (self.sigmas[self._step_index] ** 2 + self.config.sigma_data**2) ** 0.5


class EDMEulerScheduler(EDMPreconditioning, EulerDiscreteScheduler):
    """Euler sampler with EDM preconditioning and σ schedule (Karras et al., 2022, Algorithm 2)."""

    config_class = EDMEulerConfig
    _compatibles = ()  # diffusers lists no class this config swaps into

    def __init__(self, **config: Any) -> None:
        T = config.get("num_train_timesteps", 1000)
        self._init_edm(config, torch.arange(T + 1, dtype=torch.float64) / T)

    def set_timesteps(
        self, num_inference_steps: int | None = None, device: Device = None, sigmas: Tensor | list[float] | None = None
    ) -> None:
        """`num_inference_steps` σ's at evenly spaced ramp points, or at a custom ramp (diffusers calls it `sigmas`)."""
        if (num_inference_steps is None) == (sigmas is None):
            raise ValueError("pass exactly one of num_inference_steps or sigmas (a ramp in [0, 1])")
        if sigmas is None:
            ramp = torch.linspace(0, 1, self._check_num_steps(num_inference_steps), dtype=torch.float64)
        else:
            ramp = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)
        self._set_sigmas(ramp, device)
        self.num_inference_steps = len(ramp)

    def _denoised(
        self, model_output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, sigma_hat: torch.Tensor
    ) -> torch.Tensor:
        return edm_denoised(model_output, x, sigma_hat, self.config.sigma_data, self.config.prediction_type)
