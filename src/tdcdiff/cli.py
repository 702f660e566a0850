"""`tdcdiff`: a thin command line over tdcdiff.run.Run. Heavy libraries are imported inside commands so
that `--help` stays fast."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .samplers import describe_samplers

app = typer.Typer(
    help="TDC training with proxy-based pruning: a right-sized diffusion denoiser for each group of timesteps.\n\n"
    "Start with `tdcdiff run` (the whole method on scikit-learn digits, a few minutes on a laptop CPU).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(err: Exception | str) -> None:
    if isinstance(err, OSError) and err.filename:  # not "[Errno 13] ...": say what to check
        err = f"{err.strerror}: {err.filename}; check that path and its permissions, or choose another"
    elif isinstance(err, OSError):
        err = err.strerror or err
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _run_dir(value) -> Path:
    # typer would turn "" into Path("."), the current directory: refuse it while the raw text is at hand.
    if not str(value).strip():
        _fail("--out is empty; give the run directory, e.g. --out runs/digits")
    return Path(value)


def _check_writable(path: Path, option: str, *, directory: bool) -> None:
    """Refuse, before any work, an output path that is the wrong kind of file or cannot be written."""
    if path.is_dir() != directory and path.exists():
        kind = "a file, not a directory" if directory else "a directory, not a file"
        raise ValueError(f"{option} {path} is {kind}; choose another {option}")
    existing = next(p for p in (path if directory else path.parent, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{option} {path} cannot be created: {existing} is a file; choose another {option}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path} cannot be written: {existing} is read-only (read-only file system or "
                         f"no permission); choose another {option}")


def _check_options(seeds=(), **least: tuple[int | None, int]) -> None:
    """Refuse counts below their minimum (least={"--num": (value, minimum)}) and seeds out of range."""
    from .settings import check_seed

    for option, (value, minimum) in least.items():
        if value is not None and value < minimum:
            raise ValueError(f"{option} must be >= {minimum}, got {value}")
    for seed in seeds:
        check_seed("--seed", seed)


RunDir = Annotated[Path, typer.Option("--out", "--run", "-o", parser=_run_dir, metavar="DIR",
                                      help="Run directory: every stage reads and writes here.")]
ConfigFile = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML, TOML or JSON file of settings (flags override it).")]
Data = Annotated[Optional[str], typer.Option(help="Training data: 'digits' (built in), an IDX file, an image folder or .zip, or 'hf:<name>'.")]
ImageSize = Annotated[Optional[int], typer.Option("--image-size", help="Resize images to this size (square).")]
Channels = Annotated[Optional[int], typer.Option(help="1 = grayscale, 3 = RGB.")]
Limit = Annotated[Optional[int], typer.Option(help="Use at most this many images (a seeded subset).")]
Model = Annotated[Optional[str], typer.Option(help="UNet preset: digits-8, gray-28, gray-32, rgb-32 (default: by image size).")]
Attention = Annotated[Optional[bool], typer.Option("--attention/--no-attention", help="Self-attention at the lowest resolution.")]
Timesteps = Annotated[Optional[int], typer.Option("--timesteps", help="T, the number of training timesteps.")]
Schedule = Annotated[Optional[str], typer.Option("--schedule", help="Beta schedule: linear, scaled_linear, squaredcos_cap_v2 (cosine).")]
Prediction = Annotated[Optional[str], typer.Option("--prediction", help="What the denoiser predicts: epsilon, v_prediction, sample.")]
BaseSteps = Annotated[Optional[int], typer.Option("--base-steps", help="Stage-1 training steps.")]
BaseLr = Annotated[Optional[float], typer.Option("--base-lr", help="Stage-1 peak learning rate.")]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size", help="Training batch size (both stages).")]
Groups = Annotated[Optional[int], typer.Option("--groups", "-n", help="N, the number of timestep groups.")]
Grouping = Annotated[Optional[str], typer.Option(help="How to split timesteps: snr, uniform, loss.")]
K = Annotated[Optional[float], typer.Option("-k", "--k", help="0 < k <= 1: the easiest group gets (1/N + (N-1)/N k) of the base FLOPs.")]
MeanBudget = Annotated[Optional[float], typer.Option("--mean-budget", help="0 < B <= 1: scale the k formula's budgets so their timestep-weighted mean is B of the base (default: unscaled).")]
Ordering = Annotated[Optional[str], typer.Option(help="Which groups are hard: measured, snr-high-hard, snr-low-hard.")]
Proposer = Annotated[Optional[str], typer.Option(help="Pruning proposer: evolution, uniform, llm.")]
Rounds = Annotated[Optional[int], typer.Option(help="Search rounds per group.")]
Candidates = Annotated[Optional[int], typer.Option(help="Candidates proposed per round.")]
Memory = Annotated[Optional[bool], typer.Option("--memory/--no-memory", help="Show the proposer the memory bank of past candidates.")]
BudgetUnit = Annotated[Optional[str], typer.Option("--budget-unit", help="What group budgets are fractions of: flops, or time (the base's forward time measured here at --latency-batch).")]
LatencyBatch = Annotated[Optional[int], typer.Option("--latency-batch", help="Batch size at which forward time is measured (time budgets and every expert's timing).")]
Depth = Annotated[Optional[bool], typer.Option("--depth/--no-depth", help="Let pruning also remove whole ResNet layers and attention blocks.")]
Importance = Annotated[Optional[str], typer.Option(help="Channel importance within a layer: magnitude, taylor.")]
FtSteps = Annotated[Optional[int], typer.Option("--finetune-steps", help="Stage-2 steps PER GROUP.")]
FtLr = Annotated[Optional[float], typer.Option("--finetune-lr", help="Stage-2 peak learning rate.")]
Mix = Annotated[Optional[float], typer.Option("--mix", help="Fraction of each stage-2 batch drawn from all timesteps (0: group only, as in the paper).")]
Distill = Annotated[Optional[float], typer.Option("--distill", help="Weight of distillation from the base model in stage 2 (0: none).")]
FeatureDistill = Annotated[Optional[float], typer.Option("--feature-distill", help="Weight of feature distillation (block outputs, via learned projections) from the base model in stage 2 (0: none).")]
Sampler = Annotated[Optional[str], typer.Option(help=f"Sampler: {describe_samplers()}.")]
SampleSteps = Annotated[Optional[int], typer.Option("--steps", help="Sampling steps.")]
NumSamples = Annotated[Optional[int], typer.Option("--num", help="Number of images to sample.")]
Seed = Annotated[Optional[int], typer.Option(help="Seed of the whole run.")]
Group = Annotated[Optional[int], typer.Option("--group", "-g", help="Run only this group (0-based), e.g. one job per group.")]
BaseModelSpec = Annotated[Optional[str], typer.Option(
    "--base", help="Start from a trained model (skips stage 1): a diffusers model or pipeline directory, a Hub name, "
    "or module:function returning an nn.Module. With it, --base-steps continues training it that many steps.")]
TrustBase = Annotated[Optional[str], typer.Option(
    "--base", help="The run's --base module:function, named again: tdcdiff calls a function only when you name it, "
    "never because a run directory's config.json does.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]

_SETTINGS = {
    "data": "data", "image_size": "image_size", "channels": "channels", "limit": "limit", "model": "model",
    "attention": "attention", "timesteps": "num_train_timesteps", "schedule": "beta_schedule",
    "prediction": "prediction_type", "base_steps": "base.steps", "base_lr": "base.lr", "groups": "groups",
    "grouping": "grouping", "k": "k", "mean_budget": "mean_budget", "ordering": "ordering", "proposer": "search.proposer",
    "rounds": "search.rounds", "candidates": "search.candidates_per_round", "memory": "search.memory",
    "importance": "search.importance", "budget_unit": "budget_unit", "latency_batch": "latency_batch",
    "depth": "search.depth", "finetune_steps": "finetune.steps", "finetune_lr": "finetune.lr",
    "mix": "finetune.mix_fraction", "distill": "finetune.distill_weight",
    "feature_distill": "finetune.feature_distill_weight", "sampler": "sampler",
    "sample_steps": "sample_steps", "num_samples": "num_samples", "seed": "seed",
    "batch_size": ("base.batch_size", "finetune.batch_size"), "base": "base_model",
    "base_model_steps": "base_model_steps",
}


def _open_run(out: Path, config_file: Path | None, progress: bool, *, writes: bool = True, **flags):
    """Settings from the config file, then the flags given, on top of the run's saved or default config.
    writes: the command writes into the run directory (checked before any work)."""
    from .run import Run

    if writes:
        _check_writable(out, "--out", directory=True)
    overrides = _overrides(config_file, **flags)
    try:
        return Run(out, overrides=overrides, progress=progress)
    except ValueError as err:
        err.args = (_as_flag(str(err), flags),)
        raise


def _as_flag(message: str, flags: dict) -> str:
    """A settings error that starts with the dotted key of a setting the user gave as a flag ("base.steps must
    be >= 1") names the flag instead ("--base-steps must be >= 1"); messages that name their flag stay."""
    if flags.get("base") is not None:  # --base-steps then sets base_model_steps (see _overrides)
        flags = {**flags, "base_model_steps": flags.get("base_steps")}
    for name, value in flags.items():
        targets = _SETTINGS[name] if isinstance(_SETTINGS[name], tuple) else (_SETTINGS[name],)
        option = _option("base_steps" if name == "base_model_steps" else name)
        for key in targets if value is not None else ():
            if message.startswith(f"{key} ") and option not in message:
                return option + message[len(key):]
    return message


def _option(name: str) -> str:
    """The flag of `tdcdiff run`'s parameter `name` as its declaration spells it, e.g. "base_steps" -> "--base-steps"."""
    import typing

    hint = typing.get_type_hints(run_command, include_extras=True)[name]
    # In Annotated, typer.Option("--k", ...) keeps its first name in `default`.
    declared = [d for info in typing.get_args(hint)[1:]
                for d in (getattr(info, "default", None), *(getattr(info, "param_decls", None) or ()))
                if isinstance(d, str) and d.startswith("-")]
    return max(declared, key=len) if declared else f"--{name.replace('_', '-')}"


def _overrides(config_file: Path | None, **flags) -> dict:
    """Dotted-key RunConfig settings from the config file, then the flags given (None: not given)."""
    from .settings import load_config_file

    if flags.get("base") is not None:  # with --base, --base-steps continues training the given model
        flags["base_model_steps"] = flags.pop("base_steps", None)
    overrides = {}
    if config_file is not None:
        for key, value in load_config_file(config_file).items():
            if isinstance(value, dict):
                overrides.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                overrides[key] = value
    for name, value in flags.items():
        if value is not None:
            targets = _SETTINGS[name]
            overrides.update({t: value for t in (targets if isinstance(targets, tuple) else (targets,))})
    return overrides


def _key_values(text: str) -> dict:
    """'a.b=1,c=x' -> {"a.b": 1, "c": "x"} (values read as YAML scalars)."""
    import yaml

    pairs = [item.partition("=") for item in text.split(",")]
    if not all(key and sep for key, sep, _ in pairs):
        raise ValueError(f"--variant takes KEY=VALUE[,KEY=VALUE...], got {text!r}; e.g. finetune.mix_fraction=0.2")
    return {key.strip(): yaml.safe_load(value) for key, _, value in pairs}


_USER_ERRORS = (ValueError, OSError, KeyError)  # OSError: disk full, read-only, permissions (named by the message)


@app.command("run")
def run_command(
    out: RunDir = Path("runs/digits"), config: ConfigFile = None, data: Data = None, image_size: ImageSize = None,
    channels: Channels = None, limit: Limit = None, model: Model = None, attention: Attention = None,
    timesteps: Timesteps = None, schedule: Schedule = None, prediction: Prediction = None,
    base_steps: BaseSteps = None, base_lr: BaseLr = None, batch_size: BatchSize = None, groups: Groups = None,
    grouping: Grouping = None, k: K = None, mean_budget: MeanBudget = None, ordering: Ordering = None, proposer: Proposer = None,
    rounds: Rounds = None, candidates: Candidates = None, memory: Memory = None, importance: Importance = None,
    budget_unit: BudgetUnit = None, latency_batch: LatencyBatch = None, depth: Depth = None, finetune_steps: FtSteps = None, finetune_lr: FtLr = None, mix: Mix = None, distill: Distill = None, feature_distill: FeatureDistill = None,
    sampler: Sampler = None, sample_steps: SampleSteps = None, num_samples: NumSamples = None, seed: Seed = None,
    base: BaseModelSpec = None, quiet: Quiet = False,
):
    """The whole method: train base -> plan -> prune -> fine-tune -> bundle -> samples -> report.

    With no arguments it runs on scikit-learn's digits into runs/digits. Stages that already finished are
    skipped, so rerunning the same command after a crash continues where it stopped. --base starts from a
    trained model instead of training one.
    """
    flags = {k_: v for k_, v in locals().items() if k_ in _SETTINGS}
    try:
        run = _open_run(out, config, not quiet, **flags)
        result = run.run_all()
    except _USER_ERRORS as err:
        _fail(err)
    typer.echo(f"bundle:  {result['bundle']}")
    for grid in result["samples"]:
        typer.echo(f"samples: {grid}")
    typer.echo(f"report:  {result['report']}")


@app.command("train-base")
def train_base_command(
    out: RunDir = Path("runs/digits"), config: ConfigFile = None, data: Data = None, image_size: ImageSize = None,
    channels: Channels = None, limit: Limit = None, model: Model = None, attention: Attention = None,
    timesteps: Timesteps = None, schedule: Schedule = None, prediction: Prediction = None,
    base_steps: BaseSteps = None, base_lr: BaseLr = None, batch_size: BatchSize = None, seed: Seed = None,
    base: BaseModelSpec = None, quiet: Quiet = False,
):
    """Stage 1: train one denoiser on all timesteps (resumes from the run's last checkpoint), or take --base."""
    flags = {k_: v for k_, v in locals().items() if k_ in _SETTINGS}
    try:
        result = _open_run(out, config, not quiet, **flags).train_base()
    except _USER_ERRORS as err:
        _fail(err)
    typer.echo(f"base model: {result.out_dir / 'final'} ({result.steps} steps, final loss {result.final_loss:.4f})")


@app.command("plan")
def plan_command(
    out: RunDir = Path("runs/digits"), groups: Groups = None, grouping: Grouping = None, k: K = None,
    mean_budget: MeanBudget = None, ordering: Ordering = None, budget_unit: BudgetUnit = None, latency_batch: LatencyBatch = None,
    depth: Depth = None, base: TrustBase = None, quiet: Quiet = False,
):
    """Group the timesteps and assign budgets (needs a trained base in the run directory)."""
    try:
        run = _open_run(out, None, not quiet, groups=groups, grouping=grouping, k=k, mean_budget=mean_budget, ordering=ordering,
                        budget_unit=budget_unit, latency_batch=latency_batch, depth=depth, base=base)
        plan = run.plan()
        timed = plan.budget_unit == "time"
        base_ms = run.latency_table(run.base_model()).base_seconds * 1000 if timed else None
    except _USER_ERRORS as err:
        _fail(err)
    batch = run.config.latency_batch
    # A time plan's fractions are of the base's forward time: its experts' FLOPs are known only once pruned.
    typer.echo(f"{'group':>5} {'timesteps':>11} {'SNR dB':>15} {'rank':>4} "
               + (f"{'time':>7} {'ms @b' + str(batch):>9}" if timed else f"{'FLOPs':>7} {'MFLOPs':>8}"))
    for g, rank, fraction in zip(plan.grouping.groups, plan.ranks, plan.fractions):
        typer.echo(f"{g.index:>5} {g.start:>5}-{g.end - 1:<5} {g.snr_db_start:>7.1f}..{g.snr_db_end:<6.1f} {rank:>4} "
                   + (f"{fraction:>7.1%} {fraction * base_ms:>9.2f}" if timed
                      else f"{fraction:>7.1%} {fraction * plan.base_flops / 1e6:>8.2f}"))
    unit = (f"forward time ({base_ms:.2f} ms at batch {batch} on this device)" if timed
            else f"{plan.base_flops / 1e6:.1f} MFLOPs")
    typer.echo(f"mean sampling cost (timestep-weighted): {plan.mean_fraction:.1%} of the base's {unit}")
    typer.echo(f"plan: {out / 'plan' / 'plan.json'}  plot: {out / 'plan' / 'grouping.png'}")


@app.command("prune")
def prune_command(
    out: RunDir = Path("runs/digits"), group: Group = None, proposer: Proposer = None, rounds: Rounds = None,
    candidates: Candidates = None, memory: Memory = None, importance: Importance = None,
    budget_unit: BudgetUnit = None, latency_batch: LatencyBatch = None, depth: Depth = None, base: TrustBase = None,
    quiet: Quiet = False,
):
    """Proxy-based pruning: derive each group's model from the base under its budget (FLOPs or time)."""
    try:
        run = _open_run(out, None, not quiet, proposer=proposer, rounds=rounds, candidates=candidates,
                        memory=memory, importance=importance, budget_unit=budget_unit, latency_batch=latency_batch,
                        depth=depth, base=base)
        summaries = run.prune(group)
    except _USER_ERRORS as err:
        _fail(err)
    typer.echo(f"{'group':>5} {'unit':>5} {'budget':>7} {'FLOPs':>7} {'time':>7} {'@batch':>6} {'error':>7} {'proxy':>7}")
    for s in summaries:
        unit = s.get("budget_unit", "flops")
        got = s["time_ratio"] if unit == "time" else s["flops_ratio"]
        time_ratio = f"{s['time_ratio']:>7.1%}" if s.get("time_ratio") is not None else f"{'-':>7}"
        typer.echo(f"{s['group']:>5} {unit:>5} {s['fraction']:>7.1%} {s['flops_ratio']:>7.1%} {time_ratio} "
                   f"{s.get('latency_batch', '-'):>6} {got / s['fraction'] - 1:>+7.1%} {s['proxy_score']:>7.3f}")
    typer.echo("budget, FLOPs and time (measured directly, side by side with the base) are fractions of the base's")
    typer.echo(f"pruned models, search logs and memory banks: {out / 'prune'}")


@app.command("finetune")
def finetune_command(
    out: RunDir = Path("runs/digits"), group: Group = None, finetune_steps: FtSteps = None,
    finetune_lr: FtLr = None, mix: Mix = None, distill: Distill = None, feature_distill: FeatureDistill = None,
    base: TrustBase = None, quiet: Quiet = False,
):
    """Stage 2: fine-tune each group's pruned model on its timesteps (--group i runs one group alone)."""
    try:
        run = _open_run(out, None, not quiet, finetune_steps=finetune_steps, finetune_lr=finetune_lr, mix=mix, distill=distill,
                        feature_distill=feature_distill, base=base)
        results = run.finetune(group)
    except _USER_ERRORS as err:
        _fail(err)
    for r in results:
        typer.echo(f"{r.out_dir}: {r.steps} steps, final loss {r.final_loss:.4f}, {r.train_flops / 1e12:.2f} TFLOPs")


@app.command("bundle")
def bundle_command(out: RunDir = Path("runs/digits"), base: TrustBase = None, quiet: Quiet = False):
    """Write the deployable bundle (router + experts + schedule) of a fine-tuned run."""
    try:
        path = _open_run(out, None, False, base=base).export_bundle()
    except _USER_ERRORS as err:
        _fail(err)
    typer.echo(f"bundle: {path}  (load with tdcdiff.load_bundle)")


@app.command("sample")
def sample_command(
    out: RunDir = Path("runs/digits"),
    bundle: Annotated[Optional[Path], typer.Option(help="Sample from this bundle instead of the run's base model.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", help="PNG file for the grid.")] = None,
    sampler: Sampler = None, sample_steps: SampleSteps = None, num_samples: NumSamples = None, seed: Seed = None,
    class_id: Annotated[Optional[int], typer.Option("--class", help="Class id of every image (class-conditional models; default: all classes in turn).")] = None,
    guidance: Annotated[float, typer.Option("--guidance", help="Classifier-free guidance scale (1: none; needs a model trained with label dropout).")] = 1.0,
    compile: Annotated[str, typer.Option("--compile", help="Sampling path: auto (trace diffusers models), none (eager), trace, inductor (torch.compile).")] = "auto",
    precision: Annotated[str, typer.Option("--precision", help="fp32, or bf16 autocast (faster only at large batches on CPUs with bf16 units; changes images by about 1e-2).")] = "fp32",
    cache_interval: Annotated[int, typer.Option(
        "--cache-interval", help="Feature caching (DeepCache, UNet2DModel denoisers): one full UNet pass every N "
        "steps, only the shallow branch in between (1: off).")] = 1,
    cache_depth: Annotated[Optional[int], typer.Option(
        "--cache-depth", help="Depth of the shallow branch that feature caching runs: 1 (the shallowest, fastest; "
        "default) up to the UNet's levels.")] = None,
    base: TrustBase = None, quiet: Quiet = False,
):
    """Write a grid of samples from a bundle (--bundle) or from the run's base model.

    Defaults: ddim, min(50, T) steps, 64 images, seed 0, written to samples.png (a bundle) or
    <run>/samples/base.png; class-conditional models: all classes in turn.
    """
    import contextlib
    import time

    from .evaluate import balanced_labels
    from .feature_cache import check_cache_settings
    from .pipeline import sample, save_grid
    from .run import lock_run_dir

    try:
        _check_options(() if seed is None else (seed,), **{"--steps": (sample_steps, 1), "--num": (num_samples, 1),
                                                            "--cache-interval": (cache_interval, 1)})
        check_cache_settings(cache_interval, cache_depth)
        # A bundle's default is never inside the bundle: its manifest lists every file.
        output = output or (Path("samples.png") if bundle is not None else out / "samples" / "base.png")
        _check_writable(output, "--output", directory=False)
        if output.suffix.lower() != ".png":  # save_grid writes PNG: o.jpg would be a PNG under another name
            raise ValueError(f"--output {output}: sample grids are written as PNG; give a path ending in .png")
        if bundle is not None:
            from .base_model import trust_function
            from .bundle import load_bundle

            trust_function(base)  # the bundle's experts may be of the class it returns
            loaded = load_bundle(bundle)
            model, scheduler, shape = loaded.router, loaded.scheduler, loaded.sample_shape
            decode = loaded.pipeline().decode
            null_class, data_classes = loaded.null_class, (loaded.manifest.get("conditioning") or {}).get("num_classes")
        else:
            run = _open_run(out, None, not quiet, writes=False, base=base)
            model, scheduler, shape, decode = run.base_model(), run.scheduler, run.sample_shape, run.decode
            null_class, data_classes = run.null_class(model), run.data.num_classes
        steps = min(50, scheduler.config.num_train_timesteps) if sample_steps is None else sample_steps
        count = 64 if num_samples is None else num_samples
        labels = class_id if class_id is not None else balanced_labels(model, count, data_classes)
        # A grid written into a run directory is written by its one writer (a stage's cleanup would take a
        # grid half-written beside it for a killed writer's temporary).
        inside = output.resolve().is_relative_to(out.resolve())
        with lock_run_dir(out) if inside else contextlib.nullcontext():
            start = time.perf_counter()
            result = sample(
                model, scheduler, sample_shape=shape, sampler=sampler or "ddim", steps=steps,
                num_images=count, seed=0 if seed is None else seed, progress=not quiet, class_labels=labels,
                guidance_scale=guidance, null_class=null_class, num_classes=data_classes, compile=compile,
                precision=precision, cache_interval=cache_interval, cache_depth=cache_depth, decode=decode,
            )
            seconds = time.perf_counter() - start
            path = save_grid(result.images, output)
    except _USER_ERRORS as err:
        _fail(err)
    except (MemoryError, RuntimeError) as err:  # torch on a CPU: RuntimeError "... can't allocate memory ..."
        if not isinstance(err, MemoryError) and "allocate" not in str(err):
            raise
        _fail(f"not enough memory to sample --num {num_samples} images in one batch; lower --num")
    typer.echo(_sample_summary(path, result, model if bundle is not None else None, seconds))


def _sample_summary(path: Path, result, router, seconds: float) -> str:
    """`tdcdiff sample`'s line: what was sampled how, a bundle's FLOPs per image (router given), and the speed."""
    flops = f", {router.trajectory_flops(result.timesteps) / 1e6:.1f} MFLOPs per image" if router is not None else ""
    if result.cache_depth is not None:  # trajectory_flops counts full passes: a cached step costs less
        flops = (f", feature cache: a full pass every {result.cache_interval} steps, the depth-{result.cache_depth} "
                 f"shallow branch alone at {len(result.shallow_steps)} of {result.steps} steps")
    return (f"samples: {path} ({len(result.images)} images, {result.sampler} {result.steps} steps "
            f"({result.timestep_spacing} spacing), seed {result.seed}{flops}; {len(result.images) / seconds:.1f} "
            f"images/s wall-clock on path {result.compile}/{result.precision}, graph building included)")


@app.command("report")
def report_command(
    out: RunDir = Path("runs/digits"),
    seeds: Annotated[Optional[list[int]], typer.Option("--seed", help="Sampling seed (repeat for several).")] = None,
    num_samples: NumSamples = None, sampler: Sampler = None, sample_steps: SampleSteps = None, base: TrustBase = None,
    quiet: Quiet = False,
):
    """FID/KID, FLOPs, time, memory and training compute of the run's base vs its TDC bundle, as report.html."""
    from .run import report_for_run

    try:
        _check_options(seeds or (), **{"--steps": (sample_steps, 1), "--num": (num_samples, 2)})
        _check_writable(out, "--out", directory=True)
        path = report_for_run(out, seeds=tuple(seeds or (0, 1)), num_samples=512 if num_samples is None else num_samples,
                              sampler=sampler, steps=sample_steps, progress=not quiet, base=base)
    except _USER_ERRORS as err:
        _fail(err)
    typer.echo(f"report: {path}")


@app.command("tune")
def tune_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Tune directory: the plan, candidates, tables, plot and chosen bundle.")] = Path("runs/tune"),
    base_from: Annotated[Optional[Path], typer.Option("--base-from", help="Start from this run directory's trained stage-1 base instead of training one.")] = None,
    config: ConfigFile = None, data: Data = None, image_size: ImageSize = None, base_steps: BaseSteps = None,
    batch_size: BatchSize = None, finetune_lr: FtLr = None, rounds: Rounds = None, candidates: Candidates = None,
    sampler: Sampler = None, sample_steps: SampleSteps = None, seed: Seed = None, base: TrustBase = None,
    tune_steps: Annotated[int, typer.Option("--tune-steps", help="Each candidate's training compute: this many stage-2 steps of the base model (FLOPs).")] = 1000,
    width: Annotated[Optional[list[float]], typer.Option("--width", help="Uniform-pruning level, fraction of the base's FLOPs (repeat; default 0.8 0.6 0.4).")] = None,
    k: Annotated[Optional[list[float]], typer.Option("-k", "--k", help="TDC budget slope k (repeat; default 0.1 0.3 0.5).")] = None,
    groups: Annotated[Optional[list[int]], typer.Option("--groups", "-n", help="TDC number of groups N (repeat; default 2 4).")] = None,
    grouping: Annotated[Optional[list[str]], typer.Option("--grouping", help="TDC grouping: snr, uniform, loss (repeat; default snr).")] = None,
    variant: Annotated[Optional[list[str]], typer.Option("--variant", help="Also try every TDC grid point with these settings, KEY=VALUE[,KEY=VALUE] (repeat), e.g. finetune.mix_fraction=0.2.")] = None,
    time_budget: Annotated[Optional[list[float]], typer.Option("--time-budget", help="Also TDC candidates whose mean sampling time is this fraction of the base's, measured (repeat, e.g. --time-budget 0.8 --time-budget 0.6).")] = None,
    uniform_time_budget: Annotated[Optional[list[float]], typer.Option("--uniform-time-budget", help="Also uniform pruning fitted to this fraction of the base's measured forward time (repeat).")] = None,
    depth: Annotated[bool, typer.Option("--depth", help="Also try every TDC candidate with depth pruning (whole layers kept or removed).")] = False,
    curves: Annotated[bool, typer.Option("--curves", help="Also, per TDC grid point, the same mean budget split across groups by measured quality curves (budget.allocate_from_curves).")] = False,
    curve_objective: Annotated[Optional[list[str]], typer.Option("--curve-objective", help="With --curves: what the allocation minimises, one candidate each (repeat): share (the measure's total change) or relative (each group's measure relative to the base's, weighted by its timesteps); default share.")] = None,
    curve_steps: Annotated[int, typer.Option("--curve-steps", help="With --curves: stage-2 steps behind each point of a group's curve (counted in the candidate's compute).")] = 50,
    candidate: Annotated[Optional[int], typer.Option("--candidate", help="Train only this candidate (0-based, see candidates.json), e.g. one job each.")] = None,
    screening: Annotated[str, typer.Option("--screening", help="What ranks candidates before FID (finalists, --max-quality-loss): loss (held-out denoising loss) or bpd (held-out bits/dim bound); the other is shown beside it.")] = "loss",
    finalists: Annotated[int, typer.Option(help="Candidates (best by the screening measure) that get paired-seed FID/KID.")] = 3,
    fid_seeds: Annotated[int, typer.Option("--fid-seeds", help="Sampling seeds for FID/KID (>= 2: the paired rule).")] = 3,
    fid_samples: Annotated[int, typer.Option("--fid-samples", help="Images per model and seed for FID/KID.")] = 512,
    batch: Annotated[int, typer.Option("--batch", help="Your sampling batch size: the frontier's time axis.")] = 64,
    max_quality_loss: Annotated[Optional[float], typer.Option("--max-quality-loss", help="Also accept a candidate at most this much worse than the base on the screening measure (--screening; relative, 0.02 = 2%).")] = None,
    price_per_hour: Annotated[Optional[float], typer.Option("--price-per-hour", help="Machine price per hour: adds the cost per 1,000 images before and after.")] = None,
    quiet: Quiet = False,
):
    """The quality-speed frontier of one base and the fastest candidate as good as it, with its cost and return.

    Every candidate (the base fine-tuned, uniform widths by FLOPs or measured time, TDC over k, N and grouping,
    by time budget, with depth pruning, or with budgets from measured curves) gets the same training compute; all
    are screened on held-out images (denoising loss or bits/dim, paired), the best few get paired-seed FID/KID.
    Writes frontier.png, table.csv, results.json, cost.csv, return.csv and chosen/ into the tune directory.
    Rerunning skips finished candidates.
    """
    from dataclasses import replace

    from .tune import Tune, TuneConfig, check_candidate, cost_rows, format_rows, table_rows
    from .tune import candidate_list

    flags = {k_: v for k_, v in locals().items() if k_ in _SETTINGS and k_ not in ("k", "groups", "grouping", "depth")}
    settings = TuneConfig(tune_steps=tune_steps, screening=screening, finalists=finalists, fid_seeds=fid_seeds,
                          fid_samples=fid_samples, batch=batch, max_quality_loss=max_quality_loss, price_per_hour=price_per_hour, depth=depth,
                          curves=curves, curve_steps=curve_steps)
    for name, value in (("widths", width), ("ks", k), ("groups", groups), ("groupings", grouping),
                        ("time_budgets", time_budget), ("uniform_time_budgets", uniform_time_budget),
                        ("curve_objectives", curve_objective)):
        if value:
            settings = replace(settings, **{name: tuple(value)})
    if curve_objective and not curves:  # even the default "share": what was asked for would not happen
        _fail("--curve-objective chooses how --curves candidates allocate: add --curves")
    try:
        if variant:
            settings = replace(settings, tdc_variants=({}, *(_key_values(v) for v in variant)))
        if candidate is not None:  # before Tune, which copies --base-from into the tune directory
            settings.validate()
            check_candidate(candidate, candidate_list(settings), out / "candidates.json")
        try:
            tune = Tune(out, settings, overrides=_overrides(config, **flags), base_from=base_from, progress=not quiet)
        except ValueError as err:  # the base run's settings: name the flag given, as _open_run does
            err.args = (_as_flag(str(err), flags),)
            raise
        if candidate is not None:
            record = tune.run_candidate(candidate)
            typer.echo(f"candidate {candidate} ({record['name']}): "
                       + (f"failed: {record['failed']}" if "failed" in record else f"{out / record['dir']}"))
            return
        results = tune.run_all()
    except _USER_ERRORS as err:
        _fail(err)
    typer.echo("\n" + format_rows(table_rows(results["rows"], results["choice"]["name"], results["screening_measure"]["key"])))
    for item in results["failed"]:
        typer.echo(f"failed: {item['name']}: {item['failed']}")
    typer.echo(f"screening: {results['screening_measure']['name']}; time: {results['time']}")
    typer.echo(f"chosen: {results['choice']['name'] or 'none'}: {results['choice']['reason']}")
    if "cost" in results:
        phases, returns = cost_rows(results["cost"], price_per_hour is not None)
        typer.echo("\n" + format_rows(phases) + "\n\n" + format_rows(returns))
        if results["cost"]["tuning_cost"] is not None:
            typer.echo(f"tuning cost at {price_per_hour:g} per hour: {results['cost']['tuning_cost']:.4f}")
    typer.echo(f"\nfrontier: {out / 'frontier.png'}  table: {out / 'table.csv'}  cost: {out / 'cost.csv'}, {out / 'return.csv'}"
               + (f"  chosen bundle: {out / 'chosen'}" if results["choice"]["name"] else ""))


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="tdcdiff")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
