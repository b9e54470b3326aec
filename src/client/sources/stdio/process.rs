//! A child process's life: started in its own process group with `connect`'s own variables
//! removed, fed lines on stdin, its stderr logged, stopped (stdin closed, then SIGKILL to the
//! group after a grace), and reaped; its slot in the source's slots is held until then.

use std::ffi::OsString;
use std::process::Stdio;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command};
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use super::lines::{Line, LineDecoder};
use super::slots::Slot;
use super::{StdioError, StdioSource};

/// Time a child has to exit by itself once its stdin is closed, before its process group gets
/// SIGKILL. The MCP stdio transport asks clients to close stdin first and give the server a
/// moment to clean up (close database connections, remove temporary files).
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Lines queued toward a child's stdin before the tunnel reader waits (backpressure on the
/// agent, never on the child's stdout, so the two pipes cannot deadlock).
const STDIN_QUEUE: usize = 64;

/// Longest stderr line logged; a longer one is logged cut to this length.
const STDERR_LINE_LIMIT: usize = 8 * 1024;

/// The prefix of `connect`'s own environment variables (its tunnel token among them); none of
/// them reaches a child.
const OWN_ENV_PREFIX: &str = "MCP_TUNNEL_";

impl StdioSource {
    /// Starts one child process; at the cap, the process of the least recently used idle
    /// session makes room for it.
    pub(super) async fn spawn(
        &self,
        line_limit: usize,
        context: &str,
    ) -> Result<Process, StdioError> {
        let mut slot = self.slots.reserve_or_reclaim(&self.name).await?;
        let program = &self.command[0];
        let mut command = Command::new(program);
        command
            .args(&self.command[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        for key in own_env_keys(std::env::vars_os().map(|(key, _)| key)) {
            command.env_remove(key);
        }
        let spawn_error = |reason: String| StdioError::Spawn {
            source_name: self.name.to_string(),
            command: program.clone(),
            reason,
        };
        let mut child = command.spawn().map_err(|e| spawn_error(e.to_string()))?;
        let Some(pid) = child.id() else {
            return Err(spawn_error("the process ended at once".into()));
        };
        // Kills a child that will not be used, and reaps it in the background.
        let discard = |child: Child, slot: Slot, error: StdioError| {
            kill_group(pid);
            tokio::spawn(supervise(
                child,
                slot,
                CancellationToken::new(),
                Exit::default(),
                self.name.clone(),
            ));
            Err(error)
        };
        if !slot.attach(pid) {
            // Shutdown began while it started.
            let error = StdioError::ShuttingDown {
                source_name: self.name.to_string(),
            };
            return discard(child, slot, error);
        }
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let error = spawn_error("its standard streams are not available".into());
            return discard(child, slot, error);
        };
        tracing::info!(source = %self.name, pid, context, "stdio process started");
        let (stdin_tx, stdin_rx) = mpsc::channel(STDIN_QUEUE);
        tokio::spawn(write_stdin(stdin, stdin_rx));
        tokio::spawn(log_stderr(stderr, self.name.clone(), pid));
        let stop = CancellationToken::new();
        let exit = Exit::default();
        tokio::spawn(supervise(
            child,
            slot,
            stop.clone(),
            exit.clone(),
            self.name.clone(),
        ));
        Ok(Process {
            pid,
            stdin: Some(stdin_tx),
            stdout: Some(stdout),
            line_limit: line_limit.max(self.max_answer),
            stop,
            exit,
        })
    }
}

/// SIGKILL to the process group `pgid` (each child leads its own group).
pub(super) fn kill_group(pgid: u32) {
    let Ok(pgid) = i32::try_from(pgid) else {
        return;
    };
    if pgid <= 1 {
        return; // never signal "every process" or init
    }
    // SAFETY: kill(2) takes plain integers and touches no memory of ours; a negative pid
    // addresses exactly the process group that the child was placed in at spawn.
    let result = unsafe { libc::kill(-pgid, libc::SIGKILL) };
    if result != 0 {
        // ESRCH: the group is already empty, which is the goal.
        tracing::trace!(pgid, "process group already gone");
    }
}

/// The names among `keys` that are `connect`'s own (its token among them).
fn own_env_keys(keys: impl Iterator<Item = OsString>) -> Vec<OsString> {
    keys.filter(|key| {
        key.to_str()
            .is_some_and(|key| key.to_ascii_uppercase().starts_with(OWN_ENV_PREFIX))
    })
    .collect()
}

/// How a child ended, once it has.
#[derive(Clone, Default)]
pub(super) struct Exit {
    pub(super) dead: CancellationToken,
    status: Arc<OnceLock<String>>,
}

impl Exit {
    pub(super) fn status(&self) -> String {
        self.status
            .get()
            .cloned()
            .unwrap_or_else(|| "status unknown".into())
    }

    pub(super) async fn wait(&self) -> String {
        self.dead.cancelled().await;
        self.status()
    }
}

/// A running child; dropping it stops the child (stdin closed, then SIGKILL after a grace).
pub(super) struct Process {
    pub(super) pid: u32,
    /// Lines for its stdin; `None` once closed.
    pub(super) stdin: Option<mpsc::Sender<Bytes>>,
    pub(super) stdout: Option<ChildStdout>,
    /// The longest stdout line accepted (the tunnel's frame limit).
    pub(super) line_limit: usize,
    stop: CancellationToken,
    pub(super) exit: Exit,
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stdin.take();
        self.stop.cancel();
    }
}

/// Waits for the child, stops it when asked, kills what is left of its group, reaps it.
async fn supervise(
    mut child: Child,
    slot: Slot,
    stop: CancellationToken,
    exit: Exit,
    source: Arc<str>,
) {
    let pid = slot.pid.unwrap_or_default();
    let status = tokio::select! {
        status = child.wait() => status,
        () = stop.cancelled() => match tokio::time::timeout(STOP_GRACE, child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                kill_group(pid);
                child.wait().await
            }
        },
    };
    // Whatever the child left behind in its group (a shell's children, helpers).
    kill_group(pid);
    let status = match status {
        Ok(status) => status.to_string(),
        Err(e) => format!("status unknown ({e})"),
    };
    tracing::debug!(source = %source, pid, %status, "stdio process reaped");
    slot.release_reaped();
    let _ = exit.status.set(status);
    exit.dead.cancel();
}

/// Writes lines to the child's stdin until the queue closes or the pipe breaks.
async fn write_stdin(mut stdin: ChildStdin, mut lines: mpsc::Receiver<Bytes>) {
    /// Lines up to this size are written with their line break in one system call; larger
    /// ones are not copied for it.
    const COALESCE: usize = 64 * 1024;
    while let Some(line) = lines.recv().await {
        let written = async {
            if line.len() < COALESCE {
                let mut buffer = BytesMut::with_capacity(line.len() + 1);
                buffer.extend_from_slice(&line);
                buffer.extend_from_slice(b"\n");
                stdin.write_all(&buffer).await?;
            } else {
                stdin.write_all(&line).await?;
                stdin.write_all(b"\n").await?;
            }
            stdin.flush().await
        }
        .await;
        if let Err(e) = written {
            tracing::debug!(error = %e, "stdio process stdin closed");
            return;
        }
    }
}

/// Logs the child's stderr line by line with the source's name.
async fn log_stderr(stderr: ChildStderr, source: Arc<str>, pid: u32) {
    let mut lines = FramedRead::new(stderr, LineDecoder::new(STDERR_LINE_LIMIT));
    while let Some(Ok(line)) = lines.next().await {
        match line {
            Line::Text(text) => {
                tracing::info!(source = %source, pid, "stderr: {}", String::from_utf8_lossy(&text))
            }
            Line::TooLong => {
                tracing::info!(source = %source, pid, "stderr: (a line over {STDERR_LINE_LIMIT} bytes, not shown)")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connects_own_variables_are_not_inherited() {
        let keys = [
            "PATH",
            "MCP_TUNNEL_TOKEN",
            "mcp_tunnel_other",
            "GITHUB_TOKEN",
        ]
        .map(OsString::from)
        .into_iter();
        assert_eq!(
            own_env_keys(keys),
            vec![
                OsString::from("MCP_TUNNEL_TOKEN"),
                OsString::from("mcp_tunnel_other")
            ]
        );
    }
}
