#!/usr/bin/env bash
# Page retrieval on real PDFs, end to end through vlmkit's commands (examples/real_pdfs/README.md).
#
#   examples/real_pdfs/run.sh [OUT]        (default OUT: runs/real-pdfs)
#
# Manuals from Debian's documentation packages, split by document (fetch.py); queries written
# and filtered by SmolLM2-135M-Instruct from each page's text layer; BM25 hard negatives; a
# dense retriever from the pretrained composition; held-out documents searched by BM25, by the
# retriever and by both fused. Every step skips what is already done, so a rerun resumes.
# Settings through the environment: STEPS (retriever training steps, default 32), VIEWS
# (model.max_slices: 1, the default, = the whole page as one 224-px view), DPI (default 96),
# SETTINGS (more `--set` overrides for the retriever, e.g. "retrieval.page_text_tokens=128") and
# NAME (the retriever's folder under OUT; default retriever-views$VIEWS-steps$STEPS).
set -euo pipefail
cd "$(dirname "$0")/../.."
VLMKIT=${VLMKIT:-.venv/bin/vlmkit}
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${1:-runs/real-pdfs}
DATA=${DATA:-data/real-pdfs}
LM=HuggingFaceTB/SmolLM2-135M-Instruct
STEPS=${STEPS:-32}
VIEWS=${VIEWS:-1}
DPI=${DPI:-96}
SETTINGS=${SETTINGS:-}
mkdir -p "$OUT"

[ -d "$DATA/test" ] || $PYTHON -m examples.real_pdfs.fetch --out "$DATA"
$VLMKIT models fetch

for side in train test; do
  $VLMKIT docs render "$DATA/$side" --out "$OUT/$side.h5" --dpi "$DPI"
  $VLMKIT docs gen-queries --model $LM --docs "$OUT/$side.h5" --out "$OUT/${side}_generated.jsonl"
  $VLMKIT docs filter-queries --model $LM --queries "$OUT/${side}_generated.jsonl" --out "$OUT/${side}_filtered.jsonl"
done
# Every kept query of a training document trains; every kept query of a held-out one tests.
$VLMKIT docs make-pairs --queries "$OUT/train_filtered.jsonl" --out "$OUT/train" --test-fraction 0
$VLMKIT docs make-pairs --queries "$OUT/test_filtered.jsonl" --out "$OUT/test" --test-fraction 1
$VLMKIT docs mine-negatives --pairs "$OUT/train/train_pairs.jsonl" --docs "$OUT/train.h5" \
  --out "$OUT/train/mined_pairs.jsonl" --per-query 2 --skip same-page

MODEL="$OUT/${NAME:-retriever-views$VIEWS-steps$STEPS}"
# shellcheck disable=SC2086  # SETTINGS is a list of overrides, split on spaces
[ -f "$MODEL/config.json" ] || $VLMKIT retriever train retriever-pretrained \
  --train-data "$OUT/train/mined_pairs.jsonl" --docs "$OUT/train.h5" --output-dir "$MODEL" \
  --max-steps "$STEPS" --set train.batch_size=16 retrieval.hard_negatives=1 "model.max_slices=$VIEWS" \
  train.save_steps=100000 $SETTINGS

EVAL=(--docs "$OUT/test.h5" --queries "$OUT/test/test_queries.jsonl" --qrels "$OUT/test/test_qrels.tsv")
$VLMKIT retriever eval "${EVAL[@]}" --mode lexical --output "$OUT/bm25.json" > /dev/null
$VLMKIT retriever eval "${EVAL[@]}" --model "$MODEL" --mode dense --output "$MODEL/dense.json" > /dev/null
$VLMKIT retriever eval "${EVAL[@]}" --model "$MODEL" --mode hybrid --output "$MODEL/hybrid.json" > /dev/null
$PYTHON -m examples.real_pdfs.report "$OUT" "$MODEL"
