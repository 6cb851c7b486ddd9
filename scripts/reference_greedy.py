"""Reference greedy continuations of the default model, from transformers.

Draws prompts from the parquet corpora (the first PER_SOURCE of each source whose chat-formatted
prompt is at most MAX_PROMPT_TOKENS long), applies the chat template, and records
`generate(do_sample=False, max_new_tokens=64)`. The Rust tests require our decoder to produce
exactly these ids. Output: crates/eesd-infer/tests/fixtures/smollm2_greedy.jsonl, one object per
prompt: id, prompt, prompt_ids, ids (generated, EOS included when it ended the answer).

usage: reference_greedy.py MODEL_DIR CORPORA_DIR OUT_JSONL
"""

import json
import sys

import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

SOURCES = ["gsm8k", "humaneval", "mtbench", "sharegpt"]
PER_SOURCE = 13
MAX_PROMPT_TOKENS = 320
NEW_TOKENS = 64


def main():
    model_dir, corpora, out = sys.argv[1:4]
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = []
    for src in SOURCES:
        table = pq.read_table(f"{corpora}/{src}.parquet", columns=["id", "prompt"]).to_pylist()
        taken = 0
        for r in table:
            ids = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}],
                                          add_generation_prompt=True, tokenize=True, return_dict=False)
            if len(ids) > MAX_PROMPT_TOKENS:
                continue
            with torch.no_grad():
                gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     do_sample=False, max_new_tokens=NEW_TOKENS, top_p=None, top_k=None,
                                     temperature=None)
            new = gen[0, len(ids):].tolist()
            rows.append({"id": r["id"], "prompt": r["prompt"], "prompt_ids": ids, "ids": new})
            print(r["id"], repr(tok.decode(new, skip_special_tokens=True)[:60]), flush=True)
            taken += 1
            if taken == PER_SOURCE:
                break
    with open(out, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"{len(rows)} prompts -> {out}")


if __name__ == "__main__":
    main()
