"""Stable Diffusion: text-to-image, image-to-image and inpainting, step for step as diffusers.

References:
1. Rombach et al. "High-Resolution Image Synthesis with Latent Diffusion Models", CVPR 2022.
2. Ho, Salimans. "Classifier-Free Diffusion Guidance", 2022.
3. Meng et al. "SDEdit: Guided Image Synthesis and Editing with Stochastic Differential Equations", 2022 (img2img).

The loop: encode the prompt (and an empty or negative prompt) with CLIP; start from noise (or
from the encoded image noised to the start step); at each timestep run the UNet on the
unconditional and conditional halves in one batch, mix them with the guidance scale, and let the
scheduler take a step; decode the final latents with the VAE. The random generator is consumed in
diffusers' order (VAE sample of the init image, then the latent noise, then per-step noise), so a
seed gives diffusers' image.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..noise import randn_tensor
from .base import DiffusionPipeline, ImagePipelineOutput
from .image_processing import ImageInput, postprocess_image, preprocess_image

logger = logging.getLogger(__name__)

Generator = torch.Generator | list[torch.Generator] | None


def _batch_size(prompt: str | list[str] | None, prompt_embeds: torch.Tensor | None) -> int:
    """How many prompts: one string, a list, or the rows of pre-computed embeddings."""
    if prompt is not None:
        return 1 if isinstance(prompt, str) else len(prompt)
    return prompt_embeds.shape[0]


class StableDiffusionPipeline(DiffusionPipeline):
    """Text-to-image generation with Stable Diffusion 1.x / 2.x."""

    component_names = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")

    def __init__(
        self,
        vae,
        text_encoder,
        tokenizer,
        unet,
        scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker: bool = False,
    ) -> None:
        if safety_checker is not None:
            logger.warning("minidiff does not run safety checkers; the one given is ignored")
        super().__init__(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)

    @classmethod
    def from_single_file(
        cls,
        path,
        prediction_type: str | None = None,
        tokenizer=None,
        torch_dtype=None,
        use_ema: bool | None = None,
        **components: Any,
    ):
        """Load an original CompVis / LDM single file (.safetensors or .ckpt, SD 1.x / 2.x) offline:
        configs inferred from the weights, the prediction type by the rule in minidiff.single_file
        (`prediction_type=` overrides it), `tokenizer` a folder (default: the CLIP vocabulary shipped
        with minidiff), `use_ema=False` for the raw UNet weights of a file with an EMA copy."""
        from ..single_file import load_pipeline

        return load_pipeline(
            cls,
            path,
            prediction_type=prediction_type,
            tokenizer=tokenizer,
            torch_dtype=torch_dtype,
            use_ema=use_ema,
            **components,
        )

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # -- text ------------------------------------------------------------------------------------

    def _embed(self, prompt: list[str], clip_skip: int | None) -> torch.Tensor:
        tok = self.tokenizer
        ids = tok(
            prompt, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        full = tok(prompt, padding="longest", return_tensors="pt").input_ids
        if full.shape[-1] >= ids.shape[-1] and not torch.equal(ids, full):
            dropped = tok.batch_decode(full[:, tok.model_max_length - 1 : -1])
            logger.warning(
                f"The following part of your input was truncated because CLIP can only handle sequences up to "
                f"{tok.model_max_length} tokens: {dropped}"
            )
        ids = ids.to(self.text_encoder.device)
        if clip_skip is None:
            return self.text_encoder(ids)[0]
        # the state `clip_skip` layers before the last, through the final layer norm as diffusers does
        hidden = self.text_encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
        return self.text_encoder.final_layer_norm(hidden)

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        clip_skip: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B * num_images_per_prompt, 77, D) conditional and (if guided) unconditional embeddings."""
        batch = _batch_size(prompt, prompt_embeds)
        if prompt_embeds is None:
            prompt_embeds = self._embed([prompt] if isinstance(prompt, str) else prompt, clip_skip)
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.unet.dtype
        prompt_embeds = prompt_embeds.to(dtype=dtype, device=device).repeat_interleave(num_images_per_prompt, dim=0)

        if do_classifier_free_guidance and negative_prompt_embeds is None:
            if negative_prompt is None:
                uncond = [""] * batch
            elif prompt is not None and type(prompt) is not type(negative_prompt):
                raise TypeError(
                    f"`negative_prompt` must have the same type as `prompt`, got {type(negative_prompt).__name__} "
                    f"and {type(prompt).__name__}"
                )
            elif isinstance(negative_prompt, str):
                uncond = [negative_prompt]
            elif len(negative_prompt) != batch:
                raise ValueError(
                    f"`negative_prompt` has {len(negative_prompt)} entries but `prompt` has {batch}: "
                    f"give one negative prompt per prompt"
                )
            else:
                uncond = negative_prompt
            # the unconditional embedding never takes clip_skip, as in diffusers
            negative_prompt_embeds = self._embed(uncond, None)
        if do_classifier_free_guidance:
            negative_prompt_embeds = negative_prompt_embeds.to(dtype=dtype, device=device)
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        return prompt_embeds, negative_prompt_embeds

    # -- checks ----------------------------------------------------------------------------------

    def check_inputs(
        self,
        prompt,
        height,
        width,
        negative_prompt,
        prompt_embeds,
        negative_prompt_embeds,
        callback_on_step_end_tensor_inputs,
        strength: float | None = None,
    ) -> None:
        if strength is not None and not 0.0 <= strength <= 1.0:
            raise ValueError(f"`strength` must be in [0.0, 1.0], got {strength}")
        if height is not None and (height % self.vae_scale_factor or width % self.vae_scale_factor):
            raise ValueError(
                f"`height` and `width` must be divisible by {self.vae_scale_factor}, got {height} and {width}"
            )
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("give either `prompt` or `prompt_embeds`, not both")
        if prompt is None and prompt_embeds is None:
            raise ValueError("give `prompt` or `prompt_embeds`")
        if prompt is not None and not (
            isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt))
        ):
            raise TypeError(f"`prompt` must be a str or a list of str, got {type(prompt).__name__}")
        if isinstance(prompt, list) and not prompt:
            raise ValueError("`prompt` is an empty list")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("give either `negative_prompt` or `negative_prompt_embeds`, not both")
        if negative_prompt is not None and not (
            isinstance(negative_prompt, str)
            or (isinstance(negative_prompt, list) and all(isinstance(p, str) for p in negative_prompt))
        ):
            raise TypeError(f"`negative_prompt` must be a str or a list of str, got {type(negative_prompt).__name__}")
        if (
            prompt_embeds is not None
            and negative_prompt_embeds is not None
            and prompt_embeds.shape != negative_prompt_embeds.shape
        ):
            raise ValueError(
                f"`prompt_embeds` {tuple(prompt_embeds.shape)} and `negative_prompt_embeds` "
                f"{tuple(negative_prompt_embeds.shape)} must have the same shape"
            )
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` may name {self._callback_tensor_inputs}, not {unknown}"
            )

    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def _step_kwargs(self, generator: Generator, eta: float) -> dict[str, Any]:
        """Pass `eta` / `generator` only to schedulers whose step() takes them (DDIM / stochastic ones)."""
        params = inspect.signature(self.scheduler.step).parameters
        kwargs: dict[str, Any] = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    @staticmethod
    def _check_generators(generator: Generator, batch: int) -> None:
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(
                f"got a list of {len(generator)} generators for an effective batch of {batch} "
                f"(prompts x num_images_per_prompt): pass exactly one per image"
            )

    # -- the loop --------------------------------------------------------------------------------

    def _denoise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        num_inference_steps: int,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
        guidance_scale: float,
        step_kwargs: dict[str, Any],
        callback_on_step_end: Callable | None,
        callback_inputs: list[str],
        extra_channels: torch.Tensor | None = None,
        after_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        guided = negative_prompt_embeds is not None
        context = torch.cat([negative_prompt_embeds, prompt_embeds]) if guided else prompt_embeds
        order = getattr(self.scheduler, "order", 1)
        warmup = len(timesteps) - num_inference_steps * order
        with self.progress_bar(total=num_inference_steps) as bar:
            for i, t in enumerate(timesteps):
                x = torch.cat([latents] * 2) if guided else latents
                x = self.scheduler.scale_model_input(x, t)
                if extra_channels is not None:  # inpainting UNet: + mask + masked-image latents
                    x = torch.cat([x, extra_channels], dim=1)
                noise_pred = self.unet(x, t, encoder_hidden_states=context, return_dict=False)[0]
                if guided:
                    uncond, cond = noise_pred.chunk(2)
                    noise_pred = uncond + guidance_scale * (cond - uncond)
                latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
                if after_step is not None:
                    latents = after_step(i, latents)
                if callback_on_step_end is not None:
                    values = {
                        "latents": latents,
                        "prompt_embeds": prompt_embeds,
                        "negative_prompt_embeds": negative_prompt_embeds,
                    }
                    out = callback_on_step_end(self, i, t, {k: values[k] for k in callback_inputs}) or {}
                    latents = out.pop("latents", latents)
                    prompt_embeds = out.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = out.pop("negative_prompt_embeds", negative_prompt_embeds)
                    context = torch.cat([negative_prompt_embeds, prompt_embeds]) if guided else prompt_embeds
                if i == len(timesteps) - 1 or (i + 1 > warmup and (i + 1) % order == 0):
                    bar.update()
        return latents

    def _decode(self, latents: torch.Tensor, output_type: str) -> Any:
        if output_type == "latent":
            return latents
        image = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return postprocess_image(image, output_type)

    def _encode_image(self, image: torch.Tensor, generator: Generator) -> torch.Tensor:
        """VAE latents of an image, sampled with the generator(s), times the scaling factor."""
        if isinstance(generator, list):
            latents = torch.cat(
                [self.vae.encode(image[i : i + 1]).latent_dist.sample(generator[i]) for i in range(image.shape[0])]
            )
        else:
            latents = self.vae.encode(image).latent_dist.sample(generator)
        return self.vae.config.scaling_factor * latents

    def _default_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else size
        return height or h * self.vae_scale_factor, width or w * self.vae_scale_factor

    @staticmethod
    def _check_output_type(output_type: str) -> None:
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")

    def _set_timesteps(self, num_inference_steps: int, device: torch.device) -> torch.Tensor:
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        return self.scheduler.timesteps

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
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
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' default, never mutated)
    ) -> ImagePipelineOutput | tuple:
        height, width = self._default_size(height, width)
        self.check_inputs(
            prompt,
            height,
            width,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            callback_on_step_end_tensor_inputs,
        )
        self._check_output_type(output_type)
        device = self.device
        guided = guidance_scale > 1.0
        batch = _batch_size(prompt, prompt_embeds)
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            guided,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            clip_skip,
        )
        timesteps = self._set_timesteps(num_inference_steps, device)

        n = batch * num_images_per_prompt
        self._check_generators(generator, n)
        shape = (n, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator, device, prompt_embeds.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"`latents` has shape {tuple(latents.shape)}, expected {shape}")
        latents = latents.to(device) * self.scheduler.init_noise_sigma

        latents = self._denoise(
            latents,
            timesteps,
            num_inference_steps,
            prompt_embeds,
            negative_prompt_embeds,
            guidance_scale,
            self._step_kwargs(generator, eta),
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        )
        images = self._decode(latents, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images, None)


class StableDiffusionImg2ImgPipeline(StableDiffusionPipeline):
    """Image-to-image (SDEdit): noise the encoded image to a start step set by `strength`, denoise from there."""

    def _start(self, num_inference_steps: int, strength: float, device: torch.device) -> tuple[torch.Tensor, int]:
        """The tail of the schedule that `strength` keeps: strength 1 = all steps, 0.3 = the last 30%."""
        timesteps = self._set_timesteps(num_inference_steps, device)
        init = min(int(num_inference_steps * strength), num_inference_steps)
        start = max(num_inference_steps - init, 0)
        order = getattr(self.scheduler, "order", 1)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start * order)
        steps = num_inference_steps - start
        if steps < 1:
            raise ValueError(
                f"strength={strength} with num_inference_steps={num_inference_steps} leaves no denoising "
                f"step; raise one of them"
            )
        return timesteps[start * order :], steps

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: ImageInput | None = None,
        strength: float = 0.8,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Generator = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006
    ) -> ImagePipelineOutput | tuple:
        self.check_inputs(
            prompt,
            None,
            None,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            callback_on_step_end_tensor_inputs,
            strength,
        )
        self._check_output_type(output_type)
        if image is None:
            raise ValueError("img2img needs an `image`")
        device = self.device
        guided = guidance_scale > 1.0
        batch = _batch_size(prompt, prompt_embeds)
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            guided,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            clip_skip,
        )
        image = preprocess_image(image, multiple=self.vae_scale_factor)
        timesteps, steps = self._start(num_inference_steps, strength, device)

        n = batch * num_images_per_prompt
        self._check_generators(generator, n)
        image = image.to(device=device, dtype=prompt_embeds.dtype)
        if image.shape[1] == self.vae.config.latent_channels:
            init = image
        else:
            if isinstance(generator, list) and image.shape[0] < n:
                image = self._repeat_to(image, n, "image")
            init = self._encode_image(image, generator)
        init = self._repeat_to(init, n, "image")
        noise = randn_tensor(tuple(init.shape), generator, device, prompt_embeds.dtype)
        latents = self.scheduler.add_noise(init, noise, timesteps[:1].repeat(n))

        latents = self._denoise(
            latents,
            timesteps,
            steps,
            prompt_embeds,
            negative_prompt_embeds,
            guidance_scale,
            self._step_kwargs(generator, eta),
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        )
        images = self._decode(latents, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images, None)

    @staticmethod
    def _repeat_to(x: torch.Tensor, n: int, what: str) -> torch.Tensor:
        if x.shape[0] == n:
            return x
        if n % x.shape[0]:
            raise ValueError(f"cannot spread {x.shape[0]} `{what}` entries over a batch of {n}")
        return x.repeat(n // x.shape[0], 1, 1, 1)


class StableDiffusionInpaintPipeline(StableDiffusionImg2ImgPipeline):
    """Inpainting: regenerate where `mask_image` is white, keep the rest.

    A 9-channel inpainting UNet sees the mask and the masked image's latents as extra input
    channels; a plain 4-channel UNet is used by pasting the re-noised original back outside the mask
    after every step.
    """

    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

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
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006
    ) -> ImagePipelineOutput | tuple:
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
        )
        self._check_output_type(output_type)
        if image is None or mask_image is None:
            raise ValueError("inpainting needs both `image` and `mask_image`")
        unet_channels = self.unet.config.in_channels
        latent_channels = self.vae.config.latent_channels
        if unet_channels not in (latent_channels, 2 * latent_channels + 1):
            raise ValueError(
                f"an inpainting UNet has {latent_channels} or {2 * latent_channels + 1} input channels, "
                f"this one has {unet_channels}"
            )
        device = self.device
        guided = guidance_scale > 1.0
        batch = _batch_size(prompt, prompt_embeds)
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            guided,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            clip_skip,
        )
        timesteps, steps = self._start(num_inference_steps, strength, device)
        n = batch * num_images_per_prompt
        self._check_generators(generator, n)
        dtype = prompt_embeds.dtype
        full_strength = strength == 1.0

        init_image = preprocess_image(image, height, width, self.vae_scale_factor)
        if init_image.shape[1] == latent_channels:
            raise ValueError("inpainting needs the `image` in pixels, not latents")
        init_image = init_image.to(device=device, dtype=dtype)
        plain_unet = unet_channels == latent_channels
        # generator order as diffusers: image latents (if needed), noise, then the masked image's latents
        image_latents = None
        if plain_unet or (latents is None and not full_strength):
            image_latents = self._encode_image(init_image, generator)
            image_latents = image_latents.repeat(n // image_latents.shape[0], 1, 1, 1)
        shape = (n, latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            noise = randn_tensor(shape, generator, device, dtype)
            latents = (
                noise * self.scheduler.init_noise_sigma
                if full_strength
                else self.scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(n))
            )
        else:
            noise = latents.to(device)
            latents = noise * self.scheduler.init_noise_sigma

        mask = preprocess_image(mask_image, height, width, self.vae_scale_factor, mask=True)
        masked_image = init_image * (mask.to(device, dtype) < 0.5)
        mask = F.interpolate(mask, size=(height // self.vae_scale_factor, width // self.vae_scale_factor)).to(
            device, dtype
        )
        masked_latents = self._encode_image(masked_image, generator)
        mask = self._repeat_to(mask, n, "mask_image")
        masked_latents = self._repeat_to(masked_latents, n, "image")

        def paste_back(i: int, x: torch.Tensor) -> torch.Tensor:
            # outside the mask, put back the original, noised to the level of the next step
            proper = image_latents
            if i < len(timesteps) - 1:
                proper = self.scheduler.add_noise(image_latents, noise, timesteps[i + 1 : i + 2])
            return (1 - mask) * proper + mask * x

        extra = None
        if not plain_unet:
            extra = torch.cat([mask, masked_latents], dim=1)
            extra = torch.cat([extra] * 2) if guided else extra
        after_step = paste_back if plain_unet else None

        latents = self._denoise(
            latents,
            timesteps,
            steps,
            prompt_embeds,
            negative_prompt_embeds,
            guidance_scale,
            self._step_kwargs(generator, eta),
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            extra_channels=extra,
            after_step=after_step,
        )
        images = self._decode(latents, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images, None)
