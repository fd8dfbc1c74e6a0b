"""minidiff: the Stable Diffusion / DDPM inference stack in plain PyTorch, in parity with diffusers."""

from .autoencoder_kl import AutoencoderKL
from .clip_text import CLIPTextModel
from .pipelines import (
    DDPMPipeline,
    DiffusionPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from .schedulers import (
    SCHEDULERS,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from .tokenizer import CLIPTokenizer
from .unet_2d import UNet2DModel
from .unet_2d_condition import UNet2DConditionModel

__version__ = "0.1.0"
