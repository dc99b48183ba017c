"""The report in a real browser: headless Chromium opens ``report.html`` of a hand-written run
folder (tests/synthetic_runs.py), with every folded section opened; every image loads, nothing
is wider than a 1280 px window, the page is not blank, and ``report.pdf`` was printed.

Skipped, with the reason, when no Chromium is installed (CI installs Debian's ``chromium``).
"""

from __future__ import annotations

import html
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from synthetic_runs import make_run_folder
from test_epsilon_figures import write_epsilon_folder

from analysis.report import browser_command, find_browser, write_report

BROWSER = find_browser()
pytestmark = pytest.mark.skipif(
    BROWSER is None,
    reason="no headless Chromium on PATH (chromium, chromium-browser, google-chrome); "
    "install Debian's chromium, as .ci/run does",
)
WIDTH = 1280

# opens every <details>, loads every image, then reports what the page looks like
CHECK = """<script>
document.querySelectorAll('details').forEach(d => { d.open = true; });
document.querySelectorAll('img').forEach(i => { i.loading = 'eager'; });
function check() {
  const imgs = Array.from(document.images);
  if (!imgs.every(i => i.complete)) { setTimeout(check, 50); return; }
  const result = {
    images: imgs.length,
    broken: imgs.filter(i => !(i.naturalWidth > 0 && i.naturalHeight > 0))
                .map(i => i.getAttribute('src')),
    scrollWidth: document.documentElement.scrollWidth,
    innerWidth: window.innerWidth,
    widest: Math.max(...Array.from(document.querySelectorAll('body *'))
                     .map(e => e.getBoundingClientRect().right)),
    font: document.fonts.check("12px 'DejaVu Sans'"),
  };
  const out = document.createElement('pre');
  out.id = 'check-result';
  out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
}
window.addEventListener('load', check);
</script>"""


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    assert BROWSER is not None
    cmd = browser_command(BROWSER, f"--window-size={WIDTH},1000", *args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = make_run_folder(tmp_path_factory.mktemp("browser"))
    # one experiment with a many-model evaluation: its two epsilon figures are on the page too
    write_epsilon_folder(run / "runs" / "02_ga_unlr0.1" / "epsilon")
    return write_report(run, "cpu", features=False, fig_formats=("png", "svg"), quiet=True)


def page_state(page: Path) -> dict[str, Any]:
    """The CHECK script's findings on a copy of the page (same folder: same relative paths)."""
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text().replace("</body>", CHECK + "</body>"))
    done = chromium("--dump-dom", "--virtual-time-budget=30000", probe.as_uri())
    found = re.search(r'<pre id="check-result">(.*?)</pre>', done.stdout, re.S)
    assert found, done.stderr[-2000:]
    return json.loads(html.unescape(found.group(1)))


def test_every_image_loads_and_nothing_overflows(page: Path) -> None:
    state = page_state(page)
    in_html = re.findall(r"<img ", page.read_text())
    # 4 paper figures, 3 per experiment (+ 2 epsilon figures) and 3 per seed: 3 experiments
    # x 2 seeds
    assert state["images"] == len(in_html) == 4 + 3 * 3 + 2 + 3 * 6
    assert state["broken"] == []
    assert state["innerWidth"] == WIDTH
    assert state["scrollWidth"] <= WIDTH and state["widest"] <= WIDTH, state
    assert state["font"] is True  # the figures' font is the page's font


def test_screenshot_shows_the_page(page: Path, tmp_path: Path) -> None:
    shot = tmp_path / "shot.png"
    done = chromium(f"--screenshot={shot}", page.as_uri())
    assert shot.is_file(), done.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (WIDTH, 1000)
        px = np.asarray(im.convert("L"))
    # text and figures: many dark pixels on a light page, in the first screen already
    assert (px < 100).mean() > 0.005 and (px > 200).mean() > 0.5
    assert len(np.unique(px)) > 50


def test_pdf_printed(page: Path) -> None:
    pdf = page.with_name("report.pdf").read_bytes()
    assert pdf.startswith(b"%PDF")
    # the summary and four figures do not fit on one page; folded sections are not printed
    assert len(re.findall(rb"/Type\s*/Page[^s]", pdf)) >= 3


def test_the_check_sees_broken_images_and_overflow(page: Path) -> None:
    # the same probe on a page with a missing figure and an element wider than the window
    bad = page.with_name("bad.html")
    text = page.read_text().replace('src="plots/paper/gap_vs_cost.svg"', 'src="plots/missing.svg"')
    bad.write_text(text.replace("</body>", '<div style="width: 2000px">wide</div></body>'))
    state = page_state(bad)
    assert state["broken"] == ["plots/missing.svg"]
    assert state["scrollWidth"] > WIDTH
