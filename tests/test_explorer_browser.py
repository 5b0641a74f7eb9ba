"""The explorer HTML in a real browser: headless Chromium (Debian packages) driven by selenium.

Checks that the page renders the maps, that choosing another gene (menu, table row) changes the
maps, and that opening the page makes no network request (Chrome performance log).
"""

from __future__ import annotations

import io
import json
import shutil
import time

import numpy as np
import pytest
from _mob_maps import mob_maps, per_gene_table

import histoexpr as hx

CHROME_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1300,1400",
]


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (test extra)")
    browser, chromedriver = _chromium(), shutil.which("chromedriver")
    if browser is None or chromedriver is None:
        pytest.skip("Chromium/chromedriver not found (Debian: apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chrome-profile')}")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    drv = webdriver.Chrome(service=Service(chromedriver), options=options)
    yield drv
    drv.quit()


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    pred, truth = mob_maps(n_genes=8)
    path = hx.pl.explore(pred, truth, metrics=per_gene_table(pred, truth),
                         path=tmp_path_factory.mktemp("explorer") / "explorer.html")
    return path, pred


def _wait(drv, script, timeout=60.0):
    end = time.time() + timeout
    while time.time() < end:
        value = drv.execute_script(script)
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for: {script}")


def _screenshot(drv) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(drv.get_screenshot_as_png())).convert("RGB"), dtype=np.int16)


# bokeh 3 draws its widgets in shadow roots: search through them
_DEEP_FIND = """
const sel = arguments[0], found = [];
(function walk(root) {
  root.querySelectorAll(sel).forEach(e => found.push(e));
  root.querySelectorAll('*').forEach(e => { if (e.shadowRoot) walk(e.shadowRoot); });
})(document);
return found;
"""

_DOC = "const d = window.Bokeh && Bokeh.documents && Bokeh.documents[0];"


def _model(name: str) -> str:
    return f"{_DOC} const m = d && d.get_model_by_name('{name}');"


def test_explorer_renders_switches_genes_offline(driver, page):
    path, pred = page
    driver.get("about:blank")
    driver.get_log("performance")  # drop what the browser did at start-up (its new-tab page)
    driver.get(path.resolve().as_uri())
    _wait(driver, f"{_DOC} return !!d;")
    # the two map canvases are drawn: tiles in several colours over the H&E
    _wait(driver, "return document.querySelectorAll('.bk-Figure, .bk-Canvas, canvas').length > 0 || "
                  "!!document.querySelector('div.bk-Column');")
    time.sleep(2.0)
    before = _screenshot(driver)
    assert before.std() > 20, "the page looks blank"
    assert len(np.unique(before.reshape(-1, 3)[::7], axis=0)) > 200, "no image or map drawn"
    genes = list(pred.var_names)
    src0 = driver.execute_script(_model("maps") + " return Array.from(m.data.pred);")
    np.testing.assert_allclose(src0, pred[:, genes[0]].X.ravel(), rtol=1e-5, atol=1e-5)

    # choosing another gene in the menu changes the map data, the title and the pixels
    driver.execute_script(_model("gene_select") + f" m.value = {json.dumps(genes[3])};")
    time.sleep(1.5)
    src1 = driver.execute_script(_model("maps") + " return Array.from(m.data.pred);")
    np.testing.assert_allclose(src1, pred[:, genes[3]].X.ravel(), rtol=1e-5, atol=1e-5)
    title = driver.execute_script(_model("map_pred") + " return m.title.text;")
    assert genes[3] in title
    after = _screenshot(driver)
    changed = np.abs(after - before).sum(-1) > 30
    assert changed.mean() > 0.005, "selecting another gene did not change the drawn map"

    # clicking a row of the metrics table shows that gene
    cells = driver.execute_script(_DEEP_FIND, ".slick-row .slick-cell")
    assert len(cells) >= 2, "the metrics table has no rows"
    filled = [c for c in cells if c.text.strip()]
    target = filled[min(len(filled) - 1, 3)]
    target.click()
    time.sleep(1.0)
    selected = driver.execute_script(_model("gene_select") + " return m.value;")
    table_gene = driver.execute_script(_model("metrics") + " const i = m.selected.indices[0]; "
                                       "return m.data['_gene_id'][i];")
    assert selected == table_gene

    # no network request: every request the page made is file:// or data:
    page_urls, all_urls = [], []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") == "Network.requestWillBeSent":
            url = msg["params"]["request"]["url"]
            all_urls.append(url)
            if msg["params"].get("documentURL", "").startswith("file:"):
                page_urls.append(url)
    assert page_urls, "the performance log recorded no request of the page (not even the page itself)"
    remote = [u for u in page_urls if not u.startswith(("file:", "data:", "blob:"))]
    assert remote == [], f"the explorer fetched {remote}"
    web = [u for u in all_urls if u.startswith(("http:", "https:", "ws:", "wss:"))]
    assert web == [], f"network requests while the explorer was open: {web}"
    errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    assert errors == [], errors
