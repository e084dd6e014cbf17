#!/usr/bin/env python3
"""Interleaved gateway comparison with the load client in its own process.

For each round and each contender in turn: start the gateway as its own process on a fresh store,
run `tether bench ingest --gateway wss://… --server-pid PID` (the load client: 50 clinics, batches
of 500 events of ~305 bytes, 4 batches in flight, TLS, RS256 tokens), stop the gateway. Prints one
JSON line per run and the medians per contender: acknowledged events/s, the gateway's
CPU-seconds per 100,000 events (from /proc/PID/stat), the client's, and the whole machine's.

With `--scenario latency`: 500 clinics × 2 events/s (one event per frame) for 20 s, each send
timed to its ack; p50/p99/p99.9 and the gateway's share of a core.

usage:
  scripts/compare-gateways.py ROUNDS [--scenario ingest|latency] [--events-per-clinic N] [--client BIN]
      label=tether:BIN[:OPTIONS]  label=node  [label=tether:BIN:postgres] ...

  tether:BIN            a Tether gateway binary (SQLite store, WAL synchronous=FULL)
  tether:BIN:postgres   the same on PostgreSQL (127.0.0.1, db test, a fresh schema per run)
  tether:BIN:schemas    with the entity schemas of schemas/entities checked on every row
  tether:BIN:crypto     the client encrypts each row's `notes` (AES-256-GCM, dk1) and the
                        gateway holds the key: every event is decrypted before it is stored
  node                  bench/peers/node-gateway/server.js (npm install there first)
"""
import hashlib, json, os, signal, socket, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def machine_cpu():
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")

def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p

def wait_port(port, proc, deadline=60):
    t0 = time.time()
    while time.time() - t0 < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"gateway exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"gateway not listening on {port} within {deadline}s")

def tether_config(d, port, run, options):
    store = f"    kind: sqlite\n    path: {d}/store-{run}.db\n"
    if options == "postgres":
        store = ("    kind: postgres\n    url: host=127.0.0.1 user=postgres dbname=test\n"
                 f"    schema: cmp_{os.getpid()}_{run}\n")
    extra = ""
    if options == "schemas":
        extra += f"  entity_schemas: {ROOT}/schemas/entities\n"
    if options == "crypto":
        extra += f"  decryption_keys:\n    - {{kid: dk1, file: {d}/certs/dk1.key}}\n"
    path = f"{d}/gw-{run}.yaml"
    with open(path, "w") as f:
        f.write(f"""logging:
  dir: {d}/logs-{run}
  level: warn
  console: false
gateway:
  listen: 127.0.0.1:{port}
  id: gw-bench
  store:
{store}  tls:
    cert: {d}/certs/gateway.pem
    key: {d}/certs/gateway.key
  auth:
    clinics_dir: {d}/certs/clinics
  admin_tokens:
    - name: bench
      sha256: {hashlib.sha256(os.urandom(16)).hexdigest()}
      scopes: [read]
{extra}""")
    return path

def main():
    argv = sys.argv[1:]
    rounds = int(argv.pop(0))
    per_clinic = 10_000
    scenario = "ingest"
    client = os.path.join(ROOT, "target/dist/tether")
    contenders = []
    while argv:
        a = argv.pop(0)
        if a == "--events-per-clinic":
            per_clinic = int(argv.pop(0))
        elif a == "--scenario":
            scenario = argv.pop(0)
        elif a == "--client":
            client = argv.pop(0)
        else:
            contenders.append(a.split("=", 1))
    d = tempfile.mkdtemp(prefix="tether-cmp-")
    n_clinics = 500 if scenario == "latency" else 50
    clinics = ",".join(f"clinic-{i:03}" for i in range(n_clinics))
    subprocess.run([client, "keys", "dev-setup", "--out", f"{d}/certs", "--clinics", clinics,
                    "--bits", "2048"], check=True, stdout=subprocess.DEVNULL)
    results = {label: [] for label, _ in contenders}
    run = 0
    for r in range(rounds):
        for label, spec in contenders:
            run += 1
            port = free_port()
            if spec == "node":
                cmd = ["node", f"{ROOT}/bench/peers/node-gateway/server.js", "--listen",
                       f"127.0.0.1:{port}", "--certs", f"{d}/certs", "--db", f"{d}/node-{run}.db"]
            else:
                parts = spec.split(":")
                options = parts[2] if len(parts) > 2 else ""
                cmd = [parts[1], "gateway", "--config", tether_config(d, port, run, options)]
            server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_port(port, server)
                m0 = machine_cpu()
                encrypt = ["--encrypt"] if spec.endswith(":crypto") else []
                load = ["--events-per-clinic", str(per_clinic)] if scenario == "ingest" else \
                    ["--clinics", str(n_clinics), "--secs", "20"]
                done = subprocess.run(
                    [client, "bench", scenario, "--gateway", f"wss://127.0.0.1:{port}/v1/ws",
                     "--certs", f"{d}/certs", "--server-pid", str(server.pid)] + load + encrypt,
                    capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{label}: the load client failed: {done.stderr.strip()}")
                out = done.stdout
                machine = machine_cpu() - m0
            finally:
                server.send_signal(signal.SIGTERM)
                try:
                    server.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    server.kill()
            if spec.endswith(":postgres"):
                subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-qc",
                                f"DROP SCHEMA IF EXISTS cmp_{os.getpid()}_{run} CASCADE"],
                               check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            v = json.loads([l for l in out.splitlines() if l.startswith("{")][-1])
            if scenario == "latency":
                res = {k: v[k] for k in ("acked", "p50_ms", "p99_ms", "p999_ms", "server_cpu_share", "failures")}
                results[label].append(res)
                print(json.dumps({"round": r + 1, "label": label, **res}), flush=True)
                continue
            res = {
                "events_per_s": v["events_per_s"],
                "server_cpu_s_per_100k": v["server_cpu_s_per_100k"],
                "client_cpu_s_per_100k": v["client_cpu_s_per_100k"],
                "machine_cpu_s_per_100k": round(machine * 100_000 / v["events"], 3),
                "server_peak_rss_mb": v["server_peak_rss_mb"],
                "events": v["events"],
            }
            results[label].append(res)
            print(json.dumps({"round": r + 1, "label": label, **res}), flush=True)
    for label, runs in results.items():
        med = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
        print(json.dumps({"label": label, "median": med}), flush=True)

main()
