"""Distillation from a teacher in stage 2: the feature points of a denoiser, the FeatureDistiller (FitNets) that
matches the student's block outputs to the teacher's, and which teacher forward a training step needs."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..models import as_denoiser
from .config import TrainConfig

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
        shapes_s = self._probe(student, self._modules_s, sample_shape)
        shapes_t = self._probe(teacher, self._modules_t, sample_shape)
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
            t = torch.full((1,), 500, dtype=torch.long, device=device)
            model(torch.zeros((1, *sample_shape), device=device), t)
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


def make_distiller(denoiser: nn.Module, teacher: nn.Module | None, sample_shape: tuple[int, int, int],
                   config: TrainConfig) -> tuple[FeatureDistiller | None, dict]:
    """(the FeatureDistiller to train with, None when feature distillation is off or no point matches;
    {"feature_points": the points used, "feature_points_skipped": the others})."""
    if teacher is None or config.feature_distill_weight == 0:
        return None, {"feature_points": [], "feature_points_skipped": []}
    distiller = FeatureDistiller(denoiser, teacher, sample_shape)
    return distiller if distiller.points else None, {"feature_points": distiller.points,
                                                     "feature_points_skipped": distiller.skipped}


def runs_teacher(teacher: nn.Module | None, config: TrainConfig, distiller: FeatureDistiller | None) -> bool:
    """Whether a step runs the teacher: for output distillation, or for features at some matching point."""
    return teacher is not None and (config.distill_weight > 0 or distiller is not None)
