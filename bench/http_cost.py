"""What the HTTP endpoint costs: the memory of the keeper and of the listener beside
PostgreSQL's own background processes (USS and PSS from /proc/PID/smaps_rollup, and VmRSS), and
their CPU on an idle pair, under health checks at HAProxy's usual rate, and under as many checks
as wrk can send. Run through `bench/run http` (same venv and clean-up as the failover benchmark).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pgpair  # noqa: E402
from pgpair import BenchError, Node, Registry, cpu_ns, free_port, make_pair, wait_until  # noqa: E402

# The processes measured, by the text after "postgres: " in their title.
PROCESSES = {
    "keeper": lambda a: "pg_keeper" in a and "pg_keeper http" not in a,
    "listener": lambda a: "pg_keeper http" in a,
    "checkpointer": lambda a: "checkpointer" in a,
    "walwriter": lambda a: "walwriter" in a,
    "background writer": lambda a: "background writer" in a,
    # Background workers of PostgreSQL's own that, like the keeper, attach to shared memory
    # without a database's caches (the launcher reads only shared catalogs).
    "autovacuum launcher": lambda a: "autovacuum launcher" in a,
    "logical replication launcher": lambda a: "logical replication launcher" in a,
}

# The memory target: the keeper and the listener within this many kB private (USS) of the
# checkpointer on the same node.
TARGET_KB = 1024


def parse_args(argv):
    p = argparse.ArgumentParser(prog="bench/run http", description=__doc__)
    p.add_argument("--idle", type=float, default=20, help="seconds of the idle window")
    p.add_argument("--checks", type=float, default=30, help="seconds under checks at HAProxy's rate")
    p.add_argument("--checkers", type=int, default=3,
                   help="HAProxy instances checking each node (each every --inter)")
    p.add_argument("--inter", type=float, default=2.0, help="HAProxy's check interval, seconds (its default)")
    p.add_argument("--max", type=float, default=10, help="seconds of the unthrottled wrk run")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "http"))
    return p.parse_args(argv)


def processes(node: Node) -> dict[str, int]:
    pm = node.postmaster_pid()
    if pm is None:
        raise BenchError(f"{node.name} is not running")
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(pm)], capture_output=True, text=True,
                         timeout=10).stdout
    found: dict[str, int] = {}
    for line in out.splitlines():
        pid, args = line.strip().split(None, 1)
        for name, match in PROCESSES.items():
            if name not in found and match(args):
                found[name] = int(pid)
    return found


def smaps_rollup(pid: int) -> dict[str, int]:
    """Rss, Pss, Private_* and Shared_* of a process, in kB; USS = Private_Clean + Private_Dirty."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[0].endswith(":") and parts[2] == "kB":
                values[parts[0][:-1]] = int(parts[1])
    values["Uss"] = values.get("Private_Clean", 0) + values.get("Private_Dirty", 0)
    return values


def private_by_mapping(pid: int, top: int = 6) -> list[tuple[str, int]]:
    """Where a process's private memory is (kB, Private_Clean + Private_Dirty), by mapped file or
    [heap] / [stack] / anonymous, largest first."""
    sizes: dict[str, int] = {}
    name = "?"
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            if "-" in parts[0] and not parts[0].endswith(":"):
                name = parts[5] if len(parts) > 5 else "[anonymous]"
            elif parts[0] in ("Private_Clean:", "Private_Dirty:"):
                sizes[name] = sizes.get(name, 0) + int(parts[1])
    return sorted(sizes.items(), key=lambda kv: -kv[1])[:top]


def memory_contexts(node: Node, pid: int) -> list[str]:
    """The PostgreSQL memory contexts of process `pid` (level 0 and 1, and the grand total), as
    pg_log_backend_memory_contexts writes them to the server log."""
    node.query("SELECT pg_log_backend_memory_contexts(%s)", (pid,))
    marker = f"logging memory contexts of PID {pid}"
    found: list[str] = []

    def read() -> bool:
        found.clear()
        with open(node.log, errors="replace") as f:
            text = f.read()
        at = text.rfind(marker)
        if at < 0:
            return False
        for line in text[at:].splitlines()[1:]:
            body = line.split("LOG:  ", 1)[-1].strip()
            if body.startswith("level: 0;") or body.startswith("level: 1;") or body.startswith("Grand total"):
                found.append(body)
            if body.startswith("Grand total"):
                return True
        return False

    if not wait_until(10, read, 0.2):
        raise BenchError(f"{node.name}: no memory context report of PID {pid} in the log")
    return found


def wrk(port: int, seconds: float, connections: int, delay_ms: int | None) -> dict:
    """wrk sending `OPTIONS /primary` (as HAProxy does) on `connections` connections, each waiting
    `delay_ms` between requests when given; the listener closes after each answer, and wrk
    reconnects."""
    script = "wrk.method = \"OPTIONS\"\n"
    if delay_ms is not None:
        script += f"function delay() return {delay_ms} end\n"
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
        path = f.name
    try:
        out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{int(seconds)}s", "-s", path,
                              f"http://127.0.0.1:{port}/primary"],
                             capture_output=True, text=True, timeout=seconds + 30).stdout
    finally:
        os.unlink(path)
    result = {"output": out}
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Requests/sec:"):
            result["rps"] = float(line.split()[1])
        elif "requests in" in line:
            result["requests"] = int(line.split()[0])
        elif line.startswith("Non-2xx or 3xx responses:"):
            result["non_2xx"] = int(line.split()[-1])
    return result


def cpu_window(pids: dict[str, int], seconds: float, load=None) -> tuple[dict[str, float], dict | None]:
    """CPU seconds of each process over a window of `seconds` (while `load()` runs, if given)."""
    before = {n: cpu_ns(p) for n, p in pids.items()}
    t0 = time.monotonic()
    extra = load() if load is not None else time.sleep(seconds)
    elapsed = time.monotonic() - t0
    after = {n: cpu_ns(p) for n, p in pids.items()}
    return ({n: (after[n] - before[n]) / 1e9 / elapsed for n in pids
             if after[n] is not None and before[n] is not None}, extra)


def main(argv) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    reg = Registry()
    rows: list[dict] = []
    lines: list[str] = []
    try:
        h1, h2 = free_port(), free_port()
        pgpair.EXTRA_CONF.append(f"pg_keeper.http_port = {h1}")
        pair = make_pair(reg, "http", 1000, 3)
        # node2 inherited node1's port from pg_basebackup: give it its own, restart it.
        pair.node2.append_conf(f"pg_keeper.http_port = {h2}")
        pair.node2.stop()
        pair.node2.start()
        if not wait_until(60, lambda: pair.node2.title_is("standby mode:connected")
                          and pair.node1.title_is("master mode:connected"), 0.2):
            raise BenchError("the pair did not reconnect after node2's restart")
        time.sleep(5)
        pids = {n.name: processes(n) for n in pair.nodes}
        for n in pair.nodes:
            # (A standby has no walwriter.)
            if not {"keeper", "listener", "checkpointer"} <= set(pids[n.name]):
                raise BenchError(f"{n.name}: found only {sorted(pids[n.name])}")

        def memory(phase: str):
            for node, found in pids.items():
                for name, pid in found.items():
                    m = smaps_rollup(pid)
                    rows.append({"phase": phase, "node": node, "process": name, "pid": pid,
                                 "uss_kb": m["Uss"], "pss_kb": m.get("Pss", 0), "rss_kb": m.get("Rss", 0),
                                 "private_dirty_kb": m.get("Private_Dirty", 0),
                                 "private_clean_kb": m.get("Private_Clean", 0)})

        watched = {"keeper": pids["node1"]["keeper"], "listener": pids["node1"]["listener"]}
        memory("idle")
        idle, _ = cpu_window(watched, args.idle)
        per_conn_ms = int(args.inter * 1000)
        checks, w_checks = cpu_window(watched, args.checks,
                                      lambda: wrk(h1, args.checks, args.checkers, per_conn_ms))
        memory("after checks")
        full, w_full = cpu_window(watched, args.max, lambda: wrk(h1, args.max, 8, None))
        memory("after unthrottled wrk")
        where = {(node, name): private_by_mapping(pid) for node in ("node1", "node2")
                 for name, pid in pids[node].items()
                 if name in ("keeper", "listener", "checkpointer")}
        contexts = memory_contexts(pair.node1, pids["node1"]["keeper"])
        status = [pair.node1.title(), pair.node2.title()]

        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        lines += [f"# HTTP endpoint cost ({stamp})", "",
                  f"Pair at `1s x 3`, PostgreSQL 15, listener on each node; {os.cpu_count()} CPUs. "
                  f"Titles at the end: {status[0][1] if status[0] else None} / "
                  f"{status[1][1] if status[1] else None}.", "",
                  "## Memory (kB, /proc/PID/smaps_rollup; USS = Private_Clean + Private_Dirty)", "",
                  "| phase | node | process | USS | PSS | RSS |", "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['phase']} | {r['node']} | {r['process']} | {r['uss_kb']} | {r['pss_kb']} | {r['rss_kb']} |")
        lines += ["", f"## The target: keeper and listener within {TARGET_KB} kB private of the checkpointer", "",
                  "| phase | node | checkpointer USS | keeper USS (over) | listener USS (over) | met |",
                  "|---|---|---|---|---|---|"]
        met_everywhere = True
        for phase in dict.fromkeys(r["phase"] for r in rows):
            for node in pids:
                uss = {r["process"]: r["uss_kb"] for r in rows if r["phase"] == phase and r["node"] == node}
                ck = uss["checkpointer"]
                met = all(uss[p] - ck <= TARGET_KB for p in ("keeper", "listener"))
                met_everywhere &= met
                lines.append(f"| {phase} | {node} | {ck} | {uss['keeper']} ({uss['keeper'] - ck:+d}) | "
                             f"{uss['listener']} ({uss['listener'] - ck:+d}) | {'yes' if met else 'NO'} |")
        lines += ["", f"Target met in every phase on both nodes: {'yes' if met_everywhere else 'NO'}."]
        lines += ["", "## Where the private memory is (kB, largest mappings)", ""]
        for (node, name), top in where.items():
            lines.append(f"- {node} {name}: " + ", ".join(f"{os.path.basename(m) or m} {kb}" for m, kb in top))
        lines += ["", "## node1's keeper: its PostgreSQL memory contexts (pg_log_backend_memory_contexts)", "",
                  "```", *contexts, "```"]
        rate = args.checkers / args.inter
        lines += ["", "## CPU of node1's keeper and listener (CPU seconds per second of wall time)", "",
                  "| window | keeper | listener | requests/s answered |", "|---|---|---|---|",
                  f"| idle {args.idle:.0f} s | {idle['keeper']:.5f} | {idle['listener']:.5f} | 0 |",
                  f"| {args.checkers} checkers x 1 every {args.inter:g} s ({rate:g}/s), {args.checks:.0f} s "
                  f"| {checks['keeper']:.5f} | {checks['listener']:.5f} | {w_checks.get('rps', float('nan')):.2f} |",
                  f"| wrk unthrottled, 8 connections, {args.max:.0f} s | {full['keeper']:.5f} | "
                  f"{full['listener']:.5f} | {w_full.get('rps', float('nan')):.0f} |",
                  "", "wrk's output (unthrottled):", "", "```", w_full["output"].strip(), "```", ""]
        with open(os.path.join(args.out, "memory.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        with open(os.path.join(args.out, "summary.md"), "w") as f:
            f.write("\n".join(lines))
        print("\n".join(lines))
        return 0
    finally:
        reg.cleanup()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
