#!/usr/bin/env bash
# Which training data moves the first-stage head (data/heads/smollm2-135m-instruct-stage1,
# `just train-features`) more: the base's own answers or ShareGPT's?
#
# Takes the first LIMIT ShareGPT prompts (default 400), keeps those that head was not
# trained on (it saw every 2nd conversation of the fixed corpus), and continues it
# for EPOCHS (default 2) over them twice, from the same start: once on the base's own greedy bf16
# answers (`eesd-train gen`, resumable) and once on ShareGPT's reference answers to the same
# prompts. Both arms are scored on the held-out answers (`head_levers.py train` prints the
# head's agreement before and after). About 25 minutes on a 2-core CPU, most of it generation.
# Needs the teacher data of the recipe (`eesd-train run configs/smollm2-135m.toml --gen-only`).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
M=data/models/smollm2-135m-instruct
REF=data/teacher/smollm2-135m/sharegpt-ref
OUT=data/features/ab
mkdir -p "$OUT"
./target/release/eesd-train gen --model $M --device cpu --data data/corpora/sharegpt.parquet \
  --out "$OUT/self" --limit "${LIMIT:-400}" --max-new-tokens 256 --max-prompt-tokens 256 \
  --batch-size 64 --chunk 64
# The reference arm: the same conversations from the fixed corpus.
python - "$OUT" "$REF" <<'PY'
import glob, os, sys
import pyarrow as pa, pyarrow.parquet as pq
out, ref = sys.argv[1], sys.argv[2]
ids = {i for f in glob.glob(f"{out}/self/*.parquet") for i in pq.read_table(f, columns=["id"])["id"].to_pylist()}
t = pa.concat_tables([pq.read_table(f) for f in sorted(glob.glob(f"{ref}/*.parquet"))])
keep = t.filter(pa.array([i in ids for i in t["id"].to_pylist()]))
os.makedirs(f"{out}/ref", exist_ok=True)
pq.write_table(keep, f"{out}/ref/part-00000.parquet")
print(f"{len(ids)} prompts answered by the base, {keep.num_rows} with a reference answer")
PY
for arm in self ref; do
  [ -f "$OUT/$arm.pt" ] || python scripts/head_levers.py features "$OUT/$arm" "$OUT/$arm.pt" 384 1 f32
done
[ -f "$OUT/heldout.pt" ] || python scripts/head_levers.py features data/teacher/smollm2-135m/heldout-bf16 "$OUT/heldout.pt" 512
for arm in self ref; do
  python scripts/head_levers.py train --train "$OUT/$arm.pt" --eval "$OUT/heldout.pt" \
    --init data/heads/smollm2-135m-instruct-stage1 --layers 2 --fin 1 --bf16 0 \
    --exclude "$REF:2" --epochs "${EPOCHS:-2}" --lr 3e-4 --eval-every 1000 --out "$OUT/$arm.json"
done
