"""DDPMPipeline: unconditional image generation with a pixel-space UNet and any scheduler.

Reference: Ho, Jain, Abbeel. "Denoising Diffusion Probabilistic Models", 2020.

The loop of examples/ddpm_loop.py: start from Gaussian noise the size of the image, and at each
timestep let the UNet predict the noise and the scheduler take a step; no text, no guidance, no VAE.
"""

from __future__ import annotations

from typing import Any

import torch

from ..noise import randn_tensor
from ..unet_2d import UNet2DModel
from .base import DiffusionPipeline, ImagePipelineOutput
from .checks import FiniteWatch, check_generator, check_int, check_weights
from .image_processing import postprocess_image


class DDPMPipeline(DiffusionPipeline):
    component_names = ("unet", "scheduler")

    def __init__(self, unet, scheduler) -> None:
        if not isinstance(unet, UNet2DModel):
            raise TypeError(
                f"DDPMPipeline runs a pixel-space UNet2DModel, got a {type(unet).__name__} as `unet` "
                f"(a Stable Diffusion folder? load it with StableDiffusionPipeline)"
            )
        super().__init__(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 1000,
        output_type: str = "pil",
        return_dict: bool = True,
        strict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """`strict=False` warns instead of raising when the image turns NaN/Inf."""
        self.check_inputs(batch_size, output_type, num_inference_steps, generator)
        watch = FiniteWatch(strict)
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        # noise first, then one draw per step inside scheduler.step: diffusers' generator order
        shape = (batch_size, self.unet.config.in_channels, height, width)
        image = randn_tensor(shape, generator, self.device, self.unet.dtype)
        self.scheduler.set_timesteps(num_inference_steps)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_output = self.unet(image, t).sample
            watch.see("unet", model_output, i, t)  # on-device flags, read once below (no sync per step)
            image = self.scheduler.step(model_output, t, image, generator=generator).prev_sample
            watch.see("scheduler.step", image, i, t)
        watch.verify()
        image = postprocess_image(image, output_type)
        return ImagePipelineOutput(images=image) if return_dict else (image,)

    def check_inputs(
        self, batch_size: int, output_type: str, num_inference_steps: int = 1000, generator: Any = None
    ) -> None:
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        check_int("num_inference_steps", num_inference_steps)
        check_generator(generator)
        check_weights(self.components)
        if self.unet.config.sample_size is None:
            raise ValueError("the UNet's config has no sample_size: cannot tell the image size")
