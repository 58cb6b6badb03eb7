"""Write ``tests/group_seconds.json`` from the JUnit XML of a full run: the seconds each xdist
group took (a module; the README's cluster modules together, "readme"). ``conftest.py`` hands
the groups to the workers longest first with it.

    .venv/bin/pytest -q -n 4 --dist loadgroup --no-loadscope-reorder --junitxml=/tmp/run.xml
    .venv/bin/python tests/group_seconds.py /tmp/run.xml
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = Path(__file__).with_name("group_seconds.json")


def module_of(classname: str) -> str | None:
    """``tests.e2e.test_x`` (or ``tests.e2e.test_x.TestClass``) -> ``tests/e2e/test_x.py``."""
    parts = classname.split(".")
    for n in range(len(parts), 0, -1):
        path = "/".join(parts[:n]) + ".py"
        if (REPO / path).exists():
            return path
    return None


def group_seconds(xml_files: list[Path]) -> dict[str, float]:
    seconds: dict[str, float] = defaultdict(float)
    for f in xml_files:
        for case in ET.parse(f).getroot().iter("testcase"):
            module = module_of(case.get("classname", ""))
            if module is None:
                continue
            name = case.get("name", "")
            group = name.rsplit("@", 1)[1] if "@" in name else module  # xdist_group's suffix
            seconds[group] += float(case.get("time", "0") or 0)
    return dict(seconds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("xml", nargs="+", type=Path, help="JUnit XML of a full run (pytest --junitxml)")
    args = ap.parse_args(argv)
    seconds = group_seconds(args.xml)
    if not seconds:
        print("no test cases found", file=sys.stderr)
        return 2
    ordered = dict(sorted(((g, round(s, 1)) for g, s in seconds.items()), key=lambda kv: -kv[1]))
    OUT.write_text(json.dumps(ordered, indent=1) + "\n")
    total = sum(ordered.values())
    print(f"{len(ordered)} groups, {total:.0f} s in all; longest: "
          + ", ".join(f"{g} {s:.0f} s" for g, s in list(ordered.items())[:5]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
