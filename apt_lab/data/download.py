"""Safe downloads of the public benchmarks: checksum, atomic rename, guarded extraction.

Guarantees of `download`:

- the archive is streamed to a temporary file inside ``root`` and renamed only when complete (and,
  when a SHA-256 is known or passed, only when it matches; otherwise the file is deleted and a
  ``ValueError`` names both digests);
- extraction goes into a temporary folder inside ``root`` and is moved into place only when every
  member was extracted; a member with an absolute path, a ``..`` component, a path that resolves
  outside ``root``, a symbolic or hard link, a device or a FIFO aborts the whole extraction and
  nothing new is left in ``root``;
- network errors and timeouts (30 s without data) raise ``ConnectionError`` naming the URL.
"""
from __future__ import annotations

import hashlib
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
from pathlib import Path

from ..errors import ManualDownloadRequired

TIMEOUT_S = 30
_CHUNK = 1 << 20
VISA_SPLIT_URL = "https://raw.githubusercontent.com/amazon-science/spot-diff/main/split_csv/1cls.csv"

_MVTEC_MANUAL = """MVTec AD cannot be downloaded automatically: its licence (CC BY-NC-SA 4.0) must be \
accepted on the MVTec website first.
  1. Go to https://www.mvtec.com/company/research/datasets/mvtec-ad/downloads, fill in the form and \
download mvtec_anomaly_detection.tar.xz (about 4.9 GB; the link MVTec e-mails you may also be passed \
as url=).
  2. Then either run  apt_lab.data.download("mvtec", "{root}", url="/path/to/mvtec_anomaly_detection.tar.xz")
     (checks and extracts it safely), or extract it yourself so that {root}/bottle/train/good/ exists."""
_MPDD_MANUAL = """MPDD cannot be downloaded automatically: it is shared as a Google Drive folder.
  1. Open https://github.com/stepanje/MPDD and follow its download link (Google Drive); download the \
archive of the dataset.
  2. Then either run  apt_lab.data.download("mpdd", "{root}", url="/path/to/the/archive.zip")
     (checks and extracts it safely), or extract it yourself so that {root}/bracket_black/train/good/ \
exists."""

KNOWN_DOWNLOADS = {
    "mvtec": {"url": None, "sha256": None, "manual": _MVTEC_MANUAL},
    "visa": {"url": "https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",
             "sha256": None, "extra": {"split_csv/1cls.csv": VISA_SPLIT_URL}},
    "btad": {"url": "https://avires.dimi.uniud.it/papers/btad/btad.zip", "sha256": None},
    "mpdd": {"url": None, "sha256": None, "manual": _MPDD_MANUAL},
}


def download(name: str, root: str | os.PathLike, *, url: str | None = None,
             sha256: str | None = None, progress: bool = True) -> Path:
    """Download (or take a local archive), verify and safely extract a benchmark into ``root``.

    Args:
        name: ``"mvtec"``, ``"visa"``, ``"btad"`` or ``"mpdd"``.
        root: folder that will hold the category folders (created if needed); afterwards
            ``load_dataset(name, root, category)`` works.
        url: ``None`` for the known public URL; an ``http(s)://`` URL, a ``file://`` URL or a plain
            local path of an archive (tar, tar.gz, tar.xz or zip). Local files are never deleted.
        sha256: expected hex digest; checked when given (or known for the dataset).
        progress: show a tqdm progress bar and short status lines.

    Returns:
        ``root`` as a `Path`.
    """
    key = str(name).lower()
    if key not in KNOWN_DOWNLOADS:
        raise ValueError(f"No download for dataset {name!r}; downloadable: "
                         f"{', '.join(KNOWN_DOWNLOADS)} ('demo' ships with the package, 'folder' "
                         f"is your own data).")
    spec = KNOWN_DOWNLOADS[key]
    root = Path(root).expanduser().resolve()
    if url is None:
        if _already_there(key, root):
            if progress:
                print(f"{key} is already in {root}; nothing to download.")
            return root
        if spec["url"] is None:
            raise ManualDownloadRequired(spec["manual"].format(root=root))
        url, sha256 = spec["url"], sha256 or spec["sha256"]
    root.mkdir(parents=True, exist_ok=True)
    local = _local_path(url)
    if local is not None:
        if not local.is_file():
            raise FileNotFoundError(f"Archive {local} (from url={url!r}) does not exist.")
        if sha256:
            _check_digest(_sha256_of(local), sha256, str(local))
        extract_archive(local, root)
    else:
        archive = _fetch(url, root, sha256, progress)
        try:
            extract_archive(archive, root)
        finally:
            archive.unlink(missing_ok=True)
    for rel, extra_url in spec.get("extra", {}).items():
        if not (root / rel).exists():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(_fetch(extra_url, root, None, progress), root / rel)
    if progress:
        print(f"{key} is ready in {root}")
    return root


def _already_there(name: str, root: Path) -> bool:
    from .readers import list_categories

    try:
        return root.is_dir() and len(list_categories(name, root)) > 0
    except (OSError, ValueError):
        return False


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


def _fetch(url: str, root: Path, sha256: str | None, progress: bool) -> Path:
    """Stream ``url`` into a temporary file in ``root``; rename it when complete and verified."""
    from tqdm.auto import tqdm                                  # lazy: keeps `import apt_lab.data` light

    filename = Path(urllib.parse.urlparse(url).path).name or "download"
    fd, tmp_name = tempfile.mkstemp(dir=root, prefix=".apt_lab_download_", suffix=".part")
    tmp = Path(tmp_name)
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "apt_lab"})
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=TIMEOUT_S) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=filename,
                      disable=not progress) as bar:
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
        if sha256:
            _check_digest(h.hexdigest(), sha256, url)
        final = root / f".apt_lab_{filename}"
        os.replace(tmp, final)                              # atomic within one file system
        return final
    except urllib.error.HTTPError as err:
        raise ConnectionError(f"Download of {url} failed: HTTP {err.code} {err.reason}. Check the "
                              f"URL, or download the file yourself and pass url='/path/to/file'."
                              ) from None
    except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as err:
        reason = getattr(err, "reason", err)
        raise ConnectionError(f"Could not download {url}: {reason} (timeout {TIMEOUT_S} s). Check "
                              f"your network, or download the file yourself and pass "
                              f"url='/path/to/file'.") from None
    finally:
        tmp.unlink(missing_ok=True)


# --- extraction ----------------------------------------------------------------------------------
def _member_dest(tmpdir: Path, name: str, archive: Path) -> Path:
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


def _refuse(archive: Path, name: str, why: str) -> None:
    raise ValueError(f"Refusing to extract {archive}: member {name!r} {why}. The archive is unsafe "
                     f"or corrupt; nothing was extracted. Get the archive from the official source.")


def _write(dest: Path, src) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as out:
        shutil.copyfileobj(src, out, _CHUNK)


def _extract_tar(archive: Path, tmpdir: Path) -> None:
    with tarfile.open(archive, "r:*") as tf:
        for m in tf:                                  # streaming: one pass even for .tar.xz
            dest = _member_dest(tmpdir, m.name, archive)
            if m.issym() or m.islnk():
                _refuse(archive, m.name, f"is a {'symbolic' if m.issym() else 'hard'} link")
            if m.ischr() or m.isblk() or m.isfifo():
                _refuse(archive, m.name, "is a device or FIFO")
            if m.isdir():
                dest.mkdir(parents=True, exist_ok=True)
            elif m.isfile():
                with tf.extractfile(m) as src:
                    _write(dest, src)
            else:
                _refuse(archive, m.name, f"has an unsupported tar type {m.type!r}")


def _extract_zip(archive: Path, tmpdir: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            dest = _member_dest(tmpdir, info.filename, archive)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                _refuse(archive, info.filename, "is a symbolic link")
            if mode and stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
                _refuse(archive, info.filename, "is a device, FIFO or other special file")
            if info.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
            else:
                with zf.open(info) as src:
                    _write(dest, src)


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


def extract_archive(archive: str | os.PathLike, root: str | os.PathLike) -> list[Path]:
    """Safely extract a tar/tar.gz/tar.xz/zip archive into ``root`` (all or nothing).

    Returns:
        The top-level paths created in ``root``.
    """
    archive, root = Path(archive), Path(root)
    tmpdir = Path(tempfile.mkdtemp(dir=root, prefix=".apt_lab_extract_"))
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, tmpdir)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, tmpdir)
        else:
            raise ValueError(f"{archive} is not a tar, tar.gz, tar.xz or zip archive. Check the "
                             f"file (an HTML error page saved under the archive's name?).")
        entries = sorted(_dataset_top(tmpdir).iterdir())
        clash = [e.name for e in entries if (root / e.name).exists()]
        if clash:
            raise FileExistsError(f"Extracting {archive} would overwrite {clash[:5]} in {root}; "
                                  f"delete those or choose another root.")
        for e in entries:
            os.replace(e, root / e.name)
        return [root / e.name for e in entries]
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
