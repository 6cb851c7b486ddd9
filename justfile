# EESD: early-exiting speculative decoding in Rust on libtorch.
# Quick start: `just demo`, `just test`. Both bootstrap what they need (scripts/setup.sh).

set shell := ["bash", "-euo", "pipefail", "-c"]

# tch finds libtorch through the project venv's torch 2.11.0.
export LIBTORCH_USE_PYTORCH := "1"
export VIRTUAL_ENV := justfile_directory() / ".venv"
export PATH := justfile_directory() / ".venv/bin" + ":" + env_var("PATH")

model := "data/models/smollm2-135m-instruct"
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

# Generate with the default model and print the text, then the statistics.
demo prompt="What is the capital of France? Answer in one sentence, then name two famous sights there.": build
    {{bin}} generate --model {{model}} --chat --max-new-tokens 96 --prompt "{{prompt}}"

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

# Build the test executables a GPU machine runs (scripts/gpu_check.sh) into .device/.
gpu-bundle: setup
    scripts/gpu_bundle.sh
