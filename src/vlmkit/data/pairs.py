"""Retrieval training data: pairs JSONL, batches free of false negatives, and the split by document.

One pair per line:

    {"query": "Which page has a red bar chart?", "pos": ["report.pdf#3"], "neg": ["report.pdf#7"]}

In-batch negatives are every other page of the batch, so a batch must never hold the same
page twice (it would be a negative of its own query) nor the same query twice (its two
copies would fight over one page). `build_batches` guarantees both, for the global batch of
all processes together.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from torch.utils.data import Dataset

from vlmkit.errors import ConfigError, DataError


@dataclass
class Pair:
    query: str
    pos: list[str]
    neg: list[str] = field(default_factory=list)
    line: int = 0


def read_pairs(path: str | Path) -> list[Pair]:
    """Parse and check a pairs JSONL; any bad line is a DataError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError("pairs file not found", path)
    pairs = []
    with path.open(encoding="utf-8") as handle:
        for number, text in enumerate(handle, 1):
            if not text.strip():
                continue
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(f"not valid JSON ({err.msg})", path, number) from None
            if not isinstance(raw, dict):
                raise DataError("each line must be a JSON object", path, number)
            query, pos, neg = raw.get("query"), raw.get("pos"), raw.get("neg", [])
            if not isinstance(query, str) or not query.strip():
                raise DataError("empty or missing \"query\"; every pair needs the query text", path, number)
            for name, ids in (("pos", pos), ("neg", neg)):
                if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
                    raise DataError(f'"{name}" must be a list of document ids', path, number)
            if not pos:
                raise DataError('"pos" is empty; every query needs at least one positive page', path, number)
            pairs.append(Pair(query.strip(), pos, neg, number))
    if not pairs:
        raise DataError("no pairs in the file", path)
    return pairs


def write_pairs(pairs: list[Pair], path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for p in pairs:
            handle.write(json.dumps({"query": p.query, "pos": p.pos, "neg": p.neg}) + "\n")
    tmp.replace(path)


NEGATIVE_SKIPS = ("same-document", "same-page")


def document_of(doc_id: str) -> str:
    """The document a page belongs to: its id before `#` (`docs render` names pages FILE#N)."""
    return doc_id.split("#", 1)[0]


def mine_negatives(pairs: list[Pair], ranked: Callable[[str], list[str]], per_query: int,
                   skip: str = "same-document") -> list[Pair]:
    """The pairs with up to `per_query` hard negatives each: the best pages of a first-stage ranking
    of the query (`ranked`: page ids, best first) that are not its positives and, with `skip`
    "same-document", not pages of its positives' documents either: a page beside the answer often
    answers too, and a false negative teaches the model to push away a right page. Negatives
    already in a pair come first and count towards `per_query`."""
    if skip not in NEGATIVE_SKIPS:
        raise ConfigError(f"skip rule {skip!r} is not one of {', '.join(NEGATIVE_SKIPS)}")
    mined = []
    for pair in pairs:
        documents = {document_of(d) for d in pair.pos} if skip == "same-document" else set()
        negatives = list(pair.neg)
        for doc_id in ranked(pair.query):
            if len(negatives) >= per_query:
                break
            if doc_id not in pair.pos and document_of(doc_id) not in documents and doc_id not in negatives:
                negatives.append(doc_id)
        mined.append(Pair(pair.query, pair.pos, negatives, pair.line))
    return mined


def check_ids(pairs: list[Pair], known: set[str] | frozenset[str], path, store) -> None:
    """Every page a pair names must be in the store."""
    for p in pairs:
        for doc_id in p.pos + p.neg:
            if doc_id not in known:
                raise DataError(f"page {doc_id!r} is not in the page store {store}", path, p.line, doc_id)


@dataclass
class Item:
    """One query of a batch: its text, its positive page and its hard negatives."""

    query: str
    pos: str
    neg: list[str]


def build_batches(pairs: list[Pair], batch_size: int, hard_negatives: int = 0, seed: int = 0) -> list[list[Item]]:
    """Shuffled batches of `batch_size` items with no page and no query twice in a batch.

    Items are placed first-fit into the open batches, so a clash only delays an item;
    batches still open at the end (too few distinct pages left) are dropped. A pair with
    several positives contributes one of them, drawn per call, as do its hard negatives.
    """
    rng = random.Random(seed)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    done: list[list[Item]] = []
    open_batches: list[tuple[list[Item], set[str], set[str]]] = []  # items, pages, queries
    for index in order:
        p = pairs[index]
        if len(p.neg) < hard_negatives:
            raise DataError(f"the pair on line {p.line} has {len(p.neg)} negatives, fewer than the "
                            f"{hard_negatives} hard negatives asked for per query")
        pos = rng.choice(p.pos)
        negs = rng.sample([n for n in p.neg if n not in p.pos], hard_negatives) if hard_negatives else []
        pages = {pos, *negs}
        if len(pages) < 1 + hard_negatives:
            continue  # its negatives repeat its positive: no clean item can be made
        for batch in open_batches:
            items, used_pages, used_queries = batch
            if p.query in used_queries or used_pages & pages:
                continue
            items.append(Item(p.query, pos, negs))
            used_pages |= pages
            used_queries.add(p.query)
            if len(items) == batch_size:
                open_batches.remove(batch)
                done.append(items)
            break
        else:
            new = ([Item(p.query, pos, negs)], set(pages), {p.query})
            if batch_size == 1:
                done.append(new[0])
            else:
                open_batches.append(new)
    return done


class PairBatches(Dataset):
    """Item i: process (i mod world) 's share of global batch (i // world), as query texts and page ids.

    Batches are rebuilt with a new shuffle for every epoch (`set_epoch`, called by the Trainer).
    """

    def __init__(self, pairs: list[Pair], batch_size: int, world_size: int = 1, hard_negatives: int = 0,
                 seed: int = 0):
        self.pairs, self.batch_size, self.world_size = pairs, batch_size, world_size
        self.hard_negatives, self.seed = hard_negatives, seed
        self.set_epoch(0)
        if not self.batches:
            raise DataError(f"{len(pairs)} pairs do not make a single batch of {batch_size * world_size} distinct "
                            "queries and pages; lower the batch size")

    def set_epoch(self, epoch: int) -> None:
        self.batches = build_batches(self.pairs, self.batch_size * self.world_size, self.hard_negatives,
                                     self.seed + epoch)

    def __len__(self) -> int:
        return len(self.batches) * self.world_size

    def __getitem__(self, index: int) -> dict:
        batch, rank = divmod(index, self.world_size)
        items = self.batches[batch][rank * self.batch_size:(rank + 1) * self.batch_size]
        # Positives first, then hard negatives: the layout the contrastive loss expects.
        return {"queries": [i.query for i in items],
                "doc_ids": [i.pos for i in items] + [n for i in items for n in i.neg]}


SPLIT_UNITS = ("page", "document")


def split_unit(by: str) -> Callable[[str], str]:
    """What a split draws a page id into: the page itself, or its document (`document_of`)."""
    if by not in SPLIT_UNITS:
        raise ValueError(f"split by {by!r}: use one of {SPLIT_UNITS}")
    return document_of if by == "document" else (lambda doc_id: doc_id)


def split_pairs(pairs: list[Pair], test_fraction: float, seed: int = 0,
                by: str = "page") -> tuple[list[Pair], list[Pair]]:
    """Train and test pairs whose positive pages never overlap; negatives crossing over are dropped.

    `by="page"` draws test pages; `by="document"` draws whole documents (`document_of`), so no
    test page shares a document with a training page, as a retriever meets new documents.
    """
    unit = split_unit(by)
    units = sorted({unit(d) for p in pairs for d in p.pos})
    random.Random(seed).shuffle(units)
    test_units = set(units[: round(len(units) * test_fraction)])
    test_pages = {d for p in pairs for d in p.pos + p.neg if unit(d) in test_units}
    train, test = [], []
    for p in pairs:
        in_test = [d in test_pages for d in p.pos]
        if any(in_test) and not all(in_test):
            continue  # positives on both sides would leak test pages into training
        is_test = all(in_test)
        keep = [n for n in p.neg if (n in test_pages) == is_test]
        (test if is_test else train).append(Pair(p.query, p.pos, keep, p.line))
    return train, test
