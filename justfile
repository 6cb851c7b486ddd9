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

# List the recipes.
default:
    @just --list

# Create the venv, the default model folder and the corpora (idempotent, once).
setup:
    scripts/setup.sh

# Build the release binaries (everything, tests too, is built in release).
build: setup
    cargo build --release --workspace

# EESD with the committed head: text, statistics, and the speedup over plain decoding in the same run.
demo prompt="Explain in three sentences why the sky is blue.": build
    {{bin}} generate --model {{model}} --head {{head}} --chat --max-new-tokens 128 --prompt "{{prompt}}"
    {{bin}} bench --model {{model}} --head {{head}} --data data/corpora/mtbench.parquet --num-prompts 2 --max-new-tokens 96 --controllers off,thompson --out results/demo

# Train a head from a recipe (teacher data, then distillation), e.g. configs/smollm2-135m.toml.
train config: build
    target/release/eesd-train run {{config}}

# Every controller on GSM8K, HumanEval and MT-Bench prompts with the committed head: table, JSON, PNG.
bench prompts="8" tokens="128": build
    {{bin}} bench --model {{model}} --head {{head}} --data data/corpora/gsm8k.parquet --data data/corpora/humaneval.parquet --data data/corpora/mtbench.parquet --num-prompts {{prompts}} --max-new-tokens {{tokens}} --out results
    python scripts/plot.py bench results/bench.json

# Exactness in bf16 (the default dtype): every controller's greedy output against plain decoding
# on 200 prompts (50 from each corpus); fails on any difference. Table in results/identity/.
identity prompts="50" tokens="64": build
    {{bin}} bench --model {{model}} --head {{head}} --dtype bf16 --data data/corpora/gsm8k.parquet --data data/corpora/humaneval.parquet --data data/corpora/mtbench.parquet --data data/corpora/sharegpt.parquet --num-prompts {{prompts}} --max-new-tokens {{tokens}} --controllers off,thompson,thompson-calibrated,heuristic,confidence:0.5,fixed:1,fixed:3,fixed:8 --out results/identity --require-identical

# Run every test (unit, golden against transformers, consistency, CLI, real model).
test: setup
    cargo test --release --workspace

# Formatting and lints, as CI wants them.
lint:
    cargo fmt --all -- --check
    cargo clippy --release --workspace --all-targets -- -D warnings

# Plain decode tokens/s vs this machine's bandwidth floor vs transformers, one run; table to README format.
bench-decode prompts="8" tokens="128": build
    python scripts/bench_decode.py --model {{model}} --num-prompts {{prompts}} --max-new-tokens {{tokens}} --out results/bench_decode.json

# Regenerate the committed references (tiny golden models; transformers' greedy ids on the real model).
references: setup
    python scripts/make_golden.py
    python scripts/reference_greedy.py {{model}} data/corpora crates/eesd-infer/tests/fixtures/smollm2_greedy.jsonl

# Bundle binaries and CUDA tests into .device/ for scripts/gpu_check.sh on a GPU machine (torch 2.11, no Rust).
gpu-bundle: setup
    scripts/gpu_bundle.sh
