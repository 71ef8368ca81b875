"""The report in a real browser (Chromium through Playwright), from file:// URLs: no errors, no failed or network
requests, every picture loads, and the units index sorts and filters. Screenshots go to $CONVLENS_TEST_ARTIFACTS
(default: the test's tmp_path).

Skipped only when Chromium is not installed; a missing Python ``playwright`` fails (it is in the dev extra)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from convlens.report.site import build_report
from test_report import CNN_VISUALISED, LATENT_VISUALISED, build_run_fixture

CHROMIUM = "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else shutil.which("chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]

# .ci/run installs Chromium, so CI always runs these; the skip is for a machine without it
requires_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (no /usr/bin/chromium, no chromium on PATH)"
)
pytestmark = requires_chromium

BROKEN_IMAGES = "Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)"
VISIBLE_ROWS = """Array.from(document.querySelectorAll('#unit-table tbody tr')).filter(r => !r.hidden)
    .map(r => ({group: r.dataset.group, unit: Number(r.dataset.unit), dead: r.dataset.dead,
                visualised: r.dataset.visualised, search: r.dataset.search,
                frequency: r.querySelector('td:nth-child(4)').dataset.sort}))"""

COLUMN_VALUES = """key => {
    const index = Array.from(document.querySelectorAll('#unit-table thead th')).findIndex(h => h.dataset.key === key);
    return Array.from(document.querySelectorAll('#unit-table tbody tr')).filter(r => !r.hidden).map(r => {
        const cell = r.cells[index];
        return cell.hasAttribute('data-sort') ? cell.dataset.sort : cell.textContent.trim();
    });
}"""


def watched_page(browser, problems: list[str], requests: list[str]):
    """A new page that adds console errors, page errors and failed requests to ``problems`` and every requested
    URL to ``requests``."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} ({r.failure})"))
    page.on("request", lambda r: requests.append(r.url))
    return page


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    run = build_run_fixture(tmp_path_factory.getbasetemp() / "report-run")
    out = tmp_path_factory.mktemp("browser-site")
    build_report(run, out)
    return out


def test_the_report_in_chromium(site, tmp_path):
    from playwright.sync_api import sync_playwright

    artifacts = Path(os.environ.get("CONVLENS_TEST_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    requests: list[str] = []
    shots: list[Path] = []

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = watched_page(browser, problems, requests)

            def visit(name: str) -> None:
                page.goto((site / name).as_uri())
                page.wait_for_load_state("load")
                assert page.evaluate(BROKEN_IMAGES) == [], f"pictures that did not load on {name}"

            def shoot(name: str) -> None:
                path = artifacts / f"report-{name}.png"
                page.screenshot(path=str(path), full_page=True)
                shots.append(path)

            visit("index.html")
            shoot("overview")
            assert page.locator("[data-metric=foreground-precision]").count() >= 2

            visit("compare.html")
            shoot("compare")
            assert page.locator("#side-by-side tbody tr").count() == max(len(CNN_VISUALISED), len(LATENT_VISUALISED))

            visit("units.html")
            rows = page.evaluate(VISIBLE_ROWS)
            total = len(rows)
            assert page.inner_text("#unit-count") == f"{total} of {total} shown"
            page.click("th[data-key=frequency] button")  # numbers: the largest first
            frequencies = [float(r["frequency"]) for r in page.evaluate(VISIBLE_ROWS)]
            assert frequencies == sorted(frequencies, reverse=True) and frequencies[0] > frequencies[-1]
            assert page.get_attribute("th[data-key=frequency]", "aria-sort") == "descending"
            page.click("th[data-key=frequency] button")
            assert [float(r["frequency"]) for r in page.evaluate(VISIBLE_ROWS)] == sorted(frequencies)
            assert page.get_attribute("th[data-key=frequency]", "aria-sort") == "ascending"
            page.click("th[data-key=unit] button")  # unit and rank: from the smallest (rank 1) first
            units = [r["unit"] for r in page.evaluate(VISIBLE_ROWS)]
            assert units == sorted(units) and units.index(9) < units.index(10)  # numbers, not text
            page.click("th[data-key=unit] button")
            assert [r["unit"] for r in page.evaluate(VISIBLE_ROWS)] == sorted(units, reverse=True)
            page.click("th[data-key=auroc] button")
            aurocs = page.evaluate(COLUMN_VALUES, "auroc")
            scored = [float(value) for value in aurocs if value.strip()]
            assert len(set(scored)) > 1 and scored == sorted(scored, reverse=True)
            assert aurocs[: len(scored)] == [value for value in aurocs if value.strip()]  # units without one last
            page.click("th[data-key=group] button")  # text: from A
            groups = page.evaluate(COLUMN_VALUES, "group")
            assert len(set(groups)) > 1 and groups == sorted(groups, key=str.lower)
            assert page.get_attribute("th[data-key=group]", "aria-sort") == "ascending"

            page.select_option("#group-filter", "topk")
            shown = page.evaluate(VISIBLE_ROWS)
            assert {r["group"] for r in shown} == {"topk"}
            assert page.inner_text("#unit-count") == f"{len(shown)} of {total} shown"
            page.check("#hide-dead")
            alive = page.evaluate(VISIBLE_ROWS)
            assert alive and len(alive) < len(shown) and {r["dead"] for r in alive} == {"false"}
            page.fill("#unit-filter", "shape=star")
            starred = page.evaluate(VISIBLE_ROWS)
            assert starred and len(starred) < len(alive) and all("shape=star" in r["search"] for r in starred)
            shoot("units-filtered")
            page.fill("#unit-filter", "")
            page.uncheck("#hide-dead")
            page.select_option("#group-filter", "")
            page.check("#visualised-only")
            visualised = page.evaluate(VISIBLE_ROWS)
            assert sorted((r["group"], r["unit"]) for r in visualised) == sorted(
                [("cnn", u) for u in CNN_VISUALISED] + [("topk", u) for u in LATENT_VISUALISED]
            )
            assert page.evaluate(BROKEN_IMAGES) == []

            unit = CNN_VISUALISED[0]
            visit(f"units/cnn-{unit}.html")
            assert page.locator("figure img").count() >= 3
            shoot(f"cnn-{unit}")
            page.click("a[rel=next]")
            page.wait_for_load_state("load")
            assert page.url.endswith(f"units/cnn-{unit + 1}.html")
            page.click("text=index of units")
            page.wait_for_load_state("load")
            assert page.url.endswith("units.html")
        finally:
            browser.close()

    for path in shots:
        print(f"screenshot: {path}")
    assert problems == []
    assert [url for url in requests if not url.startswith(("file://", "data:"))] == []
    assert all(path.is_file() and path.stat().st_size > 1000 for path in shots)
