"""Gaussian noise drawn exactly as diffusers draws it, so that a seed means the same image."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

# the seeds torch.Generator.manual_seed takes (a negative one is read modulo 2**64)
SEED_RANGE = (-(2**63), 2**64 - 1)


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """torch.Generator(device).manual_seed(seed), refusing a seed torch would overflow on by name."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"`seed` must be an int, got {type(seed).__name__} {seed!r}")
    low, high = SEED_RANGE
    if not low <= seed <= high:
        raise ValueError(f"`seed` must be in [{low}, {high}] (64 bits), got {seed}")
    return torch.Generator(device).manual_seed(int(seed))


def randn_tensor(
    shape: Sequence[int],
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """A CPU generator with a non-CPU target draws on the CPU and moves the result; a list of
    generators draws one sample per generator (diffusers' randn_tensor)."""
    gens = generator if isinstance(generator, list) else [generator]
    if generator is not None and not all(isinstance(g, torch.Generator) for g in gens):
        raise TypeError(f"`generator` must be a torch.Generator or a list of them, got {type(gens[0]).__name__}")
    device = torch.device(device or "cpu")
    rand_device = device
    if generator is not None:
        gen_type = (generator[0] if isinstance(generator, list) else generator).device.type
        if gen_type != device.type:
            if gen_type != "cpu":
                raise ValueError(f"cannot draw noise for {device.type} tensors with a {gen_type} generator")
            rand_device = torch.device("cpu")
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; pass one per sample")
        one = (1, *shape[1:])
        return torch.cat([torch.randn(one, generator=g, device=rand_device, dtype=dtype) for g in generator]).to(device)
    return torch.randn(tuple(shape), generator=generator, device=rand_device, dtype=dtype).to(device)
