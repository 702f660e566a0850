"""Benchmark: does a pruned expert's measured forward time match the planned time ratio?

    OMP_NUM_THREADS=1 python bench/latency.py --out runs/bench-latency
    OMP_NUM_THREADS=1 python bench/latency.py --models digits-8 --batches 1 --out /tmp/lat   # a subset

Per model (untrained: speed does not depend on the weights) and batch size, the base's latency table is
measured (tdcdiff.prune.fit.measure_latency_table, cached in out/cache), and for each planned ratio p three
experts are pruned:
  flops        today's default: uniform width pruning to p x the base's FLOPs (prune.fit.uniform_fit)
  time-width   uniform width pruning fitted to p x the base's time, estimated from the latency table, then
               corrected against its directly measured time (prune.fit.uniform_fit with the table: as
               `tdcdiff prune --budget-unit time` does)
  time-depth   the same, but first removing the depth units (ResNet layers, attention blocks) that save the
               most time per table entry; removals that alone undershoot the plan are undone, smallest first
All experts and the base are then timed side by side (thread CPU time, one thread, interleaved repeats,
median of per-repeat ratios). Printed: measured time ratio and FLOPs ratio per arm; out/latency.json holds
everything.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

MODELS = {"digits-8": ("digits-8", False), "gray-28": ("gray-28", False), "rgb-32": ("rgb-32", True)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.8, 0.6, 0.4])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats of the final timing")
    parser.add_argument("--table-repeats", type=int, default=5)
    parser.add_argument("--max-levels", type=int, default=5, help="width levels measured per unit in the table")
    parser.add_argument("--tolerance", type=float, default=0.03)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import torch

    from tdcdiff.files import atomic_write_text
    from tdcdiff.flops import count_flops
    from tdcdiff.latency import device_name, time_ratios
    from tdcdiff.models import PRESETS, build_unet, network
    from tdcdiff.prune.fit import BudgetError, fit_to_measured_time, measure_latency_table, uniform_fit
    from tdcdiff.prune.units import uniform_proposal
    from tdcdiff.surgery.depth import depth_units, removed_units

    torch.manual_seed(0)
    rows, started = [], time.time()
    for name in args.models:
        preset, attention = MODELS[name]
        p = PRESETS[preset]
        shape = (p.in_channels, p.sample_size, p.sample_size)
        base = build_unet(preset, attention=attention).eval()
        base_flops = count_flops(base, shape)
        for batch in args.batches:
            table = measure_latency_table(
                base, shape, batch, max_levels=args.max_levels, cache_dir=args.out / "cache",
                repeats=args.table_repeats, progress=lambda line: print(f"  {name} b{batch}: {line}", file=sys.stderr),
            )
            savers = sorted((u for u in depth_units(network(base)) if u in table.deltas),
                            key=lambda u: table.deltas[u][1.0])
            depth_decision = {**uniform_proposal(base), **dict.fromkeys(savers, 1.0)}
            timing = {"tolerance": args.tolerance, "repeats": args.repeats}
            experts, meta = [], []
            for ratio in args.ratios:
                for arm in ("flops", "time-width", "time-depth"):
                    try:
                        if arm == "flops":
                            fit, estimate = uniform_fit(base, ratio, shape, tolerance=args.tolerance), None
                        else:
                            timed = (uniform_fit(base, ratio, shape, latency=table, batch=batch, **timing)
                                     if arm == "time-width" else
                                     fit_to_measured_time(base, depth_decision, ratio, shape, batch, table, **timing))
                            fit, estimate = timed.fit, timed.trail[0]["estimated_ratio"]
                    except BudgetError as err:
                        print(f"  {name} b{batch} {arm} {ratio}: {err}", file=sys.stderr)
                        continue
                    removed = removed_units(fit.model)
                    experts.append(fit.model)
                    meta.append({"model": name, "batch": batch, "plan": ratio, "arm": arm,
                                 "flops_ratio": fit.flops / base_flops,
                                 "estimated_time_ratio": estimate,  # the table's, before the correction
                                 "removed": removed})
            ratios = time_ratios([base, *experts], shape, batch, repeats=args.repeats, warmup=1)
            for m, r in zip(meta, ratios[1:]):
                m["time_ratio"] = r
                rows.append(m)
            print(f"{name} batch {batch}: done ({time.time() - started:.0f} s)", file=sys.stderr)
            # Written after every model and batch, so an interrupted benchmark keeps what it measured.
            info = {"device": device_name("cpu"), "torch": torch.__version__, "seconds": time.time() - started,
                    "rows": rows}
            atomic_write_text(args.out / "latency.json", json.dumps(info, indent=1))

    print(f"device {info['device']}, torch {info['torch']}, {info['seconds']:.0f} s")
    print_table(rows, args)
    return 0


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    """One markdown row per model, batch and planned ratio: each arm's measured time and FLOPs ratios."""
    print("| model | batch | plan | flops: time / FLOPs | time-width: time / FLOPs (est.) | time-depth: time / FLOPs "
          "(est.) | layers removed (time-depth) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    by = {(r["model"], r["batch"], r["plan"], r["arm"]): r for r in rows}
    for name in args.models:
        for batch in args.batches:
            for ratio in args.ratios:
                cells = []
                for arm in ("flops", "time-width", "time-depth"):
                    r = by.get((name, batch, ratio, arm))
                    est = f" ({r['estimated_time_ratio']:.2f})" if r and r["estimated_time_ratio"] else ""
                    cells.append(f"{r['time_ratio']:.2f} / {r['flops_ratio']:.2f}{est}" if r else "not fitted")
                depth = by.get((name, batch, ratio, "time-depth"))
                print(f"| {name} | {batch} | {ratio} | " + " | ".join(cells)
                      + f" | {len(depth['removed']) if depth else '-'} |")


if __name__ == "__main__":
    sys.exit(main())
