"""DPM-Solver singlestep (orders 1-3): a step of order k restarts from the sample k - 1 steps back.

In the log-SNR λ = log(α_t / σ_t) the diffusion ODE is solved exactly up to an integral of the
network output (h = λ_t - λ_s) [1, eq. 3.4; 2, eq. 8]:
    noise form (DPM-Solver)     x_t = (α_t/α_s) x_s - α_t ∫ e^{-λ} ε̂(λ) dλ
    data form  (DPM-Solver++)   x_t = (σ_t/σ_s) x_s + σ_t ∫ e^{λ} x̂_0(λ) dλ
The steps come in groups of k grid points s = u_0, u_1, .., u_{k-1} (at r_j h from s): the network
is evaluated at each, and the group's j-th step integrates from x_s with the outputs m_0..m_j
expanded in λ, D_0 = m_0 and D_1, D_2 their divided differences scaled by h, h² [1, Algorithm 1-2]:
    x_t = A x_s - B Σ_j z φ_{j+1}(z) D_j,   z φ_1(z) = e^z - 1,  z φ_{j+1}(z) = φ_j(z) - 1/j!
    DPM-Solver:    A = α_t/α_s,           B = σ_t,  z = h
    DPM-Solver++:  A = σ_t/σ_s,           B = α_t,  z = -h
    SDE variant:   A = (σ_t/σ_s) e^{-h},  B = α_t,  z = -2h,  plus σ_t sqrt(1 - e^{-2h}) ξ  [2, §5]
"midpoint" is the paper's DPM-Solver-2/3, which keeps only the newest difference; "heun" keeps
the whole Taylor expansion.

References:
1. Lu et al., "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling", 2022.
2. Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", 2022.
3. Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", 2022 (σ schedule).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config import FrozenDict
from ..noise import randn_tensor
from .base import Device, SchedulerOutput, Tensor, Timestep, VPSolverScheduler
from .config import FINAL_SIGMAS_TYPES, BetaScheduleConfig, DynamicThresholdingKeys, FlowKeys, SigmaSpacingKeys, one_of
from .schedule import alpha_sigma_lambda, check_custom_timesteps, dynamic_threshold, solver_timesteps, vp_x0_eps

ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++")


@dataclass(frozen=True)
class DPMSolverSinglestepConfig(FlowKeys, SigmaSpacingKeys, DynamicThresholdingKeys, BetaScheduleConfig):
    solver_order: int = one_of(2, (1, 2, 3))
    algorithm_type: str = one_of("dpmsolver++", ALGORITHMS, {"deis": "dpmsolver++"})
    solver_type: str = one_of("midpoint", ("midpoint", "heun"), dict.fromkeys(("logrho", "bh1", "bh2"), "midpoint"))
    lower_order_final: bool = False  # end on a first-order step (set_timesteps turns it on when it must)
    final_sigmas_type: str = one_of("zero", FINAL_SIGMAS_TYPES)  # the σ after the last step: 0 or σ_min
    lambda_min_clipped: float = -float("inf")  # leave out the steps whose λ is below this (cosine schedules)
    variance_type: str | None = None  # "learned" / "learned_range": the model output carries extra channels


def singlestep_orders(n: int, solver_order: int, last_first_order: bool) -> list[int]:
    """The order of each of n steps: groups 1, 2, .., solver_order, the last group cut short."""
    orders = [1 + j % solver_order for j in range(n)]
    if last_first_order:
        orders[-1] = 1
    return orders


class DPMSolverSinglestepScheduler(VPSolverScheduler):
    """DPM-Solver / DPM-Solver++ singlestep, orders 1-3 (Lu et al., 2022)."""

    config_class = DPMSolverSinglestepConfig

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        c = self.config
        if c.algorithm_type == "dpmsolver" and c.final_sigmas_type == "zero":
            raise ValueError(f"{type(self).__name__}: algorithm_type='dpmsolver' needs final_sigmas_type='sigma_min'")
        self.lambda_t = torch.log(self.alphas_cumprod.sqrt()) - torch.log((1 - self.alphas_cumprod).sqrt())
        self._reset_history()

    def _reset_history(self) -> None:
        self.model_outputs: list[torch.Tensor | None] = [None] * self.config.solver_order  # newest last
        self.sample: torch.Tensor | None = None  # x at the start of the current group

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: Device = None,
        timesteps: list[int] | np.ndarray | None = None,
    ) -> None:
        """`num_inference_steps` evenly spaced steps (σ's respaced if a use_*_sigmas key is set), or custom
        descending `timesteps`."""
        c, T, name = self.config, self.config.num_train_timesteps, type(self).__name__
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError(f"{name}.set_timesteps: pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None and self._sigma_spacing:
            raise ValueError(
                f"{name}.set_timesteps: custom timesteps cannot be used with use_{self._sigma_spacing}_sigmas"
            )
        if timesteps is not None:
            ts = check_custom_timesteps(timesteps, T).astype(np.int64)
            n = len(ts)
        else:  # evenly from T - 1, less the steps whose λ is below lambda_min_clipped
            n = self._check_num_steps(num_inference_steps)
            clipped = torch.searchsorted(torch.flip(self.lambda_t, [0]), c.lambda_min_clipped).item()
            ts = solver_timesteps("linspace", n, T, 0, T - clipped)
        sigmas, ts, _ = self._solver_sigmas(ts, n)
        sigma_last = 0.0 if c.final_sigmas_type == "zero" else self.train_sigmas[0].item()
        self._set_table(ts, np.append(sigmas, sigma_last), device, torch.int64)
        self.num_inference_steps = n
        # an unfinished last group, or a last step to σ = 0, needs the first-order end (diffusers switches it on)
        if not c.lower_order_final and (n % c.solver_order or c.final_sigmas_type == "zero"):
            self.config = FrozenDict({**self.config, "lower_order_final": True})
        last_first_order = c.final_sigmas_type == "zero" or (n % c.solver_order == 0 and self.config.lower_order_final)
        self.order_list = singlestep_orders(n, c.solver_order, last_first_order)
        self._reset_history()

    def _convert(self, model_output: torch.Tensor, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the solver's variable: ε̂ for DPM-Solver, x̂_0 otherwise; x̂_0) at the current σ."""
        if self.config.variance_type in ("learned", "learned_range") and self.config.prediction_type == "epsilon":
            model_output = model_output[:, : sample.shape[1]]  # drop the predicted-variance channels
        alpha_t, sigma_t, _ = alpha_sigma_lambda(self.sigmas[self._step_index])
        c = self.config
        x0, eps = vp_x0_eps(model_output, sample, alpha_t, sigma_t, c.prediction_type)
        if c.thresholding:
            x0 = dynamic_threshold(x0, c.dynamic_thresholding_ratio, c.sample_max_value)
            eps = (sample - alpha_t * x0) / sigma_t
        return (eps if c.algorithm_type == "dpmsolver" else x0), x0

    def _update(self, order: int, noise: torch.Tensor | None) -> torch.Tensor:
        """From the group's first sample x_s (at sigmas[i - order + 1]) to sigmas[i + 1], with its `order` outputs."""
        i, algorithm = self._step_index, self.config.algorithm_type
        alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(self.sigmas[i + 1])
        alpha_s, sigma_s, lambda_s = alpha_sigma_lambda(self.sigmas[i - order + 1])
        h = lambda_t - lambda_s
        m = self.model_outputs[-order:]  # m_0 (at s) .. m_{order-1} (at the current σ)
        r = [(alpha_sigma_lambda(self.sigmas[i - order + 1 + j])[2] - lambda_s) / h for j in range(1, order)]
        diffs = [(m_j - m[0]) / r_j for m_j, r_j in zip(m[1:], r)]  # first divided differences, times h

        z = {"dpmsolver": h, "dpmsolver++": -h, "sde-dpmsolver++": -2.0 * h}[algorithm]
        e = torch.expm1(z)
        zphi = [e, e / z - 1.0]  # z φ_1(z), z φ_2(z)
        # diffusers' SDE third-order term has φ_2 + 1/2 where the expansion has φ_2 - 1/2: kept for parity
        zphi.append((zphi[1] / z) + (0.5 if algorithm == "sde-dpmsolver++" else -0.5))
        if order == 1:
            terms = [(zphi[0], m[0])]
        elif self.config.solver_type == "midpoint":  # DPM-Solver-2 / -3: the newest difference only
            terms = [(zphi[0], m[0]), (zphi[0] / 2 if order == 2 else zphi[1], diffs[-1])]
        elif order == 2:
            terms = [(zphi[0], m[0]), (zphi[1], diffs[0])]
        else:  # the quadratic through the three outputs: m(r) = m_0 + D_1 r + D_2 r² / 2
            (r1, r2), (d1, d2) = r, diffs
            terms = [(zphi[0], m[0]), (zphi[1], (r2 * d1 - r1 * d2) / (r2 - r1)), (zphi[2], 2 * (d2 - d1) / (r2 - r1))]

        if algorithm == "dpmsolver":
            A, B = alpha_t / alpha_s, sigma_t
        else:
            A, B = sigma_t / sigma_s * (torch.exp(-h) if algorithm == "sde-dpmsolver++" else 1.0), alpha_t
        x_t = A * self.sample
        for c, d in terms:  # term by term, scalar coefficients first: diffusers' rounding in half precision
            x_t = x_t - (B * c) * d
        if noise is not None:
            x_t = x_t + sigma_t * torch.sqrt(-torch.expm1(-2.0 * h)) * noise
        return x_t

    def step(
        self,
        model_output: Tensor,
        timestep: Timestep,
        sample: Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        self._init_step_index(timestep)
        m, denoised = self._convert(model_output, sample)
        self.model_outputs = self.model_outputs[1:] + [m]
        noise = None
        if self.config.algorithm_type == "sde-dpmsolver++":
            noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
        order = self.order_list[self._step_index]
        while self.model_outputs[-order] is None:  # img2img may start inside a group
            order -= 1
        if order == 1:
            self.sample = sample
        prev_sample = self._update(order, noise)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)
