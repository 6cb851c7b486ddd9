"""A bounded loopback soak of `eesd-infer serve` (issue 22): --minutes of load from --streams
concurrent clients (whole and streamed requests, greedy and sampled, plain and thompson, some
cancelled mid-stream, some malformed), sampling the server's resident memory every 10 s.
Memory must stay flat once warm: the report gives the RSS after the first minute and at the end,
and the largest RSS seen. Writes JSON and a plot.

usage: soak_serve.py --model DIR [--head DIR] [--minutes 10] [--streams 4] [--out results/serve/soak]
"""

import argparse
import http.client
import json
import os
import random
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
from bench_serve import ROOT, free_port, prompts, wait_healthy  # noqa: E402


def rss_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def client(port, stop, counts, lock, seed, ps):
    rng = random.Random(seed)
    while not stop.is_set():
        kind = rng.choice(["whole", "stream", "stream", "cancel", "bad"])
        body = {"messages": [{"role": "user", "content": rng.choice(ps)}], "max_tokens": rng.choice([8, 32, 64]),
                "temperature": rng.choice([0, 0, 0.8]), "controller": rng.choice(["off", "thompson"])}
        if kind == "bad":
            body = {"messages": [{"role": "robot", "content": 1}], "max_tokens": -1}
        if kind in ("stream", "cancel"):
            body["stream"] = True
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            c.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
            r = c.getresponse()
            if kind == "cancel":
                r.readline()  # the first event, then hang up
                c.close()
            else:
                r.read()
            key = f"{kind} {r.status}"
        except OSError as e:
            key = f"{kind} error {type(e).__name__}"
        finally:
            c.close()
        with lock:
            counts[key] = counts.get(key, 0) + 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--head")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/eesd-infer"))
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--out", default=os.path.join(ROOT, "results/serve/soak"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    port = free_port()
    cmd = [a.bin, "serve", "--model", a.model, "--port", str(port), "--max-batch", str(a.streams)]
    if a.head:
        cmd += ["--head", a.head]
    proc = subprocess.Popen(cmd, stderr=open(os.path.join(a.out, "serve.log"), "w"), stdout=subprocess.DEVNULL)
    wait_healthy(port, proc)
    ps = prompts(64)
    stop, lock, counts = threading.Event(), threading.Lock(), {}
    threads = [threading.Thread(target=client, args=(port, stop, counts, lock, i, ps)) for i in range(a.streams)]
    t0 = time.time()
    for t in threads:
        t.start()
    samples = []
    try:
        while time.time() - t0 < a.minutes * 60:
            samples.append((time.time() - t0, rss_mib(proc.pid)))
            print(f"{samples[-1][0]:6.0f} s  RSS {samples[-1][1]:.1f} MiB  {sum(counts.values())} requests",
                  file=sys.stderr)
            time.sleep(10)
    finally:
        stop.set()
        for t in threads:
            t.join()
        samples.append((time.time() - t0, rss_mib(proc.pid)))
        proc.terminate()
        code = proc.wait(60)
    warm = next((m for s, m in samples if s >= 60), samples[-1][1])
    report = {"minutes": a.minutes, "streams": a.streams, "requests": counts, "exit_code": code,
              "rss_mib_after_1_min": warm, "rss_mib_end": samples[-1][1],
              "rss_mib_max": max(m for _, m in samples), "samples": samples}
    json.dump(report, open(os.path.join(a.out, "soak.json"), "w"), indent=1)
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([s / 60 for s, _ in samples], [m for _, m in samples], marker=".")
    ax.set_xlabel("minutes of load")
    ax.set_ylabel("server RSS (MiB)")
    ax.set_title(f"{sum(counts.values())} requests from {a.streams} clients", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, "soak.png"), dpi=110)


if __name__ == "__main__":
    main()
