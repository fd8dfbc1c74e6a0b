"""The scheduler classes' plumbing: config and loading, input checks, and the state of a sampling loop.

`SchedulerMixin` adds, to the config and loading of config_mixin.py, the checks and the timestep
bookkeeping every scheduler shares. `DiscreteScheduler` (DDPM, DDIM, PNDM) indexes ᾱ by the
integer training step; `SigmaScheduler` (LMS, Euler, Heun, DPM-Solver, UniPC) walks a table of σ's
and keeps its place in it. The maths they call lives in schedule.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ..outputs import BaseOutput
from .config_mixin import ConfigMixin
from .schedule import (
    beta_sigmas,
    check_add_noise,
    expand_to,
    exponential_sigmas,
    karras_sigmas,
    make_betas,
    sigma_to_t,
    spaced_timesteps,
    vp_sigmas,
)

# short names for the signatures every scheduler repeats (annotations only)
Tensor = torch.Tensor
RNG = torch.Generator | None  # a generator argument
Timestep = int | float | torch.Tensor
Device = str | torch.device | None

SIGMA_SPACINGS = ("karras", "exponential", "beta")  # the use_<kind>_sigmas keys, in the order diffusers checks them


@dataclass
class SchedulerOutput(BaseOutput):
    """`prev_sample` is x_{t-1}; `pred_original_sample` the model's current estimate of x_0."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def _version(t: torch.Tensor) -> int | None:
    """The in-place write counter of a tensor (None for inference-mode tensors, which keep none)."""
    try:
        return t._version
    except RuntimeError:
        return None


class SchedulerMixin(ConfigMixin):
    """Config and loading (config_mixin.py), bad-input checks and the timestep bookkeeping shared by every
    scheduler. `Cls(**keys)` takes the keys of `config_class`, each with diffusers' name and default."""

    order: ClassVar[int] = 1
    num_inference_steps: int | None = None

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self.num_inference_steps = None

    def _init_noise_schedule(self) -> None:
        """β, α = 1 - β and ᾱ = cumprod(α) from the config."""
        c = self.config
        self.betas = make_betas(
            c.num_train_timesteps, c.beta_start, c.beta_end, c.beta_schedule, c.trained_betas,
            c.get("rescale_betas_zero_snr", False),
        )  # fmt: skip
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

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

    # -- reading a timestep without waiting on the device ----------------------------------------
    # step() needs the value (or the place) of the timestep it is given. Read from a CUDA tensor, it
    # would make the host wait for the device on every step; but a pipeline passes an element of
    # `timesteps` (what iterating them, or a slice of them, yields), whose place shows in its storage
    # offset (metadata), and set_timesteps keeps the values on the host as well.

    def _keep_host_copy(self, values: list) -> None:
        """Remember the values of `timesteps` (just set) as Python numbers."""
        self._host_copy = (self.timesteps, _version(self.timesteps), values)

    def _host_timesteps(self) -> list:
        """`timesteps` as Python numbers: set_timesteps' copy, re-read if `timesteps` were replaced or changed."""
        ts, copy = self.timesteps, getattr(self, "_host_copy", None)
        if copy is None or copy[0] is not ts or copy[1] != _version(ts):
            self._host_copy = copy = (ts, _version(ts), ts.tolist())
        return copy[2]

    def _position_in_timesteps(self, timestep: Any) -> int | None:
        """The index of `timestep` in `timesteps` if it is one of their elements (a view into them), else None."""
        ts = self.timesteps
        if not (isinstance(timestep, torch.Tensor) and isinstance(ts, torch.Tensor)) or timestep.dim() or ts.dim() != 1:
            return None
        if timestep.dtype != ts.dtype or timestep.device != ts.device:
            return None
        if timestep.untyped_storage().data_ptr() != ts.untyped_storage().data_ptr():
            return None
        offset, stride = timestep.storage_offset() - ts.storage_offset(), ts.stride(0)
        if stride <= 0 or offset % stride or not 0 <= offset // stride < len(ts):
            return None
        return offset // stride

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """The network input for this step: unchanged for VP-parameterised schedulers."""
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps


class DiscreteScheduler(SchedulerMixin):
    """Schedulers indexed by the integer training step t (DDPM, DDIM, PNDM), in x_t = sqrt(ᾱ_t) x_0 + sqrt(1-ᾱ_t) ε."""

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self._init_noise_schedule()
        self.init_noise_sigma = 1.0
        self._set_discrete_timesteps(np.arange(self.config.num_train_timesteps - 1, -1, -1), None)

    def _set_discrete_timesteps(self, timesteps: np.ndarray, device: Any) -> None:
        """`timesteps` as int64 on the device, and their host copy."""
        on_host = torch.from_numpy(np.ascontiguousarray(timesteps, dtype=np.int64))
        self.timesteps = on_host.to(device)
        self._keep_host_copy(on_host.tolist())

    def _timestep_value(self, timestep: int | torch.Tensor) -> int:
        """t as a Python int, to index ᾱ: an element of `timesteps` is read from their host copy (no device
        wait); any other tensor is read from the device."""
        i = self._position_in_timesteps(timestep)
        return self._host_timesteps()[i] if i is not None else int(timestep)

    def previous_timestep(self, timestep: int | torch.Tensor) -> int | torch.Tensor:
        """The step after `timestep` in `timesteps` (a tensor, tensor(-1) after the last), as diffusers' DDPM, LCM
        and TCD return; before set_timesteps, timestep - 1."""
        if self.num_inference_steps is None:
            return timestep - 1
        i = self._index_of(self._timestep_value(timestep))
        return self.timesteps[i + 1] if i + 1 < len(self.timesteps) else torch.tensor(-1)

    def _index_of(self, t: int) -> int:
        ts = self._host_timesteps()
        if t not in ts:
            raise ValueError(f"{type(self).__name__}: timestep {t} is not one of scheduler.timesteps")
        return ts.index(t)

    def _previous(self, t: int) -> int:
        """previous_timestep as a Python int, read from the host copy of `timesteps` (no device wait)."""
        ts, i = self._host_timesteps(), self._index_of(t)
        return ts[i + 1] if i + 1 < len(ts) else -1

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_0) for one timestep per batch item."""
        timesteps = check_add_noise(original_samples, noise, timesteps, self.config.num_train_timesteps)
        device = original_samples.device
        ab = self.alphas_cumprod.to(device, original_samples.dtype)[timesteps.to(device)]
        return expand_to(ab**0.5, original_samples) * original_samples + expand_to((1 - ab) ** 0.5, noise) * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target v = sqrt(ᾱ) ε - sqrt(1-ᾱ) x_0 (for training)."""
        ab = self.alphas_cumprod.to(sample.device, sample.dtype)[timesteps.to(sample.device)]
        return expand_to(ab**0.5, sample) * noise - expand_to((1 - ab) ** 0.5, sample) * sample


def reject_step_indices(timestep: Any, owner: str) -> None:
    """Sigma samplers take the timestep value, not the loop index: catch the `enumerate` mistake."""
    if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
        raise ValueError(
            f"{owner}.step() got an integer timestep ({timestep}); pass an element of scheduler.timesteps "
            "(floats), not a loop index"
        )


class SigmaScheduler(SchedulerMixin):
    """Schedulers that walk a sigma table (LMS, Euler, Heun; DPM-Solver, UniPC) and track their place in it.

    The place is found from the first timestep they are given (the second match if the timestep
    appears twice, as Heun's do), unless `set_begin_index` fixed it: this is what lets img2img
    start the loop part-way through `timesteps`.
    """

    # DPM-Solver and UniPC treat an unknown timestep as the last one (diffusers does); others refuse it
    _unknown_timestep_is_last: ClassVar[bool] = False
    # add_noise form: x_0 + σ ε (LMS, Euler, Heun) or α x_0 + σ_t ε with α = 1/sqrt(σ² + 1) (DPM, UniPC)
    _variance_preserving: ClassVar[bool] = False

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        keys = [f"use_{kind}_sigmas" for kind in SIGMA_SPACINGS]  # at most one may be set (diffusers refuses more)
        if sum(bool(self.config.get(k)) for k in keys) > 1:
            raise ValueError(f"{type(self).__name__}: only one of {', '.join(keys)} can be set")
        self._init_noise_schedule()
        if self.config.get("rescale_betas_zero_snr"):
            self.alphas_cumprod[-1] = 2**-24  # ᾱ_T = 0 would make σ_T infinite: keep it finite
        self.train_sigmas = vp_sigmas(self.alphas_cumprod)  # σ of every training step, ascending in t
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._set_training_table()

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

    def _spaced_sigmas(self, n: int, num_train_timesteps: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """n spaced timesteps (float32; spaced over num_train_timesteps if given) and their σ, interpolated
        linearly in t between training steps."""
        c = self.config
        T = num_train_timesteps or c.num_train_timesteps
        ts = spaced_timesteps(c.timestep_spacing, n, T, c.steps_offset).astype(np.float32)
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

    def _respaced(
        self, sigma_min: float, sigma_max: float, n: int, karras_config: bool = True
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The σ's of the configured spacing (Karras, else exponential, else beta) from sigma_max down to
        sigma_min, and the t of each; None when none is set. The config's sigma_min / sigma_max win when
        set, as in `_karras` (`karras_config=False`: LMS's Karras σ's ignore them)."""
        kind = self._sigma_spacing
        if kind is None:
            return None
        if kind == "karras":
            return self._karras(sigma_min, sigma_max, n, use_config=karras_config)
        lo, hi = self.config.get("sigma_min"), self.config.get("sigma_max")
        spacing = exponential_sigmas if kind == "exponential" else beta_sigmas
        sigmas = spacing(lo if lo is not None else sigma_min, hi if hi is not None else sigma_max, n)
        return sigmas, sigma_to_t(sigmas, np.log(self.train_sigmas))

    @property
    def _sigma_spacing(self) -> str | None:
        """The first of the σ spacings whose use_<kind>_sigmas key is set, else None (as the timesteps fall)."""
        return next((kind for kind in SIGMA_SPACINGS if self.config.get(f"use_{kind}_sigmas")), None)

    def _set_training_table(self) -> None:
        """Before set_timesteps: every training step, σ descending, then 0 (diffusers' starting state).

        The VP solvers (DPM-Solver, UniPC) start, as in diffusers, from the ascending σ's without the 0.
        """
        T = self.config.num_train_timesteps
        if self._variance_preserving:
            self.timesteps = torch.arange(T - 1, -1, -1, dtype=torch.float32)
            self.sigmas = torch.from_numpy(self.train_sigmas)
        else:
            self._set_table(np.arange(T - 1, -1, -1), np.append(self.train_sigmas[::-1], 0.0), None, torch.float32)

    def _set_table(self, timesteps: np.ndarray, sigmas: np.ndarray, device: Any, dtype: torch.dtype) -> None:
        on_host = torch.from_numpy(np.ascontiguousarray(timesteps)).to(dtype=dtype)
        self.timesteps = on_host.to(device)
        self._keep_host_copy(on_host.tolist())
        self.sigmas = torch.from_numpy(np.asarray(sigmas, dtype=np.float32))  # on the CPU, as diffusers keeps it
        self._reset_index()

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Fix the index of the first step (pipelines call this for img2img)."""
        self._begin_index = begin_index

    def _reset_index(self) -> None:
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep: float | torch.Tensor, schedule_timesteps: torch.Tensor | None = None) -> int:
        i = self._position_in_timesteps(timestep) if schedule_timesteps is None else None
        if i is not None:  # one of `timesteps`: the same search on their host copy
            values = self._host_timesteps()
            hits = [k for k, v in enumerate(values) if v == values[i]]
            return hits[1 if len(hits) > 1 else 0]
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
        timesteps = check_add_noise(original_samples, noise, timesteps)
        sigmas = self.sigmas.to(original_samples.device, original_samples.dtype)
        if self._begin_index is None:
            schedule = self.timesteps.to(original_samples.device)
            indices = [self.index_for_timestep(t, schedule) for t in timesteps.to(original_samples.device).flatten()]
        else:
            indices = [self._step_index if self._step_index is not None else self._begin_index] * timesteps.numel()
        sigma = expand_to(sigmas[indices], original_samples)
        if self._variance_preserving:
            alpha, sigma_t = self._alpha_sigma_t(sigma)
            return alpha * original_samples + sigma_t * noise
        return original_samples + noise * sigma

    def _alpha_sigma_t(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α_t, σ_t) of the VP sample x = α_t x_0 + σ_t ε at noise level σ (UniPC's flow form overrides it)."""
        alpha = 1 / (sigma**2 + 1) ** 0.5
        return alpha, sigma * alpha


class VPSolverScheduler(SigmaScheduler):
    """The exponential-integrator solvers in λ (DPM-Solver, UniPC, DEIS): the σ table of a SigmaScheduler, but
    samples in the VP form x = α_t x_0 + σ_t ε (network input unscaled, init_noise_sigma = 1), and, as in
    diffusers, a timestep not in the table counts as the last one."""

    _unknown_timestep_is_last = True
    _variance_preserving = True

    def _solver_sigmas(self, ts: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, bool]:
        """The σ's of the n steps at the spaced timesteps `ts`, the timesteps to use, and whether they were respaced:
        by the config's use_<kind>_sigmas (the t's read back from the σ's; Karras' rounded, the others truncated
        by the int64 cast, as in diffusers), else σ interpolated linearly in t at `ts`."""
        train = self.train_sigmas
        if respaced := self._respaced(train[0].item(), train[-1].item(), n):
            sigmas, ts = respaced
            return sigmas, ts.round() if self.config.use_karras_sigmas else ts, True
        return np.interp(ts, np.arange(len(train)), train), ts, False

    def _set_solver_table(self, ts: np.ndarray, sigmas: np.ndarray, sigma_last: float, device: Any) -> None:
        """The integer timesteps `ts` and their σ's, `sigma_last` after them; the solver history starts afresh."""
        self._set_table(ts, np.append(sigmas, sigma_last), device, torch.int64)
        self.num_inference_steps = len(ts)
        self._reset_history()
