"""Paired statistics of per-image measures, and the rule that chooses a candidate (its FID verdicts come from
verdict.py, the one judge of every verdict tdcdiff prints)."""

from __future__ import annotations

import math
import statistics

from ..verdict import QUALIFY, describe, paired_gap


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


JUDGE_RULE = ("each finalist's per-seed FID minus the base's, paired by sampling seed; seeds added one at a time "
              "from --fid-seeds to --max-fid-seeds until decided (verdict.sequential: 2.5% one-sided error spent over "
              "the looks); better: the upper bound below 0; non-inferior: below the margin; inferior: the lower bound "
              "above the margin; undecided: neither (never shipped)")


def model_speedup(row: dict, free: dict, confidence: float = 0.95) -> dict:
    """How much faster `row` samples than `free`, paired by timing round: both rows' "time_rounds" (seconds of one
    sampling run in each round of one interleaved timing, evaluate.time_rounds) give per-round log ratios
    log(free / row), whose paired t interval (verdict.paired_gap) is taken back to a ratio. Rounds pair because
    both points ran in the same pass: the machine's drift hits both. Returns {"speedup" (the geometric mean ratio),
    "low", "high" (the interval at `confidence`, two-sided; None below 2 rounds), "rounds"}. Raises ValueError
    when a row has no rounds, a time that is not a finite number of seconds > 0, or the two differ in count."""
    model, base = row.get("time_rounds") or [], free.get("time_rounds") or []
    for name, times in ((row.get("name"), model), (free.get("name"), base)):
        if not times or not all(isinstance(t, (int, float)) and 0 < t < math.inf for t in times):
            raise ValueError(f"row {name!r}: time_rounds must be one or more finite times in seconds > 0 (one per "
                             f"timing round, evaluate.time_rounds), got {times!r}")
    if len(model) != len(base):
        raise ValueError(f"cannot pair {len(model)} timing rounds with {len(base)}; time both points in one pass")
    ratios = [math.log(b / m) for b, m in zip(base, model)]
    if len(ratios) < 2:
        return {"speedup": math.exp(ratios[0]), "low": None, "high": None, "rounds": 1}
    gap = paired_gap([0.0] * len(ratios), ratios, confidence=confidence)
    low, high = gap["interval"]
    return {"speedup": math.exp(gap["mean"]), "low": math.exp(low), "high": math.exp(high), "rounds": len(ratios)}


def choose(rows: list[dict], max_quality_loss: float | None = None, free: dict | None = None,
           min_model_speedup: float = 0.0) -> dict:
    """The fastest candidate whose FID is better than or non-inferior to the base's (verdict.QUALIFY).

    rows: one per candidate: name, time_s (sampling time at the user's batch), quality_ratio (screening value /
        the base's; lower is better), fid_gap (the verdict.judge or verdict.sequential judgement of the
        candidate's per-seed FID against the base's, or None when it was not a finalist), optionally model (the
        model a point samples: "base" for the user's own model at any setting), time_rounds (its seconds in each
        timing round, for the speed bar) and failed (True: not trained).
    max_quality_loss: also accept a candidate without a FID verdict whose quality_ratio is at most
        1 + max_quality_loss. A FID verdict of "inferior" or "undecided" always rules a candidate out: the
        screening measure cannot overrule it, and an undecided candidate is never shipped.
    free, min_model_speedup: the best free setting's row (ladder.best_free) and how much faster than it another
        model than the base must be to be shipped: the lower bound of the 95% interval of its paired speedup
        (model_speedup) must be at least min_model_speedup (0: no bar). A gain within the timing's noise, or too
        small to be worth new weights, ships the free setting instead (docs/tune.md).
    A pure function of the rows. Returns {"name": ... or None, "rule": "paired FID" | "max-quality-loss" | None,
    "reason": one sentence, with the verdict's interval and margin, and a model's measured speedup}.
    """
    passed_over = []  # as good, and faster than the choice, but not measurably min_model_speedup x the free setting
    for row in sorted((r for r in rows if not r.get("failed")), key=lambda r: (r["time_s"], r["quality_ratio"])):
        accepted = _accepts(row, max_quality_loss)
        if accepted is None:
            continue
        speed = None
        if free is not None and row.get("model", "base") != "base" and min_model_speedup > 0:
            speed = model_speedup(row, free)
            if speed["low"] is None or speed["low"] < min_model_speedup:
                passed_over.append((row["name"], speed))
                continue
        note = f"; faster than the best free setting ({free['name']}) by {_speed_text(speed)}" if speed else ""
        return {"name": row["name"], "rule": accepted[0],
                "reason": accepted[1] + note + _passed_over(passed_over, free, min_model_speedup)}
    rules = "better than or non-inferior to the base by paired FID" + (
        f", or within --max-quality-loss {max_quality_loss:g}" if max_quality_loss is not None else "")
    return {"name": None, "rule": None,
            "reason": f"no candidate is {rules}: keep the base (or raise --max-fid-seeds to decide undecided "
                      "finalists, --tune-steps, --finalists or --max-quality-loss)"
                      + _passed_over(passed_over, free, min_model_speedup)}


def _accepts(row: dict, max_quality_loss: float | None) -> tuple[str, str] | None:
    """(rule, reason) when `row` is as good as the base by choose's rules, else None."""
    gap = row.get("fid_gap")
    if gap is not None:
        if gap["verdict"] not in QUALIFY:
            return None  # inferior or undecided by FID: the screening measure cannot overrule it
        relation = "better than" if gap["verdict"] == "better" else "non-inferior to"
        return "paired FID", f"the fastest candidate whose FID is {relation} the base's ({describe(gap, digits=3)})"
    if max_quality_loss is not None and row["quality_ratio"] - 1 <= max_quality_loss:
        return "max-quality-loss", (f"the fastest candidate within --max-quality-loss {max_quality_loss:g} of the base "
                                    f"on the screening measure ({row['quality_ratio'] - 1:+.1%}; no FID verdict "
                                    "against it)")
    return None


def _speed_text(speed: dict) -> str:
    """A measured speedup as text: '1.31x (95% interval [1.18, 1.45], 5 paired timing rounds)'."""
    if speed["low"] is None:
        return f"{speed['speedup']:.2f}x (1 timing round: no interval; time with timing_repeats >= 2)"
    return (f"{speed['speedup']:.2f}x (95% interval [{speed['low']:.2f}, {speed['high']:.2f}], {speed['rounds']} "
            "paired timing rounds)")


def _passed_over(passed: list[tuple[str, dict]], free: dict | None, min_model_speedup: float) -> str:
    """The choice's note on the models passed over for the speed bar, with their measured speedups (empty when
    none)."""
    if not passed:
        return ""
    one = len(passed) == 1
    return (f"; {', '.join(f'{n} ({_speed_text(s)})' for n, s in passed)} also qualif{'ies' if one else 'y'} but "
            f"{'is' if one else 'are'} not measurably {min_model_speedup:g}x faster than the best free setting "
            f"({free['name']}; the lower 95% bound must reach --min-model-speedup)")
