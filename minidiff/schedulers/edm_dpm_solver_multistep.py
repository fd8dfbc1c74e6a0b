"""DPM-Solver++ (multistep, orders 1-3, ODE and SDE) on EDM's σ schedule and preconditioned network.

The network sees c_in x, so in DPM-Solver++'s x = α_t x_0 + σ_t ε the sample has α_t = 1, σ_t = σ and
λ = -ln σ [2, §3]; the updates are DPMSolverMultistepScheduler's, with the denoised output
D(x; σ) = c_skip x + c_out F of EDM's preconditioning [1, Table 1] (see edm_euler.py).

References:
1. Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", 2022.
2. Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", 2022.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .config import DynamicThresholdingKeys, one_of
from .dpm_solver_multistep import DPMSolverMultistepScheduler
from .edm_euler import EDMEulerConfig, EDMPreconditioning, edm_denoised
from .schedule import dynamic_threshold


@dataclass(frozen=True)
class EDMDPMSolverMultistepConfig(DynamicThresholdingKeys, EDMEulerConfig):
    solver_order: int = one_of(2, (1, 2, 3))
    # a sibling solver's names are mapped as diffusers maps them ("deis" then needs final_sigmas_type="sigma_min")
    algorithm_type: str = one_of("dpmsolver++", ("dpmsolver++", "sde-dpmsolver++"), {"deis": "dpmsolver++"})
    solver_type: str = one_of("midpoint", ("midpoint", "heun"), dict.fromkeys(("logrho", "bh1", "bh2"), "midpoint"))
    lower_order_final: bool = True  # first / second order for the last steps when there are fewer than 15
    euler_at_final: bool = False


class EDMDPMSolverMultistepScheduler(EDMPreconditioning, DPMSolverMultistepScheduler):
    """DPM-Solver++ multistep with EDM preconditioning (Lu et al., 2022; Karras et al., 2022)."""

    config_class = EDMDPMSolverMultistepConfig
    _compatibles = ()  # diffusers lists no class this config swaps into
    _variance_preserving = False  # add_noise: x_0 + σ ε

    def __init__(self, **config: Any) -> None:
        if config.get("algorithm_type") == "deis" and config.get("final_sigmas_type", "zero") == "zero":
            raise ValueError(f"{type(self).__name__}: final_sigmas_type='zero' needs algorithm_type DPM-Solver++'s")
        self._init_edm(config, torch.linspace(0, 1, config.get("num_train_timesteps", 1000)))
        self._reset_history()

    def _sigma_min(self, sigmas: torch.Tensor) -> float:
        """The last σ with final_sigmas_type="sigma_min": the config's σ_min."""
        return self.config.sigma_min

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        n = self.num_inference_steps = self._check_num_steps(num_inference_steps)
        self._set_sigmas(torch.linspace(0, 1, n), device)
        self._reset_history()

    def _alpha_sigma_lambda(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """α_t = 1, σ_t = σ, λ = -ln σ: the preconditioned network sees x itself."""
        return torch.ones_like(sigma), sigma, -torch.log(sigma)

    def _denoised(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        c = self.config
        x0 = edm_denoised(model_output, sample, self.sigmas[self._step_index], c.sigma_data, c.prediction_type)
        if c.thresholding:
            x0 = dynamic_threshold(x0, c.dynamic_thresholding_ratio, c.sample_max_value)
        return x0
