//! Host names resolved with a bound of the keeper's own.
//!
//! libpq resolves a `host` name with getaddrinfo inside `PQconnectStartParams`/`PQconnectPoll`,
//! synchronously and outside any deadline: a slow or black-holed DNS server would hold the worker
//! there (no heartbeat, no decision, SIGTERM not honoured). So the keeper resolves the name first,
//! in a thread of its own that calls only libc (never PostgreSQL), waits for it no longer than the
//! connection attempt's deadline, and hands libpq the addresses as `hostaddr` (with `host` kept,
//! so TLS verification and the password file still use the name).

mod bounded;

use std::ffi::CString;
use std::time::Instant;

use crate::conninfo::Conninfo;
use crate::heartbeat::{shutdown_requested, Beat};

/// The lookups under way, one per host at most.
static PENDING: bounded::Pending = bounded::Pending::new();

/// The keywords to place after `dbname` in `PQconnectStartParams` (so they override the
/// connection string) for `conninfo`: nothing when libpq will not resolve a name itself, else
/// `host` and `hostaddr` with the name's addresses. libpq tries them in order, as it tries the
/// addresses of a name it resolves; `host` is repeated once per address because libpq pairs
/// the two lists entry by entry.
///
/// `Err` is a [`Beat::NoAnswer`] when the name did not resolve before `deadline` or does not
/// resolve, and [`Beat::Interrupted`] on SIGTERM.
pub fn host_keywords(conninfo: &str, deadline: Instant) -> Result<Vec<(CString, CString)>, Beat> {
    // A connection string that does not parse is libpq's to report.
    let Ok(parsed) = Conninfo::parse(conninfo) else {
        return Ok(Vec::new());
    };
    let Some(host) = bounded::name_to_resolve(parsed.get("host"), parsed.get("hostaddr")) else {
        return Ok(Vec::new());
    };
    match PENDING.resolve(host, deadline, &shutdown_requested, |h| {
        bounded::system_lookup(h)
    }) {
        bounded::Outcome::Addresses(addresses) => {
            let hosts = vec![host; addresses.len()].join(",");
            let addrs = addresses
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",");
            match (CString::new(hosts), CString::new(addrs)) {
                (Ok(h), Ok(a)) => Ok(vec![(c"host".into(), h), (c"hostaddr".into(), a)]),
                _ => Err(Beat::NoAnswer(format!(
                    "the host name \"{host}\" contains a NUL byte"
                ))),
            }
        }
        bounded::Outcome::Failed(why) => Err(Beat::NoAnswer(format!(
            "could not resolve host \"{host}\": {why}"
        ))),
        bounded::Outcome::TimedOut => Err(Beat::NoAnswer(format!(
            "resolving host \"{host}\" took longer than the deadline"
        ))),
        bounded::Outcome::Interrupted => Err(Beat::Interrupted),
    }
}
