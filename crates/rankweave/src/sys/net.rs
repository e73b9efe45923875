//! The one connect-and-retry loop: the store client, the TCP mesh and the
//! message queue's remote readers all dial a peer that may not listen yet.

use std::io;
use std::time::{Duration, Instant};

/// First pause after a failed attempt.
const BACKOFF_START: Duration = Duration::from_millis(5);
/// Longest pause between attempts.
const BACKOFF_MAX: Duration = Duration::from_millis(250);

/// Why [`retry_connect`] gave up: the deadline passed.
#[derive(Debug)]
pub(crate) struct GaveUp {
    /// The last attempt's error, if any attempt ran.
    pub last: Option<io::Error>,
    /// How long it tried.
    pub waited: Duration,
}

impl GaveUp {
    /// ` (last error: …)`, or nothing.
    pub fn why(&self) -> String {
        self.last.as_ref().map(|e| format!(" (last error: {e})")).unwrap_or_default()
    }
}

/// Calls `attempt` with the time left (`None`: no deadline) until it
/// succeeds, sleeping with exponential backoff between failures; stops at
/// `deadline`. Each attempt should bound its own blocking by the time left.
pub(crate) fn retry_connect<T>(
    deadline: Option<Instant>,
    mut attempt: impl FnMut(Option<Duration>) -> io::Result<T>,
) -> Result<T, GaveUp> {
    let start = Instant::now();
    let mut backoff = BACKOFF_START;
    let mut last = None;
    loop {
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if left.is_some_and(|l| l.is_zero()) {
            return Err(GaveUp { last, waited: start.elapsed() });
        }
        match attempt(left) {
            Ok(v) => return Ok(v),
            Err(e) => {
                tracing::trace!("connect attempt failed: {e}");
                last = Some(e);
            }
        }
        let left = deadline.map_or(Duration::MAX, |d| d.saturating_duration_since(Instant::now()));
        std::thread::sleep(backoff.min(left));
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_until_success_or_the_deadline() {
        let mut n = 0;
        let v = retry_connect(Some(Instant::now() + Duration::from_secs(5)), |_| {
            n += 1;
            if n < 3 {
                Err(io::Error::from(io::ErrorKind::ConnectionRefused))
            } else {
                Ok(n)
            }
        })
        .unwrap();
        assert_eq!(v, 3);
        let t = Instant::now();
        let e =
            retry_connect::<()>(Some(t + Duration::from_millis(50)), |_| Err(io::ErrorKind::ConnectionRefused.into()))
                .unwrap_err();
        assert!(e.waited >= Duration::from_millis(40) && t.elapsed() < Duration::from_secs(2), "{e:?}");
        assert!(e.why().contains("refused"), "{}", e.why());
    }
}
