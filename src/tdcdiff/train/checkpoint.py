"""A training directory on disk: the resumable checkpoint, the finished weights and summary, and the fingerprint
that keeps a run from resuming another's checkpoint.

    out_dir/
      checkpoint/    model.safetensors, optimizer.safetensors, ema.safetensors (with EMA),
                     projections.safetensors (with feature distillation), state.json (step, loss, fingerprint,
                     the optimizer's and EMA's non-tensor state)
      final/         the weights to use (EMA when enabled), as serialization.save_model writes them
      log.jsonl      one line per log_every steps (see log.py)
      train.json     the summary of a finished run (steps, fingerprint, loss, FLOPs, settings)

Everything is safetensors + JSON, so resuming never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ..files import atomic_dir, atomic_write_text, check_replaceable, holds, read_json_file
from ..serialization import A_SAVED_MODEL, load_model, save_model, saved_model_files
from .config import TrainConfig

CHECKPOINT_DIR = "checkpoint"
FINAL_DIR = "final"
LOG_FILE = "log.jsonl"
SUMMARY_FILE = "train.json"

# An existing checkpoint folder is replaced only when it is one: save_checkpoint's files and nothing else.
CHECKPOINT_FILES = holds("state.json", "model.safetensors", optional=("optimizer.safetensors",
                                                                      "projections.safetensors", "ema.safetensors"))
A_CHECKPOINT = "a training checkpoint, nor empty"


def fingerprint(config: TrainConfig, timesteps: torch.Tensor, num_images: int, teacher: bool, model: nn.Module) -> str:
    """Identifies the run so a checkpoint is never resumed under different settings or for another architecture.

    `steps` is part of it: the learning-rate schedule depends on it, so a longer run is a different run.
    """
    # A setting added later is left out at its default, so runs made before it still resume.
    settings = {k: v for k, v in asdict(config).items()
                if k not in ("checkpoint_every", "log_every") and not (k == "feature_distill_weight" and v == 0)}
    settings.update(num_images=num_images, teacher=teacher,
                    timesteps=hashlib.sha256(timesteps.numpy().tobytes()).hexdigest(),
                    shapes=[[name, list(p.shape)] for name, p in model.state_dict().items()])
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _flatten_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state_dict as (tensors for safetensors, the rest for JSON)."""
    tensors, scalars = {}, {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def check_outputs(out_dir: Path) -> None:
    """Refuse before training when a folder the run will replace whole, out_dir/checkpoint or out_dir/final, is
    not its own earlier output (e.g. holds the user's files): files.check_replaceable's ValueError, which would
    otherwise come after all the steps."""
    check_replaceable(out_dir / CHECKPOINT_DIR, CHECKPOINT_FILES, A_CHECKPOINT)
    check_replaceable(out_dir / FINAL_DIR, saved_model_files, A_SAVED_MODEL)


def save_checkpoint(out_dir: Path, step: int, loss: float, fingerprint: str, model: nn.Module, optimizer, ema,
                    distiller: nn.Module | None) -> None:
    """Replace out_dir/checkpoint, whole, with the state after `step` steps (ema: diffusers EMAModel or None)."""
    from safetensors.torch import save_file  # looked up at call time, so a test can stand in a full disk

    with atomic_dir(out_dir / CHECKPOINT_DIR, CHECKPOINT_FILES, A_CHECKPOINT) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        if distiller is not None:  # trained with the model, so a resumed run needs them; never in final/
            save_file({k: v.detach().cpu().contiguous() for k, v in distiller.state_dict().items()},
                      tmp / "projections.safetensors")
        opt_tensors, opt_meta = _flatten_optimizer_state(optimizer.state_dict())
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        meta = {"step": step, "loss": loss, "fingerprint": fingerprint, "optimizer": opt_meta}
        if ema is not None:
            save_file({str(i): p.detach().cpu().contiguous() for i, p in enumerate(ema.shadow_params)},
                      tmp / "ema.safetensors")
            meta["ema"] = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
        (tmp / "state.json").write_text(json.dumps(meta))


def load_checkpoint(out_dir: Path, fingerprint: str, model: nn.Module, optimizer, ema,
                    distiller: nn.Module | None) -> tuple[int, float]:
    """Restore out_dir/checkpoint into the given objects; returns (step, loss).

    Raises ValueError, naming the fix, when the checkpoint is unreadable, damaged or another run's (another
    fingerprint).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    ckpt = out_dir / CHECKPOINT_DIR
    try:
        meta = json.loads((ckpt / "state.json").read_text())
        saved_fingerprint = meta["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as err:  # unreadable, not JSON, not the expected object
        raise ValueError(f"checkpoint {ckpt} is unreadable ({type(err).__name__}: {err}); delete {ckpt} to start "
                         "this stage over") from None
    if saved_fingerprint != fingerprint:
        raise ValueError(
            f"the checkpoint in {ckpt} was written with different training settings; "
            "use a new output directory, or delete it to start over"
        )
    try:
        model.load_state_dict(load_file(ckpt / "model.safetensors"))
        if distiller is not None:
            distiller.load_state_dict(load_file(ckpt / "projections.safetensors"))
        optimizer.load_state_dict(_unflatten_optimizer_state(load_file(ckpt / "optimizer.safetensors"),
                                                             meta["optimizer"]))
        if ema is not None:
            shadow = load_file(ckpt / "ema.safetensors")
            ema.load_state_dict({**meta["ema"], "shadow_params": [shadow[str(i)] for i in range(len(shadow))]})
        return int(meta["step"]), float(meta["loss"])
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as err:
        reason = " ".join(str(err).split())  # load_state_dict's messages span lines
        raise ValueError(f"checkpoint {ckpt} is damaged ({type(err).__name__}: {reason}); delete {ckpt} to start "
                         "this stage over") from None


def finished_summary(out_dir: Path, fingerprint: str) -> dict | None:
    """The train.json of a run with this fingerprint that finished in out_dir (final/ written), else None."""
    summary_path = out_dir / SUMMARY_FILE
    if not ((out_dir / FINAL_DIR).exists() and summary_path.exists()):
        return None
    done = read_json_file(summary_path, f"delete {summary_path}: this stage is then trained again (from its "
                                        "checkpoint when there is one)")
    return done if done.get("fingerprint") == fingerprint else None


def load_final(out_dir: Path, model: nn.Module) -> None:
    """Load the finished weights of out_dir/final into `model` (a module with the same architecture)."""
    model.load_state_dict(load_model(out_dir / FINAL_DIR).state_dict())


def save_final(out_dir: Path, model: nn.Module, summary: dict) -> None:
    """Write the finished weights to out_dir/final, then the summary to out_dir/train.json (last: a run counts
    as finished only when both are there)."""
    save_model(model, out_dir / FINAL_DIR)
    atomic_write_text(out_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
