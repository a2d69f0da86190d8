"""A real-browser check: JupyterLab in headless Chromium runs notebook 01, a control moves, the plot changes.

Needs Debian's chromium at /usr/bin/chromium (installed with apt-get when missing and we are root; otherwise the
test is skipped with the reason) and the ``playwright`` Python package — never ``playwright install``: the
browser is the system one. Everything listens on 127.0.0.1 only; the Jupyter server's whole process group is
killed at the end.

Screenshots go to tests/_artifacts/ (ignored by git) on every run; ``APT_LAB_SCREENSHOTS=1`` refreshes the
committed ones in docs/images/ instead, including notebooks 03 and 04 (slower; not part of make test).
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "_artifacts"  # screenshots of the last run, for a person to look at
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
IMAGES = ROOT / "docs" / "images"
RUN_ALL_TIMEOUT_S = 300  # quick mode: every notebook runs in well under a minute


def ensure_chromium() -> None:
    """Install Debian's chromium when it is missing and we may; skip the test with the reason otherwise."""
    if CHROMIUM.exists():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"{CHROMIUM} is missing and cannot be installed here (needs root and apt-get): "
                    "install Debian's chromium package to run the browser test")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for command in (["apt-get", "install", "-y", "-q", "chromium"],
                        ["sh", "-c", "apt-get update -q && apt-get install -y -q chromium"]):
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
            if done.returncode == 0 and CHROMIUM.exists():
                return
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"could not install chromium with apt-get: {error}")
    pytest.skip(f"could not install chromium with apt-get (exit {done.returncode}): {done.stderr[-500:]}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def jupyter_lab(folder: Path, **extra_env):
    """A JupyterLab server on 127.0.0.1 over a copy of notebooks/ in ``folder``; yields (base_url, token, folder)."""
    work = folder / "notebooks"
    shutil.copytree(ROOT / "notebooks", work, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "APT_LAB_QUICK": "1", "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0",
           "JUPYTER_CONFIG_DIR": str(folder / "config"), "JUPYTER_RUNTIME_DIR": str(folder / "runtime"),
           "JUPYTERLAB_WORKSPACES_DIR": str(folder / "workspaces"), "JUPYTERLAB_SETTINGS_DIR": str(folder / "settings")}
    env.pop("APT_LAB_WIDGET_BACKEND", None)
    env.update(extra_env)
    # No announcements/news/update checks (they would reach the network and pop up toasts).
    settings = folder / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        '{"fetchNews": "false", "checkForUpdates": false, "doNotDisturbMode": true}')
    notebook_settings = folder / "settings" / "@jupyterlab" / "notebook-extension"
    notebook_settings.mkdir(parents=True)  # every cell in the page, not only those scrolled into view
    (notebook_settings / "tracker.jupyterlab-settings").write_text('{"windowingMode": "none"}')
    log = open(folder / "jupyter.log", "w")
    command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}", "--ServerApp.port_retries=0",
               "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=", "--LabApp.check_for_updates_class="
               "jupyterlab.NeverCheckForUpdate", "--LabApp.extension_manager=readonly"]
    if os.geteuid() == 0:  # containers and CI often run as root
        command.append("--allow-root")
    server = subprocess.Popen(command, env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail("JupyterLab did not start: " + (folder / "jupyter.log").read_text()[-2000:])
            time.sleep(0.5)
        yield base, token, folder
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the whole group: server and its kernels
            try:
                os.killpg(server.pid, sig)
            except ProcessLookupError:
                break
            try:
                server.wait(timeout=15)
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab with the automatic widget backend (FigureWidget here)."""
    ensure_chromium()
    pytest.importorskip("playwright.sync_api", reason="the playwright package is in the test extra")
    with jupyter_lab(tmp_path_factory.mktemp("lab")) as server:
        yield server


@pytest.fixture(scope="module")
def browser(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def open_and_run_all(browser, lab, notebook: str):
    """Open ``notebook`` in JupyterLab, run all cells, wait until every cell has run; returns the page."""
    base, token, _ = lab
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.set_default_timeout(120_000)
    page.goto(f"{base}/lab/tree/{notebook}?token={token}&reset")  # reset: not the tabs a previous page left open
    page.wait_for_function("() => window.jupyterapp && document.querySelector('.jp-Notebook .jp-Cell')")
    page.wait_for_function(f"""() => {{ const w = window.jupyterapp.shell.currentWidget;
        return w && w.context && w.context.path.endsWith({json.dumps(notebook)}); }}""")
    page.wait_for_function("""() => { const w = window.jupyterapp.shell.currentWidget;
        return w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel
               && w.sessionContext.session.kernel.connectionStatus === 'connected'; }""")
    page.evaluate("""async () => { const w = window.jupyterapp.shell.currentWidget;
        await w.context.ready; await w.sessionContext.ready; await w.revealed; }""")
    page.wait_for_timeout(1000)  # let the kernel finish its start-up messages before queueing every cell
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    # Done when the kernel is idle and no code cell still shows [*] or an empty prompt.
    page.wait_for_function("""() => { const w = window.jupyterapp.shell.currentWidget;
        const status = w.sessionContext.session.kernel.status;
        const cells = w.content.widgets.filter(c => c.model.type === 'code');
        const failed = cells.some(c => { const o = c.model.outputs;
            for (let i = 0; i < o.length; i++) if (o.get(i).type === 'error') return true; return false; });
        return status === 'idle' && (failed || cells.every(c => c.model.executionCount !== null)); }""",
                           timeout=RUN_ALL_TIMEOUT_S * 1000, polling=1000)
    tracebacks = page.evaluate("""() => { const w = window.jupyterapp.shell.currentWidget;
        return w.content.widgets.filter(c => c.model.type === 'code').flatMap(c => {
            const outs = c.model.outputs; const found = [];
            for (let i = 0; i < outs.length; i++) { const o = outs.get(i);
                if (o.type === 'error') found.push(o.toJSON().ename + ': ' + o.toJSON().evalue); }
            return found; }); }""")
    assert not tracebacks, f"{notebook}: cells raised {tracebacks}"
    return page


def plot_state(widget) -> str:
    """What the widget's plot shows: the image hrefs and the title, read from the rendered SVG."""
    return widget.evaluate("""el => { const plot = el.querySelector('.js-plotly-plot');
        if (!plot) return '';
        const images = [...plot.querySelectorAll('image')].map(i => i.getAttribute('href') || i.getAttribute('xlink:href'));
        const title = plot.querySelector('.gtitle'); return JSON.stringify([title ? title.textContent : '', images]); }""")


def drive_perturbation_explorer(page):
    """Find the explorer, move its generator dropdown, check the plot changed; returns the widget locator."""
    widget = page.locator(".apt-lab-widget").first
    widget.scroll_into_view_if_needed()
    page.wait_for_function("""() => { const p = document.querySelector('.apt-lab-widget .js-plotly-plot');
        return p && p.querySelectorAll('image').length >= 3; }""")
    assert widget.locator("select").count() >= 1 and widget.locator(".widget-slider").count() >= 2
    before = plot_state(widget)
    assert "gaussian" in before  # the notebook left the explorer on its first generator

    widget.locator("select").first.select_option("salt_pepper")  # move a control, as a reader would
    page.wait_for_function("""() => { const t = document.querySelector('.apt-lab-widget .js-plotly-plot .gtitle');
        return t && t.textContent.includes('salt_pepper'); }""", timeout=60_000)
    page.wait_for_timeout(500)
    after = plot_state(widget)
    assert after != before
    images_before, images_after = json.loads(before)[1], json.loads(after)[1]
    assert images_before[0] == images_after[0]  # the normal image stays
    assert images_before[1] != images_after[1]  # the perturbed image changed
    assert "salt_pepper" in widget.locator(".widget-html").first.inner_text()
    return widget


def test_perturbation_widget_in_jupyterlab(lab, browser):
    page = open_and_run_all(browser, lab, "01_perturb.ipynb")
    widget = drive_perturbation_explorer(page)
    assert widget.locator(".js-plotly-plot").count() == 1
    shot = lab[2] / "01_perturb_widget.png"
    widget.screenshot(path=str(shot))
    target = IMAGES if os.environ.get("APT_LAB_SCREENSHOTS") == "1" else ARTIFACTS
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, target / "01_perturb_widget.png")
    assert shot.stat().st_size > 10_000
    page.close()


def test_perturbation_widget_output_backend(tmp_path_factory, browser):
    """The Colab fallback: core controls re-render the figure into an ipywidgets.Output."""
    with jupyter_lab(tmp_path_factory.mktemp("lab_output"), APT_LAB_WIDGET_BACKEND="output") as server:
        page = open_and_run_all(browser, server, "01_perturb.ipynb")
        widget = drive_perturbation_explorer(page)
        assert widget.locator(".widget-output").count() == 1
        widget.screenshot(path=str(server[2] / "01_perturb_widget_output.png"))
        page.close()


@pytest.mark.skipif(os.environ.get("APT_LAB_SCREENSHOTS") != "1", reason="set APT_LAB_SCREENSHOTS=1 to refresh")
@pytest.mark.parametrize("notebook, index, name", [("03_smgs.ipynb", 0, "03_training_dashboard.png"),
                                                    ("04_score.ipynb", 0, "04_map_viewer.png")])
def test_screenshots_for_docs(lab, browser, notebook, index, name):
    page = open_and_run_all(browser, lab, notebook)
    widget = page.locator(".apt-lab-widget").nth(index)
    widget.scroll_into_view_if_needed()
    page.wait_for_function("() => document.querySelector('.apt-lab-widget .js-plotly-plot')")
    page.wait_for_timeout(1000)
    widget.screenshot(path=str(IMAGES / name))
    assert (IMAGES / name).stat().st_size > 10_000
    page.close()


def output_problems(page) -> dict:
    """What a reader would see wrong in the outputs: tracebacks, literal ``<b>`` tags, and numbers with more than
    six decimals in any plotly figure's visible text (titles, ticks, labels, cell texts)."""
    return page.evaluate(r"""() => {
        const outputs = [...document.querySelectorAll('.jp-OutputArea-output')];
        const text = outputs.map(o => o.innerText || '');
        const plots = '.jp-OutputArea-output.js-plotly-plot, .jp-OutputArea-output .js-plotly-plot';  // both renderers
        const figureText = [...document.querySelectorAll(plots.split(', ').map(p => p + ' svg text').join(', '))]
            .map(t => t.textContent || '');
        return {
            tracebacks: text.filter(t => /Traceback \(most recent call last\)|Error: /.test(t)).map(t => t.slice(0, 300)),
            raw_bold: text.filter(t => t.includes('<b>')).map(t => t.slice(0, 200)),
            long_floats: figureText.filter(t => /\d\.\d{7,}/.test(t)),
            figures: document.querySelectorAll(plots).length,
        }; }""")


@pytest.mark.parametrize("notebook", ["01_perturb.ipynb", "03_smgs.ipynb", "04_score.ipynb"])
def test_notebook_reads_clean_in_jupyterlab(lab, browser, notebook):
    """Run all (exercise solutions included), as a student would; nothing in the outputs may mislead."""
    page = open_and_run_all(browser, lab, notebook)
    page.wait_for_timeout(2000)  # let the last figures draw
    found = output_problems(page)
    shot = ARTIFACTS / f"{notebook.split('.')[0]}_run_all.png"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    assert found["figures"] >= 3, found
    assert not found["tracebacks"], f"{notebook}: {found['tracebacks']}"
    assert not found["raw_bold"], f"{notebook}: a raw <b> string is shown: {found['raw_bold']}"
    assert not found["long_floats"], f"{notebook}: figure labels with more than 6 decimals: {found['long_floats']}"
    if notebook == "04_score.ipynb":  # code moved the viewer (other trace counts): its colour bar must stay visible
        viewer = page.locator(".apt-lab-widget").last
        viewer.scroll_into_view_if_needed()
        page.wait_for_timeout(1000)
        canvas, bar = viewer.evaluate("""el => { const plot = el.querySelector('.js-plotly-plot');
            const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.right, r.width]; };
            const bar = plot.querySelector('.colorbar');
            return [box(plot.querySelector('.main-svg')), bar ? box(bar) : null]; }""")
        assert bar is not None and bar[2] > 20, f"the map viewer has no colour bar: {bar}"
        assert canvas[0] <= bar[0] and bar[1] <= canvas[1] + 1, f"colour bar {bar} drawn outside the plot {canvas}"
    page.close()
