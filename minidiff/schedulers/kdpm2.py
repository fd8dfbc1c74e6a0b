"""DPM-Solver-2 in σ: an Euler step to the log-midpoint σ_mid = sqrt(σ σ_next), then the whole step with its slope.

For dx/dσ = (x - D(x; σ)) / σ, each step σ → σ_next evaluates the network twice [1, Algorithm 1, r = 1/2]:
    d = (x - D(x; σ)) / σ,              x_mid = x + d (σ_mid - σ)
    d_mid = (x_mid - D(x_mid; σ_mid)) / σ_mid,   x_next = x + d_mid (σ_next - σ)
So `timesteps` lists each step's two evaluations, t(σ_0), t(σ_mid_0), t(σ_1), t(σ_mid_1), ..., and
step() alternates between them. The last step, to σ = 0, is a single Euler step (σ_mid = 0).

References:
1. Lu et al., "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling", 2022 (DPM-Solver-2).
2. Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", 2022 (the σ form).
3. Crowson, k-diffusion `sample_dpm_2` (https://github.com/crowsonkb/k-diffusion).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .base import Device, SchedulerOutput, SigmaScheduler
from .config import NoiseScheduleConfig, SigmaSpacingKeys, one_of
from .schedule import sigma_to_t, ve_denoised


@dataclass(frozen=True)
class KDPM2DiscreteConfig(SigmaSpacingKeys, NoiseScheduleConfig):
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = one_of("epsilon", ("epsilon", "v_prediction"))  # diffusers fails on "sample" at step()


class KDPM2DiscreteScheduler(SigmaScheduler):
    """DPM-Solver-2 (Lu et al., 2022) in k-diffusion's σ form: the "DPM2" sampler."""

    config_class = KDPM2DiscreteConfig
    order = 2

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self.sample: torch.Tensor | None = None  # x at σ, kept for the second evaluation

    @property
    def state_in_first_order(self) -> bool:
        """True when the next step() call is the first evaluation of a step (at σ)."""
        return self.sample is None

    def _step_targets(self, sigmas: torch.Tensor) -> torch.Tensor:
        """Where each step σ_k → σ_{k+1} lands (DPM2: σ_{k+1}; the ancestral sampler lands lower and adds noise)."""
        return sigmas[1:]

    def set_timesteps(
        self, num_inference_steps: int, device: Device = None, num_train_timesteps: int | None = None
    ) -> None:
        """`num_inference_steps` steps (spaced over `num_train_timesteps` if given): 2n - 1 evaluations."""
        n = self.num_inference_steps = self._check_num_steps(num_inference_steps)
        ts, sigmas = self._spaced_sigmas(n, num_train_timesteps)
        if respaced := self._respaced(sigmas[-1].item(), sigmas[0].item(), n):
            sigmas, ts = respaced  # (float64 timesteps, as in diffusers; Karras' rounded)
            ts = ts.round() if self._sigma_spacing == "karras" else ts
        sigma = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))  # σ_0 .. σ_{n-1}, 0
        self.step_sigmas, self.target_sigmas = sigma, self._step_targets(sigma)
        self.mid_sigmas = (sigma[:-1] * self.target_sigmas) ** 0.5  # the log-midpoint of each step
        t_mid = sigma_to_t(self.mid_sigmas[:-1].numpy(), np.log(self.train_sigmas))
        # t_0, t_mid_0, t_1, t_mid_1, ..., t_{n-1} and, as diffusers lays them out, σ_0, σ_1, σ_1, .., 0, 0, 0
        timesteps = np.concatenate([ts[:1], np.stack([t_mid, ts[1:]], axis=1).reshape(-1)])
        table = torch.cat([sigma[:1], sigma[1:].repeat_interleave(2), sigma[-1:]])
        self._set_table(timesteps, table, device, torch.float32 if respaced is None else torch.float64)
        self.sample = None

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor = None) -> torch.Tensor:
        """x / sqrt(σ² + 1) at the σ of this evaluation (σ or σ_mid)."""
        self._init_step_index(timestep)
        k = self._step_index // 2
        sigma = self.step_sigmas[k] if self.state_in_first_order else self.mid_sigmas[k]
        return sample / (sigma**2 + 1) ** 0.5

    def _evaluate(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor) -> tuple:
        """One of the two evaluations of step k: (x after it, x̂_0, k, whether it finished the step)."""
        self._init_step_index(timestep)
        k, first = self._step_index // 2, self.state_in_first_order
        sigma, sigma_mid = self.step_sigmas[k], self.mid_sigmas[k]
        denoised = ve_denoised(model_output, sample, sigma if first else sigma_mid, self.config.prediction_type)
        if first:
            d = (sample - denoised) / sigma
            self.sample, prev_sample = sample, sample + d * (sigma_mid - sigma)
        else:
            d_mid = (sample - denoised) / sigma_mid
            prev_sample = self.sample + d_mid * (self.target_sigmas[k] - sigma)
            self.sample = None
        self._step_index += 1
        return prev_sample, denoised, k, not first

    def step(
        self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor, return_dict: bool = True
    ) -> SchedulerOutput | tuple:
        prev_sample, denoised, _, _ = self._evaluate(model_output, timestep, sample)
        if not return_dict:
            return prev_sample, denoised
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)
