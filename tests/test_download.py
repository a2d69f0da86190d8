"""apt_lab.data.download: served from a local http.server on 127.0.0.1 only; unsafe, corrupt, truncated, partial
and oversized archives refused with nothing left in the root."""
from __future__ import annotations

import functools
import hashlib
import http.server
import importlib
import io
import socket
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apt_lab.cli import main
from apt_lab.data import download, load_dataset
from apt_lab.data.download import ManualDownloadRequired
from apt_lab.errors import ArchiveLimitError, CorruptArchiveError, IncompleteDatasetError

download_module = importlib.import_module("apt_lab.data.download")  # the name `download` is the function


def _png_bytes(seed: int, mask: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((6, 8)) > 0.5).astype(np.uint8) * 255 if mask else \
        rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


LAYOUT = {
    "widget/train/good/000.png": _png_bytes(0),
    "widget/train/good/001.png": _png_bytes(1),
    "widget/test/good/000.png": _png_bytes(2),
    "widget/test/crack/000.png": _png_bytes(3),
    "widget/ground_truth/crack/000_mask.png": _png_bytes(4, mask=True),
}


def _tar(path: Path, files: dict[str, bytes], extra=(), mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra:
            tf.addfile(info)
    return path


def _zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files; for /short/<file> it announces the full Content-Length but sends only half of the body."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        if not self.path.startswith("/short/"):
            return super().do_GET()
        data = (Path(self.directory) / self.path[len("/short/"):]).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture(autouse=True)
def widget_manifest(monkeypatch):
    """The test archives hold one category, 'widget' with 2 train images: that is the expected manifest here."""
    monkeypatch.setattr(download_module, "manifest", lambda name: {"widget": 2}, raising=False)


@pytest.fixture
def server(tmp_path):
    """Serve tmp_path/served on 127.0.0.1:<ephemeral>; yields (folder, base_url)."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "data"
    r.mkdir()
    return r


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_good_tar_gz_download_checksum_extract_and_load(server, root):
    folder, base = server
    archive = _tar(folder / "tiny.tar.gz", {f"wrapper/{k}": v for k, v in LAYOUT.items()})
    out = download("mvtec", root, url=f"{base}/tiny.tar.gz", sha256=_sha(archive), progress=False)
    assert out == root.resolve()
    assert [p.name for p in root.iterdir()] == ["widget"]                  # wrapper skipped, no temps
    assert (root / "widget/train/good/001.png").read_bytes() == LAYOUT["widget/train/good/001.png"]
    ds = load_dataset("mvtec", root, "widget")
    assert len(ds.train) == 2 and ds.test.labels.tolist() == [1, 0]
    assert ds.test[0].mask.any()


def test_good_zip_and_local_paths(server, root, tmp_path):
    folder, base = server
    archive = _zip(folder / "tiny.zip", LAYOUT)
    download("btad", root / "a", url=f"{base}/tiny.zip", progress=False)
    assert len(load_dataset("mvtec", root / "a", "widget").train) == 2
    download("mvtec", root / "b", url=archive.as_uri(), sha256=_sha(archive), progress=False)
    download("mvtec", root / "c", url=str(archive), progress=False)
    assert _listing(root / "b") == _listing(root / "c") == _listing(root / "a")
    assert archive.exists()                                               # local file kept


def test_parent_directory_member_is_refused(server, root):
    folder, base = server
    _tar(folder / "evil.tar.gz", {**LAYOUT, "../evil.txt": b"pwned"})
    with pytest.raises(ValueError, match=r"member '\.\./evil\.txt' contains a '\.\.' component"):
        download("mvtec", root, url=f"{base}/evil.tar.gz", progress=False)
    assert _listing(root) == []
    assert not (root.parent / "evil.txt").exists()
    _zip(folder / "evil.zip", {**LAYOUT, "widget/../../evil.txt": b"pwned"})
    with pytest.raises(ValueError, match=r"'\.\.' component"):
        download("mvtec", root, url=f"{base}/evil.zip", progress=False)
    assert _listing(root) == [] and not (root.parent / "evil.txt").exists()


def test_absolute_symlink_hardlink_and_fifo_members_are_refused(server, root):
    folder, base = server
    cases = {"abs": ({"/tmp/apt_lab_abs.txt": b"x"}, (), "absolute path")}
    link = tarfile.TarInfo("widget/train/good/link.png")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    cases["sym"] = (LAYOUT, (link,), "is a symbolic link")
    hard = tarfile.TarInfo("widget/hard")
    hard.type, hard.linkname = tarfile.LNKTYPE, "widget/train/good/000.png"
    cases["hard"] = (LAYOUT, (hard,), "is a hard link")
    fifo = tarfile.TarInfo("widget/fifo")
    fifo.type = tarfile.FIFOTYPE
    cases["fifo"] = (LAYOUT, (fifo,), "device or FIFO")
    dev = tarfile.TarInfo("widget/dev")
    dev.type = tarfile.CHRTYPE
    cases["dev"] = (LAYOUT, (dev,), "device or FIFO")
    for key, (files, extra, message) in cases.items():
        _tar(folder / f"{key}.tar", files, extra, mode="w")
        with pytest.raises(ValueError, match=message):
            download("mvtec", root, url=f"{base}/{key}.tar", progress=False)
        assert _listing(root) == [], key
    assert not Path("/tmp/apt_lab_abs.txt").exists()
    info = zipfile.ZipInfo("widget/zlink")
    info.external_attr = (0o120777 << 16)
    with zipfile.ZipFile(folder / "link.zip", "w") as zf:
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(ValueError, match="is a symbolic link"):
        download("mvtec", root, url=f"{base}/link.zip", progress=False)
    assert _listing(root) == []


def test_wrong_checksum_leaves_nothing(server, root):
    folder, base = server
    archive = _tar(folder / "tiny.tar.xz", LAYOUT, mode="w:xz")
    actual = _sha(archive)
    with pytest.raises(ValueError, match=f"expected {'0' * 64}, got {actual}"):
        download("mvtec", root, url=f"{base}/tiny.tar.xz", sha256="0" * 64, progress=False)
    assert _listing(root) == []
    download("mvtec", root, url=f"{base}/tiny.tar.xz", sha256=actual.upper(), progress=False)
    assert (root / "widget/test/crack/000.png").is_file()


def test_network_errors_name_the_url(server, root):
    folder, base = server
    with pytest.raises(ConnectionError, match=rf"{base}/missing.zip failed: HTTP 404"):
        download("mvtec", root, url=f"{base}/missing.zip", progress=False)
    with socket.socket() as s:                                            # a closed local port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionError, match=rf"Could not download http://127.0.0.1:{port}/x.tar"):
        download("mvtec", root, url=f"http://127.0.0.1:{port}/x.tar", progress=False)
    (folder / "page.html").write_text("<html>not an archive</html>")
    with pytest.raises(ValueError, match="is not a tar, tar.gz, tar.xz or zip archive"):
        download("mvtec", root, url=f"{base}/page.html", progress=False)
    assert _listing(root) == []


def test_existing_content_is_not_overwritten(server, root):
    folder, base = server
    _zip(folder / "tiny.zip", LAYOUT)
    (root / "widget").mkdir()
    with pytest.raises(FileExistsError, match=r"would overwrite \['widget'\]"):
        download("mvtec", root, url=f"{base}/tiny.zip", progress=False)
    assert _listing(root) == ["widget"]


def test_manual_datasets_say_what_to_do(root):
    with pytest.raises(ManualDownloadRequired, match=r"(?s)mvtec\.com.*url=.*train/good"):
        download("mvtec", root)
    with pytest.raises(ManualDownloadRequired, match=r"(?s)github\.com/stepanje/MPDD.*Google Drive"):
        download("mpdd", root)
    with pytest.raises(ValueError, match="No download for dataset 'demo'"):
        download("demo", root)
    assert _listing(root) == []


def test_known_dataset_already_extracted_is_not_downloaded_again(server, root):
    folder, base = server
    _zip(folder / "tiny.zip", LAYOUT)
    download("mvtec", root, url=f"{base}/tiny.zip", progress=False)
    before = _listing(root)
    assert download("mvtec", root, progress=False) == root.resolve()   # no manual-step error
    assert _listing(root) == before


# --- all or nothing (issue 11, defect 4) ----------------------------------------------------------
BIG_LAYOUT = {**LAYOUT, **{f"widget/test/good/{i:03d}.png": _png_bytes(100 + i) for i in range(1, 40)}}


def _flip(path: Path, offset: int) -> Path:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x55
    path.write_bytes(bytes(data))
    return path


def test_truncated_http_body_is_refused(server, root):
    folder, base = server
    _tar(folder / "tiny.tar.gz", LAYOUT)
    with pytest.raises(ConnectionError, match=r"short/tiny\.tar\.gz ended after \d+ of the \d+ bytes"):
        download("mvtec", root, url=f"{base}/short/tiny.tar.gz", progress=False)
    assert _listing(root) == []


def test_flipped_byte_in_tar_gz_is_refused(server, root):
    folder, base = server
    archive = _tar(folder / "flip.tar.gz", BIG_LAYOUT)
    size = archive.stat().st_size
    for name, offset in (("middle", size // 2), ("crc", size - 6)):  # deflate data; the CRC-32 in the trailer
        _flip(_tar(folder / f"{name}.tar.gz", BIG_LAYOUT), offset)
        with pytest.raises(CorruptArchiveError, match=rf"{name}\.tar\.gz is corrupt or truncated"):
            download("mvtec", root, url=f"{base}/{name}.tar.gz", progress=False)
        assert _listing(root) == [], name


def test_corrupted_tar_header_mid_archive_is_refused(server, root):
    folder, base = server
    archive = _tar(folder / "header.tar", BIG_LAYOUT, mode="w")
    with tarfile.open(archive) as tf:
        third = tf.getmembers()[2].offset  # the header block of the third member
    _flip(archive, third + 10)  # inside its name field: the header checksum no longer matches
    with pytest.raises(CorruptArchiveError, match=r"header\.tar is corrupt.*bad or truncated tar header at byte"):
        download("mvtec", root, url=f"{base}/header.tar", progress=False)
    assert _listing(root) == []


def test_truncated_archives_name_the_file(tmp_path, root):
    for suffix, mode in (("tar.xz", "w:xz"), ("tar.gz", "w:gz"), ("tar", "w"), ("zip", None)):
        path = tmp_path / f"cut.{suffix}"
        _zip(path, BIG_LAYOUT) if mode is None else _tar(path, BIG_LAYOUT, mode=mode)
        path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
        with pytest.raises((CorruptArchiveError, ValueError), match=rf"cut\.{suffix.replace('.', '[.]')}"):
            download("mvtec", root, url=str(path), progress=False)
        assert _listing(root) == [], suffix


def test_zip_bomb_is_refused_before_writing(server, root):
    folder, base = server
    with zipfile.ZipFile(folder / "bomb.zip", "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, data in LAYOUT.items():
            zf.writestr(name, data)
        with zf.open("widget/train/good/zeros.png", "w", force_zip64=True) as f:
            zeros = bytes(1 << 24)
            for _ in range(32):  # 512 MiB of zeros in a ~2 MiB file
                f.write(zeros)
    assert (folder / "bomb.zip").stat().st_size < 8 << 20
    with pytest.raises(ArchiveLimitError, match=r"bomb\.zip .*more than 256 MiB when extracted"):
        download("mvtec", root, url=f"{base}/bomb.zip", progress=False)
    assert _listing(root) == []
    many = {f"widget/train/good/{i:04d}.png": b"x" for i in range(50)}
    archive = _tar(folder / "many.tar", many, mode="w")
    with pytest.raises(ArchiveLimitError, match="more than 20 members"):
        download("mvtec", root, url=str(archive), max_members=20, progress=False)
    with pytest.raises(ArchiveLimitError, match="more than 300 bytes when extracted"):
        download("mvtec", root, url=str(_tar(folder / "t.tar", LAYOUT, mode="w")), max_bytes=300, progress=False)
    assert _listing(root) == []


def test_partial_dataset_is_never_ready(server, root, monkeypatch):
    folder, base = server
    monkeypatch.setattr(download_module, "manifest", lambda name: {"widget": 2, "gadget": 1})
    _tar(folder / "half.tar.gz", LAYOUT)  # widget only: gadget is missing
    with pytest.raises(IncompleteDatasetError, match=r"half\.tar\.gz does not hold a complete mvtec.*'gadget' is "
                                                     r"missing.*nothing was moved"):
        download("mvtec", root, url=f"{base}/half.tar.gz", progress=False)
    assert _listing(root) == []
    monkeypatch.setattr(download_module, "manifest", lambda name: {"widget": 3})  # the archive has 2 train images
    with pytest.raises(IncompleteDatasetError, match="widget has 2 train images, expected 3"):
        download("mvtec", root, url=f"{base}/half.tar.gz", progress=False)
    no_mask = {k: v for k, v in LAYOUT.items() if "ground_truth" not in k}
    _tar(folder / "nomask.tar.gz", no_mask)
    monkeypatch.setattr(download_module, "manifest", lambda name: {"widget": 2}, raising=False)
    with pytest.raises(IncompleteDatasetError, match="Missing ground-truth mask"):
        download("mvtec", root, url=f"{base}/nomask.tar.gz", progress=False)
    assert _listing(root) == []
    # a root that already holds a partial copy is reported, never "already there"
    for name, data in no_mask.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    with pytest.raises(IncompleteDatasetError, match=r"holds an incomplete mvtec.*Missing ground-truth mask"):
        download("mvtec", root, progress=False)


def test_stale_temporaries_are_removed(server, root, capsys):
    folder, base = server
    archive = _tar(folder / "tiny.tar.gz", LAYOUT)
    stale = root / ".apt_lab_extract_k1ll3d"
    (stale / "widget/train/good").mkdir(parents=True)
    (stale / "widget/train/good/000.png").write_bytes(b"left by SIGKILL")
    (root / ".apt_lab_download_x.part").write_bytes(b"half an archive")
    download("mvtec", root, url=f"{base}/tiny.tar.gz", progress=True)
    out = capsys.readouterr().out
    assert "removed 2 temporary file(s)" in out and f"archive sha256 {_sha(archive)}" in out
    assert _listing(root) == _listing_of(LAYOUT)


def _listing_of(files: dict) -> list[str]:
    paths = set()
    for name in files:
        parts = Path(name).parts
        paths.update(str(Path(*parts[:i])) for i in range(1, len(parts) + 1))
    return sorted(paths)


def test_command_line_download_errors_are_one_message(tmp_path, capsys):
    archive = _tar(tmp_path / "tiny.tar.gz", LAYOUT)
    assert main(["download", "mvtec", str(tmp_path / "data")]) == 1
    err = capsys.readouterr().err
    assert "apt-lab download mvtec" in err and "--url" in err and "Traceback" not in err
    assert not (tmp_path / "data").exists()
    assert main(["download", "mvtec", str(tmp_path / "data"), "--url", str(archive), "--sha256", "0" * 64]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SHA-256 mismatch" in err and "Traceback" not in err
    assert main(["download", "mvtec", str(tmp_path / "data"), "--url", str(archive), "--sha256", _sha(archive)]) == 0
    assert (tmp_path / "data/widget/train/good/000.png").is_file()
    assert not any(p.name.startswith(".apt_lab") for p in (tmp_path / "data").iterdir())
