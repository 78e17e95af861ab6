#!/usr/bin/env python3
"""Report of scripts/bench.sh: medians, ratios and targets from the raw runs.

    bench_report.py RUNS.jsonl OUT.json   summarise the runs, print, write OUT.json
    bench_report.py OUT.json              print the tables of an earlier results file

Each line of RUNS.jsonl is one measured wrk run:
{"scenario","conc","size","round","hop_ticks","origin_ticks","clk_tck","wrk":{...}}.
"""

import datetime
import json
import os
import platform
import statistics
import sys

SCENARIOS = {
    "a-nginx": "direct: wrk -> nginx `return 200`",
    "a-echo": "direct: wrk -> hyper echo (examples/bench_echo.rs)",
    "b": "nginx proxy_pass (upstream keepalive) -> nginx `return 200`",
    "b-echo": "nginx proxy_pass (upstream keepalive) -> hyper echo (the body both ways)",
    "c": "wsbridge ==wss==> wsbridge worker --echo, default settings (no flags, default threads)",
    "c1": "as c, one tokio thread per process (WSB_THREADS) and limits above any concurrency",
    "c-g": "as c1, with the start gate on ([http] start_gate = true)",
    "d": "wsbridge ==wss==> wsbridge worker --upstream -> nginx `return 200`, default settings",
    "d1": "as d, tuned as c1",
    "e": "rathole (tcp, no TLS) server <- client -> nginx `return 200`",
    "x": "wsbridge A -> NATS -> wsbridge B ==wss==> wsbridge worker --echo (cross-node, tuned as c1)",
}
ORDER = list(SCENARIOS)
# Which direct scenario is "(a)" for each wsbridge scenario: the one with the
# same end server (the echo worker echoes; the agent forwards to nginx).
BASELINE_A = {"c": "a-echo", "c1": "a-echo", "c-g": "a-echo", "d": "a-nginx", "d1": "a-nginx",
              "x": "a-echo"}
# What each wsbridge scenario is compared with: its direct server, the nginx
# two-hop (b), and for the echoes the nginx two-hop that echoes too (b-echo);
# the cross-node call with the same call made locally (c1, the same tuning).
PEERS = {"c": ("a-echo", "b", "b-echo", "e"), "c1": ("a-echo", "b", "b-echo", "e"),
         "c-g": ("a-echo", "b", "b-echo", "e"), "d": ("a-nginx", "b", "e"),
         "d1": ("a-nginx", "b", "e"), "x": ("c1", "a-echo")}


def machine():
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
    }


def summarise(runs):
    groups = {}
    for r in runs:
        groups.setdefault((r["scenario"], r["conc"], r["size"]), []).append(r)
    rows = []
    for (s, conc, size), rs in groups.items():
        def med(f):
            return statistics.median(f(r) for r in rs)

        def per100k(key):
            return med(lambda r: r[key] / r["clk_tck"] / max(r["wrk"]["requests"], 1) * 1e5)

        errors = sum(
            r["wrk"][k]
            for r in rs
            for k in ("err_connect", "err_read", "err_write", "err_status", "err_timeout")
        )
        hop = per100k("hop_ticks")
        origin = per100k("origin_ticks")
        rows.append({
            "scenario": s,
            "conc": conc,
            "size": size,
            "rounds": len(rs),
            "rps": med(lambda r: r["wrk"]["rps"]),
            "p50_us": med(lambda r: r["wrk"]["p50_us"]),
            "p99_us": med(lambda r: r["wrk"]["p99_us"]),
            "p999_us": med(lambda r: r["wrk"]["p999_us"]),
            # CPU seconds per 100k calls: the processes of the hop (proxy,
            # bridge + worker, rathole server + client) and all server
            # processes of the scenario (hop + origin). wrk is not counted.
            "cpu_hop_s_per_100k": hop if s not in ("a-nginx", "a-echo") else None,
            "cpu_all_s_per_100k": med(
                lambda r: (r["hop_ticks"] + r["origin_ticks"]) / r["clk_tck"]
                / max(r["wrk"]["requests"], 1) * 1e5),
            "errors": errors,
        })
    rows.sort(key=lambda x: (x["conc"], x["size"], ORDER.index(x["scenario"])))
    return rows


def find(rows, s, conc, size):
    for r in rows:
        if (r["scenario"], r["conc"], r["size"]) == (s, conc, size):
            return r
    return None


def ratios(rows):
    out = []
    points = sorted({(r["conc"], r["size"]) for r in rows})
    for conc, size in points:
        for x, peers in PEERS.items():
            rx = find(rows, x, conc, size)
            if not rx:
                continue
            for y in peers:
                ry = find(rows, y, conc, size)
                if not ry:
                    continue
                cpu = None
                if rx["cpu_all_s_per_100k"] and ry["cpu_all_s_per_100k"]:
                    cpu = rx["cpu_all_s_per_100k"] / ry["cpu_all_s_per_100k"]
                out.append({
                    "conc": conc, "size": size, "x": x, "y": y,
                    "rps_ratio": rx["rps"] / ry["rps"] if ry["rps"] else None,
                    "p50_added_us": rx["p50_us"] - ry["p50_us"],
                    "p99_ratio": rx["p99_us"] / ry["p99_us"] if ry["p99_us"] else None,
                    "cpu_all_ratio": cpu,
                })
    return out


def targets(rows):
    """The targets of issue 21 (docs/PERFORMANCE.md, "Targets")."""
    out = []

    def add(name, ok, detail):
        out.append({"target": name, "result": "SKIP" if ok is None else ("PASS" if ok else "FAIL"),
                    "detail": detail})

    def need(name, *what):
        add(name, None, "needs " + ", ".join(f"{s} at c={c} {size_label(z)}" for s, c, z in what))

    for cx in ("c", "c1"):
        c, b = find(rows, cx, 64, 64), find(rows, "b", 64, 64)
        name = f"1. ({cx}) at c=64 64B: >= 1.1x (b) req/s, p99 and cpu/100k <= (b)'s"
        if c and b:
            ok = (c["rps"] >= 1.1 * b["rps"] and c["p99_us"] <= b["p99_us"]
                  and c["cpu_all_s_per_100k"] <= b["cpu_all_s_per_100k"])
            add(name, ok, f"{c['rps'] / b['rps']:.2f}x req/s ({c['rps']:.0f} vs {b['rps']:.0f}), "
                          f"p99 {us(c['p99_us'])} vs {us(b['p99_us'])}, cpu/100k "
                          f"{cpu(c['cpu_all_s_per_100k'])} vs {cpu(b['cpu_all_s_per_100k'])}")
        else:
            need(name, (cx, 64, 64), ("b", 64, 64))

        c, a = find(rows, cx, 1, 64), find(rows, "a-echo", 1, 64)
        b, an = find(rows, "b", 1, 64), find(rows, "a-nginx", 1, 64)
        name = f"2. ({cx}) at c=1 64B: p50 added over (a-echo) <= nginx's own hop ((b) - (a-nginx))"
        if c and a and b and an:
            added, hop = c["p50_us"] - a["p50_us"], b["p50_us"] - an["p50_us"]
            add(name, added <= hop, f"+{added:.0f}us against +{hop:.0f}us "
                                    f"(p50 {us(c['p50_us'])} vs {us(a['p50_us'])})")
        else:
            need(name, (cx, 1, 64), ("a-echo", 1, 64), ("b", 1, 64), ("a-nginx", 1, 64))

    c, b = find(rows, "c", 64, 16384), find(rows, "b-echo", 64, 16384)
    name = "3. (c) at c=64 16KiB: >= 1.0x (b-echo) req/s"
    if c and b:
        add(name, c["rps"] >= b["rps"], f"{c['rps'] / b['rps']:.2f}x ({c['rps']:.0f} vs "
                                        f"{b['rps']:.0f}), cpu/100k {cpu(c['cpu_all_s_per_100k'])} "
                                        f"vs {cpu(b['cpu_all_s_per_100k'])}")
    else:
        need(name, ("c", 64, 16384), ("b-echo", 64, 16384))

    for dx in ("d", "d1"):
        d, e = find(rows, dx, 64, 64), find(rows, "e", 64, 64)
        name = f"4. ({dx}) at c=64 64B: >= 1.0x (e) req/s (TLS on our side, none in rathole's)"
        if d and e:
            add(name, d["rps"] >= e["rps"], f"{d['rps'] / e['rps']:.2f}x ({d['rps']:.0f} vs "
                                            f"{e['rps']:.0f})")
        else:
            need(name, (dx, 64, 64), ("e", 64, 64))

    x, c = find(rows, "x", 1, 64), find(rows, "c1", 1, 64)
    name = "6. (x) at c=1 64B: p50 added over a local call (c1) <= 150us"
    if x and c:
        added = x["p50_us"] - c["p50_us"]
        add(name, added <= 150, f"+{added:.0f}us (p50 {us(x['p50_us'])} vs {us(c['p50_us'])})")
    else:
        need(name, ("x", 1, 64), ("c1", 1, 64))
    x, c = find(rows, "x", 64, 64), find(rows, "c1", 64, 64)
    name = "6. (x) at c=64 64B: >= 0.6x a local call's (c1) req/s"
    if x and c:
        add(name, x["rps"] >= 0.6 * c["rps"],
            f"{x['rps'] / c['rps']:.2f}x ({x['rps']:.0f} vs {c['rps']:.0f}), "
            f"cpu/100k {cpu(x['cpu_all_s_per_100k'])} vs {cpu(c['cpu_all_s_per_100k'])}")
    else:
        need(name, ("x", 64, 64), ("c1", 64, 64))
    return out


def us(v):
    if v is None:
        return "-"
    if v >= 10000:
        return f"{v / 1000:.1f}ms"
    if v >= 1000:
        return f"{v / 1000:.2f}ms"
    return f"{v:.0f}us"


def size_label(n):
    return f"{n // 1024}KiB" if n >= 1024 and n % 1024 == 0 else f"{n}B"


def cpu(v):
    return "-" if v is None else f"{v:.2f}"


def print_report(res):
    m = res["meta"]
    print()
    print(f"wsbridge side-by-side benchmark, {m['date']}, git {m['git']}")
    print(f"machine: {m['machine']['nproc']} cpus, {m['machine']['cpu_model']}, "
          f"kernel {m['machine']['kernel']}")
    print(f"each point: median of {m['rounds']} rounds of {m['duration']} "
          f"(scenarios interleaved), wrk + scripts/bench_post.lua"
          + (" [QUICK smoke run: numbers are not meaningful]" if m.get("quick") == "1" else ""))
    wrk = " ".join((m.get("wrk") or "wrk ?").split()[:2])
    print(f"versions: {m.get('nginx')}; {wrk}; {m.get('rathole') or 'rathole ?'} "
          f"({m.get('rathole_install')})")
    print("logging: nginx access_log off; wsbridge bridge and worker RUST_LOG=warn "
          "(no access lines); TLS on between bridge and worker")
    print(f"threads: nginx worker_processes auto (one per core) per instance; wsbridge c and d "
          f"tokio's default (one per core), c1, c-g, d1 and x "
          f"{m.get('wsbridge_threads') or 'default (one per core)'} tokio worker thread(s) per process"
          + (f"; x's bridges --threads {m['x_threads']}" if m.get("x_threads") else ""))
    print()
    for s, desc in SCENARIOS.items():
        print(f"  {s:8} {desc}")
    print()
    hdr = (f"{'conc':>5} {'body':>6}  {'scenario':8} {'req/s':>9} {'p50':>8} {'p99':>8} "
           f"{'p99.9':>8} {'cpu/100k hop':>12} {'cpu/100k all':>12}  errors")
    print(hdr)
    print("-" * len(hdr))
    last = None
    for r in res["summary"]:
        point = (r["conc"], r["size"])
        if last is not None and point != last:
            print()
        last = point
        print(f"{r['conc']:>5} {size_label(r['size']):>6}  {r['scenario']:8} {r['rps']:>9.0f} "
              f"{us(r['p50_us']):>8} {us(r['p99_us']):>8} {us(r['p999_us']):>8} "
              f"{cpu(r['cpu_hop_s_per_100k']):>12} {cpu(r['cpu_all_s_per_100k']):>12}  "
              f"{r['errors'] or ''}")
    print()
    print("cpu/100k: CPU seconds (utime+stime from /proc/PID/stat) per 100k calls; hop = the")
    print("proxying processes (nginx proxy / bridge+worker / rathole server+client), all = hop +")
    print("origin nginx (for c the echo worker is the origin; for a the server itself).")
    print()
    print("ratios (x vs y): req/s x/y, p50 added by x, p99 x/y, cpu/100k all x/y")
    last = None
    for q in res["ratios"]:
        point = (q["conc"], q["size"])
        if last is not None and point != last:
            print()
        last = point
        rr = "-" if q["rps_ratio"] is None else f"{q['rps_ratio']:.2f}x"
        pr = "-" if q["p99_ratio"] is None else f"{q['p99_ratio']:.2f}x"
        cr = "-" if q["cpu_all_ratio"] is None else f"{q['cpu_all_ratio']:.2f}x"
        print(f"{q['conc']:>5} {size_label(q['size']):>6}  {q['x']:>3} vs {q['y']:7} req/s {rr:>6}  "
              f"p50 {q['p50_added_us']:+7.0f}us  p99 {pr:>6}  cpu {cr:>6}")
    print()
    print("targets:")
    for t in res["targets"]:
        print(f"  {t['result']:4}  {t['target']}: {t['detail']}")
    print()


def main():
    if len(sys.argv) == 2:
        with open(sys.argv[1]) as f:
            print_report(json.load(f))
        return
    runs_path, out_path = sys.argv[1], sys.argv[2]
    with open(runs_path) as f:
        runs = [json.loads(line) for line in f if line.strip()]
    rows = summarise(runs)
    env = os.environ.get
    res = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "git": env("BENCH_GIT", "unknown"),
            "machine": machine(),
            "duration": env("BENCH_DURATION"),
            "rounds": int(env("BENCH_ROUNDS", "0")),
            "warmup": env("BENCH_WARMUP"),
            "quick": env("BENCH_QUICK", "0"),
            "wsbridge_threads": env("BENCH_WSB_THREADS", ""),
            "x_threads": env("BENCH_X_THREADS", ""),
            "worker_max_inflight": env("BENCH_WORKER_INFLIGHT"),
            "nginx": env("BENCH_NGINX_VERSION"),
            "wrk": env("BENCH_WRK_VERSION"),
            "rathole": env("BENCH_RATHOLE_VERSION"),
            "rathole_install": env("BENCH_RATHOLE_NOTE"),
            "logging": "nginx access_log off; wsbridge RUST_LOG=warn",
            "scenarios": SCENARIOS,
        },
        "summary": rows,
        "ratios": ratios(rows),
        "targets": targets(rows),
        "runs": runs,
    }
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1)
        f.write("\n")
    print_report(res)
    print(f"raw runs and medians written to {out_path}")


if __name__ == "__main__":
    main()
