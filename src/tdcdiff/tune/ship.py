"""The shipped bundle: the chosen point's model with the chosen point's sampling setting as its default (the
manifest's "sampling", which `tdcdiff sample --bundle` and Bundle.pipeline() use unless told otherwise)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..bundle import save_bundle
from ..files import atomic_dir, check_replaceable
from ..grouping import make_groups
from ..manifest import A_BUNDLE, MANIFEST, is_bundle
from ..sampling_setting import SamplingSetting


def check_chosen(tune_dir: Path) -> None:
    """Refuse, before any work, a tune directory whose chosen/ write_chosen could not replace: one holding files
    besides a bundle's (the user's notes), or a file. write_chosen (files.atomic_dir) refuses it only at the end, after
    a rerun's timing and FID. Raises ValueError with atomic_dir's message (files.check_replaceable)."""
    check_replaceable(Path(tune_dir) / "chosen", is_bundle, A_BUNDLE)


def write_chosen(tune, row: dict, setting: SamplingSetting, path: Path) -> Path:
    """Write `path` (atomically): the chosen row's bundle with `setting` as its default sampling. A candidate's
    bundle (row["bundle"], relative to tune.dir) is copied with its manifest's "sampling" set; the base (a free
    setting chosen) is bundled here as a one-group router, as the single candidate is."""
    if row["model"] == "base":
        run = tune.base_run
        model, flops = run.base_model(), tune.base_flops()
        return save_bundle(path, [model], make_groups("uniform", 1, run.scheduler), run.scheduler,
                           sample_shape=run.sample_shape, expert_flops=[flops], base_flops=flops,
                           provenance={"tune": "the base, unchanged: a free setting chosen",
                                       "data": run.data.describe()},
                           conditioning=run.conditioning(model), sampling=setting)
    with atomic_dir(path, is_bundle, A_BUNDLE) as tmp:
        shutil.copytree(tune.dir / row["bundle"], tmp, dirs_exist_ok=True)
        manifest = json.loads((tmp / MANIFEST).read_text())
        manifest["sampling"] = setting.to_dict()
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return path
