"""Where a write may go: an output path checked before any work (output_path), the names of the temporaries the
atomic writers of files.py make beside it, and brief, which cuts a value or a path short for a message.

Imports nothing of tdcdiff: files.py, and every layer above, check their output paths through here.
"""

from __future__ import annotations

import os
from pathlib import Path

# The temporaries files.py makes beside NAME: ".NAME.tdcdiff-<random>-<pid>.tmp" files,
# ".NAME.tdcdiff-tmp-<random>-<pid>" folders and ".NAME.tdcdiff-old-<hex>-<pid>" entries moved aside (files._TEMPORARY).
TEMP_FILE, TEMP_DIR, MOVED_ASIDE = "tdcdiff-", "tdcdiff-tmp-", "tdcdiff-old-"


def output_path(path: str | Path, *, directory: bool, option: str | None = None) -> Path:
    """The path an atomic write makes (atomic_dir: directory=True; atomic_write_bytes: False), checked before any
    work: as given, but "." and "x/.." resolved (they name no entry of a parent); a symlink is left to the write.

    Raises ValueError, one line naming the path (as `option` when given, e.g. "--out") and the fix, when the path is
    empty, is the root, is a folder where a file is written, or cannot be created (a folder on the way is a file,
    or the nearest existing one is read-only).
    """
    label, fix = (f"{option} ", f"choose another {option}") if option else ("", "choose another path")
    if not str(path).strip():
        raise ValueError(f"{label or 'path '}is empty; give {'a folder' if directory else 'a file'}")
    target = Path(path)
    target = target.resolve() if target.name in ("", "..") else target
    if not target.name:
        raise ValueError(f"{label}{target} is the root folder; give a folder inside it")
    if not directory and target.is_dir():
        raise ValueError(f"{label}{target} is a folder, not a file; {fix}")
    way = (target, *target.parents) if directory and target.is_dir() else target.parents
    existing = next(p for p in way if p.exists() or p.is_symlink())
    if not existing.is_dir():
        raise ValueError(f"{label}{target} cannot be created: {existing} is "
                         f"{'a file' if existing.is_file() else 'not a folder'}; {fix}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{label}{target} cannot be written: {existing} is read-only (read-only file system or no "
                         f"permission); {fix}")
    return target



def brief(value: object, limit: int = 120, *, quote: bool = True) -> str:
    """repr(value) (str(value) when quote is False) cut to about `limit` characters, for messages that show a
    value read from an untrusted file: a huge value must not become a huge message."""
    text = repr(value) if quote else str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
