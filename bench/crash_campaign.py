"""Crash campaign (issue 19) by hand: kill -9 the primary agent, the secondary agent or the
vault at random moments of initial copy, delta, planned and unplanned failover, cancel and
re-protect, on a real deployment (``drsite up``); prints per phase and per killed process the
time from the restart to "protected with a new point" (failover phases: to the job's end),
p50/p100, against the goal of two policy intervals. The logic is ``tests/crash_campaign.py``
(CI runs a short campaign of it: ``tests/e2e/test_crash_campaign.py``).

    .venv/bin/python bench/crash_campaign.py [--trials 54] [--seed 7] [--json FILE] [--keep-logs DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: tests.*

from benchlib import machine_info
from tests.crash_campaign import Campaign, summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=54)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--policy", type=float, default=5.0, help="policy frequency, s")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep-logs", type=Path, metavar="DIR",
                    help="if a trial fails, copy the deployment's logs here (the job and item "
                         "of a failed trial are in --json)")
    args = ap.parse_args()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="drsite-crash-") as tmp:
        camp = Campaign(Path(tmp) / "c", seed=args.seed, policy_s=args.policy)
        try:
            trials = camp.run(args.trials)
        finally:
            camp.close()
            if args.keep_logs and any(not t.ok for t in camp.trials):
                shutil.copytree(camp.c.root / "logs", args.keep_logs, dirs_exist_ok=True)
    out = summary(trials)
    out["machine"] = machine_info(Path(tempfile.gettempdir()))
    out["wall_s"] = round(time.monotonic() - t0, 1)
    out["goal_s"] = 2 * args.policy
    for t in trials:
        print(f"{t.n:3d} {t.phase:10s} kill {t.victim:16s} after {t.kill_after_s:4.2f} s → "
              f"{t.outcome or '-':22s} {t.restart_to_done_s if t.restart_to_done_s is not None else '-':>6} s"
              f"  {'ok' if t.ok else 'FAILED: ' + '; '.join(t.problems)}"
              + ("" if t.ok else f" (item {t.item or '?'}, killed {t.killed_at or '?'} UTC)"))
    for group in ("by_phase", "by_victim"):
        for k, v in out[group].items():
            print(f"{group[3:]:7s} {k:16s} trials {v['trials']:3d} failed {v['failed']:2d} "
                  f"p50 {v['p50_s']} s p100 {v['p100_s']} s within goal {v['within_goal']}")
    a = out["all"]
    print(f"all: {a['trials']} trials, {a['failed']} failed, p50 {a['p50_s']} s, "
          f"p100 {a['p100_s']} s (goal {out['goal_s']:.0f} s), wall {out['wall_s']} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0 if a["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
