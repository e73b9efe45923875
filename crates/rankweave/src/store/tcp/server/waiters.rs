//! Blocked `get` and `wait` requests, kept as data rather than as threads.
//!
//! A waiter is registered under exactly one key, the first one it still
//! misses. When that key is set the waiter looks further along its list
//! (keys present since are skipped) and either completes or moves to the
//! next missing key, so a `wait` on `n` keys costs `O(n)` over its whole
//! life, not `O(n)` per `set`, and every `set` touches only the waiters of
//! its own key. Each waiter has a deadline (the client's timeout, capped by
//! the server); an expired or cancelled waiter (its client left) is removed
//! at once, along with its entry under its key. Deadlines sit in a heap;
//! entries of waiters that finished early are skipped when they come up, and
//! the heap is rebuilt when such entries outnumber the live ones.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Instant;

/// Identifies a waiter; never reused.
pub(super) type WaiterId = u64;

/// The key-value map of the store.
pub(super) type Map = HashMap<String, Arc<Vec<u8>>>;

/// What a waiter waits for.
pub(super) enum Want {
    /// One key; the answer is its value.
    Get(String),
    /// Every key of the list; `next` is the first one not yet seen present.
    Wait {
        /// The keys.
        keys: Vec<String>,
        /// Index of the key it is registered under.
        next: usize,
    },
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
    want: Want,
    deadline: Instant,
}

impl Waiter {
    fn key(&self) -> &str {
        match &self.want {
            Want::Get(k) => k,
            Want::Wait { keys, next } => keys.get(*next).map_or("", String::as_str),
        }
    }
}

/// The registry of blocked requests.
#[derive(Default)]
pub(super) struct Waiters {
    waiters: HashMap<WaiterId, Waiter>,
    by_key: HashMap<String, Vec<WaiterId>>,
    deadlines: BinaryHeap<Reverse<(Instant, WaiterId)>>,
    next_id: WaiterId,
}

/// Index of the first key of `keys[from..]` missing from `map` (`keys.len()` if none).
fn first_missing(map: &Map, keys: &[String], from: usize) -> usize {
    keys.iter().skip(from).position(|k| !map.contains_key(k)).map_or(keys.len(), |p| p + from)
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
        let want = match want {
            Want::Get(key) => match map.get(&key) {
                Some(v) => return Ok(Done::Value(conn, Arc::clone(v))),
                None => Want::Get(key),
            },
            Want::Wait { keys, .. } => {
                let next = first_missing(map, &keys, 0);
                if next == keys.len() {
                    return Ok(Done::Ready(conn));
                }
                Want::Wait { keys, next }
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        let w = Waiter { conn, want, deadline };
        self.by_key.entry(w.key().to_owned()).or_default().push(id);
        self.waiters.insert(id, w);
        self.deadlines.push(Reverse((deadline, id)));
        Err(id)
    }

    /// Removes a waiter from the list of the key it is registered under.
    fn unlink(&mut self, id: WaiterId, key: &str) {
        if let Some(list) = self.by_key.get_mut(key) {
            if let Some(p) = list.iter().position(|w| *w == id) {
                list.swap_remove(p);
            }
            if list.is_empty() {
                self.by_key.remove(key);
            }
        }
    }

    /// Forgets a waiter (its client left). Unknown ids are ignored.
    pub fn cancel(&mut self, id: WaiterId) {
        if let Some(w) = self.waiters.remove(&id) {
            let key = w.key().to_owned();
            self.unlink(id, &key);
        }
        self.compact();
    }

    /// `key` now exists: wakes its waiters. Those that are complete are
    /// returned; the others move on to their next missing key.
    pub fn on_set(&mut self, map: &Map, key: &str, done: &mut Vec<Done>) {
        let Some(ids) = self.by_key.remove(key) else { return };
        for id in ids {
            let Some(mut w) = self.waiters.remove(&id) else { continue };
            match &mut w.want {
                Want::Get(k) => match map.get(k.as_str()) {
                    Some(v) => done.push(Done::Value(w.conn, Arc::clone(v))),
                    None => {
                        self.waiters.insert(id, w);
                    }
                },
                Want::Wait { keys, next } => {
                    *next = first_missing(map, keys, *next);
                    if *next == keys.len() {
                        // A key passed earlier may have been deleted since:
                        // answer only when all of them exist now.
                        *next = first_missing(map, keys, 0);
                    }
                    if *next == keys.len() {
                        done.push(Done::Ready(w.conn));
                    } else {
                        let k = w.key().to_owned();
                        self.by_key.entry(k).or_default().push(id);
                        self.waiters.insert(id, w);
                    }
                }
            }
        }
        self.compact();
    }

    /// Removes the waiters whose deadline has passed; returns their connections.
    pub fn expire(&mut self, now: Instant, expired: &mut Vec<u64>) {
        while let Some(Reverse((t, id))) = self.deadlines.peek().copied() {
            if t > now {
                break;
            }
            self.deadlines.pop();
            if self.waiters.get(&id).is_some_and(|w| w.deadline == t) {
                if let Some(w) = self.waiters.remove(&id) {
                    let key = w.key().to_owned();
                    self.unlink(id, &key);
                    expired.push(w.conn);
                }
            }
        }
    }

    /// Drops heap entries of finished waiters once they dominate the heap.
    fn compact(&mut self) {
        if self.deadlines.len() > 1024 && self.deadlines.len() > 2 * self.waiters.len() {
            let waiters = &self.waiters;
            self.deadlines.retain(|Reverse((_, id))| waiters.contains_key(id));
        }
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
    fn wait_moves_along_its_keys() {
        let far = Instant::now() + Duration::from_secs(60);
        let mut w = Waiters::default();
        let mut m = map(&["a"]);
        let keys = vec!["a".to_string(), "b".into(), "c".into()];
        let id = w.park(&m, 7, Want::Wait { keys, next: 0 }, far).err().unwrap();
        assert_eq!(w.len(), 1);
        let mut done = Vec::new();
        m.insert("c".into(), Arc::new(vec![]));
        w.on_set(&m, "c", &mut done); // registered under b, not c
        assert!(done.is_empty());
        m.insert("b".into(), Arc::new(vec![]));
        w.on_set(&m, "b", &mut done);
        assert!(matches!(done.as_slice(), [Done::Ready(7)]));
        assert_eq!(w.len(), 0);
        assert!(w.by_key.is_empty());
        w.cancel(id); // already gone: ignored
    }

    #[test]
    fn cancel_and_expire_free_everything() {
        let now = Instant::now();
        let mut w = Waiters::default();
        let m = map(&[]);
        let a = w.park(&m, 1, Want::Get("k".into()), now + Duration::from_secs(60)).err().unwrap();
        w.park(&m, 2, Want::Get("k".into()), now).err().unwrap();
        w.cancel(a);
        let mut expired = Vec::new();
        w.expire(now, &mut expired);
        assert_eq!(expired, vec![2]);
        assert_eq!(w.len(), 0);
        assert!(w.by_key.is_empty());
    }

    #[test]
    fn present_keys_answer_at_once() {
        let mut w = Waiters::default();
        let m = map(&["x"]);
        let t = Instant::now();
        assert!(matches!(w.park(&m, 3, Want::Get("x".into()), t), Ok(Done::Value(3, _))));
        assert!(matches!(w.park(&m, 3, Want::Wait { keys: vec![], next: 0 }, t), Ok(Done::Ready(3))));
        assert_eq!(w.len(), 0);
    }
}
