#!/usr/bin/env bash
# Runs on a GPU machine (PyTorch 2.11, no Rust, no network) from the repository root, with the
# bundle from scripts/gpu_bundle.sh in .device/. Writes logs and JSON under $OUT (or results/gpu),
# at most 8 files (what a device call brings back).
#   1. the CUDA-graph, golden, consistency, speculative and library tests on CUDA
#   2. random-weight LLaMA-2-7B and 13B shapes in bf16: plain decode eager and with CUDA graphs
#      against the bandwidth floor, the weight products alone, the draft step cost c for
#      N = 4, 8, 12 and the verify cost of k+1 = 1..9 positions (with graphs)
#   3. EESD end to end on CUDA: `eesd-infer bench` over GSM8K, HumanEval and MT-Bench on a
#      random SmolLM2-shaped base (the real weights cannot travel) with a head distilled there
#      for 200 steps; greedy, --require-identical, graphs on
#   4. teacher generation and distillation throughput and peak memory, SmolLM2 shape (from 3)
#      and a random LLaMA-2-13B shape
set -uo pipefail
out=${OUT:-results/gpu}
mkdir -p "$out"
torch_lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$torch_lib:${LD_LIBRARY_PATH:-}"
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; } | tee "$out/gpu.txt"
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())' | tee -a "$out/gpu.txt"
[ -f .device/bin.tar.xz ] && tar -C .device -xJf .device/bin.tar.xz
# The test executables look for fixtures under the path they were built at.
built_at=$(cat .device/built_at)
if [ "$built_at" != "$PWD" ] && [ ! -e "$built_at" ]; then mkdir -p "$(dirname "$built_at")"; ln -s "$PWD" "$built_at"; fi

export EESD_TEST_DEVICE=cuda
status=0
for t in cuda_graphs golden consistency speculative; do
  echo "== $t (cuda)" | tee -a "$out/tests.log"
  # The CUDA-graph tests are #[ignore = "needs CUDA"]: asked for here, where CUDA is.
  extra=(); [ "$t" = cuda_graphs ] && extra=(--include-ignored)
  timeout 180 ".device/bin/test-$t-test" --test-threads 1 "${extra[@]}" 2>&1 | tail -n 25 | tee -a "$out/tests.log" || status=1
done
echo "== .device/bin/test-eesd_infer-lib" | tee -a "$out/tests.log"
timeout 60 .device/bin/test-eesd_infer-lib --test-threads 1 2>&1 | tail -n 3 | tee -a "$out/tests.log" || status=1

for shape in llama2-7b llama2-13b; do
  echo "== $shape shape, bf16" | tee -a "$out/shape.log"
  timeout 120 .device/bin/eesd-infer bench-shape --shape $shape --device cuda --dtype bf16 \
    --exit-layers 4,8,12 --max-draft 8 --context 256 --json-out "$out/shape_${shape//-/_}.json" 2>&1 \
    | grep -v '^{' | tee -a "$out/shape.log"
done

echo "== SmolLM2-135M shape (random weights, bf16): gen + distill on CUDA" | tee -a "$out/train.log"
python3 scripts/random_model.py .device/smollm2 /tmp/smollm2-random 2>&1 | tail -n 1
timeout 90 .device/bin/eesd-train gen --model /tmp/smollm2-random --device cuda --dtype bf16 \
  --data .device/sharegpt128.parquet --out /tmp/teacher --limit 128 --max-new-tokens 128 --batch-size 64 2>&1 | tail -n 1 | tee -a "$out/train.log"
timeout 90 .device/bin/eesd-train distill --model /tmp/smollm2-random --device cuda --dtype bf16 \
  --data /tmp/teacher --out /tmp/distill --exit-layer 4 --draft-vocab 8192 --steps 200 --accum 4 \
  --eval-every 100 --eval-examples 8 2>&1 | tail -n 1 | tee -a "$out/train.log"

echo "== EESD end to end (random SmolLM2-shaped base, head distilled above), bf16, CUDA graphs" | tee -a "$out/e2e.log"
timeout 150 .device/bin/eesd-infer bench --model /tmp/smollm2-random --head /tmp/distill/checkpoint \
  --device cuda --dtype bf16 --data .device/gsm8k.parquet --data .device/humaneval.parquet \
  --data .device/mtbench.parquet --num-prompts 8 --max-new-tokens 128 \
  --controllers thompson,fixed:1,fixed:3 --require-identical --out /tmp/e2e 2>&1 | tail -n 16 | tee -a "$out/e2e.log" || status=1
cp /tmp/e2e/bench.json "$out/e2e_bench.json" 2>/dev/null

echo "== LLaMA-2-13B shape (random weights, SmolLM2 tokenizer, bf16): gen + distill on CUDA" | tee -a "$out/train.log"
timeout 120 python3 scripts/random_shape.py llama2-13b .device/smollm2 /tmp/llama2-13b-random 2>&1 | tail -n 1 | tee -a "$out/train.log"
timeout 120 .device/bin/eesd-train gen --model /tmp/llama2-13b-random --device cuda --dtype bf16 \
  --data .device/sharegpt128.parquet --out /tmp/teacher13 --limit 64 --max-new-tokens 64 --batch-size 64 2>&1 | tail -n 1 | tee -a "$out/train.log"
timeout 120 .device/bin/eesd-train distill --model /tmp/llama2-13b-random --device cuda --dtype bf16 \
  --data /tmp/teacher13 --out /tmp/distill13 --exit-layer 6 --draft-vocab 8192 --steps 40 --accum 4 \
  --eval-every 40 --eval-examples 4 2>&1 | tail -n 1 | tee -a "$out/train.log"
echo "tests status: $status"
exit $status
