"""The conditions of sample()'s images: class labels (checked against the model's class embedding and the data's
classes) or text embeddings (checked against the model's cross-attention width), and those of the unconditional
pass that classifier-free guidance (Ho & Salimans 2022) steers from: the null class or the empty prompt."""

from __future__ import annotations

import torch
from torch import nn

from .models import Denoiser, num_class_embeds, text_width
from .router import Router
from .settings import is_integer


def _class_labels(model: nn.Module, class_labels, num_images: int, guidance_scale: float,
                  null_class: int | None, num_classes: int | None = None) -> torch.Tensor | None:
    """class_labels as (num_images,) int64, after checking them against the model's class embedding and, when
    known, the data's classes (ids 0..num_classes-1; the null class is no class of the data)."""
    classes = num_class_embeds(model)
    if class_labels is None:
        if classes is not None:
            raise ValueError(
                f"the model is class-conditional ({classes} class ids): pass class_labels (an int or one per "
                "image; `tdcdiff sample --class N`)"
            )
        if guidance_scale != 1.0:
            raise ValueError("guidance_scale needs class labels and a model trained with label dropout; this model "
                             "has no class embedding: drop --guidance (guidance_scale)")
        return None
    if classes is None:
        raise ValueError("class_labels were given but the model has no class embedding; drop them")
    try:
        given = torch.as_tensor(class_labels).flatten()
    except (TypeError, ValueError, RuntimeError, OverflowError):  # text, ids beyond int64, ragged lists
        raise ValueError(f"class labels must be integer class ids in 0..{classes - 1}, got {class_labels!r:.80}") \
            from None
    if given.is_floating_point() or given.is_complex() or given.dtype == torch.bool:  # 2.7 would be class 2
        shown = class_labels if isinstance(class_labels, (int, float)) else given[:3].tolist()
        raise ValueError(f"class labels must be integer class ids, got {str(given.dtype).removeprefix('torch.')} "
                         f"labels: {shown}")
    labels = given.long()
    if labels.numel() == 1:
        labels = labels.expand(num_images)
    if labels.numel() != num_images:
        raise ValueError(f"class_labels must be one int or one per image ({num_images}), got {labels.numel()}")
    if labels.min() < 0 or labels.max() >= classes:
        raise ValueError(f"class labels must be in 0..{classes - 1} (the model embeds {classes} ids), "
                         f"got {labels.min().item()}..{labels.max().item()}")
    if guidance_scale != 1.0:  # null_class first: one of the data's classes is its fault, not the labels'
        if null_class is not None and not is_integer(null_class):
            raise ValueError(f"null_class must be an integer class id, got {null_class!r}")
        if null_class is None:
            raise ValueError(
                "guidance_scale != 1 needs null_class, the class id the model was trained with for dropped labels "
                "(train with TrainConfig.label_dropout > 0; bundles and runs record it)"
            )
        if not 0 <= null_class < classes:
            raise ValueError(f"null_class must be in 0..{classes - 1}, got {null_class}")
        if num_classes is not None and null_class < num_classes:
            raise ValueError(f"null_class {null_class} is also a class of the data (0..{num_classes - 1}): guidance "
                             "would steer from that class, not from no class; give the id the model was trained with "
                             "for dropped labels")
    upper = classes if num_classes is None else min(classes, num_classes)
    upper -= null_class == upper - 1  # the null class last: the ids below it are the data's
    if labels.max() >= upper or (null_class is not None and bool((labels == null_class).any())):
        null = "" if null_class is None else f", id {null_class} the null class for dropped labels"
        raise ValueError(f"class labels must be classes of the data, 0..{upper - 1} (the model embeds {classes} ids"
                         f"{null}: no image was labelled with the others), got "
                         f"{labels.min().item()}..{labels.max().item()}")
    return labels


def sample_conditions(model: nn.Module, num_images: int, guidance_scale: float, class_labels, null_class: int | None,
                num_classes: int | None, prompt_embeds, negative_prompt_embeds) -> tuple[torch.Tensor | None, ...]:
    """(each image's condition, each image's condition in guidance's unconditional pass (None without guidance)):
    class ids and the null class, or text embeddings and the negative (by default the empty) prompt's."""
    width = text_width(model)
    if width is not None:
        return _text_conditions(model, width, num_images, guidance_scale, class_labels, prompt_embeds,
                                negative_prompt_embeds)
    if prompt_embeds is not None or negative_prompt_embeds is not None:
        raise ValueError("prompt embeddings were given but the model is not text-conditional (it has no "
                         "cross-attention); drop them")
    labels = _class_labels(model, class_labels, num_images, guidance_scale, null_class, num_classes)
    return labels, None if labels is None or guidance_scale == 1.0 else torch.full_like(labels, null_class)


def _carried_null_text(model: nn.Module) -> torch.Tensor | None:
    """The empty prompt's embedding a text-conditional model carries (models.Denoiser.null_text; a bundle's do)."""
    expert = model.experts[0] if isinstance(model, Router) else model
    return expert.null_text if isinstance(expert, Denoiser) else None


def _embeddings(value, name: str, num_images: int, width: int) -> torch.Tensor:
    if (not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.ndim != 3
            or value.shape[-1] != width or len(value) not in (1, num_images)):
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{name} must be float text embeddings of shape ({num_images} or 1, tokens, {width}), got "
                         f"{got}")
    return value.float().expand(num_images, *value.shape[1:])


def _text_conditions(model: nn.Module, width: int, num_images: int, guidance_scale: float, class_labels,
                     prompt_embeds, negative_prompt_embeds) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if class_labels is not None:
        raise ValueError("the model is text-conditional: it takes prompts (TDCPipeline(prompt=...), or "
                         "prompt_embeds), not class_labels")
    carried = _carried_null_text(model)
    if prompt_embeds is None:
        if carried is None:
            raise ValueError(f"the model is text-conditional (cross_attention_dim {width}): pass prompt_embeds "
                             f"(N or 1, tokens, {width}), or prompt=... to a bundle's pipeline")
        if guidance_scale != 1.0 or negative_prompt_embeds is not None:
            raise ValueError("guidance_scale and negative prompts need a prompt: without one the model samples "
                             "unconditionally (the empty prompt)")
        return None, None  # the model's own empty prompt (Denoiser.null_text): unconditional samples
    prompts = _embeddings(prompt_embeds, "prompt_embeds", num_images, width)
    if guidance_scale == 1.0:
        return prompts, None
    negative = negative_prompt_embeds if negative_prompt_embeds is not None else carried
    if negative is None:
        raise ValueError("guidance_scale != 1 needs negative_prompt_embeds (usually the empty prompt's embedding), "
                         "or a model that carries the empty prompt's (a bundle's)")
    negative = _embeddings(negative if negative.ndim == 3 else negative[None], "negative_prompt_embeds", num_images,
                           width)
    if negative.shape != prompts.shape:
        raise ValueError(f"negative_prompt_embeds have {negative.shape[1]} tokens but prompt_embeds "
                         f"{prompts.shape[1]}; embed both with the same tokenizer")
    return prompts, negative
