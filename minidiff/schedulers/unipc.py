"""UniPC: a unified predictor (UniP) and corrector (UniC) of any order for the diffusion ODE.

Both work in the log-SNR λ like DPM-Solver (h = λ_t - λ_s, x̂ = x̂_0 or ε̂ for predict_x0=False).
UniP-p extrapolates from the last p outputs: with r_k = (λ_{s_k} - λ_s) / h and
D_k = (m_{s_k} - m_s) / r_k, the coefficients ρ solve R ρ = b, R_{jk} = r_k^j, where
b_j = j! φ_{j+1}(h) / B(h) and B(h) = h (bh1) or e^h - 1 (bh2) [1, Algorithm 2 / Table 1]:
    x_t = (σ_t/σ_s) x_s - α_t (e^{-h} - 1) m_s - α_t B(h) Σ_k ρ_k D_k      (x̂_0 form, h → -h)
UniC reruns the same update once m_t is known, adding D_t = m_t - m_s as the newest point, which
raises the order by one at no extra network evaluation.

References:
1. Zhao et al., "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models", 2023.
2. Lu et al., "DPM-Solver++", 2022 (the λ parameterisation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .base import Device, SchedulerOutput, VPSolverScheduler
from .config import (
    FINAL_SIGMAS_TYPES,
    PREDICTION_TYPES,
    DynamicThresholdingKeys,
    FlowKeys,
    NoiseScheduleConfig,
    SigmaSpacingKeys,
    not_implemented,
    one_of,
)
from .schedule import alpha_sigma_lambda, dynamic_threshold, flow_sigmas, solver_timesteps, vp_x0_eps


@dataclass(frozen=True)
class UniPCMultistepConfig(FlowKeys, SigmaSpacingKeys, DynamicThresholdingKeys, NoiseScheduleConfig):
    solver_order: int = one_of(2, (1, 2, 3))
    predict_x0: bool = True  # the solver's variable: x̂_0, or ε̂
    # B(h); a DPM-Solver / DEIS config's solver_type is mapped as diffusers maps it
    solver_type: str = one_of("bh2", ("bh1", "bh2"), dict.fromkeys(("midpoint", "heun", "logrho"), "bh2"))
    lower_order_final: bool = True  # never a higher order than the steps left
    disable_corrector: list[int] = field(default_factory=list)  # step indices that skip UniC
    solver_p: Any = not_implemented(None)
    final_sigmas_type: str = one_of("zero", FINAL_SIGMAS_TYPES)  # the σ after the last step: 0 or σ_min
    rescale_betas_zero_snr: bool = False
    sigma_min: float | None = None  # the Karras σ range, when set
    sigma_max: float | None = None
    shift_terminal: float | None = not_implemented(None)
    # flow matching (SD 3 / Flux-style models): x = (1 - σ) x_0 + σ ε, σ in (0, 1]
    use_flow_sigmas: bool = False
    prediction_type: str = one_of("epsilon", (*PREDICTION_TYPES, "flow_prediction"))


class UniPCMultistepScheduler(VPSolverScheduler):
    """UniPC multistep predictor-corrector, bh1 / bh2 (Zhao et al., 2023)."""

    config_class = UniPCMultistepConfig

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self.predict_x0 = self.config.predict_x0
        if self.config.prediction_type == "flow_prediction" and not self.predict_x0:
            raise ValueError("UniPCMultistepScheduler: prediction_type='flow_prediction' needs predict_x0=True")
        self.disable_corrector = list(self.config.disable_corrector)
        self._reset_history()

    def _reset_history(self) -> None:
        self.model_outputs: list[torch.Tensor | None] = [None] * self.config.solver_order  # converted, newest last
        self.lower_order_nums = 0
        self.last_sample: torch.Tensor | None = None  # x_s of the previous step, for the corrector
        self.this_order = 1  # the predictor order of the previous step = the corrector order of this one

    def set_timesteps(
        self, num_inference_steps: int | None = None, device: Device = None, sigmas: list[float] | None = None
    ) -> None:
        """`num_inference_steps` spaced steps, or (flow matching only) the given `sigmas`."""
        c = self.config
        if sigmas is not None and not c.use_flow_sigmas:
            raise ValueError("UniPCMultistepScheduler takes custom sigmas only with use_flow_sigmas=True")
        n = len(sigmas) if sigmas is not None else self._check_num_steps(num_inference_steps)
        if c.use_flow_sigmas:
            return self._set_flow_timesteps(n, sigmas, device)
        ts = solver_timesteps(c.timestep_spacing, n, c.num_train_timesteps, c.steps_offset)
        train = self.train_sigmas
        if respaced := self._respaced(train[0].item(), train[-1].item(), n):
            sigmas, ts = respaced
            if c.use_karras_sigmas:
                ts = ts.round()  # (exponential and beta t's are truncated by the int64 cast, as in diffusers)
            sigma_last = 0.0 if c.final_sigmas_type == "zero" else sigmas[-1]  # (not σ at t = 0: diffusers)
        else:
            sigmas = np.interp(ts, np.arange(len(train)), train)
            sigma_last = 0.0 if c.final_sigmas_type == "zero" else train[0].item()
        self._set_solver_table(ts, sigmas, sigma_last, device)

    def _set_flow_timesteps(self, n: int, sigmas: list[float] | None, device: Device) -> None:
        """Flow σ's: Karras' σ's of the VP schedule mapped to σ / (σ + 1), else `sigmas` or n evenly spaced in
        (0, 1], shifted by flow_shift; t = σ T (truncated to integers, as in diffusers)."""
        c = self.config
        if c.use_exponential_sigmas or c.use_beta_sigmas:
            raise ValueError("UniPCMultistepScheduler: use_flow_sigmas combines only with use_karras_sigmas")
        if c.use_karras_sigmas:
            if sigmas is not None:
                raise ValueError("UniPCMultistepScheduler: custom sigmas with use_karras_sigmas are not supported")
            ve = self._respaced(self.train_sigmas[0].item(), self.train_sigmas[-1].item(), n)[0]
            flow = ve / (ve + 1)
        else:
            flow = flow_sigmas(n, c.num_train_timesteps, c.flow_shift, sigmas)
        sigma_last = 0.0 if c.final_sigmas_type == "zero" else flow[-1]
        self._set_solver_table(flow * c.num_train_timesteps, flow, sigma_last, device)

    def _alpha_sigma_t(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.use_flow_sigmas:
            return 1 - sigma, sigma
        return super()._alpha_sigma_t(sigma)

    def _alpha_sigma_lambda(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(α_t, σ_t, λ_t = log α_t - log σ_t) at σ: the VP form, or the flow form α_t = 1 - σ, σ_t = σ."""
        if not self.config.use_flow_sigmas:
            return alpha_sigma_lambda(sigma)
        alpha_t, sigma_t = self._alpha_sigma_t(sigma)
        return alpha_t, sigma_t, torch.log(alpha_t) - torch.log(sigma_t)

    def _convert(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The solver's variable at the current σ: x̂_0 (predict_x0) or ε̂."""
        sigma = self.sigmas[self._step_index]
        alpha_t, sigma_t, _ = self._alpha_sigma_lambda(sigma)
        if self.predict_x0:
            if self.config.prediction_type == "flow_prediction":  # the network predicts the velocity ε - x_0
                x0 = sample - sigma * model_output
            else:
                x0 = vp_x0_eps(model_output, sample, alpha_t, sigma_t, self.config.prediction_type)[0]
            if self.config.thresholding:
                x0 = dynamic_threshold(x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
            return x0
        if self.config.prediction_type == "epsilon":
            return model_output
        return vp_x0_eps(model_output, sample, alpha_t, sigma_t, self.config.prediction_type)[1]

    def _bh_update(self, x: torch.Tensor, t: int, s: int, order: int, m_t: torch.Tensor | None = None) -> torch.Tensor:
        """From x at sigmas[s] to sigmas[t], using the outputs at sigmas[s], sigmas[s-1], ... (newest last).

        m_t given: the corrector (UniC), which also uses the output at the target; else the predictor (UniP).
        """
        device = x.device
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(self.sigmas[t].to(device))
        alpha_s, sigma_s, lambda_s = self._alpha_sigma_lambda(self.sigmas[s].to(device))
        h = lambda_t - lambda_s
        m = self.model_outputs
        m_s = m[-1]
        rks, D1s = [], []
        for k in range(1, order):
            lambda_k = self._alpha_sigma_lambda(self.sigmas[s - k].to(device))[2]
            rk = (lambda_k - lambda_s) / h
            rks.append(rk)
            D1s.append((m[-(k + 1)] - m_s) / rk)
        rks = torch.stack(rks + [torch.ones((), device=device)])

        hh = -h if self.predict_x0 else h
        h_phi_1 = torch.expm1(hh)  # h φ_1(h) = e^h - 1
        h_phi_k = h_phi_1 / hh - 1
        B_h = hh if self.config.solver_type == "bh1" else torch.expm1(hh)
        R, b, factorial = [], [], 1
        for j in range(1, order + 1):
            R.append(rks ** (j - 1))
            b.append(h_phi_k * factorial / B_h)
            factorial *= j + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        R, b = torch.stack(R), torch.stack(b)

        if self.predict_x0:
            x_t, scale = sigma_t / sigma_s * x - alpha_t * h_phi_1 * m_s, alpha_t * B_h
        else:
            x_t, scale = alpha_t / alpha_s * x - sigma_t * h_phi_1 * m_s, sigma_t * B_h
        if m_t is None:  # UniP: order-2 uses ρ = 1/2 outright (diffusers), higher orders solve R ρ = b
            if not D1s:
                return x_t.to(x.dtype)
            rhos = torch.tensor([0.5]) if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
            correction = sum(r * d for r, d in zip(rhos.to(device, x.dtype), D1s))
        else:  # UniC: the newest point D_t = m_t - m_s joins the fit
            rhos = torch.tensor([0.5]) if order == 1 else torch.linalg.solve(R, b)
            rhos = rhos.to(device, x.dtype)
            correction = sum(r * d for r, d in zip(rhos[:-1], D1s)) + rhos[-1] * (m_t - m_s)
        return (x_t - scale * correction).to(x.dtype)

    def step(
        self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor, return_dict: bool = True
    ) -> SchedulerOutput | tuple:
        self._init_step_index(timestep)
        c = self.config
        i = self._step_index
        m_t = self._convert(model_output, sample)
        if i > 0 and (i - 1) not in self.disable_corrector and self.last_sample is not None:
            # UniC: refine the sample the previous predictor produced, now that its output is known
            sample = self._bh_update(self.last_sample, i, i - 1, self.this_order, m_t=m_t)
        self.model_outputs = self.model_outputs[1:] + [m_t]
        # warm up from order 1; with lower_order_final, never look past the remaining steps
        order = min(c.solver_order, len(self.timesteps) - i) if c.lower_order_final else c.solver_order
        self.this_order = min(order, self.lower_order_nums + 1)
        self.last_sample = sample
        prev_sample = self._bh_update(sample, i + 1, i, self.this_order)
        self.lower_order_nums = min(self.lower_order_nums + 1, c.solver_order)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=m_t if self.predict_x0 else None)
