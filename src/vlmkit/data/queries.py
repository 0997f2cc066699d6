"""Synthetic queries for a page store: generate them with a model, filter them with an LM, turn them into pairs.

`generate_queries` asks a model, in batches, for one search query per page (the prompt is a
text file the user can change): a vlmkit VLM reads the page image, any instruction-tuned
causal LM (SmolLM2 from `vlmkit models fetch`, say) reads the page's text layer.
`filter_queries` keeps the queries a few-shot classifier judges specific to one page and
drops the context-dependent ones ("What is the date in the letter?"): it compares the
model's probability of answering "yes" and "no", as MiniCPM-Visual-Embedding does.
Both append to their output after every batch and skip what is already there, so an
interrupted run goes on where it stopped. `text_layer_queries` needs no model: it takes spans
of a PDF page's own text layer as queries (the Inverse Cloze Task's weak supervision), for
when no VLM good enough to write queries is at hand. `make_pairs` splits the kept queries by
page into training pairs and a BEIR-like test set.

Query records, one per line: {"id": "...", "doc_id": "...", "text": "..."} (+ "keep", "p_keep").
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import torch
from tqdm import tqdm

from vlmkit.data.page_store import PageStore
from vlmkit.data.pairs import Pair, split_pairs, split_unit, write_pairs
from vlmkit.errors import DataError
from vlmkit.model.generation import ChatModel
from vlmkit.processing.markers import IMAGE_MARKER

GENERATE_PROMPT = (f"{IMAGE_MARKER}\nWrite one search query that this page answers and that no other page "
                   "would. Reply with the query only.")
# For a language model without a vision tower: the page's text layer stands where the image would.
# The page first and the task last, asked as a reader's question: SmolLM2-135M-Instruct, asked
# for "a query no other page would answer" after the text, echoed the text or that phrase back.
TEXT_PROMPT = "{text}\n\nWrite a question that a reader could answer with the text above. Reply with the question only."
MAX_PAGE_CHARS = 2000  # of a text layer put in the prompt: about 500 tokens, the page's start
FILTER_PROMPT = """Does the search query identify one specific page on its own? Answer yes or no.
Query: What was Acme's revenue in Q3 2021? Answer: yes
Query: What is the date in the letter? Answer: no
Query: Which table lists the boiling points of alkanes? Answer: yes
Query: What does the figure show? Answer: no
Query: {query} Answer:"""


def _read_done(path: Path) -> dict[str, dict]:
    """Records already written to `path`, by id (resuming starts after them)."""
    done = {}
    if path.is_file():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                    done[record["id"]] = record
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataError("not a query record; remove the line or the file to start over", path,
                                    number) from None
    return done


def _prompt(prompt_file: str | Path | None, default: str) -> str:
    return Path(prompt_file).read_text(encoding="utf-8").strip() if prompt_file else default


@torch.no_grad()
def generate_queries(chat: ChatModel, store: PageStore, out: str | Path, prompt_file: str | Path | None = None,
                     batch_size: int = 8, max_new_tokens: int = 48, progress: bool = True) -> tuple[int, int, int]:
    """Append one generated query per page not yet in `out`; returns (written, empty replies, pages
    skipped for having no text layer, when `chat` reads text only)."""
    out = Path(out)
    prompt = _prompt(prompt_file, GENERATE_PROMPT if chat.sees_images else TEXT_PROMPT)
    if chat.sees_images and IMAGE_MARKER not in prompt:
        prompt = f"{IMAGE_MARKER}\n{prompt}"
    if not chat.sees_images and "{text}" not in prompt:
        raise DataError("a prompt for a language model must contain {text} where the page's text goes", prompt_file)
    done = {r["doc_id"] for r in _read_done(out).values()}
    todo = [doc_id for doc_id in store.ids if doc_id not in done]
    texts = {} if chat.sees_images else {d: store.text(d).strip() for d in todo}
    no_text = [d for d in todo if d in texts and not texts[d]]
    todo = [d for d in todo if d not in no_text]
    written = empty = 0
    with out.open("a", encoding="utf-8") as handle:
        for start in tqdm(range(0, len(todo), batch_size), desc="queries", unit="batch", disable=not progress):
            doc_ids = todo[start:start + batch_size]
            if chat.sees_images:
                images = [store.image(doc_id) for doc_id in doc_ids]
                rows = [chat.encode([{"role": "user", "content": prompt}], [image]) for image in images]
            else:
                images = []
                rows = [chat.encode([{"role": "user", "content": prompt.replace("{text}", texts[d][:MAX_PAGE_CHARS])}])
                        for d in doc_ids]
            for doc_id, text in zip(doc_ids, chat.replies(rows, max_new_tokens, images)):
                text = " ".join(text.split())
                if not text:
                    empty += 1  # not written: a later run tries the page again
                    continue
                handle.write(json.dumps({"id": f"{doc_id}::q", "doc_id": doc_id, "text": text}) + "\n")
                written += 1
            handle.flush()
    return written, empty, len(no_text)


@torch.no_grad()
def filter_queries(chat: ChatModel, queries: str | Path, out: str | Path, prompt_file: str | Path | None = None,
                   batch_size: int = 16, threshold: float = 0.5, progress: bool = True) -> tuple[int, int]:
    """Append a keep/drop decision for every query not yet in `out`; returns (kept, dropped) this run."""
    out, template = Path(out), _prompt(prompt_file, FILTER_PROMPT)
    if "{query}" not in template:
        raise DataError("the filter prompt must contain {query} where the query goes", prompt_file)
    decided = _read_done(out)
    records = [r for r in _read_done(Path(queries)).values() if r["id"] not in decided]
    tokenizer, model = chat.tokenizer, chat.model
    yes, no = (tokenizer.encode(word, add_special_tokens=False)[0] for word in ("yes", "no"))
    kept = dropped = 0
    with out.open("a", encoding="utf-8") as handle:
        for start in tqdm(range(0, len(records), batch_size), desc="filter", unit="batch", disable=not progress):
            batch = records[start:start + batch_size]
            rows = [chat.encode([{"role": "user", "content": template.replace("{query}", r["text"])}]) for r in batch]
            # Right padding keeps every row's positions exact; the answer is read at its own last token.
            ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=tokenizer.pad_token_id)
            mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
            last = logits[torch.arange(len(rows)), mask.sum(1) - 1]
            p_keep = torch.softmax(last[:, [yes, no]].float(), dim=-1)[:, 0].tolist()
            for record, p in zip(batch, p_keep):
                keep = p >= threshold
                kept, dropped = kept + keep, dropped + (not keep)
                handle.write(json.dumps({**record, "keep": keep, "p_keep": round(p, 4)}) + "\n")
            handle.flush()
    return kept, dropped


WORD = re.compile(r"[\w'-]+")


def _spans(text: str, words: tuple[int, int], rng: random.Random) -> list[list[str]]:
    """Runs of consecutive words within one line each, overlapping by half, in random order."""
    spans = []
    for line in text.splitlines():
        tokens = WORD.findall(line)
        if len(tokens) < words[0]:
            continue
        n = min(rng.randint(*words), len(tokens))
        spans += [tokens[i:i + n] for i in range(0, len(tokens) - n + 1, max(1, n // 2))]
    rng.shuffle(spans)
    return spans


def text_layer_queries(store: PageStore, out: str | Path, per_page: int = 2, words: tuple[int, int] = (5, 10),
                       seed: int = 0) -> tuple[int, int]:
    """Up to `per_page` queries per page, each a run of consecutive words from its text layer.

    Spans come from within one line (lines keep headings and sentences whole), drawn with a
    seed per page, and are kept only if their words occur together on no other page, so each
    query names one page. Resumable like `generate_queries`. Returns (written, pages with no
    usable text layer).
    """
    out = Path(out)
    done = {r["doc_id"] for r in _read_done(out).values()}
    layers = {doc_id: store.text(doc_id) for doc_id in store.ids}
    flat = {doc_id: " ".join(WORD.findall(text)).lower() for doc_id, text in layers.items()}
    written = bare = 0
    with out.open("a", encoding="utf-8") as handle:
        for doc_id, text in layers.items():
            if doc_id in done:
                continue
            unique = []
            for span in _spans(text, words, random.Random(f"{seed}-{doc_id}")):
                query = " ".join(span)
                if not any(query.lower() in other for d, other in flat.items() if d != doc_id):
                    unique.append(query)
                if len(unique) == per_page:  # each check reads every other page: stop once there are enough
                    break
            if not unique:
                bare += 1
                continue
            for k, query in enumerate(unique[:per_page]):
                handle.write(json.dumps({"id": f"{doc_id}::t{k}", "doc_id": doc_id, "text": query}) + "\n")
                written += 1
    return written, bare


def make_pairs(queries: str | Path, out_dir: str | Path, test_fraction: float = 0.2, seed: int = 0,
               split_by: str = "page") -> dict[str, Path]:
    """train_pairs.jsonl, test_queries.jsonl and test_qrels.tsv from query records (those not dropped),
    split by page or by document (`split_pairs`) so no test page is seen in training."""
    records = [r for r in _read_done(Path(queries)).values() if r.get("keep", True)]
    if not records:
        raise DataError("no kept queries to make pairs from", queries)
    pairs = [Pair(r["text"], [r["doc_id"]], [], n) for n, r in enumerate(records, 1)]
    train, test = split_pairs(pairs, test_fraction, seed, split_by)
    for side, fraction, held in (("test", test_fraction, test), ("training", 1 - test_fraction, train)):
        if fraction > 0 and not held:
            units = len({split_unit(split_by)(d) for p in pairs for d in p.pos})
            raise DataError(f"the {side} split is empty: a fraction of {fraction:g} of {units} {split_by}(s) "
                            f"rounds to none; change --test-fraction or --split-by", queries)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_pairs(train, out_dir / "train_pairs.jsonl")
    with (out_dir / "test_queries.jsonl").open("w", encoding="utf-8") as qs, \
            (out_dir / "test_qrels.tsv").open("w", encoding="utf-8") as qrels:
        qrels.write("query-id\tcorpus-id\tscore\n")
        for i, pair in enumerate(test):
            qs.write(json.dumps({"id": f"t{i:06d}", "text": pair.query}) + "\n")
            qrels.write(f"t{i:06d}\t{pair.pos[0]}\t1\n")
    return {name: out_dir / name for name in ("train_pairs.jsonl", "test_queries.jsonl", "test_qrels.tsv")}
