"""A run directory's plan/plan.json read as untrusted input: every field typed and checked before a stage uses it."""

from __future__ import annotations

import math
from pathlib import Path

from ..budget import BudgetPlan, formula_problem
from ..flops import count_flops
from ..grouping import Grouping, grouping_of, make_groups


def load_plan(path: Path) -> BudgetPlan:
    """The BudgetPlan in a run's plan.json (untrusted: BudgetPlan.load's checks), its message telling how to make
    the run's plan again. Raises FileNotFoundError when it is missing, ValueError naming the file and the field."""
    path = Path(path)
    return BudgetPlan.load(path, fix=f"restore it, or {_remake(path)}")


def check_plan_fits(plan: BudgetPlan, path: Path, run) -> None:
    """Refuse a plan whose values pass their own checks (load_plan) but contradict the run `run` (a Stages), made
    for another run or edited: its grouping's T, strategy and number of groups, its k, ordering, mean_budget and
    budget_unit (a plan from plan_fractions records k, ordering and mean_budget as null, and those fractions),
    its sample_shape against the run's settings, its base_flops against the base model's counted FLOPs
    (flops.count_flops of base/final at the run's sample shape; not checked before stage 1), then its grouping's
    boundaries and SNR ranges against the run's grouping made again (_grouping_problem), and its fractions and
    ranks against its own k, ordering and mean_budget (budget.formula_problem). Raises ValueError naming plan.json,
    the field and the fix."""
    c = run.config
    given = c.plan_fractions is not None  # then k, the ordering and the mean budget do not apply: recorded as null
    checks = [("'grouping.num_train_timesteps'", plan.grouping.num_train_timesteps,
               lambda: run.scheduler.config.num_train_timesteps),
              ("'grouping.strategy'", plan.grouping.strategy, lambda: c.grouping),
              ("the number of groups in 'grouping'", len(plan.grouping), lambda: c.groups),
              ("'k'", plan.k, lambda: None if given else c.k),
              ("'ordering'", plan.ordering, lambda: None if given else c.ordering),
              ("'mean_budget'", plan.mean_budget, lambda: None if given else c.mean_budget),
              ("'fractions'", plan.fractions, lambda: list(c.plan_fractions) if given else plan.fractions),
              ("'budget_unit'", plan.budget_unit, lambda: plan.budget_unit and c.budget_unit),  # null: made before it
              ("'sample_shape'", list(plan.sample_shape), lambda: list(run.sample_shape)),
              ("'base_flops'", plan.base_flops, lambda: count_flops(run.base_model(), run.sample_shape))]
    for key, mine, actual in checks:
        try:
            value = actual()
        except FileNotFoundError:  # no base model yet: a plan given before stage 1 is checked once there is one
            continue
        if mine != value:
            what = "the base model's counted FLOPs" if key == "'base_flops'" else "the run's"
            raise ValueError(f"{path}: {key} is {_shown(mine)} but {what} is {_shown(value)} (the plan was made for "
                             f"another run, or edited); {_remake(path)}")
    problem = _grouping_problem(plan.grouping, run) or formula_problem(plan)  # after the run's settings
    if problem is not None:
        raise ValueError(f"{path}: {problem} (the plan was edited); {_remake(path)}")


def _grouping_problem(grouping: Grouping, run) -> str | None:
    """What is wrong with a plan's grouping (whose T, strategy and N are the run's) against the run's grouping made
    again on its schedule (grouping.make_groups), or None. A "loss" grouping's boundaries come from the base's
    measured per-timestep loss, which is not measured again at every stage: its groups' sizes are held to
    make_groups' least size (T // 4N) and its SNR ranges to its own boundaries (grouping.grouping_of)."""
    scheduler, n = run.scheduler, len(grouping)
    if grouping.strategy == "loss":
        least = max(1, grouping.num_train_timesteps // (4 * n))
        small = [g for g in grouping.groups if g.size < least]
        if small:
            return (f"'grouping.boundaries' {_shown(grouping.boundaries)} give group {small[0].index} {small[0].size} "
                    f"timesteps, fewer than the {least} (T // 4N) every loss grouping of the run has")
        expected = grouping_of("loss", grouping.boundaries, scheduler)
    else:
        expected = make_groups(grouping.strategy, n, scheduler)
    if grouping.boundaries != expected.boundaries:
        return (f"'grouping.boundaries' are {_shown(grouping.boundaries)} but the run's {grouping.strategy!r} grouping "
                f"of T={grouping.num_train_timesteps} into {n} groups gives {_shown(expected.boundaries)}")
    for mine, right in zip(grouping.groups, expected.groups):
        ranges = [(mine.snr_db_start, right.snr_db_start), (mine.snr_db_end, right.snr_db_end)]
        if not all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9) for a, b in ranges):
            return (f"group {mine.index} of 'grouping.groups' spans SNR {mine.snr_db_start}..{mine.snr_db_end} dB but "
                    f"the run's schedule gives {right.snr_db_start}..{right.snr_db_end} dB at its timesteps "
                    f"{mine.start}..{mine.end - 1}")
    return None


def _remake(path: Path) -> str:
    return (f"delete {path.parent} and rerun `tdcdiff plan` (then redo the stages after it, which were made for the "
            "old plan)")


def _shown(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)[:200]
