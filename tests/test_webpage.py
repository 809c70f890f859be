"""The web page in headless Chromium: type a caption, see previews stream in and result images appear.

Needs Debian's ``chromium`` + ``chromium-driver`` and the ``selenium`` package; skips cleanly otherwise.
"""

from __future__ import annotations

import shutil

import pytest
import torch

webdriver = pytest.importorskip("selenium.webdriver")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="chromium / chromedriver not installed")


@pytest.fixture(scope="module")
def server_url():
    from holst.config import ServeConfig
    from holst.pipeline import Text2ImagePipeline
    from holst.serve.app import make_server

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    server = make_server(Text2ImagePipeline.from_random("tiny", seed=0), ServeConfig(port=0, batch_window_ms=0))
    server.start()  # uvicorn in a background thread
    yield f"http://127.0.0.1:{server.port}/"
    server.close()
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(arg)
    try:
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    except Exception as e:  # a broken local browser install is an environment problem, not a holst failure
        pytest.skip(f"cannot start headless chromium: {e}")
    yield driver
    driver.quit()


def test_type_a_prompt_and_see_images(server_url, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server_url)
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: "px" in d.find_element(By.ID, "model-line").text)  # /health answered
    # Record every preview frame the page shows (previews are replaced by results at the end).
    browser.execute_script("""
        window.previewCount = 0;
        new MutationObserver(() => { window.previewCount += 1; })
            .observe(document.getElementById('previews'), {subtree: true, childList: true, attributes: true});
    """)
    prompt = browser.find_element(By.ID, "prompt")
    prompt.send_keys("красный круг")
    count = browser.find_element(By.ID, "num_images")
    count.clear()
    count.send_keys("3")
    browser.find_element(By.ID, "seed").send_keys("5")
    browser.find_element(By.ID, "go").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results img.result")) == 3)
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#results img.result')].every(i => i.complete && i.naturalWidth > 0)"))
    images = browser.find_elements(By.CSS_SELECTOR, "#results img.result")
    assert all(int(im.get_property("naturalWidth")) == 32 for im in images)
    captions = [el.text for el in browser.find_elements(By.CSS_SELECTOR, "#results figcaption")]
    assert sorted(int(c.split()[1]) for c in captions) == [5, 6, 7]  # "seed N · clip ..."
    links = browser.find_elements(By.CSS_SELECTOR, "#results figcaption a")
    assert all(a.get_attribute("download").endswith(".png") for a in links)
    assert browser.execute_script("return window.previewCount") > 0
    assert "image(s)" in browser.find_element(By.ID, "status").text
    browser.save_screenshot(str(tmp_path / "page.png"))

    # An empty caption is refused in the page, with a message.
    prompt.clear()
    browser.find_element(By.ID, "go").click()
    wait.until(lambda d: "caption" in d.find_element(By.ID, "status").text)
