import numpy as np
import pytest
import torch

from tdcdiff.budget import BudgetPlan, budget_fractions, difficulty_ranks, make_plan
from tdcdiff.grouping import STRATEGIES, Grouping, make_groups
from tdcdiff.losses import per_image_loss, per_timestep_loss
from tdcdiff.plots import plot_grouping
from tdcdiff.schedule import make_scheduler, snr_db


def loss_curve(T):
    # a curve with a sharp change at 600 so the DP has something to find
    t = np.arange(T)
    return np.where(t < 600, 0.02 + 0.0001 * t, 0.5)


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("n", [1, 3, 4, 7])
def test_groups_are_contiguous_cover_all_t_and_respect_min_size(schedule, strategy, n):
    scheduler = make_scheduler(1000, schedule)
    grouping = make_groups(strategy, n, scheduler, loss_per_t=loss_curve(1000))
    assert len(grouping) == n
    assert grouping.boundaries[0] == 0 and grouping.boundaries[-1] == 1000
    assert all(b < c for b, c in zip(grouping.boundaries, grouping.boundaries[1:]))
    assert all(g.size >= 1000 // (4 * n) for g in grouping.groups)
    assert [g.start for g in grouping.groups[1:]] == [g.end for g in grouping.groups[:-1]]
    t = torch.arange(1000)
    assigned = grouping.group_of(t)
    for g in grouping.groups:
        assert bool((assigned[g.start : g.end] == g.index).all())


def test_snr_groups_have_equal_snr_width_on_linear_schedule():
    scheduler = make_scheduler(1000, "linear")
    grouping = make_groups("snr", 4, scheduler, min_size=1)
    levels = snr_db(scheduler, torch.arange(1000)).numpy()
    widths = [levels[g.start] - levels[g.end - 1] for g in grouping.groups]
    assert max(widths) - min(widths) < 0.1 * (levels[0] - levels[-1])


def test_zero_terminal_snr_splits_by_the_finite_snr_levels_and_writes_valid_json(tmp_path):
    """diffusers' rescale_betas_zero_snr puts SNR-dB = -inf at t=T-1: the equal-width levels run down to the last
    finite level instead (before: targets [nan, -inf, -inf, -inf], edges [0, 814, 876, 938, 1000], 81% in one
    group, and -inf written to plan.json)."""
    import json

    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, rescale_betas_zero_snr=True, prediction_type="v_prediction")
    levels = snr_db(scheduler, torch.arange(1000)).numpy()
    assert levels[-1] == -np.inf and np.isfinite(levels[:-1]).all()
    grouping = make_groups("snr", 4, scheduler, min_size=1)
    assert grouping.boundaries == [0, 103, 695, 969, 1000]
    targets = np.linspace(levels[0], levels[-2], 5)[1:-1]
    for edge, target in zip(grouping.boundaries[1:-1], targets):
        assert levels[edge - 1] > target >= levels[edge]  # each edge is where the SNR crosses its level
    grouping = make_groups("snr", 4, scheduler)
    assert grouping.boundaries == [0, 103, 695, 938, 1000]  # the last group raised to the minimum size T/(4N)
    assert grouping.groups[-1].snr_db_end == levels[-2]
    plan = make_plan(grouping, k=0.5, ordering="snr-low-hard", base_flops=1000, sample_shape=(1, 8, 8))
    text = plan.save(tmp_path / "plan.json").read_text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"plan.json holds {name}, which is not JSON"))


def test_a_schedule_without_a_finite_snr_is_named():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=10, trained_betas=[1.0] * 10)  # alpha_bar = 0 everywhere
    with pytest.raises(ValueError, match=r"the noise schedule has no timestep with a finite SNR .*; check its betas"):
        make_groups("snr", 2, scheduler)


def test_cosine_tail_gets_min_size():
    scheduler = make_scheduler(1000, "squaredcos_cap_v2")
    grouping = make_groups("snr", 8, scheduler, min_size=50)
    assert min(g.size for g in grouping.groups) >= 50


def test_loss_strategy_cuts_where_the_loss_changes():
    grouping = make_groups("loss", 2, make_scheduler(1000), loss_per_t=loss_curve(1000))
    assert grouping.boundaries == [0, 600, 1000]


def test_grouping_round_trip_and_plot(tmp_path):
    scheduler = make_scheduler(1000)
    grouping = make_groups("snr", 4, scheduler)
    assert Grouping.from_dict(grouping.to_dict()) == grouping
    path = plot_grouping(grouping, scheduler, tmp_path / "g.png", budgets=[0.6, 0.7, 0.9, 1.0])
    assert path.stat().st_size > 1000


@pytest.mark.parametrize("strategy, n, message", [
    ("equal", 4, "unknown grouping strategy"), ("snr", 0, "between 1 and T"), ("snr", 1001, "between 1 and T"),
    ("loss", 4, "needs loss_per_t"),
])
def test_bad_grouping_settings(strategy, n, message):
    with pytest.raises(ValueError, match=message):
        make_groups(strategy, n, make_scheduler(1000))


def test_budget_formula_against_hand_values():
    # N=4, k=0.5: i/4 + (4-i)/4 * 0.5 -> 0.625, 0.75, 0.875, 1.0
    assert budget_fractions(4, 0.5) == pytest.approx([0.625, 0.75, 0.875, 1.0])
    # N=2, k=0.2: 0.5 + 0.5*0.2 = 0.6, then 1.0
    assert budget_fractions(2, 0.2) == pytest.approx([0.6, 1.0])
    assert budget_fractions(3, 1.0) == pytest.approx([1.0, 1.0, 1.0])


@pytest.mark.parametrize("n, k, message", [(4, 0.0, "k must be in"), (4, 1.5, "k must be in"), (0, 0.5, "N must be")])
def test_bad_budget_settings(n, k, message):
    with pytest.raises(ValueError, match=message):
        budget_fractions(n, k)


def test_orderings_and_plan_mean():
    assert difficulty_ranks("snr-low-hard", 3) == [1, 2, 3]
    assert difficulty_ranks("snr-high-hard", 3) == [3, 2, 1]
    assert difficulty_ranks("measured", 3, [0.5, 0.1, 0.9]) == [2, 1, 3]
    with pytest.raises(ValueError, match="unknown difficulty ordering"):
        difficulty_ranks("random", 3)
    grouping = make_groups("uniform", 4, make_scheduler(1000))
    plan = make_plan(grouping, k=0.5, ordering="snr-low-hard", base_flops=1000, sample_shape=(1, 8, 8))
    assert plan.budgets == [625, 750, 875, 1000]
    assert plan.mean_fraction == pytest.approx((0.625 + 0.75 + 0.875 + 1.0) / 4)
    assert BudgetPlan.from_dict(plan.to_dict()).budgets == plan.budgets


@pytest.mark.parametrize(
    "change, message",
    [
        ({"boundaries": [1000, 500, 0]}, r"'grouping.boundaries' must be integers rising strictly from 0 to T=1000"),
        ({"boundaries": [0, 200, 400, 600, 800, 1000]}, r"'grouping.groups' must hold one entry .* \(5 groups\)"),
        ({"boundaries": [0, 500, 999]}, r"rising strictly from 0 to T=1000 .*got \[0, 500, 999\]"),
        ({"boundaries": [0, 500.0, 1000]}, "'grouping.boundaries' must be integers"),
        ({"num_train_timesteps": "1000"}, r"'grouping.num_train_timesteps' must be a positive integer T, got '1000'"),
        ({"groups": None}, "'grouping.groups' must hold one entry"),
        ({"strategy": 3}, "'grouping.strategy' must be a string"),
    ],
)
def test_from_dict_refuses_inconsistent_groups(scheduler, change, message):
    """Group data read from files (bundles, plans) is validated; a good one round-trips."""
    data = make_groups("uniform", 2, scheduler).to_dict()
    assert Grouping.from_dict(data) == make_groups("uniform", 2, scheduler)
    with pytest.raises(ValueError, match=message):
        Grouping.from_dict({**data, **change})
    with pytest.raises(ValueError, match="'grouping' must be a mapping, got list"):
        Grouping.from_dict([])


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_per_image_loss_is_each_images_denoising_loss_at_the_measured_timesteps(tiny_unet, digits, prediction):
    """Against a direct computation (diffusers' add_noise and get_velocity) on the documented pick of images and
    noise; per_timestep_loss reduces the same errors, so at the measured points it is the images' mean."""
    scheduler = make_scheduler(1000, prediction_type=prediction)
    images, model = digits.images[:40], tiny_unet.eval()
    points, losses = per_image_loss(model, images, scheduler, num_points=5, images_per_point=8, seed=3)
    assert points.tolist() == [0, 250, 500, 749, 999] and losses.shape == (5, 8) and losses.dtype == torch.float32
    g = torch.Generator().manual_seed(3)
    x0 = images[torch.randperm(40, generator=g)[:8]]
    noise = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        for row, t_value in zip(losses, points):
            t = torch.full((8,), int(t_value))
            target = noise if prediction == "epsilon" else scheduler.get_velocity(x0, noise, t)
            direct = (model(scheduler.add_noise(x0, noise, t), t).sample - target).pow(2).mean((1, 2, 3))
            assert torch.allclose(row, direct, rtol=1e-4, atol=1e-7)
    assert len(set(losses[2].tolist())) == 8  # one value per image, not a batch mean repeated
    curve = per_timestep_loss(model, images, scheduler, num_points=5, images_per_point=8, seed=3)
    assert curve[points] == pytest.approx(losses.double().mean(1).numpy(), rel=1e-5)
    # more images asked for than given: all of them, each once
    assert per_image_loss(model, images[:6], scheduler, num_points=2, images_per_point=8)[1].shape == (2, 6)


def test_a_dry_run_refuses_an_edited_plan_as_the_run_does_before_measuring(tmp_path, tiny_unet, monkeypatch):
    """`tdcdiff run --dry-run` estimated from plan.json's fractions without the plan stage's check
    (run/plan_file.check_plan_fits): an edited plan (here its grouping boundaries, then its fractions) gave an
    estimate of a run that then refuses it. The dry run refuses it with the same message, before timing anything."""
    import json

    from conftest import tiny_config
    from tdcdiff.run import estimate
    from tdcdiff.run.stages import Stages

    tiny_unet.save_pretrained(tmp_path / "unet")
    run = Stages(tmp_path / "run", tiny_config(plan_fractions=[0.6, 1.0]), progress=False, base=str(tmp_path / "unet"))
    run.train_base()
    made = run.plan().grouping
    path = tmp_path / "run" / "plan" / "plan.json"
    original = json.loads(path.read_text())
    monkeypatch.setattr(estimate, "measure_unit_costs", lambda *a, **k: pytest.fail("measured an edited plan's run"))
    edited = json.loads(json.dumps(original))
    boundaries = edited["grouping"]["boundaries"] = [0, made.boundaries[1] + 7, 1000]
    for group, start, end in zip(edited["grouping"]["groups"], boundaries, boundaries[1:]):
        group.update(start=start, end=end, size=end - start)
    for plan in (edited, original | {"fractions": [0.05, 0.05]}):
        path.write_text(json.dumps(plan))
        with pytest.raises(ValueError) as by_the_run:
            Stages(tmp_path / "run", progress=False).prune()
        with pytest.raises(ValueError) as by_the_dry_run:
            estimate.estimate_run(Stages(tmp_path / "run", progress=False))
        assert str(by_the_dry_run.value) == str(by_the_run.value)
        assert str(by_the_run.value).startswith(f"{path}: ") and "(the plan was " in str(by_the_run.value)
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if not p.name.startswith(".")) == \
        ["base", "config.json", "plan"]
