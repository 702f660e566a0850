"""Where tdcdiff caches what it can rebuild from its inputs (FID feature classifiers, latency tables): $TDCDIFF_CACHE,
else $XDG_CACHE_HOME/tdcdiff, else ~/.cache/tdcdiff; and how an entry of it is read (cached_entry, entry_json) and
replaced (discard). A cache holds only what tdcdiff rebuilds from its inputs (the same seed and data give the same
classifier; the same model, device and batch a like timing), so a damaged or foreign entry is warned about and rebuilt,
never an error: rebuilding loses nothing, and a user told to delete it would do the same by hand."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .files import parse_json, read_untrusted
from .user_warnings import warn

T = TypeVar("T")

CACHE_FIX = "point TDCDIFF_CACHE at a folder you can write (or unset it: the default is ~/.cache/tdcdiff)"


def cache_home() -> Path:
    """The cache's root folder, made if missing and checked writable (writable_folder). Raises ValueError naming
    TDCDIFF_CACHE (or XDG_CACHE_HOME / the home folder, whichever chose it) when it cannot be a writable folder:
    a file, a folder with no write permission, a file system that refuses folders (/proc)."""
    if os.environ.get("TDCDIFF_CACHE"):
        return writable_folder(Path(os.environ["TDCDIFF_CACHE"]), "TDCDIFF_CACHE", CACHE_FIX)
    source = "XDG_CACHE_HOME" if os.environ.get("XDG_CACHE_HOME") else "the home folder's .cache"
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tdcdiff"
    return writable_folder(root, f"the cache folder (from {source})", "set TDCDIFF_CACHE to a folder you can write")


def writable_folder(path: Path, what: str, fix: str) -> Path:
    """`path`, made a folder (with its parents) if missing, and checked writable by making and removing an empty
    folder in it (os.access says yes to root under /proc, where nothing can be made). what: how the message calls
    the path's source (e.g. "TDCDIFF_CACHE"); fix: the message's last words. Raises ValueError, one line naming
    `what`, the path, the reason and `fix`."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=path))
    except OSError as err:
        reason = "it is a file, not a folder" if os.path.isfile(path) else err.strerror or str(err)
        raise ValueError(f"{what} is {path}, which cannot be used as a folder ({reason}); {fix}") from None
    return path


def cached_entry(entry: Path, problem: str, read: Callable[[], T]) -> T | None:
    """read()'s value for the cache entry `entry` (a file or a folder), or None when there is none or when it is
    damaged or foreign. read: reads and checks the entry as untrusted input (entry_json), raising ValueError or
    FileNotFoundError, one line naming the file, what is wrong and the fix (rebuilding and replacing the entry);
    then a warning (user_warnings.warn) says "{problem}: {that line}", and the caller rebuilds the entry and writes
    it over the old one (discard first)."""
    if not os.path.lexists(entry):
        return None
    try:
        return read()
    except (ValueError, FileNotFoundError) as err:
        warn(f"{problem}: {err}")
        return None


def entry_json(root: Path, name: str, fix: str, max_bytes: int) -> dict:
    """The JSON object in file `name` of cache folder `root`, read as untrusted input (files.read_untrusted: a
    regular file of at most max_bytes, no link out of root; files.parse_json). Raises FileNotFoundError when it is
    missing and ValueError, one line ending in `fix`, for a folder, a symlink, text that is not JSON or JSON that is not
    an object."""
    path = root / name
    if path.is_symlink():  # tdcdiff never writes one; read_untrusted would call it a saved file's reference
        raise ValueError(f"{path} is a symlink (to {os.readlink(path)}), not a file tdcdiff wrote; {fix}")
    data = parse_json(read_untrusted(root, name, str(path), max_bytes=max_bytes, hint=fix), path, fix,
                      problem="is damaged")
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a JSON object; {fix}")
    return data


def discard(entry: Path) -> None:
    """Remove a damaged cache entry (a folder, a file or a link; not what a link points to), if there is one: moved
    aside first, so that another process never sees it half deleted."""
    if not os.path.lexists(entry):
        return
    aside = Path(tempfile.mkdtemp(prefix=f".stale-{entry.name}-", dir=entry.parent))
    with contextlib.suppress(FileNotFoundError):  # another process discarded it first
        os.replace(entry, aside / "entry")
    shutil.rmtree(aside, ignore_errors=True)
