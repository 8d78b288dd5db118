"""`python sweep.py ui`, checked the way a person would: a real MLflow server, headless Chromium, the runs table."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from procs import wait_until
from test_report import shared_sweep

from resnet_lab.ui import port_free

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# The flags that work in this sandbox (no GPU, no network, no sandboxing syscalls).
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                  "--disable-dev-shm-usage", "--window-size=1920,1080")
SERVER_START_S = 300  # ~15 s idle; over a minute measured on 2 cores shared with other test runs
PAGE_S = 120
# Columns a person picks under "Columns" to compare runs; MLflow 3.17 keeps that choice in localStorage per
# experiment (key format of mlflow<3.18, pinned in pyproject).
COLUMNS = ["params.`arch`", "params.`depth`", "params.`skip`", "params.`lr`", "params.`seed`", "metrics.`val/acc`",
           "metrics.`test/acc`"]
CLIPPED_JS = """
let el = arguments[0];
for (let node = el; node && node.getAttribute('role') !== 'gridcell'; node = node.parentElement) {
  if (node.scrollWidth > node.clientWidth + 1) return true;
}
return false;
"""

pytestmark = [
    pytest.mark.slow,
    # The first test also pays for the shared sweep (test_report.shared_sweep) and the server start (up to 300 s).
    pytest.mark.timeout(1200),
    pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                       reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium "
                              "chromium-driver; .ci/run installs them)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pump(proc: subprocess.Popen[str], lines: queue.Queue[str]) -> None:
    """Move a process's output lines into a queue (a pipe read never blocks the test)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.put(line)


def drain(lines: queue.Queue[str]) -> str:
    """Everything queued so far."""
    out = []
    while not lines.empty():
        out.append(lines.get_nowait())
    return "".join(out)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    info = shared_sweep(tmp_path_factory)
    client = MlflowClient(info["uri"])
    exp = client.get_experiment_by_name("rep")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parent = next(r for r in runs if r.data.tags.get("resnet_lab.role") == "sweep")
    names = sorted(r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id)
    return {**info, "experiment_id": exp.experiment_id, "parent": parent.info.run_id,
            "parent_name": parent.info.run_name, "children": names}


@pytest.fixture(scope="module")
def ui(sweep: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """`python sweep.py ui SPEC` on a free port; yields its process, port and the URL it printed."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "sweep.py"), "ui", sweep["spec"], "--tracking-uri",
                             sweep["uri"], "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=sweep["dir"])
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=pump, args=(proc, lines), daemon=True)
    reader.start()
    output, url, deadline = [], None, time.monotonic() + SERVER_START_S
    while url is None and time.monotonic() < deadline and proc.poll() is None:
        try:
            output.append(lines.get(timeout=1))
        except queue.Empty:
            continue
        found = re.search(r"(http://\S+/#/experiments/\d+/runs)", output[-1])
        url = found.group(1) if found else None
    try:
        assert url is not None, "".join(output)
        yield {"proc": proc, "port": port, "url": url, "output": output, "lines": lines, "reader": reader}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    # The Debian driver matches the Debian browser: Selenium Manager is never asked to download one.
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_ui_prints_the_runs_table_url_of_the_sweeps_experiment(sweep: dict[str, Any], ui: dict[str, Any]) -> None:
    assert ui["url"] == f"http://127.0.0.1:{ui['port']}/#/experiments/{sweep['experiment_id']}/runs"


def test_runs_table_shows_child_runs_under_their_sweep_with_comparable_columns(
        sweep: dict[str, Any], ui: dict[str, Any], browser: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    base = ui["url"].split("/#/")[0]
    browser.get(f"{base}/health")  # same origin, so the page's localStorage can be set before the app loads
    state = {"selectedColumns": COLUMNS}
    browser.execute_script(
        "localStorage.setItem(arguments[0], arguments[1]);"
        "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
        "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');",
        f'MLflowLocalStorage-1.1-ExperimentPage-["{sweep["experiment_id"]}"]-ReactComponentState', json.dumps(state))
    browser.get(ui["url"])
    wait = WebDriverWait(browser, PAGE_S)
    parent_cell = (By.CSS_SELECTOR, f'.ag-pinned-left-cols-container [row-id="{sweep["parent"]}"] '
                                    '[col-id="attributes.`Run Name`"]')
    wait.until(ec.visibility_of_element_located(parent_cell))
    assert sweep["parent_name"] in browser.find_element(*parent_cell).text
    # Child runs sit under their sweep's parent run: expand it as a person would, with its +/- button.
    browser.find_element(*parent_cell).find_element(By.TAG_NAME, "button").click()
    wait.until(lambda d: all(name in d.find_element(By.TAG_NAME, "body").text for name in sweep["children"]))
    for column in ("attributes.`Run Name`", "params.`arch`", "params.`lr`"):  # double-click: fit to content
        handle = browser.find_element(By.CSS_SELECTOR, f'.ag-header-cell[col-id="{column}"] .ag-header-cell-resize')
        ActionChains(browser).double_click(handle).perform()

    def clipped_names(driver: Any) -> list[str] | None:
        """Child run names not shown in full (None while one is not rendered yet)."""
        links = {a.text: a for a in driver.find_elements(By.CSS_SELECTOR, '[col-id="attributes.`Run Name`"] a')}
        if not all(name in links and links[name].is_displayed() for name in sweep["children"]):
            return None
        return [name for name in sweep["children"] if driver.execute_script(CLIPPED_JS, links[name])]

    # The columns resize as the grid re-renders: wait for every name to show in full, or fail naming the cut ones.
    try:
        WebDriverWait(browser, 30).until(lambda d: clipped_names(d) == [])
    except TimeoutException:
        raise AssertionError(f"run names cut off or missing after 30 s: {clipped_names(browser)}") from None
    headers = [h.text for h in browser.find_elements(By.CSS_SELECTOR, ".ag-header-cell") if h.text]
    assert {"arch", "depth", "skip", "lr", "seed", "val/acc", "test/acc"} <= set(headers), headers
    shot = tmp_path_factory.mktemp("screenshots") / "mlflow_runs_table.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 50_000
    print(f"screenshot: {shot}")
    if os.environ.get("RESNET_LAB_SCREENSHOTS"):  # CI keeps it as an artifact
        Path(os.environ["RESNET_LAB_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(os.environ["RESNET_LAB_SCREENSHOTS"]) / shot.name)


def test_ctrl_c_stops_the_server_and_exits_zero(ui: dict[str, Any]) -> None:
    ui["proc"].send_signal(signal.SIGINT)
    assert ui["proc"].wait(timeout=60) == 0
    wait_until(lambda: port_free("127.0.0.1", ui["port"]), 15, "the MLflow server to stop listening after Ctrl-C")
    ui["reader"].join(timeout=10)  # the pipe closes when the process exits
    rest = "".join(ui["output"]) + drain(ui["lines"])
    assert "stopping the MLflow UI" in rest and "Traceback" not in rest
