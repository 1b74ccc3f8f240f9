"""The report of a real small run (the four callbacks on one model) rendered in headless
Chromium: every image decodes, every section is there, no console error, nothing wider than the
window; plus a screenshot (``REPORT_SCREENSHOT=docs/report_screenshot.png`` keeps it).

Skipped when no ``chromium`` / ``chromium-browser`` binary is installed
(Debian: ``apt-get install -y chromium``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import pytest

from lightning_memo.report import report
from tests.test_report import PNG, make_run

pytest.importorskip("matplotlib")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium / chromium-browser binary on PATH (apt-get install -y chromium)",
)
WIDTH = 1200

# Injected into a copy of the page (the page itself has no script): after load, a marker element
# with the number of images, of broken ones (naturalWidth 0), the sections and the page width.
CHECK = """<script>
window.addEventListener('load', function () {
  var imgs = document.images, broken = 0;
  for (var i = 0; i < imgs.length; i++) {
    if (!imgs[i].complete || imgs[i].naturalWidth === 0) broken++;
  }
  var secs = Array.prototype.map.call(document.querySelectorAll('section'),
    function (s) { return s.className; }).join(',');
  var d = document.createElement('div');
  d.id = 'lm-check';
  d.setAttribute('data-images', imgs.length);
  d.setAttribute('data-broken', broken);
  d.setAttribute('data-sections', secs);
  d.setAttribute('data-scroll-width', document.documentElement.scrollWidth);
  document.body.appendChild(d);
  console.log('lm-check done');
});
</script>"""


def chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM,
        "--headless",
        "--disable-gpu",
        "--no-sandbox",
        "--hide-scrollbars",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("browser_run"))
    make_run(root)
    t0 = time.perf_counter()
    path = report(root)
    return path, time.perf_counter() - t0


def test_page_renders_in_chromium(page, tmp_path):
    path, seconds = page
    assert seconds < 20
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert "<script" not in text.lower()
    check = tmp_path / "check.html"
    check.write_text(text.replace("</body>", CHECK + "</body>"), encoding="utf-8")
    res = chromium(
        tmp_path,
        "--virtual-time-budget=10000",
        f"--window-size={WIDTH},2000",
        "--dump-dom",
        check.as_uri(),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    m = re.search(r'<div id="lm-check"([^>]*)>', res.stdout)
    assert m, "the injected check never ran: " + res.stderr[-2000:]
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', m.group(1)))
    assert attrs["sections"] == "memorization,tracin,influence,erasure"
    assert int(attrs["images"]) > 20  # charts and sample thumbnails
    assert attrs["broken"] == "0"
    assert int(attrs["scroll-width"]) <= WIDTH
    assert "lm-check done" in res.stderr  # the console is captured ...
    console = [ln for ln in res.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    errors = [ln for ln in console if "lm-check done" not in ln]
    assert errors == []  # ... and says nothing else
    assert not re.search(r"net::ERR_|Not allowed to load", res.stderr)


def test_screenshot(page, tmp_path):
    path, _ = page
    shot = tmp_path / "shot.png"
    res = chromium(
        tmp_path, f"--window-size={WIDTH},2200", f"--screenshot={shot}", "file://" + path
    )
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    data = shot.read_bytes()
    assert data.startswith(PNG) and len(data) > 20_000  # not a blank page
    keep = os.environ.get("REPORT_SCREENSHOT")
    if keep:
        try:  # a palette image is a third of the size, same look
            from PIL import Image

            Image.open(shot).convert("RGB").quantize(colors=128).save(keep, optimize=True)
        except ImportError:
            shutil.copyfile(shot, keep)
