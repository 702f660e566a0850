"""The quality-speed frontier (issue 13): TDC against uniform pruning at several budgets of measured time.

    python bench/frontier.py --data digits --seeds 0 1 2 --budgets 0.8 0.6 0.4 --base-from runs/bench-digits \\
        --out runs/frontier-digits
    python bench/frontier.py --quick --budgets 0.8 0.5 --out /tmp/frontier      # smoke run, minutes on a CPU

For each budget F, `bench/benchmark.py --budget-unit time --mean-budget F` (its arms at equal training compute:
the single model, uniform width pruning matched on measured forward time to TDC's experts, TDC) into
out/time-F/; a budget whose results.json came from the same benchmark command (its bench.command: the same data,
seeds, budget and options, up to --quiet) is read, not rerun; otherwise the benchmark runs there, resuming what it
finds. Options
after `--` go to every benchmark call unchanged (e.g. `-- --depth --fid-samples 2048`); those frontier.py sets
itself (--data, --seeds, --budget-unit, --mean-budget, --latency-batch, --out, --quick, --base-from) are refused
there.

Then, per budget and pruned arm, paired over the seeds (verdict.judge, 95%; each seed shares its stage-1 base and
sampling noise across the arms): the gap to the single model and TDC's gap to uniform on FID, on the held-out
denoising loss (all t) and on the held-out bits/dim bound, each with its verdict: better, non-inferior, inferior
or undecided. FID is judged against the margin its evaluation states (the real-vs-real spread of FID, or
--margin; results without one are judged against 0), the held-out measures against 0 (a plain difference test:
better, inferior or undecided). Each cell gives the margin and the half-width of the interval, the smallest gap
the seeds resolve. Written: out/frontier.json, out/frontier.png (FID and held-out loss against measured sampling
time at the latency batch) and a printed table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import benchmark  # bench/benchmark.py, beside this file
from tdcdiff.files import atomic_write_text
from tdcdiff.verdict import judge

SINGLE, UNIFORM, TDC = "single model", "uniform-pruned", "TDC"
METRICS = benchmark.RUN_METRICS


def budget_dir(out: Path, budget: float) -> Path:
    return out / f"time-{budget:g}"


# Options frontier.py gives every benchmark call itself (dest -> flag, the fix): the same ones after `--` would
# silently override them, and results would be filed under a budget they were not run at.
OWN_OPTIONS = {"data": ("--data", "give it before `--`"), "seeds": ("--seeds", "give it before `--`"),
               "budget_unit": ("--budget-unit", "leave it out, the budgets are of time"),
               "mean_budget": ("--mean-budget", "give the budgets as --budgets"),
               "latency_batch": ("--latency-batch", "give it before `--`"), "out": ("--out", "give it before `--`"),
               "quick": ("--quick", "give it before `--`"), "base_from": ("--base-from", "give it before `--`")}


def benchmark_call(args: argparse.Namespace, budget: float, passed: list[str]) -> list[str]:
    """The bench/benchmark.py arguments for one budget: frontier's own settings, then the options after `--`."""
    return ["--data", args.data, "--seeds", *map(str, args.seeds), "--budget-unit", "time", "--mean-budget",
            str(budget), "--latency-batch", str(args.latency_batch), "--out", str(budget_dir(args.out, budget)),
            *(["--quick"] if args.quick else []), *(["--base-from", str(args.base_from)] if args.base_from else []),
            *passed]


def overridden(args: argparse.Namespace, passed: list[str]) -> list[str]:
    """frontier.py's own options that the options after `--` would change (parsed as bench/benchmark.py parses
    them, abbreviations included), each with its fix; exits with benchmark's usage error for bad options."""
    own = vars(benchmark.parse_args(benchmark_call(args, args.budgets[0], [])))
    given = vars(benchmark.parse_args(benchmark_call(args, args.budgets[0], passed)))
    return [f"{flag} ({fix})" for dest, (flag, fix) in OWN_OPTIONS.items() if own[dest] != given[dest]]


def read_results(folder: Path) -> dict | None:
    """folder's results.json, or None when there is none; ValueError when it cannot be read."""
    path = folder / "results.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"not complete JSON ({err})") from None


def finished(results: dict | None, call: list[str]) -> bool:
    """True when results (a benchmark results.json, or None) came from this benchmark call: the command it
    records (bench.command) has the same data, seeds, budget and options, up to --quiet, --out and how paths
    are spelled; otherwise the benchmark is run (it resumes what its folder holds)."""
    recorded = (results or {}).get("bench", {}).get("command", "").split()
    if recorded[:2] != ["python", "bench/benchmark.py"]:
        return False
    try:
        return benchmark.call_settings(recorded[2:]) == benchmark.call_settings(call)
    except SystemExit:  # a command this benchmark.py no longer parses
        return False


def verdict(gap: dict) -> str:
    """A table cell: the verdict, the mean gap and its interval, the margin (m) and the half-width (h)."""
    low, high = gap["interval"]
    return (f"{gap['verdict']} {gap['mean']:+.3g} [{low:+.3g}, {high:+.3g}] m {gap['margin']:.3g} "
            f"h {gap['half_width']:.2g}")


def margins(results: dict, given: float | None) -> dict:
    """The margin of each metric: FID's the given one, else the one its evaluation's protocol states, else 0;
    the held-out measures' 0."""
    fid = given if given is not None else results.get("protocol", {}).get("judge", {}).get("margin", 0.0)
    return {metric: fid if metric == "FID" else 0.0 for metric in METRICS}


def arm(models: list[dict], name: str, where: str) -> dict:
    """The model of arm `name` among a benchmark's models (TDC: also "TDC (one-stage)"); ValueError if absent."""
    names = (name, f"{name} (one-stage)") if name == TDC else (name,)
    found = next((m for m in models if m["name"] in names), None)
    if found is None:
        raise ValueError(f"no {name!r} model in {where} (it has {[m['name'] for m in models]})")
    return found


def summarise(results: dict, budget: float, margin: float | None = None) -> list[dict]:
    """Rows for the pruned arms of one budget's benchmark results: time ratios, each metric's seed values and
    the verdicts on the paired gaps to the single model (and TDC's to uniform), FID's against `margin` (None: the
    results' own, see margins). Raises ValueError for a missing arm."""
    margin_of = margins(results, margin)
    per_seed = {name: [arm(run["models"], name, run["label"]) for run in results["per_run"]]
                for name in (SINGLE, UNIFORM, TDC)}
    values = {name: {metric: [get(m) for m in models] for metric, get in METRICS.items()}
              for name, models in per_seed.items()}
    rows = []
    for name in (UNIFORM, TDC):
        model = arm(results["models"], name, "the pooled models")
        row = {"budget": budget, "arm": name, "seeds": len(per_seed[name]),
               "time_ratio": {k: v["ratio"] for k, v in model["time"].items()},
               "flops_ratio": model["sampling_flops"]["ratio"], "values": values[name], "single": values[SINGLE]}
        if row["seeds"] >= 2:
            row["vs_single"] = {metric: judge(values[SINGLE][metric], values[name][metric], margin_of[metric])
                                for metric in METRICS}
            if name == TDC:
                row["vs_uniform"] = {metric: judge(values[UNIFORM][metric], values[TDC][metric], margin_of[metric])
                                     for metric in METRICS}
        rows.append(row)
    return rows


def loses_everywhere(rows: list[dict], metric: str) -> list[float]:
    """Budgets at which every pruned arm is inferior to the single model on `metric` (verdict.judge)."""
    budgets = sorted({r["budget"] for r in rows})
    return [b for b in budgets
            if all(r.get("vs_single") and r["vs_single"][metric]["verdict"] == "inferior"
                   for r in rows if r["budget"] == b)]


def plot(rows: list[dict], batch_key: str, path: Path) -> Path:
    """FID and held-out loss (ratio to the single model) against the time ratio, one line per arm."""
    from tdcdiff.plots import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for arm, marker in ((UNIFORM, "s"), (TDC, "o")):
        mine = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["time_ratio"][batch_key])
        xs = [r["time_ratio"][batch_key] for r in mine]
        for ax, metric, relative in ((axes[0], "FID", False), (axes[1], "held-out loss", True)):
            ys = [[v / s if relative else v for v, s in zip(r["values"][metric], r["single"][metric])] for r in mine]
            means = [sum(y) / len(y) for y in ys]
            spread = [max(y) - min(y) for y in ys]
            ax.errorbar(xs, means,
                        yerr=[[m - min(y) for m, y in zip(means, ys)], [max(y) - m for m, y in zip(means, ys)]]
                        if any(spread) else None, marker=marker, capsize=3, label=arm)
    singles = [v for r in rows for v in r["single"]["FID"]]
    # The single model gets each budget's TDC stage-2 compute, so it differs per budget: the line is their mean.
    axes[0].axhline(sum(singles) / len(singles), color="black", ls="--", lw=1, label=f"{SINGLE} (mean over budgets)")
    axes[1].axhline(1, color="black", ls="--", lw=1, label=SINGLE)
    label = batch_key.replace("_", " ")
    axes[0].set(xlabel=f"sampling time / single model's ({label})", ylabel="FID (mean; bars: seed range)")
    axes[1].set(xlabel=f"sampling time / single model's ({label})",
                ylabel="held-out loss / single's (bars: seed range)")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle("quality against measured sampling time, equal training compute")
    fig.tight_layout()
    return save_figure(fig, path)


def table(rows: list[dict]) -> str:
    batches = "/".join(key.replace("batch_", "b") for key in rows[0]["time_ratio"])
    lines = [f"{'budget':>6}  {'arm':<15} {'time ' + batches:>11}  {'FLOPs':>5}  "
             + "  ".join(f"{m + ' vs single':<54}" for m in METRICS)]
    for r in rows:
        times = "/".join(f"{v:.2f}" for v in r["time_ratio"].values())
        gaps = [verdict(r["vs_single"][m]) if "vs_single" in r
                else f"{r['values'][m][0] - r['single'][m][0]:+.4g} (one seed)" for m in METRICS]
        lines.append(f"{r['budget']:>6g}  {r['arm']:<15} {times:>11}  {r['flops_ratio']:>5.2f}  "
                     + "  ".join(f"{g:<54}" for g in gaps))
        if "vs_uniform" in r:
            lines.append(f"{'':>6}  {'TDC - uniform':<15} {'':>11}  {'':>5}  "
                         + "  ".join(f"{verdict(r['vs_uniform'][m]):<54}" for m in METRICS))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    passed = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="%(prog)s [options] [-- BENCHMARK_OPTIONS]")
    p.add_argument("--data", default="digits", choices=["digits", "mnist", "cifar10"],
                   help="data set (as benchmark.py)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one benchmark run per seed, each with its own "
                   "stage-1 base; gaps are paired over them (a verdict needs 2 or more)")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.6, 0.4],
                   help="mean time budgets F (0 < F <= 1): TDC's experts' forward time, weighted by the timesteps "
                        "each serves, as a fraction of the base's, measured at --latency-batch")
    p.add_argument("--latency-batch", type=int, default=64,
                   help="batch size at which forward time is measured (budgets, uniform's match, the plot's x axis)")
    p.add_argument("--base-from", type=Path,
                   help="reuse the stage-1 bases of an earlier benchmark output (its seed_S/tdc, same data and seeds)")
    p.add_argument("--out", type=Path, required=True,
                   help="folder for time-F/ (one benchmark per budget), frontier.json and frontier.png")
    p.add_argument("--quick", action="store_true",
                   help="tiny steps and few samples: a smoke run (numbers mean nothing)")
    p.add_argument("--margin", type=float, help="FID non-inferiority margin (FID units) instead of the one each "
                   "evaluation states (the real-vs-real spread of FID at its sample count)")
    args = p.parse_args(own)
    if args.margin is not None and not 0 <= args.margin < float("inf"):
        p.error(f"--margin must be a finite number >= 0 (the largest FID loss that counts as none), got {args.margin}")
    if args.latency_batch < 1:
        p.error(f"--latency-batch must be >= 1 (a batch size), got {args.latency_batch}")
    bad = [b for b in args.budgets if not 0 < b <= 1]
    if bad:
        p.error(f"--budgets {bad[0]:g} is not in (0, 1]: give fractions of the single model's time, e.g. 0.6")
    folders = [budget_dir(args.out, b).name for b in args.budgets]
    twice = next((b for b, f in zip(args.budgets, folders) if folders.count(f) > 1), None)
    if twice is not None:
        p.error(f"--budgets {twice:g} is given twice: list each budget once")
    clash = overridden(args, passed)
    if clash:
        p.error(f"{', '.join(clash)} after `--` would override what frontier.py gives every benchmark")

    def unreadable(folder: Path, err: Exception):
        p.error(f"{folder / 'results.json'}: {err if isinstance(err, ValueError) else f'lacks {err}'}: delete it "
                "to rerun that budget")

    rows = []
    for budget in args.budgets:
        folder, call = budget_dir(args.out, budget), benchmark_call(args, budget, passed)
        try:
            earlier = read_results(folder)
        except ValueError as err:
            unreadable(folder, err)
        if not finished(earlier, call):
            again = " (its results.json came from another command: run again)" if earlier else ""
            benchmark.say(f"== time budget {budget:g} -> {folder}{again}")
            code = benchmark.main(call)
            if code:
                return code
        try:
            rows += summarise(read_results(folder), budget, args.margin)
        except (ValueError, KeyError, TypeError) as err:
            unreadable(folder, err)

    batch_key = f"batch_{args.latency_batch}" if f"batch_{args.latency_batch}" in rows[0]["time_ratio"] else \
        list(rows[0]["time_ratio"])[-1]
    plot(rows, batch_key, args.out / "frontier.png")
    lose = {metric: loses_everywhere(rows, metric) for metric in METRICS}
    atomic_write_text(args.out / "frontier.json", json.dumps({
        "format": "tdcdiff-frontier/1", "data": args.data, "seeds": args.seeds, "budgets": args.budgets,
        "latency_batch": args.latency_batch, "benchmark_options": passed,
        "paired": "gaps are arm - reference per seed, judged by verdict.judge (95% t interval over the seeds; FID "
                  "against the margin each row states, the held-out measures against 0)",
        "every_arm_worse_than_single_at": lose, "rows": rows}, indent=2))
    benchmark.say("\n" + table(rows))
    if len(args.seeds) < 2:
        benchmark.say("one seed: no gap can be resolved (the paired rule needs 2 or more seeds)")
    else:
        for metric, budgets in lose.items():
            where = ", ".join(f"{b:g}" for b in budgets) or "no budget tried"
            benchmark.say(f"every pruned arm inferior to the single model on {metric}: at {where}")
    benchmark.say(f"\nplot: {args.out / 'frontier.png'}\nsummary: {args.out / 'frontier.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
