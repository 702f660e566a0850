"""Kind "single": the base fine-tuned on all timesteps with the candidates' compute, the equal-compute
reference; and the training every one-model candidate gets (train_one_model)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ...bundle import save_bundle
from ...flops import count_flops
from ...grouping import make_groups
from ...serialization import load_model
from ...train import FINAL_DIR, step_flops, train
from ..records import clock, since
from .kind import FIRST, Kind


class Single(Kind):
    name = "single"
    style = ("tab:gray", "s")

    def candidates(self, config) -> list[tuple[tuple, dict]]:
        return [(FIRST, {"name": "single"})]

    def train(self, tune, spec: dict, out: Path) -> dict:
        return train_one_model(tune, spec, out, tune.base_run.base_model())


def train_one_model(tune, spec: dict, out: Path, model, search: dict | None = None, extra: dict | None = None) -> dict:
    """`model` trained on all timesteps for the candidates' compute (tune.training_flops_per_candidate(), at the
    run's stage-2 settings), saved in out/train and bundled in out/bundle as a one-group router.

    search: the record of the phase that made `model` (None: none did). extra: more items for the record.
    Returns the candidate's record (Kind.train)."""
    run, i = tune.base_run, spec["index"]
    shape, base_flops = run.sample_shape, tune.base_flops()
    flops = count_flops(model, shape)
    c = run.config
    config = c.finetune.plain(seed=c.seed * 100, label_dropout=c.finetune.label_dropout or c.base.label_dropout,
                              null_class=run.null_class(model))
    steps = max(1, round(tune.training_flops_per_candidate() / step_flops(model, shape, config)))
    config = replace(config, steps=steps)
    tune.say(f"[{i}] {spec['name']}: stage 2, {steps} steps on all timesteps ({flops / base_flops:.0%} FLOPs)")
    start = clock()
    trained = train(model, run.split()[0], run.scheduler, config, out / "train", labels=run.labels(model)[0],
                    progress=tune.progress, description=f"tune {spec['name']}", data_range=run.data_range)
    stage2 = since(start, trained.train_flops)
    expert = load_model(out / "train" / FINAL_DIR)
    grouping = make_groups("uniform", 1, run.scheduler)
    save_bundle(out / "bundle", [expert], grouping, run.scheduler, sample_shape=shape, expert_flops=[flops],
                base_flops=base_flops, expert_training=[{"steps": steps, "final_loss": trained.final_loss}],
                provenance={"tune": spec, "data": run.data.describe(), "training_flops": trained.train_flops},
                conditioning=run.conditioning(expert))
    return {"bundle": "bundle", "train_flops": trained.train_flops, "steps": steps, **(extra or {}),
            "phases": {"search": search, "stage2": stage2}}
