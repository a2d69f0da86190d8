"""Safe downloads of the public benchmarks: all or nothing, checked at every step.

Guarantees of `download`:

- the archive is streamed to a temporary file inside ``root``; a body shorter (or longer) than its
  ``Content-Length`` is refused, and so is a SHA-256 that differs from ``sha256=`` (or the known one);
- the archive is read to its very end before anything moves into place: every member's bytes, the end-of-archive
  marker, and the gzip/xz/zip checksums. A corrupt tar header, a flipped byte or a truncated file raises
  `~apt_lab.errors.CorruptArchiveError` naming the archive;
- extraction goes into a temporary folder inside ``root``. A member with an absolute path, a ``..`` component, a
  path that resolves outside ``root``, a symbolic or hard link, a device or a FIFO aborts it; so do more than
  ``max_bytes`` extracted bytes or ``max_members`` members (a zip bomb: `~apt_lab.errors.ArchiveLimitError`);
- the extracted tree is checked against the dataset's manifest (every expected category, its train-image count,
  a mask for every defective image, both classes in the test set) *before* it is moved into ``root``: a partial
  dataset is never "ready" (`~apt_lab.errors.IncompleteDatasetError`), and a ``root`` that holds a partial copy is
  reported as such, never as "already there";
- one download at a time per ``root`` (a lock file); temporary files left by a killed download are removed by the
  next one;
- network errors and timeouts (30 s without data) raise ``ConnectionError`` naming the URL.

No public page states a SHA-256 for these archives, so none is built in: pass ``sha256=`` (``--sha256``) to check
one, and note the digest `download` prints for an archive you trust.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import lzma
import os
import re
import shutil
import socket
import stat
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path

from ..errors import (ArchiveLimitError, CorruptArchiveError, IncompleteDatasetError, ManualDownloadRequired)
from .files import folder_lock

TIMEOUT_S = 30
_CHUNK = 1 << 20
_TEMP_PREFIX = ".apt_lab_"  # every temporary name download() makes in root starts with this
VISA_SPLIT_URL = "https://raw.githubusercontent.com/amazon-science/spot-diff/main/split_csv/1cls.csv"
MAX_MEMBERS = 1_000_000  # more members than this aborts an extraction (the benchmarks hold ≤ 25 000)
MAX_BYTES = 256 << 30  # more extracted bytes than this aborts an extraction, whatever the archive's size
MAX_RATIO = 20  # ... and more than this × the archive's size (images barely compress; a zip bomb does) ...
MIN_RATIO_BYTES = 256 << 20  # ... once past this floor, so small archives are never refused for their ratio

_MVTEC_MANUAL = """MVTec AD cannot be downloaded automatically: its licence (CC BY-NC-SA 4.0) must be \
accepted on the MVTec website first.
  1. Go to https://www.mvtec.com/company/research/datasets/mvtec-ad/downloads, fill in the form and \
download mvtec_anomaly_detection.tar.xz (about 4.9 GB; the link MVTec e-mails you may also be passed \
as the url).
  2. Then run  apt-lab download mvtec {root} --url /path/to/mvtec_anomaly_detection.tar.xz
     (Python: apt_lab.data.download("mvtec", "{root}", url="/path/to/mvtec_anomaly_detection.tar.xz")),
     which checks and extracts it safely, or extract it yourself so that {root}/bottle/train/good/ exists."""
_MPDD_MANUAL = """MPDD cannot be downloaded automatically: it is shared as a Google Drive folder.
  1. Open https://github.com/stepanje/MPDD and follow its download link (Google Drive); download the \
archive of the dataset.
  2. Then run  apt-lab download mpdd {root} --url /path/to/the/archive.zip
     (Python: apt_lab.data.download("mpdd", "{root}", url="/path/to/the/archive.zip")),
     which checks and extracts it safely, or extract it yourself so that {root}/bracket_black/train/good/ exists."""

KNOWN_DOWNLOADS = {
    "mvtec": {"url": None, "sha256": None, "manual": _MVTEC_MANUAL},
    "visa": {"url": "https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",
             "sha256": None, "extra": {"split_csv/1cls.csv": VISA_SPLIT_URL}},
    "btad": {"url": "https://avires.dimi.uniud.it/papers/btad/btad.zip", "sha256": None},
    "mpdd": {"url": None, "sha256": None, "manual": _MPDD_MANUAL},
}


def manifest(name: str) -> dict[str, int]:
    """Expected categories of a benchmark and their normal train-image counts (the official ones, also used by
    the shipped few-shot draws).

    Example:
        >>> m = manifest("mvtec")
        >>> len(m), m["bottle"], sum(manifest("visa").values())
        (15, 209, 8659)
    """
    from .draws import TRAIN_COUNTS

    return dict(TRAIN_COUNTS.get(name, {}))


def _problems(name: str, root: Path) -> list[str]:
    from .readers import list_categories, load_dataset

    try:
        found = set(list_categories(name, root))
    except (OSError, ValueError) as err:
        return [str(err)]
    expected = manifest(name)
    problems = [f"category {c!r} is missing" for c in sorted(set(expected) - found)]
    for category in sorted(set(expected) & found):
        try:
            dataset = load_dataset(name, root, category).check()
        except (OSError, ValueError) as err:
            problems.append(str(err))
            continue
        if len(dataset.train) != expected[category]:
            problems.append(f"{category} has {len(dataset.train)} train images, expected {expected[category]}")
    return problems


def download(name: str, root: str | os.PathLike, *, url: str | None = None, sha256: str | None = None,
             progress: bool = True, max_bytes: int | None = None, max_members: int | None = None) -> Path:
    """Download (or take a local archive), verify and safely extract a benchmark into ``root``.

    Args:
        name: ``"mvtec"``, ``"visa"``, ``"btad"`` or ``"mpdd"``.
        root: folder that will hold the category folders (created if needed); afterwards
            ``load_dataset(name, root, category)`` works.
        url: ``None`` for the known public URL; an ``http(s)://`` URL, a ``file://`` URL or a plain
            local path of an archive (tar, tar.gz, tar.xz or zip). Local files are never deleted.
        sha256: expected hex digest; checked when given (or known for the dataset).
        progress: show a tqdm progress bar and short status lines.
        max_bytes: limit on the total extracted size; None = the module's default (see `extract_archive`).
        max_members: limit on the number of archive members; None = the module's default.

    Returns:
        ``root`` as a `Path`.

    Raises:
        ManualDownloadRequired: the dataset needs a manual step (the message says which).
        IncompleteDatasetError: the archive (or what ``root`` already holds) is not the whole dataset.
        CorruptArchiveError: the archive is truncated or damaged (the message names it).
        ArchiveLimitError: extraction would pass ``max_bytes`` or ``max_members``.
        ValueError: an unsafe member or a checksum mismatch.
        ConnectionError: the download failed or was cut short.
    """
    key = str(name).lower()
    if key not in KNOWN_DOWNLOADS:
        raise ValueError(f"No download for dataset {name!r}; downloadable: "
                         f"{', '.join(KNOWN_DOWNLOADS)} ('demo' ships with the package, 'folder' "
                         f"is your own data).")
    spec = KNOWN_DOWNLOADS[key]
    root = Path(root).expanduser().resolve()
    if url is None:
        if _holds_some(key, root):
            problems = _problems(key, root)
            if problems:
                raise IncompleteDatasetError(
                    f"{root} holds an incomplete {key} ({'; '.join(problems[:5])}). A partial dataset is never "
                    f"used as ready: move or delete it, then download again (or pass url= / --url an archive).")
            if progress:
                print(f"{key} is already in {root}; nothing to download.")
            return root
        if spec["url"] is None:
            raise ManualDownloadRequired(spec["manual"].format(root=root))
        url, sha256 = spec["url"], sha256 or spec["sha256"]
    root.mkdir(parents=True, exist_ok=True)
    with folder_lock(root, "download root"):
        remove_stale_temporaries(root)
        local = _local_path(url)
        if local is not None:
            if not local.is_file():
                raise FileNotFoundError(f"Archive {local} (from url={url!r}) does not exist.")
            digest = _sha256_of(local)
            if sha256:
                _check_digest(digest, sha256, str(local))
            _install(key, spec, local, str(local), root, progress, max_bytes, max_members)
        else:
            archive, digest = _fetch(url, root, sha256, progress)
            try:
                _install(key, spec, archive, f"the archive downloaded from {url}", root, progress, max_bytes,
                         max_members)
            finally:
                archive.unlink(missing_ok=True)
    if progress:
        print(f"{key} is ready in {root} (archive sha256 {digest})")
    return root


def _install(key: str, spec: dict, archive: Path, label: str, root: Path, progress: bool, max_bytes,
             max_members) -> None:
    """Extract into a temporary folder, add the extra files, check the manifest, then move into ``root``."""
    tmpdir = _extract_to_temp(archive, root, max_bytes, max_members, label)
    try:
        top = _dataset_top(tmpdir)
        for rel, extra_url in spec.get("extra", {}).items():
            if not (top / rel).exists() and not (root / rel).exists():
                (top / rel).parent.mkdir(parents=True, exist_ok=True)
                fetched, _ = _fetch(extra_url, root, None, progress)
                os.replace(fetched, top / rel)
        problems = _problems(key, top)
        if problems:
            raise IncompleteDatasetError(
                f"{label} does not hold a complete {key} ({'; '.join(problems[:5])}); nothing was moved into "
                f"{root}. Download the archive again (or the official one), or extract it yourself if you want a "
                "subset.")
        _move_into_place(label, top, root)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _holds_some(name: str, root: Path) -> bool:
    """Whether ``root`` holds any category of ``name`` (complete or not)."""
    from .readers import list_categories

    try:
        return root.is_dir() and len(list_categories(name, root)) > 0
    except (OSError, ValueError):
        return False


def remove_stale_temporaries(root: Path) -> list[str]:
    """Delete what a killed download left in ``root`` (``.apt_lab_*`` files and folders); call it holding the
    root's lock, so no running download can own them. Returns the names removed."""
    removed = []
    for entry in Path(root).iterdir():
        if entry.name.startswith(_TEMP_PREFIX):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry.name)
    if removed:
        print(f"removed {len(removed)} temporary file(s) left by an interrupted download in {root}: {removed[:3]}")
    return removed


def _local_path(url: str) -> Path | None:
    parsed = urllib.parse.urlparse(str(url))
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme in ("http", "https", "ftp"):
        return None
    return Path(url).expanduser()                     # a plain path (or a Windows drive letter)


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_digest(actual: str, expected: str, what: str) -> None:
    if actual.lower() != expected.strip().lower():
        raise ValueError(f"SHA-256 mismatch for {what}: expected {expected.strip().lower()}, got "
                         f"{actual}. The download is corrupt or the file changed upstream; it was "
                         f"not extracted. Retry, or pass the correct sha256= if you trust the source.")


def _fetch(url: str, root: Path, sha256: str | None, progress: bool) -> tuple[Path, str]:
    """Stream ``url`` into a temporary file in ``root``; rename it when complete and verified → (path, sha256)."""
    from tqdm.auto import tqdm                                  # lazy: keeps `import apt_lab.data` light

    filename = Path(urllib.parse.urlparse(url).path).name or "download"
    fd, tmp_name = tempfile.mkstemp(dir=root, prefix=f"{_TEMP_PREFIX}download_", suffix=".part")
    tmp = Path(tmp_name)
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "apt_lab", "Accept-Encoding": "identity"})
        h, received = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=TIMEOUT_S) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=filename,
                      disable=not progress) as bar:
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if total is not None and received != total:
            raise ConnectionError(f"Download of {url} ended after {received} of the {total} bytes its server "
                                  "announced (Content-Length): the connection broke or the server is faulty. Nothing "
                                  "was kept; retry, or download the file yourself and pass url='/path/to/file'.")
        if sha256:
            _check_digest(h.hexdigest(), sha256, url)
        final = root / f"{_TEMP_PREFIX}{filename}"
        os.replace(tmp, final)                              # atomic within one file system
        return final, h.hexdigest()
    except urllib.error.HTTPError as err:
        raise ConnectionError(f"Download of {url} failed: HTTP {err.code} {err.reason}. Check the "
                              f"URL, or download the file yourself and pass url='/path/to/file'."
                              ) from None
    except (urllib.error.URLError, socket.timeout, TimeoutError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", err)
        raise ConnectionError(f"Could not download {url}: {reason} (timeout {TIMEOUT_S} s). Check "
                              f"your network, or download the file yourself and pass "
                              f"url='/path/to/file'.") from None
    except (ConnectionError, OSError) as err:
        if isinstance(err, ConnectionError) and str(err).startswith(("Download of", "Could not download")):
            raise
        raise ConnectionError(f"Could not download {url}: {type(err).__name__}: {err}. Retry, or download the "
                              "file yourself and pass url='/path/to/file'.") from None
    finally:
        tmp.unlink(missing_ok=True)


# --- extraction ----------------------------------------------------------------------------------
def _member_dest(tmpdir: Path, name: str, archive: str) -> Path:
    """Validated destination of archive member ``name`` inside ``tmpdir``; raises if unsafe."""
    norm = name.replace("\\", "/")
    if not norm or "\x00" in norm:
        _refuse(archive, name, "has an empty or invalid name")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        _refuse(archive, name, "has an absolute path")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        _refuse(archive, name, "contains a '..' component (it would land outside the root)")
    dest = tmpdir.joinpath(*parts) if parts else tmpdir
    real_tmp = os.path.realpath(tmpdir)
    if os.path.commonpath([real_tmp, os.path.realpath(dest)]) != real_tmp:
        _refuse(archive, name, "resolves outside the root")
    return dest


def _refuse(archive: str, name: str, why: str) -> None:
    raise ValueError(f"Refusing to extract {archive}: member {name!r} {why}. The archive is unsafe "
                     f"or corrupt; nothing was extracted. Get the archive from the official source.")


class _Budget:
    """Counts extracted members and bytes against the limits; refuses the archive past either."""

    def __init__(self, archive: Path, label: str, max_bytes: int | None, max_members: int | None):
        size = self.size = archive.stat().st_size
        self.label = label
        self.max_bytes = max_bytes if max_bytes is not None else min(MAX_BYTES, max(MIN_RATIO_BYTES, MAX_RATIO * size))
        self.max_members = max_members if max_members is not None else MAX_MEMBERS
        self.bytes = self.members = 0

    def member(self, declared_size: int = 0) -> None:
        self.members += 1
        if self.members > self.max_members:
            self._refuse(f"more than {self.max_members} members")
        self.add(0, declared_size)

    def add(self, count: int, ahead: int = 0) -> None:
        self.bytes += count
        if self.bytes + ahead > self.max_bytes:
            limit = f"{self.max_bytes / 2**20:.0f} MiB" if self.max_bytes >= 2**20 else f"{self.max_bytes} bytes"
            self._refuse(f"more than {limit} when extracted")

    def _refuse(self, what: str) -> None:
        raise ArchiveLimitError(
            f"Refusing to extract {self.label} ({self.size / 2**20:.1f} MiB): it holds {what} (a "
            "zip bomb, or not the dataset's archive?); nothing was extracted. If the archive is genuine, raise the "
            "limit: download(..., max_bytes=..., max_members=...).")


def _write(dest: Path, src, budget: _Budget) -> int:
    dest.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(dest, "wb") as out:
        while chunk := src.read(_CHUNK):
            budget.add(len(chunk))
            out.write(chunk)
            written += len(chunk)
    return written


class _StrictTarInfo(tarfile.TarInfo):
    """tarfile ends an archive quietly at the first bad header after the first member; here that is an error."""

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except tarfile.EOFHeaderError:  # a zero block: the end-of-archive marker
            raise
        except tarfile.HeaderError as err:
            if tf.offset == 0:
                raise  # not a tar at all (tarfile.open then tries the next compression)
            raise tarfile.ReadError(f"bad or truncated tar header at byte {tf.offset} ({err})") from None


def _extract_tar(path: Path, tmpdir: Path, budget: _Budget) -> None:
    archive = budget.label
    with tarfile.open(path, "r:*", tarinfo=_StrictTarInfo) as tf:
        for m in tf:                                  # streaming: one pass even for .tar.xz
            dest = _member_dest(tmpdir, m.name, archive)
            if m.issym() or m.islnk():
                _refuse(archive, m.name, f"is a {'symbolic' if m.issym() else 'hard'} link")
            if m.ischr() or m.isblk() or m.isfifo():
                _refuse(archive, m.name, "is a device or FIFO")
            budget.member(m.size if m.isfile() else 0)
            if m.isdir():
                dest.mkdir(parents=True, exist_ok=True)
            elif m.isfile():
                with tf.extractfile(m) as src:
                    if _write(dest, src, budget) != m.size:
                        raise tarfile.ReadError(f"member {m.name!r} is truncated")
            else:
                _refuse(archive, m.name, f"has an unsupported tar type {m.type!r}")
        while tf.fileobj.read(_CHUNK):  # to the very end: gzip's CRC and xz's check are verified there
            pass


def _extract_zip(path: Path, tmpdir: Path, budget: _Budget) -> None:
    archive = budget.label
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        for info in infos:  # declared sizes first (reading stops there): a bomb is refused before a byte is written
            budget.member()
            budget.add(info.file_size)
        budget.bytes = budget.members = 0
        for info in infos:
            dest = _member_dest(tmpdir, info.filename, archive)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                _refuse(archive, info.filename, "is a symbolic link")
            if mode and stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
                _refuse(archive, info.filename, "is a device, FIFO or other special file")
            budget.member()
            if info.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
            else:
                with zf.open(info) as src:  # reading to the member's end checks its CRC-32
                    _write(dest, src, budget)


_CORRUPT = (tarfile.TarError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, lzma.LZMAError,
            gzip.BadGzipFile)


def _extract_to_temp(path: Path, root: Path, max_bytes: int | None, max_members: int | None,
                     label: str | None = None) -> Path:
    """Every member of the archive at ``path`` into a new temporary folder in ``root`` (removed again on any error);
    messages name the archive as ``label`` (default: its path)."""
    archive = label or str(path)
    budget = _Budget(path, archive, max_bytes, max_members)
    tmpdir = Path(tempfile.mkdtemp(dir=root, prefix=f"{_TEMP_PREFIX}extract_"))
    try:
        if zipfile.is_zipfile(path):
            _extract_zip(path, tmpdir, budget)
        elif tarfile.is_tarfile(path):
            _extract_tar(path, tmpdir, budget)
        else:
            with open(path, "rb") as f:
                magic = f.read(6)
            if magic.startswith((b"\x1f\x8b", b"\xfd7zXZ", b"BZh", b"PK")):
                raise CorruptArchiveError(f"{archive} looks like a compressed archive but cannot be opened (truncated "
                                          "or corrupt); nothing was extracted. Download it again.")
            raise ValueError(f"{archive} is not a tar, tar.gz, tar.xz or zip archive. Check "
                             f"the file (an HTML error page saved under the archive's name?).")
        return tmpdir
    except _CORRUPT as err:
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise CorruptArchiveError(f"{archive} is corrupt or truncated ({type(err).__name__}: {err}); nothing was "
                                  "extracted. Download it again (check its sha256 if the source states one).") from None
    except BaseException:
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise


def _looks_like_root(folder: Path) -> bool:
    children = [p for p in folder.iterdir() if p.is_dir()]
    return (folder / "split_csv").is_dir() or (folder / "good").is_dir() or any(
        (c / "train").is_dir() or (c / "test").is_dir() for c in children)


def _dataset_top(tmpdir: Path) -> Path:
    """Skip wrapper folders (e.g. ``BTech_Dataset_transformed/``) above the category folders."""
    top = tmpdir
    while not _looks_like_root(top):
        entries = list(top.iterdir())
        if len(entries) != 1 or not entries[0].is_dir():
            break
        top = entries[0]
    return top


def _move_into_place(archive: str, top: Path, root: Path) -> list[Path]:
    entries = sorted(top.iterdir())
    clash = [e.name for e in entries if (root / e.name).exists()]
    if clash:
        raise FileExistsError(f"Extracting {archive} would overwrite {clash[:5]} in {root}; "
                              f"delete those or choose another root.")
    for e in entries:
        os.replace(e, root / e.name)
    return [root / e.name for e in entries]


def extract_archive(archive: str | os.PathLike, root: str | os.PathLike, *, max_bytes: int | None = None,
                    max_members: int | None = None) -> list[Path]:
    """Safely extract a tar/tar.gz/tar.xz/zip archive into ``root`` (all or nothing; no manifest check).

    Args:
        max_bytes: most bytes extracted; None = ``min(MAX_BYTES, max(MIN_RATIO_BYTES, MAX_RATIO × archive size))``.
        max_members: most members; None = ``MAX_MEMBERS``.

    Returns:
        The top-level paths created in ``root``.
    """
    archive, root = Path(archive), Path(root)
    with folder_lock(root, "download root"):
        tmpdir = _extract_to_temp(archive, root, max_bytes, max_members)
        try:
            return _move_into_place(str(archive), _dataset_top(tmpdir), root)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
