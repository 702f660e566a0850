"""tdcdiff tune: the candidate list, resuming, one candidate alone, the choice and the payback arithmetic, and one
tiny end-to-end run on digits."""

import json

import pytest
import torch

from conftest import tiny_config


def tiny_tune(**changes):
    from tdcdiff.tune import TuneConfig

    settings = dict(tune_steps=4, widths=(0.6,), ks=(0.4,), groups=(2,), finalists=2, fid_seeds=2, max_fid_seeds=2,
                    fid_samples=16, batch=4, timing_repeats=1, settings=(), min_model_speedup=0.0)
    return TuneConfig(**{**settings, **changes})


def gap(mean, low, high, margin=0.6):
    """A judgement (verdict.judge's fields) of a candidate's FID against the base's, read against `margin`."""
    from tdcdiff.verdict import verdict_of

    return {"mean": mean, "interval": [low, high], "confidence": 0.95, "pairs": 3, "half_width": (high - low) / 2,
            "margin": margin, "verdict": verdict_of(low, high, margin)}


# -- the plan -------------------------------------------------------------------------------------------------
def test_plan_lists_single_then_uniform_widths_then_the_tdc_grid():
    from tdcdiff.tune import TuneConfig, candidate_list

    plan = candidate_list(TuneConfig(widths=(0.8, 0.5), ks=(0.1, 0.5), groups=(2, 4), groupings=("snr", "uniform")))
    assert [c["index"] for c in plan] == list(range(11))
    assert [c["kind"] for c in plan] == ["single", "uniform", "uniform"] + ["tdc"] * 8
    assert plan[1]["fraction"] == 0.8 and plan[2]["name"] == "uniform 0.5"
    assert [c["settings"] for c in plan[3:]] == [
        {"k": k, "groups": n, "grouping": g} for g in ("snr", "uniform") for n in (2, 4) for k in (0.1, 0.5)]
    assert len({c["dir"] for c in plan}) == 11 and all(c["dir"].startswith("candidates/") for c in plan)


def test_time_budget_uniform_time_and_depth_candidates_say_their_unit():
    from tdcdiff.tune import TuneConfig, candidate_list
    from tdcdiff.tune.kinds import TIME_BUDGET_K

    config = TuneConfig(widths=(0.6,), ks=(0.3,), groups=(4,), time_budgets=(0.8, 0.6), uniform_time_budgets=(0.7,),
                        depth=True)
    plan = candidate_list(config)
    assert [c["name"] for c in plan] == [
        "single", "uniform 0.6", "uniform time 0.7", "TDC k=0.3 N=4 snr", "TDC time 0.8 N=4 snr",
        "TDC time 0.6 N=4 snr", "TDC k=0.3 N=4 snr depth=True", "TDC time 0.8 N=4 snr depth=True",
        "TDC time 0.6 N=4 snr depth=True"]
    assert plan[1]["budget_unit"] == "flops" and plan[2]["budget_unit"] == "time" and plan[2]["fraction"] == 0.7
    assert plan[5]["settings"] == {"budget_unit": "time", "mean_budget": 0.6, "k": TIME_BUDGET_K, "groups": 4,
                                   "grouping": "snr"}
    assert plan[8]["settings"] == {**plan[5]["settings"], "search.depth": True}
    assert len({c["dir"] for c in plan}) == len(plan)
    # New kinds enter the saved plan settings only when used, so directories tuned before them still match.
    assert set(TuneConfig().candidate_settings()) == {"tune_steps", "widths", "ks", "groups", "groupings",
                                                      "tdc_variants"}
    assert config.candidate_settings()["time_budgets"] == [0.8, 0.6] and config.candidate_settings()["depth"] is True


def test_curves_candidates_twin_the_k_grid_and_plan_fractions_are_checked():
    from conftest import tiny_config
    from tdcdiff.run import apply_overrides
    from tdcdiff.tune import TuneConfig, candidate_list

    plan = candidate_list(TuneConfig(widths=(), ks=(0.2, 0.4), groups=(2,), curves=True))
    assert [(c["name"], c["kind"]) for c in plan] == [
        ("single", "single"), ("TDC k=0.2 N=2 snr", "tdc"), ("TDC k=0.4 N=2 snr", "tdc"),
        ("TDC curves k=0.2 N=2 snr", "tdc-curves"), ("TDC curves k=0.4 N=2 snr", "tdc-curves")]
    assert TuneConfig(curves=True).candidate_settings()["curves"] == {"sizes": [0.4, 0.6, 0.8, 1.0], "steps": 50}
    with pytest.raises(ValueError, match=r"curve sizes must be fractions in \(0, 1\] .* include 1.0"):
        TuneConfig(curves=True, curve_sizes=(0.5,)).validate()
    assert apply_overrides(tiny_config(), {"plan_fractions": [0.5, 1]}).plan_fractions == [0.5, 1.0]
    for bad in ([0.5], [0.0, 1.0], [0.5, 1.5]):
        with pytest.raises(ValueError, match=r"plan_fractions must be one budget fraction in \(0, 1\] per group"):
            apply_overrides(tiny_config(), {"plan_fractions": bad}).validate()


def test_a_relative_curve_objective_is_its_own_candidate_and_weighs_each_group_by_its_timesteps():
    from tdcdiff.budget import allocate_from_curves
    from tdcdiff.tune import TuneConfig, candidate_list
    from tdcdiff.tune.curves import curve_objective_points

    both = TuneConfig(widths=(), ks=(0.4,), groups=(2,), curves=True, curve_objectives=("share", "relative"))
    plan = candidate_list(both)
    assert [c["name"] for c in plan[-2:]] == ["TDC curves k=0.4 N=2 snr", "TDC curves relative k=0.4 N=2 snr"]
    assert "objective" not in plan[-2] and plan[-1]["objective"] == "relative"
    assert both.candidate_settings()["curves"]["objectives"] == ["share", "relative"]
    for bad in ((), ("share", "share"), ("fid",)):
        with pytest.raises(ValueError, match=r"--curve-objective must be one or more of share, relative, each once"):
            TuneConfig(curves=True, curve_objectives=bad).validate()
    with pytest.raises(ValueError, match=r"--curve-objective chooses how --curves candidates allocate: add --curves"):
        TuneConfig(curve_objectives=("relative",)).validate()

    # Group 0 (few, quiet timesteps) has a large base loss, group 1 (most, noisy ones) a tiny one. Halving
    # either costs the same amount of loss; relative to the base, group 1's damage is 100x larger.
    curves = {"base_shares": [0.1, 0.001], "points": [
        [{"fraction": 0.5, "loss": 0.01}, {"fraction": 1.0, "loss": 0.0}],
        [{"fraction": 0.5, "loss": 0.01}, {"fraction": 1.0, "loss": 0.0}]]}
    weights = [0.2, 0.8]
    relative = curve_objective_points(curves, weights, "relative")
    assert relative[0] == [(0.5, pytest.approx(0.2 * 1.1)), (1.0, pytest.approx(0.2))]
    assert relative[1] == [(0.5, pytest.approx(0.8 * 11)), (1.0, pytest.approx(0.8))]
    budget = 0.5 * 0.2 + 1.0 * 0.8  # room to keep one group whole: the one with more timesteps
    assert allocate_from_curves(relative, weights, budget).fractions == [0.5, 1.0]
    share = curve_objective_points(curves, weights, "share")
    assert share == [[(0.5, 0.01), (1.0, 0.0)]] * 2
    assert allocate_from_curves(share, weights, budget).fractions == [1.0, 0.5]  # equal loss: the cheaper one
    with pytest.raises(ValueError, match=r"divides by the base's share per group, got \[0.1, 0.0\]; use "):
        curve_objective_points({**curves, "base_shares": [0.1, 0.0]}, weights, "relative")


def test_curves_candidates_take_their_fractions_instead_of_a_variants_mean_budget(tmp_path):
    """A variant's mean_budget is what the curves split: the run gets the curves' fractions and no mean budget
    (both set would be refused), and a bad variant still fails when the tune is opened, before any work."""
    from conftest import tiny_config
    from tdcdiff.run import apply_overrides
    from tdcdiff.tune import KINDS, Tune, TuneConfig

    settings = TuneConfig(widths=(), ks=(0.4,), groups=(2,), curves=True, tdc_variants=({"mean_budget": 0.5},))
    tune = Tune(tmp_path / "t", settings, run_config=tiny_config(), progress=False)
    curves = next(c for c in tune.candidates if c["kind"] == "tdc-curves")
    config = apply_overrides(tune.base_run.config, KINDS["tdc-curves"].run_overrides(curves, [0.6, 1.0]))
    assert config.plan_fractions == [0.6, 1.0] and config.mean_budget is None
    tdc = next(c for c in tune.candidates if c["kind"] == "tdc")
    assert KINDS["tdc"].run_overrides(tdc, [0.6, 1.0]) == tdc["settings"]  # TDC's budgets follow the formula
    with pytest.raises(ValueError, match=r"mean_budget \(--mean-budget\) must be in \(0, 1\]"):
        Tune(tmp_path / "u", TuneConfig(widths=(), ks=(0.4,), groups=(2,), curves=True,
                                        tdc_variants=({"mean_budget": 1.5},)), run_config=tiny_config(), progress=False)
    assert not (tmp_path / "u" / "base" / "base").exists()
    with pytest.raises(ValueError, match=r"TDC curves k=0.4 N=2 snr budget_unit=time: --curves measures group sizes "
                                         r"as fractions of the base's FLOPs, but its budget unit is time; drop"):
        Tune(tmp_path / "v", TuneConfig(widths=(), ks=(0.4,), groups=(2,), curves=True,
                                        tdc_variants=({"budget_unit": "time"},)), run_config=tiny_config(),
             progress=False)


def test_a_rerun_without_a_candidate_kind_the_directory_was_tuned_with_names_it(tmp_path):
    from conftest import tiny_config
    from tdcdiff.tune import Tune, TuneConfig
    from tdcdiff.tune.tune import CANDIDATES_FORMAT

    tuned = TuneConfig(widths=(0.6,), ks=(0.4,), groups=(2,), curves=True, curve_steps=5)
    (tmp_path / "t").mkdir()
    saved = {"format": CANDIDATES_FORMAT, "plan": tuned.candidate_settings()}
    (tmp_path / "t" / "tune.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"other candidate settings \(curves: \{'sizes': \[0.4, 0.6, 0.8, 1.0\], "
                                         r"'steps': 5\} there, unset here\); use a new --out"):
        Tune(tmp_path / "t", TuneConfig(widths=(0.6,), ks=(0.4,), groups=(2,)), run_config=tiny_config(),
             progress=False)


def test_tdc_variants_cross_the_grid_with_run_settings():
    from tdcdiff.tune import TuneConfig, candidate_list

    plan = candidate_list(TuneConfig(widths=(), ks=(0.5,), groups=(2,),
                                      tdc_variants=({}, {"finetune.mix_fraction": 0.2})))
    assert [c["name"] for c in plan] == ["single", "TDC k=0.5 N=2 snr", "TDC k=0.5 N=2 snr mix_fraction=0.2"]
    assert plan[2]["settings"] == {"k": 0.5, "groups": 2, "grouping": "snr", "finetune.mix_fraction": 0.2}


@pytest.mark.parametrize("changes, message", [
    ({"widths": (1.2,)}, "--width values must be in (0, 1)"),
    ({"ks": (0.0,)}, "k must be in (0, 1]"),
    ({"fid_seeds": 1}, "--fid-seeds must be >= 2"),
    ({"fid_seeds": 4, "max_fid_seeds": 3}, "--max-fid-seeds must be >= --fid-seeds (4): it caps the seeds added one at "
                                           "a time until each finalist's FID verdict is decided, got 3"),
    ({"margin": -0.1}, "--margin must be a finite number >= 0 (the largest FID loss that counts as none), got -0.1"),
    ({"margin": float("nan")}, "--margin must be a finite number >= 0"),
    ({"groupings": ("equal",)}, "unknown grouping in ['equal']"),
    ({"max_quality_loss": -0.1}, "--max-quality-loss must be a finite number >= 0"),
    ({"min_model_speedup": -1.0}, "--min-model-speedup must be a finite number >= 0"),
    ({"min_model_speedup": float("nan")}, "--min-model-speedup must be a finite number >= 0"),
    ({"min_model_speedup": 1.1, "timing_repeats": 1}, "--min-model-speedup 1.1 needs timing_repeats >= 2 (the bar is "
     "the lower bound of an interval over paired timing rounds; one round has none), got 1; raise timing_repeats, or "
     "set --min-model-speedup 0 (no bar)"),
    ({"max_quality_loss": float("inf")}, "--max-quality-loss must be a finite number >= 0 (a relative loss, 0.02 = "
                                         "2%), got inf"),
    ({"price_per_hour": float("inf")}, "--price-per-hour must be a finite number >= 0 (the machine's price per "
                                       "hour), got inf"),
    ({"price_per_hour": float("nan")}, "--price-per-hour must be a finite number >= 0"),
    ({"time_budgets": (0.0,)}, "--time-budget values must be in (0, 1]"),
    ({"uniform_time_budgets": (1.0,)}, "--uniform-time-budget values must be in (0, 1)"),
    ({"curve_steps": 0}, "--curve-steps must be >= 1 (stage-2 steps behind each point of a quality curve), got 0"),
    ({"screening": "fid"}, "unknown --screening 'fid'; choose from loss (held-out denoising loss), bpd (held-out "
                           "bits/dim bound)"),
])
def test_bad_settings_are_refused(changes, message):
    from tdcdiff.tune import TuneConfig

    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        TuneConfig(**changes).validate()


# -- quality curves: each group's share of a screening measure -------------------------------------------------
@pytest.mark.slow
def test_loss_shares_add_up_to_the_screening_loss_of_the_model_and_of_a_router_of_experts(tiny_unet, digits,
                                                                                          scheduler):
    """Each group's loss share is its measured timesteps' part of the all-point mean: one model's shares add up
    to its screening value per image, and one expert per group adds up to the router's (what makes the knapsack
    over groups valid). A group without a measured timestep counts its nearest point at its share of T."""
    from tdcdiff.grouping import Group, Grouping, make_groups
    from tdcdiff.models import build_unet
    from tdcdiff.router import Router
    from tdcdiff.tune.curves import loss_shares
    from tdcdiff.tune.measures import held_out_losses, screen_loss

    torch.manual_seed(1)
    other = build_unet("digits-8")
    images = digits.images[:8]
    grouping = make_groups("snr", 2, scheduler)
    (points, losses), (_, other_losses) = (held_out_losses(m, images, scheduler, seed=5) for m in (tiny_unet, other))
    shares, other_shares = loss_shares(points, losses, grouping), loss_shares(points, other_losses, grouping)
    assert shares.shape == (8, 2) and (shares > 0).all()
    screened = screen_loss(tiny_unet, images, scheduler, seed=5)
    assert shares.sum(1).tolist() == pytest.approx(screened["per_image"], rel=1e-12)
    router = Router([tiny_unet, other], grouping).eval()
    routed = screen_loss(router, images, scheduler, seed=5)["per_image"]
    assert (shares[:, 0] + other_shares[:, 1]).tolist() == pytest.approx(routed, rel=1e-5)
    # Points are 0, 10, 20, ...: the group 1..4 holds none and takes the loss at t=0 (nearest its middle), x 4/T.
    edges = [0, 1, 5, 1000]
    narrow = Grouping("snr", 1000, edges, [Group(i, a, b, 0.0, 0.0) for i, (a, b) in enumerate(zip(edges, edges[1:]))])
    tiny = loss_shares(points, losses, narrow)
    assert tiny[:, 1].tolist() == pytest.approx((losses[0].double() * 4 / 1000).tolist(), rel=1e-12)
    assert tiny[:, 0].tolist() == pytest.approx((losses[0].double() / len(points)).tolist(), rel=1e-12)


# -- the choice -----------------------------------------------------------------------------------------------
ROWS = [
    {"name": "single", "time_s": 1.0, "quality_ratio": 0.95, "fid_gap": gap(-0.2, -0.5, 0.1)},
    {"name": "uniform 0.6", "time_s": 0.7, "quality_ratio": 1.04, "fid_gap": gap(0.4, 0.1, 0.7)},  # undecided
    {"name": "TDC k=0.3", "time_s": 0.8, "quality_ratio": 1.03, "fid_gap": gap(0.1, -0.3, 0.5)},  # non-inferior
    {"name": "uniform 0.4", "time_s": 0.5, "quality_ratio": 1.08, "fid_gap": None},
    {"name": "TDC k=0.1", "time_s": 0.4, "quality_ratio": 1.01, "fid_gap": None, "failed": True},
]


def test_choice_is_the_fastest_non_inferior_by_paired_fid_and_an_undecided_one_is_never_shipped():
    from tdcdiff.tune import choose

    choice = choose(ROWS)
    assert choice["name"] == "TDC k=0.3" and choice["rule"] == "paired FID"
    assert "non-inferior to the base's" in choice["reason"] and "[-0.300, +0.500]" in choice["reason"]
    assert "margin 0.600 FID" in choice["reason"]  # the margin is stated with the verdict
    # Within 5% on screening, but paired FID is undecided: still not chosen.
    assert choose(ROWS, max_quality_loss=0.05)["name"] == "TDC k=0.3"
    # Undecided or inferior finalists are never shipped, however fast and however close on screening.
    faster = [{"name": "undecided", "time_s": 0.1, "quality_ratio": 1.0, "fid_gap": gap(0.2, -0.5, 0.9)},
              {"name": "inferior", "time_s": 0.2, "quality_ratio": 1.0, "fid_gap": gap(1.0, 0.7, 1.3)}]
    assert [g["fid_gap"]["verdict"] for g in faster] == ["undecided", "inferior"]
    assert choose(faster + ROWS, max_quality_loss=0.05)["name"] == "TDC k=0.3"
    assert choose(faster, max_quality_loss=0.5)["name"] is None
    # The old rule's tie (the interval contains 0) with the upper bound past the margin: undecided, not shipped.
    assert choose([{"name": "wide", "time_s": 0.1, "quality_ratio": 1.0, "fid_gap": gap(0.3, -0.1, 0.7)}])[
        "name"] is None


def test_another_model_is_shipped_only_when_measured_min_model_speedup_times_faster_than_the_free_setting():
    from tdcdiff.tune import choose
    from tdcdiff.tune.judge import model_speedup

    free = {"name": "base @ dpm-solver++:10", "model": "base", "time_s": 1.0, "quality_ratio": 1.0,
            "fid_gap": gap(0.1, -0.3, 0.5), "time_rounds": [1.0, 1.0, 1.1, 0.9, 1.0]}
    steady = [0.75, 0.76, 0.83, 0.68, 0.74]  # 1.33x in every round
    pruned = {"name": "uniform 0.6 @ dpm-solver++:10", "model": "uniform 0.6", "time_s": 0.75, "quality_ratio": 1.0,
              "fid_gap": gap(0.2, -0.2, 0.5), "time_rounds": steady}
    speed = model_speedup(pruned, free)
    assert speed["rounds"] == 5 and 1.30 < speed["low"] < speed["speedup"] < speed["high"] < 1.37
    choice = choose([free, pruned], free=free, min_model_speedup=1.1)
    assert choice["name"] == pruned["name"] and ("faster than the best free setting (base @ dpm-solver++:10) by 1.33x "
                                                 "(95% interval [1.3") in choice["reason"]
    assert "5 paired timing rounds)" in choice["reason"]
    # the same median, but the rounds disagree (noise): its lower bound is under 1.1, the free setting ships
    noisy = {**pruned, "time_rounds": [0.75, 1.05, 0.6, 1.0, 0.7]}
    assert model_speedup(noisy, free)["low"] < 1.1
    choice = choose([free, noisy], free=free, min_model_speedup=1.1)
    assert choice["name"] == free["name"]
    assert ("uniform 0.6 @ dpm-solver++:10 (1.2" in choice["reason"] and "also qualifies but is not measurably 1.1x "
            "faster than the best free setting (base @ dpm-solver++:10; the lower 95% bound must reach "
            "--min-model-speedup)" in choice["reason"])
    assert choose([free, noisy], free=free, min_model_speedup=0)["name"] == pruned["name"]  # 0: no bar
    # one timing round gives no interval: never measurably faster
    once = {**free, "time_rounds": [1.0]}
    one = choose([once, {**pruned, "time_rounds": [0.5]}], free=once, min_model_speedup=1.1)
    assert one["name"] == free["name"] and "1 timing round: no interval; time with timing_repeats >= 2" in one["reason"]
    # the free setting is the reference itself (not a candidate row): nothing is shipped, and the reason says why
    none = choose([noisy], free={**free, "name": "base"}, min_model_speedup=1.1)
    assert none["name"] is None and "keep the base" in none["reason"] and "(base; the lower 95% bound" in none[
        "reason"]
    with pytest.raises(ValueError, match="cannot pair 2 timing rounds with 5"):
        model_speedup({**pruned, "time_rounds": [1.0, 1.0]}, free)
    for bad in ([], None, [0.0] * 5, [-1.0] * 5, [float("nan")] * 5, [float("inf")] * 5, ["1"] * 5):
        # attack 2026-12-07g rows 730-732: ZeroDivisionError, math domain error, IndexError, KeyError
        with pytest.raises(ValueError, match=r"^row 'uniform 0.6 @ dpm-solver\+\+:10': time_rounds must be one or more "
                                             r"finite times in seconds > 0 \(one per timing round"):
            choose([free, {**pruned, "time_rounds": bad}], free=free, min_model_speedup=1.1)


def test_choice_by_max_quality_loss_and_when_nothing_qualifies():
    from tdcdiff.tune import choose

    choice = choose(ROWS, max_quality_loss=0.10)
    assert choice["name"] == "uniform 0.4" and choice["rule"] == "max-quality-loss" and "+8.0%" in choice["reason"]
    better = [{"name": "a", "time_s": 2.0, "quality_ratio": 0.9, "fid_gap": gap(-1.0, -1.5, -0.5)}]
    assert "better than the base's" in choose(better)["reason"]
    none = choose([ROWS[1], ROWS[3]])
    assert none["name"] is None and none["rule"] is None and "keep the base" in none["reason"]


def test_shared_quality_curves_are_counted_once_in_the_cost():
    from tdcdiff.tune.cost import phases_of_others

    def phase(cpu):
        return {"wall_s": cpu, "cpu_s": cpu, "flops": None}

    n4, n2 = phase(100.0), phase(50.0)  # curves of (N=4, snr) and (N=2, snr)
    chosen = {"phases": {"search": phase(1.0), "stage2": phase(2.0), "curves": n4}}
    others = [{"phases": {"search": phase(3.0), "stage2": phase(4.0), "curves": dict(n4)}},
              {"phases": {"search": phase(5.0), "stage2": phase(6.0), "curves": dict(n2)}},
              {"phases": {"search": phase(7.0), "stage2": phase(8.0), "curves": dict(n2)}},
              {"phases": {"search": None, "stage2": phase(9.0)}}]
    assert [p and p["cpu_s"] for p in phases_of_others(chosen, others)] == [3.0, 4.0, 5.0, 6.0, 50.0, 7.0, 8.0,
                                                                             None, 9.0]


def test_payback_and_cost_per_1000_arithmetic():
    from tdcdiff.tune.cost import cost_per_1000, payback_images

    assert payback_images(600.0, 0.05, 0.03) == pytest.approx(30000)
    assert payback_images(600.0, 0.03, 0.03) is None and payback_images(600.0, 0.03, 0.05) is None
    assert cost_per_1000(0.036, 2.0) == pytest.approx(0.02)  # 36 s for 1,000 images at 2 per hour


# -- the tune directory ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One tiny finished tune: candidate 1 alone first, then everything (which must skip it)."""
    import os

    from tdcdiff.tune import Tune

    root = tmp_path_factory.mktemp("tune")
    os.environ["TDCDIFF_CACHE"] = str(root / "cache")
    tune = Tune(root / "tune", tiny_tune(), run_config=tiny_config(), progress=False)
    first = tune.run_candidate(1)
    marker = (root / "tune" / first["dir"] / "result.json").stat().st_mtime_ns
    results = tune.run_all()
    return root / "tune", tune, first, marker, results


@pytest.mark.slow
def test_one_candidate_alone_then_the_rest(tuned):
    out, tune, first, marker, _ = tuned
    assert first["name"] == "uniform 0.6" and "failed" not in first
    assert (out / first["dir"] / "result.json").stat().st_mtime_ns == marker  # not redone by run_all
    plan = json.loads((out / "candidates.json").read_text())["candidates"]
    assert [c["name"] for c in plan] == ["single", "uniform 0.6", "TDC k=0.4 N=2 snr"]
    for c in plan:
        record = json.loads((out / c["dir"] / "result.json").read_text())
        assert (out / c["dir"] / "bundle" / "manifest.json").exists()
        assert record["phases"]["stage2"]["flops"] == record["train_flops"] > 0
    # Same compute: each candidate's training FLOPs are the budget, up to the rounding of its step count (half a
    # step: a step of TDC trains every group once).
    records = [json.loads((out / c["dir"] / "result.json").read_text()) for c in plan]
    budget = tune.training_flops_per_candidate()
    for r in records:
        per_step = r["phases"]["stage2"]["flops"] / r["steps"]
        assert abs(r["train_flops"] - budget) <= per_step / 2 + 1, (r["name"], r["train_flops"], budget, per_step)


@pytest.mark.slow
def test_rerun_skips_finished_candidates_and_measurements(tuned, capsys):
    from tdcdiff.tune import Tune

    out, *_ = tuned
    stamps = {p: p.stat().st_mtime_ns for p in (out / "candidates").glob("*/result.json")}
    screening, fid = (out / "screening.json").read_text(), (out / "fid.json").read_text()
    again = Tune(out, tiny_tune(), progress=True)
    for spec in again.candidates:
        again.run_candidate(spec["index"])
    assert capsys.readouterr().out.count("finished earlier, skipped") == 3
    again.run_all()
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert (out / "screening.json").read_text() == screening and (out / "fid.json").read_text() == fid


@pytest.mark.slow
def test_undecided_finalists_get_seeds_up_to_the_cap_reusing_the_cached_ones(tuned, tmp_path):
    """--max-fid-seeds 3 on a copy: each finalist's verdict is read at look 1 of 2 (2 seeds, 97.5%), and only an
    undecided one (and the base) gets a third seed; the seeds measured before are reused, not sampled again."""
    import shutil

    from tdcdiff.tune import Tune
    from tdcdiff.verdict import QUALIFY

    out, *_, earlier = tuned
    judge = earlier["fid_protocol"]["judge"]
    assert judge["margin"] == judge["real_vs_real"]["fid_sd"] > 0 and judge["real_vs_real"]["n"] == 16
    assert judge["feature_net_info"]["accuracy"] > 0.9 and judge["feature_net_info"]["num_features"] == 128
    assert earlier["fid_protocol"]["seeds"]["start"] == earlier["fid_protocol"]["seeds"]["cap"] == 2
    copy = tmp_path / "more-seeds"
    shutil.copytree(out, copy)
    before = json.loads((copy / "fid.json").read_text())["models"]
    results = Tune(copy, tiny_tune(max_fid_seeds=3), progress=False).run_all()
    after = json.loads((copy / "fid.json").read_text())["models"]
    rows = {r["name"]: r for r in results["rows"]}
    used = []
    for name in results["finalists"]:
        gap = rows[name]["fid_gap"]
        assert gap["looks"] == 2 and gap["pairs"] == (2 if gap["look"] == 1 and gap["verdict"] != "undecided" else 3)
        assert len(rows[name]["fid"]) == gap["pairs"] and after[name]["fid"][:2] == before[name]["fid"]
        used.append(gap["pairs"])
    assert len(rows["base"]["fid"]) == max(used) and after["base"]["fid"][:2] == before["base"]["fid"]
    chosen = results["choice"]["name"]
    assert chosen is None or rows[chosen]["fid_gap"] is None or rows[chosen]["fid_gap"]["verdict"] in QUALIFY


@pytest.mark.slow
def test_other_candidate_settings_or_a_bad_index_are_refused(tuned):
    from tdcdiff.tune import Tune

    out, tune, *_ = tuned
    with pytest.raises(ValueError, match=r"other candidate settings \(widths: \[0.6\] there, \[0.5\] here\)"):
        Tune(out, tiny_tune(widths=(0.5,)), progress=False)
    with pytest.raises(ValueError, match="--candidate must be between 0 and 2"):
        tune.run_candidate(3)


@pytest.mark.slow
def test_outputs_table_plot_choice_and_cost(tuned):
    out, _, _, _, results = tuned
    for name in ("results.json", "table.csv", "frontier.png", "screening.json", "fid.json", "candidates.json"):
        assert (out / name).exists(), name
    rows = {r["name"]: r for r in results["rows"]}
    assert set(rows) == {"base", "single", "uniform 0.6", "TDC k=0.4 N=2 snr"}
    assert rows["base"]["quality_ratio"] == 1.0 and rows["base"]["train_flops"] == 0
    # Screening: the held-out loss with its SE, paired with the base image by image; bits/dim beside it, paired too.
    measure = results["screening_measure"]
    assert measure["key"] == "loss" and measure["name"] == "held-out denoising loss" and measure["timesteps"] == 100
    assert measure["second"]["key"] == "bpd" and measure["second"]["strata"] == 16
    assert measure["images"] == measure["second"]["images"] > 100
    candidates = [n for n in rows if n != "base"]
    for value, se, gap, bounds in (("screening", "screening_se", "screening_gap", (0, 2)),
                                   ("second", "second_se", "second_gap", (0, 8))):
        assert rows["base"][gap] == {"mean": 0.0, "se": 0.0}
        assert all(bounds[0] < r[value] < bounds[1] and 0 < r[se] < r[value] for r in rows.values())
        assert all(rows[n][gap]["mean"] == pytest.approx(rows[n][value] - rows["base"][value]) for n in candidates)
        # Paired: the shared images and noise cancel, so the difference is known better than either value.
        assert all(rows[n][gap]["se"] < max(rows[n][se], rows["base"][se]) for n in candidates)
    assert all(r["quality_ratio"] == r["screening"] / rows["base"]["screening"] for r in rows.values())
    assert all(r["second_ratio"] == r["second"] / rows["base"]["second"] for r in rows.values())
    # The finalists are the best candidates by the loss, as cached in screening.json.
    cached = json.loads((out / "screening.json").read_text())["measures"]
    assert cached["loss"]["protocol"] == {k: measure[k] for k in ("name", "timesteps", "images", "seed")}
    loss = {n: cached["loss"]["values"][n]["value"] for n in candidates}
    assert results["finalists"] == sorted(loss, key=loss.get)[:2]
    assert all(len(cached[m]["values"][n]["per_image"]) == measure["images"] for m in ("loss", "bpd") for n in rows)
    table = (out / "table.csv").read_text().splitlines()
    assert table[0].startswith("name,kind,sampling_flops,flops_ratio,time_s,time_ratio,screening_measure,screening,"
                               "screening_se,screening_gap_mean,screening_gap_se,quality_ratio,second_measure,second,"
                               "second_se,second_gap_mean,second_gap_se,second_ratio,fid_mean")
    assert all(",loss," in line and ",bpd," in line for line in table[1:])
    assert rows["uniform 0.6"]["flops_ratio"] < 0.7 and rows["TDC k=0.4 N=2 snr"]["flops_ratio"] < 1
    assert len(results["finalists"]) == 2
    finalists = [rows[n] for n in results["finalists"]]
    assert all(len(r["fid"]) == 2 and r["fid_gap"] is not None for r in finalists)
    assert all(rows[n]["fid_gap"] is None for n in rows if n not in results["finalists"])
    choice = results["choice"]
    if choice["name"] is not None:
        assert (out / "chosen" / "manifest.json").exists()
        assert json.loads((out / "chosen.json").read_text())["rule"] == choice["rule"]
        cost = json.loads((out / "cost.json").read_text())
        assert [p["phase"] for p in cost["phases"]][0] == "stage 1 (base)"
        assert cost["phases"][0]["flops"] > 0  # stage 1 was trained here
        assert [t["batch"] for t in cost["throughput"]] == [1, 4]  # the headline's: 1 and --batch
        assert (out / "cost.csv").read_text().startswith("phase,wall_s,cpu_s,flops,note")
        assert (out / "return.csv").read_text().startswith("batch,base_images_per_s,chosen_images_per_s,speedup")
    else:
        assert "keep the base" in choice["reason"]


@pytest.mark.slow
def test_screening_by_bits_per_dim_ranks_by_it_from_the_same_cache(tuned, tmp_path):
    """--screening bpd on a copy of the tuned directory: nothing is measured again (both measures are cached, each
    under its own protocol), the finalists and quality ratios follow bits/dim, and the loss becomes the second."""
    import shutil

    from tdcdiff.tune import Tune, table_rows

    out, _, _, _, by_loss = tuned
    copy = tmp_path / "bpd"
    shutil.copytree(out, copy)
    cache = (copy / "screening.json").read_text()
    results = Tune(copy, tiny_tune(screening="bpd"), progress=False).run_all()
    assert (copy / "screening.json").read_text() == cache
    measures = json.loads(cache)["measures"]
    assert results["screening_measure"]["key"] == "bpd" and results["screening_measure"]["second"]["key"] == "loss"
    rows, before = ({r["name"]: r for r in res["rows"]} for res in (results, by_loss))
    bpd = {n: measures["bpd"]["values"][n]["value"] for n in rows if n != "base"}
    assert results["finalists"] == sorted(bpd, key=bpd.get)[:2]
    for name, row in rows.items():
        assert (row["screening"], row["second"]) == (before[name]["second"], before[name]["screening"])
        assert row["screening_gap"] == before[name]["second_gap"]
        assert row["quality_ratio"] == row["screening"] / rows["base"]["screening"]
    header = list(table_rows(results["rows"], results["choice"]["name"], "bpd")[0])
    assert header[4:7] == ["bits/dim", "- base (paired)", "held-out loss (- base, paired)"]
    assert list(table_rows(by_loss["rows"], None, "loss")[0])[4:7] == [
        "held-out loss", "- base (paired)", "bits/dim (- base, paired)"]


@pytest.mark.slow
def test_a_measure_is_measured_again_when_its_protocol_changed_and_the_other_kept(tuned, tmp_path):
    """screening.json is valid per measure: a changed protocol re-measures that measure only; a file from before
    the loss could screen (bits/dim values and the loss as a scalar) keeps its bits/dim values."""
    import shutil

    from tdcdiff.tune import Tune

    out, *_ = tuned
    copy = tmp_path / "cache"
    shutil.copytree(out, copy)
    path = copy / "screening.json"
    measured = json.loads(path.read_text())["measures"]
    planted = json.loads(path.read_text())
    planted["measures"]["loss"]["protocol"]["timesteps"] = 50  # as if measured under another protocol
    planted["measures"]["loss"]["values"]["base"]["value"] = -1.0
    planted["measures"]["bpd"]["values"]["single"]["value"] = 123.0  # still valid: must be kept, not re-measured
    path.write_text(json.dumps(planted))
    tune = Tune(copy, tiny_tune(), progress=False)
    models = tune.models()
    screened = tune.screen(models)
    assert screened["single"]["bpd"]["value"] == 123.0
    assert screened["base"]["loss"]["value"] == measured["loss"]["values"]["base"]["value"]  # measured again: same
    assert json.loads(path.read_text())["measures"]["loss"]["protocol"]["timesteps"] == 100

    # A file of the layout before the loss could screen holds no model identities: measured again, same values.
    bpd = measured["bpd"]
    old = {"protocol": {"measure": bpd["protocol"]["name"], "images": bpd["protocol"]["images"], "strata": 16,
                        "seed": bpd["protocol"]["seed"], "second": "held-out denoising loss"},
           "unit": bpd["unit"],
           "values": {n: {**v, "value": 7.0, "held_out_loss": 0.5} for n, v in bpd["values"].items()}}
    path.write_text(json.dumps(old))
    screened = tune.screen(models)
    assert all(screened[n][m]["value"] == measured[m]["values"][n]["value"] for n in models for m in ("bpd", "loss"))
    assert json.loads(path.read_text())["format"] == "tdcdiff-tune-screening/2"


@pytest.mark.slow
def test_a_candidate_trained_again_is_measured_again_not_read_from_the_cache(tuned, tmp_path):
    """Cached screening values and FID belong to the weights they were measured on (Tune.model_ids): a
    candidate whose bundle changed under the same name is measured again; the others are reused."""
    import shutil

    from tdcdiff.bundle import load_bundle, save_bundle
    from tdcdiff.grouping import Grouping
    from tdcdiff.tune import Tune

    out, *_ = tuned
    copy = tmp_path / "retrained"
    shutil.copytree(out, copy)
    tune = Tune(copy, tiny_tune(), progress=False)
    record = tune.result(1)
    path = copy / record["dir"] / record["bundle"]
    bundle = load_bundle(path)
    experts = list(bundle.router.experts)
    with torch.no_grad():
        for p in experts[0].parameters():
            p.mul_(0.5)  # other weights under the same name, as a candidate trained again has
    m = bundle.manifest
    save_bundle(path, experts, Grouping.from_dict(m["grouping"]), bundle.scheduler, sample_shape=bundle.sample_shape,
                expert_flops=m["expert_flops"], base_flops=m["base_flops"])
    before = json.loads((copy / "screening.json").read_text())["measures"]
    name = record["name"]
    screened = tune.screen(tune.models())
    assert screened[name]["loss"]["value"] != before["loss"]["values"][name]["value"]
    assert all(screened[n]["loss"]["value"] == before["loss"]["values"][n]["value"] for n in before["loss"]["values"]
               if n != name)
    fid = tune.fid(tune.models(), [name])
    cached = json.loads((out / "fid.json").read_text())["models"]
    if name in cached:
        assert fid["models"][name]["fid"] != cached[name]["fid"]
    assert fid["models"]["base"]["fid"] == cached["base"]["fid"]


@pytest.mark.slow
def test_cli_tune_prints_the_table_and_the_cost(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tdcdiff.cli import app
    from tdcdiff.run import Run

    monkeypatch.setenv("TDCDIFF_CACHE", str(tmp_path / "cache"))
    source = Run(tmp_path / "run", tiny_config(), progress=False)
    source.train_base()
    args = ["tune", "--out", str(tmp_path / "tune"), "--base-from", str(tmp_path / "run"), "--tune-steps", "3",
            "--width", "0.6", "--k", "0.4", "--groups", "2", "--finalists", "3", "--fid-seeds", "2",
            "--fid-samples", "16", "--batch", "2", "--max-quality-loss", "10", "--price-per-hour", "2", "--screening",
            "bpd", "--min-model-speedup", "0", "-q"]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    assert "FID - base (paired)" in done.output and "held-out loss (- base, paired)" in done.output
    assert "screening: held-out bits/dim bound;" in done.output
    assert "chosen: " in done.output and (tmp_path / "tune" / "chosen" / "manifest.json").exists()
    assert "not run here (the base was given)" in done.output and "cost / 1k images" in done.output
    # --max-quality-loss 10 accepts anything that paired FID does not rule out: a choice always exists
    assert "pays back after" in done.output

    one = CliRunner().invoke(app, ["tune", "--out", str(tmp_path / "tune"), "--tune-steps", "3", "--width", "0.6",
                                   "--k", "0.4", "--groups", "2", "--candidate", "0", "-q"])
    assert one.exit_code == 0 and "finished earlier, skipped" not in one.output and "candidate 0 (single)" in one.output


def test_cli_tune_bad_input_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from tdcdiff.cli import app

    done = CliRunner().invoke(app, ["tune", "--out", str(tmp_path / "t"), "--width", "1.5"])
    assert done.exit_code == 2 and "error: --width values must be in (0, 1)" in done.output
    done = CliRunner().invoke(app, ["tune", "--out", str(tmp_path / "t"), "--base-from", str(tmp_path / "none")])
    assert done.exit_code == 2 and "no finished stage-1 base there" in done.output
    done = CliRunner().invoke(app, ["tune", "--out", str(tmp_path / "t"), "--screening", "fid"])
    assert done.exit_code == 2 and done.output.strip() == ("error: unknown --screening 'fid'; choose from loss "
                                                           "(held-out "
                                                           "denoising loss), bpd (held-out bits/dim bound)")
    assert not (tmp_path / "t").exists()


def test_cli_tune_bad_variant_is_refused_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from tdcdiff.cli import app

    for variant, message in (("mix", "--variant takes KEY=VALUE[,KEY=VALUE...], got 'mix'"),
                             ("finetune.bogus=1", "unknown keys ['bogus'] in config section 'finetune'")):
        done = CliRunner().invoke(app, ["tune", "--out", str(tmp_path / "t"), "--variant", variant])
        assert done.exit_code == 2 and f"error: {message}" in done.output, done.output
        assert not (tmp_path / "t" / "base" / "base").exists()


@pytest.mark.parametrize("index", ["-1", "3"])
def test_cli_tune_out_of_range_candidate_is_refused_before_anything_is_written(tmp_path, index):
    from typer.testing import CliRunner

    from tdcdiff.cli import app

    source = tmp_path / "run"  # looks like a finished run: it must not even be copied
    (source / "base" / "final").mkdir(parents=True)
    (source / "config.json").write_text("{}")
    done = CliRunner().invoke(app, ["tune", "--out", str(tmp_path / "t"), "--base-from", str(source), "--width", "0.6",
                                    "--k", "0.4", "--groups", "2", "--candidate", index])
    assert done.exit_code == 2, done.output
    # attack 2026-12-08 row 865: a new folder has no candidates.json to name; what was counted is the settings' plan
    assert f"error: --candidate must be between 0 and 2 (the settings given plan 3), got {index}" in \
           done.output.replace("\n", "")
    assert not (tmp_path / "t").exists()


@pytest.mark.slow
def test_uniform_time_candidate_is_fitted_by_measured_time(tuned, counted_time):
    """A uniform candidate budgeted in forward time: fitted with the base's latency table, then timed beside it and
    corrected (prune.fit.fit_to_measured_time). Time is counted from FLOPs (counted_time): the same on any machine."""
    from tdcdiff.flops import count_flops
    from tdcdiff.serialization import load_model
    from tdcdiff.tune import Tune

    out, *_ = tuned
    tune = Tune(out.parent / "time", tiny_tune(widths=(), ks=(), uniform_time_budgets=(0.7,)), base_from=out / "base",
                progress=False)
    assert [c["name"] for c in tune.candidates] == ["single", "uniform time 0.7"]
    record = tune.run_candidate(1)
    assert "failed" not in record, record
    assert record["budget_unit"] == "time" and record["latency_batch"] == 64
    trail = record["time_corrections"]
    assert trail[0]["budget"] == "latency table" and record["estimated_time_ratio"] == trail[0]["estimated_ratio"]
    assert record["estimated_time_ratio"] == pytest.approx(0.7, abs=0.7 * 0.03)  # the table's fit met the budget
    measured = [t for t in trail if "measured_ratio" in t]
    assert record["time_ratio"] == min((t["measured_ratio"] for t in measured), key=lambda m: abs(m - 0.7))
    pruned = load_model(out.parent / "time" / record["dir"] / "pruned")
    chosen = next(t for t in measured if t["measured_ratio"] == record["time_ratio"])
    assert count_flops(pruned, tune.base_run.sample_shape) == chosen["flops"]  # the try kept is the model trained
    assert (out.parent / "time" / record["dir"] / "bundle" / "manifest.json").exists()


@pytest.mark.slow
def test_class_conditional_base_is_tuned_with_its_labels(tmp_path, monkeypatch):
    """A class-conditional base through every phase: training, screening, FID and timing all need its labels
    (train, FID and timing refuse a class-conditional model without them)."""
    from conftest import tiny_config
    from tdcdiff.bundle import load_bundle
    from tdcdiff.tune import Tune
    from tdcdiff.tune.measures import screen_bpd, screen_loss

    monkeypatch.setenv("TDCDIFF_CACHE", str(tmp_path / "cache"))
    config = tiny_config(base_model="models_zoo:class_conditional_unet", base_model_steps=10)
    tune = Tune(tmp_path / "tune", tiny_tune(tune_steps=2, finalists=1, fid_samples=10, batch=2), run_config=config,
                progress=False)
    results = tune.run_all()
    rows = {r["name"]: r for r in results["rows"]}
    assert set(rows) == {"base", "single", "uniform 0.6", "TDC k=0.4 N=2 snr"} and not results["failed"]
    for name in ("single", "uniform 0.6", "TDC k=0.4 N=2 snr"):
        bundle = load_bundle(tmp_path / "tune" / rows[name]["bundle"])
        assert bundle.manifest["conditioning"] == {"num_class_embeds": 10, "num_classes": 10, "null_class": None}
    finalist = results["finalists"][0]
    assert len(rows[finalist]["fid"]) == 2 and len(rows["base"]["fid"]) == 2
    # Screening measured the held-out images with their own labels.
    run = tune.base_run
    router = load_bundle(tmp_path / "tune" / rows["single"]["bundle"]).router.eval()
    _, held_out = run.split()
    for measure, column in ((screen_loss, "screening"), (screen_bpd, "second")):
        labelled = measure(router, held_out, run.scheduler, seed=run.config.seed, labels=run.labels(router)[1])
        unlabelled = measure(router, held_out, run.scheduler, seed=run.config.seed)
        assert rows["single"][column] == pytest.approx(labelled["value"], rel=1e-9)
        assert labelled["value"] != pytest.approx(unlabelled["value"], rel=1e-9)


@pytest.fixture(scope="module")
def curved(tuned):
    """The tuned base with --curves (N=2 snr, sizes 0.6 and 1.0, 2 steps each): (Tune, the curves candidate's
    record)."""
    from tdcdiff.tune import Tune

    out, *_ = tuned
    settings = tiny_tune(tune_steps=20, widths=(), curves=True, curve_sizes=(0.6, 1.0), curve_steps=2)
    tune = Tune(out.parent / "curves", settings, base_from=out / "base", progress=False)
    return tune, tune.run_candidate(2)


@pytest.mark.slow
def test_curves_candidate_allocates_the_papers_mean_budget_from_measured_curves(curved, capsys):
    from dataclasses import replace

    from tdcdiff.budget import BudgetPlan
    from tdcdiff.tune import Tune

    tune, record = curved
    assert [c["name"] for c in tune.candidates] == ["single", "TDC k=0.4 N=2 snr", "TDC curves k=0.4 N=2 snr"]
    assert "failed" not in record, record
    curves = record["curves"]
    assert [[p["fraction"] for p in group] for group in curves] == [[0.6, 1.0], [0.6, 1.0]]
    assert all(p["se"] > 0 and abs(p["loss"]) < 1 for group in curves for p in group)
    # Both measures per point; the screening one (the loss, by default) is what allocates.
    assert all((p["loss"], p["se"]) == (p["loss_gap"]["mean"], p["loss_gap"]["se"]) and p["bpd_gap"]["se"] > 0
               for group in curves for p in group)
    allocations = record["allocations"]
    assert allocations["measure"] == "loss" and "held-out denoising loss" in allocations["loss"]
    paper, chosen = allocations["paper"], allocations["curves"]
    assert sorted(paper["fractions"]) == pytest.approx([0.7, 1.0])  # N=2, k=0.4: 1/2 + 1/2 x 0.4, then 1
    assert allocations["budget"] == pytest.approx(paper["mean_fraction"])
    assert chosen["mean_fraction"] <= allocations["budget"] + 1e-9 and set(chosen["fractions"]) <= {0.6, 1.0}
    assert paper["curve_loss"] is not None and chosen["curve_loss"] == pytest.approx(
        sum(next(p["loss"] for p in group if p["fraction"] == f) for group, f in zip(curves, chosen["fractions"])))
    # The TDC run pruned to the curves' fractions, and the curves' training is part of the same compute.
    run_plan = BudgetPlan.load(tune.dir / record["dir"] / "plan" / "plan.json")
    assert run_plan.fractions == chosen["fractions"]
    saved = json.loads((tune.dir / "curves" / "N2-snr" / "curves.json").read_text())
    assert saved["measure"] == "loss" and saved["measures"] == ["loss", "bpd"] and saved["points"] == curves
    spent = saved["train_flops"]
    assert record["phases"]["curves"]["flops"] == spent > 0
    assert record["train_flops"] == record["phases"]["stage2"]["flops"] + spent
    per_step = record["phases"]["stage2"]["flops"] / record["steps"]  # the curves' FLOPs are taken off the budget
    assert abs(record["train_flops"] - tune.training_flops_per_candidate()) <= per_step / 2 + 1
    # Screening by the bound later reuses the candidate, and says its budgets came from the loss's curves.
    Tune(tune.dir, replace(tune.config, screening="bpd"), progress=True).run_candidate(2)
    assert (f"finished earlier, skipped (its groups' budgets were allocated by loss curves, not bpd; delete "
            f"{tune.dir / record['dir']} to allocate them again)") in capsys.readouterr().out


@pytest.mark.slow
def test_curves_allocation_follows_the_screening_measure(tuned, tmp_path):
    """Curves on which the loss and the bound disagree (the loss finds group 0 hurt most by pruning, the bound
    group 1): each screening measure allocates by its own, and curves.json says which one its "loss" is."""
    from tdcdiff.grouping import make_groups
    from tdcdiff.tune import Tune
    from tdcdiff.tune.curves import CURVES_FORMAT

    out, *_ = tuned

    def point(fraction, loss, bpd):
        return {"fraction": fraction, "flops_ratio": fraction, "loss_gap": {"mean": loss, "se": 0.01},
                "loss_share": 0.1 + loss, "bpd_gap": {"mean": bpd, "se": 0.02}, "bpd_share": 1 + bpd}

    path = tmp_path / "t" / "curves" / "N2-uniform" / "curves.json"
    for screening, fractions, losses in (("loss", [1.0, 0.6], [[0.5, 0], [0.1, 0]]),
                                         ("bpd", [0.6, 1.0], [[0.1, 0], [0.5, 0]])):
        tune = Tune(tmp_path / "t", tiny_tune(widths=(), groupings=("uniform",), curves=True, curve_sizes=(0.6, 1.0),
                                              screening=screening), base_from=out / "base", progress=False)
        if not path.exists():
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps({
                "format": CURVES_FORMAT, "grouping": make_groups("uniform", 2, tune.base_run.scheduler).to_dict(),
                "sensitivity": [1.0, 2.0], "sizes": [0.6, 1.0], "skipped": {}, "steps": 50,
                "measures": ["loss", "bpd"], "points": [[point(0.6, 0.5, 0.1), point(1.0, 0, 0)],
                                                        [point(0.6, 0.1, 0.5), point(1.0, 0, 0)]],
                "base_loss_shares": [0.1, 0.1], "base_bpd_shares": [1, 1], "train_flops": 1, "phases": {}}))
        spec = next(c for c in tune.candidates if c["kind"] == "tdc-curves")
        curves, allocations = tune.curves_allocation(spec)
        assert allocations["measure"] == curves["measure"] == screening
        assert allocations["curves"]["fractions"] == fractions  # the mean budget 0.85 affords one group at 0.6
        assert [[p["loss"] for p in group] for group in curves["points"]] == losses
        assert json.loads(path.read_text()) == curves


@pytest.mark.slow
def test_old_bits_per_dim_curves_get_the_loss_measured_without_training_again(curved, tmp_path, monkeypatch, capsys):
    """A curves.json from before the loss was measured (bits/dim in loss, se, share, base_shares) gets the loss
    measured on the saved curve experts, the same values as when measured beside their training, which is not
    repeated; only when the experts' weights are gone are the curves measured (and trained) again."""
    import shutil

    import tdcdiff.tune.curves
    from tdcdiff.tune import Tune

    tune, _ = curved
    shutil.copytree(tune.dir / "curves", tmp_path / "t" / "curves")
    path = tmp_path / "t" / "curves" / "N2-snr" / "curves.json"
    new = json.loads(path.read_text())
    old = {k: v for k, v in new.items() if k not in ("format", "measures", "measure", "base_loss_shares",
                                                     "base_bpd_shares")}
    old.update(base_shares=new["base_bpd_shares"], loss="held-out bits/dim share of the group", points=[
        [{"fraction": p["fraction"], "flops_ratio": p["flops_ratio"], "loss": p["bpd_gap"]["mean"],
          "se": p["bpd_gap"]["se"], "share": p["bpd_share"]} for p in group] for group in new["points"]])
    path.write_text(json.dumps(old))

    def no_training(*args, **kwargs):
        raise AssertionError("a curve expert was trained again")

    with monkeypatch.context() as patched:
        patched.setattr(tdcdiff.tune.curves, "train", no_training)
        again = Tune(tmp_path / "t", tune.config, base_from=tune.base_run.dir, progress=False)
        curves = again.measure_curves(2, "snr")
    assert curves["measure"] == "loss" and curves["measures"] == ["loss", "bpd"]
    assert curves["remeasured"]["measures"] == ["loss"]
    for was, now in zip(sum(new["points"], []), sum(curves["points"], [])):
        assert now["bpd_gap"] == was["bpd_gap"] and now["bpd_share"] == was["bpd_share"]
        assert now["loss_gap"]["mean"] == pytest.approx(was["loss_gap"]["mean"], rel=1e-6, abs=1e-12)
        assert (now["loss"], now["se"]) == (now["loss_gap"]["mean"], now["loss_gap"]["se"])
    assert curves["base_loss_shares"] == pytest.approx(new["base_loss_shares"], rel=1e-6)
    assert (curves["train_flops"], curves["phases"]) == (new["train_flops"], new["phases"])
    assert json.loads(path.read_text()) == curves
    # Weights gone: trained and measured again, in both measures.
    path.write_text(json.dumps(old))
    shutil.rmtree(tmp_path / "t" / "curves" / "N2-snr" / "train" / "size-0.6-group-1")
    again.progress = True
    curves = again.measure_curves(2, "snr")
    assert "the curve experts' weights are gone, so their loss cannot be measured" in capsys.readouterr().out
    assert curves["measures"] == ["loss", "bpd"] and "remeasured" not in curves and curves["train_flops"] > 0
    assert (tmp_path / "t" / "curves" / "N2-snr" / "train" / "size-0.6-group-1" / "final").exists()


# -- the tune's own measurement records, read back as caches (attack 2026-12-08 rows 831, 832, 863) ------------
def test_a_measurement_records_entries_the_tune_would_not_write_are_named_and_measured_again(tmp_path):
    """fid.json's points, screening.json's values, sample_screen.json's points and phases.json's phases: each entry
    whose values are not finite numbers of the right type, sign and length is warned about (file and entry) and
    left out, so the tune measures it again; the sound ones are kept."""
    from tdcdiff.tune import measures, sample_screen
    from tdcdiff.tune.records import phase_problem, sound_entries

    nan, sha = float("nan"), "a" * 64
    good = {"model": sha, "setting": "ddim:2", "fid": [5.9, 6.0], "kid": [-0.01, 0.02], "precision": [1.0, 1.0],
            "recall": [0.5, 0.25]}
    point = {"distance": 0.88, "se": 0.02, "features": 1.5, "setting": "ddim:2", "model": sha}
    phase = {"wall_s": 1.5, "cpu_s": 2.0, "flops": None}
    cases = [
        (measures._point_problem, "point", good, {
            "nan": ({**good, "fid": [nan, 6.0]}, "'fid' holds nan, not a finite number in [0, inf]"),
            "text": ({**good, "fid": [5.9, "6.0"]}, "'fid' holds '6.0', not a finite number in [0, inf]"),
            "short": ({**good, "kid": [0.01]}, "'kid' must be a list of 2 numbers, got [0.01]"),
            "recall": ({**good, "recall": [1.5, 0.2]}, "'recall' holds 1.5, not a finite number in [0, 1]"),
            "unnamed": ({**good, "model": None}, "no 'model' (the weights' identity) or 'setting'"),
            "list": ([5.9], "a list, not a record")}),
        (sample_screen._point_problem, "point", point, {
            "negative": ({**point, "distance": -5.0, "se": nan},
                         "'distance' must be a finite number >= 0 (a distance), got -5.0"),
            "nan se": ({**point, "se": nan}, "'se' must be a finite number >= 0 (a distance), got nan"),
            "bool": ({**point, "features": True}, "'features' must be a finite number >= 0 (a distance), got True")}),
        (phase_problem, "phase", phase, {
            "negative": ({**phase, "cpu_s": -1}, "wall_s and cpu_s must be finite seconds >= 0, got 1.5 and -1"),
            "flops": ({**phase, "flops": 1.5}, "flops must be a count >= 0 or null, got 1.5")}),
    ]
    for check, what, sound, damaged in cases:
        path = tmp_path / f"{what}.json"
        with pytest.warns(UserWarning) as caught:
            kept = sound_entries(path, {"sound": sound, **{k: v for k, (v, _) in damaged.items()}}, check, what)
        assert kept == {"sound": sound}
        assert [str(w.message) for w in caught] == [f"{path}: {what} {name!r} is damaged ({problem}); measuring it "
                                                    "again" for name, (_, problem) in damaged.items()]


def test_a_damaged_measurement_record_file_is_warned_about_and_none():
    """A measurement record that is not JSON, or whose shared values (fid.json's judge) are not what the tune
    writes, is named in a warning and read as absent: the tune measures it again and writes over it."""
    import tempfile
    from pathlib import Path

    from tdcdiff.tune import measures
    from tdcdiff.tune.records import measurement_cache

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fid.json"
        path.write_text("{not json")
        with pytest.warns(UserWarning, match=rf"{path} is not valid JSON .*; measuring it again and replacing it"):
            assert measurement_cache(path, measures._fid_problem) is None
        judge = {"margin": "x", "margin_from": "given", "alpha": 0.025,
                 "real_vs_real": {"n": 16, "fid_mean": 3.5, "fid_sd": 1.7}}
        path.write_text(json.dumps({"format": measures.FID_FORMAT, "judge": judge, "reference": {"name": "d"}}))
        with pytest.warns(UserWarning, match=rf"{path} is damaged \('judge' must hold a margin \(a finite FID >= 0\)"):
            assert measurement_cache(path, measures._fid_problem) is None
        path.write_text(json.dumps({"format": measures.FID_FORMAT, "judge": {**judge, "margin": 0.6},
                                    "reference": {"name": "d"}, "models": {}}))
        assert measurement_cache(path, measures._fid_problem)["judge"]["margin"] == 0.6
        assert measurement_cache(Path(folder) / "none.json", measures._fid_problem) is None


@pytest.mark.slow
def test_a_rerun_measures_again_what_its_records_hold_damaged_and_reuses_the_rest(tuned, tmp_path):
    """Rows 831-832: a NaN or text FID in fid.json and a text per-image value in screening.json are warned about by
    file and entry and measured again (the same seeds and images give the same values), not read as results; the
    other entries are reused."""
    import math
    import shutil

    from tdcdiff.tune import Tune

    out, *_ = tuned
    copy = tmp_path / "damaged"
    shutil.copytree(out, copy)
    fid, screening = (json.loads((copy / name).read_text()) for name in ("fid.json", "screening.json"))
    before = list(fid["models"]["base"]["fid"]), list(screening["measures"]["loss"]["values"]["single"]["per_image"])
    fid["models"]["base"]["fid"] = [float("nan"), "6.0"]
    screening["measures"]["loss"]["values"]["single"]["per_image"][0] = "0.1"
    (copy / "fid.json").write_text(json.dumps(fid))
    (copy / "screening.json").write_text(json.dumps(screening))
    kept = {name: v for name, v in json.loads((out / "fid.json").read_text())["models"].items() if name != "base"}
    with pytest.warns(UserWarning) as caught:
        results = Tune(copy, tiny_tune(), progress=False).run_all()
    said = [str(w.message) for w in caught]
    assert f"{copy / 'fid.json'}: point 'base' is damaged ('fid' holds nan, not a finite number in [0, inf]); " \
           "measuring it again" in said
    assert f"{copy / 'screening.json'}: the loss value of model 'single' is damaged ('per_image' holds '0.1', not a " \
           "finite number in [0, inf]); measuring it again" in said
    rows = {r["name"]: r for r in results["rows"]}
    assert rows["base"]["fid"] == pytest.approx(before[0], rel=1e-4) and all(map(math.isfinite, rows["base"]["fid"]))
    after = json.loads((copy / "screening.json").read_text())["measures"]["loss"]["values"]["single"]["per_image"]
    assert after == pytest.approx(before[1], rel=1e-5)
    assert {n: v for n, v in json.loads((copy / "fid.json").read_text())["models"].items() if n != "base"} == kept


def test_a_chosen_folder_holding_the_users_files_is_refused_at_start(tmp_path):
    """Row 834: chosen/ that write_chosen could not replace (the user's files in it) is refused by Tune(), by
    `tdcdiff tune` and its --dry-run before any work, with write_chosen's own message, and left as it was."""
    from typer.testing import CliRunner

    from tdcdiff.cli import app
    from tdcdiff.tune import Tune

    out = tmp_path / "t"
    (out / "chosen").mkdir(parents=True)
    (out / "chosen" / "notes.txt").write_text("mine")
    message = (f"{out / 'chosen'} already exists and is not a tdcdiff bundle (a folder with a manifest.json of format "
               "tdcdiff-bundle/N), nor empty; writing there would delete what it holds: choose another path, or "
               "delete it first")
    with pytest.raises(ValueError, match=r"chosen already exists and is not a tdcdiff bundle"):
        Tune(out, tiny_tune(), run_config=tiny_config(), progress=False)
    for dry in ([], ["--dry-run"]):
        done = CliRunner().invoke(app, ["tune", "--out", str(out), "--width", "0.6", *dry])
        assert done.exit_code == 2 and done.output.replace("\n", "").startswith(f"error: {message}"), done.output
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if not p.name.startswith(".")) == \
           ["chosen", "chosen/notes.txt"]
