"""The retrieval half of the `vlmkit` command: `vlmkit docs ...` (page stores, queries, pairs)
and `vlmkit retriever ...` (train, index, search, eval, demo)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _docs_synth(args) -> None:
    from vlmkit.data.synth_docs import synth_docs

    paths = synth_docs(Path(args.out), n_train=args.train, n_test=args.test, queries_per_page=args.queries_per_page,
                       seed=args.seed, size=args.size)
    for name, path in paths.items():
        print(f"{name}: {path}")


def _docs_render(args) -> None:
    from vlmkit.data.pdf import render_to_store

    report = render_to_store(args.inputs, args.out, dpi=args.dpi, min_side=args.min_side, workers=args.workers)
    print(report.summary())


def _docs_add_images(args) -> None:
    from vlmkit.data.pdf import add_images

    print(add_images(args.inputs, args.out).summary())


def _docs_gen_queries(args) -> None:
    from vlmkit.data.page_store import PageStore
    from vlmkit.data.queries import generate_queries
    from vlmkit.errors import ConfigError
    from vlmkit.model.generation import load_chat_model

    if args.from_text_layer:
        from vlmkit.data.queries import text_layer_queries

        written, bare = text_layer_queries(PageStore(args.docs), args.out, per_page=args.per_page)
        print(f"wrote {written} queries to {args.out}" + (f"; {bare} page(s) had no text layer to use" if bare else ""))
        return
    if not args.model:
        raise ConfigError("give --model (a VLM or a causal LM that writes the queries) or --from-text-layer")
    written, empty, no_text = generate_queries(load_chat_model(args.model), PageStore(args.docs), args.out,
                                               args.prompt, batch_size=args.batch_size,
                                               max_new_tokens=args.max_new_tokens)
    print(f"wrote {written} queries to {args.out}" + (f"; {empty} empty replies (re-run to retry)" if empty else "")
          + (f"; {no_text} page(s) without a text layer for a language model to read" if no_text else ""))


def _docs_filter_queries(args) -> None:
    from vlmkit.data.queries import filter_queries
    from vlmkit.model.generation import load_chat_model

    kept, dropped = filter_queries(load_chat_model(args.model), args.queries, args.out, args.prompt,
                                   batch_size=args.batch_size, threshold=args.threshold)
    print(f"kept {kept}, dropped {dropped}; decisions in {args.out}")


def _docs_make_pairs(args) -> None:
    from vlmkit.data.queries import make_pairs

    for name, path in make_pairs(args.queries, args.out, args.test_fraction, args.seed, args.split_by).items():
        print(f"{name}: {path}")


def _docs_mine_negatives(args) -> None:
    from vlmkit.data.pairs import check_ids, mine_negatives, read_pairs, write_pairs
    from vlmkit.data.page_store import PageStore
    from vlmkit.errors import ConfigError
    from vlmkit.eval.retrieval import load_retriever

    if args.mode != "lexical" and not args.model:
        raise ConfigError(f"--mode {args.mode} mines with a retriever: give --model (or --mode lexical, BM25)")
    pairs = read_pairs(args.pairs)
    check_ids(pairs, PageStore(args.docs).index.keys(), args.pairs, args.docs)
    model, processor = load_retriever(args.model) if args.model else (None, None)
    search = page_search(args, model, processor)
    if search.mode == "lexical" and not len(search.lexical):
        raise ConfigError(f"no page of {args.docs} has a text layer for BM25; mine with a retriever "
                          "(--model DIR --mode dense)")
    depth = args.per_query + 20  # room for the positives and the pages the skip rule bars
    mined = mine_negatives(pairs, lambda query: [d for d, _ in search.ranked(query, depth)], args.per_query,
                           args.skip)
    write_pairs(mined, args.out)
    counts = [len(p.neg) for p in mined]
    print(f"wrote {args.out}: {len(mined)} pairs, {sum(counts)} negatives ({min(counts)} to {max(counts)} a pair)")


def _retriever_train(args) -> None:
    from vlmkit.config import load_retriever_config
    from vlmkit.train.retrieval import run

    overrides = list(args.set or [])
    for flag, key in (("train_data", "data.train"), ("docs", "data.docs"), ("output_dir", "train.output_dir"),
                      ("max_steps", "train.max_steps"), ("seed", "train.seed"),
                      ("grad_cache_micro_batch_size", "retrieval.grad_cache_micro_batch_size")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={json.dumps(getattr(args, flag))}")
    if args.grad_cache:
        overrides.append("retrieval.grad_cache=true")
    cfg = load_retriever_config(args.config, overrides)
    if args.tiny:
        from vlmkit.recipes import shrink

        shrink(cfg)
    run(cfg)


def _retriever_index(args) -> None:
    import torch.distributed as dist

    from vlmkit.data.page_store import PageStore
    from vlmkit.eval.retrieval import build_index, init_distributed, load_retriever, save_index
    from vlmkit.eval.token_pooling import check_pool_factor, pool_page_tokens

    check_pool_factor(args.pool_factor)
    init_distributed()
    model, processor = load_retriever(args.model)
    ids, embeddings = build_index(model, processor, PageStore(args.docs), args.batch_size)
    if not dist.is_initialized() or dist.get_rank() == 0:
        embeddings = pool_page_tokens(embeddings, args.pool_factor, model.config.normalize)
        save_index(args.out, ids, embeddings)
        print(f"wrote {args.out}: {len(ids)} pages, embeddings {tuple(embeddings.shape)}")


def _retriever_search(args) -> None:
    from vlmkit.data.page_store import PageStore
    from vlmkit.errors import ConfigError
    from vlmkit.eval.retrieval import build_index, encode_queries, load_index, load_retriever, search

    if not args.query.strip():
        raise ConfigError("the query is empty")
    if args.mode != "dense":  # BM25 reads the store's text layers
        if not args.docs:
            raise ConfigError(f"--mode {args.mode} searches the text layers of a page store: give --docs")
        if args.mode == "hybrid" and not args.model:
            raise ConfigError("--mode hybrid needs --model, the retriever")
        model, processor = load_retriever(args.model) if args.model else (None, None)
        ranked = page_search(args, model, processor).ranked(args.query, args.k)
        for rank, (doc_id, score) in enumerate(ranked, 1):
            print(f"{rank:3d}  {score:.4f}  {doc_id}")
        return
    if not args.model:
        raise ConfigError("dense search needs --model, the retriever (or --mode lexical)")
    if (args.index is None) == (args.docs is None):
        raise ConfigError("give exactly one of --index (from `vlmkit retriever index`) and --docs")
    model, processor = load_retriever(args.model)
    ids, embeddings = load_index(args.index) if args.index else build_index(model, processor, PageStore(args.docs))
    scores, indices = search(encode_queries(model, processor, [args.query]), embeddings, args.k)
    for rank, (value, index) in enumerate(zip(scores[0].tolist(), indices[0].tolist()), 1):
        print(f"{rank:3d}  {value:.4f}  {ids[index]}")


def _retriever_demo(args) -> None:
    from vlmkit.train.retrieval import run_demo

    run_demo(args.out, args.data, quick=args.quick)


def _retriever_eval(args) -> None:
    from vlmkit.errors import ConfigError
    from vlmkit.eval.retrieval import evaluate, init_distributed

    if args.model is None and args.mode != "lexical":
        raise ConfigError(f"--mode {args.mode} needs --model, the retriever (--mode lexical needs none)")
    if args.beir:
        from vlmkit.data.beir import beir_paths

        if args.docs or args.queries or args.qrels:
            raise ConfigError("give --beir DIR, or --docs, --queries and --qrels, not both")
        args.docs, args.queries, args.qrels = beir_paths(args.beir, args.split)
    elif not (args.docs and args.queries and args.qrels):
        raise ConfigError("give --docs, --queries and --qrels (or --beir DIR, a BEIR-style folder)")
    init_distributed()
    # By default beside the model, one file per mode; lexical search without a model writes only --output.
    name = "retrieval_metrics.json" if args.mode == "dense" else f"retrieval_metrics_{args.mode}.json"
    output = args.output or (str(Path(args.model) / name) if args.model else None)
    metrics = evaluate(args.model, args.docs, args.queries, args.qrels, output, batch_size=args.batch_size,
                       index=args.index, mode=args.mode, weights=tuple(args.weights), pool_factor=args.pool_factor,
                       sweep=args.sweep_weights, fusion=args.fusion)
    print(json.dumps(metrics, indent=2))


def add_synth_docs_command(group: argparse._SubParsersAction, name: str) -> None:
    """`docs synth`, also reachable as `data synth-docs` beside the other built-in data sets."""
    dsynth = group.add_parser(name, help="write the built-in document pages, pairs, queries and qrels (no download)")
    dsynth.add_argument("--out", default="data/synth-docs")
    dsynth.add_argument("--train", type=int, default=864, help="train pages (default: all 864 combinations)")
    dsynth.add_argument("--test", type=int, default=200, help="held-out test pages")
    dsynth.add_argument("--queries-per-page", type=int, default=3)
    dsynth.add_argument("--size", type=int, default=64, help="page height in pixels")
    dsynth.add_argument("--seed", type=int, default=0)
    dsynth.set_defaults(func=_docs_synth)


def page_search(args, model, processor):
    """The page search that --docs, --index, --mode, --fusion and --weights ask for."""
    from vlmkit.serve.page_search import PageSearch

    return PageSearch(model, processor, args.docs, args.index, args.mode, tuple(args.weights), args.fusion)


def add_search_mode(parser: argparse.ArgumentParser, default: str) -> None:
    """--mode, --fusion and --weights: dense, lexical (BM25 over the pages' text layers) or hybrid search."""
    parser.add_argument("--mode", choices=["dense", "lexical", "hybrid"], default=default,
                        help=f"dense: the retriever; lexical: BM25 over the pages' text layers; hybrid: both, "
                             f"fused (default: {default})")
    parser.add_argument("--fusion", choices=["rrf", "score"], default="rrf",
                        help="hybrid: rrf sums weight / (60 + rank) over the two rankings; score sums each "
                             "ranking's scores min-max normalised over its list, times its weight (default: rrf)")
    parser.add_argument("--weights", type=float, nargs=2, default=[1.0, 1.0], metavar=("DENSE", "LEXICAL"),
                        help="hybrid: each ranking's weight in the fusion (default: 1 1)")


def add_pool_factor(parser: argparse.ArgumentParser, when: str) -> None:
    """--pool-factor: token pooling of multi-vector page embeddings (vlmkit.eval.token_pooling)."""
    parser.add_argument("--pool-factor", type=int, default=1, metavar="N",
                        help="multi-vector retrievers: replace each page's T token vectors by the means of T/N "
                             f"clusters (Ward linkage) {when}; queries are not pooled (default: 1, no pooling)")


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add the `docs` and `retriever` command groups to the main parser."""
    docs = commands.add_parser("docs", help="document pages for retrieval: page stores, queries, pairs")
    docs = docs.add_subparsers(dest="docs_command", required=True)
    add_synth_docs_command(docs, "synth")
    render = docs.add_parser("render", help="render PDF pages into a page store (pypdfium2, parallel)")
    render.add_argument("inputs", nargs="+", metavar="PDF_OR_DIR")
    render.add_argument("--out", required=True, help="page store (.h5); pages already in it are skipped")
    render.add_argument("--dpi", type=float, default=150)
    render.add_argument("--min-side", type=int, default=0, help="raise the dpi until the shorter side has PX pixels")
    render.add_argument("--workers", type=int, help="processes (default: one per core)")
    render.set_defaults(func=_docs_render)
    add_images = docs.add_parser("add-images", help="store image files (or folders of them) as pages")
    add_images.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    add_images.add_argument("--out", required=True, help="page store (.h5)")
    add_images.set_defaults(func=_docs_add_images)
    gen = docs.add_parser("gen-queries", help="one search query per page, generated by a VLM (resumable)")
    gen.add_argument("--model", help="what writes the queries: a saved vlmkit VLM (reads the page image) or any "
                     "instruction-tuned causal LM (a folder, a .gguf file or a fetched id such as "
                     "HuggingFaceTB/SmolLM2-135M-Instruct; reads the page's text layer)")
    gen.add_argument("--from-text-layer", action="store_true", help="no model: take unique spans of each PDF "
                     "page's text layer as its queries (weak supervision)")
    gen.add_argument("--per-page", type=int, default=2, help="queries per page with --from-text-layer")
    gen.add_argument("--docs", required=True, help="page store")
    gen.add_argument("--out", required=True, help="queries JSONL; pages already in it are skipped")
    gen.add_argument("--prompt", help="text file with the prompt (default: vlmkit.data.queries.GENERATE_PROMPT for a "
                     "VLM, TEXT_PROMPT, with {text} for the page's text, for a language model)")
    gen.add_argument("--batch-size", type=int, default=8)
    gen.add_argument("--max-new-tokens", type=int, default=48)
    gen.set_defaults(func=_docs_gen_queries)
    filt = docs.add_parser("filter-queries", help="keep queries specific to one page (few-shot LM; resumable)")
    filt.add_argument("--model", required=True, help="a saved vlmkit model or any instruction-tuned causal LM "
                      "(a folder, a .gguf file or a fetched id)")
    filt.add_argument("--queries", required=True, help="queries JSONL from gen-queries")
    filt.add_argument("--out", required=True, help="queries with keep/drop decisions; decided ones are skipped")
    filt.add_argument("--prompt", help="text file with a few-shot prompt containing {query}")
    filt.add_argument("--threshold", type=float, default=0.5, help="keep when P(yes) >= this")
    filt.add_argument("--batch-size", type=int, default=16)
    filt.set_defaults(func=_docs_filter_queries)
    mpairs = docs.add_parser("make-pairs", help="kept queries -> train pairs + test queries/qrels, split by page or document")
    mpairs.add_argument("--queries", required=True)
    mpairs.add_argument("--out", required=True, help="output folder")
    mpairs.add_argument("--test-fraction", type=float, default=0.2)
    mpairs.add_argument("--seed", type=int, default=0)
    mpairs.add_argument("--split-by", choices=["page", "document"], default="page",
                        help="what the test fraction draws: pages, or whole documents (page ids FILE#N, "
                             "as `docs render` names them), so that test pages share no document with training")
    mpairs.set_defaults(func=_docs_make_pairs)

    mine = docs.add_parser("mine-negatives", help="fill the pairs' hard negatives from a first-stage search "
                           "(BM25 over the text layers, or a retriever)")
    mine.add_argument("--pairs", required=True, help="pairs JSONL (from make-pairs)")
    mine.add_argument("--docs", required=True, help="the page store the pairs name")
    mine.add_argument("--out", required=True, help="the pairs with their negatives (JSONL)")
    mine.add_argument("--per-query", type=int, default=4, help="negatives per pair (default: 4)")
    mine.add_argument("--skip", choices=["same-document", "same-page"], default="same-document",
                      help="pages never taken as negatives: those of the positives' documents (FILE#N ids; the "
                           "default), or only the positives themselves")
    mine.add_argument("--model", help="a retriever, for --mode dense or hybrid")
    mine.add_argument("--index", help="its index of the store (default: encode the store)")
    add_search_mode(mine, "lexical")
    mine.set_defaults(func=_docs_mine_negatives)

    retriever = commands.add_parser("retriever", help="train, index, search and evaluate a page retriever")
    retriever = retriever.add_subparsers(dest="retriever_command", required=True)
    rtrain = retriever.add_parser("train", help="contrastive training of a retriever on query-page pairs")
    rtrain.add_argument("config", nargs="?", help="YAML config (sections model, retrieval, data, train) or recipe name")
    rtrain.add_argument("--tiny", action="store_true", help="the config's design at tiny scale with random weights")
    rtrain.add_argument("--train-data", help="pairs JSONL")
    rtrain.add_argument("--docs", help="page store with the pages the pairs name")
    rtrain.add_argument("--output-dir")
    rtrain.add_argument("--grad-cache", action="store_true", help="GradCache: big batches in bounded memory")
    rtrain.add_argument("--grad-cache-micro-batch-size", type=int)
    rtrain.add_argument("--max-steps", type=int)
    rtrain.add_argument("--seed", type=int)
    rtrain.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config values; may be given more than once")
    rtrain.set_defaults(func=_retriever_train)
    rindex = retriever.add_parser("index", help="encode a page store into an index (sharded under torchrun)")
    rindex.add_argument("--model", required=True)
    rindex.add_argument("--docs", required=True)
    rindex.add_argument("--out", required=True, help="index file (.safetensors)")
    rindex.add_argument("--batch-size", type=int, default=32)
    add_pool_factor(rindex, "before the index is saved")
    rindex.set_defaults(func=_retriever_index)
    rsearch = retriever.add_parser("search", help="the top pages for one query")
    rsearch.add_argument("query")
    rsearch.add_argument("--model", help="the retriever (not needed with --mode lexical)")
    rsearch.add_argument("--index", help="an index from `vlmkit retriever index`")
    rsearch.add_argument("--docs", help="or a page store, encoded on the spot")
    rsearch.add_argument("--k", type=int, default=10)
    add_search_mode(rsearch, "dense")
    rsearch.set_defaults(func=_retriever_search)
    reval = retriever.add_parser("eval", help="nDCG@5/@10, recall@10 and MRR@10 on queries + qrels")
    reval.add_argument("--model", help="the retriever (not needed with --mode lexical)")
    reval.add_argument("--docs", help="the corpus, a page store")
    reval.add_argument("--queries", help='JSONL of {"id", "text"}')
    reval.add_argument("--qrels", help="TSV with header query-id, corpus-id, score")
    reval.add_argument("--beir", metavar="DIR", help="instead: a BEIR/ViDoRe-style folder (corpus.jsonl naming page "
                       "images, queries.jsonl, qrels/SPLIT.tsv); its corpus becomes DIR/corpus.h5")
    reval.add_argument("--split", default="test", help="with --beir: the qrels file (default: test)")
    reval.add_argument("--output", help="metrics JSON (a TREC run file goes beside it)")
    reval.add_argument("--index", help="use this index instead of encoding the store")
    reval.add_argument("--batch-size", type=int, default=32)
    reval.add_argument("--sweep-weights", action="store_true",
                       help="with --mode hybrid: also score both fusions with BM25's share of the weight at 0, "
                            "0.1, ..., 1 and report the best. Run it on queries of documents held out from "
                            "training, not on the test queries, then search and test with that --fusion and "
                            "--weights")
    add_pool_factor(reval, "before the search (not with --index: pool it when indexing)")
    add_search_mode(reval, "dense")
    reval.set_defaults(func=_retriever_eval)
    rdemo = retriever.add_parser("demo", help="built-in documents -> tiny retriever from scratch -> held-out metrics")
    rdemo.add_argument("--out", default="runs/demo-retrieval")
    rdemo.add_argument("--data", default="data/synth-docs")
    rdemo.add_argument("--quick", action="store_true", help="a much smaller run, to check the pipeline")
    rdemo.set_defaults(func=_retriever_demo)
