"""Browser tests of the dashboard: the real `till serve` (target/debug/till), a loopback
OpenAI-compatible upstream (`till mock-upstream`), and Debian's headless chromium driven
over WebDriver (chromium-driver). Screenshots of every page go to target/ui-screenshots/.

Run by tests/run.sh; alone: target/test-venv/bin/python -m pytest tests/ui -v
"""

import base64
import http.client
import http.server
import json
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.parse

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

ROOT = pathlib.Path(__file__).resolve().parents[2]
TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
if not TARGET.is_absolute():
    TARGET = ROOT / TARGET
TILL = pathlib.Path(os.environ.get("TILL_BIN") or TARGET / "debug" / "till")
if not TILL.is_absolute():
    TILL = ROOT / TILL
SHOTS = TARGET / "ui-screenshots"
# The real upstream credential: it must never reach a page.
SECRET = "sk-ui-real-upstream-secret-7f3a9c"
WAIT = 15


def addr_in(path, pattern, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = re.search(pattern, path.read_text() if path.exists() else "")
        if m:
            return m.group(1)
        time.sleep(0.1)
    raise AssertionError(f"no {pattern!r} in {path}:\n{path.read_text() if path.exists() else ''}")


class Till:
    """A running `till serve` with its mock upstream."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.data = tmp / "data"
        self.procs = []
        mock_log = tmp / "mock.log"
        self.procs.append(subprocess.Popen(
            [str(TILL), "mock-upstream", "--listen", "127.0.0.1:0"],
            stdout=mock_log.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        upstream = addr_in(mock_log, r"http://(127\.0\.0\.1:\d+)")
        (tmp / "till.toml").write_text(
            f'[upstreams.openai]\nbase_url = "http://{upstream}"\ncredential_env = "TILL_UI_SECRET"\n')
        self.log = tmp / "serve.log"
        env = dict(os.environ, TILL_UI_SECRET=SECRET)
        self.procs.append(subprocess.Popen(
            [str(TILL), "--dir", str(self.data), "serve", "--config", str(tmp / "till.toml"),
             "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
            stdout=self.log.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env))
        self.proxy = addr_in(self.log, r"listening on http://(127\.0\.0\.1:\d+)")
        self.admin = "http://" + addr_in(self.log, r"admin API on http://(127\.0\.0\.1:\d+)")
        self.admin_key = (self.data / "admin.key").read_text().strip()

    def cli(self, *args):
        out = subprocess.run([str(TILL), "--dir", str(self.data), *args], check=True,
                             capture_output=True, text=True, stdin=subprocess.DEVNULL)
        return out.stdout.strip()

    def mint(self, label, cap):
        return self.cli("mint", "--upstream", "openai", "--cap", str(cap), "--label", label, "--ttl", "1h")

    def call(self, key, model="gpt-4o-mini"):
        """One proxied chat completion: (status, JSON body)."""
        host, port = self.proxy.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=20)
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
        conn.request("POST", "/openai/v1/chat/completions", body=body,
                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        try:
            return resp.status, json.loads(data)
        except ValueError:
            return resp.status, {"raw": data.decode(errors="replace")}

    def api(self, path):
        u = urllib.parse.urlsplit(self.admin)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=20)
        conn.request("GET", path, headers={"Authorization": f"Bearer {self.admin_key}"})
        resp = conn.getresponse()
        data = json.loads(resp.read())
        conn.close()
        return data

    def post_form(self, path, fields, cookie=None):
        """A POST made outside the browser (a forger's): (status, body)."""
        u = urllib.parse.urlsplit(self.admin)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=20)
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if cookie:
            headers["Cookie"] = f"till_admin={cookie}"
        conn.request("POST", path, body=urllib.parse.urlencode(fields), headers=headers)
        resp = conn.getresponse()
        body = resp.read().decode(errors="replace")
        conn.close()
        return resp.status, body

    def family_of(self, key):
        out = json.loads(self.cli("inspect", key, "--json"))
        return out["blocks"][0]["revocation_id"]

    def stop(self):
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="module")
def till():
    assert TILL.exists(), f"{TILL} is missing: cargo build -p till-cli"
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="till-ui-"))
    server = Till(tmp)
    yield server
    server.stop()
    log = server.log.read_text()
    assert SECRET not in log, "the upstream credential was logged"
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture()
def browser(tmp_path):
    opts = Options()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1280,900"):
        opts.add_argument(arg)
    service = Service(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    driver = webdriver.Chrome(service=service, options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def shot(driver, name):
    """A full-page screenshot to target/ui-screenshots/<name>.png."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    metrics = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
    size = metrics.get("cssContentSize") or metrics["contentSize"]
    png = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": 1280, "height": min(size["height"], 4000), "scale": 1},
    })
    (SHOTS / f"{name}.png").write_bytes(base64.b64decode(png["data"]))


def no_secrets(driver):
    assert SECRET not in driver.page_source


def sign_in(driver, till, key):
    driver.get(till.admin + "/")
    WebDriverWait(driver, WAIT).until(lambda d: d.current_url.endswith("/login"))
    field = driver.find_element(By.ID, "f-admin-key")
    assert field.get_attribute("type") == "password"
    field.send_keys(key)
    field.submit()
    WebDriverWait(driver, WAIT).until(lambda d: d.current_url == till.admin + "/")
    cookies = {c["name"]: c for c in driver.get_cookies()}
    assert cookies["till_admin"]["httpOnly"] is True
    assert cookies["till_admin"]["sameSite"] == "Strict"


def wait_live(driver):
    WebDriverWait(driver, WAIT).until(lambda d: d.find_element(By.ID, "live-status").text == "live")


def wait(driver, condition):
    """Waits for `condition(driver)`; live updates replace elements under our feet, so a
    stale element just means "look again"."""
    return WebDriverWait(driver, WAIT, ignored_exceptions=(StaleElementReferenceException,)).until(condition)


def text_of(driver, css):
    """The text of an element, read in one script call (atomic against live swaps)."""
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.innerText : null;", css)


def family_row(driver, label):
    """The overview row of `label`: its text and its bar's label and class, read atomically."""
    return driver.execute_script("""
        const rows = [...document.querySelectorAll('table.families tbody tr')]
            .filter(tr => tr.innerText.includes(arguments[0]));
        if (rows.length !== 1) return null;
        const bar = rows[0].querySelector('svg.bar');
        return {text: rows[0].innerText, bar: [bar.getAttribute('aria-label'), bar.getAttribute('class')]};
    """, label)


def bar_state(driver, label):
    row = family_row(driver, label)
    assert row is not None, f"no single row for {label}"
    return tuple(row["bar"])


def test_sign_in_and_watch_a_family_fill_up_live(till, browser):
    key = till.mint("ui-live", 5)
    assert till.call(key)[0] == 200
    browser.get(till.admin + "/login")
    shot(browser, "01-sign-in")
    sign_in(browser, till, till.admin_key)
    assert bar_state(browser, "ui-live") == ("1 of 5 used (20 %)", "bar ok")
    wait_live(browser)
    # Proof that nothing below reloads the page: a marker on the window survives.
    browser.execute_script("window.__noReload = 42;")

    for _ in range(3):
        assert till.call(key)[0] == 200
    wait(browser, lambda d: bar_state(d, "ui-live") == ("4 of 5 used (80 %)", "bar warn"))
    assert till.call(key)[0] == 200
    wait(browser, lambda d: bar_state(d, "ui-live") == ("5 of 5 used (100 %)", "bar full"))
    assert "cap reached" in family_row(browser, "ui-live")["text"]
    status, body = till.call(key)
    assert status == 403 and body["error"]["code"] == "activation_limit_reached"
    wait(browser, lambda d: "refusal" in text_of(d, "#feed"))
    assert browser.execute_script("return window.__noReload;") == 42
    no_secrets(browser)
    shot(browser, "02-overview")

    # Filters and sorting work as plain links (no JavaScript needed).
    browser.get(till.admin + "/?near_limit=on&label=UI-LIVE")
    assert "ui-live" in browser.find_element(By.CSS_SELECTOR, "table.families").text
    browser.find_element(By.CSS_SELECTOR, "th a[href*='sort=label']").click()
    assert "sort=label" in browser.current_url and "near_limit=on" in browser.current_url

    # Its family page: tree, chart, receipts, audit.
    browser.get(till.admin + "/")
    browser.find_element(By.LINK_TEXT, "ui-live").click()
    WebDriverWait(browser, WAIT).until(lambda d: "/families/" in d.current_url)
    assert browser.find_element(By.CSS_SELECTOR, "svg.chart").get_attribute("aria-label").startswith(
        "Activations per minute")
    receipts = browser.find_elements(By.CSS_SELECTOR, "table.receipts tbody tr")
    assert len(receipts) == 5
    assert receipts[0].find_elements(By.TAG_NAME, "td")[0].text == "5"
    assert "/v1/chat/completions" in receipts[0].text and "gpt-4o-mini" in receipts[0].text
    browser.find_element(By.XPATH, "//button[normalize-space()='Run audit']").click()
    wait(browser, lambda d: "clean" in (text_of(d, "#audit") or ""))
    assert "5 receipts, every signature valid" in text_of(browser, "#audit")
    no_secrets(browser)
    shot(browser, "03-family")

    # The download is every receipt as JSON lines.
    href = browser.find_element(By.PARTIAL_LINK_TEXT, "Download all").get_attribute("href")
    fam = href.split("/families/")[1].split("/")[0]
    u = urllib.parse.urlsplit(till.admin)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=20)
    conn.request("GET", urllib.parse.urlsplit(href).path, headers={"Cookie": f"till_admin={till.admin_key}"})
    resp = conn.getresponse()
    lines = resp.read().decode().splitlines()
    assert resp.status == 200 and len(lines) == 5
    assert [json.loads(x)["seq"] for x in lines] == [1, 2, 3, 4, 5]
    assert fam == till.family_of(key)

    # Thresholds 80 % and 100 % fired; no webhook here, so they are recorded.
    browser.find_element(By.LINK_TEXT, "Alerts").click()
    table = WebDriverWait(browser, WAIT).until(lambda d: d.find_element(By.CSS_SELECTOR, "table.alerts"))
    assert "Threshold 80 % reached: 4 of 5 used" in table.text
    assert "Threshold 100 % reached: 5 of 5 used" in table.text
    assert "recorded (no webhook)" in table.text
    shot(browser, "04-alerts")


def test_mint_in_the_form_use_it_then_revoke_it(till, browser):
    sign_in(browser, till, till.admin_key)
    browser.find_element(By.LINK_TEXT, "Mint & attenuate").click()
    WebDriverWait(browser, WAIT).until(lambda d: d.current_url.endswith("/keys"))
    for field, value in (("upstream", "openai"), ("cap", "3"), ("models", "gpt-4o-mini"),
                         ("ttl", "2h"), ("label", "ui-minted")):
        browser.find_element(By.ID, f"f-{field}").send_keys(value)
    shot(browser, "05-mint-form")
    browser.find_element(By.XPATH, "//button[normalize-space()='Mint key']").click()
    box = WebDriverWait(browser, WAIT).until(lambda d: d.find_element(By.ID, "minted-key"))
    key = box.get_attribute("value").strip()
    assert key.startswith("till_")
    assert "verified" in browser.find_element(By.ID, "inspect-h").find_element(By.XPATH, "..").text
    browser.find_element(By.ID, "copy-key").click()
    WebDriverWait(browser, WAIT).until(lambda d: d.find_element(By.ID, "copy-status").text != "")
    no_secrets(browser)
    shot(browser, "06-mint-result")

    status, _ = till.call(key)
    assert status == 200
    # The model caveat from the form holds.
    status, body = till.call(key, model="gpt-4o")
    assert status == 403, body

    # Narrow it in the attenuate form: the sub-key shows under the root in the tree.
    browser.get(till.admin + "/keys")
    browser.find_element(By.ID, "f-key").send_keys(key)
    att = browser.find_element(By.ID, "att-h").find_element(By.XPATH, "..")
    att.find_element(By.ID, "f-cap").send_keys("1")
    att.find_element(By.XPATH, ".//button[normalize-space()='Attenuate']").click()
    sub = WebDriverWait(browser, WAIT).until(lambda d: d.find_element(By.ID, "minted-key")).get_attribute("value")
    assert sub.startswith("till_") and sub != key
    assert till.call(sub)[0] == 200

    browser.find_element(By.LINK_TEXT, "Open its family").click()
    WebDriverWait(browser, WAIT).until(lambda d: "/families/" in d.current_url)
    assert len(browser.find_elements(By.CSS_SELECTOR, "article.block")) == 2
    receipts = lambda d: len(d.find_elements(By.CSS_SELECTOR, "table.receipts tbody tr"))  # noqa: E731
    assert receipts(browser) == 2
    # The family page follows its own events too, without a reload.
    wait_live(browser)
    browser.execute_script("window.__noReload = 7;")
    assert till.call(key)[0] == 200
    wait(browser, lambda d: receipts(d) == 3)
    assert browser.execute_script("return window.__noReload;") == 7
    assert "3 / 3" in text_of(browser, "dl.facts")
    shot(browser, "07-family-tree")
    # Revoke the root: the confirmation names both keys.
    browser.find_elements(By.PARTIAL_LINK_TEXT, "Revoke")[0].click()
    WebDriverWait(browser, WAIT).until(lambda d: "/revoke" in d.current_url)
    assert "Revoke this key?" in browser.page_source
    assert len(browser.find_elements(By.CSS_SELECTOR, "ul.doomed > li")) == 2
    shot(browser, "08-revoke-confirm")
    browser.find_element(By.XPATH, "//button[normalize-space()='Revoke 2 keys']").click()
    WebDriverWait(browser, WAIT).until(lambda d: "revoked=" in d.current_url)
    assert "Revoked block" in browser.page_source
    assert not browser.find_elements(By.PARTIAL_LINK_TEXT, "Revoke…")
    shot(browser, "09-family-revoked")

    for k in (key, sub):
        status, body = till.call(k)
        assert status == 403 and body["error"]["code"] == "key_revoked", body


class EvilSite:
    """Another origin on this machine serving a form that posts to the dashboard."""

    def __init__(self, target, fields):
        inputs = "".join(f'<input type="hidden" name="{k}" value="{v}">' for k, v in fields.items())
        page = (f'<!doctype html><title>win a prize</title><form id="f" method="post" action="{target}">'
                f'{inputs}<button id="go">claim</button></form>').encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, *args):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def test_read_only_keys_and_forged_posts_are_refused(till, browser):
    key = till.mint("ui-guarded", 10)
    assert till.call(key)[0] == 200
    fam = till.family_of(key)
    read_only = till.cli("admin-key", "--read-only")

    sign_in(browser, till, read_only)
    browser.get(f"{till.admin}/families/{fam}")
    assert "ui-guarded" in browser.page_source
    assert browser.find_elements(By.CSS_SELECTOR, ".badge.ro")
    assert not browser.find_elements(By.PARTIAL_LINK_TEXT, "Revoke")
    assert "/revoke" not in browser.page_source
    shot(browser, "10-read-only-family")
    browser.get(f"{till.admin}/keys")
    assert not browser.find_elements(By.XPATH, "//button[normalize-space()='Mint key']")
    ro_token = browser.find_element(By.NAME, "csrf").get_attribute("value")

    # A read-only key posting anyway, even with its own valid token: 403.
    status, body = till.post_form(f"/families/{fam}/revoke", {"csrf": ro_token, "revocation_id": fam}, read_only)
    assert status == 403 and "admin_forbidden" in body
    # A full admin session with no token, or a token stolen from another session: 403.
    status, body = till.post_form(f"/families/{fam}/revoke", {"revocation_id": fam}, till.admin_key)
    assert status == 403 and "csrf_token_invalid" in body
    status, body = till.post_form(f"/families/{fam}/revoke", {"csrf": ro_token, "revocation_id": fam},
                                  till.admin_key)
    assert status == 403 and "csrf_token_invalid" in body

    # In the browser: a full admin signed in, then a page on another port of this host
    # (same site, so the cookie goes along) submits a forged revoke form.
    browser.delete_all_cookies()
    sign_in(browser, till, till.admin_key)
    evil = EvilSite(f"{till.admin}/families/{fam}/revoke", {"revocation_id": fam, "csrf": "guess"})
    try:
        browser.get(evil.url)
        browser.find_element(By.ID, "go").click()
        WebDriverWait(browser, WAIT).until(lambda d: "csrf_token_invalid" in d.page_source)
        shot(browser, "11-forged-post-refused")
    finally:
        evil.close()

    assert till.api(f"/admin/v1/families/{fam}")["family"]["revoked"] is False
    assert till.call(key)[0] == 200


def test_read_only_views_work_without_javascript(till, tmp_path):
    key = till.mint("ui-nojs", 4)
    for _ in range(2):
        assert till.call(key)[0] == 200
    opts = Options()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1280,900"):
        opts.add_argument(arg)
    opts.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"),
                              options=opts)
    try:
        sign_in(driver, till, till.admin_key)
        # The script never ran: the status still says so.
        assert driver.find_element(By.ID, "live-status").text == "static view"
        # Keyboard: the first Tab reaches the skip link.
        driver.find_element(By.TAG_NAME, "body").send_keys("\t")
        assert driver.switch_to.active_element.get_attribute("class") == "skip"
        # Filter with the form, sort with a header link, open a family: all plain HTML.
        field = driver.find_element(By.NAME, "label")
        field.send_keys("nojs")
        field.submit()
        wait(driver, lambda d: "label=nojs" in d.current_url)
        rows = driver.find_elements(By.CSS_SELECTOR, "table.families tbody tr")
        assert len(rows) == 1 and "2 / 4" in rows[0].text
        driver.find_element(By.CSS_SELECTOR, "th a[href*='sort=remaining']").click()
        wait(driver, lambda d: "sort=remaining" in d.current_url and "label=nojs" in d.current_url)
        driver.find_element(By.LINK_TEXT, "ui-nojs").click()
        wait(driver, lambda d: "/families/" in d.current_url)
        assert len(driver.find_elements(By.CSS_SELECTOR, "table.receipts tbody tr")) == 2
        shot(driver, "12-family-without-javascript")
    finally:
        driver.quit()
