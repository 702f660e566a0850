"""What a training step costs in FLOPs (2 x multiply-accumulates, the convention of tdcdiff.flops)."""

from __future__ import annotations

from torch import nn

from ..flops import count_flops
from ..models import as_denoiser
from .config import TrainConfig
from .distill import FeatureDistiller, make_distiller, runs_teacher

FLOPS_CONVENTION = ("2 x multiply-accumulates; forward + backward = 3 x forward; a teacher's forward and feature "
                    "projections included when distilling")


def step_flops(model: nn.Module, sample_shape: tuple[int, int, int], config: TrainConfig,
               teacher: nn.Module | None = None) -> int:
    """Training FLOPs (2 x MACs) of one step of `train` with these arguments: batch_size x (3 x the model's
    forward, + the teacher's forward when config distils, + the feature projections' forward and backward).

    sample_shape: (C, H, W) of one training image.
    """
    denoiser = as_denoiser(model)
    return training_flops(denoiser, sample_shape, config, teacher, make_distiller(denoiser, teacher, sample_shape,
                                                                                  config)[0])[0]


def training_flops(denoiser: nn.Module, sample_shape: tuple[int, int, int], config: TrainConfig,
                   teacher: nn.Module | None, distiller: FeatureDistiller | None) -> tuple[int, int]:
    """(FLOPs per training step, FLOPs of one forward of the model on one sample)."""
    forward = count_flops(denoiser, sample_shape)
    teacher_forward = count_flops(as_denoiser(teacher), sample_shape) if runs_teacher(teacher, config, distiller) else 0
    # Forward + backward = 3 x forward (Kaplan et al. 2020); a teacher only runs forward.
    return config.batch_size * (3 * forward + teacher_forward + (distiller.flops if distiller else 0)), forward
