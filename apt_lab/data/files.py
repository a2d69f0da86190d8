"""Names, paths and locks that keep apt_lab's files where they belong.

- `check_name`: a category name becomes a folder or file name (``prompts/<category>.json``), so it must be one
  plain path component: no separator, no ``..``, no drive, no control character.
- `check_inside`: a path read from a split file must resolve inside the dataset root.
- `folder_lock`: one process at a time in a run folder (or a download root). The lock is the operating system's
  (``flock`` / ``msvcrt.locking``) on ``<folder>/.apt_lab.lock``, so it vanishes with its process: a lock file
  left by a killed run is recognised as stale and taken over, never waited on.

Example:
    >>> check_name("metal_nut")
    'metal_nut'
    >>> check_name("../../etc")
    Traceback (most recent call last):
    ...
    apt_lab.errors.UnsafeNameError: category '../../etc' is not a plain name (it contains '/' or '\\' or is '.'/'..'); a category name becomes a file name in the run folder. Rename the folder or the split file's entry.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
from pathlib import Path

from ..errors import RunInUseError, UnsafeNameError

LOCK_NAME = ".apt_lab.lock"
_HELD: dict[str, int] = {}  # realpath of a locked folder → nesting depth in this process


def check_name(name, what: str = "category") -> str:
    """``name`` when it is safe as one path component; else UnsafeNameError saying why."""
    text = str(name)
    if not text or text.strip() != text:
        raise UnsafeNameError(f"{what} {text!r} is empty or has leading/trailing spaces; use a plain name.")
    if "/" in text or "\\" in text or text in (".", ".."):
        raise UnsafeNameError(f"{what} {text!r} is not a plain name (it contains '/' or '\\' or is '.'/'..'); a "
                              f"{what} name becomes a file name in the run folder. Rename the folder or the split "
                              "file's entry.")
    if any(ord(c) < 32 for c in text) or (len(text) > 1 and text[1] == ":"):
        raise UnsafeNameError(f"{what} {text!r} holds a control character or a drive letter; use a plain name.")
    return text


def check_inside(path: str | os.PathLike, root: str | os.PathLike, where: str) -> Path:
    """``root / path`` when ``path`` is relative and resolves (symbolic links followed) inside ``root``.

    Example:
        >>> check_inside("candle/Data/0001.JPG", "/data/visa", "1cls.csv line 2").as_posix()
        '/data/visa/candle/Data/0001.JPG'
    """
    text = str(path)
    if os.path.isabs(text) or text.startswith(("/", "\\")) or (len(text) > 1 and text[1] == ":"):
        raise UnsafeNameError(f"{where}: path {text!r} is absolute; paths in a split file must be relative to the "
                              f"dataset root {root}.")
    full = Path(root) / text
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(full)]) != real_root:
        raise UnsafeNameError(f"{where}: path {text!r} resolves outside the dataset root {root}; a split file may "
                              "only name files inside the root. Fix the split file.")
    return full


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "run folder"):
    """Hold ``<folder>/.apt_lab.lock`` (the folder must exist) for the ``with`` block; re-entrant in one process.

    Raises:
        RunInUseError: another live process holds it (its pid and start time are named).
    """
    key = os.path.realpath(folder)
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    path = Path(folder) / LOCK_NAME
    fd = _acquire(path, what)
    _HELD[key] = 1
    try:
        yield
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still holding it: a waiting process then finds the file gone and retries
        os.close(fd)


def _acquire(path: Path, what: str) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            holder = _read_holder(fd)
            os.close(fd)
            raise RunInUseError(
                f"{path.parent} is in use by another apt_lab process (pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}, since {holder.get('started', '?')}); two processes in one {what} would "
                "overwrite each other's results. Wait for it to finish, or choose another folder (--name/--out).")
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if not same:  # the previous holder removed the file between our open and our lock: start again
            os.close(fd)
            continue
        stale = _read_holder(fd)
        if stale:
            print(f"note: took over a stale lock in {path.parent} (pid {stale.get('pid', '?')} is no longer running)",
                  flush=True)
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": datetime.datetime.now().isoformat(timespec="seconds")}).encode()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, 0)
        os.write(fd, record)
        return fd


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, 0)
        data = os.read(fd, 4096)
        return json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {"pid": "unknown"}
