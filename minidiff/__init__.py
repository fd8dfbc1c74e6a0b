"""minidiff: the Stable Diffusion / DDPM inference stack in plain PyTorch, in parity with diffusers."""

from .pipelines import DDPMPipeline, DiffusionPipeline
from .unet_2d import UNet2DModel

__version__ = "0.1.0"
