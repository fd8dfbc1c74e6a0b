"""Stable Diffusion written out by hand: the loop behind `StableDiffusionPipeline.__call__`.

Stable Diffusion is a *latent* diffusion model: it does not denoise pixels but a small latent
image (4 channels, height and width divided by 8 for the real models), and a VAE decoder turns the
final latent into pixels. Four pieces take part, each loaded from its own checkpoint subfolder:

1. tokenizer + CLIP text encoder: the prompt becomes 77 token ids (padded or truncated), then
   77 vectors that the UNet attends to through cross-attention;
2. UNet: from a noisy latent, a timestep and those vectors, predicts the noise in the latent;
3. scheduler: turns the prediction into a latent one step less noisy. The checkpoint ships a PNDM
   config; here UniPC, a fast multistep solver, reads that same config instead (a scheduler is
   only the noise schedule plus an update rule, so any of them can be swapped in);
4. VAE decoder: latent -> RGB image.

Classifier-free guidance (CFG). The UNet is also run without the prompt (the empty prompt ""),
and the final noise estimate is pushed away from that unconditional guess:

    noise = uncond + guidance_scale * (text - uncond)

Both predictions come from one UNet call on a batch of two: [unconditional, conditional].

Three scalings that are easy to miss:
- `set_timesteps` comes first: some schedulers' `init_noise_sigma` depends on the chosen steps;
- the starting noise is multiplied by `scheduler.init_noise_sigma` (1 for UniPC and DDPM-style
  schedulers, the largest sigma for LMS / Euler), and `scheduler.scale_model_input` rescales the
  UNet input where the scheduler needs it (a no-op for UniPC, kept so any scheduler works);
- the VAE was trained on latents multiplied by `vae.config.scaling_factor` (0.18215 for SD), so
  latents are divided by it before decoding.

Run:
    python examples/stable_diffusion_loop.py --model runwayml/stable-diffusion-v1-5 \\
        --prompt "a photograph of an astronaut riding a horse" --steps 25 --output astronaut.png

Every function that loads something takes `lib`, the library the classes come from: minidiff by
default. tests/test_examples.py runs this same code with diffusers + transformers and compares.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from ddpm_loop import Library, save_png, to_images
from tqdm.auto import tqdm

import minidiff


@dataclass
class Components:
    """The four pieces of a Stable Diffusion checkpoint."""

    tokenizer: Any
    text_encoder: Any
    unet: Any
    vae: Any
    scheduler: Any

    @property
    def vae_scale(self) -> int:
        """How much smaller than the image the latent is: 2 per VAE downsampling (8 for real SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def default_size(self) -> int:
        """The image side the UNet was trained at (512 for SD1, 768 for SD2 v-prediction)."""
        return self.unet.config.sample_size * self.vae_scale


def load_components(
    lib: Library, model: str, scheduler: str = "UniPCMultistepScheduler", device: str = "cpu"
) -> Components:
    """Load each piece from its subfolder; `scheduler` names the scheduler class to swap in."""
    return Components(
        tokenizer=lib.CLIPTokenizer.from_pretrained(model, subfolder="tokenizer"),
        text_encoder=lib.CLIPTextModel.from_pretrained(model, subfolder="text_encoder").to(device),
        unet=lib.UNet2DConditionModel.from_pretrained(model, subfolder="unet").to(device),
        vae=lib.AutoencoderKL.from_pretrained(model, subfolder="vae").to(device),
        # any scheduler class reads the checkpoint's scheduler config (betas, prediction type, ...)
        scheduler=getattr(lib, scheduler).from_pretrained(model, subfolder="scheduler"),
    )


def tokenize(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    """Prompts -> (B, 77) token ids: start token, words, end token, then padding."""
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@torch.no_grad()
def encode_prompt(tokenizer: Any, text_encoder: Any, prompts: list[str]) -> torch.Tensor:
    """Prompts -> (B, 77, hidden) text embeddings: the encoder's last hidden state, `[0]`."""
    return text_encoder(tokenize(tokenizer, prompts).to(text_encoder.device))[0]


def with_unconditional(c: Components, prompt_embeds: torch.Tensor) -> torch.Tensor:
    """The CFG batch [unconditional; conditional]: the empty prompt's embeddings go first."""
    uncond_embeds = encode_prompt(c.tokenizer, c.text_encoder, [""] * len(prompt_embeds))
    return torch.cat([uncond_embeds, prompt_embeds])


@torch.no_grad()
def denoise(
    unet: Any,
    scheduler: Any,
    latents: torch.Tensor,
    text_embeddings: torch.Tensor,
    guidance_scale: float,
    start_step: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """The denoising loop with CFG, over `scheduler.timesteps[start_step:]` (img2img starts later)."""
    for t in tqdm(scheduler.timesteps[start_step:], disable=not progress):
        # one UNet call for both halves of the CFG batch
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise_pred = unet(model_input, t, encoder_hidden_states=text_embeddings).sample
        noise_uncond, noise_text = noise_pred.chunk(2)
        noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
        latents = scheduler.step(noise_pred, t, latents).prev_sample
    return latents


def sample_latents(
    c: Components,
    prompt_embeds: torch.Tensor,
    steps: int,
    generator: torch.Generator,
    height: int,
    width: int,
    guidance_scale: float = 7.5,
    progress: bool = False,
) -> torch.Tensor:
    """Text embeddings (B, 77, hidden) -> denoised latents (B, 4, height / 8, width / 8)."""
    if height % c.vae_scale or width % c.vae_scale:
        raise ValueError(f"height and width must be multiples of {c.vae_scale}, got {height}x{width}")
    text_embeddings = with_unconditional(c, prompt_embeds)
    c.scheduler.set_timesteps(steps, device=c.unet.device)
    shape = (len(prompt_embeds), c.unet.config.in_channels, height // c.vae_scale, width // c.vae_scale)
    latents = torch.randn(shape, generator=generator).to(c.unet.device) * c.scheduler.init_noise_sigma
    return denoise(c.unet, c.scheduler, latents, text_embeddings, guidance_scale, progress=progress)


@torch.no_grad()
def decode_latents(vae: Any, latents: torch.Tensor) -> np.ndarray:
    """Latents -> (B, H, W, 3) images in [0, 1], undoing the VAE's latent scaling first."""
    return to_images(vae.decode(latents / vae.config.scaling_factor).sample)


def generate(
    lib: Library = minidiff,
    model: str = "runwayml/stable-diffusion-v1-5",
    prompt: str = "a photograph of an astronaut riding a horse",
    steps: int = 25,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    guidance_scale: float = 7.5,
    scheduler: str = "UniPCMultistepScheduler",
    device: str = "cpu",
    progress: bool = False,
) -> np.ndarray:
    """Prompt -> one (1, H, W, 3) image in [0, 1]."""
    c = load_components(lib, model, scheduler, device)
    prompt_embeds = encode_prompt(c.tokenizer, c.text_encoder, [prompt])
    size = (height or c.default_size(), width or c.default_size())
    generator = torch.Generator().manual_seed(seed)
    latents = sample_latents(c, prompt_embeds, steps, generator, *size, guidance_scale, progress)
    return decode_latents(c.vae, latents)


def add_common_arguments(parser: argparse.ArgumentParser, default_seed: int = 0) -> None:
    """The options every Stable Diffusion example takes."""
    parser.add_argument("--model", default="runwayml/stable-diffusion-v1-5", help="SD pipeline folder or Hub id")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=default_seed)
    parser.add_argument("--height", type=int, default=None, help="image height (default: the model's size)")
    parser.add_argument("--width", type=int, default=None, help="image width (default: the model's size)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")


def common_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of add_common_arguments as keyword arguments of generate() and its kin, with a progress bar."""
    options = dict(model=args.model, steps=args.steps, guidance_scale=args.guidance, seed=args.seed)
    return options | dict(height=args.height, width=args.width, device=args.device, progress=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    parser.add_argument("--scheduler", default="UniPCMultistepScheduler", help="a minidiff scheduler class name")
    parser.add_argument("--output", default="stable_diffusion.png", help="PNG file to write")
    args = parser.parse_args(argv)
    image = generate(minidiff, prompt=args.prompt, scheduler=args.scheduler, **common_options(args))[0]
    save_png(image, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
