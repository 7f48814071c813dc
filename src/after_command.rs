//! `pg_keeper.after_command`: started without waiting for it, watched on every loop, killed
//! (with everything it started) after `pg_keeper.after_command_timeout`. Its output goes to the
//! server log; its environment says what happened and never carries a password.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What the command is told, as `PG_KEEPER_*` environment variables.
#[derive(Clone, Debug)]
pub struct Context {
    pub event: &'static str,
    pub node_name: String,
    pub node_conninfo: String,
    pub node_host: String,
    pub node_port: String,
    pub peer_name: String,
    pub peer_conninfo: String,
    pub peer_host: String,
    pub peer_port: String,
    pub timeline: u32,
}

struct Running {
    child: Child,
    event: &'static str,
    started: Instant,
    timeout: Duration,
}

/// How a command ended, for the log.
pub struct Finished {
    pub event: &'static str,
    pub pid: u32,
    pub outcome: String,
    pub success: bool,
    /// The exit status; 128 + the signal when killed by one; -1 when it could not be waited for.
    pub code: i32,
}

#[derive(Default)]
pub struct AfterCommands {
    running: Vec<Running>,
}

impl AfterCommands {
    pub fn is_running(&self) -> bool {
        !self.running.is_empty()
    }

    /// Starts `command` through `/bin/sh -c` and returns its pid.
    pub fn start(
        &mut self,
        command: &str,
        ctx: &Context,
        timeout: Duration,
    ) -> Result<u32, String> {
        let mut cmd = Command::new("/bin/sh");
        // SAFETY: reset_for_exec makes only async-signal-safe calls.
        unsafe { cmd.pre_exec(crate::sys::reset_for_exec) };
        let child = cmd
            .arg("-c")
            .arg(command)
            .env_remove("PGPASSWORD")
            .env("PG_KEEPER_EVENT", ctx.event)
            .env("PG_KEEPER_NODE_NAME", &ctx.node_name)
            .env("PG_KEEPER_NODE_CONNINFO", &ctx.node_conninfo)
            .env("PG_KEEPER_NODE_HOST", &ctx.node_host)
            .env("PG_KEEPER_NODE_PORT", &ctx.node_port)
            .env("PG_KEEPER_PEER_NAME", &ctx.peer_name)
            .env("PG_KEEPER_PEER_CONNINFO", &ctx.peer_conninfo)
            .env("PG_KEEPER_PEER_HOST", &ctx.peer_host)
            .env("PG_KEEPER_PEER_PORT", &ctx.peer_port)
            .env("PG_KEEPER_TIMELINE", ctx.timeline.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .map_err(|e| format!("could not start /bin/sh: {e}"))?;
        let pid = child.id();
        self.running.push(Running {
            child,
            event: ctx.event,
            started: Instant::now(),
            timeout,
        });
        Ok(pid)
    }

    /// Reaps the commands that ended and kills those past their timeout.
    pub fn poll(&mut self) -> Vec<Finished> {
        let mut done = Vec::new();
        self.running.retain_mut(|r| {
            let pid = r.child.id();
            match r.child.try_wait() {
                Ok(Some(status)) => {
                    let (outcome, success, code) = match (status.code(), status.signal()) {
                        (Some(0), _) => ("exited with status 0".to_string(), true, 0),
                        (Some(code), _) => (format!("exited with status {code}"), false, code),
                        (None, Some(sig)) => (format!("was terminated by signal {sig}"), false, 128 + sig),
                        (None, None) => ("ended".to_string(), false, -1),
                    };
                    done.push(Finished { event: r.event, pid, outcome, success, code });
                    false
                }
                Ok(None) if r.started.elapsed() >= r.timeout => {
                    // The whole process group: the shell and whatever it started.
                    let _ = crate::sys::signal(-(pid as i32), crate::sys::SIGKILL);
                    let _ = r.child.wait();
                    done.push(Finished {
                        event: r.event,
                        pid,
                        outcome: format!(
                            "did not finish within pg_keeper.after_command_timeout ({}s) and was killed",
                            r.timeout.as_secs()
                        ),
                        success: false,
                        code: 128 + crate::sys::SIGKILL,
                    });
                    false
                }
                Ok(None) => true,
                Err(e) => {
                    done.push(Finished { event: r.event, pid, outcome: format!("could not be waited for: {e}"), success: false, code: -1 });
                    false
                }
            }
        });
        done
    }
}
