"""Image-to-image by hand: start the Stable Diffusion loop part-way, from a noised real image.

Text-to-image starts from pure noise at the first (noisiest) timestep. Image-to-image starts from
an existing picture instead:

1. encode the picture with the VAE encoder. The encoder gives a distribution per latent element
   (a mean and a spread); draw one latent from it (`latent_dist.sample(generator)`) and multiply
   by `vae.config.scaling_factor`, the scale the UNet was trained on;
2. choose a start step. `scheduler.add_noise(latents, noise, t)` returns the latent as it would
   look at timestep t of the forward (noising) process: exactly the kind of input the loop
   expects at step `start_step`;
3. run the usual denoising loop over `scheduler.timesteps[start_step:]` only.

The later the start, the less noise is added and the more of the input's layout and colours
survive: start_step = 0 keeps almost nothing of the picture, a start near `steps` changes little.
Diffusers' `StableDiffusionImg2ImgPipeline` expresses the same choice as `strength`, about
1 - start_step / steps.

Note that the noised latent is NOT multiplied by `init_noise_sigma`: for a sigma scheduler such as
LMS, `add_noise` already returns x0 + sigma_t * noise, at the scale that scheduler works in.

The scheduler here is LMS (linear multistep, a k-diffusion sampler), built from the checkpoint's
scheduler config. Encoding, noising and denoising use prompt, loop and decoder from
stable_diffusion_loop.py; only the starting point is new.

Run:
    python examples/img2img_loop.py --model runwayml/stable-diffusion-v1-5 --image parrot.png \\
        --prompt "a colorful dancer, nat geo photo" --steps 50 --start-step 10 --output dancer.png

Every function that loads something takes `lib` (minidiff by default); tests/test_examples.py
runs this same code with diffusers + transformers and compares.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ddpm_loop import Library, save_png
from PIL import Image
from stable_diffusion_loop import (
    add_common_arguments,
    common_options,
    decode_latents,
    denoise,
    encode_prompt,
    load_components,
    with_unconditional,
)

import minidiff


def load_image(image: str | Path | Image.Image, height: int, width: int) -> torch.Tensor:
    """A picture -> (1, 3, height, width) tensor in [-1, 1], the VAE's input range."""
    if not isinstance(image, Image.Image):
        image = Image.open(image)
    pixels = np.asarray(image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    return torch.from_numpy(pixels / 255).permute(2, 0, 1)[None] * 2 - 1


@torch.no_grad()
def encode_image(vae: Any, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Pixels in [-1, 1] -> one latent drawn from the encoder's distribution, scaled for the UNet."""
    posterior = vae.encode(image.to(vae.device)).latent_dist
    return posterior.sample(generator=generator) * vae.config.scaling_factor


def noise_to_step(scheduler: Any, latents: torch.Tensor, start_step: int, generator: torch.Generator) -> torch.Tensor:
    """The clean latents, noised to the level of timestep `scheduler.timesteps[start_step]`."""
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    # a 1-element tensor: one timestep shared by the batch
    return scheduler.add_noise(latents, noise, scheduler.timesteps[start_step : start_step + 1])


def img2img(
    lib: Library = minidiff,
    model: str = "runwayml/stable-diffusion-v1-5",
    image: str | Path | Image.Image = "",
    prompt: str = "a colorful dancer, nat geo photo",
    steps: int = 50,
    start_step: int = 10,
    seed: int = 32,
    height: int | None = None,
    width: int | None = None,
    guidance_scale: float = 8.0,
    scheduler: str = "LMSDiscreteScheduler",
    device: str = "cpu",
    progress: bool = False,
) -> np.ndarray:
    """Picture + prompt -> one (1, H, W, 3) image in [0, 1] that keeps the picture's layout."""
    if not 0 <= start_step < steps:
        raise ValueError(f"start_step must lie in [0, steps), got {start_step} for {steps} steps")
    c = load_components(lib, model, scheduler, device)
    generator = torch.Generator().manual_seed(seed)
    text_embeddings = with_unconditional(c, encode_prompt(c.tokenizer, c.text_encoder, [prompt]))
    c.scheduler.set_timesteps(steps, device=c.unet.device)

    pixels = load_image(image, height or c.default_size(), width or c.default_size())
    latents = noise_to_step(c.scheduler, encode_image(c.vae, pixels, generator), start_step, generator)
    latents = denoise(c.unet, c.scheduler, latents, text_embeddings, guidance_scale, start_step, progress)
    return decode_latents(c.vae, latents)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, default_seed=32)
    parser.set_defaults(steps=50, guidance=8.0)
    parser.add_argument("--image", required=True, help="the input picture (any format PIL reads)")
    parser.add_argument("--prompt", default="a colorful dancer, nat geo photo")
    parser.add_argument("--start-step", type=int, default=10, help="skip this many of the noisiest steps")
    parser.add_argument("--output", default="img2img.png", help="PNG file to write")
    args = parser.parse_args(argv)
    image = img2img(minidiff, image=args.image, prompt=args.prompt, start_step=args.start_step, **common_options(args))[
        0
    ]
    save_png(image, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
