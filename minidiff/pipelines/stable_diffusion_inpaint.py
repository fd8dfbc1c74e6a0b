"""Stable Diffusion inpainting, step for step as diffusers: regenerate where the mask is white.

Two kinds of UNet run it. An inpainting UNet (9 input channels) sees, beside the noisy latents,
the mask and the latents of the image with the masked part blacked out, and learned to fill the
hole. A plain text-to-image UNet (4 channels) knows nothing of the mask: after every step, the
image's own latents, noised to the level of the next step, are pasted back outside the mask, so
only the hole is generated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .base import ImagePipelineOutput
from .checks import FiniteWatch, callback_inputs
from .image_processing import ImageInput, preprocess_image
from .stable_diffusion import Generator, StableDiffusionPipeline, classifier_free_guidance, scheduler_step_kwargs


class StableDiffusionInpaintPipeline(StableDiffusionPipeline):
    """Inpainting: regenerate where `mask_image` is white, keep the rest."""

    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds", "mask", "masked_image_latents"]
    _guidance_batch_inputs = ("prompt_embeds", "mask", "masked_image_latents")

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self,
        prompt: str | list[str] | None = None,
        image: ImageInput | None = None,
        mask_image: ImageInput | None = None,
        height: int | None = None,
        width: int | None = None,
        strength: float = 1.0,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Generator = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006
        strict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """diffusers' arguments (no IP-Adapter, masked_image_latents or padding_mask_crop); `strict=False`
        warns instead of raising when the latents or the image turn NaN/Inf."""
        callback_on_step_end_tensor_inputs = callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        height, width = self._default_size(height, width)
        self.check_inputs(
            prompt,
            height,
            width,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            callback_on_step_end_tensor_inputs,
            strength,
            output_type,
            latents=latents,
            callback_on_step_end=callback_on_step_end,
        )
        self.check_settings(num_inference_steps, guidance_scale, num_images_per_prompt, eta, clip_skip, generator)
        self._begin_call(guidance_scale, 0.0, clip_skip, cross_attention_kwargs)
        image, mask_image = self._inpaint_inputs(image, mask_image, height, width)  # tensors, checked
        device, watch = self.device, FiniteWatch(strict)
        plain_unet = self.unet.config.in_channels == self.vae.config.latent_channels

        # 1. text -> CLIP embeddings, as in text-to-image
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            self.do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            lora_scale=self._lora_scale,
            clip_skip=clip_skip,
        )
        n = len(prompt_embeds)
        if self.do_classifier_free_guidance:  # [unconditional; conditional]: both halves in one UNet batch
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
        watch.see("text_encoder", prompt_embeds)
        # 2. the last `strength` of the timesteps; noise (or the noised image below strength 1); the mask
        timesteps, num_steps = self._strength_timesteps(num_inference_steps, strength, device, timesteps, sigmas)
        image = image.to(device=device, dtype=prompt_embeds.dtype)
        latents, noise, image_latents = self._start_latents(image, timesteps[:1], n, generator, latents, strength)
        mask, masked_image_latents = self._mask_latents(mask_image, image, n, generator)
        watch.see("vae.encode", latents if image_latents is None else image_latents)
        watch.see("vae.encode", masked_image_latents)
        if self.do_classifier_free_guidance:  # the inpainting UNet's extra inputs, for both halves (as diffusers)
            mask, masked_image_latents = torch.cat([mask] * 2), torch.cat([masked_image_latents] * 2)
        timestep_cond = self._guidance_embedding(n, latents.dtype)  # only for an LCM-distilled UNet
        # 3. the denoising loop
        step_kwargs = scheduler_step_kwargs(self.scheduler, eta, generator)
        for i, t in self._progress(timesteps, num_steps):
            if self.interrupt:  # a callback set pipe._interrupt: skip the remaining steps, as diffusers does
                continue
            guided = self.do_classifier_free_guidance  # a callback may switch it off (SDCFGCutoffCallback)
            model_input = torch.cat([latents] * 2) if guided else latents  # [unconditional; conditional]
            model_input = self.scheduler.scale_model_input(model_input, t)
            if not plain_unet:
                model_input = torch.cat([model_input, mask, masked_image_latents], dim=1)
            noise_pred = self.unet(
                model_input,
                t,
                encoder_hidden_states=prompt_embeds,
                timestep_cond=timestep_cond,
                cross_attention_kwargs=self._unet_attention_kwargs,
            ).sample
            if guided:
                noise_pred = classifier_free_guidance(noise_pred, self.guidance_scale)
            watch.see("unet", noise_pred, i, t)  # on-device flags, read once at the end (no sync per step)
            latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample
            if plain_unet:  # outside the mask: the image, noised to the next step's level (clean after the last)
                known = image_latents
                if i + 1 < len(timesteps):
                    known = self.scheduler.add_noise(image_latents, noise, timesteps[i + 1 : i + 2])
                known_mask = mask.chunk(2)[0] if guided else mask
                latents = (1 - known_mask) * known + known_mask * latents
            watch.see("scheduler.step", latents, i, t)
            if callback_on_step_end is not None:
                out = self._step_end(
                    callback_on_step_end,
                    callback_on_step_end_tensor_inputs,
                    i,
                    t,
                    watch,
                    latents=latents,
                    prompt_embeds=prompt_embeds,
                    negative_prompt_embeds=negative_prompt_embeds,
                    mask=mask,
                    masked_image_latents=masked_image_latents,
                )
                latents, prompt_embeds, negative_prompt_embeds, mask, masked_image_latents = out.values()
        # 4. latents -> pixels, once no NaN/Inf is found
        images = self._decode(latents, output_type, watch)
        self.maybe_free_model_hooks()  # with model offload: the last model back to the CPU, as diffusers
        return ImagePipelineOutput(images=images) if return_dict else (images, None)

    def _inpaint_inputs(
        self, image: ImageInput | None, mask_image: ImageInput | None, height: int, width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The image in [-1, 1] at (height, width) and the mask at its size in {0, 1}, checked."""
        if image is None or mask_image is None:
            raise ValueError("inpainting needs both `image` and `mask_image`")
        unet_channels = self.unet.config.in_channels
        latent_channels = self.vae.config.latent_channels
        if unet_channels not in (latent_channels, 2 * latent_channels + 1):
            raise ValueError(
                f"an inpainting UNet has {latent_channels} or {2 * latent_channels + 1} input channels, "
                f"this one has {unet_channels}"
            )
        image = preprocess_image(image, height, width, self.vae_scale_factor)
        if image.shape[1] == self.vae.config.latent_channels:
            raise ValueError("inpainting needs the `image` in pixels, not latents")
        mask = preprocess_image(mask_image, *image.shape[-2:], self.vae_scale_factor, mask=True)
        return image, mask

    def _start_latents(
        self,
        image: torch.Tensor,
        timestep: torch.Tensor,
        n: int,
        generator: Generator,
        latents: torch.Tensor | None,
        strength: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(starting latents, the noise in them, the image's latents when needed). Generator order as
        diffusers: the image's VAE sample (for a plain UNet or strength < 1), then the noise."""
        self._check_generators(generator, n)
        full_strength = strength == 1.0
        image_latents = None
        if self.unet.config.in_channels == self.vae.config.latent_channels or (latents is None and not full_strength):
            image_latents = self._encode_image(image, generator)
            image_latents = image_latents.repeat(n // len(image_latents), 1, 1, 1)
        height, width = image.shape[-2:]
        channels = self.vae.config.latent_channels
        noise = self._prepare_noise(n, height, width, image.dtype, generator, latents, channels)
        if latents is None and not full_strength:
            return self.scheduler.add_noise(image_latents, noise, timestep.repeat(n)), noise, image_latents
        return noise * self.scheduler.init_noise_sigma, noise, image_latents

    def _mask_latents(
        self, mask: torch.Tensor, image: torch.Tensor, n: int, generator: Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The mask ({0, 1}, 1 = regenerate) at latent size and the latents of the image with the mask's
        part blacked out, one per output image."""
        height, width = image.shape[-2:]
        masked_image = image * (mask.to(image.device, image.dtype) < 0.5)
        size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        mask = F.interpolate(mask, size=size).to(image.device, image.dtype)
        masked_image_latents = self._encode_image(masked_image, generator)
        return self._repeat_to(mask, n, "mask_image"), self._repeat_to(masked_image_latents, n, "image")
