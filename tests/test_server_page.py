"""The page at ``/`` in a real browser: Debian's headless Chromium driven by Selenium (``.ci/run`` installs
chromium and chromium-driver): the pickers filled from the API, a prompt typed, Generate clicked, the progress
bar seen moving, the image shown with its parameters; Interrupt stops a run."""

from __future__ import annotations

import shutil
import time

import pytest

from tests.server_helpers import running_server, tiny_server_argv

webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs chromium and chromium-driver")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(condition, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def set_value(browser, element_id: str, value: str) -> None:
    field = browser.find_element("id", element_id)
    field.clear()
    field.send_keys(value)


def test_generate_in_the_browser(browser, tiny_checkpoint):
    with running_server(tiny_server_argv(tiny_checkpoint, "--no-watermark")) as server:
        browser.get(server.url + "/")
        options = lambda element_id: browser.execute_script(  # noqa: E731
            f"return [...document.getElementById('{element_id}').options].map(o => o.value)")
        wait_until(lambda: options("sampler_name") and options("model"), 30)
        assert "DPM++ 2M" in options("sampler_name") and options("model") == ["tiny.safetensors"]
        assert "karras" in options("scheduler")
        browser.find_element("id", "prompt").send_keys("a lighthouse at dusk")
        for element_id, value in (("width", "64"), ("height", "64"), ("steps", "40"), ("seed", "5")):
            set_value(browser, element_id, value)
        browser.find_element("id", "generate").click()
        seen = set()
        while not browser.find_elements("css selector", "#images img"):
            seen.add(browser.execute_script("return document.getElementById('progress').value"))
            assert not browser.find_element("id", "error").text
            time.sleep(0.05)
        moving = sorted(value for value in seen if 0 < value < 1)
        assert len(moving) >= 2, seen  # the bar moved while the image was made
        image = browser.find_element("css selector", "#images img")
        wait_until(lambda: browser.execute_script("return arguments[0].naturalWidth", image) == 64, 10)
        caption = browser.find_element("css selector", "#images figcaption").text
        assert caption.startswith("a lighthouse at dusk") and "Seed: 5," in caption and "Steps: 40" in caption


def test_interrupt_button(browser, tiny_checkpoint):
    with running_server(tiny_server_argv(tiny_checkpoint, "--no-watermark")) as server:
        browser.get(server.url + "/")
        wait_until(lambda: browser.execute_script("return document.getElementById('model').options.length"), 30)
        for element_id, value in (("width", "64"), ("height", "64"), ("steps", "400"), ("batch_size", "1")):
            set_value(browser, element_id, value)
        browser.find_element("id", "generate").click()
        wait_until(lambda: server.service.worker.progress.at.sampling_step >= 2)
        browser.find_element("id", "interrupt").click()
        wait_until(lambda: browser.find_element("id", "generate").is_enabled(), 60)
        assert server.service.worker.progress.at.job == ""  # the run ended, long before step 400
        assert browser.find_elements("css selector", "#images img") == []  # its only batch was stopped
