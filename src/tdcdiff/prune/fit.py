"""Budget fitting: repair a proposed decision so the pruned model meets a budget.

The budget is in FLOPs (measured on each trial model), or in forward time estimated from a latency table
(latency.LatencyTable: base time + per-unit changes; no trial model is built). Depth units of a decision
(surgery/depth.py) stay as proposed, except that removals are undone, last first, while the layers removed
alone already undershoot the budget; the width ratios are then scaled to fit. With a time budget,
`fit_to_measured_time` then times the fit directly and corrects the budget where the estimate missed.
`uniform_fit` is the uniform-pruning baseline on top of both: one global width ratio, to a fraction of the base's
FLOPs or measured time.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..flops import count_flops
from ..latency import ExpertTimer, default_cache_dir, measure_table, one_thread
from ..models import as_denoiser, network
from ..surgery import depth
from .engine import prune_kept, reduced_base
from .importance import BY_POSITION, Calibration, check_importance
from .plan import PruningPlan, kept_slots, plan_for
from .units import MAX_RATIO, Decision, check_decision, prunable_units, uniform_decision


@dataclass
class FitResult:
    """A pruned model that fits a budget.

    model: the pruned deep copy. decision: the repaired decision actually applied (every width unit, and
    every depth unit the proposal named). flops: its measured FLOPs (count_flops, batch 1). budget: the
    target (FLOPs, or seconds with a latency table). scale: the common multiplier the bisection applied to
    the proposed ratios (before any per-unit repair). seconds: the table's time estimate (None without one).
    """

    model: nn.Module
    decision: Decision
    flops: int
    budget: float
    scale: float
    seconds: float | None = None


class BudgetError(ValueError):
    """No decision reachable by pruning lands within tolerance of the budget."""


def unit_levels(plan: PruningPlan, unit: str) -> list[float]:
    """One ratio per distinct channel configuration of a unit, ascending, each safely inside its interval."""
    slots = {g.slots for g in plan.groups if g.unit == unit}
    # Where round(s * (1 - r)) drops from j to j - 1 channels per norm group.
    cuts = sorted({c for s in slots for j in range(2, s + 1) if 0.0 < (c := 1.0 - (j - 0.5) / s) < MAX_RATIO})
    if not cuts:
        return [0.0]
    # The last level keeps one channel per norm group: name it by that ratio (1 - 1/s) where it is allowed.
    last = min(MAX_RATIO, max(1.0 - 1.0 / s for s in slots))
    return [0.0] + [(a + b) / 2 for a, b in zip(cuts, cuts[1:])] + [last]


def _estimator(base: nn.Module, sample_shape, latency, space: dict):
    """cost(plan, width decision, removed depth units): FLOPs measured on a trial model, or with a latency
    table its time estimate, each width ratio looked up as the full base's level with the same channels."""
    if latency is None:

        def flops(plan: PruningPlan, width: Decision, removed: list[str]) -> float:
            trial = prune_kept(reduced_base(base, removed), plan, plan.kept(width), sample_shape, BY_POSITION, None)
            return count_flops(as_denoiser(trial), sample_shape)

        return flops
    full = plan_for(network(base), sample_shape, **space)
    levels = {u.name: unit_levels(full, u.name) for u in full.units}

    def level(unit: str, ratio: float) -> float:
        groups = [g for g in full.groups if g.unit == unit]
        kept = [kept_slots(ratio, g.slots) for g in groups]
        return next((v for v in levels[unit] if [kept_slots(v, g.slots) for g in groups] == kept), ratio)

    def seconds(plan: PruningPlan, width: Decision, removed: list[str]) -> float:
        # A unit the table lacks has no reachable level: its ratio changes nothing.
        chosen = {u: level(u, r) for u, r in width.items() if u in levels and u in latency.deltas}
        return latency.estimate({**chosen, **dict.fromkeys(removed, 1.0)})

    return seconds


class _BudgetSearch:
    """Measures the cost of trial width decisions (once per distinct pruned shape) and keeps the closest."""

    def __init__(self, cost, plan: PruningPlan, removed: list[str], budget: float, tolerance: float):
        self.cost_of, self.plan, self.removed = cost, plan, removed
        self.budget, self.tolerance = budget, tolerance
        self.measured: dict[tuple[int, ...], float] = {}
        self.best: Decision | None = None
        self.best_flops = 0

    def flops(self, decision: Decision) -> float:
        """The decision's cost (FLOPs or estimated seconds; the name is historical)."""
        kept = self.plan.kept(decision)
        if kept not in self.measured:
            self.measured[kept] = self.cost_of(self.plan, decision, self.removed)
        flops = self.measured[kept]
        if self.best is None or self.error(flops) < self.error(self.best_flops):
            self.best, self.best_flops = decision, flops
        return flops

    def error(self, flops: int) -> float:
        return abs(flops - self.budget) / self.budget

    def fits(self) -> bool:
        return self.best is not None and self.error(self.best_flops) <= self.tolerance

    def bisect(self, shape: Decision, max_iter: int) -> float:
        """Bisection on a common scale of the proposed ratios; returns the scale of the closest trial."""
        best_scale = 0.0

        def flops_at(scale: float) -> int:
            nonlocal best_scale
            trial = {name: min(MAX_RATIO, scale * r) for name, r in shape.items()}
            flops = self.flops(trial)
            if self.best is trial:
                best_scale = scale
            return flops

        positive = [r for r in shape.values() if r > 0]
        # Up to `top` the ratios keep their proportions; beyond it the largest ones saturate at MAX_RATIO.
        top = MAX_RATIO / max(positive)
        lo, hi = 0.0, top
        if flops_at(top) > self.budget:
            lo, hi = top, MAX_RATIO / min(positive)
            if flops_at(hi) > self.budget:
                return best_scale  # even full saturation is too big; refine() may still prune other units
        for _ in range(max_iter):
            if self.fits():
                break
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if flops_at(mid) > self.budget else (lo, mid)
        return best_scale

    def refine(self) -> None:
        """Greedy repair from the closest trial, in channel levels of single units (see unit_levels).

        Moves one unit one level toward the budget while that gets closer. When stuck, measures every unit
        one and two levels either way and jumps to the combination whose summed FLOPs changes land closest
        to the budget with the fewest level changes. Stops within tolerance, or when nothing gets closer.
        """
        levels = {u.name: unit_levels(self.plan, u.name) for u in self.plan.units}

        def config(name: str, ratio: float) -> tuple[int, ...]:
            return tuple(kept_slots(ratio, g.slots) for g in self.plan.groups if g.unit == name)

        def nearest(name: str) -> int:
            """The level with the closest trial's pruned shapes (nearest, should a ratio sit on a cut)."""
            now = config(name, self.best[name])
            return min(
                range(len(levels[name])),
                key=lambda i: sum(abs(a - b) for a, b in zip(config(name, levels[name][i]), now)),
            )

        index = {name: nearest(name) for name in levels}

        def measure(moves: dict[str, int]) -> int | None:
            """FLOPs with some units moved by some levels (None if a move leaves the range)."""
            trial = {name: index[name] + moves.get(name, 0) for name in levels}
            if not all(0 <= i < len(levels[name]) for name, i in trial.items()):
                return None
            return self.flops({name: levels[name][i] for name, i in trial.items()})

        while not self.fits():
            before, start = self.error(self.best_flops), self.best_flops
            step = 1 if start > self.budget else -1  # a higher level prunes more
            singles = {name: measure({name: step}) for name in levels}
            closer = {name: f for name, f in singles.items() if f is not None and self.error(f) < before}
            if closer:
                name = min(closer, key=lambda n: self.error(closer[n]))
                index[name] += step
                continue
            deltas = {
                name: {0: 0} | {s: f - start for s in (-2, -1, 1, 2) if (f := measure({name: s})) is not None}
                for name in levels
            }
            moves = self._combine(deltas, start)
            if moves is None or self.error(measure(moves)) >= before:
                return  # stuck: nothing measured gets closer
            index = {name: index[name] + moves.get(name, 0) for name in levels}

    def _combine(self, deltas: dict[str, dict[int, int]], start: int) -> dict[str, int] | None:
        """Level moves (unit -> levels) whose summed FLOPs changes, each measured alone from `start`, land
        closest to the budget; among those predicted well within tolerance, the fewest level changes."""
        quantum = self.budget / 2000  # merge near-equal sums to keep the search small
        states = {0: (0, 0, {})}  # bucket of summed change -> (summed change, levels changed, moves)
        for name, options in deltas.items():
            merged = {}
            for change, cost, moves in states.values():
                for step, delta in options.items():
                    item = (change + delta, cost + abs(step), {**moves, name: step} if step else moves)
                    key = int(item[0] // quantum)
                    if key not in merged or item[1] < merged[key][1]:
                        merged[key] = item
            states = merged

        def rank(item) -> tuple[float, int]:
            return max(self.error(start + item[0]), self.tolerance / 2), item[1]

        best = min(states.values(), key=rank)
        return best[2] or None


def smallest_fraction(base: nn.Module, sample_shape, *, units=None, ignored_layers=(), num_heads=None) -> float:
    """The smallest fraction of base's FLOPs that width pruning reaches: every unit at MAX_RATIO (kept_slots keeps
    at least one channel per norm group, or one head). Removing whole layers (depth pruning) can go lower.
    units, ignored_layers, num_heads: as for engine.prune()."""
    plan = plan_for(network(base), tuple(sample_shape), units=units, ignored_layers=ignored_layers, num_heads=num_heads)
    smallest = prune_kept(base, plan, plan.kept({u.name: MAX_RATIO for u in plan.units}), tuple(sample_shape),
                          BY_POSITION, None)
    return count_flops(as_denoiser(smallest), sample_shape) / count_flops(as_denoiser(base), sample_shape)


@one_thread()
def fit_to_budget(
    base: nn.Module,
    decision: Decision,
    budget_flops: float,
    sample_shape: tuple[int, int, int],
    *,
    tolerance: float = 0.03,
    importance: str = "magnitude",
    calibration: Calibration | None = None,
    max_iter: int = 12,
    units=None,
    ignored_layers=(),
    num_heads: dict[str, int] | None = None,
    latency=None,
) -> FitResult:
    """Repair a proposed decision so the pruned model's cost lands within tolerance of a budget.

    base, sample_shape, importance, calibration, units, ignored_layers, num_heads: as for engine.prune().
    decision: proposed ratios per width unit; only their relative sizes matter (all zero or empty: uniform).
        They are scaled by a common factor found by bisection (clamped to [0, 0.95]); if no scale lands
        within tolerance (GroupNorm makes cost a step function of the scale), single units are then
        moved one channel level at a time toward the budget. Depth units (1.0 = remove): see the module doc.
    budget_flops: target FLOPs of one forward at batch 1 (count_flops; a learned variance's channels count
        too), or with `latency` target seconds of one forward at the table's batch. tolerance: allowed
        relative error. max_iter: bisection steps.
    latency: a latency.LatencyTable of base (see measure_latency_table) to budget time instead of FLOPs.
    Raises BudgetError when no reachable pruning is within tolerance, PruningError (prune.plan) when the
    architecture cannot be pruned as planned.
    """
    criterion = check_importance(importance, calibration)
    if budget_flops <= 0:
        raise ValueError(f"budget must be positive, got {budget_flops}")
    sample_shape = tuple(sample_shape)
    space = {"units": units, "ignored_layers": ignored_layers, "num_heads": num_heads}
    width, removed = depth.split(decision, base)
    full = plan_for(network(base), sample_shape, **space)
    check_decision(width, full.units, math.inf)
    cost = _estimator(base, sample_shape, latency, space)

    def show(cost: float) -> str:
        return f"{cost * 1000:.3f} ms" if latency is not None else f"{cost:,.0f} FLOPs"

    base_cost = cost(full, {}, [])
    if budget_flops >= base_cost * (1 - tolerance / 2):
        return FitResult(copy.deepcopy(base), {u.name: 0.0 for u in full.units},
                         count_flops(as_denoiser(base), sample_shape), budget_flops, 0.0,
                         base_cost if latency is not None else None)
    while True:  # undo removals, last first, while they alone undershoot the budget
        reduced = reduced_base(base, removed)
        plan = plan_for(network(reduced), sample_shape, **space)
        if not removed or cost(plan, {}, removed) >= budget_flops * (1 - tolerance):
            break
        removed = removed[:-1]
    repaired_depth = {k: float(k in removed) for k in depth.normalize(decision, base) if depth.is_depth_unit(k)}
    if not plan.groups:
        raise BudgetError(
            f"budget {show(budget_flops)} is below the base model's {show(base_cost)}, and this model has "
            "nothing prunable: use a budget of at least the base's"
        )
    search = _BudgetSearch(cost, plan, removed, budget_flops, tolerance)
    shape = {u.name: float(width.get(u.name, 0.0)) for u in plan.units}
    if search.error(search.flops(dict.fromkeys(shape, 0.0))) <= tolerance:
        scale = 0.0  # the removed layers alone meet the budget
    else:
        if not any(shape.values()):
            shape = dict.fromkeys(shape, 1.0)
        scale = search.bisect(shape, max_iter)
        if not search.fits():
            search.refine()
    if not search.fits():
        raise BudgetError(
            f"cannot prune to {show(budget_flops)} ({budget_flops / base_cost:.1%} of the base's "
            f"{show(base_cost)}) within {tolerance:.1%}: the closest reachable is {show(search.best_flops)} "
            f"({search.best_flops / base_cost:.1%}). Give the smallest group a larger budget (raise k or "
            "lower N) or allow a larger tolerance."
        )
    model = prune_kept(reduced, plan, plan.kept(search.best), sample_shape, criterion, calibration)
    seconds = search.best_flops if latency is not None else None
    return FitResult(model, {**search.best, **repaired_depth}, count_flops(as_denoiser(model), sample_shape),
                     budget_flops, scale, seconds)


@dataclass
class TimedFit:
    """A fit corrected against directly measured forward time (see fit_to_measured_time).

    fit: the try whose measured time ratio is closest to the target. time_ratio: its forward time as a fraction
    of the base's, measured apart (latency.ExpertTimer). trail: every try in order, each a dict with
    budget ("latency table" for the first fit, "FLOPs" for a correction), flops, estimated_ratio (the table's
    estimate / base seconds; first try only) and measured_ratio; or a correction's flops_budget and error
    when no pruning reaches it (the search stops there).
    """

    fit: FitResult
    time_ratio: float
    trail: list[dict]


def fit_to_measured_time(
    base: nn.Module,
    decision: Decision,
    target_ratio: float,
    sample_shape: tuple[int, int, int],
    batch: int,
    latency,
    *,
    max_corrections: int = 2,
    tolerance: float = 0.03,
    repeats: int = 5,
    fitted: FitResult | None = None,
    timer: ExpertTimer | None = None,
    **fit_kwargs,
) -> TimedFit:
    """Fit a decision to a time budget, then correct it until the MEASURED time ratio meets the budget.

    The latency table's estimate (base + per-unit changes) is not the pruned model's time: the changes are not
    additive (digits-8 at batch 64: estimate 0.78, measured 0.57), and a seconds budget refitted on the same
    table can jump between far-apart decisions. So the first try is the table's fit; each one is timed against
    the base (latency.ExpertTimer at `batch`, `repeats` rounds), and while the measured
    ratio m misses target_ratio by more than `tolerance` (relative), the decision is refitted to a FLOPs
    budget F <- F x (target_ratio / m) ** (1 / a), where a is the log-log slope of measured time against
    FLOPs over the last two tries (0.5 before there are two: width pruning's time ~ sqrt(FLOPs) at batch
    16-64, issue 11), at most max_corrections times. FLOPs are exact and monotone in the decision's scale, so
    this is a secant search on a well-behaved axis.
    base, decision, sample_shape: as for fit_to_budget. target_ratio: the wanted forward time as a fraction
        of the base's, > 0. latency: the base's latency.LatencyTable (at `batch`). fitted: an existing fit of
        decision at target_ratio x latency.base_seconds (e.g. a search's winner), used as the first try.
    timer: the latency.ExpertTimer of base at `batch` that times the tries (each distinct architecture once, the
        base once; a run shares one across its groups); None: a new one, with `repeats` rounds.
    fit_kwargs: for fit_to_budget (importance, calibration, units, ignored_layers, num_heads).
    Returns the try whose measured ratio is closest to the target, with the trail of all tries.
    Raises ValueError for target_ratio <= 0 or max_corrections < 0; BudgetError when the first fit fails.
    """
    if not target_ratio > 0 or max_corrections < 0:
        raise ValueError(f"target_ratio must be > 0 and max_corrections >= 0, got {target_ratio} and {max_corrections}")
    fit = fitted or fit_to_budget(base, decision, target_ratio * latency.base_seconds, sample_shape, latency=latency,
                                  **fit_kwargs)
    timer = timer or ExpertTimer(base, sample_shape, batch, base_time=latency.base_seconds, repeats=repeats)
    base_flops = count_flops(base, sample_shape)
    tries: list[tuple[FitResult, float]] = []
    trail: list[dict] = []
    for attempt in range(max_corrections + 1):
        measured = timer.ratio(fit.model)
        trail.append({"budget": "latency table" if attempt == 0 else "FLOPs", "flops": fit.flops,
                      "estimated_ratio": fit.seconds / latency.base_seconds if attempt == 0 else None,
                      "measured_ratio": measured})
        tries.append((fit, measured))
        if abs(measured / target_ratio - 1) <= tolerance or attempt == max_corrections:
            break
        slope = 0.5
        if len(tries) > 1:
            (f0, m0), (f1, m1) = tries[-2], tries[-1]
            if f0.flops != f1.flops and m0 > 0 and m1 > 0:
                slope = min(max(math.log(m1 / m0) / math.log(f1.flops / f0.flops), 0.2), 1.5)
        flops_budget = min(fit.flops * (target_ratio / measured) ** (1 / slope), base_flops)
        try:
            fit = fit_to_budget(base, decision, round(flops_budget), sample_shape, **fit_kwargs)
        except BudgetError as err:
            trail.append({"budget": "FLOPs", "flops_budget": round(flops_budget), "error": str(err)})
            break
    fit, measured = min(tries, key=lambda tried: abs(tried[1] - target_ratio))
    return TimedFit(fit, measured, trail)


def uniform_fit(
    base: nn.Module,
    fraction: float,
    sample_shape: tuple[int, int, int],
    *,
    latency=None,
    batch: int | None = None,
    **fit_kwargs,
) -> FitResult | TimedFit:
    """Prune `base` uniformly (one global width ratio for every unit of its decision space) to a fraction of its
    FLOPs or, with a latency table, of its measured forward time.

    fraction: the budget as a fraction of the base's cost, > 0 (1 or more: an unpruned copy): of
        count_flops(base, sample_shape) (batch 1, rounded to whole FLOPs), or with `latency` of its forward time at
        `batch`.
    latency, batch: the base's latency.LatencyTable (measure_latency_table) and the batch size it was measured
        at: the table's fit is then timed beside the base and corrected until the measured time ratio meets
        `fraction` (fit_to_measured_time). Give both or neither.
    fit_kwargs: for fit_to_budget (tolerance, importance, the decision space: units, ignored_layers, num_heads,
        as SearchConfig.space() gives them), and with a table for fit_to_measured_time (repeats, max_corrections).
    Returns a FitResult for a FLOPs budget, a TimedFit (.fit, .time_ratio, .trail) for a time budget.
    Raises ValueError for a fraction <= 0 (as fit_to_budget and fit_to_measured_time do) or a table without its
    batch (or a batch without a table), BudgetError when no uniform pruning reaches the budget.
    """
    if (latency is None) != (batch is None):
        raise ValueError("uniform_fit budgets time with a latency table AND the batch it was measured at: give both, "
                         "or neither for a FLOPs budget")
    units = prunable_units(base, units=fit_kwargs.get("units"), ignored_layers=fit_kwargs.get("ignored_layers", ()))
    decision = uniform_decision(units, 0.5)  # one global ratio: the fit keeps only the ratios' relative sizes
    if latency is None:
        return fit_to_budget(base, decision, round(fraction * count_flops(base, sample_shape)), sample_shape,
                             **fit_kwargs)
    return fit_to_measured_time(base, decision, fraction, sample_shape, batch, latency, **fit_kwargs)


def measure_latency_table(
    base: nn.Module,
    sample_shape: tuple[int, int, int],
    batch: int,
    *,
    depth_units: bool = True,
    max_levels: int = 6,
    cache_dir=None,
    progress=None,
    units=None,
    ignored_layers=(),
    num_heads: dict[str, int] | None = None,
    **kwargs,
):
    """The latency.LatencyTable of base at a batch size: each width unit at up to max_levels of its channel
    levels (evenly spread, always the last; others are interpolated) and, with depth_units, each depth unit
    removed. Cached per device, batch, architecture and torch version (see latency.measure_table).
    units, ignored_layers, num_heads: the decision space, as for engine.prune() (a run's search settings).
    kwargs: repeats, warmup (as for latency.compare).
    """
    sample_shape = tuple(sample_shape)
    plan = plan_for(network(base), sample_shape, units=units, ignored_layers=ignored_layers, num_heads=num_heads)
    if units is not None or ignored_layers or num_heads:  # a unit's levels mean other cuts: a table of its own
        space = json.dumps([plan.ignored, [(u.name, u.modules) for u in plan.units], sorted((num_heads or {}).items())])
        cache_dir = Path(cache_dir or default_cache_dir()) / f"space-{hashlib.sha256(space.encode()).hexdigest()[:12]}"
    variants = {}
    for u in plan.units:
        levels = unit_levels(plan, u.name)[1:]
        if len(levels) > max_levels:
            levels = [levels[round(i * (len(levels) - 1) / (max_levels - 1))] for i in range(max_levels)]
        variants[u.name] = {
            v: (lambda v=v, u=u.name: prune_kept(base, plan, plan.kept({u: v}), sample_shape, BY_POSITION, None))
            for v in levels
        }
    if depth_units:
        for name in depth.depth_units(network(base)):
            variants[name] = {1.0: lambda name=name: depth.remove(copy.deepcopy(base), [name])}
    return measure_table(base, variants, sample_shape, batch, cache_dir=cache_dir, progress=progress, **kwargs)
