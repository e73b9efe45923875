#!/usr/bin/env bash
# The device checks of the `nccl` feature, for a machine with a CUDA GPU.
#
#   scripts/gpu-check.sh build [DIR]   on a machine with Rust (no GPU needed):
#                                     builds the test binaries with
#                                     `--features nccl` and copies them,
#                                     stripped, into DIR
#                                     (default target/gpu-check)
#   scripts/gpu-check.sh run [DIR]     on the GPU machine (no Rust needed):
#                                     finds libnccl, runs the device tests
#                                     (the `#[ignore]`d ones included: NCCL
#                                     at world size 1, all ops and dtypes
#                                     against the CPU group, tensor dicts,
#                                     the caller's stream in both modes,
#                                     graph capture, send/recv to self, CUDA
#                                     IPC across 2 processes) and the demo
#                                     with --device cuda, and prints
#                                     `gpu-check: N passed, M failed`
#
# The GPU machine needs the NVIDIA driver and NCCL: a libnccl.so on the
# loader's path, or the nvidia-nccl-cu12 / nvidia-nccl-cu13 wheel (which
# ships only libnccl.so.2; this script links libnccl.so to it in a private
# directory, since that is a name cudarc looks for). NCCL_LIB_DIR=DIR
# names the directory holding libnccl.so.2 explicitly.
set -uo pipefail
cd "$(dirname "$0")/.."

mode="${1:-}"
dir="${2:-target/gpu-check}"

build() {
    set -e
    mkdir -p "$dir"
    local out bins
    out=$(cargo test -p rankweave --features nccl --lib --test nccl_device --no-run 2>&1) || { echo "$out"; exit 1; }
    echo "$out" | tail -n 5
    bins=$(echo "$out" | grep -o 'target/debug/deps/[A-Za-z0-9_]*-[0-9a-f]*' | sort -u)
    for b in $bins; do
        case "$b" in
            */rankweave-*) cp "$b" "$dir/rankweave-lib" ;;
            */nccl_device-*) cp "$b" "$dir/nccl_device" ;;
        esac
    done
    [ -x "$dir/rankweave-lib" ] && [ -x "$dir/nccl_device" ] || { echo "gpu-check build: test binaries not found in: $bins" >&2; exit 1; }
    cargo build -p rankweave-cli --features nccl
    cp target/debug/rankweave "$dir/rankweave"
    if command -v strip >/dev/null 2>&1; then
        strip --strip-debug "$dir/rankweave-lib" "$dir/nccl_device" "$dir/rankweave"
    fi
    ls -la "$dir"
}

find_nccl_dir() {
    if [ -n "${NCCL_LIB_DIR:-}" ]; then
        echo "$NCCL_LIB_DIR"
        return
    fi
    local py
    for py in python3 python; do
        command -v "$py" >/dev/null 2>&1 || continue
        "$py" - <<'PY' 2>/dev/null && return
import glob, os, sys
try:
    import nvidia.nccl as m
except ImportError:
    sys.exit(1)
for p in list(m.__path__):
    hits = glob.glob(os.path.join(p, "lib", "libnccl.so*"))
    if hits:
        print(os.path.dirname(hits[0]))
        sys.exit(0)
sys.exit(1)
PY
    done
    ldconfig -p 2>/dev/null | awk '/libnccl\.so/ {print $NF; exit}' | xargs -r dirname
}

run() {
    local passed=0 failed=0
    [ -x "$dir/nccl_device" ] || { echo "gpu-check: no $dir/nccl_device; run '$0 build' first" >&2; exit 2; }
    echo "== machine"
    if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L; else echo "(no nvidia-smi)"; fi
    # One machine: NCCL's bootstrap stays on the loopback interface.
    export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-lo}"
    local nccl_dir lib
    nccl_dir=$(find_nccl_dir)
    if [ -n "$nccl_dir" ]; then
        lib=$(ls "$nccl_dir"/libnccl.so* 2>/dev/null | head -n 1)
        local link
        link=$(mktemp -d)
        ln -s "$lib" "$link/libnccl.so"
        export LD_LIBRARY_PATH="$link:$nccl_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        echo "NCCL: $lib"
    else
        echo "NCCL: not found (the NCCL tests will report it)"
    fi
    export RUST_BACKTRACE=1
    echo
    echo "== library unit tests (device, coordinator, parallel state)"
    if "$dir/rankweave-lib" --test-threads=2 device:: parallel_state:: coordinator:: tensor::; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
    fi
    echo
    echo "== device tests (nccl_device, ignored ones included)"
    local t
    # World size 1: every op and dtype against the CPU group, tensor dicts
    # with device tensors (gpu_world_of_one), the caller's stream waiting
    # and enqueue-only, a graph capture launched twice, a batched send to
    # self; then a peer that never joins, two ranks on one GPU, CUDA IPC
    # between two processes (the test starts them itself), and copies in
    # and out through raw device addresses (the bridge to candle's tensors).
    for t in without_a_driver device_metadata an_nccl_world a_cpu_group gpu_upload_download gpu_world_of_one \
        gpu_callers_stream gpu_graph_capture gpu_send_to_self gpu_parallel_state gpu_a_peer_that_never_joins \
        gpu_two_ranks gpu_cuda_ipc gpu_copies_through_device_addresses; do
        echo "-- $t"
        # A filter that matches no test must not count as a pass.
        if timeout 300 "$dir/nccl_device" --include-ignored --test-threads=1 --nocapture "$t" 2>&1 \
            | tee "$dir/$t.log" && grep -q 'test result: ok. [1-9]' "$dir/$t.log"; then
            passed=$((passed + 1))
        else
            failed=$((failed + 1))
        fi
    done
    echo
    echo "== demo --device cuda (world size 1: tp 1 x pp 1 on cuda:0)"
    if [ -x "$dir/rankweave" ] && timeout 300 "$dir/rankweave" demo --device cuda --tp 1 --pp 1 \
        --layers 2 --hidden 64 --heads 4 --vocab 128 --tokens 8; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
    fi
    echo
    echo "gpu-check: $passed passed, $failed failed"
    [ "$failed" -eq 0 ]
}

case "$mode" in
    build) build ;;
    run) run ;;
    *)
        echo "usage: $0 build|run [DIR]" >&2
        exit 2
        ;;
esac
