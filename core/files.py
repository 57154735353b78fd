"""Files written beside their target and renamed over it, with the permissions a plain write would give."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from typing import IO

# Attempts at a free temporary name. Each name has 64 random bits, so repeated clashes point to planted files.
TEMPORARY_NAME_ATTEMPTS = 100


def open_temporary_beside(target: Path, mode: str = "w", encoding: str = "utf-8") -> tuple[IO, Path]:
    """Create a new hidden file in ``target``'s folder and return it, open for writing, with its path.

    ``tempfile.mkstemp`` would give the file mode 0600, so a report or ``labels.csv`` renamed
    into a shared folder would be readable by its owner alone. This file gets the umask's mode
    instead, or the permission bits of the file it replaces. ``O_EXCL`` creates it new, so a
    link planted under the temporary name is never followed.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(TEMPORARY_NAME_ATTEMPTS):
        temporary = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
        try:
            descriptor = os.open(temporary, flags, 0o666)
        except FileExistsError:
            continue
        try:
            _copy_permission_bits(target, descriptor)
            # newline="" writes line ends as given, which the csv module needs.
            stream = (os.fdopen(descriptor, mode) if "b" in mode
                      else os.fdopen(descriptor, mode, encoding=encoding, newline=""))
        except BaseException:
            os.close(descriptor)
            temporary.unlink(missing_ok=True)
            raise
        return stream, temporary
    raise FileExistsError(f"no free temporary name beside {target} after {TEMPORARY_NAME_ATTEMPTS} attempts")


def _copy_permission_bits(target: Path, descriptor: int) -> None:
    try:
        target_stat = os.stat(target, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISREG(target_stat.st_mode) and hasattr(os, "fchmod"):
        os.fchmod(descriptor, stat.S_IMODE(target_stat.st_mode))
