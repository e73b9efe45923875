#!/bin/bash
# Point-to-point and TCP goals in one run (docs/PERFORMANCE.md run 10): a
# one-thread memcpy and the host's cross-core copy (run 17), rankweave's
# shared-memory sendrecv (and the zero-copy sendrecv_shm, and sendrecv
# between huge-page buffers, run 18) beside Open MPI's vader, and
# rankweave's TCP sendrecv, broadcast and all_reduce beside Open MPI's tcp
# btl, N = 2 and 4, ROUNDS rounds; then the demo with one and two sequences
# (OLD=binary adds an older build's demo). Tables: python3
# docs/bench/p2p-goals.py $OUT.
# Usage, from the repository root after cargo build --release -p rankweave-cli:
#   cp -r ../shared/bench-anchors /tmp/anchors
#   ANCHORS=/tmp/anchors OUT=/tmp/p2p-goals SHM_OPS=sendrecv,sendrecv_shm ROUNDS=2 bash docs/bench/p2p-goals.sh
set -u
OUT=${OUT:-/tmp/p2p-goals}; mkdir -p $OUT
RW=${RW:-$PWD/target/release/rankweave}
BENCH_DIR=$PWD/docs/bench
SHM_OPS=${SHM_OPS:-sendrecv}; ROUNDS=${ROUNDS:-2}
A=${ANCHORS:-/tmp/anchors}; cd $A   # a copy of ../shared/bench-anchors (read-only where mounted)
M=(mpirun --allow-run-as-root --oversubscribe --mca oob_tcp_if_include lo --mca pml ob1)
SHM=(--mca btl vader,self); TCP=(--mca btl tcp,self --mca btl_tcp_if_include lo)
log() { echo "$(date +%T) $*" | tee -a $OUT/log; uptime >> $OUT/log; }
[ -x memcpy_bw ] || gcc -O2 -Wall -pthread -o memcpy_bw memcpy_bw.c
log memcpy; ./memcpy_bw 2 $OUT/memcpy.csv > $OUT/memcpy.txt 2>&1
# The host's cross-core copy (docs/bench/xcore_copy.c): the bound of any
# copying transfer between two processes on two cores, which moves with
# where the hypervisor puts the two vCPUs (run 17).
# It runs again after the rounds (xcore-end.csv): the state can change
# within a run (run 18).
# The host's vCPU state (docs/bench/vcpu_state.c, run 21) before and
# after each measurement: state.csv, read by p2p-goals.py. For ratios
# between figures of one state, docs/bench/paired.sh.
gcc -O2 -Wall -pthread -o $OUT/vcpu_state $BENCH_DIR/vcpu_state.c || exit 1
state() { $OUT/vcpu_state "$1" $OUT/state.csv > /dev/null; }
gcc -O2 -Wall -pthread -o $OUT/xcore_copy $BENCH_DIR/xcore_copy.c \
  && { log xcore; $OUT/xcore_copy $OUT/xcore.csv > $OUT/xcore.txt 2>&1; }
for r in $(seq 1 $ROUNDS); do
  for n in 2 4; do
    mx=64M; [ $n = 2 ] && mx=256M
    log "r$r shm n$n ompi"; state "r$r-shm-n$n-ompi-a"; timeout 300 "${M[@]}" "${SHM[@]}" -np $n ./mpi_bench --impl openmpi-shm --ops sendrecv --time-per-point 0.2 --max-bytes $mx --csv $OUT/ompi-shm-n$n-r$r.csv > /dev/null 2>&1; state "r$r-shm-n$n-ompi-b"
    log "r$r shm n$n rw"; state "r$r-shm-n$n-rw-a"; timeout 300 $RW bench $SHM_OPS --nproc $n --transport shm --sizes anchors --max-bytes $mx --mode loop --iters-time 0.2 --csv $OUT/rw-shm-n$n-r$r.csv > $OUT/rw-shm-n$n-r$r.txt 2>&1; state "r$r-shm-n$n-rw-b"
    # The same sendrecv between buffers on transparent huge pages (run 18),
    # from 64 KiB: the rows "sendrecv_huge".
    log "r$r shm n$n rw huge"; state "r$r-shm-n$n-rw-huge-a"; timeout 300 $RW bench sendrecv --huge-pages --nproc $n --transport shm --sizes 64K,256K,1M,4M,16M,64M,256M --max-bytes $mx --mode loop --iters-time 0.2 --csv $OUT/rwhuge-shm-n$n-r$r.csv > $OUT/rwhuge-shm-n$n-r$r.txt 2>&1; state "r$r-shm-n$n-rw-huge-b"
    log "r$r tcp n$n ompi"; state "r$r-tcp-n$n-ompi-a"; timeout 400 "${M[@]}" "${TCP[@]}" -np $n ./mpi_bench --impl openmpi-tcp --ops sendrecv,broadcast,all_reduce --time-per-point 0.2 --max-bytes 64M --csv $OUT/ompi-tcp-n$n-r$r.csv > /dev/null 2>&1; state "r$r-tcp-n$n-ompi-b"
    log "r$r tcp n$n rw"; state "r$r-tcp-n$n-rw-a"; timeout 400 $RW bench sendrecv,broadcast,all_reduce --nproc $n --transport tcp --sizes anchors --max-bytes 64M --mode loop --iters-time 0.2 --csv $OUT/rw-tcp-n$n-r$r.csv > $OUT/rw-tcp-n$n-r$r.txt 2>&1; state "r$r-tcp-n$n-rw-b"
  done
done
[ -x $OUT/xcore_copy ] && { log xcore-end; $OUT/xcore_copy $OUT/xcore-end.csv > $OUT/xcore-end.txt 2>&1; }
for r in 1 2 3; do
  for layout in "--tp 1 --pp 2" "--tp 2 --pp 2"; do
    tag=$(echo $layout | tr -d ' -')
    log "demo r$r $tag"
    if [ -n "${OLD:-}" ]; then $OLD demo $layout > $OUT/demo-old-$tag-r$r.txt 2>&1; fi
    $RW demo $layout > $OUT/demo-new1-$tag-r$r.txt 2>&1
    $RW demo $layout --sequences 2 > $OUT/demo-new2-$tag-r$r.txt 2>&1
  done
done
log done
