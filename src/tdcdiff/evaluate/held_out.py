"""Quality on images no model trained on: the denoising loss (with standard errors over images) and the variational
bound on the NLL in bits/dim."""

from __future__ import annotations

import statistics

import torch

from ..likelihood import nll_bound
from ..losses import loss_curve, per_image_loss

HELD_OUT_IMAGES = 256  # images per timestep in the held-out loss, and images in the bits/dim bound
BPD_SAMPLES = 16  # timestep strata per image in the bits/dim estimate: SE ~0.05 bits on 256 digits images


def held_out_loss(model, images: torch.Tensor, scheduler, grouping=None, *, seed: int = 0,
                  labels: torch.Tensor | None = None) -> dict:
    """Denoising loss on images the model never trained on: the mean over all timesteps ("all") and over
    each group of a grouping.Grouping ("group i"), as grouping.per_timestep_loss measures it (100 evenly
    spaced t, HELD_OUT_IMAGES images, fixed noise from `seed`). labels: the images' class ids
    (class-conditional models). The means of held_out_loss_se.
    """
    return held_out_loss_se(model, images, scheduler, grouping, seed=seed, labels=labels)[0]


def held_out_loss_se(model, images: torch.Tensor, scheduler, grouping=None, *, seed: int = 0,
                     labels: torch.Tensor | None = None) -> tuple[dict, dict]:
    """held_out_loss's means and their standard errors over images, from one measurement.

    Returns (means, standard errors), each {"all": ..., "group i": ...}. A mean averages the log-interpolated
    curve of the per-timestep mean loss (grouping.loss_curve); its standard error is that of the same average
    taken over each image's own curve (sd over images / sqrt(images); NaN for one image).
    """
    points, losses = per_image_loss(model, images, scheduler, images_per_point=HELD_OUT_IMAGES, seed=seed,
                                    labels=labels)
    num_train = scheduler.config.num_train_timesteps
    losses = losses.double().numpy()  # [P timesteps, M images]
    mean = loss_curve(points, losses.mean(1), num_train)
    each = [loss_curve(points, image, num_train) for image in losses.T]
    spans = {"all": slice(None), **{f"group {g.index}": slice(g.start, g.end)
                                    for g in (grouping.groups if grouping is not None else [])}}
    means = {key: float(mean[span].mean()) for key, span in spans.items()}
    ses = {key: statistics.stdev(float(c[span].mean()) for c in each) / len(each) ** 0.5 if len(each) > 1
           else float("nan") for key, span in spans.items()}
    return means, ses


def held_out_record(model, held_out: torch.Tensor, scheduler, grouping=None, *, labels: torch.Tensor | None = None,
                    bpd_samples: int | None = BPD_SAMPLES, bpd_variance: str = "fixed_small", first=None):
    """One model's held-out measurements: (the record's entries "held_out_loss", "held_out_loss_se" and
    "held_out_bpd", the bound (likelihood.NllBound) itself).

    held_out: images on the model's device; grouping: per-group shares (a grouping.Grouping or None); labels: their
    class ids (class-conditional models). The bound takes the first HELD_OUT_IMAGES images, bpd_samples strata
    (None: all T terms) and bpd_variance ("fixed_small" or "fixed_large"); "vs_first" is its paired difference
    to `first` (the first model's bound; None: this is the first model).
    """
    means, ses = held_out_loss_se(model, held_out, scheduler, grouping, labels=labels)
    bound = nll_bound(model, held_out[:HELD_OUT_IMAGES], scheduler, grouping=grouping, samples=bpd_samples,
                      variance=bpd_variance, labels=None if labels is None else labels[:HELD_OUT_IMAGES])
    bpd = bound.summary()
    kept = {key: bpd[key] for key in ("total", "prior", "decoder", "groups", "seconds") if key in bpd}
    record = {"held_out_loss": means, "held_out_loss_se": ses,
              "held_out_bpd": kept | {"vs_first": bound.difference(first if first is not None else bound)}}
    return record, bound


def held_out_protocol(held_out: torch.Tensor, grouping, first_bound, bpd_samples: int | None) -> dict:
    """The protocol entries of the held-out measures: how the loss and the bound were measured."""
    return {
        "held_out_loss": f"mean squared error of the training target on {min(len(held_out), HELD_OUT_IMAGES)} "
                         "held-out images no model trained on, at 100 evenly spaced timesteps (interpolated "
                         "between), fixed noise; averaged over all timesteps and over each group; "
                         "held_out_loss_se: its standard error over images",
        "held_out_loss_groups": [f"t {g.start}-{g.end - 1}" for g in grouping.groups] if grouping is not None else [],
        "held_out_bpd": first_bound.method() + strata_note(bpd_samples, first_bound) + "; the same images, "
                        "timesteps and noise for every model, so 'vs_first' (the paired difference to the "
                        "first model) usually has a smaller SE",
    }


def strata_note(samples: int | None, bound) -> str:
    """How the bound's strata were counted: `samples` of equal log-SNR width (as far as whole timesteps allow),
    also cut at the group edges (likelihood.timestep_strata)."""
    if bound.exact:
        return ""
    edges = len(bound.grouping) - 1 if bound.grouping is not None else 0
    return (f"; strata: {samples} of equal log-SNR width asked for (bpd_samples, evaluate.BPD_SAMPLES by default), "
            f"also cut at the {edges} group edge(s): {bound.strata} in all")
