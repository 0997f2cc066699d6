"""`vlmkit docs synth`: built-in document pages with queries and qrels, for retrieval without downloads.

A page is drawn with PIL like a report page: a coloured header band with a title, grey
paragraph lines, and one figure in one of four places -- a coloured shape or a bar chart.
The header colour, figure kind, figure colour and figure place (6 x 6 x 6 x 4 = 864
combinations) are what queries ask about, so a small retriever trained from scratch can
learn them on a CPU. Within a split no two pages share all four, so every query has exactly
one right page; train and test are different pages (drawn with different jitter).

Written to `out/`: train_docs.h5 and test_docs.h5 (page stores), train_pairs.jsonl,
test_queries.jsonl and test_qrels.tsv (the BEIR-like evaluation inputs).
"""

from __future__ import annotations

import io
import itertools
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from vlmkit.data.page_store import PageStoreWriter
from vlmkit.data.pairs import Pair, write_pairs
from vlmkit.data.scenes import COLOURS, SHAPES, SUPERSAMPLE, WORDS, _draw_shape, _font, _jitter
from vlmkit.files import write_text_atomic

KINDS = (*SHAPES, "chart")
PLACES = ("top left", "top right", "bottom left", "bottom right")
ALL_KEYS = tuple(itertools.product(COLOURS, KINDS, COLOURS, PLACES))  # header, figure kind, figure colour, place
TEMPLATES = (
    "{header} header with a {figure} at the {place}",
    "Which page has a {header} title bar and a {figure} in the {place}?",
    "page with a {figure} at the {place} under a {header} header",
    "the report whose {header} header sits above a {figure} placed {place}",
)


def figure_name(kind: str, colour: str) -> str:
    return f"{colour} bar chart" if kind == "chart" else f"{colour} {kind}"


def query(key: tuple, rng: random.Random) -> str:
    header, kind, colour, place = key
    return rng.choice(TEMPLATES).format(header=header, figure=figure_name(kind, colour), place=place)


def render_page(key: tuple, seed: int, size: int = 64) -> Image.Image:
    """A portrait page (3:4) whose longer side is `size` pixels."""
    header, kind, colour, place = key
    rng = random.Random(seed)
    w, h = round(size * 0.75) * SUPERSAMPLE, size * SUPERSAMPLE
    image = Image.new("RGB", (w, h), _jitter(rng, (246, 246, 242), 8))
    draw = ImageDraw.Draw(image)
    band = h * rng.uniform(0.15, 0.19)
    draw.rectangle((0, 0, w, band), fill=_jitter(rng, COLOURS[header], 12))
    draw.text((w * 0.06, band * 0.2), rng.choice(WORDS).upper(), font=_font(int(band * 0.6)), fill=(255, 255, 255))
    body_top = band + h * 0.04
    row, col = divmod(PLACES.index(place), 2)
    cell_w, cell_h = w / 2, (h - body_top) / 2
    x0, y0 = col * cell_w, body_top + row * cell_h
    # Paragraph lines fill the three cells without the figure.
    for cell in range(4):
        if cell == PLACES.index(place):
            continue
        cr, cc = divmod(cell, 2)
        y = body_top + cr * cell_h + cell_h * 0.12
        while y < body_top + (cr + 1) * cell_h - cell_h * 0.1:
            right = cc * cell_w + cell_w * rng.uniform(0.7, 0.92)
            grey = _jitter(rng, (150, 150, 150), 20)
            draw.rectangle((cc * cell_w + cell_w * 0.08, y, right, y + h * 0.012), fill=grey)
            y += h * rng.uniform(0.035, 0.05)
    fill = _jitter(rng, COLOURS[colour], 12)
    cx, cy = x0 + cell_w / 2, y0 + cell_h / 2
    if kind == "chart":
        n = rng.randint(3, 5)
        base, span = y0 + cell_h * 0.88, cell_h * 0.72
        slot = cell_w * 0.8 / n
        for i in range(n):
            left = x0 + cell_w * 0.1 + i * slot + slot * 0.15
            draw.rectangle((left, base - span * rng.uniform(0.3, 1.0), left + slot * 0.7, base), fill=fill)
        draw.line((x0 + cell_w * 0.08, base, x0 + cell_w * 0.92, base), fill=(60, 60, 60), width=SUPERSAMPLE)
    else:
        _draw_shape(draw, kind, cx, cy, min(cell_w, cell_h) * rng.uniform(0.36, 0.44), fill)
    return image.resize((w // SUPERSAMPLE, h // SUPERSAMPLE), Image.LANCZOS)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_split(out: Path, split: str, keys: list[tuple], seed: int, size: int) -> list[str]:
    ids = []
    with PageStoreWriter(out / f"{split}_docs.h5", overwrite=True) as store:
        for i, key in enumerate(keys):
            doc_id = f"{split}-{i:05d}"
            page_seed = random.Random(f"{seed}-{split}-{i}").randrange(2**31)
            header, kind, colour, place = key
            meta = {"source": "synth", "page": i, "header": header, "figure": kind, "colour": colour, "place": place}
            store.add(doc_id, _png(render_page(key, page_seed, size)), meta)
            ids.append(doc_id)
    return ids


def synth_docs(out: str | Path, n_train: int = len(ALL_KEYS), n_test: int = 200, queries_per_page: int = 3,
               seed: int = 0, size: int = 64) -> dict[str, Path]:
    """Write the built-in retrieval data set; returns name -> path of what was written."""
    if max(n_train, n_test) > len(ALL_KEYS):
        raise ValueError(f"at most {len(ALL_KEYS)} pages per split (one per combination)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    train_keys = rng.sample(ALL_KEYS, n_train)
    test_keys = rng.sample(ALL_KEYS, n_test)
    train_ids = _write_split(out, "train", train_keys, seed, size)
    test_ids = _write_split(out, "test", test_keys, seed, size)

    pairs = []
    for doc_id, key in zip(train_ids, train_keys):
        texts = {query(key, rng) for _ in range(queries_per_page * 4)}  # distinct phrasings
        pairs += [Pair(text, [doc_id]) for text in sorted(texts)[:queries_per_page]]
    rng.shuffle(pairs)
    write_pairs(pairs, out / "train_pairs.jsonl")
    with (out / "test_queries.jsonl").open("w", encoding="utf-8") as queries, \
            (out / "test_qrels.tsv").open("w", encoding="utf-8") as qrels:
        qrels.write("query-id\tcorpus-id\tscore\n")
        for i, (doc_id, key) in enumerate(zip(test_ids, test_keys)):
            queries.write(json.dumps({"id": f"q{i:05d}", "text": query(key, rng)}) + "\n")
            qrels.write(f"q{i:05d}\t{doc_id}\t1\n")
    info = {"seed": seed, "size": size, "n_train": n_train, "n_test": n_test, "n_pairs": len(pairs)}
    write_text_atomic(out / "info.json", json.dumps(info, indent=2))
    names = ("train_docs.h5", "test_docs.h5", "train_pairs.jsonl", "test_queries.jsonl", "test_qrels.tsv")
    return {name: out / name for name in names}
