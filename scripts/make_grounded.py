"""The grounded prompt set (issue 21): requests whose answers copy much of the prompt, built from
the corpora `make_corpora.py` wrote, in their schema, as data/corpora/grounded.parquet.

Three kinds, `category` says which:
  code-edit   HumanEval's canonical solutions (signature + docstring + body) with an edit to
              make: add comments, rename a variable, or fix a planted bug (one comparison or
              sign flipped), the whole function asked back;
  extraction  MT-Bench's extraction and writing questions that carry the text to work on;
  paste       ShareGPT first turns that paste a text and ask to rewrite, summarise, fix,
              translate or format it.

Deterministic (no randomness: the first prompts in id order that qualify).

usage: make_grounded.py CORPORA_DIR [--per-kind 20]
"""

import argparse
import os
import re

import pyarrow.parquet as pq

from make_corpora import SCHEMA, row

EDIT_WORDS = re.compile(
    r"\b(rewrite|rephrase|paraphrase|summari[sz]e|fix|correct|proofread|translate|edit|improve|"
    r"format|convert|refactor|shorten|simplify)\b",
    re.I,
)


def code_edits(corpora, n):
    """HumanEval functions with an edit request; the kind of edit rotates."""
    out = []
    for r in pq.read_table(os.path.join(corpora, "humaneval.parquet")).to_pylist():
        if len(out) >= n:
            break
        if not r["reference"]:
            continue
        func = (r["prompt"] + r["reference"]).strip("\n")
        kind = len(out) % 3
        if kind == 1:
            names = re.findall(r"^\s+([a-z_][a-z0-9_]*) = ", r["reference"], re.M)
            if names:
                old = names[0]
                ask = (f"Rename the variable `{old}` to `{old}_value` in this function and return "
                       f"the whole function:\n\n{func}\n")
                out.append(row(r["id"].split("/")[1] + "-rename", "grounded", [ask],
                               category="code-edit"))
                continue
            kind = 0
        if kind == 2:
            body = r["reference"]
            for a, b in ((" < ", " > "), (" > ", " < "), (" + 1", " - 1"), (" == ", " != ")):
                if a in body:
                    buggy = (r["prompt"] + body.replace(a, b, 1)).strip("\n")
                    ask = ("This function has a bug. Fix it and return the whole corrected "
                           f"function:\n\n{buggy}\n")
                    out.append(row(r["id"].split("/")[1] + "-bug", "grounded", [ask],
                                   category="code-edit"))
                    break
            else:
                kind = 0
            if kind == 2:
                continue
        ask = f"Add a comment above each step of this function and return the whole function:\n\n{func}\n"
        out.append(row(r["id"].split("/")[1] + "-comments", "grounded", [ask], category="code-edit"))
    return out


def extraction(corpora, n):
    """MT-Bench questions that carry their text (extraction, and writing ones that quote one)."""
    out = []
    for r in pq.read_table(os.path.join(corpora, "mtbench.parquet")).to_pylist():
        if r["category"] in ("extraction", "writing") and len(r["prompt"]) >= 300:
            out.append(row(r["id"].split("/")[1], "grounded", [r["prompt"]], category="extraction"))
    return out[:n]


def pastes(corpora, n):
    """ShareGPT first turns that paste a text (400-1,500 characters) and ask for an edit of it."""
    out = []
    for r in pq.read_table(os.path.join(corpora, "sharegpt.parquet")).to_pylist():
        p = r["prompt"]
        if not 400 <= len(p) <= 1500:
            continue
        ask = p[:200] + " " + p[-200:]
        if EDIT_WORDS.search(ask) and ("\n" in p.strip() or ":" in p[:300]):
            out.append(row(r["id"].split("/")[1], "grounded", [p], category="paste"))
        if len(out) >= n:
            break
    return out


def main():
    import pyarrow as pa

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpora")
    ap.add_argument("--per-kind", type=int, default=20)
    a = ap.parse_args()
    rows = code_edits(a.corpora, a.per_kind) + extraction(a.corpora, a.per_kind) + pastes(a.corpora, a.per_kind)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "ids must be unique"
    out = os.path.join(a.corpora, "grounded.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), out + ".tmp")
    os.replace(out + ".tmp", out)  # appears whole or not at all
    kinds = {}
    for r in rows:
        kinds[r["category"]] = kinds.get(r["category"], 0) + 1
    print(f"grounded.parquet: {len(rows)} prompts {kinds}")


if __name__ == "__main__":
    main()
