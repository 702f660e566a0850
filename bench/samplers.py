"""Sampling time of one trained base under each sampler, step count and feature-cache setting, side by side.

    tdcdiff train-base --out /tmp/sc-run --base-steps 600 -q
    python bench/samplers.py --run /tmp/sc-run
    python bench/samplers.py --run /tmp/sc-run --arms ddim:50 unipc:10 ddim:50:cache3:depth2 --batches 64

An arm is SAMPLER:STEPS[:cacheN[:depthD]] (cacheN: feature caching, a full UNet pass every N steps; depthD: its
shallow branch's depth, default 1). The first arm is the reference every ratio is to. Time is thread CPU time
(time.thread_time) with one torch thread, so a loaded machine does not distort it; each arm runs once to build its
traced graphs (not timed), then the arms run interleaved (A B C A B C, order rotated every repeat), each repeat
with its own seed, and an arm's ratio is the median over repeats of its time / the reference's time in the same
repeat. No quality is measured here: fewer steps and caching change the images.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tdcdiff.pipeline import SAMPLERS, SamplingModel, sample  # noqa: E402
from tdcdiff.run import Run  # noqa: E402

DEFAULT_ARMS = ["ddim:50", "dpm-solver++:20", "dpm-solver++:10", "unipc:10", "deis:10",
                "ddim:50:cache2", "ddim:50:cache3", "ddim:50:cache5",
                "dpm-solver++:20:cache2", "dpm-solver++:20:cache3", "dpm-solver++:20:cache5"]


@dataclass(frozen=True)
class Arm:
    sampler: str
    steps: int
    cache_interval: int = 1
    cache_depth: int | None = None

    @classmethod
    def parse(cls, text: str) -> Arm:
        sampler, _, rest = text.partition(":")
        steps, *options = rest.split(":")
        if sampler not in SAMPLERS or not steps.isdigit():
            raise ValueError(f"arm {text!r}: expected SAMPLER:STEPS[:cacheN[:depthD]] with SAMPLER one of {SAMPLERS}")
        values = {}
        for option in options:
            key = next((k for k in ("cache", "depth") if option.startswith(k) and option[len(k):].isdigit()), None)
            if key is None:
                raise ValueError(f"arm {text!r}: unknown option {option!r}; give cacheN or depthD")
            values[key] = int(option[len(key):])
        return cls(sampler, int(steps), values.get("cache", 1), values.get("depth"))

    def __str__(self) -> str:
        cache = f" cache {self.cache_interval}" if self.cache_interval > 1 else ""
        depth = f" depth {self.cache_depth}" if self.cache_depth is not None else ""
        return f"{self.sampler}-{self.steps}{cache}{depth}"


def run_arm(runner: SamplingModel, scheduler, shape, arm: Arm, batch: int, seed: int):
    return sample(runner, scheduler, sample_shape=shape, sampler=arm.sampler, steps=arm.steps, num_images=batch,
                  batch_size=batch, seed=seed, progress=False, cache_interval=arm.cache_interval,
                  cache_depth=arm.cache_depth)


def time_arms(runner: SamplingModel, scheduler, shape, arms: list[Arm], batch: int, repeats: int):
    """(seconds per run of each arm: one list per arm, one value per repeat; full passes per run of each arm)."""
    full = []
    for arm in arms:  # warm-up: builds the traced graphs of this batch shape
        result = run_arm(runner, scheduler, shape, arm, batch, seed=0)
        full.append(arm.steps - len(result.shallow_steps))
    times = [[] for _ in arms]
    for repeat in range(repeats):
        order = list(range(len(arms)))
        order = order[repeat % len(order):] + order[: repeat % len(order)]
        for i in order:
            start = time.thread_time()
            run_arm(runner, scheduler, shape, arms[i], batch, seed=repeat + 1)
            times[i].append(time.thread_time() - start)
    return times, full


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a run directory with a trained base (train-base)")
    parser.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, help="SAMPLER:STEPS[:cacheN[:depthD]]; the "
                        "first is the reference")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 1])
    parser.add_argument("--repeats", type=int, nargs="+", default=[5, 25], help="timed repeats per batch size, "
                        "in --batches order (a batch-1 run is short: more repeats); the last applies to the rest")
    args = parser.parse_args(argv)
    try:
        arms = [Arm.parse(text) for text in args.arms]
    except ValueError as err:
        parser.error(str(err))
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    run = Run(args.run, progress=False)
    scheduler, shape = run.scheduler, run.sample_shape
    runner = SamplingModel(run.base_model().eval())  # the default fast path (traced), shared by every arm
    results = {}
    repeats = {batch: args.repeats[min(i, len(args.repeats) - 1)] for i, batch in enumerate(args.batches)}
    for batch in args.batches:
        results[batch] = time_arms(runner, scheduler, shape, arms, batch, repeats[batch])
    print(f"base {args.run} ({sum(p.numel() for p in runner.model.parameters()) / 1e6:.2f} M params, {shape}), "
          f"path {runner.compile}; thread CPU time, 1 thread, interleaved repeats "
          f"({', '.join(f'{r} at batch {b}' for b, r in repeats.items())}); ratio = median over repeats of time / "
          f"{arms[0]}'s time; torch {torch.__version__}")
    header = "".join(f"{f'b{b} ms/img':>13}{f'b{b} ratio':>10}{'speedup':>9}" for b in args.batches)
    print(f"{'arm':<28}{'full passes':>12}{header}")
    for i, arm in enumerate(arms):
        cells = []
        for batch in args.batches:
            times, full = results[batch]
            ratio = statistics.median(a / r for a, r in zip(times[i], times[0]))
            cells.append(f"{1000 * statistics.median(times[i]) / batch:>13.2f}{ratio:>10.3f}{1 / ratio:>8.2f}x")
        print(f"{str(arm):<28}{f'{full[i]}/{arm.steps}':>12}{''.join(cells)}", flush=True)


if __name__ == "__main__":
    main()
