//! Store-based arrival counting: how `new_group` synchronizes all ranks of
//! the parent group and how a rank hosting the store waits for the others to
//! leave before it takes the store down.

use crate::error::{Error, Result};
use crate::store::Store;
use std::time::{Duration, Instant};

/// Why [`arrive`] gave up waiting.
pub(crate) struct Absent {
    /// How long it waited.
    pub waited: Duration,
    /// The ranks that had not arrived.
    pub ranks: Vec<usize>,
}

/// Records that `rank` of `size` arrived at `base`: its own mark (so
/// absentees can be named) and the count; the last arrival sets the key
/// [`wait_all`] waits on.
pub(crate) fn mark(store: &dyn Store, base: &str, rank: usize, size: usize) -> Result<()> {
    store.set(&format!("{base}/{rank}"), b"")?;
    if store.add(base, 1)? >= size as i64 {
        store.set(&format!("{base}/all"), b"")?;
    }
    Ok(())
}

/// Waits until all `size` ranks have [`mark`]ed `base`, or [`Absent`] after
/// `timeout`.
pub(crate) fn wait_all(
    store: &dyn Store,
    base: &str,
    size: usize,
    timeout: Duration,
) -> Result<std::result::Result<(), Absent>> {
    let start = Instant::now();
    match store.get_timeout(&format!("{base}/all"), timeout) {
        Ok(_) => Ok(Ok(())),
        Err(Error::Timeout { .. }) => {
            let ranks = (0..size).filter(|r| !store.check(&[&format!("{base}/{r}")]).unwrap_or(true)).collect();
            Ok(Err(Absent { waited: start.elapsed(), ranks }))
        }
        Err(e) => Err(e),
    }
}

/// [`mark`], then [`wait_all`].
pub(crate) fn arrive(
    store: &dyn Store,
    base: &str,
    rank: usize,
    size: usize,
    timeout: Duration,
) -> Result<std::result::Result<(), Absent>> {
    mark(store, base, rank, size)?;
    wait_all(store, base, size, timeout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::HashStore;
    use std::sync::Arc;

    #[test]
    fn everyone_arrives_or_the_absent_are_named() {
        let store = Arc::new(HashStore::new());
        let hs: Vec<_> = (0..3)
            .map(|r| {
                let s = store.clone();
                std::thread::spawn(move || arrive(&*s, "b", r, 3, Duration::from_secs(10)).unwrap().is_ok())
            })
            .collect();
        assert!(hs.into_iter().all(|h| h.join().unwrap()));
        mark(&*store, "c", 2, 3).unwrap();
        let absent = arrive(&*store, "c", 0, 3, Duration::from_millis(50)).unwrap().err().unwrap();
        assert_eq!(absent.ranks, vec![1]);
        assert!(absent.waited >= Duration::from_millis(50));
    }
}
