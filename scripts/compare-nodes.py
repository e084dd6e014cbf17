#!/usr/bin/env python3
"""Ingest at 1, 2, 3 … gateway nodes on one PostgreSQL store behind HAProxy, interleaved.

For each round and each node count in turn, `tether bench ingest --nodes N` (a fresh schema, N
gateway processes with TLS and RS256 tokens, HAProxy in front, the load client in its own
process: 50 clinics × 10,000 events, batches of 500, 4 in flight). Prints each run's events/s
and the CPU-seconds per 100,000 events of all nodes together, then the medians per node count.

usage: scripts/compare-nodes.py ROUNDS [--nodes 1,2,3] [--events-per-clinic N] [--bin BIN]
"""
import json, os, statistics, subprocess, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def main():
    argv = sys.argv[1:]
    rounds = int(argv.pop(0))
    counts, per_clinic = [1, 2, 3], 10_000
    binary = os.path.join(ROOT, "target/dist/tether")
    while argv:
        a = argv.pop(0)
        if a == "--nodes":
            counts = [int(x) for x in argv.pop(0).split(",")]
        elif a == "--events-per-clinic":
            per_clinic = int(argv.pop(0))
        elif a == "--bin":
            binary = argv.pop(0)
    results = {n: [] for n in counts}
    for r in range(rounds):
        for n in counts:
            done = subprocess.run(
                [binary, "bench", "ingest", "--nodes", str(n),
                 "--events-per-clinic", str(per_clinic)],
                capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{n} nodes: {done.stderr.strip()[-2000:]}")
            v = json.loads([l for l in done.stdout.splitlines() if l.startswith("{")][-1])
            res = {"events_per_s": v["events_per_s"],
                   "gateways_cpu_s_per_100k": v["gateway_cpu_s_per_100k_events"],
                   "client_cpu_s_per_100k": v["client"]["client_cpu_s_per_100k"],
                   "events": v["client"]["events"]}
            results[n].append(res)
            print(json.dumps({"round": r + 1, "nodes": n, **res}), flush=True)
    for n, runs in results.items():
        med = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
        print(json.dumps({"nodes": n, "median": med}), flush=True)

main()
