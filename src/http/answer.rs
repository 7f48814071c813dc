//! What each path answers: the rules (Patroni's paths and codes), the JSON body and the
//! Prometheus exposition, all from one [`View`] of the status. No I/O here.

use std::fmt::Write;

use keeper_core::Mode;

/// How long the keeper may go without publishing before the listener calls it stale: one tick
/// can take a heartbeat and a lease statement (each bounded by keepalive_time) on top of its
/// interval, so three intervals, plus a margin for scheduling.
pub fn stale_after_ms(keepalive_time_ms: i64) -> i64 {
    3 * keepalive_time_ms.max(100) + 1_000
}

/// One consistent reading, taken when a request is answered.
pub struct View {
    /// TimestampTz now.
    pub now: i64,
    pub status: crate::status::HttpCopy,
    /// Read by the listener itself from shared memory.
    pub in_recovery: bool,
    pub timeline: u32,
    pub wal_receiver_streaming: bool,
    /// (Standby.) WAL received but not yet replayed, in bytes.
    pub replay_lag_bytes: Option<u64>,
    /// The listener's own counters.
    pub listener: Counters,
}

#[derive(Clone, Copy, Default)]
pub struct Counters {
    pub requests: u64,
    pub rejected: u64,
    pub timed_out: u64,
    pub bad_requests: u64,
}

impl View {
    /// The keeper runs and has published recently.
    pub fn keeper_fresh(&self) -> bool {
        self.status.worker_pid != 0
            && self.status.http.published_at > 0
            && (self.now - self.status.http.published_at) / 1000
                <= stale_after_ms(self.status.keepalive_time_ms)
    }

    fn mode(&self) -> Option<Mode> {
        self.status.http.mode.filter(|_| self.keeper_fresh())
    }

    /// Milliseconds of lease left for this primary (None: it does not hold it).
    fn lease_ms_left(&self) -> Option<i64> {
        let h = &self.status.http;
        let left = (h.lease_expires_at - self.now) / 1000;
        (h.lease_mine && left > 0).then_some(left)
    }

    /// `/primary`: a writable primary, in a serving master mode, that has heard from (or tried)
    /// the peer since its keeper started, and, with a witness, holds the lease now.
    pub fn writable_primary(&self) -> bool {
        let serving = matches!(
            self.mode(),
            Some(Mode::MasterWaiting | Mode::MasterConnected | Mode::MasterAsync)
        );
        let h = &self.status.http;
        serving
            && !self.in_recovery
            && h.decided_after_beat
            && (!h.uses_witness || self.lease_ms_left().is_some())
    }

    /// `/replica`: a standby whose keeper runs and whose WAL receiver streams, within `max_lag`
    /// bytes of replay when given.
    pub fn streaming_standby(&self, max_lag: Option<u64>) -> bool {
        let standby = matches!(
            self.mode(),
            Some(Mode::StandbyWaiting | Mode::StandbyConnected)
        );
        let lag_ok = match max_lag {
            None => true,
            Some(max) => self.replay_lag_bytes.is_some_and(|l| l <= max),
        };
        standby && self.in_recovery && self.wal_receiver_streaming && lag_ok
    }

    /// (Standby.) The primary lists it as synchronous.
    fn listed_synchronous(&self) -> bool {
        matches!(self.status.http.sync_state.get(), "sync" | "quorum")
    }

    /// Replication to or from this node is synchronous now.
    pub fn synchronous(&self) -> bool {
        if self.in_recovery {
            self.streaming_standby(None) && self.listed_synchronous()
        } else {
            self.mode().is_some() && self.status.http.trusts_standby
        }
    }

    pub fn role(&self) -> &'static str {
        match self.mode() {
            None => "unknown",
            Some(Mode::Unidentified) => "starting",
            Some(Mode::MasterWaiting | Mode::MasterConnected | Mode::MasterAsync) => "primary",
            Some(Mode::Isolated) => "isolated",
            Some(Mode::StandbyWaiting | Mode::StandbyConnected) => "standby",
            Some(Mode::Promoting) => "promoting",
            Some(Mode::Fenced) => "fenced",
        }
    }

    /// The lag shown: the standby's own replay lag, or the primary's view of its standby.
    fn lag_bytes(&self) -> Option<i64> {
        if self.in_recovery {
            self.replay_lag_bytes.map(|l| l as i64)
        } else {
            Some(self.status.http.standby_lag_bytes).filter(|l| *l >= 0)
        }
    }
}

/// Parses a size like `16MB`, `1024`, `64kB` (PostgreSQL's units, base 1024; case does not
/// matter). None when it does not parse.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1 << 10,
        "mb" | "m" => 1 << 20,
        "gb" | "g" => 1 << 30,
        "tb" | "t" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(factor)
}

/// An answer: status code, content type and body.
pub struct Answer {
    pub code: u16,
    pub content_type: &'static str,
    pub body: String,
}

pub fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// The answer for a path (with its query string), from `view`.
pub fn route(target: &str, view: &View) -> Answer {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let path = path.trim_end_matches('/');
    let lag = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("lag="))
        .map(parse_size);
    let json = |ok: bool| Answer {
        code: if ok { 200 } else { 503 },
        content_type: "application/json",
        body: json_body(view),
    };
    match path {
        "" | "/primary" | "/leader" | "/master" | "/read-write" => json(view.writable_primary()),
        "/replica" => match lag {
            Some(None) => bad_request("lag must be a size such as 16MB or 1048576"),
            Some(Some(max)) => json(view.streaming_standby(Some(max))),
            None => json(view.streaming_standby(None)),
        },
        "/read-only" => json(view.writable_primary() || view.streaming_standby(None)),
        "/sync" | "/synchronous" => json(view.streaming_standby(None) && view.listed_synchronous()),
        "/async" | "/asynchronous" => {
            json(view.streaming_standby(None) && !view.listed_synchronous())
        }
        "/health" => json(true),
        "/liveness" => json(view.keeper_fresh()),
        "/metrics" => Answer {
            code: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: metrics(view),
        },
        _ => Answer {
            code: 404,
            content_type: "application/json",
            body: "{\"error\":\"no such path\"}\n".into(),
        },
    }
}

pub fn bad_request(why: &str) -> Answer {
    let mut body = String::from("{\"error\":");
    push_json_string(&mut body, why);
    body.push_str("}\n");
    Answer {
        code: 400,
        content_type: "application/json",
        body,
    }
}

fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn json_opt_i64(v: Option<i64>) -> String {
    v.map_or("null".into(), |v| v.to_string())
}

/// The small JSON body every health path answers with. It holds no conninfo: the problem text
/// is the keeper's, already scrubbed of passwords.
pub fn json_body(v: &View) -> String {
    let s = &v.status;
    let mut out = String::with_capacity(512);
    out.push_str("{\"role\":");
    push_json_string(&mut out, v.role());
    out.push_str(",\"state\":");
    push_json_string(&mut out, if v.keeper_fresh() { s.state.get() } else { "" });
    let _ = write!(
        out,
        ",\"keeper_running\":{},\"in_recovery\":{},\"timeline\":{},\"lag_bytes\":{},\"synchronous\":{}",
        v.keeper_fresh(),
        v.in_recovery,
        v.timeline,
        json_opt_i64(v.lag_bytes()),
        v.synchronous(),
    );
    if s.http.uses_witness {
        let _ = write!(
            out,
            ",\"lease\":{{\"held\":{},\"ms_left\":{}}}",
            v.lease_ms_left().is_some(),
            json_opt_i64(v.lease_ms_left())
        );
    } else {
        out.push_str(",\"lease\":null");
    }
    let _ = write!(
        out,
        ",\"paused\":{},\"failed_heartbeats\":{},\"problem\":",
        s.paused, s.failures
    );
    match s.problem.get() {
        "" => out.push_str("null"),
        p => push_json_string(&mut out, p),
    }
    out.push_str("}\n");
    out
}

const ROLES: [&str; 7] = [
    "primary",
    "standby",
    "promoting",
    "isolated",
    "fenced",
    "starting",
    "unknown",
];

/// The Prometheus text exposition (format 0.0.4).
pub fn metrics(v: &View) -> String {
    let s = &v.status;
    let h = &s.http;
    let mut out = String::with_capacity(4096);
    let mut gauge = |name: &str, help: &str, samples: &[(String, String)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let one = |x: String| vec![(String::new(), x)];
    let flag = |b: bool| if b { "1" } else { "0" }.to_string();
    gauge(
        "pg_keeper_up",
        "Whether the keeper runs and has published its state recently.",
        &one(flag(v.keeper_fresh())),
    );
    let role = v.role();
    let roles: Vec<(String, String)> = ROLES
        .iter()
        .map(|r| (format!("{{role=\"{r}\"}}"), flag(*r == role)))
        .collect();
    gauge(
        "pg_keeper_role",
        "The role the keeper decided (1 for the current one).",
        &roles,
    );
    let state = if v.keeper_fresh() { s.state.get() } else { "" };
    gauge(
        "pg_keeper_state_info",
        "The keeper's state as its process title shows it.",
        &[(format!("{{state=\"{}\"}}", label_value(state)), "1".into())],
    );
    gauge(
        "pg_keeper_primary_serving",
        "Whether /primary answers 200 (a writable primary that may take writes).",
        &one(flag(v.writable_primary())),
    );
    gauge(
        "pg_keeper_in_recovery",
        "Whether the server is in recovery (a standby).",
        &one(flag(v.in_recovery)),
    );
    gauge(
        "pg_keeper_timeline",
        "The timeline the server writes or replays.",
        &one(v.timeline.to_string()),
    );
    gauge(
        "pg_keeper_heartbeat_failures",
        "Consecutive failed heartbeats to the peer.",
        &one(s.failures.to_string()),
    );
    if s.last_answer > 0 {
        gauge(
            "pg_keeper_peer_last_answer_seconds",
            "Seconds since the peer last answered a heartbeat.",
            &one(format!(
                "{:.3}",
                (v.now - s.last_answer).max(0) as f64 / 1e6
            )),
        );
    }
    if let Some(lag) = v.replay_lag_bytes.filter(|_| v.in_recovery) {
        gauge(
            "pg_keeper_replay_lag_bytes",
            "(Standby.) WAL received from the primary but not yet replayed, in bytes.",
            &one(lag.to_string()),
        );
    }
    if !v.in_recovery && h.standby_lag_bytes >= 0 {
        gauge(
            "pg_keeper_standby_lag_bytes",
            "(Primary.) The standby's replication lag in pg_stat_replication, in bytes.",
            &one(h.standby_lag_bytes.to_string()),
        );
    }
    gauge(
        "pg_keeper_synchronous",
        "Whether replication between the pair is synchronous now.",
        &one(flag(v.synchronous())),
    );
    if h.uses_witness {
        gauge(
            "pg_keeper_lease_remaining_seconds",
            "(Primary.) Seconds left of this node's lease on the witness (0 when it holds none).",
            &one(format!(
                "{:.3}",
                v.lease_ms_left().unwrap_or(0) as f64 / 1e3
            )),
        );
    }
    gauge(
        "pg_keeper_paused",
        "Whether the keeper's automatic actions are paused.",
        &one(flag(s.paused)),
    );
    if h.after_command_runs_total > 0 {
        gauge(
            "pg_keeper_after_command_last_exit_code",
            "Exit status of the last after_command (128 + signal when killed).",
            &one(h.after_command_last_exit.to_string()),
        );
    }
    let mut counter = |name: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
        );
    };
    counter(
        "pg_keeper_heartbeat_failures_total",
        "Heartbeats the peer did not answer, since the server started.",
        h.heartbeat_failures_total,
    );
    counter(
        "pg_keeper_failovers_total",
        "Promotions of this server requested by the keeper, since the server started.",
        h.failovers_total,
    );
    counter(
        "pg_keeper_async_switches_total",
        "Switches to asynchronous replication, since the server started.",
        h.async_switches_total,
    );
    counter(
        "pg_keeper_after_command_runs_total",
        "after_command runs that ended, since the server started.",
        h.after_command_runs_total,
    );
    counter(
        "pg_keeper_http_requests_total",
        "HTTP requests answered by this listener since it started.",
        v.listener.requests,
    );
    counter(
        "pg_keeper_http_rejected_connections_total",
        "HTTP connections closed at once because the connection limit was reached.",
        v.listener.rejected,
    );
    counter(
        "pg_keeper_http_timeouts_total",
        "HTTP connections dropped because the request or its answer took too long.",
        v.listener.timed_out,
    );
    counter(
        "pg_keeper_http_bad_requests_total",
        "HTTP requests refused as malformed or too large.",
        v.listener.bad_requests,
    );
    out
}

/// A label value with Prometheus's escapes.
fn label_value(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
