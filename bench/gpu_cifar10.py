"""The DDPM CIFAR-10 configuration through `tdcdiff tune`'s frontier in about 10 minutes of one GPU; without a GPU,
the same path at a toy size on the CPU (tests/test_gpu_cifar10.py runs it so).

    python bench/gpu_cifar10.py --out /tmp/gpu-cifar10                  # a GPU: --minutes 10 of it
    python bench/gpu_cifar10.py --out /tmp/toy --data digits            # no GPU: the toy size, a minute or two

On a GPU the base is the configuration of the public DDPM CIFAR-10 model (google/ddpm-cifar10-32, Ho et al. 2020:
diffusers UNet2DModel, block_out_channels (128, 256, 256, 256), 2 layers per block, one attention head at 16x16;
35.7 M parameters, 12.4 GFLOPs per 32x32 image), trained from its seeded initial weights on --limit images of the
shared CIFAR-10 training set in bf16 autocast, then tuned: the base fine-tuned, uniform pruning to 0.6 of its
FLOPs and TDC (k 0.3, N 2), each with the same training compute, screened, FID/KID on the finalists and timed
(tune/). Before any training it estimates every phase on the device (run/estimate.py: one forward, one training
step and one pruning trial measured there) and halves the training steps until the estimate fits 85% of
--minutes. It prints the estimate, the frontier, the time it took, and the device each number came from.

On a CPU (or with --toy) the base is a toy UNet (2 levels, 16 and 32 channels) on 8x8 images, trained 30 steps.
The `module:function` bases are this file's `ddpm_cifar10_unet` and `toy_unet`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

SHARED_CIFAR10 = "/work/shared/data/cifar10/cifar10-train-jpeg.zip"
GPU_STEPS = 4000  # stage-1 steps before sizing to fit; candidates train a quarter of that each
BUDGET_SHARE = 0.85  # of --minutes: what the estimate may fill (loading, the FID feature net are not in it)


def ddpm_cifar10_unet():
    """The configuration of the public DDPM CIFAR-10 model (google/ddpm-cifar10-32), seeded initial weights."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                       layers_per_block=2, attention_head_dim=None,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))


def toy_unet():
    """A toy UNet for the CPU path (8x8 images), seeded initial weights."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)


def settings(toy: bool, data: str, limit: int, steps: int, device: str) -> tuple[dict, object]:
    """(the base run's RunConfig overrides, the TuneConfig) at this size."""
    from tdcdiff.tune import TuneConfig

    run = {"data": data, "limit": limit, "channels": 3, "device": device, "base_model_steps": steps,
           "search.rounds": 1, "search.candidates_per_round": 2, "sample_steps": 20 if toy else 50, "seed": 0}
    if toy:
        run |= {"base_model": "gpu_cifar10:toy_unet", "image_size": 8, "base.batch_size": 32, "finetune.batch_size": 32}
        tune = TuneConfig(tune_steps=4, widths=(0.6,), ks=(0.3,), groups=(2,), finalists=2, fid_seeds=2, fid_samples=16,
                          batch=4, timing_repeats=2)
    else:
        run |= {"base_model": "gpu_cifar10:ddpm_cifar10_unet", "image_size": 32, "base.batch_size": 128,
                "finetune.batch_size": 128, "base.mixed_precision": "bf16", "finetune.mixed_precision": "bf16",
                "search.candidates_per_round": 4}
        tune = TuneConfig(tune_steps=max(1, steps // 4), widths=(0.6,), ks=(0.3,), groups=(2,), finalists=2,
                          fid_seeds=2, fid_samples=512, batch=64, timing_repeats=3)
    return run, tune


def size_to_fit(out: Path, toy: bool, data: str, limit: int, device: str, seconds: float):
    """(overrides, TuneConfig, estimate text, estimated seconds): the most training steps (from GPU_STEPS, halved)
    whose estimated tune fits `seconds` on `device`."""
    from tdcdiff.run import Stages, apply_overrides
    from tdcdiff.run.estimate import format_phases, tune_phases, unit_costs_for
    from tdcdiff.tune import candidate_list

    steps = 30 if toy else GPU_STEPS
    overrides, tune = settings(toy, data, limit, steps, device)
    stages = Stages(out / "base", overrides=overrides, progress=False)
    costs, base, shape = unit_costs_for(stages)
    first = stages.config
    while True:
        overrides, tune = settings(toy, data, limit, steps, device)
        stages.config = apply_overrides(first, overrides)
        phases = tune_phases(stages, tune, candidate_list(tune), costs, base, shape)
        total = sum(p.seconds for p in phases)
        if total <= seconds or steps <= 8:
            return overrides, tune, format_phases("estimate", phases, costs), total
        steps //= 2


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the tune directory")
    parser.add_argument("--data", default=SHARED_CIFAR10, help="training images (default: the shared CIFAR-10)")
    parser.add_argument("--limit", type=int, default=2000, help="images used (default 2000)")
    parser.add_argument("--minutes", type=float, default=10.0, help="device time to fit in (default 10)")
    parser.add_argument("--toy", action="store_true", help="the toy size even with a GPU")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    from tdcdiff.latency import device_name
    from tdcdiff.tune import Tune, format_rows, table_rows

    device = "cuda" if torch.cuda.is_available() else "cpu"
    toy = args.toy or device == "cpu"
    named = device_name(device)
    start, cpu = time.perf_counter(), time.process_time()
    overrides, tune, estimate, seconds = size_to_fit(args.out, toy, args.data, args.limit, device,
                                                     BUDGET_SHARE * args.minutes * 60)
    print(f"device: {named}; {'toy size' if toy else 'DDPM CIFAR-10 configuration'}, {overrides['base_model_steps']} "
          f"stage-1 steps, {tune.tune_steps} steps per candidate\n{estimate}", flush=True)
    results = Tune(args.out, tune, overrides=overrides, progress=not args.quiet).run_all()
    took, cpu = time.perf_counter() - start, time.process_time() - cpu
    print("\n" + format_rows(table_rows(results["rows"], results["choice"]["name"],
                                        results["screening_measure"]["key"])))
    print(f"chosen: {results['choice']['name'] or 'none'}: {results['choice']['reason']}")
    print(f"device: {named}; took {took / 60:.1f} min wall, {cpu / 60:.1f} min of process CPU (estimated "
          f"{seconds / 60:.1f} min of {'GPU' if device == 'cuda' else 'one-thread CPU'} time); frontier: "
          f"{args.out / 'frontier.png'}")


if __name__ == "__main__":
    main()
