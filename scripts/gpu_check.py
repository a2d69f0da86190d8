"""GPU check: every notebook in full mode under nbval, the device tests, then the MVTec-shaped sweep; one table.

For a CUDA machine (not part of ``make test``)::

    make gpu-check                                  # = python scripts/gpu_check.py
    python scripts/gpu_check.py --notebooks 02 05   # some notebooks only
    python scripts/gpu_check.py --no-sweep          # notebooks and device tests only
    python scripts/gpu_check.py --sweep-args="--shots 1 --seeds 0"   # a smaller sweep
    python scripts/gpu_check.py --quick --no-sweep  # a dry run of this script on a CPU (quick mode)

With 15 minutes of device time and 10 minutes per command, split it: ``--no-sweep`` first, then a reduced sweep,
e.g. ``python benchmarks/bench_sweep.py --categories bottle pill zipper --seeds 0`` (9 of the 135 runs; the
full sweep tunes 135 × 400 steps and takes longer than that budget).

First the device tests (tests/test_device_pool.py and tests/test_precision.py: the pool on CUDA; bf16, fp16 and
tf32 tune + score on CUDA against fp32). Then each notebook in its own process: ``APT_LAB_QUICK=0`` (full mode: the
``fast`` preset, ViT-B-16, bf16 on CUDA; ``APT_LAB_PRESET`` / ``APT_LAB_DATASET`` pass through), ``pytest
--nbval-lax``. Wall time is the whole
process; peak GPU memory is the device's used memory sampled every 0.2 s by ``nvidia-smi`` minus what was used
before (so it includes the CUDA context). The sweep is ``benchmarks/bench_sweep.py`` (full: paper preset, 15
categories, k ∈ {1, 2, 4}, 3 seeds) with its encoder-pass count and per-stage seconds.

Offline machines work: when the model hub cannot be reached, ``HF_HUB_OFFLINE=1`` is set and the notebooks fall
back to random weights of the same architecture with a loud banner (same speed, no accuracy); the table says so.
Nothing is installed: run it with the interpreter that has apt_lab and its test extras (nbval).
The exit status is 0 only when every notebook and test passed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 60  # each notebook in full mode should finish within this on an H200-class GPU


class MemorySampler:
    """Peak of the device's used memory (MiB) above a baseline, sampled with nvidia-smi in a thread."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.tool = interval, shutil.which("nvidia-smi")
        self.peak = self.baseline = 0
        self._stop = threading.Event()

    def used(self) -> int:
        if self.tool is None:
            return 0
        out = subprocess.run([self.tool, "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10)
        return int(out.stdout.strip().splitlines()[0]) if out.returncode == 0 and out.stdout.strip() else 0

    def __enter__(self):
        self.baseline = self.peak = self.used()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.used())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.used())

    @property
    def mib(self) -> int | None:
        return None if self.tool is None else self.peak - self.baseline


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def run(command: list[str], env: dict, timeout: int) -> tuple[bool, float, int | None, str]:
    """(passed, seconds, peak GPU MiB, last lines of output) of one command."""
    start = time.perf_counter()
    with MemorySampler() as memory:
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
            passed, output = done.returncode == 0, done.stdout + done.stderr
        except subprocess.TimeoutExpired as error:
            passed = False
            output = f"timed out after {timeout} s\n" + (error.stdout or b"").decode(errors="replace")[-2000:]
    return passed, time.perf_counter() - start, memory.mib, "\n".join(output.strip().splitlines()[-25:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--notebooks", nargs="*", default=None, help="number prefixes, e.g. 00 02 (default: all)")
    parser.add_argument("--no-sweep", action="store_true", help="skip benchmarks/bench_sweep.py")
    parser.add_argument("--sweep-args", default="", help="extra arguments for bench_sweep.py, e.g. '--shots 1'")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per notebook (and per test file)")
    parser.add_argument("--sweep-timeout", type=int, default=3600)
    parser.add_argument("--quick", action="store_true", help="quick mode, CPU allowed: a dry run of this script")
    args = parser.parse_args()

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        print("gpu_check: no CUDA device visible to torch; run it on a GPU machine (or --quick for a dry run)",
              file=sys.stderr)
        return 2
    env = dict(os.environ, APT_LAB_QUICK="1" if args.quick else "0", PYTHONHASHSEED="0")
    online = env.get("HF_HUB_OFFLINE", "0") not in ("1", "true") and hub_reachable()
    if not online:
        env["HF_HUB_OFFLINE"] = "1"  # fail fast on weights; the notebooks then use random weights, loudly
    gpu = torch.cuda.get_device_name(0) if cuda else "none"
    print(f"gpu_check: torch {torch.__version__}, GPU {gpu}, mode {'quick' if args.quick else 'full'}, "
          f"model hub {'reachable' if online else 'NOT reachable: random weights'}", flush=True)

    rows, failures = [], []
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    if args.notebooks:
        notebooks = [p for p in notebooks if p.name.split("_")[0] in args.notebooks]
    tests = ["tests/test_device_pool.py", "tests/test_precision.py"]  # their CUDA cases run only on a GPU
    steps = [(" + ".join(tests), [sys.executable, "-m", "pytest", *tests, "-q", "-p", "no:cacheprovider"])]
    steps += [(f"notebooks/{p.name}", [sys.executable, "-m", "pytest", str(p.relative_to(ROOT)), "--nbval-lax",
                                       "-q", "-p", "no:cacheprovider"]) for p in notebooks]
    for name, command in steps:
        print(f"  running {name} ...", flush=True)
        passed, seconds, mib, tail = run(command, env, args.timeout)
        rows.append((name, passed, seconds, mib))
        if not passed:
            failures.append((name, tail))
        print(f"    {'passed' if passed else 'FAILED'} in {seconds:.1f} s"
              + (f", peak GPU memory +{mib} MiB" if mib is not None else ""), flush=True)

    sweep = None
    if not args.no_sweep:
        out = Path(tempfile.mkdtemp()) / "sweep.json"
        extra = args.sweep_args.split() + (["--small"] if args.quick and "--count-only" not in args.sweep_args else [])
        command = [sys.executable, "benchmarks/bench_sweep.py", "--json", str(out), *extra]
        print(f"  running {' '.join(command[1:])} ...", flush=True)
        passed, seconds, mib, tail = run(command, env, args.sweep_timeout)
        print(tail, flush=True)
        if passed and out.is_file():
            sweep = json.loads(out.read_text())
        else:
            failures.append(("benchmarks/bench_sweep.py", tail))
        rows.append(("benchmarks/bench_sweep.py", passed, seconds, mib))

    print(f"\n{'check':<52} {'result':>7} {'seconds':>9} {'peak GPU MiB':>13}")
    print("-" * 84)
    for name, passed, seconds, mib in rows:
        flag = "" if seconds <= TARGET_S or not name.startswith("notebooks") else f"  (over {TARGET_S} s)"
        print(f"{name:<52} {'pass' if passed else 'FAIL':>7} {seconds:>9.1f} {'' if mib is None else mib:>13}{flag}")
    if sweep is not None:
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in sweep["seconds"].items())
        print(f"\nsweep ({sweep['mode']}): {sweep['categories']} categories, {sweep['test_images']} test images, "
              f"k={sweep['shots']}, seeds={sweep['seeds']}, {sweep['runs']} runs on {sweep['backbone']} at "
              f"{sweep['image_size']} px ({sweep['precision']}): {sweep['encoder_passes']:,} encoder passes; "
              f"{stages}; total {sweep['total_s']:.1f} s; peak GPU {sweep.get('peak_gpu_gib', '-')} GiB")
    print(f"\nweights: {'pretrained where cached or downloadable' if online else 'RANDOM (model hub unreachable)'}")
    for name, tail in failures:
        print(f"\n--- {name} failed; last lines:\n{tail}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
