//! The pure part of resolving host names with a bound: which hosts need resolving, and a wait for
//! a resolver thread's answer that gives up at a deadline and keeps at most one thread per host.
//!
//! Nothing here calls PostgreSQL (only std and libc), and what the caller must ask of the server
//! (has SIGTERM arrived?) is passed in, so tests/names.rs includes this file and tests it alone.

use std::net::{IpAddr, ToSocketAddrs};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What one lookup found: the addresses in the resolver's order, or its error message.
pub type Answer = Result<Vec<IpAddr>, String>;

/// How often the wait looks whether the caller was asked to stop.
pub const POLL: Duration = Duration::from_millis(50);

/// The stack of a resolver thread. getaddrinfo and the NSS modules it loads need some room; a
/// stack overflow would abort the whole server process, so this is not cut to the bone. It is
/// virtual memory, touched only as far as it is used.
pub const STACK: usize = 256 * 1024;

/// The outcome of one bounded resolution.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The name's addresses (never empty).
    Addresses(Vec<IpAddr>),
    /// The resolver answered with an error, or could not be asked.
    Failed(String),
    /// No answer before the deadline; the lookup goes on and a later call picks up its answer.
    TimedOut,
    /// The caller was asked to stop while waiting.
    Interrupted,
}

/// The host name libpq would resolve itself (with no deadline) for this `host` and `hostaddr`,
/// if there is one: not when `hostaddr` is set (libpq then uses it and never resolves), nor for
/// an empty host (the default socket), a Unix-socket directory (`/...`) or abstract socket
/// (`@...`), an IP literal (a host name never holds a `:`, IPv6 literals with a zone do), or a
/// list of hosts (refused in the settings; left to libpq).
pub fn name_to_resolve<'a>(host: Option<&'a str>, hostaddr: Option<&str>) -> Option<&'a str> {
    if hostaddr.is_some_and(|a| !a.is_empty()) {
        return None;
    }
    let host = host?;
    let not_a_name = host.is_empty()
        || host.starts_with('/')
        || host.starts_with('@')
        || host.contains(',')
        || host.contains(':')
        || host.parse::<IpAddr>().is_ok();
    (!not_a_name).then_some(host)
}

/// The system resolver (getaddrinfo through std), for a resolver thread: the addresses of
/// `host`, each once, in the resolver's order. The port does not change a name's addresses and
/// only the addresses are used, so none is asked for.
pub fn system_lookup(host: &str) -> Answer {
    let found = (host, 0u16).to_socket_addrs().map_err(|e| e.to_string())?;
    let mut addresses: Vec<IpAddr> = Vec::new();
    for a in found {
        if !addresses.contains(&a.ip()) {
            addresses.push(a.ip());
        }
    }
    Ok(addresses)
}

/// Resolutions under way, by host: at most one thread per host, whose answer the next call for
/// that host picks up, so a resolver that hangs never piles up threads.
pub struct Pending {
    waiting: Mutex<Vec<(String, Receiver<Answer>)>>,
}

impl Default for Pending {
    fn default() -> Self {
        Pending::new()
    }
}

impl Pending {
    pub const fn new() -> Pending {
        Pending {
            waiting: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<(String, Receiver<Answer>)>> {
        // A panic elsewhere while the lock was held leaves a list that is still consistent.
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many lookups are under way without anyone waiting for them (for tests/names.rs).
    #[allow(dead_code)]
    pub fn outstanding(&self) -> usize {
        self.lock().len()
    }

    /// Resolves `host` with `lookup` in a thread of its own (or picks up the answer of the
    /// thread already under way for it), waiting until the answer, the deadline, or until
    /// `interrupted` says so (asked every [`POLL`]). A thread that is late is left to finish on
    /// its own.
    pub fn resolve<L>(
        &self,
        host: &str,
        deadline: Instant,
        interrupted: &dyn Fn() -> bool,
        lookup: L,
    ) -> Outcome
    where
        L: FnOnce(&str) -> Answer + Send + 'static,
    {
        let under_way = {
            let mut waiting = self.lock();
            let found = waiting.iter().position(|(h, _)| h == host);
            found.map(|i| waiting.swap_remove(i).1)
        };
        let rx = match under_way {
            Some(rx) => rx,
            None => match spawn_lookup(host, lookup) {
                Ok(rx) => rx,
                Err(why) => {
                    return Outcome::Failed(format!("could not start a resolver thread: {why}"))
                }
            },
        };
        loop {
            if interrupted() {
                self.lock().push((host.to_string(), rx));
                return Outcome::Interrupted;
            }
            let slice = deadline.saturating_duration_since(Instant::now()).min(POLL);
            match rx.recv_timeout(slice) {
                Ok(Ok(addresses)) if addresses.is_empty() => {
                    return Outcome::Failed("the name has no address".into())
                }
                Ok(Ok(addresses)) => return Outcome::Addresses(addresses),
                Ok(Err(why)) => return Outcome::Failed(why),
                Err(RecvTimeoutError::Disconnected) => {
                    return Outcome::Failed("the resolver thread ended without an answer".into())
                }
                Err(RecvTimeoutError::Timeout) => {
                    if Instant::now() >= deadline {
                        self.lock().push((host.to_string(), rx));
                        return Outcome::TimedOut;
                    }
                }
            }
        }
    }
}

/// Starts `lookup(host)` in a thread with a small stack and every signal blocked (the server's
/// signals must reach the thread that handles them, never this one), answering on a channel.
fn spawn_lookup<L>(host: &str, lookup: L) -> Result<Receiver<Answer>, String>
where
    L: FnOnce(&str) -> Answer + Send + 'static,
{
    let (tx, rx) = mpsc::sync_channel(1);
    let name = host.to_string();
    let body = move || {
        // Nobody may be listening any more: the answer is then dropped.
        let _ = tx.send(lookup(&name));
    };
    // A new thread starts with the signal mask of the thread that creates it: block every
    // signal here for the moment of the spawn, then restore the mask.
    // SAFETY: plain libc calls on sigset_t values owned by this frame.
    let spawned = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut before: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut before) != 0 {
            return Err("could not block signals".into());
        }
        let spawned = std::thread::Builder::new()
            .name("pgk-resolver".into())
            .stack_size(STACK)
            .spawn(body);
        libc::pthread_sigmask(libc::SIG_SETMASK, &before, std::ptr::null_mut());
        spawned
    };
    spawned.map(|_| rx).map_err(|e| e.to_string())
}
