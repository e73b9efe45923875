//! The shared-memory blob broadcast (`ShmComm::broadcast_blob`), ranks as
//! threads: blobs in one area (written and read in place) and larger ones
//! staged through units, from every root; a root that cannot produce its
//! blob and a receiver that refuses its size or fails to read it each get
//! an error while the group stays in step; and a mismatch with a plain
//! broadcast is an error, not garbage.

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
        // Rank 0 broadcasts a blob, rank 1 calls a plain broadcast.
        let res = if comm.rank() == 0 {
            comm.broadcast_blob(BlobRole::Send(&mut &b"hello"[..]), &mut scratch, 0)
        } else {
            comm.broadcast(&mut [0u8; 5], 0)
        };
        matches!(res, Err(Error::Mismatch { .. }))
    });
    assert_eq!(outs, vec![true; 2]);
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
