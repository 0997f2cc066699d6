"""PDF rendering and image folders into a page store: dpi and min-side, text layers, failures counted, resumable."""

import pytest
from PIL import Image

from vlmkit.cli import main
from vlmkit.data.page_store import PageStore
from vlmkit.data.pdf import add_images, page_scale, render_to_store
from vlmkit.errors import DataError


def write_text_pdf(path, text: str, width: int = 200, height: int = 100) -> None:
    """A one-page PDF with a real text layer (Helvetica), written by hand."""
    stream = f"BT /F1 18 Tf 20 40 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {width} {height}] /Contents 4 0 R "
               "/Resources << /Font << /F1 5 0 R >> >> >>".encode(),
               b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    path.write_bytes(bytes(out))


@pytest.fixture
def pdf_dir(tmp_path):
    folder = tmp_path / "pdfs"
    (folder / "sub").mkdir(parents=True)
    pages = [Image.new("RGB", (144, 72), c) for c in ("red", "green", "blue")]
    pages[0].save(folder / "slides.pdf", "PDF", resolution=72, save_all=True, append_images=pages[1:])  # 2 x 1 inch
    write_text_pdf(folder / "sub" / "letter.pdf", "Quarterly report")
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not really a pdf")
    return folder


def test_render_a_folder(pdf_dir, tmp_path):
    store_path = tmp_path / "pages.h5"
    report = render_to_store([pdf_dir], store_path, dpi=72, workers=2, progress=False)
    assert report.added == 4 and len(report.failures) == 1 and "broken.pdf" in report.failures[0]
    store = PageStore(store_path)
    assert sorted(store.ids) == ["slides.pdf#1", "slides.pdf#2", "slides.pdf#3", "sub/letter.pdf#1"]
    pixel = store.image("slides.pdf#2").getpixel((10, 10))
    assert max(abs(a - b) for a, b in zip(pixel, (0, 128, 0))) <= 3  # PIL embeds the pages as JPEG
    assert store.image("slides.pdf#1").size == (144, 72)  # 72 dpi: one pixel per point
    assert "Quarterly report" in store.meta("sub/letter.pdf#1")["text"]
    assert store.meta("slides.pdf#3")["page"] == 3

    again = render_to_store([pdf_dir], store_path, dpi=72, workers=1, progress=False)
    assert (again.added, again.skipped) == (0, 4)  # resumable: pages already stored are skipped


def test_min_side_raises_the_resolution_of_small_pages(pdf_dir, tmp_path):
    render_to_store([pdf_dir / "slides.pdf"], tmp_path / "p.h5", dpi=72, min_side=144, workers=1, progress=False)
    assert PageStore(tmp_path / "p.h5").image("slides.pdf#1").size == (288, 144)
    assert page_scale(612, 792, dpi=150, min_side=100) == 150 / 72  # large enough already: dpi rules


def test_cli_render_reports_failures_without_stopping(pdf_dir, tmp_path, capsys):
    assert main(["docs", "render", str(pdf_dir), "--out", str(tmp_path / "s.h5"), "--workers", "1"]) == 0
    assert "added 4 page(s), skipped 0 already stored, 1 failed" in capsys.readouterr().out
    assert main(["docs", "render", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "s.h5")]) == 2


def test_add_images(tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    Image.new("RGB", (30, 40), "white").save(folder / "a.png")
    Image.new("RGB", (50, 20), "black").save(folder / "b.jpg")
    (folder / "c.png").write_bytes(b"garbage")
    (folder / "notes.txt").write_text("not an image")
    report = add_images([folder], tmp_path / "s.h5", progress=False)
    assert report.added == 2 and len(report.failures) == 1 and "c.png" in report.failures[0]
    store = PageStore(tmp_path / "s.h5")
    assert store.meta("b.jpg")["width"] == 50 and store.image("a.png").size == (30, 40)
    with pytest.raises(DataError, match="no such file or folder"):
        add_images([tmp_path / "missing"], tmp_path / "s.h5")
    assert len(PageStore(tmp_path / "s.h5")) == 2  # the failed call left the store as it was
