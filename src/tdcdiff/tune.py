"""`tdcdiff tune`: the quality-speed frontier of one base model, the fastest candidate as good as the base,
and what tuning cost against what it returns.

From one stage-1 base, every candidate is fine-tuned with the SAME training compute (FLOPs): the base itself
("single", the equal-compute reference), the base pruned to one uniform width (of its FLOPs or measured time),
and TDC runs over k, N and the grouping strategy, by time budget, with depth pruning, or with the groups'
budgets allocated from measured quality curves (in the screening measure). All are screened with the held-out
denoising loss or, with TuneConfig.screening "bpd", the held-out bits/dim bound (each paired with the base's per
image: same images, timesteps and noise; the other measure beside it); the best few by it get paired-seed FID/KID
against the base; the chosen candidate is the fastest one whose quality is tied with or better than the base's by
the paired rule, or within `max_quality_loss`.

    tune_dir/
      tune.json            the settings the candidate plan was made with (a rerun must match them)
      candidates.json      the candidate plan: index, name, kind, parameters, directory
      base/                the stage-1 run directory (trained here, or config.json + base/ copied from a run)
      phases.json          wall and CPU time (and training FLOPs) of stage 1, screening and finalists
      candidates/NN-name/  one candidate: a TDC run directory, or pruned/ + train/ + bundle/ for single and
                           uniform; result.json when it has finished (its phases' time and FLOPs)
      curves/              quality curves per (N, grouping) for the "TDC curves" candidates, in both screening
                           measures (the screening one allocates); sizes/: pruned sizes
      screening.json       both screening measures per model (per image, for pairing), each with its protocol;
                           fid.json: FID/KID per seed
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

from .evaluate import BPD_SAMPLES, HELD_OUT_IMAGES, slug
from .files import atomic_dir, atomic_write_text

PLAN_FORMAT = "tdcdiff-tune-plan/1"
SCREENING_FORMAT = "tdcdiff-tune-screening/2"


# -- the screening measures: what ranks candidates before FID -----------------------------------------------
@dataclass(frozen=True)
class ScreeningMeasure:
    """A cheap quality measure of a denoiser on held-out images; lower is better.

    name, unit: shown in results and plots; label: the table's column; decimals: digits shown. settings: what
    fixes the measurement besides the images and seed (part of its cache protocol). measure(model, held_out,
    scheduler, seed=..., labels=...) returns {"value": float, "se": float, "per_image": list} (value: the mean of
    per_image; se: its standard error), with the same images, timesteps and noise for every model given the same
    seed, so two models' per-image values are paired. labels: the held-out images' class ids for a
    class-conditional model, else None.
    """

    name: str
    label: str
    unit: str
    decimals: int
    settings: dict
    measure: Callable[..., dict]


LOSS_TIMESTEPS = 100  # evenly spaced timesteps per image in the held-out loss (as evaluate.held_out_loss)


def mean_se(values: list[float]) -> dict:
    """Mean and standard error of the mean ({"mean", "se"}; se NaN for one value)."""
    import math
    import statistics

    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return {"mean": statistics.fmean(values), "se": se}


def _held_out_losses(model, held_out: torch.Tensor, scheduler, *, seed: int,
                     labels: torch.Tensor | None = None) -> tuple:
    """The held-out loss screening measure's raw values: (points [P] measured timesteps, losses [P, M] float32, per
    measured timestep and image; grouping.per_image_loss)."""
    from .grouping import per_image_loss

    return per_image_loss(model, held_out, scheduler, num_points=LOSS_TIMESTEPS, images_per_point=HELD_OUT_IMAGES,
                          seed=seed, labels=labels)


def _held_out_loss(model, held_out: torch.Tensor, scheduler, *, seed: int, labels: torch.Tensor | None = None) -> dict:
    _, losses = _held_out_losses(model, held_out, scheduler, seed=seed, labels=labels)
    per_image = losses.double().mean(0).tolist()  # [P, M] -> each image's loss, mean over the measured timesteps
    summary = mean_se(per_image)
    return {"value": summary["mean"], "se": summary["se"], "per_image": per_image}


def _bits_per_dim(model, held_out: torch.Tensor, scheduler, *, seed: int, labels: torch.Tensor | None = None) -> dict:
    from .likelihood import nll_bound

    n = HELD_OUT_IMAGES
    bound = nll_bound(model, held_out[:n], scheduler, samples=BPD_SAMPLES, seed=seed,
                      labels=None if labels is None else labels[:n])
    total = bound.summary()["total"]
    return {"value": total["mean"], "se": total["se"], "per_image": bound.total.tolist()}


HELD_OUT_LOSS = ScreeningMeasure(
    "held-out denoising loss", "held-out loss", "MSE of the training target per held-out image, mean over "
    f"{LOSS_TIMESTEPS} evenly spaced t (grouping.per_image_loss on evaluate.HELD_OUT_IMAGES images picked by the "
    "seed, fixed noise)", 5, {"timesteps": LOSS_TIMESTEPS}, _held_out_loss)
BITS_PER_DIM = ScreeningMeasure(
    "held-out bits/dim bound", "bits/dim", "bits/dim (variational bound on the NLL of 8-bit images; "
    "likelihood.nll_bound on the first evaluate.HELD_OUT_IMAGES held-out images, evaluate.BPD_SAMPLES log-SNR "
    "strata)", 4, {"strata": BPD_SAMPLES}, _bits_per_dim)
# TuneConfig.screening (--screening) picks the measure that ranks; the other is measured beside it. The loss is
# the default: its ranking agreed with FID's where the bound's did not (the bound weighs the least noisy t most).
SCREENING_MEASURES = {"loss": HELD_OUT_LOSS, "bpd": BITS_PER_DIM}


def second_measure(screening: str) -> str:
    """The key of the measure recorded beside `screening` (a key of SCREENING_MEASURES)."""
    return next(key for key in SCREENING_MEASURES if key != screening)


def loss_shares(points, losses: torch.Tensor, grouping) -> torch.Tensor:
    """Each timestep group's share of the held-out loss, per image: a float64 tensor [M, N] (M images, N groups)
    from `losses` [P, M] at the measured timesteps `points` [P] (_held_out_losses), over grouping.Grouping `grouping`.

    A group's share is the sum of its measured timesteps' losses divided by P: its part of the all-point mean that
    the loss screening measure takes. So one model's shares add up over groups to its per-image screening value,
    and so do the shares of one model per group, as a TDC router runs them (a timestep goes to the group holding
    it): additive across groups, as budget.allocate_from_curves needs. A group holding no measured timestep (one
    narrower than the points' spacing, about T / LOSS_TIMESTEPS) is one the screening value does not see; lest its
    budget count as free, it takes the loss at the measured timestep nearest its middle, weighted by its share of
    the T timesteps (size / T), and the shares then add up to that much more than the screening value.
    """
    points, losses = torch.as_tensor(points), losses.double()
    columns = []
    for group in grouping.groups:
        inside = (points >= group.start) & (points < group.end)
        if inside.any():
            columns.append(losses[inside].sum(0) / len(points))
        else:
            nearest = (points.double() - (group.start + group.end - 1) / 2).abs().argmin()
            columns.append(losses[nearest] * group.size / grouping.num_train_timesteps)
    return torch.stack(columns, 1)


CURVES_FORMAT = "tdcdiff-tune-curves/2"
# What a quality curve's point is in each measure (Tune.measure_curves), by key of SCREENING_MEASURES.
CURVE_MEASURES = {
    "loss": "the group's share of the held-out denoising loss (tune.loss_shares, on the loss screening measure's "
            "images, timesteps and noise) minus the base's, paired per image",
    "bpd": "the group's share of the held-out bits/dim bound (likelihood.nll_bound, on the bits/dim screening "
           "measure's images and noise) minus the base's, paired per image",
}


CURVE_OBJECTIVES = {  # what a curves candidate's allocation minimises, given the curves of one measure
    "share": "sum over groups of {measure}",
    "relative": "sum over groups of the group's share of the timesteps times its share as a multiple of the base's "
                "({measure}, plus the base's share, over the base's share)",
}


def curve_objective_points(curves: dict, weights: list[float], objective: str) -> list[list[tuple[float, float]]]:
    """Per group, (fraction, value to minimise) at each measured size of curves (measure_curves' dict) under
    `objective` (CURVE_OBJECTIVES): "share", the point's change in the group's share; "relative", the group's
    timestep weight times its share over the base's ((loss + base) / base). weights: each group's share of the T
    timesteps. Raises ValueError for "relative" when a base share is not positive (both measures' shares are:
    tune.loss_shares gives a group between measured timesteps its nearest one's loss)."""
    if objective == "share":
        return [[(p["fraction"], p["loss"]) for p in group] for group in curves["points"]]
    if any(base <= 0 for base in curves["base_shares"]):
        raise ValueError(f"the relative curve objective divides by the base's share per group, got "
                         f"{curves['base_shares']}; use --curve-objective share")
    return [[(p["fraction"], weight * (p["loss"] + base) / base) for p in group]
            for group, base, weight in zip(curves["points"], curves["base_shares"], weights)]


def _curves_upgraded(curves: dict) -> dict:
    """curves.json as the current format holds it: one from before the loss was measured (no "format"; bits/dim in
    "loss", "se", "share" and "base_shares") gets those under the bits/dim names; the loss is then missing."""
    if curves.get("format") == CURVES_FORMAT:
        return curves
    points = [[{**p, "bpd_gap": {"mean": p["loss"], "se": p["se"]}, "bpd_share": p["share"]} for p in group]
              for group in curves["points"]]
    return {**curves, "format": CURVES_FORMAT, "measures": ["bpd"], "points": points,
            "base_bpd_shares": curves["base_shares"]}


def _curves_for(curves: dict, key: str) -> dict:
    """curves (current format) with measure `key` (of SCREENING_MEASURES, measured) in "loss", "se" and "share" of
    every point and in "base_shares", named in "measure" and described in "loss"."""
    points = [[{**p, "loss": p[f"{key}_gap"]["mean"], "se": p[f"{key}_gap"]["se"], "share": p[f"{key}_share"]}
               for p in group] for group in curves["points"]]
    return {**curves, "measure": key, "points": points, "base_shares": curves[f"base_{key}_shares"],
            "loss": f"{CURVE_MEASURES[key]}, after curve_steps stage-2 steps on the group's timesteps"}


def paired(values: list[float], reference: list[float]) -> dict:
    """Mean and standard error of values - reference, image by image ({"mean", "se"}; se NaN for one image).
    Raises ValueError when the two lists differ in length (not measured on the same images)."""
    if len(values) != len(reference):
        raise ValueError(f"cannot pair {len(values)} per-image values with {len(reference)}; measure both on the "
                         "same images")
    return mean_se([a - b for a, b in zip(values, reference)])


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
    time_budgets: TDC candidates budgeted in measured forward time: for each value F and each N and grouping,
        the paper's fractions at k = TIME_BUDGET_K scaled so that their timestep-weighted mean is F of the
        base's time (RunConfig budget_unit "time", mean_budget F).
    uniform_time_budgets: uniform-pruning levels fitted to this fraction of the base's forward time at the run's
        latency_batch instead of FLOPs: by its latency table, then corrected against the measured time
        (prune.fit.fit_to_measured_time), as the TDC time-budget candidates' experts are.
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
        plan: switching it reuses every candidate (a finished curves candidate keeps the allocation it had, and
        a rerun says so).
    finalists: how many candidates (best by the screening measure) get paired-seed FID/KID.
    fid_seeds, fid_samples: sampling seeds (at least 2, for the paired rule) and images per seed for FID/KID.
    batch: the user's sampling batch size: the frontier's time axis.
    timing_repeats: timed sampling runs per model and batch (interleaved, after one warm-up; median).
    max_quality_loss: also accept a candidate whose screening value (of the `screening` measure) is at most this
        much worse than the base's, relatively (0.02 = 2%); None: only the paired FID rule chooses.
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
    fid_samples: int = 512
    batch: int = 64
    timing_repeats: int = 3
    max_quality_loss: float | None = None
    price_per_hour: float | None = None

    def validate(self) -> None:
        import math

        from .budget import budget_fractions
        from .grouping import STRATEGIES

        for n in self.groups:
            for k in self.ks:
                budget_fractions(n, k)
        checks = [
            (self.tune_steps >= 1, f"--tune-steps must be >= 1, got {self.tune_steps}"),
            (all(0 < w < 1 for w in self.widths), f"--width values must be in (0, 1) (fractions of the base's FLOPs), got {list(self.widths)}"),
            (all(0 < f <= 1 for f in self.time_budgets),
             f"--time-budget values must be in (0, 1] (mean fractions of the base's sampling time), got {list(self.time_budgets)}"),
            (all(0 < f < 1 for f in self.uniform_time_budgets),
             f"--uniform-time-budget values must be in (0, 1) (fractions of the base's forward time), got {list(self.uniform_time_budgets)}"),
            (all(g in STRATEGIES for g in self.groupings), f"unknown grouping in {list(self.groupings)}; choose from {STRATEGIES}"),
            (all(0 < f <= 1 for f in self.curve_sizes) and 1.0 in self.curve_sizes,
             f"curve sizes must be fractions in (0, 1] of the base's FLOPs and include 1.0 (every budget can afford "
             f"it per group), got {list(self.curve_sizes)}"),
            (bool(self.curve_objectives) and all(o in CURVE_OBJECTIVES for o in self.curve_objectives)
             and len(set(self.curve_objectives)) == len(self.curve_objectives),
             f"--curve-objective must be one or more of {', '.join(CURVE_OBJECTIVES)}, each once, got "
             f"{list(self.curve_objectives)}"),
            (self.curves or self.curve_objectives == ("share",),
             "--curve-objective chooses how --curves candidates allocate: add --curves"),
            (self.curve_steps >= 1, f"--curve-steps must be >= 1 (stage-2 steps behind each point of a quality curve), got "
                                   f"{self.curve_steps}"),
            (self.screening in SCREENING_MEASURES,
             f"unknown --screening {self.screening!r}; choose from "
             + ", ".join(f"{key} ({m.name})" for key, m in SCREENING_MEASURES.items())),
            (self.finalists >= 1, f"--finalists must be >= 1, got {self.finalists}"),
            (self.fid_seeds >= 2, f"--fid-seeds must be >= 2 (the paired rule needs two pairs), got {self.fid_seeds}"),
            (self.fid_samples >= 2, f"--fid-samples must be >= 2 (FID needs two images), got {self.fid_samples}"),
            (self.batch >= 1, f"--batch must be >= 1, got {self.batch}"),
            (self.timing_repeats >= 1, f"timing_repeats must be >= 1, got {self.timing_repeats}"),
            (self.max_quality_loss is None or 0 <= self.max_quality_loss < math.inf,
             f"--max-quality-loss must be a finite number >= 0 (a relative loss, 0.02 = 2%), got {self.max_quality_loss}"),
            (self.price_per_hour is None or 0 <= self.price_per_hour < math.inf,
             f"--price-per-hour must be a finite number >= 0 (the machine's price per hour), got {self.price_per_hour}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def plan_settings(self) -> dict:
        """The settings that decide the candidates and their training (a rerun must keep them). Candidate kinds
        left at their defaults (none) are left out, so directories tuned before they existed still match."""
        optional = {"time_budgets": list(self.time_budgets), "uniform_time_budgets": list(self.uniform_time_budgets),
                    "depth": self.depth,
                    "curves": {"sizes": list(self.curve_sizes), "steps": self.curve_steps,
                               **({} if self.curve_objectives == ("share",) else
                                  {"objectives": list(self.curve_objectives)})} if self.curves else None}
        return {"tune_steps": self.tune_steps, "widths": list(self.widths), "ks": list(self.ks),
                "groups": list(self.groups), "groupings": list(self.groupings),
                "tdc_variants": [dict(v) for v in self.tdc_variants], **{k: v for k, v in optional.items() if v}}


TIME_BUDGET_K = 0.5  # the paper's slope behind the time-budget TDC candidates (mean_budget rescales it)


def plan_candidates(config: TuneConfig) -> list[dict]:
    """The candidates, in order: the base fine-tuned ("single"), each uniform width (FLOPs, then time), each TDC
    setting (the k grid, its curves twins when config.curves, then the time budgets; each with and without depth
    pruning when config.depth).

    Returns dicts with index, name, kind ("single", "uniform", "tdc"), dir (relative to the tune directory)
    and the kind's parameters: fraction and budget_unit ("flops" or "time") for uniform; settings, the TDC run's
    RunConfig overrides, for tdc and tdc-curves (fractions from measured curves at the formula's mean budget).
    Names say the unit where it is time ("uniform time 0.6", "TDC time 0.6 N=4 snr").
    """
    specs = [{"name": "single", "kind": "single"}]
    specs += [{"name": f"uniform {w:g}", "kind": "uniform", "fraction": w, "budget_unit": "flops"}
              for w in config.widths]
    specs += [{"name": f"uniform time {f:g}", "kind": "uniform", "fraction": f, "budget_unit": "time"}
              for f in config.uniform_time_budgets]
    variants = list(config.tdc_variants)
    if config.depth:
        variants += [{**v, "search.depth": True} for v in config.tdc_variants]
    for variant in variants:
        suffix = "".join(f" {key.rpartition('.')[2]}={value}" for key, value in variant.items())
        specs += [{"name": f"TDC k={k:g} N={n} {g}{suffix}", "kind": "tdc",
                   "settings": {"k": k, "groups": n, "grouping": g, **variant}}
                  for g in config.groupings for n in config.groups for k in config.ks]
        if config.curves:  # "share" specs carry no objective key: plans from before objectives still match
            specs += [{"name": f"TDC curves{'' if o == 'share' else ' ' + o} k={k:g} N={n} {g}{suffix}",
                       "kind": "tdc-curves", **({} if o == "share" else {"objective": o}),
                       "settings": {"k": k, "groups": n, "grouping": g, **variant}}
                      for o in config.curve_objectives
                      for g in config.groupings for n in config.groups for k in config.ks]
        specs += [{"name": f"TDC time {f:g} N={n} {g}{suffix}", "kind": "tdc",
                   "settings": {"budget_unit": "time", "mean_budget": f, "k": TIME_BUDGET_K, "groups": n,
                                "grouping": g, **variant}}
                  for g in config.groupings for n in config.groups for f in config.time_budgets]
    return [{"index": i, **s, "dir": f"candidates/{i:02d}-{slug(s['name'])}"} for i, s in enumerate(specs)]


def _curves_fractions(spec: dict, fractions: list[float] | None = None) -> dict:
    """The RunConfig overrides that give a "tdc-curves" candidate its groups' budgets from the curves (`fractions`;
    None: a stand-in of the right length, to validate its settings before the curves exist); the mean budget its
    variant may set is what the curves split, so it leaves the run. {} for other kinds."""
    if spec["kind"] != "tdc-curves":
        return {}
    return {"plan_fractions": fractions or [1.0] * spec["settings"]["groups"], "mean_budget": None}


def check_candidate(index: int, candidates: list[dict], plan_path: Path) -> None:
    """Raise ValueError unless `index` names one of `candidates` (the plan saved at plan_path)."""
    if not 0 <= index < len(candidates):
        raise ValueError(f"--candidate must be between 0 and {len(candidates) - 1} (the plan in {plan_path} has "
                         f"{len(candidates)}), got {index}")


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


def phases_of_others(chosen: dict, others: list[dict]) -> list[dict]:
    """The time/FLOPs records of every phase of the candidates other than the chosen one (result.json records),
    each shared quality-curves measurement counted once: curves are measured once per (N, grouping) and
    every "TDC curves" candidate of that pair carries the same record, the chosen one included."""
    counted = {json.dumps(chosen["phases"].get("curves"), sort_keys=True)}
    phases = []
    for record in others:
        for name, phase in record["phases"].items():
            if name == "curves":
                key = json.dumps(phase, sort_keys=True)
                if key in counted:
                    continue
                counted.add(key)
            phases.append(phase)
    return phases


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
        here = self.config.plan_settings()
        if saved is not None and saved["plan"] != here:
            # a candidate kind left at its default is absent from plan_settings: compare over both sides' keys
            differ = [f"{k}: {saved['plan'].get(k, 'unset')} there, {here.get(k, 'unset')} here"
                      for k in dict.fromkeys([*saved["plan"], *here]) if saved["plan"].get(k) != here.get(k)]
            raise ValueError(f"{self.dir} was tuned with other candidate settings ({'; '.join(differ)}); use a new "
                             f"--out, or delete {self.dir / 'tune.json'} and {self.dir / 'candidates'} to start over")
        self.candidates = plan_candidates(self.config)
        for spec in self.candidates:  # a bad TDC setting must fail now, not after stage 1 and other candidates
            if spec["kind"] in ("tdc", "tdc-curves"):
                settings = apply_overrides(self.base_run.config, {**spec["settings"], **_curves_fractions(spec)})
                settings.validate()
                if spec["kind"] == "tdc-curves" and settings.budget_unit == "time":
                    raise ValueError(f"{spec['name']}: --curves measures group sizes as fractions of the base's "
                                     "FLOPs, but its budget unit is time; drop budget_unit=time from the run or "
                                     "--variant, or leave out --curves")

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

        check_candidate(index, self.candidates, self.dir / "candidates.json")
        spec = self.candidates[index]
        done = self.result(index)
        if done is not None:
            measure = done.get("allocations", {"measure": None}).get("measure", "bpd")  # before the loss: bits/dim
            self.say(f"[{index}] {spec['name']}: finished earlier, skipped"
                     + (f" (its groups' budgets were allocated by {measure} curves, not {self.config.screening}; "
                        f"delete {self.dir / spec['dir']} to allocate them again)"
                        if measure not in (None, self.config.screening) else ""))
            return done
        self.write_plan()
        self.ensure_base()
        out = self.dir / spec["dir"]
        try:
            run = {"tdc": self._tdc, "tdc-curves": self._tdc_curves}.get(spec["kind"], self._one_model)
            record = run(spec, out)
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
        from .prune.fit import fit_to_measured_time
        from .prune.units import uniform_proposal
        from .serialization import load_model, save_model
        from .train import FINAL_DIR, step_flops, train

        run, i = self.base_run, spec["index"]
        shape, base_flops = run.sample_shape, self.base_flops()
        start = _clock()
        measured = {}  # uniform time: the fitted model's measured and estimated time ratios
        if spec["kind"] == "uniform":
            by_time = spec.get("budget_unit") == "time"
            if not (out / "pruned").exists():
                unit = "measured forward time" if by_time else "FLOPs"
                self.say(f"[{i}] {spec['name']}: pruning to {spec['fraction']:.0%} of the base's {unit}")
                base = run.base_model()
                if by_time:  # fitted and corrected against measured time, as run.prune does TDC's time budgets
                    batch = run.config.latency_batch
                    timed = fit_to_measured_time(base, uniform_proposal(base), spec["fraction"], shape, batch,
                                                 run.latency_table(base))
                    fit = timed.fit
                    atomic_write_text(out / "time.json", json.dumps({
                        "time_ratio": timed.time_ratio, "estimated_time_ratio": timed.trail[0]["estimated_ratio"],
                        "time_corrections": timed.trail, "latency_batch": batch}))
                else:
                    fit = self._uniform_fit(base, spec["fraction"])
                save_model(fit.model, out / "pruned")
            model = load_model(out / "pruned")
            measured = _read_json(out / "time.json", {})
        else:
            model = run.base_model()
        search = _since(start)
        flops = count_flops(model, shape)
        c = run.config
        config = c.finetune.plain(seed=c.seed * 100, label_dropout=c.finetune.label_dropout or c.base.label_dropout,
                                  null_class=run.null_class(model))
        steps = max(1, round(self.budget_flops() / step_flops(model, shape, config)))
        config = replace(config, steps=steps)
        self.say(f"[{i}] {spec['name']}: stage 2, {steps} steps on all timesteps ({flops / base_flops:.0%} FLOPs)")
        start = _clock()
        trained = train(model, run.split()[0], run.scheduler, config, out / "train", labels=run.labels(model)[0],
                        progress=self.progress, description=f"tune {spec['name']}")
        stage2 = _since(start, trained.train_flops)
        expert = load_model(out / "train" / FINAL_DIR)
        grouping = make_groups("uniform", 1, run.scheduler)
        save_bundle(out / "bundle", [expert], grouping, run.scheduler, sample_shape=shape, expert_flops=[flops],
                    base_flops=base_flops, expert_training=[{"steps": steps, "final_loss": trained.final_loss}],
                    provenance={"tune": spec, "data": run.data.describe(), "training_flops": trained.train_flops},
                    conditioning=run.conditioning(expert))
        return {"bundle": "bundle", "train_flops": trained.train_flops, "steps": steps, **measured,
                "phases": {"search": search if spec["kind"] == "uniform" else None, "stage2": stage2}}

    def _tdc(self, spec: dict, out: Path, plan_fractions: list[float] | None = None, spent_flops: int = 0) -> dict:
        """A TDC run directory sharing the base: plan + pruning search, then stage 2 cut to the budget.

        plan_fractions: the groups' budgets given explicitly (RunConfig.plan_fractions) instead of the formula.
        spent_flops: training FLOPs the candidate already spent (its curves): stage 2 gets the rest of the budget.
        Raises BudgetError when nothing of the budget is left for stage 2.
        """
        from .prune.fit import BudgetError
        from .run import Run, copy_stages
        from .serialization import load_model
        from .train import step_flops

        i = spec["index"]
        copy_stages(self.base_run.dir, out, ("config.json", "base"))
        run = Run(out, overrides={**spec["settings"], **_curves_fractions(spec, plan_fractions)}, progress=self.progress)
        c = run.config
        self.say(f"[{i}] {spec['name']}: plan and pruning search")
        start = _clock()
        summaries = run.prune()
        search = _since(start)
        # What train() will count per step (a teacher's forward and feature projections included), so stage 2's
        # FLOPs stay on budget whatever the distillation settings.
        teacher = run.base_model() if c.finetune.uses_teacher else None
        per_step = sum(step_flops(load_model(out / "prune" / f"group_{s['group']}"), run.sample_shape, c.finetune,
                                  teacher) for s in summaries)
        left = self.budget_flops() - spent_flops
        if left < per_step / 2:
            raise BudgetError(f"the curves cost {spent_flops:.3g} training FLOPs, the whole budget of "
                              f"{self.budget_flops():.3g}: nothing is left for stage 2; raise --tune-steps or lower "
                              "--curve-steps")
        steps = max(1, round(left / per_step))
        self.say(f"[{i}] {spec['name']}: stage 2, {steps} steps per group")
        run = Run(out, overrides={"finetune.steps": steps}, progress=self.progress)
        start = _clock()
        run.finetune()
        run.export_bundle()
        flops = sum(run.training_flops()["stage2_per_group"])
        return {"bundle": "bundle", "train_flops": flops + spent_flops, "steps": steps,
                "phases": {"search": search, "stage2": _since(start, flops)}}

    def _tdc_curves(self, spec: dict, out: Path) -> dict:
        """A TDC candidate whose groups' budgets come from measured quality curves (curves_allocation); the
        curves' training counts in its compute. Its record holds the curves and both allocations."""
        curves, allocations = self.curves_allocation(spec)
        self.say(f"[{spec['index']}] {spec['name']}: paper fractions "
                 f"{[round(f, 3) for f in allocations['paper']['fractions']]}, from {curves['measure']} curves "
                 f"({allocations['objective']}) "
                 f"{allocations['curves']['fractions']} (mean budget {allocations['budget']:.3f})")
        record = self._tdc(spec, out, plan_fractions=allocations["curves"]["fractions"],
                           spent_flops=curves["train_flops"])
        record["phases"]["curves"] = curves["phases"]
        record["curves"] = curves["points"]
        record["allocations"] = allocations
        return record

    def curves_allocation(self, spec: dict) -> tuple[dict, dict]:
        """The groups' budgets of "tdc-curves" candidate `spec` at the mean budget of the paper's formula for the
        same k, N and grouping (scaled to the variant's mean_budget where it sets one), split by the quality
        curves of the screening measure (TuneConfig.screening; measure_curves, measured when not cached):
        budget.allocate_from_curves.

        Returns (curves, allocations): measure_curves' dict, and {"budget", "paper": {"fractions",
        "mean_fraction", "curve_loss"}, "curves": the same for the curves' split, "measure" (the screening key),
        "loss" (what curve_loss sums)}; each allocation priced on the curves (curve_loss; None with
        "curve_loss_missing" when a paper fraction lies outside the measured sizes).
        """
        from .budget import allocate_from_curves, curve_loss, make_plan
        from .grouping import Grouping
        from .run import apply_overrides

        c = apply_overrides(self.base_run.config, spec["settings"])
        curves = self.measure_curves(c.groups, c.grouping)
        grouping = Grouping.from_dict(curves["grouping"])
        paper = make_plan(grouping, k=c.k, ordering=c.ordering, base_flops=self.base_flops(),
                          sample_shape=self.base_run.sample_shape, sensitivity=curves["sensitivity"],
                          mean_budget=c.mean_budget)
        weights = [g.size / grouping.num_train_timesteps for g in grouping.groups]
        objective = spec.get("objective", "share")
        points = curve_objective_points(curves, weights, objective)
        chosen = allocate_from_curves(points, weights, paper.mean_fraction)
        try:
            paper_loss, why = curve_loss(points, paper.fractions), None
        except ValueError as err:  # a paper fraction outside the measured sizes
            paper_loss, why = None, str(err)
        return curves, {
            "budget": paper.mean_fraction,
            "paper": {"fractions": paper.fractions, "mean_fraction": paper.mean_fraction, "curve_loss": paper_loss,
                      **({"curve_loss_missing": why} if why else {})},
            "curves": {"fractions": chosen.fractions, "mean_fraction": chosen.mean_fraction, "curve_loss": chosen.loss},
            "measure": curves["measure"],
            "objective": objective,
            "loss": CURVE_OBJECTIVES[objective].format(measure=CURVE_MEASURES[curves["measure"]])
                    + " (interpolated between measured sizes for the paper's fractions)",
        }

    def _uniform_fit(self, base, fraction: float):
        """base pruned uniformly (prune.fit.fit_to_budget) to `fraction` of its FLOPs."""
        from .prune.fit import fit_to_budget
        from .prune.units import uniform_proposal

        return fit_to_budget(base, uniform_proposal(base), round(fraction * self.base_flops()), self.base_run.sample_shape)

    def measure_curves(self, groups: int, grouping: str) -> dict:
        """Quality against size per timestep group, for the `groups` groups of `grouping`, in both screening
        measures; cached in curves/N{groups}-{grouping}/curves.json (the pruned sizes in curves/sizes/, shared).

        For each size in TuneConfig.curve_sizes (fraction of the base's FLOPs; uniform pruning as the uniform
        candidates get, 1.0 = the base) and each group, the model is trained curve_steps stage-2 steps on the
        group's timesteps (the expert: curves/.../train/size-{size}-group-{g}/final). Its quality there is its
        group's share of each screening measure minus the base's share, paired per image (same images,
        timesteps and noise as the screening): "loss" (loss_shares: the group's measured timesteps' part of the
        all-point mean held-out loss) and "bpd" (the group's terms of the bits/dim bound, likelihood.nll_bound).
        Both add up over groups, as budget.allocate_from_curves needs: with one expert per group, as a router runs
        them, the experts' loss shares add up to the router's held-out loss, their bits/dim shares to its bound's
        timestep terms.
        Sizes pruning cannot reach (BudgetError) are left out and named in "skipped".

        A cache lacking a measure (a file from before the loss was measured has bits/dim only) gets it measured
        on the experts' saved weights, without training them again; only when those are gone is everything
        measured (and trained) again.

        Returns {"format", "grouping", "sensitivity", "sizes", "skipped", "steps", "measures" (the keys measured),
        "measure" (TuneConfig.screening: the key "loss", "se", "share" and "base_shares" are of), "points": per
        group [{"fraction", "flops_ratio", "loss", "se", "share", and per measure key "{key}_gap": {"mean", "se"},
        "{key}_share"}], "base_shares", "base_{key}_shares" (per group, the base's mean share), "train_flops",
        "phases"} (and "remeasured": the time a later measure took), as curves.json holds it.
        """
        from .flops import count_flops
        from .likelihood import nll_bound
        from .prune.fit import BudgetError
        from .run import Run, copy_stages
        from .serialization import load_model, save_model
        from .train import FINAL_DIR, train

        out = self.dir / "curves" / f"N{groups}-{slug(grouping)}"
        cached = _read_json(out / "curves.json")
        curves = None if cached is None else _curves_upgraded(cached)
        missing = list(SCREENING_MEASURES) if curves is None else [k for k in SCREENING_MEASURES
                                                                      if k not in curves["measures"]]

        def expert_dir(size: float, g: int) -> Path:
            return out / "train" / f"size-{size:g}-group-{g}"

        if curves is not None and missing and not all((expert_dir(p["fraction"], g) / FINAL_DIR).exists()
                                                      for g, group in enumerate(curves["points"]) for p in group):
            self.say(f"curves: N={groups} {grouping}: the curve experts' weights are gone, so their "
                     f"{', '.join(missing)} cannot be measured; measuring the curves again")
            curves, missing = None, list(SCREENING_MEASURES)

        def settled(curves: dict) -> dict:  # the screening measure's view, written when it changed
            curves = _curves_for(curves, self.config.screening)
            if curves != cached:
                atomic_write_text(out / "curves.json", json.dumps(curves, indent=2))
            return curves

        if not missing:
            return settled(curves)
        start = _clock()
        copy_stages(self.base_run.dir, out, ("config.json", "base"))
        # ordering "measured" so the plan carries the groups' sensitivity: the paper's fractions for any k follow
        run = Run(out, overrides={"groups": groups, "grouping": grouping, "ordering": "measured"},
                  progress=self.progress)
        plan, c = run.plan(), run.config
        base = run.base_model()
        train_images, held_out = run.split()
        train_labels, held_labels = run.labels(base)
        n = HELD_OUT_IMAGES

        def shares(model, key: str) -> torch.Tensor:  # [M images, N groups]: the model's shares of measure key
            if key == "loss":
                points, losses = _held_out_losses(model, held_out, run.scheduler, seed=c.seed, labels=held_labels)
                return loss_shares(points, losses, plan.grouping)
            return nll_bound(model, held_out[:n], run.scheduler, grouping=plan.grouping, samples=BPD_SAMPLES,
                             seed=c.seed, labels=None if held_labels is None else held_labels[:n]).groups

        base_shares = {key: shares(base, key) for key in missing}

        def measured(expert, g: int) -> dict:
            point = {}
            for key in missing:
                share = shares(expert, key)[:, g]
                point[f"{key}_gap"] = paired(share.tolist(), base_shares[key][:, g].tolist())
                point[f"{key}_share"] = float(share.mean())
            return point

        if curves is not None:
            self.say(f"curves: N={groups} {grouping}: measuring {', '.join(missing)} on the curve experts "
                     "trained earlier")
            for g, group in enumerate(curves["points"]):
                for point in group:
                    point.update(measured(load_model(expert_dir(point["fraction"], g) / FINAL_DIR), g))
            curves = {**curves, "measures": [k for k in SCREENING_MEASURES if k in curves["measures"] + missing],
                      **{f"base_{key}_shares": [float(v) for v in base_shares[key].mean(0)] for key in missing},
                      "remeasured": {"measures": missing, **_since(start)}}
        else:
            points, skipped, flops = [[] for _ in range(groups)], {}, 0
            for size in self.config.curve_sizes:
                sized = self.dir / "curves" / "sizes" / f"{size:g}"
                if size < 1 and not sized.exists():
                    self.say(f"curves: pruning the base to {size:.0%} of its FLOPs")
                    try:
                        save_model(self._uniform_fit(base, size).model, sized)
                    except BudgetError as err:
                        skipped[f"{size:g}"] = str(err)
                        continue
                for g in range(groups):
                    model = load_model(sized) if size < 1 else run.base_model()
                    config = c.finetune.plain(steps=self.config.curve_steps, checkpoint_every=self.config.curve_steps,
                                              seed=c.seed * 100 + g + 1,
                                              label_dropout=c.finetune.label_dropout or c.base.label_dropout,
                                              null_class=run.null_class(model))
                    self.say(f"curves: N={groups} {grouping}: group {g} at {size:g} of the base, {config.steps} steps")
                    trained = train(model, train_images, run.scheduler, config, expert_dir(size, g),
                                    labels=train_labels, timesteps=plan.grouping.timesteps(g), progress=self.progress,
                                    description=f"curve group {g} size {size:g}")
                    flops += trained.train_flops
                    expert = load_model(expert_dir(size, g) / FINAL_DIR)
                    points[g].append({"fraction": size, "flops_ratio": count_flops(expert, run.sample_shape)
                                      / plan.base_flops, **measured(expert, g)})
            if not points[0]:
                raise BudgetError(f"no curve size could be pruned ({skipped}); give curve sizes the model can "
                                  "reach, e.g. include 1.0")
            curves = {"format": CURVES_FORMAT, "grouping": plan.grouping.to_dict(), "sensitivity": plan.sensitivity,
                      "sizes": list(self.config.curve_sizes), "skipped": skipped, "steps": self.config.curve_steps,
                      "measures": list(SCREENING_MEASURES), "points": points,
                      **{f"base_{key}_shares": [float(v) for v in base_shares[key].mean(0)] for key in missing},
                      "train_flops": flops, "phases": _since(start, flops)}
        return settled(curves)

    # -- measuring -----------------------------------------------------------------------------------------------
    def models(self) -> dict:
        """name -> (Router, sampling FLOPs per image) for the base and every finished, not failed candidate."""
        from .bundle import load_bundle
        from .grouping import make_groups
        from .router import Router
        from .samplers import visited_timesteps

        run, c = self.base_run, self.base_run.config
        visited = visited_timesteps(c.sampling_steps, run.scheduler.config.num_train_timesteps)
        base = Router([run.base_model()], make_groups("uniform", 1, run.scheduler), [self.base_flops()])
        models = {"base": (base.eval(), base.trajectory_flops(visited))}
        for spec in self.candidates:
            record = self.result(spec["index"])
            if record is not None and "failed" not in record:
                router = load_bundle(self.dir / spec["dir"] / record["bundle"]).router.eval()
                models[spec["name"]] = (router, router.trajectory_flops(visited))
        return models

    def model_ids(self) -> dict:
        """name -> the identity of the weights a cached measurement belongs to: for the base a sha256 over its
        saved files' sha256s, for a candidate the sha256 of its bundle manifest's file list (every file's size and sha256).
        A candidate trained again (its directory deleted, or other settings) gets a new identity, so values
        cached under its name are measured again rather than reused."""
        import hashlib

        from .files import sha256_tree
        from .train import FINAL_DIR

        ids = {"base": sha256_tree(self.base_run.dir / "base" / FINAL_DIR)}
        for spec in self.candidates:
            record = self.result(spec["index"])
            if record is not None and "failed" not in record:
                manifest = json.loads((self.dir / spec["dir"] / record["bundle"] / "manifest.json").read_text())
                ids[spec["name"]] = hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()
        return ids

    def screen_protocol(self, key: str) -> dict:
        """How measure `key` (of SCREENING_MEASURES) screens: its name and settings (timesteps or strata), the
        held-out images it uses and the seed of their noise."""
        measure = SCREENING_MEASURES[key]
        return {"name": measure.name, **measure.settings,
                "images": min(len(self.base_run.split()[1]), HELD_OUT_IMAGES), "seed": self.base_run.config.seed}

    def _screening_cache(self) -> dict:
        """screening.json's measures whose protocol still holds (key -> {"protocol", "unit", "values"}); a file
        of an older layout holds no model identities and is measured again."""
        cache = _read_json(self.dir / "screening.json", {})
        measures = cache["measures"] if cache.get("format") == SCREENING_FORMAT else {}
        return {key: m for key, m in measures.items()
                if key in SCREENING_MEASURES and m["protocol"] == self.screen_protocol(key)}

    def screen(self, models: dict) -> dict:
        """Every screening measure (SCREENING_MEASURES) of every model, paired: the same held-out images,
        timesteps and noise for all (the run's seed). Cached in screening.json per measure with its protocol and
        each value with its model's identity (model_ids): a model or measure not measured under the current
        protocol, or measured on other weights, is measured, the rest reused.

        Returns name -> {key: {"value", "se", "per_image", "vs_base": {"mean", "se"} (value - the base's, image by
        image)} for each key of SCREENING_MEASURES}.
        """
        _, held_out = self.base_run.split()
        seed, scheduler = self.base_run.config.seed, self.base_run.scheduler
        measures = self._screening_cache()
        for key, measure in SCREENING_MEASURES.items():
            measures.setdefault(key, {"protocol": self.screen_protocol(key), "unit": measure.unit, "values": {}})
        ids = self.model_ids()
        missing = [name for name in models
                   if any(m["values"].get(name, {}).get("model") != ids[name] for m in measures.values())]
        if missing:
            start = _clock()
            for name in missing:
                model = models[name][0]
                labels = self.base_run.labels(model)[1]
                said = []
                for key, measure in SCREENING_MEASURES.items():
                    values = measures[key]["values"]
                    if values.get(name, {}).get("model") != ids[name]:
                        values[name] = {**measure.measure(model, held_out, scheduler, seed=seed, labels=labels),
                                        "model": ids[name]}
                    d = measure.decimals
                    said.append(f"{measure.name} {values[name]['value']:.{d}f} ± {values[name]['se']:.{d}f}")
                self.say(f"screening: {name}: {', '.join(said)}")
            atomic_write_text(self.dir / "screening.json",
                              json.dumps({"format": SCREENING_FORMAT, "measures": measures}, indent=2))
            self._record_phase("screening", _since(start))
        return {name: {key: {**m["values"][name], "vs_base": paired(m["values"][name]["per_image"],
                                                                     m["values"]["base"]["per_image"])}
                       for key, m in measures.items()}
                for name in models}

    def fid(self, models: dict, names: list[str]) -> dict:
        """Per-seed FID/KID of the base and `names` (tdcdiff.evaluate.evaluate), cached per protocol and model
        identity (model_ids)."""
        from .evaluate import ModelEntry, evaluate

        run, c, t = self.base_run, self.base_run.config, self.config
        protocol = {"sampler": c.sampler, "steps": c.sampling_steps, "samples": t.fid_samples,
                    "seeds": list(range(t.fid_seeds))}
        cache = _read_json(self.dir / "fid.json", {})
        if cache.get("protocol") != protocol:
            cache = {"protocol": protocol, "models": {}}
        ids = self.model_ids()
        missing = [n for n in ["base", *names] if cache["models"].get(n, {}).get("model") != ids[n]]
        if missing:
            self.say(f"finalists: FID/KID over {t.fid_seeds} seeds x {t.fid_samples} images: {', '.join(missing)}")
            start = _clock()
            entries = [ModelEntry(n, models[n][0], 0) for n in missing]
            result = evaluate(entries, run.scheduler, run.data.images, run.data.labels, sample_shape=run.sample_shape,
                              sampler=c.sampler, steps=c.sampling_steps, num_samples=t.fid_samples,
                              seeds=tuple(range(t.fid_seeds)), reference_name=Path(run.data.name).name, timing_batches=(1,),
                              timing_repeats=1, num_classes=run.data.num_classes, progress=self.progress)
            for record in result["models"]:
                cache["models"][record["name"]] = {"fid": [f["fid"] for f in record["fid"]["per_seed"]],
                                                   "kid": [f["kid_mean"] for f in record["fid"]["per_seed"]],
                                                   "model": ids[record["name"]]}
            cache["feature_net"] = result["protocol"]["feature_net"]
            cache["reference"] = result["protocol"]["reference"]
            atomic_write_text(self.dir / "fid.json", json.dumps(cache, indent=2))
            self._record_phase("finalists", _since(start))
        return cache

    def time_models(self, models: dict, names: list[str], batch: int) -> dict:
        """Median seconds of one full sampling run at `batch` per model (evaluate.time_sampling: interleaved, after
        a warm-up; class-balanced labels for a class-conditional base); thread CPU seconds with one thread on a CPU,
        wall seconds on a GPU."""
        from .evaluate import time_sampling
        from .pipeline import SamplingModel

        c = self.base_run.config
        times = time_sampling([SamplingModel(models[n][0]) for n in names], self.base_run.scheduler,
                              sample_shape=self.base_run.sample_shape, sampler=c.sampler, steps=c.sampling_steps,
                              batch=batch, repeats=self.config.timing_repeats, num_classes=self.base_run.data.num_classes)
        return dict(zip(names, times))

    # -- everything -------------------------------------------------------------------------------------------
    def run_all(self) -> dict:
        """Every candidate (finished ones skipped), screening, finalists' FID, the frontier, the choice, the cost
        table; returns the results dict (also in results.json)."""
        from .evaluate import TIMING_CLOCK
        from .metrics import paired_gap

        self.write_plan()
        self.ensure_base()
        for spec in self.candidates:
            self.run_candidate(spec["index"])
        models = self.models()
        key, other = self.config.screening, second_measure(self.config.screening)
        screening = self.screen(models)
        base = screening["base"]
        candidates = [n for n in models if n != "base"]
        finalists = sorted(candidates, key=lambda n: screening[n][key]["value"])[: self.config.finalists]
        fid = self.fid(models, finalists)
        batch = self.config.batch
        self.say(f"timing: sampling at batch {batch}, {len(models)} models interleaved")
        times = self.time_models(models, list(models), batch)

        rows = []
        for name, (_, flops) in models.items():
            record = next((self.result(s["index"]) for s in self.candidates if s["name"] == name), None)
            scores, ranked, beside = fid["models"].get(name), screening[name][key], screening[name][other]
            gap = (paired_gap(fid["models"]["base"]["fid"], scores["fid"]) if scores is not None and name != "base"
                   else None)
            rows.append({
                "name": name, "kind": record["kind"] if record else "base", "index": record["index"] if record else None,
                "sampling_flops": flops, "flops_ratio": flops / models["base"][1],
                "time_s": times[name], "time_ratio": times[name] / times["base"],
                "screening": ranked["value"], "screening_se": ranked["se"], "screening_gap": ranked["vs_base"],
                "quality_ratio": ranked["value"] / base[key]["value"],
                "second": beside["value"], "second_se": beside["se"], "second_gap": beside["vs_base"],
                "second_ratio": beside["value"] / base[other]["value"],
                "fid": scores["fid"] if scores else None, "kid": scores["kid"] if scores else None,
                "fid_gap": {k: (list(v) if isinstance(v, tuple) else v) for k, v in gap.items()} if gap else None,
                "train_flops": record["train_flops"] if record else 0,
                "bundle": str(self.dir / record["dir"] / record["bundle"]) if record else None,
            })
        failed = [{"name": s["name"], "failed": r["failed"]} for s in self.candidates
                  if (r := self.result(s["index"])) is not None and "failed" in r]
        choice = choose([r for r in rows if r["name"] != "base"], self.config.max_quality_loss)
        results = {
            "format": "tdcdiff-tune/2",  # /2: rows' second measure ("second", ...) and screening_measure's "key"
            "settings": asdict(self.config),
            "screening_measure": {"key": key, "unit": SCREENING_MEASURES[key].unit, **self.screen_protocol(key),
                                  "paired": "screening_gap (second_gap): each model's value minus the base's, image "
                                            "by image, with its standard error (same images, timesteps and noise for "
                                            "every model)",
                                  "second": {"key": other, "unit": SCREENING_MEASURES[other].unit,
                                             **self.screen_protocol(other)}},
            "fid_protocol": {k: fid.get(k) for k in ("protocol", "feature_net", "reference")},
            "time": f"median seconds ({TIMING_CLOCK}, as evaluate.time_sampling picks it by the models' device) of "
                    f"one {self.base_run.config.sampler}-{self.base_run.config.sampling_steps} sampling run at batch "
                    f"{batch}, {self.config.timing_repeats} repeats interleaved across models after a warm-up",
            "compute": f"every candidate: {self.budget_flops():.4g} training FLOPs ({self.config.tune_steps} stage-2 "
                       "steps of the base); the pruning search's proxy forwards are not counted",
            "rows": rows, "failed": failed, "finalists": finalists, "choice": choice,
        }
        atomic_write_text(self.dir / "results.json", json.dumps(results, indent=2))
        write_table_csv(rows, self.dir / "table.csv", key)
        plot_frontier(rows, choice["name"], batch, SCREENING_MEASURES[key].name, self.dir / "frontier.png")
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
            {"phase": "search (chosen)", **total([mine["phases"]["search"], mine["phases"].get("curves")]),
             "note": "pruning search" + (" + quality curves (their training)" if "curves" in mine["phases"] else "")
                     + "; proxy FLOPs not counted"},
            {"phase": "stage 2 (chosen)", **total([mine["phases"]["stage2"]]), "note": "fine-tuning"},
            {"phase": "tuning (other candidates)", **total(phases_of_others(mine, others)),
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


def table_rows(rows: list[dict], chosen: str | None, screening: str = "loss") -> list[dict[str, str]]:
    """The frontier table as strings, fastest first (the base first of all). screening: the key (of
    SCREENING_MEASURES) of the measure the rows were ranked by; the other is the rows' second measure."""
    ranked, beside = SCREENING_MEASURES[screening], SCREENING_MEASURES[second_measure(screening)]
    d, e = ranked.decimals, beside.decimals
    ordered = sorted(rows, key=lambda r: (r["name"] != "base", r["time_s"]))
    return [{"": "*" if r["name"] == chosen else "", "model": r["name"],
             "FLOPs": f"{r['flops_ratio']:.2f}x", "time": f"{r['time_s']:.3f} s ({r['time_ratio']:.2f}x)",
             ranked.label: f"{r['screening']:.{d}f} ± {r['screening_se']:.{d}f}",
             "- base (paired)": f"{r['screening_gap']['mean']:+.{d}f} ± {r['screening_gap']['se']:.{d}f}",
             f"{beside.label} (- base, paired)":
                 f"{r['second']:.{e}f} ({r['second_gap']['mean']:+.{e}f} ± {r['second_gap']['se']:.{e}f})",
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


def write_table_csv(rows: list[dict], path: Path, screening: str = "loss") -> Path:
    """The frontier table (results.json rows) as CSV; screening: the key of the measure they were ranked by,
    written in the screening_measure column (second_measure: the other one's)."""
    import csv

    keys = ["name", "kind", "sampling_flops", "flops_ratio", "time_s", "time_ratio", "screening_measure", "screening",
            "screening_se", "screening_gap_mean", "screening_gap_se", "quality_ratio", "second_measure", "second",
            "second_se", "second_gap_mean", "second_gap_se", "second_ratio", "fid_mean", "fid_gap_mean", "fid_gap_low",
            "fid_gap_high", "fid_tie", "train_flops"]
    measures = {"screening_measure": screening, "second_measure": second_measure(screening)}
    with _AtomicText(path) as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            gap = r["fid_gap"] or {}
            writer.writerow({**r, **measures, **{f"{m}_gap_{k}": r[f"{m}_gap"][k] for m in ("screening", "second")
                                                 for k in ("mean", "se")},
                             "fid_mean": sum(r["fid"]) / len(r["fid"]) if r["fid"] else "",
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
    styles = {"base": ("k", "*"), "single": ("tab:gray", "s"), "uniform": ("tab:blue", "o"), "tdc": ("tab:red", "^"),
              "tdc-curves": ("tab:purple", "v")}
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
