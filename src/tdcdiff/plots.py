"""The figures: the grouping over SNR, each group's budget against its expert, loss per timestep, FID against
FLOPs. Files only (no window), written atomically."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from .files import atomic_write_bytes
from .grouping import Grouping
from .schedule import snr_db


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only; never opens a window)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, *, dpi: int = 110) -> Path:
    """Write a matplotlib figure as PNG atomically (readers never see half a file) and close it.

    fig: the matplotlib Figure. path: the PNG to write. dpi: resolution.
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    pyplot().close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def plot_grouping(grouping: Grouping, scheduler, path: str | Path, *, budgets: list[float] | None = None) -> Path:
    """PNG of SNR-dB over t with the group boundaries drawn (and each group's FLOPs budget, if given)."""
    plt = pyplot()
    t = np.arange(grouping.num_train_timesteps)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(t, snr_db(scheduler, torch.as_tensor(t)).numpy(), color="black", lw=1.5, label="SNR (dB)")
    for edge in grouping.boundaries[1:-1]:
        ax.axvline(edge, color="tab:red", ls="--", lw=1)
    for g in grouping.groups:
        label = f"G{g.index}" + (f"\n{budgets[g.index]:.0%} F" if budgets else "")
        ax.text((g.start + g.end) / 2, ax.get_ylim()[1], label, ha="center", va="top", fontsize=8)
    ax.set_xlabel("timestep t")
    ax.set_ylabel("SNR (dB)")
    ax.set_title(f"{len(grouping)} groups, strategy '{grouping.strategy}'")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_fid_vs_flops(results: dict, path: str | Path) -> Path:
    """Scatter of FID (mean, error bar = sd over seeds) against mean sampling FLOPs per image."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [m["sampling_flops"]["per_image"] / 1e6 for m in results["models"]]
    for x, m in zip(xs, results["models"]):
        ax.errorbar(x, m["fid"]["mean"], yerr=m["fid"]["sd"], fmt="o", capsize=4, label=m["name"])
    ax.set_xlim(0, 1.08 * max(xs))  # from zero, so a 20% saving looks like one
    ax.set_xlabel("sampling MFLOPs per image (2 x MACs)")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title("quality against sampling cost")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_budgets(plan: dict, manifest: dict, path: str | Path) -> Path:
    """Bar chart per group: the planned FLOPs budget and the measured FLOPs of its expert, as fractions of F."""
    plt = pyplot()
    base = plan["base_flops"]
    budgets = np.array(plan["budgets"]) / base
    measured = np.array(manifest["expert_flops"]) / base
    x = np.arange(len(budgets))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(x - 0.2, budgets, 0.4, label="budget")
    ax.bar(x + 0.2, measured, 0.4, label="measured")
    for i, (b, m) in enumerate(zip(budgets, measured)):
        ax.text(i + 0.2, m, f"{m / b - 1:+.1%}", ha="center", va="bottom", fontsize=8)
    groups = plan["grouping"]["groups"]
    ax.set_xticks(x, [f"G{g['index']}\nt {g['start']}-{g['end'] - 1}" for g in groups], fontsize=8)
    ax.set_ylabel("FLOPs / base FLOPs")
    how = "given fractions" if plan["k"] is None else f"k={plan['k']}, ordering '{plan['ordering']}'"
    ax.set_title(f"FLOPs per group ({how})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_loss_per_t(curves: dict, boundaries: list[int], path: str | Path) -> Path:
    """Per-timestep denoising loss of each model (log scale) and each curve relative to the first.

    curves: name -> array of T losses (losses.per_timestep_loss); boundaries: group edges to draw.
    """
    plt = pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    (ref_name, ref), *_ = curves.items()
    for name, loss in curves.items():
        top.plot(loss, label=name, lw=1.2)
        if name != ref_name:
            bottom.plot(np.asarray(loss) / ref, label=f"{name} / {ref_name}", lw=1.2)
    bottom.axhline(1.0, color="gray", lw=0.8)
    for ax in (top, bottom):
        for edge in boundaries[1:-1]:
            ax.axvline(edge, color="tab:red", ls="--", lw=0.8)
    top.set_yscale("log")
    top.set_ylabel("denoising loss")
    top.legend(fontsize=8)
    bottom.set_ylabel("relative")
    bottom.set_xlabel("timestep t")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
