from ..noise import randn_tensor
from .base import DiffusionPipeline, ImagePipelineOutput
from .ddpm import DDPMPipeline
from .latent_consistency import LatentConsistencyModelPipeline
from .stable_diffusion import StableDiffusionPipeline
from .stable_diffusion_img2img import StableDiffusionImg2ImgPipeline
from .stable_diffusion_inpaint import StableDiffusionInpaintPipeline

__all__ = [
    "DiffusionPipeline",
    "ImagePipelineOutput",
    "randn_tensor",
    "DDPMPipeline",
    "LatentConsistencyModelPipeline",
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
]
