"""The benchmark's arms (bench/benchmark.py): TDC, TDC with stage-2 options, and a model trained further for
the same FLOPs (the single model and the uniform-pruned one); a base reused from an earlier benchmark; and the
diagnostic that swaps one TDC expert for the single model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from tdcdiff.evaluate import ModelEntry
from tdcdiff.files import atomic_write_text
from tdcdiff.flops import count_flops
from tdcdiff.router import Router
from tdcdiff.run import Run, RunConfig, copy_stages, stage_settings
from tdcdiff.schedule import SCHEDULE_VERSION
from tdcdiff.serialization import load_model, save_model
from tdcdiff.train import FINAL_DIR, train


def say(message: str) -> None:
    print(message, flush=True)


def tdc_arm(run_dir: Path, config, one_stage: bool, progress: bool):
    """Run TDC; with one_stage, re-initialise the pruned group models and give stage 2 stage 1's compute too."""
    paper_steps = config.finetune.steps
    saved = run_dir / "config.json"
    if one_stage and saved.exists():  # resuming: the raised stage-2 step count is part of the saved settings
        steps = json.loads(saved.read_text())["finetune"]["steps"]
        config = replace(config, finetune=replace(config.finetune, steps=steps))
    run = Run(run_dir, config, progress=progress)
    say(f"  TDC: stage 1, plan, pruning search -> {run_dir}")
    run.train_base()
    run.plan()
    summaries = run.prune()
    if one_stage:
        reinitialise_pruned(run_dir, len(summaries), run.config.seed)
        per_step = run.config.finetune.batch_size * 3 * sum(s["flops"] for s in summaries)
        steps = paper_steps + round(run.training_flops()["stage1"] / per_step)
        if steps != run.config.finetune.steps:
            say(f"  one-stage: group models re-initialised; stage 2 raised to {steps} steps per group")
            run = Run(run_dir, overrides={"finetune.steps": steps}, progress=progress)
    say("  TDC: stage 2 (fine-tune each group), bundle")
    run.finetune()
    run.export_bundle()
    return run


def reinitialise_pruned(run_dir: Path, groups: int, seed: int) -> None:
    """Give each pruned group model fresh random weights at its pruned shape (the one-stage ablation)."""
    marker = run_dir / "prune" / "reinitialised.json"
    if marker.exists():
        return
    for i in range(groups):
        model = load_model(run_dir / "prune" / f"group_{i}")
        torch.manual_seed(seed * 100 + i)
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        save_model(model, run_dir / "prune" / f"group_{i}")
    atomic_write_text(marker, json.dumps({"reason": "--one-stage: weights re-initialised before stage 2"}))


def base_source_problem(source_run: Path, config) -> str | None:
    """Why source_run's stage-1 base cannot stand in for one trained with `config` (None when it can)."""
    if not (source_run / "base" / FINAL_DIR).exists():
        return f"no finished stage-1 base at {source_run / 'base'}"
    try:
        saved = RunConfig.from_dict(json.loads((source_run / "config.json").read_text()))
    except (OSError, ValueError, TypeError, KeyError) as err:
        return f"{source_run / 'config.json'} is unreadable ({type(err).__name__}: {err})"
    if config.schedule_version is None:  # a new run takes the current schedule version when it opens
        config = replace(config, schedule_version=SCHEDULE_VERSION)
    theirs, ours = stage_settings(saved, "base"), stage_settings(config, "base")
    differ = [f"{key}: {theirs[key]!r} there, {ours[key]!r} here" for key in ours if ours[key] != theirs[key]]
    return f"{source_run} trained its base with other stage-1 settings ({'; '.join(differ)})" if differ else None


def reuse_base(source_run: Path, target_run: Path) -> None:
    """Start target_run from source_run's trained stage-1 base (checked by base_source_problem)."""
    if not (target_run / "base").exists():
        copy_stages(source_run, target_run, ("config.json", "base"))


def options_arm(tdc_run, run_dir: Path, mix: float, distill: float, progress: bool):
    """TDC with stage-2 options, sharing the paper-form run's base, plan and pruned models; same compute."""
    copy_stages(tdc_run.dir, run_dir, ("config.json", "base", "plan", "prune"))
    c = tdc_run.config
    pruned = sum(json.loads(p.read_text())["flops"] for p in sorted((tdc_run.dir / "prune").glob("summary_*.json")))
    base_flops = json.loads((tdc_run.dir / "plan" / "plan.json").read_text())["base_flops"]
    # Distillation adds one teacher forward per step: fewer steps keep stage 2's FLOPs equal.
    teacher = c.groups * base_flops if distill > 0 else 0
    steps = max(1, round(c.finetune.steps * 3 * pruned / (3 * pruned + teacher)))
    run = Run(run_dir, overrides={"finetune.mix_fraction": mix, "finetune.distill_weight": distill,
                                  "finetune.steps": steps}, progress=progress)
    say(f"  TDC + options (mix {mix}, distill {distill}): stage 2, {steps} steps per group -> {run_dir}")
    run.finetune()
    run.export_bundle()
    return run


def train_further(model, run, extra_flops: int, out_dir: Path, description: str, progress: bool):
    """Train `model` on all timesteps for `extra_flops` (stage-2 settings); returns (TrainResult, model)."""
    c = run.config
    per_step = c.finetune.batch_size * 3 * count_flops(model, run.sample_shape)
    config = c.finetune.plain(steps=max(1, round(extra_flops / per_step)), seed=c.seed * 100)
    say(f"  {description}: {config.steps} steps on all timesteps -> {out_dir}")
    train_images, _ = run.split()
    result = train(model, train_images, run.scheduler, config, out_dir, progress=progress, description=description,
                   data_range=run.data_range)
    return result, load_model(out_dir / FINAL_DIR)


def swapped_expert_entries(router, single_model, sample_shape, train_flops: int) -> list:
    """TDC with one group's expert replaced by the single model, for each group: which expert costs FID?"""
    single_flops = count_flops(single_model, sample_shape)
    entries = []
    for g, group in enumerate(router.grouping.groups):
        experts = [single_model if i == g else expert for i, expert in enumerate(router.experts)]
        flops = [single_flops if i == g else f for i, f in enumerate(router.expert_flops)]
        entries.append(ModelEntry(
            f"TDC, single model at group {g}", Router(experts, router.grouping, flops), train_flops,
            notes=f"diagnostic: TDC's experts, but t {group.start}-{group.end - 1} sampled by the single model "
                  "(its training compute is not a method's: shown as TDC's)"))
    return entries
