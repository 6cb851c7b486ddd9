#!/usr/bin/env bash
# Builds everything a GPU machine needs to run the CUDA checks (scripts/gpu_check.sh) into
# .device/ (ignored by git, carried to the machine): the release binaries and the test
# executables, stripped. The machine has PyTorch 2.11 but no Rust toolchain and no network.
set -euo pipefail
cd "$(dirname "$0")/.."
export LIBTORCH_USE_PYTORCH=1 VIRTUAL_ENV="$PWD/.venv" PATH="$PWD/.venv/bin:$PATH"
rm -rf .device && mkdir -p .device/bin
cargo build --release --workspace
cargo test --release --workspace --no-run --message-format=json 2>/dev/null \
  | python3 -c '
import json, sys, shutil
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        name = m["target"]["name"].replace("-", "_")
        kind = m["target"]["kind"][0]
        # Only what runs on CUDA; a call carries at most 64 MiB.
        if (name, kind) not in {("golden", "test"), ("consistency", "test"), ("speculative", "test"),
                                ("cuda_graphs", "test"), ("eesd_infer", "lib")}:
            continue
        dest = f".device/bin/test-{name}-{kind}"
        shutil.copy(m["executable"], dest)
        print(dest)
'
cp target/release/eesd-infer target/release/eesd-train .device/bin/
strip .device/bin/*
# Test executables find their fixtures under the folder they were built in.
echo "$PWD" > .device/built_at
# For the throughput and end-to-end checks: the default model's config and tokenizer (no
# weights; random ones are made there), 128 ShareGPT prompts and the three benchmark corpora.
mkdir -p .device/smollm2
cp data/models/smollm2-135m-instruct/{config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja,generation_config.json} .device/smollm2/
.venv/bin/python -c '
import pyarrow.parquet as pq
pq.write_table(pq.read_table("data/corpora/sharegpt.parquet").slice(0, 128), ".device/sharegpt128.parquet")'
cp data/corpora/{gsm8k,humaneval,mtbench}.parquet .device/
# A call carries at most 64 MiB with the working tree: the binaries travel compressed.
tar -C .device -cJf .device/bin.tar.xz bin && rm -rf .device/bin
du -sh .device
