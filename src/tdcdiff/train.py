"""One training loop for both TDC stages (base model on all t; group models on their own t), on accelerate.

Every step draws its batch, timesteps and noise from a generator seeded by (seed, step, process), so a run
resumed from a checkpoint continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from .files import atomic_dir, atomic_write_text
from .flops import count_flops
from .models import as_denoiser, check_denoiser, check_finite, num_class_embeds
from .schedule import training_target
from .serialization import save_model

CHECKPOINT_DIR = "checkpoint"
FINAL_DIR = "final"
LOG_FILE = "log.jsonl"
SUMMARY_FILE = "train.json"
LOSS_BUCKETS = 10


class TrainingDiverged(RuntimeError, ValueError):
    """The loss became NaN or inf; the last good checkpoint is kept. A ValueError too: the fix is a setting."""


@dataclass
class TrainConfig:
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
        null class (classifier-free guidance needs it > 0, typically 0.1).
    null_class: the id of the null class (default: the model's last class id, num_class_embeds - 1).

    A model with a learned variance (2C output channels) is trained on its first C channels only (the
    prediction); its variance half gets no loss term (no VLB as in IDDPM).
    """

    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    lr_schedule: str = "cosine"
    ema_decay: float | None = 0.999
    grad_clip: float = 1.0
    mixed_precision: str = "no"
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 50
    mix_fraction: float = 0.0
    distill_weight: float = 0.0
    feature_distill_weight: float = 0.0
    label_dropout: float = 0.0
    null_class: int | None = None

    def validate(self) -> None:
        checks = [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (0 < self.lr < 1, f"lr (the peak learning rate) must be in (0, 1), got {self.lr} (typical: 1e-4 to 2e-3)"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (self.lr_schedule in ("cosine", "constant"), f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}"),
            (self.ema_decay is None or 0 < self.ema_decay < 1, f"ema_decay must be in (0, 1) or None, got {self.ema_decay}"),
            (self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}"),
            (self.mixed_precision in ("no", "fp16", "bf16"), f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}"),
            (self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (0 <= self.mix_fraction <= 1, f"mix_fraction must be in [0, 1], got {self.mix_fraction}"),
            (0 <= self.distill_weight <= 1, f"distill_weight must be in [0, 1], got {self.distill_weight}"),
            (0 <= self.feature_distill_weight <= 1,
             f"feature_distill_weight must be in [0, 1], got {self.feature_distill_weight} (typical: 0.1 to 0.5; 0: off)"),
            (0 <= self.label_dropout < 1, f"label_dropout must be in [0, 1), got {self.label_dropout}"),
            (self.null_class is None or self.null_class >= 0, f"null_class must be >= 0, got {self.null_class}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def uses_teacher(self) -> bool:
        """True when the settings ask for a teacher (output or feature distillation)."""
        return self.distill_weight > 0 or self.feature_distill_weight > 0

    def plain(self, **changes) -> "TrainConfig":
        """These settings with every stage-2 option off (no timestep mix, no output or feature distillation),
        as for a model trained on all timesteps without a teacher; `changes` as for dataclasses.replace."""
        return replace(self, mix_fraction=0.0, distill_weight=0.0, feature_distill_weight=0.0, **changes)


@dataclass
class TrainResult:
    """What a finished run left behind and what it cost."""

    out_dir: Path
    steps: int
    final_loss: float
    flops_per_step: int
    train_flops: int
    resumed_from: int = 0
    extra: dict = field(default_factory=dict)


FEATURE_POINTS = ("down_blocks", "mid_block", "up_blocks", "input_blocks", "middle_block", "output_blocks", "blocks",
                  "transformer_blocks")


def feature_points(model: nn.Module) -> list[str]:
    """Qualified names, in `model`, of the modules whose outputs feature distillation matches: every block of the
    model's top-level down, mid and up paths (diffusers UNet2DModel down_blocks / mid_block / up_blocks, ADM
    input_blocks / middle_block / output_blocks) and of a transformer's block stack (blocks, transformer_blocks)."""
    names = []
    for name, child in model.named_children():
        if name in FEATURE_POINTS:
            names += [f"{name}.{i}" for i in range(len(child))] if isinstance(child, nn.ModuleList) else [name]
    return names


def _feature(output) -> torch.Tensor | None:
    """A module output as a feature map: (N, C, H, W) or tokens (N, L, D); diffusers down blocks return a tuple
    (hidden states, skip tensors), whose first item it is. None for anything else."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    ok = isinstance(output, torch.Tensor) and output.ndim in (3, 4) and output.is_floating_point()
    return output if ok else None


def _same_positions(student: tuple | None, teacher: tuple | None) -> bool:
    """Both are feature maps of one kind with the same positions: H x W for (N, C, H, W), L for (N, L, D)."""
    if student is None or teacher is None or len(student) != len(teacher):
        return False
    return student[2:] == teacher[2:] if len(student) == 4 else student[1] == teacher[1]


class FeatureDistiller(nn.Module):
    """Feature distillation from a teacher (FitNets): learned projections from the student's block outputs to the
    teacher's, and the loss between them.

    student, teacher: denoisers (modules or Denoisers) whose blocks are found by `feature_points` under the same
    names. A point is used where both produce a feature map of the same kind and spatial size (N, C, H, W: same
    H x W; tokens N, L, D: same L) on a probe batch of one `sample_shape` sample; others (a block depth pruning
    removed, another resolution) are skipped and listed in `skipped`. Each used point gets a projection from the
    student's channels to the teacher's: a 1x1 convolution for maps, a linear layer on D for tokens (standard
    init). The projections are this module's only parameters: train them with the student, never save them in it.

    Use: `with distiller.capture() as (s, t):` run the student (with grad) and the teacher (no grad) once each;
    then `distiller(s, t)` is the mean over points of MSE(projection(student), teacher) / mean(teacher^2), so
    every point weighs alike whatever its scale. `flops` is the projections' training FLOPs per sample (forward +
    backward = 3 x forward, 2 x MACs).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, sample_shape: tuple[int, int, int]):
        super().__init__()
        student, teacher = as_denoiser(student), as_denoiser(teacher)
        # The wrapped modules (a Router or a plain function has no blocks to match: no points)
        inner_s, inner_t = (getattr(d, "model", None) for d in (student, teacher))
        modules_s, modules_t = (dict(m.named_modules()) if isinstance(m, nn.Module) else {} for m in (inner_s, inner_t))
        names = [n for n in feature_points(inner_t) if n in modules_s] if modules_t else []
        self._modules_s = [modules_s[n] for n in names]  # plain lists: not submodules of the distiller
        self._modules_t = [modules_t[n] for n in names]
        shapes_s, shapes_t = self._probe(student, self._modules_s, sample_shape), self._probe(teacher, self._modules_t, sample_shape)
        self.points, self.skipped, self.flops = [], [], 0
        projections, keep_s, keep_t = [], [], []
        for name, module_s, module_t, s, t in zip(names, self._modules_s, self._modules_t, shapes_s, shapes_t):
            if not _same_positions(s, t):
                self.skipped.append(name)
                continue
            if len(s) == 4:
                projections.append(nn.Conv2d(s[1], t[1], 1))
                self.flops += 3 * 2 * s[1] * t[1] * s[2] * s[3]
            else:
                projections.append(nn.Linear(s[2], t[2]))
                self.flops += 3 * 2 * s[2] * t[2] * s[1]
            self.points.append(name)
            keep_s.append(module_s)
            keep_t.append(module_t)
        self._modules_s, self._modules_t = keep_s, keep_t
        self.projections = nn.ModuleList(projections)
        param = next(student.parameters(), None)
        if param is not None:
            self.to(param.device)

    @staticmethod
    @torch.no_grad()
    def _probe(model: nn.Module, modules: list, sample_shape) -> list:
        shapes = [None] * len(modules)

        def hook(i):
            def record(module, args, output):
                feature = _feature(output)
                shapes[i] = None if feature is None else tuple(feature.shape)
            return record

        if not modules:
            return shapes
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
        was_training = model.training
        model.eval()  # no batch-norm statistics or dropout from a probe
        try:
            model(torch.zeros((1, *sample_shape), device=device), torch.full((1,), 500, dtype=torch.long, device=device))
        finally:
            model.train(was_training)
            for handle in handles:
                handle.remove()
        return shapes

    @contextmanager
    def capture(self):
        """Record the used points' outputs of the student and the teacher during the forward calls inside."""
        student, teacher = [None] * len(self.points), [None] * len(self.points)

        def hook(store, i):
            def record(module, args, output):
                store[i] = _feature(output)
            return record

        handles = [m.register_forward_hook(hook(student, i)) for i, m in enumerate(self._modules_s)]
        handles += [m.register_forward_hook(hook(teacher, i)) for i, m in enumerate(self._modules_t)]
        try:
            yield student, teacher
        finally:
            for handle in handles:
                handle.remove()

    def forward(self, student: list, teacher: list) -> torch.Tensor:
        losses = []
        for projection, s, t in zip(self.projections, student, teacher):
            t = t.detach().float()
            projected = projection(s.to(projection.weight.dtype)).float()
            losses.append((projected - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-8))
        return torch.stack(losses).mean()


@contextmanager
def _nothing():
    yield None, None


def step_flops(model: nn.Module, sample_shape: tuple[int, int, int], config: TrainConfig,
               teacher: nn.Module | None = None) -> int:
    """Training FLOPs (2 x MACs) of one step of `train` with these arguments: batch_size x (3 x the model's
    forward, + the teacher's forward when config distils, + the feature projections' forward and backward)."""
    return _step_flops(as_denoiser(model), sample_shape, config, teacher,
                       _distiller(as_denoiser(model), teacher, sample_shape, config)[0])[0]


def _distiller(denoiser, teacher, sample_shape, config: TrainConfig) -> tuple[FeatureDistiller | None, dict]:
    """(the FeatureDistiller to train with, None when off or no point matches; the points used and skipped)."""
    if teacher is None or config.feature_distill_weight == 0:
        return None, {"feature_points": [], "feature_points_skipped": []}
    distiller = FeatureDistiller(denoiser, teacher, sample_shape)
    return distiller if distiller.points else None, {"feature_points": distiller.points,
                                                     "feature_points_skipped": distiller.skipped}


def _runs_teacher(teacher, config: TrainConfig, distiller) -> bool:
    """Whether a step runs the teacher: for output distillation, or for features at some matching point."""
    return teacher is not None and (config.distill_weight > 0 or distiller is not None)


def _step_flops(denoiser, sample_shape, config: TrainConfig, teacher, distiller) -> tuple[int, int]:
    """(FLOPs per step, FLOPs of one forward of the model)."""
    forward = count_flops(denoiser, sample_shape)
    teacher_forward = count_flops(as_denoiser(teacher), sample_shape) if _runs_teacher(teacher, config, distiller) else 0
    # Forward + backward = 3 x forward; a teacher only runs forward.
    return config.batch_size * (3 * forward + teacher_forward + (distiller.flops if distiller else 0)), forward


def _lr_factor(config: TrainConfig, step: int) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _fingerprint(config: TrainConfig, timesteps: torch.Tensor, num_images: int, teacher: bool, model: nn.Module) -> str:
    """Identifies the run so a checkpoint is never resumed under different settings or for another architecture.

    `steps` is part of it: the learning-rate schedule depends on it, so a longer run is a different run.
    """
    # A setting added later is left out at its default, so runs made before it still resume.
    settings = {k: v for k, v in asdict(config).items()
                if k not in ("checkpoint_every", "log_every") and not (k == "feature_distill_weight" and v == 0)}
    settings.update(num_images=num_images, teacher=teacher, timesteps=hashlib.sha256(timesteps.numpy().tobytes()).hexdigest(),
                    shapes=[[name, list(p.shape)] for name, p in model.state_dict().items()])
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _flatten_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    # Stored as safetensors + JSON so that resuming never unpickles anything.
    tensors, scalars = {}, {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _save_checkpoint(out_dir: Path, step: int, loss: float, fingerprint: str, model, optimizer, ema, distiller) -> None:
    from safetensors.torch import save_file

    with atomic_dir(out_dir / CHECKPOINT_DIR) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        if distiller is not None:  # trained with the model, so a resumed run needs them; never in final/
            save_file({k: v.detach().cpu().contiguous() for k, v in distiller.state_dict().items()},
                      tmp / "projections.safetensors")
        opt_tensors, opt_meta = _flatten_optimizer_state(optimizer.state_dict())
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        meta = {"step": step, "loss": loss, "fingerprint": fingerprint, "optimizer": opt_meta}
        if ema is not None:
            save_file({str(i): p.detach().cpu().contiguous() for i, p in enumerate(ema.shadow_params)}, tmp / "ema.safetensors")
            meta["ema"] = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
        (tmp / "state.json").write_text(json.dumps(meta))


def _load_checkpoint(out_dir: Path, fingerprint: str, model, optimizer, ema, distiller) -> tuple[int, float]:
    """Restore a checkpoint; returns (step, loss). ValueError, naming the fix, when it is damaged or another run's."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    ckpt = out_dir / CHECKPOINT_DIR
    try:
        meta = json.loads((ckpt / "state.json").read_text())
        saved_fingerprint = meta["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as err:  # unreadable, not JSON, not the expected object
        raise ValueError(f"checkpoint {ckpt} is unreadable ({type(err).__name__}: {err}); delete {ckpt} to start "
                         "this stage over") from None
    if saved_fingerprint != fingerprint:
        raise ValueError(
            f"the checkpoint in {ckpt} was written with different training settings; "
            "use a new output directory, or delete it to start over"
        )
    try:
        model.load_state_dict(load_file(ckpt / "model.safetensors"))
        if distiller is not None:
            distiller.load_state_dict(load_file(ckpt / "projections.safetensors"))
        optimizer.load_state_dict(_unflatten_optimizer_state(load_file(ckpt / "optimizer.safetensors"), meta["optimizer"]))
        if ema is not None:
            shadow = load_file(ckpt / "ema.safetensors")
            ema.load_state_dict({**meta["ema"], "shadow_params": [shadow[str(i)] for i in range(len(shadow))]})
        return int(meta["step"]), float(meta["loss"])
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as err:
        reason = " ".join(str(err).split())  # load_state_dict's messages span lines
        raise ValueError(f"checkpoint {ckpt} is damaged ({type(err).__name__}: {reason}); delete {ckpt} to start "
                         "this stage over") from None


def _truncate_log(path: Path, last_step: int) -> None:
    """Drop log lines a crashed run wrote after its last checkpoint."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def conditioning(model: nn.Module, labels: torch.Tensor | None, num_images: int, config: TrainConfig,
                 ) -> tuple[torch.Tensor | None, int | None]:
    """(labels to train with, null class id) after checking the labels fit the model's class embedding.

    An unconditional model gets (None, None) whatever the labels. Raises ValueError naming both sides when a
    class-conditional model gets no labels, unlabeled images, or more classes than it embeds.
    """
    classes = num_class_embeds(model)
    if classes is None:
        if config.label_dropout > 0:
            raise ValueError("label_dropout > 0 needs a class-conditional model (e.g. UNet2DModel num_class_embeds)")
        return None, None
    if labels is None:
        raise ValueError(f"the model is class-conditional ({classes} class ids) but the data has no labels; "
                         "use labelled data (class subfolders, IDX labels) or an unconditional model")
    labels = torch.as_tensor(labels, dtype=torch.long).flatten()
    if len(labels) != num_images:
        raise ValueError(f"{len(labels)} labels for {num_images} images; give one label per image")
    null = None
    if config.label_dropout > 0:
        null = classes - 1 if config.null_class is None else config.null_class
        if not 0 <= null < classes:
            raise ValueError(f"null_class {null} is not one of the model's {classes} class ids (0..{classes - 1})")
    if labels.min() < 0:
        raise ValueError("some images have no label (-1) but the model is class-conditional; label every image")
    usable = classes - (null is not None and null == classes - 1)
    if labels.max() >= usable or (null is not None and bool((labels == null).any())):
        raise ValueError(
            f"the data has class labels 0..{labels.max().item()} but the model embeds {classes} class ids"
            + (f" with id {null} kept for dropped labels" if null is not None else "")
            + "; use a model with more class embeddings or data with fewer classes"
        )
    return labels, null


def train(
    model: nn.Module,
    images: torch.Tensor,
    scheduler,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    labels: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
    teacher: nn.Module | None = None,
    resume: bool = True,
    progress: bool = True,
    description: str = "train",
) -> TrainResult:
    """Train a denoiser with the standard diffusion loss and return what it cost.

    model: the denoiser (diffusers UNet2DModel, a pruned copy, or any `model(x, t)`); trained in place.
    images: training images, float NCHW in [-1, 1].
    labels: (N,) class ids of the images, used when the model is class-conditional (see `conditioning`);
        the null class used for label dropout is returned in TrainResult.extra["null_class"] and train.json.
    scheduler: the training noise schedule (diffusers DDPMScheduler); its prediction type sets the target.
    config: TrainConfig.
    out_dir: where `checkpoint/`, `final/` (weights to use: EMA when enabled), `log.jsonl` and `train.json` go.
    timesteps: the timesteps to draw t from (stage 2: one group's); None means all T.
    teacher: a frozen denoiser to distil from (stage 2 option): its output, weighted by config.distill_weight,
        and its block outputs, weighted by config.feature_distill_weight (see FeatureDistiller; the points used
        and skipped are in TrainResult.extra["feature_points"] / ["feature_points_skipped"] and train.json).
    resume: continue from `out_dir/checkpoint` when it exists (and do nothing when `final/` is complete).
    """
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    config.validate()
    out_dir = Path(out_dir)
    num_train = scheduler.config.num_train_timesteps
    all_t = torch.arange(num_train)
    timesteps = all_t if timesteps is None else torch.as_tensor(timesteps, dtype=torch.long).flatten()
    if timesteps.numel() == 0 or timesteps.min() < 0 or timesteps.max() >= num_train:
        raise ValueError(f"timesteps must be a non-empty subset of 0..{num_train - 1}")
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"training images must be a non-empty NCHW tensor, got shape {tuple(images.shape)}")
    if teacher is None and config.uses_teacher:
        raise ValueError("distill_weight and feature_distill_weight > 0 need a teacher model (stage 2: the base)")

    check_denoiser(model, tuple(images.shape[1:]))
    finite = torch.isfinite(images).flatten(1).all(dim=1)
    if not finite.all():
        raise ValueError(f"{int((~finite).sum())} of the {len(images)} training images hold NaN/inf; fix or drop them")
    labels, null_class = conditioning(model, labels, len(images), config)
    check_finite(model, images, scheduler.alphas_cumprod, labels)
    denoiser = as_denoiser(model)
    distiller, features = _distiller(denoiser, teacher, tuple(images.shape[1:]), config)
    flops_per_step, flops_forward = _step_flops(denoiser, tuple(images.shape[1:]), config, teacher, distiller)
    runs_teacher = _runs_teacher(teacher, config, distiller)
    fingerprint = _fingerprint(config, timesteps, len(images), teacher is not None, denoiser)

    summary_path = out_dir / SUMMARY_FILE
    if resume and (out_dir / FINAL_DIR).exists() and summary_path.exists():
        done = json.loads(summary_path.read_text())
        if done.get("fingerprint") == fingerprint:
            from .serialization import load_model

            as_denoiser(model).model.load_state_dict(load_model(out_dir / FINAL_DIR).state_dict())
            return TrainResult(out_dir, config.steps, done["final_loss"], flops_per_step, done["train_flops"], config.steps,
                               {"null_class": done.get("null_class"), **features})

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=config.mixed_precision)
    world, rank = accelerator.num_processes, accelerator.process_index
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the {world} training processes")
    local_batch = config.batch_size // world

    trained_params = [*denoiser.parameters(), *(distiller.parameters() if distiller else ())]
    optimizer = torch.optim.AdamW(trained_params, lr=config.lr, weight_decay=config.weight_decay)
    ema = EMAModel(denoiser.parameters(), decay=config.ema_decay) if config.ema_decay else None
    start, loss_value = 0, float("nan")
    if resume and (out_dir / CHECKPOINT_DIR).exists():
        start, loss_value = _load_checkpoint(out_dir, fingerprint, denoiser, optimizer, ema, distiller)
    if accelerator.is_main_process:
        _truncate_log(out_dir / LOG_FILE, start)  # a crashed run may have logged past its last checkpoint
    denoiser, optimizer = accelerator.prepare(denoiser, optimizer)
    # The projections' loss goes through the prepared (DDP) wrapper, so their gradients sync across processes.
    project = accelerator.prepare(distiller) if distiller is not None else None
    if ema is not None:
        ema.to(accelerator.device)
    if teacher is not None:
        teacher = as_denoiser(teacher).to(accelerator.device).eval()  # runs under no_grad: its weights stay as given

    device = accelerator.device
    data = images.to(device)
    data_labels = None if labels is None else labels.to(device)
    alphas = scheduler.alphas_cumprod.to(device)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
    log = open(out_dir / LOG_FILE, "a") if accelerator.is_main_process else None
    bar = tqdm(total=config.steps, initial=start, desc=description, disable=not (progress and accelerator.is_main_process))
    window_loss, window_features, window_buckets = [], [], [[] for _ in range(LOSS_BUCKETS)]

    last_checkpoint = start
    denoiser.train()
    for step in range(start, config.steps):
        g = torch.Generator().manual_seed(config.seed * 1_000_003 + step * 7919 + rank)
        torch.manual_seed(config.seed * 1_000_003 + step * 7919 + rank)  # dropout, if the model has any
        picked = torch.randint(len(data), (local_batch,), generator=g).to(device)
        x0 = data[picked]
        t = timesteps[torch.randint(len(timesteps), (local_batch,), generator=g)]
        if config.mix_fraction > 0 and len(timesteps) < num_train:
            outside = torch.rand(local_batch, generator=g) < config.mix_fraction
            t = torch.where(outside, torch.randint(num_train, (local_batch,), generator=g), t)
        t = t.to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        y = None if data_labels is None else data_labels[picked]
        if null_class is not None:
            dropped = (torch.rand(local_batch, generator=g) < config.label_dropout).to(device)
            y = torch.where(dropped, torch.full_like(y, null_class), y)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        for group in optimizer.param_groups:
            group["lr"] = config.lr * _lr_factor(config, step)

        with distiller.capture() if distiller else _nothing() as (student_features, teacher_features):
            with accelerator.autocast():
                prediction = denoiser(x_t, t, y).float()
            if runs_teacher:
                with torch.no_grad():
                    target = teacher(x_t, t, y).float()
        per_sample = (prediction - training_target(scheduler, x0, noise, t)).pow(2).mean(dim=(1, 2, 3))
        loss = per_sample.mean()
        if config.distill_weight > 0:
            loss = (1 - config.distill_weight) * loss + config.distill_weight * (prediction - target).pow(2).mean()
        if distiller is not None:
            feature_loss = project(student_features, teacher_features)
            loss = loss + config.feature_distill_weight * feature_loss
            window_features.append(accelerator.reduce(feature_loss.detach(), reduction="mean").item())

        loss_value = accelerator.reduce(loss.detach(), reduction="mean").item()
        if not math.isfinite(loss_value):
            bar.close()
            if log:
                log.close()
            if step == start and not torch.isfinite(prediction).all():
                raise TrainingDiverged(
                    f"the model's output is not finite at step {step + 1}, before any update of this run: the model "
                    "itself produces NaN/inf on this batch (not a learning-rate problem); check its forward pass"
                )
            raise TrainingDiverged(
                f"loss became {loss_value} at step {step + 1}; the last good checkpoint is kept in "
                f"{out_dir / CHECKPOINT_DIR} (step {last_checkpoint}). "
                "Lower the learning rate or enable grad_clip, then rerun"
            )
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if config.grad_clip:
            accelerator.clip_grad_norm_(trained_params, config.grad_clip)
        optimizer.step()
        if ema is not None:
            ema.step(denoiser.parameters())

        window_loss.append(loss_value)
        for bucket, value in zip((t * LOSS_BUCKETS // num_train).tolist(), per_sample.detach().tolist()):
            window_buckets[bucket].append(value)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        done = step + 1
        if log and (done % config.log_every == 0 or done == config.steps):
            record = {
                "step": done,
                "loss": sum(window_loss) / len(window_loss),
                "lr": optimizer.param_groups[0]["lr"],
                "loss_by_t_bucket": [sum(b) / len(b) if b else None for b in window_buckets],
                **({"feature_loss": sum(window_features) / len(window_features)} if window_features else {}),
            }
            log.write(json.dumps(record) + "\n")
            log.flush()
            window_loss, window_features, window_buckets = [], [], [[] for _ in range(LOSS_BUCKETS)]
        if done % config.checkpoint_every == 0 or done == config.steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                _save_checkpoint(out_dir, done, loss_value, fingerprint, accelerator.unwrap_model(denoiser), optimizer, ema,
                                 distiller)
            last_checkpoint = done
    bar.close()

    accelerator.wait_for_everyone()
    trained = accelerator.unwrap_model(denoiser)
    if ema is not None:
        ema.copy_to(trained.parameters())
    trained.eval()
    train_flops = flops_per_step * config.steps
    if accelerator.is_main_process:
        log.close()
        save_model(trained.model, out_dir / FINAL_DIR)
        atomic_write_text(
            summary_path,
            json.dumps(
                {
                    "steps": config.steps,
                    "fingerprint": fingerprint,
                    "final_loss": loss_value,
                    "flops_per_forward": flops_forward,
                    "flops_per_step": flops_per_step,
                    "train_flops": train_flops,
                    "flops_convention": "2 x multiply-accumulates; forward + backward = 3 x forward; a teacher's forward "
                                        "and feature projections included when distilling",
                    "config": asdict(config),
                    "num_timesteps": int(timesteps.numel()),
                    "processes": world,
                    "null_class": null_class,
                    **features,
                },
                indent=2,
            ),
        )
    accelerator.wait_for_everyone()
    return TrainResult(out_dir, config.steps, loss_value, flops_per_step, train_flops, start,
                       {"null_class": null_class, **features})
