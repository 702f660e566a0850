"""The TDC stages over one run directory: train base -> plan -> prune -> fine-tune -> bundle -> sample.

    run_dir/
      config.json          the RunConfig that made it
      base/                stage 1 (train.py layout: checkpoint/, final/, log.jsonl, train.json); a given
                           pipeline's scheduler_config.json and VAE (vae/: latent diffusion)
      latents/             latent diffusion: the data encoded once by the VAE (every stage trains on these)
      plan/                plan.json, grouping.png
      prune/group_i/       the pruned model of group i; prune/memory_i.json, prune/search_i.jsonl
      finetune/group_i/    stage 2 of group i (train.py layout)
      bundle/              the deliverable (see bundle.py)
      samples/             sample grids, each with NAME.inputs.json: what it was sampled from and how
      report/              report.html (see report.py) and inputs.json
      .tdcdiff.lock        held by the one process writing here; .tdcdiff.lock.owner says which

Each stage skips itself when its output exists, so rerunning after a crash continues where it stopped; sample
grids and the report are redone only when what they were made from (weights, settings) changed.

One process at a time writes a run directory: every stage (`--group` jobs included) and `tdcdiff report` take
the directory's lock, and a second writer is refused at once, naming the holder; stage-2 groups of one run
directory therefore run one after another. Taking the lock also removes the temporaries a killed writer left
behind (see files.remove_stale_temporaries). `tdcdiff sample` without --bundle only reads the base
and replaces samples/base.png atomically: it takes no lock, and a grid it replaced is redrawn by the next run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import socket
import sys
import time
import types
import typing
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path

import torch

from .budget import (
    RAISE_BUDGET,
    Plan,
    budget_fractions,
    check_reachable,
    make_plan,
    measure_sensitivity,
    plan_from_fractions,
)
from .data import ImageDataset, load_dataset
from .files import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_text,
    remove_stale_temporaries,
    sha256_file,
)
from .flops import count_flops
from .grouping import make_groups, per_timestep_loss, plot_grouping
from .latency import time_ratios
from .models import build_unet, check_finite, num_class_embeds, preset_for
from .prune.search import SearchConfig
from .schedule import SCHEDULE_VERSION, check_given_schedule, make_scheduler
from .serialization import ARCHITECTURE_FILE, architecture_of, load_model, save_model
from .train import FINAL_DIR, TrainConfig, train

log = logging.getLogger("tdcdiff")

BUDGET_UNITS = ("flops", "time")


@dataclass
class RunConfig:
    """Everything a TDC run needs. Every field has a default that works on the embedded digits data.

    data: data spec ("digits", IDX file, image folder or zip, "hf:<name>"); image_size, channels, limit:
        resize / convert / subsample it. model: UNet preset (default: chosen from image size and channels).
    num_train_timesteps, beta_schedule, prediction_type: the noise schedule. schedule_version: how make_scheduler
        builds it (schedule.SCHEDULE_VERSIONS); None: the current one for a new run, the saved one when resuming
        (a config.json without it: 1, the unscaled betas runs had before).
    base: stage-1 training. groups, grouping, k, ordering: timestep groups and their budgets.
    mean_budget: None for the paper's formula (the hardest group gets the whole base); a number in (0, 1] scales
        that shape so the timestep-weighted mean budget is this fraction of the base (budget.make_plan).
    plan_fractions: each group's budget fraction given explicitly, in group (timestep) order, instead of the
        paper's formula from k and the ordering (e.g. budget.allocate_from_curves); one per group, each in (0, 1].
    budget_unit: what a group's budget fraction is of: "flops" (the base's FLOPs) or "time" (the base's
        forward time measured on this device at latency_batch samples, fitted from a cached per-unit latency
        table). Every pruned expert's FLOPs and measured time are recorded either way.
    search: the pruning search. finetune: stage-2 training of EACH group (steps are per group).
    sampler, sample_steps, num_samples: the sample grid written at the end (and the report's sampler);
        sample_steps None means min(50, T) (`sampling_steps`).
    eval_samples, eval_seeds: images per sampling seed and number of seeds behind the report's FID/KID.
    seed: the run's seed, 0 <= seed < 2**32.
    base_model: start from a trained model instead of training stage 1: a diffusers model or pipeline directory,
        a Hub name or `module:function` (see base_model.load_base_model). A pipeline's scheduler sets the noise
        schedule. base_model_steps: continue training it this many stage-1 steps (0: use it as it is).
    Class-conditional models: label dropout (for classifier-free guidance) is set in base/finetune
    (`label_dropout`, `null_class`); stage 2 keeps stage 1's dropout unless finetune sets its own.
    """

    data: str = "digits"
    image_size: int | None = None
    channels: int | None = None
    limit: int | None = None
    model: str | None = None
    attention: bool = False
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    schedule_version: int | None = None
    base: TrainConfig = field(default_factory=lambda: TrainConfig(steps=3000, lr=2e-3, checkpoint_every=500))
    groups: int = 4
    grouping: str = "snr"
    k: float = 0.5
    mean_budget: float | None = None
    ordering: str = "measured"
    plan_fractions: list[float] | None = None
    budget_unit: str = "flops"
    latency_batch: int = 64
    search: SearchConfig = field(default_factory=SearchConfig)
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(steps=400, lr=5e-4, warmup_steps=20, checkpoint_every=200))
    sampler: str = "ddim"
    sample_steps: int | None = None
    num_samples: int = 64
    eval_samples: int = 512
    eval_seeds: int = 2
    seed: int = 0
    base_model: str | None = None
    base_model_steps: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def sampling_steps(self) -> int:
        """sample_steps, or min(50, T) when it is not set."""
        return min(50, self.num_train_timesteps) if self.sample_steps is None else self.sample_steps

    def validate(self) -> None:
        """Check every setting up front, so a bad one fails before hours of training, not after."""
        from .budget import ORDERINGS, budget_fractions, check_mean_budget
        from .grouping import STRATEGIES
        from .pipeline import SAMPLERS

        self.from_dict(self.to_dict())  # the types, for a config built in code
        check_seed("seed", self.seed)
        if self.num_train_timesteps > MAX_TIMESTEPS:  # before the schedule allocates T entries
            raise ValueError(f"num_train_timesteps (--timesteps) must be at most {MAX_TIMESTEPS}, got "
                             f"{self.num_train_timesteps} (typical: 1000)")
        make_scheduler(self.num_train_timesteps, self.beta_schedule, self.prediction_type,
                       version=self.schedule_version)
        for section in ("base", "finetune", "search"):
            try:
                getattr(self, section).validate()
            except ValueError as err:  # "steps must be ..." -> "base.steps must be ...": which steps
                if str(err).split(" ", 1)[0] not in {f.name for f in fields(getattr(self, section))}:
                    raise
                raise type(err)(f"{section}.{err}") from None
        if self.search.proposer == "llm":
            from .prune.search import get_proposer

            get_proposer("llm")  # endpoint and model come from the environment: check them before training
        checks = [
            (self.groups >= 1, f"groups must be >= 1 (N, the number of timestep groups), got {self.groups}"),
            (self.groups <= self.num_train_timesteps, f"number of groups N={self.groups} exceeds T={self.num_train_timesteps}"),
            (self.grouping in STRATEGIES, f"unknown grouping strategy {self.grouping!r}; choose one of {STRATEGIES}"),
            (self.ordering in ORDERINGS, f"unknown difficulty ordering {self.ordering!r}; choose one of {ORDERINGS}"),
            (self.sampler in SAMPLERS, f"unknown sampler {self.sampler!r}; choose one of {SAMPLERS}"),
            (1 <= self.sampling_steps <= self.num_train_timesteps,
             f"sampling steps must be between 1 and T={self.num_train_timesteps}, got {self.sample_steps} "
             "(--steps, sample_steps; unset: min(50, T))"),
            (self.num_samples >= 1, f"num_samples must be >= 1, got {self.num_samples}"),
            (self.eval_samples >= 2, f"eval_samples must be >= 2 (FID needs two images), got {self.eval_samples}"),
            (self.eval_seeds >= 1, f"eval_seeds must be >= 1, got {self.eval_seeds}"),
            (self.base.mixed_precision == self.finetune.mixed_precision,
             f"base.mixed_precision {self.base.mixed_precision!r} and finetune.mixed_precision "
             f"{self.finetune.mixed_precision!r} differ, but accelerate keeps one precision per process (stage 2 "
             "would fail after stage 1); set both to the same value"),
            (self.base_model_steps >= 0, f"base_model_steps must be >= 0, got {self.base_model_steps}"),
            (self.base_model is not None or self.base_model_steps == 0,
             "base_model_steps continues a given model: set base_model (--base) too, or use base.steps"),
            (self.budget_unit in BUDGET_UNITS, f"unknown budget unit {self.budget_unit!r}; choose one of {BUDGET_UNITS}"),
            (self.latency_batch >= 1, f"latency_batch must be >= 1, got {self.latency_batch}"),
            (self.plan_fractions is None or (len(self.plan_fractions) == self.groups
                                             and all(0 < f <= 1 for f in self.plan_fractions)),
             f"plan_fractions must be one budget fraction in (0, 1] per group (N={self.groups}), got "
             f"{self.plan_fractions}; give N values or leave it unset for the formula from k"),
            (self.plan_fractions is None or self.mean_budget is None,
             "plan_fractions and mean_budget both set the budgets; give one of them"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        budget_fractions(self.groups, self.k)  # after N <= T: it allocates per group
        check_mean_budget(self.mean_budget)

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        """Build from a (possibly partial, possibly nested) dict, as read from a YAML/TOML/JSON file.

        Every value is checked against its field's declared type (see _typed); raises ValueError naming the
        setting otherwise.
        """
        return _typed("", data, cls, cls())


_DESCRIBE = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _typed(key: str, value, hint, default):
    """`value` checked against the declared type `hint` of setting `key` ("" for the whole config).

    Numbers written as strings (YAML reads 1e-3 as a string) become numbers, integers are fine where a float
    is declared and integral floats where an int is; bools are not numbers, and None is taken only where the
    type allows it. A dataclass type takes a mapping of its fields, merged over `default` (an instance).
    """
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # only `X | None` is declared
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
    if is_dataclass(hint):
        if isinstance(value, hint):
            return value
        valid = sorted(f.name for f in fields(hint))
        if not isinstance(value, dict):
            what = f"config section '{key}'" if key else "a config"
            raise ValueError(f"{what} must be a mapping of settings ({', '.join(valid)}), got {_shown(value)}")
        unknown = sorted(set(value) - set(valid))
        if unknown and not key:
            raise ValueError(f"unknown config keys {unknown}; valid keys: {valid}")
        if unknown:
            raise ValueError(f"unknown keys {unknown} in config section '{key}'; valid: {valid}")
        hints = typing.get_type_hints(hint)
        prefix = f"{key}." if key else ""
        return replace(default, **{k: _typed(prefix + k, v, hints[k], getattr(default, k)) for k, v in value.items()})
    origin, items = typing.get_origin(hint), typing.get_args(hint)
    if origin is list and isinstance(value, (list, tuple)):
        return [_typed(f"{key}[{i}]", v, items[0], None) for i, v in enumerate(value)]
    if origin is dict and isinstance(value, dict):
        return {_typed(f"{key} key", k, items[0], None): _typed(f"{key}.{k}", v, items[1], None) for k, v in value.items()}
    if origin in (list, dict):
        wanted = "a list" if origin is list else "a mapping"
        raise ValueError(f"setting '{key}' must be {wanted}{' or null' if type(None) in args else ''}, got {_shown(value)}")
    if hint in (bool, str):
        if isinstance(value, hint):
            return value
    elif not isinstance(value, bool):  # int or float: bools are not numbers
        number = _number(value)
        if number is not None and hint is float:
            return float(number)
        if isinstance(number, int) or isinstance(number, float) and number.is_integer():
            return int(number)
    wanted = _DESCRIBE[hint] + (" or null" if type(None) in args else "")
    raise ValueError(f"setting '{key}' must be {wanted}, got {_shown(value)}")


SCHEDULER_FILE = "scheduler_config.json"
VAE_DIR = "vae"  # base/vae: latent diffusion's VAE, saved from the base pipeline


def _with_pipeline_schedule(config: RunConfig) -> RunConfig:
    """With a diffusers pipeline as base_model, the run's schedule settings are its scheduler's."""
    if not config.base_model:
        return config
    path = Path(config.base_model).expanduser() / "scheduler" / SCHEDULER_FILE
    if not (path.parent.parent / "model_index.json").exists() or not path.exists():
        return config
    from .schedule import BETA_SCHEDULES

    try:
        scheduler = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    changes = {"num_train_timesteps": scheduler.get("num_train_timesteps", config.num_train_timesteps),
               "prediction_type": scheduler.get("prediction_type", config.prediction_type)}
    if scheduler.get("beta_schedule") in BETA_SCHEDULES:
        changes["beta_schedule"] = scheduler["beta_schedule"]
    return replace(config, **changes)


def _conditioning(model, data_classes: int | None, null_class: int | None) -> dict | None:
    """What sampling a class-conditional bundle needs: class ids of the data and the null class (guidance)."""
    classes = num_class_embeds(model)
    if classes is None:
        return None
    return {"num_class_embeds": classes, "num_classes": data_classes, "null_class": null_class}


def _shown(value) -> str:
    return "null" if value is None else repr(value)  # as a config file spells it


def _number(value) -> int | float | None:
    """A number, or a number written as text (YAML reads 1e-3 as a string); None for anything else."""
    if isinstance(value, (int, float)):
        return value
    for parse in (int, float) if isinstance(value, str) else ():
        try:
            return parse(value)
        except ValueError:
            pass
    return None


MAX_TIMESTEPS = 1_000_000  # far beyond any schedule in use, and well inside memory
SEED_LIMIT = 2**32  # the range every seeded library here accepts (numpy's legacy seeding is the narrowest)


def check_seed(name: str, seed: int) -> None:
    """Raise ValueError unless 0 <= seed < 2**32 (`name`: the option or setting, for the message)."""
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{name} must be between 0 and {SEED_LIMIT - 1} (2**32 - 1), got {seed}")


def load_config_file(path: str | Path) -> dict:
    """Read a YAML, TOML or JSON config file into a dict; ValueError / FileNotFoundError name the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    if path.is_dir():
        raise ValueError(f"config file {path} is a directory; pass the settings file itself (.yaml, .yml, .toml or .json)")
    formats = {".yaml": "YAML", ".yml": "YAML", ".toml": "TOML", ".json": "JSON"}
    if path.suffix not in formats:
        raise ValueError(f"config file {path} must end in .yaml, .yml, .toml or .json")
    import tomllib
    import yaml

    def unique(pairs):  # YAML and JSON parsers keep the last of repeated keys silently; TOML refuses them
        keys = [k for k, _ in pairs]
        twice = sorted({str(k) for k in keys if keys.count(k) > 1})
        if twice:
            raise ValueError(f"key(s) {twice} appear more than once in one mapping; keep one of each")
        return dict(pairs)

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):  # own keys only: a `<<` merge may be overridden
            own = [k for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"]
            unique([(self.construct_object(k, deep=deep), None) for k in own])
            return super().construct_mapping(node, deep=deep)

    parse = {"YAML": lambda text: yaml.load(text, Loader=UniqueKeyLoader), "TOML": tomllib.loads,
             "JSON": lambda text: json.loads(text, object_pairs_hook=unique)}[formats[path.suffix]]
    try:
        data = parse(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, tomllib.TOMLDecodeError, ValueError) as err:  # JSONDecodeError, UnicodeDecodeError
        reason = " ".join(str(err).split())  # YAML's messages span lines
        raise ValueError(f"config file {path} is not valid {formats[path.suffix]} ({reason}); fix it and rerun") from None
    if data is None:  # an empty YAML file
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings, got {type(data).__name__}")
    return data


# Which stage's output a setting shapes: changing it is refused once that stage has run.
_STAGE_OF_SETTING = {
    **{k: "base" for k in ("data", "image_size", "channels", "limit", "model", "attention", "num_train_timesteps",
                           "beta_schedule", "prediction_type", "schedule_version", "base", "seed", "base_model",
                           "base_model_steps")},
    **{k: "plan" for k in ("groups", "grouping", "k", "mean_budget", "ordering", "plan_fractions", "budget_unit")},
    **{k: "prune" for k in ("search", "latency_batch")},
    "finetune": "finetune",
}
# Stage outputs in pipeline order: redoing one stage makes every later output stale.
_STAGE_OUTPUT = {"base": "base", "plan": "plan", "prune": "prune", "finetune": "finetune", "bundle": "bundle"}


def stage_settings(config: RunConfig, stage: str) -> dict:
    """The settings that shape `stage`'s output, e.g. stage "base": data, model, schedule, stage-1 training, seed."""
    return {k: v for k, v in config.to_dict().items() if _STAGE_OF_SETTING.get(k) == stage}


def copy_stages(source_run: str | Path, target_run: str | Path, parts: tuple[str, ...]) -> None:
    """Copy finished stage outputs (e.g. "config.json", "base") of one run directory into another that lacks them.

    Each part is copied atomically, so an interrupted copy is redone, never half-trusted; parts the target
    already has are left alone.
    """
    for part in parts:
        source, target = Path(source_run) / part, Path(target_run) / part
        if not target.exists():
            if source.is_dir():
                with atomic_dir(target) as tmp:
                    shutil.copytree(source, tmp, dirs_exist_ok=True)
            else:
                atomic_write_bytes(target, source.read_bytes())


def parse_settings(items: list[str], option: str = "--set") -> dict:
    """["base.steps=500", "k=0.3"] -> {"base.steps": 500, "k": 0.3}, for apply_overrides: values are read as YAML
    scalars (numbers, booleans, strings, as a config file reads them); a later KEY wins.
    Raises ValueError naming `option` for an item without "=" or without a key.
    """
    import yaml

    for item in items:
        if not item.partition("=")[0].strip() or "=" not in item:
            raise ValueError(f"{option} takes KEY=VALUE, got {item!r}")
    return {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in items)}


def apply_overrides(config: RunConfig, overrides: dict) -> RunConfig:
    """A copy of config with dotted-key overrides applied, e.g. {"k": 0.3, "base.steps": 500}."""
    data = config.to_dict()
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if not name:
            data[section] = value
        elif isinstance(data.get(section), dict):
            data[section][name] = value
        elif section in data:  # `base: 5` given too: its own error names it; else `k.x` where k has no keys
            RunConfig.from_dict(data)
            raise ValueError(f"unknown setting '{key}': '{section}' is a single setting, not a section")
        else:
            RunConfig.from_dict({section: {}})  # names the unknown key and the valid ones
    return RunConfig.from_dict(data)


def _load_saved_config(path: Path) -> RunConfig:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            data.setdefault("schedule_version", 1)  # saved before the version was: the unscaled betas it ran with
        return RunConfig.from_dict(data)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, a bad value
        raise ValueError(
            f"{path} is damaged ({err}); restore it, or delete it and rerun with the settings the run was made "
            "with (or use a new output directory)"
        ) from None


LOCK_FILE = ".tdcdiff.lock"
OWNER_FILE = ".tdcdiff.lock.owner"


class RunDirectoryBusy(ValueError):
    """Another process is writing the run directory."""


@contextlib.contextmanager
def lock_run_dir(run_dir: str | Path) -> Iterator[None]:
    """Hold run_dir's lock for the block (created if missing); reentrant within a thread of one process.

    The outermost hold records this process in .tdcdiff.lock.owner and removes stale temporaries (no other
    writer can be active then). Raises RunDirectoryBusy at once, naming the holder, if another process (or
    thread) holds it: waiting silently behind a run of hours would look like a hang.
    """
    from filelock import FileLock, Timeout

    run_dir = Path(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    # One instance per path in this process: nested stages (run_all -> report) re-enter it instead of blocking.
    lock = FileLock(run_dir.resolve() / LOCK_FILE, is_singleton=True)
    outermost = not lock.is_locked
    try:
        lock.acquire(blocking=False)
    except Timeout:
        raise RunDirectoryBusy(
            f"run directory {run_dir} is in use by {_holder(run_dir)}; wait for it to finish, or use another "
            "output directory (--out). One process at a time writes a run directory"
        ) from None
    owner = run_dir / OWNER_FILE
    try:
        if outermost:
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                      "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            atomic_write_text(owner, json.dumps(holder))
            for path in remove_stale_temporaries(run_dir):
                log.info("removed %s, left behind by an interrupted writer", path)
        yield
    except BaseException:
        if created:  # a run refused before its first write leaves no directory behind
            lock.release()
            (run_dir / LOCK_FILE).unlink(missing_ok=True)
            owner.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # only if nothing else was written
        raise
    finally:
        if outermost:
            owner.unlink(missing_ok=True)
        lock.release()


def _holder(run_dir: Path) -> str:
    try:
        owner = json.loads((run_dir / OWNER_FILE).read_text())
        return f"process {owner['pid']} on {owner['host']} (`{owner['command']}`, since {owner['since']})"
    except (OSError, ValueError, KeyError, TypeError):  # the holder has not written it yet, or it is not ours
        return "another process"


def _writes(method):
    """A stage method writes the run directory: it runs holding the directory's lock."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self.lock():
            return method(self, *args, **kwargs)

    return locked


def up_to_date(record: Path, inputs: dict, outputs: list[Path]) -> bool:
    """Whether `outputs` were made from `inputs`, as `record` (written by record_inputs) says, and are unchanged since.

    If not, the record is deleted first, so that a crash while the outputs are rewritten cannot leave a
    matching record beside stale outputs.
    """
    with contextlib.suppress(OSError, ValueError):
        saved = json.loads(record.read_text())
        if saved == {"inputs": json.loads(json.dumps(inputs)), "outputs": _hashes(outputs)}:
            return True
    record.unlink(missing_ok=True)
    return False


def record_inputs(record: Path, inputs: dict, outputs: list[Path]) -> None:
    """Write beside freshly made `outputs` what they were made from (see up_to_date)."""
    atomic_write_text(record, json.dumps({"inputs": inputs, "outputs": _hashes(outputs)}, indent=2))


def _hashes(outputs: list[Path]) -> dict:
    # An output rewritten by something else (e.g. `tdcdiff sample`) no longer matches its record.
    return {path.name: sha256_file(path) for path in outputs}


class Run:
    """One run directory and its config; each stage method is idempotent.

    run_dir: the run directory (created on first use).
    config: the settings; None loads the directory's saved config.json (or the defaults for a new run).
    overrides: dotted-key settings applied on top, e.g. {"k": 0.3, "finetune.steps": 200}. Changing a setting
        of a stage that has already produced output is refused with a message naming it.
    base: start from this trained model (sets RunConfig.base_model; see base_model.load_base_model).
    """

    def __init__(self, run_dir: str | Path, config: RunConfig | None = None, *, overrides: dict | None = None,
                 progress: bool = True, base: str | None = None):
        self.dir = Path(run_dir)
        self.progress = progress
        saved_path = self.dir / "config.json"
        saved = _load_saved_config(saved_path) if saved_path.exists() else None
        overrides = dict(overrides or {}) | ({"base_model": str(base)} if base is not None else {})
        config = apply_overrides(config or saved or RunConfig(), overrides)
        if config.schedule_version is None:  # a run resumes with the schedule it was made with
            config = replace(config, schedule_version=saved.schedule_version if saved else SCHEDULE_VERSION)
        config = _with_pipeline_schedule(config)
        config.validate()
        if saved is not None:
            old, new = saved.to_dict(), config.to_dict()
            stages = list(_STAGE_OUTPUT)
            for key in sorted(k for k in new if new[k] != old[k]):
                stage = _STAGE_OF_SETTING.get(key)
                if stage is None:
                    continue
                stale = [self.dir / _STAGE_OUTPUT[s] for s in stages[stages.index(stage):]]
                stale = [str(path) for path in stale if path.exists()]
                if stale:
                    raise ValueError(
                        f"setting '{key}' differs from the one {self.dir} was run with ({old[key]!r} -> {new[key]!r}) "
                        f"and stage '{stage}' has already run; use a new output directory, or delete "
                        f"{' '.join(stale)} to redo it and the stages after it"
                    )
        self.config = config
        self._data: ImageDataset | None = None
        self._pixels: ImageDataset | None = None
        self._vae = None  # None: not looked up yet; False: pixel space
        self._latent_images: torch.Tensor | None = None
        if config.base_model:  # the run saves and reloads a user's model class in every stage
            from .base_model import trust_function_class

            trust_function_class(config.base_model)

    # -- shared pieces ------------------------------------------------------------------------
    @property
    def pixels(self) -> ImageDataset:
        """The data set as images (what FID compares against, also in latent diffusion)."""
        if self._pixels is None:
            c = self.config
            self._pixels = load_dataset(c.data, size=c.image_size, channels=c.channels, limit=c.limit, seed=c.seed)
        return self._pixels

    @property
    def data(self) -> ImageDataset:
        """What every stage trains and measures on: the images, or for latent diffusion their latents."""
        if self._data is None:
            self._data = self.pixels if self.vae is None else self._latents()
        return self._data

    @property
    def vae(self):
        """Latent diffusion's VAE (saved as base/vae when the base pipeline has one), or None."""
        if self._vae is None:
            path = self.dir / "base" / VAE_DIR
            self._vae = load_model(path) if (path / ARCHITECTURE_FILE).exists() else False
        return self._vae or None

    @property
    def decode(self):
        """Latents -> images (latent.Decoder) for latent diffusion, else None (samples are images already)."""
        from .latent import Decoder

        return Decoder(self.vae) if self.vae is not None else None

    def _latents(self) -> ImageDataset:
        """The data's scaled latents, encoded once and cached as latents/latents.safetensors (with the VAE's and
        the data's record beside it) once the VAE is part of the run."""
        from safetensors.torch import load, save

        from .latent import encode

        pixels = self.pixels
        path = self.dir / "latents" / "latents.safetensors"
        vae_file = self.dir / "base" / VAE_DIR / ARCHITECTURE_FILE
        inputs = {"vae_sha256": sha256_file(vae_file) if vae_file.exists() else None, "data": pixels.describe()}
        record = path.with_suffix(".inputs.json")
        cached = inputs["vae_sha256"] is not None and up_to_date(record, inputs, [path])
        if cached and self._latent_images is None:
            self._latent_images = load(path.read_bytes())["latents"]
        if self._latent_images is None:
            self._latent_images = encode(self.vae, pixels.images)
        if inputs["vae_sha256"] is not None and not cached:
            atomic_write_bytes(path, save({"latents": self._latent_images}))
            record_inputs(record, inputs, [path])
        return ImageDataset(self._latent_images, pixels.labels, name=pixels.name, num_classes=pixels.num_classes,
                            classes=pixels.classes)

    def _split_indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        count = len(self.data)
        order = torch.randperm(count, generator=torch.Generator().manual_seed(self.config.seed))
        held = max(1, min(512, count // 10))
        return order[held:], order[:held]

    def split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(train images, held-out images): a fixed seeded 10% (at most 512) is held out for proxies."""
        if len(self.data) < 2:
            raise ValueError(
                f"the data ({self.config.data}) has {len(self.data)} image, too few: 10% (at least 1) is held out for "
                "the pruning proxies and at least 1 is needed for training; give at least 2 images (raise --limit)"
            )
        train, held = self._split_indices()
        return self.data.images[train], self.data.images[held]

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return tuple(self.data.images.shape[1:])

    @property
    def scheduler(self):
        c = self.config
        copied = self.dir / "base" / SCHEDULER_FILE  # a given pipeline's schedule, kept with the run
        if copied.exists():
            from .base_model import scheduler_from_config

            return scheduler_from_config(json.loads(copied.read_text()))
        return make_scheduler(c.num_train_timesteps, c.beta_schedule, c.prediction_type, version=c.schedule_version)

    def labels(self, model) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(train labels, held-out labels) in split() order for a class-conditional model; (None, None) else."""
        if num_class_embeds(model) is None:
            return None, None
        train, held = self._split_indices()
        return self.data.labels[train], self.data.labels[held]

    def null_class(self, model) -> int | None:
        """The class id that stands for "no label" when the run trains with label dropout, else None."""
        c = self.config
        classes = num_class_embeds(model)
        if classes is None or not (c.base.label_dropout or c.finetune.label_dropout):
            return None
        explicit = c.finetune.null_class if c.finetune.null_class is not None else c.base.null_class
        return classes - 1 if explicit is None else explicit

    def conditioning(self, model) -> dict | None:
        """A bundle's "conditioning" for experts like `model`: class ids of the data and the null class; None for
        an unconditional model."""
        return _conditioning(model, self.data.num_classes, self.null_class(model))

    def sample_labels(self, model, num_images: int) -> torch.Tensor | None:
        """Class-balanced labels (i % classes) for a class-conditional model's samples; None otherwise."""
        from .evaluate import balanced_labels

        return balanced_labels(model, num_images, self.data.num_classes)

    def base_model(self):
        path = self.dir / "base" / FINAL_DIR
        if not path.exists():
            raise FileNotFoundError(f"no trained base model at {path}; run `tdcdiff train-base` first")
        return load_model(path)

    def _save_config(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.dir / "config.json", json.dumps(self.config.to_dict(), indent=2))

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run directory's lock (see lock_run_dir): every method that writes here does.

        Once it is held, the settings are checked against the saved ones again: another process may have run
        a stage with other settings between this Run's opening and now.
        """
        with lock_run_dir(self.dir):
            Run(self.dir, self.config)  # raises as __init__ does for a changed setting of a finished stage
            yield

    # -- stages ------------------------------------------------------------------------------
    @_writes
    def _check_report_data(self) -> None:
        """Under run_all, fail before training when the report's FID cannot be computed on this data."""
        if getattr(self, "_report_follows", False):
            from .metrics import check_reference

            check_reference(self.data.images, self.data.labels, self.data.name)

    def train_base(self):
        """Stage 1: one denoiser on all timesteps (or the given trained model, see RunConfig.base_model)."""
        c = self.config
        if c.base_model:
            return self._import_base()
        preset = c.model or preset_for(self.data.image_size, self.data.channels)
        height, width = self.data.images.shape[2:]
        torch.manual_seed(c.seed)  # the initial weights are part of what the seed fixes
        model = build_unet(
            preset, attention=c.attention, sample_size=height if height == width else (height, width),
            in_channels=self.data.channels, num_train_timesteps=c.num_train_timesteps,
        )
        train_images, _ = self.split()
        self._check_report_data()
        self._check_budgets_reachable(model)  # the architecture is known now: don't train for a doomed plan
        self._save_config()  # after the checks above: a refused run leaves nothing behind
        config = replace(c.base, seed=c.seed * 100)  # stage 2 of group i uses c.seed * 100 + i + 1
        return train(model, train_images, self.scheduler, config, self.dir / "base", labels=self.labels(model)[0],
                     progress=self.progress, description="stage 1: base")

    def _import_base(self):
        """Stage 1 from a trained model: check it fits the data, save it as base/final (or continue training
        it base_model_steps steps)."""
        from .base_model import check_fits_data, load_base_model, scheduler_from_config
        from .train import TrainResult

        c = self.config
        out = self.dir / "base"
        if (out / FINAL_DIR).exists() and not c.base_model_steps:
            return TrainResult(out, 0, float("nan"), 0, 0)
        loaded = load_base_model(c.base_model)
        if loaded.vae is not None:  # latent diffusion: the checks below and every stage see latents
            self._vae, self._data = loaded.vae, None
        model, data = loaded.model, self.data
        check_fits_data(model, c.base_model, channels=data.channels, image_size=data.image_size, data_name=c.data,
                        num_classes=data.num_classes, null_class=self.null_class(model),
                        num_train_timesteps=c.num_train_timesteps)
        train_images, _ = self.split()
        train_labels, _ = self.labels(model)
        given = loaded.scheduler_config
        scheduler = scheduler_from_config(given) if given is not None else self.scheduler
        if given is not None:
            check_given_schedule(scheduler, f"--base {c.base_model}")
        check_finite(model, train_images, scheduler.alphas_cumprod, train_labels)
        architecture_of(model)  # raises now, not after training, if the model cannot be saved
        self._check_budgets_reachable(model)  # before any base_model_steps of training for a doomed plan
        self._check_report_data()
        self._save_config()  # after the checks above: a refused run leaves nothing behind
        if given is not None:  # written only once the model passed: base/ existing marks stage 1 as started
            atomic_write_text(out / SCHEDULER_FILE, json.dumps(given, indent=2))
        if loaded.vae is not None:
            save_model(loaded.vae, out / VAE_DIR)
            self._data = self._latents()  # cached on disk now that the VAE is the run's
        if c.base_model_steps:
            config = replace(c.base, steps=c.base_model_steps, seed=c.seed * 100)
            return train(model, train_images, scheduler, config, out, labels=train_labels, progress=self.progress,
                         description="stage 1: continue the given model")
        save_model(model, out / FINAL_DIR, extra={"source": loaded.source})
        return TrainResult(out, 0, float("nan"), 0, 0)

    @_writes
    def plan(self) -> Plan:
        """Group the timesteps and give each group its FLOPs budget."""
        path = self.dir / "plan" / "plan.json"
        c = self.config
        if path.exists():
            plan = Plan.load(path)  # written before the unit was recorded: the run's (a plan setting since)
            return plan if plan.budget_unit is not None else replace(plan, budget_unit=c.budget_unit)
        self._save_config()
        base = self.base_model()
        base_flops = count_flops(base, self.sample_shape)
        smallest = self._check_budgets_reachable(base)  # before the trial pruning
        scheduler = self.scheduler
        _, held_out = self.split()
        _, held_labels = self.labels(base)
        loss_per_t = None
        if c.grouping == "loss":
            loss_per_t = per_timestep_loss(base, held_out, scheduler, seed=c.seed, labels=held_labels)
        grouping = make_groups(c.grouping, c.groups, scheduler, loss_per_t=loss_per_t)
        where = dict(base_flops=base_flops, sample_shape=self.sample_shape, budget_unit=c.budget_unit,
                     smallest=smallest, provenance={"data": self.data.describe(), "base": str(self.dir / "base")})
        if c.plan_fractions is not None:  # given explicitly: no difficulty to measure, k does not apply
            plan = plan_from_fractions(grouping, c.plan_fractions, **where)
        else:
            sensitivity = None
            if c.ordering == "measured":
                sensitivity = measure_sensitivity(base, held_out, scheduler, grouping, self.sample_shape, seed=c.seed,
                                                  labels=held_labels)
            plan = make_plan(grouping, k=c.k, ordering=c.ordering, sensitivity=sensitivity, mean_budget=c.mean_budget,
                             **where)
        plot_grouping(grouping, scheduler, self.dir / "plan" / "grouping.png", budgets=plan.fractions)
        plan.save(path)
        return plan

    def _check_budgets_reachable(self, base) -> float | None:
        """Refuse settings whose smallest group budget no pruning of `base` (its architecture: trained or not)
        reaches, as far as the config tells it: the formula's easiest group, at most the mean budget, or the
        smallest plan_fractions (budget.check_reachable). Returns the smallest FLOPs fraction a pruned expert is
        accepted at (the search's tolerance below what every layer at its largest ratio gives), or None for time
        budgets or depth pruning, which can go below it."""
        c, smallest = self.config, None
        if c.budget_unit == "flops" and not c.search.depth:
            from .prune.fit import smallest_fraction

            s = c.search
            smallest = smallest_fraction(base, self.sample_shape, units=s.units, ignored_layers=s.ignored_layers,
                                         num_heads=s.num_heads) / (1 + s.tolerance)
        if c.plan_fractions is not None:
            lowest, label, fix = min(c.plan_fractions), "the smallest plan_fractions", "raise it"
        elif c.mean_budget is not None:
            # The smallest group's budget is at most the mean: a mean below reach dooms it whatever k is.
            lowest, label, fix = c.mean_budget, "the mean budget (the smallest group's is at most it)", \
                "raise --mean-budget"
        else:
            lowest, label, fix = (budget_fractions(c.groups, c.k)[0], "the easiest group's budget (1/N + (N-1)/N k)",
                                  RAISE_BUDGET)
        check_reachable([lowest], count_flops(base, self.sample_shape), c.budget_unit, smallest, label=label, fix=fix)
        return smallest

    @_writes
    def prune(self, group: int | None = None) -> list[dict]:
        """Proxy-based pruning: one pruned model per group, meeting its budget. Returns per-group summaries."""
        from .prune.fit import FitResult, fit_to_measured_time
        from .prune.proxy import Proxy, ProxyBatch
        from .prune.search import search

        plan = self.plan()
        self._save_config()
        c = self.config
        base = self.base_model()
        scheduler = self.scheduler
        train_images, held_out = self.split()
        train_labels, held_labels = self.labels(base)
        (self.dir / "prune").mkdir(parents=True, exist_ok=True)
        summaries, table = [], None  # table: the base's latency table, looked up once for time budgets
        for i in self._groups(plan, group):
            out = self.dir / "prune" / f"group_{i}"
            summary_path = self.dir / "prune" / f"summary_{i}.json"
            if summary_path.exists() and out.exists():
                summary = json.loads(summary_path.read_text())
                was = (summary.get("budget_unit", "flops"), summary.get("fraction", summary["budget"] / plan.base_flops))
                if was[0] != c.budget_unit or abs(was[1] - plan.fractions[i]) > 1e-9:
                    raise ValueError(
                        f"{out} was pruned for a {was[0]} budget of {was[1]:.4f} of the base but the plan now says "
                        f"{c.budget_unit} {plan.fractions[i]:.4f}; delete {self.dir / 'prune'} (and the stages after "
                        "it) to prune again"
                    )
                summaries.append(summary)
                continue
            batch = ProxyBatch.make(held_out, plan.grouping.timesteps(i), scheduler, seed=c.seed + i, labels=held_labels)
            # Proxy fine-tuning and Taylor calibration draw from the training split; scoring uses the held-out batch.
            proxy = Proxy(base, batch, scheduler, space=c.search.proxy_space, finetune_steps=c.search.proxy_finetune_steps,
                          train_images=train_images, train_labels=train_labels)
            settings = replace(c.search, seed=c.seed + i)
            if c.budget_unit == "time" and table is None:
                table = self.latency_table(base)
            budget = plan.fractions[i] * table.base_seconds if table is not None else plan.budgets[i]
            result = search(
                base, budget, self.sample_shape, proxy, settings,
                progress=self.progress, log_path=self.dir / "prune" / f"search_{i}.jsonl", latency=table,
            )
            result.memory.save(self.dir / "prune" / f"memory_{i}.json")
            trail = None
            if table is not None:
                # The table's estimate is not the expert's time: time the winner directly and refit its
                # decision to a corrected budget where the measured time misses the plan.
                timed = fit_to_measured_time(
                    base, result.decision, plan.fractions[i], self.sample_shape, c.latency_batch, table,
                    fitted=FitResult(result.model, result.decision, result.flops, budget, 1.0, result.seconds),
                    importance=settings.importance, units=settings.units,
                    ignored_layers=settings.ignored_layers, num_heads=settings.num_heads,
                    calibration=proxy.calibration(settings.seed) if settings.importance == "taylor" else None,
                )
                time_ratio, trail, fit = timed.time_ratio, timed.trail, timed.fit
                if fit.model is not result.model:
                    result = replace(result, model=fit.model, decision=fit.decision, flops=fit.flops,
                                     seconds=fit.seconds, score=float(proxy.score(fit.model)))
            else:  # time it directly, side by side with the base
                time_ratio = time_ratios([base, result.model], self.sample_shape, c.latency_batch)[1]
            save_model(result.model, out)
            summary = {
                "group": i, "budget": budget, "budget_unit": c.budget_unit, "fraction": plan.fractions[i],
                "flops": result.flops, "flops_ratio": result.flops / plan.base_flops,
                "time_ratio": time_ratio, "latency_batch": c.latency_batch,
                # the table's estimate of the search's winner (corrections are fitted on FLOPs, see the trail)
                "estimated_time_ratio": trail[0]["estimated_ratio"] if table is not None else None,
                "time_corrections": trail,
                "decision": result.decision,
                "proxy_score": result.score, "proxy_space": c.search.proxy_space, "proposer": c.search.proposer,
                "candidates": len(result.memory.entries),
            }
            atomic_write_text(summary_path, json.dumps(summary, indent=2))
            summaries.append(summary)
        return summaries

    def latency_table(self, base):
        """The base's per-unit latency table at latency_batch on this device (measured once, then cached)."""
        from .prune.fit import measure_latency_table

        return measure_latency_table(base, self.sample_shape, self.config.latency_batch,
                                     depth_units=self.config.search.depth)

    @_writes
    def finetune(self, group: int | None = None):
        """Stage 2: fine-tune each group's pruned model on its own timesteps (plus the configured mix)."""
        plan = self.plan()
        self._save_config()
        c = self.config
        train_images, _ = self.split()
        teacher = self.base_model() if c.finetune.uses_teacher else None
        results = []
        for i in self._groups(plan, group):
            pruned_dir = self.dir / "prune" / f"group_{i}"
            if not pruned_dir.exists():
                raise FileNotFoundError(f"no pruned model for group {i} at {pruned_dir}; run `tdcdiff prune` first")
            model = load_model(pruned_dir)
            config = replace(c.finetune, seed=c.seed * 100 + i + 1,
                             label_dropout=c.finetune.label_dropout or c.base.label_dropout, null_class=self.null_class(model))
            results.append(
                train(
                    model, train_images, self.scheduler, config, self.dir / "finetune" / f"group_{i}",
                    labels=self.labels(model)[0], timesteps=plan.grouping.timesteps(i), teacher=teacher, progress=self.progress,
                    description=f"stage 2: group {i}",
                )
            )
        return results

    @_writes
    def export_bundle(self) -> Path:
        from .bundle import save_bundle

        out = self.dir / "bundle"
        if (out / "manifest.json").exists():
            return out
        plan = self.plan()
        experts, training = [], []
        for i in range(len(plan.grouping)):
            path = self.dir / "finetune" / f"group_{i}" / FINAL_DIR
            if not path.exists():
                raise FileNotFoundError(f"group {i} is not fine-tuned yet ({path} missing); run `tdcdiff finetune`")
            experts.append(load_model(path))
            summary = path.parent / "train.json"
            summary = json.loads(summary.read_text()) if summary.exists() else {}
            training.append({k: summary[k] for k in ("steps", "final_loss", "fingerprint") if k in summary})
        train_flops = self.training_flops()
        return save_bundle(
            out, experts, plan.grouping, self.scheduler, sample_shape=self.sample_shape,
            expert_flops=[count_flops(e, self.sample_shape) for e in experts], base_flops=plan.base_flops,
            budgets=plan.budgets, expert_training=training,
            provenance={"data": self.data.describe(), "config": self.config.to_dict(), "training_flops": train_flops},
            conditioning=self.conditioning(experts[0]),
            vae=self.vae,
        )

    def training_flops(self) -> dict:
        """Training compute of stage 1 and of each group's stage 2, from the runs' own records."""
        def recorded(path: Path) -> int:
            return json.loads((path / "train.json").read_text())["train_flops"] if (path / "train.json").exists() else 0

        stage2 = [recorded(self.dir / "finetune" / f"group_{i}") for i in range(len(self.plan().grouping))]
        stage1 = recorded(self.dir / "base")
        return {"stage1": stage1, "stage2_per_group": stage2, "total": stage1 + sum(stage2),
                "convention": "FLOPs = 2 x MACs; forward + backward = 3 x forward, x batch x steps"}

    @_writes
    def sample_grid(self, name: str, model, *, seed: int | None = None, source: Path | None = None) -> Path:
        """samples/NAME.png: a grid of the run's sampling settings (sampler, sample_steps, num_samples) from model.

        source: the file that pins the model's weights (a saved model's architecture.json, which holds its
        weights' sha256, or a bundle's manifest.json). With it, an existing grid made from the same weights and
        settings is kept (samples/NAME.inputs.json records them); without it, the grid is always redrawn.
        """
        from .pipeline import sample, save_grid

        c = self.config
        path = self.dir / "samples" / f"{name}.png"
        record = path.with_suffix(".inputs.json")
        inputs = {
            "model_sha256": sha256_file(source) if source is not None else None,
            "sampler": c.sampler, "steps": c.sampling_steps, "num_images": c.num_samples,
            "seed": c.seed if seed is None else seed, "sample_shape": self.sample_shape,
            "schedule": [c.num_train_timesteps, c.beta_schedule, c.prediction_type],
        }
        if source is not None and up_to_date(record, inputs, [path]):
            return path
        result = sample(
            model, self.scheduler, sample_shape=self.sample_shape, sampler=c.sampler, steps=c.sampling_steps,
            num_images=c.num_samples, seed=inputs["seed"], progress=self.progress,
            class_labels=self.sample_labels(model, c.num_samples), decode=self.decode,
        )
        save_grid(result.images, path)
        if source is not None:
            record_inputs(record, inputs, [path])
        return path

    @_writes
    def run_all(self) -> dict:
        """Every stage in order, skipping those already done. Returns where the results are."""
        from .bundle import MANIFEST, load_bundle

        self._report_follows = True  # train_base checks, with its own checks, that the report's FID can run
        self.train_base()
        plan = self.plan()
        self.prune()
        self.finetune()
        bundle_path = self.export_bundle()
        bundle = load_bundle(bundle_path)
        base_grid = self.sample_grid("base", self.base_model(),
                                     source=self.dir / "base" / FINAL_DIR / ARCHITECTURE_FILE)
        tdc_grid = self.sample_grid("tdc", bundle.router, source=bundle_path / MANIFEST)
        c = self.config
        report = report_for_run(self.dir, seeds=tuple(range(c.eval_seeds)), num_samples=c.eval_samples, progress=self.progress)
        return {"bundle": bundle_path, "samples": [base_grid, tdc_grid], "plan": plan, "report": report}

    @staticmethod
    def _groups(plan: Plan, group: int | None) -> range:
        n = len(plan.grouping)
        if group is None:
            return range(n)
        if not 0 <= group < n:
            raise ValueError(f"--group must be between 0 and {n - 1} (the plan has {n} groups), got {group}")
        return range(group, group + 1)


# -- a run's report (report.py draws the page; what needs a Run is here) -----------------------------
def run_figures(run_dir: str | Path, out_dir: str | Path) -> list[tuple[str, str]]:
    """Draw into out_dir the figures only a finished TDC run directory can give: grouping, budgets and
    per-timestep loss; returns their (file, caption) pairs, for report.write_report."""
    from .bundle import load_bundle
    from .grouping import Grouping
    from .report import plot_budgets, plot_loss_per_t

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    plan = json.loads((run_dir / "plan" / "plan.json").read_text())
    bundle = load_bundle(run_dir / "bundle")
    run = Run(run_dir, progress=False)
    grouping = Grouping.from_dict(plan["grouping"])
    plot_grouping(grouping, run.scheduler, out_dir / "grouping.png", budgets=plan["fractions"])
    plot_budgets(plan, bundle.manifest, out_dir / "budgets.png")
    _, held_out = run.split()
    # 40 timesteps x 32 images: a visual, paired (same images and noise for both models), so a few seconds do.
    curves = {name: per_timestep_loss(model, held_out, run.scheduler, num_points=40, images_per_point=32,
                                      seed=run.config.seed, labels=run.labels(model)[1])
              for name, model in (("base (stage 1)", run.base_model()), ("TDC (routed group models)", bundle.router))}
    plot_loss_per_t(curves, grouping.boundaries, out_dir / "loss_per_t.png")
    return [
        ("grouping.png", f"SNR (dB) over the timesteps t, with the {len(grouping)} group boundaries "
                         f"('{grouping.strategy}' grouping) and each group's FLOPs budget as a fraction of the "
                         "base model's FLOPs F."),
        ("budgets.png", "Each group's planned FLOPs budget and the measured FLOPs of its pruned expert "
                        "(2 x MACs, one forward), as fractions of F; the label is the measured error."),
        ("loss_per_t.png", "Denoising loss at every timestep on the run's held-out images with fixed noise: "
                           "the stage-1 base against the routed group models (each t uses its group's "
                           "expert). Below 1 in the lower panel means the group model is better there."),
    ]


def write_run_report(out_dir: str | Path, results: dict, run_dir: str | Path) -> Path:
    """report.write_report with a finished TDC run directory's figures (run_figures) and pruned-experts table
    (report.expert_rows); returns the path of report.html."""
    from .report import expert_rows, write_report

    return write_report(out_dir, results, figures=run_figures(run_dir, out_dir), experts=expert_rows(run_dir))


def _check_bundle_is_the_runs(run, bundle) -> None:
    """Refuse, before any sampling, a bundle that another run (or other settings) made: its groups, image shape
    or recorded settings differ from the run's."""

    def flat(settings: dict, prefix: str = "") -> dict:  # {"base": {"steps": 3}} -> {"base.steps": 3}
        out = {}
        for key, value in settings.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
        return out

    found = []
    plan = run.plan()
    if list(bundle.router.grouping.boundaries) != list(plan.grouping.boundaries):
        found.append(f"group edges {list(bundle.router.grouping.boundaries)} (the run's plan: {plan.grouping.boundaries})")
    if tuple(bundle.sample_shape) != tuple(run.sample_shape):
        found.append(f"image shape {tuple(bundle.sample_shape)} (the run's data: {tuple(run.sample_shape)})")
    provenance = bundle.manifest.get("provenance")
    made_with = provenance.get("config") if isinstance(provenance, dict) else None
    if isinstance(made_with, dict):
        theirs = flat(made_with)
        ours = flat({k: v for stage in ("base", "plan", "prune", "finetune")
                     for k, v in stage_settings(run.config, stage).items()})
        found += [f"setting '{k}' {theirs[k]!r} (the run's: {v!r})"
                  for k, v in ours.items() if k in theirs and theirs[k] != v]
    if found:
        path = run.dir / "bundle"
        raise ValueError(
            f"{path} was not made by this run: its {'; '.join(found[:4])}{' ...' if len(found) > 4 else ''}. Delete "
            f"{path} and rerun `tdcdiff bundle --out {run.dir}` to rebuild it from this run, or report on the run "
            "that made it"
        )


def report_for_run(
    run_dir: str | Path,
    *,
    seeds: tuple[int, ...] = (0, 1),
    num_samples: int = 512,
    sampler: str | None = None,
    steps: int | None = None,
    feature_cache_dir: str | Path | None = None,
    timing_batches: tuple[int, ...] = (1, 64),
    timing_repeats: int = 3,
    progress: bool = True,
) -> Path:
    """The report of one finished TDC run: its stage-1 base against its TDC bundle, in run_dir/report/.

    No controls are trained here (for those, see bench/benchmark.py): the base had less training compute
    than TDC, so this shows what TDC changed, not whether it beats equal-compute alternatives.
    run_dir: the run directory. seeds: sampling seeds; two give the seed spread the verdict needs, at the cost of
        one seed of 1024 (about 25 s for the default digits run on 2 CPU cores). num_samples: images per model
        and seed.
    sampler, steps: default to the run's sampling settings. feature_cache_dir: where the FID feature
    classifier is cached (default: evaluate.default_cache_dir()). timing_batches, timing_repeats: see
    evaluate.evaluate. progress: print one line per measurement. Returns the path of report.html.
    A report made from the same bundle, base weights and settings (report/inputs.json records them) is kept
    as it is; delete report/ to measure again. Holds the run directory's lock (see run.lock_run_dir).
    """
    from .bundle import MANIFEST, load_bundle
    from .evaluate import ModelEntry, evaluate

    run_dir = Path(run_dir)
    with lock_run_dir(run_dir):  # it writes run_dir/report/
        run = Run(run_dir, progress=progress)
        c = run.config
        bundle = load_bundle(run_dir / "bundle")
        _check_bundle_is_the_runs(run, bundle)
        inputs = {
            "bundle_sha256": sha256_file(run_dir / "bundle" / MANIFEST),
            "base_sha256": sha256_file(run_dir / "base" / FINAL_DIR / ARCHITECTURE_FILE),
            "config": {k: v for k, v in c.to_dict().items() if k != "num_samples"},  # the sample grid's size only
            "seeds": list(seeds), "num_samples": num_samples, "sampler": sampler, "steps": steps,
            "timing_batches": list(timing_batches), "timing_repeats": timing_repeats,
        }
        outputs = [run_dir / "report" / name for name in ("report.html", "results.json")]
        if up_to_date(run_dir / "report" / "inputs.json", inputs, outputs):
            return outputs[0]
        compute = run.training_flops()
        entries = [
            ModelEntry("base (stage 1)", run.base_model(), compute["stage1"],
                       notes=f"the run's stage-1 model: {c.base.steps} steps on all timesteps"),
            ModelEntry("TDC", bundle.router, compute["total"],
                       notes=f"{c.groups} group models pruned from the base (k={c.k}, '{c.grouping}' grouping, "
                             f"'{c.ordering}' ordering, proposer '{c.search.proposer}'), each fine-tuned "
                             f"{c.finetune.steps} steps; training compute includes stage 1"),
        ]
        data = run.pixels  # FID compares images, also in latent diffusion (samples are decoded)
        results = evaluate(
            entries, run.scheduler, data.images, data.labels, sample_shape=run.sample_shape, decode=run.decode,
            sampler=sampler or c.sampler, steps=c.sampling_steps if steps is None else steps, num_samples=num_samples,
            seeds=tuple(seeds),
            feature_cache_dir=feature_cache_dir, reference_name=Path(c.data).name,
            timing_batches=tuple(timing_batches), timing_repeats=timing_repeats, grid_dir=run_dir / "report",
            held_out=run.split()[1], loss_grouping=bundle.router.grouping,  # latents in latent diffusion
            num_classes=data.num_classes, held_out_labels=run.labels(bundle.router)[1],
            progress=progress,
        )
        results["context"] = [
            "This compares a run's own stage-1 base with its TDC bundle. The base had less training compute than "
            "TDC (stage 1 only), so a better TDC FID here does not show that TDC beats a model trained with the same "
            "budget; bench/benchmark.py runs those equal-compute controls (single model, uniform pruning).",
        ]
        write_run_report(run_dir / "report", results, run_dir)
        record_inputs(run_dir / "report" / "inputs.json", inputs, outputs)
        return outputs[0]
