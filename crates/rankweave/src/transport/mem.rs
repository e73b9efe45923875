//! In-process transport: the ranks of a group are threads of one process.
//!
//! Each ordered pair (src, dst) has its own FIFO queue guarded by a mutex and
//! a condition variable. `send` copies the bytes into the queue and never
//! blocks, so `send_recv` (send, then receive) cannot deadlock however large
//! the buffers. `recv` waits for the head of the queue until the deadline and
//! checks it against the expected tag and length, exactly as the TCP
//! transport checks its headers, so algorithm tests over this transport see
//! the same errors. Dropping a [`MemTransport`] marks its rank gone: peers
//! waiting on it get [`Error::PeerLost`].

use super::{OpDesc, Tag, Transport};
use crate::error::{Context, Error, Result};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

struct Message {
    tag: Tag,
    data: Vec<u8>,
    /// A probe: the sender waits for this rank in collective `tag` (as the
    /// TCP transport's PROBE frame).
    probe: bool,
}

/// How long a collective's receive waits before probing its peer.
const PROBE_AFTER: std::time::Duration = std::time::Duration::from_millis(20);

fn collective(t: &Tag) -> bool {
    t.op != super::OpCode::SendRecv && !t.desc.is_none()
}

#[derive(Default)]
struct Queue {
    messages: Mutex<VecDeque<Message>>,
    arrived: Condvar,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, VecDeque<Message>> {
        // A panic in another rank's thread cannot leave the queue half-updated.
        self.messages.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Mesh {
    size: usize,
    name: String,
    /// `queues[src * size + dst]`.
    queues: Vec<Queue>,
    /// False once that rank's transport was dropped.
    alive: Vec<AtomicBool>,
}

/// One rank's end of an in-process mesh; see the module docs.
pub struct MemTransport {
    rank: usize,
    mesh: Arc<Mesh>,
    /// The collective this rank runs or last ran: (sequence, descriptor).
    current: Mutex<(u64, OpDesc)>,
    /// `last_sent[p]`: the sequence number of the last collective that sent `p` a message.
    last_sent: Vec<AtomicU64>,
}

impl std::fmt::Debug for MemTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemTransport")
            .field("rank", &self.rank)
            .field("size", &self.mesh.size)
            .field("group", &self.mesh.name)
            .finish()
    }
}

impl MemTransport {
    /// Creates the `n` connected ends of a group named `group_name`; element
    /// `r` is rank `r`'s transport (move it to that rank's thread).
    pub fn mesh(n: usize, group_name: &str) -> Vec<MemTransport> {
        let mesh = Arc::new(Mesh {
            size: n,
            name: group_name.to_string(),
            queues: (0..n * n).map(|_| Queue::default()).collect(),
            alive: (0..n).map(|_| AtomicBool::new(true)).collect(),
        });
        (0..n)
            .map(|rank| MemTransport {
                rank,
                mesh: mesh.clone(),
                current: Mutex::new((0, OpDesc::NONE)),
                last_sent: (0..n).map(|_| AtomicU64::new(0)).collect(),
            })
            .collect()
    }

    fn ctx(&self, tag: Tag, peer: usize) -> Context {
        Context::new(tag.op.name(), self.mesh.name.clone(), self.rank).with_peer(peer)
    }

    fn check_peer(&self, peer: usize, tag: Tag) -> Result<()> {
        if peer >= self.mesh.size || peer == self.rank {
            return Err(Error::invalid(format!(
                "{}: peer rank {peer} is not another rank of group {} (size {}, this rank {})",
                tag.op.name(),
                self.mesh.name,
                self.mesh.size,
                self.rank
            )));
        }
        Ok(())
    }
}

impl MemTransport {
    /// Marks this rank gone: peers waiting on it get [`Error::PeerLost`].
    /// Dropping the transport does the same. Idempotent.
    pub fn leave(&self) {
        // Release pairs with the Acquire load in `recv`; the queue lock taken
        // before notifying orders this against a waiter's check.
        self.mesh.alive[self.rank].store(false, Ordering::Release);
        for dst in 0..self.mesh.size {
            let q = &self.mesh.queues[self.rank * self.mesh.size + dst];
            let _guard = q.lock();
            q.arrived.notify_all();
        }
    }
}

impl Drop for MemTransport {
    fn drop(&mut self) {
        self.leave();
    }
}

impl Transport for MemTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.mesh.size
    }

    fn group_name(&self) -> &str {
        &self.mesh.name
    }

    fn send(&self, peer: usize, tag: Tag, data: &[u8], _deadline: Instant) -> Result<()> {
        self.check_peer(peer, tag)?;
        if !self.mesh.alive[peer].load(Ordering::Acquire) {
            return Err(Error::PeerLost { ctx: self.ctx(tag, peer), detail: "peer transport was dropped".into() });
        }
        if collective(&tag) {
            *self.current.lock().unwrap_or_else(|e| e.into_inner()) = (tag.seq, tag.desc);
            self.last_sent[peer].store(tag.seq, Ordering::Relaxed);
        }
        let q = &self.mesh.queues[self.rank * self.mesh.size + peer];
        q.lock().push_back(Message { tag, data: data.to_vec(), probe: false });
        q.arrived.notify_all();
        Ok(())
    }

    fn recv(&self, peer: usize, tag: Tag, buf: &mut [u8], deadline: Instant) -> Result<()> {
        self.check_peer(peer, tag)?;
        let start = Instant::now();
        if collective(&tag) {
            *self.current.lock().unwrap_or_else(|e| e.into_inner()) = (tag.seq, tag.desc);
        }
        let mut probed = !collective(&tag);
        let q = &self.mesh.queues[peer * self.mesh.size + self.rank];
        let mut guard = q.lock();
        let msg = loop {
            if let Some(m) = guard.pop_front() {
                if !m.probe {
                    break m;
                }
                let (seq, desc) = *self.current.lock().unwrap_or_else(|e| e.into_inner());
                if m.tag.seq < seq && self.last_sent[peer].load(Ordering::Relaxed) < m.tag.seq {
                    return Err(Error::Mismatch {
                        ctx: self.ctx(tag, peer),
                        detail: format!(
                            "rank {peer} waits in {} (seq {}) for data from rank {}, which finished that \
                             collective without sending it any",
                            m.tag.desc, m.tag.seq, self.rank
                        ),
                    });
                }
                if m.tag.seq == seq && m.tag.desc != desc && !desc.is_none() {
                    return Err(Error::Mismatch {
                        ctx: self.ctx(tag, peer),
                        detail: format!(
                            "rank {peer} waits in {} (seq {seq}), rank {} called {desc}",
                            m.tag.desc, self.rank
                        ),
                    });
                }
                continue;
            }
            if !probed && start.elapsed() >= PROBE_AFTER {
                probed = true;
                // Never hold two queue locks at once (the peer may be probing us).
                drop(guard);
                let back = &self.mesh.queues[self.rank * self.mesh.size + peer];
                back.lock().push_back(Message { tag, data: Vec::new(), probe: true });
                back.arrived.notify_all();
                guard = q.lock();
                continue;
            }
            if !self.mesh.alive[peer].load(Ordering::Acquire) {
                return Err(Error::PeerLost {
                    ctx: self.ctx(tag, peer),
                    detail: format!("peer transport was dropped while {} bytes were expected", buf.len()),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::timeout(
                    self.ctx(tag, peer),
                    now - start,
                    format!("{} bytes of {} seq {} from rank {peer}", buf.len(), tag.op.name(), tag.seq),
                ));
            }
            let wake = if probed { deadline } else { deadline.min(start + PROBE_AFTER) };
            guard =
                q.arrived.wait_timeout(guard, wake.saturating_duration_since(now)).unwrap_or_else(|e| e.into_inner()).0;
        };
        drop(guard);
        if msg.tag.desc != tag.desc {
            return Err(Error::Mismatch {
                ctx: self.ctx(tag, peer),
                detail: format!(
                    "rank {peer} called {}, rank {} called {} (seq {})",
                    msg.tag.desc, self.rank, tag.desc, tag.seq
                ),
            });
        }
        if msg.tag != tag || msg.data.len() != buf.len() {
            return Err(Error::Mismatch {
                ctx: self.ctx(tag, peer),
                detail: format!(
                    "rank {} expected {} seq {} with {} bytes from rank {peer}, but rank {peer} sent {} seq {} with {} bytes",
                    self.rank,
                    tag.op.name(),
                    tag.seq,
                    buf.len(),
                    msg.tag.op.name(),
                    msg.tag.seq,
                    msg.data.len()
                ),
            });
        }
        buf.copy_from_slice(&msg.data);
        Ok(())
    }

    fn send_recv(
        &self,
        to: usize,
        send_tag: Tag,
        data: &[u8],
        from: usize,
        recv_tag: Tag,
        buf: &mut [u8],
        deadline: Instant,
    ) -> Result<()> {
        // `send` never blocks, so sending first cannot deadlock.
        self.send(to, send_tag, data, deadline)?;
        self.recv(from, recv_tag, buf, deadline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::OpCode;
    use std::time::Duration;

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    #[test]
    fn fifo_per_pair_and_checks() {
        let t = MemTransport::mesh(3, "mem:0");
        let tag = Tag::new(OpCode::SendRecv, 4);
        t[0].send(2, tag, b"ab", soon()).unwrap();
        t[0].send(2, tag, b"cde", soon()).unwrap();
        t[1].send(2, tag, b"x", soon()).unwrap();
        let mut b1 = [0u8; 1];
        t[2].recv(1, tag, &mut b1, soon()).unwrap();
        assert_eq!(&b1, b"x");
        let mut b2 = [0u8; 2];
        t[2].recv(0, tag, &mut b2, soon()).unwrap();
        assert_eq!(&b2, b"ab");
        let err = t[2].recv(0, tag, &mut b2, soon()).unwrap_err();
        assert!(matches!(err, Error::Mismatch { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("rank 2 expected") && msg.contains("rank 0 sent") && msg.contains("3 bytes"), "{msg}");
        assert_eq!(err.peer(), Some(0));
        assert!(matches!(t[0].send(0, tag, b"", soon()), Err(Error::InvalidArgument(_))));
        assert!(matches!(t[0].send(3, tag, b"", soon()), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn timeout_names_op_group_and_peer() {
        let t = MemTransport::mesh(2, "mem:7");
        let mut b = [0u8; 4];
        let t0 = Instant::now();
        let err = t[1].recv(0, Tag::new(OpCode::AllReduce, 1), &mut b, Instant::now() + Duration::from_millis(50));
        let err = err.unwrap_err();
        assert!(t0.elapsed() >= Duration::from_millis(50));
        let msg = err.to_string();
        assert!(matches!(err, Error::Timeout { .. }));
        assert!(msg.contains("all_reduce") && msg.contains("mem:7") && msg.contains("peer rank 0"), "{msg}");
    }

    #[test]
    fn dropped_peer_is_lost() {
        let mut t = MemTransport::mesh(2, "mem:1");
        let t1 = t.pop().unwrap();
        let t0 = t.pop().unwrap();
        let h = std::thread::spawn(move || {
            let mut b = [0u8; 4];
            t1.recv(0, Tag::new(OpCode::Broadcast, 1), &mut b, soon())
        });
        std::thread::sleep(Duration::from_millis(20));
        drop(t0);
        let err = h.join().unwrap().unwrap_err();
        assert!(matches!(err, Error::PeerLost { .. }), "{err}");
        assert_eq!(err.peer(), Some(0));
    }
}
