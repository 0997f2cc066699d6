"""`vlmkit docs render` and `add-images`: PDFs and image folders into a page store.

PDF pages are rendered with pypdfium2 (PDFium, the engine of Chrome's viewer) in worker
processes, a few pages per task, so one long PDF still spreads over every core. The
resolution is `dpi`, raised for small pages until their shorter side has `min_side` pixels
(slides and receipts would otherwise come out too small to read), and lowered for huge
pages (posters, engineering drawings: PDF allows 200 x 200 inches) until they fit in
`max_pixels` (MAX_PAGE_PIXELS by default), so that no page can exhaust memory; such pages are
listed in the report and marked `"downscaled": true` in their metadata. Each page's text layer,
when the PDF has one, goes into the page's metadata.

A file that cannot be read, or a page whose image `open_image` would refuse to read back (a strip
a few pixels high), is counted and reported, never fatal to the batch; pages already
in the store are skipped, so re-running after an interruption continues where it stopped.
Page ids are `NAME#PAGE` (PAGE from 1), NAME being the file's path relative to the folder
given (or its file name when the file was given itself).
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import pypdfium2 as pdfium
from tqdm import tqdm

from vlmkit.data.page_store import PageStoreWriter
from vlmkit.data.workers import worker_pool
from vlmkit.errors import DataError
from vlmkit.processing.images import open_image

# Rendered pixels per page, at most: 5000 x 5000 (A1 at 150 dpi fits; 100 MB as the renderer's
# bitmap). Under processing.images.DEFAULT_MAX_PIXELS, so that every stored page opens again.
MAX_PAGE_PIXELS = 25_000_000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
PAGES_PER_TASK = 8


@dataclass
class Report:
    added: int = 0
    skipped: int = 0  # already in the store
    failures: list[str] = field(default_factory=list)  # "file: problem" (or "file#page: problem")
    downscaled: list[str] = field(default_factory=list)  # ids of pages rendered below the dpi asked for

    def summary(self) -> str:
        text = f"added {self.added} page(s), skipped {self.skipped} already stored, {len(self.failures)} failed"
        if self.downscaled:
            text += (f"; {len(self.downscaled)} scaled down below the dpi asked for, to fit the pixel limit "
                     f"(the first: {self.downscaled[0]})")
        return text + "".join(f"\n  failed: {f}" for f in self.failures)


def find_files(inputs: list[str | Path], suffixes: tuple[str, ...]) -> list[tuple[Path, str]]:
    """(path, name) of every file with one of `suffixes`, in a stable order."""
    found = []
    for given in map(Path, inputs):
        if given.is_dir():
            files = sorted(p for p in given.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
            found += [(p, p.relative_to(given).as_posix()) for p in files]
        elif given.is_file():
            found.append((given, given.name))
        else:
            raise DataError("no such file or folder", given)
    return found


def page_scale(width_pt: float, height_pt: float, dpi: float, min_side: int,
               max_pixels: int = MAX_PAGE_PIXELS) -> float:
    """Pixels per PDF point: dpi / 72, raised so that the shorter side gets at least `min_side` pixels,
    then lowered (if need be) so that the page has at most `max_pixels` pixels (0: no limit)."""
    scale = dpi / 72
    shorter = min(width_pt, height_pt)
    if min_side and shorter > 0:
        scale = max(scale, min_side / shorter)
    if max_pixels and width_pt * height_pt * scale**2 > max_pixels:
        scale = math.sqrt(max_pixels / (width_pt * height_pt))
        while math.ceil(width_pt * scale) * math.ceil(height_pt * scale) > max_pixels:  # PDFium rounds sides up
            scale *= 0.999
    return scale


def load_problem(err: pdfium.PdfiumError) -> str:
    """Why PDFium could not open a document. It refuses one with no pages without naming an error
    ("PDFium: Success", error code 0), which would tell the user nothing."""
    if getattr(err, "err_code", None) == 0:
        return "PDFium gives no reason; a PDF with no pages is refused this way"
    return str(err)


def _render_pages(task: tuple) -> list[tuple[int, bytes | None, dict | str]]:
    """Worker: (page number, PNG bytes, metadata) per page, or (page number, None, problem)."""
    path, pages, dpi, min_side, max_pixels = task
    out = []
    try:
        pdf = pdfium.PdfDocument(str(path))
    except pdfium.PdfiumError as err:
        return [(number, None, f"cannot open the PDF ({load_problem(err)})") for number in pages]
    try:
        for number in pages:
            try:
                page = pdf[number - 1]
                width, height = page.get_size()
                scale = page_scale(width, height, dpi, min_side, max_pixels)
                image = page.render(scale=scale).to_pil().convert("RGB")
                text = page.get_textpage().get_text_range().strip()
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                open_image(buffer.getvalue(), decode=False)  # a page that could not be read back is not stored
                meta = {"source": str(path), "page": number, "width": image.width, "height": image.height,
                        "dpi": round(scale * 72, 2), "text": text}
                if scale < page_scale(width, height, dpi, min_side, max_pixels=0):
                    meta["downscaled"] = True
                out.append((number, buffer.getvalue(), meta))
            except DataError as err:
                out.append((number, None, f"the rendered page is not a usable image ({err.problem})"))
            except (pdfium.PdfiumError, ValueError, OSError) as err:
                out.append((number, None, f"cannot render the page ({err})"))
    finally:
        pdf.close()
    return out


def render_to_store(inputs: list[str | Path], out: str | Path, dpi: float = 150, min_side: int = 0,
                    workers: int | None = None, progress: bool = True,
                    max_pixels: int = MAX_PAGE_PIXELS) -> Report:
    """Render every page of the PDFs in `inputs` (files or folders) into the store `out`, each page
    at most `max_pixels` pixels (scaled down to fit: see the module's docstring)."""
    report = Report()
    with PageStoreWriter(out) as store:
        tasks = []
        for path, name in find_files(inputs, (".pdf",)):
            try:
                pdf = pdfium.PdfDocument(str(path))
                n_pages = len(pdf)
                pdf.close()
            except pdfium.PdfiumError as err:
                report.failures.append(f"{path}: not a readable PDF ({load_problem(err)})")
                continue
            todo = [n for n in range(1, n_pages + 1) if f"{name}#{n}" not in store]
            report.skipped += n_pages - len(todo)
            tasks += [((path, todo[i:i + PAGES_PER_TASK], dpi, min_side, max_pixels), name)
                      for i in range(0, len(todo), PAGES_PER_TASK)]
        bar = tqdm(total=sum(len(t[0][1]) for t in tasks), desc="render", unit="page", disable=not progress)
        workers = max(1, min(workers or os.cpu_count() or 1, len(tasks)))
        pool = worker_pool(workers) if workers > 1 else None
        try:
            jobs = [task for task, _ in tasks]
            results = pool.map(_render_pages, jobs) if pool else map(_render_pages, jobs)
            for (task, name), pages in zip(tasks, results):
                for number, image, meta in pages:
                    if image is None:
                        report.failures.append(f"{task[0]}#{number}: {meta}")
                    else:
                        store.add(f"{name}#{number}", image, meta)
                        report.added += 1
                        if meta.get("downscaled"):
                            report.downscaled.append(f"{name}#{number}")
                    bar.update(1)
        finally:
            if pool:
                pool.shutdown()
            bar.close()
    return report


def add_images(inputs: list[str | Path], out: str | Path, progress: bool = True) -> Report:
    """Store every image file in `inputs` (files or folders) as is, keyed by its name."""
    report = Report()
    with PageStoreWriter(out) as store:
        for path, name in tqdm(find_files(inputs, IMAGE_SUFFIXES), desc="images", unit="image", disable=not progress):
            if name in store:
                report.skipped += 1
                continue
            data = path.read_bytes()
            try:
                image = open_image(data, decode=False)
            except DataError as err:
                report.failures.append(f"{path}: {err.problem}")
                continue
            store.add(name, data, {"source": str(path), "page": 1, "width": image.width, "height": image.height})
            report.added += 1
    return report
