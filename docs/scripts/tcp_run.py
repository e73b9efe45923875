#!/usr/bin/env python3
"""Used for docs/PERFORMANCE.md run 6. Expects the anchors built in
/tmp/anchors (mpi_bench, memcpy_bw; see ../shared/bench-anchors/README.md)
and two release builds of `rankweave` at /tmp/rankweave-before and
/tmp/rankweave-after. Usage: python3 p2p_run.py OUT.json (tcp_run.py: no argument).

One run: all_reduce and broadcast over TCP, N=4, Open MPI vs rankweave before/after."""
import subprocess, sys
SIZES = [8, 1024, 65536, 1 << 20, 16 << 20, 64 << 20]
mult = {'B': 1, 'KiB': 1024, 'MiB': 1 << 20, 'GiB': 1 << 30}
out = subprocess.run(['timeout', '200', 'mpirun', '--allow-run-as-root', '--oversubscribe', '--mca', 'oob_tcp_if_include', 'lo', '-np', '4',
                      '--mca', 'pml', 'ob1', '--mca', 'btl', 'tcp,self', '--mca', 'btl_tcp_if_include', 'lo', '/tmp/anchors/mpi_bench', '--impl', 'o',
                      '--ops', 'all_reduce,broadcast', '--time-per-point', '0.2', '--max-bytes', '64M'], capture_output=True, text=True).stdout
res = {}
for line in out.splitlines():
    f = line.split()
    if len(f) > 8 and f[2] == 'loop':
        res.setdefault('openmpi-tcp', {})[(f[1], int(f[4]) * mult[f[5]])] = float(f[7])
for w in ['before', 'after']:
    out = subprocess.run(['timeout', '300', '/tmp/rankweave-' + w, 'bench', 'all_reduce,broadcast', '--nproc', '4', '--sizes', ','.join(map(str, SIZES)),
                          '--mode', 'loop', '--iters-time', '0.2', '--transport', 'tcp'], capture_output=True, text=True, cwd='/tmp').stdout
    op = None
    for line in out.splitlines():
        f = line.split()
        if line.startswith('# ') and 'mode=loop' in line:
            op = f[1]
        elif len(f) > 10 and f[0].isdigit():
            t = f[5] if f[5] != 'N/A' else f[9]
            res.setdefault('rankweave-' + w, {})[(op, int(f[0]))] = float(t)
print('| op | size | Open MPI TCP us | rankweave before us | rankweave after us | after vs Open MPI |')
print('|---|---:|---:|---:|---:|---:|')
for op in ['all_reduce', 'broadcast']:
    for s in SIZES:
        o, b, a = (res.get(k, {}).get((op, s)) for k in ['openmpi-tcp', 'rankweave-before', 'rankweave-after'])
        h = f'{s >> 20} MiB' if s >= 1 << 20 else f'{s >> 10} KiB' if s >= 1024 else f'{s} B'
        print(f'| {op} | {h} | {o} | {b} | {a} | ' + (f'{o / a:.2f}x' if o and a else '-') + ' |')
