"""Feature caching for UNets: DeepCache (Ma, Fang & Wang, CVPR 2024, arXiv 2312.00858), training-free.

A UNet's deep features change little from one sampling step to the next. DeepCache runs one full forward pass every
N steps (the cache interval) and keeps the input of the shallowest `depth` up blocks, the output of everything
deeper; at the steps in between it runs only the shallow branch (conv_in, the first `depth` down blocks, the last
`depth` up blocks with their skip connections, and the output layers) on the kept deep features.

Why not the DeepCache package (0.1.1 on PyPI): its DeepCacheSDHelper needs a diffusers pipeline (`pipe.unet`, and
the step number looked up in `pipe.scheduler.timesteps`), replaces the `forward` of the UNet's blocks with caching
ones (an edited model, which a torch.jit trace would freeze with the first cached tensors inside), keeps one cache
for one UNet (a router has one UNet per group) and requires transformers. Here the model is never edited: as
improved-diffusion's respace wraps its model, DeepCacheUNet calls the UNet2DModel's own modules in the order of its
forward; both passes are functions of their input tensors alone (each can be traced), and the cache
(FeatureCache) belongs to the sampling loop: one trajectory, one expert at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .files import is_count
from .models import network, num_class_embeds


def _skips_made(block: nn.Module) -> int:
    """Skip connections a down block hands to the up path: one per ResNet layer and one per downsampler."""
    return len(block.resnets) + len(block.downsamplers or ())


class DeepCacheUNet(nn.Module):
    """The two passes of DeepCache over a diffusers UNet2DModel, which is called, never changed.

    unet: a UNet2DModel of any widths and layer counts (pruned ones included).
    depth: the shallow branch's depth, 1..len(unet.down_blocks): conv_in, down_blocks[:depth], up_blocks[-depth:]
        and the output layers. At depth = len(down_blocks) the deep part is the mid block alone.
    Raises ValueError for a depth out of range, or a UNet whose blocks carry a skip sample beside the features
    (SkipDownBlock2D, score-SDE's NCSN++ style), which this split does not follow.
    """

    def __init__(self, unet: nn.Module, depth: int):
        super().__init__()
        levels = len(unet.down_blocks)
        if not is_count(depth, 1) or depth > levels:
            raise ValueError(f"cache_depth (--cache-depth) must be between 1 and the UNet's {levels} levels (down "
                             f"blocks), got {depth!r}; 1 caches the most (the shallowest branch)")
        skip_blocks = [type(b).__name__ for b in (*unet.down_blocks, *unet.up_blocks) if hasattr(b, "skip_conv")]
        if skip_blocks:
            raise ValueError(f"feature caching does not support UNet blocks that carry a skip sample "
                             f"({', '.join(dict.fromkeys(skip_blocks))}); sample this model with cache_interval=1")
        self.unet = unet
        self.depth = depth
        self.shallow_ups = unet.up_blocks[levels - depth:]
        # The skip connections the shallow up blocks take: the first ones made, by conv_in and the first down blocks.
        self.shallow_skips = sum(len(up.resnets) for up in self.shallow_ups)
        made = 1 + sum(_skips_made(b) for b in unet.down_blocks)
        if made != sum(len(up.resnets) for up in unet.up_blocks) \
                or 1 + sum(_skips_made(b) for b in unet.down_blocks[:depth]) < self.shallow_skips:
            raise ValueError("feature caching needs a UNet whose up blocks take exactly the skip connections its down "
                             "blocks make, level by level; sample this model with cache_interval=1")

    def _stem(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None):
        """UNet2DModel.forward steps 0-2: the time (and class) embedding, and conv_in's output."""
        unet = self.unet
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = unet.time_embedding(unet.time_proj(timestep).to(dtype=unet.dtype))
        if unet.class_embedding is not None:
            if unet.config.class_embed_type == "timestep":
                class_labels = unet.time_proj(class_labels)
            emb = emb + unet.class_embedding(class_labels).to(dtype=unet.dtype)
        return emb, unet.conv_in(sample)

    @staticmethod
    def _down(x: torch.Tensor, emb: torch.Tensor, blocks) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        skips = (x,)
        for block in blocks:
            x, made = block(hidden_states=x, temb=emb)
            skips += made
        return x, skips

    @staticmethod
    def _up(x: torch.Tensor, emb: torch.Tensor, blocks, skips: tuple[torch.Tensor, ...]):
        for block in blocks:
            taken = len(block.resnets)
            x = block(x, skips[-taken:], emb)
            skips = skips[:-taken]
        return x, skips

    def _head(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        unet = self.unet
        x = unet.conv_out(unet.conv_act(unet.conv_norm_out(x)))
        if unet.config.time_embedding_type == "fourier":
            x = x / timestep.reshape((x.shape[0], *([1] * len(x.shape[1:]))))
        return x

    def full(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None = None):
        """(prediction, deep features): UNet2DModel.forward(sample, timestep, class_labels).sample, by the same
        operations in the same order (equal to the last bit), and the input of up_blocks[-depth], (N, C, H, W).

        sample: (N, C, H, W) in the model's dtype; timestep: (N,) training timesteps; class_labels: (N,) or None.
        """
        unet = self.unet
        emb, x = self._stem(sample, timestep, class_labels)
        x, skips = self._down(x, emb, unet.down_blocks)
        if unet.mid_block is not None:
            x = unet.mid_block(x, emb)
        deep, skips = self._up(x, emb, unet.up_blocks[: len(unet.up_blocks) - self.depth], skips)
        x, _ = self._up(deep, emb, self.shallow_ups, skips)
        return self._head(x, timestep), deep

    def shallow(self, sample: torch.Tensor, timestep: torch.Tensor, deep: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """The prediction of the shallow branch at (sample, timestep), with `deep` (from `full`) in place of
        everything deeper. The last shallow down block's downsampled output feeds only the deep part; it is computed
        (the block runs whole) and dropped."""
        emb, x = self._stem(sample, timestep, class_labels)
        _, skips = self._down(x, emb, self.unet.down_blocks[: self.depth])
        x, _ = self._up(deep, emb, self.shallow_ups, skips[: self.shallow_skips])
        return self._head(x, timestep)


class _Pass(nn.Module):
    """A pass called as a tdcdiff denoiser is (see models.Denoiser): x in, its prediction (C channels, or 2C
    with_variance) out in x's dtype, the UNet run in its weights' dtype, class 0 for a conditional UNet given no
    labels."""

    def __init__(self, core: DeepCacheUNet):
        super().__init__()
        self.core = core
        self.conditional = num_class_embeds(core.unet) is not None

    def _inputs(self, x: torch.Tensor, class_labels: torch.Tensor | None):
        if class_labels is None and self.conditional:
            class_labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return x.to(self.core.unet.dtype), class_labels

    @staticmethod
    def _prediction(out: torch.Tensor, x: torch.Tensor, with_variance: bool) -> torch.Tensor:
        return (out if with_variance else out[:, : x.shape[1]]).to(x.dtype)


class FullPass(_Pass):
    """forward(x, t[, class_labels]) -> (prediction, deep features): DeepCacheUNet.full as a denoiser."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None, *,
                with_variance: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        sample, class_labels = self._inputs(x, class_labels)
        out, deep = self.core.full(sample, t, class_labels)
        return self._prediction(out, x, with_variance), deep


class ShallowPass(_Pass):
    """forward(x, t, deep[, class_labels]) -> prediction: DeepCacheUNet.shallow as a denoiser."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, deep: torch.Tensor, class_labels: torch.Tensor | None = None,
                *, with_variance: bool = False) -> torch.Tensor:
        sample, class_labels = self._inputs(x, class_labels)
        return self._prediction(self.core.shallow(sample, t, deep, class_labels), x, with_variance)


def split_unet(denoiser: nn.Module, depth: int, which: str) -> DeepCacheUNet:
    """DeepCacheUNet of the diffusers UNet2DModel that `denoiser` is or wraps, at branch depth `depth`.

    which: how messages name the model ("the model", "expert 1 of the router"). Raises ValueError for a denoiser
    that is not a UNet2DModel, and DeepCacheUNet's for a depth or a block layout it cannot split."""
    from diffusers import UNet2DModel

    unet = network(denoiser)
    if not isinstance(unet, UNet2DModel):
        raise ValueError(f"feature caching (cache_interval > 1) needs diffusers UNet2DModel denoisers, but "
                         f"{which} is a {type(unet).__name__}; sample it with cache_interval=1")
    return DeepCacheUNet(unet, depth)


@dataclass
class FeatureCache:
    """DeepCache's state along one sampling trajectory: the deep features of the last full pass, the expert (a
    router's group) that made them, and the steps since.

    interval: one full pass every `interval` steps (>= 2). depth: the shallow branch's depth.
    A step runs a full pass when nothing is cached, when its expert is not the one whose features are cached (the
    cache belongs to one expert), or when `interval` steps have passed since the last full pass; otherwise the
    shallow branch alone. shallow_steps: the timesteps that ran the shallow branch alone, in order.
    """

    interval: int
    depth: int
    expert: int | None = None
    deep: torch.Tensor | None = None
    age: int = 0
    shallow_steps: list[int] = field(default_factory=list)

    def full_pass_due(self, expert: int) -> bool:
        return self.deep is None or expert != self.expert or self.age >= self.interval

    def store(self, expert: int, deep: torch.Tensor) -> None:
        self.expert, self.deep, self.age = expert, deep, 1

    def reuse(self, t: int) -> torch.Tensor:
        self.age += 1
        self.shallow_steps.append(t)
        return self.deep
