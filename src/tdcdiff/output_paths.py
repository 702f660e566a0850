"""Where a write may go: an output path checked before any work (output_path), the names of the temporaries the
atomic writers of files.py make beside it, and brief, which cuts a value or a path short for a message.

Imports nothing of tdcdiff: files.py, and every layer above, check their output paths through here.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

# The temporaries files.py makes beside NAME: ".NAME.tdcdiff-<random>-<pid>.tmp" files,
# ".NAME.tdcdiff-tmp-<random>-<pid>" folders and ".NAME.tdcdiff-old-<hex>-<pid>" entries moved aside (files._TEMPORARY).
TEMP_FILE, TEMP_DIR, MOVED_ASIDE = "tdcdiff-", "tdcdiff-tmp-", "tdcdiff-old-"


# How much longer than NAME the longest temporary a write makes beside it is, in bytes: a folder's moved-aside
# ".NAME.tdcdiff-old-<32 hex>-<pid>", a file's ".NAME.tdcdiff-<8>-<pid>.tmp" (a pid has at most 7 digits: 2**22).
_EXTRA = {True: 2 + len(MOVED_ASIDE) + 32 + 1 + 7, False: 2 + len(TEMP_FILE) + 8 + 1 + 7 + 4}


def output_path(path: str | Path, *, directory: bool, option: str | None = None) -> Path:
    """The path an atomic write makes (atomic_dir: directory=True; atomic_write_bytes: False), checked before any
    work: as given, but "." and "x/.." resolved (they name no entry of a parent); a symlink is left to the write.

    Raises ValueError, one line naming the path (as `option` when given, e.g. "--out") and the fix, when the path is
    empty, is the root, is a folder where a file is written, is a symlink to nothing or a symlink loop where a
    folder is written, is too long for the file system (a name, with the temporary name the write gives it first,
    over NAME_MAX, or the whole path over PATH_MAX), or cannot be created: a folder on the way is a file or a broken
    symlink, or the nearest existing one is read-only or refuses new entries (a pseudo file system such as /proc:
    os.access answers for permissions only, and says yes to root everywhere, so an empty folder is made there and
    removed at once to ask).
    """
    label, fix = (f"{option} ", f"choose another {option}") if option else ("", "choose another path")
    if not str(path).strip():
        raise ValueError(f"{label or 'path '}is empty; give {'a folder' if directory else 'a file'}")
    target = Path(path)
    shown = brief(target, quote=False)
    try:
        target = target.resolve() if target.name in ("", "..") else target
        if not target.name:
            raise ValueError(f"{label}{target} is the root folder; give a folder inside it")
        if not directory and target.is_dir():
            raise ValueError(f"{label}{target} is a folder, not a file; {fix}")
        link = directory and broken_link(target)  # a file write replaces a link, as it replaces a file
        if link:
            raise ValueError(f"{label}{target} is {link}: nothing can be written through it; fix or remove the link, "
                             f"or {fix}")
        way = (target, *target.parents) if directory and target.is_dir() else target.parents
        existing = next(p for p in way if p.exists() or p.is_symlink())
        if not existing.is_dir():
            what = broken_link(existing) or ("a file" if existing.is_file() else "not a folder")
            raise ValueError(f"{label}{target} cannot be created: {existing} is {what}; {fix}")
        _check_length(target, existing, directory, label)
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ValueError(f"{label}{target} cannot be written: {existing} is read-only (read-only file system or "
                             f"no permission); {fix}")
        first = target if existing == target else next(p for p in (target, *target.parents) if p.parent == existing)
        try:  # named as a write's temporary (the sweep of files.remove_stale_temporaries knows it), kept short
            os.rmdir(tempfile.mkdtemp(dir=existing, prefix=f".{first.name[:64]}.{TEMP_DIR}", suffix=f"-{os.getpid()}"))
        except OSError as err:
            raise ValueError(f"{label}{target} cannot be written: {existing} refuses new entries ({err.strerror}: a "
                             f"pseudo file system such as /proc or /sys, or a read-only one); {fix}") from None
    except OSError as err:  # the kernel's, from a stat: a path over PATH_MAX, no permission to look
        if err.errno == errno.ENAMETOOLONG:
            raise ValueError(f"{label}{shown} is too long for the file system ({err.strerror}); choose a shorter "
                             "path") from None
        raise ValueError(f"{label}{shown} cannot be used ({err.strerror}); {fix}") from None
    return target


def _check_length(target: Path, existing: Path, directory: bool, label: str) -> None:
    """Refuse a target whose names to be created (those below `existing`), the last with the longest temporary
    name the write gives it first (_EXTRA), or whose whole path, exceed the file system's NAME_MAX / PATH_MAX."""
    limits = {}
    for key, default in (("PC_NAME_MAX", 255), ("PC_PATH_MAX", 4096)):
        try:
            limits[key] = os.pathconf(existing, key)
        except (OSError, ValueError):  # not every OS or file system answers
            limits[key] = default
    extra, shown = _EXTRA[directory], brief(target, quote=False)
    new = [p for p in (target, *target.parents) if p != existing and existing in p.parents] or [target]
    for part in new:
        size = len(os.fsencode(part.name))
        if size + (extra if part == target else 0) > limits["PC_NAME_MAX"]:
            which = "its name" if part == target else f"the folder name {brief(part.name, 60)} in it"
            more = f", {size + extra} with the temporary name a write gives it first" if part == target else ""
            raise ValueError(f"{label}{shown} cannot be created: {which} is {size} bytes{more}; the file system allows "
                             f"at most {limits['PC_NAME_MAX']} per name: choose a shorter name")
    size = len(os.fsencode(str(target))) + extra
    if size >= limits["PC_PATH_MAX"]:
        raise ValueError(f"{label}{shown} is too long for the file system ({size} bytes with the temporary name a "
                         f"write gives it first; at most {limits['PC_PATH_MAX'] - 1}); choose a shorter path")


def broken_link(entry: Path) -> str | None:
    """What `entry` is when it is a symlink that leads nowhere, for messages ("a symlink to X, which does not exist",
    "a symlink loop (X -> Y)"); None for anything else, a missing entry included."""
    if not entry.is_symlink():
        return None
    try:
        os.stat(entry)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return f"a symlink loop ({entry} -> {os.readlink(entry)}, which leads back to itself)"
        if err.errno in (errno.ENOENT, errno.ENOTDIR):
            return f"a symlink to {os.readlink(entry)}, which does not exist"
        raise
    return None


def brief(value: object, limit: int = 120, *, quote: bool = True) -> str:
    """repr(value) (str(value) when quote is False) cut to about `limit` characters, for messages that show a
    value read from an untrusted file: a huge value must not become a huge message."""
    text = repr(value) if quote else str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
