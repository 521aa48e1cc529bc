"""report.html of `cnnmod reproduce`, rendered by a real browser: headless Chromium (Debian's `chromium`) loads a
report built from a small fake results.json, and a script in a copy of the page reports, once it has loaded,
whether every table and every image is visible and every image decoded. Skipped where Chromium is absent."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from cnnmod.paper.html import render_report
from fixtures.reproduction import fake_results

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)

CHECK = """<script>
window.addEventListener("load", () => {
  const shown = (el) => {
    const box = el.getBoundingClientRect(), style = getComputedStyle(el);
    return box.width > 0 && box.height > 0 && style.visibility !== "hidden" && style.display !== "none";
  };
  const found = {
    images: [...document.images].map((i) => ({alt: i.alt, decoded: i.complete && i.naturalWidth > 0,
                                              width: i.naturalWidth, shown: shown(i)})),
    tables: [...document.querySelectorAll("table")].map((t) => ({rows: t.rows.length, shown: shown(t)})),
  };
  const out = document.createElement("pre");
  out.id = "cnnmod-check";
  out.textContent = JSON.stringify(found);
  document.body.appendChild(out);
});
</script>"""


class _Count(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[str, int] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] = self.tags.get(tag, 0) + 1


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> str:
    return render_report(fake_results())


def test_the_report_is_one_file_with_the_papers_figures_beside_ours(report: str) -> None:
    counted = _Count()
    counted.feed(report)
    assert counted.tags["img"] >= 6  # four plots of the modules, two of Figure 6
    assert counted.tags["table"] >= 12
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'<img[^>]* src="([^"]+)"', report))
    assert "<link" not in report and "<script" not in report  # nothing to fetch, nothing to run
    for section in ("table1", "table2", "table3", "table4", "table5", "table6", "figure6"):
        assert f'<section id="{section}">' in report
    for figure in ("87.1", "99.5", "26.6", "50.4", "23.7x", "3800"):  # the paper's, in Tables 1, 6 and Figure 6
        assert figure in report
    assert "data not here" in report and "not run here" in report  # CIFAR-100 without its data; compact reuse


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_every_table_and_image_is_visible_in_chromium(report: str, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    page.write_text(report.replace("</body>", CHECK + "</body>"))
    run = subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
                          "--window-size=1280,2000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=180)
    match = re.search(r'<pre id="cnnmod-check">(.*?)</pre>', run.stdout, re.S)
    assert match, f"chromium exit {run.returncode}: {run.stderr[-2000:]}"
    found = json.loads(html.unescape(match.group(1)))
    counted = _Count()
    counted.feed(report)
    assert len(found["images"]) == counted.tags["img"]
    assert len(found["tables"]) == counted.tags["table"]
    for image in found["images"]:
        assert image["decoded"] and image["width"] >= 300 and image["shown"], image
    for table in found["tables"]:
        assert table["shown"] and table["rows"] >= 2, table
