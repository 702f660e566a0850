"""Depth pruning: which layers can go, and that a reduced UNet is the same network built with fewer layers."""

import copy
import json

import pytest
import torch

from tdcdiff.models import Denoiser, build_unet
from tdcdiff.surgery.depth import Removed, depth_units, normalize, remove, removed_units

RGB = (3, 32, 32)


def unet(layers: int = 2, attention: bool = False):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32, 32), layers_per_block=layers,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D" if attention else "DownBlock2D"),
        up_block_types=("AttnUpBlock2D" if attention else "UpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8, add_attention=attention,
    ).eval()


def run(model, x):
    with torch.no_grad():
        return Denoiser(model)(x, torch.tensor([10, 700]))


def test_depth_units_of_the_presets():
    assert depth_units(build_unet("digits-8")) == ["mid_block.resnets.0", "mid_block.resnets.1"]
    names = depth_units(build_unet("rgb-32", attention=True))
    assert "down_blocks.0.resnets.1" in names and "down_blocks.2.attentions.1" in names
    assert "up_blocks.0.attentions.2" in names and "mid_block.attentions.0" in names
    assert not any(n.startswith("up_blocks") and ".resnets." in n for n in names)  # tied to the down layers
    assert depth_units(torch.nn.Conv2d(1, 1, 1)) == []


@pytest.mark.parametrize("attention", [False, True])
def test_removing_a_layer_per_block_is_the_unet_with_fewer_layers(attention):
    """The reduced UNet's weights load strictly into the same UNet built with one layer per block, and both
    give the same output: skips, up-layer inputs and attention pairing are all consistent."""
    base = unet(2, attention)
    reduced = remove(Denoiser(copy.deepcopy(base)), [f"down_blocks.{i}.resnets.1" for i in range(3)])
    reference = unet(1, attention)
    reference.load_state_dict(reduced.model.state_dict(), strict=True)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(run(reduced.model, x), run(reference, x))
    assert removed_units(reduced) == [f"down_blocks.{i}.resnets.1" for i in range(3)]
    assert sum(p.numel() for p in reduced.parameters()) < sum(p.numel() for p in base.parameters())


def test_removing_one_block_layer_keeps_other_blocks_and_runs():
    base = unet(3, attention=True)
    reduced = remove(copy.deepcopy(base), ["down_blocks.2.resnets.2", "down_blocks.2.resnets.1"])
    assert len(reduced.down_blocks[2].resnets) == len(reduced.down_blocks[2].attentions) == 1
    assert len(reduced.up_blocks[0].resnets) == len(reduced.up_blocks[0].attentions) == 2
    assert len(reduced.up_blocks[1].resnets) == 4
    assert run(reduced, torch.randn(2, 3, 16, 16)).shape == (2, 3, 16, 16)


def test_attention_and_mid_layers_become_pass_throughs():
    base = unet(1, attention=True)
    units = ["mid_block.attentions.0", "up_blocks.0.attentions.1", "mid_block.resnets.1"]
    reduced = remove(copy.deepcopy(base), units)
    assert isinstance(reduced.mid_block.attentions[0], Removed) and isinstance(reduced.mid_block.resnets[1], Removed)
    assert not any("mid_block.attentions" in k or "up_blocks.0.attentions.1" in k for k in reduced.state_dict())
    x = torch.randn(2, 3, 16, 16)
    assert run(reduced, x).shape == x.shape and not torch.equal(run(reduced, x), run(base, x))


def test_bad_removals_name_the_problem():
    with pytest.raises(ValueError, match="mid block would lose all"):
        remove(unet(2), ["mid_block.resnets.0", "mid_block.resnets.1"])
    with pytest.raises(ValueError, match=r"\['down_blocks.0.resnets.0', 'up_blocks.0.resnets.1'\] are not depth"):
        remove(unet(2), ["up_blocks.0.resnets.1", "down_blocks.0.resnets.0"])
    twice = remove(unet(2), ["mid_block.resnets.0"])
    with pytest.raises(ValueError, match="already had layers removed"):
        remove(twice, ["mid_block.resnets.1"])


def test_normalize_rounds_flags_and_keeps_one_layer_per_block():
    decision = {"down_blocks.0": 0.3, "down_blocks.0.resnets.1": 0.7, "mid_block.attentions.0": 0.2,
                "mid_block.resnets.0": 0.9, "mid_block.resnets.1": 1.0}
    assert normalize(decision) == {"down_blocks.0": 0.3, "down_blocks.0.resnets.1": 1.0, "mid_block.attentions.0": 0.0,
                                   "mid_block.resnets.0": 0.0, "mid_block.resnets.1": 1.0}


def test_saved_reduced_model_loads_without_pickle(tmp_path):
    from tdcdiff.serialization import ARCHITECTURE_FILE, load_model, save_model

    units = ["down_blocks.1.resnets.1", "mid_block.resnets.0", "up_blocks.0.attentions.2"]  # module order
    reduced = remove(Denoiser(unet(2, attention=True)), units)
    description = save_model(reduced, tmp_path / "m")
    assert description["removed"] == units
    loaded = load_model(tmp_path / "m")
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(run(loaded.model, x), run(reduced.model, x)) and removed_units(loaded) == units
    path = tmp_path / "m" / ARCHITECTURE_FILE
    for bad, message in ((["up_blocks.0.resnets.1"], "are not depth units"), ("x", "must be a list of layer names")):
        path.write_text(json.dumps({**description, "removed": bad}))
        with pytest.raises(ValueError, match=f"{ARCHITECTURE_FILE}: .*{message}"):
            load_model(tmp_path / "m")


def test_fit_keeps_removed_layers_and_fits_the_rest_by_width():
    from tdcdiff.flops import count_flops
    from tdcdiff.prune.engine import prune
    from tdcdiff.prune.fit import fit_to_budget

    base = unet(2, attention=True)
    shape = (3, 16, 16)
    full = count_flops(base, shape)
    decision = {"down_blocks.0": 0.3, "up_blocks.2": 0.3, "down_blocks.0.resnets.1": 1.0, "mid_block.resnets.1": 1.0}
    fit = fit_to_budget(base, decision, int(0.6 * full), shape)
    assert abs(fit.flops / (0.6 * full) - 1) <= 0.03
    assert removed_units(fit.model) == ["down_blocks.0.resnets.1", "mid_block.resnets.1"]
    assert fit.decision["down_blocks.0.resnets.1"] == 1.0 and fit.decision["down_blocks.0"] > 0
    again = prune(base, fit.decision, shape)  # the repaired decision rebuilds the same shapes
    assert [p.shape for p in again.parameters()] == [p.shape for p in fit.model.parameters()]
    # Removing down_blocks.0.resnets.1 alone gives 0.86 < 0.97: that removal is undone, last first, and width pruning
    # fits.
    near = fit_to_budget(base, {"mid_block.resnets.0": 1.0, "down_blocks.0.resnets.1": 1.0}, int(0.97 * full),
                         shape)
    assert near.decision["down_blocks.0.resnets.1"] == 0.0 and near.decision["mid_block.resnets.0"] == 1.0 \
        and abs(near.flops / (0.97 * full) - 1) <= 0.03


def test_time_budget_fits_the_latency_table_estimate():
    """With a latency table the repair fits its estimate (a made-up table here: no timing in tests)."""
    from tdcdiff.latency import LatencyTable
    from tdcdiff.prune.fit import fit_to_budget, unit_levels
    from tdcdiff.prune.plan import plan_for

    base = unet(2)
    shape = (3, 16, 16)
    plan = plan_for(base, shape)
    deltas = {u.name: {v: -0.2 * v for v in unit_levels(plan, u.name)[1:]} for u in plan.units}
    deltas |= {name: {1.0: -0.1} for name in depth_units(base)}
    table = LatencyTable("fake", 1.0, deltas)
    fit = fit_to_budget(base, {"down_blocks.1.resnets.1": 1.0}, 0.6, shape, latency=table)
    assert abs(fit.seconds - 0.6) <= 0.03 * 0.6 and removed_units(fit.model) == ["down_blocks.1.resnets.1"]
    assert fit.seconds == pytest.approx(table.estimate(fit.decision), rel=0.02)


def test_depth_with_a_declared_decision_space_is_refused():
    from tdcdiff.prune.search import SearchConfig, search

    class Constant:
        def score(self, model):
            return 1.0

    config = SearchConfig(depth=True, units={"a": ["down_blocks.0.resnets.0.conv1"]})
    with pytest.raises(ValueError, match="depth pruning renumbers the layers a declared decision space names"):
        search(unet(2), 1000, (3, 16, 16), Constant(), config, progress=False)
