"""Latency measurement: cache keys, table round-trip and estimate, the measuring functions (never timing values),
and the counted clock that time-budget tests use."""

import pytest
import torch

from tdcdiff.latency import (
    COUNTED_FLOPS_PER_SECOND,
    LatencyTable,
    cache_key,
    clock,
    compare,
    device_name,
    forward_seconds,
    measure_table,
    time_ratios,
)
from tdcdiff.models import build_unet

DIGITS = (1, 8, 8)


@pytest.fixture(scope="module")
def unets():
    torch.manual_seed(0)
    return build_unet("digits-8").eval(), build_unet("digits-8", attention=True).eval()


def test_cache_key_names_architecture_batch_and_device(unets):
    plain, attention = unets
    key = cache_key(plain, DIGITS, 64, "cpu")
    assert key == cache_key(build_unet("digits-8"), DIGITS, 64, "cpu")  # weights do not matter, shapes do
    assert key != cache_key(attention, DIGITS, 64, "cpu")
    assert key != cache_key(plain, DIGITS, 1, "cpu")
    assert key != cache_key(plain, (1, 16, 16), 64, "cpu")
    assert "-b64-" in key and device_name("cpu").startswith("cpu:")


def test_table_round_trip_and_additive_estimate():
    table = LatencyTable("k", 10.0, {"a": {0.5: -2.0, 1.0: -4.0}, "b": {1.0: -3.0}}, {"batch": 64})
    again = LatencyTable.from_json(table.to_json())
    assert again == table
    assert again.estimate({}) == 10.0
    assert again.estimate({"a": 0.5, "b": 1.0}) == pytest.approx(10.0 - 2.0 - 3.0)
    assert again.estimate({"a": 0.25}) == pytest.approx(9.0)  # linear from the implicit 0 at level 0
    assert again.estimate({"a": 0.75, "b": 0.0}) == pytest.approx(7.0)
    with pytest.raises(KeyError, match="'c'"):
        again.estimate({"c": 0.5})
    with pytest.raises(ValueError, match="not a tdcdiff latency table"):
        LatencyTable.from_json('{"version": 99}')


def test_measuring_returns_positive_times_in_model_order(unets):
    plain, attention = unets
    times = compare([plain, attention], DIGITS, 2, repeats=3, warmup=1, min_seconds=0.0)
    assert [len(t) for t in times] == [3, 3] and all(s > 0 for t in times for s in t)
    assert forward_seconds(plain, DIGITS, 1, repeats=1, warmup=0) > 0
    ratios = time_ratios([plain, attention], DIGITS, 1, repeats=2, warmup=0, min_seconds=0.0)
    assert ratios[0] == 1.0 and ratios[1] > 0
    with pytest.raises(ValueError, match="at least one model"):
        compare([], DIGITS, 1)


def test_the_counted_clock_gives_flops_times_and_keeps_its_own_tables(unets, monkeypatch):
    from tdcdiff.flops import count_flops

    plain, attention = unets
    measured_key = cache_key(plain, DIGITS, 4, "cpu")
    monkeypatch.setenv("TDCDIFF_CLOCK", "flops")
    assert clock() == "flops" and cache_key(plain, DIGITS, 4, "cpu") != measured_key
    times = compare([plain, attention], DIGITS, 4, repeats=2)
    assert times == [[count_flops(m, DIGITS) * 4 / COUNTED_FLOPS_PER_SECOND] * 2 for m in (plain, attention)]
    assert time_ratios([plain, attention], DIGITS, 4)[1] == pytest.approx(
        count_flops(attention, DIGITS) / count_flops(plain, DIGITS))
    monkeypatch.setenv("TDCDIFF_CLOCK", "wall")
    with pytest.raises(ValueError, match=r"^TDCDIFF_CLOCK='wall' is not a clock; set it to 'flops' .* or unset it"):
        compare([plain], DIGITS, 1)


def test_measure_table_caches_and_measures_only_missing_levels(unets, tmp_path):
    plain, _ = unets
    built = []

    def variant(name):
        def build():
            built.append(name)
            return build_unet("digits-8").eval()

        return build

    table = measure_table(plain, {"u": {0.5: variant("u0.5")}}, DIGITS, 1, cache_dir=tmp_path, repeats=1, warmup=0)
    files = list(tmp_path.glob("*.json"))
    assert [f.name for f in files] == [f"{table.key}.json"] and table.base_seconds > 0
    again = measure_table(
        plain, {"u": {0.5: variant("again"), 1.0: variant("u1")}}, DIGITS, 1, cache_dir=tmp_path, repeats=1, warmup=0
    )
    assert built == ["u0.5", "u1"]
    assert set(again.deltas["u"]) == {0.5, 1.0} and again.base_seconds == table.base_seconds
    assert LatencyTable.from_json(files[0].read_text()) == again


@pytest.mark.slow
def test_run_prunes_to_time_budgets_and_records_flops_and_time(tmp_path, monkeypatch, counted_time):
    """--budget-unit time: budgets are fractions of the base's time from the cached latency table; every expert
    records its FLOPs and its directly timed forward; a changed unit is refused. Time is counted from FLOPs
    (counted_time), so the budgets and every correction are the same on any machine."""
    from conftest import tiny_config
    from tdcdiff.flops import count_flops
    from tdcdiff.run import Run
    from tdcdiff.serialization import load_model
    from tdcdiff.surgery.depth import removed_units

    monkeypatch.setenv("TDCDIFF_CACHE", str(tmp_path / "cache"))
    config = tiny_config(budget_unit="time", latency_batch=4)
    config.search.depth = True
    run = Run(tmp_path / "run", config, progress=False)
    run.train_base()
    summaries = run.prune()
    assert len(list((tmp_path / "cache" / "latency").glob("*.json"))) == 1
    table = run.latency_table(run.base_model())
    assert set(table.deltas) >= {"mid_block.resnets.0", "mid_block.resnets.1", "down_blocks.0"}
    base_flops = count_flops(run.base_model(), run.sample_shape)
    assert table.base_seconds == base_flops * 4 / COUNTED_FLOPS_PER_SECOND  # the counted clock, at batch 4
    plan = run.plan()
    for s, fraction in zip(summaries, plan.fractions):
        assert s["budget_unit"] == "time" and s["budget"] == pytest.approx(fraction * table.base_seconds)
        trail = s["time_corrections"]  # the winner timed directly, then refitted while it missed the plan
        assert 1 <= len(trail) <= 4 and trail[0]["budget"] == "latency table"
        assert s["estimated_time_ratio"] == trail[0]["estimated_ratio"]
        assert abs(s["estimated_time_ratio"] / fraction - 1) <= config.search.tolerance  # the winner met the table
        chosen = next(t for t in trail if t.get("measured_ratio") == s["time_ratio"])
        assert chosen["flops"] == s["flops"]
        assert s["time_ratio"] > 0 and 0 < s["flops_ratio"] <= 1 and s["latency_batch"] == 4
        assert s["time_ratio"] == pytest.approx(s["flops_ratio"])  # counted time is FLOPs
        model = load_model(run.dir / "prune" / f"group_{s['group']}")
        assert removed_units(model) == [u for u, v in s["decision"].items() if ".resnets." in u and v]
    config.budget_unit = "flops"
    with pytest.raises(ValueError,
                       match="setting 'budget_unit' differs .*'time' -> 'flops'.* stage 'plan' has already run"):
        Run(tmp_path / "run", config, progress=False).prune()


@pytest.mark.parametrize("max_corrections, tolerance, tries", [(2, 0.0, 3), (0, 0.0, 1), (2, float("inf"), 1)])
def test_fit_to_measured_time_corrects_the_budget_by_the_measured_miss(unets, tmp_path, counted_time,
                                                                        max_corrections, tolerance, tries):
    """Each try is timed directly; a miss refits the decision to FLOPs x (target / measured) ** (1 / slope), the
    slope 0.5 at first (tolerance 0 always misses, infinity never does). Time is counted from FLOPs (counted_time),
    so every try and correction is the same on any machine."""
    from tdcdiff.flops import count_flops
    from tdcdiff.prune.fit import fit_to_measured_time, measure_latency_table

    plain, _ = unets
    table = measure_latency_table(plain, DIGITS, 2, depth_units=False, max_levels=2, cache_dir=tmp_path,
                                  repeats=1, warmup=0)
    timed = fit_to_measured_time(plain, {}, 0.7, DIGITS, 2, table, max_corrections=max_corrections,
                                 tolerance=tolerance, repeats=1)
    trail = timed.trail
    measured = [t for t in trail if "measured_ratio" in t]
    assert trail[0]["budget"] == "latency table" and trail[0]["estimated_ratio"] == pytest.approx(0.7, rel=0.03)
    assert len(measured) == tries  # every try is measured: each correction here is reachable
    base_flops = count_flops(plain, DIGITS)
    assert all(t["measured_ratio"] == pytest.approx(t["flops"] / base_flops) for t in measured)  # counted time
    if len(trail) > 1 and "measured_ratio" in trail[1]:
        first, second = trail[0], trail[1]
        wanted = min(first["flops"] * (0.7 / first["measured_ratio"]) ** 2, count_flops(plain, DIGITS))
        assert second["budget"] == "FLOPs" and second["flops"] == pytest.approx(wanted, rel=0.03)
    assert timed.time_ratio == min((t["measured_ratio"] for t in measured), key=lambda m: abs(m - 0.7))
    assert count_flops(timed.fit.model, DIGITS) == timed.fit.flops
    assert timed.fit.flops == next(t["flops"] for t in measured if t["measured_ratio"] == timed.time_ratio)


def test_a_timing_batch_larger_than_memory_is_one_line(unets):
    from tdcdiff.latency import forward_seconds

    plain, _ = unets
    with pytest.raises(ValueError, match=r"not enough memory for a timing batch of 10000000000 samples .*lower "
                                         r"--latency-batch"):
        forward_seconds(plain, DIGITS, 10**10)


DAMAGED_BASE_SECONDS = ["0", "0.0", "NaN", "-0.5", "1e-12", "Infinity", '"0.03"', "true", "null"]


@pytest.mark.parametrize("value", DAMAGED_BASE_SECONDS)
def test_a_damaged_cached_base_time_is_warned_about_measured_again_and_replaced(unets, tmp_path, monkeypatch, value):
    """Attack g rows 758, 759: a cached base_seconds of 0 divided by zero after the search, NaN / -0.5 / 1e-12
    became the run's time ratio; now every field is checked, the entry named in a warning and re-measured."""
    from tdcdiff.flops import count_flops
    from tdcdiff.latency import ExpertTimer, base_seconds

    plain, attention = unets
    monkeypatch.setenv("TDCDIFF_CLOCK", "flops")
    monkeypatch.setenv("TDCDIFF_CACHE", str(tmp_path))
    truth = count_flops(plain, DIGITS) * 2 / COUNTED_FLOPS_PER_SECOND
    key = cache_key(plain, DIGITS, 2, "cpu")
    path = tmp_path / "latency" / f"{key}.json"
    path.parent.mkdir()
    good = LatencyTable(key, truth, {"u": {0.5: -truth / 4}}).to_json()
    path.write_text(good.replace(f'"base_seconds": {truth!r}', f'"base_seconds": {value}'))
    message = (f"the cached latency table of the base is damaged or not this model's: {path} is damaged "
               f"\\(base_seconds .* is not a forward time, a finite number of seconds >= 1e-07\\); measuring the base "
               f"again and replacing {path}$")
    with pytest.warns(UserWarning, match=message):
        timer = ExpertTimer(plain, DIGITS, 2)  # before any search: the run's prune stage makes it first
    assert timer.base_time is None  # measured at the first expert that needs it (k=1 times nothing)
    assert timer.ratio(attention) == pytest.approx(count_flops(attention, DIGITS) / count_flops(plain, DIGITS))
    assert timer.base_time == truth
    assert LatencyTable.from_json(path.read_text()).base_seconds == truth  # replaced
    path.write_text(good.replace(f'"base_seconds": {truth!r}', f'"base_seconds": {value}'))
    with pytest.warns(UserWarning, match=message):
        assert base_seconds(plain, DIGITS, 2) == truth


@pytest.mark.parametrize("entry, problem", [
    ("folder", r"\.json is a folder"),  # row 784: it named no cache, and came after the search
    ("link", r"\.json is a symlink \(to .*elsewhere\.json\), not a file tdcdiff wrote"),
    ("[]", r"\.json holds a list, not a JSON object"),
    ("{", r"\.json is damaged \(Expecting property name"),
    ("other key", r"\.json holds the table of key 'k', not this model's"),
    ("version 1.0", r"\.json is damaged \(version 1\.0, expected 1\)"),
    ("level 2", r"\.json is damaged \(deltas of 'u': level 2\.0 is not a width ratio in \(0, 1\]\)"),
    ("change NaN", r"\.json is damaged \(deltas of 'u': the change nan at level 0\.5 is not a finite number"),
])
def test_a_damaged_or_foreign_latency_cache_entry_is_warned_about_and_replaced(unets, tmp_path, monkeypatch, entry,
                                                                               problem):
    plain, _ = unets
    monkeypatch.setenv("TDCDIFF_CLOCK", "flops")
    key = cache_key(plain, DIGITS, 1, "cpu")
    cache, elsewhere = tmp_path / "cache", tmp_path / "elsewhere.json"
    path = cache / f"{key}.json"
    good = LatencyTable(key, 0.5, {"u": {0.5: -0.1}})
    edits = {"other key": LatencyTable("k", 0.5).to_json(), "[]": "[]", "{": "{",
             "version 1.0": good.to_json().replace('"version": 1', '"version": 1.0'),
             "level 2": good.to_json().replace("0.5,", "2.0,"),
             "change NaN": good.to_json().replace("-0.1", "NaN")}
    cache.mkdir()
    if entry == "folder":
        (path / "inside").mkdir(parents=True)
    elif entry == "link":
        elsewhere.write_text(good.to_json())
        path.symlink_to(elsewhere)
    else:
        path.write_text(edits[entry])
    with pytest.warns(UserWarning, match=f"is damaged or not this model's: .*{problem}.*; measuring the base again "
                                         f"and replacing {path}$"):
        table = measure_table(plain, {"u": {0.5: lambda: build_unet("digits-8").eval()}}, DIGITS, 1, cache_dir=cache)
    assert path.is_file() and not path.is_symlink() and LatencyTable.from_json(path.read_text()) == table
    assert table.key == key and 0.5 in table.deltas["u"] and [p.name for p in cache.iterdir()] == [path.name]
    assert elsewhere.read_text() == good.to_json() if entry == "link" else not elsewhere.exists()


def test_expert_timer_refuses_a_base_time_that_is_not_a_forward_time(unets):
    from tdcdiff.latency import ExpertTimer

    for bad in (0.0, float("nan"), -1.0, 1e-12, True, "0.1"):
        with pytest.raises(ValueError, match=r"^base_time must be the base's seconds per forward, a finite number "
                                             r">= 1e-07, got "):
            ExpertTimer(unets[0], DIGITS, 1, base_time=bad)
