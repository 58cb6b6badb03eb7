"""Run the benchmarks (initial, delta, resync, churn) and append a dated section to
bench/RESULTS.md.

Each benchmark runs as its own process (``bench/<name>.py --json FILE``); its output streams to
the console and its figures are collected into a table with the machine's description (nproc,
memory, CPU model, Python version, filesystem). Figures are recorded as measured, goals met or
not. ``--quick`` uses small sizes (a smoke run, not comparable with full runs).

    .venv/bin/python bench/run_all.py [--quick] [--only initial,delta] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import BENCH_DIR, DEFAULT_OUT, MiB, cache_note, machine_info

BENCHES = ("initial", "delta", "resync", "churn")
OPTIONAL = ("scale",)  # run only when asked for (--scale, or named in --only)
QUICK_ARGS = {
    "scale": ["--quick"],
    "initial": ["--size-mib", "256"],
    "delta": ["--disk-mib", "256", "--write-mib", "16"],
    "resync": ["--size-mib", "256"],
    "churn": ["--quick"],
}
# the churn curve of a full run is the one committed beside RESULTS.md (linked from it)
PLOTS = {"churn": (BENCH_DIR / "churn.png", BENCH_DIR / "out" / "churn-quick.png")}


def run_one(name: str, quick: bool, wd: Path | None, out_json: Path,
            extra: list[str]) -> tuple[int, float]:
    cmd = [sys.executable, str(BENCH_DIR / f"{name}.py"), "--json", str(out_json)]
    if quick:
        cmd += QUICK_ARGS[name]
    if name in PLOTS:
        cmd += ["--plot", str(PLOTS[name][1 if quick else 0])]
    cmd += extra
    if wd is not None:
        cmd += ["--workdir", str(wd)]
    print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, cwd=BENCH_DIR.parent).returncode
    return rc, time.perf_counter() - t0


def _uptime() -> str:
    """The load averages as ``uptime`` prints them (1, 5, 15 minutes)."""
    try:
        return ", ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _m(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


def _scale_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    goal = r["goal_p99_s"]
    rows: list[tuple[str, str, str, str]] = []
    for e in r["engines"]:
        c, n = e["cycles"], e["engine"]
        share = c["on_time_share"]
        p99 = max(e["items_p99"], e["health_p99"])
        rows += [
            (f"scale/{n}: load", f"{e['items']} items, {e['hosts']} hosts, frequency "
             f"{e['frequency_s']:.0f} s, heartbeat {e['heartbeat_s']:.0f} s, window "
             f"{e['window_s']:.0f} s", "", ""),
            (f"scale/{n}: cycles on time (≤ due + {c['tolerance_s']:.0f} s)",
             f"**{100 * share:.1f} %** ({c['on_time']}/{c['due']}; p99 late "
             f"{c['late_p99']:.1f} s)", "100 %", "met" if share >= 1.0 else "**not met**"),
            (f"scale/{n}: GET /items, /health p99", f"**{1000 * e['items_p99']:.0f} ms**, "
             f"**{1000 * e['health_p99']:.0f} ms**", f"≤ {1000 * goal:.0f} ms",
             "met" if p99 <= goal else "**not met**"),
            (f"scale/{n}: vault CPU, RSS; generator CPU", f"{e['vault_cpu_cores']:.2f} cores, "
             f"{e['vault_rss_end'] / MiB:.0f} MiB; {e['gen_cpu_cores']:.2f} cores", "", ""),
        ]
    return rows


def _churn_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows = [("churn: set-up", f"{r['target']} target, disk {r['disk_size'] / MiB / 1024:.0f} GiB"
             f"{' prefilled' if r.get('prefilled') else ' sparse'}, window {r['window']:.0f} s, "
             f"load {r['load_start']:.1f} → {r['load_end']:.1f}", "", "")]
    for n, pr in r["patterns"].items():
        lim = pr["unprotected_limit"]
        goal = pr.get("goal")
        eff = min(goal, lim) if goal else None
        for f, c in pr.get("capacity", {}).items():
            ok = eff is not None and c["rate"] >= eff and c["ratio"] >= r["ratio_goal"]
            more = "; every rate tried passed" if c["all_passed"] else ""
            rss = f", engine RSS ≤ {c['engine_rss_max'] / MiB:.0f} MiB" \
                if c.get("engine_rss_max") else ""
            rows.append((f"churn {n} {pr['pattern']} @ {float(f):g} s: highest rate with "
                         f"RPO ≤ {r['rpo_factor']:.0f}×", f"**{c['rate'] / MiB:.0f} MiB/s** "
                         f"(ratio {c['ratio']:.2f}{rss}; unprotected limit {lim / MiB:.0f} "
                         f"MiB/s{more})", f"≥ {eff / MiB:.0f} MiB/s, ratio ≥ "
                         f"{r['ratio_goal']}" if eff else "",
                         ("met" if ok else "**not met**") if eff else ""))
    return rows


def rows_for(name: str, r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, value, goal, verdict) rows of one benchmark's JSON."""
    if name == "scale":
        return _scale_rows(r)
    if name == "initial":
        size = r["size"]

        def thr(t: float) -> str:
            return f"{size / MiB / t:.0f} MiB/s"

        goal_b = r.get("goal_replica", r["goal"])
        rows = [("initial: image", f"{_m(size)} logical, {_m(r['data_bytes'])} data "
                 f"({_m(r['random_bytes'])} random)", "", "")]
        states = r.get("states") or {"cold" if r.get("cache_dropped") else "warm": r}
        for st, x in states.items():
            rows += [
                (f"initial ({st}): cp --sparse=always + fsync (best)", f"{x['cp_best']:.2f} s, "
                 f"{thr(x['cp_best'])}", "reference", ""),
                (f"initial ({st}) (a) to committed point (best)", f"{x['a_best']:.2f} s, "
                 f"{thr(x['a_best'])}, ratio **{x['ratio_a']:.2f}**", f"≥ {r['goal']}",
                 "met" if x["ratio_a"] >= r["goal"] else "**not met**"),
                (f"initial ({st}) (a0) same, compression off", f"{x['a0_best']:.2f} s, ratio "
                 f"{x['ratio_a0']:.2f}", "", ""),
                (f"initial ({st}) (b) incl. replica (best)", f"{x['b_best']:.2f} s, "
                 f"{thr(x['b_best'])}, ratio **{x['ratio_b']:.2f}**", f"≥ {goal_b}",
                 "met" if x["ratio_b"] >= goal_b else "**not met**"),
            ]
        rows.append(("initial: bytes read / sent / stored", f"{_m(r['bytes_read'])} / "
                     f"{_m(r['bytes_sent'])} / {_m(r['bytes_stored'])} (compression "
                     f"{r['compression']:.2f}x)", "", ""))
        return rows
    if name == "churn":
        return _churn_rows(r)
    if name == "delta":
        return [
            ("delta: writes", f"{r['writes']} × {r['io']} B random "
             f"({'unaligned' if r['unaligned'] else 'aligned'}) on a {_m(r['disk_size'])} disk: "
             f"{_m(r['written_total'])}, {_m(r['written_distinct'])} distinct", "", ""),
            ("delta: shipped / written (distinct)", f"**{r['ratio_distinct']:.3f}** "
             f"({_m(r['bytes_sent'])} raw, {_m(r['bytes_stored'])} stored)",
             f"≤ {r['goal']}", "met" if r["ratio_distinct"] <= r["goal"] else "**not met**"),
            ("delta: shipped / written (overlaps counted)", f"{r['ratio_total']:.3f}", "", ""),
            ("delta: cycle wall time", f"{r['cycle_seconds']:.2f} s (hydration "
             f"{r['hydrate_seconds']:.2f} s), {r['writes'] / r['cycle_seconds']:.0f} writes/s",
             "", ""),
        ]
    st = r["rsync_stats"]
    return [
        ("resync: pair", f"{_m(r['size'])} (fill {r['fill']:.0%}), {r['changes']} × "
         f"{r['piece'] // 1024} KiB changed = {_m(r['changed_bytes'])}", "", ""),
        ("resync: ours / (rsync + fsync)", f"**{r['ratio']:.2f}** ({r['ours_seconds']:.2f} s vs "
         f"{r['rsync_seconds']:.2f} s; vs rsync alone {r['ratio_rsync_only']:.2f})",
         f"≤ {r['goal']}", "met" if r["ratio"] <= r["goal"] else "**not met**"),
        ("resync: ours sent", f"{_m(r['ours_bytes_sent'])} raw, {_m(r['ours_bytes_stored'])} "
         "compressed", "", ""),
        ("resync: rsync sent", f"{_m(st.get('total_sent', 0))} total, "
         f"{_m(st.get('literal', 0))} literal", "", ""),
    ]


def interpretation(name: str, r: dict[str, Any]) -> str:
    if name == "scale":
        return "scale: " + "; ".join(
            f"{e['engine']}: {100 * e['cycles']['on_time_share']:.1f} % of cycles on time, "
            f"p99 /items {1000 * e['items_p99']:.0f} ms, /health {1000 * e['health_p99']:.0f} ms"
            for e in r["engines"])
    if name == "initial":
        goal_b = r.get("goal_replica", r["goal"])
        states = r.get("states") or {"cold" if r.get("cache_dropped") else "warm": r}
        return "initial: " + "; ".join(
            f"{st}: to a committed point {x['ratio_a']:.2f}× cp's throughput "
            f"({'meets' if x['ratio_a'] >= r['goal'] else 'misses'} ≥ {r['goal']}), with the "
            f"replica {x['ratio_b']:.2f}× ({'meets' if x['ratio_b'] >= goal_b else 'misses'} "
            f"≥ {goal_b})" for st, x in states.items()) + "."
    if name == "churn":
        return "churn: " + "; ".join(
            f"{n} @ {float(f):g} s: {c['rate'] / MiB:.0f} MiB/s (ratio {c['ratio']:.2f})"
            for n, pr in r["patterns"].items() for f, c in pr.get("capacity", {}).items()) + \
            f" — plot: {r.get('plot', 'not drawn')}."
    if name == "delta":
        ok = r["ratio_distinct"] <= r["goal"]
        return (f"delta: ships {r['ratio_distinct']:.3f}× the distinct bytes written "
                f"({'meets' if ok else 'misses'} ≤ {r['goal']}); the cycle ran at "
                f"{r['writes'] / r['cycle_seconds']:.0f} writes/s.")
    ok = r["ratio"] <= r["goal"]
    return (f"resync: {r['ratio']:.2f}× rsync's wall time ({'meets' if ok else 'misses'} ≤ "
            f"{r['goal']}), shipping {r['ours_bytes_sent'] / max(r['changed_bytes'], 1):.2f}× the "
            "changed bytes (64 KiB blocks; unaligned changes touch two).")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset")
    ap.add_argument("--scale", action="store_true",
                    help="also run the control-plane scale benchmark (bench/scale.py)")
    ap.add_argument("--workdir", type=Path, default=None, help="passed to each benchmark")
    ap.add_argument("--args", action="append", default=[], metavar="NAME=ARGS",
                    help="more arguments for one benchmark, e.g. churn='--window 300'")
    ap.add_argument("--results", type=Path, default=BENCH_DIR / "RESULTS.md",
                    help="file the dated section is appended to")
    ap.add_argument("--no-record", action="store_true", help="do not append to the results file")
    a = ap.parse_args(argv)
    names = [n for n in a.only.split(",") if n]
    if a.scale and "scale" not in names:
        names.append("scale")
    bad = [n for n in names if n not in BENCHES + OPTIONAL]
    if bad:
        ap.error(f"unknown benchmark(s): {', '.join(bad)}")

    extra: dict[str, list[str]] = {}
    for spec in a.args:
        n, _, rest = spec.partition("=")
        extra.setdefault(n, []).extend(shlex.split(rest))
    info = machine_info(a.workdir or DEFAULT_OUT)
    load_before = _uptime()
    results: dict[str, dict[str, Any]] = {}
    failed: dict[str, int] = {}
    elapsed: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-json-") as tmp:
        for name in names:
            out = Path(tmp) / f"{name}.json"
            rc, el = run_one(name, a.quick, a.workdir, out, extra.get(name, []))
            elapsed[name] = el
            if rc != 0:
                failed[name] = rc
            if out.exists():
                results[name] = json.loads(out.read_text())

    stamp = time.strftime("%Y-%m-%d %H:%M %Z")
    dropped = any(r.get("cache_dropped") for r in results.values())
    lines = [f"## {stamp} — {'quick (small sizes)' if a.quick else 'full'} run", ""]
    lines += [f"- machine: {info['nproc']} CPUs ({info['cpu']}), {info['memory']} RAM, "
              f"Python {info['python']}, kernel {info['kernel']}",
              f"- load (uptime) before / after: {load_before} / {_uptime()}",
              f"- filesystem: {info['filesystem']}",
              f"- tools: {info['cp']}; {info['rsync']}",
              f"- page cache: {cache_note(dropped)}",
              "- wall time per benchmark: "
              + ", ".join(f"{n} {elapsed[n]:.0f} s" for n in names), ""]
    lines += ["| figure | value | goal | verdict |", "|---|---|---|---|"]
    for name in names:
        if name in results:
            lines += [f"| {f} | {v} | {g} | {m} |" for f, v, g, m in rows_for(name, results[name])]
        else:
            lines.append(f"| {name} | failed (exit {failed.get(name)}) | | |")
    lines.append("")
    for name in names:
        if name in results:
            lines.append(f"- {interpretation(name, results[name])}")
    plot = results.get("churn", {}).get("plot")
    if plot and Path(plot).exists():
        rel = Path(plot).resolve().relative_to(BENCH_DIR) if Path(plot).resolve().is_relative_to(
            BENCH_DIR) else Path(plot)
        lines += ["", f"RPO against churn, one line per I/O size: ![churn curve]({rel})"]
    for name, rc in failed.items():
        lines.append(f"- {name}: exited with status {rc} (see its output)")
    lines.append("")
    section = "\n".join(lines)
    print("\n" + section)
    if not a.no_record:
        if not a.results.exists():
            a.results.write_text("# Benchmark results\n\nSections are appended by "
                                 "`bench/run_all.py` (`make bench`), newest last.\n\n")
        with a.results.open("a") as f:
            f.write(section + "\n")
        print(f"appended to {a.results}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
