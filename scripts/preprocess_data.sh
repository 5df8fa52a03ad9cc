#!/usr/bin/env bash
# Tokenize a JSONL or parquet corpus into PREFIX_{key}_document.bin/.idx (Megatron's format) for data.paths;
# the arguments are those of Megatron-LM's tools/preprocess_data.py (--json-keys, --tokenizer-type, ...).
#   bash scripts/preprocess_data.sh --input corpus.jsonl.gz --output-prefix data/corpus \
#       [--tokenizer-type T --tokenizer-model tok.model] [--json-keys text ...] [--workers N] [--skip-empty]
# Defaults here: one worker per CPU core and an eod token after every document (--no-append-eod
# turns it off); without --tokenizer-model, the bundled 4096-piece tokenizer. Train your own with
#   python -m megatron_lite.data.train_tokenizer --input corpus.jsonl --vocab-size 32000 --output tok
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
workers=$(nproc 2>/dev/null || echo 1)
exec "$PYTHON" -m megatron_lite.data.preprocess --workers "$workers" --append-eod "$@"
