"""The tune directory's small records: phase clocks (wall and CPU seconds, training FLOPs), phases.json, JSON files
that may not exist yet, and how a cache of the tune's measurements (fid.json, screening.json, sample_screen.json,
curves.json, phases.json) is read back: as a cache (cache_home.cached_entry), each file's or entry's values checked
against what the tune writes, a damaged one warned about and measured again."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

from ..cache_home import cached_entry
from ..files import atomic_write_text, read_json_file
from ..settings import is_real
from ..user_warnings import warn


def read_json(path: Path, default=None):
    """The JSON value in `path` (a record of the tune directory), or `default` when the file does not exist.
    Raises ValueError naming the file and the fix when it is damaged (files.read_json_file)."""
    if not path.exists():
        return default
    return read_json_file(path, f"delete {path}: the tune makes it again (a candidate's result.json: by training "
                                "it again)", kind=None)


def measurement_cache(path: Path, check: Callable[[dict], str | None]) -> dict | None:
    """The JSON object in `path`, a cache of the tune's measurements, or None when there is none or when it is
    damaged: not JSON, not an object, or check(data) names a problem (a string; None: sound). A damaged one is warned
    about (user_warnings.warn), naming the file and the problem, and None: the caller measures again and writes over
    it, as the feature and latency caches do (cache_home.cached_entry); measuring again is what deleting it would do."""
    fix = "measuring it again and replacing it"

    def read() -> dict:
        data = read_json_file(path, fix)
        problem = check(data)
        if problem:
            raise ValueError(f"{path} is damaged ({problem}); {fix}")
        return data

    return cached_entry(path, "a measurement record of the tune is damaged", read)


def sound_entries(path: Path, entries: object, check: Callable[[object], str | None], what: str) -> dict:
    """The entries of a measurement cache (`entries`: a mapping of name -> record in file `path`) whose record
    check() finds sound (it returns None; else a string naming the problem). Each other one is warned about
    (user_warnings.warn: "{path}: {what} {name!r} is damaged (...); measuring it again") and left out, so the tune
    measures that entry again and writes it over; the rest are reused. Not a mapping: warned about, {}."""
    if not isinstance(entries, dict):
        warn(f"{path}: its {what}s are not a mapping of name to record (got {type(entries).__name__}); measuring "
             "them again")
        return {}
    kept = {}
    for name, record in entries.items():
        problem = check(record) if isinstance(record, dict) else f"a {type(record).__name__}, not a record"
        if problem:
            warn(f"{path}: {what} {name!r} is damaged ({problem}); measuring it again")
        else:
            kept[name] = record
    return kept


def is_number(value: object, minimum: float = -math.inf, maximum: float = math.inf) -> bool:
    """Whether `value` (read from a record) is a finite number (not a bool) in [minimum, maximum]."""
    return is_real(value) and math.isfinite(value) and minimum <= value <= maximum


def numbers_problem(record: dict, keys, minimum: float = -math.inf, maximum: float = math.inf,
                    count: int | None = None) -> str | None:
    """What is wrong with record[key] for each of `keys` as a list of `count` (None: any number of) finite numbers
    in [minimum, maximum], or with a record lacking one; None when all are sound."""
    for key in keys:
        values = record.get(key)
        if not isinstance(values, list) or (count is not None and len(values) != count):
            return f"{key!r} must be a list of {count if count is not None else 'some'} numbers, got {values!r:.80}"
        bad = [v for v in values if not is_number(v, minimum, maximum)]
        if bad:
            return f"{key!r} holds {bad[0]!r}, not a finite number in [{minimum:g}, {maximum:g}]"
    return None


def phase_problem(record: object) -> str | None:
    """What is wrong with a phase record (since()'s: wall_s and cpu_s finite seconds >= 0, flops a count or None);
    None when sound."""
    if not isinstance(record, dict) or set(record) != {"wall_s", "cpu_s", "flops"}:
        return f"must be {{'wall_s', 'cpu_s', 'flops'}}, got {record!r:.80}"
    if not (is_number(record["wall_s"], 0) and is_number(record["cpu_s"], 0)):
        return f"wall_s and cpu_s must be finite seconds >= 0, got {record['wall_s']!r} and {record['cpu_s']!r}"
    flops = record["flops"]
    if flops is not None and not (isinstance(flops, int) and not isinstance(flops, bool) and flops >= 0):
        return f"flops must be a count >= 0 or null, got {flops!r}"
    return None


def read_phases(directory: Path) -> dict:
    """phases.json of a tune directory: phase name -> since() record, each damaged one warned about and left out
    (its phase is then not counted in the cost until it runs again)."""
    path = directory / "phases.json"
    return sound_entries(path, measurement_cache(path, lambda data: None) or {}, phase_problem, "phase")


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
    phases = read_phases(directory)
    phases[name] = record
    atomic_write_text(directory / "phases.json", json.dumps(phases, indent=2))
