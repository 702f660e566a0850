"""Latent diffusion: the denoiser works on a VAE's latents, images are decoded from them.

Latents are the VAE encoder's mean (deterministic, so a cache of them is reproducible), shifted by the VAE's
`shift_factor` (when it has one) and scaled by its `scaling_factor` to about unit variance, as diffusers'
latent pipelines do.
"""

from __future__ import annotations

import torch
from torch import nn

# The VAE classes a pipeline directory or a bundle may name (diffusers classes: the allowlist applies).
VAE_CLASSES = ("AutoencoderKL",)


def _factors(vae: nn.Module) -> tuple[float, float]:
    config = vae.config
    return float(config.get("scaling_factor") or 1.0), float(config.get("shift_factor") or 0.0)


@torch.no_grad()
def encode(vae: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] -> scaled latents (N, latent_channels, h, w), float32."""
    scale, shift = _factors(vae)
    vae = vae.eval()
    parts = [vae.encode(images[i:i + batch_size]).latent_dist.mean for i in range(0, len(images), batch_size)]
    return ((torch.cat(parts) - shift) * scale).float().contiguous()


class Decoder(nn.Module):
    """Scaled latents (N, latent_channels, h, w) -> images (N, C, H, W) clamped to [-1, 1]."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.eval()
        self.scale, self.shift = _factors(vae)

    @torch.no_grad()
    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(next(self.vae.parameters()).device)
        return self.vae.decode(latents / self.scale + self.shift).sample.clamp(-1, 1).float().cpu()
