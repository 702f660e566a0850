"""Sample-based quality: each model's samples per sampling seed scored by FID, KID and precision/recall against the
real images, and the judge's margin from FID between real images alone."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from ..features import check_reference, feature_net_for
from ..metrics import PR_NEIGHBOURS, compute_fid, real_vs_real
from ..pipeline import sample, save_grid
from ..verdict import ALPHA
from .entry import balanced_labels, default_cache_dir, slug


def default_feature_net(reference_images: torch.Tensor, reference_labels: torch.Tensor, *, name: str,
                cache_dir: str | Path | None = None) -> nn.Module:
    """The default feature network of a data set (features.feature_net_for, cached in cache_dir, default
    default_cache_dir()/features)."""
    return feature_net_for(reference_images, reference_labels, cache_dir=Path(cache_dir or default_cache_dir() /
                                                                              "features"), name=name)


def check_feature_net(reference_images: torch.Tensor, reference_labels: torch.Tensor | None, name: str) -> None:
    """What default_feature_net needs, checked before hours of training that end in FID: labelled square images
    (features.check_reference) and a cache folder it can write (default_cache_dir: TDCDIFF_CACHE named when not).
    Raises ValueError naming the fix."""
    check_reference(reference_images, reference_labels, name)
    default_cache_dir()


def score_seeds(name: str, runner, scheduler, reference_images: torch.Tensor, net: nn.Module, *, seeds, sample_shape,
                sampler: str, steps: int, num_samples: int, reference_name: str, num_classes: int | None = None,
                device=None, decode=None, grid_dir: str | Path | None = None, say=None, cache_interval: int = 1,
                cache_depth: int | None = None) -> tuple[list, list, Path]:
    """Sample `num_samples` images from one model per seed and score each seed's images (metrics.compute_fid).

    name: the model's name (progress lines, the grid's file). runner: a pipeline.SamplingModel. seeds: sampling
    seeds; each seed fixes the initial noise, so two models sampled with the same seed are paired. num_classes:
    the data's class count, for a class-conditional model (class-balanced labels, see balanced_labels). decode:
    latents -> images before scoring (latent diffusion). grid_dir: if given, a grid of the first seed's first 64
    images is written there as samples_<slug(name)>.png. say: a print-like function for one line per seed.
    cache_interval, cache_depth: feature caching while sampling (pipeline.sample's).
    Returns (FidResults, one per seed; the timesteps the sampler visited; the grid's path or None).
    """
    results, grid, visited = [], None, []
    for seed in seeds:
        start = time.perf_counter()
        out = sample(runner, scheduler, sample_shape=sample_shape, sampler=sampler, steps=steps,
                     num_images=num_samples, seed=seed, device=device, progress=False, decode=decode,
                     class_labels=balanced_labels(runner.model, num_samples, num_classes),
                     cache_interval=cache_interval, cache_depth=cache_depth)
        result = compute_fid(out.images, reference_images, net, sampler=sampler, steps=steps, seed=seed,
                             reference_name=reference_name)
        if say is not None:
            pr = (f", precision {result.precision:.3f}, recall {result.recall:.3f}" if result.precision is not None
                  else "")
            say(f"  {name}: seed {seed}: FID {result.fid:.2f}, KID {result.kid_mean:.4f}{pr} "
                f"({time.perf_counter() - start:.1f} s)")
        results.append(result)
        visited = out.timesteps
        if grid_dir is not None and grid is None:
            grid = save_grid(out.images[:64], Path(grid_dir) / f"samples_{slug(name)}.png")
    return results, visited, grid


def judge_protocol(reference_images: torch.Tensor, net: nn.Module, num_samples: int,
                   margin: float | None = None) -> dict:
    """The judge's settings for FID verdicts at `num_samples` images per seed: the margin and where it came from.

    The margin is the largest FID loss that counts as none (verdict.judge). By default it is the spread of the
    metric itself: the sd, over metrics.REAL_SPLITS random splits, of FID between two disjoint sets of real images
    of num_samples each (metrics.real_vs_real), with this feature network. That is how far FID moves between two
    draws of the data itself at this sample size: a model worse than the reference by less than that is worse by
    less than the metric's own spread, and a larger loss is one a single pair of measurements could show. It
    scales with the feature network (a FID unit differs between networks) and with the sample count, as it
    must. margin: a number to use instead (>= 0, FID units), e.g. a loss the user has decided not to care about.
    Returns {"margin", "margin_from", "real_vs_real" (real_vs_real's dict), "alpha", "feature_net_info" (the
    classifier's design, feature dimension and held-out accuracy; {} for another network)}.
    """
    real = real_vs_real(reference_images, net, num_samples)
    given = margin is not None
    info = getattr(net, "info", {})
    return {
        "margin": float(margin) if given else real["fid_sd"],
        "margin_from": "given" if given else
        f"real-vs-real spread: sd of FID between two disjoint sets of {real['n']} real images over "
        f"{real['splits']} random splits (mean {real['fid_mean']:.3f})" + (
            f"; the data hold too few images for two sets of {num_samples}, so the spread is that of {real['n']}: "
            "larger, a more lenient margin (give one to be stricter)" if real["n"] < num_samples else ""),
        "real_vs_real": real,
        "alpha": ALPHA,
        "feature_net_info": {k: info[k] for k in ("design", "version", "num_features", "accuracy", "held_out_count",
                                                  "train_count") if k in info},
        "precision_recall": f"improved precision/recall (Kynkaanniemi et al. 2019), k={PR_NEIGHBOURS} nearest "
                            "neighbours, generated images against as many reference images (drawn by the seed)",
    }
