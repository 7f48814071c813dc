"""Real PostgreSQL 15 servers for the benchmark: a primary/standby pair protected by pg_keeper_rs
(or the same pair without the extension), optionally with a witness (a third, plain server that
holds the keepers' failover lease), on 127.0.0.1 with free ports, run as the `postgres` OS user
under one temporary directory.

Every server started here is remembered together with the processes it forked, so that
`Registry.cleanup()` can stop all of them (pg_ctl -m immediate, then kill -9 of what is left),
also after an error or Ctrl-C. Every wait is bounded.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field

import psycopg

BIN = "/usr/lib/postgresql/15/bin"
PG_USER = "postgres"

# Extra postgresql.conf lines for both nodes of every pair (bench/run --conf).
EXTRA_CONF: list[str] = []


class BenchError(Exception):
    """A step of a measurement failed; the repetition is reported as failed."""


def wait_until(timeout: float, pred, interval: float = 0.05):
    """Polls `pred` until it returns something truthy or `timeout` seconds pass.

    Returns the truthy value, or None on timeout."""
    end = time.monotonic() + timeout
    while True:
        try:
            value = pred()
        except Exception:  # a probe that fails is "not yet"
            value = None
        if value:
            return value
        if time.monotonic() >= end:
            return None
        time.sleep(interval)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_postgres(args: list[str], timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """Runs a server binary as the postgres OS user (initdb and postgres refuse root)."""
    cmd = ["runuser", "-u", PG_USER, "--", *args]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{' '.join(args[:2])} did not finish within {timeout}s") from e
    if check and out.returncode != 0:
        raise BenchError(f"{' '.join(args)} failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    return out


# ---------------------------------------------------------------- processes

def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (field 3, the state, comes first)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def proc_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (tells a pid from a reused one)."""
    fields = stat_fields(pid)
    if fields is None or fields[0] == "Z":
        return None
    return int(fields[19])


def alive(pid: int) -> bool:
    return proc_start_time(pid) is not None


def children_of(pid: int) -> list[int]:
    """The live children of `pid`, from /proc (fast: used between the SIGSTOPs of a freeze)."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = stat_fields(int(entry))
        if fields is not None and fields[0] != "Z" and int(fields[1]) == pid:
            kids.append(int(entry))
    return kids


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of a process, in clock ticks."""
    fields = stat_fields(pid)
    return None if fields is None else int(fields[11]) + int(fields[12])


def cpu_ns(pid: int) -> int | None:
    """Time on CPU from the scheduler (/proc/PID/schedstat), in nanoseconds: finer than ticks."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssShmem ... of a process, in kB."""
    result = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")):
                    key, value = line.split(":", 1)
                    result[key] = int(value.split()[0])
    except OSError:
        pass
    return result


# ---------------------------------------------------------------- TCP proxy

class Proxy:
    """A threaded TCP forwarder on 127.0.0.1: every accepted connection gets its own connection
    to `target_port`, and two threads copy bytes both ways.

    `blackhole()` stops forwarding and reading in both directions (and new connections are
    accepted but not connected onwards), while every socket stays open: to both ends it looks
    like a dropped network, with nothing closed and nothing answered. `heal()` resumes: held
    bytes are delivered, held connections are connected onwards (those whose client gave up
    meanwhile are dropped), and a close that happened during the cut reaches the other end."""

    def __init__(self, target_port: int, name: str = "proxy"):
        self.name = name
        self.target_port = target_port
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self._open = threading.Event()  # set: forwarding; clear: blackholed
        self._open.set()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._held: list[socket.socket] = []  # accepted during a blackhole, not yet connected on
        self.accepted = 0
        self._thread = threading.Thread(target=self._accept_loop, daemon=True, name=f"{name}-accept")
        self._thread.start()

    @property
    def blackholed(self) -> bool:
        return not self._open.is_set()

    def blackhole(self) -> None:
        self._open.clear()

    def heal(self) -> None:
        with self._lock:
            held, self._held = self._held, []
        self._open.set()
        for client in held:
            if self._client_gone(client):
                self._drop(client)
            else:
                self._connect_on(client)

    def close(self) -> None:
        self._closed.set()
        self._open.set()
        try:
            self.listener.close()
        except OSError:
            pass
        with self._lock:
            socks, self._socks = list(self._socks), set()
            self._held = []
        for sk in socks:
            try:
                sk.close()
            except OSError:
                pass

    # -- internals

    def _track(self, sk: socket.socket) -> None:
        with self._lock:
            self._socks.add(sk)

    def _drop(self, sk: socket.socket) -> None:
        with self._lock:
            self._socks.discard(sk)
        try:
            sk.close()
        except OSError:
            pass

    @staticmethod
    def _client_gone(sk: socket.socket) -> bool:
        try:
            return sk.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._track(client)
            with self._lock:
                if self.blackholed:
                    self._held.append(client)
                    continue
            self._connect_on(client)

    def _connect_on(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            upstream.settimeout(None)
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            self._drop(client)
            return
        self._track(upstream)
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True, name=f"{self.name}-pump").start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        import select
        try:
            while not self._closed.is_set():
                self._open.wait()
                if self._closed.is_set():
                    break
                try:
                    ready, _, _ = select.select([src], [], [], 0.05)
                except (OSError, ValueError):
                    break
                if not ready or self.blackholed:
                    continue  # blackholed: leave the bytes (or the close) unread
                try:
                    data = src.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    break
                self._open.wait()  # read just as the cut began: deliver it after the heal
                try:
                    dst.sendall(data)
                except OSError:
                    break
        finally:
            # One end closed (or broke): close both, which ends the other direction's pump too.
            for sk in (src, dst):
                try:
                    sk.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self._drop(sk)


# ---------------------------------------------------------------- log parsing

# log_line_prefix = '%m [%p] ' with log_timezone = 'UTC': "2024-11-21 05:27:01.123 UTC [1234] LOG:  ..."
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) UTC \[(\d+)\] (.*)$")


@dataclass
class LogLine:
    t: float  # Unix time, seconds
    pid: int
    text: str


def parse_log(path: str) -> list[LogLine]:
    lines = []
    try:
        with open(path, errors="replace") as f:
            for raw in f:
                m = LOG_LINE.match(raw.rstrip("\n"))
                if not m:
                    continue
                stamp = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=dt.timezone.utc)
                lines.append(LogLine(stamp.timestamp(), int(m.group(2)), m.group(3)))
    except OSError:
        pass
    return lines


# ---------------------------------------------------------------- servers

@dataclass
class Node:
    name: str
    dir: str
    port: int
    log: str
    # (pid, start time) of every process of this server seen so far, for the final clean-up.
    seen: set = field(default_factory=set)
    # (pid, start time) of the processes stopped by freeze() and not yet continued by thaw().
    frozen: set = field(default_factory=set)

    def conninfo(self, extra: str = "") -> str:
        return f"host=127.0.0.1 port={self.port} dbname=postgres user=postgres {extra}".strip()

    def postmaster_pid(self) -> int | None:
        try:
            with open(os.path.join(self.dir, "postmaster.pid")) as f:
                pid = int(f.readline().strip())
        except (OSError, ValueError):
            return None
        return pid if alive(pid) else None

    def remember_processes(self) -> list[int]:
        """Records the postmaster and its current children; returns their pids."""
        pm = self.postmaster_pid()
        if pm is None:
            return []
        pids = [pm, *children_of(pm)]
        for p in pids:
            st = proc_start_time(p)
            if st is not None:
                self.seen.add((p, st))
        return pids

    def title(self) -> tuple[int, str] | None:
        """(pid, ps args) of the pg_keeper worker, if it runs."""
        pm = self.postmaster_pid()
        if pm is None:
            return None
        out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(pm)], capture_output=True, text=True, timeout=10)
        for line in out.stdout.splitlines():
            # Not the HTTP listener ("pg_keeper http"), a worker of its own.
            if "pg_keeper" in line and "pg_keeper http" not in line:
                pid, args = line.strip().split(None, 1)
                return int(pid), args.strip()
        return None

    def keeper_pid(self) -> int | None:
        t = self.title()
        return t[0] if t else None

    def title_is(self, state: str) -> bool:
        t = self.title()
        return bool(t) and t[1].endswith(f"pg_keeper ({state})")

    def connect(self, timeout: int = 3, **kw) -> psycopg.Connection:
        return psycopg.connect(self.conninfo(f"connect_timeout={timeout}"), autocommit=True, **kw)

    def query(self, sql: str, params=None, timeout: int = 3) -> list[tuple]:
        with self.connect(timeout) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description is not None else []

    def append_conf(self, text: str) -> None:
        with open(os.path.join(self.dir, "postgresql.conf"), "a") as f:
            f.write("\n" + text.strip() + "\n")

    def start(self) -> None:
        as_postgres([f"{BIN}/pg_ctl", "-D", self.dir, "-l", self.log, "-w", "-t", "60", "start"], timeout=90)
        self.remember_processes()

    def restart(self, timeout: int = 60) -> tuple[float, float]:
        """A planned restart: `pg_ctl restart -m fast -w` of this server as the postgres OS user
        (the same log file). Returns the Unix times just before the command and when it returned
        (the server accepts connections again). The processes of the old and the new server are
        remembered for the clean-up."""
        self.remember_processes()
        t = time.time()
        as_postgres([f"{BIN}/pg_ctl", "-D", self.dir, "-l", self.log, "-m", "fast", "-w", "-t", str(timeout),
                     "restart"], timeout=timeout + 30)
        done = time.time()
        self.remember_processes()
        return t, done

    def kill9(self) -> float:
        """kill -9 of the postmaster alone; returns the Unix time just before the signal.

        The children are remembered first so that the clean-up can find any that outlive it."""
        pm = self.postmaster_pid()
        if pm is None:
            raise BenchError(f"{self.name} is not running")
        self.remember_processes()
        t = time.time()
        os.kill(pm, signal.SIGKILL)
        return t

    def freeze(self) -> float:
        """SIGSTOP of the postmaster and all its children (a server that hangs without closing a
        connection); returns the Unix time just before the first signal.

        The processes are remembered first; the postmaster is stopped first (it forks no more),
        then its children, then any child forked in between. thaw() (also called by stop())
        continues them: a stopped server cannot be stopped by pg_ctl."""
        pm = self.postmaster_pid()
        if pm is None:
            raise BenchError(f"{self.name} is not running")
        kids = [p for p in self.remember_processes() if p != pm]
        pm_st = proc_start_time(pm)
        t = time.time()
        os.kill(pm, signal.SIGSTOP)
        self.frozen.add((pm, pm_st))
        for _ in range(2):
            for p in kids:
                st = proc_start_time(p)
                if st is not None and (p, st) not in self.frozen:
                    try:
                        os.kill(p, signal.SIGSTOP)
                        self.frozen.add((p, st))
                        self.seen.add((p, st))
                    except OSError:
                        pass
            kids = children_of(pm)
        return t

    def thaw(self) -> float | None:
        """SIGCONT of every process freeze() stopped that still runs; returns the Unix time just
        before the first signal (None if nothing was frozen)."""
        if not self.frozen:
            return None
        t = time.time()
        # Children first, the postmaster last (it then finds its children running).
        for p, st in sorted(self.frozen, key=lambda x: x[0] == self.postmaster_pid()):
            if proc_start_time(p) == st:
                try:
                    os.kill(p, signal.SIGCONT)
                except OSError:
                    pass
        self.frozen.clear()
        return t

    def wait_gone(self, timeout: float = 20) -> bool:
        """Waits until every remembered process of this server has exited."""
        return bool(wait_until(timeout, lambda: not any(proc_start_time(p) == st for p, st in self.seen), 0.05))

    def stop(self) -> None:
        """Stops the server at once (pg_ctl -m immediate), then kill -9 whatever is left of it.
        A frozen server is thawed first."""
        self.thaw()
        if self.postmaster_pid() is not None:
            self.remember_processes()
            as_postgres([f"{BIN}/pg_ctl", "-D", self.dir, "-m", "immediate", "-w", "-t", "30", "stop"],
                        timeout=40, check=False)
        if not self.wait_gone(10):
            for p, st in list(self.seen):
                if proc_start_time(p) == st:
                    try:
                        os.kill(p, signal.SIGKILL)
                    except OSError:
                        pass
            self.wait_gone(10)

    def keeper_lines(self, since: float = 0.0) -> list[LogLine]:
        return [ln for ln in parse_log(self.log) if "pg_keeper:" in ln.text and ln.t >= since - 0.001]

    def first_line(self, needle: str, since: float, keeper_only: bool = True) -> LogLine | None:
        for ln in parse_log(self.log):
            if ln.t >= since - 0.001 and needle in ln.text and (not keeper_only or "pg_keeper:" in ln.text):
                return ln
        return None


class Registry:
    """Every node started by this run, and the temporary root that holds their directories."""

    def __init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix="pg_keeper_bench.", dir="/tmp")
        shutil.chown(self.root, PG_USER, PG_USER)
        self.nodes: list[Node] = []
        self.proxies: list[Proxy] = []
        self._template: str | None = None
        self._serial = 0

    def new_dir(self, label: str) -> str:
        self._serial += 1
        path = os.path.join(self.root, f"{self._serial:03d}-{label}")
        os.mkdir(path)
        shutil.chown(path, PG_USER, PG_USER)
        return path

    def template(self) -> str:
        """An initdb'ed data directory, made once per run and copied for every primary."""
        if self._template is None:
            path = os.path.join(self.root, "template")
            as_postgres([f"{BIN}/initdb", "-D", path, "-A", "trust", "-U", PG_USER, "--no-sync"], timeout=120)
            with open(os.path.join(path, "pg_hba.conf"), "a") as f:
                f.write("\nhost replication postgres 127.0.0.1/32 trust\n")
            self._template = path
        return self._template

    def forget(self, node: Node) -> None:
        if node in self.nodes:
            self.nodes.remove(node)

    def cleanup(self) -> None:
        for px in list(self.proxies):
            px.close()
        self.proxies.clear()
        for node in list(self.nodes):
            try:
                node.stop()
            except Exception as e:  # keep going: every server must be stopped
                print(f"warning: could not stop {node.dir}: {e}")
        self.nodes.clear()
        shutil.rmtree(self.root, ignore_errors=True)


LEASE_MARGIN_MS = 200


def lease_ms(ktime_ms: int) -> int:
    """The keepers' lease time on the witness: 3 x keepalive_time + 200 ms (keeper-core's
    lease_time_ms), whatever keepalive_count."""
    return 3 * ktime_ms + LEASE_MARGIN_MS


@dataclass
class Pair:
    reg: Registry
    base: str
    node1: Node
    node2: Node
    ktime_ms: int
    kcount: int
    extension: bool
    # The plain server named by pg_keeper.witness_conninfo, if the pair has one.
    witness: Node | None = None
    # make_pair(proxied=True): the forwarders to node1 and to node2 that carry everything the
    # nodes send each other (heartbeats both ways, replication); clients and the witness
    # connect directly.
    proxy1: Proxy | None = None
    proxy2: Proxy | None = None

    @property
    def proxies(self) -> list[Proxy]:
        return [p for p in (self.proxy1, self.proxy2) if p is not None]

    def cut(self) -> float:
        """Cuts the link between the nodes both ways (blackholes both proxies); returns the Unix
        time just before."""
        if not self.proxies:
            raise BenchError("the pair has no proxies (make_pair(proxied=True))")
        t = time.time()
        for px in self.proxies:
            px.blackhole()
        return t

    def heal(self) -> float:
        t = time.time()
        for px in self.proxies:
            px.heal()
        return t

    @property
    def nodes(self) -> list[Node]:
        """The two nodes with the extension (not the witness)."""
        return [self.node1, self.node2]

    @property
    def servers(self) -> list[Node]:
        """Every server of the pair, the witness included."""
        return self.nodes + ([self.witness] if self.witness is not None else [])

    @property
    def lease_ms(self) -> int:
        """The lease time the keepers use with a witness: 3 x keepalive_time + 200 ms, whatever
        keepalive_count."""
        return lease_ms(self.ktime_ms)

    def lease(self) -> tuple[str, str | None] | None:
        """(holder, sync_standby) of the lease row on the witness, or None if there is none yet."""
        if self.witness is None:
            return None
        rows = self.witness.query("SELECT holder, sync_standby FROM pg_keeper_lease")
        return (rows[0][0], rows[0][1]) if rows else None

    def multihost(self, extra: str = "") -> str:
        return (f"host=127.0.0.1,127.0.0.1 port={self.node1.port},{self.node2.port} dbname=postgres "
                f"user=postgres target_session_attrs=read-write connect_timeout=2 {extra}").strip()

    def wait_steady(self, label: str, timeout: float) -> None:
        """Waits (each step bounded by `timeout`) until node2 streams synchronously from node1
        (`state = 'streaming'`, `sync_state = 'sync'` in pg_stat_replication) and, with the
        extension, both keepers are connected with the configured settings, hold their heartbeat
        connections open, node1's keeper trusts node2 as its synchronous standby and, with a
        witness, the lease names node1 and node2. Raises BenchError naming the step that did not
        happen. Used when a pair is made and again after a planned restart of node1."""
        n1, n2 = self.node1, self.node2
        sync = wait_until(timeout, lambda: n1.query(
            "SELECT 1 FROM pg_stat_replication WHERE application_name = 'node2' AND state = 'streaming' "
            "AND sync_state = 'sync'"), 0.1)
        if not sync:
            raise BenchError(f"{label}: node2 did not stream synchronously within {timeout:.0f}s")
        if self.extension:
            ok = wait_until(timeout, lambda: n1.title_is("master mode:connected")
                            and n2.title_is("standby mode:connected"), 0.1)
            if not ok:
                raise BenchError(f"{label}: keepers not connected within {timeout}s: "
                                 f"node1 {n1.title()}, node2 {n2.title()}")
            check_keeper_settings(self)
            # Steady state: each keeper keeps a heartbeat connection open to its peer (the
            # primary's keeper opens it at its first heartbeat after the standby streams).
            ok = wait_until(3 * self.ktime_ms / 1000 + 10, lambda: all(
                n.query("SELECT 1 FROM pg_stat_activity WHERE application_name = 'pg_keeper'")
                for n in self.nodes), 0.1)
            if not ok:
                raise BenchError(f"{label}: the keepers' heartbeat connections did not appear")
            # The standby counts itself synchronous (and so may promote) only once the primary's
            # keeper says it trusts it (in its pg_stat_activity row, read by the heartbeat); the
            # measurements then wait one more keepalive_time so that the standby has heard it.
            trusted = ("SELECT query FROM pg_stat_activity WHERE backend_type = 'pg_keeper'")
            want = "pg_keeper: trusts as synchronous standby: node2"
            if not wait_until(timeout, lambda: [r[0] for r in n1.query(trusted)] == [want], 0.1):
                try:
                    seen = [r[0] for r in n1.query(trusted)]
                except Exception as e:
                    seen = f"unreadable ({type(e).__name__})"
                raise BenchError(f"{label}: node1's keeper did not come to trust node2 as synchronous "
                                 f"within {timeout:.0f}s (its activity: {seen})")
        if self.witness is not None:
            # Until the lease names node2 as the synchronous standby, node2 would rightly refuse
            # to promote: no crash before that.
            want = ("node1", "node2")
            if not wait_until(timeout, lambda: self.lease() == want, 0.1):
                try:
                    seen = self.lease()
                except Exception as e:
                    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                    seen = f"unreadable ({type(e).__name__}: {first})"
                raise BenchError(f"{label}: the lease on the witness did not become holder node1 / "
                                 f"synchronous standby node2 within {timeout:.0f}s (last seen: {seen})")

    def destroy(self) -> None:
        for px in self.proxies:
            px.close()
            if px in self.reg.proxies:
                self.reg.proxies.remove(px)
        for n in self.servers:
            try:
                n.stop()
            finally:
                self.reg.forget(n)
        shutil.rmtree(self.base, ignore_errors=True)


STARTED_RE = re.compile(r"pg_keeper: started; keepalive_time=(\d+)ms keepalive_count=(\d+)")
# The rest of the started line: "; witness host=... with a lease of 3200ms" or "; no witness".
STARTED_WITNESS_RE = re.compile(r"; witness .* with a lease of (\d+)ms")


def check_keeper_settings(pair: "Pair") -> None:
    """Fails unless both keepers run with the keepalive_time and keepalive_count that were
    written to postgresql.conf (a value the server rejects leaves the default in force), and,
    for a pair with a witness, with the witness and the expected lease time."""
    for n in pair.nodes:
        started = None
        lease_ms = None
        for ln in parse_log(n.log):
            m = STARTED_RE.search(ln.text)
            if m:
                started = (int(m.group(1)), int(m.group(2)))
                w = STARTED_WITNESS_RE.search(ln.text)
                lease_ms = int(w.group(1)) if w else None
        if started != (pair.ktime_ms, pair.kcount):
            complaints = [ln.text for ln in parse_log(n.log)
                          if "pg_keeper." in ln.text and ("WARNING" in ln.text or "ERROR" in ln.text)]
            raise BenchError(
                f"{n.name}'s keeper runs with keepalive_time/count {started}, not "
                f"({pair.ktime_ms}ms, {pair.kcount}) as configured ("
                f"keepalive_time = '{keepalive_spelling(pair.ktime_ms)}'); server said: "
                f"{'; '.join(complaints[-2:]) or 'nothing'}")
        if pair.witness is not None and lease_ms != pair.lease_ms:
            complaints = [ln.text for ln in parse_log(n.log)
                          if "witness" in ln.text and ("WARNING" in ln.text or "ERROR" in ln.text)]
            raise BenchError(
                f"{n.name}'s keeper does not run with the witness and a lease of {pair.lease_ms}ms "
                f"(its started line says {'a lease of ' + str(lease_ms) + 'ms' if lease_ms else 'no witness'}); "
                f"server said: {'; '.join(complaints[-2:]) or 'nothing'}")


# How keepalive_time is written to postgresql.conf: 'ms' ('200ms') or 's' ('0.2s').
KEEPALIVE_UNIT = "ms"


def keepalive_spelling(ktime_ms: int) -> str:
    return f"{ktime_ms}ms" if KEEPALIVE_UNIT == "ms" else f"{ktime_ms / 1000:g}s"


def witness_conninfo(port: int) -> str:
    return f"host=127.0.0.1 port={port} dbname=postgres user=postgres connect_timeout=2"


def common_conf(p1: int, p2: int, ktime_ms: int, kcount: int, extension: bool,
                witness_port: int | None = None) -> str:
    lines = [
        "# --- benchmark pair (identical on both nodes) ---",
        "listen_addresses = '127.0.0.1'",
        f"shared_preload_libraries = '{'pg_keeper_rs' if extension else ''}'",
        "wal_level = replica",
        "hot_standby = on",
        "wal_log_hints = on",
        "max_wal_senders = 5",
        "synchronous_standby_names = 'node1, node2'",
        "log_line_prefix = '%m [%p] '",
        "log_timezone = 'UTC'",
    ]
    if extension:
        lines += [
            f"pg_keeper.node1_conninfo = 'host=127.0.0.1 port={p1} dbname=postgres user=postgres'",
            f"pg_keeper.node2_conninfo = 'host=127.0.0.1 port={p2} dbname=postgres user=postgres'",
            f"pg_keeper.keepalive_time = '{keepalive_spelling(ktime_ms)}'",
            f"pg_keeper.keepalive_count = {kcount}",
        ]
        if witness_port is not None:
            lines.append(f"pg_keeper.witness_conninfo = '{witness_conninfo(witness_port)}'")
    if EXTRA_CONF:
        lines += ["# --- extra (bench/run --conf) ---", *EXTRA_CONF]
    return "\n".join(lines)


WITNESS_CONF = """
# --- benchmark witness: a plain server that only holds the keepers' lease row ---
listen_addresses = '127.0.0.1'
port = {port}
shared_preload_libraries = ''
fsync = on
cluster_name = 'witness'
log_line_prefix = '%m [%p] '
log_timezone = 'UTC'
"""


def make_pair(reg: Registry, label: str, ktime_ms: int, kcount: int, extension: bool = True,
              connect_timeout: float | None = None, witness: bool = False, proxied: bool = False) -> Pair:
    """Creates and starts node1 (primary) and node2 (synchronous standby, from pg_basebackup), and
    waits until node2 streams synchronously and, with the extension, both keepers are connected.

    With `witness` (and the extension) a third plain server is started first (trust auth, fsync
    on, no extension) and named by both nodes' pg_keeper.witness_conninfo; the pair is ready
    once the lease on it is held by node1 and names node2 as its synchronous standby.

    With `proxied`, everything the nodes send each other goes through two Proxy forwarders
    (pair.proxy1 to node1, pair.proxy2 to node2): pg_keeper.node1_conninfo/node2_conninfo name
    the proxies, and so do both primary_conninfo; pair.cut() and pair.heal() then cut and heal
    the link between the nodes. Clients (Node.conninfo) and the witness connect directly."""
    if connect_timeout is None:
        connect_timeout = max(60.0, 3 * ktime_ms / 1000 + 20)
    witness = witness and extension
    base = reg.new_dir(label)
    ports: list[int] = []
    while len(ports) < (3 if witness else 2):
        p = free_port()
        if p not in ports:
            ports.append(p)
    p1, p2 = ports[0], ports[1]
    n1 = Node("node1", os.path.join(base, "node1"), p1, os.path.join(base, "node1.log"))
    n2 = Node("node2", os.path.join(base, "node2"), p2, os.path.join(base, "node2.log"))
    wn = (Node("witness", os.path.join(base, "witness"), ports[2], os.path.join(base, "witness.log"))
          if witness else None)
    pair = Pair(reg, base, n1, n2, ktime_ms, kcount, extension, wn)
    if proxied:
        pair.proxy1 = Proxy(p1, "proxy-node1")
        pair.proxy2 = Proxy(p2, "proxy-node2")
        reg.proxies += pair.proxies
    # The ports the nodes use to reach each other.
    r1 = pair.proxy1.port if proxied else p1
    r2 = pair.proxy2.port if proxied else p2
    try:
        if wn is not None:
            # The same initdb'ed directory as the nodes (initdb as the postgres OS user, trust).
            subprocess.run(["cp", "-a", reg.template(), wn.dir], check=True, timeout=60)
            wn.append_conf(WITNESS_CONF.format(port=wn.port))
            reg.nodes.append(wn)
            wn.start()
        subprocess.run(["cp", "-a", reg.template(), n1.dir], check=True, timeout=60)
        common = common_conf(r1, r2, ktime_ms, kcount, extension, wn.port if wn is not None else None)
        n1.append_conf(common + f"""
# --- node-specific ---
port = {p1}
cluster_name = 'node1'
primary_conninfo = 'host=127.0.0.1 port={r2} user=postgres application_name=node1'
""")
        reg.nodes.append(n1)
        n1.start()
        as_postgres([f"{BIN}/pg_basebackup", "-h", "127.0.0.1", "-p", str(p1), "-U", PG_USER,
                     "-X", "stream", "-c", "fast", "-D", n2.dir], timeout=120)
        n2.append_conf(f"""
port = {p2}
cluster_name = 'node2'
primary_conninfo = 'host=127.0.0.1 port={r1} user=postgres application_name=node2'
""")
        as_postgres(["touch", os.path.join(n2.dir, "standby.signal")])
        reg.nodes.append(n2)
        n2.start()
        pair.wait_steady(label, connect_timeout)
        for n in pair.servers:
            n.remember_processes()
        return pair
    except BaseException:
        pair.destroy()
        raise
