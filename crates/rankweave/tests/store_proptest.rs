//! Property tests of the store's frame decoders: random bytes, truncated and
//! mutated frames, and headers that announce huge lengths. Every bad input is
//! an error, never a panic, and no allocation exceeds what the input (or the
//! protocol limit) justifies; a counting allocator checks the last part.

use proptest::prelude::*;
use rankweave::store::protocol::{
    self, decode_request, decode_response, encode_request, encode_response, Request, Response, HEADER_LEN,
};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// Records the largest single allocation made by the current thread while
/// tracking is on.
struct Tracking;

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = TRACKING.try_with(|t| {
        if t.get() {
            let _ = LARGEST.try_with(|m| m.set(m.get().max(size)));
        }
    });
}

// SAFETY: every method forwards to the system allocator with the caller's
// arguments unchanged; the bookkeeping only touches plain thread-local cells.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// Runs `f` and returns its result with the largest allocation it made.
fn largest_alloc<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.with(|m| m.set(0));
    TRACKING.with(|t| t.set(true));
    let r = f();
    TRACKING.with(|t| t.set(false));
    (r, LARGEST.with(Cell::get))
}

/// What a decode of `n` input bytes may allocate at most: copies of input
/// slices, a key vector (at most n/4 entries of 24 bytes) and error text.
fn budget(n: usize) -> usize {
    8 * n + 4096
}

fn key() -> impl Strategy<Value = String> {
    "[a-z0-9/:_-]{0,12}"
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..48)
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        bytes().prop_map(|token| Request::Auth { token }),
        (key(), bytes()).prop_map(|(key, value)| Request::Set { key, value }),
        (key(), any::<u64>()).prop_map(|(key, timeout_ms)| Request::Get { key, timeout_ms }),
        (prop::collection::vec(key(), 0..6), any::<u64>())
            .prop_map(|(keys, timeout_ms)| Request::Wait { keys, timeout_ms }),
        (key(), any::<i64>()).prop_map(|(key, delta)| Request::Add { key, delta }),
        (key(), bytes(), bytes()).prop_map(|(key, expected, desired)| Request::CompareSet { key, expected, desired }),
        key().prop_map(|key| Request::DeleteKey { key }),
        Just(Request::NumKeys),
        prop::collection::vec(key(), 0..6).prop_map(|keys| Request::Check { keys }),
    ]
}

fn response() -> impl Strategy<Value = Response> {
    prop_oneof![
        Just(Response::Ok),
        bytes().prop_map(Response::Value),
        any::<i64>().prop_map(Response::Int),
        any::<bool>().prop_map(Response::Bool),
        Just(Response::Timeout),
        "[ -~]{0,40}".prop_map(Response::Error),
        "[ -~]{0,40}".prop_map(Response::Unauthorized),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..512)) {
        let (_, req_alloc) = largest_alloc(|| decode_request(&data));
        let (_, resp_alloc) = largest_alloc(|| decode_response(&data));
        prop_assert!(req_alloc <= budget(data.len()), "{req_alloc} bytes for {} input bytes", data.len());
        prop_assert!(resp_alloc <= budget(data.len()), "{resp_alloc} bytes for {} input bytes", data.len());
    }

    #[test]
    fn random_payload_behind_a_valid_header(kind in any::<u8>(), payload in prop::collection::vec(any::<u8>(), 0..256)) {
        let mut frame = vec![protocol::VERSION, kind];
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(&payload);
        let (req, a) = largest_alloc(|| decode_request(&frame));
        let (resp, b) = largest_alloc(|| decode_response(&frame));
        prop_assert!(a <= budget(frame.len()) && b <= budget(frame.len()));
        // Whatever decodes is canonical: it encodes back to the same bytes.
        if let Ok(r) = req {
            prop_assert_eq!(encode_request(&r).unwrap(), frame.clone());
        }
        if let Ok(r) = resp {
            prop_assert_eq!(encode_response(&r).unwrap(), frame);
        }
    }

    #[test]
    fn huge_announced_lengths_allocate_nothing_big(
        kind in any::<u8>(),
        len in any::<u32>(),
        field_len in any::<u32>(),
        tail in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        // Header and inner field both announce arbitrary lengths; the input is small.
        let mut frame = vec![protocol::VERSION, kind];
        frame.extend_from_slice(&len.to_le_bytes());
        frame.extend_from_slice(&field_len.to_le_bytes());
        frame.extend_from_slice(&tail);
        let (req, a) = largest_alloc(|| decode_request(&frame));
        let (resp, b) = largest_alloc(|| decode_response(&frame));
        prop_assert!(a <= budget(frame.len()) && b <= budget(frame.len()), "{a} / {b}");
        if len as usize != frame.len() - HEADER_LEN {
            prop_assert!(req.is_err());
            prop_assert!(resp.is_err());
        }
        // The streaming path: a header within the limit followed by too few
        // bytes is an error, and memory follows the bytes that arrived.
        let head: [u8; HEADER_LEN] = frame[..HEADER_LEN].try_into().unwrap();
        if let Ok(h) = protocol::parse_request_header(&head) {
            let mut rest = &frame[HEADER_LEN..];
            let (r, c) = largest_alloc(|| protocol::read_payload(&mut rest, h));
            prop_assert!(c <= 64 * 1024 + budget(frame.len()), "{c}");
            prop_assert_eq!(r.is_ok(), h.len <= frame.len() - HEADER_LEN);
        }
    }

    #[test]
    fn truncated_requests_are_errors(req in request()) {
        let frame = encode_request(&req).unwrap();
        prop_assert_eq!(decode_request(&frame).unwrap(), req);
        for cut in 0..frame.len() {
            prop_assert!(decode_request(&frame[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = frame.clone();
        longer.push(0);
        prop_assert!(decode_request(&longer).is_err());
    }

    #[test]
    fn truncated_responses_are_errors(resp in response()) {
        let frame = encode_response(&resp).unwrap();
        prop_assert_eq!(decode_response(&frame).unwrap(), resp);
        for cut in 0..frame.len() {
            prop_assert!(decode_response(&frame[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn mutated_requests_never_panic(req in request(), pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut frame = encode_request(&req).unwrap();
        let i = pos.index(frame.len());
        frame[i] = byte;
        let (r, a) = largest_alloc(|| decode_request(&frame));
        prop_assert!(a <= budget(frame.len()));
        if let Ok(decoded) = r {
            prop_assert_eq!(encode_request(&decoded).unwrap(), frame);
        }
    }

    #[test]
    fn mutated_responses_never_panic(resp in response(), pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut frame = encode_response(&resp).unwrap();
        let i = pos.index(frame.len());
        frame[i] = byte;
        let (r, a) = largest_alloc(|| decode_response(&frame));
        prop_assert!(a <= budget(frame.len()));
        if let Ok(decoded) = r {
            prop_assert_eq!(encode_response(&decoded).unwrap(), frame);
        }
    }
}

#[test]
fn maximal_announcements_are_refused_at_the_header() {
    for kind in 0..=u8::MAX {
        let mut head = [protocol::VERSION, kind, 0, 0, 0, 0];
        head[2..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(protocol::parse_request_header(&head).is_err(), "kind {kind:#04x}");
        assert!(protocol::parse_response_header(&head).is_err(), "kind {kind:#04x}");
    }
}

#[test]
fn the_allocation_probe_sees_allocations() {
    let (v, n) = largest_alloc(|| vec![0u8; 100_000]);
    assert_eq!(v.len(), 100_000);
    assert!(n >= 100_000, "{n}");
    let (_, n) = largest_alloc(|| ());
    assert_eq!(n, 0);
}
