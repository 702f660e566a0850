"""The evidence: evaluate() on a set of models and the report of a finished run, at toy sizes on digits."""

import json
import re

import pytest
import torch
from torch import nn

from tdcdiff.evaluate import ModelEntry, evaluate, pool, trajectory_flops
from tdcdiff.grouping import make_groups
from tdcdiff.report import format_table, loss_rows, report_for_run, verdicts
from tdcdiff.router import Router


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("features")


@pytest.fixture(scope="module")
def report(finished_run, feature_cache):
    path = report_for_run(finished_run[0].dir, num_samples=32, feature_cache_dir=feature_cache,
                          timing_batches=(1, 4), timing_repeats=1, progress=False)
    return path, json.loads((path.parent / "results.json").read_text())


def test_report_page_states_the_protocol(report):
    path, _ = report
    assert path.name == "report.html" and path.parent.name == "report"
    page = path.read_text()
    for part in ("FID", "digits classifier", "64-d", "DDIM 4 steps", "32 samples", "2 x multiply-accumulates",
                 "base (stage 1)", "TDC", "Verdicts", "Held-out denoising loss", "Pruned experts"):
        assert part in page, part


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
    ranges = results["protocol"]["held_out_loss_groups"]
    assert len(ranges) == 2 and ranges[0].startswith("t 0-") and ranges[-1].endswith("-999")
    assert all(v > 0 for v in tdc["held_out_loss"].values())


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
    # DDIM-4 visits 751, 501, 251, 1: two steps in each group
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
    (sentence,) = verdicts(pooled)
    assert sentence.startswith("routed vs plain:") and "0.67x the sampling FLOPs" in sentence
    assert "per-seed gaps" in sentence and "routed lower in" in sentence and "95% interval" in sentence
