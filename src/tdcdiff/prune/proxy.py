"""Cheap proxy scores for pruning decisions: how much worse a pruned model denoises one group's timesteps.

The score is always RELATIVE to the base model on the same fixed batch (1.0 = as good as the base, lower is
better). Raw epsilon loss is not comparable across timesteps (about 250x larger at small t), and on digits
its increase ranked groups unlike FID; the relative loss and the x0-space error ranked them like FID.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from ..models import as_denoiser
from ..schedule import predict_x0, training_target
from .importance import Calibration

SPACES = ("relative", "x0")


class Scorer(Protocol):
    """Anything that scores a pruned model; lower is better, 1.0 = as good as the base."""

    def score(self, model: nn.Module) -> float: ...


def _noised(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    a = scheduler.alphas_cumprod.to(x0.device, x0.dtype)[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


@dataclass
class ProxyBatch:
    """A fixed held-out batch: the same images, timesteps and noise for every candidate.

    images: (N, C, H, W) in [-1, 1]; timesteps: (N,) one timestep per image, drawn from group_timesteps;
    noise: (N, C, H, W) standard normal; group_timesteps: the group's timesteps (also used for fine-tuning);
    seed: the seed everything was drawn from; labels: the images' conditions, (N,) class ids for a
    class-conditional model or (N, L, width) text embeddings for a text-conditional one, or None.
    """

    images: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor
    group_timesteps: torch.Tensor
    seed: int
    labels: torch.Tensor | None = None

    @classmethod
    def make(cls, images: torch.Tensor, timesteps, scheduler, *, size: int = 128, seed: int = 0,
             labels: torch.Tensor | None = None) -> "ProxyBatch":
        """Draw the batch.

        images: the pool to draw from, (N, C, H, W) in [-1, 1] (ideally images the models were not tuned on).
        timesteps: the group's timesteps (any 1-d integer sequence within 0..T-1).
        scheduler: the training noise schedule; only used to check the timesteps' range.
        size: images in the batch; drawn without replacement when the pool is large enough.
        seed: seed for the images, timesteps and noise.
        labels: the conditions of `images` (class ids, or text embeddings), picked along with them.
        """
        group = torch.as_tensor(timesteps, dtype=torch.long).flatten()
        num_train = scheduler.config.num_train_timesteps
        if group.numel() == 0 or group.min() < 0 or group.max() >= num_train:
            raise ValueError(f"proxy timesteps must be a non-empty subset of 0..{num_train - 1}")
        if images.ndim != 4 or len(images) == 0:
            raise ValueError(f"proxy images must be a non-empty NCHW tensor, got shape {tuple(images.shape)}")
        if size < 1:
            raise ValueError(f"proxy batch size must be >= 1, got {size}")
        g = torch.Generator().manual_seed(seed)
        if size <= len(images):
            picked = torch.randperm(len(images), generator=g)[:size]
        else:
            picked = torch.randint(len(images), (size,), generator=g)
        # Stratified over the group so a small batch still covers its whole timestep range evenly.
        ordered = group.sort().values
        strata = ((torch.arange(size) + torch.rand(size, generator=g)) * len(ordered) / size).long()
        t = ordered[strata.clamp(max=len(ordered) - 1)][torch.randperm(size, generator=g)]
        noise = torch.randn((size, *images.shape[1:]), generator=g)
        if labels is not None:  # class ids as int64; text embeddings (a text-conditional model's) as they are
            labels = torch.as_tensor(labels)
            labels = labels if labels.is_floating_point() else labels.long()
        picked_labels = None if labels is None else labels[picked].clone()
        return cls(images[picked].float().clone(), t, noise, group, seed, picked_labels)


@torch.no_grad()
def denoising_loss(model: nn.Module, batch: ProxyBatch, scheduler, space: str = "relative") -> float:
    """Mean squared error of a denoiser on a ProxyBatch.

    model: any `model(x, t)` denoiser.
    batch: the fixed batch to evaluate on.
    scheduler: the training noise schedule; its prediction type sets the target.
    space: "relative": MSE to the training target (epsilon, v or x0 per the prediction type), the loss
        the "relative" proxy divides by the base's; "x0": MSE of the clean image implied by the output.
    """
    if space not in SPACES:
        raise ValueError(f"unknown proxy space {space!r}; choose one of {SPACES}")
    denoiser = as_denoiser(model)
    param = next(denoiser.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x0, noise, t = batch.images.to(device), batch.noise.to(device), batch.timesteps.to(device)
    y = None if batch.labels is None else batch.labels.to(device)
    x_t = _noised(scheduler, x0, noise, t)
    was_training = denoiser.training
    denoiser.eval()
    try:
        out = denoiser(x_t, t, y).float()
    finally:
        denoiser.train(was_training)
    if space == "x0":
        return float((predict_x0(scheduler, x_t, out, t) - x0).pow(2).mean())
    return float((out - training_target(scheduler, x0, noise, t)).pow(2).mean())


def finetune(
    model: nn.Module,
    images: torch.Tensor,
    scheduler,
    timesteps,
    *,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    labels: torch.Tensor | None = None,
) -> nn.Module:
    """A plain AdamW loop with the standard diffusion loss, in memory (no checkpoints, no logs).

    model: the denoiser to train in place (returned for convenience).
    images: training images, (N, C, H, W) in [-1, 1].
    scheduler: the training noise schedule; its prediction type sets the target.
    timesteps: the timesteps to draw t from (1-d integer sequence).
    steps: optimizer steps.
    lr: constant AdamW learning rate.
    batch_size: images per step.
    seed: seed of the images, timesteps and noise drawn at each step.
    labels: (N,) class ids of `images`, for a class-conditional model.
    """
    denoiser = as_denoiser(model)
    group = torch.as_tensor(timesteps, dtype=torch.long).flatten()
    param = next(denoiser.parameters())
    device = param.device
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=lr)
    was_training = denoiser.training
    denoiser.train()
    for _ in range(steps):
        picked = torch.randint(len(images), (batch_size,), generator=g)
        x0 = images[picked].to(device)
        t = group[torch.randint(len(group), (batch_size,), generator=g)].to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        y = None if labels is None else labels[picked].to(device)
        prediction = denoiser(_noised(scheduler, x0, noise, t), t, y)
        loss = (prediction - training_target(scheduler, x0, noise, t)).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    denoiser.train(was_training)
    return model


class Proxy:
    """Scores a pruned model by its denoising loss on one group's fixed batch, relative to the base's.

    base: the unpruned denoiser; its loss on the batch is computed once here.
    batch: the fixed held-out ProxyBatch of the group.
    scheduler: the training noise schedule.
    space: "relative" (loss on the training target / base's) or "x0" (x0 MSE / base's x0 MSE).
    finetune_steps: > 0 fine-tunes a copy of each candidate this many steps on the group's timesteps
        (fresh noise, not the batch's) before scoring, so the score reflects what fine-tuning can recover.
    finetune_lr: AdamW learning rate of that fine-tuning.
    finetune_batch_size: images per fine-tuning step.
    train_images: images for fine-tuning and for Taylor importance; default the batch's images.
    train_labels: their class ids (class-conditional models); default the batch's labels.
    """

    def __init__(
        self,
        base: nn.Module,
        batch: ProxyBatch,
        scheduler,
        *,
        space: str = "relative",
        finetune_steps: int = 0,
        finetune_lr: float = 5e-4,
        finetune_batch_size: int = 64,
        train_images: torch.Tensor | None = None,
        train_labels: torch.Tensor | None = None,
    ):
        if space not in SPACES:
            raise ValueError(f"unknown proxy space {space!r}; choose one of {SPACES}")
        if finetune_steps < 0:
            raise ValueError(f"finetune_steps must be >= 0, got {finetune_steps}")
        self.batch, self.scheduler, self.space = batch, scheduler, space
        self.finetune_steps, self.finetune_lr = finetune_steps, finetune_lr
        self.finetune_batch_size = finetune_batch_size
        self.train_images = batch.images if train_images is None else train_images
        self.train_labels = batch.labels if train_images is None else train_labels
        self.base_loss = denoising_loss(base, batch, scheduler, space)
        if not self.base_loss > 0:
            raise ValueError(f"the base model's proxy loss is {self.base_loss}; a relative score needs a positive one")

    def score(self, model: nn.Module) -> float:
        """Loss of `model` (after the optional fine-tuning of a copy) divided by the base's loss."""
        if self.finetune_steps:
            model = finetune(
                copy.deepcopy(model), self.train_images, self.scheduler, self.batch.group_timesteps,
                steps=self.finetune_steps, lr=self.finetune_lr, batch_size=self.finetune_batch_size,
                seed=self.batch.seed + 1,  # other noise than the held-out batch's
                labels=self.train_labels,
            )
        return denoising_loss(model, self.batch, self.scheduler, self.space) / self.base_loss

    def calibration(self, seed: int = 0) -> Calibration:
        """A Calibration for Taylor importance on this group's timesteps."""
        return Calibration(images=self.train_images, scheduler=self.scheduler, timesteps=self.batch.group_timesteps,
                           seed=seed)
