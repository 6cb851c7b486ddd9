"""Predicted EESD speedup per exit layer N, from measured costs and held-out agreement.

For each N: c and v(K) come from `eesd-infer bench-shape --json-out` (measured on this machine),
E(K) = expected committed tokens per round from a short distillation's held-out evaluation
(teacher-forced runs of agreement). Predicted speedup = max over K of E(K) / (K c + v(K)), with
K = 0 (plain decoding, speedup 1) always available.

usage: choose_exit.py COSTS_JSON RUN_DIR_N1 [RUN_DIR_N2 ...]   (run dirs hold metrics.jsonl)
"""

import json
import sys


def last_eval(run):
    ev = [json.loads(l) for l in open(f"{run}/metrics.jsonl") if '"eval"' in l]
    return ev[-1]["eval"]["all"]


def main():
    costs = json.load(open(sys.argv[1]))
    by_n = {e["exit_layer"]: e for e in costs["exits"]}
    print("| N | held-out top-1 agreement | draft step c | best K >= 1 | E(tokens / round) | its speedup | predicted (K = 0 allowed) |")
    print("|---|---|---|---|---|---|---|")
    for run in sys.argv[2:]:
        spec = json.load(open(f"{run}/checkpoint/head.json"))
        n = spec["exit_layer"]
        e = last_eval(run)
        c, v = by_n[n]["draft_step_c"], by_n[n]["verify_relative"]
        tokens = [1.0] + e["expected_tokens_per_round_k1_to_8"]
        k_max = min(len(tokens), len(v)) - 1
        best = max(range(1, k_max + 1), key=lambda k: tokens[k] / (k * c + v[k]))
        speed = tokens[best] / (best * c + v[best])
        print(f"| {n} | {e['top1_agreement']:.3f} | {c:.3f} | {best} | {tokens[best]:.2f} | {speed:.2f}x | {max(speed, 1.0):.2f}x |")


if __name__ == "__main__":
    main()
