"""Measure a set of models side by side: FID/KID and precision/recall, sampling FLOPs, sampling time, memory,
training compute, and on held-out images the denoising loss and bits/dim.

Every number in the result states how it was measured (its "protocol" entry): the sampler and step count, the
sample count and seeds, the feature network (with its held-out accuracy) and reference set, the judge's margin and
the real-vs-real FID it comes from, the FLOPs convention (2 x multiply-accumulates), and for times and memory the
method. Times are ratios against the first model, measured interleaved in the same process, because the machines
this runs on are shared and noisy.

    entry.py     ModelEntry, slug, default_cache_dir, balanced_labels, trajectory_flops
    fid.py       sampling + FID/KID/precision/recall per seed; the judge's margin (real-vs-real)
    held_out.py  held-out loss and bits/dim
    timing.py    time_sampling, time_rounds, memory
    protocol.py  the protocol dict, FORMAT, pool
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..pipeline import SamplingModel
from .entry import ModelEntry, balanced_labels, default_cache_dir, slug, trajectory_flops
from .fid import check_feature_net, default_feature_net, judge_protocol, score_seeds
from .held_out import (
    BPD_SAMPLES,
    HELD_OUT_IMAGES,
    held_out_loss,
    held_out_loss_se,
    held_out_protocol,
    held_out_record,
)
from .protocol import FLOPS_CONVENTION, FORMAT, pool, protocol, sample_scores
from .timing import (
    TIMING_CLOCK,
    _peak_forward_bytes,  # noqa: F401  (tests probe it in a fresh process)
    memory_record,
    time_rounds,
    time_sampling,
    weight_bytes,
)

__all__ = ["BPD_SAMPLES", "FLOPS_CONVENTION", "FORMAT", "HELD_OUT_IMAGES", "ModelEntry", "TIMING_CLOCK",
           "balanced_labels", "check_feature_net", "default_cache_dir", "default_feature_net", "evaluate",
           "held_out_loss", "held_out_loss_se", "judge_protocol", "pool", "sample_scores", "score_seeds", "slug",
           "time_rounds", "time_sampling", "trajectory_flops", "weight_bytes"]


def _check(entries: list[ModelEntry], seeds) -> None:
    if not entries:
        raise ValueError("evaluate needs at least one ModelEntry")
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    if not seeds:
        raise ValueError("evaluate needs at least one sampling seed")


def evaluate(
    entries: list[ModelEntry], scheduler, reference_images: torch.Tensor, reference_labels: torch.Tensor, *,
    sample_shape: tuple[int, int, int], sampler: str = "ddim", steps: int = 50, num_samples: int = 512,
    seeds: tuple[int, ...] = (0,), feature_cache_dir: str | Path | None = None, reference_name: str = "reference",
    feature_net: nn.Module | None = None, margin: float | None = None, timing_batches: tuple[int, ...] = (1, 64),
    timing_repeats: int = 3, grid_dir: str | Path | None = None, held_out: torch.Tensor | None = None,
    loss_grouping=None, num_classes: int | None = None, held_out_labels: torch.Tensor | None = None,
    bpd_samples: int | None = BPD_SAMPLES, bpd_variance: str = "fixed_small", device: str | torch.device | None = None,
    progress: bool = True, decode=None,
) -> dict:
    """Measure every model under one protocol; returns a JSON-able dict (see `report.write_report`).

    entries: the models; the FIRST is the reference that ratios (FLOPs, time, training compute) are taken to.
    scheduler: the training noise schedule all models share.
    reference_images, reference_labels: the real images FID/KID compare against (NCHW in [-1, 1]) and their
        labels (the default feature network is a classifier trained on them; -1 = unlabeled).
    sample_shape: (C, H, W) of one image. sampler, steps: how images are generated ("ddpm", "ddim",
        "dpm-solver++"). num_samples: images per model and seed. seeds: sampling seeds (FID mean and sd
        are over them; the i-th seed of every model shares its initial noise, so scores pair by seed).
    feature_cache_dir: where the feature classifier is cached (default: `default_cache_dir()/features`);
    reference_name: the data set's short name (names the classifier and the reference set); feature_net: a network
        to use instead of the classifier, e.g. metrics.inception_feature_extractor.
    margin: the judge's FID margin (verdict.judge), FID units; None: the real-vs-real spread (fid.judge_protocol).
    timing_batches: batch sizes at which a full sampling run is timed; timing_repeats: timed runs per model and
        batch (after one warm-up), interleaved across models; the median is reported.
    grid_dir: if given, a grid of each model's first-seed samples is written there as samples_<name>.png.
    held_out: images none of the models trained on; if given, each model's denoising loss on them is measured
        (`held_out_loss_se`: means and standard errors over images), overall and per group of loss_grouping
        (a grouping.Grouping, e.g. the TDC run's), and so is the variational bound on their NLL in bits/dim
        (likelihood.nll_bound on the first HELD_OUT_IMAGES of them), in total and per group, with standard
        errors and each model's paired difference to the first model.
    num_classes, held_out_labels: for class-conditional models, the data's class count (samples are drawn
        class-balanced: class i % num_classes for image i) and the held-out images' class ids.
    bpd_samples: timestep strata per image in the bits/dim estimate (None: all T terms, N x T model calls);
    bpd_variance: the reverse-step variance of the bound, "fixed_small" (beta_tilde_t) or "fixed_large" (beta_t).
    device: where sampling runs (default: CUDA when available, else CPU); models are moved there. progress: print
        one line per measurement. decode: latent diffusion: latents (sample_shape) -> images (latent.Decoder),
        applied before FID and grids (reference_images are images); timing measures the denoising only.
    """
    _check(entries, seeds)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    say = print if progress else (lambda *a, **k: None)
    net = feature_net or default_feature_net(reference_images, reference_labels, name=reference_name,
                                             cache_dir=feature_cache_dir)
    models = [e.denoiser.to(device).eval() for e in entries]
    runners = [SamplingModel(m) for m in models]  # the default fast path, built once per model
    sampling = dict(sample_shape=tuple(sample_shape), sampler=sampler, steps=steps, num_classes=num_classes)
    records = [_measure_samples(entry, runner, scheduler, reference_images, net, seeds=seeds, num_samples=num_samples,
                                reference_name=reference_name, device=device, decode=decode, grid_dir=grid_dir,
                                memory_batch=max(timing_batches), say=say, **sampling)
               for entry, runner in zip(entries, runners)]
    bounds = [] if held_out is None else _measure_held_out(
        records, models, held_out.to(device), scheduler, loss_grouping, say=say, bpd_samples=bpd_samples,
        bpd_variance=bpd_variance, labels=None if held_out_labels is None else held_out_labels.to(device))
    _add_times(records, runners, scheduler, batches=timing_batches, repeats=timing_repeats, say=say, **sampling)
    stated = protocol(sampler=sampler, steps=steps, num_samples=num_samples, seeds=seeds,
                      feature_net=getattr(net, "description", type(net).__name__), reference_name=reference_name,
                      judge=judge_protocol(reference_images, net, num_samples, margin),
                      reference_count=len(reference_images),
                      sampling_path=" / ".join(dict.fromkeys(f"{r.compile}/{r.precision}" for r in runners)),
                      timing_repeats=timing_repeats, timing_batches=timing_batches, ratios_to=records[0]["name"],
                      device=device)
    if held_out is not None:
        stated |= held_out_protocol(held_out, loss_grouping, bounds[0], bpd_samples)
    return {"format": FORMAT, "protocol": stated, "models": records}


def _measure_samples(entry: ModelEntry, runner, scheduler, reference_images, net, *, sample_shape, seeds,
                     memory_batch: int, device, say, **scoring) -> dict:
    """One model's record of everything its samples show (score_seeds: FID/KID/precision/recall per seed, the grid)
    and of its cost per image (sampling FLOPs along the visited timesteps, parameters, memory at memory_batch)."""
    fids, visited, grid = score_seeds(entry.name, runner, scheduler, reference_images, net, seeds=seeds,
                                      sample_shape=sample_shape, device=device, say=say, **scoring)
    model = runner.model
    return {"name": entry.name, "notes": entry.notes, **sample_scores(fids),
            "sampling_flops": {"per_image": trajectory_flops(entry, visited, sample_shape), "steps": scoring["steps"]},
            "parameters": sum(p.numel() for p in model.parameters()),
            "memory": memory_record(model, visited, sample_shape, memory_batch, device),
            "train_flops": int(entry.train_flops), "sample_grid": str(grid) if grid is not None else None}


def _measure_held_out(records: list[dict], models: list, held_out, scheduler, grouping, *, say, **measure) -> list:
    """Add held_out_record's entries to every model's record (the bound paired with the first model's); returns the
    bounds (likelihood.NllBound), in the models' order."""
    bounds = []
    for record, model in zip(records, models):
        found, bound = held_out_record(model, held_out, scheduler, grouping, first=bounds[0] if bounds else None,
                                       **measure)
        record.update(found)
        bounds.append(bound)
        total = found["held_out_bpd"]["total"]
        say(f"  {record['name']}: held-out bound {total['mean']:.4f} ± {total['se']:.4f} bits/dim "
            f"({found['held_out_bpd']['seconds']:.1f} s)")
    return bounds


def _add_times(records: list[dict], runners: list, scheduler, *, batches, repeats, say, **sampling) -> None:
    """Time every model's sampling at each batch (time_sampling, interleaved) and give each record its "time",
    and its FLOPs, time and training-compute ratios to the first model."""
    timing = {}
    for batch in batches:
        say(f"  timing sampling at batch {batch} ({repeats} interleaved repeats)")
        timing[batch] = time_sampling(runners, scheduler, batch=batch, repeats=repeats, **sampling)
    first = records[0]
    for i, record in enumerate(records):
        record["sampling_flops"]["ratio"] = record["sampling_flops"]["per_image"] / first["sampling_flops"]["per_image"]
        record["train_flops_ratio"] = record["train_flops"] / first["train_flops"] if first["train_flops"] else None
        record["time"] = {f"batch_{b}": {"median_s": t[i], "ratio": t[i] / t[0]} for b, t in timing.items()}
