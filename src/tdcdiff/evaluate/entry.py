"""What every measurement of `evaluate` shares: the models to measure (ModelEntry), their names as file names, the
feature cache folder, class-balanced labels and the sampling FLOPs along a trajectory."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..cache_home import cache_home
from ..flops import count_flops
from ..models import num_class_embeds


@dataclass
class ModelEntry:
    """One model to evaluate.

    name: shown in tables and plots, e.g. "single model", "uniform-pruned", "TDC".
    denoiser: anything called as model(x, t): a diffusers UNet2DModel, a pruned copy, or a tdcdiff Router.
    train_flops: the total training compute that produced it (FLOPs, forward + backward = 3 x forward).
    flops_per_image: how to count sampling FLOPs: an int is the FLOPs of one forward pass (multiplied by
        the steps taken); a callable gets the list of timesteps the sampler visited and returns the FLOPs of
        one image along them; None measures it (Router.trajectory_flops for a router, else count_flops x steps).
    notes: one line on how the model was made, shown in the report.
    """

    name: str
    denoiser: nn.Module
    train_flops: int
    flops_per_image: Callable[[list[int]], int] | int | None = None
    notes: str = ""


def default_cache_dir() -> Path:
    """Where feature networks are cached: $TDCDIFF_CACHE, else $XDG_CACHE_HOME/tdcdiff, else ~/.cache/tdcdiff (made
    if missing). Raises ValueError naming TDCDIFF_CACHE when it cannot be a writable folder (cache_home.cache_home)."""
    return cache_home()


def slug(name: str) -> str:
    """A file-name-safe form of a model name ("TDC (mix 0.5)" -> "tdc-mix-0-5")."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "model"


def trajectory_flops(entry: ModelEntry, timesteps: list[int], sample_shape: tuple[int, int, int]) -> int:
    """FLOPs of one image along the visited timesteps, as ModelEntry.flops_per_image says to count them."""
    how = entry.flops_per_image
    if callable(how):
        return int(how(timesteps))
    if isinstance(how, int):
        return how * len(timesteps)
    if hasattr(entry.denoiser, "trajectory_flops"):
        return entry.denoiser.trajectory_flops(timesteps)
    return count_flops(entry.denoiser, sample_shape) * len(timesteps)


def balanced_labels(model: nn.Module, num_images: int, num_classes: int | None) -> torch.Tensor | None:
    """Class ids 0, 1, .., num_classes - 1, 0, 1, .. for `num_images` samples of a class-conditional model (so FID
    compares against a class-balanced sample); None for an unconditional one."""
    if num_class_embeds(model) is None:
        return None
    if num_classes is None:
        raise ValueError("the model is class-conditional: give the data's num_classes to draw class-balanced samples")
    return torch.arange(num_images) % num_classes
