//! Looking for the CUDA driver and the NCCL library before cudarc does.
//!
//! cudarc opens `libcuda` and `libnccl` on the first call into them and
//! panics when it finds neither. This module tries the very names cudarc
//! tries ([`cudarc::get_lib_name_candidates`]), in the same way, so that a
//! library it cannot find is an [`Error::Unsupported`] here first and cudarc
//! is never called without it.

use crate::error::{Error, Result};
use std::sync::OnceLock;

/// The environment variable the NCCL hint names.
const LD_PATH: &str = "LD_LIBRARY_PATH";

/// Tries `names` in order; keeps the first library that opens loaded for the
/// life of the process (cudarc will open the same file again, which only
/// bumps its reference count). `Err` holds the loader's last message.
fn open_first(names: &[String]) -> std::result::Result<&'static str, String> {
    let mut last = String::from("no candidate names");
    for name in names {
        // SAFETY: opening a shared library runs its initializers. The names
        // are the CUDA driver's and NCCL's (or, in tests, names that exist
        // nowhere); these are the same libraries, opened the same way, as
        // cudarc opens on its first call, so this adds no initializer that
        // the device path would not run anyway.
        match unsafe { libloading::Library::new(name) } {
            Ok(lib) => {
                // Never closed: unloading a driver library while threads it
                // started may still run is not safe, and cudarc keeps its own
                // handle open for the whole process anyway.
                std::mem::forget(lib);
                let leaked: &'static str = Box::leak(name.clone().into_boxed_str());
                return Ok(leaked);
            }
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

/// cudarc's candidate file names for `libs`, in its order, without repeats.
fn candidates(libs: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for name in libs.iter().flat_map(|l| cudarc::get_lib_name_candidates(l)) {
        if !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

/// The first names of `tried` and how many more there were.
fn tried_list(tried: &[String]) -> String {
    const SHOW: usize = 4;
    let head = tried.iter().take(SHOW).map(String::as_str).collect::<Vec<_>>().join(", ");
    match tried.len().saturating_sub(SHOW) {
        0 => head,
        n => format!("{head} and {n} other names"),
    }
}

/// The clean error for a missing driver, listing what was tried.
pub(crate) fn no_driver(tried: &[String], last: &str) -> Error {
    Error::Unsupported(format!(
        "no CUDA driver found (tried {}; last error: {last}): install the NVIDIA driver, or run on a machine with a GPU",
        tried_list(tried)
    ))
}

/// The clean error for a missing NCCL library, listing what was tried.
pub(crate) fn no_nccl(tried: &[String], last: &str) -> Error {
    Error::Unsupported(format!(
        "NCCL library not found (tried {}; last error: {last}): install nvidia-nccl (e.g. `pip install \
         nvidia-nccl-cu13`) or set {LD_PATH} to a directory holding libnccl.so (the wheels ship only \
         libnccl.so.2: link libnccl.so to it there)",
        tried_list(tried)
    ))
}

/// `Ok` when one of `names` opens; otherwise `missing(names, loader message)`.
#[cfg(test)]
fn probe_names(names: &[String], missing: fn(&[String], &str) -> Error) -> Result<&'static str> {
    open_first(names).map_err(|last| missing(names, &last))
}

/// The CUDA driver library's name as it opened, or the clean
/// `no CUDA driver found` error. The answer is computed once per process.
pub fn cuda_driver() -> Result<&'static str> {
    static FOUND: OnceLock<std::result::Result<&'static str, String>> = OnceLock::new();
    let names = candidates(&["cuda", "nvcuda"]);
    FOUND.get_or_init(|| open_first(&names)).as_ref().copied().map_err(|last| no_driver(&names, last))
}

/// The NCCL library's name as it opened, or the clean `NCCL library not
/// found` error. The answer is computed once per process.
pub fn nccl_library() -> Result<&'static str> {
    static FOUND: OnceLock<std::result::Result<&'static str, String>> = OnceLock::new();
    let names = candidates(&["nccl"]);
    FOUND.get_or_init(|| open_first(&names)).as_ref().copied().map_err(|last| no_nccl(&names, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_libraries_are_clean_errors() {
        let names = vec!["librankweave-absent-cuda.so".to_string(), "librankweave-absent-cuda.so.1".to_string()];
        let e = probe_names(&names, no_driver).unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)), "{e:?}");
        let s = e.to_string();
        assert!(s.contains("no CUDA driver found") && s.contains("librankweave-absent-cuda.so.1"), "{s}");
        let many: Vec<String> = (0..6).map(|i| format!("libabsent{i}.so")).collect();
        assert_eq!(tried_list(&many), "libabsent0.so, libabsent1.so, libabsent2.so, libabsent3.so and 2 other names");
        let e = probe_names(&["librankweave-absent-nccl.so".to_string()], no_nccl).unwrap_err().to_string();
        assert!(e.contains("NCCL library not found") && e.contains("nvidia-nccl") && e.contains(LD_PATH), "{e}");
    }

    #[test]
    fn candidates_are_cudarcs() {
        let c = candidates(&["nccl"]);
        assert!(c.iter().any(|n| n == "libnccl.so"), "{c:?}");
        let d = candidates(&["cuda"]);
        assert!(d.iter().any(|n| n == "libcuda.so.1"), "{d:?}");
        let mut unique = d.clone();
        unique.dedup();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), d.len(), "no name is tried twice: {d:?}");
    }

    #[test]
    fn a_present_library_opens() {
        // libc is on every Linux machine: the probe reports the name that opened.
        let names = vec!["librankweave-absent.so".to_string(), "libc.so.6".to_string()];
        assert_eq!(probe_names(&names, no_driver).unwrap(), "libc.so.6");
    }
}
