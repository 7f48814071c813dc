//! Connection strings: parsed with libpq's own parser (key=value or URI), and shown everywhere
//! (log, title, after_command's environment) without any password.

use std::ffi::{CStr, CString};

use libpq_sys as pq;

/// A parsed connection string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conninfo {
    /// Every keyword with a value, in libpq's order, as given.
    pairs: Vec<(String, String)>,
}

/// Keywords whose values are never shown.
const SECRET_KEYWORDS: &[&str] = &["password", "sslpassword"];

impl Conninfo {
    pub fn parse(conninfo: &str) -> Result<Conninfo, String> {
        let c = CString::new(conninfo).map_err(|_| "contains a NUL byte".to_string())?;
        let mut err: *mut std::ffi::c_char = std::ptr::null_mut();
        // SAFETY: libpq allocates the options array (or the error), which are freed below.
        unsafe {
            let opts = pq::PQconninfoParse(c.as_ptr(), &mut err);
            if opts.is_null() {
                let why = if err.is_null() {
                    "out of memory".to_string()
                } else {
                    let s = CStr::from_ptr(err).to_string_lossy().trim().to_string();
                    pq::PQfreemem(err.cast());
                    s
                };
                return Err(why);
            }
            let mut pairs = Vec::new();
            let mut p = opts;
            while !(*p).keyword.is_null() {
                if !(*p).val.is_null() {
                    let k = CStr::from_ptr((*p).keyword).to_string_lossy().into_owned();
                    let v = CStr::from_ptr((*p).val).to_string_lossy().into_owned();
                    pairs.push((k, v));
                }
                p = p.add(1);
            }
            pq::PQconninfoFree(opts);
            Ok(Conninfo { pairs })
        }
    }

    /// Why a keeper must not use this connection string, if it must not: anything that lets
    /// libpq pick among servers, or that is not a plain session, would let a heartbeat or a
    /// lease statement reach some other server than the one meant, and so silently disable
    /// (or misdirect) failover.
    pub fn failover_hazard(&self) -> Option<String> {
        for key in ["host", "hostaddr", "port"] {
            if self.get(key).is_some_and(|v| v.contains(',')) {
                return Some(format!(
                    "It names several servers ({key}=...,...); the keeper must reach exactly one server through it."
                ));
            }
        }
        for (key, harmless) in [
            ("target_session_attrs", "any"),
            ("load_balance_hosts", "disable"),
        ] {
            if self.get(key).is_some_and(|v| v != harmless) {
                return Some(format!(
                    "It sets {key}, which lets libpq choose among servers; name one server instead."
                ));
            }
        }
        if self.get("replication").is_some() {
            return Some(
                "It sets replication=; the keeper needs an ordinary session, not a replication connection."
                    .into(),
            );
        }
        None
    }

    pub fn get(&self, keyword: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == keyword)
            .map(|(_, v)| v.as_str())
    }

    /// The host as libpq would use it (host, else hostaddr, else the local socket).
    pub fn host(&self) -> String {
        self.get("host")
            .or_else(|| self.get("hostaddr"))
            .filter(|h| !h.is_empty())
            .unwrap_or("localhost")
            .to_string()
    }

    pub fn port(&self) -> String {
        self.get("port")
            .filter(|p| !p.is_empty())
            .unwrap_or("5432")
            .to_string()
    }

    /// The connection string in key=value form, without any password.
    pub fn redacted(&self) -> String {
        self.pairs
            .iter()
            .filter(|(k, _)| !SECRET_KEYWORDS.contains(&k.as_str()))
            .map(|(k, v)| format!("{k}={}", quote(v)))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Quotes a conninfo value when it needs it.
fn quote(v: &str) -> String {
    if !v.is_empty()
        && !v
            .chars()
            .any(|c| c.is_whitespace() || c == '\'' || c == '\\')
    {
        return v.to_string();
    }
    let mut out = String::from("'");
    for c in v.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// How a node is named in the log: `node2 (127.0.0.1:5433)`.
pub fn display_name(name: &str, conninfo: Option<&str>) -> String {
    match conninfo.and_then(|c| Conninfo::parse(c).ok()) {
        Some(c) => format!("{name} ({}:{})", c.host(), c.port()),
        None => name.to_string(),
    }
}

/// Removes any password from a text that may quote a connection string (libpq error messages
/// quote the host, never the password, but a conninfo pasted into a message might).
pub fn scrub(text: &str, conninfos: &[&str]) -> String {
    let mut out = text.to_string();
    for ci in conninfos {
        if let Ok(c) = Conninfo::parse(ci) {
            for k in SECRET_KEYWORDS {
                if let Some(secret) = c.get(k).filter(|s| !s.is_empty()) {
                    out = out.replace(secret, "********");
                }
            }
        }
    }
    out
}
