"""PDF rendering: pages/s of `vlmkit docs render` with 1 and 2 worker processes, against pdftoppm.

    python benchmarks/pdf_render.py [--small] [--pdfs 4] [--pages 30] [--dpi 150] [--from DIR]

The PDFs are made here with matplotlib's PDF backend (nothing is downloaded): A4 report
pages with a title, paragraphs of real (vector) text in an embedded font, and a bar chart.
`--from DIR` renders the PDFs of DIR instead, for example real manuals
(`python -m examples.real_pdfs.fetch --out data/real-pdfs`, then `--from data/real-pdfs/train`).
vlmkit renders them with `vlmkit.data.pdf.render_to_store` -- what `vlmkit docs render`
runs: PDFium, PNG encoding, the text layer, and writing the page store. The reference is
poppler's `pdftoppm -png -r DPI` on the same pages at the same dpi: one process over all
PDFs, and two processes side by side (each taking half the PDFs) for the 2-worker figure.
pdftoppm renders and writes PNG files only, so it does a little less work than vlmkit.
Target: 2 workers >= 1.7x one worker. Without pdftoppm (Debian: `apt-get install
poppler-utils`; `make bench` installs it when it can) those references are left empty.
Expected time here: about 2 minutes full size, 20 s small.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common

from vlmkit.data.pdf import render_to_store
from vlmkit.data.scenes import WORDS


def make_pdfs(out: Path, n_pdfs: int, pages: int) -> list[Path]:
    """`n_pdfs` multi-page report PDFs of vector text and charts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    rng = random.Random(0)
    paths = []
    for d in range(n_pdfs):
        path = out / f"report-{d}.pdf"
        with PdfPages(path) as pdf:
            for p in range(pages):
                fig = plt.figure(figsize=(8.27, 11.69))  # A4
                fig.text(0.08, 0.94, f"Report {d}, page {p + 1}: {rng.choice(WORDS)} and {rng.choice(WORDS)}",
                         fontsize=16, weight="bold")
                lines = [" ".join(rng.choice(WORDS) for _ in range(14)) for _ in range(36)]
                fig.text(0.08, 0.52, "\n".join(lines), fontsize=9, va="bottom", linespacing=1.5)
                ax = fig.add_axes((0.12, 0.08, 0.76, 0.36))
                ax.bar(range(12), [rng.uniform(1, 10) for _ in range(12)], color=f"C{p % 10}")
                ax.set_title(f"Figure {p + 1}")
                pdf.savefig(fig)
                plt.close(fig)
        paths.append(path)
    return paths


def page_count(pdf: Path) -> int:
    import pypdfium2

    return len(pypdfium2.PdfDocument(str(pdf)))


def time_vlmkit(pdfs: Path, work: Path, dpi: float, workers: int) -> float:
    """Seconds for `render_to_store` to put every page of `pdfs` (a file or a folder) into a new store."""
    store = work / f"store-{workers}.h5"
    start = time.perf_counter()
    report = render_to_store([pdfs], store, dpi=dpi, workers=workers, progress=False)
    seconds = time.perf_counter() - start
    if report.failures:
        raise RuntimeError(f"vlmkit failed on {len(report.failures)} page(s): {report.failures[0]}")
    store.unlink()
    return seconds


def time_pdftoppm(pdfs: list[Path], work: Path, dpi: float, processes: int) -> float:
    """Seconds for pdftoppm to render every page, with the PDFs split over `processes` side by side."""
    out = work / f"ppm-{processes}"
    out.mkdir()
    lanes = [pdfs[i::processes] for i in range(processes)]

    def lane(files: list[Path]) -> None:
        for f in files:
            subprocess.run(["pdftoppm", "-png", "-r", f"{dpi:g}", str(f), str(out / f.stem)], check=True)

    start = time.perf_counter()
    with ThreadPoolExecutor(processes) as pool:  # threads that each wait on their own pdftoppm processes
        list(pool.map(lane, lanes))
    seconds = time.perf_counter() - start
    shutil.rmtree(out)
    return seconds


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--pdfs", type=int, help="PDF files (default 4; small 2)")
    parser.add_argument("--pages", type=int, help="pages per PDF (default 30; small 6)")
    parser.add_argument("--dpi", type=float, default=150)
    parser.add_argument("--from", dest="source", type=Path, help="render the PDFs of this folder instead")
    args = parser.parse_args()
    started = time.perf_counter()
    n_pdfs, pages = args.pdfs or (2 if args.small else 4), args.pages or (6 if args.small else 30)
    pdftoppm = shutil.which("pdftoppm")
    with tempfile.TemporaryDirectory(prefix="vlmkit-pdf-") as tmp:
        pdf_dir, work = Path(tmp) / "pdfs", Path(tmp) / "work"
        work.mkdir()
        if args.source:
            pdf_dir, pdfs = args.source, sorted(args.source.glob("*.pdf"))
            n_pdfs, total = len(pdfs), sum(page_count(pdf) for pdf in pdfs)
        else:
            pdf_dir.mkdir()
            pdfs = make_pdfs(pdf_dir, n_pdfs, pages)
            total = n_pdfs * pages
        time_vlmkit(pdfs[0], work, args.dpi, 1)  # warm-up: file cache, first imports
        seconds = {w: time_vlmkit(pdf_dir, work, args.dpi, w) for w in (1, 2)}
        poppler = {p: time_pdftoppm(pdfs, work, args.dpi, p) for p in (1, 2)} if pdftoppm else {1: None, 2: None}
    for name, runs in (("vlmkit", seconds), ("pdftoppm", poppler)):
        for n, s in runs.items():
            print(f"{name}, {n} process(es): " + (f"{total / s:.1f} pages/s" if s else "not run"), flush=True)
    rate = {w: total / s for w, s in seconds.items()}
    ref = {p: total / s if s else None for p, s in poppler.items()}
    note = "" if pdftoppm else "pdftoppm not installed (Debian package poppler-utils)"
    details = {"pages": total, "pdfs": n_pdfs, "dpi": args.dpi, "seconds": seconds, "pdftoppm_seconds": poppler,
               "source": str(args.source or "made with matplotlib")}
    entries = [
        common.entry("render 1 worker", rate[1], "pages/s", ref[1], "pdftoppm, 1 process", note=note, **details),
        common.entry("render 2 workers", rate[2], "pages/s", ref[2], "pdftoppm, 2 processes", note=note, **details),
        common.entry("render 2 workers vs 1", rate[2], "pages/s", rate[1], "vlmkit, 1 worker", target_min=1.7),
    ]
    common.save_entries(args.out, entries, started)


if __name__ == "__main__":
    main()
