"""The playground page in headless Chromium (Debian's chromium + chromedriver, driven by Selenium):
type a prompt, press Generate, see the text stream in and the attention heatmap drawn."""

from __future__ import annotations

import shutil

import pytest
import torch

webdriver = pytest.importorskip("selenium.webdriver")
pytest.importorskip("uvicorn")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from test_serve_openai import live_server  # noqa: E402

from minigpt import GPTModel, get_preset, optimize_for_cpu  # noqa: E402
from minigpt.serving import create_app  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                 reason="needs Debian's chromium and chromium-driver packages")]

COUNT_UPDATES = """
window.updates = 0;
new MutationObserver(() => window.updates++).observe(document.getElementById('output'),
    {characterData: true, childList: true, subtree: true});
"""
INKED_PIXELS = """
const c = document.getElementById('heatmap'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i + 2] > d[i] + 40) n++; return n;
"""


@pytest.fixture(scope="module")
def url(tokenizer):
    torch.manual_seed(0)
    app = create_app(optimize_for_cpu(GPTModel(get_preset("tiny")).eval()), tokenizer, "tiny")
    try:
        with live_server(app) as url:
            yield url
    finally:
        app.state.service.close()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--no-first-run", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_prompt_generate_stream_and_heatmap(browser, url, tokenizer, tmp_path):
    browser.get(url + "/")
    prompt = "Every effort moves you"
    browser.find_element(By.ID, "prompt").send_keys(prompt)
    browser.find_element(By.ID, "max_tokens").clear()
    browser.find_element(By.ID, "max_tokens").send_keys("30")
    browser.execute_script(COUNT_UPDATES)
    browser.find_element(By.ID, "generate").click()
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: "tokens/s" in d.find_element(By.ID, "stats").text)
    output = browser.find_element(By.ID, "output").text
    assert output.startswith(prompt) and len(output) > len(prompt)
    assert "30 tokens" in browser.find_element(By.ID, "stats").text
    assert browser.execute_script("return window.updates") > 2  # the text arrived piece by piece
    heatmap = browser.find_element(By.ID, "heatmap")
    wait.until(lambda d: heatmap.get_attribute("data-tokens"))
    assert int(heatmap.get_attribute("data-tokens")) == len(tokenizer.encode(prompt))
    assert browser.execute_script(INKED_PIXELS) > 100  # blue cells were drawn
    browser.find_element(By.CSS_SELECTOR, "#head option[value='3']").click()
    wait.until(lambda d: "head 3" in d.find_element(By.ID, "heatmap-info").text)
    assert browser.find_element(By.ID, "error").text == ""
    browser.save_screenshot(str(tmp_path / "playground.png"))
    assert (tmp_path / "playground.png").stat().st_size > 10_000
