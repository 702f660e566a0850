"""The published model definitions in this folder as a user brings them to tdcdiff (README, "Bring your own
model"): each class unchanged, in a subclass that only records its constructor arguments, so that every stage
can save it and rebuild it; and a function per model returning a tiny configuration of it for 1x8x8 images, for
`Run(..., base="published.models:<function>")` (tests/published is reached as the package `published`).
"""

from __future__ import annotations

from .denoising_diffusion_pytorch.denoising_diffusion_pytorch import Unet
from .improved_diffusion.unet import UNetModel
from .pytorch_diffusion.model import Model


class ImprovedDiffusionUNet(UNetModel):
    """openai/improved-diffusion's UNetModel, recording its constructor arguments."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.tdcdiff_init_kwargs = kwargs


class PytorchDiffusionModel(Model):
    """pesser/pytorch_diffusion's Model (the DDPM CIFAR-10 network), recording its constructor arguments. Saved
    arguments are JSON, whose lists come back as lists; Model concatenates ch_mult to a tuple, so lists are passed
    to it as tuples."""

    def __init__(self, **kwargs):
        super().__init__(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})
        self.tdcdiff_init_kwargs = kwargs


class LucidrainsUnet(Unet):
    """lucidrains/denoising-diffusion-pytorch's Unet, recording its constructor arguments."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.tdcdiff_init_kwargs = kwargs


def improved_diffusion() -> ImprovedDiffusionUNet:
    """Two levels of 64 and 128 channels (its GroupNorm has 32 groups), attention with 4 heads at 4x4,
    scale-shift norm, dropout and a learned variance (2 output channels), as IDDPM trains it."""
    return ImprovedDiffusionUNet(in_channels=1, model_channels=64, out_channels=2, num_res_blocks=1,
                                 attention_resolutions=[2], channel_mult=[1, 2], num_heads=4,
                                 use_scale_shift_norm=True, dropout=0.1)


def pytorch_diffusion() -> PytorchDiffusionModel:
    """Two levels of 64 and 128 channels, single-head attention at 4x4 (the DDPM CIFAR-10 layout, smaller)."""
    return PytorchDiffusionModel(ch=64, out_ch=1, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4],
                                 dropout=0.1, in_channels=1, resolution=8)


def denoising_diffusion_pytorch() -> LucidrainsUnet:
    """Two levels of 16 and 32 channels: linear attention in the first, full attention (2 heads of 8, with
    memory key/values) in the second and the middle, RMSNorm, pixel-unshuffle downsampling."""
    return LucidrainsUnet(dim=16, dim_mults=[1, 2], channels=1, attn_heads=2, attn_dim_head=8)
