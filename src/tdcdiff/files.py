"""Files written so that a crash never leaves half of one, and files read as untrusted input.

Atomic writes (a file or a whole directory replaced at once), the temporaries a killed writer leaves and their
cleanup, and safe reads: paths kept inside their folder, only
regular files of the expected size. Imports nothing of tdcdiff: every layer above writes through here.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath

from safetensors import SafetensorError

from .output_paths import MOVED_ASIDE, TEMP_DIR, TEMP_FILE, brief, broken_link, output_path


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync elsewhere
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Write failures that are the disk's or the process's limits, not a bug: what was full, and the fix.
_LIMITS = {
    errno.ENOSPC: ("no space left on device", "Free some space (or choose another output directory)"),
    errno.EFBIG: ("file too large for this process's file-size limit (`ulimit -f`) or the file system",
                  "Raise the limit (`ulimit -f unlimited`) or choose another output directory"),
}
if hasattr(errno, "EDQUOT"):  # POSIX
    _LIMITS[errno.EDQUOT] = ("disk quota exceeded", "Free some space within your quota (or choose another output "
                                                    "directory)")


@contextlib.contextmanager
def name_write_errors(path: Path, *, atomic: bool = True) -> Iterator[None]:
    """Turn a full disk, an exceeded quota or a file-size limit (ENOSPC, EDQUOT, EFBIG) while writing `path` into
    one OSError naming path and the fix; other errors pass unchanged. atomic: path is written whole or not at all
    (the message says nothing was half-written there).

    A bare "[Errno 28] No space left on device" does not say what was being written. safetensors' writer reports
    the same as SafetensorError("Error while serializing: I/O error: ... (os error 28)").
    """
    try:
        yield
    except (OSError, SafetensorError) as err:
        rust = re.search(r"\(os error (\d+)\)", str(err))
        code = err.errno if isinstance(err, OSError) else rust and int(rust.group(1))
        if code in _LIMITS:
            problem, fix = _LIMITS[code]
            kept = "; nothing was half-written there" if atomic else ""
            raise OSError(code, f"{problem} while writing {path}{kept}. {fix} and rerun: finished stages are kept"
                          ) from err
        raise


# The temporaries below, by name: ".NAME.tdcdiff-<random>-<pid>.tmp" files, ".NAME.tdcdiff-tmp-<random>-<pid>"
# folders and ".NAME.tdcdiff-old-<hex>-<pid>" entries moved aside (random: mkstemp's 8 characters; pid: the writer's
# process). A kill leaves them behind: the next write of NAME removes those of a dead writer
# (_remove_dead_siblings), and remove_stale_temporaries those of a folder. Only names of exactly this form are ever
# removed (the "tdcdiff-" marker, the random part's length, a pid this machine can have): a user's
# ".x.tmp-mydata-999999" or ".notes.draft-1234.tmp" is never taken for one.
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.tdcdiff-(?:[a-z0-9_]{8}-(?P<pid>\d+)\.tmp|tmp-[a-z0-9_]{8}-(?P<pid2>\d+)"
                        r"|old-[0-9a-f]{32}-(?P<pid3>\d+))")


def _pid_max() -> int:
    """The largest pid this machine hands out (Linux's /proc/sys/kernel/pid_max; 2**22, its ceiling, elsewhere)."""
    with contextlib.suppress(OSError, ValueError):
        return int(Path("/proc/sys/kernel/pid_max").read_text())
    return 1 << 22


def _stale(name: str) -> re.Match | None:
    """The match of `name` when it is one of our temporaries whose writer no longer runs, else None."""
    match = _TEMPORARY.fullmatch(name)
    pid = int(match["pid"] or match["pid2"] or match["pid3"]) if match else 0
    return match if match and 0 < pid <= _pid_max() and _dead(pid) else None


def _remove(entry: os.DirEntry) -> None:
    if entry.is_dir(follow_symlinks=False):
        shutil.rmtree(entry.path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)


def _dead(pid: int) -> bool:
    """Whether no process `pid` runs on this machine (one that exists but is another user's counts as alive)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


def _remove_dead_siblings(path: Path) -> None:
    """Remove the temporaries that writers of `path` killed before finishing left beside it: those naming a pid
    no longer running (a live writer's, or one without a pid, are left alone)."""
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(path.parent):
            match = _stale(entry.name)
            if match and match["name"] == path.name:
                _remove(entry)


def _umask() -> int:
    """The process's umask, read without changing it where the OS allows (another thread may create files)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as status:
            return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file so that readers see either the old content or the new one, never a partial file.

    path: the target file (parent directories are created; checked first, see output_path); it gets the usual
    permissions, 0o666 less the umask (mkstemp alone would make it 0o600). data: its new content.
    """
    path = output_path(path, directory=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_siblings(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{TEMP_FILE}", suffix=f"-{os.getpid()}.tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with name_write_errors(path), os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """atomic_write_bytes for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def holds(*names: str, optional: tuple[str, ...] = ()) -> Callable[[Path], list[str] | None]:
    """An `ours` test for atomic_dir: an earlier output of the same write holds all these regular files (what the
    write makes, e.g. a saved model's architecture.json and weights), and maybe the `optional` ones. Returns the
    files of ours present, or None when one of `names` is missing."""
    def ours(directory: Path) -> list[str] | None:
        if not all(_regular(directory / name) for name in names):
            return None
        return [*names, *(name for name in optional if _regular(directory / name))]

    return ours


def lists(manifest: str, version: str, max_bytes: int = 64 << 20) -> Callable[[Path], list[str] | None]:
    """An `ours` test for atomic_dir: an earlier output of the same write holds a JSON `manifest` file whose
    "format" is `version` and whose "files" object lists the other files it made (a bundle's manifest.json).
    Returns the manifest and the files it lists, or None when there is no such manifest."""
    def ours(directory: Path) -> list[str] | None:
        try:
            value = parse_json(read_untrusted(directory, manifest, str(directory), max_bytes=max_bytes, hint=""),
                               directory / manifest, "")
        except (OSError, ValueError):
            return None
        if not isinstance(value, dict) or value.get("format") != version or not isinstance(value.get("files"), dict):
            return None
        return [manifest, *(name for name in value["files"] if isinstance(name, str))]

    return ours


def _regular(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _foreign(directory: Path, ours: list[str]) -> list[str]:
    """What directory holds besides the files `ours` (relative POSIX paths) and the folders holding them, as
    relative POSIX paths (a folder's with a trailing /; a symlink is never ours). Symlinks are not followed."""
    allowed = set(ours) | {parent.as_posix() for name in ours for parent in PurePosixPath(name).parents}
    foreign = []
    for root, dirs, files in os.walk(directory):
        for name in sorted(dirs) + sorted(files):
            entry = Path(root, name)
            relative = entry.relative_to(directory).as_posix()
            if relative not in allowed or entry.is_symlink():
                foreign.append(relative + ("/" if name in dirs and not entry.is_symlink() else ""))
        dirs[:] = [d for d in dirs if Path(root, d).relative_to(directory).as_posix() in allowed]
    return foreign


def check_replaceable(path: str | Path, ours: Callable[[Path], Iterable[str] | None] | None, what: str) -> None:
    """Refuse to let an atomic_dir write replace something that is not wholly its own earlier output.

    path may be absent, an empty directory, or a directory for which ours(path) names the files an earlier write
    of the same kind made (e.g. a bundle's manifest.json of our format and the files it lists) and which holds
    nothing else (no other file or folder: replacing it would delete them). Anything else (a file, a folder of the
    user's, our output with the user's files added) raises ValueError, one line naming path, `what` the write
    makes, the entries in the way (the first few) and the fix.
    """
    path = Path(path)
    if path.is_symlink() and path.is_dir():  # atomic_dir writes into the folder a link points to
        path = path.resolve()
    if not path.exists() and not path.is_symlink():
        return
    foreign = []
    if path.is_dir() and not path.is_symlink():
        with contextlib.suppress(OSError):
            if not any(path.iterdir()):
                return
            mine = ours(path) if ours is not None else None
            foreign = _foreign(path, list(mine)) if mine is not None else []
            if mine is not None and not foreign:
                return
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        shown = ", ".join(brief(name, 60, quote=False) for name in foreign[:5]) + more
        raise ValueError(f"{path} already exists and holds {shown} besides the "
                         f"files of {what.removesuffix(', nor empty')}; writing there would delete them: move them "
                         "out of it, or choose another path")
    link = broken_link(path)
    if link:  # nothing is held there: say what it is
        raise ValueError(f"{path} is {link}, not {what.removesuffix(', nor empty')}: nothing can be written through "
                         "it; fix or remove the link, or choose another path")
    raise ValueError(f"{path} already exists and is not {what}; writing there would delete what it holds: "
                     "choose another path, or delete it first")


@contextlib.contextmanager
def atomic_dir(path: str | Path, ours: Callable[[Path], Iterable[str] | None] | None = None,
               what: str = "empty") -> Iterator[Path]:
    """Build a directory in a temporary sibling that replaces `path` whole when the block succeeds.

    Yields the temporary directory to write into. On success its files are fsynced and it is renamed to
    `path`. An existing `path` is replaced only when it is an empty directory or holds exactly the files ours(path)
    names (its own earlier output, nothing else: `what` describes it); anything else raises ValueError before the
    block runs (check_replaceable), and again before the rename should it have changed meanwhile. If the block
    raises, the temporary is removed and `path` is untouched.
    A `path` that is a symlink to a directory is followed: the write replaces the directory it points to (the link
    stays, e.g. to shared storage); a symlink to anything else, or to nothing, is refused as a file is.
    Every folder and file in it gets the usual permissions, 0o777 / 0o666 less the umask: mkdtemp makes
    the folder 0o700, and safetensors writes its files 0o600, which would keep others from reading a bundle.
    A killed writer's temporary is removed by the next atomic_dir of the same path (see remove_stale_temporaries).
    A path that cannot be written (output_path: empty, under a file...) or that is or holds the current directory
    (replaced whole, it would leave this process and your shell in a deleted folder) raises ValueError first.
    """
    path = output_path(path, directory=True)
    if Path.cwd().resolve().is_relative_to(path.resolve()):
        raise ValueError(f"{path} is or holds the current directory, which this write would replace whole; give a "
                         f"new folder inside it (e.g. {path / 'out'}), or choose another path")
    if path.is_symlink() and path.is_dir():
        path = path.resolve()
    check_replaceable(path, ours, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_siblings(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{TEMP_DIR}", suffix=f"-{os.getpid()}"))
    try:
        with name_write_errors(path):
            yield tmp
            umask = _umask()
            for root, _, files in os.walk(tmp):
                for name in files:
                    with open(os.path.join(root, name), "rb") as f:
                        os.fchmod(f.fileno(), 0o666 & ~umask)
                        os.fsync(f.fileno())
                os.chmod(root, 0o777 & ~umask)
                _fsync_dir(Path(root))
            check_replaceable(path, ours, what)
            _replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(new: Path, path: Path) -> None:
    """Rename `new` to `path`; an existing `path` is moved aside first (a directory cannot be renamed over)."""
    old = None
    if path.exists() or path.is_symlink():
        old = path.with_name(f".{path.name}.{MOVED_ASIDE}{uuid.uuid4().hex}-{os.getpid()}")
        os.rename(path, old)
    try:
        os.rename(new, path)
    except BaseException:
        if old is not None:
            os.rename(old, path)
        raise
    _fsync_dir(path.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def is_temporary(name: str) -> bool:
    """Whether `name` is named as one of the temporaries above (a live writer's or a dead one's)."""
    return _TEMPORARY.fullmatch(name) is not None


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete what atomic_write_bytes, atomic_dir and _replace left in `folder` (itself, not its subfolders) when
    killed: entries named exactly as they name their temporaries, with the pid of a writer no longer running.

    A live writer's temporaries (its pid runs), names without a pid and everything in subfolders (a user's
    src/.main.py.tmp, a nested tune's writer) are kept: a temporary in a subfolder goes at the next write of its
    target (_remove_dead_siblings). Returns the removed paths.
    """
    removed = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(folder):
            if _stale(entry.name):
                _remove(entry)
                removed.append(Path(entry.path))
    return removed


def json_safe(value):
    """Config values as plain JSON (tuples and arrays become lists)."""
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if hasattr(value, "tolist"):  # numpy arrays and scalars (a scheduler's trained_betas)
        return value.tolist()
    return value


def resolve_inside(root: Path, name: object, what: str) -> Path:
    """The path of `name` (a relative POSIX path from a saved file) inside directory `root`.

    Raises ValueError, naming `what` (the file and key that named it), for anything that is not a plain
    relative path, or that leads outside root (an absolute path, a `..` part, a symlink pointing out).
    """
    parts = name.split("/") if isinstance(name, str) else []
    if not parts or "\\" in name or "\0" in name or any(p in ("", ".", "..") for p in parts):
        raise ValueError(
            f"{what} names {name!r}, which is not a plain relative path inside {root} (no absolute paths, `..`, "
            "backslashes or empty parts); the file was edited or corrupted: re-export it"
        )
    base = root.resolve()
    path = (base / name).resolve()
    if not path.is_relative_to(base):
        raise ValueError(
            f"{what} names {name!r}, which leads outside {root} (to {path}); a saved file may only refer to files "
            "inside its own directory: re-export it"
        )
    return path


_SPARSE_SLACK = 64 << 20  # smaller files are read whatever their holes (a compressed file system may show some)


def read_untrusted(root: Path, name: str, what: str, *, max_bytes: int, hint: str,
                   expected_bytes: int | None = None) -> bytes:
    """The bytes of file `name` inside directory `root`, read as untrusted input (a bundle's or a saved model's
    files, their manifests, a run directory's records).

    name: a relative POSIX path (as a file from outside names it; see resolve_inside: nothing absolute, no `..`,
    no symlink leading out of root). The file is opened without blocking and without following a symlink, and
    checked on the open descriptor before anything is read: a regular file (a FIFO would block, a device such
    as /dev/zero never end) of at most max_bytes, of exactly expected_bytes when given, and not sparse beyond
    64 MiB (mostly holes: a few kilobytes on disk that read as gigabytes). Then it is read once, and nothing
    beyond its size. what: the file and key that named `name`, for messages. hint: the fix, ending every message.
    Raises FileNotFoundError when it is missing and ValueError for anything else.
    """
    path = resolve_inside(root, name, what)
    shown = root / name
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"{shown} is missing; {hint}") from None
    except OSError as err:  # e.g. a symlink swapped in after resolve_inside (O_NOFOLLOW), or no permission
        raise ValueError(f"{shown} cannot be opened ({err.strerror}); {hint}") from None
    info = os.fstat(fd)  # before open(fd), which refuses a folder as "Is a directory: <fd>" and leaks fd
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise ValueError(f"{shown} is {'a folder' if stat.S_ISDIR(info.st_mode) else 'not a regular file'}; {hint}")
    with open(fd, "rb") as f:  # closes fd
        size = info.st_size
        if expected_bytes is not None and size != expected_bytes:
            raise ValueError(f"{shown} is truncated or corrupted: expected {expected_bytes} bytes, found {size}; "
                             f"{hint}")
        if size > max_bytes:
            raise ValueError(f"{shown} is {size} bytes, more than the {max_bytes} such a file may have; {hint}")
        on_disk = getattr(info, "st_blocks", size // 512) * 512  # POSIX; a sparse file's holes cost no disk
        if size > _SPARSE_SLACK and on_disk * 8 < size:  # but reading them costs memory
            raise ValueError(f"{shown} is a sparse file ({size} bytes, {on_disk} of them on disk): saved files are "
                             f"written in full, so this one was edited or copied with holes; {hint}")
        try:
            data = f.read(size + 1)  # one byte more: a file that grew since the check is caught too
        except MemoryError:
            raise ValueError(f"{shown} ({size} bytes) does not fit in memory; {hint}") from None
    if len(data) != size:
        raise ValueError(f"{shown} is truncated or corrupted: expected {size} bytes, found {len(data)}; {hint}")
    return data


def parse_json(data: bytes, source: Path, hint: str, *, problem: str = "is not valid JSON") -> object:
    """The JSON value in an untrusted file's bytes (source: the file, for messages).

    Raises ValueError, one line "{source} {problem} ({what is wrong}); {hint}", for text that is not JSON,
    nested too deep for the parser, or holding a key twice in one object (readers disagree on which one counts).
    """
    def unique(pairs: list) -> dict:
        result = dict(pairs)
        if len(result) != len(pairs):
            seen, repeated = set(), []
            for key, _ in pairs:
                if key in seen:
                    repeated.append(key)
                seen.add(key)
            raise ValueError(f"key(s) {brief(repeated)} appear more than once in one object")
        return result

    try:
        return json.loads(data, object_pairs_hook=unique)
    except RecursionError:
        raise ValueError(f"{source} {problem} (nested too deep); {hint}") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, the repeated keys above, a huge integer
        detail = "a number of more than 4300 digits" if "integer string conversion" in str(err) else str(err)
        raise ValueError(f"{source} {problem} ({brief(detail, 200, quote=False)}); {hint}") from None


MAX_RECORD_BYTES = 64 << 20  # a run's or tune's JSON records are kilobytes; a log.jsonl of 10^5 lines some MiB


def read_json_file(path: str | Path, hint: str, *, kind: type | None = dict) -> object:
    """The JSON value of a record we wrote and now read back (a run's or tune's *.json), read as untrusted input
    (read_untrusted, parse_json): a damaged file is named with the fix instead of the bare parser message.

    hint: the fix, ending every message. kind: the type the value must have (None: any).
    Raises FileNotFoundError when it is missing and ValueError ("{path} is not valid JSON (...); {hint}", "{path}
    holds a JSON list, not an object; {hint}") for anything else.
    """
    path = Path(path)
    value = parse_json(read_untrusted(path.parent, path.name, str(path), max_bytes=MAX_RECORD_BYTES, hint=hint),
                       path, hint)
    if kind is not None and not isinstance(value, kind):
        names = {dict: "an object", list: "a list"}
        raise ValueError(f"{path} holds {names.get(type(value), 'a JSON ' + type(value).__name__)}, not "
                         f"{names.get(kind, kind.__name__)}: it was edited or damaged; {hint}")
    return value


def is_count(value: object, minimum: int = 0) -> bool:
    """Whether value is an integer (not a bool) >= minimum, e.g. a byte or FLOPs count from a saved file: parsed
    JSON, so a Python int only. Numbers the public API takes (numpy's and 0-d tensors too) go through
    settings.is_integer / settings.as_integer instead."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def is_sha256(value: object) -> bool:
    """Whether value is a sha256 hex digest (64 lowercase hex digits)."""
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
