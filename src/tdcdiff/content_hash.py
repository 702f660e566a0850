"""Content hashes: the sha256 of a file or of a folder's files, the identity of saved weights and data.

Imports nothing of tdcdiff.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of bytes already read (a file checked against its listed digest)."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_tree(directory: Path) -> str:
    """Hex sha256 of a directory's files: of the JSON of {path relative to directory: sha256_file}, keys sorted.
    Any file added, removed, renamed or changed gives another value (used as the identity of saved weights).
    Raises FileNotFoundError when directory is not a directory (no identity for weights that are not there)."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory of saved files")
    files = {f.relative_to(directory).as_posix(): sha256_file(f) for f in sorted(directory.rglob("*")) if f.is_file()}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
