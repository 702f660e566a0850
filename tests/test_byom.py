"""Bring your own model: denoiser checks, learned variance, class conditioning and guidance, `run --base`."""

import math

import pytest
import torch
from torch import nn

from tdcdiff.models import NonFiniteDenoiser, check_finite
from tdcdiff.pipeline import SAMPLERS, sample
from tdcdiff.train import TrainConfig, TrainingDiverged, train

FAST = dict(batch_size=16, warmup_steps=1, checkpoint_every=100, log_every=1)


class LogTimeNet(nn.Module):
    """A tiny denoiser whose time embedding is log(t): -inf at t=0, as Fourier embeddings fed integer t can be."""

    def __init__(self, channels: int = 1, out_channels: int | None = None, nan_when_training: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)
        self.embed = nn.Linear(1, out_channels or channels)
        self.nan_when_training = nan_when_training

    def forward(self, x, t):
        emb = self.embed(torch.log(t.float()).view(-1, 1) if not self.nan_when_training else (t.float() / 1000).view(-1, 1))
        out = self.conv(x) + emb[:, :, None, None]
        return out * float("nan") if self.nan_when_training and self.training else out


def test_log_time_embedding_is_named_before_training(tmp_path, digits, scheduler):
    torch.manual_seed(0)
    with pytest.raises(NonFiniteDenoiser, match=r"not finite at t=0: a time embedding such as log\(t\) fails at t=0"):
        train(LogTimeNet(), digits.images, scheduler, TrainConfig(steps=2, **FAST), tmp_path, progress=False)
    assert not (tmp_path / "checkpoint").exists()


def test_non_finite_from_the_start_does_not_blame_the_learning_rate(tmp_path, digits, scheduler):
    torch.manual_seed(0)
    model = LogTimeNet(nan_when_training=True)
    check_finite(model, digits.images, scheduler.alphas_cumprod)  # finite in eval mode: the check passes
    with pytest.raises(TrainingDiverged, match="before any update of this run.*not a learning-rate problem") as err:
        train(model, digits.images, scheduler, TrainConfig(steps=2, **FAST), tmp_path, progress=False)
    assert "learning rate or" not in str(err.value)
