"""`tdcdiff tune`: the quality-speed frontier of one base, the fastest candidate as good as it, its cost."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..settings import parse_settings
from .options import (
    USER_ERRORS,
    BaseSteps,
    BatchSize,
    Candidates,
    ConfigFile,
    Data,
    DryRun,
    FtLr,
    ImageSize,
    Quiet,
    Rounds,
    Sampler,
    SampleSteps,
    Seed,
    TrustBase,
    as_flag,
    fail,
    overrides,
    path_parser,
    settings_flags,
)

Out = Annotated[Path, typer.Option(
    "--out", "-o", parser=path_parser("--out", "the tune directory, e.g. --out runs/tune"), metavar="DIR",
    help="Tune directory: the plan, candidates, tables, plot and chosen bundle.")]
BaseFrom = Annotated[Optional[Path], typer.Option(
    "--base-from", help="Start from this run directory's trained stage-1 base instead of training one.")]
TuneSteps = Annotated[int, typer.Option(
    "--tune-steps", help="Each candidate's training compute: this many stage-2 steps of the base model (FLOPs).")]
Width = Annotated[Optional[list[float]], typer.Option(
    "--width", help="Uniform-pruning level, fraction of the base's FLOPs (repeat; default 0.8 0.6 0.4).")]
K = Annotated[Optional[list[float]], typer.Option(
    "-k", "--k", help="TDC budget slope k (repeat; default 0.1 0.3 0.5).")]
Groups = Annotated[Optional[list[int]], typer.Option(
    "--groups", "-n", help="TDC number of groups N (repeat; default 2 4).")]
Grouping = Annotated[Optional[list[str]], typer.Option(
    "--grouping", help="TDC grouping: snr, uniform, loss (repeat; default snr).")]
Variant = Annotated[Optional[list[str]], typer.Option(
    "--variant", help="Also try every TDC grid point with these settings, KEY=VALUE[,KEY=VALUE] (repeat), e.g. "
    "finetune.mix_fraction=0.2.")]
TimeBudget = Annotated[Optional[list[float]], typer.Option(
    "--time-budget", help="Also TDC candidates whose mean sampling time is this fraction of the base's, measured "
    "(repeat, e.g. --time-budget 0.8 --time-budget 0.6).")]
UniformTimeBudget = Annotated[Optional[list[float]], typer.Option(
    "--uniform-time-budget", help="Also uniform pruning fitted to this fraction of the base's measured forward time "
    "(repeat).")]
Depth = Annotated[bool, typer.Option(
    "--depth", help="Also try every TDC candidate with depth pruning (whole layers kept or removed).")]
Curves = Annotated[bool, typer.Option(
    "--curves", help="Also, per TDC grid point, the same mean budget split across groups by measured quality curves "
    "(budget.allocate_from_curves).")]
CurveObjective = Annotated[Optional[list[str]], typer.Option(
    "--curve-objective", help="With --curves: what the allocation minimises, one candidate each (repeat): share (the "
    "measure's total change) or relative (each group's measure relative to the base's, weighted by its timesteps); "
    "default share.")]
CurveSteps = Annotated[int, typer.Option(
    "--curve-steps", help="With --curves: stage-2 steps behind each point of a group's curve (counted in the "
    "candidate's compute).")]
Candidate = Annotated[Optional[int], typer.Option(
    "--candidate", help="Train only this candidate (0-based, see candidates.json), e.g. one job each.")]
Screening = Annotated[str, typer.Option(
    "--screening", help="What ranks candidates before FID (finalists, --max-quality-loss): loss (held-out denoising "
    "loss) or bpd (held-out bits/dim bound); the other is shown beside it.")]
Finalists = Annotated[int, typer.Option(
    help="Candidates (best by the screening measure) that get paired-seed FID/KID.")]
FidSeeds = Annotated[int, typer.Option(
    "--fid-seeds", help="Sampling seeds every finalist starts with for FID/KID (>= 2: the paired rule).")]
MaxFidSeeds = Annotated[int, typer.Option(
    "--max-fid-seeds", help="Add seeds one at a time, up to this many, until each finalist's FID verdict is decided.")]
Margin = Annotated[Optional[float], typer.Option(
    "--margin", help="Non-inferiority margin in FID units: the largest FID loss that counts as none. [default: the "
    "real-vs-real spread of FID at --fid-samples images]")]
SamplingSettings = Annotated[Optional[list[str]], typer.Option(
    "--settings", help="The ladder of sampling settings sampler:steps[:cN[:dD]] the base and the best candidates are "
    "also sampled with, space- or comma-separated (repeat too), e.g. 'dpm-solver++:20 dpm-solver++:10 unipc:10 "
    "ddim:50:c3'; none: only the reference; an empty value is refused. [default: dpm-solver++:20 "
    "dpm-solver++:10 unipc:10 dpm-solver++:6 ddim:50:c3]")]
Reference = Annotated[Optional[str], typer.Option(
    "--reference", help="Your current sampling setting, sampler:steps[:cN]: every point is judged against the base "
    "sampled with it. [default: the run's --sampler:--sample-steps, ddim:50]")]
ScreenSamples = Annotated[int, typer.Option(
    "--screen-samples", help="Images per (model, setting) in the sample screen that picks the settings going to FID.")]
MaxQualityLoss = Annotated[Optional[float], typer.Option(
    "--max-quality-loss", help="Also accept a candidate at most this much worse than the base on the screening measure "
    "(--screening; relative, 0.02 = 2%).")]
MinModelSpeedup = Annotated[float, typer.Option(
    "--min-model-speedup", help="Ship another model than yours only when measured this much faster than your model's "
    "best free setting (its fastest sampler/steps as good as --reference) at --batch: the lower 95% bound of the "
    "speedup paired over timing rounds; 0: no bar, even a slower model.")]
PricePerHour = Annotated[Optional[float], typer.Option(
    "--price-per-hour", help="Machine price per hour: adds the cost per 1,000 images before and after.")]


def tune_command(
    out: Out = Path("runs/tune"), base_from: BaseFrom = None,
    config: ConfigFile = None, data: Data = None, image_size: ImageSize = None, base_steps: BaseSteps = None,
    batch_size: BatchSize = None, finetune_lr: FtLr = None, rounds: Rounds = None, candidates: Candidates = None,
    sampler: Sampler = None, sample_steps: SampleSteps = None, seed: Seed = None, base: TrustBase = None,
    tune_steps: TuneSteps = 1000, width: Width = None, k: K = None, groups: Groups = None, grouping: Grouping = None,
    variant: Variant = None, time_budget: TimeBudget = None, uniform_time_budget: UniformTimeBudget = None,
    depth: Depth = False, curves: Curves = False, curve_objective: CurveObjective = None, curve_steps: CurveSteps = 50,
    candidate: Candidate = None, screening: Screening = "loss", finalists: Finalists = 3, fid_seeds: FidSeeds = 3,
    max_fid_seeds: MaxFidSeeds = 8, margin: Margin = None,
    fid_samples: Annotated[int, typer.Option("--fid-samples", help="Images per model and seed for FID/KID.")] = 512,
    sampling_settings: SamplingSettings = None, reference: Reference = None, screen_samples: ScreenSamples = 64,
    batch: Annotated[int, typer.Option("--batch", help="Your sampling batch size: the frontier's time axis.")] = 64,
    max_quality_loss: MaxQualityLoss = None, min_model_speedup: MinModelSpeedup = 1.1,
    price_per_hour: PricePerHour = None,
    dry_run: DryRun = False, quiet: Quiet = False,
):
    """The quality-speed frontier of one base and the fastest candidate as good as it, with its cost and return.

    Every candidate (the base fine-tuned, uniform widths by FLOPs or measured time, TDC over k, N and grouping,
    by time budget, with depth pruning, or with budgets from measured curves) gets the same training compute; all
    are screened on held-out images (denoising loss or bits/dim, paired), the best few get paired-seed FID/KID.
    Writes frontier.png, table.csv, results.json, cost.csv, return.csv and chosen/ into the tune directory.
    Rerunning skips finished candidates.
    """
    from ..run import lock_run_dir
    from ..run.rundir import check_out_dir
    from ..tune import Tune, TuneConfig, candidate_list, check_candidate, check_tune

    flags = {k_: v for k_, v in settings_flags(locals()).items() if k_ not in ("k", "groups", "grouping", "depth")}
    settings = TuneConfig(tune_steps=tune_steps, screening=screening, finalists=finalists, fid_seeds=fid_seeds,
                          max_fid_seeds=max_fid_seeds, margin=margin, fid_samples=fid_samples, batch=batch,
                          max_quality_loss=max_quality_loss, min_model_speedup=min_model_speedup,
                          price_per_hour=price_per_hour, depth=depth,
                          curves=curves, curve_steps=curve_steps, reference=reference, screen_samples=screen_samples)
    for name, value in (("widths", width), ("ks", k), ("groups", groups), ("groupings", grouping),
                        ("time_budgets", time_budget), ("uniform_time_budgets", uniform_time_budget),
                        ("curve_objectives", curve_objective), ("settings", _ladder(sampling_settings))):
        if value:
            settings = replace(settings, **{name: () if value == ["none"] else tuple(value)})
    if curve_objective and not curves:  # even the default "share": what was asked for would not happen
        fail("--curve-objective chooses how --curves candidates allocate: add --curves")
    try:
        # before any write, --dry-run and --candidate included (attack 2026-12-07d row 290, -f rows 541, 621-623)
        check_out_dir(out, "tune directory", "--out")
        if variant:
            settings = replace(settings, tdc_variants=({}, *(
                parse_settings(v.split(","), "--variant", form="KEY=VALUE[,KEY=VALUE...]",
                               example="finetune.mix_fraction=0.2") for v in variant)))
        if candidate is not None:  # before Tune, which copies --base-from into the tune directory
            settings.validate()
            check_candidate(candidate, candidate_list(settings), out / "candidates.json")
        if dry_run:  # nothing written: the base run is only opened
            from ..run.estimate import estimate_tune
            check_tune(out, settings, overrides=overrides(config, **flags), base_from=base_from)
            return typer.echo(estimate_tune(out, settings, candidate_list(settings), base_from=base_from,
                                            overrides=overrides(config, **flags)))
        with lock_run_dir(out, what="tune directory"):  # the whole tune: a second one on --out is refused at once
            try:
                tune = Tune(out, settings, overrides=overrides(config, **flags), base_from=base_from,
                            progress=not quiet)
            except ValueError as err:  # the base run's settings: name the flag given, as _open_run does
                err.args = (as_flag(str(err), flags),)
                raise
            if candidate is not None:
                record = tune.run_candidate(candidate)
                typer.echo(f"candidate {candidate} ({record['name']}): "
                           + (f"failed: {record['failed']}" if "failed" in record else f"{out / record['dir']}"))
                return
            results = tune.run_all()
    except USER_ERRORS as err:
        fail(err)
    _print_results(results, out, price_per_hour)


def _ladder(values: list[str] | None) -> list[str] | None:
    """--settings as given (repeated, each space- or comma-separated) -> one setting per item; ["none"]: no ladder.
    None when not given. An empty value (an unset shell variable) is refused, not read as "not given"."""
    if values is None:
        return None
    items = [t for v in values for t in v.replace(",", " ").split()]
    if not items:
        fail("--settings is empty; give sampling settings, e.g. --settings 'dpm-solver++:20 unipc:10', or "
             "--settings none for only the reference (leave the flag out for the default ladder)")
    return items


def _print_results(results: dict, out: Path, price_per_hour: float | None) -> None:
    """The frontier table, the judge, the choice and its cost, as `tdcdiff tune` prints them."""
    from ..tune import cost_rows, format_rows, judge_line, table_rows

    typer.echo("\n" + format_rows(table_rows(results["rows"], results["choice"]["name"],
                                             results["screening_measure"]["key"])))
    for item in results["failed"]:
        typer.echo(f"failed: {item['name']}: {item['failed']}")
    typer.echo(f"screening: {results['screening_measure']['name']}; time: {results['time']}")
    typer.echo(judge_line(results["fid_protocol"]))
    typer.echo(f"chosen: {results['choice']['name'] or 'none'}: {results['choice']['reason']}")
    for note in results["ladder_notes"]:
        typer.echo(note)
    screen = results["sample_screen"]
    if screen is not None:
        rho = screen["spearman_vs_fid"]
        typer.echo(f"sample screen ({screen['images']} images per point, target {screen['target']}): rank agreement "
                   f"with FID over {screen['pairs']} points: Spearman "
                   + ("- (too few points)" if rho is None else f"{rho:+.2f}")
                   + (f"; settings of the same model ordered as by FID in {pairs['agree']} of {pairs['pairs']} pairs"
                      if (pairs := screen.get("within_model")) else ""))
    typer.echo(f"reference {results['reference']}: {results['headline']['text']}")
    if "cost" in results:
        phases, returns = cost_rows(results["cost"], price_per_hour is not None)
        typer.echo("\n" + format_rows(phases) + "\n\n" + format_rows(returns))
        if results["cost"]["tuning_cost"] is not None:
            typer.echo(f"tuning cost at {price_per_hour:g} per hour: {results['cost']['tuning_cost']:.4f}")
    typer.echo(f"\nfrontier: {out / 'frontier.png'}  table: {out / 'table.csv'}  cost: {out / 'cost.csv'}, "
               f"{out / 'return.csv'}"
               + (f"  chosen bundle: {out / 'chosen'}" if results["choice"]["name"] else ""))
