"""Stable Diffusion XL inpainting, step for step as diffusers: regenerate where the mask is white.

As StableDiffusionInpaintPipeline (stable_diffusion_inpaint.py), two kinds of UNet run it: an
inpainting UNet (9 input channels: the noisy latents, the mask, the latents of the masked image)
that learned to fill the hole, or a plain SDXL UNet (4 channels, the base or the refiner) whose
latents outside the mask are replaced after every step by the image's own, noised to the next
step's level. The rest is SDXL image-to-image (stable_diffusion_xl_img2img.py): the text, the
micro-conditioning, `strength` (diffusers' default 0.9999: the image still sets the starting noise),
and denoising_start / _end for the base + refiner recipe, where `image` may be the base's latents.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .base import ImagePipelineOutput
from .calling import Generator, scheduler_step_kwargs
from .checks import FiniteWatch, callback_inputs, check_real
from .checks_xl import as_fraction
from .image_processing import ImageInput, preprocess_image
from .stable_diffusion_xl import Size
from .stable_diffusion_xl_img2img import StableDiffusionXLImg2ImgPipeline


class StableDiffusionXLInpaintPipeline(StableDiffusionXLImg2ImgPipeline):
    """SDXL inpainting: regenerate where `mask_image` is white, keep the rest."""

    _callback_tensor_inputs = [
        "latents",
        "prompt_embeds",
        "add_text_embeds",
        "add_time_ids",
        "mask",
        "masked_image_latents",
    ]
    _guidance_batch_inputs = ("prompt_embeds", "add_text_embeds", "add_time_ids", "mask", "masked_image_latents")

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image: ImageInput | None = None,
        mask_image: ImageInput | None = None,
        masked_image_latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = 0.9999,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Generator = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        original_size: Size | None = None,
        crops_coords_top_left: Size = (0, 0),
        target_size: Size | None = None,
        negative_original_size: Size | None = None,
        negative_crops_coords_top_left: Size = (0, 0),
        negative_target_size: Size | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' default, never mutated)
        strict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """`image` in pixels (or, for a 4-channel UNet, the base's latents); `masked_image_latents` replaces
        the encoding of the masked image; `strict=False` warns instead of raising on NaN/Inf."""
        if padding_mask_crop is not None:
            raise NotImplementedError(
                "padding_mask_crop is not supported by minidiff: crop the image and mask to the masked region "
                "yourself, inpaint that, and paste it back"
            )
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
        self.check_xl_inputs(
            prompt,
            prompt_2,
            negative_prompt_2,
            prompt_embeds,
            negative_prompt_embeds,
            pooled_prompt_embeds,
            negative_pooled_prompt_embeds,
            clip_skip,
            denoising_start,
            denoising_end,
            original_size=original_size,
            crops_coords_top_left=crops_coords_top_left,
            target_size=target_size,
            negative_original_size=negative_original_size,
            negative_crops_coords_top_left=negative_crops_coords_top_left,
            negative_target_size=negative_target_size,
        )
        self.check_settings(num_inference_steps, guidance_scale, num_images_per_prompt, eta, clip_skip, generator)
        check_real("aesthetic_score", aesthetic_score)
        check_real("negative_aesthetic_score", negative_aesthetic_score)
        image, mask, masked_image = self._xl_inpaint_inputs(image, mask_image, masked_image_latents, height, width)
        self._begin_call(guidance_scale, guidance_rescale, clip_skip, cross_attention_kwargs)
        device, watch = self.device, FiniteWatch(strict)
        plain_unet = self.unet.config.in_channels == self.vae.config.latent_channels

        # 1. text -> both encoders' states and the pooled embedding, as in text-to-image
        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = self.encode_prompt(
            prompt,
            prompt_2,
            device,
            num_images_per_prompt,
            self.do_classifier_free_guidance,
            negative_prompt,
            negative_prompt_2,
            prompt_embeds,
            negative_prompt_embeds,
            pooled_prompt_embeds,
            negative_pooled_prompt_embeds,
            lora_scale=self._lora_scale,
            clip_skip=clip_skip,
        )
        n, dtype = len(prompt_embeds), prompt_embeds.dtype
        # 2. the timesteps; the starting latents (noise, or the noised image below strength 1, or the base's
        # latents after denoising_start); the mask and the masked image's latents at latent size
        timesteps, num_steps = self._start_timesteps(
            num_inference_steps, strength, device, timesteps, sigmas, denoising_start
        )
        latents, noise, image_latents = self._inpaint_start(
            image, timesteps[:1], n, dtype, generator, latents, strength == 1.0, as_fraction(denoising_start) is None
        )
        mask, masked_image_latents = self._mask_inputs(mask, masked_image, n, height, width, dtype, generator)
        watch.see("vae.encode", latents)
        if self.do_classifier_free_guidance:  # for both halves of the guidance batch, as diffusers keeps them
            mask = torch.cat([mask] * 2)
            masked_image_latents = None if masked_image_latents is None else torch.cat([masked_image_latents] * 2)
        # 3. micro-conditioning, at the size of the latents
        height, width = (s * self.vae_scale_factor for s in latents.shape[-2:])
        original_size, target_size = original_size or (height, width), target_size or (height, width)
        add_time_ids, negative_add_time_ids = self._get_add_time_ids_img2img(
            original_size,
            crops_coords_top_left,
            target_size,
            aesthetic_score,
            negative_aesthetic_score,
            negative_original_size or original_size,
            negative_crops_coords_top_left,
            negative_target_size or target_size,
            self._pooled_width(pooled_prompt_embeds),
        )
        add_text_embeds, add_time_ids = pooled_prompt_embeds, add_time_ids.repeat(n, 1)
        if self.do_classifier_free_guidance:  # [unconditional; conditional], as the UNet batch
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
            add_text_embeds = torch.cat([negative_pooled_prompt_embeds, add_text_embeds])
            add_time_ids = torch.cat([negative_add_time_ids.repeat(n, 1), add_time_ids])
        add_time_ids = add_time_ids.to(device=device, dtype=dtype)
        watch.see("text_encoder", prompt_embeds)
        timesteps, num_steps = self._cut_at_end(timesteps, num_steps, denoising_end)
        timestep_cond = self._guidance_embedding(n, latents.dtype)  # only for an LCM-distilled UNet
        # 4. the denoising loop
        step_kwargs = scheduler_step_kwargs(self.scheduler, eta, generator)
        for i, t in self._progress(timesteps, num_steps):
            if self.interrupt:  # a callback set pipe._interrupt: skip the remaining steps, as diffusers does
                continue
            guided = self.do_classifier_free_guidance
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            if not plain_unet:  # the inpainting UNet's extra input channels
                model_input = torch.cat([model_input, mask, masked_image_latents], dim=1)
            noise_pred = self.unet(
                model_input,
                t,
                encoder_hidden_states=prompt_embeds,
                timestep_cond=timestep_cond,
                added_cond_kwargs={"text_embeds": add_text_embeds, "time_ids": add_time_ids},
                cross_attention_kwargs=self._unet_attention_kwargs,
            ).sample
            if guided:
                noise_pred = self._guide(noise_pred)
            watch.see("unet", noise_pred, i, t)  # on-device flags, read once at the end (no sync per step)
            latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample
            if plain_unet:  # outside the mask: the image, noised to the next step's level (clean after the last)
                known = image_latents
                if i + 1 < len(timesteps):
                    known = self.scheduler.add_noise(image_latents, noise, timesteps[i + 1 : i + 2])
                keep = mask.chunk(2)[0] if guided else mask
                latents = (1 - keep) * known + keep * latents
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
                    add_text_embeds=add_text_embeds,
                    add_time_ids=add_time_ids,
                    mask=mask,
                    masked_image_latents=masked_image_latents,
                )
                latents, prompt_embeds, add_text_embeds, add_time_ids, mask, masked_image_latents = out.values()
        # 5. latents -> pixels (the VAE in float32 if it asks), once no NaN/Inf is found
        images = self._decode(latents, output_type, watch)
        self.maybe_free_model_hooks()  # with model offload: the last model back to the CPU, as diffusers
        return ImagePipelineOutput(images=images) if return_dict else (images, None)

    # -- the steps of __call__ --------------------------------------------------------------------------

    def _xl_inpaint_inputs(
        self,
        image: ImageInput | None,
        mask_image: ImageInput | None,
        masked_image_latents: torch.Tensor | None,
        height: int,
        width: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(the image in [-1, 1] or as latents, the mask in {0, 1}, the masked image or its latents), checked."""
        if image is None or mask_image is None:
            raise ValueError("inpainting needs both `image` and `mask_image`")
        latent_channels, unet_channels = self.vae.config.latent_channels, self.unet.config.in_channels
        if unet_channels not in (latent_channels, 2 * latent_channels + 1):
            raise ValueError(
                f"an inpainting UNet has {latent_channels} or {2 * latent_channels + 1} input channels, "
                f"this one has {unet_channels}"
            )
        image = preprocess_image(image, height, width, self.vae_scale_factor)
        mask = preprocess_image(mask_image, height, width, self.vae_scale_factor, mask=True)
        if masked_image_latents is not None:
            latent_size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
            if masked_image_latents.ndim != 4 or tuple(masked_image_latents.shape[1:]) != (
                latent_channels,
                *latent_size,
            ):
                raise ValueError(
                    f"`masked_image_latents` must be (B, {latent_channels}, {latent_size[0]}, {latent_size[1]}), got "
                    f"{tuple(masked_image_latents.shape)}"
                )
            return image, mask, masked_image_latents
        if image.shape[1] == latent_channels:
            if unet_channels != latent_channels:
                raise ValueError(
                    "an inpainting UNet (9 channels) needs the masked image: pass `image` in pixels, or "
                    "`masked_image_latents`"
                )
            return image, mask, None
        return image, mask, image * (mask < 0.5)

    def _inpaint_start(
        self,
        image: torch.Tensor,
        timestep: torch.Tensor,
        n: int,
        dtype: torch.dtype,
        generator: Generator,
        latents: torch.Tensor | None,
        full_strength: bool,
        add_noise: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(starting latents, the noise, the image's latents when needed). Generator order as diffusers: the
        image's VAE sample (for a plain UNet, below strength 1, or after denoising_start), then the noise."""
        self._check_generators(generator, n)
        image = image.to(device=self.device, dtype=dtype)
        latent_channels = self.vae.config.latent_channels
        image_latents = None
        if image.shape[1] == latent_channels:  # the base's latents
            image_latents = image
            height, width = (s * self.vae_scale_factor for s in image.shape[-2:])
        else:
            height, width = image.shape[-2:]
            plain_unet = self.unet.config.in_channels == latent_channels
            if plain_unet or not add_noise or (latents is None and not full_strength):
                image_latents = self._encode_image(image, generator)
        if image_latents is not None:
            image_latents = self._repeat_to(image_latents, n, "image")
        if not add_noise:  # denoising_start: the latents as the base left them; the noise for the paste-back
            noise = self._prepare_noise(n, height, width, dtype, generator, None, latent_channels)
            return image_latents, noise, image_latents
        noise = self._prepare_noise(n, height, width, dtype, generator, latents, latent_channels)
        if latents is None and not full_strength:
            return self.scheduler.add_noise(image_latents, noise, timestep.repeat(n)), noise, image_latents
        return noise * self.scheduler.init_noise_sigma, noise, image_latents

    def _mask_inputs(
        self,
        mask: torch.Tensor,
        masked_image: torch.Tensor | None,
        n: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        generator: Generator,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The mask at latent size and the masked image's latents (encoded unless given), one per output image."""
        size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        mask = self._repeat_to(F.interpolate(mask, size=size).to(self.device, dtype), n, "mask_image")
        if masked_image is None:
            return mask, None
        masked_image = masked_image.to(self.device, dtype)
        if masked_image.shape[1] != self.vae.config.latent_channels:
            masked_image = self._encode_image(masked_image, generator)
        return mask, self._repeat_to(masked_image, n, "image")
