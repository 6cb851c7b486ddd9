"""Plots of the project's JSON results, as PNG next to them.

usage:
  plot.py bench results/bench.json       -> results/bench.png (speedup per controller per dataset;
                                            acceptance by draft position)
  plot.py train OUT/metrics.jsonl        -> OUT/training.png (losses, held-out agreement)
  plot.py prefill results/bench_prefill.json -> results/bench_prefill.png (prompt tok/s by prompt
                                            length, ours per dtype against llama.cpp)
  plot.py features LOG.json              -> LOG.png (head_levers.py train --out: loss, held-out
                                            top-1 agreement per source)
"""

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def bench(path):
    report = json.load(open(path))
    rows = report["rows"]
    datasets = sorted({r["dataset"] for r in rows})
    controllers = list(dict.fromkeys(r["controller"] for r in rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5))
    width = 0.8 / len(datasets)
    for i, d in enumerate(datasets):
        ys = [next((r["speedup_vs_off"] for r in rows if r["dataset"] == d and r["controller"] == c), 0)
              for c in controllers]
        ax1.bar([x + i * width for x in range(len(controllers))], ys, width, label=d)
    ax1.axhline(1.0, color="black", linewidth=0.8)
    ax1.set_xticks([x + width * (len(datasets) - 1) / 2 for x in range(len(controllers))])
    ax1.set_xticklabels(controllers, rotation=45, ha="right")
    ax1.set_ylabel("decode speedup vs plain (off)")
    ax1.set_title(f"{os.path.basename(report['model'])}, {report['device']}, N = {report['exit_layer']}")
    ax1.legend()
    for c in ("thompson", "fixed:4", "heuristic", "thompson@lookup"):
        for d in datasets:
            r = next((r for r in rows if r["dataset"] == d and r["controller"] == c), None)
            if r and r["accepted_by_position"]:
                ax2.plot(range(1, len(r["accepted_by_position"]) + 1), r["accepted_by_position"],
                         marker="o", label=f"{c} / {d}")
    ax2.set_xlabel("draft position")
    ax2.set_ylabel("accepted / drafted at this position")
    ax2.set_ylim(0, 1)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    out = os.path.splitext(path)[0] + ".png"
    fig.savefig(out, dpi=110)
    print(out)


def train(path):
    recs = [json.loads(l) for l in open(path) if l.strip()]
    steps = [r["step"] for r in recs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax1.plot(steps, [r["kl"] for r in recs], label="KL(teacher || head)")
    ax1.plot(steps, [r["ce"] for r in recs], label="CE on teacher tokens")
    ax1.set_xlabel("step")
    ax1.set_yscale("log")
    ax1.legend()
    ev = [r for r in recs if "eval" in r]
    for src in sorted({k for r in ev for k in r["eval"]}):
        ax2.plot([r["step"] for r in ev], [r["eval"].get(src, {}).get("top1_agreement", float("nan")) for r in ev],
                 marker="o", label=src)
    ax2.set_xlabel("step")
    ax2.set_ylabel("held-out top-1 agreement with the base")
    ax2.legend()
    fig.tight_layout()
    out = os.path.join(os.path.dirname(path), "training.png")
    fig.savefig(out, dpi=110)
    print(out)


def features(path):
    log = json.load(open(path))["log"]
    steps = [r["step"] for r in log]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax1.plot(steps, [r["loss"] for r in log], marker="o")
    ax1.set_xlabel("step")
    ax1.set_ylabel("cross-entropy on the base's argmax (one batch)")
    for src in sorted(log[-1]["eval"]):
        ax2.plot(steps, [r["eval"][src][0] for r in log], marker="o", label=src)
    ax2.set_xlabel("step")
    ax2.set_ylabel("held-out top-1 agreement with the base")
    ax2.legend()
    fig.tight_layout()
    out = os.path.splitext(path)[0] + ".png"
    fig.savefig(out, dpi=110)
    print(out)


def prefill(path):
    r = json.load(open(path))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for d in dict.fromkeys(x["dtype"] for x in r["rows"]):
        xs = [x for x in r["rows"] if x["dtype"] == d]
        ax.plot([x["prompt_tokens"] for x in xs], [x["prefill_tokens_per_s"] for x in xs], marker="o",
                label=f"eesd-infer {d}")
    for width in ("f16", "f32"):
        pts = sorted((int(k.split()[-1]), v) for k, v in r["median_tokens_per_s"].items()
                     if k.startswith(f"llama.cpp {width} "))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="s", linestyle="--", label=f"llama.cpp {width}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("prefill tokens/s (median)")
    ax.set_title(r["machine"], fontsize=8)
    ax.legend()
    fig.tight_layout()
    out = os.path.splitext(path)[0] + ".png"
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    {"bench": bench, "train": train, "features": features, "prefill": prefill}[sys.argv[1]](sys.argv[2])
