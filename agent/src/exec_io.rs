//! Running one exec'd child process to completion under a deadline while
//! capturing its stdout and stderr with a byte cap each. Past the cap the
//! output is read and thrown away, so a chatty process never blocks on a full
//! pipe; the truncation is reported. Shared by the runc and process runtimes.

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Child;

use crate::runtime::{ExecOutput, RuntimeError};

/// How long the output pipes may stay open after the process exited (a
/// background grandchild can hold them) before we stop reading.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(500);

/// Bytes read from one stream, up to a cap.
#[derive(Debug, Default)]
pub(crate) struct CappedBuffer {
    pub(crate) bytes: Vec<u8>,
    pub(crate) cap: usize,
    pub(crate) truncated: bool,
}

impl CappedBuffer {
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            bytes: Vec::new(),
            cap,
            truncated: false,
        }
    }

    pub(crate) fn push(&mut self, chunk: &[u8]) {
        let room = self.cap.saturating_sub(self.bytes.len());
        if chunk.len() > room {
            self.truncated = true;
        }
        let keep = chunk.len().min(room);
        self.bytes.extend_from_slice(&chunk[..keep]);
    }
}

/// Reads `reader` to its end into `buf`, discarding past the cap.
pub(crate) async fn read_capped<R: AsyncRead + Unpin>(reader: Option<R>, buf: &mut CappedBuffer) {
    let Some(mut reader) = reader else { return };
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.push(&chunk[..n]),
        }
    }
}

/// The exit code of a finished process: its code, or 128 + the signal that
/// ended it (the shell convention).
pub(crate) fn exit_code_of(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

/// Waits for `child` (spawned with piped stdout and stderr) until `timeout`.
/// On timeout, `on_timeout` runs (to kill whatever the child started, e.g. a
/// process group or the process inside a container), then the child itself is
/// killed, and the output so far is returned with `timed_out` and exit code -1.
pub(crate) async fn collect(
    mut child: Child,
    timeout: Duration,
    max_output_bytes: usize,
    on_timeout: impl FnOnce(),
) -> Result<ExecOutput, RuntimeError> {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let mut out = CappedBuffer::new(max_output_bytes);
    let mut err = CappedBuffer::new(max_output_bytes);

    let mut status: Option<std::io::Result<ExitStatus>> = None;
    let mut timed_out = false;
    {
        let reads = async {
            tokio::join!(read_capped(stdout, &mut out), read_capped(stderr, &mut err));
        };
        tokio::pin!(reads);
        let mut reads_done = false;
        let mut drain_deadline: Option<tokio::time::Instant> = None;
        loop {
            if status.is_some() && reads_done {
                break;
            }
            let drain_until = drain_deadline.unwrap_or(deadline);
            tokio::select! {
                s = child.wait(), if status.is_none() => {
                    status = Some(s);
                    drain_deadline = Some(
                        (tokio::time::Instant::now() + DRAIN_AFTER_EXIT).min(deadline),
                    );
                }
                _ = &mut reads, if !reads_done => reads_done = true,
                _ = tokio::time::sleep_until(drain_until), if drain_deadline.is_some() => break,
                _ = tokio::time::sleep_until(deadline) => {
                    timed_out = status.is_none();
                    break;
                }
            }
        }
    }

    if timed_out {
        on_timeout();
        let _ = child.start_kill();
        // Bounded: a killed child is reaped promptly.
        let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    }
    let exit_code = match status {
        _ if timed_out => -1,
        Some(Ok(s)) => exit_code_of(s),
        Some(Err(e)) => return Err(RuntimeError::runtime("waiting for the exec", e)),
        None => -1,
    };
    Ok(ExecOutput {
        exit_code,
        stdout: out.bytes,
        stderr: err.bytes,
        stdout_truncated: out.truncated,
        stderr_truncated: err.truncated,
        duration: started.elapsed(),
        timed_out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;

    #[test]
    fn capped_buffers_keep_the_first_bytes_and_flag_the_rest() {
        let mut b = CappedBuffer::new(5);
        b.push(b"abc");
        assert!(!b.truncated);
        b.push(b"defg");
        assert_eq!(b.bytes, b"abcde");
        assert!(b.truncated);
        b.push(b"h");
        assert_eq!(b.bytes, b"abcde");
        let mut exact = CappedBuffer::new(3);
        exact.push(b"abc");
        assert!(!exact.truncated, "exactly the cap is not truncated");
    }

    fn sh(script: &str) -> Child {
        let mut cmd = tokio::process::Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd.spawn().expect("spawn /bin/sh")
    }

    #[tokio::test]
    async fn output_past_the_cap_is_drained_and_flagged() {
        // 1 MiB on stdout: far more than a pipe buffer, so the child would
        // block forever if the excess were not read.
        let child = sh("head -c 1048576 /dev/zero; echo err >&2; exit 4");
        let out = collect(child, Duration::from_secs(30), 1000, || {})
            .await
            .expect("collect");
        assert_eq!(out.exit_code, 4);
        assert_eq!(out.stdout.len(), 1000);
        assert!(out.stdout_truncated);
        assert_eq!(out.stderr, b"err\n");
        assert!(!out.stderr_truncated);
        assert!(!out.timed_out);
    }

    #[tokio::test]
    async fn a_command_past_its_timeout_is_killed() {
        let child = sh("echo started; exec sleep 30");
        let mut killed = false;
        let out = collect(child, Duration::from_millis(300), 1000, || killed = true)
            .await
            .expect("collect");
        assert!(out.timed_out);
        assert!(killed);
        assert_eq!(out.exit_code, -1);
        assert_eq!(out.stdout, b"started\n");
        assert!(out.duration < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn a_background_grandchild_holding_the_pipe_does_not_hang_the_exec() {
        let child = sh("sleep 3 & echo done");
        let out = collect(child, Duration::from_secs(20), 1000, || {})
            .await
            .expect("collect");
        assert!(!out.timed_out);
        assert_eq!(out.exit_code, 0);
        assert_eq!(out.stdout, b"done\n");
        assert!(out.duration < Duration::from_secs(10));
    }
}
