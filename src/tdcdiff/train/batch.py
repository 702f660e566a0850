"""What each training step trains on: the condition checked against the model (`conditioning`: class labels or text
embeddings), and the batch of a step (images, timesteps, noise, conditions) drawn from a generator seeded by (seed,
step, process), so a run resumed from a checkpoint draws exactly what the uninterrupted run would have."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models import num_class_embeds, text_width
from .config import TrainConfig

Null = int | torch.Tensor  # what a dropped condition becomes: the null class id, or the empty prompt's embedding


def conditioning(model: nn.Module, labels: torch.Tensor | None, num_images: int, config: TrainConfig,
                 null_text: torch.Tensor | None = None) -> tuple[torch.Tensor | None, Null | None]:
    """(conditions to train with, what a dropped one becomes) after checking them against the model.

    A class-conditional model takes (N,) class ids in `labels` and drops them to the null class id; a
    text-conditional one (models.text_width) takes (N, L, width) text embeddings in `labels` and drops them to
    `null_text` (L, width), the empty prompt's embedding (config.label_dropout is then caption dropout). An
    unconditional model gets (None, None). Raises ValueError naming both sides when the conditions do not fit the
    model: labels for an unconditional model, or null_text for one that is not text-conditional, included (the
    model would have trained without them, as sample() refuses them).
    """
    if text_width(model) is not None:
        return _text_conditioning(text_width(model), labels, num_images, config, null_text)
    if null_text is not None:
        raise ValueError("null_text was given but the model is not text-conditional (it has no cross-attention); "
                         "drop it")
    classes = num_class_embeds(model)
    if classes is None and labels is not None:
        raise ValueError("labels were given but the model has no class embedding (nor cross-attention), so it would "
                         "train without them; drop them, or train a class-conditional model (e.g. UNet2DModel "
                         "num_class_embeds)")
    if classes is None:
        if config.label_dropout > 0:
            raise ValueError("label_dropout > 0 needs a class- or text-conditional model (e.g. UNet2DModel "
                             "num_class_embeds)")
        return None, None
    if labels is None:
        raise ValueError(f"the model is class-conditional ({classes} class ids) but the data has no labels; "
                         "use labelled data (class subfolders, IDX labels) or an unconditional model")
    labels = torch.as_tensor(labels, dtype=torch.long).flatten()
    if len(labels) != num_images:
        raise ValueError(f"{len(labels)} labels for {num_images} images; give one label per image")
    null = None
    if config.label_dropout > 0:
        null = classes - 1 if config.null_class is None else config.null_class
        if not 0 <= null < classes:
            raise ValueError(f"null_class {null} is not one of the model's {classes} class ids (0..{classes - 1})")
    if labels.min() < 0:
        raise ValueError("some images have no label (-1) but the model is class-conditional; label every image")
    if null is not None and bool((labels == null).any()) and labels.max() < classes - 1:  # an id is free for it
        raise ValueError(f"null_class {null} is also a class of the data (its labels are 0..{labels.max().item()}): "
                         "dropped labels would be read as that class; set null_class to an id no image has, e.g. "
                         f"{classes - 1} (the model's last, used when it is unset)")
    usable = classes - (null is not None and null == classes - 1)
    if labels.max() >= usable or (null is not None and bool((labels == null).any())):
        raise ValueError(
            f"the data has class labels 0..{labels.max().item()} but the model embeds {classes} class ids"
            + (f" with id {null} kept for dropped labels" if null is not None else "")
            + "; use a model with more class embeddings or data with fewer classes"
        )
    return labels, null


def _text_conditioning(width: int, embeddings: torch.Tensor | None, num_images: int, config: TrainConfig,
                       null_text: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if (not isinstance(embeddings, torch.Tensor) or not embeddings.is_floating_point() or embeddings.ndim != 3
            or embeddings.shape[-1] != width or len(embeddings) != num_images):
        got = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else None
        raise ValueError(f"the model is text-conditional (cross_attention_dim {width}): give one text embedding per "
                         f"image, float ({num_images}, tokens, {width}), got {got}; captioned data gives them "
                         "(metadata.jsonl)")
    if config.label_dropout == 0:
        return embeddings, None
    if null_text is None or tuple(null_text.shape) != tuple(embeddings.shape[1:]):
        raise ValueError(f"label_dropout > 0 (caption dropout) needs null_text, the empty prompt's embedding of shape "
                         f"{tuple(embeddings.shape[1:])}, got {None if null_text is None else tuple(null_text.shape)}")
    return embeddings, null_text.to(embeddings.dtype)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of step `step` (0-based) on process `rank` of a run with TrainConfig.seed `seed`."""
    return seed * 1_000_003 + step * 7919 + rank


@dataclass
class Batch:
    """One process's batch of a step: x0 (B, C, H, W) clean images, t (B,) int64 timesteps, noise (B, C, H, W)
    standard normal, y the conditions: (B,) int64 class labels (the null class where dropped), (B, L, width) text
    embeddings (the empty prompt's where dropped), or None for an unconditional model."""

    x0: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    y: torch.Tensor | None


class TrainingBatches:
    """Draws each step's batch on one process.

    images: (N, C, H, W); labels, null: as `conditioning` returns them; timesteps: (K,) int64, the ones to
    draw t from; num_train_timesteps: T, what a mixed-in sample draws t from (config.mix_fraction); batch_size: the
    batch of this process; rank: this process's index; device: where the batches go.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, null: Null | None,
                 timesteps: torch.Tensor, num_train_timesteps: int, config: TrainConfig, batch_size: int, rank: int,
                 device: torch.device):
        self.images = images.to(device)
        self.labels = None if labels is None else labels.to(device)
        self.null = null.to(device) if isinstance(null, torch.Tensor) else null
        self.timesteps, self.num_train_timesteps = timesteps, num_train_timesteps
        self.config, self.batch_size, self.rank, self.device = config, batch_size, rank, device

    def draw(self, step: int) -> Batch:
        """The batch of step `step` (0-based). Also seeds torch's global generator from the same seed, for the
        model's dropout, if it has any."""
        c, size, device = self.config, self.batch_size, self.device
        seed = step_seed(c.seed, step, self.rank)
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        picked = torch.randint(len(self.images), (size,), generator=g).to(device)
        x0 = self.images[picked]
        t = self.timesteps[torch.randint(len(self.timesteps), (size,), generator=g)]
        if c.mix_fraction > 0 and len(self.timesteps) < self.num_train_timesteps:
            outside = torch.rand(size, generator=g) < c.mix_fraction
            t = torch.where(outside, torch.randint(self.num_train_timesteps, (size,), generator=g), t)
        t = t.to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        y = None if self.labels is None else self.labels[picked]
        if self.null is not None:
            dropped = (torch.rand(size, generator=g) < c.label_dropout).to(device)
            null = torch.full_like(y, self.null) if isinstance(self.null, int) else self.null.expand_as(y)
            y = torch.where(dropped.view(-1, *[1] * (y.ndim - 1)), null, y)
        return Batch(x0, t, noise, y)
