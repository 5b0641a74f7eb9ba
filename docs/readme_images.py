"""Make the README pictures from the demo's outputs: ``python docs/readme_images.py demo_output``.

* ``docs/_static/spatial_compare.png``: the demo's comparison figure, palette-reduced to stay small;
* ``docs/_static/explorer.png``: a screenshot of the demo's ``explorer.html`` in headless Chromium
  (Debian ``chromium`` + ``chromium-driver``, selenium), with a gene picked in the metrics table.
"""

from __future__ import annotations

import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

STATIC = Path(__file__).resolve().parent / "_static"


def _small_png(image: Image.Image, dst: Path, *, max_width: int, colors: int = 128) -> None:
    if image.width > max_width:
        image = image.resize((max_width, round(image.height * max_width / image.width)), Image.LANCZOS)
    image.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(dst, optimize=True)


def explorer_screenshot(html: Path, dst: Path, *, gene_row: int = 2) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1000,1150", "--hide-scrollbars"):
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="chrome-profile-")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(html.resolve().as_uri())
        time.sleep(4)
        driver.execute_script(
            "const d = Bokeh.documents[0]; const t = d.get_model_by_name('metrics');"
            f"t.selected.indices = [{gene_row}];")
        time.sleep(2)
        shot = Image.open(io.BytesIO(driver.get_screenshot_as_png()))
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    _small_png(shot, dst, max_width=1000, colors=160)


def main(demo_output: str = "demo_output") -> None:
    out = Path(demo_output)
    STATIC.mkdir(exist_ok=True)
    _small_png(Image.open(out / "spatial_compare.png"), STATIC / "spatial_compare.png", max_width=900)
    explorer_screenshot(out / "explorer.html", STATIC / "explorer.png")
    for name in ("spatial_compare.png", "explorer.png"):
        print(name, f"{(STATIC / name).stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main(*sys.argv[1:])
