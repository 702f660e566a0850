"""Pruning architectures written outside tdcdiff: an ADM-style UNet, a DiT-style transformer and a
class-conditional diffusers UNet (tests/models_zoo.py), published model code (tests/published), whole attention
heads, declared units, named errors."""

import copy
import math

import pytest
import torch
from torch import nn

from models_zoo import AdmUNet, AttentionBlock, DiTAttention, TinyDiT, class_conditional_unet, diffusers_dit
from tdcdiff.flops import count_flops
from tdcdiff.models import Denoiser
from tdcdiff.prune.engine import prune
from tdcdiff.prune.fit import fit_to_budget
from tdcdiff.prune.plan import PruningError
from tdcdiff.prune.units import prunable_units
from tdcdiff.surgery.attributes import attention_heads

SHAPE = (1, 8, 8)
KINDS = {"adm": AdmUNet, "dit": TinyDiT, "diffusers-class": class_conditional_unet, "diffusers-dit": diffusers_dit}
# Layers every block reads, or that make the output: never in a unit.
SHARED = {"adm": ("time_embed", "label_emb", "out."), "dit": ("x_embedder", "t_embedder", "y_embedder", "final_"),
          "diffusers-class": ("time_embedding", "class_embedding", "conv_out"),
          "diffusers-dit": ("pos_embed", "proj_out_", "transformer_blocks.0.norm1.emb",
                            "transformer_blocks.1.norm1.emb")}


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def make(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return KINDS[kind]().eval()


def heads_of(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Attention module -> (heads, head dimension) from its layer shapes and its head-count attribute."""
    found = {}
    for name, m in model.named_modules():
        if (n := attention_heads(m)) is not None:
            qkv = m.qkv.weight.shape[0] // 3 if hasattr(m, "qkv") else m.to_q.weight.shape[0]
            found[name] = (n, qkv // n)
    return found


def out_widths(model: nn.Module, prefixes: tuple[str, ...]) -> dict[str, int]:
    """Output channels of the layers and embeddings under these prefixes."""
    return {name: m.weight.shape[1 if isinstance(m, nn.Embedding) else 0] for name, m in model.named_modules()
            if name.startswith(prefixes) and isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))}


def test_units_of_each_kind():
    names = {kind: [u.name for u in prunable_units(make(kind))] for kind in KINDS}
    assert names["adm"] == [f"input_blocks.{i}" for i in range(4)] + ["middle_block"] \
        + [f"output_blocks.{i}" for i in range(4)]
    assert names["dit"] == ["blocks.0.attn.heads", "blocks.0.mlp", "blocks.1.attn.heads", "blocks.1.mlp"]
    assert names["diffusers-class"] == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
    assert names["diffusers-dit"] == [f"transformer_blocks.{i}.{u}" for i in range(2) for u in ("attn1.heads", "mlp")]
    for kind in KINDS:
        layers = [layer for u in prunable_units(make(kind)) for layer in u.modules]
        assert not [layer for layer in layers if layer.startswith(SHARED[kind])], kind
    dit = {u.name: u.modules for u in prunable_units(make("dit"))}
    assert dit["blocks.0.attn.heads"] == ["blocks.0.attn.qkv", "blocks.0.attn.proj"]
    assert "blocks.0.mlp.0" in dit["blocks.0.mlp"]


@pytest.mark.parametrize("fraction", [0.8, 0.6])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_fit_prune_and_run(kind, fraction):
    base = make(kind)
    denoiser = Denoiser(base)
    base_flops = count_flops(denoiser, SHAPE)
    budget = int(fraction * base_flops)

    result = fit_to_budget(denoiser, {}, budget, SHAPE)

    error = result.flops / budget - 1
    print(f"FLOPs error {kind} at {fraction}: {error:+.2%}")
    assert abs(error) <= 0.03, (kind, fraction, result.decision)
    assert count_flops(result.model, SHAPE) == result.flops
    pruned = result.model.model
    assert type(pruned) is type(base)
    # Runs with class labels, keeps the output shape (a learned variance's 2C channels included).
    x, t, y = torch.randn(3, *SHAPE), torch.tensor([0, 500, 999]), torch.tensor([1, 4, 9])
    with torch.no_grad():
        out = result.model(x, t, y, with_variance=True)
        full = Denoiser(base)(x, t, y, with_variance=True)
    assert out.shape == full.shape and torch.isfinite(out).all()
    # What every block reads keeps its width; attention loses whole heads only.
    assert out_widths(base, SHARED[kind]) == out_widths(pruned, SHARED[kind])
    base_heads, pruned_heads = heads_of(base), heads_of(pruned)
    assert base_heads.keys() == pruned_heads.keys() and base_heads
    assert all(pruned_heads[a][1] == base_heads[a][1] and pruned_heads[a][0] >= 1 for a in base_heads)
    if fraction == 0.6:
        assert any(pruned_heads[a][0] < base_heads[a][0] for a in base_heads), "no attention was pruned"


def test_learned_variance_keeps_its_full_output():
    base = make("adm")
    assert base.out[-1].out_channels == 2 * SHAPE[0]
    pruned = prune(Denoiser(base), {u.name: 0.5 for u in prunable_units(base)}, SHAPE).model
    assert pruned.out[-1].out_channels == 2 * SHAPE[0]
    # FLOPs count the variance half too: the Denoiser's slice to the prediction costs nothing.
    assert count_flops(Denoiser(base), SHAPE) == count_flops(base, SHAPE)


class AttentionNet(nn.Module):
    """Stem -> one attention layer with 8 heads of dimension 8 (added to its input) -> output layer."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.stem = nn.Conv2d(1, 64, 3, padding=1)
        if kind == "adm":
            self.attn = AttentionBlock(64, 8)
        elif kind == "dit":
            self.attn = DiTAttention(64, 8)
        else:
            from diffusers.models.attention_processor import Attention

            self.attn = Attention(64, heads=8, dim_head=8)
        self.head = nn.Conv2d(64, 1, 3, padding=1)

    def forward(self, x, t):
        h = self.stem(x)
        if self.kind == "adm":
            h = self.attn(h)
        else:
            tokens = h.flatten(2).transpose(1, 2)
            h = h + self.attn(tokens).transpose(1, 2).reshape(h.shape)
        return self.head(h)


def _out_projection(net: AttentionNet) -> nn.Module:
    return {"adm": lambda a: a.proj_out, "dit": lambda a: a.proj,
            "diffusers": lambda a: a.to_out[0]}[net.kind](net.attn)


@pytest.mark.parametrize("kind", ["adm", "dit", "diffusers"])
def test_half_of_8_heads_leaves_4_whole_heads(kind):
    torch.manual_seed(0)
    base = AttentionNet(kind).eval()
    pruned = prune(base, {"heads": 0.5}, SHAPE, units={"heads": ["attn"]})

    assert heads_of(pruned) == {"attn": (4, 8)}
    assert _out_projection(pruned).weight.shape[1] == 32
    # Exactly the base with the other 4 heads' outputs removed: find the kept heads by their weights.
    kept_columns = _out_projection(pruned).weight.detach()
    base_columns = _out_projection(base).weight.detach()
    kept = [next(h for h in range(8) if torch.equal(base_columns[:, h * 8:(h + 1) * 8],
                                                    kept_columns[:, k * 8:(k + 1) * 8]))
            for k in range(4)]
    masked = copy.deepcopy(base)
    with torch.no_grad():
        for h in set(range(8)) - set(kept):
            _out_projection(masked).weight[:, h * 8:(h + 1) * 8] = 0
    x, t = torch.randn(2, *SHAPE), torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.allclose(pruned(x, t), masked(x, t), atol=1e-5)


class HeadDimAttention(DiTAttention):
    """Attention that stores its head dimension instead of a head count (which it derives from qkv)."""

    def __init__(self, dim: int, head_dim: int):
        super().__init__(dim, dim // head_dim)
        del self.num_heads
        self.head_dim = head_dim

    def forward(self, x):
        self.num_heads = self.qkv.out_features // (3 * self.head_dim)
        try:
            return super().forward(x)
        finally:
            del self.num_heads


def test_declared_heads():
    torch.manual_seed(0)
    base = AttentionNet("dit").eval()
    base.attn = HeadDimAttention(64, 8)
    units = {"heads": ["attn"]}
    assert attention_heads(base.attn) is None  # nothing to read the heads from: declared below
    pruned = prune(base, {"heads": 0.5}, SHAPE, units=units, num_heads={"attn": 8})
    assert pruned.attn.qkv.out_features == 3 * 4 * 8 and pruned.attn.proj.in_features == 32
    assert pruned(torch.randn(2, *SHAPE), torch.tensor([1, 2])).shape == (2, *SHAPE)
    with pytest.raises(ValueError, match="num_heads names \\['nothing'\\], which the model does not have"):
        prune(base, {"heads": 0.5}, SHAPE, units=units, num_heads={"nothing": 8})


def test_declared_units_and_ignored_layers():
    dit = make("dit")
    units = prunable_units(dit, units={"attention": ["blocks.0.attn", "blocks.1.attn"],
                                       "mlps": ["blocks.0.mlp", "blocks.1.mlp"]})
    assert [u.name for u in units] == ["attention", "mlps"]
    assert units[1].modules == ["blocks.0.mlp.0", "blocks.0.mlp.2", "blocks.1.mlp.0", "blocks.1.mlp.2"]
    declared = prunable_units(dit, units=lambda net: {"first": ["blocks.0"]})
    assert [u.name for u in declared] == ["first"]
    assert [u.name for u in prunable_units(dit, ignored_layers=["blocks.1"])] == ["blocks.0.attn.heads", "blocks.0.mlp"]
    # An ignored layer keeps its width even inside a pruned unit.
    pruned = prune(dit, {"blocks.0.mlp": 0.5}, SHAPE, ignored_layers=["blocks.0.mlp.0"])
    assert pruned.blocks[0].mlp[0].out_features == dit.blocks[0].mlp[0].out_features
    with pytest.raises(ValueError, match="'blocks.9', which the model does not have"):
        prunable_units(dit, ignored_layers=["blocks.9"])
    with pytest.raises(ValueError, match="unit 'x'"):
        prunable_units(dit, units={"x": "blocks.0"})


class FixedWidth(nn.Module):
    """A layer that hard-codes the width it reads, so pruning what feeds it breaks it."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, x):
        return x.reshape(x.shape[0], self.channels, x.shape[2] * x.shape[3]).reshape(x.shape)


class FixedWidthNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), FixedWidth(32), nn.Conv2d(32, 16, 3, padding=1))
        self.head = nn.Conv2d(16, 1, 3, padding=1)

    def forward(self, x, t):
        return self.head(self.block(self.stem(x)))


def test_an_unappliable_decision_names_the_unit_and_layer():
    torch.manual_seed(0)
    with pytest.raises(PruningError,
                       match=r"cannot prune unit 'block': layer 'block\.1' fails .*ignored_layers=\['block'\]"):
        prune(FixedWidthNet(), {"stem": 0.5, "block": 0.5}, SHAPE)
    pruned = prune(FixedWidthNet(), {"stem": 0.5}, SHAPE, ignored_layers=["block"])  # the fix the message gives
    assert pruned.stem.out_channels == 8 and pruned.block[0].out_channels == 32


class ParamCount:
    """A proxy that prefers the pruned model with the most parameters left (no data needed)."""

    def score(self, model: nn.Module) -> float:
        return 1.0 / sum(p.numel() for p in model.parameters())


def test_search_takes_the_decision_space_from_its_config():
    from tdcdiff.prune.search import SearchConfig, search

    dit = make("dit")
    budget = int(0.7 * count_flops(Denoiser(dit), SHAPE))
    config = SearchConfig(rounds=1, candidates_per_round=2, ignored_layers=["blocks.1"])
    result = search(Denoiser(dit), budget, SHAPE, ParamCount(), config, progress=False)
    assert set(result.decision) == {"blocks.0.attn.heads", "blocks.0.mlp"}
    assert abs(result.flops - budget) <= 0.03 * budget
    assert [p.shape for p in result.model.model.blocks[1].parameters()] == [p.shape for p in dit.blocks[1].parameters()]


# -- published model code (tests/published), taken as its authors wrote it --------------------------------------
def published(name: str) -> nn.Module:
    from published import models

    torch.manual_seed(0)
    return getattr(models, name)().eval()


def outputs(model: nn.Module) -> torch.Tensor:
    x, t = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 500, 999])
    with torch.no_grad():
        return Denoiser(model)(x, t, with_variance=True)


@pytest.mark.parametrize("name, decision", [
    # the residual group through AttentionBlock's reshapes (torch-pruning's guess doubled its indices: IndexError)
    ("improved_diffusion", {"input_blocks.3": 0.5}),
    # the stem's channels reach Downsample, which asserts on its `channels` (was left at 64: AssertionError)
    ("improved_diffusion", {"input_blocks.0": 0.5}),
    ("improved_diffusion", "all"),
    ("pytorch_diffusion", "all"),
    ("denoising_diffusion_pytorch", "all"),
])
def test_published_models_prune_run_and_reload_identically(tmp_path, name, decision):
    from tdcdiff.serialization import load_model, register_model_class, save_model

    base = published(name)
    decision = {u.name: 0.5 for u in prunable_units(base)} if decision == "all" else decision
    pruned = prune(base, decision, SHAPE)
    assert count_flops(pruned, SHAPE) < count_flops(base, SHAPE) and torch.isfinite(outputs(pruned)).all()
    register_model_class(type(base))
    save_model(pruned, tmp_path / "pruned")
    assert torch.equal(outputs(load_model(tmp_path / "pruned")), outputs(pruned))  # loading re-derives the sizes
    if name == "improved_diffusion":
        for m in pruned.modules():
            if type(m).__name__ in ("Downsample", "Upsample"):
                conv = m.op if hasattr(m, "op") else m.conv
                assert m.channels == conv.in_channels


def test_published_units():
    assert [u.name for u in prunable_units(published("pytorch_diffusion"))] == [
        "conv_in", "down.0", "down.1", "mid", "up.0", "up.1"]
    assert [u.name for u in prunable_units(published("denoising_diffusion_pytorch"))] == [
        "init_conv", "downs.0", "downs.1", "ups.0", "ups.1", "mid_block1", "mid_attn", "mid_block2", "final_res_block"]


def test_a_width_attribute_a_forward_branches_on_stays():
    """pytorch_diffusion's ResnetBlock takes its nin_shortcut when in_channels != out_channels: a pruning that makes
    its widths equal (64 in, 128 -> 64 out) leaves both attributes as built, so the shortcut still runs."""
    base = published("pytorch_diffusion")
    pruned = prune(base, {"down.1": 0.5}, SHAPE)
    block = pruned.down[1].block[0]
    assert (block.conv1.in_channels, block.conv2.out_channels) == (64, 64)
    assert (block.in_channels, block.out_channels) == (64, 128)
    called = []
    block.nin_shortcut.register_forward_hook(lambda m, args, out: called.append(1) and None)
    outputs(pruned)
    assert called


def test_per_channel_parameters_and_scale_shift_projections_follow_their_channels():
    """denoising-diffusion-pytorch: RMSNorm's gain g (1, C, 1, 1) is pruned with its channels; a ResnetBlock's
    time projection (a scale and a shift per channel, computed before its convolution) keeps two per channel."""
    pruned = prune(published("denoising_diffusion_pytorch"), {"downs.0": 0.5}, SHAPE)
    block = pruned.downs[0][0]
    assert block.block1.proj.out_channels == 8
    assert block.block1.norm.g.shape == (1, 8, 1, 1) and block.mlp[1].out_features == 16


class WidthCheck(nn.Module):
    """A module without layers that asserts the width it is given (as improved-diffusion's Downsample does)."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, x):
        assert x.shape[1] == self.channels
        return x


class CheckedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.check = WidthCheck(16)
        self.body = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 1, 3, padding=1)

    def forward(self, x, t):
        return self.head(self.body(self.check(self.stem(x))))


def test_a_module_without_layers_is_named_with_the_layer_to_keep():
    torch.manual_seed(0)
    with pytest.raises(PruningError, match=r"^cannot prune unit 'stem': layer 'check' fails after pruning "
                                           r"\(.+\); WidthCheck still holds the unpruned width in "
                                           r"channels=16; keep its widths with ignored_layers=\['stem'\]"):
        prune(CheckedNet(), {"stem": 0.5, "body": 0.5}, SHAPE)
    pruned = prune(CheckedNet(), {"body": 0.5}, SHAPE, ignored_layers=["stem"])  # the fix the message gives
    assert (pruned.stem.out_channels, pruned.body.out_channels) == (16, 8)


def test_a_layer_two_groups_claim_is_refused():
    from tdcdiff.prune.plan import _claim

    claimed = {}
    _claim(claimed, ["a.conv", "b.conv"], {"a.conv": "a"})
    with pytest.raises(PruningError, match=r"unit 'a': torch-pruning couples the output channels of layer 'a.conv' "
                                           r"in two ways .*ignored_layers=\['a.conv'\]"):
        _claim(claimed, ["a.conv"], {"a.conv": "a"})


def test_the_measured_plan_and_the_latency_table_keep_the_decision_space(digits, scheduler, tmp_path):
    from tdcdiff.grouping import make_groups
    from tdcdiff.prune.fit import measure_latency_table
    from tdcdiff.prune.sensitivity import measure_sensitivity

    torch.manual_seed(0)
    net, grouping = FixedWidthNet().eval(), make_groups("uniform", 2, scheduler)
    with pytest.raises(PruningError, match=r"ignored_layers=\['block'\]"):
        measure_sensitivity(net, digits.images[:16], scheduler, grouping, SHAPE, batch_size=8)
    scores = measure_sensitivity(net, digits.images[:16], scheduler, grouping, SHAPE, batch_size=8,
                                 ignored_layers=["block"])
    assert len(scores) == 2 and all(math.isfinite(s) for s in scores)
    table = measure_latency_table(net, SHAPE, 2, depth_units=False, max_levels=2, cache_dir=tmp_path, repeats=1,
                                  ignored_layers=["block"])
    assert set(table.deltas) == {"stem"}
