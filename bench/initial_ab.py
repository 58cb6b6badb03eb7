"""CPU seconds per GiB of an initial replication, two source trees interleaved (A/B).

On a shared box wall time measures the neighbours; the CPU seconds a copy costs (every thread
of the process: reading, zero detection, hashing, compression, packing, the store's and the
replica's writes) move much less with the load. This script runs ``run_initial`` of the same
sparse image (``bench/initial.py``'s layout) once per tree and mode per round, each in a fresh
process, trees alternating, and prints every run (wall, user and system CPU, the main thread's
CPU, the load average) and the median CPU seconds per GiB of data per tree and mode.

Modes: ``a`` to a committed point, ``a0`` the same with compression off, ``b`` including the
hydrated replica; ``aa`` and ``ba`` are ``a`` and ``b`` with compression "auto" (adaptive),
which a tree without it runs as zstd: A/B of ``aa`` against an older base is its zstd against
this tree's auto. The source image is read through the page cache before every run (warm).

    .venv/bin/python bench/initial_ab.py --base main [--rounds 5] [--modes a,a0,b]
        [--size-mib 1024] [--workdir DIR]

``--base`` is a git ref (its ``src`` is exported to a temporary tree) or a directory holding a
``src``; the other tree is this checkout. Both run under this checkout's Python.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def child(wd: Path, vm_id: str, item: str, mode: str) -> None:
    """One run in this process (``--child``): prints a JSON line."""
    from benchlib import Site

    import drsite

    site = Site(wd)
    site.drop_item(item)
    comp: bool | str = {"a0": False, "aa": "auto", "ba": "auto"}.get(mode, True)
    it, target = site.item(item, vm_id, hydrate=mode.startswith("b"), compression=comp)

    def cpu(who: int) -> tuple[float, float]:
        r = resource.getrusage(who)
        return r.ru_utime, r.ru_stime

    u0, s0 = cpu(resource.RUSAGE_SELF)
    m0 = sum(cpu(resource.RUSAGE_THREAD))
    t0 = time.perf_counter()
    it.run_initial()
    t = time.perf_counter() - t0
    u1, s1 = cpu(resource.RUSAGE_SELF)
    m1 = sum(cpu(resource.RUSAGE_THREAD))
    rep = it.report
    print(json.dumps({"src": drsite.__file__, "wall": t, "user": u1 - u0, "sys": s1 - s0,
                      "main": m1 - m0, "sent": rep.bytes_sent, "stored": rep.bytes_stored}))
    target.repo.close()
    site.drop_item(item)


def base_tree(ref: str, tmp: Path) -> Path:
    p = Path(ref)
    if (p / "src" / "drsite").is_dir():
        return p.resolve()
    out = tmp / "base"
    out.mkdir()
    arch = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "src"], check=True,
                          capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=arch, check=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="git ref or directory with src/ (tree A)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--modes", default="a,a0,b")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--fill", type=float, default=0.5)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", nargs=4, metavar=("WD", "VM", "ITEM", "MODE"),
                    help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    if a.child:
        child(Path(a.child[0]), a.child[1], a.child[2], a.child[3])
        return 0
    from benchlib import MiB, Site, plan_sparse, workdir, write_image, write_json

    with tempfile.TemporaryDirectory(prefix="initial-ab-") as tmp, \
            workdir(a.workdir) as wd:
        trees = {"A": base_tree(a.base, Path(tmp)), "B": ROOT}
        size = a.size_mib * MiB
        site = Site(wd)
        vm_id = site.create_vm("bench-initial-ab", size)
        src = site.hv.disk_path(vm_id, "disk0")
        lay = plan_sparse(size, a.fill, 1)
        write_image(src, lay, 1)
        gib = lay.data_bytes / 2**30
        modes = [m for m in a.modes.split(",") if m]
        print(f"image {a.size_mib} MiB, {lay.data_bytes / MiB:.1f} MiB data; A = {trees['A']}, "
              f"B = {trees['B']}")
        runs: dict[str, list[dict[str, Any]]] = {f"{t} {m}": [] for t in trees for m in modes}
        for r in range(a.rounds):
            for m in modes:
                order = ("A", "B") if r % 2 == 0 else ("B", "A")
                for t in order:
                    with open(src, "rb") as f:
                        while f.read(8 << 20):
                            pass
                    os.sync()
                    load = os.getloadavg()[0]
                    env = dict(os.environ, PYTHONPATH=f"{trees[t]}/src{os.pathsep}{HERE}")
                    out = subprocess.run([sys.executable, __file__, "--base", a.base, "--child",
                                          str(wd), vm_id, f"ab-{m}", m],
                                         env=env, capture_output=True, text=True)
                    if out.returncode:
                        print(out.stderr[-4000:])
                        return 1
                    j = json.loads(out.stdout.strip().splitlines()[-1])
                    if not j["src"].startswith(str(trees[t])):
                        print(f"tree {t} ran {j['src']}")
                        return 1
                    j["load"] = load
                    j["cpu_per_gib"] = (j["user"] + j["sys"]) / gib
                    runs[f"{t} {m}"].append(j)
                    print(f"r{r} {m:2s} {t}  load {load:5.2f}  wall {j['wall']:6.2f} s  "
                          f"CPU {j['cpu_per_gib']:5.2f} s/GiB (user {j['user'] / gib:4.2f}, "
                          f"sys {j['sys'] / gib:4.2f}, main thread {j['main'] / gib:4.2f})  "
                          f"stored {j['stored'] / MiB:.0f} MiB", flush=True)
        print("median CPU seconds per GiB of data (min, max):")
        summary: dict[str, Any] = {}
        for m in modes:
            for t in trees:
                v = [x["cpu_per_gib"] for x in runs[f"{t} {m}"]]
                w = [x["wall"] for x in runs[f"{t} {m}"]]
                summary[f"{t} {m}"] = {"cpu_median": statistics.median(v), "cpu": v,
                                       "wall_median": statistics.median(w)}
                print(f"  {m:2s} {t}  {statistics.median(v):5.2f}  ({min(v):.2f}, {max(v):.2f})"
                      f"  wall median {statistics.median(w):6.2f} s")
            ra = summary[f"A {m}"]["cpu_median"]
            rb = summary[f"B {m}"]["cpu_median"]
            print(f"  {m:2s} B/A  {rb / ra:5.2f}")
        write_json(a.json, {"benchmark": "initial_ab", "base": a.base, "size": size,
                            "data_bytes": lay.data_bytes, "runs": runs, "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
