"""Budget fitting: repair a proposed decision so the pruned model's measured FLOPs meet a budget."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from torch import nn

from ..flops import count_flops
from .engine import Calibration, Plan, check_importance, kept_slots, one_thread, plan_for, prune_kept
from .units import MAX_RATIO, Decision, check_decision, network


@dataclass
class FitResult:
    """A pruned model that fits a FLOPs budget.

    model: the pruned deep copy. decision: the repaired decision actually applied (every unit).
    flops: its measured FLOPs (count_flops, batch 1). budget: the target. scale: the common multiplier the
    bisection applied to the proposed ratios (before any per-unit repair).
    """

    model: nn.Module
    decision: Decision
    flops: int
    budget: int
    scale: float


class BudgetError(ValueError):
    """No decision reachable by pruning lands within tolerance of the FLOPs budget."""


def _unit_levels(plan: Plan, unit: str) -> list[float]:
    """One ratio per distinct channel configuration of a unit, ascending, each safely inside its interval."""
    slots = {g.slots for g in plan.groups if g.unit == unit}
    # Where round(s * (1 - r)) drops from j to j - 1 channels per norm group.
    cuts = sorted({c for s in slots for j in range(2, s + 1) if 0.0 < (c := 1.0 - (j - 0.5) / s) < MAX_RATIO})
    if not cuts:
        return [0.0]
    # The last level keeps one channel per norm group: name it by that ratio (1 - 1/s) where it is allowed.
    last = min(MAX_RATIO, max(1.0 - 1.0 / s for s in slots))
    return [0.0] + [(a + b) / 2 for a, b in zip(cuts, cuts[1:])] + [last]


class _BudgetSearch:
    """Measures the FLOPs of trial decisions (once per distinct pruned shape) and keeps the closest."""

    def __init__(self, base, plan: Plan, sample_shape, budget: int, tolerance: float):
        self.base, self.plan, self.sample_shape = base, plan, sample_shape
        self.budget, self.tolerance = budget, tolerance
        self.measured: dict[tuple[int, ...], int] = {}
        self.best: Decision | None = None
        self.best_flops = 0

    def flops(self, decision: Decision) -> int:
        kept = self.plan.kept(decision)
        if kept not in self.measured:
            model = prune_kept(self.base, self.plan, kept, self.sample_shape, "position", None)
            self.measured[kept] = count_flops(model, self.sample_shape)
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
        """Greedy repair from the closest trial, in channel levels of single units (see _unit_levels).

        Moves one unit one level toward the budget while that gets closer. When stuck, measures every unit
        one and two levels either way and jumps to the combination whose summed FLOPs changes land closest
        to the budget with the fewest level changes. Stops within tolerance, or when nothing gets closer.
        """
        levels = {u.name: _unit_levels(self.plan, u.name) for u in self.plan.units}

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
        quantum = max(1, self.budget // 2000)  # merge near-equal sums to keep the search small
        states = {0: (0, 0, {})}  # bucket of summed change -> (summed change, levels changed, moves)
        for name, options in deltas.items():
            merged = {}
            for change, cost, moves in states.values():
                for step, delta in options.items():
                    item = (change + delta, cost + abs(step), {**moves, name: step} if step else moves)
                    key = item[0] // quantum
                    if key not in merged or item[1] < merged[key][1]:
                        merged[key] = item
            states = merged

        def rank(item) -> tuple[float, int]:
            return max(self.error(start + item[0]), self.tolerance / 2), item[1]

        best = min(states.values(), key=rank)
        return best[2] or None


@one_thread()
def fit_to_budget(
    base: nn.Module,
    decision: Decision,
    budget_flops: int,
    sample_shape: tuple[int, int, int],
    *,
    tolerance: float = 0.03,
    importance: str = "magnitude",
    calibration: Calibration | None = None,
    max_iter: int = 12,
) -> FitResult:
    """Repair a proposed decision so the pruned model's measured FLOPs land within tolerance of a budget.

    base, sample_shape, importance, calibration: as for prune().
    decision: proposed ratios per unit; only their relative sizes matter (all zero or empty: uniform).
        They are scaled by a common factor found by bisection (clamped to [0, 0.95]); if no scale lands
        within tolerance (GroupNorm makes FLOPs a step function of the scale), single units are then
        moved one channel level at a time toward the budget.
    budget_flops: target FLOPs of one forward at batch 1 (count_flops). tolerance: allowed relative error.
    max_iter: bisection steps.
    Raises BudgetError when no reachable pruning is within tolerance.
    """
    check_importance(importance, calibration)
    if budget_flops <= 0:
        raise ValueError(f"budget_flops must be positive, got {budget_flops}")
    sample_shape = tuple(sample_shape)
    plan = plan_for(network(base), sample_shape)
    check_decision(decision, plan.units, math.inf)
    base_flops = count_flops(base, sample_shape)
    if budget_flops >= base_flops * (1 - tolerance / 2):
        return FitResult(copy.deepcopy(base), {u.name: 0.0 for u in plan.units}, base_flops, budget_flops, 0.0)
    if not plan.groups:
        raise BudgetError(
            f"FLOPs budget {budget_flops:,} is below the base model's {base_flops:,}, and this model has "
            "nothing prunable: use a budget of at least the base FLOPs"
        )
    shape = {u.name: float(decision.get(u.name, 0.0)) for u in plan.units}
    if not any(shape.values()):
        shape = dict.fromkeys(shape, 1.0)
    search = _BudgetSearch(base, plan, sample_shape, budget_flops, tolerance)
    scale = search.bisect(shape, max_iter)
    if not search.fits():
        search.refine()
    if not search.fits():
        raise BudgetError(
            f"cannot prune to {budget_flops:,} FLOPs ({budget_flops / base_flops:.1%} of the base's "
            f"{base_flops:,}) within {tolerance:.1%}: the closest reachable is {search.best_flops:,} "
            f"({search.best_flops / base_flops:.1%}). Give the smallest group a larger budget (raise k or "
            "lower N) or allow a larger tolerance."
        )
    model = prune_kept(base, plan, plan.kept(search.best), sample_shape, importance, calibration)
    return FitResult(model, search.best, count_flops(model, sample_shape), budget_flops, scale)


