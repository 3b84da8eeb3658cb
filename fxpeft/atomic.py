"""Save a *set* of files into one directory atomically, safely under concurrency and kills; check it on load.

A save (:func:`commit_files`) never leaves a mix of two saves that loads silently:

* **Phase 1, no lock held.** Every file is written to a temporary name in the target directory and fsynced,
  then a manifest (save id; name, size and sha256 of every file) is written the same way. Concurrent writers
  run this phase in parallel.
* **Phase 2, under an exclusive** ``flock`` **on the directory's lock file.** Temp files of dead writers are
  removed; the manifest is renamed into place *first*, already describing the new files; stale files are
  removed; the files are renamed over their fixed names (HF PEFT reads ``adapter_config.json`` and
  ``adapter_model.safetensors`` under exactly those names); the directory is fsynced. Phase 2 of two writers
  never overlaps, so the directory ends as exactly one writer's complete set.

Because the manifest goes first, a kill anywhere in phase 2 leaves some file that does not match it, and
:func:`verify_files` (which readers call, under a shared lock) raises :class:`~fxpeft.errors.AdapterFileError`.
A directory without a manifest was not written by fxpeft (HF PEFT, a download) and is accepted as it is.
A loader holds the shared lock over the check and its reads, so it reads the files it checked::

    with read_lock(directory):
        verify_files(directory, [CONFIG_NAME, WEIGHTS_NAME])
        ...  # read them

Files in a directory (``<id>`` is 16 hex digits, one per save)::

    <your files>                     under their fixed names
    .fxpeft-manifest.json            the last save's manifest
    .fxpeft.lock                     empty; flock'd by writers (exclusive) and readers (shared); never deleted
    .fxpeft-tmp-<id>.lock            a running save's marker, flock'd for the writer's whole life
    .fxpeft-tmp-<id>-<name>          a running save's temp files (and its manifest)

A writer's marker is locked as long as the writer lives (the kernel drops the lock when it dies, even on
``SIGKILL``), so the next save removes the temp files of dead writers and never those of a live one. It also
removes the ``.fxpeft-tmp-XXXXXXXX-<name>`` files that fxpeft 0.1's saves left when killed (they had no
marker), and leaves ``fxpeft.export``'s ``.fxpeft-tmp-XXXXXXXX.pt2`` alone (it may be running).
``flock`` locks belong to an open file description, so threads of one process exclude each other too.

Limits: posix first. Without ``fcntl`` (Windows), or on a file system without ``flock`` (Lustre mounted
without ``-o flock``), saves still write temp files and a manifest but are not serialised, and no temp file of
another save is removed. On NFS, Linux emulates ``flock`` with POSIX locks, which do not separate threads of
one process. With node-local locks (Lustre ``-o localflock``), saves from two nodes into one directory at once
are not safe.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
from typing import Callable, Iterable, Iterator, Sequence

try:
    import fcntl
except ImportError:  # Windows: no advisory locks (see the module docstring)
    fcntl = None  # type: ignore[assignment]

from .errors import AdapterFileError

__all__ = ["commit_files", "replace_file", "verify_files", "read_lock", "MANIFEST_NAME", "LOCK_NAME", "TMP_PREFIX"]

MANIFEST_NAME = ".fxpeft-manifest.json"
LOCK_NAME = ".fxpeft.lock"
TMP_PREFIX = ".fxpeft-tmp-"
_FORMAT = "fxpeft-manifest/1"
_CHUNK = 1 << 20
# A save's marker; and any file of a save (marker or temp file), whose id ties it to the marker's lock.
_MARKER = re.compile(re.escape(TMP_PREFIX) + r"(?P<id>[0-9a-f]{16})\.lock")
_OWN_TMP = re.compile(re.escape(TMP_PREFIX) + r"(?P<id>[0-9a-f]{16})(?:\.lock|-.+)", re.S)
# Temp files of fxpeft <= 0.1's io._commit (mkstemp names, no marker): only ever left by a dead save.
# fxpeft.export's ``.fxpeft-tmp-XXXXXXXX.pt2`` temp files do not match (no "-" after the random part).
_LEGACY_TMP = re.compile(re.escape(TMP_PREFIX) + r"[a-z0-9_]{8}-.+", re.S)

# flock's errors on a file system that does not implement it.
_NO_FLOCK = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}

Writer = Callable[[str], None]


# ------------------------------------------------------------------------------------------------ helpers


def _flock(fd: int, op: str, block: bool = True) -> bool:
    """Take (``"ex"``, ``"sh"``) or drop (``"un"``) a flock; False if ``block=False`` and it is held elsewhere."""
    if fcntl is None:
        return True
    flags = {"ex": fcntl.LOCK_EX, "sh": fcntl.LOCK_SH, "un": fcntl.LOCK_UN}[op]
    try:
        fcntl.flock(fd, flags if block else flags | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno not in _NO_FLOCK:
            raise
        # The file system has no flock (Lustre without -o flock, some FUSE mounts): go on unlocked, and answer
        # every probe "held", so no writer is ever taken for dead and its temp files stay.
        return block
    return True


# Descriptors that hold a flock. A forked child (a DataLoader worker, say) shares their open file
# descriptions, so it would hold the locks for its whole life: the directory lock would block every save and
# load there, a marker would keep a killed writer "alive". The child closes its copies at once.
_LOCK_FDS: set[int] = set()


def _close_locks_in_child() -> None:
    for fd in list(_LOCK_FDS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _LOCK_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_locks_in_child)


def _open_lock(path: str, flags: int) -> int:
    fd = os.open(path, flags, 0o666)
    _LOCK_FDS.add(fd)
    return fd


def _close_lock(fd: int) -> None:
    _LOCK_FDS.discard(fd)  # first: the number may be reused by another thread right after close
    os.close(fd)


def _create(path: str) -> None:
    # Mode 0o666 minus the umask, as open() gives a new file (mkstemp would give 0600). os.umask() is not
    # used to read the mask: it is process-global and changing it races with other threads.
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666))


def _sha256(f) -> str:
    h = hashlib.sha256()
    while chunk := f.read(_CHUNK):
        h.update(chunk)
    return h.hexdigest()


def _digest(path: str) -> dict[str, int | str]:
    """Size and sha256 of ``path``, which is fsynced on the way (the writer may not have)."""
    # fsync needs a writable handle on Windows only.
    with open(path, "rb" if os.name == "posix" else "r+b") as f:
        sha = _sha256(f)
        os.fsync(f.fileno())
        return {"size": f.tell(), "sha256": sha}


def _fsync_dir(directory: str) -> None:
    """Make the renames durable (posix; some file systems refuse fsync on a directory, which is fine)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _unlink(path: str) -> None:
    # Cleanup is best effort: a file another cleaner removed first, or one we may not delete, must not fail a save.
    with contextlib.suppress(OSError):
        os.unlink(path)


def _check_names(files: Sequence[tuple[str, Writer]]) -> list[str]:
    names = [name for name, _ in files]
    if not names:
        raise ValueError("commit_files got no files to write")
    for name in names:
        if (not isinstance(name, str) or not name or name in (".", "..") or os.path.basename(name) != name
                or (os.altsep and os.altsep in name) or name.startswith(".fxpeft")):
            raise ValueError(f"{name!r} is not a plain file name (no directory part, not starting with '.fxpeft')")
    if len(set(names)) != len(names):
        raise ValueError(f"file names repeat: {names}")
    return names


# ------------------------------------------------------------------------------------------------ writing


def commit_files(directory: str | os.PathLike, files: Sequence[tuple[str, Writer]], *,
                 stale: Callable[[str], bool] | None = None) -> None:
    """Write a set of files into ``directory`` so that it ends as exactly one save's complete set.

    Concurrent calls (threads or processes) on one directory leave one caller's files, all of them; a call that
    fails or is killed leaves either the previous set (failure while writing) or a set that
    :func:`verify_files` refuses (kill while renaming). The next call removes the temp files of dead writers.
    New files get mode ``0o666`` minus the umask, as ``open()`` gives a new file (an existing file's mode is
    not kept).

    Args:
        directory: created if missing.
        files: ``(name, write)`` pairs; ``write(path)`` writes the whole file at ``path`` (which exists, empty;
            overwrite it in place). Names are plain file names, renamed into place in this order.
        stale: called with the name of every other file in the directory (not this set's, not fxpeft's own);
            those it returns True for are removed, before the new files are renamed into place (so an old
            ``model.safetensors`` is never seen next to a new sharded checkpoint).

    Raises:
        ValueError: a name is not a plain file name, or names repeat.
        OSError: from the file system; whatever ``write`` raises. Either way this save's temp files are removed.

    Example:
        >>> import os, tempfile
        >>> from fxpeft.atomic import commit_files, verify_files
        >>> def text(s):
        ...     def write(path):
        ...         with open(path, "w") as f:
        ...             f.write(s)
        ...     return write
        >>> d = tempfile.mkdtemp()
        >>> commit_files(d, [("weights.bin", text("w")), ("config.json", text("{}"))])
        >>> verify_files(d, ["weights.bin", "config.json"])
        >>> sorted(os.listdir(d))
        ['.fxpeft-manifest.json', '.fxpeft.lock', 'config.json', 'weights.bin']
    """
    directory = os.fspath(directory)
    names = _check_names(files)
    os.makedirs(directory, exist_ok=True)
    lock_fd = _open_lock(os.path.join(directory, LOCK_NAME), os.O_CREAT | os.O_RDWR)
    try:
        save_id, marker_fd = _start(directory, lock_fd)
        try:
            manifest_tmp, temps = _write_all(directory, save_id, files)
            _flock(lock_fd, "ex")  # phase 2: held until lock_fd is closed
            _remove_dead(directory, save_id)
            _publish(directory, manifest_tmp, temps, _stale_names(directory, names, stale))
        finally:
            _remove_own(directory, save_id)  # the temp files a failure left (none after a success), the marker
            _close_lock(marker_fd)
    finally:
        _close_lock(lock_fd)


def replace_file(path: str | os.PathLike, write: Writer) -> None:
    """Write one file atomically: ``write(tmp)`` writes a temp file next to ``path``, which is then renamed
    into place, so a crash or an error leaves the old file (or none), never half of a new one.

    The temp name keeps ``path``'s extension (writers such as ``torch.export.save`` go by it) and the file is
    opened by ``write`` itself, so the umask applies as for any new file.

    Example:
        >>> import os, tempfile
        >>> from fxpeft.atomic import replace_file
        >>> p = os.path.join(tempfile.mkdtemp(), "t.json")
        >>> replace_file(p, lambda tmp: open(tmp, "w").write("[]")); open(p).read()
        '[]'
    """
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".fxpeft-{os.getpid()}-{secrets.token_hex(8)}-{name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise


def _start(directory: str, lock_fd: int) -> tuple[str, int]:
    """Create and lock this save's marker; return ``(save id, marker fd)``."""
    save_id = secrets.token_hex(8)
    # Under the shared directory lock, so a cleaner (which holds it exclusively) never sees the marker in the
    # instant between its creation and its flock, when it would look like a dead writer's.
    _flock(lock_fd, "sh")
    try:
        fd = _open_lock(os.path.join(directory, f"{TMP_PREFIX}{save_id}.lock"), os.O_CREAT | os.O_EXCL | os.O_RDWR)
        _flock(fd, "ex")
    finally:
        _flock(lock_fd, "un")
    return save_id, fd


def _write_all(directory: str, save_id: str, files: Sequence[tuple[str, Writer]]) -> tuple[str, list[tuple[str, str]]]:
    """Phase 1: every file and the manifest at temp names, fsynced. Return ``(manifest temp, [(temp, name)])``."""
    temps, entries = [], []
    for name, write in files:
        tmp = os.path.join(directory, f"{TMP_PREFIX}{save_id}-{name}")
        _create(tmp)
        write(tmp)
        entries.append({"name": name, **_digest(tmp)})
        temps.append((tmp, name))
    manifest_tmp = os.path.join(directory, f"{TMP_PREFIX}{save_id}-{MANIFEST_NAME}")
    _create(manifest_tmp)
    with open(manifest_tmp, "w", encoding="utf-8") as f:
        json.dump({"format": _FORMAT, "id": save_id, "files": entries}, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    return manifest_tmp, temps


def _stale_names(directory: str, names: list[str], stale: Callable[[str], bool] | None) -> list[str]:
    # Asked before anything is renamed, so a ``stale`` that raises leaves the previous save untouched.
    if stale is None:
        return []
    keep = set(names)
    return [n for n in os.listdir(directory) if n not in keep and not n.startswith(".fxpeft") and stale(n)
            and not os.path.isdir(os.path.join(directory, n))]


def _publish(directory: str, manifest_tmp: str, temps: list[tuple[str, str]], stale: list[str]) -> None:
    """Phase 2 (under the exclusive lock): manifest, stale removals, renames, in that order."""
    # The manifest already describes the new files: until a file's own rename it holds the old save's bytes
    # and does not match, so a kill in between is caught by verify_files (no old config beside new weights).
    os.replace(manifest_tmp, os.path.join(directory, MANIFEST_NAME))
    _fsync_dir(directory)  # the manifest reaches the disk before any file it describes
    for name in stale:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, name))
    for tmp, name in temps:
        os.replace(tmp, os.path.join(directory, name))
    _fsync_dir(directory)


def _remove_own(directory: str, save_id: str) -> None:
    # Best effort (it runs in a ``finally``): an error here must not hide the one that got us here.
    own = f"{TMP_PREFIX}{save_id}-"
    with contextlib.suppress(OSError):
        for n in os.listdir(directory):
            if n.startswith(own):
                _unlink(os.path.join(directory, n))
    _unlink(os.path.join(directory, f"{TMP_PREFIX}{save_id}.lock"))  # last: it guards the temp files above


def _is_live(marker: str) -> bool:
    """Whether the writer owning ``marker`` still runs (it holds the marker's flock)."""
    try:
        fd = _open_lock(marker, os.O_RDWR)  # writable: NFS emulates an exclusive flock with a write lock
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell: keep its files
    try:
        return not _flock(fd, "ex", block=False)
    finally:
        _close_lock(fd)


def _remove_dead(directory: str, own_id: str) -> None:
    """Remove the temp files of writers that died (called under the exclusive directory lock)."""
    if fcntl is None:
        return  # no locks, no way to tell a dead writer from a live one
    listing = os.listdir(directory)
    live = {own_id} | {m["id"] for n in listing if (m := _MARKER.fullmatch(n)) and _is_live(os.path.join(directory, n))}
    doomed = [n for n in listing if _LEGACY_TMP.fullmatch(n)
              or ((m := _OWN_TMP.fullmatch(n)) and m["id"] not in live)]
    # Markers last, so a cleaner killed half-way leaves them to tell the next one what is left.
    for n in sorted(doomed, key=lambda n: bool(_MARKER.fullmatch(n))):
        _unlink(os.path.join(directory, n))


# ------------------------------------------------------------------------------------------------ reading


@contextlib.contextmanager
def read_lock(directory: str | os.PathLike) -> Iterator[bool]:
    """Hold the directory's shared lock: no fxpeft save renames files into it meanwhile.

    Wrap both :func:`verify_files` and the reads in it, so the files read are the ones verified. Creates
    nothing: a directory without the lock file (never saved into by fxpeft, or only now for the first time)
    is read unlocked, and the context value says so.

    Yields:
        Whether the lock is held.

    Example:
        >>> import tempfile
        >>> from fxpeft.atomic import read_lock, verify_files
        >>> d = tempfile.mkdtemp()
        >>> with read_lock(d) as locked:
        ...     verify_files(d)
        >>> locked  # no fxpeft save here yet: nothing to lock
        False
    """
    fd = None
    with contextlib.suppress(OSError):
        fd = _open_lock(os.path.join(os.fspath(directory), LOCK_NAME), os.O_RDONLY)
    if fd is None:
        yield False
        return
    try:
        _flock(fd, "sh")
        yield True
    finally:
        _close_lock(fd)


def verify_files(directory: str | os.PathLike, names: Iterable[str] | None = None) -> None:
    """Check that ``names`` are the files of one complete fxpeft save (size and sha256 against its manifest).

    A directory without ``.fxpeft-manifest.json`` was not written by fxpeft (HF PEFT, a download) and passes.
    Takes the shared lock (see :func:`read_lock`), so a concurrent save is seen before or after, never halfway.
    Hashing reads every byte: about a second per GB.

    Args:
        directory: the directory a save wrote.
        names: the files to check; ``None`` checks every file the manifest lists.

    Raises:
        AdapterFileError: a file is missing, not part of the last save, or differs from it (two saves mixed,
            or a save interrupted), or the manifest is unreadable. The message names the file and the fix.

    Example:
        >>> import tempfile
        >>> from fxpeft.atomic import verify_files
        >>> verify_files(tempfile.mkdtemp(), ["adapter_config.json"])  # no manifest: not fxpeft's, accepted
    """
    directory = os.fspath(directory)
    names = None if names is None else list(names)
    for attempt in range(2):
        with read_lock(directory) as locked:
            manifest = _read_manifest(directory)
            if manifest is None:
                return
            # A manifest seen without the lock: the first save into this directory made both meanwhile (the
            # lock file first), and may still be renaming. Look again under the lock.
            if not locked and attempt == 0 and os.path.exists(os.path.join(directory, LOCK_NAME)):
                continue
            listed = {e["name"]: e for e in manifest["files"]}
            for name in listed if names is None else names:
                _check_file(directory, name, listed)
            return


def _problem(path: str, what: str) -> AdapterFileError:
    return AdapterFileError(
        f"{path}: {what}. The directory holds files of two different saves, or a save into it was interrupted; "
        f"save again. (If another tool rewrote the files on purpose, delete {MANIFEST_NAME} to accept them.)")


def _read_manifest(directory: str) -> dict | None:
    path = os.path.join(directory, MANIFEST_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest.get("format") != _FORMAT:
            raise ValueError(f"unknown format {manifest.get('format')!r}")
        for e in manifest["files"]:
            if not (isinstance(e["name"], str) and isinstance(e["size"], int) and isinstance(e["sha256"], str)):
                raise ValueError(f"bad entry {e!r}")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise _problem(path, f"the manifest is unreadable ({type(e).__name__}: {e})") from e
    return manifest


def _check_file(directory: str, name: str, listed: dict[str, dict]) -> None:
    path = os.path.join(directory, name)
    if name not in listed:
        raise _problem(path, f"not part of the last fxpeft save here, whose manifest lists {sorted(listed)}")
    want = listed[name]
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != want["size"]:  # found without reading the file
                raise _problem(path, f"{size} bytes, but the last fxpeft save wrote {want['size']}")
            if _sha256(f) != want["sha256"]:
                raise _problem(path, "its content (sha256) differs from what the last fxpeft save wrote")
    except FileNotFoundError:
        raise _problem(path, "missing, but the last fxpeft save wrote it") from None
