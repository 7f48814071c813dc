//! `pg_keeper.auto_rejoin`: a superseded primary brings itself back as a standby of the new
//! primary. It must be rewound while its server is stopped, so the keeper starts a small
//! process of its own in a session of its own (it outlives the server's shutdown): it waits,
//! bounded, for the server to stop, then runs `bin/rejoin` (the very script an operator runs,
//! compiled in, not a copy) under a time limit and a lock on the data directory (never two at
//! once), and writes what it does to the server's log file. If `pg_rewind` cannot work it
//! leaves the server stopped and says what to run; it never copies the whole primary.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use pgrx::pg_sys;

/// The script an operator runs after a failover (bin/rejoin).
const REJOIN_SCRIPT: &str = include_str!("../bin/rejoin");

/// How long the whole rejoin may take, the rewind and the start included.
const TIME_LIMIT_S: u32 = 600;

/// The process that outlives the server: bounded waits, one at a time, lines in the log's
/// format. `$1`..: nothing; everything comes in the environment (no password on a command
/// line that `ps` shows).
const SUPERVISOR: &str = r#"set -u
line() { printf '%s [%d] %s:  pg_keeper: auto_rejoin: %s\n' "$(date -u '+%Y-%m-%d %H:%M:%S.%3N UTC')" "$$" "$1" "$2"; }
i=0
while kill -0 "$PGK_POSTMASTER" 2>/dev/null; do
  i=$((i + 1))
  if [ "$i" -gt 1200 ]; then
    line WARNING "the server did not stop within 120 s; not rejoining"
    exit 1
  fi
  sleep 0.1
done
line LOG "the server has stopped; rewinding it from the new primary $PGK_PRIMARY_SHOWN and starting it as its standby $PGK_NAME"
set -o pipefail
timeout -k 10 "$PGK_TIME_LIMIT" flock -n -E 75 "$PGK_DATADIR" \
  bash -c "$PGK_REJOIN_SCRIPT" rejoin --datadir "$PGK_DATADIR" --primary "$PGK_PRIMARY" --name "$PGK_NAME" --log "$PGK_LOG" 2>&1 \
  | while IFS= read -r l; do line LOG "$l"; done
rc=$?
case $rc in
  0) line LOG "done: this server is a standby of $PGK_PRIMARY_SHOWN again" ;;
  75) line WARNING "another rejoin of $PGK_DATADIR is running; not starting a second one" ;;
  124|137) line WARNING "gave up after $PGK_TIME_LIMIT s; the server may be stopped. HINT:  Look at the lines above, then run: bin/rejoin --datadir $PGK_DATADIR --primary '$PGK_PRIMARY_SHOWN' --name $PGK_NAME" ;;
  *) line WARNING "failed (exit status $rc); the server stays stopped. HINT:  Look at the lines above. If pg_rewind cannot rewind this data directory, copy the whole primary (this replaces the data directory): bin/rejoin --datadir $PGK_DATADIR --primary '$PGK_PRIMARY_SHOWN' --name $PGK_NAME --basebackup" ;;
esac
exit "$rc"
"#;

/// Where the rejoin writes: the server's log file when the server logs to a file through its
/// standard error (`pg_ctl -l`), else a file of its own in the temporary directory.
pub fn log_file(port: i32) -> PathBuf {
    std::fs::read_link("/proc/self/fd/2")
        .ok()
        .filter(|p| p.is_file())
        .unwrap_or_else(|| std::env::temp_dir().join(format!("pg_keeper_rejoin_{port}.log")))
}

/// The directory of this server's programs (pg_ctl, pg_rewind beside postgres).
fn bin_dir() -> PathBuf {
    // SAFETY: my_exec_path is a NUL-terminated path set at the postmaster's start.
    let exe = unsafe { std::ffi::CStr::from_ptr((&raw const pg_sys::my_exec_path).cast()) };
    Path::new(&*exe.to_string_lossy()).parent().map_or_else(
        || PathBuf::from("/usr/lib/postgresql/15/bin"),
        Path::to_path_buf,
    )
}

/// What the rejoin needs.
pub struct Plan<'a> {
    pub datadir: &'a str,
    /// The new primary's conninfo (it may hold a password: passed in the environment only).
    pub primary: &'a str,
    /// The same without any password, for the log.
    pub primary_shown: &'a str,
    /// This node's name: the application_name it streams under.
    pub name: &'a str,
    pub log: &'a Path,
}

/// Starts the rejoin process and returns its pid; it runs on after this server stops.
pub fn start(plan: &Plan) -> Result<u32, String> {
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(plan.log)
        .map_err(|e| format!("could not open \"{}\": {e}", plan.log.display()))?;
    let err = out
        .try_clone()
        .map_err(|e| format!("could not open \"{}\": {e}", plan.log.display()))?;
    // SAFETY: postmaster_pid is set before any worker starts.
    let postmaster = unsafe { pg_sys::PostmasterPid };
    let mut cmd = Command::new("/bin/bash");
    // SAFETY: only async-signal-safe calls: the signal state is reset and the child leaves the
    // server's session, so that the postmaster's shutdown does not reach it.
    unsafe {
        cmd.pre_exec(|| {
            crate::sys::reset_for_exec()?;
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let child = cmd
        .arg("-c")
        .arg(SUPERVISOR)
        .arg("pg_keeper_rejoin")
        .env_remove("PGPASSWORD")
        .env("PGBIN", bin_dir())
        .env("PGK_POSTMASTER", postmaster.to_string())
        .env("PGK_DATADIR", plan.datadir)
        .env("PGK_PRIMARY", plan.primary)
        .env("PGK_PRIMARY_SHOWN", plan.primary_shown)
        .env("PGK_NAME", plan.name)
        .env("PGK_LOG", plan.log)
        .env("PGK_TIME_LIMIT", TIME_LIMIT_S.to_string())
        .env("PGK_REJOIN_SCRIPT", REJOIN_SCRIPT)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .map_err(|e| format!("could not start /bin/bash: {e}"))?;
    Ok(child.id())
}
