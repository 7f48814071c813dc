"""The measurements: primary crash, standby crash, frozen primary (SIGSTOP), cut link between the
nodes (through proxies), planned restarts of the primary (pg_ctl restart -m fast), keeper overhead
(CPU, memory and WAL while heartbeating), and pgbench throughput with and without the extension.

Each trial returns a dict of figures (seconds, counts, MB) or raises; the caller records a
raised error as a failed repetition and goes on.
"""

from __future__ import annotations

import os
import random
import re
import socket
import subprocess
import threading
import time
from dataclasses import dataclass

import psycopg

from pgpair import (BIN, BenchError, Node, Pair, Registry, cpu_ns, cpu_ticks, lease_ms, make_pair, memory_kb,
                    parse_log, wait_until)

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Setting:
    ktime_ms: int
    kcount: int
    # A third, plain PostgreSQL server holds the failover lease (pg_keeper.witness_conninfo).
    witness: bool = False

    @property
    def budget(self) -> float:
        """keepalive_time x keepalive_count, in seconds: the detection budget."""
        return self.ktime_ms * self.kcount / 1000.0

    @property
    def lease(self) -> float | None:
        """3 x keepalive_time + 200 ms (whatever keepalive_count), in seconds: the lease time on
        the witness (None without a witness). A standby promotes only once the primary's lease has
        expired."""
        return lease_ms(self.ktime_ms) / 1000.0 if self.witness else None

    @property
    def label(self) -> str:
        t = f"{self.ktime_ms // 1000}s" if self.ktime_ms % 1000 == 0 else f"{self.ktime_ms}ms"
        return f"{t} x {self.kcount}" + (" + witness" if self.witness else "")

    @property
    def slug(self) -> str:
        return self.label.replace(" x ", "x").replace(" + ", "-")


SETTING_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s)\s*[x:*]\s*(\d+)\s*(\+\s*witness\s*)?$", re.I)


def parse_setting(text: str) -> Setting:
    m = SETTING_RE.match(text)
    if not m:
        raise ValueError(f"bad setting {text!r}: expected like '200ms x 3', '1s:3' or '1s x 3 + witness'")
    value, unit, count = float(m.group(1)), m.group(2).lower(), int(m.group(3))
    ms = int(round(value * (1000 if unit == "s" else 1)))
    if ms < 100 or count < 1:
        raise ValueError(f"bad setting {text!r}: keepalive_time must be >= 100ms and count >= 1")
    return Setting(ms, count, witness=m.group(4) is not None)


# ---------------------------------------------------------------- the writing client

class Writer(threading.Thread):
    """A client that commits one small row every `interval` seconds (autocommit INSERT).

    After a failed commit it reconnects at once; a failed connection attempt is retried one
    interval later. Every acknowledged commit is recorded as (id, Unix time of the ack, port of
    the server that acknowledged it).

    With `commit_timeout`, a commit that has not returned after that many seconds is given up:
    a watchdog shuts the connection's socket down (a frozen server would otherwise hold the
    client forever: its kernel still acknowledges the TCP traffic), and the client reconnects."""

    def __init__(self, conninfo: str, interval: float = 0.01, commit_timeout: float | None = None):
        super().__init__(daemon=True)
        self.conninfo = conninfo
        self.interval = interval
        self.commit_timeout = commit_timeout
        self.timeouts = 0
        self._inflight: tuple[float, psycopg.Connection] | None = None
        self.acks: list[tuple[int, float, int]] = []
        self.failures: list[tuple[float, str]] = []
        self.connects: list[tuple[float, int]] = []
        self._stop_flag = threading.Event()
        self._next_id = 1
        self.conn: psycopg.Connection | None = None

    def stop(self) -> None:
        self._stop_flag.set()

    def acks_since(self, t: float, port: int | None = None) -> list[tuple[int, float, int]]:
        return [a for a in list(self.acks) if a[1] > t and (port is None or a[2] == port)]

    def _watchdog(self) -> None:
        while not self._stop_flag.wait(0.02):
            inflight = self._inflight
            if inflight is None or time.monotonic() - inflight[0] < self.commit_timeout:
                continue
            try:
                sk = socket.socket(fileno=os.dup(inflight[1].fileno()))
                try:
                    sk.shutdown(socket.SHUT_RDWR)
                finally:
                    sk.close()
                self.timeouts += 1
            except Exception:
                pass
            if self._inflight is inflight:
                self._inflight = None

    def run(self) -> None:
        port = 0
        if self.commit_timeout is not None:
            threading.Thread(target=self._watchdog, daemon=True, name="writer-watchdog").start()
        while not self._stop_flag.is_set():
            if self.conn is None:
                try:
                    self.conn = psycopg.connect(self.conninfo, autocommit=True)
                    port = int(self.conn.info.port)
                    self.connects.append((time.time(), port))
                except Exception as e:
                    self.failures.append((time.time(), f"connect: {str(e).splitlines()[0] if str(e) else e!r}"))
                    self.conn = None
                    self._stop_flag.wait(self.interval)
                    continue
            i = self._next_id
            self._next_id += 1
            t0 = time.monotonic()
            try:
                self._inflight = (t0, self.conn)
                self.conn.execute("INSERT INTO bench_writes (id) VALUES (%s)", (i,))
                self._inflight = None
                self.acks.append((i, time.time(), port))
            except Exception as e:
                self._inflight = None
                self.failures.append((time.time(), f"commit {i}: {str(e).splitlines()[0] if str(e) else e!r}"))
                try:
                    self.conn.close()
                except Exception:
                    pass
                self.conn = None
                continue  # reconnect at once
            pause = self.interval - (time.monotonic() - t0)
            if pause > 0:
                self._stop_flag.wait(pause)
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:
                pass


def stop_writer(w: Writer | None) -> None:
    if w is not None:
        w.stop()
        w.join(5)


class LeaseWatch(threading.Thread):
    """Reads the lease row on the witness every `interval` seconds over one connection and
    records every version of it: (Unix time first seen, holder, epoch, sync_standby, renewed_at,
    expires_at), the two timestamps as Unix times on the witness's clock (the same machine)."""

    SQL = ("SELECT holder, epoch, sync_standby, extract(epoch FROM renewed_at)::float8, "
           "extract(epoch FROM expires_at)::float8 FROM pg_keeper_lease WHERE id = 1")

    def __init__(self, witness: Node, interval: float = 0.02):
        super().__init__(daemon=True)
        self.witness = witness
        self.interval = interval
        self.rows: list[tuple[float, str, int, str | None, float, float]] = []
        self.errors = 0
        self._stop_flag = threading.Event()

    def stop(self) -> None:
        self._stop_flag.set()

    def run(self) -> None:
        conn = None
        while not self._stop_flag.is_set():
            try:
                if conn is None:
                    conn = self.witness.connect(2)
                row = conn.execute(self.SQL).fetchone()
                if row is not None and (not self.rows or self.rows[-1][1:] != tuple(row)):
                    self.rows.append((time.time(), *row))
            except Exception:
                self.errors += 1
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:
                        pass
                conn = None
            self._stop_flag.wait(self.interval)
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def last_of(self, holder: str):
        rows = [r for r in self.rows if r[1] == holder]
        return rows[-1] if rows else None

    def describe(self, since: float) -> list[tuple[float, str]]:
        """(time, line) for every version of the lease seen, with times relative to `since`."""
        return [(t, f"witness {t - since:+8.3f}s lease read: holder {h}, epoch {e}, synchronous standby "
                    f"{sb or 'none'}, renewed {ren - since:+.3f}s, expires {exp - since:+.3f}s")
                for t, h, e, sb, ren, exp in self.rows]


def stop_watch(w: LeaseWatch | None) -> None:
    if w is not None:
        w.stop()
        w.join(5)


def missing_acked(node: Node, writer: Writer) -> tuple[int, int]:
    """(acknowledged ids missing on `node`, ids present there that were never acknowledged)."""
    present = {r[0] for r in node.query("SELECT id FROM bench_writes", timeout=5)}
    acked = {a[0] for a in writer.acks}
    return len(acked - present), len(present - acked)


CREATE_TABLE = "CREATE TABLE bench_writes (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT now())"


def _warm_up(w: Writer, setting: Setting) -> None:
    t0 = time.monotonic()
    if not wait_until(20, lambda: len(w.acks) >= 50, 0.05):
        raise BenchError(f"the client made only {len(w.acks)} commits in 20s before the crash "
                         f"(last error: {w.failures[-1][1] if w.failures else 'none'})")
    # Steady state: one full keepalive_time with the standby synchronous and the client writing,
    # so that every keeper's last answer from its peer shows the pair as it runs. Then a random
    # extra wait puts the crash at a random point of the heartbeat cycle.
    ktime = setting.ktime_ms / 1000.0
    time.sleep(max(0.0, ktime + 0.1 - (time.monotonic() - t0)) + random.uniform(0, ktime))


# Server (not keeper) log lines that show the recovery and promotion steps.
SERVER_EVENTS = ("promote", "waiting for WAL", "redo done", "archive recovery complete", "ready to accept",
                 "selected new timeline", "could not receive data", "could not connect to the primary")


def _keeper_log(pair: Pair, since: float, watch: "LeaseWatch | None" = None, until: float | None = None,
                events: tuple[str, ...] = SERVER_EVENTS) -> list[str]:
    """The keepers' log lines and the server's lines that contain one of `events` (by default the
    recovery lines) from 1 s before `since` on (up to `until`, if given), with times relative to
    `since`; with a witness also its errors and the versions of the lease that `watch` saw."""
    out = []
    for n in pair.nodes:
        for ln in parse_log(n.log):
            if ln.t < since - 1.0 or (until is not None and ln.t > until):
                continue
            if "pg_keeper:" in ln.text or any(e in ln.text for e in events):
                out.append((ln.t, f"{n.name} {ln.t - since:+8.3f}s {ln.text}"))
    if pair.witness is not None:
        for ln in parse_log(pair.witness.log):
            if (ln.t >= since - 1.0 and (until is None or ln.t <= until)
                    and ln.text.startswith(("WARNING", "ERROR", "FATAL", "PANIC"))):
                out.append((ln.t, f"witness {ln.t - since:+8.3f}s {ln.text}"))
    if watch is not None:
        out.extend(watch.describe(since))
    return [text for _, text in sorted(out, key=lambda x: x[0])]


# ---------------------------------------------------------------- 1. primary crash

def primary_crash(reg: Registry, s: Setting, log_sink: list[str]) -> dict:
    """kill -9 of the primary's postmaster under a writing client; the standby must take over."""
    pair = make_pair(reg, f"primary-crash-{s.slug}", s.ktime_ms, s.kcount, witness=s.witness)
    w = None
    watch = None
    t_kill = None
    try:
        n1, n2 = pair.node1, pair.node2
        n1.query(CREATE_TABLE)
        w = Writer(pair.multihost())
        w.start()
        _warm_up(w, s)
        if pair.witness is not None:
            watch = LeaseWatch(pair.witness)
            watch.start()
            # The watch must have seen node1's lease before the kill.
            if not wait_until(5, lambda: watch.last_of("node1"), 0.02):
                raise BenchError(f"could not read the lease on the witness ({watch.errors} failed reads)")
        t_kill = n1.kill9()
        limit = max(s.budget, s.lease or 0.0) + 30
        if not wait_until(limit, lambda: w.acks_since(t_kill, n2.port), 0.02):
            raise BenchError(f"no commit accepted by node2 within {limit:.1f}s after the kill "
                             f"(node2 title {n2.title()}, last client error: {w.failures[-1][1] if w.failures else 'none'})")
        time.sleep(0.5)
        stop_writer(w)
        stop_watch(watch)
        n1.wait_gone(20)

        last_old = max(a[1] for a in w.acks if a[2] == n1.port)
        first_new = min(a[1] for a in w.acks if a[2] == n2.port)
        lost = n2.first_line("lost; promoting", t_kill)
        ready = n2.first_line("database system is ready to accept connections", t_kill, keeper_only=False)
        promoted = n2.first_line("promoted:", t_kill)
        if lost is None:
            raise BenchError("node2 accepted writes but its log has no 'lost; promoting' line")
        # The standby accepts writes when its recovery ends (the server's own log line); the
        # keeper's `promoted:` line follows once the keeper notices.
        writable = ready.t if ready else (promoted.t if promoted else None)
        if writable is None:
            raise BenchError("node2 accepted writes but its log shows no end of recovery")
        outage = first_new - last_old
        detection = lost.t - t_kill
        promotion = writable - lost.t
        missing, unacked = missing_acked(n2, w)
        result = {
            "outage_s": outage,
            "detection_s": detection,
            "promotion_s": promotion,
            "reconnection_s": outage - detection - promotion,
            "keeper_promoted_line_s": (promoted.t - t_kill) if promoted else float("nan"),
            "lost_commits": missing,
            "unacked_but_present": unacked,
            "acked_commits": len(w.acks),
            "client_failures": len(w.failures),
        }
        if watch is not None:
            result.update(_lease_figures(watch, n2, t_kill, first_new))
        return result
    finally:
        stop_writer(w)
        stop_watch(watch)
        if t_kill is not None:
            log_sink.append(f"## primary crash {s.label} (times relative to the kill)")
            log_sink.extend(_keeper_log(pair, t_kill, watch))
        pair.destroy()


def _lease_figures(watch: LeaseWatch, n2: Node, t_kill: float, first_new: float) -> dict:
    """With a witness: when the dead primary's lease ran out, and when node2 waited for and took it
    (seconds after the kill)."""
    old = watch.last_of("node1")
    new = watch.last_of("node2")
    taken = n2.first_line("took the lease on the witness", t_kill)
    held = n2.first_line("the lease on the witness cannot be taken", t_kill)
    if taken is None:
        raise BenchError("node2 promoted but its log has no 'took the lease on the witness' line")
    if new is None:
        raise BenchError("node2 promoted but the lease on the witness never named it")
    return {
        # node1's last renewal (negative: before the kill) and the expiry it wrote.
        "lease_last_renewal_s": old[4] - t_kill,
        "lease_expiry_s": old[5] - t_kill,
        # node2's "not promoting: ... the lease on the witness cannot be taken" line, if it waited.
        "lease_held_line_s": (held.t - t_kill) if held else float("nan"),
        "lease_taken_s": taken.t - t_kill,
        # first commit on node2 after the old lease expired.
        "outage_after_expiry_s": first_new - old[5],
    }


# ---------------------------------------------------------------- 2. standby crash

def standby_crash(reg: Registry, s: Setting, log_sink: list[str]) -> dict:
    """kill -9 of the synchronous standby's postmaster; commits on the primary stall until its
    keeper switches to asynchronous replication."""
    pair = make_pair(reg, f"standby-crash-{s.slug}", s.ktime_ms, s.kcount, witness=s.witness)
    w = None
    t_kill = None
    try:
        n1, n2 = pair.node1, pair.node2
        n1.query(CREATE_TABLE)
        w = Writer(n1.conninfo("connect_timeout=2"))
        w.start()
        _warm_up(w, s)
        t_kill = n2.kill9()
        limit = max(s.budget, s.lease or 0.0) + 30

        def released():
            line = n1.first_line("changed replication mode to asynchronous", t_kill)
            return line is not None and bool(w.acks_since(line.t - 0.01))

        if not wait_until(limit, released, 0.02):
            raise BenchError(f"commits on node1 not released within {limit:.1f}s after the kill "
                             f"(node1 title {n1.title()}, acks since kill {len(w.acks_since(t_kill))})")
        time.sleep(0.5)
        stop_writer(w)
        n2.wait_gone(20)

        times = [a[1] for a in w.acks]
        before = [t for t in times if t <= t_kill]
        if not before:
            raise BenchError("no commit acknowledged before the kill")
        start = times.index(before[-1])
        # The stall is the longest gap between consecutive acknowledged commits from the last
        # one before the kill onwards (a commit the standby had already confirmed may still be
        # acknowledged just after the kill).
        gaps = [(times[i + 1] - times[i], i) for i in range(start, len(times) - 1)]
        if not gaps:
            raise BenchError("no commit acknowledged after the kill")
        stall, _ = max(gaps)
        lost = n1.first_line("lost; switching to asynchronous", t_kill)
        switched = n1.first_line("changed replication mode to asynchronous", t_kill)
        if lost is None or switched is None:
            raise BenchError("node1's log lacks the 'lost; switching' / 'changed replication mode' lines")
        detection = lost.t - t_kill
        switch = switched.t - lost.t
        missing, unacked = missing_acked(n1, w)
        result = {
            "stall_s": stall,
            "detection_s": detection,
            "switch_s": switch,
            "release_s": stall - detection - switch,
            "lost_commits": missing,
            "acked_commits": len(w.acks),
            "client_failures": len(w.failures),
        }
        if pair.witness is not None:
            # With a witness the primary records "no synchronous standby" in the lease before it
            # switches; part of `switch`.
            recorded = n1.first_line("recorded on the witness that no standby is synchronous", t_kill)
            if recorded is None:
                raise BenchError("node1 switched to async but its log has no 'recorded on the witness' line")
            result["lease_released_line_s"] = recorded.t - t_kill
            lease = pair.lease()
            if lease != ("node1", None):
                raise BenchError(f"after the switch the lease on the witness is {lease}, not held by node1 "
                                 "with no synchronous standby")
        return result
    finally:
        stop_writer(w)
        if t_kill is not None:
            log_sink.append(f"## standby crash {s.label} (times relative to the kill)")
            log_sink.extend(_keeper_log(pair, t_kill))
        pair.destroy()


# ---------------------------------------------------------------- frozen primary

# A commit on the frozen primary is given up after this long (the client then reconnects).
FROZEN_COMMIT_TIMEOUT_S = 1.0


def frozen_primary(reg: Registry, s: Setting, log_sink: list[str]) -> dict:
    """SIGSTOP of the primary's postmaster and all its children under a writing client: the
    server hangs without closing any connection. The standby must take over; once it has, the
    old primary is continued (SIGCONT) and must fence itself (`superseded`) and go away."""
    pair = make_pair(reg, f"frozen-{s.slug}", s.ktime_ms, s.kcount, witness=s.witness)
    w = None
    watch = None
    t_freeze = t_thaw = None
    n1, n2 = pair.node1, pair.node2
    try:
        n1.query(CREATE_TABLE)
        w = Writer(pair.multihost(), commit_timeout=FROZEN_COMMIT_TIMEOUT_S)
        w.start()
        _warm_up(w, s)
        if pair.witness is not None:
            watch = LeaseWatch(pair.witness)
            watch.start()
            if not wait_until(5, lambda: watch.last_of("node1"), 0.02):
                raise BenchError(f"could not read the lease on the witness ({watch.errors} failed reads)")
        n1_pids = n1.remember_processes()
        t_freeze = n1.freeze()
        limit = max(s.budget, s.lease or 0.0) + 30
        if not wait_until(limit, lambda: w.acks_since(t_freeze, n2.port), 0.02):
            raise BenchError(f"no commit accepted by node2 within {limit:.1f}s after the freeze "
                             f"(node2 title {n2.title()}, last client error: {w.failures[-1][1] if w.failures else 'none'})")
        time.sleep(0.5)
        stop_watch(watch)
        t_thaw = n1.thaw()
        superseded = wait_until(limit, lambda: n1.first_line("superseded", t_thaw), 0.02)
        gone = n1.wait_gone(limit)
        t_gone = time.time() if gone else None
        time.sleep(0.2)
        stop_writer(w)

        last_old = max(a[1] for a in w.acks if a[2] == n1.port and a[1] <= t_freeze + 0.1)
        first_new = min(a[1] for a in w.acks if a[2] == n2.port)
        lost = n2.first_line("lost; promoting", t_freeze)
        ready = n2.first_line("database system is ready to accept connections", t_freeze, keeper_only=False)
        promoted = n2.first_line("promoted:", t_freeze)
        if lost is None:
            raise BenchError("node2 accepted writes but its log has no 'lost; promoting' line")
        writable = ready.t if ready else (promoted.t if promoted else None)
        if writable is None:
            raise BenchError("node2 accepted writes but its log shows no end of recovery")
        missing, unacked = missing_acked(n2, w)
        outage = first_new - last_old
        result = {
            "outage_s": outage,
            "detection_s": lost.t - t_freeze,
            "promotion_s": writable - lost.t,
            "reconnection_s": outage - (lost.t - t_freeze) - (writable - lost.t),
            "keeper_promoted_line_s": (promoted.t - t_freeze) if promoted else float("nan"),
            # after the thaw: node1's keeper sees that it was superseded and shuts it down.
            "fenced_line_s": (superseded.t - t_thaw) if superseded else float("nan"),
            "fenced_gone_s": (t_gone - t_thaw) if t_gone else float("nan"),
            "node1_acks_after_freeze": len(w.acks_since(t_freeze + 0.01, n1.port)),
            "lost_commits": missing,
            "unacked_but_present": unacked,
            "acked_commits": len(w.acks),
            "client_commit_timeouts": w.timeouts,
            "client_failures": len(w.failures),
            "frozen_processes": len(n1_pids),
        }
        if watch is not None:
            result.update(_lease_figures(watch, n2, t_freeze, first_new))
        if superseded is None:
            raise BenchError(f"node1 did not log 'superseded' within {limit:.0f}s after the thaw "
                             f"(title {n1.title()}); figures so far: {result}")
        if not gone:
            raise BenchError(f"node1's processes did not all exit within {limit:.0f}s after the thaw "
                             f"(title {n1.title()}); figures so far: {result}")
        return result
    finally:
        # A stopped server cannot be stopped by pg_ctl: continue every frozen process first.
        n1.thaw()
        stop_writer(w)
        stop_watch(watch)
        if t_freeze is not None:
            log_sink.append(f"## frozen primary {s.label} (times relative to the freeze"
                            + (f"; thawed at {t_thaw - t_freeze:+.3f}s)" if t_thaw else ")"))
            log_sink.extend(_keeper_log(pair, t_freeze, watch))
        pair.destroy()


# ---------------------------------------------------------------- cut link between the nodes

def _longest_gap(times: list[float], since: float, until: float) -> float | None:
    """The longest gap between consecutive times from the last one at or before `since` up to
    the first one after `until` (None without a time before `since` and one after it)."""
    before = [t for t in times if t <= since]
    if not before:
        return None
    seq = [before[-1]] + [t for t in times if since < t <= until]
    after = [t for t in times if t > until]
    if after:
        seq.append(after[0])
    if len(seq) < 2:
        return None
    return max(b - a for a, b in zip(seq, seq[1:]))


def cut_link(reg: Registry, s: Setting, log_sink: list[str]) -> dict:
    """Cuts the link between the nodes both ways (heartbeats and replication, through proxies)
    while each still reaches the witness and a client writes to node1 directly. With a witness
    node1 keeps the lease and switches to asynchronous replication after the budget, and node2
    must not promote; without one node2 promotes and both are writable until the link heals and
    node1 fences itself. Then the link is healed and what follows is recorded."""
    pair = make_pair(reg, f"cut-{s.slug}", s.ktime_ms, s.kcount, witness=s.witness, proxied=True)
    w = None
    t_cut = t_heal = None
    n1, n2 = pair.node1, pair.node2
    try:
        n1.query(CREATE_TABLE)
        w = Writer(n1.conninfo("connect_timeout=2"))
        w.start()
        _warm_up(w, s)
        t_cut = pair.cut()
        limit = max(s.budget, s.lease or 0.0) + 30
        ktime = s.ktime_ms / 1000.0

        def switched():
            line = n1.first_line("changed replication mode to asynchronous", t_cut)
            return line is not None and bool(w.acks_since(line.t - 0.01))

        ok = wait_until(limit, switched, 0.02)
        # node2's decision: promotion without a witness; with one a refusal to promote (it
        # cannot take the lease), and it must stay a standby.
        if s.witness:
            held = wait_until(limit, lambda: n2.first_line("the lease on the witness cannot be taken", t_cut), 0.02)
            # Keep the cut a while longer: a lease the primary stopped renewing would expire.
            time.sleep(max(2.0, (s.lease or 0) + 2 * ktime))
        else:
            held = None
            wait_until(limit, lambda: n2.first_line("database system is ready to accept connections",
                                                    t_cut, keeper_only=False), 0.02)
            time.sleep(max(1.0, 2 * ktime))  # both writable: node1 keeps acknowledging commits
        lost_line = n2.first_line("lost; promoting", t_cut)
        ready = n2.first_line("database system is ready to accept connections", t_cut, keeper_only=False)
        try:
            in_recovery = n2.query("SELECT pg_is_in_recovery()")[0][0]
        except Exception:
            in_recovery = None
        lease_during = pair.lease() if pair.witness is not None else None
        t_heal = pair.heal()

        # After the heal: without a witness (node2 promoted) node1 must be superseded and go;
        # with one node2 streams again and node1 restores synchronous replication.
        superseded = gone = restored = None
        if ready is not None:
            superseded = wait_until(limit, lambda: n1.first_line("superseded", t_heal), 0.02)
            gone = time.time() if n1.wait_gone(limit) else None
        else:
            restored = wait_until(limit, lambda: n1.first_line("restored synchronous replication", t_heal), 0.02)
            if restored:
                wait_until(10, lambda: w.acks_since(restored.t), 0.02)
        time.sleep(0.3)
        stop_writer(w)

        times1 = [a[1] for a in w.acks if a[2] == n1.port]
        lost_async = n1.first_line("lost; switching to asynchronous", t_cut)
        sw = n1.first_line("changed replication mode to asynchronous", t_cut)
        stall = _longest_gap(times1, t_cut, t_heal)
        result = {
            "stall_s": stall if stall is not None else float("nan"),
            "detection_s": (lost_async.t - t_cut) if lost_async else float("nan"),
            "switch_s": (sw.t - lost_async.t) if sw and lost_async else float("nan"),
            "node2_promoted": int(ready is not None or lost_line is not None or in_recovery is False),
            "node2_detection_s": (lost_line.t - t_cut) if lost_line else float("nan"),
            "node2_refusal_line_s": (held.t - t_cut) if held else float("nan"),
            "cut_held_s": t_heal - t_cut,
            "acked_during_cut": len([t for t in times1 if t_cut < t <= t_heal]),
            "acked_commits": len(w.acks),
            "client_failures": len(w.failures),
        }
        if ready is not None:
            # Split brain by design (no witness): node2 writable from its end of recovery, node1
            # until it fenced itself after the heal.
            stop1 = superseded.t if superseded else (gone or time.time())
            result["node2_writable_s"] = ready.t - t_cut
            result["both_writable_s"] = stop1 - ready.t
            result["node1_acks_after_promotion"] = len([t for t in times1 if t > ready.t])
            result["heal_fenced_line_s"] = (superseded.t - t_heal) if superseded else float("nan")
            result["heal_node1_gone_s"] = (gone - t_heal) if gone else float("nan")
            try:
                missing, _ = missing_acked(n2, w)
            except Exception:
                missing = float("nan")
            result["lost_commits"] = missing  # acknowledged by node1 while async, not on node2
        else:
            result["heal_sync_restored_s"] = (restored.t - t_heal) if restored else float("nan")
            missing, _ = missing_acked(n1, w)
            result["lost_commits"] = missing
        if s.witness:
            released = n1.first_line("recorded on the witness that no standby is synchronous", t_cut)
            result["lease_released_line_s"] = (released.t - t_cut) if released else float("nan")
            result["lease_ok_during_cut"] = int(lease_during == ("node1", None))
        if not ok:
            raise BenchError(f"commits on node1 not released within {limit:.1f}s after the cut "
                             f"(node1 title {n1.title()}); figures so far: {result}")
        if not s.witness and ready is None:
            raise BenchError(f"node2 did not promote within {limit:.0f}s of the cut without a witness; "
                             f"figures so far: {result}")
        if ready is not None and (superseded is None or gone is None):
            raise BenchError(f"after the heal node1 did not fence itself and exit within {limit:.0f}s "
                             f"(title {n1.title()}); figures so far: {result}")
        return result
    finally:
        stop_writer(w)
        if t_cut is not None:
            log_sink.append(f"## cut link {s.label} (times relative to the cut"
                            + (f"; healed at {t_heal - t_cut:+.3f}s)" if t_heal else ")"))
            log_sink.extend(_keeper_log(pair, t_cut))
        pair.destroy()


# ---------------------------------------------------------------- planned restart of the primary

# Server lines of a planned restart, for keeper_lines.log (besides every keeper line).
RESTART_EVENTS = ("fast shutdown request", "shutting down", "database system is shut down", "ready to accept",
                  "started streaming", "could not connect to the primary", "could not receive data",
                  "replication terminated", "terminating walreceiver", "canceling the wait for synchronous",
                  "promote", "selected new timeline")


def _outage_gap(times: list[float], t_cmd: float, t_done: float) -> tuple[float, float] | None:
    """(start, end) of the longest gap between consecutive acknowledged commits from the last one
    before the restart command up to the first one after the command returned: the client may
    still commit in the few milliseconds before the shutdown begins."""
    before = [t for t in times if t <= t_cmd]
    after = [t for t in times if t > t_done]
    if not before or not after:
        return None
    seq = [before[-1]] + [t for t in times if t_cmd < t <= t_done] + [after[0]]
    return max(zip(seq, seq[1:]), key=lambda ab: ab[1] - ab[0])


class PlannedRestarts:
    """Planned restarts of the primary (`pg_ctl restart -m fast` of node1) on one pair per
    setting, under the multihost client of the primary crash, which commits all along.

    A fast shutdown announces itself to the standby's keeper (SQLSTATE 57P01 on its heartbeat
    session); the keeper then does not count failed heartbeats for pg_keeper.restart_grace, polls
    the primary every 100 ms and, once it answers, wakes the standby's startup process so that the
    WAL receiver reconnects at once rather than after wal_retrieve_retry_interval. Commits wait for
    the synchronous standby, so they stop for the restart plus that reconnection. No restart may
    fail over (node2 must stay in recovery) and no acknowledged commit may be lost.

    `one_restart()` measures one restart (after waiting until the pair is synchronous and steady
    again, and a random point of the heartbeat cycle). After a failover or a failed restart the
    pair is finished and the next restart gets a fresh one. `finish()` stops the client, checks
    that every acknowledged commit is on the primary, and destroys the pair."""

    def __init__(self, reg: Registry, s: Setting, log_sink: list[str]):
        self.reg, self.s, self.log_sink = reg, s, log_sink
        self.pair: Pair | None = None
        self.w: Writer | None = None
        self.restarts = 0
        self.pairs = 0
        self.failovers = 0
        self.acked = 0
        self.client_failures = 0
        self.lost_at_end = 0
        self.check_errors: list[str] = []
        self._missing_seen: set[int] = set()

    @property
    def limit(self) -> float:
        # The grace (30 s by default) plus the budget bounds a restart that is failed over.
        return max(self.s.budget, self.s.lease or 0.0) + 60

    def _start_pair(self) -> None:
        s = self.s
        self.pairs += 1
        self._missing_seen = set()
        self.pair = make_pair(self.reg, f"restart-{s.slug}" + (f"-{self.pairs}" if self.pairs > 1 else ""),
                              s.ktime_ms, s.kcount, witness=s.witness)
        try:
            self.pair.node1.query(CREATE_TABLE)
            self.w = Writer(self.pair.multihost())
            self.w.start()
            if not wait_until(20, lambda: len(self.w.acks) >= 50, 0.05):
                raise BenchError(f"the client made only {len(self.w.acks)} commits in 20s "
                                 f"(last error: {self.w.failures[-1][1] if self.w.failures else 'none'})")
        except BaseException:
            self._end_pair()
            raise

    @staticmethod
    def _primary(pair: Pair) -> Node | None:
        for n in pair.nodes:
            try:
                if n.query("SELECT pg_is_in_recovery()")[0][0] is False:
                    return n
            except Exception:
                pass
        return None

    def _end_pair(self) -> None:
        """Stops the client, counts the acknowledged commits missing on the pair's primary
        (node2 after a failover) and destroys the pair."""
        pair, w = self.pair, self.w
        self.pair = self.w = None
        if pair is None:
            return
        try:
            stop_writer(w)
            if w is not None:
                self.acked += len(w.acks)
                self.client_failures += len(w.failures)
                primary = self._primary(pair)
                if primary is None:
                    self.check_errors.append(f"pair {self.pairs}: no primary to check the commits on")
                else:
                    try:
                        self.lost_at_end += missing_acked(primary, w)[0]
                    except Exception as e:
                        self.check_errors.append(f"pair {self.pairs}: {type(e).__name__}: {e}")
        finally:
            pair.destroy()

    def _missing_now(self, node: Node, w: Writer) -> int:
        """Acknowledged ids missing on `node` while the client goes on writing, not counted by an
        earlier call: the acknowledged ids are taken before the query, so every one of them had
        committed before it."""
        acked = {a[0] for a in list(w.acks)}
        present = {r[0] for r in node.query("SELECT id FROM bench_writes", timeout=5)}
        new = acked - present - self._missing_seen
        self._missing_seen |= new
        return len(new)

    def one_restart(self) -> dict:
        if self.pair is None:
            self._start_pair()
        pair, w, s = self.pair, self.w, self.s
        n1, n2 = pair.node1, pair.node2
        label = f"restart-{s.slug}"
        ktime = s.ktime_ms / 1000.0
        self.restarts += 1
        t_cmd = None
        try:
            # Synchronous and steady (keepers connected, node1 trusting node2) and committing; then
            # one keepalive_time, so that node2 has heard the trust and could promote, and a random
            # fraction of one, so that the restart lands anywhere in the heartbeat cycle.
            pair.wait_steady(label, self.limit)
            if not wait_until(10, lambda: w.acks_since(time.time() - 0.5, n1.port), 0.02):
                raise BenchError(f"the client commits nothing on node1 (last error: "
                                 f"{w.failures[-1][1] if w.failures else 'none'})")
            time.sleep(ktime + 0.1 + random.uniform(0, ktime))
            t_cmd, t_done = n1.restart()
            if not wait_until(self.limit, lambda: w.acks_since(t_done), 0.01):
                raise BenchError(f"no commit acknowledged within {self.limit:.0f}s after pg_ctl restart returned "
                                 f"(node1 title {n1.title()}, node2 title {n2.title()}, last client error: "
                                 f"{w.failures[-1][1] if w.failures else 'none'})")
            time.sleep(0.2)
            gap = _outage_gap([a[1] for a in list(w.acks)], t_cmd, t_done)
            if gap is None:
                raise BenchError("no commit acknowledged before the restart")
            try:
                in_recovery = n2.query("SELECT pg_is_in_recovery()")[0][0]
            except Exception:
                in_recovery = None
            promoting = n2.first_line("lost; promoting", t_cmd)
            node2_acks = len(w.acks_since(t_cmd, n2.port))
            failover = int(in_recovery is False or promoting is not None or node2_acks > 0)
            announced = n2.first_line("announced a clean shutdown", t_cmd)
            back = n2.first_line("is back after its restart", t_cmd)
            streaming = n2.first_line("started streaming WAL", t_cmd, keeper_only=False)
            down = n1.first_line("received fast shutdown request", t_cmd, keeper_only=False)
            ready = (n1.first_line("database system is ready to accept connections", down.t, keeper_only=False)
                     if down else None)
            result = {
                "restart_s": t_done - t_cmd,
                "outage_s": gap[1] - gap[0],
                # the outage's ends relative to the restart command
                "writes_stopped_s": gap[0] - t_cmd,
                "writes_resumed_s": gap[1] - t_cmd,
                "resumed_after_pg_ctl_s": gap[1] - t_done,
                "server_down_s": (ready.t - down.t) if down and ready else float("nan"),
                "grace_line_s": (announced.t - t_cmd) if announced else float("nan"),
                "woken_line_s": (back.t - t_cmd) if back else float("nan"),
                "node2_streaming_s": (streaming.t - t_cmd) if streaming else float("nan"),
                "failover": failover,
                "node2_acks": node2_acks,
            }
            if failover:
                # Must not happen. The pair is finished (the commits are checked on whichever
                # node is the primary) and the next restart gets a fresh one.
                self.failovers += 1
                self._log(pair, t_cmd, time.time())
                self._end_pair()
                result["lost_commits"] = float("nan")  # counted at the end
                return result
            pair.wait_steady(label, self.limit)
            t_steady = time.time()
            result["steady_again_s"] = t_steady - t_cmd
            result["lost_commits"] = self._missing_now(n1, w)
            self._log(pair, t_cmd, t_steady)
            return result
        except BaseException:
            if t_cmd is not None:
                self._log(pair, t_cmd, time.time())
            self._end_pair()
            raise

    def _log(self, pair: Pair, t_cmd: float, until: float) -> None:
        """The keepers' lines and the server's restart lines of one restart, for keeper_lines.log
        (before the pair, and its logs, are removed)."""
        self.log_sink.append(f"## planned restart {self.s.label} #{self.restarts} (pair {self.pairs}; times "
                             "relative to the restart command)")
        self.log_sink.extend(_keeper_log(pair, t_cmd, until=until + 0.2, events=RESTART_EVENTS))

    def finish(self) -> dict:
        self._end_pair()
        result = {
            "lost_commits": self.lost_at_end if not self.check_errors else float("nan"),
            "restarts": self.restarts,
            "failovers": self.failovers,
            "pairs": self.pairs,
            "acked_commits": self.acked,
            "client_failures": self.client_failures,
        }
        if self.check_errors:
            raise BenchError(f"could not check the acknowledged commits: {'; '.join(self.check_errors)}; "
                             f"figures: {result}")
        return result

    def destroy(self) -> None:
        pair, self.pair = self.pair, None
        stop_writer(self.w)
        self.w = None
        if pair is not None:
            pair.destroy()


# ---------------------------------------------------------------- 3. overhead of the keeper

def _heartbeat_backends(node: Node) -> list[int]:
    """Backends on `node` that serve the peer keeper's heartbeat connection."""
    rows = node.query("SELECT pid FROM pg_stat_activity WHERE application_name = 'pg_keeper' "
                      "AND pid <> pg_backend_pid()")
    return [r[0] for r in rows]


def _wal_lsn(node: Node) -> int:
    """The primary's current WAL write position, in bytes."""
    return int(node.query("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::int8")[0][0])


def _snapshot(pair: Pair) -> dict:
    snap = {"wal": _wal_lsn(pair.node1), "t": time.monotonic()}
    for n in pair.nodes:
        kp = n.keeper_pid()
        if kp is None:
            raise BenchError(f"{n.name}: no pg_keeper process")
        backends = {p: (cpu_ticks(p), cpu_ns(p)) for p in _heartbeat_backends(n)}
        snap[n.name] = {"keeper": kp, "ticks": cpu_ticks(kp), "ns": cpu_ns(kp), "backends": backends,
                        "title": n.title()[1] if n.title() else None}
    return snap


def overhead_start(reg: Registry, settings: list[Setting]) -> dict[Setting, Pair | Exception]:
    """One idle connected pair per setting, all running at once."""
    pairs: dict[Setting, Pair | Exception] = {}
    for s in settings:
        try:
            pairs[s] = make_pair(reg, f"overhead-{s.slug}", s.ktime_ms, s.kcount, witness=s.witness)
        except Exception as e:
            pairs[s] = e
    time.sleep(2)  # let start-up work settle
    return pairs


def overhead_window(pairs: dict[Setting, Pair | Exception], duration: float) -> dict[Setting, dict | Exception]:
    """Measures every pair's keepers over the same `duration` seconds of idle heartbeating."""
    before: dict[Setting, dict | Exception] = {}
    for s, p in pairs.items():
        if isinstance(p, Exception):
            before[s] = p
            continue
        try:
            before[s] = _snapshot(p)
        except Exception as e:
            before[s] = e
    t0 = time.monotonic()
    time.sleep(duration)
    elapsed = time.monotonic() - t0
    per_hour = 3600.0 / elapsed
    results: dict[Setting, dict | Exception] = {}
    for s, p in pairs.items():
        b = before[s]
        if isinstance(b, Exception):
            results[s] = b
            continue
        try:
            a = _snapshot(p)
            r = {}
            # WAL written by the idle primary (the keeper's pulse every keepalive_time while the
            # standby streams, plus what the server itself logs, e.g. running-xacts records).
            wal_bytes = a["wal"] - b["wal"]
            wal_window = a["t"] - b["t"]
            r["primary_wal_bytes_per_h"] = wal_bytes * 3600.0 / wal_window
            r["primary_wal_bytes_per_keepalive"] = wal_bytes / (wal_window / (s.ktime_ms / 1000.0))
            backend_ticks = backend_ns = 0
            backends_stable = True
            for name, role in (("node1", "primary"), ("node2", "standby")):
                if a[name]["keeper"] != b[name]["keeper"]:
                    raise BenchError(f"{name}'s keeper restarted during the window")
                if not (a[name]["title"] or "").endswith("connected)"):
                    raise BenchError(f"{name}'s keeper left the connected state: {a[name]['title']}")
                r[f"{role}_keeper_cpu_s_per_h"] = (a[name]["ticks"] - b[name]["ticks"]) / CLK_TCK * per_hour
                if a[name]["ns"] is not None and b[name]["ns"] is not None:
                    r[f"{role}_keeper_sched_cpu_s_per_h"] = (a[name]["ns"] - b[name]["ns"]) / 1e9 * per_hour
                mem = memory_kb(a[name]["keeper"])
                r[f"{role}_keeper_rss_mb"] = mem.get("VmRSS", float("nan")) / 1024
                for key in ("RssAnon", "RssFile", "RssShmem"):
                    r[f"{role}_keeper_{key[3:].lower()}_mb"] = mem.get(key, float("nan")) / 1024
                for pid, (ticks, ns) in a[name]["backends"].items():
                    if pid in b[name]["backends"] and ticks is not None and b[name]["backends"][pid][0] is not None:
                        backend_ticks += ticks - b[name]["backends"][pid][0]
                        if ns is not None and b[name]["backends"][pid][1] is not None:
                            backend_ns += ns - b[name]["backends"][pid][1]
                    else:
                        backends_stable = False
                if set(a[name]["backends"]) != set(b[name]["backends"]):
                    backends_stable = False
            if backends_stable:
                r["heartbeat_backends_cpu_s_per_h"] = backend_ticks / CLK_TCK * per_hour
                r["heartbeat_backends_sched_cpu_s_per_h"] = backend_ns / 1e9 * per_hour
            results[s] = r
        except Exception as e:
            results[s] = e
    return results


# ---------------------------------------------------------------- 4. pgbench

TPS_RE = re.compile(r"tps = ([0-9.]+) \(without initial connection time\)")


def run_pgbench(node: Node, args: list[str], timeout: float) -> str:
    cmd = [f"{BIN}/pgbench", "-h", "127.0.0.1", "-p", str(node.port), "-U", "postgres", *args, "postgres"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"pgbench {' '.join(args)} did not finish within {timeout:.0f}s") from e
    if out.returncode != 0:
        raise BenchError(f"pgbench {' '.join(args)} failed: {out.stderr.strip()[-500:]}")
    return out.stdout


def pgbench_tps(node: Node, clients: int, jobs: int, seconds: int) -> float:
    out = run_pgbench(node, ["-c", str(clients), "-j", str(jobs), "-T", str(seconds), "-N", "-n"], seconds + 120)
    m = TPS_RE.search(out)
    if not m:
        raise BenchError(f"no tps in pgbench output: {out[-300:]}")
    return float(m.group(1))


class PgbenchAB:
    """Two pairs with identical settings, A with pg_keeper_rs loaded (and its witness, if the
    setting has one) and B without it, each initialised with `pgbench -i`; runs alternate A B A B
    on the primaries."""

    def __init__(self, reg: Registry, s: Setting, scale: int, clients: int, jobs: int, seconds: int):
        self.s, self.clients, self.jobs, self.seconds = s, clients, jobs, seconds
        self.a = self.b = None
        try:
            self.a = make_pair(reg, f"pgbench-with-{s.slug}", s.ktime_ms, s.kcount, extension=True,
                               witness=s.witness)
            self.b = make_pair(reg, f"pgbench-without-{s.slug}", s.ktime_ms, s.kcount, extension=False)
            for p in (self.a, self.b):
                run_pgbench(p.node1, ["-i", "-s", str(scale), "-q"], 600)
            for p in (self.a, self.b):  # one short unmeasured run each, to warm the caches
                pgbench_tps(p.node1, clients, jobs, 5)
        except BaseException:
            self.destroy()
            raise

    def one_pair(self) -> dict:
        t0 = time.time()
        tps_a = pgbench_tps(self.a.node1, self.clients, self.jobs, self.seconds)
        tps_b = pgbench_tps(self.b.node1, self.clients, self.jobs, self.seconds)
        titles = [n.title() for n in self.a.nodes]
        # Under load the keeper must neither miss heartbeats nor act.
        acted = [ln.text for n in self.a.nodes for ln in n.keeper_lines(t0)
                 if "failed" in ln.text or "lost" in ln.text or "no answer" in ln.text]
        return {"tps_with": tps_a, "tps_without": tps_b, "ratio": tps_a / tps_b,
                "keeper_events_under_load": len(acted),
                "keepers_connected": int(all(t and t[1].endswith("connected)") for t in titles))}

    def destroy(self) -> None:
        for p in (self.a, self.b):
            if p is not None:
                p.destroy()
