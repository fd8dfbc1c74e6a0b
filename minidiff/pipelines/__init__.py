from .base import DiffusionPipeline, ImagePipelineOutput, randn_tensor
from .ddpm import DDPMPipeline

__all__ = ["DiffusionPipeline", "ImagePipelineOutput", "randn_tensor", "DDPMPipeline"]
