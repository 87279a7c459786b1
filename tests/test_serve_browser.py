"""End to end: `ravine serve` in a subprocess, the page in a real headless Chromium.

The page loads, refuses a bad batch size with a message, starts a short run and draws
the loss curve while the run goes on; the playground redraws a path when a learning-rate
slider moves. Needs Debian's ``chromium`` and ``chromium-driver`` (CI's script installs
them); without them the test fails under CI and is skipped, with the reason, elsewhere.
Set ``RAVINE_SERVE_SCREENSHOT=docs/serve.png`` to keep a screenshot of the page.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

selenium = pytest.importorskip("selenium", reason="selenium is in the test extra: pip install -e '.[test]'")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402


BROWSERS: list = []  # the open browser, for a screenshot when a wait times out


def _browser() -> tuple[str, str] | None:
    browser = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                    if shutil.which(name)), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def warm_up_optimizers() -> None:
    """One step of each optimizer the page trains with, so anything they build on first
    use (a compiled step, kept on disk) is ready before the browser starts timing."""
    import torch

    from ravine import registry

    for spec in ("sgd(lr=0.1)", "adam(lr=0.001)"):
        parameter = torch.nn.Parameter(torch.zeros(8))
        optimizer = registry.create(spec, [parameter])
        parameter.grad = torch.ones(8)
        optimizer.step()


@pytest.fixture(scope="module")
def server():
    warm_up_optimizers()
    # A folder of its own rather than pytest's numbered ones, which a second pytest
    # process on the machine may clean away while the server still writes there.
    folder = Path(tempfile.mkdtemp(prefix="ravine-serve-test-"))
    out = folder / "runs"
    process = subprocess.Popen(
        [sys.executable, "-m", "ravine.cli", "serve", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        line = process.stdout.readline()
        assert "http://127.0.0.1:" in line, f"ravine serve printed {line!r}"
        url = line.split()[2]
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "api/options", timeout=5):
                    break
            except OSError:
                assert process.poll() is None, "ravine serve exited"
                assert time.monotonic() < deadline, "ravine serve did not answer within 60 s"
                time.sleep(0.2)
        yield url, out
    finally:
        process.terminate()
        process.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    found = _browser()
    if found is None:
        message = "chromium and chromedriver are needed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1200"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(found[1]), options=options)
    BROWSERS.append(driver)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for(condition, timeout: float = 30.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            debug = os.environ.get("RAVINE_SERVE_DEBUG")
            if debug and BROWSERS:
                BROWSERS[0].save_screenshot(debug)
            raise AssertionError("timed out waiting for the page")
        time.sleep(interval)


def loss_points(driver) -> list[int]:
    """Points in each train-loss trace the page has drawn (faint per-step and running mean)."""
    return driver.execute_script(
        "const c = document.getElementById('loss-chart'); return c.data ? c.data.map(t => t.y.length) : [];"
    )


def set_value(driver, element_id: str, text: str) -> None:
    element = driver.find_element(By.ID, element_id)
    element.clear()
    element.send_keys(text)


def shown_run_id(driver) -> str:
    """The id in the heading "Run <id>: ..." above the charts."""
    return driver.find_element(By.ID, "run-title").text.split()[1].rstrip(":")


def running_points(driver) -> list[int] | None:
    """The drawn points while the page says the run is running and has drawn some."""
    points = loss_points(driver)
    running = driver.find_element(By.ID, "run-status").text == "running"
    return points if running and sum(points) > 0 else None


def test_page_runs_training_with_live_curves(server, browser):
    url, out = server
    browser.get(url)
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#run-optimizers .optimizer-row"))
    assert browser.find_element(By.ID, "batch-size").get_attribute("value") == "32"

    # A bad setting: the page shows the server's message, no run starts.
    set_value(browser, "batch-size", "0")
    browser.find_element(By.ID, "start-run").click()
    message = wait_for(lambda: browser.find_element(By.ID, "run-message").text)
    assert "batch_size" in message and "Traceback" not in message
    assert "error" in browser.find_element(By.ID, "run-message").get_attribute("class")

    # A long run: the curve grows while it runs, then Stop ends it.
    Select(browser.find_element(By.ID, "task")).select_by_value("digits-mlp")
    set_value(browser, "batch-size", "16")
    set_value(browser, "epochs", "40")
    browser.find_element(By.ID, "start-run").click()
    first = wait_for(lambda: running_points(browser), timeout=120)
    wait_for(lambda: sum(running_points(browser) or [0]) > sum(first), timeout=120)
    browser.find_element(By.ID, "stop-run").click()
    wait_for(lambda: browser.find_element(By.ID, "run-status").text == "stopped", timeout=60)
    stopped_id = shown_run_id(browser)
    run = json.loads((out / stopped_id / "run.json").read_text())
    assert run["status"] == "stopped"
    drawn = loss_points(browser)
    assert drawn == [len(curve["train_loss"]) for curve in run["optimizers"] for _ in range(2)]
    assert 0 < sum(drawn) < 4 * 40 * 90

    # A short run to the end: every step drawn, the report linked, both runs listed.
    set_value(browser, "epochs", "3")
    browser.find_element(By.ID, "start-run").click()
    wait_for(lambda: shown_run_id(browser) != stopped_id)
    wait_for(lambda: browser.find_element(By.ID, "run-status").text == "done", timeout=90)
    run_id = shown_run_id(browser)
    run = json.loads((out / run_id / "run.json").read_text())
    assert run["status"] == "done"
    full = [3 * 90] * 4  # faint and mean trace per optimizer: 3 epochs of ceil(1437 / 16) steps
    assert loss_points(browser) == [len(curve["train_loss"]) for curve in run["optimizers"] for _ in range(2)] == full
    report_link = browser.find_element(By.ID, "run-report")
    assert report_link.is_displayed() and report_link.get_attribute("href").endswith(f"/{run_id}/files/report.html")
    wait_for(lambda: run_id in browser.find_element(By.ID, "runs-table").text
             and stopped_id in browser.find_element(By.ID, "runs-table").text)

    screenshot = os.environ.get("RAVINE_SERVE_SCREENSHOT")
    if screenshot:
        browser.execute_script("window.scrollTo(0, 0)")
        time.sleep(0.3)
        browser.save_screenshot(str(Path(screenshot)))

    # Compare: both runs drawn together, a loss and a metric trace per run and optimizer.
    for run_id_ in (run_id, stopped_id):
        browser.find_element(By.CSS_SELECTOR, f"#runs-table input[value='{run_id_}']").click()
    browser.find_element(By.ID, "compare-runs").click()
    names = wait_for(lambda: browser.execute_script(
        "const c = document.getElementById('compare-chart'); return c.data ? c.data.map(t => t.name) : null;"))
    assert sorted(set(names)) == sorted(f"{identifier[-6:]} {spec} (batch 16)" for identifier in (run_id, stopped_id)
                                        for spec in ("sgd(lr=0.1)", "adam(lr=0.001)"))
    assert len(names) == 8


def test_playground_redraws_when_a_slider_moves(server, browser):
    url, _ = server
    browser.get(url)
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#landscape-optimizers .optimizer-row"))
    browser.find_element(By.ID, "tab-landscape").click()
    names = "return (document.getElementById('contour-chart').data || []).map(t => t.name || '');"
    drawn = wait_for(lambda: [name for name in browser.execute_script(names) if "(lr=" in name])
    assert drawn == ["sgd(lr=0.01)", "momentum(lr=0.01)", "adam(lr=0.001)"]
    browser.execute_script(
        "const s = document.querySelector('#landscape-optimizers [data-name=adam] .lr');"
        "s.value = -1; s.dispatchEvent(new Event('input'));"
    )
    wait_for(lambda: "adam(lr=0.1)" in browser.execute_script(names), timeout=20)
    rows = browser.find_element(By.ID, "landscape-table").text
    assert "adam (lr=0.1)" in rows
