"""TuneConfig: what `tdcdiff tune` tries and how it measures."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Iterable

from ..budget import budget_fractions
from ..capacity import FID_LIMIT, MAX_FID_IMAGES, MAX_FID_SEEDS, SEEDS_LIMIT
from ..grouping import STRATEGIES
from ..run.config import STAGE_OF_SETTING
from ..settings import Settings
from .curves import CURVE_OBJECTIVES
from .ladder import DEFAULT_LADDER, parse_settings
from .measures import SCREENING_MEASURES

# Settings a TDC candidate takes from the grid (--k, --groups, --grouping): a variant setting one of them would
# train another candidate than its name says (a variant's mean_budget or budget_unit reshapes the grid's budgets).
GRID_SETTINGS = ("k", "groups", "grouping")


@dataclass
class TuneConfig(Settings):
    """What `tdcdiff tune` tries and how it measures.

    tune_steps: each candidate's training compute, as this many stage-2 steps of the BASE model (at the run's
        stage-2 batch size): smaller candidates get proportionally more steps.
    widths: uniform-pruning levels, as fractions of the base's FLOPs (0 < w < 1).
    ks, groups, groupings: the TDC grid (budget slope k, number of groups N, grouping strategy).
    tdc_variants: RunConfig dotted-key settings crossed with that grid, one TDC candidate each, e.g.
        ({}, {"finetune.mix_fraction": 0.2}) tries every grid point with and without a stage-2 mix.
    time_budgets: TDC candidates budgeted in measured forward time: for each value F and each N and grouping,
        the paper's fractions at k = kinds.TIME_BUDGET_K scaled so that their timestep-weighted mean is F of the
        base's time (RunConfig budget_unit "time", mean_budget F).
    uniform_time_budgets: uniform-pruning levels fitted to this fraction of the base's forward time at the run's
        latency_batch instead of FLOPs: by its latency table, then corrected against the measured time
        (prune.fit.uniform_fit), as the TDC time-budget candidates' experts are.
    depth: also try every TDC candidate with depth pruning (search.depth: whole layers kept or removed).
    curves: also, for each TDC grid point, a "TDC curves" candidate: the same groups and mean budget as the
        paper's formula gives, split across groups by measured quality curves (Tune.measure_curves: each group's
        share of the screening measure, paired with the base's, at curve_sizes, fractions of the base's FLOPs,
        after curve_steps stage-2 steps there; budget.allocate_from_curves). The curves' training counts in the
        candidate's compute.
    curve_objectives: what the curves candidates minimise, one candidate per entry (keys of CURVE_OBJECTIVES):
        "share", the measure's total change (each group's share minus the base's: a sum over t, dominated by the
        least noisy groups, where losses are largest), or "relative", each group's share as a multiple of the
        base's, weighted by the group's share of the timesteps (damage at the noisiest t, tiny in absolute
        terms, counts by the sampling steps it touches). The curves are measured once for both.
    screening: the measure that ranks candidates for FID and --max-quality-loss, a key of SCREENING_MEASURES:
        "loss" (held-out denoising loss) or "bpd" (held-out bits/dim bound); the other is measured beside it.
        Both are paired with the base per image; the "TDC curves" candidates allocate by it. Not part of the
        candidate settings: switching it reuses every candidate (a finished curves candidate keeps the
        allocation it had, and a rerun says so).
    finalists: how many candidates (best by the screening measure) get paired-seed FID/KID and a verdict against
        the base (verdict.judge: better, non-inferior, inferior or undecided).
    fid_seeds, max_fid_seeds: sampling seeds for FID/KID: every finalist starts with fid_seeds (at least 2, for
        the paired rule); an undecided one gets one more seed at a time, up to max_fid_seeds (verdict.sequential;
        the looks share the verdict's 2.5% error, so a larger cap widens each look's interval a little).
    fid_samples: images per seed for FID/KID.
    margin: the judge's non-inferiority margin in FID units (the largest loss that counts as none); None: the
        real-vs-real spread of FID at fid_samples images (evaluate.judge_protocol).
    settings: the ladder of sampling settings ("sampler:steps[:cN[:dD]]", sampling_setting.SamplingSetting) every model
        is also sampled with: the base and the `finalists` best candidates by the screening measure are crossed
        with them (the other candidates stay at the reference). Default: ladder.DEFAULT_LADDER, less what the base
        cannot take (a setting given is refused instead).
    reference: the setting every point is judged against, the base sampled with it (the user's current setting);
        None: the base run's sampler and steps (ddim:50 by default).
    screen_samples: images per point in the sample screen (sample_screen.py), which picks each crossed model's
        settings for FID.
    batch: the user's sampling batch size: the frontier's time axis.
    timing_repeats: timed sampling runs per model and batch (interleaved rounds, after one warm-up; the rows give
        the median, the speed bar pairs the rounds). Default 5: with 3, the paired interval's t factor is 4.3.
    max_quality_loss: also accept a candidate without a FID verdict (not a finalist) whose screening value (of the
        `screening` measure) is at most this much worse than the base's, relatively (0.02 = 2%); None: only the
        FID verdicts choose.
    min_model_speedup: how much faster than the best free setting (the base at its fastest setting as good as the
        reference) another model must be measured at `batch` to be shipped: the lower 95% bound of its speedup,
        paired by timing round (judge.model_speedup), must reach it; 0: no bar (a model slower than the free
        setting can then be shipped). Default 1.1: a point estimate is not enough (a fine-tuned copy of the base,
        the same FLOPs, measured 0.86x to 1.16x against it at batch 64 over three digits tunes, docs/tune.md), and
        a gain under 10% is not worth shipping new weights judged only to within the FID margin.
    price_per_hour: price of one machine hour, for the cost per 1,000 images (None: not shown).
    """

    tune_steps: int = 1000
    widths: tuple[float, ...] = (0.8, 0.6, 0.4)
    ks: tuple[float, ...] = (0.1, 0.3, 0.5)
    groups: tuple[int, ...] = (2, 4)
    groupings: tuple[str, ...] = ("snr",)
    tdc_variants: tuple[dict, ...] = ({},)
    time_budgets: tuple[float, ...] = ()
    uniform_time_budgets: tuple[float, ...] = ()
    depth: bool = False
    curves: bool = False
    curve_sizes: tuple[float, ...] = (0.4, 0.6, 0.8, 1.0)
    curve_steps: int = 50
    curve_objectives: tuple[str, ...] = ("share",)
    screening: str = "loss"
    finalists: int = 3
    fid_seeds: int = 3
    max_fid_seeds: int = 8
    fid_samples: int = 512
    margin: float | None = None
    settings: tuple[str, ...] = DEFAULT_LADDER
    reference: str | None = None
    screen_samples: int = 64
    batch: int = 64
    timing_repeats: int = 5
    max_quality_loss: float | None = None
    min_model_speedup: float = 1.1
    price_per_hour: float | None = None

    def validate(self, prefix: str = "") -> None:
        """Raise ValueError naming the flag of the first bad setting: repeated values, variants, the sampling
        settings and the TDC grid's budgets, then the settings mechanism's types and `checks()`."""
        self._check_repeats()
        self._check_variants()
        parse_settings(self.settings, "--settings")
        if self.reference is not None:
            parse_settings([self.reference], "--reference")
        for n in self.groups:
            for k in self.ks:
                budget_fractions(n, k)
        super().validate(prefix)

    def checks(self) -> Iterable[tuple[bool, str]]:
        """(ok, message) per range and choice, each message naming its flag."""
        return [
            (self.tune_steps >= 1, f"--tune-steps must be >= 1, got {self.tune_steps}"),
            (all(0 < w < 1 for w in self.widths),
             f"--width values must be in (0, 1) (fractions of the base's FLOPs), got {list(self.widths)}"),
            (all(0 < f <= 1 for f in self.time_budgets),
             "--time-budget values must be in (0, 1] (mean fractions of the base's sampling time), got "
             f"{list(self.time_budgets)}"),
            (all(0 < f < 1 for f in self.uniform_time_budgets),
             "--uniform-time-budget values must be in (0, 1) (fractions of the base's forward time), got "
             f"{list(self.uniform_time_budgets)}"),
            (all(g in STRATEGIES for g in self.groupings),
             f"unknown grouping in {list(self.groupings)}; choose from {STRATEGIES}"),
            (all(0 < f <= 1 for f in self.curve_sizes) and 1.0 in self.curve_sizes,
             f"curve sizes must be fractions in (0, 1] of the base's FLOPs and include 1.0 (every budget can afford "
             f"it per group), got {list(self.curve_sizes)}"),
            (bool(self.curve_objectives) and all(o in CURVE_OBJECTIVES for o in self.curve_objectives)
             and len(set(self.curve_objectives)) == len(self.curve_objectives),
             f"--curve-objective must be one or more of {', '.join(CURVE_OBJECTIVES)}, each once, got "
             f"{list(self.curve_objectives)}"),
            (self.curves or self.curve_objectives == ("share",),
             "--curve-objective chooses how --curves candidates allocate: add --curves"),
            (self.curve_steps >= 1,
             "--curve-steps must be >= 1 (stage-2 steps behind each point of a quality curve), got "
             f"{self.curve_steps}"),
            (self.screening in SCREENING_MEASURES,
             f"unknown --screening {self.screening!r}; choose from "
             + ", ".join(f"{key} ({m.name})" for key, m in SCREENING_MEASURES.items())),
            (self.finalists >= 1, f"--finalists must be >= 1, got {self.finalists}"),
            (self.fid_seeds >= 2, f"--fid-seeds must be >= 2 (the paired rule needs two pairs), got {self.fid_seeds}"),
            (self.fid_seeds <= MAX_FID_SEEDS,
             f"--fid-seeds must be at most {MAX_FID_SEEDS}, got {self.fid_seeds} ({SEEDS_LIMIT})"),
            (self.max_fid_seeds >= self.fid_seeds,
             f"--max-fid-seeds must be >= --fid-seeds ({self.fid_seeds}): it caps the seeds added one at a time until "
             f"each finalist's FID verdict is decided, got {self.max_fid_seeds}"),
            (self.margin is None or 0 <= self.margin < math.inf,
             f"--margin must be a finite number >= 0 (the largest FID loss that counts as none), got {self.margin}"),
            (self.max_fid_seeds <= MAX_FID_SEEDS,
             f"--max-fid-seeds must be at most {MAX_FID_SEEDS}, got {self.max_fid_seeds} ({SEEDS_LIMIT})"),
            (self.fid_samples >= 2, f"--fid-samples must be >= 2 (FID needs two images), got {self.fid_samples}"),
            (self.fid_samples <= MAX_FID_IMAGES,
             f"--fid-samples must be at most {MAX_FID_IMAGES}, got {self.fid_samples} ({FID_LIMIT})"),
            (self.batch >= 1, f"--batch must be >= 1, got {self.batch}"),
            (2 <= self.screen_samples <= MAX_FID_IMAGES,
             f"--screen-samples must be between 2 and {MAX_FID_IMAGES}, got {self.screen_samples}"),
            (self.timing_repeats >= 1, f"timing_repeats must be >= 1, got {self.timing_repeats}"),
            (self.max_quality_loss is None or 0 <= self.max_quality_loss < math.inf,
             "--max-quality-loss must be a finite number >= 0 (a relative loss, 0.02 = 2%), got "
             f"{self.max_quality_loss}"),
            (0 <= self.min_model_speedup < math.inf,
             "--min-model-speedup must be a finite number >= 0 (how much faster than the best free setting a model "
             f"must be measured to be shipped; 0: no bar), got {self.min_model_speedup}"),
            (self.min_model_speedup == 0 or self.timing_repeats >= 2,
             f"--min-model-speedup {self.min_model_speedup:g} needs timing_repeats >= 2 (the bar is the lower bound of "
             f"an interval over paired timing rounds; one round has none), got {self.timing_repeats}; raise "
             "timing_repeats, or set --min-model-speedup 0 (no bar)"),
            (self.price_per_hour is None or 0 <= self.price_per_hour < math.inf,
             "--price-per-hour must be a finite number >= 0 (the machine's price per hour), got "
             f"{self.price_per_hour}"),
        ]

    def _check_repeats(self) -> None:
        """Refuse a value given twice in a repeated option: each is one candidate (or curve point), and a repeat
        would plan it twice. Numbers are compared as candidate names print them (0.5 and 0.50000001 are one)."""
        for option, values in (("--width", self.widths), ("--k", self.ks), ("--groups", self.groups),
                               ("--grouping", self.groupings), ("--time-budget", self.time_budgets),
                               ("--uniform-time-budget", self.uniform_time_budgets), ("curve_sizes", self.curve_sizes),
                               ("--variant", self.tdc_variants)):
            seen = {}
            for value in values:
                key = f"{value:g}" if isinstance(value, float) else json.dumps(value, sort_keys=True, default=str)
                if key in seen:
                    same = "is given twice" if seen[key] == value else f"and {seen[key]!r} are one candidate ({key})"
                    shown = value
                    if isinstance(value, dict):  # as --variant takes it
                        shown = ",".join(f"{k}={v}" for k, v in value.items()) or "{}"
                    raise ValueError(f"{option} {shown!s} {same}: each value is one candidate; give each once")
                seen[key] = value

    def _check_variants(self) -> None:
        """Refuse a --variant setting what the TDC grid sets for each candidate (k, N, grouping, a time budget),
        or what stage 1 shapes (every candidate shares the base trained once)."""
        for variant in self.tdc_variants:
            for key in variant:
                section = key.partition(".")[0]
                if section in GRID_SETTINGS or (key == "search.depth" and self.depth):
                    raise ValueError(f"--variant {key}={variant[key]} sets what each TDC candidate takes from the "
                                     "grid (--k, --groups, --grouping, --depth); give it there")
                if STAGE_OF_SETTING.get(section) == "base":
                    raise ValueError(f"--variant {key}={variant[key]} changes stage 1, which every candidate shares "
                                     "with the base trained once; set it for the base (its flag or --config)")

    def candidate_settings(self) -> dict:
        """The settings that decide the candidate list and the candidates' training (a rerun must keep them;
        tune.json holds them under "plan"). Candidate kinds left at their defaults (none) are left out, so
        directories tuned before they existed still match."""
        optional = {"time_budgets": list(self.time_budgets), "uniform_time_budgets": list(self.uniform_time_budgets),
                    "depth": self.depth,
                    "curves": {"sizes": list(self.curve_sizes), "steps": self.curve_steps,
                               **({} if self.curve_objectives == ("share",) else
                                  {"objectives": list(self.curve_objectives)})} if self.curves else None}
        return {"tune_steps": self.tune_steps, "widths": list(self.widths), "ks": list(self.ks),
                "groups": list(self.groups), "groupings": list(self.groupings),
                "tdc_variants": [dict(v) for v in self.tdc_variants], **{k: v for k, v in optional.items() if v}}
