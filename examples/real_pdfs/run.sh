#!/usr/bin/env bash
# Page retrieval on real PDFs, end to end through vlmkit's commands (examples/real_pdfs/README.md).
#
#   examples/real_pdfs/run.sh [OUT]        (default OUT: runs/real-pdfs)
#
# Manuals from Debian's documentation packages, split by document (fetch.py) into train, valid
# and test; queries written and filtered by SmolLM2-135M-Instruct from each page's text layer; a
# dense retriever from the pretrained composition trained on `train`; the hybrid search's fusion
# and weights chosen on `valid`; the test documents searched by BM25, by the retriever and by
# both fused. Every step skips what is already done, so a rerun resumes.
# Settings through the environment: STEPS (retriever training steps, default 64), VIEWS
# (model.max_slices: 1, the default, = the whole page as one view), DPI (default 96), SETTINGS
# (the retriever's `--set` overrides; the default reads the start of each page's text layer, see
# below) and NAME (the retriever's folder under OUT; by default named after VIEWS, STEPS and
# SETTINGS).
set -euo pipefail
cd "$(dirname "$0")/../.."
VLMKIT=${VLMKIT:-.venv/bin/vlmkit}
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${1:-runs/real-pdfs}
DATA=${DATA:-data/real-pdfs}
LM=HuggingFaceTB/SmolLM2-135M-Instruct
STEPS=${STEPS:-64}
VIEWS=${VIEWS:-1}
DPI=${DPI:-96}
# DINOv2 does not read text, so the retriever reads the first 128 tokens of each page's text layer
# beside its 112-px image, mean-pooled; in-batch negatives only, and an LM learning rate for a
# short run (the recipe's 2e-5 is made for long ones). docs/retrieval.md has the measurements.
SETTINGS=${SETTINGS:-retrieval.page_text_tokens=128 retrieval.pooling=mean retrieval.hard_negatives=0 \
model.image_size=112 model.crop_size=112 train.lr.lm=1e-4}
mkdir -p "$OUT"

[ -f "$DATA/split.txt" ] || $PYTHON -m examples.real_pdfs.fetch --out "$DATA"
$VLMKIT models fetch
# Rendering and query writing add to what OUT holds, so one OUT holds one split of the documents.
if [ -f "$OUT/split.txt" ]; then
  cmp -s "$DATA/split.txt" "$OUT/split.txt" || { echo "$OUT was made from another split of the documents" \
    "($OUT/split.txt against $DATA/split.txt): give another OUT" >&2; exit 1; }
elif [ -e "$OUT/train.h5" ]; then
  echo "$OUT holds page stores of an older split of the documents (no split.txt): give another OUT" >&2; exit 1
else
  cp "$DATA/split.txt" "$OUT/split.txt"
fi

for side in train valid test; do
  $VLMKIT docs render "$DATA/$side" --out "$OUT/$side.h5" --dpi "$DPI"
  $VLMKIT docs gen-queries --model $LM --docs "$OUT/$side.h5" --out "$OUT/${side}_generated.jsonl"
  $VLMKIT docs filter-queries --model $LM --queries "$OUT/${side}_generated.jsonl" --out "$OUT/${side}_filtered.jsonl"
done
# Every kept query of a training document trains; every kept query of a held-out one tests.
$VLMKIT docs make-pairs --queries "$OUT/train_filtered.jsonl" --out "$OUT/train" --test-fraction 0
$VLMKIT docs make-pairs --queries "$OUT/valid_filtered.jsonl" --out "$OUT/valid" --test-fraction 1
$VLMKIT docs make-pairs --queries "$OUT/test_filtered.jsonl" --out "$OUT/test" --test-fraction 1
# BM25 negatives, for SETTINGS with retrieval.hard_negatives above 0.
$VLMKIT docs mine-negatives --pairs "$OUT/train/train_pairs.jsonl" --docs "$OUT/train.h5" \
  --out "$OUT/train/mined_pairs.jsonl" --per-query 2 --skip same-page

# One folder per setting: a finished model of other settings is never taken for this one.
MODEL="$OUT/${NAME:-retriever-views$VIEWS-steps$STEPS-$(printf %s "$SETTINGS" | md5sum | cut -c1-8)}"
# shellcheck disable=SC2086  # SETTINGS is a list of overrides, split on spaces
[ -f "$MODEL/config.json" ] || $VLMKIT retriever train retriever-pretrained \
  --train-data "$OUT/train/mined_pairs.jsonl" --docs "$OUT/train.h5" --output-dir "$MODEL" \
  --max-steps "$STEPS" --set train.batch_size=16 "model.max_slices=$VIEWS" train.save_steps=100000 $SETTINGS

# The fusion and its weights: the best on the validation documents, never chosen on the test.
$VLMKIT retriever eval --docs "$OUT/valid.h5" --queries "$OUT/valid/test_queries.jsonl" \
  --qrels "$OUT/valid/test_qrels.tsv" --model "$MODEL" --mode hybrid --sweep-weights \
  --output "$MODEL/valid_sweep.json" > /dev/null
best=$($PYTHON -c 'import json, sys; r = json.load(open(sys.argv[1])); print(r["best_fusion"], *r["best_weights"])' \
  "$MODEL/valid_sweep.json")
read -r FUSION DENSE LEXICAL <<< "$best"

EVAL=(--docs "$OUT/test.h5" --queries "$OUT/test/test_queries.jsonl" --qrels "$OUT/test/test_qrels.tsv")
$VLMKIT retriever eval "${EVAL[@]}" --mode lexical --output "$OUT/bm25.json" > /dev/null
$VLMKIT retriever eval "${EVAL[@]}" --model "$MODEL" --mode dense --output "$MODEL/dense.json" > /dev/null
$VLMKIT retriever eval "${EVAL[@]}" --model "$MODEL" --mode hybrid --fusion "$FUSION" \
  --weights "$DENSE" "$LEXICAL" --output "$MODEL/hybrid.json" > /dev/null
$PYTHON -m examples.real_pdfs.report "$OUT" "$MODEL"
