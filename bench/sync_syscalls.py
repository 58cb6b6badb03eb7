"""Synchronous mode of file VMs (issue 18): system calls per 4 KiB write at queue depth 1, on
the guest's side and on the recovery side, counted with ``strace -f -c`` — a figure that does
not depend on the CPU share a loaded box gives the benchmark (``sync_latency.py`` measures
time). ``futex`` calls are thread hand-offs (a wake-up and its wait); ``poll``/``select`` and
``ioctl`` come with sockets that have a timeout.

Each side runs twice, with ``--n`` and ``2 * --n`` writes; the difference divided by ``--n``
is the cost of one write, without the set-up (imports, TLS handshake, VM creation). A third
run, without strace, reads both processes' per-thread scheduler counters around the write
loop (``/proc/PID/task/*/schedstat`` and ``status``): CPU time and context switches per write.

    .venv/bin/python bench/sync_syscalls.py [--n 500]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository

from benchlib import workdir
from sync_latency import enter_sync

from drsite.core.model import DiskSpec, VmSpec
from drsite.hypervisors.file import FileHypervisor
from drsite.sitestore.testing import make_test_certs

MiB = 1 << 20
DISK = 64 * MiB
IO = 4096
LATENCY = Path(__file__).resolve().parent / "sync_latency.py"


def counters(pid: int) -> dict[str, float]:
    """CPU ns, voluntary and involuntary context switches, summed over a process's threads."""
    out = {"cpu_us": 0.0, "voluntary_switches": 0.0, "involuntary_switches": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out["cpu_us"] += int((task / "schedstat").read_text().split()[0]) / 1000
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    out["voluntary_switches"] += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    out["involuntary_switches"] += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            pass   # a thread that ended meanwhile
    return out


def client(wd: Path, port: int, n: int, server_pid: int | None = None) -> None:
    """The guest's side (run as ``--client``): a sync file VM writing ``n`` 4 KiB blocks.
    With ``server_pid``: prints both sides' scheduler counters per write (JSON)."""
    certs = make_test_certs(wd / "recovery" / "pki")
    hv = FileHypervisor(wd / f"vms-{n}-{os.getpid()}")
    vm_id = hv.create_blank(VmSpec("bench", disks=(DiskSpec("d0", DISK),))).vm_id
    hv.start_tracking(vm_id)
    rt = hv.guest(vm_id)
    try:
        hv.release(hv.seal(vm_id))
        enter_sync(hv, vm_id, f"bench{n}-{os.getpid()}", port, certs, 5000)
        rng, buf = random.Random(18), os.urandom(IO)
        pids = {"guest_side": os.getpid(), "recovery_side": server_pid}
        before = {k: counters(p) for k, p in pids.items() if p is not None}
        t0 = time.perf_counter()
        for i in range(n):
            rt.vm.write("d0", rng.randrange(DISK // IO) * IO, buf, tag=i)
        wall = time.perf_counter() - t0
        if server_pid is not None:
            after = {k: counters(p) for k, p in pids.items() if p is not None}
            print(json.dumps({"mean_wall_us": round(wall / n * 1e6, 1), **{
                k: {c: round((after[k][c] - before[k][c]) / n, 2) for c in before[k]}
                for k in before}}))
        st = hv.sync_status(vm_id) or {}
        if st.get("state") != "in_sync" or st.get("acked") != st.get("seq"):
            raise SystemExit(f"mirror fell back: {st}")
    finally:
        rt.stop()


def parse(path: Path) -> dict[str, int]:
    """``strace -c`` output: syscall → calls."""
    out: dict[str, int] = {}
    for line in path.read_text().splitlines():
        m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$", line)
        if m and m.group(2) != "total":
            out[m.group(2)] = int(m.group(1))
    return out


def scheduler(wd: Path, n: int) -> dict[str, object]:
    """Both sides' CPU time and context switches per write (no strace)."""
    srv = subprocess.Popen([sys.executable, str(LATENCY), "--serve", str(wd / "recovery")],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None
        port = int(srv.stdout.readline())
        out = subprocess.run([sys.executable, __file__, "--client", str(wd), "--port", str(port),
                              "--n", str(n), "--server-pid", str(srv.pid)],
                             check=True, capture_output=True, text=True).stdout
    finally:
        assert srv.stdin is not None
        srv.stdin.close()
        srv.wait(60)
    res: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return res


def one(wd: Path, n: int) -> tuple[dict[str, int], dict[str, int]]:
    srv_out, cli_out = wd / f"server-{n}.strace", wd / f"client-{n}.strace"
    srv = subprocess.Popen(["strace", "-f", "-c", "-o", str(srv_out), sys.executable,
                            str(LATENCY), "--serve", str(wd / "recovery")],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None
        port = int(srv.stdout.readline())
        subprocess.run(["strace", "-f", "-c", "-o", str(cli_out), sys.executable, __file__,
                        "--client", str(wd), "--port", str(port), "--n", str(n)], check=True)
    finally:
        assert srv.stdin is not None
        srv.stdin.close()
        srv.wait(60)
    return parse(srv_out), parse(cli_out)


def per_write(a: dict[str, int], b: dict[str, int], n: int) -> dict[str, float]:
    keys = sorted(set(a) | set(b))
    d = {k: round((b.get(k, 0) - a.get(k, 0)) / n, 2) for k in keys}
    out = {k: v for k, v in d.items() if abs(v) >= 0.05}
    out["total"] = round(sum(d.values()), 2)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--client", type=Path)
    ap.add_argument("--port", type=int)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--server-pid", type=int, default=None)
    a = ap.parse_args()
    if a.client:
        client(a.client, a.port, a.n, a.server_pid)
        return 0
    if shutil.which("strace") is None:
        raise SystemExit("strace is not installed")
    with workdir(a.dir) as wd:
        s1, c1 = one(wd, a.n)
        s2, c2 = one(wd, 2 * a.n)
        sched = scheduler(wd, 2 * a.n)
        print(json.dumps({"n": a.n, "load_avg": os.getloadavg(),
                          "guest_side_syscalls_per_write": per_write(c1, c2, a.n),
                          "recovery_side_syscalls_per_write": per_write(s1, s2, a.n),
                          "scheduler_per_write": sched}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
