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
    apt_lab.errors.UnsafeNameError: category '../../etc' is not a plain name (it contains '/' or '\\' or is '.'/'..'); a category becomes a file name in the run folder. Rename the folder or the split file's entry.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import secrets
import socket
import stat
from pathlib import Path

from ..errors import CorruptFileError, RunInUseError, UnsafeNameError

LOCK_NAME = ".apt_lab.lock"


def check_name(name, what: str = "category", max_bytes: int = 200) -> str:
    """``name`` when it is safe as one path component; else UnsafeNameError saying why. ``max_bytes``: its longest
    UTF-8 length (file systems allow 255 bytes per name; the rest leaves room for prefixes and suffixes)."""
    text = str(name)
    if not text or text.strip() != text:
        raise UnsafeNameError(f"{what} {text!r} is empty or has leading/trailing spaces; use a plain name.")
    if "/" in text or "\\" in text or text in (".", ".."):
        raise UnsafeNameError(f"{what} {text!r} is not a plain name (it contains '/' or '\\' or is '.'/'..'); a "
                              f"{what} becomes a file name in the run folder. "
                              + ("Rename the folder or the split file's entry." if what == "category" else
                                 "Choose a plain name."))
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


# ------------------------------------------------------------------------------------------- an opened folder
# Every read, write, rename and delete inside a run folder (or a download root) goes through a Folder: the folder is
# opened once and every operation is relative to that descriptor (``dir_fd``) with O_NOFOLLOW, so a symbolic link
# planted inside — or the folder itself swapped for a link while a run works — is refused or receives nothing.
_NOFOLLOW, _DIRECTORY, _NONBLOCK = (getattr(os, flag, 0) for flag in ("O_NOFOLLOW", "O_DIRECTORY", "O_NONBLOCK"))
_AT = os.open in os.supports_dir_fd  # POSIX; elsewhere (Windows) the same calls take full paths


class Folder:
    """A folder opened once; its methods take paths relative to it and never follow a symbolic link.

    Example:
        >>> import tempfile
        >>> with Folder(Path(tempfile.mkdtemp()) / "run", create=True) as folder:
        ...     folder.write("cells/brick/a.json", "{}")
        ...     folder.append("cells.jsonl", '{"x": 1}')
        ...     folder.read("cells/brick/a.json"), folder.read("cells.jsonl"), folder.read("missing.txt")
        (b'{}', b'{"x": 1}\\n', None)
    """

    def __init__(self, path: str | os.PathLike, create: bool = False, link: bool = False):
        """``create``: make the folder (and its parents) when missing; ``link``: the folder itself may be a
        symbolic link (a user's own folder for prompts or a cache — never a run folder); links inside it never."""
        self.path = Path(path)
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.mkdir(self.path)
        if self.path.is_symlink() and not link:
            raise UnsafeNameError(f"{self.path} is a symbolic link; apt_lab opens only a real folder as a run "
                                  "folder. Pass the folder it points to, or another --name.")
        self.fd = os.open(self.path, os.O_RDONLY | _DIRECTORY | (0 if link else _NOFOLLOW)) if _AT else None

    def __enter__(self) -> "Folder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    @contextlib.contextmanager
    def _at(self, relative, create: bool = False):
        """(descriptor of the folder holding ``relative``, its last name); links among the folders are refused."""
        parts = Path(relative).parts
        if not parts or Path(relative).is_absolute() or ".." in parts:
            raise UnsafeNameError(f"{relative!s} is not a path inside {self.path}")
        if not _AT:  # no descriptors: full paths, checked for links component by component
            for n in range(1, len(parts)):
                sub = self.path.joinpath(*parts[:n])
                if sub.is_symlink():
                    raise UnsafeNameError(f"{sub} is a symbolic link; apt_lab never writes through a link.")
                if create:
                    sub.mkdir(exist_ok=True)
            yield None, str(self.path.joinpath(*parts))
            return
        fd = os.dup(self.fd)
        try:
            for n, part in enumerate(parts[:-1], 1):
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o755, dir_fd=fd)
                try:
                    child = os.open(part, os.O_RDONLY | _DIRECTORY | _NOFOLLOW, dir_fd=fd)
                except (NotADirectoryError, OSError) as error:
                    if isinstance(error, FileNotFoundError):
                        raise
                    raise UnsafeNameError(f"{self.path.joinpath(*parts[:n])} is a symbolic link or not a folder; "
                                          "apt_lab never writes through a link inside a run folder. Remove it (it "
                                          "was not made by apt_lab).") from None
                os.close(fd)
                fd = child
            yield fd, parts[-1]
        finally:
            os.close(fd)

    def _open(self, relative, flags: int, create: bool = False) -> int:
        """A descriptor of the regular file ``relative`` (never a link, FIFO or device: CorruptFileError)."""
        with self._at(relative, create) as (fd, name):
            try:
                handle = os.open(name, flags | _NOFOLLOW | _NONBLOCK, 0o644, dir_fd=fd)
            except OSError as error:
                if isinstance(error, FileNotFoundError):
                    raise
                raise _not_regular(self.path / relative, error) from None
        if not stat.S_ISREG(os.fstat(handle).st_mode):
            os.close(handle)
            raise _not_regular(self.path / relative)
        return handle

    def read(self, relative) -> bytes | None:
        """The bytes of the regular file ``relative``; None when it does not exist."""
        try:
            handle = self._open(relative, os.O_RDONLY)
        except FileNotFoundError:
            return None
        with os.fdopen(handle, "rb") as file:
            return file.read()

    def exists(self, relative) -> bool:
        try:
            with self._at(relative) as (fd, name):
                os.stat(name, dir_fd=fd, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False

    def write(self, relative, data: str | bytes) -> None:
        """``data`` into ``relative`` through a fresh temporary file beside it, flushed, then an atomic rename: a
        reader, or a process killed at any moment, sees the old file or the new one. A link at ``relative``
        itself is replaced, never followed; missing folders are created."""
        data = data.encode("utf-8") if isinstance(data, str) else data
        with self._at(relative, create=True) as (fd, name):
            tmp = f"{name}.{secrets.token_hex(6)}.tmp"  # O_EXCL below: a fresh name, never a planted link
            handle = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644, dir_fd=fd)
            try:
                with os.fdopen(handle, "wb") as file:
                    file.write(data)
                    file.flush()
                    os.fsync(file.fileno())
                os.replace(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
                tmp = None
                if fd is not None:
                    os.fsync(fd)  # the rename itself survives a crash
            finally:
                if tmp is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp, dir_fd=fd)

    def write_if_changed(self, relative, data: str | bytes) -> bool:
        """:meth:`write` unless the regular file already holds exactly these bytes (then nothing is touched, not
        even its modification time). Returns whether it wrote."""
        data = data.encode("utf-8") if isinstance(data, str) else data
        try:
            if self.read(relative) == data:
                return False
        except (CorruptFileError, UnsafeNameError):
            pass  # a link or odd file at an output's name: replaced by the write's rename
        self.write(relative, data)
        return True

    def append(self, relative, line: str) -> None:
        """Append one line with a single ``write`` (O_APPEND), then fsync: a kill leaves either the whole line or
        a cut-off tail without its newline."""
        handle = self._open(relative, os.O_WRONLY | os.O_APPEND | os.O_CREAT, create=True)
        try:
            os.write(handle, (line.rstrip("\n") + "\n").encode("utf-8"))
            os.fsync(handle)
        finally:
            os.close(handle)

    def cut_partial_line(self, relative) -> int:
        """Cut a last line that has no newline (left by a kill mid-write); returns the number of bytes removed."""
        try:
            handle = self._open(relative, os.O_RDWR)
        except FileNotFoundError:
            return 0
        try:
            data = os.read(handle, os.fstat(handle).st_size)
            keep = data.rfind(b"\n") + 1
            if keep != len(data):
                os.ftruncate(handle, keep)
            return len(data) - keep
        finally:
            os.close(handle)

    def remove(self, relatives) -> list[str]:
        """Delete exactly ``relatives`` (files apt_lab wrote; a link among them is removed itself), then the folders
        they leave empty. Every path is checked before the first deletion, so a refusal deletes nothing."""
        relatives = list(dict.fromkeys(str(r) for r in relatives))
        for relative in relatives:  # a link among the folders, '..' or an absolute path: refused now
            with contextlib.suppress(FileNotFoundError), self._at(relative):
                pass
        removed, parents = [], set()
        for relative in relatives:
            with contextlib.suppress(FileNotFoundError), self._at(relative) as (fd, name):
                if stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                    raise UnsafeNameError(f"{self.path / relative} is a folder, not a file apt_lab wrote; "
                                          "nothing was deleted for it.")
                os.unlink(name, dir_fd=fd)
                removed.append(relative)
            parents.update(p for p in Path(relative).parents if str(p) != ".")
        for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError), self._at(parent) as (fd, name):
                os.rmdir(name, dir_fd=fd)  # only when empty (and never a link: rmdir refuses one)
        return removed

    def names(self) -> list[str]:
        """The names directly inside the folder."""
        return sorted(os.listdir(self.fd if self.fd is not None else self.path))

    @contextlib.contextmanager
    def lock(self, what: str = "run folder"):
        """Hold ``.apt_lab.lock`` for the ``with`` block: one process at a time; re-entrant in one process; a
        lock file left by a killed process is taken over (the operating system's lock died with it).

        Raises:
            RunInUseError: another live process holds it (its pid and start time are named).
        """
        info = os.fstat(self.fd) if self.fd is not None else os.stat(self.path)
        key = (info.st_dev, info.st_ino)
        if key in _HELD:
            _HELD[key] += 1
            try:
                yield
            finally:
                _HELD[key] -= 1
            return
        handle = self._acquire(what)
        _HELD[key] = 1
        try:
            yield
        finally:
            del _HELD[key]
            with contextlib.suppress(OSError), self._at(LOCK_NAME) as (fd, name):
                os.unlink(name, dir_fd=fd)  # while still holding it: a waiting process finds it gone and retries
            os.close(handle)

    def _acquire(self, what: str) -> int:
        while True:
            handle = self._open(LOCK_NAME, os.O_RDWR | os.O_CREAT, create=True)  # a planted link is refused
            if not _try_lock(handle):
                holder = _read_holder(handle)
                os.close(handle)
                raise RunInUseError(
                    f"{self.path} is in use by another apt_lab process (pid {holder.get('pid', '?')} on "
                    f"{holder.get('host', '?')}, since {holder.get('started', '?')}); two processes in one {what} "
                    "would overwrite each other's results. Wait for it to finish, or choose another folder "
                    "(--name/--out).")
            try:
                with self._at(LOCK_NAME) as (fd, name):
                    same = os.path.samestat(os.fstat(handle), os.stat(name, dir_fd=fd, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file between our open and our lock: start again
                os.close(handle)
                continue
            stale = _read_holder(handle)
            if stale:
                print(f"note: took over a stale lock in {self.path} (pid {stale.get('pid', '?')} is no longer "
                      "running)", flush=True)
            record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": datetime.datetime.now().isoformat(timespec="seconds")}).encode()
            os.ftruncate(handle, 0)
            os.lseek(handle, 0, 0)
            os.write(handle, record)
            return handle


_HELD: dict[tuple, int] = {}  # (device, inode) of a locked folder → nesting depth in this process


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "run folder"):
    """Hold ``<folder>/.apt_lab.lock`` (the folder must exist) for the ``with`` block; see :meth:`Folder.lock`."""
    with Folder(folder) as opened, opened.lock(what):
        yield


def _not_regular(path: Path, error: OSError | None = None) -> Exception:
    if error is not None and Path(path).is_symlink():
        return UnsafeNameError(f"{path} is a symbolic link; apt_lab never reads or writes through a link inside a "
                               "run folder. Remove the link (it was not made by apt_lab).")
    return CorruptFileError(f"{path} is not a regular file (a FIFO, device or folder); apt_lab reads and writes "
                            "only regular files it made. Remove it, or choose another --name.")


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
