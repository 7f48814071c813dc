"""Failover benchmark for pg_keeper_rs (run through bench/run).

Sets up real primary/standby pairs of the installed PostgreSQL 15 with the installed extension
(with a setting like '1s x 3 + witness', also a third plain server as the keepers' witness),
crashes them with kill -9 under a writing client, freezes the primary (SIGSTOP), cuts the link
between the nodes (through proxies), restarts the primary as planned (pg_ctl restart -m fast),
measures the keepers' CPU and memory while they heartbeat, and compares pgbench throughput with
and without the extension. Writes results.csv, outage.png (crashes), restart.png (planned
restarts), summary.md and keeper_lines.log to the output directory (--results/--out, default
bench/results).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import experiments as ex  # noqa: E402
import report  # noqa: E402
import pgpair  # noqa: E402
from pgpair import BIN, Registry  # noqa: E402

DEFAULT_SETTINGS = "5s x 1, 1s x 3, 200ms x 3, 100ms x 3"
EXPERIMENTS = ("primary", "standby", "frozen", "cut", "restart", "overhead", "pgbench")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="bench/run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3,
                   help="repetitions of each measurement (default 3); for 'restart', the planned restarts "
                        "per setting, all on one pair")
    p.add_argument("--quick", action="store_true", help="one repetition of everything (same as --reps 1)")
    p.add_argument("--settings", default=DEFAULT_SETTINGS,
                   help=f"comma-separated keepalive_time x keepalive_count, each optionally followed by "
                        f"'+ witness' (a third plain server holds the failover lease), e.g. '1s x 3 + witness' "
                        f"(default '{DEFAULT_SETTINGS}')")
    p.add_argument("--only", default=",".join(EXPERIMENTS),
                   help="comma-separated subset of: " + ", ".join(EXPERIMENTS) + " (default all)")
    p.add_argument("--duration", type=float, default=60,
                   help="seconds of idle heartbeating per overhead measurement window (default 60)")
    p.add_argument("--pgbench-time", type=int, default=20, help="seconds per pgbench run (default 20)")
    p.add_argument("--pgbench-pairs", type=int, default=None,
                   help="A/B pairs of pgbench runs (default: --reps + 2)")
    p.add_argument("--pgbench-scale", type=int, default=10, help="pgbench -i scale (default 10)")
    p.add_argument("--pgbench-setting", default=None,
                   help="keeper setting of the pgbench pair (default: the shortest keepalive_time chosen)")
    p.add_argument("--conf", action="append", default=[], metavar="NAME=VALUE",
                   help="extra postgresql.conf setting for every server (repeatable), "
                        "e.g. --conf wal_retrieve_retry_interval=200ms")
    p.add_argument("--keepalive-unit", choices=("ms", "s"), default="ms",
                   help="how keepalive_time is written to postgresql.conf: 'ms' ('100ms', default) "
                        "or 's' ('0.1s')")
    p.add_argument("--results", "--out", dest="results", default=os.path.join(HERE, "results"),
                   help="output directory, created if missing (default bench/results)")
    a = p.parse_args(argv)
    if a.quick:
        a.reps = 1
    if a.reps < 1:
        p.error("--reps must be at least 1")
    try:
        a.settings = [ex.parse_setting(t) for t in a.settings.split(",") if t.strip()]
        a.pgbench_setting = ex.parse_setting(a.pgbench_setting) if a.pgbench_setting else None
    except ValueError as e:
        p.error(str(e))
    if not a.settings:
        p.error("--settings is empty")
    a.only = [x.strip() for x in a.only.split(",") if x.strip()]
    bad = [x for x in a.only if x not in EXPERIMENTS]
    if bad:
        p.error(f"--only: unknown {bad}")
    for c in a.conf:
        if "=" not in c:
            p.error(f"--conf {c!r}: expected NAME=VALUE")
    if a.pgbench_pairs is None:
        a.pgbench_pairs = a.reps + 2
    a.pgbench_setting_given = a.pgbench_setting is not None
    if a.pgbench_setting is None:
        a.pgbench_setting = min(a.settings, key=lambda s: (s.ktime_ms, s.kcount))
    return a


def machine_info() -> dict:
    def sh(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.rstrip()
        except Exception as e:
            return f"({e})"

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"nproc": sh(["nproc"]).strip(), "free": sh(["free", "-g"]), "cpu": cpu,
            "pg_version": sh([f"{BIN}/postgres", "--version"]), "kernel": platform.release()}


EXTENSION_SO = "/usr/lib/postgresql/15/lib/pg_keeper_rs.so"


def extension_fingerprint(short: bool = False) -> str:
    """sha256 (first 12 digits) and mtime of the installed extension library; `short`: the digest
    alone (recorded with every repetition, since other people may reinstall it during a run)."""
    import hashlib
    try:
        with open(EXTENSION_SO, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:12]
        if short:
            return digest
        mtime = dt.datetime.fromtimestamp(os.stat(EXTENSION_SO).st_mtime, dt.timezone.utc)
        return f"sha256 {digest}…, modified {mtime:%Y-%m-%d %H:%M UTC}"
    except OSError as e:
        return f"unreadable ({e})"


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


class Run:
    """Collects the records and keeps the run going when a repetition fails."""

    def __init__(self):
        self.records: list[dict] = []
        self.keeper_lines: list[str] = []

    def record(self, experiment, s, rep, metrics=None, error=None):
        r = {"experiment": experiment, "setting": s.label, "ktime_ms": s.ktime_ms, "kcount": s.kcount,
             "budget_s": s.budget, "rep": rep, "status": "ok" if error is None else "failed",
             "error": error or "", "metrics": metrics or {}, "build": extension_fingerprint(short=True)}
        self.records.append(r)
        return r

    def trial(self, experiment, s, rep, fn):
        t0 = time.monotonic()
        try:
            m = fn()
        except KeyboardInterrupt:
            raise
        except Exception as e:
            msg = f"{type(e).__name__}: {e}"
            self.record(experiment, s, rep, error=msg)
            print(f"  {experiment:14s} {s.label:18s} rep {rep}: FAILED ({time.monotonic() - t0:.0f}s): {msg}", flush=True)
            if not isinstance(e, ex.BenchError):
                traceback.print_exc()
            return
        self.record(experiment, s, rep, m)
        brief = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())
        print(f"  {experiment:14s} {s.label:18s} rep {rep}: {brief}  [{time.monotonic() - t0:.0f}s]", flush=True)


def _unwrap(result):
    """A measured dict, or the error that replaced it."""
    if isinstance(result, Exception):
        raise result
    return result


def main(argv) -> int:
    args = parse_args(argv)
    os.makedirs(args.results, exist_ok=True)
    started = dt.datetime.now(dt.timezone.utc)
    t_start = time.monotonic()
    load_start = loadavg()
    so_start = extension_fingerprint()
    run = Run()
    notes: list[str] = []

    # SIGTERM (and SIGHUP) end the run like Ctrl-C: through the clean-up below.
    def _interrupt(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)

    for c in args.conf:
        name, value = c.split("=", 1)
        pgpair.EXTRA_CONF.append(f"{name.strip()} = '{value.strip()}'")
    pgpair.KEEPALIVE_UNIT = args.keepalive_unit
    reg = Registry()
    interrupted = False
    print(f"pg_keeper_rs benchmark: settings {', '.join(s.label for s in args.settings)}; reps {args.reps}; "
          f"experiments {', '.join(args.only)}; work dir {reg.root}", flush=True)
    try:
        reg.template()
        # Repetitions are interleaved over the settings so that slow drifts of the machine's
        # load spread over all settings.
        if "primary" in args.only:
            print("primary crash (kill -9 of the primary's postmaster under a writing client):", flush=True)
            for rep in range(1, args.reps + 1):
                for s in args.settings:
                    run.trial("primary_crash", s, rep, lambda: ex.primary_crash(reg, s, run.keeper_lines))
        if "standby" in args.only:
            print("standby crash (kill -9 of the synchronous standby's postmaster):", flush=True)
            for rep in range(1, args.reps + 1):
                for s in args.settings:
                    run.trial("standby_crash", s, rep, lambda: ex.standby_crash(reg, s, run.keeper_lines))
        if "frozen" in args.only:
            print("frozen primary (SIGSTOP of the primary's postmaster and children, later SIGCONT):", flush=True)
            for rep in range(1, args.reps + 1):
                for s in args.settings:
                    run.trial("frozen_primary", s, rep, lambda: ex.frozen_primary(reg, s, run.keeper_lines))
        if "cut" in args.only:
            print("cut link (heartbeats and replication between the nodes blackholed, later healed):", flush=True)
            for rep in range(1, args.reps + 1):
                for s in args.settings:
                    run.trial("cut_link", s, rep, lambda: ex.cut_link(reg, s, run.keeper_lines))
        if "restart" in args.only:
            print(f"planned restart (pg_ctl restart -m fast of the primary under a writing client; "
                  f"{args.reps} per setting on one pair):", flush=True)
            for s in args.settings:
                pr = ex.PlannedRestarts(reg, s, run.keeper_lines)
                try:
                    for rep in range(1, args.reps + 1):
                        run.trial("planned_restart", s, rep, pr.one_restart)
                except BaseException:
                    pr.destroy()
                    raise
                # The client stops; every acknowledged commit must be on the primary.
                run.trial("planned_restart_end", s, 1, pr.finish)
        if "overhead" in args.only:
            print(f"overhead (one idle pair per setting, {args.reps} window(s) of {args.duration:g}s):", flush=True)
            pairs = ex.overhead_start(reg, args.settings)
            try:
                for rep in range(1, args.reps + 1):
                    results = ex.overhead_window(pairs, args.duration)
                    for s in args.settings:
                        res = results[s]
                        run.trial("overhead", s, rep, lambda r=res: _unwrap(r))
            finally:
                for p in pairs.values():
                    if not isinstance(p, Exception):
                        p.destroy()
        if "pgbench" in args.only:
            # Without --pgbench-setting: the shortest keepalive_time (most heartbeats), or the next
            # one if the keeper does not run with the configured value.
            candidates = ([args.pgbench_setting] if args.pgbench_setting_given else
                          sorted(args.settings, key=lambda x: (x.ktime_ms, x.kcount)))
            ab = None
            for s in candidates:
                print(f"pgbench (pairs with and without the extension, keeper at {s.label}; "
                      f"{args.pgbench_pairs} A/B pair(s) of {args.pgbench_time}s runs):", flush=True)
                try:
                    ab = ex.PgbenchAB(reg, s, args.pgbench_scale, 4, 2, args.pgbench_time)
                    args.pgbench_setting = s
                    break
                except KeyboardInterrupt:
                    raise
                except Exception as e:
                    for rep in range(1, args.pgbench_pairs + 1):
                        run.record("pgbench", s, rep, error=f"setup: {type(e).__name__}: {e}")
                    print(f"  pgbench setup at {s.label} FAILED: {e}", flush=True)
                    if "runs with keepalive_time" not in str(e):
                        break
                    notes.append(f"pgbench could not run at {s.label} (the keeper did not take the setting); "
                                 "it tried the next setting")
            if ab is not None:
                try:
                    for rep in range(1, args.pgbench_pairs + 1):
                        run.trial("pgbench", args.pgbench_setting, rep, ab.one_pair)
                finally:
                    ab.destroy()
    except KeyboardInterrupt as e:
        interrupted = True
        notes.append(f"the run was interrupted ({e or 'Ctrl-C'}); the figures cover what had finished")
        print(f"\ninterrupted ({e or 'Ctrl-C'}); stopping every server", flush=True)
    except Exception as e:
        notes.append(f"the run stopped early: {type(e).__name__}: {e}")
        print(f"run stopped early: {e}", flush=True)
        traceback.print_exc()
    finally:
        # Ignore further Ctrl-C while the servers are stopped and the directory removed.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        reg.cleanup()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    finished = dt.datetime.now(dt.timezone.utc)
    if extension_fingerprint() != so_start:
        notes.append("the installed pg_keeper_rs.so changed during the run (someone reinstalled it): "
                     "the figures mix two builds")
    run_info = {
        "started": started.strftime("%Y-%m-%d %H:%M UTC"),
        "finished": finished.strftime("%H:%M UTC"),
        "elapsed_min": (time.monotonic() - t_start) / 60,
        "command": "bench/run " + " ".join(shlex.quote(a) for a in argv) if argv else "bench/run",
        "reps": args.reps,
        "duration": args.duration,
        "overhead": f"window {args.duration:g}s" if "overhead" in args.only else "not run (--only)",
        "pgbench": (f"scale {args.pgbench_scale}, {args.pgbench_pairs} A/B pair(s) of {args.pgbench_time}s runs, "
                    f"keeper at {args.pgbench_setting.label}" if "pgbench" in args.only else "not run (--only)"),
        "extra_conf": ", ".join(pgpair.EXTRA_CONF) or "none",
        "keepalive_unit": args.keepalive_unit,
        "so_start": so_start,
        "so_end": extension_fingerprint(),
        "load_start": load_start,
        "load_end": loadavg(),
        "notes": notes,
    }
    report.write_csv(os.path.join(args.results, "results.csv"), run.records)
    with open(os.path.join(args.results, "keeper_lines.log"), "w") as f:
        f.write("\n".join(run.keeper_lines) + "\n")
    charts = []
    ran = {r["experiment"] for r in run.records}
    if ran & {"primary_crash", "standby_crash"} or not ran & {"planned_restart"}:
        charts.append(("outage.png", report.chart))
    if "planned_restart" in ran:
        charts.append(("restart.png", report.restart_chart))
    for name, draw in charts:
        try:
            draw(os.path.join(args.results, name), run.records, args.settings)
        except Exception as e:
            print(f"could not draw {name}: {e}", flush=True)
    text = report.summary(os.path.join(args.results, "summary.md"), run.records, args.settings,
                          machine_info(), run_info)
    print("\n" + text + "\n")
    print(f"wrote {args.results}/results.csv, {', '.join(n for n, _ in charts)}, summary.md, keeper_lines.log "
          f"({run_info['elapsed_min']:.1f} min)")
    failed = sum(r["status"] != "ok" for r in run.records)
    if failed:
        print(f"{failed} repetition(s) failed; see summary.md")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
