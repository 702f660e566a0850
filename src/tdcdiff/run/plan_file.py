"""A run directory's plan/plan.json read as untrusted input: every field typed and checked before a stage uses it."""

from __future__ import annotations

import math
from pathlib import Path

from ..budget import ORDERINGS, BudgetPlan
from ..files import parse_json, read_untrusted
from ..flops import count_flops
from ..grouping import Grouping
from ..settings import is_integer
from .config import BUDGET_UNITS

FORMAT = "tdcdiff-plan/1"
MAX_PLAN_BYTES = 256 << 20  # one entry of about 150 bytes per group, at most T = 10^6 groups


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _numbers(value, count: int) -> bool:
    return isinstance(value, list) and len(value) == count and all(map(_number, value))


def _problem(data: dict) -> str | None:
    """What is wrong with a plan's fields (the first problem found), or None. Needs a valid grouping."""
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
         f"'base_flops' must be a positive integer (the base's FLOPs per forward), got {base_flops!r}"),
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


def load_plan(path: Path) -> BudgetPlan:
    """The BudgetPlan in a run's plan.json (untrusted: read with a size cap, every field typed and checked).

    Raises FileNotFoundError when it is missing, and ValueError, one line naming the file, the field and the fix,
    for anything else: not JSON, another format, a grouping that is not N contiguous groups (Grouping.from_dict),
    fractions that are not one number in (0, 1] per group, ranks that are not 1..N, base FLOPs that are not a
    positive integer, an unknown ordering or budget unit.
    """
    path = Path(path)
    fix = (f"restore it, or delete {path.parent} and rerun `tdcdiff plan` (then redo the stages after it, which "
           "were made for the old plan)")
    try:
        raw = read_untrusted(path.parent, path.name, str(path), max_bytes=MAX_PLAN_BYTES, hint=fix)
    except FileNotFoundError:
        raise FileNotFoundError(f"no plan at {path}; run `tdcdiff plan` first") from None
    data = parse_json(raw, path, fix, problem="is damaged")
    try:
        if not isinstance(data, dict):
            raise ValueError(f"it holds a {type(data).__name__}, not a JSON object")
        if data.get("format") != FORMAT:
            raise ValueError(f"format {str(data.get('format'))[:100]!r}, expected {FORMAT!r}")
        problem = _problem(data)
        if problem is not None:
            raise ValueError(problem)
    except ValueError as err:
        raise ValueError(f"{path} is damaged ({err}); {fix}") from None
    return BudgetPlan.from_dict(data)


def check_plan_fits(plan: BudgetPlan, path: Path, run) -> None:
    """Refuse a plan whose values pass their own checks (load_plan) but contradict the run `run` (a Stages), made
    for another run or edited: its grouping's T, strategy and number of groups, its k, ordering, mean_budget and
    budget_unit (a plan from plan_fractions records k, ordering and mean_budget as null, and those fractions),
    its sample_shape against the run's settings, its base_flops against the base model's counted FLOPs
    (flops.count_flops of base/final at the run's sample shape; not checked before stage 1). Raises ValueError
    naming plan.json, the field and the fix."""
    c = run.config
    given = c.plan_fractions is not None  # then k, the ordering and the mean budget do not apply: recorded as null
    checks = [("grouping.num_train_timesteps", plan.grouping.num_train_timesteps,
               lambda: run.scheduler.config.num_train_timesteps),
              ("grouping.strategy", plan.grouping.strategy, lambda: c.grouping),
              ("grouping.groups' count", len(plan.grouping), lambda: c.groups),
              ("k", plan.k, lambda: None if given else c.k),
              ("ordering", plan.ordering, lambda: None if given else c.ordering),
              ("mean_budget", plan.mean_budget, lambda: None if given else c.mean_budget),
              ("fractions", plan.fractions, lambda: list(c.plan_fractions) if given else plan.fractions),
              ("budget_unit", plan.budget_unit, lambda: plan.budget_unit and c.budget_unit),  # null: made before it
              ("sample_shape", list(plan.sample_shape), lambda: list(run.sample_shape)),
              ("base_flops", plan.base_flops, lambda: count_flops(run.base_model(), run.sample_shape))]
    for key, mine, actual in checks:
        try:
            value = actual()
        except FileNotFoundError:  # no base model yet: a plan given before stage 1 is checked once there is one
            continue
        if mine != value:
            what = "the base model's counted FLOPs" if key == "base_flops" else "the run's"
            raise ValueError(f"{path}: '{key}' is {_shown(mine)} but {what} is {_shown(value)} (the plan was made for "
                             f"another run, or edited); delete {path.parent} and rerun `tdcdiff plan` (then redo the "
                             "stages after it, which were made for the old plan)")


def _shown(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)[:200]
