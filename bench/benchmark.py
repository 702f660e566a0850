"""Benchmark: the single model, uniform pruning and TDC, trained with the same total compute (FLOPs).

    python bench/benchmark.py --data digits --seeds 0 1 2 --out runs/bench-digits
    python bench/benchmark.py --data mnist   --seeds 0 1 2 --out runs/bench-mnist
    python bench/benchmark.py --data cifar10 [--gpu] --seeds 0 1 2 --out runs/bench-cifar10
    python bench/benchmark.py --quick --out /tmp/bench        # seconds; what CI runs
    python bench/benchmark.py --data digits --seeds 0 1 2 --k 1 --base-from runs/bench-digits --out runs/ablate-k1
    python bench/benchmark.py --data digits --seeds 0 1 2 --budget-unit time --mean-budget 0.6 --depth --out runs/speed

Per seed, in out/seed_<s>/:
  tdc/      a full TDC run (tdcdiff.run.Run; paper form: stage 2 on the group's timesteps only, no distillation)
  single/   the stage-1 base trained further by as many FLOPs as TDC's stage 2 costs
  uniform/  the base pruned with one global ratio to TDC's mean sampling FLOPs (with --budget-unit time: to
            TDC's sampling-step-weighted mean of its experts' measured time ratios, checked by timing it),
            fine-tuned on all timesteps for the FLOPs of TDC's stage 2
  tdc-options/  (with --mix/--distill) TDC with those stage-2 options, its step count cut to the same compute
  evaluation.json  the seed's evaluation, with the settings and the weights (sha256 of each arm's files) it
            measured: read back, not measured again, while both are unchanged
So every arm has had stage 1 plus the same extra compute (the arms' training: bench/arms.py). The pooled comparison
goes to out/report.html and out/results.json. Every stage resumes, so rerunning the same command continues an
interrupted benchmark, and adding a seed to --seeds runs only the new seed (seeds run as separate jobs into one --out
pool this way).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from arms import (
    base_source_problem,
    options_arm,
    reuse_base,
    say,
    swapped_expert_entries,
    tdc_arm,
    train_further,
)
from tdcdiff.budget import BudgetPlan
from tdcdiff.bundle import load_bundle
from tdcdiff.content_hash import sha256_tree
from tdcdiff.data import load_dataset
from tdcdiff.evaluate import FORMAT, ModelEntry, evaluate, pool
from tdcdiff.files import atomic_write_text, resolve_inside
from tdcdiff.prune.fit import uniform_fit
from tdcdiff.report import bpd_rows, format_table, loss_rows, verdicts
from tdcdiff.run import RunConfig, apply_overrides, parse_settings, write_run_report
from tdcdiff.samplers import SAMPLERS, visited_timesteps
from tdcdiff.serialization import load_model, save_model

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DEFAULT_DATA = {
    "mnist": SHARED_DATA / "mnist" / "t10k-images-idx3-ubyte.gz",
    "cifar10": SHARED_DATA / "cifar10" / "cifar10-train-jpeg.zip",
    "cifar10-reference": SHARED_DATA / "cifar10" / "cifar10-test-jpeg.zip",
}


@dataclass
class Setting:
    """What one data set's benchmark runs.

    run: RunConfig settings as dotted keys (tdcdiff.run.apply_overrides). reference: load_dataset arguments
    of the FID reference set ("spec" plus size/channels/limit). num_samples: images per model for FID.
    timing_batches, timing_repeats: see tdcdiff.evaluate.evaluate.
    """

    run: dict
    reference: dict
    num_samples: int = 1024
    timing_batches: tuple[int, ...] = (1, 64)
    timing_repeats: int = 3
    notes: list[str] = field(default_factory=list)


def make_setting(data: str, data_path: Path | None, reference_path: Path | None, gpu: bool, quick: bool) -> Setting:
    """The benchmark setting of a data set; `quick` shrinks everything to a seconds-long smoke run."""
    if data == "digits":
        setting = Setting({"data": "digits"}, {"spec": "digits"},
                          notes=["reference = the 1,797 digits the models are trained on (the only set there is)"])
    elif data == "mnist":
        path = str(data_path or DEFAULT_DATA["mnist"])
        # Sized for a CPU: about 27 min per seed on one core. Native 28x28 (--set image_size=28) has 3x the pixels.
        setting = Setting({"data": path, "image_size": 16, "base.steps": 2000, "finetune.steps": 250},
                          {"spec": path, "size": 16}, num_samples=512,
                          notes=["MNIST's 10k test split, resized to 16x16, is both training data and FID reference "
                                 "(the only split here)"])
    elif gpu:
        train, test = (str(data_path or DEFAULT_DATA["cifar10"]),
                       str(reference_path or DEFAULT_DATA["cifar10-reference"]))
        setting = Setting({"data": train, "attention": True, "base.steps": 40000, "base.lr": 2e-4,
                           "base.checkpoint_every": 2000, "finetune.steps": 4000, "finetune.lr": 1e-4},
                          {"spec": test}, num_samples=10000, timing_batches=(1, 64, 256))
    else:
        train, test = (str(data_path or DEFAULT_DATA["cifar10"]),
                       str(reference_path or DEFAULT_DATA["cifar10-reference"]))
        setting = Setting({"data": train, "image_size": 16, "limit": 5000, "base.steps": 3000, "finetune.steps": 300},
                          {"spec": test, "size": 16, "limit": 2000},
                          notes=["reduced CPU setting: 5,000 training images at 16x16, reference 2,000 test images"])
    if quick:
        setting.run.update({"base.steps": 30, "base.batch_size": 32, "base.warmup_steps": 5, "finetune.steps": 10,
                            "finetune.batch_size": 32, "finetune.warmup_steps": 2, "groups": 2,
                            "search.rounds": 1, "search.candidates_per_round": 2, "sample_steps": 5,
                            "num_samples": 16, "latency_batch": 8})
        if data != "digits":
            setting.run.update({"limit": 256, "image_size": 16})
            setting.reference.update({"limit": 256, "size": 16})
        setting = replace(setting, num_samples=32, timing_batches=(1, 8), timing_repeats=1,
                          notes=setting.notes + ["--quick: a smoke test, the numbers mean nothing"])
    return setting


def seed_config(args, setting: Setting, seed: int):
    """The RunConfig of one seed's TDC run: the setting plus the ablation flags."""
    overrides = {**setting.run, "seed": seed, "finetune.mix_fraction": 0.0, "finetune.distill_weight": 0.0}
    for key, value in (("k", args.k), ("groups", args.groups), ("grouping", args.grouping),
                       ("ordering", args.ordering), ("search.proposer", args.proposer), ("search.memory", args.memory),
                       ("sampler", args.sampler), ("sample_steps", args.sample_steps),
                       ("budget_unit", args.budget_unit), ("mean_budget", args.mean_budget),
                       ("search.depth", args.depth), ("latency_batch", args.latency_batch)):
        if value is not None:
            overrides[key] = value
    return apply_overrides(RunConfig(), overrides)


def tdc_time_ratio(run, plan) -> float:
    """TDC's sampling time as a fraction of the base's, from its experts' measured forward-time ratios
    (prune/summary_i.json, at the run's latency batch), each weighted by how many of the sampler's visited
    timesteps fall in its group: what one sampling run costs, per model call, as Router.trajectory_flops counts."""
    visited = visited_timesteps(run.config.sampling_steps, run.scheduler.config.num_train_timesteps)
    groups = plan.grouping.group_of(torch.as_tensor(visited, dtype=torch.long)).tolist()
    ratios = [json.loads((run.dir / "prune" / f"summary_{g}.json").read_text())["time_ratio"]
              for g in range(len(plan.grouping))]
    return sum(ratios[g] for g in groups) / len(groups)


def uniform_arm_model(tdc, plan, out_dir: Path):
    """The base pruned with one global ratio (prune.fit.uniform_fit) to TDC's sampling cost: FLOPs
    (plan.mean_fraction), or with budget_unit time, TDC's measured time (tdc_time_ratio), checked by timing it.
    Saved in out_dir (model/ + fit.json) and reused on a rerun: a time fit is measured, so fitting again could
    give another model than the one its training checkpoint belongs to.
    Returns (pruned model, fit.json's record: decision, flops and what it was matched on, for the notes)."""
    if (out_dir / "fit.json").exists():
        return load_model(out_dir / "model"), json.loads((out_dir / "fit.json").read_text())
    base = tdc.base_model()
    if tdc.config.budget_unit != "time":
        fit = uniform_fit(base, plan.mean_fraction, tdc.sample_shape, **tdc.config.search.space())
        matched = f"matched on FLOPs to TDC's timestep-weighted mean ({plan.mean_fraction:.1%})"
    else:
        target, batch = tdc_time_ratio(tdc, plan), tdc.config.latency_batch
        timed = uniform_fit(base, target, tdc.sample_shape, latency=tdc.latency_table(base), batch=batch,
                            **tdc.config.search.space())
        fit = timed.fit
        matched = (f"matched on measured forward time at batch {batch} to TDC's sampling-step-weighted mean of its "
                   f"experts' measured time ({target:.1%}): measured {timed.time_ratio:.1%} after "
                   f"{len(timed.trail) - 1} budget correction(s)")
    save_model(fit.model, out_dir / "model")
    record = {"decision": fit.decision, "flops": fit.flops, "matched": matched}
    atomic_write_text(out_dir / "fit.json", json.dumps(record, indent=2))  # last: it marks the fit as done
    return fit.model, record


RUN_METRICS = {  # name -> value of one model in one seed's evaluation (a results.json per_run model)
    "FID": lambda m: m["fid"]["per_seed"][0]["fid"],
    "held-out loss": lambda m: m["held_out_loss"]["all"],
    "bits/dim": lambda m: m["held_out_bpd"]["total"]["mean"],
}
EVALUATION = "evaluation.json"
EVALUATION_FORMAT = "tdcdiff-bench-seed/1"
ARM_WEIGHTS = ("tdc/bundle", "single/final", "uniform/final", "tdc-options/bundle")  # under seed_<s>/


def call_settings(argv: list[str], ignore: tuple[str, ...] = ("quiet", "out")) -> dict:
    """What a benchmark call computes: its parsed arguments less `ignore` (by default --quiet and --out: a
    finished folder may have been moved), paths resolved, as JSON values."""
    parsed = vars(parse_args(argv))
    return json.loads(json.dumps({key: value.resolve() if isinstance(value, Path) else value
                                  for key, value in parsed.items() if key not in ignore}, default=str))


def weights_ids(seed_dir: Path) -> dict:
    """ARM_WEIGHTS folder -> files.sha256_tree of its files, for those that exist."""
    return {name: sha256_tree(seed_dir / name) for name in ARM_WEIGHTS if (seed_dir / name).is_dir()}


def earlier_evaluation(seed_dir: Path, settings: dict, weights: dict, entries: list) -> dict | None:
    """The evaluation seed_dir/evaluation.json holds when it was made with these settings and weights, of these
    entries (evaluate.ModelEntry: the same names, notes and training FLOPs) in this evaluate.FORMAT, else None
    (also for a file that is unreadable or of another format: the seed is then evaluated again)."""
    arms = [(e.name, e.notes, int(e.train_flops)) for e in entries]
    try:
        saved = json.loads((seed_dir / EVALUATION).read_text())
        evaluation = saved["evaluation"]
        if (saved["format"] != EVALUATION_FORMAT or saved["settings"] != settings or saved["weights"] != weights
                or evaluation["format"] != FORMAT
                or [(m["name"], m["notes"], m["train_flops"]) for m in evaluation["models"]] != arms):
            return None  # e.g. the code changed the arms' notes
        for model in evaluation["models"]:  # saved relative to the seed folder, which may have moved
            if model.get("sample_grid"):
                model["sample_grid"] = str(resolve_inside(seed_dir, model["sample_grid"], f"{EVALUATION} sample_grid"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # unreadable, cut off or edited
        return None
    return evaluation


def save_evaluation(seed_dir: Path, settings: dict, weights: dict, evaluation: dict) -> None:
    models = [{**m, "sample_grid": Path(m["sample_grid"]).relative_to(seed_dir).as_posix() if m.get("sample_grid")
               else None} for m in evaluation["models"]]
    saved = {"format": EVALUATION_FORMAT, "settings": settings, "weights": weights,
             "evaluation": {**evaluation, "models": models}}
    atomic_write_text(seed_dir / EVALUATION, json.dumps(saved, indent=2, default=str))


def run_seed(args, setting: Setting, seed: int, reference, out: Path, settings: dict) -> dict:
    """All arms for one seed, evaluated side by side; returns the evaluate() dict. settings: call_settings of
    the call less its seeds, saved with the evaluation (see earlier_evaluation)."""
    seed_dir = out / f"seed_{seed}"
    config = seed_config(args, setting, seed)
    progress = not args.quiet

    say(f"[seed {seed}]")
    if args.base_from:
        reuse_base(args.base_from / f"seed_{seed}" / "tdc", seed_dir / "tdc")
    tdc = tdc_arm(seed_dir / "tdc", config, args.one_stage, progress)
    compute = tdc.training_flops()
    stage1 = compute["stage1"]
    # One-stage group models never used the base's weights: their compute is stage 2 alone.
    tdc_flops = compute["total"] - (stage1 if args.one_stage else 0)
    extra = tdc_flops - stage1
    plan = BudgetPlan.load(tdc.dir / "plan" / "plan.json")
    c = tdc.config

    single, single_model = train_further(tdc.base_model(), tdc, extra, seed_dir / "single", "single model", progress)

    pruned, fit = uniform_arm_model(tdc, plan, seed_dir / "uniform-fit")
    uniform, uniform_model = train_further(pruned, tdc, extra, seed_dir / "uniform", "uniform-pruned", progress)
    ratios = sorted({round(r, 3) for r in fit["decision"].values()})
    ratio_note = (f"one global ratio {ratios[0]}" if len(ratios) == 1 else
                  f"ratios {ratios} (GroupNorm steps: the global ratio was repaired per unit to meet the budget)")

    form = "one-stage (group models trained from scratch at their pruned shapes)" if args.one_stage else "paper form"
    tdc_router = load_bundle(tdc.dir / "bundle").router
    entries = [
        ModelEntry("single model", single_model, stage1 + single.train_flops,
                   notes=f"stage-1 base ({c.base.steps} steps) + {single.steps} more steps on all timesteps"),
        ModelEntry("uniform-pruned", uniform_model, stage1 + uniform.train_flops,
                   notes=f"base pruned to {fit['flops'] / plan.base_flops:.1%} of its FLOPs ({ratio_note}, magnitude "
                         f"importance; {fit['matched']}), then {uniform.steps} steps on all timesteps"),
        ModelEntry("TDC (one-stage)" if args.one_stage else "TDC", tdc_router, tdc_flops,
                   notes=f"{form}: {c.groups} groups ('{c.grouping}', k={c.k}, ordering '{c.ordering}', proposer "
                         f"'{c.search.proposer}', memory {'on' if c.search.memory else 'off'}, {c.budget_unit} "
                         f"budgets{'' if c.mean_budget is None else f' scaled to a mean of {c.mean_budget}'}, depth "
                         f"{'on' if c.search.depth else 'off'}), {c.finetune.steps} "
                         "stage-2 steps per group on its own timesteps"),
    ]
    if args.mix or args.distill:
        variant = options_arm(tdc, seed_dir / "tdc-options", args.mix or 0.0, args.distill or 0.0, progress)
        v = variant.training_flops()
        entries.append(ModelEntry(f"TDC (mix {args.mix or 0}, distill {args.distill or 0})",
                                  load_bundle(variant.dir / "bundle").router,
                                  v["total"] - (stage1 if args.one_stage else 0),
                                  notes=f"as TDC, stage 2 with {variant.config.finetune.steps} steps per group, "
                                        f"mix fraction {args.mix or 0}, distillation weight {args.distill or 0}"))

    if args.swap_experts:
        entries += swapped_expert_entries(tdc_router, single_model, tdc.sample_shape, tdc_flops)

    weights = weights_ids(seed_dir)
    if (earlier := earlier_evaluation(seed_dir, settings, weights, entries)) is not None:
        say(f"  evaluated before with these settings and weights: read from {seed_dir / EVALUATION}")
        return earlier
    if (seed_dir / EVALUATION).exists():
        say(f"  {seed_dir / EVALUATION} is of other settings, weights or arms, or unreadable: evaluating again")
    say(f"  evaluating {', '.join(e.name for e in entries)}")
    images, labels, name = reference
    evaluation = evaluate(entries, tdc.scheduler, images, labels, sample_shape=tdc.sample_shape, sampler=c.sampler,
                          steps=c.sampling_steps, num_samples=setting.num_samples, seeds=(seed,),
                          feature_cache_dir=args.feature_cache, reference_name=name,
                          timing_batches=setting.timing_batches, timing_repeats=setting.timing_repeats,
                          grid_dir=seed_dir / "grids", held_out=tdc.split()[1], loss_grouping=plan.grouping,
                          progress=progress)
    save_evaluation(seed_dir, settings, weights, evaluation)
    return evaluation


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=("digits", "mnist", "cifar10"), default="digits", help="data set to benchmark")
    p.add_argument("--data-path", type=Path, help="override the training data file (mnist: IDX images; cifar10: zip)")
    p.add_argument("--reference-path", type=Path, help="override cifar10's FID reference set (default: the test zip)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one independent run per seed")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: runs/bench-<data>)")
    p.add_argument("--base-from", type=Path, metavar="BENCH_DIR",
                   help="reuse the stage-1 bases of an earlier benchmark output (same data, stage-1 settings and "
                        "seeds): an ablation of later stages then skips stage 1")
    p.add_argument("--quick", action="store_true", help="tiny steps and few samples: a seconds-long smoke run")
    p.add_argument("--gpu", action="store_true", help="cifar10 only: the larger setting (full data, 32x32, attention)")
    p.add_argument("--k", type=float, help="budget slope k (0 < k <= 1)")
    p.add_argument("--groups", "-n", type=int, help="N, number of timestep groups")
    p.add_argument("--grouping", choices=("snr", "uniform", "loss"), help="how timesteps are grouped")
    p.add_argument("--ordering", choices=("measured", "snr-high-hard", "snr-low-hard"), help="which groups are hard")
    p.add_argument("--proposer", choices=("evolution", "uniform", "llm"), help="pruning proposer")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None, help="proposer memory bank")
    p.add_argument("--budget-unit", choices=("flops", "time"),
                   help="what TDC's group budgets are fractions of (time: the base's measured forward time); with "
                        "time, the uniform arm is matched on measured time too")
    p.add_argument("--mean-budget", type=float, metavar="F",
                   help="scale the k formula's budgets so their timestep-weighted mean is F of the base (0 < F <= 1)")
    p.add_argument("--depth", action=argparse.BooleanOptionalAction, default=None,
                   help="let TDC's pruning search also remove whole layers")
    p.add_argument("--latency-batch", type=int, metavar="B", help="batch size at which forward time is measured")
    p.add_argument("--one-stage", action="store_true",
                   help="ablation: group models trained from scratch at their pruned shapes (stage 2 also gets stage "
                        "1's compute)")
    p.add_argument("--mix", type=float, help="also run TDC with this stage-2 mix fraction of all-timestep samples")
    p.add_argument("--distill", type=float, help="also run TDC with this stage-2 distillation weight")
    p.add_argument("--swap-experts", action="store_true",
                   help="diagnostic: also evaluate TDC with each group's expert replaced by the single model, one "
                        "group at a time (which expert costs or gains FID)")
    p.add_argument("--sampler", choices=SAMPLERS, help="sampler for FID and timing")
    p.add_argument("--sample-steps", type=int, help="sampling steps for FID and timing")
    p.add_argument("--feature-cache", type=Path,
                   help="FID feature-classifier cache (default: ~/.cache/tdcdiff/features)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a RunConfig setting of the data set's setting, e.g. --set image_size=16 "
                        "--set base.steps=2000 (repeatable; image_size also resizes the FID reference)")
    p.add_argument("--fid-samples", type=int,
                   help="generated images per model and seed for FID (default: the setting's)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars (stage lines are still printed)")
    args = p.parse_args(argv)

    try:
        args.overrides = parse_settings(args.overrides)
    except ValueError as err:
        p.error(str(err))
    twice = sorted({s for s in args.seeds if args.seeds.count(s) > 1})
    if twice:
        p.error(f"--seeds {twice[0]} is given twice: each seed is one independent run, list it once")
    if args.gpu and args.data != "cifar10":
        p.error("--gpu selects the larger cifar10 setting; use it with --data cifar10")
    args.out = args.out or Path("runs") / (f"bench-{args.data}{'-gpu' if args.gpu else ''}"
                                           f"{'-quick' if args.quick else ''}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()

    setting = make_setting(args.data, args.data_path, args.reference_path, args.gpu, args.quick)
    for key, value in args.overrides.items():
        setting.run[key] = value
        if key == "image_size":
            setting.reference["size"] = setting.run[key]
    if args.fid_samples:
        setting = replace(setting, num_samples=args.fid_samples)
    try:  # before any work: settings are checked once, as every seed's run would check them
        seed_config(args, setting, args.seeds[0]).validate()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.base_from:  # before any work: a bad source must not surface after hours of training
        problems = [problem for seed in args.seeds
                    if (problem := base_source_problem(args.base_from / f"seed_{seed}" / "tdc",
                                                       seed_config(args, setting, seed)))]
        if problems:
            raise SystemExit("--base-from: " + "; ".join(problems) + ". Run the benchmark there first with the same "
                             "--data, stage-1 --set values and seeds, or drop --base-from")
    ref = dict(setting.reference)
    spec = ref.pop("spec")
    ref_data = load_dataset(spec, **ref)
    reference = (ref_data.images, ref_data.labels, Path(spec).name)
    say(f"benchmark {args.data}: seeds {args.seeds}, reference '{Path(spec).name}' ({len(ref_data)} images) -> "
        f"{args.out}")

    settings = call_settings(sys.argv[1:] if argv is None else argv, ignore=("quiet", "out", "seeds"))
    evaluations = [run_seed(args, setting, seed, reference, args.out, settings) for seed in args.seeds]
    results = pool(evaluations, [f"seed {s}" for s in args.seeds])
    results["context"] = [
        "The claim under test (arXiv 2312.13307): TDC gets better FID than the single model with about 20% fewer "
        "sampling FLOPs and no more training compute.",
        "Every arm had the same training compute (the training ratio column): the single and uniform models "
        "continue from TDC's stage-1 base for the FLOPs of TDC's stage 2. The pruning search's proxy forward "
        "passes are not counted. " + " ".join(setting.notes),
        "Held-out loss: the images every arm's training left out (10%, at most 512). TDC's choices (the measured "
        "difficulty ordering, a loss-based grouping, the pruning search's scores) were made on them, so they are "
        "not fully unseen by TDC; no arm's weights were trained on them.",
    ]
    results["bench"] = {
        "data": args.data, "gpu": args.gpu, "quick": args.quick, "seeds": args.seeds,
        "run_settings": setting.run, "reference": setting.reference, "notes": setting.notes,
        "base_from": str(args.base_from) if args.base_from else None, "one_stage": args.one_stage,
        "swap_experts": args.swap_experts, "mix": args.mix, "distill": args.distill,
        "budget_unit": args.budget_unit, "mean_budget": args.mean_budget, "depth": args.depth,
        "latency_batch": args.latency_batch,
        "command": " ".join(["python", "bench/benchmark.py", *(argv if argv is not None else sys.argv[1:])]),
        "equal_compute": "every arm: stage 1 + the FLOPs of TDC's stage 2 (pruning-search proxy forwards not counted)",
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    page = write_run_report(args.out, results, args.out / f"seed_{args.seeds[0]}" / "tdc")
    say("\n" + format_table(results))
    say("\nheld-out denoising loss per TDC group (ratio to the single model):\n"
        + format_table(results, loss_rows(results)))
    say("\nheld-out bits/dim bound per TDC group (± SE over images, sd over seeds):\n"
        + format_table(results, bpd_rows(results)))
    for sentence in verdicts(results):
        say(f"- {sentence}")
    say(f"\nreport: {page}\nresults: {args.out / 'results.json'}  ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
