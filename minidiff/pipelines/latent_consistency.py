"""Latent consistency models: text-to-image in 1-8 steps with an LCM-distilled UNet, step for step as diffusers.

An LCM is distilled from a guided Stable Diffusion teacher [1, Algorithm 1]: the guidance scale is
an input of the network (embedded like a timestep and added into its time embedding) instead of a
second, unconditional UNet pass. The loop therefore runs the UNet once per step, on the prompt
alone (LCMs take no negative prompt), and LCMScheduler maps each prediction to x̂_0 and re-noises it
to the next timestep; the image is decoded from the last x̂_0.

diffusers' guidance scale is the CFG scale of StableDiffusionPipeline; the LCM paper's w is that
minus one (w = 0 means no guidance), and w is what the UNet embeds.

References:
1. Luo et al., "Latent Consistency Models: Synthesizing High-Resolution Images with Few-Step Inference", 2023.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .base import ImagePipelineOutput
from .calling import guidance_scale_embedding
from .checks import FiniteWatch, callback_inputs
from .stable_diffusion import Generator, StableDiffusionPipeline


class LatentConsistencyModelPipeline(StableDiffusionPipeline):
    """Few-step text-to-image generation with a latent consistency model (Luo et al., 2023)."""

    _callback_tensor_inputs = ["latents", "denoised", "prompt_embeds", "w_embedding"]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 4,
        original_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        guidance_scale: float = 8.5,
        num_images_per_prompt: int = 1,
        generator: Generator = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' default, never mutated)
        strict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """`original_inference_steps`: the distillation schedule the steps are picked from (the scheduler's
        config by default); `timesteps`: custom ones instead of `num_inference_steps`."""
        callback_on_step_end_tensor_inputs = callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        height, width = self._default_size(height, width)
        self.check_inputs(
            prompt,
            height,
            width,
            None,
            prompt_embeds,
            None,
            callback_on_step_end_tensor_inputs,
            output_type=output_type,
            latents=latents,
            callback_on_step_end=callback_on_step_end,
        )
        self.check_settings(num_inference_steps, guidance_scale, num_images_per_prompt, 0.0, clip_skip, generator)
        cond_dim = self.unet.config.time_cond_proj_dim
        if cond_dim is None:
            raise ValueError(
                "LatentConsistencyModelPipeline needs an LCM-distilled UNet (one with time_cond_proj_dim, for the "
                "guidance-scale embedding); for an LCM-LoRA use StableDiffusionPipeline with LCMScheduler"
            )
        self._begin_call(guidance_scale, 0.0, clip_skip, cross_attention_kwargs)
        device, watch = self.device, FiniteWatch(strict)

        # 1. text -> CLIP embeddings, one row per image (no unconditional pass: the UNet embeds the guidance)
        prompt_embeds, _ = self.encode_prompt(
            prompt, device, num_images_per_prompt, False, None, prompt_embeds, lora_scale=self._lora_scale
        )
        watch.see("text_encoder", prompt_embeds)
        # 2. the timesteps (picked from the distillation schedule), then pure noise
        timesteps, num_inference_steps = self._set_timesteps(
            num_inference_steps, device, timesteps, original_inference_steps=original_inference_steps
        )
        n = len(prompt_embeds)
        latents = self._prepare_noise(n, height, width, prompt_embeds.dtype, generator, latents)
        latents = latents * self.scheduler.init_noise_sigma
        # 3. the guidance scale as the UNet sees it: w = guidance_scale - 1, embedded
        w_embedding = guidance_scale_embedding(torch.full((n,), guidance_scale - 1.0), cond_dim)
        w_embedding = w_embedding.to(device=device, dtype=latents.dtype)
        # 4. the consistency loop: x_t -> x̂_0 (denoised) -> re-noised to the next t
        denoised = latents
        for i, t in self._progress(timesteps, num_inference_steps):
            latents = latents.to(prompt_embeds.dtype)
            model_pred = self.unet(
                latents,
                t,
                encoder_hidden_states=prompt_embeds,
                timestep_cond=w_embedding,
                cross_attention_kwargs=self._unet_attention_kwargs,
            ).sample
            watch.see("unet", model_pred, i, t)
            latents, denoised = self.scheduler.step(model_pred, t, latents, generator=generator, return_dict=False)
            watch.see("scheduler.step", latents, i, t)
            if callback_on_step_end is not None:
                out = self._step_end(
                    callback_on_step_end,
                    callback_on_step_end_tensor_inputs,
                    i,
                    t,
                    watch,
                    latents=latents,
                    denoised=denoised,
                    prompt_embeds=prompt_embeds,
                    w_embedding=w_embedding,
                )
                latents, denoised, prompt_embeds, w_embedding = out.values()
        # 5. the last x̂_0 -> pixels
        images = self._decode(denoised.to(prompt_embeds.dtype), output_type, watch)
        self.maybe_free_model_hooks()  # with model offload: the last model back to the CPU, as diffusers
        return ImagePipelineOutput(images=images) if return_dict else (images, None)
