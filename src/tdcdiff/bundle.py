"""A bundle: the group experts, their timestep groups and the noise schedule, in one copyable directory.

    bundle/
      manifest.json      format, schedule, groups, budgets, measured FLOPs per expert, provenance, files
      expert_0/          architecture.json (plain data) + model.safetensors, one directory per group
      ...

Nothing is unpickled on load: weights are safetensors, architectures JSON; every file's presence, size and
sha256 are checked against the manifest (the weights' as they are read).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .grouping import Grouping
from .router import Router
from .serialization import atomic_dir, load_model, save_model, sha256_file

FORMAT = "tdcdiff-bundle/1"
MANIFEST = "manifest.json"


class BundleError(ValueError):
    """A bundle directory is missing, incomplete, corrupted or of another format version."""


def save_bundle(
    path: str | Path,
    experts: list[nn.Module],
    grouping: Grouping,
    scheduler,
    *,
    sample_shape: tuple[int, int, int],
    expert_flops: list[int],
    base_flops: int,
    budgets: list[int] | None = None,
    provenance: dict | None = None,
    conditioning: dict | None = None,
) -> Path:
    """Write a bundle atomically (a temporary directory renamed into place).

    experts: the group models, in group order. grouping: their timestep groups.
    scheduler: the training noise schedule (its config is stored). sample_shape: (C, H, W).
    expert_flops: measured FLOPs per expert forward (batch 1); base_flops: the unpruned model's.
    budgets: the planned FLOPs budget per group. provenance: data, steps, seeds... (free-form JSON).
    conditioning: for class-conditional experts, {"num_class_embeds", "num_classes" (of the data),
        "null_class" (the id for dropped labels, needed for guidance; None without label dropout)}.
    """
    path = Path(path)
    with atomic_dir(path) as tmp:
        files = {}
        for i, expert in enumerate(experts):
            save_model(expert, tmp / f"expert_{i}")
            for file in sorted((tmp / f"expert_{i}").iterdir()):
                files[f"expert_{i}/{file.name}"] = {"bytes": file.stat().st_size, "sha256": sha256_file(file)}
        manifest = {
            "format": FORMAT,
            "scheduler": {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")},
            "sample_shape": list(sample_shape),
            "grouping": grouping.to_dict(),
            "budgets": budgets,
            "expert_flops": list(expert_flops),
            "base_flops": base_flops,
            "flops_convention": "2 x multiply-accumulates, one forward pass, batch 1",
            "provenance": provenance or {},
            "conditioning": conditioning,
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=list))
    return path


def read_manifest(path: str | Path) -> dict:
    """The bundle's manifest, after checking its format, every file's presence and size, and the sha256 of
    every file but the weights (load_model checks those as it reads them)."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"no bundle at {path}: the directory does not exist")
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{manifest_path} is missing: {path} is not a complete tdcdiff bundle") from None
    except ValueError as err:
        raise BundleError(f"{manifest_path} is not valid JSON ({err}); the bundle is corrupted") from err
    if manifest.get("format") != FORMAT:
        raise BundleError(
            f"{manifest_path} has format {manifest.get('format')!r}, this tdcdiff reads {FORMAT!r}; "
            "re-export the bundle with this version"
        )
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.exists():
            raise BundleError(f"bundle file {file} is missing; copy the whole bundle directory")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise BundleError(f"bundle file {file} is truncated or corrupted: expected {expected['bytes']} bytes, found {size}")
        # Weights are hashed by load_model as it reads them; the small files are hashed here.
        if file.suffix != ".safetensors" and sha256_file(file) != expected["sha256"]:
            raise BundleError(f"bundle file {file} is corrupted: its sha256 does not match the manifest")
    return manifest


@dataclass
class Bundle:
    """A loaded bundle: the router (a denoiser), the training schedule and the manifest."""

    router: Router
    scheduler: object
    manifest: dict

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["sample_shape"])

    def pipeline(self):
        from .pipeline import TDCPipeline

        return TDCPipeline(self.router, self.scheduler, self.sample_shape, null_class=self.null_class)

    @property
    def null_class(self) -> int | None:
        """The class id the experts were trained with for dropped labels (guidance needs it), or None."""
        return (self.manifest.get("conditioning") or {}).get("null_class")


def load_bundle(path: str | Path, *, device: str | torch.device = "cpu") -> Bundle:
    """Load a bundle: returns Bundle(router, scheduler, manifest); `.pipeline()` gives a sampling pipeline."""
    from diffusers import DDPMScheduler

    path = Path(path)
    manifest = read_manifest(path)
    grouping = Grouping.from_dict(manifest["grouping"])
    scheduler = DDPMScheduler.from_config(manifest["scheduler"])
    if scheduler.config.num_train_timesteps != grouping.num_train_timesteps:
        raise BundleError(
            f"{path / MANIFEST}: scheduler T={scheduler.config.num_train_timesteps} but groups cover "
            f"T={grouping.num_train_timesteps}"
        )
    experts = []
    for i in range(len(grouping)):
        try:
            experts.append(load_model(path / f"expert_{i}"))
        except (ValueError, RuntimeError, OSError) as err:
            raise BundleError(f"cannot load expert {i} of bundle {path}: {err}") from err
    router = Router(experts, grouping, manifest["expert_flops"]).to(device).eval()
    return Bundle(router, scheduler, manifest)
