"""Denoiser presets (diffusers UNet2DModel) and the adapter that lets any `model(x, t)` be a denoiser."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Preset:
    """A UNet2DModel shape sized to train on a few CPU cores."""

    sample_size: int
    in_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int = 1
    norm_num_groups: int = 8
    description: str = ""


PRESETS: dict[str, Preset] = {
    "digits-8": Preset(8, 1, (32, 64), description="8x8 gray (scikit-learn digits), 2 levels, ~0.6 M params"),
    "gray-28": Preset(28, 1, (32, 64, 64), description="28x28 gray (MNIST), 3 levels, ~1 M params"),
    "gray-32": Preset(32, 1, (32, 64, 64), description="32x32 gray, 3 levels, ~1 M params"),
    "rgb-32": Preset(32, 3, (32, 64, 128), layers_per_block=2, description="32x32 RGB (CIFAR-10), 3 levels"),
}


def build_unet(
    preset: str = "digits-8",
    *,
    attention: bool = False,
    sample_size: int | None = None,
    in_channels: int | None = None,
    num_train_timesteps: int | None = None,
):
    """A fresh diffusers UNet2DModel from a preset.

    preset: one of PRESETS ("digits-8", "gray-28", "gray-32", "rgb-32").
    attention: put self-attention in the lowest-resolution down/up blocks and the mid block.
    sample_size, in_channels: override the preset's image size / channel count.
    num_train_timesteps: stored in the model config for provenance only.
    """
    from diffusers import UNet2DModel

    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    levels = len(p.block_out_channels)
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if attention:
        down[-1] = "AttnDownBlock2D"
        up[0] = "AttnUpBlock2D"
    channels = in_channels or p.in_channels
    return UNet2DModel(
        sample_size=sample_size or p.sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=p.block_out_channels,
        layers_per_block=p.layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=p.norm_num_groups,
        attention_head_dim=8,
        add_attention=attention,  # without this the mid block keeps an attention layer
        num_train_timesteps=num_train_timesteps,
    )


def preset_for(image_size: int, channels: int) -> str:
    """The preset that fits images of this size and channel count."""
    if channels == 3:
        return "rgb-32"
    if image_size <= 8:
        return "digits-8"
    return "gray-28" if image_size == 28 else "gray-32"


class Denoiser(nn.Module):
    """Calls any module as `model(x, t)` and returns a plain tensor of x's shape.

    Accepts models that return a tensor, a diffusers output with `.sample`, or a tuple whose first
    item is the prediction. Everything in tdcdiff calls denoisers through this. x goes into the model in the
    dtype of its floating-point weights (fp16/bf16 models work); the output comes back in x's dtype, so the
    scheduler's arithmetic stays in float32.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        weight = next((p for p in self.model.parameters() if p.is_floating_point()), None)
        dtype = x.dtype if weight is None else weight.dtype
        out = self.model(x.to(dtype), t)
        if hasattr(out, "sample"):
            out = out.sample
        elif isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"denoiser output has shape {got} but its input has shape {tuple(x.shape)}; a denoiser "
                "must map (x, t) to a tensor of x's shape (set out_channels = in_channels)"
            )
        return out.to(x.dtype)


def as_denoiser(model: nn.Module) -> Denoiser:
    """Wrap a model as a Denoiser unless it already is one (or a Router, which behaves like one)."""
    if isinstance(model, Denoiser) or getattr(model, "is_denoiser", False):
        return model
    return Denoiser(model)


def check_denoiser(model: nn.Module, sample_shape: tuple[int, int, int]) -> None:
    """Fail early, with the fix, when a model takes another channel count than the data has.

    (A model whose output shape differs from its input is caught by Denoiser on its first call.)
    """
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is not None and first_conv.in_channels != sample_shape[0]:
        raise ValueError(
            f"the model takes {first_conv.in_channels}-channel images but the data has {sample_shape[0]} channels; "
            f"load the data with channels={first_conv.in_channels} (--channels) or build the model with "
            f"in_channels={sample_shape[0]}"
        )
