//! Blocked `get` and `wait` requests, kept as data rather than as threads.
//!
//! A parked request is a small record (its connection, its deadline and how
//! many keys it still misses) plus its id in the list of every key it
//! missed when it was parked. Each missing key is stored once, however many
//! requests wait for it, so a parked `wait` costs 8 bytes per missing key.
//! Keys present at park time are not checked again later (torch's store
//! has the same rule). A `set` takes its key's list and counts each of
//! those requests down; one that reaches zero is answered.
//!
//! A request that expires or whose client leaves is dropped at once. Its ids
//! in the key lists are dropped lazily (skipped when the key is set); once
//! such stale ids outnumber the live ones the lists are swept, so memory
//! stays proportional to what live requests wait for. Deadlines sit in a
//! heap, swept the same way.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Instant;

/// Identifies a waiter; never reused.
pub(super) type WaiterId = u64;

/// The key-value map of the store.
pub(super) type Map = HashMap<String, Arc<Vec<u8>>>;

/// What a request waits for.
pub(super) enum Want {
    /// One key; the answer is its value.
    Get(String),
    /// Every key of the list.
    Wait(Vec<String>),
}

/// A finished waiter: the connection and what to answer.
pub(super) enum Done {
    /// A `get` found its key.
    Value(u64, Arc<Vec<u8>>),
    /// A `wait` saw all its keys.
    Ready(u64),
}

struct Waiter {
    conn: u64,
    /// Keys still missing.
    missing: usize,
    deadline: Instant,
    /// For a `get`: the key whose value answers it.
    get: Option<String>,
}

/// The registry of blocked requests.
#[derive(Default)]
pub(super) struct Waiters {
    waiters: HashMap<WaiterId, Waiter>,
    by_key: HashMap<String, Vec<WaiterId>>,
    /// Ids in `by_key`, live and stale.
    entries: usize,
    /// Ids in `by_key` of live waiters.
    live_entries: usize,
    deadlines: BinaryHeap<Reverse<(Instant, WaiterId)>>,
    next_id: WaiterId,
}

impl Waiters {
    /// Number of parked requests.
    pub fn len(&self) -> usize {
        self.waiters.len()
    }

    /// The earliest deadline in the heap (maybe of a finished waiter: waking
    /// for it early only costs a look).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.peek().map(|Reverse((t, _))| *t)
    }

    /// Parks `want` for connection `conn` unless it can be answered now, in
    /// which case the answer is returned and nothing is parked.
    pub fn park(&mut self, map: &Map, conn: u64, want: Want, deadline: Instant) -> Result<Done, WaiterId> {
        let id = self.next_id;
        let (keys, get) = match want {
            Want::Get(key) => match map.get(&key) {
                Some(v) => return Ok(Done::Value(conn, Arc::clone(v))),
                None => (vec![key.clone()], Some(key)),
            },
            Want::Wait(keys) => (keys, None),
        };
        let mut n = 0;
        for k in keys {
            if map.contains_key(&k) {
                continue;
            }
            let list = self.by_key.entry(k).or_default();
            // A key listed twice lands on the same list twice in a row.
            if list.last() != Some(&id) {
                list.push(id);
                n += 1;
            }
        }
        if n == 0 {
            return Ok(Done::Ready(conn));
        }
        self.next_id += 1;
        self.entries += n;
        self.live_entries += n;
        self.waiters.insert(id, Waiter { conn, missing: n, deadline, get });
        self.deadlines.push(Reverse((deadline, id)));
        Err(id)
    }

    /// Forgets a waiter (its client left). Unknown ids are ignored.
    pub fn cancel(&mut self, id: WaiterId) {
        self.remove(id);
    }

    fn remove(&mut self, id: WaiterId) -> Option<Waiter> {
        let w = self.waiters.remove(&id)?;
        // Its ids that are still in key lists become stale.
        self.live_entries -= w.missing;
        self.sweep();
        Some(w)
    }

    /// `key` now exists: counts its waiters down and returns those that
    /// are complete.
    pub fn on_set(&mut self, map: &Map, key: &str, done: &mut Vec<Done>) {
        let Some(ids) = self.by_key.remove(key) else { return };
        self.entries -= ids.len();
        for id in ids {
            let Some(w) = self.waiters.get_mut(&id) else { continue };
            w.missing -= 1;
            self.live_entries -= 1;
            if w.missing > 0 {
                continue;
            }
            let conn = w.conn;
            let answer = match w.get.as_deref() {
                Some(k) => map.get(k).map(|v| Done::Value(conn, Arc::clone(v))),
                None => Some(Done::Ready(conn)),
            };
            if let Some(a) = answer {
                self.waiters.remove(&id);
                done.push(a);
            }
        }
        self.sweep();
    }

    /// Removes the waiters whose deadline has passed; returns their connections.
    pub fn expire(&mut self, now: Instant, expired: &mut Vec<u64>) {
        while let Some(Reverse((t, id))) = self.deadlines.peek().copied() {
            if t > now {
                break;
            }
            self.deadlines.pop();
            if self.waiters.get(&id).is_some_and(|w| w.deadline == t) {
                if let Some(w) = self.remove(id) {
                    expired.push(w.conn);
                }
            }
        }
    }

    /// Drops stale ids from the key lists and stale heap entries once they
    /// dominate.
    fn sweep(&mut self) {
        if self.entries > 1024 && self.entries > 2 * self.live_entries {
            let waiters = &self.waiters;
            self.by_key.retain(|_, ids| {
                ids.retain(|id| waiters.contains_key(id));
                !ids.is_empty()
            });
            self.entries = self.by_key.values().map(Vec::len).sum();
            debug_assert_eq!(self.entries, self.live_entries);
            self.live_entries = self.entries;
        }
        if self.deadlines.len() > 1024 && self.deadlines.len() > 2 * self.waiters.len() {
            let waiters = &self.waiters;
            self.deadlines.retain(|Reverse((_, id))| waiters.contains_key(id));
        }
    }

    /// Ids held in key lists (live and stale), for tests.
    #[cfg(test)]
    fn held_entries(&self) -> usize {
        self.by_key.values().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn map(keys: &[&str]) -> Map {
        keys.iter().map(|k| (k.to_string(), Arc::new(k.as_bytes().to_vec()))).collect()
    }

    #[test]
    fn wait_counts_its_missing_keys_down() {
        let far = Instant::now() + Duration::from_secs(60);
        let mut w = Waiters::default();
        let mut m = map(&["a"]);
        let keys = vec!["a".to_string(), "b".into(), "c".into(), "b".into()];
        let id = w.park(&m, 7, Want::Wait(keys), far).err().unwrap();
        assert_eq!((w.len(), w.held_entries()), (1, 2));
        let mut done = Vec::new();
        m.insert("c".into(), Arc::new(vec![]));
        w.on_set(&m, "c", &mut done);
        assert!(done.is_empty());
        m.insert("b".into(), Arc::new(vec![]));
        w.on_set(&m, "b", &mut done);
        assert!(matches!(done.as_slice(), [Done::Ready(7)]));
        assert_eq!((w.len(), w.held_entries()), (0, 0));
        w.cancel(id); // already gone: ignored
    }

    #[test]
    fn cancel_and_expire_free_everything() {
        let now = Instant::now();
        let mut w = Waiters::default();
        let m = map(&[]);
        let mut ids = Vec::new();
        for i in 0..3000 {
            let keys = vec![format!("k{i}"), "shared".into()];
            ids.push(w.park(&m, i, Want::Wait(keys), now + Duration::from_secs(60)).err().unwrap());
        }
        w.park(&m, 9999, Want::Get("k".into()), now).err().unwrap();
        for id in ids {
            w.cancel(id);
        }
        let mut expired = Vec::new();
        w.expire(now, &mut expired);
        assert_eq!(expired, vec![9999]);
        assert_eq!(w.len(), 0);
        // Stale ids were swept down to (at most) the sweep threshold.
        assert!(w.held_entries() <= 1024, "{} ids left", w.held_entries());
        assert!(w.deadlines.len() <= 1024);
    }

    #[test]
    fn present_keys_answer_at_once() {
        let mut w = Waiters::default();
        let m = map(&["x"]);
        let t = Instant::now();
        assert!(matches!(w.park(&m, 3, Want::Get("x".into()), t), Ok(Done::Value(3, _))));
        assert!(matches!(w.park(&m, 3, Want::Wait(vec!["x".into()]), t), Ok(Done::Ready(3))));
        assert!(matches!(w.park(&m, 3, Want::Wait(vec![]), t), Ok(Done::Ready(3))));
        assert_eq!(w.len(), 0);
    }

    #[test]
    fn get_answers_with_the_value() {
        let mut w = Waiters::default();
        let mut m = map(&[]);
        w.park(&m, 4, Want::Get("g".into()), Instant::now() + Duration::from_secs(9)).err().unwrap();
        m.insert("g".into(), Arc::new(b"val".to_vec()));
        let mut done = Vec::new();
        w.on_set(&m, "g", &mut done);
        assert!(matches!(done.as_slice(), [Done::Value(4, v)] if v.as_slice() == b"val"));
    }
}
