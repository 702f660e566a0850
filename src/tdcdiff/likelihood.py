"""The variational bound on the negative log-likelihood of images, in bits per dimension, as IDDPM reports it.

For a diffusion model with T steps, -log p(x_0) <= L_prior + sum_{t=0}^{T-1} L_t, where (0-indexed t, as
diffusers and IDDPM index the training timesteps)

    L_prior = KL(q(x_{T-1} | x_0) || N(0, I))                          (no model in it)
    L_t     = E_{x_t ~ q(x_t | x_0)} KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))     for t >= 1
    L_0     = E_{x_0' ~ q(x_0' | x_0)} -log p(x_0 | x_0')   (the decoder: a Gaussian discretized to 256 bins)

each in bits and averaged over the C x H x W dimensions of an image. This follows openai/improved-diffusion,
improved_diffusion/gaussian_diffusion.py (commit 6051920c): `calc_bpd_loop` (all T terms, one x_t draw per
term), `_vb_terms_bpd` (the KL for t >= 1, the decoder term at t = 0) and `_prior_bpd`; and
improved_diffusion/losses.py: `normal_kl` and `discretized_gaussian_log_likelihood` (images in [-1, 1], bins
of width 2/255, the two edge bins open-ended). Two deliberate differences: the standard normal CDF is the
exact one (torch.special.ndtr / log_ndtr) instead of IDDPM's tanh approximation, and all arithmetic after the
model call is float64.

The models here predict epsilon, v or x_0 (the scheduler's prediction_type) and have FIXED variances; the
reverse-step variance is one of DDPM's two choices (IDDPM's ModelVarType FIXED_SMALL / FIXED_LARGE):
"fixed_small" = the posterior variance beta_tilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t) (diffusers'
DDPMScheduler default, and the default here), or "fixed_large" = beta_t. Both use beta_tilde_1 at t = 0, as
IDDPM does. IDDPM's headline numbers use a learned variance; a fixed variance still gives a valid (looser)
upper bound. As in IDDPM's default, the model's x_0 prediction is clipped to [-1, 1] (the sampler does too).

All T terms cost N x T model calls. `nll_bound(samples=K)` instead estimates sum_{t>=1} L_t without bias from
about K timesteps per image, stratified in log-SNR (see `timestep_strata`); IDDPM's own alternative for
training is importance sampling of t by the history of L_t, which an evaluation of a fixed model does not
need. Every number comes with its standard error over images, and two models measured with the same images
and seed can be compared image by image (`Bound.difference`).

Images are first rounded to the 8-bit grid (k / 127.5 - 1), so the number bounds the NLL of 8-bit images
and is comparable across data sets and with published bits/dim.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from .grouping import Grouping, finite_snr_db
from .models import as_denoiser
from .schedule import alphas_cumprod64, predict_x0

VARIANCES = ("fixed_small", "fixed_large")
LN2 = math.log(2.0)


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Round images in [-1, 1] to the 8-bit grid k / 127.5 - 1 (k = 0..255); same shape.

    Raises ValueError if any value lies outside [-1, 1] (beyond rounding).
    """
    low, high = float(images.min()), float(images.max())
    if low < -1.001 or high > 1.001:
        raise ValueError(f"images span [{low:.3f}, {high:.3f}] but the bits/dim bound needs images in [-1, 1]; "
                         "scale them as x / 127.5 - 1 from 8-bit values")
    return ((images.double().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def _schedule(scheduler, variance: str) -> dict[str, torch.Tensor]:
    """Per-timestep float64 coefficients (each of shape (T,)) of q(x_{t-1} | x_t, x_0) and p's log-variance."""
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; choose one of {VARIANCES}")
    betas = scheduler.betas.to(torch.float64)
    abar = alphas_cumprod64(scheduler)
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    posterior_var = betas * (1 - abar_prev) / (1 - abar)
    # beta_tilde_0 = 0: both choices use beta_tilde_1 at t = 0, as IDDPM's posterior_log_variance_clipped does.
    true_log_var = torch.log(torch.cat([posterior_var[1:2], posterior_var[1:]]))
    model_log_var = true_log_var if variance == "fixed_small" else torch.log(torch.cat([posterior_var[1:2], betas[1:]]))
    return {
        "abar": abar,
        "coef_x0": betas * abar_prev.sqrt() / (1 - abar),
        "coef_xt": (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar),
        "true_log_var": true_log_var,
        "model_log_var": model_log_var,
    }


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats, elementwise (broadcasting)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) in nats, elementwise, of N(mean, e^(2 log_scale)) discretized to the 256 bins of 8-bit images.

    x: images on the 8-bit grid in [-1, 1]; bin k is [x - 1/255, x + 1/255], the first and last extend to
    -inf / +inf. mean, log_scale: broadcastable to x. Bins of probability below 1e-12 count as 1e-12.
    """
    inv_sd = torch.exp(-log_scale)
    upper = inv_sd * (x - mean + 1 / 255)
    lower = inv_sd * (x - mean - 1 / 255)
    middle = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    return torch.where(x < -0.999, torch.special.log_ndtr(upper),
                       torch.where(x > 0.999, torch.special.log_ndtr(-lower), middle))


def prior_bpd(x0: torch.Tensor, scheduler) -> torch.Tensor:
    """L_prior = KL(q(x_{T-1} | x_0) || N(0, I)) in bits/dim; x0: (N, C, H, W) in [-1, 1] -> (N,) float64."""
    abar = _schedule(scheduler, "fixed_small")["abar"][-1].to(x0.device)
    kl = normal_kl(abar.sqrt() * x0.double(), torch.log(1 - abar), 0.0, torch.zeros((), dtype=torch.float64))
    return kl.flatten(1).mean(1) / LN2


@torch.no_grad()
def vb_terms(model, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, scheduler, *,
             variance: str = "fixed_small", clip: bool = True, labels: torch.Tensor | None = None) -> torch.Tensor:
    """The bound's term L_t of each image at its own timestep, from one draw of x_t; bits/dim.

    model: any denoiser (called through models.as_denoiser, so a Router works). x0: (N, C, H, W) on the
    8-bit grid in [-1, 1] (see `quantize`). t: (N,) int64 timesteps in 0..T-1 (0 gives the decoder term).
    noise: (N, C, H, W) standard normal, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise. variance:
    "fixed_small" or "fixed_large". clip: clip the predicted x_0 to [-1, 1]. labels: (N,) class ids for a
    class-conditional model. Returns (N,) float64.
    """
    c = {k: v.to(x0.device) for k, v in _schedule(scheduler, variance).items()}
    shape = (-1,) + (1,) * (x0.ndim - 1)
    x0 = x0.double()
    a = c["abar"][t].view(shape)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise.double()
    output = as_denoiser(model)(x_t.float(), t, labels)
    x0_pred = predict_x0(scheduler, x_t, output.double(), t)
    if clip:
        x0_pred = x0_pred.clamp(-1, 1)
    coef_x0, coef_xt = c["coef_x0"][t].view(shape), c["coef_xt"][t].view(shape)
    true_log_var, model_log_var = c["true_log_var"][t].view(shape), c["model_log_var"][t].view(shape)
    model_mean = coef_x0 * x0_pred + coef_xt * x_t
    kl = normal_kl(coef_x0 * x0 + coef_xt * x_t, true_log_var, model_mean, model_log_var)
    decoder = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
    terms = torch.where((t == 0).view(shape), decoder, kl)
    return terms.flatten(1).mean(1) / LN2


@dataclass
class Bound:
    """The bound for each image, split into the prior and the model's terms summed per timestep group.

    groups: (N, G) bits/dim, image i's terms L_t summed over the t of group g (the decoder L_0 is in the group
        holding t = 0); with sampled t, an unbiased estimate of that sum. prior: (N,) L_prior. decoder: (N,)
        L_0 (already inside groups). grouping: the groups (None: one group of all t). strata: the number of
        strata of 1..T-1, one sampled t each (T-1: every term computed, the bound itself). seconds: wall time.
    """

    groups: torch.Tensor
    prior: torch.Tensor
    decoder: torch.Tensor
    grouping: Grouping | None
    strata: int
    variance: str
    clip: bool
    num_train_timesteps: int
    seconds: float

    @property
    def exact(self) -> bool:
        """True when every term was computed (no sampling of t)."""
        return self.strata == self.num_train_timesteps - 1

    @property
    def total(self) -> torch.Tensor:
        """(N,) bits/dim: each image's bound, prior plus every group's share."""
        return self.groups.sum(1) + self.prior

    def method(self) -> str:
        """One sentence on how the numbers were measured."""
        t = self.num_train_timesteps
        terms = (f"all {t} terms, one x_t draw each" if self.exact else
                 f"the decoder term L_0 plus an unbiased stratified estimate of the other {t - 1}: 1..{t - 1} cut "
                 f"into {self.strata} contiguous strata (equal log-SNR widths, cut at group edges), one t drawn "
                 "uniformly in each per image, its term weighted by the stratum's size")
        return (f"variational bound on the NLL of {len(self.prior)} held-out 8-bit images in bits/dim "
                f"(IDDPM calc_bpd_loop): prior + {terms}; reverse variance {self.variance} "
                f"({'beta_tilde_t' if self.variance == 'fixed_small' else 'beta_t'}), x_0 prediction "
                f"{'clipped to [-1, 1]' if self.clip else 'unclipped'}; ± is the standard error over images")

    def summary(self) -> dict:
        """JSON-able means and standard errors over images (bits/dim): "total", "prior", "decoder", and with a
        grouping "groups" {"group i": ...}; total = prior + sum of the groups, image by image. Also the
        measurement's "images", "strata", "exact", "variance", "seconds" and "method"."""
        return {
            "total": _stats(self.total),
            "prior": _stats(self.prior),
            "decoder": _stats(self.decoder),
            **({"groups": _group_stats(self.groups)} if self.grouping is not None else {}),
            "images": len(self.prior),
            "strata": self.strata,
            "exact": self.exact,
            "variance": self.variance,
            "seconds": self.seconds,
            "method": self.method(),
        }

    def difference(self, other: Bound) -> dict:
        """This bound minus `other`'s, image by image: {"total": {"mean", "se"}, "groups": {"group i": ...}}
        in bits/dim. Paired: measured with the same images and seed (hence the same t and noise), the
        image-to-image variation cancels, so the standard error is usually well below either bound's own
        (digits, a model after 600 vs 150 training steps, K=16: 0.023 against 0.052 and 0.063).
        Raises ValueError when the two were measured on other image counts, groups or strata.
        """
        if self.groups.shape != other.groups.shape or self.strata != other.strata:
            raise ValueError(f"cannot pair bounds over {tuple(self.groups.shape)} images x groups and {self.strata} "
                             f"strata with {tuple(other.groups.shape)} and {other.strata}; measure both with the "
                             "same images, grouping, samples and seed")
        return {"total": _stats(self.total - other.total), "groups": _group_stats(self.groups - other.groups)}


def _stats(values: torch.Tensor) -> dict:
    """Mean and its standard error (sample sd / sqrt(n); NaN for one value) of a 1-D tensor."""
    se = float(values.std(unbiased=True)) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return {"mean": float(values.mean()), "se": se}


def _group_stats(groups: torch.Tensor) -> dict:
    return {f"group {g}": _stats(groups[:, g]) for g in range(groups.shape[1])}


def timestep_strata(scheduler, samples: int | None, cuts: list[int] = ()) -> list[int]:
    """Edges of the strata the timesteps 1..T-1 are cut into for sampling: `samples` parts of equal width in
    log-SNR (as far as whole timesteps allow: fewer where one step spans several), also cut at `cuts` (group
    boundaries, so no stratum straddles two groups). None or samples >= T-1: one stratum per timestep.
    Returns the sorted edges, 1 first and T last.

    Why log-SNR: with fixed_small variance L_t = (SNR(t-1) - SNR(t)) / 2 x E|x_0 - x_0_hat|^2 per dim (in nats),
    and a denoiser's x_0 error grows about like 1/SNR(t) at low noise, so L_t is about proportional to the
    log-SNR step; equal log-SNR strata hold about equal shares of the bound, which keeps the estimate's variance
    low. Equal-count strata put t = 1..T/K in one stratum, whose terms differ by orders of magnitude.
    The levels are the schedule's finite ones (grouping.finite_snr_db; SNR-dB is log-SNR times 10 / ln 10, so
    equal widths are the same): on a zero-terminal-SNR schedule t = T-1 counts as the last finite level.
    Raises ValueError if no level is finite.
    """
    num_train = scheduler.config.num_train_timesteps
    if samples is None or samples >= num_train - 1:
        edges = range(1, num_train + 1)
    else:
        levels_db = finite_snr_db(scheduler)
        # a stratum edge e means t = e is the first step whose SNR is below the level
        levels = np.linspace(levels_db[0], levels_db[-1], samples + 1)[1:-1]
        edges = [1, *np.searchsorted(-levels_db, -levels).clip(2, num_train - 1).tolist(), num_train]
    return sorted({*edges, *(c for c in cuts if 1 < c < num_train)})


@torch.no_grad()
def nll_bound(
    model,
    images: torch.Tensor,
    scheduler,
    *,
    grouping: Grouping | None = None,
    samples: int | None = 16,
    variance: str = "fixed_small",
    clip: bool = True,
    batch_size: int = 256,
    seed: int = 0,
    labels: torch.Tensor | None = None,
) -> Bound:
    """The variational bound on -log p(x) of each image in bits/dim, in full or estimated from sampled t.

    model: any denoiser (a diffusers UNet2DModel, a pruned copy, a tdcdiff Router) trained on `scheduler`.
    images: (N, C, H, W) in [-1, 1], rounded to the 8-bit grid first; on the model's device.
    grouping: split the model's terms by timestep group (a grouping.Grouping over the same T); None: one group.
    samples: K, about how many t per image estimate sum_{t>=1} L_t: 1..T-1 is cut into at most K contiguous
        strata of equal log-SNR width (`timestep_strata`; also cut at the group edges, so up to K + G - 1), one
        t is drawn uniformly in each stratum per image, and its term counts stratum-size times (stratified
        sampling: unbiased, and far less variable than K independent uniform draws, since L_t changes by orders
        of magnitude along t). L_0 and L_prior are always computed. None (or K >= T-1): all T terms, N x T
        model calls.
    variance: "fixed_small" (beta_tilde_t) or "fixed_large" (beta_t). clip: clip the x_0 prediction to [-1, 1].
    batch_size: images per model call. seed: the timesteps and noise (drawn on the CPU, so the same on any
        device); use one seed for every model compared, so their estimates share t and noise (paired).
    labels: (N,) class ids of the images, for a class-conditional model.
    Returns a Bound (per-image values; `.summary()` gives means and standard errors).
    Raises ValueError for images outside [-1, 1], K < 1, an unknown variance or a grouping over another T.
    """
    start = time.perf_counter()
    num_train = scheduler.config.num_train_timesteps
    if grouping is not None and grouping.num_train_timesteps != num_train:
        raise ValueError(f"the grouping covers T={grouping.num_train_timesteps} timesteps but the scheduler has "
                         f"T={num_train}; pass the grouping made for this scheduler")
    if samples is not None and samples < 1:
        raise ValueError(f"samples (timesteps per image) must be at least 1, or None for all T terms; got {samples}")
    if len(images) == 0:
        raise ValueError("nll_bound needs at least one image")
    _schedule(scheduler, variance)  # fails early on an unknown variance
    model = as_denoiser(model).eval()
    x0 = quantize(images)
    n = len(x0)
    edges = torch.tensor(grouping.boundaries[1:-1] if grouping is not None else [], dtype=torch.long)
    strata = timestep_strata(scheduler, samples, edges.tolist())
    shares = torch.zeros(n, len(edges) + 1, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)

    def add(t: torch.Tensor, weight: float) -> torch.Tensor:
        """Add weight x L_t of every image (t: (N,)) to its group's share; returns the (N,) terms."""
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        terms = torch.cat([
            vb_terms(model, x0[i:i + batch_size], t[i:i + batch_size].to(x0.device),
                     noise[i:i + batch_size].to(x0.device), scheduler, variance=variance, clip=clip,
                     labels=None if labels is None else labels[i:i + batch_size]).cpu()
            for i in range(0, n, batch_size)])
        shares.index_put_((torch.arange(n), torch.bucketize(t, edges, right=True)), weight * terms, accumulate=True)
        return terms

    decoder = add(torch.zeros(n, dtype=torch.long), 1.0)
    for low, high in zip(strata, strata[1:]):
        size = high - low
        add(low + (torch.rand(n, generator=generator, dtype=torch.float64) * size).long().clamp(max=size - 1), size)
    return Bound(shares, prior_bpd(x0, scheduler).cpu(), decoder, grouping, len(strata) - 1, variance, clip, num_train,
                 time.perf_counter() - start)
