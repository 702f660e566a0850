"""tdcdiff tune's joint space: models x sampling settings against a reference, the sample screen that picks the
settings for FID, the headline (free setting vs model), the shipped bundle's default sampling, and reruns."""

import json
import statistics

import pytest
from typer.testing import CliRunner

from conftest import tiny_config
from test_tune import tiny_tune

LADDER = ("ddim:1", "dpm-solver++:4", "ddim:8:c2")  # ddim:1: a deliberately bad setting the screen must see


def test_pick_settings_takes_the_two_fastest_within_the_screens_slack():
    from tdcdiff.sampling_setting import SamplingSetting
    from tdcdiff.tune.ladder import SCREEN_SLACK, pick_settings

    ref, fast, faster, bad, slow = (SamplingSetting.parse(t) for t in
                                    ("ddim:50", "dpm-solver++:10", "dpm-solver++:6", "ddim:2", "ddim:100"))
    distances = {ref: 1.0, fast: 1.3, faster: SCREEN_SLACK, bad: 2.0, slow: 0.5}
    times = {ref: 5.0, fast: 1.0, faster: 0.6, bad: 0.2, slow: 10.0}
    assert pick_settings(distances, times, ref) == [faster, fast]  # ddim:2 is faster, but screened out
    assert pick_settings({ref: 1.0, bad: 2.0}, {ref: 5.0, bad: 0.2}, ref) == []
    assert pick_settings({ref: 1.0, slow: 0.5}, {ref: 5.0, slow: 10.0}, ref) == [slow]


def test_fid_points_judge_the_base_at_every_setting_a_candidate_is_picked_at():
    from tdcdiff.sampling_setting import SamplingSetting
    from tdcdiff.tune.ladder import fid_points

    ref, d10, d6, c3 = (SamplingSetting.parse(t)
                        for t in ("ddim:50", "dpm-solver++:10", "dpm-solver++:6", "ddim:50:c3"))
    # the screen passed the base only at c3 and the candidates at dps10/dps6: the base goes to FID at all three
    picks = {"base": [c3], "tdc": [d6, d10], "uniform": [d10]}
    assert fid_points(picks, ref) == ["base @ ddim:50:c3", "base @ dpm-solver++:6", "base @ dpm-solver++:10",
                                      "tdc", "tdc @ dpm-solver++:6", "tdc @ dpm-solver++:10",
                                      "uniform", "uniform @ dpm-solver++:10"]
    assert fid_points({"base": [], "single": []}, ref) == ["single"]


def test_headline_splits_the_speed_into_the_free_setting_and_the_model():
    from tdcdiff.tune.ladder import headline

    def row(name, model, setting, t, verdict=None, flops=1.0):
        gap = {"verdict": verdict} if verdict else None
        return {"name": name, "model": model, "setting": setting, "time_s": t, "time_1_s": t * 2, "fid_gap": gap,
                "flops_ratio": flops}

    rows = [row("base", "base", "ddim:50", 10.0), row("base @ dpm-solver++:10", "base", "dpm-solver++:10", 2.0,
                                                      "non-inferior", flops=0.2),
            row("base @ ddim:2", "base", "ddim:2", 0.5, "inferior"),
            row("u @ dpm-solver++:10", "u", "dpm-solver++:10", 1.0, "better", flops=0.1),
            row("base @ dpm-solver++:6", "base", "dpm-solver++:6", 1.25, "undecided", flops=0.12),
            row("single @ dpm-solver++:6", "single", "dpm-solver++:6", 1.25, "non-inferior", flops=0.12)]
    head = headline(rows, "u @ dpm-solver++:10", 64)
    assert head["best_free"] == "base @ dpm-solver++:10"
    # the model's 2x is all architecture: it is sampled at the free setting itself
    assert head["by_batch"]["64"] == {"total": 10.0, "free": 5.0, "model": 2.0, "setting": 1.0, "architecture": 2.0}
    assert "(u: 2.00x from its architecture, 50% of the base's FLOPs, x 1.00x from sampling at dpm-solver++:10)" \
        in head["text"]
    # an unpruned model trained longer gains only from the fewer steps it holds quality at
    longer = headline(rows, "single @ dpm-solver++:6", 64)["by_batch"]["64"]
    assert longer == {"total": 8.0, "free": 5.0, "model": 1.6, "setting": 1.6, "architecture": 1.0}
    assert ("(single: 1.00x from its architecture, 100% of the base's FLOPs, x 1.60x from sampling at "
            "dpm-solver++:6, where the base alone was not judged as good)") in headline(
                rows, "single @ dpm-solver++:6", 64)["text"]
    assert "10.00x faster than the reference" in head["text"] and "5.00x from the sampler/steps alone" in head["text"]
    free = headline(rows, "base @ dpm-solver++:10", 64)
    assert free["by_batch"]["1"]["model"] == 1.0 and "tune ships the free setting" in free["text"]
    assert ("beats the best free setting by a measured 1.1x (the lower 95% bound over paired timing rounds, "
            "--min-model-speedup)") in headline(rows, "base @ dpm-solver++:10", 64, min_model_speedup=1.1)["text"]
    assert headline(rows[:1] + rows[2:3], None, 64)["best_free"] == "base"  # the reference is always a free row


def test_within_model_agreement_counts_the_pairs_of_settings_the_screen_orders_like_fid():
    from tdcdiff.tune.ladder import within_model_agreement

    def row(model, distance, fid):
        return {"model": model, "screen_distance": distance, "fid": fid}

    # MNIST-16 seed 0's kind: a solver further from the DDIM target than DDIM-50 but better by FID
    rows = [row("base", 0.155, [1.3, 1.2]), row("base", 0.210, [0.7, 0.8]), row("base", 0.215, [1.7]),
            row("u", 0.17, [0.9]), row("u", 0.23, [1.7]), row("u", None, [0.1]), row("v", 0.5, [])]
    assert within_model_agreement(rows) == {"agree": 3, "pairs": 4}  # base: 2 of 3 pairs, u: 1 of 1
    assert within_model_agreement(rows[:1] + rows[3:4]) == {"agree": 0, "pairs": 0}  # no two of one model


@pytest.mark.parametrize("settings, message", [
    (("heun:5",), "--settings 'heun:5': unknown sampler"),
    (("ddim:5", "ddim:5"), "--settings ddim:5 is given twice"),
    (("ddim",), "--settings 'ddim': takes sampler:steps"),
])
def test_bad_settings_are_refused_by_the_config(settings, message):
    with pytest.raises(ValueError, match=message):
        tiny_tune(settings=settings).validate()


def test_cli_an_invalid_setting_is_one_line_before_anything_is_written(tmp_path):
    from tdcdiff.cli import app

    out = tmp_path / "tune"
    for args, message in ((["--settings", "ddim:10 heun:5"], "error: --settings 'heun:5': unknown sampler"),
                          (["--reference", "ddim:0"], "error: --reference 'ddim:0': sampling steps must be")):
        done = CliRunner().invoke(app, ["tune", "--out", str(out), *args])
        assert done.exit_code != 0 and done.output.startswith(message), done.output
        assert len(done.output.strip().splitlines()) == 1 and not out.exists()


@pytest.fixture(scope="module")
def laddered(tmp_path_factory):
    """A tiny tune with a ladder: the base and the best candidate crossed with LADDER (reference ddim:4)."""
    import os

    from tdcdiff.run import Run
    from tdcdiff.tune import Tune

    root = tmp_path_factory.mktemp("ladder")
    os.environ["TDCDIFF_CACHE"] = str(root / "cache")
    Run(root / "run", tiny_config(), progress=False).train_base()
    config = tiny_tune(ks=(), finalists=1, settings=LADDER, screen_samples=16, max_quality_loss=10.0, timing_repeats=2)
    tune = Tune(root / "tune", config, base_from=root / "run", progress=False)
    return root, tune, tune.run_all()


@pytest.mark.slow
def test_the_ladder_crosses_the_base_and_the_best_candidate_with_every_setting(laddered):
    from tdcdiff.tune.ladder import SCREEN_SLACK

    root, tune, results = laddered
    rows = {r["name"]: r for r in results["rows"]}
    assert results["reference"] == "ddim:4" and results["ladder"] == list(LADDER)
    best = min(("single", "uniform 0.6"), key=lambda n: rows[n]["screening"])
    crossed = {f"{m} @ {s}" for m in ("base", best) for s in LADDER}
    assert set(rows) == {"base", "single", "uniform 0.6"} | crossed
    assert all(rows[f"base @ {s}"]["model"] == "base" and rows[f"base @ {s}"]["setting"] == s for s in LADDER)
    # every point timed at the user's batch and at 1, the rounds kept for the speed bar; FLOPs follow the steps
    assert all(r["time_s"] > 0 and r["time_1_s"] > 0 for r in rows.values())
    assert all(len(r["time_rounds"]) == tune.config.timing_repeats and r["time_s"] == statistics.median(
        r["time_rounds"]) for r in rows.values())
    assert rows["base @ ddim:1"]["sampling_flops"] * 4 == rows["base"]["sampling_flops"]
    # the sample screen: measured for the crossed models' points only, the bad setting far off and never a finalist
    assert all((rows[n]["screen_distance"] is not None) == (rows[n]["model"] in ("base", best)) for n in rows)
    assert rows["base @ ddim:1"]["screen_distance"] > SCREEN_SLACK * rows["base"]["screen_distance"]
    assert rows["base @ ddim:1"]["screen_features"] > 0
    assert not any(n.endswith("@ ddim:1") for n in results["finalists"])
    assert all(rows[n]["fid_gap"] is not None for n in results["finalists"])
    # the base is judged at every setting a candidate is, so the headline splits free and model on the same settings
    assert {rows[n]["setting"] for n in results["finalists"]} <= {rows[n]["setting"] for n in results["finalists"]
                                                                 if rows[n]["model"] == "base"} | {"ddim:4"}
    screen = results["sample_screen"]
    assert screen["target"] == "ddim:200" and screen["images"] == 16 and screen["pairs"] >= 2
    assert screen["spearman_vs_fid"] is None or -1 <= screen["spearman_vs_fid"] <= 1
    assert 0 <= screen["within_model"]["agree"] <= screen["within_model"]["pairs"]
    head = results["headline"]
    assert head["best_free"] in rows and rows[head["best_free"]]["model"] == "base"
    for v in head["by_batch"].values():
        assert v["total"] == pytest.approx(v["free"] * v["model"])


@pytest.mark.slow
def test_a_rerun_that_ships_nothing_removes_the_last_choice(laddered, tmp_path):
    # attack 2026-12-07f row 504: chosen/ and chosen.json of an earlier run stayed, ready to be deployed
    import shutil

    from tdcdiff.tune import Tune

    root, _, results = laddered
    assert results["choice"]["name"] is not None  # the fixture's run shipped something
    out = tmp_path / "tune"
    shutil.copytree(root / "tune", out)
    # no ladder: the only free setting is the reference itself, never shipped; no model is 1000x faster than it
    config = tiny_tune(ks=(), finalists=1, settings=(), max_quality_loss=10.0, min_model_speedup=1000.0,
                       timing_repeats=2)
    # attack 2026-12-07g row 739: chosen/ a symlink made the rerun fail in rmtree after all its work
    (out / "chosen").rename(tmp_path / "deployed")
    (out / "chosen").symlink_to(tmp_path / "deployed")
    again = Tune(out, config, base_from=root / "run", progress=False).run_all()
    assert again["choice"]["name"] is None and "--min-model-speedup" in again["choice"]["reason"]
    assert not any((out / name).exists() or (out / name).is_symlink()
                   for name in ("chosen", "chosen.json", "cost.json", "cost.csv", "return.csv"))
    assert (tmp_path / "deployed" / "manifest.json").exists()  # the link is removed, not what it points at
    # attack 2026-12-07g row 780: a tune.json that is not a mapping with a 'plan' was a TypeError
    for damaged in ("[]", '{"plan": null}'):
        (out / "tune.json").write_text(damaged)
        with pytest.raises(ValueError, match=r"tune.json is damaged \(no mapping under 'plan'\); delete it: the tune "
                                             r"makes it again$"):
            Tune(out, config, base_from=root / "run", progress=False)


@pytest.mark.slow
def test_the_chosen_bundle_samples_with_the_chosen_setting_by_default(laddered, tmp_path):
    from tdcdiff.bundle import load_bundle
    from tdcdiff.cli import app

    root, tune, results = laddered
    chosen = results["choice"]["name"]
    assert chosen is not None  # --max-quality-loss 10: a candidate at the reference qualifies at worst
    row = next(r for r in results["rows"] if r["name"] == chosen)
    assert row["fid_gap"] is not None or row["setting"] == results["reference"]  # settings qualify by FID only
    bundle = load_bundle(root / "tune" / "chosen")
    assert str(bundle.sampling) == row["setting"]
    assert json.loads((root / "tune" / "chosen.json").read_text())["sampling"] == row["setting"]
    done = CliRunner().invoke(app, ["sample", "--bundle", str(root / "tune" / "chosen"), "--num", "2", "--output",
                                    str(tmp_path / "s.png")])
    setting = bundle.sampling
    assert done.exit_code == 0 and f"{setting.sampler} {setting.steps} steps" in done.output, done.output


@pytest.mark.slow
def test_a_free_setting_ships_as_the_base_with_that_sampling(laddered, tmp_path):
    from tdcdiff.bundle import load_bundle
    from tdcdiff.cli import app
    from tdcdiff.sampling_setting import SamplingSetting
    from tdcdiff.tune.ship import write_chosen

    _, tune, _ = laddered
    setting = SamplingSetting.parse("dpm-solver++:3")
    write_chosen(tune, {"model": "base"}, setting, tmp_path / "free")
    assert load_bundle(tmp_path / "free").sampling == setting
    done = CliRunner().invoke(app, ["sample", "--bundle", str(tmp_path / "free"), "--num", "2", "--output",
                                    str(tmp_path / "s.png")])
    assert done.exit_code == 0 and "dpm-solver++ 3 steps" in done.output, done.output


@pytest.mark.slow
def test_a_rerun_reuses_the_screens_samples_and_every_measurement(laddered):
    from tdcdiff.tune import Tune

    root, _, results = laddered
    out = root / "tune"
    files = ("sample_screen.json", "sample_screen/target.pt", "fid.json", "screening.json")
    stamps = {f: (out / f).stat().st_mtime_ns for f in files}
    again = Tune(out, tiny_tune(ks=(), finalists=1, settings=LADDER, screen_samples=16, max_quality_loss=10.0),
                 progress=False).run_all()
    assert {f: (out / f).stat().st_mtime_ns for f in files} == stamps
    assert again["finalists"] == results["finalists"]


@pytest.mark.slow
def test_dry_run_counts_the_settings_sampling(laddered):
    from tdcdiff.run.estimate import estimate_tune
    from tdcdiff.tune import candidate_list

    root, *_ = laddered
    config = tiny_tune(ks=(), finalists=1, settings=LADDER)
    text = estimate_tune(root / "dry", config, candidate_list(config), base_from=root / "run")
    assert "sampling settings" in text and "x 3 settings" in text


@pytest.mark.slow
def test_the_second_judge_samples_each_point_at_its_own_setting(laddered):
    # bench/second_judge.rescore sampled every row at the run's sampler (and failed on "model @ setting" rows):
    # in the default network's space it must give the tune's own per-seed FIDs back (the same images).
    from second_judge import rescore
    from tdcdiff.features import DEFAULT_FEATURE_NET

    root, _, results = laddered
    scores = rescore(root / "tune", DEFAULT_FEATURE_NET, say=lambda line: None)
    crossed = [r["name"] for r in results["rows"] if r["fid"] and r["name"] != r["model"]]
    assert crossed and set(scores["second"]) == {r["name"] for r in results["rows"] if r["fid"]}
    for name, fids in scores["default"].items():
        assert scores["second"][name] == pytest.approx(fids, rel=1e-4), name


def test_cli_a_batch_beyond_memory_is_refused_before_any_work_in_the_run_and_the_dry_run(tmp_path):
    """`--batch` is the timing phase's sampling batch: refused naming --batch before training anything, by
    `--dry-run` alike (attack 2026-12-07e row 431: refused after all training, naming --num)."""
    from tdcdiff.cli import app

    out = tmp_path / "tune"
    for dry in ([], ["--dry-run"]):
        done = CliRunner().invoke(app, ["tune", "--out", str(out), "--batch", "100000000000", *dry])
        assert done.exit_code == 2 and len(done.output.strip().splitlines()) == 1, done.output
        assert done.output.startswith("error: timing sampling at --batch 100000000000 (the noise and images of "
                                      "100000000000 samples of 1x8x8, float32) needs about 47683.7 GiB"), done.output
        assert done.output.strip().endswith("; lower --batch (your sampling batch size)") and not out.exists()
    done = CliRunner().invoke(app, ["tune", "--out", str(out), "--base-from", str(tmp_path / "none"), "--dry-run"])
    assert done.exit_code == 2 and done.output.startswith(f"error: --base-from {tmp_path / 'none'}: no finished "
                                                          "stage-1 base there"), done.output


def test_cli_the_dry_run_refuses_a_cache_depth_the_base_cannot_take_as_the_run_does(tmp_path, monkeypatch):
    """':d9' on a 2-level UNet: the real run refuses it before writing (on the trained base), and so does
    `--dry-run` (attack 2026-12-07e, noticed: it passed the dry run); a fresh tune (no base yet) refuses it before
    training stage 1, on the architecture stage 1 would train."""
    from tdcdiff.cli import app
    from tdcdiff.run import Run

    monkeypatch.setenv("TDCDIFF_CACHE", str(tmp_path / "cache"))
    Run(tmp_path / "run", tiny_config(), progress=False).train_base()
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_config().to_dict()))
    out = tmp_path / "tune"
    for base in (["--base-from", str(tmp_path / "run")], ["--config", str(config)]):
        for dry in (["--dry-run"], []):
            done = CliRunner().invoke(app, ["tune", "--out", str(out), *base, "--settings", "ddim:4:c2:d9", *dry])
            assert done.exit_code == 2 and len(done.output.strip().splitlines()) == 1, done.output
            assert done.output.startswith("error: --settings ddim:4:c2:d9: "), done.output
            assert not out.exists()


@pytest.mark.parametrize("flag, count", [("--fid-samples", "50000"), ("--screen-samples", "50000")])
def test_cli_each_phase_s_image_count_beyond_memory_is_refused_before_any_work(tmp_path, monkeypatch, flag, count):
    """The siblings of --batch: FID's sets and the sample screen keep all their images too (a machine with 5 MiB
    available: 50000 images of 1x8x8 need 24.4 MiB)."""
    from tdcdiff import capacity
    from tdcdiff.cli import app

    monkeypatch.setattr(capacity, "available_memory", lambda: 5 << 20)
    out = tmp_path / "tune"
    for dry in ([], ["--dry-run"]):
        done = CliRunner().invoke(app, ["tune", "--out", str(out), flag, count, *dry])
        assert done.exit_code == 2 and len(done.output.strip().splitlines()) == 1, done.output
        assert f"{flag} {count} (the noise and images of {count} samples of 1x8x8, float32) needs about 24.4 MiB" \
            in done.output and done.output.strip().endswith(f"; lower {flag}") and not out.exists(), done.output


@pytest.mark.slow
def test_a_rerun_samples_again_a_damaged_screen_point_and_chosen_json_names_the_bundle_in_the_tune(laddered,
                                                                                                   tmp_path):
    """Rows 863, 833, 834 on a copy: a screen point with a negative distance and a NaN SE is warned about and
    sampled again (the same noise: the same distance), not carried into the rows; chosen.json's bundle is relative
    to the tune directory, so it holds from anywhere; the user's file in chosen/ is refused before any work."""
    import re
    import shutil
    from pathlib import Path

    from tdcdiff.tune import Tune

    root, _, results = laddered
    chosen = json.loads((root / "tune" / "chosen.json").read_text())
    row = next(r for r in results["rows"] if r["name"] == chosen["name"])
    assert chosen["bundle"] == row["bundle"] and (row["model"] == "base") == (row["bundle"] is None)
    assert all(not Path(r["bundle"]).is_absolute() and (root / "tune" / r["bundle"] / "manifest.json").exists()
               for r in results["rows"] if r["bundle"] is not None)
    out = tmp_path / "tune"
    shutil.copytree(root / "tune", out)
    screen = json.loads((out / "sample_screen.json").read_text())
    name = f"base @ {LADDER[1]}"
    before = screen["points"][name]["distance"]
    screen["points"][name].update(distance=-5.0, se=float("nan"))
    (out / "sample_screen.json").write_text(json.dumps(screen))
    config = tiny_tune(ks=(), finalists=1, settings=LADDER, screen_samples=16, max_quality_loss=10.0,
                       timing_repeats=2)
    said = re.escape(f"sample_screen.json: point '{name}' is damaged ('distance' must be a finite number >= 0 (a "
                     "distance), got -5.0); measuring it again")
    with pytest.warns(UserWarning, match=said):
        again = Tune(out, config, base_from=root / "run", progress=False).run_all()
    rows = {r["name"]: r for r in again["rows"]}
    assert rows[name]["screen_distance"] == pytest.approx(before, rel=1e-4) and rows[name]["screen_se"] >= 0
    (out / "chosen" / "notes.txt").write_text("mine")
    stamp = (out / "results.json").stat().st_mtime_ns
    with pytest.raises(ValueError, match=r"chosen already exists and holds notes.txt besides the files of a tdcdiff "
                                         "bundle"):
        Tune(out, config, base_from=root / "run", progress=False)
    assert (out / "results.json").stat().st_mtime_ns == stamp and (out / "chosen" / "notes.txt").exists()
