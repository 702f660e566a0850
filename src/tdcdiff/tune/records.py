"""The tune directory's small records: phase clocks (wall and CPU seconds, training FLOPs), phases.json, and
JSON files that may not exist yet."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..files import atomic_write_text, read_json_file


def read_json(path: Path, default=None):
    """The JSON value in `path` (a record of the tune directory), or `default` when the file does not exist.
    Raises ValueError naming the file and the fix when it is damaged (files.read_json_file)."""
    if not path.exists():
        return default
    return read_json_file(path, f"delete {path}: the tune makes it again (a candidate's result.json: by training "
                                "it again)", kind=None)


def clock() -> dict:
    """Now, as {"wall": perf_counter seconds, "cpu": process CPU seconds}: the start of a phase (since())."""
    return {"wall": time.perf_counter(), "cpu": time.process_time()}


def since(start: dict, flops: int | None = None) -> dict:
    """A phase's record from its clock() start: {"wall_s", "cpu_s" (rounded to 0.01 s), "flops" (training FLOPs or
    None)}."""
    now = clock()
    return {"wall_s": round(now["wall"] - start["wall"], 2), "cpu_s": round(now["cpu"] - start["cpu"], 2),
            "flops": flops}


def record_phase(directory: Path, name: str, record: dict) -> None:
    """Set phase `name` of directory/phases.json to `record` (a since() record), keeping the other phases."""
    phases = read_json(directory / "phases.json", {})
    phases[name] = record
    atomic_write_text(directory / "phases.json", json.dumps(phases, indent=2))
