"""Save and load (pruned) models without pickle, and write files and directories atomically.

A saved model is a directory with architecture.json (how to rebuild the UNPRUNED architecture, plus the
weights file's size and sha256) and model.safetensors (the state dict). Loading rebuilds the base
architecture, resizes every parameter and buffer to its saved shape, re-derives size attributes from the
new shapes and loads the weights strictly. This works where diffusers' save_pretrained / from_pretrained
cannot (a pruned UNet's config still states the unpruned widths) and needs neither torch.load nor pickle.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

from .models import Denoiser

ARCHITECTURE_FILE = "architecture.json"
WEIGHTS_FILE = "model.safetensors"


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync elsewhere
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _disk_full_names(path: Path) -> Iterator[None]:
    # A bare "[Errno 28] No space left on device" does not say what was being written.
    try:
        yield
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise OSError(
                errno.ENOSPC,
                f"no space left on device while writing {path}; nothing was half-written there. "
                "Free some space (or choose another output directory) and rerun: finished stages are kept",
            ) from err
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file so that readers see either the old content or the new one, never a partial file.

    path: the target file (parent directories are created). data: its new content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with _disk_full_names(path), os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """atomic_write_bytes for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory in a temporary sibling that replaces `path` whole when the block succeeds.

    Yields the temporary directory to write into. On success its files are fsynced and it is renamed to
    `path` (an existing `path` is replaced); if the block raises, it is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        with _disk_full_names(path):
            yield tmp
            for root, _, files in os.walk(tmp):
                for name in files:
                    with open(os.path.join(root, name), "rb") as f:
                        os.fsync(f.fileno())
                _fsync_dir(Path(root))
            _replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(new: Path, path: Path) -> None:
    """Rename `new` to `path`; an existing `path` is moved aside first (a directory cannot be renamed over)."""
    old = None
    if path.exists() or path.is_symlink():
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex}")
        os.rename(path, old)
    try:
        os.rename(new, path)
    except BaseException:
        if old is not None:
            os.rename(old, path)
        raise
    _fsync_dir(path.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def _json_safe(value):
    """Config values as plain JSON (tuples become lists)."""
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return value


def _is_diffusers_model(model: nn.Module) -> bool:
    # A diffusers model cannot exist unless diffusers was imported: skip its slow import otherwise.
    return "diffusers" in sys.modules and isinstance(model, sys.modules["diffusers"].ModelMixin)


def architecture_of(model: nn.Module) -> dict:
    """Plain-JSON description from which load_model rebuilds the model's UNPRUNED architecture.

    model: a diffusers model (described by its config), a Denoiser wrapping a model (described as the
    wrapped model plus "wrapped": "Denoiser"), or any module with a `tdcdiff_init_kwargs` dict attribute
    holding its constructor's keyword arguments.
    """
    if isinstance(model, Denoiser):
        return {**architecture_of(model.model), "wrapped": "Denoiser"}
    cls = type(model)
    if _is_diffusers_model(model):
        config = {k: _json_safe(v) for k, v in dict(model.config).items() if not k.startswith("_")}
        description = {"class": f"diffusers.{cls.__name__}", "config": config}
        if getattr(model, "tdcdiff_removed", None):  # depth-pruned layers (prune.depth): rebuilt, then removed
            description["removed"] = list(model.tdcdiff_removed)
        return description
    name = f"{cls.__module__}.{cls.__qualname__}"
    kwargs = getattr(model, "tdcdiff_init_kwargs", None)
    if not isinstance(kwargs, dict):
        raise ValueError(
            f"cannot save a {name}: tdcdiff rebuilds a model from its class and constructor arguments. Set "
            f"`model.tdcdiff_init_kwargs = {{...}}` (in its __init__, for example) to the keyword arguments "
            f"that rebuild its unpruned architecture as {cls.__qualname__}(**kwargs), with plain JSON values"
        )
    if "." in cls.__qualname__:
        raise ValueError(f"cannot save a {name}: define the class at the top level of an importable module")
    try:
        json.dumps(kwargs)
    except TypeError as err:
        raise ValueError(f"cannot save a {name}: tdcdiff_init_kwargs must hold plain JSON values ({err})") from None
    return {"class": name, "kwargs": kwargs}


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_model(model: nn.Module, directory: str | Path, *, extra: dict | None = None) -> dict:
    """Save a (possibly pruned) model as directory/architecture.json + directory/model.safetensors.

    model: anything architecture_of() describes. directory: replaced atomically (never half-written).
    extra: JSON-able provenance stored under "extra" in architecture.json.
    Returns the content of architecture.json.
    """
    description = architecture_of(model)
    if extra is not None:
        description["extra"] = extra
    tensors, storages = {}, set()
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        # safetensors refuses tensors that share memory (a module registered under two names).
        tensors[key] = tensor.clone() if storage in storages else tensor
        storages.add(storage)
    with atomic_dir(directory) as tmp:
        weights = tmp / WEIGHTS_FILE
        save_file(tensors, weights)
        size, digest = weights.stat().st_size, sha256_file(weights)
        description["weights"] = {"file": WEIGHTS_FILE, "bytes": size, "sha256": digest}
        (tmp / ARCHITECTURE_FILE).write_text(json.dumps(description, indent=2))
    return description


def _rebuild(description: dict, source: Path) -> nn.Module:
    """A fresh, unpruned model from an architecture description (source: its file, for messages)."""
    name = description.get("class")
    if not isinstance(name, str) or "." not in name:
        raise ValueError(f"{source}: 'class' must name the model class, got {name!r}")
    module_name, _, class_name = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{source}: cannot import {name} ({err}); its module must be importable") from None
    if module_name == "diffusers":
        model = cls.from_config(description["config"])
    else:
        model = cls(**description.get("kwargs", {}))
    return Denoiser(model) if description.get("wrapped") == "Denoiser" else model


def _resize_to(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Give every parameter and buffer of the model the shape it has in a saved state dict."""
    for key, saved in state.items():
        owner_name, _, leaf = key.rpartition(".")
        try:
            owner = model.get_submodule(owner_name)
        except AttributeError:
            owner = None
        current = getattr(owner, leaf, None)
        if not isinstance(current, torch.Tensor):
            raise ValueError(f"{source}: saved tensor {key!r} has no counterpart in the rebuilt model")
        if current.shape == saved.shape:
            continue
        if current.dim() != saved.dim():
            raise ValueError(
                f"{source}: cannot resize {key!r} from {tuple(current.shape)} to the saved {tuple(saved.shape)}"
            )
        new = torch.empty(saved.shape, dtype=current.dtype, device=current.device)
        setattr(owner, leaf, nn.Parameter(new, current.requires_grad) if isinstance(current, nn.Parameter) else new)


def _remove_layers(model: nn.Module, removed, source: Path) -> None:
    """Remove the depth-pruned layers listed under "removed" from a rebuilt base (see prune.depth)."""
    from .prune.depth import remove

    if not isinstance(removed, list) or not all(isinstance(name, str) for name in removed):
        raise ValueError(f"{source}: 'removed' must be a list of layer names, got {removed!r}")
    try:
        remove(model, removed)
    except ValueError as err:
        raise ValueError(f"{source}: {err}; re-run the stage that wrote it") from None


def load_model(directory: str | Path) -> nn.Module:
    """Load a model written by save_model (in eval mode), checking the weights file's size and sha256.

    directory: the saved model's directory. Raises FileNotFoundError for missing files and ValueError for
    corrupt or mismatching ones, naming the file.
    """
    directory = Path(directory)
    source = directory / ARCHITECTURE_FILE
    try:
        description = json.loads(source.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{source} is missing: {directory} is not a complete saved model; re-run the stage that wrote it"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{source} is not valid JSON ({err}); re-run the stage that wrote it") from None
    weights = description.get("weights") if isinstance(description, dict) else None
    if not isinstance(weights, dict) or not {"file", "bytes", "sha256"} <= weights.keys():
        raise ValueError(f"{source} does not describe a weights file; re-run the stage that wrote it")
    path = directory / weights["file"]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; re-run the stage that wrote it")
    data = path.read_bytes()
    if len(data) != weights["bytes"]:
        raise ValueError(
            f"{path} is truncated or corrupted: expected {weights['bytes']} bytes, found {len(data)}; "
            "re-run the stage that wrote it"
        )
    if hashlib.sha256(data).hexdigest() != weights["sha256"]:
        raise ValueError(f"{path} is corrupted: its sha256 does not match {source}; re-run the stage that wrote it")
    from .prune.engine import sync_module_attributes  # imports torch-pruning: only when loading

    state = load_safetensors(data)
    model = _rebuild(description, source)
    if description.get("removed"):
        _remove_layers(model, description["removed"], source)
    _resize_to(model, state, source)
    sync_module_attributes(model)
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) == 1 and dtypes != {torch.get_default_dtype()}:  # keep the saved precision
        model.to(dtypes.pop())
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path} does not fit the architecture in {source}: {err}") from None
    return model.eval()
