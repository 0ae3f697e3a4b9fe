"""The served page in a real headless browser (Debian's Chromium, driven by Playwright): upload an
image, see the detections drawn and listed, move the score slider, open the explanation, and get a
clear message for a file that is not an image. Skipped, with the reason, where no browser exists."""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from pathlib import Path

import pytest

from rcnn.serve import ServedModel, create_app, sample_images
from server_thread import ServerThread
from tiny_runs import tiny_run

CHROMIUM = os.environ.get("RCNN_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)), reason=f"no Chromium at {CHROMIUM} "
                       "(Debian: apt-get install chromium; .ci/run installs it)"),  # fmt: skip
]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")


def post_image(url: str, data: bytes, model: str) -> dict:
    request = urllib.request.Request(f"{url}/predict?model={model}", data=data, headers={"Content-Type": "image/png"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_the_page_in_a_browser(shapes_root, tmp_path_factory, tmp_path):
    models = [ServedModel.load(tiny_run(k, shapes_root, tmp_path_factory)) for k in ("faster_rcnn", "mask_rcnn")]
    sample = tmp_path / "sample.png"
    sample.write_bytes(sample_images()["shapes_2.png"])
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("these are notes, not pixels")
    with ServerThread(create_app(models)) as url, sync_api.sync_playwright() as p:
        expected = {m.id: post_image(url, sample.read_bytes(), m.id)["results"][0]["detections"] for m in models}
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.wait_for_selector("body[data-state=ready]", timeout=30_000)
            assert page.locator(".panel").count() == 2 and page.locator("button.sample").count() == 3
            page.set_input_files("#file", str(sample))
            page.wait_for_selector("body[data-state=done]", timeout=60_000)
            for model in models:
                panel = page.locator(f'.panel[data-model="{model.id}"]')
                items = panel.locator("ul.detections li")
                at_default = sum(d["score"] >= 0.5 for d in expected[model.id])
                assert items.count() == at_default
                assert "proposals" in panel.locator(".times").inner_text()
                size = panel.locator("canvas").evaluate("c => [c.dataset.imageWidth, c.dataset.imageHeight, c.width, c.height]")
                assert size == ["128", "128", 760, 760]  # drawn enlarged, at the image's aspect
                slider = panel.locator("input.thresh")
                slider.fill(slider.get_attribute("min"))  # the lowest threshold: every detection, no new request
                assert items.count() == len(expected[model.id]) > 0
                lowest = sorted(d["score"] for d in expected[model.id])
                middle = lowest[len(lowest) // 2]
                slider.fill(f"{middle:.2f}")
                assert items.count() == sum(d["score"] >= float(f"{middle:.2f}") for d in expected[model.id])
                slider.fill(slider.get_attribute("max"))
                assert items.count() == 0
            masks_drawn = page.locator('.panel[data-model="mask_rcnn"] ul.detections li', has_text="+ mask")
            page.locator('.panel[data-model="mask_rcnn"] input.thresh').fill("0")
            assert masks_drawn.count() == len(expected["mask_rcnn"])
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)

            page.locator('.panel[data-model="mask_rcnn"] button.explain-btn').click()
            frame = page.frame_locator("#explain-frame")
            frame.locator("#stage-times").wait_for(timeout=60_000)
            sections = frame.locator("section.stage")
            assert sections.count() == 11  # 10 stages of Mask R-CNN without ground truth, and the times
            for key in ("anchors", "objectness", "rpn_nms", "pooling", "masks", "detections"):
                assert frame.locator(f"#stage-{key} img").count() == 1, key
            assert page.locator("#explain-link").get_attribute("href").startswith("blob:")

            page.set_input_files("#file", str(not_an_image))
            page.wait_for_selector("body[data-state=done]", timeout=60_000)
            message = page.locator("#error")
            assert message.is_visible() and "not_an_image" in message.inner_text() and "notes.png" in message.inner_text()
            assert page.locator("ul.detections li").count() == 0
            assert errors == []
        finally:
            browser.close()
        with urllib.request.urlopen(url + "/health", timeout=10) as response:
            assert json.loads(response.read())["status"] == "ok"
