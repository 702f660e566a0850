"""The stage commands: run, train-base, plan, prune, finetune, bundle (each a thin layer over tdcdiff.run.Run)."""

from __future__ import annotations

from pathlib import Path

import typer

from .options import (
    RUN_DEFAULT,
    USER_ERRORS,
    Attention,
    BaseLr,
    BaseModelSpec,
    BaseSteps,
    BatchSize,
    BudgetUnit,
    Candidates,
    Channels,
    ConfigFile,
    Data,
    Depth,
    Device,
    Distill,
    DryRun,
    FeatureDistill,
    FtLr,
    FtSteps,
    Group,
    Grouping,
    Groups,
    ImageSize,
    Importance,
    K,
    LatencyBatch,
    Limit,
    MeanBudget,
    Memory,
    Mix,
    Model,
    NumSamples,
    Ordering,
    Prediction,
    Proposer,
    Quiet,
    Rounds,
    RunDir,
    Sampler,
    SampleSteps,
    Schedule,
    Seed,
    Timesteps,
    TrustBase,
    fail,
    open_run,
    settings_flags,
)


def run_command(
    out: RunDir = Path(RUN_DEFAULT), config: ConfigFile = None, data: Data = None, image_size: ImageSize = None,
    channels: Channels = None, limit: Limit = None, model: Model = None, attention: Attention = None,
    timesteps: Timesteps = None, schedule: Schedule = None, prediction: Prediction = None,
    base_steps: BaseSteps = None, base_lr: BaseLr = None, batch_size: BatchSize = None, groups: Groups = None,
    grouping: Grouping = None, k: K = None, mean_budget: MeanBudget = None, ordering: Ordering = None,
    proposer: Proposer = None,
    rounds: Rounds = None, candidates: Candidates = None, memory: Memory = None, importance: Importance = None,
    budget_unit: BudgetUnit = None, latency_batch: LatencyBatch = None, depth: Depth = None,
    finetune_steps: FtSteps = None, finetune_lr: FtLr = None, mix: Mix = None, distill: Distill = None,
    feature_distill: FeatureDistill = None,
    sampler: Sampler = None, sample_steps: SampleSteps = None, num_samples: NumSamples = None, seed: Seed = None,
    base: BaseModelSpec = None, device: Device = None, dry_run: DryRun = False, quiet: Quiet = False,
):
    """The whole method: train base -> plan -> prune -> fine-tune -> bundle -> samples -> report.

    With no arguments it runs on scikit-learn's digits into runs/digits. Stages that already finished are
    skipped, so rerunning the same command after a crash continues where it stopped. --base starts from a
    trained model instead of training one. --dry-run prints what each phase would cost here and writes nothing.
    """
    flags = settings_flags(locals())
    try:
        run = open_run(out, config, not quiet, **flags)  # --dry-run refuses the --out the run would
        if dry_run:
            from ..run.estimate import estimate_run

            typer.echo(estimate_run(run))
            return
        result = run.run_all()
    except USER_ERRORS as err:
        fail(err)
    typer.echo(f"bundle:  {result['bundle']}")
    for grid in result["samples"]:
        typer.echo(f"samples: {grid}")
    typer.echo(f"report:  {result['report']}")


def train_base_command(
    out: RunDir = Path(RUN_DEFAULT), config: ConfigFile = None, data: Data = None, image_size: ImageSize = None,
    channels: Channels = None, limit: Limit = None, model: Model = None, attention: Attention = None,
    timesteps: Timesteps = None, schedule: Schedule = None, prediction: Prediction = None,
    base_steps: BaseSteps = None, base_lr: BaseLr = None, batch_size: BatchSize = None, seed: Seed = None,
    base: BaseModelSpec = None, device: Device = None, quiet: Quiet = False,
):
    """Stage 1: train one denoiser on all timesteps (resumes from the run's last checkpoint), or take --base."""
    flags = settings_flags(locals())
    try:
        result = open_run(out, config, not quiet, **flags).train_base()
    except USER_ERRORS as err:
        fail(err)
    typer.echo(f"base model: {result.out_dir / 'final'} ({result.steps} steps, final loss {result.final_loss:.4f})")


def plan_command(
    out: RunDir = Path(RUN_DEFAULT), groups: Groups = None, grouping: Grouping = None, k: K = None,
    mean_budget: MeanBudget = None, ordering: Ordering = None, budget_unit: BudgetUnit = None,
    latency_batch: LatencyBatch = None,
    depth: Depth = None, base: TrustBase = None, device: Device = None, quiet: Quiet = False,
):
    """Group the timesteps and assign budgets (needs a trained base in the run directory)."""
    try:
        run = open_run(out, None, not quiet, groups=groups, grouping=grouping, k=k, mean_budget=mean_budget,
                       ordering=ordering,
                       budget_unit=budget_unit, latency_batch=latency_batch, depth=depth, base=base, device=device)
        plan = run.plan()
        timed = plan.budget_unit == "time"
        base_ms = run.latency_table(run.base_model()).base_seconds * 1000 if timed else None
    except USER_ERRORS as err:
        fail(err)
    batch = run.config.latency_batch
    # A time plan's fractions are of the base's forward time: its experts' FLOPs are known only once pruned.
    typer.echo(f"{'group':>5} {'timesteps':>11} {'SNR dB':>15} {'rank':>4} "
               + (f"{'time':>7} {'ms @b' + str(batch):>9}" if timed else f"{'FLOPs':>7} {'MFLOPs':>8}"))
    for g, rank, fraction in zip(plan.grouping.groups, plan.ranks, plan.fractions):
        typer.echo(f"{g.index:>5} {g.start:>5}-{g.end - 1:<5} {g.snr_db_start:>7.1f}..{g.snr_db_end:<6.1f} {rank:>4} "
                   + (f"{fraction:>7.1%} {fraction * base_ms:>9.2f}" if timed
                      else f"{fraction:>7.1%} {fraction * plan.base_flops / 1e6:>8.2f}"))
    unit = (f"forward time ({base_ms:.2f} ms at batch {batch} on this device)" if timed
            else f"{plan.base_flops / 1e6:.1f} MFLOPs")
    typer.echo(f"mean sampling cost (timestep-weighted): {plan.mean_fraction:.1%} of the base's {unit}")
    typer.echo(f"plan: {out / 'plan' / 'plan.json'}  plot: {out / 'plan' / 'grouping.png'}")


def prune_command(
    out: RunDir = Path(RUN_DEFAULT), group: Group = None, proposer: Proposer = None, rounds: Rounds = None,
    candidates: Candidates = None, memory: Memory = None, importance: Importance = None,
    budget_unit: BudgetUnit = None, latency_batch: LatencyBatch = None, depth: Depth = None, base: TrustBase = None,
    device: Device = None, quiet: Quiet = False,
):
    """Proxy-based pruning: derive each group's model from the base under its budget (FLOPs or time)."""
    try:
        run = open_run(out, None, not quiet, proposer=proposer, rounds=rounds, candidates=candidates,
                        memory=memory, importance=importance, budget_unit=budget_unit, latency_batch=latency_batch,
                        depth=depth, base=base, device=device)
        summaries = run.prune(group)
    except USER_ERRORS as err:
        fail(err)
    typer.echo(f"{'group':>5} {'unit':>5} {'budget':>7} {'FLOPs':>7} {'time':>7} {'@batch':>6} {'error':>7} "
               f"{'proxy':>7}")
    for s in summaries:
        unit = s.get("budget_unit", "flops")
        got = s["time_ratio"] if unit == "time" else s["flops_ratio"]
        time_ratio = f"{s['time_ratio']:>7.1%}" if s.get("time_ratio") is not None else f"{'-':>7}"
        typer.echo(f"{s['group']:>5} {unit:>5} {s['fraction']:>7.1%} {s['flops_ratio']:>7.1%} {time_ratio} "
                   f"{s.get('latency_batch', '-'):>6} {got / s['fraction'] - 1:>+7.1%} {s['proxy_score']:>7.3f}")
    typer.echo("budget, FLOPs and time (measured directly: each distinct expert once, against one timing of the base) "
               "are fractions of the base's")
    typer.echo(f"pruned models, search logs and memory banks: {out / 'prune'}")


def finetune_command(
    out: RunDir = Path(RUN_DEFAULT), group: Group = None, finetune_steps: FtSteps = None,
    finetune_lr: FtLr = None, mix: Mix = None, distill: Distill = None, feature_distill: FeatureDistill = None,
    base: TrustBase = None, device: Device = None, quiet: Quiet = False,
):
    """Stage 2: fine-tune each group's pruned model on its timesteps (--group i runs one group alone)."""
    try:
        run = open_run(out, None, not quiet, finetune_steps=finetune_steps, finetune_lr=finetune_lr, mix=mix,
                       distill=distill, feature_distill=feature_distill, base=base, device=device)
        results = run.finetune(group)
    except USER_ERRORS as err:
        fail(err)
    for r in results:
        typer.echo(f"{r.out_dir}: {r.steps} steps, final loss {r.final_loss:.4f}, {r.train_flops / 1e12:.2f} TFLOPs")


def bundle_command(out: RunDir = Path(RUN_DEFAULT), base: TrustBase = None, quiet: Quiet = False):
    """Write the deployable bundle (router + experts + schedule) of a fine-tuned run."""
    try:
        path = open_run(out, None, False, base=base).export_bundle()
    except USER_ERRORS as err:
        fail(err)
    typer.echo(f"bundle: {path}  (load with tdcdiff.load_bundle)")
