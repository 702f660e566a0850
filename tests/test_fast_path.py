"""The fast sampling path (SamplingModel): traced experts give the eager loop's images; routing by table."""

import pytest
import torch
from torch import nn

from tdcdiff.grouping import make_groups
from tdcdiff.models import build_unet
from tdcdiff.pipeline import SAMPLERS, SamplingModel, TDCPipeline, sample
from tdcdiff.router import Router


def tiny_router(scheduler):
    torch.manual_seed(1)
    return Router([build_unet("digits-8"), build_unet("digits-8")], make_groups("uniform", 2, scheduler))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_trace_gives_the_eager_images(sampler, tiny_unet, scheduler):
    for model in (tiny_unet, tiny_router(scheduler)):
        # 5 images in batches of 2: the last batch has another shape, so a second graph is traced
        kwargs = dict(sample_shape=(1, 8, 8), sampler=sampler, steps=4, num_images=5, batch_size=2, progress=False)
        eager = sample(model, scheduler, compile="none", **kwargs)
        traced = sample(model, scheduler, compile="trace", **kwargs)
        assert (eager.compile, traced.compile) == ("none", "trace")
        assert traced.timesteps == eager.timesteps
        assert (traced.images - eager.images).abs().max() <= 1e-5


def test_auto_traces_diffusers_models_only(tiny_unet, scheduler):
    class Plain(nn.Module):  # may branch on its inputs' values, which a trace would freeze
        def forward(self, x, t):
            return x * 0.1

    assert SamplingModel(tiny_unet).compile == "trace"
    assert SamplingModel(Plain()).compile == "none"
    assert SamplingModel(Router([tiny_unet, Plain()], make_groups("uniform", 2, scheduler))).compile == "trace+none"
    assert sample(tiny_unet, scheduler, sample_shape=(1, 8, 8), steps=2, num_images=1,
                  progress=False).compile == "trace"


def test_a_graph_that_differs_from_eager_is_not_used(scheduler):
    class Noisy(nn.Module):  # a trace freezes nothing wrong here, but its output is not reproducible
        def forward(self, x, t):
            return x * 0.1 + torch.rand_like(x)

    with pytest.warns(UserWarning, match="--compile trace is not used for Denoiser at input shape \\(2, 1, 8, 8\\)"):
        result = sample(Noisy(), scheduler, sample_shape=(1, 8, 8), steps=3, num_images=2, compile="trace",
                        progress=False)
    assert torch.isfinite(result.images).all() and result.compile == "none"


def test_a_prepared_sampling_model_is_reused_and_routes_by_table(scheduler):
    router = tiny_router(scheduler)
    runner = SamplingModel(router, "trace")
    kwargs = dict(sample_shape=(1, 8, 8), steps=4, num_images=3, batch_size=3, progress=False)
    first, again = sample(runner, scheduler, **kwargs), sample(runner, scheduler, **kwargs)
    assert torch.equal(first.images, again.images)
    assert len(runner.experts[0]._graphs) == len(runner.experts[1]._graphs) == 1  # built once, reused
    assert router.samples_routed == [2 * 2 * 3, 2 * 2 * 3]  # 4 steps (2 per group), 3 images, twice
    t = torch.arange(1000)
    assert [router.route(int(i), 0) for i in t] == router.group_of(t).tolist()
    with pytest.raises(IndexError, match="timestep 1000 is outside the router's 0..999"):
        router.route(1000, 1)


def test_bf16_autocast_is_close_but_opt_in(tiny_unet, scheduler):
    kwargs = dict(sample_shape=(1, 8, 8), steps=3, num_images=4, progress=False)
    full = sample(tiny_unet, scheduler, **kwargs)
    bf16 = sample(tiny_unet, scheduler, precision="bf16", **kwargs)
    assert (full.precision, bf16.precision) == ("fp32", "bf16") and bf16.images.dtype == torch.float32
    assert 0 < (bf16.images - full.images).abs().mean() < 0.05


def test_bad_sampling_path(tiny_unet, scheduler):
    with pytest.raises(ValueError, match="unknown compile mode 'jit'; choose one of"):
        sample(tiny_unet, scheduler, sample_shape=(1, 8, 8), compile="jit", progress=False)
    with pytest.raises(ValueError, match="unknown precision 'fp16'; choose one of \\('fp32', 'bf16'\\)"):
        TDCPipeline(tiny_unet, scheduler, (1, 8, 8), precision="fp16")
