from ..noise import randn_tensor
from .base import DiffusionPipeline, ImagePipelineOutput
from .ddpm import DDPMPipeline
from .stable_diffusion import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline

__all__ = [
    "DiffusionPipeline",
    "ImagePipelineOutput",
    "randn_tensor",
    "DDPMPipeline",
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
]
