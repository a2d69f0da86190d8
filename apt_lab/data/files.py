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
import tempfile
from pathlib import Path

from ..errors import RunInUseError, UnsafeNameError

LOCK_NAME = ".apt_lab.lock"
_HELD: dict[str, int] = {}  # realpath of a locked folder → nesting depth in this process


def check_name(name, what: str = "category", max_bytes: int = 200) -> str:
    """``name`` when it is safe as one path component; else UnsafeNameError saying why. ``max_bytes``: its longest
    UTF-8 length (file systems allow 255 bytes per name; the rest leaves room for prefixes and suffixes)."""
    text = str(name)
    if not text or text.strip() != text:
        raise UnsafeNameError(f"{what} {text!r} is empty or has leading/trailing spaces; use a plain name.")
    if "/" in text or "\\" in text or text in (".", ".."):
        raise UnsafeNameError(f"{what} {text!r} is not a plain name (it contains '/' or '\\' or is '.'/'..'); a "
                              f"{what} name becomes a file name in the run folder. Rename the folder or the split "
                              "file's entry.")
    if any(ord(c) < 32 for c in text) or (len(text) > 1 and text[1] == ":"):
        raise UnsafeNameError(f"{what} {text!r} holds a control character or a drive letter; use a plain name.")
    if len(text.encode("utf-8")) > max_bytes:
        raise UnsafeNameError(f"{what} {text[:40]!r}... is {len(text.encode('utf-8'))} bytes long; a name becomes a "
                              f"folder or file name, so at most {max_bytes} bytes: use a shorter one.")
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
        fd = _open_no_link(path, os.O_RDWR | os.O_CREAT)  # a link planted as the lock is refused
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


# ------------------------------------------------------------------------------------- writes inside a folder
# Every write, rename and delete under a folder a user gave us goes through the functions below. They never follow
# a symbolic link inside that folder (a link planted as the lock, a temporary file, an output or an artefact folder
# is refused with UnsafeNameError, never written through), write through a fresh temporary file in the same folder
# and an atomic rename, and delete only the paths they are given (a link among them is removed itself, not its
# target).
def inside(folder: str | os.PathLike, relative: str | os.PathLike = "") -> Path:
    """``folder / relative`` after checking that no component below ``folder`` is a symbolic link and that
    ``relative`` stays inside (no ``..``, not absolute).

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> inside(root, "prompts/brick.json") == root / "prompts" / "brick.json"
        True
        >>> (root / "examples").symlink_to("/tmp")
        >>> inside(root, "examples/a.safetensors")
        Traceback (most recent call last):
        ...
        apt_lab.errors.UnsafeNameError: ... is a symbolic link; apt_lab never writes through a link inside a run folder. Remove the link (it was not made by apt_lab).
    """
    parts = Path(relative).parts
    if Path(relative).is_absolute() or ".." in parts:
        raise UnsafeNameError(f"{relative!s} is not a path inside {folder}")
    path = Path(folder)
    for part in parts:
        path = path / part
        if path.is_symlink():
            raise UnsafeNameError(f"{path} is a symbolic link; apt_lab never writes through a link inside a run "
                                  "folder. Remove the link (it was not made by apt_lab).")
    return path


def _leaf(folder, relative) -> Path:
    """``folder / relative`` with no link among its folders (a link at the leaf is replaced by an atomic rename)."""
    return inside(folder, Path(relative).parent) / Path(relative).name


def make_folder(folder: str | os.PathLike, relative: str | os.PathLike = "") -> Path:
    """Create ``folder / relative`` (and its parents below ``folder``), refusing links on the way."""
    path = inside(folder, relative)
    path.mkdir(parents=True, exist_ok=True)
    return inside(folder, relative)  # a link swapped in meanwhile is caught here


def atomic_write(target: str | os.PathLike, write, folder: str | os.PathLike | None = None) -> Path:
    """Write ``target`` through a fresh temporary file beside it (``write(tmp_path)`` fills it), flushed to disk,
    then an atomic rename: a reader, or a process killed at any moment, sees the old file or the new one. With
    ``folder``, ``target`` must lie inside it with no link on the way; a link at ``target`` itself is replaced,
    never followed.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "a.txt"
        >>> atomic_write(path, lambda tmp: tmp.write_text("x")).read_text()
        'x'
    """
    target = Path(target) if folder is None else _leaf(folder, target)  # with folder: target is relative to it
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")  # O_EXCL: never a link
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        _fsync(tmp)
        os.replace(tmp, target)
        _fsync(target.parent, directory=True)  # the rename itself survives a crash
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def write_if_changed(target: str | os.PathLike, data: str | bytes, folder: str | os.PathLike | None = None) -> bool:
    """``data`` into ``target`` through :func:`atomic_write`, unless the regular file already holds exactly these
    bytes (then nothing is touched, not even its modification time). Returns whether it wrote.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "a.csv"
        >>> write_if_changed(path, "x,y\\n"), write_if_changed(path, "x,y\\n"), write_if_changed(path, "x,z\\n")
        (True, False, True)
    """
    data = data.encode("utf-8") if isinstance(data, str) else data
    path = Path(target) if folder is None else _leaf(folder, target)
    if not path.is_symlink() and path.is_file() and path.read_bytes() == data:
        return False
    atomic_write(target, lambda tmp: tmp.write_bytes(data), folder)
    return True


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line with a single ``write`` (O_APPEND, never through a link), then fsync: a kill leaves either
    the whole line or a cut-off tail without its newline."""
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    fd = _open_no_link(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def cut_partial_line(path: str | os.PathLike) -> int:
    """Cut a last line that has no newline (left by a kill mid-write); returns the number of bytes removed."""
    if not Path(path).is_file() or Path(path).is_symlink():
        return 0
    fd = _open_no_link(path, os.O_RDWR)
    try:
        data = os.read(fd, os.fstat(fd).st_size)
        keep = data.rfind(b"\n") + 1
        if keep != len(data):
            os.ftruncate(fd, keep)
        return len(data) - keep
    finally:
        os.close(fd)


def remove_files(folder: str | os.PathLike, relatives) -> list[str]:
    """Delete exactly ``relatives`` (paths inside ``folder`` that apt_lab wrote), then the folders they leave
    empty; a link among them is removed itself, never followed. Returns what was removed."""
    removed, parents = [], set()
    for relative in relatives:
        path = _leaf(folder, relative)
        if path.is_symlink() or path.is_file():
            path.unlink()
            removed.append(str(relative))
        parents.update(p for p in Path(relative).parents if str(p) != ".")
    for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            (Path(folder) / parent).rmdir()  # only when empty (and never a link: rmdir refuses one)
    return removed


def _open_no_link(path: str | os.PathLike, flags: int) -> int:
    try:
        return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as error:
        if Path(path).is_symlink():
            raise UnsafeNameError(f"{path} is a symbolic link; apt_lab never writes through a link inside a run "
                                  "folder. Remove the link (it was not made by apt_lab).") from None
        raise error


def _fsync(path: Path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:  # e.g. directories cannot be opened on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
