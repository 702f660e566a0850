"""The TDC stages over one run directory: train base -> plan -> prune -> fine-tune -> bundle -> sample.

    run_dir/
      config.json          the RunConfig that made it
      base/                stage 1 (train.py layout: checkpoint/, final/, log.jsonl, train.json)
      plan/                plan.json, grouping.png
      prune/group_i/       the pruned model of group i; prune/memory_i.json, prune/search_i.jsonl
      finetune/group_i/    stage 2 of group i (train.py layout)
      bundle/              the deliverable (see bundle.py)
      samples/             sample grids

Each stage skips itself when its output exists, so rerunning after a crash continues where it stopped.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path

import torch

from .budget import Plan, make_plan, measure_sensitivity
from .data import ImageDataset, load_dataset
from .flops import count_flops
from .grouping import make_groups, per_timestep_loss, plot_grouping
from .latency import time_ratios
from .models import build_unet, preset_for
from .prune.search import SearchConfig
from .schedule import make_scheduler
from .serialization import atomic_write_text, load_model, save_model
from .train import FINAL_DIR, TrainConfig, train

log = logging.getLogger("tdcdiff")

BUDGET_UNITS = ("flops", "time")


@dataclass
class RunConfig:
    """Everything a TDC run needs. Every field has a default that works on the embedded digits data.

    data: data spec ("digits", IDX file, image folder or zip, "hf:<name>"); image_size, channels, limit:
        resize / convert / subsample it. model: UNet preset (default: chosen from image size and channels).
    num_train_timesteps, beta_schedule, prediction_type: the noise schedule.
    base: stage-1 training. groups, grouping, k, ordering: timestep groups and their budgets.
    budget_unit: what a group's budget fraction is of: "flops" (the base's FLOPs) or "time" (the base's
        forward time measured on this device at latency_batch samples, fitted from a cached per-unit latency
        table). Every pruned expert's FLOPs and measured time are recorded either way.
    search: the pruning search. finetune: stage-2 training of EACH group (steps are per group).
    sampler, sample_steps, num_samples: the sample grid written at the end (and the report's sampler).
    eval_samples, eval_seeds: images per sampling seed and number of seeds behind the report's FID/KID.
    seed: the run's seed.
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
    base: TrainConfig = field(default_factory=lambda: TrainConfig(steps=3000, lr=2e-3, checkpoint_every=500))
    groups: int = 4
    grouping: str = "snr"
    k: float = 0.5
    ordering: str = "measured"
    budget_unit: str = "flops"
    latency_batch: int = 64
    search: SearchConfig = field(default_factory=SearchConfig)
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(steps=400, lr=5e-4, warmup_steps=20, checkpoint_every=200))
    sampler: str = "ddim"
    sample_steps: int = 50
    num_samples: int = 64
    eval_samples: int = 512
    eval_seeds: int = 2
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        """Check every setting up front, so a bad one fails before hours of training, not after."""
        from .budget import ORDERINGS, budget_fractions
        from .grouping import STRATEGIES
        from .pipeline import SAMPLERS

        make_scheduler(self.num_train_timesteps, self.beta_schedule, self.prediction_type)
        self.base.validate()
        self.finetune.validate()
        budget_fractions(self.groups, self.k)
        self.search.validate()
        if self.search.proposer == "llm":
            from .prune.search import get_proposer

            get_proposer("llm")  # endpoint and model come from the environment: check them before training
        checks = [
            (self.groups <= self.num_train_timesteps, f"number of groups N={self.groups} exceeds T={self.num_train_timesteps}"),
            (self.grouping in STRATEGIES, f"unknown grouping strategy {self.grouping!r}; choose one of {STRATEGIES}"),
            (self.ordering in ORDERINGS, f"unknown difficulty ordering {self.ordering!r}; choose one of {ORDERINGS}"),
            (self.sampler in SAMPLERS, f"unknown sampler {self.sampler!r}; choose one of {SAMPLERS}"),
            (1 <= self.sample_steps <= self.num_train_timesteps,
             f"sampling steps must be between 1 and T={self.num_train_timesteps}, got {self.sample_steps}"),
            (self.num_samples >= 1, f"num_samples must be >= 1, got {self.num_samples}"),
            (self.eval_samples >= 2, f"eval_samples must be >= 2 (FID needs two images), got {self.eval_samples}"),
            (self.eval_seeds >= 1, f"eval_seeds must be >= 1, got {self.eval_seeds}"),
            (self.budget_unit in BUDGET_UNITS, f"unknown budget unit {self.budget_unit!r}; choose one of {BUDGET_UNITS}"),
            (self.latency_batch >= 1, f"latency_batch must be >= 1, got {self.latency_batch}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        """Build from a (possibly partial, possibly nested) dict, as read from a YAML/TOML/JSON file."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(known)}")
        values = dict(data)
        defaults = cls()
        for name, value in values.items():
            default = getattr(defaults, name)
            if isinstance(value, dict) and is_dataclass(default):
                allowed = {f.name for f in fields(default)}
                bad = sorted(set(value) - allowed)
                if bad:
                    raise ValueError(f"unknown keys {bad} in config section '{name}'; valid: {sorted(allowed)}")
                merged = asdict(default) | {k: _coerce(f"{name}.{k}", v, getattr(default, k)) for k, v in value.items()}
                values[name] = type(default)(**merged)
            else:
                values[name] = _coerce(name, value, default)
        return cls(**values)


def _coerce(key: str, value, default):
    """Numbers written as strings (YAML reads 1e-3 as a string) become numbers."""
    if isinstance(value, str) and isinstance(default, (int, float)) and not isinstance(default, bool):
        try:
            return type(default)(float(value)) if isinstance(default, float) else int(value)
        except ValueError:
            raise ValueError(f"setting '{key}' must be a number, got {value!r}") from None
    return value


def load_config_file(path: str | Path) -> dict:
    """Read a YAML, TOML or JSON config file into a dict."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    elif path.suffix == ".toml":
        import tomllib

        data = tomllib.loads(text)
    elif path.suffix == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"config file {path} must end in .yaml, .yml, .toml or .json")
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings, got {type(data).__name__}")
    return data


# Which stage's output a setting shapes: changing it is refused once that stage has run.
_STAGE_OF_SETTING = {
    **{k: "base" for k in ("data", "image_size", "channels", "limit", "model", "attention", "num_train_timesteps",
                           "beta_schedule", "prediction_type", "base", "seed")},
    **{k: "plan" for k in ("groups", "grouping", "k", "ordering")},
    "search": "prune",
    "finetune": "finetune",
}
# Stage outputs in pipeline order: redoing one stage makes every later output stale.
_STAGE_OUTPUT = {"base": "base", "plan": "plan", "prune": "prune", "finetune": "finetune", "bundle": "bundle"}


def stage_settings(config: RunConfig, stage: str) -> dict:
    """The settings that shape `stage`'s output, e.g. stage "base": data, model, schedule, stage-1 training, seed."""
    return {k: v for k, v in config.to_dict().items() if _STAGE_OF_SETTING.get(k) == stage}


def apply_overrides(config: RunConfig, overrides: dict) -> RunConfig:
    """A copy of config with dotted-key overrides applied, e.g. {"k": 0.3, "base.steps": 500}."""
    data = config.to_dict()
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if name:
            data[section][name] = value
        else:
            data[section] = value
    return RunConfig.from_dict(data)


class Run:
    """One run directory and its config; each stage method is idempotent.

    run_dir: the run directory (created on first use).
    config: the settings; None loads the directory's saved config.json (or the defaults for a new run).
    overrides: dotted-key settings applied on top, e.g. {"k": 0.3, "finetune.steps": 200}. Changing a setting
        of a stage that has already produced output is refused with a message naming it.
    """

    def __init__(self, run_dir: str | Path, config: RunConfig | None = None, *, overrides: dict | None = None,
                 progress: bool = True):
        self.dir = Path(run_dir)
        self.progress = progress
        saved_path = self.dir / "config.json"
        saved = RunConfig.from_dict(json.loads(saved_path.read_text())) if saved_path.exists() else None
        config = apply_overrides(config or saved or RunConfig(), overrides or {})
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

    # -- shared pieces ------------------------------------------------------------------------
    @property
    def data(self) -> ImageDataset:
        if self._data is None:
            c = self.config
            self._data = load_dataset(c.data, size=c.image_size, channels=c.channels, limit=c.limit, seed=c.seed)
        return self._data

    def split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(train images, held-out images): a fixed seeded 10% (at most 512) is held out for proxies."""
        images = self.data.images
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.config.seed))
        held = max(1, min(512, len(images) // 10))
        return images[order[held:]], images[order[:held]]

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return tuple(self.data.images.shape[1:])

    @property
    def scheduler(self):
        c = self.config
        return make_scheduler(c.num_train_timesteps, c.beta_schedule, c.prediction_type)

    def base_model(self):
        path = self.dir / "base" / FINAL_DIR
        if not path.exists():
            raise FileNotFoundError(f"no trained base model at {path}; run `tdcdiff train-base` first")
        return load_model(path)

    def _save_config(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.dir / "config.json", json.dumps(self.config.to_dict(), indent=2))

    # -- stages ------------------------------------------------------------------------------
    def train_base(self):
        """Stage 1: one denoiser on all timesteps."""
        self._save_config()
        c = self.config
        preset = c.model or preset_for(self.data.image_size, self.data.channels)
        torch.manual_seed(c.seed)  # the initial weights are part of what the seed fixes
        model = build_unet(
            preset, attention=c.attention, sample_size=self.data.image_size, in_channels=self.data.channels,
            num_train_timesteps=c.num_train_timesteps,
        )
        train_images, _ = self.split()
        config = replace(c.base, seed=c.seed * 100)  # stage 2 of group i uses c.seed * 100 + i + 1
        return train(model, train_images, self.scheduler, config, self.dir / "base", progress=self.progress, description="stage 1: base")

    def plan(self) -> Plan:
        """Group the timesteps and give each group its FLOPs budget."""
        path = self.dir / "plan" / "plan.json"
        if path.exists():
            return Plan.load(path)
        self._save_config()
        c = self.config
        base = self.base_model()
        scheduler = self.scheduler
        _, held_out = self.split()
        loss_per_t = None
        if c.grouping == "loss":
            loss_per_t = per_timestep_loss(base, held_out, scheduler, seed=c.seed)
        grouping = make_groups(c.grouping, c.groups, scheduler, loss_per_t=loss_per_t)
        sensitivity = None
        if c.ordering == "measured":
            sensitivity = measure_sensitivity(base, held_out, scheduler, grouping, self.sample_shape, seed=c.seed)
        plan = make_plan(
            grouping, k=c.k, ordering=c.ordering, base_flops=count_flops(base, self.sample_shape),
            sample_shape=self.sample_shape, sensitivity=sensitivity,
            provenance={"data": self.data.describe(), "base": str(self.dir / "base")},
        )
        plot_grouping(grouping, scheduler, self.dir / "plan" / "grouping.png", budgets=plan.fractions)
        plan.save(path)
        return plan

    def prune(self, group: int | None = None) -> list[dict]:
        """Proxy-based pruning: one pruned model per group, meeting its budget. Returns per-group summaries."""
        from .prune.proxy import Proxy, ProxyBatch
        from .prune.search import search

        plan = self.plan()
        self._save_config()
        c = self.config
        base = self.base_model()
        scheduler = self.scheduler
        train_images, held_out = self.split()
        (self.dir / "prune").mkdir(parents=True, exist_ok=True)
        summaries = []
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
            batch = ProxyBatch.make(held_out, plan.grouping.timesteps(i), scheduler, seed=c.seed + i)
            # Proxy fine-tuning and Taylor calibration draw from the training split; scoring uses the held-out batch.
            proxy = Proxy(base, batch, scheduler, space=c.search.proxy_space, finetune_steps=c.search.proxy_finetune_steps,
                          train_images=train_images)
            settings = replace(c.search, seed=c.seed + i)
            table = self.latency_table(base) if c.budget_unit == "time" else None
            budget = plan.fractions[i] * table.base_seconds if table is not None else plan.budgets[i]
            result = search(
                base, budget, self.sample_shape, proxy, settings,
                progress=self.progress, log_path=self.dir / "prune" / f"search_{i}.jsonl", latency=table,
            )
            result.memory.save(self.dir / "prune" / f"memory_{i}.json")
            save_model(result.model, out)
            # The table's estimate is not the expert's time: time it directly, side by side with the base.
            time_ratio = time_ratios([base, result.model], self.sample_shape, c.latency_batch)[1]
            summary = {
                "group": i, "budget": budget, "budget_unit": c.budget_unit, "fraction": plan.fractions[i],
                "flops": result.flops, "flops_ratio": result.flops / plan.base_flops,
                "time_ratio": time_ratio, "latency_batch": c.latency_batch,
                "estimated_time_ratio": result.seconds / table.base_seconds if table is not None else None,
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

    def finetune(self, group: int | None = None):
        """Stage 2: fine-tune each group's pruned model on its own timesteps (plus the configured mix)."""
        plan = self.plan()
        self._save_config()
        c = self.config
        train_images, _ = self.split()
        teacher = self.base_model() if c.finetune.distill_weight > 0 else None
        results = []
        for i in self._groups(plan, group):
            pruned_dir = self.dir / "prune" / f"group_{i}"
            if not pruned_dir.exists():
                raise FileNotFoundError(f"no pruned model for group {i} at {pruned_dir}; run `tdcdiff prune` first")
            model = load_model(pruned_dir)
            config = replace(c.finetune, seed=c.seed * 100 + i + 1)
            results.append(
                train(
                    model, train_images, self.scheduler, config, self.dir / "finetune" / f"group_{i}",
                    timesteps=plan.grouping.timesteps(i), teacher=teacher, progress=self.progress,
                    description=f"stage 2: group {i}",
                )
            )
        return results

    def export_bundle(self) -> Path:
        from .bundle import save_bundle

        out = self.dir / "bundle"
        if (out / "manifest.json").exists():
            return out
        plan = self.plan()
        experts = []
        for i in range(len(plan.grouping)):
            path = self.dir / "finetune" / f"group_{i}" / FINAL_DIR
            if not path.exists():
                raise FileNotFoundError(f"group {i} is not fine-tuned yet ({path} missing); run `tdcdiff finetune`")
            experts.append(load_model(path))
        train_flops = self.training_flops()
        return save_bundle(
            out, experts, plan.grouping, self.scheduler, sample_shape=self.sample_shape,
            expert_flops=[count_flops(e, self.sample_shape) for e in experts], base_flops=plan.base_flops,
            budgets=plan.budgets,
            provenance={"data": self.data.describe(), "config": self.config.to_dict(), "training_flops": train_flops},
        )

    def training_flops(self) -> dict:
        """Training compute of stage 1 and of each group's stage 2, from the runs' own records."""
        def recorded(path: Path) -> int:
            return json.loads((path / "train.json").read_text())["train_flops"] if (path / "train.json").exists() else 0

        stage2 = [recorded(self.dir / "finetune" / f"group_{i}") for i in range(len(self.plan().grouping))]
        stage1 = recorded(self.dir / "base")
        return {"stage1": stage1, "stage2_per_group": stage2, "total": stage1 + sum(stage2),
                "convention": "FLOPs = 2 x MACs; forward + backward = 3 x forward, x batch x steps"}

    def sample_grid(self, name: str, model, *, seed: int | None = None) -> Path:
        from .pipeline import sample, save_grid

        c = self.config
        result = sample(
            model, self.scheduler, sample_shape=self.sample_shape, sampler=c.sampler, steps=c.sample_steps,
            num_images=c.num_samples, seed=c.seed if seed is None else seed, progress=self.progress,
        )
        return save_grid(result.images, self.dir / "samples" / f"{name}.png")

    def run_all(self) -> dict:
        """Every stage in order, skipping those already done. Returns where the results are."""
        from .bundle import load_bundle
        from .report import report_for_run

        self.train_base()
        plan = self.plan()
        self.prune()
        self.finetune()
        bundle_path = self.export_bundle()
        bundle = load_bundle(bundle_path)
        base_grid = self.sample_grid("base", self.base_model())
        tdc_grid = self.sample_grid("tdc", bundle.router)
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
