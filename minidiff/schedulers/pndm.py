"""PNDM: pseudo linear multistep (PLMS) over the DDIM transfer map, warmed up with pseudo Runge-Kutta (PRK).

The transfer φ(x_t, ε, t → t') moves a sample along the DDIM ODE with a fixed ε [1, eq. 9]. PRK
estimates ε for the first three steps with four evaluations each (RK4 weights 1/6, 1/3, 1/3, 1/6),
then PLMS combines the last four ε's with the Adams-Bashforth weights (55, -59, 37, -9) / 24.
With `skip_prk_steps` the warm-up is a Heun-like step and lower-order Adams-Bashforth instead
(the "PLMS" sampler of Stable Diffusion); `timesteps` then has N + 1 entries (one repeated).

The state machine follows diffusers call for call: the step kind depends on how many times step()
has been called, not on the timestep given.

References:
1. Liu, Ren, Lin & Zhao, "Pseudo Numerical Methods for Diffusion Models on Manifolds", 2022.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .base import DiscreteScheduler, SchedulerOutput
from .config import TIMESTEP_SPACINGS, NoiseScheduleConfig, one_of
from .schedule import spaced_timesteps


@dataclass(frozen=True)
class PNDMConfig(NoiseScheduleConfig):
    prediction_type: str = one_of("epsilon", ("epsilon", "v_prediction"))
    timestep_spacing: str = one_of("leading", TIMESTEP_SPACINGS)
    skip_prk_steps: bool = False  # PLMS only (Stable Diffusion's "PLMS" sampler)
    set_alpha_to_one: bool = False  # ᾱ "before" step 0: 1 or ᾱ_0


class PNDMScheduler(DiscreteScheduler):
    """Pseudo Numerical methods for Diffusion Models: PRK warm-up + PLMS (Liu et al., 2022)."""

    config_class = PNDMConfig

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self.final_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        self.pndm_order = 4
        self.timesteps = None
        self.prk_timesteps: np.ndarray | None = None
        self.plms_timesteps: np.ndarray | None = None
        self._reset_state()

    def _reset_state(self) -> None:
        self.counter = 0  # step() calls so far: selects PRK / PLMS and the stage within
        self.ets: list[torch.Tensor] = []  # past ε's (one per full step) for the multistep formulas
        self.cur_model_output: torch.Tensor | float = 0  # PRK: running RK4 sum
        self.cur_sample: torch.Tensor | None = None  # the sample the current step started from

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        n = self.num_inference_steps = self._check_num_steps(num_inference_steps)
        c = self.config
        T = c.num_train_timesteps
        ts = spaced_timesteps(c.timestep_spacing, n, T, c.steps_offset).round().astype(np.int64)
        if c.skip_prk_steps:
            # the second step is evaluated twice (a Heun-like warm-up): [t0, t1, t1, t2, ...]
            self.prk_timesteps = np.array([], dtype=np.int64)
            self.plms_timesteps = np.concatenate([ts[:1], ts[1:2], ts[1:]])
        else:
            if n < self.pndm_order:
                raise ValueError(f"PNDMScheduler needs num_inference_steps >= 4 unless skip_prk_steps=True, got {n}")
            # three RK4 steps over the three largest timesteps, each with two half-step evaluations
            half = T // n // 2
            top = ts[: self.pndm_order][::-1]  # ascending
            prk = np.stack([top, top + half], axis=1).reshape(-1)  # t, t + h for each
            self.prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1].copy()
            self.plms_timesteps = ts[self.pndm_order - 1 :].copy()
        self._set_discrete_timesteps(np.concatenate([self.prk_timesteps, self.plms_timesteps]), device)
        self._reset_state()

    def step(
        self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor, return_dict: bool = True
    ) -> SchedulerOutput | tuple:
        """One call of the sampler: a PRK stage during the warm-up, then a PLMS step."""
        self._check_ready()
        if self.counter < len(self.prk_timesteps) and not self.config.skip_prk_steps:
            return self.step_prk(model_output, timestep, sample, return_dict)
        return self.step_plms(model_output, timestep, sample, return_dict)

    def step_prk(
        self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor, return_dict: bool = True
    ) -> SchedulerOutput | tuple:
        """One of the four RK4 stages; every stage moves from the step's starting sample."""
        self._check_ready()
        t, eps = self._timestep_value(timestep), model_output
        half = self.config.num_train_timesteps // self.num_inference_steps // 2
        stage = self.counter % 4
        t_prev = t - (0 if stage % 2 else half)  # stages 0 and 2 move half a step on
        t_start = int(self.prk_timesteps[self.counter - stage])
        if stage == 0:
            self.cur_model_output = self.cur_model_output + 1 / 6 * eps
            self.ets.append(eps)
            self.cur_sample = sample
        elif stage in (1, 2):
            self.cur_model_output = self.cur_model_output + 1 / 3 * eps
        else:
            eps = self.cur_model_output + 1 / 6 * eps
            self.cur_model_output = 0
        return self._output(self._transfer(self.cur_sample, t_start, t_prev, eps), return_dict)

    def step_plms(
        self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor, return_dict: bool = True
    ) -> SchedulerOutput | tuple:
        """Adams-Bashforth on ε of order 1..4 (the second call re-does the first step, Heun-style)."""
        self._check_ready()
        if not self.config.skip_prk_steps and len(self.ets) < 3:
            raise ValueError("PNDMScheduler: the PLMS steps need the 12 PRK steps first (call step() in order)")
        t, eps, x = self._timestep_value(timestep), model_output, sample
        r = self.config.num_train_timesteps // self.num_inference_steps
        t_prev = t - r
        if self.counter != 1:
            self.ets = self.ets[-3:] + [eps]
        else:  # second call: repeat the step from t + r to t with the averaged ε
            t, t_prev = t + r, t
        e = self.ets
        if len(e) == 1 and self.counter == 0:
            self.cur_sample = x
        elif len(e) == 1 and self.counter == 1:
            eps = (eps + e[-1]) / 2
            x, self.cur_sample = self.cur_sample, None
        elif len(e) == 2:
            eps = (3 * e[-1] - e[-2]) / 2
        elif len(e) == 3:
            eps = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
        else:
            eps = (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4]) / 24
        return self._output(self._transfer(x, t, t_prev, eps), return_dict)

    def _output(self, prev_sample: torch.Tensor, return_dict: bool) -> SchedulerOutput | tuple:
        """Count the call (the next step's kind and stage depend on it) and wrap the result."""
        self.counter += 1
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    def _transfer(self, x: torch.Tensor, t: int, t_prev: int, eps: torch.Tensor) -> torch.Tensor:
        """φ(x_t, ε, t → t_prev): the DDIM step written as in [1, eq. 9]."""
        ab_t = self.alphas_cumprod[t]
        ab_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else self.final_alpha_cumprod
        if self.config.prediction_type == "v_prediction":
            eps = ab_t**0.5 * eps + (1 - ab_t) ** 0.5 * x
        denom = ab_t * (1 - ab_prev) ** 0.5 + (ab_t * (1 - ab_t) * ab_prev) ** 0.5
        return (ab_prev / ab_t) ** 0.5 * x - (ab_prev - ab_t) * eps / denom
