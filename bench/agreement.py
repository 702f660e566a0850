"""Which cheap quality measure ranks models the way FID does (issue 13): the held-out denoising loss and the
held-out bits/dim bound against FID, over every model of one or more benchmark outputs.

    python bench/agreement.py runs/frontier-digits-0.4 runs/frontier-digits-0.6 runs/frontier-digits-0.8

Each argument is a `bench/benchmark.py` output folder (its results.json) or a `tdcdiff tune` output folder (its
results.json). A point is one trained model: for a benchmark, one arm of one seed (its FID from that seed's
own samples, the held-out loss averaged over all t, the bits/dim bound's total); for tune, one candidate (FID
mean over the finalists' FID seeds; only finalists have FID; a tune directory from before --screening is read
too). A model found in several outputs (a copied tune directory) is one point. Printed:

- per data set (measures are not comparable across data sets), Spearman's rank correlation
  (scipy.stats.spearmanr) of each measure with FID over its points, with the p-value; the held-out loss
  separately for benchmark-style values (mean over all t) and tune's (per-image mean over the measured t);
- within-run pairs: every pair of models trained from the same base (one benchmark seed, or one tune run), and
  the fraction of them each measure orders like FID;
- resolved pairs: every pair of a benchmark's arms whose FID gap is real over its seeds (verdict.judge with
  margin 0, 95%: "better" or "inferior"), and whether each measure's seed mean orders the pair the same way.

The FID of one model at a few thousand samples carries noise of about the size of the gaps between pruned
models, so the pooled correlation mixes signal with that noise; the resolved pairs are the cleaner test.

    python bench/agreement.py runs/tune-digits --second-judge classifier-96-k5

With --second-judge DESIGN (a key of tdcdiff.features.FEATURE_NETS other than the default), the FID judge itself is
put to the test (second_judge.py): every model of each tune output that has FID is sampled again with the same
seeds (the same images) and scored in a second, independently designed and trained feature space, with its own
margin (its real-vs-real spread); every pair of those models is judged by both networks over the same seeds (one
look, 95%), by non-inferiority against each network's margin and by a plain difference test (margin 0). Printed:
each pair's verdicts and each judge's power (the interval's half-width, also as a fraction of its margin, since
FID units differ between networks), and how many pairs' verdicts agree.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

from scipy.stats import spearmanr

from benchmark import RUN_METRICS  # bench/benchmark.py, beside this file
from second_judge import SECOND_JUDGES, judge_pairs, rescore, summary
from tdcdiff.verdict import judge

MEASURES = ("held-out loss", "bits/dim")
# How the held-out loss was averaged over t: benchmarks (and tune before --screening) report evaluate.held_out_loss,
# the mean over all T of the curve interpolated between 100 measured t; tune now screens by each image's mean over
# those 100 t. The two differ by a few percent on one model, so models are only ranked against others of one kind.
ALL_T, MEASURED_T = "mean over all t", "per-image mean over the measured t"


def benchmark_points(results: dict, label: str) -> tuple[list[dict], dict]:
    """Points of a benchmark results.json (one per arm and seed) and per arm its points by run label."""
    points, arms = [], {}
    for run in results["per_run"]:
        for model in run["models"]:
            values = {name: get(model) for name, get in RUN_METRICS.items()}
            point = {"data": results["protocol"]["reference"]["name"], "run": f"{label} {run['label']}",
                     "model": model["name"], "fid": values["FID"], "fid_seeds": [values["FID"]],
                     "held-out loss": values["held-out loss"], "loss_by": ALL_T, "bits/dim": values["bits/dim"]}
            points.append(point)
            arms.setdefault(model["name"], {})[run["label"]] = point
    return points, arms


def tune_columns(results: dict) -> dict:
    """Which row column of a tune results.json holds each measure: "screening" for the one that ranked, "second"
    for the other; a results.json from before --screening (bits/dim ranked, no "key") holds the loss in
    "held_out_loss"."""
    measure = results["screening_measure"]
    if "key" not in measure:
        return {"bits/dim": "screening", "held-out loss": "held_out_loss"}
    names = {"loss": "held-out loss", "bpd": "bits/dim"}
    return {names[measure["key"]]: "screening", names[measure["second"]["key"]]: "second"}


def tune_points(results: dict, label: str) -> list[dict]:
    """Points of a tune results.json: the finalists and the base (the only rows with FID)."""
    columns = tune_columns(results)
    return [{"data": results["fid_protocol"]["reference"]["name"], "run": label, "model": row["name"],
             "fid": sum(row["fid"]) / len(row["fid"]), "fid_seeds": list(row["fid"]),
             "loss_by": MEASURED_T if "key" in results["screening_measure"] else ALL_T,
             **{name: row[column] for name, column in columns.items()}}
            for row in results["rows"] if row.get("fid") is not None]


def read_output(folder: Path) -> tuple[list[dict], list[dict]]:
    """The points and resolved pairs of one output folder; ValueError naming the file and the fix when its
    results.json is missing, cut short, or of another kind."""
    path = folder / "results.json"
    if not path.is_file():
        raise ValueError(f"{path} not found: pass a bench/benchmark.py or tdcdiff tune output folder that has "
                         "finished (for bench/frontier.py, its time-F folders)")
    try:
        results = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not complete JSON ({err}): rerun the benchmark or tune that writes it") from None
    label = str(folder)
    try:
        if str(results.get("format", "")).startswith("tdcdiff-tune"):
            return tune_points(results, label), []
        if "per_run" in results and "bench" in results:
            points, arms = benchmark_points(results, label)
            return points, resolved_pairs(arms, label)
    except (KeyError, TypeError, ZeroDivisionError) as err:
        raise ValueError(f"{path} lacks {err} (written by another version?): rerun the benchmark or tune that "
                         "writes it") from None
    raise ValueError(f"{path} is neither a bench/benchmark.py nor a tdcdiff tune results.json (format "
                     f"{results.get('format')!r}): pass their output folders")


def model_key(point: dict) -> tuple:
    """What identifies one trained model across outputs (a tune directory copied to rescreen it holds the same
    models): its data set, name, FID per seed and bits/dim."""
    return point["data"], point["model"], tuple(point["fid_seeds"]), point["bits/dim"]


def merge_copies(points: list[dict]) -> list[dict]:
    """One point per trained model (model_key), as first found."""
    return list({model_key(q): q for q in reversed(points)}.values())[::-1]


def within_run_pairs(points: list[dict]) -> list[tuple[dict, dict]]:
    """Every pair of models of one run (same base), with that run's values; a pair found in several outputs once."""
    pairs = {}
    for a, b in itertools.combinations(points, 2):
        if a["run"] == b["run"]:
            pairs.setdefault(frozenset((model_key(a), model_key(b))), (a, b))
    return list(pairs.values())


def resolved_pairs(arms: dict, label: str) -> list[dict]:
    """Pairs of arms whose per-seed FID gap is real (paired rule over the runs both have), with each measure's
    verdict."""
    pairs = []
    for (a, by_run_a), (b, by_run_b) in itertools.combinations(arms.items(), 2):
        both = [run for run in by_run_a if run in by_run_b]
        if len(both) < 2:
            continue
        pa, pb = [by_run_a[run] for run in both], [by_run_b[run] for run in both]
        gap = judge([p["fid"] for p in pa], [p["fid"] for p in pb], 0.0)
        if gap["verdict"] == "undecided":
            continue
        fid_says_b_better = gap["verdict"] == "better"
        agree = {}
        for m in MEASURES:
            mean_a = sum(p[m] for p in pa) / len(pa)
            mean_b = sum(p[m] for p in pb) / len(pb)
            agree[m] = (mean_b < mean_a) == fid_says_b_better
        pairs.append({"run": label, "better": b if fid_says_b_better else a, "worse": a if fid_says_b_better else b,
                      "fid_gap": abs(gap["mean"]), "agree": agree,
                      "models": frozenset(model_key(p) for p in pa + pb)})
    return pairs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outputs", nargs="+", type=Path, help="benchmark or tune output folders (each with results.json)")
    p.add_argument("--second-judge", choices=SECOND_JUDGES,
                   help="also judge every pair of a tune output's models with FID by this second feature network "
                        "(their samples drawn again, same seeds) and compare the verdicts")
    args = p.parse_args(argv)
    seen = {}
    for folder in args.outputs:
        if folder.resolve() in seen:
            p.error(f"{folder} is given twice (as {seen[folder.resolve()]}): pass each output folder once")
        seen[folder.resolve()] = folder
    points, pairs, tunes = [], [], []
    for folder in args.outputs:
        try:
            new, resolved = read_output(folder)
        except ValueError as err:
            p.error(str(err))
        if (folder / "tune.json").is_file():  # a tune output: its models can be sampled again
            tunes.append(folder)
        points += new
        pairs += [pair for pair in resolved if all(pair["models"] != q["models"] for q in pairs)]  # copies once
    within = within_run_pairs(points)
    distinct = merge_copies(points)
    copies, points = len(points) - len(distinct), distinct
    if len(points) < 3:
        p.error(f"only {len(points)} distinct models with FID: pass more outputs")
    if args.second_judge and not tunes:
        p.error("--second-judge samples the models of tdcdiff tune outputs again: pass a tune output folder (one with "
                "tune.json and results.json)")

    print(f"{'run':<30} {'model':<22} {'FID':>8} {'loss':>9} {'bits/dim':>9}")
    for q in points:
        print(f"{q['run']:<30} {q['model']:<22} {q['fid']:>8.3f} {q['held-out loss']:>9.5f} {q['bits/dim']:>9.4f}")
    if copies:
        print(f"({copies} models found in more than one output, counted once)")
    for data in dict.fromkeys(q["data"] for q in points):
        mine = [q for q in points if q["data"] == data]
        print(f"\nSpearman rank correlation with FID, {data}:")
        kinds = {"bits/dim": {"": mine}, "held-out loss": {}}
        for q in mine:
            kinds["held-out loss"].setdefault(q["loss_by"], []).append(q)
        for m in MEASURES:
            for how, group in kinds[m].items():
                label = f"{m}{f' ({how})' if len(kinds[m]) > 1 else ''}"
                if len(group) < 3:
                    print(f"  {label}: {len(group)} models, too few for a rank correlation (at least 3)")
                    continue
                rho, pvalue = spearmanr([q["fid"] for q in group], [q[m] for q in group])
                print(f"  {label + ':':<15} rho {rho:+.2f}  (p {pvalue:.2g}, {len(group)} models)")
    print(f"\nwithin-run pairs (same base), ordered like FID: {len(within)} pairs")
    for m in MEASURES:
        agree = sum((a[m] < b[m]) == (a["fid"] < b["fid"]) for a, b in within)
        print(f"  {m:<14} {agree} of {len(within)}")
    print(f"\npairs of arms whose FID gap is real (paired rule over seeds, 95%): {len(pairs)}")
    for pair in pairs:
        verdicts = ", ".join(f"{m} {'agrees' if ok else 'DISAGREES'}" for m, ok in pair["agree"].items())
        print(f"  {pair['run']}: {pair['better']} < {pair['worse']} (FID gap {pair['fid_gap']:.3f}): {verdicts}")
    for m in MEASURES:
        print(f"  {m}: orders {sum(q['agree'][m] for q in pairs)} of {len(pairs)} resolved pairs like FID")
    for folder in tunes if args.second_judge else []:
        print(f"\nthe FID judge against a second feature network ({args.second_judge}), {folder}:")
        scores = rescore(folder, args.second_judge)
        print(f"  default: {scores['nets']['default']}\n  second: {scores['nets']['second']}")
        pairs = judge_pairs(scores["default"], scores["second"], scores["margins"])
        print("\n".join("  " + line for line in summary(pairs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
