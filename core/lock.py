"""An exclusive, non-blocking write lock for one index folder: ``<index folder>.lock``.

The lock file sits beside the index folder, not inside it, so it also guards the creation of
the folder and of ``<index folder>.partial/``. On POSIX the lock is ``fcntl.flock``, on Windows
``msvcrt.locking`` on the file's first byte. The operating system releases both when the
process dies, so a crashed build leaves no stale lock, only the (unlocked) file, which the next
writer reuses. A holder may delete the file it created before releasing it (``discard_file_if``);
a writer that locked the deleted file finds that the path no longer leads to it and locks again.

Within one process the lock is re-entrant for the thread that holds it, so ``build_index`` can
hold it for the whole build while ``TileIndex.save`` takes it again for each save. Another
thread of the same process is rejected like another process.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterator, Optional, Union

from .errors import LookalikeError

LOCK_SUFFIX = ".lock"
# Attempts to open and lock the lock file while other holders keep deleting it, before giving up.
MAX_LOCK_ATTEMPTS = 5
# A lock file contains a process id and a newline, so a longer file is someone else's.
MAX_LOCK_FILE_BYTES = 24

PathLike = Union[str, "os.PathLike[str]"]

_holders_guard = threading.Lock()
# Lock file path -> [owning thread id, hold count, open lock file].
_holders: dict[str, list] = {}


class IndexLockedError(LookalikeError):
    """Another build or save is writing the index folder."""


def lock_path_for(index_folder: PathLike) -> Path:
    """Return the lock file of ``index_folder``: ``<index folder>.lock`` beside it.

    Symbolic links are resolved first, so that every path to one folder shares one lock.
    """
    folder = Path(os.path.realpath(os.fspath(index_folder)))
    return folder.with_name(folder.name + LOCK_SUFFIX)


@contextmanager
def index_lock(index_folder: PathLike, discard_file_if: Optional[Callable[[], bool]] = None) -> Iterator[None]:
    """Hold the write lock of ``index_folder`` for the ``with`` block.

    ``discard_file_if`` is called when the outermost hold ends; when it returns True and this
    hold created the lock file, the file is deleted, so that a build that wrote nothing leaves
    nothing behind.

    Raises:
        IndexLockedError: another process, or another thread of this one, holds the lock.
    """
    path = lock_path_for(index_folder)
    key = str(path)
    thread_id = threading.get_ident()
    with _holders_guard:
        holder = _holders.get(key)
        if holder is not None and holder[0] != thread_id:
            raise _locked_error(index_folder, path)
        if holder is not None:
            holder[1] += 1
        else:
            stream, created = _acquire(path, index_folder)
            holder = [thread_id, 1, stream, created]
            _holders[key] = holder
    outermost = holder[1] == 1
    try:
        yield
    finally:
        discard = outermost and holder[3] and discard_file_if is not None and discard_file_if()
        with _holders_guard:
            holder[1] -= 1
            if holder[1] == 0:
                del _holders[key]
                if discard:
                    _delete_quietly(path)
                _release(holder[2])


def _acquire(path: Path, index_folder: PathLike) -> tuple[IO[bytes], bool]:
    """Open and lock the lock file; return it and whether this call created it."""
    for _ in range(MAX_LOCK_ATTEMPTS):
        stream, created = _open_lock_file(path, index_folder)
        try:
            _lock_file(stream)
        except OSError:
            stream.close()
            raise _locked_error(index_folder, path) from None
        if _still_at(stream, path):
            break
        # Its holder deleted the file between our open and our lock; lock the file at the path now.
        _release(stream)
    else:
        raise _locked_error(index_folder, path)
    if not created and not _contains_only_a_process_id(stream):
        _release(stream)
        raise LookalikeError(
            f"{path}, where the lock file of index folder {os.fspath(index_folder)} goes, is a file that Lookalike "
            "did not write (a lock file contains only a process id); move or rename it, or choose another index folder."
        )
    try:
        # The PID is only for people who find the file; the OS lock is what excludes writers.
        stream.seek(0)
        stream.truncate()
        stream.write(f"{os.getpid()}\n".encode("ascii"))
        stream.flush()
    except OSError as error:
        _release(stream)
        raise LookalikeError(
            f"cannot write the lock file {path} ({error.strerror or error}); free disk space there and try again."
        ) from error
    return stream, created


def _open_lock_file(path: Path, index_folder: PathLike) -> tuple[IO[bytes], bool]:
    if path.is_symlink() or (path.exists() and not path.is_file()):
        # Writing the PID through a link would overwrite the file it points to.
        if path.is_symlink():
            kind = "a symbolic link"
        elif path.is_dir():
            kind = "a folder"
        else:
            kind = "not a regular file"
        raise LookalikeError(
            f"{path}, where the lock file of index folder {os.fspath(index_folder)} goes, is {kind}; remove or "
            "rename it, or choose another index folder."
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The file stays open while the lock is held, so no context manager here.
        for _ in range(MAX_LOCK_ATTEMPTS):
            try:
                return _open_no_follow(path, os.O_CREAT | os.O_EXCL), True
            except FileExistsError:
                pass
            try:
                return _open_no_follow(path, 0), False
            except FileNotFoundError:
                # Its holder deleted it between the two opens.
                continue
        raise _locked_error(index_folder, path)
    except OSError as error:
        raise LookalikeError(
            f"cannot create the lock file {path} beside index folder {os.fspath(index_folder)} "
            f"({error.strerror or error}); choose an index folder in a place you can write to."
        ) from error


def _open_no_follow(path: Path, flags: int) -> IO[bytes]:
    """Open ``path`` for reading and writing, without following a symbolic link put there meanwhile."""
    descriptor = os.open(path, os.O_RDWR | flags | getattr(os, "O_NOFOLLOW", 0), 0o644)
    return os.fdopen(descriptor, "r+b")


def _contains_only_a_process_id(stream: IO[bytes]) -> bool:
    """Return whether an existing lock file contains what this module writes: nothing, or a process id line."""
    stream.seek(0)
    content = stream.read(MAX_LOCK_FILE_BYTES + 1)
    return len(content) <= MAX_LOCK_FILE_BYTES and re.fullmatch(rb"\d*\r?\n?", content) is not None


def _still_at(stream: IO[bytes], path: Path) -> bool:
    """Tell whether ``path`` still names the open file ``stream``."""
    if os.name == "nt":
        # Windows does not delete a file that is open, so the path cannot lead elsewhere.
        return True
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(stream.fileno())
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _delete_quietly(path: Path) -> None:
    # A lock file left behind is harmless: the next writer reuses it.
    with contextlib.suppress(OSError):
        path.unlink()


def _release(stream: IO[bytes]) -> None:
    try:
        _unlock_file(stream)
    finally:
        stream.close()


def _locked_error(index_folder: PathLike, path: Path) -> IndexLockedError:
    return IndexLockedError(
        f"another build is writing index folder {os.fspath(index_folder)} (lock {path} is held); wait "
        "for it to finish or cancel it, or write to another folder. Deleting the lock file does not stop that build."
    )


if os.name == "nt":
    import msvcrt

    def _lock_file(stream: IO[bytes]) -> None:
        stream.seek(0)
        msvcrt.locking(stream.fileno(), msvcrt.LK_NBLCK, 1)

    def _unlock_file(stream: IO[bytes]) -> None:
        stream.seek(0)
        msvcrt.locking(stream.fileno(), msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _lock_file(stream: IO[bytes]) -> None:
        fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock_file(stream: IO[bytes]) -> None:
        fcntl.flock(stream.fileno(), fcntl.LOCK_UN)
