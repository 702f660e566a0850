"""The FID judge against a second feature network (bench/agreement.py --second-judge): do two independently designed
and trained feature spaces reach the same verdicts on the same samples, and how small a gap does each resolve?

`rescore` samples the models of a finished `tdcdiff tune` output again with the seeds their FID used (the same
images: a seed fixes the noise) and scores them in the second network's space; `judge_pairs` judges every pair by
both networks over the same seeds (verdict.judge, one look, 95%): by non-inferiority against each network's own
margin (its real-vs-real spread: FID units differ between networks) and by a plain difference test (margin 0).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import statistics
from pathlib import Path

from tdcdiff.evaluate import default_cache_dir, judge_protocol, score_seeds
from tdcdiff.features import DEFAULT_FEATURE_NET, FEATURE_NETS, feature_net_for
from tdcdiff.pipeline import SamplingModel
from tdcdiff.sampling_setting import SamplingSetting
from tdcdiff.tune import Tune, TuneConfig
from tdcdiff.verdict import judge

SECOND_JUDGES = [key for key in FEATURE_NETS if key != DEFAULT_FEATURE_NET]


def open_tune(folder: Path) -> Tune:
    """The Tune of a finished tune output, with the settings its tune.json records."""
    saved = json.loads((folder / "tune.json").read_text())["settings"]
    fields = {f.name for f in dataclasses.fields(TuneConfig)}
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in fields}
    return Tune(folder, TuneConfig(**settings), progress=False)


def rescore(folder: Path, design: str, *, say=print) -> dict:
    """Per-seed FID of every point (model at a sampling setting) of tune output `folder` that has FID, in feature
    network `design`'s space, each sampled at its own setting.

    Returns {"default": name -> the tune's per-seed FIDs, "second": name -> the second network's, over the same
    seeds; "margins": {"default", "second"}; "nets": {"default", "second"}: descriptions; "second_judge":
    evaluate.judge_protocol's dict for the second network}. design: a key of SECOND_JUDGES (or the default
    network's, which must give the tune's own FIDs back: the same images in the same space).
    """
    results = json.loads((folder / "results.json").read_text())
    tune = open_tune(folder)
    run = tune.base_run
    name = Path(run.data.name).name
    net = feature_net_for(run.data.images, run.data.labels, cache_dir=default_cache_dir() / "features", name=name,
                          design=design)
    samples = tune.config.fid_samples
    second_judge = judge_protocol(run.data.images, net, samples)
    say(f"second judge: {net.description}; margin {second_judge['margin']:.3f} ({second_judge['margin_from']})")
    models = tune.models()
    points = [row for row in results["rows"] if row.get("fid")]  # a model at a setting: "base @ dpm-solver++:10"
    default, second = {row["name"]: row["fid"] for row in points}, {}
    for row in points:
        point, scores, setting = row["name"], row["fid"], SamplingSetting.parse(row["setting"])
        fids, _, _ = score_seeds(point, SamplingModel(models[row["model"]][0]), run.scheduler, run.data.images, net,
                                 seeds=range(len(scores)), sample_shape=run.sample_shape, sampler=setting.sampler,
                                 steps=setting.steps, num_samples=samples, reference_name=name,
                                 num_classes=run.data.num_classes, say=say, cache_interval=setting.cache_interval,
                                 cache_depth=setting.cache_depth)
        second[point] = [f.fid for f in fids]
    return {"default": default, "second": second,
            "margins": {"default": results["fid_protocol"]["judge"]["margin"], "second": second_judge["margin"]},
            "nets": {"default": results["fid_protocol"]["feature_net"], "second": net.description},
            "second_judge": second_judge}


def judge_pairs(default: dict, second: dict, margins: dict) -> list[dict]:
    """Every pair (a, b) of the models (b judged against a, in the given order), by both networks over the seeds
    both models have: {"a", "b", "seeds", and per judge "default"/"second": {"margin": non-inferiority
    judgement, "difference": the same with margin 0}}."""
    pairs = []
    for a, b in itertools.combinations(default, 2):
        n = min(len(default[a]), len(default[b]))
        if n < 2:
            continue
        pairs.append({"a": a, "b": b, "seeds": n, **{
            which: {"margin": judge(scores[a][:n], scores[b][:n], margins[which]),
                    "difference": judge(scores[a][:n], scores[b][:n], 0.0)}
            for which, scores in (("default", default), ("second", second))}})
    return pairs


def summary(pairs: list[dict]) -> list[str]:
    """Printed lines: each pair's verdicts by both judges, then agreement and power."""
    lines = [f"{'pair (b vs a)':<40} {'seeds':>5}  {'default judge':<44} {'second judge':<44}"]
    for p in pairs:
        cells = []
        for which in ("default", "second"):
            j = p[which]["margin"]
            low, high = j["interval"]
            cells.append(f"{j['verdict']} {j['mean']:+.2f} [{low:+.2f}, {high:+.2f}] m {j['margin']:.2f} "
                         f"h {j['half_width']:.2f}")
        lines.append(f"{p['b'] + ' vs ' + p['a']:<40} {p['seeds']:>5}  {cells[0]:<44} {cells[1]:<44}")
    for test in ("margin", "difference"):
        agree = sum(p["default"][test]["verdict"] == p["second"][test]["verdict"] for p in pairs)
        name = "non-inferiority (each judge's margin)" if test == "margin" else "difference test (margin 0)"
        lines.append(f"verdicts agree, {name}: {agree} of {len(pairs)} pairs")
    for which in ("default", "second"):
        widths = [p[which]["margin"]["half_width"] for p in pairs]
        relative = [p[which]["margin"]["half_width"] / p[which]["margin"]["margin"] for p in pairs
                    if p[which]["margin"]["margin"] > 0]
        lines.append(f"{which} judge's power: median half-width {statistics.median(widths):.3f} FID"
                     + (f", {statistics.median(relative):.2f} x its margin" if relative else "")
                     + f"; pairs it decides: {sum(p[which]['margin']['verdict'] != 'undecided' for p in pairs)} "
                       f"of {len(pairs)}")
    return lines
