"""Real PDFs for the retrieval experiment: manuals from Debian's documentation packages.

`python -m examples.real_pdfs.fetch --out data/real-pdfs` downloads four packages with
`apt-get download` (no root needed; Debian's mirror is reachable where PyPI is), unpacks them
with `dpkg-deb -x`, and writes the first `--pages` pages of each chosen manual to OUT/train/,
OUT/valid/ or OUT/test/. The split is by document, fixed below, so that no held-out page shares
a document with a training page: the retriever trains on `train`, the hybrid search's fusion is
chosen on `valid`, and `test`, which mixes an R manual with two other projects, is searched once.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import pypdfium2

PACKAGES = ("r-doc-pdf", "gnuplot-doc", "asymptote-doc", "octave-doc")
# Manual -> its path inside the unpacked packages.
TRAIN = {
    "R-intro": "usr/share/R/doc/manual/R-intro.pdf",
    "R-admin": "usr/share/R/doc/manual/R-admin.pdf",
    "R-FAQ": "usr/share/R/doc/manual/R-FAQ.pdf",
    "asymptote": "usr/share/doc/asymptote/asymptote.pdf",
    "octave": "usr/share/doc/octave/octave.pdf",
}
VALID = {
    "R-exts": "usr/share/R/doc/manual/R-exts.pdf",
    "R-ints": "usr/share/R/doc/manual/R-ints.pdf",
}
TEST = {
    "R-lang": "usr/share/R/doc/manual/R-lang.pdf",
    "gnuplot": "usr/share/doc/gnuplot/gnuplot.pdf",
    "liboctave": "usr/share/doc/octave/liboctave.pdf",
}
SIDES = (("train", TRAIN), ("valid", VALID), ("test", TEST))


def unpack(packages: tuple[str, ...], into: Path) -> None:
    debs = into / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", *packages], cwd=debs, check=True)
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(into / "root")], check=True)


def excerpt(source: Path, target: Path, pages: int) -> int:
    """The first `pages` pages of `source` as a PDF of their own (written whole, then renamed)."""
    pdf = pypdfium2.PdfDocument(str(source))
    part = pypdfium2.PdfDocument.new()
    count = min(pages, len(pdf))
    part.import_pages(pdf, list(range(count)))
    tmp = target.with_suffix(".pdf.tmp")
    part.save(str(tmp))
    tmp.replace(target)
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/real-pdfs")
    parser.add_argument("--pages", type=int, default=36, help="pages taken from the start of each manual")
    args = parser.parse_args()
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        unpack(PACKAGES, Path(tmp))
        for side, manuals in SIDES:
            (out / side).mkdir(parents=True, exist_ok=True)
            for stale in (out / side).glob("*.pdf"):  # a manual this split puts on another side
                if stale.stem in TRAIN | VALID | TEST and stale.stem not in manuals:
                    stale.unlink()
            total = sum(excerpt(Path(tmp) / "root" / path, out / side / f"{name}.pdf", args.pages)
                        for name, path in manuals.items())
            print(f"{side}: {len(manuals)} documents, {total} pages in {out / side}")
    # Written last: run.sh fetches again until it exists, and keeps each output folder to one split.
    split = out / "split.txt"
    split.with_suffix(".tmp").write_text("".join(f"{side} {name}\n" for side, manuals in SIDES for name in manuals))
    split.with_suffix(".tmp").replace(split)


if __name__ == "__main__":
    main()
