"""The fast sampling path against today's eager loop: whole DDIM-50 sampling of the base and of a bundle.

    python bench/fast_path.py                              # digits-8 UNet and a 4-expert bundle built here
    python bench/fast_path.py --bundle runs/digits/bundle  # a trained bundle (its experts' shapes)
    python bench/fast_path.py --arms none trace inductor trace-bf16 trace-cl --batches 1 64

Speed does not depend on training, so without --bundle the models are untrained: the digits-8 UNet as the
base and a router over 4 UNets of the widths a pruned digits bundle has. Time is thread CPU time
(time.thread_time) with one torch thread, so a loaded machine does not distort it; arms run interleaved
(A B A B, order rotated every repeat) after one warm-up run each, and each arm's number is the median over
repeats of its ratio to the eager arm measured in the same repeat. Arms: none (eager, the old loop), trace,
inductor (torch.compile), trace-bf16 / none-bf16 (bf16 autocast), trace-cl (weights in channels_last).
Building a traced graph (once per expert and batch shape) is not timed; it is printed separately.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from pathlib import Path

import torch

from tdcdiff.grouping import make_groups
from tdcdiff.models import build_unet
from tdcdiff.pipeline import SamplingModel, sample
from tdcdiff.router import Router
from tdcdiff.schedule import make_scheduler

PRUNED_WIDTHS = [(16, 32), (24, 48), (24, 56), (32, 64)]  # roughly what k=0.4 leaves of digits-8's (32, 64)


def untrained_models(scheduler):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    base = build_unet("digits-8")
    experts = [UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=w, layers_per_block=1,
                           down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                           norm_num_groups=8, add_attention=False) for w in PRUNED_WIDTHS]
    router = Router(experts, make_groups("uniform", len(experts), scheduler))
    return base, router, (1, 8, 8)


def arm(model, name: str) -> SamplingModel:
    mode, _, option = name.partition("-")
    if option == "cl":
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    return SamplingModel(model, mode, "bf16" if option == "bf16" else "fp32")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="a bundle directory (default: untrained models built here)")
    parser.add_argument("--arms", nargs="+", default=["none", "trace"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.arms[0] != "none":
        parser.error("the first arm must be 'none' (the eager baseline the ratios are to)")
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")

    if args.bundle is not None:
        from tdcdiff.bundle import load_bundle

        bundle = load_bundle(args.bundle)
        scheduler, router, shape = bundle.scheduler, bundle.router, bundle.sample_shape
        base = build_unet(sample_size=shape[1], in_channels=shape[0])
    else:
        scheduler = make_scheduler(1000)
        base, router, shape = untrained_models(scheduler)
    print(f"DDIM-{args.steps}, thread CPU time, 1 thread, {args.repeats} interleaved repeats, median of ratios "
          f"to eager; torch {torch.__version__}")
    print(f"{'model':<7}{'batch':>6}  {'arm':<11}{'s/run':>8}{'img/s':>9}{'speedup':>9}   {'build s':>7}")
    for label, model in (("base", base), ("bundle", router)):
        for batch in args.batches:
            runners, build = [], []
            for name in args.arms:
                start = time.thread_time()
                runner = arm(model.eval(), name)
                sample(runner, scheduler, sample_shape=shape, steps=args.steps, num_images=batch, batch_size=batch,
                       progress=False)  # warm-up; builds the graphs for this batch shape
                runners.append(runner)
                build.append(time.thread_time() - start)
            times = [[] for _ in runners]
            for repeat in range(args.repeats):
                order = list(range(len(runners)))
                order = order[repeat % len(order):] + order[: repeat % len(order)]
                for i in order:
                    start = time.thread_time()
                    sample(runners[i], scheduler, sample_shape=shape, steps=args.steps, num_images=batch,
                           batch_size=batch, seed=repeat, progress=False)
                    times[i].append(time.thread_time() - start)
            for i, name in enumerate(args.arms):
                median = statistics.median(times[i])
                speedup = statistics.median(e / a for e, a in zip(times[0], times[i]))
                print(f"{label:<7}{batch:>6}  {name:<11}{median:>8.3f}{batch / median:>9.1f}{speedup:>8.2f}x"
                      f"   {build[i]:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
