"""The evidence page: a side-by-side table, plots and plain-language verdicts from `evaluate` results.

    out_dir/
      report.html        one self-contained page; images by relative path
      results.json       the measurements (evaluate's dict) plus the figure files
      *.png              plots and sample grids
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

from .evaluate import slug
from .files import atomic_write_text, read_json_file
from .plots import plot_fid_vs_flops
from .verdict import describe, judge


# -- numbers as text ---------------------------------------------------------------------------------
def _pm(stats: dict, digits: int) -> str:
    return f"{stats['mean']:.{digits}f} ± {stats['sd']:.{digits}f}"


def _times(model: dict) -> str:
    return " / ".join(f"{t['ratio']:.2f}x" for t in model["time"].values())


def _throughput(model: dict) -> str:
    """Images per second of the timing clock at each timed batch size (batch / median seconds of one run)."""
    return " / ".join(f"{int(key.removeprefix('batch_')) / t['median_s']:.1f}" for key, t in model["time"].items())


def _ratio(value) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _si(flops: float) -> str:
    """FLOPs with an SI prefix, e.g. 1.23 GFLOPs."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(flops) >= scale:
            return f"{flops / scale:.3g} {prefix}FLOPs"
    return f"{flops:.3g} FLOPs"


KID_NOTE = ("KID is the unbiased estimate of the squared kernel distance between the feature distributions: it "
            "can come out slightly negative, and a value near 0 (negative ones included) means the generated "
            "and reference images are indistinguishable at this sample size. Its scale: raw, not x 1000 as papers "
            "often print it; the squared MMD under torchmetrics' cubic polynomial kernel (x.y / d + 1)^3 on the same "
            "d-dimensional features as FID, averaged over 100 random subsets of min(generated, reference, 1000) "
            "images, so it compares only under the same feature network; ± is the sd over seeds.")

PR_NOTE = ("Precision and recall (Kynkaanniemi et al. 2019) split what FID mixes: precision is the fraction of "
           "generated images inside the real images' manifold (fidelity), recall the fraction of real images inside "
           "the generated images' manifold (coverage); each manifold is the union of balls reaching every point's "
           "3rd nearest neighbour in the same feature space as FID, on equal numbers of generated and real images. "
           "Both in [0, 1], higher is better; even real images against other real images stay below 1.")


def timing_note(results: dict) -> str:
    """The line under the side-by-side table: which clock its time columns read, and how they were sampled."""
    p = results["protocol"]
    clock = ("wall-clock time on the GPU" if str(p.get("device", "")).startswith("cuda") else
             "thread CPU time of one torch thread, not wall-clock time (other processes on a shared machine do not "
             "inflate it)")
    return f"Time columns (time ratio, images/s) read {clock}: {p['time'].split(': ', 1)[-1]}."


def _bpd(stats: dict, sign: str = "") -> str:
    """A bits/dim cell: mean ± standard error over images, and the sd over runs when pooled."""
    spread = f" (sd {stats['sd']:.3f})" if "sd" in stats else ""
    return f"{stats['mean']:{sign}.3f} ± {stats['se']:.3f}{spread}"


def table_rows(results: dict) -> list[dict[str, str]]:
    """One dict of formatted cells per model (the columns of both the HTML and the console table)."""
    batches = " / ".join(key.removeprefix("batch_") for key in results["models"][0]["time"])
    spread = "sd" in results["models"][0].get("held_out_bpd", {}).get("total", {})  # pooled over several runs
    rows = []
    for m in results["models"]:
        memory = m["memory"]
        bpd = m.get("held_out_bpd")
        rows.append({
            "model": m["name"],
            "FID (mean ± sd)": _pm(m["fid"], 2),
            "KID (mean ± sd)": _pm(m["kid"], 4),
            **({"precision / recall (mean ± sd)": f"{_pm(m['precision'], 3)} / {_pm(m['recall'], 3)}"}
               if "precision" in m else {}),
            **({"bits/dim (mean ± sd over runs)": _pm(bpd["total"], 3)} if bpd and spread else
               {"bits/dim (± SE over images)": f"{bpd['total']['mean']:.3f} ± {bpd['total']['se']:.3f}"}
               if bpd else {}),
            "sampling FLOPs / image": _si(m["sampling_flops"]["per_image"]),
            "FLOPs ratio": f"{m['sampling_flops']['ratio']:.2f}x",
            f"time ratio (batch {batches})": _times(m),
            f"images/s (batch {batches})": _throughput(m),
            "peak memory MB (weights + activations)": f"{memory['weights_bytes'] / 2**20:.2f} + "
                                                      f"{memory['peak_activation_bytes'] / 2**20:.2f}",
            "training compute": _si(m["train_flops"]),
            "training ratio": _ratio(m["train_flops_ratio"]),
        })
    return rows


def loss_rows(results: dict) -> list[dict[str, str]]:
    """Held-out denoising loss per model, overall and per group, as "value (ratio to the first model)" cells;
    empty when the results have no held-out loss."""
    models = results["models"]
    if "held_out_loss" not in models[0]:
        return []
    ranges = results["protocol"].get("held_out_loss_groups") or []  # None when the runs' groups differ
    column = {f"group {i}": f"group {i} ({r})" for i, r in enumerate(ranges)}
    first = models[0]["held_out_loss"]

    def cell(model: dict, key: str, value: float) -> str:
        se = model.get("held_out_loss_se", {}).get(key)  # older results have no standard errors
        return f"{value:.4f}{'' if se is None else f' ± {se:.4f}'} ({value / first[key]:.2f}x)"

    return [{"model": m["name"], **{column.get(key, key): cell(m, key, value)
                                    for key, value in m["held_out_loss"].items()}} for m in models]


def bpd_rows(results: dict) -> list[dict[str, str]]:
    """The held-out bits/dim bound per model: total, the paired difference to the first model, the prior and
    each group's additive share, as "mean ± SE over images" cells (plus "(sd ...)" over runs when pooled);
    empty when the results have no bound."""
    models = results["models"]
    if "held_out_bpd" not in models[0]:
        return []
    ranges = results["protocol"].get("held_out_loss_groups") or []
    rows = []
    for m in models:
        bpd = m["held_out_bpd"]
        rows.append({
            "model": m["name"],
            "total": _bpd(bpd["total"]),
            f"minus {models[0]['name']} (paired)": _bpd(bpd["vs_first"]["total"], "+"),
            "prior": _bpd(bpd["prior"]),
            **{(f"{key} ({ranges[i]})" if i < len(ranges) else key): _bpd(value)
               for i, (key, value) in enumerate(bpd.get("groups", {}).items())},
        })
    return rows


def format_table(results: dict, rows: list[dict[str, str]] | None = None) -> str:
    """The side-by-side table (or other rows, e.g. loss_rows) as aligned plain text (for the console)."""
    rows = table_rows(results) if rows is None else rows
    columns = list(rows[0])
    widths = [max(len(c), *(len(r[c]) for r in rows)) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(r[c].ljust(w) for c, w in zip(columns, widths)) for r in rows]
    return "\n".join(lines)


def protocol_line(results: dict) -> str:
    """One sentence naming everything a FID number depends on."""
    p = results["protocol"]
    runs = f" over {len(p['runs'])} independent runs: {', '.join(p['runs'])}" if p.get("runs") else ""
    spacing = f" ({p['timestep_spacing']} spacing)" if p.get("timestep_spacing") else ""  # older results lack it
    path = f" Sampling path (compile/precision): {p['sampling_path']}." if p.get("sampling_path") else ""
    margin, source = _margin(results)
    return (f"FID/KID/precision/recall on {p['num_samples']} samples per model and seed (sampling seeds "
            f"{p['seeds']}{runs}), {p['sampler'].upper()} {p['steps']} steps{spacing}, features: {p['feature_net']}, "
            f"reference: '{p['reference']['name']}' ({p['reference']['count']} images). FID verdicts: "
            f"non-inferiority margin {margin:.3f} FID ({source}). {p['flops'].split(';')[0]}. "
            f"Ratios are to '{p['ratios_to']}'.{path}")


def _margin(results: dict) -> tuple[float, str]:
    """The FID judge's margin of an evaluation and where it came from; results from before the judge had a margin
    are judged against 0 (a plain difference test: better, inferior or undecided)."""
    judge = results.get("protocol", {}).get("judge")
    if judge is None:
        return 0.0, "no margin stated in these results: judged against 0"
    return judge["margin"], judge["margin_from"]


def _quality(a: dict, b: dict, margin: float) -> str:
    """The FID verdict on b against a (verdict.judge over their paired per-seed FIDs), as a phrase."""
    a_scores = [s["fid"] for s in a["fid"]["per_seed"]]
    b_scores = [s["fid"] for s in b["fid"]["per_seed"]]
    scores = f"FID {_pm(b['fid'], 2)} vs {_pm(a['fid'], 2)} over {len(b_scores)} seed(s)"
    if len(a_scores) != len(b_scores):
        return (f"not compared ({scores}): the two have different numbers of seeds, so their scores cannot be "
                "paired")
    if len(b_scores) < 2:
        gap = b["fid"]["mean"] - a["fid"]["mean"]
        return (f"{b['name']} scores {abs(gap):.2f} FID {'lower' if gap < 0 else 'higher'} ({scores}), but with one "
                "seed there is no spread to judge that gap against: it is untested")
    result = judge(a_scores, b_scores, margin)
    detail = (f"{scores}; per-seed gaps {', '.join(f'{d:+.2f}' for d in result['diffs'])}; {b['name']} lower in "
              f"{result['b_lower']} of {len(b_scores)}")
    more = ""
    if result["verdict"] == "undecided":
        more = "; more seeds could decide it" + (
            f" (at {len(b_scores)} seeds the half-width is at least the margin: not even an exact tie could come "
            "out non-inferior)" if result["half_width"] >= margin else "")
    return f"{b['name']} is {describe(result)} ({detail}{more})"


def verdicts(results: dict) -> list[str]:
    """A plain-language sentence for every pair of models (later vs earlier in the table).

    FID scores come in pairs: the i-th score of every model shares the training run (a benchmark seed's
    stage-1 base) and the sampling seed. The later model is judged against the earlier by verdict.judge: better,
    non-inferior (the 95% upper bound of the mean paired gap is below the protocol's margin), inferior (the lower
    bound above it) or undecided; each sentence states the margin and the gap the seeds resolve (the interval's
    half-width). With one score each there is no spread, and the sentence says the gap is untested.
    """
    margin, _ = _margin(results)
    models = results["models"]
    sentences = []
    for i, a in enumerate(models):
        for b in models[i + 1 :]:
            cost = (f"it uses {b['sampling_flops']['per_image'] / a['sampling_flops']['per_image']:.2f}x the "
                    f"sampling FLOPs, "
                    + ", ".join(f"{b['time'][k]['ratio'] / a['time'][k]['ratio']:.2f}x the time at "
                                f"{k.replace('_', ' ')}" for k in b["time"])
                    + (f" and {b['train_flops'] / a['train_flops']:.2f}x the training compute"
                       if a["train_flops"] else ""))
            sentences.append(f"{b['name']} vs {a['name']}: {_quality(a, b, margin)}; {cost}.")
    return sentences


def judge_note(results: dict) -> str:
    """The paragraph under the verdicts: the rule, the margin and where it came from, and what a verdict means."""
    margin, source = _margin(results)
    judge_ = results["protocol"].get("judge", {})
    real = judge_.get("real_vs_real")
    floor = (f" Real images alone score FID {real['fid_mean']:.3f} ± {real['fid_sd']:.3f} against other real images "
             f"at {real['n']} per set (the floor a perfect model reaches, and its spread)." if real else "")
    return (f"Two models are compared seed by seed (the i-th FID of each shares its training run and sampling "
            f"seed): the later is judged against the earlier by a non-inferiority test with margin {margin:.3f} FID "
            f"({source}).{floor} Better: the 95% interval of the mean per-seed gap lies below 0; non-inferior: its "
            "upper bound is below the margin (worse by less than the margin, if at all); inferior: its lower bound is "
            "above the margin; undecided: neither, and only more seeds can decide it. Each verdict states the gap "
            "its seeds resolve, the interval's half-width (9.0 x the sd of the per-seed gaps with 2 seeds, 2.5 x "
            "with 3): at or above the margin, not even an exact tie can come out non-inferior. Where the seeds are "
            "sampling seeds of one training run, a verdict says nothing about run-to-run variation. Times are "
            "measured, not derived from FLOPs: small networks on CPUs speed up much less than their FLOPs fall.")


def expert_rows(run_dir: str | Path) -> list[dict[str, str]]:
    """One row per pruned expert of a run (from prune/summary_<i>.json): its budget, its FLOPs and its forward
    time measured side by side with the base, as fractions of the base's, and the layers it removed."""
    rows = []
    for path in sorted(Path(run_dir, "prune").glob("summary_*.json"), key=lambda p: int(p.stem.split("_")[1])):
        s = read_json_file(path, f"delete {path.parent} (and the stages after it) to prune again")
        if "time_ratio" not in s:  # pruned before times were recorded
            continue
        rows.append({
            "group": str(s["group"]),
            "budget": f"{s['fraction']:.1%} of {'time' if s['budget_unit'] == 'time' else 'FLOPs'}",
            "FLOPs": f"{s['flops_ratio']:.1%}",
            f"time (batch {s['latency_batch']})": f"{s['time_ratio']:.1%}"
                                                  + (" (counted from FLOPs)" if s.get("clock") == "flops" else ""),
            "layers removed": str(sum(1 for k, v in s["decision"].items()
                                      if (".resnets." in k or ".attentions." in k) and v)),
        })
    return rows


# -- the page ----------------------------------------------------------------------------------------
def _html_table(rows: list[dict[str, str]]) -> str:
    header = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in r.values()) + "</tr>" for r in rows)
    return f"<table><tr>{header}</tr>{body}</table>"


def _figures(results: dict, out_dir: Path, figures) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Draw the FID plot and copy each model's sample grid into out_dir: the (file, caption) pairs to show, the
    given figures among them, and model name -> its grid's file."""
    shown = [("fid_vs_flops.png", "FID (dot: mean, bar: sd over seeds) against the mean sampling FLOPs per "
                                  "image along the trajectory. Lower-left is better."), *figures]
    plot_fid_vs_flops(results, out_dir / shown[0][0])
    grids = {}
    for m in results["models"]:
        if m.get("sample_grid"):
            grids[m["name"]] = name = f"samples_{slug(m['name'])}.png"
            if Path(m["sample_grid"]).resolve() != (out_dir / name).resolve():
                shutil.copyfile(m["sample_grid"], out_dir / name)
            shown.append((name, f"Samples of {m['name']} (first sampling seed)."))
    return shown, grids


def _detail_sections(results: dict, experts: list[dict[str, str]]) -> str:
    """The pruned-experts, held-out bits/dim and held-out loss sections (each only when there is something)."""
    p = results["protocol"]
    expert_section = ("<h2>Pruned experts</h2><p>Each group's expert before fine-tuning: its budget, FLOPs and "
                      "forward time measured directly (thread CPU time or CUDA events, interleaved with the base, "
                      f"median ratio) as fractions of the base's.</p>{_html_table(experts)}") if experts else ""
    losses = loss_rows(results)
    bpds = bpd_rows(results)
    bpd_section = (f"<h2>Held-out bits/dim</h2><p>{html.escape(p['held_out_bpd'])}. Lower is better; the groups' "
                   "shares and the prior add up to the total. ± is the standard error over images"
                   + ("; (sd ...) is the spread of the mean over the independent runs" if "runs" in p else "")
                   + f".</p>{_html_table(bpds)}") if bpds else ""
    loss_se = (". ± is the standard error over images" + ("; pooled, the mean of the runs' standard errors"
                                                          if "runs" in p else "")
               if "held_out_loss_se" in results["models"][0] else "")
    loss_section = (f"<h2>Held-out denoising loss</h2><p>{html.escape(p['held_out_loss'])}{loss_se}. In brackets: "
                    f"the ratio to {html.escape(results['models'][0]['name'])}; below 1 is better. Unlike FID this "
                    f"shows where along t a model gains or loses.</p>{_html_table(losses)}") if losses else ""
    return "\n".join((expert_section, bpd_section, loss_section))


def write_report(out_dir: str | Path, results: dict, *, figures: list[tuple[str, str]] = (),
                 experts: list[dict[str, str]] = ()) -> Path:
    """Write report.html, results.json and the PNG plots into out_dir; returns the path of report.html.

    out_dir: the report folder (created). results: an `evaluate` (or `evaluate.pool`) dict; each model's
    `sample_grid`, if any, is copied in; an optional "context" list of sentences is shown under the protocol
    (what the comparison can and cannot show). figures: more (file, caption) pairs already drawn into out_dir,
    shown after the FID plot (a run's: run.run_figures). experts: rows of the pruned-experts table
    (expert_rows). run.write_run_report gives both for a finished TDC run directory.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shown, grids = _figures(results, out_dir, figures)
    p = results["protocol"]
    table = _html_table(table_rows(results))
    notes = "".join(f"<li><b>{html.escape(m['name'])}</b>: {html.escape(m['notes'] or '')}</li>"
                    for m in results["models"])
    method = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(json.dumps(v) if not isinstance(v, str) else v)}</dd>"
                     for k, v in p.items())
    plots = "".join(f'<figure><img src="{html.escape(f)}" alt="{html.escape(f)}"><figcaption>{html.escape(c)}'
                    "</figcaption></figure>" for f, c in shown)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>tdcdiff report: {html.escape(p['reference']['name'])}</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; line-height: 1.4; }}
table {{ border-collapse: collapse; }} th, td {{ border: 1px solid #bbb; padding: 4px 8px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }} figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }}
figcaption {{ font-size: 0.9em; color: #333; }} dt {{ font-weight: bold; }} dd {{ margin: 0 0 0.5em 1em; }}
</style></head><body>
<h1>tdcdiff: {html.escape(" vs ".join(m["name"] for m in results["models"]))} on \
{html.escape(p['reference']['name'])}</h1>
<p><b>Protocol.</b> {html.escape(protocol_line(results))}</p>
{"".join(f"<p>{html.escape(line)}</p>" for line in results.get("context", []))}
<h2>Side by side</h2>
{table}
<p>{html.escape(timing_note(results))}</p>
<p>{html.escape(KID_NOTE)}</p>
{f"<p>{html.escape(PR_NOTE)}</p>" if "precision" in results["models"][0] else ""}
<ul>{notes}</ul>
<h2>Verdicts</h2>
<ul>{"".join(f"<li>{html.escape(v)}</li>" for v in verdicts(results))}</ul>
<p>{html.escape(judge_note(results))}</p>
{_detail_sections(results, experts)}
<h2>Plots</h2>
{plots}
<h2>How each number was measured</h2>
<dl>{method}</dl>
</body></html>
"""
    written = {**results, "models": [{**m, "sample_grid": grids.get(m["name"])} for m in results["models"]],
               "figures": dict(shown)}
    atomic_write_text(out_dir / "results.json", json.dumps(written, indent=2, default=str))
    atomic_write_text(out_dir / "report.html", page)
    return out_dir / "report.html"
