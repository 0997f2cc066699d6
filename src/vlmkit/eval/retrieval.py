"""`vlmkit retriever index / search / eval`: exact search over a page store and the standard metrics.

Inputs are BEIR-like: `queries.jsonl` lines `{"id": "q1", "text": "..."}`, `qrels.tsv` with
the header `query-id<TAB>corpus-id<TAB>score`, and a page store as the corpus.

Exactness, by construction:
- pages are encoded in fixed batches (batch b holds pages b*B .. b*B+B-1 of the store), and
  under torchrun each process takes whole batches, so a sharded index is bit-identical to
  an unsharded one and gives the same metrics;
- search is a chunked matrix product in float32 with a running top-k merged by a stable
  sort: ties go to the page that comes first in the store, and memory is bounded by the
  chunk size, never by the corpus;
- metrics are trec_eval's own, through pytrec_eval (linear gains); queries without a
  relevant page are skipped.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytrec_eval
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from vlmkit.data.page_store import PageStore
from vlmkit.errors import ConfigError, DataError
from vlmkit.eval.exact_search import search_topk as search  # exact top-k, ties to the lower index
from vlmkit.eval.lexical import FUSIONS, LexicalIndex, check_fusion, fuse
from vlmkit.eval.token_pooling import check_pool_factor, pool_page_tokens
from vlmkit.files import write_text_atomic
from vlmkit.model.retriever import VLMRetriever, concat, encode_inputs
from vlmkit.processing.processor import VLMProcessor

# Our metric names -> trec_eval's. Runs are cut at 10 before scoring, so reciprocal rank is MRR@10.
SEARCH_MODES = ("dense", "lexical", "hybrid")
RUN_DEPTH = 100  # pages kept per query in the run file (and fused, in hybrid mode)
FUSION_SHARES = tuple(i / 10 for i in range(11))  # lexical shares of the hybrid's weight that a sweep scores
TREC_MEASURES = {"ndcg@5": "ndcg_cut_5", "ndcg@10": "ndcg_cut_10", "recall@10": "recall_10", "mrr@10": "recip_rank"}


# --- inputs ---------------------------------------------------------------------------------------


def read_queries(path: str | Path) -> dict[str, str]:
    """Query id -> text, in file order (ids as "id", or BEIR's "_id"); an empty text or a repeated id
    is a DataError."""
    path, queries = Path(path), {}
    if not path.is_file():
        raise DataError("queries file not found", path)
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            qid, text = str(raw["id"] if "id" in raw else raw["_id"]), raw["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError('each line must be a JSON object with "id" (or "_id") and "text"', path, number) from None
        if not isinstance(text, str) or not text.strip():
            raise DataError("the query text is empty", path, number, qid)
        if qid in queries:
            raise DataError("this query id appears twice", path, number, qid)
        queries[qid] = text.strip()
    return queries


def read_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """Query id -> {page id: relevance}, from a TSV with the BEIR header."""
    path, qrels = Path(path), {}
    if not path.is_file():
        raise DataError("qrels file not found", path)
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].split("\t") != ["query-id", "corpus-id", "score"]:
        raise DataError("the first line must be the header query-id<TAB>corpus-id<TAB>score", path, 1)
    for number, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        fields = line.split("\t")
        try:
            qid, doc_id, rel = fields[0], fields[1], int(fields[2])
        except (IndexError, ValueError):
            raise DataError("expected query-id<TAB>corpus-id<TAB>integer score", path, number) from None
        qrels.setdefault(qid, {})[doc_id] = rel
    return qrels


# --- encoding -------------------------------------------------------------------------------------


def load_retriever(directory: str | Path, device: str | None = None) -> tuple[VLMRetriever, VLMProcessor]:
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise DataError("not a saved retriever (no config.json); train one with `vlmkit retriever train`", directory)
    model = VLMRetriever.from_pretrained(directory).eval()
    return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")), VLMProcessor.from_pretrained(directory)


def _embed(model: VLMRetriever, inputs: dict) -> torch.Tensor:
    inputs = {k: v.to(model.device) for k, v in inputs.items() if k != "crops_per_row"}
    return model(**inputs).float().cpu()


@torch.no_grad()
def encode_queries(model: VLMRetriever, processor: VLMProcessor, texts: list[str], batch_size: int = 64):
    out = [_embed(model, encode_inputs(processor, model.config, queries=texts[s:s + batch_size]))
           for s in range(0, len(texts), batch_size)]
    return concat(out)


@torch.no_grad()
def encode_pages(model: VLMRetriever, processor: VLMProcessor, store: PageStore, batch_size: int = 32,
                 rank: int = 0, world_size: int = 1, progress: bool = True):
    """This process's share of the store: whole fixed batches, rank r taking batches r, r + world, ..."""
    ids = store.ids
    starts = list(range(0, len(ids), batch_size))[rank::world_size]
    out_ids, out, any_text = [], [], False
    for start in tqdm(starts, desc="index", unit="batch", disable=not progress):
        batch_ids = ids[start:start + batch_size]
        images = [store.image(doc_id) for doc_id in batch_ids]
        texts = [store.text(doc_id) for doc_id in batch_ids] if model.config.page_text_tokens else None
        any_text = any_text or any(texts or ())
        out.append(_embed(model, encode_inputs(processor, model.config, images=images, page_texts=texts)))
        out_ids += batch_ids
    if model.config.page_text_tokens and out_ids and not any_text:
        warnings.warn(f"this retriever was trained to read pages' text layers (page_text_tokens="
                      f"{model.config.page_text_tokens}), but no page of {store.path} has one: it ranks them by "
                      "their images alone", stacklevel=2)
    if not out:
        return [], torch.zeros(0)
    return out_ids, concat(out)


def merge_shares(shares: list[tuple[list[str], torch.Tensor]], batch_size: int) -> tuple[list[str], torch.Tensor]:
    """The store-order index from each rank's `encode_pages` share (batch b came from rank b mod world)."""
    world = len(shares)
    batches = [[(ids[s:s + batch_size], emb[s:s + batch_size]) for s in range(0, len(ids), batch_size)]
               for ids, emb in shares]
    ordered = [batches[b % world][b // world] for b in range(sum(len(x) for x in batches))]
    return [i for chunk, _ in ordered for i in chunk], concat([e for _, e in ordered])


def build_index(model, processor, store: PageStore, batch_size: int = 32, progress: bool = True):
    """All page ids and embeddings in store order; under torchrun each process encodes a share."""
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    share = encode_pages(model, processor, store, batch_size, rank, world, progress and rank == 0)
    if not distributed:
        return share
    shares = [None] * world
    dist.all_gather_object(shares, share)
    return merge_shares(shares, batch_size)


def save_index(path: str | Path, ids: list[str], embeddings: torch.Tensor) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"embeddings": embeddings.contiguous()}, str(tmp), metadata={"ids": json.dumps(ids)})
    tmp.replace(path)


def load_index(path: str | Path) -> tuple[list[str], torch.Tensor]:
    with safe_open(str(path), "pt") as handle:
        ids = json.loads(handle.metadata()["ids"])
    return ids, load_file(str(path))["embeddings"]


# --- metrics --------------------------------------------------------------------------------------


def _trec_eval(run: dict[str, list[str]], qrels: dict[str, dict[str, int]]) -> dict[str, dict[str, float]]:
    """Per-query metrics of ranked lists. trec_eval orders by score (ties by doc id), so each page's
    score is minus its rank: the order of `run` is the order scored."""
    scored = {q: {doc_id: -float(rank) for rank, doc_id in enumerate(ranked[:10])} for q, ranked in run.items()}
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.5,10", "recall.10", "recip_rank"})
    return {q: {name: m[trec] for name, trec in TREC_MEASURES.items()} for q, m in evaluator.evaluate(scored).items()}


def query_metrics(ranked: list[str], relevant: dict[str, int]) -> dict[str, float]:
    """nDCG@5/@10, recall@10 and reciprocal rank within 10 of one query's ranked page ids."""
    return _trec_eval({"q": ranked}, {"q": relevant})["q"]


def metrics(run: dict[str, list[str]], qrels: dict[str, dict[str, int]]) -> dict[str, float]:
    """Mean of `query_metrics` over the queries of `run` that have a relevant page."""
    judged = {q: qrels[q] for q in run if any(r > 0 for r in qrels.get(q, {}).values())}
    if not judged:
        raise DataError("no query has a relevant page in the qrels")
    per_query = _trec_eval({q: run[q] for q in judged}, judged).values()
    return {name: sum(m[name] for m in per_query) / len(judged) for name in TREC_MEASURES} | {
        "n_queries": len(judged)}


def fusion_sweep(runs: list[list[list[tuple[str, float]]]], qids: list[str], qrels: dict[str, dict[str, int]],
                 shares=FUSION_SHARES, fusions=FUSIONS) -> list[dict]:
    """The hybrid's metrics by each fusion at each lexical share w of the weight (weights 1 - w, w):
    from dense alone (w = 0) to BM25 alone (w = 1). `runs` are the dense and the lexical rankings of
    each query. The fusion and share to use are the best on queries held out from training, never
    the test queries'."""
    table = []
    for fusion in fusions:
        for share in shares:
            weights = (round(1.0 - share, 6), share)
            fused = {q: [doc_id for doc_id, _ in fuse(list(pair), weights, RUN_DEPTH, fusion)]
                     for q, pair in zip(qids, zip(*runs))}
            table.append({"fusion": fusion, "weights": list(weights)} | metrics(fused, qrels))
    return table


def write_run(path: str | Path, run: dict[str, list[tuple[str, float]]], tag: str = "vlmkit") -> None:
    """A TREC run file: `qid Q0 docid rank score tag`, one line per retrieved page (pytrec_eval reads
    these but cannot write them)."""
    lines = [f"{qid} Q0 {doc_id} {rank} {score:.6f} {tag}\n"
             for qid, ranked in run.items() for rank, (doc_id, score) in enumerate(ranked, 1)]
    write_text_atomic(path, "".join(lines))


def evaluate(model_dir: str | Path | None, docs: str | Path, queries_path: str | Path, qrels_path: str | Path,
             output: str | Path | None = None, batch_size: int = 32, index: str | Path | None = None,
             progress: bool = True, mode: str = "dense", weights: tuple[float, float] = (1.0, 1.0),
             pool_factor: int = 1, sweep: bool = False, fusion: str = "rrf") -> dict:
    """Search every query, score against the qrels; rank 0 writes `output` (metrics JSON) and a TREC
    run file beside it. `mode`: "dense" (the retriever; the store encoded, or `index` loaded),
    "lexical" (BM25 over the pages' text layers, no model) or "hybrid" (both, fused by `fusion`,
    "rrf" or "score" (`vlmkit.eval.lexical`), with `weights` for dense and lexical). `pool_factor` > 1
    pools the encoded pages' token vectors (multi-vector retrievers; `vlmkit.eval.token_pooling`)
    before the search. `sweep` (hybrid only) adds `fusion_sweep`'s table and the best fusion and
    weights by nDCG@10."""
    if mode not in SEARCH_MODES:
        raise ConfigError(f"search mode {mode!r} is not one of {', '.join(SEARCH_MODES)}")
    if sweep and mode != "hybrid":
        raise ConfigError(f"a sweep of the fusion weights needs --mode hybrid, not {mode}")
    if mode != "lexical" and model_dir is None:
        raise ConfigError(f"{mode} search needs a retriever (--model)")
    check_pool_factor(pool_factor)
    check_fusion(fusion)
    if pool_factor > 1 and mode == "lexical":
        raise ConfigError("--pool-factor pools a retriever's page vectors; --mode lexical has none")
    if pool_factor > 1 and index:
        # A saved index may be pooled already, and pooling it again would go unnoticed.
        raise ConfigError(f"--pool-factor {pool_factor} pools the pages encoded here, not a loaded --index: build "
                          f"a pooled index with `vlmkit retriever index --pool-factor {pool_factor}`, or leave "
                          "--index out")
    queries, qrels = read_queries(queries_path), read_qrels(qrels_path)
    store = PageStore(docs)
    for qid, judged in qrels.items():
        if qid not in queries:
            raise DataError(f"query {qid!r} has qrels but is not in {queries_path}", qrels_path, record_id=qid)
        store.check_ids(judged, qrels_path)
    qids = [q for q in queries if q in qrels]
    texts = [queries[q] for q in qids]
    runs = []
    if mode != "lexical":
        model, processor = load_retriever(model_dir)
        if index:
            ids, doc_emb = load_index(index)
        else:
            ids, doc_emb = build_index(model, processor, store, batch_size, progress)
            doc_emb = pool_page_tokens(doc_emb, pool_factor, model.config.normalize)
        scores, indices = search(encode_queries(model, processor, texts, batch_size), doc_emb, k=RUN_DEPTH)
        runs.append([[(ids[i], s) for i, s in zip(row_indices.tolist(), row_scores.tolist())]
                     for row_indices, row_scores in zip(indices, scores)])
    if mode != "dense":
        runs.append(LexicalIndex.of_store(store).search(texts, RUN_DEPTH))
    table = fusion_sweep(runs, qids, qrels) if sweep else None
    if mode == "hybrid":  # runs: [dense, lexical], each one ranking per query
        runs = [[fuse(list(pair), weights, RUN_DEPTH, fusion) for pair in zip(*runs)]]
    run = dict(zip(qids, runs[0]))
    result = metrics({q: [doc_id for doc_id, _ in ranked] for q, ranked in run.items()}, qrels)
    result |= {"n_docs": len(store), "mode": mode}
    if mode == "hybrid":
        result |= {"fusion": fusion, "weights": list(weights)}
    if table:
        # The first of equals wins: reciprocal rank before scores, and the share nearest dense alone,
        # so BM25 must earn its weight.
        best = max(table, key=lambda row: row["ndcg@10"])
        result |= {"sweep": table, "best_fusion": best["fusion"], "best_weights": best["weights"]}
    is_main = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    if output and is_main:
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(output, json.dumps(result, indent=2))
        write_run(output.with_suffix(".trec"), run)
    return result


def init_distributed() -> None:
    """Join the torchrun group when launched by torchrun (gloo on CPU, nccl on GPUs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
