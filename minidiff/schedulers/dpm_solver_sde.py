"""DPM-Solver++ SDE ("DPM++ SDE"): a stochastic second-order singlestep solver with Brownian-tree noise.

In t = -log σ each step from σ to σ_next takes two network evaluations: an ancestral
DPM-Solver++(1) half step to the midpoint σ_mid = sqrt(σ σ_next), then, with x̂_0 at σ_mid, the
whole step from x again [1, Algorithm 1 (r = 1/2) made stochastic as in 2]. Each part splits its
target σ_to into a deterministic σ_down and fresh noise σ_up (σ_down² + σ_up² = σ_to²):
    x ← (σ_down/σ) x + (1 - σ_down/σ) x̂_0 + σ_up ξ,   σ_up = min(σ_to, sqrt(σ_to² (σ² - σ_to²) / σ²))
ξ is the increment of one Brownian motion W(σ) over [σ_to, σ], scaled to unit variance, drawn from
a Brownian tree (torchsde): the noise of an interval is the same however the steps cut it, so
sampling converges as the step count grows [3]. The last step, to σ = 0, is plain Euler.

References:
1. Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", 2022.
2. Crowson, k-diffusion `sample_dpmpp_sde` and `BrownianTreeNoiseSampler` (https://github.com/crowsonkb/k-diffusion).
3. Li et al., "Scalable Gradients for Stochastic Differential Equations", 2020 (the Brownian tree / interval).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .base import SchedulerOutput, SigmaScheduler, Tensor, Timestep
from .config import NoiseScheduleConfig, SigmaSpacingKeys, one_of
from .schedule import sigma_to_t, spaced_timesteps, ve_denoised


def import_torchsde() -> Any:
    try:
        import torchsde
    except ImportError as e:
        raise ImportError(
            "DPMSolverSDEScheduler draws its noise from torchsde's Brownian tree: pip install minidiff[sde]"
        ) from e
    return torchsde


class BrownianTreeNoise:
    """Unit-variance increments (W(σ_next) - W(σ)) / sqrt(|σ_next - σ|) of a Brownian motion on [σ_min, σ_max].

    One tree for the whole batch, or one per sample for a list of seeds (then each sample's noise
    is independent of the batch it runs in).
    """

    def __init__(self, x: torch.Tensor, sigma_min: float, sigma_max: float, seed: int | list[int] | None) -> None:
        torchsde = import_torchsde()
        t0, t1 = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
        if seed is None:  # diffusers draws the entropy from torch's global generator
            seed = torch.randint(0, 2**63 - 1, []).item()
        self.batched = isinstance(seed, (list, tuple))
        shape = x.shape[1:] if self.batched else x.shape
        seeds = seed if self.batched else [seed]
        kw = dict(size=shape, dtype=x.dtype, device=x.device, tol=1e-6, pool_size=24, halfway_tree=True)
        self.trees = [torchsde.BrownianInterval(t0=t0, t1=t1, entropy=s, **kw) for s in seeds]

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        lo, hi = sorted((torch.as_tensor(sigma), torch.as_tensor(sigma_next)))
        w = torch.stack([tree(lo, hi) for tree in self.trees])  # W(hi) - W(lo)
        w = w if self.batched else w[0]
        return w * (1.0 if sigma_next > sigma else -1.0) / (hi - lo).sqrt()


@dataclass(frozen=True)
class DPMSolverSDEConfig(SigmaSpacingKeys, NoiseScheduleConfig):
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = one_of("epsilon", ("epsilon", "v_prediction"))  # diffusers has no "sample" here
    noise_sampler_seed: int | None = None  # the Brownian tree's entropy (None: drawn from torch's generator)


def sigma_fn(t: torch.Tensor) -> torch.Tensor:
    return t.neg().exp()


def t_fn(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.log().neg()


class DPMSolverSDEScheduler(SigmaScheduler):
    """DPM-Solver++(2S) SDE with Brownian-tree noise (k-diffusion's sample_dpmpp_sde, r = 1/2)."""

    config_class = DPMSolverSDEConfig
    order = 2

    def __init__(self, **config: Any) -> None:
        import_torchsde()  # fail at construction, not at the first step
        super().__init__(**config)
        self.noise_sampler_seed = self.config.noise_sampler_seed
        self._reset_stage()

    def _reset_stage(self) -> None:
        self.sample: torch.Tensor | None = None  # x at the start of the step, while the midpoint is pending
        self.mid_point_sigma: torch.Tensor | None = None
        self.noise_sampler: BrownianTreeNoise | None = None

    @property
    def state_in_first_order(self) -> bool:
        """True when the next step() call is the first half (at σ), False for the second (at σ_mid)."""
        return self.sample is None

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        c = self.config
        n = self.num_inference_steps = self._check_num_steps(num_inference_steps)
        ts = spaced_timesteps(c.timestep_spacing, n, c.num_train_timesteps, c.steps_offset)
        log_train = np.log(self.train_sigmas)
        sigmas = np.interp(ts, np.arange(len(log_train)), self.train_sigmas)
        # respaced between the spaced σ's ends (Karras σ's do not take the config's sigma_min / max here)
        if respaced := self._respaced(sigmas[-1].item(), sigmas[0].item(), n, karras_config=False):
            sigmas, ts = respaced
        t = -np.log(sigmas)
        mid_ts = sigma_to_t(np.exp(-(t[:-1] + np.diff(t) / 2)), log_train)  # the midpoints, halfway in log σ
        # [t_0, mid_0, t_1, mid_1, .., t_{n-1}] and [σ_0, σ_1, σ_1, σ_2, σ_2, .., σ_{n-1}, σ_{n-1}, 0]
        timesteps = np.insert(ts, np.arange(1, n), mid_ts)
        sigmas = np.concatenate([sigmas[:1], np.repeat(sigmas[1:], 2), [0.0]])
        self._set_table(timesteps, sigmas, device, torch.float64)
        self._reset_stage()

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor = None) -> torch.Tensor:
        """x / sqrt(σ² + 1) at the σ the network sees now: σ, or σ_mid on the second half."""
        self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index] if self.state_in_first_order else self.mid_point_sigma
        return sample / ((sigma**2 + 1) ** 0.5)

    def step(
        self, model_output: Tensor, timestep: Timestep, sample: Tensor, return_dict: bool = True, s_noise: float = 1.0
    ) -> SchedulerOutput | tuple:
        self._init_step_index(timestep)
        i, first = self._step_index, self.state_in_first_order
        if self.noise_sampler is None:
            lo, hi = self.sigmas[self.sigmas > 0].min().item(), self.sigmas.max().item()
            self.noise_sampler = BrownianTreeNoise(sample, lo, hi, self.noise_sampler_seed)
        sigma, sigma_next = (self.sigmas[i], self.sigmas[i + 1]) if first else (self.sigmas[i - 1], self.sigmas[i])
        t, t_next = t_fn(sigma), t_fn(sigma_next)
        t_mid = t + (t_next - t) * 0.5
        denoised = ve_denoised(model_output, sample, sigma if first else sigma_fn(t_mid), self.config.prediction_type)

        if sigma_next == 0:  # the last step: Euler to σ = 0
            prev_sample = sample + (sample - denoised) / sigma * (sigma_next - sigma)
        else:
            if first:  # first half: to the midpoint
                t_next = t_mid
            else:  # second half: the whole step again from x, with x̂_0 from the midpoint
                sample = self.sample
            sigma_from, sigma_to = sigma_fn(t), sigma_fn(t_next)
            sigma_up = min(sigma_to, (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
            t_down = t_fn((sigma_to**2 - sigma_up**2) ** 0.5)
            prev_sample = (sigma_fn(t_down) / sigma_fn(t)) * sample - (t - t_down).expm1() * denoised
            prev_sample = prev_sample + self.noise_sampler(sigma_fn(t), sigma_fn(t_next)) * s_noise * sigma_up
            self.sample, self.mid_point_sigma = (sample, sigma_fn(t_next)) if first else (None, None)
        self._step_index += 1
        if not return_dict:
            return prev_sample, denoised
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)
