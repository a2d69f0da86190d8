"""apt_lab.data.download: served from a local http.server on 127.0.0.1 only; unsafe archives refused."""
from __future__ import annotations

import functools
import hashlib
import http.server
import io
import socket
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apt_lab.data import download, load_dataset
from apt_lab.data.download import ManualDownloadRequired


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
    def log_message(self, *args):
        pass


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
