"""The judge: is a candidate as good as a reference, by scores measured in pairs (lower is better, e.g. FID per
sampling seed)? One rule for every verdict tdcdiff prints: tune's choice, the run report, bench/frontier.py and
bench/agreement.py.

A non-inferiority test against a stated margin (the design of non-inferiority trials: CONSORT extension,
Piaggio et al. 2012, JAMA 308:2594). The gap d = candidate - reference is measured pair by pair (the same training
run and sampling seed: what both share cancels); its mean has the paired t interval [low, high] at `confidence`
(two-sided). With a margin >= 0, the largest loss that counts as none:

    better        high < 0                        resolved better than the reference
    non-inferior  0 <= high < margin              worse by less than the margin, if at all (low > 0: resolved
                                                  worse, but by less than the margin)
    inferior      low > margin                    worse by more than the margin
    undecided     low <= margin <= high           more pairs could decide it; never shipped

The upper bound of a two-sided 1 - 2a interval is a one-sided 1 - a bound, so at 95% a false "non-inferior" (a true
gap of at least the margin) comes out at most 2.5% of the time, and so does a false "inferior". With margin 0 the
test is a plain difference test: "better", "inferior" (resolved worse) or "undecided" (the interval contains 0, what
was once called a tie). The judge's power is the interval's half-width: it tells a gap from 0 only beyond it, and
when it is at least the margin, not even an exact tie can come out non-inferior.

Sequential looks (`sequential`): pairs are added one at a time, from `start` to `cap`, until the verdict is decided.
Each look is another chance of a false verdict, so looking until something is decided would inflate the error
rate well past 2.5%. The error is spent instead (a Bonferroni split over the looks, conservative whatever the
correlation between looks): half of a at the last look, the other half evenly over the earlier ones. By the union
bound, the chance that ANY look of one comparison falsely says non-inferior is at most a = 2.5%; the price is a
wider interval at each look (at the last, that of a 97.5% interval instead of 95%). Across several candidates
judged at once the error adds up: with m candidates truly worse by the margin or more, the chance that one of them
is falsely called non-inferior is at most m x 2.5%.
"""

from __future__ import annotations

import statistics

ALPHA = 0.025  # one-sided error of each verdict; a single look reads the two-sided 95% interval
VERDICTS = ("better", "non-inferior", "inferior", "undecided")
QUALIFY = ("better", "non-inferior")  # the verdicts that let a candidate replace its reference


def paired_gap(a: list[float], b: list[float], *, confidence: float = 0.95) -> dict:
    """Per-pair differences b - a of scores measured in pairs, and the paired t interval of their mean.

    a, b: equally long lists of at least 2 scores (ValueError otherwise). confidence: two-sided. With 3 pairs at 95%
    the half-width is 2.48 x the sd of the differences, with 2 pairs 8.98 x: a few pairs rarely settle a gap.
    Returns mean, sd (ddof=1), interval (low, high), half_width, confidence, the differences (diffs), how many pairs
    have b lower (b_lower) and pairs.
    """
    from scipy.stats import t as student_t

    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired_gap needs two equally long lists of at least 2 scores, got {len(a)} and {len(b)}")
    diffs = [y - x for x, y in zip(a, b)]
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = float(student_t.ppf(0.5 + confidence / 2, len(diffs) - 1)) * sd / len(diffs) ** 0.5
    return {"mean": mean, "sd": sd, "interval": (mean - half, mean + half), "half_width": half,
            "confidence": confidence, "diffs": diffs, "b_lower": sum(d < 0 for d in diffs), "pairs": len(diffs)}


def verdict_of(low: float, high: float, margin: float) -> str:
    """The verdict (one of VERDICTS) of an interval [low, high] of the gap candidate - reference against margin."""
    if high < 0:
        return "better"
    if high < margin:
        return "non-inferior"
    return "inferior" if low > margin else "undecided"


def look_confidence(look: int, looks: int, alpha: float = ALPHA) -> float:
    """The two-sided confidence of the interval read at look `look` (1-based) of at most `looks`: alpha (one-sided)
    is spent half at the last look and half evenly over the earlier ones; one look spends all of it (95%)."""
    if not 1 <= look <= looks:
        raise ValueError(f"look {look} is not one of 1..{looks}")
    spent = alpha if looks == 1 else alpha / 2 if look == looks else alpha / (2 * (looks - 1))
    return 1 - 2 * spent


def judge(reference: list[float], candidate: list[float], margin: float, *, look: int = 1, looks: int = 1) -> dict:
    """The verdict on `candidate` against `reference` (paired scores, lower is better) with `margin` (>= 0, in the
    scores' unit), read at look `look` of `looks` (look_confidence; one look: the 95% interval).

    Returns paired_gap's dict (interval at that look's confidence) plus verdict, margin, look and looks.
    Raises ValueError for a negative or non-finite margin and what paired_gap raises.
    """
    if not 0 <= margin < float("inf"):
        raise ValueError(f"the margin must be a finite number >= 0 (the largest loss that counts as none), got "
                         f"{margin}")
    gap = paired_gap(reference, candidate, confidence=look_confidence(look, looks))
    return {**gap, "verdict": verdict_of(*gap["interval"], margin), "margin": margin, "look": look, "looks": looks}


def sequential(reference: list[float], candidate: list[float], margin: float, *, start: int, cap: int) -> dict:
    """Replay the sequential looks over the pairs measured so far: looks at start, start + 1, .., cap pairs; the
    judgement of the first look that decides, else of the last look the lists allow.

    reference, candidate: per-seed scores, seed 0 first (only their common length counts). start (>= 2), cap
    (>= start): the first and the largest number of pairs. Returns judge's dict plus "done": True when the verdict
    is decided or the cap is reached (adding pairs would change nothing), False when another look needs the pair
    `pairs + 1`. Replaying makes a rerun with more pairs cached come to the same verdict as the first run did.
    Raises ValueError when fewer than `start` pairs are given, or for start < 2 or cap < start.
    """
    if not 2 <= start <= cap:
        raise ValueError(f"sequential looks need 2 <= start <= cap, got start {start} and cap {cap}")
    pairs = min(len(reference), len(candidate), cap)
    if pairs < start:
        raise ValueError(f"the first look needs {start} pairs, got {pairs}")
    looks = cap - start + 1
    for n in range(start, pairs + 1):
        result = judge(reference[:n], candidate[:n], margin, look=n - start + 1, looks=looks)
        if result["verdict"] != "undecided":
            break
    return {**result, "done": result["verdict"] != "undecided" or result["pairs"] == cap}


def describe(result: dict, unit: str = "FID", digits: int = 2) -> str:
    """One phrase of a judgement for tables and sentences, e.g. "non-inferior: +0.12 [-0.30, +0.54] (95% interval,
    3 pairs), margin 0.74 FID; resolves gaps over 0.42" (the half-width: the judge's power at these pairs)."""
    low, high = result["interval"]
    worse = " (resolved worse, within the margin)" if result["verdict"] == "non-inferior" and low > 0 else ""
    return (f"{result['verdict']}{worse}: {result['mean']:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}] "
            f"({result['confidence'] * 100:g}% interval, {result['pairs']} pairs), margin "
            f"{result['margin']:.{digits}f} {unit}; resolves gaps over {result['half_width']:.{digits}f}")
