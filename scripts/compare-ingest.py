#!/usr/bin/env python3
"""Interleaved ingest comparison: runs `tether bench ingest --json` for each (label, command)
pair in turn, ROUNDS times, and prints per-run events/s, the bench process's CPU-seconds per
100,000 events (user+sys of the child, from wait4) and the whole machine's CPU-seconds per
100,000 events over the run (from /proc/stat: includes a PostgreSQL server's work).

usage: scripts/compare-ingest.py ROUNDS label='cmd …' [label='cmd …' …]
"""
import json, os, shlex, statistics, subprocess, sys, time

def machine_cpu():
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    ticks = [int(x) for x in parts]
    busy = sum(ticks) - ticks[3] - ticks[4]  # minus idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")

def run(cmd):
    m0 = machine_cpu()
    t0 = time.time()
    p = subprocess.Popen(shlex.split(cmd), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out = p.stdout.read().decode()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.time() - t0
    if status != 0:
        raise SystemExit(f"{cmd}: exit status {status}")
    v = json.loads([l for l in out.splitlines() if l.startswith("{")][-1])
    per100k = 100_000 / v["events"]
    return {
        "events_per_s": v["events_per_s"],
        "proc_cpu_s_per_100k": round((ru.ru_utime + ru.ru_stime) * per100k, 3),
        "machine_cpu_s_per_100k": round((machine_cpu() - m0) * per100k, 3),
        "wall_s": round(wall, 1),
    }

def main():
    rounds = int(sys.argv[1])
    pairs = [a.split("=", 1) for a in sys.argv[2:]]
    results = {label: [] for label, _ in pairs}
    for r in range(rounds):
        for label, cmd in pairs:
            res = run(cmd)
            results[label].append(res)
            print(json.dumps({"round": r + 1, "label": label, **res}), flush=True)
    for label, runs in results.items():
        med = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
        print(json.dumps({"label": label, "median": med}), flush=True)

main()
