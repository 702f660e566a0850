"""Structural pruning: the decision space, budget fitting, importance criteria, error messages."""

import pytest
import torch
from torch import nn

from tdcdiff.flops import count_flops
from tdcdiff.models import Denoiser, as_denoiser, build_unet
from tdcdiff.prune.engine import prune
from tdcdiff.prune.fit import BudgetError, fit_to_budget
from tdcdiff.prune.importance import Calibration
from tdcdiff.prune.units import prunable_units, uniform_decision
from tdcdiff.schedule import make_scheduler

DIGITS = (1, 8, 8)


class TimeBlock(nn.Module):
    """conv -> + time embedding -> GroupNorm -> SiLU."""

    def __init__(self, cin: int, cout: int, tdim: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(tdim, cout)
        self.norm = nn.GroupNorm(4, cout)
        self.act = nn.SiLU()

    def forward(self, h, emb):
        return self.act(self.norm(self.conv(h) + self.temb(emb)[:, :, None, None]))


class TinyTimeNet(nn.Module):
    """A user's own denoiser called as model(x, t); test_serialization saves and loads it too."""

    def __init__(self, channels: int = 1, width: int = 16):
        super().__init__()
        self.tdcdiff_init_kwargs = {"channels": channels, "width": width}
        self.time_embedding = nn.Sequential(nn.Linear(1, 2 * width), nn.SiLU())
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        self.block1 = TimeBlock(width, 2 * width, 2 * width)
        self.block2 = TimeBlock(2 * width, width, 2 * width)
        self.head = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x, t):
        emb = self.time_embedding(t.float()[:, None] / 1000)
        return self.head(self.block2(self.block1(self.stem(x), emb), emb))


MODELS = {
    "unet": lambda: build_unet("digits-8"),
    "wrapped-unet-attention": lambda: Denoiser(build_unet("digits-8", attention=True)),
    "user-net": TinyTimeNet,
}


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def make(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[kind]().eval()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def predict(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return as_denoiser(model)(x, t)


def test_prunable_units_names():
    unet = build_unet("digits-8")
    units = prunable_units(unet)
    assert [u.name for u in units] == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
    layers = {m for u in units for m in u.modules}
    assert "down_blocks.0.resnets.0.conv1" in layers
    assert not any(m.startswith(("conv_out", "time_embedding", "conv_in")) for m in layers)
    assert [u.name for u in prunable_units(Denoiser(unet))] == [u.name for u in units]
    # A user's net: top-level children; the time embedding and the output layer are never pruned.
    assert [u.name for u in prunable_units(TinyTimeNet())] == ["stem", "block1", "block2"]
    assert uniform_decision(units, 0.25) == dict.fromkeys([u.name for u in units], 0.25)


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("fraction", [0.5, 0.75])
def test_fit_to_budget(kind, fraction):
    base = make(kind)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    base_flops = count_flops(base, DIGITS)
    budget = int(fraction * base_flops)

    result = fit_to_budget(base, {}, budget, DIGITS)

    assert abs(result.flops - budget) <= 0.03 * budget, (result.flops / base_flops, result.decision)
    assert count_flops(result.model, DIGITS) == result.flops
    assert type(result.model) is type(base)
    assert n_params(result.model) < n_params(base)
    x, t = torch.randn(3, *DIGITS), torch.tensor([0, 500, 999])
    assert predict(result.model, x, t).shape == x.shape
    # The base is untouched.
    assert count_flops(base, DIGITS) == base_flops
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    # The reported decision reproduces the model.
    again = prune(base, result.decision, DIGITS)
    assert n_params(again) == n_params(result.model)
    assert torch.allclose(predict(again, x, t), predict(result.model, x, t))


def test_odd_spatial_sizes_gray28():
    torch.manual_seed(0)
    base = build_unet("gray-28", attention=True)  # 28 -> 14 -> 7
    shape = (1, 28, 28)
    budget = int(0.6 * count_flops(base, shape))
    result = fit_to_budget(base, {"down_blocks.0": 0.2, "up_blocks.2": 0.2, "mid_block": 0.6}, budget, shape)
    assert abs(result.flops - budget) <= 0.03 * budget
    x = torch.randn(3, *shape)
    assert predict(result.model, x, torch.tensor([3, 400, 990])).shape == x.shape
    upsample = result.model.up_blocks[0].upsamplers[0]
    assert upsample.channels == upsample.conv.in_channels  # stale diffusers attributes were synced


def test_proposed_shape_is_kept_when_it_fits():
    base = make("unet")
    budget = int(0.7 * count_flops(base, DIGITS))
    result = fit_to_budget(base, {"mid_block": 0.6, "up_blocks.0": 0.3}, budget, DIGITS)
    assert abs(result.flops - budget) <= 0.03 * budget
    assert result.decision["mid_block"] >= result.decision["down_blocks.0"]


def test_taylor_importance():
    base = make("unet")
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(16, *DIGITS, generator=gen) * 2 - 1
    calibration = Calibration(images, make_scheduler(1000), torch.arange(0, 250), seed=1)
    decision = uniform_decision(prunable_units(base), 0.5)

    taylor = prune(base, decision, DIGITS, importance="taylor", calibration=calibration)
    magnitude = prune(base, decision, DIGITS)

    assert count_flops(taylor, DIGITS) == count_flops(magnitude, DIGITS)
    assert all(p.grad is None for p in taylor.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(taylor.parameters(), magnitude.parameters()))
    budget = int(0.6 * count_flops(base, DIGITS))
    fitted = fit_to_budget(base, {}, budget, DIGITS, importance="taylor", calibration=calibration)
    assert abs(fitted.flops - budget) <= 0.03 * budget
    with pytest.raises(ValueError, match="calibration"):
        prune(base, decision, DIGITS, importance="taylor")


def test_unreachable_budget_raises_helpful_error():
    base = make("unet")
    base_flops = count_flops(base, DIGITS)
    with pytest.raises(BudgetError) as info:
        fit_to_budget(base, {}, int(0.01 * base_flops), DIGITS)
    message = str(info.value)
    assert f"{int(0.01 * base_flops):,}" in message and "closest reachable" in message
    assert "raise k" in message and "tolerance" in message


def test_budget_at_base_flops_returns_unpruned_copy():
    base = make("unet")
    base_flops = count_flops(base, DIGITS)
    result = fit_to_budget(base, {}, base_flops, DIGITS)
    assert result.model is not base
    assert result.flops == base_flops and set(result.decision.values()) == {0.0}


def test_bad_decisions_are_rejected():
    base = make("unet")
    with pytest.raises(ValueError, match="unknown units"):
        prune(base, {"encoder": 0.5}, DIGITS)
    with pytest.raises(ValueError, match="must be in"):
        prune(base, {"mid_block": 0.99}, DIGITS)


def test_each_unit_ratio_sets_its_own_widths():
    torch.manual_seed(0)
    base = build_unet("digits-8", attention=True)
    pruned = prune(base, {"mid_block": 0.5}, DIGITS)
    mid, base_mid = pruned.mid_block, base.mid_block
    assert mid.resnets[0].conv1.out_channels == base_mid.resnets[0].conv1.out_channels // 2
    assert mid.attentions[0].to_q.out_features == base_mid.attentions[0].to_q.out_features // 2
    # Whole heads go: half of them, each keeping its dimension.
    assert mid.attentions[0].heads == base_mid.attentions[0].heads // 2
    assert mid.attentions[0].inner_dim // mid.attentions[0].heads \
        == base_mid.attentions[0].inner_dim // base_mid.attentions[0].heads
    # The residual stream through the mid block follows down_blocks.1, which is not pruned.
    assert mid.resnets[0].conv2.out_channels == base_mid.resnets[0].conv2.out_channels
    assert all(a.shape == b.shape for a, b in zip(pruned.down_blocks.parameters(), base.down_blocks.parameters()))
