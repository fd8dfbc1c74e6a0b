"""DEIS: the diffusion ODE integrated exactly in ρ = σ_t/α_t, with ε̂ extrapolated in log ρ (ρAB-DEIS).

With x̄ = x / α_t and ρ = σ_t / α_t (the VE noise level σ), the probability-flow ODE is
dx̄/dρ = ε̂(x, ρ) [1, eq. 13], so from s to t
    x_t = α_t (x_s / α_s + ∫_{ρ_s}^{ρ_t} ε̂(ρ) dρ).
The multistep solver of order k replaces ε̂ by the polynomial in log ρ through the last k outputs
ε̂_0 (newest), ε̂_1, .. (an Adams-Bashforth rule): the integral becomes Σ_j C_j ε̂_j with
C_j = ∫ ℓ_j(log ρ) dρ, ℓ_j the Lagrange basis polynomials [1, eq. 15]. With u = log ρ,
∫ e^u p(u) du = e^u q(u) where q + q' = p, so every C_j has a closed form. Order 1 is DDIM.

References:
1. Zhang & Chen, "Fast Sampling of Diffusion Models with Exponential Integrator", ICLR 2023.
2. Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", 2022 (σ schedule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .base import SchedulerOutput, VPSolverScheduler
from .config import DynamicThresholdingKeys, FlowKeys, NoiseScheduleConfig, SigmaSpacingKeys, one_of
from .schedule import alpha_sigma_lambda, dynamic_threshold, solver_timesteps, vp_x0_eps


@dataclass(frozen=True)
class DEISMultistepConfig(FlowKeys, SigmaSpacingKeys, DynamicThresholdingKeys, NoiseScheduleConfig):
    solver_order: int = one_of(2, (1, 2, 3))
    # DPM-Solver / UniPC configs carry their own names: mapped as diffusers maps them
    algorithm_type: str = one_of("deis", ("deis",), dict.fromkeys(("dpmsolver", "dpmsolver++"), "deis"))
    solver_type: str = one_of("logrho", ("logrho",), dict.fromkeys(("midpoint", "heun", "bh1", "bh2"), "logrho"))
    lower_order_final: bool = True  # first / second order for the last steps when there are fewer than 15


def lagrange_integral(rho_s: torch.Tensor, rho_t: torch.Tensor, nodes: list[torch.Tensor], j: int) -> torch.Tensor:
    """∫_{ρ_s}^{ρ_t} ℓ_j(log ρ) dρ, ℓ_j the Lagrange basis polynomial of node j among the 2 or 3 log ρ nodes."""
    roots = [u for k, u in enumerate(nodes) if k != j]

    def antiderivative(rho: torch.Tensor) -> torch.Tensor:  # e^u q(u) with q + q' = Π (u - root)
        u = torch.log(rho)
        if len(roots) == 1:
            return rho * (u - roots[0] - 1)
        return rho * ((u - roots[0] - 1) * (u - roots[1] - 1) + 1)

    return (antiderivative(rho_t) - antiderivative(rho_s)) / math.prod(nodes[j] - u for u in roots)


class DEISMultistepScheduler(VPSolverScheduler):
    """DEIS multistep, log-ρ Adams-Bashforth, orders 1-3 (Zhang & Chen, 2023)."""

    config_class = DEISMultistepConfig

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self._reset_history()

    def _reset_history(self) -> None:
        self.model_outputs: list[torch.Tensor | None] = [None] * self.config.solver_order  # ε̂'s, newest last
        self.lower_order_nums = 0  # steps taken so far (caps the usable order)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        c = self.config
        n = self._check_num_steps(num_inference_steps)
        ts = solver_timesteps(c.timestep_spacing, n, c.num_train_timesteps, c.steps_offset)
        sigmas, ts, respaced = self._solver_sigmas(ts, n)
        # then σ_min; respaced σ's end there already, so their final step has ρ_t = ρ_s and leaves x as it is
        sigma_last = sigmas[-1] if respaced else self.train_sigmas[0]
        self._set_solver_table(ts, sigmas, sigma_last, device)

    def step(
        self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor, return_dict: bool = True
    ) -> SchedulerOutput | tuple:
        self._init_step_index(timestep)
        c, i, n = self.config, self._step_index, len(self.timesteps)
        alpha_s, sigma_s, lambda_s = alpha_sigma_lambda(self.sigmas[i])
        x0 = vp_x0_eps(model_output, sample, alpha_s, sigma_s, c.prediction_type)[0]
        if c.thresholding:
            x0 = dynamic_threshold(x0, c.dynamic_thresholding_ratio, c.sample_max_value)
        self.model_outputs = self.model_outputs[1:] + [(sample - alpha_s * x0) / sigma_s]  # ε̂, as diffusers derives it
        # warm up from order 1; with lower_order_final and few steps, never look past the remaining steps
        steps_left = n - i if c.lower_order_final and n < 15 else c.solver_order
        order = min(c.solver_order, self.lower_order_nums + 1, steps_left)

        rho_t, rhos = self.sigmas[i + 1], self.sigmas[i - order + 1 : i + 1].flip(0)  # ρ = σ/α: the table's σ
        alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(rho_t)
        eps = self.model_outputs[::-1][:order]
        if order == 1:  # DDIM, written in λ (h = λ_t - λ_s) as diffusers computes it
            prev_sample = (alpha_t / alpha_s) * sample - sigma_t * torch.expm1(lambda_t - lambda_s) * eps[0]
        else:
            # in float64: F(ρ_t) - F(ρ_s) cancels badly in float32 when the nodes are close in log ρ
            rhos, rho_t = rhos.double(), rho_t.double()
            nodes = [torch.log(rho) for rho in rhos]
            integral = sum(lagrange_integral(rhos[0], rho_t, nodes, j).float() * e for j, e in enumerate(eps))
            prev_sample = alpha_t * (sample / alpha_s + integral)
        self.lower_order_nums = min(self.lower_order_nums + 1, c.solver_order)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
