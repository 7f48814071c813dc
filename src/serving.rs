//! Whether this server serves clients: a primary isolated from both its standby and the
//! witness stops serving (every new session is refused, every session ended) strictly before
//! its standby may take the lease, and serves again once it reaches either of them.
//! The flag lives in shared memory, set by the worker and read by every backend as it
//! authenticates.

/// The start of the message a refused client gets. The other node's heartbeat recognises it: a
/// primary that refuses because it is isolated counts as lost, not as alive and refusing.
pub const REFUSAL: &str = "pg_keeper: this primary is isolated from its standby and the witness";
