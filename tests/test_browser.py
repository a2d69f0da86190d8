"""Real-browser checks: JupyterLab in headless Chromium runs notebooks 01, 03 and 04 as a reader would (a control
moves, the plot changes; titles fit at 1,400 px; the exercises' solutions stay hidden; histograms share bins; the map
viewer's controls read whole), and the built docs page of 03 shows the finished training dashboard.

Needs Debian's chromium at /usr/bin/chromium (installed with apt-get when missing and we are root; otherwise the
test is skipped with the reason) and the ``playwright`` Python package — never ``playwright install``: the
browser is the system one. Everything listens on 127.0.0.1 only; the Jupyter server's whole process group is
killed at the end.

Screenshots go to tests/_artifacts/ (ignored by git) on every run; ``APT_LAB_SCREENSHOTS=1`` refreshes the
committed ones in docs/images/ instead, including notebooks 03 and 04 and the demo's report.html (slower; not part
of make test; ``APT_LAB_REPORT=runs/<name>`` photographs that run's report instead of a fresh quick demo).
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
    for name in ("PYTEST_CURRENT_TEST", "APT_LAB_SOLUTIONS"):  # a reader's Run All: exercise solutions do not run
        env.pop(name, None)
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


def screenshot_target() -> Path:
    """docs/images/ with APT_LAB_SCREENSHOTS=1, else tests/_artifacts/ (ignored by git)."""
    target = IMAGES if os.environ.get("APT_LAB_SCREENSHOTS") == "1" else ARTIFACTS
    target.mkdir(parents=True, exist_ok=True)
    return target


# Every figure's title and panel titles (annotations), measured as drawn: [figure index, text, left, top, right,
# bottom] relative to the figure's own SVG box, plus the box's width and height.
TITLE_BOXES_JS = """root => [...root.querySelectorAll('.js-plotly-plot')].map((plot, index) => {
    const svg = plot.querySelector('.main-svg'); if (!svg) return null;
    const frame = svg.getBoundingClientRect();
    const texts = [...plot.querySelectorAll('.g-gtitle text, .annotation-text')].filter(t => t.textContent.trim());
    return {index, width: frame.width, height: frame.height, boxes: texts.map(t => { const r = t.getBoundingClientRect();
        return [t.textContent, r.left - frame.left, r.top - frame.top, r.right - frame.left, r.bottom - frame.top]; })};
}).filter(x => x)"""


# The map viewer's controls as drawn: the widest option label (canvas text metrics in the select's font) against the
# select's width, and the top of the "colours" label against the top of its toggle buttons.
VIEWER_CONTROLS_JS = """el => { const select = el.querySelector('select'); const style = getComputedStyle(select);
    const context = document.createElement('canvas').getContext('2d');
    context.font = `${style.fontWeight} ${style.fontSize} ${style.fontFamily}`;
    const text = Math.max(...[...select.options].map(o => context.measureText(o.text).width));
    const toggle = el.querySelector('.widget-toggle-buttons'); const label = toggle.querySelector('label').getBoundingClientRect();
    const button = toggle.querySelector('button').getBoundingClientRect();
    return {text, select: select.clientWidth, chrome: parseFloat(style.paddingLeft) + parseFloat(style.paddingRight) + 16,
            label_top: label.top, buttons_top: button.top, buttons_height: button.height}; }"""


def title_problems(figures: list) -> list[str]:
    """Titles (figure title, panel titles) drawn over each other or cut at the figure's edge, from TITLE_BOXES_JS."""
    problems = []
    for figure in figures:
        boxes = figure["boxes"]
        for i, (text, left, top, right, bottom) in enumerate(boxes):
            if left < -1 or right > figure["width"] + 1 or top < -1:
                problems.append(f"figure {figure['index']}: {text!r} is cut ({left:.0f}..{right:.0f} of "
                                f"{figure['width']:.0f} px)")
            for other, o_left, o_top, o_right, o_bottom in boxes[i + 1:]:
                if min(right, o_right) - max(left, o_left) > 1 and min(bottom, o_bottom) - max(top, o_top) > 1:
                    problems.append(f"figure {figure['index']}: {text!r} overlaps {other!r}")
    return problems


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
    """Run all, as a student would; nothing in the outputs may mislead: no traceback, raw tag or long float, no
    title cut or overlapping at 1,400 px, no exercise answer shown; 04's histogram classes share bins, its map
    viewer reads whole (labels not cut, "colours" beside its buttons) and keeps its colour bar."""
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
    titles = title_problems(page.evaluate(f"() => ({TITLE_BOXES_JS})(document)"))
    assert not titles, f"{notebook} at 1,400 px: {titles}"
    solutions = page.evaluate("""() => { const w = window.jupyterapp.shell.currentWidget;
        return w.content.widgets.filter(c => (c.model.getMetadata('tags') || []).includes('solution')).map(c => ({
            input: c.inputHidden, output: c.outputHidden, outputs: c.model.outputs.length,
            text: c.node.querySelector('.jp-OutputArea') ? c.node.querySelector('.jp-OutputArea').innerText : ''})); }""")
    assert len(solutions) >= 2, f"{notebook}: solution cells not found: {solutions}"
    for cell in solutions:  # source collapsed; Run All (which expands every output it runs) showed no answer
        assert cell["input"] and (cell["output"] or cell["outputs"] == 0) and not cell["text"].strip(), cell
    if notebook == "04_score.ipynb":  # the classes of the score histogram share one set of bins
        bins = page.evaluate("""() => [...document.querySelectorAll('.js-plotly-plot')].map(p => (p._fullData || [])
            .filter(t => t.type === 'histogram').map(t => [t.xbins.start, t.xbins.size])).filter(b => b.length > 1)""")
        assert bins and all(len({json.dumps(b) for b in figure}) == 1 for figure in bins), bins
        histogram = page.locator(".js-plotly-plot", has=page.locator(".barlayer")).first
        histogram.scroll_into_view_if_needed()
        histogram.screenshot(path=str(screenshot_target() / "04_histogram.png"))
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
        fit = viewer.evaluate(VIEWER_CONTROLS_JS)
        assert fit["text"] + fit["chrome"] <= fit["select"], f"the image dropdown cuts its labels: {fit}"
        assert abs(fit["label_top"] - fit["buttons_top"]) < fit["buttons_height"], f"'colours' not beside its buttons: {fit}"
    page.close()


@pytest.fixture(scope="module")
def docs_site(tmp_path_factory):
    """The docs site as ``make docs`` builds it (executed notebooks are cached in .cache/docs-notebooks/), served on
    127.0.0.1; not strict here: test_docs.py holds the build to that, this test looks at the pages."""
    import functools
    import http.server
    import threading

    site = tmp_path_factory.mktemp("docs") / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--no-strict", "--site-dir", str(site)], cwd=ROOT,
                          capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_docs_page_of_03_shows_the_finished_training_dashboard(browser, docs_site):
    """Issue 19: the docs page of 03 showed the dashboard frozen empty ("waiting for the first tuning step…", "no
    steps yet", one empty axis) with two panel titles printed over each other."""
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(f"{docs_site}/notebooks/03_smgs/")
    page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot .main-svg').length >= 3")
    text = page.locator("article").inner_text()
    assert "no steps yet" not in text and "waiting for the first tuning step" not in text
    dashboard = page.locator(".apt-lab-static").first
    dashboard.scroll_into_view_if_needed()
    page.wait_for_timeout(1000)
    state = dashboard.evaluate("""el => { const plot = el.querySelector('.js-plotly-plot');
        return {title: plot.querySelector('.gtitle').textContent, traces: plot._fullData.length,
                points: Math.max(...plot._fullData.map(t => (t.x || []).length))}; }""")
    assert state["title"].startswith("prompt tuning — step") and state["traces"] >= 3 and state["points"] > 1, state
    titles = title_problems(page.evaluate(f"() => ({TITLE_BOXES_JS})(document)"))
    assert not titles, f"docs page of 03: {titles}"
    dashboard.screenshot(path=str(screenshot_target() / "03_docs_dashboard.png"))
    page.close()


@pytest.mark.skipif(os.environ.get("APT_LAB_SCREENSHOTS") != "1", reason="set APT_LAB_SCREENSHOTS=1 to refresh")
def test_screenshot_of_the_demo_report(browser, tmp_path):
    """docs/images/demo_report.png: the top of a demo's report.html — the run in APT_LAB_REPORT (e.g. the folder
    ``make demo`` wrote), else a fresh ``apt-lab demo --preset quick``."""
    folder = os.environ.get("APT_LAB_REPORT")
    if folder is None:
        folder = tmp_path / "demo"
        done = subprocess.run([sys.executable, "-m", "apt_lab.cli", "demo", "--preset", "quick", "--out", str(tmp_path),
                               "--name", "demo", "--no-progress"], cwd=ROOT, capture_output=True, text=True,
                              timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert done.returncode == 0, done.stderr[-2000:]
    report = Path(folder) / "report.html"
    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    page.goto(report.resolve().as_uri())
    page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot .main-svg').length >= 1")
    page.wait_for_timeout(1000)
    page.screenshot(path=str(IMAGES / "demo_report.png"))
    assert (IMAGES / "demo_report.png").stat().st_size > 10_000
    page.close()
