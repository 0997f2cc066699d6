"""A huge PDF page is rendered scaled down to a bounded number of pixels, and the batch goes on
(a 14400 x 14400 pt page at 150 dpi once asked for 30000 x 30000 pixels, a MemoryError that lost
every page of the batch)."""

import json
import math
import os
import subprocess
import sys

import pypdfium2 as pdfium
import pytest

from vlmkit.data.page_store import PageStore
from vlmkit.data.pdf import MAX_PAGE_PIXELS, page_scale, render_to_store
from vlmkit.processing.images import DEFAULT_MAX_PIXELS

LARGEST_PDF_PAGE = 14400  # points: the largest page size PDF allows (200 inches)


def write_pdf(path, *sizes) -> None:
    """A PDF of blank pages, one per (width, height) in points."""
    pdf = pdfium.PdfDocument.new()
    for width, height in sizes:
        pdf.new_page(width, height)
    pdf.save(str(path))
    pdf.close()


def rendered_pixels(width_pt, height_pt, scale) -> int:
    return math.ceil(width_pt * scale) * math.ceil(height_pt * scale)  # PDFium rounds each side up


def test_stored_pages_stay_openable():
    assert MAX_PAGE_PIXELS <= DEFAULT_MAX_PIXELS


@pytest.mark.parametrize(
    "width, height, dpi, min_side",
    [
        (LARGEST_PDF_PAGE, LARGEST_PDF_PAGE, 150, 0),  # the page that once ran out of memory
        (LARGEST_PDF_PAGE, LARGEST_PDF_PAGE, 72, 0),
        (3, LARGEST_PDF_PAGE, 150, 2000),  # a strip whose min_side would blow it up
        (2383.9, 3370.4, 300, 0),  # A0 at 300 dpi, odd sizes
    ],
)
def test_page_scale_keeps_a_page_under_the_pixel_limit(width, height, dpi, min_side):
    scale = page_scale(width, height, dpi, min_side)
    assert rendered_pixels(width, height, scale) <= MAX_PAGE_PIXELS
    assert rendered_pixels(width, height, scale) > 0.99 * MAX_PAGE_PIXELS  # scaled down no further than needed
    assert page_scale(width, height, dpi, min_side, max_pixels=1000) * math.sqrt(width * height) <= math.sqrt(1000)


def test_page_scale_leaves_ordinary_pages_alone():
    assert page_scale(612, 792, dpi=150, min_side=0) == 150 / 72  # US letter
    assert page_scale(144, 72, dpi=72, min_side=144) == 2.0


def test_a_lower_limit_scales_down_and_says_so(tmp_path):
    write_pdf(tmp_path / "poster.pdf", (1000, 500))  # 1000 x 500 pixels at 72 dpi
    report = render_to_store([tmp_path / "poster.pdf"], tmp_path / "s.h5", dpi=72, workers=1, progress=False,
                             max_pixels=20_000)
    assert report.added == 1 and report.downscaled == ["poster.pdf#1"] and "1 scaled down" in report.summary()
    store = PageStore(tmp_path / "s.h5")
    width, height = store.image("poster.pdf#1").size
    assert width * height <= 20_000 and (width, height) == (200, 100)
    assert store.meta("poster.pdf#1")["dpi"] == pytest.approx(72 / 5, rel=1e-3)


def test_a_page_that_would_not_open_again_is_reported_and_the_batch_goes_on(tmp_path):
    write_pdf(tmp_path / "a.pdf", (144, 72), (500, 2), (72, 72))  # page 2: 500 x 2 pixels at 72 dpi
    report = render_to_store([tmp_path / "a.pdf"], tmp_path / "s.h5", dpi=72, workers=1, progress=False)
    assert report.added == 2 and len(report.failures) == 1
    assert report.failures[0].startswith(f"{tmp_path / 'a.pdf'}#2: the rendered page is not a usable image")
    assert "at least 4 pixels" in report.failures[0]
    assert sorted(PageStore(tmp_path / "s.h5").ids) == ["a.pdf#1", "a.pdf#3"]


RENDER = """
import json, resource, sys
# Bound the address space: without the pixel limit this page would take 3.6 GB and more.
resource.setrlimit(resource.RLIMIT_AS, (int(2.5 * 2**30), int(2.5 * 2**30)))
from vlmkit.data.pdf import render_to_store
from vlmkit.data.page_store import PageStore
report = render_to_store(sys.argv[1:-1], sys.argv[-1], dpi=150, workers=1, progress=False)
store = PageStore(sys.argv[-1])
print(json.dumps({"summary": report.summary(), "sizes": {i: list(store.image(i).size) for i in store.ids},
                  "downscaled": report.downscaled}))
"""


def test_a_huge_page_between_good_pdfs_is_scaled_down_and_the_good_pages_kept(tmp_path):
    write_pdf(tmp_path / "a.pdf", (144, 72), (144, 72))
    write_pdf(tmp_path / "huge.pdf", (LARGEST_PDF_PAGE, LARGEST_PDF_PAGE))
    write_pdf(tmp_path / "b.pdf", (72, 72))
    inputs = [str(tmp_path / name) for name in ("a.pdf", "huge.pdf", "b.pdf")]
    env = os.environ | {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", RENDER, *inputs, str(tmp_path / "s.h5")], capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["summary"].startswith("added 4 page(s), skipped 0 already stored, 0 failed")
    assert result["sizes"]["a.pdf#1"] == [300, 150] and result["sizes"]["b.pdf#1"] == [150, 150]
    width, height = result["sizes"]["huge.pdf#1"]
    assert width == height and MAX_PAGE_PIXELS * 0.99 < width * height <= MAX_PAGE_PIXELS
    assert result["downscaled"] == ["huge.pdf#1"]


def test_a_pdf_with_no_pages_is_reported_with_a_reason(tmp_path):
    import pypdfium2 as pdfium

    from vlmkit.data.pdf import load_problem

    pdfium.PdfDocument.new().save(str(tmp_path / "empty.pdf"))
    with pytest.raises(pdfium.PdfiumError) as refused:
        pdfium.PdfDocument(str(tmp_path / "empty.pdf"))
    assert "no pages" in load_problem(refused.value) and "Success" not in load_problem(refused.value)
