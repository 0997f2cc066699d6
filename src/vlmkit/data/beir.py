"""BEIR / ViDoRe-style evaluation folders, read from local files.

    DIR/queries.jsonl     {"_id": "q1", "text": "Which page shows the 2023 revenue?"}
    DIR/corpus.jsonl      {"_id": "report-7", "image": "images/report-7.png", "text": "optional text layer"}
    DIR/qrels/test.tsv    query-id<TAB>corpus-id<TAB>score, with that header

BEIR's layout, with each corpus row naming its page image (a path relative to DIR) where a text
corpus has a passage; ViDoRe's BEIR-format sets hold the same columns in parquet, with the
images inline, and read here once written out as files. The corpus becomes a page store,
`DIR/corpus.h5`, built on first use and rebuilt whenever `corpus.jsonl` is newer; a row's
`text`, when there is one, is its text layer for lexical and hybrid search.
"""

from __future__ import annotations

from pathlib import Path

from vlmkit.data.page_store import PageStoreWriter
from vlmkit.data.records import iter_jsonl
from vlmkit.errors import DataError
from vlmkit.processing.images import open_image

STORE_NAME = "corpus.h5"


def beir_paths(folder: str | Path, split: str = "test") -> tuple[Path, Path, Path]:
    """The page store (built if needed), queries and qrels of a BEIR-style folder."""
    folder = Path(folder)
    corpus, queries, qrels = folder / "corpus.jsonl", folder / "queries.jsonl", folder / "qrels" / f"{split}.tsv"
    for path in (corpus, queries, qrels):
        if not path.is_file():
            raise DataError(f"not found; a BEIR-style folder holds corpus.jsonl, queries.jsonl and qrels/{split}.tsv",
                            path)
    store = folder / STORE_NAME
    if not store.is_file() or store.stat().st_mtime < corpus.stat().st_mtime:
        build_store(corpus, store)
    return store, queries, qrels


def build_store(corpus: Path, store: Path) -> None:
    """Every row of `corpus` (`_id`, `image`, optional `text`) as a page of a new store at `store`."""
    seen = set()
    with PageStoreWriter(store, overwrite=True) as writer:
        for number, raw in iter_jsonl(corpus):
            if isinstance(raw, DataError):
                raise raw
            if not isinstance(raw, dict):
                raise DataError("each line must be a JSON object", corpus, number)
            doc_id, image, text = raw.get("_id"), raw.get("image"), raw.get("text") or ""
            if not isinstance(doc_id, str) or not doc_id:
                raise DataError('each row needs a string "_id"', corpus, number)
            if doc_id in seen:
                raise DataError("this id appears twice", corpus, number, doc_id)
            if not isinstance(image, str) or not image:
                raise DataError('each row needs "image", the path of its page image (relative to the folder)',
                                corpus, number, doc_id)
            if not isinstance(text, str):
                raise DataError('"text" must be a string', corpus, number, doc_id)
            path = corpus.parent / image
            try:
                open_image(path, decode=False)  # allowed format, size limits, readable header
            except DataError as err:
                raise DataError(f"image {path}: {err.problem}", corpus, number, doc_id) from None
            seen.add(doc_id)
            writer.add(doc_id, path.read_bytes(), {"source": str(path), "text": text} if text else {"source": str(path)})
