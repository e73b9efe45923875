//! What the NCCL communicator needs that makes no NCCL call: the dtype and
//! operator mapping, NCCL's result codes as the crate's errors, the version
//! check, the non-blocking configuration and the unique-id exchange over a
//! CPU group. No `unsafe` here; the calls themselves are in `nccl.rs`.

use crate::dtype::DType;
use crate::error::{Context, Error, Result};
use crate::group::ProcessGroup;
use crate::reduce::ReduceOp;
use cudarc::nccl::sys;
use std::ffi::c_int;
use std::time::Duration;

/// Bytes in an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`).
pub const UNIQUE_ID_BYTES: usize = 128;

/// NCCL's data type for a rankweave dtype (NCCL has all eight).
pub fn nccl_dtype(dtype: DType) -> sys::ncclDataType_t {
    use sys::ncclDataType_t as T;
    match dtype {
        DType::F32 => T::ncclFloat32,
        DType::F64 => T::ncclFloat64,
        DType::F16 => T::ncclFloat16,
        DType::BF16 => T::ncclBfloat16,
        DType::I8 => T::ncclInt8,
        DType::U8 => T::ncclUint8,
        DType::I32 => T::ncclInt32,
        DType::I64 => T::ncclInt64,
    }
}

/// NCCL's reduction for a rankweave operator. `ncclAvg` divides the sum by
/// the group size (truncating for integers), as [`ReduceOp::Avg`] does.
pub fn nccl_op(op: ReduceOp) -> sys::ncclRedOp_t {
    use sys::ncclRedOp_t as O;
    match op {
        ReduceOp::Sum => O::ncclSum,
        ReduceOp::Prod => O::ncclProd,
        ReduceOp::Min => O::ncclMin,
        ReduceOp::Max => O::ncclMax,
        ReduceOp::Avg => O::ncclAvg,
    }
}

/// NCCL's name for a result code.
fn result_name(r: sys::ncclResult_t) -> &'static str {
    use sys::ncclResult_t as R;
    match r {
        R::ncclSuccess => "ncclSuccess",
        R::ncclUnhandledCudaError => "ncclUnhandledCudaError",
        R::ncclSystemError => "ncclSystemError",
        R::ncclInternalError => "ncclInternalError",
        R::ncclInvalidArgument => "ncclInvalidArgument",
        R::ncclInvalidUsage => "ncclInvalidUsage",
        R::ncclRemoteError => "ncclRemoteError",
        R::ncclInProgress => "ncclInProgress",
        // Code 8: ncclTimeout in NCCL >= 2.30, past the end before.
        R::ncclNumResults => "ncclTimeout (code 8)",
    }
}

/// The crate's error for an NCCL failure `r` during `ctx` (`last` is NCCL's
/// own last message, when there is one). A remote failure is a lost peer; a
/// bad argument is the caller's; the rest (system, internal, CUDA) poison
/// the group as I/O errors do.
pub(crate) fn nccl_error(ctx: Context, r: sys::ncclResult_t, last: &str) -> Error {
    use sys::ncclResult_t as R;
    let detail = if last.is_empty() { result_name(r).to_string() } else { format!("{}: {last}", result_name(r)) };
    match r {
        R::ncclRemoteError => Error::PeerLost { ctx, detail: format!("NCCL reports a remote failure ({detail})") },
        R::ncclInvalidArgument | R::ncclInvalidUsage => {
            Error::InvalidArgument(format!("{ctx}: NCCL refused: {detail}"))
        }
        R::ncclNumResults => Error::timeout(ctx, Duration::ZERO, format!("NCCL's own timeout ({detail})")),
        _ => Error::io(ctx, std::io::Error::other(format!("NCCL failed: {detail}"))),
    }
}

/// The oldest NCCL this build calls (2.14: `ncclCommInitRankConfig`, the
/// non-blocking mode and `ncclGetLastError`); an older library lacks
/// symbols, which cudarc turns into a panic.
pub const MIN_NCCL_VERSION: i32 = 21_400;

/// `Ok` for NCCL at least [`MIN_NCCL_VERSION`].
pub(crate) fn check_nccl_version(v: i32) -> Result<()> {
    if v < MIN_NCCL_VERSION {
        return Err(Error::Unsupported(format!(
            "NCCL {}.{}.{} is older than the 2.14 this build needs; install a newer nvidia-nccl",
            v / 10_000,
            (v % 10_000) / 100,
            v % 100
        )));
    }
    Ok(())
}

/// Sends group rank 0's unique id to every rank over the CPU group `pg`.
///
/// Rank 0 calls `make`; its outcome travels as one status byte ahead of the
/// id, so that a rank 0 that could not make one fails the others at once
/// (naming rank 0) instead of leaving them to time out.
pub fn exchange_unique_id(
    pg: &ProcessGroup,
    make: impl FnOnce() -> Result<[u8; UNIQUE_ID_BYTES]>,
) -> Result<[u8; UNIQUE_ID_BYTES]> {
    let mut frame = [0u8; 1 + UNIQUE_ID_BYTES];
    let mut local_err = None;
    if pg.rank() == 0 {
        match make() {
            Ok(id) => {
                frame[0] = 1;
                frame[1..].copy_from_slice(&id);
            }
            Err(e) => local_err = Some(e),
        }
    }
    pg.broadcast_bytes(&mut frame, 0)?;
    if let Some(e) = local_err {
        return Err(e);
    }
    match frame[0] {
        1 => {
            let mut id = [0u8; UNIQUE_ID_BYTES];
            id.copy_from_slice(&frame[1..]);
            Ok(id)
        }
        0 => Err(Error::Unsupported(format!(
            "nccl unique id in group {}: group rank 0 could not create one (see its log)",
            pg.name()
        ))),
        b => Err(Error::protocol(
            Context::new("nccl unique id", pg.name(), pg.rank()).with_peer(0),
            format!("status byte {b}, expected 0 or 1"),
        )),
    }
}

/// The non-blocking configuration: NCCL's `NCCL_CONFIG_INITIALIZER` with
/// `blocking = 0` (fields left at NCCL's "undefined" markers take NCCL's
/// defaults).
pub(crate) fn nonblocking_config() -> sys::ncclConfig_t {
    const UNDEF_INT: c_int = c_int::MIN;
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        // NCCL_VERSION(2, 24, 0): the header these bindings come from.
        version: 2 * 10_000 + 24 * 100,
        blocking: 0,
        cgaClusterSize: UNDEF_INT,
        minCTAs: UNDEF_INT,
        maxCTAs: UNDEF_INT,
        netName: std::ptr::null(),
        splitShare: UNDEF_INT,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::group::{GroupOptions, ProcessGroup};
    use crate::store::HashStore;
    use std::sync::Arc;

    #[test]
    fn dtypes_and_ops_map_to_nccl_codes() {
        // The numeric values are NCCL's ABI (nccl.h): they must not drift.
        let codes: Vec<u32> = DType::ALL.iter().map(|&d| nccl_dtype(d) as u32).collect();
        // F32, F64, F16, BF16, I8, U8, I32, I64
        assert_eq!(codes, vec![7, 8, 6, 9, 0, 1, 2, 4]);
        let ops: Vec<u32> = ReduceOp::ALL.iter().map(|&o| nccl_op(o) as u32).collect();
        // Sum, Prod, Min, Max, Avg
        assert_eq!(ops, vec![0, 1, 3, 2, 4]);
    }

    #[test]
    fn config_is_nonblocking_and_versioned() {
        let c = nonblocking_config();
        assert_eq!(c.blocking, 0);
        assert_eq!(c.magic, 0xcafe_beef);
        assert_eq!(c.version, 22_400);
        assert_eq!(c.size, std::mem::size_of::<sys::ncclConfig_t>());
        assert_eq!(c.minCTAs, c_int::MIN);
    }

    #[test]
    fn errors_map_by_kind() {
        let ctx = Context::new("all_reduce", "tp:0", 1);
        let e = nccl_error(ctx.clone(), sys::ncclResult_t::ncclRemoteError, "peer 0 gone");
        assert!(matches!(e, Error::PeerLost { .. }) && e.poisons_group(), "{e}");
        assert!(e.to_string().contains("tp:0") && e.to_string().contains("peer 0 gone"), "{e}");
        let e = nccl_error(ctx.clone(), sys::ncclResult_t::ncclInvalidUsage, "");
        assert!(matches!(e, Error::InvalidArgument(_)) && e.to_string().contains("ncclInvalidUsage"), "{e}");
        let e = nccl_error(ctx.clone(), sys::ncclResult_t::ncclSystemError, "");
        assert!(e.poisons_group() && e.to_string().contains("all_reduce in group tp:0"), "{e}");
        let e = nccl_error(ctx, sys::ncclResult_t::ncclNumResults, "");
        assert!(matches!(e, Error::Timeout { .. }), "{e}");
    }

    /// `n` ranks of one world over an in-process store, one thread each.
    pub(crate) fn world(n: usize) -> Vec<ProcessGroup> {
        let store: crate::store::SharedStore = Arc::new(HashStore::new());
        let hs: Vec<_> = (0..n)
            .map(|r| {
                let store = store.clone();
                std::thread::spawn(move || ProcessGroup::new_world(store, r, n, GroupOptions::default()))
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("rank thread").expect("world")).collect()
    }

    #[test]
    fn rank_zeros_id_reaches_every_rank() {
        let pgs = world(3);
        let id: [u8; UNIQUE_ID_BYTES] = std::array::from_fn(|i| (i * 7 + 3) as u8);
        let made = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let hs: Vec<_> = pgs
            .into_iter()
            .map(|pg| {
                let made = made.clone();
                std::thread::spawn(move || {
                    exchange_unique_id(&pg, || {
                        made.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        Ok(id)
                    })
                })
            })
            .collect();
        for h in hs {
            assert_eq!(h.join().unwrap().unwrap(), id);
        }
        assert_eq!(made.load(std::sync::atomic::Ordering::SeqCst), 1, "only rank 0 makes the id");
    }

    #[test]
    fn a_failing_rank_zero_fails_every_rank_at_once() {
        let pgs = world(2);
        let hs: Vec<_> = pgs
            .into_iter()
            .map(|pg| {
                std::thread::spawn(move || {
                    exchange_unique_id(&pg, || Err(Error::Unsupported("NCCL library not found (test)".into())))
                })
            })
            .collect();
        let errs: Vec<String> = hs.into_iter().map(|h| h.join().unwrap().unwrap_err().to_string()).collect();
        assert!(errs[0].contains("NCCL library not found"), "{}", errs[0]);
        assert!(errs[1].contains("group rank 0 could not create one"), "{}", errs[1]);
    }

    #[test]
    fn old_nccl_is_refused_by_name() {
        let e = check_nccl_version(21_304).unwrap_err().to_string();
        assert!(e.contains("NCCL 2.13.4") && e.contains("2.14"), "{e}");
        assert!(check_nccl_version(23_007).is_ok());
    }
}
