import pytest
import torch
from torch import nn

from tdcdiff.grouping import make_groups
from tdcdiff.pipeline import SAMPLERS, sample
from tdcdiff.router import Router
from tdcdiff.schedule import make_scheduler


class Recording(nn.Module):
    """A denoiser that adds a group-specific constant and records the timesteps it saw."""

    def __init__(self, offset):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.offset = offset
        self.seen = []

    def forward(self, x, t):
        self.seen.extend(t.tolist())
        return x * self.scale + self.offset + t.view(-1, 1, 1, 1) * 1e-4


@pytest.fixture()
def routed():
    grouping = make_groups("uniform", 3, make_scheduler(1000))
    experts = [Recording(float(i)) for i in range(3)]
    return Router(experts, grouping, expert_flops=[10, 20, 30]), experts, grouping


def test_router_equals_the_selected_expert(routed):
    router, experts, grouping = routed
    x = torch.randn(4, 1, 8, 8)
    t = torch.full((4,), 500)
    assert torch.equal(router(x, t), experts[1](x, t))
    mixed_t = torch.tensor([10, 990, 500, 20, 700])
    x = torch.randn(5, 1, 8, 8)
    out = router(x, mixed_t)
    for i, ti in enumerate(mixed_t):
        g = int(grouping.group_of(ti.view(1)))
        assert torch.equal(out[i : i + 1], experts[g](x[i : i + 1], ti.view(1)))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_routed_sampling_calls_each_expert_only_for_its_timesteps(routed, sampler):
    router, experts, grouping = routed
    result = sample(router, make_scheduler(1000), sample_shape=(1, 8, 8), sampler=sampler, steps=10, num_images=2,
                    progress=False)
    for expert, group in zip(experts, grouping.groups):
        assert expert.seen, "every group is visited by a 10-step trajectory"
        assert all(group.start <= t < group.end for t in expert.seen)
    assert sum(router.samples_routed) == 2 * 10
    expected = sum([10, 20, 30][int(grouping.group_of(torch.tensor([t])))] for t in result.timesteps)
    assert router.trajectory_flops(result.timesteps) == expected


def test_router_rejects_a_scheduler_with_other_T(routed):
    router, _, _ = routed
    with pytest.raises(ValueError, match="T=500 training timesteps but the router's groups cover T=1000"):
        sample(router, make_scheduler(500), sample_shape=(1, 8, 8), steps=5, progress=False)


def test_one_expert_per_group():
    with pytest.raises(ValueError, match="2 experts for 3 groups"):
        Router([Recording(0), Recording(1)], make_groups("uniform", 3, make_scheduler(1000)))


@pytest.mark.parametrize("t, error, message", [
    (249.5, ValueError, r"timestep 249.5 is not an integer: diffusion timesteps here are the integer training "
                        r"timesteps 0..T-1 \(a sigma-space loop"),
    (torch.tensor(12.7), ValueError, "timestep 12.699999809265137 is not an integer"),
    (True, ValueError, "a timestep must be an integer, got True"),
    (torch.tensor([3, 4]), ValueError, r"one timestep is expected here \(the whole batch is at one t\), got 2 values"),
    (1000, IndexError, r"timestep 1000 is outside the router's 0..999"),
])
def test_route_takes_integer_timesteps_only(routed, t, error, message):
    """A fractional t is refused, not truncated: no expert was trained between the integers (see FRACTIONAL)."""
    router, _, _ = routed
    with pytest.raises(error, match=message):
        router.route(t, 1)
    assert router.samples_routed == [0, 0, 0]


def test_the_fractional_line_names_every_sampler_of_the_registry(routed):
    """Every sampler tdcdiff registers samples at integer timesteps, not 3 of them (attack 2026-12-07e row 414)."""
    from tdcdiff.samplers import SAMPLERS

    router, _, _ = routed
    with pytest.raises(ValueError) as caught:
        router(torch.zeros(2, 1, 8, 8), torch.tensor([5.5, 5.5]))
    assert f"sample with integer timesteps: tdcdiff's samplers ({', '.join(SAMPLERS)}) or your" in str(caught.value)
    assert len(SAMPLERS) >= 7 and {"pndm", "unipc", "deis", "euler"} <= set(SAMPLERS)


def test_route_takes_integral_values_of_any_type(routed):
    """Groups [0, 333), [333, 667), [667, 1000)."""
    import numpy as np

    router, _, _ = routed
    assert [router.route(t, 1) for t in (332, 333.0, torch.tensor(666.0), np.int64(667), torch.tensor([999]))] == \
        [0, 1, 1, 2, 2]


def test_forward_refuses_fractional_and_out_of_range_timesteps(routed):
    router, experts, _ = routed
    x = torch.randn(3, 1, 8, 8)
    with pytest.raises(ValueError, match=r"timesteps \[332.5\] are not integers: diffusion timesteps here are"):
        router(x, torch.tensor([10.0, 332.5, 700.0]))
    for t in ([-1, 5, 6], [10, 20, 1000]):
        with pytest.raises(IndexError, match=r"timesteps -?\d+..\d+ are outside the router's 0..999"):
            router(x, torch.tensor(t))
    assert not any(e.seen for e in experts)
    torch.testing.assert_close(router(x, torch.tensor([10.0, 500.0, 700.0])), router(x, torch.tensor([10, 500, 700])))


@pytest.mark.parametrize("kind", ["v", 1, "epsilon ", "flow_prediction"])
def test_a_prediction_type_diffusers_does_not_take_is_refused_where_it_is_given(routed, tmp_path, kind):
    # attack 2026-12-07g row 722: Router(prediction_type="v") was accepted, and sampling then asked for "a scheduler
    # with prediction_type='v'"; a scheduler of such a type failed inside diffusers' step() after a model call
    # (sample, TDCPipeline), was trained on as if it were "sample" (train), or was called a manifest to re-export
    from diffusers import DDPMScheduler

    from tdcdiff.bundle import save_bundle
    from tdcdiff.pipeline import TDCPipeline
    from tdcdiff.train import TrainConfig, train

    router, experts, grouping = routed
    valid = (r" must be one of 'epsilon', 'v_prediction', 'sample' \(diffusers' names: v-prediction is "
             rf"'v_prediction'\), got {kind!r}$")
    with pytest.raises(ValueError, match="^prediction_type" + valid):
        Router(experts, grouping, prediction_type=kind)
    with pytest.raises(ValueError, match="^prediction_type" + valid):
        make_scheduler(1000, "linear", kind)
    scheduler = DDPMScheduler(prediction_type=kind)
    with pytest.raises(ValueError, match=r"^train_scheduler\.config\.prediction_type" + valid):
        sample(experts[0], scheduler, sample_shape=(1, 8, 8), steps=2, progress=False)
    with pytest.raises(ValueError, match=r"^scheduler\.config\.prediction_type" + valid):
        TDCPipeline(experts[0], scheduler, (1, 8, 8))
    with pytest.raises(ValueError, match=r"^scheduler\.config\.prediction_type" + valid):
        train(experts[0], torch.zeros(4, 1, 8, 8), scheduler, TrainConfig(steps=1, batch_size=2), tmp_path / "t")
    with pytest.raises(ValueError, match=r"^scheduler\.config\.prediction_type" + valid):
        save_bundle(tmp_path / "b", experts, grouping, scheduler, sample_shape=(1, 8, 8), expert_flops=[1, 1, 1],
                    base_flops=1)
    assert not (tmp_path / "t").exists() and not (tmp_path / "b").exists()
    for taken in ("epsilon", "v_prediction", "sample", None):
        assert Router(experts, grouping, prediction_type=taken).prediction_type == taken
