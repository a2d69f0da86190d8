"""The wheel builds without a deprecation warning (setuptools stops building deprecated metadata on a set date) and
carries its license as an SPDX expression with the license file (PEP 639)."""
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ("pyproject.toml", "README.md", "LICENSE", "apt_lab")  # what the wheel is made of
WARNING = re.compile(r"deprecat|BuildBackendWarning", re.I)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def test_the_wheel_builds_without_deprecation_warnings_and_carries_its_license(tmp_path):
    import setuptools

    floor = re.search(r'"setuptools>=([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert _version(setuptools.__version__) >= _version(floor), (
        f"{sys.prefix} has setuptools {setuptools.__version__}, older than the build floor setuptools>={floor} of "
        "pyproject.toml: run `make install` (it upgrades setuptools in .venv)")
    source = tmp_path / "source"  # a copy: building in place would write build/ and *.egg-info into the checkout
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy(ROOT / name, source / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
                           "--disable-pip-version-check", "-w", str(tmp_path / "dist"), str(source)],
                          capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    warnings = [line.strip() for line in output.splitlines() if WARNING.search(line)]
    assert not warnings, "the build warns of a deprecation:\n" + "\n".join(warnings[:10])
    (wheel,) = (tmp_path / "dist").glob("apt_lab-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode().splitlines()
        licenses = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert licenses and archive.read(licenses[0]) == (ROOT / "LICENSE").read_bytes()
    assert "License-Expression: MIT" in metadata and "License-File: LICENSE" in metadata, metadata[:20]
