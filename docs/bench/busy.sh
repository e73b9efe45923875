#!/bin/bash
# Run 19 of docs/PERFORMANCE.md: rankweave builds (and optionally Open MPI)
# beside busy loops. Each busy loop is a shell loop bounded by `timeout`.
#
#   RW="old=/path/a new=/path/b" ROUNDS=2 HOGS="0 1" NPROC="2 4" bash docs/bench/busy.sh
#   ANCHORS=/tmp/anchors ...   also runs Open MPI's mpi_bench at 2 ranks
set -u
RW=${RW:?RW="label=binary ..."}; ROUNDS=${ROUNDS:-2}; HOGS=${HOGS:-"0 1"}; NPROC=${NPROC:-"2 4"}
SIZES=8,16K,1M; OPS=sendrecv,all_reduce,broadcast
hogs_start() { for _ in $(seq "$1"); do timeout 120 bash -c 'while :; do :; done' & done; sleep 0.3; }
hogs_stop() { pkill -f 'while :; do :; done' 2>/dev/null; wait 2>/dev/null; }
rw_line() { # binary nproc transport
  timeout 120 "$1" bench $OPS --nproc "$2" --transport "$3" --sizes $SIZES --iters-time 0.1 2>&1 |
    awk '/^# [a-z_]+ +mode=/{printf " %s ", $2} /^ +[0-9]/{v=$6; if (v=="N/A") v=$10; printf "%s:%s ", $1, v}'
}
for h in $HOGS; do for n in $NPROC; do for r in $(seq "$ROUNDS"); do for lb in $RW; do
  label=${lb%%=*}; bin=${lb#*=}
  hogs_start "$h"
  for t in tcp shm; do echo "busy=$h n=$n r=$r $label $t: $(rw_line "$bin" "$n" "$t")"; done
  hogs_stop
done; done; done; done
if [ -n "${ANCHORS:-}" ]; then
  M=(mpirun --allow-run-as-root --oversubscribe --mca oob_tcp_if_include lo --mca pml ob1)
  for h in $HOGS; do for r in $(seq "$ROUNDS"); do
    hogs_start "$h"
    for t in tcp shm; do
      if [ $t = tcp ]; then B=(--mca btl tcp,self --mca btl_tcp_if_include lo); else B=(--mca btl vader,self); fi
      line=$(cd "$ANCHORS" && timeout 120 "${M[@]}" "${B[@]}" -np 2 ./mpi_bench --impl ompi --ops $OPS \
        --time-per-point 0.1 --max-bytes 1M 2>/dev/null | grep ' loop ' |
        awk '($5==8&&$6=="B")||($5==16&&$6=="KiB")||($5==1&&$6=="MiB"){printf "%s %s%s:%s ", $2, $5, $6, $8}')
      echo "busy=$h n=2 r=$r ompi $t: $line"
    done
    hogs_stop
  done; done
fi
