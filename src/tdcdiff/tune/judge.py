"""Paired statistics of per-image measures, and the rule that chooses a candidate."""

from __future__ import annotations

import math
import statistics


def mean_se(values: list[float]) -> dict:
    """Mean and standard error of the mean ({"mean", "se"}; se NaN for one value)."""
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return {"mean": statistics.fmean(values), "se": se}


def paired(values: list[float], reference: list[float]) -> dict:
    """Mean and standard error of values - reference, image by image ({"mean", "se"}; se NaN for one image).
    Raises ValueError when the two lists differ in length (not measured on the same images)."""
    if len(values) != len(reference):
        raise ValueError(f"cannot pair {len(values)} per-image values with {len(reference)}; measure both on the "
                         "same images")
    return mean_se([a - b for a, b in zip(values, reference)])


def choose(rows: list[dict], max_quality_loss: float | None = None) -> dict:
    """The fastest candidate whose quality is tied with or better than the base's.

    rows: one per candidate: name, time_s (sampling time at the user's batch), quality_ratio (screening value /
        the base's; lower is better), fid_gap (metrics.paired_gap of the base's per-seed FID against the
        candidate's, or None when it was not a finalist) and optionally failed (True: not trained).
    max_quality_loss: also accept a candidate without a FID verdict whose quality_ratio is at most
        1 + max_quality_loss. A paired FID verdict of "worse" always rules a candidate out.
    Returns {"name": ... or None, "rule": "paired FID" | "max-quality-loss" | None, "reason": one sentence}.
    """
    for row in sorted((r for r in rows if not r.get("failed")), key=lambda r: (r["time_s"], r["quality_ratio"])):
        gap = row.get("fid_gap")
        if gap is not None:
            low, high = gap["interval"]
            if gap["tie"] or gap["mean"] < 0:
                verdict = "tied with" if gap["tie"] else "better than"
                return {"name": row["name"], "rule": "paired FID",
                        "reason": f"the fastest candidate whose FID is {verdict} the base's by the paired rule "
                                  f"(gap {gap['mean']:+.3f}, {gap['confidence']:.0%} interval "
                                  f"[{low:+.3f}, {high:+.3f}])"}
            continue  # FID says really worse: the screening measure cannot overrule it
        if max_quality_loss is not None and row["quality_ratio"] - 1 <= max_quality_loss:
            return {"name": row["name"], "rule": "max-quality-loss",
                    "reason": f"the fastest candidate within --max-quality-loss {max_quality_loss:g} of the base on "
                              f"the screening measure ({row['quality_ratio'] - 1:+.1%}; no FID verdict against it)"}
    rules = "tied with or better than the base by paired FID" + (
        f", or within --max-quality-loss {max_quality_loss:g}" if max_quality_loss is not None else "")
    return {"name": None, "rule": None,
            "reason": f"no candidate is {rules}: keep the base (or raise --tune-steps, --finalists or "
                      "--max-quality-loss)"}
