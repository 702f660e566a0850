"""One training loop for both TDC stages (base model on all t; group models on their own t), on accelerate.

`Trainer` is a class of small steps in the manner of improved-diffusion's TrainLoop (openai/improved-diffusion,
improved_diffusion/train_util.py): `run` checks for a finished run, then `setup`, `resume` and `prepare`;
`run_loop` calls `run_step` (forward_backward, optimize, log_step, save) once per step, then `finish`.
Every step draws its batch, timesteps and noise from a generator seeded by (seed, step, process) (batch.py), so a
run resumed from a checkpoint continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ..capacity import check_training_memory
from ..devices import check_holds_data
from ..files import output_path
from ..models import as_denoiser, check_denoiser, check_finite, check_sample_size, num_class_embeds, torch_device
from ..progress import progress_bar
from ..samplers import check_train_scheduler
from ..schedule import check_given_schedule, training_target
from ..settings import is_real
from ..user_warnings import called_by_user, warn
from .batch import Batch, TrainingBatches, conditioning
from .checkpoint import (
    CHECKPOINT_DIR,
    LOG_FILE,
    check_outputs,
    fingerprint,
    finished_summary,
    load_checkpoint,
    load_final,
    save_checkpoint,
    save_final,
)
from .config import TrainConfig, TrainingDiverged, TrainResult
from .cost import FLOPS_CONVENTION, training_flops
from .distill import make_distiller, runs_teacher
from .log import TrainingLog, truncate_log


def _checked_timesteps(timesteps: torch.Tensor | None, num_train: int) -> torch.Tensor:
    """The timesteps to train on as a flat int64 tensor (all T when None); ValueError unless integers (not bools,
    not floats: truncating 5.5 would train at another noise level than asked) forming a subset of 0..T-1."""
    if timesteps is None:
        return torch.arange(num_train)
    given = torch.as_tensor(timesteps).flatten()
    if given.dtype == torch.bool or given.is_floating_point() or given.is_complex():
        raise ValueError(f"timesteps must be integers 0..{num_train - 1} (an integer tensor or a list of ints), got "
                         f"{given.dtype} values {given[:3].tolist()}: diffusion timesteps are the integer training "
                         "timesteps")
    if given.numel() == 0 or given.min() < 0 or given.max() >= num_train:
        raise ValueError(f"timesteps must be a non-empty subset of 0..{num_train - 1}")
    return given.long()


def _checked_out_dir(out_dir: str | Path) -> Path:
    """out_dir as a Path after files.output_path's checks (not empty: "" was the current folder; creatable,
    writable; not a dangling link or a loop), and, since the run makes files inside it, not a file."""
    path = output_path(out_dir, directory=True, option="out_dir")
    if path.exists() and not path.is_dir():
        raise ValueError(f"out_dir {path} is a file, not a folder; choose another out_dir")
    return path


_RANGE_SLACK = 1e-3  # what resizing and float rounding may leave past [-1, 1]


def _check_images(images: torch.Tensor, data_range: tuple[float, float] | None) -> None:
    """Raise ValueError for training images train() cannot use as given: not a non-empty NCHW float tensor
    (uint8 pixels would be learned as 0..255), NaN/inf, or values outside data_range (with a slack for resizing;
    None: a VAE's zero-centred latents, in no fixed range). Warn (UserWarning) when images that should reach down
    to -1 are all >= 0: [0, 1] images (torchvision's ToTensor) train, but on the wrong range."""
    if data_range is not None and not (isinstance(data_range, (tuple, list)) and len(data_range) == 2
                                       and all(is_real(v) and math.isfinite(v) for v in data_range)
                                       and data_range[0] < data_range[1]):
        raise ValueError(f"data_range must be (low, high), two finite numbers with low < high (e.g. (-1, 1)), or None "
                         f"for a VAE's latents, got {data_range!r}")
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or len(images) == 0:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"training images must be a non-empty NCHW tensor, got {shape}")
    lo, hi = data_range if data_range is not None else (-1.0, 1.0)  # the pixels' usual range, for the fixes
    if not images.is_floating_point():
        raise ValueError(f"training images must be floating point in [{lo:g}, {hi:g}], got {images.dtype}; scale to "
                         f"[{lo:g}, {hi:g}]: {_scaling(255, lo, hi)}")
    finite = torch.isfinite(images).flatten(1).all(dim=1)
    if not finite.all():
        raise ValueError(f"{int((~finite).sum())} of the {len(images)} training images hold NaN/inf; fix or drop them")
    low, high = float(images.min()), float(images.max())
    if data_range is None:
        return
    if low < lo - _RANGE_SLACK or high > hi + _RANGE_SLACK:
        pixels = _scaling(255, lo, hi)
        fix = f"{pixels} (pixels 0..255)" if low >= -_RANGE_SLACK else f"{pixels} for pixels 0..255"
        raise ValueError(f"training images must be in [{lo:g}, {hi:g}], got values {low:.4g}..{high:.4g}; scale to "
                         f"[{lo:g}, {hi:g}]: {fix}, or pass data_range=None for a VAE's latents (no fixed range)")
    if lo < 0 <= low:
        warn(f"training images are all >= 0 (values {low:.4g}..{high:.4g}): they look like [0, 1] "
             f"(torchvision's ToTensor), not [{lo:g}, {hi:g}]; scale with {_scaling(1, lo, hi)}")


def _scaling(top: float, lo: float, hi: float) -> str:
    """The formula that maps x in [0, top] onto [lo, hi]: "x / 127.5 - 1" for 0..255 onto [-1, 1], "x / 255" onto
    [0, 1], "x * 2 - 1" for [0, 1] onto [-1, 1]."""
    factor = (hi - lo) / top
    term = "x" if factor == 1 else f"x * {factor:g}" if factor > 1 else f"x / {1 / factor:g}"
    return term + (f" + {lo:g}" if lo > 0 else f" - {-lo:g}" if lo < 0 else "")


def _check_weights(model: nn.Module) -> None:
    """Refuse half-precision weights: float16 weights overflow and lose small updates, which reads as a diverged
    learning rate several steps in; mixed precision keeps float32 master weights instead."""
    half = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()
                   if p.dtype in (torch.float16, torch.bfloat16)})
    if half:
        raise ValueError(f"the model's weights are {', '.join(half)}: training needs float32 weights; keep fp32 "
                         "weights (model.float()) and use mixed_precision 'fp16' or 'bf16' (TrainConfig) for speed")


class Trainer:
    """One call of `train` (see there for the arguments). The constructor checks the settings and inputs, raising
    ValueError naming the problem before anything is written; `run` trains and returns the TrainResult.

    After `prepare`, `ddp_denoiser` is the denoiser as accelerate prepared it (DDP-wrapped with several processes),
    `denoiser` the plain one, and `project` the feature projections likewise.
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, scheduler, config: TrainConfig, out_dir: str | Path, *,
                 labels: torch.Tensor | None = None, null_text: torch.Tensor | None = None,
                 timesteps: torch.Tensor | None = None, teacher: nn.Module | None = None, resume: bool = True,
                 progress: bool = True, description: str = "train", device: str | None = None,
                 data_range: tuple[float, float] | None = (-1.0, 1.0)):
        config.validate()
        self.device = None if device is None else torch_device(device)
        self.config, self.scheduler, self.out_dir = config, scheduler, _checked_out_dir(out_dir)
        self.resume_allowed, self.progress, self.description = resume, progress, description
        self.num_train = scheduler.config.num_train_timesteps
        check_holds_data({"training images": images, "labels": labels, "null_text": null_text, "timesteps": timesteps},
                         "give them on the CPU or the training device (each batch is moved there)")
        self.timesteps = _checked_timesteps(timesteps, self.num_train)
        _check_images(images, data_range)
        _check_weights(model)
        if teacher is None and config.uses_teacher:
            raise ValueError("distill_weight and feature_distill_weight > 0 need a teacher model (stage 2: the base)")
        sample_shape = tuple(images.shape[1:])
        check_denoiser(model, sample_shape)
        check_sample_size(model, sample_shape, source="data")
        # The run's up-front estimate (Stages), here too: torch's allocator error would come after log.jsonl.
        check_training_memory(model, sample_shape, config.batch_size, what=f"with batch_size {config.batch_size}",
                              fix="give a smaller batch_size (TrainConfig.batch_size)",
                              class_labels=num_class_embeds(model) is not None)
        self.labels, self.null = conditioning(model, labels, len(images), config, null_text)
        self.null_class = self.null if isinstance(self.null, int) else None  # what train.json records
        check_finite(model, images, scheduler.alphas_cumprod, self.labels)
        self.images, self.teacher, self.denoiser = images, teacher, as_denoiser(model)
        # Building the projections draws their initial weights from torch's global generator: keep this order.
        self.distiller, self.features = make_distiller(self.denoiser, teacher, sample_shape, config)
        self.flops_per_step, self.flops_forward = training_flops(self.denoiser, sample_shape, config, teacher,
                                                                 self.distiller)
        self.runs_teacher = runs_teacher(teacher, config, self.distiller)
        self.fingerprint = fingerprint(config, self.timesteps, len(images), teacher is not None, self.denoiser)

    def run(self) -> TrainResult:
        """Train from scratch or from the checkpoint up to config.steps; a run already finished in out_dir with
        the same fingerprint returns at once, its final weights loaded into the model."""
        if self.resume_allowed and (done := self.finished()) is not None:
            return done
        check_outputs(self.out_dir)
        self.setup()
        self.resume()
        self.prepare()
        return self.run_loop()

    def finished(self) -> TrainResult | None:
        """The result of this run when out_dir holds it finished (its final weights then go into the model)."""
        done = finished_summary(self.out_dir, self.fingerprint)
        if done is None:
            return None
        load_final(self.out_dir, self.denoiser.model)
        steps = self.config.steps
        return TrainResult(self.out_dir, steps, done["final_loss"], self.flops_per_step, done["train_flops"], steps,
                           {"null_class": done.get("null_class"), **self.features})

    def setup(self) -> None:
        """Start accelerate; build the optimizer (AdamW over the model and the feature projections) and the EMA."""
        from accelerate import Accelerator
        from diffusers.training_utils import EMAModel

        c = self.config
        if c.warmup_steps >= c.steps:  # allowed (a deliberate ramp), but rarely what was meant
            # the last step's rate is lr * steps / warmup_steps (TrainConfig.lr_at): the peak only when they are equal
            reach = (f"reaches lr {c.lr:g} only at its last step" if c.warmup_steps == c.steps else
                     f"never reaches lr {c.lr:g} (it ends at {c.lr * c.steps / c.warmup_steps:.3g})")
            warn(f"training {self.out_dir}: warmup_steps {c.warmup_steps} is not below its {c.steps} steps, so the "
                 f"learning rate rises for the whole run and {reach}; lower warmup_steps or train for more steps")
        self.accelerator = Accelerator(**accelerator_device(self.device), mixed_precision=c.mixed_precision)
        world = self.accelerator.num_processes
        if c.batch_size % world:
            raise ValueError(f"batch_size {c.batch_size} is not divisible by the {world} training processes")
        self.trained_params = [*self.denoiser.parameters(), *(self.distiller.parameters() if self.distiller else ())]
        self.optimizer = torch.optim.AdamW(self.trained_params, lr=c.lr, weight_decay=c.weight_decay)
        self.ema = EMAModel(self.denoiser.parameters(), decay=c.ema_decay) if c.ema_decay else None

    def resume(self) -> None:
        """Restore out_dir/checkpoint when resuming and there is one (else start at step 0), and drop the log
        lines a crashed run wrote after it."""
        self.start, self.loss_value = 0, float("nan")
        if self.resume_allowed and (self.out_dir / CHECKPOINT_DIR).exists():
            self.start, self.loss_value = load_checkpoint(self.out_dir, self.fingerprint, self.denoiser, self.optimizer,
                                                          self.ema, self.distiller)
        self.last_checkpoint = self.start
        if self.accelerator.is_main_process:
            truncate_log(self.out_dir / LOG_FILE, self.start)

    def prepare(self) -> None:
        """Hand the model, optimizer and projections to accelerate; move the rest to its device; open the log."""
        accelerator, c = self.accelerator, self.config
        device, main = accelerator.device, accelerator.is_main_process
        self.ddp_denoiser, self.optimizer = accelerator.prepare(self.denoiser, self.optimizer)
        # The projections' loss goes through the prepared (DDP) wrapper, so their gradients sync across processes.
        self.project = accelerator.prepare(self.distiller) if self.distiller is not None else None
        if self.ema is not None:
            self.ema.to(device)
        if self.teacher is not None:
            self.teacher = as_denoiser(self.teacher).to(device).eval()  # runs under no_grad: its weights stay as given
        self.batches = TrainingBatches(self.images, self.labels, self.null, self.timesteps, self.num_train, c,
                                       c.batch_size // accelerator.num_processes, accelerator.process_index, device)
        self.alphas = self.scheduler.alphas_cumprod.to(device)
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.log = TrainingLog(self.out_dir / LOG_FILE if main else None, self.num_train)
        self.bar = progress_bar(total=c.steps, initial=self.start, desc=self.description,
                                enabled=self.progress and main)

    def run_loop(self) -> TrainResult:
        """Run the steps from `start` to config.steps, then `finish`."""
        self.ddp_denoiser.train()
        try:
            for step in range(self.start, self.config.steps):
                self.run_step(step)
        finally:
            self.bar.close()
            self.log.close()
        return self.finish()

    def run_step(self, step: int) -> None:
        """Step `step` (0-based): draw, forward and backward, update, log, and checkpoint when due."""
        batch = self.batches.draw(step)
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr_at(step)
        per_sample = self.forward_backward(step, batch)
        self.optimize()
        done = step + 1
        self.log_step(done, batch.t, per_sample)
        if done % self.config.checkpoint_every == 0 or done == self.config.steps:
            self.save(done)

    def forward_backward(self, step: int, batch: Batch) -> torch.Tensor:
        """The loss of `batch` (mean over the processes in `loss_value`), checked finite, and its gradients.
        Returns the per-sample data loss (B,). Raises TrainingDiverged when the loss is NaN or inf."""
        loss, per_sample, prediction = self.losses(batch)
        self.loss_value = self.accelerator.reduce(loss.detach(), reduction="mean").item()
        if not math.isfinite(self.loss_value):
            raise self._diverged(step, prediction)
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        return per_sample

    def losses(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the loss to minimise, the per-sample data loss (B,), the model's prediction (B, C, H, W)).

        The data loss is the MSE to the schedule's training target (epsilon, v or x0); with a teacher, output
        distillation mixes in the MSE to its output and feature distillation adds the FeatureDistiller's loss (its
        mean over the processes goes to `feature_loss_value`, None without one).
        """
        c = self.config
        a = self.alphas[batch.t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * batch.x0 + (1 - a).sqrt() * batch.noise
        capture = self.distiller.capture() if self.distiller else nullcontext((None, None))
        with capture as (student_features, teacher_features):
            with self.accelerator.autocast():
                prediction = self.ddp_denoiser(x_t, batch.t, batch.y).float()
            if self.runs_teacher:
                with torch.no_grad():
                    target = self.teacher(x_t, batch.t, batch.y).float()
        target_data = training_target(self.scheduler, batch.x0, batch.noise, batch.t)
        per_sample = (prediction - target_data).pow(2).mean(dim=(1, 2, 3))
        loss = per_sample.mean()
        if c.distill_weight > 0:
            loss = (1 - c.distill_weight) * loss + c.distill_weight * (prediction - target).pow(2).mean()
        self.feature_loss_value = None
        if self.distiller is not None:
            feature_loss = self.project(student_features, teacher_features)
            loss = loss + c.feature_distill_weight * feature_loss
            self.feature_loss_value = self.accelerator.reduce(feature_loss.detach(), reduction="mean").item()
        return loss, per_sample, prediction

    def _diverged(self, step: int, prediction: torch.Tensor) -> TrainingDiverged:
        if step == self.start and not torch.isfinite(prediction).all():
            return TrainingDiverged(
                f"the model's output is not finite at step {step + 1}, before any update of this run: the model "
                "itself produces NaN/inf on this batch (not a learning-rate problem); check its forward pass"
            )
        return TrainingDiverged(
            f"loss became {self.loss_value} at step {step + 1}; the last good checkpoint is kept in "
            f"{self.out_dir / CHECKPOINT_DIR} (step {self.last_checkpoint}). "
            "Lower the learning rate or enable grad_clip, then rerun"
        )

    def optimize(self) -> None:
        """Clip the gradients (config.grad_clip), step the optimizer, update the EMA."""
        if self.config.grad_clip:
            self.accelerator.clip_grad_norm_(self.trained_params, self.config.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.step(self.ddp_denoiser.parameters())

    def log_step(self, done: int, t: torch.Tensor, per_sample: torch.Tensor) -> None:
        """Add the step to the log window and the progress bar; write the window every log_every steps."""
        self.log.add(self.loss_value, t, per_sample, self.feature_loss_value)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{self.loss_value:.4f}")
        if done % self.config.log_every == 0 or done == self.config.steps:
            self.log.write(done, self.optimizer.param_groups[0]["lr"])

    def save(self, done: int) -> None:
        """Write the checkpoint after `done` steps (the main process writes; all wait for it first)."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            save_checkpoint(self.out_dir, done, self.loss_value, self.fingerprint,
                            self.accelerator.unwrap_model(self.ddp_denoiser), self.optimizer, self.ema, self.distiller)
        self.last_checkpoint = done

    def finish(self) -> TrainResult:
        """Put the EMA weights (when enabled) into the model; write final/ and train.json; return the result."""
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        trained = accelerator.unwrap_model(self.ddp_denoiser)
        if self.ema is not None:
            self.ema.copy_to(trained.parameters())
        trained.eval()
        train_flops = self.flops_per_step * self.config.steps
        if accelerator.is_main_process:
            save_final(self.out_dir, trained.model, self._summary(train_flops))
        accelerator.wait_for_everyone()
        return TrainResult(self.out_dir, self.config.steps, self.loss_value, self.flops_per_step, train_flops,
                           self.start, {"null_class": self.null_class, **self.features})

    def _summary(self, train_flops: int) -> dict:
        """What train.json holds."""
        return {
            "steps": self.config.steps,
            "fingerprint": self.fingerprint,
            "final_loss": self.loss_value,
            "flops_per_forward": self.flops_forward,
            "flops_per_step": self.flops_per_step,
            "train_flops": train_flops,
            "flops_convention": FLOPS_CONVENTION,
            "config": asdict(self.config),
            "num_timesteps": int(self.timesteps.numel()),
            "processes": self.accelerator.num_processes,
            "null_class": self.null_class,
            **self.features,
        }


def accelerator_device(device: str | None) -> dict:
    """accelerate.Accelerator's arguments for a device: {"cpu": True} for "cpu" (or None without a GPU), else the
    GPU. A single process on "cuda:N" makes GPU N the current one, which is where accelerate puts "cuda"; under
    `accelerate launch` each process keeps the GPU accelerate gives it."""
    if device is None:
        return {"cpu": not torch.cuda.is_available()}
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        torch.cuda.set_device(device)
    return {"cpu": device.type == "cpu"}


def train(
    model: nn.Module,
    images: torch.Tensor,
    scheduler,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    labels: torch.Tensor | None = None,
    null_text: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
    teacher: nn.Module | None = None,
    resume: bool = True,
    progress: bool = True,
    description: str = "train",
    device: str | None = None,
    data_range: tuple[float, float] | None = (-1.0, 1.0),
) -> TrainResult:
    """Train a denoiser with the standard diffusion loss and return what it cost.

    model: the denoiser (diffusers UNet2DModel, a pruned copy, or any `model(x, t)`); trained in place.
    images: training images, float NCHW in data_range, [-1, 1] by default (data_range=None: a VAE's zero-centred
        latents, in no fixed range); all >= 0 warns ([0, 1] images: x * 2 - 1). The model's weights float32
        (mixed_precision runs them in half precision).
    labels: the images' conditions (see `conditioning`): (N,) class ids for a class-conditional model (the null
        class used for label dropout is returned in TrainResult.extra["null_class"] and train.json), or (N, L, width)
        text embeddings for a text-conditional one.
    null_text: (L, width), the empty prompt's embedding: a text-conditional model's dropped captions
        (config.label_dropout > 0, classifier-free guidance's unconditional case).
    scheduler: the training noise schedule (diffusers DDPMScheduler); its prediction type sets the target. A
        scheduler without betas (flow matching, None) is refused (samplers.check_train_scheduler).
    config: TrainConfig.
    out_dir: where `checkpoint/`, `final/` (weights to use: EMA when enabled), `log.jsonl` and `train.json` go.
    timesteps: the timesteps to draw t from (stage 2: one group's); None means all T.
    teacher: a frozen denoiser to distil from (stage 2 option): its output, weighted by config.distill_weight,
        and its block outputs, weighted by config.feature_distill_weight (see FeatureDistiller; the points used
        and skipped are in TrainResult.extra["feature_points"] / ["feature_points_skipped"] and train.json).
    resume: continue from `out_dir/checkpoint` when it exists (and do nothing when `final/` is complete).
    progress: show a progress bar labelled `description` (main process only).
    device: "cpu", "cuda" or "cuda:N" (see accelerator_device); None: the GPU when there is one, else the CPU.

    Raises ValueError naming the problem before anything is written (bad settings, timesteps, images, labels, a
    batch_size whose training state and activations do not fit in memory (capacity.check_training_memory), a
    device that is not usable here, half-precision weights, a damaged or another run's checkpoint, a checkpoint/ or
    final/ folder holding anything but this run's earlier output), and TrainingDiverged when the loss becomes NaN
    or inf.
    A schedule no sampler can use is refused, and one that ends far from noise warned about, when the user's code
    passed it (schedule.check_given_schedule).
    """
    check_train_scheduler(scheduler, "scheduler")
    if called_by_user():  # a run's schedule was made or checked where it entered
        check_given_schedule(scheduler, "the scheduler given to train()")
    return Trainer(model, images, scheduler, config, out_dir, labels=labels, null_text=null_text, timesteps=timesteps,
                   teacher=teacher, resume=resume, progress=progress, description=description, device=device,
                   data_range=data_range).run()
