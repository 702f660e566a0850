"""RunConfig: every setting of a TDC run, checked up front; which stage each setting shapes."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

from ..base_model import diffusers_folder
from ..budget import BUDGET_UNITS, ORDERINGS, budget_fractions, check_mean_budget
from ..capacity import FID_LIMIT, GRID_LIMIT, MAX_FID_IMAGES, MAX_FID_SEEDS, MAX_GRID_IMAGES, SEEDS_LIMIT
from ..devices import check_cuda_visible
from ..files import parse_json, read_untrusted
from ..grouping import STRATEGIES
from ..pipeline import SAMPLERS
from ..pipeline_schedule import check_pipeline_schedule, pipeline_scheduler_class
from ..prune.search import SearchConfig, get_proposer
from ..samplers import sampler_for_scheduler
from ..schedule import BETA_SCHEDULES, MAX_TIMESTEPS, make_scheduler
from ..settings import SEED, Rule, Settings, at_least, at_most, one_of, setting, shown
from ..train import TrainConfig

SCHEDULER_FILE = "scheduler_config.json"
MAX_SCHEDULER_BYTES = 1 << 20  # a scheduler config is under a kilobyte
FIX_PIPELINE = "pass a diffusers pipeline saved with save_pretrained"
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass
class RunConfig(Settings):
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
    sampler, sample_steps, num_samples: the sample grid written at the end, the report's sampler and the
        bundle's default sampling; sampler None means the sampler of a base pipeline's scheduler class
        (samplers.sampler_for_scheduler: a DDIMScheduler pipeline samples with "ddim", PNDM with "pndm", ...),
        else "ddim" (resolved when a run opens, `with_pipeline_schedule`); sample_steps None means min(50, T)
        (`sampling_steps`).
    device: where every stage runs (training, proxies, latency tables, sampling, FID): "auto" (CUDA when
        available, else the CPU), "cpu", "cuda" or "cuda:N" (`torch_device`). Several GPUs: stage-1 and stage-2
        training under `accelerate launch` (see docs/speed.md).
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
    num_train_timesteps: int = setting(1000, rule=at_most(MAX_TIMESTEPS, about="--timesteps", typical="typical: 1000"))
    beta_schedule: str = setting("linear", rule=one_of(BETA_SCHEDULES, what="beta_schedule"))
    prediction_type: str = "epsilon"
    schedule_version: int | None = None
    base: TrainConfig = setting(factory=lambda: TrainConfig(steps=3000, lr=2e-3, checkpoint_every=500))
    groups: int = setting(4, rule=at_least(1, note="N, the number of timestep groups"))
    grouping: str = setting("snr", rule=one_of(STRATEGIES, what="grouping strategy"))
    k: float = 0.5
    mean_budget: float | None = None
    ordering: str = setting("measured", rule=one_of(ORDERINGS, what="difficulty ordering"))
    plan_fractions: list[float] | None = None
    budget_unit: str = setting("flops", rule=one_of(BUDGET_UNITS, what="budget unit"))
    latency_batch: int = setting(64, rule=at_least(1))
    search: SearchConfig = setting(factory=SearchConfig)
    finetune: TrainConfig = setting(factory=lambda: TrainConfig(steps=400, lr=5e-4, warmup_steps=20,
                                                                checkpoint_every=200))
    sampler: str | None = setting(None, rule=Rule(lambda v: v is None or v in SAMPLERS, "", choices=SAMPLERS,
                                                  what="sampler"))
    sample_steps: int | None = None
    num_samples: int = setting(64, rule=at_least(1))
    eval_samples: int = setting(512, rule=at_least(2, note="FID needs two images"))
    eval_seeds: int = setting(2, rule=at_least(1))
    seed: int = setting(0, rule=SEED)
    base_model: str | None = None
    base_model_steps: int = setting(0, rule=at_least(0))
    device: str = setting("auto", rule=Rule(lambda v: isinstance(v, str) and DEVICE.fullmatch(v) is not None,
                                            "must be auto, cpu, cuda or cuda:N"))

    @property
    def torch_device(self) -> str:
        """The device every stage runs on: `device`, with "auto" resolved to "cuda" when a GPU is visible."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def sampling_steps(self) -> int:
        """sample_steps, or min(50, T) when it is not set."""
        return min(50, self.num_train_timesteps) if self.sample_steps is None else self.sample_steps

    def validate(self, prefix: str = "") -> None:
        """Check every setting up front, so a bad one fails before hours of training, not after."""
        super().validate(prefix)
        budget_fractions(self.groups, self.k)  # after N <= T (checks): it allocates per group
        check_mean_budget(self.mean_budget)

    def check_values(self) -> None:
        """The fields' rules, k and mean_budget: what a saved config.json's values are judged by apart from this
        machine (see Settings.check_values)."""
        super().check_values()
        budget_fractions(min(self.groups, self.num_train_timesteps), self.k)  # N capped: it allocates per group
        check_mean_budget(self.mean_budget)

    def machine_checks(self) -> None:
        check_device(self.torch_device)
        if self.search.proposer == "llm":
            get_proposer("llm")  # endpoint and model come from the environment: check them before training

    def checks(self):
        make_scheduler(self.num_train_timesteps, self.beta_schedule, self.prediction_type,
                       version=self.schedule_version)
        for section in ("base", "finetune", "search"):
            _validate_section(getattr(self, section), section)
        return [
            (self.num_samples <= MAX_GRID_IMAGES,
             f"num_samples must be at most {MAX_GRID_IMAGES}, got {self.num_samples} ({GRID_LIMIT})"),
            (self.eval_samples <= MAX_FID_IMAGES,
             f"eval_samples must be at most {MAX_FID_IMAGES}, got {self.eval_samples} ({FID_LIMIT})"),
            (self.eval_seeds <= MAX_FID_SEEDS,
             f"eval_seeds must be at most {MAX_FID_SEEDS}, got {self.eval_seeds} ({SEEDS_LIMIT})"),
            (self.base_model is not None or not (self.base.label_dropout or self.finetune.label_dropout),
             f"label dropout (base.label_dropout {self.base.label_dropout}, finetune.label_dropout "
             f"{self.finetune.label_dropout}) needs a class-conditional model, and the UNet presets are unconditional; "
             "give a class-conditional --base (e.g. a UNet2DModel with num_class_embeds) or set it to 0"),
            (self.groups <= self.num_train_timesteps,
             f"number of groups N={self.groups} exceeds T={self.num_train_timesteps}"),
            (1 <= self.sampling_steps <= self.num_train_timesteps,
             f"sampling steps must be between 1 and T={self.num_train_timesteps}, got {self.sample_steps} "
             "(--steps, sample_steps; unset: min(50, T))"),
            (self.base.mixed_precision == self.finetune.mixed_precision,
             f"base.mixed_precision {self.base.mixed_precision!r} and finetune.mixed_precision "
             f"{self.finetune.mixed_precision!r} differ, but accelerate keeps one precision per process (stage 2 "
             "would fail after stage 1); set both to the same value"),
            (self.base_model is None or bool(self.base_model.strip()),
             "base_model (--base) is empty; name a trained model (a diffusers directory, a Hub name or "
             "module:function), or leave it unset to train stage 1"),
            (self.base_model is not None or self.base_model_steps == 0,
             "base_model_steps continues a given model: set base_model (--base) too, or use base.steps"),
            (self.plan_fractions is None or (len(self.plan_fractions) == self.groups
                                             and all(0 < f <= 1 for f in self.plan_fractions)),
             f"plan_fractions must be one budget fraction in (0, 1] per group (N={self.groups}), got "
             f"{self.plan_fractions}; give N values or leave it unset for the formula from k"),
            (self.plan_fractions is None or self.mean_budget is None,
             "plan_fractions and mean_budget both set the budgets; give one of them"),
        ]


def check_device(device: str, source: str = "--device", fix: str = "use --device cpu") -> None:
    """Refuse a CUDA device this process cannot see (before any work). source: where the setting came from and
    fix: how to change it there, for the message (the flag, or a run's config.json). Raises ValueError."""
    if device.startswith("cuda"):
        check_cuda_visible(int(device.partition(":")[2] or 0), f"device {device!r} ({source})", fix)


def check_saved_device(run_dir: Path, saved: RunConfig | None, config: RunConfig, overrides: dict) -> None:
    """check_device for a device that came from the run's config.json (`saved`; not overridden), naming that file
    and how to change it there: a machine without the GPU the run was made on (the device shapes no stage's
    output, so it may change). Raises ValueError."""
    if saved is not None and config.device == saved.device and "device" not in overrides:
        check_device(config.torch_device, source=f"from {run_dir / 'config.json'}",
                     fix='set its "device" to "auto" or "cpu", or pass --device cpu to a command that takes it')


def _validate_section(section, name: str) -> None:
    """section.validate(), its message naming the setting by its dotted key ("steps must be ..." -> "base.steps
    must be ...")."""
    if isinstance(section, Settings):
        section.validate(f"{name}.")
        return
    try:
        section.validate()
    except ValueError as err:
        if str(err).split(" ", 1)[0] not in {f.name for f in fields(section)}:
            raise
        raise type(err)(f"{name}.{err}") from None


def with_pipeline_schedule(config: RunConfig) -> RunConfig:
    """With a diffusers pipeline as base_model, the run's schedule settings are its scheduler's, and an unset
    sampler is the one of its scheduler class (samplers.sampler_for_scheduler); otherwise an unset sampler is
    "ddim". Raises ValueError, before any work, for a pipeline scheduler without betas (flow matching, whatever the
    sampler) or whose betas no sampler follows (pipeline_schedule.check_pipeline_schedule), or of a class that no
    sampler follows (unless a sampler is given)."""
    ddim = replace(config, sampler=config.sampler or "ddim")
    if not config.base_model:
        return ddim
    path = Path(config.base_model).expanduser() / "scheduler" / SCHEDULER_FILE
    if not (path.parent.parent / "model_index.json").exists() or not path.exists():
        return ddim
    try:
        scheduler = parse_json(read_untrusted(path.parent, path.name, str(path), max_bytes=MAX_SCHEDULER_BYTES,
                                              hint=FIX_PIPELINE), path, FIX_PIPELINE)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); {FIX_PIPELINE}") from None
    if not isinstance(scheduler, dict):
        raise ValueError(f"{path} must hold a JSON object (a diffusers scheduler config)")
    changes = {"num_train_timesteps": scheduler.get("num_train_timesteps", config.num_train_timesteps),
               "prediction_type": scheduler.get("prediction_type", config.prediction_type)}
    if scheduler.get("beta_schedule") in BETA_SCHEDULES:
        changes["beta_schedule"] = scheduler["beta_schedule"]
    index = path.parent.parent / "model_index.json"
    index = parse_json(read_untrusted(index.parent, index.name, str(index), max_bytes=MAX_SCHEDULER_BYTES,
                                      hint=FIX_PIPELINE), index, FIX_PIPELINE)
    name = pipeline_scheduler_class(index if isinstance(index, dict) else {}, scheduler)
    check_pipeline_schedule(name, scheduler, f"--base {config.base_model}")  # whatever the sampler
    if config.sampler is None:
        changes["sampler"] = sampler_for_scheduler(name or "DDPMScheduler", f"--base {config.base_model}")[0]
    return replace(config, **changes)


# Which stage's output a setting shapes: changing it is refused once that stage has run.
STAGE_OF_SETTING = {
    **{k: "base" for k in ("data", "image_size", "channels", "limit", "model", "attention", "num_train_timesteps",
                           "beta_schedule", "prediction_type", "schedule_version", "base", "seed", "base_model",
                           "base_model_steps")},
    **{k: "plan" for k in ("groups", "grouping", "k", "mean_budget", "ordering", "plan_fractions", "budget_unit")},
    **{k: "prune" for k in ("search", "latency_batch")},
    "finetune": "finetune",
}
# Stage outputs in pipeline order: redoing one stage makes every later output stale.
STAGE_OUTPUT = {"base": "base", "plan": "plan", "prune": "prune", "finetune": "finetune", "bundle": "bundle"}


def stage_settings(config: RunConfig, stage: str) -> dict:
    """The settings that shape `stage`'s output, e.g. stage "base": data, model, schedule, stage-1 training, seed."""
    return {k: v for k, v in config.to_dict().items() if STAGE_OF_SETTING.get(k) == stage}


def check_unchanged(run_dir: Path, saved: RunConfig, config: RunConfig) -> None:
    """Refuse a setting that differs from the saved one when the stage it shapes has already written output. A
    section's settings (finetune, search, base) are named by their own dotted keys ('finetune.distill_weight'),
    not the whole section."""
    old, new = _by_key(saved.to_dict()), _by_key(config.to_dict())
    changed = [k for k in sorted(old.keys() | new.keys()) if old.get(k, _UNSET) != new.get(k, _UNSET)]
    stages = list(STAGE_OUTPUT)
    for stage in stages:
        keys = [k for k in changed if STAGE_OF_SETTING.get(k.split(".")[0]) == stage]
        stale = [run_dir / STAGE_OUTPUT[s] for s in stages[stages.index(stage):]]
        stale = [str(path) for path in stale if path.exists()]
        if keys and stale:
            names = ", ".join(f"'{k}'" for k in keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
            values = "; ".join(f"{k}: " * (len(keys) > 1) + f"{_shown(old, k)} -> {_shown(new, k)}" for k in keys[:4])
            many = len(keys) > 1
            raise ValueError(
                f"setting{'s' * many} {names} differ{'s' * (not many)} from the one{'s' * many} {run_dir} was run "
                f"with ({values}) and stage '{stage}' has already run; use a new output directory, or delete "
                f"{' '.join(stale)} to redo it and the stages after it"
            )


_UNSET = object()  # a key only one side has


def _by_key(settings: dict) -> dict:
    """A config's settings by dotted key, one level deep as a config file's sections are ("finetune.steps"); a
    setting's own mapping (search.units) stays whole."""
    return {f"{k}.{name}" if isinstance(v, dict) else k: value
            for k, v in settings.items() for name, value in (v.items() if isinstance(v, dict) else [(k, v)])}


def _shown(values: dict, key: str) -> str:
    return shown(values[key]) if key in values else "unset"


MAX_SAVED_CONFIG_BYTES = 1 << 20  # config.json of a run is a few kilobytes


DAMAGED = ("restore it, or delete it and rerun with the settings the run was made with (or use a new output "
           "directory)")


def saved_config(run_dir: Path, *, given: bool) -> RunConfig | None:
    """The run directory's config.json (load_saved_config), or None when there is none. given: the settings
    were passed in code (Stages' config). Raises ValueError when config.json is gone but the stage outputs it was
    written before are there, and the settings are not given: the defaults would pass for the ones they were
    made with (a report would call the run's own bundle "not made by this run"), and when run_dir is a tune
    directory (tune.json or candidates.json, no config.json): its base/ is not a run's stage output."""
    path = run_dir / "config.json"
    check_not_diffusers(run_dir, "run directory")
    if path.exists():
        return load_saved_config(path)
    tune = [name for name in ("tune.json", "candidates.json") if (run_dir / name).exists()]
    if tune:
        raise ValueError(f"{run_dir} is a tdcdiff tune directory (it holds {tune[0]}), not a run directory: to "
                         f"continue that tune use `tdcdiff tune --out {run_dir}`; for a run, use another output "
                         "directory (--out)")
    made = [f"{name}/" for name in STAGE_OUTPUT.values() if (run_dir / name).exists()]
    if made and not given:
        raise ValueError(
            f"{path} is missing, but {run_dir} holds a run's outputs ({', '.join(made)}): the settings they were "
            "made with are unknown; restore config.json (a bundle's manifest.json keeps them under "
            "provenance.config), or use a new output directory")
    return None



def check_not_diffusers(path: Path, what: str, option: str | None = None) -> None:
    """Refuse a diffusers model or pipeline folder (base_model.diffusers_folder) as a run's or tune's directory
    (`what`), naming it and its use: the trained model to prune, `--base`. option: the flag that gave path, for
    the message. Raises ValueError."""
    diffusers = diffusers_folder(path)
    if diffusers:
        label, flag = (f"{option} ", option) if option else ("", "directory")
        then = "" if what == "run directory" else ", then give that run as --base-from of `tdcdiff tune`"
        raise ValueError(f"{label}{path} is {diffusers}, not a {what}: tdcdiff takes it as the trained model to "
                         f"prune, `tdcdiff run --base {path}` (or Run(..., base=...)){then}; use a new or empty "
                         f"{flag}")


def check_not_a_run(tune_dir: Path) -> None:
    """Refuse a run directory as a tune's directory (the converse of saved_config's refusal), before any write: the
    tune's files would be mixed into the run, and its base run nested in the run's base/. A run directory holds
    config.json or a stage output after base/ (a tune directory's base/ is its base run's).
    Raises ValueError naming tune_dir and the fix."""
    made = [name for name in ("config.json", *(f"{d}/" for d in STAGE_OUTPUT.values() if d != "base"))
            if (tune_dir / name).exists()]
    if made:
        raise ValueError(f"{tune_dir} is a tdcdiff run directory (it holds {made[0]}), not a tune directory: a tune "
                         f"there would mix its files into the run; use another --out (to tune from that run's base "
                         f"model, give --base-from {tune_dir})")


def load_saved_config(path: Path) -> RunConfig:
    """A run directory's config.json (untrusted: read with a size cap, every value typed and checked).

    Raises ValueError naming the file and the fix when it is damaged."""
    data = parse_json(read_untrusted(path.parent, path.name, str(path), max_bytes=MAX_SAVED_CONFIG_BYTES,
                                     hint=DAMAGED), path, DAMAGED, problem="is damaged")
    if isinstance(data, dict):
        data.setdefault("schedule_version", 1)  # saved before the version was: the unscaled betas it ran with
        if data["schedule_version"] is None:  # a run always writes its version: null would pick another schedule
            raise ValueError(f"{path} is damaged ('schedule_version' is null, which a run never writes: it would "
                             f"sample with another schedule's betas than the run trained with); {DAMAGED}")
    try:
        config = RunConfig.from_dict(data)
        config.check_values()  # a value out of range ('k': 1e400) names this file, not a flag the user never gave
        return config
    except ValueError as err:  # a value of the wrong type or out of range, an unknown key
        raise ValueError(f"{path} is damaged ({err}); {DAMAGED}") from None
