"""Stable Diffusion text-to-image, step for step as diffusers, and the steps img2img and inpainting share.

References:
1. Rombach et al. "High-Resolution Image Synthesis with Latent Diffusion Models", CVPR 2022.
2. Ho, Salimans. "Classifier-Free Diffusion Guidance", 2022.

`StableDiffusionPipeline.__call__` is the loop of examples/stable_diffusion_loop.py: encode the
prompt (and an empty or negative prompt) with CLIP; set the timesteps and start from noise; at each
timestep run the UNet on the unconditional and conditional halves in one batch, mix them with the
guidance scale, and let the scheduler take a step; decode the final latents with the VAE.
Img2img (stable_diffusion_img2img.py) and inpainting (stable_diffusion_inpaint.py) run their own
copy of that loop from a noised image. The random generator is consumed in diffusers' order (VAE
sample of an init image, then the latent noise, then per-step noise), so a seed gives diffusers'
image. What a diffusers callback reads and changes during the loop (`pipe.guidance_scale`,
`pipe.num_timesteps`, `pipe._interrupt`, the named tensors) is in calling.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from .. import lora
from ..noise import randn_tensor
from ..single_file import load_pipeline
from .base import DiffusionPipeline, ImagePipelineOutput
from .calling import CallState, Generator, scheduler_step_kwargs
from .checks import (
    FiniteWatch,
    callback_inputs,
    check_clip_skip,
    check_finite,
    check_generator,
    check_int,
    check_prompts,
    check_real,
    check_size,
    check_weights,
)
from .image_processing import postprocess_image
from .loaders import LoraLoaderMixin, TextualInversionLoaderMixin

logger = logging.getLogger(__name__)


def classifier_free_guidance(noise_pred: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """[unconditional; conditional] predictions -> one, pushed away from the unconditional one."""
    uncond, cond = noise_pred.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", sec. 3.4: scale the
    guided prediction back to the conditional one's standard deviation (per image), which high guidance
    inflates, and mix that with the guided prediction by `guidance_rescale` (0 = plain guidance)."""
    dims = list(range(1, cond.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


def _batch_size(prompt: str | list[str] | None, prompt_embeds: torch.Tensor | None) -> int:
    """How many prompts: one string, a list, or the rows of pre-computed embeddings."""
    if prompt is not None:
        return 1 if isinstance(prompt, str) else len(prompt)
    return prompt_embeds.shape[0]


class StableDiffusionPipeline(DiffusionPipeline, CallState, LoraLoaderMixin, TextualInversionLoaderMixin):
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
        configs inferred from the weights, the prediction type by the rule in minidiff.ldm_file
        (`prediction_type=` overrides it), `tokenizer` a folder (default: the CLIP vocabulary shipped
        with minidiff), `use_ema=False` for the raw UNet weights of a file with an EMA copy."""
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

    def _guide(self, noise_pred: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance at the call's scale, then guidance_rescale's correction when it is > 0."""
        guided = classifier_free_guidance(noise_pred, self.guidance_scale)
        if self.guidance_rescale > 0:
            guided = rescale_guidance(guided, noise_pred.chunk(2)[1], self.guidance_rescale)
        return guided

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
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
        guidance_rescale: float = 0.0,
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
        self.check_settings(num_inference_steps, guidance_scale, num_images_per_prompt, eta, clip_skip, generator)
        self._begin_call(guidance_scale, guidance_rescale, clip_skip, cross_attention_kwargs)
        device, watch = self.device, FiniteWatch(strict)

        # 1. text -> CLIP embeddings, one row per image; with guidance also the negative (or empty) prompt's
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
        # 2. the timesteps (or custom ones), then pure noise at the level of the first one
        timesteps, num_inference_steps = self._set_timesteps(num_inference_steps, device, timesteps, sigmas)
        latents = self._prepare_noise(n, height, width, prompt_embeds.dtype, generator, latents)
        latents = latents * self.scheduler.init_noise_sigma
        timestep_cond = self._guidance_embedding(n, latents.dtype)  # only for an LCM-distilled UNet
        # 3. the denoising loop
        step_kwargs = scheduler_step_kwargs(self.scheduler, eta, generator)
        for i, t in self._progress(timesteps, num_inference_steps):
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
                    negative_prompt_embeds=negative_prompt_embeds,
                )
                latents, prompt_embeds, negative_prompt_embeds = out.values()
        # 4. latents -> pixels, once no NaN/Inf is found
        images = self._decode(latents, output_type, watch)
        self.maybe_free_model_hooks()  # with model offload: the last model back to the CPU, as diffusers
        return ImagePipelineOutput(images=images) if return_dict else (images, None)

    # -- the steps of __call__, shared with img2img and inpainting -------------------------------

    def _embed(self, prompt: list[str], clip_skip: int | None, lora_scale: float | None = None) -> torch.Tensor:
        tok = self.tokenizer
        prompt = self.maybe_convert_prompt(prompt, tok)  # a multi-vector learned token -> its n tokens
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
        with lora.lora_scale(self.text_encoder, lora_scale):  # the text encoder's LoRA adapters, scaled
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
        lora_scale: float | None = None,
        clip_skip: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B * num_images_per_prompt, 77, D) conditional and (if guided) unconditional embeddings;
        `lora_scale` scales the text encoder's LoRA adapters while it runs (diffusers' argument order)."""
        batch = _batch_size(prompt, prompt_embeds)
        if prompt_embeds is None:
            prompt_embeds = self._embed([prompt] if isinstance(prompt, str) else prompt, clip_skip, lora_scale)
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
                uncond = [negative_prompt] * batch
            elif len(negative_prompt) != batch:
                raise ValueError(
                    f"`negative_prompt` has {len(negative_prompt)} entries but `prompt` has {batch}: "
                    f"give one negative prompt per prompt"
                )
            else:
                uncond = negative_prompt
            # the unconditional embedding never takes clip_skip, as in diffusers
            negative_prompt_embeds = self._embed(uncond, None, lora_scale)
        if do_classifier_free_guidance:
            negative_prompt_embeds = negative_prompt_embeds.to(dtype=dtype, device=device)
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        return prompt_embeds, negative_prompt_embeds

    def _strength_timesteps(
        self,
        num_inference_steps: int,
        strength: float,
        device: torch.device,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
    ) -> tuple[torch.Tensor, int]:
        """The tail of the schedule that `strength` keeps (1 = all steps, 0.3 = the last 30%), and its step count."""
        timesteps, num_inference_steps = self._set_timesteps(num_inference_steps, device, timesteps, sigmas)
        steps = min(int(num_inference_steps * strength), num_inference_steps)
        if steps < 1:
            raise ValueError(
                f"strength={strength} with num_inference_steps={num_inference_steps} leaves no denoising "
                f"step; raise one of them"
            )
        start = (num_inference_steps - steps) * self.scheduler.order
        if hasattr(self.scheduler, "set_begin_index"):  # σ-schedulers count their steps from here
            self.scheduler.set_begin_index(start)
        return timesteps[start:], steps

    def _prepare_noise(
        self,
        n: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        generator: Generator,
        latents: torch.Tensor | None = None,
        channels: int | None = None,
    ) -> torch.Tensor:
        """The starting noise, (n, channels, height / 8, width / 8): the `latents` given, or drawn."""
        self._check_generators(generator, n)
        channels = channels or self.unet.config.in_channels
        shape = (n, channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            return randn_tensor(shape, generator, self.device, dtype)
        if tuple(latents.shape) != shape:
            raise ValueError(f"`latents` has shape {tuple(latents.shape)}, expected {shape}")
        return latents.to(self.device)

    def _encode_image(self, image: torch.Tensor, generator: Generator) -> torch.Tensor:
        """VAE latents of an image, sampled with the generator(s), times the scaling factor."""
        if isinstance(generator, list):
            latents = torch.cat(
                [self.vae.encode(image[i : i + 1]).latent_dist.sample(generator[i]) for i in range(image.shape[0])]
            )
        else:
            latents = self.vae.encode(image).latent_dist.sample(generator)
        return self.vae.config.scaling_factor * latents

    def _decode(self, latents: torch.Tensor, output_type: str, watch: FiniteWatch | None = None) -> Any:
        """The VAE's pixels (or the latents), after `watch` has found no NaN/Inf in the loop or the decode."""
        if output_type == "latent":
            if watch is not None:
                watch.verify()
            return latents
        image = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        if watch is not None:
            watch.see("vae.decode", image)
            watch.verify()
        return postprocess_image(image, output_type)

    # -- inputs ----------------------------------------------------------------------------------

    def _default_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """None -> the UNet's sample size in pixels (0 is refused, not taken for None as diffusers does)."""
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else size
        height = h * self.vae_scale_factor if height is None else height
        width = w * self.vae_scale_factor if width is None else width
        return check_size(height, width, self.vae_scale_factor)

    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def check_inputs(
        self,
        prompt: str | list[str] | None,
        height: int | None,
        width: int | None,
        negative_prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        callback_on_step_end_tensor_inputs: list[str],
        strength: float | None = None,
        output_type: str = "pil",
        *,
        latents: torch.Tensor | None = None,
        callback_on_step_end: Callable | None = None,
    ) -> None:
        """What to draw: prompts, sizes and the tensors given. Every check runs before any model does."""
        if strength is not None:
            check_real("strength", strength, 0.0, 1.0)
        if height is not None or width is not None:
            check_size(height, width, self.vae_scale_factor)
        check_prompts(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, self.unet.config.cross_attention_dim
        )
        if latents is not None and not isinstance(latents, torch.Tensor):
            raise TypeError(f"`latents` must be a torch.Tensor, got {type(latents).__name__}")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError(f"`callback_on_step_end` must be callable, got {type(callback_on_step_end).__name__}")
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` may name {self._callback_tensor_inputs}, not {unknown}"
            )
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        check_finite(latents=latents, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds)

    def check_settings(
        self,
        num_inference_steps: int,
        guidance_scale: float,
        num_images_per_prompt: int,
        eta: float,
        clip_skip: int | None,
        generator: Generator,
    ) -> None:
        """How to draw: the numbers, the generator, and the models' weights (floats, not an int checkpoint)."""
        if num_inference_steps is not None:  # None with custom timesteps / sigmas (checked by _set_timesteps)
            check_int("num_inference_steps", num_inference_steps)
        check_real("guidance_scale", guidance_scale)
        check_int("num_images_per_prompt", num_images_per_prompt)
        check_real("eta", eta, 0.0, 1.0)  # DDIM's η: above 1 its step takes the root of a negative number
        check_generator(generator)
        check_clip_skip(clip_skip, self.text_encoder)
        check_weights(self.components)

    @staticmethod
    def _check_generators(generator: Generator, batch: int) -> None:
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(
                f"got a list of {len(generator)} generators for an effective batch of {batch} "
                f"(prompts x num_images_per_prompt): pass exactly one per image"
            )

    @staticmethod
    def _repeat_to(x: torch.Tensor, n: int, what: str) -> torch.Tensor:
        """Spread the `what` entries (images, masks) over a batch of n: each repeated n / len times."""
        if x.shape[0] == n:
            return x
        if n % x.shape[0]:
            raise ValueError(f"cannot spread {x.shape[0]} `{what}` entries over a batch of {n}")
        return x.repeat(n // x.shape[0], 1, 1, 1)
