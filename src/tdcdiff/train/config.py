"""The settings of one training run, what a finished run returns, and the error a diverged run raises."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..settings import SEED, Settings, at_least, between, one_of, setting

LR_SCHEDULES = ("cosine", "constant")
MIXED_PRECISIONS = ("no", "fp16", "bf16")  # accelerate's


class TrainingDiverged(RuntimeError, ValueError):
    """The loss became NaN or inf; the last good checkpoint is kept. A ValueError too: the fix is a setting."""


@dataclass
class TrainConfig(Settings):
    """Settings of one training run.

    steps: optimizer steps in total (a resumed run counts the steps already done).
    batch_size: images per step over all processes.
    lr: peak AdamW learning rate; warmup_steps of linear warm-up, then `lr_schedule` ("cosine" or "constant").
    ema_decay: decay of the exponential moving average of the weights (None: no EMA). The EMA weights are
        what `final/` holds when enabled.
    grad_clip: max gradient norm (0: no clipping).
    mixed_precision: "no", "fp16" or "bf16" (accelerate's setting).
    checkpoint_every: write a resumable checkpoint every N steps (and at the end).
    log_every: log mean loss (overall and per timestep bucket) every N steps.
    mix_fraction: with a timestep subset, this fraction of every batch draws t from ALL timesteps instead.
    distill_weight: with a teacher, loss = (1 - w) * data loss + w * MSE to the teacher's output.
    feature_distill_weight: with a teacher, add w x the feature-matching loss of a FeatureDistiller (the
        student's block outputs, through learned 1x1 projections, against the teacher's; FitNets-style). The
        projections are trained with the model and never saved with it.
    label_dropout: for a class-conditional model, the probability that an image's label is replaced by the
        null class; for a text-conditional one, that its caption is replaced by the empty prompt (caption dropout).
        Classifier-free guidance needs it > 0, typically 0.1.
    null_class: the id of the null class (default: the model's last class id, num_class_embeds - 1).

    A model with a learned variance (2C output channels) is trained on its first C channels only (the
    prediction); its variance half gets no loss term (no VLB as in IDDPM).
    """

    steps: int = setting(2000, rule=at_least(1))
    batch_size: int = setting(128, rule=at_least(1))
    lr: float = setting(1e-3, rule=between("(0, 1)", about="the peak learning rate", typical="typical: 1e-4 to 2e-3"))
    weight_decay: float = setting(0.0, rule=at_least(0))
    warmup_steps: int = setting(100, rule=at_least(0))
    lr_schedule: str = setting("cosine", rule=one_of(LR_SCHEDULES, what="lr_schedule"))
    ema_decay: float | None = setting(0.999, rule=between("(0, 1)", optional=True))
    grad_clip: float = setting(1.0, rule=at_least(0))
    mixed_precision: str = setting("no", rule=one_of(MIXED_PRECISIONS, what="mixed_precision"))
    seed: int = setting(0, rule=SEED)
    checkpoint_every: int = setting(500, rule=at_least(1))
    log_every: int = setting(50, rule=at_least(1))
    mix_fraction: float = setting(0.0, rule=between("[0, 1]"))
    distill_weight: float = setting(0.0, rule=between("[0, 1]"))
    feature_distill_weight: float = setting(0.0, rule=between("[0, 1]", typical="typical: 0.1 to 0.5; 0: off"))
    label_dropout: float = setting(0.0, rule=between("[0, 1)"))
    null_class: int | None = setting(None, rule=at_least(0))

    @property
    def uses_teacher(self) -> bool:
        """True when the settings ask for a teacher (output or feature distillation)."""
        return self.distill_weight > 0 or self.feature_distill_weight > 0

    def plain(self, **changes) -> "TrainConfig":
        """These settings with every stage-2 option off (no timestep mix, no output or feature distillation),
        as for a model trained on all timesteps without a teacher; `changes` as for dataclasses.replace."""
        return replace(self, mix_fraction=0.0, distill_weight=0.0, feature_distill_weight=0.0, **changes)

    def lr_at(self, step: int) -> float:
        """The learning rate of step `step` (0-based): linear warm-up over warmup_steps to `lr`, then constant
        or a half-cosine down to 0 at `steps` (SGDR, Loshchilov & Hutter 2017, without restarts)."""
        return self.lr * self._lr_factor(step)

    def _lr_factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant":
            return 1.0
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainResult:
    """What a finished run left behind and what it cost.

    out_dir: the run's directory (final/ holds the weights to use); steps: optimizer steps in total;
    final_loss: the loss of the last step; flops_per_step, train_flops: training FLOPs (2 x MACs) of one step and
    of all `steps` (see step_flops); resumed_from: the step this call started at (`steps` when final/ was already
    complete); extra: null_class, feature_points and feature_points_skipped (as in train.json).
    """

    out_dir: Path
    steps: int
    final_loss: float
    flops_per_step: int
    train_flops: int
    resumed_from: int = 0
    extra: dict = field(default_factory=dict)
