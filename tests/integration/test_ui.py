"""The retention pages used as a person would, in Debian's headless Chromium (Selenium, no browser download), on a
real worker with simulated traffic: sign in, open each page, filter the at-risk list, search customers, and check
what is shown against the worker's lookup API and metrics. Screenshots of each page go to ``test-artifacts/ui/``.
The report opens in the same browser and makes no network request."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.expected_conditions import staleness_of
from selenium.webdriver.support.ui import Select, WebDriverWait

from streamproc.domain.alert_board import RISK_ORDER
from streamproc.tools.demo import processed_total
from tests.conftest import FROZEN_MODEL_ENV, ROOT, free_port, produce, seed_checkpoint, wait_delivered, worker_env
from tests.integration.test_exactly_once import sim_payloads

pytestmark = pytest.mark.integration

TOKEN = "ui-test-token-5f2a"
ARTEFACTS = ROOT / "test-artifacts" / "ui"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--disable-background-networking", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def api(port: int, customer_id: str) -> dict[str, Any] | None:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/customers/{customer_id}",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            found: dict[str, Any] = json.loads(resp.read())
            return found
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def wait_until(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")


def shot(driver: webdriver.Chrome, name: str) -> None:
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTEFACTS / f"{name}.png"))


def navigate(driver: webdriver.Chrome, element: Any) -> None:
    """Click ``element`` and wait until the page it leads to replaced this one (a click returns before)."""
    page = driver.find_element(By.TAG_NAME, "html")
    element.click()
    WebDriverWait(driver, 20).until(staleness_of(page))


def tile(driver: webdriver.Chrome, name: str) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, f'[data-number="{name}"] .v').text)


def test_the_retention_pages_show_what_the_engine_knows(topics, worker_factory, browser, tmp_path):
    settings = topics
    payloads = sim_payloads(customers=150, days=200, seed=41)
    seed_checkpoint(settings, payloads)
    produce(settings, payloads)
    worker = worker_factory(settings)
    worker.extra_env = {**FROZEN_MODEL_ENV, "STREAMPROC_HTTP_TOKEN": TOKEN}
    worker.start()
    worker.wait_processed(len(payloads), timeout=180)
    wait_delivered(settings)
    port, web = free_port(), settings.web_port
    customers = sorted({key.decode() for _, key, _ in payloads})
    # what the worker itself says, customer by customer: who has an open alert
    pictures = {cid: api(web, cid) for cid in customers}
    open_alerts = {cid for cid, p in pictures.items() if p and p["churn"]["open_alert"]}
    assert len(open_alerts) >= 5, "too few open alerts for the page to be tested"

    env = {**worker_env(settings), "STREAMPROC_HTTP_TOKEN": TOKEN}
    with open(tmp_path / "ui.log", "wb") as log:
        ui = subprocess.Popen([sys.executable, "-m", "streamproc.cli", "ui", "--port", str(port), "--metrics",
                               f"http://127.0.0.1:{web}/metrics"], env=env, cwd=ROOT, stdout=log,
                              stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(f"{base}/ui/login"), 30, "the UI to answer")
        # signing in: the pages send an unknown browser to the sign-in form; a wrong token is refused
        browser.get(f"{base}/ui/")
        assert browser.current_url.endswith("/ui/login")
        browser.find_element(By.ID, "token").send_keys("wrong")
        navigate(browser, browser.find_element(By.ID, "sign-in"))
        assert browser.find_element(By.ID, "login-error").is_displayed()
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        navigate(browser, browser.find_element(By.ID, "sign-in"))

        # At risk: the same customers the worker has open alerts for, most urgent first
        def page_open_count() -> bool:
            browser.get(f"{base}/ui/")
            return int(tile(browser, "open alerts")) == len(open_alerts)

        wait_until(page_open_count, 60, lambda: f"the at-risk page to show the {len(open_alerts)} open alerts (it "
                   f"shows {tile(browser, 'open alerts')}; UI log: {(tmp_path / 'ui.log').read_text()[-1500:]})")
        rows = browser.find_elements(By.CSS_SELECTOR, "tr.alert-row")
        shown = [r.get_attribute("data-customer") for r in rows]
        assert set(shown) == open_alerts
        for cid, row in zip(shown, rows, strict=True):
            assert row.get_attribute("data-tier") == pictures[cid]["stored_features"]["value_tier"]
        order = [(RISK_ORDER[r.get_attribute("data-risk")], -float(r.get_attribute("data-value-at-risk")))
                 for r in rows]
        assert order == sorted(order), "not by risk level, then value at risk"
        assert all(r.find_elements(By.CSS_SELECTOR, "ul.reasons li") for r in rows), "an alert without reasons"
        shot(browser, "at-risk")

        # filtering by value tier: exactly that tier's rows
        tiers = [r.get_attribute("data-tier") for r in rows]
        tier = max(set(tiers), key=tiers.count)
        Select(browser.find_element(By.ID, "filter-tier")).select_by_value(tier)
        navigate(browser, browser.find_element(By.ID, "apply-filters"))
        filtered = browser.find_elements(By.CSS_SELECTOR, "tr.alert-row")
        assert {r.get_attribute("data-tier") for r in filtered} == {tier}
        assert len(filtered) == tiers.count(tier)
        assert "tier=" + tier in browser.current_url
        shot(browser, "at-risk-filtered")

        # a customer from the (filtered) list: the page's figures are the lookup API's
        victim = filtered[0].get_attribute("data-customer")
        navigate(browser, browser.find_element(By.CSS_SELECTOR, f'tr.alert-row[data-customer="{victim}"] a'))
        picture = pictures[victim]
        assert browser.find_element(By.ID, "customer-title").text == f"Customer {victim}"
        money = browser.find_element(By.CSS_SELECTOR, 'td[data-feature="monetary_total"]').text
        assert float(money.replace(",", "")) == pytest.approx(picture["stored_features"]["monetary_total"], rel=1e-3)
        assert tile(browser, "churn probability") == f"{100 * picture['churn']['probability']:.0f} %"
        assert browser.find_elements(By.CSS_SELECTOR, "#customer-alerts tbody tr")
        shot(browser, "customer")

        # the search box: another customer, and one who does not exist
        other = next(c for c in customers if c not in open_alerts and pictures[c])
        box = browser.find_element(By.ID, "customer-id")
        box.clear()
        box.send_keys(other)
        navigate(browser, browser.find_element(By.ID, "search-button"))
        assert browser.find_element(By.ID, "customer-title").text == f"Customer {other}"
        box = browser.find_element(By.ID, "customer-id")
        box.clear()
        box.send_keys("nobody-at-all")
        navigate(browser, browser.find_element(By.ID, "search-button"))
        assert "No customer nobody-at-all" in browser.find_element(By.CSS_SELECTOR, "div.empty").text

        # Segments: every stored customer counted once
        navigate(browser, browser.find_element(By.ID, "nav-segments"))
        counted = sum(int(r.get_attribute("data-customers"))
                      for r in browser.find_elements(By.CSS_SELECTOR, "tr.segment-row"))
        assert counted == sum(1 for p in pictures.values() if p)
        shot(browser, "segments")

        # Uplift: no ledger ran here, so the empty state says why
        navigate(browser, browser.find_element(By.ID, "nav-uplift"))
        assert "No alert outcome yet" in browser.find_element(By.CSS_SELECTOR, "div.empty").text
        shot(browser, "uplift")

        # Health: the worker's own count of events
        processed = processed_total(worker.metrics())

        def health_caught_up() -> bool:
            browser.get(f"{base}/ui/health")
            return tile(browser, "events processed").replace(",", "") == f"{processed:.0f}"

        wait_until(health_caught_up, 30, "the health page's numbers")
        shot(browser, "health")

        # the report: the same figures, one file that asks nothing of the network
        report = tmp_path / "report.html"
        done = subprocess.run([sys.executable, "-m", "streamproc.cli", "report", "--out", str(report), "--metrics",
                               f"http://127.0.0.1:{web}/metrics"], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        browser.get_log("performance")  # drop what came before
        browser.get(report.as_uri())
        assert int(tile(browser, "open alerts")) == len(open_alerts)
        requested = [json.loads(e["message"])["message"]["params"].get("request", {}).get("url")
                     for e in browser.get_log("performance")
                     if json.loads(e["message"])["message"]["method"] == "Network.requestWillBeSent"]
        assert requested == [report.as_uri()], requested
        assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0
        shot(browser, "report")
    finally:
        ui.terminate()
        ui.wait(30)
    logged = (tmp_path / "ui.log").read_text()
    assert "retention pages on" in logged  # the log is the UI's
    assert not [c for c in customers if c in logged], "a customer id in the UI's log"


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False
