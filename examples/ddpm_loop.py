"""A DDPM sampler written out by hand: what `DDPMPipeline.__call__` does, in twenty lines.

A diffusion model is trained to undo noise. Sampling starts from pure Gaussian noise of the image's
shape and walks back through the noise levels the model was trained on:

1. the scheduler picks which of the 1000 training timesteps to visit (`set_timesteps(n)` keeps
   n of them, evenly spaced, largest first);
2. at each timestep the UNet looks at the current noisy image and predicts the noise in it;
3. the scheduler's `step` removes the right share of that noise for this timestep and, because
   DDPM is a stochastic sampler, adds back a little fresh noise: the result is the image one
   timestep less noisy;
4. after the last timestep the model's output space, [-1, 1], is mapped to pixels in [0, 1].

The UNet holds the weights; the scheduler holds only arithmetic (the noise schedule), which is why
a checkpoint folder keeps them apart (`unet/`, `scheduler/`) and why a different scheduler can be
plugged into the same UNet.

Randomness: one CPU `torch.Generator` is handed to every draw (the starting noise and each step's
fresh noise), so a seed gives the same image on any device and in any library that draws in the
same order.

Run:
    python examples/ddpm_loop.py --model google/ddpm-cat-256 --steps 25 --output cat.png

Every function that loads something takes `lib`, the library the classes come from: minidiff by
default. tests/test_examples.py runs this same code with diffusers and compares the images.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

import minidiff

# a module such as `minidiff`, or a namespace holding the same class names from another library
Library = ModuleType | SimpleNamespace


def load(lib: Library, model: str, device: str = "cpu") -> tuple[Any, Any]:
    """The UNet (the weights) and its DDPM scheduler (the noise schedule) from one checkpoint."""
    unet = lib.UNet2DModel.from_pretrained(model, subfolder="unet").to(device)
    scheduler = lib.DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    return unet, scheduler


@torch.no_grad()
def sample(
    unet: Any, scheduler: Any, steps: int, generator: torch.Generator, batch_size: int = 1, progress: bool = False
) -> torch.Tensor:
    """Denoise pure noise in `steps` steps; returns the model-space images (B, C, H, W) in about [-1, 1]."""
    scheduler.set_timesteps(steps)
    size = unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else size
    # drawn on the CPU generator, then moved: the same numbers whatever the device
    x = torch.randn((batch_size, unet.config.in_channels, height, width), generator=generator).to(unet.device)
    for t in tqdm(scheduler.timesteps, disable=not progress):
        noise_pred = unet(x, t).sample
        x = scheduler.step(noise_pred, t, x, generator=generator).prev_sample
    return x


def to_images(x: torch.Tensor) -> np.ndarray:
    """Model space [-1, 1], (B, C, H, W) -> float images in [0, 1], (B, H, W, C)."""
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()


def save_png(image: np.ndarray, path: str | Path) -> None:
    """One (H, W, 3) float image in [0, 1] -> an 8-bit PNG."""
    Image.fromarray((image * 255).round().astype(np.uint8)).save(path)


def generate(
    lib: Library = minidiff,
    model: str = "google/ddpm-cat-256",
    steps: int = 25,
    seed: int = 0,
    batch_size: int = 1,
    device: str = "cpu",
    progress: bool = False,
) -> np.ndarray:
    """Load, sample and convert: (B, H, W, 3) images in [0, 1]."""
    unet, scheduler = load(lib, model, device)
    return to_images(sample(unet, scheduler, steps, torch.Generator().manual_seed(seed), batch_size, progress))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="google/ddpm-cat-256", help="DDPM pipeline folder or Hub id")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps (the model was trained with 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="ddpm.png", help="PNG file to write")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    args = parser.parse_args(argv)
    image = generate(minidiff, args.model, args.steps, args.seed, device=args.device, progress=True)[0]
    save_png(image, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
