"""Stage-2 recipes for deep cuts at equal training FLOPs: plain, output distillation, feature distillation, a
timestep mix, and longer training (issue 13, item 4).

    python bench/recipes.py --out runs/recipes-digits                       # trains the digits base first
    python bench/recipes.py --base-from runs/digits --out runs/recipes-b    # reuses a run's stage-1 base
    python bench/recipes.py --quick --out /tmp/recipes                      # seconds: a smoke test

One base: out/run/ is a tdcdiff run directory whose stage 1 is trained here with the run defaults (digits, 3000
steps at batch 128: 22 min of one CPU thread on a loaded 2-core machine, done once; later invocations reuse it),
or copied from the run directory given as --base-from. For each budget in --budgets (fractions of the base's
FLOPs), the base is pruned to the budget with one global width ratio (prune.fit.uniform_fit, as benchmark.py's
uniform arm), and copies of that expert are trained on ONE
timestep group (--group; default 0 of --groups 2 SNR groups: t 0-302 of T=1000, where the issue found TDC's
smallest expert 5-17% worse; --group all trains on every t and drops the mix recipe) with each recipe:

  plain         --steps steps of the run's stage-2 settings (finetune.*), group timesteps only
  distill       output distillation from the base, distill_weight 0.5
  features      feature distillation from the base, feature_distill_weight 0.5 (block outputs, 1x1 projections)
  mix           mix_fraction 0.2: a fifth of every batch draws t from all timesteps
  longer (2x)   plain with 2 x --steps: twice the compute, NOT an equal-compute arm (how much more steps buy)

Equal compute: every recipe but `longer` gets the FLOPs of `plain` (train.step_flops: student forward +
backward, the teacher's forward and the projections when distilling); its step count is cut to match.
Measured on the run's held-out images (10% of the data, never trained on): the group's share of the bits/dim
bound (likelihood.nll_bound, stratified estimate, ± SE over images; the difference to `plain` is paired: same
images, timesteps and noise) and the held-out denoising loss on the group (evaluate.held_out_loss, fixed
noise), both also for the unpruned base. With several --seeds each recipe is trained once per seed and the
table adds the sd over seeds of the paired difference. Results: out/results.json and a printed table.

Default run: budgets 0.4 and 0.6, 250 plain steps at the run's stage-2 batch (128), seed 0. Its training is
6 x the plain compute at each budget, i.e. about the compute of 1,500 base steps (half of stage 1):
8.6 min of one CPU thread on digits (OMP_NUM_THREADS=1, on a loaded 2-core machine) with the evaluation, after
the base exists. Everything resumes: rerunning the same command continues.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

RECIPES = {  # name -> (TrainConfig changes, compute relative to plain)
    "plain": ({}, 1.0),
    "distill": ({"distill_weight": 0.5}, 1.0),
    "features": ({"feature_distill_weight": 0.5}, 1.0),
    "mix": ({"mix_fraction": 0.2}, 1.0),
    "longer (2x)": ({}, 2.0),
}
BPD_SAMPLES = 32  # timestep strata per image in the bits/dim estimate
QUICK_HELD_OUT = 16  # --quick: held-out images measured


def _say(message: str) -> None:
    print(message, flush=True)


def open_base(out: Path, base_from: Path | None, overrides: dict, progress: bool):
    """The run holding the base: out/run, its stage 1 trained here or copied from base_from."""
    from tdcdiff.run import Run, copy_stages
    from tdcdiff.train import FINAL_DIR

    run_dir = out / "run"
    if base_from is not None:
        if not (base_from / "base" / FINAL_DIR).exists() or not (base_from / "config.json").exists():
            raise SystemExit(f"--base-from: no finished stage-1 base at {base_from / 'base'}; give a tdcdiff run "
                             "directory whose `tdcdiff train-base` finished, or drop --base-from")
        copy_stages(base_from, run_dir, ("config.json", "base"))
    run = Run(run_dir, overrides=overrides, progress=progress)
    if not (run_dir / "base" / FINAL_DIR).exists():
        _say(f"training the base ({run.config.base.steps} steps) -> {run_dir / 'base'}")
    run.train_base()
    return run


def recipe_configs(expert, base, run, steps: int) -> dict:
    """recipe -> TrainConfig, its steps cut so that its FLOPs are `plain`'s x the recipe's factor."""
    from tdcdiff.train import step_flops

    shape = run.sample_shape
    plain = run.config.finetune.plain(steps=steps)
    budget = step_flops(expert, shape, plain) * steps
    configs = {}
    for name, (changes, factor) in RECIPES.items():
        config = replace(plain, **changes)
        per_step = step_flops(expert, shape, config, base if config.uses_teacher else None)
        configs[name] = replace(config, steps=max(1, round(factor * budget / per_step)))
    return configs


def measure(model, run, held, grouping, key: str, seed: int, samples: int = BPD_SAMPLES) -> tuple[dict, object]:
    """(held-out loss and bits/dim of the group `key` of one model, its likelihood.Bound for paired differences)."""
    from tdcdiff.evaluate import held_out_loss
    from tdcdiff.likelihood import nll_bound

    bound = nll_bound(model, held, run.scheduler, grouping=grouping, samples=samples, seed=seed)
    summary = bound.summary()
    bpd = summary["total"] if key == "all" else summary["groups"][key]
    loss = held_out_loss(model, held, run.scheduler, grouping, seed=seed)[key]
    return {"held_out_loss": loss, "bpd": bpd}, bound


def run_budget(run, base, base_bound, fraction: float, args, grouping, key: str, timesteps, held, seeds,
               progress) -> list[dict]:
    """All recipes at one budget, every seed; the rows of the table (one per recipe)."""
    import torch

    from tdcdiff.flops import count_flops
    from tdcdiff.prune.fit import uniform_fit
    from tdcdiff.serialization import load_model, save_model
    from tdcdiff.train import FINAL_DIR, train

    shape = run.sample_shape
    base_flops = count_flops(base, shape)
    budget_dir = args.out / f"budget_{fraction:g}"
    if not (budget_dir / "pruned").exists():
        save_model(uniform_fit(base, fraction, shape).model, budget_dir / "pruned")
    expert_flops = count_flops(load_model(budget_dir / "pruned"), shape)
    configs = recipe_configs(load_model(budget_dir / "pruned"), base, run, args.steps)
    if key == "all":
        configs.pop("mix")  # a mix needs a timestep subset to mix into
    train_images = run.split()[0]
    results = {name: [] for name in configs}
    for seed in seeds:
        bounds = {}
        for name, config in configs.items():
            out = budget_dir / f"seed_{seed}" / name.split()[0]
            _say(f"  budget {fraction:g} ({expert_flops / base_flops:.1%} FLOPs), seed {seed}: {name}, "
                 f"{config.steps} steps -> {out}")
            model = load_model(budget_dir / "pruned")
            trained = train(model, train_images, run.scheduler, replace(config, seed=seed * 100 + 1), out,
                            timesteps=timesteps, teacher=base if config.uses_teacher else None, progress=progress,
                            description=f"{fraction:g} {name}", data_range=run.data_range)
            expert = load_model(out / FINAL_DIR).eval()
            metrics, bounds[name] = measure(expert, run, held, grouping, key, args.eval_seed, args.bpd_samples)
            results[name].append({"seed": seed, "steps": config.steps, "train_flops": trained.train_flops,
                                  "feature_points": trained.extra.get("feature_points", []), **metrics})
        for name in configs:
            for other, bound in (("plain", bounds["plain"]), ("base", base_bound)):
                difference = bounds[name].difference(bound)  # paired, image by image
                results[name][-1][f"bpd_minus_{other}"] = (difference["total"] if key == "all"
                                                           else difference["groups"][key])
    rows = []
    plain_flops = sum(r["train_flops"] for r in results["plain"])
    for name, runs in results.items():
        differences = torch.tensor([r["bpd_minus_plain"]["mean"] for r in runs])
        rows.append({
            "budget": fraction, "expert_flops_ratio": expert_flops / base_flops, "recipe": name,
            "steps": runs[0]["steps"], "train_flops": sum(r["train_flops"] for r in runs) / len(runs),
            "compute_vs_plain": sum(r["train_flops"] for r in runs) / plain_flops,
            "equal_compute": RECIPES[name][1] == 1.0,
            "held_out_loss": sum(r["held_out_loss"] for r in runs) / len(runs),
            "bpd": sum(r["bpd"]["mean"] for r in runs) / len(runs),
            "bpd_se": runs[0]["bpd"]["se"] if len(runs) == 1 else None,
            "bpd_minus_plain": float(differences.mean()),
            "bpd_minus_plain_se": runs[0]["bpd_minus_plain"]["se"] if len(runs) == 1 else None,
            "bpd_minus_plain_sd_over_seeds": float(differences.std()) if len(runs) > 1 else None,
            "bpd_minus_base": sum(r["bpd_minus_base"]["mean"] for r in runs) / len(runs),
            "runs": runs,
        })
    return rows


def format_rows(rows: list[dict], base_row: dict, key: str) -> str:
    """The printed table: one line per budget and recipe, the base first."""
    head = (f"{'budget':>6} {'recipe':<12} {'steps':>5} {'compute':>8} {'loss ' + key:>14} {'vs base':>7} "
            f"{'bpd ' + key:>16} {'- base':>8} {'bpd - plain':>18}")
    lines = [head, "-" * len(head),
             f"{'1.0':>6} {'base':<12} {'-':>5} {'-':>8} {base_row['held_out_loss']:>14.4f} {'1.000':>7} "
             f"{base_row['bpd']['mean']:>7.4f} ± {base_row['bpd']['se']:.4f} {'':>8} {'':>18}"]
    for r in rows:
        spread = r["bpd_minus_plain_se"] if r["bpd_minus_plain_se"] is not None else r["bpd_minus_plain_sd_over_seeds"]
        sign = "±" if r["bpd_minus_plain_se"] is not None else "sd"
        diff = "" if r["recipe"] == "plain" else f"{r['bpd_minus_plain']:+.4f} {sign} {spread:.4f}"
        se = f" ± {r['bpd_se']:.4f}" if r["bpd_se"] is not None else " " * 9
        lines.append(f"{r['budget']:>6g} {r['recipe']:<12} {r['steps']:>5} {r['compute_vs_plain']:>7.2f}x "
                     f"{r['held_out_loss']:>14.4f} {r['held_out_loss'] / base_row['held_out_loss']:>7.3f} "
                     f"{r['bpd']:>7.4f}{se} {r['bpd_minus_base']:>+8.4f} {diff:>18}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="output folder (default: runs/recipes-digits[-quick])")
    p.add_argument("--base-from", type=Path, metavar="RUN_DIR",
                   help="take the stage-1 base of this tdcdiff run directory")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.4, 0.6],
                   help="expert FLOPs as fractions of the base's")
    p.add_argument("--steps", type=int, default=250, help="stage-2 steps of the plain recipe (sets the equal compute)")
    p.add_argument("--groups", type=int, default=2, help="N, the number of SNR timestep groups")
    p.add_argument("--group", default="0", help="the group the experts are trained for (0..N-1), or 'all'")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="training seeds (each recipe trained once per seed)")
    p.add_argument("--eval-seed", type=int, default=0, help="seed of the held-out timesteps and noise (shared: paired)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a RunConfig setting of the base run, e.g. --set finetune.lr=1e-3 (repeatable; stage-1 "
                        "settings only act when the base is trained here)")
    p.add_argument("--quick", action="store_true", help="tiny base, few steps: a seconds-long smoke test")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    from tdcdiff.run import parse_settings

    try:
        args.overrides = parse_settings(args.overrides)
    except ValueError as err:
        p.error(str(err))
    if args.group != "all" and not (args.group.isdigit() and int(args.group) < args.groups):
        p.error(f"--group must be 0..{args.groups - 1} or 'all', got {args.group!r}")
    if args.steps < 1 or any(not 0 < b < 1 for b in args.budgets):
        p.error("--steps must be >= 1 and every --budgets value in (0, 1)")
    args.out = args.out or Path("runs") / f"recipes-digits{'-quick' if args.quick else ''}"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    from tdcdiff.files import atomic_write_text
    from tdcdiff.grouping import make_groups
    from tdcdiff.models import num_class_embeds

    overrides = args.overrides
    if args.quick:
        overrides = {"base.steps": 30, "base.batch_size": 32, "base.warmup_steps": 5, "finetune.batch_size": 32,
                     "finetune.warmup_steps": 2, **overrides}
        args.steps = min(args.steps, 6)
    args.bpd_samples = 4 if args.quick else BPD_SAMPLES
    run = open_base(args.out, args.base_from, overrides, not args.quiet)
    base = run.base_model().eval()
    if num_class_embeds(base) is not None:
        raise SystemExit("bench/recipes.py measures unconditional models; the base is class-conditional")
    grouping = make_groups("snr", args.groups, run.scheduler)
    key = "all" if args.group == "all" else f"group {args.group}"
    timesteps = None if args.group == "all" else grouping.timesteps(int(args.group))
    held = run.split()[1][:QUICK_HELD_OUT] if args.quick else run.split()[1]
    span = "all t" if timesteps is None else f"t {int(timesteps[0])}-{int(timesteps[-1])}"
    _say(f"recipes: base {run.dir}, experts for {key} ({span}), budgets {args.budgets}, {args.steps} plain steps, "
         f"seeds {args.seeds} -> {args.out}")
    base_row, base_bound = measure(base, run, held, grouping, key, args.eval_seed, args.bpd_samples)
    rows = [row for fraction in args.budgets
            for row in run_budget(run, base, base_bound, fraction, args, grouping, key, timesteps, held, args.seeds,
                                  not args.quiet)]
    table = format_rows(rows, base_row, key)
    results = {
        "command": " ".join(["python", "bench/recipes.py", *(argv if argv is not None else sys.argv[1:])]),
        "base_run": str(run.dir), "group": key, "timesteps": span, "budgets": args.budgets,
        "plain_steps": args.steps, "seeds": args.seeds, "quick": args.quick,
        "finetune": {k: v for k, v in run.config.to_dict()["finetune"].items()
                     if k in ("lr", "batch_size", "ema_decay")},
        "base": base_row, "rows": rows,
        "method": [
            "Every recipe trains a copy of the same uniformly width-pruned expert on the group's timesteps; all but "
            "'longer (2x)' get the plain recipe's training FLOPs (teacher forwards and projections counted).",
            f"bits/dim: the group's share of the variational bound on held-out images ({len(held)} images, "
            f"{args.bpd_samples} stratified timesteps per image, ± SE over images); 'bpd - plain' is paired image by "
            "image (same t and noise). Loss: mean held-out denoising MSE over the group's timesteps.",
        ],
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    atomic_write_text(args.out / "results.json", json.dumps(results, indent=2))
    _say("\n" + table)
    _say(f"\ncompute: training FLOPs relative to plain; '- base': the expert's bpd minus the base's (paired); "
         f"'bpd - plain' < 0 is better than plain (± paired SE over "
         f"images).\nresults: {args.out / 'results.json'}  ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
