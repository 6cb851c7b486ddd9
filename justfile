# EESD: early-exiting speculative decoding in Rust on libtorch.
# Quick start: `just demo`, `just test`. Both bootstrap what they need (scripts/setup.sh).

set shell := ["bash", "-euo", "pipefail", "-c"]

# tch finds libtorch through the project venv's torch 2.11.0.
export LIBTORCH_USE_PYTORCH := "1"
export VIRTUAL_ENV := justfile_directory() / ".venv"
export PATH := justfile_directory() / ".venv/bin" + ":" + env_var("PATH")

model := "data/models/smollm2-135m-instruct"
head := "data/heads/smollm2-135m-instruct"
bin := "target/release/eesd-infer"
# The three held-out benchmarks every EESD bench recipe runs over.
evals := "--data data/corpora/gsm8k.parquet --data data/corpora/humaneval.parquet --data data/corpora/mtbench.parquet"

# List the recipes.
default:
    @just --list

# Create the venv, the default model folder and the corpora (idempotent, once).
setup:
    scripts/setup.sh

# Build the release binaries (everything, tests too, is built in release).
build: setup
    cargo build --release --workspace

# EESD with the committed head: text, statistics, and the speedup over plain decoding in one run,
# on open-ended questions (MT-Bench) and on requests that edit a given text (the grounded set),
# with the head alone and with drafts copied from the prompt as well.
demo prompt="Explain in three sentences why the sky is blue.": build
    {{bin}} generate --model {{model}} --head {{head}} --chat --max-new-tokens 128 --prompt "{{prompt}}"
    {{bin}} bench --model {{model}} --head {{head}} --data data/corpora/mtbench.parquet --data data/corpora/grounded.parquet --num-prompts 2 --max-new-tokens 96 --max-prompt-tokens 512 --controllers off,thompson,thompson@head+lookup --out results/demo --force

# Train a head from a recipe (teacher data, then distillation), e.g. configs/smollm2-135m.toml.
train config: build
    target/release/eesd-train run {{config}}

# The shipped head's first stage (the recipe's [gen*] teacher data, then the base's features
# computed once, f32, every 2nd ShareGPT conversation; only the head trains: 2 layers +
# final-state input; eesd-train evaluates it and exports it with its metrics). About an hour on
# a 2-core CPU. `train-self` continues it.
train-features config="configs/smollm2-135m.toml" out=(head + "-stage1"): build
    target/release/eesd-train run {{config}} --gen-only
    mkdir -p data/features/run
    python scripts/head_levers.py features data/teacher/smollm2-135m/sharegpt-ref data/features/ref_half.pt 384 2 f32
    python scripts/head_levers.py features data/teacher/smollm2-135m/heldout-bf16 data/features/heldout.pt 512
    python scripts/head_levers.py train --train data/features/ref_half.pt --eval data/features/heldout.pt --epochs 2.0 --layers 2 --fin 1 --bf16 0 --eval-every 110 --out results/head_features.json --export data/features/run/checkpoint
    python scripts/plot.py features results/head_features.json
    target/release/eesd-train distill --model {{model}} --device cpu --data data/teacher/smollm2-135m/sharegpt-ref --eval-data data/teacher/smollm2-135m/heldout-bf16 --out data/features/run --exit-layer 4 --eval-examples 72 --max-seq 384 --eval-only --export {{out}}

# The shipped head's recipe, second stage: the first stage's head (`train-features`, kept as
# data/heads/smollm2-135m-instruct-stage1) continued for one epoch on the base's own greedy bf16
# answers to the first `limit` ShareGPT prompts (the data that moved the head most, README
# "Self-generated answers"). Generation resumes where it stopped: about 40 prompts a minute on
# a 2-core CPU (4,072 prompts: 100 min); features and training about 40 minutes more.
train-self limit="4072" out=head: build
    target/release/eesd-train run configs/smollm2-135m.toml --gen-only
    target/release/eesd-train gen --model {{model}} --device cpu --data data/corpora/sharegpt.parquet --out data/teacher/smollm2-135m/sharegpt-self --limit {{limit}} --max-new-tokens 256 --max-prompt-tokens 256 --batch-size 64 --chunk 64
    python scripts/head_levers.py features data/teacher/smollm2-135m/sharegpt-self data/features/self.pt 384 1 f32
    [ -f data/features/heldout.pt ] || python scripts/head_levers.py features data/teacher/smollm2-135m/heldout-bf16 data/features/heldout.pt 512
    python scripts/head_levers.py train --train data/features/self.pt --eval data/features/heldout.pt --init data/heads/smollm2-135m-instruct-stage1 --epochs 1.0 --layers 2 --fin 1 --bf16 0 --lr 3e-4 --eval-every 100 --out results/head_self.json --export data/features/run-self/checkpoint
    python scripts/plot.py features results/head_self.json
    target/release/eesd-train distill --model {{model}} --device cpu --data data/teacher/smollm2-135m/sharegpt-self --eval-data data/teacher/smollm2-135m/heldout-bf16 --out data/features/run-self --exit-layer 4 --eval-examples 72 --max-seq 384 --eval-only --export {{out}}

# Every controller on GSM8K, HumanEval and MT-Bench prompts with the committed head: table, JSON, PNG.
bench prompts="8" tokens="128": build
    {{bin}} bench --model {{model}} --head {{head}} {{evals}} --num-prompts {{prompts}} --max-new-tokens {{tokens}} --out results --require-identical --force
    {{bin}} bench --model {{model}} --head {{head}} {{evals}} --num-prompts {{prompts}} --max-new-tokens {{tokens}} --temperature 0.7 --top-p 0.9 --controllers off,thompson,thompson-calibrated,confidence:0.5,fixed:1,fixed:2 --out results/sampled --force
    python scripts/plot.py bench results/bench.json

# Drafts copied from the text (issue 21): plain, head, lookup and both, greedy (must be identical)
# and sampled, on the grounded set (prompts that quote or edit a text) and the three benchmarks.
bench-lookup prompts="8" tokens="128": build
    {{bin}} bench --model {{model}} --head {{head}} --data data/corpora/grounded.parquet {{evals}} --num-prompts {{prompts}} --max-new-tokens {{tokens}} --max-prompt-tokens 512 --controllers off,thompson,thompson@lookup,thompson@head+lookup --out results/lookup --require-identical --force
    {{bin}} bench --model {{model}} --head {{head}} --data data/corpora/grounded.parquet --num-prompts {{prompts}} --max-new-tokens {{tokens}} --max-prompt-tokens 512 --temperature 0.7 --top-p 0.9 --controllers off,thompson,thompson@lookup,thompson@head+lookup --out results/lookup/sampled --force
    python scripts/plot.py bench results/lookup/bench.json

# f32 decodes at about half bf16's speed here, so fewer controllers (5 minutes on 2 cores).
# The greedy bench in f32 (the golden-test dtype): table, JSON, PNG under results/f32.
bench-f32 prompts="8" tokens="128": build
    {{bin}} bench --model {{model}} --head {{head}} --dtype f32 {{evals}} --num-prompts {{prompts}} --max-new-tokens {{tokens}} --controllers off,thompson,thompson-calibrated,confidence:0.5,fixed:1,fixed:2 --out results/f32 --require-identical --force
    python scripts/plot.py bench results/f32/bench.json

# bf16 exactness: every controller's greedy output vs plain decoding, 200 prompts (50 per corpus).
identity prompts="50" tokens="64": build
    {{bin}} bench --model {{model}} --head {{head}} --dtype bf16 {{evals}} --data data/corpora/sharegpt.parquet --num-prompts {{prompts}} --max-new-tokens {{tokens}} --controllers off,thompson,thompson-calibrated,heuristic,confidence:0.5,fixed:1,fixed:3,fixed:8 --out results/identity --require-identical --force

# Run every test (unit, golden against transformers, consistency, CLI, real model); the last
# line totals every test binary's counts (ignored tests, the CUDA ones here, count as skipped).
test: setup
    mkdir -p target
    cargo test --release --workspace 2>&1 | tee target/test.log
    awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, i; exit (f > 0 || p == 0) }' target/test.log

# Formatting and lints, as CI wants them.
lint:
    cargo fmt --all -- --check
    cargo clippy --release --workspace --all-targets -- -D warnings

# Plain decode tok/s in interleaved rounds: ours, transformers, llama.cpp (llama=PATH/llama-bench), floor.
bench-decode rounds="3" prompts="4" tokens="64" llama="": build
    python scripts/bench_decode.py --model {{model}} --rounds {{rounds}} --num-prompts {{prompts}} --max-new-tokens {{tokens}} {{ if llama != "" { "--llama-bench " + llama } else { "" } }} --out results/bench_decode.json

# Prompt tok/s and TTFT at 128/512/2048 tokens, every dtype, vs llama.cpp pp (llama=PATH) and the FMA peak.
bench-prefill rounds="3" llama="": build
    python scripts/bench_prefill.py --model {{model}} --rounds {{rounds}} {{ if llama != "" { "--llama-bench " + llama } else { "" } }} --out results/bench_prefill.json
    python scripts/plot.py prefill results/bench_prefill.json

# The OpenAI-compatible server with the committed head on 127.0.0.1:PORT (Ctrl-C stops it).
serve port="8000": build
    {{bin}} serve --model {{model}} --head {{head}} --port {{port}}

# Serving under load: 1, 2, 4, 8 concurrent streams against our server (plain and thompson per
# request) and llama.cpp's llama-server (llama=PATH) on the same f16 weights: JSON, table, plot.
bench-serve requests="8" tokens="64" rounds="2" llama="": build
    python scripts/bench_serve.py --model {{model}} --head {{head}} --requests {{requests}} --max-tokens {{tokens}} --rounds {{rounds}} {{ if llama != "" { "--llama-server " + llama } else { "" } }} --out results/serve

# Verify cost: weight products of 1-16 rows per dtype as multiples of one row, vs torch and the roofline.
bench-kernels reps="30": build
    {{bin}} bench-kernels --reps {{reps}} --json-out results/bench_kernels.json

# Fuzz every parser a user's file reaches (head.json, config.json, recipes, prompt files, parquet),
# each for `seconds`, from the committed seeds (fuzz/seeds); needs the nightly toolchain, installs
# cargo-fuzz once. Not part of `just test`.
fuzz seconds="600": setup
    command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
    for t in head_json config_json recipe_toml prompt_jsonl parquet; do mkdir -p fuzz/corpus/$t; cargo +nightly fuzz run --sanitizer none --release $t fuzz/corpus/$t fuzz/seeds/$t -- -max_total_time={{seconds}} -rss_limit_mb=4096 2>&1 | tail -n 20; done

# Regenerate the committed references (tiny golden models; transformers' greedy ids on the real model).
references: setup
    python scripts/make_golden.py
    python scripts/reference_greedy.py {{model}} data/corpora crates/eesd-infer/tests/fixtures/smollm2_greedy.jsonl

# Bundle binaries and CUDA tests into .device/ for scripts/gpu_check.sh on a GPU machine (torch 2.11, no Rust).
gpu-bundle: setup
    scripts/gpu_bundle.sh
