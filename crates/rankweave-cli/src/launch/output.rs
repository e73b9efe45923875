//! Forwarding worker output to the launcher's stdout and stderr.
//!
//! One thread per worker stream reads the pipe and writes whole lines, each
//! prefixed with `[rank] `, to the launcher's stream while holding that
//! stream's lock, so lines of different workers never interleave. A final
//! line without a newline still gets printed (with a newline added); a line
//! longer than [`MAX_LINE`] bytes is cut into pieces of that size so a
//! worker cannot make the launcher buffer without bound.

use std::io::{self, Read, Write};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Longest run of bytes without a newline that is buffered before it is
/// printed as a line of its own.
pub const MAX_LINE: usize = 1 << 20;

/// Which of the launcher's streams a worker stream goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The launcher's stdout.
    Stdout,
    /// The launcher's stderr.
    Stderr,
}

/// Writes `bytes` to `stream` in one locked write and flushes. Errors (a
/// closed pipe downstream) are ignored: the job keeps running regardless.
pub fn write_whole(stream: Stream, bytes: &[u8]) {
    match stream {
        Stream::Stdout => {
            let mut out = io::stdout().lock();
            let _ = out.write_all(bytes).and_then(|()| out.flush());
        }
        Stream::Stderr => {
            let mut out = io::stderr().lock();
            let _ = out.write_all(bytes).and_then(|()| out.flush());
        }
    }
}

/// Prints one `rankweave launch: ...` line to stderr.
pub fn message(text: &str) {
    write_whole(Stream::Stderr, format!("rankweave launch: {text}\n").as_bytes());
}

/// Appends every line of `lines` (which ends with a newline, or is a final
/// fragment) to `out`, each preceded by `prefix`; adds a missing final newline.
fn prefix_lines(prefix: &[u8], lines: &[u8], out: &mut Vec<u8>) {
    for line in lines.split_inclusive(|&b| b == b'\n') {
        out.extend_from_slice(prefix);
        out.extend_from_slice(line);
    }
    if lines.last() != Some(&b'\n') {
        out.push(b'\n');
    }
}

/// Copies `src` to `stream` line by line with `prefix` in front of each line,
/// until end of file or a read error.
pub fn pump(mut src: impl Read, stream: Stream, prefix: &[u8]) {
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::new();
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        pending.extend_from_slice(&buf[..n]);
        // Everything up to the last newline goes out in one write.
        let mut cut = pending.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if cut == 0 && pending.len() >= MAX_LINE {
            cut = MAX_LINE;
        }
        if cut > 0 {
            out.clear();
            prefix_lines(prefix, &pending[..cut], &mut out);
            write_whole(stream, &out);
            pending.drain(..cut);
        }
    }
    if !pending.is_empty() {
        out.clear();
        prefix_lines(prefix, &pending, &mut out);
        write_whole(stream, &out);
    }
}

/// The forwarding threads of one job.
#[derive(Debug)]
pub struct Forwarders {
    done_tx: mpsc::Sender<()>,
    done_rx: mpsc::Receiver<()>,
    running: usize,
}

impl Default for Forwarders {
    fn default() -> Self {
        Self::new()
    }
}

impl Forwarders {
    /// No threads yet.
    pub fn new() -> Self {
        let (done_tx, done_rx) = mpsc::channel();
        Forwarders { done_tx, done_rx, running: 0 }
    }

    /// Starts a thread pumping `src` to `stream` with `[rank] ` prefixes
    /// (none when `prefix` is false).
    pub fn spawn(&mut self, src: impl Read + Send + 'static, stream: Stream, rank: usize, prefix: bool) {
        let tag = if prefix { format!("[{rank}] ").into_bytes() } else { Vec::new() };
        let done = self.done_tx.clone();
        let name = format!("rank{rank}-{}", if stream == Stream::Stdout { "out" } else { "err" });
        let spawned = thread::Builder::new().name(name).spawn(move || {
            pump(src, stream, &tag);
            let _ = done.send(());
        });
        match spawned {
            Ok(_) => self.running += 1,
            Err(e) => tracing::warn!("cannot start an output thread for rank {rank}: {e}; its output is dropped"),
        }
    }

    /// Waits until every thread has seen end of file, or `limit` passes (a
    /// process outside the workers' process groups may still hold a pipe).
    /// Returns whether all finished.
    pub fn finish(mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.running > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.done_rx.recv_timeout(left) {
                Ok(()) => self.running -= 1,
                Err(_) => {
                    tracing::warn!("{} output streams still open after the workers ended; not waiting", self.running);
                    return false;
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_each_line_and_terminates_fragment() {
        let mut out = Vec::new();
        prefix_lines(b"[2] ", b"a\nbb\n", &mut out);
        assert_eq!(out, b"[2] a\n[2] bb\n");
        out.clear();
        prefix_lines(b"[0] ", b"x\ntail", &mut out);
        assert_eq!(out, b"[0] x\n[0] tail\n");
        out.clear();
        prefix_lines(b"", b"\n", &mut out);
        assert_eq!(out, b"\n");
    }
}
