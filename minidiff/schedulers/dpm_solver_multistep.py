"""DPM-Solver (multistep, orders 1-3): the data-prediction form DPM-Solver++ and the noise-prediction form, ODE and SDE.

With α_t = 1 / sqrt(σ² + 1), σ_t = σ α_t and the log-SNR λ = log(α_t / σ_t), the exact solution of
the diffusion ODE from s to t (h = λ_t - λ_s) is x_t = (σ_t/σ_s) x_s + σ_t ∫ e^λ x̂_0(λ) dλ;
DPM-Solver++ expands x̂_0 in λ with the last 1-3 denoised outputs D0, D1, D2 [2, Algorithm 2].
The SDE variant adds noise so that x_t matches the reverse SDE [2, §5]:
    ODE: x_t = (σ_t/σ_s) x_s - α_t (e^{-h} - 1) D0 + ...
    SDE: x_t = (σ_t/σ_s) e^{-h} x_s + α_t (1 - e^{-2h}) D0 + ... + σ_t sqrt(1 - e^{-2h}) z
The original DPM-Solver ("dpmsolver") expands the noise prediction ε̂(λ) instead, x_t = (α_t/α_s) x_s
- α_t ∫ e^{-λ} ε̂(λ) dλ, with D0, D1, D2 built from the last ε̂'s [1, §3.3, Algorithms 1-3]; its SDE form
("sde-dpmsolver", orders 1-2) doubles the ε̂ terms and adds noise [2, §5]:
    ODE: x_t = (α_t/α_s) x_s - σ_t (e^h - 1) D0 + ...
    SDE: x_t = (α_t/α_s) x_s - 2 σ_t (e^h - 1) D0 + ... + σ_t sqrt(e^{2h} - 1) z
Both noise forms need a last σ above 0 (final_sigmas_type="sigma_min"), where λ stays finite.

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

from ..noise import randn_tensor
from .base import RNG, Device, SchedulerOutput, Tensor, Timestep, VPSolverScheduler
from .config import (
    FINAL_SIGMAS_TYPES,
    DynamicThresholdingKeys,
    FlowKeys,
    NoiseScheduleConfig,
    SigmaSpacingKeys,
    one_of,
)
from .schedule import (
    alpha_sigma_lambda,
    check_custom_timesteps,
    dynamic_threshold,
    karras_sigmas,
    sigma_to_t,
    solver_timesteps,
    vp_x0_eps,
)

NOISE_FORMS = ("dpmsolver", "sde-dpmsolver")  # the algorithm types that expand ε̂ rather than x̂_0
SDE_FORMS = ("sde-dpmsolver++", "sde-dpmsolver")


@dataclass(frozen=True)
class DPMSolverMultistepConfig(FlowKeys, SigmaSpacingKeys, DynamicThresholdingKeys, NoiseScheduleConfig):
    solver_order: int = one_of(2, (1, 2, 3))
    # configs of sibling solvers carry their own names: they are mapped as diffusers maps them
    algorithm_type: str = one_of(
        "dpmsolver++", ("dpmsolver++", "sde-dpmsolver++", *NOISE_FORMS), {"deis": "dpmsolver++"}
    )
    solver_type: str = one_of("midpoint", ("midpoint", "heun"), dict.fromkeys(("logrho", "bh1", "bh2"), "midpoint"))
    lower_order_final: bool = True  # first / second order for the last steps when there are fewer than 15
    euler_at_final: bool = False
    use_lu_lambdas: bool = False  # σ's evenly spaced in λ
    final_sigmas_type: str = one_of("zero", FINAL_SIGMAS_TYPES)  # the σ after the last step: 0 or σ_min
    lambda_min_clipped: float = -float("inf")  # leave out the steps whose λ is below this (cosine schedules)
    variance_type: str | None = None  # "learned" / "learned_range": the model output carries extra channels
    rescale_betas_zero_snr: bool = False


class DPMSolverMultistepScheduler(VPSolverScheduler):
    """DPM-Solver++ and DPM-Solver multistep, ODE and SDE (Lu et al., 2022)."""

    config_class = DPMSolverMultistepConfig

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        if self.config.use_karras_sigmas and self.config.use_lu_lambdas:
            raise ValueError(f"{type(self).__name__}: use_karras_sigmas and use_lu_lambdas cannot both be set")
        if self.config.algorithm_type in NOISE_FORMS and self.config.final_sigmas_type == "zero":
            raise ValueError(
                f"{type(self).__name__}: final_sigmas_type='zero' is not supported with algorithm_type="
                f"{self.config.algorithm_type!r} (λ of σ = 0 is infinite); choose final_sigmas_type='sigma_min'"
            )
        self.lambda_t = torch.log(self.alphas_cumprod.sqrt()) - torch.log((1 - self.alphas_cumprod).sqrt())
        self._reset_history()

    def _reset_history(self) -> None:
        self.model_outputs: list[torch.Tensor | None] = [None] * self.config.solver_order  # D's, newest last
        self.lower_order_nums = 0  # steps taken so far (caps the usable order)

    def set_timesteps(
        self, num_inference_steps: int | None = None, device: Device = None, timesteps: list[int] | None = None
    ) -> None:
        """`num_inference_steps` spaced steps, or custom descending integer `timesteps`."""
        c = self.config
        T = c.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None and (self._sigma_spacing is not None or c.use_lu_lambdas):
            spacing = f"use_{self._sigma_spacing}_sigmas" if self._sigma_spacing else "use_lu_lambdas"
            raise ValueError(f"custom timesteps cannot be combined with {spacing}=True")
        if timesteps is not None:
            ts = check_custom_timesteps(timesteps, T).astype(np.int64)
            n = len(ts)
        else:
            n = self._check_num_steps(num_inference_steps)
            # leave out the end of the schedule whose log-SNR is below lambda_min_clipped (for cosine schedules)
            clipped = torch.searchsorted(torch.flip(self.lambda_t, [0]), c.lambda_min_clipped).item()
            ts = solver_timesteps(c.timestep_spacing, n, T, c.steps_offset, T - clipped)
        train = self.train_sigmas
        if c.use_karras_sigmas or c.use_lu_lambdas:
            if c.use_karras_sigmas:
                sigmas, ts = self._karras(train[0].item(), train[-1].item(), n)
            else:  # evenly spaced in log σ, i.e. in λ (Lu et al.'s uniform-λ schedule)
                log_train = np.log(train)
                sigmas = np.exp(karras_sigmas(log_train[0].item(), log_train[-1].item(), n, rho=1.0))
                ts = sigma_to_t(sigmas, log_train)
            if c.beta_schedule != "squaredcos_cap_v2":
                ts = ts.round()
        elif respaced := self._respaced(train[0].item(), train[-1].item(), n):
            sigmas, ts = respaced  # (not rounded: the int64 timesteps truncate them, as in diffusers)
        else:
            sigmas = np.interp(ts, np.arange(len(train)), train)
        sigma_last = 0.0 if c.final_sigmas_type == "zero" else train[0].item()
        self._set_solver_table(ts, sigmas, sigma_last, device)

    def _x0_eps(self, model_output: torch.Tensor, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂_0, ε̂) from the network output at the current σ, without thresholding."""
        if self.config.variance_type in ("learned", "learned_range") and self.config.prediction_type == "epsilon":
            # drop the predicted-variance channels (diffusers keeps the first 3: the same for RGB models)
            model_output = model_output[:, : sample.shape[1]]
        alpha_t, sigma_t, _ = alpha_sigma_lambda(self.sigmas[self._step_index])
        return vp_x0_eps(model_output, sample, alpha_t, sigma_t, self.config.prediction_type)

    def _denoised(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """x̂_0 from the network output at the current σ."""
        x0 = self._x0_eps(model_output, sample)[0]
        if self.config.thresholding:
            x0 = dynamic_threshold(x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
        return x0

    def _noise_prediction(self, model_output: torch.Tensor, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂_0, ε̂) for the noise forms; with thresholding ε̂ is the noise of the thresholded x̂_0."""
        x0, eps = self._x0_eps(model_output, sample)
        if self.config.thresholding:
            alpha_t, sigma_t, _ = alpha_sigma_lambda(self.sigmas[self._step_index])
            x0 = (sample - sigma_t * eps) / alpha_t
            x0 = dynamic_threshold(x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
            eps = (sample - alpha_t * x0) / sigma_t
        return x0, eps

    def _alpha_sigma_lambda(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(α_t, σ_t, λ_t) at a σ of the table: the VP process (the EDM subclass has α_t = 1, σ_t = σ)."""
        return alpha_sigma_lambda(sigma)

    def _update(self, order: int, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """One step of the given order from σ_i to σ_{i+1}, using the last `order` x̂_0's (ε̂'s for the noise forms)."""
        i = self._step_index
        algorithm = self.config.algorithm_type
        if order == 3 and algorithm == "sde-dpmsolver":
            raise NotImplementedError("algorithm_type='sde-dpmsolver' has no third-order step; use solver_order <= 2")
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(self.sigmas[i + 1])
        alpha_s, sigma_s, lambda_s = self._alpha_sigma_lambda(self.sigmas[i])
        h = lambda_t - lambda_s
        m = self.model_outputs
        D0, D1, D2 = m[-1], None, None
        if order >= 2:
            lambda_s1 = self._alpha_sigma_lambda(self.sigmas[i - 1])[2]
            r0 = (lambda_s - lambda_s1) / h
            D1 = (1.0 / r0) * (m[-1] - m[-2])
        if order == 3:
            lambda_s2 = self._alpha_sigma_lambda(self.sigmas[i - 2])[2]
            r1 = (lambda_s1 - lambda_s2) / h
            D1_0, D1_1 = D1, (1.0 / r1) * (m[-2] - m[-3])
            D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
            D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)
        midpoint = order == 2 and self.config.solver_type == "midpoint"

        if algorithm in NOISE_FORMS:  # the ε̂ expansion: e^h where DPM-Solver++ has e^{-h}
            phi_1 = torch.exp(h) - 1.0
            k = 2.0 if algorithm == "sde-dpmsolver" else 1.0  # the SDE doubles the ε̂ terms
            x_t = (alpha_t / alpha_s) * x - (k * sigma_t * phi_1) * D0
            if D1 is not None:
                x_t = (
                    x_t - 0.5 * (k * sigma_t * phi_1) * D1 if midpoint else x_t - (k * sigma_t * (phi_1 / h - 1.0)) * D1
                )
            if D2 is not None:
                x_t = x_t - (sigma_t * ((phi_1 - h) / h**2 - 0.5)) * D2
            return x_t if algorithm == "dpmsolver" else x_t + sigma_t * torch.sqrt(torch.exp(2 * h) - 1.0) * noise
        if algorithm == "dpmsolver++":
            phi_1 = torch.exp(-h) - 1.0
            x_t = (sigma_t / sigma_s) * x - (alpha_t * phi_1) * D0
            if D1 is not None:
                x_t = x_t - 0.5 * (alpha_t * phi_1) * D1 if midpoint else x_t + (alpha_t * (phi_1 / h + 1.0)) * D1
            if D2 is not None:
                x_t = x_t - (alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5)) * D2
            return x_t
        # sde-dpmsolver++
        phi_2 = 1.0 - torch.exp(-2.0 * h)
        x_t = (sigma_t / sigma_s * torch.exp(-h)) * x + (alpha_t * phi_2) * D0
        if D1 is not None:
            x_t = x_t + 0.5 * (alpha_t * phi_2) * D1 if midpoint else x_t + (alpha_t * (phi_2 / (-2.0 * h) + 1.0)) * D1
        if D2 is not None:
            x_t = x_t + (alpha_t * ((1.0 - torch.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * D2
        return x_t + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise

    def step(
        self,
        model_output: Tensor,
        timestep: Timestep,
        sample: Tensor,
        generator: RNG = None,
        variance_noise: Tensor | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        self._init_step_index(timestep)
        c = self.config
        i, n = self._step_index, len(self.timesteps)
        # lower orders near the end are more stable for few steps; a final σ = 0 needs a first-order step
        final = i == n - 1 and (c.euler_at_final or (c.lower_order_final and n < 15) or c.final_sigmas_type == "zero")
        second_to_final = i == n - 2 and c.lower_order_final and n < 15

        if c.algorithm_type in NOISE_FORMS:
            denoised, expanded = self._noise_prediction(model_output, sample)
        else:
            denoised = expanded = self._denoised(model_output, sample)
        self.model_outputs = self.model_outputs[1:] + [expanded]
        x = sample.to(torch.float32)
        noise = None
        if c.algorithm_type in SDE_FORMS:
            if variance_noise is None:
                # (the shape of the converted output: a learned-variance output has dropped its extra channels)
                noise = randn_tensor(expanded.shape, generator, model_output.device, torch.float32)
            else:
                noise = variance_noise.to(device=model_output.device, dtype=torch.float32)

        if c.solver_order == 1 or self.lower_order_nums < 1 or final:
            order = 1
        elif c.solver_order == 2 or self.lower_order_nums < 2 or second_to_final:
            order = 2
        else:
            order = 3
        prev_sample = self._update(order, x, noise).to(model_output.dtype)
        self.lower_order_nums = min(self.lower_order_nums + 1, c.solver_order)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)
