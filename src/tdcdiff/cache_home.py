"""Where tdcdiff caches what it can rebuild from its inputs (FID feature classifiers, latency tables): $TDCDIFF_CACHE,
else $XDG_CACHE_HOME/tdcdiff, else ~/.cache/tdcdiff. Imports nothing of tdcdiff."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

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
