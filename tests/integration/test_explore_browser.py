"""``imm explore`` in a real browser: headless Chromium (Debian's ``chromium`` and ``chromium-driver``, driven by
Selenium) opens the page served for a tiny checkpoint, changes the seed and the steps, and sees the image change
and the NFE label follow."""

import shutil
import time

import pytest

from tests.helpers import digits_run, free_port, poll

selenium = pytest.importorskip("selenium", reason="the browser test needs selenium (the test extra)")
pytest.importorskip("gradio", reason="imm explore needs Gradio (pip install imm[explore])")
if not (shutil.which("chromium") and shutil.which("chromedriver")):
    pytest.skip("the browser test needs Debian's chromium and chromium-driver packages", allow_module_level=True)

from selenium.webdriver import Chrome, ChromeOptions  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

WAIT_S = 120  # the longest a sample may take to show on a loaded 2-core machine


def wait_for(condition, what: str, driver):
    """Poll ``condition()`` until it is truthy (returned) or WAIT_S pass (then fail with the page's text)."""
    value = poll(condition, WAIT_S)
    if value:
        return value
    pytest.fail(f"waited {WAIT_S} s for {what}; the page says: {driver.find_element(By.TAG_NAME, 'body').text[:2000]}")


def set_number(driver, elem_id: str, value) -> None:
    """Type ``value`` into the number box of the Gradio component ``elem_id`` (a Number or a Slider's box)."""
    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=number]")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from imm.interop.explore import Explorer, serve

    run = digits_run(tmp_path_factory.mktemp("browser"))
    server, url = serve(Explorer(run), "127.0.0.1", free_port(), block=False)
    options = ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1200"):
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium")
    driver = Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(url)
        yield driver
    finally:
        driver.quit()
        server.close()


def shown(driver, side: str):
    """(the panel's image source, its caption) once the panel shows an image."""
    images = driver.find_elements(By.CSS_SELECTOR, f"#image-{side} img")
    captions = driver.find_elements(By.CSS_SELECTOR, f"#caption-{side}")
    source = images[0].get_attribute("src") if images else None
    caption = captions[0].text if captions else ""
    return (source, caption) if source and "NFE" in caption else None


def test_the_page_samples_and_follows_the_seed_and_the_steps(page):
    first, caption = wait_for(lambda: shown(page, "a"), "panel A's first sample", page)
    assert "1 NFE" in caption and "1 step" in caption
    _, caption_b = wait_for(lambda: shown(page, "b"), "panel B's first sample", page)
    assert "2 NFE" in caption_b and "2 steps" in caption_b  # the second panel: other settings on the same noise
    set_number(page, "seed", 5)
    page.find_element(By.CSS_SELECTOR, "#sample button, button#sample").click()
    reseeded, caption = wait_for(lambda: (s := shown(page, "a")) and s[0] != first and s, "a new image for seed 5",
                                 page)
    assert "1 NFE" in caption and "1 step" in caption
    set_number(page, "steps-a", 4)
    page.find_element(By.CSS_SELECTOR, "#sample button, button#sample").click()
    _, caption = wait_for(lambda: (s := shown(page, "a")) and s[0] != reseeded and s, "a 4-step image", page)
    assert "4 NFE" in caption and "4 steps" in caption
    set_number(page, "count", 999)  # beyond the cap: the slider holds it to 64, or the page says why not
    page.find_element(By.CSS_SELECTOR, "#sample button, button#sample").click()
    time.sleep(1)
    assert "Traceback" not in page.find_element(By.TAG_NAME, "body").text
