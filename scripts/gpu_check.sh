#!/usr/bin/env bash
# Runs on a GPU machine (PyTorch 2.11, no Rust, no network) from the repository root, with the
# bundle from scripts/gpu_bundle.sh in .device/. Writes logs and JSON under $OUT (or results/gpu).
#   1. the golden, consistency, speculative and trainer tests on CUDA (EESD_TEST_DEVICE=cuda)
#   2. a random-weight LLaMA-2-7B-shaped model in bf16: plain decode vs the bandwidth floor,
#      the draft step cost c for N = 4, 8, 12, the verify cost of k+1 = 1..9 positions
#   3. teacher generation and distillation throughput on CUDA (random SmolLM2-shaped weights,
#      the real tokenizer), bf16 base
set -uo pipefail
out=${OUT:-results/gpu}
mkdir -p "$out"
torch_lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$torch_lib:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())' | tee -a "$out/gpu.txt"
# The test executables look for fixtures under the path they were built at.
built_at=$(cat .device/built_at)
if [ "$built_at" != "$PWD" ] && [ ! -e "$built_at" ]; then mkdir -p "$(dirname "$built_at")"; ln -s "$PWD" "$built_at"; fi

export EESD_TEST_DEVICE=cuda
status=0
for t in golden consistency speculative; do
  echo "== $t (cuda)" | tee -a "$out/tests.log"
  timeout 300 ".device/bin/test-$t-test" --test-threads 1 2>&1 | tail -n 25 | tee -a "$out/tests.log" || status=1
done
for t in .device/bin/test-eesd_infer-lib; do
  echo "== $t" | tee -a "$out/tests.log"
  timeout 120 "$t" --test-threads 1 2>&1 | tail -n 4 | tee -a "$out/tests.log" || status=1
done

echo "== LLaMA-2-7B shape, bf16" | tee -a "$out/shape.log"
timeout 240 .device/bin/eesd-infer bench-shape --shape llama2-7b --device cuda --dtype bf16 \
  --exit-layers 4,8,12 --max-draft 8 --context 256 --json-out "$out/shape_llama2_7b.json" 2>&1 | tee -a "$out/shape.log"
echo "== gen + distill throughput on CUDA (random SmolLM2-135M-shaped weights, bf16 base)" | tee -a "$out/train.log"
python3 scripts/random_model.py .device/smollm2 /tmp/smollm2-random 2>&1 | tail -n 1
timeout 150 .device/bin/eesd-train gen --model /tmp/smollm2-random --device cuda --dtype bf16 \
  --data .device/sharegpt128.parquet --out /tmp/teacher --limit 128 --max-new-tokens 128 --batch-size 64 2>&1 | tail -n 2 | tee -a "$out/train.log"
timeout 150 .device/bin/eesd-train distill --model /tmp/smollm2-random --device cuda --dtype bf16 \
  --data /tmp/teacher --out /tmp/distill --exit-layer 10 --draft-vocab 8192 --steps 200 --accum 4 \
  --eval-every 100 --eval-examples 8 2>&1 | tail -n 2 | tee -a "$out/train.log"
echo "tests status: $status"
exit $status
