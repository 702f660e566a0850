"""Tune: one tune directory, run candidate by candidate and then measured, compared and chosen from (see the
package docstring for the directory's layout)."""

from __future__ import annotations

import json
import shutil
import statistics
from dataclasses import asdict
from pathlib import Path

from ..capacity import check_sampling_memory
from ..evaluate import TIMING_CLOCK, check_feature_net, default_feature_net
from ..files import atomic_write_text
from ..flops import count_flops
from ..prune.fit import BudgetError
from ..run import Run, copy_stages, lock_run_dir
from ..run.estimate import base_for_estimate
from ..run.rundir import check_out_dir
from ..train import FINAL_DIR
from .config import TuneConfig
from .cost import write_cost
from .curves import curves_allocation, measure_curves
from .judge import JUDGE_RULE, choose
from .kinds import candidate_list, check_candidate, kind_of
from .ladder import (
    SCREEN_PICKS,
    SCREEN_SLACK,
    best_free,
    fid_points,
    headline,
    pick_settings,
    point_name,
    resolve_ladder,
    spearman,
    within_model_agreement,
)
from .measures import (
    SCREENING_MEASURES,
    fid,
    load_models,
    model_ids,
    screen,
    screen_protocol,
    second_measure,
    time_models,
)
from .output import frontier_rows, plot_frontier, write_table_csv
from .records import clock, read_json, record_phase, since
from .sample_screen import measure_screen
from .sample_screen import screen_protocol as sample_screen_protocol
from .ship import check_chosen, write_chosen

CANDIDATES_FORMAT = "tdcdiff-tune-plan/1"  # of tune.json and candidates.json (named before "candidate list")
RESULTS_FORMAT = "tdcdiff-tune/3"  # /3: rows are points (model, setting), "headline"; /2: rows' second measure


def check_base_from(base_from: str | Path | None) -> Path | None:
    """--base-from as a Path (None: not given). Raises FileNotFoundError where it holds no finished stage-1 base."""
    if base_from is None:
        return None
    source = Path(base_from)
    if not (source / "base" / FINAL_DIR).exists() or not (source / "config.json").exists():
        raise FileNotFoundError(f"--base-from {source}: no finished stage-1 base there (base/{FINAL_DIR} and "
                                "config.json); point it at a run directory after `tdcdiff train-base`")
    return source


def checked_base(tune_dir: Path, base_from: str | Path | None) -> Path:
    """The run directory whose config.json a tune uses: the tune's base/ (kept once there), else --base-from's."""
    here = Path(tune_dir) / "base"
    return here if base_from is None or (here / "config.json").exists() else Path(base_from)


def check_base_run(config: TuneConfig, candidates: list[dict], base_run: Run) -> tuple:
    """What a tune refuses before any write (and `tdcdiff tune --dry-run` alike), on the base run's settings: each
    candidate's kind (a bad setting fails now, not after stage 1 and other candidates), what its FID judge needs
    (evaluate.check_feature_net: labelled data, a writable TDCDIFF_CACHE), --batch, --screen-samples
    and --fid-samples against memory (each phase keeps that many images at once: capacity.check_sampling_memory),
    and the ladder (resolve_ladder, feature caching checked on the base, trained or not yet: run.estimate's
    base_for_estimate). Returns
    resolve_ladder's."""
    for spec in candidates:
        kind_of(spec["kind"]).check(spec, base_run.config)
    check_feature_net(base_run.data.images, base_run.data.labels, base_run.data.name)  # the judge's FID
    shape = base_run.sample_shape
    for count, flag, what, why in ((config.batch, "--batch", "timing sampling at", " (your sampling batch size)"),
                                   (config.screen_samples, "--screen-samples", "the sample screen's", ""),
                                   (config.fid_samples, "--fid-samples", "FID's sets of", "")):
        check_sampling_memory(count, shape, fix=f"lower {flag}{why}",
                              what=f"{what} {flag} {count} (the noise and images of {count} samples of "
                                   f"{'x'.join(map(str, shape))}, float32)")
    # feature caching is checked on the base's architecture: the trained base, else the one stage 1 would train
    return resolve_ladder(config, base_run, base_for_estimate(base_run)[0])


def check_tune(tune_dir: str | Path, config: TuneConfig, *, overrides: dict | None = None,
               base_from: str | Path | None = None) -> None:
    """Raise what Tune(tune_dir, config, ...) would refuse before writing, writing nothing (`tdcdiff tune
    --dry-run`): the settings, a chosen/ holding the user's files (ship.check_chosen), --base-from, and
    check_base_run on the base run."""
    check_out_dir(tune_dir, "tune directory")
    config.validate()
    check_chosen(Path(tune_dir))
    check_base_from(base_from)
    base = Run(checked_base(Path(tune_dir), base_from), overrides=overrides, progress=False)
    check_base_run(config, candidate_list(config), base)


class Tune:
    """One tune directory (see the package docstring).

    tune_dir: where everything goes. run_config, overrides: the base run's RunConfig and dotted-key settings on
        top (as for Run; None: the saved or default config). Stage-2 settings (batch size, lr) apply to every
        candidate's training; search settings to the TDC candidates'.
    config: TuneConfig. base_from: a run directory whose finished stage-1 base (and config.json) to start from
        instead of training one here. progress: print one line per candidate and phase, and the stages' bars.
    Raises ValueError when the directory's saved candidate list was made with other settings, when its chosen/
    holds files besides a bundle's (ship.check_chosen), or when a candidate cannot be trained with the base run's
    settings (kinds.Kind.check); FileNotFoundError when base_from holds no finished base.
    """

    def __init__(self, tune_dir: str | Path, config: TuneConfig | None = None, *, run_config=None,
                 overrides: dict | None = None, base_from: str | Path | None = None, progress: bool = True):
        check_out_dir(tune_dir, "tune directory")  # empty, missing or a tune directory, before any write ("" too)
        self.dir = Path(tune_dir)
        self.config = config or TuneConfig()
        self.config.validate()
        check_chosen(self.dir)  # known now: write_chosen would refuse it only after the timing and FID
        self.progress = progress
        source = check_base_from(base_from)
        self.candidates = candidate_list(self.config)
        self._check_saved_plan()
        # Every refusal before anything is copied: the base run's settings on the config.json that will be used
        # (copy_stages keeps one the tune directory has), and each candidate's on top of them.
        here = self.dir / "base"
        self.base_run = Run(checked_base(self.dir, base_from), run_config, overrides=overrides, progress=progress)
        self.reference, self.settings, self.ladder_notes = check_base_run(self.config, self.candidates, self.base_run)
        self.points: dict = {}  # row name -> (model name, sampling_setting.SamplingSetting), set by run_all
        if source is not None:
            with self.locked():
                copy_stages(source, here, ("config.json", "base"))
            self.base_run = Run(here, run_config, overrides=overrides, progress=progress)

    def locked(self):
        """Hold the tune directory's lock (run.lock_run_dir, reentrant in this process) for a `with` block: every
        method that writes here does, so a second tune of the same directory is refused at once, naming the
        holder, instead of training the same candidates at the same time. Raises RunDirectoryBusy."""
        return lock_run_dir(self.dir, what="tune directory")

    def _check_saved_plan(self) -> None:
        """Refuse a tune directory whose saved candidate list (tune.json) was made with other settings."""
        saved = read_json(self.dir / "tune.json")
        here = self.config.candidate_settings()
        if saved is not None and not (isinstance(saved, dict) and isinstance(saved.get("plan"), dict)):
            raise ValueError(f"{self.dir / 'tune.json'} is damaged (no mapping under 'plan'); delete it: the tune "
                             "makes it again")
        if saved is not None and saved["plan"] != here:
            # a candidate kind left at its default is absent from candidate_settings: compare over both sides' keys
            differ = [f"{k}: {saved['plan'].get(k, 'unset')} there, {here.get(k, 'unset')} here"
                      for k in dict.fromkeys([*saved["plan"], *here]) if saved["plan"].get(k) != here.get(k)]
            raise ValueError(f"{self.dir} was tuned with other candidate settings ({'; '.join(differ)}); use a new "
                             f"--out, or delete {self.dir / 'tune.json'} and {self.dir / 'candidates'} to start over")

    def point(self, name: str) -> tuple:
        """(model name, SamplingSetting) of row `name` (self.points); a name run_all has not crossed is the model of
        that name at the reference setting."""
        return self.points.get(name, (name, self.reference))

    def say(self, message: str) -> None:
        if self.progress:
            print(message, flush=True)

    # -- the candidate list, the base, the candidates -------------------------------------------------------------
    def write_candidate_list(self) -> Path:
        """tune.json (the settings the candidate list was made with, under "plan") and candidates.json (the
        candidate list); returns the latter's path."""
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.dir / "tune.json", json.dumps({
            "format": CANDIDATES_FORMAT, "plan": self.config.candidate_settings(), "settings": asdict(self.config)},
            indent=2))
        path = self.dir / "candidates.json"
        atomic_write_text(path, json.dumps({"format": CANDIDATES_FORMAT, "candidates": self.candidates}, indent=2))
        return path

    def ensure_base(self) -> None:
        """Stage 1 (skipped when the base exists); its time and FLOPs go to phases.json when trained here."""
        if (self.base_run.dir / "base" / FINAL_DIR).exists():
            return
        self.say("stage 1: training the base")
        start = clock()
        result = self.base_run.train_base()
        record_phase(self.dir, "stage1", since(start, result.train_flops))

    def base_flops(self) -> int:
        """FLOPs of one forward of the base at batch 1 (flops.count_flops)."""
        return count_flops(self.base_run.base_model(), self.base_run.sample_shape)

    def training_flops_per_candidate(self) -> int:
        """Each candidate's training compute: tune_steps stage-2 steps of the base (FLOPs, fwd + bwd = 3 x fwd)."""
        return self.config.tune_steps * self.base_run.config.finetune.batch_size * 3 * self.base_flops()

    def result(self, index: int) -> dict | None:
        """Candidate `index`'s result.json record (None before it has finished)."""
        return read_json(self.dir / self.candidates[index]["dir"] / "result.json")

    def run_candidate(self, index: int) -> dict:
        """Train candidate `index` by its kind (skipped when finished); returns its result.json record.

        A candidate whose budget cannot be reached (prune.fit.BudgetError) is recorded as failed. Raises
        ValueError for an index outside the candidate list or a kind the registry lacks, before any work.
        """
        with self.locked():
            check_candidate(index, self.candidates, self.dir / "candidates.json")
            spec = self.candidates[index]
            kind = kind_of(spec["kind"])
            done = self.result(index)
            if done is not None:
                note = kind.finished_note(self, spec, done)
                self.say(f"[{index}] {spec['name']}: finished earlier, skipped" + (f" ({note})" if note else ""))
                return done
            self.ensure_base()  # its refusals (the data, the model's fit) before the candidate list is written
            self.write_candidate_list()
            out = self.dir / spec["dir"]
            try:
                record = kind.train(self, spec, out)
            except BudgetError as err:
                record = {"failed": str(err)}
                self.say(f"[{index}] {spec['name']}: failed: {err}")
            record = {**spec, **record}
            atomic_write_text(out / "result.json", json.dumps(record, indent=2))
            return record

    # -- measuring (measures.py, curves.py) ------------------------------------------------------------------------
    def models(self) -> dict:
        """name -> (Router, sampling FLOPs per image) for the base and every finished, not failed candidate."""
        return load_models(self)

    def screen(self, models: dict) -> dict:
        """Both screening measures of every model, paired with the base's per image (measures.screen)."""
        return screen(self, models)

    def fid(self, models: dict, names: list[str]) -> dict:
        """Per-seed FID/KID of the base and `names` (measures.fid)."""
        return fid(self, models, names)

    def measure_curves(self, groups: int, grouping: str) -> dict:
        """Quality curves of the `groups` groups of `grouping` (curves.measure_curves)."""
        return measure_curves(self, groups, grouping)

    def curves_allocation(self, spec: dict) -> tuple[dict, dict]:
        """The groups' budgets of "tdc-curves" candidate `spec` from the curves (curves.curves_allocation)."""
        return curves_allocation(self, spec)

    # -- everything ------------------------------------------------------------------------------------------------
    def run_all(self) -> dict:
        """Every candidate, then the measures, the frontier and the choice, under the tune directory's lock (see
        locked and _run_all); returns the results dict (also in results.json). Raises RunDirectoryBusy at once
        when another process tunes this directory."""
        with self.locked():
            return self._run_all()

    def _run_all(self) -> dict:
        """Every candidate (finished ones skipped), screening, the joint space (the base and the best candidates by
        screening crossed with the ladder of sampling settings; every point timed at batch 1 and the user's batch),
        the sample screen picking each model's settings for FID, the finalists' FID, the frontier, the choice, the
        headline and the cost table; returns the results dict (also in results.json)."""
        self.ensure_base()  # its refusals (the data, the model's fit) before the candidate list is written
        self.reference, self.settings, self.ladder_notes = resolve_ladder(self.config, self.base_run,
                                                                          self.base_run.base_model())
        self.write_candidate_list()
        for spec in self.candidates:
            self.run_candidate(spec["index"])
        for note in self.ladder_notes:
            self.say(note)
        models = self.models()
        key = self.config.screening
        screening = self.screen(models)
        ranked = sorted((n for n in models if n != "base"), key=lambda n: screening[n][key]["value"])
        crossed = ["base", *ranked[: self.config.finalists]]
        self.points = {n: (n, self.reference) for n in models}
        self.points |= {point_name(m, s, self.reference): (m, s) for m in crossed for s in self.settings}
        times = self.time_points(models)
        distances, finalists = self.pick_finalists(models, crossed, times)
        fid_cache = self.fid(models, finalists)
        records = {spec["name"]: self.result(spec["index"]) for spec in self.candidates}
        rows = frontier_rows(models, self.points, records, screening, fid_cache, times, distances, key)
        # A setting other than the reference qualifies by FID only: the screening measure cannot see solver error.
        eligible = [r for r in rows if r["name"] != "base" and (r["fid_gap"] or r["setting"] == str(self.reference))]
        choice = choose(eligible, self.config.max_quality_loss, best_free(rows), self.config.min_model_speedup)
        results = self._results(rows, finalists, fid_cache, choice)
        atomic_write_text(self.dir / "results.json", json.dumps(results, indent=2))
        write_table_csv(rows, self.dir / "table.csv", key)
        plot_frontier(rows, choice["name"], self.config.batch, SCREENING_MEASURES[key].name, self.dir / "frontier.png")
        if choice["name"] is not None:
            chosen = next(r for r in rows if r["name"] == choice["name"])
            write_chosen(self, chosen, self.points[chosen["name"]][1], self.dir / "chosen")
            atomic_write_text(self.dir / "chosen.json", json.dumps({**choice, "bundle": chosen["bundle"],
                                                                    "sampling": chosen["setting"]}, indent=2))
            results["cost"] = write_cost(self, models, chosen)
        else:
            self._drop_last_choice()
        self.say(f"headline: {results['headline']['text']}")
        atomic_write_text(self.dir / "results.json", json.dumps(results, indent=2))
        return results

    def _drop_last_choice(self) -> None:
        """Remove an earlier run's chosen bundle and its records when this run chooses nothing: a script deploying
        chosen/ would otherwise ship a model this run rejected (chosen.json first, so that no half-removed choice
        reads as made)."""
        for name in ("chosen.json", "cost.json", "cost.csv", "return.csv"):
            (self.dir / name).unlink(missing_ok=True)
        if (self.dir / "chosen").is_symlink():  # the user's link: removed, what it points at left alone
            (self.dir / "chosen").unlink()
        elif (self.dir / "chosen").is_dir():
            shutil.rmtree(self.dir / "chosen")

    def time_points(self, models: dict) -> dict:
        """name -> {batch: seconds of one sampling run in each timed round} for every point, at batch 1 and the
        user's batch (measures.time_models: measured, interleaved)."""
        times = {}
        for b in dict.fromkeys([self.config.batch, 1]):
            self.say(f"timing: sampling at batch {b}, {len(self.points)} points (model, setting) interleaved")
            for name, rounds in time_models(self, models, list(self.points), b).items():
                times.setdefault(name, {})[b] = rounds
        return times

    def pick_finalists(self, models: dict, crossed: list[str], times: dict) -> tuple[dict, list[str]]:
        """The sample screen of every point of the crossed models and, per model, the settings it sends to FID
        (ladder.pick_settings); returns (name -> screen record, the FID finalists: the base's picks, then each
        candidate's in screening order). Without a ladder there is nothing to pick: each crossed candidate goes
        to FID at the reference, and nothing is sampled for the screen."""
        if not self.settings:
            return {}, crossed[1:]
        net = default_feature_net(self.base_run.data.images, self.base_run.data.labels,
                                  name=Path(self.base_run.data.name).name)
        crossed_points = {n: p for n, p in self.points.items() if p[0] in crossed}
        distances = measure_screen(self, models, crossed_points, self.reference, net, model_ids(self))
        picks = {}
        for m in crossed:
            mine = {s: distances[point_name(m, s, self.reference)]["distance"]
                    for s in (self.reference, *self.settings)}
            at = {s: statistics.median(times[point_name(m, s, self.reference)][self.config.batch]) for s in mine}
            picks[m] = pick_settings(mine, at, self.reference)
        return distances, fid_points(picks, self.reference)

    def _results(self, rows: list[dict], finalists: list[str], fid_cache: dict, choice: dict) -> dict:
        """results.json: the settings, how each measure was taken, the rows, the failed candidates, the
        finalists and the choice."""
        key, other = self.config.screening, second_measure(self.config.screening)
        failed = [{"name": s["name"], "failed": r["failed"]} for s in self.candidates
                  if (r := self.result(s["index"])) is not None and "failed" in r]
        return {
            "format": RESULTS_FORMAT,
            "settings": asdict(self.config),
            "screening_measure": {"key": key, "unit": SCREENING_MEASURES[key].unit,
                                  **screen_protocol(self.base_run, key),
                                  "paired": "screening_gap (second_gap): each model's value minus the base's, image "
                                            "by image, with its standard error (same images, timesteps and noise for "
                                            "every model)",
                                  "second": {"key": other, "unit": SCREENING_MEASURES[other].unit,
                                             **screen_protocol(self.base_run, other)}},
            "fid_protocol": {**{k: fid_cache[k] for k in ("protocol", "feature_net", "reference", "judge")},
                             "seeds": {"start": self.config.fid_seeds, "cap": self.config.max_fid_seeds,
                                       "used": fid_cache["seeds"]},
                             "rule": JUDGE_RULE},
            "time": f"median seconds ({TIMING_CLOCK}, as evaluate.time_sampling picks it by the models' device) of "
                    f"one sampling run with each row's setting at batch {self.config.batch} (time_s) and 1 (time_1_s), "
                    f"{self.config.timing_repeats} repeats interleaved across all points after a warm-up; every "
                    "point's trajectory measured, none derived from per-forward times",
            "reference": str(self.reference), "ladder": [str(s) for s in self.settings],
            "ladder_notes": self.ladder_notes, "sample_screen": self._screen_record(rows),
            "headline": headline(rows, choice["name"], self.config.batch, self.config.min_model_speedup),
            "compute": f"every candidate: {self.training_flops_per_candidate():.4g} training FLOPs "
                       f"({self.config.tune_steps} stage-2 steps of the base); the pruning search's proxy forwards "
                       "are not counted",
            "rows": rows, "failed": failed, "finalists": finalists, "choice": choice,
        }

    def _screen_record(self, rows: list[dict]) -> dict | None:
        """results.json's "sample_screen": its protocol and its rank agreement with FID (Spearman over the rows
        with both, the finalists and the reference; and over pairs of settings of the same model, the choices the
        screen makes); None without a ladder."""
        if not self.settings:
            return None
        both = [r for r in rows if r["screen_distance"] is not None and r["fid"]]
        rho = spearman([r["screen_distance"] for r in both], [statistics.fmean(r["fid"]) for r in both])
        return {**sample_screen_protocol(self, self.reference), "spearman_vs_fid": rho, "pairs": len(both),
                "within_model": within_model_agreement(rows),
                "pick": f"per crossed model: the {SCREEN_PICKS} fastest settings whose screen distance is at most "
                        f"{SCREEN_SLACK}x the model's own at the reference setting; the base also at every setting "
                        "a candidate is picked at, so the free setting and the model are split on the same settings"}
