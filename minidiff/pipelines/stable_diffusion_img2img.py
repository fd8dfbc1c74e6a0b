"""Stable Diffusion image-to-image (SDEdit), step for step as diffusers.

Reference: Meng et al. "SDEdit: Guided Image Synthesis and Editing with Stochastic Differential
Equations", ICLR 2022.

The text-to-image loop, started part way: `strength` picks how much of the schedule is run
(1 = all of it, 0.3 = the last 30%); the encoded image, noised to the first of those timesteps,
replaces the pure noise. examples/img2img_loop.py writes the same by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..noise import randn_tensor
from .base import ImagePipelineOutput
from .checks import FiniteWatch, callback_inputs
from .image_processing import ImageInput, preprocess_image
from .stable_diffusion import Generator, StableDiffusionPipeline, classifier_free_guidance, scheduler_step_kwargs


class StableDiffusionImg2ImgPipeline(StableDiffusionPipeline):
    """Image-to-image (SDEdit): noise the encoded image to a start step set by `strength`, denoise from there."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: ImageInput | None = None,
        strength: float = 0.8,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Generator = None,
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
        """diffusers' arguments (no IP-Adapter); `strict=False` warns instead of raising when the latents or
        the image turn NaN/Inf."""
        callback_on_step_end_tensor_inputs = callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        self.check_inputs(
            prompt,
            None,
            None,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            callback_on_step_end_tensor_inputs,
            strength,
            output_type,
            callback_on_step_end=callback_on_step_end,
        )
        self.check_settings(num_inference_steps, guidance_scale, num_images_per_prompt, eta, clip_skip, generator)
        self._begin_call(guidance_scale, 0.0, clip_skip, cross_attention_kwargs)
        if image is None:
            raise ValueError("img2img needs an `image`")
        image = preprocess_image(image, multiple=self.vae_scale_factor)  # [-1, 1] (or latents), checked
        device, watch = self.device, FiniteWatch(strict)

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
        # 2. the last `strength` of the timesteps (or of custom ones); the image's latents noised to the first
        timesteps, num_steps = self._strength_timesteps(num_inference_steps, strength, device, timesteps, sigmas)
        latents = self._noised_image_latents(image, timesteps[:1], n, prompt_embeds.dtype, generator)
        watch.see("vae.encode", latents)
        timestep_cond = self._guidance_embedding(n, latents.dtype)  # only for an LCM-distilled UNet
        # 3. the denoising loop
        step_kwargs = scheduler_step_kwargs(self.scheduler, eta, generator)
        for i, t in self._progress(timesteps, num_steps):
            if self.interrupt:  # a callback set pipe._interrupt: skip the remaining steps, as diffusers does
                continue
            guided = self.do_classifier_free_guidance  # a callback may switch it off (SDCFGCutoffCallback)
            model_input = torch.cat([latents] * 2) if guided else latents  # [unconditional; conditional]
            model_input = self.scheduler.scale_model_input(model_input, t)
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
                )
                latents, prompt_embeds, negative_prompt_embeds = out.values()
        # 4. latents -> pixels, once no NaN/Inf is found
        images = self._decode(latents, output_type, watch)
        self.maybe_free_model_hooks()  # with model offload: the last model back to the CPU, as diffusers
        return ImagePipelineOutput(images=images) if return_dict else (images, None)

    def _noised_image_latents(
        self, image: torch.Tensor, timestep: torch.Tensor, n: int, dtype: torch.dtype, generator: Generator
    ) -> torch.Tensor:
        """n latents of the image (or of its copies), noised to `timestep`. Generator order as
        diffusers: the VAE samples, then the noise."""
        self._check_generators(generator, n)
        image = image.to(device=self.device, dtype=dtype)
        if image.shape[1] == self.vae.config.latent_channels:  # given as latents already
            init = image
        else:
            if isinstance(generator, list) and image.shape[0] < n:
                image = self._repeat_to(image, n, "image")
            init = self._encode_image(image, generator)
        init = self._repeat_to(init, n, "image")
        noise = randn_tensor(tuple(init.shape), generator, self.device, dtype)
        return self.scheduler.add_noise(init, noise, timestep.repeat(n))
