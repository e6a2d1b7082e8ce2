"""The HTML pages (run, comparison, audit) in a real headless Chromium: images, filters, errors, hostile text.

Driven over the DevTools protocol (tests/chromium_driver.py) with Debian's `chromium`; under CI=true a
missing browser fails these tests, elsewhere they are skipped with the install command.
"""

from __future__ import annotations

import numpy as np
import pytest
from chromium_driver import open_browser, require_chromium
from cycle_fakes import KeywordLabeler, PaintingMaker, brightness_reports, query
from PIL import Image

from cyclex.adapters import CallableGenerator, GeneratorInfo
from cyclex.cycle import CyclicExplainer
from cyclex.cycle.audit_report import audit_runs
from cyclex.cycle.report_html import write_comparison_report, write_run_report
from cyclex.cycle.run_folder import run_explainer

# Text a generator could emit: it must show as text, never run (window.__pwned stays undefined).
HOSTILE = ' <script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"> </div></td></table>'
QUERIES = {"a": (0.9, 0.9, 0.1), "b": (0.9, 0.1, 0.1), "c": (0.9, 0.9, 0.9), "d": (0.1, 0.9, 0.1)}

WAIT_FOR_IMAGES = """(async () => {
  const images = Array.from(document.images);
  images.forEach(img => { img.loading = "eager"; });
  await Promise.all(images.map(img => img.complete ? null : new Promise(done => {
    img.addEventListener("load", done); img.addEventListener("error", done); })));
  return images.map(img => [img.getAttribute("src"), img.naturalWidth]);
})()"""
SHOWN = "Array.from(document.querySelectorAll('.filterable')).filter(e => e.style.display !== 'none').length"


def _select(filter_name: str, value: str) -> str:
    return (f"(() => {{ const s = document.querySelector(\"select[data-filter='{filter_name}']\"); s.value = {value!r};"
            " s.dispatchEvent(new Event('change')); return s.value; })()")


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    require_chromium()
    root = tmp_path_factory.mktemp("browser")
    records = []
    for index, (image_id, values) in enumerate(QUERIES.items()):
        path = root / "in" / f"image{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.uint8(query(*values)[0].numpy() * 255 + 0.5)).save(path)
        records.append({"id": image_id, "image": str(path), "chest_box": [0, 0, 32, 32], "masks": {}})
    generator = CallableGenerator(lambda images: [r + "," + HOSTILE for r in brightness_reports(images)],
                                  GeneratorInfo(name="fake:hostile", channels=1))
    runs = {}
    for name, ineffective in (("first", {"Edema"}), ("second", {"Cardiomegaly"})):
        runs[name] = root / "runs" / name
        run_explainer(CyclicExplainer(generator, KeywordLabeler(), PaintingMaker(ineffective=ineffective),
                                      frame_threshold=95),
                      records, runs[name], batch_size=4, progress=False, run_settings={"generator": "<b>gen</b>"})
    run_page = write_run_report(runs["first"])
    comparison = write_comparison_report(runs, root / "runs" / "comparison.html")
    audit = audit_runs(runs, root / "audit")
    return {"run": run_page, "comparison": comparison, "audit": root / "audit" / "audit.html", "audit_data": audit}


@pytest.fixture(scope="module")
def browser():
    with open_browser() as page:
        yield page


def _open(browser, path):
    browser.errors.clear()
    browser.goto(path.resolve().as_uri())
    loaded = browser.evaluate(WAIT_FOR_IMAGES)
    assert loaded, f"{path.name} shows no image"
    broken = [src for src, width in loaded if not width]
    assert not broken, f"{path.name}: images that did not load: {broken}"
    return loaded


def _check_hostile_text_inert(browser, path):
    assert browser.evaluate("typeof window.__pwned") == "undefined", f"{path.name}: report text executed"
    assert browser.evaluate("document.scripts.length") == 1, f"{path.name}: only the page's own filter script may exist"
    text = browser.evaluate("document.body.innerText")
    assert "<script>window.__pwned = 1</script>" in text and 'onerror="window.__pwned = 2"' in text
    # the closing tags in the text must not end the page's containers early: every card/row stays in its table
    assert browser.evaluate("document.querySelectorAll('main .filterable').length") == browser.evaluate(
        "document.querySelectorAll('.filterable').length")


def _check_filter(browser, filter_name, value, expected):
    total = browser.evaluate(SHOWN)
    assert browser.evaluate(_select(filter_name, value)) == value
    assert browser.evaluate(SHOWN) == expected(browser)
    assert browser.evaluate(SHOWN) < total, f"filter {filter_name}={value} hid nothing"
    browser.evaluate(_select(filter_name, ""))
    assert browser.evaluate(SHOWN) == total


def _count(selector):
    return lambda browser: browser.evaluate(f"document.querySelectorAll({selector!r}).length")


def test_run_page_in_browser(pages, browser):
    _open(browser, pages["run"])
    _check_hostile_text_inert(browser, pages["run"])
    _check_filter(browser, "finding", "Cardiomegaly", _count(".filterable[data-finding='Cardiomegaly']"))
    _check_filter(browser, "verified", "no", _count(".filterable[data-verified='no']"))
    assert browser.evaluate("document.getElementById('shown-count').textContent").endswith("shown")
    assert browser.errors == [], browser.errors


def test_comparison_page_in_browser(pages, browser):
    _open(browser, pages["comparison"])
    _check_hostile_text_inert(browser, pages["comparison"])
    _check_filter(browser, "finding", "Edema", _count(".filterable[data-finding='Edema']"))
    _check_filter(browser, "agreement", "differ", _count(".filterable[data-agreement='differ']"))
    assert browser.errors == [], browser.errors


def test_audit_page_in_browser(pages, browser):
    _open(browser, pages["audit"])
    _check_hostile_text_inert(browser, pages["audit"])
    _check_filter(browser, "finding", "Cardiomegaly", _count(".filterable[data-finding='Cardiomegaly']"))
    _check_filter(browser, "agreement", "differ", _count(".filterable[data-agreement='differ']"))
    findings = browser.evaluate("Array.from(document.querySelectorAll('#audit-findings tbody tr')).map(r => r.dataset.finding)")
    assert findings == list(pages["audit_data"]["findings"])
    assert browser.errors == [], browser.errors
