"""Trajectory consistency distillation: strategic stochastic sampling from t to s = (1 - γ) t' below the next t'.

The TCD network predicts along the probability-flow trajectory [1, §4.2]; from x_t each step moves
deterministically to the earlier point s of the same trajectory, then forward-diffuses to t' [1, eq. 14]:
    x̂_0, ε̂ from the network at t,   x_s = sqrt(ᾱ_s) x̂_0 + sqrt(1 - ᾱ_s) ε̂,   s = floor((1 - γ) t')
    x_{t'} = sqrt(ᾱ_t' / ᾱ_s) x_s + sqrt(1 - ᾱ_t' / ᾱ_s) z
γ (`eta` in step()) sets the stochasticity: 0 is deterministic (s = t'), 1 jumps to x̂_0 and re-noises.
The last step returns x_s. The schedule is LCM's; with `original_inference_steps` passed to
set_timesteps it is picked from all T training steps instead of the distillation schedule.

References:
1. Zheng et al., "Trajectory Consistency Distillation: Improved Latent Consistency Distillation by
   Semi-Linear Consistency Function with Trajectory Mapping", 2024.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..noise import randn_tensor
from ..outputs import BaseOutput
from .base import RNG, Tensor, Timestep
from .lcm import LCMConfig, LCMScheduler
from .schedule import vp_x0_eps

logger = logging.getLogger(__name__)


@dataclass
class TCDSchedulerOutput(BaseOutput):
    """`prev_sample` is x at the next timestep; `pred_noised_sample` the trajectory point x_s."""

    prev_sample: torch.Tensor
    pred_noised_sample: torch.Tensor | None = None


@dataclass(frozen=True)
class TCDConfig(LCMConfig):
    def __post_init__(self) -> None:
        # keys TCD carries from LCM's config but its step never applies (diffusers' neither): accepted, said aloud
        for key in ("clip_sample", "thresholding"):
            if getattr(self, key):
                logger.warning(
                    f"TCDScheduler: {key}=True has no effect (TCD's step does not apply it, as in diffusers)"
                )


class TCDScheduler(LCMScheduler):
    """Strategic stochastic sampling for TCD models (Zheng et al., 2024)."""

    config_class = TCDConfig
    _compatibles = ()  # diffusers lists no class this config swaps into

    def _origin_timesteps(self, original_inference_steps: int | None, strength: float) -> np.ndarray:
        """LCM's distillation schedule, or, when original_inference_steps is given, every training step."""
        if original_inference_steps is None:
            return super()._origin_timesteps(None, strength)
        return np.arange(int(self.config.num_train_timesteps * strength))

    def step(
        self,
        model_output: Tensor,
        timestep: Timestep,
        sample: Tensor,
        eta: float = 0.3,
        generator: RNG = None,
        return_dict: bool = True,
    ) -> TCDSchedulerOutput | tuple:
        if not 0 <= eta <= 1:
            raise ValueError(f"TCDScheduler.step: eta (the paper's γ) must be in [0, 1], got {eta}")
        t = self._timestep_value(timestep)
        self._init_step_index(t)
        t_next = self._next_timestep()
        t_next = 0 if t_next is None else t_next
        s = int(torch.floor((1 - eta) * torch.tensor(t_next)))  # (in float32, as diffusers rounds it)
        ab_t, ab_next, ab_s = self.alphas_cumprod[t], self._alpha_cumprod(t_next), self.alphas_cumprod[s]
        x0, eps = vp_x0_eps(model_output, sample, ab_t**0.5, (1 - ab_t) ** 0.5, self.config.prediction_type)
        x_s = ab_s**0.5 * x0 + (1 - ab_s) ** 0.5 * eps
        if eta > 0 and self.step_index != self.num_inference_steps - 1:
            noise = randn_tensor(model_output.shape, generator, model_output.device, x_s.dtype)
            prev_sample = (ab_next / ab_s) ** 0.5 * x_s + (1 - ab_next / ab_s) ** 0.5 * noise
        else:
            prev_sample = x_s
        self.step_index += 1
        if not return_dict:
            return prev_sample, x_s
        return TCDSchedulerOutput(prev_sample=prev_sample, pred_noised_sample=x_s)
