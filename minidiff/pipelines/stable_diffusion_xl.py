"""Stable Diffusion XL text-to-image, step for step as diffusers.

Reference: Podell et al. "SDXL: Improving Latent Diffusion Models for High-Resolution Image Synthesis", 2023.

The loop is Stable Diffusion's (stable_diffusion.py); what SDXL adds is in the conditioning:
- Two text encoders: CLIP ViT-L (`text_encoder`) and OpenCLIP ViT-bigG (`text_encoder_2`). Each one's
  penultimate hidden state (768 and 1280 wide) is concatenated along channels into the 2048-wide
  cross-attention context; bigG's projected end-of-text state is the pooled embedding, a second,
  global conditioning. `prompt_2` goes to the second encoder (default: `prompt`).
- Micro-conditioning (sec. 2.2): six numbers per image, (original height, width, crop top, left,
  target height, width), the "time ids", embedded like timesteps and, with the pooled embedding,
  added to the UNet's timestep embedding (unet_2d_condition.py). Training images were small or
  cropped; asking for original_size = target_size = 1024² and no crop asks for a large, centred image.
- force_zeros_for_empty_prompt: with no negative prompt, the unconditional embeddings are zeros
  rather than the encoding of "" (the base model's setting; the refiner's is off).
- denoising_end: stop part way (at a fraction of the noise schedule) and hand the latents to the
  refiner, which starts there (stable_diffusion_xl_img2img.py, denoising_start).
- The VAE overflows in float16: with `force_upcast` in its config, a float16 VAE decodes in float32.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from .. import lora
from ..single_file import load_pipeline
from .base import DiffusionPipeline, ImagePipelineOutput
from .calling import Generator, scheduler_step_kwargs
from .checks import FiniteWatch, callback_inputs, check_clip_skip
from .checks_xl import as_fraction, check_fractions, check_pair, check_xl_prompts, timestep_cutoff
from .stable_diffusion import StableDiffusionPipeline

logger = logging.getLogger(__name__)

Size = tuple[int, int]


class StableDiffusionXLPipeline(StableDiffusionPipeline):
    """Text-to-image generation with SDXL (base, or any UNet with SDXL's text_time conditioning)."""

    component_names = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")
    optional_components = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")
    config_names = ("force_zeros_for_empty_prompt",)
    _callback_tensor_inputs = ["latents", "prompt_embeds", "add_text_embeds", "add_time_ids"]
    _guidance_batch_inputs = ("prompt_embeds", "add_text_embeds", "add_time_ids")

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
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
    ) -> None:
        if image_encoder is not None:
            logger.warning("minidiff does not run IP-Adapter image encoders; the one given is ignored")
        if add_watermarker:
            logger.warning("minidiff does not watermark images; add_watermarker is ignored")
        components = dict(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer)
        # StableDiffusionPipeline.__init__ takes SD's five components; DiffusionPipeline's takes any
        DiffusionPipeline.__init__(self, **components, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)

    @classmethod
    def from_single_file(cls, path, torch_dtype=None, **kwargs: Any):
        """Load an original SDXL single file (Stability's base or refiner .safetensors) offline; see
        minidiff.single_file.load_pipeline for the keywords."""
        return load_pipeline(cls, path, torch_dtype=torch_dtype, **kwargs)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
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
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' default, never mutated)
        strict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """diffusers' arguments (no IP-Adapter); `strict=False` warns instead of raising when the latents or
        the image turn NaN/Inf."""
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
            output_type=output_type,
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
            denoising_end=denoising_end,
            original_size=original_size,
            crops_coords_top_left=crops_coords_top_left,
            target_size=target_size,
            negative_original_size=negative_original_size,
            negative_crops_coords_top_left=negative_crops_coords_top_left,
            negative_target_size=negative_target_size,
        )
        self.check_settings(num_inference_steps, guidance_scale, num_images_per_prompt, eta, clip_skip, generator)
        self._begin_call(guidance_scale, guidance_rescale, clip_skip, cross_attention_kwargs)
        device, watch = self.device, FiniteWatch(strict)

        # 1. text -> both encoders' states (the context) and the pooled embedding; with guidance the negatives'
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
        # 2. micro-conditioning: (original size, crop corner, target size) per image, the negative's if given
        width_2 = self._pooled_width(pooled_prompt_embeds)
        add_time_ids = self._get_add_time_ids(
            original_size or (height, width), crops_coords_top_left, target_size or (height, width), width_2
        )
        negative_add_time_ids = add_time_ids
        if negative_original_size is not None and negative_target_size is not None:
            negative_add_time_ids = self._get_add_time_ids(
                negative_original_size, negative_crops_coords_top_left, negative_target_size, width_2
            )
        add_text_embeds = pooled_prompt_embeds
        if self.do_classifier_free_guidance:  # [unconditional; conditional], as the UNet batch
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
            add_text_embeds = torch.cat([negative_pooled_prompt_embeds, add_text_embeds])
            add_time_ids = torch.cat([negative_add_time_ids, add_time_ids])
        # diffusers repeats the (negative, positive) pair per image: with several images and negative sizes that
        # differ, rows alternate against the [negatives; positives] context. Kept, for diffusers' numbers.
        add_time_ids = add_time_ids.to(device=device, dtype=prompt_embeds.dtype).repeat(n, 1)
        watch.see("text_encoder", prompt_embeds)
        # 3. the timesteps (or custom ones, cut at denoising_end), then pure noise at the level of the first one
        timesteps, num_inference_steps = self._set_timesteps(num_inference_steps, device, timesteps, sigmas)
        timesteps, num_inference_steps = self._cut_at_end(timesteps, num_inference_steps, denoising_end)
        latents = self._prepare_noise(n, height, width, prompt_embeds.dtype, generator, latents)
        latents = latents * self.scheduler.init_noise_sigma
        timestep_cond = self._guidance_embedding(n, latents.dtype)  # only for an LCM-distilled UNet
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)
        # 4. the denoising loop
        step_kwargs = scheduler_step_kwargs(self.scheduler, eta, generator)
        for i, t in self._progress(timesteps, num_inference_steps):
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

    # -- the text: two encoders, one context ----------------------------------------------------------

    def _encoders(self) -> list[tuple[Any, Any]]:
        """(tokenizer, text encoder) pairs, in the order their states are concatenated; the refiner has only bigG."""
        pairs = [(self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)]
        return [(tok, enc) for tok, enc in pairs if enc is not None]

    def _run_encoder(
        self,
        tokenizer: Any,
        encoder: Any,
        text: list[str],
        max_length: int,
        layer: int,
        warn: bool,
        lora_scale: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden state `layer`, the pooled projection if this encoder has one) of `text`, padded to max_length."""
        text = self.maybe_convert_prompt(text, tokenizer)  # a multi-vector learned token -> its n tokens
        ids = tokenizer(text, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        ids = ids.input_ids
        if warn:
            full = tokenizer(text, padding="longest", return_tensors="pt").input_ids
            if full.shape[-1] >= ids.shape[-1] and not torch.equal(ids, full):
                dropped = tokenizer.batch_decode(full[:, tokenizer.model_max_length - 1 : -1])
                logger.warning(
                    f"The following part of your input was truncated because CLIP can only handle sequences up to "
                    f"{tokenizer.model_max_length} tokens: {dropped}"
                )
        with lora.lora_scale(encoder, lora_scale):  # the encoder's LoRA adapters, scaled
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
        pooled = out[0] if out[0].ndim == 2 else None  # text_embeds of a model with a projection
        return out.hidden_states[layer], pooled

    def _embed_pair(
        self, texts: list[list[str]], layer: int, max_length: int | None, warn: bool, lora_scale: float | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each encoder's state at `layer`, concatenated along channels, and the (first) pooled projection."""
        states, pooled = [], None
        for text, (tokenizer, encoder) in zip(texts, self._encoders()):  # the refiner: `texts[0]` to bigG
            length = max_length or tokenizer.model_max_length
            state, p = self._run_encoder(tokenizer, encoder, text, length, layer, warn, lora_scale)
            states.append(state)
            pooled = p if pooled is None else pooled
        return torch.cat(states, dim=-1), pooled

    def encode_prompt(  # type: ignore[override]
        self,
        prompt: str | list[str] | None,
        prompt_2: str | list[str] | None = None,
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """(context, negative context, pooled, negative pooled), one row per image, as diffusers' SDXL: the
        penultimate state of each encoder (`clip_skip` more layers back), no final LayerNorm."""
        device = device or self.device
        prompt = [prompt] if isinstance(prompt, str) else prompt
        batch = len(prompt) if prompt is not None else prompt_embeds.shape[0]
        zeros = negative_prompt is None and self.force_zeros_for_empty_prompt
        encode_negative = do_classifier_free_guidance and negative_prompt_embeds is None and not zeros
        if (prompt_embeds is None or encode_negative) and (self.text_encoder_2 is None or self.tokenizer_2 is None):
            raise ValueError(
                "this pipeline has no text_encoder_2 / tokenizer_2: pass prompt_embeds, pooled_prompt_embeds and "
                "(with guidance) the negative ones"
            )
        if prompt_embeds is None:
            prompt_2 = prompt_2 or prompt
            prompt_2 = [prompt_2] if isinstance(prompt_2, str) else prompt_2
            layer = -(clip_skip + 2) if clip_skip is not None else -2  # SDXL counts from the penultimate layer
            prompt_embeds, pooled = self._embed_pair([prompt, prompt_2], layer, None, True, lora_scale)
            pooled_prompt_embeds = pooled if pooled_prompt_embeds is None else pooled_prompt_embeds

        if do_classifier_free_guidance and negative_prompt_embeds is None and zeros:
            if negative_prompt_2 is not None:
                logger.warning("negative_prompt_2 is ignored without negative_prompt when force_zeros_for_empty_prompt")
            negative_prompt_embeds = torch.zeros_like(prompt_embeds)
            negative_pooled_prompt_embeds = torch.zeros_like(pooled_prompt_embeds)
        elif encode_negative:
            negative_prompt = negative_prompt or ""
            negative_prompt_2 = negative_prompt_2 or negative_prompt
            uncond = [[p] * batch if isinstance(p, str) else p for p in (negative_prompt, negative_prompt_2)]
            for name, texts in zip(("negative_prompt", "negative_prompt_2"), uncond):
                if len(texts) != batch:
                    raise ValueError(
                        f"`{name}` has {len(texts)} entries but there are {batch} prompts: give one per prompt"
                    )
            # the negatives never take clip_skip, and are padded to the prompt's length, as in diffusers
            negative_prompt_embeds, negative_pooled = self._embed_pair(
                uncond, -2, prompt_embeds.shape[1], False, lora_scale
            )
            if negative_pooled_prompt_embeds is None:
                negative_pooled_prompt_embeds = negative_pooled

        dtype = self.text_encoder_2.dtype if self.text_encoder_2 is not None else self.unet.dtype

        def per_image(x: torch.Tensor) -> torch.Tensor:
            return x.to(dtype=dtype, device=device).repeat_interleave(num_images_per_prompt, dim=0)

        prompt_embeds, pooled_prompt_embeds = per_image(prompt_embeds), per_image(pooled_prompt_embeds)
        if do_classifier_free_guidance:
            negative_prompt_embeds = per_image(negative_prompt_embeds)
            negative_pooled_prompt_embeds = per_image(negative_pooled_prompt_embeds)
        return prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds

    # -- micro-conditioning, the schedule's end, the VAE ----------------------------------------------

    def _pooled_width(self, pooled: torch.Tensor) -> int:
        """The pooled embedding's width as diffusers counts it: text_encoder_2's projection_dim, else the tensor's."""
        return self.text_encoder_2.config.projection_dim if self.text_encoder_2 is not None else int(pooled.shape[-1])

    def _check_time_ids_width(self, count: int, pooled_width: int, hint: str = "") -> None:
        """The UNet's added-embedding MLP reads pooled width + count * addition_time_embed_dim numbers."""
        c = self.unet.config
        if c.addition_embed_type != "text_time":
            raise ValueError(
                f"{type(self).__name__} needs a UNet with SDXL's added conditioning (addition_embed_type='text_time'); "
                f"this one has addition_embed_type={c.addition_embed_type!r}"
            )
        passed = c.addition_time_embed_dim * count + pooled_width
        if passed != c.projection_class_embeddings_input_dim:
            raise ValueError(
                f"the UNet's added embedding takes {c.projection_class_embeddings_input_dim} numbers (its "
                f"projection_class_embeddings_input_dim), but {count} time ids x addition_time_embed_dim "
                f"{c.addition_time_embed_dim} + pooled width {pooled_width} = {passed}" + hint
            )

    def _get_add_time_ids(
        self, original_size: Size, crops_coords_top_left: Size, target_size: Size, pooled_width: int
    ) -> torch.Tensor:
        """(1, 6) float32: original height, width, crop top, left, target height, width."""
        ids = [*original_size, *crops_coords_top_left, *target_size]
        self._check_time_ids_width(len(ids), pooled_width)
        return torch.tensor([ids], dtype=torch.float32)

    def _cut_at_end(
        self, timesteps: torch.Tensor, num_steps: int, denoising_end: float | None
    ) -> tuple[torch.Tensor, int]:
        """With denoising_end in (0, 1): only the timesteps at or above the cutoff (the rest is the refiner's)."""
        if as_fraction(denoising_end) is None:
            return timesteps, num_steps
        cutoff = timestep_cutoff(self.scheduler, denoising_end)
        num_steps = int((timesteps >= cutoff).sum())
        if num_steps < 1:
            raise ValueError(f"denoising_end={denoising_end} leaves no denoising step before timestep {cutoff}")
        return timesteps[:num_steps], num_steps

    def _vae_upcast(self) -> bool:
        """diffusers runs a float16 VAE in float32 when its config says force_upcast (SDXL's VAE overflows)."""
        if self.vae.config.latents_mean is not None or self.vae.config.latents_std is not None:
            raise NotImplementedError("a VAE with latents_mean / latents_std is not supported by minidiff's SDXL")
        return self.vae.dtype == torch.float16 and bool(self.vae.config.force_upcast)

    def _decode(self, latents: torch.Tensor, output_type: str, watch: FiniteWatch | None = None) -> Any:
        """StableDiffusionPipeline's decode, with the VAE in float32 for it when _vae_upcast says so."""
        if output_type == "latent" or not self._vae_upcast():
            return super()._decode(latents, output_type, watch)
        self.vae.to(torch.float32)
        try:
            return super()._decode(latents.float(), output_type, watch)
        finally:
            self.vae.to(torch.float16)

    def _encode_image(self, image: torch.Tensor, generator: Generator) -> torch.Tensor:
        """The VAE latents of an image in its dtype, encoded in float32 when the VAE asks (as _decode)."""
        dtype = image.dtype
        if not self._vae_upcast():
            return super()._encode_image(image, generator)
        self.vae.to(torch.float32)
        try:
            return super()._encode_image(image.float(), generator).to(dtype)
        finally:
            self.vae.to(torch.float16)

    # -- inputs -----------------------------------------------------------------------------------------

    def check_xl_inputs(
        self,
        prompt: Any,
        prompt_2: Any,
        negative_prompt_2: Any,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        pooled_prompt_embeds: torch.Tensor | None,
        negative_pooled_prompt_embeds: torch.Tensor | None,
        clip_skip: int | None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        **sizes: Any,
    ) -> None:
        """What SDXL adds to check_inputs (checks_xl.py), before any model runs; `sizes` the micro-conditioning."""
        projection = self.text_encoder_2.config.projection_dim if self.text_encoder_2 is not None else None
        check_xl_prompts(
            prompt,
            prompt_2,
            negative_prompt_2,
            prompt_embeds,
            negative_prompt_embeds,
            pooled_prompt_embeds,
            negative_pooled_prompt_embeds,
            projection,
        )
        check_clip_skip(clip_skip, self.text_encoder_2)
        check_fractions(denoising_start, denoising_end)
        for name, value in sizes.items():
            check_pair(name, value)
