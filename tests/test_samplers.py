"""Every sampler x step count x prediction type x schedule, against an exact denoiser for Gaussian data.

With data x0 ~ N(MU, SD^2) per pixel, E[x0 | x_t] is known in closed form, so the only error left is the
sampler's own: a correct sampler starts in the noisiest group, visits every group, stays finite and ends
with the data's mean, and, with enough steps, its sd. Each sampler's images are also held against a
hand-written float64 implementation of its paper's update over the same visited timesteps, fed the same noise.
"""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from torch import nn

from tdcdiff.grouping import make_groups
from tdcdiff.pipeline import SAMPLERS, TIMESTEP_SPACING, sample
from tdcdiff.router import Router
from tdcdiff.samplers import ZERO_SNR_ALPHA_BAR, make_sampler, step_takes_generator, visited_timesteps
from tdcdiff.schedule import make_scheduler

MU, SD = 0.5, 0.2
N = 4
SHAPE = (1, 4, 4)
BATCH = 256  # 4096 pixels: the standard error of the mean is about SD / 64 = 0.003
SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "zero-snr", "sigmoid")


def training_schedule(T, schedule, prediction_type):
    """make_scheduler's schedule (linear betas scaled by 1000/T, so x_{T-1} is pure noise at every T, which is
    what every sampler starts from); "zero-snr": the linear one with diffusers' rescale_betas_zero_snr, as a
    pipeline's scheduler config with that key gives (alpha_bar = 0 at t=T-1); "sigmoid": diffusers'
    DDPMScheduler's sigmoid betas between the same scaled ends, a schedule a pipeline may carry and DDIM's,
    DPM-Solver's, PNDM's and Euler's scheduler classes lack (the samplers are given its betas)."""
    if schedule in ("zero-snr", "sigmoid"):
        linear = make_scheduler(T, "linear", prediction_type)
        changes = {"rescale_betas_zero_snr": True} if schedule == "zero-snr" else {"beta_schedule": "sigmoid"}
        return DDPMScheduler.from_config(linear.config, **changes)
    return make_scheduler(T, schedule, prediction_type)


def exact_x0(a, x):
    """E[x0 | x_t = x] for N(MU, SD^2) data at alpha_bar a (float64)."""
    return MU + SD**2 * a.sqrt() / (a * SD**2 + 1 - a) * (x - a.sqrt() * MU)


def exact_output(kind, a, x):
    """The Bayes-optimal prediction of type `kind` at alpha_bar a (float64)."""
    x0 = exact_x0(a, x)
    eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
    return {"epsilon": eps, "sample": x0, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}[kind]


class ExactGaussianDenoiser(nn.Module):
    """The Bayes-optimal prediction (epsilon, v or x0) for N(MU, SD^2) data; records the timesteps it saw."""

    def __init__(self, scheduler):
        super().__init__()
        self.register_buffer("alpha_bar", scheduler.alphas_cumprod.to(torch.float64))
        self.kind = scheduler.config.prediction_type
        self.seen: list[int] = []

    def forward(self, x, t):
        self.seen.append(int(t[0]))
        assert bool((t == t[0]).all())  # the sampling loop's batches share one t
        return exact_output(self.kind, self.alpha_bar[t[0]], x.double()).float()


# -- the references: each paper's update in float64, over the visited timesteps ------------------------------------
def to_x0_eps(kind, a, x, out):
    """(x0, epsilon) implied by a model output at alpha_bar a."""
    if kind == "epsilon":
        return (x - (1 - a).sqrt() * out) / a.sqrt(), out
    if kind == "v_prediction":
        return a.sqrt() * x - (1 - a).sqrt() * out, a.sqrt() * out + (1 - a).sqrt() * x
    return out, (x - a.sqrt() * out) / (1 - a).sqrt()


def reference_ddim(x, visited, kind, model_levels, levels, clip, generator):
    """DDIM, eta = 0 (Song et al. 2021, eq. 12): x' = sqrt(a') x0 + sqrt(1 - a') eps, to the next visited timestep
    and from the last to x0 (a' = 1); x0 clipped to [-1, 1] when the schedule clips."""
    for i, t in enumerate(visited):
        x0, eps = to_x0_eps(kind, levels[t], x, exact_output(kind, model_levels[t], x))
        x0 = x0.clamp(-1, 1) if clip else x0
        a_next = levels[visited[i + 1]] if i + 1 < len(visited) else torch.tensor(1.0, dtype=torch.float64)
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x


def reference_ddpm(x, visited, kind, model_levels, levels, clip, generator):
    """Ancestral sampling (Ho et al. 2020, eqs. 6-7) between visited timesteps: the posterior q(x_s | x_t, x0) with
    beta = 1 - a_t / a_s and variance beta (1 - a_s) / (1 - a_t), a_s = 1 after the last; its noise drawn from
    `generator` as diffusers draws it (one randn of the batch's shape per step at t > 0)."""
    for i, t in enumerate(visited):
        a = levels[t]
        x0, _ = to_x0_eps(kind, a, x, exact_output(kind, model_levels[t], x))
        x0 = x0.clamp(-1, 1) if clip else x0
        a_prev = levels[visited[i + 1]] if i + 1 < len(visited) else torch.tensor(1.0, dtype=torch.float64)
        beta = 1 - a / a_prev
        mean = a_prev.sqrt() * beta / (1 - a) * x0 + (1 - beta).sqrt() * (1 - a_prev) / (1 - a) * x
        if t > 0:
            noise = torch.randn(x.shape, generator=generator).double()
            x = mean + ((1 - a_prev) / (1 - a) * beta).clamp(min=1e-20).sqrt() * noise
        else:
            x = mean
    return x


def reference_dpm_solver(x, visited, kind, model_levels, levels, clip, generator):
    """DPM-Solver++(2M) (Lu et al. 2022, algorithm 2; diffusers' "midpoint" form), first order at the first step
    and at the last, which goes to sigma = 0 (x0)."""
    lam = [0.5 * torch.log(levels[t] / (1 - levels[t])) for t in visited]  # log(alpha / sigma)
    previous = None
    for i, t in enumerate(visited):
        x0, _ = to_x0_eps(kind, levels[t], x, exact_output(kind, model_levels[t], x))
        if i + 1 == len(visited):
            return x0
        a_next = levels[visited[i + 1]]
        h = lam[i + 1] - lam[i]
        derivative = x0 if previous is None else x0 + (x0 - previous[0]) * h / (2 * previous[1])
        x = (1 - a_next).sqrt() / (1 - levels[t]).sqrt() * x - a_next.sqrt() * (torch.exp(-h) - 1) * derivative
        previous = (x0, h)


def _log_snr(levels, visited):
    """lambda = log(alpha / sigma) at each visited timestep, and +inf after the last (sigma = 0: x0)."""
    return [0.5 * torch.log(levels[t] / (1 - levels[t])) for t in visited] + [torch.tensor(float("inf"))]


def reference_unipc(x, visited, kind, model_levels, levels, clip, generator):
    """UniPC with B(h) = e^h - 1 ("bh2") on the data prediction x0 (Zhao et al. 2023, algorithms 1-2, in
    diffusers' form): each step's model output first corrects the state it was computed at (UniC, from the state
    before the last predictor step), then the predictor (UniP) steps on from the corrected state. UniP is of order
    1 at the first and last steps and 2 between, UniC of the order of the UniP step before it. With the points'
    log-SNR ratios r, the orders' coefficients a solve the Vandermonde system R a = g / B(h), g_k = k! h phi_{k+1}(h)
    (the phi functions of exponential integrators, at hh = -h); UniP-2 and UniC-1 take a = 1/2 (diffusers' choice).
    The last UniP step, order 1 to sigma = 0, returns the model's x0."""
    n = len(visited)
    alpha = [levels[t].sqrt() for t in visited] + [torch.tensor(1.0, dtype=torch.float64)]
    sigma = [(1 - levels[t]).sqrt() for t in visited] + [torch.tensor(0.0, dtype=torch.float64)]
    lam = _log_snr(levels, visited)
    m = []  # the model's x0 at each step

    def base(i, j, state):  # the first-order (DDIM) step from point i to point j, with B(h) = e^(-h) - 1
        b = torch.expm1(-(lam[j] - lam[i]))
        return sigma[j] / sigma[i] * state - alpha[j] * b * m[i], b

    corrected_from, order = None, 0
    for i, t in enumerate(visited):
        x0, _ = to_x0_eps(kind, levels[t], x, exact_output(kind, model_levels[t], x))
        m.append(x0)
        if corrected_from is not None:  # UniC: from point i-1's corrected state to point i, with m[i]
            x, b = base(i - 1, i, corrected_from)
            hh = -(lam[i] - lam[i - 1])
            g1 = torch.expm1(hh) / hh - 1  # hh phi_2(hh)
            if order == 1:
                x = x - alpha[i] * b * 0.5 * (m[i] - m[i - 1])
            else:
                g2 = g1 / hh - 0.5  # hh phi_3(hh)
                r = (lam[i - 2] - lam[i - 1]) / (lam[i] - lam[i - 1])
                b1, b2 = g1 / b, 2 * g2 / b
                a1 = (b1 - b2) / (1 - r)  # [[1, 1], [r, 1]] (a1, a2) = (b1, b2)
                x = x - alpha[i] * b * (a1 * (m[i - 2] - m[i - 1]) / r + (b1 - a1) * (m[i] - m[i - 1]))
        order = 1 if i in (0, n - 1) else 2
        corrected_from = x
        x, b = base(i, i + 1, x)  # UniP
        if order == 2:
            r = (lam[i - 1] - lam[i]) / (lam[i + 1] - lam[i])
            x = x - alpha[i + 1] * b * 0.5 * (m[i - 1] - m[i]) / r
    return x


def reference_deis(x, visited, kind, model_levels, levels, clip, generator):
    """DEIS with the exponential integrator in rho = sigma / alpha (Zhang & Chen 2023, eq. 15, "rho AB-DEIS"):
    x / alpha moves by the integral of epsilon over rho, and epsilon is extrapolated from the last two steps by a
    Lagrange polynomial in log rho (diffusers' "logrho"), order 2; first order at the first step, and at the last,
    to rho = 0, where x / alpha - rho_s eps is the model's x0."""
    rho = [((1 - levels[t]) / levels[t]).sqrt() for t in visited]

    def integral(upper, lower, log_c):  # of (log rho - log_c) d rho, from lower to upper
        return upper * (upper.log() - 1 - log_c) - lower * (lower.log() - 1 - log_c)

    previous = None
    for i, t in enumerate(visited):
        x0, eps = to_x0_eps(kind, levels[t], x, exact_output(kind, model_levels[t], x))
        if i + 1 == len(visited):
            return x0
        a_next = levels[visited[i + 1]].sqrt()
        if previous is None:
            x = a_next * (x / levels[t].sqrt() + (rho[i + 1] - rho[i]) * eps)
        else:
            log_now, log_before = rho[i].log(), rho[i - 1].log()
            c_now = integral(rho[i + 1], rho[i], log_before) / (log_now - log_before)
            c_before = integral(rho[i + 1], rho[i], log_now) / (log_before - log_now)
            x = a_next * (x / levels[t].sqrt() + c_now * eps + c_before * previous)
        previous = eps


def reference_pndm(x, visited, kind, model_levels, levels, clip, generator):
    """PLMS (Liu et al. 2022, eq. 12): epsilon extrapolated from the last 4 steps by the Adams-Bashforth formula
    (55 e_0 - 59 e_1 + 37 e_2 - 9 e_3) / 24, of lower order while fewer are known ((3 e_0 - e_1) / 2, (23 e_0 - 16 e_1
    + 5 e_2) / 12, first order at the first step), moved by the transfer of eq. 11, x' = sqrt(a'/a) x - (a' - a) e /
    (a sqrt(1 - a') + sqrt(a (1 - a) a')), to the next visited timestep and from the last to x0 (a' = 1)."""
    weights = {1: [1], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}
    history = []
    for i, t in enumerate(visited):
        a = levels[t]
        _, eps = to_x0_eps(kind, a, x, exact_output(kind, model_levels[t], x))
        history = [eps, *history[:3]]
        e = sum(w * h for w, h in zip(weights[len(history)], history))
        a_next = levels[visited[i + 1]] if i + 1 < len(visited) else torch.tensor(1.0, dtype=torch.float64)
        x = (a_next / a).sqrt() * x - (a_next - a) * e / (a * (1 - a_next).sqrt() + (a * (1 - a) * a_next).sqrt())
    return x


def reference_euler(x, visited, kind, model_levels, levels, clip, generator):
    """Euler's method on the probability-flow ODE dx/dsigma = (x - x0(x)) / sigma in x = x_t / alpha_t, sigma =
    sqrt((1 - a) / a) (Karras et al. 2022, eq. 3 and algorithm 2 without churn): from the noise times
    sqrt(sigma_0^2 + 1), the model fed x / sqrt(sigma^2 + 1), each step x += (sigma' - sigma) (x - x0) / sigma, to
    sigma = 0 after the last visited timestep."""
    sigma = [((1 - levels[t]) / levels[t]).sqrt() for t in visited] + [torch.tensor(0.0, dtype=torch.float64)]
    x = x * (sigma[0] ** 2 + 1).sqrt()
    for i, t in enumerate(visited):
        scaled = x / (sigma[i] ** 2 + 1).sqrt()
        x0, _ = to_x0_eps(kind, levels[t], scaled, exact_output(kind, model_levels[t], scaled))
        x = x + (sigma[i + 1] - sigma[i]) * (x - x0) / sigma[i]
    return x


REFERENCES = {"ddpm": reference_ddpm, "ddim": reference_ddim, "dpm-solver++": reference_dpm_solver,
              "unipc": reference_unipc, "deis": reference_deis, "pndm": reference_pndm, "euler": reference_euler}
# diffusers' multistep solvers put a zero terminal alpha_bar at 2**-24, so their sigma stays finite
# (scheduling_dpmsolver_multistep.py; samplers.ZERO_SNR_ALPHA_BAR for UniPC and DEIS); the model still saw 0
CLAMPS_ZERO_SNR = ("dpm-solver++", "unipc", "deis", "pndm", "euler")


def reference_images(sampler, scheduler, steps, seed):
    """The reference's images for `sample(..., seed=seed)`: the same initial noise (and, for DDPM, step noise)."""
    levels = model_levels = scheduler.alphas_cumprod.to(torch.float64)
    if sampler in CLAMPS_ZERO_SNR and levels[-1] == 0:
        levels = levels.clone()
        levels[-1] = 2.0**-24
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((BATCH, *SHAPE), generator=generator).double()
    visited = visited_timesteps(steps, scheduler.config.num_train_timesteps)
    return REFERENCES[sampler](x, visited, scheduler.config.prediction_type, model_levels, levels,
                               scheduler.config.clip_sample, generator).clamp(-1, 1)


def step_counts(T):
    counts = {1, 2, 3, N - 1, N, 7, 13, 50, T - 1, T}  # 7 and 13 divide neither T
    if T == 1000:  # T-1 and T steps are covered at the small T, where they cost 50 calls instead of 1000
        counts -= {T - 1, T}
    return sorted(c for c in counts if c <= T)


# A sampler with enough steps gets close to the data's sd; each solver's own discretisation error at 50
# steps leaves it a little below (measured: ddpm 0.157-0.174, ddim 0.172-0.189, dpm-solver++ 0.186-0.198, pndm
# 0.195-0.199, euler 0.172-0.184).
MIN_SD_AT_50_STEPS = {"ddpm": 0.145, "ddim": 0.16, "dpm-solver++": 0.175, "unipc": 0.175, "deis": 0.17, "pndm": 0.185,
                      "euler": 0.165}
# Largest pixel difference from the float64 reference: float32 rounding only (measured: at most 4e-6), and for an
# epsilon model that rounding divided by sqrt(alpha_bar) where x0 = (x - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)
# at t=T-1 (measured: up to 6.4e-7 / sqrt(alpha_bar_{T-1}), 1.3e-2 for cosine at T=1000, in one step).
REFERENCE_TOLERANCE = 2e-5
EPSILON_ROUNDING = 1e-6
# DEIS steps on epsilon whatever the model predicts (diffusers' convert_model_output), x / alpha + rho eps, so its
# float32 rounding is an epsilon model's (measured: up to 1.5e-7 / sqrt(alpha_bar_{T-1}), 3.1e-3 for cosine at T=1000);
# PLMS steps on epsilon too, and Euler's state x / alpha is sigma_max ~ 1 / sqrt(alpha_bar_{T-1}) times the noise.
EPSILON_FORM = ("deis", "pndm", "euler")


@pytest.mark.parametrize("T", [1000, 50])
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampler_recovers_gaussian_data_with_an_exact_denoiser(sampler, prediction_type, schedule, T):
    scheduler = training_schedule(T, schedule, prediction_type)
    grouping = make_groups("uniform", N, scheduler)
    experts = [ExactGaussianDenoiser(scheduler) for _ in range(N)]
    router = Router(experts, grouping)
    if schedule == "zero-snr" and prediction_type == "epsilon":
        with pytest.raises(ValueError, match=r"zero terminal SNR \(alpha_bar is 0 at t=T-1.*predicts epsilon"):
            sample(router, scheduler, sample_shape=SHAPE, sampler=sampler, steps=3, num_images=2, progress=False)
        return
    tolerance = REFERENCE_TOLERANCE
    if prediction_type == "epsilon" or sampler in EPSILON_FORM:
        terminal = scheduler.alphas_cumprod[-1].item() or ZERO_SNR_ALPHA_BAR  # the solvers' in place of 0
        tolerance += EPSILON_ROUNDING / terminal**0.5
    for steps in step_counts(T):
        for expert in experts:
            expert.seen.clear()
        result = sample(router, scheduler, sample_shape=SHAPE, sampler=sampler, steps=steps, num_images=BATCH,
                        batch_size=BATCH, seed=0, progress=False)
        where = f"{sampler}, {steps} of T={T} steps"
        images = result.images
        assert result.timestep_spacing == TIMESTEP_SPACING == "trailing"
        assert torch.isfinite(images).all(), f"{where}: non-finite pixels"
        assert len(result.timesteps) == steps and len(set(result.timesteps)) == steps, where
        assert result.timesteps[0] == T - 1, f"{where}: first step at t={result.timesteps[0]}, not T-1"
        assert experts[-1].seen[:1] == [T - 1], f"{where}: the noisiest group's expert must take the first step"
        for expert, group in zip(experts, grouping.groups):
            assert all(group.start <= t < group.end for t in expert.seen), where
            if steps >= N:
                assert expert.seen, f"{where}: group {group.index} ({group.start}-{group.end - 1}) never visited"
        mean, sd = images.mean().item(), images.std().item()
        assert abs(mean - MU) < 0.015, f"{where}: mean {mean:.3f}, data {MU}"
        if steps == 1:
            # One step from pure noise returns E[x0 | x_{T-1}], which hardly depends on the noise.
            assert sd < 0.02, f"{where}: sd {sd:.3f}; one step should give the posterior mean, sd near 0"
        elif steps >= 50:
            assert MIN_SD_AT_50_STEPS[sampler] < sd < SD + 0.01, f"{where}: sd {sd:.3f}, data {SD}"
        else:
            assert 0.005 < sd < SD + 0.01, f"{where}: sd {sd:.3f}"
        difference = (images.double() - reference_images(sampler, scheduler, steps, seed=0)).abs().max().item()
        assert difference < tolerance, f"{where}: {difference:.2g} from the {sampler} reference"


def diffusers_trailing_fails(T, steps):
    """Whether diffusers' own trailing spacing returns other than `steps` timesteps (an extra t = -1)."""
    scheduler = DDPMScheduler(num_train_timesteps=T, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps) != steps


def assert_visits_and_ends_at_x0(sampler, visited, where):
    """The sampler (set to `visited`, predicting x0) holds exactly those timesteps, and its last step returns the
    model's x0 from any x."""
    x0 = torch.full((1, *SHAPE), MU)
    assert sampler.timesteps.tolist() == visited, where
    stochastic = {"generator": torch.Generator()} if step_takes_generator(sampler) else {}
    last = sampler.step(x0, visited[-1], torch.randn(x0.shape), **stochastic).prev_sample
    torch.testing.assert_close(last, x0, rtol=0, atol=1e-6, msg=where)


@pytest.mark.parametrize("T", [10, 100, 256, 1000])
def test_every_step_count_visits_its_timesteps_and_ends_at_x0(T):
    """At every step count 1..T each sampler takes exactly the visited timesteps (T-1 first, distinct, descending)
    and its last step, from any state, returns the model's x0: the whole trajectory at T=10, and at T=100 where
    diffusers' own trailing spacing appends t = -1."""
    scheduler = make_scheduler(T, "squaredcos_cap_v2", "sample")
    samplers = {name: make_sampler(name, scheduler) for name in SAMPLERS}
    for steps in range(1, T + 1):
        visited = visited_timesteps(steps, T)
        assert len(set(visited)) == steps and visited == sorted(visited, reverse=True), (T, steps)
        assert visited[0] == T - 1 and visited[-1] >= 0, (T, steps)
        for name, sampler in samplers.items():
            sampler.set_timesteps(timesteps=visited)
            assert_visits_and_ends_at_x0(sampler, visited, f"{name}, {steps} of T={T} steps")
        if T == 10 or (T == 100 and diffusers_trailing_fails(T, steps)):
            for name in SAMPLERS:
                images = sample(ExactGaussianDenoiser(scheduler), scheduler, sample_shape=SHAPE, sampler=name,
                                steps=steps, num_images=8, progress=False).images
                assert torch.isfinite(images).all() and abs(images.mean().item() - MU) < 0.1, (name, T, steps)
    with pytest.raises(ValueError, match=f"steps must be between 1 and the training schedule's T={T}, got {T + 1}"):
        visited_timesteps(T + 1, T)


def test_a_pipeline_scheduler_config_moves_neither_the_visited_timesteps_nor_the_end():
    """Settings a pipeline's scheduler config may carry into the training schedule (Stable Diffusion's DDIM
    set_alpha_to_one=False, DPM-Solver's Karras sigmas or last step to sigma_min, leading spacing) would end short
    of x0 or refuse the given timesteps: every sampler still visits them and ends at x0."""
    config = {**make_scheduler(1000, "scaled_linear", "sample").config, "set_alpha_to_one": False, "steps_offset": 1,
              "use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "timestep_spacing": "leading"}
    scheduler = DDPMScheduler.from_config(config)
    visited = visited_timesteps(13, 1000)
    for name in SAMPLERS:
        assert_visits_and_ends_at_x0(make_sampler(name, scheduler, visited), visited, name)


@pytest.mark.parametrize("schedule", ["sigmoid", "zero-snr", "random"])
def test_every_sampler_follows_the_training_betas_exactly(schedule):
    """Every sampler is given the training schedule's own betas (diffusers' trained_betas), so any betas a
    DDPMScheduler holds are followed to the bit: a beta_schedule the sampler's own class lacks (attack 2026-12-07g
    rows 724, 775: DDIMScheduler and DPMSolverMultistepScheduler raised NotImplementedError on "sigmoid"), a zero
    terminal SNR (not rescaled a second time) and hand-given betas."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if schedule == "random":
        betas = np.sort(np.random.default_rng(0).uniform(1e-4, 0.05, 1000))
        train = DDPMScheduler(trained_betas=betas, prediction_type="sample")
    else:
        train = training_schedule(1000, schedule, "sample")
    if schedule == "sigmoid":
        for lacking in (DDIMScheduler, DPMSolverMultistepScheduler):
            with pytest.raises(NotImplementedError, match="sigmoid is not implemented"):
                lacking.from_config(train.config)
    visited = visited_timesteps(13, 1000)
    for name in SAMPLERS:
        sampler = make_sampler(name, train, visited)
        torch.testing.assert_close(sampler.alphas_cumprod, train.alphas_cumprod, rtol=0, atol=0, msg=name)
        assert_visits_and_ends_at_x0(sampler, visited, f"{name}, {schedule}")


@pytest.mark.parametrize("timesteps", [[5, 5], [3, 7], [100, 3], [3, -1], []])
def test_given_timesteps_must_be_distinct_descending_training_timesteps(timesteps):
    for name in SAMPLERS:
        with pytest.raises(ValueError, match=r"timesteps must be distinct and descending within 0..99, got .*; e.g. "
                                             r"visited_timesteps\(steps, T\)"):
            make_sampler(name, make_scheduler(100), timesteps)


def test_steps_61_of_1000_that_diffusers_ends_at_t_minus_1():
    from tdcdiff.run import RunConfig

    RunConfig(sample_steps=61).validate()  # `tdcdiff run --steps 61` passes the settings check: sampling must work
    scheduler = make_scheduler(1000)
    assert diffusers_trailing_fails(1000, 61)  # the case the fix is for: np.arange's float step overshoots
    visited = visited_timesteps(61, 1000)
    assert (len(visited), visited[0], visited[-1]) == (61, 999, 15)
    grouping = make_groups("snr", N, scheduler)
    for sampler in SAMPLERS:
        result = sample(Router([ExactGaussianDenoiser(scheduler) for _ in range(N)], grouping), scheduler,
                        sample_shape=SHAPE, sampler=sampler, steps=61, num_images=4, progress=False)
        assert result.timesteps == visited and torch.isfinite(result.images).all()


def test_visited_timesteps_are_diffusers_trailing_ones_where_those_work():
    for T in (10, 100, 1000):
        for steps in range(1, T + 1):
            trailing = (np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1).tolist()
            assert visited_timesteps(steps, T) == trailing[:steps]


@pytest.mark.parametrize("steps", [7, 13, 15, 20, 50])
def test_ddim_steps_to_the_next_visited_timestep_and_to_x0(steps):
    """diffusers' DDIMScheduler goes from t to t - T // steps; at 13 of 1000 steps that skips past the visited
    timesteps and ends at alpha_bar_0 instead of x0. Ours matches a hand-written DDIM to float32 rounding."""
    scheduler = make_scheduler(1000, "linear", "epsilon")
    result = sample(ExactGaussianDenoiser(scheduler), scheduler, sample_shape=SHAPE, sampler="ddim", steps=steps,
                    num_images=BATCH, batch_size=BATCH, seed=3, progress=False)
    difference = (result.images.double() - reference_images("ddim", scheduler, steps, seed=3)).abs()
    assert difference.max() < 5e-6, difference.max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_half_precision_models_sample(dtype, sampler, tiny_unet, scheduler):
    full = sample(tiny_unet, scheduler, sample_shape=(1, 8, 8), sampler=sampler, steps=3, num_images=2,
                  progress=False)
    half = sample(tiny_unet.to(dtype), scheduler, sample_shape=(1, 8, 8), sampler=sampler, steps=3, num_images=2,
                  progress=False)
    assert half.images.dtype == torch.float32 and torch.isfinite(half.images).all()
    assert (half.images - full.images).abs().mean() < 0.03  # same model, rounded weights


@pytest.mark.parametrize("text, setting", [
    ("ddim:50", ("ddim", 50, 1, None)), ("dpm-solver++:20:c3", ("dpm-solver++", 20, 3, None)),
    ("unipc:10:c2:d2", ("unipc", 10, 2, 2)),
])
def test_a_sampling_setting_reads_and_writes_its_text(text, setting):
    from tdcdiff.sampling_setting import SamplingSetting

    parsed = SamplingSetting.parse(text)
    assert (parsed.sampler, parsed.steps, parsed.cache_interval, parsed.cache_depth) == setting
    assert str(parsed) == text and SamplingSetting.from_dict(parsed.to_dict(), "x") == parsed


@pytest.mark.parametrize("text, message", [
    ("ddim", "takes sampler:steps"), ("heun:10", "unknown sampler 'heun'"), ("ddim:0", "steps must be an integer >= 1"),
    ("ddim:ten", "sampling steps must be an integer >= 1, got 'ten'"), ("ddim:10:x3", "takes sampler:steps"),
    ("ddim:10:d2", "cache_depth"),
])
def test_a_bad_sampling_setting_is_one_line(text, message):
    from tdcdiff.sampling_setting import SamplingSetting

    with pytest.raises(ValueError, match=message):
        SamplingSetting.parse(text, "--reference")


def test_a_router_refuses_a_scheduler_of_another_prediction_type(tmp_path, tiny_unet):
    # attack 2026-12-07f row 569: an epsilon bundle's router sampled with a v_prediction scheduler read every
    # epsilon as v, with no word; a bundle's router records its experts' prediction type
    from tdcdiff.bundle import load_bundle, save_bundle
    from tdcdiff.flops import count_flops

    scheduler = make_scheduler(1000)
    flops = count_flops(tiny_unet, (1, 8, 8))
    path = save_bundle(tmp_path / "b", [tiny_unet, tiny_unet], make_groups("uniform", 2, scheduler), scheduler,
                       sample_shape=(1, 8, 8), expert_flops=[flops, flops], base_flops=flops)
    router = load_bundle(path).router
    assert router.prediction_type == "epsilon"
    with pytest.raises(ValueError, match=r"^the scheduler's prediction_type is 'v_prediction' but the router's "
                                         r"experts predict 'epsilon' \(they were trained so\); sample with the "
                                         r"bundle's own scheduler \(Bundle.scheduler\), or one with "
                                         r"prediction_type='epsilon'$"):
        sample(router, DDPMScheduler(prediction_type="v_prediction"), sample_shape=(1, 8, 8), steps=2,
               progress=False)
    assert sample(router, DDPMScheduler(), sample_shape=(1, 8, 8), steps=2, num_images=1, progress=False)


@pytest.mark.parametrize("given, lacks", [
    ("FlowMatchEulerDiscreteScheduler", "config.prediction_type, betas, alphas_cumprod"),
    ("ScoreSdeVeScheduler", "config.prediction_type, betas, alphas_cumprod"),
    ("KarrasVeScheduler", "config.num_train_timesteps, config.prediction_type, betas, alphas_cumprod"),
    (None, "config.num_train_timesteps, config.prediction_type, betas, alphas_cumprod"),
    ("dict", "config.num_train_timesteps, config.prediction_type, betas, alphas_cumprod; build it from a config dict "
             r"with DDPMScheduler.from_config\(config\)"),
])
def test_a_scheduler_without_betas_is_one_error_naming_what_sampling_and_training_take(given, lacks, tiny_unet,
                                                                                       tmp_path):
    # attack 2026-12-07f rows 566/567: AttributeError ('FrozenDict' object has no attribute 'prediction_type')
    import diffusers

    from tdcdiff.pipeline import TDCPipeline
    from tdcdiff.train import TrainConfig, train

    scheduler = dict(make_scheduler(1000).config) if given == "dict" else given and getattr(diffusers, given)()
    got = {None: "None", "dict": "a dict"}.get(given, f"a {given}")

    def message(name):
        return (rf"^{name} must be the training noise schedule, a diffusers scheduler of betas over T training "
                rf"timesteps \(e.g. DDPMScheduler: a bundle's Bundle.scheduler, or make_scheduler\(T\)\), got {got}, "
                rf"which has no {lacks}$")

    with pytest.raises(ValueError, match=message("train_scheduler")):
        sample(tiny_unet, scheduler, sample_shape=(1, 8, 8), steps=2, progress=False)
    with pytest.raises(ValueError, match=message("train_scheduler")):
        make_sampler("ddim", scheduler)
    with pytest.raises(ValueError, match=message("scheduler")):
        TDCPipeline(tiny_unet, scheduler, (1, 8, 8))
    with pytest.raises(ValueError, match=message("scheduler")):
        train(tiny_unet, torch.zeros(4, 1, 8, 8), scheduler, TrainConfig(steps=1, batch_size=2), tmp_path / "t")
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("betas, where", [
    (np.r_[np.full(50, 0.01), [1.5], np.full(49, 0.01)], r"alpha_bar at t=50 is -0.303 \(beta 1.5\)"),
    (np.r_[np.full(50, 0.01), [-0.5], np.full(49, 0.01)], r"alpha_bar at t=50 is 0.908 \(beta -0.5\)"),
    (np.r_[np.full(50, 0.01), [np.nan], np.full(49, 0.01)], r"alpha_bar at t=50 is nan \(beta nan\)"),
    (np.r_[np.full(50, 0.01), [1.0], np.full(49, 0.01)], r"alpha_bar at t=50 is 0 \(beta 1\)"),
    (np.zeros(100), r"alpha_bar at t=0 is 1 \(beta 0\)"),
])
def test_betas_no_sampler_can_follow_are_one_error_where_a_schedule_is_given(betas, where, tiny_unet, tmp_path):
    """Noise levels that are not finite and falling from below 1 to above 0 (a beta above 1, below 0, NaN, 1 before
    t=T-1, or all 0): sample() ended in "NaN/inf pixels ... check the model", train() in a non-finite output blamed on
    the time embedding, or trained and warned; now one error, before any sampling or writing."""
    from tdcdiff.pipeline import TDCPipeline
    from tdcdiff.train import TrainConfig, train

    scheduler = DDPMScheduler(num_train_timesteps=100, trained_betas=betas, prediction_type="v_prediction")
    message = (rf"^the noise schedule's betas give noise levels alpha_bar that are not finite and falling from below 1 "
               rf"to above 0: {where}; every beta must be in \[0, 1\), the first above 0, and 1 only at t=T-1 \(zero "
               rf"terminal SNR\); e.g. make_scheduler\(T\) or DDPMScheduler\(beta_schedule=...\)$")
    with pytest.raises(ValueError, match=message):
        sample(tiny_unet, scheduler, sample_shape=(1, 8, 8), steps=2, progress=False)
    with pytest.raises(ValueError, match=message):
        TDCPipeline(tiny_unet, scheduler, (1, 8, 8))
    with pytest.raises(ValueError, match=message):
        train(tiny_unet, torch.zeros(4, 1, 8, 8), scheduler, TrainConfig(steps=1, batch_size=2), tmp_path / "t",
              progress=False)
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("class_name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                                        "EulerDiscreteScheduler"])
def test_a_zero_snr_schedule_of_a_class_that_clips_alpha_bar_is_judged_by_its_betas(class_name):
    """diffusers' DPM-Solver, UniPC and Euler classes put alpha_bar_{T-1} = 2^-24 where their rescaled betas give 0.
    The samplers follow the betas, so such a schedule given as the training schedule is zero terminal SNR: an
    epsilon model is refused as on a DDPMScheduler (DDIM divided by 0 at t=T-1), and a v-prediction one samples with
    every sampler (a check of its own clipped alpha_bar called the last level rising)."""
    import diffusers

    given = getattr(diffusers, class_name)
    assert given(rescale_betas_zero_snr=True).alphas_cumprod[-1] == 2.0**-24
    with pytest.raises(ValueError, match=r"^the noise schedule has zero terminal SNR \(alpha_bar is 0 at t=T-1"):
        sample(ExactGaussianDenoiser(given(rescale_betas_zero_snr=True)), given(rescale_betas_zero_snr=True),
               sample_shape=SHAPE, steps=3, progress=False)
    scheduler = given(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    for name in SAMPLERS:
        images = sample(ExactGaussianDenoiser(scheduler), scheduler, sample_shape=SHAPE, sampler=name, steps=7,
                        num_images=8, progress=False).images
        assert torch.isfinite(images).all() and abs(images.mean().item() - MU) < 0.1, name
