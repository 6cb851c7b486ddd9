"""Peers on the same prompts, one run: transformers' plain greedy `generate` and its
`assistant_early_exit` self-speculation (LayerSkip-style: the model's first L layers draft with
the model's own LM head, untrained) at several exit layers.

Decode tokens/s excludes prefill (time from the first to the last new token, as eesd-infer
measures it). Writes JSON and prints a markdown table.

usage: bench_peers.py --model DIR --data PARQUET [--data ...] [--num-prompts N]
                      [--max-new-tokens N] [--exits 8,16,24] [--out JSON]
"""

import argparse
import json
import time

import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer


class Clock(BaseStreamer):
    def __init__(self):
        self.times, self.calls = [], 0

    def put(self, value):
        self.calls += 1
        if self.calls > 1:
            self.times.append(time.perf_counter())

    def end(self):
        pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", action="append", required=True)
    ap.add_argument("--num-prompts", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--max-prompt-tokens", type=int, default=320)
    ap.add_argument("--exits", default="8,16,24")
    ap.add_argument("--out")
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    prompts = []
    for spec in a.data:
        taken = 0
        for r in pq.read_table(spec, columns=["id", "prompt"]).to_pylist():
            ids = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False)
            if len(ids) <= a.max_prompt_tokens:
                prompts.append(ids)
                taken += 1
            if taken == a.num_prompts:
                break

    def rate(**kw):
        tokens, secs = 0, 0.0
        for ids in prompts:
            clock = Clock()
            with torch.no_grad():
                model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               do_sample=False, max_new_tokens=a.max_new_tokens, streamer=clock,
                               top_p=None, top_k=None, temperature=None, **kw)
            if len(clock.times) > 1:
                tokens += len(clock.times) - 1
                secs += clock.times[-1] - clock.times[0]
        return tokens / secs

    rate()  # warm-up
    rows = [{"system": "transformers generate", "tokens_per_s": rate()}]
    for e in [int(x) for x in a.exits.split(",")]:
        rows.append({"system": f"transformers assistant_early_exit={e}", "tokens_per_s": rate(assistant_early_exit=e)})
    base = rows[0]["tokens_per_s"]
    print("| system | decode tok/s | vs transformers plain |\n|---|---|---|")
    for r in rows:
        r["vs_plain"] = r["tokens_per_s"] / base
        print(f"| {r['system']} | {r['tokens_per_s']:.2f} | {r['vs_plain']:.2f}x |")
    if a.out:
        json.dump({"date": time.strftime("%Y-%m-%d"), "prompts": len(prompts), "max_new_tokens": a.max_new_tokens,
                   "rows": rows}, open(a.out, "w"), indent=2)


if __name__ == "__main__":
    main()
