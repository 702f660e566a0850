"""A run directory on disk: one writer at a time (the lock), records of what each output was made from, and
copying finished stages between directories."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from ..content_hash import sha256_file
from ..files import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_text,
    is_temporary,
    output_path,
    remove_stale_temporaries,
)
from ..manifest import MANIFEST, is_bundle
from ..serialization import ARCHITECTURE_FILE, saved_model_files
from ..train.checkpoint import CHECKPOINT_DIR, CHECKPOINT_FILES, FINAL_DIR
from .config import STAGE_OUTPUT, check_not_a_run, check_not_diffusers

log = logging.getLogger("tdcdiff")

LOCK_FILE = ".tdcdiff.lock"
OWNER_FILE = ".tdcdiff.lock.owner"


class RunDirectoryBusy(ValueError):
    """Another process is writing the run directory."""


# A run's folders besides its stage outputs (STAGE_OUTPUT), and a tune's folder of candidate runs.
RUN_FOLDERS = {"samples": "its sample grids", "report": "its report"}
TUNE_CANDIDATES = "candidates"
# The entries of tdcdiff's own outputs, by their format (files.atomic_dir's `ours` tests), and what each is.
_KINDS = ((MANIFEST, is_bundle, "a tdcdiff bundle", "a tdcdiff bundle's manifest"),
          (ARCHITECTURE_FILE, saved_model_files, "a saved model", "a saved model's"),
          (f"{FINAL_DIR}/", lambda p: saved_model_files(p / FINAL_DIR), "a training output folder, such as a run's "
           "base/", "a saved model"),
          (f"{CHECKPOINT_DIR}/", lambda p: CHECKPOINT_FILES(p / CHECKPOINT_DIR), "a training output folder, such as "
           "a run's base/", "a training checkpoint"))


def check_out_dir(path: str | Path, what: str = "run directory", option: str | None = None) -> Path:
    """Refuse, before any work or write, a folder a run or a tune (`what`: "run directory" or "tune directory")
    cannot use as its directory. The rule: it is missing, empty (but for our lock and temporaries), or a folder of
    the same kind, never another tdcdiff output; and its path can be written (files.output_path: not a symlink loop
    or a link to nothing, not too long, on a file system that makes folders). Refused, naming what it is (the run's
    or tune's files would be mixed into it): a file; a tdcdiff bundle, saved model or training output (a run's
    base/), each told by its format; a run's stage folder (R/plan), samples/ or report/; a tune's candidates/; a
    diffusers model or pipeline folder (with the way to use it: `--base`); and a folder holding one of those
    outputs' entries (manifest.json, architecture.json, final/, checkpoint/) not in their format, as "not empty and
    not a tdcdiff <what>". A run directory given for a tune is refused by check_not_a_run, a tune directory given
    for a run by config.saved_config (with their fixes). The user's own files beside it are left alone (as the
    lock's sweep leaves them). option: the flag that gave path (e.g. "--out").
    Returns path as output_path does. Raises ValueError."""
    path = output_path(path, directory=True, option=option)
    label, flag = (f"{option} ", option) if option else ("", "directory")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{label}{path} is a file, not a directory; choose another {flag}")
    check_not_diffusers(path, what, option)
    if what == "tune directory":
        check_not_a_run(path)
    other = _other_kind(path, what)
    if other:
        raise ValueError(f"{label}{path} {other}: a {what.split()[0]} there would mix its files into it; use a new "
                         f"or empty {flag}")
    return path


def _other_kind(path: Path, what: str) -> str | None:
    """"is <what the folder `path` is>, not a `what`" when it is neither missing, empty, a `what`, nor holds only the
    user's own files; else None."""
    try:
        names = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in os.scandir(path)
                       if entry.name not in (LOCK_FILE, OWNER_FILE) and not is_temporary(entry.name))
    except (FileNotFoundError, NotADirectoryError):
        return None
    tune = {"tune.json", "candidates.json"} & set(names) or (path / "base" / "config.json").is_file()
    run = "config.json" in names or {f"{d}/" for d in STAGE_OUTPUT.values()} & set(names)
    if not names or tune or (run and what == "run directory"):  # the other kind: saved_config names it
        return None
    for entry, ours, kind, _ in _KINDS:
        if entry in names and ours(path) is not None:
            return f"is {kind} (it holds {entry}), not a {what}"
    parent = path.parent
    if (parent / "config.json").is_file() and path.name in STAGE_OUTPUT.values():
        return f"is the {path.name}/ stage folder of run {parent}, not a {what}"
    if (parent / "config.json").is_file() and path.name in RUN_FOLDERS:
        return f"is the {path.name}/ folder of run {parent} ({RUN_FOLDERS[path.name]}), not a {what}"
    if path.name == TUNE_CANDIDATES and {"tune.json", "candidates.json"} & {p.name for p in parent.iterdir()}:
        return f"is the {TUNE_CANDIDATES}/ folder of tune {parent} (its candidate runs), not a {what}"
    for entry, _, _, not_ours in _KINDS:
        if entry in names:
            return f"is not empty and not a tdcdiff {what} (it holds {entry}, which is not {not_ours})"
    return None  # the user's own files: kept, as the lock's sweep keeps them (remove_stale_temporaries)


@contextlib.contextmanager
def lock_run_dir(run_dir: str | Path, what: str = "run directory") -> Iterator[None]:
    """Hold run_dir's lock for the block (created if missing); reentrant within a thread of one process. A folder
    that is not a `what` (check_out_dir: a bundle, a file, a symlink loop...) is refused first.

    The outermost hold records this process in .tdcdiff.lock.owner and removes the temporaries that killed writers
    left in run_dir itself (files.remove_stale_temporaries: a dead writer's only, never in subfolders).
    Raises RunDirectoryBusy at once, naming the holder, if another process (or
    thread) holds it: waiting silently behind a run of hours would look like a hang. what: the directory's kind,
    for that message (a tune directory is locked the same way).
    """
    from filelock import FileLock, Timeout  # imported when a run is written, not for `tdcdiff --help`

    run_dir = Path(run_dir)
    check_out_dir(run_dir, what)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    # One instance per path in this process: nested stages (run_all -> report) re-enter it instead of blocking.
    lock = FileLock(run_dir.resolve() / LOCK_FILE, is_singleton=True)
    outermost = not lock.is_locked
    try:
        lock.acquire(blocking=False)
    except Timeout:
        raise RunDirectoryBusy(
            f"{what} {run_dir} is in use by {_holder(run_dir)}; wait for it to finish, or use another "
            f"output directory (--out). One process at a time writes a {what}"
        ) from None
    owner = run_dir / OWNER_FILE
    try:
        if outermost:
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                      "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            atomic_write_text(owner, json.dumps(holder))
            for path in remove_stale_temporaries(run_dir):
                log.info("removed %s, left behind by an interrupted writer", path)
        yield
    except BaseException:
        if created:  # a run refused before its first write leaves no directory behind
            lock.release()
            (run_dir / LOCK_FILE).unlink(missing_ok=True)
            owner.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # only if nothing else was written
        raise
    finally:
        if outermost:
            owner.unlink(missing_ok=True)
        lock.release()


def _holder(run_dir: Path) -> str:
    try:
        owner = json.loads((run_dir / OWNER_FILE).read_text())
        return f"process {owner['pid']} on {owner['host']} (`{owner['command']}`, since {owner['since']})"
    except (OSError, ValueError, KeyError, TypeError):  # the holder has not written it yet, or it is not ours
        return "another process"


def writes(method):
    """A stage method writes the run directory: it runs holding the directory's lock."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self.lock():
            return method(self, *args, **kwargs)

    return locked


def up_to_date(record: Path, inputs: dict, outputs: list[Path]) -> bool:
    """Whether `outputs` were made from `inputs`, as `record` (written by record_inputs) says, and are unchanged since.

    If not, the record is deleted first, so that a crash while the outputs are rewritten cannot leave a
    matching record beside stale outputs.
    """
    with contextlib.suppress(OSError, ValueError):
        saved = json.loads(record.read_text())
        if saved == {"inputs": json.loads(json.dumps(inputs)), "outputs": _hashes(outputs)}:
            return True
    record.unlink(missing_ok=True)
    return False


def record_inputs(record: Path, inputs: dict, outputs: list[Path]) -> None:
    """Write beside freshly made `outputs` what they were made from (see up_to_date)."""
    atomic_write_text(record, json.dumps({"inputs": inputs, "outputs": _hashes(outputs)}, indent=2))


def _hashes(outputs: list[Path]) -> dict:
    # An output rewritten by something else (e.g. `tdcdiff sample`) no longer matches its record.
    return {path.name: sha256_file(path) for path in outputs}


def copy_stages(source_run: str | Path, target_run: str | Path, parts: tuple[str, ...]) -> None:
    """Copy finished stage outputs (e.g. "config.json", "base") of one run directory into another that lacks them.

    Each part is copied atomically, so an interrupted copy is redone, never half-trusted; parts the target
    already has are left alone.
    """
    for part in parts:
        source, target = Path(source_run) / part, Path(target_run) / part
        if not target.exists():
            if source.is_dir():
                with atomic_dir(target) as tmp:
                    shutil.copytree(source, tmp, dirs_exist_ok=True)
            else:
                atomic_write_bytes(target, source.read_bytes())
