//! The HTTP listener: a background worker of its own ("pg_keeper http"), started with the
//! server when `pg_keeper.http_port` is set, so that no client can delay a heartbeat or a
//! decision of the keeper. Its main thread runs a single-threaded, non-blocking poll(2) loop and
//! reads the status the keeper publishes in shared memory (under its LWLock, from this main
//! thread only). Requests are parsed with `httparse` (no I/O, no threads of its own).
//!
//! Everything is bounded: a request's size ([`MAX_REQUEST_BYTES`]) and the time to send it
//! ([`REQUEST_TIME`]), the time to take the answer ([`ANSWER_TIME`]), and the connections open
//! at once ([`MAX_CONNECTIONS`]; beyond it the longest-waiting idle one is dropped with a 503,
//! so that a flood of idle connections cannot keep a health check out). Every connection is
//! closed after one answer.

mod answer;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

use crate::actuators;
use crate::settings::Settings;
use crate::status;
use answer::{Answer, Counters, View};

/// The largest request accepted (request line and headers).
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// The most headers a request may carry.
const MAX_HEADERS: usize = 32;
/// A client has this long from its connection to the end of its request.
pub const REQUEST_TIME: Duration = Duration::from_secs(2);
/// And this long to take the answer.
pub const ANSWER_TIME: Duration = Duration::from_secs(2);
/// Connections open at once. When they are all taken, a new one makes room by dropping (with
/// a 503) the one that has waited longest for its request; when every one is being answered,
/// the new one gets the 503.
pub const MAX_CONNECTIONS: usize = 64;
/// Connections accepted per wake-up: fewer than [`MAX_CONNECTIONS`], so that a connection
/// accepted in one batch is read before a flood can push it out.
const ACCEPT_BATCH: usize = 16;
/// The kernel's queue of connections not accepted yet (std's default is 128).
const LISTEN_BACKLOG: i32 = 1024;
/// An address that cannot be bound is tried again this often; the warning is repeated
/// [`WARN_AGAIN_AFTER`] later at the earliest.
const RETRY_BIND_EVERY: Duration = Duration::from_secs(10);
const WARN_AGAIN_AFTER: Duration = Duration::from_secs(300);
/// A copy of the status this recent serves the next answers too: however many requests come,
/// the listener takes the status lock at most this often, so it cannot keep the keeper waiting.
const STATUS_REUSE: Duration = Duration::from_millis(20);
/// The loop looks at signals and the postmaster at least this often.
const IDLE_WAKE: Duration = Duration::from_millis(1000);

/// Registers the listener's worker, from `_PG_init`, when a port is set.
pub fn register() {
    let (port, _) = Settings::http();
    if port == 0 {
        return;
    }
    pgrx::bgworkers::BackgroundWorkerBuilder::new("pg_keeper http")
        .set_type("pg_keeper http")
        .set_library("pg_keeper_rs")
        .set_function("pg_keeper_http_main")
        // It reads only shared memory, on a primary as on a standby, from the start.
        .set_start_time(pgrx::bgworkers::BgWorkerStartTime::PostmasterStart)
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn pg_keeper_http_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let (port, addresses) = Settings::http();
    let mut server = Server::new(port, &addresses);
    server.run();
    log(PgLogLevel::LOG, "HTTP listener stopping", None);
    // Non-zero: restarted by the postmaster unless the server itself is stopping.
    unsafe { pg_sys::proc_exit(1) };
}

fn log(level: PgLogLevel, message: &str, hint: Option<&str>) {
    let mut report = ErrorReport::new(
        PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION,
        format!("pg_keeper: {message}"),
        "pg_keeper",
    );
    if let Some(h) = hint {
        report = report.set_hint(h);
    }
    report.report(level);
}

/// One address the listener should listen on.
struct Endpoint {
    /// As written in pg_keeper.http_listen_addresses.
    name: String,
    listener: Option<TcpListener>,
    last_try: Option<Instant>,
    warned_at: Option<Instant>,
}

/// One client connection.
struct Conn {
    stream: TcpStream,
    request: Vec<u8>,
    /// The answer once the request is complete, and how much of it is sent.
    answer: Option<(Vec<u8>, usize)>,
    deadline: Instant,
}

struct Server {
    port: u16,
    endpoints: Vec<Endpoint>,
    conns: Vec<Conn>,
    counters: Counters,
    /// The last copy of the status and when it was taken (see [`STATUS_REUSE`]).
    status: Option<(Instant, status::HttpCopy)>,
}

/// The socket address an entry of pg_keeper.http_listen_addresses stands for: an IP address,
/// `*` or `localhost`. Host names are refused rather than looked up: a resolver that does not
/// answer would hold the loop.
fn resolve(name: &str, port: u16) -> Result<SocketAddr, String> {
    let ip = match name {
        "*" => Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        "localhost" => Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        other => other.trim_matches(['[', ']']).parse().ok(),
    };
    ip.map(|ip| SocketAddr::new(ip, port)).ok_or_else(|| {
        format!("\"{name}\" is not an IP address (give IP addresses, '*' or 'localhost')")
    })
}

impl Server {
    fn new(port: u16, addresses: &[String]) -> Server {
        Server {
            port,
            endpoints: addresses
                .iter()
                .map(|name| Endpoint {
                    name: name.clone(),
                    listener: None,
                    last_try: None,
                    warned_at: None,
                })
                .collect(),
            conns: Vec::new(),
            counters: Counters::default(),
            status: None,
        }
    }

    fn run(&mut self) {
        loop {
            if BackgroundWorker::sigterm_received() {
                return;
            }
            // SAFETY: PostmasterPid is set before any worker starts.
            if unsafe { libc::getppid() != pg_sys::PostmasterPid } {
                return;
            }
            // Nothing to reload: both settings are read at server start.
            let _ = BackgroundWorker::sighup_received();
            self.bind_missing();
            self.poll_once();
        }
    }

    /// Binds the addresses not bound yet (each at most every [`RETRY_BIND_EVERY`]); says when it
    /// cannot, with what to do.
    fn bind_missing(&mut self) {
        let port = self.port;
        for e in self.endpoints.iter_mut().filter(|e| e.listener.is_none()) {
            if e.last_try.is_some_and(|t| t.elapsed() < RETRY_BIND_EVERY) {
                continue;
            }
            e.last_try = Some(Instant::now());
            let bound = resolve(&e.name, port).and_then(|addr| {
                let l = TcpListener::bind(addr).map_err(|err| err.to_string())?;
                l.set_nonblocking(true).map_err(|err| err.to_string())?;
                // SAFETY: listen() again on a listening socket only resizes its queue.
                unsafe { libc::listen(l.as_raw_fd(), LISTEN_BACKLOG) };
                Ok(l)
            });
            match bound {
                Ok(l) => {
                    let again = if e.warned_at.is_some() { " now" } else { "" };
                    log(
                        PgLogLevel::LOG,
                        &format!(
                            "HTTP listener{again} listening on {}:{port} (/primary, /replica, /metrics, ...)",
                            e.name
                        ),
                        None,
                    );
                    e.listener = Some(l);
                }
                Err(why) => {
                    if e.warned_at.is_none_or(|t| t.elapsed() >= WARN_AGAIN_AFTER) {
                        e.warned_at = Some(Instant::now());
                        log(
                            PgLogLevel::WARNING,
                            &format!("could not listen for HTTP on {}:{port}: {why}", e.name),
                            Some(&format!(
                                "Free the port, or set pg_keeper.http_port to a free one and restart the server. \
                                 The server and its keeper run on without the HTTP endpoints on this address; \
                                 it is tried again every {} s.",
                                RETRY_BIND_EVERY.as_secs()
                            )),
                        );
                    }
                }
            }
        }
    }

    /// Waits for the sockets (at most until the nearest deadline), then serves what is ready.
    fn poll_once(&mut self) {
        let now = Instant::now();
        let listeners: Vec<&TcpListener> = self
            .endpoints
            .iter()
            .filter_map(|e| e.listener.as_ref())
            .collect();
        let mut fds: Vec<libc::pollfd> = listeners
            .iter()
            .map(|l| libc::pollfd {
                fd: l.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let n_listeners = fds.len();
        fds.extend(self.conns.iter().map(|c| libc::pollfd {
            fd: c.stream.as_raw_fd(),
            events: if c.answer.is_some() {
                libc::POLLOUT
            } else {
                libc::POLLIN
            },
            revents: 0,
        }));
        let mut wait = IDLE_WAKE;
        if self.endpoints.iter().any(|e| e.listener.is_none()) {
            wait = wait.min(RETRY_BIND_EVERY);
        }
        for c in &self.conns {
            wait = wait.min(c.deadline.saturating_duration_since(now));
        }
        let ms = wait.as_millis().max(1) as libc::c_int;
        // SAFETY: fds is a live array of fds.len() pollfd.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if rc < 0 {
            // EINTR: a signal; the loop looks at it.
            return;
        }
        let ready_listeners: Vec<usize> =
            (0..n_listeners).filter(|&i| fds[i].revents != 0).collect();
        let ready_conns: Vec<bool> = fds[n_listeners..].iter().map(|f| f.revents != 0).collect();
        drop(listeners);
        let mut keep = Vec::with_capacity(self.conns.len());
        let conns = std::mem::take(&mut self.conns);
        for (conn, ready) in conns.into_iter().zip(ready_conns) {
            if let Some(conn) = self.serve(conn, ready) {
                keep.push(conn);
            }
        }
        self.conns = keep;
        for i in ready_listeners {
            self.accept(i);
        }
    }

    /// Accepts what waits on the `i`th bound listener (see [`MAX_CONNECTIONS`] for what happens
    /// when the connections are all taken).
    fn accept(&mut self, i: usize) {
        let Some(listener) = self
            .endpoints
            .iter()
            .filter_map(|e| e.listener.as_ref())
            .nth(i)
        else {
            return;
        };
        // A bounded batch per wake-up, so that a flood cannot starve the open connections.
        for _ in 0..ACCEPT_BATCH {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    if self.conns.len() >= MAX_CONNECTIONS {
                        self.counters.rejected += 1;
                        let waiting_longest = self
                            .conns
                            .iter()
                            .enumerate()
                            .filter(|(_, c)| c.answer.is_none())
                            .min_by_key(|(_, c)| c.deadline)
                            .map(|(i, _)| i);
                        let Some(i) = waiting_longest else {
                            let _ = stream.write(&busy());
                            continue;
                        };
                        let mut dropped = self.conns.swap_remove(i);
                        let _ = dropped.stream.write(&busy());
                    }
                    let _ = stream.set_nodelay(true);
                    self.conns.push(Conn {
                        stream,
                        request: Vec::new(),
                        answer: None,
                        deadline: Instant::now() + REQUEST_TIME,
                    });
                }
                // WouldBlock, or a connection already gone, or out of descriptors: next time.
                Err(_) => return,
            }
        }
    }

    /// Moves one connection on; None once it is done with (closed).
    fn serve(&mut self, mut c: Conn, ready: bool) -> Option<Conn> {
        if ready {
            if c.answer.is_none() && !self.read_request(&mut c) {
                return None;
            }
            if let Some((bytes, sent)) = c.answer.as_mut() {
                loop {
                    match c.stream.write(&bytes[*sent..]) {
                        Ok(0) => return None,
                        Ok(n) => {
                            *sent += n;
                            if *sent == bytes.len() {
                                let _ = c.stream.shutdown(Shutdown::Write);
                                return None;
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(_) => return None,
                    }
                }
            }
        }
        if Instant::now() >= c.deadline {
            self.counters.timed_out += 1;
            if c.answer.is_none() {
                let late = Answer {
                    code: 408,
                    content_type: "application/json",
                    body: "{\"error\":\"the request took too long\"}\n".into(),
                };
                let _ = c.stream.write(&render(&late, false));
            }
            return None;
        }
        Some(c)
    }

    /// Reads what the client sent; once the request is complete (or refused), prepares the
    /// answer. False when the connection is to be closed now.
    fn read_request(&mut self, c: &mut Conn) -> bool {
        let mut chunk = [0u8; 2048];
        loop {
            let room = MAX_REQUEST_BYTES.saturating_sub(c.request.len());
            if room == 0 {
                break;
            }
            let want = room.min(chunk.len());
            match c.stream.read(&mut chunk[..want]) {
                Ok(0) => return false,
                Ok(n) => c.request.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let (answer, head_only) = match req.parse(&c.request) {
            Ok(httparse::Status::Complete(_)) => {
                let method = req.method.unwrap_or("");
                let target = req.path.unwrap_or("/");
                match method {
                    "GET" | "HEAD" | "OPTIONS" => {
                        let view = self.view();
                        (answer::route(target, &view), method == "HEAD")
                    }
                    _ => (
                        Answer {
                            code: 405,
                            content_type: "application/json",
                            body: "{\"error\":\"only GET, HEAD and OPTIONS\"}\n".into(),
                        },
                        false,
                    ),
                }
            }
            Ok(httparse::Status::Partial) if c.request.len() < MAX_REQUEST_BYTES => return true,
            Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => (
                Answer {
                    code: 431,
                    content_type: "application/json",
                    body: format!(
                        "{{\"error\":\"the request is larger than {MAX_REQUEST_BYTES} bytes or has more than {MAX_HEADERS} headers\"}}\n"
                    ),
                },
                false,
            ),
            Err(e) => (answer::bad_request(&format!("malformed request: {e}")), false),
        };
        if answer.code == 400 || answer.code == 405 || answer.code == 431 {
            self.counters.bad_requests += 1;
        } else {
            self.counters.requests += 1;
        }
        c.answer = Some((render(&answer, head_only), 0));
        c.deadline = Instant::now() + ANSWER_TIME;
        true
    }

    /// The status as the answer needs it, read now (the keeper's part at most
    /// [`STATUS_REUSE`] old).
    fn view(&mut self) -> View {
        let copy = match self.status {
            Some((at, copy)) if at.elapsed() < STATUS_REUSE => copy,
            _ => {
                let copy = status::http_copy();
                self.status = Some((Instant::now(), copy));
                copy
            }
        };
        let in_recovery = actuators::in_recovery();
        let (streaming, lag) = if in_recovery {
            // SAFETY: both read the WAL receiver's and the startup process's shared memory.
            unsafe {
                let received =
                    pg_sys::GetWalRcvFlushRecPtr(std::ptr::null_mut(), std::ptr::null_mut());
                let replayed = pg_sys::GetXLogReplayRecPtr(std::ptr::null_mut());
                (
                    pg_sys::WalRcvStreaming(),
                    Some(received.saturating_sub(replayed)),
                )
            }
        } else {
            (false, None)
        };
        View {
            now: status::now(),
            status: copy,
            in_recovery,
            timeline: actuators::timeline(),
            wal_receiver_streaming: streaming,
            replay_lag_bytes: lag,
            listener: self.counters,
        }
    }
}

/// The answer to a connection dropped for room.
fn busy() -> Vec<u8> {
    let a = Answer {
        code: 503,
        content_type: "application/json",
        body: "{\"error\":\"too many connections\"}\n".into(),
    };
    render(&a, false)
}

/// The bytes of an answer; without the body for HEAD (its length is still given).
fn render(a: &Answer, head_only: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n",
        a.code,
        answer::reason(a.code),
        a.content_type,
        a.body.len()
    );
    if a.code == 405 {
        out.push_str("Allow: GET, HEAD, OPTIONS\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    let mut bytes = out.into_bytes();
    if !head_only {
        bytes.extend_from_slice(a.body.as_bytes());
    }
    bytes
}
