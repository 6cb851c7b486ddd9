"""Plain greedy decoding, measured three ways in one run on the same prompts:
eesd-infer (ours), this machine's memory-bandwidth floor (measured by eesd-infer in the same
process), and transformers' generate.

Decode tokens/s excludes prefill in both: the first new token comes from the prefill pass, and the
rate is (new_tokens - 1) / (time from the first to the last new token). Every prompt decodes exactly
--max-new-tokens tokens (EOS ignored) so both sides do the same work.

usage: bench_decode.py --model DIR [--num-prompts N] [--max-new-tokens N] [--out JSON]
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer

ROOT = os.path.join(os.path.dirname(__file__), "..")
PROMPTS = os.path.join(ROOT, "crates/eesd-infer/tests/fixtures/smollm2_greedy.jsonl")


class Clock(BaseStreamer):
    """Timestamps each new token (the first `put` is the prompt)."""

    def __init__(self):
        self.times = []
        self.calls = 0

    def put(self, value):
        self.calls += 1
        if self.calls > 1:
            self.times.append(time.perf_counter())

    def end(self):
        pass


def transformers_rate(model_dir, prompts, n):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens, seconds = 0, 0.0

    def run(text, new):
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
        clock = Clock()
        with torch.no_grad():
            model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           do_sample=False, max_new_tokens=new, min_new_tokens=new, streamer=clock,
                           top_p=None, top_k=None, temperature=None)
        return len(clock.times) - 1, clock.times[-1] - clock.times[0]

    run(prompts[0]["prompt"], 8)  # warm-up
    for p in prompts:
        k, s = run(p["prompt"], n)
        tokens += k
        seconds += s
    return tokens / seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--out", default=None)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/eesd-infer"))
    a = ap.parse_args()

    # Same prompts for both: the first N of the reference set, spread over the four corpora.
    rows = [json.loads(l) for l in open(PROMPTS)]
    step = max(1, len(rows) // a.num_prompts)
    prompts = rows[::step][: a.num_prompts]
    pfile = os.path.join(ROOT, "results", ".bench_prompts.jsonl")
    os.makedirs(os.path.dirname(pfile), exist_ok=True)
    with open(pfile, "w") as f:
        for p in prompts:
            f.write(json.dumps({"id": p["id"], "prompt": p["prompt"]}) + "\n")

    ours_json = os.path.join(ROOT, "results", ".bench_ours.json")
    subprocess.run([a.bin, "bench-decode", "--model", a.model, "--device", "cpu", "--dtype", "f32",
                    "--prompt-file", pfile, "--num-prompts", str(len(prompts)),
                    "--max-new-tokens", str(a.max_new_tokens), "--json-out", ours_json],
                   check=True, stdout=subprocess.DEVNULL)
    ours = json.load(open(ours_json))
    hf = transformers_rate(a.model, prompts, a.max_new_tokens)

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
        "torch_threads": torch.get_num_threads(),
        "prompts": len(prompts), "max_new_tokens": a.max_new_tokens,
        "bandwidth_GBps": ours["bandwidth_bytes_per_s"] / 1e9,
        "floor_tokens_per_s": ours["floor_tokens_per_s"],
        "ours_tokens_per_s": ours["decode_tokens_per_s"],
        "transformers_tokens_per_s": hf,
    }
    result["ours_vs_floor"] = result["ours_tokens_per_s"] / result["floor_tokens_per_s"]
    result["ours_vs_transformers"] = result["ours_tokens_per_s"] / hf
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    print("| what | decode tokens/s | ratio |")
    print("|---|---|---|")
    print(f"| bandwidth floor ({result['bandwidth_GBps']:.1f} GB/s over {ours['weight_bytes_per_token']/1e6:.0f} MB/token) "
          f"| {result['floor_tokens_per_s']:.1f} | 1.00 |")
    print(f"| eesd-infer plain | {result['ours_tokens_per_s']:.1f} | {result['ours_vs_floor']:.2f} of floor |")
    print(f"| transformers generate | {hf:.1f} | ours = {result['ours_vs_transformers']:.2f}x |")


if __name__ == "__main__":
    sys.exit(main())
