"""Bring your own model, per kind: each expert's FLOPs error and the bundle's sampling time against its base.

    python bench/byom_kinds.py --out /tmp/byom-kinds

The kinds are the example models (bench/models_zoo.py): an ADM-style UNet (learned variance, class labels), a
DiT-style transformer (adaLN), a class-conditional diffusers UNet2DModel with attention, a diffusers pipeline
directory (UNet2DModel + DDPMScheduler) and a latent diffusion pipeline (tiny AutoencoderKL). Each goes through
Run(..., base=...) at the tests' tiny settings (TINY) with 3 groups (budgets 0.6, 0.8, 1.0 of the base's FLOPs).
Untrained models: speed does not depend on training. Time: one full DDIM-50 sampling run at batch 64 (the
denoising; a latent model's decoder is the same for both and left out), thread CPU time with one torch thread,
base and bundle interleaved, median of 3 after a warm-up (tdcdiff.evaluate's timing).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from models_zoo import ddpm_pipeline, latent_pipeline  # bench/models_zoo.py, beside this file
from tdcdiff.bundle import load_bundle
from tdcdiff.evaluate import time_sampling
from tdcdiff.pipeline import SamplingModel
from tdcdiff.run import Run, RunConfig, apply_overrides

KINDS = {"adm": "models_zoo:AdmUNet", "dit": "models_zoo:TinyDiT",
         "diffusers-class-attention": "models_zoo:class_conditional_unet", "diffusers-pipeline": ddpm_pipeline,
         "latent": latent_pipeline}
# The whole method at toy sizes (the tests' tiny_config, tests/conftest.py), with 3 groups.
TINY = {"base.steps": 40, "base.batch_size": 32, "base.lr": 2e-3, "base.warmup_steps": 2, "base.checkpoint_every": 20,
        "base.log_every": 10, "groups": 3, "k": 0.4, "search.rounds": 1, "search.candidates_per_round": 2,
        "finetune.steps": 6, "finetune.batch_size": 32, "finetune.lr": 5e-4, "finetune.warmup_steps": 1,
        "finetune.checkpoint_every": 3, "finetune.log_every": 3, "sample_steps": 4, "num_samples": 8,
        "eval_samples": 32, "eval_seeds": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/byom-kinds"), help="where the runs are written")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for kind, base in KINDS.items():
        if not isinstance(base, str):
            pipe = args.out / f"pipe_{kind}"
            base = str(pipe if pipe.exists() else base(pipe))
        run = Run(args.out / kind, apply_overrides(RunConfig(), TINY), progress=False, base=base)
        run.train_base()
        run.plan()
        summaries = run.prune()
        run.finetune()
        bundle = load_bundle(run.export_bundle())
        steps, t_max = 50, run.config.num_train_timesteps
        trajectory = list(range(t_max - 1, -1, -(t_max // steps)))
        seconds = time_sampling([SamplingModel(run.base_model()), SamplingModel(bundle.router)], run.scheduler,
                                sample_shape=run.sample_shape, sampler="ddim", steps=steps, batch=64, repeats=3,
                                num_classes=run.data.num_classes)
        print(json.dumps({
            "kind": kind,
            "flops_error": [f"{s['flops'] / s['budget'] - 1:+.2%}" for s in summaries],
            "flops_ratio": [round(s["flops_ratio"], 3) for s in summaries],
            "sampling_flops_ratio": round(bundle.router.trajectory_flops(trajectory)
                                          / (bundle.manifest["base_flops"] * len(trajectory)), 3),
            "sampling_time_ratio_b64": round(seconds[1] / seconds[0], 3),
            "base_s": round(seconds[0], 3), "bundle_s": round(seconds[1], 3),
        }), flush=True)


if __name__ == "__main__":
    main()
