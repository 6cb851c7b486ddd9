#!/usr/bin/env bash
# Does a third head layer pay? Three measurements (docs/training.md, "Head depth"):
#
#   1. E = 3 against E = 2, both from their base layers (4..4+E) with the final-state input,
#      on the same self-generated answers and steps (1.5 epochs, lr 1e-3);
#   2. the shipped head grown to E = 3 (the new layer starts as an identity block, so training
#      starts from the shipped head's agreement) and trained 1.5 epochs more at lr 3e-4, then
#      scored and exported by eesd-train (held-out agreement, the product's metric);
#   3. the grown head against the shipped one in `eesd-infer bench`, in alternating runs
#      (ROUNDS, default 2), greedy, 8 prompts x 128 tokens per dataset.
#
# Needs `just train-self`'s features (data/features/self.pt, data/features/heldout.pt). About
# 75 minutes on a 2-core CPU. Outputs: results/head_depth/.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
M=data/models/smollm2-135m-instruct
H=data/heads/smollm2-135m-instruct
F=data/features
OUT=results/head_depth
mkdir -p "$OUT" "$F/run-grow3"
for f in "$F/self.pt" "$F/heldout.pt"; do
  [ -f "$f" ] || { echo "missing $f: run \`just train-self\` first" >&2; exit 1; }
done
for L in 3 2; do
  python scripts/head_levers.py train --train "$F/self.pt" --eval "$F/heldout.pt" --layers $L --fin 1 \
    --epochs 1.5 --lr 1e-3 --bf16 0 --eval-every 192 --out "$OUT/from_scratch_e$L.json"
done
python scripts/head_levers.py train --train "$F/self.pt" --eval "$F/heldout.pt" --init $H --layers 3 \
  --fin 1 --epochs 1.5 --lr 3e-4 --bf16 0 --eval-every 100 --out "$OUT/grown_training.json" \
  --export "$F/run-grow3/checkpoint"
./target/release/eesd-train distill --model $M --device cpu --data data/teacher/smollm2-135m/sharegpt-self \
  --eval-data data/teacher/smollm2-135m/heldout-bf16 --out "$F/run-grow3" --exit-layer 4 \
  --eval-examples 72 --max-seq 384 --eval-only --export "$F/grow3-head"
for r in $(seq 1 "${ROUNDS:-2}"); do
  for arm in grow3:$F/grow3-head shipped:$H; do
    ./target/release/eesd-infer bench --model $M --head "${arm#*:}" --data data/corpora/gsm8k.parquet \
      --data data/corpora/humaneval.parquet --data data/corpora/mtbench.parquet --num-prompts 8 \
      --max-new-tokens 128 --controllers off,thompson,fixed:1,fixed:2 --require-identical \
      --out "$F/hh-${arm%%:*}-$r"
    cp "$F/hh-${arm%%:*}-$r/bench.json" "$OUT/hh-${arm%%:*}-$r.json"
  done
done
