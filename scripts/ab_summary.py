"""Medians of scripts/ab_bench.sh's runs: decode tok/s per binary, dataset and controller, the
new binary's rate over the old one's, and each binary's thompson speedup over plain decoding.
Writes OUT_DIR/summary.md and prints it."""
import json
import statistics
import sys
from pathlib import Path

out = Path(sys.argv[1])
runs = {"old": [], "new": []}
for d in sorted(out.iterdir()):
    if d.is_dir() and (d / "bench.json").is_file():
        runs[d.name.split("-")[0]].append(json.loads((d / "bench.json").read_text())["rows"])
rate = {}  # (tag, dataset, controller) -> [tok/s per run]
speedup = {}  # (tag, dataset) -> [thompson / off per run]
for tag, rs in runs.items():
    for rows in rs:
        by = {(r["dataset"], r["controller"]): r for r in rows}
        for (ds, c), r in by.items():
            rate.setdefault((tag, ds, c), []).append(r["decode_tokens_per_s"])
            assert r["mismatches"] == 0, f"{tag} {ds} {c}: {r['mismatches']} mismatches"
        for ds in {k[0] for k in by}:
            speedup.setdefault((tag, ds), []).append(by[(ds, "thompson")]["speedup_vs_off"])
med = statistics.median
lines = [
    f"{len(runs['old'])} runs per binary, interleaved; medians of each run's decode tok/s.",
    "",
    "| dataset | controller | old tok/s | new tok/s | new / old |",
    "|---|---|---|---|---|",
]
for ds, c in sorted({(k[1], k[2]) for k in rate}):
    o, n = med(rate[("old", ds, c)]), med(rate[("new", ds, c)])
    lines.append(f"| {ds} | {c} | {o:.1f} | {n:.1f} | {n / o:.3f} |")
lines += ["", "| dataset | thompson vs off, old | thompson vs off, new |", "|---|---|---|"]
for ds in sorted({k[1] for k in speedup}):
    lines.append(f"| {ds} | {med(speedup[('old', ds)]):.2f}x | {med(speedup[('new', ds)]):.2f}x |")
text = "\n".join(lines) + "\n"
(out / "summary.md").write_text(text)
print(text)
