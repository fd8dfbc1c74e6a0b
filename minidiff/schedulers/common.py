"""What the schedulers share: the noise schedule, timestep spacing, and config / loading plumbing.

The forward process is q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I) with ᾱ_t = ∏ (1 - β_s). The
sigma-parameterised samplers (k-diffusion, Karras et al. 2022) use x = x_0 + σ ε with
σ_t = sqrt((1 - ᾱ_t) / ᾱ_t), the same process rescaled by 1 / sqrt(ᾱ_t).

Numbers are computed the way diffusers computes them (float32 torch for β and ᾱ, float64 numpy
for spacing and interpolation) so that timesteps and sigmas agree to the last bit or nearly.

References:
1. Ho et al., "Denoising Diffusion Probabilistic Models", 2020.
2. Nichol & Dhariwal, "Improved Denoising Diffusion Probabilistic Models", 2021 (cosine schedule).
3. Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", 2022.
4. Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed", 2023
   (zero terminal SNR, Algorithm 1; leading / linspace / trailing spacing, Table 2).
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..config import FrozenDict
from ..loading import load_config
from ..modeling import BaseOutput

CONFIG_NAME = "scheduler_config.json"
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclass
class SchedulerOutput(BaseOutput):
    """`prev_sample` is x_{t-1}; `pred_original_sample` the model's current estimate of x_0."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def check_choice(name: str, value: Any, choices: Sequence[Any], owner: str) -> None:
    if value not in choices:
        raise ValueError(f"{owner}: {name}={value!r} is not supported; choose one of {', '.join(map(repr, choices))}")


def check_off(owner: str, **flags: Any) -> None:
    """Options diffusers has that minidiff does not implement: refuse them instead of ignoring them."""
    for name, value in flags.items():
        if value:
            raise ValueError(f"{owner}: {name}={value!r} is not implemented in minidiff")


# ---------------------------------------------------------------------------------------------
# Noise schedule


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
    owner: str,
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: Any = None,
    rescale_betas_zero_snr: bool = False,
    schedules: Sequence[str] = BETA_SCHEDULES,
) -> torch.Tensor:
    if trained_betas is not None:
        betas = torch.tensor(np.asarray(trained_betas), dtype=torch.float32)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":  # linear in sqrt(β): the Stable Diffusion schedule
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2" and beta_schedule in schedules:
        betas = betas_for_alpha_bar(num_train_timesteps, _cosine_alpha_bar)
    elif beta_schedule == "sigmoid" and beta_schedule in schedules:
        betas = torch.sigmoid(torch.linspace(-6, 6, num_train_timesteps)) * (beta_end - beta_start) + beta_start
    elif beta_schedule == "exp" and beta_schedule in schedules:
        betas = betas_for_alpha_bar(num_train_timesteps, _exp_alpha_bar)
    else:
        raise ValueError(f"{owner}: unknown beta_schedule {beta_schedule!r}; choose one of {', '.join(schedules)}")
    return rescale_zero_terminal_snr(betas) if rescale_betas_zero_snr else betas


def vp_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """σ_t = sqrt((1 - ᾱ_t) / ᾱ_t) for every training step t (ascending in t), float32 like diffusers."""
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()


def spaced_timesteps(
    spacing: str, n: int, num_train_timesteps: int, steps_offset: int = 0, owner: str = ""
) -> np.ndarray:
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
    raise ValueError(f"{owner}: unknown timestep_spacing {spacing!r}; choose one of {', '.join(TIMESTEP_SPACINGS)}")


def solver_timesteps(
    spacing: str,
    n: int,
    num_train_timesteps: int,
    steps_offset: int = 0,
    last_timestep: int | None = None,
    owner: str = "",
) -> np.ndarray:
    """The multistep solvers' spacing: n + 1 points whose smallest is dropped (so t = 0 is never used).

    `last_timestep` < T leaves out the steps whose log-SNR was clipped (DPM-Solver's lambda_min_clipped).
    """
    T = num_train_timesteps
    last = T if last_timestep is None else last_timestep
    if spacing == "trailing":  # the stride stays T / n even when the start is clipped
        return np.round(np.arange(last, 0, -T / n)) - 1
    return spaced_timesteps(spacing, n + 1, last, steps_offset, owner)[:-1].round()


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


# ---------------------------------------------------------------------------------------------
# Config handling


def register_to_config(init: Callable) -> Callable:
    """Record every __init__ argument (defaults included) as the FrozenDict `self.config`.

    As in diffusers, `_`-prefixed keys are kept as bookkeeping, and `_use_default_values` lists the
    arguments left at their default, so that `Other.from_config(this.config)` gives those keys
    Other's own defaults instead of this class's.
    """
    params = {name: p.default for name, p in list(inspect.signature(init).parameters.items())[1:]}

    @functools.wraps(init)
    def wrapper(self, *args: Any, **kwargs: Any) -> None:
        given = dict(zip(params, args))
        given.update({k: v for k, v in kwargs.items() if not k.startswith("_")})
        private = {k: v for k, v in kwargs.items() if k.startswith("_")}
        config = {**private, **params, **given}
        if defaults := [k for k in params if k not in given]:
            config["_use_default_values"] = defaults
        self.config = FrozenDict(config)
        init(self, **given)

    wrapper.config_keys = tuple(params)  # type: ignore[attr-defined]
    return wrapper


def _json_value(value: Any) -> Any:
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


class SchedulerMixin:
    """Config, (de)serialisation and bad-input checks shared by every scheduler."""

    config_name: ClassVar[str] = CONFIG_NAME
    order: ClassVar[int] = 1
    config: FrozenDict
    num_inference_steps: int | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any] | None = None, return_unused_kwargs: bool = False, **overrides: Any):
        """Build from another scheduler's config (any class): known keys are used, the rest are kept."""
        if config is None:
            raise ValueError(f"{cls.__name__}.from_config needs a config dict (e.g. other_scheduler.config)")
        if not isinstance(config, dict):
            raise TypeError(f"{cls.__name__}.from_config takes a dict; use from_pretrained for a path or Hub id")
        defaulted = set(config.get("_use_default_values", []))
        config = {k: v for k, v in config.items() if k not in defaulted and k != "_use_default_values"}
        known = cls.__init__.config_keys  # type: ignore[attr-defined]
        init = {k: config[k] for k in known if k in config}
        init.update({k: overrides.pop(k) for k in known if k in overrides})
        # keys this class does not take stay in the config, to be handed on to the next class
        hidden = {k: v for k, v in config.items() if k not in init}
        if "_class_name" in hidden:
            hidden["_class_name"] = cls.__name__
        scheduler = cls(**init)
        scheduler.config = FrozenDict({**scheduler.config, **hidden})
        return (scheduler, {**overrides, **hidden}) if return_unused_kwargs else scheduler

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        local_files_only: bool = False,
        **overrides: Any,
    ):
        """Read scheduler_config.json from a local folder or a Hub id (and subfolder)."""
        for loading_only in ("torch_dtype", "variant", "revision", "cache_dir", "token", "force_download"):
            overrides.pop(loading_only, None)
        config = load_config(pretrained_model_name_or_path, subfolder, cls.config_name, local_files_only)
        return cls.from_config(config, **overrides)

    def save_pretrained(self, save_directory: str | os.PathLike, **unused: Any) -> None:
        """Write scheduler_config.json as diffusers writes it (diffusers loads it back)."""
        from weights_conversion.configs import DIFFUSERS_VERSION

        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        config = {k: _json_value(v) for k, v in self.config.items() if k != "_use_default_values"}
        config.update(_class_name=type(self).__name__, _diffusers_version=DIFFUSERS_VERSION)
        (out / self.config_name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    def _init_noise_schedule(self, schedules: Sequence[str] = BETA_SCHEDULES) -> None:
        """β, α = 1 - β and ᾱ = cumprod(α) from the config."""
        c = self.config
        self.betas = make_betas(
            type(self).__name__, c.num_train_timesteps, c.beta_start, c.beta_end, c.beta_schedule,
            c.trained_betas, c.get("rescale_betas_zero_snr", False), schedules,
        )  # fmt: skip
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    def _replace_config(self, **changes: Any) -> None:
        self.config = FrozenDict({**self.config, **changes})

    def _check_common(self, predictions: Sequence[str] = PREDICTION_TYPES) -> None:
        """Refuse bad option values at construction, not at the first step()."""
        name = type(self).__name__
        check_choice("prediction_type", self.config.prediction_type, predictions, name)
        check_choice("timestep_spacing", self.config.timestep_spacing, TIMESTEP_SPACINGS, name)
        check_off(name, thresholding=self.config.get("thresholding"))

    def _check_num_steps(self, num_inference_steps: int | None) -> int:
        T = self.config.num_train_timesteps
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
            raise ValueError(f"num_inference_steps must be an integer, got {num_inference_steps!r}")
        if not 1 <= num_inference_steps <= T:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} is out of range: it must be between 1 and "
                f"num_train_timesteps={T}"
            )
        return int(num_inference_steps)

    def _check_ready(self) -> None:
        if self.num_inference_steps is None:
            raise ValueError(
                f"{type(self).__name__}: call set_timesteps(num_inference_steps) before step() or scale_model_input()"
            )

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """The network input for this step: unchanged for VP-parameterised schedulers."""
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.config.items() if k != "_use_default_values"}
        return f"{type(self).__name__} {json.dumps(_json_value(shown), indent=2, sort_keys=True)}"


class DiscreteScheduler(SchedulerMixin):
    """Schedulers indexed by the integer training step t (DDPM, DDIM, PNDM), in x_t = sqrt(ᾱ_t) x_0 + sqrt(1-ᾱ_t) ε."""

    def _init_noise_schedule(self, schedules: Sequence[str] = BETA_SCHEDULES) -> None:
        super()._init_noise_schedule(schedules)
        self.init_noise_sigma = 1.0

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_0) for one timestep per batch item."""
        device = original_samples.device
        ab = self.alphas_cumprod.to(device, original_samples.dtype)[timesteps.to(device)]
        return expand_to(ab**0.5, original_samples) * original_samples + expand_to((1 - ab) ** 0.5, noise) * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target v = sqrt(ᾱ) ε - sqrt(1-ᾱ) x_0 (for training)."""
        ab = self.alphas_cumprod.to(sample.device, sample.dtype)[timesteps.to(sample.device)]
        return expand_to(ab**0.5, sample) * noise - expand_to((1 - ab) ** 0.5, sample) * sample


class SigmaScheduler(SchedulerMixin):
    """Schedulers that walk a sigma table (LMS, Euler, Heun, DPM-Solver, UniPC) and track their place in it.

    The place is found from the first timestep they are given (the second match if the timestep
    appears twice, as Heun's do), unless `set_begin_index` fixed it: this is what lets img2img
    start the loop part-way through `timesteps`.
    """

    # DPM-Solver and UniPC treat an unknown timestep as the last one (diffusers does); others refuse it
    _unknown_timestep_is_last: ClassVar[bool] = False
    # add_noise form: x_0 + σ ε (LMS, Euler, Heun) or α x_0 + σ_t ε with α = 1/sqrt(σ² + 1) (DPM, UniPC)
    _variance_preserving: ClassVar[bool] = False

    def _init_noise_schedule(self, schedules: Sequence[str] = BETA_SCHEDULES) -> None:
        super()._init_noise_schedule(schedules)
        if self.config.get("rescale_betas_zero_snr"):
            self.alphas_cumprod[-1] = 2**-24  # ᾱ_T = 0 would make σ_T infinite: keep it finite
        self.train_sigmas = vp_sigmas(self.alphas_cumprod)  # σ of every training step, ascending in t
        self._step_index: int | None = None
        self._begin_index: int | None = None

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    @property
    def init_noise_sigma(self) -> float | torch.Tensor:
        """The std of the starting noise: 1 for VP solvers, else σ_max (sqrt(σ_max² + 1) with leading spacing)."""
        if self._variance_preserving:
            return 1.0
        sigma_max = self.sigmas.max()
        return sigma_max if self.config.timestep_spacing in ("linspace", "trailing") else (sigma_max**2 + 1) ** 0.5

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor = None) -> torch.Tensor:
        """The network was trained on VP samples: feed it x / sqrt(σ² + 1) (VP solvers: x unchanged)."""
        if self._variance_preserving:
            return sample
        self._init_step_index(timestep)
        return sample / ((self.sigmas[self._step_index] ** 2 + 1) ** 0.5)

    def _spaced_sigmas(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """n spaced timesteps (float32) and their σ, interpolated linearly in t between training steps."""
        c = self.config
        ts = spaced_timesteps(c.timestep_spacing, n, c.num_train_timesteps, c.steps_offset, type(self).__name__)
        ts = ts.astype(np.float32)
        return ts, np.interp(ts, np.arange(len(self.train_sigmas)), self.train_sigmas)

    def _karras(
        self, sigma_min: float, sigma_max: float, n: int, use_config: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """n Karras σ's from sigma_max down to sigma_min, and the (fractional) t of each.

        Like diffusers, the config's sigma_min / sigma_max win when set, even when they are keys
        another class left in the config (LMS alone ignores them).
        """
        lo, hi = (self.config.get("sigma_min"), self.config.get("sigma_max")) if use_config else (None, None)
        sigmas = karras_sigmas(lo if lo is not None else sigma_min, hi if hi is not None else sigma_max, n)
        return sigmas, sigma_to_t(sigmas, np.log(self.train_sigmas))

    def _set_training_table(self) -> None:
        """Before set_timesteps: every training step, σ descending, then 0 (diffusers' starting state)."""
        T = self.config.num_train_timesteps
        self._set_table(np.arange(T - 1, -1, -1), np.append(self.train_sigmas[::-1], 0.0), None, torch.float32)

    def _set_table(self, timesteps: np.ndarray, sigmas: np.ndarray, device: Any, dtype: torch.dtype) -> None:
        self.timesteps = torch.from_numpy(np.ascontiguousarray(timesteps)).to(device=device, dtype=dtype)
        self.sigmas = torch.from_numpy(np.asarray(sigmas, dtype=np.float32))  # on the CPU, as diffusers keeps it
        self._reset_index()

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Fix the index of the first step (pipelines call this for img2img)."""
        self._begin_index = begin_index

    def _reset_index(self) -> None:
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep: float | torch.Tensor, schedule_timesteps: torch.Tensor | None = None) -> int:
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.to(schedule.device)
        hits = (schedule == timestep).nonzero()
        if len(hits) == 0:
            if self._unknown_timestep_is_last:
                return len(schedule) - 1
            raise ValueError(f"{type(self).__name__}: timestep {timestep} is not one of scheduler.timesteps")
        # a repeated timestep (Heun's second stage, rounded Karras steps): the second copy starts a step
        return hits[1 if len(hits) > 1 else 0].item()

    def _init_step_index(self, timestep: float | torch.Tensor) -> None:
        self._check_ready()
        if self._step_index is None:
            self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Noise x_0 to the sigma of each given timestep."""
        sigmas = self.sigmas.to(original_samples.device, original_samples.dtype)
        if self._begin_index is None:
            schedule = self.timesteps.to(original_samples.device)
            indices = [self.index_for_timestep(t, schedule) for t in timesteps.to(original_samples.device).flatten()]
        else:
            indices = [self._step_index if self._step_index is not None else self._begin_index] * timesteps.numel()
        sigma = expand_to(sigmas[indices], original_samples)
        if self._variance_preserving:
            alpha = 1 / (sigma**2 + 1) ** 0.5
            return alpha * original_samples + sigma * alpha * noise
        return original_samples + noise * sigma
