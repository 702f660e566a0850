"""Budget allocation from measured quality curves (budget.allocate_from_curves) against hand-made answers."""

import itertools
import json
import random
import re

import pytest
from typer.testing import CliRunner

from tdcdiff.budget import (
    BudgetPlan,
    allocate_from_curves,
    budget_fractions,
    curve_loss,
    formula_problem,
    make_plan,
)
from tdcdiff.cli import app
from tdcdiff.grouping import make_groups
from tdcdiff.schedule import make_scheduler


def brute_force(curves, weights, budget):
    best = None
    for choice in itertools.product(*(range(len(c)) for c in curves)):
        cost = sum(w * curves[g][i][0] for g, (w, i) in enumerate(zip(weights, choice)))
        loss = sum(curves[g][i][1] for g, i in enumerate(choice))
        if cost <= budget + 1e-12 and (best is None or (loss, cost) < best[:2]):
            best = (loss, cost, list(choice))
    return best


def test_the_budget_goes_where_it_buys_the_most_quality():
    # Two halves of the timesteps; shrinking group 0 costs 1.0, shrinking group 1 only 0.1.
    curves = [[(0.5, 1.0), (1.0, 0.0)], [(0.5, 0.1), (1.0, 0.0)]]
    allocation = allocate_from_curves(curves, [0.5, 0.5], 0.75)
    assert allocation.fractions == [1.0, 0.5] and allocation.loss == pytest.approx(0.1)
    assert allocation.mean_fraction == pytest.approx(0.75) and allocation.option == [1, 0]
    assert allocate_from_curves(curves, [0.5, 0.5], 1.0).fractions == [1.0, 1.0]


def test_timestep_weights_set_what_a_size_costs():
    # Same curves, but group 0 holds 90% of the timesteps: keeping it full costs 0.9 of the budget alone.
    curves = [[(0.5, 1.0), (1.0, 0.0)], [(0.5, 0.8), (1.0, 0.0)]]
    assert allocate_from_curves(curves, [0.5, 0.5], 0.75).fractions == [1.0, 0.5]
    assert allocate_from_curves(curves, [0.9, 0.1], 0.75).fractions == [0.5, 1.0]


def test_a_non_convex_curve_where_greedy_by_marginal_gain_fails():
    # Group 0 gains nothing from 0.5 -> 0.75 but everything from 0.75 -> 1.0; a greedy that buys the best
    # marginal gain per unit cost first spends on group 1 and then cannot afford group 0's jump.
    curves = [[(0.5, 1.0), (0.75, 1.0), (1.0, 0.0)], [(0.5, 0.3), (1.0, 0.0)]]
    allocation = allocate_from_curves(curves, [0.5, 0.5], 0.75)
    assert allocation.fractions == [1.0, 0.5] and allocation.loss == pytest.approx(0.3)


def test_equal_losses_take_the_cheaper_sizes():
    curves = [[(0.4, 0.0), (0.8, 0.0)], [(0.5, 0.2), (1.0, 0.2)]]
    allocation = allocate_from_curves(curves, [0.5, 0.5], 1.0)
    assert allocation.fractions == [0.4, 0.5] and allocation.mean_fraction == pytest.approx(0.45)


def test_matches_brute_force_on_random_curves():
    rng = random.Random(0)
    for _ in range(300):
        groups = rng.randint(1, 4)
        curves = [[(rng.choice([0.2, 0.3, 0.45, 0.6, 0.8, 1.0]), rng.random()) for _ in range(rng.randint(1, 4))]
                  for _ in range(groups)]
        raw = [rng.random() + 0.05 for _ in range(groups)]
        weights = [w / sum(raw) for w in raw]
        cheapest = sum(w * min(f for f, _ in c) for w, c in zip(weights, curves))
        budget = rng.uniform(cheapest, 1.0)
        loss, cost, choice = brute_force(curves, weights, budget)
        allocation = allocate_from_curves(curves, weights, budget)
        assert allocation.loss == pytest.approx(loss, abs=1e-12) and allocation.mean_fraction <= budget + 1e-12
        assert allocation.mean_fraction == pytest.approx(cost, abs=1e-12)


def test_never_worse_than_the_papers_formula_when_its_sizes_were_measured():
    # Curves measured at the paper's sizes for N=4, k=0.5 (0.625 .. 1.0); its allocation gives difficulty rank
    # i the i-th size. The knapsack at the same mean budget must do at least as well.
    sizes = budget_fractions(4, 0.5)
    curves = [[(f, loss) for f, loss in zip(sizes, row)]
              for row in ([0.2, 0.05, 0.02, 0.0], [0.1, 0.05, 0.02, 0.0], [0.3, 0.1, 0.05, 0.0], [2.0, 1.0, 0.1, 0.0])]
    weights = [0.1, 0.4, 0.3, 0.2]
    paper = [sizes[3], sizes[0], sizes[1], sizes[2]]  # a ranking that calls group 0 hardest, group 1 easiest
    budget = sum(w * f for w, f in zip(weights, paper))
    assert curve_loss(curves, paper) == pytest.approx(0.0 + 0.1 + 0.1 + 0.1)
    # Better: group 3 (the steep curve) full size, paid for by group 0 (flat) at 0.75: 0.05 + 0.1 + 0.1 + 0.
    allocation = allocate_from_curves(curves, weights, budget)
    assert allocation.fractions == [0.75, 0.625, 0.75, 1.0] and allocation.loss == pytest.approx(0.25)


def test_curve_loss_interpolates_between_measured_sizes():
    curves = [[(0.5, 1.0), (1.0, 0.0)], [(0.4, 0.4), (0.8, 0.0)]]
    assert curve_loss(curves, [0.75, 0.6]) == pytest.approx(0.5 + 0.2)
    with pytest.raises(ValueError, match="fraction 0.3000 lies outside its measured sizes"):
        curve_loss(curves, [0.3, 0.6])


@pytest.mark.parametrize("curves, weights, budget, message", [
    ([[(0.5, 1.0)]], [1.0], 0.4, r"budget 0.4 is below the cheapest mean fraction the measured sizes allow \(0.5000\)"),
    ([[(0.5, 1.0)], []], [0.5, 0.5], 1.0, "group 1 has no measured"),
    ([[(1.5, 1.0)]], [1.0], 1.0, r"fractions must be in \(0, 1\]"),
    ([[(0.5, 1.0)]], [0.5, 0.5], 1.0, "1 quality curves for 2 group weights"),
    ([[(0.5, 1.0)], [(0.5, 1.0)]], [0.5, 0.6], 1.0, "sum to 1"),
])
def test_bad_curves_are_rejected_with_the_fix(curves, weights, budget, message):
    with pytest.raises(ValueError, match=message):
        allocate_from_curves(curves, weights, budget)


def _plan(**kwargs):
    grouping = kwargs.pop("grouping", None) or make_groups("uniform", 4, make_scheduler(1000))
    return make_plan(grouping, k=0.5, ordering="snr-low-hard", base_flops=1000, sample_shape=(1, 8, 8), **kwargs)


def test_a_mean_budget_scales_the_papers_shape_to_the_asked_total():
    # Paper's fractions for N=4, k=0.5: 0.625 0.75 0.875 1.0 (mean 0.8125); scaled by 0.6 / 0.8125 = 9.6 / 13.
    plan = _plan(mean_budget=0.6)
    assert plan.fractions == pytest.approx([6 / 13, 7.2 / 13, 8.4 / 13, 9.6 / 13])
    assert plan.mean_fraction == pytest.approx(0.6) and plan.mean_budget == 0.6
    assert _plan().fractions == [0.625, 0.75, 0.875, 1.0] and _plan().mean_budget is None


def test_a_mean_budget_caps_fractions_at_one_and_rescales_the_rest():
    # 0.95 / 0.8125 would push the two hardest groups above 1: they are capped, the others get 72/55 x the shape.
    plan = _plan(mean_budget=0.95)
    assert plan.fractions == pytest.approx([9 / 11, 54 / 55, 1.0, 1.0])
    assert plan.mean_fraction == pytest.approx(0.95)
    assert _plan(mean_budget=1.0).fractions == pytest.approx([1.0] * 4)


def test_a_mean_budget_weights_groups_by_their_timesteps():
    grouping = make_groups("snr", 3, make_scheduler(1000))
    assert len({g.size for g in grouping.groups}) > 1  # unequal groups, else this test proves nothing
    plan = _plan(grouping=grouping, mean_budget=0.5)
    shape = _plan(grouping=grouping).fractions
    assert plan.mean_fraction == pytest.approx(0.5)
    assert [f / plan.fractions[0] for f in plan.fractions] == pytest.approx([f / shape[0] for f in shape])


def test_a_mean_budget_is_saved_in_the_plan_and_old_plans_still_load():
    plan = _plan(mean_budget=0.6)
    data = plan.to_dict()
    assert data["mean_budget"] == 0.6 and BudgetPlan.from_dict(data) == plan
    data = _plan().to_dict()  # a plan.json written before mean budgets existed: the formula's fractions, unscaled
    del data["mean_budget"]
    assert BudgetPlan.from_dict(data).mean_budget is None


@pytest.mark.parametrize("bad", [0, -0.2, 1.5, float("nan")])
def test_a_mean_budget_outside_0_1_names_the_fix(bad):
    with pytest.raises(ValueError, match=r"mean_budget \(--mean-budget\) must be in \(0, 1\].*e\.g\. 0\.6"):
        _plan(mean_budget=bad)


def test_the_plan_records_its_budget_unit_and_old_plans_load_without_one():
    plan = _plan(budget_unit="time")
    data = plan.to_dict()
    assert data["budget_unit"] == "time" and BudgetPlan.from_dict(data) == plan
    del data["budget_unit"]  # a plan.json written before the unit was recorded: Run.plan fills in the run's
    assert BudgetPlan.from_dict(data).budget_unit is None


@pytest.mark.parametrize("change, message", [
    ({"fractions": "abc"}, "'fractions' must be one budget fraction in (0, 1] per group"),
    ({"grouping": 5}, "grouping"),
    ({"base_flops": True}, "'base_flops' must be a positive integer"),
    ({"sample_shape": [1, 8]}, "'sample_shape' must be 3 positive integers"),
    ({"format": "tdcdiff-plan/9"}, "format 'tdcdiff-plan/9', expected 'tdcdiff-plan/1'"),
])
def test_a_saved_plan_is_read_as_untrusted_by_the_api_too(tmp_path, change, message):
    path = _plan().save(tmp_path / "plan.json")
    data = json.loads(path.read_text()) | change
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"^{path} is damaged \(.*{re.escape(message)}.*; restore it, or make it "
                                         r"again \(`tdcdiff plan`, or make_plan\(\.\.\.\)\.save\)$"):
        BudgetPlan.load(path)
    with pytest.raises(ValueError, match=re.escape(message)):
        BudgetPlan.from_dict(data)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="it holds a list, not a JSON object"):
        BudgetPlan.load(path)
    assert BudgetPlan.load(_plan().save(tmp_path / "good.json")) == _plan()


def test_given_fractions_make_a_plan_without_k_or_ordering():
    from tdcdiff.budget import plan_from_fractions

    grouping = make_groups("uniform", 4, make_scheduler(1000))
    plan = plan_from_fractions(grouping, [0.9, 0.5, 1.0, 0.7], base_flops=1000, sample_shape=(1, 8, 8))
    assert plan.k is None and plan.ordering is None and plan.sensitivity is None
    assert plan.ranks == [3, 1, 4, 2] and plan.provenance["fractions"] == "plan_fractions"
    assert BudgetPlan.from_dict(plan.to_dict()) == plan


@pytest.mark.parametrize("kwargs, message", [
    ({"mean_budget": 1e-9}, r"group 0's budget, 7.69e-10 of the base's FLOPs, is about 7.7e-07 FLOPs of its 1,000: "
                            r"no pruning reaches it; raise --mean-budget or --k"),
    ({"mean_budget": 1e-9, "budget_unit": "time"},
     r"group 0's budget, .* of the base's forward time, .*no pruning reaches it"),
    ({"mean_budget": 0.2, "smallest": 0.3}, r"group 0's budget, 0.1538 of the base's FLOPs, is below the smallest "
                                            r"that pruning reaches \(0.3000: .*\); raise --mean-budget or --k"),
])
def test_a_budget_no_pruning_reaches_is_refused_in_the_plan(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _plan(**kwargs)
    assert _plan(mean_budget=0.5, smallest=0.3).fractions[0] >= 0.3
    assert _plan(mean_budget=0.2, smallest=0.3, budget_unit="time")  # time fractions: not a FLOPs floor


def _edited(plan, **change):
    return plan.to_dict() | change


def _snr_plan(**kwargs):
    return make_plan(make_groups("snr", 4, make_scheduler(1000)), k=0.5, ordering="measured", base_flops=1000,
                     sample_shape=(1, 8, 8), sensitivity=[0.3, 0.1, 0.4, 0.2], **kwargs)


@pytest.mark.parametrize("data, message", [
    # attack f row 515: a k-plan's fractions edited against its k were pruned to without a word
    (_edited(_snr_plan(), fractions=[0.3, 0.625, 1.0, 0.75]),
     r"'fractions' are \[0.3, 0.625, 1.0, 0.75\] but k 0.5, the ranks and mean_budget None give \[0.875, 0.625, 1.0, "
     r"0.75\] \(a plan of other fractions records k and ordering as null: plan_from_fractions, --plan-fractions\)"),
    (_edited(_plan(mean_budget=0.6), mean_budget=0.7), r"'fractions' are \[0.4615.*\] but k 0.5, the ranks and "
                                                       r"mean_budget 0.7 give \[0.5384"),
    (_edited(_plan(), ranks=[2, 1, 3, 4], fractions=[0.75, 0.625, 0.875, 1.0]),
     r"'ranks' are \[2, 1, 3, 4\] but ordering 'snr-low-hard' gives \[1, 2, 3, 4\]"),
    (_edited(_plan(), k=None), r"'k' is None and 'ordering' 'snr-low-hard': both are set \(a plan from the formula\) "
                               r"or both null \(a plan of given fractions\)"),
    (_edited(_plan(), k=None, ordering=None), r"'k' and 'ordering' are null, but 'provenance' does not say the "
                                              r"fractions were given \(\"fractions\": \"plan_fractions\"\)"),
    (_edited(_plan(), ordering="measured"), r"'ordering' is 'measured' but 'sensitivity' is null"),
])
def test_a_plan_that_contradicts_itself_is_named_with_both(data, message):
    assert formula_problem(BudgetPlan.from_dict(data)) is not None
    assert re.match(message, formula_problem(BudgetPlan.from_dict(data)))
    assert formula_problem(_snr_plan()) is None and formula_problem(_plan(mean_budget=0.6)) is None


def test_a_runs_plan_edited_against_its_k_is_refused_before_prune(tmp_path):
    # Attack f row 515: R/plan/plan.json with fractions [0.3, 1.0] (the run's k 0.4 gives [0.7, 1.0]) was pruned to.
    run = tmp_path / "run"
    (run / "plan").mkdir(parents=True)
    (run / "config.json").write_text("{}")  # the defaults: 4 snr groups, k 0.5, measured ordering
    path = run / "plan" / "plan.json"
    path.write_text(json.dumps(_edited(_snr_plan(), fractions=[0.3, 0.625, 1.0, 0.75])))
    result = CliRunner().invoke(app, ["prune", "--out", str(run)])
    assert result.exit_code == 2 and result.output == (
        f"error: {path}: 'fractions' are [0.3, 0.625, 1.0, 0.75] but k 0.5, the ranks and mean_budget None give "
        "[0.875, 0.625, 1.0, 0.75] (a plan of other fractions records k and ordering as null: plan_from_fractions, "
        f"--plan-fractions) (the plan was edited); delete {path.parent} and rerun `tdcdiff plan` (then redo the "
        "stages after it, which were made for the old plan)\n")
    assert not (run / "prune").exists()


@pytest.mark.parametrize("data, message", [
    # row 514: a fraction of 1e-300 passed "(0, 1]" and became "budget_flops must be > 0, got 0" at prune
    (_edited(_plan(), fractions=[1e-300, 0.75, 0.875, 1.0]),
     r"'fractions' gives group 0 1e-300 of the base's 1,000 FLOPs, a budget of 0 FLOPs no pruning reaches"),
    # row 510: a 401-digit base_flops loaded, then to_dict raised OverflowError
    (_edited(_plan(), base_flops=10**400), r"'base_flops' is 1000000000.*\(401 characters\), more than 2\^63 - 1: no "
                                           r"model's forward pass counts that many"),
])
def test_a_plan_with_a_budget_no_pruning_reaches_or_past_int64_is_damaged(tmp_path, data, message):
    with pytest.raises(ValueError, match=message):
        BudgetPlan.from_dict(data)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"^{path} is damaged \({message}\); restore it"):
        BudgetPlan.load(path)


def test_a_given_fractions_plan_keeps_its_fractions_and_a_formula_plan_its_sensitivity():
    from tdcdiff.budget import plan_from_fractions

    grouping = make_groups("uniform", 4, make_scheduler(1000))
    given = plan_from_fractions(grouping, [0.9, 0.5, 1.0, 0.7], base_flops=1000, sample_shape=(1, 8, 8)).to_dict()
    assert BudgetPlan.from_dict(given | {"fractions": [0.8, 0.5, 1.0, 0.6]}).fractions == [0.8, 0.5, 1.0, 0.6]
    assert formula_problem(BudgetPlan.from_dict(given | {"fractions": [0.1, 0.5, 1.0, 0.7]})) == (
        "'ranks' are [3, 1, 4, 2] but ordering 'measured' gives [1, 2, 4, 3]")  # the ranks order the given budgets
    measured = make_plan(grouping, k=0.5, ordering="measured", base_flops=1000, sample_shape=(1, 8, 8),
                         sensitivity=[0.3, 0.1, 0.4, 0.2])
    assert BudgetPlan.from_dict(measured.to_dict()) == measured


def test_huge_base_flops_are_refused_by_every_plan_maker():
    from tdcdiff.budget import plan_from_fractions

    grouping = make_groups("uniform", 4, make_scheduler(1000))
    message = r"base_flops \(the base model's FLOPs per forward pass, flops.count_flops\) must be at most 2\^63 - 1"
    with pytest.raises(ValueError, match=message):
        make_plan(grouping, k=0.5, ordering="snr-low-hard", base_flops=10**400, sample_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=message):
        plan_from_fractions(grouping, [1.0] * 4, base_flops=2**63, sample_shape=(1, 8, 8))
    assert make_plan(grouping, k=0.5, ordering="snr-low-hard", base_flops=2**63 - 1,
                     sample_shape=(1, 8, 8)).to_dict()["budgets"][-1] == 2**63  # float rounding; JSON holds it


def test_a_plan_path_that_is_a_folder_is_named(tmp_path):
    # Attack f rows 512/513: IsADirectoryError "Is a directory: 3" (a file descriptor), naming no path.
    from tdcdiff.run.plan_file import load_plan

    (tmp_path / "plan.json").mkdir()
    with pytest.raises(ValueError, match=rf"^{tmp_path}/plan.json is a folder; restore it, or make it again"):
        BudgetPlan.load(tmp_path / "plan.json")
    with pytest.raises(ValueError, match=rf"^{tmp_path}/plan.json is a folder; restore it, or delete {tmp_path} and "
                                         r"rerun `tdcdiff plan`"):
        load_plan(tmp_path / "plan.json")
