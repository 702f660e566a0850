"""Which cheap quality measure ranks models the way FID does (issue 13): the held-out denoising loss and the
held-out bits/dim bound against FID, over every model of one or more benchmark outputs.

    python bench/agreement.py runs/frontier-digits-0.4 runs/frontier-digits-0.6 runs/frontier-digits-0.8

Each argument is a `bench/benchmark.py` output folder (its results.json) or a `tdcdiff tune` output folder (its
results.json). A point is one trained model: for a benchmark, one arm of one seed (its FID from that seed's
own samples, the held-out loss averaged over all t, the bits/dim bound's total); for tune, one candidate (FID
mean over the finalists' FID seeds; only finalists have FID). Printed:

- per data set (measures are not comparable across data sets), Spearman's rank correlation
  (scipy.stats.spearmanr) of each measure with FID over its points, with the p-value;
- within-run pairs: every pair of models trained from the same base (one benchmark seed, or one tune run), and
  the fraction of them each measure orders like FID;
- resolved pairs: every pair of a benchmark's arms whose FID gap is real by the paired rule over its seeds
  (metrics.paired_gap, 95%), and whether each measure's seed mean orders the pair the same way.

The FID of one model at a few thousand samples carries noise of about the size of the gaps between pruned
models, so the pooled correlation mixes signal with that noise; the resolved pairs are the cleaner test.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

from scipy.stats import spearmanr

from tdcdiff.metrics import paired_gap

MEASURES = ("held-out loss", "bits/dim")


def benchmark_points(results: dict, label: str) -> tuple[list[dict], dict]:
    """Points of a benchmark results.json (one per arm and seed) and per arm the per-seed values."""
    points, arms = [], {}
    for run in results["per_run"]:
        for model in run["models"]:
            fid = model["fid"]["per_seed"][0]["fid"]
            point = {"data": results["protocol"]["reference"]["name"], "run": f"{label} {run['label']}",
                     "model": model["name"], "fid": fid,
                     "held-out loss": model["held_out_loss"]["all"],
                     "bits/dim": model["held_out_bpd"]["total"]["mean"]}
            points.append(point)
            arms.setdefault(model["name"], []).append(point)
    return points, arms


def tune_points(results: dict, label: str) -> list[dict]:
    """Points of a tune results.json: the finalists and the base (the only rows with FID)."""
    keys = {results["screening_measure"]["key"]: "screening", results["screening_measure"]["second"]["key"]: "second"}
    names = {"loss": "held-out loss", "bpd": "bits/dim"}
    return [{"data": results["fid_protocol"]["reference"]["name"], "run": label, "model": row["name"],
             "fid": sum(row["fid"]) / len(row["fid"]), **{names[key]: row[column] for key, column in keys.items()}}
            for row in results["rows"] if row.get("fid") is not None]


def resolved_pairs(arms: dict, label: str) -> list[dict]:
    """Pairs of arms whose per-seed FID gap is real (paired rule), with each measure's verdict."""
    pairs = []
    for (a, pa), (b, pb) in itertools.combinations(arms.items(), 2):
        if len(pa) < 2 or len(pa) != len(pb):
            continue
        gap = paired_gap([p["fid"] for p in pa], [p["fid"] for p in pb])
        if gap["tie"]:
            continue
        fid_says_b_better = gap["mean"] < 0
        agree = {}
        for m in MEASURES:
            mean_a = sum(p[m] for p in pa) / len(pa)
            mean_b = sum(p[m] for p in pb) / len(pb)
            agree[m] = (mean_b < mean_a) == fid_says_b_better
        pairs.append({"run": label, "better": b if fid_says_b_better else a, "worse": a if fid_says_b_better else b,
                      "fid_gap": abs(gap["mean"]), "agree": agree})
    return pairs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outputs", nargs="+", type=Path, help="benchmark or tune output folders (each with results.json)")
    args = p.parse_args(argv)
    points, pairs = [], []
    for folder in args.outputs:
        path = folder / "results.json"
        if not path.is_file():
            p.error(f"{path} not found: pass a bench/benchmark.py or tdcdiff tune output folder that has finished")
        results = json.loads(path.read_text())
        if results.get("format", "").startswith("tdcdiff-tune"):
            points += tune_points(results, folder.name)
        else:
            new, arms = benchmark_points(results, folder.name)
            points += new
            pairs += resolved_pairs(arms, folder.name)
    if len(points) < 3:
        p.error(f"only {len(points)} models with FID: pass more outputs")

    print(f"{'run':<30} {'model':<22} {'FID':>8} {'loss':>9} {'bits/dim':>9}")
    for q in points:
        print(f"{q['run']:<30} {q['model']:<22} {q['fid']:>8.3f} {q['held-out loss']:>9.5f} {q['bits/dim']:>9.4f}")
    for data in dict.fromkeys(q["data"] for q in points):
        mine = [q for q in points if q["data"] == data]
        print(f"\nSpearman rank correlation with FID, {data}, {len(mine)} models:")
        for m in MEASURES:
            rho, pvalue = spearmanr([q["fid"] for q in mine], [q[m] for q in mine])
            print(f"  {m:<14} rho {rho:+.2f}  (p {pvalue:.2g})")
    within = [(a, b) for a, b in itertools.combinations(points, 2) if a["run"] == b["run"]]
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
