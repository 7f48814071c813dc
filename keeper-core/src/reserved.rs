//! Whether the heartbeat's user can still connect to a server whose ordinary connection slots
//! are all taken. A heartbeat refused with "too many clients" counts as alive, but the keeper
//! then learns nothing of the peer (its role, timeline, replication state), and a kept
//! heartbeat connection lost while the server is full cannot come back. PostgreSQL keeps some
//! slots back: `superuser_reserved_connections` for superusers and, from PostgreSQL 16,
//! `reserved_connections` for members of `pg_use_reserved_connections`. The worker asks each
//! server once per new heartbeat connection ([`ReservedSlots`]); this says whether to warn, and
//! what to do about it.

/// What a server said about its reserved slots and the heartbeat's user, on the heartbeat
/// connection itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReservedSlots {
    /// `server_version_num` (e.g. 160004).
    pub server_version_num: u32,
    /// The heartbeat's user, as the server sees it.
    pub user: String,
    pub superuser: bool,
    /// `superuser_reserved_connections`.
    pub superuser_reserved: u32,
    /// `reserved_connections` (PostgreSQL 16 and later; None before).
    pub reserved: Option<u32>,
    /// The user has the privileges of `pg_use_reserved_connections` (None before 16, where the
    /// role does not exist).
    pub member_of_reserved_role: Option<bool>,
}

/// A warning about a server on which the heartbeat's user cannot use a reserved slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReservedAdvice {
    pub message: String,
    pub hint: String,
}

impl ReservedSlots {
    /// Whether the user can connect when only reserved slots are left: a superuser passes every
    /// check while any slot is free, so it needs some slot kept back from ordinary users; a
    /// member of `pg_use_reserved_connections` may use `reserved_connections`.
    pub fn usable(&self) -> bool {
        let reserved = self.reserved.unwrap_or(0);
        if self.superuser {
            self.superuser_reserved + reserved > 0
        } else {
            self.member_of_reserved_role == Some(true) && reserved > 0
        }
    }

    /// The warning to give about `server` (how the log names it, e.g. `primary node1
    /// (10.0.0.1:5432)`; `name` is its node name, for the hint), or None when the heartbeat's
    /// user can use a reserved slot there.
    pub fn advice(&self, server: &str, name: &str) -> Option<ReservedAdvice> {
        if self.usable() {
            return None;
        }
        let user = &self.user;
        let message = format!(
            "the heartbeat's user \"{user}\" cannot use a reserved connection slot on {server}: once its ordinary slots are all taken, a lost heartbeat connection cannot come back, and this keeper counts the server alive without seeing its role or replication"
        );
        let hint = if self.superuser {
            // Only a server with no slot kept back at all.
            format!("On {name}, set superuser_reserved_connections (3 by default) to at least 1, then restart it.")
        } else if self.server_version_num < 160_000 {
            format!(
                "PostgreSQL {} keeps slots back for superusers only (superuser_reserved_connections): use a superuser in pg_keeper.node1_conninfo and pg_keeper.node2_conninfo, or PostgreSQL 16 or later (pg_use_reserved_connections).",
                self.server_version_num / 10_000
            )
        } else {
            let grant = format!(
                "GRANT pg_use_reserved_connections TO {};",
                quote_ident(user)
            );
            let set = "ALTER SYSTEM SET reserved_connections = 3;";
            let restart = "(reserved_connections takes effect at a restart)";
            match (self.member_of_reserved_role == Some(true), self.reserved.unwrap_or(0) > 0) {
                (false, true) => format!("Run on the primary (the grant replicates): {grant}"),
                (true, _) => format!("On {name}, run {set} then restart it {restart}."),
                (false, false) => format!(
                    "Run on the primary (the grant replicates): {grant} and on {name}: {set} then restart {name} {restart}."
                ),
            }
        };
        Some(ReservedAdvice { message, hint })
    }
}

/// A role name as SQL writes it: bare when it is plain lower case, else double-quoted.
fn quote_ident(name: &str) -> String {
    let plain = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if plain {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on(version: u32) -> ReservedSlots {
        ReservedSlots {
            server_version_num: version,
            user: "keeper".into(),
            superuser: false,
            superuser_reserved: 3,
            reserved: (version >= 160_000).then_some(0),
            member_of_reserved_role: (version >= 160_000).then_some(false),
        }
    }

    #[test]
    fn a_superuser_uses_the_slots_kept_back_for_superusers() {
        let s = ReservedSlots {
            superuser: true,
            ..on(150_010)
        };
        assert!(s.usable());
        assert_eq!(s.advice("primary node1 (h:1)", "node1"), None);
    }

    #[test]
    fn a_superuser_on_a_server_with_no_slot_kept_back_is_warned() {
        let s = ReservedSlots {
            superuser: true,
            superuser_reserved: 0,
            ..on(160_004)
        };
        let a = s.advice("primary node1 (h:1)", "node1").unwrap();
        assert!(
            a.message.contains(
                "\"keeper\" cannot use a reserved connection slot on primary node1 (h:1)"
            ),
            "{a:?}"
        );
        assert!(a.hint.contains("superuser_reserved_connections"), "{a:?}");
        // reserved_connections counts for a superuser too.
        let s = ReservedSlots {
            reserved: Some(2),
            ..s
        };
        assert!(s.usable());
    }

    #[test]
    fn before_16_a_non_superuser_cannot_and_is_told_to_use_a_superuser() {
        for v in [140_023, 150_010] {
            let a = on(v).advice("standby node2 (h:2)", "node2").unwrap();
            assert!(
                a.hint.contains(&format!("PostgreSQL {}", v / 10_000)),
                "{a:?}"
            );
            assert!(a.hint.contains("use a superuser"), "{a:?}");
            assert!(!a.hint.contains("GRANT"), "{a:?}");
        }
    }

    #[test]
    fn from_16_a_member_of_pg_use_reserved_connections_with_reserved_slots_can() {
        let s = ReservedSlots {
            reserved: Some(2),
            member_of_reserved_role: Some(true),
            ..on(160_004)
        };
        assert!(s.usable());
        assert_eq!(s.advice("x", "node1"), None);
    }

    #[test]
    fn from_16_the_hint_names_what_is_missing() {
        let neither = on(170_002).advice("primary node1 (h:1)", "node1").unwrap();
        assert_eq!(
            neither.hint,
            "Run on the primary (the grant replicates): GRANT pg_use_reserved_connections TO keeper; and on node1: ALTER SYSTEM SET reserved_connections = 3; then restart node1 (reserved_connections takes effect at a restart)."
        );
        let no_grant = ReservedSlots {
            reserved: Some(2),
            ..on(160_004)
        };
        let a = no_grant.advice("primary node1 (h:1)", "node1").unwrap();
        assert!(
            a.hint
                .contains("GRANT pg_use_reserved_connections TO keeper;"),
            "{a:?}"
        );
        assert!(!a.hint.contains("ALTER SYSTEM"), "{a:?}");
        let no_slots = ReservedSlots {
            member_of_reserved_role: Some(true),
            ..on(180_001)
        };
        let a = no_slots.advice("primary node1 (h:1)", "node1").unwrap();
        assert!(
            a.hint.contains("ALTER SYSTEM SET reserved_connections"),
            "{a:?}"
        );
        assert!(!a.hint.contains("GRANT"), "{a:?}");
    }

    #[test]
    fn a_role_name_that_needs_quotes_gets_them() {
        let s = ReservedSlots {
            user: "Keeper \"x\"".into(),
            ..on(160_004)
        };
        let a = s.advice("p", "node1").unwrap();
        assert!(a.hint.contains("TO \"Keeper \"\"x\"\"\";"), "{a:?}");
    }
}
