#!/usr/bin/env python3
"""torch's TCPStore (libuv backend) under the workload of `rankweave bench store`.

For each client count N, a TCPStore master runs in a child process of its
own (so its threads and memory can be read from /proc/<pid>/status), and
this process opens N TCPStore clients, one thread each. Once all are
connected they start together: every client sets its key, waits for all N
keys (in wait() calls of at most 4096 keys, as the rankweave side must),
then meets the others at a barrier made of add() (the last to arrive sets a
key everyone waits on).

    python3 docs/bench/store_torch.py --clients 1000,4000,10000 [--json out.jsonl]

Columns match `rankweave bench store`.
"""

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import threading
import time

CHUNK = 4096
CLIENT_NICE = 10


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def proc_status(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("Threads", "VmRSS", "VmHWM"):
                    out[k] = int(v.split()[0])
    except OSError:
        return None
    return out


def serve(timeout_s):
    from torch.distributed import TCPStore

    raise_nofile()
    store = TCPStore(
        "127.0.0.1",
        0,
        None,
        True,
        datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
        use_libuv=True,
    )
    print(store.port, flush=True)
    print(f"libuv={store.libuvBackend}", file=sys.stderr, flush=True)
    sys.stdin.read()


def run_one(n, timeout_s, client_nice):
    from torch.distributed import TCPStore

    server = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--serve", "--timeout", str(timeout_s)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(server.stdout.readline().strip())
        pid = server.pid
        keys = [f"rdv/{i}" for i in range(n)]
        chunks = [keys[i : i + CHUNK] for i in range(0, n, CHUNK)]
        connected = threading.Barrier(n + 1)
        start = threading.Barrier(n + 1)
        results = []
        lock = threading.Lock()
        timeout = datetime.timedelta(seconds=timeout_s)

        def client(rank):
            try:
                st = TCPStore("127.0.0.1", port, None, False, timeout)
            except Exception as e:  # noqa: BLE001 - reported below
                st = e
            connected.wait()
            start.wait()
            try:
                if isinstance(st, Exception):
                    raise st
                st.set(keys[rank], str(rank))
                for c in chunks:
                    st.wait(c)
                seen = time.perf_counter()
                if st.add("barrier/arrived", 1) == n:
                    st.set("barrier/go", "1")
                st.wait(["barrier/go"])
                r = (seen, time.perf_counter())
            except Exception as e:  # noqa: BLE001 - reported below
                r = e
            with lock:
                results.append(r)

        threading.stack_size(512 * 1024)
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]

        def launch():
            # Clients at nice +10, the server process at 0, as in the Rust
            # bench (nice is per thread on Linux, inherited by new threads).
            if client_nice:
                os.nice(client_nice)
            for t in threads:
                t.start()

        launcher = threading.Thread(target=launch)
        launcher.start()
        launcher.join()
        connected.wait()
        connect_s = time.perf_counter() - t0
        time.sleep(0.2)
        idle = proc_status(pid) or {}
        peak = {"Threads": 0, "VmRSS": 0}
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                s = proc_status(pid)
                if s:
                    peak["Threads"] = max(peak["Threads"], s["Threads"])
                    peak["VmRSS"] = max(peak["VmRSS"], s["VmRSS"])
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        begin = time.perf_counter()
        start.wait()
        for t in threads:
            t.join()
        stop.set()
        sampler.join()
        errors = [r for r in results if isinstance(r, Exception)]
        if errors:
            raise RuntimeError(f"{len(errors)} clients failed, first: {errors[0]!r}")
        end = proc_status(pid) or {}
        return {
            "impl": "torch",
            "clients": n,
            "connect_s": connect_s,
            "rendezvous_s": max(r[0] for r in results) - begin,
            "total_s": max(r[1] for r in results) - begin,
            "server_threads": peak["Threads"],
            "rss_idle_kib": idle.get("VmRSS", 0),
            "rss_max_kib": peak["VmRSS"],
            "rss_hwm_kib": end.get("VmHWM", 0),
        }
    finally:
        server.stdin.close()
        server.wait()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", default="1000,4000,10000")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--json")
    p.add_argument("--client-nice", type=int, default=CLIENT_NICE, help="niceness of the client threads")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve:
        return serve(a.timeout)
    import torch

    limit = raise_nofile()
    print(f"# torch {torch.__version__} TCPStore (libuv) bench: same workload as `rankweave bench store`")
    print(f"# RLIMIT_NOFILE {limit}, client threads at nice +{a.client_nice}")
    print(
        f"{'clients':>8} {'connect_s':>10} {'rendezvous_s':>13} {'total_s':>9} {'threads':>8} "
        f"{'rss_idle_MiB':>12} {'rss_max_MiB':>12} {'rss_hwm_MiB':>12}"
    )
    for n in [int(x) for x in a.clients.split(",") if x.strip()]:
        r = run_one(n, a.timeout, a.client_nice)
        print(
            f"{r['clients']:>8} {r['connect_s']:>10.3f} {r['rendezvous_s']:>13.3f} {r['total_s']:>9.3f} "
            f"{r['server_threads']:>8} {r['rss_idle_kib'] / 1024:>12.1f} {r['rss_max_kib'] / 1024:>12.1f} "
            f"{r['rss_hwm_kib'] / 1024:>12.1f}",
            flush=True,
        )
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    sys.exit(main())
