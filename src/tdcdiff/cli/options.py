"""The command line's options and the table that maps each to its RunConfig setting: one place for flag names,
help texts, defaults and the flag an error names.

Nothing heavy is imported here (torch, diffusers): `tdcdiff --help` stays fast. The defaults shown in help are
RunConfig's (tests/test_cli.py holds them to it).
"""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..files import output_path
from ..samplers import describe_samplers

USER_ERRORS = (ValueError, OSError, KeyError)  # OSError: disk full, read-only, permissions (named by the message)


def fail(err: Exception | str) -> None:
    """Print one `error:` line (an OSError says which path to check) and exit with status 2."""
    if isinstance(err, OSError) and err.filename:  # not "[Errno 13] ...": say what to check
        err = f"{err.strerror}: {err.filename}; check that path and its permissions, or choose another"
    elif isinstance(err, OSError):
        err = err.strerror or err
    typer.secho(f"error: {one_line(str(err))}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def one_line(text: str) -> str:
    """text with its control characters escaped as Python writes them ("\\n", "\\x1b"): a message quotes names from
    files (an image called "a\\nerror: ok.png", a terminal escape in a caption) and stays one line that prints as
    the characters it holds."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def path_parser(flag: str, what: str):
    """A typer parser of a path option that refuses empty text ("{flag} is empty; give {what}"): typer would turn ""
    into Path("."), the current directory, so it is refused while the raw text is at hand."""
    def parse(value) -> Path:
        if not str(value).strip():
            fail(f"{flag} is empty; give {what}")
        return Path(value)
    return parse


_run_dir = path_parser("--out", "the run directory, e.g. --out runs/digits")


def check_writable(path: Path, option: str, *, directory: bool) -> None:
    """Refuse, before any work, an output path that is the wrong kind of file or cannot be written."""
    if os.path.isdir(path) != directory and os.path.exists(path):  # os.path: a name too long is output_path's
        kind = "a file, not a directory" if directory else "a directory, not a file"
        raise ValueError(f"{option} {path} is {kind}; choose another {option}")
    output_path(path, directory=directory, option=option)


def check_options(seeds=(), most: dict[str, tuple[int | None, int, str]] | None = None,
                  **least: tuple[int | None, int]) -> None:
    """Refuse counts below their minimum (least={"--num": (value, minimum)}) or above their maximum
    (most={"--num": (value, maximum, why that maximum)}), and seeds out of range or repeated."""
    from ..settings import check_seed

    for option, (value, minimum) in least.items():
        if value is not None and value < minimum:
            raise ValueError(f"{option} must be >= {minimum}, got {value}")
    for option, (value, maximum, why) in (most or {}).items():
        if value is not None and value > maximum:
            raise ValueError(f"{option} must be at most {maximum}, got {value} ({why})")
    for i, seed in enumerate(seeds):
        check_seed("--seed", seed)
        if seed in seeds[:i]:  # one FID counted twice would shrink the spread over seeds (to 0 for two)
            raise ValueError(f"--seed {seed} is given twice: each seed is one independent sample of the spread; "
                             "give each once")


def _option(*decls: str, help: str, default=None, **kwargs):
    """typer.Option whose help ends with the setting's default (None: the run's saved setting decides)."""
    shown = "" if default is None else f" [default: {default}]"
    return typer.Option(*decls, help=help + shown, **kwargs)


RUN_DEFAULT = "runs/digits"
RunDir = Annotated[Path, typer.Option("--out", "--run", "-o", parser=_run_dir, metavar="DIR",
                                      help="Run directory: every stage reads and writes here. [default: "
                                           f"{RUN_DEFAULT}]",
                                      show_default=False)]
ConfigFile = Annotated[Optional[Path], typer.Option("--config", "-c", metavar="FILE",
                                                    help="YAML, TOML or JSON file of settings (flags override it).")]
Data = Annotated[Optional[str], _option(
    help="Training data: 'digits' (built in), an IDX file, an image folder or .zip, or 'hf:<name>'.", default="digits")]
ImageSize = Annotated[Optional[int], _option("--image-size", help="Resize images to this size (square).",
                                             default="the data's")]
Channels = Annotated[Optional[int], _option(help="1 = grayscale, 3 = RGB.", default="the data's")]
Limit = Annotated[Optional[int], _option(help="Use at most this many images (a seeded subset).", default="all")]
Model = Annotated[Optional[str],
                  _option(help="UNet preset: digits-8, gray-28, gray-32, rgb-32.", default="by image size")]
Attention = Annotated[Optional[bool], _option("--attention/--no-attention",
                                              help="Self-attention at the lowest resolution.", default="off")]
Timesteps = Annotated[Optional[int], _option("--timesteps", help="T, the number of training timesteps.", default=1000)]
Schedule = Annotated[Optional[str], _option(
    "--schedule", help="Beta schedule: linear, scaled_linear, squaredcos_cap_v2 (cosine).", default="linear")]
Prediction = Annotated[Optional[str], _option(
    "--prediction", help="What the denoiser predicts: epsilon, v_prediction, sample.", default="epsilon")]
BaseSteps = Annotated[Optional[int], _option("--base-steps", help="Stage-1 training steps.", default=3000)]
BaseLr = Annotated[Optional[float], _option("--base-lr", help="Stage-1 peak learning rate.", default=0.002)]
BatchSize = Annotated[Optional[int], _option("--batch-size", help="Training batch size (both stages).", default=128)]
Groups = Annotated[Optional[int], _option("--groups", "-n", help="N, the number of timestep groups.", default=4)]
Grouping = Annotated[Optional[str], _option(help="How to split timesteps: snr, uniform, loss.", default="snr")]
K = Annotated[Optional[float], _option(
    "-k", "--k", help="0 < k <= 1: the easiest group gets (1/N + (N-1)/N k) of the base FLOPs.", default=0.5)]
MeanBudget = Annotated[Optional[float], _option(
    "--mean-budget", help="0 < B <= 1: scale the k formula's budgets so their timestep-weighted mean is B of the base.",
    default="unscaled")]
Ordering = Annotated[Optional[str], _option(help="Which groups are hard: measured, snr-high-hard, snr-low-hard.",
                                            default="measured")]
Proposer = Annotated[Optional[str], _option(help="Pruning proposer: evolution, uniform, llm.", default="evolution")]
Rounds = Annotated[Optional[int], _option(help="Search rounds per group.", default=4)]
Candidates = Annotated[Optional[int], _option(help="Candidates proposed per round.", default=4)]
Memory = Annotated[Optional[bool], _option("--memory/--no-memory",
                                           help="Show the proposer the memory bank of past candidates.", default="on")]
BudgetUnit = Annotated[Optional[str], _option(
    "--budget-unit", help="What group budgets are fractions of: flops, or time (the base's forward time measured here "
    "at --latency-batch).", default="flops")]
LatencyBatch = Annotated[Optional[int], _option(
    "--latency-batch", help="Batch size at which forward time is measured (time budgets and every expert's timing).",
    default=64)]
Depth = Annotated[Optional[bool], _option(
    "--depth/--no-depth", help="Let pruning also remove whole ResNet layers and attention blocks.", default="off")]
Importance = Annotated[Optional[str], _option(help="Channel importance within a layer: magnitude, taylor.",
                                              default="magnitude")]
FtSteps = Annotated[Optional[int], _option("--finetune-steps", help="Stage-2 steps PER GROUP.", default=400)]
FtLr = Annotated[Optional[float], _option("--finetune-lr", help="Stage-2 peak learning rate.", default=0.0005)]
Mix = Annotated[Optional[float], _option(
    "--mix", help="Fraction of each stage-2 batch drawn from all timesteps (0: group only, as in the paper).",
    default=0.0)]
Distill = Annotated[Optional[float], _option(
    "--distill", help="Weight of distillation from the base model in stage 2 (0: none).", default=0.0)]
FeatureDistill = Annotated[Optional[float], _option(
    "--feature-distill", help="Weight of feature distillation (block outputs, via learned projections) from the base "
    "model in stage 2 (0: none).", default=0.0)]
Sampler = Annotated[Optional[str], _option(help=f"Sampler: {describe_samplers()}.",
                                           default="the --base pipeline's scheduler's, else ddim")]
SampleSteps = Annotated[Optional[int], _option("--steps", help="Sampling steps.", default="min(50, T)")]
NumSamples = Annotated[Optional[int], _option("--num", help="Number of images in the run's sample grids.", default=64)]
Seed = Annotated[Optional[int], _option(help="Seed of the whole run (data split, weights, noise).", default=0)]
Device = Annotated[Optional[str], _option(
    help="Where every stage runs (training, proxies, timing, sampling, FID): auto (CUDA when available), cpu, cuda, "
    "cuda:N.", default="auto")]
DryRun = Annotated[bool, typer.Option(
    "--dry-run", help="Print the expected compute of each phase for these settings (measured from one forward and "
    "one training step here) and exit; nothing is written.")]
Group = Annotated[Optional[int], typer.Option("--group", "-g",
                                              help="Run only this group (0-based), e.g. one job per group.")]
BaseModelSpec = Annotated[Optional[str], typer.Option(
    "--base", help="Start from a trained model (skips stage 1): a diffusers model or pipeline directory, a Hub name, "
    "or module:function returning an nn.Module. With it, --base-steps continues training it that many steps.")]
TrustBase = Annotated[Optional[str], typer.Option(
    "--base", help="The run's --base module:function, named again: tdcdiff calls a function only when you name it, "
    "never because a run directory's config.json does.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars (they are shown only on a terminal).")]

# CLI parameter -> (the RunConfig setting(s) it sets, its option type): flags, error names and defaults in one place
SETTINGS = {
    "data": ("data", Data), "image_size": ("image_size", ImageSize), "channels": ("channels", Channels),
    "limit": ("limit", Limit), "model": ("model", Model), "attention": ("attention", Attention),
    "timesteps": ("num_train_timesteps", Timesteps), "schedule": ("beta_schedule", Schedule),
    "prediction": ("prediction_type", Prediction), "base_steps": ("base.steps", BaseSteps),
    "base_lr": ("base.lr", BaseLr), "groups": ("groups", Groups), "grouping": ("grouping", Grouping), "k": ("k", K),
    "mean_budget": ("mean_budget", MeanBudget), "ordering": ("ordering", Ordering),
    "proposer": ("search.proposer", Proposer), "rounds": ("search.rounds", Rounds),
    "candidates": ("search.candidates_per_round", Candidates), "memory": ("search.memory", Memory),
    "importance": ("search.importance", Importance), "budget_unit": ("budget_unit", BudgetUnit),
    "latency_batch": ("latency_batch", LatencyBatch), "depth": ("search.depth", Depth),
    "finetune_steps": ("finetune.steps", FtSteps), "finetune_lr": ("finetune.lr", FtLr),
    "mix": ("finetune.mix_fraction", Mix), "distill": ("finetune.distill_weight", Distill),
    "feature_distill": ("finetune.feature_distill_weight", FeatureDistill), "sampler": ("sampler", Sampler),
    "sample_steps": ("sample_steps", SampleSteps), "num_samples": ("num_samples", NumSamples), "seed": ("seed", Seed),
    "batch_size": (("base.batch_size", "finetune.batch_size"), BatchSize), "base": ("base_model", BaseModelSpec),
    "base_model_steps": ("base_model_steps", BaseSteps), "device": ("device", Device),
}


def targets(name: str) -> tuple[str, ...]:
    """The RunConfig setting(s) CLI parameter `name` sets."""
    keys = SETTINGS[name][0]
    return keys if isinstance(keys, tuple) else (keys,)


def flag(name: str) -> str:
    """The flag of CLI parameter `name` as its option spells it, e.g. "base_steps" -> "--base-steps"."""
    declared = [d for info in typing.get_args(SETTINGS[name][1])[1:]
                for d in (getattr(info, "default", None), *(getattr(info, "param_decls", None) or ()))
                if isinstance(d, str) and d.startswith("-")]
    return max(declared, key=len).split("/")[0] if declared else f"--{name.replace('_', '-')}"


def settings_flags(values: dict) -> dict:
    """The settings parameters among a command's `locals()`."""
    return {k: v for k, v in values.items() if k in SETTINGS}


def as_flag(message: str, flags: dict) -> str:
    """A settings error that starts with the dotted key of a setting the user gave as a flag ("base.steps must
    be >= 1") names the flag instead ("--base-steps must be >= 1"); messages that name their flag stay."""
    if flags.get("base") is not None:  # --base-steps then sets base_model_steps (see overrides)
        flags = {**flags, "base_model_steps": flags.get("base_steps")}
    for name, value in flags.items():
        option = flag(name)
        for key in targets(name) if value is not None else ():
            if message.startswith(f"{key} ") and option not in message:
                return option + message[len(key):]
    return message


def overrides(config_file: Path | None, **flags) -> dict:
    """Dotted-key RunConfig settings from the config file, then the flags given (None: not given)."""
    from ..settings import load_config_file

    if flags.get("base") is not None:  # with --base, --base-steps continues training the given model
        flags["base_model_steps"] = flags.pop("base_steps", None)
    settings = {}
    for key, value in (load_config_file(config_file) if config_file is not None else {}).items():
        # one level: a section's settings; a setting's own mapping (search.units) stays whole
        settings.update({f"{key}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value})
    for name, value in flags.items():
        if value is not None:
            settings.update({key: value for key in targets(name)})
    return settings


def open_run(out: Path, config_file: Path | None, progress: bool, *, writes: bool = True, **flags):
    """A Run with the settings from the config file, then the flags given, on top of the run's saved or default
    config. writes: the command writes into the run directory (checked before any work)."""
    from ..run import Run
    from ..run.rundir import check_out_dir

    if writes:  # empty, missing or a run directory, whose path can be written
        check_out_dir(out, "run directory", "--out")
    settings = overrides(config_file, **flags)
    try:
        return Run(out, overrides=settings, progress=progress)
    except ValueError as err:
        err.args = (as_flag(str(err), flags),)
        raise
