"""Measure a set of models side by side: FID/KID, sampling FLOPs, sampling time, memory, training compute.

Every number in the result states how it was measured (its "protocol" entry): the sampler and step count, the
sample count and seeds, the feature network and reference set, the FLOPs convention (2 x multiply-accumulates),
and for times and memory the method. Times are ratios against the first model,
measured interleaved in the same process, because the machines this runs on are shared and noisy.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .models import as_denoiser

FLOPS_CONVENTION = "FLOPs = 2 x multiply-accumulates"
FORMAT = "tdcdiff-evaluation/1"


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
    """Where feature networks are cached: $TDCDIFF_CACHE, else $XDG_CACHE_HOME/tdcdiff, else ~/.cache/tdcdiff."""
    if os.environ.get("TDCDIFF_CACHE"):
        return Path(os.environ["TDCDIFF_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tdcdiff"


def slug(name: str) -> str:
    """A file-name-safe form of a model name ("TDC (mix 0.5)" -> "tdc-mix-0-5")."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "model"


def trajectory_flops(entry: ModelEntry, timesteps: list[int], sample_shape: tuple[int, int, int]) -> int:
    """FLOPs of one image along the visited timesteps, as ModelEntry.flops_per_image says to count them."""
    from .flops import count_flops

    how = entry.flops_per_image
    if callable(how):
        return int(how(timesteps))
    if isinstance(how, int):
        return how * len(timesteps)
    if hasattr(entry.denoiser, "trajectory_flops"):
        return entry.denoiser.trajectory_flops(timesteps)
    return count_flops(entry.denoiser, sample_shape) * len(timesteps)


def _weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


@torch.no_grad()
def _peak_forward_bytes(model: nn.Module, timesteps: list[int], sample_shape, batch: int, device) -> int:
    """Peak tensor bytes allocated during one forward at `batch`, max over the distinct experts visited."""
    grouping = getattr(model, "grouping", None)
    if grouping is not None:  # one forward per expert the trajectory uses is enough: they run one at a time
        groups = grouping.group_of(torch.as_tensor(timesteps))
        probes = [timesteps[int((groups == g).nonzero()[0])] for g in groups.unique().tolist()]
    else:
        probes = timesteps[:1]
    x = torch.randn((batch, *sample_shape), generator=torch.Generator().manual_seed(0)).to(device)
    model = as_denoiser(model)  # gives a class-conditional model a label
    peak = 0
    for t_value in probes:
        t = torch.full((batch,), t_value, dtype=torch.long, device=device)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            model(x, t)
            peak = max(peak, torch.cuda.max_memory_allocated(device) - before)
            continue
        from torch.profiler import ProfilerActivity, profile

        # Kineto, behind torch.profiler, prints "USDT: ... profiler_start/stop" to stderr at its highest level
        # (5); 6 silences it. It reads the variable once, at the process's first profile, so a level the user
        # set, or one fixed by an earlier profile, stays.
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model(x, t)
        # Each op's own allocations minus frees, in start order: the running sum is the live tensor bytes.
        live = 0
        for _, delta in sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()):
            live += delta
            peak = max(peak, live)
    return peak


def balanced_labels(model: nn.Module, num_images: int, num_classes: int | None) -> torch.Tensor | None:
    """Class ids 0, 1, .., num_classes - 1, 0, 1, .. for `num_images` samples of a class-conditional model (so FID
    compares against a class-balanced sample); None for an unconditional one."""
    from .models import num_class_embeds

    if num_class_embeds(model) is None:
        return None
    if num_classes is None:
        raise ValueError("the model is class-conditional: give the data's num_classes to draw class-balanced samples")
    return torch.arange(num_images) % num_classes


def time_sampling(models: list, scheduler, *, sample_shape, sampler, steps, batch, repeats,
                  num_classes: int | None = None, clock: Callable[[], float] | None = None) -> list[float]:
    """The median duration of one full sampling run (`steps` steps of `sampler`, `batch` images in one batch) of
    each model, in seconds of `clock`; returns one float per model, in the order given.

    models: pipeline.SamplingModel runners (their fast path is what is timed). num_classes: the data's class
        count, for class-conditional models (each run samples class-balanced labels, see `balanced_labels`).
    clock: None: on a CPU, thread CPU time with one intra-op thread (latency.one_thread), which other processes
        on a shared machine do not inflate (see latency's module doc); on a GPU, wall seconds (sampling
        returns images on the CPU, which waits for the GPU). Or any clock, e.g. time.perf_counter.
    Interleaved: there are repeats + 1 rounds and each round runs every model once, in order, with the round's
    seed (the same noise for every model); the first round warms caches and allocators up and is not counted,
    so slow drift of a shared machine hits every model alike.
    Raises what pipeline.sample raises (e.g. ValueError for an unknown sampler).
    """
    from .latency import device_of, one_thread
    from .pipeline import sample

    on_cpu = device_of(models[0].model).type == "cpu"
    clock = clock or (time.thread_time if on_cpu else time.perf_counter)
    times: list[list[float]] = [[] for _ in models]
    with one_thread() if on_cpu else contextlib.nullcontext():
        for repeat in range(repeats + 1):
            for i, model in enumerate(models):
                start = clock()
                sample(model, scheduler, sample_shape=sample_shape, sampler=sampler, steps=steps, num_images=batch,
                       batch_size=batch, seed=repeat, progress=False,
                       class_labels=balanced_labels(model.model, batch, num_classes))
                if repeat:  # the first round warms up caches and allocators; it is not counted
                    times[i].append(clock() - start)
    return [statistics.median(t) for t in times]


TIMING_CLOCK = "thread CPU time with one thread on a CPU, wall clock on a GPU"


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
    from .losses import loss_curve, per_image_loss

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


def evaluate(
    entries: list[ModelEntry],
    scheduler,
    reference_images: torch.Tensor,
    reference_labels: torch.Tensor,
    *,
    sample_shape: tuple[int, int, int],
    sampler: str = "ddim",
    steps: int = 50,
    num_samples: int = 512,
    seeds: tuple[int, ...] = (0,),
    feature_cache_dir: str | Path | None = None,
    reference_name: str = "reference",
    feature_net: nn.Module | None = None,
    timing_batches: tuple[int, ...] = (1, 64),
    timing_repeats: int = 3,
    grid_dir: str | Path | None = None,
    held_out: torch.Tensor | None = None,
    loss_grouping=None,
    num_classes: int | None = None,
    held_out_labels: torch.Tensor | None = None,
    bpd_samples: int | None = BPD_SAMPLES,
    bpd_variance: str = "fixed_small",
    device: str | torch.device | None = None,
    progress: bool = True,
    decode=None,
) -> dict:
    """Measure every model under one protocol; returns a JSON-able dict (see `report.write_report`).

    entries: the models; the FIRST is the reference that ratios (FLOPs, time, training compute) are taken to.
    scheduler: the training noise schedule all models share.
    reference_images, reference_labels: the real images FID/KID compare against (NCHW in [-1, 1]) and their
        labels (the default feature network is a classifier trained on them; -1 = unlabeled).
    sample_shape: (C, H, W) of one image. sampler, steps: how images are generated ("ddpm", "ddim",
        "dpm-solver++"). num_samples: images per model and seed. seeds: sampling seeds (FID mean and sd
        are over them).
    feature_cache_dir: where the feature classifier is cached (default: `default_cache_dir()/features`).
    reference_name: short name of the data set (names the feature classifier and the reference set).
    feature_net: a feature network to use instead of the classifier, e.g. metrics.inception_feature_extractor.
    timing_batches: batch sizes at which a full sampling run is timed. timing_repeats: timed runs per model
        and batch (after one warm-up), interleaved across models; the median is reported.
    grid_dir: if given, a grid of each model's first-seed samples is written there as samples_<name>.png.
    held_out: images none of the models trained on; if given, each model's denoising loss on them is measured
        (`held_out_loss_se`: means and standard errors over images), overall and per group of loss_grouping
        (a grouping.Grouping, e.g. the TDC run's), and so is the variational bound on their NLL in bits/dim
        (likelihood.nll_bound on the first HELD_OUT_IMAGES of them), in total and per group, with standard
        errors and each model's paired difference to the first model.
    num_classes, held_out_labels: for class-conditional models, the data's class count (samples are drawn
        class-balanced: class i % num_classes for image i) and the held-out images' class ids.
    bpd_samples: timestep strata per image in the bits/dim estimate (None: all T terms, N x T model calls).
    bpd_variance: the reverse-step variance of the bound, "fixed_small" (beta_tilde_t) or "fixed_large" (beta_t).
    device: where sampling runs (default: CUDA when available, else CPU); models are moved there.
    progress: print one line per measurement.
    decode: latent diffusion: latents (sample_shape) -> images (latent.Decoder), applied before FID and grids
        (reference_images are images); timing measures the denoising only (the decoder is the same for all).
    """
    from .likelihood import nll_bound
    from .metrics import compute_fid, feature_net_for, summarize_seeds
    from .pipeline import TIMESTEP_SPACING, SamplingModel, sample, save_grid

    if not entries:
        raise ValueError("evaluate needs at least one ModelEntry")
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    if not seeds:
        raise ValueError("evaluate needs at least one sampling seed")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    say = print if progress else (lambda *a, **k: None)
    sample_shape = tuple(sample_shape)
    if feature_net is None:
        feature_net = feature_net_for(reference_images, reference_labels,
                                      cache_dir=Path(feature_cache_dir or default_cache_dir() / "features"),
                                      name=reference_name)
    models = [e.denoiser.to(device).eval() for e in entries]
    runners = [SamplingModel(m) for m in models]  # the default fast path, built once per model

    records, bounds = [], []
    for entry, model, runner in zip(entries, models, runners):
        fids, flops = [], []
        for seed in seeds:
            start = time.perf_counter()
            result = sample(runner, scheduler, sample_shape=sample_shape, sampler=sampler, steps=steps,
                            num_images=num_samples, seed=seed, device=device, progress=False,
                            class_labels=balanced_labels(model, num_samples, num_classes), decode=decode)
            fid = compute_fid(result.images, reference_images, feature_net, sampler=sampler, steps=steps,
                              seed=seed, reference_name=reference_name)
            say(f"  {entry.name}: seed {seed}: FID {fid.fid:.2f}, KID {fid.kid_mean:.4f} "
                f"({time.perf_counter() - start:.1f} s)")
            fids.append(fid)
            flops.append(trajectory_flops(entry, result.timesteps, sample_shape))
            if grid_dir is not None and seed == seeds[0]:
                grid = save_grid(result.images[:64], Path(grid_dir) / f"samples_{slug(entry.name)}.png")
        summary = summarize_seeds(fids)
        peak = _peak_forward_bytes(model, result.timesteps, sample_shape, max(timing_batches), device)
        records.append({
            "name": entry.name,
            "notes": entry.notes,
            "fid": {"mean": summary["fid_mean"], "sd": summary["fid_sd"], "per_seed": [f.to_dict() for f in fids]},
            "kid": {"mean": summary["kid_mean"], "sd": summary["kid_sd"]},
            "sampling_flops": {"per_image": statistics.fmean(flops), "steps": steps},
            "parameters": sum(p.numel() for p in model.parameters()),
            "memory": {"weights_bytes": _weight_bytes(model), "peak_activation_bytes": peak,
                       "total_bytes": _weight_bytes(model) + peak},
            "train_flops": int(entry.train_flops),
            "sample_grid": str(grid) if grid_dir is not None else None,
        })
        if held_out is not None:
            labels = None if held_out_labels is None else held_out_labels.to(device)
            records[-1]["held_out_loss"], records[-1]["held_out_loss_se"] = held_out_loss_se(
                model, held_out.to(device), scheduler, loss_grouping, labels=labels)
            bounds.append(nll_bound(model, held_out[:HELD_OUT_IMAGES].to(device), scheduler, grouping=loss_grouping,
                                    samples=bpd_samples, variance=bpd_variance,
                                    labels=None if labels is None else labels[:HELD_OUT_IMAGES]))
            bpd = bounds[-1].summary()
            say(f"  {entry.name}: held-out bound {bpd['total']['mean']:.4f} ± {bpd['total']['se']:.4f} bits/dim "
                f"({bpd['seconds']:.1f} s)")
            records[-1]["held_out_bpd"] = {key: bpd[key] for key in ("total", "prior", "decoder", "groups", "seconds")
                                           if key in bpd} | {"vs_first": bounds[-1].difference(bounds[0])}

    timing = {}
    for batch in timing_batches:
        say(f"  timing sampling at batch {batch} ({timing_repeats} interleaved repeats)")
        timing[batch] = time_sampling(runners, scheduler, sample_shape=sample_shape, sampler=sampler, steps=steps,
                                      batch=batch, repeats=timing_repeats, num_classes=num_classes)
    first = records[0]
    for i, record in enumerate(records):
        record["sampling_flops"]["ratio"] = record["sampling_flops"]["per_image"] / first["sampling_flops"]["per_image"]
        record["train_flops_ratio"] = record["train_flops"] / first["train_flops"] if first["train_flops"] else None
        record["time"] = {f"batch_{b}": {"median_s": t[i], "ratio": t[i] / t[0]} for b, t in timing.items()}

    return {
        "format": FORMAT,
        "protocol": {
            "sampler": sampler,
            "steps": steps,
            "timestep_spacing": TIMESTEP_SPACING,
            "num_samples": num_samples,
            "seeds": list(seeds),
            "feature_net": getattr(feature_net, "description", type(feature_net).__name__),
            "reference": {"name": reference_name, "count": len(reference_images)},
            "fid": "torchmetrics FrechetInceptionDistance / KernelInceptionDistance on the feature net's "
                   "features; mean and sample sd over the seeds",
            "flops": f"{FLOPS_CONVENTION}; per image, summed over the sampling steps actually taken "
                     "(a router counts the expert it calls at each step)",
            "sampling_path": " / ".join(dict.fromkeys(f"{r.compile}/{r.precision}" for r in runners)),
            "time": f"{TIMING_CLOCK}: one full {sampler}-{steps} sampling run at each batch size, median of "
                    f"{timing_repeats} runs interleaved across models after one warm-up; ratios are to "
                    f"'{first['name']}' measured in the same process",
            "memory": "weights: parameter + buffer bytes of every loaded expert; peak activations: "
                      + ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                         "torch.profiler (profile_memory=True), running sum of CPU tensor allocations minus frees")
                      + f" during one forward at batch {max(timing_batches)}, max over the experts visited",
            "train_flops": f"{FLOPS_CONVENTION}; forward + backward = 3 x forward, x batch x steps, from the "
                           "training runs' own records",
            "ratios_to": first["name"],
            "device": str(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, "
                                                               f"{torch.get_num_threads()} threads)",
            "torch": torch.__version__,
            **({"held_out_loss": f"mean squared error of the training target on {min(len(held_out), HELD_OUT_IMAGES)} "
                                 "held-out images no model trained on, at 100 evenly spaced timesteps (interpolated "
                                 "between), fixed noise; averaged over all timesteps and over each group; "
                                 "held_out_loss_se: its standard error over images",
                "held_out_loss_groups": [f"t {g.start}-{g.end - 1}" for g in loss_grouping.groups]
                                        if loss_grouping is not None else []}
               if held_out is not None else {}),
            **({"held_out_bpd": bounds[0].method() + _strata_note(bpd_samples, bounds[0]) + "; the same images, "
                                "timesteps and noise for every model, so 'vs_first' (the paired difference to the "
                                "first model) usually has a smaller SE"}
               if bounds else {}),
        },
        "models": records,
    }


def _strata_note(samples: int | None, bound) -> str:
    """How the bound's strata were counted: `samples` of equal log-SNR width (as far as whole timesteps allow),
    also cut at the group edges (likelihood.timestep_strata)."""
    if bound.exact:
        return ""
    edges = len(bound.grouping) - 1 if bound.grouping is not None else 0
    return (f"; strata: {samples} of equal log-SNR width asked for (bpd_samples, evaluate.BPD_SAMPLES by default), "
            f"also cut at the {edges} group edge(s): {bound.strata} in all")


def pool(evaluations: list[dict], labels: list[str] | None = None) -> dict:
    """Combine evaluations of the same models from independent runs (e.g. one training seed each).

    FID and KID are pooled over every (run, sampling seed) pair, so their sd includes run-to-run variation;
    the other numbers are averaged over runs, and the bits/dim bound's means (total, per group, paired
    differences) also get "sd", their spread over runs. evaluations: `evaluate` results with the same model
    names in the same order, under one protocol. labels: one name per run (e.g. "seed 0"), kept with the per-run data.
    """
    from .metrics import FidResult, summarize_seeds

    if not evaluations:
        raise ValueError("pool needs at least one evaluation")
    names = [m["name"] for m in evaluations[0]["models"]]
    for other in evaluations[1:]:
        if [m["name"] for m in other["models"]] != names:
            raise ValueError(f"evaluations compare different models: {names} vs {[m['name'] for m in other['models']]}")
    labels = labels or [f"run {i}" for i in range(len(evaluations))]
    models = []
    for i, name in enumerate(names):
        runs = [e["models"][i] for e in evaluations]
        fids = [FidResult(**f) for r in runs for f in r["fid"]["per_seed"]]
        summary = summarize_seeds(fids)
        models.append({
            **_mean_tree(runs),
            "name": name,
            "notes": runs[0]["notes"],
            "fid": {"mean": summary["fid_mean"], "sd": summary["fid_sd"], "per_seed": [f.to_dict() for f in fids]},
            "kid": {"mean": summary["kid_mean"], "sd": summary["kid_sd"]},
            "sample_grid": runs[0]["sample_grid"],
        })
        if "held_out_bpd" in runs[0] and len(runs) > 1:
            _add_run_sd(models[-1]["held_out_bpd"], [r["held_out_bpd"] for r in runs])
    protocol = dict(evaluations[0]["protocol"])
    if len({str(e["protocol"].get("held_out_loss_groups")) for e in evaluations}) > 1:
        protocol["held_out_loss_groups"] = None  # e.g. loss-based grouping: each run cut t differently
    protocol["runs"] = labels
    protocol["seeds"] = [f["seed"] for f in models[0]["fid"]["per_seed"]]
    protocol["fid"] += f"; pooled over {len(evaluations)} independent runs ({', '.join(labels)})"
    return {"format": FORMAT, "protocol": protocol, "models": models,
            "per_run": [{"label": label, **e} for label, e in zip(labels, evaluations)]}


def _add_run_sd(pooled: dict, runs: list[dict]) -> None:
    """Give every {"mean", "se"} entry of a pooled tree the sd of its mean over the runs (seed-to-seed spread)."""
    if "mean" in pooled and "se" in pooled:
        pooled["sd"] = statistics.stdev(r["mean"] for r in runs)
        return
    for key, value in pooled.items():
        if isinstance(value, dict):
            _add_run_sd(value, [r[key] for r in runs])


def _mean_tree(trees: list):
    """Average numeric leaves of same-shaped dicts; equal or non-numeric leaves are kept from the first."""
    first = trees[0]
    if isinstance(first, dict):
        return {k: _mean_tree([t[k] for t in trees]) for k in first}
    numeric = all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in trees)
    return statistics.fmean(trees) if numeric and len(set(trees)) > 1 else first
