"""Saving and loading pruned models without pickle; atomic writes."""

import json

import pytest
import torch
from torch import nn

from tdcdiff.files import atomic_dir, atomic_write_text, holds
from tdcdiff.models import Denoiser, as_denoiser, build_unet
from tdcdiff.prune.engine import prune
from tdcdiff.prune.units import prunable_units
from tdcdiff.serialization import (
    ARCHITECTURE_FILE,
    WEIGHTS_FILE,
    architecture_of,
    load_model,
    save_model,
)
from test_surgery import TinyTimeNet

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


DIGITS = (1, 8, 8)


def pruned(model: nn.Module) -> nn.Module:
    """A model pruned unevenly, so every unit has its own widths."""
    names = [u.name for u in prunable_units(model)]
    return prune(model, {name: 0.15 * (i % 4) for i, name in enumerate(names)}, DIGITS)


def outputs(model: nn.Module) -> torch.Tensor:
    x = torch.randn(3, *DIGITS, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return as_denoiser(model)(x, torch.tensor([0, 500, 999]))


@pytest.mark.parametrize("attention", [False, True])
def test_pruned_unet_round_trip(tmp_path, attention):
    torch.manual_seed(0)
    model = pruned(build_unet("digits-8", attention=attention)).eval()
    info = save_model(model, tmp_path / "m", extra={"group": 2})

    loaded = load_model(tmp_path / "m")

    assert type(loaded) is type(model)
    assert (outputs(loaded) - outputs(model)).abs().max() < 1e-5
    saved = json.loads((tmp_path / "m" / ARCHITECTURE_FILE).read_text())
    assert saved == info and saved["class"] == "diffusers.UNet2DModel" and saved["extra"] == {"group": 2}
    assert not any(key.startswith("_") for key in saved["config"])
    assert saved["config"]["block_out_channels"] == [32, 64]  # the unpruned architecture
    assert saved["weights"]["bytes"] == (tmp_path / "m" / WEIGHTS_FILE).stat().st_size


@pytest.fixture()
def registry(monkeypatch):
    """An empty class registry for one test (registrations do not leak into other tests)."""
    from tdcdiff import serialization

    monkeypatch.setattr(serialization, "_REGISTERED", {})


def test_user_net_round_trip(tmp_path, registry):
    torch.manual_seed(0)
    model = pruned(Denoiser(TinyTimeNet())).eval()
    assert architecture_of(model) == {
        "class": "test_surgery.TinyTimeNet", "kwargs": {"channels": 1, "width": 16}, "wrapped": "Denoiser",
    }
    save_model(model, tmp_path / "m")
    with pytest.raises(ValueError, match=r"names class 'test_surgery.TinyTimeNet', which tdcdiff does not rebuild.*"
                                         r"call `tdcdiff.register_model_class\(TinyTimeNet\)`"):
        load_model(tmp_path / "m")
    import tdcdiff

    assert tdcdiff.register_model_class(TinyTimeNet) is TinyTimeNet
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded, Denoiser) and isinstance(loaded.model, TinyTimeNet)
    assert (outputs(loaded) - outputs(model)).abs().max() < 1e-5


def test_user_net_without_init_kwargs_is_refused(tmp_path):
    model = TinyTimeNet()
    del model.tdcdiff_init_kwargs
    with pytest.raises(ValueError, match="tdcdiff_init_kwargs"):
        save_model(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_truncated_weights_are_reported(tmp_path):
    save_model(build_unet("digits-8"), tmp_path / "m")
    weights = tmp_path / "m" / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[:1000])
    with pytest.raises(ValueError, match=f"{WEIGHTS_FILE} is truncated or corrupted: expected {len(data)} bytes"):
        load_model(tmp_path / "m")
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ValueError, match="sha256"):
        load_model(tmp_path / "m")


def test_missing_or_invalid_architecture_is_reported(tmp_path):
    save_model(build_unet("digits-8"), tmp_path / "m")
    architecture = tmp_path / "m" / ARCHITECTURE_FILE
    architecture.write_text("{not json")
    with pytest.raises(ValueError, match="architecture.json is not valid JSON"):
        load_model(tmp_path / "m")
    architecture.unlink()
    with pytest.raises(FileNotFoundError, match="architecture.json is missing"):
        load_model(tmp_path / "m")


def test_save_replaces_an_existing_directory(tmp_path):
    save_model(build_unet("digits-8"), tmp_path / "m")
    torch.manual_seed(0)
    model = pruned(build_unet("digits-8")).eval()
    save_model(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [ARCHITECTURE_FILE, WEIGHTS_FILE]
    assert (outputs(load_model(tmp_path / "m")) - outputs(model)).abs().max() < 1e-5
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_atomic_dir_leaves_nothing_when_the_body_raises(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("previous")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out", holds("keep.txt")) as tmp:
            (tmp / "half.txt").write_text("partial")
            raise RuntimeError("interrupted")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    with atomic_dir(tmp_path / "new" / "nested") as tmp:
        (tmp / "a.txt").write_text("done")
    assert (tmp_path / "new" / "nested" / "a.txt").read_text() == "done"


def test_atomic_write_text(tmp_path):
    atomic_write_text(tmp_path / "sub" / "plan.json", "{}")
    atomic_write_text(tmp_path / "sub" / "plan.json", '{"a": 1}')
    assert (tmp_path / "sub" / "plan.json").read_text() == '{"a": 1}'
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["plan.json"]


def test_load_model_never_imports_what_the_file_names(tmp_path):
    """A saved model outside a bundle gets the same allowlist and containment checks."""
    save_model(build_unet("digits-8"), tmp_path / "m")
    architecture = tmp_path / "m" / ARCHITECTURE_FILE
    description = json.loads(architecture.read_text())
    marker = tmp_path / "marker"
    architecture.write_text(json.dumps({**description, "class": "subprocess.Popen",
                                        "kwargs": {"args": ["touch", str(marker)]}}))
    with pytest.raises(ValueError, match=r"names class 'subprocess.Popen', which tdcdiff does not rebuild"):
        load_model(tmp_path / "m")
    assert not marker.exists()
    (tmp_path / "outside.safetensors").write_bytes((tmp_path / "m" / WEIGHTS_FILE).read_bytes())
    for name, message in [("../outside.safetensors", "not a plain relative path"),
                          (str(tmp_path / "outside.safetensors"), "not a plain relative path")]:
        architecture.write_text(json.dumps({**description, "weights": {**description["weights"], "file": name}}))
        with pytest.raises(ValueError, match=f"'weights.file' names .*{message}"):
            load_model(tmp_path / "m")
    (tmp_path / "m" / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    architecture.write_text(json.dumps({**description,
                                        "weights": {**description["weights"], "file": "link.safetensors"}}))
    with pytest.raises(ValueError, match="'weights.file' names 'link.safetensors', which leads outside"):
        load_model(tmp_path / "m")
    architecture.write_text(json.dumps({**description, "weights": {**description["weights"], "sha256": "x"}}))
    with pytest.raises(ValueError, match=r"does not describe a weights file \('weights': \{file, bytes, sha256\}\)"):
        load_model(tmp_path / "m")


def test_a_folder_identity_covers_every_file_and_keeps_the_flat_value_caches_were_keyed_by(tmp_path):
    import hashlib

    from tdcdiff.content_hash import sha256_file, sha256_tree

    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "architecture.json").write_text("{}")
    # The value Tune.model_ids gave a base before sha256_tree existed: screening and FID caches hold it.
    flat = hashlib.sha256(json.dumps({f.name: sha256_file(f) for f in sorted(tmp_path.iterdir())},
                                     sort_keys=True).encode()).hexdigest()
    assert sha256_tree(tmp_path) == flat
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "model.safetensors").write_bytes(b"weights")
    assert sha256_tree(tmp_path) != flat
    with pytest.raises(FileNotFoundError, match="is not a directory of saved files"):
        sha256_tree(tmp_path / "gone")
