"""`tdcdiff sample` (a grid from a bundle or the run's base) and `tdcdiff report` (a finished run's report)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import (
    RUN_DEFAULT,
    USER_ERRORS,
    Quiet,
    RunDir,
    Sampler,
    SampleSteps,
    TrustBase,
    check_options,
    check_writable,
    fail,
    open_run,
    path_parser,
)

SampleNum = Annotated[Optional[int], typer.Option("--num", help="Number of images to sample. [default: 64]")]
SampleSeed = Annotated[Optional[int], typer.Option(help="Sampling seed: the initial noise and every stochastic step. "
                                                        "[default: 0]")]


def _check_output(output: Path) -> None:
    """Refuse a grid path that cannot be written or is not a .png file name. Raises ValueError naming --output."""
    check_writable(output, "--output", directory=False)
    if output.name.lower() == ".png":  # a hidden file with no stem: Path says it has no suffix
        raise ValueError(f"--output {output}: the file name is empty (only the .png extension); give a name, "
                         f"e.g. {output.with_name('samples.png')}")
    if output.suffix.lower() != ".png":  # save_grid writes PNG: o.jpg would be a PNG under another name
        raise ValueError(f"--output {output}: sample grids are written as PNG; give a path ending in .png")


def sample_command(
    out: RunDir = Path(RUN_DEFAULT),
    bundle: Annotated[Optional[Path], typer.Option(
        parser=path_parser("--bundle", "the bundle's directory, e.g. --bundle runs/digits/bundle"),
        help="Sample from this bundle instead of the run's base model.")] = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output",
        help="PNG file for the grid. [default: samples.png for a bundle, else <run>/samples/base.png]")] = None,
    sampler: Sampler = None, sample_steps: SampleSteps = None, num_samples: SampleNum = None, seed: SampleSeed = None,
    class_id: Annotated[Optional[int], typer.Option(
        "--class", help="Class id of every image (class-conditional models). [default: all classes in turn]")] = None,
    guidance: Annotated[float, typer.Option(
        "--guidance",
        help="Classifier-free guidance scale (1: none; needs a model trained with label dropout).")] = 1.0,
    compile: Annotated[str, typer.Option(
        "--compile", help="Sampling path: auto (trace diffusers models), none (eager), trace, inductor "
        "(torch.compile).")] = "auto",
    precision: Annotated[str, typer.Option(
        "--precision", help="fp32, or bf16 autocast (faster only at large batches on CPUs with bf16 units; changes "
        "images by about 1e-2).")] = "fp32",
    cache_interval: Annotated[Optional[int], typer.Option(
        "--cache-interval", help="Feature caching (DeepCache, UNet2DModel denoisers): one full UNet pass every N "
        "steps, only the shallow branch in between (1: off). [default: the bundle's setting, else 1]")] = None,
    cache_depth: Annotated[Optional[int], typer.Option(
        "--cache-depth", help="Depth of the shallow branch that feature caching runs: 1 (the shallowest, fastest) "
        "up to the UNet's levels. [default: the bundle's setting, else 1]")] = None,
    base: TrustBase = None, quiet: Quiet = False,
):
    """Write a grid of samples from a bundle (--bundle) or from the run's base model.

    Sampler, steps, cache interval and cache depth not given are the bundle's sampling setting's, item by item
    (what `tdcdiff tune` chose, or the run's sampler and steps; DDIM at min(50, T) steps for an older bundle), or
    for the base the run's sampler and steps. 64 images, seed 0, written to samples.png (a bundle) or
    <run>/samples/base.png; class-conditional models: all classes in turn.
    """
    from ..capacity import GRID_LIMIT, MAX_GRID_IMAGES
    from ..evaluate import balanced_labels
    from ..pipeline import sample, save_grid
    from ..run import lock_run_dir
    from ..sampling_setting import check_cache_settings

    try:
        check_options(() if seed is None else (seed,), most={"--num": (num_samples, MAX_GRID_IMAGES, GRID_LIMIT)},
                      **{"--steps": (sample_steps, 1), "--num": (num_samples, 1),
                         "--cache-interval": (cache_interval, 1), "--cache-depth": (cache_depth, 1)})
        if cache_interval is not None:  # a depth alone takes the bundle's interval: checked once that is known
            check_cache_settings(cache_interval, cache_depth)
        # A bundle's default is never inside the bundle: its manifest lists every file.
        output = output or (Path("samples.png") if bundle is not None else out / "samples" / "base.png")
        _check_output(output)
        model, scheduler, shape, decode, null_class, data_classes, defaults = _source(bundle, out, base, quiet)
        sampler, steps = sampler or defaults.sampler, sample_steps or defaults.steps
        cache_interval, cache_depth = defaults.caching_with(cache_interval, cache_depth)
        count = 64 if num_samples is None else num_samples
        labels = class_id if class_id is not None else balanced_labels(model, count, data_classes)
        # A grid written into a run directory is written by its one writer (a stage's cleanup would take a
        # grid half-written beside it for a killed writer's temporary).
        inside = output.resolve().is_relative_to(out.resolve())
        with lock_run_dir(out) if inside else contextlib.nullcontext():
            start = time.perf_counter()
            result = sample(
                model, scheduler, sample_shape=shape, sampler=sampler, steps=steps,
                num_images=count, seed=0 if seed is None else seed, progress=not quiet, class_labels=labels,
                guidance_scale=guidance, null_class=null_class, num_classes=data_classes, compile=compile,
                precision=precision, cache_interval=cache_interval, cache_depth=cache_depth, decode=decode,
            )
            seconds = time.perf_counter() - start
            path = save_grid(result.images, output)
    except USER_ERRORS as err:
        fail(err)
    except (MemoryError, RuntimeError) as err:  # torch on a CPU: RuntimeError "... can't allocate memory ..."
        if not isinstance(err, MemoryError) and "allocate" not in str(err):
            raise
        fail(f"not enough memory to sample --num {num_samples} images in one batch; lower --num")
    typer.echo(_sample_summary(path, result, model if bundle is not None else None, seconds))


def _source(bundle: Path | None, out: Path, base: str | None, quiet: bool):
    """What `tdcdiff sample` samples: a bundle's router, or the run's base, with (scheduler, sample shape, decoder,
    null class, the data's class count, its default sampling setting)."""
    from ..sampling_setting import SamplingSetting

    if bundle is not None:
        from ..base_model import trust_function
        from ..bundle import load_bundle

        trust_function(base)  # the bundle's experts may be of the class it returns
        loaded = load_bundle(bundle)
        classes = (loaded.manifest.get("conditioning") or {}).get("num_classes")
        return (loaded.router, loaded.scheduler, loaded.sample_shape, loaded.pipeline().decode, loaded.null_class,
                classes, loaded.sampling)
    run = open_run(out, None, not quiet, writes=False, base=base)
    model = run.base_model()
    return (model, run.scheduler, run.sample_shape, run.decode, run.null_class(model), run.data.num_classes,
            SamplingSetting(run.config.sampler, run.config.sampling_steps))


def _counted(number: int, noun: str) -> str:
    """'1 step', '4 steps'."""
    return f"{number} {noun}{'s' * (number != 1)}"


def _sample_summary(path: Path, result, router, seconds: float) -> str:
    """`tdcdiff sample`'s line: what was sampled how, a bundle's FLOPs per image (router given), and the speed."""
    flops = f", {router.trajectory_flops(result.timesteps) / 1e6:.1f} MFLOPs per image" if router is not None else ""
    if result.cache_depth is not None:  # trajectory_flops counts full passes: a cached step costs less
        flops = (f", feature cache: a full pass every {result.cache_interval} steps, the depth-{result.cache_depth} "
                 f"shallow branch alone at {len(result.shallow_steps)} of {_counted(result.steps, 'step')}")
    return (f"samples: {path} ({_counted(len(result.images), 'image')}, {result.sampler} "
            f"{_counted(result.steps, 'step')} "
            f"({result.timestep_spacing} spacing), seed {result.seed}{flops}; {len(result.images) / seconds:.1f} "
            f"images/s wall-clock on path {result.compile}/{result.precision}, graph building included)")


def report_command(
    out: RunDir = Path(RUN_DEFAULT),
    seeds: Annotated[Optional[list[int]], typer.Option(
        "--seed", help="Sampling seed (repeat for several). [default: 0 1]")] = None,
    num_samples: Annotated[Optional[int], typer.Option(
        "--num", help="Images per model and seed for FID/KID. [default: 512]")] = None, sampler: Sampler = None,
    sample_steps: SampleSteps = None, base: TrustBase = None,
    quiet: Quiet = False,
):
    """FID/KID, FLOPs, time, memory and training compute of the run's base vs its TDC bundle, as report.html."""
    from ..capacity import FID_LIMIT, MAX_FID_IMAGES
    from ..run import report_for_run

    try:
        check_options(seeds or (), most={"--num": (num_samples, MAX_FID_IMAGES, FID_LIMIT)},
                      **{"--steps": (sample_steps, 1), "--num": (num_samples, 2)})
        check_writable(out, "--out", directory=True)
        path = report_for_run(out, seeds=tuple(seeds or (0, 1)),
                              num_samples=512 if num_samples is None else num_samples,
                              sampler=sampler, steps=sample_steps, progress=not quiet, base=base)
    except USER_ERRORS as err:
        fail(err)
    typer.echo(f"report: {path}")
