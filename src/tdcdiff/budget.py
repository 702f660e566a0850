"""Progressive FLOPs allocation: harder timestep groups get bigger denoisers.

Group of difficulty rank i (1 = easiest .. N = hardest) gets FLOPs_g(i) = (i/N + (N-i)/N * k) * F,
with F the FLOPs of the base model's forward pass and 0 < k <= 1 (the paper's linear formula). With a mean
budget (`scale_to_mean`), the same shape is scaled so the timestep-weighted mean fraction is a given total. The
other way, `allocate_from_curves`, picks each group's size from measured quality-against-size curves (an exact
multiple-choice knapsack).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .files import atomic_write_text, brief, parse_json, read_untrusted
from .grouping import Grouping
from .models import check_sample_shape
from .settings import as_integer, as_real, is_integer, is_real, plain_number

ORDERINGS = ("measured", "snr-high-hard", "snr-low-hard")
BUDGET_UNITS = ("flops", "time")  # what a budget fraction is of: the base's FLOPs, or its measured forward time
PLAN_FORMAT = "tdcdiff-plan/1"
MAX_PLAN_BYTES = 256 << 20  # one entry of about 150 bytes per group, at most T = 10^6 groups
RAISE_BUDGET = "raise --mean-budget or --k"  # the fix for a budget the formula makes too small
MAX_FLOPS = 2**63 - 1  # a FLOPs count an int64 holds (torch's and numpy's integers), far above any model's forward


def budget_fractions(num_groups: int, k: float) -> list[float]:
    """FLOPs fraction of the base for difficulty ranks 1..N (easiest first): i/N + (N-i)/N * k."""
    if num_groups < 1:
        raise ValueError(f"number of groups N must be >= 1, got {num_groups}")
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1] (the easiest group's share grows with k), got {k}")
    n = num_groups
    return [i / n + (n - i) / n * k for i in range(1, n + 1)]


def scale_to_mean(fractions: list[float], weights: list[float], mean_budget: float) -> list[float]:
    """The fractions scaled by one factor s, capped at 1, so that their weighted mean is mean_budget.

    fractions: per group, its share of the base (the paper's shape, e.g. from budget_fractions), each > 0.
    weights: each group's share of the T timesteps (group size / T; they sum to 1).
    mean_budget: the target sum_g weights[g] x min(1, s x fractions[g]), in (0, 1].
    Water-filling: s = (mean_budget - W_capped) / sum_{uncapped} weights[g] x fractions[g], where the groups
    that s would push above 1 are capped at 1 and s is solved again until none is (s only grows as groups cap;
    mean_budget <= 1 is always reachable, all ones at worst). The ratios between uncapped groups are kept.
    Raises ValueError for a mean_budget outside (0, 1].
    """
    check_mean_budget(mean_budget)
    capped: set[int] = set()
    while True:
        rest = sum(w * f for g, (w, f) in enumerate(zip(weights, fractions)) if g not in capped)
        if rest <= 0:
            return [1.0] * len(fractions)
        s = (mean_budget - sum(weights[g] for g in capped)) / rest
        over = {g for g, f in enumerate(fractions) if g not in capped and s * f >= 1}
        if not over:
            return [1.0 if g in capped else s * f for g, f in enumerate(fractions)]
        capped |= over


def check_mean_budget(mean_budget: float | None) -> None:
    """Raise ValueError unless mean_budget is None or in (0, 1] (a numpy scalar or 0-d tensor too)."""
    mean_budget = plain_number(mean_budget)
    if mean_budget is not None and not (is_real(mean_budget) and 0 < mean_budget <= 1):
        raise ValueError(f"mean_budget (--mean-budget) must be in (0, 1], the timestep-weighted mean fraction of the "
                         f"base that sampling costs, got {mean_budget}; e.g. 0.6, or leave it unset for the paper's "
                         "formula")


def difficulty_ranks(ordering: str, num_groups: int, sensitivity: list[float] | None = None) -> list[int]:
    """Difficulty rank (1 = easiest .. N = hardest) of each group, in group (timestep) order.

    ordering: "snr-high-hard" (small t, clean end is hardest), "snr-low-hard" (large t, noisy end is
        hardest), or "measured" (the group whose relative loss rises most under trial pruning is hardest).
    sensitivity: per-group relative loss increase, required for "measured".
    """
    if ordering not in ORDERINGS:
        raise ValueError(f"unknown difficulty ordering {ordering!r}; choose one of {ORDERINGS}")
    if ordering == "snr-low-hard":
        return list(range(1, num_groups + 1))
    if ordering == "snr-high-hard":
        return list(range(num_groups, 0, -1))
    if sensitivity is None or len(sensitivity) != num_groups:
        raise ValueError("ordering 'measured' needs one sensitivity value per group")
    order = sorted(range(num_groups), key=lambda g: (sensitivity[g], g))
    ranks = [0] * num_groups
    for rank, g in enumerate(order, start=1):
        ranks[g] = rank
    return ranks


@dataclass
class BudgetPlan:
    """Groups, their difficulty and budgets: the input of the pruning stage.

    fractions: each group's budget as a fraction of the base's `budget_unit` ("flops": its FLOPs; "time": its
    forward time, measured when pruning). k and ordering are None when the fractions were given explicitly
    (provenance["fractions"] == "plan_fractions"); the ranks then order the groups by their given budget.
    """

    grouping: Grouping
    k: float | None
    ordering: str | None
    base_flops: int
    sample_shape: tuple[int, int, int]
    ranks: list[int]
    fractions: list[float]
    sensitivity: list[float] | None = None
    provenance: dict = field(default_factory=dict)
    mean_budget: float | None = None
    budget_unit: str = "flops"

    @property
    def budgets(self) -> list[int]:
        """FLOPs budget of each group's model, in group order (for a time plan: its fractions of the base's FLOPs,
        not what the experts will cost)."""
        return [int(round(f * self.base_flops)) for f in self.fractions]

    @property
    def mean_fraction(self) -> float:
        """Timestep-weighted mean budget: what sampling costs on average, as a fraction of the base."""
        total = self.grouping.num_train_timesteps
        return sum(f * g.size / total for f, g in zip(self.fractions, self.grouping.groups))

    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "grouping": self.grouping.to_dict(),
            "k": self.k,
            "mean_budget": self.mean_budget,
            "budget_unit": self.budget_unit,
            "ordering": self.ordering,
            "base_flops": self.base_flops,
            "flops_convention": "2 x multiply-accumulates, one forward pass, batch 1",
            "sample_shape": list(self.sample_shape),
            "ranks": self.ranks,
            "fractions": self.fractions,
            "budgets": self.budgets,
            "mean_fraction": self.mean_fraction,
            "sensitivity": self.sensitivity,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, data) -> BudgetPlan:
        """The plan in `data` (to_dict's form; untrusted, e.g. parsed from a plan.json: every field typed and
        checked). Raises ValueError naming the first problem: not a mapping, another format, a grouping that is
        not N contiguous groups (Grouping.from_dict), fractions not one number in (0, 1] per group, ranks not
        1..N, base FLOPs not a positive integer, an unknown ordering or budget unit."""
        if not isinstance(data, dict):
            raise ValueError(f"it holds a {type(data).__name__}, not a JSON object")
        if data.get("format") != PLAN_FORMAT:
            raise ValueError(f"format {str(data.get('format'))[:100]!r}, expected {PLAN_FORMAT!r}")
        problem = _plan_problem(data) or _zero_budget(data["fractions"], data["base_flops"])
        if problem is not None:
            raise ValueError(problem)
        return cls(
            Grouping.from_dict(data["grouping"]),
            data["k"],
            data["ordering"],
            data["base_flops"],
            tuple(data["sample_shape"]),
            data["ranks"],
            data["fractions"],
            data.get("sensitivity"),
            data.get("provenance", {}),
            data.get("mean_budget"),  # absent in plans written before it existed
            data.get("budget_unit"),  # ditto: None, and Run.plan fills in the run's
        )

    def save(self, path: str | Path) -> Path:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, fix: str = "restore it, or make it again (`tdcdiff plan`, or make_plan(...)"
                                              ".save)") -> BudgetPlan:
        """The plan saved at `path` (untrusted: read with a size cap, then from_dict's checks). fix: what the
        message tells the user to do. Raises FileNotFoundError when it is missing, and ValueError, one line naming
        the file, the problem and `fix`, for anything else."""
        path = Path(path)
        try:
            raw = read_untrusted(path.parent, path.name, str(path), max_bytes=MAX_PLAN_BYTES, hint=fix)
        except FileNotFoundError:
            raise FileNotFoundError(f"no plan at {path}; run `tdcdiff plan` first") from None
        data = parse_json(raw, path, fix, problem="is damaged")
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{path} is damaged ({err}); {fix}") from None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _numbers(value, count: int) -> bool:
    return isinstance(value, list) and len(value) == count and all(map(_number, value))


def _plan_problem(data: dict) -> str | None:
    """What is wrong with a plan's fields (the first problem found), or None. Raises ValueError for a grouping
    that is not N contiguous groups (Grouping.from_dict)."""
    n = len(Grouping.from_dict(data.get("grouping")))
    k, ordering, mean_budget = data.get("k"), data.get("ordering"), data.get("mean_budget")
    base_flops, shape, unit = data.get("base_flops"), data.get("sample_shape"), data.get("budget_unit")
    fractions, ranks, sensitivity = data.get("fractions"), data.get("ranks"), data.get("sensitivity")
    checks = [
        (_numbers(fractions, n) and all(0 < f <= 1 for f in fractions),
         f"'fractions' must be one budget fraction in (0, 1] per group ({n} groups), got {str(fractions)[:200]}"),
        (isinstance(ranks, list) and all(map(is_integer, ranks)) and sorted(ranks) == list(range(1, n + 1)),
         f"'ranks' must be the difficulty ranks 1..{n}, one per group, got {str(ranks)[:200]}"),
        (is_integer(base_flops) and base_flops > 0,
         f"'base_flops' must be a positive integer (the base's FLOPs per forward), got {brief(base_flops, 60)}"),
        (not is_integer(base_flops) or base_flops <= MAX_FLOPS,
         f"'base_flops' is {brief(base_flops, 60)}, more than 2^63 - 1: no model's forward pass counts that many"),
        (isinstance(shape, list) and len(shape) == 3 and all(is_integer(s) and s > 0 for s in shape),
         f"'sample_shape' must be 3 positive integers (channels, height, width), got {str(shape)[:200]}"),
        (k is None or (_number(k) and 0 < k <= 1), f"'k' must be null or in (0, 1], got {k!r}"),
        (mean_budget is None or (_number(mean_budget) and 0 < mean_budget <= 1),
         f"'mean_budget' must be null or in (0, 1], got {mean_budget!r}"),
        (ordering is None or ordering in ORDERINGS, f"'ordering' must be null or one of {ORDERINGS}, got "
                                                     f"{str(ordering)[:100]!r}"),
        (unit is None or unit in BUDGET_UNITS, f"'budget_unit' must be null or one of {BUDGET_UNITS}, got "
                                               f"{str(unit)[:100]!r}"),
        (sensitivity is None or _numbers(sensitivity, n),
         f"'sensitivity' must be null or one finite number per group ({n} groups), got {str(sensitivity)[:200]}"),
        (isinstance(data.get("provenance", {}), dict), "'provenance' must be a mapping"),
    ]
    return next((message for ok, message in checks if not ok), None)


def _zero_budget(fractions: list[float], base_flops: int) -> str | None:
    low = min(range(len(fractions)), key=lambda g: fractions[g])
    if round(fractions[low] * base_flops) < 1:
        return (f"'fractions' gives group {low} {fractions[low]:.3g} of the base's {base_flops:,} FLOPs, a budget of "
                "0 FLOPs no pruning reaches")
    return None


def formula_problem(plan: BudgetPlan) -> str | None:
    """What contradicts itself in a plan, or None: a plan from k (make_plan) whose ranks or fractions are not what
    its k, ordering, sensitivity and mean_budget give, a plan of given fractions (plan_from_fractions: k and ordering
    null) that does not say so in its provenance or whose ranks do not order them, or k set without an ordering
    (or the reverse). A plan.json edited by hand is refused with it (run.plan_file.check_plan_fits)."""
    k, ordering, fractions, ranks = plan.k, plan.ordering, plan.fractions, plan.ranks
    if (k is None) != (ordering is None):
        return (f"'k' is {k!r} and 'ordering' {ordering!r}: both are set (a plan from the formula) or both null (a "
                "plan of given fractions)")
    sensitivity = plan.sensitivity
    if k is None:
        if plan.provenance.get("fractions") != "plan_fractions":
            return ("'k' and 'ordering' are null, but 'provenance' does not say the fractions were given "
                    "(\"fractions\": \"plan_fractions\")")
        ordering, sensitivity = "measured", fractions  # the ranks order the given budgets
    if ordering == "measured" and sensitivity is None:
        return "'ordering' is 'measured' but 'sensitivity' is null: the ranks come from one value per group"
    expected_ranks = difficulty_ranks(ordering, len(plan.grouping), sensitivity)
    if ranks != expected_ranks:
        return f"'ranks' are {ranks} but ordering {ordering!r} gives {expected_ranks}"
    if k is None:
        return None
    expected = _formula_fractions(plan.grouping, k, ranks, plan.mean_budget)
    if not all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(fractions, expected)):
        return (f"'fractions' are {brief(fractions, 200)} but k {k}, the ranks and mean_budget {plan.mean_budget} "
                f"give {brief(expected, 200)} (a plan of other fractions records k and ordering as null: "
                "plan_from_fractions, --plan-fractions)")
    return None


def _formula_fractions(grouping: Grouping, k: float, ranks: list[int], mean_budget: float | None) -> list[float]:
    """Each group's fraction from the paper's formula by its rank, scaled to mean_budget when given (make_plan)."""
    by_rank = budget_fractions(len(grouping), k)
    fractions = [by_rank[r - 1] for r in ranks]
    if mean_budget is None:
        return fractions
    total = grouping.num_train_timesteps
    return scale_to_mean(fractions, [g.size / total for g in grouping.groups], mean_budget)


def make_plan(
    grouping: Grouping,
    *,
    k: float,
    ordering: str,
    base_flops: int,
    sample_shape: tuple[int, int, int],
    sensitivity: list[float] | None = None,
    provenance: dict | None = None,
    mean_budget: float | None = None,
    budget_unit: str = "flops",
    smallest: float | None = None,
) -> BudgetPlan:
    """Assign each group its budget fraction of the base from its difficulty rank.

    Without mean_budget, the paper's formula: rank i of N gets i/N + (N-i)/N x k (the hardest gets 1.0).
    With mean_budget in (0, 1], those fractions f_i are scaled to min(1, s x f_i) with the one s that makes the
    timestep-weighted mean (BudgetPlan.mean_fraction) equal mean_budget (see scale_to_mean): k and the ranks keep
    their role, the ratios between uncapped groups, and the total is what is asked.
    budget_unit: what the fractions are of, "flops" or "time" (recorded; see BudgetPlan).
    smallest: the smallest FLOPs fraction pruning can reach (see check_reachable), or None when not known.
    Numbers are Python or numpy ones, or 0-d tensors (stored as Python numbers, so the plan saves as JSON);
    sample_shape is checked as models.check_sample_shape does.
    Raises ValueError for k outside (0, 1] or not a number, base_flops that is not an integer >= 1, mean_budget
    outside (0, 1], a bad ordering, a sensitivity that is not one finite number per group, or a group budget no
    pruning can meet (check_reachable).
    """
    k = as_real("k", k, note="the easiest group's budget fraction")
    base_flops, sample_shape = _base_flops(base_flops), check_sample_shape(sample_shape)
    budget_fractions(len(grouping), k)  # its checks of N and k come first
    check_mean_budget(mean_budget)
    mean_budget = None if mean_budget is None else float(plain_number(mean_budget))
    if sensitivity is not None:
        sensitivity = [as_real(f"sensitivity[{g}]", v, note=f"group {g}'s relative loss increase under trial pruning")
                       for g, v in enumerate(sensitivity)]
    ranks = difficulty_ranks(ordering, len(grouping), sensitivity)
    fractions = _formula_fractions(grouping, k, ranks, mean_budget)
    check_reachable(fractions, base_flops, budget_unit, smallest)
    return BudgetPlan(grouping, k, ordering, base_flops, tuple(sample_shape), ranks, fractions, sensitivity,
                provenance or {}, mean_budget, budget_unit)


def _base_flops(base_flops) -> int:
    value = as_integer("base_flops", base_flops, 1, note="the base model's FLOPs per forward pass, flops.count_flops")
    if value > MAX_FLOPS:
        raise ValueError(f"base_flops (the base model's FLOPs per forward pass, flops.count_flops) must be at most "
                         f"2^63 - 1, got {brief(value, 60)}; give the count flops.count_flops makes")
    return value


def plan_from_fractions(
    grouping: Grouping,
    fractions: list[float],
    *,
    base_flops: int,
    sample_shape: tuple[int, int, int],
    provenance: dict | None = None,
    budget_unit: str = "flops",
    smallest: float | None = None,
) -> BudgetPlan:
    """A plan whose budget fractions are given (e.g. from allocate_from_curves), one per group in group order:
    k and the ordering do not apply (recorded as None, provenance["fractions"] = "plan_fractions"); the ranks
    order the groups by their budget. Raises ValueError as check_reachable does, or for a wrong count.
    """
    if len(fractions) != len(grouping):
        raise ValueError(f"{len(fractions)} budget fractions for {len(grouping)} groups; give one per group")
    base_flops, sample_shape = _base_flops(base_flops), check_sample_shape(sample_shape)
    fractions = [as_real(f"fractions[{g}]", f, note=f"group {g}'s budget fraction") for g, f in enumerate(fractions)]
    check_reachable(fractions, base_flops, budget_unit, smallest, fix="raise the smallest plan_fractions")
    return BudgetPlan(grouping, None, None, base_flops, tuple(sample_shape),
                difficulty_ranks("measured", len(grouping), list(fractions)), list(fractions), None,
                {**(provenance or {}), "fractions": "plan_fractions"}, None, budget_unit)


def check_reachable(fractions: list[float], base_flops: int, budget_unit: str = "flops",
                    smallest: float | None = None, *, fix: str = RAISE_BUDGET,
                    label: str | None = None) -> None:
    """Raise ValueError when a budget fraction (of the base's FLOPs or time) can certainly not be met by pruning.

    Every unit keeps at least one channel per norm group, so a budget rounding to 0 FLOPs is never met, whatever
    the unit. For a FLOPs budget, `smallest` (if known) is the smallest fraction pruning reaches
    (prune.fit.smallest_fraction); a budget below it is refused too. fix: what the message tells the user to do.
    label: what the message calls the smallest fraction (default: "group g's budget").
    """
    low = min(range(len(fractions)), key=lambda g: fractions[g])
    fraction, what = fractions[low], label or f"group {low}'s budget"
    unit = {"flops": "FLOPs", "time": "forward time"}.get(budget_unit, budget_unit)
    if round(fraction * base_flops) < 1:
        raise ValueError(f"{what}, {fraction:.3g} of the base's {unit}, is about {fraction * base_flops:.2g} FLOPs "
                         f"of its {base_flops:,}: no pruning reaches it; {fix}")
    if budget_unit == "flops" and smallest is not None and fraction < smallest:
        raise ValueError(f"{what}, {fraction:.4f} of the base's FLOPs, is below the smallest that pruning reaches "
                         f"({smallest:.4f}: every layer at its largest pruning ratio); {fix}")


@dataclass
class Allocation:
    """Per group, the measured option chosen: `fractions` (FLOPs fraction of the base, group order), `option`
    (its index in that group's curve), `loss` (the summed quality loss) and `mean_fraction` (timestep-weighted
    mean fraction, what sampling costs on average)."""

    fractions: list[float]
    option: list[int]
    loss: float
    mean_fraction: float


def _check_curves(curves: list[list[tuple[float, float]]], weights: list[float]) -> None:
    if len(curves) != len(weights) or not curves:
        raise ValueError(f"{len(curves)} quality curves for {len(weights)} group weights; give one curve per group")
    for g, curve in enumerate(curves):
        if not curve:
            raise ValueError(f"group {g} has no measured (fraction, loss) points; measure at least one size")
        for fraction, loss in curve:
            if not 0 < fraction <= 1 or not math.isfinite(loss):
                raise ValueError(f"group {g} has the point ({fraction}, {loss}); fractions must be in (0, 1] of the "
                                 "base's FLOPs and losses finite")
    if any(w < 0 for w in weights) or not math.isclose(sum(weights), 1.0, rel_tol=1e-9):
        raise ValueError(f"group weights must be >= 0 and sum to 1 (each group's share of the timesteps), "
                         f"got {weights}")


def allocate_from_curves(
    curves: list[list[tuple[float, float]]],
    weights: list[float],
    budget: float,
) -> Allocation:
    """Choose one measured size per group so that the summed quality loss is minimal within the budget.

    curves: per group (timestep order), its measured points (fraction of the base FLOPs, quality loss), e.g. the
        group's bits/dim share of an expert of that size minus the base's (likelihood.nll_bound: the shares
        are additive, so the total loss is the sum over groups). Lower loss is better; any shape is allowed.
    weights: each group's share of the T timesteps (group size / T; they sum to 1): a sampling trajectory
        spends that share of its steps in the group.
    budget: the largest allowed timestep-weighted mean fraction sum_g weights[g] x fraction[g], in (0, 1].

    Exact (a multiple-choice knapsack): dynamic programming over the groups keeping every Pareto-optimal
    (cost, loss) partial choice, since the remaining groups add to cost and loss independently of how the
    earlier ones were chosen, a dominated partial choice can never complete to a better one. Costs stay
    real-valued (no rounding to a grid); the number of kept states is at most the number of distinct costs.
    Among equal losses the cheaper choice wins. The paper's linear formula (`budget_fractions`) is the
    alternative that needs no curves; `curve_loss` prices any allocation on the same curves.
    Raises ValueError for malformed curves or weights, or a budget below the cheapest choice (the message
    gives the cheapest mean fraction reachable).
    """
    _check_curves(curves, weights)
    cheapest = sum(w * min(f for f, _ in curve) for w, curve in zip(weights, curves))
    if budget < cheapest - 1e-12:
        raise ValueError(f"budget {budget} is below the cheapest mean fraction the measured sizes allow "
                         f"({cheapest:.4f}); raise the budget or measure smaller sizes")
    states: list[tuple[float, float, tuple[int, ...]]] = [(0.0, 0.0, ())]
    for weight, curve in zip(weights, curves):
        grown = sorted((cost + weight * f, loss + q, choice + (i,))
                       for cost, loss, choice in states for i, (f, q) in enumerate(curve)
                       if cost + weight * f <= budget + 1e-12)
        states = []
        for state in grown:  # by cost: keep a state only if it beats every cheaper one
            if not states or state[1] < states[-1][1]:
                states.append(state)
    cost, loss, choice = min(states, key=lambda s: (s[1], s[0]))
    return Allocation([curves[g][i][0] for g, i in enumerate(choice)], list(choice), loss, cost)


def curve_loss(curves: list[list[tuple[float, float]]], fractions: list[float]) -> float:
    """The summed quality loss of an allocation (one FLOPs fraction per group) read off the measured curves,
    interpolated linearly between measured points; e.g. the paper's `budget_fractions` in group order.
    Raises ValueError for a fraction outside a group's measured range (extrapolation is a guess).
    """
    if len(fractions) != len(curves):
        raise ValueError(f"{len(fractions)} fractions for {len(curves)} curves; give one per group")
    total = 0.0
    for g, (curve, fraction) in enumerate(zip(curves, fractions)):
        xs, ys = zip(*sorted(curve))
        if not xs[0] - 1e-12 <= fraction <= xs[-1] + 1e-12:
            raise ValueError(f"group {g}: fraction {fraction:.4f} lies outside its measured sizes "
                             f"[{xs[0]}, {xs[-1]}]; measure that size too")
        total += float(np.interp(fraction, xs, ys))
    return total
