"""Stable Diffusion XL image-to-image, and the refiner, step for step as diffusers.

The SDXL refiner is a second UNet trained on the low-noise end of the schedule [1, sec. 2.5]; it
runs as image-to-image. Two ways to use it:
- SDEdit, as StableDiffusionImg2ImgPipeline: `strength` picks how much of the schedule is run on the
  noised image (diffusers' default 0.3 for polishing a finished image).
- "Ensemble of experts": the base model denoises from pure noise down to a fraction of the schedule
  (`denoising_end=0.8`, output_type="latent"), and the refiner takes those latents and runs the rest
  (`denoising_start=0.8`): no noise is added, `strength` is ignored.

The refiner's micro-conditioning swaps the target size for an aesthetic score (`requires_aesthetics_score`):
(original height, width, crop top, left, score), with 6.0 for the image and 2.5 for the negative.

Reference:
1. Podell et al. "SDXL: Improving Latent Diffusion Models for High-Resolution Image Synthesis", 2023.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..noise import randn_tensor
from .base import ImagePipelineOutput
from .calling import Generator, scheduler_step_kwargs
from .checks import FiniteWatch, callback_inputs, check_real
from .checks_xl import as_fraction, timestep_cutoff
from .image_processing import ImageInput, preprocess_image
from .stable_diffusion_xl import Size, StableDiffusionXLPipeline


class StableDiffusionXLImg2ImgPipeline(StableDiffusionXLPipeline):
    """SDXL image-to-image: SDEdit with `strength`, or the refiner's half of the base + refiner recipe."""

    config_names = ("force_zeros_for_empty_prompt", "requires_aesthetics_score")

    def __init__(
        self,
        vae,
        text_encoder,
        text_encoder_2,
        tokenizer,
        tokenizer_2,
        unet,
        scheduler,
        image_encoder=None,
        feature_extractor=None,
        requires_aesthetics_score: bool = False,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
    ) -> None:
        super().__init__(
            vae,
            text_encoder,
            text_encoder_2,
            tokenizer,
            tokenizer_2,
            unet,
            scheduler,
            image_encoder,
            feature_extractor,
            force_zeros_for_empty_prompt,
            add_watermarker,
        )
        self.requires_aesthetics_score = bool(requires_aesthetics_score)

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image: ImageInput | None = None,
        strength: float = 0.3,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
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
        """`image` in pixels, or latents (the base's output_type="latent"); `latents` replaces the noised
        image; `strict=False` warns instead of raising when the latents or the image turn NaN/Inf."""
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
        if image is None:
            raise ValueError("img2img needs an `image` (pixels, or the base pipeline's latents)")
        image = preprocess_image(image, multiple=self.vae_scale_factor)  # [-1, 1] (or latents), checked
        self._begin_call(guidance_scale, guidance_rescale, clip_skip, cross_attention_kwargs)
        device, watch = self.device, FiniteWatch(strict)

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
        n = len(prompt_embeds)
        # 2. the timesteps from denoising_start (or the last `strength` of them); the image's latents, noised to
        # the first of them unless the base left them there
        timesteps, num_steps = self._start_timesteps(
            num_inference_steps, strength, device, timesteps, sigmas, denoising_start
        )
        add_noise = as_fraction(denoising_start) is None
        if latents is None:
            latents = self._image_latents(image, timesteps[:1], n, prompt_embeds.dtype, generator, add_noise)
            watch.see("vae.encode", latents)
        latents = latents.to(device)
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
        add_time_ids = add_time_ids.to(device=device, dtype=prompt_embeds.dtype)
        watch.see("text_encoder", prompt_embeds)
        timesteps, num_steps = self._cut_at_end(timesteps, num_steps, denoising_end)
        timestep_cond = self._guidance_embedding(n, latents.dtype)  # only for an LCM-distilled UNet
        # 4. the denoising loop
        step_kwargs = scheduler_step_kwargs(self.scheduler, eta, generator)
        for i, t in self._progress(timesteps, num_steps):
            if self.interrupt:  # a callback set pipe._interrupt: skip the remaining steps, as diffusers does
                continue
            guided = self.do_classifier_free_guidance  # a callback may switch it off
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
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
                )
                latents, prompt_embeds, add_text_embeds, add_time_ids = out.values()
        # 5. latents -> pixels (the VAE in float32 if it asks), once no NaN/Inf is found
        images = self._decode(latents, output_type, watch)
        self.maybe_free_model_hooks()  # with model offload: the last model back to the CPU, as diffusers
        return ImagePipelineOutput(images=images) if return_dict else (images, None)

    # -- the steps of __call__, shared with SDXL inpainting -------------------------------------------

    def _start_timesteps(
        self,
        num_inference_steps: int,
        strength: float,
        device: torch.device,
        timesteps: list[int] | None,
        sigmas: list[float] | None,
        denoising_start: float | None,
    ) -> tuple[torch.Tensor, int]:
        """The timesteps below denoising_start's cutoff (the base ran the ones above), or without it the last
        `strength` of the schedule; and their step count."""
        if as_fraction(denoising_start) is None:
            return self._strength_timesteps(num_inference_steps, strength, device, timesteps, sigmas)
        all_timesteps, _ = self._set_timesteps(num_inference_steps, device, timesteps, sigmas)
        steps = int((all_timesteps < timestep_cutoff(self.scheduler, denoising_start)).sum())
        if self.scheduler.order == 2 and steps % 2 == 0:
            steps += 1  # a 2nd-order scheduler repeats timesteps: do not start between a step's two halves
        if steps < 1:
            raise ValueError(
                f"denoising_start={denoising_start} with num_inference_steps={num_inference_steps} leaves no "
                f"denoising step; lower denoising_start or raise num_inference_steps"
            )
        start = len(all_timesteps) - steps
        if hasattr(self.scheduler, "set_begin_index"):  # σ-schedulers count their steps from here
            self.scheduler.set_begin_index(start)
        return all_timesteps[start:], steps

    def _image_latents(
        self,
        image: torch.Tensor,
        timestep: torch.Tensor,
        n: int,
        dtype: torch.dtype,
        generator: Generator,
        add_noise: bool,
    ) -> torch.Tensor:
        """n latents of the image (encoded, or given as latents), noised to `timestep` unless add_noise is off.
        Generator order as diffusers: the VAE samples, then the noise."""
        self._check_generators(generator, n)
        image = image.to(device=self.device, dtype=dtype)
        if image.shape[1] == self.vae.config.latent_channels:  # the base pipeline's latents
            init = image
        else:
            if isinstance(generator, list) and image.shape[0] < n:
                image = self._repeat_to(image, n, "image")
            init = self._encode_image(image, generator)
        init = self._repeat_to(init, n, "image")
        if not add_noise:
            return init
        noise = randn_tensor(tuple(init.shape), generator, self.device, dtype)
        return self.scheduler.add_noise(init, noise, timestep.repeat(n))

    def _get_add_time_ids_img2img(
        self,
        original_size: Size,
        crops_coords_top_left: Size,
        target_size: Size,
        aesthetic_score: float,
        negative_aesthetic_score: float,
        negative_original_size: Size,
        negative_crops_coords_top_left: Size,
        negative_target_size: Size,
        pooled_width: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, K) time ids for the image and for the negative: with requires_aesthetics_score (the refiner)
        original size, crop corner and score (K = 5), else the base's six numbers. As diffusers, the
        negative's crop corner is used only with the aesthetic score."""
        if self.requires_aesthetics_score:
            ids = [*original_size, *crops_coords_top_left, aesthetic_score]
            negative = [*negative_original_size, *negative_crops_coords_top_left, negative_aesthetic_score]
        else:
            ids = [*original_size, *crops_coords_top_left, *target_size]
            negative = [*negative_original_size, *crops_coords_top_left, *negative_target_size]
        dim = self.unet.config.addition_time_embed_dim or 0
        off_by_one = abs(dim * len(ids) + pooled_width - (self.unet.config.projection_class_embeddings_input_dim or 0))
        hint = ""
        if dim and off_by_one == dim:  # one number too many or too few: the other kind of SDXL UNet
            hint = (
                ": this UNet takes a target size, not an aesthetic score; pass requires_aesthetics_score=False"
                if self.requires_aesthetics_score
                else ": this UNet takes an aesthetic score (the refiner's); pass requires_aesthetics_score=True"
            )
        self._check_time_ids_width(len(ids), pooled_width, hint)
        return torch.tensor([ids], dtype=torch.float32), torch.tensor([negative], dtype=torch.float32)
