"""Feature caching (DeepCache): exact full passes, cached steps that are the shallow branch on the stored deep
features, one cache per expert of a router, pruned and deeper UNets, the fast path, and the refusals."""

import re

import pytest
import torch
from diffusers import UNet2DModel
from torch import nn
from typer.testing import CliRunner

from tdcdiff.cli import app
from tdcdiff.feature_cache import DeepCacheUNet, FeatureCache, FullPass
from tdcdiff.grouping import make_groups
from tdcdiff.models import as_denoiser, build_unet
from tdcdiff.pipeline import SamplingModel, TDCPipeline, sample
from tdcdiff.router import Router

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = (1, 8, 8)


def deeper_unet(**changes):
    """Three levels, two layers per block, attention at the lowest resolution: more skips than the presets."""
    torch.manual_seed(0)
    config = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32, 32), layers_per_block=2,
                  down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8,
                  attention_head_dim=8)
    return UNet2DModel(**{**config, **changes}).eval()


def shallow_by_hand(unet, x, t, deep, depth):
    """The shallow branch, written out from UNet2DModel.forward: conv_in and the first `depth` down blocks make the
    skips, the last `depth` up blocks take `deep` and the first skips made, then the output layers."""
    emb = unet.time_embedding(unet.time_proj(t))
    h = unet.conv_in(x)
    skips = (h,)
    for block in unet.down_blocks[:depth]:
        h, made = block(hidden_states=h, temb=emb)
        skips += made
    ups = unet.up_blocks[len(unet.up_blocks) - depth:]
    skips = skips[: sum(len(block.resnets) for block in ups)]  # the last down block's downsampled output goes deeper
    h = deep
    for block in ups:
        h = block(h, skips[-len(block.resnets):], emb)
        skips = skips[: -len(block.resnets)]
    return unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))


def deep_by_hand(unet, x, t, depth):
    """The input of up_blocks[-depth] in an ordinary forward pass, caught by a hook (the test's own)."""
    caught = {}
    hook = unet.up_blocks[len(unet.up_blocks) - depth].register_forward_pre_hook(
        lambda module, args: caught.update(deep=args[0]))
    try:
        unet(x, t)
    finally:
        hook.remove()
    return caught["deep"]


@torch.no_grad()
@pytest.mark.parametrize("make", [lambda: build_unet("digits-8"), deeper_unet], ids=["digits-8", "deeper"])
def test_a_cached_step_is_the_shallow_branch_on_the_stored_deep_features(make):
    unet = make()
    levels = len(unet.down_blocks)
    x0, x1 = torch.randn((2, 3, *SHAPE), generator=torch.Generator().manual_seed(0))
    t0, t1 = torch.full((3,), 900), torch.full((3,), 700)
    for depth in range(1, levels + 1):
        runner = SamplingModel(unet, compile="none")
        runner.prepare_cache(depth)
        cache = FeatureCache(interval=2, depth=depth)
        full = runner(x0, 900, cache=cache)
        assert torch.equal(full, unet(x0, t0).sample)  # the full pass is the model's forward, to the last bit
        assert torch.equal(cache.deep, deep_by_hand(unet, x0, t0, depth))
        cached = runner(x1, 700, cache=cache)
        assert cache.shallow_steps == [700]
        assert torch.equal(cached, shallow_by_hand(unet, x1, t1, deep_by_hand(unet, x0, t0, depth), depth)), depth
        assert not torch.allclose(cached, unet(x1, t1).sample)  # the stale deep features do change the output
        assert torch.equal(runner(x1, 500, cache=cache), unet(x1, torch.full((3,), 500)).sample)  # interval 2: full


def test_interval_one_is_exactly_the_uncached_sampler(tiny_unet, scheduler):
    kwargs = dict(sample_shape=SHAPE, sampler="dpm-solver++", steps=6, num_images=3, progress=False)
    plain = sample(tiny_unet, scheduler, **kwargs)
    off = sample(tiny_unet, scheduler, cache_interval=1, **kwargs)
    assert torch.equal(plain.images, off.images)
    assert (off.cache_interval, off.cache_depth, off.shallow_steps) == (1, None, [])
    one_step = dict(kwargs, steps=1)  # one step is one full pass, whatever the interval
    assert torch.equal(sample(tiny_unet, scheduler, cache_interval=3, **one_step).images,
                       sample(tiny_unet, scheduler, **one_step).images)


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["ddim", "unipc"])
def test_cached_sampling_visits_full_passes_every_interval_on_every_path(sampler, tiny_unet, scheduler):
    kwargs = dict(sample_shape=SHAPE, sampler=sampler, steps=7, num_images=5, batch_size=2, cache_interval=3,
                  progress=False)
    eager = sample(tiny_unet, scheduler, compile="none", **kwargs)
    traced = sample(tiny_unet, scheduler, compile="trace", **kwargs)
    visited = eager.timesteps
    assert eager.shallow_steps == [visited[i] for i in (1, 2, 4, 5)]  # full passes at steps 0, 3, 6
    assert (eager.cache_interval, eager.cache_depth, traced.compile) == (3, 1, "trace")
    assert (traced.images - eager.images).abs().max() <= 1e-5  # both passes traced, each shape its own graph
    uncached = sample(tiny_unet, scheduler, compile="none", **{**kwargs, "cache_interval": 1})
    assert 0 < (eager.images - uncached.images).abs().max()


def test_a_router_step_in_another_group_runs_a_full_pass(scheduler):
    torch.manual_seed(1)
    router = Router([build_unet("digits-8"), build_unet("digits-8")], make_groups("uniform", 2, scheduler))
    runner = SamplingModel(router, compile="none")
    runner.prepare_cache(1)
    full_at = {0: [], 1: []}
    for expert in (0, 1):
        runner._cached_passes[expert, 1][0].register_forward_pre_hook(
            lambda module, args, expert=expert: full_at[expert].append(int(args[1][0])))
    result = sample(runner, scheduler, sample_shape=SHAPE, steps=8, num_images=2, cache_interval=3, progress=False)
    assert result.timesteps == [999, 874, 749, 624, 499, 374, 249, 124]
    # expert 1 holds t >= 500: full at 999, and 3 steps on (624); t=499 is expert 0's: a full pass, 2 steps early
    assert full_at == {1: [999, 624], 0: [499, 124]}
    assert result.shallow_steps == [874, 749, 374, 249]


@pytest.mark.slow
def test_pruned_and_depth_reduced_unets_cache(scheduler):
    from tdcdiff.prune.engine import prune

    widths = prune(build_unet("digits-8"), {"down_blocks.0": 0.5, "down_blocks.1": 0.25, "mid_block": 0.5,
                                            "up_blocks.0": 0.5, "up_blocks.1": 0.25}, SHAPE)
    fewer_layers = prune(deeper_unet(), {"down_blocks.0.resnets.1": 1.0, "down_blocks.1": 0.5}, SHAPE)
    assert len(fewer_layers.down_blocks[0].resnets) == 1 and len(fewer_layers.up_blocks[-1].resnets) == 2
    x = torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 800])
    for unet in (widths, fewer_layers):
        for depth in range(1, len(unet.down_blocks) + 1):
            with torch.no_grad():
                prediction, deep = FullPass(DeepCacheUNet(unet, depth))(x, t)
                assert torch.equal(prediction, as_denoiser(unet)(x, t))
                cached = DeepCacheUNet(unet, depth).shallow(x, t, deep)
                assert torch.equal(cached, shallow_by_hand(unet, x, t, deep, depth))
            result = sample(unet, scheduler, sample_shape=SHAPE, steps=5, num_images=2, cache_interval=2,
                            cache_depth=depth, progress=False)
            assert torch.isfinite(result.images).all() and result.compile == "trace"


@pytest.mark.slow
def test_class_conditional_learned_variance_unet_with_guidance_caches(scheduler):
    unet = deeper_unet(out_channels=2, num_class_embeds=4)
    kwargs = dict(sample_shape=SHAPE, sampler="ddpm", steps=4, num_images=3, class_labels=[0, 1, 2],
                  guidance_scale=2.0, null_class=3, progress=False)
    eager = sample(unet, scheduler, compile="none", cache_interval=2, cache_depth=2, **kwargs)
    traced = sample(unet, scheduler, compile="trace", cache_interval=2, cache_depth=2, **kwargs)
    assert (traced.images - eager.images).abs().max() <= 1e-5 and eager.shallow_steps == eager.timesteps[1::2]
    pipe = TDCPipeline(unet, scheduler, SHAPE, null_class=3)
    out = pipe(batch_size=2, num_inference_steps=4, class_labels=1, cache_interval=2, output_type="pt")
    assert out.images.shape == (2, *SHAPE)


def test_bf16_autocast_with_caching(tiny_unet, scheduler):
    kwargs = dict(sample_shape=SHAPE, steps=6, num_images=4, cache_interval=2, progress=False)
    full = sample(tiny_unet, scheduler, **kwargs)
    bf16 = sample(tiny_unet, scheduler, precision="bf16", **kwargs)
    assert bf16.images.dtype == torch.float32 and 0 < (bf16.images - full.images).abs().mean() < 0.05


def test_bad_cache_settings(tiny_unet, scheduler):
    kwargs = dict(sample_shape=SHAPE, steps=3, num_images=1, progress=False)
    with pytest.raises(ValueError, match=r"cache_interval \(--cache-interval\) must be an integer >= 1, got 0"):
        sample(tiny_unet, scheduler, cache_interval=0, **kwargs)
    with pytest.raises(ValueError, match=r"cache_depth \(--cache-depth\) must be between 1 and the UNet's 2 levels "
                                         r"\(down blocks\), got 3"):
        sample(tiny_unet, scheduler, cache_interval=2, cache_depth=3, **kwargs)
    with pytest.raises(ValueError, match=r"cache_depth \(--cache-depth\) 2 was given without feature caching"):
        sample(tiny_unet, scheduler, cache_depth=2, **kwargs)

    class Plain(nn.Module):
        def forward(self, x, t):
            return x * 0.1

    with pytest.raises(ValueError, match="needs diffusers UNet2DModel denoisers, but the model is a Plain; sample it "
                                         "with cache_interval=1"):
        sample(Plain(), scheduler, cache_interval=2, **kwargs)
    router = Router([tiny_unet, Plain()], make_groups("uniform", 2, scheduler))
    with pytest.raises(ValueError, match="but expert 1 of the router is a Plain"):
        sample(router, scheduler, cache_interval=2, **kwargs)
    skip = deeper_unet(down_block_types=("SkipDownBlock2D",) * 3, up_block_types=("SkipUpBlock2D",) * 3,
                       block_out_channels=(16, 16, 16), norm_num_groups=None)
    with pytest.raises(ValueError, match=r"does not support UNet blocks that carry a skip sample \(SkipDownBlock2D, "
                                         r"SkipUpBlock2D\)"):
        sample(skip, scheduler, cache_interval=2, **kwargs)
    unpaired = deeper_unet()
    del unpaired.down_blocks[0].resnets[1]  # its up block still takes three skips: the pairing is off
    with pytest.raises(ValueError, match="needs a UNet whose up blocks take exactly the skip connections its down "
                                         "blocks make, level by level"):
        sample(unpaired, scheduler, cache_interval=2, **kwargs)


@pytest.mark.parametrize("args, message", [
    (["--cache-interval", "0"], "error: --cache-interval must be >= 1, got 0"),
    # a depth alone takes the bundle's interval (tests/test_cli.py), so only a depth beside interval 1 is refused here
    (["--cache-interval", "1", "--cache-depth", "2"],
     r"error: cache_depth \(--cache-depth\) 2 was given without feature caching; give cache_interval "
     r"\(--cache-interval\) >= 2"),
    (["--cache-depth", "0"], "error: --cache-depth must be >= 1, got 0"),
])
def test_cli_refuses_bad_cache_settings_before_loading(args, message):
    result = CliRunner().invoke(app, ["sample", "--bundle", "/no/such/bundle", *args])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert re.match(message, result.output), result.output
