#!/usr/bin/env bash
# Two eesd-infer binaries against each other on the same prompts, interleaved (A, B, B, A, ...):
# `eesd-infer bench` with plain decoding and thompson on GSM8K, HumanEval and MT-Bench, each run
# into its own folder, then the medians per binary and their ratio (scripts/ab_summary.py).
# Usage: scripts/ab_bench.sh OLD_BIN NEW_BIN OUT_DIR [ROUNDS] [PROMPTS] [TOKENS]
set -euo pipefail
cd "$(dirname "$0")/.."
old=$1 new=$2 out=$3 rounds=${4:-3} prompts=${5:-8} tokens=${6:-128}
[ -x "$old" ] && [ -x "$new" ] || { echo "usage: $0 OLD_BIN NEW_BIN OUT_DIR [ROUNDS] [PROMPTS] [TOKENS]" >&2; exit 2; }
mkdir -p "$out"
run() { # run TAG BIN ROUND
  "$2" bench --model data/models/smollm2-135m-instruct --head data/heads/smollm2-135m-instruct \
    --data data/corpora/gsm8k.parquet --data data/corpora/humaneval.parquet --data data/corpora/mtbench.parquet \
    --num-prompts "$prompts" --max-new-tokens "$tokens" --controllers off,thompson --require-identical \
    --out "$out/$1-$3" > /dev/null 2>> "$out/log.txt"
  echo "$(date +%H:%M:%S) $1 round $3 done" | tee -a "$out/log.txt" >&2
}
for r in $(seq 1 "$rounds"); do
  # The order alternates by round, so drift within a round hits both alike.
  if [ $((r % 2)) -eq 1 ]; then run old "$old" "$r"; run new "$new" "$r"; else run new "$new" "$r"; run old "$old" "$r"; fi
done
.venv/bin/python scripts/ab_summary.py "$out"
