"""End to end: ``safegen demo`` on a free loopback port, driven by headless Chromium through Playwright.

Chromium is Debian's package (``make test`` installs it with apt-get); Playwright's pip wheel brings only its
driver and is pointed at ``/usr/bin/chromium`` (no browser download). The test skips, saying why, only when no
Chromium is installed. The screenshot goes to ``test-artifacts/demo.png``.
"""

import io
import re
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from safegen import demo as dm

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
# flags that work on a machine without a network: without the background-networking ones Chromium's own
# connection attempts are refused and slow the start
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
BENIGN = dm.EXAMPLES_BENIGN[0]  # a COCO caption
UNSAFE = dm.EXAMPLES_UNSAFE[0]  # a CoProV2 test prompt (violence)


def _chromium() -> str | None:
    for cand in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    """Poll ``url`` until it answers 200; fail early if the server process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the demo server exited with code {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        try:  # the wait between polls: returns at once if the server dies
            proc.wait(timeout=0.25)
        except subprocess.TimeoutExpired:
            pass
    pytest.fail(f"the demo server did not answer on {url} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def chromium():
    path = _chromium()
    if path is None:
        pytest.skip("Chromium is not installed (no /usr/bin/chromium): `make test` installs Debian's chromium "
                    "with apt-get, which failed or is not available here; the browser test is skipped")
    return path


@pytest.fixture(scope="module")
def server(chromium):
    ARTIFACTS.mkdir(exist_ok=True)
    port = _free_port()
    log = ARTIFACTS / "demo-server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    with log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "safegen.cli", "demo", "--host", "127.0.0.1", "--port",
                                 str(port), "--allow-model", "tiny-sd"], cwd=ROOT, env=env, stdout=fh,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_up(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def _image(page, elem_id: str):
    """The image shown in the gr.Image with ``elem_id``, fetched as the browser got it."""
    from PIL import Image

    img = page.locator(f"#{elem_id} img").first
    src = img.get_attribute("src")
    assert src, f"#{elem_id} shows no image"
    assert img.evaluate("el => el.complete && el.naturalWidth > 0"), f"#{elem_id}: the image did not load"
    resp = page.request.get(src)
    assert resp.ok, f"{src}: HTTP {resp.status}"
    return Image.open(io.BytesIO(resp.body())).convert("RGB")


def test_demo_in_a_real_browser(server, chromium):
    from playwright.sync_api import expect, sync_playwright

    t0 = time.monotonic()
    expect.set_options(timeout=120_000)  # assertions wait up to this for the page (generation on a shared CPU)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            # two users at once: one types a benign prompt, the other an unsafe one; the queue serves both
            users = [browser.new_page(viewport={"width": 1280, "height": 1000}) for _ in range(2)]
            for page in users:
                page.set_default_timeout(120_000)
                page.goto(server)
                expect(page.locator("#prompt textarea")).to_be_visible()
            benign, unsafe = users

            # Latent Guard: enabled when its head is installed (shipped), else disabled with the reason
            lg = next(o for o in dm.guard_options() if o.key == "latent-guard")
            box = unsafe.locator("#guard-latent-guard input[type=checkbox]")
            if lg.available:
                expect(box).to_be_enabled()
            else:
                expect(box).to_be_disabled()
                expect(box).not_to_be_checked()
                expect(unsafe.locator("#guard-latent-guard")).to_contain_text("unavailable")

            # an empty prompt is a message, not a traceback
            benign.click("#generate")
            expect(benign.get_by_text("enter a prompt first")).to_be_visible()
            expect(benign.locator("body")).not_to_contain_text("Traceback")

            benign.fill("#prompt textarea", BENIGN)
            unsafe.fill("#prompt textarea", UNSAFE)
            benign.click("#generate")
            unsafe.click("#generate")
            for page, prompt in ((benign, BENIGN), (unsafe, UNSAFE)):
                expect(page.locator("#report .sg-prompt")).to_contain_text(prompt)

            # benign: both images, a PASSED report, and the protected image is the unprotected one
            expect(benign.locator("#report .sg-verdict")).to_have_text("PASSED")
            expect(benign.locator("#protected-image")).to_contain_text("PASSED")
            plain, safe = _image(benign, "plain-image"), _image(benign, "protected-image")
            assert plain.size == safe.size and min(plain.size) >= 256
            assert np.array_equal(np.asarray(plain), np.asarray(safe))
            assert benign.locator("#report tr.sg-guard").count() >= 2  # one row per guard that ran

            # unsafe: blocked or steered, with the reason; the trigger tokens / concept are marked in the prompt
            verdict = unsafe.locator("#report .sg-verdict")
            expect(verdict).to_have_text(re.compile(r"^(BLOCKED|STEERED) by \w+"))
            reason = unsafe.locator("#report .sg-reason").inner_text()
            assert reason.startswith("Why:") and len(reason) > 20, reason
            assert unsafe.locator("#report mark").count() >= 1
            expect(unsafe.locator("#report")).to_contain_text("UNet steps:")
            plain, safe = _image(unsafe, "plain-image"), _image(unsafe, "protected-image")
            assert not np.array_equal(np.asarray(plain), np.asarray(safe))
            arr = np.asarray(safe).astype(int)
            assert (arr.sum(axis=2) < 30).mean() < 0.2  # never a black square
            if verdict.inner_text().startswith("BLOCKED"):
                # the neutral placeholder card, and the report says where LVD stopped (when it was LVD)
                assert (np.abs(arr - 150).max(axis=2) <= 2).mean() > 0.5
                expect(unsafe.locator("#protected-image")).to_contain_text("BLOCKED")
                if "by lvd" in verdict.inner_text():
                    expect(unsafe.locator("#report .sg-stop")).to_contain_text("stopped at step")
                    expect(unsafe.locator("#report")).to_contain_text("saved (")

            ARTIFACTS.mkdir(exist_ok=True)
            unsafe.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)

            # the model picker takes only what the server offers: a typed server path is not accepted
            lvd = benign.locator("#guard-lvd input[type=checkbox]")
            if next(o for o in dm.guard_options() if o.key == "lvd").available:
                expect(lvd).to_be_enabled()
                expect(lvd).to_be_checked()
            model = benign.locator("#model input")
            model.fill(str(ROOT / "assets"))
            model.press("Enter")
            benign.locator("#prompt textarea").click()  # leave the picker
            expect(model).not_to_have_value(str(ROOT / "assets"))
            # another offered model (--allow-model tiny-sd): LVD's classifier belongs to the embedded model, so its
            # toggle is switched off, disabled and says why; SAFREE stays available
            model.click()
            benign.get_by_role("option", name="tiny-sd").click()
            expect(model).to_have_value("tiny-sd")
            expect(lvd).to_be_disabled()
            expect(lvd).not_to_be_checked()
            expect(benign.locator("#guard-lvd")).to_contain_text("belong to the embedded default model")
            expect(benign.locator("#guard-safree input[type=checkbox]")).to_be_enabled()
        finally:
            browser.close()
    assert (ARTIFACTS / "demo.png").stat().st_size > 10_000
    print(f"browser test: {time.monotonic() - t0:.1f} s after the server answered")
