"""The evidence: evaluate() on a set of models and the report of a finished run, at toy sizes on digits."""

import json
import re
import shutil
import statistics

import pytest
import torch
from torch import nn

from tdcdiff.evaluate import BPD_SAMPLES, ModelEntry, evaluate, held_out_loss_se, pool, trajectory_flops
from tdcdiff.grouping import make_groups
from tdcdiff.report import bpd_rows, format_table, loss_rows, table_rows, verdicts
from tdcdiff.router import Router
from tdcdiff.run import report_for_run


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("features")


@pytest.fixture(scope="module")
def report(finished_run, feature_cache):
    path = report_for_run(finished_run[0].dir, num_samples=32, feature_cache_dir=feature_cache,
                          timing_batches=(1, 4), timing_repeats=1, progress=False)
    return path, json.loads((path.parent / "results.json").read_text())


@pytest.mark.slow
def test_report_page_states_the_protocol(report):
    path, _ = report
    assert path.name == "report.html" and path.parent.name == "report"
    page = path.read_text()
    for part in ("FID", "digits classifier-128", "128-d", "held-out accuracy", "DDIM 4 steps (trailing spacing)",
                 "non-inferiority margin", "real-vs-real spread", "Precision and recall (Kynkaanniemi et al. 2019)",
                 "Sampling path (compile/precision): trace/fp32", "32 samples", "2 x multiply-accumulates",
                 "base (stage 1)", "TDC", "Verdicts", "Held-out denoising loss", "Held-out bits/dim",
                 "IDDPM calc_bpd_loop", "fixed_small", "Pruned experts",
                 "KID is the unbiased estimate of the squared kernel distance between the feature distributions: it "
                 "can come out slightly negative", "Its scale: raw, not x 1000", "(x.y / d + 1)^3"):
        assert part in page, part
    # the clock of the time columns is named at the table, before the verdicts
    clock = page.index("Time columns (time ratio, images/s) read thread CPU time of one torch thread, not wall-clock")
    assert page.index("<h2>Side by side</h2>") < clock < page.index("<h2>Verdicts</h2>")
    # the bits/dim strata: evaluate.BPD_SAMPLES of equal log-SNR width, plus the cut at the run's one group edge
    strata = re.search(r"cut into (\d+) contiguous strata", page).group(1)
    assert f"strata: {BPD_SAMPLES} of equal log-SNR width asked for" in page
    assert f"also cut at the 1 group edge(s): {strata} in all" in page
    assert "± is the standard error over images. In brackets" in page  # the held-out loss table


@pytest.mark.slow
@pytest.mark.parametrize("setting, value, found", [("k", 0.9, "'k' is 0.4 but the run's is 0.9"),
                                                   ("groups", 3, "the number of groups in 'grouping' is 2 but the "
                                                                 "run's is 3")])
def test_a_run_whose_settings_changed_after_its_plan_is_refused_before_sampling(finished_run, tmp_path, setting,
                                                                                value, found):
    # The plan is the first stage the change invalidates: the message names it, and everything after it is redone.
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run[0].dir, run_dir, ignore=shutil.ignore_patterns("report"))
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, setting: value}))
    with pytest.raises(ValueError) as err:
        report_for_run(run_dir, num_samples=4, progress=False)
    plan = run_dir / "plan"
    assert str(err.value) == (f"{plan / 'plan.json'}: {found} (the plan was made for another run, or edited); "
                              f"delete {plan} and rerun `tdcdiff plan` (then redo the stages after it, which were "
                              "made for the old plan)")
    assert not (run_dir / "report").exists()


@pytest.mark.slow
def test_a_bundle_made_with_other_settings_is_refused_before_sampling(finished_run, tmp_path):
    # A setting after the plan (the pruning search's latency batch): the plan still fits, the bundle does not.
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run[0].dir, run_dir, ignore=shutil.ignore_patterns("report"))
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "latency_batch": config["latency_batch"] + 1}))
    with pytest.raises(ValueError) as err:
        report_for_run(run_dir, num_samples=4, progress=False)
    found = f"setting 'latency_batch' {config['latency_batch']} (the run's: {config['latency_batch'] + 1})"
    assert str(err.value) == (f"{run_dir / 'bundle'} was not made by this run: its {found}. Delete "
                              f"{run_dir / 'bundle'} and rerun `tdcdiff bundle --out {run_dir}` to rebuild it from "
                              "this run, or report on the run that made it")
    assert not (run_dir / "report").exists()


@pytest.mark.slow
def test_results_compare_base_and_tdc(report):
    _, results = report
    base, tdc = results["models"]
    assert (base["name"], tdc["name"]) == ("base (stage 1)", "TDC")
    assert base["sampling_flops"]["ratio"] == 1.0
    assert 0 < tdc["sampling_flops"]["ratio"] < 1
    assert tdc["train_flops"] > base["train_flops"] > 0  # TDC's compute includes stage 1
    for model in (base, tdc):
        assert model["fid"]["per_seed"][0]["num_generated"] == 32
        assert set(model["time"]) == {"batch_1", "batch_4"}
        assert model["memory"]["weights_bytes"] > 0 and model["memory"]["peak_activation_bytes"] > 0
    assert tdc["memory"]["weights_bytes"] > base["memory"]["weights_bytes"]  # every expert is loaded
    assert results["protocol"]["reference"] == {"name": "digits", "count": 1797}
    # held-out loss per group: the base is the yardstick (ratio 1), and the bands are the run's groups
    assert list(tdc["held_out_loss"]) == ["all", "group 0", "group 1"]
    assert list(tdc["held_out_loss_se"]) == list(tdc["held_out_loss"])
    assert all(0 < tdc["held_out_loss_se"][k] < v for k, v in tdc["held_out_loss"].items())
    ranges = results["protocol"]["held_out_loss_groups"]
    assert len(ranges) == 2 and ranges[0].startswith("t 0-") and ranges[-1].endswith("-999")
    assert all(v > 0 for v in tdc["held_out_loss"].values())
    # the bits/dim bound: additive shares, paired to the base, on the held-out images
    bpd = tdc["held_out_bpd"]
    assert list(bpd["groups"]) == ["group 0", "group 1"] and 0 < bpd["total"]["se"] < bpd["total"]["mean"]
    assert bpd["total"]["mean"] == pytest.approx(bpd["prior"]["mean"] + sum(g["mean"] for g in bpd["groups"].values()))
    assert base["held_out_bpd"]["vs_first"]["total"] == {"mean": 0.0, "se": 0.0}
    base_bpd = base["held_out_bpd"]["total"]["mean"]
    assert bpd["vs_first"]["total"]["mean"] == pytest.approx(bpd["total"]["mean"] - base_bpd)
    assert "held-out 8-bit images in bits/dim" in results["protocol"]["held_out_bpd"]


@pytest.mark.slow
def test_every_referenced_png_exists(report):
    path, results = report
    images = re.findall(r'<img src="([^"]+)"', path.read_text())
    assert {"fid_vs_flops.png", "grouping.png", "budgets.png", "loss_per_t.png",
            "samples_base-stage-1.png", "samples_tdc.png"} <= set(images)
    for name in images:
        assert (path.parent / name).stat().st_size > 0, name
    assert set(results["figures"]) == set(images)


class Constant(nn.Module):
    """A denoiser predicting a constant: cheap, and its FLOPs are whatever the test says they are."""

    def __init__(self, value):
        super().__init__()
        self.value = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x, t):
        return torch.zeros_like(x) + self.value


def test_router_flops_are_the_sum_over_visited_steps(scheduler):
    grouping = make_groups("uniform", 2, scheduler)
    router = Router([Constant(0), Constant(0.1)], grouping, expert_flops=[100, 300])
    visited = [900, 700, 500, 300, 100]  # groups 1, 1, 1, 0, 0
    entry = ModelEntry("TDC", router, train_flops=1)
    assert trajectory_flops(entry, visited, (1, 8, 8)) == 3 * 300 + 2 * 100
    assert trajectory_flops(ModelEntry("fixed", Constant(0), 1, flops_per_image=50), visited, (1, 8, 8)) == 250
    assert trajectory_flops(ModelEntry("fn", Constant(0), 1, flops_per_image=len), visited, (1, 8, 8)) == 5


def test_evaluate_and_pool(digits, scheduler, feature_cache):
    grouping = make_groups("uniform", 2, scheduler)
    router = Router([Constant(0), Constant(0.2)], grouping, expert_flops=[100, 300])
    entries = [ModelEntry("plain", Constant(0), 10, flops_per_image=300), ModelEntry("routed", router, 20)]
    runs = [evaluate(entries, scheduler, digits.images, digits.labels, sample_shape=(1, 8, 8), steps=4,
                     num_samples=16, seeds=(seed,), feature_cache_dir=feature_cache, reference_name="digits",
                     timing_batches=(1, 2), timing_repeats=1, held_out=digits.images[:32],
                     loss_grouping=grouping, progress=False) for seed in (0, 1)]
    first = runs[0]["models"]
    # DDIM-4 ("trailing") visits 999, 749, 499, 249: two steps in each group
    assert first[1]["sampling_flops"]["per_image"] == 2 * 100 + 2 * 300
    assert first[1]["sampling_flops"]["ratio"] == pytest.approx(800 / 1200)
    assert first[1]["train_flops_ratio"] == 2.0
    json.dumps(runs[0])  # JSON-able as it is

    pooled = pool(runs, ["seed 0", "seed 1"])
    fids = [r["models"][0]["fid"]["per_seed"][0]["fid"] for r in runs]
    assert pooled["models"][0]["fid"]["mean"] == pytest.approx(sum(fids) / 2)
    assert pooled["models"][0]["fid"]["sd"] > 0 and len(pooled["per_run"]) == 2
    assert "2 independent runs" in pooled["protocol"]["fid"]
    assert "plain" in format_table(pooled).splitlines()[2]
    # Constant(0.2) predicts 0.2 everywhere: worse than Constant(0) at every t (the target is unit noise)
    loss = pooled["models"][1]["held_out_loss"]
    assert set(loss) == {"all", "group 0", "group 1"} and loss["all"] > pooled["models"][0]["held_out_loss"]["all"]
    assert loss_rows(pooled)[0]["group 0 (t 0-499)"].endswith("(1.00x)")
    se = pooled["models"][1]["held_out_loss_se"]["all"]  # pooled: the mean of the runs' standard errors
    assert se == pytest.approx(statistics.fmean(r["models"][1]["held_out_loss_se"]["all"] for r in runs))
    ratio = loss["all"] / pooled["models"][0]["held_out_loss"]["all"]
    assert loss_rows(pooled)[1]["all"] == f"{loss['all']:.4f} ± {se:.4f} ({ratio:.2f}x)"
    # bits/dim: the router differs from the plain model only on group 1 (t 500-999), with the same t and noise
    bpd, plain_bpd = pooled["models"][1]["held_out_bpd"], pooled["models"][0]["held_out_bpd"]
    assert bpd["vs_first"]["groups"]["group 0"]["mean"] == 0 and bpd["vs_first"]["groups"]["group 1"]["mean"] != 0
    assert bpd["groups"]["group 0"] == plain_bpd["groups"]["group 0"]
    assert bpd["vs_first"]["total"]["se"] < bpd["total"]["se"]  # pairing removes image-to-image variation
    assert bpd["total"]["sd"] == 0  # the same models and images in both runs: no spread over runs
    rows = bpd_rows(pooled)
    assert rows[1]["group 1 (t 500-999)"].endswith("(sd 0.000)") and "minus plain (paired)" in rows[1]
    assert table_rows(pooled)[0]["bits/dim (mean ± sd over runs)"].endswith("± 0.000")
    assert "bits/dim (± SE over images)" in table_rows(runs[0])[0]
    # images per second of the timing clock: batch / median seconds of one sampling run, at each batch size
    timing = runs[0]["models"][1]["time"]
    assert table_rows(runs[0])[1]["images/s (batch 1 / 2)"] == (f"{1 / timing['batch_1']['median_s']:.1f} / "
                                                               f"{2 / timing['batch_2']['median_s']:.1f}")
    (sentence,) = verdicts(pooled)
    assert sentence.startswith("routed vs plain:") and "0.67x the sampling FLOPs" in sentence
    assert "per-seed gaps" in sentence and "routed lower in" in sentence and "95% interval" in sentence


def test_the_held_out_loss_keeps_its_mean_and_gets_a_standard_error_over_images(digits, scheduler):
    from tdcdiff.losses import per_timestep_loss

    grouping = make_groups("uniform", 2, scheduler)
    images = digits.images[:40]
    means, ses = held_out_loss_se(Constant(0.2), images, scheduler, grouping, seed=3)
    curve = per_timestep_loss(Constant(0.2), images, scheduler, images_per_point=256, seed=3)  # the loss as before
    assert means["all"] == pytest.approx(curve.mean(), rel=1e-5)
    assert means["group 1"] == pytest.approx(curve[500:].mean(), rel=1e-5)
    assert list(ses) == ["all", "group 0", "group 1"] and all(0 < ses[k] < 0.1 * means[k] for k in ses)


def _fid_results(a_scores: list[float], b_scores: list[float]) -> dict:
    def model(name, scores):
        return {"name": name, "fid": {"mean": statistics.fmean(scores), "sd": statistics.stdev(scores),
                                      "per_seed": [{"fid": f} for f in scores]},
                "sampling_flops": {"per_image": 100}, "time": {"batch_1": {"ratio": 1.0}}, "train_flops": 1}

    return {"models": [model("a", a_scores), model("b", b_scores)]}


def test_a_verdict_states_its_margin_and_the_gap_its_seeds_resolve():
    from tdcdiff.verdict import paired_gap

    results = {**_fid_results([10.0, 12.0], [11.0, 11.5]), "protocol": {"judge": {"margin": 0.5, "margin_from": "x"}}}
    (undecided,) = verdicts(results)
    half = paired_gap([10.0, 12.0], [11.0, 11.5])["half_width"]
    assert "b is undecided" in undecided and "margin 0.50 FID" in undecided
    assert f"resolves gaps over {half:.2f}" in undecided and "more seeds could decide it" in undecided
    assert "not even an exact tie could come out non-inferior" in undecided  # 2 seeds: half-width 9 x sd
    # Results from before the judge had a margin are judged against 0: a plain difference test.
    (real,) = verdicts(_fid_results([10.0, 12.0, 11.0], [13.0, 15.1, 14.0]))
    assert "b is inferior" in real and "margin 0.00 FID" in real and "more seeds" not in real
    # A loss the seeds resolve, but smaller than the margin: non-inferior, and the sentence says it is a loss.
    results = {**_fid_results([10.0, 12.0, 11.0], [10.2, 12.25, 11.2]),
               "protocol": {"judge": {"margin": 1.0, "margin_from": "x"}}}
    (small,) = verdicts(results)
    assert "b is non-inferior (resolved worse, within the margin)" in small
