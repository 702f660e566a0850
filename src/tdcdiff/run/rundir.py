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
from ..manifest import MANIFEST
from ..serialization import ARCHITECTURE_FILE
from ..train.checkpoint import CHECKPOINT_DIR, FINAL_DIR
from .config import STAGE_OUTPUT, check_not_a_run

log = logging.getLogger("tdcdiff")

LOCK_FILE = ".tdcdiff.lock"
OWNER_FILE = ".tdcdiff.lock.owner"


class RunDirectoryBusy(ValueError):
    """Another process is writing the run directory."""


# What a folder holding one of these entries is (the first found names it), when it is not the directory asked for.
_KINDS = ((MANIFEST, "a tdcdiff bundle"), (ARCHITECTURE_FILE, "a saved model"),
          (f"{FINAL_DIR}/", "a training output folder, such as a run's base/"),
          (f"{CHECKPOINT_DIR}/", "a training output folder, such as a run's base/"))


def check_out_dir(path: str | Path, what: str = "run directory", option: str | None = None) -> Path:
    """Refuse, before any work or write, a folder a run or a tune (`what`: "run directory" or "tune directory")
    cannot use as its directory. The rule: it is missing, empty (but for our lock and temporaries), or a folder of
    the same kind, never another tdcdiff output; and its path can be written (files.output_path: not a symlink loop
    or a link to nothing, not too long, on a file system that makes folders). A file, a bundle, a saved model, a
    training output (a run's base/) or a run's stage folder (R/plan) is refused, naming what it is: the run's or
    tune's files would be mixed into it. A run directory given for a tune is refused by check_not_a_run, a tune
    directory given for a run by config.saved_config (with their fixes). The user's own files beside it are left
    alone (as the lock's sweep leaves them). option: the flag that gave path (e.g. "--out").
    Returns path as output_path does. Raises ValueError."""
    path = output_path(path, directory=True, option=option)
    label, flag = (f"{option} ", option) if option else ("", "directory")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{label}{path} is a file, not a directory; choose another {flag}")
    if what == "tune directory":
        check_not_a_run(path)
    other = _other_kind(path, what)
    if other:
        raise ValueError(f"{label}{path} is {other}, not a {what}: a {what.split()[0]} there would mix its files into "
                         f"it; use a new or empty {flag}")
    return path


def _other_kind(path: Path, what: str) -> str | None:
    """What the folder `path` is, with the entry that shows it, when it is neither empty nor a `what`; else None."""
    try:
        names = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in os.scandir(path)
                       if entry.name not in (LOCK_FILE, OWNER_FILE) and not is_temporary(entry.name))
    except (FileNotFoundError, NotADirectoryError):
        return None
    tune = {"tune.json", "candidates.json"} & set(names) or (path / "base" / "config.json").is_file()
    run = "config.json" in names or {f"{d}/" for d in STAGE_OUTPUT.values()} & set(names)
    if not names or tune or (run and what == "run directory"):  # the other kind: saved_config names it
        return None
    for entry, kind in _KINDS:
        if entry in names:
            return f"{kind} (it holds {entry})"
    if path.name in STAGE_OUTPUT.values() and (path.parent / "config.json").is_file():
        return f"the {path.name}/ stage folder of run {path.parent}"
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
