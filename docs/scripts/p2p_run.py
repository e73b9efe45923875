#!/usr/bin/env python3
"""Used for docs/PERFORMANCE.md run 6. Expects the anchors built in
/tmp/anchors (mpi_bench, memcpy_bw; see ../shared/bench-anchors/README.md)
and two release builds of `rankweave` at /tmp/rankweave-before and
/tmp/rankweave-after. Usage: python3 p2p_run.py OUT.json (tcp_run.py: no argument).

One run of the point-to-point comparison: memcpy (1 thread), Open MPI
sendrecv (vader shm, tcp) and rankweave before/after (shm, tcp), N=2 and N=4
(sendrecv is a ping-pong between ranks 0 and 1; the other ranks idle)."""
import subprocess, re, sys, json
A = '/tmp/anchors'
SIZES = [8, 64, 1024, 4096, 16384, 65536, 262144, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20]
res = {}
def mpi(tr, n):
    mca = ['--mca', 'pml', 'ob1', '--mca', 'btl', 'vader,self'] if tr == 'shm' else ['--mca', 'pml', 'ob1', '--mca', 'btl', 'tcp,self', '--mca', 'btl_tcp_if_include', 'lo']
    out = subprocess.run(['timeout', '150', 'mpirun', '--allow-run-as-root', '--oversubscribe', '--mca', 'oob_tcp_if_include', 'lo', '-np', str(n)] + mca +
                         [A + '/mpi_bench', '--impl', 'openmpi-' + tr, '--ops', 'sendrecv', '--time-per-point', '0.2'], capture_output=True, text=True).stdout
    d = {}
    mult = {'B': 1, 'KiB': 1024, 'MiB': 1 << 20, 'GiB': 1 << 30}
    for line in out.splitlines():
        f = line.split()
        if len(f) > 8 and f[1] == 'sendrecv' and f[2] == 'loop':
            d[int(f[4]) * mult[f[5]]] = float(f[7])
    return d
def rw(which, tr, n):
    sizes = ','.join(str(s) for s in SIZES)
    out = subprocess.run(['timeout', '300', '/tmp/rankweave-' + which, 'bench', 'sendrecv', '--nproc', str(n), '--sizes', sizes, '--mode', 'loop',
                          '--iters-time', '0.2', '--transport', tr], capture_output=True, text=True, cwd='/tmp').stdout
    d = {}
    for line in out.splitlines():
        f = line.split()
        if len(f) > 6 and f[0].isdigit() and f[5] != 'N/A':
            d[int(f[0])] = float(f[5])
    return d
def memcpy():
    subprocess.run(['timeout', '200', A + '/memcpy_bw', '1', '/tmp/memcpy_run.csv'], capture_output=True)
    d = {}
    for line in open('/tmp/memcpy_run.csv'):
        f = line.strip().split(',')
        if f[0] == 'copy' and f[1] == '1':
            d.setdefault(int(f[2]), []).append(float(f[7]))
    return {k: max(v) for k, v in d.items()}  # GB/s, best of its two medians
res['memcpy_GBps'] = memcpy()
for n in [2, 4]:
    for tr in ['shm', 'tcp']:
        if n == 4 and tr == 'tcp':
            continue
        res[f'openmpi-{tr} N={n}'] = mpi(tr, n)
        for w in ['before', 'after']:
            res[f'rankweave-{w}-{tr} N={n}'] = rw(w, tr, n)
json.dump(res, open(sys.argv[1], 'w'), indent=1)
def fmt(us):
    return '-' if us is None else (f'{us:.2f}' if us < 10 else f'{us:.1f}' if us < 1000 else f'{us:,.0f}')
def human(s):
    return f'{s >> 20} MiB' if s >= 1 << 20 else f'{s >> 10} KiB' if s >= 1024 else f'{s} B'
for n in [2, 4]:
    trs = ['shm', 'tcp'] if n == 2 else ['shm']
    cols = []
    for tr in trs:
        cols += [f'openmpi-{tr} N={n}', f'rankweave-before-{tr} N={n}', f'rankweave-after-{tr} N={n}']
    print(f'\n## sendrecv N={n}, median us (half round trip)\n')
    print('| size | ' + ' | '.join(c.replace(f' N={n}', '') for c in cols) + ' | after/ompi shm' + (' | after/ompi tcp' if n == 2 else '') + ' | after shm GB/s / memcpy |')
    print('|---:' * (len(cols) + 3 + (1 if n == 2 else 0)) + '|')
    for s in SIZES:
        row = [res[c].get(s) for c in cols]
        ratio = lambda o, a: f'{o / a:.2f}x' if o and a else '-'
        shm_r = ratio(res[f'openmpi-shm N={n}'].get(s), res[f'rankweave-after-shm N={n}'].get(s))
        extra = [shm_r]
        if n == 2:
            extra.append(ratio(res['openmpi-tcp N=2'].get(s), res['rankweave-after-tcp N=2'].get(s)))
        a = res[f'rankweave-after-shm N={n}'].get(s)
        m = res['memcpy_GBps'].get(s)
        extra.append(f'{(s / a / 1e3) / m:.2f}' if a and m and s >= 65536 else '-')
        print(f'| {human(s)} | ' + ' | '.join(fmt(x) for x in row) + ' | ' + ' | '.join(extra) + ' |')
