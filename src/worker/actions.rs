//! Performing the core's actions, one adapter each, in the order the decision gives.

use keeper_core::{Action, AfterEvent, Input, Level};

use super::Worker;
use crate::actuators;
use crate::after_command::Context;
use crate::conninfo::Conninfo;
use crate::server_views;
use crate::serving;
use crate::status;

impl Worker {
    /// Performs the core's actions in order, keeping the core's memory in shared memory before
    /// each one, so that a restarted worker redoes the one under way and goes on with the rest.
    /// A failed action is told to the core, whose answer says whether to go on with the rest.
    pub(super) fn perform(&mut self) {
        loop {
            let memory = self.keeper.memory();
            status::publish(|s| s.memory = Some(memory));
            let Some(action) = self.keeper.next_action() else {
                return;
            };
            let result = self.act(action);
            match result {
                Ok(()) => self.keeper.action_done(action),
                Err(why) => {
                    let d = self
                        .keeper
                        .step(&Input::ActionFailed(action, why), &self.core_settings());
                    self.report(&d);
                }
            }
        }
    }

    /// Performs one action.
    fn act(&mut self, action: Action) -> Result<(), String> {
        match action {
            Action::DegradeToAsync => self.degrade_to_async(),
            Action::Promote => self.promote(),
            Action::RestoreSync => self.restore_sync(),
            Action::Fence => self.fence(),
            Action::ReleaseStandby => self.release_standby(),
            Action::TakeLease => self.take_lease(),
            Action::EndWaitingCommits => self.end_waiting_commits(),
            Action::StopServing => self.stop_serving(),
            Action::ResumeServing => {
                serving::resume();
                Ok(())
            }
            Action::Rejoin => self.rejoin(),
            Action::WakeWalReceiver => {
                actuators::wake_wal_receiver();
                Ok(())
            }
            Action::RunAfterCommand(event) => self.run_after_command(event),
        }
    }

    fn promote(&self) -> Result<(), String> {
        actuators::promote()?;
        status::publish_http(|h| h.failovers_total += 1);
        self.event(
            "promote_requested",
            Level::Log,
            "promotion requested; waiting for recovery to end",
            None,
        );
        Ok(())
    }

    fn restore_sync(&self) -> Result<(), String> {
        let restored = actuators::restore_sync()?;
        let mut said = Vec::new();
        if let Some(names) = &restored.names {
            said.push(format!("synchronous_standby_names is '{names}' again"));
        }
        if let Some(slots) = &restored.slots {
            said.push(format!("synchronized_standby_slots is '{slots}' again"));
        }
        self.event(
            "sync_restored",
            Level::Log,
            &format!("restored synchronous replication: {}", said.join("; ")),
            None,
        );
        Ok(())
    }

    /// Ends the sessions whose commits wait for the synchronous standby (see
    /// [`Action::EndWaitingCommits`]).
    fn end_waiting_commits(&self) -> Result<(), String> {
        let n = server_views::end_waiting_commits();
        if n > 0 {
            self.event(
                "waiting_commits_ended",
                Level::Warning,
                &format!("ended {n} session(s) waiting for synchronous replication: neither the standby nor the witness can be reached, so their commits are not reported as done"),
                Some("Their transactions committed locally but may be lost in a failover; a client must treat a COMMIT without an answer, or one answered with the WARNING \"might not have been replicated to the standby\", as of unknown outcome."),
            );
        }
        Ok(())
    }

    /// Refuses every session of this isolated primary (see [`Action::StopServing`]).
    fn stop_serving(&self) -> Result<(), String> {
        let n = serving::stop()?;
        if n > 0 {
            self.event(
                "sessions_ended",
                Level::Warning,
                &format!("ended {n} session(s): this primary is isolated and serves no session until it reaches the standby or the witness"),
                Some("A COMMIT that got no answer is of unknown outcome; a client should reconnect to whichever node is primary."),
            );
        }
        Ok(())
    }

    /// Shuts this superseded server down so that it starts again only as a standby, and says how
    /// to rejoin it.
    fn fence(&self) -> Result<(), String> {
        let (me, peer) = match &self.identity {
            Some(id) => (id.me_name, Conninfo::parse(&id.peer_conninfo)?.redacted()),
            None => return Err("this node is not identified".into()),
        };
        actuators::fence()?;
        self.event(
            "fenced",
            Level::Warning,
            "this server was superseded and is shutting down; it will start again only as a standby",
            Some(&format!(
                "To rejoin it as a standby of the new primary, run: bin/rejoin --datadir {} --primary '{peer}' --name {me}",
                actuators::data_directory()
            )),
        );
        Ok(())
    }

    /// Starts the process that rejoins this server as a standby of the new primary once it has
    /// stopped (the fence, next, stops it).
    fn rejoin(&self) -> Result<(), String> {
        let Some(id) = &self.identity else {
            return Err("this node is not identified".into());
        };
        let shown = Conninfo::parse(&id.peer_conninfo)?.redacted();
        // SAFETY: a plain global of the postmaster, set before any worker starts.
        let port = unsafe { pgrx::pg_sys::PostPortNumber };
        let log = crate::rejoin::log_file(port);
        let datadir = actuators::data_directory();
        let pid = crate::rejoin::start(&crate::rejoin::Plan {
            datadir: &datadir,
            primary: &id.peer_conninfo,
            primary_shown: &shown,
            name: id.me_name,
            log: &log,
        })?;
        self.event(
            "rejoin_started",
            Level::Log,
            &format!(
                "auto_rejoin: started the rejoin process (pid {pid}): once this server has stopped, it rewinds it from the new primary ({shown}) and starts it as its standby {}, writing to {}",
                id.me_name,
                log.display()
            ),
            None,
        );
        Ok(())
    }

    fn degrade_to_async(&self) -> Result<(), String> {
        let changed = actuators::degrade_to_async()?;
        // Logical walsenders of failover slots wait for synchronized_standby_slots (17+).
        let slots = changed.slots.as_ref().map(|s| {
            format!(
                "synchronized_standby_slots was '{s}' and is now '', so logical replication no longer waits for the lost standby \
                 (kept in pg_keeper.saved_synchronized_standby_slots)"
            )
        });
        match (&changed.names, slots) {
            (Some(previous), slots) => {
                status::publish_http(|h| h.async_switches_total += 1);
                let slots = slots.map(|s| format!("; {s}")).unwrap_or_default();
                self.event(
                    "degraded_to_async",
                    Level::Log,
                    &format!(
                        "changed replication mode to asynchronous: synchronous_standby_names was '{previous}' and is now '' \
                         (the old value is kept in pg_keeper.saved_synchronous_standby_names){slots}"
                    ),
                    None,
                )
            }
            (None, Some(slots)) => self.event(
                "degraded_to_async",
                Level::Log,
                &format!("synchronous_standby_names is already empty; {slots}"),
                None,
            ),
            (None, None) => self.log(
                Level::Log,
                "synchronous_standby_names is already empty; replication is asynchronous",
                None,
            ),
        }
        Ok(())
    }

    fn run_after_command(&mut self, event: AfterEvent) -> Result<(), String> {
        let Some(command) = self.settings.after_command.clone() else {
            return Ok(());
        };
        let Some(id) = self.identity.clone() else {
            return Err("this node is not identified".into());
        };
        let me = Conninfo::parse(&id.me_conninfo)?;
        let peer = Conninfo::parse(&id.peer_conninfo)?;
        // Where the heartbeats really go, when connected; else what the conninfo says.
        let (peer_host, peer_port) = self
            .peer
            .as_ref()
            .and_then(|p| p.live_address())
            .unwrap_or_else(|| (peer.host(), peer.port()));
        let ctx = Context {
            event: event.as_str(),
            node_name: id.me_name.to_string(),
            node_conninfo: me.redacted(),
            node_host: me.host(),
            node_port: me.port(),
            peer_name: id.peer_name.to_string(),
            peer_conninfo: peer.redacted(),
            peer_host,
            peer_port,
            timeline: actuators::timeline(),
        };
        let pid = self
            .after
            .start(&command, &ctx, self.settings.after_command_timeout)?;
        self.event(
            "after_command",
            Level::Log,
            &format!(
                "running after_command for event {} (pid {pid})",
                event.as_str()
            ),
            None,
        );
        Ok(())
    }

    pub(super) fn reap_after_commands(&mut self) {
        for f in self.after.poll() {
            status::publish_http(|h| {
                h.after_command_runs_total += 1;
                h.after_command_last_exit = f.code;
            });
            let level = if f.success {
                Level::Log
            } else {
                Level::Warning
            };
            self.event(
                "after_command",
                level,
                &format!(
                    "after_command for event {} (pid {}) {}",
                    f.event, f.pid, f.outcome
                ),
                None,
            );
        }
    }
}
