"""The conformance HTML page as a person sees it: opened in headless Chromium (Debian's `chromium`),
a failing run's first screen names the failing suite and where the divergence starts, and the page
stays short (one block per place a divergence starts, not one per failing case)."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nemoh.conformance.runner import run_conformance
from nemoh.output import write_html

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREEN = (1280, 900)
MEASURE = ("<script>const h = document.querySelector('.headline');"
           "document.title = [document.body.scrollHeight, h ? Math.round(h.getBoundingClientRect().bottom) : -1,"
           " h ? h.innerText : ''].join('|');</script>")


@pytest.fixture(scope="module")
def failing_page(tmp_path_factory):
    out = tmp_path_factory.mktemp("html")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))  # the example backend declines fp16
    report = run_conformance("tiny-dense", ["broken_backends:GatedNormUngrouped", "wrapped_backend:WrappedTorch"],
                             ["float32", "float16"], ["logits", "weights"], progress=False, deviations=False)
    assert report["summary"]["counts"]["FAIL"] >= 2
    write_html(report, out / "report.html", "conformance-html")
    return report, out / "report.html"


def look(page, tmp_path) -> tuple[int, int, str]:
    """(page height, bottom of the headline, its text) as Chromium lays the page out at 1280x900."""
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", MEASURE + "</body>"), encoding="utf-8")
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                          f"--window-size={SCREEN[0]},{SCREEN[1]}", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    title = html.unescape(re.search(r"<title>(.*?)</title>", dom, re.S).group(1))
    height, bottom, text = title.split("|", 2)
    return int(height), int(bottom), text


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_first_screen_names_the_failing_suite_and_where_it_starts(failing_page, tmp_path):
    report, page = failing_page
    height, bottom, headline = look(page, tmp_path)
    first = report["summary"]["failure_groups"][0]
    assert first["where"].startswith("layer ") and "gated_norm" in first["where"]
    assert 0 < bottom <= SCREEN[1], "the headline must be on the first screen"
    assert "logits" in headline and first["where"] in headline
    # several failing cases share one place: one localisation block, so the page stays short
    assert len(first["cases"]) >= 2 and height < 6 * SCREEN[1], height
    shot = tmp_path / "first-screen.png"
    subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile2'}",
                    f"--window-size={SCREEN[0]},{SCREEN[1]}", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.stat().st_size > 10_000  # a real rendering, not a blank page


def test_page_is_self_contained_and_shows_why_cases_did_not_run(failing_page):
    report, page = failing_page
    text = page.read_text(encoding="utf-8")
    assert "<script" not in text and "http://" not in text and "https://" not in text
    localised = [g for g in report["summary"]["failure_groups"] if (g["localisation"] or {}).get("found")]
    assert text.count("Each layer run in isolation") == len(localised) >= 1
    visible = re.sub(r"<details.*?</details>", "", text, flags=re.S)  # what shows without expanding anything
    assert "wrapped-torch runs float64, float32, bfloat16 only, not float16" in visible
    assert "/tmp/" not in visible  # no temporary paths on the page's face


def test_console_table_fits_120_columns_and_says_each_reason_once(failing_page, capsys):
    from nemoh.cli import print_table

    report, _ = failing_page
    print_table(report)
    out = capsys.readouterr().out.splitlines()
    table = [line for line in out if not line.startswith(("FAIL ", "not run ", "never finished "))]
    assert table and max(map(len, table)) <= 120, max(table, key=len)
    not_run = [line for line in out if line.startswith("not run ")]
    assert len(not_run) == 1 and "wrapped-torch runs float64, float32, bfloat16 only, not float16" in not_run[0]
    assert sum(line.startswith("FAIL x") for line in out) == len(report["summary"]["failure_groups"])
