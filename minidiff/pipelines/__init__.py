from ..noise import randn_tensor
from .auto import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image
from .base import DiffusionPipeline, ImagePipelineOutput
from .ddpm import DDPMPipeline
from .image_processing import VaeImageProcessor
from .latent_consistency import LatentConsistencyModelPipeline
from .stable_diffusion import StableDiffusionPipeline
from .stable_diffusion_img2img import StableDiffusionImg2ImgPipeline
from .stable_diffusion_inpaint import StableDiffusionInpaintPipeline
from .stable_diffusion_xl import StableDiffusionXLPipeline
from .stable_diffusion_xl_img2img import StableDiffusionXLImg2ImgPipeline
from .stable_diffusion_xl_inpaint import StableDiffusionXLInpaintPipeline

__all__ = [
    "AutoPipelineForImage2Image",
    "AutoPipelineForInpainting",
    "AutoPipelineForText2Image",
    "VaeImageProcessor",
    "DiffusionPipeline",
    "ImagePipelineOutput",
    "randn_tensor",
    "DDPMPipeline",
    "LatentConsistencyModelPipeline",
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
]
