"""The TDC stages over one run directory: train base -> plan -> prune -> fine-tune -> bundle -> sample grid.

Each stage skips itself when its output exists, so rerunning after a crash continues where it stopped, and each
stage that writes holds the run directory's lock (rundir.lock_run_dir).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch

from ..base_model import (
    BaseModelError,
    check_fits_data,
    check_saveable,
    load_base_model,
    trust_function,
)
from ..budget import (
    RAISE_BUDGET,
    BudgetPlan,
    budget_fractions,
    check_reachable,
    make_plan,
    plan_from_fractions,
)
from ..bundle import BundleError, check_bundle_scheduler, save_bundle
from ..capacity import check_sampling_memory, check_training_memory
from ..content_hash import sha256_file
from ..evaluate import check_feature_net
from ..files import atomic_write_text, read_json_file
from ..flops import count_flops
from ..grouping import make_groups
from ..latency import ExpertTimer, clock, timing_batch
from ..losses import per_timestep_loss
from ..models import build_unet, check_finite, num_class_embeds, preset_for, text_width
from ..pipeline import sample, save_grid
from ..pipeline_schedule import scheduler_from_config
from ..plots import plot_grouping
from ..prune.fit import FitResult, fit_to_measured_time, measure_latency_table, smallest_fraction
from ..prune.importance import get_importance
from ..prune.proxy import Proxy, ProxyBatch
from ..prune.search import search
from ..prune.sensitivity import measure_sensitivity
from ..samplers import PIPELINE_SAMPLERS, sampler_for_scheduler
from ..sampling_setting import SamplingSetting
from ..schedule import SCHEDULE_VERSION, check_given_schedule
from ..serialization import save_model
from ..settings import apply_overrides
from ..text import save_tokenizer
from ..train import FINAL_DIR, TrainResult, train
from .config import SCHEDULER_FILE, RunConfig, check_saved_device, check_unchanged, saved_config, with_pipeline_schedule
from .inputs import TEXT_ENCODER_DIR, TOKENIZER_DIR, VAE_DIR, RunInputs
from .plan_file import check_plan_fits, load_plan
from .rundir import check_out_dir, lock_run_dir, record_inputs, up_to_date, writes


class Stages(RunInputs):
    """One run directory and its config; each stage method is idempotent (see the module docstring).

    run_dir: the run directory (created on first use).
    config: the settings; None loads the directory's saved config.json (or the defaults for a new run).
    overrides: dotted-key settings applied on top, e.g. {"k": 0.3, "finetune.steps": 200}. Changing a setting
        of a stage that has already produced output is refused with a message naming it.
    base: start from this trained model (sets RunConfig.base_model; see base_model.load_base_model).
    A `module:function` base is called only when named here (base, config or overrides): one that only the
    directory's config.json names is never imported (run directories are untrusted input, like bundles).
    """

    def __init__(self, run_dir: str | Path, config: RunConfig | None = None, *, overrides: dict | None = None,
                 progress: bool = True, base: str | None = None):
        run_dir = Path(run_dir) if str(run_dir).strip() else check_out_dir(run_dir)  # refused: Path("") is "."
        saved = saved_config(run_dir, given=config is not None)
        overrides = dict(overrides or {}) | ({"base_model": str(base)} if base is not None else {})
        named = overrides.get("base_model", config.base_model if config is not None else None)
        config = apply_overrides(config or saved or RunConfig(), overrides)
        if config.schedule_version is None:  # a run resumes with the schedule it was made with
            config = replace(config, schedule_version=saved.schedule_version if saved else SCHEDULE_VERSION)
        config = with_pipeline_schedule(config)
        check_saved_device(run_dir, saved, config, overrides)
        config.validate()
        clock()  # a bad $TDCDIFF_CLOCK fails now, not at the prune stage after stage 1
        if saved is not None:
            check_unchanged(run_dir, saved, config)
        super().__init__(run_dir, config)
        self.progress = progress
        self.report_follows = False  # run_all sets it: stage 1 then checks that the report's FID can run
        if named == config.base_model:  # the run saves and reloads the user's model class in every stage
            trust_function(named)

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
            saved = saved_config(self.dir, given=True)
            if saved is not None:
                check_unchanged(self.dir, saved, self.config)
            yield

    # -- stages ------------------------------------------------------------------------------
    def _check_report_data(self) -> None:
        """Under run_all, fail before training when the report's FID cannot run (the data, TDCDIFF_CACHE)."""
        if self.report_follows:
            check_feature_net(self.data.images, self.data.labels, self.data.name)

    @writes
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
        self.check_new_base(model, f"the UNet preset {preset!r}")
        self._save_config()  # after the checks above: a refused run leaves nothing behind
        config = replace(c.base, seed=c.seed * 100)  # stage 2 of group i uses c.seed * 100 + i + 1
        return train(model, train_images, self.scheduler, config, self.dir / "base", labels=self.labels(model)[0],
                     progress=self.progress, description="stage 1: base", device=c.torch_device,
                     data_range=self.data_range)

    def _import_base(self):
        """Stage 1 from a trained model: check it fits the data, save it as base/final (or continue training
        it base_model_steps steps)."""
        c = self.config
        out = self.dir / "base"
        if (out / FINAL_DIR).exists() and not c.base_model_steps:
            return TrainResult(out, 0, float("nan"), 0, 0)
        loaded = load_base_model(c.base_model, check=self._check_given_model)
        model = loaded.model
        train_images, _ = self.split()
        train_labels, _ = self.labels(model)
        given = loaded.scheduler_config
        scheduler = scheduler_from_config(given) if given is not None else self.scheduler
        if given is not None:
            check_given_schedule(scheduler, f"--base {c.base_model}")
            try:  # the bundle at the end holds it: refuse it now, not after every stage
                check_bundle_scheduler(scheduler, f"--base {c.base_model}")
            except BundleError as err:
                raise BaseModelError(f"{str(err).split('; re-export')[0]}; fix the pipeline's scheduler config") \
                    from None
        check_finite(model, train_images, scheduler.alphas_cumprod, train_labels)
        check_saveable(model, c.base_model)  # raises now, not after training, if the model cannot be saved
        self._check_budgets_reachable(model)  # before any base_model_steps of training for a doomed plan
        self._check_report_data()
        self._save_config()  # after the checks above: a refused run leaves nothing behind
        if given is not None:  # written only once the model passed: base/ existing marks stage 1 as started
            record = {"_class_name": loaded.scheduler_class, **given} if loaded.scheduler_class else given
            atomic_write_text(out / SCHEDULER_FILE, json.dumps(record, indent=2))
        if loaded.vae is not None:
            save_model(loaded.vae, out / VAE_DIR)
            self._data = self._latents()  # cached on disk now that the VAE is the run's
        if loaded.text_encoder is not None:
            save_model(loaded.text_encoder.text_model, out / TEXT_ENCODER_DIR)
            save_tokenizer(loaded.text_encoder.tokenizer, out / TOKENIZER_DIR)
            self._text_embeddings()  # cached on disk now that the text encoder is the run's
        if c.base_model_steps:
            config = replace(c.base, steps=c.base_model_steps, seed=c.seed * 100)
            return train(model, train_images, scheduler, config, out, labels=train_labels,
                         null_text=self.empty_prompt(model), progress=self.progress,
                         description="stage 1: continue the given model", device=c.torch_device,
                         data_range=self.data_range)
        save_model(model, out / FINAL_DIR, extra={"source": loaded.source})
        return TrainResult(out, 0, float("nan"), 0, 0)

    def check_new_base(self, model, what: str) -> None:
        """The checks stage 1 makes before training a new base `model` (what: how messages name it), which
        `--dry-run` makes too: the report's data (under run_all), the training memory (activations grow with
        --image-size) and the budgets' reachability (the architecture is known now: no training for a doomed
        plan). Raises ValueError."""
        self._check_report_data()
        self._check_training_memory(model, what)
        self._check_budgets_reachable(model)

    def _check_given_model(self, model, vae, text_encoder) -> None:
        """--base's denoiser against the data (check_fits_data) and this machine's memory, before its weights are
        read (a directory's model is built on the meta device for it). vae: a latent pipeline's VAE, or None;
        text_encoder: a text-conditional pipeline's (text.TextEncoder), or None."""
        c = self.config
        if vae is not None:  # latent diffusion: the checks below and every stage see latents
            self._vae, self._data = vae, None
        self._text_encoder = text_encoder or False  # text conditioning: captions are embedded with it
        # label dropout is class dropout, or caption dropout for a text-conditional model
        if num_class_embeds(model) is None and text_width(model) is None and (c.base.label_dropout
                                                                         or c.finetune.label_dropout):
            raise ValueError(f"label dropout (base.label_dropout {c.base.label_dropout}, finetune.label_dropout "
                             f"{c.finetune.label_dropout}) needs a class-conditional model, but --base {c.base_model} "
                             "is unconditional; set it to 0 or give a class-conditional model")
        data = self.data
        check_fits_data(model, c.base_model, channels=data.channels, image_size=data.image_size, data_name=c.data,
                        num_classes=data.num_classes, null_class=self.null_class(model),
                        num_train_timesteps=c.num_train_timesteps, captioned=self.pixels.captions is not None,
                        text_encoder=text_encoder is not None)
        self._check_training_memory(model, f"--base {c.base_model}")

    def _check_training_memory(self, model, what: str) -> None:
        """Refuse a model whose training (stage 1 unless a given model is used as it is; stage 2 on a pruned copy,
        at most the base's size) does not fit in memory, at the larger batch of the stages that train; and a
        latency batch (timed at the prune stage) whose inputs and outputs alone do not."""
        c = self.config
        check_sampling_memory(c.latency_batch, self.sample_shape, fix="lower --latency-batch (latency_batch)",
                              what=f"timing a batch of {c.latency_batch} samples (their inputs and outputs alone)")
        trains_base = not c.base_model or c.base_model_steps
        batch = max(c.finetune.batch_size, c.base.batch_size if trains_base else 0)
        check_training_memory(model, self.sample_shape, batch, what=what,
                              class_labels=num_class_embeds(model) is not None,
                              fix="lower --batch-size (base.batch_size, finetune.batch_size) or --image-size")

    @writes
    def plan(self) -> BudgetPlan:
        """Group the timesteps and give each group its FLOPs budget."""
        path = self.dir / "plan" / "plan.json"
        c = self.config
        if path.exists():
            plan = load_plan(path)  # written before the unit was recorded: the run's (a plan setting since)
            check_plan_fits(plan, path, self)
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
                                                  labels=held_labels, **c.search.space())
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
            smallest = smallest_fraction(base, self.sample_shape, **c.search.space()) / (1 + c.search.tolerance)
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

    @writes
    def prune(self, group: int | None = None) -> list[dict]:
        """Proxy-based pruning: one pruned model per group, meeting its budget. Returns per-group summaries."""
        plan = self.plan()
        self._save_config()
        base = self.base_model()
        (self.dir / "prune").mkdir(parents=True, exist_ok=True)
        # table: the base's latency table, looked up once for time budgets; timer: each distinct expert timed once
        summaries, table, timer = [], None, None
        for i in self._groups(plan, group):
            done = self._pruned_before(plan, i)
            if done is not None:
                summaries.append(done)
                continue
            if self.config.budget_unit == "time" and table is None:
                table = self.latency_table(base)
            # a time budget is of the table's forward time at latency_batch; a FLOPs budget's ratio is a record
            batch = self.config.latency_batch if table is not None else timing_batch(
                base, self.sample_shape, self.config.latency_batch)
            timer = timer or ExpertTimer(base, self.sample_shape, batch,
                                         base_time=table.base_seconds if table is not None else None)
            summary = self._prune_group(plan, i, base, table, timer)
            atomic_write_text(self.dir / "prune" / f"summary_{i}.json", json.dumps(summary, indent=2))
            summaries.append(summary)
        return summaries

    def _pruned_before(self, plan: BudgetPlan, i: int) -> dict | None:
        """Group i's summary when it was pruned already, for the plan's budget; None when it was not. Raises
        ValueError when it was pruned for another budget."""
        c = self.config
        out, summary_path = self.dir / "prune" / f"group_{i}", self.dir / "prune" / f"summary_{i}.json"
        if not (summary_path.exists() and out.exists()):
            return None
        summary = read_json_file(summary_path, f"delete {summary_path.parent} (and the stages after it) to prune again")
        was = (summary.get("budget_unit", "flops"), summary.get("fraction", summary["budget"] / plan.base_flops))
        if was[0] != c.budget_unit or abs(was[1] - plan.fractions[i]) > 1e-9:
            raise ValueError(
                f"{out} was pruned for a {was[0]} budget of {was[1]:.4f} of the base but the plan now says "
                f"{c.budget_unit} {plan.fractions[i]:.4f}; delete {self.dir / 'prune'} (and the stages after "
                "it) to prune again"
            )
        return summary

    def _prune_group(self, plan: BudgetPlan, i: int, base, table, timer: ExpertTimer) -> dict:
        """Search group i's pruned model (prune.search), time it against the base (refitting a time budget to
        the measured time; `timer` times each distinct architecture once), save it as prune/group_i; returns its
        summary."""
        c = self.config
        scheduler = self.scheduler
        train_images, held_out = self.split()
        train_labels, held_labels = self.labels(base)
        batch = ProxyBatch.make(held_out, plan.grouping.timesteps(i), scheduler, seed=c.seed + i, labels=held_labels)
        # Proxy fine-tuning and Taylor calibration draw from the training split; scoring uses the held-out batch.
        proxy = Proxy(base, batch, scheduler, space=c.search.proxy_space, finetune_steps=c.search.proxy_finetune_steps,
                      train_images=train_images, train_labels=train_labels)
        settings = replace(c.search, seed=c.seed + i)
        budget = plan.fractions[i] * table.base_seconds if table is not None else plan.budgets[i]
        result = search(base, budget, self.sample_shape, proxy, settings, progress=self.progress,
                        log_path=self.dir / "prune" / f"search_{i}.jsonl", latency=table)
        result.memory.save(self.dir / "prune" / f"memory_{i}.json")
        trail = None
        if table is not None:
            # The table's estimate is not the expert's time: time the winner directly and refit its
            # decision to a corrected budget where the measured time misses the plan.
            timed = fit_to_measured_time(
                base, result.decision, plan.fractions[i], self.sample_shape, c.latency_batch, table,
                fitted=FitResult(result.model, result.decision, result.flops, budget, 1.0, result.seconds),
                importance=settings.importance, **settings.space(), timer=timer,
                calibration=(proxy.calibration(settings.seed) if get_importance(settings.importance).needs_calibration
                             else None),
            )
            time_ratio, trail, fit = timed.time_ratio, timed.trail, timed.fit
            if fit.model is not result.model:
                result = replace(result, model=fit.model, decision=fit.decision, flops=fit.flops,
                                 seconds=fit.seconds, score=float(proxy.score(fit.model)))
        else:  # time it directly (a group whose budget is the whole base keeps the base: ratio 1)
            time_ratio = timer.ratio(result.model)
        save_model(result.model, self.dir / "prune" / f"group_{i}")
        return {
            "group": i, "budget": budget, "budget_unit": c.budget_unit, "fraction": plan.fractions[i],
            "flops": result.flops, "flops_ratio": result.flops / plan.base_flops,
            "time_ratio": time_ratio, "latency_batch": timer.batch, "clock": clock(),
            # the table's estimate of the search's winner (corrections are fitted on FLOPs, see the trail)
            "estimated_time_ratio": trail[0]["estimated_ratio"] if table is not None else None,
            "time_corrections": trail,
            "decision": result.decision,
            "proxy_score": result.score, "proxy_space": c.search.proxy_space, "proposer": c.search.proposer,
            "candidates": len(result.memory.entries),
        }

    def latency_table(self, base):
        """The base's per-unit latency table at latency_batch on this device (measured once, then cached)."""
        s = self.config.search
        return measure_latency_table(base, self.sample_shape, self.config.latency_batch, depth_units=s.depth,
                                     **s.space())

    @writes
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
            model = self.load(pruned_dir)
            config = replace(c.finetune, seed=c.seed * 100 + i + 1,
                             label_dropout=c.finetune.label_dropout or c.base.label_dropout,
                             null_class=self.null_class(model))
            results.append(
                train(
                    model, train_images, self.scheduler, config, self.dir / "finetune" / f"group_{i}",
                    labels=self.labels(model)[0], null_text=self.empty_prompt(model),
                    timesteps=plan.grouping.timesteps(i), teacher=teacher, progress=self.progress,
                    description=f"stage 2: group {i}", device=c.torch_device, data_range=self.data_range,
                )
            )
        return results

    @writes
    def export_bundle(self) -> Path:
        out = self.dir / "bundle"
        if (out / "manifest.json").exists():
            return out
        plan = self.plan()
        experts, training = [], []
        for i in range(len(plan.grouping)):
            path = self.dir / "finetune" / f"group_{i}" / FINAL_DIR
            if not path.exists():
                raise FileNotFoundError(f"group {i} is not fine-tuned yet ({path} missing); run `tdcdiff finetune`")
            experts.append(self.load(path))
            record = path.parent / "train.json"
            summary = read_json_file(record, f"delete {path.parent} to fine-tune group {i} again") if record.exists() \
                else {}
            training.append({k: summary[k] for k in ("steps", "final_loss", "fingerprint") if k in summary})
        train_flops = self.training_flops()
        return save_bundle(
            out, experts, plan.grouping, self.scheduler, sample_shape=self.sample_shape,
            expert_flops=[count_flops(e, self.sample_shape) for e in experts], base_flops=plan.base_flops,
            budgets=plan.budgets, expert_training=training,
            provenance={"data": self.data.describe(), "config": self.config.to_dict(), "training_flops": train_flops,
                        **self.pipeline_scheduler()},
            conditioning=self.conditioning(experts[0]),
            vae=self.vae, sampling=SamplingSetting(self.config.sampler, self.config.sampling_steps),
            text_encoder=self.text_encoder,
        )

    def pipeline_scheduler(self) -> dict:
        """For a run from a diffusers pipeline, what the bundle's provenance keeps of its scheduler: its class and
        settings ("pipeline_scheduler", as its scheduler_config.json holds them) and how the bundle samples by
        default ("sampling_note"); {} for any other run."""
        path = self.dir / "base" / SCHEDULER_FILE
        if not path.exists():
            return {}
        given = read_json_file(path, f"delete {path.parent} and run `tdcdiff train-base` again to copy it from --base")
        name = given.get("_class_name")
        if not name or self.config.sampler != PIPELINE_SAMPLERS.get(name):
            note = f"sampled with {self.config.sampler} (the run's sampler setting)"
        else:
            note = sampler_for_scheduler(name, f"--base {self.config.base_model}")[1]
        return {"pipeline_scheduler": given, "sampling_note": note}

    def training_flops(self) -> dict:
        """Training compute of stage 1 and of each group's stage 2, from the runs' own records."""
        def recorded(path: Path) -> int:
            if not (path / "train.json").exists():
                return 0
            return read_json_file(path / "train.json", f"delete {path} to train this stage again")["train_flops"]

        stage2 = [recorded(self.dir / "finetune" / f"group_{i}") for i in range(len(self.plan().grouping))]
        stage1 = recorded(self.dir / "base")
        return {"stage1": stage1, "stage2_per_group": stage2, "total": stage1 + sum(stage2),
                "convention": "FLOPs = 2 x MACs; forward + backward = 3 x forward, x batch x steps"}

    @writes
    def sample_grid(self, name: str, model, *, seed: int | None = None, source: Path | None = None) -> Path:
        """samples/NAME.png: a grid of the run's sampling settings (sampler, sample_steps, num_samples) from model.

        source: the file that pins the model's weights (a saved model's architecture.json, which holds its
        weights' sha256, or a bundle's manifest.json). With it, an existing grid made from the same weights and
        settings is kept (samples/NAME.inputs.json records them); without it, the grid is always redrawn.
        """
        c = self.config
        path = self.dir / "samples" / f"{name}.png"
        record = path.with_suffix(".inputs.json")
        inputs = {
            "model_sha256": sha256_file(source) if source is not None else None,
            "sampler": c.sampler, "steps": c.sampling_steps, "num_images": c.num_samples,
            **({"precision": self.sampling_precision} if self.sampling_precision != "fp32" else {}),
            "seed": c.seed if seed is None else seed, "sample_shape": self.sample_shape,
            "schedule": [c.num_train_timesteps, c.beta_schedule, c.prediction_type],
        }
        if source is not None and up_to_date(record, inputs, [path]):
            return path
        result = sample(
            model, self.scheduler, sample_shape=self.sample_shape, sampler=c.sampler, steps=c.sampling_steps,
            num_images=c.num_samples, seed=inputs["seed"], progress=self.progress,
            class_labels=self.sample_labels(model, c.num_samples), decode=self.decode,
            device=self.device, precision=self.sampling_precision,
            prompt_embeds=self.sample_prompts(model, c.num_samples),
        )
        save_grid(result.images, path)
        if source is not None:
            record_inputs(record, inputs, [path])
        return path

    @staticmethod
    def _groups(plan: BudgetPlan, group: int | None) -> range:
        n = len(plan.grouping)
        if group is None:
            return range(n)
        if not 0 <= group < n:
            raise ValueError(f"--group must be between 0 and {n - 1} (the plan has {n} groups), got {group}")
        return range(group, group + 1)
