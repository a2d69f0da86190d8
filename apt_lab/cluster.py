"""A local Ray instance that never outlives the process that started it.

:func:`ray_session` starts a Ray instance of its own (or connects to a cluster at ``address``), yields the ``ray``
module, and stops what it started on every way out: the end of the ``with`` block, an error, Ctrl-C, SIGTERM.
For SIGKILL, which no process can catch, a watchdog is started beside the instance: a small process in a session
of its own (so a kill of the driver's process group spares it) that blocks reading a pipe from the driver. When
the driver ends, however it ends, the pipe closes; the watchdog then stops every process of the instance and
removes the instance's folder. The instance lives in a fresh temporary folder (Ray's ``_temp_dir``), and a
process belongs to it when its command line names that folder — Ray puts it on every raylet, GCS, agent and
log monitor it starts — so nothing else is ever touched. A cluster given by ``address`` is never stopped.

Example (not run here: it starts Ray)::

    with ray_session(workers=2) as ray:
        results = ray.get([task.remote(x) for x in work])
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

RETRY_MESSAGE = "timed out during startup"  # Ray's (bare) Exception when its raylet is slow to start: tried again
PREFIX = "apt_lab_ray_"  # the instance folder's name starts with this
STOP_WAIT_S = 10  # seconds a process of the instance gets to exit after SIGTERM before SIGKILL


@contextlib.contextmanager
def ray_session(address: str | None = None, workers: int | None = None):
    """``ray``, initialised: a new local instance with ``workers`` CPUs (None = all), or the cluster at ``address``.

    A local instance is stopped when the block ends in any way, and dies with this process even on SIGKILL (see the
    module docstring). An instance already initialised in this process (e.g. a notebook's ``ray.init()``) is used
    as it is and left running.
    """
    try:
        import ray
    except ImportError:
        raise ImportError("executor='ray' needs Ray: pip install 'apt-lab[cluster]'") from None
    if ray.is_initialized():
        yield ray
        return
    folder = None if address else tempfile.mkdtemp(prefix=PREFIX, dir="/tmp" if os.path.isdir("/tmp") else None)
    watchdog = _start_watchdog(folder) if folder else None  # first: a failed start's processes are reaped too
    try:
        _start(ray, address, workers, folder)
        with _sigterm_as_exit():
            yield ray
    finally:
        ray.shutdown()
        if watchdog is not None:
            watchdog.stdin.close()  # the watchdog stops what is left of the instance and removes its folder
            with contextlib.suppress(subprocess.TimeoutExpired):
                watchdog.wait(timeout=4 * STOP_WAIT_S)


def _start(ray, address: str | None, workers: int | None, folder: str | None) -> None:
    """``ray.init``; a local instance that times out starting (Ray waits 30 s for its raylet, too little on a busy
    machine) is started once more before giving up."""
    options = {"address": address} if address else {"address": "local", "num_cpus": workers, "_temp_dir": folder}
    for attempt in (1, 2):
        try:
            ray.init(include_dashboard=False, log_to_driver=False, **options)
            return
        except Exception as error:  # Ray raises a bare Exception for this
            if address or attempt == 2 or RETRY_MESSAGE not in str(error):
                raise
            ray.shutdown()
            stop_instance(folder, remove=False)  # what the failed start left running
            print("Ray's local instance timed out starting (a busy machine?); trying once more", flush=True)


@contextlib.contextmanager
def _sigterm_as_exit():
    """SIGTERM raises SystemExit in the main thread while the block runs, so ``finally`` clauses stop Ray."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _start_watchdog(folder: str) -> subprocess.Popen:
    """The process that stops the instance in ``folder`` once this one's pipe to it closes."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                     os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-m", "apt_lab.cluster", folder], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)


def instance_processes(folder: str, spare: set[int] = frozenset()) -> list:
    """psutil processes of this user that belong to the Ray instance in ``folder``: their command line names it or
    they hold a file open inside it (agents and workers rename themselves, but keep their logs there), and their
    children; never this process, the watchdog, or a pid in ``spare`` (the driver: it has Ray's log files open too).
    """
    import psutil

    inside = os.path.join(folder, "")
    found = {}
    for process in psutil.process_iter(["cmdline", "uids"]):
        with contextlib.suppress(psutil.Error, TypeError, AttributeError):
            words = process.info["cmdline"] or ()
            if (process.pid == os.getpid() or process.pid in spare or process.info["uids"].real != os.getuid()
                    or "apt_lab.cluster" in words):
                continue
            if any(folder in word for word in words) or any(f.path.startswith(inside) for f in process.open_files()):
                for member in (process, *process.children(recursive=True)):
                    found.setdefault(member.pid, member)
    return [process for pid, process in found.items() if pid not in spare]


def stop_instance(folder: str | None, remove: bool = True, spare: set[int] = frozenset()) -> None:
    """Stop every process of the Ray instance in ``folder`` (SIGTERM, then SIGKILL after :data:`STOP_WAIT_S`) and,
    with ``remove``, delete the folder — only one this module made (its name starts with :data:`PREFIX`)."""
    import psutil

    if not folder or not Path(folder).name.startswith(PREFIX):
        return
    processes = instance_processes(folder, spare)
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=STOP_WAIT_S)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=STOP_WAIT_S)
    if remove:
        shutil.rmtree(folder, ignore_errors=True)


def _watch(folder: str) -> None:
    """The watchdog: wait until the driver's pipe closes (the driver ended or let go), then stop the instance."""
    driver = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is for the driver, which then closes the pipe
    sys.stdin.buffer.read()
    stop_instance(folder, spare={driver})


if __name__ == "__main__":
    _watch(sys.argv[1])
