"""The noise-schedule maths the schedulers share: β and ᾱ, σ, timestep spacing, Karras / exponential / beta
σ's, x̂_0 / ε̂ and its dynamic thresholding.

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
6. Lee et al., "Beta Sampling is All You Need: Efficient Image Generation Strategy for Diffusion Models
   using Stepwise Spectral Analysis", 2024 (σ's spaced by the Beta(0.6, 0.6) quantiles).
7. Saharia et al., "Photorealistic Text-to-Image Diffusion Models with Deep Language Understanding", 2022
   (dynamic thresholding, §2.3).
8. NIST Digital Library of Mathematical Functions, §8.17 (the incomplete beta function, eq. 8.17.22).
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
    bad = ~((betas > 0) & (betas < 1))  # β outside (0, 1) makes ᾱ wrap negative or NaN (diffusers takes it)
    if betas.ndim != 1 or len(betas) == 0 or bad.any():
        where = "trained_betas" if trained_betas is not None else f"{beta_schedule} from beta_start/beta_end"
        first = f": β[{int(bad.nonzero()[0])}] = {betas[bad][0].item()}" if bad.any() else ""
        raise ValueError(f"betas ({where}) must be a non-empty list with every β in (0, 1){first}")
    return rescale_zero_terminal_snr(betas) if rescale_betas_zero_snr else betas


def check_custom_timesteps(timesteps: Any, num_train_timesteps: int) -> np.ndarray:
    """Custom `timesteps`: non-empty, finite, strictly descending, within [0, T - 1] (a negative one would index
    ᾱ from the end, an ascending list run the schedule backwards)."""
    ts = np.asarray(timesteps, dtype=np.float64)
    T = num_train_timesteps
    if ts.ndim != 1 or len(ts) == 0 or not np.isfinite(ts).all():
        raise ValueError(f"custom `timesteps` must be a non-empty list of finite numbers, got {timesteps!r}")
    if (np.diff(ts) >= 0).any():
        raise ValueError(f"custom `timesteps` must be strictly descending, got {ts.tolist()}")
    if ts[0] > T - 1 or ts[-1] < 0:
        raise ValueError(
            f"custom `timesteps` must lie in [0, {T - 1}] (below num_train_timesteps={T}), got {ts.tolist()}"
        )
    return ts


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


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """n σ's evenly spaced in log σ, from sigma_max down to sigma_min."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def beta_sigmas(sigma_min: float, sigma_max: float, n: int, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """σ_i = σ_min + F⁻¹(1 - i/(n-1)) (σ_max - σ_min), F the Beta(α, β) CDF [6]: dense at both ends."""
    return sigma_min + beta_ppf(1 - np.linspace(0, 1, n), alpha, beta) * (sigma_max - sigma_min)


def betainc(a: float, b: float, x: np.ndarray) -> np.ndarray:
    """The regularized incomplete beta function I_x(a, b) = ∫_0^x t^(a-1) (1-t)^(b-1) dt / B(a, b), float64.

    The continued fraction [8, eq. 8.17.22], I_x(a, b) = x^a (1-x)^b / (a B(a, b)) / (1 + d_1/(1 + d_2/(1 + ...)))
    with d_2m+1 = -(a+m)(a+b+m) x / ((a+2m)(a+2m+1)) and d_2m = m (b-m) x / ((a+2m-1)(a+2m)), converges
    fast for x < (a+1)/(a+b+2); above that I_x(a, b) = 1 - I_{1-x}(b, a). The fraction is evaluated
    front to back by Lentz's method: G_k = G_{k-1} C_k D_k with C_k = 1 + d_k / C_{k-1}, D_k = 1 / (1 + d_k D_{k-1}).
    """
    x = np.asarray(x, dtype=np.float64)
    flip = x > (a + 1) / (a + b + 2)
    p, q, y = np.where(flip, b, a), np.where(flip, a, b), np.where(flip, 1 - x, x)
    tiny = 1e-300

    def nonzero(v: np.ndarray) -> np.ndarray:
        return np.where(np.abs(v) < tiny, tiny, v)

    G, C, D = np.ones_like(y), np.ones_like(y), np.zeros_like(y)
    for k in range(1, 500):
        m = k // 2
        if k % 2:
            d = -(p + m) * (p + q + m) * y / ((p + 2 * m) * (p + 2 * m + 1))
        else:
            d = m * (q - m) * y / ((p + 2 * m - 1) * (p + 2 * m))
        D = 1 / nonzero(1 + d * D)
        C = nonzero(1 + d / C)
        G = G * C * D
        if np.all(np.abs(C * D - 1) < 1e-15):
            break
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)  # symmetric in (a, b)
    log_front = p * np.log(np.maximum(y, tiny)) + q * np.log1p(-y) - np.log(p) - log_beta
    value = np.where(y > 0, np.exp(log_front) / G, 0.0)
    return np.where(flip, 1 - value, value)


def beta_ppf(u: np.ndarray, a: float, b: float) -> np.ndarray:
    """The Beta(a, b) quantile F⁻¹(u): the x with I_x(a, b) = u, by bisection (I rises with x), to float64 precision."""
    u = np.asarray(u, dtype=np.float64)
    lo, hi = np.zeros_like(u), np.ones_like(u)
    for _ in range(64):  # the bracket halves each time: 2⁻⁶⁴ is below float64 resolution on [0, 1]
        mid = (lo + hi) / 2
        below = betainc(a, b, mid) < u
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return np.where(u <= 0, 0.0, np.where(u >= 1, 1.0, (lo + hi) / 2))


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding of x̂_0 [7, §2.3]: s = the `ratio` quantile of |x̂_0| per sample, clamped to
    [1, max_value]; x̂_0 is clipped to [-s, s] and divided by s (s = 1 is plain clipping to [-1, 1])."""
    flat = x0.reshape(x0.shape[0], -1)
    if flat.dtype not in (torch.float32, torch.float64):  # quantile needs float32 or float64
        flat = flat.float()
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(x0.dtype)


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Invert σ(t): piecewise-linear interpolation of t in log σ over the training steps."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(np.shape(sigmas))


def check_add_noise(
    original_samples: torch.Tensor, noise: torch.Tensor, timesteps: Any, num_train_timesteps: int | None = None
) -> torch.Tensor:
    """add_noise's arguments: noise shaped as the samples, one timestep or one per sample; for ᾱ-indexed
    schedulers integers in [0, T) (read only off CPU tensors: no device wait), since -1 would wrap to the end."""
    timesteps = torch.as_tensor(timesteps)
    if noise.shape != original_samples.shape:
        raise ValueError(
            f"add_noise: `noise` {tuple(noise.shape)} and `original_samples` {tuple(original_samples.shape)} "
            f"must have the same shape"
        )
    if timesteps.ndim > 1 or timesteps.numel() not in (1, original_samples.shape[0]):
        raise ValueError(
            f"add_noise: `timesteps` must be one timestep or one per sample ({original_samples.shape[0]}), "
            f"got shape {tuple(timesteps.shape)}"
        )
    if num_train_timesteps is not None:
        T = num_train_timesteps
        if timesteps.is_floating_point():
            raise TypeError(f"add_noise: `timesteps` must be integers (training steps), got {timesteps.dtype}")
        if timesteps.device.type == "cpu" and not bool(((timesteps >= 0) & (timesteps < T)).all()):
            raise ValueError(f"add_noise: `timesteps` must lie in [0, {T - 1}], got {timesteps.tolist()}")
    return timesteps


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


def flow_sigmas(n: int, num_train_timesteps: int, shift: float, sigmas: list[float] | None = None) -> np.ndarray:
    """Flow-matching σ's: `sigmas`, or n evenly spaced from 1 down to 1/T; shifted as σ' = s σ / (1 + (s - 1) σ)
    (SD 3's timestep shift); a first σ of 1 is nudged to 1 - 1e-6 so that log α = log(1 - σ) stays finite."""
    if sigmas is None:
        sigmas = np.linspace(1, 1 / num_train_timesteps, n + 1)[:-1]
    sigmas = np.array(sigmas, dtype=np.float64)
    if sigmas.ndim != 1 or len(sigmas) == 0 or not np.all((sigmas > 0) & (sigmas <= 1)):
        raise ValueError(f"flow sigmas must be a non-empty list of values in (0, 1], got {sigmas.tolist()}")
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    if abs(sigmas[0] - 1) < 1e-6:
        sigmas[0] -= 1e-6
    return sigmas
