//! The shared-memory blob broadcast (`ShmComm::broadcast_blob`), ranks as
//! threads: blobs in one area (written and read in place) and larger ones
//! staged through units, from every root; a root that cannot produce its
//! blob and a receiver that refuses its size or fails to read it each get
//! an error while the group stays in step; the root runs ahead of late
//! readers through the ring; and a mismatch (a plain broadcast, a skipped
//! blob, two roots) is an error on the waiting side, not garbage, as is a
//! peer that never comes.

mod common;

use rankweave::backend::{BlobRole, BlobSource};
use rankweave::collectives::shm::{ShmComm, ShmOptions};
use rankweave::{Error, Result};
use std::time::Duration;

/// Two 2 KiB halves per slot: an area holds `n * 2048` bytes.
fn small_opts() -> ShmOptions {
    ShmOptions { slot_bytes: 4096, timeout: Duration::from_secs(20), ..Default::default() }
}

/// Bytes of blob `k` of length `len` from `root`.
fn blob(root: usize, k: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + root * 31 + k * 13) as u8).collect()
}

/// Broadcasts `data` (on `root`) and returns what every rank holds after.
fn cast(comm: &mut ShmComm, scratch: &mut Vec<u8>, data: &[u8], root: usize, limit: usize) -> Result<Vec<u8>> {
    if comm.rank() == root {
        comm.broadcast_blob(BlobRole::Send(&mut &data[..]), scratch, root)?;
        return Ok(data.to_vec());
    }
    let mut got = None;
    let mut read = |b: &[u8]| {
        got = Some(b.to_vec());
        Ok(())
    };
    comm.broadcast_blob(BlobRole::Receive { limit, read: &mut read }, scratch, root)?;
    Ok(got.expect("read was called"))
}

#[test]
fn blobs_in_place_and_staged_arrive_whole_from_every_root() {
    for n in [2, 3, 5] {
        let area = n * 2048;
        let lens = [0, 1, 40, 2047, area - 1, area, area + 1, 3 * area + 17, 10_000];
        let outs = common::run_shm(n, small_opts(), move |comm| {
            let mut scratch = Vec::new();
            let mut k = 0;
            for &len in &lens {
                for root in 0..n {
                    let want = blob(root, k, len);
                    let got = cast(comm, &mut scratch, &want, root, usize::MAX).unwrap();
                    assert!(got == want, "n={n} len={len} root={root}: rank {} got other bytes", comm.rank());
                    k += 1;
                }
            }
            // Still in step with the other collectives.
            let mut b = [comm.rank() as u8; 64];
            comm.broadcast(&mut b, n - 1).unwrap();
            b[0]
        });
        assert!(outs.iter().all(|&b| b == (n - 1) as u8));
    }
}

/// A source that fails like an object that cannot be encoded.
struct Broken;

impl BlobSource for Broken {
    fn write_into(&mut self, _out: &mut [u8]) -> Result<Option<usize>> {
        Ok(None)
    }
    fn write_vec(&mut self, _out: &mut Vec<u8>) -> Result<()> {
        Err(Error::invalid("this object cannot be encoded"))
    }
}

#[test]
fn a_root_that_cannot_encode_fails_everywhere_and_the_group_goes_on() {
    let outs = common::run_shm(3, small_opts(), |comm| {
        let mut scratch = Vec::new();
        let err = if comm.rank() == 1 {
            comm.broadcast_blob(BlobRole::Send(&mut Broken), &mut scratch, 1).unwrap_err()
        } else {
            let mut read = |_: &[u8]| -> Result<()> { panic!("nothing to read") };
            comm.broadcast_blob(BlobRole::Receive { limit: usize::MAX, read: &mut read }, &mut scratch, 1).unwrap_err()
        };
        let text = err.to_string();
        if comm.rank() == 1 {
            assert!(text.contains("cannot be encoded"), "{text}");
        } else {
            assert!(matches!(err, Error::Serialization { .. }) && err.peer() == Some(1), "{err:?}");
            assert!(text.contains("rank 1, the root, could not encode"), "{text}");
        }
        // The next blob arrives intact.
        let want = blob(0, 1, 5000);
        cast(comm, &mut scratch, &want, 0, usize::MAX).unwrap() == want
    });
    assert_eq!(outs, vec![true; 3]);
}

#[test]
fn a_receiver_refuses_a_blob_over_its_limit_and_stays_in_step() {
    // Direct (in one area) and staged sizes; rank 2 refuses both.
    for len in [3000, 20_000] {
        let outs = common::run_shm(3, small_opts(), move |comm| {
            let mut scratch = Vec::new();
            let limit = if comm.rank() == 2 { 2999 } else { usize::MAX };
            let data = blob(0, 0, len);
            let res = cast(comm, &mut scratch, &data, 0, limit);
            if comm.rank() == 2 {
                let err = res.unwrap_err();
                assert!(matches!(err, Error::Serialization { .. }) && err.peer() == Some(0), "{err:?}");
                assert!(err.to_string().contains(&format!("{len} bytes, above this rank's limit of 2999")), "{err}");
            } else {
                assert!(res.unwrap() == data);
            }
            let want = blob(1, 2, 100);
            cast(comm, &mut scratch, &want, 1, usize::MAX).unwrap() == want
        });
        assert_eq!(outs, vec![true; 3], "len {len}");
    }
}

#[test]
fn a_read_error_is_returned_after_the_broadcast() {
    let outs = common::run_shm(2, small_opts(), |comm| {
        let mut scratch = Vec::new();
        if comm.rank() == 0 {
            comm.broadcast_blob(BlobRole::Send(&mut &b"abc"[..]), &mut scratch, 0).unwrap();
        } else {
            let mut read = |b: &[u8]| -> Result<()> {
                assert_eq!(b, b"abc");
                Err(Error::invalid("bad bytes"))
            };
            let err =
                comm.broadcast_blob(BlobRole::Receive { limit: 10, read: &mut read }, &mut scratch, 0).unwrap_err();
            assert!(err.to_string().contains("bad bytes"), "{err}");
        }
        let want = blob(1, 0, 9000);
        cast(comm, &mut scratch, &want, 1, usize::MAX).unwrap() == want
    });
    assert_eq!(outs, vec![true; 2]);
}

#[test]
fn wrong_roles_and_roots_are_errors_and_a_plain_broadcast_is_a_mismatch() {
    let outs = common::run_shm(2, small_opts(), |comm| {
        let mut scratch = Vec::new();
        let mut read = |_: &[u8]| Ok(());
        // Rank 0 is the root but receives; rank 1 is not but sends.
        let wrong = if comm.rank() == 0 {
            comm.broadcast_blob(BlobRole::Receive { limit: 1, read: &mut read }, &mut scratch, 0)
        } else {
            comm.broadcast_blob(BlobRole::Send(&mut &b"x"[..]), &mut scratch, 0)
        };
        assert!(matches!(wrong, Err(Error::InvalidArgument(_))), "{wrong:?}");
        let bad_root = comm.broadcast_blob(BlobRole::Send(&mut &b"x"[..]), &mut scratch, 2);
        assert!(bad_root.is_err());
        // Rank 0 broadcasts a blob, which it leaves in the ring and returns;
        // rank 1 calls a plain broadcast and finds the blob instead of rank 0.
        if comm.rank() == 0 {
            comm.broadcast_blob(BlobRole::Send(&mut &b"hello"[..]), &mut scratch, 0).is_ok()
        } else {
            let err = comm.broadcast(&mut [0u8; 5], 0).unwrap_err();
            assert!(matches!(err, Error::Mismatch { .. }) && err.peer() == Some(0), "{err:?}");
            assert!(err.to_string().contains("broadcast an object (blob broadcast number 1)"), "{err}");
            true
        }
    });
    assert_eq!(outs, vec![true; 2]);
}

#[test]
fn a_plain_broadcast_facing_a_blob_receive_is_a_mismatch_on_both_sides() {
    let outs = common::run_shm(3, small_opts(), |comm| {
        let mut scratch = Vec::new();
        let err = if comm.rank() == 0 {
            comm.broadcast(&mut [7u8; 5], 0).unwrap_err()
        } else {
            let mut read = |_: &[u8]| -> Result<()> { panic!("nothing to read") };
            comm.broadcast_blob(BlobRole::Receive { limit: 100, read: &mut read }, &mut scratch, 0).unwrap_err()
        };
        assert!(matches!(err, Error::Mismatch { .. }), "rank {}: {err:?}", comm.rank());
        err.to_string()
    });
    assert!(outs[0].contains("waits in blob broadcast"), "{}", outs[0]);
    for text in &outs[1..] {
        assert!(text.contains("rank 0 called broadcast"), "{text}");
    }
}

#[test]
fn a_skipped_blob_broadcast_is_a_mismatch_at_the_next_step() {
    let outs = common::run_shm(2, small_opts(), |comm| {
        let mut scratch = Vec::new();
        if comm.rank() == 0 {
            comm.broadcast_blob(BlobRole::Send(&mut &b"plan"[..]), &mut scratch, 0).unwrap();
        }
        let err = comm.barrier().unwrap_err();
        assert!(matches!(err, Error::Mismatch { .. }) && err.peer() == Some(1 - comm.rank()), "{err:?}");
        err.to_string()
    });
    assert!(outs[0].contains("after 0 blob broadcasts (broadcast_object), this rank after 1"), "{}", outs[0]);
    assert!(outs[1].contains("blob broadcast"), "{}", outs[1]);
}

#[test]
fn two_ranks_that_both_take_themselves_for_the_root_are_a_mismatch_not_a_mixed_blob() {
    let outs = common::run_shm(3, small_opts(), |comm| {
        let mut scratch = Vec::new();
        let me = comm.rank();
        let data = blob(me, 0, 3000);
        if me < 2 {
            comm.broadcast_blob(BlobRole::Send(&mut &data[..]), &mut scratch, me).err()
        } else {
            let mut read = |b: &[u8]| -> Result<()> {
                assert!(b == blob(0, 0, 3000), "rank 2 read a blob that is not rank 0's");
                Ok(())
            };
            comm.broadcast_blob(BlobRole::Receive { limit: usize::MAX, read: &mut read }, &mut scratch, 0).err()
        }
        .map(|e| (matches!(e, Error::Mismatch { .. }), e.to_string()))
    });
    // One of the two roots lost the claim; rank 2, which expects rank 0,
    // reads rank 0's blob whole or is told that rank 1 broadcast instead.
    let lost: Vec<_> = outs[..2].iter().filter(|o| o.is_some()).collect();
    assert_eq!(lost.len(), 1, "{outs:?}");
    assert!(lost[0].as_ref().is_some_and(|(m, t)| *m && t.contains("is the root of blob broadcast number 1 too")));
    match &outs[2] {
        None => assert!(outs[1].is_some(), "rank 2 read rank 0's blob, so rank 1 lost: {outs:?}"),
        Some((m, t)) => assert!(*m && t.contains("rank 1 broadcast blob number 1 as its root"), "{t}"),
    }
}

#[test]
fn the_root_runs_ahead_of_late_readers_by_the_ring_and_every_blob_arrives_in_order() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let k = rankweave::collectives::shm::RING_ENTRIES;
    // The readers start only once the root has returned from its first `k`
    // broadcasts: a root that waited for them would never get there.
    let published = std::sync::Arc::new(AtomicBool::new(false));
    let outs = common::run_shm(3, small_opts(), move |comm| {
        let mut scratch = Vec::new();
        let blobs = 5 * k;
        if comm.rank() == 1 {
            for i in 0..blobs {
                if i == k {
                    published.store(true, Ordering::Release);
                }
                comm.broadcast_blob(BlobRole::Send(&mut &blob(1, i, 100 + i)[..]), &mut scratch, 1).unwrap();
            }
            return true;
        }
        let waiting_since = std::time::Instant::now();
        while !published.load(Ordering::Acquire) {
            assert!(waiting_since.elapsed() < Duration::from_secs(15), "the root waited for its readers");
            std::thread::sleep(Duration::from_millis(1));
        }
        (0..blobs).all(|i| cast(comm, &mut scratch, &[], 1, usize::MAX).unwrap() == blob(1, i, 100 + i))
    });
    assert_eq!(outs, vec![true; 3]);
}

#[test]
fn a_reader_whose_root_never_comes_and_a_root_whose_reader_never_reads_time_out_naming_it() {
    let opts = ShmOptions { timeout: Duration::from_millis(300), ..small_opts() };
    let k = rankweave::collectives::shm::RING_ENTRIES;
    let outs = common::run_shm(2, opts.clone(), |comm| {
        let mut scratch = Vec::new();
        if comm.rank() == 0 {
            std::thread::sleep(Duration::from_millis(700));
            return None;
        }
        let mut read = |_: &[u8]| Ok(());
        let err = comm.broadcast_blob(BlobRole::Receive { limit: 100, read: &mut read }, &mut scratch, 0).unwrap_err();
        Some(err)
    });
    let err = outs[1].as_ref().unwrap();
    assert!(matches!(err, Error::Timeout { .. }) && err.peer() == Some(0), "{err:?}");
    assert!(err.to_string().contains("rank 0 to publish blob broadcast number 1"), "{err}");

    let outs = common::run_shm(2, opts, move |comm| {
        let mut scratch = Vec::new();
        if comm.rank() == 1 {
            std::thread::sleep(Duration::from_millis(700));
            return None;
        }
        for i in 0..k {
            comm.broadcast_blob(BlobRole::Send(&mut &blob(0, i, 10)[..]), &mut scratch, 0).unwrap();
        }
        Some(comm.broadcast_blob(BlobRole::Send(&mut &b"one too many"[..]), &mut scratch, 0).unwrap_err())
    });
    let err = outs[0].as_ref().unwrap();
    assert!(matches!(err, Error::Timeout { .. }) && err.peer() == Some(1), "{err:?}");
    assert!(err.to_string().contains("rank 1 to read blob broadcast number 1"), "{err}");
}

/// A source that never writes in place (as one that cannot size itself).
struct OnlyVec(Vec<u8>);

impl BlobSource for OnlyVec {
    fn write_into(&mut self, _out: &mut [u8]) -> Result<Option<usize>> {
        Ok(None)
    }
    fn write_vec(&mut self, out: &mut Vec<u8>) -> Result<()> {
        out.extend_from_slice(&self.0);
        Ok(())
    }
}

#[test]
fn a_source_that_only_writes_a_vec_is_sent_whole_at_every_size() {
    let outs = common::run_shm(2, small_opts(), |comm| {
        let mut scratch = Vec::new();
        let mut ok = true;
        for len in [0, 10, 4096, 4097, 9000] {
            let want = blob(0, len, len);
            let got = if comm.rank() == 0 {
                comm.broadcast_blob(BlobRole::Send(&mut OnlyVec(want.clone())), &mut scratch, 0).unwrap();
                want.clone()
            } else {
                cast(comm, &mut scratch, &[], 0, usize::MAX).unwrap()
            };
            ok &= got == want;
        }
        ok
    });
    assert_eq!(outs, vec![true; 2]);
}
