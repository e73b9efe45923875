//! Sleeping on a word of a shared mapping until another process changes it
//! (Linux futexes, process-shared: the segment is mapped by several
//! processes, so the private variants would not see each other).
//!
//! A futex compares 32 bits; the callers' words are 64-bit counters, so
//! these functions work on the low half, which changes whenever the counter
//! moves by less than 2^32 (it moves by one per message).

use std::sync::atomic::AtomicU64;
use std::time::Duration;

/// The low 32 bits of `word`, as the kernel sees them.
fn low_half(word: &AtomicU64) -> *mut u32 {
    let p = word.as_ptr().cast::<u32>();
    if cfg!(target_endian = "little") {
        p
    } else {
        p.wrapping_add(1)
    }
}

/// Sleeps until `word`'s low 32 bits are no longer `low`, a wake-up, a
/// signal, or `timeout`, whichever comes first (callers re-check their
/// condition in every case). Returns at once when the value already differs.
pub(crate) fn wait(word: &AtomicU64, low: u32, timeout: Duration) {
    let ts = nix::libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as nix::libc::time_t,
        tv_nsec: timeout.subsec_nanos() as nix::libc::c_long,
    };
    // SAFETY: the address is 4-byte aligned inside a live 8-byte atomic
    // (`&AtomicU64`, so mapped and valid for the call); FUTEX_WAIT only
    // reads it (atomically, in the kernel) and `ts` outlives the call. The
    // result is ignored: EAGAIN (the value differs), EINTR, ETIMEDOUT and a
    // wake-up all mean "look again".
    unsafe {
        nix::libc::syscall(
            nix::libc::SYS_futex,
            low_half(word),
            nix::libc::FUTEX_WAIT,
            low,
            &ts as *const nix::libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// Wakes every process sleeping in [`wait`] on `word`.
pub(crate) fn wake(word: &AtomicU64) {
    // SAFETY: as in `wait`; FUTEX_WAKE does not access the word's value.
    unsafe {
        nix::libc::syscall(
            nix::libc::SYS_futex,
            low_half(word),
            nix::libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<nix::libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn a_waiter_wakes_when_the_word_changes_and_times_out_otherwise() {
        let w = Arc::new(AtomicU64::new(5));
        // Value already different: no sleep.
        let t = Instant::now();
        wait(&w, 4, Duration::from_secs(5));
        assert!(t.elapsed() < Duration::from_secs(2));
        // Nobody changes it: the timeout ends the wait.
        let t = Instant::now();
        wait(&w, 5, Duration::from_millis(30));
        assert!(t.elapsed() >= Duration::from_millis(20), "{:?}", t.elapsed());
        // Another thread changes it and wakes us long before the timeout.
        let w2 = w.clone();
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            w2.store(6, Ordering::SeqCst);
            wake(&w2);
        });
        let t = Instant::now();
        while w.load(Ordering::SeqCst) == 5 {
            assert!(t.elapsed() < Duration::from_secs(20));
            wait(&w, 5, Duration::from_secs(30));
        }
        assert!(t.elapsed() < Duration::from_secs(20));
        h.join().unwrap();
    }
}
