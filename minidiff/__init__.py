"""minidiff: the Stable Diffusion / DDPM inference stack in plain PyTorch, in parity with diffusers."""

from pathlib import Path as _Path

from .autoencoder_kl import AutoencoderKL
from .clip_text import CLIPTextModel, CLIPTextModelWithProjection
from .pipelines import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    DDPMPipeline,
    DiffusionPipeline,
    LatentConsistencyModelPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    VaeImageProcessor,
)
from .schedulers import (
    SCHEDULER_NAMES,
    SCHEDULERS,
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    DPMSolverSinglestepScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    TCDScheduler,
    UniPCMultistepScheduler,
    scheduler_from_name,
)
from .tokenizer import CLIPTokenizer
from .unet_2d import UNet2DModel
from .unet_2d_condition import UNet2DConditionModel

__version__ = "0.1.0"

__all__ = [
    "AutoPipelineForImage2Image",
    "AutoPipelineForInpainting",
    "AutoPipelineForText2Image",
    "AutoencoderKL",
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "CLIPTokenizer",
    "DDIMScheduler",
    "DDPMPipeline",
    "DDPMScheduler",
    "DEISMultistepScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSDEScheduler",
    "DPMSolverSinglestepScheduler",
    "DiffusionPipeline",
    "EDMDPMSolverMultistepScheduler",
    "EDMEulerScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LatentConsistencyModelPipeline",
    "KDPM2AncestralDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "LCMScheduler",
    "LMSDiscreteScheduler",
    "PNDMScheduler",
    "SCHEDULERS",
    "SCHEDULER_NAMES",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
    "StableDiffusionXLPipeline",
    "TCDScheduler",
    "UNet2DConditionModel",
    "UNet2DModel",
    "UniPCMultistepScheduler",
    "VaeImageProcessor",
    "DEFAULT_MODEL",
    "scheduler_from_name",
]

# the bundled model: a toy Stable Diffusion trained from scratch by minidiff/train.py on the
# shapes of minidiff/shapes.py ("a red circle on a white background"), in the diffusers layout
DEFAULT_MODEL: str = str(_Path(__file__).resolve().parent / "data" / "shapes-64")
