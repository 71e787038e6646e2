"""cmn-explain's page as a user sees it: headless Chromium renders it, its images decode, the
console stays clean, and clicking a word redraws the heatmap."""

import io

import numpy as np
import pytest
from PIL import Image

from cmn.explain.cli import main
from helpers.browser import all_images_decoded, chromium, console_errors, open_page
from helpers.explain_fixtures import demo_data, demo_views, tiny_bundle

CANVAS = "return document.querySelector('#study-{n} canvas.heat').toDataURL()"


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    demo = demo_data(root / "demo")
    ckpt = tiny_bundle(root / "ckpt", demo)
    out = root / "page.html"
    views = [str(p) for i in range(2) for p in demo_views(demo, "test", i)]
    assert main(["--checkpoint", str(ckpt), *views, "--output", str(out)]) == 0
    return out


def test_page_renders_and_reacts_to_clicks(page, tmp_path):
    with chromium() as driver:
        open_page(driver, page)
        shot = tmp_path / "page.png"
        assert driver.save_screenshot(str(shot))
        pixels = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("L"), dtype=np.float32)
        assert pixels.shape[1] == 1300 and pixels.shape[0] > 500 and pixels.std() > 10  # something was drawn
        assert driver.execute_script("return document.images.length") == 4
        assert all_images_decoded(driver)

        words = driver.find_elements("css selector", "#study-0 .w")
        assert len(words) >= 2
        before = driver.execute_script(CANVAS.format(n=0))
        changed = False
        for word in words[1:]:
            word.click()
            assert "on" in word.get_attribute("class").split()
            section = driver.find_element("css selector", "#study-0")
            assert section.get_attribute("data-drawn") == word.text
            if driver.execute_script(CANVAS.format(n=0)) != before:
                changed = True
                break
        assert changed, "no word click changed the heatmap"

        # the memory overlap and a single layer draw other maps of the same word
        shown = driver.execute_script(CANVAS.format(n=0))
        driver.find_element("css selector", "#study-0 input[value=memory]").click()
        assert "overlap" in driver.find_element("css selector", "#study-0 .status").text
        driver.find_element("css selector", "#study-0 input[value=attention]").click()
        assert driver.execute_script(CANVAS.format(n=0)) == shown
        driver.find_element("css selector", "#study-0 .stage").click()
        assert "Image region (view 1) reads" in driver.find_element("css selector", "#study-0 .memory").text
        assert console_errors(driver) == []
