"""The bits/dim bound (likelihood.py) on Gaussian data, where the exact denoiser is known in closed form."""

import math
import warnings

import pytest
import torch
from diffusers import DDPMScheduler
from torch import nn

from tdcdiff.grouping import make_groups
from tdcdiff.likelihood import nll_bound, prior_bpd, quantize, timestep_strata, vb_terms
from tdcdiff.router import Router
from tdcdiff.schedule import make_scheduler

MU, SD = 0.1, 0.3  # every pixel ~ N(MU, SD^2), independent, then rounded to 8 bits


class GaussianDenoiser(nn.Module):
    """E[x_0 | x_t] for x_0 ~ N(MU, SD^2) per pixel (plus `bias`), output as the scheduler's prediction type;
    zero=True outputs zeros instead."""

    def __init__(self, scheduler, bias: float = 0.0, zero: bool = False, sd: float = SD):
        super().__init__()
        self.scheduler, self.bias, self.zero, self.sd = scheduler, bias, zero, sd

    def forward(self, x, t):
        if self.zero:
            return torch.zeros_like(x)
        a = self.scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
        x = x.double()
        x0 = MU + a.sqrt() * self.sd**2 / (a * self.sd**2 + 1 - a) * (x - a.sqrt() * MU) + self.bias
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        kind = self.scheduler.config.prediction_type
        out = eps if kind == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0 if kind == "v_prediction" else x0
        return out.float()


def gaussian_images(n: int = 64, seed: int = 0, sd: float = SD) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return quantize((MU + sd * torch.randn(n, 1, 4, 4, generator=g)).clamp(-1, 1)).float()


def quantized_entropy_bits(sd: float = SD) -> float:
    """Entropy per pixel of N(MU, sd^2) rounded to the 256 8-bit bins (edge bins open-ended), in bits."""
    grid = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    upper = torch.special.ndtr((grid + 1 / 255 - MU) / sd)
    lower = torch.special.ndtr((grid - 1 / 255 - MU) / sd)
    p = torch.where(grid > 0.999, 1 - lower, torch.where(grid < -0.999, upper, upper - lower))
    return float(-torch.special.xlogy(p, p).sum() / math.log(2))


@pytest.fixture(scope="module")
def cosine50():
    return make_scheduler(50, "squaredcos_cap_v2")


def test_the_exact_denoiser_bounds_the_nll_tighter_than_wrong_ones_and_above_the_entropy(cosine50):
    images = gaussian_images(128)
    exact = nll_bound(GaussianDenoiser(cosine50), images, cosine50, samples=None).summary()
    biased = nll_bound(GaussianDenoiser(cosine50, bias=0.05), images, cosine50, samples=None).summary()
    zero = nll_bound(GaussianDenoiser(cosine50, zero=True), images, cosine50, samples=None).summary()
    assert exact["exact"] and exact["strata"] == 49
    bpd, se = exact["total"]["mean"], exact["total"]["se"]
    assert bpd + 0.1 < biased["total"]["mean"] and bpd + 1.0 < zero["total"]["mean"]
    # An upper bound on the NLL: not below the data's entropy (7.30 bits); with 50 steps and a fixed variance
    # it is loose (8.43), and more steps tighten it (T = 1000: 7.96).
    entropy = quantized_entropy_bits()
    assert entropy - 3 * se < bpd < entropy + 1.5, (bpd, se, entropy)
    cosine1000 = make_scheduler(1000, "squaredcos_cap_v2")
    finer = nll_bound(GaussianDenoiser(cosine1000), images, cosine1000, samples=32).summary()["total"]
    assert entropy - 3 * finer["se"] < finer["mean"] < bpd - 0.2, (finer, bpd)


def test_the_sampled_estimate_agrees_with_the_full_sum_within_its_standard_error(cosine50):
    images = gaussian_images(256)
    grouping = make_groups("uniform", 3, cosine50)
    model = GaussianDenoiser(cosine50, bias=0.03)
    full = nll_bound(model, images, cosine50, grouping=grouping, samples=None, seed=1).summary()
    sampled = nll_bound(model, images, cosine50, grouping=grouping, samples=6, seed=2).summary()
    assert not sampled["exact"] and sampled["strata"] <= 6 + 2
    for key in ("total", *(f"group {g}" for g in range(3))):
        a = full["total"] if key == "total" else full["groups"][key]
        b = sampled["total"] if key == "total" else sampled["groups"][key]
        assert abs(a["mean"] - b["mean"]) < 4 * math.hypot(a["se"], b["se"]), (key, a, b)
    assert sampled["total"]["se"] < 0.05 * sampled["total"]["mean"]


def test_group_shares_and_prior_add_up_to_the_total_for_each_image(cosine50):
    grouping = make_groups("snr", 4, cosine50)
    for samples in (None, 5):
        bound = nll_bound(GaussianDenoiser(cosine50, bias=0.02), gaussian_images(16), cosine50, grouping=grouping,
                          samples=samples)
        assert bound.groups.shape == (16, 4) and (bound.groups > 0).all()
        direct = bound.prior.clone()
        for g in range(4):
            direct += bound.groups[:, g]
        torch.testing.assert_close(bound.total, direct, rtol=1e-12, atol=0)
        summary = bound.summary()
        assert summary["total"]["mean"] == pytest.approx(
            summary["prior"]["mean"] + sum(v["mean"] for v in summary["groups"].values()), rel=1e-12)
    # The full bound's group share is the sum of its terms, each from the same noise as a direct call.
    full = nll_bound(GaussianDenoiser(cosine50), gaussian_images(4), cosine50, grouping=grouping, samples=None)
    assert full.groups[:, 0].min() >= full.decoder.min()  # the decoder term sits in the group holding t = 0


def test_decoder_and_prior_terms_match_hand_computed_values(cosine50):
    # One image of three pixels: the lowest bin, a middle bin (0.2 = 153/127.5 - 1) and the highest bin.
    x0 = torch.tensor([-1.0, 0.2, 1.0], dtype=torch.float64).view(1, 1, 1, 3)
    prediction = torch.tensor([-1 + 3 / 512, 0.2 + 5 / 1000, 1 - 1 / 512]).view(1, 1, 1, 3)  # float32 x_0 outputs
    low, mid, high = prediction.flatten().double().tolist()
    sample_scheduler = make_scheduler(50, "squaredcos_cap_v2", "sample")
    term = vb_terms(lambda x, t: prediction.expand_as(x), x0, torch.zeros(1, dtype=torch.long),
                    torch.randn(1, 1, 1, 3), sample_scheduler)
    betas = sample_scheduler.betas.double()
    abar = torch.cumprod(1 - betas, 0)
    sd = math.sqrt(betas[1] * (1 - abar[0]) / (1 - abar[1]))  # beta_tilde_1, used at t = 0
    cdf = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    p_low = cdf((-1 - low + 1 / 255) / sd)
    p_mid = cdf((0.2 - mid + 1 / 255) / sd) - cdf((0.2 - mid - 1 / 255) / sd)
    p_high = 1 - cdf((1 - high - 1 / 255) / sd)
    expected = -(math.log(p_low) + math.log(p_mid) + math.log(p_high)) / 3 / math.log(2)
    assert float(term) == pytest.approx(expected, rel=1e-9)
    # Prior: KL(N(sqrt(a) x, 1 - a) || N(0, 1)) per pixel, a = abar_{T-1}, averaged, in bits.
    a = float(abar[-1])
    kl = [0.5 * (-1 - math.log(1 - a) + (1 - a) + a * x * x) for x in (-1.0, 0.2, 1.0)]
    assert float(prior_bpd(x0, sample_scheduler)) == pytest.approx(sum(kl) / 3 / math.log(2), rel=1e-9)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_epsilon_v_and_sample_prediction_give_the_same_finite_bound(variance):
    images = gaussian_images(32)
    values = []
    for kind in ("epsilon", "v_prediction", "sample"):
        scheduler = make_scheduler(50, "linear", kind)
        bound = nll_bound(GaussianDenoiser(scheduler), images, scheduler, samples=8, variance=variance, seed=3)
        assert torch.isfinite(bound.total).all() and bound.summary()["variance"] == variance
        values.append(bound.summary()["total"]["mean"])
    assert values[1] == pytest.approx(values[0], rel=1e-3) and values[2] == pytest.approx(values[0], rel=1e-3)


def test_which_fixed_variance_is_tighter_depends_on_the_data_as_ho_et_al_say(cosine50):
    # DDPM (Ho et al. 2020, sec. 3.2): beta_t is the optimal reverse variance for x_0 ~ N(0, I), beta_tilde_t for
    # x_0 at one point. Both are valid bounds (not below the entropy); which is tighter follows the data's spread.
    for sd, tighter in ((SD, "fixed_large"), (0.01, "fixed_small")):
        images = gaussian_images(64, sd=sd)
        bounds = {v: nll_bound(GaussianDenoiser(cosine50, sd=sd), images, cosine50, samples=None, variance=v)
                  .summary()["total"] for v in ("fixed_small", "fixed_large")}
        for b in bounds.values():
            assert b["mean"] > quantized_entropy_bits(sd) - 3 * b["se"]
        looser = "fixed_small" if tighter == "fixed_large" else "fixed_large"
        assert bounds[tighter]["mean"] < bounds[looser]["mean"], (sd, bounds)


def test_a_router_of_exact_experts_gives_the_single_models_bound(cosine50):
    grouping = make_groups("uniform", 2, cosine50)
    router = Router([GaussianDenoiser(cosine50), GaussianDenoiser(cosine50)], grouping)
    images = gaussian_images(16)
    single = nll_bound(GaussianDenoiser(cosine50), images, cosine50, grouping=grouping, samples=4, batch_size=5)
    routed = nll_bound(router, images, cosine50, grouping=grouping, samples=4, batch_size=5)
    torch.testing.assert_close(routed.groups, single.groups)
    assert all(n > 0 for n in router.samples_routed)


def test_strata_follow_log_snr_and_the_group_edges(cosine50):
    assert timestep_strata(cosine50, None) == list(range(1, 51))
    assert timestep_strata(cosine50, 100) == list(range(1, 51))
    edges = timestep_strata(cosine50, 6, [20, 35])
    assert edges[0] == 1 and edges[-1] == 50 and {20, 35} <= set(edges) and len(edges) <= 6 + 2 + 1
    assert edges == sorted(set(edges))


def test_strata_on_a_zero_terminal_snr_schedule_span_its_finite_levels():
    # log-SNR at t=T-1 is -inf; the 16 strata are of equal log-SNR width over t = 0..T-2 (hand-checked with
    # numpy: the first t whose log-SNR is below each level), not collapsed onto the group edges
    scheduler = DDPMScheduler(rescale_betas_zero_snr=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        edges = timestep_strata(scheduler, 16, [103, 695])
    assert edges == [1, 4, 14, 41, 103, 229, 403, 564, 695, 799, 880, 935, 969, 986, 994, 997, 1000]
    assert timestep_strata(scheduler, 16, [500]) == sorted({*edges, 500})


@pytest.mark.parametrize("change, message", [
    (dict(images=torch.full((2, 1, 4, 4), 3.0)), r"images span \[3.000, 3.000\] but the bits/dim bound needs"),
    (dict(samples=0), "samples .* must be at least 1"),
    (dict(variance="learned"), "unknown variance 'learned'"),
    (dict(grouping=make_groups("uniform", 2, make_scheduler(100))), "the grouping covers T=100 timesteps"),
])
def test_bad_input_is_rejected_with_the_fix(cosine50, change, message):
    args = dict(images=gaussian_images(2), samples=4, variance="fixed_small", grouping=None) | change
    with pytest.raises(ValueError, match=message):
        nll_bound(GaussianDenoiser(cosine50), args.pop("images"), cosine50, **args)


def test_paired_differences_cancel_image_to_image_variation(cosine50):
    images = gaussian_images(64)
    exact = nll_bound(GaussianDenoiser(cosine50), images, cosine50, samples=16)
    biased = nll_bound(GaussianDenoiser(cosine50, bias=0.01), images, cosine50, samples=16)
    difference = biased.difference(exact)["total"]
    per_image = biased.total - exact.total
    assert difference["mean"] == pytest.approx(float(per_image.mean()))
    assert difference["se"] == pytest.approx(float(per_image.std()) / 8)
    # A small bias: the images' own spread (most of each bound's SE) cancels in the pairs.
    assert difference["mean"] > 3 * difference["se"] and difference["se"] < exact.summary()["total"]["se"] / 3
    other = nll_bound(GaussianDenoiser(cosine50), images[:16], cosine50, grouping=make_groups("uniform", 2, cosine50),
                      samples=4)
    with pytest.raises(ValueError, match=r"\(16, 2\) images x groups and 5 strata with \(64, 1\) and 12"):
        other.difference(exact)
