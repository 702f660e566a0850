"""The joint frontier of `tdcdiff tune` over training seeds: what each tune shipped, where its speed came from, and
whether each kind of model adds speed on top of the best free setting.

    python bench/tune_seeds.py runs/tune-d0 runs/tune-d1 runs/tune-d2

Each argument is one finished tune output (results.json), typically the same command on bases trained with
different seeds. Printed per output: the shipped point, the best free setting (the base at its fastest
non-inferior sampler/steps/cache), and the headline factors at each timed batch (total = free x model, times
relative to the reference setting); then, per model, its fastest non-inferior point and that point's speed over
the best free setting (>1: the model adds speed; "no non-inferior point" when none of its judged points was, "-"
when it has no point with a verdict: screened out before FID). Last, the factors over the outputs: median and
range, and how many reach `--target` (the frontier issue's 1.5x over the free setting at batch 64).

Times are the tune's own: thread CPU time with one thread on a CPU (wall clock on a GPU), interleaved repeats,
median ratios to the reference at the same batch (results.json "time"); verdicts are the tune's non-inferiority
judgements against the base at the reference (results.json "fid_protocol").
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

TIME_KEYS = {"64": "time_ratio", "1": "time_1_ratio"}  # tune's user batch, then batch 1


def read_tune(folder: Path) -> dict:
    """results.json of a finished tune output. Raises SystemExit naming the folder when it has no headline (an
    unfinished tune, or one from before the joint frontier)."""
    path = folder / "results.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist: pass finished tdcdiff tune output folders")
    results = json.loads(path.read_text())
    if not results.get("headline") or not results.get("choice"):
        raise SystemExit(f"error: {path} has no headline: finish the tune (rerun its command), or pass a tune made "
                         "with --reference (the joint frontier)")
    return results


def fastest_non_inferior(results: dict) -> dict[str, dict]:
    """Per model, its fastest point (at the tune's batch) whose FID verdict is non-inferior; models whose points
    all have verdicts but none non-inferior map to None; models with no verdict at all are left out."""
    best: dict[str, dict | None] = {}
    for row in results["rows"]:
        verdict = (row.get("fid_gap") or {}).get("verdict")
        if row["model"] == "base" and row["name"] == "base":
            continue  # the reference itself
        if verdict is None:
            continue
        best.setdefault(row["model"], None)
        if verdict == "non-inferior" and (best[row["model"]] is None
                                          or row["time_ratio"] < best[row["model"]]["time_ratio"]):
            best[row["model"]] = row
    return best


def summarize(folder: Path, results: dict) -> tuple[list[str], dict]:
    """Printed lines for one output, and its factors {"total"/"free"/"model" -> {batch -> factor}, "over_free":
    {model -> factor at the tune's batch or None}}."""
    head, rows = results["headline"], {r["name"]: r for r in results["rows"]}
    free = rows[head["best_free"]]
    lines = [f"{folder}: shipped {head['chosen']}; best free setting {head['best_free']}",
             f"  {results['choice']['reason']}"]
    factors = {k: {b: v[k] for b, v in head["by_batch"].items()} for k in ("total", "free", "model")}
    for batch, v in head["by_batch"].items():
        split = (f" (= {v['setting']:.2f}x from its setting x {v['architecture']:.2f}x from its architecture)"
                 if "architecture" in v else "")
        lines.append(f"  batch {batch:>3}: {v['total']:.2f}x the reference = {v['free']:.2f}x free x "
                     f"{v['model']:.2f}x model{split}")
    factors["over_free"] = {}
    best = fastest_non_inferior(results)
    for model in dict.fromkeys(r["model"] for r in results["rows"] if r["model"] not in best):
        lines.append(f"  {model:<24} -: no FID verdict (screened out before FID)")
    for model, row in best.items():
        if row is None:
            lines.append(f"  {model:<24} no non-inferior point")
            factors["over_free"][model] = None
            continue
        over = {b: free[key] / row[key] for b, key in TIME_KEYS.items() if row.get(key) and free.get(key)}
        factors["over_free"][model] = over.get("64")
        gap = row["fid_gap"]
        lines.append(f"  {model:<24} fastest non-inferior: {row['setting']:<18} FID gap {gap['mean']:+.2f} "
                     f"[{gap['interval'][0]:+.2f}, {gap['interval'][1]:+.2f}]; over the free setting "
                     + ", ".join(f"{f:.2f}x at batch {b}" for b, f in over.items()))
    screen = results.get("sample_screen") or {}
    if screen.get("spearman_vs_fid") is not None:
        lines.append(f"  sample screen vs FID: Spearman {screen['spearman_vs_fid']:+.2f} over {screen['pairs']} points")
    if screen.get("within_model"):
        lines.append(f"  settings of the same model ordered alike by the screen and FID: "
                     f"{screen['within_model']['agree']} of {screen['within_model']['pairs']} pairs")
    return lines, factors


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f}x (range {min(values):.2f}-{max(values):.2f}x, n={len(values)})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outputs", nargs="+", type=Path, help="finished tdcdiff tune output folders (one per seed)")
    p.add_argument("--target", type=float, default=1.5,
                   help="the model's speed over the best free setting at batch 64 that counts as adding speed")
    args = p.parse_args(argv)
    all_factors = []
    for folder in args.outputs:
        lines, factors = summarize(folder, read_tune(folder))
        print("\n".join(lines) + "\n")
        all_factors.append(factors)
    print(f"over {len(all_factors)} tune outputs:")
    for kind in ("total", "free", "model"):
        for batch in sorted({b for f in all_factors for b in f[kind]}, key=int):
            values = [f[kind][batch] for f in all_factors if batch in f[kind]]
            print(f"  {kind:<6} at batch {batch:>3}: {spread(values)}")
    models = sorted({m for f in all_factors for m in f["over_free"]})
    for model in models:
        values = [f["over_free"].get(model) for f in all_factors if model in f["over_free"]]
        found = [v for v in values if v is not None]
        reach = sum(v >= args.target for v in found)
        print(f"  {model:<24} over the free setting at batch 64: "
              + (spread(found) if found else "never non-inferior")
              + f"; non-inferior in {len(found)} of {len(values)}, >= {args.target}x in {reach}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
