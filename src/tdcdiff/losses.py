"""The held-out denoising loss of a model, per timestep and per image: the same images, timesteps and noise for
every model measured with one seed, so two models' losses are paired. The loss grouping, the plan's difficulty,
the report's loss curves and tune's screening all measure through here."""

from __future__ import annotations

import numpy as np
import torch

from .models import as_denoiser
from .schedule import training_target


def measured_timesteps(num_train: int, num_points: int) -> np.ndarray:
    """The timesteps the held-out losses are measured at: `num_points` (at most T) evenly spaced in 0..T-1, as
    sorted unique ints."""
    return np.unique(np.linspace(0, num_train - 1, min(num_points, num_train)).round().astype(int))


@torch.no_grad()
def _squared_errors(model, images: torch.Tensor, scheduler, points: np.ndarray, *, images_per_point: int, seed: int,
                    labels: torch.Tensor | None):
    """Yield, for each timestep in `points`, the squared error of the model's output against the training target,
    shape [images_per_point, C, H, W], on images picked from `images` by `seed` with fixed noise from `seed`
    (the same pick and noise at every point)."""
    denoiser = as_denoiser(model).eval()
    g = torch.Generator().manual_seed(seed)
    picked = torch.randperm(len(images), generator=g)[:images_per_point]
    x0 = images[picked]
    y = None if labels is None else labels[picked].to(x0.device)
    noise = torch.randn(x0.shape, generator=g).to(x0.device)  # drawn on the CPU: the same noise on any device
    for t_value in points:
        t = torch.full((len(x0),), int(t_value), dtype=torch.long)
        a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1).to(x0.device)
        t = t.to(x0.device)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        yield (denoiser(x_t, t, y) - training_target(scheduler, x0, noise, t)).pow(2)


@torch.no_grad()
def per_timestep_loss(
    model,
    images: torch.Tensor,
    scheduler,
    *,
    num_points: int = 100,
    images_per_point: int = 64,
    seed: int = 0,
    labels: torch.Tensor | None = None,
) -> np.ndarray:
    """The model's denoising loss at every timestep 0..T-1 (measured at `num_points` evenly spaced t on a
    fixed held-out batch with fixed noise, interpolated in log space in between). labels: class ids of
    `images` (class-conditional models).
    """
    num_train = scheduler.config.num_train_timesteps
    points = measured_timesteps(num_train, num_points)
    losses = [error.mean().item() for error in _squared_errors(model, images, scheduler, points, seed=seed,
                                                              images_per_point=images_per_point, labels=labels)]
    return loss_curve(points, losses, num_train)


def loss_curve(points: np.ndarray, losses, num_train: int) -> np.ndarray:
    """A loss at every timestep 0..T-1 ([T]) from losses measured at `points` ([P], e.g. measured_timesteps),
    interpolated in log space (the loss spans orders of magnitude along t)."""
    return np.exp(np.interp(np.arange(num_train), points, np.log(np.maximum(losses, 1e-12))))


@torch.no_grad()
def per_image_loss(
    model,
    images: torch.Tensor,
    scheduler,
    *,
    num_points: int = 100,
    images_per_point: int = 64,
    seed: int = 0,
    labels: torch.Tensor | None = None,
) -> tuple[np.ndarray, torch.Tensor]:
    """The model's denoising loss per held-out image and measured timestep: the same timesteps, images and noise
    as `per_timestep_loss` with the same arguments, so two models measured with one seed are paired image by
    image.

    Returns (points, losses): points, the measured timesteps (`measured_timesteps`, [P] ints); losses, a float32
    CPU tensor [P, M], M = min(images_per_point, len(images)), the mean squared error of the training target
    over each image's pixels at each point (images in the order `seed` picked them).
    """
    points = measured_timesteps(scheduler.config.num_train_timesteps, num_points)
    errors = _squared_errors(model, images, scheduler, points, images_per_point=images_per_point, seed=seed,
                             labels=labels)
    return points, torch.stack([error.flatten(1).mean(1).cpu() for error in errors])
