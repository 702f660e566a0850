"""Importance criteria: which channels and which attention heads pruning removes first (higher scores stay).

Small pluggable parts in the manner of Torch-Pruning's `tp.importance.Importance` (an ABC whose
`__call__(group)` gives one score per channel of a dependency group): an `Importance` here scores a
torch-pruning group's channels, mostly by delegating to torch-pruning's own criteria, and also an attention
group's heads, which torch-pruning does not see (prune/plan.py finds them). A criterion is chosen by name only
in the registry IMPORTANCES; any other name is an error naming the registered ones. `BY_POSITION` is not in the
registry: it is for FLOPs and latency trials, where only how many channels go matters, not which.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from ..schedule import training_target
from .graph import full_forward
from .plan import PlanGroup


@dataclass
class Calibration:
    """The batch that Taylor importance differentiates the denoising loss on.

    images: clean images (N, C, H, W) in [-1, 1]. scheduler: the training noise schedule (DDPMScheduler).
    timesteps: 1-D LongTensor of the timesteps to draw t from (e.g. one group's). seed: for t and noise.
    """

    images: torch.Tensor
    scheduler: object
    timesteps: torch.Tensor
    seed: int = 0


class Importance(abc.ABC):
    """One criterion. `needs_calibration`: pruning with it needs a Calibration batch."""

    needs_calibration: bool = False

    def prepare(self, net: nn.Module, calibration: Calibration | None) -> None:
        """Called once on the unpruned network before anything is ranked (Taylor: the gradients it reads)."""

    @abc.abstractmethod
    def __call__(self, group) -> torch.Tensor:
        """One score per channel of a torch-pruning group (the channels of its root layer), shape (channels,)."""

    @abc.abstractmethod
    def heads(self, net: nn.Module, group: PlanGroup) -> torch.Tensor:
        """One score per head of an attention group, shape (group.slots,)."""


class ByPosition(Importance):
    """The first channels (and heads) stay: the last ones score lowest."""

    def __call__(self, group) -> torch.Tensor:
        return torch.arange(len(group[0].idxs), 0, -1, dtype=torch.float32)

    def heads(self, net: nn.Module, group: PlanGroup) -> torch.Tensor:
        return torch.arange(group.slots, 0, -1, dtype=torch.float32)


BY_POSITION = ByPosition()


class _WeightImportance(Importance):
    """Channels scored by a torch-pruning criterion (by position where it scores nothing); a head by the summed
    per-weight scores of its rows in the q/k/v projections and its columns in the layer reading its output."""

    def __init__(self, channels: tp.importance.Importance):
        self.channels = channels

    @abc.abstractmethod
    def weight_scores(self, layer: nn.Module) -> torch.Tensor:
        """One score per entry of layer.weight (same shape)."""

    def __call__(self, group) -> torch.Tensor:
        scores = self.channels(group)
        return BY_POSITION(group) if scores is None else scores

    def heads(self, net: nn.Module, group: PlanGroup) -> torch.Tensor:
        into = self.weight_scores(net.get_submodule(group.heads_into)).movedim(1, 0).flatten(1).sum(1)
        total = into.view(group.slots, -1).sum(1)
        for name, heads in group.head_channels:
            rows = self.weight_scores(net.get_submodule(name)).flatten(1).sum(1)
            total = total + torch.stack([rows[list(head)].sum() for head in heads])
        return total


class Magnitude(_WeightImportance):
    """L2 norm of each channel's weights (torch-pruning's GroupMagnitudeImportance, p=2); squared weights
    for heads."""

    def __init__(self):
        super().__init__(tp.importance.GroupMagnitudeImportance(p=2))

    def weight_scores(self, layer: nn.Module) -> torch.Tensor:
        return layer.weight.detach().pow(2)


class Taylor(_WeightImportance):
    """First-order Taylor importance |weight x gradient| of the denoising loss on the calibration batch
    (torch-pruning's GroupTaylorImportance; Molchanov et al. 2019, "Importance Estimation for Neural Network
    Pruning"). A layer without a gradient is scored by its squared weights."""

    needs_calibration = True

    def __init__(self):
        super().__init__(tp.importance.GroupTaylorImportance())

    def prepare(self, net: nn.Module, calibration: Calibration | None) -> None:
        """Gradients of the denoising loss on the calibration batch, left in net's parameters' .grad."""
        param = next(net.parameters())
        x0 = calibration.images.to(param.device, param.dtype)
        gen = torch.Generator().manual_seed(calibration.seed)
        pool = torch.as_tensor(calibration.timesteps, dtype=torch.long)
        t = pool[torch.randint(len(pool), (len(x0),), generator=gen)].to(param.device)
        noise = torch.randn(x0.shape, generator=gen).to(param.device, param.dtype)
        x_t = calibration.scheduler.add_noise(x0, noise, t)
        net.zero_grad(set_to_none=True)
        F.mse_loss(full_forward(net, (x_t, t)), training_target(calibration.scheduler, x0, noise, t)).backward()

    def weight_scores(self, layer: nn.Module) -> torch.Tensor:
        w, grad = layer.weight.detach(), layer.weight.grad
        return (w * grad).abs() if grad is not None else w.pow(2)


# The registry: a criterion's name (SearchConfig.importance, --importance) is looked up here and nowhere else.
IMPORTANCES: dict[str, Importance] = {"magnitude": Magnitude(), "taylor": Taylor()}


def unknown_importance(name: object) -> str | None:
    """None when name is registered in IMPORTANCES, else the error message naming the registered ones."""
    if isinstance(name, str) and name in IMPORTANCES:
        return None
    return f"unknown importance {name!r}; choose one of {tuple(IMPORTANCES)}"


def get_importance(name: str) -> Importance:
    """The criterion registered as name. Raises ValueError for any other name, naming the registered ones."""
    if (message := unknown_importance(name)) is not None:
        raise ValueError(message)
    return IMPORTANCES[name]


def check_importance(name: str, calibration: Calibration | None) -> Importance:
    """get_importance(name), refused with ValueError when it needs a calibration batch and calibration is None."""
    importance = get_importance(name)
    if importance.needs_calibration and calibration is None:
        raise ValueError(f"importance={name!r} needs calibration=Calibration(images, scheduler, timesteps)")
    return importance
