"""The frontier's outputs: its rows (results.json), the table as text and CSV, and the frontier plot."""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path

from ..files import atomic_write_text
from ..plots import pyplot, save_figure
from ..samplers import visited_timesteps
from .kinds import kind_of
from .measures import SCREENING_MEASURES, SEED_SCORES, second_measure

BASE_STYLE = ("k", "*")  # the base's point in the frontier plot; candidates are drawn in their kind's style


def frontier_rows(models: dict, points: dict, records: dict, screening: dict, fid: dict, times: dict,
                  distances: dict, key: str) -> list[dict]:
    """One row per point (model, sampling setting) of the frontier (results.json's "rows"), the reference ("base":
    the base at the reference setting) first.

    models: name -> (Router, FLOPs) (measures.load_models). points: row name -> (model name, SamplingSetting).
    records: name -> the candidate's result.json record (the base has none). screening: measures.screen's values
    (a model's, whatever its setting); fid: measures.fid's result (the reference and the finalists have per-seed
    scores over the seeds their verdicts used, and the finalists a verdict); times: row name -> {batch: seconds per
    sampling run in each timed round} at the user's batch and 1 (rows: their medians, and the rounds at the user's
    batch as "time_rounds", which judge.choose pairs); distances: row name -> sample_screen.measure_screen's record
    (points not screened: absent). key: the screening measure that ranks (the other is the rows' "second").
    A candidate's row names its bundle folder relative to the tune directory ("bundle": the tune reads and writes
    it from anywhere; None for the base). sampling_flops count every step as a full pass (an upper bound for a
    cached setting, whose shallow passes cost less).
    """
    other, base = second_measure(key), screening["base"]
    batch = next(b for b in times["base"] if b != 1) if len(times["base"]) > 1 else 1
    t_max = next(iter(models.values()))[0].grouping.num_train_timesteps
    flops = {n: models[m][0].trajectory_flops(visited_timesteps(s.steps, t_max)) for n, (m, s) in points.items()}
    median = {n: {b: statistics.median(rounds) for b, rounds in by_batch.items()} for n, by_batch in times.items()}
    rows = []
    for name, (model, setting) in points.items():
        record, screen = records.get(model), distances.get(name)
        ranked, beside, gap = screening[model][key], screening[model][other], fid["verdicts"].get(name)
        seeds = fid["seeds"].get(name)
        scores = {k: v[:seeds] for k, v in fid["models"][name].items() if k in SEED_SCORES} if seeds else None
        rows.append({
            "name": name, "model": model, "setting": str(setting), "kind": record["kind"] if record else "base",
            "index": record["index"] if record else None,
            "sampling_flops": flops[name], "flops_ratio": flops[name] / flops["base"],
            "time_s": median[name][batch], "time_ratio": median[name][batch] / median["base"][batch],
            "time_1_s": median[name][1], "time_1_ratio": median[name][1] / median["base"][1],
            "time_rounds": times[name][batch],
            "screening": ranked["value"], "screening_se": ranked["se"], "screening_gap": ranked["vs_base"],
            "quality_ratio": ranked["value"] / base[key]["value"],
            "second": beside["value"], "second_se": beside["se"], "second_gap": beside["vs_base"],
            "second_ratio": beside["value"] / base[other]["value"],
            "screen_distance": screen["distance"] if screen else None, "screen_se": screen["se"] if screen else None,
            "screen_features": screen["features"] if screen else None,
            **{k: scores[k] if scores else None for k in ("fid", "kid", "precision", "recall")},
            "fid_gap": {k: (list(v) if isinstance(v, tuple) else v) for k, v in gap.items()} if gap else None,
            "train_flops": record["train_flops"] if record else 0,
            "bundle": (Path(record["dir"]) / record["bundle"]).as_posix() if record else None,
        })
    return rows


def _fid_text(row: dict) -> str:
    if not row["fid"]:
        return "-"
    return f"{statistics.fmean(row['fid']):.2f} ± {statistics.stdev(row['fid']):.2f}"


def _gap_text(row: dict) -> str:
    """The FID verdict against the base: the verdict, the mean gap, its interval and the margin it was read
    against, and the seeds it took."""
    gap = row["fid_gap"]
    if not gap:
        return "-"
    low, high = gap["interval"]
    return (f"{gap['verdict']} {gap['mean']:+.2f} [{low:+.2f}, {high:+.2f}] vs margin {gap['margin']:.2f}, "
            f"{gap['pairs']} seeds")


def _pr_text(row: dict) -> str:
    if not row.get("precision"):
        return "-"
    return f"{statistics.fmean(row['precision']):.3f} / {statistics.fmean(row['recall']):.3f}"


def table_rows(rows: list[dict], chosen: str | None, screening: str = "loss") -> list[dict[str, str]]:
    """The frontier table as strings, fastest first (the base first of all). screening: the key (of
    SCREENING_MEASURES) of the measure the rows were ranked by; the other is the rows' second measure."""
    ranked, beside = SCREENING_MEASURES[screening], SCREENING_MEASURES[second_measure(screening)]
    d, e = ranked.decimals, beside.decimals
    ordered = sorted(rows, key=lambda r: (r["name"] != "base", r["time_s"]))
    return [{"": "*" if r["name"] == chosen else "", "model": r["name"],
             "FLOPs": f"{r['flops_ratio']:.2f}x", "time": f"{r['time_s']:.3f} s ({r['time_ratio']:.2f}x)",
             ranked.label: f"{r['screening']:.{d}f} ± {r['screening_se']:.{d}f}",
             "- base (paired)": f"{r['screening_gap']['mean']:+.{d}f} ± {r['screening_gap']['se']:.{d}f}",
             f"{beside.label} (- base, paired)":
                 f"{r['second']:.{e}f} ({r['second_gap']['mean']:+.{e}f} ± {r['second_gap']['se']:.{e}f})",
             "FID": _fid_text(r), "precision / recall": _pr_text(r), "FID - base (paired): verdict": _gap_text(r),
             "resolves": f"{r['fid_gap']['half_width']:.2f}" if r["fid_gap"] else "-",
             "train TFLOPs": f"{r['train_flops'] / 1e12:.2f}", "time b1": f"{r['time_1_ratio']:.2f}x",
             "sample screen": "-" if r["screen_distance"] is None else
             f"{r['screen_distance']:.3f} ± {r['screen_se']:.3f}"}
            for r in ordered]


def judge_line(fid_protocol: dict) -> str:
    """One line under the table: the FID judge's margin and where it came from, the feature network and the
    seeds (results.json's fid_protocol)."""
    judge, seeds = fid_protocol["judge"], fid_protocol["seeds"]
    real = judge["real_vs_real"]
    return (f"FID judge: margin {judge['margin']:.3f} FID ({judge['margin_from']}); real-vs-real FID at {real['n']} "
            f"images {real['fid_mean']:.3f} ± {real['fid_sd']:.3f}; features: {fid_protocol['feature_net']}; seeds "
            f"from {seeds['start']} up to {seeds['cap']} until decided (one-sided error {judge['alpha']:.1%} spent "
            "over the looks); 'resolves': the interval's half-width, the smallest gap it tells from 0")


def format_rows(rows: list[dict[str, str]]) -> str:
    """Left-aligned text columns."""
    if not rows:
        return ""
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in rows[0]}
    lines = ["  ".join(k.ljust(w) for k, w in widths.items())]
    lines += ["  ".join(r[k].ljust(w) for k, w in widths.items()) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def write_csv(path: Path, rows: list[dict], fieldnames: list[str]) -> Path:
    """rows as CSV with these columns (keys of a row outside them are left out), written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())
    return path


def write_table_csv(rows: list[dict], path: Path, screening: str = "loss") -> Path:
    """The frontier table (results.json rows) as CSV; screening: the key of the measure they were ranked by,
    written in the screening_measure column (second_measure: the other one's)."""
    keys = ["name", "kind", "sampling_flops", "flops_ratio", "time_s", "time_ratio", "screening_measure", "screening",
            "screening_se", "screening_gap_mean", "screening_gap_se", "quality_ratio", "second_measure", "second",
            "second_se", "second_gap_mean", "second_gap_se", "second_ratio", "fid_mean", "fid_gap_mean", "fid_gap_low",
            "fid_gap_high", "fid_verdict", "fid_margin", "fid_half_width", "fid_seeds", "precision_mean",
            "recall_mean", "train_flops", "model", "setting", "time_1_s", "time_1_ratio", "screen_distance",
            "screen_se", "screen_features"]
    measures = {"screening_measure": screening, "second_measure": second_measure(screening)}
    table = []
    for r in rows:
        gap = r["fid_gap"] or {}
        table.append({**r, **measures, **{f"{m}_gap_{k}": r[f"{m}_gap"][k] for m in ("screening", "second")
                                          for k in ("mean", "se")},
                      **{f"{k}_mean": statistics.fmean(r[k]) if r.get(k) else ""
                         for k in ("fid", "precision", "recall")},
                      "fid_gap_mean": gap.get("mean", ""), "fid_gap_low": gap.get("interval", ["", ""])[0],
                      "fid_gap_high": gap.get("interval", ["", ""])[1], "fid_verdict": gap.get("verdict", ""),
                      "fid_margin": gap.get("margin", ""), "fid_half_width": gap.get("half_width", ""),
                      "fid_seeds": len(r["fid"]) if r["fid"] else ""})
    return write_csv(path, table, keys)


def frontier_series(rows: list[dict]) -> list[tuple[str, tuple[str, str], list[dict]]]:
    """The frontier plot's series, each (legend label, (color, marker), rows): first "base", the base's row (the
    one without an index) in BASE_STYLE; then per kind (Kind.style, labelled by its name) its candidates, in the
    order the rows first name the kinds. Raises ValueError for a row whose kind the registry lacks."""
    kinds: dict[str, list[dict]] = {}
    for r in rows:
        if r["index"] is not None:
            kinds.setdefault(r["kind"], []).append(r)
    return [("base", BASE_STYLE, [r for r in rows if r["index"] is None]),
            *((kind, kind_of(kind).style, members) for kind, members in kinds.items())]


def model_lines(rows: list[dict]) -> dict[str, list[dict]]:
    """model name -> its rows in order of time at the user's batch: one line per model through its settings."""
    lines: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: r["time_s"]):
        lines.setdefault(r["model"], []).append(r)
    return lines


def plot_frontier(rows: list[dict], chosen: str | None, batch: int, measure: str, path: Path) -> Path:
    """Three panels against sampling time at `batch` (relative to the reference): the FID gap to the reference
    (mean of the paired per-seed gaps; the points with FID), the sample screen's distance, and the screening
    measure relative to the base's; one line per model through its settings, in its kind's style (frontier_series),
    the chosen point circled."""
    styles = {r["model"]: style for _, style, members in frontier_series(rows) for r in members}
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    panels = [(axes[0], lambda r: 0.0 if r["name"] == "base" else r["fid_gap"] and r["fid_gap"]["mean"],
               "FID - reference's (paired mean; finalists)"),
              (axes[1], lambda r: r["screen_distance"], "sample screen: pixel RMSE to the target"),
              (axes[2], lambda r: r["quality_ratio"], f"{measure} / base's (lower is better)")]
    for ax, value, label in panels:
        for model, members in model_lines(rows).items():
            points = [(r, value(r)) for r in members if value(r) is not None]
            if not points:
                continue
            color, marker = styles[model]
            ax.plot([r["time_ratio"] for r, _ in points], [y for _, y in points], color=color, marker=marker,
                    markersize=5, linewidth=1, label=model)
            for r, y in points:
                ax.annotate(r["setting"], (r["time_ratio"], y), fontsize=6, xytext=(3, 3), textcoords="offset points")
                if r["name"] == chosen:
                    ax.scatter([r["time_ratio"]], [y], s=220, facecolors="none", edgecolors="green", linewidths=2)
        ax.set_xlabel(f"sampling time at batch {batch} / reference's")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"tdcdiff tune: quality against sampling time, one line per model through its sampling settings "
                 f"(chosen: {chosen or 'none'}, circled)")
    fig.tight_layout()
    return save_figure(fig, path)
