//! Which of `node1_conninfo` / `node2_conninfo` is this server? Asked of the servers themselves:
//! the node whose postmaster start time and port are this server's own is this node. So the same
//! settings work on both servers, in either role, after any number of failovers.

use std::time::{Duration, Instant};

use pgrx::pg_sys;

use crate::conninfo::display_name;
use crate::heartbeat::{Beat, Node, NodeFacts};
use crate::settings::Settings;

/// This node and its peer, as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub me_name: &'static str,
    pub me_conninfo: String,
    pub peer_name: &'static str,
    pub peer_conninfo: String,
}

impl Identity {
    /// How the log names the peer: `node2 (127.0.0.1:5433)`.
    pub fn peer_display(&self) -> String {
        display_name(self.peer_name, Some(&self.peer_conninfo))
    }

    pub fn me_display(&self) -> String {
        display_name(self.me_name, Some(&self.me_conninfo))
    }
}

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// This server's own postmaster start time (Unix microseconds) and port.
fn own_facts() -> (i64, i32) {
    // SAFETY: plain globals set by the postmaster before any worker starts.
    unsafe {
        (
            pg_sys::PgStartTime + PG_EPOCH_OFFSET_US,
            pg_sys::PostPortNumber,
        )
    }
}

/// Whether a node's answer is this server's own (its postmaster start time and port).
pub fn is_me(f: &NodeFacts) -> bool {
    let (started, port) = own_facts();
    f.started_at_us == started && f.port == port
}

fn describe(beat: &Beat) -> String {
    match beat {
        Beat::Answered(f) if is_me(f) => "reaches this server".into(),
        Beat::Answered(f) => format!("reaches another server (port {})", f.port),
        Beat::Refused(why) | Beat::NoAnswer(why) | Beat::Late(why) => {
            format!("could not be asked: {why}")
        }
        Beat::Interrupted => "not asked: shutting down".into(),
    }
}

pub enum Outcome {
    /// Identified; the peer's node is returned with its connection open for heartbeats.
    Found(Identity, Box<Node>),
    Problem {
        message: String,
        hint: String,
    },
    Interrupted,
}

/// Asks both nodes who they are, each within `per_node`.
pub fn identify(s: &Settings, per_node: Duration) -> Outcome {
    let (Some(n1), Some(n2)) = (s.node1.clone(), s.node2.clone()) else {
        let missing = if s.node1.is_none() {
            "pg_keeper.node1_conninfo"
        } else {
            "pg_keeper.node2_conninfo"
        };
        return Outcome::Problem {
            message: format!("{missing} is not set"),
            hint: "Set pg_keeper.node1_conninfo and pg_keeper.node2_conninfo to the same values on both servers, then reload.".into(),
        };
    };
    if n1.trim() == n2.trim() {
        return Outcome::Problem {
            message: "pg_keeper.node1_conninfo and pg_keeper.node2_conninfo are the same".into(),
            hint: "node1 must reach the first master and node2 the first standby.".into(),
        };
    }
    let mut node1 = Node::new(&n1);
    let mut node2 = Node::new(&n2);
    let b1 = node1.beat(Instant::now() + per_node);
    if b1 == Beat::Interrupted {
        return Outcome::Interrupted;
    }
    let b2 = node2.beat(Instant::now() + per_node);
    if b2 == Beat::Interrupted {
        return Outcome::Interrupted;
    }
    let me1 = matches!(&b1, Beat::Answered(f) if is_me(f));
    let me2 = matches!(&b2, Beat::Answered(f) if is_me(f));
    let (d1, d2) = (
        display_name("node1", Some(&n1)),
        display_name("node2", Some(&n2)),
    );
    match (me1, me2) {
        (true, false) => {
            node1.disconnect();
            Outcome::Found(
                Identity { me_name: "node1", me_conninfo: n1, peer_name: "node2", peer_conninfo: n2 },
                Box::new(node2),
            )
        }
        (false, true) => {
            node2.disconnect();
            Outcome::Found(
                Identity { me_name: "node2", me_conninfo: n2, peer_name: "node1", peer_conninfo: n1 },
                Box::new(node1),
            )
        }
        (true, true) => Outcome::Problem {
            message: format!("both {d1} and {d2} reach this server"),
            hint: "One conninfo must reach this server and the other its peer.".into(),
        },
        (false, false) => Outcome::Problem {
            message: format!(
                "neither node is this server: {d1} {}; {d2} {}",
                describe(&b1),
                describe(&b2)
            ),
            hint: "One of the two conninfos must reach this server itself over TCP (check host, port and pg_hba.conf); retrying.".into(),
        },
    }
}
