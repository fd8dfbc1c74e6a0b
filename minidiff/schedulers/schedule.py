"""The noise-schedule maths the schedulers share: β and ᾱ, σ, timestep spacing, Karras σ's, x̂_0 / ε̂.

The forward process is q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I) with ᾱ_t = ∏ (1 - β_s). The
sigma-parameterised samplers (k-diffusion, Karras et al. 2022) use x = x_0 + σ ε with
σ_t = sqrt((1 - ᾱ_t) / ᾱ_t), the same process rescaled by 1 / sqrt(ᾱ_t).

Plain functions of numbers and tensors, no scheduler state. They compute the way diffusers
computes (float32 torch for β and ᾱ, float64 numpy for spacing and interpolation) so that
timesteps and sigmas agree to the last bit or nearly.

References:
1. Ho et al., "Denoising Diffusion Probabilistic Models", 2020.
2. Nichol & Dhariwal, "Improved Denoising Diffusion Probabilistic Models", 2021 (cosine schedule).
3. Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", 2022.
4. Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed", 2023
   (zero terminal SNR, Algorithm 1; leading / linspace / trailing spacing, Table 2).
5. Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", 2022 (λ).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch


def betas_for_alpha_bar(
    num_train_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> torch.Tensor:
    """β_i = 1 - ᾱ((i+1)/T) / ᾱ(i/T), capped: the discrete steps of a continuous ᾱ(t)."""
    n = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def _cosine_alpha_bar(t: float) -> float:  # ᾱ(t) = cos²((t + s) / (1 + s) · π/2), s = 0.008 [2]
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def _exp_alpha_bar(t: float) -> float:
    return math.exp(t * -12.0)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(ᾱ) so the last step is pure noise (SNR = 0) [4, Algorithm 1]."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    alphas = torch.cat([ab[0:1], ab[1:] / ab[:-1]])
    return 1 - alphas


def make_betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: Any = None,
    rescale_betas_zero_snr: bool = False,
) -> torch.Tensor:
    """β_1..β_T, float32: given outright, or from the named schedule."""
    if trained_betas is not None:
        betas = torch.tensor(np.asarray(trained_betas), dtype=torch.float32)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":  # linear in sqrt(β): the Stable Diffusion schedule
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(num_train_timesteps, _cosine_alpha_bar)
    elif beta_schedule == "sigmoid":
        betas = torch.sigmoid(torch.linspace(-6, 6, num_train_timesteps)) * (beta_end - beta_start) + beta_start
    elif beta_schedule == "exp":
        betas = betas_for_alpha_bar(num_train_timesteps, _exp_alpha_bar)
    else:
        raise ValueError(f"unknown beta_schedule {beta_schedule!r}")
    return rescale_zero_terminal_snr(betas) if rescale_betas_zero_snr else betas


def vp_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """σ_t = sqrt((1 - ᾱ_t) / ᾱ_t) for every training step t (ascending in t), float32 like diffusers."""
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()


def spaced_timesteps(spacing: str, n: int, num_train_timesteps: int, steps_offset: int = 0) -> np.ndarray:
    """n of the T training steps, descending, unrounded float64 [4, Table 2].

    linspace: evenly from T-1 down to 0; leading: k·(T // n) + offset (never reaches T-1);
    trailing: T - 1 - k·T/n, rounded (always starts at T-1).
    """
    T = num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, T - 1, n)[::-1].copy()
    if spacing == "leading":
        return (np.arange(n) * (T // n))[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        # np.arange with a float step may yield one extra point: diffusers keeps it, and so do we
        return np.round(np.arange(T, 0, -T / n)) - 1
    raise ValueError(f"unknown timestep_spacing {spacing!r}")


def solver_timesteps(
    spacing: str, n: int, num_train_timesteps: int, steps_offset: int = 0, last_timestep: int | None = None
) -> np.ndarray:
    """The multistep solvers' spacing: n + 1 points whose smallest is dropped (so t = 0 is never used).

    `last_timestep` < T leaves out the steps whose log-SNR was clipped (DPM-Solver's lambda_min_clipped).
    """
    T = num_train_timesteps
    last = T if last_timestep is None else last_timestep
    if spacing == "trailing":  # the stride stays T / n even when the start is clipped
        return np.round(np.arange(last, 0, -T / n)) - 1
    return spaced_timesteps(spacing, n + 1, last, steps_offset)[:-1].round()


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """σ_i = (σ_max^(1/ρ) + i/(n-1) (σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ  [3, eq. 5]."""
    ramp = np.linspace(0, 1, n)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Invert σ(t): piecewise-linear interpolation of t in log σ over the training steps."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(np.shape(sigmas))


def expand_to(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample (B,) value shaped to broadcast against x (B, C, H, W)."""
    v = v.flatten()
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def vp_x0_eps(
    model_output: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂_0, ε̂) from the network output, for x = α x_0 + σ ε with α² + σ² = 1."""
    if prediction_type == "epsilon":
        return (x - sigma * model_output) / alpha, model_output
    if prediction_type == "sample":
        return model_output, (x - alpha * model_output) / sigma
    if prediction_type == "v_prediction":  # v = α ε - σ x_0 (Salimans & Ho 2022)
        return alpha * x - sigma * model_output, alpha * model_output + sigma * x
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def ve_denoised(model_output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """x̂_0 for x = x_0 + σ ε (the network sees x / sqrt(σ² + 1), i.e. the VP sample)."""
    if prediction_type == "epsilon":
        return x - sigma * model_output
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def alpha_sigma_lambda(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(α_t, σ_t, λ_t) of the VP process at the VE noise level σ: α_t = 1/sqrt(σ² + 1), σ_t = σ α_t [5]."""
    alpha_t = 1 / (sigma**2 + 1) ** 0.5
    sigma_t = sigma * alpha_t
    return alpha_t, sigma_t, torch.log(alpha_t) - torch.log(sigma_t)
