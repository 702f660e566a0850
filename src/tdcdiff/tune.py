"""`tdcdiff tune`: the quality-speed frontier of one base model, the fastest candidate as good as the base,
and what tuning cost against what it returns.

From one stage-1 base, every candidate is fine-tuned with the SAME training compute (FLOPs): the base itself
("single", the equal-compute reference), the base pruned to one uniform width, and TDC runs over k, N and the
grouping strategy. All are screened with a cheap held-out measure (paired with the base: same images, same
noise); the best few by it get paired-seed FID/KID against the base; the chosen candidate is the fastest one
whose quality is tied with or better than the base's by the paired rule, or within `max_quality_loss`.

    tune_dir/
      tune.json            the settings the candidate plan was made with (a rerun must match them)
      candidates.json      the candidate plan: index, name, kind, parameters, directory
      base/                the stage-1 run directory (trained here, or config.json + base/ copied from a run)
      phases.json          wall and CPU time (and training FLOPs) of stage 1, screening and finalists
      candidates/NN-name/  one candidate: a TDC run directory, or pruned/ + train/ + bundle/ for single and
                           uniform; result.json when it has finished (its phases' time and FLOPs)
      screening.json       the screening measure per model; fid.json: the finalists' FID/KID per seed
      results.json, table.csv, frontier.png    the frontier: quality against sampling time and FLOPs
      cost.json, cost.csv, return.csv    what the chosen bundle cost and returns
      chosen/ + chosen.json    the chosen bundle (a copy) and which rule chose it

A rerun skips finished candidates and cached measurements; `Tune.run_candidate(i)` (`tdcdiff tune
--candidate i`) runs one candidate alone, e.g. as a separate job.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from .evaluate import slug
from .serialization import atomic_dir, atomic_write_text

PLAN_FORMAT = "tdcdiff-tune-plan/1"


# -- the screening measure: what ranks candidates before FID -----------------------------------------------
@dataclass(frozen=True)
class ScreeningMeasure:
    """A cheap quality measure of a denoiser on held-out images; lower is better.

    name, unit: shown in tables and plots. measure(model, held_out, scheduler, seed=...) returns
    {"value": float, "se": float or None} with the same images and noise for every model given the same seed,
    so two models' values are paired.
    """

    name: str
    unit: str
    measure: Callable[..., dict]


def _held_out_loss(model, held_out: torch.Tensor, scheduler, *, seed: int) -> dict:
    from .evaluate import held_out_loss

    return {"value": held_out_loss(model, held_out, scheduler, seed=seed)["all"], "se": None}


HELD_OUT_LOSS = ScreeningMeasure("held-out denoising loss", "MSE of the training target, mean over t", _held_out_loss)
SCREENING = HELD_OUT_LOSS  # the measure tune screens with (a bits/dim bound can take its place here)


# -- settings and the candidate plan -----------------------------------------------------------------------
@dataclass
class TuneConfig:
    """What `tdcdiff tune` tries and how it measures.

    tune_steps: each candidate's training compute, as this many stage-2 steps of the BASE model (at the run's
        stage-2 batch size): smaller candidates get proportionally more steps.
    widths: uniform-pruning levels, as fractions of the base's FLOPs (0 < w < 1).
    ks, groups, groupings: the TDC grid (budget slope k, number of groups N, grouping strategy).
    tdc_variants: RunConfig dotted-key settings crossed with that grid, one TDC candidate each, e.g.
        ({}, {"finetune.mix_fraction": 0.2}) tries every grid point with and without a stage-2 mix.
    finalists: how many candidates (best by the screening measure) get paired-seed FID/KID.
    fid_seeds, fid_samples: sampling seeds (at least 2, for the paired rule) and images per seed for FID/KID.
    batch: the user's sampling batch size: the frontier's time axis.
    timing_repeats: timed sampling runs per model and batch (interleaved, after one warm-up; median).
    max_quality_loss: also accept a candidate whose screening value is at most this much worse than the
        base's, relatively (0.02 = 2%); None: only the paired FID rule chooses.
    price_per_hour: price of one machine hour, for the cost per 1,000 images (None: not shown).
    """

    tune_steps: int = 1000
    widths: tuple[float, ...] = (0.8, 0.6, 0.4)
    ks: tuple[float, ...] = (0.1, 0.3, 0.5)
    groups: tuple[int, ...] = (2, 4)
    groupings: tuple[str, ...] = ("snr",)
    tdc_variants: tuple[dict, ...] = ({},)
    finalists: int = 3
    fid_seeds: int = 3
    fid_samples: int = 512
    batch: int = 64
    timing_repeats: int = 3
    max_quality_loss: float | None = None
    price_per_hour: float | None = None

    def validate(self) -> None:
        from .budget import budget_fractions
        from .grouping import STRATEGIES

        for n in self.groups:
            for k in self.ks:
                budget_fractions(n, k)
        checks = [
            (self.tune_steps >= 1, f"--tune-steps must be >= 1, got {self.tune_steps}"),
            (all(0 < w < 1 for w in self.widths), f"--width values must be in (0, 1) (fractions of the base's FLOPs), got {list(self.widths)}"),
            (all(g in STRATEGIES for g in self.groupings), f"unknown grouping in {list(self.groupings)}; choose from {STRATEGIES}"),
            (self.finalists >= 1, f"--finalists must be >= 1, got {self.finalists}"),
            (self.fid_seeds >= 2, f"--fid-seeds must be >= 2 (the paired rule needs two pairs), got {self.fid_seeds}"),
            (self.fid_samples >= 2, f"--fid-samples must be >= 2 (FID needs two images), got {self.fid_samples}"),
            (self.batch >= 1, f"--batch must be >= 1, got {self.batch}"),
            (self.timing_repeats >= 1, f"timing_repeats must be >= 1, got {self.timing_repeats}"),
            (self.max_quality_loss is None or self.max_quality_loss >= 0,
             f"--max-quality-loss must be >= 0 (a relative loss, 0.02 = 2%), got {self.max_quality_loss}"),
            (self.price_per_hour is None or self.price_per_hour >= 0,
             f"--price-per-hour must be >= 0, got {self.price_per_hour}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def plan_settings(self) -> dict:
        """The settings that decide the candidates and their training (a rerun must keep them)."""
        return {"tune_steps": self.tune_steps, "widths": list(self.widths), "ks": list(self.ks),
                "groups": list(self.groups), "groupings": list(self.groupings),
                "tdc_variants": [dict(v) for v in self.tdc_variants]}


def plan_candidates(config: TuneConfig) -> list[dict]:
    """The candidates, in order: the base fine-tuned ("single"), each uniform width, each TDC setting.

    Returns dicts with index, name, kind ("single", "uniform", "tdc"), dir (relative to the tune directory)
    and the kind's parameters: fraction (uniform); settings, the TDC run's RunConfig overrides (tdc).
    """
    specs = [{"name": "single", "kind": "single"}]
    specs += [{"name": f"uniform {w:g}", "kind": "uniform", "fraction": w} for w in config.widths]
    for variant in config.tdc_variants:
        suffix = "".join(f" {key.rpartition('.')[2]}={value}" for key, value in variant.items())
        specs += [{"name": f"TDC k={k:g} N={n} {g}{suffix}", "kind": "tdc",
                   "settings": {"k": k, "groups": n, "grouping": g, **variant}}
                  for g in config.groupings for n in config.groups for k in config.ks]
    return [{"index": i, **s, "dir": f"candidates/{i:02d}-{slug(s['name'])}"} for i, s in enumerate(specs)]


# -- the choice and the arithmetic of cost and return (pure functions) ------------------------------------
def choose(rows: list[dict], max_quality_loss: float | None = None) -> dict:
    """The fastest candidate whose quality is tied with or better than the base's.

    rows: one per candidate: name, time_s (sampling time at the user's batch), quality_ratio (screening value /
        the base's; lower is better), fid_gap (metrics.paired_gap of the base's per-seed FID against the
        candidate's, or None when it was not a finalist) and optionally failed (True: not trained).
    max_quality_loss: also accept a candidate without a FID verdict whose quality_ratio is at most
        1 + max_quality_loss. A paired FID verdict of "worse" always rules a candidate out.
    Returns {"name": ... or None, "rule": "paired FID" | "max-quality-loss" | None, "reason": one sentence}.
    """
    for row in sorted((r for r in rows if not r.get("failed")), key=lambda r: (r["time_s"], r["quality_ratio"])):
        gap = row.get("fid_gap")
        if gap is not None:
            low, high = gap["interval"]
            if gap["tie"] or gap["mean"] < 0:
                verdict = "tied with" if gap["tie"] else "better than"
                return {"name": row["name"], "rule": "paired FID",
                        "reason": f"the fastest candidate whose FID is {verdict} the base's by the paired rule "
                                  f"(gap {gap['mean']:+.3f}, {gap['confidence']:.0%} interval [{low:+.3f}, {high:+.3f}])"}
            continue  # FID says really worse: the screening measure cannot overrule it
        if max_quality_loss is not None and row["quality_ratio"] - 1 <= max_quality_loss:
            return {"name": row["name"], "rule": "max-quality-loss",
                    "reason": f"the fastest candidate within --max-quality-loss {max_quality_loss:g} of the base on "
                              f"the screening measure ({row['quality_ratio'] - 1:+.1%}; no FID verdict against it)"}
    rules = "tied with or better than the base by paired FID" + (
        f", or within --max-quality-loss {max_quality_loss:g}" if max_quality_loss is not None else "")
    return {"name": None, "rule": None,
            "reason": f"no candidate is {rules}: keep the base (or raise --tune-steps, --finalists or --max-quality-loss)"}


def payback_images(tuning_seconds: float, base_seconds_per_image: float, chosen_seconds_per_image: float) -> float | None:
    """Images after which the sampling time saved equals the time spent tuning; None when nothing is saved."""
    saving = base_seconds_per_image - chosen_seconds_per_image
    return tuning_seconds / saving if saving > 0 else None


def cost_per_1000(seconds_per_image: float, price_per_hour: float) -> float:
    """The price of generating 1,000 images at `seconds_per_image` on a machine costing `price_per_hour`."""
    return 1000 * seconds_per_image / 3600 * price_per_hour


# -- the tune directory ---------------------------------------------------------------------------------------
def _clock() -> dict:
    return {"wall": time.perf_counter(), "cpu": time.process_time()}


def _since(start: dict, flops: int | None = None) -> dict:
    now = _clock()
    return {"wall_s": round(now["wall"] - start["wall"], 2), "cpu_s": round(now["cpu"] - start["cpu"], 2),
            "flops": flops}


def _read_json(path: Path, default=None):
    return json.loads(path.read_text()) if path.exists() else default


class Tune:
    """One tune directory (see the module docstring).

    tune_dir: where everything goes. run_config, overrides: the base run's RunConfig and dotted-key settings on
        top (as for Run; None: the saved or default config). Stage-2 settings (batch size, lr) apply to every
        candidate's training; search settings to the TDC candidates'.
    config: TuneConfig. base_from: a run directory whose finished stage-1 base (and config.json) to start from
        instead of training one here. progress: print one line per candidate and phase, and the stages' bars.
    Raises ValueError when the directory's saved plan was made with other settings.
    """

    def __init__(self, tune_dir: str | Path, config: TuneConfig | None = None, *, run_config=None,
                 overrides: dict | None = None, base_from: str | Path | None = None, progress: bool = True):
        from .run import Run, apply_overrides, copy_stages
        from .train import FINAL_DIR

        self.dir = Path(tune_dir)
        self.config = config or TuneConfig()
        self.config.validate()
        self.progress = progress
        if base_from is not None:
            source = Path(base_from)
            if not (source / "base" / FINAL_DIR).exists() or not (source / "config.json").exists():
                raise FileNotFoundError(f"--base-from {source}: no finished stage-1 base there (base/{FINAL_DIR} and "
                                        "config.json); point it at a run directory after `tdcdiff train-base`")
            copy_stages(source, self.dir / "base", ("config.json", "base"))
        self.base_run = Run(self.dir / "base", run_config, overrides=overrides, progress=progress)
        saved = _read_json(self.dir / "tune.json")
        if saved is not None and saved["plan"] != self.config.plan_settings():
            differ = [f"{k}: {saved['plan'][k]} there, {v} here" for k, v in self.config.plan_settings().items()
                      if saved["plan"].get(k) != v]
            raise ValueError(f"{self.dir} was tuned with other candidate settings ({'; '.join(differ)}); use a new "
                             f"--out, or delete {self.dir / 'tune.json'} and {self.dir / 'candidates'} to start over")
        self.candidates = plan_candidates(self.config)
        for spec in self.candidates:  # a bad TDC setting must fail now, not after stage 1 and other candidates
            if spec["kind"] == "tdc":
                apply_overrides(self.base_run.config, spec["settings"]).validate()

    def say(self, message: str) -> None:
        if self.progress:
            print(message, flush=True)

    # -- plan, base, candidates ---------------------------------------------------------------------------------
    def write_plan(self) -> Path:
        """tune.json and candidates.json (the candidate plan); returns the plan's path."""
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.dir / "tune.json", json.dumps({"format": PLAN_FORMAT, "plan": self.config.plan_settings(),
                                                               "settings": asdict(self.config)}, indent=2))
        path = self.dir / "candidates.json"
        atomic_write_text(path, json.dumps({"format": PLAN_FORMAT, "candidates": self.candidates}, indent=2))
        return path

    def ensure_base(self) -> None:
        """Stage 1 (skipped when the base exists); its time and FLOPs go to phases.json when trained here."""
        from .train import FINAL_DIR

        if (self.base_run.dir / "base" / FINAL_DIR).exists():
            return
        self.say("stage 1: training the base")
        start = _clock()
        result = self.base_run.train_base()
        self._record_phase("stage1", _since(start, result.train_flops))

    def _record_phase(self, name: str, record: dict) -> None:
        phases = _read_json(self.dir / "phases.json", {})
        phases[name] = record
        atomic_write_text(self.dir / "phases.json", json.dumps(phases, indent=2))

    def base_flops(self) -> int:
        from .flops import count_flops

        return count_flops(self.base_run.base_model(), self.base_run.sample_shape)

    def budget_flops(self) -> int:
        """Each candidate's training compute: tune_steps stage-2 steps of the base (FLOPs, fwd + bwd = 3 x fwd)."""
        return self.config.tune_steps * self.base_run.config.finetune.batch_size * 3 * self.base_flops()

    def result(self, index: int) -> dict | None:
        return _read_json(self.dir / self.candidates[index]["dir"] / "result.json")

    def run_candidate(self, index: int) -> dict:
        """Train candidate `index` (skipped when finished); returns its result.json record.

        A candidate whose FLOPs budget cannot be reached (prune.fit.BudgetError) is recorded as failed.
        """
        from .prune.fit import BudgetError

        if not 0 <= index < len(self.candidates):
            raise ValueError(f"--candidate must be between 0 and {len(self.candidates) - 1} "
                             f"(the plan in {self.dir / 'candidates.json'} has {len(self.candidates)}), got {index}")
        spec = self.candidates[index]
        done = self.result(index)
        if done is not None:
            self.say(f"[{index}] {spec['name']}: finished earlier, skipped")
            return done
        self.write_plan()
        self.ensure_base()
        out = self.dir / spec["dir"]
        try:
            record = (self._tdc if spec["kind"] == "tdc" else self._one_model)(spec, out)
        except BudgetError as err:
            record = {"failed": str(err)}
            self.say(f"[{index}] {spec['name']}: failed: {err}")
        record = {**spec, **record}
        atomic_write_text(out / "result.json", json.dumps(record, indent=2))
        return record

    def _one_model(self, spec: dict, out: Path) -> dict:
        """single / uniform: one model trained on all timesteps for the budget, bundled as a one-group router."""
        from .bundle import save_bundle
        from .flops import count_flops
        from .grouping import make_groups
        from .prune.fit import fit_to_budget
        from .prune.units import prunable_units, uniform_decision
        from .serialization import load_model, save_model
        from .train import FINAL_DIR, train

        run, i = self.base_run, spec["index"]
        shape, base_flops = run.sample_shape, self.base_flops()
        start = _clock()
        if spec["kind"] == "uniform":
            if not (out / "pruned").exists():
                self.say(f"[{i}] {spec['name']}: pruning to {spec['fraction']:.0%} of the base's FLOPs")
                base = run.base_model()
                # fit_to_budget keeps only the ratios' relative sizes: equal ratios scale as one global ratio.
                fit = fit_to_budget(base, uniform_decision(prunable_units(base), 0.5),
                                    round(spec["fraction"] * base_flops), shape)
                save_model(fit.model, out / "pruned")
            model = load_model(out / "pruned")
        else:
            model = run.base_model()
        search = _since(start)
        flops = count_flops(model, shape)
        c = run.config
        steps = max(1, round(self.budget_flops() / (c.finetune.batch_size * 3 * flops)))
        self.say(f"[{i}] {spec['name']}: stage 2, {steps} steps on all timesteps ({flops / base_flops:.0%} FLOPs)")
        config = replace(c.finetune, steps=steps, mix_fraction=0.0, distill_weight=0.0, feature_distill_weight=0.0,
                         seed=c.seed * 100)
        start = _clock()
        trained = train(model, run.split()[0], run.scheduler, config, out / "train", progress=self.progress,
                        description=f"tune {spec['name']}")
        stage2 = _since(start, trained.train_flops)
        expert = load_model(out / "train" / FINAL_DIR)
        grouping = make_groups("uniform", 1, run.scheduler)
        save_bundle(out / "bundle", [expert], grouping, run.scheduler, sample_shape=shape, expert_flops=[flops],
                    base_flops=base_flops, expert_training=[{"steps": steps, "final_loss": trained.final_loss}],
                    provenance={"tune": spec, "data": run.data.describe(), "training_flops": trained.train_flops})
        return {"bundle": "bundle", "train_flops": trained.train_flops, "steps": steps,
                "phases": {"search": search if spec["kind"] == "uniform" else None, "stage2": stage2}}

    def _tdc(self, spec: dict, out: Path) -> dict:
        """A TDC run directory sharing the base: plan + pruning search, then stage 2 cut to the budget."""
        from .run import Run, copy_stages

        i = spec["index"]
        copy_stages(self.base_run.dir, out, ("config.json", "base"))
        run = Run(out, overrides=spec["settings"], progress=self.progress)
        c = run.config
        self.say(f"[{i}] {spec['name']}: plan and pruning search")
        start = _clock()
        summaries = run.prune()
        search = _since(start)
        # Distillation runs the base forward once per step: count it so stage 2's FLOPs stay on budget.
        teacher = self.base_flops() if c.finetune.uses_teacher else 0
        per_step = c.finetune.batch_size * sum(3 * s["flops"] + teacher for s in summaries)
        steps = max(1, round(self.budget_flops() / per_step))
        self.say(f"[{i}] {spec['name']}: stage 2, {steps} steps per group")
        run = Run(out, overrides={"finetune.steps": steps}, progress=self.progress)
        start = _clock()
        run.finetune()
        run.export_bundle()
        flops = sum(run.training_flops()["stage2_per_group"])
        return {"bundle": "bundle", "train_flops": flops, "steps": steps,
                "phases": {"search": search, "stage2": _since(start, flops)}}

    # -- measuring -----------------------------------------------------------------------------------------------
    def models(self) -> dict:
        """name -> (Router, sampling FLOPs per image) for the base and every finished, not failed candidate."""
        from .bundle import load_bundle
        from .grouping import make_groups
        from .pipeline import make_sampler
        from .router import Router

        run, c = self.base_run, self.base_run.config
        sampler = make_sampler(c.sampler, run.scheduler)
        sampler.set_timesteps(c.sampling_steps)
        visited = [int(t) for t in sampler.timesteps]
        base = Router([run.base_model()], make_groups("uniform", 1, run.scheduler), [self.base_flops()])
        models = {"base": (base.eval(), base.trajectory_flops(visited))}
        for spec in self.candidates:
            record = self.result(spec["index"])
            if record is not None and "failed" not in record:
                router = load_bundle(self.dir / spec["dir"] / record["bundle"]).router.eval()
                models[spec["name"]] = (router, router.trajectory_flops(visited))
        return models

    def screen(self, models: dict) -> dict:
        """The screening measure of every model, paired (same held-out images and noise); cached."""
        cache = _read_json(self.dir / "screening.json", {})
        if cache.get("measure") != SCREENING.name:
            cache = {"measure": SCREENING.name, "unit": SCREENING.unit, "values": {}}
        missing = [name for name in models if name not in cache["values"]]
        if missing:
            _, held_out = self.base_run.split()
            start = _clock()
            for name in missing:
                value = SCREENING.measure(models[name][0], held_out, self.base_run.scheduler, seed=self.base_run.config.seed)
                cache["values"][name] = value
                self.say(f"screening: {name}: {SCREENING.name} {value['value']:.5f}")
            atomic_write_text(self.dir / "screening.json", json.dumps(cache, indent=2))
            self._record_phase("screening", _since(start))
        return cache["values"]

    def fid(self, models: dict, names: list[str]) -> dict:
        """Per-seed FID/KID of the base and `names` (tdcdiff.evaluate.evaluate), cached per protocol."""
        from .evaluate import ModelEntry, evaluate

        run, c, t = self.base_run, self.base_run.config, self.config
        protocol = {"sampler": c.sampler, "steps": c.sampling_steps, "samples": t.fid_samples,
                    "seeds": list(range(t.fid_seeds))}
        cache = _read_json(self.dir / "fid.json", {})
        if cache.get("protocol") != protocol:
            cache = {"protocol": protocol, "models": {}}
        missing = [n for n in ["base", *names] if n not in cache["models"]]
        if missing:
            self.say(f"finalists: FID/KID over {t.fid_seeds} seeds x {t.fid_samples} images: {', '.join(missing)}")
            start = _clock()
            entries = [ModelEntry(n, models[n][0], 0) for n in missing]
            result = evaluate(entries, run.scheduler, run.data.images, run.data.labels, sample_shape=run.sample_shape,
                              sampler=c.sampler, steps=c.sampling_steps, num_samples=t.fid_samples,
                              seeds=tuple(range(t.fid_seeds)), reference_name=Path(run.data.name).name, timing_batches=(1,),
                              timing_repeats=1, progress=self.progress)
            for record in result["models"]:
                cache["models"][record["name"]] = {"fid": [f["fid"] for f in record["fid"]["per_seed"]],
                                                   "kid": [f["kid_mean"] for f in record["fid"]["per_seed"]]}
            cache["feature_net"] = result["protocol"]["feature_net"]
            cache["reference"] = result["protocol"]["reference"]
            atomic_write_text(self.dir / "fid.json", json.dumps(cache, indent=2))
            self._record_phase("finalists", _since(start))
        return cache

    def time_models(self, models: dict, names: list[str], batch: int) -> dict:
        """Median seconds of one full sampling run at `batch` per model, interleaved; CPU time on a CPU."""
        from .evaluate import _time_sampling
        from .pipeline import SamplingModel

        c = self.base_run.config
        clock = time.perf_counter if torch.cuda.is_available() else time.process_time
        times = _time_sampling([SamplingModel(models[n][0]) for n in names], self.base_run.scheduler,
                               sample_shape=self.base_run.sample_shape, sampler=c.sampler, steps=c.sampling_steps,
                               batch=batch, repeats=self.config.timing_repeats, clock=clock)
        return dict(zip(names, times))

    # -- everything -------------------------------------------------------------------------------------------
    def run_all(self) -> dict:
        """Every candidate (finished ones skipped), screening, finalists' FID, the frontier, the choice, the cost
        table; returns the results dict (also in results.json)."""
        from .metrics import paired_gap

        self.write_plan()
        self.ensure_base()
        for spec in self.candidates:
            self.run_candidate(spec["index"])
        models = self.models()
        screening = self.screen(models)
        base_value = screening["base"]["value"]
        candidates = [n for n in models if n != "base"]
        finalists = sorted(candidates, key=lambda n: screening[n]["value"])[: self.config.finalists]
        fid = self.fid(models, finalists)
        batch = self.config.batch
        self.say(f"timing: sampling at batch {batch}, {len(models)} models interleaved")
        times = self.time_models(models, list(models), batch)

        rows = []
        for name, (_, flops) in models.items():
            record = next((self.result(s["index"]) for s in self.candidates if s["name"] == name), None)
            scores = fid["models"].get(name)
            gap = (paired_gap(fid["models"]["base"]["fid"], scores["fid"]) if scores is not None and name != "base"
                   else None)
            rows.append({
                "name": name, "kind": record["kind"] if record else "base", "index": record["index"] if record else None,
                "sampling_flops": flops, "flops_ratio": flops / models["base"][1],
                "time_s": times[name], "time_ratio": times[name] / times["base"],
                "screening": screening[name]["value"], "screening_se": screening[name].get("se"),
                "quality_ratio": screening[name]["value"] / base_value,
                "fid": scores["fid"] if scores else None, "kid": scores["kid"] if scores else None,
                "fid_gap": {k: (list(v) if isinstance(v, tuple) else v) for k, v in gap.items()} if gap else None,
                "train_flops": record["train_flops"] if record else 0,
                "bundle": str(self.dir / record["dir"] / record["bundle"]) if record else None,
            })
        failed = [{"name": s["name"], "failed": r["failed"]} for s in self.candidates
                  if (r := self.result(s["index"])) is not None and "failed" in r]
        choice = choose([r for r in rows if r["name"] != "base"], self.config.max_quality_loss)
        results = {
            "format": "tdcdiff-tune/1",
            "settings": asdict(self.config),
            "screening_measure": {"name": SCREENING.name, "unit": SCREENING.unit,
                                  "held_out_images": len(self.base_run.split()[1])},
            "fid_protocol": {k: fid.get(k) for k in ("protocol", "feature_net", "reference")},
            "time": f"median {'wall' if torch.cuda.is_available() else 'process CPU'} seconds of one "
                    f"{self.base_run.config.sampler}-{self.base_run.config.sampling_steps} sampling run at batch {batch}, "
                    f"{self.config.timing_repeats} repeats interleaved across models after a warm-up",
            "compute": f"every candidate: {self.budget_flops():.4g} training FLOPs ({self.config.tune_steps} stage-2 "
                       "steps of the base); the pruning search's proxy forwards are not counted",
            "rows": rows, "failed": failed, "finalists": finalists, "choice": choice,
        }
        atomic_write_text(self.dir / "results.json", json.dumps(results, indent=2))
        write_table_csv(rows, self.dir / "table.csv")
        plot_frontier(rows, choice["name"], batch, SCREENING.name, self.dir / "frontier.png")
        if choice["name"] is not None:
            chosen = next(r for r in rows if r["name"] == choice["name"])
            with atomic_dir(self.dir / "chosen") as tmp:
                shutil.copytree(chosen["bundle"], tmp, dirs_exist_ok=True)
            atomic_write_text(self.dir / "chosen.json", json.dumps({**choice, "bundle": chosen["bundle"]}, indent=2))
            results["cost"] = self.cost(models, chosen)
        atomic_write_text(self.dir / "results.json", json.dumps(results, indent=2))
        return results

    def cost(self, models: dict, chosen: dict) -> dict:
        """Cost and return of the chosen bundle: time and FLOPs per phase, throughput gained at batch 1 and 64,
        payback in images, and with a price, the cost per 1,000 images before and after. Writes cost.json,
        cost.csv (per phase) and return.csv (per batch size)."""
        phases = _read_json(self.dir / "phases.json", {})
        records = [r for s in self.candidates if (r := self.result(s["index"])) is not None and "failed" not in r]
        mine = next(r for r in records if r["name"] == chosen["name"])
        others = [r for r in records if r["name"] != chosen["name"]]

        def total(items: list[dict | None]) -> dict:
            items = [i for i in items if i]
            flops = [i["flops"] for i in items if i.get("flops") is not None]
            return {"wall_s": round(sum(i["wall_s"] for i in items), 2), "cpu_s": round(sum(i["cpu_s"] for i in items), 2),
                    "flops": sum(flops) if flops else None}

        stage1 = phases.get("stage1")
        rows = [
            {"phase": "stage 1 (base)", **(stage1 or {"wall_s": None, "cpu_s": None, "flops": None}),
             "note": "trained here" if stage1 else "not run here (the base was given)"},
            {"phase": "search (chosen)", **total([mine["phases"]["search"]]), "note": "pruning search; proxy FLOPs not counted"},
            {"phase": "stage 2 (chosen)", **total([mine["phases"]["stage2"]]), "note": "fine-tuning"},
            {"phase": "tuning (other candidates)", **total([p for r in others for p in r["phases"].values()]),
             "note": f"{len(others)} candidates: search + stage 2"},
            {"phase": "tuning (screening + FID)", **total([phases.get("screening"), phases.get("finalists")]),
             "note": "measurements (last run's)"},
        ]
        tuning = total(rows[1:])
        rows.append({"phase": "total tuning", **tuning, "note": "everything after stage 1"})
        batches = sorted({1, 64, self.config.batch})
        self.say(f"timing: base vs chosen at batches {batches}")
        throughput = []
        for b in batches:
            t = self.time_models(models, ["base", chosen["name"]], b)
            base_s, chosen_s = t["base"] / b, t[chosen["name"]] / b
            item = {"batch": b, "base_images_per_s": 1 / base_s, "chosen_images_per_s": 1 / chosen_s,
                    "speedup": base_s / chosen_s, "payback_images": payback_images(tuning["cpu_s"], base_s, chosen_s)}
            if self.config.price_per_hour is not None:
                item["base_cost_per_1000"] = cost_per_1000(base_s, self.config.price_per_hour)
                item["chosen_cost_per_1000"] = cost_per_1000(chosen_s, self.config.price_per_hour)
            throughput.append(item)
        cost = {"chosen": chosen["name"], "phases": rows, "throughput": throughput,
                "tuning_cost": (tuning["cpu_s"] / 3600 * self.config.price_per_hour
                                if self.config.price_per_hour is not None else None),
                "notes": "times are process CPU seconds (wall seconds beside them); payback = tuning CPU seconds / "
                         "CPU seconds saved per image; stage 1 is not counted in the payback (the base exists "
                         "either way); an interrupted phase counts only its last, resumed part"}
        atomic_write_text(self.dir / "cost.json", json.dumps(cost, indent=2))
        import csv

        for name, table in (("cost.csv", rows), ("return.csv", throughput)):
            with _AtomicText(self.dir / name) as f:
                writer = csv.DictWriter(f, fieldnames=list(table[0]))
                writer.writeheader()
                writer.writerows(table)
        return cost


class _AtomicText:
    """Write a text file atomically: `with _AtomicText(path) as f: f.write(...)`."""

    def __init__(self, path: Path):
        import io

        self.path, self.buffer = Path(path), io.StringIO()

    def __enter__(self):
        return self.buffer

    def __exit__(self, kind, *_):
        if kind is None:
            atomic_write_text(self.path, self.buffer.getvalue())


# -- output ---------------------------------------------------------------------------------------------------
def _fid_text(row: dict) -> str:
    if not row["fid"]:
        return "-"
    import statistics

    return f"{statistics.fmean(row['fid']):.2f} ± {statistics.stdev(row['fid']):.2f}"


def _gap_text(row: dict) -> str:
    gap = row["fid_gap"]
    if not gap:
        return "-"
    verdict = "tie" if gap["tie"] else ("better" if gap["mean"] < 0 else "worse")
    return f"{gap['mean']:+.2f} [{gap['interval'][0]:+.2f}, {gap['interval'][1]:+.2f}] {verdict}"


def table_rows(rows: list[dict], chosen: str | None) -> list[dict[str, str]]:
    """The frontier table as strings, fastest first (the base first of all)."""
    ordered = sorted(rows, key=lambda r: (r["name"] != "base", r["time_s"]))
    return [{"": "*" if r["name"] == chosen else "", "model": r["name"],
             "FLOPs": f"{r['flops_ratio']:.2f}x", "time": f"{r['time_s']:.3f} s ({r['time_ratio']:.2f}x)",
             "screening": f"{r['screening']:.5f} ({r['quality_ratio'] - 1:+.1%})",
             "FID": _fid_text(r), "FID - base (paired)": _gap_text(r), "train TFLOPs": f"{r['train_flops'] / 1e12:.2f}"}
            for r in ordered]


def format_rows(rows: list[dict[str, str]]) -> str:
    """Left-aligned text columns."""
    if not rows:
        return ""
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in rows[0]}
    lines = ["  ".join(k.ljust(w) for k, w in widths.items())]
    lines += ["  ".join(r[k].ljust(w) for k, w in widths.items()) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def write_table_csv(rows: list[dict], path: Path) -> Path:
    import csv

    keys = ["name", "kind", "sampling_flops", "flops_ratio", "time_s", "time_ratio", "screening", "quality_ratio",
            "fid_mean", "fid_gap_mean", "fid_gap_low", "fid_gap_high", "fid_tie", "train_flops"]
    with _AtomicText(path) as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            gap = r["fid_gap"] or {}
            writer.writerow({**r, "fid_mean": sum(r["fid"]) / len(r["fid"]) if r["fid"] else "",
                             "fid_gap_mean": gap.get("mean", ""), "fid_gap_low": gap.get("interval", ["", ""])[0],
                             "fid_gap_high": gap.get("interval", ["", ""])[1], "fid_tie": gap.get("tie", "")})
    return path


def cost_rows(cost: dict, price: bool) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The cost table (per phase) and the return table (per batch size) as strings."""
    def num(value, unit=""):
        return "-" if value is None else f"{value:.1f}{unit}"

    phases = [{"phase": r["phase"], "wall": num(r["wall_s"], " s"), "CPU": num(r["cpu_s"], " s"),
               "train TFLOPs": "-" if r["flops"] is None else f"{r['flops'] / 1e12:.2f}", "note": r["note"]}
              for r in cost["phases"]]
    returns = []
    for t in cost["throughput"]:
        row = {"batch": str(t["batch"]), "base img/s": f"{t['base_images_per_s']:.1f}",
               "chosen img/s": f"{t['chosen_images_per_s']:.1f}", "speedup": f"{t['speedup']:.2f}x",
               "pays back after": "never (no saving)" if t["payback_images"] is None else f"{t['payback_images']:,.0f} images"}
        if price:
            row["cost / 1k images"] = f"{t['base_cost_per_1000']:.4f} -> {t['chosen_cost_per_1000']:.4f}"
        returns.append(row)
    return phases, returns


def plot_frontier(rows: list[dict], chosen: str | None, batch: int, measure: str, path: Path) -> Path:
    """Screening quality (relative to the base) against sampling time at `batch` and against sampling FLOPs,
    and the finalists' FID against time."""
    from .plots import pyplot, save_figure

    plt = pyplot()
    styles = {"base": ("k", "*"), "single": ("tab:gray", "s"), "uniform": ("tab:blue", "o"), "tdc": ("tab:red", "^")}
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    panels = [(axes[0], "time_ratio", "quality_ratio", f"sampling time at batch {batch} / base's"),
              (axes[1], "flops_ratio", "quality_ratio", "sampling FLOPs / base's"),
              (axes[2], "time_ratio", "fid", f"sampling time at batch {batch} / base's")]
    for ax, x_key, y_key, x_label in panels:
        for kind, (color, marker) in styles.items():
            points = [r for r in rows if r["kind"] == kind and r[y_key] is not None]
            if not points:
                continue
            ys = [sum(r[y_key]) / len(r[y_key]) if y_key == "fid" else r[y_key] for r in points]
            ax.scatter([r[x_key] for r in points], ys, c=color, marker=marker, s=60 if kind == "base" else 36,
                       label=kind)
            for r, y in zip(points, ys):
                ax.annotate(r["name"].replace("TDC ", ""), (r[x_key], y), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
                if r["name"] == chosen:
                    ax.scatter([r[x_key]], [y], s=220, facecolors="none", edgecolors="green", linewidths=2)
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{measure} / base's (lower is better)")
    axes[1].set_ylabel(f"{measure} / base's")
    axes[2].set_ylabel("FID, mean over seeds (finalists)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"tdcdiff tune: quality against sampling cost (chosen: {chosen or 'none'}, circled)")
    fig.tight_layout()
    return save_figure(fig, path)
